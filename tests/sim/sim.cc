// sim.cc: tvilling_sim, a seeded deterministic simulation of one replication group.
//
// One process drives the REAL agent/core state machines (PrimaryGroup at the primary, a
// ReplicaReceiver per replica) over a simulated network (in-order streams with delay; a lost
// message cuts the link, which is redialled; partitions that heal), simulated logs (written and
// durable parts; a crash drops the undurable tail), simulated volumes (block -> value), a
// simulated clock and random client writes and flushes. After every step it checks:
//   (a) sync completion: every WRITE completed while a peer was in the sync set is in that
//       replica's log, every completed FLUSH target in its durable log (also after its crashes);
//       every replica log record equals the primary's record at that LSN;
//   (b) a replica that says it is consistent has the primary's volume as of its applied LSN;
//   (c) positions and release points held by PrimaryGroup never go backwards (except the one
//       documented reset when a full copy from the start replaces the peer's log);
//   (d) the lag PrimaryGroup reports equals the truth computed from the simulated logs.
// With --rejoin a diverged replica rejoins instead of being refused (docs/replication.md,
// "Rejoin"): its saved tail must be exactly the records the primary lost, and after the cut and
// the restore of the extents it is a prefix of the primary's log and (b) holds again.
// A failing seed prints the seed, the step, the invariant and the command that replays it.
// --planted-bug makes the simulated replica misbehave, to show the invariants catch it.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "agent/core/replication.h"

namespace tvilling::sim {
namespace {

using core::HandshakeDecision;
using core::History;
using core::Mode;
using core::Nanos;
using core::Positions;
using core::PrimaryGroup;
using core::PrimaryHello;
using core::ReplicaReceiver;
using core::ReplicaView;

constexpr Nanos kMs = 1'000'000;
constexpr uint64_t kBlockSize = 4096;
constexpr uint64_t kMaxRecordBytes = 9000;
constexpr uint64_t kNoDivergence = ~0ull;

enum class Plant {
  kNone,
  kAckBeforeDurable,
  kAckBeforeAppend,
  kCopyDoneEarly,
  kRestoreSkipsChunks  // --rejoin: the replica drops the chunks of a restore
};

std::optional<Plant> ParsePlant(const std::string& s) {
  if (s == "none") return Plant::kNone;
  if (s == "ack-before-durable") return Plant::kAckBeforeDurable;
  if (s == "ack-before-append") return Plant::kAckBeforeAppend;
  if (s == "copy-done-early") return Plant::kCopyDoneEarly;
  if (s == "restore-skips-chunks") return Plant::kRestoreSkipsChunks;
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
  uint32_t block = 0;
  uint64_t value = 0;
  uint64_t bytes = 0;
  uint64_t timestamp_ns = 0;
  bool operator==(const Rec&) const = default;
};

struct Msg {
  enum class Kind {
    kHello,
    kDecision,
    kBatch,
    kCopyBegin,
    kCopyChunk,
    kCopyDone,
    kPosition,
    kPing,
    kPong
  } kind;
  Nanos deliver_at = 0;
  PrimaryHello hello;
  HandshakeDecision decision;
  uint64_t epoch = 0;
  uint64_t lsn = 0;  // batch first LSN, copy log start, copy done L1
  std::vector<Rec> recs;
  bool durable_requested = false;
  History history;
  uint32_t first_block = 0;
  std::vector<uint64_t> values;
  Positions pos;
  Nanos ping_sent = 0;
};

struct Replica;

// One stream between the primary and one replica: TCP-like, so in order, and a loss is a cut.
struct Link {
  bool up = false;
  bool hello_acked = false;
  // The replica accepted this connection's Hello: like agent/node's ReplicaGroup, it reports
  // positions only on an accepted stream (never before its decision, never after a refusal).
  bool accepted = false;
  std::deque<Msg> to_replica, to_primary;
  Nanos latency = 0;
  Nanos partitioned_until = 0;
  Nanos redial_at = 0;
  Nanos next_ping = 0;
  bool first_batch = true;  // the first batch of a connection may overlap (exercises skipping)
  // Primary-side copy task.
  bool copying = false;
  // A restore (kRestore) copies only these blocks, once the applier reached restore_min.
  bool restore = false;
  std::vector<uint32_t> restore_blocks;
  size_t restore_next = 0;
  uint64_t restore_min = 0;
  uint32_t copy_next_block = 0;
  bool copy_begin_in_flight = false;
};

struct Replica {
  std::string name;
  Mode mode = Mode::kAsync;
  std::unique_ptr<ReplicaReceiver> rx;
  Link link;
  // The log: log[i] has LSN log_start + i; the first durable_count are fsynced.
  uint64_t log_start = 1;
  std::vector<Rec> log;
  size_t durable_count = 0;
  // The volume (writes are durable at once) and the applied LSN checkpointed with it.
  std::vector<uint64_t> volume;
  uint64_t applied = 0;
  // Disk work in progress: one append (the stream waits for it) and one fsync.
  bool appending = false;
  Nanos append_done_at = 0;
  std::vector<Rec> append_recs;
  bool append_durable_requested = false;
  bool syncing = false;
  Nanos sync_done_at = 0;
  size_t sync_target = 0;
  bool sync_again = false;
  Nanos last_sync = 0;
  // What completed client I/O promises this replica holds (a).
  uint64_t must_written = 0;
  uint64_t must_durable = 0;
  // The base the primary registered for a copy the replica has not begun (CopyBegin not seen).
  uint64_t copy_floor = 0;
  // The highest `received` it ever reported, and its value at its last crash: the primary keeps
  // positions across reconnects, so WRITEs up to it may complete after the crash lost them (an
  // unflushed write is in a volatile cache, as on a block device); FLUSHes may not.
  uint64_t reported_received = 0;
  uint64_t excused_written = 0;
  core::SenderOptions options;  // how the primary ships to it (kept across primary restarts)
  // Divergence: a primary crash lost records after div_point that this replica holds. Its log
  // then follows the old lineage after div_point (old_recs[i] is LSN div_point + 1 + i, and
  // old_states[i] the volume after it) until a crash of its own drops them or a resync.
  uint64_t div_point = kNoDivergence;
  std::vector<Rec> old_recs;
  std::vector<std::vector<uint64_t>> old_states;
  int resyncs = 0;

  bool Diverged() const { return div_point != kNoDivergence && WrittenLast() > div_point; }

