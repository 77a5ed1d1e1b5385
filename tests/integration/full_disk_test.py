#!/usr/bin/python3
"""full_disk_test.py: the log's (or the volume's) file system fills up under a client's writes.

  /usr/bin/python3 full_disk_test.py --tvillingd build/agent/tvillingd [--full log|volume]
  (root: it mounts a tmpfs)

--full log: the agent's state directory (the log) is a 32 MiB tmpfs the test mounts, the volume a
file on the ordinary temp directory; --full volume: the other way round (the volume file is sparse,
so it fills its tmpfs after 32 MiB of writes). A libnbd client writes 4 KiB blocks, each with its own content, and
flushes every 256 of them, until a write fails. Then:
1. the failure is ENOSPC, the agent is still running, and its log says once that the log store
   stopped writing (or that writes are suspended), naming the full file and the cure;
   `tvillingctl status` shows the same as the group's write_error;
2. a further write fails with ENOSPC at once (no hang), and every acknowledged block reads back
   while the disk is full;
3. SIGTERM stops the agent within 30 s;
4. with the tmpfs grown to 512 MiB the agent starts again, every block whose write was
   acknowledged reads back exactly, and new writes succeed.
Before storage/rocksdb_logger.h the agent aborted in step 1 (RocksDB's own LOG file on the full
file system: WritableFileWriter::AssertFalseAndGetStatusForPrevError).
"""

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repl_lib import free_port  # noqa: E402

BLOCK = 4096
VOLUME_BYTES = 256 << 20


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def block(i):
    head = f"block {i:08d} ".encode()
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


def is_enospc(e):
    # libnbd's Python binding gives the errno's name (e.g. "ENOSPC") in some versions, the number
    # in others.
    return e.errno in (errno.ENOSPC, "ENOSPC")


