// frontend.cc: listeners and connections of the NBD server (see frontend.h, wire.h).
//
// A connection is one coroutine on its strand that reads requests and hands them to the Export,
// plus completions that come back from any thread through an inbox (one strand post per burst),
// plus a writer that sends every reply ready at that moment in one gathered write. Per request the
// only heap allocation is the payload (WRITE data, READ buffer): the completion callback fits in
// AnyInvocable's inline storage (connection pointer + slot index), and slots, the inbox and the
// reply queues keep their capacity.
//
// Direct replies: a request without data to return (WRITE, FLUSH, TRIM, WRITE_ZEROES) that
// completes while it is the connection's only outstanding request, with no reply queued or being
// written, is answered by the completing thread itself with one non-blocking send() of the 16-byte
// reply; the strand does the bookkeeping at its next turn, without being woken for it. At queue
// depth 1 on a sync mirror the completing thread is the one that read the peer's ack, and the
// wake-up of the connection's thread that only sent the reply was a scheduler round trip on every
// write. At higher depths completions go through the inbox as before, so a burst is answered with
// one gathered write.
#include "agent/nbd/frontend.h"

#include <absl/status/statusor.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <array>
#include <atomic>
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
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <unordered_map>

#include "agent/nbd/wire.h"

namespace tvilling::nbd {

namespace asio = boost::asio;
using asio::awaitable;
using asio::use_awaitable;
using tcp = asio::ip::tcp;
using unix_proto = asio::local::stream_protocol;

namespace {

// What Frontend::Impl needs from a connection of either socket type.
class ConnectionBase {
 public:
  virtual ~ConnectionBase() = default;
  // Stop reading requests, answer those already read, close. Any thread.
  virtual void RequestStop() = 0;
};

}  // namespace

struct Frontend::Impl {
  Impl(asio::io_context& io_, FrontendOptions options_) : io(io_), options(std::move(options_)) {}

  std::shared_ptr<Export> Lookup(std::string_view name) const {
    if (name.empty()) return exports.empty() ? nullptr : exports.front();
    for (const auto& e : exports) {
      if (e->info().name == name) return e;
    }
    return nullptr;
  }

  // Returns 0 if the server is stopping (the caller closes the connection).
  uint64_t Register(std::weak_ptr<ConnectionBase> c) {
    std::lock_guard lock(mu);
    if (stopping) return 0;
    live.emplace(++next_id, std::move(c));
    return next_id;
  }
  void Unregister(uint64_t id) {
    std::lock_guard lock(mu);
    live.erase(id);
  }

  asio::io_context& io;
  const FrontendOptions options;
  std::vector<std::shared_ptr<Export>> exports;  // fixed once Start() ran
  std::vector<std::unique_ptr<tcp::acceptor>> tcp_acceptors;
  std::vector<std::unique_ptr<unix_proto::acceptor>> unix_acceptors;
  FrontendStats stats;

