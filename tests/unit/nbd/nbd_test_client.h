// nbd_test_client.h: a raw-socket NBD client for tests: it sends exactly the bytes a test asks for,
// including malformed ones, and reads back what the server answers. Plus a memory-backed Export
// whose completions a test can hold back and release in any order.
#pragma once

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "agent/nbd/export.h"
#include "agent/nbd/frontend.h"
#include "agent/nbd/wire.h"

namespace tvilling::nbd::testing {

inline void Put(std::string* s, uint64_t v, int n) {
  for (int i = n - 1; i >= 0; --i) s->push_back(static_cast<char>(v >> (8 * i)));
}
inline uint64_t Get(std::string_view s, size_t at, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v = (v << 8) | static_cast<uint8_t>(s[at + i]);
  return v;
}

// An export over memory. With hold=true completions are queued until Release* is called.
class MemoryExport : public Export {
 public:
  MemoryExport(std::string name, uint64_t size, bool read_only = false) : data_(size, '\0') {
    info_.name = std::move(name);
    info_.description = "memory";
    info_.size_bytes = size;
    info_.read_only = read_only;
  }
  const ExportInfo& info() const override { return info_; }
  void Read(uint64_t offset, uint32_t length, char* out, Done done) override {
    Complete(
        [this, offset, length, out] {
          std::memcpy(out, data_.data() + offset, length);
          ++reads;
        },
        std::move(done));
  }
  void Write(uint64_t offset, storage::Bytes data, bool fua, Done done) override {
    if (fua) ++fua_writes;
    auto shared = std::make_shared<storage::Bytes>(std::move(data));
    Complete(
        [this, offset, shared] {
          std::memcpy(data_.data() + offset, shared->data(), shared->size());
          ++writes;
        },
        std::move(done));
  }
  void Flush(Done done) override {
    Complete([this] { ++flushes; }, std::move(done));
  }
  void Trim(uint64_t offset, uint32_t length, bool fua, Done done) override {
    if (fua) ++fua_trims;
    Complete(
        [this, offset, length] {
          std::memset(data_.data() + offset, 0, length);
          ++trims;
        },
        std::move(done));
  }
  void WriteZeroes(uint64_t offset, uint32_t length, bool fua, bool no_hole, Done done) override {
    if (fua) ++fua_zeroes;
    if (no_hole) ++no_hole_zeroes;
    Complete(
        [this, offset, length] {
          std::memset(data_.data() + offset, 0, length);
          ++zeroes;
        },
        std::move(done));
  }
  // The next operation completes with this status instead of running.
  void FailNext(absl::Status st) {
    std::lock_guard l(mu_);
    fail_next_ = std::move(st);
  }

  void set_hold(bool h) {
    std::lock_guard l(mu_);
    hold_ = h;
  }
  size_t held() {
    std::lock_guard l(mu_);
    return held_.size();
  }
  // Completes held operations newest first.
  void ReleaseReversed() {
    std::deque<std::function<void()>> h;
    {
      std::lock_guard l(mu_);
      h.swap(held_);
    }
    for (auto it = h.rbegin(); it != h.rend(); ++it) (*it)();
  }
  // The test's view of the data, under the lock the operations take (TSan cannot see that a reply
  // on a socket orders the server's write before the test's read).
  std::string DataAt(size_t offset, size_t length) {
    std::lock_guard l(data_mu_);
    return data_.substr(offset, length);
  }
  void Fill(size_t offset, std::string_view s) {
    std::lock_guard l(data_mu_);
    data_.replace(offset, s.size(), s);
  }
  std::atomic<int> reads{0}, writes{0}, flushes{0}, trims{0}, zeroes{0};
  std::atomic<int> fua_writes{0}, fua_trims{0}, fua_zeroes{0}, no_hole_zeroes{0};

 private:
  void Complete(std::function<void()> op, Done done) {
    auto d = std::make_shared<Done>(std::move(done));
    std::function<void()> run = [this, op, d] {
      {
        std::lock_guard l(data_mu_);
        op();
      }
      std::move (*d)(absl::OkStatus());
    };
    {
      std::lock_guard l(mu_);
      if (!fail_next_.ok()) {
        run = [d, st = fail_next_] { std::move (*d)(st); };
        fail_next_ = absl::OkStatus();
      }
      if (hold_) {
        held_.push_back(std::move(run));
        return;
      }
    }
    run();
  }
  ExportInfo info_;
  std::string data_;
  std::mutex data_mu_;  // guards data_
  std::mutex mu_;
  bool hold_ = false;
  absl::Status fail_next_;
  std::deque<std::function<void()>> held_;
};

// A Frontend on 127.0.0.1:0 (plus any unix sockets in `o`) running on `threads` threads.
class TestServer {
 public:
  explicit TestServer(std::vector<std::shared_ptr<Export>> exports, FrontendOptions o = {},
                      int threads = 1) {
    o.tcp_listen = {{"127.0.0.1", 0}};
    fe_ = std::make_unique<Frontend>(io_, o);
    for (auto& e : exports) fe_->AddExport(e);
    EXPECT_TRUE(fe_->Start().ok());
    port_ = fe_->tcp_ports().at(0);
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { io_.run(); });
  }
  ~TestServer() {
    fe_->Stop();
    for (auto& t : threads_) t.join();
  }
  uint16_t port() const { return port_; }
  Frontend& frontend() { return *fe_; }
  // Waits for io_context::run to return (all connections closed after Stop).
  bool JoinWithin(int ms) {
    for (int i = 0; i < ms / 10 && !io_.stopped(); ++i) usleep(10000);
    return io_.stopped();
  }

