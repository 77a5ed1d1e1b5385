// wanemu: a WAN link between two network namespaces, emulated in user space (this kernel has no
// netem). It opens a TUN device in each namespace and relays every packet to the other side after a
// one-way delay, with optional jitter and random loss. Rate limits are left to the kernel's `tbf`
// on the TUN devices (bench/lab does that). One thread per direction; packets of one direction
// leave in the order they came (jitter delays a packet, it never reorders: a packet leaves at
// max(its due time, the previous packet's departure)), as on a real path without reordering.
//
//   wanemu --ns-a NS --dev-a NAME --ns-b NS --dev-b NAME [--delay-ms D] [--jitter-ms J]
//          [--loss-pct P] [--queue-packets N] [--max-seconds S] [--seed X]
//
// Prints "ready" on stdout once both devices exist (configure them then); runs until SIGTERM/SIGINT
// or --max-seconds; prints one JSON line of counters on exit. Exit status 0, or 2 with a message on
// stderr for bad arguments or a device it cannot open.
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

std::atomic<bool> g_stop{false};

void OnSignal(int) { g_stop.store(true); }

[[noreturn]] void Die(const std::string& msg) {
  std::fprintf(stderr, "wanemu: %s\n", msg.c_str());
  std::exit(2);
}

// Opens TUN device `name` inside network namespace `ns` (/var/run/netns/NS) and returns to the
// namespace the thread was in. The fd keeps working from any namespace.
int OpenTun(const std::string& ns, const std::string& name) {
  const int home = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
  if (home < 0) Die("cannot open /proc/self/ns/net: " + std::string(strerror(errno)));
  const std::string path = "/var/run/netns/" + ns;
  const int nsfd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (nsfd < 0) Die("network namespace " + ns + ": " + path + ": " + strerror(errno));
  if (setns(nsfd, CLONE_NEWNET) != 0) Die("setns into " + ns + ": " + strerror(errno));
  close(nsfd);
  const int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) Die("/dev/net/tun: " + std::string(strerror(errno)));
  struct ifreq ifr {};
  ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
  if (name.size() >= IFNAMSIZ) Die("device name too long: " + name);
  std::memcpy(ifr.ifr_name, name.c_str(), name.size());
  if (ioctl(fd, TUNSETIFF, &ifr) != 0) {
    Die("TUNSETIFF " + name + " in " + ns + ": " + strerror(errno));
  }
  if (setns(home, CLONE_NEWNET) != 0) Die("setns back: " + std::string(strerror(errno)));
  close(home);
  return fd;
}

struct Options {
  std::string ns_a, dev_a, ns_b, dev_b;
  double delay_ms = 0, jitter_ms = 0, loss_pct = 0;
  size_t queue_packets = 200000;  // > 2 x BDP of the largest profile at MTU 1500
  double max_seconds = 3600;
  uint64_t seed = 1;
};

struct Counters {
  uint64_t packets = 0, bytes = 0, lost = 0, overflow = 0, write_errors = 0;
  size_t max_queue = 0;
};

struct Packet {
  Clock::time_point due;
  std::vector<char> data;
};