  uint64_t WrittenLast() const { return log_start - 1 + log.size(); }
  uint64_t DurableLast() const { return log_start - 1 + durable_count; }
};

struct Failure {
  int step;
  std::string what;
};

class Sim {
 public:
  Sim(uint64_t seed, Plant plant, bool trace, bool both_sync, bool primary_restarts,
      bool rejoin = false)
      : rng_{seed * 0x2545F4914F6CDD1Dull + 1},
        plant_(plant),
        trace_(trace),
        primary_restarts_enabled_(primary_restarts || rejoin),
        rejoin_(rejoin) {
    nblocks_ = static_cast<uint32_t>(rng_.Range(4, 24));
    states_.push_back(std::vector<uint64_t>(nblocks_, 0));
    primary_volume_ = states_[0];
    const uint64_t variant = rng_.Below(4);
    const Nanos degrade = variant >= 2 ? static_cast<Nanos>(rng_.Range(20, 200)) * kMs : 0;
    degrade_after_ = degrade;
    max_kept_ = rng_.Range(20, 200);
    // Half the histories have an applier that often catches up with the log (before its fsync,
    // as agent/node's does), half a slow one (copy bases far behind the peers).
    applier_catch_up_ = rng_.Chance(0.5) ? 0.3 : 0.0;
    Nanos now = 0;
    for (int i = 0; i < 2; ++i) {
      auto r = std::make_unique<Replica>();
      r->name = i == 0 ? "sun-2" : "osl-3";
      r->mode = (i == 0 || both_sync || variant == 1 || variant == 3) ? Mode::kSync : Mode::kAsync;
      r->volume.assign(nblocks_, 0);
      r->link.latency = static_cast<Nanos>(rng_.Range(1, 10)) * kMs;
      ReplicaView v;
      v.group_known = true;
      v.volume_sizes = {nblocks_ * kBlockSize};
      v.on_divergence = rejoin_ ? core::OnDivergence::kRejoin : core::OnDivergence::kRefuse;
      r->rx = std::make_unique<ReplicaReceiver>(v);
      core::SenderOptions o;
      o.mode = r->mode;
      o.min_window_bytes = rng_.Range(4, 32) * 1024;
      o.max_window_bytes = o.min_window_bytes * rng_.Range(1, 8);
      o.max_batch_bytes = rng_.Range(2, 32) * 1024;
      o.max_batch_records = static_cast<uint32_t>(rng_.Range(1, 64));
      o.max_batch_delay = static_cast<Nanos>(rng_.Range(0, 3)) * kMs;
      o.sync_degrade_after = r->mode == Mode::kSync ? degrade : 0;
      r->options = o;
      pg_.AddPeer(r->name, o, {}, now);
      replicas_.push_back(std::move(r));
    }
    prev_.resize(replicas_.size());
  }

  std::optional<Failure> Run(int steps) {
    for (step_ = 0; step_ < steps; ++step_) {
      Step();
      if (failure_) return failure_;
      Check();
      if (failure_) return failure_;
    }
    // Liveness: with the faults and writes stopped, every pending WRITE and FLUSH completes and
    // every replica catches up, durable and consistent at the primary's last LSN.
    quiet_ = true;
    for (auto& r : replicas_) r->link.partitioned_until = 0;
    pending_flushes_.push_back(last_);
    // Generous: the appliers move a few records per step, so allow for the whole backlog.
    const int quiet_steps = 5000 + 10 * static_cast<int>(last_);
    const int limit = step_ + quiet_steps;
    for (; step_ < limit; ++step_) {
      Step();
      if (failure_) return failure_;
      Check();
      if (failure_) return failure_;
      if (CaughtUp()) return std::nullopt;
    }
    std::string why = "liveness: not caught up " + std::to_string(quiet_steps) +
                      " quiet steps after the faults stopped:";
    why += " pending writes " + std::to_string(pending_writes_.size()) + ", flushes " +
           std::to_string(pending_flushes_.size());
    for (const core::PeerStatus& st : pg_.Status(now_))
      why += "; " + st.peer + " " + core::LinkStateName(st.state) + " received " +
             std::to_string(st.positions.received) + " durable " +
             std::to_string(st.positions.durable) + " applied " +
             std::to_string(st.positions.applied) + " next " + std::to_string(st.next_lsn) +
             " inflight " + std::to_string(st.inflight_bytes) + " window " +
             std::to_string(st.window_bytes) + " (" + st.last_error + ")";
    why += "; primary last " + std::to_string(last_);
    Fail(why);
    return failure_;
  }

  bool CaughtUp() const {
    if (!pending_writes_.empty() || !pending_flushes_.empty()) return false;
    for (const core::PeerStatus& st : pg_.Status(now_))
      if (st.positions.durable != last_ || st.positions.applied != last_) return false;
    for (const auto& r : replicas_)
      if (!r->rx->consistent() || r->applied != last_) return false;
    return true;
  }

  std::string Summary() const {
    std::string s = "last " + std::to_string(last_) + ", writes completed " +
                    std::to_string(writes_done_) + ", flushes " + std::to_string(flushes_done_) +
                    ", copies " + std::to_string(copies_) + ", cuts " + std::to_string(cuts_) +
                    ", crashes " + std::to_string(crashes_) + ", degrades " +
                    std::to_string(degrades_) + ", rejoins " + std::to_string(rejoins_) +
                    ", primary restarts " + std::to_string(primary_restarts_) + " (epoch " +
                    std::to_string(epoch_) + "), divergences " + std::to_string(divergences_) +
                    ", resyncs " + std::to_string(resyncs_) + ", rejoins after divergence " +
                    std::to_string(rejoins_done_) + " (saved " + std::to_string(saved_records_) +
                    " records, restores " + std::to_string(restores_) + ")";
    return s;
  }
  uint64_t copies() const { return copies_; }
  uint64_t crashes() const { return crashes_; }
  uint64_t degrades() const { return degrades_; }
  uint64_t primary_restarts() const { return primary_restarts_; }
  uint64_t resyncs() const { return resyncs_; }
  uint64_t rejoins_after_divergence() const { return rejoins_done_; }
  uint64_t restores() const { return restores_; }

 private:
  void Trace(const std::string& s) {
    if (trace_) std::fprintf(stderr, "[%d t=%.3fms] %s\n", step_, now_ / 1e6, s.c_str());
  }
  void Fail(const std::string& what) {
    if (!failure_) failure_ = Failure{step_, what};
  }

  // ---- network ------------------------------------------------------------------------------

  void Send(Replica& r, bool to_replica, Msg m) {
    Link& l = r.link;
    if (!l.up) return;
    std::deque<Msg>& q = to_replica ? l.to_replica : l.to_primary;
    Nanos at = now_ + l.latency + static_cast<Nanos>(rng_.Below(l.latency / 2 + 1));
    if (!q.empty()) at = std::max(at, q.back().deliver_at);  // a stream keeps its order
    m.deliver_at = at;
    q.push_back(std::move(m));
  }

  void Cut(Replica& r, const std::string& why, Nanos backoff) {
    Link& l = r.link;
    if (!l.up) return;
    Trace("cut " + r.name + ": " + why);
    ++cuts_;
    l.up = false;
    l.to_replica.clear();
    l.to_primary.clear();
    l.copying = false;
    l.copy_begin_in_flight = false;
    l.redial_at = now_ + backoff;
    pg_.OnDisconnected(r.name, why, now_);
  }

  void Dial(Replica& r) {
    Link& l = r.link;
    l.up = true;
    l.hello_acked = false;
    l.accepted = false;
    l.first_batch = true;
    l.next_ping = now_;
    pg_.OnConnected(r.name, now_);
    Msg m{Msg::Kind::kHello};
    m.hello.group = "g";
    m.hello.site = "sto-1";
    m.hello.epoch = epoch_;
    m.hello.history = history_;
    m.hello.volume_sizes = {nblocks_ * kBlockSize};
    m.hello.first_lsn = first_;
    m.hello.last_lsn = last_;
    Send(r, true, std::move(m));
    Trace("dial " + r.name);
  }

