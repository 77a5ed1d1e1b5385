// main.cc: tvillingd, the tvilling agent. Wires the config, the group-log store, the groups (log +
// volumes + applier) and the NBD frontend together, and runs until SIGTERM/SIGINT.
//
//   tvillingd --config FILE [--state-dir DIR] [--log-level L] [--log-format text|json]
//   tvillingd --config FILE --check-config     validate the config and exit
//   tvillingd --config FILE --verify-log       check every group's log (checksums, gaps) and exit
//
// Exit codes: 0 clean shutdown / check passed; 1 runtime failure (storage, corrupt log, listener);
// 2 usage or configuration error.
#include <absl/synchronization/mutex.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "agent/allocator.h"
#include "agent/nbd/frontend.h"
#include "agent/node/audit_log.h"
#include "agent/node/control_service.h"
#include "agent/node/coordination.h"
#include "agent/node/group_controller.h"
#include "agent/node/group_runtime.h"
#include "agent/node/replication.h"
#include "agent/node/replication_service.h"
#include "agent/node/verify_command.h"
#include "agent/ops/agent_metrics.h"
#include "agent/ops/config.h"
#include "agent/ops/logging.h"
#include "agent/ops/metrics.h"
#include "agent/ops/metrics_server.h"
#include "agent/ops/systemd.h"
#include "agent/transport/stream.h"
#include "storage/group_log.h"
#include "storage/thread_name.h"

#ifndef TVILLING_VERSION
#define TVILLING_VERSION "0.0.0"
#endif

namespace tvilling {
namespace {

constexpr int kExitRuntime = 1;
constexpr int kExitConfig = 2;

std::string Msg(const absl::Status& s) { return std::string(s.message()); }

// Holds an exclusive lock on <state_dir>/tvillingd.lock for the life of the process: two agents on
// the same state directory would corrupt each other's log and volumes.
class StateDirLock {
 public:
  absl::Status Acquire(const std::filesystem::path& state_dir) {
    const auto path = state_dir / "tvillingd.lock";
    fd_ = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd_ < 0) {
      return absl::FailedPreconditionError(
          fmt::format("cannot open lock file {}: {}", path.string(), strerror(errno)));
    }
    if (flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      return absl::FailedPreconditionError(
          fmt::format("state directory {} is in use by another tvillingd (lock {} is held)",
                      state_dir.string(), path.string()));
    }
    const std::string pid = std::to_string(getpid()) + "\n";
    if (ftruncate(fd_, 0) == 0) (void)!pwrite(fd_, pid.data(), pid.size(), 0);
    return absl::OkStatus();
  }
  ~StateDirLock() {
    if (fd_ >= 0) close(fd_);
  }

 private:
  int fd_ = -1;
};

storage::GroupLogOptions LogOptions(const ops::LogConfig& c) {
  storage::GroupLogOptions o;
  o.max_batch_bytes = c.max_batch_bytes;
  o.max_batch_records = c.max_batch_records;
  o.external_payload_min_bytes = c.external_payload_min_bytes;
  o.payload_writeback_bytes = c.writeback_bytes;
  o.retention.keep_bytes = c.retention_bytes;
  o.retention.keep_seconds = c.retention_seconds;
  o.retention.hard_cap_bytes = c.hard_cap_bytes;
  return o;
}

node::GroupRuntimeOptions GroupOptions(const ops::Config& config, const ops::GroupConfig& g) {
  node::GroupRuntimeOptions o;
  o.name = g.name;
  // A replica's volumes follow the primary's log; clients may only read them.
  o.exports_read_only = !g.IsPrimary(config.agent.site);
  o.log = LogOptions(config.log);
  o.checkpoint_interval_ms = config.log.checkpoint_interval_ms;
  o.checkpoint_bytes = config.log.checkpoint_bytes;
  o.checkpoint_chunk_bytes = config.log.checkpoint_chunk_bytes;
  o.writeback_bytes = config.log.writeback_bytes;
  for (const ops::VolumeConfig& v : g.volumes) {
    node::VolumeSpec spec;
    spec.name = v.name;
    spec.export_name = v.export_name;
    spec.volume.path = v.path;
    spec.volume.size_bytes = v.size_bytes;
    spec.volume.create = true;
    spec.volume.read_only = v.read_only;
    spec.volume.direct_io = v.direct_io;
    o.volumes.push_back(std::move(spec));
  }
  return o;
}

absl::StatusOr<std::unique_ptr<storage::LogStore>> OpenStore(const ops::Config& config) {
  storage::LogStoreOptions o;
  o.dir = config.log.dir;
  o.write_buffer_bytes = config.log.write_buffer_bytes;
  return storage::LogStore::Open(o);
}

int VerifyLogs(const ops::Config& config) {
  auto store = OpenStore(config);
  if (!store.ok()) {
    spdlog::error("{}", Msg(store.status()));
    return kExitRuntime;
  }
  int rc = 0;
  for (const ops::GroupConfig& g : config.groups) {
    auto log = (*store)->OpenGroup(g.name, LogOptions(config.log));
    if (!log.ok()) {
      spdlog::error("{}", Msg(log.status()));
      rc = kExitRuntime;
      continue;
    }
    const storage::GroupLogState s = (*log)->State();
    absl::Status st = (*log)->Verify();
    if (!st.ok()) {
      spdlog::error("group {}: log verification failed: {}", g.name, Msg(st));
      rc = kExitRuntime;
    } else {
      fmt::print("group {}: log OK: LSN {}..{} ({} bytes), applied LSN {}, epoch {}\n", g.name,
                 s.first_lsn, s.last_lsn, s.bytes, s.applied_lsn, s.current_epoch);
    }
  }
  return rc;
}

// Logs one line per group every `interval` while something changed: what an operator watches.
class StatusReporter {
 public:
  StatusReporter(boost::asio::io_context& io, std::chrono::seconds interval,
                 const std::vector<std::unique_ptr<node::GroupRuntime>>& groups,
                 const nbd::Frontend& frontend)
      : timer_(io), interval_(interval), groups_(groups), frontend_(frontend) {}
  void Start() {
    if (interval_.count() == 0) return;
    timer_.expires_after(interval_);
    timer_.async_wait([this](const boost::system::error_code& ec) {
      if (ec) return;
      Report();
      Start();
    });
  }
  void Stop() { timer_.cancel(); }

