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
  EXPECT_TRUE(ShouldReleaseMemory(7, 7, {1}));
}

TEST(ShouldReleaseMemoryTest, NothingToReleaseWhenNothingIsKept) {
  EXPECT_FALSE(ShouldReleaseMemory(5, 5, {0}));
}

TEST(ShouldReleaseMemoryTest, ReleasesOverTheCapEvenWhileBusy) {
  EXPECT_FALSE(ShouldReleaseMemory(0, 10 * kQuietRecords, {kMaxUnusedBytes}));
  EXPECT_TRUE(ShouldReleaseMemory(0, 10 * kQuietRecords, {kMaxUnusedBytes + 1}));
}

}  // namespace
}  // namespace tvilling