// Relays packets read from `in` to `out`. The queue holds packets in flight on the "wire".
void Relay(int in, int out, const Options& o, uint64_t seed, Counters* c) {
  prctl(PR_SET_TIMERSLACK, 1UL);  // wake up on time: the default 50 us slack adds to every delay
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  const auto delay = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double, std::milli>(o.delay_ms));
  const double jitter_ms = o.jitter_ms;
  std::deque<Packet> wire;
  std::vector<std::vector<char>> spare;  // buffers reused: no allocation per packet
  Clock::time_point last_due{};
  pollfd pfd{in, POLLIN, 0};
  while (!g_stop.load(std::memory_order_relaxed)) {
    // ppoll: nanosecond timeouts, so a 1 ms delay is not rounded up to 2 (poll's unit is 1 ms).
    auto wait = std::chrono::nanoseconds(200'000'000);
    if (!wire.empty()) {
      const auto until =
          std::chrono::duration_cast<std::chrono::nanoseconds>(wire.front().due - Clock::now());
      wait = std::clamp(until, std::chrono::nanoseconds(0), wait);
    }
    const timespec ts{static_cast<time_t>(wait.count() / 1'000'000'000),
                      static_cast<long>(wait.count() % 1'000'000'000)};
    const int n = ppoll(&pfd, 1, &ts, nullptr);
    if (n < 0 && errno != EINTR) Die("poll: " + std::string(strerror(errno)));
    if (n > 0 && (pfd.revents & POLLIN)) {
      for (int i = 0; i < 64; ++i) {  // drain what is there, a bounded number at a time
        std::vector<char> buf;
        if (!spare.empty()) {
          buf = std::move(spare.back());
          spare.pop_back();
        }
        buf.resize(65536);
        const ssize_t r = read(in, buf.data(), buf.size());
        if (r <= 0) {
          spare.push_back(std::move(buf));
          break;
        }
        buf.resize(static_cast<size_t>(r));
        if (o.loss_pct > 0 && uni(rng) * 100.0 < o.loss_pct) {
          ++c->lost;
          spare.push_back(std::move(buf));
          continue;
        }
        if (wire.size() >= o.queue_packets) {
          ++c->overflow;
          spare.push_back(std::move(buf));
          continue;
        }
        auto due = Clock::now() + delay;
        if (jitter_ms > 0) {
          due += std::chrono::duration_cast<Clock::duration>(
              std::chrono::duration<double, std::milli>(uni(rng) * jitter_ms));
        }
        if (due < last_due) due = last_due;  // no reordering
        last_due = due;
        wire.push_back(Packet{due, std::move(buf)});
        if (wire.size() > c->max_queue) c->max_queue = wire.size();
      }
    }
    const auto now = Clock::now();
    while (!wire.empty() && wire.front().due <= now) {
      Packet& p = wire.front();
      if (write(out, p.data.data(), p.data.size()) < 0) {
        ++c->write_errors;  // e.g. the device is down: the packet is lost, as on a cut link
      } else {
        ++c->packets;
        c->bytes += p.data.size();
      }
      if (spare.size() < 4096) spare.push_back(std::move(p.data));
      wire.pop_front();
    }
  }
}

double ParseDouble(std::string_view flag, const char* v) {
  char* end = nullptr;
  errno = 0;
  const double d = std::strtod(v, &end);
  if (errno != 0 || end == v || *end != '\0' || d < 0) {
    Die(std::string(flag) + ": not a non-negative number: " + v);
  }
  return d;
}

Options Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (i + 1 >= argc) Die("missing value after " + std::string(a));
    const char* v = argv[++i];
    if (a == "--ns-a") {
      o.ns_a = v;
    } else if (a == "--dev-a") {
      o.dev_a = v;
    } else if (a == "--ns-b") {
      o.ns_b = v;
    } else if (a == "--dev-b") {
      o.dev_b = v;
    } else if (a == "--delay-ms") {
      o.delay_ms = ParseDouble(a, v);
    } else if (a == "--jitter-ms") {
      o.jitter_ms = ParseDouble(a, v);
    } else if (a == "--loss-pct") {
      o.loss_pct = ParseDouble(a, v);
      if (o.loss_pct > 100) Die("--loss-pct: over 100");
    } else if (a == "--queue-packets") {
      o.queue_packets = static_cast<size_t>(ParseDouble(a, v));
    } else if (a == "--max-seconds") {
      o.max_seconds = ParseDouble(a, v);
    } else if (a == "--seed") {
      o.seed = static_cast<uint64_t>(ParseDouble(a, v));
    } else {
      Die("unknown argument " + std::string(a));
    }
  }
  if (o.ns_a.empty() || o.ns_b.empty() || o.dev_a.empty() || o.dev_b.empty()) {
    Die("--ns-a, --dev-a, --ns-b and --dev-b are required");
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = Parse(argc, argv);
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  const int a = OpenTun(o.ns_a, o.dev_a);
  const int b = OpenTun(o.ns_b, o.dev_b);
  std::printf("ready\n");
  std::fflush(stdout);
  Counters ab, ba;
  std::thread t1(Relay, a, b, std::cref(o), o.seed, &ab);
  std::thread t2(Relay, b, a, std::cref(o), o.seed * 7919 + 1, &ba);
  const auto end = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                      std::chrono::duration<double>(o.max_seconds));
  while (!g_stop.load() && Clock::now() < end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  g_stop.store(true);
  t1.join();
  t2.join();
  std::printf(
      "{\"a_to_b\":{\"packets\":%llu,\"bytes\":%llu,\"lost\":%llu,\"overflow\":%llu,"
      "\"write_errors\":%llu,\"max_queue\":%zu},"
      "\"b_to_a\":{\"packets\":%llu,\"bytes\":%llu,\"lost\":%llu,\"overflow\":%llu,"
      "\"write_errors\":%llu,\"max_queue\":%zu}}\n",
      static_cast<unsigned long long>(ab.packets), static_cast<unsigned long long>(ab.bytes),
      static_cast<unsigned long long>(ab.lost), static_cast<unsigned long long>(ab.overflow),
      static_cast<unsigned long long>(ab.write_errors), ab.max_queue,
      static_cast<unsigned long long>(ba.packets), static_cast<unsigned long long>(ba.bytes),
      static_cast<unsigned long long>(ba.lost), static_cast<unsigned long long>(ba.overflow),
      static_cast<unsigned long long>(ba.write_errors), ba.max_queue);
  close(a);
  close(b);
  return 0;
}
