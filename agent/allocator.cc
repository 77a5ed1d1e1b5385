// allocator.cc: tvillingd allocates with jemalloc (linked in, so every library's malloc is
// jemalloc's too), not glibc's malloc.
//
// Why (docs/benchmarks.md, "jemalloc"): every record is copied into RocksDB's memtable, which is
// freed and allocated again every few hundred MiB of writes. On glibc's malloc each 32 MiB
// memtable block was a mapping of its own, backed by transparent huge pages; glibc unmapped it when
// the memtable went and the next memtable faulted in new huge pages, each zeroed on the writing
// thread (a quarter of the NBD thread's CPU at 4 KiB QD16 on the VMs measured). With jemalloc's
// defaults the same run spends under 1 % zeroing and a 4 KiB write about a quarter less CPU.
//
// jemalloc puts allocations of oversize_threshold (8 MiB) and more, the memtable's blocks, in an
// arena of their own, and without background threads purges that arena at once (decay 0): each
// new memtable still faulted in every page, one minor fault per 4 KiB write, ~20 % of the agent's
// CPU (docs/benchmarks.md, "Keeping the memtable's pages"). ConfigureAllocator makes that arena
// keep its pages (dirty_decay_ms -1): the blocks are few and of one size, so the next memtable
// takes the last one's. Every other arena keeps jemalloc's decay: with -1 everywhere the
// replication path's buffers grew the resident size by GiBs. What the oversize arena keeps goes
// back when tvillingd is quiet or holds more than 1 GiB unused (ShouldReleaseMemory), all but one
// memtable's worth (MemoryKeep), which the next writes would otherwise fault in again.
//
// tvillingd's memory is on transparent huge pages (malloc_conf below): the replication path's
// buffers otherwise faulted in fresh 4 KiB pages at ~20 us each (docs/benchmarks.md, "Huge pages
// for jemalloc").
//
// An operator's MALLOC_CONF applies as usual (jemalloc reads it at start, over the compiled-in
// settings), and then tvillingd changes nothing at run time; the start-up log line shows what is
// in force.
#include "agent/allocator.h"

#include <fmt/format.h>
#include <pthread.h>
#include <spdlog/spdlog.h>
#include <sys/types.h>

#include <cstddef>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#if defined(TVILLING_JEMALLOC)
#include <jemalloc/jemalloc.h>
#endif

#if defined(TVILLING_JEMALLOC)
// jemalloc's settings compiled into tvillingd (jemalloc reads this variable at start, then the
// MALLOC_CONF environment variable, which overrides it key by key): its memory on transparent huge
// pages (jemalloc madvises them; with the kernel's THP "madvise" or "always"). On the VMs measured
// a page fault costs ~20 us, and the replication path's buffers (gRPC's slices, the batches)
// faulted in fresh 4 KiB pages all the time: a replicating pair spent 4.3-4.6 / 3.2-3.8 CPU s per
// GiB with huge pages against 6.8-7.4 / 4.4-9.1 without, and replicated 152-212 MiB/s against
// 82-159, for ~60-100 MiB more resident each (docs/benchmarks.md, "Huge pages for jemalloc").
const char* malloc_conf = "thp:always";
#endif

