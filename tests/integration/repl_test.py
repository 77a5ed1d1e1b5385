#!/usr/bin/python3
"""repl_test.py: replication between real tvillingd agents over mutual TLS, one scenario per run.

  /usr/bin/python3 repl_test.py --tvillingd T --tvillingctl C --pki deploy/pki/make-dev-pki.sh
      [--probe tests/tools/repl_probe] SCENARIO

Scenarios (each is a ctest; see tests/integration/CMakeLists.txt):
  two_sites_sync     A -> B sync over TLS: qemu-io patterns, fio randwrite, flush; B's volume becomes
                     byte-identical once B reports the LSN applied; B's export is read-only
  three_sites        A -> B sync and A -> C async; both identical
  sync_waits_for_peer  a WRITE in sync mode does not complete while the sync peer is stopped
                     (SIGSTOP), and completes once it runs again; async mode does not wait
  replica_kill9      kill -9 of the replica mid-stream under load, restart, identical
  full_copy_new_replica  a replica that joins late (after data was written) gets a full copy while
                     writes continue, is inconsistent until it completes, then identical
  sparse_copy_keeps_link  the full copy of a 1 TiB thin volume (holes sent unread as "zero"
                     chunks) takes about a second and keeps the link's heartbeats going: no disconnect,
                     nothing sent twice, the replica's volume as thin as the primary's
  peer_back_after_outage  a replica away for 20 s streams again at the primary's next dial after
                     it is back (no dials failing with gRPC's stale "Connection refused")
  behind_retention   a replica that fell behind the primary's hard cap gets a full copy, identical
  reconnect_after_copy  a replica that got a full copy with base L0 > 0 (of a primary whose history
                     has two epochs) streams again after its restarts (SIGTERM, kill -9) and after
                     the primary's restart: never refused as diverged, no second copy, identical
  refuse_wrong_ca, refuse_expired_cert, refuse_other_tenant, refuse_stale_epoch,
  refuse_diverged    each refusal seen with its reason, and no data accepted (refuse_diverged with
                     on_divergence = "refuse"; the default rejoins: rejoin_test.py)
  refuse_malformed_batch, refuse_oversized_message, refuse_out_of_order
                     repl_probe (--probe) stands in for the primary with its certificate and sends
                     one bad message per case: the replica ends the stream with an error naming the
                     fault (and LSN), logs it, keeps running with its log unchanged, and the real
                     primary then replicates to it again
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repl_lib import (MIB, TestFailure, assert_identical, free_port, log, run_main,  # noqa: E402
                      u64, wait_caught_up, wait_for)
import urllib.request  # noqa: E402


def qemu_io(agent, *cmds, export="vol0", read_only=False):
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in cmds:
        args += ["-c", c]
    args.append(agent.uri(export))
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if r.returncode != 0 or "failed" in r.stdout.lower() or "error" in r.stderr.lower():
        raise TestFailure(f"qemu-io {cmds} on {agent.site}: rc {r.returncode}\n{r.stdout}{r.stderr}")
    return r.stdout


def fio(agent, rw="randwrite", bs="4k", size="64M", iodepth=16, runtime=None, extra=()):
    args = ["fio", "--name=load", "--ioengine=nbd", f"--uri={agent.uri()}", f"--rw={rw}",
            f"--bs={bs}", f"--size={size}", f"--iodepth={iodepth}", "--output-format=terse",
            "--randrepeat=0"]
    if runtime:
        args += ["--time_based", f"--runtime={runtime}"]
    args += list(extra)
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise TestFailure(f"fio on {agent.site} failed: {r.stdout}{r.stderr}")


def pair(c, mode="sync", size="256MiB", b_kw=None, a_extra=None):
    a = c.agent("site-a")
    b = c.agent("site-b", **(b_kw or {}))
    g = {"name": "g0", "primary": "site-a", "size": size}
    a.write_config([dict(g, peers=[(b, mode, a_extra)])], acl=[("site-b", "site-b", ["g0"])])
    b.write_config([dict(g, peers=[(a, mode, None)])], acl=[("site-a", "site-a", ["g0"])])
    return a, b


def expect_refusal(agent_b, primary, text, timeout_s=30):
    def refused():
        p = primary.peer(agent_b.site)
        err = (p or {}).get("last_error", "")
        return err if text in err else None
    err = wait_for(f"{primary.site} to report a refusal containing {text!r}", refused, timeout_s,
                   0.3)
    log(f"{primary.site} reports: {err}")


# ---- scenarios -----------------------------------------------------------------------------------


def two_sites_sync(c):
    a, b = pair(c, "sync")
    b.start()
    a.start()
    qemu_io(a, "write -P 0xa1 0 1M", "aio_write -P 0xa2 1M 1M", "aio_flush", "write -z 4M 1M",
            "discard 8M 1M", "write -P 0xa3 100M 64k", "flush")
    fio(a, size="32M", iodepth=16)  # overwrites the first 32 MiB at random
    qemu_io(a, "write -P 0xa4 50M 1M", "flush")
    wait_caught_up(a, [b])
    assert_identical(a, [b])
    qemu_io(b, "read -P 0xa4 50M 1M", "read -P 0xa3 100M 64k", read_only=True)
    # The replica's export is read-only.
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", b.uri()],
                       capture_output=True, text=True, timeout=60)
    out = (r.stdout + r.stderr).lower()
    if r.returncode == 0 or not any(x in out for x in ("not permitted", "read-only",
                                                        "permission denied")):
        raise TestFailure(f"a write to the replica's export was not refused: {r.stdout}{r.stderr}")
    st = a.peer("site-b")
    if st.get("mode") != "sync" or st.get("link_state") != "streaming":
        raise TestFailure(f"unexpected peer status {st}")
    # Large writes while the link keeps up (a sync peer always does): their batches go to the
    # worker, which builds them from the just-written records kept in memory instead of reading
    # them back from the log.
    sent0, back0 = int(st.get("sent_records", "0")), int(st.get("sent_records_read_back", "0"))
    fio(a, rw="write", bs="256k", size="32M", iodepth=4)
    st = a.peer("site-b")
    sent = int(st.get("sent_records", "0")) - sent0
    back = int(st.get("sent_records_read_back", "0")) - back0
    log(f"256 KiB writes: {sent} records sent, {back} of them read back from the log")
    if sent < 128 or back > sent // 10:
        raise TestFailure(f"{back} of {sent} records were read back from the log although the "
                          "sync peer kept up")
    wait_caught_up(a, [b])
    assert_identical(a, [b])


def three_sites(c):
    a = c.agent("site-a")
    b = c.agent("site-b")
    d = c.agent("site-c")
    g = {"name": "g0", "primary": "site-a"}
    a.write_config([dict(g, peers=[(b, "sync", None), (d, "async", None)])])
    b.write_config([dict(g, peers=[(a, "sync", None)])], acl=[("site-a", "site-a", ["g0"])])
    d.write_config([dict(g, peers=[(a, "async", None)])], acl=[("site-a", "site-a", ["g0"])])
    for x in (b, d, a):
        x.start()
    fio(a, size="48M", iodepth=16)
    qemu_io(a, "write -P 0x33 0 2M", "flush")
    wait_caught_up(a, [b, d])
    assert_identical(a, [b, d])


def sync_waits_for_peer(c):
    import nbd
    a, b = pair(c, "sync")
    b.start()
    a.start()
    qemu_io(a, "write -P 0x11 0 64k", "flush")
    wait_caught_up(a, [b])
    b.pause()
    try:
        h = a.connect()
        cookie = h.aio_pwrite(b"\x22" * 4096, 0)
        t_end = time.monotonic() + 3
        while time.monotonic() < t_end:
            h.poll(0)
            if h.aio_command_completed(cookie):
                raise TestFailure("a sync-mode write completed while the sync peer was stopped; "
                                  f"site-a's status: {json.dumps(a.try_status())}")
            time.sleep(0.05)
        log("write still pending after 3 s with the sync peer stopped (as it must be)")
    finally:
        b.resume()
    deadline = time.monotonic() + 30
    while not h.aio_command_completed(cookie):
        if time.monotonic() > deadline:
            raise TestFailure("the write did not complete after the sync peer resumed")
        h.poll(100)
    log("write completed once the peer resumed")
    h.shutdown()
    del nbd


def lazy_replica_sync(c):
    """A sync peer fsyncs batches that no FLUSH/FUA waits on lazily (replica_sync_interval_ms), and
    a FLUSH or FUA asks it to fsync at once: with the interval at its maximum (60 s) they still
    complete within seconds, and each is durable at the peer when it returns."""
    import nbd
    a = c.agent("site-a")
    b = c.agent("site-b")
    b.extra_replication = "replica_sync_interval_ms = 60000"
    g = {"name": "g0", "primary": "site-a", "size": "256MiB"}
    a.write_config([dict(g, peers=[(b, "sync", None)])], acl=[("site-b", "site-b", ["g0"])])
    b.write_config([dict(g, peers=[(a, "sync", None)])], acl=[("site-a", "site-a", ["g0"])])
    b.start()
    a.start()
    qemu_io(a, "write -P 0x11 0 64k", "flush")
    wait_caught_up(a, [b])
    h = a.connect()

    def durable_at_peer(what, op):
        t0 = time.monotonic()
        op()
        took = time.monotonic() - t0
        last = u64(a.group("g0").get("last_lsn"))
        durable = u64(a.peer("site-b").get("durable_lsn"))
        log(f"{what}: {took * 1000:.0f} ms; last LSN {last}, durable at the peer {durable}")
        if took > 5:
            raise TestFailure(f"{what} took {took:.1f} s: the peer was not asked to fsync")
        if durable < last:
            raise TestFailure(f"{what} returned with durable {durable} < last {last} at the peer")

    h.pwrite(b"\x22" * 4096, 1 * MIB)  # completes once the peer has it in its log
    durable_at_peer("FLUSH after a write", h.flush)
    durable_at_peer("FUA write", lambda: h.pwrite(b"\x33" * 4096, 2 * MIB, nbd.CMD_FLAG_FUA))
    for i in range(200):
        h.pwrite(bytes([i]) * 4096, 4 * MIB + i * 4096)
    durable_at_peer("FLUSH after 200 writes", h.flush)
    h.shutdown()
    wait_caught_up(a, [b])
    assert_identical(a, [b])


def replica_kill9(c):
    a, b = pair(c, "async")
    b.start()
    a.start()
    load = threading.Thread(target=fio, args=(a,), kwargs={"size": "128M", "runtime": 8})
    load.start()
    time.sleep(3)
    b.kill9()
    log("replica killed with SIGKILL under load")
    time.sleep(1)
    b.start()
    load.join()
    qemu_io(a, "flush")
    wait_caught_up(a, [b])
    assert_identical(a, [b])


def replica_disk_full(c):
    """The replica's state (its log and its sparse volume) is a 48 MiB tmpfs, and an async
    primary's writes fill it. The replica agent stays up and says once why it stopped taking
    batches (its log store, or its volume's file system, full), the primary keeps taking writes
    and reports the peer's error; once the tmpfs has room and the replica is restarted, it
    catches up from its own log and ends identical. Before storage/rocksdb_logger.h the replica
    died of SIGABRT (RocksDB's LOG file on the full file system)."""
    _replica_full(c, volume_fs=False)


def replica_volume_full(c):
    """As replica_disk_full, with the replica's volume alone on an 8 MiB tmpfs, so that its
    applier fails first (in replica_disk_full either may): the replica says once that its writes
    are suspended, not again for each batch of the primary's window and each reconnect (CI saw
    39 such lines in 10 ms)."""
    _replica_full(c, volume_fs=True)


def _replica_full(c, volume_fs):
    mnt = tempfile.mkdtemp(prefix="tvilling-replica-full-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tvilling-replica-full", mnt],
                   check=True)
    c.on_exit(lambda: (subprocess.run(["umount", mnt], check=False), os.rmdir(mnt)))
    a = c.agent("site-a")
    b = c.agent("site-b")
    b.move_state_under(mnt)  # after the umount's registration: cleanups run in reverse
    mounts = [mnt]
    if volume_fs:
        vols = os.path.join(b.state_dir, "volumes")
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tvilling-replica-vol", vols],
                       check=True)
        c.on_exit(lambda: subprocess.run(["umount", vols], check=False))
        mounts.append(vols)
    g = {"name": "g0", "primary": "site-a", "size": "128MiB"}
    a.write_config([dict(g, peers=[(b, "async", None)])], acl=[("site-b", "site-b", ["g0"])])
    b.write_config([dict(g, peers=[(a, "async", None)])], acl=[("site-a", "site-a", ["g0"])])
    b.start()
    a.start()
    wait_caught_up(a, [b])
    # 96 MiB of 4 KiB writes into 64 MiB: the replica's log (inline records) and volume fill 48 MiB.
    fio(a, size="64M", iodepth=8, extra=("--io_size=96M",))

    def said():
        lines = [ln for ln in b.tail(400).splitlines()
                 if " error " in ln and ("log store stopped writing" in ln or
                                         "writes suspended" in ln)]
        return lines or None
    lines = wait_for("site-b to report its full file system", said, 60, 0.3)
    log(f"site-b: {lines[0][:300]}")
    time.sleep(2)  # RocksDB's error handler and the primary's retries run meanwhile
    lines = said()
    # The log and the volume share the tmpfs: either may fail first, and both may; each is said once.
    for marker in ("log store stopped writing", "writes suspended"):
        n = sum(marker in ln for ln in lines)
        if n > 1:
            raise TestFailure(f"site-b said {marker!r} {n} times:\n" + "\n".join(lines))
    if volume_fs and not any("writes suspended" in ln for ln in lines):
        raise TestFailure("site-b's volume is on its own 8 MiB tmpfs but its applier did not "
                          "fail first:\n" + "\n".join(lines))
    for ln in lines:
        if "No space left on device" not in ln or mnt not in ln:
            raise TestFailure(f"site-b's error does not name the full file system: {ln}")
    if b.proc.poll() is not None:
        raise TestFailure(f"site-b exited with {b.proc.returncode} when its disk filled:\n"
                          f"{b.tail()}")
    werr = b.group().get("write_error", "")
    if "No space left on device" not in werr:
        raise TestFailure(f"site-b's status does not report its write error: {werr!r}")
    said_once = [ln for ln in b.tail(400).splitlines() if "writes are suspended" in ln]
    if len(said_once) != 1:
        raise TestFailure(f"site-b should say once that it refuses batches, said it "
                          f"{len(said_once)} times:\n" + "\n".join(said_once))
    # The primary is unaffected (async): it takes writes and names the peer's trouble.
    qemu_io(a, "write -P 0x77 100M 1M", "flush")
    err = wait_for("site-a to report site-b's error",
                   lambda: (a.peer("site-b") or {}).get("last_error") or None, 30, 0.3)
    log(f"site-a reports for site-b: {err}")

    for m in mounts:
        subprocess.run(["mount", "-o", "remount,size=512m", m], check=True)
    rc = b.stop()
    log(f"site-b stopped with exit code {rc}")
    if rc is not None and rc < 0:
        raise TestFailure(f"site-b died of signal {-rc} while stopping:\n{b.tail()}")
    b.start()
    qemu_io(a, "flush")
    wait_caught_up(a, [b])
    assert_identical(a, [b])
    if b.group().get("write_error", ""):
        raise TestFailure(f"site-b still reports a write error: {b.group()['write_error']!r}")


