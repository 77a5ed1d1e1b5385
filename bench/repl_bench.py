#!/usr/bin/python3
"""repl_bench.py: replication benchmarks on loopback, each a ratio to a baseline measured in the same run.

  /usr/bin/python3 bench/repl_bench.py --tvillingd build/agent/tvillingd \
      --tvillingctl build/agent/cli/tvillingctl --pki deploy/pki/make-dev-pki.sh [--quick] [--reps N]

What it measures (issue 4; docs/benchmarks.md records the results):
  throughput  fio nbd 64 KiB sequential writes, QD8, against a single-node tvillingd (baseline) and
              against a primary with one async peer over TLS. "Replicated throughput" counts the time
              until the peer has the last byte durable, not only until fio finished.   goal >= 0.8
  sync_lat    fio nbd 4 KiB randwrite QD1 latency p50: single node (baseline), sync peer without TLS,
              sync peer with TLS. Reported as the difference in us.   goals <= 150 us / <= 200 us
              With --floor-bench (build/bench/stream_floor_bench), each repetition also measures
              the machine's round-trip floors in the same run: a plain TCP ping-pong between two
              processes and a bare gRPC stream with and without TLS (4 KiB out, ~32 bytes back).
              A sync write carries one such round trip more than a single node's, and on a
              virtual machine the floors move several-fold between hosts (docs/benchmarks.md).
  lag         fio at 50 % of the async throughput just measured (or at --lag-rate), with the
              peer's lag (age of the oldest record not yet durable at the peer) sampled every
              10 ms; p50/p99/max.   goal p99 <= 10 ms
              Each sample over 10 ms is also split by where its records were: most of them not
              yet `received` by the peer (the link, the window, the primary's shipping) or received
              and waiting for the peer's fsync. The page cache is synced first, so that the
              writeback of the phases before does not count. Printed with it: the kernel's
              DAMON monitors that run (a VM platform's memory reclaim; on the VMs measured each
              of its samples stalls the pipeline) and whether the two sites share a file system.
  cost        CPU seconds per replicated GiB on each side, and each agent's peak RSS.
Repetitions are interleaved (baseline, candidate, baseline, ...) and medians reported, because this
machine is shared and noisy.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "integration"))
from repl_lib import Cluster, free_port, u64, wait_caught_up  # noqa: E402

GIB = 1 << 30
LAG_REGION = "512M"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_fio(uri, rw, bs, iodepth, size=None, runtime=None, rate=None, region="1G"):
    args = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={iodepth}", "--output-format=json", "--randrepeat=0"]
    if size:
        args.append(f"--size={size}")
    if runtime:
        args += ["--time_based", f"--runtime={runtime}", f"--size={region}"]
    if rate:
        args.append(f"--rate={rate}")
    r = subprocess.run(args, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"fio failed: {r.stderr}")
    out = r.stdout[r.stdout.index("{"):]
    j = json.loads(out)["jobs"][0]
    job = j["write"]
    return {
        # fio's own CPU (its NBD client included): percent of one CPU over the job's runtime.
        "fio_cpu_s": (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1000,
        "runtime_s": j["job_runtime"] / 1000,
        "bw_bytes": job["bw_bytes"],
        "iops": job["iops"],
        "p50_us": job["clat_ns"]["percentile"]["50.000000"] / 1000,
        "p99_us": job["clat_ns"]["percentile"]["99.000000"] / 1000,
        "bytes": job["io_bytes"],
    }


class Setup:
    """A single agent, or a primary plus one peer, fresh for each measurement."""

    def __init__(self, args, kind, mode="async", tls=True):
        self.c = Cluster(args.tvillingd, args.tvillingctl, args.pki, f"bench-{kind}")
        try:
            self._start(args, kind, mode, tls)
        except BaseException:
            self.c.dump_logs()
            self.c.close()  # stop what started, also when the setup fails half-way
            raise

    def _start(self, args, kind, mode, tls):
        self.a = self.c.agent("site-a")
        if args.primary_state_parent:
            # Site A's state (log, volume, sockets) elsewhere, e.g. on a tmpfs: on one machine
            # the two "sites" otherwise share a disk, which two real sites never do.
            self.a.move_state_under(args.primary_state_parent)
        self.a.test_tuning = args.test_tuning
        self.a.extra_log = "\n".join(args.log_option)
        self.a.extra_replication = "\n".join(getattr(args, "replication_option", []))
        self.b = None
        g = {"name": "g0", "primary": "site-a", "size": "2GiB"}
        if kind == "single":
            self.a.write_config([g])
        else:
            self.b = self.c.agent("site-b")
            self.b.test_tuning = args.test_tuning
            self.b.extra_log = "\n".join(args.log_option)
            self.b.extra_replication = self.a.extra_replication
            self.a.tls = self.b.tls = tls
            acl_b = [("site-a" if tls else "*", "site-a", ["g0"])]
            acl_a = [("site-b" if tls else "*", "site-b", ["g0"])]
            self.a.write_config([dict(g, peers=[(self.b, mode, None)])], acl=acl_a)
            self.b.write_config([dict(g, peers=[(self.a, mode, None)])], acl=acl_b)
            # The replica's /metrics, for its log fsync latency (replica_fsync_ms).
            self.b.metrics_port = free_port()
            with open(self.b.config_path, "a") as f:
                f.write(f'[metrics]\nlisten = "127.0.0.1:{self.b.metrics_port}"\n')
            self.b.start()
        self.a.start()
        if self.b:
            # Let the initial full copy of the (empty, sparse) volume finish first.
            wait_caught_up(self.a, [self.b], timeout_s=300)

    def close(self):
        self.c.close()


def bench_throughput(args, reps):
    size = "128M" if args.quick else "2G"
    single, ingest, repl, cost, single_cost = [], [], [], [], []
    for _ in range(reps):
        s = Setup(args, "single")
        try:
            cpu0 = cpu_seconds(s.a.proc.pid)
            r = run_fio(s.a.uri(), "write", "64k", 8, size=size)
            single.append(r["bw_bytes"])
            gib = r["bytes"] / GIB
            agent = cpu_seconds(s.a.proc.pid) - cpu0
            single_cost.append({"agent": agent / gib, "fio": r["fio_cpu_s"] / gib,
                                "vcpus": (agent + r["fio_cpu_s"]) / r["runtime_s"]})
        finally:
            s.close()
        s = Setup(args, "pair", "async", tls=True)
        try:
            cpu_a0, cpu_b0 = cpu_seconds(s.a.proc.pid), cpu_seconds(s.b.proc.pid)
            t0 = time.monotonic()
            r = run_fio(s.a.uri(), "write", "64k", 8, size=size)
            wait_caught_up(s.a, [s.b], timeout_s=600)
            elapsed = time.monotonic() - t0
            ingest.append(r["bw_bytes"])
            repl.append(r["bytes"] / elapsed)
            gib = r["bytes"] / GIB
            cost.append({
                "primary_cpu_s_per_gib": (cpu_seconds(s.a.proc.pid) - cpu_a0) / gib,
                "replica_cpu_s_per_gib": (cpu_seconds(s.b.proc.pid) - cpu_b0) / gib,
                "fio_cpu_s_per_gib": r["fio_cpu_s"] / gib,
                "primary_peak_rss_mib": peak_rss_mib(s.a.proc.pid),
                "replica_peak_rss_mib": peak_rss_mib(s.b.proc.pid),
            })
        finally:
            s.close()
    med_s, med_i, med_r = (statistics.median(x) for x in (single, ingest, repl))
    print(f"throughput 64k QD8 ({reps} interleaved runs, medians): single node {med_s / 2**20:.0f} "
          f"MiB/s; with an async peer over TLS: fio at the primary {med_i / 2**20:.0f} MiB/s "
          f"(ratio {med_i / med_s:.2f}), until the peer has it durable {med_r / 2**20:.0f} MiB/s "
          f"(ratio {med_r / med_s:.2f}, goal >= 0.8)")
    out = {"single_mib_s": med_s / 2**20, "ingest_mib_s": med_i / 2**20,
           "replicated_mib_s": med_r / 2**20, "ratio": med_r / med_s,
           "ingest_ratio": med_i / med_s}
    for k in cost[0]:
        out[k] = statistics.median(c[k] for c in cost)
        print(f"  {k}: {out[k]:.2f}")
    # Both agents and fio share this machine's CPUs: the pair cannot replicate faster than the
    # CPUs divided by what the three spend per GiB. That rate over the single node's is a ceiling
    # of the ratio above on this machine (not a goal); the single node's busy vCPUs say whether
    # it, too, was bound by the CPUs.
    for k in single_cost[0]:
        out[f"single_{k}" + ("" if k == "vcpus" else "_cpu_s_per_gib")] = statistics.median(
            c[k] for c in single_cost)
    pair_total = (out["primary_cpu_s_per_gib"] + out["replica_cpu_s_per_gib"] +
                  out["fio_cpu_s_per_gib"])
    cpus = os.cpu_count() or 1
    out["pair_cpu_bound_mib_s"] = cpus / pair_total * 1024
    out["cpu_ceiling_ratio"] = out["pair_cpu_bound_mib_s"] / out["single_mib_s"]
    print(f"  single node: agent {out['single_agent_cpu_s_per_gib']:.2f} + fio "
          f"{out['single_fio_cpu_s_per_gib']:.2f} CPU s per GiB, {out['single_vcpus']:.2f} of "
          f"{cpus} vCPUs busy; pair: primary + replica + fio {pair_total:.2f} CPU s per GiB, so at "
          f"most {out['pair_cpu_bound_mib_s']:.0f} MiB/s on {cpus} vCPUs: a ceiling of "
          f"{out['cpu_ceiling_ratio']:.2f} for the ratio on this machine")
    return med_r, out


FLOOR_VARIANTS = ("tcp", "product", "product-tls")


def round_trip_floors(args):
    """p50 round trips (us) of stream_floor_bench's variants, one repetition."""
    rounds = 300 if args.quick else 2000
    r = subprocess.run([args.floor_bench, "--pki", args.pki, "--rounds", str(rounds), "--reps", "1",
                        "--only", ",".join(FLOOR_VARIANTS)], capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"{args.floor_bench} failed: {r.stderr.strip()}")
    floors = {}
    table = r.stdout[r.stdout.rfind("variant"):].splitlines()[1:]  # the medians' table
    for line in table:
        f = line.split()
        if len(f) >= 2 and f[0] in FLOOR_VARIANTS:
            floors[f[0]] = float(f[1])
    if set(floors) != set(FLOOR_VARIANTS):
        raise RuntimeError(f"{args.floor_bench}: no p50 for {set(FLOOR_VARIANTS) - set(floors)}")
    return floors


