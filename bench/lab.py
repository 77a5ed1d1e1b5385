"""lab.py: the WAN lab's sites and links (used by bench/run).

Two sites are two network namespaces, `tvl<tag>a` and `tvl<tag>b`, addressed 10.213.<n>.1 and
10.213.<n>.2. With `sites=3` (bench/failover_bench.py: a witness site) there is a third, `tvl<tag>c`
at 10.213.<n>.3, and every pair of sites has its own link of the same profile (a triangle: each
namespace keeps its one address on every link, with a host route to each peer). A link is

  - `lan`: a veth pair, nothing added;
  - every other profile: two TUN devices relayed by bench/wanemu (one-way delay, optional jitter and
    loss in user space; this kernel has no netem), rate-shaped with `tbf` on both TUN devices.

MTU 9000 on every link (wanemu relays ~0.85 Gbit/s at MTU 1500 and ~2-3 Gbit/s at MTU 9000 on this
machine; its ceiling is measured and printed in every run). TCP buffers in both namespaces are
raised to >= 2 x BDP of the profile, and the congestion control is pinned; both are recorded.

Everything the lab starts is stopped by PID, and the namespaces are deleted by name, also when a run
fails half-way (Lab.close, registered by the caller in a finally block).
"""

import json
import os
import re
import signal
import statistics
import subprocess
import time

# name: (one-way delay ms, rate for tbf or None, loss percent)
PROFILES = {
    "lan": (0.0, None, 0.0),
    "metro": (1.0, "1gbit", 0.0),
    "regional": (10.0, "1gbit", 0.0),
    "continental": (25.0, "1gbit", 0.0),
    "continental-loss": (25.0, "1gbit", 0.1),
    "continental-200m": (25.0, "200mbit", 0.0),
    "continental-200m-loss": (25.0, "200mbit", 0.1),
}
RATE_BITS = {"1gbit": 1e9, "200mbit": 2e8}
MTU = 9000