def connect(uri, deadline_s=30):
    end = time.monotonic() + deadline_s
    while True:
        h = nbd.NBD()
        try:
            h.connect_uri(uri)
            return h
        except nbd.Error:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tvillingd", required=True)
    ap.add_argument("--tvillingctl", required=True)
    ap.add_argument("--full", choices=["log", "volume"], default="log",
                    help="which file system is the small tmpfs: the state directory (the log) or "
                    "the volume's directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        fail(f"needs root to mount a tmpfs (CI runs as root); uid is {os.geteuid()}")

    tmp = tempfile.mkdtemp(prefix="tvilling-fulldisk-")
    state = os.path.join(tmp, "state")
    os.makedirs(state)
    os.makedirs(os.path.join(tmp, "volumes"))
    small = state if args.full == "log" else os.path.join(tmp, "volumes")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tvilling-fulldisk", small],
                   check=True)
    port = free_port()
    uri = f"nbd://127.0.0.1:{port}/vol0"
    config = os.path.join(tmp, "tvilling.toml")
    with open(config, "w") as f:
        f.write(f"""[agent]
site = "full"
[nbd]
listen = ["127.0.0.1:{port}"]
[[group]]
name = "g0"
[[group.volume]]
name = "vol0"
path = "{tmp}/volumes/vol0.img"
size = "{VOLUME_BYTES}"
""")
    agent = None
    log_path = os.path.join(tmp, "agent.log")

    def start():
        out = open(log_path, "a")
        return subprocess.Popen([args.tvillingd, "--config", config, "--state-dir", state,
                                 "--status-interval", "0"], stdout=out, stderr=subprocess.STDOUT)

    def status_text(json_out):
        r = subprocess.run([args.tvillingctl, "--socket", os.path.join(state, "tvillingd.sock"),
                            "status"] + (["--json"] if json_out else []),
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            fail(f"tvillingctl status failed: {r.stderr}")
        return r.stdout

    def write_error():
        return json.loads(status_text(True))["groups"][0].get("write_error", "")

    def read_log():
        with open(log_path, errors="replace") as f:
            return f.read()

    try:
        agent = start()
        h = connect(uri)
        acked = 0
        error = None
        limit = VOLUME_BYTES // BLOCK
        t0 = time.monotonic()
        while acked < limit:
            try:
                h.pwrite(block(acked), acked * BLOCK)
                acked += 1
                if acked % 256 == 0:
                    h.flush()  # a failed FLUSH ends the loop too: its writes were acknowledged
            except nbd.Error as e:
                error = e
                break
        print(f"{acked} blocks acknowledged in {time.monotonic() - t0:.1f} s, then: {error}",
              flush=True)
        if error is None:
            fail(f"{acked * BLOCK} bytes written to a 32 MiB log without an error")
        if not is_enospc(error):
            fail(f"the write failed with {error.errno} ({error}), not ENOSPC")
        time.sleep(1)  # RocksDB's error handler reacts on its own threads
        if agent.poll() is not None:
            fail(f"the agent exited with {agent.returncode} when the disk filled:\n{read_log()}")

        # 1. Said once, with the file and the cure.
        text = read_log()
        if args.full == "log":
            marker, where = "log store stopped writing", os.path.join(state, "log")
        else:
            marker, where = "writes suspended", os.path.join(small, "vol0.img")
        said = [line for line in text.splitlines() if marker in line and " error " in line]
        if len(said) != 1:
            fail(f"expected one error line with {marker!r}, found {len(said)}:\n{text}")
        for want in ("No space left on device", where, "restart tvillingd"):
            if want not in said[0]:
                fail(f"the line does not name {want!r}: {said[0]}")

        # ... and `tvillingctl status` says it too, in JSON and in text.
        werr = write_error()
        if "No space left on device" not in werr or where not in werr:
            fail(f"status's write_error does not name the full file system: {werr!r}")
        if "WRITES REFUSED" not in status_text(False):
            fail(f"tvillingctl status (text) does not say writes are refused:\n{status_text(False)}")

        # 2. Further writes are refused at once; acknowledged blocks read back meanwhile.
        t = time.monotonic()
        try:
            h.pwrite(block(acked), acked * BLOCK)
            fail("a write after the failure succeeded: the log cannot hold it")
        except nbd.Error as e:
            if not is_enospc(e):
                fail(f"the second write failed with {e.errno} ({e}), not ENOSPC")
        if time.monotonic() - t > 5:
            fail(f"the refused write took {time.monotonic() - t:.1f} s")
        for i in (0, acked // 2, acked - 1):
            if h.pread(BLOCK, i * BLOCK) != block(i):
                fail(f"block {i} (acknowledged) reads back wrong while the disk is full")
        h.shutdown()

        # 3. A clean stop.
        agent.send_signal(signal.SIGTERM)
        try:
            rc = agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            fail("the agent did not stop within 30 s of SIGTERM")
        print(f"stopped with exit code {rc}", flush=True)
        if rc < 0:
            fail(f"the agent died of signal {-rc} while stopping:\n{read_log()}")

        # 4. More room, a restart, everything acknowledged is there.
        subprocess.run(["mount", "-o", "remount,size=512m", small], check=True)
        agent = start()
        h = connect(uri)
        for i in range(acked):
            if h.pread(BLOCK, i * BLOCK) != block(i):
                fail(f"block {i} of {acked} acknowledged ones is lost or wrong after the restart")
        if write_error() != "":
            fail(f"after the restart status still reports a write error: {write_error()!r}")
        extra = acked + 1
        h.pwrite(block(extra), extra * BLOCK)
        h.flush()
        if h.pread(BLOCK, extra * BLOCK) != block(extra):
            fail("a write after the restart does not read back")
        h.shutdown()
        print(f"PASS: ENOSPC refused cleanly, the agent lived on, {acked} acknowledged blocks "
              f"intact after a restart with room", flush=True)
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        subprocess.run(["umount", small], check=False)
        subprocess.run(["rm", "-rf", tmp], check=False)


if __name__ == "__main__":
    main()
