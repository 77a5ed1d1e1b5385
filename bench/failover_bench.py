#!/usr/bin/python3
"""failover_bench.py: switchover write pause and automatic fail-over times on loopback (lan).

  /usr/bin/python3 bench/failover_bench.py --tvillingd build/agent/tvillingd \
      --tvillingctl build/agent/cli/tvillingctl --pki deploy/pki/make-dev-pki.sh \
      [--switchovers N] [--failovers K] [--out results.json]

Real agents with mutual TLS and the Debian etcd binary, all on 127.0.0.1 (the lab's `lan` profile
without the namespaces), driven by the integration tests' scenarios (tests/integration/
coordinator_test.py), so what is measured is what those tests check:

  switchover  two sites in sync mode and one etcd member, one writer through NBD (4 KiB, QD1,
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
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
import coordinator_test as ct  # noqa: E402
from repl_lib import Cluster  # noqa: E402

LINES = []


def capture(msg):
    LINES.append(msg)
    print(msg, flush=True)


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def bench_switchover(args):
    c = Cluster(args.tvillingd, args.tvillingctl, args.pki, "bench-switchover")
    pauses, drains = [], []
    try:
        etcd, a, b = ct.switchover_pair(c)
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
        c.close()
    beyond = [p - d for p, d in zip(pauses, drains)]
    return {"n": len(pauses), "pause_ms": pauses, "drain_ms": drains,
            "pause_p50_ms": statistics.median(pauses), "pause_max_ms": max(pauses),
            "beyond_drain_p50_ms": statistics.median(beyond),
            "beyond_drain_max_ms": max(beyond)}


def bench_failover(args):
    runs = []
    for i in range(args.failovers):
        c = Cluster(args.tvillingd, args.tvillingctl, args.pki, f"bench-failover{i}")
        LINES.clear()
        try:
            ct.elected_replica_takes_over(c)
        finally:
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tvillingd", required=True)
    ap.add_argument("--tvillingctl", required=True)
    ap.add_argument("--pki", required=True)
    ap.add_argument("--switchovers", type=int, default=10)
    ap.add_argument("--failovers", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    ct.log = capture
    res = {"switchover": bench_switchover(args), "failover": bench_failover(args)}
    s, f = res["switchover"], res["failover"]
    print(f"\nswitchover x{s['n']}: write pause p50 {s['pause_p50_ms']} ms (max {s['pause_max_ms']}), "
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
