// etcd_client.cc: see etcd_client.h.
#include "agent/coordinator/etcd_client.h"

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <deque>
#include <fstream>
#include <sstream>

#include "etcd/etcdserver/etcdserverpb/rpc.grpc.pb.h"

namespace tvilling::coordinator {

namespace pb = ::etcdserverpb;

struct EtcdClient::Endpoint {
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<pb::KV::Stub> kv;
  std::unique_ptr<pb::Lease::Stub> lease;
  std::unique_ptr<pb::Watch::Stub> watch;
  std::unique_ptr<pb::Maintenance::Stub> maintenance;
};

namespace {

using Clock = std::chrono::steady_clock;

absl::StatusOr<std::string> ReadPem(const std::filesystem::path& path, const char* what,
                                    const char* marker) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        fmt::format("etcd TLS {} {}: cannot read the file", what, path.string()));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  std::string pem = ss.str();
  if (pem.find(marker) == std::string::npos) {
    return absl::InvalidArgumentError(
        fmt::format("etcd TLS {} {}: no PEM block containing \"{}\"", what, path.string(), marker));
  }
  return pem;
}

bool ValidEndpoint(const std::string& e) {
  if (e.find("://") != std::string::npos) return false;
  const size_t colon = e.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 >= e.size()) return false;
  const std::string port = e.substr(colon + 1);
  if (!std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return false;
  }
  const long p = port.size() <= 5 ? std::stol(port) : 0;
  return p > 0 && p < 65536;
}

std::chrono::system_clock::time_point ToSystem(Clock::time_point t) {
  return std::chrono::system_clock::now() +
         std::chrono::duration_cast<std::chrono::system_clock::duration>(t - Clock::now());
}

absl::Status FromGrpc(const grpc::Status& s, const std::string& context) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      fmt::format("{}: {}", context, s.error_message()));
}

KeyValue FromPb(const ::mvccpb::KeyValue& kv) {
  return KeyValue{kv.key(),          kv.value(),   kv.create_revision(),
                  kv.mod_revision(), kv.version(), kv.lease()};
}

RangeResult FromPb(const pb::RangeResponse& r) {
  RangeResult out;
  out.revision = r.header().revision();
  out.more = r.more();
  out.count = r.count();
  out.kvs.reserve(r.kvs_size());
  for (const auto& kv : r.kvs()) out.kvs.push_back(FromPb(kv));
  return out;
}

void ToPb(const TxnOp& op, pb::RequestOp* out) {
  switch (op.kind) {
    case TxnOp::Kind::kRange: {
      auto* r = out->mutable_request_range();
      r->set_key(op.key);
      r->set_range_end(op.range_end);
      break;
    }
    case TxnOp::Kind::kPut: {
      auto* r = out->mutable_request_put();
      r->set_key(op.key);
      r->set_value(op.value);
      r->set_lease(op.lease);
      break;
    }
    case TxnOp::Kind::kDelete: {
      auto* r = out->mutable_request_delete_range();
      r->set_key(op.key);
      r->set_range_end(op.range_end);
      break;
    }
  }
}

void ToPb(const Compare& c, pb::Compare* out) {
  out->set_key(c.key);
  switch (c.result) {
    case Compare::Result::kEqual:
      out->set_result(pb::Compare::EQUAL);
      break;
    case Compare::Result::kGreater:
      out->set_result(pb::Compare::GREATER);
      break;
    case Compare::Result::kLess:
      out->set_result(pb::Compare::LESS);
      break;
    case Compare::Result::kNotEqual:
      out->set_result(pb::Compare::NOT_EQUAL);
      break;
  }
  switch (c.target) {
    case Compare::Target::kVersion:
      out->set_target(pb::Compare::VERSION);
      out->set_version(c.number);
      break;
    case Compare::Target::kCreateRevision:
      out->set_target(pb::Compare::CREATE);
      out->set_create_revision(c.number);
      break;
    case Compare::Target::kModRevision:
      out->set_target(pb::Compare::MOD);
      out->set_mod_revision(c.number);
      break;
    case Compare::Target::kValue:
      out->set_target(pb::Compare::VALUE);
      out->set_value(c.value);
      break;
    case Compare::Target::kLease:
      out->set_target(pb::Compare::LEASE);
      out->set_lease(c.number);
      break;
  }
}