 private:
  void Report() {
    const nbd::FrontendStats& n = frontend_.stats();
    std::string summary = fmt::format("serving {} group(s)", groups_.size());
    for (const auto& g : groups_) {
      summary += fmt::format("; {} last LSN {}", g->name(), g->log().last_lsn());
    }
    ops::NotifyStatus(summary);
    for (const auto& g : groups_) {
      const storage::GroupLogState s = g->log().State();
      const node::GroupRuntimeStats r = g->Stats();
      if (s.last_lsn == last_reported_[g->name()]) continue;
      last_reported_[g->name()] = s.last_lsn;
      spdlog::info(
          "group {}: LSN last {} durable {} applied {} checkpointed {}; log holds LSN {}..{} ({} "
          "bytes); nbd: {} connection(s) so far, {} request(s), {} error(s), {} bytes written",
          g->name(), s.last_lsn, s.durable_lsn, r.applied_lsn, r.checkpointed_lsn, s.first_lsn,
          s.last_lsn, s.bytes, n.connections.load(), n.requests.load(), n.request_errors.load(),
          n.bytes_written.load());
    }
  }
  boost::asio::steady_timer timer_;
  const std::chrono::seconds interval_;
  const std::vector<std::unique_ptr<node::GroupRuntime>>& groups_;
  const nbd::Frontend& frontend_;
  std::map<std::string, uint64_t> last_reported_;
};

// SIGHUP: re-reads the config file and applies the peers' `rate_limit` to the running links
// (docs/operations.md, "systemd"). Every other change needs a restart; the file is checked in full
// first, and a broken file changes nothing.
void ReloadRateLimits(const std::filesystem::path& file,
                      const std::optional<std::filesystem::path>& state_dir,
                      const std::vector<std::unique_ptr<node::GroupController>>& controllers) {
  auto fresh = ops::LoadConfig(file, state_dir);
  if (!fresh.ok()) {
    spdlog::error("SIGHUP: {} not reloaded, the running settings stay: {}", file.string(),
                  Msg(fresh.status()));
    return;
  }
  size_t changed = 0;
  for (const auto& controller : controllers) {
    const std::string& group = controller->name();
    const ops::GroupConfig* now = nullptr;
    for (const auto& g : fresh->groups) {
      if (g.name == group) now = &g;
    }
    if (now == nullptr) {
      spdlog::warn("SIGHUP: group {} is gone from {}; removing a group needs a restart", group,
                   file.string());
      continue;
    }
    for (const ops::PeerConfig& p : now->peers) {
      const std::optional<uint64_t> was =
          controller->SetRateLimit(p.site, p.rate_limit_bytes_per_second);
      if (!was) {
        spdlog::warn("SIGHUP: group {}: peer {} is new; adding a peer needs a restart", group,
                     p.site);
      } else if (*was != p.rate_limit_bytes_per_second) {
        ++changed;
        spdlog::info("SIGHUP: group {} peer {}: rate_limit {} -> {} bytes/s (0 = none)", group,
                     p.site, *was, p.rate_limit_bytes_per_second);
      }
    }
  }
  if (changed == 0) spdlog::info("SIGHUP: no rate_limit changed in {}", file.string());
}

// A controlled switchover of one group from this site (its primary) to `req.to()`
// (docs/coordinator.md, "Switchover"): pause, drain, hand the leader key over, wait for the target
// to hold it. The demotion that follows (the coordinator's kDemote) fails the held writes.
absl::StatusOr<v1::SwitchoverReply> RunSwitchover(const ops::Config& config,
                                                  node::GroupController* c,
                                                  coordinator::Coordinator* coord,
                                                  const v1::SwitchoverRequest& req) {
  using Clock = std::chrono::steady_clock;
  const auto ms = [](Clock::duration d) {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
  };
  if (c == nullptr) {
    return absl::NotFoundError(
        fmt::format("group {} is not configured on site {}", req.group(), config.agent.site));
  }
  if (coord == nullptr) {
    return absl::FailedPreconditionError(
        "a switchover moves the etcd leader key: this agent has no [coordinator] (without one, "
        "tvillingctl demote here and tvillingctl promote on the target)");
  }
  const std::string& site = config.agent.site;
  if (c->role() != node::GroupRole::kPrimary || c->switching()) {
    return absl::FailedPreconditionError(
        fmt::format("site {} is not the primary of group {}: run the switchover on its primary",
                    site, c->name()));
  }
  if (req.to() == site) {
    return absl::FailedPreconditionError(fmt::format("site {} is already the primary", site));
  }
  const auto peer_of = [&](v1::PeerStatus* out) {
    v1::GroupStatus st;
    c->FillStatus(&st);
    for (const v1::PeerStatus& p : st.peers()) {
      if (p.peer() == req.to()) {
        *out = p;
        return true;
      }
    }
    return false;
  };
  v1::PeerStatus peer;
  if (!peer_of(&peer)) {
    return absl::FailedPreconditionError(
        fmt::format("{} is not a peer of group {}", req.to(), c->name()));
  }
  if (peer.link_state() != "streaming") {
    return absl::FailedPreconditionError(fmt::format(
        "the link to {} is {}, not streaming: it cannot catch up", req.to(), peer.link_state()));
  }
  const uint64_t epoch = c->epoch();
  const std::optional<core::LeaderView> leader = coord->Leader(c->name());
  if (!leader || !leader->present || leader->site != site || leader->epoch != epoch) {
    return absl::FailedPreconditionError(fmt::format(
        "site {} does not hold the leader key of group {} in epoch {}", site, c->name(), epoch));
  }
  const auto timeout = std::chrono::milliseconds(req.timeout_ms() ? req.timeout_ms() : 30000);
  const Clock::time_point t0 = Clock::now();
  c->Pause(fmt::format("switchover to {}: new writes held", req.to()));
  // The target must show it is alive after the pause: with nothing to drain, its durable LSN
  // alone would let the key go to a target that has hung (the group would then have no primary
  // until the hand-over expires). A heartbeat sent now is echoed within one round trip.
  c->HeartbeatNow();
  // Every write admitted before the pause is in the log: its last LSN is the target's goal.
  c->runtime().WaitFencedIdle();
  {
    std::promise<absl::Status> p;
    auto f = p.get_future();
    c->runtime().log().Sync([&p](absl::Status st) { p.set_value(st); });
    (void)f.get();
  }
  const uint64_t last = c->runtime().log().last_lsn();
  for (;;) {
    if (!peer_of(&peer)) peer.Clear();
    const bool answered =
        peer.heartbeat_echo_age_us() >= 0 &&
        std::chrono::microseconds(peer.heartbeat_echo_age_us()) <= Clock::now() - t0;
    if (peer.durable_lsn() >= last && answered) break;
    if (Clock::now() - t0 > timeout) {
      c->Unpause();
      // ABORTED (not FAILED_PRECONDITION): the switchover began and was rolled back, nothing
      // changed; `switchover --all-groups` stops the evacuation on it.
      return absl::AbortedError(fmt::format(
          "{} did not catch up within {} ms (its durable LSN {} of {}{}); rolled back: writes "
          "resumed on {} after a pause of {} ms, nothing changed",
          req.to(), timeout.count(), peer.durable_lsn(), last,
          answered ? "" : ", and it did not answer a heartbeat sent when writes were paused", site,
          ms(Clock::now() - t0)));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  const Clock::time_point drained = Clock::now();
  if (absl::Status st = coord->Handover(c->name(), epoch, req.to()); !st.ok()) {
    c->Unpause();
    return absl::FailedPreconditionError(fmt::format(
        "the hand-over of the leader key failed: {}; writes resumed on {}", Msg(st), site));
  }
  // The key is gone: this site's machine demotes it (the held writes fail, retryable) and the
  // target campaigns at once.
  const Clock::time_point deadline =
      Clock::now() + std::max<Clock::duration>(timeout, std::chrono::seconds(10));
  std::optional<core::LeaderView> now_leader;
  for (;;) {
    now_leader = coord->Leader(c->name());
    if (now_leader && now_leader->present && now_leader->site == req.to()) break;
    if (Clock::now() > deadline) {
      return absl::DeadlineExceededError(fmt::format(
          "the leader key was handed to {} but it has not taken it within {} ms; this site is a "
          "replica now and takes the key back as the last primary once the hand-over expires "
          "(2 x lease TTL)",
          req.to(), ms(Clock::now() - drained)));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  const Clock::time_point moved = Clock::now();
  v1::SwitchoverReply out;
  out.set_pause_ms(ms(moved - t0));
  out.set_drain_ms(ms(drained - t0));
  out.set_last_lsn(last);
  out.set_new_epoch(now_leader->epoch);
  out.set_message(fmt::format(
      "{} is the primary of group {} in epoch {} (the leader key's create revision); {} is its "
      "replica; LSN {} was durable at {} before the hand-over",
      req.to(), c->name(), now_leader->epoch, site, last, req.to()));
  return out;
}

// The allocator (agent/allocator.cc) and the kernel's transparent_hugepage mode, for reports of
// memory use or latency.
void LogMemorySettings() {
  std::string thp = "unknown";
  if (FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r")) {
    char buf[128] = {};
    if (std::fgets(buf, sizeof buf, f) != nullptr) {
      thp = buf;
      while (!thp.empty() && (thp.back() == '\n' || thp.back() == ' ')) thp.pop_back();
    }
    std::fclose(f);
  }
  spdlog::info("memory: {}; transparent huge pages {}", DescribeAllocator(), thp);
}

int Run(const ops::Config& config, const std::filesystem::path& config_file,
        const std::optional<std::filesystem::path>& state_dir_override,
        std::chrono::seconds status_interval) {
  std::error_code ec;
  std::filesystem::create_directories(config.agent.state_dir, ec);
  if (ec) {
    spdlog::error("cannot create state directory {}: {}", config.agent.state_dir.string(),
                  ec.message());
    return kExitRuntime;
  }
  StateDirLock lock;
  if (absl::Status st = lock.Acquire(config.agent.state_dir); !st.ok()) {
    spdlog::error("{}", Msg(st));
    return kExitRuntime;
  }
  for (const ops::GroupConfig& g : config.groups) {
    for (const ops::VolumeConfig& v : g.volumes) {
      std::filesystem::create_directories(v.path.parent_path(), ec);
    }
  }

  ops::NotifyStatus(fmt::format("opening the log store {}", config.log.dir.string()));
  auto store = OpenStore(config);
  if (!store.ok()) {
    spdlog::error("{}", Msg(store.status()));
    return kExitRuntime;
  }
  std::vector<std::unique_ptr<node::GroupRuntime>> groups;
  const auto started = std::chrono::steady_clock::now();
  for (const ops::GroupConfig& g : config.groups) {
    ops::NotifyStatus(fmt::format("opening group {} (replaying its log)", g.name));
    auto group = node::GroupRuntime::Open(**store, GroupOptions(config, g));
    if (!group.ok()) {
      spdlog::error("{}", Msg(group.status()));
      return kExitRuntime;
    }
    const auto s = (*group)->log().State();
    spdlog::info(
        "group {}: log LSN {}..{}, applied {}, epoch {}, {} volume(s), replayed {} record(s)",
        g.name, s.first_lsn, s.last_lsn, s.applied_lsn, s.current_epoch, g.volumes.size(),
        (*group)->Stats().replayed_records);
    groups.push_back(std::move(*group));
  }

  // Replication: the service first, then one controller per group, which owns the group's role
  // (primary or replica) and can switch it while the agent runs (node/group_controller.h).
  std::unique_ptr<node::ReplicationService> replication;
  if (config.HasPeers()) {
    auto svc = node::ReplicationService::Create(config);
    if (!svc.ok()) {
      spdlog::error("replication: {}", Msg(svc.status()));
      return kExitRuntime;
    }
    replication = std::move(*svc);
  }
  // The audit log of operator commands and role switches (etcd with a [coordinator], else a file).
  auto audit = node::AuditLog::Open(config);
  if (!audit.ok()) {
    spdlog::error("audit log: {}", Msg(audit.status()));
    return kExitRuntime;
  }
  std::vector<std::unique_ptr<node::GroupController>> controllers;
  for (size_t i = 0; i < config.groups.size(); ++i) {
    const ops::GroupConfig& g = config.groups[i];
    node::GroupControllerOptions co;
    co.site = config.agent.site;
    co.has_peers = !g.peers.empty();
    co.coordinated = config.coordinator.has_value();
    if (co.has_peers) co.primary = node::PrimaryOptionsFor(config, g);
    co.replica = node::ReplicaOptionsFor(config, g);
    co.on_switch = [a = audit->get(), group = g.name](const std::string& action, bool ok,
                                                      const std::string& detail) {
      v1::AuditRecord r;
      r.set_group(group);
      r.set_action(action);
      r.set_outcome(ok ? "ok" : "refused");
      r.set_detail(detail);
      a->RecordLater(std::move(r));
    };
    node::ReplicationService* svc = co.has_peers ? replication.get() : nullptr;
    controllers.push_back(
        std::make_unique<node::GroupController>(groups[i].get(), std::move(co), svc));
  }
  // Every site starts as a replica under a coordinator (the configured primary holds its writes
  // until etcd elects it); without one the config's primary is the primary.
  for (size_t i = 0; i < config.groups.size(); ++i) {
    const ops::GroupConfig& g = config.groups[i];
    const bool primary = g.IsPrimary(config.agent.site);
    absl::Status st;
    if (config.coordinator) {
      st = controllers[i]->Start(node::GroupRole::kReplica, /*await_election=*/primary);
    } else {
      st = controllers[i]->Start(primary ? node::GroupRole::kPrimary : node::GroupRole::kReplica);
    }
    if (!st.ok()) {
      spdlog::error("group {}: {}", g.name, Msg(st));
      return kExitRuntime;
    }
  }
  if (replication) {
    if (absl::Status st = replication->Start(); !st.ok()) {
      spdlog::error("replication: {}", Msg(st));
      return kExitRuntime;
    }
  }
  // The fail-over coordinator (docs/coordinator.md), before any export serves: a primary's
  // client I/O waits until etcd confirms it.
  std::unique_ptr<coordinator::Coordinator> coordinator;
  if (config.coordinator) {
    auto c = node::StartCoordination(config, controllers);
    if (!c.ok()) {
      spdlog::error("coordinator: {}", Msg(c.status()));
      return kExitRuntime;
    }
    coordinator = std::move(*c);
  }
  ops::NotifyStatus("starting listeners");
  // Online verify results, for status and metrics; the last of each peer survives restarts.
  node::VerifyRegistry verify_registry(config.agent.state_dir / "verify-results.pb");
  const auto fill_status = [&](v1::StatusReply* out) {
    out->mutable_agent()->set_site(config.agent.site);
    out->mutable_agent()->set_version(TVILLING_VERSION);
    out->mutable_agent()->set_uptime_s(static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - started)
            .count()));
    std::vector<coordinator::Coordinator::GroupView> views;
    if (coordinator) views = coordinator->Snapshot();
    for (const auto& c : controllers) {
      v1::GroupStatus* gs = out->add_groups();
      gs->set_name(c->name());
      c->FillStatus(gs);
      verify_registry.Fill(gs);
      for (const auto& v : views) {
        if (v.group != c->name()) continue;
        gs->set_coordinator_state(v.state);
        if (v.leader.present) {
          gs->set_leader_site(v.leader.site);
          gs->set_leader_epoch(v.leader.epoch);
        }
        gs->set_failover_refusal(v.last_refusal);
        gs->set_failover_paused(v.paused);
        if (v.sync_set) {
          gs->set_sync_set(core::DescribeSyncSet(v.sync_set->set));
          gs->set_sync_set_site(v.sync_set->site);
          gs->set_sync_set_epoch(v.sync_set->epoch);
          gs->set_sync_set_members(static_cast<uint32_t>(v.sync_set->set.members.size()));
        }
        gs->set_failover_pending(v.pending_plan);
        if (!v.pending_plan.empty() && !v.pending_loss.none()) {
          gs->set_failover_pending_loss_from_lsn(v.pending_loss.from_lsn);
          gs->set_failover_pending_loss_to_lsn(v.pending_loss.to_lsn);
          gs->set_failover_pending_loss_bytes(v.pending_loss.bytes);
          gs->set_failover_pending_loss_seconds(static_cast<double>(v.pending_loss.age) / 1e9);
        }
      }
    }
  };
  node::ControlHandlers handlers;
  handlers.status = fill_status;
  const auto find_group = [&](const std::string& name) -> node::GroupController* {
    for (auto& c : controllers) {
      if (c->name() == name) return c.get();
    }
    return nullptr;
  };
  // Every command is audited with its outcome; `run` answers it.
  const auto audited = [&](const std::string& action, const v1::RoleRequest& req,
                           const std::function<absl::StatusOr<v1::RoleReply>(
                               node::GroupController&, const std::string& who)>& run)
      -> absl::StatusOr<v1::RoleReply> {
    const std::string who =
        fmt::format("{} (uid {})", req.user().empty() ? "?" : req.user(), req.uid());
    node::GroupController* c = find_group(req.group());
    absl::StatusOr<v1::RoleReply> r =
        c == nullptr ? absl::NotFoundError(fmt::format("group {} is not configured on site {}",
                                                       req.group(), config.agent.site))
                     : run(*c, who);
    v1::AuditRecord rec;
    rec.set_group(req.group());
    rec.set_action(action);
    rec.set_user(req.user());
    rec.set_uid(req.uid());
    rec.set_outcome(r.ok() ? (r->message().rfind("requested", 0) == 0 ? "requested" : "ok")
                           : "refused");
    rec.set_detail(r.ok() ? r->message() : std::string(r.status().message()));
    spdlog::info("group {}: {} by {}: {}: {}", req.group(), action, who, rec.outcome(),
                 rec.detail());
    if (absl::Status st = (*audit)->Record(rec); !st.ok()) {
      spdlog::error("audit: {}", Msg(st));
      if (r.ok()) {
        r->set_message(r->message() + fmt::format(" (WARNING: not audited: {})", Msg(st)));
      }
    }
    return r;
  };
  const auto role_reply = [](node::GroupController& c, std::string message) {
    v1::RoleReply out;
    out.set_message(std::move(message));
    out.set_role(node::GroupRoleName(c.role()));
    out.set_epoch(c.epoch());
    return out;
  };
  // Under a coordinator an operator's command goes to the group's state machine: a refusal comes
  // back as a kRefused action.
  const auto command = [&](node::GroupController& c, const core::FailoverEvent& ev,
                           const std::string& requested) -> absl::StatusOr<v1::RoleReply> {
    auto actions = coordinator->Command(c.name(), ev);
    if (!actions.ok()) return actions.status();
    for (const core::FailoverAction& a : *actions) {
      if (a.kind == core::FailoverAction::Kind::kRefused) {
        return absl::FailedPreconditionError(a.message);
      }
    }
    return role_reply(c, requested);
  };
  handlers.promote = [&](const v1::RoleRequest& req) {
    return audited(
        "promote", req,
        [&](node::GroupController& c, const std::string& who) -> absl::StatusOr<v1::RoleReply> {
          if (coordinator) {
            return command(
                c, core::EvPromote{who},
                fmt::format("requested: site {} campaigns for the leader key of group {} "
                            "(tvillingctl status shows when it is primary)",
                            config.agent.site, c.name()));
          }
          if (absl::Status st = c.Promote(0, fmt::format("tvillingctl promote by {}", who));
              !st.ok()) {
            return st.code() == absl::StatusCode::kFailedPrecondition
                       ? st
                       : absl::FailedPreconditionError(st.message());
          }
          return role_reply(c, fmt::format("site {} is the primary of group {} in epoch {}",
                                           config.agent.site, c.name(), c.epoch()));
        });
  };
  handlers.demote = [&](const v1::RoleRequest& req) {
    return audited(
        "demote", req,
        [&](node::GroupController& c, const std::string& who) -> absl::StatusOr<v1::RoleReply> {
          if (coordinator) {
            return absl::FailedPreconditionError(fmt::format(
                "group {} is coordinated by etcd: the leader key decides the primary; use "
                "tvillingctl switchover on the primary (demote is for groups without "
                "[coordinator])",
                c.name()));
          }
          if (absl::Status st = c.Demote(fmt::format("tvillingctl demote by {}", who)); !st.ok()) {
            return absl::FailedPreconditionError(st.message());
          }
          return role_reply(
              c, fmt::format("site {} is a replica of group {}", config.agent.site, c.name()));
        });
  };
  handlers.approve = [&](const v1::RoleRequest& req) {
    return audited(
        "approve", req,
        [&](node::GroupController& c, const std::string& who) -> absl::StatusOr<v1::RoleReply> {
          if (!coordinator) {
            return absl::FailedPreconditionError(
                "this agent has no [coordinator]: there is no fail-over to approve");
          }
          const std::string site = req.site().empty() ? config.agent.site : req.site();
          if (site != config.agent.site) {
            return absl::FailedPreconditionError(
                fmt::format("approve the promotion of {} on {}'s agent (this is {})", site, site,
                            config.agent.site));
          }
          // The reply and the audit record name the plan that was approved, with its loss bound.
          std::string plan;
          for (const auto& v : coordinator->Snapshot()) {
            if (v.group == c.name()) plan = v.pending_plan;
          }
          return command(
              c, core::EvApprove{site, who},
              fmt::format("requested: site {} campaigns for the leader key of group {}{}", site,
                          c.name(), plan.empty() ? "" : fmt::format(" (approved: {})", plan)));
        });
  };
  const auto set_paused = [&](const v1::RoleRequest& req, bool paused) {
    return audited(
        paused ? "pause" : "resume", req,
        [&](node::GroupController& c, const std::string& who) -> absl::StatusOr<v1::RoleReply> {
          if (!coordinator) {
            return absl::FailedPreconditionError(
                "this agent has no [coordinator]: there is no automatic fail-over to pause");
          }
          const auto now = std::chrono::system_clock::now();
          const std::string value = fmt::format(
              "by {} at {} ({} ms since 1970)", who, config.agent.site,
              std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch())
                  .count());
          if (absl::Status st = coordinator->SetPaused(c.name(), paused, value); !st.ok()) {
            return absl::FailedPreconditionError(
                fmt::format("etcd did not take the change: {}", Msg(st)));
          }
          return role_reply(
              c, paused ? fmt::format("automatic fail-over of group {} is paused at every site "
                                      "(switchover, promote and approve still work)",
                                      c.name())
                        : fmt::format("automatic fail-over of group {} is resumed", c.name()));
        });
  };
  handlers.pause = [&](const v1::RoleRequest& req) { return set_paused(req, true); };
  handlers.resume = [&](const v1::RoleRequest& req) { return set_paused(req, false); };
  handlers.history = [&](const v1::HistoryRequest& req) {
    return (*audit)->List(req.group(), req.limit());
  };
  handlers.switchover =
      [&](const v1::SwitchoverRequest& req) -> absl::StatusOr<v1::SwitchoverReply> {
    const std::string who =
        fmt::format("{} (uid {})", req.user().empty() ? "?" : req.user(), req.uid());
    absl::StatusOr<v1::SwitchoverReply> r =
        RunSwitchover(config, find_group(req.group()), coordinator.get(), req);
    v1::AuditRecord rec;
    rec.set_group(req.group());
    rec.set_action("switchover");
    rec.set_user(req.user());
    rec.set_uid(req.uid());
    rec.set_outcome(r.ok() ? "ok" : "refused");
    rec.set_detail(fmt::format("to {}{}: {}", req.to(),
                               req.context().empty() ? "" : " (" + req.context() + ")",
                               r.ok() ? r->message() : std::string(r.status().message())));
    spdlog::info("group {}: switchover by {}: {}: {}", req.group(), who, rec.outcome(),
                 rec.detail());
    if (absl::Status st = (*audit)->Record(rec); !st.ok()) spdlog::error("audit: {}", Msg(st));
    return r;
  };
  handlers.verify = [&](const v1::VerifyRequest& req,
                        const std::function<bool(const v1::VerifyProgress&)>& send) {
    node::VerifyCommandContext vc;
    vc.config = &config;
    vc.controller = find_group(req.group());
    vc.peer = replication ? replication->verify_peer() : nullptr;
    vc.registry = &verify_registry;
    vc.audit = audit->get();
    return node::ServeVerify(vc, req, send);
  };
  auto control = node::ControlServer::Start(config.control.unix_socket, std::move(handlers));
  if (!control.ok()) {
    spdlog::error("{}", Msg(control.status()));
    return kExitRuntime;
  }

  boost::asio::io_context io(static_cast<int>(config.nbd.threads));
  // Signal handlers go in before the listeners (and before READY): a SIGTERM that arrives right
  // after start must take the clean path, not the default action.
  boost::asio::signal_set signals(io, SIGINT, SIGTERM);
  // SIGHUP (systemctl reload): re-read the TLS certificates and the peers' rate caps; open
  // streams stay.
  boost::asio::signal_set reload_signals(io, SIGHUP);
  std::function<void()> wait_reload = [&] {
    reload_signals.async_wait([&](const boost::system::error_code& err, int) {
      if (err) return;
      ops::Notify("RELOADING=1\nSTATUS=reloading the TLS certificates and rate caps");
      if (!replication || !config.tls.enabled()) {
        spdlog::info("SIGHUP: no TLS certificates to reload (no peers or tls.insecure)");
      } else if (absl::Status st = replication->ReloadTls(); !st.ok()) {
        spdlog::error("SIGHUP: TLS certificates not reloaded, the current ones stay: {}", Msg(st));
      } else {
        spdlog::info(
            "SIGHUP: TLS certificates reloaded from {}; new handshakes use them, open streams "
            "continue",
            config.tls.cert.string());
      }
      if (replication) ReloadRateLimits(config_file, state_dir_override, controllers);
      ops::Notify(fmt::format("READY=1\nSTATUS=serving {} group(s) as site {}", groups.size(),
                              config.agent.site));
      wait_reload();
    });
  };
  wait_reload();

  nbd::FrontendOptions so;
  for (const ops::ListenAddress& a : config.nbd.listen) so.tcp_listen.push_back({a.host, a.port});
  for (const auto& p : config.nbd.unix_sockets) so.unix_sockets.push_back(p.string());
  so.max_inflight_requests = config.nbd.max_inflight_requests;
  so.max_inflight_bytes = config.nbd.max_inflight_bytes;
  // A connection's burst of WRITEs becomes one batch of the log, written by the connection's
  // thread when the log is idle (storage::AppendPlug).
  so.burst_begin = &storage::AppendPlug::Engage;
  so.burst_end = &storage::AppendPlug::Release;
  nbd::Frontend server(io, so);
  // Client I/O is counted per volume by a decorator around each export (for /metrics).
  std::map<std::string, std::vector<std::pair<std::string, std::shared_ptr<ops::VolumeIoMetrics>>>>
      io_metrics;
  for (size_t i = 0; i < groups.size(); ++i) {
    const auto& exports = groups[i]->exports();
    for (size_t v = 0; v < exports.size(); ++v) {
      auto m = std::make_shared<ops::VolumeIoMetrics>();
      const std::string& volume = v < config.groups[i].volumes.size()
                                      ? config.groups[i].volumes[v].name
                                      : exports[v]->info().name;
      io_metrics[groups[i]->name()].emplace_back(volume, m);
      server.AddExport(std::make_shared<ops::MeteredExport>(exports[v], std::move(m)));
    }
  }
  if (absl::Status st = server.Start(); !st.ok()) {
    spdlog::error("nbd: {}", Msg(st));
    return kExitRuntime;
  }
  std::unique_ptr<ops::MetricsServer> metrics;
  if (config.metrics.listen) {
    auto m = ops::MetricsServer::Start(
        config.metrics.listen->host, config.metrics.listen->port, [&]() -> std::string {
          ops::Exposition out;
          v1::StatusReply status;
          fill_status(&status);
          ops::AppendStatusMetrics(status, out);
          for (const auto& g : groups) {
            ops::GroupMetricsSource src;
            src.name = g->name();
            src.log = g->log().State();
            src.hard_cap_bytes = config.log.hard_cap_bytes;
            src.fsync = g->log().fsync_latency().Read();
            const storage::GroupLog::Counters& c = g->log().counters();
            src.appended_records = c.records.load(std::memory_order_relaxed);
            src.appended_bytes = c.bytes.load(std::memory_order_relaxed);
            src.commits = c.commits.load(std::memory_order_relaxed);
            const node::GroupRuntimeStats r = g->Stats();
            src.checkpoints = r.checkpoints;
            src.replayed_records = r.replayed_records;
            if (auto it = io_metrics.find(g->name()); it != io_metrics.end()) {
              for (const auto& [volume, counters] : it->second) {
                src.volumes.emplace_back(volume, counters);
              }
            }
            ops::AppendGroupMetrics(config.agent.site, src, out);
          }
          ops::AppendNbdMetrics(config.agent.site, server.stats(), out);
          return out.Render();
        });
    if (!m.ok()) {
      spdlog::error("{}", Msg(m.status()));
      return kExitRuntime;
    }
    metrics = std::move(*m);
    spdlog::info("metrics: serving http://{}/metrics", config.metrics.listen->ToString());
  }
  StatusReporter status(io, status_interval, groups, server);
  status.Start();
  // Gives the pages the allocator keeps back to the kernel once tvillingd is quiet, but one
  // memtable's worth (agent/allocator.h).
  MemoryReleaser releaser(
      [&groups] {
        uint64_t records = 0;
        for (const auto& g : groups) {
          records += g->log().counters().records.load(std::memory_order_relaxed);
        }
        return records;
      },
      MemoryKeep{config.log.write_buffer_bytes,
                 storage::MemtableBlockBytes(config.log.write_buffer_bytes)});
  releaser.Start();
  // Writes waiting for a sync peer that does not answer would hold the drain forever: after a
  // grace period the replicators fail them (the client sees an error, as with a lost site).
  std::mutex drain_mu;
  std::condition_variable drain_cv;
  bool drained = false;
  std::thread drain_watch;
  signals.async_wait([&](const boost::system::error_code& err, int signo) {
    if (err) return;
    spdlog::info("signal {}: shutting down (answering in-flight requests, flushing the log)",
                 signo);
    ops::Notify(fmt::format("STOPPING=1\nSTATUS=signal {}: draining in-flight requests", signo));
    reload_signals.cancel();
    status.Stop();
    releaser.Stop();
    server.Stop();
    // Writes held by a suspended primary (lease not renewed) cannot complete now.
    for (auto& g : groups) g->FailHeldIo(absl::UnavailableError("tvillingd is shutting down"));
    drain_watch = std::thread([&] {
      std::unique_lock l(drain_mu);
      if (drain_cv.wait_for(l, std::chrono::seconds(10), [&] { return drained; })) return;
      spdlog::warn("in-flight writes still wait for sync peers after 10 s; failing them");
      for (auto& c : controllers) c->StopPrimary();
      for (auto& g : groups) g->FailHeldIo(absl::UnavailableError("tvillingd is shutting down"));
    });
  });
  spdlog::info("tvillingd {} site {} serving {} group(s); state in {}", TVILLING_VERSION,
               config.agent.site, groups.size(), config.agent.state_dir.string());
  LogMemorySettings();

  // Every listener accepts and every log is replayed: only now is the agent ready.
  ops::Notify(fmt::format("READY=1\nSTATUS=serving {} group(s) as site {}", groups.size(),
                          config.agent.site));
  std::unique_ptr<ops::Watchdog> watchdog;
  if (auto interval = ops::WatchdogInterval()) {
    std::vector<ops::Watchdog::Loop> loops = {{"nbd", &io}};
    if (metrics) loops.push_back({"metrics", &metrics->io()});
    watchdog = std::make_unique<ops::Watchdog>(std::move(loops), *interval,
                                               [] { ops::Notify("WATCHDOG=1"); });
    watchdog->Start();
    spdlog::info("systemd watchdog: {} ms; pinging every {} ms while the event loops answer",
                 interval->count() / 1000, interval->count() / 2000);
  }

  std::vector<std::thread> threads;
  for (uint32_t i = 1; i < config.nbd.threads; ++i) {
    threads.emplace_back([&io] {
      storage::SetThreadName("tvl-nbd");
      io.run();
    });
  }
  io.run();
  for (auto& t : threads) t.join();
  // The NBD loop has stopped on purpose (STOPPING=1 was sent); the drain is bounded by the
  // timeouts below, within the unit's TimeoutStopSec.
  if (watchdog) watchdog->Stop();
  {
    std::lock_guard l(drain_mu);
    drained = true;
  }
  drain_cv.notify_all();
  if (drain_watch.joinable()) drain_watch.join();

  if (metrics) metrics->Stop();
  (*control)->Shutdown();
  if (coordinator) coordinator->Stop();
  for (auto& c : controllers) c->StopPrimary();
  if (replication) replication->Shutdown();
  for (auto& c : controllers) c->Stop();
  controllers.clear();
  int rc = 0;
  for (auto& g : groups) {
    if (absl::Status st = g->Stop(); !st.ok()) {
      spdlog::error("group {}: shutdown: {}", g->name(), Msg(st));
      rc = kExitRuntime;
    }
  }
  groups.clear();
  store->reset();
  // Closed replication streams let go of themselves on gRPC's schedule; their thread must be gone
  // before static destructors run.
  if (!transport::ClientStream::WaitAllReleased(std::chrono::seconds(5))) {
    spdlog::warn("replication: client streams still open at exit after 5 s");
  }
  spdlog::info("tvillingd stopped");
  return rc;
}

}  // namespace
}  // namespace tvilling

