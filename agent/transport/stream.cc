// stream.cc: callback-API reactors for Replication.Stream (see stream.h).
//
// Both reactors are owned by a shared_ptr: the user's (ServerStream / ClientStream) and a self
// reference that gRPC's side holds until OnDone, so neither outlives nor undercuts the other. gRPC
// calls (StartWrite, Finish, TryCancel) are made outside our mutex because a reaction may run
// inline.
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

class ServerImpl;

class ServerReactor final : public grpc::ServerBidiReactor<v1::ToReplica, v1::FromReplica>,
                            public ServerStream,
                            public std::enable_shared_from_this<ServerReactor> {
 public:
  ServerReactor(grpc::CallbackServerContext* ctx, ServerImpl* server)
      : ctx_(ctx), server_(server) {}

  // Runs inside the method handler, before gRPC binds the reactor (operations started here are
  // queued by gRPC until then).
  void Begin(StreamAcceptor* acceptor);

  void Send(v1::FromReplica msg) override {
    const v1::FromReplica* to_write = nullptr;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (done_ || closing_) return;
      queued_bytes_ += msg.ByteSizeLong();
      queue_.push_back(std::move(msg));
      if (writing_) return;
      writing_ = true;
      to_write = &queue_.front();  // deque::push_back keeps references to elements valid
    }
    StartWrite(to_write);
  }

  uint64_t queued_bytes() const override {
    std::lock_guard<std::mutex> l(mu_);
    return queued_bytes_;
  }

  void Close(absl::Status status) override { CloseWith(std::move(status), false); }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // gRPC does not say why a read failed: the call is over (then OnCancel runs and OnDone
      // reports CANCELLED), the client half-closed (a primary never does: it ends a stream by
      // cancelling it), or a message did not parse. End the call if nobody chose a status yet.
      CloseWith(absl::InvalidArgumentError(
                    "the peer sent a message that does not parse as a tvilling.v1.ToReplica, or "
                    "half-closed the stream"),
                true);
      return;
    }
    if (handler_) handler_->OnMessage(in_);
    in_.Clear();
    {
      std::lock_guard<std::mutex> l(mu_);
      if (finished_) return;
    }
    StartRead(&in_);
  }

  void OnWriteDone(bool ok) override {
    const v1::FromReplica* next = nullptr;
    bool finish = false;
    absl::Status status;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!ok) {
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
        if (closing_ && !finished_) {
          finished_ = true;
          finish = true;
          status = final_;
        }
      }
    }
    if (next != nullptr) {
      StartWrite(next);
    } else if (finish) {
      Finish(ToGrpc(status));
    }
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> l(mu_);
    if (!closing_) final_ = CancelledByGrpc();
    cancelled_ = true;
  }

  void OnDone() override;

  // Close, and whether it is the read failure's (which a cancellation overrides in OnDone).
  void CloseWith(absl::Status status, bool on_read_failure) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (done_ || closing_) return;
      closing_ = true;
      closed_on_read_failure_ = on_read_failure;
      final_ = status;
      if (writing_) return;  // OnWriteDone finishes once the queue is written
      finished_ = true;
    }
    Finish(ToGrpc(status));
  }

  // Cancels the call if it is still running. ctx_ is valid until OnDone returns, and OnDone takes
  // ctx_mu_ first; recursive in case gRPC ran OnDone inline inside TryCancel. Not under mu_, as
  // OnCancel takes that.
  void Cancel() {
    std::lock_guard<std::recursive_mutex> l(ctx_mu_);
    if (!ctx_done_) ctx_->TryCancel();
  }

 private:
  grpc::CallbackServerContext* ctx_;
  ServerImpl* server_;
  std::recursive_mutex ctx_mu_;
  bool ctx_done_ = false;
  std::unique_ptr<ServerStreamHandler> handler_;
  std::shared_ptr<ServerReactor> self_;
  v1::ToReplica in_;

  mutable std::mutex mu_;
  std::deque<v1::FromReplica> queue_;
  uint64_t queued_bytes_ = 0;
  bool writing_ = false;
  bool closing_ = false;   // Close called: no more Sends, Finish after the queue drains
  bool finished_ = false;  // Finish called
  bool cancelled_ = false;
  bool closed_on_read_failure_ = false;
  bool done_ = false;
  absl::Status final_;
};

