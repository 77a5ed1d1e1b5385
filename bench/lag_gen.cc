// lag_gen: an open-loop NBD write generator that measures async replication lag per write, on one
// clock (both sites run on this host, CLOCK_MONOTONIC).
//
// Write i is due at start + i * bs / rate ("intended time") and is sent then, whether or not the
// earlier ones completed (open loop: a slow server does not slow the load down, so there is no
// coordinated omission). Latencies count from the intended time, not the send time.
//
// Which LSN each write got: the writes go over one NBD connection, which the agent appends in the
// order it reads them, with nothing else writing the group; write i is then LSN base + 1 + i, where
// base is the primary's last LSN before the run. The run checks that the primary's last LSN ends at
// exactly base + N and fails otherwise.
//
// When each LSN became durable at the replica: a thread polls the replica's control socket
// (Status, the group's durable_lsn) every --poll-us and records each advance with its time. A
// write's lag is (first poll that saw its LSN durable) - (its intended time), so each lag is an
// upper bound, too high by at most one poll period plus one Status call (both printed).
//
//   lag_gen --nbd URI --primary-control SOCK --replica-control SOCK [--group g0] --rate BYTES/s
//           [--bs BYTES] [--seconds S] [--region BYTES] [--max-in-flight N] [--poll-us US]
//           [--csv FILE] [--compressible PERCENT]
//
// Prints one JSON object on stdout. Exit 0, 1 if the run failed (NBD error, LSN mapping broken, the
// replica never caught up), 2 for bad arguments.
#include <grpcpp/grpcpp.h>
#include <libnbd.h>
#include <poll.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "tvilling/v1/control.grpc.pb.h"

namespace {

using Clock = std::chrono::steady_clock;
namespace v1 = ::tvilling::v1;

[[noreturn]] void Usage(const std::string& msg) {
  std::fprintf(stderr, "lag_gen: %s\n", msg.c_str());
  std::exit(2);
}

[[noreturn]] void Fail(const std::string& msg) {
  std::fprintf(stderr, "lag_gen: %s\n", msg.c_str());
  std::exit(1);
}

struct Options {
  std::string nbd_uri, primary_control, replica_control, group = "g0", csv;
  double rate = 0;  // bytes per second
  uint64_t bs = 65536;
  double seconds = 30;
  uint64_t region = 1ull << 30;
  int max_in_flight = 1024;
  int poll_us = 1000;
  int compressible = 0;  // percent of each block that is zeros (fio's buffer_compress_percentage)
};

double Num(std::string_view flag, const char* v) {
  char* end = nullptr;
  const double d = std::strtod(v, &end);
  if (end == v || *end != '\0' || !(d >= 0)) Usage(std::string(flag) + ": not a number: " + v);
  return d;
}

Options Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (i + 1 >= argc) Usage("missing value after " + std::string(a));
    const char* v = argv[++i];
    if (a == "--nbd") {
      o.nbd_uri = v;
    } else if (a == "--primary-control") {
      o.primary_control = v;
    } else if (a == "--replica-control") {
      o.replica_control = v;
    } else if (a == "--group") {
      o.group = v;
    } else if (a == "--csv") {
      o.csv = v;
    } else if (a == "--rate") {
      o.rate = Num(a, v);
    } else if (a == "--bs") {
      o.bs = static_cast<uint64_t>(Num(a, v));
    } else if (a == "--seconds") {
      o.seconds = Num(a, v);
    } else if (a == "--region") {
      o.region = static_cast<uint64_t>(Num(a, v));
    } else if (a == "--max-in-flight") {
      o.max_in_flight = static_cast<int>(Num(a, v));
    } else if (a == "--poll-us") {
      o.poll_us = static_cast<int>(Num(a, v));
    } else if (a == "--compressible") {
      o.compressible = static_cast<int>(Num(a, v));
    } else {
      Usage("unknown argument " + std::string(a));
    }
  }
  if (o.nbd_uri.empty() || o.primary_control.empty() || o.replica_control.empty()) {
    Usage("--nbd, --primary-control and --replica-control are required");
  }
  if (o.rate <= 0) Usage("--rate must be > 0 (bytes per second)");
  if (o.bs == 0 || o.bs % 512 != 0) Usage("--bs must be a positive multiple of 512");
  if (o.region < o.bs) Usage("--region must hold at least one block");
  if (o.max_in_flight < 1) Usage("--max-in-flight must be >= 1");
  if (o.poll_us < 50) Usage("--poll-us must be >= 50");
  if (o.compressible < 0 || o.compressible > 100) Usage("--compressible must be 0..100");
  return o;
}

