// group_log_powercut_test.cc: power cuts under the group log. A FaultEnv drops everything RocksDB
// wrote but did not fsync; after each cut every record the log reported durable must be back, the
// LSNs must still be dense, and numbering must continue where the durable log ends.
#include <gtest/gtest.h>

#include <atomic>
#include <future>
#include <random>
#include <thread>

#include "storage/group_log.h"
#include "tests/unit/storage/fault_env.h"
#include "tests/unit/storage/temp_dir.h"

namespace tvilling::storage {
namespace {

AppendRequest TaggedReq(uint64_t tag, bool sync) {
  AppendRequest r;
  r.offset = tag * 512;
  r.length = 1024;
  std::string p(1024, '\0');
  for (size_t i = 0; i + 8 <= p.size(); i += 8) std::memcpy(p.data() + i, &tag, 8);
  r.payload = Bytes::Copy(p);
  r.sync = sync;
  return r;
}

TEST(GroupLogPowerCutTest, DurableRecordsSurviveUnsyncedOnesMayNot) {
  TempDir dir;
  FaultEnv fault;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  uint64_t durable_floor = 0;  // highest LSN the log ever confirmed durable
  for (int round = 0; round < 20; ++round) {
    auto store = LogStore::Open({.dir = dir.path() / "log", .env = fault.env()});
    ASSERT_TRUE(store.ok()) << store.status();
    auto log = (*store)->OpenGroup("g0", {.max_batch_records = 16});
    ASSERT_TRUE(log.ok()) << log.status();
    GroupLog* g = *log;
    // After the previous cut: everything confirmed durable is here, dense and intact.
    const GroupLogState st = g->State();
    ASSERT_GE(st.last_lsn, durable_floor) << "round " << round << ": lost durable records";
    ASSERT_TRUE(g->Verify().ok()) << g->Verify();
    ASSERT_TRUE(g->ReadRange(1, st.last_lsn, [](const LogRecordView& r) {
                   uint64_t tag;
                   std::memcpy(&tag, r.payload.data(), 8);
                   return tag == r.header.offset / 512 ? absl::OkStatus()
                                                       : absl::DataLossError("mixed payload");
                 }).ok());

    // Appends from two threads, some FUA, with Syncs; the cut comes at a random moment.
    std::atomic<uint64_t> confirmed{0};
    auto bump = [&](uint64_t lsn) {
      uint64_t c = confirmed.load();
      while (lsn > c && !confirmed.compare_exchange_weak(c, lsn)) {
      }
    };
    std::atomic<bool> stop{false};
    auto writer = [&](uint64_t s) {
      std::mt19937_64 r(s);
      while (!stop.load()) {
        const bool fua = r() % 8 == 0;
        std::promise<void> done;
        g->Append(TaggedReq(r() % 100000, fua), [&, fua](absl::StatusOr<uint64_t> lsn) {
          if (lsn.ok() && fua) bump(*lsn);
          done.set_value();
        });
        done.get_future().wait();
        if (r() % 16 == 0) {
          const uint64_t target = g->last_lsn();
          std::promise<void> synced;
          g->Sync([&, target](absl::Status sync_status) {
            if (sync_status.ok()) bump(target);
            synced.set_value();
          });
          synced.get_future().wait();
        }
      }
    };
    std::thread a(writer, rng()), b(writer, rng());
    std::this_thread::sleep_for(std::chrono::milliseconds(5 + rng() % 60));
    fault.Crash();
    stop = true;
    a.join();
    b.join();
    durable_floor = std::max(durable_floor, confirmed.load());
    store->reset();
    ASSERT_TRUE(fault.DropUnsyncedData().ok());
  }
  EXPECT_GT(durable_floor, 0u) << "no round confirmed anything durable: the test proved nothing";
}

}  // namespace
}  // namespace tvilling::storage
