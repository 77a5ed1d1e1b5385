#!/usr/bin/python3
"""coordinator_test.py: the fail-over coordinator with real tvillingd agents and the real Debian
etcd (3.4) on 127.0.0.1, one scenario per run.

  /usr/bin/python3 coordinator_test.py --tvillingd T --tvillingctl C --pki make-dev-pki.sh SCENARIO

Scenarios (each is a ctest; see tests/integration/CMakeLists.txt):
  elects_configured_primary  two agents with [coordinator]: the configured primary takes the
                     group's leader key under its lease, every site publishes its report, the
                     primary its lag report; writes are held until then and work afterwards; the
                     replica logs whom it follows
  suspends_without_etcd  etcd frozen (SIGSTOP): the primary suspends client I/O on its own clock
                     before the lease TTL could end it at etcd (checked against the time of the
                     freeze); a write issued after that does not complete while etcd is away;
                     once etcd is back the agent learns its lease ended, fails the held write
                     with ESHUTDOWN (retryable; it never reached the log), takes the key again as
                     the last primary and serves writes
  two_sites_refuse   the primary is killed (-9): the replica, with two sites and no witness,
                     refuses automatic fail-over and says why
  elected_replica_takes_over  three sites, three etcd members: each primary's epoch is its leader
                     key's create revision; the primary is killed (-9); the most advanced eligible
                     replica (ties: the smaller name) takes the key and is promoted within the
                     lease TTL + 1 s (+1 s slack; the times are printed as MEASURED), accepts
                     writes through NBD that reach the third site; the old primary, restarted,
                     comes back as a replica of the new one and all three volumes are identical
  switchover_dry_run  `tvillingctl switchover --dry-run` on the primary prints a possible plan
                     (steps, target lag, expected pause) and changes nothing; on the replica it is
                     refused with the reason (exit 3)
  etcd_unreachable   etcd never answers: the agent says so naming the endpoints, keeps the
                     primary's writes held (never completes one without etcd), and stops cleanly
"""

import datetime
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repl_lib import (TestFailure, assert_identical, free_port, log, run_main, u64,  # noqa: E402
                      wait_caught_up, wait_for)

LEASE_TTL_MS = 3000
SUSPEND_AFTER_MS = 1500


def netns_prefix(netns):
    return [] if netns is None else ["ip", "netns", "exec", netns]