class Service final : public v1::Replication::CallbackService {
 public:
  Service(ServerImpl* server, StreamAcceptor* acceptor) : server_(server), acceptor_(acceptor) {}
  grpc::ServerBidiReactor<v1::ToReplica, v1::FromReplica>* Stream(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* VerifyChunks(grpc::CallbackServerContext* ctx,
                                         const v1::VerifyChunksRequest* req,
                                         v1::VerifyChunksReply* reply) override {
    return Unary(ctx, req, reply, &StreamAcceptor::VerifyChunks);
  }
  grpc::ServerUnaryReactor* MarkResync(grpc::CallbackServerContext* ctx,
                                       const v1::MarkResyncRequest* req,
                                       v1::MarkResyncReply* reply) override {
    return Unary(ctx, req, reply, &StreamAcceptor::MarkResync);
  }

 private:
  template <class Request, class Reply, class Fn>
  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* ctx, const Request* req,
                                  Reply* reply, Fn fn) {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    std::vector<std::string> ids;
    if (auto auth = ctx->auth_context()) ids = PeerIdentities(*auth);
    (acceptor_->*fn)(*req, std::move(ids), ctx->peer(), [reactor, reply](absl::StatusOr<Reply> r) {
      if (r.ok()) {
        *reply = std::move(*r);
        reactor->Finish(grpc::Status::OK);
      } else {
        reactor->Finish(ToGrpc(r.status()));
      }
    });
    return reactor;
  }
  ServerImpl* server_;
  StreamAcceptor* acceptor_;
};

class ServerImpl final : public ReplicationServer {
 public:
  explicit ServerImpl(StreamAcceptor* acceptor) : service_(this, acceptor) {}
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
    server_ = b.BuildAndStart();
    if (!server_ || port_ == 0) {
      server_.reset();
      return absl::UnavailableError(fmt::format(
          "replication server: cannot listen on {} (address in use or invalid?)", listen));
    }
    return absl::OkStatus();
  }

  int port() const override { return port_; }

  void Shutdown() override {
    std::vector<std::shared_ptr<ServerReactor>> open;
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
    // Calls still running after the deadline are cancelled by gRPC; Shutdown waits for them.
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(1000));
    server_->Wait();
  }

  void Add(const std::shared_ptr<ServerReactor>& r) {
    std::lock_guard<std::mutex> l(mu_);
    streams_.insert(r);
  }
  void Remove(ServerReactor* r) {
    std::lock_guard<std::mutex> l(mu_);
    for (auto it = streams_.begin(); it != streams_.end();) {
      auto s = it->lock();
      if (!s || s.get() == r) {
        it = streams_.erase(it);
      } else {
        ++it;
      }
    }
  }
  bool shut() const {
    std::lock_guard<std::mutex> l(mu_);
    return shut_;
  }

 private:
  Service service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  mutable std::mutex mu_;
  bool shut_ = false;
  std::set<std::weak_ptr<ServerReactor>, std::owner_less<std::weak_ptr<ServerReactor>>> streams_;
};

void ServerReactor::Begin(StreamAcceptor* acceptor) {
  self_ = shared_from_this();
  server_->Add(self_);
  std::vector<std::string> ids;
  if (auto auth = ctx_->auth_context()) ids = PeerIdentities(*auth);
  handler_ = acceptor->Accept(self_, std::move(ids), ctx_->peer());
  if (!handler_) {
    Close(absl::PermissionDeniedError("stream refused by the replica"));
    return;
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    if (finished_) return;
  }
  StartRead(&in_);
}

