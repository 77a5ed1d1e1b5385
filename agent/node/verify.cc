// verify.cc: chunk sampling and the primary's verify job (verify.h).
#include "agent/node/verify.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/time.h>
#include <xxhash.h>

#include <deque>
#include <thread>

#include "agent/node/replication.h"

namespace tvilling::node {
namespace {

constexpr std::chrono::milliseconds kReplicaWait{30'000};
constexpr std::chrono::milliseconds kRpcTimeout{90'000};
constexpr int kRpcAttempts = 3;

uint64_t NowUnixMs() {
  timeval tv;
  gettimeofday(&tv, nullptr);
  return static_cast<uint64_t>(tv.tv_sec) * 1000 + static_cast<uint64_t>(tv.tv_usec) / 1000;
}

void SleepUntil(core::Nanos at) {
  const core::Nanos now = MonotonicNow();
  if (at > now) std::this_thread::sleep_for(std::chrono::nanoseconds(at - now));
}

struct Pending {
  core::VerifyChunk chunk;
  uint32_t attempts = 0;
};

class Run {
 public:
  Run(GroupRuntime& runtime, VerifyPeer& peer, const VerifyJob& job,
      const std::function<bool(const v1::VerifyStatus&)>& progress)
      : runtime_(runtime),
        peer_(peer),
        job_(job),
        progress_(progress),
        plan_(VolumeSizes(runtime), job.volume, job.chunk_bytes),
        pacer_(job.rate_bytes_per_s) {}

  v1::VerifyStatus Go() {
    st_.set_state("running");
    st_.set_started_unix_ms(NowUnixMs());
    st_.set_total_bytes(plan_.total_bytes());
    st_.set_total_chunks(plan_.total_chunks());
    started_ = MonotonicNow();
    spdlog::info("group {}: verify of peer {} begins: {} chunk(s), {} bytes", job_.group, job_.peer,
                 plan_.total_chunks(), plan_.total_bytes());
    absl::Status s = Compare();
    if (!s.ok()) return Finish(cancelled_ ? "cancelled" : "failed", s);
    const std::string state = st_.mismatch_chunks() > 0     ? "mismatches"
                              : st_.unverified_chunks() > 0 ? "incomplete"
                                                            : "identical";
    if (job_.resync && st_.mismatch_chunks() > 0) Resync();
    return Finish(state, absl::OkStatus());
  }

 private:
  static std::vector<uint64_t> VolumeSizes(GroupRuntime& runtime) {
    std::vector<uint64_t> sizes;
    for (size_t i = 0; i < runtime.volume_count(); ++i) sizes.push_back(runtime.volume(i).size());
    return sizes;
  }

  v1::VerifyStatus Finish(const std::string& state, const absl::Status& error) {
    st_.set_state(state);
    st_.set_finished_unix_ms(NowUnixMs());
    st_.set_eta_s(0);
    if (!error.ok()) st_.set_error(std::string(error.message()));
    for (const core::Extent& e : ranges_) {
      v1::VerifyRange* r = st_.add_mismatches();
      r->set_volume_index(e.volume);
      r->set_volume(e.volume < job_.volume_names.size() ? job_.volume_names[e.volume] : "");
      r->set_offset(e.offset);
      r->set_length(e.length);
    }
    spdlog::log(state == "identical" ? spdlog::level::info : spdlog::level::warn,
                "group {}: verify of peer {}: {}: {} of {} chunk(s) compared, {} mismatching "
                "({} range(s) listed), {} unverified{}{}",
                job_.group, job_.peer, state, st_.compared_chunks(), st_.total_chunks(),
                st_.mismatch_chunks(), ranges_.size(), st_.unverified_chunks(),
                error.ok() ? "" : ": ", std::string(error.message()));
    return st_;
  }

  // Reports progress when due; false if the caller cancelled.
  bool Report(bool force) {
    const core::Nanos now = MonotonicNow();
    if (!force && now < next_report_) return true;
    next_report_ = now + std::chrono::nanoseconds(job_.progress_interval).count();
    const core::VerifyRate rate =
        core::VerifyRateAt(st_.done_bytes(), st_.total_bytes(), started_, now);
    st_.set_bytes_per_s(rate.bytes_per_s);
    st_.set_eta_s(rate.eta_s);
    v1::VerifyStatus copy = st_;
    for (const core::Extent& e : ranges_) {
      v1::VerifyRange* r = copy.add_mismatches();
      r->set_volume_index(e.volume);
      r->set_volume(e.volume < job_.volume_names.size() ? job_.volume_names[e.volume] : "");
      r->set_offset(e.offset);
      r->set_length(e.length);
    }
    if (progress_ && !progress_(copy)) {
      cancelled_ = true;
      return false;
    }
    return true;
  }

  // New chunks go in batches of 16 MiB (a request's hashing takes tens of ms on the replica). A
  // chunk to sample again goes alone: the shorter the time between the two sites' samples, the
  // likelier they share an LSN when the chunk is being rewritten.
  std::vector<Pending> NextBatch() {
    std::vector<Pending> batch;
    if (!retry_.empty()) {
      batch.push_back(retry_.front());
      retry_.pop_front();
      return batch;
    }
    for (const core::VerifyChunk& c : plan_.Next(16, 16ull << 20)) batch.push_back({c, 0});
    return batch;
  }

  absl::StatusOr<v1::VerifyChunksReply> Ask(const v1::VerifyChunksRequest& req) {
    absl::Status last;
    for (int attempt = 0; attempt < kRpcAttempts; ++attempt) {
      if (attempt > 0) std::this_thread::sleep_for(std::chrono::seconds(1));
      auto reply = peer_.VerifyChunks(job_.peer, req, kRpcTimeout);
      if (reply.ok()) {
        if (reply->hashes_size() != req.chunks_size()) {
          return absl::InvalidArgumentError(
              fmt::format("peer {} answered {} hash(es) for {} chunk(s)", job_.peer,
                          reply->hashes_size(), req.chunks_size()));
        }
        return reply;
      }
      last = reply.status();
      // A refusal (not the accepted primary, not consistent) will not change by asking again.
      if (last.code() != absl::StatusCode::kUnavailable) break;
    }
    return absl::Status(last.code(),
                        fmt::format("peer {}: {}", job_.peer, std::string(last.message())));
  }

  absl::Status Compare() {
    std::string buffer;
    while (!plan_.done() || !retry_.empty()) {
      if (!Report(false)) return absl::CancelledError("verify cancelled");
      if (job_.still_primary && !job_.still_primary()) {
        return absl::FailedPreconditionError(
            fmt::format("site {} is no longer the primary of group {} in epoch {}: verify stopped",
                        job_.site, job_.group, job_.epoch));
      }
      const std::vector<Pending> batch = NextBatch();
      if (batch.empty()) break;
      std::vector<core::ChunkSample> mine;
      v1::VerifyChunksRequest req;
      req.set_group(job_.group);
      req.set_sender_site(job_.site);
      req.set_epoch(job_.epoch);
      req.set_wait_ms(static_cast<uint32_t>(kReplicaWait.count()));
      // Paced per batch, before it: the batch's chunks are then sampled back to back, right
      // before the request (the replica's samples follow within milliseconds).
      uint64_t batch_bytes = 0;
      for (const Pending& p : batch) batch_bytes += p.chunk.length;
      SleepUntil(pacer_.Reserve(MonotonicNow(), batch_bytes));
      for (const Pending& p : batch) {
        auto s = SampleChunk(runtime_, p.chunk, buffer);
        if (!s.ok()) return s.status();
        mine.push_back(*s);
        v1::VerifyChunkRequest* c = req.add_chunks();
        c->set_volume(p.chunk.volume);
        c->set_offset(p.chunk.offset);
        c->set_length(static_cast<uint32_t>(p.chunk.length));
        c->set_valid_from(s->valid_from);
      }
      auto reply = Ask(req);
      if (!reply.ok()) return reply.status();
      for (size_t i = 0; i < batch.size(); ++i) {
        const core::VerifyChunk& c = batch[i].chunk;
        // The applied LSN first, then the note (verify.h: a record is noted before it is written).
        const uint64_t applied_now = runtime_.applied_lsn();
        const uint64_t note_now = runtime_.LastWriteLsn(c.volume, c.offset, c.length);
        const core::ChunkSample p = core::ExtendSample(mine[i], note_now, applied_now);
        const core::ChunkVerdict v = core::CompareChunk(p, FromProto(reply->hashes(i)));
        Account(batch[i], v);
      }
    }
    Report(true);
    return cancelled_ ? absl::CancelledError("verify cancelled") : absl::OkStatus();
  }

  void Account(const Pending& p, core::ChunkVerdict v) {
    switch (v) {
      case core::ChunkVerdict::kMatch:
        st_.set_compared_chunks(st_.compared_chunks() + 1);
        st_.set_done_bytes(st_.done_bytes() + p.chunk.length);
        return;
      case core::ChunkVerdict::kMismatch:
        st_.set_compared_chunks(st_.compared_chunks() + 1);
        st_.set_mismatch_chunks(st_.mismatch_chunks() + 1);
        st_.set_mismatch_bytes(st_.mismatch_bytes() + p.chunk.length);
        st_.set_done_bytes(st_.done_bytes() + p.chunk.length);
        spdlog::warn("group {}: verify: peer {} differs in volume {} at {}+{}", job_.group,
                     job_.peer, p.chunk.volume, p.chunk.offset, p.chunk.length);
        if (!core::AddMismatch(ranges_, p.chunk)) ranges_truncated_ = true;
        return;
      case core::ChunkVerdict::kRetry:
        st_.set_retried_chunks(st_.retried_chunks() + 1);
        if (p.attempts + 1 < core::kVerifyMaxAttempts) {
          retry_.push_back({p.chunk, p.attempts + 1});
        } else {
          st_.set_unverified_chunks(st_.unverified_chunks() + 1);
          st_.set_done_bytes(st_.done_bytes() + p.chunk.length);
        }
        return;
    }
  }

  // Compares the chunks of the mismatching ranges again (after a resync); returns how many do not
  // match (differ, or never sampled at a common LSN).
  absl::StatusOr<uint64_t> Recheck() {
    std::string buffer;
    uint64_t bad = 0;
    for (const core::Extent& e : ranges_) {
      for (uint64_t off = e.offset; off < e.offset + e.length; off += job_.chunk_bytes) {
        const core::VerifyChunk c{e.volume, off,
                                  std::min(job_.chunk_bytes, e.offset + e.length - off)};
        core::ChunkVerdict v = core::ChunkVerdict::kRetry;
        for (uint32_t attempt = 0;
             attempt < core::kVerifyMaxAttempts && v == core::ChunkVerdict::kRetry; ++attempt) {
          auto mine = SampleChunk(runtime_, c, buffer);
          if (!mine.ok()) return mine.status();
          v1::VerifyChunksRequest req;
          req.set_group(job_.group);
          req.set_sender_site(job_.site);
          req.set_epoch(job_.epoch);
          req.set_wait_ms(static_cast<uint32_t>(kReplicaWait.count()));
          v1::VerifyChunkRequest* r = req.add_chunks();
          r->set_volume(c.volume);
          r->set_offset(c.offset);
          r->set_length(static_cast<uint32_t>(c.length));
          r->set_valid_from(mine->valid_from);
          auto reply = Ask(req);
          if (!reply.ok()) return reply.status();
          const uint64_t applied_now = runtime_.applied_lsn();
          const uint64_t note_now = runtime_.LastWriteLsn(c.volume, c.offset, c.length);
          v = core::CompareChunk(core::ExtendSample(*mine, note_now, applied_now),
                                 FromProto(reply->hashes(0)));
        }
        if (v != core::ChunkVerdict::kMatch) ++bad;
      }
    }
    return bad;
  }

  void Resync() {
    std::optional<v1::PeerStatus> before = job_.peer_status ? job_.peer_status() : std::nullopt;
    const uint64_t dials_before = before ? before->dials() : 0;
    v1::MarkResyncRequest req;
    req.set_group(job_.group);
    req.set_sender_site(job_.site);
    req.set_epoch(job_.epoch);
    uint64_t bytes = 0;
    for (const core::Extent& e : ranges_) {
      v1::Extent* x = req.add_extents();
      x->set_volume(e.volume);
      x->set_offset(e.offset);
      x->set_length(e.length);
      bytes += e.length;
    }
    st_.set_resync("restoring");
    Report(true);
    auto marked = peer_.MarkResync(job_.peer, req, kRpcTimeout);
    if (!marked.ok()) {
      st_.set_resync(fmt::format("failed: {}", std::string(marked.status().message())));
      return;
    }
    spdlog::warn("group {}: verify: peer {} restores {} range(s), {} bytes: {}", job_.group,
                 job_.peer, ranges_.size(), bytes, marked->message());
    // Done once the peer redialled, restored (copy pending until confirmed) and streams again.
    const core::Nanos deadline =
        MonotonicNow() + std::chrono::nanoseconds(job_.resync_timeout).count();
    while (MonotonicNow() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      if (!Report(false)) {
        st_.set_resync("failed: cancelled while restoring (the restore goes on)");
        return;
      }
      const std::optional<v1::PeerStatus> p = job_.peer_status ? job_.peer_status() : std::nullopt;
      if (!p || p->dials() <= dials_before || p->link_state() != "streaming" || p->copy_pending() ||
          !p->confirmed()) {
        continue;
      }
      // The peer streams again after a handshake since the mark: the restore (decided in that
      // handshake) is complete. Proof, not inference: the ranges are compared again.
      auto still = Recheck();
      if (!still.ok()) {
        st_.set_resync(fmt::format("failed: {}", std::string(still.status().message())));
        return;
      }
      if (*still == 0) {
        st_.set_resync(ranges_truncated_ ? "done (only the listed ranges; verify again)" : "done");
        st_.set_resynced_bytes(bytes);
        return;
      }
      spdlog::info("group {}: verify: {} chunk(s) at peer {} not yet equal after the restore",
                   job_.group, *still, job_.peer);
      std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    st_.set_resync(fmt::format("failed: the restore did not complete within {} s",
                               job_.resync_timeout.count() / 1000));
  }

  GroupRuntime& runtime_;
  VerifyPeer& peer_;
  const VerifyJob& job_;
  const std::function<bool(const v1::VerifyStatus&)>& progress_;
  core::VerifyPlan plan_;
  core::VerifyPacer pacer_;
  std::deque<Pending> retry_;
  std::vector<core::Extent> ranges_;
  bool ranges_truncated_ = false;
  bool cancelled_ = false;
  core::Nanos started_ = 0;
  core::Nanos next_report_ = 0;
  v1::VerifyStatus st_;
};

}  // namespace

absl::StatusOr<core::ChunkSample> SampleChunk(GroupRuntime& runtime, const core::VerifyChunk& chunk,
                                              std::string& buffer, int attempts) {
  if (chunk.volume >= runtime.volume_count() ||
      chunk.offset > runtime.volume(chunk.volume).size() ||
      chunk.length > runtime.volume(chunk.volume).size() - chunk.offset || chunk.length == 0) {
    return absl::InvalidArgumentError(
        fmt::format("group {}: verify chunk volume {} {}+{} is not inside the group's volumes",
                    runtime.name(), chunk.volume, chunk.offset, chunk.length));
  }
  buffer.resize(chunk.length);
  core::ChunkSample sample;
  for (int i = 0; i < std::max(attempts, 1); ++i) {
    core::ChunkRead read;
    read.track_from = runtime.write_track_from();
    read.last_write_before = runtime.LastWriteLsn(chunk.volume, chunk.offset, chunk.length);
    read.applied_before = runtime.applied_lsn();
    if (absl::Status st = runtime.volume(chunk.volume)
                              .Read(chunk.offset, std::span<char>(buffer.data(), buffer.size()));
        !st.ok()) {
      return absl::Status(st.code(), fmt::format("group {}: verify: {}", runtime.name(),
                                                 std::string(st.message())));
    }
    read.last_write_after = runtime.LastWriteLsn(chunk.volume, chunk.offset, chunk.length);
    const XXH128_hash_t h = XXH3_128bits(buffer.data(), buffer.size());
    sample = core::SampleFromRead(read, h.high64, h.low64);
    if (sample.stable) break;
  }
  return sample;
}

v1::ChunkHash ToProto(const core::ChunkSample& s) {
  v1::ChunkHash h;
  h.set_hash_high(s.hash_high);
  h.set_hash_low(s.hash_low);
  h.set_stable(s.stable);
  h.set_last_write(s.last_write);
  h.set_valid_from(s.valid_from);
  h.set_valid_to(s.valid_to);
  return h;
}

core::ChunkSample FromProto(const v1::ChunkHash& h) {
  core::ChunkSample s;
  s.hash_high = h.hash_high();
  s.hash_low = h.hash_low();
  s.stable = h.stable();
  s.last_write = h.last_write();
  s.valid_from = h.valid_from();
  s.valid_to = h.valid_to();
  return s;
}

v1::VerifyStatus RunVerify(GroupRuntime& runtime, VerifyPeer& peer, const VerifyJob& job,
                           const std::function<bool(const v1::VerifyStatus&)>& progress) {
  Run run(runtime, peer, job, progress);
  return run.Go();
}

}  // namespace tvilling::node