 private:
  boost::asio::io_context io_;
  std::unique_ptr<Frontend> fe_;
  uint16_t port_ = 0;
  std::vector<std::thread> threads_;
};

class RawClient {
 public:
  explicit RawClient(uint16_t port) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  }
  // A client on a unix socket.
  explicit RawClient(const std::string& unix_path) {
    fd_ = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, unix_path.c_str(), sizeof a.sun_path - 1);
    EXPECT_EQ(connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a), 0) << unix_path;
  }
  ~RawClient() { close(fd_); }
  RawClient(const RawClient&) = delete;
  RawClient& operator=(const RawClient&) = delete;
  int fd() const { return fd_; }

  void Send(std::string_view s) {
    size_t off = 0;
    while (off < s.size()) {
      ssize_t n = send(fd_, s.data() + off, s.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return;  // the server may have closed; the next Recv tells
      off += static_cast<size_t>(n);
    }
  }
  // Reads exactly n bytes; returns fewer if the connection closes or 5 s pass.
  std::string Recv(size_t n, int timeout_ms = 5000) {
    std::string out;
    while (out.size() < n) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, timeout_ms) <= 0) break;
      char buf[65536];
      ssize_t r = recv(fd_, buf, std::min(sizeof buf, n - out.size()), 0);
      if (r <= 0) break;
      out.append(buf, static_cast<size_t>(r));
    }
    return out;
  }
  // True if the server closed the connection (EOF within the timeout).
  bool Closed(int timeout_ms = 5000) {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return false;
    char c;
    return recv(fd_, &c, 1, MSG_PEEK) <= 0;
  }

  std::string Greeting() { return Recv(18); }
  void ClientFlags(uint32_t flags = wire::kClientFlagFixedNewstyle | wire::kClientFlagNoZeroes) {
    std::string s;
    Put(&s, flags, 4);
    Send(s);
  }
  void Option(uint32_t opt, std::string_view data) {
    std::string s;
    Put(&s, wire::kOptMagic, 8);
    Put(&s, opt, 4);
    Put(&s, data.size(), 4);
    s.append(data);
    Send(s);
  }
  struct OptReply {
    uint32_t option = 0, type = 0;
    std::string data;
    bool ok = false;
  };
  OptReply ReadOptReply() {
    OptReply r;
    std::string h = Recv(20);
    if (h.size() != 20 || Get(h, 0, 8) != wire::kOptReplyMagic) return r;
    r.option = static_cast<uint32_t>(Get(h, 8, 4));
    r.type = static_cast<uint32_t>(Get(h, 12, 4));
    r.data = Recv(Get(h, 16, 4));
    r.ok = true;
    return r;
  }
  static std::string GoData(std::string_view name, std::vector<uint16_t> infos = {}) {
    std::string d;
    Put(&d, name.size(), 4);
    d.append(name);
    Put(&d, infos.size(), 2);
    for (uint16_t i : infos) Put(&d, i, 2);
    return d;
  }
  // Greeting + flags + GO; returns the transmission flags (0 on failure).
  uint16_t Connect(std::string_view name) {
    if (Greeting().size() != 18) return 0;
    ClientFlags();
    Option(wire::kOptGo, GoData(name));
    uint16_t flags = 0;
    for (;;) {
      OptReply r = ReadOptReply();
      if (!r.ok) return 0;
      if (r.type == wire::kRepInfo && Get(r.data, 0, 2) == wire::kInfoExport) {
        flags = static_cast<uint16_t>(Get(r.data, 10, 2));
      }
      if (r.type == wire::kRepAck) return flags;
      if (r.type & 0x80000000u) return 0;
    }
  }
  void Request(uint16_t type, uint16_t flags, uint64_t cookie, uint64_t offset, uint32_t length,
               std::string_view payload = {}, uint32_t magic = wire::kRequestMagic) {
    std::string s;
    Put(&s, magic, 4);
    Put(&s, flags, 2);
    Put(&s, type, 2);
    Put(&s, cookie, 8);
    Put(&s, offset, 8);
    Put(&s, length, 4);
    s.append(payload);
    Send(s);
  }
  struct Reply {
    bool ok = false;
    uint32_t error = 0;
    uint64_t cookie = 0;
  };
  Reply ReadReply() {
    Reply r;
    std::string h = Recv(16);
    if (h.size() != 16 || Get(h, 0, 4) != wire::kSimpleReplyMagic) return r;
    r.ok = true;
    r.error = static_cast<uint32_t>(Get(h, 4, 4));
    r.cookie = Get(h, 8, 8);
    return r;
  }

 private:
  int fd_ = -1;
};

}  // namespace tvilling::nbd::testing