// Sleeps up to `d` unless `stop()` becomes true (checked under `mu` via `cv`).
template <class Pred>
bool WaitFor(std::mutex& mu, std::condition_variable& cv, Millis d, Pred stop) {
  std::unique_lock l(mu);
  return cv.wait_for(l, d, stop);
}

}  // namespace

std::string PrefixEnd(const std::string& prefix) {
  std::string end = prefix;
  while (!end.empty()) {
    unsigned char c = static_cast<unsigned char>(end.back());
    if (c < 0xff) {
      end.back() = static_cast<char>(c + 1);
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');  // every key (etcd's convention)
}

EtcdClient::EtcdClient(EtcdOptions options) : options_(std::move(options)) {}
EtcdClient::~EtcdClient() = default;

absl::StatusOr<std::unique_ptr<EtcdClient>> EtcdClient::Create(EtcdOptions options) {
  if (options.endpoints.empty()) {
    return absl::InvalidArgumentError("etcd: no endpoints given");
  }
  for (const std::string& e : options.endpoints) {
    if (!ValidEndpoint(e)) {
      return absl::InvalidArgumentError(fmt::format(
          "etcd endpoint \"{}\": expected \"host:port\" without a scheme, e.g. \"10.0.0.1:2379\"",
          e));
    }
  }
  if (options.call_timeout.count() <= 0 || options.attempt_timeout.count() <= 0) {
    return absl::InvalidArgumentError("etcd: call and attempt timeouts must be positive");
  }
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (options.tls) {
    grpc::SslCredentialsOptions ssl;
    auto ca = ReadPem(options.tls->ca, "ca", "-----BEGIN CERTIFICATE-----");
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
    if (options.tls->cert.empty() != options.tls->key.empty()) {
      return absl::InvalidArgumentError(
          "etcd TLS: cert and key go together (give both for client-certificate auth, or neither)");
    }
    if (!options.tls->cert.empty()) {
      auto cert = ReadPem(options.tls->cert, "cert", "-----BEGIN CERTIFICATE-----");
      if (!cert.ok()) return cert.status();
      auto key = ReadPem(options.tls->key, "key", "PRIVATE KEY-----");
      if (!key.ok()) return key.status();
      ssl.pem_cert_chain = *cert;
      ssl.pem_private_key = *key;
    }
    creds = grpc::SslCredentials(ssl);
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  std::unique_ptr<EtcdClient> c(new EtcdClient(std::move(options)));
  for (const std::string& address : c->options_.endpoints) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
                static_cast<int>(c->options_.reconnect_backoff_min.count()));
    // gRPC also takes the minimum backoff as the connect timeout (the HTTP/2 handshake included):
    // keep that at the attempt timeout, not at the backoff.
    args.SetInt(
        GRPC_ARG_MIN_RECONNECT_BACKOFF_MS,
        static_cast<int>(
            std::max(c->options_.reconnect_backoff_min, c->options_.attempt_timeout).count()));
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS,
                static_cast<int>(c->options_.reconnect_backoff_max.count()));
    // HTTP/2 pings on open calls find a member that went silent (a long-lived watch would
    // otherwise wait forever). etcd refuses pings more often than every 5 s by default.
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 3000);
    // Separate channels per endpoint: gRPC would otherwise share one subchannel pool entry.
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    if (c->options_.tls && !c->options_.tls->server_name.empty()) {
      args.SetSslTargetNameOverride(c->options_.tls->server_name);
    }
    auto ep = std::make_unique<Endpoint>();
    ep->address = address;
    ep->channel = grpc::CreateCustomChannel(address, creds, args);
    ep->kv = pb::KV::NewStub(ep->channel);
    ep->lease = pb::Lease::NewStub(ep->channel);
    ep->watch = pb::Watch::NewStub(ep->channel);
    ep->maintenance = pb::Maintenance::NewStub(ep->channel);
    c->endpoints_.push_back(std::move(ep));
  }
  return c;
}

