// replication.cc: the primary's replicator and the replica's receiver of a group.
#include "agent/node/replication.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <time.h>

#include <algorithm>
#include <future>
#include <limits>
#include <thread>

#include "agent/core/verify.h"
#include "agent/node/verify.h"
#include "agent/transport/codec.h"
#include "storage/divergent_file.h"
#include "storage/thread_name.h"

namespace tvilling::node {
namespace {

constexpr core::Nanos kMs = 1'000'000;
constexpr core::Nanos kSecond = 1'000'000'000;
constexpr core::Nanos kMinBackoff = 100 * kMs;
constexpr core::Nanos kMaxBackoff = 5 * kSecond;
constexpr core::Nanos kRefusedBackoff = 5 * kSecond;
constexpr core::Nanos kPersistPositionsEvery = kSecond;
// The longest a copy keeps the worker before its loop runs again (heartbeats, timeouts, shipping).
constexpr core::Nanos kCopyStepBudget = 20 * kMs;
// The largest zero chunk a copy sends for a hole (the replica's default copy checkpoint step).
constexpr uint64_t kMaxZeroChunkBytes = 64ull << 20;
// The committer ships batches of at most this many bytes itself (PrimaryReplicator::OnRecords).
constexpr uint64_t kInlineShipBytes = 256u << 10;
// The shipper reserves the batch buffer up front (no regrowth copies) up to this size.
constexpr uint64_t kMaxReserveBytes = 8ull << 20;
// Records kept in memory for shipping (PrimaryReplicator::ship_cache_): a few batches' worth. A
// link that falls further behind reads back from the log.
constexpr uint64_t kShipCacheBytes = 32ull << 20;

// Records of one batch share an epoch; ReadRaw stops at an epoch change with this.
const absl::Status kEpochBoundary = absl::CancelledError("epoch boundary");

uint64_t LoadLE64(const char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;  // x86-64 only (docs/ARCHITECTURE.md): little-endian in memory
}

core::History ToCore(const std::vector<storage::EpochStart>& h) {
  core::History out;
  out.reserve(h.size());
  for (const auto& e : h) out.push_back({e.epoch, e.first_lsn});
  return out;
}

absl::Status WaitLogIdle(storage::GroupLog& log) {
  std::promise<absl::Status> p;
  auto f = p.get_future();
  log.Sync([&p](absl::Status st) { p.set_value(st); });
  return f.get();
}

v1::Decision DecisionToProto(const core::HandshakeDecision& d, uint64_t epoch) {
  v1::Decision out;
  switch (d.kind) {
    case core::HandshakeDecision::Kind::kStreamFrom:
      out.set_kind(v1::Decision::STREAM_FROM);
      break;
    case core::HandshakeDecision::Kind::kFullCopy:
      out.set_kind(v1::Decision::FULL_COPY);
      break;
    case core::HandshakeDecision::Kind::kRefuse:
    case core::HandshakeDecision::Kind::kRejoin:  // never sent: decided again after the cut
      out.set_kind(v1::Decision::REFUSE);
      break;
    case core::HandshakeDecision::Kind::kRestore:
      out.set_kind(v1::Decision::RESTORE);
      break;
  }
  for (const core::Extent& e : d.extents) {
    v1::Extent* x = out.add_restore_extents();
    x->set_volume(e.volume);
    x->set_offset(e.offset);
    x->set_length(e.length);
  }
  out.set_fork_lsn(d.fork_lsn);
  out.set_start_lsn(d.start_lsn);
  out.set_epoch(epoch);
  out.set_reason(d.reason);
  out.set_copy_resume(d.copy_resume);
  out.set_copy_volume(d.copy_volume);
  out.set_copy_offset(d.copy_offset);
  out.set_code(static_cast<v1::RefuseCode>(d.code));
  return out;
}

core::HandshakeDecision DecisionFromProto(const v1::Decision& d) {
  core::HandshakeDecision out;
  switch (d.kind()) {
    case v1::Decision::STREAM_FROM:
      out.kind = core::HandshakeDecision::Kind::kStreamFrom;
      break;
    case v1::Decision::FULL_COPY:
      out.kind = core::HandshakeDecision::Kind::kFullCopy;
      break;
    case v1::Decision::RESTORE:
      out.kind = core::HandshakeDecision::Kind::kRestore;
      break;
    default:
      out.kind = core::HandshakeDecision::Kind::kRefuse;
      break;
  }
  out.start_lsn = d.start_lsn();
  out.copy_resume = d.copy_resume();
  out.copy_volume = d.copy_volume();
  out.copy_offset = d.copy_offset();
  out.code = static_cast<core::RefuseCode>(d.code());
  out.reason = d.reason();
  out.fork_lsn = d.fork_lsn();
  for (const v1::Extent& e : d.restore_extents()) {
    out.extents.push_back({e.volume(), e.offset(), e.length()});
  }
  return out;
}

}  // namespace

core::Nanos MonotonicNow() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<core::Nanos>(ts.tv_sec) * kSecond + ts.tv_nsec;
}

// ---------------------------------------------------------------------------------------------
// Primary

struct PrimaryReplicator::Link {
  PeerOptions opt;
  std::shared_ptr<PrimaryStream> stream;
  uint64_t generation = 0;  // bumped on every dial; callbacks of older streams are ignored
  core::Nanos redial_at = 0;
  core::Nanos backoff = kMinBackoff;
  core::Nanos last_heard = 0;
  core::Nanos last_heartbeat = 0;
  core::Nanos last_echo = 0;  // send time of the newest heartbeat the peer echoed
  core::Nanos rate_wait_until = 0;
  // A thread is in Ship() for this link (the worker, or the committer's fast path): Ship() reads
  // and sends outside mu_, so only one may run per link or batches could go out of order.
  bool shipping = false;
  // A batch went out without durable_requested since the last sync request on this stream: a
  // FLUSH/FUA that begins to wait must ask the peer to fsync it (AskPeersToSyncLocked).
  bool lazy_since_ask = false;
  // Token bucket for rate_limit_bytes_per_s: full at the start, at most 100 ms of the rate (or
  // 64 KiB). A message is sent whenever the bucket is not in debt, and what it costs beyond the
  // tokens is waited off afterwards (rate_wait_until), so a batch larger than the bucket still
  // goes out, and over time the link carries no more than the rate.
  double tokens = 0;  // filled at the first charge
  core::Nanos tokens_at = 0;

  void ChargeRate(uint64_t bytes, core::Nanos now) {
    if (opt.rate_limit_bytes_per_s == 0) return;
    const double rate = static_cast<double>(opt.rate_limit_bytes_per_s);
    const double burst = std::max(rate / 10, 64.0 * 1024);
    if (tokens_at == 0) {
      tokens = burst;
    } else {
      tokens = std::min(burst, tokens + rate * static_cast<double>(now - tokens_at) /
                                            static_cast<double>(kSecond));
    }
    tokens_at = now;
    tokens -= static_cast<double>(bytes);
    if (tokens < 0) {
      rate_wait_until =
          now + static_cast<core::Nanos>(-tokens / rate * static_cast<double>(kSecond));
    }
  }
  // Full copy.
  bool copying = false;
  uint32_t copy_volume = 0;
  uint64_t copy_offset = 0;  // a restore: the offset within restore_extents[restore_index]
  // A restore (Decision RESTORE) copies only these extents, sorted and disjoint.
  bool restore = false;
  std::vector<core::Extent> restore_extents;
  size_t restore_index = 0;
  // A restore's chunks must show the volumes at an LSN the replica replays from: at least the
  // LSN before the decision's start (the replica's log end). The applier may lag the log.
  uint64_t restore_min_applied = 0;
  uint64_t copy_total = 0;
  uint64_t copy_done = 0;
  core::Nanos copy_started_at = 0;  // for the rate and ETA in the status
  uint64_t copy_done_at_start = 0;  // a resumed copy starts part-way
  std::string last_error;
  // Counters since the replicator started (metrics: tvilling_peer_sent_*_total, ...).
  uint64_t sent_batches = 0;
  uint64_t sent_records = 0;
  uint64_t sent_log_bytes = 0;          // records as they are in the log (before compression)
  uint64_t sent_wire_bytes = 0;         // batch messages as serialised (after compression)
  uint64_t sent_copy_bytes = 0;         // full-copy messages as serialised
  uint64_t sent_records_read_back = 0;  // records read back from the log to be sent
  uint64_t shipped_through = 0;         // last LSN sent on the current stream (0: none)
  uint64_t dials = 0;
  uint64_t disconnects = 0;
};

PrimaryReplicator::PrimaryReplicator(GroupRuntime* group, PrimaryOptions options, Dialer* dialer)
    : group_(group), log_(&group->log()), options_(std::move(options)), dialer_(dialer) {}

absl::StatusOr<std::shared_ptr<PrimaryReplicator>> PrimaryReplicator::Start(GroupRuntime* group,
                                                                            PrimaryOptions options,
                                                                            Dialer* dialer) {
  auto r =
      std::shared_ptr<PrimaryReplicator>(new PrimaryReplicator(group, std::move(options), dialer));
  storage::GroupLog& log = *r->log_;

  // The epoch: keep the one this agent began as primary, unless another was seen since.
  storage::ReplicaMeta meta = log.replica_meta();
  const storage::GroupLogState state = log.State();
  // Every start as primary begins a new epoch: records are shipped before they are fsynced, so
  // after a machine crash a replica may hold records this log lost; writing different records at
  // those LSNs in the same epoch would be undetectable (docs/replication.md, "Roles and epochs").
  const uint64_t newest = std::max({meta.newest_epoch_seen, state.current_epoch, meta.primary_epoch,
                                    state.history.empty() ? 0 : state.history.back().epoch});
  uint64_t epoch = newest + 1;
  if (r->options_.epoch != 0) {
    if (r->options_.epoch <= newest) {
      return absl::FailedPreconditionError(fmt::format(
          "group {}: refusing to become primary in epoch {} (the etcd leader key's create "
          "revision): this log has already seen epoch {}; a primary's epoch must be greater than "
          "every epoch in the log's history (is the coordinator.prefix shared with another "
          "cluster, or was etcd's data reset?)",
          log.name(), r->options_.epoch, newest));
    }
    epoch = r->options_.epoch;
  }
  spdlog::info("group {}: this site is primary; beginning epoch {}", log.name(), epoch);
  meta.primary_epoch = epoch;
  meta.newest_epoch_seen = std::max(meta.newest_epoch_seen, epoch);
  // A primary's volumes are the log applied: consistent by definition.
  meta.consistent = true;
  meta.copy_in_progress = false;
  if (absl::Status st = log.SetReplicaMeta(meta); !st.ok()) return st;
  if (state.current_epoch < epoch) {
    if (absl::Status st = log.BeginEpoch(epoch); !st.ok()) return st;
  }
  r->epoch_ = epoch;

  const core::Nanos now = MonotonicNow();
  std::map<std::string, storage::PeerPosition> persisted;
  for (const auto& p : state.peers) persisted[p.peer] = p;
  for (const PeerOptions& p : r->options_.peers) {
    core::Positions initial;
    if (auto it = persisted.find(p.site); it != persisted.end()) {
      initial = {it->second.received_lsn, it->second.durable_lsn, it->second.applied_lsn};
    } else {
      // Register the peer so retention keeps what it will need.
      storage::PeerPosition pos;
      pos.peer = p.site;
      if (absl::Status st = log.SetPeerPosition(pos); !st.ok()) return st;
    }
    r->core_.AddPeer(p.site, p.sender, initial, now);
    if (p.sender.mode == core::Mode::kSync) r->has_sync_peer_ = true;
    auto link = std::make_unique<Link>();
    link->opt = p;
    r->links_.push_back(std::move(link));
  }
  // The local log as it is now: sizes and times only, the headers without external payloads.
  // The checkpointer goes on truncating meanwhile (a replica being promoted checkpoints what it
  // applied last), so a read that finds its first records truncated reads again from the log's
  // new first LSN: the core ignores the records it has seen and forgets the truncated ones.
  storage::GroupLogState now_state = state;
  bool truncated_meanwhile = false;
  for (int attempt = 1; now_state.last_lsn >= now_state.first_lsn; ++attempt) {
    absl::Status st = log.ReadHeaders(
        now_state.first_lsn, now_state.last_lsn, [&](uint64_t lsn, const storage::RecordHeader& h) {
          r->core_.OnLocalAppend(lsn, storage::kRecordHeaderSize + h.payload_size, h.timestamp_ns,
                                 now);
          return absl::OkStatus();
        });
    if (st.ok()) break;
    if (!absl::IsOutOfRange(st) || attempt == 5) return st;
    spdlog::debug("group {}: {}; reading the log's headers again", log.name(),
                  std::string(st.message()));
    truncated_meanwhile = true;
    now_state = log.State();
  }
  if (now_state.last_lsn > 0 && (truncated_meanwhile || now_state.last_lsn < now_state.first_lsn)) {
    r->core_.OnLocalTruncate(now_state.first_lsn);
  }
  r->core_.OnLocalDurable(log.durable_lsn());
  r->core_.OnLocalApplied(group->applied_lsn());
  // Before any client write of this epoch: none completes until the first set is in etcd.
  if (r->options_.publish_sync_set) r->core_.GateOnPublishedSyncSet();

  std::weak_ptr<PrimaryReplicator> weak = r;
  group->SetRecordsObserver(
      [weak](GroupRuntime::RecordsPhase phase, std::span<const storage::LogRecordView> records) {
        if (auto self = weak.lock()) self->OnRecords(phase, records);
      });
  if (r->has_sync_peer_) group->SetCompletionGate(r);
  r->worker_ = std::thread([raw = r.get()] {
    storage::SetThreadName("tvl-ship");
    raw->WorkerLoop();
  });
  return r;
}

