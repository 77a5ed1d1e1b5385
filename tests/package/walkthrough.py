#!/usr/bin/python3
"""walkthrough.py ROOT: what docs/operations.md tells a new operator to do, on the installed .deb.

Run by package_test.sh after `dpkg -i`, as root. Only installed files are used: the packaged PKI
script, the packaged two-site example configs (their ports replaced by free ones, so that the test
never collides with another agent on the machine) with the `[coordinator]` table the guide
describes pointing at Debian's etcd (one member on 127.0.0.1, stopped by PID), /usr/bin/tvillingd
run as the service user `tvilling`, and /usr/bin/tvillingctl. Each agent runs under a
NOTIFY_SOCKET harness (as systemd would run the unit): READY=1 must come, site-a must mirror writes
to site-b (same bytes read back through site-b's read-only export), `tvillingctl switchover` must
make site-b the primary (its write read back on site-a, the old primary, now its replica), and
SIGTERM must give STOPPING=1 and exit 0.
"""

import hashlib
import json
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time

import nbd

ROOT = sys.argv[1]
USER = pwd.getpwnam("tvilling")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    for site in ("site-a", "site-b"):
        try:
            with open(f"{ROOT}/{site}.log") as f:
                print(f"--- {site}.log (tail) ---\n{f.read()[-1500:]}", flush=True)
        except OSError:
            pass
    sys.exit(1)


def chown_tree(path):
    for d, dirs, files in os.walk(path):
        os.chown(d, USER.pw_uid, USER.pw_gid)
        for f in files:
            os.chown(os.path.join(d, f), USER.pw_uid, USER.pw_gid)


os.chmod(ROOT, 0o755)
subprocess.run(["/usr/share/tvilling/make-dev-pki.sh", f"{ROOT}/pki"], check=True,
               stdout=subprocess.DEVNULL)
ports = {k: free_port() for k in ("nbd-a", "nbd-b", "repl-a", "repl-b", "etcd-c", "etcd-p")}
swap = {"127.0.0.1:10809": f"127.0.0.1:{ports['nbd-a']}", "127.0.0.1:10909":
        f"127.0.0.1:{ports['nbd-b']}", "127.0.0.1:7301": f"127.0.0.1:{ports['repl-a']}",
        "127.0.0.1:7302": f"127.0.0.1:{ports['repl-b']}"}
for site in ("site-a", "site-b"):
    with open(f"/usr/share/doc/tvilling/examples/{site}.toml") as f:
        text = f.read()
    text = re.sub("|".join(re.escape(k) for k in swap), lambda m: swap[m.group(0)], text)
    text += f"""
[coordinator]
endpoints = ["127.0.0.1:{ports['etcd-c']}"]
"""
    with open(f"{ROOT}/{site}.toml", "w") as f:
        f.write(text)
    os.makedirs(f"{ROOT}/{site}", exist_ok=True)
chown_tree(ROOT)

