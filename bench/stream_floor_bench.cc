// stream_floor_bench.cc: the round-trip floors under a sync write (issue 4). One bidi stream of
// Replication.Stream on 127.0.0.1 carries a 4 KiB Batch from the "primary" and a ~32-byte Position
// back from the "replica", at QD1, one round trip at a time; the client's sending thread waits for
// the reply as the committer waits for the ack. The server side runs in a child process (the same
// binary with --serve), as the replica does; --one-process keeps both sides here. Variants:
//   tcp      a plain TCP socket, one blocking thread per side (the floor of the wire)
//   cb       gRPC's callback API: minimal reactors on both sides (as agent/transport/stream.cc)
//   cq       gRPC's completion-queue async API: one thread per side polling its own CQ
//   product  agent/transport's ReplicationServer + ClientStream (whatever stream.cc is now)
// each without TLS and with mutual TLS (the dev PKI); repetitions interleaved (every variant once
// per repetition), p50/p99 of each repetition, then the medians over repetitions.
//
// Each process also runs a sync gRPC server with one poller, as tvillingd does for its control
// socket (--no-control-server: without). Reported: p50, p99 and the CPU time of both processes
// per round trip.
//
//   stream_floor_bench --pki deploy/pki/make-dev-pki.sh [--rounds 3000] [--reps 5] [--only a,b]
//                      [--one-process] [--no-control-server]
//
// GRPC_POLL_STRATEGY=poll in the environment selects gRPC's poll engine for both processes (the
// completion queue pays only with it; docs/benchmarks.md, "The round-trip floors").
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "agent/transport/stream.h"
#include "agent/transport/tls.h"
#include "tvilling/v1/replication.grpc.pb.h"

namespace {

namespace v1 = ::tvilling::v1;
namespace tr = ::tvilling::transport;
using Clock = std::chrono::steady_clock;

constexpr size_t kPayloadBytes = 4096;
constexpr size_t kReplyBytes = 32;

v1::ToReplica Request(uint64_t lsn) {
  v1::ToReplica m;
  auto* b = m.mutable_batch();
  b->set_epoch(1);
  b->set_first_lsn(lsn);
  b->set_record_count(1);
  b->set_records(std::string(kPayloadBytes, 'x'));
  b->set_durable_requested(true);
  return m;
}

v1::FromReplica Reply(uint64_t lsn) {
  lsn += uint64_t{1} << 40;  // LSNs of a long-lived log: ~32 bytes on the wire
  v1::FromReplica m;
  auto* p = m.mutable_position();
  p->set_epoch(1);
  p->set_received_lsn(lsn);
  p->set_durable_lsn(lsn);
  p->set_applied_lsn(lsn);
  return m;
}

// One waiter for one reply at a time: the client's callback thread sets it, the sender waits.
class Latch {
 public:
  void Set() {
    {
      std::lock_guard<std::mutex> l(mu_);
      set_ = true;
    }
    cv_.notify_one();
  }
  void WaitAndReset() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return set_; });
    set_ = false;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool set_ = false;
};

// One write in flight per stream (gRPC's rule): a message to send while one is being written
// waits here (at QD1 at most one does: a reply can overtake its write's completion).
template <class Msg>
class WriteGate {
 public:
  // Returns the message to write now, or nullptr if it has to wait for the write in flight.
  Msg* Offer(Msg m) {
    std::lock_guard<std::mutex> l(mu_);
    if (writing_) {
      next_ = std::move(m);
      has_next_ = true;
      return nullptr;
    }
    writing_ = true;
    cur_ = std::move(m);
    return &cur_;
  }
  // A write completed: the next message to write, or nullptr.
  Msg* Done() {
    std::lock_guard<std::mutex> l(mu_);
    if (!has_next_) {
      writing_ = false;
      return nullptr;
    }
    has_next_ = false;
    cur_ = std::move(next_);
    return &cur_;
  }

 private:
  std::mutex mu_;
  bool writing_ = false, has_next_ = false;
  Msg cur_, next_;
};

// Sends one request and waits for its reply; returns false when the stream broke. A pair is
// both sides in this process (remote_port 0), only the server side (remote_port -1: the child
// process of --serve), or only the client side connected to a child's port.
struct Pair {
  virtual ~Pair() = default;
  virtual bool RoundTrip(uint64_t lsn) = 0;
  virtual int port() const = 0;
};