  // ---- replica ------------------------------------------------------------------------------

  void ReplicaAck(Replica& r) {
    if (!r.link.up || !r.link.accepted) return;
    if (std::optional<Positions> p = r.rx->TakeAck()) {
      Msg m{Msg::Kind::kPosition};
      m.pos = *p;
      if (plant_ == Plant::kAckBeforeDurable) m.pos.durable = m.pos.received;
      r.reported_received = std::max(r.reported_received, m.pos.received);
      Send(r, false, std::move(m));
    }
  }

  void StartSync(Replica& r) {
    if (r.syncing) {
      r.sync_again = true;
      return;
    }
    r.syncing = true;
    r.sync_again = false;
    r.sync_target = r.log.size();
    r.sync_done_at = now_ + static_cast<Nanos>(rng_.Range(200, 3000)) * 1000;
    r.last_sync = now_;
  }

  void ReplicaDisk(Replica& r) {
    if (r.appending && now_ >= r.append_done_at) {
      r.appending = false;
      for (const Rec& rec : r.append_recs) {
        if (rec.lsn != r.WrittenLast() + 1) {
          Fail("replica " + r.name + " appended LSN " + std::to_string(rec.lsn) + " after " +
               std::to_string(r.WrittenLast()));
          return;
        }
        // (a) log matching: a replica's log holds exactly the primary's records (checked as
        // they are appended; a log only grows, or loses its tail, or is replaced by a copy).
        const Rec* want = Expected(r, rec.lsn);
        if (!want || !(rec == *want)) {
          Fail("invariant (a): replica " + r.name + " appended a record at LSN " +
               std::to_string(rec.lsn) + " that differs from the primary's");
          return;
        }
        r.log.push_back(rec);
      }
      r.append_recs.clear();
      r.rx->OnAppended(r.WrittenLast());
      if (r.append_durable_requested) StartSync(r);
      ReplicaAck(r);
    }
    if (r.syncing && now_ >= r.sync_done_at) {
      r.syncing = false;
      r.durable_count = std::max(r.durable_count, std::min(r.sync_target, r.log.size()));
      r.rx->OnDurable(r.DurableLast());
      if (r.sync_again) StartSync(r);
      ReplicaAck(r);
    }
    // replica_sync_interval: unrequested records become durable within 5 ms.
    if (!r.syncing && r.durable_count < r.log.size() && now_ - r.last_sync >= 5 * kMs) StartSync(r);
  }

  void ReplicaApply(Replica& r) {
    if (r.rx->view().copy_in_progress || r.rx->view().restore_pending) return;
    uint64_t n = rng_.Range(1, 6);
    while (n-- > 0 && r.applied < r.DurableLast()) {
      if (r.applied + 1 < r.log_start) {
        Fail("replica " + r.name + " applied " + std::to_string(r.applied) +
             " is below its log start " + std::to_string(r.log_start));
        return;
      }
      const Rec& rec = r.log[r.applied + 1 - r.log_start];
      r.volume[rec.block] = rec.value;
      ++r.applied;
    }
    r.rx->OnApplied(r.applied);
    ReplicaAck(r);
  }

  void ReplicaCrash(Replica& r) {
    Trace("crash " + r.name + " (durable " + std::to_string(r.DurableLast()) + " of " +
          std::to_string(r.WrittenLast()) + ")");
    ++crashes_;
    Cut(r, "replica crashed", static_cast<Nanos>(rng_.Range(5, 50)) * kMs);
    r.log.resize(r.durable_count);
    r.appending = false;
    r.append_recs.clear();
    r.syncing = false;
    r.sync_again = false;
    // The restarted agent rebuilds its view from what is persisted: the durable log and its
    // history, the copy state and newest epoch (persisted synchronously), and the checkpoint.
    ReplicaView v = r.rx->view();
    v.last_lsn = r.DurableLast();
    History h;
    for (const core::EpochStart& e : v.history)
      if (e.first_lsn <= v.last_lsn) h.push_back(e);
    v.history = h;
    r.rx = std::make_unique<ReplicaReceiver>(v);
    r.rx->OnApplied(r.applied);
    // Unsynced writes may be lost (block semantics); what was flushed may not.
    r.excused_written = std::max(r.excused_written, r.reported_received);
    if (r.div_point != kNoDivergence && !r.Diverged()) ClearDivergence(r);
  }

  void ClearDivergence(Replica& r) {
    r.div_point = kNoDivergence;
    r.old_recs.clear();
    r.old_states.clear();
  }

  // The operator's resync of a diverged replica: its log and copy state are discarded (it keeps
  // the newest epoch it has seen), so the next handshake decides a full copy from the start.
  void Resync(Replica& r) {
    Trace("resync " + r.name);
    ++r.resyncs;
    ++resyncs_;
    ReplicaView v;
    v.group_known = true;
    v.newest_epoch = r.rx->newest_epoch();
    v.volume_sizes = {nblocks_ * kBlockSize};
    v.on_divergence = r.rx->view().on_divergence;
    r.rx = std::make_unique<ReplicaReceiver>(v);
    r.log_start = 1;
    r.log.clear();
    r.durable_count = 0;
    r.appending = false;
    r.append_recs.clear();
    r.syncing = false;
    r.sync_again = false;
    r.applied = 0;
    r.must_written = r.must_durable = 0;
    r.reported_received = r.excused_written = 0;
    // The primary still holds the old log's positions until the full copy's decision replaces
    // them (OnDecision resets them to the copy's base).
    for (const core::PeerStatus& st : pg_.Status(now_))
      if (st.peer == r.name) r.copy_floor = std::max(r.copy_floor, st.positions.durable);
    ClearDivergence(r);
  }

  // The replica's side of a kRejoin (agent/node's ReplicaGroup::Rejoin): save the records after
  // the fork (checked against the ground truth: exactly the lineage the primary lost), cut the
  // log back, persist core::PlanRejoin's outcome. Returns false on a failure.
  bool Rejoin(Replica& r, const HandshakeDecision& d, const PrimaryHello& hello) {
    const uint64_t fork = d.fork_lsn;
    if (!r.Diverged() || fork > r.div_point) {
      Fail("invariant (rejoin): " + r.name + " rejoins at fork " + std::to_string(fork) +
           " but its divergence point is " +
           (r.div_point == kNoDivergence ? std::string("none") : std::to_string(r.div_point)));
      return false;
    }
    std::vector<core::Extent> extents;
    bool complete = true;
    for (uint64_t lsn = fork + 1; lsn <= r.WrittenLast(); ++lsn) {
      if (lsn < r.log_start) {
        complete = false;  // only in the volumes (a copy's base): not saved, places unknown
        continue;
      }
      const Rec& rec = r.log[lsn - r.log_start];
      extents.push_back({0, rec.block * kBlockSize, kBlockSize});
      ++saved_records_;
    }
    ReplicaView v = r.rx->view();
    if (!complete) {
      v.consistent = false;
      v.restore_pending = false;
    }
    const core::RejoinPlan plan = core::PlanRejoin(v, fork, extents, r.applied);
    Trace("rejoin " + r.name + " at fork " + std::to_string(fork) + ": saved " +
          std::to_string(extents.size()) + " record(s); " + plan.reason);
    // The cut, as GroupLog::CutBackTo does it.
    if (fork + 1 < r.log_start) {
      r.log.clear();
      r.log_start = fork + 1;
    } else {
      r.log.resize(fork + 1 - r.log_start);
    }
    r.durable_count = std::min(r.durable_count, r.log.size());
    r.sync_target = std::min(r.sync_target, r.log.size());
    r.applied = plan.applied_lsn;
    v = r.rx->view();
    v.history = plan.history;
    v.last_lsn = fork;
    v.newest_epoch = std::max(v.newest_epoch, hello.epoch);
    if (!v.copy_in_progress) {
      v.consistent = false;
      v.restore_pending = plan.restore;
      v.restore_extents = plan.extents;
      v.restore_epoch = 0;
      v.copy_volume = 0;
      v.copy_offset = 0;
    }
    r.rx = std::make_unique<ReplicaReceiver>(v);
    r.rx->OnApplied(r.applied);
    r.must_written = std::min(r.must_written, fork);
    r.must_durable = std::min(r.must_durable, fork);
    ClearDivergence(r);
    ++rejoins_done_;
    return true;
  }

