// replication.cc: the replication state machines (see replication.h and docs/replication.md).
#include "agent/core/replication.h"

#include <algorithm>
#include <limits>
#include <set>
#include <string>

namespace tvilling::core {
namespace {

constexpr Nanos kSecond = 1'000'000'000;
constexpr Nanos kRttWindow = 10 * kSecond;
constexpr Nanos kRateInterval = 100'000'000;  // delivery rate sampled over >= 100 ms

std::string Str(uint64_t v) { return std::to_string(v); }

// The first LSN in [from, to] where the epochs of `a` and `b` differ, or 0 if none.
uint64_t FirstDivergence(const History& a, const History& b, uint64_t from, uint64_t to) {
  if (from == 0) from = 1;
  if (from > to) return 0;
  std::set<uint64_t> points = {from};
  for (const auto& e : a) {
    if (e.first_lsn > from && e.first_lsn <= to) points.insert(e.first_lsn);
  }
  for (const auto& e : b) {
    if (e.first_lsn > from && e.first_lsn <= to) points.insert(e.first_lsn);
  }
  for (uint64_t l : points) {
    if (EpochAt(a, l) != EpochAt(b, l)) return l;
  }
  return 0;
}

}  // namespace

const char* ModeName(Mode m) { return m == Mode::kSync ? "sync" : "async"; }

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
      return "diverged history";
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
  for (const auto& e : history) {
    if (e.first_lsn <= lsn) {
      epoch = e.epoch;
    } else {
      break;
    }
  }
  return epoch;
}

uint64_t CommonPrefix(const History& a, uint64_t a_last, const History& b, uint64_t b_last) {
  const uint64_t m = std::min(a_last, b_last);
  const uint64_t d = FirstDivergence(a, b, 1, m);
  return d == 0 ? m : d - 1;
}

HandshakeDecision DecideHandshake(const PrimaryHello& hello, const ReplicaView& view) {
  using Kind = HandshakeDecision::Kind;
  HandshakeDecision d;
  auto refuse = [&](RefuseCode code, std::string reason) {
    d.kind = Kind::kRefuse;
    d.code = code;
    d.reason = std::move(reason);
    return d;
  };
  if (!view.group_known) {
    return refuse(RefuseCode::kUnknownGroup,
                  "group " + hello.group + " is not configured on this agent");
  }
  if (view.is_primary) {
    return refuse(RefuseCode::kNotReplica, "this agent is configured as the primary of group " +
                                               hello.group + "; it does not accept a stream from " +
                                               hello.site);
  }
  if (hello.epoch < view.newest_epoch) {
    return refuse(RefuseCode::kStaleEpoch,
                  "stale epoch: " + hello.site + " offers epoch " + Str(hello.epoch) +
                      " but this replica has already seen epoch " + Str(view.newest_epoch) +
                      " (another site became primary since)");
  }
  if (hello.volume_sizes != view.volume_sizes) {
    std::string p, r;
    for (uint64_t s : hello.volume_sizes) p += (p.empty() ? "" : ",") + Str(s);
    for (uint64_t s : view.volume_sizes) r += (r.empty() ? "" : ",") + Str(s);
    return refuse(RefuseCode::kVolumeMismatch,
                  "volume sizes differ: primary [" + p + "] bytes, replica [" + r + "] bytes");
  }
  // Divergence: only LSNs this replica holds count (after a copy its log starts late).
  if (view.last_lsn > 0 && !view.history.empty()) {
    const uint64_t from = view.history.front().first_lsn;
    const uint64_t to = std::min(view.last_lsn, hello.last_lsn);
    if (uint64_t l = FirstDivergence(hello.history, view.history, from, to); l != 0) {
      return refuse(RefuseCode::kDiverged,
                    "diverged history at LSN " + Str(l) + ": this replica has it in epoch " +
                        Str(EpochAt(view.history, l)) + ", " + hello.site + " in epoch " +
                        Str(EpochAt(hello.history, l)) +
                        "; the replica holds writes the primary does not (resync it with a full "
                        "copy)");
    }
    if (view.last_lsn > hello.last_lsn) {
      return refuse(RefuseCode::kDiverged, "diverged history: this replica holds LSNs up to " +
                                               Str(view.last_lsn) + " but " + hello.site +
                                               "'s log ends at " + Str(hello.last_lsn) +
                                               " (resync it with a full copy)");
    }
  }
  const bool primary_holds_next = view.last_lsn + 1 >= hello.first_lsn;
  if (view.copy_in_progress) {
    d.kind = Kind::kFullCopy;
    if (primary_holds_next) {
      d.copy_resume = true;
      d.copy_volume = view.copy_volume;
      d.copy_offset = view.copy_offset;
      d.start_lsn = view.last_lsn + 1;
      d.reason = "resuming the interrupted full copy at volume " + Str(view.copy_volume) +
                 " offset " + Str(view.copy_offset);
    } else {
      d.reason = "the interrupted full copy cannot resume: the primary's log starts at LSN " +
                 Str(hello.first_lsn) + ", the replica's ends at " + Str(view.last_lsn) +
                 "; copying again from the start";
    }
    return d;
  }
  if (!view.consistent) {
    d.kind = Kind::kFullCopy;
    d.reason = "the replica has never completed a copy of the volumes";
    return d;
  }
  if (!primary_holds_next) {
    d.kind = Kind::kFullCopy;
    d.reason = "the replica's log ends at LSN " + Str(view.last_lsn) +
               " but the primary's log starts at " + Str(hello.first_lsn) +
               " (the records in between were dropped by retention)";
    return d;
  }
  d.kind = Kind::kStreamFrom;
  d.start_lsn = view.last_lsn + 1;
  d.reason = "streaming from LSN " + Str(d.start_lsn);
  return d;
}

