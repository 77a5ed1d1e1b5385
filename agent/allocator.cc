// allocator.cc: tvillingd allocates with jemalloc (linked in, so every library's malloc is
// jemalloc's too), not glibc's malloc.
//
// Why (docs/benchmarks.md, "jemalloc"): every record is copied into RocksDB's memtable, which is
// freed and allocated again every few hundred MiB of writes. On glibc's malloc each 32 MiB
// memtable block was a mapping of its own, backed by transparent huge pages; glibc unmapped it when
// the memtable went and the next memtable faulted in new huge pages, each zeroed on the writing
// thread (a quarter of the NBD thread's CPU at 4 KiB QD16 on the VMs measured). With jemalloc's
// defaults the same run spends under 1 % zeroing and a 4 KiB write about a quarter less CPU. The
// price: a replicated GiB costs ~6 % more CPU (more page faults on the replication path's buffers)
// and the resident size is higher.
//
// An operator's MALLOC_CONF applies as usual (jemalloc reads it at start); the start-up log line
// shows what is in force.
#include "agent/allocator.h"

#include <fmt/format.h>
#include <sys/types.h>

#include <cstddef>

#if defined(TVILLING_JEMALLOC)
#include <jemalloc/jemalloc.h>
#endif

namespace tvilling {

#if defined(TVILLING_JEMALLOC)
namespace {

template <typename T>
bool Read(const char* name, T* out) {
  size_t len = sizeof(T);
  return mallctl(name, out, &len, nullptr, 0) == 0 && len == sizeof(T);
}

}  // namespace

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
  return fmt::format(
      "jemalloc {}, dirty_decay_ms {}, muzzy_decay_ms {}, oversize_threshold {}, narenas {}, thp "
      "{}",
      version, dirty_ms, muzzy_ms, oversize, arenas, thp != nullptr ? thp : "?");
}
#else
std::string DescribeAllocator() { return "the sanitizer's allocator (no jemalloc in this build)"; }
#endif

}  // namespace tvilling
