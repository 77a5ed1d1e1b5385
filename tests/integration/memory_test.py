#!/usr/bin/python3
"""memory_test.py: tvillingd's memtable is backed by transparent huge pages, not faulted in 4 KiB
at a time (one page fault per 4 KiB write cost a quarter of a local write's CPU on the VMs
measured; docs/benchmarks.md, "Page faults").

  /usr/bin/python3 memory_test.py --tvillingd T --tvillingctl C --pki make-dev-pki.sh huge_pages

huge_pages: a primary (site-a) with a sync replica (site-b), both started with no GLIBC_TUNABLES
in their environment (as systemd and the quick start run them), and a single node (site-c) with
`GLIBC_TUNABLES=` (an operator's choice: off).
1. The first two re-execute themselves with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 and keep their
   PID and name (`comm` is still tvillingd); site-c keeps the operator's empty setting. Each says
   which in its log.
2. 64 MiB of 4 KiB random writes (fio's nbd engine, QD16) after a warm-up: the primary and the
   replica each take fewer than 0.25 minor page faults per write (the counter of the whole
   process, /proc/PID/stat; the replica appends on its stream thread, not the main one, which
   glibc backs with huge pages only for allocations of their own mapping), site-c at least 0.5
   (each record is copied into a fresh memtable page: the control that shows the counter sees the
   faults this test is about). With the kernel's transparent_hugepage mode `never` the first
   figures are only reported; with `always` the control's (the kernel then backs its memtable
   with huge pages too).
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repl_lib import TestFailure, log, run_main, wait_caught_up  # noqa: E402

WRITES = 16384  # 64 MiB: a quarter of the memtable, so no flush frees memory in between


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


def environment(pid):
    with open(f"/proc/{pid}/environ") as f:
        return [e for e in f.read().split("\0") if e]


def thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return "unknown"


def faults_per_write(primary, agents):
    """Minor faults per write of each agent in `agents` while WRITES go to `primary`."""
    fio(primary.uri(), 2048)  # warm up: connection, first memtable pages, volume file
    before = [minor_faults(a.proc.pid) for a in agents]
    fio(primary.uri(), WRITES)
    return [(minor_faults(a.proc.pid) - b) / WRITES for a, b in zip(agents, before)]


def with_tunables(tunables, fn):
    """fn() with GLIBC_TUNABLES unset (None) or set to `tunables` in this process's environment."""
    saved = os.environ.pop("GLIBC_TUNABLES", None)
    try:
        if tunables is not None:
            os.environ["GLIBC_TUNABLES"] = tunables
        return fn()
    finally:
        os.environ.pop("GLIBC_TUNABLES", None)
        if saved is not None:
            os.environ["GLIBC_TUNABLES"] = saved


def huge_pages(c):
    a, b, single = c.agent("site-a"), c.agent("site-b"), c.agent("site-c")
    for x in (a, b, single):
        x.test_tuning = False  # the product's log settings (memtable size and all)
    g = {"name": "g0", "primary": "site-a", "size": "256MiB"}
    a.write_config([dict(g, peers=[(b, "sync", None)])], acl=[("site-b", "site-b", ["g0"])])
    b.write_config([dict(g, peers=[(a, "sync", None)])], acl=[("site-a", "site-a", ["g0"])])
    single.write_config([{"name": "g0", "primary": "site-c", "size": "256MiB"}])
    with_tunables(None, lambda: (b.start(), a.start()))
    with_tunables("", single.start)
    wait_caught_up(a, [b], timeout_s=120)

    for x in (a, b):
        env = environment(x.proc.pid)
        if "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" not in env:
            raise TestFailure(f"{x.site}, started without tunables, runs without them: {env}")
        with open(f"/proc/{x.proc.pid}/comm") as f:
            comm = f.read().strip()
        if comm != "tvillingd":
            raise TestFailure(f"{x.site}: the re-executed agent is named {comm!r}, not tvillingd")
    if "GLIBC_TUNABLES=" not in environment(single.proc.pid):
        raise TestFailure("site-c: the operator's empty GLIBC_TUNABLES was replaced")
    for x, value in ((a, "glibc.malloc.hugetlb=1"), (b, "glibc.malloc.hugetlb=1"), (single, "")):
        if f"memory: GLIBC_TUNABLES='{value}'" not in x.tail(200):
            raise TestFailure(f"{x.site}'s log does not name its tunables:\n{x.tail()}")

    f_a, f_b = faults_per_write(a, [a, b])
    (f_off,) = faults_per_write(single, [single])
    mode = thp_mode()
    log(f"minor page faults per 4 KiB write: primary {f_a:.3f}, sync replica {f_b:.3f} with huge "
        f"pages; {f_off:.3f} without (transparent_hugepage: {mode})")
    # With THP `always` the kernel backs the control's large mappings with huge pages too, so
    # only `madvise` (and `never`) can show the control's faults.
    if mode != "always" and f_off < 0.5:
        raise TestFailure(f"without huge pages {f_off:.3f} faults per write: the control does not "
                          "see the memtable's faults, so the figures with them prove nothing")
    for site, f in (("primary", f_a), ("replica", f_b)):
        if mode in ("madvise", "always") and f >= 0.25:
            raise TestFailure(f"{site}: {f:.3f} page faults per 4 KiB write with huge pages "
                              "(limit 0.25)")


if __name__ == "__main__":
    sys.exit(run_main({"huge_pages": huge_pages}))
