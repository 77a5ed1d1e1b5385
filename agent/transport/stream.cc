// stream.cc: Replication's RPCs on gRPC's completion-queue API (see stream.h).
//
// Why not the callback API: there every completed operation (a batch written, an ack read) is
// handed to one of gRPC's own threads, a futex wake-up each, which on this class of VM costs more
// than the wire. Here the thread that waits on a completion queue also polls the sockets of the
// calls on it (with gRPC's `poll` engine, which tvillingd selects), so it reads an ack itself and
// runs the primary's release inline; and a write is started by the thread that has the message
// (the committer, the replica's stream thread). docs/benchmarks.md "The round-trip floors"
// measured the difference: 125 -> 60 µs per round trip without TLS, 176 -> 81 µs with it.
//
// Threads: each ReplicationServer polls one queue with one thread (`tvl-grpc-srv`), which accepts
// streams, reads their messages and runs the handlers. Client streams share one queue and thread
// per process (`tvl-grpc-cli`), alive while any client stream is. Writes, Finish and TryCancel
// may be started from any thread. gRPC allows one read and one write (or finish) in flight per
// stream; each stream's state (the `Call`s below) lives until every operation it started has
// come back through its queue, and only then ends the stream and lets go of itself.
#include "agent/transport/stream.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "agent/transport/tls.h"
#include "fmt/format.h"
#include "storage/thread_name.h"
#include "tvilling/v1/replication.grpc.pb.h"

namespace tvilling::transport {

namespace {

grpc::Status ToGrpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(static_cast<int>(s.code())),
                      std::string(s.message()));
}

absl::Status FromGrpc(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(static_cast<int>(s.error_code())),
                      s.error_message());
}

// Why a server stream ended without a status of ours. gRPC does not tell the server which of these
// it was; the peer sees the exact status (e.g. RESOURCE_EXHAUSTED "Received message larger than
// max").
absl::Status CancelledByGrpc() {
  return absl::CancelledError(fmt::format(
      "stream cancelled: the peer went away, or gRPC refused a message from it (e.g. over the {} "
      "byte receive limit), or the server is shutting down",
      kMaxMessageBytes));
}

// A completion-queue tag: operation `op` of `owner` completed. Complete runs on the queue's thread
// and may destroy the owner (and with it the tag).
class Completion {
 public:
  virtual void Complete(int op, bool ok) = 0;

 protected:
  ~Completion() = default;
};

struct Tag {
  Completion* owner = nullptr;
  int op = 0;
};

// ThreadSanitizer cannot see gRPC's own synchronisation (Debian's gRPC is not instrumented): an
// operation started on one thread and completed on the queue's thread would look like a race on
// everything both touch (the message being written, the stream's state). In a TSan build every
// start of an operation holds one process-wide mutex and the queue's thread takes it before it
// runs a completion, which tells TSan what gRPC guarantees: the start happens before its
// completion. (The queue's thread can only see a completion once its start is under way, and
// the start calls never wait for the queue.) Other builds call straight through.
#if defined(__SANITIZE_THREAD__)
std::mutex& StartMutex() {
  static auto* mu = new std::mutex;  // never destroyed: queue threads may outlive statics
  return *mu;
}
template <class F>
void StartOp(F&& start) {
  std::lock_guard<std::mutex> l(StartMutex());
  start();
}
void CompletionArrived() { std::lock_guard<std::mutex> l(StartMutex()); }
#else
template <class F>
void StartOp(F&& start) {
  start();
}
void CompletionArrived() {}
#endif

void Poll(grpc::CompletionQueue* cq, const char* thread_name) {
  storage::SetThreadName(thread_name);
  void* t = nullptr;
  bool ok = false;
  while (cq->Next(&t, &ok)) {
    CompletionArrived();
    auto* tag = static_cast<Tag*>(t);
    tag->owner->Complete(tag->op, ok);
  }
}

// Replication with Stream, VerifyChunks and MarkResync all on the completion queue. (A method on
// the callback API would add gRPC's own polling threads to every connection's pollers, and those
// would read the stream's messages and hand them to ours.)
using AsyncService = v1::Replication::AsyncService;

