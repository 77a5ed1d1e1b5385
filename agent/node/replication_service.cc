// replication_service.cc: TLS, the replication listener with its ACL, and the dialer.
#include "agent/node/replication_service.h"

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <condition_variable>
#include <deque>
#include <thread>

#include "agent/transport/stream.h"
#include "agent/transport/tls.h"
#include "storage/thread_name.h"

namespace tvilling::node {
namespace {

std::string StatusText(const absl::Status& s) { return std::string(s.message()); }

transport::TlsFiles Files(const ops::TlsConfig& t) {
  transport::TlsFiles f;
  f.ca = t.ca;
  f.cert = t.cert;
  f.key = t.key;
  return f;
}

v1::Codec CodecOf(ops::Compression c) {
  switch (c) {
    case ops::Compression::kNone:
      return v1::CODEC_NONE;
    case ops::Compression::kLz4:
      return v1::CODEC_LZ4;
    case ops::Compression::kZstd:
      return v1::CODEC_ZSTD;
  }
  return v1::CODEC_NONE;
}

// The primary's end of an outgoing stream.
class ClientAdapter final : public PrimaryStream {
 public:
  explicit ClientAdapter(std::shared_ptr<transport::ClientStream> s) : s_(std::move(s)) {}
  void Send(v1::ToReplica msg) override { s_->Send(std::move(msg)); }
  uint64_t queued_bytes() const override { return s_->queued_bytes(); }
  void Close(absl::Status status) override { s_->Close(std::move(status)); }

 private:
  std::shared_ptr<transport::ClientStream> s_;
};

// The replica's end of an incoming stream.
class ServerAdapter final : public ReplicaStream {
 public:
  explicit ServerAdapter(std::shared_ptr<transport::ServerStream> s) : s_(std::move(s)) {}
  void Send(v1::FromReplica msg) override { s_->Send(std::move(msg)); }
  uint64_t queued_bytes() const override { return s_->queued_bytes(); }
  void Close(absl::Status status) override { s_->Close(std::move(status)); }