def full_copy_new_replica(c):
    """A new replica takes a full copy while writes go on, reports itself inconsistent until it
    completes, and ends identical. The link's rate_limit (32 MiB/s, the copy's data >= 24 MiB)
    keeps the copy open for the status polls: unthrottled it took 0.27 s on loopback, and CI
    once missed it between two polls."""
    a, b = pair(c, "async", a_extra={"rate_limit": '"32MiB"', "compression": '"none"'})
    a.start()
    qemu_io(a, "write -P 0x5a 0 16M", "write -P 0x5b 200M 8M", "flush")
    load = threading.Thread(target=fio, args=(a,), kwargs={"size": "64M", "runtime": 6,
                                                           "extra": ("--rate=8m",)})
    load.start()
    b.start()
    saw_inconsistent = False
    t_end = time.monotonic() + 5
    while time.monotonic() < t_end:
        g = b.group()
        if not g.get("consistent"):
            saw_inconsistent = True
            break
        time.sleep(0.05)
    load.join()
    qemu_io(a, "flush")
    wait_caught_up(a, [b])
    assert_identical(a, [b])
    if not saw_inconsistent:
        raise TestFailure("the new replica never reported itself inconsistent during its copy")


def sparse_copy_keeps_link(c):
    """A new replica's full copy of a large, thin volume: the primary sends each hole as "zero"
    chunks of up to 64 MiB without reading it, and the replica punches them without a checkpoint
    each, so the copy takes about the time of its data, and the link's heartbeats (keepalive_ms =
    2000: one every 400 ms) keep going throughout. Reading the holes took minutes (64 GiB: 166 s)
    and ended with the link cut for silence (the copy kept the primary's worker from sending
    heartbeats); with a checkpoint per zero chunk, 1 TiB took 10 s and the heartbeats waited
    behind the checkpoints at the replica until the link was cut."""
    a = c.agent("site-a")
    b = c.agent("site-b")
    for agent in (a, b):
        agent.extra_replication = "keepalive_ms = 2000"
    g = {"name": "g0", "primary": "site-a", "size": "1TiB"}
    a.write_config([dict(g, peers=[(b, "async", None)])], acl=[("site-b", "site-b", ["g0"])])
    b.write_config([dict(g, peers=[(a, "async", None)])], acl=[("site-a", "site-a", ["g0"])])
    b.start()  # first: no failed dials to count below
    t0 = time.monotonic()
    a.start()
    qemu_io(a, "write -P 0x5c 0 1M", "write -P 0x5d 700G 1M", "flush")
    wait_caught_up(a, [b], timeout_s=240)
    log(f"MEASURED full copy of a 1 TiB volume holding 2 MiB: {time.monotonic() - t0:.1f} s")
    # Not assert_identical: hashing 2 x 1 TiB of holes takes hours. The replica holds the data
    # and no more than it: the rest of its volume is still a hole.
    qemu_io(b, "read -P 0x5c 0 1M", "read -P 0x5d 700G 1M", "read -P 0 1M 1M", "read -P 0 1023G 1M",
            read_only=True)
    allocated = os.stat(os.path.join(b.state_dir, "volumes", "vol0.img")).st_blocks * 512
    if allocated > 64 * MIB:
        raise TestFailure(f"site-b's volume has {allocated} bytes allocated for 2 MiB of data")
    p = a.peer("site-b") or {}
    with open(b.log_path) as f:
        resumed = [line.strip() for line in f if "resuming the interrupted copy" in line]
    if u64(p.get("disconnects")) != 0 or resumed:
        raise TestFailure(f"the copy's link was cut: {u64(p.get('disconnects'))} disconnect(s), "
                          f"last error {p.get('last_error')!r}; site-b: {resumed}")