namespace tvilling {

#if defined(TVILLING_JEMALLOC)
namespace {

template <typename T>
bool Read(const char* name, T* out) {
  size_t len = sizeof(T);
  return mallctl(name, out, &len, nullptr, 0) == 0 && len == sizeof(T);
}

// The oversize arena's index once ConfigureAllocator has set it up, else -1.
int oversize_arena = -1;

}  // namespace

void ConfigureAllocator() {
  if (std::getenv("MALLOC_CONF") != nullptr) return;  // the operator's settings, as they are
  size_t threshold = 0;
  if (!Read("opt.oversize_threshold", &threshold) || threshold == 0) return;
  // The arena is made on the first oversize allocation: make one, and ask where it went.
  void* p = mallocx(threshold, 0);
  if (p == nullptr) return;
  unsigned ind = 0;
  size_t len = sizeof(ind);
  const int rc = mallctl("arenas.lookup", &ind, &len, &p, sizeof(p));
  dallocx(p, 0);
  if (rc != 0) return;
  ssize_t keep = -1;
  const std::string name = fmt::format("arena.{}.dirty_decay_ms", ind);
  if (mallctl(name.c_str(), nullptr, nullptr, &keep, sizeof(keep)) == 0) {
    oversize_arena = static_cast<int>(ind);
  }
}

std::string DescribeAllocator() {
  const char* version = nullptr;
  ssize_t dirty_ms = -1, muzzy_ms = -1;
  size_t oversize = 0;
  unsigned arenas = 0;
  const char* thp = nullptr;
  if (!Read("version", &version)) return "jemalloc (mallctl does not answer)";
  Read("opt.dirty_decay_ms", &dirty_ms);
  Read("opt.muzzy_decay_ms", &muzzy_ms);
  Read("opt.oversize_threshold", &oversize);
  Read("opt.narenas", &arenas);
  Read("opt.thp", &thp);
  std::string out = fmt::format(
      "jemalloc {}, dirty_decay_ms {}, muzzy_decay_ms {}, oversize_threshold {}, narenas {}, thp "
      "{}",
      version, dirty_ms, muzzy_ms, oversize, arenas, thp != nullptr ? thp : "?");
  ssize_t oversize_ms = 0;
  if (oversize_arena >= 0 &&
      Read(fmt::format("arena.{}.dirty_decay_ms", oversize_arena).c_str(), &oversize_ms)) {
    out += fmt::format(", oversize arena {} dirty_decay_ms {} (memtable blocks kept for reuse)",
                       oversize_arena, oversize_ms);
  }
  return out;
}

namespace {

// Refreshes the statistics read by DirtyBytes.
bool RefreshStats() {
  uint64_t epoch = 1;
  size_t len = sizeof(epoch);
  return mallctl("epoch", &epoch, &len, &epoch, len) == 0;
}

// Dirty (freed, resident) bytes of one arena, or of all of them (4096, MALLCTL_ARENAS_ALL).
uint64_t DirtyBytes(unsigned arena) {
  size_t dirty_pages = 0, page = 0;
  if (!Read(fmt::format("stats.arenas.{}.pdirty", arena).c_str(), &dirty_pages)) return 0;
  if (!Read("arenas.page", &page)) return 0;
  return uint64_t{dirty_pages} * page;
}

}  // namespace

AllocatorSample SampleAllocator() {
  AllocatorSample out;
  if (!RefreshStats()) return out;
  out.unused_bytes = DirtyBytes(4096);
  if (oversize_arena >= 0) out.oversize_unused_bytes = DirtyBytes(oversize_arena);
  return out;
}

bool ReleaseUnusedMemory(const MemoryKeep& keep) {
  // What to keep is taken out of the arena for the purge and handed back after it: jemalloc
  // serves each block from the freed (dirty) blocks first, and a block freed into the oversize
  // arena keeps its pages (dirty_decay_ms -1). A block that does not come from the freed pages
  // (their count does not fall) has none to keep and goes back at once.
  std::vector<void*> held;
  size_t threshold = 0;
  if (oversize_arena >= 0 && keep.bytes > 0 && Read("opt.oversize_threshold", &threshold) &&
      keep.block_bytes >= threshold && RefreshStats()) {
    uint64_t dirty = DirtyBytes(oversize_arena);
    for (uint64_t held_bytes = 0;
         held_bytes + keep.block_bytes <= keep.bytes && dirty >= keep.block_bytes;
         held_bytes += keep.block_bytes) {
      void* p = mallocx(keep.block_bytes, 0);
      if (p == nullptr) break;
      const uint64_t after = RefreshStats() ? DirtyBytes(oversize_arena) : dirty;
      if (after + keep.block_bytes / 2 > dirty) {
        dallocx(p, 0);
        break;
      }
      held.push_back(p);
      dirty = after;
    }
  }
  const bool ok = mallctl("arena.4096.purge", nullptr, nullptr, nullptr, 0) == 0;
  for (void* p : held) dallocx(p, 0);
  return ok;
}
#else
void ConfigureAllocator() {}
std::string DescribeAllocator() { return "the sanitizer's allocator (no jemalloc in this build)"; }
AllocatorSample SampleAllocator() { return {}; }
bool ReleaseUnusedMemory(const MemoryKeep&) { return false; }
#endif

MemoryReleaser::MemoryReleaser(std::function<uint64_t()> records, MemoryKeep keep,
                               std::chrono::milliseconds interval)
    : records_(std::move(records)), keep_(keep), interval_(interval) {}

MemoryReleaser::~MemoryReleaser() { Stop(); }

void MemoryReleaser::Start() {
  if (thread_.joinable()) return;
  thread_ = std::thread([this] { Run(); });
}

void MemoryReleaser::Stop() {
  {
    std::lock_guard l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void MemoryReleaser::Run() {
  pthread_setname_np(pthread_self(), "tvl-memory");
  uint64_t last = records_();
  std::unique_lock l(mu_);
  while (!cv_.wait_for(l, interval_, [this] { return stop_; })) {
    l.unlock();
    const uint64_t now = records_();
    const AllocatorSample sample = SampleAllocator();
    if (ShouldReleaseMemory(last, now, sample, keep_) && ReleaseUnusedMemory(keep_)) {
      releases_.fetch_add(1, std::memory_order_relaxed);
      const AllocatorSample after = SampleAllocator();
      spdlog::info(
          "memory: returned {} MiB of freed pages to the kernel, kept {} MiB for the next "
          "memtable ({} log records in {} ms)",
          (sample.unused_bytes - std::min(sample.unused_bytes, after.unused_bytes)) >> 20,
          after.oversize_unused_bytes >> 20, now - last, interval_.count());
    }
    last = now;
    l.lock();
  }
}

}  // namespace tvilling