// ---- tcp ------------------------------------------------------------------------------------

bool ReadFull(int fd, char* p, size_t n) {
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}
bool WriteFull(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t r = write(fd, p, n);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

class TcpPair final : public Pair {
 public:
  explicit TcpPair(int remote_port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(std::max(remote_port, 0)));
    int ls = -1;
    if (remote_port <= 0) {
      ls = socket(AF_INET, SOCK_STREAM, 0);
      if (bind(ls, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || listen(ls, 1) != 0) {
        std::perror("tcp listen");
        std::exit(1);
      }
      socklen_t len = sizeof a;
      getsockname(ls, reinterpret_cast<sockaddr*>(&a), &len);
      port_ = ntohs(a.sin_port);
      thread_ = std::thread([this, ls] {
        server_ = accept(ls, nullptr, nullptr);
        close(ls);
        int one = 1;
        setsockopt(server_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        std::vector<char> in(kPayloadBytes), out(kReplyBytes, 'y');
        while (ReadFull(server_, in.data(), in.size())) {
          if (!WriteFull(server_, out.data(), out.size())) break;
        }
      });
    }
    if (remote_port < 0) return;
    client_ = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(client_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      std::perror("tcp connect");
      std::exit(1);
    }
    int one = 1;
    setsockopt(client_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  ~TcpPair() override {
    if (client_ >= 0) shutdown(client_, SHUT_RDWR);
    if (thread_.joinable()) thread_.join();
    if (client_ >= 0) close(client_);
    if (server_ >= 0) close(server_);
  }
  int port() const override { return port_; }
  bool RoundTrip(uint64_t) override {
    return WriteFull(client_, out_.data(), out_.size()) &&
           ReadFull(client_, in_.data(), in_.size());
  }

 private:
  int client_ = -1, server_ = -1, port_ = 0;
  std::thread thread_;
  std::vector<char> out_ = std::vector<char>(kPayloadBytes, 'x');
  std::vector<char> in_ = std::vector<char>(kReplyBytes);
};

// ---- gRPC common ----------------------------------------------------------------------------

struct Creds {
  std::shared_ptr<grpc::ServerCredentials> server;
  std::shared_ptr<grpc::ChannelCredentials> channel;
};

std::unique_ptr<grpc::Server> BuildServer(grpc::Service* service, const Creds& creds, int* port,
                                          std::unique_ptr<grpc::ServerCompletionQueue>* cq) {
  grpc::ServerBuilder b;
  b.AddListeningPort("127.0.0.1:0", creds.server, port);
  b.RegisterService(service);
  b.SetMaxReceiveMessageSize(tr::kMaxMessageBytes);
  b.SetMaxSendMessageSize(tr::kMaxMessageBytes);
  if (cq != nullptr) *cq = b.AddCompletionQueue();
  auto s = b.BuildAndStart();
  if (!s) {
    std::fprintf(stderr, "cannot start the gRPC server\n");
    std::exit(1);
  }
  return s;
}

// ---- cb: the callback API -------------------------------------------------------------------

class CbServerReactor final : public grpc::ServerBidiReactor<v1::ToReplica, v1::FromReplica> {
 public:
  CbServerReactor() { StartRead(&in_); }
  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::OK);
      return;
    }
    if (auto* m = gate_.Offer(Reply(in_.batch().first_lsn()))) StartWrite(m);
    StartRead(&in_);
  }
  void OnWriteDone(bool) override {
    if (auto* m = gate_.Done()) StartWrite(m);
  }
  void OnDone() override { delete this; }

 private:
  v1::ToReplica in_;
  WriteGate<v1::FromReplica> gate_;
};

class CbService final : public v1::Replication::CallbackService {
  grpc::ServerBidiReactor<v1::ToReplica, v1::FromReplica>* Stream(
      grpc::CallbackServerContext*) override {
    return new CbServerReactor();
  }
};

class CbClient final : public grpc::ClientBidiReactor<v1::ToReplica, v1::FromReplica> {
 public:
  explicit CbClient(std::shared_ptr<grpc::Channel> ch) : stub_(v1::Replication::NewStub(ch)) {
    stub_->async()->Stream(&ctx_, this);
    StartRead(&in_);
    StartCall();
  }
  bool RoundTrip(uint64_t lsn) {
    if (auto* m = gate_.Offer(Request(lsn))) StartWrite(m);
    latch_.WaitAndReset();
    return ok_;
  }
  void Stop() {
    ctx_.TryCancel();
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return done_; });
  }
  void OnReadDone(bool ok) override {
    ok_ = ok;
    if (ok) StartRead(&in_);
    latch_.Set();
  }
  void OnWriteDone(bool) override {
    if (auto* m = gate_.Done()) StartWrite(m);
  }
  void OnDone(const grpc::Status&) override {
    std::lock_guard<std::mutex> l(mu_);
    done_ = true;
    cv_.notify_all();
  }

 private:
  std::unique_ptr<v1::Replication::Stub> stub_;
  grpc::ClientContext ctx_;
  WriteGate<v1::ToReplica> gate_;
  v1::FromReplica in_;
  Latch latch_;
  std::atomic<bool> ok_{true};
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
};

