#!/usr/bin/python3
"""crash_test.py: kill -9 tvillingd at random moments under NBD load and check what survives.

Each round: start the agent on the state the last round left, read the whole volume back and check
it against what the NBD guarantees promise, FLUSH, run a random mix of writes (some FUA), write-
zeroes, trims, FLUSHes and read-backs on several connections at once (async libnbd, up to --qd
requests in flight), then SIGKILL the agent at a random moment, usually with requests in flight, and
run `tvillingd --verify-log` on what the crash left.

What is asserted after a crash (only what is promised; see docs/ARCHITECTURE.md, "Guarantees"):
  * durability: every write covered by an acknowledged FLUSH (it completed before the FLUSH was
    sent, on any connection: the export advertises multi-conn) or acknowledged with FUA is there,
    unless a later write to the same block replaced it (newest wins per block);
  * no torn blocks: every 4 KiB block reads as exactly one write (old or new), never a mixture;
    blocks nobody wrote read as zeroes;
  * prefix: the log is replayed in order, so if a write W is visible, every write that completed
    before W was sent is visible too (or was overwritten);
  * reads during the run see every completed write (read-your-writes across connections);
  * `tvillingd --verify-log` finds no gap or checksum error in the log the crash left.
Acknowledged but unflushed writes may be lost by the contract; the test counts them and fails on
them only with --strict-acked (a kill -9 leaves the page cache intact, so tvillingd loses none).

Every 4 KiB block a write carries is self-describing: each 512-byte sector starts with
(magic, round, op id, sector number) and the rest is derived from them, so a read tells exactly
which write (or none) a sector came from.

  /usr/bin/python3 crash_test.py --tvillingd build/agent/tvillingd --rounds 30 [--seed N]
  /usr/bin/python3 crash_test.py --server nbdkit --rounds 5      # check the test itself
  /usr/bin/python3 crash_test.py --server nbdkit-memory --rounds 3 --expect-failure "LOST FLUSHED"
      # a server that forgets everything on kill -9: proves the test catches lost data
"""

import argparse
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import nbd

BLOCK = 4096
SECTOR = 512
SECTORS_PER_BLOCK = BLOCK // SECTOR
MAGIC = b"TVCR"
ZERO = "zero"  # the value of a block that reads as zeroes
ZERO_BLOCK = bytes(BLOCK)
HEADER = struct.Struct("<4sIIQ")  # magic, round, op id, sector number: 20 bytes
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30


class TestFailure(Exception):
    pass


# ---- self-describing data ------------------------------------------------------------------------


def sector_bytes(rnd, op_id, sector_no):
    key = ((rnd << 44) ^ (op_id << 22) ^ sector_no) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
    return HEADER.pack(MAGIC, rnd, op_id, sector_no) + struct.pack("<Q", key) * 61 + struct.pack(
        "<I", op_id ^ 0xA5A5A5A5)


def block_bytes(rnd, op_id, block_no):
    first = block_no * SECTORS_PER_BLOCK
    return b"".join(sector_bytes(rnd, op_id, first + i) for i in range(SECTORS_PER_BLOCK))


def describe_sector(data, sector_no):
    if data == bytes(SECTOR):
        return "zeroes"
    magic, rnd, op_id, sno = HEADER.unpack_from(data)
    if magic != MAGIC:
        return f"foreign data {data[:16].hex()}..."
    ok = data == sector_bytes(rnd, op_id, sno)
    where = "" if sno == sector_no else f" (belongs at sector {sno}!)"
    return f"round {rnd} op {op_id}{where}{'' if ok else ' with corrupt body'}"


def decode_block(data, block_no):
    """Returns ZERO, (round, op_id), or raises TestFailure for a torn or foreign block."""
    if data == ZERO_BLOCK:
        return ZERO
    magic, rnd, op_id, _ = HEADER.unpack_from(data)
    if magic == MAGIC and data == block_bytes(rnd, op_id, block_no):
        return (rnd, op_id)
    sectors = [
        describe_sector(data[i * SECTOR:(i + 1) * SECTOR], block_no * SECTORS_PER_BLOCK + i)
        for i in range(SECTORS_PER_BLOCK)
    ]
    raise TestFailure(f"block {block_no} (offset {block_no * BLOCK}) is torn or foreign: " +
                      "; ".join(f"sector {i}: {s}" for i, s in enumerate(sectors)))