class Control {
 public:
  explicit Control(const std::string& socket)
      : stub_(v1::Control::NewStub(
            grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials()))),
        socket_(socket) {}

  // The group's {last_lsn, durable_lsn}; nullopt if the call failed.
  std::optional<std::pair<uint64_t, uint64_t>> Lsns(const std::string& group) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::StatusReply reply;
    if (!stub_->Status(&ctx, v1::StatusRequest(), &reply).ok()) return std::nullopt;
    for (const auto& g : reply.groups()) {
      if (g.name() == group) return std::make_pair(g.last_lsn(), g.durable_lsn());
    }
    Fail("group " + group + " not found at " + socket_);
  }

 private:
  std::unique_ptr<v1::Control::Stub> stub_;
  std::string socket_;
};

struct Sample {
  int64_t t_ns;
  uint64_t durable;
};

int64_t Ns(Clock::time_point t, Clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t - t0).count();
}

double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(std::ceil(q * v.size())) - 1);
  return v[q <= 0 ? 0 : i];
}

struct Write {
  int64_t intended_ns = 0;
  int64_t sent_ns = 0;
  int64_t completed_ns = -1;
  int error = 0;
};

struct Ctx {
  Write* w;
  Clock::time_point t0;
  int* in_flight;
};

int OnComplete(void* user, int* error) {
  auto* c = static_cast<Ctx*>(user);
  c->w->completed_ns = Ns(Clock::now(), c->t0);
  c->w->error = *error;
  --*c->in_flight;
  return 1;  // retire the command
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = Parse(argc, argv);
  Control primary(o.primary_control), replica(o.replica_control);
  const auto p0 = primary.Lsns(o.group);
  if (!p0) Fail("cannot read the primary's status on " + o.primary_control);
  const uint64_t base = p0->first;

  nbd_handle* h = nbd_create();
  if (h == nullptr || nbd_connect_uri(h, o.nbd_uri.c_str()) != 0) {
    Fail(std::string("NBD connect ") + o.nbd_uri + ": " + nbd_get_error());
  }
  const int64_t size = nbd_get_size(h);
  const uint64_t region = std::min<uint64_t>(o.region, static_cast<uint64_t>(size));
  const uint64_t blocks = region / o.bs;

  // Payload: random bytes (incompressible), or with the first `compressible` % zeroed.
  std::vector<char> buf(o.bs);
  std::mt19937_64 rng(42);
  for (auto& b : buf) b = static_cast<char>(rng());
  std::fill(buf.begin(), buf.begin() + static_cast<long>(o.bs * o.compressible / 100), 0);

  const uint64_t n = static_cast<uint64_t>(o.rate * o.seconds / static_cast<double>(o.bs));
  if (n == 0) Usage("--rate x --seconds is less than one block");
  const double interval_ns = 1e9 * static_cast<double>(o.bs) / o.rate;
  std::vector<Write> writes(n);
  std::vector<Ctx> ctxs(n);

  // The replica poller.
  std::vector<Sample> samples;
  samples.reserve(1 << 20);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> polls{0};
  std::atomic<int64_t> poll_call_ns_total{0};
  const auto t0 = Clock::now() + std::chrono::milliseconds(200);  // time to start the poller
  std::thread poller([&] {
    uint64_t last = 0;
    auto next = Clock::now();
    while (!stop.load()) {
      const auto before = Clock::now();
      const auto l = replica.Lsns(o.group);
      const auto after = Clock::now();
      ++polls;
      poll_call_ns_total += Ns(after, before);
      if (l && (samples.empty() || l->second != last)) {
        last = l->second;
        samples.push_back({Ns(after, t0), l->second});
      }
      next += std::chrono::microseconds(o.poll_us);
      if (next < after) next = after;
      std::this_thread::sleep_until(next);
    }
  });

  int in_flight = 0;
  uint64_t issued = 0, max_in_flight_seen = 0, late = 0;
  const int fd = nbd_aio_get_fd(h);
  std::this_thread::sleep_until(t0);
  while (issued < n || in_flight > 0) {
    const auto now = Clock::now();
    const int64_t now_ns = Ns(now, t0);
    while (issued < n && static_cast<double>(issued) * interval_ns <= static_cast<double>(now_ns)) {
      if (in_flight >= o.max_in_flight) break;  // sent late; measured from its intended time
      Write& w = writes[issued];
      w.intended_ns = static_cast<int64_t>(static_cast<double>(issued) * interval_ns);
      w.sent_ns = now_ns;
      ctxs[issued] = Ctx{&w, t0, &in_flight};
      const uint64_t off = (issued % blocks) * o.bs;
      nbd_completion_callback cb{OnComplete, &ctxs[issued], nullptr};
      if (nbd_aio_pwrite(h, buf.data(), o.bs, off, cb, 0) < 0) {
        Fail(std::string("NBD write: ") + nbd_get_error());
      }
      ++in_flight;
      ++issued;
      max_in_flight_seen = std::max<uint64_t>(max_in_flight_seen, in_flight);
    }
    // Wait for the socket or the next write's intended time, whichever comes first.
    int64_t wait_ns = 100'000'000;
    if (issued < n && in_flight < o.max_in_flight) {
      wait_ns =
          std::max<int64_t>(0, static_cast<int64_t>(static_cast<double>(issued) * interval_ns) -
                                   Ns(Clock::now(), t0));
    }
    const unsigned dir = nbd_aio_get_direction(h);
    pollfd pfd{fd, 0, 0};
    if (dir & LIBNBD_AIO_DIRECTION_READ) pfd.events |= POLLIN;
    if (dir & LIBNBD_AIO_DIRECTION_WRITE) pfd.events |= POLLOUT;
    const timespec ts{static_cast<time_t>(wait_ns / 1'000'000'000),
                      static_cast<long>(wait_ns % 1'000'000'000)};
    const int r = ppoll(&pfd, 1, &ts, nullptr);
    if (r < 0 && errno != EINTR) Fail(std::string("ppoll: ") + strerror(errno));
    if (r > 0) {
      if (pfd.revents & (POLLIN | POLLHUP | POLLERR)) {
        if (nbd_aio_notify_read(h) < 0) Fail(std::string("NBD: ") + nbd_get_error());
      }
      if (pfd.revents & POLLOUT) {
        if (nbd_aio_notify_write(h) < 0) Fail(std::string("NBD: ") + nbd_get_error());
      }
    }
  }
  const int64_t load_end_ns = Ns(Clock::now(), t0);
  for (const Write& w : writes) {
    if (w.error != 0) Fail("an NBD write failed: " + std::string(strerror(w.error)));
    if (w.sent_ns - w.intended_ns > 1'000'000) ++late;  // sent over 1 ms after its time
  }

  const auto p1 = primary.Lsns(o.group);
  if (!p1) Fail("cannot read the primary's status after the run");
  if (p1->first != base + n) {
    Fail("the primary's log went from LSN " + std::to_string(base) + " to " +
         std::to_string(p1->first) + ", not by exactly the " + std::to_string(n) +
         " writes sent: another writer, or writes split into several records; the LSN of each "
         "write is unknown");
  }
  // Wait (at most 120 s) until the replica has all of it durable.
  const auto deadline = Clock::now() + std::chrono::seconds(120);
  while (true) {
    {
      // samples is written by the poller only; read its last value through a status call instead
      const auto l = replica.Lsns(o.group);
      if (l && l->second >= base + n) break;
    }
    if (Clock::now() > deadline) {
      stop = true;
      poller.join();
      Fail("the replica did not make LSN " + std::to_string(base + n) + " durable within 120 s");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  std::this_thread::sleep_for(std::chrono::microseconds(3 * o.poll_us));
  stop = true;
  poller.join();
  nbd_shutdown(h, 0);
  nbd_close(h);

  // Per write: completion at the primary and durability at the replica, from the intended time.
  std::vector<double> ack_ms, lag_ms;
  ack_ms.reserve(n);
  lag_ms.reserve(n);
  std::vector<double> lag_t, lag_v;  // for the slope
  FILE* csv = o.csv.empty() ? nullptr : std::fopen(o.csv.c_str(), "w");
  if (csv) std::fprintf(csv, "intended_s,ack_ms,lag_ms\n");
  size_t si = 0;
  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t lsn = base + 1 + i;
    while (si < samples.size() && samples[si].durable < lsn) ++si;
    if (si == samples.size()) Fail("no poll saw LSN " + std::to_string(lsn) + " durable");
    const Write& w = writes[i];
    const double ack = static_cast<double>(w.completed_ns - w.intended_ns) / 1e6;
    const double lag = static_cast<double>(samples[si].t_ns - w.intended_ns) / 1e6;
    ack_ms.push_back(ack);
    lag_ms.push_back(lag);
    lag_t.push_back(static_cast<double>(w.intended_ns) / 1e9);
    lag_v.push_back(lag);
    if (csv)
      std::fprintf(csv, "%.6f,%.3f,%.3f\n", static_cast<double>(w.intended_ns) / 1e9, ack, lag);
  }
  if (csv) std::fclose(csv);
  // Slope of lag over the last 30 s of the load (or its second half if shorter): ms per second.
  const double span = std::min(30.0, o.seconds / 2);
  const double from = static_cast<double>(n) * interval_ns / 1e9 - span;
  double sx = 0, sy = 0, sxx = 0, sxy = 0, k = 0;
  for (size_t i = 0; i < lag_t.size(); ++i) {
    if (lag_t[i] < from) continue;
    sx += lag_t[i];
    sy += lag_v[i];
    sxx += lag_t[i] * lag_t[i];
    sxy += lag_t[i] * lag_v[i];
    ++k;
  }
  const double slope = k > 1 ? (k * sxy - sx * sy) / (k * sxx - sx * sx) : NAN;
  const double achieved = static_cast<double>(n * o.bs) / (static_cast<double>(load_end_ns) / 1e9);
  const double poll_call_us =
      polls ? static_cast<double>(poll_call_ns_total.load()) / static_cast<double>(polls) / 1e3 : 0;
  std::printf(
      "{\"writes\":%llu,\"bs\":%llu,\"rate_bytes_per_s\":%.0f,\"achieved_bytes_per_s\":%.0f,"
      "\"late_sends\":%llu,\"max_in_flight\":%llu,\"first_lsn\":%llu,"
      "\"ack_ms\":{\"p50\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f},"
      "\"lag_ms\":{\"p50\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f},"
      "\"lag_slope_ms_per_s\":%.4f,\"slope_window_s\":%.1f,"
      "\"poll_period_us\":%d,\"poll_call_us\":%.1f,\"polls\":%llu}\n",
      static_cast<unsigned long long>(n), static_cast<unsigned long long>(o.bs), o.rate, achieved,
      static_cast<unsigned long long>(late), static_cast<unsigned long long>(max_in_flight_seen),
      static_cast<unsigned long long>(base + 1), Percentile(ack_ms, 0.5), Percentile(ack_ms, 0.99),
      Percentile(ack_ms, 0.999), Percentile(ack_ms, 1.0), Percentile(lag_ms, 0.5),
      Percentile(lag_ms, 0.99), Percentile(lag_ms, 0.999), Percentile(lag_ms, 1.0), slope, span,
      o.poll_us, poll_call_us, static_cast<unsigned long long>(polls.load()));
  return 0;
}