bool EtcdClient::Connect(Endpoint& ep, SteadyTime deadline) {
  // A fail-fast RPC on a channel that is not connected fails at once, and nothing then drives the
  // connection but gRPC's backup poller (every 5 s): wait for the connection here, which polls it,
  // so an endpoint that comes back is used within one reconnect backoff.
  if (ep.channel->GetState(/*try_to_connect=*/true) == GRPC_CHANNEL_READY) return true;
  return ep.channel->WaitForConnected(ToSystem(deadline));
}

std::string EtcdClient::current_endpoint() const { return endpoints_[current_.load()]->address; }

void EtcdClient::MoveOff(size_t failed_index) {
  size_t expected = failed_index;
  current_.compare_exchange_strong(expected, (failed_index + 1) % endpoints_.size());
}

template <class Fn>
absl::Status EtcdClient::Call(const char* op, const std::string& what, bool idempotent, Fn&& fn) {
  const auto deadline = Clock::now() + options_.call_timeout;
  size_t attempts = 0;
  while (true) {
    const size_t idx = current_.load();
    Endpoint& ep = *endpoints_[idx];
    const auto attempt_deadline = std::min(deadline, Clock::now() + options_.attempt_timeout);
    grpc::Status s;
    if (!Connect(ep, attempt_deadline)) {
      // Never sent: safe to try the next endpoint whatever the call.
      s = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                       fmt::format("not connected within {} ms", options_.attempt_timeout.count()));
    } else {
      grpc::ClientContext ctx;
      ctx.set_deadline(ToSystem(attempt_deadline));
      s = fn(ep, ctx);
      if (s.ok()) return absl::OkStatus();
    }
    absl::Status err = FromGrpc(
        s, fmt::format("etcd {}{}{} at {}", op, what.empty() ? "" : " ", what, ep.address));
    const bool unavailable = s.error_code() == grpc::StatusCode::UNAVAILABLE;
    const bool timed_out = s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
    if (unavailable || timed_out) MoveOff(idx);
    if (!(unavailable || (idempotent && timed_out))) return err;
    ++attempts;
    if (Clock::now() >= deadline) return err;
    if (attempts % endpoints_.size() == 0) {
      // Every endpoint failed once: pause a little before the next round.
      const auto pause = std::min<Clock::duration>(Millis(100), deadline - Clock::now());
      std::this_thread::sleep_for(pause);
      if (Clock::now() >= deadline) return err;
    }
  }
}

absl::StatusOr<RangeResult> EtcdClient::Get(const std::string& key) { return Range(key, {}); }

absl::StatusOr<RangeResult> EtcdClient::Range(const std::string& key, const std::string& range_end,
                                              int64_t limit) {
  pb::RangeRequest req;
  req.set_key(key);
  req.set_range_end(range_end);
  req.set_limit(limit);
  pb::RangeResponse resp;
  absl::Status st =
      Call("Range", fmt::format("\"{}\"", key), true, [&](Endpoint& ep, grpc::ClientContext& ctx) {
        resp.Clear();
        return ep.kv->Range(&ctx, req, &resp);
      });
  if (!st.ok()) return st;
  return FromPb(resp);
}

absl::StatusOr<int64_t> EtcdClient::Put(const std::string& key, const std::string& value,
                                        int64_t lease) {
  pb::PutRequest req;
  req.set_key(key);
  req.set_value(value);
  req.set_lease(lease);
  pb::PutResponse resp;
  absl::Status st =
      Call("Put", fmt::format("\"{}\"", key), false, [&](Endpoint& ep, grpc::ClientContext& ctx) {
        resp.Clear();
        return ep.kv->Put(&ctx, req, &resp);
      });
  if (!st.ok()) return st;
  return resp.header().revision();
}

absl::StatusOr<int64_t> EtcdClient::DeleteRange(const std::string& key,
                                                const std::string& range_end) {
  pb::DeleteRangeRequest req;
  req.set_key(key);
  req.set_range_end(range_end);
  pb::DeleteRangeResponse resp;
  absl::Status st = Call("DeleteRange", fmt::format("\"{}\"", key), false,
                         [&](Endpoint& ep, grpc::ClientContext& ctx) {
                           resp.Clear();
                           return ep.kv->DeleteRange(&ctx, req, &resp);
                         });
  if (!st.ok()) return st;
  return resp.deleted();
}