  void ReplicaReceive(Replica& r, Msg& m) {
    switch (m.kind) {
      case Msg::Kind::kHello: {
        // Appends of an earlier stream land first (agent/node waits for its log to be idle).
        if (r.appending) {
          r.append_done_at = now_;
          ReplicaDisk(r);
          if (failure_) return;
        }
        HandshakeDecision d = r.rx->OnHello(m.hello);
        Trace("replica " + r.name + " decides: " + d.reason);
        if (d.kind == HandshakeDecision::Kind::kRejoin) {
          if (!Rejoin(r, d, m.hello)) return;
          d = r.rx->OnHello(m.hello);
          Trace("replica " + r.name + " decides after the cut: " + d.reason);
          if (d.kind == HandshakeDecision::Kind::kRejoin) {
            Fail("invariant (rejoin): " + r.name + " still diverges after the cut: " + d.reason);
            return;
          }
        }
        // Ground truth from the simulated logs: a replica holding records the primary lost must be
        // refused (diverged); one that does not must not be.
        const bool refused_diverged =
            d.kind == HandshakeDecision::Kind::kRefuse && d.code == core::RefuseCode::kDiverged;
        if (r.Diverged() && !refused_diverged) {
          Fail("invariant (divergence): " + r.name + " holds LSNs " +
               std::to_string(r.div_point + 1) + ".." + std::to_string(r.WrittenLast()) +
               " of an old epoch the primary lost, but the handshake decided: " + d.reason);
          return;
        }
        r.link.accepted = d.kind != HandshakeDecision::Kind::kRefuse;
        Msg out{Msg::Kind::kDecision};
        out.decision = d;
        Send(r, false, std::move(out));
        ReplicaAck(r);
        break;
      }
      case Msg::Kind::kBatch: {
        auto c = r.rx->OnBatch(m.epoch, m.lsn, static_cast<uint32_t>(m.recs.size()));
        if (c.verdict == ReplicaReceiver::BatchCheck::Verdict::kReject) {
          Fail("invariant (stream): replica " + r.name + " rejected a batch: " + c.reason);
          return;
        }
        for (size_t i = c.skip_records; i < m.recs.size(); ++i) {
          if (m.recs[i].epoch != m.epoch) Fail("sim: batch mixes epochs");
          r.append_recs.push_back(m.recs[i]);
        }
        if (r.append_recs.empty()) break;
        r.appending = true;
        r.append_done_at = now_ + static_cast<Nanos>(rng_.Range(0, 2000)) * 1000;
        r.append_durable_requested = m.durable_requested;
        if (plant_ == Plant::kAckBeforeAppend) {
          Msg out{Msg::Kind::kPosition};
          out.pos = r.rx->positions();
          out.pos.received = r.append_recs.back().lsn;
          r.reported_received = std::max(r.reported_received, out.pos.received);
          Send(r, false, std::move(out));
        }
        break;
      }
      case Msg::Kind::kCopyBegin: {
        r.link.copy_begin_in_flight = false;
        r.copy_floor = 0;
        r.rx->OnCopyBegin(m.epoch, m.lsn, m.history);
        r.log_start = m.lsn;
        r.log.clear();
        r.durable_count = 0;
        r.syncing = false;
        r.sync_again = false;
        r.applied = m.lsn - 1;
        // The log was replaced: earlier promises are now kept by the copy (checked once done).
        r.must_written = std::min(r.must_written, m.lsn - 1);
        r.must_durable = std::min(r.must_durable, m.lsn - 1);
        ++copies_;
        Trace("replica " + r.name + " copy begins, log from " + std::to_string(m.lsn));
        ReplicaAck(r);
        break;
      }
      case Msg::Kind::kCopyChunk:
        if (plant_ == Plant::kRestoreSkipsChunks && r.rx->view().restore_pending) break;
        for (size_t i = 0; i < m.values.size(); ++i) r.volume[m.first_block + i] = m.values[i];
        r.rx->OnCopyChunk(0, (m.first_block + m.values.size()) * kBlockSize);
        break;
      case Msg::Kind::kCopyDone: {
        // A restore keeps the log and the applied LSN: the applier resumes from it.
        const bool restore = r.rx->view().restore_pending && !r.rx->view().copy_in_progress;
        r.rx->OnCopyDone(plant_ == Plant::kCopyDoneEarly ? r.log_start - 1 : m.lsn);
        if (!restore) r.applied = r.log_start - 1;
        Trace("replica " + r.name + (restore ? " restore" : " copy") + " done at " +
              std::to_string(m.lsn));
        break;
      }
      case Msg::Kind::kPing: {
        Msg out{Msg::Kind::kPong};
        out.ping_sent = m.ping_sent;
        Send(r, false, std::move(out));
        break;
      }
      default:
        Fail("sim: unexpected message at replica");
    }
  }

  // ---- primary ------------------------------------------------------------------------------

