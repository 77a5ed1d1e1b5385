// dirty_ranges_test.cc: coalescing of a volume's dirty ranges, the bound on their number, and the
// cut into paced writeback chunks (issue 4: the async lag tail behind checkpoints).
#include "agent/core/dirty_ranges.h"

#include <gtest/gtest.h>

#include <limits>
#include <random>

#include "tests/unit/core/units.h"

namespace tvilling::core {
namespace {

TEST(DirtyRanges, WidensToPagesAndMergesOverlappingAndAdjacent) {
  DirtyRanges d;
  d.Add(100, 10);  // -> [0, 4K)
  EXPECT_EQ(d.range_count(), 1u);
  EXPECT_EQ(d.dirty_bytes(), 4 * kKiB);
  d.Add(4 * kKiB, 4 * kKiB);  // adjacent -> [0, 8K)
  d.Add(16 * kKiB, 1);        // -> [16K, 20K)
  d.Add(0, 0);                // ignored
  EXPECT_EQ(d.range_count(), 2u);
  d.Add(6 * kKiB, 11 * kKiB);  // [4K, 20K) after widening: joins both
  EXPECT_EQ(d.range_count(), 1u);
  EXPECT_EQ(d.dirty_bytes(), 20 * kKiB);
  EXPECT_EQ(d.TakeChunks(0), (std::vector<WritebackChunk>{{0, 20 * kKiB, 20 * kKiB}}));
  EXPECT_TRUE(d.empty());
  EXPECT_EQ(d.dirty_bytes(), 0u);
}

TEST(DirtyRanges, ARangeInsideAnotherChangesNothing) {
  DirtyRanges d;
  d.Add(kMiB, kMiB);
  d.Add(kMiB + 8 * kKiB, 4 * kKiB);
  EXPECT_EQ(d.TakeChunks(0), (std::vector<WritebackChunk>{{kMiB, kMiB, kMiB}}));
}

TEST(DirtyRanges, ARangeSpanningSeveralSwallowsThem) {
  DirtyRanges d;
  for (uint64_t i = 0; i < 10; ++i) d.Add(i * 64 * kKiB, 4 * kKiB);
  EXPECT_EQ(d.range_count(), 10u);
  d.Add(60 * kKiB, 600 * kKiB);  // from inside the first gap to past the last range
  EXPECT_EQ(d.TakeChunks(0), (std::vector<WritebackChunk>{
                                 {0, 4 * kKiB, 4 * kKiB},
                                 {60 * kKiB, 600 * kKiB, 600 * kKiB},
                             }));
}

TEST(DirtyRanges, ChunksGatherNearbyRangesUpToTheChunkSize) {
  DirtyRanges d;
  // Eight 64 KiB writes 1 MiB apart: 512 KiB dirty over a span of 7 MiB + 64 KiB.
  for (uint64_t i = 0; i < 8; ++i) d.Add(i * kMiB, 64 * kKiB);
  const auto chunks = d.TakeChunks(256 * kKiB);
  ASSERT_EQ(chunks.size(), 2u);
  EXPECT_EQ(chunks[0], (WritebackChunk{0, 3 * kMiB + 64 * kKiB, 256 * kKiB}));
  EXPECT_EQ(chunks[1], (WritebackChunk{4 * kMiB, 3 * kMiB + 64 * kKiB, 256 * kKiB}));
}

TEST(DirtyRanges, ALargeRangeIsCutAndARangeThatDoesNotFitStartsANewChunk) {
  DirtyRanges d;
  d.Add(0, 12 * kKiB);
  d.Add(kMiB, 10 * kMiB + 4 * kKiB);
  const auto chunks = d.TakeChunks(4 * kMiB);
  EXPECT_EQ(chunks, (std::vector<WritebackChunk>{
                        {0, 12 * kKiB, 12 * kKiB},
                        {kMiB, 4 * kMiB, 4 * kMiB},
                        {5 * kMiB, 4 * kMiB, 4 * kMiB},
                        {9 * kMiB, 2 * kMiB + 4 * kKiB, 2 * kMiB + 4 * kKiB},
                    }));
}

// Whatever the pattern: the chunks cover every byte added, in order, without overlap, and none
// holds more than the chunk size of dirty data.
TEST(DirtyRanges, ChunksCoverEveryAddedByteAndRespectTheSize) {
  std::mt19937_64 rng(42);
  for (uint64_t chunk : {64 * kKiB, 4 * kMiB}) {
    DirtyRanges d(64);  // small bound: coarsening happens too
    std::vector<std::pair<uint64_t, uint64_t>> added;
    for (int i = 0; i < 2000; ++i) {
      const uint64_t off = rng() % (1ull << 30);
      const uint64_t len = 1 + rng() % (256 * kKiB);
      d.Add(off, len);
      added.emplace_back(off, off + len);
      ASSERT_LE(d.range_count(), 64u);
    }
    EXPECT_GT(d.granule_bytes(), kDirtyGranuleBytes);
    const auto chunks = d.TakeChunks(chunk);
    uint64_t prev_end = 0;
    for (const WritebackChunk& c : chunks) {
      EXPECT_GE(c.offset, prev_end);
      EXPECT_LE(c.dirty_bytes, chunk);
      EXPECT_GT(c.dirty_bytes, 0u);
      EXPECT_GE(c.length, c.dirty_bytes);
      prev_end = c.offset + c.length;
    }
    for (const auto& [start, end] : added) {
      // Every added range lies within the union of the chunks: walk it chunk by chunk.
      uint64_t pos = start;
      for (const WritebackChunk& c : chunks) {
        if (pos >= end) break;
        if (c.offset <= pos && pos < c.offset + c.length) pos = c.offset + c.length;
      }
      EXPECT_GE(pos, end) << "range " << start << ".." << end << " not covered";
    }
    EXPECT_TRUE(d.empty());
    EXPECT_EQ(d.granule_bytes(), kDirtyGranuleBytes);  // reset for the next checkpoint
  }
}

TEST(DirtyRanges, TheBoundCoarsensInsteadOfGrowing) {
  DirtyRanges d(4);
  for (uint64_t i = 0; i < 100; ++i) d.Add(i * 64 * kKiB, 4 * kKiB);
  EXPECT_LE(d.range_count(), 4u);
  EXPECT_GE(d.granule_bytes(), 64 * kKiB);
  const auto chunks = d.TakeChunks(0);
  ASSERT_FALSE(chunks.empty());
  EXPECT_EQ(chunks.front().offset, 0u);
  EXPECT_GE(chunks.back().offset + chunks.back().length, 99 * 64 * kKiB + 4 * kKiB);
}

TEST(DirtyRanges, RangesAtTheTopOfTheOffsetSpaceDoNotOverflow) {
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  DirtyRanges d(1);
  d.Add(kMax - 10, 100);  // cut at 2^64 - 1
  d.Add(0, 1);            // forces coarsening across the whole space
  EXPECT_EQ(d.range_count(), 1u);
  const auto chunks = d.TakeChunks(0);
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_EQ(chunks[0].offset, 0u);
  EXPECT_EQ(chunks[0].offset + chunks[0].length, kMax);
}

}  // namespace
}  // namespace tvilling::core
