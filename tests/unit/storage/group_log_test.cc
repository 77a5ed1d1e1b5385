// group_log_test.cc: the group log on a real RocksDB in a temp directory: group commit, durability
// bookkeeping, reopen, corruption and gap detection, epochs, retention.
#include "storage/group_log.h"

#include <absl/strings/str_cat.h>
#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <mutex>
#include <random>
#include <thread>

#include "tests/unit/storage/log_wait.h"
#include "tests/unit/storage/temp_dir.h"

namespace tvilling::storage {
namespace {

class GroupLogTest : public ::testing::Test {
 protected:
  void Open(GroupLogOptions opts = {}) {
    log_ = nullptr;
    store_.reset();
    auto s = LogStore::Open({.dir = dir_.path() / "log"});
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = std::move(*s);
    auto l = store_->OpenGroup("g0", opts);
    ASSERT_TRUE(l.ok()) << l.status();
    log_ = *l;
  }
  void Close() {
    log_ = nullptr;
    store_.reset();
  }
  TempDir dir_;
  std::unique_ptr<LogStore> store_;
  GroupLog* log_ = nullptr;
};

TEST_F(GroupLogTest, DenseLsnsFromManyThreadsAndReadBack) {
  Open();
  constexpr int kThreads = 4, kPerThread = 500;
  std::vector<std::thread> threads;
  std::atomic<int> done{0};
  std::mutex mu;
  std::set<uint64_t> lsns;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        std::string data(512, static_cast<char>('a' + t));
        data += std::to_string(i);
        log_->Append(WriteReq(4096ull * i, data), [&](absl::StatusOr<uint64_t> lsn) {
          ASSERT_TRUE(lsn.ok()) << lsn.status();
          std::lock_guard l(mu);
          EXPECT_TRUE(lsns.insert(*lsn).second) << "LSN handed out twice: " << *lsn;
          done.fetch_add(1);
        });
      }
    });
  }
  for (auto& th : threads) th.join();
  ASSERT_TRUE(SyncWait(log_).ok());
  EXPECT_EQ(done.load(), kThreads * kPerThread);
  EXPECT_EQ(*lsns.begin(), 1u);
  EXPECT_EQ(*lsns.rbegin(), uint64_t{kThreads * kPerThread});
  EXPECT_EQ(log_->last_lsn(), uint64_t{kThreads * kPerThread});
  EXPECT_EQ(log_->durable_lsn(), log_->last_lsn());
  std::vector<std::string> payloads;
  auto recs = ReadAll(log_, &payloads);
  ASSERT_EQ(recs.size(), size_t{kThreads * kPerThread});
  for (size_t i = 0; i < recs.size(); ++i) EXPECT_EQ(recs[i].lsn, i + 1);
  EXPECT_TRUE(log_->Verify().ok());
}

TEST_F(GroupLogTest, DurableLsnAdvancesOnlyWithSync) {
  Open();
  ASSERT_TRUE(AppendWait(log_, WriteReq(0, "x")).ok());
  ASSERT_TRUE(AppendWait(log_, WriteReq(0, "y")).ok());
  EXPECT_EQ(log_->last_lsn(), 2u);
  EXPECT_EQ(log_->durable_lsn(), 0u) << "no fsync was asked for";
  ASSERT_TRUE(SyncWait(log_).ok());
  EXPECT_EQ(log_->durable_lsn(), 2u);
  // FUA: the append completes only when durable.
  auto lsn = AppendWait(log_, WriteReq(0, "z", /*sync=*/true));
  ASSERT_TRUE(lsn.ok());
  EXPECT_GE(log_->durable_lsn(), *lsn);
}

