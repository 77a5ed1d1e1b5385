// dirty_ranges.h: the byte ranges of a volume the applier wrote since the last checkpoint, and how
// to write them back in paced chunks (docs/operations.md, "Checkpoints and the log's fsyncs").
//
// Why: one fdatasync of a volume pushes every dirty page (up to checkpoint_bytes, 16 MiB) into the
// disk's queue at once, and a log fsync issued meanwhile (a FLUSH, FUA, or a replica's `durable`
// ack) waits behind all of it. Written back a chunk at a time, each chunk waited for before the
// next is started, a log fsync waits for at most one chunk; the fdatasync that follows then has
// little left to write. The ranges only pace the work: durability still comes from the fdatasync,
// which writes whatever the ranges missed.
//
// Pure: no I/O, no threads, no clock. Not thread-safe (the runtime guards it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

namespace tvilling::core {

// Ranges start at this granularity (a page: the unit the kernel writes back).
inline constexpr uint64_t kDirtyGranuleBytes = 4096;
// At most this many disjoint ranges are kept per volume (~50 bytes each); beyond it the granule
// doubles and ranges are widened and merged, so memory stays bounded whatever the write pattern.
// Widening only adds clean pages to a range, which writeback skips.
inline constexpr size_t kDirtyMaxRanges = 16384;

// One piece of writeback: [offset, offset + length) holds at most about `dirty_bytes` of dirty
// data (the sum of the ranges it spans), and length >= dirty_bytes.
struct WritebackChunk {
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t dirty_bytes = 0;
  bool operator==(const WritebackChunk&) const = default;
};

class DirtyRanges {
 public:
  // REQUIRES: max_ranges >= 1.
  explicit DirtyRanges(size_t max_ranges = kDirtyMaxRanges);

  // Notes [offset, offset + length) as dirty, widened to the current granule; overlapping and
  // adjacent ranges merge. An empty range is ignored. A range reaching past 2^64 is cut there.
  void Add(uint64_t offset, uint64_t length);

  // The noted ranges, in offset order, grouped into chunks of at most `chunk_bytes` dirty bytes:
  // consecutive ranges share a chunk while their dirty bytes fit (the clean gaps between them
  // cost the kernel nothing), and a range larger than `chunk_bytes` is cut into pieces of that
  // size. `chunk_bytes` 0: one chunk per range. Clears the ranges and resets the granule.
  std::vector<WritebackChunk> TakeChunks(uint64_t chunk_bytes);

  bool empty() const { return ranges_.empty(); }
  size_t range_count() const { return ranges_.size(); }
  uint64_t granule_bytes() const { return granule_; }
  // Sum of the ranges' lengths (as widened).
  uint64_t dirty_bytes() const { return dirty_bytes_; }

 private:
  void Insert(uint64_t start, uint64_t end);
  void Coarsen();

  size_t max_ranges_;
  uint64_t granule_ = kDirtyGranuleBytes;
  std::map<uint64_t, uint64_t> ranges_;  // start -> end (exclusive), disjoint, not adjacent
  uint64_t dirty_bytes_ = 0;
};

}  // namespace tvilling::core