class CbPair final : public Pair {
 public:
  CbPair(const Creds& creds, const std::string& tls_name, int remote_port) {
    port_ = remote_port;
    if (remote_port <= 0) server_ = BuildServer(&service_, creds, &port_, nullptr);
    if (remote_port < 0) return;
    client_ = std::make_unique<CbClient>(
        tr::MakeChannel("127.0.0.1:" + std::to_string(port_), creds.channel, tls_name));
  }
  ~CbPair() override {
    if (client_) client_->Stop();
    client_.reset();
    if (server_) {
      server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
      server_->Wait();
    }
  }
  int port() const override { return port_; }
  bool RoundTrip(uint64_t lsn) override { return client_->RoundTrip(lsn); }

 private:
  CbService service_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<CbClient> client_;
};

// ---- cq: the completion-queue API, one polling thread per side ------------------------------

// A tag: what to do when its operation completes (run on the CQ's thread).
struct Tag {
  std::function<void(bool)> fn;
};

void Poll(grpc::CompletionQueue* cq) {
  void* t = nullptr;
  bool ok = false;
  while (cq->Next(&t, &ok)) static_cast<Tag*>(t)->fn(ok);
}

class CqPair final : public Pair {
 public:
  CqPair(const Creds& creds, const std::string& tls_name, int remote_port) {
    port_ = remote_port;
    if (remote_port <= 0) StartServer(creds);
    if (remote_port >= 0) StartClient(creds, tls_name);
  }
  void StartServer(const Creds& creds) {
    server_ = BuildServer(&service_, creds, &port_, &scq_);
    // Server: accept one stream, then read -> write reply -> read ...
    s_accept_.fn = [this](bool ok) {
      if (!ok) return;
      s_stream_.Read(&s_in_, &s_read_);
    };
    s_read_.fn = [this](bool ok) {
      if (!ok) {
        s_stream_.Finish(grpc::Status::OK, &s_finish_);
        return;
      }
      if (auto* m = s_gate_.Offer(Reply(s_in_.batch().first_lsn()))) s_stream_.Write(*m, &s_write_);
      s_stream_.Read(&s_in_, &s_read_);
    };
    s_write_.fn = [this](bool) {
      if (auto* m = s_gate_.Done()) s_stream_.Write(*m, &s_write_);
    };
    s_finish_.fn = [](bool) {};
    service_.RequestStream(&s_ctx_, &s_stream_, scq_.get(), scq_.get(), &s_accept_);
    s_thread_ = std::thread([this] { Poll(scq_.get()); });
  }
  void StartClient(const Creds& creds, const std::string& tls_name) {
    auto ch = tr::MakeChannel("127.0.0.1:" + std::to_string(port_), creds.channel, tls_name);
    stub_ = v1::Replication::NewStub(ch);
    std::promise<bool> started;
    c_start_.fn = [&](bool ok) { started.set_value(ok); };
    c_read_.fn = [this](bool ok) {
      ok_ = ok;
      // The next read before waking the sender: once woken it may shut the queue down.
      if (ok) c_stream_->Read(&c_in_, &c_read_);
      latch_.Set();
    };
    c_write_.fn = [this](bool) {
      if (auto* m = c_gate_.Done()) c_stream_->Write(*m, &c_write_);
    };
    c_finish_.fn = [](bool) {};
    c_stream_ = stub_->PrepareAsyncStream(&c_ctx_, &ccq_);
    c_stream_->StartCall(&c_start_);
    c_thread_ = std::thread([this] { Poll(&ccq_); });
    if (!started.get_future().get()) {
      std::fprintf(stderr, "cq: the call did not start\n");
      std::exit(1);
    }
    c_stream_->Read(&c_in_, &c_read_);
  }
  ~CqPair() override {
    if (c_stream_) {
      c_ctx_.TryCancel();
      c_stream_->Finish(&c_status_, &c_finish_);
    }
    if (server_) {
      server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
      server_->Wait();
    }
    // The finish tag was the client's last operation; the queue drains and Next returns false.
    ccq_.Shutdown();
    if (c_thread_.joinable()) c_thread_.join();
    if (scq_) scq_->Shutdown();
    if (s_thread_.joinable()) s_thread_.join();
  }
  int port() const override { return port_; }
  bool RoundTrip(uint64_t lsn) override {
    // Written from this thread unless a write is in flight (then from the CQ thread).
    if (auto* m = c_gate_.Offer(Request(lsn))) c_stream_->Write(*m, &c_write_);
    latch_.WaitAndReset();
    return ok_;
  }

