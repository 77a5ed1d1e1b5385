// replication.cc: the replication state machines of agent/core/replication.h (docs/replication.md).
//
// Pure: no clock reads, I/O or threads. Every time is an argument.
#include "agent/core/replication.h"

#include <algorithm>
#include <limits>

namespace tvilling::core {

const char* ModeName(Mode m) {
  switch (m) {
    case Mode::kAsync:
      return "async";
    case Mode::kSync:
      return "sync";
  }
  return "unknown";
}

const char* RefuseCodeName(RefuseCode c) {
  switch (c) {
    case RefuseCode::kNone:
      return "none";
    case RefuseCode::kUnknownGroup:
      return "unknown group";
    case RefuseCode::kNotReplica:
      return "not a replica";
    case RefuseCode::kStaleEpoch:
      return "stale epoch";
    case RefuseCode::kDiverged:
      return "diverged";
    case RefuseCode::kVolumeMismatch:
      return "volume mismatch";
    case RefuseCode::kNotAuthorised:
      return "not authorised";
    case RefuseCode::kProtocol:
      return "protocol error";
  }
  return "unknown";
}

const char* LinkStateName(LinkState s) {
  switch (s) {
    case LinkState::kDisconnected:
      return "disconnected";
    case LinkState::kHandshake:
      return "handshake";
    case LinkState::kCopying:
      return "copying";
    case LinkState::kStreaming:
      return "streaming";
    case LinkState::kRefused:
      return "refused";
  }
  return "unknown";
}

uint64_t EpochAt(const History& history, uint64_t lsn) {
  if (lsn == 0) return 0;
  uint64_t epoch = 0;
  for (const EpochStart& e : history) {
    if (e.first_lsn > lsn) break;
    epoch = e.epoch;
  }
  return epoch;
}

History HistoryUpTo(const History& history, uint64_t lsn) {
  History out;
  for (const EpochStart& e : history)
    if (e.first_lsn <= lsn) out.push_back(e);
  return out;
}

uint64_t CommonPrefix(const History& a, uint64_t a_last, const History& b, uint64_t b_last) {
  const uint64_t limit = std::min(a_last, b_last);
  // EpochAt is piecewise constant, changing only at some history entry's first_lsn; so the first
  // LSN where the two differ is 1 or one of those boundaries. Check exactly those points.
  std::vector<uint64_t> points{1};
  for (const EpochStart& e : a) points.push_back(std::max<uint64_t>(e.first_lsn, 1));
  for (const EpochStart& e : b) points.push_back(std::max<uint64_t>(e.first_lsn, 1));
  std::sort(points.begin(), points.end());
  for (uint64_t l : points) {
    if (l > limit) break;
    if (EpochAt(a, l) != EpochAt(b, l)) return l - 1;
  }
  return limit;
}

std::vector<Extent> MergeExtents(std::vector<Extent> extents) {
  std::erase_if(extents, [](const Extent& e) { return e.length == 0; });
  std::sort(extents.begin(), extents.end(), [](const Extent& a, const Extent& b) {
    return a.volume != b.volume ? a.volume < b.volume : a.offset < b.offset;
  });
  std::vector<Extent> out;
  for (const Extent& e : extents) {
    if (!out.empty() && out.back().volume == e.volume &&
        e.offset <= out.back().offset + out.back().length) {
      Extent& b = out.back();
      b.length = std::max(b.offset + b.length, e.offset + e.length) - b.offset;
    } else {
      out.push_back(e);
    }
  }
  return out;
}

std::vector<Extent> ExtentsFrom(const std::vector<Extent>& extents, uint32_t volume,
                                uint64_t offset) {
  std::vector<Extent> out;
  for (const Extent& e : extents) {
    if (e.volume < volume) continue;
    if (e.volume > volume || e.offset >= offset) {
      out.push_back(e);
    } else if (e.offset + e.length > offset) {
      out.push_back({e.volume, offset, e.offset + e.length - offset});
    }
  }
  return out;
}

bool ExtentsCover(const std::vector<Extent>& extents, uint32_t volume, uint64_t offset,
                  uint64_t length) {
  for (const Extent& e : extents) {
    if (e.volume == volume && offset >= e.offset && offset - e.offset <= e.length &&
        length <= e.length - (offset - e.offset))
      return true;
  }
  return false;
}

namespace {

std::string U(uint64_t v) { return std::to_string(v); }

HandshakeDecision Refuse(RefuseCode code, std::string reason) {
  HandshakeDecision d;
  d.kind = HandshakeDecision::Kind::kRefuse;
  d.code = code;
  d.reason = std::move(reason);
  return d;
}

std::string Sizes(const std::vector<uint64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + U(v[i]);
  return s + "]";
}

}  // namespace

HandshakeDecision DecideHandshake(const PrimaryHello& hello, const ReplicaView& view) {
  const std::string from = "primary " + hello.site + " of group " + hello.group;
  if (!view.group_known) {
    return Refuse(RefuseCode::kUnknownGroup,
                  "unknown group: " + from + " but this agent has no group " + hello.group);
  }
  if (view.is_primary) {
    return Refuse(RefuseCode::kNotReplica,
                  "not a replica: " + from + ", but this agent is configured primary of it");
  }
  if (hello.epoch < view.newest_epoch) {
    return Refuse(RefuseCode::kStaleEpoch, "stale epoch: " + from + " is in epoch " +
                                               U(hello.epoch) + ", this agent has seen epoch " +
                                               U(view.newest_epoch));
  }
  if (hello.volume_sizes != view.volume_sizes) {
    return Refuse(RefuseCode::kVolumeMismatch,
                  "volume mismatch: " + from + " has volume sizes " + Sizes(hello.volume_sizes) +
                      " (bytes), this replica has " + Sizes(view.volume_sizes));
  }
  const uint64_t common = CommonPrefix(hello.history, hello.last_lsn, view.history, view.last_lsn);
  if (common < view.last_lsn) {
    const uint64_t split = common + 1;
    std::string primary_side = split <= hello.last_lsn
                                   ? "epoch " + U(EpochAt(hello.history, split))
                                   : "no record (its log ends at " + U(hello.last_lsn) + ")";
    const std::string what = "the logs split at LSN " + U(split) + ": this replica holds epoch " +
                             U(EpochAt(view.history, split)) + " there and records up to " +
                             U(view.last_lsn) + ", " + from + " has " + primary_side;
    if (view.on_divergence == OnDivergence::kRefuse) {
      return Refuse(
          RefuseCode::kDiverged,
          "diverged: " + what + "; on_divergence = refuse: resync the replica (full copy)");
    }
    HandshakeDecision d;
    d.kind = HandshakeDecision::Kind::kRejoin;
    d.fork_lsn = common;
    d.reason = "rejoin: " + what + "; saving records " + U(split) + ".." + U(view.last_lsn) +
               " and cutting the log back to LSN " + U(common);
    return d;
  }
  HandshakeDecision d;
  const bool primary_holds_next = view.last_lsn + 1 >= hello.first_lsn;
  if (view.copy_in_progress) {
    d.kind = HandshakeDecision::Kind::kFullCopy;
    if (hello.epoch != view.copy_epoch) {
      // The chunks written so far show the volumes of the primary of the copy's epoch at LSNs
      // this log may not hold; a primary of another epoch may have lost those records.
      d.reason = "full copy: the interrupted copy was begun in epoch " + U(view.copy_epoch) +
                 " and " + from + " is in epoch " + U(hello.epoch) +
                 " (the copied data may hold records it lost); starting over";
    } else if (primary_holds_next) {
      d.copy_resume = true;
      d.start_lsn = view.last_lsn + 1;
      d.copy_volume = view.copy_volume;
      d.copy_offset = view.copy_offset;
      d.reason = "full copy: resuming the interrupted copy at volume " + U(view.copy_volume) +
                 " offset " + U(view.copy_offset) + ", log from LSN " + U(d.start_lsn);
    } else {
      d.reason = "full copy: the interrupted copy cannot resume: its log ends at LSN " +
                 U(view.last_lsn) + " but " + from + " holds records only from LSN " +
                 U(hello.first_lsn) + "; starting over";
    }
    return d;
  }
  if (view.restore_pending) {
    if (!primary_holds_next) {
      d.kind = HandshakeDecision::Kind::kFullCopy;
      d.reason = "full copy: restoring the extents of a rejoin needs the records from LSN " +
                 U(view.last_lsn + 1) + " but " + from + " holds records only from LSN " +
                 U(hello.first_lsn);
      return d;
    }
    d.kind = HandshakeDecision::Kind::kRestore;
    d.start_lsn = view.last_lsn + 1;
    if (hello.epoch == view.restore_epoch) {
      d.copy_resume = true;
      d.copy_volume = view.copy_volume;
      d.copy_offset = view.copy_offset;
      d.extents = ExtentsFrom(view.restore_extents, view.copy_volume, view.copy_offset);
      d.reason = "restore: resuming the restore of " + U(view.restore_extents.size()) +
                 " extent(s) at volume " + U(view.copy_volume) + " offset " + U(view.copy_offset) +
                 ", log from LSN " + U(d.start_lsn);
    } else {
      // Chunks restored so far may show records a primary of another epoch lost: all again.
      d.extents = view.restore_extents;
      d.reason = "restore: copying the " + U(view.restore_extents.size()) +
                 " extent(s) the saved divergent records touched, log from LSN " + U(d.start_lsn);
    }
    return d;
  }
  if (!view.consistent) {
    d.kind = HandshakeDecision::Kind::kFullCopy;
    d.reason = "full copy: this replica never completed a copy (new or resynced)";
    return d;
  }
  if (view.consistent_at_lsn > view.last_lsn) {
    // The volumes hold the copy, i.e. records up to consistent_at_lsn that the log does not hold
    // yet. They count as held records: in the primary's log (same epoch at that LSN, so by log
    // matching the same records up to it), or the replica cannot become consistent with it.
    const uint64_t at = view.consistent_at_lsn;
    if (hello.last_lsn < at || EpochAt(hello.history, at) != view.consistent_at_epoch) {
      d.kind = HandshakeDecision::Kind::kFullCopy;
      d.reason = "full copy: the completed copy holds records up to LSN " + U(at) + " (epoch " +
                 U(view.consistent_at_epoch) + ") that this replica's log (to LSN " +
                 U(view.last_lsn) + ") does not, and " + from +
                 (hello.last_lsn < at ? " has records only up to LSN " + U(hello.last_lsn)
                                      : " has epoch " + U(EpochAt(hello.history, at)) + " there") +
                 "; starting over";
      return d;
    }
  }
  if (!primary_holds_next) {
    d.kind = HandshakeDecision::Kind::kFullCopy;
    d.reason = "full copy: this replica's log ends at LSN " + U(view.last_lsn) + " but " + from +
               " holds records only from LSN " + U(hello.first_lsn);
    return d;
  }
  d.kind = HandshakeDecision::Kind::kStreamFrom;
  d.start_lsn = view.last_lsn + 1;
  d.reason = "streaming from LSN " + U(d.start_lsn);
  return d;
}

RejoinPlan PlanRejoin(const ReplicaView& view, uint64_t fork_lsn, std::vector<Extent> tail_extents,
                      uint64_t applied_lsn) {
  RejoinPlan p;
  p.fork_lsn = fork_lsn;
  p.history = HistoryUpTo(view.history, fork_lsn);
  p.applied_lsn = std::min(applied_lsn, fork_lsn);
  if (view.restore_pending) {
    tail_extents.insert(tail_extents.end(), view.restore_extents.begin(),
                        view.restore_extents.end());
  }
  p.extents = MergeExtents(std::move(tail_extents));
  if (view.copy_in_progress) {
    p.reason = "a full copy is in progress: it goes on (from the start) after the cut";
  } else if (!view.consistent && !view.restore_pending) {
    p.reason = "the volumes were not consistent before (no completed copy): full copy";
  } else if (view.consistent_at_lsn > fork_lsn) {
    p.reason = "the volumes hold a copy up to LSN " + U(view.consistent_at_lsn) +
               ", beyond the fork at LSN " + U(fork_lsn) +
               ", whose records the log never held: full copy";
  } else if (p.extents.size() > kMaxRestoreExtents) {
    p.reason = U(p.extents.size()) + " extents to restore, more than " + U(kMaxRestoreExtents) +
               ": full copy";
  } else {
    p.restore = true;
    p.reason = "restoring " + U(p.extents.size()) + " extent(s) from the primary";
  }
  if (!p.restore) p.extents.clear();
  return p;
}

// ---------------------------------------------------------------------------------------------
// PrimaryGroup

namespace {

constexpr Nanos kSecond = 1'000'000'000;
constexpr Nanos kFilterWindow = 10 * kSecond;   // rtt min filter and delivery-rate max filter
constexpr Nanos kMinRateInterval = 10'000'000;  // 10 ms: shortest delivery-rate sample
// RTT probe (as BBR's PROBE_RTT): an async link whose samples have all been above 2 x its RTT
// without a queue for 100 of those RTTs (at least 2 s, at most 8 s: below kFilterWindow, so the
// probe's sample lands before the one the estimate rests on ages out) stops sending until nothing
// is in flight, then times one heartbeat. A queue up to one RTT deep (a long link's own buffers)
// is let be: with 1.25 x, probes every 5 s cost the continental lab 6-7 % of its throughput.
constexpr Nanos kProbeAfterMin = 2 * kSecond;
constexpr Nanos kProbeAfterMax = 8 * kSecond;
constexpr Nanos kProbeAfterRtts = 100;
constexpr Nanos kProbeMax = 2 * kSecond;  // a probe that has not drained by then is given up

bool Connected(LinkState s) { return s == LinkState::kStreaming || s == LinkState::kCopying; }

}  // namespace

struct PrimaryGroup::Impl {
  struct Rec {
    uint64_t lsn;
    uint64_t cum_bytes;  // bytes of every record up to and including this one
    uint64_t timestamp_ns;
    Nanos appended_at;  // local time of OnLocalAppend (coalescing and degrade timers)
  };
  struct Peer {
    std::string name;
    SenderOptions options;
    LinkState state = LinkState::kDisconnected;
    Positions pos;
    bool degraded = false;
    uint64_t next_lsn = 0;
    uint64_t sent_last = 0;  // highest LSN sent on this connection
    // received as reported on this connection. pos.received is the highest ever reported and
    // drives the release points; after the replica lost an unsynced tail in a crash it is ahead
    // of the replica's log, so sending and in-flight accounting use this one.
    uint64_t conn_received = 0;
    Nanos down_since = 0;                                 // valid while not Connected(state)
    std::deque<std::pair<Nanos, Nanos>> rtt_samples;      // (time, rtt)
    std::deque<std::pair<Nanos, uint64_t>> rate_samples;  // (time, bytes/s)
    // The link's RTT without a queue (0: not known yet): the newest clean sample, or a lower one
    // since. A clean sample is the echo of a heartbeat sent with nothing in flight.
    Nanos rtt_base = 0;
    Nanos clean_sent_at = 0;     // the newest heartbeat sent with nothing in flight
    Nanos rtt_confirmed_at = 0;  // the last clean sample or one within 2 x rtt_base
    Nanos probe_since = 0;       // != 0: probing, sending held until nothing is in flight
    Nanos probe_sent_at = 0;     // != 0: the probe's heartbeat went at this time
    Nanos rate_interval_start = -1;
    uint64_t rate_interval_bytes = 0;
    Nanos rate_interval_sent = 0;  // send time of the batch acknowledged at the interval's start
    // The batches sent on this connection and not yet wholly received, for the delivery rate's
    // send-side bound (SentAt).
    struct Sent {
      uint64_t first, last;
      Nanos at;
    };
    std::deque<Sent> sends;
    std::string last_error;
    // Its positions count for the release points (PeerStatus::confirmed). Until then it holds
    // back every write not released when it stopped counting.
    bool confirmed = false;
    // While not confirmed: append time of the oldest write it holds back, the oldest not released
    // when it stopped counting or the first appended after (the degrade clock; the log may drop
    // those records meanwhile).
    std::optional<Nanos> holds_since;
    // A full copy not yet known complete at the replica (PeerStatus::copy_pending).
    bool copy_pending = false;
    bool copy_end_sent = false;   // CopyDone went out with copy_end
    uint64_t copy_end = 0;        // the copy's L1
    bool copy_confirmed = false;  // the replica reported no copy in progress after CopyDone
  };