// Sync(within): the fsync may wait up to `within` for more to cover (a replica's batches that
// its primary does not wait on); a Sync due at once covers it earlier, and so does Stop.
TEST_F(GroupLogTest, DeferredSyncWaitsUpToItsDelayUnlessSomethingSoonerCoversIt) {
  using namespace std::chrono_literals;
  using Clock = std::chrono::steady_clock;
  Open();
  auto deferred = [&](std::chrono::microseconds within) {
    auto p = std::make_shared<std::promise<Clock::time_point>>();
    auto f = p->get_future();
    log_->Sync(
        [p](absl::Status st) {
          EXPECT_TRUE(st.ok()) << st;
          p->set_value(Clock::now());
        },
        /*fsync_here=*/false, within);
    return f;
  };
  // Alone: done after about `within`, not before.
  ASSERT_TRUE(AppendWait(log_, WriteReq(0, "a")).ok());
  auto t0 = Clock::now();
  auto f = deferred(300ms);
  ASSERT_EQ(f.wait_for(150ms), std::future_status::timeout) << "fsynced before its time";
  ASSERT_EQ(f.wait_for(10s), std::future_status::ready);
  EXPECT_GE(f.get() - t0, 300ms);
  EXPECT_EQ(log_->durable_lsn(), 1u);
  // The same while records are queued or being written (the Sync then goes to the syncer with
  // their batch, and keeps its time).
  std::atomic<int> appended{0};
  for (int i = 0; i < 64; ++i) {
    log_->Append(WriteReq(65536ull * i, std::string(65536, 'q')), [&](absl::StatusOr<uint64_t> r) {
      EXPECT_TRUE(r.ok()) << r.status();
      ++appended;
    });
  }
  t0 = Clock::now();
  auto busy = deferred(300ms);
  ASSERT_EQ(busy.wait_for(150ms), std::future_status::timeout) << "fsynced before its time (busy)";
  ASSERT_EQ(busy.wait_for(10s), std::future_status::ready);
  EXPECT_GE(busy.get() - t0, 300ms);
  EXPECT_EQ(appended.load(), 64);
  EXPECT_EQ(log_->durable_lsn(), 65u);
  // A Sync due at once, later, covers an earlier deferred one in the same fsync.
  ASSERT_TRUE(AppendWait(log_, WriteReq(0, "b")).ok());
  t0 = Clock::now();
  auto slow = deferred(std::chrono::seconds(60));
  ASSERT_TRUE(AppendWait(log_, WriteReq(0, "c")).ok());
  auto now = deferred(0us);
  ASSERT_EQ(now.wait_for(10s), std::future_status::ready);
  ASSERT_EQ(slow.wait_for(10s), std::future_status::ready) << "not covered by the sooner fsync";
  EXPECT_LT(slow.get() - t0, 10s);
  EXPECT_EQ(log_->durable_lsn(), 67u);
  // Stop does not wait for the delay either.
  ASSERT_TRUE(AppendWait(log_, WriteReq(0, "d")).ok());
  auto at_stop = deferred(std::chrono::seconds(60));
  t0 = Clock::now();
  log_->Stop();
  ASSERT_EQ(at_stop.wait_for(10s), std::future_status::ready);
  EXPECT_LT(at_stop.get() - t0, 10s);
}

TEST_F(GroupLogTest, GroupCommitBatchesConcurrentAppends) {
  std::atomic<int> batches{0};
  std::atomic<size_t> max_batch{0};
  GroupLogOptions o;
  o.max_batch_records = 64;
  o.on_batch_written = [&](std::span<const LogRecordView> recs) {
    batches.fetch_add(1);
    size_t m = max_batch.load();
    while (recs.size() > m && !max_batch.compare_exchange_weak(m, recs.size())) {
    }
    EXPECT_LE(recs.size(), 64u);
    for (size_t i = 1; i < recs.size(); ++i) EXPECT_EQ(recs[i].lsn, recs[i - 1].lsn + 1);
    return absl::OkStatus();
  };
  Open(o);
  std::atomic<int> completed{0};
  for (int i = 0; i < 2000; ++i) {
    log_->Append(WriteReq(0, std::string(100, 'q')), [&](absl::StatusOr<uint64_t> l) {
      EXPECT_TRUE(l.ok());
      completed.fetch_add(1);
    });
  }
  ASSERT_TRUE(SyncWait(log_).ok());
  EXPECT_EQ(completed.load(), 2000);
  EXPECT_LT(batches.load(), 2000) << "every append got its own batch: no group commit";
  EXPECT_GT(max_batch.load(), 1u);
}

