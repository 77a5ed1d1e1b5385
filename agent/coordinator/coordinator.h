// coordinator.h: drives one core::FailoverMachine per group from etcd (docs/coordinator.md).
//
// The agent holds one etcd lease, its session, kept alive by a LeaseKeeper. Per group it
//   - publishes its site report under the session:   <prefix>/groups/<g>/sites/<site>
//   - campaigns for the leader key under the session: <prefix>/groups/<g>/leader   (value: site;
//     the key's create revision is the epoch)
//   - as primary, publishes the primary report, guarded by its epoch: <prefix>/groups/<g>/primary
//   - as a candidate under the approve policy, publishes its plan:    <prefix>/groups/<g>/pending
//   - as primary, publishes its sync set, guarded by its epoch, when the replicator asks:
//                                                                      <prefix>/groups/<g>/sync
// and watches <prefix>/groups/ for leader changes.
//
// Threads: a ticker feeds EvTick every `tick` and carries out the machines' local actions at once
// (suspend/resume I/O: never delayed by a slow etcd call); a worker makes the etcd calls the
// machines ask for and publishes and reads the reports every `report_interval`; the keeper's and
// the watcher's threads feed renewals and leader changes. One mutex guards the machines; a
// GroupBinding's callbacks run under it and must not block.
#pragma once

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "agent/coordinator/etcd_client.h"
#include "agent/core/failover.h"

namespace tvilling::coordinator {

struct GroupBinding {
  core::FailoverOptions failover;
  // This site's report for the group (durable LSN, consistent, no_failover).
  std::function<core::SiteReport()> site_report;
  // The primary's report, when this site serves the group as primary (nullopt otherwise).
  std::function<std::optional<core::PrimaryReport>()> primary_report;
  // Carries out a local action (suspend/resume I/O, promote, demote, follow, refused, pending).
  std::function<void(const core::FailoverAction&)> apply;
  // The sync set (docs/coordinator.md, "Sync writes and the election"): the set this site's
  // primary wants in etcd, with its epoch (taken: in flight), and the answer of the Txn that
  // published it. Optional.
  std::function<std::optional<std::pair<uint64_t, core::SyncSet>>()> take_sync_set;
  std::function<void(uint64_t epoch, const core::SyncSet&, bool ok)> sync_set_published;
};

struct CoordinatorOptions {
  EtcdOptions etcd;
  std::string prefix = "/tvilling";
  std::string site;
  Millis lease_ttl{3000};
  // The primary's self-fencing delay (core::FailoverOptions::suspend_after): keep-alives go out
  // every 3/8 of it, so one can be lost and the next is still answered with time to spare.
  Millis suspend_after{2000};
  Millis tick{50};
  Millis report_interval{1000};
};

// Keys and values (docs/coordinator.md, "Keys in etcd").
std::string LeaderKey(const std::string& prefix, const std::string& group);
std::string SitesPrefix(const std::string& prefix, const std::string& group);
std::string PrimaryKey(const std::string& prefix, const std::string& group);
std::string PendingKey(const std::string& prefix, const std::string& group);
std::string HandoverKey(const std::string& prefix, const std::string& group);
// Maintenance mode: present (value: who and when) while automatic fail-over is paused.
std::string PausedKey(const std::string& prefix, const std::string& group);
std::string EncodeSiteReport(const core::SiteReport& r);
std::optional<core::SiteReport> DecodeSiteReport(const std::string& value);
std::string EncodePrimaryReport(const core::PrimaryReport& r);
std::optional<core::PrimaryReport> DecodePrimaryReport(const std::string& value);
// The sync set: "site=a epoch=7 members=b,c floor=100" (members= empty: none).
std::string SyncKey(const std::string& prefix, const std::string& group);
std::string EncodeSyncSet(const core::PublishedSyncSet& s);
std::optional<core::PublishedSyncSet> DecodeSyncSet(const std::string& value);

class Coordinator {
 public:
  static absl::StatusOr<std::unique_ptr<Coordinator>> Start(CoordinatorOptions options,
                                                            std::vector<GroupBinding> groups);
  ~Coordinator();
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;
  // Stops the threads and revokes the session (its keys go at once; a primary's I/O stays
  // suspended).
  void Stop();

  struct GroupView {
    std::string group;
    std::string state;
    uint64_t epoch = 0;
    core::LeaderView leader;
    std::string last_refusal;
    bool paused = false;
    std::optional<core::PublishedSyncSet> sync_set;  // as last read from etcd
    std::string pending_plan;  // approve policy: the plan awaiting approval ("" if none)
    core::LossBound pending_loss;
  };
  std::vector<GroupView> Snapshot() const;