class ServerImpl;

// ---- server: one Replication.Stream ----------------------------------------------------------

class ServerCall final : public ServerStream,
                         public Completion,
                         public std::enable_shared_from_this<ServerCall> {
 public:
  enum Op { kAccept, kRead, kWrite, kFinish, kDone, kOps };

  explicit ServerCall(ServerImpl* server) : server_(server), call_(std::make_unique<Call>()) {
    for (int i = 0; i < kOps; ++i) tags_[i] = Tag{this, i};
  }

  // Asks the server for the next stream; this object holds itself until the stream has ended.
  void Request(AsyncService* service, grpc::ServerCompletionQueue* cq) {
    self_ = shared_from_this();
    StartOp([&] {
      call_->ctx.AsyncNotifyWhenDone(&tags_[kDone]);
      service->RequestStream(&call_->ctx, &call_->rw, cq, cq, &tags_[kAccept]);
    });
  }

  void Send(v1::FromReplica msg) override {
    const v1::FromReplica* to_write = nullptr;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (ended_ || closing_) return;
      queued_bytes_ += msg.ByteSizeLong();
      queue_.push_back(std::move(msg));
      if (writing_) return;
      writing_ = true;
      to_write = &queue_.front();  // deque::push_back keeps references to elements valid
    }
    StartOp([&] { call_->rw.Write(*to_write, &tags_[kWrite]); });
  }

  uint64_t queued_bytes() const override {
    std::lock_guard<std::mutex> l(mu_);
    return queued_bytes_;
  }

  void Close(absl::Status status) override { CloseWith(std::move(status), false); }

  // Cancels the call if it is still running (the server's Shutdown). Under mu_ so that the end
  // cannot free the call meanwhile; TryCancel of the async API runs nothing of ours inline.
  void Cancel() {
    std::lock_guard<std::mutex> l(mu_);
    if (!ended_) call_->ctx.TryCancel();
  }

  void Complete(int op, bool ok) override;

 private:
  struct Call {
    grpc::ServerContext ctx;
    grpc::ServerAsyncReaderWriter<v1::FromReplica, v1::ToReplica> rw{&ctx};
  };

  void Begin();

  void StartReadIfOpen() {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (closing_) return;
      reading_ = true;
    }
    StartOp([&] { call_->rw.Read(&in_, &tags_[kRead]); });
  }

  void OnRead(bool ok) {
    {
      std::lock_guard<std::mutex> l(mu_);
      reading_ = false;
    }
    if (!ok) {
      // gRPC does not say why a read failed: the call is over (then the done tag reports the
      // cancellation), the client half-closed (a primary never does: it ends a stream by
      // cancelling it), or a message did not parse. End the call if nobody chose a status yet.
      CloseWith(absl::InvalidArgumentError(
                    "the peer sent a message that does not parse as a tvilling.v1.ToReplica, or "
                    "half-closed the stream"),
                true);
      return;
    }
    if (handler_) handler_->OnMessage(in_);
    in_.Clear();
    StartReadIfOpen();
  }

  void OnWrite(bool ok) {
    const v1::FromReplica* next = nullptr;
    bool finish = false;
    grpc::Status status;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!ok) {  // the call is over
        queue_.clear();
        queued_bytes_ = 0;
      } else {
        queued_bytes_ -= queue_.front().ByteSizeLong();
        queue_.pop_front();
      }
      if (!queue_.empty()) {
        next = &queue_.front();
      } else {
        writing_ = false;
        if (closing_ && !finish_started_) {
          finish_started_ = finishing_ = true;
          finish = true;
          status = ToGrpc(final_);
        }
      }
    }
    if (next != nullptr) {
      StartOp([&] { call_->rw.Write(*next, &tags_[kWrite]); });
    } else if (finish) {
      StartOp([&] { call_->rw.Finish(status, &tags_[kFinish]); });
    }
  }

  // Close, and whether it is the read failure's (which a cancellation overrides at the end).
  void CloseWith(absl::Status status, bool on_read_failure) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (ended_ || closing_) return;
      closing_ = true;
      closed_on_read_failure_ = on_read_failure;
      final_ = status;
      if (writing_) return;  // OnWrite finishes once the queue is written
      finish_started_ = finishing_ = true;
    }
    StartOp([&] { call_->rw.Finish(ToGrpc(status), &tags_[kFinish]); });
  }

  // Ends the stream once gRPC reported the call done and no operation of ours is in flight:
  // OnClosed, then the call is freed (the server's Shutdown waits for that), then this object
  // lets go of itself. Runs on the queue's thread only.
  void EndIfIdle();

  ServerImpl* server_;
  std::unique_ptr<Call> call_;  // freed at the end; guarded by ended_ (under mu_)
  Tag tags_[kOps];
  std::shared_ptr<ServerCall> self_;
  std::unique_ptr<ServerStreamHandler> handler_;  // the queue's thread only
  v1::ToReplica in_;

  mutable std::mutex mu_;
  std::deque<v1::FromReplica> queue_;
  uint64_t queued_bytes_ = 0;
  bool reading_ = false;
  bool writing_ = false;
  bool closing_ = false;         // Close called: no more Sends or reads, Finish once written
  bool finish_started_ = false;  // Finish called
  bool finishing_ = false;       // ... and its tag not yet back
  bool done_ = false;            // gRPC's done tag is back: the call is over
  bool cancelled_ = false;       // ... and it was cancelled
  bool closed_on_read_failure_ = false;
  bool ended_ = false;  // OnClosed delivered (or about to be); the call is being freed
  absl::Status final_;
};

