#!/usr/bin/python3
"""tls_reload_test.py: certificate rotation during a replication stream (SIGHUP, `systemctl reload`).

  /usr/bin/python3 tls_reload_test.py --tvillingd T --tvillingctl C --pki make-dev-pki.sh rotate

site-a ships g0 to site-b (sync, mutual TLS) while a client writes without pause. site-b's
certificate and key are replaced by a new pair (same CN, new key, new serial, same CA) and site-b
gets SIGHUP:
  - site-b logs the reload; within seconds its replication listener presents the new certificate
    (read with `openssl s_client`);
  - the stream from site-a is the same stream (site-b accepted no new one) and the writes never
    stopped; after a flush both volumes are identical;
  - a broken pair (a key that does not match) is refused on SIGHUP with a message naming the file,
    and site-b keeps presenting the good certificate;
  - site-a, restarted, dials site-b again and streams (its handshake with the new certificate).
"""

import os
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repl_lib import (TestFailure, assert_identical, log, run_main, u64,  # noqa: E402
                      wait_caught_up, wait_for)


def served_serial(c, agent):
    """The serial of the certificate agent's replication listener presents."""
    pki = c.pki
    p = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{agent.repl_port}", "-alpn", "h2",
         "-cert", f"{pki}/site-a.pem", "-key", f"{pki}/site-a.key", "-CAfile", f"{pki}/ca.pem",
         "-servername", agent.site],
        input=b"", capture_output=True, timeout=20)  # bytes: HTTP/2 frames follow the handshake
    x = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=p.stdout,
                       capture_output=True, timeout=20)
    if x.returncode != 0:
        raise TestFailure(f"no certificate from {agent.site}'s listener: "
                          f"{p.stderr[-500:].decode(errors='replace')}")
    return x.stdout.decode().strip()


def new_pair(c, site, out_prefix):
    """A new key and certificate for `site` from the cluster's CA (new serial)."""
    pki = c.pki
    ext = f"{out_prefix}.ext"
    with open(ext, "w") as f:
        f.write(f"subjectAltName=DNS:{site},DNS:localhost,IP:127.0.0.1\n"
                "extendedKeyUsage=serverAuth,clientAuth\n")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, timeout=30)  # noqa: E731
    run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
        f"{out_prefix}.key")
    run("openssl", "req", "-new", "-key", f"{out_prefix}.key", "-subj", f"/CN={site}",
        "-out", f"{out_prefix}.csr")
    run("openssl", "x509", "-req", "-in", f"{out_prefix}.csr", "-CA", f"{pki}/ca.pem",
        "-CAkey", f"{pki}/ca.key", "-set_serial", str(int(time.time() * 1000)), "-days", "30",
        "-extfile", ext, "-out", f"{out_prefix}.pem")


def replace(src, dst):
    tmp = dst + ".new"
    with open(src, "rb") as f, open(tmp, "wb") as g:
        g.write(f.read())
    os.chmod(tmp, 0o600)
    os.rename(tmp, dst)


def log_count(agent, text):
    with open(agent.log_path) as f:
        return f.read().count(text)


def rotate(c):
    a = c.agent("site-a")
    b = c.agent("site-b")
    g = {"name": "g0", "primary": "site-a", "size": "64MiB"}
    a.write_config([dict(g, peers=[(b, "sync", None)])], acl=[("site-b", "site-b", ["g0"])])
    b.write_config([dict(g, peers=[(a, "sync", None)])], acl=[("site-a", "site-a", ["g0"])])
    b.start()
    a.start()
    wait_for("the link to stream", lambda: (a.peer("site-b") or {}).get("link_state")
             == "streaming", 30)
    before = served_serial(c, b)
    accepted = log_count(b, "accepted the stream")
    log(f"site-b presents serial {before}; streams accepted so far: {accepted}")

    # A writer that never pauses (sync: every write waits for site-b's log).
    stop = threading.Event()
    done = {"writes": 0, "error": None, "max_s": 0.0}

    def writer():
        try:
            h = a.connect()
            block = os.urandom(65536)
            i = 0
            while not stop.is_set():
                t = time.monotonic()
                h.pwrite(block, (i % 512) * 65536)
                done["max_s"] = max(done["max_s"], time.monotonic() - t)
                done["writes"] += 1
                i += 1
            h.flush()
            h.shutdown()
        except Exception as e:  # reported below
            done["error"] = e
    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(1)
        new_pair(c, "site-b", os.path.join(c.tmp, "site-b-2"))
        replace(os.path.join(c.tmp, "site-b-2.key"), os.path.join(c.pki, "site-b.key"))
        replace(os.path.join(c.tmp, "site-b-2.pem"), os.path.join(c.pki, "site-b.pem"))
        writes_before = done["writes"]
        os.killpg(b.proc.pid, signal.SIGHUP)
        wait_for("site-b to log the reload", lambda: log_count(b, "TLS certificates reloaded"), 10)
        after = wait_for("site-b's listener to present the new certificate",
                         lambda: (lambda s: s if s != before else None)(served_serial(c, b)), 15,
                         0.3)
        log(f"site-b presents serial {after} after SIGHUP")
        time.sleep(1)
        if done["writes"] <= writes_before:
            raise TestFailure("the writes stopped during the reload")
    finally:
        stop.set()
        t.join(60)
    if done["error"] is not None:
        raise TestFailure(f"a write failed during the rotation: {done['error']}")
    log(f"{done['writes']} sync writes of 64 KiB during the rotation; the slowest took "
        f"{done['max_s'] * 1000:.1f} ms")
    if log_count(b, "accepted the stream") != accepted:
        raise TestFailure("site-b accepted a new stream: the rotation dropped the old one")
    if (a.peer("site-b") or {}).get("link_state") != "streaming":
        raise TestFailure("the link does not stream after the rotation")
    wait_caught_up(a, [b])
    assert_identical(a, [b])

    # A broken pair is refused and the good certificate stays.
    with open(os.path.join(c.pki, "site-c.key"), "rb") as f:
        wrong_key = f.read()
    with open(os.path.join(c.pki, "site-b.key"), "wb") as f:
        f.write(wrong_key)
    os.killpg(b.proc.pid, signal.SIGHUP)
    wait_for("site-b to refuse the broken pair",
             lambda: log_count(b, "TLS certificates not reloaded, the current ones stay"), 10)
    with open(b.log_path) as f:
        refusal = [x for x in f if "not reloaded" in x][-1].strip()
    if "site-b.key" not in refusal and "site-b.pem" not in refusal:
        raise TestFailure(f"the refusal does not name the file: {refusal}")
    log(f"refused: {refusal[-160:]}")
    time.sleep(2)
    if served_serial(c, b) != after:
        raise TestFailure("site-b stopped presenting the good certificate after a broken reload")
    if b.proc.poll() is not None:
        raise TestFailure("site-b exited after a broken reload")

    # site-a dials site-b afresh: the handshake with the rotated certificate works.
    a.stop()
    a.start()
    wait_for("site-a to stream to site-b again", lambda: (a.peer("site-b") or {}).get(
        "link_state") == "streaming", 30)
    h = a.connect()
    h.pwrite(b"\x5a" * 65536, 0)
    h.flush()
    h.shutdown()
    wait_caught_up(a, [b])
    assert_identical(a, [b])


if __name__ == "__main__":
    sys.exit(run_main({"rotate": rotate}))