PrimaryReplicator::~PrimaryReplicator() { Stop(); }

void PrimaryReplicator::Stop() {
  std::vector<std::shared_ptr<PrimaryStream>> streams;
  std::vector<nbd::Export::Done> waiting;
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    for (auto& l : links_) {
      if (l->stream) streams.push_back(std::move(l->stream));
      ++l->generation;
    }
    for (auto& [lsn, done] : write_waiters_) waiting.push_back(std::move(done));
    for (auto& [lsn, done] : flush_waiters_) waiting.push_back(std::move(done));
    write_waiters_.clear();
    flush_waiters_.clear();
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
  for (auto& s : streams) s->Close(absl::CancelledError("agent stopping"));
  for (auto& [s, reason] : pending_close_) s->Close(absl::CancelledError("agent stopping"));
  pending_close_.clear();
  for (auto& d : waiting) {
    std::move(d)(absl::UnavailableError("agent stopping before the sync peers confirmed"));
  }
}

void PrimaryReplicator::OnRecords(GroupRuntime::RecordsPhase phase,
                                  std::span<const storage::LogRecordView> records) {
  if (phase == GroupRuntime::RecordsPhase::kApplied) {
    // A full copy's base is at least this: the volumes hold the batch now.
    std::lock_guard lock(mu_);
    if (!records.empty()) core_.OnLocalApplied(records.back().lsn);
    return;
  }
  // Written to the log, not yet applied: shipped first, so that the peers' round trip overlaps
  // this thread's apply (a sync WRITE waits for both).
  const core::Nanos now = MonotonicNow();
  uint64_t bytes = 0;
  {
    std::lock_guard lock(mu_);
    for (const auto& r : records) {
      const uint64_t stored = storage::kRecordHeaderSize + r.payload.size();
      core_.OnLocalAppend(r.lsn, stored, r.header.timestamp_ns, now);
      bytes += stored;
    }
    CacheRecordsLocked(records);
  }
  // A small batch is shipped right here on the committer thread, before its WRITEs wait for the
  // sync peers: at low queue depth the hand-off to the worker was a large part of a sync write's
  // latency. Large batches (throughput) go to the worker so the committer keeps writing.
  const bool inline_ship = bytes <= kInlineShipBytes;
  if (inline_ship) {
    for (auto& link : links_) Ship(*link, now, records);
  }
  {
    std::lock_guard lock(mu_);
    if (inline_ship && !WorkerHasWorkLocked(now)) return;
    work_ = true;
  }
  cv_.notify_one();
}

void PrimaryReplicator::CacheRecordsLocked(std::span<const storage::LogRecordView> records) {
  for (const storage::LogRecordView& r : records) {
    const bool keepable = (r.payload.empty() || r.payload_owner != nullptr) &&
                          r.header_bytes.size() == storage::kRecordHeaderSize;
    // What is kept stays contiguous: a record that cannot be kept, or does not follow, ends it.
    if (!keepable || (!ship_cache_.empty() && r.lsn != ship_cache_.back().lsn + 1)) {
      ship_cache_.clear();
      ship_cache_bytes_ = 0;
    }
    if (!keepable) return;  // the next batch starts anew
    CachedRecord& c = ship_cache_.emplace_back();
    c.lsn = r.lsn;
    c.epoch = r.header.epoch;
    std::copy(r.header_bytes.begin(), r.header_bytes.end(), c.header.begin());
    c.payload = r.payload;
    c.owner = r.payload_owner;
    ship_cache_bytes_ += storage::StoredSize(r);
  }
  TrimShipCacheLocked();
}

void PrimaryReplicator::TrimShipCacheLocked() {
  // What every connected link has sent goes, and whatever is beyond the cap. With no link
  // connected nothing is kept: a link that connects resends from its durable LSN, reading back.
  uint64_t sent_by_all = UINT64_MAX;
  for (const auto& link : links_) {
    if (link->stream) sent_by_all = std::min(sent_by_all, link->shipped_through);
  }
  while (!ship_cache_.empty() &&
         (ship_cache_.front().lsn <= sent_by_all || ship_cache_bytes_ > kShipCacheBytes)) {
    ship_cache_bytes_ -= storage::kRecordHeaderSize + ship_cache_.front().payload.size();
    ship_cache_.pop_front();
  }
}

bool PrimaryReplicator::WorkerHasWorkLocked(core::Nanos now) const {
  for (const auto& link : links_) {
    if (!link->stream) continue;  // the worker's redial timer covers it
    if (link->copying || link->shipping) return true;
    if (core_.NextSend(link->opt.site, now)) return true;
    if (core_.RttProbeReady(link->opt.site)) return true;
  }
  return core_.NextDeadline().has_value();
}

void PrimaryReplicator::WriteInLog(uint64_t lsn, bool durable, nbd::Export::Done done) {
  std::unique_lock lock(mu_);
  if (stopping_) {
    lock.unlock();
    return std::move(done)(absl::UnavailableError("agent stopping"));
  }
  if (durable) core_.OnLocalDurable(lsn);
  const uint64_t wr = core_.write_released();
  const uint64_t fr = core_.flush_released();
  if (lsn <= wr && (!durable || lsn <= fr)) {
    lock.unlock();
    return std::move(done)(absl::OkStatus());
  }
  if (durable) {
    flush_waiters_.emplace(lsn, std::move(done));
    AskPeersToSyncLocked();
  } else {
    write_waiters_.emplace(lsn, std::move(done));
  }
}

void PrimaryReplicator::AskPeersToSyncLocked() {
  for (auto& l : links_) {
    if (!l->stream || !l->lazy_since_ask) continue;
    l->lazy_since_ask = false;
    // After the lazy batches on the same stream: the replica fsyncs everything it holds then.
    // No send time: it is not an RTT probe and needs no echo.
    v1::ToReplica hb;
    hb.mutable_heartbeat()->set_epoch(epoch_);
    hb.mutable_heartbeat()->set_sync_requested(true);
    l->stream->Send(std::move(hb));
  }
}

void PrimaryReplicator::FlushedLocally(uint64_t lsn, nbd::Export::Done done) {
  std::unique_lock lock(mu_);
  if (stopping_) {
    lock.unlock();
    return std::move(done)(absl::UnavailableError("agent stopping"));
  }
  core_.OnLocalDurable(std::max(lsn, log_->durable_lsn()));
  if (lsn <= std::min(core_.flush_released(), core_.write_released())) {
    lock.unlock();
    return std::move(done)(absl::OkStatus());
  }
  flush_waiters_.emplace(lsn, std::move(done));
  AskPeersToSyncLocked();
}

void PrimaryReplicator::ReleaseLocked(std::unique_lock<std::mutex>& lock) {
  const uint64_t wr = core_.write_released();
  const uint64_t fr = std::min(core_.flush_released(), wr);
  std::vector<nbd::Export::Done> ready;
  while (!write_waiters_.empty() && write_waiters_.begin()->first <= wr) {
    ready.push_back(std::move(write_waiters_.begin()->second));
    write_waiters_.erase(write_waiters_.begin());
  }
  while (!flush_waiters_.empty() && flush_waiters_.begin()->first <= fr) {
    ready.push_back(std::move(flush_waiters_.begin()->second));
    flush_waiters_.erase(flush_waiters_.begin());
  }
  if (ready.empty()) return;
  lock.unlock();
  for (auto& d : ready) std::move(d)(absl::OkStatus());
  lock.lock();
}

void PrimaryReplicator::Dial(Link& link, core::Nanos now) {
  // REQUIRES: mu_ held by the caller (the worker), released around the dial itself.
  const uint64_t gen = ++link.generation;
  link.shipped_through = 0;  // the new stream resends from the peer's position
  ++link.dials;
  Dialer::Callbacks cb;
  std::weak_ptr<PrimaryReplicator> weak = weak_from_this();
  Link* lp = &link;
  cb.on_message = [weak, lp, gen](v1::FromReplica msg) {
    if (auto self = weak.lock()) self->OnMessage(*lp, gen, std::move(msg));
  };
  cb.on_closed = [weak, lp, gen](absl::Status st) {
    if (auto self = weak.lock()) self->OnClosed(*lp, gen, st);
  };
  std::shared_ptr<PrimaryStream> stream = dialer_->Dial(link.opt.site, std::move(cb));
  link.stream = stream;
  link.last_heard = now;
  link.last_heartbeat = now;
  link.copying = false;
  core_.OnConnected(link.opt.site, now);

  const storage::GroupLogState state = log_->State();
  v1::ToReplica msg;
  v1::Hello* h = msg.mutable_hello();
  h->set_protocol_version(1);
  h->set_group(log_->name());
  h->set_sender_site(options_.site);
  h->set_sender_group_id(log_->group_id());
  h->set_epoch(epoch_);
  for (const auto& e : state.history) {
    auto* pe = h->add_history();
    pe->set_epoch(e.epoch);
    pe->set_first_lsn(e.first_lsn);
  }
  if (state.history.empty() || state.history.back().epoch < epoch_) {
    // This epoch has no record yet: its first record will be the next one appended.
    auto* pe = h->add_history();
    pe->set_epoch(epoch_);
    pe->set_first_lsn(state.last_lsn + 1);
  }
  for (size_t i = 0; i < group_->volume_count(); ++i) {
    auto* v = h->add_volumes();
    v->set_name(std::to_string(i));
    v->set_size_bytes(group_->volume(i).size());
  }
  h->set_first_lsn(state.first_lsn);
  h->set_last_lsn(state.last_lsn);
  h->set_mode(link.opt.sender.mode == core::Mode::kSync ? v1::MODE_SYNC : v1::MODE_ASYNC);
  stream->Send(std::move(msg));
}