 private:
  v1::Replication::AsyncService service_;
  int port_ = 0;
  std::unique_ptr<grpc::ServerCompletionQueue> scq_;
  std::unique_ptr<grpc::Server> server_;
  grpc::ServerContext s_ctx_;
  grpc::ServerAsyncReaderWriter<v1::FromReplica, v1::ToReplica> s_stream_{&s_ctx_};
  v1::ToReplica s_in_;
  WriteGate<v1::FromReplica> s_gate_;
  Tag s_accept_, s_read_, s_write_, s_finish_;
  std::thread s_thread_;

  std::unique_ptr<v1::Replication::Stub> stub_;
  grpc::CompletionQueue ccq_;
  grpc::ClientContext c_ctx_;
  std::unique_ptr<grpc::ClientAsyncReaderWriter<v1::ToReplica, v1::FromReplica>> c_stream_;
  WriteGate<v1::ToReplica> c_gate_;
  v1::FromReplica c_in_;
  grpc::Status c_status_;
  Tag c_start_, c_read_, c_write_, c_finish_;
  std::thread c_thread_;
  Latch latch_;
  std::atomic<bool> ok_{true};
};

// ---- product: agent/transport's streams -----------------------------------------------------

class EchoHandler final : public tr::ServerStreamHandler {
 public:
  explicit EchoHandler(std::shared_ptr<tr::ServerStream> s) : stream_(std::move(s)) {}
  void OnMessage(v1::ToReplica& msg) override { stream_->Send(Reply(msg.batch().first_lsn())); }
  void OnClosed(const absl::Status&) override {}

 private:
  std::shared_ptr<tr::ServerStream> stream_;
};

class EchoAcceptor final : public tr::StreamAcceptor {
  std::unique_ptr<tr::ServerStreamHandler> Accept(std::shared_ptr<tr::ServerStream> s,
                                                  std::vector<std::string>, std::string) override {
    return std::make_unique<EchoHandler>(std::move(s));
  }
};

class ProductPair final : public Pair {
 public:
  ProductPair(const Creds& creds, const std::string& tls_name, int remote_port) {
    port_ = remote_port;
    if (remote_port <= 0) {
      auto s = tr::ReplicationServer::Start("127.0.0.1:0", creds.server, &acceptor_);
      if (!s.ok()) {
        std::fprintf(stderr, "%s\n", s.status().ToString().c_str());
        std::exit(1);
      }
      server_ = std::move(*s);
      port_ = server_->port();
    }
    if (remote_port < 0) return;
    client_ = tr::ClientStream::Open(
        tr::MakeChannel("127.0.0.1:" + std::to_string(port_), creds.channel, tls_name),
        [this](v1::FromReplica) { latch_.Set(); },
        [this](absl::Status) {
          ok_ = false;
          latch_.Set();
        });
  }
  ~ProductPair() override {
    if (client_) client_->Close(absl::CancelledError("bench over"));
    client_.reset();
    if (server_) server_->Shutdown();
  }
  int port() const override { return port_; }
  bool RoundTrip(uint64_t lsn) override {
    client_->Send(Request(lsn));
    latch_.WaitAndReset();
    return ok_;
  }

 private:
  EchoAcceptor acceptor_;
  int port_ = 0;
  std::unique_ptr<tr::ReplicationServer> server_;
  std::shared_ptr<tr::ClientStream> client_;
  Latch latch_;
  std::atomic<bool> ok_{true};
};

