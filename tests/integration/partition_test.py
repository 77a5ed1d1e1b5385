#!/usr/bin/python3
"""partition_test.py: issue 6's acceptance tests for a partitioned primary and for the approve
policy, with three real tvillingd agents and a three-member etcd (the Debian binary), one scenario
per run:

  /usr/bin/python3 partition_test.py --tvillingd T --tvillingctl C --pki make-dev-pki.sh
      [--check tvilling-check] SCENARIO

Scenarios (each is a ctest; see tests/integration/CMakeLists.txt):
  primary_partitioned  Each site (agent and its etcd member) in its own network namespace, joined
                     by a router namespace; site-a primary, async to site-b and site-c. A client
                     (in the root namespace, over the agents' NBD unix sockets) writes at site-a;
                     nft rules in site-a's namespace drop everything to and from the other sites
                     (their agents and etcd members). site-a completes writes the replicas never
                     get, then suspends its I/O; site-b is elected and the client writes there.
                     On one clock (CLOCK_MONOTONIC for the client's completions, the agents'
                     log timestamps for suspension and promotion): the last write site-a completed
                     is before the first write site-b completed, and site-a logged the suspension
                     before site-b logged its promotion. Heal (the rules deleted): site-a sees the
                     newer epoch, its held write fails with ESHUTDOWN (never completed), it rejoins
                     as site-b's replica, `tvillingctl divergent show` lists every write it
                     completed after the fork, and the three volumes are identical.
  approve_reports_loss  policy = "approve" on three sites on 127.0.0.1 (three etcd members),
                     site-a primary, async to site-b and site-c with rate caps so both lag; the
                     checker (tvilling-check) writes, then site-a is killed -9 with its last report
                     current. Nobody is promoted for TTL + settle + 3 s; the candidate's `tvillingctl
                     status` (text and JSON) shows the prepared plan with its loss bound (LSN range,
                     bytes, seconds); approve on the other site is refused; `tvillingctl failover
                     approve` on the candidate promotes it in the new key's epoch; the history shows
                     the approval, who gave it and the plan approved; the candidate's volume misses
                     exactly the bound's records (the checker passes with the bound, fails with one
                     less) and writes work at the new primary, reaching the third site.

Namespaces need root and `ip netns`/`nft`; without them primary_partitioned exits 77 (skipped)
with the reason.
"""

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coordinator_test import EtcdCluster, ctl, log_has  # noqa: E402
from repl_lib import (TestFailure, assert_identical, log, run_main, u64,  # noqa: E402
                      wait_caught_up, wait_for)
from repl_test import qemu_io  # noqa: E402

LEASE_TTL_MS = 3000
SUSPEND_AFTER_MS = 1500
SETTLE_S = 0.5  # core::FailoverOptions::settle as the agent sets it (agent/node/coordination.cc)
SKIP = 77
CHECK = None  # tvilling-check, from --check
BLOCK = 4096
SITES = ("site-a", "site-b", "site-c")
ACL = [(s, s, ["g0"]) for s in SITES]


