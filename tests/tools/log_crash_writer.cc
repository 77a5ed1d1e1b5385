// log_crash_writer: appends self-describing records to a group log as fast as it can, from two
// threads, with FUA appends and periodic syncs, and prints "durable <lsn>" each time the log
// confirms durability. tests/unit/storage/log_crash_test.cc kills it with SIGKILL at random moments
// and checks that everything it reported durable survived and that the log has no gap.
//
// Usage: log_crash_writer DIR SEED [EXTERNAL_PAYLOAD_MIN_BYTES]
// (default 0: every payload in RocksDB; 4096 puts about half of them in payload files)
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>

#include "storage/group_log.h"

using namespace tvilling::storage;

namespace {

void Report(uint64_t lsn) {
  char line[64];
  int n = snprintf(line, sizeof line, "durable %llu\n", static_cast<unsigned long long>(lsn));
  // One write(2) per line: a SIGKILL cannot leave half a line behind.
  (void)!write(STDOUT_FILENO, line, static_cast<size_t>(n));
}

}  // namespace

// The payload of a record at `offset` is the offset's 8 bytes repeated: self-describing, so a
// reader can tell a record's payload was not mixed up with another's.
std::string PayloadFor(uint64_t offset, size_t size) {
  std::string p(size, '\0');
  for (size_t i = 0; i + 8 <= size; i += 8) std::memcpy(p.data() + i, &offset, 8);
  return p;
}

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    fprintf(stderr, "usage: %s DIR SEED [EXTERNAL_PAYLOAD_MIN_BYTES]\n", argv[0]);
    return 2;
  }
  auto store = LogStore::Open({.dir = argv[1], .write_buffer_bytes = 8 << 20});
  if (!store.ok()) {
    fprintf(stderr, "%s\n", std::string(store.status().message()).c_str());
    return 1;
  }
  GroupLogOptions options;
  options.max_batch_records = 64;
  options.external_payload_min_bytes = argc == 4 ? std::stoull(argv[3]) : 0;
  auto log = (*store)->OpenGroup("g0", options);
  if (!log.ok()) {
    fprintf(stderr, "%s\n", std::string(log.status().message()).c_str());
    return 1;
  }
  GroupLog* g = *log;
  const unsigned seed = static_cast<unsigned>(std::stoul(argv[2]));
  std::atomic<int> inflight{0};
  auto writer = [&](unsigned s) {
    std::mt19937_64 rng(s);
    for (;;) {
      while (inflight.load() > 128) std::this_thread::yield();
      const size_t size = 8 * (1 + rng() % 2048);  // 8 B .. 16 KiB
      const uint64_t offset = (rng() % (1 << 20)) * 512;
      const bool fua = rng() % 16 == 0;
      AppendRequest r;
      r.offset = offset;
      r.length = static_cast<uint32_t>(size);
      r.payload = Bytes::Copy(PayloadFor(offset, size));
      r.sync = fua;
      inflight.fetch_add(1);
      g->Append(std::move(r), [&, fua](absl::StatusOr<uint64_t> lsn) {
        inflight.fetch_sub(1);
        if (!lsn.ok()) _exit(3);
        if (fua) Report(*lsn);
      });
    }
  };
  std::thread t1(writer, seed), t2(writer, seed * 7919 + 1);
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    const uint64_t target = g->last_lsn();
    g->Sync([target](absl::Status st) {
      if (!st.ok()) _exit(4);
      Report(target);
    });
  }
}
