// group_controller.h: one group's role on this site, switchable while the agent runs
// (docs/coordinator.md, "Role switching").
//
// The controller owns the group's replication object — a PrimaryReplicator while this site is
// primary, a ReplicaGroup registered with the ReplicationService while it is a replica — and the
// exports' writability. Promote and Demote switch between them:
//
//   Promote(epoch): the replica stops (its stream is closed, no message of any stream is being
//     handled, every replicated append is in the log), the group is registered as a primary (new
//     streams are refused), a PrimaryReplicator begins `epoch` in the log (a history entry) and
//     dials every peer of the config (the old primary is one of them), the exports become
//     writable, and client I/O resumes — at once without a coordinator, once the coordinator
//     allows it with one (CoordinatorResume).
//   Demote(reason): the exports stop accepting writes (a new WRITE fails with Unavailable, NBD
//     ESHUTDOWN: retryable elsewhere), client I/O is suspended, writes already admitted reach the
//     log, the PrimaryReplicator stops (writes waiting for sync peers fail with Unavailable),
//     held writes fail with Unavailable (they never reached the log), and a new ReplicaGroup is
//     registered, so the new primary's Hello is answered by the normal handshake (stream, full
//     copy or refusal, docs/replication.md).
//
// An acknowledged write is in the local log before it is acknowledged, and neither switch removes
// or reorders anything in the log; what happens to records a new primary does not have is the
// replica handshake's business (rejoin).
//
// Threads: Promote/Demote block (they join threads and wait for the log) and are serialised by
// switch_mu_; the coordinator's callbacks must not block, so they Post* onto the controller's own
// worker thread. CoordinatorSuspend acts at once (it is the fence, never delayed by a switch).
// Objects replaced by a switch are kept until the controller is destroyed: callbacks in flight
// (a gRPC reactor, a WRITE's completion) may still hold raw pointers to them.
#pragma once

#include <absl/status/status.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "agent/node/group_runtime.h"
#include "agent/node/replication.h"
#include "agent/node/replication_service.h"
#include "tvilling/v1/control.pb.h"

namespace tvilling::node {

enum class GroupRole { kPrimary, kReplica };
const char* GroupRoleName(GroupRole r);

struct GroupControllerOptions {
  std::string site;
  // The replicator's options when primary: the config's peers of the group (every other site that
  // holds it). Its `epoch` is set by each Promote.
  PrimaryOptions primary;
  ReplicaOptions replica;
  // Whether the group has peers (else there is nothing to replicate: roles only change exports).
  bool has_peers = false;
  // With a [coordinator]: client I/O resumes only after CoordinatorResume.
  bool coordinated = false;
  // Told of every switch carried out or refused ("promoted"/"demoted", ok, what and why), for the
  // audit log. Runs on the switching thread: must not block.
  std::function<void(const std::string& action, bool ok, const std::string& detail)> on_switch;
};

class GroupController {
 public:
  // `service` may be null when the group has no peers. `runtime` and `service` outlive the
  // controller.
  GroupController(GroupRuntime* runtime, GroupControllerOptions options,
                  ReplicationService* service);
  ~GroupController();
  GroupController(const GroupController&) = delete;
  GroupController& operator=(const GroupController&) = delete;

  const std::string& name() const { return runtime_->name(); }
  GroupRuntime& runtime() { return *runtime_; }

  // The role at start-up. kPrimary without a coordinator: Promote(0). kReplica: registers the
  // replica. `await_election` (with a coordinator, the configured primary): a replica whose client
  // writes are held, not refused, until the coordinator promotes it (or fails them when another
  // site holds the key).
  absl::Status Start(GroupRole role, bool await_election = false);

  // Blocking switches (see the file comment). `epoch` 0: one above every epoch the log has seen;
  // otherwise the etcd leader key's create revision, refused (FailedPrecondition) unless above
  // every epoch in the log. Promote refuses an inconsistent replica (a full copy in progress or
  // not yet caught up to its end). Promote of a primary in the same epoch (or 0) and Demote of a
  // replica succeed without doing anything.
  absl::Status Promote(uint64_t epoch, const std::string& why);
  absl::Status Demote(const std::string& why);

