#!/usr/bin/python3
"""verify_test.py: online verify (`tvillingctl verify`) between two real agents over mutual TLS.
  /usr/bin/python3 verify_test.py --tvillingd T --tvillingctl C --pki deploy/pki/make-dev-pki.sh
      SCENARIO
Scenarios (each is a ctest; see tests/integration/CMakeLists.txt):
  corrupt_resync   A -> B (async, 64 MiB): verify while a python `nbd` client keeps writing reports
                   0 mismatches (exit 0); one byte of B's volume file flipped behind B's back is
                   found as exactly its 1 MiB chunk (exit 5, in the status, metrics and audit);
                   verify --resync restores it through the copy path; verify (under writes again)
                   reports 0, and the volumes are byte-identical. Verify on the replica is refused
                   (exit 3), a second one while one runs too; progress shows in the status; a
                   peer that is down fails the verify with its reason (exit 6).
  corrupt_resync_sync  the same with B a sync peer
"""
import json
import os
import random
import subprocess
import sys
import threading
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repl_lib import (MIB, TestFailure, assert_identical, free_port, log,  # noqa: E402
                      run_main, u64, wait_caught_up, wait_for)

SIZE = 64 * MIB
CORRUPT_AT = 37 * MIB + 4321  # inside chunk 37 of vol0


