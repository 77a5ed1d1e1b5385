#!/usr/bin/python3
"""systemd_notify_test.py: tvillingd's sd_notify protocol, checked through a NOTIFY_SOCKET this test
binds itself (systemd is not PID 1 here), as systemd would see it for a Type=notify unit.

  /usr/bin/python3 systemd_notify_test.py --tvillingd T --pki make-dev-pki.sh

1. tvillingd starts with NOTIFY_SOCKET, WATCHDOG_USEC=400000 and --log-format json. Its group has a
   peer (which never comes), so it has every kind of listener: NBD on TCP, replication (mutual TLS),
   metrics, and the control socket.
2. STATUS= lines come before READY=1, the one naming the group's log replay among them.
3. The moment READY=1 arrives, every listener accepts a connection at the first try.
4. WATCHDOG=1 pings follow, about every 200 ms (WATCHDOG_USEC / 2).
5. SIGHUP (ExecReload): RELOADING=1, then READY=1 again; the agent goes on.
6. SIGTERM: STOPPING=1, then a clean exit (0).
7. A restart after writes replays the log before READY=1 (the STATUS line and the log say so).
8. Every line tvillingd wrote to stderr is one JSON object with ts, level and msg.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repl_lib import TestFailure, free_port, log  # noqa: E402

WATCHDOG_USEC = 400_000


class Notify:
    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages = []  # (monotonic time, text)

    def receive(self, timeout_s):
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return None
        msg = data.decode()
        self.messages.append((time.monotonic(), msg))
        return msg

    def wait_for(self, key, timeout_s, proc=None):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise TestFailure(f"tvillingd exited with {proc.returncode} while waiting for {key}")
            msg = self.receive(min(0.5, max(0.01, deadline - time.monotonic())))
            if msg is not None and key in msg.split("\n"):
                return msg
        raise TestFailure(f"no {key} within {timeout_s}s; got {[m for _, m in self.messages]}")


def connect_tcp(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    s.close()


def connect_unix(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(path)
    s.close()


def write_config(tmp, pki, ports):
    state = os.path.join(tmp, "site-a")
    cfg = os.path.join(tmp, "site-a.toml")
    with open(cfg, "w") as f:
        f.write(f"""[agent]
