#!/usr/bin/python3
"""failover_bench.py: switchover write pause and automatic fail-over times, on loopback (lan) or
across the WAN lab's metro links.

  /usr/bin/python3 bench/failover_bench.py --tvillingd build/agent/tvillingd \
      --tvillingctl build/agent/cli/tvillingctl --pki deploy/pki/make-dev-pki.sh \
      [--profile lan|metro --wanemu build/bench/wanemu] [--switchovers N] [--failovers K] \
      [--out results.json] [--keep-logs DIR]

Real agents with mutual TLS and the Debian etcd binary, driven by the integration tests' scenarios
(tests/integration/coordinator_test.py), so what is measured is what those tests check.

  --profile lan (default)  everything on 127.0.0.1: the lab's `lan` profile without namespaces.
  --profile metro  three "datacenters" = three network namespaces of the lab (bench/lab.py,
              sites=3, tag `fo`: tvlfoa, tvlfob, tvlfoc), every pair joined by its own metro link
              (wanemu: 1 ms one way, tbf 1 Gbit). DC1 holds site-a (the first primary) and etcd
              m0, DC2 site-b and m1, DC3 site-c and m2 (the witness). Agents and etcd members
              listen on their namespace's address; etcd always has three members (also for the
              switchovers), so every etcd commit crosses a link, and a sync write from site-a to
              site-b (or back) crosses one. Each agent lists its own datacenter's member first. The NBD client reaches the primary over its unix
              socket, i.e. it sits in the primary's datacenter. The namespaces and every server
              are removed by PID/name when the run ends, fails or is interrupted (Ctrl-C, SIGTERM).

  switchover  two sites in sync mode and one etcd member (three on metro), one writer through NBD (4 KiB, QD1,
              retrying at the new primary), N switchovers back and forth; per switchover the
              write pause the agent measured (pause of new writes until the target holds the
              leader key) and its drain part (waiting for the target's durable LSN). Goal (issue
              6): pause p50 < 1 s beyond the drain.
  failover    three sites and three etcd members, lease TTL 3 s; the primary is killed (-9) K
              times, each in a fresh cluster; per run: detection (leader key gone at etcd, polled
              every 50 ms with etcdctl, and as the elected replica's watch saw it, from its log),
              when that replica took the key and when it was primary (its log, to the
              millisecond), and the first write acknowledged there. Goals: detection <= the lease
              TTL, promotion <= 1 s after detection (the replica's view).
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
import coordinator_test as ct  # noqa: E402
from repl_lib import Cluster  # noqa: E402
import lab as labmod  # noqa: E402  (bench/lab.py)

LAB_TAG = "fo"  # namespaces tvlfoa, tvlfob, tvlfoc
LAB_NET = 213  # 10.213.213.1-3: apart from bench/run's 10.213.0.x

LINES = []


def capture(msg):
    LINES.append(msg)
    print(msg, flush=True)


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def cluster(args, name):
    """A test cluster; with the lab, site-x and etcd member m<i> run in datacenter i's namespace."""
    c = Cluster(args.tvillingd, args.tvillingctl, args.pki, name)
    if args.lab is not None:
        for i, site in enumerate(("site-a", "site-b", "site-c")):
            where = {"netns": args.lab.ns[i], "host": args.lab.ip[i]}
            c.placement[site] = where
            c.placement[f"etcd-m{i}"] = where
    return c


def check_placed(args, c, etcd=None):
    """With the lab: every agent listens on its datacenter's address in its namespace (read back
    from the config it was started with) and etcd's members advertise the lab's addresses, i.e.
    nothing fell back to 127.0.0.1 and the figures are the link's."""
    if args.lab is None:
        return
    lab = args.lab
    for a in c.agents:
        i = ("site-a", "site-b", "site-c").index(a.site)
        with open(a.config_path) as fh:
            cfg = fh.read()
        if a.netns != lab.ns[i] or f'listen = "{lab.ip[i]}:' not in cfg:
            raise RuntimeError(f"{a.site} is not placed in {lab.ns[i]} on {lab.ip[i]} "
                               f"(netns {a.netns}, address {a.address})")
        for m in re.finditer(r'(?:address|endpoints) = \[?"([\d.]+):', cfg):
            if m.group(1) not in lab.ip:
                raise RuntimeError(f"{a.site}'s config names {m.group(1)}, not a lab address")
    if etcd is not None:
        members = etcd.ctl("member", "list")
        for ip in lab.ip:
            if f"http://{ip}:2379" not in members:
                raise RuntimeError(f"etcd has no member on {ip}: {members}")


