#!/usr/bin/python3
"""memory_test.py: tvillingd allocates with jemalloc, reports the allocator's settings at start,
and honours an operator's MALLOC_CONF (docs/operations.md, "Memory"; why: docs/benchmarks.md,
"jemalloc").

  /usr/bin/python3 memory_test.py --tvillingd T --tvillingctl C --pki make-dev-pki.sh allocator

allocator: a primary (site-a) with a sync replica (site-b), started with no MALLOC_CONF (as systemd
and the quick start run them), and a single node (site-c) with `MALLOC_CONF=dirty_decay_ms:0`.
1. Each process has libjemalloc mapped and says in its log which jemalloc runs with which
   settings: jemalloc's defaults (dirty_decay_ms 10000) on site-a and site-b, the operator's 0 on
   site-c.
2. 64 MiB of 4 KiB random writes (fio's nbd engine, QD16) through site-a (each in site-b's log
   before it completes) and through site-c complete; the minor page faults and transparent huge
   pages each agent took are reported.
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repl_lib import TestFailure, log, run_main, wait_caught_up  # noqa: E402

WRITES = 16384  # 64 MiB


def minor_faults(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def fio(uri, writes, offset=0):
    r = subprocess.run(["fio", "--name=m", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                        "--bs=4k", "--iodepth=16", f"--number_ios={writes}", "--size=256M",
                        f"--offset={offset}", "--randrepeat=0", "--output-format=json"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise TestFailure(f"fio failed: {r.stderr}")
    done = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["write"]["total_ios"]
    if done != writes:
        raise TestFailure(f"fio wrote {done} of {writes}")


def faults_per_write(primary, agents):
    """Minor faults per write of each agent in `agents` while WRITES go to `primary`."""
    fio(primary.uri(), 2048)  # warm up: connection, first memtable pages, volume file
    before = [minor_faults(a.proc.pid) for a in agents]
    fio(primary.uri(), WRITES)
    return [(minor_faults(a.proc.pid) - b) / WRITES for a, b in zip(agents, before)]


def anon_huge_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


def with_malloc_conf(conf, fn):
    """fn() with MALLOC_CONF unset (None) or set to `conf` in this process's environment."""
    saved = os.environ.pop("MALLOC_CONF", None)
    try:
        if conf is not None:
            os.environ["MALLOC_CONF"] = conf
        return fn()
    finally:
        os.environ.pop("MALLOC_CONF", None)
        if saved is not None:
            os.environ["MALLOC_CONF"] = saved


def allocator(c):
    a, b, single = c.agent("site-a"), c.agent("site-b"), c.agent("site-c")
    for x in (a, b, single):
        x.test_tuning = False  # the product's log settings (memtable size and all)
    g = {"name": "g0", "primary": "site-a", "size": "256MiB"}
    a.write_config([dict(g, peers=[(b, "sync", None)])], acl=[("site-b", "site-b", ["g0"])])
    b.write_config([dict(g, peers=[(a, "sync", None)])], acl=[("site-a", "site-a", ["g0"])])
    single.write_config([{"name": "g0", "primary": "site-c", "size": "256MiB"}])
    with_malloc_conf(None, lambda: (b.start(), a.start()))
    with_malloc_conf("dirty_decay_ms:0", single.start)
    wait_caught_up(a, [b], timeout_s=120)

    for x, decay in ((a, 10000), (b, 10000), (single, 0)):
        with open(f"/proc/{x.proc.pid}/maps") as f:
            if "libjemalloc.so" not in f.read():
                raise TestFailure(f"{x.site}: libjemalloc is not mapped in tvillingd")
        lines = [ln for ln in x.tail(200).splitlines() if "memory: jemalloc 5." in ln]
        if not lines:
            raise TestFailure(f"{x.site}'s log does not name its allocator:\n{x.tail()}")
        if f"dirty_decay_ms {decay}," not in lines[0]:
            raise TestFailure(f"{x.site}: expected dirty_decay_ms {decay} in {lines[0]!r}")

    f_a, f_b = faults_per_write(a, [a, b])
    (f_c,) = faults_per_write(single, [single])
    log(f"minor page faults per 4 KiB write: primary {f_a:.3f}, sync replica {f_b:.3f}, single "
        f"node with dirty_decay_ms:0 {f_c:.3f}; anonymous huge pages "
        f"{anon_huge_kib(a.proc.pid)} / {anon_huge_kib(b.proc.pid)} / "
        f"{anon_huge_kib(single.proc.pid)} KiB")


if __name__ == "__main__":
    sys.exit(run_main({"allocator": allocator}))