// ---- server: the unary verify calls ---------------------------------------------------------

// One VerifyChunks or MarkResync call: asks the acceptor, whose `done` (any thread) finishes it.
template <class Request, class Reply>
class UnaryCall final : public Completion {
 public:
  using RequestFn = void (AsyncService::*)(grpc::ServerContext*, Request*,
                                           grpc::ServerAsyncResponseWriter<Reply>*,
                                           grpc::CompletionQueue*, grpc::ServerCompletionQueue*,
                                           void*);
  using Handler = void (StreamAcceptor::*)(const Request&, std::vector<std::string>, std::string,
                                           StreamAcceptor::Done<Reply>);

  static void Start(ServerImpl* server, RequestFn request, Handler handler);

  void Complete(int op, bool ok) override;

 private:
  UnaryCall(ServerImpl* server, RequestFn request, Handler handler)
      : server_(server), request_(request), handler_(handler) {}

  enum Op { kAccept, kFinish };
  ServerImpl* server_;
  RequestFn request_;
  Handler handler_;
  grpc::ServerContext ctx_;
  Request req_;
  Reply reply_;
  grpc::ServerAsyncResponseWriter<Reply> responder_{&ctx_};
  Tag tags_[2] = {Tag{this, kAccept}, Tag{this, kFinish}};
};

// ---- server ---------------------------------------------------------------------------------

class ServerImpl final : public ReplicationServer {
 public:
  explicit ServerImpl(StreamAcceptor* acceptor) : acceptor_(acceptor) {}
  ~ServerImpl() override { Shutdown(); }