def bench_sync_latency(args, reps):
    runtime = 3 if args.quick else 10
    res = {"single": [], "sync": [], "sync_tls": []}
    floors = {v: [] for v in FLOOR_VARIANTS}
    for _ in range(reps):
        for name, kind, tls in (("single", "single", True), ("sync", "pair", False),
                                ("sync_tls", "pair", True)):
            s = Setup(args, kind, "sync", tls=tls)
            try:
                res[name].append(run_fio(s.a.uri(), "randwrite", "4k", 1, runtime=runtime)["p50_us"])
            finally:
                s.close()
        if args.floor_bench:
            for v, us in round_trip_floors(args).items():
                floors[v].append(us)
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"sync 4k QD1 write p50 ({reps} interleaved runs, medians): single {med['single']:.0f} us, "
          f"sync {med['sync']:.0f} us (+{med['sync'] - med['single']:.0f} us, goal <= 150), "
          f"sync+TLS {med['sync_tls']:.0f} us (+{med['sync_tls'] - med['single']:.0f} us, "
          f"goal <= 200)")
    out = {"single_p50_us": med["single"], "sync_p50_us": med["sync"],
           "sync_tls_p50_us": med["sync_tls"], "sync_overhead_us": med["sync"] - med["single"],
           "sync_tls_overhead_us": med["sync_tls"] - med["single"]}
    if args.floor_bench:
        fm = {v: statistics.median(x) for v, x in floors.items()}
        print(f"  this machine's round-trip floors in the same run (p50, 4 KiB out, ~32 B back, two "
              f"processes): TCP {fm['tcp']:.0f} us, gRPC stream {fm['product']:.0f} us, with TLS "
              f"{fm['product-tls']:.0f} us; sync over single minus the stream's round trip: "
              f"{med['sync'] - med['single'] - fm['product']:+.0f} us, with TLS "
              f"{med['sync_tls'] - med['single'] - fm['product-tls']:+.0f} us")
        out.update({"floor_tcp_p50_us": fm["tcp"], "floor_grpc_p50_us": fm["product"],
                    "floor_grpc_tls_p50_us": fm["product-tls"]})
    return out


