// When tvillingd gives the pages its allocator keeps back to the kernel (agent/allocator.h).
#include "agent/allocator.h"

#include <gtest/gtest.h>

namespace tvilling {
namespace {

TEST(ShouldReleaseMemoryTest, KeepsFreedPagesWhileBusy) {
  const AllocatorSample before{1'000'000, 0};
  const AllocatorSample now{1'000'000 + kQuietAllocations, 300ull << 20};
  EXPECT_FALSE(ShouldReleaseMemory(before, now));
}

TEST(ShouldReleaseMemoryTest, ReleasesWhenQuietForAnInterval) {
  const AllocatorSample before{1'000'000, 300ull << 20};
  const AllocatorSample now{1'000'000 + kQuietAllocations - 1, 300ull << 20};
  EXPECT_TRUE(ShouldReleaseMemory(before, now));
}

TEST(ShouldReleaseMemoryTest, NothingToReleaseWhenNothingIsKept) {
  EXPECT_FALSE(ShouldReleaseMemory({5, 0}, {5, 0}));
}

TEST(ShouldReleaseMemoryTest, ReleasesOverTheCapEvenWhileBusy) {
  const AllocatorSample before{0, 0};
  EXPECT_FALSE(ShouldReleaseMemory(before, {10 * kQuietAllocations, kMaxUnusedBytes}));
  EXPECT_TRUE(ShouldReleaseMemory(before, {10 * kQuietAllocations, kMaxUnusedBytes + 1}));
}

}  // namespace
}  // namespace tvilling