  absl::Status Listen(const std::string& listen, std::shared_ptr<grpc::ServerCredentials> creds) {
    grpc::ServerBuilder b;
    b.AddListeningPort(listen, std::move(creds), &port_);
    b.RegisterService(&service_);
    b.SetMaxReceiveMessageSize(kMaxMessageBytes);
    b.SetMaxSendMessageSize(kMaxMessageBytes);
    // Accept the clients' keepalive pings (every 10 s, also while idle) without a GOAWAY.
    b.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    b.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 5000);
    b.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
    b.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
    b.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
    cq_ = b.AddCompletionQueue();
    server_ = b.BuildAndStart();
    if (!server_ || port_ == 0) {
      server_.reset();
      cq_->Shutdown();
      void* t = nullptr;
      bool ok = false;
      while (cq_->Next(&t, &ok)) {
      }
      cq_.reset();
      return absl::UnavailableError(fmt::format(
          "replication server: cannot listen on {} (address in use or invalid?)", listen));
    }
    RequestStream();
    UnaryCall<v1::VerifyChunksRequest, v1::VerifyChunksReply>::Start(
        this, &AsyncService::RequestVerifyChunks, &StreamAcceptor::VerifyChunks);
    UnaryCall<v1::MarkResyncRequest, v1::MarkResyncReply>::Start(
        this, &AsyncService::RequestMarkResync, &StreamAcceptor::MarkResync);
    thread_ = std::thread([this] { Poll(cq_.get(), "tvl-grpc-srv"); });
    return absl::OkStatus();
  }

  int port() const override { return port_; }

  void Shutdown() override {
    std::vector<std::shared_ptr<ServerCall>> open;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (shut_ || !server_) return;
      shut_ = true;
      for (auto& w : streams_) {
        if (auto s = w.lock()) open.push_back(std::move(s));
      }
    }
    for (auto& s : open) s->Cancel();
    open.clear();
    // Calls still running after the deadline are cancelled by gRPC; the requests for new calls
    // come back.
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(1000));
    server_->Wait();
    // The queue is shut down only when nothing can start an operation on it any more (gRPC
    // asserts on an operation started on a shut-down queue with nothing pending): every request
    // for a call is back and every accepted call has ended, which the queue's thread does as
    // their last operations come back (a unary call waits for its `done`).
    {
      std::unique_lock<std::mutex> l(mu_);
      idle_cv_.wait(l, [&] { return requests_ == 0 && live_calls_ == 0; });
    }
    cq_->Shutdown();
    thread_.join();
  }

  // Asks for the next stream unless the server is shutting down.
  void RequestStream() {
    if (!Requesting()) return;
    std::make_shared<ServerCall>(this)->Request(&service_, cq_.get());
  }
  template <class Request, class Reply>
  bool RequestUnary(void (AsyncService::*request)(grpc::ServerContext*, Request*,
                                                  grpc::ServerAsyncResponseWriter<Reply>*,
                                                  grpc::CompletionQueue*,
                                                  grpc::ServerCompletionQueue*, void*),
                    grpc::ServerContext* ctx, Request* req,
                    grpc::ServerAsyncResponseWriter<Reply>* responder, void* tag) {
    if (!Requesting()) return false;
    StartOp([&] { (service_.*request)(ctx, req, responder, cq_.get(), cq_.get(), tag); });
    return true;
  }
  // A request for a call came back (accepted, or not: the server is shutting down). Returns
  // whether the server is shutting down; an accepted call counts until Ended().
  bool Accepted(bool ok) {
    std::lock_guard<std::mutex> l(mu_);
    --requests_;
    if (ok) ++live_calls_;
    if (requests_ == 0 && live_calls_ == 0) idle_cv_.notify_all();
    return shut_;
  }
  // An accepted call has ended: it starts no more operations.
  void Ended() {
    std::lock_guard<std::mutex> l(mu_);
    --live_calls_;
    if (requests_ == 0 && live_calls_ == 0) idle_cv_.notify_all();
  }

  StreamAcceptor* acceptor() const { return acceptor_; }

  void Add(const std::shared_ptr<ServerCall>& c) {
    std::lock_guard<std::mutex> l(mu_);
    streams_.insert(c);
  }
  void Remove(ServerCall* c) {
    std::lock_guard<std::mutex> l(mu_);
    for (auto it = streams_.begin(); it != streams_.end();) {
      auto s = it->lock();
      if (!s || s.get() == c) {
        it = streams_.erase(it);
      } else {
        ++it;
      }
    }
  }

 private:
  // Counts a request for a new call about to be made, unless the server is shutting down.
  bool Requesting() {
    std::lock_guard<std::mutex> l(mu_);
    if (shut_) return false;
    ++requests_;
    return true;
  }

  StreamAcceptor* acceptor_;
  AsyncService service_;
  std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  std::unique_ptr<grpc::Server> server_;
  std::thread thread_;
  int port_ = 0;
  mutable std::mutex mu_;
  std::condition_variable idle_cv_;
  bool shut_ = false;
  int requests_ = 0;    // requests for new calls not yet back
  int live_calls_ = 0;  // accepted calls not yet ended
  std::set<std::weak_ptr<ServerCall>, std::owner_less<std::weak_ptr<ServerCall>>> streams_;
};

