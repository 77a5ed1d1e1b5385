// allocator.h: which malloc tvillingd runs on, how it is set up, and when it gives freed memory
// back to the kernel.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

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

// What the allocator did so far: allocations made (a running count) and freed memory it still
// holds (dirty pages, resident but unused).
struct AllocatorSample {
  uint64_t allocations = 0;
  uint64_t unused_bytes = 0;
};

// The pages the oversize arena keeps go back to the kernel when tvillingd has been quiet for a
// whole interval (fewer than kQuietAllocations allocations), and at once when the allocator holds
// more than kMaxUnusedBytes unused (MemoryReleaser in main.cc, every kReleaseInterval).
inline constexpr std::chrono::seconds kReleaseInterval{10};
inline constexpr uint64_t kQuietAllocations = 20000;
inline constexpr uint64_t kMaxUnusedBytes = 1ull << 30;
inline bool ShouldReleaseMemory(const AllocatorSample& before, const AllocatorSample& now) {
  if (now.unused_bytes == 0) return false;
  if (now.unused_bytes > kMaxUnusedBytes) return true;
  return now.allocations - before.allocations < kQuietAllocations;
}

// The allocator's counters now; both 0 where they cannot be read (no jemalloc).
AllocatorSample SampleAllocator();
// Returns every unused page to the kernel (jemalloc: purges all arenas). False if not supported.
bool ReleaseUnusedMemory();

}  // namespace tvilling
