#!/usr/bin/python3
"""metrics_test.py: tvillingd's /metrics during a real replication run (two agents, mutual TLS).

  /usr/bin/python3 metrics_test.py --tvillingd T --tvillingctl C --pki make-dev-pki.sh replication
  /usr/bin/python3 metrics_test.py parser_rejects     (the strict parser refuses broken input)

replication: site-a (primary) ships g0 to site-b (async, rate-capped at 2 MiB/s so that lag builds
up). Every scrape is parsed strictly (prom_parse.py) and, where Debian's promtool is installed,
checked with `promtool check metrics`. While 2 MiB writes arrive every 0.25 s (faster than the cap)
the peer's lag in records, bytes and seconds must be non-zero and move; after a FLUSH it must fall
to zero with the peer's durable LSN at the primary's last LSN, the RPO bound zero, and the metrics
agreeing with `tvillingctl status --json`. Client I/O counters count exactly the bytes written; a
write to the replica's read-only export is counted as an error by code; once the replica is
stopped the link metrics show it down.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prom_parse  # noqa: E402
from repl_lib import MIB, TestFailure, free_port, log, run_main, u64, wait_for  # noqa: E402

PROMTOOL = shutil.which("promtool")
# 2 MiB every 0.25 s (8 MiB/s) against a 2 MiB/s cap with a 4 MiB burst: lag from about 0.7 s on.
WRITES = 12


def enable_metrics(agent):
    agent.metrics_port = free_port()
    with open(agent.config_path, "a") as f:
        f.write(f'[metrics]\nlisten = "127.0.0.1:{agent.metrics_port}"\n')


def scrape(agent):
    url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        if r.status != 200:
            raise TestFailure(f"{url}: HTTP {r.status}")
        ctype = r.headers.get("Content-Type", "")
        if not ctype.startswith("text/plain; version=0.0.4"):
            raise TestFailure(f"{url}: Content-Type {ctype!r}")
        text = r.read().decode("utf-8")
    try:
        fams = prom_parse.parse(text)
    except prom_parse.ParseError as e:
        raise TestFailure(f"{agent.site}'s /metrics does not parse: {e}\n{text[:2000]}")
    if PROMTOOL:
        p = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
        if p.returncode != 0:
            raise TestFailure(f"promtool check metrics on {agent.site}: {p.stdout}{p.stderr}")
    return fams


def v(fams, name, **labels):
    x = prom_parse.value(fams, name, **labels)
    if x is None:
        raise TestFailure(f"no series {name}{labels}")
    return x


DEPLOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "deploy")
USED_FILES = [os.path.join(DEPLOY, "prometheus", "tvilling.rules.yml"),
              os.path.join(DEPLOY, "grafana", "tvilling.json")]
# Series that exist only once something happened (an error series appears with its first error).
# The coordinator's series exist only with a [coordinator] (integration.coordinator.* scrape them).
APPEAR_LATER = {"tvilling_client_io_errors_total", "tvilling_group_coordinator_state",
                "tvilling_group_leader_epoch", "tvilling_group_failover_refused",
                "tvilling_group_failover_paused"}


def check_names_used(scraped):
    """Every tvilling_* name in the alert rules and the dashboard is one the agents export."""
    known = set()
    for fams in scraped:
        for name, fam in fams.items():
            known.add(name)
            if fam["type"] == "histogram":
                known.update(name + s for s in ("_bucket", "_count", "_sum"))
    known |= APPEAR_LATER
    for path in USED_FILES:
        with open(path) as f:
            used = set(re.findall(r"\btvilling_[a-z0-9_]+", f.read()))
        unknown = sorted(used - known)
        if unknown:
            raise TestFailure(f"{os.path.relpath(path, DEPLOY)} uses metrics no agent exports: "
                              f"{unknown}")
        log(f"{os.path.relpath(path, DEPLOY)}: all {len(used)} metric names exist")


def lag(fams):
    return (v(fams, "tvilling_peer_lag_records", group="g0", peer="site-b"),
            v(fams, "tvilling_peer_lag_bytes", group="g0", peer="site-b"),
            v(fams, "tvilling_peer_lag_seconds", group="g0", peer="site-b"))


def replication(c):
    a = c.agent("site-a")
    b = c.agent("site-b")
    g = {"name": "g0", "primary": "site-a", "size": "64MiB"}
    a.write_config([dict(g, peers=[(b, "async", {"rate_limit": '"2MiB"'})])],
                   acl=[("site-b", "site-b", ["g0"])])
    b.write_config([dict(g, peers=[(a, "async", None)])], acl=[("site-a", "site-a", ["g0"])])
    enable_metrics(a)
    enable_metrics(b)
    b.start()
    a.start()
    wait_for("the link to stream", lambda: (a.peer("site-b") or {}).get("link_state")
             == "streaming", 30)

    fams = scrape(a)
    for name in ["tvilling_agent_info", "tvilling_group_epoch", "tvilling_group_last_lsn",
                 "tvilling_group_durable_lsn", "tvilling_group_applied_lsn", "tvilling_log_bytes",
                 "tvilling_log_retained_records", "tvilling_log_fsync_duration_seconds",
                 "tvilling_client_io_duration_seconds", "tvilling_peer_rtt_seconds",
                 "tvilling_peer_window_bytes", "tvilling_peer_delivery_rate_bytes_per_second",
                 "tvilling_peer_copy_done_bytes",
                 "tvilling_group_rpo_bound_seconds", "tvilling_nbd_connections_total"]:
        if name not in fams:
            raise TestFailure(f"site-a's /metrics has no {name}")
    if v(fams, "tvilling_group_role", group="g0", role="primary") != 1:
        raise TestFailure("site-a is not reported primary")
    if v(fams, "tvilling_peer_up", group="g0", peer="site-b") != 1:
        raise TestFailure("site-a's link to site-b is not reported up")
    if v(fams, "tvilling_agent_info", version="0.1.0") != 1:
        raise TestFailure("tvilling_agent_info lacks the version")

    # Writes faster than the 2 MiB/s cap: the lag must build up and move while they arrive.
    h = a.connect()
    block = os.urandom(2 * MIB)  # incompressible: lz4 cannot beat the cap
    samples = []
    try:
        for i in range(WRITES):
            h.pwrite(block, i * 2 * MIB)
            time.sleep(0.25)
            samples.append(lag(scrape(a)))
        log(f"lag while writing (records, bytes, seconds): {samples}")
        if not any(s[0] > 0 and s[1] > 0 and s[2] > 0 for s in samples):
            raise TestFailure(f"the lag never showed while writing faster than the cap: {samples}")
        if len({s[1] for s in samples}) < 2:
            raise TestFailure(f"lag_bytes did not move while writing: {samples}")
        h.flush()
    finally:
        h.shutdown()

    # After the FLUSH the peer catches up (at 2 MiB/s, about 6 s): every lag metric falls to 0.
    def caught_up():
        f = scrape(a)
        return f if lag(f) == (0, 0, 0) else None
    fams = wait_for("site-b's lag metrics to fall to zero", caught_up, 60, 0.25)
    last = v(fams, "tvilling_group_last_lsn", group="g0")
    if last < WRITES:
        raise TestFailure(f"last LSN {last} after {WRITES} writes")
    if v(fams, "tvilling_peer_durable_lsn", group="g0", peer="site-b") != last:
        raise TestFailure("the peer's durable LSN is not the last LSN although lag is 0")
    # The replica's applied LSN rides on its acks (no message of its own): once idle, the primary
    # must still learn that the last record was applied.
    wait_for("site-a to see site-b's applied LSN reach the last LSN", lambda: v(
        scrape(a), "tvilling_peer_applied_lsn", group="g0", peer="site-b") == last, 15, 0.25)
    # The delivery-rate estimate the window is sized from: measured from the acknowledgements.
    if not v(fams, "tvilling_peer_delivery_rate_bytes_per_second", group="g0", peer="site-b") > 0:
        raise TestFailure("no delivery rate was measured for site-b after it caught up")
    for name in ["tvilling_group_rpo_bound_records", "tvilling_group_rpo_bound_bytes",
                 "tvilling_group_rpo_bound_seconds"]:
        if v(fams, name, group="g0") != 0:
            raise TestFailure(f"{name} is not 0 once the only peer caught up")
    status = a.group()
    if u64(status["last_lsn"]) != last:
        raise TestFailure(f"metrics say last LSN {last}, tvillingctl {status['last_lsn']}")
    written = v(fams, "tvilling_client_io_bytes_total", group="g0", volume="vol0", op="write")
    if written != WRITES * 2 * MIB:
        raise TestFailure(f"client write bytes {written}, want {WRITES * 2 * MIB}")
    if v(fams, "tvilling_client_io_duration_seconds_count", group="g0", volume="vol0",
         op="flush") < 1:
        raise TestFailure("the FLUSH was not counted")
    if v(fams, "tvilling_log_fsync_duration_seconds_count", group="g0") < 1:
        raise TestFailure("no fsync was counted although a FLUSH completed")
    if v(fams, "tvilling_log_appended_records_total", group="g0") < WRITES:
        raise TestFailure("the log counted fewer appended records than writes")
    if v(fams, "tvilling_log_appended_bytes_total", group="g0") < WRITES * 2 * MIB:
        raise TestFailure("the log counted fewer appended bytes than were written")
    if not 1 <= v(fams, "tvilling_log_commits_total", group="g0") <= v(
            fams, "tvilling_log_appended_records_total", group="g0"):
        raise TestFailure("log commits not between 1 and the number of records")

    # What site-a sent on the link: every record at least once, incompressible data not shrunk.
    sent_records = v(fams, "tvilling_peer_sent_records_total", group="g0", peer="site-b")
    log_bytes = v(fams, "tvilling_peer_sent_log_bytes_total", group="g0", peer="site-b")
    wire_bytes = v(fams, "tvilling_peer_sent_wire_bytes_total", group="g0", peer="site-b")
    batches = v(fams, "tvilling_peer_sent_batches_total", group="g0", peer="site-b")
    log(f"sent: {batches:.0f} batches, {sent_records:.0f} records, {log_bytes:.0f} log bytes, "
        f"{wire_bytes:.0f} wire bytes")
    if sent_records < last or log_bytes < WRITES * 2 * MIB:
        raise TestFailure(f"site-a counted {sent_records} records / {log_bytes} bytes sent, "
                          f"fewer than the {last} records / {WRITES * 2 * MIB} bytes written")
    if not 1 <= batches <= sent_records:
        raise TestFailure(f"{batches} batches for {sent_records} records")
    read_back = v(fams, "tvilling_peer_sent_records_read_back_total", group="g0", peer="site-b")
    if not 0 <= read_back <= sent_records:
        raise TestFailure(f"{read_back} records read back of {sent_records} sent")
    if not log_bytes <= wire_bytes <= 1.01 * log_bytes + 4096 * batches:
        raise TestFailure(f"random data went out as {wire_bytes} wire bytes for {log_bytes} "
                          "log bytes (no compression can shrink it; overhead must be small)")
    if v(fams, "tvilling_peer_rate_limit_bytes_per_second", group="g0", peer="site-b") != 2 * MIB:
        raise TestFailure("tvilling_peer_rate_limit_bytes_per_second is not the configured 2 MiB")
    if v(fams, "tvilling_peer_dials_total", group="g0", peer="site-b") < 1:
        raise TestFailure("no dial counted although the link streamed")

    # The replica: its role, its applied LSN, and a refused write counted by code.
    def replica_applied():
        f = scrape(b)
        return f if v(f, "tvilling_group_applied_lsn", group="g0") == last else None
    fb = wait_for("site-b to report the last LSN applied", replica_applied, 30, 0.25)
    if v(fb, "tvilling_group_role", group="g0", role="replica") != 1:
        raise TestFailure("site-b is not reported replica")
    if v(fb, "tvilling_group_consistent", group="g0") != 1:
        raise TestFailure("site-b is not reported consistent")
    # What the replica received, counted by its own log.
    if v(fb, "tvilling_log_appended_bytes_total", group="g0") < WRITES * 2 * MIB:
        raise TestFailure("site-b's log counted fewer bytes than site-a's client wrote")
    hb = b.connect()
    hb.set_strict_mode(0)  # libnbd would refuse the write itself; let the agent refuse it
    try:
        hb.pwrite(b"x" * 4096, 0)
        raise TestFailure("a write to the replica's export succeeded")
    except Exception as e:  # nbd.Error: refused, as it must be
        if isinstance(e, TestFailure):
            raise
    finally:
        hb.shutdown()
    fb = scrape(b)
    # The frontend refuses a write to a read-only export before it reaches the volume.
    if v(fb, "tvilling_nbd_request_errors_total") < 1:
        raise TestFailure("the refused write to the replica is not in "
                          "tvilling_nbd_request_errors_total")

    check_names_used([fams, fb])

    # The replica goes away: the primary reports the link down.
    b.stop()
    fams = wait_for("site-a to report the link down",
                    lambda: (lambda f: f if v(f, "tvilling_peer_up", group="g0", peer="site-b")
                             == 0 else None)(scrape(a)), 30, 0.25)
    if v(fams, "tvilling_peer_link_state", group="g0", peer="site-b", state="streaming") != 0:
        raise TestFailure("link_state still says streaming after the replica stopped")
    log(f"promtool: {'checked every scrape' if PROMTOOL else 'not installed; strict parser only'}")


def sent_rate(a, seconds):
    """Wire bytes per second sent to site-b over `seconds`, from the primary's counter."""
    def wire():
        return v(scrape(a), "tvilling_peer_sent_wire_bytes_total", group="g0", peer="site-b")
    w0, t0 = wire(), time.monotonic()
    time.sleep(seconds)
    w1, t1 = wire(), time.monotonic()
    return (w1 - w0) / (t1 - t0)


