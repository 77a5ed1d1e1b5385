// verify.cc: chunk planning, the consistency rule and pacing of an online verify (verify.h).
#include "agent/core/verify.h"

#include <algorithm>
#include <cassert>
#include <string>

namespace tvilling::core {

VerifyPlan::VerifyPlan(std::vector<uint64_t> volume_sizes, std::optional<uint32_t> only_volume,
                       uint64_t chunk_bytes)
    : sizes_(std::move(volume_sizes)), chunk_bytes_(std::max<uint64_t>(chunk_bytes, 1)) {
  volume_ = only_volume.value_or(0);
  end_volume_ = only_volume ? std::min<uint32_t>(*only_volume + 1, sizes_.size())
                            : static_cast<uint32_t>(sizes_.size());
  if (volume_ > end_volume_) volume_ = end_volume_;
  for (uint32_t v = volume_; v < end_volume_; ++v) {
    total_bytes_ += sizes_[v];
    total_chunks_ += (sizes_[v] + chunk_bytes_ - 1) / chunk_bytes_;
  }
  SkipEmpty();
}

void VerifyPlan::SkipEmpty() {
  while (volume_ < end_volume_ && offset_ >= sizes_[volume_]) {
    ++volume_;
    offset_ = 0;
  }
}

std::vector<VerifyChunk> VerifyPlan::Next(size_t max_chunks, uint64_t max_bytes) {
  std::vector<VerifyChunk> out;
  uint64_t bytes = 0;
  while (!done() && out.size() < max_chunks) {
    const uint64_t len = std::min(chunk_bytes_, sizes_[volume_] - offset_);
    if (!out.empty() && bytes + len > max_bytes) break;
    out.push_back({volume_, offset_, len});
    bytes += len;
    offset_ += len;
    SkipEmpty();
  }
  return out;
}

std::string CheckVerifyOptions(const std::vector<uint64_t>& volume_sizes,
                               std::optional<uint32_t> only_volume, uint64_t chunk_bytes) {
  if (only_volume && *only_volume >= volume_sizes.size()) {
    return "volume index " + std::to_string(*only_volume) + " is not in the group (it has " +
           std::to_string(volume_sizes.size()) + ")";
  }
  if (chunk_bytes == 0 || chunk_bytes % kWriteTrackBytes != 0 ||
      chunk_bytes > kVerifyMaxChunkBytes) {
    return "chunk size " + std::to_string(chunk_bytes) + " must be a multiple of " +
           std::to_string(kWriteTrackBytes) + " bytes, at most " +
           std::to_string(kVerifyMaxChunkBytes);
  }
  return {};
}

ChunkSample SampleFromRead(const ChunkRead& read, uint64_t hash_high, uint64_t hash_low) {
  ChunkSample s;
  s.hash_high = hash_high;
  s.hash_low = hash_low;
  s.last_write = read.last_write_before;
  // A record that set the note before the read and was still being written (note > applied), or
  // one that began during the read (the note changed): the bytes may be a mixture.
  s.stable = read.last_write_before == read.last_write_after &&
             read.last_write_before <= read.applied_before;
  s.valid_from = std::max(read.last_write_before, read.track_from);
  s.valid_to = read.applied_before;
  if (s.valid_from > s.valid_to) s.stable = false;  // tracking began after the applied LSN
  return s;
}

ChunkSample ExtendSample(ChunkSample sample, uint64_t last_write_now, uint64_t applied_now) {
  if (sample.stable && last_write_now == sample.last_write && applied_now > sample.valid_to) {
    sample.valid_to = applied_now;
  }
  return sample;
}

const char* ChunkVerdictName(ChunkVerdict v) {
  switch (v) {
    case ChunkVerdict::kMatch:
      return "match";
    case ChunkVerdict::kMismatch:
      return "mismatch";
    case ChunkVerdict::kRetry:
      return "retry";
  }
  return "?";
}

ChunkVerdict CompareChunk(const ChunkSample& primary, const ChunkSample& replica) {
  if (!primary.stable || !replica.stable) return ChunkVerdict::kRetry;
  const uint64_t from = std::max(primary.valid_from, replica.valid_from);
  const uint64_t to = std::min(primary.valid_to, replica.valid_to);
  if (from > to) return ChunkVerdict::kRetry;  // not the same LSN: no verdict
  return primary.hash_high == replica.hash_high && primary.hash_low == replica.hash_low
             ? ChunkVerdict::kMatch
             : ChunkVerdict::kMismatch;
}

uint64_t VerifyWaitLsn(const std::vector<ChunkSample>& primary_samples) {
  uint64_t lsn = 0;
  for (const ChunkSample& s : primary_samples) lsn = std::max(lsn, s.valid_from);
  return lsn;
}

Nanos VerifyPacer::Reserve(Nanos now, uint64_t bytes) {
  if (rate_ == 0) return now;
  constexpr Nanos kBurst = 100'000'000;  // 100 ms
  // next_: when everything booked so far is paid for at the rate; idle time earns at most a burst.
  // The bytes are paid before they are read (a large first batch waits too), so the mean rate
  // holds from the start and the ETA computed from it is right.
  const Nanos floor = now > kBurst ? now - kBurst : 0;
  next_ = std::max(next_, floor) + static_cast<Nanos>(static_cast<long double>(bytes) * 1e9L /
                                                      static_cast<long double>(rate_));
  return std::max(now, next_ > kBurst ? next_ - kBurst : 0);
}

VerifyRate VerifyRateAt(uint64_t done_bytes, uint64_t total_bytes, Nanos started_at, Nanos now) {
  VerifyRate r;
  if (now <= started_at || now - started_at < 1'000'000'000) return r;
  const double secs = static_cast<double>(now - started_at) / 1e9;
  r.bytes_per_s = static_cast<uint64_t>(static_cast<double>(done_bytes) / secs);
  if (r.bytes_per_s > 0 && total_bytes > done_bytes) {
    r.eta_s = static_cast<double>(total_bytes - done_bytes) / static_cast<double>(r.bytes_per_s);
  }
  return r;
}

bool AddMismatch(std::vector<Extent>& ranges, const VerifyChunk& chunk) {
  const Extent e{chunk.volume, chunk.offset, chunk.length};
  auto it = std::lower_bound(ranges.begin(), ranges.end(), e, [](const Extent& a, const Extent& b) {
    return a.volume != b.volume ? a.volume < b.volume : a.offset < b.offset;
  });
  // Join the range before it (ends where the chunk begins) or after it (begins where it ends).
  if (it != ranges.begin()) {
    Extent& prev = *(it - 1);
    if (prev.volume == e.volume && prev.offset + prev.length >= e.offset) {
      const uint64_t end = std::max(prev.offset + prev.length, e.offset + e.length);
      prev.length = end - prev.offset;
      if (it != ranges.end() && it->volume == prev.volume && it->offset <= end) {
        prev.length = std::max(end, it->offset + it->length) - prev.offset;
        ranges.erase(it);
      }
      return true;
    }
  }
  if (it != ranges.end() && it->volume == e.volume && e.offset + e.length >= it->offset) {
    const uint64_t end = std::max(it->offset + it->length, e.offset + e.length);
    it->offset = std::min(it->offset, e.offset);
    it->length = end - it->offset;
    return true;
  }
  if (ranges.size() >= kVerifyMaxListedRanges) return false;
  ranges.insert(it, e);
  return true;
}

}  // namespace tvilling::core
