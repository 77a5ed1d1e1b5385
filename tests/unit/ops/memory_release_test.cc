// tvillingd's allocator set-up on the real jemalloc (this binary is linked with it, as tvillingd
// is): the oversize arena keeps freed pages, and the releaser gives them back when no records are
// appended, never while they are, however busy or idle the allocator itself looks.
#include <gtest/gtest.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

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
    // The tests count page faults to tell kept pages from given-back ones: in 4 KiB pages, not
    // in the huge pages tvillingd's jemalloc asks for (thp:always), which fault 512 at a time.
    prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0);
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

// Minor page faults of the calling thread so far.
long ThreadMinorFaults() {
  rusage u{};
  getrusage(RUSAGE_THREAD, &u);
  return u.ru_minflt;
}

// Pages the test's thread faults in to allocate and write `blocks` blocks of `block` bytes.
long FaultsToFill(size_t blocks, size_t block) {
  std::vector<char*> ps;
  const long before = ThreadMinorFaults();
  for (size_t i = 0; i < blocks; ++i) {
    ps.push_back(static_cast<char*>(std::malloc(block)));
    std::memset(ps.back(), 2, block);
    sink = ps.back();
  }
  const long faults = ThreadMinorFaults() - before;
  for (char* p : ps) std::free(p);
  return faults;
}

TEST_F(MemoryReleaseTest, KeepsOneMemtablesBlocksThroughARelease) {
  constexpr size_t kBlock = 16u << 20;
  constexpr MemoryKeep kKeep{2 * kBlock, kBlock};
  ASSERT_TRUE(ReleaseUnusedMemory());
  // Four blocks written and freed (a memtable of 4 x 16 MiB flushed): the arena holds 64 MiB.
  FaultsToFill(4, kBlock);
  const AllocatorSample before = SampleAllocator();
  ASSERT_GE(before.oversize_unused_bytes, 4 * kBlock);
  ASSERT_TRUE(ReleaseUnusedMemory(kKeep));
  const AllocatorSample after = SampleAllocator();
  // Two blocks stay, the rest is gone.
  EXPECT_GE(after.oversize_unused_bytes, 2 * kBlock);
  EXPECT_LT(after.oversize_unused_bytes, 3 * kBlock);
  // The next two blocks reuse the kept pages: next to no faults (4,096 pages would fault if
  // they had gone back), and the two after them fault as new memory does.
  const long reused = FaultsToFill(2, kBlock);
  EXPECT_LT(reused, 400) << "the kept blocks were faulted in again";
  ASSERT_TRUE(ReleaseUnusedMemory(kKeep));
  // Two of the four blocks are kept, two are new: 2 x 4,096 pages to fault; at least half seen.
  const long new_pages = 2 * static_cast<long>(kBlock / 4096);
  EXPECT_GT(FaultsToFill(4, kBlock), new_pages / 2)
      << "the faults of new memory were not seen: the test cannot tell kept from released";
}

TEST_F(MemoryReleaseTest, ReleasesWhenNoRecordsAreAppended) {
  LeaveKeptPages(kKept);
  std::atomic<uint64_t> records{5'000'000};
  MemoryReleaser releaser([&] { return records.load(); }, MemoryKeep{},
                          std::chrono::milliseconds(100));
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
  MemoryReleaser releaser([&] { return records.load(); }, MemoryKeep{},
                          std::chrono::milliseconds(500));
  releaser.Start();
  std::this_thread::sleep_for(std::chrono::milliseconds(2000));
  releaser.Stop();
  stop = true;
  writer.join();
  EXPECT_EQ(releaser.releases(), 0u);
  EXPECT_GE(SampleAllocator().unused_bytes, kKept);
}

TEST_F(MemoryReleaseTest, StopsPromptlyAndTwice) {
  MemoryReleaser releaser([] { return uint64_t{0}; }, MemoryKeep{}, std::chrono::hours(1));
  releaser.Start();
  const auto start = std::chrono::steady_clock::now();
  releaser.Stop();
  releaser.Stop();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

}  // namespace
}  // namespace tvilling