def rate_reload(c):
    """SIGHUP applies a changed rate_limit to the running link (no redial); a broken file on
    SIGHUP changes nothing and the agent keeps serving."""
    a = c.agent("site-a")
    b = c.agent("site-b")
    g = {"name": "g0", "primary": "site-a", "size": "128MiB"}
    acl_a = [("site-b", "site-b", ["g0"])]

    def config_a(rate):
        a.write_config([dict(g, peers=[(b, "async", {"rate_limit": f'"{rate}"',
                                                     "compression": '"none"'})])], acl=acl_a)
        if not hasattr(a, "metrics_port"):
            enable_metrics(a)
        else:  # the same port: the running agent keeps its listener
            with open(a.config_path, "a") as f:
                f.write(f'[metrics]\nlisten = "127.0.0.1:{a.metrics_port}"\n')

    config_a("1MiB")
    b.write_config([dict(g, peers=[(a, "async", None)])], acl=[("site-a", "site-a", ["g0"])])
    b.start()
    a.start()
    wait_for("the link to stream", lambda: (a.peer("site-b") or {}).get("link_state")
             == "streaming", 30)
    h = a.connect()
    try:
        # 96 MiB of random data: at 1 MiB/s the link is busy for the whole test.
        for i in range(48):
            h.pwrite(os.urandom(2 * MIB), i * 2 * MIB)
        h.flush()
    finally:
        h.shutdown()
    dials = v(scrape(a), "tvilling_peer_dials_total", group="g0", peer="site-b")
    slow = sent_rate(a, 3)
    log(f"at rate_limit 1MiB: {slow / MIB:.2f} MiB/s on the wire")
    if not 0.5 * MIB <= slow <= 1.5 * MIB:
        raise TestFailure(f"sent {slow / MIB:.2f} MiB/s with rate_limit 1MiB")

    # A broken file: nothing changes, the agent stays up and says why.
    with open(a.config_path, "a") as f:
        f.write("[replication\n")
    os.kill(a.proc.pid, signal.SIGHUP)
    wait_for("site-a to log the refused reload", lambda: "not reloaded" in a.tail(20), 10)
    if a.proc.poll() is not None:
        raise TestFailure("site-a exited on a SIGHUP with a broken config")
    if v(scrape(a), "tvilling_peer_rate_limit_bytes_per_second", group="g0",
         peer="site-b") != MIB:
        raise TestFailure("a broken config file changed the rate cap")

    config_a("8MiB")
    os.kill(a.proc.pid, signal.SIGHUP)
    wait_for("site-a to apply the new rate cap", lambda: v(
        scrape(a), "tvilling_peer_rate_limit_bytes_per_second", group="g0",
        peer="site-b") == 8 * MIB, 10)
    fast = sent_rate(a, 3)
    log(f"after SIGHUP with rate_limit 8MiB: {fast / MIB:.2f} MiB/s on the wire")
    if fast < 3 * slow or fast > 8 * 1.5 * MIB:
        raise TestFailure(f"sent {fast / MIB:.2f} MiB/s after raising the cap to 8 MiB/s "
                          f"(was {slow / MIB:.2f})")
    if v(scrape(a), "tvilling_peer_dials_total", group="g0", peer="site-b") != dials:
        raise TestFailure("the reload redialled the link (it must keep the stream)")
    if "rate_limit 1048576 -> 8388608" not in a.tail(200):
        raise TestFailure("the reload did not log the changed rate")