// AppendPlug (an NBD connection's burst): appends under a plug wait for its release, which writes
// them as one batch on the releasing thread when the log is idle (their callbacks run before
// Release returns). A FUA record under a plug is fsynced by the syncer, not by this thread. With
// plugged_inline_when_idle off, the release wakes the committer instead.
TEST_F(GroupLogTest, PluggedAppendsAreOneBatchWrittenByTheReleasingThread) {
  using namespace std::chrono_literals;
  for (const bool inline_when_idle : {true, false}) {
    SCOPED_TRACE(inline_when_idle ? "inline when idle" : "through the committer");
    std::mutex mu;
    std::vector<std::pair<std::thread::id, size_t>> batches;
    GroupLogOptions o;
    o.plugged_inline_when_idle = inline_when_idle;
    o.on_batch_written = [&](std::span<const LogRecordView> recs) {
      std::lock_guard l(mu);
      batches.emplace_back(std::this_thread::get_id(), recs.size());
      return absl::OkStatus();
    };
    Open(o);
    ASSERT_TRUE(AppendWait(log_, WriteReq(0, "warm")).ok());
    const uint64_t base = log_->last_lsn();
    std::this_thread::sleep_for(100ms);  // the committer is back waiting for work
    {
      std::lock_guard l(mu);
      batches.clear();
    }
    std::atomic<int> completed{0};
    std::atomic<bool> all_on_this_thread{true};
    const std::thread::id me = std::this_thread::get_id();
    AppendPlug::Engage();
    EXPECT_TRUE(AppendPlug::Engaged());
    for (int i = 0; i < 8; ++i) {
      log_->Append(WriteReq(4096ull * i, "p"), [&](absl::StatusOr<uint64_t> l) {
        EXPECT_TRUE(l.ok()) << l.status();
        if (std::this_thread::get_id() != me) all_on_this_thread = false;
        ++completed;
      });
    }
    std::this_thread::sleep_for(100ms);
    EXPECT_EQ(completed.load(), 0) << "written before the plug's release";
    AppendPlug::Release();
    EXPECT_FALSE(AppendPlug::Engaged());
    if (inline_when_idle) {
      EXPECT_EQ(completed.load(), 8) << "not written by Release";
      EXPECT_TRUE(all_on_this_thread.load());
    } else {
      ASSERT_TRUE(SyncWait(log_).ok());
      EXPECT_EQ(completed.load(), 8);
      EXPECT_FALSE(all_on_this_thread.load()) << "written by the releasing thread";
    }
    {
      std::lock_guard l(mu);
      ASSERT_EQ(batches.size(), 1u) << "one batch for the burst";
      EXPECT_EQ(batches[0].second, 8u);
      EXPECT_EQ(batches[0].first == me, inline_when_idle);
    }
    // A FUA record: durable when it completes; Release returns before the fsync is needed.
    auto fua = std::make_shared<std::promise<absl::StatusOr<uint64_t>>>();
    AppendPlug::Engage();
    log_->Append(WriteReq(0, "f", /*sync=*/true),
                 [fua](absl::StatusOr<uint64_t> l) { fua->set_value(l); });
    AppendPlug::Release();
    auto f = fua->get_future();
    ASSERT_EQ(f.wait_for(10s), std::future_status::ready);
    auto lsn = f.get();
    ASSERT_TRUE(lsn.ok()) << lsn.status();
    EXPECT_GE(log_->durable_lsn(), *lsn);
    EXPECT_EQ(log_->last_lsn(), base + 9);
    // Release without a plug, or with nothing appended, does nothing.
    AppendPlug::Release();
    AppendPlug::Engage();
    AppendPlug::Release();
  }
}