void PrimaryReplicator::Disconnect(Link& link, const std::string& reason, core::Nanos now) {
  // Closed by the worker outside mu_: the transport runs on_closed inside Close, and that
  // callback takes mu_.
  if (link.stream) pending_close_.push_back({std::move(link.stream), reason});
  ++link.disconnects;
  ++link.generation;
  link.copying = false;
  link.last_error = reason;
  core_.OnDisconnected(link.opt.site, reason, now);
  link.redial_at = now + link.backoff;
  link.backoff = std::min(link.backoff * 2, kMaxBackoff);
  work_ = true;
}

void PrimaryReplicator::OnClosed(Link& link, uint64_t generation, const absl::Status& status) {
  std::unique_lock lock(mu_);
  if (generation != link.generation || stopping_) return;
  const std::string reason = status.ok() ? "stream closed by the peer"
                                         : fmt::format("stream to {} ended: {}", link.opt.site,
                                                       std::string(status.message()));
  spdlog::warn("group {}: {}", log_->name(), reason);
  link.stream.reset();  // already closed
  Disconnect(link, reason, MonotonicNow());
  cv_.notify_one();
}

void PrimaryReplicator::OnMessage(Link& link, uint64_t generation, v1::FromReplica msg) {
  std::unique_lock lock(mu_);
  if (generation != link.generation || stopping_) return;
  const core::Nanos now = MonotonicNow();
  link.last_heard = now;
  switch (msg.msg_case()) {
    case v1::FromReplica::kDecision: {
      const core::HandshakeDecision d = DecisionFromProto(msg.decision());
      if (d.kind == core::HandshakeDecision::Kind::kRefuse) {
        spdlog::error("group {}: peer {} refused the stream: {}", log_->name(), link.opt.site,
                      d.reason);
        core_.OnDecision(link.opt.site, d, 0, now);
        Disconnect(link, fmt::format("refused by {}: {}", link.opt.site, d.reason), now);
        link.redial_at = now + kRefusedBackoff;
        break;
      }
      link.backoff = kMinBackoff;
      link.restore = false;
      if (d.kind == core::HandshakeDecision::Kind::kRestore) {
        const uint64_t base = d.start_lsn == 0 ? 0 : d.start_lsn - 1;
        if (base > log_->last_lsn()) {
          Disconnect(link,
                     fmt::format("{} asked for a restore with its log at LSN {}, beyond this "
                                 "log's last LSN {}",
                                 link.opt.site, base, log_->last_lsn()),
                     now);
          break;
        }
        core_.OnDecision(link.opt.site, d, base, now);
        link.copying = true;
        link.restore = true;
        link.restore_extents = d.extents;
        link.restore_index = 0;
        link.restore_min_applied = base;
        link.copy_volume = 0;
        link.copy_offset = 0;
        link.copy_total = 0;
        for (const core::Extent& e : d.extents) link.copy_total += e.length;
        link.copy_done = 0;
        link.copy_started_at = now;
        link.copy_done_at_start = 0;
        spdlog::info("group {}: restoring {} extent(s) ({} bytes) to {} ({}), log from LSN {}",
                     log_->name(), d.extents.size(), link.copy_total, link.opt.site, d.reason,
                     d.start_lsn);
        storage::PeerPosition pos;
        pos.peer = link.opt.site;
        pos.durable_lsn = base;
        (void)log_->SetPeerPosition(pos);
      } else if (d.kind == core::HandshakeDecision::Kind::kFullCopy) {
        const uint64_t base = d.copy_resume ? d.start_lsn - 1 : group_->applied_lsn();
        core_.OnDecision(link.opt.site, d, base, now);
        link.copying = true;
        link.copy_volume = d.copy_resume ? d.copy_volume : 0;
        link.copy_offset = d.copy_resume ? d.copy_offset : 0;
        link.copy_total = 0;
        for (size_t i = 0; i < group_->volume_count(); ++i) {
          link.copy_total += group_->volume(i).size();
        }
        link.copy_done = 0;
        for (uint32_t i = 0; i < link.copy_volume && i < group_->volume_count(); ++i) {
          link.copy_done += group_->volume(i).size();
        }
        link.copy_done += link.copy_offset;
        link.copy_started_at = now;
        link.copy_done_at_start = link.copy_done;
        spdlog::info("group {}: full copy to {} ({}): {} from volume {} offset {}, log from LSN {}",
                     log_->name(), link.opt.site, d.reason, d.copy_resume ? "resuming" : "starting",
                     link.copy_volume, link.copy_offset, base + 1);
        // Keep every record after `base` until the peer has it.
        storage::PeerPosition pos;
        pos.peer = link.opt.site;
        pos.durable_lsn = base;
        (void)log_->SetPeerPosition(pos);
        if (!d.copy_resume) {
          v1::ToReplica out;
          v1::CopyBegin* cb = out.mutable_copy_begin();
          cb->set_epoch(epoch_);
          cb->set_log_start_lsn(base + 1);
          link.stream->Send(std::move(out));
        }
      } else {
        core_.OnDecision(link.opt.site, d, 0, now);
        spdlog::info("group {}: streaming to {} from LSN {}", log_->name(), link.opt.site,
                     d.start_lsn);
      }
      break;
    }
    case v1::FromReplica::kPosition: {
      const v1::Position& p = msg.position();
      core::Positions pos{p.received_lsn(), p.durable_lsn(), p.applied_lsn()};
      pos.copying = p.copy_in_progress();
      if (core_.OnPosition(link.opt.site, pos, now)) {
        ReleaseLocked(lock);
      }
      break;
    }
    case v1::FromReplica::kHeartbeat: {
      const uint64_t echo = msg.heartbeat().echo_unix_ns();
      if (echo != 0 && static_cast<core::Nanos>(echo) <= now) {
        core_.OnRttSample(link.opt.site, now - static_cast<core::Nanos>(echo), now);
        link.last_echo = std::max(link.last_echo, static_cast<core::Nanos>(echo));
      }
      break;
    }
    default:
      Disconnect(link, fmt::format("peer {} sent an unexpected message", link.opt.site), now);
      break;
  }
  // A position or heartbeat (most messages) wakes the worker only if it opened the window for
  // something or a timer is due; a decision or a disconnect always does.
  const bool routine =
      msg.msg_case() == v1::FromReplica::kPosition || msg.msg_case() == v1::FromReplica::kHeartbeat;
  if (routine && generation == link.generation && !WorkerHasWorkLocked(now)) return;
  work_ = true;
  cv_.notify_one();
}

void PrimaryReplicator::Ship(Link& link, core::Nanos now,
                             std::span<const storage::LogRecordView> fresh) {
  std::unique_lock lock(mu_);
  if (link.shipping) return;  // the other thread sends what is due (work_ brings the worker back)
  link.shipping = true;
  ShipLocked(link, now, lock, fresh);
  link.shipping = false;
}

void PrimaryReplicator::ShipLocked(Link& link, core::Nanos now, std::unique_lock<std::mutex>& lock,
                                   std::span<const storage::LogRecordView> fresh) {
  while (!stopping_ && link.stream) {
    std::optional<core::SendPlan> plan = core_.NextSend(link.opt.site, now);
    if (!plan) return;
    std::shared_ptr<PrimaryStream> stream = link.stream;
    if (stream->queued_bytes() >= options_.max_queued_bytes) return;
    if (link.rate_wait_until > now) return;
    const uint64_t gen = link.generation;
    const bool from_fresh = !fresh.empty() && plan->from_lsn == fresh.front().lsn &&
                            fresh.front().header_bytes.size() == storage::kRecordHeaderSize;
    // Otherwise from the records kept in memory, if they start the batch: the references are
    // taken here, under mu_, and the batch is built from them after it is released. The limits
    // are ReadRaw's (at least one record, then max_records / max_bytes / to_lsn / an epoch change).
    std::vector<CachedRecord> kept;
    if (!from_fresh && !ship_cache_.empty() && plan->from_lsn >= ship_cache_.front().lsn &&
        plan->from_lsn <= ship_cache_.back().lsn) {
      uint64_t kept_bytes = 0;
      for (size_t i = plan->from_lsn - ship_cache_.front().lsn; i < ship_cache_.size(); ++i) {
        const CachedRecord& c = ship_cache_[i];
        const uint64_t stored = storage::kRecordHeaderSize + c.payload.size();
        if (c.lsn > plan->to_lsn || kept.size() == plan->max_records ||
            (!kept.empty() &&
             (kept_bytes + stored > plan->max_bytes || c.epoch != kept.front().epoch))) {
          break;
        }
        kept.push_back(c);
        kept_bytes += stored;
      }
    }
    lock.unlock();

    std::string buf;
    buf.reserve(std::min<uint64_t>(plan->max_bytes, kMaxReserveBytes));
    uint64_t first = 0, last = 0, batch_epoch = 0, bytes = 0;
    uint32_t count = 0;
    // Appends one stored value (header + payload) to the batch, or says where the batch ends.
    auto add = [&](uint64_t lsn, uint64_t epoch, std::string_view header,
                   std::string_view payload) -> absl::Status {
      if (count == 0) {
        batch_epoch = epoch;
        first = lsn;
      } else if (epoch != batch_epoch) {
        return kEpochBoundary;
      }
      buf.append(header);
      buf.append(payload);
      last = lsn;
      ++count;
      return absl::OkStatus();
    };
    absl::Status st;
    bool read_back = false;
    if (from_fresh) {
      // The batch the committer just wrote, still in memory: no read back from the log (a
      // RocksDB iterator and a checksum per record, for every small batch). Same limits as
      // ReadRaw: at least one record, then max_records / max_bytes / to_lsn / an epoch change.
      for (const storage::LogRecordView& r : fresh) {
        const uint64_t stored = storage::StoredSize(r);
        if (r.lsn > plan->to_lsn || count == plan->max_records ||
            (count > 0 && buf.size() + stored > plan->max_bytes)) {
          break;
        }
        if (add(r.lsn, r.header.epoch, r.header_bytes, r.payload) == kEpochBoundary) break;
      }
    } else if (!kept.empty()) {
      for (const CachedRecord& c : kept) {
        (void)add(c.lsn, c.epoch, std::string_view(c.header.data(), c.header.size()), c.payload);
      }
      kept.clear();  // the buffers may go as soon as the batch holds the bytes
    } else {
      read_back = true;
      st = log_->ReadRaw(plan->from_lsn, plan->to_lsn, plan->max_bytes, plan->max_records,
                         [&](uint64_t lsn, std::string_view value) -> absl::Status {
                           return add(lsn, LoadLE64(value.data() + 8),
                                      value.substr(0, storage::kRecordHeaderSize),
                                      value.substr(storage::kRecordHeaderSize));
                         });
      if (st == kEpochBoundary) st = absl::OkStatus();
    }
    fresh = {};  // what follows (a batch cut by a limit, or more due) is read from the log
    bytes = buf.size();
    v1::ToReplica msg;
    if (st.ok() && count > 0) {
      st = transport::EncodeBatch(batch_epoch, first, count, std::move(buf), link.opt.codec,
                                  /*durable_requested=*/true, msg.mutable_batch());
    }
    lock.lock();
    if (gen != link.generation) return;
    if (!st.ok()) {
      spdlog::error("group {}: cannot ship to {}: {}", log_->name(), link.opt.site,
                    std::string(st.message()));
      Disconnect(
          link, fmt::format("reading the log for {}: {}", link.opt.site, std::string(st.message())),
          now);
      return;
    }
    if (count == 0) return;
    // A sync peer's batch that no FLUSH/FUA waits on may be fsynced lazily by the replica (its
    // replica_sync_interval_ms): a sync WRITE waits only for `received`. An async peer's durable
    // position is its lag, so its batches are always fsynced at once. Decided under mu_, where a
    // FLUSH registers, so a FLUSH either sees this batch as lazy (and asks) or the batch sees it.
    if (link.opt.sender.mode == core::Mode::kSync && flush_waiters_.empty()) {
      msg.mutable_batch()->set_durable_requested(false);
      link.lazy_since_ask = true;
    }
    const uint64_t msg_bytes = msg.ByteSizeLong();
    stream->Send(std::move(msg));
    core_.OnSent(link.opt.site, first, last, bytes, now);
    link.ChargeRate(msg_bytes, now);
    ++link.sent_batches;
    link.sent_records += count;
    if (read_back) link.sent_records_read_back += count;
    link.shipped_through = last;
    TrimShipCacheLocked();
    link.sent_log_bytes += bytes;
    link.sent_wire_bytes += msg_bytes;
  }
}

