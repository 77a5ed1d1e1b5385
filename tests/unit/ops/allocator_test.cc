// When tvillingd gives the pages its allocator keeps back to the kernel (agent/allocator.h).
#include "agent/allocator.h"

#include <gtest/gtest.h>

namespace tvilling {
namespace {

TEST(ShouldReleaseMemoryTest, KeepsFreedPagesWhileRecordsAreAppended) {
  EXPECT_FALSE(ShouldReleaseMemory(1'000'000, 1'000'000 + kQuietRecords, {300ull << 20}));
}

TEST(ShouldReleaseMemoryTest, ReleasesWhenQuietForAnInterval) {
  EXPECT_TRUE(ShouldReleaseMemory(1'000'000, 1'000'000 + kQuietRecords - 1, {300ull << 20}));
  EXPECT_TRUE(ShouldReleaseMemory(7, 7, {kMinReleaseBytes}));
}

TEST(ShouldReleaseMemoryTest, NothingToReleaseWhenNothingIsKept) {
  EXPECT_FALSE(ShouldReleaseMemory(5, 5, {0}));
  EXPECT_FALSE(ShouldReleaseMemory(5, 5, {kMinReleaseBytes - 1}));
}

// One memtable's worth of the oversize arena's pages stays; only what is beyond it counts.
constexpr MemoryKeep kKeep{256ull << 20, 32ull << 20};

TEST(ShouldReleaseMemoryTest, WhatIsKeptIsNotReleasedWhenQuiet) {
  EXPECT_FALSE(ShouldReleaseMemory(5, 5, {256ull << 20, 256ull << 20}, kKeep));
  EXPECT_FALSE(ShouldReleaseMemory(5, 5, {100ull << 20, 100ull << 20}, kKeep));
  // The other arenas' freed pages, and the oversize arena's beyond the memtable, go.
  EXPECT_TRUE(ShouldReleaseMemory(5, 5, {(256ull + 8) << 20, 256ull << 20}, kKeep));
  EXPECT_TRUE(ShouldReleaseMemory(5, 5, {300ull << 20, 300ull << 20}, kKeep));
  // Kept only where the arena has it: 64 MiB elsewhere is not covered by the keep.
  EXPECT_TRUE(ShouldReleaseMemory(5, 5, {64ull << 20, 0}, kKeep));
}

TEST(ShouldReleaseMemoryTest, TheCapCountsWhatIsBeyondTheKeep) {
  EXPECT_FALSE(ShouldReleaseMemory(0, 10 * kQuietRecords,
                                   {kMaxUnusedBytes + (256ull << 20), 256ull << 20}, kKeep));
  EXPECT_TRUE(ShouldReleaseMemory(0, 10 * kQuietRecords,
                                  {kMaxUnusedBytes + (256ull << 20) + 1, 256ull << 20}, kKeep));
}

TEST(ShouldReleaseMemoryTest, ReleasesOverTheCapEvenWhileBusy) {
  EXPECT_FALSE(ShouldReleaseMemory(0, 10 * kQuietRecords, {kMaxUnusedBytes}));
  EXPECT_TRUE(ShouldReleaseMemory(0, 10 * kQuietRecords, {kMaxUnusedBytes + 1}));
}

}  // namespace
}  // namespace tvilling
