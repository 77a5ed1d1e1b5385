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
  switchover_under_load_checked  planned switchover A->B->A with three sites (site-a and site-b
                     sync peers of each other, site-c async) and three etcd members, under load:
                     fio's nbd engine on vol1 and tvilling-check writing unique blocks to vol0, both
                     retrying at the new primary; afterwards the checker's log verifies (sync
                     mode: no completed write missing, RPO 0) on the final primary and on both
                     replicas, and vol0 and vol1 are identical on all three sites
  evacuate_site      three groups, primary site-a: `switchover --all-groups --from site-a --to
                     site-b --concurrency 2 --order g2,g0` (after a dry run that prints every
                     plan and changes nothing) moves every group in that order under a write
                     load on g0; every volume identical, one audited switchover per group
  evacuate_aborts    site-b frozen (SIGSTOP): the first group rolls back, the others are not
                     started, exit 3; an evacuation interrupted with SIGINT lets the group in
                     flight roll back and starts no other; every group stays primary at site-a
                     and takes writes (none left paused)
  etcd_unreachable   etcd never answers: the agent says so naming the endpoints, keeps the
                     primary's writes held (never completes one without etcd), and stops cleanly
  sync_set_degrade_then_failover  three sites (site-b sync with a short sync_degrade_after_ms,
                     site-c async), three etcd members: the primary publishes its sync set
                     {site-b}; site-b frozen (SIGSTOP), a write waits for the degrade and
                     completes only after the smaller set {} (with its floor) is in etcd (the
                     agent's log time of the publication, the key read right after); the primary
                     killed, site-c (holding the floor) is promoted and has every completed write
  sync_set_refuses_outside  the same with a long degrade limit: site-b frozen and the primary
                     killed while the set is {site-b}; site-c is not promoted automatically, its
                     refusal names the set, status shows it; `tvillingctl failover approve` on
                     site-c promotes it
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
import urllib.request

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repl_lib import (TestFailure, assert_identical, free_port, freeze, log, run_main,  # noqa: E402
                      u64, wait_caught_up, wait_for)

LEASE_TTL_MS = 3000
SUSPEND_AFTER_MS = 2000  # the default (2/3 of the TTL)


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
        freeze(self.proc.pid)

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class EtcdCluster:
    """Three etcd members on 127.0.0.1, or where the cluster's placement puts them (one cluster).
    The test's reads run where member `reader` runs (its namespace) and try it first, then the
    members after it: a test that cuts one member off reads from the other side."""

    def __init__(self, c, n=3, reader=0):
        self.members = [Etcd(c, f"m{i}") for i in range(n)]
        self.reader = reader
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
        order = self.members[self.reader:] + self.members[:self.reader]
        r = subprocess.run(netns_prefix(order[0].netns) + [
            "etcdctl", "--endpoints", ",".join(m.endpoint for m in order), "--dial-timeout", "1s",
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


def promotion_failure_resigns(c):
    """etcd rebuilt from scratch: its revisions (the epochs) start again below the epoch the
    sites' logs have seen, so the configured primary wins the key but its promotion fails. It must
    resign the key (a site that held it would leave the group without a primary for good), hold
    off for 2 x TTL, and try again; once etcd's revision passes the old epoch it is primary again,
    with every acknowledged write."""
    etcd = Etcd(c).start()
    # Push the revision up, so the first epoch is well above a fresh etcd's first revisions.
    for i in range(40):
        etcd.ctl("put", f"/filler/{i}", "x")
    a, b, cc = three_sites(c, [etcd.endpoint])
    for agent in (b, cc, a):
        agent.start()
    wait_for("site-a to hold the leader key", lambda: etcd.get("/tvilling/groups/g0/leader")
             == "site-a", 30, 0.2)
    old_epoch = etcd.create_revision_of("/tvilling/groups/g0/leader")
    wait_for("site-a primary", lambda: a.group().get("role") == "primary", 15, 0.1)
    h = a.connect()
    payload = os.urandom(65536)
    h.pwrite(payload, 0)
    h.flush()
    h.shutdown()
    wait_caught_up(a, [b, cc])
    for agent in (a, b, cc):
        agent.stop()
    etcd.stop()
    shutil.rmtree(os.path.join(etcd.dir, "data"))
    etcd.start()
    log(f"etcd rebuilt empty; the sites' logs have seen epoch {old_epoch}")
    for agent in (b, cc, a):
        agent.start()
    wait_for("site-a to resign a key it cannot promote in",
             lambda: log_has(a, r"resigned the leader key \(epoch \d+\)"), 30, 0.2)
    resigned = int(re.search(r"resigned the leader key \(epoch (\d+)\)", a.tail(400)).group(1))
    if resigned >= old_epoch:
        raise TestFailure(f"resigned epoch {resigned} is not below the old epoch {old_epoch}")
    if not log_has(a, r"already seen epoch %d" % old_epoch):
        raise TestFailure("site-a's log does not say why its promotion failed")
    # Held off, then again, until etcd's revision is above the old epoch (site reports move it).
    wait_for("site-a primary again in an epoch above the old one",
             lambda: a.group().get("role") == "primary" and
             u64(a.group().get("epoch")) > old_epoch, 90, 0.5)
    epoch = etcd.create_revision_of("/tvilling/groups/g0/leader")
    log(f"site-a resigned epoch {resigned}, primary again in epoch {epoch}")
    h = a.connect()
    if h.pread(65536, 0) != payload:
        raise TestFailure("the acknowledged write before the rebuild is not there")
    h.pwrite(payload[::-1], 1 << 20)
    h.flush()
    h.shutdown()
    wait_caught_up(a, [b, cc])
    assert_identical(a, [b, cc])


def three_sites_sync(c, endpoints, degrade_ms):
    """As three_sites, with site-a's sync peer site-b leaving the sync set after `degrade_ms`."""
    a, b, cc = c.agent("site-a"), c.agent("site-b"), c.agent("site-c")
    g = {"name": "g0", "primary": "site-a", "size": "64MiB"}
    acl = [("site-a", "site-a", ["g0"]), ("site-b", "site-b", ["g0"]), ("site-c", "site-c", ["g0"])]
    a.write_config([dict(g, peers=[(b, "sync", {"sync_degrade_after_ms": degrade_ms}),
                                   (cc, "async", None)])], acl=acl)
    b.write_config([dict(g, peers=[(a, "async", None), (cc, "async", None)])], acl=acl)
    cc.write_config([dict(g, peers=[(a, "async", None), (b, "async", None)])], acl=acl)
    for agent in (a, b, cc):
        with open(agent.config_path, "a") as f:
            f.write("\n[coordinator]\nendpoints = [" + ", ".join(f'"{e}"' for e in endpoints) +
                    f"]\nlease_ttl_ms = {LEASE_TTL_MS}\nanti_flap_ms = 0\n")
    cc.metrics_port = free_port()
    with open(cc.config_path, "a") as f:
        f.write(f'\n[metrics]\nlisten = "127.0.0.1:{cc.metrics_port}"\n')
    return a, b, cc


SYNC_KEY = "/tvilling/groups/g0/sync"


def sync_set_started(c, degrade_ms):
    etcd = EtcdCluster(c).start()
    a, b, cc = three_sites_sync(c, etcd.endpoints, degrade_ms)
    b.start()
    cc.start()
    a.start()
    wait_for("site-a primary", lambda: a.group().get("role") == "primary", 30, 0.2)
    epoch_a = etcd.create_revision("/tvilling/groups/g0/leader")
    wait_for("site-a's sync set {site-b} in etcd", lambda: re.fullmatch(
        r"site=site-a epoch=%d members=site-b floor=\d+" % epoch_a, etcd.get(SYNC_KEY)), 15, 0.1)
    h = a.connect()
    h.pwrite(b"\x55" * 65536, 0)
    h.flush()
    wait_for("the primary's report with both peers caught up",
             lambda: re.search(r"last=(\d+) peer\.site-b=\1,0,\d+ peer\.site-c=\1,0,\d+",
                               etcd.get("/tvilling/groups/g0/primary")), 30, 0.2)
    wait_for("both replicas consistent", lambda: all(
        "consistent=1" in etcd.get(f"/tvilling/groups/g0/sites/{s}") for s in ("site-b", "site-c")),
        30, 0.2)
    return etcd, a, b, cc, h, epoch_a


def sync_set_degrade_then_failover(c):
    degrade_ms = 1500
    etcd, a, b, cc, h, epoch_a = sync_set_started(c, degrade_ms)
    b.pause()
    t_stop = time.monotonic()
    log("site-b frozen (SIGSTOP)")
    try:
        payload = os.urandom(65536)
        cookie = h.aio_pwrite(payload, 1 << 20)
        # It waits for site-b until the degrade, and then until etcd holds the set without it.
        # poll blocks until the reply arrives, so the time after it is the completion's (to a
        # millisecond), not a polling interval's.
        while True:
            h.poll(1000)
            if h.aio_command_completed(cookie):
                break
            if time.monotonic() - t_stop > 30:
                raise TestFailure("the write did not complete within 30 s of freezing site-b")
        t_done_wall = time.time()
        waited = time.monotonic() - t_stop
        h.flush()
        key = etcd.get(SYNC_KEY)
        log(f"write completed {waited:.2f} s after site-b was frozen; sync key: {key}")
        m = re.fullmatch(r"site=site-a epoch=%d members= floor=(\d+)" % epoch_a, key)
        if not m:
            raise TestFailure(f"after the write completed without site-b, the sync key is {key!r}, "
                              "not a set without site-b")
        if waited < degrade_ms / 1000 - 0.1:
            raise TestFailure(f"the write completed {waited:.2f} s after site-b was frozen, "
                              f"before the degrade limit ({degrade_ms} ms)")
        t_pub = log_time(a, r"sync set \{\} floor %s published in etcd \(epoch %d" %
                         (m.group(1), epoch_a))
        if t_pub > t_done_wall:
            raise TestFailure(f"the write completed {t_pub - t_done_wall:.3f} s before etcd held "
                              "the set without site-b")
        log(f"MEASURED the write waited {waited:.2f} s for frozen site-b (degrade limit "
            f"{degrade_ms} ms); the set without it was in etcd {t_done_wall - t_pub:.3f} s before "
            "the completion was seen")
        floor = int(m.group(1))
        last = u64(a.group().get("last_lsn"))
        if floor > last:
            raise TestFailure(f"floor {floor} beyond the primary's last LSN {last}")
        # More writes, now completing without site-b; site-c (async) catches up.
        h.pwrite(b"\x66" * 65536, 2 << 20)
        h.flush()
        h.shutdown()
        wait_for("the primary's report with site-c caught up",
                 lambda: re.search(r"last=(\d+) .*peer\.site-c=\1,0,\d+",
                                   etcd.get("/tvilling/groups/g0/primary")), 30, 0.2)
        a.kill9()
        log("site-a killed (-9); site-b still frozen")
        wait_for("a new leader", lambda: etcd.get("/tvilling/groups/g0/leader") not in
                 ("", "site-a"), LEASE_TTL_MS / 1000 + 15, 0.05)
        leader = etcd.get("/tvilling/groups/g0/leader")
        if leader != "site-c":
            raise TestFailure(f"expected site-c (the set has no member, site-c holds the floor), "
                              f"got {leader}")
        wait_for("site-c primary", lambda: cc.group().get("role") == "primary", 15, 0.1)
        wait_for("site-c's log applied", lambda: u64(cc.group().get("applied_lsn")) >=
                 u64(cc.group().get("last_lsn")), 15, 0.1)
        h = cc.connect()
        if h.pread(65536, 1 << 20) != payload or h.pread(65536, 2 << 20) != b"\x66" * 65536:
            raise TestFailure("site-c lacks a write that completed at site-a")
        h.shutdown()
    finally:
        b.resume()


def sync_set_refuses_outside(c):
    etcd, a, b, cc, h, epoch_a = sync_set_started(c, 600000)
    h.shutdown()
    r = ctl(c, cc, "status")
    if not re.search(r"sync-set:\{site-b\} floor \d+ \(site-a@%d\)" % epoch_a, r.stdout):
        raise TestFailure(f"tvillingctl status on site-c does not show the sync set:\n{r.stdout}")
    with urllib.request.urlopen(f"http://127.0.0.1:{cc.metrics_port}/metrics", timeout=10) as m:
        text = m.read().decode("utf-8")
    for name, value in (("tvilling_group_sync_set_members", 1),
                        ("tvilling_group_sync_set_epoch", epoch_a)):
        if not re.search(r"^%s\{[^}]*group=\"g0\"[^}]*\} %d$" % (name, value), text, re.M):
            raise TestFailure(f"site-c's /metrics lacks {name} {value}")
    b.pause()
    try:
        log("site-b frozen (SIGSTOP)")
        a.kill9()
        t_kill = time.monotonic()
        log("site-a killed (-9)")
        wait_for("site-c's refusal that names the sync set", lambda: log_has(
            cc, r"site-c \(not in the sync set \{site-b\} floor \d+ published by site-a in "
            r"epoch %d\)" % epoch_a), LEASE_TTL_MS / 1000 + 15, 0.2)
        log("refusal: " + log_has(cc, r"the primary site-a is gone: .*"))
        if not log_has(cc, r"tvillingctl failover approve --group g0 --site site-c"):
            raise TestFailure("the refusal does not say how to approve site-c")
        time.sleep(max(0.0, LEASE_TTL_MS / 1000 + 3 - (time.monotonic() - t_kill)))
        if etcd.get("/tvilling/groups/g0/leader") != "":
            raise TestFailure("a site outside the sync set took the leader key automatically")
        if cc.group().get("role") != "replica":
            raise TestFailure("site-c was promoted although it is not in the sync set")
        if "site=site-c" not in etcd.get("/tvilling/groups/g0/pending"):
            raise TestFailure("site-c's plan is not pending in etcd")
        r = ctl(c, cc, "failover", "approve", "--group", "g0", "--site", "site-c")
        if r.returncode != 0:
            raise TestFailure(f"approve failed: rc {r.returncode} {r.stdout} {r.stderr}")
        wait_for("site-c to take the key after the approval",
                 lambda: etcd.get("/tvilling/groups/g0/leader") == "site-c", 15, 0.05)
        wait_for("site-c primary", lambda: cc.group().get("role") == "primary", 15, 0.1)
        wait_for("site-c's log applied", lambda: u64(cc.group().get("applied_lsn")) >=
                 u64(cc.group().get("last_lsn")), 15, 0.1)
        h = cc.connect()
        if h.pread(65536, 0) != b"\x55" * 65536:
            raise TestFailure("site-c lacks the write completed before site-b was frozen")
        h.shutdown()
    finally:
        b.resume()


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
    # The refusal after the key vanished (site-b also logs one at start, before site-a holds it).
    wait_for("site-b to wait for an operator", lambda: log_has(
        b, r"the leader key is gone \(it was site-a's[^\0]*(waiting for `tvillingctl promote`|"
        r"policy is manual)[^\n]*"), LEASE_TTL_MS / 1000 + 15, 0.2)
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
    # Nothing to drain: the frozen target's durable LSN already equals the primary's last, so
    # only the heartbeat the switchover sends when it pauses writes can tell that it hangs.
    b.pause()
    log("site-b frozen (SIGSTOP) with nothing to drain")
    try:
        r, _ = switchover(c, a, "site-b", timeout="1.5")
        if r.returncode != 3 or "did not answer a heartbeat" not in r.stderr or \
                "rolled back" not in r.stderr:
            raise TestFailure("the switchover to a frozen, caught-up target did not roll back "
                              f"(exit {r.returncode}): {r.stderr.strip()}")
        if etcd.get("/tvilling/groups/g0/leader") != "site-a" or \
                a.group().get("role") != "primary":
            raise TestFailure("site-a is not the primary after the idle roll-back")
    finally:
        b.resume()
    log("site-b thawed (SIGCONT)")
    h = a.connect()
    h.pwrite(b"\x77" * 4096, 0)
    h.flush()
    h.shutdown()
    wait_caught_up(a, [b])
    assert_identical(a, [b])


# ---- switchover A->B->A under fio load with the checker; site evacuation -------------------------

CHECK = None  # tvilling-check (--check), for switchover_under_load_checked
CHECK_SIZE = 16 << 20


def three_sync_sites(c, endpoints, groups=("g0",), volumes=None):
    """site-a primary of every group; site-a and site-b are each other's sync peers, site-c is an
    async peer of both (and has both as async peers): the switchover target is always a sync
    peer. `volumes`: group -> its volume names (default: group gN has one volume, volN).
    Returns the three agents (not started)."""
    volumes = volumes or {g: [group_volume(g)] for g in groups}
    a, b, cc = c.agent("site-a"), c.agent("site-b"), c.agent("site-c")
    acl = [(s, s, list(groups)) for s in ("site-a", "site-b", "site-c")]
    for agent, peers in ((a, [(b, "sync"), (cc, "async")]), (b, [(a, "sync"), (cc, "async")]),
                         (cc, [(a, "async"), (b, "async")])):
        agent.write_config([{"name": g, "primary": "site-a", "size": "64MiB",
                             "volumes": volumes[g], "peers": [(p, m, None) for p, m in peers]}
                            for g in groups], acl=acl)
        with open(agent.config_path, "a") as f:
            f.write("\n[coordinator]\nendpoints = [" + ", ".join(f'"{e}"' for e in endpoints) +
                    f"]\nlease_ttl_ms = {LEASE_TTL_MS}\nanti_flap_ms = 0\n")
    return a, b, cc


def group_volume(group):
    return "vol" + group[1:]


def start_three(c, etcd, agents, groups=("g0",)):
    a, b, cc = agents
    b.start()
    cc.start()
    a.start()
    for g in groups:
        wait_for(f"site-a to hold the leader key of {g}",
                 lambda g=g: etcd.get(f"/tvilling/groups/{g}/leader") == "site-a", 30, 0.2)
        wait_for(f"site-a primary of {g}", lambda g=g: a.group(g).get("role") == "primary", 15,
                 0.1)
        for r in (b, cc):
            wait_for(f"{r.site} streaming {g}", lambda g=g, r=r: (a.peer(r.site, g) or {}).get(
                "link_state") == "streaming", 30, 0.2)


def primary_of(sites, group="g0"):
    for s in sites:
        for g in (s.try_status() or {}).get("groups", []):
            if g.get("name") == group and g.get("role") == "primary":
                return s
    return None


class FioLoop:
    """fio's nbd engine (4 KiB randwrite, QD 8) on `export` of whichever site is primary, in runs
    of a few seconds: fio stops at the first failed write (ESHUTDOWN when its primary is switched
    over, or a refused read-only export), and the loop starts it again at the current primary, as
    docs/operations.md tells clients to."""

    def __init__(self, c, sites, export="vol1"):
        import threading
        self.c, self.sites, self.export = c, sites, export
        self.runs_ok = 0
        self.runs_failed = 0
        self.run_sites = []  # the site of each run, in order
        self.stop_flag = False
        self.proc = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        c.on_exit(self.kill)

    def run(self):
        n = 0
        while not self.stop_flag:
            p = primary_of(self.sites)
            if p is None:
                time.sleep(0.05)
                continue
            n += 1
            self.run_sites.append(p.site)
            out = os.path.join(self.c.tmp, f"fio-{n}.txt")
            self.proc = subprocess.Popen(
                ["fio", "--name=load", "--ioengine=nbd", f"--uri={p.uri(self.export)}",
                 "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=32M", "--time_based",
                 "--runtime=3", f"--output={out}"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)
            rc = self.proc.wait()
            if rc == 0:
                self.runs_ok += 1
            else:
                self.runs_failed += 1
                time.sleep(0.05)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stop_flag = True
        self.thread.join(30)
        self.kill()
        log(f"fio: {self.runs_ok} runs ended cleanly, {self.runs_failed} ended with an error and "
            f"were restarted at the primary; runs at {','.join(self.run_sites)}")


def check_verify(log_path, image, expect=0):
    r = subprocess.run([CHECK, "verify", "--log", log_path, "--image", image, "--mode", "sync"],
                       capture_output=True, text=True, timeout=120)
    tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-4:])
    log(f"verify {image}: rc {r.returncode}\n{tail}")
    if r.returncode != expect:
        raise TestFailure(f"tvilling-check verify of {image} exited {r.returncode} (expected "
                          f"{expect}):\n{r.stdout[-3000:]}{r.stderr[-2000:]}")


def switchover_group(c, from_agent, to_site, group="g0", timeout="10"):
    r = ctl(c, from_agent, "switchover", "--group", group, "--to", to_site, "--timeout", timeout)
    m = re.search(r"write pause: (\d+) ms", r.stdout)
    if r.returncode != 0 or m is None:
        raise TestFailure(f"switchover of {group} {from_agent.site}->{to_site} failed")
    return int(m.group(1))


def switchover_under_load_checked(c):
    """Planned switchover A->B->A with three sites and a three-member etcd, under fio (vol1) and
    the checker (vol0) that both retry at the new primary; RPO 0 on every site afterwards."""
    if CHECK is None:
        raise TestFailure("this scenario needs --check (tvilling-check)")
    if shutil.which("fio") is None:
        raise TestFailure("fio not found (Debian package fio)")
    etcd = EtcdCluster(c).start()
    a, b, cc = agents = three_sync_sites(c, etcd.endpoints, volumes={"g0": ["vol0", "vol1"]})
    start_three(c, etcd, agents)
    log_path = os.path.join(c.tmp, "checker.log")
    out = open(os.path.join(c.tmp, "checker.out"), "w")
    err = open(os.path.join(c.tmp, "checker.err"), "w")
    checker = subprocess.Popen(
        [CHECK, "write", "--uri", a.uri("vol0"), "--uri", b.uri("vol0"), "--uri", cc.uri("vol0"),
         "--size", str(CHECK_SIZE), "--qd", "8", "--duration", "25", "--log", log_path,
         "--seed", "11"], stdout=out, stderr=err, start_new_session=True)
    c.on_exit(lambda: checker.poll() is None and os.killpg(checker.pid, signal.SIGKILL))
    fio = FioLoop(c, agents).start()
    wait_for("fio writing at site-a", lambda: u64(a.group().get("last_lsn")) > 2000, 30, 0.2)
    pause_ab = switchover_group(c, a, "site-b")
    wait_for("site-b primary", lambda: b.group().get("role") == "primary", 10, 0.05)
    wait_for("site-a a replica", lambda: a.group().get("role") == "replica", 10, 0.05)
    last = u64(b.group().get("last_lsn"))
    wait_for("writes at site-b", lambda: u64(b.group().get("last_lsn")) > last + 2000, 30, 0.1)
    wait_for("site-a streaming from site-b", lambda: (b.peer("site-a") or {}).get("link_state")
             == "streaming", 30, 0.1)
    if checker.poll() is not None or fio.stop_flag:
        raise TestFailure("the checker ended before the switchover back: make its --duration "
                          "longer")
    pause_ba = switchover_group(c, b, "site-a")
    wait_for("site-a primary again", lambda: a.group().get("role") == "primary", 10, 0.05)
    last = u64(a.group().get("last_lsn"))
    wait_for("writes at site-a again", lambda: u64(a.group().get("last_lsn")) > last + 2000, 30,
             0.1)
    log(f"MEASURED write pause under fio + checker: A->B {pause_ab} ms, B->A {pause_ba} ms")
    try:
        rc = checker.wait(60)
    except subprocess.TimeoutExpired:
        raise TestFailure("tvilling-check write did not end in time")
    fio.stop()
    with open(os.path.join(c.tmp, "checker.out")) as f:
        counts = f.read().strip()
    log(f"checker: rc {rc} {counts}")
    if rc != 0:
        with open(os.path.join(c.tmp, "checker.err")) as f:
            raise TestFailure(f"tvilling-check write failed (rc {rc}): {f.read()[-2000:]}")
    m = re.search(r'"completed":(\d+)', counts)
    if not m or int(m.group(1)) < 500:
        raise TestFailure(f"too few checker writes completed to prove anything: {counts}")
    if not re.search(r'"failed":[1-9]|"failed_connects":[1-9]|"connects":([3-9]|\d\d)', counts):
        raise TestFailure(f"the checker never followed the primary to another site: {counts}")
    if "site-b" not in fio.run_sites or fio.run_sites[-1] != "site-a" or \
            fio.run_sites.index("site-b") == 0:
        raise TestFailure(f"fio did not follow the primary A->B->A: runs at {fio.run_sites}")
    if etcd.get("/tvilling/groups/g0/leader") != "site-a":
        raise TestFailure("site-a does not hold the leader key at the end")
    wait_caught_up(a, [b, cc])
    for agent in (a, b, cc):
        check_verify(log_path, agent.uri("vol0"))  # RPO 0: every completed write is there
    for export in ("vol0", "vol1"):
        assert_identical(a, [b, cc], export)
    hist = ctl(c, a, "history", "--group", "g0").stdout
    if len(re.findall(r"switchover  ok", hist)) != 2:
        raise TestFailure(f"the history lacks the two switchovers:\n{hist}")


EVAC_GROUPS = ("g0", "g1", "g2")


def evacuation_sites(c):
    etcd = EtcdCluster(c).start()
    agents = three_sync_sites(c, etcd.endpoints, groups=EVAC_GROUPS)
    start_three(c, etcd, agents, EVAC_GROUPS)
    a = agents[0]
    for i, g in enumerate(EVAC_GROUPS):
        h = a.connect(group_volume(g))
        h.pwrite(bytes([0x41 + i]) * 65536, 4096 * i)
        h.flush()
        h.shutdown()
    return etcd, agents


def evacuate(c, agent, *args, timeout="10"):
    return ctl(c, agent, "switchover", "--all-groups", "--from", agent.site, "--to", "site-b",
               "--timeout", timeout, *args)


def evacuate_site(c):
    """Three groups, primary site-a, evacuated to site-b two at a time in the order g2, g0, g1
    under a write load on g0: every group moves, every volume is identical afterwards, and each
    move is in the audit log."""
    etcd, (a, b, cc) = evacuation_sites(c)
    r = evacuate(c, a, "--dry-run", "--order", "g2")
    if r.returncode != 0 or r.stdout.count("dry run, nothing changed") != 3 or \
            "in this order: g2,g0,g1" not in r.stdout:
        raise TestFailure("the dry run did not print the plan of every group in order")
    for g in EVAC_GROUPS:
        if etcd.get(f"/tvilling/groups/{g}/leader") != "site-a":
            raise TestFailure("the dry run moved a group")
    load = WriteLoad([a, b]).start()
    wait_for("writes flowing", lambda: load.count > 200, 30, 0.05)
    r = evacuate(c, a, "--concurrency", "2", "--order", "g2,g0")
    if r.returncode != 0 or "3 of 3 groups moved" not in r.stdout:
        raise TestFailure(f"the evacuation did not move every group (rc {r.returncode})")
    starts = re.findall(r"^(g\d): switching over", r.stdout, re.M)
    if starts != ["g2", "g0", "g1"]:
        raise TestFailure(f"groups started in the order {starts}, not g2, g0, g1")
    for g in EVAC_GROUPS:
        if etcd.get(f"/tvilling/groups/{g}/leader") != "site-b":
            raise TestFailure(f"the leader key of {g} is not site-b's")
        wait_for(f"site-b primary of {g}", lambda g=g: b.group(g).get("role") == "primary", 10,
                 0.05)
        wait_for(f"site-a replica of {g}", lambda g=g: a.group(g).get("role") == "replica", 10,
                 0.05)
    n = load.count
    wait_for("writes flowing at site-b", lambda: load.count > n + 200, 30, 0.05)
    load.stop()
    for g in EVAC_GROUPS:
        wait_caught_up(b, [a, cc], group=g)
    load.check(b)
    for g in EVAC_GROUPS:
        assert_identical(b, [a, cc], group_volume(g))
        hist = ctl(c, a, "history", "--group", g).stdout
        if len(re.findall(r"switchover  ok .* to site-b \(evacuation of site-a to site-b, "
                          r"group \d of 3\)", hist)) != 1:
            raise TestFailure(f"the history of {g} lacks its switchover:\n{hist}")


def evacuate_aborts(c):
    """site-b frozen (SIGSTOP): the first group's switchover rolls back, the others are not
    started, exit 3; an evacuation interrupted with SIGINT lets the group in flight roll back and
    starts no other. Every group stays primary at site-a and takes writes (none left paused)."""
    etcd, (a, b, cc) = evacuation_sites(c)
    b.pause()
    log("site-b frozen (SIGSTOP)")
    # One write per group that site-b cannot have: each switchover has something to drain, so it
    # rolls back. (Without one, the drain is instant and the key is handed to the frozen site.)
    pending_writes = []
    for i, g in enumerate(EVAC_GROUPS):
        h = a.connect(group_volume(g))
        pending_writes.append((g, h, h.aio_pwrite(bytes([0x71 + i]) * 4096, 2 << 20)))
    try:
        r = evacuate(c, a, "--order", "g1", timeout="1.5")
        if r.returncode != 3:
            raise TestFailure(f"the evacuation to a frozen site exited {r.returncode}, not 3")
        for want in (r"g1: rolled back: site-b did not catch up", r"g0: not started",
                     r"g2: not started", r"0 of 3 groups moved; aborted: group g1 rolled back"):
            if not re.search(want, r.stdout):
                raise TestFailure(f"the report lacks {want!r}")
        # SIGINT while g0 is in flight (site-b still frozen: it waits for its --timeout).
        p = subprocess.Popen([c.tvillingctl, "--socket", a.control_socket, "switchover",
                              "--all-groups", "--from", "site-a", "--to", "site-b", "--timeout",
                              "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        c.on_exit(lambda: p.poll() is None and p.kill())
        first = p.stdout.readline()
        if not first.startswith("evacuation of site-a to site-b"):
            raise TestFailure(f"unexpected first line {first!r}")
        if not p.stdout.readline().startswith("g0: switching over"):
            raise TestFailure("g0 was not started first")
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        log(f"interrupted evacuation -> rc {p.returncode}:\n{out}{err}")
        if p.returncode != 3:
            raise TestFailure(f"the interrupted evacuation exited {p.returncode}, not 3")
        for want in (r"interrupted: no new group starts; waiting for 1 in flight",
                     r"g0: rolled back", r"g1: not started", r"g2: not started",
                     r"aborted: interrupted \(SIGINT\)"):
            if not re.search(want, out):
                raise TestFailure(f"the interrupted report lacks {want!r}")
    finally:
        b.resume()
    log("site-b thawed (SIGCONT)")
    for g, h, cookie in pending_writes:
        wait_completed(h, cookie, 60, f"the write to {g} issued while site-b was frozen")
        h.shutdown()
    for i, g in enumerate(EVAC_GROUPS):
        if etcd.get(f"/tvilling/groups/{g}/leader") != "site-a" or \
                a.group(g).get("role") != "primary":
            raise TestFailure(f"site-a is not the primary of {g} after the aborts")
        h = a.connect(group_volume(g))  # not paused: a write completes
        h.pwrite(bytes([0x61 + i]) * 4096, 1 << 20)
        h.flush()
        h.shutdown()
    for g in EVAC_GROUPS:
        wait_caught_up(a, [b, cc], group=g)
        assert_identical(a, [b, cc], group_volume(g))
    for g, n in (("g0", 1), ("g1", 1), ("g2", 0)):
        hist = ctl(c, a, "history", "--group", g).stdout
        if len(re.findall(r"switchover  refused", hist)) != n or "switchover  ok" in hist:
            raise TestFailure(f"the history of {g} should hold {n} refused switchover(s):\n{hist}")


SCENARIOS = {f.__name__: f for f in (elects_configured_primary, suspends_without_etcd,
                                     two_sites_refuse, etcd_unreachable, switchover_dry_run,
                                     elected_replica_takes_over, manual_promote_demote,
                                     pause_holds_failover,
                                     manual_policy_promote, switchover_there_and_back,
                                     switchover_rolls_back, switchover_under_load_checked,
                                     evacuate_site, evacuate_aborts,
                                     sync_set_degrade_then_failover, sync_set_refuses_outside,
                                     promotion_failure_resigns)}

if __name__ == "__main__":
    if shutil.which("etcd") is None:
        print("etcd not found (Debian package etcd-server)", file=sys.stderr)
        sys.exit(1)
    argv = sys.argv[1:]
    if "--check" in argv:  # tvilling-check, for switchover_under_load_checked
        i = argv.index("--check")
        CHECK = os.path.abspath(argv[i + 1])
        del argv[i:i + 2]
    sys.exit(run_main(SCENARIOS, argv))
