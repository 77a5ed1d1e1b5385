// frontend.cc: listeners and connections of the NBD server (see frontend.h, wire.h).
#include "agent/nbd/frontend.h"

#include <absl/status/statusor.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>

#include "agent/nbd/wire.h"

namespace tvilling::nbd {

namespace asio = boost::asio;
using asio::awaitable;
using asio::use_awaitable;
using tcp = asio::ip::tcp;
using unix_proto = asio::local::stream_protocol;

struct Frontend::Impl : std::enable_shared_from_this<Frontend::Impl> {
  Impl(asio::io_context& io_, FrontendOptions options_) : io(io_), options(std::move(options_)) {}

  std::shared_ptr<Export> Lookup(std::string_view name) {
    if (name.empty()) return exports.empty() ? nullptr : exports.front();
    for (const auto& e : exports) {
      if (e->info().name == name) return e;
    }
    return nullptr;
  }

  asio::io_context& io;
  const FrontendOptions options;
  std::vector<std::shared_ptr<Export>> exports;
  std::vector<std::unique_ptr<tcp::acceptor>> tcp_acceptors;
  std::vector<std::unique_ptr<unix_proto::acceptor>> unix_acceptors;
  FrontendStats stats;
  std::atomic<bool> stopping{false};
  std::mutex mu;  // guards connections
  std::vector<std::weak_ptr<void>> connections;
  std::vector<std::function<void()>> shutdown_hooks;  // one per live connection, by index

  void Register(std::function<void()> shutdown) {
    std::lock_guard lock(mu);
    shutdown_hooks.push_back(std::move(shutdown));
  }
};

namespace {

// One client connection. Socket is tcp::socket or unix_proto::socket, bound to a strand.
template <typename Socket>
class Connection : public std::enable_shared_from_this<Connection<Socket>> {
 public:
  Connection(std::shared_ptr<Frontend::Impl> fe, Socket socket, std::string peer)
      : fe_(std::move(fe)),
        socket_(std::move(socket)),
        peer_(std::move(peer)),
        wake_(socket_.get_executor()) {}

  void Start() {
    auto self = this->shared_from_this();
    std::weak_ptr<Connection> weak = self;
    fe_->Register([weak] {
      if (auto c = weak.lock()) asio::post(c->socket_.get_executor(), [c] { c->StopReading(); });
    });
    asio::co_spawn(
        socket_.get_executor(), [self]() { return self->Run(); }, asio::detached);
  }

 private:
  struct Reply {
    char header[wire::kSimpleReplyBytes];
    storage::Bytes data;
  };

  void StopReading() {
    stop_reading_ = true;
    boost::system::error_code ec;
    socket_.shutdown(asio::socket_base::shutdown_receive, ec);  // the pending read ends with EOF
  }

  awaitable<void> Run() {
    try {
      if (!co_await Handshake()) co_return;
      co_await Transmission();
    } catch (const boost::system::system_error& e) {
      if (e.code() != asio::error::eof && e.code() != asio::error::connection_reset &&
          e.code() != asio::error::operation_aborted && e.code() != asio::error::broken_pipe) {
        spdlog::warn("nbd: connection {}: {}", peer_, e.what());
      }
    }
    // Answer everything already read before closing.
    reading_done_ = true;
    while (inflight_requests_ > 0 || writing_ || !replies_.empty()) {
      if (write_failed_) break;
      co_await WaitForWake();
    }
    boost::system::error_code ec;
    socket_.shutdown(asio::socket_base::shutdown_both, ec);
    socket_.close(ec);
  }

  awaitable<bool> Handshake() {
    const std::string greeting = wire::Handshake::Greeting();
    co_await asio::async_write(socket_, asio::buffer(greeting), use_awaitable);
    wire::Handshake hs([fe = fe_](std::string_view n) { return fe->Lookup(n); },
                       [fe = fe_] { return fe->exports; });
    std::string in;
    for (;;) {
      in.resize(hs.Need());
      co_await asio::async_read(socket_, asio::buffer(in), use_awaitable);
      wire::Handshake::Step step = hs.Feed(in);
      if (!step.out.empty()) {
        co_await asio::async_write(socket_, asio::buffer(step.out), use_awaitable);
      }
      if (step.next == wire::Handshake::Next::kClose) {
        fe_->stats.handshakes_refused.fetch_add(1);
        if (step.reason == "client aborted") {
          spdlog::debug("nbd: {} aborted the handshake", peer_);
        } else {
          spdlog::warn("nbd: closing connection from {}: malformed handshake: {}", peer_,
                       step.reason);
        }
        co_return false;
      }
      if (step.next == wire::Handshake::Next::kTransmission) {
        export_ = hs.chosen();
        spdlog::debug("nbd: {} uses export {}", peer_, export_->info().name);
        co_return true;
      }
    }
  }