absl::StatusOr<TxnResult> EtcdClient::Txn(const std::vector<Compare>& compares,
                                          const std::vector<TxnOp>& success,
                                          const std::vector<TxnOp>& failure) {
  pb::TxnRequest req;
  for (const Compare& c : compares) ToPb(c, req.add_compare());
  for (const TxnOp& op : success) ToPb(op, req.add_success());
  for (const TxnOp& op : failure) ToPb(op, req.add_failure());
  pb::TxnResponse resp;
  const std::string what = compares.empty() ? "" : fmt::format("on \"{}\"", compares[0].key);
  absl::Status st = Call("Txn", what, false, [&](Endpoint& ep, grpc::ClientContext& ctx) {
    resp.Clear();
    return ep.kv->Txn(&ctx, req, &resp);
  });
  if (!st.ok()) return st;
  TxnResult out;
  out.succeeded = resp.succeeded();
  out.revision = resp.header().revision();
  for (const auto& r : resp.responses()) {
    out.ranges.push_back(r.has_response_range() ? FromPb(r.response_range()) : RangeResult{});
  }
  return out;
}

absl::StatusOr<LeaseInfo> EtcdClient::LeaseGrant(int64_t ttl_s) {
  pb::LeaseGrantRequest req;
  req.set_ttl(ttl_s);
  pb::LeaseGrantResponse resp;
  absl::Status st = Call("LeaseGrant", fmt::format("TTL {} s", ttl_s), false,
                         [&](Endpoint& ep, grpc::ClientContext& ctx) {
                           resp.Clear();
                           return ep.lease->LeaseGrant(&ctx, req, &resp);
                         });
  if (!st.ok()) return st;
  if (!resp.error().empty()) {
    return absl::FailedPreconditionError(fmt::format("etcd LeaseGrant: {}", resp.error()));
  }
  return LeaseInfo{resp.id(), resp.ttl()};
}

absl::Status EtcdClient::LeaseRevoke(int64_t lease) {
  pb::LeaseRevokeRequest req;
  req.set_id(lease);
  pb::LeaseRevokeResponse resp;
  return Call("LeaseRevoke", fmt::format("{:x}", lease), false,
              [&](Endpoint& ep, grpc::ClientContext& ctx) {
                return ep.lease->LeaseRevoke(&ctx, req, &resp);
              });
}

absl::StatusOr<LeaseInfo> EtcdClient::LeaseTimeToLive(int64_t lease) {
  pb::LeaseTimeToLiveRequest req;
  req.set_id(lease);
  pb::LeaseTimeToLiveResponse resp;
  absl::Status st = Call("LeaseTimeToLive", fmt::format("{:x}", lease), true,
                         [&](Endpoint& ep, grpc::ClientContext& ctx) {
                           resp.Clear();
                           return ep.lease->LeaseTimeToLive(&ctx, req, &resp);
                         });
  if (!st.ok()) return st;
  return LeaseInfo{resp.id(), resp.ttl()};
}

absl::Status EtcdClient::Compact(int64_t revision) {
  pb::CompactionRequest req;
  req.set_revision(revision);
  pb::CompactionResponse resp;
  return Call(
      "Compact", fmt::format("to revision {}", revision), false,
      [&](Endpoint& ep, grpc::ClientContext& ctx) { return ep.kv->Compact(&ctx, req, &resp); });
}

absl::StatusOr<StatusInfo> EtcdClient::Status() {
  pb::StatusRequest req;
  pb::StatusResponse resp;
  std::string address;
  absl::Status st = Call("Status", "", true, [&](Endpoint& ep, grpc::ClientContext& ctx) {
    resp.Clear();
    address = ep.address;
    return ep.maintenance->Status(&ctx, req, &resp);
  });
  if (!st.ok()) return st;
  return StatusInfo{address, resp.version(), resp.header().member_id(), resp.leader(),
                    resp.raftterm()};
}

// ---- LeaseKeeper ----