// ---------------------------------------------------------------------------------------------
// PrimaryGroup

namespace {

struct RecordInfo {
  uint64_t cum_bytes = 0;  // bytes of every record up to and including this one
  uint64_t timestamp_ns = 0;
  Nanos appended_at = 0;
};

struct PeerState {
  std::string name;
  SenderOptions opt;
  LinkState state = LinkState::kDisconnected;
  Positions pos;
  uint64_t next_lsn = 1;
  bool degraded = false;
  Nanos behind_since = -1;                          // received < last since then (-1: not behind)
  std::deque<std::pair<Nanos, Nanos>> rtt_samples;  // (time, rtt)
  Nanos rtt = 0;
  double rate = 0;  // bytes/s acknowledged as received
  Nanos rate_since = -1;
  uint64_t rate_bytes = 0;
  std::string last_error;
};

}  // namespace

struct PrimaryGroup::Impl {
  std::vector<PeerState> peers;
  uint64_t last = 0;
  uint64_t durable = 0;
  // recs[i] describes LSN base_lsn + i. cum_base = cumulative bytes through base_lsn - 1.
  std::deque<RecordInfo> recs;
  uint64_t base_lsn = 1;
  uint64_t cum_base = 0;

  PeerState* Find(const std::string& name) {
    for (auto& p : peers) {
      if (p.name == name) return &p;
    }
    return nullptr;
  }
  const PeerState* Find(const std::string& name) const {
    for (const auto& p : peers) {
      if (p.name == name) return &p;
    }
    return nullptr;
  }
  // Cumulative bytes through `lsn` (as exact as what is still indexed).
  uint64_t Cum(uint64_t lsn) const {
    if (lsn < base_lsn || recs.empty()) return cum_base;
    const uint64_t i = lsn - base_lsn;
    return i < recs.size() ? recs[i].cum_bytes : recs.back().cum_bytes;
  }
  const RecordInfo* Rec(uint64_t lsn) const {
    if (lsn < base_lsn || lsn - base_lsn >= recs.size()) return nullptr;
    return &recs[lsn - base_lsn];
  }
  bool InSyncSet(const PeerState& p) const { return p.opt.mode == Mode::kSync && !p.degraded; }
  uint64_t Window(const PeerState& p) const {
    double w = 2.0 * static_cast<double>(p.rtt) / static_cast<double>(kSecond) * p.rate;
    w = std::max(w, static_cast<double>(p.opt.min_window_bytes));
    w = std::min(w, static_cast<double>(p.opt.max_window_bytes));
    return static_cast<uint64_t>(w);
  }
  uint64_t Inflight(const PeerState& p) const {
    if (p.next_lsn == 0 || p.next_lsn - 1 <= p.pos.received) return 0;
    return Cum(p.next_lsn - 1) - Cum(p.pos.received);
  }
  void Prune() {
    uint64_t keep_after = last;
    for (const auto& p : peers) keep_after = std::min(keep_after, p.pos.durable);
    while (!recs.empty() && base_lsn <= keep_after) {
      cum_base = recs.front().cum_bytes;
      recs.pop_front();
      ++base_lsn;
    }
  }
};