site = "site-a"
state_dir = "{state}"
[nbd]
listen = ["127.0.0.1:{ports['nbd']}"]
[replication]
listen = "127.0.0.1:{ports['replication']}"
[tls]
ca = "{pki}/ca.pem"
cert = "{pki}/site-a.pem"
key = "{pki}/site-a.key"
[[acl]]
identity = "site-b"
site = "site-b"
groups = ["g0"]
[metrics]
listen = "127.0.0.1:{ports['metrics']}"
[[group]]
name = "g0"
primary = "site-a"
[[group.volume]]
name = "vol0"
path = "vol0.img"
size = "16MiB"
[[group.peer]]
site = "site-b"
address = "127.0.0.1:{ports['peer']}"
mode = "async"
""")
    return cfg, state


def start(args, cfg, notify_path, stderr_path):
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC=str(WATCHDOG_USEC))
    env.pop("WATCHDOG_PID", None)
    err = open(stderr_path, "a")
    return subprocess.Popen([args.tvillingd, "--config", cfg, "--log-format", "json"],
                            stdout=subprocess.DEVNULL, stderr=err, env=env,
                            start_new_session=True)


def stop(proc, notify):
    os.killpg(proc.pid, signal.SIGTERM)
    notify.wait_for("STOPPING=1", 20)
    try:
        rc = proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise TestFailure("tvillingd did not stop within 30 s of SIGTERM")
    if rc != 0:
        raise TestFailure(f"tvillingd exited with {rc} after SIGTERM")


def run_once(args, cfg, state, ports, notify, stderr_path, expect_replay):
    notify.messages.clear()
    proc = start(args, cfg, notify.path, stderr_path)
    try:
        ready = notify.wait_for("READY=1", 60, proc)
        # The moment READY=1 is read, every listener must accept at the first try.
        for name in ("nbd", "replication", "metrics"):
            try:
                connect_tcp(ports[name])
            except OSError as e:
                raise TestFailure(f"READY=1 was sent but the {name} listener on port "
                                  f"{ports[name]} refused: {e}")
        try:
            connect_unix(os.path.join(state, "tvillingd.sock"))
        except OSError as e:
            raise TestFailure(f"READY=1 was sent but the control socket refused: {e}")
        log(f"READY=1 ({ready!r}); every listener accepted at once")
        before = [m for _, m in notify.messages[:-1]]
        statuses = [line for m in before for line in m.split("\n") if line.startswith("STATUS=")]
        if not any("replaying its log" in s for s in statuses):
            raise TestFailure(f"no STATUS line about the log replay before READY=1: {statuses}")
        if any("READY=1" in m.split("\n") for m in before):
            raise TestFailure("READY=1 came twice")
        if "STATUS=serving 1 group(s) as site site-a" not in ready.split("\n"):
            raise TestFailure(f"READY=1 came without its STATUS line: {ready!r}")

        # Watchdog pings: about every 200 ms; count them over 2 s.
        t0 = time.monotonic()
        pings = []
        while time.monotonic() - t0 < 2.0:
            m = notify.receive(0.5)
            if m is not None and "WATCHDOG=1" in m.split("\n"):
                pings.append(time.monotonic())
        if len(pings) < 5:
            raise TestFailure(f"{len(pings)} WATCHDOG=1 pings in 2 s with WATCHDOG_USEC="
                              f"{WATCHDOG_USEC}; want about 10")
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        if max(gaps) >= WATCHDOG_USEC / 1e6:
            raise TestFailure(f"a gap of {max(gaps):.3f}s between pings reaches WatchdogSec")
        log(f"{len(pings)} WATCHDOG=1 pings in 2 s, largest gap {max(gaps) * 1000:.0f} ms")

        if expect_replay is not None:
            expect_replay(proc)
        else:
            # SIGHUP (ExecReload): RELOADING=1, then READY=1 again once the certificates are
            # reloaded, and the agent goes on.
            os.killpg(proc.pid, signal.SIGHUP)
            reloading = notify.wait_for("RELOADING=1", 10, proc)
            again = notify.wait_for("READY=1", 10, proc)
            log(f"SIGHUP: {reloading!r} then {again!r}")
            # Leave records behind that the next start must replay (the checkpoint is 1 s away).
            import nbd
            h = nbd.NBD()
            h.connect_uri(f"nbd://127.0.0.1:{ports['nbd']}/vol0")
            for i in range(8):
                h.pwrite(bytes([i + 1]) * 65536, i * 65536)
            h.flush()
            h.shutdown()
        stop(proc, notify)
        log("SIGTERM: STOPPING=1, exit 0")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def check_json_log(stderr_path):
    n = 0
    with open(stderr_path) as f:
        for i, line in enumerate(f, 1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TestFailure(f"stderr line {i} is not JSON ({e}): {line!r}")
            if not all(k in obj for k in ("ts", "level", "msg")):
                raise TestFailure(f"stderr line {i} lacks ts, level or msg: {line!r}")
            n += 1
    if n < 5:
        raise TestFailure(f"only {n} log lines")
    log(f"{n} log lines, each one JSON object with ts, level and msg")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tvillingd", required=True)
    ap.add_argument("--pki", required=True)
    args = ap.parse_args()
    args.tvillingd = os.path.abspath(args.tvillingd)
    tmp = tempfile.mkdtemp(prefix="tvilling-notify.")
    try:
        pki = os.path.join(tmp, "pki")
        subprocess.run(["bash", args.pki, pki], check=True, stdout=subprocess.DEVNULL)
        ports = {k: free_port() for k in ("nbd", "replication", "metrics", "peer")}
        cfg, state = write_config(tmp, pki, ports)
        notify = Notify(os.path.join(tmp, "notify.sock"))
        stderr_path = os.path.join(tmp, "tvillingd.stderr")
        run_once(args, cfg, state, ports, notify, stderr_path, None)

        def replayed(_proc):
            # The second start opened the log the first one wrote (8 records) before READY=1.
            with open(stderr_path) as f:
                lines = [json.loads(x) for x in f]
            opened = [x["msg"] for x in lines if "replayed" in x["msg"]]
            if len(opened) < 2 or "LSN 1..8," not in opened[-1]:
                raise TestFailure(f"the second start did not open the first one's log: {opened}")
        run_once(args, cfg, state, ports, notify, stderr_path, replayed)
        check_json_log(stderr_path)
        log("PASS systemd_notify")
        return 0
    except TestFailure as e:
        log(f"FAIL systemd_notify: {e}")
        try:
            with open(os.path.join(tmp, "tvillingd.stderr")) as f:
                print(f.read()[-4000:], file=sys.stderr)
        except OSError:
            pass
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