void ServerReactor::OnDone() {
  {
    std::lock_guard<std::recursive_mutex> l(ctx_mu_);
    ctx_done_ = true;
  }
  absl::Status status;
  {
    std::lock_guard<std::mutex> l(mu_);
    done_ = true;
    status = final_;
    if (cancelled_ && (status.ok() || closed_on_read_failure_)) {
      status = CancelledByGrpc();
    }
    queue_.clear();
    queued_bytes_ = 0;
  }
  if (handler_) {
    handler_->OnClosed(status);
    handler_.reset();
  }
  server_->Remove(this);
  auto keep = std::move(self_);  // may destroy *this when `keep` goes out of scope
}

grpc::ServerBidiReactor<v1::ToReplica, v1::FromReplica>* Service::Stream(
    grpc::CallbackServerContext* ctx) {
  auto r = std::make_shared<ServerReactor>(ctx, server_);
  r->Begin(acceptor_);
  return r.get();
}

// Destroys what a reaction must not destroy itself, on a thread of its own. A grpc::Channel's
// destructor releases gRPC's callback completion queue, whose last release joins that queue's
// threads; run on one of those threads (a stream's OnDone dropping the last reference to its
// channel), the join fails and the queue is freed under the running thread: a double free
// (grpc/grpc#32584; seen in CI under ASan at the exit of a test whose stream owned its channel).
// A function-local static, so it is built after gRPC's own statics and drained before them.
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

