#!/usr/bin/python3
"""handoffs.py: where a sync write's time goes, counted rather than timed.

  /usr/bin/python3 bench/handoffs.py --tvillingd build/agent/tvillingd \
      --tvillingctl build/agent/cli/tvillingctl --pki deploy/pki/make-dev-pki.sh [--writes N]

Runs N 4 KiB random writes at QD1 (fio's nbd engine, one job) against (1) a single tvillingd and
(2) a primary with one sync peer over mutual TLS on loopback, and reads every thread's voluntary
and involuntary context switches, CPU time and minor page faults from /proc/PID/task/TID before
and after. It prints, per agent and thread name, the context switches, CPU microseconds and page
faults per write. With --perf DIR it also samples each agent with perf during the measured writes.

Why counts: on this shared 2-vCPU machine the latency of a write moves with whatever else runs,
but the number of times a write puts a thread to sleep and wakes another (each a futex wake-up
and a scheduler round trip, tens of microseconds here) does not. A sync write's overhead over a
single node is mostly those hand-offs (docs/benchmarks.md, "Where the time goes").
The threads are named by tvillingd (tvl-commit, tvl-fsync, tvl-ship, tvl-checkpoint, tvl-nbd, and
tvl-grpc-srv / tvl-grpc-cli for the replication streams) and
by gRPC (grpcpp_sync_ser, default-executo, ...); the main thread runs the NBD event loop.
"""

import argparse
import collections
import json
import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "integration"))
from repl_lib import Cluster, wait_caught_up  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def threads(pid):
    """{tid: (comm, voluntary, involuntary, cpu_seconds)} for every thread of `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/comm") as f:
                comm = f.read().strip()
            vol = invol = 0
            with open(f"{base}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol = int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        invol = int(line.split()[1])
            with open(f"{base}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
            minflt = int(fields[7])  # minor page faults: first touches of fresh memory
        except OSError:
            continue  # the thread ended
        out[tid] = (comm, vol, invol, cpu, minflt)
    return out


def delta(before, after):
    """Per thread name: [voluntary, involuntary, cpu seconds, minor faults] during the run."""
    by_name = collections.defaultdict(lambda: [0, 0, 0.0, 0])
    for tid, (comm, vol, invol, cpu, minflt) in after.items():
        b = before.get(tid, (comm, 0, 0, 0.0, 0))
        d = by_name[comm]
        d[0] += vol - b[1]
        d[1] += invol - b[2]
        d[2] += cpu - b[3]
        d[3] += minflt - b[4]
    return by_name


def fio(uri, writes):
    args = ["fio", "--name=h", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
            "--iodepth=1", f"--number_ios={writes}", "--size=256M", "--randrepeat=0",
            "--output-format=json"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"fio failed: {r.stderr}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["write"]
    return job["total_ios"], job["clat_ns"]["percentile"]["50.000000"] / 1000


def measure(args, kind):
    c = Cluster(args.tvillingd, args.tvillingctl, args.pki, f"handoffs-{kind}")
    try:
        a = c.agent("site-a")
        a.test_tuning = False
        g = {"name": "g0", "primary": "site-a", "size": "256MiB"}
        agents = [a]
        if kind == "single":
            a.write_config([g])
        else:
            b = c.agent("site-b")
            b.test_tuning = False
            agents.append(b)
            a.write_config([dict(g, peers=[(b, "sync", None)])], acl=[("site-b", "site-b", ["g0"])])
            b.write_config([dict(g, peers=[(a, "sync", None)])], acl=[("site-a", "site-a", ["g0"])])
            b.start()
        a.start()
        if kind != "single":
            wait_caught_up(a, agents[1:], timeout_s=120)
        fio(a.uri(), 200)  # warm up: connections, page cache, gRPC's threads
        perfs = []
        if args.perf:
            os.makedirs(args.perf, exist_ok=True)
            for x in agents:
                data = os.path.join(args.perf, f"{kind}-{x.site}.data")
                # DWARF unwinding: the Debian libraries and our RelWithDebInfo build have no
                # frame pointers. 16 KiB of stack per sample is enough for gRPC's depths.
                perfs.append((data, subprocess.Popen(
                    ["perf", "record", "-q", "-F", "1999", "--call-graph", "dwarf,16384",
                     "-p", str(x.proc.pid), "-o", data], stdout=subprocess.DEVNULL)))
        before = {x.site: threads(x.proc.pid) for x in agents}
        n, p50 = fio(a.uri(), args.writes)
        after = {x.site: threads(x.proc.pid) for x in agents}
        for data, p in perfs:
            p.send_signal(signal.SIGINT)
            p.wait(timeout=120)
            with open(data[:-len(".data")] + ".txt", "w") as f:
                # Self time per thread and function, then the same with callers (children).
                subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                                "--sort", "comm,dso,symbol", "--percent-limit", "0.5", "-g",
                                "none"], stdout=f, stderr=subprocess.DEVNULL, check=False)
        return n, p50, {x.site: delta(before[x.site], after[x.site]) for x in agents}
    finally:
        c.close()


def report(kind, n, p50, per_site):
    print(f"\n{kind}: {n} writes of 4 KiB at QD1, p50 {p50:.0f} us")
    print(f"  {'site':8} {'thread':18} {'vol/write':>10} {'invol/write':>12} {'cpu us/write':>13}"
          f" {'faults/write':>13}")
    totals = {}
    for site, names in per_site.items():
        tv = ti = tc = tf = 0.0
        for name, (vol, invol, cpu, flt) in sorted(names.items(), key=lambda kv: -kv[1][0]):
            if vol == 0 and invol == 0 and cpu == 0 and flt == 0:
                continue
            print(f"  {site:8} {name:18} {vol / n:10.2f} {invol / n:12.2f} {cpu * 1e6 / n:13.1f}"
                  f" {flt / n:13.2f}")
            tv += vol
            ti += invol
            tc += cpu
            tf += flt
        print(f"  {site:8} {'(all)':18} {tv / n:10.2f} {ti / n:12.2f} {tc * 1e6 / n:13.1f}"
              f" {tf / n:13.2f}")
        totals[site] = {"voluntary_per_write": tv / n, "involuntary_per_write": ti / n,
                        "cpu_us_per_write": tc * 1e6 / n, "minor_faults_per_write": tf / n}
    return totals


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tvillingd", required=True)
    ap.add_argument("--tvillingctl", required=True)
    ap.add_argument("--pki", required=True)
    ap.add_argument("--writes", type=int, default=5000)
    ap.add_argument("--out", help="write the figures to this JSON file")
    ap.add_argument("--perf", metavar="DIR",
                    help="also sample each agent with perf during the measured writes; writes "
                    "DIR/KIND-SITE.data and a flat report of self time per thread and function "
                    "DIR/KIND-SITE.txt (the samples slow the writes: take the counts from a run "
                    "without it)")
    args = ap.parse_args()
    results = {}
    for kind in ("single", "sync"):
        n, p50, per_site = measure(args, kind)
        results[kind] = {"writes": n, "p50_us": p50, "sites": report(kind, n, p50, per_site),
                         "threads": {s: {k: list(v) for k, v in t.items()}
                                     for s, t in per_site.items()}}
    extra = (results["sync"]["sites"]["site-a"]["voluntary_per_write"] +
             results["sync"]["sites"]["site-b"]["voluntary_per_write"] -
             results["single"]["sites"]["site-a"]["voluntary_per_write"])
    print(f"\nsync over single: +{results['sync']['p50_us'] - results['single']['p50_us']:.0f} us "
          f"p50, +{extra:.1f} voluntary context switches per write (both agents)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