def sh(*cmd, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise TestFailure(f"{' '.join(cmd)}: rc {r.returncode}: {r.stderr.strip()}")
    return r


# ---- the network: one namespace per site, joined by a router namespace ---------------------------

class Lab:
    """Site i's namespace holds 10.213.<i>.2/24 on a veth whose other end, 10.213.<i>.1, is in the
    router namespace (forwarding on there only: the root namespace is not touched). Every
    namespace (and with it every veth and nft rule in it) is deleted when the cluster closes."""

    def __init__(self, c, n):
        tag = f"{os.getpid() % 100000}"
        self.router = f"tvPr{tag}"
        self.ns = [f"tvP{chr(ord('a') + i)}{tag}" for i in range(n)]
        self.addr = [f"10.213.{i + 1}.2" for i in range(n)]
        for ns in [self.router] + self.ns:
            sh("ip", "netns", "add", ns)
            c.on_exit(lambda ns=ns: subprocess.run(["ip", "netns", "del", ns], timeout=30))
        sh("ip", "-n", self.router, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for i, ns in enumerate(self.ns):
            inner, outer = f"tp{tag}{i}", f"tp{tag}{i}r"
            sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "link", "set", outer, "netns", self.router)
            sh("ip", "-n", ns, "addr", "add", f"{self.addr[i]}/24", "dev", inner)
            sh("ip", "-n", self.router, "addr", "add", f"10.213.{i + 1}.1/24", "dev", outer)
            for where, dev in ((ns, "lo"), (ns, inner), (self.router, outer)):
                sh("ip", "-n", where, "link", "set", dev, "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"10.213.{i + 1}.1")
        for i, ns in enumerate(self.ns):
            other = self.addr[(i + 1) % n]
            wait_for(f"{ns} to reach {other}", lambda ns=ns, other=other: sh(
                "ip", "netns", "exec", ns, "ping", "-c1", "-W1", other, check=False).returncode
                == 0, 10, 0.1)

    def partition(self, i):
        """Site i's namespace drops every packet to and from the other sites."""
        others = ", ".join(a for j, a in enumerate(self.addr) if j != i)
        rules = (f"table inet tvpart {{\n"
                 f"  chain in {{ type filter hook input priority 0; policy accept;\n"
                 f"    ip saddr {{ {others} }} drop\n  }}\n"
                 f"  chain out {{ type filter hook output priority 0; policy accept;\n"
                 f"    ip daddr {{ {others} }} drop\n  }}\n}}\n")
        r = subprocess.run(["ip", "netns", "exec", self.ns[i], "nft", "-f", "-"], input=rules,
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise TestFailure(f"nft in {self.ns[i]}: {r.stderr}")

    def heal(self, i):
        sh("ip", "netns", "exec", self.ns[i], "nft", "delete", "table", "inet", "tvpart")


def netns_usable():
    """'' if namespaces, veth pairs and nft work here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "nft", "ping"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"tvPprobe{os.getpid() % 100000}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"ip netns add: {r.stderr.strip()}"
    try:
        r = subprocess.run(["ip", "netns", "exec", probe, "nft", "list", "ruleset"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return f"nft in a namespace: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], timeout=30)
    return ""


def etcd_in_sites(c, lab):
    """One etcd member per site, in the site's namespace on its address; the test reads from
    site-b's namespace (never partitioned), trying site-b's and site-c's members first (site-a's
    may be cut off: a minority member answers nothing linearizable)."""
    for i, ns in enumerate(lab.ns):
        c.placement[f"etcd-m{i}"] = {"netns": ns, "host": lab.addr[i]}
    return EtcdCluster(c, n=len(lab.ns), reader=1)


def configure(agents, peers_of, endpoints_of, coordinator_extra=""):
    """peers_of(agent) -> [(peer agent, mode, extra)]; endpoints_of(agent) -> [etcd endpoint]."""
    g = {"name": "g0", "primary": "site-a", "size": "64MiB"}
    for agent in agents:
        agent.write_config([dict(g, peers=peers_of(agent))], acl=ACL)
        with open(agent.config_path, "a") as f:
            f.write("\n[coordinator]\nendpoints = [" +
                    ", ".join(f'"{e}"' for e in endpoints_of(agent)) + "]\n"
                    f"lease_ttl_ms = {LEASE_TTL_MS}\nsuspend_after_ms = {SUSPEND_AFTER_MS}\n"
                    "anti_flap_ms = 0\n" + coordinator_extra)


# ---- a client that records when each write completed ---------------------------------------------

class TimedWriter:
    """Writes 4 KiB blocks one at a time (block `first + k`, content naming the writer and k) to one
    site and records the CLOCK_MONOTONIC time each completed. A write still held when the test
    stops it is left behind (its outcome recorded if it comes)."""

    def __init__(self, name, agent_fn, first_block, count, interval_s=0.004):
        self.name, self.agent_fn = name, agent_fn
        self.first, self.count, self.interval = first_block, count, interval_s
        self.done = []  # (k, monotonic completion time)
        self.outcome = None  # how the last write ended, if it did not complete
        self.pending_k = None
        self.stop_flag = False
        self.drain_until = 0.0  # set by stop(): how long a write in flight may still take
        self.error = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def data(self, k):
        head = f"{self.name} write {k} block {self.first + k} ".encode()
        return (head * (BLOCK // len(head) + 1))[:BLOCK]

    def run(self):
        try:
            h = None
            while h is None and not self.stop_flag:
                agent = self.agent_fn()
                if agent is not None:
                    h = agent.connect()
                    if h.is_read_only():  # a promotion makes the exports writable last
                        h.shutdown()
                        h = None
                if h is None:
                    time.sleep(0.05)
            if h is None:
                return
            for k in range(self.count):
                if self.stop_flag:
                    break
                self.pending_k = k
                cookie = h.aio_pwrite(self.data(k), (self.first + k) * BLOCK)
                while True:
                    try:
                        if h.aio_command_completed(cookie):
                            break
                    except nbd.Error as e:
                        self.outcome = e
                        return
                    if self.stop_flag and time.monotonic() >= self.drain_until:
                        return  # stopped with a write still in flight
                    h.poll(20)
                self.done.append((k, time.monotonic()))
                self.pending_k = None
                time.sleep(self.interval)
            h.shutdown()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def start(self):
        self.thread.start()
        return self

    def stop(self, timeout_s=5):
        """Stops after the write in flight, if any, completes or fails (a fence may hold it): the
        volumes compared next must not change under the comparison. A write still in flight after
        most of `timeout_s` is an error (the writer's own outcome when it failed is not)."""
        self.drain_until = time.monotonic() + max(0.0, timeout_s - 1.0)
        self.stop_flag = True
        self.thread.join(timeout_s)
        if self.error:
            raise TestFailure(f"{self.name}: {self.error}")
        if self.thread.is_alive() or (self.pending_k is not None and self.outcome is None):
            raise TestFailure(f"{self.name}: write {self.pending_k} still in flight "
                              f"{timeout_s} s after the writer was stopped")


def primary_among(agents):
    def find():
        for a in agents:
            st = a.try_status()
            for g in (st or {}).get("groups", []):
                if g.get("role") == "primary":
                    return a
        return None
    return find


def first_log_time(agent, pattern, after):
    """The time (seconds since the epoch, the agent's UTC log stamp) of the first log line at or
    after `after` (minus the stamp's millisecond resolution) that matches `pattern`."""
    for line in agent.tail(20000).splitlines():
        if not re.search(pattern, line):
            continue
        try:
            t = datetime.datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=datetime.timezone.utc).timestamp()
        except ValueError:
            continue
        if t >= after - 0.001:
            return t
    raise TestFailure(f"{agent.site}: no log line after the cut matches {pattern!r}")


def logged_after(agent, pattern, after):
    try:
        return first_log_time(agent, pattern, after)
    except TestFailure:
        return None


def read_blocks(agent, first, n):
    h = agent.connect()
    try:
        return [h.pread(BLOCK, (first + k) * BLOCK) for k in range(n)]
    finally:
        h.shutdown()


def divergent_show(c, agent):
    r = subprocess.run([c.tvillingctl, "--state-dir", agent.state_dir, "divergent", "show",
                        "--group", "g0", "--json"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise TestFailure(f"divergent show on {agent.site}: rc {r.returncode}\n{r.stdout}{r.stderr}")
    return json.loads(r.stdout)


# ---- scenario 1: a primary partitioned from etcd and its peers -----------------------------------

def primary_partitioned(c):
    why = netns_usable()
    if why:
        log(f"SKIP primary_partitioned: network namespaces are not usable here: {why}")
        sys.exit(SKIP)
    lab = Lab(c, 3)
    etcd = etcd_in_sites(c, lab).start()
    agents = [c.agent(s, netns=lab.ns[i], host=lab.addr[i]) for i, s in enumerate(SITES)]
    a, b, cc = agents
    members = {ag.site: m.endpoint for ag, m in zip(agents, etcd.members)}
    configure(agents,
              lambda ag: [(p, "async", None) for p in agents if p is not ag],
              # its own site's member first, as a site would list them
              lambda ag: [members[ag.site]] + [e for s, e in members.items() if s != ag.site],
              # the candidates' lag in the last report must not make them ineligible: this test is
              # about the fence, not the gate
              'max_lag = "64MiB"\nmax_lag_ms = 60000\n')
    for ag in (b, cc, a):
        ag.start()
    wait_for("site-a to hold the leader key", lambda: etcd.get("/tvilling/groups/g0/leader")
             == "site-a", 30, 0.2)
    epoch_a = etcd.create_revision("/tvilling/groups/g0/leader")
    wait_for("site-a primary in the key's epoch", lambda: a.group().get("role") == "primary" and
             u64(a.group().get("epoch")) == epoch_a, 15, 0.1)
    qemu_io(a, "write -P 0x5a 32M 1M", "flush")
    wait_caught_up(a, [b, cc])
    wait_for("both replicas consistent in etcd", lambda: all(
        "consistent=1" in etcd.get(f"/tvilling/groups/g0/sites/{s}") for s in ("site-b",
                                                                                "site-c")), 30, 0.2)
    base = u64(a.group().get("last_lsn"))  # writer A's write k gets LSN base + 1 + k
    wa = TimedWriter("A", lambda: a, 0, 3000).start()
    wait_for("writes flowing at site-a", lambda: len(wa.done) > 200 or wa.error, 30, 0.05)
    wait_for("the primary's report to show the replicas", lambda: re.search(
        r"peer\.site-b=\d+.*peer\.site-c=\d+", etcd.get("/tvilling/groups/g0/primary")), 15, 0.2)
    lab.partition(0)
    t_cut = time.monotonic()
    wall_cut = time.time()
    log(f"site-a partitioned (nft drop to and from site-b and site-c) after {len(wa.done)} writes")
    try:
        wb = TimedWriter("B", primary_among([b, cc]), 4096, 2000)
        wb.start()
        wait_for("site-a to suspend client I/O", lambda: logged_after(
            a, r"client I/O suspended", wall_cut), LEASE_TTL_MS / 1000 + 5, 0.05)
        wait_for("a new primary", lambda: etcd.get("/tvilling/groups/g0/leader") in
                 ("site-b", "site-c"), LEASE_TTL_MS / 1000 + SETTLE_S + 10, 0.1)
        leader = etcd.get("/tvilling/groups/g0/leader")
        new = b if leader == "site-b" else cc
        third = cc if new is b else b
        epoch_new = etcd.create_revision("/tvilling/groups/g0/leader")
        wait_for(f"{new.site}'s writer to complete writes", lambda: len(wb.done) > 100 or
                 wb.error, 20, 0.05)
        if wb.error:
            raise TestFailure(f"writer B: {wb.error}")
        time.sleep(1.0)  # more writes at the new primary while site-a is still cut off
    finally:
        lab.heal(0)
    log("partition healed (nft rules deleted)")
    # Timestamps on one clock: the client's completions (CLOCK_MONOTONIC), the agents' logs (UTC).
    a_after = [(k, t) for k, t in wa.done if t > t_cut]
    if not a_after:
        raise TestFailure("site-a completed no write after the partition: no divergent tail "
                          "to check (it must, in async mode, until it suspends)")
    last_a = max(t for _, t in wa.done)
    first_new = min(t for _, t in wb.done)
    if not last_a < first_new:
        raise TestFailure(f"site-a completed a write {last_a - first_new:.3f} s after "
                          f"{new.site} completed its first: two primaries at once")
    t_susp = first_log_time(a, r"client I/O suspended", wall_cut) - wall_cut
    t_prom = first_log_time(new, r"this site is primary in epoch %d" % epoch_new,
                            wall_cut) - wall_cut
    log(f"MEASURED after the cut: site-a completed {len(a_after)} more writes, its last "
        f"{last_a - t_cut:.3f} s (client), logged the suspension {t_susp:.3f} s; {new.site} logged "
        f"its promotion in epoch {epoch_new} {t_prom:.3f} s, completed its first write "
        f"{first_new - t_cut:.3f} s (client); gap {first_new - last_a:.3f} s")
    if not t_susp < t_prom:
        raise TestFailure(f"site-a logged its suspension {t_susp:.3f} s after the cut, not before "
                          f"{new.site}'s promotion ({t_prom:.3f} s)")
    if epoch_new <= epoch_a:
        raise TestFailure(f"the new epoch {epoch_new} is not above site-a's {epoch_a}")
    # Heal: site-a learns of the newer epoch, fails its held write, rejoins as a replica.
    wait_for("site-a to follow the new primary", lambda: log_has(
        a, r"primary is %s \(etcd epoch %d\)" % (new.site, epoch_new)), 30, 0.2)
    wait_for("site-a's held write to end", lambda: wa.outcome is not None or
             not wa.thread.is_alive(), 15, 0.1)
    if wa.pending_k is None or wa.outcome is None:
        raise TestFailure(f"site-a's writer has no held write that failed (pending "
                          f"{wa.pending_k}, outcome {wa.outcome})")
    if "ESHUTDOWN" not in str(wa.outcome) and getattr(wa.outcome, "errno", None) != 108:
        raise TestFailure(f"site-a's held write failed with {wa.outcome}, not ESHUTDOWN")
    log(f"site-a's held write {wa.pending_k} failed: {wa.outcome}")
    wb.stop(timeout_s=30)
    wa.stop()
    if max(t for _, t in wa.done) != last_a:
        raise TestFailure("site-a completed writes after the heal, as a demoted primary")
    wait_for("site-a a replica", lambda: a.group().get("role") == "replica", 15, 0.2)
    wait_caught_up(new, [a, third], timeout_s=60)
    if u64(a.group().get("epoch")) != epoch_new:
        raise TestFailure(f"site-a's log is not in the new epoch {epoch_new}: {a.group()}")
    assert_identical(new, [a, third])
    check_divergent(c, a, new, wa, base, epoch_a)
    check_new_writes(new, wb)
    check_audited(etcd, a, new)


def check_audited(etcd, a, new):
    """Both role switches are in the audit log in etcd: the new primary's promotion and the old
    primary's demotion, which it made right after the heal, when its own etcd member may still have
    been rejoining (a record etcd does not take is tried again until it does)."""
    def records():
        out = etcd.ctl("get", "--prefix", "--print-value-only", "/tvilling/groups/g0/audit/",
                       check=False) or ""
        recs = []
        for line in out.splitlines():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return recs

    def switched(recs, site, action):
        return any(r.get("site") == site and r.get("action") == action for r in recs)

    recs = wait_for("the audit records of both role switches in etcd", lambda: (
        lambda rs: rs if switched(rs, a.site, "demoted") and switched(rs, new.site, "promoted")
        else None)(records()), 40, 0.5)
    log(f"audit log in etcd: {len(recs)} record(s), {a.site}'s demotion and {new.site}'s "
        f"promotion among them")


def check_divergent(c, a, new, wa, base, epoch_a):
    """site-a's saved tail holds every write it completed after the fork (with its offset), and
    the converged volumes hold exactly site-a's writes up to the fork."""
    files = divergent_show(c, a)["files"]
    if len(files) != 1:
        raise TestFailure(f"expected one divergent file on site-a, got {files}")
    f = files[0]
    fork, recs = f["fork_lsn"], f["records"]
    lsns = [r["lsn"] for r in recs]
    if not f["complete"] or lsns != list(range(fork + 1, fork + 1 + len(recs))):
        raise TestFailure(f"divergent file not complete and dense after fork {fork}: "
                          f"{json.dumps(f)[:600]}")
    by_lsn = {r["lsn"]: r for r in recs}
    after = [k for k, _ in wa.done if base + 1 + k > fork]
    if not after:
        raise TestFailure(f"site-a completed no write after the fork at LSN {fork}")
    for k in after:
        r = by_lsn.get(base + 1 + k)
        if r is None or (r["offset"], r["length"], r["epoch"], r["checksum_ok"]) != \
                (k * BLOCK, BLOCK, epoch_a, True):
            raise TestFailure(f"site-a's completed write {k} (LSN {base + 1 + k}, offset "
                              f"{k * BLOCK}) is not in its divergent file as saved: {r}")
    extra = len(recs) - len(after)
    log(f"site-a saved records {fork + 1}..{fork + len(recs)} of epoch {epoch_a} to {f['path']}: "
        f"its {len(after)} writes completed after the fork, and {extra} in its log whose "
        f"completion was held")
    if extra < 0 or extra > 64:
        raise TestFailure(f"{extra} saved records are not writes site-a completed")
    # The converged volumes: site-a's writes up to the fork, zeros after it (restored from the new
    # primary, which never wrote there).
    n = max(k for k, _ in wa.done) + 2
    blocks = read_blocks(new, 0, n)
    for k in range(n):
        want = wa.data(k) if base + 1 + k <= fork else b"\0" * BLOCK
        if blocks[k] != want:
            raise TestFailure(f"{new.site}: block {k} (LSN {base + 1 + k}, fork {fork}) is not "
                              f"{'site-a write' if base + 1 + k <= fork else 'zeros'}")


def check_new_writes(new, wb):
    blocks = read_blocks(new, wb.first, len(wb.done))
    for i, (k, _) in enumerate(wb.done):
        if blocks[i] != wb.data(k):
            raise TestFailure(f"{new.site}: the new primary's completed write {k} is missing")
    log(f"{new.site}: all {len(wb.done)} writes it completed are there")


# ---- scenario 2: the approve policy --------------------------------------------------------------

def check_verify(log_path, image, mode, bound=None, expect=0):
    cmd = [CHECK, "verify", "--log", log_path, "--image", image, "--mode", mode]
    if bound is not None:
        cmd += ["--loss-bound", str(bound)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    log(f"tvilling-check verify --mode {mode}" + (f" --loss-bound {bound}" if bound is not None
                                                 else "") + f": rc {r.returncode} "
        f"{r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ''}")
    if r.returncode != expect:
        raise TestFailure(f"verify ({mode}, bound {bound}) exited {r.returncode}, expected "
                          f"{expect}:\n{r.stdout[-3000:]}{r.stderr}")
    return r.stdout


def approve_reports_loss(c):
    if CHECK is None:
        raise TestFailure("approve_reports_loss needs --check (tvilling-check)")
    etcd = EtcdCluster(c).start()
    a, b, cc = agents = [c.agent(s) for s in SITES]
    # site-a's links are rate-capped, so both replicas lag behind the writes.
    configure(agents,
              lambda ag: [(p, "async", {"rate_limit": '"1MiB"', "compression": '"none"'}
                           if ag is a else None) for p in agents if p is not ag],
              lambda ag: etcd.endpoints,
              # a lag gate wide enough for the lag the rate caps build up (else: no candidate)
              'policy = "approve"\nmax_lag = "1GiB"\nmax_lag_ms = 600000\n')
    for ag in (b, cc, a):
        ag.start()
    wait_for("site-a primary", lambda: a.group().get("role") == "primary", 30, 0.2)
    wait_for("both replicas streaming", lambda: all(
        (a.peer(s) or {}).get("link_state") == "streaming" for s in ("site-b", "site-c")), 30, 0.2)
    wait_for("both replicas consistent in etcd", lambda: all(
        "consistent=1" in etcd.get(f"/tvilling/groups/g0/sites/{s}") for s in ("site-b",
                                                                                "site-c")), 30, 0.2)
    log_path = os.path.join(c.tmp, "writer.log")
    r = subprocess.run([CHECK, "write", "--uri", a.uri(), "--size", str(16 << 20), "--qd", "4",
                        "--duration", "2", "--log", log_path, "--seed", "11"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise TestFailure(f"tvilling-check write: rc {r.returncode}\n{r.stdout}{r.stderr}")
    log(f"writer: {r.stdout.strip()}")
    last = u64(a.group().get("last_lsn"))
    # The bound is as of the primary's last report (published every second): kill once it shows
    # the last LSN, with both replicas still behind.
    report = wait_for("the primary's report of the last LSN", lambda: (lambda rep: rep if
                      f" last={last} " in rep + " " else None)(
                          etcd.get("/tvilling/groups/g0/primary")), 10, 0.1)
    lag = {s: u64(a.peer(s).get("durable_lsn")) for s in ("site-b", "site-c")}
    if not all(v < last for v in lag.values()):
        raise TestFailure(f"a replica caught up before the kill (last {last}, durable {lag}): "
                          f"no loss to bound")
    a.kill9()
    t_kill = time.monotonic()
    log(f"site-a killed (-9) at LSN {last}; replicas' durable LSNs {lag}; report: {report}")
    # No promotion on its own: the candidate publishes its plan and waits.
    hold_s = LEASE_TTL_MS / 1000 + SETTLE_S + 3
    pending = ""
    while time.monotonic() - t_kill < hold_s:
        if etcd.get("/tvilling/groups/g0/leader") not in ("", "site-a") or any(
                ag.group().get("role") != "replica" for ag in (b, cc)):
            raise TestFailure(f"a site was promoted without approval "
                              f"{time.monotonic() - t_kill:.1f} s after the kill")
        pending = etcd.get("/tvilling/groups/g0/pending")
        time.sleep(0.2)
    if not pending:
        raise TestFailure(f"no plan in etcd {hold_s:.0f} s after the kill")
    log(f"no promotion for {hold_s:.0f} s (TTL + settle + 3 s) after the kill; pending: {pending}")
    # The candidate: the most advanced replica (ties: the smaller name).
    held = {ag.site: u64(ag.group().get("last_lsn")) for ag in (b, cc)}
    cand, other = (b, cc) if held["site-b"] >= held["site-c"] else (cc, b)
    if not pending.startswith(f"site={cand.site} "):
        raise TestFailure(f"the pending plan is not {cand.site}'s (logs {held}): {pending!r}")
    if not log_has(cand, r"waiting for `tvillingctl failover approve --group g0 --site %s`"
                   % cand.site):
        raise TestFailure(f"{cand.site} did not log its plan")
    # The plan with its loss bound, in the candidate's status (JSON and text).
    gs = cand.group()
    have = held[cand.site]
    want = (have + 1, last)
    got = (u64(gs.get("failover_pending_loss_from_lsn")),
           u64(gs.get("failover_pending_loss_to_lsn")))
    if gs.get("coordinator_state") != "awaiting-approval" or \
            f"promote {cand.site} (loses LSN {want[0]}..{want[1]}" not in \
            gs.get("failover_pending", "") or got != want or \
            u64(gs.get("failover_pending_loss_bytes")) < (last - have) * BLOCK or \
            not gs.get("failover_pending_loss_seconds", 0) > 0:
        raise TestFailure(f"{cand.site}'s status does not show the plan with the loss bound "
                          f"LSN {want[0]}..{want[1]} ({cand.site} holds {have}, site-a wrote "
                          f"{last}): {json.dumps(gs)}")
    text = ctl(c, cand, "status").stdout
    m = re.search(r"promotion pending approval: .*loses LSN (\d+)\.\.(\d+), (\d+) bytes, "
                  r"[\d.]+ s of writes.*failover approve", text)
    if not m or (int(m.group(1)), int(m.group(2))) != want:
        raise TestFailure(f"{cand.site}'s status text does not show the plan:\n{text}")
    # The bound covers exactly what is missing at the candidate (every record is one 4 KiB write
    # of the checker): verify passes with it, and fails with one record less.
    bound = want[1] - want[0] + 1
    check_verify(log_path, cand.uri(), "sync", expect=1)
    out = check_verify(log_path, cand.uri(), "async", bound)
    missing = int(re.search(r"async: (\d+) completed writes missing", out).group(1))
    if missing != bound:
        raise TestFailure(f"{cand.site} misses {missing} completed writes, the plan says {bound}")
    check_verify(log_path, cand.uri(), "async", bound - 1, expect=1)
    # Approval: refused on the site that is not the candidate, carried out on the candidate.
    r = ctl(c, other, "failover", "approve", "--group", "g0")
    if r.returncode != 3 or f"no promotion of {other.site} is pending" not in r.stderr:
        raise TestFailure(f"approve on {other.site} (not the candidate) was not refused (exit 3)")
    r = ctl(c, cand, "failover", "approve", "--group", "g0")
    if r.returncode != 0 or f"loses LSN {want[0]}..{want[1]}" not in r.stdout:
        raise TestFailure(f"approve on {cand.site} failed or did not say what it approved")
    t_approve = time.monotonic()
    wait_for(f"{cand.site} primary", lambda: cand.group().get("role") == "primary", 15, 0.05)
    epoch = etcd.create_revision("/tvilling/groups/g0/leader")
    if etcd.get("/tvilling/groups/g0/leader") != cand.site or \
            u64(cand.group().get("epoch")) != epoch:
        raise TestFailure(f"{cand.site} is not primary in the leader key's epoch {epoch}")
    log(f"MEASURED {cand.site} primary {time.monotonic() - t_approve:.2f} s after the approval")
    wait_for("the pending plan to go from etcd", lambda: etcd.get(
        "/tvilling/groups/g0/pending") == "", 5, 0.1)
    hist = ctl(c, cand, "history", "--group", "g0").stdout
    if not re.search(r"g0  approve  requested  by \S+ \(uid \d+\) at %s \([^)]*\): .*"
                     r"loses LSN %d\.\.%d" % (cand.site, *want), hist) or \
            not re.search(r"g0  promoted  ok  by coordinator at %s" % cand.site, hist):
        raise TestFailure(f"{cand.site}'s history lacks the approval with who and the plan:\n"
                          f"{hist}")
    qemu_io(cand, "write -P 0x6b 20M 1M", "flush")
    qemu_io(cand, "read -P 0x6b 20M 1M", read_only=True)
    wait_for(f"{other.site} to follow {cand.site}", lambda: log_has(
        other, r"primary is %s" % cand.site), 15, 0.2)
    wait_caught_up(cand, [other], timeout_s=60)
    assert_identical(cand, [other])


SCENARIOS = {f.__name__: f for f in (primary_partitioned, approve_reports_loss)}

if __name__ == "__main__":
    if shutil.which("etcd") is None:
        print("etcd not found (Debian package etcd-server)", file=sys.stderr)
        sys.exit(1)
    argv = sys.argv[1:]
    if "--check" in argv:
        i = argv.index("--check")
        CHECK = os.path.abspath(argv[i + 1])
        del argv[i:i + 2]
    sys.exit(run_main(SCENARIOS, argv))
