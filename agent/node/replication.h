// replication.h: a running group's replication, on both ends (docs/replication.md).
//
// PrimaryReplicator runs on the group's primary: it keeps core::PrimaryGroup fed with the local
// log's progress and the peers' positions, holds back client I/O as the peers' modes demand (it is
// the group's CompletionGate), and drives one outgoing stream per peer from a single worker thread:
// dial with backoff, Hello, ship batches read from the log (or, for a new peer, copy the volumes
// while the log streams), heartbeats.
//
// ReplicaGroup runs on a replica: it answers a primary's Hello with core::ReplicaReceiver's
// decision, appends batches to its own log (the runtime's applier then writes the volumes), takes
// full copies, and reports its positions.
//
// Neither class knows gRPC: a stream is a pair of functions (send a message, close with a status)
// so the transport shim in agent/node/replication_service.cc is the only place that touches it.
#pragma once

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "agent/core/replication.h"
#include "agent/node/group_runtime.h"
#include "tvilling/v1/control.pb.h"
#include "tvilling/v1/replication.pb.h"

namespace tvilling::node {

core::Nanos MonotonicNow();

// A stream as the replication logic sees it. Send queues a message (never blocks); queued_bytes is
// what is queued and not yet written to the socket (backpressure); Close ends the stream.
template <class Out>
class Stream {
 public:
  virtual ~Stream() = default;
  virtual void Send(Out msg) = 0;
  virtual uint64_t queued_bytes() const = 0;
  virtual void Close(absl::Status status) = 0;
};
using PrimaryStream = Stream<v1::ToReplica>;    // the primary's end
using ReplicaStream = Stream<v1::FromReplica>;  // the replica's end

// Opens outgoing streams (the transport implements it). The events of the stream arrive through
// the callbacks; after on_closed nothing more arrives.
class Dialer {
 public:
  struct Callbacks {
    std::function<void(v1::FromReplica msg)> on_message;
    std::function<void(absl::Status)> on_closed;
  };
  virtual ~Dialer() = default;
  virtual std::shared_ptr<PrimaryStream> Dial(const std::string& peer_site,
                                              Callbacks callbacks) = 0;
};

struct PeerOptions {
  std::string site;
  core::SenderOptions sender;
  v1::Codec codec = v1::CODEC_LZ4;
  uint64_t rate_limit_bytes_per_s = 0;  // 0 = none
};

struct PrimaryOptions {
  std::string site;  // this agent's site
  std::vector<PeerOptions> peers;
  uint64_t copy_chunk_bytes = 1ull << 20;
  // Stop queueing more on a stream while this much is waiting for the socket.
  uint64_t max_queued_bytes = 16ull << 20;
  core::Nanos heartbeat_interval = 1'000'000'000;
  // A stream silent for this long (no message of any kind) is cut and redialled.
  core::Nanos link_timeout = 10'000'000'000;
  // The epoch to begin. 0: one above every epoch this log has seen (no coordinator). Otherwise
  // the etcd leader key's create revision (docs/coordinator.md), which must be above every epoch
  // in the log's history and every epoch it has seen, or Start refuses (FailedPrecondition).
  uint64_t epoch = 0;
  // With a coordinator: the sync set goes to etcd before a write completes without a member
  // (core::PrimaryGroup::GateOnPublishedSyncSet; docs/coordinator.md, "Sync writes and the
  // election"). `sync_set_changed` is called (not under the replicator's lock; it must not block)
  // when a set is due: the coordinator then takes it (TakeSyncSetToPublish), publishes it and
  // answers (SyncSetPublished).
  bool publish_sync_set = false;
  std::function<void()> sync_set_changed;
};

class PrimaryReplicator final : public CompletionGate,
                                public std::enable_shared_from_this<PrimaryReplicator> {
 public:
  // Decides the epoch (docs/replication.md, "Roles and epochs"), wires itself into `group` (gate
  // and records observer) and starts the worker. `group` must outlive the replicator (Stop first).
  static absl::StatusOr<std::shared_ptr<PrimaryReplicator>> Start(GroupRuntime* group,
                                                                  PrimaryOptions options,
                                                                  Dialer* dialer);
  ~PrimaryReplicator() override;

  // Closes the streams and joins the worker. Client I/O still waiting is failed with Unavailable.
  void Stop();

  // Changes the rate cap of the link to `peer_site` (0 = none) without touching the stream
  // (SIGHUP). The token bucket starts afresh at the new rate. Returns the previous cap, or
  // nullopt if the group has no such peer.
  std::optional<uint64_t> SetRateLimit(const std::string& peer_site, uint64_t bytes_per_s);
  // Sends a heartbeat on every connected link now (not at the next interval). Its echo shows in
  // the peer's status as `heartbeat_echo_age_us`: a switchover waits for one sent after it paused
  // writes, so that it never hands the leader key to a target that no longer answers.
  void HeartbeatNow();

  // CompletionGate
  void WriteInLog(uint64_t lsn, bool durable, nbd::Export::Done done) override;
  void FlushedLocally(uint64_t lsn, nbd::Export::Done done) override;

  uint64_t epoch() const { return epoch_; }
  void FillStatus(v1::GroupStatus* out) const;

  // The sync set to publish now (marked in flight), or nullopt.
  std::optional<core::SyncSet> TakeSyncSetToPublish();
  // The publication's answer (`ok`: etcd holds `set`); completes what the release points allow.
  void SyncSetPublished(const core::SyncSet& set, bool ok);
  std::optional<core::SyncSet> published_sync_set() const;

 private:
  struct Link;
  PrimaryReplicator(GroupRuntime* group, PrimaryOptions options, Dialer* dialer);
  void OnRecords(GroupRuntime::RecordsPhase phase, std::span<const storage::LogRecordView> records);
  void WorkerLoop();
  void Dial(Link& link, core::Nanos now);
  void OnMessage(Link& link, uint64_t generation, v1::FromReplica msg);
  void OnClosed(Link& link, uint64_t generation, const absl::Status& status);
  // Ships what core allows on `link`; returns false if it stopped on an error.
  // `fresh`: the records of the batch just written (the committer's OnRecords), valid during the
  // call; a batch that starts with them is built from them instead of being read back from the log.
  void Ship(Link& link, core::Nanos now, std::span<const storage::LogRecordView> fresh = {});
  void ShipLocked(Link& link, core::Nanos now, std::unique_lock<std::mutex>& lock,
                  std::span<const storage::LogRecordView> fresh = {});
  void CopyStep(Link& link, core::Nanos now);
  void Disconnect(Link& link, const std::string& reason, core::Nanos now);  // REQUIRES: mu_
  // A FLUSH/FUA began to wait: asks every peer that got lazily synced batches on its current
  // stream to fsync now (a heartbeat with sync_requested). REQUIRES: mu_.
  void AskPeersToSyncLocked();
  // Completes client I/O that the release points now allow. REQUIRES: mu_ held via `lock`; unlocks
  // it to run the callbacks.
  void ReleaseLocked(std::unique_lock<std::mutex>& lock);
  // REQUIRES: mu_. Whether the worker has something to do now or a timer to set: a link with a
  // batch due, a copy running, or a coalescing deadline. Threads that handled an event themselves
  // wake the worker only then (each needless wake-up is a futex round trip per write).
  bool WorkerHasWorkLocked(core::Nanos now) const;
  void PersistPeerPositions();

  // Records just written, kept (by reference to their write buffers) until every connected link
  // has sent them (nothing while none is connected), so that a batch is built from memory instead
  // of being read back from the log (RocksDB iterator, pread of payload files, checksums).
  // Contiguous LSNs, at most kShipCacheBytes of stored bytes. REQUIRES: mu_ for all three.
  struct CachedRecord {
    uint64_t lsn = 0;
    uint64_t epoch = 0;
    std::array<char, storage::kRecordHeaderSize> header{};
    std::string_view payload;           // into owner's buffer
    std::shared_ptr<const void> owner;  // null for an empty payload
  };
  void CacheRecordsLocked(std::span<const storage::LogRecordView> records);
  void TrimShipCacheLocked();
  std::deque<CachedRecord> ship_cache_;
  uint64_t ship_cache_bytes_ = 0;

  GroupRuntime* const group_;
  storage::GroupLog* const log_;
  const PrimaryOptions options_;
  Dialer* const dialer_;
  uint64_t epoch_ = 0;
  bool has_sync_peer_ = false;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  bool work_ = false;  // something happened that the worker should look at
  core::PrimaryGroup core_;
  std::vector<std::unique_ptr<Link>> links_;
  std::vector<std::pair<std::shared_ptr<PrimaryStream>, std::string>> pending_close_;
  std::multimap<uint64_t, nbd::Export::Done> write_waiters_;  // need write_released >= key
  std::multimap<uint64_t, nbd::Export::Done> flush_waiters_;  // need flush_released >= key
  std::thread worker_;
};

struct ReplicaOptions {
  std::string site;
  // Where a rejoin saves the records after the fork (docs/replication.md, "Rejoin"); empty = a
  // diverged replica refuses whatever on_divergence says (nowhere to save them).
  std::filesystem::path divergent_dir;
  core::OnDivergence on_divergence = core::OnDivergence::kRejoin;
  // Fsync the volumes and persist the copy's resume point after this many copied bytes.
  uint64_t copy_checkpoint_bytes = 64ull << 20;
  // A batch the primary does not wait on (not durable_requested: a sync peer's writes with no
  // FLUSH/FUA pending) is fsynced within this long, together with whatever else arrives meanwhile
  // ([replication] replica_sync_interval_ms). 0 = every batch at once.
  std::chrono::microseconds sync_interval{5000};
};

class ReplicaGroup {
 public:
  ReplicaGroup(GroupRuntime* group, ReplicaOptions options);
  ~ReplicaGroup();