  std::mutex mu;
  bool stopping = false;                                             // GUARDED_BY(mu)
  uint64_t next_id = 0;                                              // GUARDED_BY(mu)
  std::unordered_map<uint64_t, std::weak_ptr<ConnectionBase>> live;  // GUARDED_BY(mu)
};

namespace {

// A buffer sequence over buffers the connection keeps; async_write copies its sequence argument,
// and copying a std::vector would allocate once per gathered write.
struct BufferView {
  using value_type = asio::const_buffer;
  using const_iterator = const asio::const_buffer*;
  const asio::const_buffer* first;
  const asio::const_buffer* last;
  const_iterator begin() const { return first; }
  const_iterator end() const { return last; }
};

// Per-connection counters, touched only on the connection's strand.
struct ConnectionStats {
  uint64_t requests = 0;
  uint64_t request_errors = 0;
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
};

// One client connection. Socket is tcp::socket or unix_proto::socket, bound to a strand.
template <typename Socket>
class Connection final : public ConnectionBase,
                         public std::enable_shared_from_this<Connection<Socket>> {
 public:
  Connection(std::shared_ptr<Frontend::Impl> fe, Socket socket, std::string peer)
      : fe_(std::move(fe)),
        socket_(std::move(socket)),
        peer_(std::move(peer)),
        wake_(socket_.get_executor()) {
    // Deliver reads a slot on the completing thread while the strand may add slots: reserved up
    // front, slots_ never moves (at most max_inflight_requests are in use, see OverLimit).
    slots_.reserve(fe_->options.max_inflight_requests);
  }

  void Start() {
    auto self = this->shared_from_this();
    id_ = fe_->Register(std::weak_ptr<ConnectionBase>(self));
    if (id_ == 0) return;  // Stop() ran meanwhile: closing the socket is all there is to do
    fe_->stats.connections_open.fetch_add(1);
    asio::co_spawn(
        socket_.get_executor(), [self]() { return self->Run(); }, asio::detached);
  }

  void RequestStop() override {
    asio::post(socket_.get_executor(), [self = this->shared_from_this()] {
      self->stop_reading_ = true;
      boost::system::error_code ec;
      // A pending read ends with EOF; requests already read are still answered.
      self->socket_.shutdown(asio::socket_base::shutdown_receive, ec);
      self->wake_.cancel();
    });
  }

 private:
  static constexpr size_t kReadAheadBytes = 256u << 10;

  // A request handed to the Export, waiting for its completion.
  struct Slot {
    uint64_t cookie = 0;
    uint32_t held_bytes = 0;  // counted in outstanding_bytes_ until the reply is written
    storage::Bytes data;      // READ buffer
  };
  struct Completion {
    uint32_t slot;
    absl::Status status;
    bool replied = false;  // answered by a direct reply: bookkeeping only
  };
  struct Reply {
    char header[wire::kSimpleReplyBytes];
    storage::Bytes data;
    uint32_t held_bytes = 0;
  };

  awaitable<void> Run() {
    const char* phase = "handshake";
    try {
      if (co_await Handshake()) {
        phase = "transmission";
        co_await Transmission();
      }
    } catch (const boost::system::system_error& e) {
      LogIoError(phase, e.code());
    } catch (const std::exception& e) {
      // bad_alloc for a payload, or a bug: this connection ends, the agent goes on.
      spdlog::warn("nbd: closing connection from {} ({}): {}", peer_, phase, e.what());
    }
    EndBurst();
    // Answer everything already read, and wait for every operation the Export still holds: slots
    // and completions refer to this connection until then.
    while (pending_ops_ > 0 || WritesPending()) co_await WaitForWake();
    boost::system::error_code ec;
    socket_.shutdown(asio::socket_base::shutdown_both, ec);
    socket_.close(ec);
    fe_->Unregister(id_);
    fe_->stats.connections_open.fetch_sub(1);
    if (export_) {
      spdlog::debug("nbd: {} closed: {} requests ({} errors), {} bytes read, {} bytes written",
                    peer_, cstats_.requests, cstats_.request_errors, cstats_.bytes_read,
                    cstats_.bytes_written);
    }
  }

  void LogIoError(const char* phase, const boost::system::error_code& code) {
    const bool ordinary_end = code == asio::error::eof || code == asio::error::connection_reset ||
                              code == asio::error::operation_aborted ||
                              code == asio::error::broken_pipe;
    if (export_ == nullptr) {
      // The handshake did not finish: exactly one line, unless we closed it (Stop()).
      fe_->stats.handshakes_refused.fetch_add(1);
      if (stop_reading_) return;
      spdlog::warn(
          "nbd: closing connection from {}: malformed handshake: {}", peer_,
          ordinary_end ? "client closed the connection before choosing an export" : code.message());
      return;
    }
    if (!ordinary_end) spdlog::warn("nbd: connection {} ({}): {}", peer_, phase, code.message());
  }

  awaitable<bool> Handshake() {
    const std::string greeting = wire::Handshake::Greeting();
    co_await asio::async_write(socket_, asio::buffer(greeting), use_awaitable);
    wire::Handshake hs([fe = fe_](std::string_view n) { return fe->Lookup(n); },
                       [fe = fe_] { return fe->exports; });
    std::string in;
    for (;;) {
      in.resize(hs.Need());  // bounded by wire::kMaxOptionBytes
      co_await asio::async_read(socket_, asio::buffer(in), use_awaitable);
      wire::Handshake::Step step = hs.Feed(in);
      if (step.next == wire::Handshake::Next::kClose) {
        if (!step.out.empty()) {  // ABORT's ACK; the client may already be gone
          boost::system::error_code ec;
          co_await asio::async_write(socket_, asio::buffer(step.out),
                                     asio::redirect_error(use_awaitable, ec));
        }
        fe_->stats.handshakes_refused.fetch_add(1);
        if (step.reason == "client aborted") {
          spdlog::debug("nbd: {} aborted the handshake", peer_);
        } else {
          spdlog::warn("nbd: closing connection from {}: malformed handshake: {}", peer_,
                       step.reason);
        }
        co_return false;
      }
      if (!step.out.empty()) {
        co_await asio::async_write(socket_, asio::buffer(step.out), use_awaitable);
      }
      if (step.next == wire::Handshake::Next::kTransmission) {
        export_ = hs.chosen();
        spdlog::debug("nbd: {} uses export {}", peer_, export_->info().name);
        co_return true;
      }
    }
  }

  bool OverLimit() const {
    return outstanding_requests_.load(std::memory_order_relaxed) >=
               fe_->options.max_inflight_requests ||
           outstanding_bytes_ >= fe_->options.max_inflight_bytes;
  }

  awaitable<void> Transmission() {
    const ExportInfo& info = export_->info();
    char raw[wire::kRequestHeaderBytes];
    for (;;) {
      DrainInbox();  // direct replies' bookkeeping, before the limits are looked at
      if (OverLimit() && !stop_reading_ && !write_failed_) {
        fe_->stats.backpressure_waits.fetch_add(1);
        while (OverLimit() && !stop_reading_ && !write_failed_) co_await WaitForWake();
      }
      if (stop_reading_ || write_failed_) co_return;
      if (!TakeBuffered(raw, sizeof raw)) co_await ReadExact(raw, sizeof raw);
      wire::RequestHeader h;
      if (!wire::ParseRequestHeader(raw, &h)) {
        spdlog::warn("nbd: closing connection from {}: bad request magic", peer_);
        co_return;
      }
      if (h.type == wire::kCmdDisc) co_return;  // after answering what was read (Run)
      ++cstats_.requests;
      fe_->stats.requests.fetch_add(1);
      const wire::Verdict v = wire::ValidateRequest(h, info);
      if (v.error != 0) {
        CountError();
        fe_->stats.requests_refused.fetch_add(1);
        if (v.close) {
          spdlog::warn("nbd: closing connection from {}: {} (payload too large to skip)", peer_,
                       v.reason);
          co_return;
        }
        spdlog::debug("nbd: {}: refused: {}", peer_, v.reason);
        if (v.payload_follows) co_await Discard(h.length);
        Answer(h.cookie, v.error, {}, 0);
        continue;
      }
      if (h.length == 0 && h.type != wire::kCmdFlush) {
        Answer(h.cookie, 0, {}, 0);  // nothing to read, write or zero: don't bother the Export
        continue;
      }
      storage::Bytes payload;
      if (h.type == wire::kCmdWrite) {
        // Straight into its own buffer, uninitialised. It counts against max_inflight_bytes from
        // Dispatch on, so a connection holds at most the limit plus one payload (32 MiB).
        payload = storage::Bytes::Allocate(h.length);
        if (!TakeBuffered(payload.data(), h.length)) co_await ReadExact(payload.data(), h.length);
        cstats_.bytes_written += h.length;
        fe_->stats.bytes_written.fetch_add(h.length);
      }
      BeginBurst();
      Dispatch(h, std::move(payload));
    }
  }

  // See FrontendOptions::burst_begin. Every suspension of Transmission() goes through ReadExact
  // or WaitForWake, which end the burst first.
  void BeginBurst() {
    if (in_burst_ || fe_->options.burst_begin == nullptr) return;
    in_burst_ = true;
    fe_->options.burst_begin();
  }
  void EndBurst() {
    if (!in_burst_) return;
    in_burst_ = false;
    fe_->options.burst_end();
  }

  // Hands a valid request to the Export (a WRITE with its payload).
  void Dispatch(const wire::RequestHeader& h, storage::Bytes payload) {
    // Direct replies' bookkeeping, so that outstanding_requests_ counts only what is unanswered.
    DrainInbox();
    const bool fua = (h.flags & wire::kCmdFlagFua) != 0;
    const bool carries_data = h.type == wire::kCmdRead || h.type == wire::kCmdWrite;
    const uint32_t slot = AcquireSlot(h.cookie, carries_data ? h.length : 0);
    outstanding_requests_.fetch_add(1, std::memory_order_relaxed);
    switch (h.type) {
      case wire::kCmdRead: {
        Slot& s = slots_[slot];
        s.data = storage::Bytes::Allocate(h.length);
        ++pending_ops_;
        export_->Read(h.offset, h.length, s.data.data(), MakeDone(slot));
        break;
      }
      case wire::kCmdWrite:
        ++pending_ops_;
        export_->Write(h.offset, std::move(payload), fua, MakeDone(slot));
        break;
      case wire::kCmdFlush:
        ++pending_ops_;
        export_->Flush(MakeDone(slot));
        break;
      case wire::kCmdTrim:
        ++pending_ops_;
        export_->Trim(h.offset, h.length, fua, MakeDone(slot));
        break;
      case wire::kCmdWriteZeroes:
        ++pending_ops_;
        export_->WriteZeroes(h.offset, h.length, fua, (h.flags & wire::kCmdFlagNoHole) != 0,
                             MakeDone(slot));
        break;
    }
  }

  uint32_t AcquireSlot(uint64_t cookie, uint32_t held_bytes) {
    uint32_t i;
    if (!free_slots_.empty()) {
      i = free_slots_.back();
      free_slots_.pop_back();
    } else {
      i = static_cast<uint32_t>(slots_.size());
      slots_.emplace_back();  // at most max_inflight_requests of them
    }
    slots_[i].cookie = cookie;
    slots_[i].held_bytes = held_bytes;
    outstanding_bytes_ += held_bytes;
    return i;
  }

  // The callback an Export runs (on any thread). Small enough for AnyInvocable's inline storage
  // (two pointers), so no heap allocation. The connection outlives it because Run() waits for
  // pending_ops_ to reach zero.
  struct DoneFn {
    Connection* c;
    uint32_t slot;
    void operator()(absl::Status st) && { c->Deliver(slot, std::move(st)); }
  };
  static_assert(sizeof(DoneFn) <= 2 * sizeof(void*) &&
                std::is_nothrow_move_constructible_v<DoneFn>);
  Export::Done MakeDone(uint32_t slot) { return DoneFn{this, slot}; }

  // Completions arrive on other threads (a group's committer finishes a whole batch at once); they
  // are collected here and handed to the strand with one post per burst, not one per request.
  void Deliver(uint32_t slot, absl::Status st) {
    // The strand wrote the slot before handing the request to the Export, and slots_ never moves.
    const bool replied = st.ok() && slots_[slot].data.size() == 0 &&
                         outstanding_requests_.load(std::memory_order_relaxed) == 1 &&
                         TryReplyDirect(slots_[slot].cookie);
    std::shared_ptr<Connection> self;
    {
      std::lock_guard lock(inbox_mu_);
      inbox_.push_back({slot, std::move(st), replied});
      if (inbox_posted_) return;
      // A direct reply's bookkeeping waits for the strand's next Dispatch, unless the strand
      // sleeps until something completes (back-pressure, the end of the connection).
      if (replied && !strand_waits_) return;
      inbox_posted_ = true;
      self = this->shared_from_this();
    }
    asio::post(socket_.get_executor(), [self = std::move(self)] { self->DrainInbox(); });
  }

  // Sends a successful simple reply on this (any) thread if nothing else is being written or
  // waits to be; false if it sent nothing (the caller goes through the strand).
  bool TryReplyDirect(uint64_t cookie) {
    {
      std::lock_guard lock(reply_mu_);
      if (writing_ || !queued_.empty() || write_failed_ || !fe_->options.direct_replies) {
        return false;
      }
      writing_ = true;  // the socket's write side is ours until the send returns
    }
    wire::EncodeSimpleReply(0, cookie, direct_reply_);
    ssize_t n;
    do {
      n = ::send(socket_.native_handle(), direct_reply_, sizeof direct_reply_,
                 MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n > 0 && static_cast<size_t>(n) < sizeof direct_reply_) {
      fe_->stats.direct_replies.fetch_add(1, std::memory_order_relaxed);
      // A full send buffer took part of it: the strand writes the rest before anything else, and
      // holds the write side until then.
      asio::post(socket_.get_executor(), [self = this->shared_from_this(), sent = size_t(n)] {
        self->FinishDirectReply(sent);
      });
      return true;
    }
    bool pump = false;
    {
      std::lock_guard lock(reply_mu_);
      writing_ = false;
      pump = !queued_.empty();  // the strand found the write side busy meanwhile
    }
    if (pump)
      asio::post(socket_.get_executor(), [self = this->shared_from_this()] { self->Pump(); });
    // Nothing sent (EAGAIN, or an error the strand's own write will meet and report): the reply
    // goes the usual way.
    if (n <= 0) return false;
    fe_->stats.direct_replies.fetch_add(1, std::memory_order_relaxed);
    return true;
  }

  void FinishDirectReply(size_t sent) {
    asio::async_write(socket_, asio::buffer(direct_reply_ + sent, sizeof direct_reply_ - sent),
                      [self = this->shared_from_this()](boost::system::error_code ec, size_t) {
                        self->OnWritten(ec);  // sending_ is empty: the write side was held
                      });
  }

  // Whether a reply is being written or waits to be (the end of the connection waits for them).
  bool WritesPending() {
    std::lock_guard lock(reply_mu_);
    return !write_failed_ && (writing_ || !queued_.empty());
  }

  void DrainInbox() {
    {
      std::lock_guard lock(inbox_mu_);
      if (inbox_.empty()) return;
      draining_.swap(inbox_);
      inbox_posted_ = false;
    }
    for (Completion& c : draining_) {
      Slot& s = slots_[c.slot];
      --pending_ops_;
      if (c.replied) {  // no data (Deliver checked), already on the socket
        outstanding_requests_.fetch_sub(1, std::memory_order_relaxed);
        outstanding_bytes_ -= s.held_bytes;
        free_slots_.push_back(c.slot);
        continue;
      }
      const uint32_t error = wire::ErrorFromStatus(c.status);
      // exchange, not move: a moved-from Bytes keeps its size (storage/bytes.h), and the slot is
      // reused.
      storage::Bytes data = std::exchange(s.data, storage::Bytes());
      if (error != 0) {
        CountError();
        spdlog::warn("nbd: {}: request failed: {}", peer_, std::string(c.status.message()));
        data = {};  // a simple reply carries no data after an error
      } else if (data.size() > 0) {
        cstats_.bytes_read += data.size();
        fe_->stats.bytes_read.fetch_add(data.size());
      }
      Queue(s.cookie, error, std::move(data), s.held_bytes);
      free_slots_.push_back(c.slot);
    }
    draining_.clear();  // keeps its capacity for the next burst
    Pump();
    wake_.cancel();
  }

  void CountError() {
    ++cstats_.request_errors;
    fe_->stats.request_errors.fetch_add(1);
  }

  // A reply for a request that never reached the Export.
  void Answer(uint64_t cookie, uint32_t error, storage::Bytes data, uint32_t held_bytes) {
    outstanding_requests_.fetch_add(1, std::memory_order_relaxed);
    outstanding_bytes_ += held_bytes;
    Queue(cookie, error, std::move(data), held_bytes);
    Pump();
  }

  void Queue(uint64_t cookie, uint32_t error, storage::Bytes data, uint32_t held_bytes) {
    std::lock_guard lock(reply_mu_);
    Reply& r = queued_.emplace_back();
    wire::EncodeSimpleReply(error, cookie, r.header);
    r.data = std::move(data);
    r.held_bytes = held_bytes;
  }

  // Sends every queued reply in one gathered write; replies completed meanwhile go in the next.
  void Pump() {
    {
      std::lock_guard lock(reply_mu_);
      if (writing_ || queued_.empty() || write_failed_) return;
      writing_ = true;
      sending_.swap(queued_);
    }
    buffers_.clear();
    for (const Reply& r : sending_) {
      buffers_.push_back(asio::buffer(r.header, wire::kSimpleReplyBytes));
      if (r.data.size() > 0) buffers_.push_back(asio::buffer(r.data.data(), r.data.size()));
    }
    asio::async_write(socket_, BufferView{buffers_.data(), buffers_.data() + buffers_.size()},
                      [self = this->shared_from_this()](boost::system::error_code ec, size_t) {
                        self->OnWritten(ec);
                      });
  }

  void OnWritten(const boost::system::error_code& ec) {
    for (const Reply& r : sending_) {
      outstanding_requests_.fetch_sub(1, std::memory_order_relaxed);
      outstanding_bytes_ -= r.held_bytes;
    }
    sending_.clear();
    std::unique_lock lock(reply_mu_);
    writing_ = false;
    if (ec) {
      // The client went away: nothing more can be answered. Stop the reader too.
      write_failed_ = true;
      for (const Reply& r : queued_) {
        outstanding_requests_.fetch_sub(1, std::memory_order_relaxed);
        outstanding_bytes_ -= r.held_bytes;
      }
      queued_.clear();
      lock.unlock();
      boost::system::error_code ignored;
      socket_.shutdown(asio::socket_base::shutdown_both, ignored);
    } else {
      lock.unlock();
      Pump();
    }
    wake_.cancel();
  }

  // Copies n bytes from the read-ahead buffer if it holds them all (no coroutine frame needed).
  bool TakeBuffered(char* dst, size_t n) {
    if (rend_ - rpos_ < n) return false;
    std::memcpy(dst, rbuf_.get() + rpos_, n);
    rpos_ += n;
    return true;
  }

  // Reads exactly n bytes. Whatever the read-ahead buffer holds is used first; then each recv is a
  // scatter read into the destination and, behind it, the read-ahead buffer, so a WRITE payload
  // lands in its Bytes without a copy while the headers that follow it are picked up by the same
  // syscall.
  awaitable<void> ReadExact(char* dst, size_t n) {
    const size_t take = std::min(n, rend_ - rpos_);
    std::memcpy(dst, rbuf_.get() + rpos_, take);
    rpos_ += take;
    dst += take;
    n -= take;
    if (n == 0) co_return;
    rpos_ = rend_ = 0;
    EndBurst();  // this coroutine may suspend below
    while (n > 0) {
      const std::array<asio::mutable_buffer, 2> bufs{asio::buffer(dst, n),
                                                     asio::buffer(rbuf_.get(), kReadAheadBytes)};
      const size_t got = co_await socket_.async_read_some(bufs, use_awaitable);
      if (got <= n) {
        dst += got;
        n -= got;
      } else {
        rend_ = got - n;
        n = 0;
      }
    }
  }

  // Skips a refused WRITE's payload (at most wire::kMaxDiscardBytes) to stay in sync.
  awaitable<void> Discard(uint32_t length) {
    auto scratch = std::make_unique_for_overwrite<char[]>(64u << 10);
    while (length > 0) {
      const uint32_t n = std::min<uint32_t>(length, 64u << 10);
      co_await ReadExact(scratch.get(), n);
      length -= n;
    }
  }

  // Sleeps until a completion, a finished write or RequestStop cancels the timer. Completions
  // already in the inbox (direct replies, which post nothing while the strand is awake) are taken
  // instead of sleeping.
  awaitable<void> WaitForWake() {
    EndBurst();
    {
      std::lock_guard lock(inbox_mu_);
      strand_waits_ = inbox_.empty();
    }
    if (!strand_waits_) {
      DrainInbox();
      co_return;
    }
    wake_.expires_at(asio::steady_timer::time_point::max());
    boost::system::error_code ec;
    co_await wake_.async_wait(asio::redirect_error(use_awaitable, ec));
    std::lock_guard lock(inbox_mu_);
    strand_waits_ = false;
  }

  const std::shared_ptr<Frontend::Impl> fe_;
  Socket socket_;
  const std::string peer_;
  asio::steady_timer wake_;
  uint64_t id_ = 0;
  std::shared_ptr<Export> export_;
  ConnectionStats cstats_;

  // Read side.
  std::unique_ptr<char[]> rbuf_ = std::make_unique_for_overwrite<char[]>(kReadAheadBytes);
  size_t rpos_ = 0, rend_ = 0;
  bool stop_reading_ = false;

  // Accounting: outstanding = read and not yet answered on the socket (back-pressure);
  // pending = handed to the Export and not yet completed (drain before the connection goes).
  // Atomic: Deliver reads it on the completing thread (a direct reply only for the only one).
  std::atomic<uint32_t> outstanding_requests_{0};
  uint64_t outstanding_bytes_ = 0;
  uint32_t pending_ops_ = 0;
  std::vector<Slot> slots_;
  std::vector<uint32_t> free_slots_;

  // Completions from other threads.
  std::mutex inbox_mu_;
  std::vector<Completion> inbox_;  // GUARDED_BY(inbox_mu_)
  bool inbox_posted_ = false;      // GUARDED_BY(inbox_mu_)
  bool strand_waits_ = false;      // GUARDED_BY(inbox_mu_): in WaitForWake, needs a post to wake
  bool in_burst_ = false;          // between BeginBurst and EndBurst (the strand only)
  std::vector<Completion> draining_;

  // Write side: replies waiting, and those in the async_write under way (the strand's), or a
  // direct reply being sent (any thread's). The strand changes write_failed_ only under reply_mu_
  // and may read it without; other threads read it under reply_mu_.
  std::mutex reply_mu_;
  std::vector<Reply> queued_;  // GUARDED_BY(reply_mu_)
  std::vector<Reply> sending_;
  std::vector<asio::const_buffer> buffers_;
  bool writing_ = false;       // GUARDED_BY(reply_mu_): the socket's write side is taken
  bool write_failed_ = false;  // see above
  char direct_reply_[wire::kSimpleReplyBytes];  // the direct reply being sent (writing_ held)
};

template <typename Acceptor, typename Socket>
void Accept(std::shared_ptr<Frontend::Impl> fe, Acceptor* acceptor, std::string where) {
  acceptor->async_accept(
      asio::make_strand(fe->io), [fe, acceptor, where](boost::system::error_code ec, Socket s) {
        if (ec == asio::error::operation_aborted) return;  // closed by Stop()
        if (ec) {
          // EMFILE and friends: log, and try again a little later rather than spin.
          spdlog::warn("nbd: accept on {}: {}", where, ec.message());
          auto timer = std::make_shared<asio::steady_timer>(acceptor->get_executor(),
                                                            std::chrono::milliseconds(100));
          timer->async_wait([fe, acceptor, where, timer](boost::system::error_code) {
            {
              std::lock_guard lock(fe->mu);
              if (fe->stopping) return;
            }
            Accept<Acceptor, Socket>(fe, acceptor, where);
          });
          return;
        } else {
          std::string peer = where;
          if constexpr (std::is_same_v<Socket, tcp::socket>) {
            boost::system::error_code e2;
            s.set_option(tcp::no_delay(true), e2);
            auto ep = s.remote_endpoint(e2);
            if (!e2) peer = fmt::format("{}:{}", ep.address().to_string(), ep.port());
          }
          fe->stats.connections.fetch_add(1);
          std::make_shared<Connection<Socket>>(fe, std::move(s), peer)->Start();
        }
        {
          std::lock_guard lock(fe->mu);
          if (fe->stopping) return;
        }
        Accept<Acceptor, Socket>(fe, acceptor, where);
      });
}

absl::StatusOr<tcp::endpoint> Endpoint(const TcpListen& l) {
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(l.host, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        fmt::format("listen address '{}': {}", l.ToString(), ec.message()));
  }
  return tcp::endpoint(addr, l.port);
}

}  // namespace

std::string TcpListen::ToString() const {
  return host.find(':') == std::string::npos ? fmt::format("{}:{}", host, port)
                                             : fmt::format("[{}]:{}", host, port);
}

Frontend::Frontend(asio::io_context& io, FrontendOptions options)
    : impl_(std::make_shared<Impl>(io, std::move(options))) {}

Frontend::~Frontend() { Stop(); }

void Frontend::AddExport(std::shared_ptr<Export> e) { impl_->exports.push_back(std::move(e)); }

absl::Status Frontend::Start() {
  Impl& fe = *impl_;
  for (const TcpListen& l : fe.options.tcp_listen) {
    const std::string a = l.ToString();
    auto ep = Endpoint(l);
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
    if (ec) {
      return absl::UnavailableError(
          fmt::format("cannot listen on unix socket {}: {}", path, ec.message()));
    }
    fe.unix_acceptors.push_back(std::move(acc));
  }
  for (size_t i = 0; i < fe.tcp_acceptors.size(); ++i) {
    Accept<tcp::acceptor, tcp::socket>(impl_, fe.tcp_acceptors[i].get(),
                                       fe.options.tcp_listen[i].ToString());
    spdlog::info("nbd: listening on {} ({} export(s))", fe.options.tcp_listen[i].ToString(),
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
  std::vector<std::weak_ptr<ConnectionBase>> live;
  {
    std::lock_guard lock(fe->mu);
    if (fe->stopping) return;
    fe->stopping = true;  // from here on Register() refuses new connections
    for (auto& [id, c] : fe->live) live.push_back(c);
  }
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
  for (auto& w : live) {
    if (auto c = w.lock()) c->RequestStop();
  }
}

const FrontendStats& Frontend::stats() const { return impl_->stats; }

}  // namespace tvilling::nbd