// ---- driver ---------------------------------------------------------------------------------

struct Figures {
  double p50_us, p99_us, cpu_us;  // cpu: both processes, per round trip
};

// CPU seconds (user + system) of `pid`, or of this process for 0.
double CpuSeconds(pid_t pid) {
  if (pid == 0) {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
  }
  std::FILE* f = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r");
  if (f == nullptr) return 0;
  char buf[2048] = {};
  const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  const char* p = std::strrchr(buf, ')');
  if (n == 0 || p == nullptr) return 0;
  // Fields after the command: state is field 3; utime and stime are fields 14 and 15.
  unsigned long utime = 0, stime = 0;
  if (std::sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) !=
      2) {
    return 0;
  }
  return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

Figures Run(Pair& p, int rounds, pid_t child) {
  for (int i = 0; i < 200; ++i) {  // warm-up: connection, TLS handshake, allocations
    if (!p.RoundTrip(i)) {
      std::fprintf(stderr, "stream broke during warm-up\n");
      std::exit(1);
    }
  }
  std::vector<double> us;
  us.reserve(rounds);
  const double cpu0 = CpuSeconds(0) + (child > 0 ? CpuSeconds(child) : 0);
  for (int i = 0; i < rounds; ++i) {
    auto t0 = Clock::now();
    if (!p.RoundTrip(1000 + i)) {
      std::fprintf(stderr, "stream broke\n");
      std::exit(1);
    }
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  const double cpu1 = CpuSeconds(0) + (child > 0 ? CpuSeconds(child) : 0);
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us[us.size() * 99 / 100], (cpu1 - cpu0) * 1e6 / rounds};
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 3000, reps = 5;
  bool one_process = false;
  bool control_server = true;
  std::string pki_script, pki_dir, only, serve;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--rounds") {
      rounds = std::atoi(next().c_str());
    } else if (a == "--reps") {
      reps = std::atoi(next().c_str());
    } else if (a == "--pki") {
      pki_script = next();
    } else if (a == "--only") {
      only = next();  // comma-separated variant names, e.g. cb,cq-tls
    } else if (a == "--one-process") {
      one_process = true;  // both sides in this process (default: the server in a child)
    } else if (a == "--no-control-server") {
      control_server = false;
    } else if (a == "--serve") {
      serve = next();  // internal: the child process serving one variant
    } else if (a == "--pki-dir") {
      pki_dir = next();  // internal
    } else {
      std::fprintf(stderr,
                   "usage: %s --pki make-dev-pki.sh [--rounds N] [--reps N] [--only a,b] "
                   "[--one-process]\n",
                   argv[0]);
      return 2;
    }
  }
  if (serve.empty() && (pki_script.empty() || rounds < 100 || reps < 1)) {
    std::fprintf(stderr, "need --pki PATH, --rounds >= 100, --reps >= 1\n");
    return 2;
  }
  char tmpl[] = "/tmp/tvl-floor-XXXXXX";
  if (serve.empty()) {
    if (mkdtemp(tmpl) == nullptr) return 1;
    static std::string cleanup = tmpl;  // also on the std::exit of a broken stream
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(cleanup, ec);
    });
    pki_dir = std::string(tmpl) + "/pki";
    if (std::system(("bash '" + pki_script + "' '" + pki_dir + "' >/dev/null").c_str()) != 0) {
      std::fprintf(stderr, "make-dev-pki.sh failed\n");
      return 1;
    }
  }
  const std::filesystem::path dir = pki_dir;
  auto load = [&](const std::string& who) {
    auto m = tr::LoadTls({dir / "ca.pem", dir / (who + ".pem"), dir / (who + ".key")});
    if (!m.ok()) {
      std::fprintf(stderr, "%s\n", m.status().ToString().c_str());
      std::exit(1);
    }
    return *m;
  };
  const Creds insecure{grpc::InsecureServerCredentials(), grpc::InsecureChannelCredentials()};
  const Creds tls{tr::ServerCredentials(load("site-b")), tr::ChannelCredentials(load("site-a"))};

  using Make = std::function<std::unique_ptr<Pair>(int remote_port)>;
  std::vector<std::pair<std::string, Make>> variants = {
      {"tcp", [](int p) { return std::make_unique<TcpPair>(p); }},
      {"cb", [&](int p) { return std::make_unique<CbPair>(insecure, "", p); }},
      {"cq", [&](int p) { return std::make_unique<CqPair>(insecure, "", p); }},
      {"product", [&](int p) { return std::make_unique<ProductPair>(insecure, "", p); }},
      {"cb-tls", [&](int p) { return std::make_unique<CbPair>(tls, "site-b", p); }},
      {"cq-tls", [&](int p) { return std::make_unique<CqPair>(tls, "site-b", p); }},
      {"product-tls", [&](int p) { return std::make_unique<ProductPair>(tls, "site-b", p); }},
  };
  // Like tvillingd, each process also runs a sync gRPC server (the control socket, one poller):
  // in gRPC 1.51 its threads poll the same fds as everything else and take part in the hand-offs.
  v1::Replication::Service sync_service;
  std::unique_ptr<grpc::Server> control;
  if (control_server) {
    grpc::ServerBuilder b;
    b.AddListeningPort("unix:" + (dir.parent_path() / (serve.empty() ? "ctl-a" : "ctl-b")).string(),
                       grpc::InsecureServerCredentials());
    b.RegisterService(&sync_service);
    b.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, 1);
    control = b.BuildAndStart();
  }
  if (!serve.empty()) {  // the child: serve one variant until killed
    for (auto& [name, make] : variants) {
      if (name != serve) continue;
      auto pair = make(-1);
      std::printf("%d\n", pair->port());
      std::fflush(stdout);
      for (;;) pause();
    }
    std::fprintf(stderr, "no variant %s\n", serve.c_str());
    return 2;
  }
  if (!only.empty()) {
    std::erase_if(variants, [&](const auto& v) {
      return ("," + only + ",").find("," + v.first + ",") == std::string::npos;
    });
  }
  // Starts the server of `name` in a child process; returns its pid and port.
  auto spawn = [&](const std::string& name) -> std::pair<pid_t, int> {
    int fds[2];
    if (pipe(fds) != 0) std::exit(1);
    const pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
      // The server dies with this process (e.g. killed by ctest's timeout), never orphaned.
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(1);
      dup2(fds[1], 1);
      close(fds[0]);
      close(fds[1]);
      execl("/proc/self/exe", argv[0], "--serve", name.c_str(), "--pki-dir", pki_dir.c_str(),
            control_server ? static_cast<char*>(nullptr) : "--no-control-server",
            static_cast<char*>(nullptr));
      _exit(127);
    }
    close(fds[1]);
    char buf[32] = {};
    ssize_t n = read(fds[0], buf, sizeof buf - 1);
    close(fds[0]);
    if (n <= 0) {
      std::fprintf(stderr, "the %s server did not start\n", name.c_str());
      std::exit(1);
    }
    return {pid, std::atoi(buf)};
  };
  std::map<std::string, std::vector<Figures>> results;
  for (int r = 0; r < reps; ++r) {
    for (auto& [name, make] : variants) {
      pid_t child = -1;
      int port = 0;
      if (!one_process) std::tie(child, port) = spawn(name);
      auto pair = make(port);
      Figures f = Run(*pair, rounds, child);
      pair.reset();
      if (child > 0) {
        kill(child, SIGKILL);
        waitpid(child, nullptr, 0);
      }
      results[name].push_back(f);
      std::printf("rep %d %-12s p50 %7.1f us  p99 %7.1f us  cpu %6.1f us\n", r + 1, name.c_str(),
                  f.p50_us, f.p99_us, f.cpu_us);
      std::fflush(stdout);
    }
  }
  control.reset();
  std::printf(
      "\n%s, %s, %d round trips (4 KiB request, ~%zu-byte reply) x %d interleaved "
      "repetitions, medians:\n",
      one_process ? "one process" : "server in a child process",
      control_server ? "a sync control server in each process" : "no control server", rounds,
      kReplyBytes, reps);
  std::printf("%-12s %10s %10s %10s\n", "variant", "p50 us", "p99 us", "cpu us");
  for (auto& [name, make] : variants) {
    std::vector<double> p50, p99, cpu;
    for (auto& f : results[name]) {
      p50.push_back(f.p50_us);
      p99.push_back(f.p99_us);
      cpu.push_back(f.cpu_us);
    }
    std::printf("%-12s %10.1f %10.1f %10.1f\n", name.c_str(), Median(p50), Median(p99),
                Median(cpu));
  }
  return 0;
}