def fsync_histogram(agent):
    """The agent's tvilling_log_fsync_duration_seconds: ({le (s): cumulative count}, sum (s))."""
    url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode("utf-8")
    buckets, total_s = {}, 0.0
    for line in text.splitlines():
        if line.startswith("tvilling_log_fsync_duration_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("tvilling_log_fsync_duration_seconds_sum{"):
            total_s = float(line.rsplit(" ", 1)[1])
    return buckets, total_s


def fsync_summary(before, after):
    """Count, mean and p50/p99 (ms; linear within a bucket, as Prometheus' histogram_quantile)
    of the fsyncs between two scrapes."""
    (b0, s0), (b1, s1) = before, after
    delta = sorted((le, b1[le] - b0.get(le, 0.0)) for le in b1)
    n = delta[-1][1] if delta else 0

    def quantile(q):
        lower, below = 0.0, 0.0
        for le, cum in delta:
            if cum >= q * n:
                if le == float("inf"):
                    return lower * 1000
                frac = (q * n - below) / (cum - below) if cum > below else 1.0
                return (lower + (le - lower) * frac) * 1000
            lower, below = le, cum
        return float("nan")

    mean = (s1 - s0) / n * 1000 if n else float("nan")
    # A few long fsyncs set the lag's p99 (sampled in time) while hardly moving the fsyncs' own.
    le50 = max((cum for le, cum in delta if le <= 0.050), default=0.0)
    return n, mean, quantile(0.5), quantile(0.99), n - le50


def damon_monitors():
    """The kernel's DAMON monitors that are running (/sys/kernel/mm/damon/admin), each as
    {"kdamond", "operations", "sample_us", "actions"}. Some VM platforms run one to reclaim cold
    guest memory; on the VMs measured each of its samples (every 500 ms) stalled the replication
    pipeline for 10-40 ms, the lag's periodic episodes (docs/benchmarks.md, "The lag's
    half-second episodes")."""
    base = "/sys/kernel/mm/damon/admin/kdamonds"

    def read(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None

    out = []
    for k in range(int(read(f"{base}/nr_kdamonds") or 0)):
        if read(f"{base}/{k}/state") != "on":
            continue
        for c in range(int(read(f"{base}/{k}/contexts/nr_contexts") or 0)):
            ctx = f"{base}/{k}/contexts/{c}"
            nr_schemes = int(read(f"{ctx}/schemes/nr_schemes") or 0)
            out.append({"kdamond": k, "operations": read(f"{ctx}/operations"),
                        "sample_us": int(read(f"{ctx}/monitoring_attrs/intervals/sample_us") or 0),
                        "actions": [read(f"{ctx}/schemes/{i}/action") for i in range(nr_schemes)]})
    return out


def describe_damon(m):
    return (f"the kernel's DAMON monitor {m['kdamond']} is on ({m['operations']}, a sample every "
            f"{m['sample_us'] / 1000:.0f} ms, schemes {', '.join(m['actions']) or 'none'})")


def same_device(a, b):
    return os.stat(a).st_dev == os.stat(b).st_dev


def bench_lag(args, max_bw):
    runtime = args.lag_runtime or (5 if args.quick else 30)
    rate = int(args.lag_rate * 2**20) if args.lag_rate else int(max_bw / 2)
    region = "128M" if args.quick else LAG_REGION
    s = Setup(args, "pair", "async", tls=True)
    # Write the region once first: a fresh sparse volume allocates blocks on every write, and
    # ext4 (data=ordered) then makes each log fsync wait for that data too. A deployed volume is a
    # block device or a file written before; the measured run overwrites, as it would there.
    run_fio(s.a.uri(), "write", "1m", 4, size=region)
    wait_caught_up(s.a, [s.b], timeout_s=600)
    # Start with the page cache's dirty data on disk: in a full run the phases before wrote
    # ~12 GiB, and only this phase's own writes should count. (A full run on 2026-12-04 had p99
    # 1.4 s here against 10-80 ms for the phase alone; how long this sync takes says whether
    # leftover writeback can have been the cause.)
    t_sync = time.monotonic()
    os.sync()
    print(f"  lag: sync before the measurement took {time.monotonic() - t_sync:.1f} s",
          file=sys.stderr)
    # What on this machine, outside tvillingd, sets the tail: printed with every run.
    damon = damon_monitors()
    shared_disk = same_device(s.a.state_dir, s.b.state_dir)
    for m in damon:
        print(f"  lag: {describe_damon(m)}: on the VMs measured each sample stalls the pipeline",
              file=sys.stderr)
    where = "the same file system as" if shared_disk else "another file system than"
    print(f"  lag: site A's state is on {where} site B's", file=sys.stderr)
    samples = []
    split = []  # (lag, records not yet received, records received but not durable) per sample
    # One tvillingctl reporting every 10 ms over one connection (JSON Lines).
    watch = subprocess.Popen([s.a.cluster.tvillingctl, "--socket", s.a.control_socket, "status",
                              "--json", "--watch", "0.01"], stdout=subprocess.PIPE, text=True)

    def sample():
        for line in watch.stdout:
            try:
                st = json.loads(line)
            except json.JSONDecodeError:
                continue
            for g in st.get("groups", []):
                for p in g.get("peers", []):
                    if p.get("peer") == "site-b":
                        samples.append(float(p.get("lag_seconds", 0.0)))
                        last, recv = u64(g.get("last_lsn")), u64(p.get("received_lsn"))
                        split.append((float(p.get("lag_seconds", 0.0)), max(0, last - recv),
                                      max(0, recv - u64(p.get("durable_lsn")))))

    try:
        t = threading.Thread(target=sample)
        t.start()
        time.sleep(0.5)
        skip = len(samples)  # only samples taken while fio runs
        fsyncs_before = fsync_histogram(s.b)
        run_fio(s.a.uri(), "write", "64k", 8, runtime=runtime, rate=f"{rate}", region=region)
        stop_at = len(samples)
        fsyncs_after = fsync_histogram(s.b)
    finally:
        watch.terminate()
        watch.wait()
        s.close()
    t.join()
    during = sorted(samples[skip:stop_at])
    if not during:
        raise RuntimeError("no lag samples")
    slow = [x for x in split[skip:stop_at] if x[0] > 0.010]
    unreceived = sum(1 for _, u, r in slow if u > r)
    p = lambda q: during[min(len(during) - 1, int(q * len(during)))] * 1000  # noqa: E731
    what = "given rate" if args.lag_rate else "50 % of the replicated maximum"
    print(f"async lag at {rate / 2**20:.0f} MiB/s ({what}), {len(during)} "
          f"samples every 10 ms: p50 {p(0.5):.2f} ms, p99 {p(0.99):.2f} ms (goal <= 10), "
          f"max {during[-1] * 1000:.2f} ms")
    print(f"  samples over 10 ms: {len(slow)}, of which {unreceived} mostly not yet received by "
          f"the peer and {len(slow) - unreceived} mostly received, waiting for its fsync")
    fsync_n, fsync_mean, fsync_p50, fsync_p99, fsync_long = fsync_summary(fsyncs_before,
                                                                           fsyncs_after)
    print(f"  the replica's log fsyncs meanwhile: {fsync_n:.0f}, mean {fsync_mean:.2f} ms, "
          f"p50 {fsync_p50:.2f} ms, p99 {fsync_p99:.2f} ms, {fsync_long:.0f} over 50 ms "
          f"(from its /metrics histogram)")
    return {"lag_p50_ms": p(0.5), "lag_p99_ms": p(0.99), "lag_max_ms": during[-1] * 1000,
            "rate_mib_s": rate / 2**20, "lag_samples_over_10ms": len(slow),
            "lag_over_10ms_mostly_unreceived": unreceived, "replica_fsyncs": fsync_n,
            "replica_fsync_mean_ms": fsync_mean, "replica_fsync_p50_ms": fsync_p50,
            "replica_fsync_p99_ms": fsync_p99, "replica_fsyncs_over_50ms": fsync_long,
            "damon_monitors": damon, "sites_share_a_file_system": shared_disk}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tvillingd", required=True)
    ap.add_argument("--tvillingctl", required=True)
    ap.add_argument("--pki", required=True)
    ap.add_argument("--quick", action="store_true", help="one short repetition (smoke test)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", choices=["throughput", "sync_lat", "lag"])
    ap.add_argument("--out", help="write the figures to this JSON file")
    ap.add_argument("--lag-rate", type=float, metavar="MIB_S",
                    help="run the lag figure at this rate instead of 50 %% of the throughput "
                    "measured first (with --only lag, the throughput figure is skipped): for "
                    "interleaved comparisons of two builds at one rate on a busy machine")
    ap.add_argument("--log-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a line for both agents' [log] table, e.g. 'checkpoint_chunk = 0' "
                    "(repeatable)")
    ap.add_argument("--replication-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a line for both agents' [replication] table, e.g. "
                    "'max_batch_bytes = \"1MiB\"' (repeatable)")
    ap.add_argument("--lag-runtime", type=int, metavar="S",
                    help="seconds of load for the lag figure (default 30, --quick 5)")
    ap.add_argument("--primary-state-parent", metavar="DIR",
                    help="keep site A's state (log and volume) in a new directory under DIR, e.g. "
                    "/dev/shm, instead of beside site B's on the same disk")
    ap.add_argument("--floor-bench", metavar="PATH",
                    help="build/bench/stream_floor_bench: with the sync figure, also measure the "
                    "machine's TCP and gRPC round-trip floors in the same run")
    ap.add_argument("--test-tuning", action="store_true",
                    help="the integration tests' settings (checkpoints every 200 ms, 200 us batch "
                    "delay) instead of the product's defaults")
    args = ap.parse_args()
    reps = 1 if args.quick else args.reps
    results = {}
    max_bw = None
    if args.only in (None, "throughput") or (args.only == "lag" and not args.lag_rate):
        max_bw, results["throughput"] = bench_throughput(args, reps)
    if args.only in (None, "sync_lat"):
        results["sync_latency"] = bench_sync_latency(args, reps)
    if args.only in (None, "lag"):
        results["lag"] = bench_lag(args, max_bw)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