def peer_back_after_outage(c):
    """A replica whose agent was away for a while (every dial refused meanwhile) streams again at
    the primary's next dial after it is back. gRPC keeps its own reconnect backoff per channel (up
    to 120 s by default, and advanced only while someone polls the channel) and fails calls fast
    with the last error until it ends: the primary's dials kept failing with "Connection refused"
    for seconds after the replica listened again."""
    a, b = pair(c, "async")
    a.start()
    time.sleep(20)  # about ten refused dials, and gRPC's backoff grows meanwhile
    b.start()  # returns once b serves its control socket: it listens for replication before that
    ready = time.monotonic()
    dials0 = u64((a.peer("site-b") or {}).get("dials"))
    wait_for("site-a streaming to site-b",
             lambda: (a.peer("site-b") or {}).get("link_state") == "streaming", 60, 0.05)
    took = time.monotonic() - ready
    dials = u64((a.peer("site-b") or {}).get("dials")) - dials0
    log(f"MEASURED site-b streaming {took:.1f} s after it served, {dials} dial(s) meanwhile")
    # The primary redials at most every 5 s (its backoff's cap): the first dial after b is back
    # must connect; one more is allowed for a dial already on its way when b came up.
    if dials > 2:
        raise TestFailure(f"site-a dialled {dials} times over {took:.1f} s before it connected to "
                          f"site-b, which was listening all along")