# ---- the server ----------------------------------------------------------------------------------


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    """tvillingd (or nbdkit, to check the test) on a private state dir, stopped by PID."""

    def __init__(self, args, tmp):
        self.args = args
        self.tmp = tmp
        self.state = os.path.join(tmp, "state")
        self.volume = os.path.join(self.state, "volumes", "vol0.img")
        self.config = os.path.join(tmp, "tvilling.toml")
        self.log_path = os.path.join(tmp, "server.log")
        self.proc = None
        self.port = None
        self.starts = 0
        os.makedirs(os.path.dirname(self.volume), exist_ok=True)

    def uri(self):
        return f"nbd://127.0.0.1:{self.port}/vol0"

    def write_config(self):
        with open(self.config, "w") as f:
            f.write(f"""# Written by tests/integration/crash_test.py
[agent]
site = "sto-1"
state_dir = "{self.state}"
[log]
dir = "log"
checkpoint_interval_ms = {self.args.checkpoint_interval_ms}
external_payload_min = {self.args.external_payload_min}
[nbd]
listen = ["127.0.0.1:{self.port}"]
[[group]]
name = "g0"
[[group.volume]]
name = "vol0"
path = "volumes/vol0.img"
size = "{self.args.volume_mib}MiB"
""")

    def log_tail(self, lines=40):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def start(self):
        for _ in range(3):
            self.port = free_port()
            self.write_config()
            self.starts += 1
            log = open(self.log_path, "a")
            log.write(f"==== start #{self.starts} port {self.port} ====\n")
            log.flush()
            if self.args.server == "tvillingd":
                cmd = [self.args.tvillingd, "--config", self.config, "--log-level", "info"]
            elif self.args.server == "nbdkit-memory":
                cmd = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(self.port), "memory",
                       f"{self.args.volume_mib}M"]
            else:
                if not os.path.exists(self.volume):
                    with open(self.volume, "wb") as v:
                        v.truncate(self.args.volume_mib << 20)
                cmd = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(self.port), "file", self.volume]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                h = nbd.NBD()
                try:
                    h.connect_uri(self.uri())
                    h.shutdown()
                    return
                except nbd.Error:
                    time.sleep(0.05)
                finally:
                    del h  # libnbd 1.14 closes the handle when it is collected
            if self.proc.poll() is None:
                self.kill9()
                raise TestFailure(f"server did not answer within {START_TIMEOUT_S}s\n" +
                                  self.log_tail())
            rc = self.proc.returncode
            self.proc = None
            if "in use" not in self.log_tail(5).lower():  # a lost port race is retried
                raise TestFailure(f"server exited with {rc} before serving\n" + self.log_tail())
        raise TestFailure("server could not bind a port in 3 attempts")

    def kill9(self):
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self):
        """Clean stop: SIGTERM must make the agent exit 0 within STOP_TIMEOUT_S."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise TestFailure(f"server ignored SIGTERM for {STOP_TIMEOUT_S}s")
        self.proc = None
        if rc != 0 and not (self.args.server != "tvillingd" and rc == -signal.SIGTERM):
            raise TestFailure(f"server exited with {rc} after SIGTERM\n" + self.log_tail())

    def verify_log(self):
        """Offline log check; the agent must be stopped (it holds the RocksDB lock)."""
        if self.args.server != "tvillingd":
            return "n/a (nbdkit has no log)"
        r = subprocess.run([self.args.tvillingd, "--config", self.config, "--verify-log"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=120)
        if r.returncode != 0:
            raise TestFailure(f"tvillingd --verify-log exited {r.returncode}:\n{r.stdout}")
        return r.stdout.strip()

    def replayed_records(self):
        """The agent logs 'replayed N record(s)' at start; -1 if not found."""
        for line in reversed(self.log_tail(200).splitlines()):
            if "replayed" in line:
                words = line.split()
                i = words.index("replayed") if "replayed" in words else -1
                if 0 <= i < len(words) - 1 and words[i + 1].isdigit():
                    return int(words[i + 1])
        return -1


# ---- the model -----------------------------------------------------------------------------------


class Op:
    __slots__ = ("op_id", "kind", "first_block", "nblocks", "fua", "conn", "submit_t", "done_t",
                 "cookie", "buf", "expect")

    def __init__(self, op_id, kind, first_block, nblocks, fua, conn):
        self.op_id = op_id
        self.kind = kind  # write, zero, trim, flush, read
        self.first_block = first_block
        self.nblocks = nblocks
        self.fua = fua
        self.conn = conn
        self.submit_t = None
        self.done_t = None  # logical time of the observed acknowledgement, None if never seen
        self.cookie = None
        self.buf = None
        self.expect = None

    def blocks(self):
        return range(self.first_block, self.first_block + self.nblocks)

    def value(self, rnd):
        return (rnd, self.op_id) if self.kind == "write" else ZERO

    def __repr__(self):
        t = f"submit t{self.submit_t}, " + (f"acked t{self.done_t}"
                                            if self.done_t is not None else "not acked")
        return (f"{self.kind}{'+FUA' if self.fua else ''} op {self.op_id} conn {self.conn} blocks "
                f"{self.first_block}..{self.first_block + self.nblocks - 1} ({t})")


class Round:
    """One round's workload against the live agent, and the model of what must survive it."""

    def __init__(self, rnd, rng, args, uri, base):
        self.rnd = rnd
        self.rng = rng
        self.args = args
        self.base = base  # block -> value at round start (made durable by the first FLUSH)
        self.nblocks_total = len(base)
        self.handles = []
        for _ in range(args.connections):
            h = nbd.NBD()
            h.connect_uri(uri)
            self.handles.append(h)
        self.clock = 0
        self.ops = []
        self.history = {}  # block -> [Op] of this round's write/zero/trim ops, in order
        self.inflight = {}  # op_id -> Op
        self.busy = set()  # blocks with an op in flight (so per-block order is known)
        self.max_acked_flush_submit_t = 0
        self.read_checks = 0

    def tick(self):
        self.clock += 1
        return self.clock

    def close(self):
        # libnbd 1.14's Python handles have no close(); dropping the last reference closes them.
        self.handles = []

    def latest_acked_value(self, block):
        for op in reversed(self.history.get(block, [])):
            if op.done_t is not None:
                return op.value(self.rnd)
        return self.base[block]

    def pick_range(self, max_blocks):
        for _ in range(20):
            n = self.rng.randint(1, max_blocks)
            first = self.rng.randrange(0, self.nblocks_total - n + 1)
            if not any(b in self.busy for b in range(first, first + n)):
                return first, n
        return None

    def submit(self, kind):
        conn = self.rng.randrange(len(self.handles))
        h = self.handles[conn]
        if kind == "flush":
            op = Op(len(self.ops) + 1, kind, 0, 0, False, conn)
            op.submit_t = self.tick()
            op.cookie = h.aio_flush()
        else:
            big = self.rng.random() < 0.05
            r = self.pick_range(256 if big else (32 if kind in ("zero", "trim") else 16))
            if r is None:
                return False
            fua = kind in ("write", "zero", "trim") and self.rng.random() < self.args.fua_fraction
            op = Op(len(self.ops) + 1, kind, r[0], r[1], fua, conn)
            flags = nbd.CMD_FLAG_FUA if fua else 0
            offset = op.first_block * BLOCK
            if kind == "write":
                data = b"".join(block_bytes(self.rnd, op.op_id, b) for b in op.blocks())
                op.submit_t = self.tick()
                op.cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset,
                                         flags=flags)
            elif kind == "zero":
                op.submit_t = self.tick()
                op.cookie = h.aio_zero(op.nblocks * BLOCK, offset, flags=flags)
            elif kind == "trim":
                op.submit_t = self.tick()
                op.cookie = h.aio_trim(op.nblocks * BLOCK, offset, flags=flags)
            else:  # read: must see every completed write
                op.expect = [self.latest_acked_value(b) for b in op.blocks()]
                op.buf = nbd.Buffer(op.nblocks * BLOCK)
                op.submit_t = self.tick()
                op.cookie = h.aio_pread(op.buf, offset)
            for b in op.blocks():
                self.busy.add(b)
                if kind != "read":
                    self.history.setdefault(b, []).append(op)
        self.ops.append(op)
        self.inflight[op.op_id] = op
        return True

    def pump(self, timeout_s):
        """Moves bytes on every connection and records acknowledgements; returns when something
        moved or after timeout_s."""
        rl, wl, by_fd = [], [], {}
        for h in self.handles:
            fd = h.aio_get_fd()
            by_fd[fd] = h
            d = h.aio_get_direction()
            if d & nbd.AIO_DIRECTION_READ:
                rl.append(fd)
            if d & nbd.AIO_DIRECTION_WRITE:
                wl.append(fd)
        r, w, _ = select.select(rl, wl, [], timeout_s)
        for fd in r:
            by_fd[fd].aio_notify_read()
        for fd in w:
            by_fd[fd].aio_notify_write()
        for op in list(self.inflight.values()):
            try:
                done = self.handles[op.conn].aio_command_completed(op.cookie)
            except nbd.Error as e:
                raise TestFailure(f"{op} failed on a live server: {e}")
            if done:
                op.done_t = self.tick()
                del self.inflight[op.op_id]
                if op.kind == "flush":
                    self.max_acked_flush_submit_t = max(self.max_acked_flush_submit_t, op.submit_t)
                else:
                    for b in op.blocks():
                        self.busy.discard(b)
                if op.kind == "read":
                    self.check_read(op)

    def check_read(self, op):
        data = bytes(op.buf.to_bytearray())
        for i, b in enumerate(op.blocks()):
            got = decode_block(data[i * BLOCK:(i + 1) * BLOCK], b)
            if got != op.expect[i]:
                raise TestFailure(f"read-your-writes: {op}: block {b} reads {got}, but the newest "
                                  f"completed write there is {op.expect[i]}")
        self.read_checks += 1

    def run(self, kill_cb):
        """Runs ops until the kill point, then calls kill_cb() (SIGKILL) with whatever is in
        flight."""
        rng, args = self.rng, self.args
        for h in self.handles:  # the state read back at round start becomes durable
            h.flush()
        kill_after = rng.randint(args.min_ops, args.max_ops)
        quiet_kill = rng.random() < 0.15  # sometimes kill with nothing in flight
        kinds = ["write"] * 60 + ["zero"] * 7 + ["trim"] * 7 + ["flush"] * 10 + ["read"] * 16
        deadline = time.monotonic() + 60
        while len(self.ops) < kill_after:
            if time.monotonic() > deadline:
                raise TestFailure(f"round {self.rnd}: no progress for 60 s; "
                                  f"{len(self.inflight)} request(s) stuck: "
                                  f"{list(self.inflight.values())[:5]}")
            while len(self.inflight) < args.qd and len(self.ops) < kill_after:
                if not self.submit(rng.choice(kinds)):
                    break
            self.pump(1.0)
        if quiet_kill:
            while self.inflight:
                if time.monotonic() > deadline:
                    raise TestFailure(f"round {self.rnd}: requests never completed: "
                                      f"{list(self.inflight.values())[:5]}")
                self.pump(1.0)
            if rng.random() < 0.5:
                self.submit("flush")
                while self.inflight:
                    self.pump(1.0)
        else:
            # Give the agent a random, short time to work on what is in flight (or none at all).
            for _ in range(rng.randint(0, 3)):
                self.pump(0)
        in_flight = len(self.inflight)
        kill_cb()
        self.close()
        return in_flight

    # ---- checks after the restart ----

    def durable(self, op):
        return op.done_t is not None and (op.fua or op.done_t < self.max_acked_flush_submit_t)

    def check(self, read_block):
        """read_block(b) -> decoded value. Returns (new base, stats) or raises TestFailure."""
        rnd = self.rnd
        new_base = list(self.base)
        lost_acked = 0
        got_index = {}  # block -> set of history indexes (0 = base) that match what was read
        for b in range(self.nblocks_total):
            hist = self.history.get(b)
            got = read_block(b)
            new_base[b] = got
            if not hist:
                if got != self.base[b]:
                    raise TestFailure(f"block {b} was not written in round {rnd} but reads {got}, "
                                      f"expected {self.base[b]}")
                continue
            values = [self.base[b]] + [op.value(rnd) for op in hist]
            durable_i = 0
            for i, op in enumerate(hist, start=1):
                if self.durable(op):
                    durable_i = i
            matches = {i for i, v in enumerate(values) if v == got}
            if not any(i >= durable_i for i in matches):
                cand = ", ".join(f"{v}" for v in values[durable_i:])
                durable_op = hist[durable_i - 1] if durable_i else "the round-start FLUSH"
                raise TestFailure(
                    f"LOST FLUSHED DATA: block {b} (offset {b * BLOCK}) reads {got}; newest "
                    f"durable write there is {durable_op}; allowed values: {cand}; history: {hist}")
            acked_i = max([i for i, op in enumerate(hist, start=1) if op.done_t is not None],
                          default=0)
            if not any(i >= acked_i for i in matches):
                lost_acked += 1
            got_index[b] = matches
        # Prefix: if W is visible, every op that completed before W was sent must be visible too.
        visible = [
            op for op in self.ops if op.kind == "write" and any(
                (rnd, op.op_id) == new_base[b] for b in op.blocks())
        ]
        horizon = max((op.submit_t for op in visible), default=0)
        for x in self.ops:
            if x.kind not in ("write", "zero", "trim") or x.done_t is None or x.done_t >= horizon:
                continue
            for b in x.blocks():
                idx = self.history[b].index(x) + 1
                if not any(i >= idx for i in got_index[b]):
                    w = max(visible, key=lambda o: o.submit_t)
                    raise TestFailure(
                        f"NOT A PREFIX: {w} is visible, but {x}, which completed before it was "
                        f"sent, is missing at block {b} (reads {new_base[b]})")
        acked_unflushed = sum(1 for op in self.ops if op.kind in ("write", "zero", "trim") and
                              op.done_t is not None and not self.durable(op))
        return new_base, {"lost_acked_blocks": lost_acked, "acked_unflushed_ops": acked_unflushed}