TEST_F(GroupLogTest, ApplyHookRunsBeforeCompletionAndItsErrorFailsTheBatch) {
  std::atomic<uint64_t> applied{0};
  std::atomic<bool> fail{false};
  GroupLogOptions o;
  o.on_batch_written = [&](std::span<const LogRecordView> recs) {
    if (fail.load()) return absl::DataLossError("volume broke");
    applied.store(recs.back().lsn);
    return absl::OkStatus();
  };
  Open(o);
  auto lsn = AppendWait(log_, WriteReq(0, "a"));
  ASSERT_TRUE(lsn.ok());
  EXPECT_EQ(applied.load(), *lsn) << "completion before apply";
  fail = true;
  auto bad = AppendWait(log_, WriteReq(0, "b"));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(GroupLogTest, ReopenKeepsRecordsAndContinuesNumbering) {
  Open();
  for (int i = 0; i < 10; ++i)
    ASSERT_TRUE(AppendWait(log_, WriteReq(i, "r" + std::to_string(i))).ok());
  ASSERT_TRUE(SyncWait(log_).ok());
  Open();
  EXPECT_EQ(log_->last_lsn(), 10u);
  EXPECT_EQ(log_->durable_lsn(), 10u);
  auto lsn = AppendWait(log_, WriteReq(0, "next"));
  ASSERT_TRUE(lsn.ok());
  EXPECT_EQ(*lsn, 11u);
  std::vector<std::string> payloads;
  ReadAll(log_, &payloads);
  ASSERT_EQ(payloads.size(), 11u);
  EXPECT_EQ(payloads[3], "r3");
}

TEST_F(GroupLogTest, GroupsAreIndependent) {
  Open();
  auto other = store_->OpenGroup("g1", {});
  ASSERT_TRUE(other.ok());
  ASSERT_TRUE(AppendWait(log_, WriteReq(0, "a")).ok());
  ASSERT_TRUE(AppendWait(*other, WriteReq(0, "b")).ok());
  ASSERT_TRUE(AppendWait(*other, WriteReq(0, "c")).ok());
  EXPECT_EQ(log_->last_lsn(), 1u);
  EXPECT_EQ((*other)->last_lsn(), 2u);
  EXPECT_NE(log_->group_id(), (*other)->group_id());
  EXPECT_EQ(store_->OpenGroup("g1", {}).status().code(), absl::StatusCode::kAlreadyExists);
}

TEST_F(GroupLogTest, CorruptRecordIsReportedWithItsLsn) {
  Open();
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(AppendWait(log_, WriteReq(0, "payload")).ok());
  ASSERT_TRUE(SyncWait(log_).ok());
  // Flip one payload byte of LSN 3 behind the log's back.
  std::string key = EncodeLogKey(log_->group_id(), 3), value;
  ASSERT_TRUE(store_->db()->Get({}, key, &value).ok());
  value[kRecordHeaderSize + 2] ^= 0x20;
  ASSERT_TRUE(store_->db()->Put({}, key, value).ok());
  absl::Status st = log_->Verify();
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("LSN 3"), absl::string_view::npos) << st;
  EXPECT_NE(st.message().find("checksum mismatch"), absl::string_view::npos) << st;
  // Records before it are delivered, the corrupt one never is.
  std::vector<uint64_t> seen;
  st = log_->ReadRange(1, 5, [&](const LogRecordView& r) {
    seen.push_back(r.lsn);
    return absl::OkStatus();
  });
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(seen, (std::vector<uint64_t>{1, 2}));
}

TEST_F(GroupLogTest, TruncatedRecordAndRecordUnderWrongKeyAreDetected) {
  Open();
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(AppendWait(log_, WriteReq(0, "abcdefgh")).ok());
  std::string v2;
  ASSERT_TRUE(store_->db()->Get({}, EncodeLogKey(log_->group_id(), 2), &v2).ok());
  // LSN 2's bytes copied under LSN 3: the checksum binds a record to its LSN.
  ASSERT_TRUE(store_->db()->Put({}, EncodeLogKey(log_->group_id(), 3), v2).ok());
  EXPECT_NE(log_->Verify().message().find("LSN 3"), absl::string_view::npos);
  ASSERT_TRUE(store_->db()->Put({}, EncodeLogKey(log_->group_id(), 2), v2.substr(0, 20)).ok());
  absl::Status st = log_->Verify();
  EXPECT_NE(st.message().find("LSN 2"), absl::string_view::npos) << st;
  EXPECT_NE(st.message().find("truncated"), absl::string_view::npos) << st;
}