class ClientReactor final : public grpc::ClientBidiReactor<v1::ToReplica, v1::FromReplica>,
                            public ClientStream,
                            public std::enable_shared_from_this<ClientReactor> {
 public:
  ClientReactor(std::function<void(v1::FromReplica)> on_message,
                std::function<void(absl::Status)> on_closed)
      : on_message_(std::move(on_message)), on_closed_(std::move(on_closed)) {}

  void Begin(std::shared_ptr<grpc::Channel> channel) {
    self_ = shared_from_this();
    stub_ = std::make_unique<v1::Replication::Stub>(std::move(channel));
    stub_->async()->Stream(&ctx_, this);
    // Send and Close touch the call from outside the reactions (the committer thread, the
    // link's loop). Without a hold, gRPC may run OnDone and free the call between Send's
    // check of ended_ and its StartWrite (seen as "pure virtual method called" when a replica
    // was killed under load). The hold is removed once the stream has ended and no thread is
    // inside such a call (ReleaseHoldIfIdle).
    AddHold();
    StartRead(&in_);
    StartCall();
  }

  void Send(v1::ToReplica msg) override {
    const v1::ToReplica* to_write = nullptr;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (ended_) return;
      queued_bytes_ += msg.ByteSizeLong();
      queue_.push_back(std::move(msg));
      if (writing_) return;
      writing_ = true;
      ++outside_calls_;
      to_write = &queue_.front();
    }
    StartWrite(to_write);
    LeaveOutsideCall();
  }

  uint64_t queued_bytes() const override {
    std::lock_guard<std::mutex> l(mu_);
    return queued_bytes_;
  }

  void Close(absl::Status status) override {
    bool cancel = false;
    {
      std::lock_guard<std::mutex> l(mu_);
      ended_ = true;
      // OnDone may win the race to Deliver (on another thread); it reports this status then.
      if (!close_status_) close_status_ = status;
      if (holding_) {  // the call is alive until the hold goes
        cancel = true;
        ++outside_calls_;
      }
    }
    // TryCancel outside mu_ because reactions may run inline.
    if (cancel) {
      ctx_.TryCancel();
      LeaveOutsideCall();
    } else {
      ReleaseHoldIfIdle();
    }
    Deliver(std::move(status));
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the server ended the stream; OnDone brings its status
      {
        std::lock_guard<std::mutex> l(mu_);
        ended_ = true;
      }
      ReleaseHoldIfIdle();
      return;
    }
    {
      std::lock_guard<std::recursive_mutex> cb(cb_mu_);
      if (!reported_) on_message_(std::move(in_));
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      if (ended_) return;
    }
    StartRead(&in_);
  }

  void OnWriteDone(bool ok) override {
    const v1::ToReplica* next = nullptr;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!ok) {
        queue_.clear();
        queued_bytes_ = 0;
        writing_ = false;
        ended_ = true;  // a write fails only once the call is over
      } else {
        queued_bytes_ -= queue_.front().ByteSizeLong();
        queue_.pop_front();
        if (queue_.empty() || ended_) {
          writing_ = false;
        } else {
          next = &queue_.front();
        }
      }
    }
    if (next != nullptr) {
      StartWrite(next);  // inside a reaction: the call is alive
    } else if (!ok) {
      ReleaseHoldIfIdle();
    }
  }

  void OnDone(const grpc::Status& s) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      done_ = true;
      ended_ = true;
      queue_.clear();
      queued_bytes_ = 0;
    }
    absl::Status status = FromGrpc(s);
    if (status.ok()) status = absl::CancelledError("stream ended by the replica");
    {
      std::lock_guard<std::mutex> l(mu_);
      if (close_status_) status = *close_status_;
    }
    Deliver(std::move(status));
    // The stub and the context hold the channel, maybe its last reference (a caller that did not
    // keep it): if gRPC's side is the last owner, *this is destroyed on the reaper's thread, not
    // on this gRPC thread (Reaper). Nothing touches *this after this line.
    Reaper::Get().Drop(std::move(self_));
  }

 private:
  // A thread left a call into gRPC made from outside the reactions.
  void LeaveOutsideCall() {
    {
      std::lock_guard<std::mutex> l(mu_);
      --outside_calls_;
    }
    ReleaseHoldIfIdle();
  }

  // Removes the hold once the stream has ended (no more writes start) and no thread is inside
  // a call into gRPC from outside the reactions; OnDone may run from then on.
  void ReleaseHoldIfIdle() {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!holding_ || !ended_ || outside_calls_ > 0) return;
      holding_ = false;
    }
    RemoveHold();
  }

  // Reports the end once; cb_mu_ is recursive so that Close works from inside a callback.
  void Deliver(absl::Status status) {
    std::lock_guard<std::recursive_mutex> cb(cb_mu_);
    if (reported_) return;
    reported_ = true;
    if (on_closed_) on_closed_(std::move(status));
  }

  std::unique_ptr<v1::Replication::Stub> stub_;
  grpc::ClientContext ctx_;
  std::function<void(v1::FromReplica)> on_message_;
  std::function<void(absl::Status)> on_closed_;
  std::shared_ptr<ClientReactor> self_;
  v1::FromReplica in_;

  std::recursive_mutex cb_mu_;  // held while a user callback runs
  bool reported_ = false;       // on_closed was called (under cb_mu_)

  mutable std::mutex mu_;
  std::deque<v1::ToReplica> queue_;
  uint64_t queued_bytes_ = 0;
  bool writing_ = false;
  bool ended_ = false;                        // Close called or the RPC is over: no new writes
  std::optional<absl::Status> close_status_;  // set by Close
  bool done_ = false;
  bool holding_ = true;    // the hold added in Begin is still in place
  int outside_calls_ = 0;  // threads inside StartWrite/TryCancel from Send/Close
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
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  if (!tls_name_override.empty()) args.SetSslTargetNameOverride(tls_name_override);
  return grpc::CreateCustomChannel(target, std::move(creds), args);
}

std::shared_ptr<ClientStream> ClientStream::Open(std::shared_ptr<grpc::Channel> channel,
                                                 std::function<void(v1::FromReplica)> on_message,
                                                 std::function<void(absl::Status)> on_closed) {
  auto r = std::make_shared<ClientReactor>(std::move(on_message), std::move(on_closed));
  r->Begin(std::move(channel));
  return r;
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