  // A primary has a sync set to publish (GroupBinding::take_sync_set): the worker publishes it
  // next. Does not block.
  void SyncSetDue();

  // An operator's command for `group` (core::EvPromote / core::EvApprove), handled at once: the
  // actions it produced are carried out as usual and returned (a kRefused says why, kCampaign
  // that the site now campaigns for the leader key). NotFound for an unknown group.
  absl::StatusOr<std::vector<core::FailoverAction>> Command(const std::string& group,
                                                            const core::FailoverEvent& event);

  // A switchover's hand-over of `group` from this site (the primary in `epoch`) to `to`: one Txn,
  // guarded by the leader key's create revision and value, deletes the key and names `to` in
  // <prefix>/groups/<g>/handover (etcd refuses a Txn that deletes and re-creates one key). The
  // target then campaigns at once (core::EvHandover). FailedPrecondition if the key is not ours in
  // that epoch; Unavailable if etcd does not answer (the Txn may or may not have been applied).
  absl::Status Handover(const std::string& group, uint64_t epoch, const std::string& to);
  // The group's leader as this site's machine sees it.
  std::optional<core::LeaderView> Leader(const std::string& group) const;
  // tvillingctl pause / resume: writes or deletes the group's paused key (no lease: it outlives
  // every agent); every site's machine learns it through the watch (core::EvPaused).
  absl::Status SetPaused(const std::string& group, bool paused, const std::string& who);
  // The site's promotion in `epoch` failed (the node stayed a replica): core::EvPromotionFailed,
  // which resigns the leader key if the site holds it in that epoch. Any thread; must not be
  // called from inside a binding's callback (they run under the coordinator's mutex).
  void PromotionFailed(const std::string& group, uint64_t epoch, const std::string& why);

 private:
  struct Work {
    enum class Kind {
      kNewSession,
      kCampaign,
      kReadLeader,
      kPublishPending,
      kClearPending,
      kResign
    };
    Kind kind;
    size_t group = 0;
    std::string message;
    uint64_t epoch = 0;  // kResign
  };
  void Resign(size_t i, uint64_t epoch);
  Coordinator(CoordinatorOptions options, std::vector<GroupBinding> groups);
  core::Nanos Now() const;
  // REQUIRES: mu_. Handles `event` for group `i` and dispatches the actions.
  std::vector<core::FailoverAction> HandleLocked(size_t i, const core::FailoverEvent& event);
  void HandleAllLocked(const core::FailoverEvent& event);
  void Enqueue(Work w);  // REQUIRES: mu_
  void TickerLoop();
  void WorkerLoop();
  void NewSession();
  void Campaign(size_t i);
  void ReadLeader(size_t i);
  void PublishSiteReports();
  void PublishAndReadReports();
  // Publishes what take_sync_set gives, each in a Txn guarded by the leader key (worker thread).
  void PublishSyncSets();
  // Reads every group's leader key at one revision and watches from the next. False: etcd did not
  // answer (try again later).
  bool ReadLeadersAndWatch();
  void StartWatcher(int64_t from_revision);
  void OnWatch(const std::vector<WatchEvent>& events);
  core::LeaderView ViewOf(const KeyValue& kv) const;

  const CoordinatorOptions options_;
  std::vector<GroupBinding> bindings_;
  std::unique_ptr<EtcdClient> client_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::vector<std::unique_ptr<core::FailoverMachine>> machines_;
  std::deque<Work> work_;
  bool session_requested_ = false;
  int64_t session_ = 0;

  std::unique_ptr<LeaseKeeper> keeper_;  // worker thread only (and Stop)
  std::unique_ptr<Watcher> watcher_;     // worker thread only (and Stop)
  bool need_watch_ = false;              // guarded by mu_: (re)read the keys and watch
  bool sync_set_due_ = false;            // guarded by mu_: SyncSetDue
  // Guarded by mu_: read the site reports at this time (a leader key vanished; see WorkerLoop).
  std::optional<std::chrono::steady_clock::time_point> reports_early_;
  bool publish_now_ = false;        // a leader key vanished: publish this site's reports now
  std::string last_session_error_;  // worker thread only
  std::chrono::steady_clock::time_point last_session_error_at_;
  std::thread ticker_;
  std::thread worker_;
};

}  // namespace tvilling::coordinator