void PrimaryReplicator::CopyStep(Link& link, core::Nanos now) {
  std::unique_lock lock(mu_);
  const core::Nanos step_start = MonotonicNow();
  while (!stopping_ && link.stream && link.copying) {
    std::shared_ptr<PrimaryStream> stream = link.stream;
    if (stream->queued_bytes() >= options_.max_queued_bytes) return;
    if (link.rate_wait_until > now) return;  // the copy shares the link's rate_limit
    if (MonotonicNow() - step_start >= kCopyStepBudget) {
      // Back to the worker loop, which comes straight back here: a sparse volume's chunks are
      // tiny messages that never fill the queue, and a copy that kept this thread would send no
      // heartbeat, so the link's own timeout would cut it once the copy ends.
      work_ = true;
      return;
    }
    const uint64_t gen = link.generation;
    uint32_t vi = link.copy_volume;
    uint64_t off = link.copy_offset;
    uint64_t max_len = std::numeric_limits<uint64_t>::max();
    bool all_read = vi >= group_->volume_count();
    if (link.restore) {
      if (group_->applied_lsn() < link.restore_min_applied) return;  // the worker comes back
      all_read = link.restore_index >= link.restore_extents.size();
      if (!all_read) {
        const core::Extent& e = link.restore_extents[link.restore_index];
        vi = e.volume;
        off = e.offset + link.copy_offset;
        max_len = e.length - link.copy_offset;
        if (vi >= group_->volume_count() || e.offset > group_->volume(vi).size() ||
            e.length > group_->volume(vi).size() - e.offset || e.length == 0) {
          Disconnect(link,
                     fmt::format("{} asked to restore volume {} {}+{}, outside the group's "
                                 "volumes",
                                 link.opt.site, e.volume, e.offset, e.length),
                     now);
          return;
        }
      }
    }
    lock.unlock();

    v1::ToReplica msg;
    absl::Status st;
    bool finished = false;
    uint64_t len = 0;
    uint64_t done_lsn = 0;
    if (all_read) {
      // Every chunk is read: the copy equals the volumes as of some LSN <= last_lsn now.
      v1::CopyDone* d = msg.mutable_copy_done();
      d->set_epoch(epoch_);
      done_lsn = log_->last_lsn();
      d->set_lsn(done_lsn);
      finished = true;
    } else {
      storage::Volume& v = group_->volume(vi);
      // A hole of a sparse volume goes as one zero chunk of up to kMaxZeroChunkBytes, unread
      // (reading it would fill the page cache with zeroed pages): a thin volume copies in about
      // the time its data takes. Data is read in chunks of copy_chunk_bytes, up to the next hole.
      const uint64_t hole =
          v.HoleBytesAt(off, std::min<uint64_t>({kMaxZeroChunkBytes, v.size() - off, max_len}));
      len = hole > 0 ? hole
                     : std::min<uint64_t>({options_.copy_chunk_bytes, v.size() - off, max_len});
      v1::CopyChunk* c = msg.mutable_copy_chunk();
      c->set_epoch(epoch_);
      c->set_volume(vi);
      c->set_offset(off);
      c->set_length(static_cast<uint32_t>(len));
      std::string data;
      if (hole == 0) {
        data.resize(len);
        st = v.Read(off, std::span<char>(data.data(), data.size()));
      }
      if (hole > 0 || storage::Volume::IsAllZero(data)) {
        c->set_zero(true);
      } else {
        c->set_checksum(storage::PayloadHash(data));
        c->set_codec(v1::CODEC_NONE);
        c->set_data(std::move(data));
      }
    }
    lock.lock();
    if (gen != link.generation || !link.copying) return;
    if (!st.ok()) {
      Disconnect(link,
                 fmt::format("reading volume {} at {} for the copy to {}: {}", vi, off,
                             link.opt.site, std::string(st.message())),
                 now);
      return;
    }
    const uint64_t msg_bytes = msg.ByteSizeLong();
    stream->Send(std::move(msg));
    link.ChargeRate(msg_bytes, now);
    link.sent_copy_bytes += msg_bytes;
    if (finished) {
      link.copying = false;
      core_.OnCopyDone(link.opt.site, done_lsn, now);
      spdlog::info("group {}: full copy to {} sent ({} bytes)", log_->name(), link.opt.site,
                   link.copy_total);
      return;
    }
    link.copy_offset += len;
    link.copy_done += len;
    if (link.restore) {
      if (link.copy_offset >= link.restore_extents[link.restore_index].length) {
        ++link.restore_index;
        link.copy_offset = 0;
      }
    } else if (link.copy_offset >= group_->volume(vi).size()) {
      ++link.copy_volume;
      link.copy_offset = 0;
    }
  }
}

std::optional<uint64_t> PrimaryReplicator::SetRateLimit(const std::string& peer_site,
                                                        uint64_t bytes_per_s) {
  std::lock_guard lock(mu_);
  for (auto& l : links_) {
    if (l->opt.site != peer_site) continue;
    const uint64_t was = l->opt.rate_limit_bytes_per_s;
    if (was != bytes_per_s) {
      l->opt.rate_limit_bytes_per_s = bytes_per_s;
      // Start the bucket afresh at the new rate; a wait for a debt at the old rate ends now.
      l->tokens_at = 0;
      l->rate_wait_until = 0;
      work_ = true;
      cv_.notify_one();
    }
    return was;
  }
  return std::nullopt;
}

void PrimaryReplicator::HeartbeatNow() {
  std::lock_guard lock(mu_);
  for (auto& l : links_) l->last_heartbeat = 0;  // the worker sends at once on a connected link
  work_ = true;
  cv_.notify_one();
}

void PrimaryReplicator::PersistPeerPositions() {
  std::vector<core::PeerStatus> peers;
  {
    std::lock_guard lock(mu_);
    peers = core_.Status(MonotonicNow());
  }
  for (const auto& p : peers) {
    storage::PeerPosition pos;
    pos.peer = p.peer;
    pos.received_lsn = p.positions.received;
    pos.durable_lsn = p.positions.durable;
    pos.applied_lsn = p.positions.applied;
    (void)log_->SetPeerPosition(pos);
  }
}

void PrimaryReplicator::WorkerLoop() {
  core::Nanos next_persist = MonotonicNow() + kPersistPositionsEvery;
  std::unique_lock lock(mu_);
  while (!stopping_) {
    if (!pending_close_.empty()) {
      auto closing = std::move(pending_close_);
      pending_close_.clear();
      lock.unlock();
      for (auto& [stream, reason] : closing) stream->Close(absl::AbortedError(reason));
      lock.lock();
    }
    core::Nanos now = MonotonicNow();
    work_ = false;
    core_.OnTick(now);
    ReleaseLocked(lock);  // positions may also have moved through a decision or a copy
    // A degrade (OnTick) or a rejoin (a position) may want a new set in etcd.
    if (options_.sync_set_changed && core_.SyncSetToPublish()) {
      lock.unlock();
      options_.sync_set_changed();
      lock.lock();
    }
    core::Nanos deadline = now + 100 * kMs;
    for (auto& lp : links_) {
      Link& link = *lp;
      if (!link.stream) {
        if (link.redial_at <= now) {
          Dial(link, now);
        } else {
          deadline = std::min(deadline, link.redial_at);
        }
        continue;
      }
      if (now - link.last_heard > options_.link_timeout) {
        Disconnect(link,
                   fmt::format("no message from {} for {} ms", link.opt.site,
                               (now - link.last_heard) / kMs),
                   now);
        continue;
      }
      if (core_.RttProbeReady(link.opt.site) ||
          now - link.last_heartbeat >= options_.heartbeat_interval) {
        v1::ToReplica hb;
        hb.mutable_heartbeat()->set_epoch(epoch_);
        hb.mutable_heartbeat()->set_sent_unix_ns(static_cast<uint64_t>(now));
        link.stream->Send(std::move(hb));
        link.last_heartbeat = now;
        core_.OnHeartbeatSent(link.opt.site, now);
      }
      deadline = std::min(deadline, link.last_heartbeat + options_.heartbeat_interval);
      lock.unlock();
      Ship(link, now);
      CopyStep(link, now);
      lock.lock();
      // After shipping: a send may just have put the link in debt.
      if (link.stream && link.rate_wait_until > now) {
        deadline = std::min(deadline, link.rate_wait_until);
      }
    }
    if (auto d = core_.NextDeadline()) deadline = std::min(deadline, std::max(*d, now));
    if (now >= next_persist) {
      lock.unlock();
      PersistPeerPositions();
      lock.lock();
      next_persist = now + kPersistPositionsEvery;
    }
    if (work_ || stopping_) continue;
    const core::Nanos wait = deadline - MonotonicNow();
    if (wait > 0) cv_.wait_for(lock, std::chrono::nanoseconds(wait));
  }
}

std::optional<core::SyncSet> PrimaryReplicator::TakeSyncSetToPublish() {
  std::lock_guard lock(mu_);
  if (stopping_) return std::nullopt;
  std::optional<core::SyncSet> s = core_.SyncSetToPublish();
  if (s) core_.OnSyncSetSent(*s);
  return s;
}

void PrimaryReplicator::SyncSetPublished(const core::SyncSet& set, bool ok) {
  std::unique_lock lock(mu_);
  if (!core_.OnSyncSetPublished(set, ok) || stopping_) return;
  ReleaseLocked(lock);
  const bool again = ok && core_.SyncSetToPublish().has_value();
  lock.unlock();
  // Changed while this one was in flight: publish the wanted set next. (After a failure the
  // worker asks again on its next round, within 100 ms: no tight loop while etcd refuses.)
  if (again && options_.sync_set_changed) options_.sync_set_changed();
}