def behind_retention(c):
    a, b = pair(c, "async")
    a.extra_log = 'hard_cap = "32MiB"\nretention_bytes = "0"'
    g = {"name": "g0", "primary": "site-a", "size": "256MiB"}
    a.write_config([dict(g, peers=[(b, "async", None)])], acl=[("site-b", "site-b", ["g0"])])
    b.start()
    a.start()
    qemu_io(a, "write -P 0x01 0 4M", "flush")
    wait_caught_up(a, [b])
    b.stop()
    fio(a, rw="write", bs="1M", size="128M", iodepth=4)
    qemu_io(a, "flush")
    time.sleep(1.5)  # a checkpoint lets retention drop what site-b needs
    b.start()
    wait_caught_up(a, [b], timeout_s=90)
    assert_identical(a, [b])


def reconnect_after_copy(c):
    # The copy's base L0 is > 0 and the primary's history has more than one epoch, so a replica
    # whose log does not hold the primary's history up to L0 after the copy would be refused as
    # diverged at LSN 1 on its next handshake.
    a, b = pair(c, "async")
    a.start()
    qemu_io(a, "write -P 0x41 0 4M", "flush")
    a.stop()
    a.start()  # epoch 2: the history now has two entries
    qemu_io(a, "write -P 0x42 8M 4M", "flush")
    base = u64(a.group().get("last_lsn"))
    if base == 0 or u64(a.group().get("epoch")) < 2:
        raise TestFailure(f"site-a should have records in a second epoch: {a.group()}")
    b.start()
    load = threading.Thread(target=fio, args=(a,), kwargs={"size": "32M", "runtime": 3})
    load.start()
    load.join()
    qemu_io(a, "flush")

    def streams_again(what):
        def ok():
            err = (a.peer(b.site) or {}).get("last_error", "")
            if "diverged" in err:
                raise TestFailure(f"{what}: site-a's peer site-b reports: {err}")
            with open(b.log_path) as f:
                refused = [x for x in f if "refusing the stream" in x]
            if refused:
                raise TestFailure(f"{what}: site-b refused its primary: {refused[-1].strip()}")
            last = u64(a.group().get("last_lsn"))
            g = b.group()
            p = a.peer(b.site) or {}
            return (g.get("consistent") and u64(g.get("applied_lsn")) >= last and
                    u64(p.get("applied_lsn")) >= last and p.get("link_state") == "streaming")
        wait_for(f"site-b to stream again ({what})", ok, 60, 0.3)
        assert_identical(a, [b])
        log(f"{what}: site-b streams and is identical")

    streams_again("after the full copy")
    copies = lambda: sum("full copy from" in x and "begins" in x  # noqa: E731
                         for x in open(b.log_path))
    if copies() != 1:
        raise TestFailure(f"expected one full copy on site-b, saw {copies()}")

    b.stop()
    qemu_io(a, "write -P 0x43 16M 1M", "flush")
    b.start()
    streams_again("site-b restarted (SIGTERM)")

    load = threading.Thread(target=fio, args=(a,), kwargs={"size": "16M", "runtime": 3})
    load.start()
    time.sleep(1.5)
    b.kill9()
    log("site-b killed with SIGKILL under load")
    load.join()
    b.start()
    qemu_io(a, "flush")
    streams_again("site-b restarted after kill -9")

    a.stop()
    a.start()  # a new epoch; site-b must accept the longer history
    qemu_io(a, "write -P 0x44 20M 1M", "flush")
    streams_again("site-a restarted")
    b.stop()
    qemu_io(a, "write -P 0x45 24M 1M", "flush")
    b.start()
    streams_again("site-b restarted after site-a's restart")
    if copies() != 1:
        raise TestFailure(f"a reconnect needed another full copy: {copies()} copies on site-b")


