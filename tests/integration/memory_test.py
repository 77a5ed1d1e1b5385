#!/usr/bin/python3
"""memory_test.py: tvillingd allocates with jemalloc, keeps the pages of the memtable's blocks for
the next memtable while it works and returns them when quiet, reports the allocator's settings at
start, and honours an operator's MALLOC_CONF (docs/operations.md, "Memory"; why:
docs/benchmarks.md, "jemalloc" and "Keeping the memtable's pages").

  /usr/bin/python3 memory_test.py --tvillingd T --tvillingctl C --pki make-dev-pki.sh allocator

allocator: a primary (site-a) with a sync replica (site-b), and two single nodes with a 64 MiB
memtable (in blocks of 16 MiB, as the shipped 256 MiB memtable's are of 32 MiB: over jemalloc's
oversize_threshold): site-c as shipped but started without transparent huge pages
(PR_SET_THP_DISABLE, as on a kernel with THP `never`, so that its faults count 4 KiB pages), site-d
with `MALLOC_CONF=thp:default,dirty_decay_ms:10000` (jemalloc's own defaults, over tvillingd's
compiled-in thp:always; with MALLOC_CONF set tvillingd changes nothing at run time). All but site-d
start with no MALLOC_CONF (as systemd and the quick start run them).
1. Each process has libjemalloc mapped and says in its log which jemalloc runs with which
   settings: jemalloc's decay (dirty_decay_ms 10000), huge pages (thp always) and an oversize arena
   that keeps its pages (dirty_decay_ms -1) on site-a, site-b and site-c; on site-d thp default
   and no such arena.
2. 64 MiB of 4 KiB random writes (fio's nbd engine, QD16) through site-a (each in site-b's log
   before it completes), and through site-c and site-d after 256 MiB of warm-up, complete; the
   minor page faults and transparent huge pages each agent took are reported. site-c, reusing the
   pages of the memtables it freed, takes fewer than half of site-d's faults per write (measured:
   ~0.02 against ~1).
3. Quiet for 10-20 s, site-c gives freed pages back but keeps up to one memtable's worth (its
   log says how much of each), and the writes after the quiet spell again take fewer than half of
   site-d's faults per write.
"""

import ctypes
import json
import os
import re
import subprocess
import sys
import time

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