 private:
  std::shared_ptr<transport::ServerStream> s_;
};

}  // namespace

absl::Status CheckTls(const ops::Config& config) {
  if (!config.HasPeers() || !config.tls.enabled()) return absl::OkStatus();
  return transport::LoadTls(Files(config.tls)).status();
}

PrimaryOptions PrimaryOptionsFor(const ops::Config& config, const ops::GroupConfig& group) {
  PrimaryOptions o;
  o.site = config.agent.site;
  const ops::ReplicationConfig& r = config.replication;
  o.link_timeout = static_cast<core::Nanos>(r.keepalive_ms) * 1'000'000;
  o.heartbeat_interval = std::max<core::Nanos>(o.link_timeout / 5, 100'000'000);
  for (const ops::PeerConfig& p : group.peers) {
    PeerOptions po;
    po.site = p.site;
    po.codec = CodecOf(p.compression);
    po.rate_limit_bytes_per_s = p.rate_limit_bytes_per_second;
    po.sender.mode = p.mode == ops::PeerMode::kSync ? core::Mode::kSync : core::Mode::kAsync;
    po.sender.min_window_bytes = r.min_window_bytes;
    po.sender.max_window_bytes = r.max_window_bytes;
    po.sender.max_batch_bytes = r.max_batch_bytes;
    po.sender.max_batch_delay = static_cast<core::Nanos>(r.max_batch_delay_us) * 1000;
    po.sender.sync_degrade_after = static_cast<core::Nanos>(p.sync_degrade_after_ms) * 1'000'000;
    o.peers.push_back(po);
  }
  return o;
}

ReplicaOptions ReplicaOptionsFor(const ops::Config& config, const ops::GroupConfig& group) {
  ReplicaOptions o;
  o.site = config.agent.site;
  o.divergent_dir = config.agent.state_dir / "divergent";
  o.sync_interval = std::chrono::milliseconds(config.replication.replica_sync_interval_ms);
  o.on_divergence = group.on_divergence == ops::GroupConfig::OnDivergence::kRefuse
                        ? core::OnDivergence::kRefuse
                        : core::OnDivergence::kRejoin;
  return o;
}

class ReplicationService::Impl final : public Dialer,
                                       public transport::StreamAcceptor,
                                       public VerifyPeer {
 public:
  explicit Impl(const ops::Config& config) : config_(config) {}
  ~Impl() override { StopVerifyWorker(); }

  absl::Status Init() {
    if (config_.tls.enabled()) {
      // Reloadable (SIGHUP): the checked files are copied into the state directory and gRPC
      // watches that copy (transport::ReloadableTls).
      auto tls = transport::ReloadableTls::Create(Files(config_.tls),
                                                  config_.agent.state_dir / "tls-active");
      if (!tls.ok()) return tls.status();
      tls_ = std::move(*tls);
      server_creds_ = tls_->server_credentials();
      channel_creds_ = tls_->channel_credentials();
    } else {
      spdlog::warn(
          "replication: tls.insecure is set: streams between agents are neither "
          "encrypted nor authenticated");
      server_creds_ = grpc::InsecureServerCredentials();
      channel_creds_ = grpc::InsecureChannelCredentials();
    }
    for (const ops::GroupConfig& g : config_.groups) {
      for (const ops::PeerConfig& p : g.peers) {
        targets_[p.site] = {p.address.ToString(), p.tls_name};
      }
    }
    return absl::OkStatus();
  }

  std::shared_ptr<grpc::Channel> ChannelTo(const std::string& site) {
    std::lock_guard lock(mu_);
    auto& ch = channels_[site];
    // A channel whose last connection attempt failed is replaced: gRPC fails calls on it at once
    // with that attempt's error until its own reconnect backoff ends, and advances that backoff
    // only while someone polls the channel, so a peer that was away kept being "refused" for
    // seconds after it listened again. A new channel (its own subchannel: MakeChannel) connects
    // at its first call.
    if (ch && ch->GetState(/*try_to_connect=*/false) == GRPC_CHANNEL_TRANSIENT_FAILURE) {
      ch.reset();
    }
    if (!ch) {
      const Target& t = targets_[site];
      ch = transport::MakeChannel(t.address, channel_creds_,
                                  config_.tls.enabled() ? t.tls_name : std::string());
    }
    return ch;
  }

  // VerifyPeer
  absl::StatusOr<v1::VerifyChunksReply> VerifyChunks(const std::string& site,
                                                     const v1::VerifyChunksRequest& req,
                                                     std::chrono::milliseconds timeout) override {
    if (!targets_.count(site)) {
      return absl::NotFoundError(fmt::format("site {} is not a peer in the config", site));
    }
    return transport::CallVerifyChunks(ChannelTo(site), req, timeout);
  }
  absl::StatusOr<v1::MarkResyncReply> MarkResync(const std::string& site,
                                                 const v1::MarkResyncRequest& req,
                                                 std::chrono::milliseconds timeout) override {
    if (!targets_.count(site)) {
      return absl::NotFoundError(fmt::format("site {} is not a peer in the config", site));
    }
    return transport::CallMarkResync(ChannelTo(site), req, timeout);
  }

  // StreamAcceptor: the replica's side of a verify. The work (waiting for the applied LSN,
  // reading the volumes) runs on one worker thread, one request at a time.
  void VerifyChunks(const v1::VerifyChunksRequest& req, std::vector<std::string> ids,
                    std::string address, Done<v1::VerifyChunksReply> done) override {
    Queue(
        req.group(), req.sender_site(), std::move(ids), std::move(address),
        [this, req, done](ReplicaGroup* g) {
          if (g == nullptr) return done(absl::UnavailableError("the agent is stopping"));
          done(g->VerifyChunks(req, [this] {
            std::lock_guard lock(mu_);
            return verify_stopping_;
          }));
        },
        [done](absl::Status st) { done(std::move(st)); });
  }
  void MarkResync(const v1::MarkResyncRequest& req, std::vector<std::string> ids,
                  std::string address, Done<v1::MarkResyncReply> done) override {
    Queue(
        req.group(), req.sender_site(), std::move(ids), std::move(address),
        [req, done](ReplicaGroup* g) {
          if (g == nullptr) return done(absl::UnavailableError("the agent is stopping"));
          done(g->MarkResync(req));
        },
        [done](absl::Status st) { done(std::move(st)); });
  }

  // Checks the caller like a stream's Hello (ACL, group held as a replica here) and queues `work`
  // for the worker; `refuse` answers at once otherwise.
  void Queue(const std::string& group, const std::string& site, std::vector<std::string> ids,
             const std::string& address, std::function<void(ReplicaGroup*)> work,
             std::function<void(absl::Status)> refuse) {
    const std::vector<std::string> checked =
        config_.tls.enabled() ? ids : std::vector<std::string>{};
    if (absl::Status st = ops::AuthorizePeer(config_, checked, site, group); !st.ok()) {
      spdlog::error("replication: refusing a verify call from {} ({}): {}", address,
                    ids.empty() ? "no certificate" : ids.front(), StatusText(st));
      return refuse(absl::PermissionDeniedError(StatusText(st)));
    }
    std::lock_guard lock(mu_);
    auto it = replicas_.find(group);
    if (it == replicas_.end()) {
      return refuse(absl::FailedPreconditionError(
          fmt::format("group {} is not a replica on site {}", group, config_.agent.site)));
    }
    if (verify_stopping_) return refuse(absl::UnavailableError("the agent is stopping"));
    if (verify_queue_.size() >= 16) {
      return refuse(absl::ResourceExhaustedError("too many verify calls queued"));
    }
    ReplicaGroup* g = it->second;
    verify_queue_.push_back([g, work = std::move(work)](bool run) { work(run ? g : nullptr); });
    if (!verify_worker_.joinable()) {
      verify_worker_ = std::thread([this] {
        storage::SetThreadName("tvl-verify");
        VerifyWorkerLoop();
      });
    }
    verify_cv_.notify_one();
  }

  void VerifyWorkerLoop() {
    std::unique_lock lock(mu_);
    while (true) {
      verify_cv_.wait(lock, [&] { return verify_stopping_ || !verify_queue_.empty(); });
      if (verify_queue_.empty()) return;
      auto job = std::move(verify_queue_.front());
      verify_queue_.pop_front();
      const bool run = !verify_stopping_;
      lock.unlock();
      job(run);
      lock.lock();
    }
  }

  // Answers what is queued (Unavailable) and joins the worker: the server's Shutdown waits for
  // every call's answer. A request running now ends within its wait (the replica stops first).
  void StopVerifyWorker() {
    {
      std::lock_guard lock(mu_);
      verify_stopping_ = true;
    }
    verify_cv_.notify_all();
    if (verify_worker_.joinable()) verify_worker_.join();
  }

  // Dialer
  std::shared_ptr<PrimaryStream> Dial(const std::string& site, Callbacks cb) override {
    std::shared_ptr<grpc::Channel> channel = ChannelTo(site);
    auto s =
        transport::ClientStream::Open(channel, std::move(cb.on_message), std::move(cb.on_closed));
    return std::make_shared<ClientAdapter>(std::move(s));
  }

  // StreamAcceptor
  std::unique_ptr<transport::ServerStreamHandler> Accept(
      std::shared_ptr<transport::ServerStream> stream, std::vector<std::string> identities,
      std::string peer_address) override {
    return std::make_unique<Handler>(this, std::move(stream), std::move(identities),
                                     std::move(peer_address));
  }

  class Handler final : public transport::ServerStreamHandler {
   public:
    Handler(Impl* impl, std::shared_ptr<transport::ServerStream> stream,
            std::vector<std::string> identities, std::string address)
        : impl_(impl),
          raw_(std::move(stream)),
          adapter_(std::make_shared<ServerAdapter>(raw_)),
          identities_(std::move(identities)),
          address_(std::move(address)) {}

    void OnMessage(v1::ToReplica& msg) override {
      if (session_) return session_->OnMessage(msg);
      if (done_) return;
      if (!msg.has_hello()) {
        return Refuse(core::RefuseCode::kProtocol,
                      fmt::format("{}: the first message must be a Hello", address_),
                      absl::StatusCode::kInvalidArgument);
      }
      const v1::Hello& h = msg.hello();
      const std::string who = fmt::format(
          "{} ({})", address_, identities_.empty() ? "no certificate" : identities_.front());
      // The certificate must be allowed to act as the site it claims, for this group.
      const std::vector<std::string> ids =
          impl_->config_.tls.enabled() ? identities_ : std::vector<std::string>{};
      if (absl::Status st = ops::AuthorizePeer(impl_->config_, ids, h.sender_site(), h.group());
          !st.ok()) {
        spdlog::error("replication: refusing {}: {}", who, StatusText(st));
        return Refuse(core::RefuseCode::kNotAuthorised, StatusText(st),
                      absl::StatusCode::kPermissionDenied);
      }
      ReplicaGroup* group = nullptr;
      bool is_primary = false;
      {
        std::lock_guard lock(impl_->mu_);
        if (auto it = impl_->replicas_.find(h.group()); it != impl_->replicas_.end()) {
          group = it->second;
        }
        is_primary = impl_->primaries_.count(h.group()) > 0;
      }
      if (group == nullptr) {
        const bool primary = is_primary;
        return Refuse(primary ? core::RefuseCode::kNotReplica : core::RefuseCode::kUnknownGroup,
                      primary ? fmt::format("site {} is the primary of group {}; it does not "
                                            "accept a stream from {}",
                                            impl_->config_.agent.site, h.group(), h.sender_site())
                              : fmt::format("group {} is not configured on site {}", h.group(),
                                            impl_->config_.agent.site),
                      absl::StatusCode::kFailedPrecondition);
      }
      session_ = group->Open(adapter_, fmt::format("{} as {}", who, h.sender_site()));
      session_->OnMessage(msg);
    }

    void OnClosed(const absl::Status& status) override {
      // An end this agent chose (a refusal, a failed message, a superseded stream) was logged
      // when it was chosen; any other, e.g. gRPC dropping a message over the receive limit, is
      // logged here so that the replica's log says why the stream ended.
      const bool chosen_here = done_ || (session_ && session_->closed);
      if (!status.ok() && !chosen_here) {
        spdlog::warn("replication: stream from {} ({}) ended: {}", address_,
                     identities_.empty() ? "no certificate" : identities_.front(),
                     StatusText(status));
      }
      if (session_) session_->OnClosed(status);
    }

   private:
    void Refuse(core::RefuseCode code, const std::string& reason, absl::StatusCode status) {
      done_ = true;
      spdlog::warn("replication: refused stream from {}: {}", address_, reason);
      v1::FromReplica out;
      v1::Decision* d = out.mutable_decision();
      d->set_kind(v1::Decision::REFUSE);
      d->set_code(static_cast<v1::RefuseCode>(code));
      d->set_reason(reason);
      raw_->Send(std::move(out));
      raw_->Close(absl::Status(status, reason));
    }

    Impl* const impl_;
    std::shared_ptr<transport::ServerStream> raw_;
    std::shared_ptr<ServerAdapter> adapter_;
    const std::vector<std::string> identities_;
    const std::string address_;
    std::shared_ptr<ReplicaGroup::Session> session_;
    bool done_ = false;
  };

  struct Target {
    std::string address;
    std::string tls_name;
  };
  const ops::Config& config_;
  std::unique_ptr<transport::ReloadableTls> tls_;
  std::shared_ptr<grpc::ServerCredentials> server_creds_;
  std::shared_ptr<grpc::ChannelCredentials> channel_creds_;
  std::map<std::string, Target> targets_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_;
  std::map<std::string, ReplicaGroup*> replicas_;
  std::set<std::string> primaries_;
  std::unique_ptr<transport::ReplicationServer> server_;
  std::deque<std::function<void(bool run)>> verify_queue_;  // guarded by mu_
  bool verify_stopping_ = false;                            // guarded by mu_
  std::condition_variable verify_cv_;
  std::thread verify_worker_;
};

ReplicationService::ReplicationService(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ReplicationService::~ReplicationService() { Shutdown(); }

absl::StatusOr<std::unique_ptr<ReplicationService>> ReplicationService::Create(
    const ops::Config& config) {
  auto impl = std::make_unique<Impl>(config);
  if (absl::Status st = impl->Init(); !st.ok()) return st;
  return std::unique_ptr<ReplicationService>(new ReplicationService(std::move(impl)));
}

Dialer* ReplicationService::dialer() { return impl_.get(); }
VerifyPeer* ReplicationService::verify_peer() { return impl_.get(); }

void ReplicationService::AddReplica(const std::string& group, ReplicaGroup* replica) {
  std::lock_guard lock(impl_->mu_);
  impl_->replicas_[group] = replica;
  impl_->primaries_.erase(group);
}

void ReplicationService::AddPrimaryGroup(const std::string& group) {
  std::lock_guard lock(impl_->mu_);
  impl_->primaries_.insert(group);
  impl_->replicas_.erase(group);
}

absl::Status ReplicationService::Start() {
  if (!impl_->config_.replication.listen) return absl::OkStatus();
  const std::string listen = impl_->config_.replication.listen->ToString();
  auto server = transport::ReplicationServer::Start(listen, impl_->server_creds_, impl_.get());
  if (!server.ok()) return server.status();
  impl_->server_ = std::move(*server);
  spdlog::info("replication: listening on {} ({})", listen,
               impl_->config_.tls.enabled() ? "mutual TLS" : "INSECURE plain TCP");
  return absl::OkStatus();
}

absl::Status ReplicationService::ReloadTls() {
  if (!impl_->tls_) return absl::FailedPreconditionError("TLS is off (tls.insecure)");
  return impl_->tls_->Reload();
}

void ReplicationService::Shutdown() {
  if (impl_) impl_->StopVerifyWorker();
  if (impl_ && impl_->server_) {
    impl_->server_->Shutdown();
    impl_->server_.reset();
  }
}

}  // namespace tvilling::node