class Writer:
    """Writes random blocks through NBD on the primary until stopped: a few hot chunks (rewritten
    all the time, so verify meets chunks written between its two samples) and random ones."""

    def __init__(self, agent):
        self.agent = agent
        self.stop_event = threading.Event()
        self.writes = 0
        self.error = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        try:
            h = self.agent.connect()
            rnd = random.Random(7)
            try:
                while not self.stop_event.is_set():
                    n = rnd.choice([4096, 16384, 65536])
                    if rnd.random() < 0.5:
                        off = (rnd.choice([0, 5, 6, 20, 63]) * MIB
                               + rnd.randrange(0, (MIB - n) // 4096) * 4096)
                    else:
                        off = rnd.randrange(0, (SIZE - n) // 4096) * 4096
                    # Never the corrupted chunk: the test must find it (a write there would mend it).
                    if 37 * MIB - n < off < 38 * MIB:
                        continue
                    h.pwrite(rnd.randbytes(n), off)
                    self.writes += 1
                    if self.writes % 32 == 0:
                        h.flush()
                h.flush()
            finally:
                h.shutdown()
        except Exception as e:  # reported by stop()
            self.error = e

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(60)
        if self.error is not None:
            raise TestFailure(f"writer on {self.agent.site} failed: {self.error}")
        log(f"writer: {self.writes} writes during the verify")


def verify(c, agent, *extra, expect_rc):
    args = [c.tvillingctl, "--socket", agent.control_socket, "verify", "--group", "g0", "--json"]
    args += list(extra)
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    log(f"tvillingctl verify {' '.join(extra)} on {agent.site}: rc {r.returncode}\n"
        f"{r.stdout}{r.stderr}")
    if r.returncode != expect_rc:
        raise TestFailure(f"verify on {agent.site} exited {r.returncode}, expected {expect_rc}")
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def one_result(results):
    if len(results) != 1 or not results[0].get("done"):
        raise TestFailure(f"expected one final result, got {results}")
    return results[0]["status"]


def check_identical(st, what):
    if (st["state"] != "identical" or u64(st["mismatch_chunks"]) != 0
            or u64(st["compared_chunks"]) + u64(st["unverified_chunks"]) != u64(st["total_chunks"])
            or u64(st["unverified_chunks"]) != 0 or u64(st["total_chunks"]) != SIZE // MIB):
        raise TestFailure(f"{what}: expected every chunk identical, got {st}")
    log(f"{what}: {st['compared_chunks']} chunks identical, {st['retried_chunks']} samples taken "
        "again (written between the two sites' samples)")


def scrape(agent):
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def corrupt_resync(c, mode="async"):
    a = c.agent("site-a")
    b = c.agent("site-b")
    g = {"name": "g0", "primary": "site-a", "size": "64MiB"}
    a.write_config([dict(g, peers=[(b, mode, None)])], acl=[("site-b", "site-b", ["g0"])])
    a.metrics_port = free_port()
    with open(a.config_path, "a") as f:
        f.write(f'[metrics]\nlisten = "127.0.0.1:{a.metrics_port}"\n')
    b.write_config([dict(g, peers=[(a, mode, None)])], acl=[("site-a", "site-a", ["g0"])])
    b.start()
    a.start()
    # Some data everywhere, then caught up.
    h = a.connect()
    rnd = random.Random(1)
    for i in range(SIZE // MIB):
        h.pwrite(rnd.randbytes(64 * 1024), i * MIB + 8192)
    h.flush()
    h.shutdown()
    wait_caught_up(a, [b])

    # 1. Identical volumes under writes: no mismatch (the consistency rule).
    with Writer(a):
        check_identical(one_result(verify(c, a, "--rate", "16", expect_rc=0)), "verify under load")

    # A slow verify shows its progress in the status while it runs (the control socket still
    # answers), and a second verify of the group is refused meanwhile.
    slow = subprocess.Popen([c.tvillingctl, "--socket", a.control_socket, "verify", "--group",
                             "g0", "--rate", "8", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        def running():
            v = a.peer("site-b").get("verify", {})
            return v if v.get("state") == "running" and u64(v.get("done_bytes")) > 0 else None
        v = wait_for("the status to show a running verify", running, 30, 0.2)
        log(f"status during the verify: {v['done_bytes']} of {v['total_bytes']} bytes, "
            f"{v['bytes_per_s']} bytes/s, ETA {v['eta_s']} s")
        verify(c, a, expect_rc=3)
        out, err = slow.communicate(timeout=120)
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    if slow.returncode != 0:
        raise TestFailure(f"the slow verify exited {slow.returncode}: {out}{err}")

    # The replica refuses to run a verify (it is not the primary).
    verify(c, b, expect_rc=3)

    # 2. One byte of B's volume file flipped behind its back.
    wait_caught_up(a, [b])
    path = os.path.join(b.state_dir, "volumes", "vol0.img")
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, 1, CORRUPT_AT)
        os.pwrite(fd, bytes([old[0] ^ 0x5A]), CORRUPT_AT)
        os.fsync(fd)
    finally:
        os.close(fd)
    log(f"flipped the byte at {CORRUPT_AT} of {path}")
    st = one_result(verify(c, a, expect_rc=5))
    want = [{"volume": "vol0", "volume_index": 0, "offset": str(37 * MIB), "length": str(MIB)}]
    if (st["state"] != "mismatches" or u64(st["mismatch_chunks"]) != 1
            or st["mismatches"] != want):
        raise TestFailure(f"expected exactly chunk 37 of vol0 to differ, got {st}")
    # The result stays in the status, the metrics and the audit log.
    pv = a.peer("site-b").get("verify", {})
    if pv.get("state") != "mismatches" or u64(pv.get("mismatch_chunks")) != 1:
        raise TestFailure(f"status does not show the verify's result: {pv}")
    metrics = scrape(a)
    for line in ('tvilling_verify_mismatch_chunks{site="site-a",group="g0",peer="site-b"} 1',
                 'tvilling_verify_state{site="site-a",group="g0",peer="site-b",state="mismatches"} 1'):
        if line not in metrics:
            raise TestFailure(f"metrics lack {line!r}:\n"
                              + "\n".join(x for x in metrics.splitlines() if "verify" in x))
    hist = subprocess.run([c.tvillingctl, "--socket", a.control_socket, "history", "--group", "g0",
                           "--json"], capture_output=True, text=True, timeout=30, check=True)
    if not any(json.loads(x).get("action") == "verify" and json.loads(x).get("outcome")
               == "mismatches" for x in hist.stdout.splitlines() if x.strip()):
        raise TestFailure(f"no verify in the audit log:\n{hist.stdout}")
    # ... and it survives a restart of the primary's agent (kept in its state directory).
    a.stop()
    a.start()
    pv = wait_for("the peer's status after the restart", lambda: a.peer("site-b"), 30, 0.2)
    pv = pv.get("verify", {})
    if pv.get("state") != "mismatches" or u64(pv.get("mismatch_chunks")) != 1:
        raise TestFailure(f"the verify's result did not survive the restart: {pv}")
    wait_caught_up(a, [b])

    # 3. Resync restores the range through the copy path.
    st = one_result(verify(c, a, "--resync", "--resync-timeout", "60", expect_rc=5))
    if u64(st["mismatch_chunks"]) != 1 or st["resync"] != "done" or u64(st["resynced_bytes"]) != MIB:
        raise TestFailure(f"expected the one range restored, got {st}")

    # 4. Identical again, under writes.
    with Writer(a):
        check_identical(one_result(verify(c, a, "--rate", "32", expect_rc=0)),
                        "verify after the resync")
    wait_caught_up(a, [b])
    assert_identical(a, [b])

    # A peer that is down: the verify fails with the reason (exit 6), it does not hang.
    b.stop()
    st = one_result(verify(c, a, expect_rc=6))
    if st["state"] != "failed" or "site-b" not in st["error"]:
        raise TestFailure(f"expected a failed verify naming site-b, got {st}")


SCENARIOS = {
    "corrupt_resync": corrupt_resync,
    # The same with a sync peer: its restore holds writes until confirmed (sync_degrade_after_ms
    # = 0), and the verify under writes sees the replica at most one batch behind.
    "corrupt_resync_sync": lambda c: corrupt_resync(c, "sync"),
}

if __name__ == "__main__":
    sys.exit(run_main(SCENARIOS))