  void PrimaryReceive(Replica& r, Msg& m) {
    Link& l = r.link;
    switch (m.kind) {
      case Msg::Kind::kDecision: {
        const HandshakeDecision& d = m.decision;
        if (d.kind == HandshakeDecision::Kind::kRefuse) {
          pg_.OnDecision(r.name, d, 0, now_);
          if (d.code != core::RefuseCode::kDiverged || !r.Diverged()) {
            Fail("invariant (handshake): " + r.name + " refused: " + d.reason);
            return;
          }
          // Expected after a primary crash: the operator resyncs it (full copy from the start).
          Cut(r, "refused: " + d.reason, static_cast<Nanos>(rng_.Range(5, 100)) * kMs);
          Resync(r);
          return;
        }
        l.hello_acked = true;
        l.restore = false;
        if (d.kind == HandshakeDecision::Kind::kStreamFrom) {
          pg_.OnDecision(r.name, d, 0, now_);
          break;
        }
        if (d.kind == HandshakeDecision::Kind::kRestore) {
          pg_.OnDecision(r.name, d, d.start_lsn - 1, now_);
          l.copying = true;
          l.restore = true;
          l.restore_blocks.clear();
          for (const core::Extent& e : d.extents)
            for (uint64_t off = e.offset; off < e.offset + e.length; off += kBlockSize)
              l.restore_blocks.push_back(static_cast<uint32_t>(off / kBlockSize));
          l.restore_next = 0;
          l.restore_min = d.start_lsn - 1;
          ++restores_;
          break;
        }
        // Full copy: base it on the applied LSN (docs/replication.md, "Full copy").
        const uint64_t l0 = applied_;
        pg_.OnDecision(r.name, d, l0, now_);
        l.copying = true;
        if (d.copy_resume) {
          l.copy_next_block = static_cast<uint32_t>(d.copy_offset / kBlockSize);
        } else {
          copy_reset_[IndexOf(r)] = true;
          r.copy_floor = l0;
          l.copy_next_block = 0;
          Msg out{Msg::Kind::kCopyBegin};
          out.epoch = epoch_;
          out.lsn = l0 + 1;
          out.history = history_;
          l.copy_begin_in_flight = true;
          Send(r, true, std::move(out));
        }
        break;
      }
      case Msg::Kind::kPosition:
        if (trace_)
          Trace("position from " + r.name + ": received " + std::to_string(m.pos.received) +
                " durable " + std::to_string(m.pos.durable) + " applied " +
                std::to_string(m.pos.applied));
        pg_.OnPosition(r.name, m.pos, now_);
        break;
      case Msg::Kind::kPong:
        pg_.OnRttSample(r.name, now_ - m.ping_sent, now_);
        break;
      default:
        Fail("sim: unexpected message at primary");
    }
  }

  void Ship(Replica& r) {
    Link& l = r.link;
    if (!l.up || !l.hello_acked) return;
    if (l.copying && l.restore && applied_ >= l.restore_min && rng_.Chance(0.5)) {
      if (l.restore_next < l.restore_blocks.size()) {
        Msg m{Msg::Kind::kCopyChunk};
        m.first_block = l.restore_blocks[l.restore_next++];
        m.values.push_back(primary_volume_[m.first_block]);  // the volume as of applied_ now
        Send(r, true, std::move(m));
      } else {
        Msg done{Msg::Kind::kCopyDone};
        done.lsn = applied_;
        Send(r, true, std::move(done));
        l.copying = false;
        pg_.OnCopyDone(r.name, applied_, now_);
      }
    } else if (l.copying && !l.restore && rng_.Chance(0.5)) {
      const uint32_t n = static_cast<uint32_t>(rng_.Range(1, 4));
      Msg m{Msg::Kind::kCopyChunk};
      m.first_block = l.copy_next_block;
      for (uint32_t b = l.copy_next_block; b < nblocks_ && b < l.copy_next_block + n; ++b)
        m.values.push_back(primary_volume_[b]);  // fuzzy: the volume as of applied_ now
      l.copy_next_block += static_cast<uint32_t>(m.values.size());
      if (!m.values.empty()) Send(r, true, std::move(m));
      if (l.copy_next_block >= nblocks_) {
        Msg done{Msg::Kind::kCopyDone};
        done.lsn = applied_;
        Send(r, true, std::move(done));
        l.copying = false;
        pg_.OnCopyDone(r.name, applied_, now_);
      }
    }
    for (int guard = 0; guard < 64; ++guard) {
      std::optional<core::SendPlan> plan = pg_.NextSend(r.name, now_);
      if (!plan) break;
      uint64_t from = plan->from_lsn;
      if (l.first_batch && rng_.Chance(0.3)) from -= std::min<uint64_t>(from - 1, rng_.Range(1, 3));
      l.first_batch = false;
      if (from < first_) {
        if (plan->from_lsn < first_) {
          Cut(r, "LSN " + std::to_string(plan->from_lsn) + " is no longer in the log", 5 * kMs);
          return;
        }
        from = plan->from_lsn;
      }
      Msg m{Msg::Kind::kBatch};
      m.epoch = truth_[from - 1].epoch;
      m.lsn = from;
      m.durable_requested = r.mode == Mode::kSync;
      uint64_t bytes = 0;
      for (uint64_t lsn = from; lsn <= plan->to_lsn; ++lsn) {
        const Rec& rec = truth_[lsn - 1];
        if (rec.epoch != m.epoch || m.recs.size() >= plan->max_records) break;
        if (lsn >= plan->from_lsn && bytes >= plan->max_bytes) break;
        m.recs.push_back(rec);
        if (lsn >= plan->from_lsn) bytes += rec.bytes;
      }
      pg_.OnSent(r.name, m.lsn, m.recs.back().lsn, bytes, now_);
      // Flow control: in flight stays within the window, plus the one record that crosses it.
      for (const core::PeerStatus& st : pg_.Status(now_))
        if (st.peer == r.name && st.inflight_bytes > st.window_bytes + kMaxRecordBytes)
          Fail("invariant (window): " + r.name + " has " + std::to_string(st.inflight_bytes) +
               " bytes in flight, window " + std::to_string(st.window_bytes));
      Send(r, true, std::move(m));
    }
    if (now_ >= l.next_ping || pg_.RttProbeReady(r.name)) {
      Msg m{Msg::Kind::kPing};
      m.ping_sent = now_;
      pg_.OnHeartbeatSent(r.name, now_);
      Send(r, true, std::move(m));
      l.next_ping = now_ + 20 * kMs;
    }
  }

  void ClientWrite() {
    Rec rec;
    rec.epoch = epoch_;
    rec.lsn = ++last_;
    rec.block = static_cast<uint32_t>(rng_.Below(nblocks_));
    rec.value = rec.lsn * 1000 + rng_.Below(1000);
    rec.bytes = rng_.Range(512, kMaxRecordBytes);
    rec.timestamp_ns = 1'700'000'000'000'000'000ull + static_cast<uint64_t>(now_);
    truth_.push_back(rec);
    cum_.push_back((cum_.empty() ? 0 : cum_.back()) + rec.bytes);
    std::vector<uint64_t> s = states_.back();
    s[rec.block] = rec.value;
    states_.push_back(std::move(s));
    pg_.OnLocalAppend(rec.lsn, rec.bytes, rec.timestamp_ns, now_);
    pending_writes_.push_back(rec.lsn);
    write_times_.push_back(now_);
  }

  void Truncate() {
    // Retention: keep what every peer still needs, but at most max_kept_ records unless a sync
    // peer in the sync set still needs them (the others then need a full copy).
    uint64_t keep_after = pg_.MinPeerDurable();
    if (last_ > max_kept_) keep_after = std::max(keep_after, last_ - max_kept_);
    for (const core::PeerStatus& st : pg_.Status(now_))
      if (st.in_sync_set) keep_after = std::min(keep_after, st.positions.durable);
    // Never the whole durable log: a restarted PrimaryGroup learns the log's last LSN only from
    // OnLocalAppend, so after a restart on a log that holds no records it would report
    // last_lsn() 0 (agent/node feeds it the same way). Keeping one record sidesteps that gap.
    keep_after = std::min({keep_after, applied_, durable_ == 0 ? 0 : durable_ - 1});
    if (keep_after + 1 > first_) {
      first_ = keep_after + 1;
      pg_.OnLocalTruncate(first_);
      Trace("truncate below " + std::to_string(first_));
    }
  }