def keep_logs(args, c, name):
    """--keep-logs DIR: the agents' and etcd members' logs of cluster `c` go to DIR/name/."""
    if not args.keep_logs:
        return
    dst = os.path.join(args.keep_logs, name)
    os.makedirs(dst, exist_ok=True)
    for a in c.agents:
        shutil.copy(a.log_path, os.path.join(dst, f"{a.site}.log"))
    for d in os.listdir(c.tmp):
        src = os.path.join(c.tmp, d, "etcd.log")
        if d.startswith("etcd-") and os.path.exists(src):
            shutil.copy(src, os.path.join(dst, f"{d}.log"))


def etcd_leader(etcd):
    """Which member leads etcd (the name), or "?" ."""
    try:
        out = etcd.ctl("endpoint", "status", "-w", "json", check=False)
        for st in json.loads(out or "[]"):
            if st["Status"]["header"]["member_id"] == st["Status"]["leader"]:
                ep = st["Endpoint"]
                for m in getattr(etcd, "members", [etcd]):
                    if m.endpoint in ep:
                        return m.name
    except (ValueError, KeyError):
        pass
    return "?"


def bench_switchover(args):
    c = cluster(args, "bench-switchover")
    pauses, drains = [], []
    try:
        etcd, a, b = ct.switchover_pair(c, members=1 if args.lab is None else 3)
        check_placed(args, c, etcd)
        leader = etcd_leader(etcd)
        load = ct.WriteLoad([a, b]).start()
        ct.wait_for("writes flowing", lambda: load.count > 200, 30, 0.05)
        primary, other = a, b
        for i in range(args.switchovers):
            r = ct.ctl(c, primary, "switchover", "--group", "g0", "--to", other.site,
                       "--timeout", "10")
            m = re.search(r"write pause: (\d+) ms \(of which (\d+) ms", r.stdout)
            if r.returncode != 0 or not m:
                raise RuntimeError(f"switchover {i} failed: {r.stdout}{r.stderr}")
            pauses.append(int(m.group(1)))
            drains.append(int(m.group(2)))
            ct.wait_for(f"{other.site} primary", lambda: other.group().get("role") == "primary",
                        15, 0.05)
            ct.wait_for(f"{primary.site} streaming from {other.site}", lambda: (
                other.peer(primary.site) or {}).get("link_state") == "streaming", 30, 0.05)
            n = load.count
            ct.wait_for("writes flowing at the new primary", lambda: load.count > n + 100, 30,
                        0.05)
            primary, other = other, primary
        load.stop()
        load.check(primary)
        if load.failed and not load.acked:
            raise RuntimeError("no write was acknowledged")
    finally:
        keep_logs(args, c, "switchover")
        c.close()
    beyond = [p - d for p, d in zip(pauses, drains)]
    return {"n": len(pauses), "etcd_leader": leader, "pause_ms": pauses, "drain_ms": drains,
            "pause_p50_ms": statistics.median(pauses), "pause_max_ms": max(pauses),
            "beyond_drain_p50_ms": statistics.median(beyond),
            "beyond_drain_max_ms": max(beyond)}


def bench_failover(args):
    runs = []
    for i in range(args.failovers):
        c = cluster(args, f"bench-failover{i}")
        LINES.clear()
        try:
            ct.elected_replica_takes_over(c)
            check_placed(args, c)
        finally:
            keep_logs(args, c, f"failover{i}")
            c.close()
        m = next((re.search(r"leader key gone ([\d.]+) s after the kill .*saw it gone ([\d.]+) s"
                            r".*took the key ([\d.]+) s and was primary in epoch \d+ ([\d.]+) s "
                            r"after it.*acknowledged ([\d.]+) s", x) for x in LINES
                  if x.startswith("MEASURED")), None)
        if not m:
            raise RuntimeError(f"run {i}: no MEASURED line")
        polled, seen, elect, promote, write = (float(m.group(k)) for k in range(1, 6))
        runs.append({"detect_polled_s": polled, "detect_s": seen, "elect_s": elect,
                     "promote_s": promote, "first_write_s": write,
                     "promote_after_detect_s": promote - seen})
    return {"n": len(runs), "lease_ttl_s": ct.LEASE_TTL_MS / 1000, "runs": runs,
            "detect_polled_p50_s": statistics.median(r["detect_polled_s"] for r in runs),
            "detect_p50_s": statistics.median(r["detect_s"] for r in runs),
            "detect_max_s": max(r["detect_s"] for r in runs),
            "promote_after_detect_p50_s": statistics.median(r["promote_after_detect_s"]
                                                            for r in runs),
            "promote_after_detect_max_s": max(r["promote_after_detect_s"] for r in runs)}


