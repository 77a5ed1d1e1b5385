#!/usr/bin/python3
"""checker_test.py: tvilling-check (tests/checker) against real agents, one scenario per run.

  /usr/bin/python3 checker_test.py --tvillingd T --tvillingctl C --pki make-dev-pki.sh
      --check tvilling-check SCENARIO

Scenarios (each is a ctest; see tests/integration/CMakeLists.txt):
  sync_kill9_primary  site-a -> site-b sync. The checker writes self-describing 4 KiB blocks for
                      ~20 s (QD 8, overwriting often) through site-a's NBD export, trying site-b's
                      too (read-only: refused); site-a is killed with SIGKILL mid-run. site-b's
                      read-only export and its volume file must hold every write that completed
                      (sync mode), form a prefix of the log, with no torn block: verify exits 0.
                      Then it must fail: a copy of site-b's volume with one block set back to an
                      older completed version of that block is reported (exit 1, "missing").
  async_cut_off       site-a -> site-b async. site-b is stopped (SIGSTOP) mid-run while the writes
                      go on, site-a is killed, site-b resumes and applies what it has. Sync-mode
                      verify fails (completed writes are missing); async-mode verify counts exactly
                      the records site-b lacks, passes with the loss bound site-a reported for
                      site-b (lag_lsns), and fails with a bound one smaller than what is missing.
  writer_kill9        the writer killed with SIGKILL keeps its log, which verifies against the
                      export (nbdkit memory); a second writer's log verifies with it, and without
                      it the second writer's blocks are reported.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repl_lib import TestFailure, log, run_main, u64, wait_for  # noqa: E402

CHECK = None
SIZE = 16 << 20


def pair(c, mode):
    a = c.agent("site-a")
    b = c.agent("site-b")
    g = {"name": "g0", "primary": "site-a", "size": "64MiB"}
    a.write_config([dict(g, peers=[(b, mode, None)])], acl=[("site-b", "site-b", ["g0"])])
    b.write_config([dict(g, peers=[(a, mode, None)])], acl=[("site-a", "site-a", ["g0"])])
    b.start()
    a.start()
    wait_for("site-a to stream to site-b",
             lambda: (a.peer("site-b") or {}).get("link_state") == "streaming", 30, 0.2)
    return a, b


def start_writer(c, uris, seconds, log_path, qd=8):
    cmd = [CHECK, "write", "--size", str(SIZE), "--qd", str(qd), "--duration", str(seconds),
           "--log", log_path, "--seed", "7"]
    for u in uris:
        cmd += ["--uri", u]
    out = open(os.path.join(c.tmp, "writer.out"), "w")
    err = open(os.path.join(c.tmp, "writer.err"), "w")
    p = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)

    def stop():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    c.on_exit(stop)
    return p


def finish_writer(c, p, timeout_s=60):
    try:
        rc = p.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise TestFailure("tvilling-check write did not end in time")
    with open(os.path.join(c.tmp, "writer.out")) as f:
        out = f.read()
    with open(os.path.join(c.tmp, "writer.err")) as f:
        err = f.read()
    log(f"writer: rc {rc} {out.strip()}")
    if rc != 0:
        raise TestFailure(f"tvilling-check write failed (rc {rc}): {err[-2000:]}")
    return out


def verify(log_path, image, mode="sync", bound=None, expect=0):
    cmd = [CHECK, "verify", "--log", log_path, "--image", image, "--mode", mode]
    if bound is not None:
        cmd += ["--loss-bound", str(bound)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-6:])
    log(f"verify {mode}{'' if bound is None else f' bound {bound}'} {image}: rc {r.returncode}\n"
        f"{tail}")
    if r.returncode != expect:
        raise TestFailure(f"verify of {image} ({mode}) exited {r.returncode}, expected {expect}:\n"
                          f"{r.stdout[-3000:]}{r.stderr[-2000:]}")
    return r.stdout


def wait_applied(agent, settle_s=1.5):
    """Waits until the agent has applied all of its log (its volume holds every record) and its
    log has stopped growing for settle_s (a replica resumed from SIGSTOP still drains what its
    socket buffered from a primary that is gone; reading a volume while it is applied to is not
    a snapshot)."""
    seen = {"last": None, "since": time.monotonic()}

    def done():
        g = agent.group()
        last = u64(g.get("last_lsn"))
        if u64(g.get("applied_lsn")) < last:
            return None
        if last != seen["last"]:
            seen["last"], seen["since"] = last, time.monotonic()
            return None
        return (last,) if time.monotonic() - seen["since"] >= settle_s else None
    return wait_for(f"{agent.site} to apply its log", done, 60, 0.2)[0]


def parse_log(path):
    """seq -> [block, completed ok]."""
    writes = {}
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            w = line.split()
            if w[0] == "I":
                writes[int(w[1])] = [int(w[2]), False]
            elif w[0] == "C" and w[3] == "0":
                writes[int(w[1])][1] = True
    return writes


def sync_kill9_primary(c):
    a, b = pair(c, "sync")
    log_path = os.path.join(c.tmp, "writer.log")
    w = start_writer(c, [a.uri(), b.uri()], 20, log_path)
    time.sleep(8)
    a.kill9()
    log("primary site-a killed with SIGKILL mid-run")
    out = finish_writer(c, w)
    m = re.search(r'"completed":(\d+)', out)
    if not m or int(m.group(1)) < 200:
        raise TestFailure(f"too few writes completed before the kill to prove anything: {out}")
    if not re.search(r'"failed":[1-9]|"failed_connects":[1-9]', out):
        raise TestFailure(f"the writer never saw the primary go away: {out}")
    wait_applied(b)
    verify(log_path, b.uri())  # the replica's read-only export
    vol = os.path.join(b.state_dir, "volumes", "vol0.img")
    b.stop()
    verify(log_path, vol)  # its volume file
    # It can fail: set one block back to an older completed version of itself.
    writes = parse_log(log_path)
    by_block = {}
    for seq, (block, ok) in sorted(writes.items()):
        if ok:
            by_block.setdefault(block, []).append(seq)
    block, seqs = max(by_block.items(), key=lambda kv: len(kv[1]))
    if len(seqs) < 2:
        raise TestFailure("no block was overwritten by the workload")
    older = seqs[-2]
    forged = os.path.join(c.tmp, "forged.img")
    shutil.copyfile(vol, forged)
    data = subprocess.run([CHECK, "encode", "--writer", "1", "--seq", str(older), "--block",
                           str(block)], capture_output=True, check=True, timeout=10).stdout
    with open(forged, "r+b") as f:
        f.seek(block * 4096)
        f.write(data)
    log(f"forged: block {block} set back from write {seqs[-1]} to write {older}")
    out = verify(log_path, forged, expect=1)
    if f"write 1/{seqs[-1]} " not in out or "VIOLATION missing" not in out:
        raise TestFailure(f"verify did not name the lost write 1/{seqs[-1]}:\n{out}")


def async_cut_off(c):
    a, b = pair(c, "async")
    log_path = os.path.join(c.tmp, "writer.log")
    w = start_writer(c, [a.uri()], 12, log_path)
    time.sleep(4)
    b.pause()
    log("replica site-b stopped (SIGSTOP): cut off while the writes go on")
    out = finish_writer(c, w)
    last = u64(a.group().get("last_lsn"))
    # The loss bound site-a reports for site-b: its last LSN minus site-b's durable LSN as site-a
    # knows it (records site-b may hold but never acknowledged count as lost: an upper bound).
    bound = u64((a.peer("site-b") or {}).get("lag_lsns"))
    a.kill9()
    b.resume()
    have = wait_applied(b)
    log(f"site-a's last LSN {last}, reported loss bound {bound}; site-b holds {have}, so "
        f"{last - have} records are lost")
    if last - have < 10:
        raise TestFailure(f"site-b was not cut off long enough to miss writes: {out}")
    verify(log_path, b.uri(), "sync", expect=1)
    res = verify(log_path, b.uri(), "async", bound)
    m = re.search(r"async: (\d+) completed writes missing", res)
    missing = int(m.group(1)) if m else 0
    # Every record of the group is one of the checker's 4 KiB writes, and all of them completed:
    # what is missing is exactly the records site-b lacks.
    if missing != last - have:
        raise TestFailure(f"async verify counted {missing} missing writes, but site-b lacks "
                          f"{last - have} records:\n{res}")
    verify(log_path, b.uri(), "async", missing - 1, expect=1)


def writer_kill9(c):
    """The writer killed with SIGKILL mid-run keeps its log: the log parses (a torn last line is
    ignored) and verifies against the server, which still holds every completed write (nbdkit's
    memory plugin: the test needs no agent). Then a second writer (writer 2) overwrites on the
    same export, and both logs verify together."""
    sock = os.path.join(c.tmp, "nbdkit.sock")
    srv = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", str(SIZE)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)

    def stop():
        if srv.poll() is None:
            os.killpg(srv.pid, signal.SIGTERM)
            srv.wait()
    c.on_exit(stop)
    wait_for("nbdkit's socket", lambda: os.path.exists(sock), 10)
    uri = f"nbd+unix:///?socket={sock}"
    log1 = os.path.join(c.tmp, "w1.log")
    w = start_writer(c, [uri], 30, log1, qd=16)
    time.sleep(3)
    os.killpg(w.pid, signal.SIGKILL)
    w.wait()
    n = sum(1 for _ in open(log1))
    log(f"writer 1 killed with SIGKILL after {n} log lines")
    if n < 100:
        raise TestFailure(f"writer 1 logged only {n} lines in 3 s")
    verify(log1, uri)
    log2 = os.path.join(c.tmp, "w2.log")
    subprocess.run([CHECK, "write", "--uri", uri, "--size", str(SIZE), "--qd", "4", "--duration",
                    "2", "--log", log2, "--writer", "2", "--seed", "8"], check=True, timeout=60,
                   capture_output=True)
    r = subprocess.run([CHECK, "verify", "--log", log1, "--log", log2, "--image", uri],
                       capture_output=True, text=True, timeout=60)
    log(f"verify of both writers: rc {r.returncode} {r.stdout.strip()[-300:]}")
    if r.returncode != 0:
        raise TestFailure(f"two writers' logs do not verify: {r.stdout[-3000:]}{r.stderr}")
    # Writer 1's log alone no longer explains the image (writer 2's blocks are foreign to it).
    out = verify(log1, uri, expect=1)
    if "VIOLATION unknown-write" not in out:
        raise TestFailure(f"blocks of an unlogged writer were not reported:\n{out}")


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--check" in argv:
        i = argv.index("--check")
        CHECK = os.path.abspath(argv[i + 1])
        del argv[i:i + 2]
    if CHECK is None:
        print("checker_test.py: --check PATH (tvilling-check) is required", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_main({"sync_kill9_primary": sync_kill9_primary,
                       "async_cut_off": async_cut_off, "writer_kill9": writer_kill9}, argv))
