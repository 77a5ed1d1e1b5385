// rejoin_storage_test.cc: what a rejoin needs from storage, on real RocksDB stores: cutting a
// diverged log back to the fork (GroupLog::CutBackTo) and the divergent record file that holds
// the records after it (storage/divergent_file.h).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <future>

#include "storage/divergent_file.h"
#include "storage/group_log.h"
#include "tests/unit/storage/fault_env.h"
#include "tests/unit/storage/log_wait.h"
#include "tests/unit/storage/temp_dir.h"

namespace tvilling::storage {
namespace {

AppendRequest Write(uint32_t volume, uint64_t offset, std::string data) {
  AppendRequest r;
  r.volume = volume;
  r.offset = offset;
  r.length = static_cast<uint32_t>(data.size());
  r.payload = Bytes::Copy(data);
  return r;
}

class CutBackTest : public ::testing::Test {
 protected:
  void Open(const std::string& db = "db") {
    log_ = nullptr;
    store_.reset();
    auto s = LogStore::Open({.dir = dir_.path() / db});
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = std::move(*s);
    GroupLogOptions o;
    o.segment_records = 4;
    auto l = store_->OpenGroup("g", o);
    ASSERT_TRUE(l.ok()) << l.status();
    log_ = *l;
  }
  // Epoch 1: LSN 1..10, epoch 2: LSN 11..25 (an old primary's unreplicated tail).
  void Fill() {
    ASSERT_TRUE(log_->BeginEpoch(1).ok());
    for (int i = 1; i <= 10; ++i)
      ASSERT_TRUE(AppendWait(log_, Write(0, i * 512, "a" + std::to_string(i))).ok());
    ASSERT_TRUE(log_->BeginEpoch(2).ok());
    for (int i = 11; i <= 25; ++i)
      ASSERT_TRUE(AppendWait(log_, Write(1, i * 512, "b" + std::to_string(i))).ok());
    ASSERT_TRUE(SyncWait(log_).ok());
  }
  TempDir dir_;
  std::unique_ptr<LogStore> store_;
  GroupLog* log_ = nullptr;
};

TEST_F(CutBackTest, CutsRecordsHistoryAndAppliedAtomicallyAndSurvivesReopen) {
  Open();
  Fill();
  ASSERT_TRUE(log_->SetAppliedLsn(20).ok());  // the fork is inside the applied range
  ASSERT_TRUE(SyncWait(log_).ok());
  ReplicaMeta meta;
  meta.newest_epoch_seen = 3;
  meta.consistent = false;
  meta.restore_pending = true;
  meta.restore_extents = {{1, 5120, 2048}, {1, 65536, 4096}};
  ASSERT_TRUE(log_->CutBackTo(8, 25, {{1, 1}}, meta).ok());
  auto check = [&] {
    GroupLogState s = log_->State();
    EXPECT_EQ(s.first_lsn, 1u);
    EXPECT_EQ(s.last_lsn, 8u);
    EXPECT_EQ(s.durable_lsn, 8u);
    EXPECT_EQ(s.applied_lsn, 8u);
    EXPECT_EQ(s.current_epoch, 1u);
    EXPECT_EQ(s.history, (std::vector<EpochStart>{{1, 1}}));
    EXPECT_EQ(s.replica, meta);
    uint64_t bytes = 0;
    ASSERT_TRUE(log_->ReadRange(1, 8,
                                [&](const LogRecordView& r) {
                                  bytes += StoredSize(r);
                                  return absl::OkStatus();
                                })
                    .ok());
    EXPECT_EQ(s.bytes, bytes);
    EXPECT_TRUE(log_->Verify().ok()) << log_->Verify();
    EXPECT_EQ(log_->ReadRange(9, 9, [](const LogRecordView&) { return absl::OkStatus(); }).code(),
              absl::StatusCode::kDataLoss);
  };
  check();
  Open();
  check();
  // The log goes on from the fork in a new epoch.
  ASSERT_TRUE(log_->BeginEpoch(3).ok());
  auto lsn = AppendWait(log_, Write(0, 0, "new"));
  ASSERT_TRUE(lsn.ok());
  EXPECT_EQ(*lsn, 9u);
  ASSERT_TRUE(SyncWait(log_).ok());
  Open();
  EXPECT_EQ(log_->State().history, (std::vector<EpochStart>{{1, 1}, {3, 9}}));
  EXPECT_TRUE(log_->Verify().ok());
  // Retention still works over the rebuilt segments.
  ASSERT_TRUE(log_->SetAppliedLsn(9).ok());
  auto first = log_->EnforceRetention(0);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_GT(*first, 1u);
  EXPECT_TRUE(log_->Verify().ok());
}

TEST_F(CutBackTest, ForkBelowTheFirstRecordLeavesAnEmptyLog) {
  Open();
  Fill();
  ASSERT_TRUE(log_->SetAppliedLsn(12).ok());
  ASSERT_TRUE(SyncWait(log_).ok());
  ASSERT_TRUE(log_->TruncateBefore(9).ok());
  ASSERT_TRUE(log_->CutBackTo(5, 25, {{1, 1}}, ReplicaMeta{}).ok());
  Open();
  GroupLogState s = log_->State();
  EXPECT_EQ(s.first_lsn, 6u);
  EXPECT_EQ(s.last_lsn, 5u);
  EXPECT_EQ(s.applied_lsn, 5u);
  EXPECT_EQ(s.bytes, 0u);
}

TEST_F(CutBackTest, RefusesBadArguments) {
  Open();
  Fill();
  EXPECT_EQ(log_->CutBackTo(25, 25, {{1, 1}, {2, 11}}, {}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(log_->CutBackTo(8, 25, {{1, 1}, {2, 11}}, {}).code(),
            absl::StatusCode::kInvalidArgument)
      << "a history entry after the fork";
  const absl::Status grew = log_->CutBackTo(8, 24, {{1, 1}}, {});
  EXPECT_EQ(grew.code(), absl::StatusCode::kFailedPrecondition) << "the log grew after the save";
  EXPECT_NE(std::string(grew.message()).find("ends at LSN 25, not at the LSN 24"),
            std::string::npos)
      << grew;
  EXPECT_EQ(log_->State().last_lsn, 25u);
}

// The old state or the new one, never a mixture: the cut is one synced WriteBatch. A child
// process is killed with SIGKILL right after the cut returns and before it: both reopen cleanly.
// Both children are forked before this process opens a store: a child forked from a process
// with RocksDB's background threads would inherit a thread pool without its threads (and
// ThreadSanitizer refuses to run one).
TEST_F(CutBackTest, KillBeforeOrAfterTheCutLeavesOldOrNewState) {
  for (int after : {0, 1}) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      Open("db" + std::to_string(after));
      Fill();
      if (after) {
        ReplicaMeta meta;
        meta.restore_pending = true;
        if (!log_->CutBackTo(8, 25, {{1, 1}}, meta).ok()) _exit(3);
      }
      kill(getpid(), SIGKILL);
      _exit(4);
    }
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with " << WEXITSTATUS(status);
  }
  for (int after : {0, 1}) {
    SCOPED_TRACE(after ? "killed after the cut" : "killed before the cut");
    Open("db" + std::to_string(after));
    GroupLogState s = log_->State();
    EXPECT_EQ(s.last_lsn, after ? 8u : 25u);
    EXPECT_EQ(s.replica.restore_pending, after == 1);
    EXPECT_EQ(s.history.size(), after ? 1u : 2u);
    EXPECT_TRUE(log_->Verify().ok()) << log_->Verify();
    log_ = nullptr;
    store_.reset();
  }
}

// A power cut (the fault env drops whatever was not synced): right after CutBackTo returned the
// cut log is what comes back; when the cut's write fails (the power is already gone), the old log
// comes back intact.
TEST(CutBackPowerCut, SyncedCutSurvivesAFailedOneChangesNothing) {
  for (bool cut_before_crash : {true, false}) {
    SCOPED_TRACE(cut_before_crash ? "cut, then power cut" : "power cut during the cut");
    TempDir dir;
    FaultEnv fault;
    {
      auto store = LogStore::Open({.dir = dir.path() / "db", .env = fault.env()});
      ASSERT_TRUE(store.ok()) << store.status();
      auto log = (*store)->OpenGroup("g", {.segment_records = 4});
      ASSERT_TRUE(log.ok());
      ASSERT_TRUE((*log)->BeginEpoch(1).ok());
      for (int i = 1; i <= 10; ++i) ASSERT_TRUE(AppendWait(*log, Write(0, i * 512, "a")).ok());
      ASSERT_TRUE((*log)->BeginEpoch(2).ok());
      for (int i = 11; i <= 20; ++i) ASSERT_TRUE(AppendWait(*log, Write(0, i * 512, "b")).ok());
      ASSERT_TRUE(SyncWait(*log).ok());
      ReplicaMeta meta;
      meta.restore_pending = true;
      meta.restore_extents = {{0, 5632, 5120}};
      if (cut_before_crash) {
        ASSERT_TRUE((*log)->CutBackTo(10, 20, {{1, 1}}, meta).ok());
        fault.Crash();
      } else {
        fault.Crash();
        EXPECT_FALSE((*log)->CutBackTo(10, 20, {{1, 1}}, meta).ok());
      }
      store->reset();
    }
    ASSERT_TRUE(fault.DropUnsyncedData().ok());
    auto store = LogStore::Open({.dir = dir.path() / "db", .env = fault.env()});
    ASSERT_TRUE(store.ok()) << store.status();
    auto log = (*store)->OpenGroup("g", {.segment_records = 4});
    ASSERT_TRUE(log.ok()) << log.status();
    const GroupLogState s = (*log)->State();
    EXPECT_EQ(s.last_lsn, cut_before_crash ? 10u : 20u);
    EXPECT_EQ(s.history.size(), cut_before_crash ? 1u : 2u);
    EXPECT_EQ(s.replica.restore_pending, cut_before_crash);
    EXPECT_EQ(s.replica.restore_extents.size(), cut_before_crash ? 1u : 0u);
    EXPECT_TRUE((*log)->Verify().ok()) << (*log)->Verify();
  }
}

TEST(DivergentFile, RoundTripAndDamageIsDetected) {
  TempDir dir;
  auto store = LogStore::Open({.dir = dir.path() / "db"});
  ASSERT_TRUE(store.ok());
  auto log = (*store)->OpenGroup("g", {});
  ASSERT_TRUE(log.ok());
  ASSERT_TRUE((*log)->BeginEpoch(4).ok());
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(AppendWait(*log, Write(i % 2, 4096 * i, std::string(100 + i, 'a' + i))).ok());
  }
  DivergentFileInfo info;
  info.group = "g";
  info.group_id = (*log)->group_id();
  info.fork_lsn = 2;
  info.first_lsn = 3;
  info.last_lsn = 5;
  info.saved_unix_ns = 1'700'000'000'123'456'789ull;
  info.primary_epoch = 7;
  info.primary_site = "b";
  auto w = DivergentFileWriter::Create(dir.path() / "divergent", info);
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE((*log)
                  ->ReadRaw(3, 5, UINT64_MAX, UINT32_MAX,
                            [&](uint64_t lsn, std::string_view v) { return (*w)->Add(lsn, v); })
                  .ok());
  auto path = (*w)->Finish();
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(path->filename().string(), "g-fork2-20231114T221320.123456789Z.tvdiv");
  // Only the final file is left.
  int files = 0;
  for (auto& e : std::filesystem::directory_iterator(dir.path() / "divergent")) {
    (void)e;
    ++files;
  }
  EXPECT_EQ(files, 1);