  // A new stream from a primary. Returns the handler for its messages; `stream` answers.
  class Session;
  std::shared_ptr<Session> Open(std::shared_ptr<ReplicaStream> stream,
                                std::string peer_description);

  void FillStatus(v1::GroupStatus* out) const;

  // Online verify (docs/replication.md, "Verify"), asked by the primary whose stream is accepted
  // (same site and epoch) while this replica is consistent. Blocks: waits until the applied LSN
  // reaches the request's largest valid_from (at most wait_ms, capped at 60 s), then samples each
  // chunk (verify.h). FailedPrecondition names why a request is refused. The wait ends early
  // (Unavailable) once `cancelled` returns true (the agent is stopping).
  absl::StatusOr<v1::VerifyChunksReply> VerifyChunks(const v1::VerifyChunksRequest& req,
                                                     const std::function<bool()>& cancelled);
  // Notes `req.extents` to be restored from the primary at the next handshake of a stream from
  // the same site and epoch (the rejoin's restore: applier paused, chunks copied, CopyDone, the
  // log replayed over them) and closes the accepted stream so that the primary redials now. The
  // note is in memory: a restart before that handshake forgets it (verify again).
  absl::StatusOr<v1::MarkResyncReply> MarkResync(const v1::MarkResyncRequest& req);