def without_thp(fn):
    """fn() with transparent huge pages disabled for the processes it starts (PR_SET_THP_DISABLE
    is inherited across fork and exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_thp_disable = 41
    if libc.prctl(pr_set_thp_disable, 1, 0, 0, 0) != 0:
        raise TestFailure(f"prctl(PR_SET_THP_DISABLE): errno {ctypes.get_errno()}")
    try:
        return fn()
    finally:
        libc.prctl(pr_set_thp_disable, 0, 0, 0, 0)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def allocator(c):
    a, b = c.agent("site-a"), c.agent("site-b")
    single, default = c.agent("site-c"), c.agent("site-d")
    for x in (a, b, single, default):
        x.test_tuning = False  # the product's log settings (memtable size and all)
    for x in (single, default):
        x.extra_log = 'write_buffer = "64MiB"'
    default.cert = "site-c"  # the dev PKI has certificates for site-a..c; site-d has no peers
    g = {"name": "g0", "primary": "site-a", "size": "256MiB"}
    a.write_config([dict(g, peers=[(b, "sync", None)])], acl=[("site-b", "site-b", ["g0"])])
    b.write_config([dict(g, peers=[(a, "sync", None)])], acl=[("site-a", "site-a", ["g0"])])
    single.write_config([{"name": "g0", "primary": "site-c", "size": "256MiB"}])
    default.write_config([{"name": "g0", "primary": "site-d", "size": "256MiB"}])
    with_malloc_conf(None, lambda: (b.start(), a.start()))
    # site-c without huge pages, as on a kernel with THP `never`: there its faults count 4 KiB
    # pages, so they show whether the memtable's freed pages are reused (with huge pages a page
    # faulted in again costs 1/512 of a fault per 4 KiB).
    with_malloc_conf(None, lambda: without_thp(single.start))
    with_malloc_conf("thp:default,dirty_decay_ms:10000", default.start)
    wait_caught_up(a, [b], timeout_s=120)

    for x, keeps in ((a, True), (b, True), (single, True), (default, False)):
        with open(f"/proc/{x.proc.pid}/maps") as f:
            if "libjemalloc.so" not in f.read():
                raise TestFailure(f"{x.site}: libjemalloc is not mapped in tvillingd")
        lines = [ln for ln in x.tail(200).splitlines() if "memory: jemalloc 5." in ln]
        if not lines:
            raise TestFailure(f"{x.site}'s log does not name its allocator:\n{x.tail()}")
        if "dirty_decay_ms 10000," not in lines[0]:
            raise TestFailure(f"{x.site}: expected dirty_decay_ms 10000 in {lines[0]!r}")
        thp = "thp always" if keeps else "thp default"
        if not re.search(rf"\b{thp}[,;]", lines[0]):
            raise TestFailure(f"{x.site}: expected {thp} in {lines[0]!r}")
        kept = "dirty_decay_ms -1 (memtable blocks kept for reuse)" in lines[0]
        if kept != keeps:
            raise TestFailure(f"{x.site}: the oversize arena should {'' if keeps else 'not '}keep "
                              f"its pages: {lines[0]!r}")

    f_a, f_b = faults_per_write(a, [a, b])
    single_faults = []
    for x in (single, default):
        fio(x.uri(), 4 * WRITES)  # warm up: the first memtables' pages are new in any case
        (f,) = faults_per_write(x, [x])
        single_faults.append(f)
    f_c, f_d = single_faults
    log(f"minor page faults per 4 KiB write: primary {f_a:.3f}, sync replica {f_b:.3f}; single "
        f"nodes with a 64 MiB memtable: as shipped {f_c:.3f}, with jemalloc's defaults "
        f"{f_d:.3f}; anonymous huge pages {anon_huge_kib(a.proc.pid)} / "
        f"{anon_huge_kib(b.proc.pid)} / {anon_huge_kib(single.proc.pid)} KiB")
    if not f_c < 0.5 * f_d:
        raise TestFailure(f"site-c took {f_c:.3f} minor faults per write, site-d (jemalloc's "
                          f"decay) {f_d:.3f}: the freed memtable pages were not reused")

    busy = rss_kib(single.proc.pid)
    deadline = time.monotonic() + 35
    while True:
        lines = [ln for ln in single.tail(400).splitlines() if "memory: returned" in ln]
        if lines:
            break
        if time.monotonic() > deadline:
            raise TestFailure(f"site-c did not give memory back in 35 s without writes:\n"
                              f"{single.tail()}")
        time.sleep(0.5)
    m = re.search(r"returned (\d+) MiB .* kept (\d+) MiB", lines[-1])
    if not m or int(m.group(2)) > 64:
        raise TestFailure(f"site-c should keep at most its 64 MiB memtable's pages: {lines[-1]!r}")
    quiet = rss_kib(single.proc.pid)
    log(f"site-c quiet: {lines[-1].split('memory: ')[1]}; resident {busy} KiB -> {quiet} KiB")
    if quiet > busy + 4 * 1024:
        raise TestFailure(f"site-c's resident size grew while quiet: {busy} -> {quiet} KiB")
    # Writes after the quiet spell fill the memtable with the kept pages, not new ones.
    (f_after,) = faults_per_write(single, [single])
    log(f"minor page faults per 4 KiB write after the quiet spell: {f_after:.3f}")
    if not f_after < 0.5 * f_d:
        raise TestFailure(f"site-c took {f_after:.3f} minor faults per write after a quiet spell "
                          f"(site-d {f_d:.3f}): the memtable's pages were not kept")

if __name__ == "__main__":
    sys.exit(run_main({"allocator": allocator}))
