// group_controller.cc: see group_controller.h.
#include "agent/node/group_controller.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <future>

namespace tvilling::node {
namespace {

std::string Msg(const absl::Status& s) { return std::string(s.message()); }

absl::Status WaitIdle(storage::GroupLog& log) {
  std::promise<absl::Status> p;
  auto f = p.get_future();
  log.Sync([&p](absl::Status st) { p.set_value(st); });
  return f.get();
}

}  // namespace

const char* GroupRoleName(GroupRole r) { return r == GroupRole::kPrimary ? "primary" : "replica"; }

GroupController::GroupController(GroupRuntime* runtime, GroupControllerOptions options,
                                 ReplicationService* service)
    : runtime_(runtime), options_(std::move(options)), service_(service) {
  worker_ = std::thread([this] { WorkerLoop(); });
}

GroupController::~GroupController() { Stop(); }

absl::Status GroupController::Start(GroupRole role, bool await_election) {
  std::lock_guard sw(switch_mu_);
  if (role == GroupRole::kPrimary) {
    if (options_.coordinated) {
      return absl::InvalidArgumentError(
          "with a coordinator a site starts as a replica awaiting election");
    }
    return PromoteLocked(0, "configured primary");
  }
  if (options_.has_peers) BecomeReplica();
  {
    std::lock_guard l(mu_);
    role_ = GroupRole::kReplica;
    await_election_ = await_election;
  }
  // Awaiting election: writes are held (the fence), not refused, until the coordinator decides.
  if (await_election) {
    runtime_->SuspendIo("waiting for the coordinator to confirm this site as primary in etcd");
  }
  runtime_->SetWritable(await_election);
  return absl::OkStatus();
}

void GroupController::BecomeReplica() {
  auto r = std::make_unique<ReplicaGroup>(runtime_, options_.replica);
  ReplicaGroup* raw = r.get();
  {
    std::lock_guard l(mu_);
    replicas_.push_back(std::move(r));
    replica_ = raw;
  }
  if (service_ != nullptr) service_->AddReplica(name(), raw);
}

absl::Status GroupController::CheckPromotable() const {
  const storage::ReplicaMeta meta = runtime_->log().replica_meta();
  const storage::GroupLogState state = runtime_->log().State();
  if (meta.copy_in_progress || runtime_->apply_paused()) {
    return absl::FailedPreconditionError(fmt::format(
        "group {}: cannot promote this site: a full copy into its volumes is in progress (they "
        "are not a consistent image)",
        name()));
  }
  // A group that never replicated (a new group) has nothing to be inconsistent with.
  const bool fresh = meta.newest_epoch_seen == 0 && meta.primary_epoch == 0 &&
                     state.current_epoch == 0 && state.history.empty();
  if (!fresh && !meta.consistent) {
    return absl::FailedPreconditionError(fmt::format(
        "group {}: cannot promote this site: its volumes are not a consistent image (no "
        "complete full copy yet)",
        name()));
  }
  if (meta.consistent && runtime_->applied_lsn() < meta.consistent_at_lsn) {
    return absl::FailedPreconditionError(fmt::format(
        "group {}: cannot promote this site: after its full copy the volumes are consistent only "
        "from LSN {}, and they are at LSN {}",
        name(), meta.consistent_at_lsn, runtime_->applied_lsn()));
  }
  return absl::OkStatus();
}

absl::Status GroupController::Promote(uint64_t epoch, const std::string& why) {
  std::lock_guard sw(switch_mu_);
  return PromoteLocked(epoch, why);
}

absl::Status GroupController::PromoteLocked(uint64_t epoch, const std::string& why) {
  {
    std::lock_guard l(mu_);
    if (role_ == GroupRole::kPrimary) {
      const uint64_t current = primary_ ? primary_->epoch() : 0;
      if (epoch == 0 || epoch == current || !options_.has_peers) return absl::OkStatus();
      return absl::FailedPreconditionError(
          fmt::format("group {}: already primary in epoch {}; demote before beginning epoch {}",
                      name(), current, epoch));
    }
  }
  if (absl::Status st = CheckPromotable(); !st.ok()) {
    spdlog::error("{}", Msg(st));
    if (options_.on_switch) options_.on_switch("promoted", false, Msg(st));
    NotifyPromotionFailed(epoch, Msg(st));
    return st;
  }
  spdlog::info("group {}: promoting this site to primary ({}){}", name(), why,
               epoch ? fmt::format(" in etcd epoch {}", epoch) : std::string());
  std::shared_ptr<PrimaryReplicator> started;
  std::map<std::string, uint64_t> start_caps;  // the rate cap each peer's link started with
  if (options_.has_peers) {
    // New streams are refused from here on; the replica ends the one it has and lets every
    // replicated append land, so the new epoch begins after the last replicated record.
    if (service_ != nullptr) service_->AddPrimaryGroup(name());
    ReplicaGroup* replica = nullptr;
    {
      std::lock_guard l(mu_);
      replica = replica_;
    }
    if (replica != nullptr) replica->Stop();
    if (absl::Status st = WaitIdle(runtime_->log()); !st.ok()) return st;
    runtime_->SetRecordsObserver(nullptr);
    runtime_->SetCompletionGate(nullptr);
    PrimaryOptions po = options_.primary;
    po.epoch = epoch;
    po.publish_sync_set = options_.coordinated;
    po.sync_set_changed = [this] {
      std::function<void()> notify;
      {
        std::lock_guard l(mu_);
        notify = sync_set_notify_;
      }
      if (notify) notify();
    };
    {
      std::lock_guard lock(mu_);
      for (PeerOptions& peer : po.peers) {
        if (auto it = rate_limits_.find(peer.site); it != rate_limits_.end()) {
          peer.rate_limit_bytes_per_s = it->second;
        }
        start_caps[peer.site] = peer.rate_limit_bytes_per_s;
      }
    }
    auto p = PrimaryReplicator::Start(runtime_, std::move(po),
                                      service_ != nullptr ? service_->dialer() : nullptr);
    if (!p.ok()) {
      spdlog::error("group {}: promotion refused, staying a replica: {}", name(), Msg(p.status()));
      BecomeReplica();
      if (options_.on_switch) options_.on_switch("promoted", false, Msg(p.status()));
      NotifyPromotionFailed(epoch, Msg(p.status()));
      return p.status();
    }
    started = *p;
  }
  // Rate caps a SIGHUP changed while the replicator was starting (SetRateLimit found no primary
  // to tell): applied now, or the new primary would keep the old cap until the next reload.
  std::vector<std::pair<std::string, uint64_t>> changed_caps;
  {
    std::lock_guard l(mu_);
    primary_ = started;
    replica_ = nullptr;
    role_ = GroupRole::kPrimary;
    await_election_ = false;
    runtime_->SetWritable(true);
    // Resume under mu_: a CoordinatorSuspend that comes meanwhile waits, so it always wins.
    if (!paused_ && (!options_.coordinated || coordinator_allows_io_)) runtime_->ResumeIo();
    for (const auto& [site, cap] : rate_limits_) {
      auto it = start_caps.find(site);
      if (started && it != start_caps.end() && it->second != cap) {
        changed_caps.emplace_back(site, cap);
      }
    }
  }
  for (const auto& [site, cap] : changed_caps) (void)started->SetRateLimit(site, cap);
  const std::string done =
      fmt::format("this site is primary{}",
                  started ? fmt::format(" in epoch {}", started->epoch()) : std::string());
  spdlog::info("group {}: {}", name(), done);
  if (options_.on_switch) options_.on_switch("promoted", true, fmt::format("{} ({})", done, why));
  return absl::OkStatus();
}

absl::Status GroupController::Demote(const std::string& why) {
  std::lock_guard sw(switch_mu_);
  return DemoteLocked(why);
}

absl::Status GroupController::DemoteLocked(const std::string& why) {
  const absl::Status failed = absl::UnavailableError(
      fmt::format("group {}: site {} is no longer the primary ({}); retry at the new primary",
                  name(), options_.site, why));
  std::shared_ptr<PrimaryReplicator> primary;
  {
    std::lock_guard l(mu_);
    if (role_ == GroupRole::kReplica) {
      if (await_election_) {
        // Awaiting election and another site won: the held writes never reached the log.
        await_election_ = false;
        runtime_->SetWritable(false);
        runtime_->FailHeldIo(failed);
      }
      return absl::OkStatus();
    }
    primary = primary_;
  }
  spdlog::warn("group {}: demoting this site to replica: {}", name(), why);
  // 1. New writes fail; admitted ones finish entering the log; their completions are held.
  runtime_->SetWritable(false);
  runtime_->SuspendIo(fmt::format("demoting: {}", why));
  runtime_->WaitFencedIdle();
  if (absl::Status st = WaitIdle(runtime_->log()); !st.ok()) {
    spdlog::error("group {}: demote: {}", name(), Msg(st));
  }
  // 2. The replicator stops: writes waiting for sync peers fail (not acknowledged).
  runtime_->SetRecordsObserver(nullptr);
  if (primary) primary->Stop();
  runtime_->SetCompletionGate(nullptr);
  // 3. Completions held by the fence fail: not acknowledged, so nothing acknowledged is lost.
  runtime_->FailHeldIo(failed);
  {
    std::lock_guard l(mu_);
    if (primary) old_primaries_.push_back(primary);
    primary_.reset();
    role_ = GroupRole::kReplica;
    paused_ = false;  // a switchover's pause ends with the demotion
  }
  // 4. The new primary's Hello finds a replica (the handshake decides stream/copy/refuse).
  if (options_.has_peers) BecomeReplica();
  spdlog::info("group {}: this site is a replica now", name());
  if (options_.on_switch) options_.on_switch("demoted", true, why);
  return absl::OkStatus();
}

void GroupController::Post(std::function<void()> fn) {
  {
    std::lock_guard l(mu_);
    if (stopping_) return;
    work_.push_back(std::move(fn));
  }
  work_cv_.notify_one();
}

void GroupController::PostPromote(uint64_t epoch, std::string why) {
  Post([this, epoch, why = std::move(why)] { (void)Promote(epoch, why); });
}

void GroupController::PostDemote(std::string why) {
  {
    std::lock_guard l(mu_);
    coordinator_allows_io_ = false;
  }
  Post([this, why = std::move(why)] { (void)Demote(why); });
}

void GroupController::PostFollow(std::string site) {
  Post([this, site = std::move(site)] {
    if (site == options_.site) return;
    (void)Demote(fmt::format("{} is the primary", site));
  });
}

void GroupController::CoordinatorSuspend(const std::string& reason) {
  std::lock_guard l(mu_);
  coordinator_allows_io_ = false;
  runtime_->SuspendIo(fmt::format("coordinator: {}", reason));
}

void GroupController::CoordinatorResume() {
  std::lock_guard l(mu_);
  coordinator_allows_io_ = true;
  // A replica (being promoted, or not) resumes when its promotion completes.
  if (role_ == GroupRole::kPrimary && !paused_) runtime_->ResumeIo();
}

void GroupController::Pause(const std::string& reason) {
  std::lock_guard l(mu_);
  paused_ = true;
  runtime_->SuspendIo(reason);
}

void GroupController::Unpause() {
  std::lock_guard l(mu_);
  paused_ = false;
  if (role_ == GroupRole::kPrimary && (!options_.coordinated || coordinator_allows_io_)) {
    runtime_->ResumeIo();
  }
}

void GroupController::WorkerLoop() {
  std::unique_lock l(mu_);
  for (;;) {
    work_cv_.wait(l, [&] { return stopping_ || !work_.empty(); });
    if (stopping_) return;
    std::function<void()> fn = std::move(work_.front());
    work_.pop_front();
    busy_ = true;
    l.unlock();
    fn();
    l.lock();
    busy_ = false;
  }
}

GroupRole GroupController::role() const {
  std::lock_guard l(mu_);
  return role_;
}

uint64_t GroupController::epoch() const {
  std::lock_guard l(mu_);
  if (primary_) return primary_->epoch();
  return runtime_->log().State().current_epoch;
}

bool GroupController::switching() const {
  std::lock_guard l(mu_);
  return busy_ || !work_.empty();
}

void GroupController::SetSyncSetNotify(std::function<void()> notify) {
  std::lock_guard l(mu_);
  sync_set_notify_ = std::move(notify);
}

void GroupController::SetPromotionFailedNotify(
    std::function<void(uint64_t epoch, const std::string& why)> notify) {
  std::lock_guard l(mu_);
  promotion_failed_notify_ = std::move(notify);
}

void GroupController::NotifyPromotionFailed(uint64_t epoch, const std::string& why) {
  if (epoch == 0) return;  // an operator's promotion without a coordinator
  std::function<void(uint64_t, const std::string&)> notify;
  {
    std::lock_guard l(mu_);
    notify = promotion_failed_notify_;
  }
  if (notify) notify(epoch, why);
}

std::optional<std::pair<uint64_t, core::SyncSet>> GroupController::TakeSyncSetToPublish() {
  std::shared_ptr<PrimaryReplicator> p;
  {
    std::lock_guard l(mu_);
    p = primary_;
  }
  if (!p) return std::nullopt;
  std::optional<core::SyncSet> s = p->TakeSyncSetToPublish();
  if (!s) return std::nullopt;
  return std::make_pair(p->epoch(), std::move(*s));
}

void GroupController::SyncSetPublished(uint64_t epoch, const core::SyncSet& set, bool ok) {
  std::shared_ptr<PrimaryReplicator> p;
  {
    std::lock_guard l(mu_);
    p = primary_;
  }
  if (p && p->epoch() == epoch) p->SyncSetPublished(set, ok);
}

void GroupController::FillStatus(v1::GroupStatus* out) const {
  std::shared_ptr<PrimaryReplicator> p;
  ReplicaGroup* r = nullptr;
  GroupRole role;
  {
    std::lock_guard l(mu_);
    p = primary_;
    r = replica_;
    role = role_;
  }
  if (absl::Status st = runtime_->write_error(); !st.ok()) {
    out->set_write_error(std::string(st.message()));
  }
  if (p) return p->FillStatus(out);
  if (r != nullptr) return r->FillStatus(out);
  // No replication object: a group without peers.
  GroupRuntime& g = *runtime_;
  out->set_role(GroupRoleName(role));
  out->set_consistent(true);
  out->set_epoch(g.log().State().current_epoch);
  out->set_last_lsn(g.log().last_lsn());
  out->set_durable_lsn(g.log().durable_lsn());
  out->set_applied_lsn(g.applied_lsn());
  out->set_write_released(g.log().last_lsn());
  out->set_flush_released(g.log().durable_lsn());
}

std::optional<uint64_t> GroupController::SetRateLimit(const std::string& peer_site,
                                                      uint64_t bytes_per_s) {
  std::shared_ptr<PrimaryReplicator> primary;
  std::optional<uint64_t> was;
  {
    std::lock_guard lock(mu_);
    for (const PeerOptions& peer : options_.primary.peers) {
      if (peer.site != peer_site) continue;
      auto it = rate_limits_.find(peer_site);
      was = it != rate_limits_.end() ? it->second : peer.rate_limit_bytes_per_s;
    }
    if (!was) return std::nullopt;
    rate_limits_[peer_site] = bytes_per_s;
    primary = primary_;
  }
  if (primary) (void)primary->SetRateLimit(peer_site, bytes_per_s);
  return was;
}

void GroupController::HeartbeatNow() {
  std::shared_ptr<PrimaryReplicator> primary;
  {
    std::lock_guard lock(mu_);
    primary = primary_;
  }
  if (primary) primary->HeartbeatNow();
}

void GroupController::StopPrimary() {
  std::shared_ptr<PrimaryReplicator> p;
  {
    std::lock_guard l(mu_);
    p = primary_;
  }
  if (p) p->Stop();
}

void GroupController::Stop() {
  {
    std::lock_guard l(mu_);
    if (stopping_ && !worker_.joinable()) return;
    stopping_ = true;
    work_.clear();
  }
  work_cv_.notify_all();
  if (worker_.joinable()) worker_.join();
  std::lock_guard sw(switch_mu_);
  std::shared_ptr<PrimaryReplicator> p;
  std::vector<ReplicaGroup*> rs;
  {
    std::lock_guard l(mu_);
    p = primary_;
    for (auto& r : replicas_) rs.push_back(r.get());
  }
  if (p) p->Stop();
  for (ReplicaGroup* r : rs) r->Stop();
  runtime_->SetRecordsObserver(nullptr);
}

}  // namespace tvilling::node