  // Closes the accepted stream and refuses further messages; returns once no message of any
  // stream is being handled, and every append they queued is in the log (a promotion may then
  // begin a new epoch on this log).
  void Stop();

 private:
  friend class Session;
  // Session::OnMessage runs between these: false if stopping (the message is dropped).
  bool EnterHandler();
  void LeaveHandler();
  void HandleHello(Session& s, const v1::Hello& hello);
  // A kRejoin decision: saves the records after d.fork_lsn to a divergent file, cuts the log back
  // and persists core::PlanRejoin's outcome; then the caller decides again on the cut log.
  // REQUIRES: mu_ not held; no stream appends (the Hello is being handled).
  absl::Status Rejoin(const core::HandshakeDecision& d, const core::PrimaryHello& hello);
  void HandleBatch(Session& s, v1::Batch& batch);
  void HandleCopyBegin(Session& s, const v1::CopyBegin& m);
  void HandleCopyChunk(Session& s, const v1::CopyChunk& m);
  void HandleCopyDone(Session& s, const v1::CopyDone& m);
  void OnApplied(GroupRuntime::RecordsPhase phase, std::span<const storage::LogRecordView> records);
  void NoteApplied(uint64_t applied);  // REQUIRES: not mu_
  void SendAck();                      // REQUIRES: not mu_
  void RequestSync();             // a FLUSH at the primary waits: fsync what is held now, then ack
  void AckDurable(uint64_t lsn);  // an fsync covered the log up to lsn. REQUIRES: not mu_
  void Fail(Session& s, absl::Status status);
  // Logs `what` failing with `st` at error, unless `st` is the group's own write error (its log
  // store or its volume failed; sticky until a restart), which was logged once where it happened:
  // then every later batch fails with it (the primary's window, its reconnects), and one warning
  // says so for all of them (the rest go to debug).
  void LogFailure(std::string_view what, const absl::Status& st);
  core::ReplicaView BuildView() const;
  // REQUIRES: mu_. OK if `site` in `epoch` is the primary whose stream is accepted and the replica
  // is consistent, with no copy or restore pending.
  absl::Status CheckVerifierLocked(const std::string& site, uint64_t epoch) const;
  // In HandleHello, before deciding: a pending resync for this Hello's site and epoch becomes a
  // pending restore (persisted; applier paused). REQUIRES: mu_ not held.
  absl::Status ApplyPendingResync(const core::PrimaryHello& hello);