  // Records (base_lsn, last_lsn]; the ones at or below base_lsn were pruned.
  std::deque<Rec> recs;
  uint64_t base_lsn = 0;
  uint64_t base_cum = 0;
  uint64_t last = 0;
  uint64_t durable = 0;
  uint64_t applied = 0;  // the local applier's LSN: a future copy's base is at least this
  std::map<std::string, Peer> peers;
  // The sync set in etcd (GateOnPublishedSyncSet).
  bool gated = false;
  uint64_t gate_lsn = 0;    // the log's last LSN when gated: nothing after it completes unpublished
  uint64_t sync_floor = 0;  // the highest floor sent
  std::optional<SyncSet> published;
  std::optional<SyncSet> sync_inflight;
  // A set whose Txn failed without an answer: etcd may hold it until a later one succeeds.
  std::optional<SyncSet> uncertain;
  // A member rejoined while etcd holds a set with none. That set promises that every write which
  // may have completed in sync mode is at or below its floor, and lets the election choose any
  // site holding the floor: writes completed with the member would be lost there. So the release
  // points stay where they were at the rejoin (degraded writes, completed without a member) until
  // a set with a member is in etcd (one Txn).
  std::optional<uint64_t> rejoin_write_cap;
  std::optional<uint64_t> rejoin_flush_cap;

