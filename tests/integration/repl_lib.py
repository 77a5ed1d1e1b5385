"""repl_lib.py: runs several real tvillingd agents for replication tests (imported, never run).

A Cluster owns a temp dir with a development PKI (deploy/pki/make-dev-pki.sh), and Agents, each
with its own state dir, config, ports on 127.0.0.1 (or an address inside a network namespace the
test created), NBD on a unix socket (reachable from any namespace: it lives in the file system) and
the control socket that `tvillingctl status --json` reads. Everything started is stopped by PID
when the cluster closes, also when a test fails half-way.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import nbd

START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
MIB = 1 << 20


class TestFailure(Exception):
    pass


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port(host="127.0.0.1"):
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(what, fn, timeout_s, interval_s=0.1):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval_s)
    raise TestFailure(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def _proc_state(stat_path):
    """The state letter of /proc/PID[/task/TID]/stat (after the last ')': comm may hold any)."""
    try:
        with open(stat_path) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None  # gone


def _all_threads_stopped(pids):
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            if _proc_state(f"/proc/{pid}/task/{tid}/stat") not in (None, "T", "t", "Z", "X"):
                return False
    return True


def freeze(pid, group=False, timeout_s=10):
    """SIGSTOP to a process (or the process group `pid` leads), returning once every thread of it
    is stopped. kill() returns before that: a process-directed SIGSTOP wakes one thread, the group
    stop begins when that thread runs, and until then the other threads go on. On a loaded machine
    that was long enough for a frozen replica to receive, apply and acknowledge a batch (a CI run
    of sync_waits_for_peer saw its write complete)."""
    if group:
        os.killpg(pid, signal.SIGSTOP)
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit() and _pgrp(int(d)) == pid]
    else:
        os.kill(pid, signal.SIGSTOP)
        pids = [pid]
    wait_for(f"every thread of process{' group' if group else ''} {pid} to stop",
             lambda: _all_threads_stopped(pids), timeout_s, 0.001)


def _pgrp(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[2])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def u64(v):
    """proto3 JSON prints 64-bit integers as strings."""
    return int(v) if v not in (None, "") else 0


class Agent:
    def __init__(self, cluster, site, netns=None, host="127.0.0.1"):
        self.cluster = cluster
        self.site = site
        self.netns = netns
        self.host = host
        self.state_dir = os.path.join(cluster.tmp, site)
        os.makedirs(os.path.join(self.state_dir, "volumes"), exist_ok=True)
        self.config_path = os.path.join(cluster.tmp, f"{site}.toml")
        self.log_path = os.path.join(cluster.tmp, f"{site}.log")
        self.repl_port = free_port() if netns is None else 7300
        self.nbd_socket = os.path.join(self.state_dir, "nbd.sock")
        self.control_socket = os.path.join(self.state_dir, "tvillingd.sock")
        self.proc = None
        self.cert = site  # which PKI files to use: <cert>.pem / <cert>.key
        self.ca = "ca.pem"
        self.tls = True
        self.extra_log = ""
        self.extra_replication = ""  # more lines for [replication] (benchmarks' experiments)
        # Test settings: frequent checkpoints and short batching delays exercise those paths in a
        # short test. Benchmarks set this to False to run the product's defaults.
        self.test_tuning = True

    def move_state_under(self, parent):
        """Keeps this agent's state (log, volumes, sockets) in a new directory under `parent`
        (e.g. a tmpfs) instead of the cluster's temp dir; removed when the cluster closes. Call
        before write_config."""
        self.state_dir = tempfile.mkdtemp(prefix=f"{self.site}.", dir=parent)
        os.makedirs(os.path.join(self.state_dir, "volumes"))
        self.nbd_socket = os.path.join(self.state_dir, "nbd.sock")
        self.control_socket = os.path.join(self.state_dir, "tvillingd.sock")
        self.cluster.on_exit(lambda d=self.state_dir: shutil.rmtree(d, ignore_errors=True))

    @property
    def address(self):
        return f"{self.host}:{self.repl_port}"

    def write_config(self, groups, acl=None):
        """groups: list of dicts {name, primary, size, volumes (list of names), peers: [(agent,
        mode, extra dict)], extra: dict of more group keys}; acl: list of (identity, site,
        [groups])."""
        pki = self.cluster.pki
        lines = [
            "[agent]",
            f'site = "{self.site}"',
            f'state_dir = "{self.state_dir}"',
            "[log]",
            "checkpoint_interval_ms = 200" if self.test_tuning else "",
            self.extra_log,
            "[nbd]",
            f'unix_sockets = ["{self.nbd_socket}"]',
            "[replication]",
            f'listen = "{self.host}:{self.repl_port}"',
            "max_batch_delay_us = 200" if self.test_tuning else "",
            self.extra_replication,
            "[control]",
            f'unix_socket = "{self.control_socket}"',
        ]
        if self.tls:
            lines += [
                "[tls]",
                f'ca = "{pki}/{self.ca}"',
                f'cert = "{pki}/{self.cert}.pem"',
                f'key = "{pki}/{self.cert}.key"',
            ]
        else:
            lines += ["[tls]", "insecure = true"]
        for g in groups:
            lines += ["[[group]]", f'name = "{g["name"]}"', f'primary = "{g["primary"]}"']
            for k, val in (g.get("extra") or {}).items():
                lines.append(f"{k} = {val}")
            for v in g.get("volumes", ["vol0"]):
                lines += [
                    "[[group.volume]]",
                    f'name = "{v}"',
                    f'path = "volumes/{v}.img"',
                    f'size = "{g.get("size", "256MiB")}"',
                ]
            for peer, mode, extra in g.get("peers", []):
                lines += [
                    "[[group.peer]]",
                    f'site = "{peer.site}"',
                    f'address = "{peer.address}"',
                    f'mode = "{mode}"',
                ]
                for k, val in (extra or {}).items():
                    lines.append(f"{k} = {val}")
        for identity, site, grps in acl or []:
            if site == self.site or not any(site == peer.site for g in groups
                                            for peer, _, _ in g.get("peers", [])):
                continue  # only peers may be allowed in (the config refuses other entries)
            lines += [
                "[[acl]]",
                f'identity = "{identity}"',
                f'site = "{site}"',
                "groups = [" + ", ".join(f'"{x}"' for x in grps) + "]",
            ]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self, wait=True):
        cmd = [self.cluster.tvillingd, "--config", self.config_path, "--log-level", "debug"
               if os.environ.get("TV_DEBUG") else "info"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        with open(self.log_path, "a") as out:
            out.write(f"==== start {time.strftime('%H:%M:%S')} ====\n")
            out.flush()
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self):
        def ready():
            if self.proc.poll() is not None:
                raise TestFailure(f"{self.site}: tvillingd exited with {self.proc.returncode} "
                                  f"while starting\n{self.tail()}")
            return os.path.exists(self.control_socket) and self.try_status() is not None
        wait_for(f"{self.site} to serve its control socket", ready, START_TIMEOUT_S)

    def tail(self, n=40):
        try:
            with open(self.log_path) as f:
                lines = f.readlines()
            return "".join(lines[-n:])
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log(f"{self.site}: did not stop within {STOP_TIMEOUT_S}s; SIGKILL")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill9(self):
        return self.stop(signal.SIGKILL)

    def pause(self):
        freeze(self.proc.pid, group=True)

    def resume(self):
        os.killpg(self.proc.pid, signal.SIGCONT)

    # ---- status --------------------------------------------------------------------------------

    def try_status(self):
        try:
            r = subprocess.run([self.cluster.tvillingctl, "--socket", self.control_socket, "status",
                                "--json"], capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return None
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            return None

    def status(self):
        s = self.try_status()
        if s is None:
            raise TestFailure(f"{self.site}: tvillingctl status failed\n{self.tail()}")
        return s

    def group(self, name="g0"):
        for g in self.status().get("groups", []):
            if g.get("name") == name:
                return g
        raise TestFailure(f"{self.site}: no group {name} in status")

    def peer(self, peer_site, group="g0"):
        for p in self.group(group).get("peers", []):
            if p.get("peer") == peer_site:
                return p
        return None

    # ---- NBD -----------------------------------------------------------------------------------

    def uri(self, export="vol0"):
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def connect(self, export="vol0"):
        h = nbd.NBD()
        h.connect_uri(self.uri(export))
        return h

    def digest(self, export="vol0", chunk=4 * MIB):
        h = self.connect(export)
        try:
            size = h.get_size()
            d = hashlib.sha256()
            off = 0
            while off < size:
                n = min(chunk, size - off)
                d.update(h.pread(n, off))
                off += n
            return d.hexdigest()
        finally:
            h.shutdown()


class Cluster:
    def __init__(self, tvillingd, tvillingctl, pki_script, name="repl"):
        self.tvillingd = os.path.abspath(tvillingd)
        self.tvillingctl = os.path.abspath(tvillingctl)
        self.tmp = tempfile.mkdtemp(prefix=f"tvilling-{name}.")
        self.pki = os.path.join(self.tmp, "pki")
        try:
            subprocess.run(["bash", pki_script, self.pki], check=True, stdout=subprocess.DEVNULL)
        except BaseException:  # also Ctrl-C: nobody else can remove the temp dir
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.agents = []
        self.probe = None  # tests/tools/repl_probe, if the run was given one
        self.cleanups = []
        self.failed = False
        # Where an agent (by site) or an etcd member (by "etcd-<name>", coordinator_test.Etcd)
        # runs: {"netns": NS, "host": ADDR}. bench/failover_bench.py --profile metro fills it with
        # the lab's namespaces; a name not in it runs here on 127.0.0.1, as in every test.
        self.placement = {}

    def agent(self, site, **kw):
        a = Agent(self, site, **{**self.placement.get(site, {}), **kw})
        self.agents.append(a)
        return a

    def on_exit(self, fn):
        self.cleanups.append(fn)

    def close(self):
        for a in self.agents:
            if a.proc is not None:
                if a.proc.poll() is None:
                    try:
                        os.killpg(a.proc.pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
                a.stop()
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as e:  # cleanup must go on
                log(f"cleanup step failed (ignored): {e}")
        if self.failed and os.environ.get("TV_KEEP_ON_FAILURE"):
            log(f"keeping {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def dump_logs(self):
        for a in self.agents:
            print(f"---- last lines of {a.site}'s log ----\n{a.tail(60)}----", file=sys.stderr)


def wait_caught_up(primary, replicas, group="g0", timeout_s=60):
    """Waits until every replica reports (and the primary sees) applied >= the primary's last LSN
    and the replica says it is consistent."""
    def done():
        last = u64(primary.group(group).get("last_lsn"))
        for r in replicas:
            g = r.group(group)
            if not g.get("consistent") or u64(g.get("applied_lsn")) < last:
                return None
            p = primary.peer(r.site, group)
            if p is None or u64(p.get("applied_lsn")) < last:
                return None
        return (last,)  # truthy also for an empty log (last LSN 0)
    return wait_for("replicas to apply the primary's last LSN", done, timeout_s, 0.2)[0]


def differing_blocks(a, b, export="vol0", block=4096, chunk=4 * MIB, limit=8):
    """The ranges of `block`-sized blocks where a's and b's exports differ now, as text (the first
    `limit` ranges, each with which side holds zeros there): what a digest mismatch was about."""
    ha, hb = a.connect(export), b.connect(export)
    try:
        size = ha.get_size()
        ranges = []  # [first block, last block, a zero, b zero]
        off = 0
        while off < size:
            n = min(chunk, size - off)
            da, db = ha.pread(n, off), hb.pread(n, off)
            if da != db:
                for i in range(0, n, block):
                    x, y = da[i:i + block], db[i:i + block]
                    if x == y:
                        continue
                    k = (off + i) // block
                    za, zb = not any(x), not any(y)
                    if ranges and ranges[-1][1] == k - 1 and ranges[-1][2:] == [za, zb]:
                        ranges[-1][1] = k
                    else:
                        ranges.append([k, k, za, zb])
            off += n
    finally:
        ha.shutdown()
        hb.shutdown()
    if not ranges:
        return "no block differs now"
    text = "; ".join(
        f"blocks {f}..{l} (bytes {f * block}+{(l - f + 1) * block})"
        + (f": zeros on {a.site}" if za else f": zeros on {b.site}" if zb else "")
        for f, l, za, zb in ranges[:limit])
    return f"{len(ranges)} range(s) of {block}-byte blocks differ: {text}" + (
        " ..." if len(ranges) > limit else "")


def _last_lsns(agent):
    """The last LSN of each group `agent` is the primary of."""
    return {g.get("name"): u64(g.get("last_lsn")) for g in agent.status().get("groups", [])
            if g.get("role") == "primary"}


def assert_identical(primary, replicas, export="vol0"):
    """The replicas' `export` reads the same as the primary's. A write that lands at the primary
    while the volumes are read (a client stopped with a write still in flight, held by a fence)
    voids the comparison: then the replicas apply it and the volumes are read once more."""
    def applied_all(lsns):
        for r in replicas:
            have = {g.get("name"): u64(g.get("applied_lsn"))
                    for g in r.status().get("groups", [])}
            if any(name in have and have[name] < last for name, last in lsns.items()):
                return False
        return True

    for attempt in (1, 2):
        before = _last_lsns(primary)
        # The caller waited for the replicas; a write may have landed since.
        wait_for(f"the replicas to apply {primary.site}'s log up to {before}",
                 lambda: applied_all(before), 60, 0.2)
        want = primary.digest(export)
        got = {r.site: r.digest(export) for r in replicas}
        after = _last_lsns(primary)
        if after == before or attempt == 2:
            break
        log(f"{primary.site}'s log moved while the volumes were read ({before} -> {after}): "
            f"reading them again")
    for r in replicas:
        if got[r.site] != want:
            # Which blocks, and whether a second look (after a pause) still finds them: a late
            # apply converges, a lost or stray write does not.
            first = differing_blocks(primary, r, export)
            time.sleep(2)
            again = differing_blocks(primary, r, export)
            g = r.try_status() or {}
            raise TestFailure(f"{r.site}'s {export} differs from {primary.site}'s "
                              f"(sha256 {got[r.site][:16]} vs {want[:16]}): {first}; 2 s later: "
                              f"{again}; {primary.site} last LSN {after}, "
                              f"{r.site}: {json.dumps(g.get('groups', g))[:800]}")
    log(f"{export} identical on {primary.site} and {', '.join(r.site for r in replicas)} "
        f"(sha256 {want[:16]})")


def run_main(scenarios, argv=None):
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--tvillingd", required=True)
    ap.add_argument("--tvillingctl", required=True)
    ap.add_argument("--pki", required=True, help="deploy/pki/make-dev-pki.sh")
    ap.add_argument("--probe", help="tests/tools repl_probe (scenarios that send bad messages)")
    ap.add_argument("scenario", choices=sorted(scenarios))
    args = ap.parse_args(argv)
    c = Cluster(args.tvillingd, args.tvillingctl, args.pki, args.scenario)
    c.probe = os.path.abspath(args.probe) if args.probe else None
    try:
        scenarios[args.scenario](c)
        log(f"PASS {args.scenario}")
        return 0
    except (TestFailure, subprocess.CalledProcessError, subprocess.TimeoutExpired, nbd.Error) as e:
        c.failed = True
        log(f"FAIL {args.scenario}: {e}")
        c.dump_logs()
        return 1
    finally:
        c.close()