  awaitable<void> Transmission() {
    const ExportInfo& info = export_->info();
    char raw[wire::kRequestHeaderBytes];
    while (!stop_reading_) {
      while (inflight_requests_ >= fe_->options.max_inflight_requests ||
             inflight_bytes_ >= fe_->options.max_inflight_bytes) {
        co_await WaitForWake();
        if (write_failed_) co_return;
      }
      co_await ReadExact(raw, sizeof raw);
      wire::RequestHeader h;
      if (!wire::ParseRequestHeader(raw, &h)) {
        spdlog::warn("nbd: closing connection from {}: bad request magic", peer_);
        co_return;
      }
      fe_->stats.requests.fetch_add(1);
      wire::Verdict v = wire::ValidateRequest(h, info);
      if (v.error != 0) {
        fe_->stats.request_errors.fetch_add(1);
        if (v.close) {
          spdlog::warn("nbd: closing connection from {}: {} (payload too large to skip)", peer_,
                       v.reason);
          co_return;
        }
        if (v.payload_follows) co_await Discard(h.length);
        spdlog::debug("nbd: {}: refused: {}", peer_, v.reason);
        QueueReply(h.cookie, v.error, {});
        continue;
      }
      if (h.type == wire::kCmdDisc) co_return;
      const bool fua = (h.flags & wire::kCmdFlagFua) != 0;
      ++inflight_requests_;
      auto done = Completion(h.cookie, h.type == wire::kCmdWrite ? h.length : 0);
      switch (h.type) {
        case wire::kCmdRead: {
          inflight_bytes_ += h.length;
          auto buf = std::make_shared<storage::Bytes>(storage::Bytes::Allocate(h.length));
          char* out = buf->data();
          auto self = this->shared_from_this();
          const uint64_t cookie = h.cookie;
          const uint32_t length = h.length;
          export_->Read(h.offset, h.length, out, [self, cookie, length, buf](absl::Status st) {
            self->Deliver({cookie, std::move(st), length, std::move(*buf)});
          });
          break;
        }
        case wire::kCmdWrite: {
          storage::Bytes payload = storage::Bytes::Allocate(h.length);
          inflight_bytes_ += h.length;
          co_await ReadExact(payload.data(), h.length);
          fe_->stats.bytes_written.fetch_add(h.length);
          export_->Write(h.offset, std::move(payload), fua, std::move(done));
          break;
        }
        case wire::kCmdFlush:
          export_->Flush(std::move(done));
          break;
        case wire::kCmdTrim:
          export_->Trim(h.offset, h.length, fua, std::move(done));
          break;
        case wire::kCmdWriteZeroes:
          export_->WriteZeroes(h.offset, h.length, fua, (h.flags & wire::kCmdFlagNoHole) != 0,
                               std::move(done));
          break;
      }
    }
  }

  // A completion for a request without read data; `payload_bytes` is released when it runs.
  Export::Done Completion(uint64_t cookie, uint32_t payload_bytes) {
    auto self = this->shared_from_this();
    return [self, cookie, payload_bytes](absl::Status st) {
      self->Deliver({cookie, std::move(st), payload_bytes, {}});
    };
  }

  // Completions arrive on other threads (a group's committer finishes a whole batch at once); they
  // are collected here and handed to the strand with one post per burst, not one per request.
  struct Done {
    uint64_t cookie;
    absl::Status status;
    uint32_t held_bytes;  // in-flight bytes released by this completion
    storage::Bytes data;  // READ data
  };
  void Deliver(Done d) {
    {
      std::lock_guard lock(inbox_mu_);
      inbox_.push_back(std::move(d));
      if (inbox_posted_) return;
      inbox_posted_ = true;
    }
    asio::post(socket_.get_executor(), [self = this->shared_from_this()] { self->DrainInbox(); });
  }
  void DrainInbox() {
    std::vector<Done> batch;
    {
      std::lock_guard lock(inbox_mu_);
      batch.swap(inbox_);
      inbox_posted_ = false;
    }
    for (Done& d : batch) {
      inflight_bytes_ -= d.held_bytes;
      Finish(d.cookie, d.status, std::move(d.data));
    }
  }

