// failover_sim.cc: tvilling_failover_sim, a seeded deterministic simulation of one group on three
// sites with the coordinator and the replication together.
//
// One process drives the REAL agent/core state machines: a FailoverMachine per site decides the
// roles against a simulated etcd, and the current primary's PrimaryGroup and each replica's
// ReplicaReceiver ship the group's log over a simulated network. The epoch is the leader key's
// create revision, as in docs/coordinator.md.
//
// The simulated etcd: one revision counter; leases with a TTL that a keep-alive renews for TTL when
// etcd handles it; the leader key created by a create-if-absent Txn under the campaigner's lease
// (and deleted with the lease); site reports under each site's lease; the primary report (no
// lease) written by the primary every report period, guarded by its epoch. An etcd leader change
// makes etcd unavailable for a while and then extends every lease by a full TTL (etcd refreshes
// leases on a leader change). Every request and answer may be lost or delayed; watches of the key
// reach each site with their own delay, and each site re-reads the key every second.
//
// Faults: site crashes (the log keeps only what was fsynced; the FailoverMachine, lease and
// streams are gone; the site restarts later), partitions between a site and etcd, partitions
// between two sites (they cut the replication stream), etcd leader changes. Each site's clock runs
// at its own rate, within 1 % of etcd's.
//
// The glue does what agent/coordinator and agent/node do with the machine's actions: kPromote makes
// the site a primary in the key's epoch (a PrimaryGroup over its log, a new history entry),
// kDemote makes it a replica again (held writes are failed, never completed), kResumeIo /
// kSuspendIo gate client completions, the primary publishes its sync set to etcd (one Txn at a
// time, guarded by its epoch) before a write completes without a member, and each site reads the
// set with the site reports (--no-sync-set: neither, the election by the lag gate alone, which
// loses sync writes in mixed mode). A replica whose log diverged from the new primary (the old
// primary's unreplicated tail) is refused as diverged; the sim then does what the operator's
// rejoin does: its log is cut back to the common prefix, and it streams again.
//
// Invariants, after every step:
//   (epoch)   at most one site completes writes in any epoch, and completions never go back to an
//             older epoch once a newer one completed;
//   (overlap) at most one site has client I/O on at any instant of the simulated clock, and that
//             site holds the key at etcd in its own epoch;
//   (sync)    no write completed in sync mode (a sync peer in the sync set) is missing from the
//             durable log of any later primary, checked when it is promoted, nor dropped by a
//             rejoin;
//   (monotone) the release points of a PrimaryGroup and the positions it holds and a receiver
//             reports never go backwards;
//   (prefix)  every replica with an accepted stream holds a prefix of its primary's log.
// At the end the faults stop, and within a bounded time some site must be primary and complete
// writes, with both others streaming (liveness).
//
// --promotion-failures: while the faults last, a promotion fails now and then (a disk error,
// volumes found inconsistent): the site stays a replica and its machine gets EvPromotionFailed,
// resigns the key (kResign, a Txn at etcd guarded by site and epoch), stays out of elections and
// publishes no-failover for a while; the invariants and the liveness check hold with it.
//
// A failing seed prints itself and the command that replays it with a trace. --planted-bug makes
// the glue misbehave, to show the invariants catch it.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "agent/core/failover.h"
#include "agent/core/replication.h"

namespace tvilling::sim {
namespace {

using core::EvCampaignDone;
using core::EvLeader;
using core::EvPrimaryReport;
using core::EvPromotionFailed;
using core::EvSessionLost;
using core::EvSessionRenewed;
using core::EvSessionStarted;
using core::EvSites;
using core::EvSyncSet;
using core::EvTick;
using core::FailoverAction;
using core::FailoverMachine;
using core::FailoverOptions;
using core::HandshakeDecision;
using core::History;
using core::LeaderView;
using core::Mode;
using core::Nanos;
using core::Positions;
using core::PrimaryGroup;
using core::PrimaryHello;
using core::PrimaryReport;
using core::PublishedSyncSet;
using core::ReplicaReceiver;
using core::ReplicaView;
using core::SiteReport;
using K = FailoverAction::Kind;

constexpr Nanos kMs = 1'000'000;
constexpr Nanos kStep = 5 * kMs;
constexpr int kSites = 3;

enum class Plant {
  kNone,
  kSuspendLate,         // the primary keeps I/O on past its lease (suspend_after > TTL)
  kNoSyncWait,          // writes complete once local and durable, without the sync peers
  kRejoinKeepsTail,     // a rejoin keeps the diverged tail and takes the primary's history
  kFailedAsNoFailover,  // a failed promotion is reported as no-failover, not promotion_failed
};

std::optional<Plant> ParsePlant(const std::string& s) {
  if (s == "none") return Plant::kNone;
  if (s == "suspend-late") return Plant::kSuspendLate;
  if (s == "no-sync-wait") return Plant::kNoSyncWait;
  if (s == "rejoin-keeps-tail") return Plant::kRejoinKeepsTail;
  if (s == "failed-as-no-failover") return Plant::kFailedAsNoFailover;
  return std::nullopt;
}

// SplitMix64: deterministic on every platform (std distributions are not).
struct Rng {
  uint64_t s;
  uint64_t Next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint64_t Below(uint64_t n) { return n == 0 ? 0 : Next() % n; }
  uint64_t Range(uint64_t lo, uint64_t hi) { return lo + Below(hi - lo + 1); }
  bool Chance(double p) { return static_cast<double>(Next() >> 11) * 0x1.0p-53 < p; }
};

struct Rec {
  uint64_t epoch = 0;
  uint64_t lsn = 0;
  uint64_t value = 0;
  bool operator==(const Rec&) const = default;
};

struct Outbound {  // the primary's stream to one replica
  uint64_t conn = 0;
  bool up = false;
  bool acked = false;
  Nanos redial_at = 0;
};

struct Site {
  // The last promotion failed (--promotion-failures): the node stays a replica, so a kResumeIo
  // that came with the kPromote completes nothing (the node's exports are read-only).
  bool promotion_failed = false;
  std::string name;
  bool up = true;
  Nanos restart_at = 0;
  uint64_t incarnation = 0;  // bumped by a crash: answers to the old process are dropped
  std::unique_ptr<FailoverMachine> m;
  int64_t lease = 0;
  Nanos next_keepalive = 0;
  Nanos session_requested = 0;
  bool session_pending = false;
  uint64_t campaigns = 0;
  bool io = false;
  // The log: log[i] is LSN i + 1; the first `durable` records are fsynced.
  std::vector<Rec> log;
  size_t durable = 0;
  History history;
  uint64_t newest_epoch = 0;  // persisted
  bool syncing = false;
  Nanos sync_done_at = 0;
  size_t sync_target = 0;
  // As primary.
  bool primary = false;
  uint64_t epoch = 0;
  std::unique_ptr<PrimaryGroup> pg;
  std::deque<uint64_t> pending;  // client writes (LSNs) not completed yet
  Outbound out[kSites];
  uint64_t seen_write_released = 0, seen_flush_released = 0;
  std::map<std::string, Positions> seen_positions;
  Nanos next_primary_report = 0;
  uint64_t sync_publishes = 0;  // the sync set Txn in flight (its answer or deadline must match)
  // As replica.
  std::unique_ptr<ReplicaReceiver> rx;
  int from = -1;  // the primary whose stream it accepted
  uint64_t from_conn = 0;
  Positions seen_rx;
  Nanos next_site_report = 0;