def refuse_wrong_ca(c):
    a, b = pair(c, "async")
    a.cert = "other-site-a"  # CN site-a, but signed by another CA
    a.ca = "other-ca.pem"  # a consistent identity of another PKI: site-b must refuse it
    g = {"name": "g0", "primary": "site-a"}
    a.write_config([dict(g, peers=[(b, "async", None)])])
    b.start()
    a.start()
    expect_refusal(b, a, "")  # any error
    time.sleep(2)
    p = a.peer("site-b")
    if p.get("link_state") == "streaming" or u64(p.get("received_lsn")):
        raise TestFailure(f"a certificate from another CA was accepted: {p}")
    log(f"site-a cannot connect: {p.get('last_error')}")


def refuse_expired_cert(c):
    a, b = pair(c, "async")
    a.cert = "expired"
    a.write_config([{"name": "g0", "primary": "site-a", "peers": [(b, "async", None)]}])
    b.start()
    r = subprocess.run([c.tvillingd, "--config", a.config_path, "--check-config"],
                       capture_output=True, text=True, timeout=30)
    out = r.stdout + r.stderr
    if r.returncode == 0 or "expired" not in out:
        raise TestFailure(f"an expired certificate was not reported: rc {r.returncode}: {out}")
    log(f"expired certificate reported: {out.strip().splitlines()[-1]}")


def refuse_other_tenant(c):
    a, b = pair(c, "async")
    a.cert = "tenant-b"  # valid certificate from our CA, but not allowed to act as site-a for g0
    a.write_config([{"name": "g0", "primary": "site-a", "peers": [(b, "async", None)]}])
    b.start()
    a.start()
    expect_refusal(b, a, "tenant-b")
    if u64(b.group().get("last_lsn")) != 0:
        raise TestFailure("the replica accepted records from another tenant")


def refuse_stale_epoch(c):
    # A (epoch 1) -> B and C. Then B becomes primary (epoch 2) and streams to C. A comes back still
    # believing it is primary with epoch 1: C refuses it as stale.
    a = c.agent("site-a")
    b = c.agent("site-b")
    d = c.agent("site-c")
    acl_all = [("site-a", "site-a", ["g0"]), ("site-b", "site-b", ["g0"])]
    g = {"name": "g0", "primary": "site-a"}
    a.write_config([dict(g, peers=[(b, "async", None), (d, "async", None)])], acl=acl_all)
    b.write_config([dict(g, peers=[(a, "async", None), (d, "async", None)])], acl=acl_all)
    d.write_config([dict(g, peers=[(a, "async", None), (b, "async", None)])], acl=acl_all)
    for x in (b, d, a):
        x.start()
    qemu_io(a, "write -P 0x61 0 1M", "flush")
    wait_caught_up(a, [b, d])
    # A is cut off (frozen, as by a partition), not restarted: it still believes it is primary
    # in epoch 1 (a restart would begin a new epoch).
    a.pause()
    g2 = {"name": "g0", "primary": "site-b"}
    b.stop()
    b.write_config([dict(g2, peers=[(d, "async", None), (a, "async", None)])], acl=acl_all)
    d.stop()
    d.write_config([dict(g2, peers=[(b, "async", None), (a, "async", None)])], acl=acl_all)
    d.start()
    b.start()
    qemu_io(b, "write -P 0x62 0 1M", "flush")
    wait_for("site-c to apply site-b's write", lambda: u64(d.group().get("applied_lsn")) >=
             u64(b.group().get("last_lsn")) and u64(d.group().get("epoch")) >= 2, 60)
    if u64(b.group().get("epoch")) <= 1:
        raise TestFailure(f"site-b did not begin a new epoch: {b.group()}")
    cuts = u64(b.peer("site-c").get("disconnects"))
    a.resume()
    expect_refusal(d, a, "stale epoch")
    qemu_io(d, "read -P 0x62 0 1M", read_only=True)
    # The refused stale primary must not disturb site-b's stream to site-c (a refused Hello once
    # reset the receiver of the active stream, whose next batch was then refused and cut).
    qemu_io(b, "write -P 0x63 1M 1M", "flush")
    wait_for("site-c to apply site-b's second write", lambda: u64(d.group().get("applied_lsn")) >=
             u64(b.group().get("last_lsn")), 60)
    if u64(b.peer("site-c").get("disconnects")) != cuts:
        raise TestFailure(f"site-b's stream to site-c was cut while site-c refused site-a: "
                          f"{b.peer('site-c')}")
    qemu_io(d, "read -P 0x63 1M 1M", read_only=True)


