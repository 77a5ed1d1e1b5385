#!/usr/bin/python3
"""rejoin_test.py: an old primary with unreplicated writes rejoins as a replica of the new one
(docs/replication.md, "Rejoin"), with real agents, one scenario per run:

  /usr/bin/python3 rejoin_test.py --tvillingd T --tvillingctl C --pki deploy/pki/make-dev-pki.sh
      SCENARIO

Scenarios (each is a ctest; see tests/integration/CMakeLists.txt):
  old_primary_rejoins  A primary (async) -> B. B stops; A writes (unreplicated) and is killed -9
                     after a FLUSH. B restarts as primary (new epoch) and writes over some of A's
                     extents and elsewhere. A restarts as B's replica: it saves exactly its
                     unreplicated records (`tvillingctl divergent show --json`, with A running and
                     stopped; `divergent export` gives their payloads back), restores the extents
                     they touched from B, ends byte-identical to B and keeps following it.
  kill9_during_restore  the same with a large divergent extent and a rate-limited link: A is
                     killed -9 while restoring, restarts, and still converges (one saved file).
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repl_lib import (TestFailure, assert_identical, log, run_main, u64,  # noqa: E402
                      wait_caught_up, wait_for)
from repl_test import qemu_io  # noqa: E402

ACL = [("site-a", "site-a", ["g0"]), ("site-b", "site-b", ["g0"])]


def divergent_show(c, agent):
    r = subprocess.run([c.tvillingctl, "--state-dir", agent.state_dir, "divergent", "show",
                        "--group", "g0", "--json"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise TestFailure(f"divergent show on {agent.site}: rc {r.returncode}\n{r.stdout}{r.stderr}")
    return json.loads(r.stdout)


def diverge(c, unreplicated, b_extra=None):
    """A (primary, async) -> B; B stops; A runs `unreplicated` (qemu-io commands, each its own
    run ending in a flush) and is killed -9. Returns (a, b, fork LSN, A's last LSN, A's epoch)."""
    a = c.agent("site-a")
    b = c.agent("site-b")
    g = {"name": "g0", "primary": "site-a", "size": "64MiB"}
    a.write_config([dict(g, peers=[(b, "async", None)])], acl=ACL)
    b.write_config([dict(g, peers=[(a, "async", None)])], acl=ACL)
    b.start()
    a.start()
    qemu_io(a, "write -P 0x11 0 8M", "flush")
    fork = wait_caught_up(a, [b])
    b.stop()
    for cmds in unreplicated:
        qemu_io(a, *cmds, "flush")
    ga = a.group()
    last, epoch = u64(ga.get("last_lsn")), u64(ga.get("epoch"))
    if last <= fork:
        raise TestFailure(f"site-a wrote nothing after LSN {fork}: {ga}")
    a.kill9()
    log(f"site-a killed -9 with records {fork + 1}..{last} of epoch {epoch} unreplicated")
    # B is primary now (a new epoch); A is its replica.
    g2 = {"name": "g0", "primary": "site-b", "size": "64MiB"}
    b.write_config([dict(g2, peers=[(a, "async", b_extra)])], acl=ACL)
    a.write_config([dict(g2, peers=[(b, "async", None)])], acl=ACL)
    b.start()
    if u64(b.group().get("epoch")) <= epoch:
        raise TestFailure(f"site-b did not begin a newer epoch than {epoch}: {b.group()}")
    return a, b, fork, last, epoch


def check_saved(c, a, fork, last, epoch, want):
    """A's divergent files hold exactly records fork+1..last of `epoch`, touching `want`
    ((offset, length) per record, in order)."""
    shown = divergent_show(c, a)
    files = shown["files"]
    if len(files) != 1:
        raise TestFailure(f"expected one divergent file on site-a, got {json.dumps(shown)}")
    f = files[0]
    recs = f["records"]
    got = [(r["offset"], r["length"]) for r in recs]
    if (f["fork_lsn"], f["first_lsn"], f["last_lsn"], f["complete"]) != (fork, fork + 1, last,
                                                                        True):
        raise TestFailure(f"divergent file header: {json.dumps(f)[:400]}; want fork {fork}, "
                          f"records {fork + 1}..{last}")
    if [r["lsn"] for r in recs] != list(range(fork + 1, last + 1)) or got != want:
        raise TestFailure(f"divergent records {[(r['lsn'], r['offset'], r['length']) for r in recs]}"
                          f", want LSNs {fork + 1}..{last} with {want}")
    if not all(r["checksum_ok"] and r["epoch"] == epoch and r["type"] == "WRITE"
               and r["volume"] == 0 for r in recs):
        raise TestFailure(f"divergent records not all good WRITEs of epoch {epoch}: {recs}")
    log(f"site-a saved records {fork + 1}..{last} to {f['path']}")
    return f


def check_restored_not_copied(a):
    """A got its extents restored, never a full copy (the fallback would converge too)."""
    with open(a.log_path) as f:
        text = f.read()
    if "full copy from" in text or "restore of the rejoin's extents from" not in text:
        raise TestFailure(f"site-a was not restored by extents:\n{a.tail()}")


def old_primary_rejoins(c):
    unreplicated = [["write -P 0x22 1M 64k"], ["write -P 0x23 6M 128k"], ["write -P 0x24 20M 4k"]]
    a, b, fork, last, epoch = diverge(c, unreplicated)
    # B overwrites part of A's first extent and writes elsewhere.
    qemu_io(b, "write -P 0x33 1056k 64k", "write -P 0x34 40M 64k", "flush")
    a.start()
    wait_caught_up(b, [a], timeout_s=90)
    f = check_saved(c, a, fork, last, epoch, [(1 << 20, 64 << 10), (6 << 20, 128 << 10),
                                              (20 << 20, 4 << 10)])
    assert_identical(b, [a])
    check_restored_not_copied(a)
    qemu_io(a, "read -P 0x11 1M 32k", "read -P 0x33 1056k 64k", "read -P 0x11 6M 128k",
            "read -P 0 20M 4k", "read -P 0x34 40M 64k", read_only=True)
    # A follows B from here.
    qemu_io(b, "write -P 0x35 2M 1M", "write -P 0x36 20M 4k", "flush")
    wait_caught_up(b, [a])
    assert_identical(b, [a])
    if a.group().get("role") != "replica" or not a.group().get("consistent"):
        raise TestFailure(f"site-a is not a consistent replica: {a.group()}")
    # The files are read directly: the same with the agent stopped; export gives the payloads.
    a.stop()
    if divergent_show(c, a)["files"][0]["records"] != f["records"]:
        raise TestFailure("divergent show differs with the agent stopped")
    out = os.path.join(c.tmp, "export")
    r = subprocess.run([c.tvillingctl, "divergent", "export", "--file", f["path"], "--out", out],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise TestFailure(f"divergent export: rc {r.returncode}\n{r.stdout}{r.stderr}")
    with open(os.path.join(out, "manifest.json")) as m:
        manifest = json.load(m)
    for rec, pattern in zip(manifest["records"], (0x22, 0x23, 0x24)):
        with open(os.path.join(out, rec["file"]), "rb") as p:
            data = p.read()
        if data != bytes([pattern]) * rec["length"]:
            raise TestFailure(f"exported payload of LSN {rec['lsn']} is not {pattern:#x} x "
                              f"{rec['length']}")
    log(f"divergent export wrote {len(manifest['records'])} payload(s)")


def kill9_during_restore(c):
    # 48 MiB of unreplicated data (two writes: NBD requests are at most 32 MiB). B writes data of
    # its own over the same range (the restore copies data, not zero ranges, which cost nothing on
    # the wire), and sends to A at most 8 MiB/s: the restore takes several seconds.
    unreplicated = [["write -P 0x42 8M 24M"], ["write -P 0x42 32M 24M"]]
    a, b, fork, last, epoch = diverge(c, unreplicated,
                                      b_extra={"rate_limit": '"8MiB"', "compression": '"none"'})
    qemu_io(b, "write -P 0x43 8M 24M", "write -P 0x44 32M 24M", "write -P 0x45 60M 64k",
            "flush")
    a.start()

    def restoring():
        p = (a.group().get("peers") or [{}])[0]
        return p if p.get("link_state") == "restoring" and u64(p.get("copy_done_bytes")) > 0 \
            else None
    p = wait_for("site-a to be restoring", restoring, 90, 0.05)
    log(f"site-a restoring: {u64(p.get('copy_done_bytes'))} of {u64(p.get('copy_total_bytes'))} "
        f"bytes; kill -9")
    a.kill9()
    qemu_io(b, "write -P 0x46 30M 1M", "flush")
    a.start()
    wait_caught_up(b, [a], timeout_s=180)
    check_saved(c, a, fork, last, epoch, [(8 << 20, 24 << 20), (32 << 20, 24 << 20)])
    assert_identical(b, [a])
    check_restored_not_copied(a)
    qemu_io(a, "read -P 0x43 8M 22M", "read -P 0x46 30M 1M", "read -P 0x43 31M 1M",
            "read -P 0x44 32M 24M", "read -P 0x45 60M 64k", read_only=True)


if __name__ == "__main__":
    sys.exit(run_main({"old_primary_rejoins": old_primary_rejoins,
                       "kill9_during_restore": kill9_during_restore}))