  // The primary's agent restarts (docs/replication.md: a new epoch on every restart). A crash
  // loses the log's undurable tail, which replicas may hold (shipping does not wait for the
  // primary's fsync): those replicas have diverged. A clean restart loses nothing. Every link
  // drops, pending client I/O fails, and a new PrimaryGroup starts from the persisted peer
  // positions (persisted with the log, so never past what the log recovered) and the log.
  void PrimaryRestart(bool crash) {
    const uint64_t keep = crash ? durable_ : last_;
    Trace(std::string("primary ") + (crash ? "crash" : "restart") + ": log keeps " +
          std::to_string(keep) + " of " + std::to_string(last_) + ", new epoch " +
          std::to_string(epoch_ + 1));
    ++primary_restarts_;
    std::vector<core::PeerStatus> st = pg_.Status(now_);
    for (size_t i = 0; i < replicas_.size(); ++i) {
      Replica& r = *replicas_[i];
      const Nanos backoff = static_cast<Nanos>(rng_.Range(5, 50)) * kMs;
      Link& l = r.link;
      if (l.up) {
        ++cuts_;
        l.up = false;
        l.to_replica.clear();
        l.to_primary.clear();
        l.copying = false;
        l.copy_begin_in_flight = false;
      }
      l.redial_at = now_ + backoff;
      uint64_t held = r.WrittenLast();
      if (r.appending && !r.append_recs.empty()) held = std::max(held, r.append_recs.back().lsn);
      if (held > keep && r.div_point == kNoDivergence) {
        r.div_point = keep;
        r.old_recs.assign(truth_.begin() + static_cast<std::ptrdiff_t>(keep), truth_.end());
        r.old_states.assign(states_.begin() + static_cast<std::ptrdiff_t>(keep) + 1, states_.end());
        ++divergences_;
      }
      // Promises past `keep` were about records the primary lost (unflushed WRITEs).
      r.must_written = std::min(r.must_written, keep);
      r.must_durable = std::min(r.must_durable, keep);
      Positions p = st[IndexFor(st, i)].positions;
      p.received = std::min(p.received, keep);
      p.durable = std::min(p.durable, keep);
      p.applied = std::min(p.applied, keep);
      prev_[i] = p;
      persisted_[i] = p;
    }
    truth_.resize(keep);
    cum_.resize(keep);
    states_.resize(keep + 1);
    last_ = durable_ = keep;
    applied_ = std::min(applied_, keep);
    primary_volume_ = states_[applied_];
    pending_writes_.clear();
    write_times_.clear();
    pending_flushes_.clear();
    ++epoch_;
    history_.push_back({epoch_, keep + 1});
    pg_ = PrimaryGroup();
    for (size_t i = 0; i < replicas_.size(); ++i)
      pg_.AddPeer(replicas_[i]->name, replicas_[i]->options, persisted_[i], now_);
    for (uint64_t lsn = first_; lsn <= last_; ++lsn)
      pg_.OnLocalAppend(lsn, truth_[lsn - 1].bytes, truth_[lsn - 1].timestamp_ns, now_);
    if (last_ > 0 && first_ > last_) pg_.OnLocalTruncate(first_);
    pg_.OnLocalDurable(durable_);
    pg_.OnLocalApplied(applied_);
    // The release points restart from the recovered log.
    prev_wr_ = pg_.write_released();
    prev_fr_ = pg_.flush_released();
  }

  // The record a replica should hold at `lsn`: the primary's, or the old lineage's after its
  // divergence point.
  const Rec* Expected(const Replica& r, uint64_t lsn) const {
    if (lsn > r.div_point) {
      const uint64_t i = lsn - r.div_point - 1;
      return i < r.old_recs.size() ? &r.old_recs[i] : nullptr;
    }
    return lsn >= 1 && lsn <= truth_.size() ? &truth_[lsn - 1] : nullptr;
  }
  // The volume a replica should have after applying through `lsn` (nullptr: no such state).
  const std::vector<uint64_t>* ExpectedState(const Replica& r, uint64_t lsn) const {
    if (lsn > r.div_point) {
      const uint64_t i = lsn - r.div_point - 1;
      return i < r.old_states.size() ? &r.old_states[i] : nullptr;
    }
    return lsn <= last_ ? &states_[lsn] : nullptr;
  }

  size_t IndexOf(const Replica& r) const {
    for (size_t i = 0; i < replicas_.size(); ++i)
      if (replicas_[i].get() == &r) return i;
    return 0;
  }

  void Step() {
    now_ += static_cast<Nanos>(rng_.Range(0, 3000)) * 1000;
    for (size_t i = 0; i < replicas_.size(); ++i) copy_reset_[i] = false;
    // Deliver what is due, stream by stream, in order.
    for (auto& rp : replicas_) {
      Replica& r = *rp;
      Link& l = r.link;
      while (l.up && !l.to_replica.empty() && l.to_replica.front().deliver_at <= now_ &&
             !r.appending) {
        Msg m = std::move(l.to_replica.front());
        l.to_replica.pop_front();
        ReplicaReceive(r, m);
        if (failure_) return;
      }
      while (l.up && !l.to_primary.empty() && l.to_primary.front().deliver_at <= now_) {
        Msg m = std::move(l.to_primary.front());
        l.to_primary.pop_front();
        PrimaryReceive(r, m);
        if (failure_) return;
      }
    }
    // One random event.
    const uint64_t e = quiet_ ? rng_.Range(48, 81) : rng_.Below(100);
    Replica& some = *replicas_[rng_.Below(replicas_.size())];
    if (e < 40) {
      for (uint64_t n = rng_.Range(1, 3); n > 0; --n) ClientWrite();
    } else if (e < 48) {
      pending_flushes_.push_back(last_);
    } else if (e < 58) {
      durable_ = last_;
      pg_.OnLocalDurable(durable_);
    } else if (e < 70) {
      // The applier may run ahead of the log's fsync (agent/node applies right after the append):
      // copies then read records a primary crash can lose.
      applied_ =
          rng_.Chance(applier_catch_up_) ? last_ : std::min(last_, applied_ + rng_.Range(1, 6));
      primary_volume_ = states_[applied_];
      pg_.OnLocalApplied(applied_);
    } else if (e < 82) {
      ReplicaApply(some);
    } else if (e < 86) {
      Truncate();
    } else if (e < 89) {
      Cut(some, "message lost", static_cast<Nanos>(rng_.Range(1, 30)) * kMs);
    } else if (e < 90) {
      some.link.partitioned_until = now_ + static_cast<Nanos>(rng_.Range(20, 400)) * kMs;
      Cut(some, "partitioned", 0);
    } else if (e < 92) {
      ReplicaCrash(some);
    } else if (e == 92 && primary_restarts_enabled_) {
      PrimaryRestart(/*crash=*/rng_.Chance(0.7));
    }
    for (auto& rp : replicas_) {
      Replica& r = *rp;
      ReplicaDisk(r);
      if (failure_) return;
      if (!r.link.up && now_ >= r.link.redial_at && now_ >= r.link.partitioned_until) Dial(r);
      Ship(r);
      if (failure_) return;
    }
    pg_.OnTick(now_);
    // Timers: the driver acts on NextDeadline; one that is already due with nothing to do
    // would spin a real event loop.
    for (auto& rp : replicas_) Ship(*rp);
    if (std::optional<Nanos> d = pg_.NextDeadline(); d && *d <= now_)
      Fail("invariant (timers): NextDeadline " + std::to_string(*d) + " is due at " +
           std::to_string(now_) + " but neither NextSend nor OnTick acts on it");
    Complete();
  }