def refuse_diverged(c):
    # A -> B async. B stops; A writes more (B misses it). A stops; B becomes primary and writes.
    # A, now configured as B's replica, holds records B does not have: diverged, refused.
    a, b = pair(c, "async")
    acl_all = [("site-a", "site-a", ["g0"]), ("site-b", "site-b", ["g0"])]
    g = {"name": "g0", "primary": "site-a"}
    a.write_config([dict(g, peers=[(b, "async", None)])], acl=acl_all)
    b.write_config([dict(g, peers=[(a, "async", None)])], acl=acl_all)
    b.start()
    a.start()
    qemu_io(a, "write -P 0x71 0 1M", "flush")
    wait_caught_up(a, [b])
    b.stop()
    qemu_io(a, "write -P 0x72 0 1M", "flush")
    a.stop()
    g2 = {"name": "g0", "primary": "site-b"}
    b.write_config([dict(g2, peers=[(a, "async", None)])], acl=acl_all)
    # The default rejoins (tests/integration/rejoin_test.py); this group asks for the refusal.
    a.write_config([dict(g2, peers=[(b, "async", None)], extra={"on_divergence": '"refuse"'})],
                   acl=acl_all)
    b.start()
    qemu_io(b, "write -P 0x73 0 1M", "flush")
    a.start()
    expect_refusal(a, b, "diverged")
    qemu_io(a, "read -P 0x72 0 1M", read_only=True)  # A kept its own data; nothing was overwritten