  uint64_t last() const { return log.size(); }
};

struct Failure {
  int step;
  std::string what;
};

class Sim {
 public:
  Sim(uint64_t seed, Plant plant, bool trace, bool mixed, bool sync_check, bool sync_set,
      bool promotion_failures = false)
      : rng_{seed * 0x2545F4914F6CDD1Dull + 7},
        plant_(plant),
        trace_(trace),
        sync_check_(sync_check),
        sync_set_(sync_set),
        promotion_failures_(promotion_failures),
        promo_rng_{seed * 0x9E3779B97F4A7C15ull + 11} {  // its own: other runs stay as they were
    ttl_ = static_cast<Nanos>(rng_.Range(8, 20)) * 100 * kMs;
    max_delay_ = static_cast<Nanos>(rng_.Range(1, 15)) * 10 * kMs;
    loss_ = rng_.Chance(0.5) ? 0.02 : 0.08;
    const uint64_t variant = rng_.Below(4);
    // Which peers a primary ships to synchronously: by the peer's name, the same from any primary.
    // all-sync: every peer sync and never degraded, so every completed write is on every site.
    // mixed: sync and async peers, sync peers that may leave the sync set.
    modes_[0] = Mode::kSync;
    modes_[1] = mixed && variant == 0 ? Mode::kAsync : Mode::kSync;
    modes_[2] = mixed && variant <= 1 ? Mode::kAsync : Mode::kSync;
    degrade_ = !mixed || variant == 3 ? 0 : static_cast<Nanos>(rng_.Range(2, 10)) * 100 * kMs;
    max_lag_bytes_ = rng_.Chance(0.5) ? 0 : 64 * 4096;
    for (int i = 0; i < kSites; ++i) {
      sites_[i].name = std::string(1, static_cast<char>('a' + i));
      drift_ppm_[i] = static_cast<int64_t>(rng_.Range(0, 20'000)) - 10'000;
      for (int j = 0; j < kSites; ++j) latency_[i][j] = static_cast<Nanos>(rng_.Range(1, 8)) * kMs;
    }
    for (int i = 0; i < kSites; ++i) Start(i);
  }

  std::optional<Failure> Run(int steps) {
    for (step_ = 0; step_ < steps && !failure_; ++step_) Step(true);
    if (failure_) return failure_;
    // Liveness: the faults stop; a primary must emerge, complete writes and stream to both.
    for (int i = 0; i < kSites; ++i) {
      for (int j = 0; j < kSites; ++j) part_[i][j] = false;
      etcd_cut_[i] = false;
    }
    const int limit = step_ + static_cast<int>((20 * ttl_ + 10'000 * kMs) / kStep);
    const uint64_t done_before = completions_;
    for (; step_ < limit && !failure_; ++step_) {
      Step(false);
      if (Live(done_before)) return failure_;
    }
    if (!failure_)
      Fail("liveness: no primary completing writes to two streaming replicas " +
           std::to_string((limit - steps) * kStep / kMs) +
           " ms after the faults "
           "stopped; " +
           Roles());
    return failure_;
  }

  std::string Summary() const {
    return "epochs " + std::to_string(promotions_) + ", writes completed " +
           std::to_string(completions_) + " (" + std::to_string(sync_completions_) +
           " in sync mode), crashes " + std::to_string(crashes_) + ", rejoins " +
           std::to_string(rejoins_) + ", etcd leader changes " + std::to_string(etcd_changes_) +
           ", ttl " + std::to_string(ttl_ / kMs) + " ms, max delay " +
           std::to_string(max_delay_ / kMs) + " ms";
  }
  uint64_t promotions() const { return promotions_; }
  uint64_t completions() const { return completions_; }
  uint64_t rejoins() const { return rejoins_; }
  uint64_t crashes() const { return crashes_; }

 private:
  // ---- plumbing -------------------------------------------------------------------------------

  void Trace(const std::string& s) {
    if (trace_)
      std::fprintf(stderr, "[%d t=%lldms] %s\n", step_, static_cast<long long>(now_ / kMs),
                   s.c_str());
  }
  void Fail(const std::string& what) {
    if (!failure_) failure_ = Failure{step_, what};
  }

  void At(Nanos at, std::function<void()> fn) {
    queue_.emplace(std::make_pair(at, ++seq_), std::move(fn));
  }

  bool EtcdUp() const { return now_ >= etcd_down_until_; }

  // A request from site i to etcd and its answer; `at_etcd` runs at etcd and returns the answer
  // to run at the site (or nullptr). Lost if the site is cut off, etcd is down, or by chance.
  void Etcd(int i, std::function<std::function<void()>()> at_etcd) {
    Site& s = sites_[i];
    if (!s.up || etcd_cut_[i] || rng_.Chance(loss_)) return;
    const uint64_t inc = s.incarnation;
    At(now_ + static_cast<Nanos>(rng_.Below(max_delay_)), [this, i, inc, at_etcd] {
      if (!EtcdUp() || etcd_cut_[i]) return;
      std::function<void()> answer = at_etcd();
      if (!answer || rng_.Chance(loss_)) return;
      At(now_ + static_cast<Nanos>(rng_.Below(max_delay_)), [this, i, inc, answer] {
        if (!sites_[i].up || sites_[i].incarnation != inc || etcd_cut_[i]) return;
        answer();
      });
    });
  }

  // A message on the replication stream `conn` between sites a and b (TCP-like: in order; a
  // partition cuts the stream).
  void Data(int from, int to, std::function<void()> fn) {
    if (part_[from][to]) return;
    Nanos at = now_ + latency_[from][to] + static_cast<Nanos>(rng_.Below(latency_[from][to] + 1));
    at = std::max(at, last_data_at_[from][to]);
    last_data_at_[from][to] = at;
    const uint64_t inc_from = sites_[from].incarnation, inc_to = sites_[to].incarnation;
    At(at, [this, from, to, inc_from, inc_to, fn] {
      if (!sites_[from].up || !sites_[to].up || sites_[from].incarnation != inc_from ||
          sites_[to].incarnation != inc_to || part_[from][to]) {
        return;
      }
      fn();
    });
  }

  bool LeaseAlive(int64_t id) const {
    auto it = leases_.find(id);
    return it != leases_.end() && it->second > now_;
  }

  // ---- the machine's actions --------------------------------------------------------------

  // Site i's monotonic clock: it runs at its own rate (within 1 % of etcd's).
  Nanos Local(int i) const { return now_ + now_ / 1'000'000 * drift_ppm_[i]; }

  void Handle(int i, const core::FailoverEvent& ev) {
    Site& s = sites_[i];
    if (!s.up) return;
    if (trace_) {
      if (const auto* e = std::get_if<EvSites>(&ev)) last_sites_[i] = e->sites;
    }
    Act(i, s.m->Handle(Local(i), ev));
  }

  void Act(int i, const std::vector<FailoverAction>& actions) {
    Site& s = sites_[i];
    for (const FailoverAction& a : actions) {
      if (a.kind != K::kRefused)
        Trace(s.name + ": " + core::ActionName(a.kind) + " " + a.site + " epoch " +
              std::to_string(a.epoch) + " " + a.message);
      switch (a.kind) {
        case K::kCampaign: {
          if (trace_) {
            std::string v = s.name + " campaigns; site reports it has:";
            for (const auto& [site, r] : last_sites_[i]) {
              v += " " + site + " durable " + std::to_string(r.durable_lsn);
            }
            Trace(v);
          }
          const int64_t lease = s.lease;
          const uint64_t nr = ++s.campaigns;
          const uint64_t inc = s.incarnation;
          At(now_ + 10 * max_delay_ + 100 * kMs, [this, i, nr, inc] {  // the Txn's deadline
            Site& t = sites_[i];
            if (t.up && t.incarnation == inc && t.campaigns == nr &&
                t.m->state() == FailoverMachine::State::kCampaigning) {
              Handle(i, EvCampaignDone{false, {}});
            }
          });
          Etcd(i, [this, i, lease, nr]() -> std::function<void()> {
            bool won = false;
            if (!key_.present && LeaseAlive(lease)) {
              key_ = LeaderView{true, sites_[i].name, ++revision_, lease};
              won = true;
              Trace("etcd: " + sites_[i].name + " takes the leader key, epoch " +
                    std::to_string(key_.epoch));
            }
            const LeaderView v = key_;
            const int64_t rev = static_cast<int64_t>(revision_);
            return [this, i, won, v, nr, rev] {
              if (sites_[i].campaigns != nr) return;
              ++sites_[i].campaigns;  // answered: the deadline is void
              Handle(i, EvCampaignDone{won, v, rev});
            };
          });
          break;
        }
        case K::kPromote:
          Promote(i, a.epoch);
          break;
        case K::kResumeIo:
          if (!s.promotion_failed) s.io = true;
          break;
        case K::kSuspendIo:
          s.io = false;
          break;
        case K::kDemote:
          s.io = false;
          if (s.primary) Demote(i);
          break;
        case K::kReadLeader:
          ReadLeader(i);
          break;
        case K::kNewSession:
          s.lease = 0;
          NewSession(i);
          break;
        case K::kResign: {
          const uint64_t epoch = a.epoch;
          Etcd(i, [this, i, epoch]() -> std::function<void()> {
            if (key_.present && key_.site == sites_[i].name && key_.epoch == epoch) {
              ++resigns_;
              Trace("etcd: " + sites_[i].name + " resigns the leader key, epoch " +
                    std::to_string(epoch));
              key_ = LeaderView{};
              ++revision_;
            }
            return nullptr;
          });
          break;
        }
        default:
          break;
      }
    }
  }

  // Answers overtake each other here (each has its own delay); the revision lets the machine
  // drop a view older than one it has.
  void ReadLeader(int i) {
    Etcd(i, [this, i]() -> std::function<void()> {
      const LeaderView v = key_;
      const int64_t rev = static_cast<int64_t>(revision_);
      return [this, i, v, rev] { Handle(i, EvLeader{v, rev}); };
    });
  }

  // The reports, as the coordinator reads them in one pass: the sync set, the site reports, the
  // primary report. (The sync set and the primary report are written only by the key's holder,
  // so a candidate decides on what it read after the key vanished.)
  void ReadReports(int i) {
    Etcd(i, [this, i]() -> std::function<void()> {
      std::map<std::string, SiteReport> alive;
      for (const auto& [j, rl] : site_reports_) {
        if (LeaseAlive(rl.second)) alive[sites_[j].name] = rl.first;
      }
      const std::optional<PublishedSyncSet> sync = sync_key_;
      const std::optional<PrimaryReport> primary = primary_report_;
      return [this, i, alive, sync, primary] {
        Handle(i, EvSyncSet{sync});
        Handle(i, EvSites{alive});
        Handle(i, EvPrimaryReport{primary});
      };
    });
  }

  void NewSession(int i) {
    Site& s = sites_[i];
    const Nanos sent = Local(i);
    s.session_requested = now_;
    s.session_pending = true;
    Etcd(i, [this, i, sent]() -> std::function<void()> {
      const int64_t id = next_lease_++;
      leases_[id] = now_ + ttl_;
      ++revision_;
      return [this, i, id, sent] {
        sites_[i].session_pending = false;
        sites_[i].lease = id;
        sites_[i].next_keepalive = now_ + ttl_ / 4;  // 3/8 of suspend_after, as the coordinator
        Handle(i, EvSessionStarted{id, sent});
        // As the coordinator: what etcd holds now, the key first, then the reports.
        ReadLeader(i);
        ReadReports(i);
      };
    });
  }

  void KeepAlive(int i) {
    Site& s = sites_[i];
    const int64_t id = s.lease;
    const Nanos sent = Local(i);
    Etcd(i, [this, i, id, sent]() -> std::function<void()> {
      const bool alive = LeaseAlive(id);
      if (alive) leases_[id] = std::max(leases_[id], now_ + ttl_);
      return [this, i, id, sent, alive] {
        if (sites_[i].lease != id) return;
        if (alive) {
          Handle(i, EvSessionRenewed{sent});
        } else {
          sites_[i].lease = 0;
          Handle(i, EvSessionLost{});
        }
      };
    });
  }

  // ---- roles --------------------------------------------------------------------------------

  ReplicaView View(const Site& s) const {
    ReplicaView v;
    v.group_known = true;
    v.newest_epoch = s.newest_epoch;
    v.history = core::HistoryUpTo(s.history, s.last());
    v.last_lsn = s.last();
    v.volume_sizes = {1 << 20};
    v.consistent = true;  // every site starts with the same (empty) log and never copies
    return v;
  }

  void CutStream(int p, int r, const std::string& why) {
    Site& ps = sites_[p];
    Site& rs = sites_[r];
    if (ps.out[r].up) {
      ps.out[r].up = false;
      ps.out[r].acked = false;
      ps.out[r].redial_at = now_ + static_cast<Nanos>(rng_.Range(5, 50)) * kMs;
      if (ps.pg) ps.pg->OnDisconnected(rs.name, why, now_);
      if (rs.from == p && rs.from_conn == ps.out[r].conn) rs.from = -1;
      Trace("stream " + ps.name + " -> " + rs.name + " cut: " + why);
    }
  }

  void Promote(int i, uint64_t epoch) {
    Site& s = sites_[i];
    if (promotion_failures_ && faults_on_ && promo_rng_.Chance(0.3)) {
      // The node's promotion fails on its worker thread and tells the coordinator a little later.
      ++failed_promotions_;
      Trace(s.name + ": promotion in epoch " + std::to_string(epoch) + " fails (injected)");
      s.promotion_failed = true;
      const uint64_t inc = s.incarnation;
      At(now_ + static_cast<Nanos>(promo_rng_.Range(0, 20)) * kMs, [this, i, inc, epoch] {
        if (sites_[i].up && sites_[i].incarnation == inc) {
          Handle(i, EvPromotionFailed{epoch, "injected"});
        }
      });
      return;
    }
    ++promotions_;
    s.promotion_failed = false;
    // (sync): the new primary's durable log holds every write completed in sync mode.
    for (const auto& [lsn, rec] : sync_check_ ? sync_done_ : std::map<uint64_t, Rec>{}) {
      if (lsn > s.durable || !(s.log[lsn - 1] == rec)) {
        Fail("invariant (sync): " + s.name + " is promoted in epoch " + std::to_string(epoch) +
             " without LSN " + std::to_string(lsn) + " (epoch " + std::to_string(rec.epoch) +
             "), a write completed in sync mode; its durable log ends at " +
             std::to_string(s.durable) + " of " + std::to_string(s.last()) + "; " + Roles());
        return;
      }
    }
    if (s.from >= 0) CutStream(s.from, i, s.name + " is promoted");
    s.rx.reset();
    s.primary = true;
    s.epoch = epoch;
    s.newest_epoch = std::max(s.newest_epoch, epoch);
    s.history.push_back({epoch, s.last() + 1});
    s.pg = std::make_unique<PrimaryGroup>();
    s.seen_write_released = s.seen_flush_released = 0;
    s.seen_positions.clear();
    for (int j = 0; j < kSites; ++j) {
      if (j == i) continue;
      core::SenderOptions o;
      o.mode = modes_[j];
      o.min_window_bytes = 16 * 4096;
      o.max_window_bytes = 64 * 4096;
      o.max_batch_records = 8;
      o.max_batch_delay = 0;
      o.sync_degrade_after = o.mode == Mode::kSync ? degrade_ : 0;
      s.pg->AddPeer(sites_[j].name, o, {}, now_);
      s.out[j] = Outbound{};
    }
    for (const Rec& r : s.log) s.pg->OnLocalAppend(r.lsn, 4096, 1 + r.lsn, now_);
    s.pg->OnLocalDurable(s.durable);
    s.pg->OnLocalApplied(s.durable);
    if (sync_set_) s.pg->GateOnPublishedSyncSet();
    s.next_primary_report = now_;
    Trace(s.name + " is primary in epoch " + std::to_string(epoch) + " with log " +
          std::to_string(s.last()) + " (durable " + std::to_string(s.durable) + ")");
  }

  void Demote(int i) {
    Site& s = sites_[i];
    for (int j = 0; j < kSites; ++j) {
      if (j != i) CutStream(i, j, s.name + " is demoted");
    }
    s.primary = false;
    s.pg.reset();
    s.pending.clear();  // failed with ESHUTDOWN, never completed
    s.rx = std::make_unique<ReplicaReceiver>(View(s));
  }

  void Start(int i) {
    Site& s = sites_[i];
    FailoverOptions o;
    o.group = "g";
    o.site = s.name;
    o.sites = {"a", "b", "c"};
    o.configured_primary = "a";
    o.lease_ttl = ttl_;
    o.suspend_after = plant_ == Plant::kSuspendLate ? ttl_ * 2 : ttl_ * 2 / 3;
    o.max_lag_bytes = max_lag_bytes_;
    o.max_lag_time = 1000 * kMs * 1000;
    o.anti_flap = 2 * ttl_;
    o.settle = ttl_ / 2;
    s.m = std::make_unique<FailoverMachine>(o);
    s.rx = std::make_unique<ReplicaReceiver>(View(s));
    s.seen_rx = {};
    s.lease = 0;
    s.io = false;
    // A new process: it reads the primary report, the site reports and the key, and asks for a
    // session.
    Etcd(i, [this, i]() -> std::function<void()> {
      const std::optional<PrimaryReport> r = primary_report_;
      return [this, i, r] { Handle(i, EvPrimaryReport{r}); };
    });
    ReadLeader(i);
    NewSession(i);
  }

  void Crash(int i) {
    Site& s = sites_[i];
    Trace("crash " + s.name + (s.primary ? " (primary)" : "") + ": log " +
          std::to_string(s.last()) + " -> durable " + std::to_string(s.durable));
    ++crashes_;
    for (int j = 0; j < kSites; ++j) {
      if (j == i) continue;
      CutStream(i, j, s.name + " crashed");
      CutStream(j, i, s.name + " crashed");
    }
    s.up = false;
    ++s.incarnation;
    s.restart_at = now_ + static_cast<Nanos>(rng_.Range(1, 30)) * 100 * kMs;
    s.primary = false;
    s.pg.reset();
    s.pending.clear();
    s.io = false;
    s.rx.reset();
    s.m.reset();
    s.from = -1;
    s.log.resize(s.durable);
    s.history = core::HistoryUpTo(s.history, s.last());
    s.syncing = false;
    s.lease = 0;
    s.session_pending = false;
  }

  // ---- replication --------------------------------------------------------------------------

  void Dial(int p, int r) {
    Site& ps = sites_[p];
    Outbound& o = ps.out[r];
    o.conn = ++next_conn_;
    o.up = true;
    o.acked = false;
    ps.pg->OnConnected(sites_[r].name, now_);
    PrimaryHello h;
    h.group = "g";
    h.site = ps.name;
    h.epoch = ps.epoch;
    h.history = ps.history;
    h.volume_sizes = {1 << 20};
    h.first_lsn = 1;
    h.last_lsn = ps.last();
    const uint64_t conn = o.conn;
    Data(p, r, [this, p, r, h, conn] { OnHello(p, r, h, conn); });
  }

  void OnHello(int p, int r, const PrimaryHello& h, uint64_t conn) {
    Site& rs = sites_[r];
    HandshakeDecision d;
    if (rs.primary || !rs.rx) {
      d.kind = HandshakeDecision::Kind::kRefuse;
      d.code = core::RefuseCode::kNotReplica;
      d.reason = rs.name + " is a primary";
    } else {
      d = rs.rx->OnHello(h);
      rs.newest_epoch = std::max(rs.newest_epoch, rs.rx->newest_epoch());
      if (d.kind == HandshakeDecision::Kind::kFullCopy) {
        Fail("sim: " + rs.name +
             " decided a full copy (this simulation never needs one): " + d.reason);
        return;
      }
      if (d.kind == HandshakeDecision::Kind::kStreamFrom) {
        if (rs.from >= 0 && rs.from != p) CutStream(rs.from, r, "a newer stream was accepted");
        rs.from = p;
        rs.from_conn = conn;
        rs.seen_rx = rs.rx->positions();
      }
    }
    Data(r, p, [this, p, r, d, conn] { OnDecision(p, r, d, conn); });
    Ack(r);
  }

  void OnDecision(int p, int r, const HandshakeDecision& d, uint64_t conn) {
    Site& ps = sites_[p];
    if (!ps.pg || !ps.out[r].up || ps.out[r].conn != conn) return;
    ps.pg->OnDecision(sites_[r].name, d, 0, now_);
    if (d.kind == HandshakeDecision::Kind::kStreamFrom) {
      ps.out[r].acked = true;
      return;
    }
    // A refusal unconfirms the peer: the release points may drop (PrimaryGroup::OnDecision);
    // what completed stays completed.
    ps.seen_write_released = ps.pg->write_released();
    ps.seen_flush_released = ps.pg->flush_released();
    CutStream(p, r, "refused: " + d.reason);
    ps.out[r].redial_at = now_ + 100 * kMs;
    if (d.code == core::RefuseCode::kDiverged) Rejoin(r, p);
  }

  // The operator's rejoin of a diverged replica (divergence saved aside): its log is cut back to
  // the longest common prefix with the primary's, and it streams from there.
  void Rejoin(int r, int p) {
    Site& rs = sites_[r];
    const Site& ps = sites_[p];
    if (!rs.up || rs.primary) return;
    uint64_t keep = core::CommonPrefix(ps.history, ps.last(), rs.history, rs.last());
    if (plant_ == Plant::kRejoinKeepsTail) {
      keep = std::min(rs.last(), ps.last());
      rs.history = core::HistoryUpTo(ps.history, keep);
    }
    for (const auto& [lsn, rec] : sync_check_ ? sync_done_ : std::map<uint64_t, Rec>{}) {
      if (lsn > keep && lsn <= rs.last() && rs.log[lsn - 1] == rec) {
        Fail("invariant (sync): the rejoin of " + rs.name + " would drop LSN " +
             std::to_string(lsn) + ", a write completed in sync mode (common prefix with " +
             ps.name + " is " + std::to_string(keep) + ")");
        return;
      }
    }
    Trace("rejoin " + rs.name + ": log " + std::to_string(rs.last()) + " cut back to " +
          std::to_string(keep));
    ++rejoins_;
    rs.log.resize(keep);
    rs.durable = std::min<size_t>(rs.durable, keep);
    rs.history = core::HistoryUpTo(rs.history, keep);
    rs.syncing = false;
    if (rs.from >= 0) CutStream(rs.from, r, "rejoin");
    rs.rx = std::make_unique<ReplicaReceiver>(View(rs));
    rs.seen_rx = {};
  }

  void Ship(int p, int r) {
    Site& ps = sites_[p];
    for (int guard = 0; guard < 16; ++guard) {
      const std::optional<core::SendPlan> plan = ps.pg->NextSend(sites_[r].name, now_);
      if (!plan) return;
      std::vector<Rec> recs;
      const uint64_t epoch = ps.log[plan->from_lsn - 1].epoch;
      for (uint64_t lsn = plan->from_lsn; lsn <= plan->to_lsn && recs.size() < plan->max_records;
           ++lsn) {
        if (ps.log[lsn - 1].epoch != epoch) break;
        recs.push_back(ps.log[lsn - 1]);
        if (recs.size() * 4096 >= plan->max_bytes) break;
      }
      ps.pg->OnSent(sites_[r].name, plan->from_lsn, recs.back().lsn, recs.size() * 4096, now_);
      const uint64_t conn = ps.out[r].conn;
      Data(p, r, [this, p, r, epoch, recs, conn] { OnBatch(p, r, epoch, recs, conn); });
    }
  }

  void OnBatch(int p, int r, uint64_t epoch, const std::vector<Rec>& recs, uint64_t conn) {
    Site& rs = sites_[r];
    if (rs.from != p || rs.from_conn != conn || !rs.rx) return;
    const auto c = rs.rx->OnBatch(epoch, recs.front().lsn, static_cast<uint32_t>(recs.size()));
    if (c.verdict == ReplicaReceiver::BatchCheck::Verdict::kReject) {
      Trace(rs.name + " rejects a batch from " + sites_[p].name + ": " + c.reason);
      CutStream(p, r, "batch rejected: " + c.reason);
      return;
    }
    for (size_t k = c.skip_records; k < recs.size(); ++k) {
      const Rec& rec = recs[k];
      if (rec.lsn != rs.last() + 1) {
        Fail("sim: " + rs.name + " would append LSN " + std::to_string(rec.lsn) + " after " +
             std::to_string(rs.last()));
        return;
      }
      rs.log.push_back(rec);
    }
    rs.history = rs.rx->view().history;
    rs.rx->OnAppended(rs.last());
    Ack(r);
  }

  void Ack(int r) {
    Site& rs = sites_[r];
    if (rs.from < 0 || !rs.rx) return;
    const std::optional<Positions> pos = rs.rx->TakeAck();
    if (!pos) return;
    const int p = rs.from;
    const uint64_t conn = rs.from_conn;
    Data(r, p, [this, p, r, pos, conn] {
      Site& ps = sites_[p];
      if (!ps.pg || !ps.out[r].up || ps.out[r].conn != conn) return;
      ps.pg->OnPosition(sites_[r].name, *pos, now_);
    });
  }

  // The log's fsync: one at a time, each 0.2 to 3 ms.
  void Disk(int i) {
    Site& s = sites_[i];
    if (s.syncing && now_ >= s.sync_done_at) {
      s.syncing = false;
      s.durable = std::max(s.durable, std::min(s.sync_target, s.log.size()));
      if (s.pg) {
        s.pg->OnLocalDurable(s.durable);
        s.pg->OnLocalApplied(s.durable);
      }
      if (s.rx && !s.primary) {
        s.rx->OnDurable(s.durable);
        s.rx->OnApplied(s.durable);
        Ack(i);
      }
    }
    if (!s.syncing && s.durable < s.log.size()) {
      s.syncing = true;
      s.sync_target = s.log.size();
      s.sync_done_at = now_ + static_cast<Nanos>(rng_.Range(200, 3000)) * 1000;
    }
  }

  void Primary(int i) {
    Site& s = sites_[i];
    for (int j = 0; j < kSites; ++j) {
      if (j == i) continue;
      if (!s.out[j].up && now_ >= s.out[j].redial_at && sites_[j].up && !part_[i][j]) Dial(i, j);
      if (s.out[j].up && part_[i][j]) CutStream(i, j, "partition");
      if (s.out[j].up && s.out[j].acked) Ship(i, j);
    }
    if (s.io && rng_.Chance(0.5)) {
      const uint64_t n = rng_.Range(1, 3);
      for (uint64_t k = 0; k < n; ++k) {
        Rec rec{s.epoch, s.last() + 1, rng_.Next()};
        s.log.push_back(rec);
        s.pg->OnLocalAppend(rec.lsn, 4096, 1 + rec.lsn, now_);
        s.pending.push_back(rec.lsn);
      }
    }
    s.pg->OnTick(now_);
    PublishSyncSet(i);
    Complete(i);
    if (now_ >= s.next_primary_report) {
      s.next_primary_report = now_ + 250 * kMs;
      PublishPrimaryReport(i);
    }
  }

  bool InSyncMode(const Site& s) const {
    for (const core::PeerStatus& st : s.pg->Status(now_)) {
      if (st.mode == Mode::kSync && st.in_sync_set) return true;
    }
    return false;
  }

  void Complete(int i) {
    Site& s = sites_[i];
    if (!s.io) return;
    const uint64_t released = plant_ == Plant::kNoSyncWait ? s.durable : s.pg->flush_released();
    const bool sync = InSyncMode(s);
    while (!s.pending.empty() && s.pending.front() <= released) {
      const uint64_t lsn = s.pending.front();
      s.pending.pop_front();
      ++completions_;
      // (epoch): one site per epoch, epochs never go back.
      auto [it, fresh] = epoch_site_.emplace(s.epoch, i);
      if (!fresh && it->second != i) {
        Fail("invariant (epoch): " + s.name + " completes a write in epoch " +
             std::to_string(s.epoch) + ", where " + sites_[it->second].name + " completed too");
      }
      if (s.epoch < max_completed_epoch_) {
        Fail("invariant (epoch): " + s.name + " completes a write in epoch " +
             std::to_string(s.epoch) + " after a write completed in epoch " +
             std::to_string(max_completed_epoch_));
      }
      max_completed_epoch_ = std::max(max_completed_epoch_, s.epoch);
      if (sync) {
        ++sync_completions_;
        sync_done_[lsn] = s.log[lsn - 1];
      }
    }
  }

  void PublishPrimaryReport(int i) {
    Site& s = sites_[i];
    PrimaryReport r;
    r.site = s.name;
    r.epoch = s.epoch;
    r.last_lsn = s.last();
    for (const core::PeerStatus& st : s.pg->Status(now_)) {
      const uint64_t oldest = st.lag.oldest_timestamp_ns;
      r.peers[st.peer] = {st.positions.durable, st.lag.bytes,
                          oldest == 0 ? 0 : static_cast<Nanos>(now_ - static_cast<Nanos>(oldest))};
    }
    const uint64_t epoch = s.epoch;
    const std::string name = s.name;
    // A Txn guarded by the leader key's create revision and value.
    Etcd(i, [this, r, epoch, name]() -> std::function<void()> {
      if (key_.present && key_.epoch == epoch && key_.site == name) {
        primary_report_ = r;
        ++revision_;
      }
      return nullptr;
    });
  }

  // What the node and the coordinator do with the sync set: one Txn at a time, guarded by the
  // leader key's create revision and value like the primary report; no answer by the deadline
  // (longer than any delay of a request) is a failure whose outcome is unknown.
  void PublishSyncSet(int i) {
    Site& s = sites_[i];
    const std::optional<core::SyncSet> want = s.pg->SyncSetToPublish();
    if (!want) return;
    s.pg->OnSyncSetSent(*want);
    const uint64_t nr = ++s.sync_publishes;
    const uint64_t epoch = s.epoch;
    const uint64_t inc = s.incarnation;
    const std::string name = s.name;
    const core::SyncSet set = *want;
    auto done = [this, i, nr, epoch, inc, set](bool ok) {
      Site& t = sites_[i];
      if (!t.up || t.incarnation != inc || t.sync_publishes != nr || !t.pg || t.epoch != epoch)
        return;
      ++t.sync_publishes;  // answered: the deadline is void
      Trace(t.name + ": sync set " + core::DescribeSyncSet(set) + (ok ? " published" : " failed"));
      t.pg->OnSyncSetPublished(set, ok);
    };
    At(now_ + 10 * max_delay_ + 100 * kMs, [done] { done(false); });
    Etcd(i, [this, epoch, name, set, done]() -> std::function<void()> {
      const bool ok = key_.present && key_.epoch == epoch && key_.site == name;
      if (ok) {
        sync_key_ = PublishedSyncSet{name, epoch, set};
        ++revision_;
      }
      return [done, ok] { done(ok); };
    });
  }

  void PublishSiteReport(int i) {
    Site& s = sites_[i];
    if (s.lease == 0) return;
    const int64_t lease = s.lease;
    // After a failed promotion the coordinator says so in the report (core::FailoverMachine).
    const bool failed = s.m && s.m->promotion_refused(Local(i));
    const bool planted = plant_ == Plant::kFailedAsNoFailover;
    const SiteReport r{s.durable, true, failed && planted, failed && !planted};
    Etcd(i, [this, i, lease, r]() -> std::function<void()> {
      if (LeaseAlive(lease)) {
        site_reports_[i] = {r, lease};
        ++revision_;
      }
      return nullptr;
    });
  }

  // ---- one step -----------------------------------------------------------------------------

  void Faults() {
    for (int i = 0; i < kSites; ++i) {
      Site& s = sites_[i];
      if (s.up && rng_.Chance(s.primary ? 0.0015 : 0.0006)) Crash(i);
      if (rng_.Chance(etcd_cut_[i] ? 0.004 : 0.0008)) {
        etcd_cut_[i] = !etcd_cut_[i];
        Trace(s.name + (etcd_cut_[i] ? " cut off from etcd" : " reaches etcd again"));
      }
      for (int j = i + 1; j < kSites; ++j) {
        if (rng_.Chance(part_[i][j] ? 0.005 : 0.0005)) {
          part_[i][j] = part_[j][i] = !part_[i][j];
          Trace("link " + s.name + "-" + sites_[j].name + (part_[i][j] ? " cut" : " heals"));
        }
      }
    }
    if (rng_.Chance(0.0005)) {
      // An etcd leader change: unavailable for up to 0.5 s, then every lease renewed for a TTL.
      ++etcd_changes_;
      if (EtcdUp()) etcd_down_since_ = now_;
      etcd_down_until_ = now_ + static_cast<Nanos>(rng_.Range(0, 500)) * kMs;
      extend_leases_ = true;
      Trace("etcd leader change");
    }
  }

  void EtcdExpire() {
    for (auto it = leases_.begin(); it != leases_.end();) {
      if (it->second <= now_) {
        if (key_.present && key_.lease == it->first) {
          Trace("etcd: lease of " + key_.site + " expired, leader key deleted");
          key_ = LeaderView{};
          ++revision_;
        }
        for (auto r = site_reports_.begin(); r != site_reports_.end();) {
          r = r->second.second == it->first ? site_reports_.erase(r) : std::next(r);
        }
        it = leases_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void Step(bool faults) {
    faults_on_ = faults;
    if (faults) Faults();
    for (int i = 0; i < kSites; ++i) {
      if (!sites_[i].up && now_ >= sites_[i].restart_at) {
        sites_[i].up = true;
        Trace("restart " + sites_[i].name);
        Start(i);
      }
    }
    if (EtcdUp() && extend_leases_) {
      // The new etcd leader renews every lease for a full TTL before it expires any.
      extend_leases_ = false;
      for (auto& [id, expiry] : leases_) {
        if (expiry > etcd_down_since_) expiry = std::max(expiry, now_ + ttl_);
      }
    }
    if (EtcdUp()) EtcdExpire();
    // Watches: every change of the key reaches every site; so does the primary report.
    if (!(key_ == watched_key_) && EtcdUp()) {
      watched_key_ = key_;
      for (int i = 0; i < kSites; ++i) {
        Etcd(i, [this, i]() -> std::function<void()> {
          const LeaderView v = key_;
          const int64_t rev = static_cast<int64_t>(revision_);
          return [this, i, v, rev] {
            Handle(i, EvLeader{v, rev});
            // The coordinator publishes and reads the reports as soon as it sees the key vanish.
            if (!v.present && sites_[i].up) {
              PublishSiteReport(i);
              ReadReports(i);
            }
          };
        });
      }
    }
    const bool report_changed =
        primary_report_.has_value() != watched_report_.has_value() ||
        (primary_report_ && (primary_report_->site != watched_report_->site ||
                             primary_report_->epoch != watched_report_->epoch));
    if ((report_changed || now_ % (500 * kMs) == 0) && EtcdUp()) {
      watched_report_ = primary_report_;
      for (int i = 0; i < kSites; ++i) {
        Etcd(i, [this, i]() -> std::function<void()> {
          const std::optional<PrimaryReport> r = primary_report_;
          return [this, i, r] { Handle(i, EvPrimaryReport{r}); };
        });
      }
    }
    for (int i = 0; i < kSites; ++i) {
      Site& s = sites_[i];
      if (!s.up) continue;
      if (now_ % (1000 * kMs) == 0) ReadLeader(i);
      if (s.lease == 0 &&
          (!s.session_pending || now_ - s.session_requested > 10 * max_delay_ + 100 * kMs)) {
        NewSession(i);
      }
      if (s.lease != 0 && now_ >= s.next_keepalive) {
        s.next_keepalive = now_ + ttl_ / 4;  // 3/8 of suspend_after, as the coordinator
        KeepAlive(i);
      }
      if (now_ >= s.next_site_report) {
        s.next_site_report = now_ + 200 * kMs;
        PublishSiteReport(i);
        ReadReports(i);
      }
    }
    // Deliver what is due, in time order.
    while (!queue_.empty() && queue_.begin()->first.first <= now_ && !failure_) {
      auto fn = std::move(queue_.begin()->second);
      queue_.erase(queue_.begin());
      fn();
    }
    for (int i = 0; i < kSites && !failure_; ++i) {
      Site& s = sites_[i];
      if (!s.up) continue;
      Handle(i, EvTick{});
      Disk(i);
      if (s.primary) Primary(i);
    }
    if (!failure_) Check();
    now_ += kStep;
  }

  void Check() {
    int with_io = -1;
    for (int i = 0; i < kSites; ++i) {
      const Site& s = sites_[i];
      if (!s.up) continue;
      // (overlap)
      if (s.io) {
        if (with_io >= 0) {
          Fail("invariant (overlap): " + sites_[with_io].name + " and " + s.name +
               " both complete client I/O at t=" + std::to_string(now_ / kMs) + " ms; " + Roles());
          return;
        }
        with_io = i;
        if (!s.primary || !key_.present || key_.site != s.name || key_.epoch != s.epoch) {
          Fail("invariant (overlap): " + s.name + " completes I/O in epoch " +
               std::to_string(s.epoch) + " but the key at etcd is " +
               (key_.present ? key_.site + " epoch " + std::to_string(key_.epoch) : "absent"));
          return;
        }
      }
      // (monotone)
      if (s.pg) {
        const uint64_t w = s.pg->write_released(), f = s.pg->flush_released();
        if (w < s.seen_write_released || f < s.seen_flush_released) {
          Fail("invariant (monotone): " + s.name + "'s release points went back");
          return;
        }
        sites_[i].seen_write_released = w;
        sites_[i].seen_flush_released = f;
        for (const core::PeerStatus& st : s.pg->Status(now_)) {
          Positions& seen = sites_[i].seen_positions[st.peer];
          if (st.positions.received < seen.received || st.positions.durable < seen.durable ||
              st.positions.applied < seen.applied) {
            Fail("invariant (monotone): " + s.name + "'s positions of " + st.peer + " went back");
            return;
          }
          seen = st.positions;
        }
      }
      if (s.rx && !s.primary && s.from >= 0) {
        const Positions& p = s.rx->positions();
        if (p.received < s.seen_rx.received || p.durable < s.seen_rx.durable) {
          Fail("invariant (monotone): " + s.name + "'s receiver positions went back");
          return;
        }
        sites_[i].seen_rx = p;
        // (prefix)
        const Site& ps = sites_[s.from];
        const size_t n = std::min(s.log.size(), ps.log.size());
        for (size_t k = 0; k < n; ++k) {
          if (!(s.log[k] == ps.log[k])) {
            Fail("invariant (prefix): " + s.name + "'s log differs from its primary " + ps.name +
                 "'s at LSN " + std::to_string(k + 1));
            return;
          }
        }
        if (s.log.size() > ps.log.size()) {
          Fail("invariant (prefix): " + s.name + "'s log (" + std::to_string(s.last()) +
               ") is longer than its primary " + ps.name + "'s (" + std::to_string(ps.last()) +
               ")");
          return;
        }
      }
    }
  }

  bool Live(uint64_t done_before) const {
    if (completions_ <= done_before) return false;
    for (int i = 0; i < kSites; ++i) {
      const Site& s = sites_[i];
      if (!s.primary || !s.io) continue;
      for (int j = 0; j < kSites; ++j) {
        if (j != i && (!s.out[j].acked || sites_[j].from != i)) return false;
      }
      return true;
    }
    return false;
  }

  std::string Roles() const {
    std::string r;
    for (const Site& s : sites_) {
      r += s.name + "=" +
           (!s.up       ? "down"
            : s.primary ? "primary(e" + std::to_string(s.epoch) + (s.io ? ",io" : "") + ")"
            : s.m       ? FailoverMachine::StateName(s.m->state())
                        : "?") +
           "[log " + std::to_string(s.last()) + "/" + std::to_string(s.durable) + "] ";
    }
    r += "key=" + (key_.present ? key_.site + "@" + std::to_string(key_.epoch) : "none");
    if (primary_report_) {
      r += "; primary report: " + primary_report_->site + " epoch " +
           std::to_string(primary_report_->epoch) + " last " +
           std::to_string(primary_report_->last_lsn);
      for (const auto& [peer, lag] : primary_report_->peers) {
        r += ", " + peer + " durable " + std::to_string(lag.lsn) + " lag " +
             std::to_string(lag.bytes) + " bytes";
      }
    }
    if (sync_key_) r += "; " + sync_key_->Describe();
    r += "; lag gate " + std::to_string(max_lag_bytes_) + " bytes";
    return r;
  }

  Rng rng_;
  Plant plant_;
  bool trace_;
  bool sync_check_;
  bool sync_set_;  // the primary publishes its sync set and the election follows it
  bool promotion_failures_;
  bool faults_on_ = true;  // Step(faults): failures are injected only while faults last
  Rng promo_rng_;
  uint64_t failed_promotions_ = 0, resigns_ = 0;
  Nanos ttl_ = 0, max_delay_ = 0, degrade_ = 0;
  double loss_ = 0;
  uint64_t max_lag_bytes_ = 0;
  Mode modes_[kSites];
  int64_t drift_ppm_[kSites] = {};
  std::map<std::string, SiteReport> last_sites_[kSites];  // --trace: the last EvSites per site
  Nanos latency_[kSites][kSites] = {};
  Nanos last_data_at_[kSites][kSites] = {};
  bool part_[kSites][kSites] = {};
  bool etcd_cut_[kSites] = {};
  Site sites_[kSites];
  Nanos now_ = 0;
  int step_ = 0;
  std::optional<Failure> failure_;
  std::map<std::pair<Nanos, uint64_t>, std::function<void()>> queue_;
  uint64_t seq_ = 0;
  uint64_t next_conn_ = 0;
  // etcd
  uint64_t revision_ = 1;
  int64_t next_lease_ = 1;
  std::map<int64_t, Nanos> leases_;  // id -> expiry
  LeaderView key_, watched_key_;
  std::optional<PrimaryReport> primary_report_, watched_report_;
  std::optional<PublishedSyncSet> sync_key_;
  std::map<int, std::pair<SiteReport, int64_t>> site_reports_;  // site -> (report, lease)
  Nanos etcd_down_until_ = 0, etcd_down_since_ = 0;
  bool extend_leases_ = false;
  // history of the run
  std::map<uint64_t, int> epoch_site_;  // epoch -> the site that completed writes in it
  uint64_t max_completed_epoch_ = 0;
  std::map<uint64_t, Rec> sync_done_;  // LSN -> record of writes completed in sync mode
  uint64_t promotions_ = 0, completions_ = 0, sync_completions_ = 0, crashes_ = 0, rejoins_ = 0,
           etcd_changes_ = 0;

 public:
  uint64_t failed_promotions() const { return failed_promotions_; }
  uint64_t resigns() const { return resigns_; }
};

int Usage() {
  std::fprintf(stderr,
               "usage: tvilling_failover_sim [--seed N] [--seeds N|LO:HI] [--steps N] [--mixed]\n"
               "         [--no-sync-check] [--no-sync-set] [--promotion-failures]\n"
               "         [--planted-bug suspend-late|no-sync-wait|rejoin-keeps-tail|"
               "failed-as-no-failover "
               "--expect-failure] [--trace]\n");
  return 2;
}

int Main(int argc, char** argv) {
  uint64_t seed = 1, seeds = 1;
  int steps = 4000;
  std::string plant_name = "none";
  bool expect_failure = false, trace = false, mixed = false, sync_check = true, sync_set = true,
       promotion_failures = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (a == "--seed" || a == "--seeds" || a == "--steps" || a == "--planted-bug") {
      const char* v = value();
      if (!v) return Usage();
      if (a == "--seed") seed = std::strtoull(v, nullptr, 10);
      if (a == "--seeds") {
        if (const char* colon = std::strchr(v, ':')) {
          const uint64_t lo = std::strtoull(v, nullptr, 10),
                         hi = std::strtoull(colon + 1, nullptr, 10);
          if (hi < lo) return Usage();
          seed = lo;
          seeds = hi - lo + 1;
        } else {
          seeds = std::strtoull(v, nullptr, 10);
        }
      }
      if (a == "--steps") steps = std::atoi(v);
      if (a == "--planted-bug") plant_name = v;
    } else if (a == "--expect-failure") {
      expect_failure = true;
    } else if (a == "--trace") {
      trace = true;
    } else if (a == "--mixed") {
      mixed = true;
    } else if (a == "--no-sync-check") {
      sync_check = false;
    } else if (a == "--no-sync-set") {
      sync_set = false;
    } else if (a == "--promotion-failures") {
      promotion_failures = true;
    } else {
      return Usage();
    }
  }
  const std::optional<Plant> plant = ParsePlant(plant_name);
  if (!plant || steps <= 0 || seeds == 0) return Usage();
  uint64_t promotions = 0, completions = 0, rejoins = 0, crashes = 0, failed = 0, resigns = 0;
  for (uint64_t s = seed; s < seed + seeds; ++s) {
    Sim sim(s, *plant, trace, mixed, sync_check, sync_set, promotion_failures);
    const std::optional<Failure> f = sim.Run(steps);
    promotions += sim.promotions();
    completions += sim.completions();
    rejoins += sim.rejoins();
    crashes += sim.crashes();
    failed += sim.failed_promotions();
    resigns += sim.resigns();
    if (f) {
      std::printf(
          "seed %llu step %d: %s\n  (%s)\n  replay: tvilling_failover_sim --seed %llu "
          "--steps %d%s%s%s%s%s%s --trace\n",
          static_cast<unsigned long long>(s), f->step, f->what.c_str(), sim.Summary().c_str(),
          static_cast<unsigned long long>(s), steps, mixed ? " --mixed" : "",
          sync_check ? "" : " --no-sync-check", sync_set ? "" : " --no-sync-set",
          promotion_failures ? " --promotion-failures" : "",
          plant_name == "none" ? "" : " --planted-bug ",
          plant_name == "none" ? "" : plant_name.c_str());
      if (expect_failure) {
        if (plant_name == "none") {
          std::printf("expected failure found\n");
        } else {
          std::printf("planted bug %s found\n", plant_name.c_str());
        }
        return 0;
      }
      return 1;
    }
    if (seeds == 1) {
      std::printf("seed %llu ok: %s\n", static_cast<unsigned long long>(s), sim.Summary().c_str());
    }
  }
  std::printf(
      "%llu seeds x %d steps ok (promotions %llu, writes completed %llu, crashes %llu, "
      "rejoins %llu, failed promotions %llu, resigned keys %llu)\n",
      static_cast<unsigned long long>(seeds), steps, static_cast<unsigned long long>(promotions),
      static_cast<unsigned long long>(completions), static_cast<unsigned long long>(crashes),
      static_cast<unsigned long long>(rejoins), static_cast<unsigned long long>(failed),
      static_cast<unsigned long long>(resigns));
  if (expect_failure) {
    std::printf("expected failure (planted bug %s) NOT found in %llu seeds\n", plant_name.c_str(),
                static_cast<unsigned long long>(seeds));
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace tvilling::sim

int main(int argc, char** argv) { return tvilling::sim::Main(argc, argv); }