  static bool Has(const std::optional<SyncSet>& s, const std::string& name) {
    return s && std::binary_search(s->members.begin(), s->members.end(), name);
  }
  SyncSet Wanted() const {
    SyncSet w;
    for (auto& [n, p] : peers)
      if (InSyncSet(p)) w.members.push_back(n);  // std::map: sorted
    if (!w.members.empty()) {
      w.floor_lsn = sync_floor;
    } else if (published && published->members.empty() && !uncertain) {
      w.floor_lsn = published->floor_lsn;  // still no member: nothing to publish again
    } else {
      w.floor_lsn = std::max(sync_floor, last);
    }
    return w;
  }
  // Writes wait for it: a member in memory, or in a set etcd may hold (a smaller one is not there
  // yet).
  // Every set etcd may hold counts: the published one, the one in flight, one whose Txn failed.
  bool Counts(const Peer& p) const {
    return InSyncSet(p) || (gated && (Has(published, p.name) || Has(sync_inflight, p.name) ||
                                      Has(uncertain, p.name)));
  }
  // The cap of an unpublished or shrinking set (see GateOnPublishedSyncSet).
  uint64_t GateCap() const {
    uint64_t cap = std::numeric_limits<uint64_t>::max();
    if (!gated) return cap;
    if (!published) cap = gate_lsn;
    for (const std::optional<SyncSet>* o : {&sync_inflight, &uncertain})
      if (*o && (*o)->members.empty()) cap = std::min(cap, (*o)->floor_lsn);
    return cap;
  }