TEST_F(GroupLogTest, GapIsDetected) {
  Open();
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(AppendWait(log_, WriteReq(0, "x")).ok());
  ASSERT_TRUE(store_->db()->Delete({}, EncodeLogKey(log_->group_id(), 2)).ok());
  absl::Status st = log_->Verify();
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("LSN 2 is missing"), absl::string_view::npos) << st;
  // Missing at the end of a requested range too.
  ASSERT_TRUE(store_->db()->Delete({}, EncodeLogKey(log_->group_id(), 4)).ok());
  st = log_->ReadRange(3, 4, [](const LogRecordView&) { return absl::OkStatus(); });
  EXPECT_NE(st.message().find("LSN 4 is missing"), absl::string_view::npos) << st;
}

// A reader that took the log's first LSN before the checkpointer truncated past it (a replica
// being promoted reads its headers while its last records are checkpointed) is told the records
// were truncated, OutOfRange, not that the log lost them: the caller reads again from the new
// start. A record missing above the log's start is still DataLoss (GapIsDetected).
TEST_F(GroupLogTest, ReadingRecordsTruncatedMeanwhileIsOutOfRangeNotDataLoss) {
  Open();
  for (int i = 0; i < 6; ++i) ASSERT_TRUE(AppendWait(log_, WriteReq(0, "r")).ok());
  const GroupLogState before = log_->State();
  ASSERT_EQ(before.first_lsn, 1u);
  ASSERT_TRUE(log_->SetAppliedLsn(6).ok());
  ASSERT_TRUE(log_->TruncateBefore(4).ok());
  auto none = [](uint64_t, const RecordHeader&) { return absl::OkStatus(); };
  absl::Status st = log_->ReadHeaders(before.first_lsn, before.last_lsn, none);
  EXPECT_EQ(st.code(), absl::StatusCode::kOutOfRange) << st;
  EXPECT_NE(st.message().find("LSN 1 is no longer in the log (truncated; it starts at LSN 4 now)"),
            absl::string_view::npos)
      << st;
  std::vector<uint64_t> seen;
  st = log_->ReadHeaders(log_->State().first_lsn, before.last_lsn,
                         [&](uint64_t lsn, const RecordHeader&) {
                           seen.push_back(lsn);
                           return absl::OkStatus();
                         });
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(seen, (std::vector<uint64_t>{4, 5, 6}));
  // Everything applied and truncated while a reader held the old range: nothing left to find.
  ASSERT_TRUE(log_->TruncateBefore(7).ok());
  st = log_->ReadHeaders(4, before.last_lsn, none);
  EXPECT_EQ(st.code(), absl::StatusCode::kOutOfRange) << st;
  EXPECT_NE(st.message().find("LSN 4 is no longer in the log (truncated; it starts at LSN 7 now)"),
            absl::string_view::npos)
      << st;
}