def on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every finally: clean-up


def git_commit():
    r = subprocess.run(["git", "-C", HERE, "describe", "--always", "--dirty"], capture_output=True,
                       text=True)
    return r.stdout.strip() or "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tvillingd", required=True)
    ap.add_argument("--tvillingctl", required=True)
    ap.add_argument("--pki", required=True)
    ap.add_argument("--profile", choices=("lan", "metro"), default="lan",
                    help="lan: 127.0.0.1 (default); metro: three namespaces of the WAN lab")
    ap.add_argument("--wanemu", help="bench/wanemu binary (needed for --profile metro)")
    ap.add_argument("--switchovers", type=int, default=10)
    ap.add_argument("--failovers", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy every agent's and etcd's log here")
    args = ap.parse_args()
    if args.profile != "lan" and not (args.wanemu and os.access(args.wanemu, os.X_OK)):
        ap.error(f"--profile {args.profile} needs --wanemu (the bench/wanemu binary), "
                 f"got {args.wanemu!r}")
    ct.log = capture
    signal.signal(signal.SIGTERM, on_sigterm)
    res = {"profile": args.profile, "commit": git_commit(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.lab = None
    try:
        if args.profile != "lan":
            # The namespaces' names are fixed (tag `fo`): remove any left by a killed run before
            # Lab() creates them, so that a failure inside Lab() leaves nothing behind either.
            names = [f"tvl{LAB_TAG}{x}" for x in "abc"]
            try:
                args.lab = labmod.Lab(os.path.abspath(args.wanemu), LAB_TAG, LAB_NET, sites=3)
            except BaseException:
                for ns in names:
                    labmod.sh("ip", "netns", "del", ns, check=False)
                raise
            args.lab.link(args.profile)
            lab = args.lab
            res["lab"] = {"namespaces": lab.ns, "addresses": lab.ip,
                          "profile": labmod.PROFILES[args.profile],
                          "rtt_ms": {f"{'abc'[i]}-{'abc'[j]}": lab.ping_rtt_ms(10, i, j)
                                     for i, j in lab.pairs},
                          "layout": "DC1 (a): site-a + etcd m0; DC2 (b): site-b + etcd m1; "
                                    "DC3 (c): site-c + etcd m2 (witness)"}
            capture(f"lab: {res['lab']}")
        res["switchover"] = bench_switchover(args)
        res["failover"] = bench_failover(args)
    finally:
        if args.lab is not None:
            args.lab.close()
            # What the a-b relay forwarded (packets, bytes, drops): the traffic did cross it.
            res.setdefault("lab", {})["wanemu_a_b"] = getattr(args.lab, "last_wanemu_counters", "")
    s, f = res["switchover"], res["failover"]
    print(f"\nprofile {res['profile']}, commit {res['commit']}, {res['date']}")
    print(f"switchover x{s['n']}: write pause p50 {s['pause_p50_ms']} ms (max {s['pause_max_ms']}), "
          f"beyond the drain p50 {s['beyond_drain_p50_ms']} ms (max {s['beyond_drain_max_ms']}); "
          f"goal < 1000 ms beyond the drain: {'met' if s['beyond_drain_p50_ms'] < 1000 else 'MISSED'}")
    print(f"fail-over x{f['n']} (lease TTL {f['lease_ttl_s']} s): detection (the elected "
          f"replica's watch) p50 {f['detect_p50_s']:.2f} s (max {f['detect_max_s']:.2f}; polled "
          f"at etcd p50 {f['detect_polled_p50_s']:.2f} s), promotion after detection "
          f"p50 {f['promote_after_detect_p50_s']:.2f} s (max "
          f"{f['promote_after_detect_max_s']:.2f}); goals <= TTL: "
          f"{'met' if f['detect_max_s'] <= f['lease_ttl_s'] else 'MISSED'}, <= 1 s: "
          f"{'met' if f['promote_after_detect_max_s'] <= 1.0 else 'MISSED'}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
