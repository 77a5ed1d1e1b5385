// coordination.cc: see coordination.h.
#include "agent/node/coordination.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <set>

namespace tvilling::node {
namespace {

using Kind = core::FailoverAction::Kind;

core::FailoverPolicy Policy(ops::FailoverPolicy p) {
  switch (p) {
    case ops::FailoverPolicy::kAutomatic:
      return core::FailoverPolicy::kAutomatic;
    case ops::FailoverPolicy::kManual:
      return core::FailoverPolicy::kManual;
    case ops::FailoverPolicy::kApprove:
      return core::FailoverPolicy::kApprove;
  }
  return core::FailoverPolicy::kManual;
}

constexpr core::Nanos kMsNs = 1'000'000;

}  // namespace

absl::StatusOr<std::unique_ptr<coordinator::Coordinator>> StartCoordination(
    const ops::Config& config, const std::vector<std::unique_ptr<GroupController>>& groups) {
  const ops::CoordinatorConfig& c = *config.coordinator;
  coordinator::CoordinatorOptions o;
  o.etcd.endpoints = c.endpoints;
  if (!c.ca.empty()) {
    o.etcd.tls = coordinator::EtcdTls{c.ca, c.cert, c.key, c.server_name};
  }
  o.etcd.call_timeout = coordinator::Millis(c.timeout_ms);
  o.etcd.attempt_timeout = coordinator::Millis(std::min<uint32_t>(1000, c.timeout_ms));
  o.prefix = c.prefix;
  o.site = config.agent.site;
  o.lease_ttl = coordinator::Millis(c.lease_ttl_ms);
  o.suspend_after = coordinator::Millis(c.suspend_after_ms);

  std::vector<coordinator::GroupBinding> bindings;
  for (size_t i = 0; i < config.groups.size(); ++i) {
    const ops::GroupConfig& g = config.groups[i];
    GroupController* ctl = groups[i].get();
    coordinator::GroupBinding b;
    core::FailoverOptions& f = b.failover;
    f.group = g.name;
    f.site = config.agent.site;
    std::set<std::string> sites{config.agent.site, g.primary};
    for (const ops::PeerConfig& p : g.peers) sites.insert(p.site);
    f.sites.assign(sites.begin(), sites.end());
    f.configured_primary = g.primary;
    f.witness = c.witness;
    f.policy = Policy(c.policy);
    f.lease_ttl = c.lease_ttl_ms * kMsNs;
    f.suspend_after = c.suspend_after_ms * kMsNs;
    f.max_lag_bytes = c.max_lag_bytes;
    f.max_lag_time = c.max_lag_ms * kMsNs;
    f.anti_flap = c.anti_flap_ms * kMsNs;
    f.settle = 500 * kMsNs;

    const bool no_failover = c.no_failover;
    b.site_report = [ctl, no_failover] {
      core::SiteReport r;
      r.no_failover = no_failover;
      v1::GroupStatus s;
      ctl->FillStatus(&s);
      r.durable_lsn = s.durable_lsn();
      r.consistent = s.consistent();
      return r;
    };
    b.primary_report = [ctl]() -> std::optional<core::PrimaryReport> {
      if (ctl->role() != GroupRole::kPrimary) return std::nullopt;
      v1::GroupStatus s;
      ctl->FillStatus(&s);
      if (s.role() != "primary") return std::nullopt;
      core::PrimaryReport r;
      r.last_lsn = s.last_lsn();
      for (const v1::PeerStatus& p : s.peers()) {
        r.peers[p.peer()] = core::PeerLag{p.durable_lsn(), p.lag_bytes(),
                                          static_cast<core::Nanos>(p.lag_seconds() * 1e9)};
      }
      return r;
    };
    b.take_sync_set = [ctl] { return ctl->TakeSyncSetToPublish(); };
    b.sync_set_published = [ctl](uint64_t epoch, const core::SyncSet& s, bool ok) {
      ctl->SyncSetPublished(epoch, s, ok);
    };
    const std::string group = g.name;
    // Runs under the coordinator's mutex: nothing here may block (a switch is queued on the
    // controller's worker; the fence acts at once).
    b.apply = [ctl, group](const core::FailoverAction& a) {
      switch (a.kind) {
        case Kind::kSuspendIo:
          ctl->CoordinatorSuspend(a.message);
          break;
        case Kind::kResumeIo:
          ctl->CoordinatorResume();
          break;
        case Kind::kPromote:
          spdlog::info("group {}: coordinator: this site holds the leader key (etcd epoch {})",
                       group, a.epoch);
          ctl->PostPromote(a.epoch, fmt::format("elected: holds the leader key in etcd"));
          break;
        case Kind::kDemote:
          spdlog::warn("group {}: coordinator: no longer primary: {}{}", group, a.message,
                       a.site.empty() ? "" : fmt::format(" (new primary {})", a.site));
          ctl->PostDemote(fmt::format("coordinator: {}", a.message));
          break;
        case Kind::kFollow:
          spdlog::info("group {}: coordinator: primary is {} (etcd epoch {})", group, a.site,
                       a.epoch);
          ctl->PostFollow(a.site);
          break;
        case Kind::kRefused:
          spdlog::warn("{}", a.message);
          break;
        case Kind::kPublishPending:
          spdlog::warn("group {}: coordinator: {}", group, a.message);
          break;
        default:
          spdlog::debug("group {}: coordinator: {} {}", group, core::ActionName(a.kind), a.message);
          break;
      }
    };
    bindings.push_back(std::move(b));
  }
  for (const ops::GroupConfig& g : config.groups) {
    if (g.peers.size() == 1 && c.witness.empty() && c.policy == ops::FailoverPolicy::kAutomatic) {
      spdlog::warn(
          "group {}: two sites and no coordinator.witness: automatic fail-over will be refused "
          "(neither site can tell a lost peer from a partition)",
          g.name);
    }
  }
  auto started = coordinator::Coordinator::Start(std::move(o), std::move(bindings));
  if (!started.ok()) return started;
  // A primary's sync set goes to etcd as soon as it is due (writes may wait for it). A primary
  // promoted before this is wired is published on the worker's next round (report_interval).
  coordinator::Coordinator* coord = started->get();
  for (const auto& ctl : groups) {
    ctl->SetSyncSetNotify([coord] { coord->SyncSetDue(); });
    ctl->SetPromotionFailedNotify(
        [coord, group = ctl->name()](uint64_t epoch, const std::string& why) {
          coord->PromotionFailed(group, epoch, why);
        });
  }
  return started;
}

}  // namespace tvilling::node