  // For the coordinator's callbacks (non-blocking): queued on the controller's worker.
  void PostPromote(uint64_t epoch, std::string why);
  void PostDemote(std::string why);
  // Another site is primary: a site awaiting election fails its held writes; a primary demotes.
  void PostFollow(std::string site);
  // The coordinator's fence: suspend now; resume only once this site is primary.
  void CoordinatorSuspend(const std::string& reason);
  void CoordinatorResume();
  // A switchover's write pause: hold new writes (and completions) until Unpause; I/O resumes then
  // only if nothing else holds it (the coordinator's fence, a demotion).
  void Pause(const std::string& reason);
  void Unpause();

  GroupRole role() const;
  uint64_t epoch() const;
  // Whether a Promote/Demote is queued or running.
  bool switching() const;
  void FillStatus(v1::GroupStatus* out) const;

  // SIGHUP: the rate cap of the link to `peer_site`, for the running replicator (if this site is
  // primary now) and for every later promotion. Returns the previous cap, or nullopt if the group
  // has no such peer.
  std::optional<uint64_t> SetRateLimit(const std::string& peer_site, uint64_t bytes_per_s);
  // Primary: a heartbeat on every link now (PrimaryReplicator::HeartbeatNow); nothing otherwise.
  void HeartbeatNow();

  // The sync set in etcd (docs/coordinator.md, "Sync writes and the election"), for the
  // coordinator: `notify` is called (must not block) when the running primary has a set to
  // publish; TakeSyncSetToPublish returns it with the primary's epoch (marked in flight);
  // SyncSetPublished hands the answer to the primary of that epoch (ignored for an older one).
  void SetSyncSetNotify(std::function<void()> notify);
  // A coordinated promotion (epoch != 0) that failed calls `notify(epoch, why)` on the
  // controller's worker, outside its locks: the coordinator then resigns the leader key
  // (core::EvPromotionFailed).
  void SetPromotionFailedNotify(std::function<void(uint64_t epoch, const std::string& why)> notify);
  std::optional<std::pair<uint64_t, core::SyncSet>> TakeSyncSetToPublish();
  void SyncSetPublished(uint64_t epoch, const core::SyncSet& set, bool ok);

  // Shutdown: the replicator (writes waiting for sync peers fail), then the replica.
  void StopPrimary();
  void Stop();

 private:
  void WorkerLoop();
  void Post(std::function<void()> fn);
  absl::Status PromoteLocked(uint64_t epoch, const std::string& why);  // REQUIRES: switch_mu_
  absl::Status DemoteLocked(const std::string& why);                   // REQUIRES: switch_mu_
  void BecomeReplica();                                                // REQUIRES: switch_mu_
  absl::Status CheckPromotable() const;

  GroupRuntime* const runtime_;
  const GroupControllerOptions options_;
  ReplicationService* const service_;

  std::mutex switch_mu_;  // one switch at a time

  mutable std::mutex mu_;  // the fields below
  GroupRole role_ = GroupRole::kReplica;
  bool await_election_ = false;
  bool coordinator_allows_io_ = false;
  bool paused_ = false;
  std::shared_ptr<PrimaryReplicator> primary_;
  ReplicaGroup* replica_ = nullptr;
  std::vector<std::shared_ptr<PrimaryReplicator>> old_primaries_;
  std::vector<std::unique_ptr<ReplicaGroup>> replicas_;  // the current one is replicas_.back()
  std::map<std::string, uint64_t> rate_limits_;  // SetRateLimit's caps, over options_.primary's
  std::function<void()> sync_set_notify_;
  std::function<void(uint64_t, const std::string&)> promotion_failed_notify_;
  void NotifyPromotionFailed(uint64_t epoch, const std::string& why);

  std::condition_variable work_cv_;
  std::deque<std::function<void()>> work_;
  bool busy_ = false;
  bool stopping_ = false;
  std::thread worker_;
};

}  // namespace tvilling::node