  void Complete() {
    Completions();
    // With sync_degrade_after set, no WRITE waits for a peer longer than that.
    if (degrade_after_ > 0 && !write_times_.empty() &&
        write_times_.front() + degrade_after_ <= now_)
      Fail("invariant (degrade): WRITE " + std::to_string(pending_writes_.front()) +
           " has waited " + std::to_string((now_ - write_times_.front()) / kMs) +
           " ms, longer than sync_degrade_after " + std::to_string(degrade_after_ / kMs) + " ms");
  }

  void Completions() {
    std::vector<core::PeerStatus> st = pg_.Status(now_);
    const uint64_t wr = pg_.write_released(), fr = pg_.flush_released();
    while (!pending_writes_.empty() && pending_writes_.front() <= wr) {
      const uint64_t lsn = pending_writes_.front();
      pending_writes_.pop_front();
      write_times_.pop_front();
      ++writes_done_;
      if (trace_) {
        std::string t = "WRITE " + std::to_string(lsn) + " completes (write_released " +
                        std::to_string(wr) + ")";
        for (const core::PeerStatus& p : st)
          t += "; " + p.peer + (p.in_sync_set ? " in sync set" : "") + " received " +
               std::to_string(p.positions.received) + " " + core::LinkStateName(p.state);
        Trace(t);
      }
      for (size_t i = 0; i < replicas_.size(); ++i)
        if (st[IndexFor(st, i)].in_sync_set) {
          CheckCanHold(*replicas_[i], lsn, "WRITE");
          replicas_[i]->must_written = std::max(replicas_[i]->must_written, lsn);
        }
    }
    while (!pending_flushes_.empty() && pending_flushes_.front() <= fr) {
      const uint64_t target = pending_flushes_.front();
      pending_flushes_.pop_front();
      ++flushes_done_;
      if (target > durable_)
        Fail("invariant (a): FLUSH to " + std::to_string(target) +
             " completed while the local log is durable to " + std::to_string(durable_));
      for (size_t i = 0; i < replicas_.size(); ++i)
        if (st[IndexFor(st, i)].in_sync_set) {
          CheckCanHold(*replicas_[i], target, "FLUSH");
          replicas_[i]->must_durable = std::max(replicas_[i]->must_durable, target);
        }
    }
  }

  // (a) at completion: a sync-set replica must be able to produce the completed I/O without the
  // primary, i.e. it is not in the middle of a copy (its volumes are no image of anything), and a
  // completed copy's end LSN is in its log (else it can never become consistent on its own).
  void CheckCanHold(const Replica& r, uint64_t lsn, const char* what) {
    if (lsn == 0) return;  // the empty prefix: nothing to hold
    const ReplicaView& v = r.rx->view();
    const std::string who = "replica " + r.name + " (" + core::ModeName(r.mode) + ")";
    if (v.copy_in_progress || !v.consistent) {
      Fail("invariant (a): " + std::string(what) + " " + std::to_string(lsn) +
           " completed in sync mode while " + who +
           (v.copy_in_progress ? " has a full copy in progress" : " never completed a copy"));
    } else if (v.consistent_at_lsn > std::max(r.WrittenLast(), r.excused_written)) {
      Fail("invariant (a): " + std::string(what) + " " + std::to_string(lsn) +
           " completed in sync mode while " + who + " holds its copy's records up to " +
           std::to_string(v.consistent_at_lsn) + " only in its volumes (log to " +
           std::to_string(r.WrittenLast()) + ")");
    }
  }

  size_t IndexFor(const std::vector<core::PeerStatus>& st, size_t i) const {
    for (size_t k = 0; k < st.size(); ++k)
      if (st[k].peer == replicas_[i]->name) return k;
    return 0;
  }

  // ---- invariants ---------------------------------------------------------------------------

  void Check() {
    if (pg_.last_lsn() != last_ || pg_.durable_lsn() != durable_)
      Fail("sim: PrimaryGroup's local positions differ from the log");
    std::vector<core::PeerStatus> st = pg_.Status(now_);
    const uint64_t wr = pg_.write_released(), fr = pg_.flush_released();
    bool any_reset = false;
    for (size_t i = 0; i < replicas_.size(); ++i) any_reset |= copy_reset_[i];
    if (!any_reset && (wr < prev_wr_ || fr < prev_fr_))
      Fail("invariant (c): a release point went backwards: write " + std::to_string(prev_wr_) +
           " -> " + std::to_string(wr) + ", flush " + std::to_string(prev_fr_) + " -> " +
           std::to_string(fr));
    prev_wr_ = wr;
    prev_fr_ = fr;
    for (size_t i = 0; i < replicas_.size(); ++i) {
      Replica& r = *replicas_[i];
      const core::PeerStatus& s = st[IndexFor(st, i)];
      const std::string who = "replica " + r.name + " (" + core::ModeName(r.mode) + ")";
      // (a) Promises of completed I/O, once the replica holds a complete copy.
      if (!s.in_sync_set) {
        r.must_written = 0;  // left the sync set: later completions do not wait for it
        r.must_durable = 0;
      }
      if (r.rx->view().consistent) {
        if (std::max(r.WrittenLast(), r.excused_written) < r.must_written)
          Fail("invariant (a): WRITE " + std::to_string(r.must_written) +
               " completed in sync mode but " + who + " holds only up to " +
               std::to_string(r.WrittenLast()));
        if (r.Diverged() && std::max(r.must_written, r.must_durable) > r.div_point)
          Fail("invariant (a): WRITE/FLUSH to " +
               std::to_string(std::max(r.must_written, r.must_durable)) +
               " completed in sync mode but " + who + " holds a different record (of an epoch " +
               "the primary lost) from LSN " + std::to_string(r.div_point + 1));
        if (r.DurableLast() < r.must_durable)
          Fail("invariant (a): FLUSH to " + std::to_string(r.must_durable) +
               " completed in sync mode but " + who + " is durable only to " +
               std::to_string(r.DurableLast()));
      }
      // (b) Consistent means a prefix state.
      if (r.rx->consistent()) {
        if (r.rx->view().copy_in_progress) Fail("invariant (b): consistent during a copy");
        const std::vector<uint64_t>* want = ExpectedState(r, r.applied);
        if (!want || r.volume != *want)
          Fail("invariant (b): " + who + " reports consistent at applied LSN " +
               std::to_string(r.applied) + " but its volume is not the primary's as of it");
      }
      // (c) Positions never go backwards.
      const Positions& p = s.positions;
      const Positions& q = prev_[i];
      if (!copy_reset_[i] &&
          (p.received < q.received || p.durable < q.durable || p.applied < q.applied))
        Fail("invariant (c): positions of " + who + " went backwards");
      prev_[i] = p;
      if (s.degraded != prev_degraded_[i]) (s.degraded ? degrades_ : rejoins_)++;
      prev_degraded_[i] = s.degraded;
      // What the primary believes durable is durable there (or is the base of a copy that the
      // replica has not begun yet).
      if (p.durable > std::max(r.DurableLast(), r.copy_floor))
        Fail("invariant (c): the primary holds " + who + " durable at " +
             std::to_string(p.durable) + " but its log is durable only to " +
             std::to_string(r.DurableLast()));
      // (d) Lag is exact while the records after the peer's durable LSN are still held.
      if (p.durable + 1 >= first_) {
        core::Lag truth;
        if (p.durable < last_) {
          truth.lsns = last_ - p.durable;
          truth.bytes = cum_[last_ - 1] - (p.durable ? cum_[p.durable - 1] : 0);
          truth.oldest_timestamp_ns = truth_[p.durable].timestamp_ns;
        }
        if (s.lag.lsns != truth.lsns || s.lag.bytes != truth.bytes ||
            s.lag.oldest_timestamp_ns != truth.oldest_timestamp_ns)
          Fail("invariant (d): lag of " + who + " reported (" + std::to_string(s.lag.lsns) +
               " LSNs, " + std::to_string(s.lag.bytes) + " bytes, oldest " +
               std::to_string(s.lag.oldest_timestamp_ns) + ") but is (" +
               std::to_string(truth.lsns) + ", " + std::to_string(truth.bytes) + ", " +
               std::to_string(truth.oldest_timestamp_ns) + ")");
      }
    }
  }

