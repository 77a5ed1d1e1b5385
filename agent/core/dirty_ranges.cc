// dirty_ranges.cc: coalescing of a volume's dirty ranges and their cut into writeback chunks.
#include "agent/core/dirty_ranges.h"

#include <algorithm>
#include <cassert>
#include <limits>
#include <utility>

namespace tvilling::core {
namespace {

constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();

uint64_t AlignDown(uint64_t v, uint64_t granule) { return v - v % granule; }

// Rounds up to the granule, or to 2^64 - 1 where that would overflow.
uint64_t AlignUpSaturating(uint64_t v, uint64_t granule) {
  const uint64_t rem = v % granule;
  if (rem == 0) return v;
  const uint64_t add = granule - rem;
  return v > kMax - add ? kMax : v + add;
}

}  // namespace

DirtyRanges::DirtyRanges(size_t max_ranges) : max_ranges_(max_ranges) { assert(max_ranges_ >= 1); }

void DirtyRanges::Add(uint64_t offset, uint64_t length) {
  if (length == 0) return;
  const uint64_t end = offset > kMax - length ? kMax : offset + length;
  Insert(AlignDown(offset, granule_), AlignUpSaturating(end, granule_));
  while (ranges_.size() > max_ranges_) Coarsen();
}

void DirtyRanges::Insert(uint64_t start, uint64_t end) {
  assert(start < end);
  // Merge with the range before `start` if it overlaps or touches it, then swallow every range
  // that starts within [start, end].
  auto it = ranges_.upper_bound(start);
  if (it != ranges_.begin()) {
    auto prev = std::prev(it);
    if (prev->second >= start) {
      start = prev->first;
      end = std::max(end, prev->second);
      dirty_bytes_ -= prev->second - prev->first;
      ranges_.erase(prev);
    }
  }
  while (it != ranges_.end() && it->first <= end) {
    end = std::max(end, it->second);
    dirty_bytes_ -= it->second - it->first;
    it = ranges_.erase(it);
  }
  ranges_.emplace_hint(it, start, end);
  dirty_bytes_ += end - start;
}

void DirtyRanges::Coarsen() {
  // Doubling the granule at least halves the count of ranges that fit in any span, and once the
  // granule exceeds the whole span everything is one range: the loop in Add ends.
  granule_ = granule_ > kMax / 2 ? kMax : granule_ * 2;
  std::map<uint64_t, uint64_t> old;
  old.swap(ranges_);
  dirty_bytes_ = 0;
  for (const auto& [start, end] : old) {
    Insert(AlignDown(start, granule_), AlignUpSaturating(end, granule_));
  }
}

std::vector<WritebackChunk> DirtyRanges::TakeChunks(uint64_t chunk_bytes) {
  std::vector<WritebackChunk> chunks;
  WritebackChunk open;  // consecutive ranges gathered so far (dirty_bytes 0: none)
  auto close = [&] {
    if (open.dirty_bytes > 0) chunks.push_back(open);
    open = WritebackChunk{};
  };
  for (const auto& [start, end] : ranges_) {
    uint64_t pos = start;
    while (pos < end) {
      const uint64_t left = end - pos;
      if (chunk_bytes == 0) {
        chunks.push_back({pos, left, left});
        break;
      }
      if (open.dirty_bytes > 0 && open.dirty_bytes + std::min(left, chunk_bytes) > chunk_bytes) {
        close();
      }
      const uint64_t take = std::min(left, chunk_bytes - open.dirty_bytes);
      if (open.dirty_bytes == 0) open.offset = pos;
      open.length = pos + take - open.offset;
      open.dirty_bytes += take;
      pos += take;
      if (open.dirty_bytes == chunk_bytes) close();
    }
  }
  close();
  ranges_.clear();
  dirty_bytes_ = 0;
  granule_ = kDirtyGranuleBytes;
  return chunks;
}

}  // namespace tvilling::core