agents = {}
notify = {}
etcd = None
try:
    # etcd for the coordinator (docs/operations.md, "Sites, etcd and the witness"): one member.
    url_c, url_p = f"http://127.0.0.1:{ports['etcd-c']}", f"http://127.0.0.1:{ports['etcd-p']}"
    etcd = subprocess.Popen(
        ["etcd", "--name", "m0", "--data-dir", f"{ROOT}/etcd", "--listen-client-urls", url_c,
         "--advertise-client-urls", url_c, "--listen-peer-urls", url_p,
         "--initial-advertise-peer-urls", url_p, "--initial-cluster", f"m0={url_p}",
         "--logger", "zap", "--log-outputs", f"{ROOT}/etcd.log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while subprocess.run(["etcdctl", "--endpoints", url_c, "endpoint", "health"],
                         capture_output=True, env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
                         timeout=10).returncode != 0:
        if time.monotonic() > deadline:
            fail("etcd did not become healthy within 30 s")
        time.sleep(0.2)
    for site in ("site-b", "site-a"):  # the replica first, as the guide says
        path = f"{ROOT}/notify-{site}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        os.chown(path, USER.pw_uid, USER.pw_gid)
        sock.settimeout(60)
        notify[site] = sock
        env = {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": path}
        log = open(f"{ROOT}/{site}.log", "w")
        agents[site] = subprocess.Popen(
            ["/usr/bin/tvillingd", "--config", f"{ROOT}/{site}.toml", "--state-dir",
             f"{ROOT}/{site}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            user=USER.pw_uid, group=USER.pw_gid, extra_groups=[], cwd=ROOT)
        sock.settimeout(0.5)
        deadline = time.monotonic() + 60
        while True:
            if agents[site].poll() is not None:
                fail(f"{site}: tvillingd exited with {agents[site].returncode} before READY=1")
            if time.monotonic() > deadline:
                fail(f"{site}: no READY=1 within 60 s")
            try:
                msg = sock.recv(4096).decode()
            except socket.timeout:
                continue
            if "READY=1" in msg.split("\n"):
                break
        sock.settimeout(60)
        print(f"{site}: READY=1 (running as tvilling)", flush=True)

    def status(site):
        r = subprocess.run(["/usr/bin/tvillingctl", "--state-dir", f"{ROOT}/{site}", "status",
                            "--json"], capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            fail(f"tvillingctl status for {site}: {r.stderr}")
        return json.loads(r.stdout)["groups"][0]

    deadline = time.monotonic() + 60
    while status("site-a")["peers"][0]["link_state"] != "streaming":
        if time.monotonic() > deadline:
            fail(f"site-a never streamed to site-b: {status('site-a')}")
        time.sleep(0.2)

    data = os.urandom(1 << 20)
    h = nbd.NBD()
    h.connect_uri(f"nbd://127.0.0.1:{ports['nbd-a']}/vol0")
    h.pwrite(data, 4096)
    h.flush()
    h.shutdown()
    last = int(status("site-a")["last_lsn"])
    deadline = time.monotonic() + 60
    while int(status("site-b")["applied_lsn"]) < last:
        if time.monotonic() > deadline:
            fail(f"site-b did not apply LSN {last}: {status('site-b')}")
        time.sleep(0.2)
    h = nbd.NBD()
    h.connect_uri(f"nbd://127.0.0.1:{ports['nbd-b']}/vol0")
    got = h.pread(len(data), 4096)
    h.shutdown()
    if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
        fail("site-b's copy differs from what was written on site-a")
    print(f"mirrored 1 MiB from site-a to site-b (LSN {last}), read back from site-b", flush=True)

    # Planned switchover, as the runbook says: on the primary, to site-b.
    r = subprocess.run(["/usr/bin/tvillingctl", "--state-dir", f"{ROOT}/site-a", "switchover",
                        "--group", "g0", "--to", "site-b"], capture_output=True, text=True,
                       timeout=90)
    if r.returncode != 0 or "write pause:" not in r.stdout:
        fail(f"switchover exited {r.returncode}: {r.stdout}{r.stderr}")
    print(r.stdout.strip(), flush=True)
    deadline = time.monotonic() + 60
    while status("site-b")["role"] != "primary" or status("site-a")["role"] != "replica":
        if time.monotonic() > deadline:
            fail(f"roles after the switchover: site-a {status('site-a')}, site-b {status('site-b')}")
        time.sleep(0.2)
    data2 = os.urandom(1 << 20)
    h = nbd.NBD()
    h.connect_uri(f"nbd://127.0.0.1:{ports['nbd-b']}/vol0")
    h.pwrite(data2, 8 << 20)
    h.flush()
    h.shutdown()
    last = int(status("site-b")["last_lsn"])
    deadline = time.monotonic() + 60
    while int(status("site-a")["applied_lsn"]) < last:
        if time.monotonic() > deadline:
            fail(f"site-a did not apply site-b's LSN {last}: {status('site-a')}")
        time.sleep(0.2)
    h = nbd.NBD()
    h.connect_uri(f"nbd://127.0.0.1:{ports['nbd-a']}/vol0")
    got2, got1 = h.pread(len(data2), 8 << 20), h.pread(len(data), 4096)
    h.shutdown()
    if got2 != data2 or got1 != data:
        fail("after the switchover site-a's copy differs from what was written")
    print(f"switched over to site-b; its write mirrored back to site-a (LSN {last})", flush=True)

    for site in ("site-a", "site-b"):
        os.killpg(agents[site].pid, signal.SIGTERM)
        while True:
            try:
                msg = notify[site].recv(4096).decode()
            except socket.timeout:
                fail(f"{site}: no STOPPING=1 after SIGTERM")
            if "STOPPING=1" in msg.split("\n"):
                break
        rc = agents[site].wait(60)
        if rc != 0:
            fail(f"{site} exited with {rc}")
        print(f"{site}: STOPPING=1, exit 0", flush=True)
finally:
    for p in agents.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if etcd is not None and etcd.poll() is None:
        etcd.kill()
        etcd.wait()
print("PASS walkthrough")