  GroupRuntime* const group_;
  storage::GroupLog* const log_;
  const ReplicaOptions options_;

  mutable std::mutex mu_;
  core::ReplicaReceiver rx_;
  std::shared_ptr<Session> active_;  // the accepted stream, if any
  std::string active_peer_;
  std::string active_mode_;  // the mode the primary runs this link in: "sync" or "async"
  uint32_t sender_group_id_ = 0;
  uint64_t epoch_ = 0;
  uint64_t copy_bytes_since_checkpoint_ = 0;
  uint64_t copy_done_bytes_ = 0;
  uint64_t copy_total_bytes_ = 0;
  std::string last_error_;
  std::atomic<bool> suspension_logged_{false};  // LogFailure said the writes are suspended
  bool stopping_ = false;
  struct PendingResync {
    std::string site;
    uint64_t epoch = 0;
    std::vector<core::Extent> extents;  // merged
  };
  std::optional<PendingResync> pending_resync_;  // guarded by mu_
  int handlers_running_ = 0;                     // guarded by mu_
  std::condition_variable handlers_idle_cv_;
};

class ReplicaGroup::Session : public std::enable_shared_from_this<ReplicaGroup::Session> {
 public:
  Session(ReplicaGroup* group, std::shared_ptr<ReplicaStream> stream, std::string peer)
      : group_(group), stream_(std::move(stream)), peer_(std::move(peer)) {}
  // One message from the primary (the transport delivers them one at a time, in order).
  void OnMessage(v1::ToReplica& msg);
  void OnClosed(const absl::Status& status);
  ReplicaStream& stream() { return *stream_; }
  const std::string& peer() const { return peer_; }
  bool accepted = false;  // the Hello was accepted
  core::History history;  // the accepted Hello's: what a CopyBegin's copy stands for
  bool closed = false;

 private:
  void Dispatch(v1::ToReplica& msg);
  ReplicaGroup* const group_;
  std::shared_ptr<ReplicaStream> stream_;
  const std::string peer_;
};

}  // namespace tvilling::node