void ServerCall::Complete(int op, bool ok) {
  switch (op) {
    case kAccept: {
      const bool shutting_down = server_->Accepted(ok);
      if (!ok) {  // the server is shutting down; no other tag of this call comes back
        auto keep = std::move(self_);
        return;
      }
      server_->RequestStream();
      // Accepted while the server shuts down: gRPC may have cancelled its calls already.
      if (shutting_down) call_->ctx.TryCancel();
      Begin();
      break;
    }
    case kRead:
      OnRead(ok);
      break;
    case kWrite:
      OnWrite(ok);
      break;
    case kFinish: {
      std::lock_guard<std::mutex> l(mu_);
      finishing_ = false;
      break;
    }
    case kDone: {
      const bool cancelled = call_->ctx.IsCancelled();  // valid once the done tag is back
      std::lock_guard<std::mutex> l(mu_);
      done_ = true;
      cancelled_ = cancelled;
      if (cancelled && !closing_) final_ = CancelledByGrpc();
      break;
    }
    default:
      break;
  }
  EndIfIdle();
}

void ServerCall::Begin() {
  server_->Add(self_);
  std::vector<std::string> ids;
  if (auto auth = call_->ctx.auth_context()) ids = PeerIdentities(*auth);
  handler_ = server_->acceptor()->Accept(self_, std::move(ids), call_->ctx.peer());
  if (!handler_) {
    Close(absl::PermissionDeniedError("stream refused by the replica"));
    return;
  }
  StartReadIfOpen();
}

void ServerCall::EndIfIdle() {
  absl::Status status;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (ended_ || !done_ || reading_ || writing_ || !finish_started_ || finishing_) return;
    ended_ = true;
    status = final_;
    if (cancelled_ && (status.ok() || closed_on_read_failure_)) status = CancelledByGrpc();
    queue_.clear();
    queued_bytes_ = 0;
  }
  if (handler_) {
    handler_->OnClosed(status);
    handler_.reset();
  }
  server_->Remove(this);
  call_.reset();
  server_->Ended();              // the server may shut its queue down from here on
  auto keep = std::move(self_);  // may destroy *this when `keep` goes out of scope
}

template <class Request, class Reply>
void UnaryCall<Request, Reply>::Start(ServerImpl* server, RequestFn request, Handler handler) {
  auto* c = new UnaryCall(server, request, handler);
  if (!server->RequestUnary(request, &c->ctx_, &c->req_, &c->responder_, &c->tags_[kAccept])) {
    delete c;
  }
}

template <class Request, class Reply>
void UnaryCall<Request, Reply>::Complete(int op, bool ok) {
  if (op == kFinish) {  // answered (or failed to: the call was cancelled)
    ServerImpl* server = server_;
    delete this;
    server->Ended();
    return;
  }
  server_->Accepted(ok);
  if (!ok) {  // the server is shutting down
    delete this;
    return;
  }
  Start(server_, request_, handler_);  // the next call of this method
  std::vector<std::string> ids;
  if (auto auth = ctx_.auth_context()) ids = PeerIdentities(*auth);
  (server_->acceptor()->*handler_)(
      req_, std::move(ids), ctx_.peer(), [this](absl::StatusOr<Reply> r) {
        if (r.ok()) {
          reply_ = std::move(*r);
          StartOp([&] { responder_.Finish(reply_, grpc::Status::OK, &tags_[kFinish]); });
        } else {
          StartOp([&] { responder_.FinishWithError(ToGrpc(r.status()), &tags_[kFinish]); });
        }
      });
}

// ---- client ---------------------------------------------------------------------------------

