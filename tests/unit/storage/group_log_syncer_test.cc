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
#include "tests/unit/storage/log_wait.h"
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

  // The syncer's path throughout: a batch of FUA appends alone would otherwise be written with a
  // synced write on the committer while the syncer is idle (the default).
  static GroupLogOptions ThroughTheSyncer() {
    GroupLogOptions o;
    o.sync_on_committer_when_all_durable = false;
    return o;
  }

  void Open(GroupLogOptions o = ThroughTheSyncer()) {
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

// SyncBusy (a replica's cue to acknowledge `received` before the fsync): true while an fsync runs
// or written records wait for one, false once it is done and on an idle log.
TEST_F(GroupLogSyncerTest, SyncBusyWhileAnFsyncRunsOrIsOwed) {
  Open();
  EXPECT_FALSE(log_->SyncBusy());
  fault_.HoldWalSyncs();
  OutcomePtr fua = Append(1, /*fua=*/true);
  ASSERT_TRUE(AwaitHeld());
  EXPECT_TRUE(log_->SyncBusy()) << "the syncer's fsync is held";
  fault_.ReleaseWalSyncs();
  ASSERT_TRUE(Eventually([&] { return fua->done(); }));
  EXPECT_TRUE(Eventually([&] { return !log_->SyncBusy(); }));
}

// A Sync's callback runs after its fsync: a replica that appends the next batch from there (the
// primary answered the `durable` ack at once) must not see that finished fsync as busy, or it
// sends an extra `received` ack (integration.repl.async_acks_once_per_batch saw one under load).
TEST_F(GroupLogSyncerTest, SyncBusyIsFalseInTheCallbackOfTheSyncersFsync) {
  Open();
  OutcomePtr w = Append(1, /*fua=*/false);
  ASSERT_TRUE(Eventually([&] { return w->done(); }));
  std::promise<bool> busy_in_callback;
  log_->Sync([&](absl::Status st) { busy_in_callback.set_value(!st.ok() || log_->SyncBusy()); },
             /*fsync_here=*/false);
  auto f = busy_in_callback.get_future();
  ASSERT_EQ(f.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  EXPECT_FALSE(f.get()) << "SyncBusy() in the callback of the fsync that just completed";
}

TEST_F(GroupLogSyncerTest, NonFuaAppendCompletesWhileAnEarlierFuaAppendsFsyncIsHeld) {
  Open();
  fault_.HoldWalSyncs();
  OutcomePtr fua = Append(1, /*fua=*/true);  // LSN 1
  ASSERT_TRUE(AwaitHeld()) << "the FUA append never fsynced";
  OutcomePtr plain = Append(2, /*fua=*/false);  // LSN 2
  ASSERT_TRUE(Eventually([&] { return plain->done(); }))
      << "a WRITE without FUA waited for the fsync of an earlier FUA write";
  ASSERT_TRUE(plain->result().ok()) << plain->result();
  EXPECT_EQ(plain->result_lsn(), 2u);
  EXPECT_EQ(log_->last_lsn(), 2u);
  // The FUA append and durable_lsn wait for the fsync.
  EXPECT_FALSE(fua->done()) << "a FUA append completed before its fsync returned";
  EXPECT_EQ(log_->durable_lsn(), 0u);
  EXPECT_TRUE(durable_reports().empty());
  EXPECT_EQ(fault_.waiting_wal_syncs(), 1u);

  fault_.ReleaseWalSyncs();
  ASSERT_TRUE(Eventually([&] { return fua->done(); }));
  ASSERT_TRUE(fua->result().ok()) << fua->result();
  EXPECT_EQ(fua->result_lsn(), 1u);
  EXPECT_EQ(fua->count(), 1);
  EXPECT_EQ(plain->count(), 1);
  // LSN 2 was written after the held fsync began, so that fsync vouches only for LSN 1.
  EXPECT_EQ(log_->durable_lsn(), 1u);
  EXPECT_EQ(durable_reports(), std::vector<uint64_t>{1});
  ASSERT_TRUE(SyncWait().ok());
  EXPECT_EQ(log_->durable_lsn(), 2u);
  EXPECT_EQ(durable_reports(), (std::vector<uint64_t>{1, 2}));

  // Both are durable: they survive a power cut.
  PowerCutAndReopen();
  EXPECT_EQ(log_->last_lsn(), 2u);
  EXPECT_TRUE(log_->Verify().ok()) << log_->Verify();
}

// A primary's log in a store of its own, whose records a test ships as a primary's shipper does.
class Sender {
 public:
  explicit Sender(uint64_t records) {
    auto store = LogStore::Open({.dir = dir_.path() / "primary"});
    EXPECT_TRUE(store.ok()) << store.status();
    if (!store.ok()) return;
    store_ = std::move(*store);
    auto log = store_->OpenGroup("g", {});
    EXPECT_TRUE(log.ok()) << log.status();
    if (!log.ok()) return;
    log_ = *log;
    for (uint64_t i = 1; i <= records; ++i) {
      std::promise<absl::StatusOr<uint64_t>> p;
      log_->Append(Req(i, false), [&](absl::StatusOr<uint64_t> lsn) { p.set_value(lsn); });
      EXPECT_TRUE(p.get_future().get().ok());
    }
  }
  uint32_t group_id() const { return log_->group_id(); }
  ShippedRecords Ship(uint64_t from, uint64_t to) const {
    std::string buf;
    EXPECT_TRUE(log_->ReadRaw(from, to, UINT64_MAX, UINT32_MAX,
                              [&](uint64_t, std::string_view v) {
                                buf.append(v);
                                return absl::OkStatus();
                              })
                    .ok());
    auto r = ShippedRecords::Parse(std::move(buf));
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? std::move(*r) : ShippedRecords();
  }

 private:
  TempDir dir_;
  std::unique_ptr<LogStore> store_;
  GroupLog* log_ = nullptr;
};

OutcomePtr Replicate(GroupLog* log, uint32_t sender, uint64_t first, ShippedRecords recs,
                     bool sync) {
  auto o = std::make_shared<Outcome>();
  log->AppendReplicated(sender, first, std::move(recs), sync,
                        [o, log](absl::StatusOr<uint64_t> last) {
                          std::lock_guard lock(o->mu);
                          ++o->calls;
                          o->status = last.status();
                          if (last.ok()) o->lsn = *last;
                          o->durable_at_call = log->durable_lsn();
                        });
  return o;
}

// On an idle log a replicated append is written on the caller's thread (no hand-off to the
// committer), and a Sync() that must not fsync there returns at once and leaves the fsync to the
// syncer, so a replica's stream goes on receiving while its log is fsynced.
TEST_F(GroupLogSyncerTest, ReplicatedAppendOnAnIdleLogIsWrittenOnTheCallersThread) {
  Sender primary(3);
  Open();
  fault_.HoldWalSyncs();
  OutcomePtr first = Replicate(log_, primary.group_id(), 1, primary.Ship(1, 2), false);
  EXPECT_TRUE(first->done()) << "the append was not written on the caller's thread";
  EXPECT_EQ(first->result_lsn(), 2u);
  log_->Sync([](absl::Status) {}, /*fsync_here=*/false);  // returns: nothing waits for the fsync
  ASSERT_TRUE(AwaitHeld()) << "the syncer did not fsync";
  EXPECT_EQ(log_->durable_lsn(), 0u);
  // The syncer's fsync is held; the next batch is written all the same.
  OutcomePtr second = Replicate(log_, primary.group_id(), 3, primary.Ship(3, 3), false);
  EXPECT_TRUE(Eventually([&] { return second->done(); }));
  EXPECT_EQ(second->result_lsn(), 3u);
  fault_.ReleaseWalSyncs();
  EXPECT_TRUE(SyncWait().ok());
  EXPECT_EQ(log_->durable_lsn(), 3u);
}

TEST_F(GroupLogSyncerTest, ReplicatedAppendCompletesBeforeTheFsyncOfASyncInItsBatch) {
  // The records come from another store, as a primary's shipper sends them.
  Sender primary(4);
  auto ship = [&](uint64_t from, uint64_t to) { return primary.Ship(from, to); };
  const uint32_t sender = primary.group_id();
  auto replicate = [&](uint64_t first, ShippedRecords recs, bool sync) {
    return Replicate(log_, sender, first, std::move(recs), sync);
  };

  // Through the committer (on an idle log the append would be written on this thread, which the
  // gate below would then stop).
  GroupLogOptions o = ThroughTheSyncer();
  o.replicated_inline_when_idle = false;
  Open(o);
  // LSN 1 stops the committer at the gate, so the next records and the Sync() share a batch.
  CloseGate();
  OutcomePtr first = replicate(1, ship(1, 1), /*sync=*/false);
  ASSERT_TRUE(AwaitCommitterAtGate());
  fault_.HoldWalSyncs();
  OutcomePtr received = replicate(2, ship(2, 4), /*sync=*/false);
  OutcomePtr sync = Sync();
  ASSERT_TRUE(Eventually([&] { return sync->call_returned.load(); }));
  OpenGate();
  ASSERT_TRUE(AwaitHeld()) << "the Sync() never fsynced";
  ASSERT_TRUE(Eventually([&] { return received->done(); }))
      << "a replica's append (its 'received') waited for the fsync of a Sync() in its batch";
  ASSERT_TRUE(received->result().ok()) << received->result();
  EXPECT_EQ(received->result_lsn(), 4u);
  EXPECT_EQ(received->durable_at_call, 0u);
  EXPECT_TRUE(first->done());
  EXPECT_FALSE(sync->done()) << "Sync() completed before its fsync returned";
  EXPECT_EQ(log_->durable_lsn(), 0u);

  fault_.ReleaseWalSyncs();
  ASSERT_TRUE(Eventually([&] { return sync->done(); }));
  EXPECT_TRUE(sync->result().ok()) << sync->result();
  EXPECT_EQ(sync->durable_at_call, 4u);
  EXPECT_EQ(log_->durable_lsn(), 4u);
  EXPECT_EQ(first->count(), 1);
  EXPECT_EQ(received->count(), 1);
  EXPECT_EQ(sync->count(), 1);
}

TEST_F(GroupLogSyncerTest, OneFsyncCoversEveryBatchWrittenWhileTheLastWasHeld) {
  Open();
  fault_.HoldWalSyncs();
  OutcomePtr held = Append(1, /*fua=*/true);  // LSN 1
  ASSERT_TRUE(AwaitHeld());
  const uint64_t syncs_before = fault_.wal_syncs();  // the held one included
  // Three more batches with a FUA append each while LSN 1's fsync is held: each FUA append is
  // written before the next plain one is queued, and the plain one completes.
  std::vector<OutcomePtr> plains, fuas;
  uint64_t lsn = 1;
  for (int i = 0; i < 3; ++i) {
    plains.push_back(Append(10 + i, /*fua=*/false));
    ++lsn;
    ASSERT_TRUE(Eventually([&] { return plains.back()->done(); }))
        << "a WRITE without FUA waited for an fsync";
    ASSERT_TRUE(plains.back()->result().ok()) << plains.back()->result();
    fuas.push_back(Append(20 + i, /*fua=*/true));
    ++lsn;
    ASSERT_TRUE(Eventually([&] { return log_->last_lsn() >= lsn; }));
  }
  const uint64_t last_fua = lsn;  // 7
  OutcomePtr sync = Sync();
  ASSERT_TRUE(Eventually([&] { return sync->call_returned.load(); }))
      << "Sync() blocked its caller behind an fsync in flight";
  Quiesce();  // the three FUA batches and the Sync() are with the syncer now

  // Nothing durable yet, and no second fsync started while the first is in flight.
  EXPECT_FALSE(held->done());
  for (const OutcomePtr& f : fuas) EXPECT_FALSE(f->done());
  EXPECT_FALSE(sync->done());
  EXPECT_EQ(log_->durable_lsn(), 0u);
  EXPECT_EQ(fault_.wal_syncs(), syncs_before);

  fault_.ReleaseWalSyncs();
  ASSERT_TRUE(Eventually([&] { return sync->done(); }));
  for (const OutcomePtr& f : fuas) ASSERT_TRUE(Eventually([&] { return f->done(); }));
  ASSERT_TRUE(Eventually([&] { return held->done(); }));
  EXPECT_TRUE(sync->result().ok()) << sync->result();
  EXPECT_TRUE(held->result().ok()) << held->result();
  for (const OutcomePtr& f : fuas) {
    EXPECT_TRUE(f->result().ok()) << f->result();
    EXPECT_GE(f->durable_at_call, f->result_lsn());
  }
  // Group commit across batches: one fsync after the held one covered all three FUA batches and
  // the Sync().
  EXPECT_EQ(fault_.wal_syncs() - syncs_before, 1u);
  // Its target is the last LSN written before it began: the Sync()'s batch (LSN 7, or the first
  // Quiesce() record if that shared the Sync()'s batch), never the second Quiesce() record.
  EXPECT_GE(log_->durable_lsn(), last_fua);
  EXPECT_LE(log_->durable_lsn(), last_fua + 1);
  ASSERT_EQ(durable_reports().size(), 2u);
  EXPECT_EQ(durable_reports().front(), 1u);
}

TEST_F(GroupLogSyncerTest, FailedFsyncFailsWhatWaitedForItAndTheLogRefusesLaterAppends) {
  Open();
  // LSN 1 stops the committer at the gate, so the FUA append and a Sync() share the next batch
  // and so the held fsync.
  CloseGate();
  OutcomePtr before = Append(1, /*fua=*/false);
  ASSERT_TRUE(AwaitCommitterAtGate());
  fault_.HoldWalSyncs();
  OutcomePtr fua = Append(2, /*fua=*/true);  // LSN 2
  OutcomePtr sync1 = Sync();
  ASSERT_TRUE(Eventually([&] { return sync1->call_returned.load(); }));
  OpenGate();
  ASSERT_TRUE(AwaitHeld());
  // More work for the syncer while the fsync is held: a FUA append and a Sync() in later batches.
  OutcomePtr plain = Append(3, /*fua=*/false);  // LSN 3, completes
  ASSERT_TRUE(Eventually([&] { return plain->done(); }))
      << "a WRITE without FUA waited for an fsync";
  OutcomePtr later_fua = Append(4, /*fua=*/true);  // LSN 4
  OutcomePtr sync2 = Sync();
  ASSERT_TRUE(Eventually([&] { return sync2->call_returned.load(); }));
  Quiesce();  // LSN 5, 6: nothing is being written when the fsync fails

  fault_.Crash();  // the held fsync now fails
  fault_.ReleaseWalSyncs();
  for (const OutcomePtr& o : {fua, sync1, later_fua, sync2}) {
    ASSERT_TRUE(Eventually([&] { return o->done(); }));
  }
  // The held job's FUA append and Sync() fail with the fsync's error...
  EXPECT_EQ(fua->result().code(), absl::StatusCode::kInternal) << fua->result();
  EXPECT_TRUE(Contains(fua->result(), "syncing log")) << fua->result();
  EXPECT_EQ(sync1->result(), fua->result());
  // ... and so do the later jobs, which cannot be made durable any more.
  EXPECT_FALSE(later_fua->result().ok());
  EXPECT_FALSE(sync2->result().ok());
  EXPECT_EQ(log_->durable_lsn(), 0u);
  EXPECT_TRUE(durable_reports().empty());
  // What needed no fsync had completed, once, with its LSN.
  EXPECT_TRUE(before->result().ok()) << before->result();
  EXPECT_TRUE(plain->result().ok()) << plain->result();
  EXPECT_EQ(plain->result_lsn(), 3u);

  // The log refuses later appends and syncs with that error, without trying to write.
  OutcomePtr after = Append(7, /*fua=*/false);
  OutcomePtr after_fua = Append(8, /*fua=*/true);
  OutcomePtr after_sync = Sync();
  for (const OutcomePtr& o : {after, after_fua, after_sync}) {
    ASSERT_TRUE(Eventually([&] { return o->done(); }));
    EXPECT_EQ(o->result(), fua->result());
  }
  EXPECT_EQ(log_->last_lsn(), 6u);

  // Every callback ran exactly once, also after the log stopped.
  log_->Stop();
  for (const OutcomePtr& o :
       {before, fua, sync1, plain, later_fua, sync2, after, after_fua, after_sync}) {
    EXPECT_EQ(o->count(), 1);
  }
}

TEST_F(GroupLogSyncerTest, StopWithAnFsyncHeldReturnsOnlyAfterItAndEveryCallbackRan) {
  Open();
  fault_.HoldWalSyncs();
  OutcomePtr fua = Append(1, /*fua=*/true);  // LSN 1
  ASSERT_TRUE(AwaitHeld());
  OutcomePtr plain = Append(2, /*fua=*/false);     // LSN 2
  OutcomePtr later_fua = Append(3, /*fua=*/true);  // LSN 3
  OutcomePtr sync = Sync();
  ASSERT_TRUE(Eventually([&] { return sync->call_returned.load(); }));
  ASSERT_TRUE(Eventually([&] { return plain->done(); }))
      << "a WRITE without FUA waited for an fsync";

  std::atomic<bool> stopped{false};
  std::thread stopper([&] {
    log_->Stop();
    stopped = true;
  });
  // Stop() has begun once appends are refused; until then a probe is just one more record.
  std::vector<OutcomePtr> probes;
  const bool stopping = Eventually([&] {
    probes.push_back(Append(50, /*fua=*/false));
    return Eventually([&] { return probes.back()->done(); }) &&
           probes.back()->result().code() == absl::StatusCode::kUnavailable;
  });
  // The committer may well have stopped by now; the syncer must not have, nor Stop() returned.
  EXPECT_TRUE(stopping);
  EXPECT_FALSE(stopped.load()) << "Stop() returned while an fsync was in flight";
  EXPECT_FALSE(fua->done());
  EXPECT_FALSE(later_fua->done());
  EXPECT_FALSE(sync->done());

  fault_.ReleaseWalSyncs();
  stopper.join();
  EXPECT_TRUE(stopped.load());
  // Everything queued before Stop() completed, once, and what asked for durability is durable.
  for (const OutcomePtr& o : {fua, plain, later_fua, sync}) {
    EXPECT_EQ(o->count(), 1);
    EXPECT_TRUE(o->result().ok()) << o->result();
  }
  for (const OutcomePtr& p : probes) EXPECT_EQ(p->count(), 1);
  EXPECT_EQ(fua->result_lsn(), 1u);
  EXPECT_EQ(later_fua->result_lsn(), 3u);
  EXPECT_GE(later_fua->durable_at_call, 3u);
  EXPECT_GE(sync->durable_at_call, 3u);
  EXPECT_GE(log_->durable_lsn(), 3u);
}

// The default: a batch whose every record waits for durability, with the syncer idle, is one
// synced write on the committer (no hand-off); a Sync() with records not yet durable still goes
// to the syncer and waits for its fsync.
TEST_F(GroupLogSyncerTest, AllDurableBatchIsOneSyncedWriteOnTheCommitter) {
  GroupLogOptions o;  // defaults
  Open(o);
  const uint64_t syncs_before = fault_.wal_syncs();
  OutcomePtr fua = Append(1, /*fua=*/true);
  ASSERT_TRUE(Eventually([&] { return fua->done(); }));
  EXPECT_TRUE(fua->result().ok()) << fua->result();
  EXPECT_EQ(fua->durable_at_call, 1u) << "completed before it was durable";
  EXPECT_EQ(fault_.wal_syncs() - syncs_before, 1u);

  OutcomePtr plain = Append(2, /*fua=*/false);
  ASSERT_TRUE(Eventually([&] { return plain->done(); }));
  fault_.HoldWalSyncs();
  OutcomePtr sync = Sync();
  ASSERT_TRUE(AwaitHeld());
  EXPECT_FALSE(sync->done());
  EXPECT_EQ(log_->durable_lsn(), 1u);
  fault_.ReleaseWalSyncs();
  EXPECT_TRUE(Eventually([&] { return sync->done(); }));
  EXPECT_EQ(log_->durable_lsn(), 2u);
}

}  // namespace
}  // namespace tvilling::storage