std::optional<core::SyncSet> PrimaryReplicator::published_sync_set() const {
  std::lock_guard lock(mu_);
  return core_.published_sync_set();
}

void PrimaryReplicator::FillStatus(v1::GroupStatus* out) const {
  std::lock_guard lock(mu_);
  const core::Nanos now = MonotonicNow();
  out->set_role("primary");
  out->set_epoch(epoch_);
  out->set_consistent(true);
  out->set_last_lsn(log_->last_lsn());
  out->set_durable_lsn(log_->durable_lsn());
  out->set_applied_lsn(group_->applied_lsn());
  out->set_write_released(core_.write_released());
  out->set_flush_released(core_.flush_released());
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  const uint64_t wall = static_cast<uint64_t>(ts.tv_sec) * kSecond + ts.tv_nsec;
  for (const core::PeerStatus& p : core_.Status(now)) {
    v1::PeerStatus* ps = out->add_peers();
    ps->set_peer(p.peer);
    ps->set_mode(core::ModeName(p.mode));
    ps->set_link_state(core::LinkStateName(p.state));
    ps->set_received_lsn(p.positions.received);
    ps->set_durable_lsn(p.positions.durable);
    ps->set_applied_lsn(p.positions.applied);
    ps->set_in_sync_set(p.in_sync_set);
    ps->set_degraded(p.degraded);
    ps->set_copy_pending(p.copy_pending);
    ps->set_confirmed(p.confirmed);
    ps->set_lag_lsns(p.lag.lsns);
    ps->set_lag_bytes(p.lag.bytes);
    ps->set_lag_seconds(p.lag.oldest_timestamp_ns == 0 || p.lag.oldest_timestamp_ns > wall
                            ? 0.0
                            : static_cast<double>(wall - p.lag.oldest_timestamp_ns) / 1e9);
    ps->set_rtt_us(static_cast<uint64_t>(p.rtt / 1000));
    ps->set_window_bytes(p.window_bytes);
    ps->set_inflight_bytes(p.inflight_bytes);
    ps->set_delivery_rate_bytes_per_s(p.delivery_rate);
    for (const auto& l : links_) {
      if (l->opt.site != p.peer) continue;
      ps->set_heartbeat_echo_age_us(l->last_echo == 0 ? -1 : (now - l->last_echo) / 1000);
      if (l->copying || p.state == core::LinkState::kCopying) {
        ps->set_copy_total_bytes(l->copy_total);
        ps->set_copy_done_bytes(l->copy_done);
        // Rate since this copy (or its resumption) began; no ETA in its first second.
        const core::Nanos elapsed = now - l->copy_started_at;
        if (l->copying && elapsed >= kSecond && l->copy_done > l->copy_done_at_start) {
          const double rate = static_cast<double>(l->copy_done - l->copy_done_at_start) /
                              (static_cast<double>(elapsed) / kSecond);
          ps->set_copy_bytes_per_s(static_cast<uint64_t>(rate));
          ps->set_copy_eta_s(
              static_cast<double>(l->copy_total - std::min(l->copy_done, l->copy_total)) / rate);
        }
      }
      ps->set_last_error(p.last_error.empty() ? l->last_error : p.last_error);
      ps->set_rate_limit_bytes_per_s(l->opt.rate_limit_bytes_per_s);
      ps->set_sent_batches(l->sent_batches);
      ps->set_sent_records(l->sent_records);
      ps->set_sent_log_bytes(l->sent_log_bytes);
      ps->set_sent_wire_bytes(l->sent_wire_bytes);
      ps->set_sent_copy_bytes(l->sent_copy_bytes);
      ps->set_sent_records_read_back(l->sent_records_read_back);
      ps->set_dials(l->dials);
      ps->set_disconnects(l->disconnects);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Replica

ReplicaGroup::ReplicaGroup(GroupRuntime* group, ReplicaOptions options)
    : group_(group), log_(&group->log()), options_(std::move(options)), rx_(BuildView()) {
  rx_.OnApplied(group_->applied_lsn());
  group_->SetRecordsObserver(
      [this](GroupRuntime::RecordsPhase phase, std::span<const storage::LogRecordView> records) {
        OnApplied(phase, records);
      });
  // Volumes are served read-only by the runtime's exports (the node sets read_only).
}

ReplicaGroup::~ReplicaGroup() { Stop(); }

void ReplicaGroup::Stop() {
  std::shared_ptr<Session> s;
  bool first = false;
  {
    std::unique_lock lock(mu_);
    if (!stopping_) {
      first = true;
      stopping_ = true;
      s = std::move(active_);
    }
    handlers_idle_cv_.wait(lock, [&] { return handlers_running_ == 0; });
  }
  if (!first) return;
  if (s) {
    s->closed = true;
    s->stream().Close(absl::UnavailableError("replica stopping (agent stopping or promoted)"));
  }
  // Appends the handlers queued land before Stop returns.
  if (absl::Status st = WaitLogIdle(*log_); !st.ok()) {
    spdlog::error("group {}: replica stop: {}", log_->name(), std::string(st.message()));
  }
}

bool ReplicaGroup::EnterHandler() {
  std::lock_guard lock(mu_);
  if (stopping_) return false;
  ++handlers_running_;
  return true;
}

void ReplicaGroup::LeaveHandler() {
  std::lock_guard lock(mu_);
  if (--handlers_running_ == 0) handlers_idle_cv_.notify_all();
}

core::ReplicaView ReplicaGroup::BuildView() const {
  const storage::GroupLogState state = log_->State();
  const storage::ReplicaMeta meta = log_->replica_meta();
  core::ReplicaView v;
  v.group_known = true;
  v.is_primary = false;
  v.newest_epoch = std::max(meta.newest_epoch_seen, state.current_epoch);
  v.history = ToCore(state.history);
  v.last_lsn = state.last_lsn;
  for (size_t i = 0; i < group_->volume_count(); ++i) {
    v.volume_sizes.push_back(group_->volume(i).size());
  }
  v.consistent = meta.consistent;
  v.consistent_at_lsn = meta.consistent_at_lsn;
  v.copy_epoch = meta.copy_epoch;
  v.consistent_at_epoch = meta.consistent_at_epoch;
  v.copy_in_progress = meta.copy_in_progress;
  v.copy_volume = meta.copy_volume;
  v.copy_offset = meta.copy_offset;
  // Nowhere to save the records after a fork: refuse, as before rejoin existed.
  v.on_divergence =
      options_.divergent_dir.empty() ? core::OnDivergence::kRefuse : options_.on_divergence;
  v.restore_pending = meta.restore_pending;
  v.restore_epoch = meta.restore_epoch;
  for (const storage::VolumeExtent& e : meta.restore_extents) {
    v.restore_extents.push_back({e.volume, e.offset, e.length});
  }
  return v;
}

std::shared_ptr<ReplicaGroup::Session> ReplicaGroup::Open(std::shared_ptr<ReplicaStream> stream,
                                                          std::string peer_description) {
  return std::make_shared<Session>(this, std::move(stream), std::move(peer_description));
}

void ReplicaGroup::Session::OnMessage(v1::ToReplica& msg) {
  if (closed) return;
  if (!group_->EnterHandler()) {
    closed = true;
    stream_->Close(absl::UnavailableError(fmt::format(
        "group {}: this site no longer serves the group as a replica", group_->log_->name())));
    return;
  }
  Dispatch(msg);
  group_->LeaveHandler();
}

void ReplicaGroup::Session::Dispatch(v1::ToReplica& msg) {
  switch (msg.msg_case()) {
    case v1::ToReplica::kHello:
      return group_->HandleHello(*this, msg.hello());
    case v1::ToReplica::kBatch:
      return group_->HandleBatch(*this, *msg.mutable_batch());
    case v1::ToReplica::kCopyBegin:
      return group_->HandleCopyBegin(*this, msg.copy_begin());
    case v1::ToReplica::kCopyChunk:
      return group_->HandleCopyChunk(*this, msg.copy_chunk());
    case v1::ToReplica::kCopyDone:
      return group_->HandleCopyDone(*this, msg.copy_done());
    case v1::ToReplica::kHeartbeat: {
      if (msg.heartbeat().sync_requested() && accepted) group_->RequestSync();
      if (msg.heartbeat().sent_unix_ns() == 0) return;  // a sync request only: nothing to echo
      v1::FromReplica out;
      out.mutable_heartbeat()->set_epoch(msg.heartbeat().epoch());
      out.mutable_heartbeat()->set_echo_unix_ns(msg.heartbeat().sent_unix_ns());
      stream_->Send(std::move(out));
      return;
    }
    default:
      return group_->Fail(*this, absl::InvalidArgumentError(
                                     fmt::format("{} sent an empty or unknown message", peer_)));
  }
}

void ReplicaGroup::Session::OnClosed(const absl::Status& status) {
  closed = true;
  std::lock_guard lock(group_->mu_);
  if (group_->active_.get() == this) {
    group_->active_.reset();
    if (!status.ok()) group_->last_error_ = std::string(status.message());
  }
}

void ReplicaGroup::LogFailure(std::string_view what, const absl::Status& st) {
  // The volume's error comes first in write_error(), but the log may fail after it (a replica
  // whose applier stopped still appends).
  auto is_cause = [&st](const absl::Status& cause) {
    return !cause.ok() && st.message().find(cause.message()) != std::string_view::npos;
  };
  if (!is_cause(group_->write_error()) && !is_cause(log_->write_error())) {
    spdlog::error("group {}: {}: {}", log_->name(), what, std::string(st.message()));
    return;
  }
  if (suspension_logged_.exchange(true)) {
    spdlog::debug("group {}: {}: {}", log_->name(), what, std::string(st.message()));
    return;
  }
  spdlog::warn(
      "group {}: {}: this site's writes are suspended by the failure logged before; every "
      "later batch and stream is refused the same way (the primary keeps the records) until "
      "tvillingd restarts",
      log_->name(), what);
}

void ReplicaGroup::Fail(Session& s, absl::Status status) {
  LogFailure(fmt::format("stream from {}", s.peer()), status);
  {
    std::lock_guard lock(mu_);
    last_error_ = std::string(status.message());
    if (active_.get() == &s) active_.reset();
  }
  s.closed = true;
  s.stream().Close(std::move(status));
}

void ReplicaGroup::HandleHello(Session& s, const v1::Hello& hello) {
  if (s.accepted) {
    return Fail(s, absl::InvalidArgumentError(fmt::format("{} sent a second Hello", s.peer())));
  }
  // Appends of an earlier stream may still be queued: let them land so the view is exact.
  if (absl::Status st = WaitLogIdle(*log_); !st.ok()) return Fail(s, st);

  core::PrimaryHello ph;
  ph.group = hello.group();
  ph.site = hello.sender_site();
  ph.epoch = hello.epoch();
  for (const auto& e : hello.history()) ph.history.push_back({e.epoch(), e.first_lsn()});
  for (const auto& v : hello.volumes()) ph.volume_sizes.push_back(v.size_bytes());
  ph.first_lsn = hello.first_lsn();
  ph.last_lsn = hello.last_lsn();

  if (absl::Status st = ApplyPendingResync(ph); !st.ok()) {
    return Fail(s, absl::Status(st.code(), fmt::format("resync asked by a verify: {}",
                                                       std::string(st.message()))));
  }
  std::shared_ptr<Session> previous;
  v1::FromReplica out;
  core::HandshakeDecision d;
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    // Decided on a view of its own: the receiver of the active stream stays as it is unless this
    // Hello is accepted (a refused stranger or stale primary must not disturb the stream).
    core::ReplicaReceiver probe(BuildView());
    probe.OnApplied(group_->applied_lsn());
    d = core::DecideHandshake(ph, probe.view());
    if (d.kind == core::HandshakeDecision::Kind::kRejoin && active_ && active_.get() != &s) {
      // The log is about to be cut: the stream that fed it ends first.
      previous = std::move(active_);
      previous->closed = true;
    }
  }
  if (d.kind == core::HandshakeDecision::Kind::kRejoin) {
    if (previous) {
      previous->stream().Close(
          absl::AbortedError(fmt::format("superseded by a new stream from {}", s.peer())));
      previous.reset();
    }
    spdlog::warn("group {}: stream from {}: {}", log_->name(), s.peer(), d.reason);
    absl::Status st = WaitLogIdle(*log_);
    if (st.ok()) st = Rejoin(d, ph);
    if (!st.ok()) {
      // The log is the old one or the cut one (CutBackTo is atomic); the next Hello decides again.
      return Fail(s, absl::Status(st.code(), fmt::format("rejoin at fork LSN {} failed: {}",
                                                         d.fork_lsn, std::string(st.message()))));
    }
  }
  const std::string rejoined =
      d.kind == core::HandshakeDecision::Kind::kRejoin ? d.reason + "; then " : "";
  const uint64_t fork_lsn = d.fork_lsn;
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    core::ReplicaReceiver rx(BuildView());
    rx.OnApplied(group_->applied_lsn());
    d = rx.OnHello(ph);
    if (d.kind == core::HandshakeDecision::Kind::kRejoin) {
      // The cut log still diverges: a bug, never a loop.
      d.kind = core::HandshakeDecision::Kind::kRefuse;
      d.code = core::RefuseCode::kDiverged;
      d.reason = "diverged again right after the cut: " + d.reason;
    }
    d.reason = rejoined + d.reason;
    d.fork_lsn = fork_lsn;
    storage::ReplicaMeta meta = log_->replica_meta();
    bool persist = false;
    if (d.kind == core::HandshakeDecision::Kind::kRestore) {
      // The restore's resume point is valid on streams of this epoch only (core decided it).
      meta.restore_epoch = rx.view().restore_epoch;
      meta.copy_volume = rx.view().copy_volume;
      meta.copy_offset = rx.view().copy_offset;
      persist = true;
      copy_done_bytes_ = 0;
      copy_total_bytes_ = 0;
      for (const core::Extent& e : rx.view().restore_extents) copy_total_bytes_ += e.length;
    }
    if (rx.newest_epoch() > meta.newest_epoch_seen || persist) {
      meta.newest_epoch_seen = std::max(meta.newest_epoch_seen, rx.newest_epoch());
      if (absl::Status st = log_->SetReplicaMeta(meta); !st.ok()) {
        d.kind = core::HandshakeDecision::Kind::kRefuse;
        d.code = core::RefuseCode::kProtocol;
        d.reason = fmt::format("cannot persist epoch {}: {}", rx.newest_epoch(),
                               std::string(st.message()));
      }
    }
    const uint64_t answer_epoch = rx.newest_epoch();
    if (d.kind != core::HandshakeDecision::Kind::kRefuse) {
      rx_ = std::move(rx);
      if (active_ && active_.get() != &s) previous = std::move(active_);
      active_ = s.shared_from_this();
      active_peer_ = hello.sender_site();
      active_mode_ = hello.mode() == v1::MODE_SYNC ? "sync" : "async";
      sender_group_id_ = hello.sender_group_id();
      epoch_ = hello.epoch();
      s.accepted = true;
      s.history = ph.history;
      last_error_.clear();
    } else {
      last_error_ = d.reason;
      // A refused Hello of a newer epoch still fences the older primary streaming now: its
      // batches are refused from here on (the receiver knows the newer epoch) and it is cut.
      if (active_ && active_.get() != &s && rx.newest_epoch() > epoch_) {
        previous = std::move(active_);
        rx_ = std::move(rx);
      }
    }
    *out.mutable_decision() = DecisionToProto(d, answer_epoch);
  }
  if (previous) {
    previous->closed = true;
    previous->stream().Close(
        absl::AbortedError(fmt::format("superseded by a new stream from {}", s.peer())));
  }
  if (d.kind == core::HandshakeDecision::Kind::kRefuse) {
    spdlog::error("group {}: refusing the stream from {} ({}): {}", log_->name(), s.peer(),
                  core::RefuseCodeName(d.code), d.reason);
    s.stream().Send(std::move(out));
    s.closed = true;
    s.stream().Close(absl::FailedPreconditionError(d.reason));
    return;
  }
  spdlog::info("group {}: accepted the stream from {} (epoch {}): {}", log_->name(), s.peer(),
               hello.epoch(), d.reason);
  // Accepted: the handshake has settled this log against the primary's (a diverged tail is saved
  // and cut by the rejoin above). Positions of peers this site recorded while it was primary
  // held that tail in the log until now; nothing advances them on a replica, and kept they would
  // stop its retention for good (the log of a former primary would grow until the disk is full).
  for (const storage::PeerPosition& p : log_->State().peers) {
    if (absl::Status st = log_->RemovePeer(p.peer); !st.ok()) {
      spdlog::warn("group {}: forgetting peer {}'s position: {}", log_->name(), p.peer,
                   std::string(st.message()));
    }
  }
  s.stream().Send(std::move(out));
  SendAck();
}

absl::Status ReplicaGroup::Rejoin(const core::HandshakeDecision& d,
                                  const core::PrimaryHello& hello) {
  const storage::GroupLogState state = log_->State();
  const uint64_t fork = d.fork_lsn;
  if (fork >= state.last_lsn) return absl::OkStatus();  // nothing after the fork (raced)
  // Records the log dropped already (retention) cannot be saved; their data is only in the
  // volumes, at places nobody knows any more: then the extents cannot be restored either.
  const uint64_t from = std::max(fork + 1, state.first_lsn);
  std::vector<core::Extent> extents;
  std::string saved = "no record (the log had dropped them)";
  if (from <= state.last_lsn) {
    timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    storage::DivergentFileInfo info;
    info.group = log_->name();
    info.group_id = log_->group_id();
    info.fork_lsn = fork;
    info.first_lsn = from;
    info.last_lsn = state.last_lsn;
    info.saved_unix_ns =
        static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
    info.primary_epoch = hello.epoch;
    info.primary_site = hello.site;
    auto w = storage::DivergentFileWriter::Create(options_.divergent_dir, info);
    if (!w.ok()) return w.status();
    absl::Status st = log_->ReadRaw(from, state.last_lsn, UINT64_MAX, UINT32_MAX,
                                    [&](uint64_t lsn, std::string_view value) -> absl::Status {
                                      const storage::RecordHeader h =
                                          storage::PeekRecordHeader(value);
                                      extents.push_back({h.volume, h.offset, h.length});
                                      return (*w)->Add(lsn, value);
                                    });
    if (!st.ok()) return st;
    auto path = (*w)->Finish();
    if (!path.ok()) return path.status();
    saved = fmt::format("records {}..{} saved to {}", from, state.last_lsn, path->string());
  }
  core::ReplicaView view = BuildView();
  if (from != fork + 1) {
    view.consistent = false;
    view.restore_pending = false;
  }
  const core::RejoinPlan plan =
      core::PlanRejoin(view, fork, std::move(extents), group_->applied_lsn());
  storage::ReplicaMeta meta = log_->replica_meta();
  meta.newest_epoch_seen = std::max(meta.newest_epoch_seen, hello.epoch);
  if (!meta.copy_in_progress) {
    meta.consistent = false;
    meta.restore_pending = plan.restore;
    meta.restore_epoch = 0;
    meta.restore_extents.clear();
    for (const core::Extent& e : plan.extents) {
      meta.restore_extents.push_back({e.volume, e.offset, e.length});
    }
    meta.copy_volume = 0;
    meta.copy_offset = 0;
  }
  std::vector<storage::EpochStart> history;
  for (const core::EpochStart& e : plan.history) history.push_back({e.epoch, e.first_lsn});
  // Refused if anything was appended after the save (nothing is cut that is not in the file).
  // Nothing is appended until the decision goes out. The applier stays stopped until the restore
  // (or copy) is done: the restored chunks and the records after the applied LSN are merged then,
  // as in a full copy (a restart keeps it stopped: GroupRuntime::Open).
  if (absl::Status st = group_->ResetLog(
          std::min(group_->applied_lsn(), plan.applied_lsn),
          [&] { return log_->CutBackTo(fork, state.last_lsn, std::move(history), meta); });
      !st.ok()) {
    return st;
  }
  spdlog::warn("group {}: rejoin at fork LSN {}: {}; log cut back to LSN {}; {}", log_->name(),
               fork, saved, fork, plan.reason);
  return absl::OkStatus();
}

absl::Status ReplicaGroup::CheckVerifierLocked(const std::string& site, uint64_t epoch) const {
  if (stopping_) {
    return absl::UnavailableError(
        fmt::format("group {}: this site no longer serves the group as a replica", log_->name()));
  }
  if (!active_ || active_peer_ != site || epoch_ != epoch) {
    return absl::FailedPreconditionError(fmt::format(
        "group {}: a verify from {} in epoch {} is refused: {}", log_->name(), site, epoch,
        active_ ? fmt::format("the accepted stream is from {} in epoch {}", active_peer_, epoch_)
                : std::string("no stream is accepted now")));
  }
  const storage::ReplicaMeta meta = log_->replica_meta();
  if (meta.copy_in_progress || meta.restore_pending || pending_resync_ || !rx_.consistent()) {
    return absl::FailedPreconditionError(fmt::format(
        "group {}: the replica is not consistent ({}): nothing to verify until it is", log_->name(),
        meta.copy_in_progress  ? "full copy in progress"
        : meta.restore_pending ? "restore in progress"
        : pending_resync_      ? "a resync is waiting for the next stream"
                               : "catching up to its copy's end"));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::VerifyChunksReply> ReplicaGroup::VerifyChunks(
    const v1::VerifyChunksRequest& req, const std::function<bool()>& cancelled) {
  if (req.chunks_size() == 0 ||
      static_cast<size_t>(req.chunks_size()) > core::kVerifyMaxChunksPerRequest) {
    return absl::InvalidArgumentError(
        fmt::format("group {}: a verify request holds {} chunk(s); 1 to {} are allowed",
                    log_->name(), req.chunks_size(), core::kVerifyMaxChunksPerRequest));
  }
  uint64_t bytes = 0;
  uint64_t wait_for = 0;
  for (const v1::VerifyChunkRequest& c : req.chunks()) {
    if (c.volume() >= group_->volume_count() || c.length() == 0 ||
        c.offset() > group_->volume(c.volume()).size() ||
        c.length() > group_->volume(c.volume()).size() - c.offset()) {
      return absl::InvalidArgumentError(
          fmt::format("group {}: verify chunk volume {} {}+{} is not inside the group's volumes",
                      log_->name(), c.volume(), c.offset(), c.length()));
    }
    bytes += c.length();
    wait_for = std::max<uint64_t>(wait_for, c.valid_from());
  }
  if (bytes > core::kVerifyMaxRequestBytes) {
    return absl::InvalidArgumentError(
        fmt::format("group {}: a verify request of {} bytes; at most {}", log_->name(), bytes,
                    core::kVerifyMaxRequestBytes));
  }
  {
    std::lock_guard lock(mu_);
    if (absl::Status st = CheckVerifierLocked(req.sender_site(), req.epoch()); !st.ok()) return st;
  }
  // Wait until the volumes hold the LSNs the primary's samples start at.
  const core::Nanos deadline =
      MonotonicNow() +
      static_cast<core::Nanos>(std::min<uint32_t>(req.wait_ms(), 60'000)) * 1'000'000;
  while (group_->applied_lsn() < wait_for) {
    if (MonotonicNow() >= deadline) {
      return absl::DeadlineExceededError(
          fmt::format("group {}: the applied LSN {} did not reach {} within {} ms (replica behind)",
                      log_->name(), group_->applied_lsn(), wait_for, req.wait_ms()));
    }
    {
      std::lock_guard lock(mu_);
      if (stopping_) return absl::UnavailableError("replica stopping");
    }
    if (cancelled && cancelled()) return absl::UnavailableError("the agent is stopping");
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  v1::VerifyChunksReply reply;
  std::string buffer;
  for (const v1::VerifyChunkRequest& c : req.chunks()) {
    auto sample = SampleChunk(*group_, {c.volume(), c.offset(), c.length()}, buffer);
    if (!sample.ok()) return sample.status();
    *reply.add_hashes() = ToProto(*sample);
  }
  reply.set_applied_lsn(group_->applied_lsn());
  {
    // A copy or restore that began meanwhile wrote chunks without notes: the samples may lie.
    std::lock_guard lock(mu_);
    if (absl::Status st = CheckVerifierLocked(req.sender_site(), req.epoch()); !st.ok()) return st;
  }
  return reply;
}

absl::StatusOr<v1::MarkResyncReply> ReplicaGroup::MarkResync(const v1::MarkResyncRequest& req) {
  std::vector<core::Extent> extents;
  for (const v1::Extent& e : req.extents()) {
    if (e.volume() >= group_->volume_count() || e.length() == 0 ||
        e.offset() > group_->volume(e.volume()).size() ||
        e.length() > group_->volume(e.volume()).size() - e.offset()) {
      return absl::InvalidArgumentError(
          fmt::format("group {}: resync range volume {} {}+{} is not inside the group's volumes",
                      log_->name(), e.volume(), e.offset(), e.length()));
    }
    extents.push_back({e.volume(), e.offset(), e.length()});
  }
  extents = core::MergeExtents(std::move(extents));
  if (extents.empty() || extents.size() > core::kMaxRestoreExtents) {
    return absl::InvalidArgumentError(
        fmt::format("group {}: a resync of {} range(s); 1 to {} are allowed", log_->name(),
                    extents.size(), core::kMaxRestoreExtents));
  }
  uint64_t bytes = 0;
  for (const core::Extent& e : extents) bytes += e.length;
  const size_t count = extents.size();
  std::shared_ptr<Session> previous;
  {
    std::lock_guard lock(mu_);
    if (absl::Status st = CheckVerifierLocked(req.sender_site(), req.epoch()); !st.ok()) return st;
    pending_resync_ = PendingResync{req.sender_site(), req.epoch(), std::move(extents)};
    previous = std::move(active_);
    previous->closed = true;
  }
  const std::string why = fmt::format(
      "resync of {} range(s), {} bytes, asked by the verify of {}: reconnect to "
      "restore them",
      count, bytes, req.sender_site());
  spdlog::warn("group {}: {}", log_->name(), why);
  previous->stream().Close(absl::AbortedError(why));
  v1::MarkResyncReply reply;
  reply.set_message(why);
  return reply;
}

absl::Status ReplicaGroup::ApplyPendingResync(const core::PrimaryHello& hello) {
  PendingResync pending;
  {
    std::lock_guard lock(mu_);
    if (!pending_resync_) return absl::OkStatus();
    if (pending_resync_->site != hello.site || pending_resync_->epoch != hello.epoch) {
      if (hello.epoch > pending_resync_->epoch) {
        spdlog::warn(
            "group {}: dropping the resync asked by {} in epoch {}: a stream of epoch {} "
            "came first (verify again)",
            log_->name(), pending_resync_->site, pending_resync_->epoch, hello.epoch);
        pending_resync_.reset();
      }
      return absl::OkStatus();
    }
    pending = std::move(*pending_resync_);
    pending_resync_.reset();
  }
  // As a rejoin's restore (Rejoin above): the earlier stream's appends land, the applier stops
  // at its applied LSN A, and the decision below is a RESTORE of the extents; after CopyDone the
  // records after A are replayed over the chunks.
  if (absl::Status st = WaitLogIdle(*log_); !st.ok()) return st;
  storage::ReplicaMeta meta = log_->replica_meta();
  if (meta.copy_in_progress) return absl::OkStatus();  // a full copy replaces every byte anyway
  std::vector<core::Extent> all = pending.extents;
  for (const storage::VolumeExtent& e : meta.restore_extents) {
    all.push_back({e.volume, e.offset, e.length});
  }
  all = core::MergeExtents(std::move(all));
  group_->PauseApply();
  meta.consistent = false;
  meta.restore_pending = true;
  meta.restore_epoch = 0;
  meta.copy_volume = 0;
  meta.copy_offset = 0;
  meta.restore_extents.clear();
  for (const core::Extent& e : all) meta.restore_extents.push_back({e.volume, e.offset, e.length});
  if (absl::Status st = log_->SetReplicaMeta(meta); !st.ok()) {
    // Nothing was persisted: the applier may go on.
    (void)group_->ResumeApply();
    return st;
  }
  spdlog::warn(
      "group {}: restoring {} range(s) that a verify found different (applier paused at "
      "LSN {}; inconsistent until the restore completes)",
      log_->name(), all.size(), group_->applied_lsn());
  return absl::OkStatus();
}

void ReplicaGroup::HandleBatch(Session& s, v1::Batch& batch) {
  if (!s.accepted) {
    return Fail(s, absl::InvalidArgumentError(
                       fmt::format("{} sent a batch before its Hello was accepted", s.peer())));
  }
  std::string buf;
  if (absl::Status st = transport::DecodeBatch(&batch, &buf); !st.ok()) {
    // DecodeBatch's errors name the batch's first LSN already ("batch at LSN N: ...").
    return Fail(s, absl::InvalidArgumentError(st.message()));
  }
  auto records = storage::ShippedRecords::Parse(std::move(buf));
  if (!records.ok()) {
    return Fail(s,
                absl::InvalidArgumentError(fmt::format("batch from LSN {}: {}", batch.first_lsn(),
                                                       std::string(records.status().message()))));
  }
  if (records->size() != batch.record_count()) {
    return Fail(s, absl::InvalidArgumentError(
                       fmt::format("batch from LSN {} says {} records but holds {}",
                                   batch.first_lsn(), batch.record_count(), records->size())));
  }
  // Each record's checksum is verified when it is appended, but a record can verify and still not
  // belong here: the primary's history admits one epoch per batch (OnBatch checks batch.epoch), so
  // a record of another epoch would move this log into an epoch nobody announced, and a record
  // outside the group's volumes would enter the log and then fail to apply, suspending the group.
  for (size_t i = 0; i < records->size(); ++i) {
    const uint64_t lsn = batch.first_lsn() + i;
    const storage::RecordHeader h = storage::PeekRecordHeader((*records)[i]);
    if (h.epoch != batch.epoch()) {
      return Fail(s, absl::InvalidArgumentError(fmt::format(
                         "batch from LSN {}: record LSN {} is of epoch {} but the batch is of "
                         "epoch {}",
                         batch.first_lsn(), lsn, h.epoch, batch.epoch())));
    }
    if (h.volume >= group_->volume_count()) {
      return Fail(s, absl::InvalidArgumentError(fmt::format(
                         "batch from LSN {}: record LSN {} names volume {} but the group has {}",
                         batch.first_lsn(), lsn, h.volume, group_->volume_count())));
    }
    const uint64_t size = group_->volume(h.volume).size();
    if (h.offset > size || h.length > size - h.offset) {
      return Fail(s, absl::InvalidArgumentError(fmt::format(
                         "batch from LSN {}: record LSN {} ({} {}+{}) is beyond volume {} of {} "
                         "bytes",
                         batch.first_lsn(), lsn, storage::RecordTypeName(h.type), h.offset,
                         h.length, h.volume, size)));
    }
  }
  core::ReplicaReceiver::BatchCheck check;
  uint32_t gid = 0;
  bool async_link = false;
  {
    std::lock_guard lock(mu_);
    check = rx_.OnBatch(batch.epoch(), batch.first_lsn(), batch.record_count());
    gid = sender_group_id_;
    async_link = active_mode_ == "async";
  }
  if (check.verdict == core::ReplicaReceiver::BatchCheck::Verdict::kReject) {
    return Fail(s, absl::FailedPreconditionError(check.reason));
  }
  if (check.skip_records >= records->size()) return;
  records->DropFront(check.skip_records);
  const uint64_t first = batch.first_lsn() + check.skip_records;
  const uint64_t last = first + records->size() - 1;
  // `received` is acknowledged once the records are in the log (a sync WRITE at the primary waits
  // for that), `durable` once they are fsynced (a FLUSH/FUA waits for that). The fsync is a Sync()
  // queued behind the append, so the committer groups it with whatever else is queued.
  auto fail = [this, first](const absl::Status& st) {
    std::shared_ptr<Session> a;
    {
      std::lock_guard lock(mu_);
      a = active_;
    }
    LogFailure(fmt::format("appending replicated records from LSN {}", first), st);
    if (a) Fail(*a, st);
  };
  // The two callbacks may run in either order (a Sync can find the batch written and fsync on its
  // own thread before the committer has run the append's callback); core keeps what was reported
  // fsynced and reports durable up to what was appended.
  // An async link's batch may be acknowledged only by its `durable` ack (one Position per batch
  // instead of two, each a wake-up and a TLS record on both sites): core decides
  // (ReplicaReceiver::AckAppendNow), from whether the syncer already has an fsync to do.
  const bool durable_requested = batch.durable_requested();
  log_->AppendReplicated(
      gid, first, std::move(*records), /*sync=*/false,
      [this, fail, async_link, durable_requested](absl::StatusOr<uint64_t> appended) {
        if (!appended.ok()) return fail(appended.status());
        const bool fsync_busy = async_link && durable_requested && log_->SyncBusy();
        bool send = false;
        {
          std::lock_guard lock(mu_);
          rx_.OnAppended(*appended);
          send = rx_.AckAppendNow(async_link, durable_requested, fsync_busy, *appended);
        }
        if (send) SendAck();
      });
  // Every batch is synced: nothing else would make it durable. At once when the primary waits
  // on it (an async peer's lag, a FLUSH/FUA); otherwise within sync_interval, one fsync for the
  // burst, and `durable` rides on the next `received` (or goes when that fsync is done). A FLUSH
  // that comes later asks with a heartbeat (RequestSync).
  const std::chrono::microseconds within =
      batch.durable_requested() ? std::chrono::microseconds(0) : options_.sync_interval;
  log_->Sync(
      [this, fail, last](absl::Status st) {
        if (!st.ok()) return fail(st);
        AckDurable(last);
      },
      /*fsync_here=*/false, within);
}

void ReplicaGroup::AckDurable(uint64_t lsn) {
  {
    std::lock_guard lock(mu_);
    rx_.OnDurable(lsn);
  }
  SendAck();
}

void ReplicaGroup::RequestSync() {
  // Covers every record accepted so far: the batches' own (maybe deferred) syncs complete in the
  // same fsync, and core reports durable up to what was appended.
  const uint64_t last = log_->last_lsn();
  log_->Sync(
      [this, last](absl::Status st) {
        if (st.ok()) AckDurable(last);  // else the batches' own Syncs report the failure
      },
      /*fsync_here=*/false);
}

void ReplicaGroup::HandleCopyBegin(Session& s, const v1::CopyBegin& m) {
  if (!s.accepted) {
    return Fail(s, absl::InvalidArgumentError(fmt::format("{}: copy before Hello", s.peer())));
  }
  if (m.log_start_lsn() == 0) {
    return Fail(s, absl::InvalidArgumentError("CopyBegin with log_start_lsn 0"));
  }
  if (absl::Status st = WaitLogIdle(*log_); !st.ok()) return Fail(s, st);
  storage::ReplicaMeta meta = log_->replica_meta();
  meta.copy_in_progress = true;
  meta.copy_volume = 0;
  meta.copy_offset = 0;
  meta.copy_base_lsn = m.log_start_lsn() - 1;
  meta.consistent = false;
  meta.consistent_at_lsn = 0;
  meta.copy_epoch = m.epoch();
  meta.consistent_at_epoch = 0;
  meta.restore_pending = false;  // the copy replaces every byte
  meta.restore_epoch = 0;
  meta.restore_extents.clear();
  // The copy stands for the primary's records up to L0, so the log's history is the primary's
  // (the Hello's, docs/replication.md) up to L0: the same history core's view gets below, and what
  // BuildView reads back after a restart. The reset log, that history and the copy mark land in
  // one synced write: a crash between them could leave a reset log that still claims to be
  // consistent, or one whose history later handshakes would find diverged from the primary's.
  const core::History copied = core::HistoryUpTo(s.history, m.log_start_lsn() - 1);
  std::vector<storage::EpochStart> history;
  for (const core::EpochStart& e : copied) history.push_back({e.epoch, e.first_lsn});
  if (absl::Status st = group_->ResetLog(
          m.log_start_lsn() - 1,
          [&] { return log_->ResetForCopy(m.log_start_lsn(), std::move(history), meta); });
      !st.ok()) {
    return Fail(s, st);
  }
  {
    std::lock_guard lock(mu_);
    rx_.OnCopyBegin(m.epoch(), m.log_start_lsn(), s.history);
    copy_bytes_since_checkpoint_ = 0;
    copy_done_bytes_ = 0;
    copy_total_bytes_ = 0;
    for (size_t i = 0; i < group_->volume_count(); ++i) {
      copy_total_bytes_ += group_->volume(i).size();
    }
  }
  spdlog::info(
      "group {}: full copy from {} begins; log restarts at LSN {}; inconsistent until "
      "it completes",
      log_->name(), s.peer(), m.log_start_lsn());
}

void ReplicaGroup::HandleCopyChunk(Session& s, const v1::CopyChunk& m) {
  const storage::ReplicaMeta cur = log_->replica_meta();
  if (!s.accepted || (!cur.copy_in_progress && !cur.restore_pending)) {
    return Fail(s, absl::InvalidArgumentError(
                       fmt::format("{} sent a copy chunk while no copy is in progress", s.peer())));
  }
  if (!cur.copy_in_progress) {
    std::vector<core::Extent> extents;
    for (const auto& e : cur.restore_extents) extents.push_back({e.volume, e.offset, e.length});
    if (!core::ExtentsCover(extents, m.volume(), m.offset(), m.length())) {
      return Fail(s, absl::InvalidArgumentError(fmt::format(
                         "{} sent a copy chunk for volume {} {}+{}, outside the extents being "
                         "restored",
                         s.peer(), m.volume(), m.offset(), m.length())));
    }
  }
  if (m.volume() >= group_->volume_count()) {
    return Fail(s,
                absl::InvalidArgumentError(fmt::format("copy chunk for volume {}, the group has {}",
                                                       m.volume(), group_->volume_count())));
  }
  storage::Volume& v = group_->volume(m.volume());
  if (m.offset() > v.size() || m.length() > v.size() - m.offset() || m.length() == 0) {
    return Fail(s, absl::InvalidArgumentError(
                       fmt::format("copy chunk {}+{} is outside volume {} of {} bytes", m.offset(),
                                   m.length(), m.volume(), v.size())));
  }
  absl::Status st;
  if (m.zero()) {
    st = v.WriteZeroes(m.offset(), m.length(), /*may_trim=*/true);
  } else {
    if (m.codec() != v1::CODEC_NONE || m.data().size() != m.length() ||
        storage::PayloadHash(m.data()) != m.checksum()) {
      return Fail(s, absl::DataLossError(
                         fmt::format("copy chunk volume {} offset {}: size or checksum mismatch",
                                     m.volume(), m.offset())));
    }
    st = v.Write(m.offset(), m.data());
  }
  if (!st.ok()) return Fail(s, st);
  bool checkpoint = false;
  {
    std::lock_guard lock(mu_);
    rx_.OnCopyChunk(m.volume(), m.offset() + m.length());
    copy_done_bytes_ += m.length();
    // Zero chunks do not count towards a checkpoint (an fsync of the volumes and a synced write):
    // a thin volume's holes come as thousands of them, each a hole punched in a moment, and what
    // an interruption makes the primary send again of them costs it no read.
    if (!m.zero()) copy_bytes_since_checkpoint_ += m.length();
    if (copy_bytes_since_checkpoint_ >= options_.copy_checkpoint_bytes) {
      copy_bytes_since_checkpoint_ = 0;
      checkpoint = true;
    }
  }
  if (checkpoint) {
    // The resume point is persisted only after the chunks before it are durable.
    for (size_t i = 0; i < group_->volume_count(); ++i) {
      if (absl::Status fst = group_->volume(i).Flush(); !fst.ok()) return Fail(s, fst);
    }
    storage::ReplicaMeta meta = log_->replica_meta();
    meta.copy_volume = m.volume();
    meta.copy_offset = m.offset() + m.length();
    if (meta.copy_offset >= v.size()) {
      ++meta.copy_volume;
      meta.copy_offset = 0;
    }
    if (absl::Status mst = log_->SetReplicaMeta(meta); !mst.ok()) return Fail(s, mst);
  }
  SendAck();
}

void ReplicaGroup::HandleCopyDone(Session& s, const v1::CopyDone& m) {
  const storage::ReplicaMeta cur = log_->replica_meta();
  if (!s.accepted || (!cur.copy_in_progress && !cur.restore_pending)) {
    return Fail(s, absl::InvalidArgumentError(
                       fmt::format("{} sent CopyDone while no copy is in progress", s.peer())));
  }
  for (size_t i = 0; i < group_->volume_count(); ++i) {
    if (absl::Status st = group_->volume(i).Flush(); !st.ok()) return Fail(s, st);
  }
  // "Copy complete, consistent once consistent_at is applied": core::ReplicaReceiver derives the
  // replica's consistency from these two and the applied LSN, so nothing else is persisted.
  storage::ReplicaMeta meta = log_->replica_meta();
  const bool restore = !meta.copy_in_progress;
  meta.copy_in_progress = false;
  meta.restore_pending = false;
  meta.restore_epoch = 0;
  meta.restore_extents.clear();
  meta.copy_volume = 0;
  meta.copy_offset = 0;
  meta.consistent = true;
  meta.consistent_at_lsn = m.lsn();
  {
    std::lock_guard lock(mu_);
    meta.consistent_at_epoch = rx_.StreamEpochAt(m.lsn());
  }
  if (absl::Status st = log_->SetReplicaMeta(meta); !st.ok()) return Fail(s, st);
  {
    std::lock_guard lock(mu_);
    rx_.OnCopyDone(m.lsn());
  }
  spdlog::info("group {}: {} from {} received; consistent once LSN {} is applied", log_->name(),
               restore ? "restore of the rejoin's extents" : "full copy", s.peer(), m.lsn());
  if (absl::Status st = group_->ResumeApply(); !st.ok()) return Fail(s, st);
  // Records applied by the catch-up did not pass through the observer.
  NoteApplied(group_->applied_lsn());
  SendAck();
}

void ReplicaGroup::OnApplied(GroupRuntime::RecordsPhase phase,
                             std::span<const storage::LogRecordView> records) {
  if (phase != GroupRuntime::RecordsPhase::kApplied) return;
  if (records.empty() || group_->apply_paused()) return;
  NoteApplied(records.back().lsn);
  // The applied LSN rides on the next ack: the durable one that follows every batch (its fsync
  // takes longer than the apply). Only when that ack has already gone does it need its own
  // message. NoteApplied ran first, so an ack taken from here on carries it.
  if (log_->durable_lsn() < records.back().lsn) return;
  SendAck();
}

void ReplicaGroup::NoteApplied(uint64_t applied) {
  bool became_consistent = false;
  {
    std::lock_guard lock(mu_);
    const bool was = rx_.consistent();
    rx_.OnApplied(applied);
    became_consistent = !was && rx_.consistent();
  }
  if (became_consistent) {
    spdlog::info("group {}: replica is consistent at LSN {}", log_->name(), applied);
  }
}

void ReplicaGroup::SendAck() {
  std::shared_ptr<Session> s;
  std::optional<core::Positions> p;
  uint64_t epoch = 0, copied = 0;
  {
    std::lock_guard lock(mu_);
    if (!active_) return;
    p = rx_.TakeAck();
    if (!p) return;
    s = active_;
    epoch = rx_.newest_epoch();
    copied = copy_done_bytes_;
  }
  v1::FromReplica out;
  v1::Position* pos = out.mutable_position();
  pos->set_epoch(epoch);
  pos->set_received_lsn(p->received);
  pos->set_durable_lsn(p->durable);
  pos->set_applied_lsn(p->applied);
  pos->set_copied_bytes(copied);
  pos->set_copy_in_progress(p->copying);
  s->stream().Send(std::move(out));
}

void ReplicaGroup::FillStatus(v1::GroupStatus* out) const {
  std::lock_guard lock(mu_);
  const storage::ReplicaMeta meta = log_->replica_meta();
  out->set_role("replica");
  out->set_epoch(rx_.newest_epoch());
  out->set_consistent(rx_.consistent());
  out->set_last_lsn(log_->last_lsn());
  out->set_durable_lsn(log_->durable_lsn());
  out->set_applied_lsn(group_->applied_lsn());
  v1::PeerStatus* ps = out->add_peers();
  ps->set_peer(active_peer_);
  ps->set_mode(active_mode_);
  ps->set_link_state(active_ ? (meta.copy_in_progress  ? "copying"
                                : meta.restore_pending ? "restoring"
                                                       : "streaming")
                             : "disconnected");
  ps->set_received_lsn(log_->last_lsn());
  ps->set_durable_lsn(log_->durable_lsn());
  ps->set_applied_lsn(group_->applied_lsn());
  if (meta.copy_in_progress || meta.restore_pending) {
    ps->set_copy_total_bytes(copy_total_bytes_);
    ps->set_copy_done_bytes(copy_done_bytes_);
  }
  ps->set_last_error(last_error_);
}

}  // namespace tvilling::node