// Destroys what must not be destroyed on a completion queue's thread, on a thread of its own:
// a client stream's last reference may hold its channel and the client queue (whose destructor
// joins that thread). A function-local static, so it is built after gRPC's own statics and drained
// before them.
class Reaper {
 public:
  static Reaper& Get() {
    static Reaper reaper;
    return reaper;
  }
  void Drop(std::shared_ptr<void> p) {
    {
      std::lock_guard<std::mutex> l(mu_);
      queue_.push_back(std::move(p));
    }
    cv_.notify_one();
  }
  ~Reaper() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stopping_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }

 private:
  Reaper() : thread_([this] { Run(); }) {}
  void Run() {
    std::unique_lock<std::mutex> l(mu_);
    for (;;) {
      cv_.wait(l, [&] { return stopping_ || !queue_.empty(); });
      std::vector<std::shared_ptr<void>> batch = std::move(queue_);
      queue_.clear();
      l.unlock();
      batch.clear();  // the destructors run here, on no gRPC thread
      l.lock();
      if (stopping_ && queue_.empty()) return;
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::shared_ptr<void>> queue_;
  bool stopping_ = false;
  std::thread thread_;  // last: starts once the members above exist
};

// The client streams' queue and its thread, shared while any client stream exists. Its last
// owner is a client stream being destroyed on the reaper's or a user's thread, never on this
// queue's thread (a stream's callbacks run while the stream, an owner, is alive).
class ClientQueue {
 public:
  static std::shared_ptr<ClientQueue> Get() {
    std::lock_guard<std::mutex> l(Live().mu);
    auto q = Live().current.lock();
    if (!q) {
      q = std::make_shared<ClientQueue>();
      Live().current = q;
      ++Live().queues;
    }
    return q;
  }
  ClientQueue() : thread_([this] { Poll(&cq_, "tvl-grpc-cli"); }) {}
  ~ClientQueue() {
    cq_.Shutdown();  // every stream on it has ended: nothing is pending
    thread_.join();
    {
      std::lock_guard<std::mutex> l(Live().mu);
      --Live().queues;
    }
    Live().cv.notify_all();
  }
  grpc::CompletionQueue* cq() { return &cq_; }

  // Until no queue (so no client stream) is left.
  static bool WaitNone(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> l(Live().mu);
    return Live().cv.wait_for(l, timeout, [] { return Live().queues == 0; });
  }

 private:
  struct LiveQueues {
    std::mutex mu;
    std::condition_variable cv;
    std::weak_ptr<ClientQueue> current;
    int queues = 0;  // constructed and not yet destroyed (a new one may start as the last ends)
  };
  static LiveQueues& Live() {
    static auto* live = new LiveQueues;  // never destroyed: used from threads that end at exit
    return *live;
  }

  grpc::CompletionQueue cq_;
  std::thread thread_;  // last: starts once the queue exists
};

class ClientCall final : public ClientStream,
                         public Completion,
                         public std::enable_shared_from_this<ClientCall> {
 public:
  enum Op { kStart, kRead, kWrite, kFinish, kOps };

  ClientCall(std::function<void(v1::FromReplica)> on_message,
             std::function<void(absl::Status)> on_closed)
      : queue_(ClientQueue::Get()),
        on_message_(std::move(on_message)),
        on_closed_(std::move(on_closed)) {
    for (int i = 0; i < kOps; ++i) tags_[i] = Tag{this, i};
  }

  void Begin(std::shared_ptr<grpc::Channel> channel) {
    self_ = shared_from_this();
    stub_ = v1::Replication::NewStub(std::move(channel));
    rw_ = stub_->PrepareAsyncStream(&ctx_, queue_->cq());
    {
      std::lock_guard<std::mutex> l(mu_);
      writing_ = true;  // StartCall sends the headers in the write slot: Writes wait for its tag
      reading_ = true;
    }
    StartOp([&] {
      rw_->StartCall(&tags_[kStart]);
      rw_->Read(&in_, &tags_[kRead]);
    });
  }

  void Send(v1::ToReplica msg) override {
    const v1::ToReplica* to_write = nullptr;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (ended_) return;
      queued_bytes_ += msg.ByteSizeLong();
      queue_msgs_.push_back(std::move(msg));
      if (writing_) return;
      writing_ = true;
      to_write = &queue_msgs_.front();
    }
    StartOp([&] { rw_->Write(*to_write, &tags_[kWrite]); });
  }

  uint64_t queued_bytes() const override {
    std::lock_guard<std::mutex> l(mu_);
    return queued_bytes_;
  }

  void Close(absl::Status status) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      ended_ = true;
      // The end may race to Deliver (on the queue's thread); it reports this status then.
      if (!close_status_) close_status_ = status;
    }
    // Harmless on a call that is over; the call lives as long as ctx_. Its pending operations
    // come back failed and the end follows on the queue's thread.
    ctx_.TryCancel();
    Deliver(std::move(status));
  }

  void Complete(int op, bool ok) override {
    switch (op) {
      case kStart:
        OnWritten(ok, false);
        break;
      case kWrite:
        OnWritten(ok, true);
        break;
      case kRead:
        OnRead(ok);
        break;
      case kFinish: {
        {
          std::lock_guard<std::mutex> l(mu_);
          finishing_ = false;
        }
        absl::Status status = FromGrpc(status_);
        if (status.ok()) status = absl::CancelledError("stream ended by the replica");
        {
          std::lock_guard<std::mutex> l(mu_);
          if (close_status_) status = *close_status_;
        }
        Deliver(std::move(status));
        break;
      }
      default:
        break;
    }
    Progress();
  }

 private:
  void OnWritten(bool ok, bool pop) {
    const v1::ToReplica* next = nullptr;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!ok) {  // a write (or the start) fails only once the call is over
        queue_msgs_.clear();
        queued_bytes_ = 0;
        ended_ = true;
      } else if (pop) {
        queued_bytes_ -= queue_msgs_.front().ByteSizeLong();
        queue_msgs_.pop_front();
      }
      if (!ended_ && !queue_msgs_.empty()) {
        next = &queue_msgs_.front();
      } else {
        writing_ = false;
      }
    }
    if (next != nullptr) StartOp([&] { rw_->Write(*next, &tags_[kWrite]); });
  }

  void OnRead(bool ok) {
    if (ok) {
      {
        std::lock_guard<std::recursive_mutex> cb(cb_mu_);
        if (!reported_) on_message_(std::move(in_));
      }
      in_.Clear();
      {
        std::lock_guard<std::mutex> l(mu_);
        if (ended_) {  // closed: the call is cancelled, nothing more is read
          reading_ = false;
          return;
        }
      }
      StartOp([&] { rw_->Read(&in_, &tags_[kRead]); });
      return;
    }
    std::lock_guard<std::mutex> l(mu_);  // the server ended the stream; Finish brings its status
    reading_ = false;
    ended_ = true;
  }

  // Once the call is over and no read or write is in flight: Finish (for the status), and once
  // that is back, let go of this object (on the reaper's thread: see Reaper).
  void Progress() {
    bool finish = false;
    bool release = false;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!ended_ || reading_ || writing_ || finishing_ || released_) return;
      if (!finish_started_) {
        finish_started_ = finishing_ = true;
        finish = true;
      } else {
        released_ = true;
        release = true;
        queue_msgs_.clear();
        queued_bytes_ = 0;
      }
    }
    if (finish) {
      StartOp([&] { rw_->Finish(&status_, &tags_[kFinish]); });
    } else if (release) {
      Reaper::Get().Drop(std::move(self_));  // nothing touches *this after this line
    }
  }

  // Reports the end once; cb_mu_ is recursive so that Close works from inside a callback.
  void Deliver(absl::Status status) {
    std::lock_guard<std::recursive_mutex> cb(cb_mu_);
    if (reported_) return;
    reported_ = true;
    if (on_closed_) on_closed_(std::move(status));
  }

  // Destroyed in reverse: the stream's operation sets before the context that frees the call's
  // arena, the queue after everything that used it.
  std::shared_ptr<ClientQueue> queue_;
  std::function<void(v1::FromReplica)> on_message_;
  std::function<void(absl::Status)> on_closed_;
  std::unique_ptr<v1::Replication::Stub> stub_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientAsyncReaderWriter<v1::ToReplica, v1::FromReplica>> rw_;
  Tag tags_[kOps];
  std::shared_ptr<ClientCall> self_;
  v1::FromReplica in_;
  grpc::Status status_;  // Finish's

  std::recursive_mutex cb_mu_;  // held while a user callback runs
  bool reported_ = false;       // on_closed was called (under cb_mu_)

  mutable std::mutex mu_;
  std::deque<v1::ToReplica> queue_msgs_;
  uint64_t queued_bytes_ = 0;
  bool reading_ = false;
  bool writing_ = false;  // a Write or the start in flight
  bool ended_ = false;    // Close called or the RPC is over: no new writes or reads
  bool finish_started_ = false;
  bool finishing_ = false;
  bool released_ = false;
  std::optional<absl::Status> close_status_;  // set by Close
};

}  // namespace