LeaseKeeper::LeaseKeeper(EtcdClient* client, int64_t lease, Millis interval, Callbacks callbacks)
    : client_(client), lease_(lease), interval_(interval), cb_(std::move(callbacks)) {
  thread_ = std::thread([this] { Loop(); });
}

LeaseKeeper::~LeaseKeeper() { Stop(); }

void LeaseKeeper::Stop() {
  {
    std::lock_guard l(mu_);
    stopping_ = true;
    if (active_ctx_) static_cast<grpc::ClientContext*>(active_ctx_.get())->TryCancel();
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void LeaseKeeper::Loop() {
  size_t idx = client_->current_index();
  bool lost = false;
  while (true) {
    auto ctx = std::make_shared<grpc::ClientContext>();
    {
      std::lock_guard l(mu_);
      if (stopping_ || lost) return;
      active_ctx_ = ctx;
    }
    EtcdClient::Endpoint& ep = client_->endpoint(idx);
    if (!client_->Connect(ep, Clock::now() + client_->options().attempt_timeout)) {
      if (cb_.on_error) {
        cb_.on_error(absl::UnavailableError(
            fmt::format("etcd LeaseKeepAlive {:x} at {}: not connected within {} ms", lease_,
                        ep.address, client_->options().attempt_timeout.count())));
      }
      client_->MoveOff(idx);
      idx = client_->current_index();
      continue;
    }
    std::unique_ptr<grpc::ClientReaderWriter<pb::LeaseKeepAliveRequest, pb::LeaseKeepAliveResponse>>
        stream = ep.lease->LeaseKeepAlive(ctx.get());
    // The reader: answers arrive in the order of the requests.
    std::deque<SteadyTime> outstanding;  // guarded by mu_
    bool broken = false;                 // guarded by mu_
    std::thread reader([&] {
      pb::LeaseKeepAliveResponse resp;
      while (stream->Read(&resp)) {
        SteadyTime sent;
        {
          std::lock_guard l(mu_);
          if (outstanding.empty()) continue;  // cannot happen: etcd answers each request once
          sent = outstanding.front();
          outstanding.pop_front();
        }
        if (resp.ttl() <= 0) {
          {
            std::lock_guard l(mu_);
            lost = true;
          }
          cv_.notify_all();
          if (cb_.on_lost) {
            cb_.on_lost(absl::NotFoundError(
                fmt::format("etcd lease {:x} is gone (keep-alive answered TTL {} at {})", lease_,
                            resp.ttl(), ep.address)));
          }
          return;
        }
        if (cb_.on_renewed) cb_.on_renewed(sent, resp.ttl());
      }
      std::lock_guard l(mu_);
      broken = true;
      cv_.notify_all();
    });
    std::string why;
    {
      std::unique_lock l(mu_);
      auto next_send = Clock::now();
      while (!stopping_ && !lost && !broken) {
        const auto now = Clock::now();
        if (!outstanding.empty() &&
            now - outstanding.front() > client_->options().attempt_timeout) {
          why = fmt::format("no keep-alive answer within {} ms",
                            client_->options().attempt_timeout.count());
          break;
        }
        if (now >= next_send) {
          pb::LeaseKeepAliveRequest req;
          req.set_id(lease_);
          outstanding.push_back(now);
          l.unlock();
          const bool ok = stream->Write(req);
          l.lock();
          if (!ok) {
            why = "the stream closed";
            break;
          }
          next_send = now + interval_;
          continue;
        }
        auto wake = next_send;
        if (!outstanding.empty()) {
          wake =
              std::min(wake, outstanding.front() + client_->options().attempt_timeout + Millis(1));
        }
        cv_.wait_until(l, wake);
      }
      ctx->TryCancel();
    }
    reader.join();
    const grpc::Status s = stream->Finish();
    bool stop;
    {
      std::lock_guard l(mu_);
      active_ctx_.reset();
      stop = stopping_ || lost;
    }
    if (stop) return;
    if (cb_.on_error) {
      cb_.on_error(absl::UnavailableError(fmt::format("etcd LeaseKeepAlive {:x} at {}: {}{}{}",
                                                      lease_, ep.address, why.empty() ? "" : why,
                                                      why.empty() ? "" : "; ", s.error_message())));
    }
    client_->MoveOff(idx);
    idx = client_->current_index();
    if (WaitFor(mu_, cv_, Millis(50), [&] { return stopping_; })) return;
  }
}

// ---- Watcher ----

Watcher::Watcher(EtcdClient* client, std::string key, std::string range_end, int64_t start_revision,
                 Callbacks callbacks)
    : client_(client),
      key_(std::move(key)),
      range_end_(std::move(range_end)),
      cb_(std::move(callbacks)),
      next_revision_(start_revision) {
  thread_ = std::thread([this] { Loop(); });
}

Watcher::~Watcher() { Stop(); }

void Watcher::Stop() {
  {
    std::lock_guard l(mu_);
    stopping_ = true;
    if (active_ctx_) static_cast<grpc::ClientContext*>(active_ctx_.get())->TryCancel();
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Watcher::Loop() {
  Millis backoff(50);
  while (true) {
    auto ctx = std::make_shared<grpc::ClientContext>();
    {
      std::lock_guard l(mu_);
      if (stopping_) return;
      active_ctx_ = ctx;
    }
    const size_t idx = client_->current_index();
    EtcdClient::Endpoint& ep = client_->endpoint(idx);
    if (!client_->Connect(ep, Clock::now() + client_->options().attempt_timeout)) {
      if (cb_.on_error) {
        cb_.on_error(absl::UnavailableError(
            fmt::format("etcd Watch \"{}\" at {}: not connected within {} ms", key_, ep.address,
                        client_->options().attempt_timeout.count())));
      }
      client_->MoveOff(idx);
      continue;
    }
    auto stream = ep.watch->Watch(ctx.get());
    pb::WatchRequest req;
    auto* create = req.mutable_create_request();
    create->set_key(key_);
    create->set_range_end(range_end_);
    create->set_start_revision(next_revision_.load());
    create->set_progress_notify(true);
    std::string why;
    bool compacted = false;
    if (stream->Write(req)) {
      pb::WatchResponse resp;
      while (stream->Read(&resp)) {
        backoff = Millis(50);
        if (resp.compact_revision() > 0) {
          compacted = true;
          if (cb_.on_compacted) cb_.on_compacted(resp.compact_revision());
          break;
        }
        if (resp.canceled()) {
          why = fmt::format("watch cancelled by etcd: {}", resp.cancel_reason());
          break;
        }
        std::vector<WatchEvent> events;
        events.reserve(resp.events_size());
        int64_t next = next_revision_.load();
        for (const auto& e : resp.events()) {
          WatchEvent ev;
          ev.type = e.type() == ::mvccpb::Event::DELETE ? WatchEvent::Type::kDelete
                                                        : WatchEvent::Type::kPut;
          ev.kv = FromPb(e.kv());
          next = std::max(next, e.kv().mod_revision() + 1);
          events.push_back(std::move(ev));
        }
        // A response without events (created, progress) brings us to its header revision; with
        // events, only as far as the last event (safe whatever etcd batches).
        if (events.empty()) next = std::max(next, resp.header().revision() + 1);
        next_revision_.store(next);
        if (cb_.on_events && (!events.empty() || resp.created())) {
          cb_.on_events(events, next - 1);
        }
      }
    } else {
      why = "could not send the watch request";
    }
    ctx->TryCancel();
    const grpc::Status s = stream->Finish();
    {
      std::lock_guard l(mu_);
      active_ctx_.reset();
      if (stopping_ || compacted) return;
    }
    if (cb_.on_error) {
      cb_.on_error(absl::UnavailableError(fmt::format(
          "etcd Watch \"{}\" at {}: {}{}{} (resuming from revision {})", key_, ep.address, why,
          why.empty() ? "" : "; ", s.error_message(), next_revision_.load())));
    }
    client_->MoveOff(idx);
    if (WaitFor(mu_, cv_, backoff, [&] { return stopping_; })) return;
    backoff = std::min(backoff * 2, Millis(1000));
  }
}

}  // namespace tvilling::coordinator