  DivergentFileInfo got;
  std::vector<DivergentRecord> recs;
  absl::Status st = ReadDivergentFile(*path, &got, [&](const DivergentRecord& r) {
    recs.push_back(r);
    return absl::OkStatus();
  });
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(got.group, "g");
  EXPECT_EQ(got.fork_lsn, 2u);
  EXPECT_EQ(got.primary_site, "b");
  EXPECT_EQ(got.primary_epoch, 7u);
  ASSERT_EQ(recs.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(recs[i].lsn, 3u + i);
    EXPECT_TRUE(recs[i].checksum_ok);
    EXPECT_EQ(recs[i].header.epoch, 4u);
    EXPECT_EQ(recs[i].header.offset, 4096u * (2 + i));
    EXPECT_EQ(recs[i].payload, std::string(102 + i, 'c' + i));
  }

  // A flipped payload byte: the record is still handed out, marked; the file hash fails.
  std::string bytes;
  {
    std::ifstream in(*path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto write = [&](const std::string& b) {
    std::ofstream out(*path, std::ios::binary | std::ios::trunc);
    out.write(b.data(), static_cast<std::streamsize>(b.size()));
  };
  std::string damaged = bytes;
  damaged[damaged.size() - 40] ^= 1;  // in the last record's payload
  write(damaged);
  recs.clear();
  st = ReadDivergentFile(*path, nullptr, [&](const DivergentRecord& r) {
    recs.push_back(r);
    return absl::OkStatus();
  });
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(std::string(st.message()).find("hash mismatch"), std::string::npos) << st;
  ASSERT_EQ(recs.size(), 3u);
  EXPECT_FALSE(recs[2].checksum_ok);
  // Truncated: incomplete.
  write(bytes.substr(0, bytes.size() - 20));
  st = ReadDivergentFile(*path, nullptr, [](const DivergentRecord&) { return absl::OkStatus(); });
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(std::string(st.message()).find("truncated"), std::string::npos) << st;
  // Not ours.
  write("hello world, this is not a divergent file at all");
  st = ReadDivergentFile(*path, nullptr, [](const DivergentRecord&) { return absl::OkStatus(); });
  EXPECT_NE(std::string(st.message()).find("bad magic"), std::string::npos) << st;
}

}  // namespace
}  // namespace tvilling::storage