  // Reads exactly n bytes through a read-ahead buffer, so one recv serves many pipelined requests;
  // large payloads go straight to their destination.
  awaitable<void> ReadExact(char* dst, size_t n) {
    const size_t have = rend_ - rpos_;
    if (have >= n) {
      std::memcpy(dst, rbuf_.data() + rpos_, n);
      rpos_ += n;
      co_return;
    }
    std::memcpy(dst, rbuf_.data() + rpos_, have);
    dst += have;
    n -= have;
    rpos_ = rend_ = 0;
    if (n >= rbuf_.size() / 2) {
      co_await asio::async_read(socket_, asio::buffer(dst, n), use_awaitable);
      co_return;
    }
    while (rend_ < n) {
      rend_ += co_await socket_.async_read_some(
          asio::buffer(rbuf_.data() + rend_, rbuf_.size() - rend_), use_awaitable);
    }
    std::memcpy(dst, rbuf_.data(), n);
    rpos_ = n;
  }

  // On the strand.
  void Finish(uint64_t cookie, const absl::Status& st, storage::Bytes data) {
    --inflight_requests_;
    const uint32_t error = wire::ErrorFromStatus(st);
    if (error != 0) {
      fe_->stats.request_errors.fetch_add(1);
      spdlog::warn("nbd: {}: request failed: {}", peer_, std::string(st.message()));
      data = {};
    } else {
      fe_->stats.bytes_read.fetch_add(data.size());
    }
    QueueReply(cookie, error, std::move(data));
    wake_.cancel();
  }

  void QueueReply(uint64_t cookie, uint32_t error, storage::Bytes data) {
    Reply& r = replies_.emplace_back();
    wire::EncodeSimpleReply(error, cookie, r.header);
    r.data = std::move(data);
    Pump();
  }

  // Writes queued replies, up to 64 per gathered write.
  void Pump() {
    if (writing_ || replies_.empty() || write_failed_) return;
    writing_ = true;
    buffers_.clear();
    const size_t n = std::min<size_t>(replies_.size(), 64);
    for (size_t i = 0; i < n; ++i) {
      buffers_.push_back(asio::buffer(replies_[i].header, wire::kSimpleReplyBytes));
      if (replies_[i].data.size() > 0) {
        buffers_.push_back(asio::buffer(replies_[i].data.data(), replies_[i].data.size()));
      }
    }
    auto self = this->shared_from_this();
    asio::async_write(socket_, buffers_, [self, n](boost::system::error_code ec, size_t) {
      self->writing_ = false;
      if (ec) {
        self->write_failed_ = true;  // the client went away; nothing more to answer
        self->replies_.clear();
        self->wake_.cancel();
        return;
      }
      for (size_t i = 0; i < n; ++i) self->replies_.pop_front();
      self->Pump();
      if (!self->writing_) self->wake_.cancel();
    });
  }

  awaitable<void> Discard(uint32_t length) {
    std::vector<char> scratch(std::min<uint32_t>(length, 64u << 10));
    while (length > 0) {
      const uint32_t n = std::min<uint32_t>(length, static_cast<uint32_t>(scratch.size()));
      co_await ReadExact(scratch.data(), n);
      length -= n;
    }
  }

  // Sleeps until a completion or a finished write cancels the timer.
  awaitable<void> WaitForWake() {
    wake_.expires_at(asio::steady_timer::time_point::max());
    boost::system::error_code ec;
    co_await wake_.async_wait(asio::redirect_error(use_awaitable, ec));
  }

  std::shared_ptr<Frontend::Impl> fe_;
  Socket socket_;
  const std::string peer_;
  asio::steady_timer wake_;
  std::shared_ptr<Export> export_;
  uint32_t inflight_requests_ = 0;
  uint64_t inflight_bytes_ = 0;
  std::vector<char> rbuf_ = std::vector<char>(256u << 10);
  size_t rpos_ = 0, rend_ = 0;
  std::mutex inbox_mu_;
  std::vector<Done> inbox_;
  bool inbox_posted_ = false;
  std::deque<Reply> replies_;  // deque: elements keep their address while others come and go
  std::vector<asio::const_buffer> buffers_;
  bool writing_ = false;
  bool write_failed_ = false;
  bool reading_done_ = false;
  bool stop_reading_ = false;
};

template <typename Acceptor, typename Socket>
void Accept(std::shared_ptr<Frontend::Impl> fe, Acceptor* acceptor, std::string where) {
  acceptor->async_accept(asio::make_strand(fe->io),
                         [fe, acceptor, where](boost::system::error_code ec, Socket s) {
                           if (ec) {
                             if (ec != asio::error::operation_aborted) {
                               spdlog::warn("nbd: accept on {}: {}", where, ec.message());
                             }
                             if (fe->stopping) return;
                           } else if (fe->stopping) {
                             return;
                           } else {
                             std::string peer = where;
                             if constexpr (std::is_same_v<Socket, tcp::socket>) {
                               boost::system::error_code e2;
                               s.set_option(tcp::no_delay(true), e2);
                               auto ep = s.remote_endpoint(e2);
                               if (!e2)
                                 peer = fmt::format("{}:{}", ep.address().to_string(), ep.port());
                             }
                             fe->stats.connections.fetch_add(1);
                             std::make_shared<Connection<Socket>>(fe, std::move(s), peer)->Start();
                           }
                           Accept<Acceptor, Socket>(fe, acceptor, where);
                         });
}

absl::StatusOr<tcp::endpoint> ParseEndpoint(const std::string& hostport) {
  const auto colon = hostport.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(fmt::format("listen address '{}' has no port", hostport));
  }
  std::string host = hostport.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(host, ec);
  if (ec)
    return absl::InvalidArgumentError(
        fmt::format("listen address '{}': {}", hostport, ec.message()));
  int port = 0;
  try {
    port = std::stoi(hostport.substr(colon + 1));
  } catch (...) {
    port = -1;
  }
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError(fmt::format("listen address '{}': bad port", hostport));
  }
  return tcp::endpoint(addr, static_cast<uint16_t>(port));
}

}  // namespace