  uint64_t CumAt(uint64_t lsn) const {
    if (lsn <= base_lsn || recs.empty()) return base_cum;
    if (lsn >= last) return recs.back().cum_bytes;
    return recs[lsn - base_lsn - 1].cum_bytes;
  }
  const Rec* RecAt(uint64_t lsn) const {
    if (lsn <= base_lsn || lsn > last || recs.empty()) return nullptr;
    return &recs[lsn - base_lsn - 1];
  }
  bool InSyncSet(const Peer& p) const { return p.options.mode == Mode::kSync && !p.degraded; }
  // What a peer holds for the release points: nothing until its positions are confirmed.
  uint64_t WriteHeld(const Peer& p) const { return p.confirmed ? p.pos.received : 0; }
  uint64_t FlushHeld(const Peer& p) const { return p.confirmed ? p.pos.durable : 0; }
  uint64_t WriteReleased() const {
    uint64_t r = std::min({last, GateCap(), rejoin_write_cap.value_or(last)});
    for (auto& [n, p] : peers)
      if (Counts(p)) r = std::min(r, WriteHeld(p));
    return r;
  }
  uint64_t FlushReleased() const {
    uint64_t r = std::min({durable, GateCap(), rejoin_flush_cap.value_or(durable)});
    for (auto& [n, p] : peers)
      if (Counts(p)) r = std::min(r, FlushHeld(p));
    return r;
  }
  // The copy is complete at the replica and its log reached the copy's end: it holds every record
  // up to its received LSN again (the copy up to the base, its log after it).
  bool MaybeEndCopy(Peer& p) {
    if (!p.copy_pending || !p.copy_confirmed || p.pos.received < p.copy_end ||
        p.pos.durable < p.copy_end)
      return false;
    p.copy_pending = false;
    p.confirmed = true;
    return true;
  }
  // Its positions stop counting: it holds back every write not released now.
  void Unconfirm(Peer& p) {
    if (!p.confirmed) return;
    const Rec* oldest = RecAt(std::max(WriteReleased(), base_lsn) + 1);
    p.holds_since = oldest ? std::optional<Nanos>(oldest->appended_at) : std::nullopt;
    p.confirmed = false;
  }