absl::StatusOr<std::unique_ptr<ReplicationServer>> ReplicationServer::Start(
    const std::string& listen, std::shared_ptr<grpc::ServerCredentials> creds,
    StreamAcceptor* acceptor) {
  auto s = std::make_unique<ServerImpl>(acceptor);
  if (auto st = s->Listen(listen, std::move(creds)); !st.ok()) return st;
  return std::unique_ptr<ReplicationServer>(std::move(s));
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target,
                                           std::shared_ptr<grpc::ChannelCredentials> creds,
                                           const std::string& tls_name_override) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  // A subchannel of its own, not one from gRPC's process-wide pool: a new channel to a peer then
  // starts without the reconnect backoff of an earlier one (ReplicationService::ChannelTo
  // replaces a channel whose connection failed).
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  if (!tls_name_override.empty()) args.SetSslTargetNameOverride(tls_name_override);
  return grpc::CreateCustomChannel(target, std::move(creds), args);
}

std::shared_ptr<ClientStream> ClientStream::Open(std::shared_ptr<grpc::Channel> channel,
                                                 std::function<void(v1::FromReplica)> on_message,
                                                 std::function<void(absl::Status)> on_closed) {
  auto c = std::make_shared<ClientCall>(std::move(on_message), std::move(on_closed));
  c->Begin(std::move(channel));
  return c;
}