  Rng rng_;
  Plant plant_;
  bool trace_;
  bool primary_restarts_enabled_ = false;
  bool rejoin_ = false;
  uint64_t rejoins_done_ = 0, restores_ = 0, saved_records_ = 0;
  bool quiet_ = false;
  int step_ = 0;
  Nanos now_ = 0;
  std::optional<Failure> failure_;

  PrimaryGroup pg_;
  uint64_t epoch_ = 1;
  History history_{{1, 1}};
  uint32_t nblocks_ = 0;
  uint64_t max_kept_ = 0;
  double applier_catch_up_ = 0;  // chance that an applier step catches up with the log
  std::vector<Rec> truth_;       // every record ever written; truth_[l - 1]
  std::vector<uint64_t> cum_;    // cumulative bytes through LSN l: cum_[l - 1]
  std::vector<std::vector<uint64_t>> states_;  // the volume after LSN l: states_[l]
  uint64_t first_ = 1, last_ = 0, durable_ = 0, applied_ = 0;
  std::vector<uint64_t> primary_volume_;
  std::deque<uint64_t> pending_writes_, pending_flushes_;
  std::deque<Nanos> write_times_;  // when each pending WRITE was appended
  Nanos degrade_after_ = 0;
  std::vector<std::unique_ptr<Replica>> replicas_;
  std::vector<Positions> prev_;
  Positions persisted_[2];
  bool copy_reset_[2] = {false, false};
  bool prev_degraded_[2] = {false, false};
  uint64_t degrades_ = 0, rejoins_ = 0;
  uint64_t prev_wr_ = 0, prev_fr_ = 0;
  uint64_t writes_done_ = 0, flushes_done_ = 0, copies_ = 0, cuts_ = 0, crashes_ = 0;
  uint64_t primary_restarts_ = 0, divergences_ = 0, resyncs_ = 0;
};

int Usage() {
  std::fprintf(stderr,
               "usage: tvilling_sim [--seed N] [--seeds COUNT | --seeds A:B] [--steps S] "
               "[--both-sync] [--primary-restarts] [--rejoin] "
               "[--planted-bug none|ack-before-durable|ack-before-append|copy-done-early|"
               "restore-skips-chunks] "
               "[--expect-failure] [--trace]\n"
               "  --seeds COUNT runs seeds N..N+COUNT-1; --seeds A:B runs seeds A..B\n");
  return 2;
}

int Main(int argc, char** argv) {
  uint64_t seed = 1, seeds = 1;
  int steps = 300;
  std::string plant_name = "none";
  bool expect_failure = false, trace = false, both_sync = false, primary_restarts = false;
  bool rejoin = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
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
    } else if (a == "--both-sync") {
      both_sync = true;
    } else if (a == "--primary-restarts") {
      primary_restarts = true;
    } else if (a == "--rejoin") {
      rejoin = true;  // implies --primary-restarts
    } else if (a == "--trace") {
      trace = true;
    } else {
      return Usage();
    }
  }
  std::optional<Plant> plant = ParsePlant(plant_name);
  if (!plant || steps <= 0 || seeds == 0) return Usage();
  uint64_t copies = 0, crashes = 0, degrades = 0, restarts = 0, resyncs = 0, rejoins = 0,
           restores = 0;
  for (uint64_t s = seed; s < seed + seeds; ++s) {
    Sim sim(s, *plant, trace, both_sync, primary_restarts, rejoin);
    std::optional<Failure> f = sim.Run(steps);
    copies += sim.copies();
    crashes += sim.crashes();
    degrades += sim.degrades();
    restarts += sim.primary_restarts();
    resyncs += sim.resyncs();
    rejoins += sim.rejoins_after_divergence();
    restores += sim.restores();
    if (f) {
      std::printf(
          "seed %llu step %d: %s\n  (%s)\n  replay: tvilling_sim --seed %llu "
          "--steps %d%s%s%s%s%s --trace\n",
          static_cast<unsigned long long>(s), f->step, f->what.c_str(), sim.Summary().c_str(),
          static_cast<unsigned long long>(s), steps, both_sync ? " --both-sync" : "",
          primary_restarts ? " --primary-restarts" : "", rejoin ? " --rejoin" : "",
          plant_name == "none" ? "" : " --planted-bug ",
          plant_name == "none" ? "" : plant_name.c_str());
      if (expect_failure) {
        std::printf("planted bug %s found\n", plant_name.c_str());
        return 0;
      }
      return 1;
    }
    if (seeds == 1)
      std::printf("seed %llu ok: %s\n", static_cast<unsigned long long>(s), sim.Summary().c_str());
  }
  std::printf(
      "%llu seeds x %d steps ok (full copies %llu, replica crashes %llu, sync peers "
      "degraded %llu, primary restarts %llu, resyncs %llu, rejoins %llu, restores %llu)\n",
      static_cast<unsigned long long>(seeds), steps, static_cast<unsigned long long>(copies),
      static_cast<unsigned long long>(crashes), static_cast<unsigned long long>(degrades),
      static_cast<unsigned long long>(restarts), static_cast<unsigned long long>(resyncs),
      static_cast<unsigned long long>(rejoins), static_cast<unsigned long long>(restores));
  if (expect_failure) {
    std::printf("planted bug %s NOT found in %llu seeds\n", plant_name.c_str(),
                static_cast<unsigned long long>(seeds));
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace tvilling::sim

int main(int argc, char** argv) { return tvilling::sim::Main(argc, argv); }