Frontend::Frontend(asio::io_context& io, FrontendOptions options)
    : impl_(std::make_shared<Impl>(io, std::move(options))) {}

Frontend::~Frontend() { Stop(); }

void Frontend::AddExport(std::shared_ptr<Export> e) { impl_->exports.push_back(std::move(e)); }

absl::Status Frontend::Start() {
  Impl& fe = *impl_;
  for (const std::string& a : fe.options.tcp_listen) {
    auto ep = ParseEndpoint(a);
    if (!ep.ok()) return ep.status();
    auto acc = std::make_unique<tcp::acceptor>(asio::make_strand(fe.io));
    boost::system::error_code ec;
    acc->open(ep->protocol(), ec);
    if (!ec) acc->set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec) acc->bind(*ep, ec);
    if (!ec) acc->listen(asio::socket_base::max_listen_connections, ec);
    if (ec) return absl::UnavailableError(fmt::format("cannot listen on {}: {}", a, ec.message()));
    fe.tcp_acceptors.push_back(std::move(acc));
  }
  for (const std::string& path : fe.options.unix_sockets) {
    std::error_code fec;
    if (std::filesystem::is_socket(path, fec)) std::filesystem::remove(path, fec);
    auto acc = std::make_unique<unix_proto::acceptor>(asio::make_strand(fe.io));
    boost::system::error_code ec;
    acc->open(unix_proto(), ec);
    if (!ec) acc->bind(unix_proto::endpoint(path), ec);
    if (!ec) acc->listen(asio::socket_base::max_listen_connections, ec);
    if (ec)
      return absl::UnavailableError(
          fmt::format("cannot listen on unix socket {}: {}", path, ec.message()));
    fe.unix_acceptors.push_back(std::move(acc));
  }
  for (size_t i = 0; i < fe.tcp_acceptors.size(); ++i) {
    Accept<tcp::acceptor, tcp::socket>(impl_, fe.tcp_acceptors[i].get(), fe.options.tcp_listen[i]);
    spdlog::info("nbd: listening on {} ({} export(s))", fe.options.tcp_listen[i],
                 fe.exports.size());
  }
  for (size_t i = 0; i < fe.unix_acceptors.size(); ++i) {
    Accept<unix_proto::acceptor, unix_proto::socket>(impl_, fe.unix_acceptors[i].get(),
                                                     "unix:" + fe.options.unix_sockets[i]);
    spdlog::info("nbd: listening on unix socket {}", fe.options.unix_sockets[i]);
  }
  return absl::OkStatus();
}

std::vector<uint16_t> Frontend::tcp_ports() const {
  std::vector<uint16_t> ports;
  for (const auto& a : impl_->tcp_acceptors) {
    boost::system::error_code ec;
    ports.push_back(a->local_endpoint(ec).port());
  }
  return ports;
}

void Frontend::Stop() {
  auto fe = impl_;
  if (fe->stopping.exchange(true)) return;
  // Acceptors are closed on their strands; connections stop reading and drain on theirs.
  for (auto& a : fe->tcp_acceptors) {
    asio::post(a->get_executor(), [fe, acc = a.get()] {
      boost::system::error_code ec;
      acc->close(ec);
    });
  }
  for (auto& a : fe->unix_acceptors) {
    asio::post(a->get_executor(), [fe, acc = a.get()] {
      boost::system::error_code ec;
      acc->close(ec);
    });
  }
  std::vector<std::function<void()>> hooks;
  {
    std::lock_guard lock(fe->mu);
    hooks.swap(fe->shutdown_hooks);
  }
  for (auto& h : hooks) h();
}

const FrontendStats& Frontend::stats() const { return impl_->stats; }

}  // namespace tvilling::nbd