TEST_F(GroupLogTest, EpochHistoryIsPersistedWithTheFirstRecordOfTheEpoch) {
  Open();
  ASSERT_TRUE(AppendWait(log_, WriteReq(0, "e0")).ok());
  ASSERT_TRUE(log_->BeginEpoch(7).ok());
  EXPECT_EQ(log_->BeginEpoch(7).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(AppendWait(log_, WriteReq(0, "e7a")).ok());
  ASSERT_TRUE(AppendWait(log_, WriteReq(0, "e7b")).ok());
  ASSERT_TRUE(log_->BeginEpoch(9).ok());
  ASSERT_TRUE(AppendWait(log_, WriteReq(0, "e9")).ok());
  ASSERT_TRUE(SyncWait(log_).ok());
  Open();
  auto st = log_->State();
  EXPECT_EQ(st.current_epoch, 9u);
  ASSERT_EQ(st.history.size(), 2u);
  EXPECT_EQ(st.history[0], (EpochStart{7, 2}));
  EXPECT_EQ(st.history[1], (EpochStart{9, 4}));
  std::vector<uint64_t> epochs;
  ASSERT_TRUE(log_->ReadRange(1, 4,
                              [&](const LogRecordView& r) {
                                epochs.push_back(r.header.epoch);
                                return absl::OkStatus();
                              })
                  .ok());
  EXPECT_EQ(epochs, (std::vector<uint64_t>{0, 7, 7, 9}));
  EXPECT_TRUE(log_->Verify().ok());
}

// Retention: segments of 10 records of 1000 payload bytes.
class RetentionTest : public GroupLogTest {
 protected:
  GroupLogOptions Opts(RetentionOptions r) {
    GroupLogOptions o;
    o.segment_records = 10;
    o.segment_bytes = 1 << 30;
    o.retention = r;
    return o;
  }
  void Fill(int n) {
    for (int i = 0; i < n; ++i)
      ASSERT_TRUE(AppendWait(log_, WriteReq(0, std::string(1000, 'r'))).ok());
    ASSERT_TRUE(SyncWait(log_).ok());
  }
};

TEST_F(RetentionTest, NeverDropsUnappliedRecordsAndDropsWholeSegments) {
  Open(Opts({}));
  Fill(35);
  auto first = log_->EnforceRetention(0);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(*first, 1u) << "nothing is applied yet";
  ASSERT_TRUE(log_->SetAppliedLsn(25).ok());
  first = log_->EnforceRetention(0);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(*first, 21u) << "segments [1,10] and [11,20] are applied; [21,30] is not all applied";
  EXPECT_EQ(log_->TruncateBefore(30).code(), absl::StatusCode::kFailedPrecondition);
  // Survives reopen, and numbering continues.
  ASSERT_TRUE(SyncWait(log_).ok());
  Open(Opts({}));
  auto st = log_->State();
  EXPECT_EQ(st.first_lsn, 21u);
  EXPECT_EQ(st.last_lsn, 35u);
  EXPECT_EQ(st.applied_lsn, 25u);
  EXPECT_EQ(st.bytes, 15u * (1000 + kRecordHeaderSize));
  EXPECT_TRUE(log_->Verify().ok());
}

TEST_F(RetentionTest, KeepsWhatAPeerNeedsUntilTheHardCap) {
  Open(Opts({.hard_cap_bytes = 25 * (1000 + kRecordHeaderSize)}));
  ASSERT_TRUE(log_->SetPeerPosition({.peer = "sun-2", .durable_lsn = 5}).ok());
  Fill(20);
  ASSERT_TRUE(log_->SetAppliedLsn(20).ok());
  auto first = log_->EnforceRetention(0);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(*first, 1u) << "sun-2 still needs LSN 6..";
  Fill(20);  // 40 records, over the 25-record cap
  ASSERT_TRUE(log_->SetAppliedLsn(40).ok());
  first = log_->EnforceRetention(0);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(*first, 21u) << "the cap forces out two segments";
  auto st = log_->State();
  ASSERT_EQ(st.peers.size(), 1u);
  EXPECT_TRUE(st.peers[0].needs_full_copy);
  ASSERT_TRUE(SyncWait(log_).ok());
  Open(Opts({}));
  EXPECT_TRUE(log_->State().peers[0].needs_full_copy) << "the mark is persisted";
}

TEST_F(RetentionTest, KeepBytesAndKeepSeconds) {
  Open(Opts({.keep_bytes = 15 * (1000 + kRecordHeaderSize)}));
  Fill(40);
  ASSERT_TRUE(log_->SetAppliedLsn(40).ok());
  auto first = log_->EnforceRetention(0);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(*first, 21u) << "keeps >= 15 records: segments [21,30], [31,40] stay";
  Open(Opts({.keep_seconds = 3600}));
  const uint64_t now =
      static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                std::chrono::system_clock::now().time_since_epoch())
                                .count());
  first = log_->EnforceRetention(now);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(*first, 21u) << "everything is younger than an hour";
  first = log_->EnforceRetention(now + 7200ull * 1000000000ull);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(*first, 41u) << "two hours later both closed segments may go; the open one stays";
}