class Etcd:
    """One etcd member on free 127.0.0.1 ports, data in the cluster's temp dir, stopped by PID.
    If the cluster's placement names it ("etcd-<name>"), it runs in that network namespace on that
    address with the standard ports (2379, 2380), and etcdctl runs there too."""

    def __init__(self, c, name="m0"):
        self.dir = os.path.join(c.tmp, f"etcd-{name}")
        where = c.placement.get(f"etcd-{name}", {})
        self.netns = where.get("netns")
        self.host = where.get("host", "127.0.0.1")
        self.client = free_port() if self.netns is None else 2379
        self.peer = free_port() if self.netns is None else 2380
        self.name = name
        self.proc = None
        self.initial_cluster = None  # "m0=http://..,m1=.." for a member of a cluster
        c.on_exit(self.stop)

    @property
    def endpoint(self):
        return f"{self.host}:{self.client}"

    @property
    def peer_url(self):
        return f"http://{self.host}:{self.peer}"

    def start(self):
        url_c = f"http://{self.host}:{self.client}"
        url_p = self.peer_url
        cmd = netns_prefix(self.netns) + [
            "etcd", "--name", self.name, "--data-dir", os.path.join(self.dir, "data"),
            "--listen-client-urls", url_c, "--advertise-client-urls", url_c,
            "--listen-peer-urls", url_p, "--initial-advertise-peer-urls", url_p,
            "--initial-cluster", self.initial_cluster or f"{self.name}={url_p}",
            "--logger", "zap", "--log-outputs", os.path.join(self.dir, "etcd.log")]
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "etcd.out"), "a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if self.initial_cluster is None:
            self.wait_healthy()
        return self

    def wait_healthy(self):
        wait_for(f"etcd {self.name} to serve",
                 lambda: self.ctl("endpoint", "health", check=False) is not None, 30, 0.2)

    def ctl(self, *args, check=True):
        r = subprocess.run(netns_prefix(self.netns) + [
            "etcdctl", "--endpoints", self.endpoint, "--dial-timeout", "1s", "--command-timeout",
            "2s", *args], capture_output=True, text=True, timeout=10,
            env=dict(os.environ, ETCDCTL_API="3"))
        if r.returncode != 0:
            if check:
                raise TestFailure(f"etcdctl {args}: {r.stderr}")
            return None
        return r.stdout

    def get(self, key):
        out = self.ctl("get", "--print-value-only", key)
        return out.strip() if out else ""

    def create_revision_of(self, key):
        kvs = json.loads(self.ctl("get", "-w", "json", key)).get("kvs") or []
        return int(kvs[0]["create_revision"]) if kvs else 0

    def pause(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class EtcdCluster:
    """Three etcd members on 127.0.0.1 (one cluster); reads go to any member."""

    def __init__(self, c, n=3):
        self.members = [Etcd(c, f"m{i}") for i in range(n)]
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = cluster

    def start(self):
        for m in self.members:
            m.start()
        for m in self.members:
            m.wait_healthy()
        return self

    @property
    def endpoints(self):
        return [m.endpoint for m in self.members]

    def ctl(self, *args, check=True):
        r = subprocess.run(netns_prefix(self.members[0].netns) + [
            "etcdctl", "--endpoints", ",".join(self.endpoints), "--dial-timeout", "1s",
            "--command-timeout", "2s", *args], capture_output=True, text=True, timeout=10,
            env=dict(os.environ, ETCDCTL_API="3"))
        if r.returncode != 0:
            if check:
                raise TestFailure(f"etcdctl {args}: {r.stderr}")
            return None
        return r.stdout

    def get(self, key):
        out = self.ctl("get", "--print-value-only", key)
        return out.strip() if out else ""

    def create_revision(self, key):
        out = self.ctl("get", "-w", "json", key)
        kvs = json.loads(out).get("kvs") or []
        return int(kvs[0]["create_revision"]) if kvs else 0


def local_first(agent, endpoints):
    """The etcd endpoints as `agent` lists them: a member on the agent's own address first (the
    agent talks to its own datacenter's member; bench/failover_bench.py --profile metro), the
    rest in the given order. On 127.0.0.1 every member is local: the order is unchanged."""
    return sorted(endpoints, key=lambda e: not e.startswith(agent.host + ":"))


def endpoints_line(agent, endpoints):
    return "endpoints = [" + ", ".join(f'"{e}"' for e in local_first(agent, endpoints)) + "]\n"


def coordinated_pair(c, endpoints, extra=""):
    a = c.agent("site-a")
    b = c.agent("site-b")
    g = {"name": "g0", "primary": "site-a", "size": "64MiB"}
    a.write_config([dict(g, peers=[(b, "sync", None)])], acl=[("site-b", "site-b", ["g0"])])
    b.write_config([dict(g, peers=[(a, "sync", None)])], acl=[("site-a", "site-a", ["g0"])])
    section = (f"lease_ttl_ms = {LEASE_TTL_MS}\nsuspend_after_ms = {SUSPEND_AFTER_MS}\n" + extra)
    for agent in (a, b):
        with open(agent.config_path, "a") as f:
            f.write("\n[coordinator]\n" + endpoints_line(agent, endpoints) + section)
    return a, b


def log_time(agent, pattern):
    """The wall-clock time (seconds since the epoch) of the last agent log line matching
    `pattern` (the agent logs ISO-8601 UTC timestamps)."""
    found = None
    for line in agent.tail(2000).splitlines():
        if re.search(pattern, line):
            found = line
    if found is None:
        raise TestFailure(f"{agent.site}: no log line matches {pattern!r}")
    stamp = found.split(" ", 1)[0]
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def log_has(agent, pattern):
    m = re.search(pattern, agent.tail(400))
    return m.group(0) if m else None


def pending(h, cookie):
    h.poll(0)
    return not h.aio_command_completed(cookie)


def wait_completed(h, cookie, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not h.aio_command_completed(cookie):
        if time.monotonic() > deadline:
            raise TestFailure(f"{what}: the write did not complete within {timeout_s} s")
        h.poll(100)


def started_pair(c):
    etcd = Etcd(c).start()
    a, b = coordinated_pair(c, [etcd.endpoint])
    b.start()
    a.start()
    wait_for("site-a to hold the leader key", lambda: etcd.get("/tvilling/groups/g0/leader")
             == "site-a", 30, 0.2)
    return etcd, a, b


# ---- scenarios -----------------------------------------------------------------------------------

def elects_configured_primary(c):
    etcd, a, b = started_pair(c)
    wait_for("both sites' reports", lambda: etcd.get("/tvilling/groups/g0/sites/site-a") and
             etcd.get("/tvilling/groups/g0/sites/site-b"), 15, 0.2)
    h = a.connect()
    h.pwrite(b"\x5a" * 65536, 0)
    h.flush()
    if h.pread(4096, 0) != b"\x5a" * 4096:
        raise TestFailure("read back differs")
    h.shutdown()
    report = wait_for("the primary's report", lambda: etcd.get("/tvilling/groups/g0/primary"),
                      15, 0.2)
    log(f"primary report: {report}")
    if not report.startswith("site=site-a ") or "peer.site-b=" not in report:
        raise TestFailure(f"unexpected primary report {report!r}")
    site_b = etcd.get("/tvilling/groups/g0/sites/site-b")
    log(f"site-b report: {site_b}")
    if "consistent=1" not in site_b:
        wait_for("site-b consistent", lambda: "consistent=1" in
                 etcd.get("/tvilling/groups/g0/sites/site-b"), 20, 0.3)
    wait_for("site-b to log whom it follows", lambda: log_has(b, r"primary is site-a \(etcd epoch \d+\)"),
             10, 0.2)
    if not log_has(a, r"automatic fail-over will be refused"):
        raise TestFailure("site-a did not warn that two sites without a witness cannot fail over "
                          "automatically")


def suspends_without_etcd(c):
    etcd, a, b = started_pair(c)
    h = a.connect()
    h.pwrite(b"\x11" * 4096, 0)  # served while the lease is fresh
    h.flush()
    etcd.pause()
    t_stop = time.monotonic()
    log("etcd frozen (SIGSTOP)")
    try:
        seen = wait_for("site-a to suspend client I/O",
                        lambda: log_has(a, r"client I/O suspended: coordinator: .*"), 10, 0.02)
        dt = time.monotonic() - t_stop
        log(f"suspended {dt:.2f} s after etcd froze: {seen}")
        if dt >= LEASE_TTL_MS / 1000:
            raise TestFailure(f"I/O suspended {dt:.2f} s after etcd froze: not before the "
                              f"{LEASE_TTL_MS} ms lease could have ended")
        time.sleep(max(0.0, t_stop + SUSPEND_AFTER_MS / 1000 + 0.3 - time.monotonic()))
        cookie = h.aio_pwrite(b"\x22" * 4096, 4096)
        t_end = time.monotonic() + 4
        while time.monotonic() < t_end:
            if not pending(h, cookie):
                raise TestFailure("a write completed while the primary could not prove its lease")
            time.sleep(0.05)
        log("write held for 4 s while etcd was away (as it must be)")
    finally:
        etcd.resume()
    log("etcd back (SIGCONT)")
    # The lease ended at etcd while it was frozen: the site learns it lost the key (the held write
    # is failed with a retryable error, never written), then takes the key again as the last
    # primary, in a new epoch, and serves writes again.
    try:
        wait_completed(h, cookie, 30, "after etcd came back")
        raise TestFailure("the held write completed although the lease it waited for was lost")
    except nbd.Error as e:
        if e.errno != errno.ESHUTDOWN and "ESHUTDOWN" not in str(e):
            raise TestFailure(f"the held write failed with {e}, not ESHUTDOWN (retryable)")
        log(f"the held write failed as it must: {e.string}")
    h.shutdown()
    wait_for("site-a to hold the leader key again",
             lambda: log_has(a, r"client I/O resumed \(0 held completion\(s\), 0 held request\(s\)\)"
                             r"(?![\s\S]*suspended)"), 30, 0.2)
    leader = etcd.get("/tvilling/groups/g0/leader")
    if leader != "site-a":
        raise TestFailure(f"leader key is {leader!r} after etcd came back")
    h = a.connect()
    if h.pread(4096, 4096) != b"\x00" * 4096:
        raise TestFailure("the failed write's data reached the volume")
    h.pwrite(b"\x44" * 4096, 4096)
    h.flush()
    log("writes work again after the site took the key back")
    h.shutdown()


def two_sites_refuse(c):
    etcd, a, b = started_pair(c)
    wait_for("site-b to follow site-a", lambda: log_has(b, r"primary is site-a"), 10, 0.2)
    a.kill9()
    log("site-a killed (-9)")
    msg = wait_for("site-b to refuse automatic fail-over",
                   lambda: log_has(b, r"the leader key is gone \(it was site-a's[^\0]*"
                                   r"automatic fail-over is refused: the group has only two sites "
                                   r"and no witness[^\n]*"), LEASE_TTL_MS / 1000 + 15, 0.2)
    log(f"site-b: {msg.splitlines()[-1]}")
    if etcd.get("/tvilling/groups/g0/leader") not in ("",):
        raise TestFailure("someone holds the leader key after the refusal")


def etcd_unreachable(c):
    dead = f"127.0.0.1:{free_port()}"
    a, b = coordinated_pair(c, [dead])
    b.start()
    a.start()
    msg = wait_for("site-a to say etcd is unreachable",
                   lambda: log_has(a, r"coordinator: cannot open an etcd session[^\n]*"), 20, 0.2)
    log(f"site-a: {msg}")
    if dead not in msg:
        raise TestFailure(f"the message does not name the endpoint {dead}")
    h = a.connect()
    cookie = h.aio_pwrite(b"\x33" * 4096, 0)
    t_end = time.monotonic() + 3
    while time.monotonic() < t_end:
        if not pending(h, cookie):
            raise TestFailure("a write completed although etcd never confirmed the primary")
        time.sleep(0.05)
    log("write held without etcd (as it must be)")
    rc = a.stop()
    if rc != 0:
        raise TestFailure(f"site-a exited with {rc} on SIGTERM with a held write")
    if a.proc is None and not log_has(a, r"failing 1 held request"):
        raise TestFailure("the held write was not failed at shutdown")


def three_sites(c, endpoints):
    """site-a primary (site-b sync, site-c async); on site-b and site-c every peer is async, so a
    promoted site's writes do not wait for the dead site-a."""
    a, b, cc = c.agent("site-a"), c.agent("site-b"), c.agent("site-c")
    g = {"name": "g0", "primary": "site-a", "size": "64MiB"}
    acl = [("site-a", "site-a", ["g0"]), ("site-b", "site-b", ["g0"]), ("site-c", "site-c", ["g0"])]
    for agent, peers in ((a, [(b, "sync"), (cc, "async")]), (b, [(a, "async"), (cc, "async")]),
                         (cc, [(a, "async"), (b, "async")])):
        agent.write_config([dict(g, peers=[(p, m, None) for p, m in peers])], acl=acl)
        with open(agent.config_path, "a") as f:
            f.write("\n[coordinator]\n" + endpoints_line(agent, endpoints) +
                    f"lease_ttl_ms = {LEASE_TTL_MS}\nanti_flap_ms = 0\n")
    return a, b, cc


def elected_replica_takes_over(c):
    etcd = EtcdCluster(c).start()
    a, b, cc = three_sites(c, etcd.endpoints)
    b.start()
    cc.start()
    a.start()
    wait_for("site-a to hold the leader key", lambda: etcd.get("/tvilling/groups/g0/leader")
             == "site-a", 30, 0.2)
    epoch_a = etcd.create_revision("/tvilling/groups/g0/leader")
    wait_for("site-a primary in the leader key's epoch", lambda: a.group().get("role") == "primary"
             and u64(a.group().get("epoch")) == epoch_a, 15, 0.1)
    log(f"site-a is primary in epoch {epoch_a} (the leader key's create revision)")
    h = a.connect()
    h.pwrite(b"\x77" * 65536, 0)
    h.flush()
    h.shutdown()
    wait_for("the primary's report with both peers caught up",
             lambda: re.search(r"last=(\d+) peer\.site-b=\1,0,\d+ peer\.site-c=\1,0,\d+",
                               etcd.get("/tvilling/groups/g0/primary")), 30, 0.2)
    wait_for("both replicas consistent", lambda: all(
        "consistent=1" in etcd.get(f"/tvilling/groups/g0/sites/{s}") for s in ("site-b", "site-c")),
        30, 0.2)
    wall_kill = time.time()
    a.kill9()
    t_kill = time.monotonic()
    log("site-a killed (-9)")
    wait_for("the leader key to go", lambda: etcd.get("/tvilling/groups/g0/leader") != "site-a",
             LEASE_TTL_MS / 1000 + 15, 0.05)
    t_detect = time.monotonic() - t_kill
    wait_for("a new leader", lambda: etcd.get("/tvilling/groups/g0/leader") not in ("", "site-a"),
             15, 0.05)
    leader = etcd.get("/tvilling/groups/g0/leader")
    if leader != "site-b":
        raise TestFailure(f"expected site-b (as advanced as site-c, smaller name), got {leader}")
    epoch_b = etcd.create_revision("/tvilling/groups/g0/leader")
    wait_for("site-b primary in the new epoch", lambda: b.group().get("role") == "primary" and
             u64(b.group().get("epoch")) == epoch_b, 15, 0.05)
    # The agent's own log times the election and the switch (polling with etcdctl and tvillingctl
    # processes adds up to a second on a loaded machine).
    t_seen = log_time(b, r"the leader key is gone \(it was site-a's") - wall_kill
    t_elect = log_time(b, r"this site holds the leader key \(etcd epoch %d\)" % epoch_b) - wall_kill
    t_promote = log_time(b, r"this site is primary in epoch %d" % epoch_b) - wall_kill
    h = b.connect()
    payload = os.urandom(65536)
    h.pwrite(payload, 1 << 20)
    h.flush()
    t_write = time.monotonic() - t_kill
    log(f"MEASURED lease TTL {LEASE_TTL_MS} ms: leader key gone {t_detect:.2f} s after the kill "
        f"(detection, polled), site-b saw it gone {t_seen:.2f} s (its log), "
        f"site-b took the key {t_elect:.2f} s and was primary in epoch "
        f"{epoch_b} {t_promote:.2f} s after it (its log), first write through NBD acknowledged "
        f"{t_write:.2f} s (polled)")
    if epoch_b <= epoch_a:
        raise TestFailure(f"the new epoch {epoch_b} is not above the old {epoch_a}")
    # The lease ends at most TTL after the kill, etcd revokes it within 0.5 s, and the choice
    # waits the settle time (0.5 s).
    if t_promote > LEASE_TTL_MS / 1000 + 1 + 0.5:
        raise TestFailure(f"site-b was primary {t_promote:.2f} s after the kill: later than the "
                          f"lease TTL + 1 s (+ 0.5 s for scheduling)")
    if h.pread(65536, 1 << 20) != payload:
        raise TestFailure("read back at site-b differs")
    h.shutdown()
    wait_for("site-c to follow site-b", lambda: log_has(cc, r"primary is site-b"), 10, 0.2)
    wait_caught_up(b, [cc])
    assert_identical(b, [cc])
    # The old primary comes back as a replica of the new one.
    a.start()
    wait_for("site-a to follow site-b", lambda: log_has(a, r"primary is site-b"), 20, 0.2)
    wait_for("site-a a replica", lambda: a.group().get("role") == "replica", 15, 0.2)
    wait_caught_up(b, [a, cc])
    assert_identical(b, [a, cc])
    if etcd.get("/tvilling/groups/g0/leader") != "site-b":
        raise TestFailure("the restarted site-a took the leader key")
    st = a.group()
    log(f"site-a after restart: role {st.get('role')} epoch {st.get('epoch')}")


def pause_holds_failover(c):
    """tvillingctl pause: with the primary killed, nobody is promoted while paused (the
    refusal says why); resume lets the most advanced replica take over at once."""
    etcd = EtcdCluster(c).start()
    a, b, cc = three_sites(c, etcd.endpoints)
    b.start()
    cc.start()
    a.start()
    wait_for("site-a primary", lambda: a.group().get("role") == "primary", 30, 0.2)
    # Candidates need the primary's report (their lag) to be eligible: wait for one that shows
    # both replicas caught up, as the fail-over test does.
    wait_for("the primary's report with both peers caught up",
             lambda: re.search(r"last=(\d+) peer\.site-b=\1,0,\d+ peer\.site-c=\1,0,\d+",
                               etcd.get("/tvilling/groups/g0/primary")), 30, 0.2)
    wait_for("both replicas consistent", lambda: all(
        "consistent=1" in etcd.get(f"/tvilling/groups/g0/sites/{s}") for s in ("site-b", "site-c")),
        30, 0.2)
    r = ctl(c, b, "pause", "--group", "g0")
    if r.returncode != 0 or "paused at every site" not in r.stdout:
        raise TestFailure(f"pause failed: rc {r.returncode}")
    if "by " not in etcd.get("/tvilling/groups/g0/paused"):
        raise TestFailure("no paused key in etcd after tvillingctl pause")
    wait_for("site-c to see the pause", lambda: cc.group().get("failover_paused") is True, 10, 0.1)
    a.kill9()
    t_kill = time.monotonic()
    log("site-a killed (-9) while paused")
    wait_for("the refusal that names the pause", lambda: log_has(b, r"fail-over is paused \(by "),
             LEASE_TTL_MS / 1000 + 10, 0.2)
    time.sleep(max(0.0, LEASE_TTL_MS / 1000 + 3 - (time.monotonic() - t_kill)))
    if etcd.get("/tvilling/groups/g0/leader") != "":
        raise TestFailure("a site took the leader key while fail-over was paused")
    if b.group().get("role") != "replica" or cc.group().get("role") != "replica":
        raise TestFailure("a replica was promoted while fail-over was paused")
    r = ctl(c, cc, "resume", "--group", "g0")
    if r.returncode != 0:
        raise TestFailure(f"resume failed: rc {r.returncode}")
    t_resume = time.monotonic()
    wait_for("a new primary after resume", lambda: etcd.get("/tvilling/groups/g0/leader") in
             ("site-b", "site-c"), 15, 0.05)
    log(f"MEASURED leader key taken {time.monotonic() - t_resume:.2f} s after resume")
    hist = ctl(c, b, "history", "--group", "g0").stdout
    if not re.search(r"pause  ok", hist) or not re.search(r"resume  ok", hist):
        raise TestFailure(f"the history lacks the pause and the resume:\n{hist}")


def switchover_dry_run(c):
    etcd, a, b = started_pair(c)
    h = a.connect()
    h.pwrite(b"\x66" * 65536, 0)
    h.flush()
    h.shutdown()
    wait_for("site-b streaming", lambda: (a.peer("site-b") or {}).get("link_state") == "streaming",
             30, 0.2)

    def ctl(agent, *args):
        return subprocess.run([c.tvillingctl, "--socket", agent.control_socket, "switchover",
                               *args], capture_output=True, text=True, timeout=30)
    r = ctl(a, "--group", "g0", "--to", "site-b", "--dry-run")
    log(f"site-a plan (rc {r.returncode}):\n{r.stdout}{r.stderr}")
    if r.returncode != 0 or "possible now" not in r.stdout or "2. wait until site-b's durable" \
            not in r.stdout:
        raise TestFailure("the dry run on the primary did not print a possible plan")
    r = ctl(b, "--group", "g0", "--to", "site-b", "--dry-run")
    if r.returncode != 3 or "run the switchover on its primary" not in r.stdout:
        raise TestFailure(f"the dry run on the replica was not refused: rc {r.returncode}\n"
                          f"{r.stdout}{r.stderr}")
    leader = etcd.get("/tvilling/groups/g0/leader")
    if leader != "site-a":
        raise TestFailure(f"a dry run changed the leader key to {leader!r}")


def ctl(c, agent, *args, stdin=subprocess.DEVNULL):
    r = subprocess.run([c.tvillingctl, "--socket", agent.control_socket, *args],
                       capture_output=True, text=True, timeout=60, stdin=stdin)
    log(f"{agent.site}$ tvillingctl {' '.join(args)} -> rc {r.returncode}: "
        f"{(r.stdout + r.stderr).strip()}")
    return r


def manual_promote_demote(c):
    """Without etcd, roles move only by operator commands: demote the primary, promote the replica
    (a new epoch), the old primary follows it; each command, and each refusal, is audited."""
    a, b = c.agent("site-a"), c.agent("site-b")
    g = {"name": "g0", "primary": "site-a", "size": "64MiB"}
    a.write_config([dict(g, peers=[(b, "sync", None)])], acl=[("site-b", "site-b", ["g0"])])
    b.write_config([dict(g, peers=[(a, "sync", None)])], acl=[("site-a", "site-a", ["g0"])])
    b.start()
    a.start()
    h = a.connect()
    h.pwrite(b"\x31" * 65536, 0)
    h.flush()
    wait_caught_up(a, [b])
    epoch_a = u64(a.group().get("epoch"))
    if ctl(c, a, "demote", "--group", "g0").returncode != 2:
        raise TestFailure("demote without --yes and without a terminal did not refuse (exit 2)")
    if a.group().get("role") != "primary":
        raise TestFailure("an unconfirmed demote changed the role")
    r = ctl(c, a, "demote", "--group", "g0", "--yes")
    if r.returncode != 0 or a.group().get("role") != "replica":
        raise TestFailure("demote failed")
    try:
        h.pwrite(b"\x32" * 4096, 0)
        raise TestFailure("a write on the demoted site's open connection completed")
    except nbd.Error as e:
        if e.errno != errno.ESHUTDOWN and "ESHUTDOWN" not in str(e):
            raise TestFailure(f"the write after demotion failed with {e}, not ESHUTDOWN")
        log(f"write at the demoted site: {e.string}")
    h.shutdown()
    r = ctl(c, b, "promote", "--group", "g0", "--yes")
    if r.returncode != 0:
        raise TestFailure("promote failed")
    st = b.group()
    if st.get("role") != "primary" or u64(st.get("epoch")) <= epoch_a:
        raise TestFailure(f"site-b after promote: {st.get('role')} epoch {st.get('epoch')} "
                          f"(site-a's was {epoch_a})")
    h = b.connect()
    h.pwrite(b"\x33" * 65536, 65536)
    h.flush()
    h.shutdown()
    wait_for("site-b streaming to site-a", lambda: (b.peer("site-a") or {}).get("link_state")
             == "streaming", 30, 0.2)
    wait_caught_up(b, [a])
    assert_identical(b, [a])
    r = ctl(c, b, "failover", "approve", "--group", "g0")
    if r.returncode != 3 or "no [coordinator]" not in r.stderr:
        raise TestFailure("approve without a coordinator was not refused (exit 3)")
    hist = ctl(c, b, "history", "--group", "g0").stdout
    if not re.search(r"g0  promote  ok  by \S+ \(uid \d+\) at site-b", hist) or \
            not re.search(r"g0  approve  refused", hist) or \
            not re.search(r"g0  promoted  ok  by coordinator at site-b", hist):
        raise TestFailure(f"site-b's history lacks the promotion or the refusal:\n{hist}")
    hist = ctl(c, a, "history", "--json").stdout
    actions = [json.loads(line)["action"] for line in hist.splitlines()]
    if "demote" not in actions or "demoted" not in actions:
        raise TestFailure(f"site-a's history lacks the demotion: {actions}")


def manual_policy_promote(c):
    """policy = "manual" with etcd: the primary is killed, nobody takes over on its own;
    `tvillingctl promote` on the replica campaigns and promotes it; commands refused by the state
    machine say why (exit 3); the audit records are in etcd."""
    etcd = Etcd(c).start()
    a, b = c.agent("site-a"), c.agent("site-b")
    g = {"name": "g0", "primary": "site-a", "size": "64MiB"}
    a.write_config([dict(g, peers=[(b, "sync", None)])], acl=[("site-b", "site-b", ["g0"])])
    b.write_config([dict(g, peers=[(a, "async", None)])], acl=[("site-a", "site-a", ["g0"])])
    for agent in (a, b):
        with open(agent.config_path, "a") as f:
            f.write(f'\n[coordinator]\nendpoints = ["{etcd.endpoint}"]\n'
                    f'lease_ttl_ms = {LEASE_TTL_MS}\npolicy = "manual"\nanti_flap_ms = 0\n')
    b.start()
    a.start()
    wait_for("site-a to hold the leader key", lambda: etcd.get("/tvilling/groups/g0/leader")
             == "site-a", 30, 0.2)
    h = a.connect()
    h.pwrite(b"\x55" * 65536, 0)
    h.flush()
    h.shutdown()
    wait_caught_up(a, [b])
    wait_for("site-b consistent in etcd", lambda: "consistent=1" in
             etcd.get("/tvilling/groups/g0/sites/site-b"), 20, 0.2)
    r = ctl(c, b, "promote", "--group", "g0", "--yes")
    if r.returncode != 3 or "site-a holds the leader key" not in r.stderr:
        raise TestFailure("promote while site-a holds the key was not refused (exit 3)")
    r = ctl(c, b, "demote", "--group", "g0", "--yes")
    if r.returncode != 3 or "switchover" not in r.stderr:
        raise TestFailure("demote under a coordinator was not refused (exit 3)")
    a.kill9()
    log("site-a killed (-9)")
    wait_for("site-b to wait for an operator", lambda: log_has(
        b, r"waiting for `tvillingctl promote`[^\n]*|policy is manual[^\n]*"),
        LEASE_TTL_MS / 1000 + 15, 0.2)
    if etcd.get("/tvilling/groups/g0/leader") != "":
        raise TestFailure("someone took the leader key under the manual policy")
    r = ctl(c, b, "failover", "approve", "--group", "g0")
    if r.returncode != 3 or "no promotion of site-b is pending" not in r.stderr:
        raise TestFailure("approve with nothing pending was not refused (exit 3)")
    r = ctl(c, b, "promote", "--group", "g0", "--yes")
    if r.returncode != 0 or "requested" not in r.stdout:
        raise TestFailure("promote on the replica after the primary's loss failed")
    wait_for("site-b primary", lambda: b.group().get("role") == "primary", 15, 0.1)
    epoch = etcd.create_revision_of("/tvilling/groups/g0/leader")
    if u64(b.group().get("epoch")) != epoch:
        raise TestFailure(f"site-b's epoch {b.group().get('epoch')} is not the key's {epoch}")
    h = b.connect()
    h.pwrite(b"\x66" * 4096, 65536)
    h.flush()
    h.shutdown()
    hist = ctl(c, b, "history", "--group", "g0").stdout
    for want in (r"promote  refused", r"demote  refused", r"approve  refused",
                 r"promote  requested", r"promoted  ok  by coordinator at site-b"):
        if not re.search(want, hist):
            raise TestFailure(f"history lacks {want!r}:\n{hist}")
    keys = etcd.ctl("get", "--prefix", "--keys-only", "/tvilling/groups/g0/audit/")
    if len([k for k in keys.split() if k]) < 5:
        raise TestFailure(f"the audit records are not in etcd: {keys}")


class WriteLoad:
    """One writer thread through NBD to whichever site is primary: block k of the first 4 MiB gets
    a unique 4 KiB; a write that fails (ESHUTDOWN from a demoted site, a read-only export) is
    retried, after reconnecting to the current primary, until acknowledged. `acked` holds the
    last acknowledged content of each block."""

    def __init__(self, sites):
        import threading
        self.sites = sites
        self.acked = {}
        self.failed = 0
        self.count = 0
        self.stop_flag = False
        self.error = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def primary(self):
        for s in self.sites:
            st = s.try_status()
            for g in (st or {}).get("groups", []):
                if g.get("name") == "g0" and g.get("role") == "primary":
                    return s
        return None

    def run(self):
        h = None
        k = 0
        try:
            while not self.stop_flag:
                data = (b"%08d" % k) * 512
                block = k % 1024
                while not self.stop_flag:
                    try:
                        if h is None:
                            p = self.primary()
                            if p is None:
                                time.sleep(0.01)
                                continue
                            h = p.connect()
                            if h.is_read_only():
                                h.shutdown()
                                h = None
                                time.sleep(0.01)
                                continue
                        h.pwrite(data, block * 4096)
                        self.acked[block] = data
                        self.count += 1
                        break
                    except nbd.Error:
                        self.failed += 1
                        try:
                            if h is not None:
                                h.shutdown()
                        except nbd.Error:
                            pass
                        h = None
                        time.sleep(0.01)
                k += 1
        except Exception as e:  # noqa: BLE001 - reported by stop()
            self.error = e
        finally:
            if h is not None:
                try:
                    h.shutdown()
                except nbd.Error:
                    pass

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stop_flag = True
        self.thread.join(60)
        if self.error:
            raise TestFailure(f"the write load failed: {self.error}")
        log(f"write load: {self.count} writes acknowledged, {self.failed} failed and retried")

    def check(self, agent):
        h = agent.connect()
        try:
            for block, data in sorted(self.acked.items()):
                if h.pread(4096, block * 4096) != data:
                    raise TestFailure(f"{agent.site}: block {block} lost its last acknowledged "
                                      f"write")
        finally:
            h.shutdown()
        log(f"{agent.site}: all {len(self.acked)} blocks hold their last acknowledged write")


def switchover_pair(c, members=1):
    """Two sites in sync mode; etcd is one member, or a cluster of `members`."""
    etcd = (Etcd(c) if members == 1 else EtcdCluster(c, members)).start()
    a, b = coordinated_pair(c, etcd.endpoints if members > 1 else [etcd.endpoint],
                            extra="anti_flap_ms = 0\n")
    b.start()
    a.start()
    wait_for("site-a to hold the leader key", lambda: etcd.get("/tvilling/groups/g0/leader")
             == "site-a", 30, 0.2)
    wait_for("site-a primary", lambda: a.group().get("role") == "primary", 15, 0.1)
    wait_for("site-b streaming", lambda: (a.peer("site-b") or {}).get("link_state") ==
             "streaming", 30, 0.2)
    return etcd, a, b


def switchover(c, from_agent, to_site, timeout="10"):
    r = ctl(c, from_agent, "switchover", "--group", "g0", "--to", to_site, "--timeout", timeout)
    m = re.search(r"write pause: (\d+) ms", r.stdout)
    return r, (int(m.group(1)) if m else None)


def switchover_there_and_back(c):
    etcd, a, b = switchover_pair(c)
    load = WriteLoad([a, b]).start()
    wait_for("writes flowing", lambda: load.count > 200, 30, 0.05)
    epoch_a = etcd.create_revision_of("/tvilling/groups/g0/leader")
    r, pause = switchover(c, a, "site-b")
    if r.returncode != 0 or pause is None:
        raise TestFailure("switchover A->B failed")
    if etcd.get("/tvilling/groups/g0/leader") != "site-b":
        raise TestFailure("the leader key is not site-b's after the switchover")
    wait_for("site-b primary", lambda: b.group().get("role") == "primary", 10, 0.05)
    epoch_b = u64(b.group().get("epoch"))
    if epoch_b <= epoch_a or epoch_b != etcd.create_revision_of("/tvilling/groups/g0/leader"):
        raise TestFailure(f"site-b's epoch {epoch_b}: not the new key's (site-a's was {epoch_a})")
    wait_for("site-a a replica", lambda: a.group().get("role") == "replica", 10, 0.05)
    n = load.count
    wait_for("writes flowing at site-b", lambda: load.count > n + 200, 30, 0.05)
    wait_for("site-a streaming from site-b", lambda: (b.peer("site-a") or {}).get("link_state")
             == "streaming", 30, 0.1)
    r, pause_back = switchover(c, b, "site-a")
    if r.returncode != 0 or pause_back is None:
        raise TestFailure("switchover B->A failed")
    wait_for("site-a primary again", lambda: a.group().get("role") == "primary", 10, 0.05)
    n = load.count
    wait_for("writes flowing at site-a", lambda: load.count > n + 200, 30, 0.05)
    load.stop()
    log(f"MEASURED write pause: A->B {pause} ms, B->A {pause_back} ms")
    wait_caught_up(a, [b])
    load.check(a)
    assert_identical(a, [b])
    hist = ctl(c, a, "history", "--group", "g0").stdout
    if len(re.findall(r"switchover  ok", hist)) != 2:
        raise TestFailure(f"the history lacks the two switchovers:\n{hist}")


def switchover_rolls_back(c):
    etcd, a, b = switchover_pair(c)
    load = WriteLoad([a, b]).start()
    wait_for("writes flowing", lambda: load.count > 200, 30, 0.05)
    b.pause()
    log("site-b frozen (SIGSTOP)")
    try:
        r, _ = switchover(c, a, "site-b", timeout="1.5")
        if r.returncode != 3 or "did not catch up" not in r.stderr or "rolled back" not in \
                r.stderr:
            raise TestFailure("the switchover to a frozen target did not roll back (exit 3)")
        if etcd.get("/tvilling/groups/g0/leader") != "site-a" or \
                a.group().get("role") != "primary":
            raise TestFailure("site-a is not the primary after the roll-back")
    finally:
        b.resume()
    log("site-b thawed (SIGCONT)")
    n = load.count
    wait_for("writes flowing at site-a after the roll-back", lambda: load.count > n + 200, 60,
             0.05)
    load.stop()
    if load.failed:
        raise TestFailure(f"{load.failed} writes failed although the primary never changed")
    wait_caught_up(a, [b])
    load.check(a)
    assert_identical(a, [b])


SCENARIOS = {f.__name__: f for f in (elects_configured_primary, suspends_without_etcd,
                                     two_sites_refuse, etcd_unreachable, switchover_dry_run,
                                     elected_replica_takes_over, manual_promote_demote,
                                     pause_holds_failover,
                                     manual_policy_promote, switchover_there_and_back,
                                     switchover_rolls_back)}

if __name__ == "__main__":
    if shutil.which("etcd") is None:
        print("etcd not found (Debian package etcd-server)", file=sys.stderr)
        sys.exit(1)
    sys.exit(run_main(SCENARIOS))
