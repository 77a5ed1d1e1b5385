// allocator.h: which malloc tvillingd runs on, how it is set up, and when it gives freed memory
// back to the kernel.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace tvilling {

// Sets the allocator up for tvillingd, before anything large is allocated (allocator.cc says why):
// jemalloc's arena for oversize allocations (RocksDB's 32 MiB memtable blocks) keeps the pages it
// is given back instead of purging them at once. Leaves jemalloc as configured when the operator
// set MALLOC_CONF. Does nothing without jemalloc (sanitizer builds).
void ConfigureAllocator();

// "jemalloc 5.3.0-0-g54eaed1d8b56b1aa528be3bdd1877e59c56fa90c, dirty_decay_ms 10000, ..." (the
// settings in force, an operator's MALLOC_CONF and ConfigureAllocator's included), or what else
// allocates (a sanitizer's allocator in sanitizer builds).
std::string DescribeAllocator();

// The freed memory the allocator holds: dirty pages, resident but unused.
struct AllocatorSample {
  uint64_t unused_bytes = 0;
};

// The pages the oversize arena keeps go back to the kernel when tvillingd has been quiet for a
// whole interval (fewer than kQuietRecords log records appended in all groups: at that rate a
// memtable takes minutes to fill, so faulting its pages in again costs nothing that shows), and
// at once when the allocator holds more than kMaxUnusedBytes unused (MemoryReleaser, every
// kReleaseInterval). Quiet is judged by the log, not by the allocator's own counters: those
// count an allocation that a thread's cache serves only when the cache is refilled or flushed, so
// a thread allocating and freeing the same sizes at any rate can look idle to them.
inline constexpr std::chrono::seconds kReleaseInterval{10};
inline constexpr uint64_t kQuietRecords = 1000;
inline constexpr uint64_t kMaxUnusedBytes = 1ull << 30;
// `records_before` and `records_now`: a running count of records appended, an interval apart.
inline bool ShouldReleaseMemory(uint64_t records_before, uint64_t records_now,
                                const AllocatorSample& now) {
  if (now.unused_bytes == 0) return false;
  if (now.unused_bytes > kMaxUnusedBytes) return true;
  return records_now - records_before < kQuietRecords;
}

// The allocator's unused bytes now; 0 where they cannot be read (no jemalloc).
AllocatorSample SampleAllocator();
// Returns every unused page to the kernel (jemalloc: purges all arenas). False if not supported.
bool ReleaseUnusedMemory();

// Checks every `interval`, on a thread of its own, whether ShouldReleaseMemory, and if so
// releases. `records` returns the running count of log records appended (all groups) and must be
// safe to call from that thread. Its own thread because a purge of a few hundred MiB takes
// milliseconds to tens of milliseconds on a virtual machine, which no event loop serving I/O
// should wait for.
class MemoryReleaser {
 public:
  explicit MemoryReleaser(std::function<uint64_t()> records,
                          std::chrono::milliseconds interval = kReleaseInterval);
  ~MemoryReleaser();
  MemoryReleaser(const MemoryReleaser&) = delete;
  MemoryReleaser& operator=(const MemoryReleaser&) = delete;

  void Start();
  void Stop();  // returns once the thread has ended; idempotent
  uint64_t releases() const { return releases_.load(std::memory_order_relaxed); }

 private:
  void Run();

  const std::function<uint64_t()> records_;
  const std::chrono::milliseconds interval_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
  std::atomic<uint64_t> releases_{0};
};

}  // namespace tvilling