def read_volume(uri, nblocks):
    """Reads the whole volume through a fresh connection; returns a read_block function."""
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    if size != nblocks * BLOCK:
        raise TestFailure(f"export size {size} != {nblocks * BLOCK}")
    chunk = 4 << 20
    parts = [h.pread(min(chunk, size - off), off) for off in range(0, size, chunk)]
    h.shutdown()
    del h
    data = b"".join(parts)
    return lambda b: decode_block(data[b * BLOCK:(b + 1) * BLOCK], b)


# ---- main ----------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("tvillingd_pos", nargs="?", help="path of tvillingd (same as --tvillingd)")
    p.add_argument("--tvillingd", help="path of tvillingd")
    p.add_argument("--server", choices=["tvillingd", "nbdkit", "nbdkit-memory"],
                   default="tvillingd",
                   help="nbdkit: check the test; nbdkit-memory: a server that loses everything")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--volume-mib", type=int, default=64)
    p.add_argument("--connections", type=int, default=2)
    p.add_argument("--qd", type=int, default=32, help="requests in flight, all connections")
    p.add_argument("--min-ops", type=int, default=20)
    p.add_argument("--max-ops", type=int, default=600)
    p.add_argument("--fua-fraction", type=float, default=0.1)
    p.add_argument("--checkpoint-interval-ms", type=int, default=200,
                   help="short, so crashes land before and after checkpoints")
    p.add_argument("--external-payload-min", type=int, default=65536,
                   help="[log] external_payload_min: writes this big keep their payload in a "
                        "payload file (docs/log-format.md)")
    p.add_argument("--strict-acked", action="store_true",
                   help="also fail if an acknowledged but unflushed write is lost")
    p.add_argument("--keep", action="store_true", help="keep the temp dir on failure")
    p.add_argument("--expect-failure", metavar="TEXT",
                   help="invert: pass only if the test fails with a message containing TEXT")
    args = p.parse_args()
    args.tvillingd = args.tvillingd or args.tvillingd_pos
    if args.server == "tvillingd" and not (args.tvillingd and os.access(args.tvillingd, os.X_OK)):
        p.error(f"tvillingd binary not given or not executable: {args.tvillingd!r}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"crash_test: seed {seed} (rerun with --seed {seed}), {args.rounds} rounds, "
          f"server {args.server}", flush=True)
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="tvilling-crash.", dir=os.environ.get("TMPDIR", "/tmp"))
    server = Server(args, tmp)
    nblocks = (args.volume_mib << 20) // BLOCK
    base = [ZERO] * nblocks
    ok = False
    rnd = 0
    totals = {"lost_acked_blocks": 0, "acked_unflushed_ops": 0, "in_flight_at_kill": 0, "ops": 0,
              "read_checks": 0}
    t0 = time.monotonic()
    try:
        server.start()
        for rnd in range(1, args.rounds + 1):
            rd = Round(rnd, rng, args, server.uri(), base)
            in_flight = rd.run(server.kill9)
            log_ok = server.verify_log()
            server.start()  # replays the log the crash left
            replayed = server.replayed_records()
            new_base, stats = rd.check(read_volume(server.uri(), nblocks))
            base = new_base  # the next round runs on this very agent and state
            if args.strict_acked and stats["lost_acked_blocks"]:
                raise TestFailure(f"round {rnd}: {stats['lost_acked_blocks']} block(s) lost "
                                  f"acknowledged (unflushed) writes (--strict-acked)")
            for k, v in stats.items():
                totals[k] += v
            totals["in_flight_at_kill"] += in_flight
            totals["ops"] += len(rd.ops)
            totals["read_checks"] += rd.read_checks
            print(f"round {rnd}: {len(rd.ops)} ops, {in_flight} in flight at SIGKILL, "
                  f"{stats['acked_unflushed_ops']} acked-unflushed, "
                  f"{stats['lost_acked_blocks']} block(s) lost acked-unflushed data, "
                  f"replayed {replayed} record(s) at restart; "
                  f"log: {log_ok.splitlines()[-1] if log_ok else ''}",
                  flush=True)
        # Last: a clean stop (SIGTERM), the log checked, a clean start and one more full check.
        server.stop()
        server.verify_log()
        server.start()
        check = read_volume(server.uri(), nblocks)
        for b in range(nblocks):
            if check(b) != base[b]:
                raise TestFailure(f"after a clean restart block {b} reads {check(b)}, "
                                  f"expected {base[b]}")
        server.stop()
        server.verify_log()
        ok = True
        print(f"crash_test: PASS in {time.monotonic() - t0:.1f} s: {totals}", flush=True)
    except TestFailure as e:
        if args.expect_failure and args.expect_failure in str(e):
            print(f"crash_test: failed as expected (round {rnd}): {str(e)[:300]}", flush=True)
            print("crash_test: PASS (--expect-failure)", flush=True)
            args.keep = False
            return 0
        print(f"crash_test: FAIL (seed {seed}, round {rnd}): {e}", file=sys.stderr, flush=True)
        tail = server.log_tail()
        if tail:
            print(f"---- server log tail ({server.log_path}) ----\n{tail}----", file=sys.stderr)
    finally:
        if server.proc is not None:
            server.kill9()
        if ok or not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"crash_test: kept {tmp}", file=sys.stderr)
    if ok and args.expect_failure:
        print(f"crash_test: FAIL: expected a failure containing {args.expect_failure!r}, none came",
              file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