  Nanos Rtt(const Peer& p) const {
    // Min over the 10 s before the newest sample, so the figure does not depend on when it is
    // asked (NextSend, NextDeadline and Status agree).
    if (p.rtt_samples.empty()) return 0;
    Nanos newest = p.rtt_samples.back().first, best = std::numeric_limits<Nanos>::max();
    for (auto& [t, r] : p.rtt_samples)
      if (t >= newest - kFilterWindow) best = std::min(best, r);
    return best;
  }
  // Send time of the batch that holds `lsn` on this connection (0 if none does: the replica may
  // have had it before); forgets the batches wholly below `lsn` (received only grows).
  static Nanos SentAt(Peer& p, uint64_t lsn) {
    while (!p.sends.empty() && p.sends.front().last < lsn) p.sends.pop_front();
    return p.sends.empty() || p.sends.front().first > lsn ? 0 : p.sends.front().at;
  }
  uint64_t Rate(const Peer& p) const {
    uint64_t best = 0;
    for (auto& [t, r] : p.rate_samples) best = std::max(best, r);
    return best;
  }
  uint64_t Window(const Peer& p) const {
    const uint64_t lo = p.options.min_window_bytes;
    const uint64_t hi = std::max(lo, p.options.max_window_bytes);
    double bdp2 = 2.0 * static_cast<double>(Rtt(p)) / kSecond * static_cast<double>(Rate(p));
    if (bdp2 <= static_cast<double>(lo)) return lo;
    if (bdp2 >= static_cast<double>(hi)) return hi;
    return static_cast<uint64_t>(bdp2);
  }
  // Only where a standing queue can build behind the window: not a sync peer in the sync set
  // (its client's queue depth bounds what is in flight, and a pause would hold its writes).
  bool MayProbe(const Peer& p) const {
    return p.state == LinkState::kStreaming && p.next_lsn != 0 &&
           (p.options.mode == Mode::kAsync || p.degraded);
  }
  uint64_t Inflight(const Peer& p) const {
    if (p.sent_last <= p.conn_received) return 0;
    return CumAt(p.sent_last) - CumAt(p.conn_received);
  }
  Lag LagOf(const Peer& p) const {
    Lag lag;
    if (p.pos.durable >= last) return lag;
    lag.lsns = last - p.pos.durable;
    lag.bytes = CumAt(last) - CumAt(p.pos.durable);
    const Rec* r = RecAt(std::max(p.pos.durable, base_lsn) + 1);
    lag.oldest_timestamp_ns = r ? r->timestamp_ns : 0;
    return lag;
  }
  // When a due peer's coalescing ends (nullopt if it sends at once or is not sending at all).
  enum class Due { kNo, kNow, kLater };
  Due SendDue(const Peer& p, Nanos now, Nanos* deadline) const {
    if (!Connected(p.state) || p.next_lsn == 0 || p.next_lsn > last) return Due::kNo;
    if (p.probe_since != 0) return Due::kNo;  // draining for an RTT probe
    const uint64_t inflight = Inflight(p);
    if (inflight >= Window(p)) return Due::kNo;
    if (inflight == 0) return Due::kNow;
    const uint64_t unsent_bytes = CumAt(last) - CumAt(p.next_lsn - 1);
    const uint64_t unsent_records = last - p.next_lsn + 1;
    if (unsent_bytes >= p.options.max_batch_bytes ||
        unsent_records >= std::max<uint32_t>(p.options.max_batch_records, 1))
      return Due::kNow;
    // A sync peer's writes wait for it: holding them to fill a batch adds the wait to every
    // write's latency (at queue depth 16 on a 20 ms link, -9 % IOPS). What the committer wrote
    // together still goes together; only the timer is skipped.
    if (p.options.mode == Mode::kSync && !p.degraded) return Due::kNow;
    const Rec* oldest = RecAt(p.next_lsn);
    if (oldest == nullptr) return Due::kNow;  // pruned: let the shipper find out it is gone
    const Nanos due = oldest->appended_at + p.options.max_batch_delay;
    if (deadline) *deadline = due;
    return now >= due ? Due::kNow : Due::kLater;
  }
  // The time a non-degraded sync peer leaves the sync set if nothing changes (nullopt: never).
  std::optional<Nanos> DegradeAt(const Peer& p) const {
    if (p.options.mode != Mode::kSync || p.degraded || p.options.sync_degrade_after <= 0)
      return std::nullopt;
    // Whichever comes first: down for that long, or a write waiting on it for that long (so no
    // WRITE waits longer than sync_degrade_after, connected or not).
    std::optional<Nanos> at;
    if (!Connected(p.state)) at = p.down_since + p.options.sync_degrade_after;
    // The append time of the oldest write it holds back (the index keeps every record the peers
    // have not made durable, so one waiting on a confirmed peer is older than base_lsn only if
    // the log dropped it for retention: then the oldest record held is the best known).
    std::optional<Nanos> oldest;
    if (!p.confirmed) {
      oldest = p.holds_since;
    } else if (const Rec* r = RecAt(std::max(p.pos.received, base_lsn) + 1)) {
      oldest = r->appended_at;
    }
    if (oldest) {
      const Nanos t = *oldest + p.options.sync_degrade_after;
      at = at ? std::min(*at, t) : t;
    }
    return at;
  }
  bool MaybeRejoin(Peer& p) {
    if (!p.degraded || !p.confirmed || p.pos.durable < last || p.pos.received < last) return false;
    if (gated && published && published->members.empty() && !rejoin_write_cap) {
      rejoin_write_cap = WriteReleased();
      rejoin_flush_cap = FlushReleased();
    }
    p.degraded = false;
    return true;
  }
  uint64_t MinPeerDurable() const {
    if (peers.empty()) return last;
    uint64_t m = std::numeric_limits<uint64_t>::max();
    for (auto& [n, p] : peers) m = std::min(m, p.pos.durable);
    return m;
  }
  void PruneTo(uint64_t lsn) {
    while (!recs.empty() && recs.front().lsn <= lsn) {
      base_lsn = recs.front().lsn;
      base_cum = recs.front().cum_bytes;
      recs.pop_front();
    }
  }
  // The lag index keeps what a peer's lag needs: every record after its durable LSN, and after
  // the applied LSN, the base of any copy from the start that can still begin (it lowers the
  // copied peer's durable to that base).
  void Prune() { PruneTo(std::min(MinPeerDurable(), applied)); }
};

PrimaryGroup::PrimaryGroup() : impl_(std::make_unique<Impl>()) {}
PrimaryGroup::~PrimaryGroup() = default;
PrimaryGroup::PrimaryGroup(PrimaryGroup&&) noexcept = default;
PrimaryGroup& PrimaryGroup::operator=(PrimaryGroup&&) noexcept = default;

void PrimaryGroup::AddPeer(const std::string& peer, const SenderOptions& options, Positions initial,
                           Nanos now) {
  auto [it, inserted] = impl_->peers.try_emplace(peer);
  Impl::Peer& p = it->second;
  p.options = options;
  if (!inserted) return;  // a config reload: keep what is known
  p.name = peer;
  p.pos = initial;
  p.down_since = now;
}

void PrimaryGroup::OnLocalAppend(uint64_t lsn, uint64_t bytes, uint64_t timestamp_ns, Nanos now) {
  Impl& s = *impl_;
  if (lsn <= s.last) return;  // out of order or repeated: the log's order is the truth
  if (lsn != s.last + 1) {
    // The first record after opening a log that starts at lsn, or a jump: track from here.
    s.base_cum = s.CumAt(s.last);
    s.recs.clear();
    s.base_lsn = lsn - 1;
  }
  const uint64_t cum = (s.recs.empty() ? s.base_cum : s.recs.back().cum_bytes) + bytes;
  s.recs.push_back(Impl::Rec{lsn, cum, timestamp_ns, now});
  s.last = lsn;
  for (auto& [n, p] : s.peers)
    if (!p.confirmed && !p.holds_since) p.holds_since = now;
}

void PrimaryGroup::OnLocalDurable(uint64_t lsn) {
  impl_->durable = std::max(impl_->durable, std::min(lsn, impl_->last));
}

void PrimaryGroup::OnLocalApplied(uint64_t lsn) {
  Impl& s = *impl_;
  if (lsn <= s.applied) return;
  s.applied = lsn;
  s.Prune();
}

void PrimaryGroup::OnLocalTruncate(uint64_t first_lsn) {
  if (first_lsn == 0) return;
  impl_->PruneTo(std::min(first_lsn - 1, impl_->last));
}

void PrimaryGroup::OnConnected(const std::string& peer, Nanos now) {
  auto it = impl_->peers.find(peer);
  if (it == impl_->peers.end()) return;
  Impl::Peer& p = it->second;
  if (Connected(p.state)) p.down_since = now;
  p.state = LinkState::kHandshake;
}

uint64_t PrimaryGroup::OnDecision(const std::string& peer, const HandshakeDecision& d,
                                  uint64_t copy_base_lsn, Nanos now) {
  auto it = impl_->peers.find(peer);
  if (it == impl_->peers.end()) return 0;
  Impl::Peer& p = it->second;
  switch (d.kind) {
    case HandshakeDecision::Kind::kRefuse:
    case HandshakeDecision::Kind::kRejoin:  // never on the wire; treated as a refusal
      impl_->Unconfirm(p);                  // its log is not the one its positions described
      p.state = LinkState::kRefused;
      p.last_error = std::string("refused (") + RefuseCodeName(d.code) + "): " + d.reason;
      p.next_lsn = 0;
      return 0;
    case HandshakeDecision::Kind::kStreamFrom:
      // Its log is the one its positions describe (the persisted ones too): they count, unless
      // a copy to it is still to be confirmed complete.
      if (!p.copy_pending) p.confirmed = true;
      p.state = LinkState::kStreaming;
      p.next_lsn = std::max<uint64_t>(d.start_lsn, 1);
      break;
    case HandshakeDecision::Kind::kFullCopy:
    case HandshakeDecision::Kind::kRestore:
      // A restore is a copy of some extents over the replica's own log: like a resumed copy.
      impl_->Unconfirm(p);
      p.copy_pending = true;
      p.copy_end_sent = false;
      p.copy_end = 0;
      p.copy_confirmed = false;
      p.state = LinkState::kCopying;
      if (d.copy_resume || d.kind == HandshakeDecision::Kind::kRestore) {
        p.next_lsn = std::max<uint64_t>(d.start_lsn, 1);
      } else {
        // The peer's log is replaced by one starting at copy_base_lsn + 1.
        p.pos.received = copy_base_lsn;
        p.pos.durable = copy_base_lsn;
        p.pos.applied = std::min(p.pos.applied, copy_base_lsn);
        p.next_lsn = copy_base_lsn + 1;
      }
      break;
  }
  p.sent_last = p.next_lsn - 1;
  p.conn_received = p.next_lsn - 1;
  p.rate_interval_start = -1;
  p.rate_interval_bytes = 0;
  p.sends.clear();
  (void)now;
  return p.next_lsn;
}

void PrimaryGroup::OnCopyDone(const std::string& peer, uint64_t end_lsn, Nanos now) {
  (void)now;
  auto it = impl_->peers.find(peer);
  if (it == impl_->peers.end() || it->second.state != LinkState::kCopying) return;
  Impl::Peer& p = it->second;
  p.state = LinkState::kStreaming;
  p.copy_end_sent = true;
  p.copy_end = end_lsn;
}

void PrimaryGroup::OnDisconnected(const std::string& peer, const std::string& reason, Nanos now) {
  auto it = impl_->peers.find(peer);
  if (it == impl_->peers.end()) return;
  Impl::Peer& p = it->second;
  if (Connected(p.state)) p.down_since = now;
  if (p.state == LinkState::kRefused) {
    // The refusal is the useful reason; keep it and the state until the next dial.
  } else {
    p.state = LinkState::kDisconnected;
    if (!reason.empty()) p.last_error = reason;
  }
  p.next_lsn = 0;
  p.sent_last = 0;
  p.conn_received = 0;
  p.rate_interval_start = -1;
  p.rate_interval_bytes = 0;
  p.sends.clear();
  p.probe_since = 0;
  p.probe_sent_at = 0;
}

bool PrimaryGroup::OnPosition(const std::string& peer, const Positions& pos, Nanos now) {
  Impl& s = *impl_;
  auto it = s.peers.find(peer);
  if (it == s.peers.end()) return false;
  Impl::Peer& p = it->second;
  bool moved = false;
  if (pos.received > p.pos.received) {
    p.pos.received = pos.received;
    moved = true;
  }
  if (Connected(p.state) && pos.received > p.conn_received) {
    const uint64_t acked = s.CumAt(pos.received) - s.CumAt(p.conn_received);
    p.conn_received = pos.received;
    // Delivery rate: bytes acknowledged per interval of at least max(rtt, 10 ms); the max of
    // the samples over 10 s (idle time lowers a sample, it must not shrink the window). As in
    // BBR, a sample is also divided by no less than the time over which its bytes were sent:
    // a replica that stalled (an fsync, its CPU) and then acknowledges its backlog at once
    // would otherwise read as a link several times faster than it is, and the window would
    // grow into a standing queue (on the WAN lab's 50 ms link, up to 3-4x the link's rate).
    const Nanos sent = s.SentAt(p, pos.received);
    if (p.rate_interval_start < 0) {
      p.rate_interval_start = now;
      p.rate_interval_bytes = 0;
      p.rate_interval_sent = sent;
    } else {
      p.rate_interval_bytes += acked;
      const Nanos dt = now - p.rate_interval_start;
      if (dt >= std::max(s.Rtt(p), kMinRateInterval)) {
        Nanos span = dt;
        if (p.rate_interval_sent > 0 && sent > p.rate_interval_sent)
          span = std::max(span, sent - p.rate_interval_sent);
        const uint64_t rate =
            static_cast<uint64_t>(static_cast<double>(p.rate_interval_bytes) * kSecond / span);
        p.rate_samples.emplace_back(now, rate);
        while (!p.rate_samples.empty() && p.rate_samples.front().first < now - kFilterWindow)
          p.rate_samples.pop_front();
        p.rate_interval_start = now;
        p.rate_interval_bytes = 0;
        p.rate_interval_sent = sent;
      }
    }
  }
  if (pos.durable > p.pos.durable) {
    p.pos.durable = pos.durable;
    moved = true;
  }
  p.pos.applied = std::max(p.pos.applied, pos.applied);
  p.pos.copying = pos.copying;
  // Reports are in order on the stream: one without `copying` after CopyDone went out was sent
  // after the replica persisted the copy's completion.
  if (p.copy_pending && p.copy_end_sent && !pos.copying && Connected(p.state))
    p.copy_confirmed = true;
  moved |= s.MaybeEndCopy(p);
  if (Connected(p.state)) {
    // Records the replica holds need not be sent again (it may be ahead of the decision).
    p.sent_last = std::max(p.sent_last, p.conn_received);
    p.next_lsn = std::max(p.next_lsn, p.conn_received + 1);
  }
  moved |= s.MaybeRejoin(p);
  s.Prune();
  return moved;
}

void PrimaryGroup::OnRttSample(const std::string& peer, Nanos rtt, Nanos now) {
  auto it = impl_->peers.find(peer);
  if (it == impl_->peers.end() || rtt <= 0) return;
  Impl::Peer& p = it->second;
  const Nanos sent = now - rtt;
  if (p.clean_sent_at != 0 && sent == p.clean_sent_at) {
    // Sent with nothing in flight: the link's RTT without a queue, now.
    p.rtt_base = rtt;
    p.rtt_confirmed_at = now;
    p.clean_sent_at = 0;
  } else if (p.rtt_base != 0 && rtt <= 2 * p.rtt_base) {
    p.rtt_confirmed_at = now;
    p.rtt_base = std::min(p.rtt_base, rtt);
  }
  if (p.probe_sent_at != 0 && sent >= p.probe_sent_at) {
    p.probe_since = 0;  // its echo (clean, above) or a later one
    p.probe_sent_at = 0;
  } else if (p.probe_since == 0 && impl_->MayProbe(p) &&
             now - p.rtt_confirmed_at >=
                 std::clamp(kProbeAfterRtts * p.rtt_base, kProbeAfterMin, kProbeAfterMax)) {
    // Every sample for a while measured a queue behind the window (a replica slower than the
    // primary, queueing what the window lets through): the window grew from it, and the queue
    // with it. Drain it and time a heartbeat alone.
    p.probe_since = now;
  }
  auto& samples = p.rtt_samples;
  samples.emplace_back(now, rtt);
  while (samples.size() > 1 && samples.front().first < now - kFilterWindow) samples.pop_front();
}

bool PrimaryGroup::RttProbeReady(const std::string& peer) const {
  auto it = impl_->peers.find(peer);
  if (it == impl_->peers.end()) return false;
  const Impl::Peer& p = it->second;
  // Streaming, as OnHeartbeatSent needs to take the heartbeat as the probe's (else the caller
  // would send one on every pass until the probe is given up).
  return p.probe_since != 0 && p.probe_sent_at == 0 && p.state == LinkState::kStreaming &&
         impl_->Inflight(p) == 0;
}

void PrimaryGroup::OnHeartbeatSent(const std::string& peer, Nanos now) {
  auto it = impl_->peers.find(peer);
  if (it == impl_->peers.end()) return;
  Impl::Peer& p = it->second;
  // Copy chunks are not counted in flight: only a streaming link's heartbeat can be clean.
  if (p.state != LinkState::kStreaming || impl_->Inflight(p) != 0) return;
  p.clean_sent_at = now;
  if (p.probe_since != 0 && p.probe_sent_at == 0) p.probe_sent_at = now;
}

bool PrimaryGroup::OnTick(Nanos now) {
  Impl& s = *impl_;
  bool moved = false;
  for (auto& [name, p] : s.peers) {
    if (p.probe_since != 0 && now - p.probe_since >= kProbeMax) {
      // Not drained (or its echo lost) in time: send again, and probe again later.
      p.probe_since = 0;
      p.probe_sent_at = 0;
      p.rtt_confirmed_at = now;
    }
    if (s.MaybeRejoin(p)) {
      moved = true;
      continue;
    }
    std::optional<Nanos> at = s.DegradeAt(p);
    if (at && now >= *at) {
      p.degraded = true;
      p.last_error = std::string("left the sync set: ") +
                     (Connected(p.state) ? "unacknowledged writes older than the degrade limit"
                                         : "disconnected or writes waiting past the degrade limit");
      moved = true;
    }
  }
  // Every member that rejoined has left again: what completes now completes without one, as
  // before the rejoin (a set with it that etcd may hold still makes writes wait for it).
  if (s.rejoin_write_cap && std::none_of(s.peers.begin(), s.peers.end(),
                                         [&](const auto& e) { return s.InSyncSet(e.second); })) {
    s.rejoin_write_cap.reset();
    s.rejoin_flush_cap.reset();
    moved = true;
  }
  return moved;
}

std::optional<SendPlan> PrimaryGroup::NextSend(const std::string& peer, Nanos now) const {
  const Impl& s = *impl_;
  auto it = s.peers.find(peer);
  if (it == s.peers.end()) return std::nullopt;
  const Impl::Peer& p = it->second;
  if (s.SendDue(p, now, nullptr) != Impl::Due::kNow) return std::nullopt;
  const uint32_t max_records = std::max<uint32_t>(p.options.max_batch_records, 1);
  SendPlan plan;
  plan.from_lsn = p.next_lsn;
  plan.to_lsn = std::min(s.last, p.next_lsn + max_records - 1);
  plan.max_bytes =
      std::max<uint64_t>(std::min(s.Window(p) - s.Inflight(p), p.options.max_batch_bytes), 1);
  plan.max_records = max_records;
  return plan;
}

void PrimaryGroup::OnSent(const std::string& peer, uint64_t first_lsn, uint64_t last_lsn,
                          uint64_t bytes, Nanos now) {
  (void)bytes;  // in-flight bytes come from the per-record sizes, which the batch matches
  auto it = impl_->peers.find(peer);
  if (it == impl_->peers.end()) return;
  Impl::Peer& p = it->second;
  if (!Connected(p.state)) return;
  p.next_lsn = std::max(p.next_lsn, last_lsn + 1);
  if (last_lsn > p.sent_last && last_lsn > p.conn_received) {
    p.sends.push_back({std::max({first_lsn, p.sent_last + 1, p.conn_received + 1}), last_lsn, now});
  }
  p.sent_last = std::max(p.sent_last, last_lsn);
}

std::optional<Nanos> PrimaryGroup::NextDeadline() const {
  const Impl& s = *impl_;
  std::optional<Nanos> best;
  auto take = [&](Nanos t) { best = best ? std::min(*best, t) : t; };
  for (auto& [name, p] : s.peers) {
    Nanos due = 0;
    if (s.SendDue(p, std::numeric_limits<Nanos>::min(), &due) == Impl::Due::kLater) take(due);
    if (std::optional<Nanos> at = s.DegradeAt(p)) take(*at);
  }
  return best;
}

uint64_t PrimaryGroup::write_released() const { return impl_->WriteReleased(); }

uint64_t PrimaryGroup::flush_released() const { return impl_->FlushReleased(); }

std::string DescribeSyncSet(const SyncSet& s) {
  std::string out = "{";
  for (size_t i = 0; i < s.members.size(); ++i) out += (i ? "," : "") + s.members[i];
  return out + "} floor " + std::to_string(s.floor_lsn);
}

void PrimaryGroup::GateOnPublishedSyncSet() {
  Impl& s = *impl_;
  s.gated = true;
  s.gate_lsn = s.last;
  s.sync_floor = std::max(s.sync_floor, s.last);
}

std::optional<SyncSet> PrimaryGroup::SyncSetToPublish() const {
  const Impl& s = *impl_;
  if (!s.gated || s.sync_inflight) return std::nullopt;
  SyncSet w = s.Wanted();
  // The same as published is sent again only to replace a set that failed without an answer
  // (etcd may hold it, and writes wait for its members: one that left would hold them forever).
  if (s.published && *s.published == w && !s.uncertain) return std::nullopt;
  return w;
}

void PrimaryGroup::OnSyncSetSent(const SyncSet& set) {
  Impl& s = *impl_;
  s.sync_inflight = set;
  s.sync_floor = std::max(s.sync_floor, set.floor_lsn);
}

bool PrimaryGroup::OnSyncSetPublished(const SyncSet& set, bool ok) {
  Impl& s = *impl_;
  if (!s.sync_inflight || !(*s.sync_inflight == set)) return false;
  s.sync_inflight.reset();
  if (ok) {
    s.published = set;
    s.uncertain.reset();
    if (!set.members.empty()) {
      s.rejoin_write_cap.reset();
      s.rejoin_flush_cap.reset();
    }
  } else {
    s.uncertain = set;  // it may still be applied: keep its cap until a later set is in etcd
  }
  return true;
}

std::optional<SyncSet> PrimaryGroup::published_sync_set() const { return impl_->published; }

uint64_t PrimaryGroup::last_lsn() const { return impl_->last; }
uint64_t PrimaryGroup::durable_lsn() const { return impl_->durable; }
uint64_t PrimaryGroup::MinPeerDurable() const { return impl_->MinPeerDurable(); }

std::vector<PeerStatus> PrimaryGroup::Status(Nanos now) const {
  (void)now;
  const Impl& s = *impl_;
  std::vector<PeerStatus> out;
  for (auto& [name, p] : s.peers) {
    PeerStatus st;
    st.peer = name;
    st.mode = p.options.mode;
    st.state = p.state;
    st.positions = p.pos;
    st.in_sync_set = s.Counts(p);
    st.degraded = p.degraded;
    st.confirmed = p.confirmed;
    st.copy_pending = p.copy_pending;
    st.next_lsn = p.next_lsn;
    st.inflight_bytes = s.Inflight(p);
    st.window_bytes = s.Window(p);
    st.rtt = s.Rtt(p);
    st.delivery_rate = s.Rate(p);
    st.lag = s.LagOf(p);
    st.last_error = p.last_error;
    out.push_back(std::move(st));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// ReplicaReceiver

ReplicaReceiver::ReplicaReceiver(ReplicaView view) : view_(std::move(view)) {
  accepted_ = view_.last_lsn;
  pos_.received = view_.last_lsn;
  pos_.durable = view_.last_lsn;
  synced_ = view_.last_lsn;
  pos_.copying = view_.copy_in_progress || view_.restore_pending;
}

uint64_t ReplicaReceiver::LogEpoch() const {
  return view_.history.empty() ? 0 : view_.history.back().epoch;
}

HandshakeDecision ReplicaReceiver::OnHello(const PrimaryHello& hello) {
  HandshakeDecision d = DecideHandshake(hello, view_);
  const bool fences = d.code != RefuseCode::kUnknownGroup && d.code != RefuseCode::kNotReplica &&
                      d.code != RefuseCode::kStaleEpoch;
  if (fences && hello.epoch > view_.newest_epoch) view_.newest_epoch = hello.epoch;
  have_stream_ = d.kind != HandshakeDecision::Kind::kRefuse;
  // A copy from the start replaces the log: positions of the old log would mislead the primary,
  // which has registered the copy's base already.
  awaiting_copy_begin_ = d.kind == HandshakeDecision::Kind::kFullCopy && !d.copy_resume;
  if (d.kind == HandshakeDecision::Kind::kRestore) {
    view_.restore_epoch = hello.epoch;
    if (!d.copy_resume) {
      view_.copy_volume = 0;
      view_.copy_offset = 0;
    }
  }
  stream_epoch_ = hello.epoch;
  stream_history_ = hello.history;
  acked_once_ = false;
  return d;
}

ReplicaReceiver::BatchCheck ReplicaReceiver::OnBatch(uint64_t epoch, uint64_t first_lsn,
                                                     uint32_t count) {
  BatchCheck c;
  const std::string what =
      "batch of " + U(count) + " records at LSN " + U(first_lsn) + " in epoch " + U(epoch);
  if (!have_stream_) {
    c.reason = what + " before an accepted Hello";
    return c;
  }
  if (stream_epoch_ < view_.newest_epoch) {
    c.reason = what + " on a stream of epoch " + U(stream_epoch_) +
               ", fenced: this replica has seen epoch " + U(view_.newest_epoch);
    return c;
  }
  if (first_lsn == 0 || count == 0) {
    c.reason = what + ": malformed (LSN 0 or no records)";
    return c;
  }
  const uint64_t last_in_batch = first_lsn + count - 1;
  if (epoch > stream_epoch_ || EpochAt(stream_history_, first_lsn) != epoch ||
      EpochAt(stream_history_, last_in_batch) != epoch) {
    c.reason = what + ": the primary's history puts epoch " +
               U(EpochAt(stream_history_, first_lsn)) + " at LSN " + U(first_lsn) + " and epoch " +
               U(EpochAt(stream_history_, last_in_batch)) + " at LSN " + U(last_in_batch) +
               " (stream epoch " + U(stream_epoch_) + ")";
    return c;
  }
  const uint64_t held = std::max(view_.last_lsn, accepted_);
  if (first_lsn > held + 1) {
    c.reason = what + ": gap, this replica's log ends at LSN " + U(held) + " (expected LSN " +
               U(held + 1) + ")";
    return c;
  }
  c.skip_records = std::min<uint64_t>(held + 1 - first_lsn, count);
  if (c.skip_records < count && epoch < LogEpoch()) {
    c.reason = what + ": older than the epoch " + U(LogEpoch()) + " of this replica's log";
    return c;
  }
  c.verdict = BatchCheck::Verdict::kAppend;
  accepted_ = std::max(accepted_, last_in_batch);
  if (c.skip_records < count && epoch > LogEpoch()) {
    c.begins_epoch = true;
    view_.history.push_back(EpochStart{epoch, first_lsn + c.skip_records});
  }
  return c;
}

void ReplicaReceiver::OnCopyBegin(uint64_t epoch, uint64_t log_start_lsn) {
  OnCopyBegin(epoch, log_start_lsn, stream_history_);
}

void ReplicaReceiver::OnCopyBegin(uint64_t epoch, uint64_t log_start_lsn,
                                  const History& primary_history) {
  view_.newest_epoch = std::max(view_.newest_epoch, epoch);
  awaiting_copy_begin_ = false;
  acked_once_ = false;
  const uint64_t base = log_start_lsn == 0 ? 0 : log_start_lsn - 1;
  view_.history = HistoryUpTo(primary_history, base);
  view_.last_lsn = base;
  accepted_ = base;
  view_.consistent = false;
  view_.copy_in_progress = true;
  view_.copy_volume = 0;
  view_.copy_offset = 0;
  view_.consistent_at_lsn = 0;
  view_.copy_epoch = epoch;
  view_.consistent_at_epoch = 0;
  view_.restore_pending = false;  // the copy replaces every byte
  view_.restore_epoch = 0;
  view_.restore_extents.clear();
  pos_.received = base;
  pos_.durable = base;
  synced_ = base;
  pos_.applied = std::min(pos_.applied, base);
  pos_.copying = true;
}

void ReplicaReceiver::OnCopyChunk(uint32_t volume, uint64_t next_offset) {
  view_.copy_volume = volume;
  view_.copy_offset = next_offset;
}

void ReplicaReceiver::OnCopyDone(uint64_t consistent_at_lsn) {
  view_.copy_in_progress = false;
  view_.consistent = true;
  view_.consistent_at_lsn = consistent_at_lsn;
  // The copy's records up to L1 were written by the primary of this stream: its history says
  // their epochs (records after the Hello's last LSN are in its own epoch, the history's last).
  view_.consistent_at_epoch = StreamEpochAt(consistent_at_lsn);
  view_.restore_pending = false;
  view_.restore_epoch = 0;
  view_.restore_extents.clear();
  pos_.copying = false;  // the next ack tells the primary (the caller persisted the view first)
}

void ReplicaReceiver::OnAppended(uint64_t last_lsn) {
  view_.last_lsn = std::max(view_.last_lsn, last_lsn);
  pos_.received = std::max(pos_.received, last_lsn);
  pos_.durable = std::max(pos_.durable, std::min(synced_, view_.last_lsn));
}

void ReplicaReceiver::OnDurable(uint64_t lsn) {
  synced_ = std::max(synced_, lsn);
  pos_.durable = std::max(pos_.durable, std::min(synced_, view_.last_lsn));
}

void ReplicaReceiver::OnApplied(uint64_t lsn) { pos_.applied = std::max(pos_.applied, lsn); }

bool ReplicaReceiver::AckAppendNow(bool async_link, bool durable_requested, bool fsync_busy,
                                   uint64_t appended) const {
  return !(async_link && durable_requested) || fsync_busy || pos_.durable >= appended;
}

std::optional<Positions> ReplicaReceiver::TakeAck() {
  if (awaiting_copy_begin_) return std::nullopt;
  if (acked_once_ && acked_ == pos_) return std::nullopt;
  acked_once_ = true;
  acked_ = pos_;
  return pos_;
}

const Positions& ReplicaReceiver::positions() const { return pos_; }
uint64_t ReplicaReceiver::newest_epoch() const { return view_.newest_epoch; }
uint64_t ReplicaReceiver::StreamEpochAt(uint64_t lsn) const {
  return EpochAt(stream_history_, lsn);
}
const ReplicaView& ReplicaReceiver::view() const { return view_; }

bool ReplicaReceiver::consistent() const {
  return view_.consistent && !view_.copy_in_progress && !view_.restore_pending &&
         pos_.applied >= view_.consistent_at_lsn;
}

}  // namespace tvilling::core