def link_cut(c):
    """Agents in two network namespaces joined by a veth pair; the link goes down for 10 s under
    load and comes back; the replica catches up by itself."""
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"tvA{tag}", f"tvB{tag}"
    veth_a, veth_b = f"tva{tag}", f"tvb{tag}"
    sh = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, timeout=30)  # noqa
    for ns in (ns_a, ns_b):
        sh("ip", "netns", "add", ns)
        c.on_exit(lambda ns=ns: subprocess.run(["ip", "netns", "del", ns], timeout=30))
    sh("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
    sh("ip", "link", "set", veth_a, "netns", ns_a)
    sh("ip", "link", "set", veth_b, "netns", ns_b)
    sh("ip", "-n", ns_a, "addr", "add", "10.211.0.1/24", "dev", veth_a)
    sh("ip", "-n", ns_b, "addr", "add", "10.211.0.2/24", "dev", veth_b)
    for ns, dev in ((ns_a, veth_a), (ns_b, veth_b)):
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", dev, "up")
    a, b = pair(c, "async", b_kw={"netns": ns_b, "host": "10.211.0.2"})
    a.netns, a.host, a.repl_port = ns_a, "10.211.0.1", 7300
    g = {"name": "g0", "primary": "site-a", "size": "256MiB"}
    a.write_config([dict(g, peers=[(b, "async", None)])], acl=[("site-b", "site-b", ["g0"])])
    b.write_config([dict(g, peers=[(a, "async", None)])], acl=[("site-a", "site-a", ["g0"])])
    b.start()
    a.start()
    wait_for("the link to stream", lambda: (a.peer("site-b") or {}).get("link_state") ==
             "streaming", 30)
    load = threading.Thread(target=fio, args=(a,), kwargs={"size": "128M", "runtime": 18})
    load.start()
    time.sleep(3)
    sh("ip", "-n", ns_a, "link", "set", veth_a, "down")
    log("link down")
    time.sleep(10)
    lag = a.peer("site-b")
    log(f"during the cut: {lag.get('link_state')}, lag {lag.get('lag_bytes')} bytes")
    sh("ip", "-n", ns_a, "link", "set", veth_a, "up")
    log("link up")
    load.join()
    qemu_io(a, "flush")
    wait_caught_up(a, [b], timeout_s=120)
    assert_identical(a, [b])
    if u64(lag.get("lag_bytes")) == 0:
        raise TestFailure("the primary reported no lag while the link was down under load")


# ---- malformed and oversized messages (tests/tools/repl_probe) ------------------------------------
#
# (probe case, gRPC code the replica ends the stream with, texts its status message must hold, texts
# the replica's log must hold (None: the same)). {n} is the LSN the replica expects next, {e} its
# epoch, {last} its last LSN.
MALFORMED_CASES = [
    ("bad_checksum", "INVALID_ARGUMENT", ["batch at LSN {n}", "checksum mismatch"], None),
    ("truncated_header", "INVALID_ARGUMENT",
     ["batch from LSN {n}", "record #1 at byte 4144 is truncated to 20 bytes"], None),
    ("truncated_payload", "INVALID_ARGUMENT",
     ["batch from LSN {n}", "record #0 at byte 0 claims a 4096-byte payload but 4000 bytes follow"],
     None),
    ("record_count", "INVALID_ARGUMENT", ["batch from LSN {n} says 3 records but holds 2"], None),
    ("unknown_codec", "INVALID_ARGUMENT", ["batch at LSN {n}", "unknown codec 7"], None),
    ("bad_lz4", "INVALID_ARGUMENT", ["batch at LSN {n}", "lz4 data is corrupt"], None),
    ("bad_zstd", "INVALID_ARGUMENT", ["batch at LSN {n}", "zstd data is corrupt"], None),
    ("bad_record", "DATA_LOSS",
     ["replicated record LSN {n1} does not verify, nothing appended", "checksum mismatch"], None),
    ("record_epoch", "INVALID_ARGUMENT",
     ["batch from LSN {n}: record LSN {n} is of epoch {e5} but the batch is of epoch {e}"], None),
    ("record_range", "INVALID_ARGUMENT",
     ["batch from LSN {n}: record LSN {n1} (WRITE 268435456+4096) is beyond volume 0"], None),
    ("record_volume", "INVALID_ARGUMENT",
     ["batch from LSN {n}: record LSN {n} names volume 7 but the group has 1"], None),
    ("no_records", "FAILED_PRECONDITION", ["batch of 0 records at LSN {n}", "malformed"], None),
    ("not_protobuf", "INVALID_ARGUMENT", ["does not parse as a tvilling.v1.ToReplica"],
     ["ended: the peer sent a message that does not parse as a tvilling.v1.ToReplica"]),
]
OVERSIZED_CASES = [
    ("oversize_batch", "INVALID_ARGUMENT",
     ["batch at LSN {n}", "uncompressed_bytes 67116224 exceeds the 67108864 byte limit"], None),
    ("oversize_claim", "INVALID_ARGUMENT",
     ["batch at LSN {n}", "uncompressed_bytes 1073741824 exceeds the 67108864 byte limit"], None),
    # gRPC drops it before the agent sees it: the sender gets gRPC's reason, the replica's log the
    # end of the stream with the limit.
    ("oversize_message", "RESOURCE_EXHAUSTED",
     ["Received message larger than max", "vs. 83886080"],
     ["ended: stream cancelled", "over the 83886080 byte receive limit"]),
]
OUT_OF_ORDER_CASES = [
    ("gap", "FAILED_PRECONDITION",
     ["batch of 2 records at LSN {n5} in epoch {e}: gap, this replica's log ends at LSN {last} "
      "(expected LSN {n})"], None),
    ("batch_before_hello", "INVALID_ARGUMENT", ["the first message must be a Hello"], None),
    ("second_hello", "INVALID_ARGUMENT", ["sent a second Hello"], None),
    ("empty_message", "INVALID_ARGUMENT", ["sent an empty or unknown message"], None),
    ("copy_chunk", "INVALID_ARGUMENT", ["sent a copy chunk while no copy is in progress"], None),
]


def run_probe(c, b, epoch, last, case):
    """repl_probe as site-a (its certificate) against replica `b`, whose log is in `epoch` (the
    whole history, from LSN 1) and ends at `last`."""
    cmd = [c.probe, "--target", b.address, "--ca", f"{c.pki}/ca.pem",
           "--cert", f"{c.pki}/site-a.pem", "--key", f"{c.pki}/site-a.key",
           "--tls-name", "site-b", "--group", "g0", "--site", "site-a",
           "--epoch", str(epoch), "--history", f"{epoch}:1", "--volume", f"vol0:{256 * MIB}",
           "--last-lsn", str(last), "--case", case, "--timeout-s", "20"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def probe_refusals(c, cases):
    """A -> B async over TLS with some data; A stops and repl_probe, with A's certificate, takes
    its place: a correct Hello, then one bad message per case. Each must end the stream with the
    expected error, in the probe's status and in B's log; B keeps running, its status answers and
    its log gains nothing. Then A comes back and replicates to B as before."""
    if not c.probe:
        raise TestFailure("this scenario needs --probe (tests/tools/repl_probe)")
    a, b = pair(c, "async")
    b.start()
    a.start()
    qemu_io(a, "write -P 0x81 0 1M", "write -P 0x82 2M 64k", "flush")
    wait_caught_up(a, [b])
    a.stop()
    before = b.group()
    epoch, last = u64(before.get("epoch")), u64(before.get("last_lsn"))
    if epoch != 1:  # a fresh pair: epoch 1 from LSN 1 is the whole history the probe announces
        raise TestFailure(f"expected site-b in epoch 1, got {before}")
    subst = {"n": last + 1, "n1": last + 2, "n5": last + 6, "e": epoch, "e5": epoch + 5,
             "last": last}
    for case, code, status_texts, log_texts in cases:
        log_off = os.path.getsize(b.log_path)
        r = run_probe(c, b, epoch, last, case)
        closed = [x for x in r.stdout.splitlines() if x.startswith("closed: ")]
        got = closed[-1] if closed else ""
        want = [t.format(**subst) for t in status_texts]
        if r.returncode != 0 or not got.startswith(f"closed: {code}: ") or \
                not all(t in got for t in want):
            raise TestFailure(f"{case}: expected the stream to end with {code} naming {want}; "
                              f"probe rc {r.returncode}:\n{r.stdout}{r.stderr}")
        want_log = [t.format(**subst) for t in (log_texts or status_texts)]

        def logged():
            with open(b.log_path, errors="replace") as f:
                f.seek(log_off)
                for line in f:
                    if all(t in line for t in want_log):
                        return line.strip()
            return None
        line = wait_for(f"site-b's log to say {want_log}", logged, 10)
        if b.proc.poll() is not None:
            raise TestFailure(f"{case}: site-b exited with {b.proc.returncode}\n{b.tail()}")
        g = b.group()  # tvillingctl status --json still answers
        for k in ("last_lsn", "applied_lsn", "epoch"):
            if u64(g.get(k)) != u64(before.get(k)):
                raise TestFailure(f"{case}: site-b's {k} changed from {before.get(k)} to "
                                  f"{g.get(k)}: the bad message was (partly) accepted")
        log(f"{case}: {got}")
        log(f"{case}: site-b logged: {line}")
    # The real primary still replicates to B.
    a.start()
    qemu_io(a, "write -P 0x83 4M 1M", "flush")
    applied = wait_caught_up(a, [b])
    if applied <= last:
        raise TestFailure(f"site-b applied nothing new after the probe ({applied} <= {last})")
    assert_identical(a, [b])


def refuse_malformed_batch(c):
    probe_refusals(c, MALFORMED_CASES)


def refuse_oversized_message(c):
    probe_refusals(c, OVERSIZED_CASES)


def refuse_out_of_order(c):
    probe_refusals(c, OUT_OF_ORDER_CASES)


def async_acks_once_per_batch(c):
    """A replica answers an async link's batch (durable_requested) with one Position, after the
    fsync, carrying received and durable together; a batch without durable_requested (a sync
    link's WRITEs) still gets `received` at once, before its deferred fsync. repl_probe stands in
    for the primary and prints every Position it gets."""
    if not c.probe:
        raise TestFailure("this scenario needs --probe (tests/tools/repl_probe)")
    a, b = pair(c, "async")
    b.start()
    a.start()
    qemu_io(a, "write -P 0x81 0 1M", "flush")
    wait_caught_up(a, [b])
    a.stop()
    for case, early_received in (("acks_durable_requested", False), ("acks_lazy", True)):
        g = b.group()
        epoch, last = u64(g.get("epoch")), u64(g.get("last_lsn"))
        r = run_probe(c, b, epoch, last, case)
        if r.returncode != 0 or f"done: durable={last + 8}" not in r.stdout:
            raise TestFailure(f"{case}: probe rc {r.returncode}:\n{r.stdout}{r.stderr}")
        positions = []
        for line in r.stdout.splitlines():
            if line.startswith("position: "):
                kv = dict(x.split("=") for x in line.split()[1:])
                positions.append((int(kv["received"]), int(kv["durable"])))
        ahead = [p for p in positions if p[0] > p[1]]
        log(f"{case}: {len(positions)} positions for 4 batches, {len(ahead)} with received ahead")
        if early_received and not ahead:
            raise TestFailure(f"{case}: no `received` ack before the fsync: {positions}")
        if not early_received and ahead:
            raise TestFailure(f"{case}: separate `received` acks on an async link: {positions}")
        if not early_received and len(positions) > 5:  # 4 batches, maybe one Position at accept
            raise TestFailure(f"{case}: more than one Position per batch: {positions}")
        if b.proc.poll() is not None:
            raise TestFailure(f"{case}: site-b exited with {b.proc.returncode}\n{b.tail()}")


def rate_limit(c):
    """rate_limit caps what goes to the peer, the log stream and the full copy alike: 16 MiB of
    random data already on the primary's volume (the copy) and 16 MiB written afterwards (the
    stream), at 4 MiB/s, take at least ~7 s to reach the peer, and not much more."""
    rate = 4 * MIB
    a, b = pair(c, "async", a_extra={"rate_limit": '"4MiB"', "compression": '"none"'})
    a.start()
    fio(a, rw="write", bs="1m", size="16M", iodepth=4, extra=["--refill_buffers"])
    qemu_io(a, "flush")
    t0 = time.monotonic()
    b.start()
    wait_for("the full copy to reach the peer",
             lambda: (a.peer("site-b") or {}).get("link_state") == "streaming"
             and b.group().get("consistent"), 120, 0.1)
    t_copy = time.monotonic() - t0
    log(f"16 MiB copied in {t_copy:.1f} s at a {rate // MIB} MiB/s cap")
    if t_copy < 16 * MIB / rate * 0.8:
        raise TestFailure(f"the full copy took {t_copy:.1f} s: faster than rate_limit allows")
    t0 = time.monotonic()
    fio(a, rw="write", bs="1m", size="16M", iodepth=4, extra=["--refill_buffers", "--offset=32M"])
    qemu_io(a, "flush")
    wait_caught_up(a, [b], timeout_s=120)
    t_stream = time.monotonic() - t0
    log(f"16 MiB streamed in {t_stream:.1f} s at a {rate // MIB} MiB/s cap")
    if t_stream < 16 * MIB / rate * 0.8:
        raise TestFailure(f"16 MiB streamed in {t_stream:.1f} s: faster than rate_limit allows")
    if t_stream > 16 * MIB / rate * 3:
        raise TestFailure(f"16 MiB streamed in {t_stream:.1f} s: far slower than the cap")
    assert_identical(a, [b])


def log_first_lsn(agent):
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("tvilling_log_first_lsn{"):
                return int(float(line.rsplit(" ", 1)[1]))
    raise TestFailure(f"{agent.site}: no tvilling_log_first_lsn in /metrics")


def replica_retention_after_switch(c):
    """The old primary, demoted, keeps its peers' positions only until the new primary's stream is
    accepted (they hold its unreplicated tail for the rejoin); after that its log's retention goes
    on, instead of keeping every record it receives for good."""
    a, b = pair(c, "async", size="256MiB")
    for agent in (a, b):
        agent.metrics_port = free_port()
        with open(agent.config_path, "a") as f:
            f.write(f'[metrics]\nlisten = "127.0.0.1:{agent.metrics_port}"\n')
    b.start()
    a.start()
    fio(a, rw="write", bs="1M", size="40M", iodepth=4)
    wait_caught_up(a, [b])

    def ctl(agent, *args):
        r = subprocess.run([c.tvillingctl, "--socket", agent.control_socket, *args, "--yes"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise TestFailure(f"tvillingctl {' '.join(args)} on {agent.site}: {r.stderr}")
    ctl(a, "demote", "--group", "g0")
    ctl(b, "promote", "--group", "g0")
    wait_for("site-b streaming to site-a", lambda: (b.peer("site-a") or {}).get("link_state")
             == "streaming", 30, 0.2)
    switch_lsn = u64(b.group().get("last_lsn"))
    # Three segments' worth (16 MiB each) through the new primary, then checkpoints at site-a.
    fio(b, rw="write", bs="1M", size="64M", iodepth=4)
    wait_caught_up(b, [a])
    first = wait_for("site-a's log to drop records it received after the switch",
                     lambda: (lambda f: f if f > switch_lsn + 1 else None)(log_first_lsn(a)),
                     30, 0.5)
    log(f"site-a (replica) log starts at LSN {first}, the switch was at LSN {switch_lsn}")
    assert_identical(b, [a])


SCENARIOS = {f.__name__: f for f in (link_cut, rate_limit, replica_retention_after_switch,
    lazy_replica_sync, two_sites_sync, three_sites, sync_waits_for_peer, replica_kill9,
    full_copy_new_replica, replica_disk_full, replica_volume_full, sparse_copy_keeps_link, peer_back_after_outage, behind_retention,
    reconnect_after_copy, refuse_wrong_ca, refuse_expired_cert, refuse_other_tenant,
    refuse_stale_epoch, refuse_diverged,
    refuse_malformed_batch, refuse_oversized_message, refuse_out_of_order,
    async_acks_once_per_batch)}

if __name__ == "__main__":
    sys.exit(run_main(SCENARIOS))
