// coordinator.cc: see coordinator.h and docs/coordinator.md.
#include "agent/coordinator/coordinator.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <charconv>
#include <map>
#include <sstream>

namespace tvilling::coordinator {
namespace {

using Clock = std::chrono::steady_clock;
using K = core::FailoverAction::Kind;

// "k=v k=v ..." -> map (values without spaces).
std::map<std::string, std::string> Fields(const std::string& value) {
  std::map<std::string, std::string> out;
  std::istringstream in(value);
  std::string tok;
  while (in >> tok) {
    const size_t eq = tok.find('=');
    if (eq == std::string::npos) continue;
    out[tok.substr(0, eq)] = tok.substr(eq + 1);
  }
  return out;
}

template <class T>
bool ParseNum(const std::string& s, T* out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && p == s.data() + s.size();
}

}  // namespace

std::string LeaderKey(const std::string& prefix, const std::string& group) {
  return prefix + "/groups/" + group + "/leader";
}
std::string SitesPrefix(const std::string& prefix, const std::string& group) {
  return prefix + "/groups/" + group + "/sites/";
}
std::string PrimaryKey(const std::string& prefix, const std::string& group) {
  return prefix + "/groups/" + group + "/primary";
}
std::string PendingKey(const std::string& prefix, const std::string& group) {
  return prefix + "/groups/" + group + "/pending";
}

std::string SyncKey(const std::string& prefix, const std::string& group) {
  return prefix + "/groups/" + group + "/sync";
}

std::string EncodeSyncSet(const core::PublishedSyncSet& s) {
  return fmt::format("site={} epoch={} members={} floor={}", s.site, s.epoch,
                     fmt::join(s.set.members, ","), s.set.floor_lsn);
}

std::optional<core::PublishedSyncSet> DecodeSyncSet(const std::string& value) {
  auto f = Fields(value);
  core::PublishedSyncSet s;
  s.site = f["site"];
  if (s.site.empty() || !ParseNum(f["epoch"], &s.epoch) ||
      !ParseNum(f["floor"], &s.set.floor_lsn) || f.count("members") == 0) {
    return std::nullopt;
  }
  std::istringstream in(f["members"]);
  std::string m;
  while (std::getline(in, m, ',')) {
    if (m.empty()) return std::nullopt;
    s.set.members.push_back(m);
  }
  if (!std::is_sorted(s.set.members.begin(), s.set.members.end())) return std::nullopt;
  return s;
}

std::string EncodeSiteReport(const core::SiteReport& r) {
  return fmt::format("durable={} consistent={} no_failover={} promotion_failed={}", r.durable_lsn,
                     r.consistent ? 1 : 0, r.no_failover ? 1 : 0, r.promotion_failed ? 1 : 0);
}

std::optional<core::SiteReport> DecodeSiteReport(const std::string& value) {
  auto f = Fields(value);
  core::SiteReport r;
  int consistent = 0, no_failover = 0;
  if (!ParseNum(f["durable"], &r.durable_lsn) || !ParseNum(f["consistent"], &consistent) ||
      !ParseNum(f["no_failover"], &no_failover)) {
    return std::nullopt;
  }
  r.consistent = consistent != 0;
  r.no_failover = no_failover != 0;
  // Added later: an older agent's report has no promotion_failed.
  int promotion_failed = 0;
  if (f.count("promotion_failed") != 0 && !ParseNum(f["promotion_failed"], &promotion_failed)) {
    return std::nullopt;
  }
  r.promotion_failed = promotion_failed != 0;
  return r;
}

// site=a epoch=7 last=100 peer.b=95,5000,2000 (durable LSN, bytes, age in ms)
std::string EncodePrimaryReport(const core::PrimaryReport& r) {
  std::string s = fmt::format("site={} epoch={} last={}", r.site, r.epoch, r.last_lsn);
  for (const auto& [site, lag] : r.peers) {
    s += fmt::format(" peer.{}={},{},{}", site, lag.lsn, lag.bytes, lag.age / 1'000'000);
  }
  return s;
}

std::optional<core::PrimaryReport> DecodePrimaryReport(const std::string& value) {
  auto f = Fields(value);
  core::PrimaryReport r;
  r.site = f["site"];
  if (r.site.empty() || !ParseNum(f["epoch"], &r.epoch) || !ParseNum(f["last"], &r.last_lsn)) {
    return std::nullopt;
  }
  for (const auto& [k, v] : f) {
    if (k.rfind("peer.", 0) != 0) continue;
    core::PeerLag lag;
    const size_t c1 = v.find(','), c2 = v.find(',', c1 == std::string::npos ? c1 : c1 + 1);
    if (c1 == std::string::npos || c2 == std::string::npos) return std::nullopt;
    int64_t age_ms = 0;
    if (!ParseNum(v.substr(0, c1), &lag.lsn) ||
        !ParseNum(v.substr(c1 + 1, c2 - c1 - 1), &lag.bytes) ||
        !ParseNum(v.substr(c2 + 1), &age_ms)) {
      return std::nullopt;
    }
    lag.age = age_ms * 1'000'000;
    r.peers[k.substr(5)] = lag;
  }
  return r;
}

Coordinator::Coordinator(CoordinatorOptions options, std::vector<GroupBinding> groups)
    : options_(std::move(options)), bindings_(std::move(groups)) {}

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Start(CoordinatorOptions options,
                                                                std::vector<GroupBinding> groups) {
  auto client = EtcdClient::Create(options.etcd);
  if (!client.ok()) return client.status();
  std::unique_ptr<Coordinator> c(new Coordinator(std::move(options), std::move(groups)));
  c->client_ = std::move(*client);
  for (const GroupBinding& b : c->bindings_) {
    c->machines_.push_back(std::make_unique<core::FailoverMachine>(b.failover));
  }
  {
    std::lock_guard l(c->mu_);
    c->Enqueue({Work::Kind::kNewSession, 0, {}});
  }
  c->worker_ = std::thread([p = c.get()] { p->WorkerLoop(); });
  c->ticker_ = std::thread([p = c.get()] { p->TickerLoop(); });
  return c;
}

Coordinator::~Coordinator() { Stop(); }

void Coordinator::Stop() {
  {
    std::lock_guard l(mu_);
    if (stopping_ && !worker_.joinable() && !ticker_.joinable()) return;
    stopping_ = true;
  }
  cv_.notify_all();
  if (ticker_.joinable()) ticker_.join();
  if (worker_.joinable()) worker_.join();
  if (watcher_) watcher_->Stop();
  if (keeper_) keeper_->Stop();
  int64_t session = 0;
  {
    std::lock_guard l(mu_);
    session = session_;
    session_ = 0;
  }
  if (session != 0) (void)client_->LeaseRevoke(session);
}

core::Nanos Coordinator::Now() const {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

std::vector<Coordinator::GroupView> Coordinator::Snapshot() const {
  std::lock_guard l(mu_);
  std::vector<GroupView> out;
  for (const auto& m : machines_) {
    out.push_back({m->options().group, core::FailoverMachine::StateName(m->state()), m->epoch(),
                   m->leader(), m->last_refusal(), m->paused(), m->sync_set(), m->pending_plan(),
                   m->pending_loss()});
  }
  return out;
}

void Coordinator::Enqueue(Work w) {
  if (w.kind == Work::Kind::kNewSession) {
    if (session_requested_) return;
    session_requested_ = true;
  }
  work_.push_back(std::move(w));
  cv_.notify_all();
}

std::string HandoverKey(const std::string& prefix, const std::string& group) {
  return fmt::format("{}/groups/{}/handover", prefix, group);
}

std::string PausedKey(const std::string& prefix, const std::string& group) {
  return fmt::format("{}/groups/{}/paused", prefix, group);
}

absl::Status Coordinator::SetPaused(const std::string& group, bool paused, const std::string& who) {
  bool known = false;
  for (const GroupBinding& b : bindings_) known |= b.failover.group == group;
  if (!known) {
    return absl::NotFoundError(fmt::format("group {} is not coordinated on this site", group));
  }
  const std::string key = PausedKey(options_.prefix, group);
  absl::StatusOr<int64_t> r = paused ? client_->Put(key, who) : client_->DeleteRange(key);
  if (!r.ok()) return absl::UnavailableError(std::string(r.status().message()));
  return absl::OkStatus();
}

absl::Status Coordinator::Handover(const std::string& group, uint64_t epoch,
                                   const std::string& to) {
  size_t i = bindings_.size();
  for (size_t j = 0; j < bindings_.size(); ++j) {
    if (bindings_[j].failover.group == group) i = j;
  }
  if (i == bindings_.size()) {
    return absl::NotFoundError(fmt::format("group {} is not coordinated on this site", group));
  }
  {
    // Our own machine first: when the key goes, it must not take it back as the last primary.
    std::lock_guard l(mu_);
    HandleLocked(i, core::EvHandover{to});
  }
  const std::string leader = LeaderKey(options_.prefix, group);
  auto r = client_->Txn(
      {Compare::CreateRevision(leader, Compare::Result::kEqual, static_cast<int64_t>(epoch)),
       Compare::Value(leader, Compare::Result::kEqual, options_.site)},
      {TxnOp::Delete(leader), TxnOp::Put(HandoverKey(options_.prefix, group), to)}, {});
  if (!r.ok()) return absl::UnavailableError(std::string(r.status().message()));
  if (!r->succeeded) {
    return absl::FailedPreconditionError(fmt::format(
        "group {}: the leader key is not {}'s in epoch {} any more", group, options_.site, epoch));
  }
  return absl::OkStatus();
}

void Coordinator::PromotionFailed(const std::string& group, uint64_t epoch,
                                  const std::string& why) {
  std::lock_guard l(mu_);
  for (size_t i = 0; i < bindings_.size(); ++i) {
    if (bindings_[i].failover.group == group) HandleLocked(i, core::EvPromotionFailed{epoch, why});
  }
}

void Coordinator::Resign(size_t i, uint64_t epoch) {
  const std::string& group = bindings_[i].failover.group;
  const std::string leader = LeaderKey(options_.prefix, group);
  // Only our key in that epoch: never one another site (or a later campaign of ours) holds.
  auto r = client_->Txn(
      {Compare::CreateRevision(leader, Compare::Result::kEqual, static_cast<int64_t>(epoch)),
       Compare::Value(leader, Compare::Result::kEqual, options_.site)},
      {TxnOp::Delete(leader)}, {});
  if (!r.ok()) {
    spdlog::warn(
        "group {}: coordinator: resigning the leader key (epoch {}) failed, trying again: {}",
        group, epoch, std::string(r.status().message()));
  } else if (r->succeeded) {
    spdlog::warn("group {}: coordinator: resigned the leader key (epoch {}): the promotion failed",
                 group, epoch);
  }
}

std::optional<core::LeaderView> Coordinator::Leader(const std::string& group) const {
  std::lock_guard l(mu_);
  for (const auto& m : machines_) {
    if (m->options().group == group) return m->leader();
  }
  return std::nullopt;
}

absl::StatusOr<std::vector<core::FailoverAction>> Coordinator::Command(
    const std::string& group, const core::FailoverEvent& event) {
  std::lock_guard l(mu_);
  for (size_t i = 0; i < bindings_.size(); ++i) {
    if (bindings_[i].failover.group == group) return HandleLocked(i, event);
  }
  return absl::NotFoundError(fmt::format("group {} is not coordinated on this site", group));
}

std::vector<core::FailoverAction> Coordinator::HandleLocked(size_t i,
                                                            const core::FailoverEvent& event) {
  std::vector<core::FailoverAction> actions = machines_[i]->Handle(Now(), event);
  for (const core::FailoverAction& a : actions) {
    switch (a.kind) {
      case K::kCampaign:
        Enqueue({Work::Kind::kCampaign, i, {}});
        break;
      case K::kReadLeader:
        Enqueue({Work::Kind::kReadLeader, i, {}});
        break;
      case K::kNewSession:
        session_ = 0;
        Enqueue({Work::Kind::kNewSession, i, {}});
        break;
      case K::kPublishPending:
        Enqueue({Work::Kind::kPublishPending, i, a.message});
        break;
      case K::kClearPending:
        Enqueue({Work::Kind::kClearPending, i, {}});
        break;
      case K::kResign:
        Enqueue({Work::Kind::kResign, i, a.message, a.epoch});
        break;
      default:
        break;
    }
    if (bindings_[i].apply) bindings_[i].apply(a);
  }
  return actions;
}

void Coordinator::HandleAllLocked(const core::FailoverEvent& event) {
  for (size_t i = 0; i < machines_.size(); ++i) HandleLocked(i, event);
}

void Coordinator::TickerLoop() {
  std::unique_lock l(mu_);
  while (!stopping_) {
    HandleAllLocked(core::EvTick{});
    cv_.wait_for(l, options_.tick, [&] { return stopping_; });
  }
}

void Coordinator::WorkerLoop() {
  auto next_reports = Clock::now();
  // A leader key that vanished asks for a read of the site reports right at the end of the settle
  // time: the candidates decide on reports read after it (core::FailoverMachine), and waiting for
  // the periodic read added up to a report interval to every fail-over. A periodic read that
  // falls inside the settle time does not replace it.
  constexpr auto kNone = Clock::time_point::max();
  auto early = kNone;
  while (true) {
    Work w;
    bool have = false;
    bool publish = false;
    {
      std::unique_lock l(mu_);
      if (reports_early_ && *reports_early_ < early) early = *reports_early_;
      reports_early_.reset();
      const auto deadline = std::min(next_reports, early);
      cv_.wait_until(l, deadline, [&] {
        return stopping_ || !work_.empty() || publish_now_ || sync_set_due_ ||
               reports_early_.has_value();
      });
      if (stopping_) return;
      publish = std::exchange(publish_now_, false);
      if (!work_.empty()) {
        w = std::move(work_.front());
        work_.pop_front();
        have = true;
      }
    }
    if (have) {
      switch (w.kind) {
        case Work::Kind::kNewSession:
          NewSession();
          break;
        case Work::Kind::kCampaign:
          Campaign(w.group);
          break;
        case Work::Kind::kReadLeader:
          ReadLeader(w.group);
          break;
        case Work::Kind::kPublishPending: {
          const std::string key = PendingKey(options_.prefix, bindings_[w.group].failover.group);
          (void)client_->Put(key, fmt::format("site={} {}", options_.site, w.message));
          break;
        }
        case Work::Kind::kClearPending: {
          const std::string key = PendingKey(options_.prefix, bindings_[w.group].failover.group);
          (void)client_->Txn({Compare::Value(key, Compare::Result::kNotEqual, "")},
                             {TxnOp::Delete(key)}, {});
          break;
        }
        case Work::Kind::kResign:
          Resign(w.group, w.epoch);
          break;
      }
    }
    bool sync_due;
    {
      std::lock_guard l(mu_);
      sync_due = sync_set_due_;
      sync_set_due_ = false;
    }
    // Writes wait for this (a degrade, or a new epoch's first set): before the reports.
    if (sync_due || Clock::now() >= next_reports) PublishSyncSets();
    // Every site publishes its position as soon as it sees the leader key vanish, so that the
    // candidates' read at the end of the settle time finds every reachable site's final report
    // (the periodic one may be a report interval old, or missing for a site that just started).
    // It reads the reports again too: the last primary takes its key back only on a primary
    // report read after the key vanished (core::FailoverMachine).
    if (publish) PublishAndReadReports();
    const auto now = Clock::now();
    if (now >= next_reports || now >= early) {
      if (now >= early) early = kNone;
      PublishAndReadReports();
      next_reports = Clock::now() + options_.report_interval;
    }
    bool rewatch;
    {
      std::lock_guard l(mu_);
      rewatch = need_watch_ && session_ != 0;
    }
    if (rewatch && ReadLeadersAndWatch()) {
      std::lock_guard l(mu_);
      need_watch_ = false;
    }
  }
}

void Coordinator::NewSession() {
  if (keeper_) {
    keeper_->Stop();
    keeper_.reset();
  }
  const core::Nanos sent = Now();
  auto lease = client_->LeaseGrant(options_.lease_ttl.count() / 1000);
  if (!lease.ok()) {
    // Said once per kind of failure, and again every 30 s while it lasts.
    const std::string msg(lease.status().message());
    const auto now = Clock::now();
    if (msg != last_session_error_ || now - last_session_error_at_ > std::chrono::seconds(30)) {
      spdlog::error("coordinator: cannot open an etcd session (a lease) at {}: {}",
                    fmt::join(options_.etcd.endpoints, ", "), msg);
      last_session_error_ = msg;
      last_session_error_at_ = now;
    }
    std::unique_lock l(mu_);
    session_requested_ = false;
    // Try again after a pause (the worker also publishes nothing without a session).
    cv_.wait_for(l, Millis(200), [&] { return stopping_; });
    Enqueue({Work::Kind::kNewSession, 0, {}});
    return;
  }
  if (!last_session_error_.empty()) {
    spdlog::info("coordinator: etcd session open again at {}", client_->current_endpoint());
    last_session_error_.clear();
  }
  const int64_t id = lease->id;
  const Millis interval = std::max(Millis(100), options_.suspend_after * 3 / 8);
  keeper_ = std::make_unique<LeaseKeeper>(
      client_.get(), id, interval,
      LeaseKeeper::Callbacks{
          [this, id](SteadyTime at, int64_t) {
            const core::Nanos t =
                std::chrono::duration_cast<std::chrono::nanoseconds>(at.time_since_epoch()).count();
            std::lock_guard l(mu_);
            if (session_ != id || stopping_) return;
            HandleAllLocked(core::EvSessionRenewed{t});
          },
          [this, id](absl::Status) {
            std::lock_guard l(mu_);
            if (session_ != id || stopping_) return;
            HandleAllLocked(core::EvSessionLost{});
          },
          nullptr});
  {
    std::lock_guard l(mu_);
    session_ = id;
    session_requested_ = false;
    HandleAllLocked(core::EvSessionStarted{id, sent});
  }
  // What etcd holds now, the leader keys first: the machine decides only on reports read after
  // it saw a key missing (and in this session), so the reports come second. The watch continues
  // from the keys' read.
  const bool watching = ReadLeadersAndWatch();
  PublishAndReadReports();
  std::lock_guard l(mu_);
  need_watch_ = !watching;
}

bool Coordinator::ReadLeadersAndWatch() {
  // One read of every group's keys gives one revision that the watch continues from, so no
  // change of any leader key falls between the read and the watch.
  const std::string prefix = options_.prefix + "/groups/";
  auto r = client_->Range(prefix, PrefixEnd(prefix));
  if (!r.ok()) return false;  // the worker tries again
  {
    std::lock_guard l(mu_);
    for (size_t i = 0; i < bindings_.size(); ++i) {
      const std::string key = LeaderKey(options_.prefix, bindings_[i].failover.group);
      const std::string paused = PausedKey(options_.prefix, bindings_[i].failover.group);
      core::LeaderView v;
      core::EvPaused pause;
      for (const KeyValue& kv : r->kvs) {
        if (kv.key == key) v = ViewOf(kv);
        if (kv.key == paused) pause = {true, kv.value};
      }
      HandleLocked(i, pause);  // before the leader: a missing key must not start an election
      HandleLocked(i, core::EvLeader{v, r->revision});
    }
  }
  StartWatcher(r->revision + 1);
  return true;
}

core::LeaderView Coordinator::ViewOf(const KeyValue& kv) const {
  return core::LeaderView{true, kv.value, static_cast<uint64_t>(kv.create_revision), kv.lease};
}

void Coordinator::StartWatcher(int64_t from_revision) {
  if (watcher_) watcher_->Stop();
  const std::string prefix = options_.prefix + "/groups/";
  watcher_ = std::make_unique<Watcher>(
      client_.get(), prefix, PrefixEnd(prefix), from_revision,
      Watcher::Callbacks{
          [this](const std::vector<WatchEvent>& events, int64_t) { OnWatch(events); },
          [this](int64_t) {
            // The revision to resume from is gone: the worker re-reads the keys and starts a new
            // watch from there.
            std::lock_guard l(mu_);
            need_watch_ = true;
            cv_.notify_all();
          },
          nullptr});
}

void Coordinator::OnWatch(const std::vector<WatchEvent>& events) {
  std::lock_guard l(mu_);
  if (stopping_) return;
  // A hand-over is put in the same Txn that deletes the leader key: handle it first, so that no
  // site decides on the deletion without knowing whom it is for.
  for (const WatchEvent& e : events) {
    for (size_t i = 0; i < bindings_.size(); ++i) {
      if (e.kv.key == PausedKey(options_.prefix, bindings_[i].failover.group)) {
        HandleLocked(i, core::EvPaused{e.type == WatchEvent::Type::kPut, e.kv.value});
      }
    }
    if (e.type != WatchEvent::Type::kPut) continue;
    for (size_t i = 0; i < bindings_.size(); ++i) {
      if (e.kv.key != HandoverKey(options_.prefix, bindings_[i].failover.group)) continue;
      HandleLocked(i, core::EvHandover{e.kv.value});
    }
  }
  for (const WatchEvent& e : events) {
    for (size_t i = 0; i < bindings_.size(); ++i) {
      if (e.kv.key != LeaderKey(options_.prefix, bindings_[i].failover.group)) continue;
      if (e.type == WatchEvent::Type::kDelete) {
        const core::LeaderView& was = machines_[i]->leader();
        spdlog::info(
            "group {}: coordinator: the leader key is gone (it was {}'s, epoch {}): its "
            "lease ended or it was handed over",
            bindings_[i].failover.group, was.present ? was.site : "nobody", was.epoch);
        const auto at = Clock::now() + std::chrono::nanoseconds(bindings_[i].failover.settle) +
                        std::chrono::milliseconds(5);
        if (!reports_early_ || at < *reports_early_) reports_early_ = at;
        publish_now_ = true;
        cv_.notify_all();
      }
      HandleLocked(
          i, core::EvLeader{e.type == WatchEvent::Type::kDelete ? core::LeaderView{} : ViewOf(e.kv),
                            e.kv.mod_revision});
    }
  }
}

void Coordinator::Campaign(size_t i) {
  int64_t session;
  {
    std::lock_guard l(mu_);
    session = session_;
  }
  const std::string key = LeaderKey(options_.prefix, bindings_[i].failover.group);
  core::EvCampaignDone done;
  if (session != 0) {
    // The winner also clears a switchover's hand-over (it has done its job).
    auto r =
        client_->Txn({Compare::CreateRevision(key, Compare::Result::kEqual, 0)},
                     {TxnOp::Put(key, options_.site, session),
                      TxnOp::Delete(HandoverKey(options_.prefix, bindings_[i].failover.group))},
                     {TxnOp::Get(key)});
    if (r.ok()) done.revision = r->revision;
    if (r.ok() && r->succeeded) {
      done.won = true;
      done.leader = {true, options_.site, static_cast<uint64_t>(r->revision), session};
    } else if (r.ok() && !r->ranges.empty() && !r->ranges[0].kvs.empty()) {
      done.leader = ViewOf(r->ranges[0].kvs[0]);
    } else if (!r.ok()) {
      // The Txn may have been applied: read the key to find out.
      auto g = client_->Get(key);
      if (g.ok()) done.revision = g->revision;
      if (g.ok() && !g->kvs.empty()) done.leader = ViewOf(g->kvs[0]);
      done.won =
          done.leader.present && done.leader.site == options_.site && done.leader.lease == session;
    }
  }
  std::lock_guard l(mu_);
  HandleLocked(i, done);
}

void Coordinator::ReadLeader(size_t i) {
  auto r = client_->Get(LeaderKey(options_.prefix, bindings_[i].failover.group));
  if (!r.ok()) return;  // the machine asks again on the next renewal
  std::lock_guard l(mu_);
  HandleLocked(
      i, core::EvLeader{r->kvs.empty() ? core::LeaderView{} : ViewOf(r->kvs[0]), r->revision});
}

void Coordinator::SyncSetDue() {
  {
    std::lock_guard l(mu_);
    sync_set_due_ = true;
  }
  cv_.notify_all();
}

void Coordinator::PublishSyncSets() {
  for (size_t i = 0; i < bindings_.size(); ++i) {
    const GroupBinding& b = bindings_[i];
    if (!b.take_sync_set || !b.sync_set_published) continue;
    std::optional<std::pair<uint64_t, core::SyncSet>> want = b.take_sync_set();
    if (!want) continue;
    const auto& [epoch, set] = *want;
    const std::string& g = b.failover.group;
    bool ours;
    {
      std::lock_guard l(mu_);
      ours = session_ != 0 && machines_[i]->epoch() == epoch &&
             machines_[i]->state() == core::FailoverMachine::State::kPrimary;
    }
    bool ok = false;
    if (ours) {
      const std::string leader = LeaderKey(options_.prefix, g);
      const core::PublishedSyncSet value{options_.site, epoch, set};
      // Only while the key is ours in this epoch, like the primary report.
      auto r = client_->Txn(
          {Compare::CreateRevision(leader, Compare::Result::kEqual, static_cast<int64_t>(epoch)),
           Compare::Value(leader, Compare::Result::kEqual, options_.site)},
          {TxnOp::Put(SyncKey(options_.prefix, g), EncodeSyncSet(value))}, {});
      ok = r.ok() && r->succeeded;
      if (ok) {
        spdlog::info("group {}: coordinator: sync set {} published in etcd (epoch {}, revision {})",
                     g, core::DescribeSyncSet(set), epoch, r->revision);
      } else {
        spdlog::warn("group {}: coordinator: could not publish the sync set {} (epoch {}): {}", g,
                     core::DescribeSyncSet(set), epoch,
                     r.ok() ? "the leader key is no longer ours in this epoch"
                            : std::string(r.status().message()));
      }
    }
    b.sync_set_published(epoch, set, ok);
  }
}

void Coordinator::PublishSiteReports() {
  int64_t session;
  {
    std::lock_guard l(mu_);
    session = session_;
  }
  if (session == 0) return;
  for (size_t i = 0; i < bindings_.size(); ++i) {
    const GroupBinding& b = bindings_[i];
    if (!b.site_report) continue;
    core::SiteReport report = b.site_report();
    {
      // After a failed promotion the other sites must choose someone else.
      std::lock_guard l(mu_);
      if (machines_[i]->promotion_refused(Now())) report.promotion_failed = true;
    }
    (void)client_->Put(SitesPrefix(options_.prefix, b.failover.group) + options_.site,
                       EncodeSiteReport(report), session);
  }
}

void Coordinator::PublishAndReadReports() {
  PublishSiteReports();
  std::vector<std::pair<core::FailoverMachine::State, uint64_t>> states;
  {
    std::lock_guard l(mu_);
    for (const auto& m : machines_) states.emplace_back(m->state(), m->epoch());
  }
  for (size_t i = 0; i < bindings_.size(); ++i) {
    const GroupBinding& b = bindings_[i];
    const std::string& g = b.failover.group;
    if (states[i].first == core::FailoverMachine::State::kPrimary && b.primary_report) {
      if (std::optional<core::PrimaryReport> pr = b.primary_report()) {
        pr->site = options_.site;
        pr->epoch = states[i].second;
        const std::string leader = LeaderKey(options_.prefix, g);
        // Only while the key is still ours in this epoch.
        (void)client_->Txn({Compare::CreateRevision(leader, Compare::Result::kEqual,
                                                    static_cast<int64_t>(states[i].second)),
                            Compare::Value(leader, Compare::Result::kEqual, options_.site)},
                           {TxnOp::Put(PrimaryKey(options_.prefix, g), EncodePrimaryReport(*pr))},
                           {});
      }
    }
    auto sites =
        client_->Range(SitesPrefix(options_.prefix, g), PrefixEnd(SitesPrefix(options_.prefix, g)));
    auto primary = client_->Get(PrimaryKey(options_.prefix, g));
    // Read before the site reports are handled: a candidate decides on a set read after the
    // leader key vanished (only the key's holder writes it), as it does on the reports.
    auto sync = client_->Get(SyncKey(options_.prefix, g));
    std::lock_guard l(mu_);
    if (stopping_) return;
    if (sync.ok() && sites.ok()) {
      core::EvSyncSet ev;
      if (!sync->kvs.empty()) {
        ev.sync = DecodeSyncSet(sync->kvs[0].value);
        if (!ev.sync) {
          // A set that cannot be read cannot be followed: no automatic promotion on it.
          spdlog::error("group {}: coordinator: unreadable sync set at {}: \"{}\"", g,
                        SyncKey(options_.prefix, g), sync->kvs[0].value);
          ev.sync = core::PublishedSyncSet{"?", 0, core::SyncSet{{"?"}, ~0ull}};
        }
      }
      HandleLocked(i, ev);
    }
    if (sites.ok()) {
      core::EvSites ev;
      for (const KeyValue& kv : sites->kvs) {
        if (auto r = DecodeSiteReport(kv.value)) {
          ev.sites[kv.key.substr(SitesPrefix(options_.prefix, g).size())] = *r;
        }
      }
      HandleLocked(i, ev);
    }
    if (primary.ok()) {
      core::EvPrimaryReport ev;
      if (!primary->kvs.empty()) ev.report = DecodePrimaryReport(primary->kvs[0].value);
      HandleLocked(i, ev);
    }
  }
}

}  // namespace tvilling::coordinator