PrimaryGroup::PrimaryGroup() : impl_(std::make_shared<Impl>()) {}

void PrimaryGroup::AddPeer(const std::string& peer, const SenderOptions& options, Positions initial,
                           Nanos now) {
  (void)now;
  PeerState p;
  p.name = peer;
  p.opt = options;
  p.pos = initial;
  p.next_lsn = initial.received + 1;
  impl_->peers.push_back(std::move(p));
}

void PrimaryGroup::OnLocalAppend(uint64_t lsn, uint64_t bytes, uint64_t timestamp_ns, Nanos now) {
  Impl& m = *impl_;
  if (lsn <= m.last) return;
  if (m.recs.empty() && m.base_lsn != lsn) {
    // First record seen (or a gap after truncation): index from here.
    m.base_lsn = lsn;
  }
  const uint64_t prev = m.recs.empty() ? m.cum_base : m.recs.back().cum_bytes;
  m.recs.push_back({prev + bytes, timestamp_ns, now});
  m.last = lsn;
  for (auto& p : m.peers) {
    if (p.behind_since < 0 && p.pos.received < m.last) p.behind_since = now;
  }
  if (m.peers.empty()) m.Prune();
}

void PrimaryGroup::OnLocalDurable(uint64_t lsn) { impl_->durable = std::max(impl_->durable, lsn); }

void PrimaryGroup::OnLocalTruncate(uint64_t first_lsn) {
  Impl& m = *impl_;
  while (!m.recs.empty() && m.base_lsn < first_lsn) {
    m.cum_base = m.recs.front().cum_bytes;
    m.recs.pop_front();
    ++m.base_lsn;
  }
  if (m.recs.empty()) m.base_lsn = std::max(m.base_lsn, first_lsn);
}

void PrimaryGroup::OnConnected(const std::string& peer, Nanos now) {
  (void)now;
  if (PeerState* p = impl_->Find(peer)) p->state = LinkState::kHandshake;
}

uint64_t PrimaryGroup::OnDecision(const std::string& peer, const HandshakeDecision& d,
                                  uint64_t copy_base_lsn, Nanos now) {
  (void)now;
  PeerState* p = impl_->Find(peer);
  if (p == nullptr) return 0;
  switch (d.kind) {
    case HandshakeDecision::Kind::kRefuse:
      p->state = LinkState::kRefused;
      p->last_error = d.reason;
      return 0;
    case HandshakeDecision::Kind::kStreamFrom:
      p->state = LinkState::kStreaming;
      p->next_lsn = d.start_lsn;
      break;
    case HandshakeDecision::Kind::kFullCopy:
      p->state = LinkState::kCopying;
      p->next_lsn = d.copy_resume ? d.start_lsn : copy_base_lsn + 1;
      break;
  }
  // The replica holds everything before next_lsn durably (it synced before answering).
  const uint64_t held = p->next_lsn - 1;
  p->pos.received = std::max(p->pos.received, held);
  p->pos.durable = std::max(p->pos.durable, held);
  p->last_error.clear();
  p->rate_since = -1;
  return p->next_lsn;
}

void PrimaryGroup::OnCopyDone(const std::string& peer, Nanos now) {
  (void)now;
  PeerState* p = impl_->Find(peer);
  if (p != nullptr && p->state == LinkState::kCopying) p->state = LinkState::kStreaming;
}

