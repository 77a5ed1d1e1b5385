#!/usr/bin/python3
"""kill9_test.py TVILLINGD [ROUNDS]: real NBD clients write to tvillingd, which is killed with
SIGKILL at a random moment, ROUNDS times over the same state directory.

Four connections (the export advertises multi-conn) write self-describing 4 KiB blocks: each block
holds (round, sequence, block) repeated, and each block belongs to one writer, so the order of the
writes to a block is known. Some writes are FUA; every writer sends FLUSH now and then. A write is
durable once it was acknowledged with FUA, or acknowledged before a FLUSH that was then acknowledged.

After every kill: `tvillingd --verify-log` must find every record intact and no LSN missing. After the
restart, every block must hold exactly one write that was issued to it (never a torn mix), and never
one older than its newest durable write.
"""
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import nbd

BLOCK = 4096
BLOCKS = 4096  # a 16 MiB region of the volume
WRITERS = 4


def payload(rnd, seq, block):
    return struct.pack("<QQQ", rnd, seq, block) * (BLOCK // 24) + b"\0" * (BLOCK % 24)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Agent:
    def __init__(self, binary, workdir, port):
        self.binary, self.workdir, self.port = binary, workdir, port
        self.config = os.path.join(workdir, "tvilling.toml")
        with open(self.config, "w") as f:
            f.write(f"""[agent]
site = "sto-1"
[nbd]
listen = ["127.0.0.1:{port}"]
[[group]]
name = "g0"
[[group.volume]]
name = "vol0"
path = "volumes/vol0.img"
size = "64MiB"
""")
        self.proc = None
        self.uri = f"nbd://127.0.0.1:{port}/vol0"

    def args(self, *extra):
        return [self.binary, "--config", self.config, "--state-dir", os.path.join(self.workdir, "state"),
                "--status-interval", "0", *extra]

    def start(self):
        log = open(os.path.join(self.workdir, "agent.log"), "ab")
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=log)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tvillingd exited with {self.proc.returncode}; see agent.log")
            try:
                h = nbd.NBD()
                h.connect_uri(self.uri)
                h.shutdown()
                return
            except nbd.Error:
                time.sleep(0.05)
        raise RuntimeError("tvillingd did not start serving within 30 s")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self):
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def verify_log(self):
        r = subprocess.run(self.args("--verify-log"), capture_output=True, text=True, timeout=120)
        return r.returncode, r.stdout + r.stderr


class Model:
    """What was issued to each block, and its newest durable write, as (round, seq) pairs."""

    def __init__(self):
        self.issued = {}   # block -> set of (round, seq)
        self.durable = {}  # block -> (round, seq)


def writer(uri, wid, rnd, model, stop, rng):
    h = nbd.NBD()
    h.connect_uri(uri)
    mine = [b for b in range(BLOCKS) if b % WRITERS == wid]
    acked = {}  # block -> newest acknowledged (round, seq) since the last flush began
    seq = 0
    try:
        while not stop.is_set():
            block = rng.choice(mine)
            seq += 1
            fua = rng.random() < 0.1
            model.issued.setdefault(block, set()).add((rnd, seq))
            h.pwrite(payload(rnd, seq, block), block * BLOCK, nbd.CMD_FLAG_FUA if fua else 0)
            if fua:
                model.durable[block] = (rnd, seq)
            else:
                acked[block] = (rnd, seq)
            if rng.random() < 0.05:
                covered = dict(acked)
                acked.clear()
                h.flush()
                for b, w in covered.items():
                    if model.durable.get(b, (0, 0)) < w:
                        model.durable[b] = w
    except nbd.Error:
        pass  # the agent was killed under us


def verify_volume(uri, model):
    h = nbd.NBD()
    h.connect_uri(uri)
    data = h.pread(BLOCKS * BLOCK, 0)
    h.shutdown()
    problems = []
    for block in range(BLOCKS):
        got = data[block * BLOCK:(block + 1) * BLOCK]
        durable = model.durable.get(block)
        if got == b"\0" * BLOCK:
            if durable is not None:
                problems.append(f"block {block}: zeroes, but write {durable} was durable")
            continue
        rnd, seq, b = struct.unpack("<QQQ", got[:24])
        if b != block or got != payload(rnd, seq, b):
            problems.append(f"block {block}: not a whole write issued to it (torn or misplaced)")
        elif (rnd, seq) not in model.issued.get(block, ()):
            problems.append(f"block {block}: holds ({rnd}, {seq}), which was never issued to it")
        elif durable is not None and (rnd, seq) < durable:
            problems.append(f"block {block}: holds ({rnd}, {seq}), older than durable write {durable}")
    return problems


def main():
    binary = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    seed = int(os.environ.get("TVILLING_SEED", random.randrange(1 << 30)))
    print(f"seed {seed} (set TVILLING_SEED to replay the timing choices)", flush=True)
    rng = random.Random(seed)
    workdir = tempfile.mkdtemp(prefix="tvilling-kill9-")
    agent = Agent(binary, workdir, free_port())
    model = Model()
    ok = False
    try:
        for rnd in range(1, rounds + 1):
            agent.start()
            problems = verify_volume(agent.uri, model)
            if problems:
                print(f"round {rnd}: after restart:\n  " + "\n  ".join(problems[:20]))
                return 1
            stop = threading.Event()
            threads = [threading.Thread(target=writer,
                                        args=(agent.uri, w, rnd, model, stop, random.Random(rng.random())))
                       for w in range(WRITERS)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.05, 0.8))
            agent.kill9()
            stop.set()
            for t in threads:
                t.join(timeout=30)
            rc, out = agent.verify_log()
            if rc != 0:
                print(f"round {rnd}: --verify-log failed ({rc}):\n{out}")
                return 1
            durable = len(model.durable)
            print(f"round {rnd}: killed; log verified; {durable} blocks with a durable write", flush=True)
        agent.start()
        problems = verify_volume(agent.uri, model)
        if problems:
            print("final check:\n  " + "\n  ".join(problems[:20]))
            return 1
        if not model.durable:
            print("no write was ever durable: the test proved nothing")
            return 1
        print(f"PASS: {rounds} kills, {len(model.durable)} blocks checked against their durable writes")
        ok = True
        return 0
    finally:
        agent.stop()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"state kept in {workdir}")


if __name__ == "__main__":
    sys.exit(main())