def sh(*cmd, check=True, timeout=60, capture=True):
    r = subprocess.run(list(cmd), capture_output=capture, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: rc {r.returncode}: {r.stderr.strip()}")
    return r


class Lab:
    def __init__(self, wanemu, tag, net_index=0, sites=2, congestion_control="cubic"):
        if sites not in (2, 3):
            raise ValueError(f"Lab: sites must be 2 or 3, not {sites}")
        self.wanemu_bin = wanemu
        self.ns = tuple(f"tvl{tag}{x}" for x in "abc"[:sites])
        self.ip = tuple(f"10.213.{net_index}.{i + 1}" for i in range(sites))
        self.dev = ("tvlA", "tvlB")
        # Every pair of sites has a link; the first (a-b) keeps the historical device names.
        self.pairs = [(0, 1)] if sites == 2 else [(0, 1), (0, 2), (1, 2)]
        self.wanemu = None  # the a-b link's relay
        self.extra_wanemus = []  # the relays of the other pairs (sites=3)
        self.procs = []  # other servers started in the namespaces (iperf3, nbdkit, ...)
        self.profile = None
        self.sysctls = {}
        self.host_sysctls = {}  # host values changed, restored by close()
        # cubic, Linux's default, unless asked otherwise. Not bbr: BBR (v1) drops its window to 4
        # packets for 200 ms every 10 s without a new minimum RTT (PROBE_RTT), which an
        # application-limited replication stream does not refresh: a ~230 ms lag spike every 10-30 s
        # on `regional` (docs/benchmarks.md, "Congestion control and the shared disk").
        self.congestion_control = congestion_control
        try:
            for ns in self.ns:
                sh("ip", "netns", "del", ns, check=False)  # left over by a killed run
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            self._tune_tcp()
        except BaseException:
            self.close()
            raise

    # --- links ---

    def _tune_tcp(self):
        # 1 Gbit x 50 ms RTT = 6.25 MB in flight; 64 MiB covers 2 x BDP of every profile.
        big = 64 << 20
        for ns in self.ns:
            for key, val in (("net.ipv4.tcp_rmem", f"4096 131072 {big}"),
                             ("net.ipv4.tcp_wmem", f"4096 16384 {big}")):
                sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={val}")
            # A namespace may only pick an algorithm the host allows.
            cc = self.congestion_control
            key = "net.ipv4.tcp_allowed_congestion_control"
            allowed = sh("sysctl", "-n", key).stdout.split()
            if cc not in allowed:
                self.host_sysctls.setdefault(key, " ".join(allowed))
                sh("sysctl", "-q", "-w", f"{key}={' '.join(allowed + [cc])}")
            sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w",
               f"net.ipv4.tcp_congestion_control={cc}")
        # The socket buffer caps of net.core are not per namespace on every kernel: set them where
        # the namespace has them, else on the host, and record what is in force.
        # (sysctl exits 0 even when the namespace refuses the key: read the value back.) The host
        # values are restored by close().
        for key in ("net.core.rmem_max", "net.core.wmem_max"):
            sh("ip", "netns", "exec", self.ns[0], "sysctl", "-q", "-w", f"{key}={big}",
               check=False)
            now = sh("ip", "netns", "exec", self.ns[0], "sysctl", "-n", key).stdout.strip()
            if int(now) < big:
                self.host_sysctls[key] = sh("sysctl", "-n", key).stdout.strip()
                sh("sysctl", "-q", "-w", f"{key}={big}")
        for key in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem", "net.core.rmem_max",
                    "net.core.wmem_max", "net.ipv4.tcp_congestion_control"):
            self.sysctls[key] = sh("ip", "netns", "exec", self.ns[0], "sysctl", "-n",
                                   key).stdout.strip()

    def _stop_link(self):
        if self.wanemu is not None:
            self.wanemu.send_signal(signal.SIGTERM)
            try:
                out, _ = self.wanemu.communicate(timeout=10)
                self.last_wanemu_counters = out.strip().splitlines()[-1] if out.strip() else ""
            except subprocess.TimeoutExpired:
                self.wanemu.kill()
                self.wanemu.wait()
            self.wanemu = None
        for p in self.extra_wanemus:
            p.send_signal(signal.SIGTERM)
            try:
                p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.extra_wanemus = []
        for ns, dev in zip(self.ns, ("tvlvA", "tvlvB")):
            sh("ip", "-n", ns, "link", "del", dev, check=False)
        for i, j in self.pairs[1:]:
            sh("ip", "-n", self.ns[i], "link", "del", self._pair_dev(i, j, veth=True), check=False)

    @staticmethod
    def _pair_dev(i, j, veth):
        """Device name in site i's namespace for its link to site j (pairs after a-b)."""
        return f"tvl{'v' if veth else ''}{'abc'[i]}{'abc'[j]}"

    def _start_wanemu(self, ns_a, dev_a, ns_b, dev_b, d, l):
        p = subprocess.Popen(
            [self.wanemu_bin, "--ns-a", ns_a, "--dev-a", dev_a, "--ns-b", ns_b, "--dev-b", dev_b,
             "--delay-ms", str(d), "--loss-pct", str(l), "--max-seconds", "7200"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        line = p.stdout.readline().strip()
        if line != "ready":
            err = p.stderr.read() if p.poll() is not None else ""
            if p.poll() is None:
                p.kill()
                p.wait()
            raise RuntimeError(f"wanemu ({ns_a} <-> {ns_b}) did not start: {line} {err}")
        return p

    def _shape(self, ns, dev, r, d):
        if r:
            # burst >= rate x 1 ms keeps tbf's timer from capping the rate; the queue holds
            # 2 x BDP so that the shaper, not a tail drop, sets the pace.
            bits = RATE_BITS[r]
            burst = max(int(bits / 8 / 1000), 64 * 1024)
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
               "rate", r, "burst", str(burst), "latency", f"{max(50, int(4 * d) + 20)}ms")

    def _extra_links(self, profile, d, r, l):
        """The links of the pairs after a-b (sites=3): point-to-point addresses, so that each
        namespace keeps one address and reaches each peer over that peer's own link."""
        for i, j in self.pairs[1:]:
            if profile == "lan":
                di, dj = self._pair_dev(i, j, True), self._pair_dev(j, i, True)
                sh("ip", "link", "add", di, "netns", self.ns[i], "type", "veth", "peer", "name",
                   dj, "netns", self.ns[j])
            else:
                di, dj = self._pair_dev(i, j, False), self._pair_dev(j, i, False)
                self.extra_wanemus.append(
                    self._start_wanemu(self.ns[i], di, self.ns[j], dj, d, l))
            for ns, dev, mine, peer in ((self.ns[i], di, self.ip[i], self.ip[j]),
                                        (self.ns[j], dj, self.ip[j], self.ip[i])):
                sh("ip", "-n", ns, "addr", "add", mine, "peer", peer, "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "mtu", str(MTU), "up")
                if profile != "lan":
                    self._shape(ns, dev, r, d)

    def link(self, profile, delay_ms=None, rate=None, loss=None):
        """(Re)builds the link for `profile`, or with explicit overrides (e.g. delay 0 and no rate
        for the emulator's ceiling)."""
        self._stop_link()
        d, r, l = PROFILES[profile]
        d = d if delay_ms is None else delay_ms
        r = r if rate is None else (None if rate == "none" else rate)
        l = l if loss is None else loss
        self.profile = profile
        if profile == "lan":
            devs = ("tvlvA", "tvlvB")
            sh("ip", "link", "add", devs[0], "netns", self.ns[0], "type", "veth", "peer", "name",
               devs[1], "netns", self.ns[1])
            for ns, dev, mine, peer in ((self.ns[0], devs[0], self.ip[0], self.ip[1]),
                                        (self.ns[1], devs[1], self.ip[1], self.ip[0])):
                sh("ip", "-n", ns, "addr", "add", f"{mine}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "mtu", str(MTU), "up")
            self.devs = devs
            self._extra_links(profile, d, r, l)
            return
        self.wanemu = self._start_wanemu(self.ns[0], self.dev[0], self.ns[1], self.dev[1], d, l)
        for ns, dev, mine, peer in ((self.ns[0], self.dev[0], self.ip[0], self.ip[1]),
                                    (self.ns[1], self.dev[1], self.ip[1], self.ip[0])):
            sh("ip", "-n", ns, "addr", "add", mine, "peer", peer, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "mtu", str(MTU), "up")
            self._shape(ns, dev, r, d)
        self.devs = self.dev
        self._extra_links(profile, d, r, l)

    # --- processes in the namespaces ---

    def spawn(self, side, cmd, **kw):
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[side]] + cmd,
                             start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM):
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def close(self):
        for p in list(self.procs):
            self.stop(p)
        self._stop_link()
        for ns in self.ns:
            sh("ip", "netns", "del", ns, check=False)
        for key, val in getattr(self, "host_sysctls", {}).items():
            sh("sysctl", "-q", "-w", f"{key}={val}", check=False)
        self.host_sysctls = {}

    # --- measurements of the link itself ---

    def ping_rtt_ms(self, count=20, src=0, dst=1):
        rtts = []
        r = sh("ip", "netns", "exec", self.ns[src], "ping", "-c", str(count), "-i", "0.05",
               self.ip[dst], timeout=60)
        for m in re.finditer(r"time=([\d.]+) ms", r.stdout):
            rtts.append(float(m.group(1)))
        rtts.sort()
        return {"p50": statistics.median(rtts), "min": rtts[0], "max": rtts[-1]}

    # The TCP counters of a site's namespace (what a run cost in retransmissions and timeouts) and
    # the drops of its shaper: where a lag spike of ~200 ms comes from (a retransmission timeout).
    TCP_COUNTERS = ("TcpRetransSegs", "TcpExtTCPTimeouts", "TcpExtTCPLossProbes",
                    "TcpExtTCPFastRetrans", "TcpExtTCPSpuriousRTOs")

    def net_counters(self, side=0):
        out = {}
        r = sh("ip", "netns", "exec", self.ns[side], "nstat", "-saz", check=False)
        for line in r.stdout.splitlines():
            f = line.split()
            if len(f) >= 2 and f[0] in self.TCP_COUNTERS:
                out[f[0]] = int(f[1])
        devs = getattr(self, "devs", None) or self.dev
        r = sh("ip", "netns", "exec", self.ns[side], "tc", "-s", "qdisc", "show", "dev",
               devs[side], check=False)
        m = re.search(r"dropped (\d+)", r.stdout)
        out["qdisc_dropped"] = int(m.group(1)) if m else 0
        return out

    @staticmethod
    def counters_delta(before, after):
        return {k: after.get(k, 0) - before.get(k, 0) for k in after}

    def iperf3(self, seconds=5, streams=1):
        """Single-stream (or -P streams) TCP goodput from site A to site B, bytes per second."""
        srv = self.spawn(1, ["iperf3", "-s", "-1", "-B", self.ip[1]], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            r = sh("ip", "netns", "exec", self.ns[0], "iperf3", "-c", self.ip[1], "-t",
                   str(seconds), "-P", str(streams), "-J", timeout=seconds + 30)
            j = json.loads(r.stdout)
            end = j["end"]
            return {"bytes_per_s": end["sum_received"]["bits_per_second"] / 8,
                    "retransmits": end["sum_sent"].get("retransmits", 0)}
        finally:
            self.stop(srv)