void PrimaryGroup::OnDisconnected(const std::string& peer, const std::string& reason, Nanos now) {
  PeerState* p = impl_->Find(peer);
  if (p == nullptr) return;
  if (p->state != LinkState::kRefused) p->state = LinkState::kDisconnected;
  if (!reason.empty()) p->last_error = reason;
  if (p->behind_since < 0 && p->pos.received < impl_->last) p->behind_since = now;
  p->rate_since = -1;
}

bool PrimaryGroup::OnPosition(const std::string& peer, const Positions& pos, Nanos now) {
  Impl& m = *impl_;
  PeerState* p = m.Find(peer);
  if (p == nullptr) return false;
  const Positions before = p->pos;
  // Never beyond what was sent (a confused peer cannot release writes it does not have).
  const uint64_t sent = p->next_lsn == 0 ? 0 : p->next_lsn - 1;
  p->pos.received = std::max(p->pos.received, std::min(pos.received, sent));
  p->pos.durable = std::max(p->pos.durable, std::min(pos.durable, sent));
  p->pos.applied = std::max(p->pos.applied, std::min(pos.applied, sent));
  // Delivery rate.
  const uint64_t acked = m.Cum(p->pos.received) - m.Cum(before.received);
  if (p->rate_since < 0) {
    p->rate_since = now;
    p->rate_bytes = 0;
  } else {
    p->rate_bytes += acked;
    const Nanos dt = now - p->rate_since;
    if (dt >= kRateInterval) {
      const double sample = static_cast<double>(p->rate_bytes) * static_cast<double>(kSecond) /
                            static_cast<double>(dt);
      p->rate = p->rate == 0 ? sample : 0.7 * p->rate + 0.3 * sample;
      p->rate_since = now;
      p->rate_bytes = 0;
    }
  }
  if (p->pos.received >= m.last) {
    p->behind_since = -1;
  } else if (p->pos.received > before.received) {
    p->behind_since = now;  // making progress: measure from the last progress
  }
  bool moved =
      m.InSyncSet(*p) && (p->pos.received > before.received || p->pos.durable > before.durable);
  if (p->degraded && p->pos.durable >= m.last) {
    p->degraded = false;  // caught up: back in the sync set
    moved = true;
  }
  m.Prune();
  return moved;
}

void PrimaryGroup::OnRttSample(const std::string& peer, Nanos rtt, Nanos now) {
  PeerState* p = impl_->Find(peer);
  if (p == nullptr || rtt < 0) return;
  p->rtt_samples.emplace_back(now, rtt);
  while (!p->rtt_samples.empty() && p->rtt_samples.front().first < now - kRttWindow) {
    p->rtt_samples.pop_front();
  }
  Nanos best = std::numeric_limits<Nanos>::max();
  for (const auto& s : p->rtt_samples) best = std::min(best, s.second);
  p->rtt = best;
}

bool PrimaryGroup::OnTick(Nanos now) {
  bool moved = false;
  for (auto& p : impl_->peers) {
    if (p.opt.mode != Mode::kSync || p.degraded || p.opt.sync_degrade_after <= 0) continue;
    if (p.behind_since >= 0 && now - p.behind_since >= p.opt.sync_degrade_after) {
      p.degraded = true;
      p.last_error = "left the sync set: no progress for " +
                     Str(static_cast<uint64_t>((now - p.behind_since) / 1'000'000)) + " ms";
      moved = true;
    }
  }
  return moved;
}

