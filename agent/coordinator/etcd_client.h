// etcd_client.h: a small etcd v3 client over gRPC (etcd 3.4's API: proto/etcd/, a trimmed copy of
// etcd's own .proto files), for the fail-over coordinator (docs/coordinator.md).
//
// What it offers: Range, Put, DeleteRange, Txn (compares on version / create / mod revision /
// value / lease; success and failure ops), LeaseGrant, LeaseRevoke, LeaseTimeToLive, Status; a
// LeaseKeepAlive stream (LeaseKeeper) and a Watch stream that resumes from the last revision it
// delivered (Watcher). Several endpoints, with fail-over between them; optional TLS (with or
// without a client certificate); a deadline on every call.
//
// Endpoint fail-over. The client keeps one gRPC channel per endpoint and a current endpoint. A call
// goes to the current endpoint; if that fails with UNAVAILABLE (connection refused or lost, "no
// leader", "leader changed"), or with DEADLINE_EXCEEDED for a call that changes nothing (Range,
// LeaseTimeToLive, Status), the client moves to the next endpoint and tries again, until the call's
// overall deadline (`call_timeout`) is spent; each attempt gets at most `attempt_timeout`. A
// changing call (Put, DeleteRange, Txn, LeaseGrant, LeaseRevoke) that ran out its attempt deadline
// is NOT repeated, because it may have been applied: the caller sees DEADLINE_EXCEEDED and
// decides (the coordinator guards its writes with Txn compares and re-reads). Repeating a changing
// call after UNAVAILABLE is safe for the coordinator's writes for the same reason: a guarded Txn
// that had been applied fails its compare the second time, and the caller re-reads.
//
// Errors are absl::Status naming the endpoint and the operation, e.g.
//   `etcd Put "/tvilling/x" at 127.0.0.1:2379: UNAVAILABLE: failed to connect to all addresses`.
// Nothing here throws; every method is thread-safe.
#pragma once

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace tvilling::coordinator {

using Millis = std::chrono::milliseconds;
using SteadyTime = std::chrono::steady_clock::time_point;

struct EtcdTls {
  std::filesystem::path ca;    // PEM CA that signs the etcd members' certificates (required)
  std::filesystem::path cert;  // client certificate for etcd's --client-cert-auth (optional)
  std::filesystem::path key;   // its key (with cert)
  // Name the members' certificates must carry, if not the endpoint's host.
  std::string server_name;
};

struct EtcdOptions {
  std::vector<std::string> endpoints;  // "host:port" (no scheme)
  std::optional<EtcdTls> tls;          // nullopt: plain TCP
  Millis call_timeout{3000};           // overall, per call, across endpoints
  Millis attempt_timeout{1000};        // per attempt on one endpoint
  // Reconnect backoff of each channel (gRPC's defaults reach 120 s; a coordinator must notice a
  // member's return quickly).
  Millis reconnect_backoff_min{100};
  Millis reconnect_backoff_max{1000};
};

struct KeyValue {
  std::string key;
  std::string value;
  int64_t create_revision = 0;
  int64_t mod_revision = 0;
  int64_t version = 0;
  int64_t lease = 0;
};

struct RangeResult {
  int64_t revision = 0;  // the store's revision when the range was read
  std::vector<KeyValue> kvs;
  bool more = false;
  int64_t count = 0;
};

// "Every key from `key` up to (not including) `range_end`". Empty range_end: just `key`.
std::string PrefixEnd(const std::string& prefix);

struct Compare {
  enum class Target { kVersion, kCreateRevision, kModRevision, kValue, kLease };
  enum class Result { kEqual, kGreater, kLess, kNotEqual };
  std::string key;
  Target target = Target::kVersion;
  Result result = Result::kEqual;
  int64_t number = 0;  // version, revision or lease
  std::string value;   // for kValue

  static Compare CreateRevision(std::string key, Result r, int64_t rev) {
    return {std::move(key), Target::kCreateRevision, r, rev, {}};
  }
  static Compare ModRevision(std::string key, Result r, int64_t rev) {
    return {std::move(key), Target::kModRevision, r, rev, {}};
  }
  static Compare Value(std::string key, Result r, std::string v) {
    return {std::move(key), Target::kValue, r, 0, std::move(v)};
  }
  static Compare Version(std::string key, Result r, int64_t version) {
    return {std::move(key), Target::kVersion, r, version, {}};
  }
  static Compare Lease(std::string key, Result r, int64_t lease) {
    return {std::move(key), Target::kLease, r, lease, {}};
  }
};

struct TxnOp {
  enum class Kind { kRange, kPut, kDelete };
  Kind kind = Kind::kRange;
  std::string key;
  std::string range_end;  // kRange / kDelete
  std::string value;      // kPut
  int64_t lease = 0;      // kPut

  static TxnOp Get(std::string key, std::string range_end = {}) {
    return {Kind::kRange, std::move(key), std::move(range_end), {}, 0};
  }
  static TxnOp Put(std::string key, std::string value, int64_t lease = 0) {
    return {Kind::kPut, std::move(key), {}, std::move(value), lease};
  }
  static TxnOp Delete(std::string key, std::string range_end = {}) {
    return {Kind::kDelete, std::move(key), std::move(range_end), {}, 0};
  }
};

struct TxnResult {
  bool succeeded = false;
  int64_t revision = 0;
  // One entry per op of the branch that ran; filled for kRange ops (empty for the others).
  std::vector<RangeResult> ranges;
};

struct LeaseInfo {
  int64_t id = 0;
  int64_t ttl_s = 0;  // granted TTL (Grant) or remaining TTL (TimeToLive; -1: no such lease)
};

struct StatusInfo {
  std::string endpoint;
  std::string version;
  uint64_t member_id = 0;
  uint64_t leader = 0;
  uint64_t raft_term = 0;
};

struct WatchEvent {
  enum class Type { kPut, kDelete };
  Type type = Type::kPut;
  KeyValue kv;  // for kDelete: the key, and mod_revision = the deletion's revision
};

class EtcdClient {
 public:
  // Checks the options (at least one endpoint, each "host:port"; TLS files readable) and builds the
  // channels. Connecting happens lazily, per call.
  static absl::StatusOr<std::unique_ptr<EtcdClient>> Create(EtcdOptions options);
  ~EtcdClient();
  EtcdClient(const EtcdClient&) = delete;
  EtcdClient& operator=(const EtcdClient&) = delete;

  absl::StatusOr<RangeResult> Get(const std::string& key);
  absl::StatusOr<RangeResult> Range(const std::string& key, const std::string& range_end,
                                    int64_t limit = 0);
  absl::StatusOr<int64_t> Put(const std::string& key, const std::string& value,
                              int64_t lease = 0);  // the new revision
  absl::StatusOr<int64_t> DeleteRange(const std::string& key,
                                      const std::string& range_end = {});  // how many deleted
  absl::StatusOr<TxnResult> Txn(const std::vector<Compare>& compares,
                                const std::vector<TxnOp>& success,
                                const std::vector<TxnOp>& failure);
  absl::StatusOr<LeaseInfo> LeaseGrant(int64_t ttl_s);
  absl::Status LeaseRevoke(int64_t lease);
  absl::StatusOr<LeaseInfo> LeaseTimeToLive(int64_t lease);
  // Compacts the store's history up to `revision` (watchers that resume before it are told so).
  absl::Status Compact(int64_t revision);
  // Status of the current endpoint (or the first that answers).
  absl::StatusOr<StatusInfo> Status();

  const EtcdOptions& options() const { return options_; }
  // The endpoint calls go to now (it changes on fail-over).
  std::string current_endpoint() const;

  // Internals shared with LeaseKeeper and Watcher.
  struct Endpoint;
  size_t endpoint_count() const { return endpoints_.size(); }
  Endpoint& endpoint(size_t i) { return *endpoints_[i]; }
  size_t current_index() const { return current_.load(); }
  void MoveOff(size_t failed_index);  // fail over from `failed_index` (if it is still current)
  // Waits until `ep`'s channel is connected, at most until `deadline`.
  bool Connect(Endpoint& ep, SteadyTime deadline);

 private:
  explicit EtcdClient(EtcdOptions options);
  template <class Fn>
  absl::Status Call(const char* op, const std::string& what, bool idempotent, Fn&& fn);

  EtcdOptions options_;
  std::vector<std::unique_ptr<Endpoint>> endpoints_;
  std::atomic<size_t> current_{0};
};

// Keeps one lease alive over a LeaseKeepAlive stream, from its own thread. Every `interval` it
// sends a keep-alive request; each answer calls on_renewed with the time the request was SENT (the
// lease was renewed for its TTL at some moment after that, so `sent + TTL` is a safe lower bound of
// the lease's end). An answer with TTL <= 0 means the lease is gone at etcd: on_lost is called once
// and the keeper stops. A stream that fails, or does not answer within the client's
// attempt_timeout, is cancelled and reopened on the next endpoint. Callbacks run on the keeper's
// thread.
class LeaseKeeper {
 public:
  struct Callbacks {
    std::function<void(SteadyTime sent, int64_t ttl_s)> on_renewed;
    std::function<void(absl::Status)> on_lost;
    std::function<void(absl::Status)> on_error;  // a stream failed (the keeper retries)
  };
  LeaseKeeper(EtcdClient* client, int64_t lease, Millis interval, Callbacks callbacks);
  ~LeaseKeeper();
  void Stop();

 private:
  void Loop();
  EtcdClient* const client_;
  const int64_t lease_;
  const Millis interval_;
  const Callbacks cb_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::shared_ptr<void> active_ctx_;  // grpc::ClientContext of the open stream, for Stop
  std::thread thread_;
};

// Watches a key or a range from its own thread. Events are delivered in revision order. If the
// stream breaks, the watcher reopens it (on the next endpoint) from the revision after the last
// one it delivered, so no event is lost or repeated. If etcd compacted that revision away,
// on_compacted is called with the compaction revision and the watcher stops: the caller must
// re-read and start a new watcher.
class Watcher {
 public:
  struct Callbacks {
    // `revision`: the store revision this response brings the watcher to.
    std::function<void(const std::vector<WatchEvent>& events, int64_t revision)> on_events;
    std::function<void(int64_t compact_revision)> on_compacted;
    std::function<void(absl::Status)> on_error;  // a stream failed (the watcher retries)
  };
  // start_revision 0: from now on.
  Watcher(EtcdClient* client, std::string key, std::string range_end, int64_t start_revision,
          Callbacks callbacks);
  ~Watcher();
  void Stop();
  // The revision the next (re)opened stream starts from.
  int64_t next_revision() const { return next_revision_.load(); }

 private:
  void Loop();
  EtcdClient* const client_;
  const std::string key_, range_end_;
  const Callbacks cb_;
  std::atomic<int64_t> next_revision_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::shared_ptr<void> active_ctx_;
  std::thread thread_;
};

}  // namespace tvilling::coordinator