bool ClientStream::WaitAllReleased(std::chrono::milliseconds timeout) {
  return ClientQueue::WaitNone(timeout);
}

void StreamAcceptor::VerifyChunks(const v1::VerifyChunksRequest&, std::vector<std::string>,
                                  std::string, Done<v1::VerifyChunksReply> done) {
  done(absl::UnimplementedError("this agent does not serve verify"));
}

void StreamAcceptor::MarkResync(const v1::MarkResyncRequest&, std::vector<std::string>, std::string,
                                Done<v1::MarkResyncReply> done) {
  done(absl::UnimplementedError("this agent does not serve resync"));
}

namespace {

template <class Reply, class Request, class Call>
absl::StatusOr<Reply> CallUnary(const std::shared_ptr<grpc::Channel>& channel, const Request& req,
                                std::chrono::milliseconds timeout, Call call) {
  v1::Replication::Stub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  Reply reply;
  const grpc::Status s = (stub.*call)(&ctx, req, &reply);
  if (!s.ok()) return FromGrpc(s);
  return reply;
}

}  // namespace

absl::StatusOr<v1::VerifyChunksReply> CallVerifyChunks(
    const std::shared_ptr<grpc::Channel>& channel, const v1::VerifyChunksRequest& req,
    std::chrono::milliseconds timeout) {
  return CallUnary<v1::VerifyChunksReply>(channel, req, timeout,
                                          &v1::Replication::Stub::VerifyChunks);
}

absl::StatusOr<v1::MarkResyncReply> CallMarkResync(const std::shared_ptr<grpc::Channel>& channel,
                                                   const v1::MarkResyncRequest& req,
                                                   std::chrono::milliseconds timeout) {
  return CallUnary<v1::MarkResyncReply>(channel, req, timeout, &v1::Replication::Stub::MarkResync);
}

}  // namespace tvilling::transport
