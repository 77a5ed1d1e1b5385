// allocator.h: which malloc tvillingd runs on, how it is set up, and when it gives freed memory
// back to the kernel.
#pragma once

#include <algorithm>
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
  uint64_t unused_bytes = 0;           // all arenas
  uint64_t oversize_unused_bytes = 0;  // of those, the oversize arena's (the memtable's blocks)
};

// What the releaser keeps resident when it gives memory back: up to `bytes` of the oversize
// arena's freed pages, in pieces of `block_bytes` (the memtable's arena block, the size RocksDB
// asks for). One memtable's worth: when writes resume after a quiet spell the next memtable fills
// without faulting its pages in again (on the VMs measured a fault costs ~20 us, and a 256 MiB
// memtable of 4 KiB writes takes ~65k of them: docs/benchmarks.md, "Keeping a memtable's pages
// through a quiet spell"). Zero keeps nothing.
struct MemoryKeep {
  uint64_t bytes = 0;
  uint64_t block_bytes = 0;
};

// The pages the oversize arena keeps go back to the kernel when tvillingd has been quiet for a
// whole interval (fewer than kQuietRecords log records appended in all groups), and at once when
// the allocator holds more than kMaxUnusedBytes unused beyond what it keeps (MemoryReleaser,
// every kReleaseInterval); either way up to one memtable's worth stays (MemoryKeep). Quiet is
// judged by the log, not by the allocator's own counters: those count an allocation that a
// thread's cache serves only when the cache is refilled or flushed, so a thread allocating and
// freeing the same sizes at any rate can look idle to them.
inline constexpr std::chrono::seconds kReleaseInterval{10};
inline constexpr uint64_t kQuietRecords = 1000;
inline constexpr uint64_t kMaxUnusedBytes = 1ull << 30;
// Less than this to give back is not worth a purge (and would log one every interval while idle).
inline constexpr uint64_t kMinReleaseBytes = 4ull << 20;
// `records_before` and `records_now`: a running count of records appended, an interval apart.
inline bool ShouldReleaseMemory(uint64_t records_before, uint64_t records_now,
                                const AllocatorSample& now, const MemoryKeep& keep = {}) {
  const uint64_t kept = std::min(now.oversize_unused_bytes, keep.bytes);
  const uint64_t releasable = now.unused_bytes > kept ? now.unused_bytes - kept : 0;
  if (releasable < kMinReleaseBytes) return false;
  if (releasable > kMaxUnusedBytes) return true;
  return records_now - records_before < kQuietRecords;
}

// The allocator's unused bytes now; 0 where they cannot be read (no jemalloc).
AllocatorSample SampleAllocator();
// Returns every unused page to the kernel (jemalloc: purges all arenas) but those `keep` names.
// False if not supported.
bool ReleaseUnusedMemory(const MemoryKeep& keep = {});

// Checks every `interval`, on a thread of its own, whether ShouldReleaseMemory, and if so
// releases. `records` returns the running count of log records appended (all groups) and must be
// safe to call from that thread. Its own thread because a purge of a few hundred MiB takes
// milliseconds to tens of milliseconds on a virtual machine, which no event loop serving I/O
// should wait for.
class MemoryReleaser {
 public:
  explicit MemoryReleaser(std::function<uint64_t()> records, MemoryKeep keep = {},
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
  const MemoryKeep keep_;
  const std::chrono::milliseconds interval_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
  std::atomic<uint64_t> releases_{0};
};

}  // namespace tvilling