std::optional<SendPlan> PrimaryGroup::NextSend(const std::string& peer, Nanos now) const {
  const Impl& m = *impl_;
  const PeerState* p = m.Find(peer);
  if (p == nullptr) return std::nullopt;
  if (p->state != LinkState::kStreaming && p->state != LinkState::kCopying) return std::nullopt;
  if (p->next_lsn > m.last) return std::nullopt;
  const uint64_t inflight = m.Inflight(*p);
  const uint64_t window = m.Window(*p);
  if (inflight >= window) return std::nullopt;
  if (inflight > 0) {
    const uint64_t unsent = m.Cum(m.last) - m.Cum(p->next_lsn - 1);
    const RecordInfo* r = m.Rec(p->next_lsn);
    const bool old_enough = r == nullptr || now - r->appended_at >= p->opt.max_batch_delay;
    if (unsent < p->opt.max_batch_bytes && !old_enough) return std::nullopt;
  }
  SendPlan plan;
  plan.from_lsn = p->next_lsn;
  plan.to_lsn = m.last;
  plan.max_bytes = std::max<uint64_t>(1, std::min(window - inflight, p->opt.max_batch_bytes));
  plan.max_records = p->opt.max_batch_records;
  return plan;
}

void PrimaryGroup::OnSent(const std::string& peer, uint64_t first_lsn, uint64_t last_lsn,
                          uint64_t bytes, Nanos now) {
  (void)bytes;
  (void)now;
  PeerState* p = impl_->Find(peer);
  if (p == nullptr || first_lsn != p->next_lsn || last_lsn < first_lsn) return;
  p->next_lsn = last_lsn + 1;
}

std::optional<Nanos> PrimaryGroup::NextDeadline() const {
  const Impl& m = *impl_;
  std::optional<Nanos> best;
  for (const auto& p : m.peers) {
    if (p.state != LinkState::kStreaming && p.state != LinkState::kCopying) continue;
    if (p.next_lsn > m.last || m.Inflight(p) == 0) continue;
    if (const RecordInfo* r = m.Rec(p.next_lsn)) {
      const Nanos t = r->appended_at + p.opt.max_batch_delay;
      if (!best || t < *best) best = t;
    }
  }
  for (const auto& p : m.peers) {
    if (p.opt.mode == Mode::kSync && p.opt.sync_degrade_after > 0 && !p.degraded &&
        p.behind_since >= 0) {
      const Nanos t = p.behind_since + p.opt.sync_degrade_after;
      if (!best || t < *best) best = t;
    }
  }
  return best;
}

uint64_t PrimaryGroup::write_released() const {
  uint64_t r = impl_->last;
  for (const auto& p : impl_->peers) {
    if (impl_->InSyncSet(p)) r = std::min(r, p.pos.received);
  }
  return r;
}

uint64_t PrimaryGroup::flush_released() const {
  uint64_t r = impl_->durable;
  for (const auto& p : impl_->peers) {
    if (impl_->InSyncSet(p)) r = std::min(r, p.pos.durable);
  }
  return r;
}

uint64_t PrimaryGroup::last_lsn() const { return impl_->last; }
uint64_t PrimaryGroup::durable_lsn() const { return impl_->durable; }

uint64_t PrimaryGroup::MinPeerDurable() const {
  uint64_t r = impl_->last;
  for (const auto& p : impl_->peers) r = std::min(r, p.pos.durable);
  return r;
}