def parser_rejects(_c=None):
    good = ('# HELP tvilling_a_total A.\n# TYPE tvilling_a_total counter\n'
            'tvilling_a_total{site="s"} 1\n')
    prom_parse.parse(good)
    bad = {
        "no TYPE": 'tvilling_b{site="s"} 1\n',
        "counter without _total": '# TYPE tvilling_c counter\ntvilling_c{site="s"} 1\n',
        "bad value": '# TYPE tvilling_d gauge\ntvilling_d{site="s"} one\n',
        "bad escape": '# TYPE tvilling_e gauge\ntvilling_e{site="s\\x"} 1\n',
        "duplicate": '# TYPE tvilling_f gauge\ntvilling_f{site="s"} 1\ntvilling_f{site="s"} 2\n',
        "no site": '# TYPE tvilling_g gauge\ntvilling_g 1\n',
        "no newline at end": '# TYPE tvilling_h gauge\ntvilling_h{site="s"} 1',
        "second TYPE": '# TYPE tvilling_i gauge\n# TYPE tvilling_i gauge\n',
        "histogram not cumulative": '# TYPE tvilling_j histogram\n'
        'tvilling_j_bucket{site="s",le="1"} 5\ntvilling_j_bucket{site="s",le="+Inf"} 4\n'
        'tvilling_j_count{site="s"} 4\ntvilling_j_sum{site="s"} 1\n',
        "histogram without +Inf": '# TYPE tvilling_k histogram\n'
        'tvilling_k_bucket{site="s",le="1"} 1\ntvilling_k_count{site="s"} 1\n'
        'tvilling_k_sum{site="s"} 1\n',
        "+Inf != count": '# TYPE tvilling_l histogram\n'
        'tvilling_l_bucket{site="s",le="+Inf"} 2\ntvilling_l_count{site="s"} 3\n'
        'tvilling_l_sum{site="s"} 1\n',
    }
    for what, text in bad.items():
        try:
            prom_parse.parse(text)
        except prom_parse.ParseError:
            continue
        raise TestFailure(f"the parser accepted an exposition with {what}")
    log(f"the parser refused all {len(bad)} broken expositions")


if __name__ == "__main__":
    if sys.argv[1:] == ["parser_rejects"]:
        try:
            parser_rejects()
        except TestFailure as e:
            log(f"FAIL parser_rejects: {e}")
            sys.exit(1)
        log("PASS parser_rejects")
        sys.exit(0)
    sys.exit(run_main({"replication": replication, "rate_reload": rate_reload}))