int main(int argc, char** argv) {
  using namespace tvilling;
  // gRPC's `poll` engine: a thread waiting on a completion queue polls the sockets of that queue's
  // calls itself, so the replication streams' threads read their messages without a hand-off
  // from gRPC's own pollers (agent/transport/stream.cc; with the default `epoll1` engine any
  // polling thread in the process may read them). Read once, at gRPC's initialisation, which has
  // not happened yet; an operator's own setting wins.
  setenv("GRPC_POLL_STRATEGY", "poll", /*overwrite=*/0);
  // Debian builds Abseil without NDEBUG, which turns on absl::Mutex's deadlock detection: every
  // Lock/Unlock of gRPC's mutexes then updates a process-wide lock graph (about 1.5 % of a
  // replicating pair's CPU samples, docs/benchmarks.md). Release builds of Abseil have it off.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  // jemalloc's oversize arena keeps the memtable's pages (agent/allocator.cc).
  ConfigureAllocator();
  CLI::App app{"tvillingd: mirrors block volumes between datacenters"};
  std::string config_file, state_dir, log_level = "info", log_format = "text";
  bool check_config = false, verify_log = false, version = false;
  unsigned status_seconds = 10;
  app.add_option("-c,--config", config_file, "the TOML config file");
  app.add_option("--state-dir", state_dir,
                 "where the agent keeps its data (overrides agent.state_dir)");
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or critical");
  app.add_option("--log-format", log_format, "text or json");
  app.add_flag("--check-config", check_config, "validate the config and exit");
  app.add_flag("--verify-log", verify_log, "verify every group's log (checksums, gaps) and exit");
  app.add_flag("--version", version, "print the version and exit");
  app.add_option("--status-interval", status_seconds,
                 "seconds between status lines in the log while writes happen (0 = none)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (version) {
    fmt::print("tvillingd {}\n", TVILLING_VERSION);
    return 0;
  }
  auto level = ops::ParseLogLevel(log_level);
  auto format = ops::ParseLogFormat(log_format);
  if (!level.ok() || !format.ok()) {
    fmt::print(stderr, "tvillingd: {}\n",
               std::string((level.ok() ? format.status() : level.status()).message()));
    return 2;
  }
  ops::SetupLogging({.level = *level, .format = *format});
  if (config_file.empty()) {
    fmt::print(stderr, "tvillingd: --config FILE is required\n");
    return 2;
  }
  std::optional<std::filesystem::path> sd;
  if (!state_dir.empty()) sd = state_dir;
  auto config = ops::LoadConfig(config_file, sd);
  if (!config.ok()) {
    fmt::print(stderr, "tvillingd: invalid configuration:\n{}\n",
               std::string(config.status().message()));
    return 2;
  }
  if (check_config) {
    if (absl::Status st = node::CheckTls(*config); !st.ok()) {
      fmt::print(stderr, "tvillingd: {}: {}\n", config_file, std::string(st.message()));
      return 2;
    }
    fmt::print("{}: OK ({} group(s))\n", config_file, config->groups.size());
    return 0;
  }
  if (verify_log) return VerifyLogs(*config);
  return Run(*config, config_file, sd, std::chrono::seconds(status_seconds));
}