TEST_F(RetentionTest, FullyTruncatedLogKeepsItsPosition) {
  Open(Opts({}));
  Fill(20);
  ASSERT_TRUE(log_->SetAppliedLsn(20).ok());
  ASSERT_TRUE(log_->TruncateBefore(21).ok());
  ASSERT_TRUE(SyncWait(log_).ok());
  Open(Opts({}));
  EXPECT_EQ(log_->last_lsn(), 20u);
  auto lsn = AppendWait(log_, WriteReq(0, "after"));
  ASSERT_TRUE(lsn.ok());
  EXPECT_EQ(*lsn, 21u);
}

TEST_F(GroupLogTest, AppendAfterStopFails) {
  Open();
  log_->Stop();
  auto r = AppendWait(log_, WriteReq(0, "late"));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
}

// The WAL gate: a sync never starts while a write is in flight, so a write that fails is never
// followed by a sync of the same WAL (which Debian's RocksDB aborts on), and nothing starts after a
// failure. `Returned` polls whether a thread got past Enter within a generous time.
bool Returned(const std::atomic<bool>& flag, int ms = 200) {
  for (int i = 0; i < ms; ++i) {
    if (flag.load()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return flag.load();
}

TEST(StoreHealthTest, SyncWaitsForWritesAndNeverStartsAfterAFailedOne) {
  using Call = StoreHealth::Call;
  StoreHealth h;
  ASSERT_TRUE(h.Enter(Call::kWrite).ok());
  std::atomic<bool> sync_returned{false};
  absl::Status sync_status;
  std::thread sync([&] {
    sync_status = h.Enter(Call::kSync);
    sync_returned = true;
  });
  EXPECT_FALSE(Returned(sync_returned, 100)) << "a sync started while a write was in flight";
  h.Leave(Call::kWrite, /*ok=*/false);
  ASSERT_TRUE(Returned(sync_returned));
  sync.join();
  EXPECT_FALSE(sync_status.ok()) << "a sync started after a write failed";
  EXPECT_FALSE(h.status().ok());
  EXPECT_FALSE(h.Enter(Call::kWrite).ok());
  EXPECT_FALSE(h.Enter(Call::kSync).ok());
  // The caller's account of the failure, with its context, is what status() reports.
  h.Fail(absl::InternalError("group g0: writing log at LSN 7: IO error"));
  EXPECT_EQ(h.status().message(), "group g0: writing log at LSN 7: IO error");
}

TEST(StoreHealthTest, ARefusedCallReportedFirstDoesNotHideTheFailure) {
  using Call = StoreHealth::Call;
  StoreHealth h;
  ASSERT_TRUE(h.Enter(Call::kWrite).ok());
  h.Leave(Call::kWrite, /*ok=*/false);  // the WAL write failed; its caller has not said why yet
  absl::Status refused = h.Enter(Call::kSync);
  ASSERT_FALSE(refused.ok());
  // The syncer reports the refusal (as GatedWal words it) before the writer reports its failure.
  h.Fail(absl::InternalError(
      absl::StrCat("group g0: syncing log at LSN 8: IO error: the log store failed earlier: ",
                   refused.message())));
  h.Fail(absl::ResourceExhaustedError(
      "group g0: writing log at LSN 8: IO error: No space left on device: While appending to file: "
      "/var/lib/tvilling/log/000004.log"));
  EXPECT_EQ(h.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(h.status().message().find("No space left on device"), absl::string_view::npos);
}

TEST(StoreHealthTest, WritesWaitForASyncUntilItReachesItsFsyncThenOverlapIt) {
  using Call = StoreHealth::Call;
  StoreHealth h;
  ASSERT_TRUE(h.Enter(Call::kWrite).ok());  // write 1 in flight
  std::atomic<bool> sync_entered{false}, let_fsync{false}, fsync_started{false};
  std::atomic<bool> write2_returned{false}, write2_early{false};
  std::thread sync([&] {
    EXPECT_TRUE(h.Enter(Call::kSync).ok());
    sync_entered = true;
    while (!let_fsync) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    fsync_started = true;
    h.WalSyncStarting();  // what the store's newest WAL file says when RocksDB fsyncs it
  });
  // Once the sync waits, a second write comes: it must not overtake the sync.
  while (h.syncs_waiting() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::thread write2([&] {
    EXPECT_TRUE(h.Enter(Call::kWrite).ok());
    if (!fsync_started) write2_early = true;
    write2_returned = true;
  });
  EXPECT_FALSE(Returned(write2_returned, 100)) << "a write overtook a waiting sync";
  EXPECT_FALSE(sync_entered.load());
  h.Leave(Call::kWrite, /*ok=*/true);  // write 1 done: the sync enters
  ASSERT_TRUE(Returned(sync_entered, 10000));
  // Between entering and its fsync, RocksDB checks the WAL for a failed write: none may start.
  EXPECT_FALSE(Returned(write2_returned, 100)) << "a write started before the sync's fsync did";
  let_fsync = true;
  ASSERT_TRUE(Returned(write2_returned, 10000));
  sync.join();
  write2.join();
  EXPECT_FALSE(write2_early.load());
  // Write 2 runs while the fsync runs (the committer writes the next batch during an fsync).
  h.Leave(Call::kWrite, /*ok=*/true);
  h.Leave(Call::kSync, /*ok=*/true);
  EXPECT_TRUE(h.status().ok());

  // A WAL fsync on a thread that entered no sync (a synced write's own) releases nothing; a sync
  // that returns without reaching the newest WAL's fsync releases the writes it held.
  ASSERT_TRUE(h.Enter(Call::kSync).ok());
  std::thread([&] { h.WalSyncStarting(); }).join();
  std::atomic<bool> write3_returned{false};
  std::thread write3([&] {
    EXPECT_TRUE(h.Enter(Call::kWrite).ok());
    write3_returned = true;
  });
  EXPECT_FALSE(Returned(write3_returned, 100)) << "another thread's fsync released a sync's writes";
  h.Leave(Call::kSync, /*ok=*/true);
  ASSERT_TRUE(Returned(write3_returned, 10000));
  write3.join();
  h.Leave(Call::kWrite, /*ok=*/true);

  // One sync at a time: a second waits for the first to return, holding no write back meanwhile.
  ASSERT_TRUE(h.Enter(Call::kSync).ok());
  h.WalSyncStarting();
  std::atomic<bool> sync2_entered{false}, write4_returned{false};
  std::thread sync2([&] {
    EXPECT_TRUE(h.Enter(Call::kSync).ok());
    sync2_entered = true;
    h.WalSyncStarting();
    h.Leave(Call::kSync, /*ok=*/true);
  });
  EXPECT_FALSE(Returned(sync2_entered, 100)) << "two syncs entered at once";
  std::thread write4([&] {
    EXPECT_TRUE(h.Enter(Call::kWrite).ok());
    write4_returned = true;
  });
  EXPECT_TRUE(Returned(write4_returned, 10000)) << "a sync waiting for another held a write back";
  write4.join();
  h.Leave(Call::kWrite, /*ok=*/true);
  h.Leave(Call::kSync, /*ok=*/true);
  ASSERT_TRUE(Returned(sync2_entered, 10000));
  sync2.join();

  ASSERT_TRUE(h.Enter(Call::kSync).ok());
  h.WalSyncStarting();
  ASSERT_TRUE(h.Enter(Call::kWrite).ok()) << "a write must not wait for a running fsync";
  h.Leave(Call::kWrite, true);
  h.Leave(Call::kSync, /*ok=*/false);  // a failed sync stops later writes
  EXPECT_FALSE(h.Enter(Call::kWrite).ok());
}

}  // namespace
}  // namespace tvilling::storage
