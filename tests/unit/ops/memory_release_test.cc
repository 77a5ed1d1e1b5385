// tvillingd's allocator set-up on the real jemalloc (this binary is linked with it, as tvillingd
// is): the oversize arena keeps freed pages, and the releaser gives them back when no records are
// appended, never while they are, however busy or idle the allocator itself looks.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "agent/allocator.h"

namespace tvilling {
namespace {

void* volatile sink = nullptr;  // keeps the compiler from eliding malloc/free pairs

// Frees `bytes` of touched memory in the oversize arena, which ConfigureAllocator made keep it.
void LeaveKeptPages(size_t bytes) {
  char* p = static_cast<char*>(std::malloc(bytes));
  ASSERT_NE(p, nullptr);
  std::memset(p, 1, bytes);
  sink = p;
  std::free(p);
}

constexpr size_t kKept = 64u << 20;

class MemoryReleaseTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    unsetenv("MALLOC_CONF");  // as tvillingd starts when the operator set nothing
    ConfigureAllocator();
  }
};

TEST_F(MemoryReleaseTest, TheOversizeArenaKeepsFreedPagesUntilReleased) {
  ASSERT_NE(DescribeAllocator().find("dirty_decay_ms -1"), std::string::npos)
      << DescribeAllocator();
  LeaveKeptPages(kKept);
  EXPECT_GE(SampleAllocator().unused_bytes, kKept);
  ASSERT_TRUE(ReleaseUnusedMemory());
  EXPECT_LT(SampleAllocator().unused_bytes, kKept / 4);
}

TEST_F(MemoryReleaseTest, ReleasesWhenNoRecordsAreAppended) {
  LeaveKeptPages(kKept);
  std::atomic<uint64_t> records{5'000'000};
  MemoryReleaser releaser([&] { return records.load(); }, std::chrono::milliseconds(100));
  releaser.Start();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (releaser.releases() == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  releaser.Stop();
  EXPECT_GE(releaser.releases(), 1u);
  EXPECT_LT(SampleAllocator().unused_bytes, kKept / 4);
}

TEST_F(MemoryReleaseTest, KeepsThePagesWhileRecordsAreAppended) {
  LeaveKeptPages(kKept);
  // A steady stream of records (kQuietRecords per 20 ms, far more than one per interval) while
  // the allocator sees next to nothing: the case its own counters took for idle.
  std::atomic<uint64_t> records{0};
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    while (!stop.load()) {
      records.fetch_add(kQuietRecords);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  MemoryReleaser releaser([&] { return records.load(); }, std::chrono::milliseconds(500));
  releaser.Start();
  std::this_thread::sleep_for(std::chrono::milliseconds(2000));
  releaser.Stop();
  stop = true;
  writer.join();
  EXPECT_EQ(releaser.releases(), 0u);
  EXPECT_GE(SampleAllocator().unused_bytes, kKept);
}

TEST_F(MemoryReleaseTest, StopsPromptlyAndTwice) {
  MemoryReleaser releaser([] { return uint64_t{0}; }, std::chrono::hours(1));
  releaser.Start();
  const auto start = std::chrono::steady_clock::now();
  releaser.Stop();
  releaser.Stop();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

}  // namespace
}  // namespace tvilling
