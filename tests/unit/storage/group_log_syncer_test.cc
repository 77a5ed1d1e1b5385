// group_log_syncer_test.cc: the group log's syncer thread, with the WAL's fsyncs held by a FaultEnv
// (HoldWalSyncs): what completes while an fsync is in flight (what need not be durable) and what
// waits for it (FUA appends, Sync(), durable_lsn), one fsync for every batch written meanwhile, a
// failed fsync, and Stop() with an fsync in flight.
//
// Nothing here sleeps to let things happen: a test waits for a condition (a callback ran, the env
// holds a sync) with a generous timeout, and checks what must not have happened only once what
// must have happened is seen.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "storage/group_log.h"
#include "tests/unit/storage/fault_env.h"
#include "tests/unit/storage/temp_dir.h"

namespace tvilling::storage {
namespace {

// How long a test waits for something that must happen. Long, as sanitizers are slow; a test only
// waits this long when it is about to fail.
constexpr auto kTimeout = std::chrono::seconds(20);

template <typename Pred>
bool Eventually(Pred pred) {
  const auto deadline = std::chrono::steady_clock::now() + kTimeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

// What a callback of Append, AppendReplicated or Sync was given, and how many times it ran. Shared
// with the callback, so a test that fails early leaves nothing dangling.
struct Outcome {
  mutable std::mutex mu;
  int calls = 0;
  absl::Status status;
  uint64_t lsn = 0;
  uint64_t durable_at_call = 0;            // the log's durable_lsn when the callback ran
  std::atomic<bool> call_returned{false};  // Sync() called on its own thread has returned

  bool done() const {
    std::lock_guard lock(mu);
    return calls > 0;
  }
  int count() const {
    std::lock_guard lock(mu);
    return calls;
  }
  absl::Status result() const {
    std::lock_guard lock(mu);
    return status;
  }
  uint64_t result_lsn() const {
    std::lock_guard lock(mu);
    return lsn;
  }
};
using OutcomePtr = std::shared_ptr<Outcome>;

AppendRequest Req(uint64_t tag, bool fua) {
  AppendRequest r;
  r.type = RecordType::kWrite;
  r.flags = fua ? kRecordFlagFua : 0;
  r.offset = tag * 4096;
  std::string data(256, static_cast<char>('a' + tag % 26));
  r.length = static_cast<uint32_t>(data.size());
  r.payload = Bytes::Copy(data);
  r.sync = fua;
  return r;
}

// A log on a FaultEnv whose WAL fsyncs a test can hold, with a gate in on_batch_written: while the
// gate is closed the committer stops in the next batch's on_batch_written, so that whatever a test
// queues meanwhile lands in one later batch.
class GroupLogSyncerTest : public ::testing::Test {
 protected:
  ~GroupLogSyncerTest() override {
    // A test that failed midway may have left an fsync held or the committer at the gate; the
    // store's shutdown waits for both.
    fault_.ReleaseWalSyncs();
    OpenGate();
    for (std::thread& t : threads_) t.join();
    log_ = nullptr;
    store_.reset();
  }

  void Open(GroupLogOptions o = {}) {
    o.on_batch_written = [this](std::span<const LogRecordView>) {
      std::unique_lock lock(gate_mu_);
      if (gate_closed_) {
        at_gate_ = true;
        gate_cv_.notify_all();
        gate_cv_.wait(lock, [&] { return !gate_closed_; });
        at_gate_ = false;
      }
      return absl::OkStatus();
    };
    o.on_durable = [this](uint64_t lsn) {
      std::lock_guard lock(durable_mu_);
      durable_reports_.push_back(lsn);
    };
    log_ = nullptr;
    store_.reset();
    // No WAL recycling: the env refuses ReuseWritableFile.
    auto s =
        LogStore::Open({.dir = dir_.path() / "log", .recycle_wal_files = 0, .env = fault_.env()});
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = std::move(*s);
    auto l = store_->OpenGroup("g0", o);
    ASSERT_TRUE(l.ok()) << l.status();
    log_ = *l;
  }

  // Power cut: everything not fsynced is lost; then the log is opened again.
  void PowerCutAndReopen() {
    fault_.ReleaseWalSyncs();
    fault_.Crash();
    log_ = nullptr;
    store_.reset();
    ASSERT_TRUE(fault_.DropUnsyncedData().ok());
    Open();
  }

  void CloseGate() {
    std::lock_guard lock(gate_mu_);
    gate_closed_ = true;
  }
  void OpenGate() {
    {
      std::lock_guard lock(gate_mu_);
      gate_closed_ = false;
    }
    gate_cv_.notify_all();
  }
  bool AwaitCommitterAtGate() {
    std::unique_lock lock(gate_mu_);
    return gate_cv_.wait_for(lock, kTimeout, [&] { return at_gate_; });
  }

  // The env holds `n` WAL fsyncs.
  bool AwaitHeld(size_t n = 1) {
    return Eventually([&] { return fault_.waiting_wal_syncs() == n; });
  }

  OutcomePtr Append(uint64_t tag, bool fua) {
    auto o = std::make_shared<Outcome>();
    log_->Append(Req(tag, fua), [o, log = log_](absl::StatusOr<uint64_t> lsn) {
      std::lock_guard lock(o->mu);
      ++o->calls;
      o->status = lsn.status();
      if (lsn.ok()) o->lsn = *lsn;
      o->durable_at_call = log->durable_lsn();
    });
    return o;
  }

  // Sync() called on a thread of its own, so that a Sync() that wrongly blocks its caller shows as
  // a failed expectation (call_returned stays false) rather than a hung test.
  OutcomePtr Sync() {
    auto o = std::make_shared<Outcome>();
    threads_.emplace_back([o, log = log_] {
      log->Sync([o, log](absl::Status st) {
        std::lock_guard lock(o->mu);
        ++o->calls;
        o->status = st;
        o->durable_at_call = log->durable_lsn();
      });
      o->call_returned = true;
    });
    return o;
  }

  absl::Status SyncWait() {
    OutcomePtr o = Sync();
    if (!Eventually([&] { return o->done(); })) return absl::DeadlineExceededError("Sync()");
    return o->result();
  }

  // Makes sure everything queued, and every Sync() called, before this call has been through the
  // committer (written, completed or handed to the syncer), by appending two records and waiting
  // for both: the second is queued after the first is written, so it is in a later batch than the
  // first (and than anything queued before), and the committer finishes batches in order.
  void Quiesce() {
    for (int i = 0; i < 2; ++i) {
      OutcomePtr o = Append(900 + static_cast<uint64_t>(i), /*fua=*/false);
      ASSERT_TRUE(Eventually([&] { return o->done(); })) << "a non-FUA append did not complete";
      ASSERT_TRUE(o->result().ok()) << o->result();
    }
  }

  std::vector<uint64_t> durable_reports() {
    std::lock_guard lock(durable_mu_);
    return durable_reports_;
  }

  TempDir dir_;
  FaultEnv fault_;

  std::mutex gate_mu_;
  std::condition_variable gate_cv_;
  bool gate_closed_ = false;
  bool at_gate_ = false;

  std::mutex durable_mu_;
  std::vector<uint64_t> durable_reports_;

  std::unique_ptr<LogStore> store_;
  GroupLog* log_ = nullptr;
  std::vector<std::thread> threads_;
};

TEST_F(GroupLogSyncerTest, SyncWhileAnFsyncIsInFlightNeitherBlocksItsCallerNorFsyncsTwice) {
  Open();  // sync_inline_when_idle: on
  fault_.HoldWalSyncs();
  OutcomePtr fua = Append(1, /*fua=*/true);
  ASSERT_TRUE(AwaitHeld());
  ASSERT_TRUE(Eventually([&] { return log_->last_lsn() == 1; }));
  const uint64_t syncs_before = fault_.wal_syncs();
  // Nothing is queued and no batch is being written, but the log is not idle: the syncer's fsync
  // is in flight. Fsyncing on the caller's thread would wait for that fsync and then do another;
  // the Sync() must go to the syncer instead and return at once.
  OutcomePtr sync = Sync();
  EXPECT_TRUE(Eventually([&] { return sync->call_returned.load(); }))
      << "Sync() blocked its caller behind the syncer's fsync";
  EXPECT_FALSE(sync->done());
  EXPECT_EQ(fault_.waiting_wal_syncs(), 1u);

  fault_.ReleaseWalSyncs();
  ASSERT_TRUE(Eventually([&] { return sync->done() && fua->done(); }));
  EXPECT_TRUE(sync->result().ok()) << sync->result();
  EXPECT_TRUE(fua->result().ok()) << fua->result();
  EXPECT_EQ(fault_.wal_syncs() - syncs_before, 1u) << "one fsync for the Sync(), on the syncer";
  EXPECT_EQ(log_->durable_lsn(), 1u);
  EXPECT_EQ(sync->count(), 1);
  EXPECT_EQ(fua->count(), 1);
}

}  // namespace
}  // namespace tvilling::storage