std::vector<PeerStatus> PrimaryGroup::Status(Nanos now) const {
  (void)now;
  const Impl& m = *impl_;
  std::vector<PeerStatus> out;
  for (const auto& p : m.peers) {
    PeerStatus s;
    s.peer = p.name;
    s.mode = p.opt.mode;
    s.state = p.state;
    s.positions = p.pos;
    s.in_sync_set = m.InSyncSet(p);
    s.degraded = p.degraded;
    s.next_lsn = p.next_lsn;
    s.inflight_bytes = m.Inflight(p);
    s.window_bytes = m.Window(p);
    s.rtt = p.rtt;
    s.delivery_rate = static_cast<uint64_t>(p.rate);
    if (p.pos.durable < m.last) {
      s.lag.lsns = m.last - p.pos.durable;
      s.lag.bytes = m.Cum(m.last) - m.Cum(p.pos.durable);
      if (const RecordInfo* r = m.Rec(p.pos.durable + 1))
        s.lag.oldest_timestamp_ns = r->timestamp_ns;
    }
    s.last_error = p.last_error;
    out.push_back(std::move(s));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// ReplicaReceiver

ReplicaReceiver::ReplicaReceiver(ReplicaView view) : view_(std::move(view)) {
  pos_.received = pos_.durable = view_.last_lsn;
  accepted_ = view_.last_lsn;
  log_epoch_ = view_.history.empty() ? 0 : view_.history.back().epoch;
  view_.newest_epoch = std::max(view_.newest_epoch, log_epoch_);
}

HandshakeDecision ReplicaReceiver::OnHello(const PrimaryHello& hello) {
  HandshakeDecision d = DecideHandshake(hello, view_);
  const bool raise = d.code == RefuseCode::kNone || d.code == RefuseCode::kDiverged ||
                     d.code == RefuseCode::kVolumeMismatch;
  if (raise && hello.epoch > view_.newest_epoch) view_.newest_epoch = hello.epoch;
  return d;
}

ReplicaReceiver::BatchCheck ReplicaReceiver::OnBatch(uint64_t epoch, uint64_t first_lsn,
                                                     uint32_t count) {
  BatchCheck c;
  if (epoch < view_.newest_epoch || epoch < log_epoch_) {
    c.reason = "batch from LSN " + Str(first_lsn) + " was written in epoch " + Str(epoch) +
               ", older than epoch " + Str(std::max(view_.newest_epoch, log_epoch_)) +
               " that this replica has seen";
    return c;
  }
  if (first_lsn == 0 || first_lsn > accepted_ + 1) {
    c.reason = "batch starts at LSN " + Str(first_lsn) + " but this replica's log ends at " +
               Str(accepted_) + " (a gap)";
    return c;
  }
  c.verdict = BatchCheck::Verdict::kAppend;
  c.skip_records = std::min<uint64_t>(accepted_ + 1 - first_lsn, count);
  if (c.skip_records < count) {
    if (epoch > log_epoch_) {
      c.begins_epoch = true;
      log_epoch_ = epoch;
      view_.history.push_back({epoch, first_lsn + c.skip_records});
    }
    view_.newest_epoch = std::max(view_.newest_epoch, epoch);
    accepted_ = first_lsn + count - 1;
  }
  return c;
}

void ReplicaReceiver::OnCopyBegin(uint64_t epoch, uint64_t log_start_lsn) {
  view_.copy_in_progress = true;
  view_.consistent = false;
  view_.history = {{epoch, log_start_lsn}};
  view_.last_lsn = log_start_lsn - 1;
  view_.newest_epoch = std::max(view_.newest_epoch, epoch);
  log_epoch_ = epoch;
  accepted_ = log_start_lsn - 1;
  pos_.received = std::max(pos_.received, log_start_lsn - 1);
  pos_.durable = std::max(pos_.durable, log_start_lsn - 1);
  consistent_at_ = 0;
}

void ReplicaReceiver::OnCopyDone(uint64_t consistent_at_lsn) {
  view_.copy_in_progress = false;
  consistent_at_ = std::max<uint64_t>(consistent_at_lsn, 1);
}

void ReplicaReceiver::OnAppended(uint64_t last_lsn) {
  pos_.received = std::max(pos_.received, last_lsn);
  view_.last_lsn = std::max(view_.last_lsn, last_lsn);
}
void ReplicaReceiver::OnDurable(uint64_t lsn) { pos_.durable = std::max(pos_.durable, lsn); }
void ReplicaReceiver::OnApplied(uint64_t lsn) {
  pos_.applied = std::max(pos_.applied, lsn);
  if (consistent_at_ != 0 && pos_.applied >= consistent_at_) view_.consistent = true;
}

std::optional<Positions> ReplicaReceiver::TakeAck() {
  if (acked_once_ && acked_ == pos_) return std::nullopt;
  acked_once_ = true;
  acked_ = pos_;
  return pos_;
}

uint64_t ReplicaReceiver::newest_epoch() const { return view_.newest_epoch; }
const ReplicaView& ReplicaReceiver::view() const { return view_; }
bool ReplicaReceiver::consistent() const { return !view_.copy_in_progress && view_.consistent; }

}  // namespace tvilling::core
