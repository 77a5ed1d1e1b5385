// fault_env_test.cc: tests of FaultEnv: its model on single files and directories, then a real
// RocksDB through it (sync=false is lost, sync=true survives, memtable flushes, many crash cycles).
#include "tests/unit/storage/fault_env.h"

#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <stdlib.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace tvilling::storage {
namespace {

namespace fs = std::filesystem;
using rocksdb::IOOptions;

fs::path MakeTempDir() {
  std::string tmpl = fs::temp_directory_path() / "tvilling-faultenv-XXXXXX";
  EXPECT_NE(::mkdtemp(tmpl.data()), nullptr) << std::strerror(errno);
  return fs::path(tmpl);
}

std::string Slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string Key(int k) {
  std::string s = std::to_string(k);
  return "key" + std::string(8 - s.size(), '0') + s;
}

void Spit(const fs::path& p, const std::string& data) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << data;
}

// ---------------------------------------------------------------------------------------------
// The model, driven through the FileSystem API directly.

class FaultFsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir();
    fs_ = env_.file_system();
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::unique_ptr<rocksdb::FSWritableFile> Create(const fs::path& p) {
    std::unique_ptr<rocksdb::FSWritableFile> f;
    rocksdb::IOStatus s = fs_->NewWritableFile(p.string(), rocksdb::FileOptions(), &f, nullptr);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return f;
  }
  void Append(rocksdb::FSWritableFile& f, const std::string& data) {
    ASSERT_TRUE(f.Append(data, IOOptions(), nullptr).ok());
  }
  void Sync(rocksdb::FSWritableFile& f) { ASSERT_TRUE(f.Sync(IOOptions(), nullptr).ok()); }
  void Close(rocksdb::FSWritableFile& f) { ASSERT_TRUE(f.Close(IOOptions(), nullptr).ok()); }
  void SyncDir() {
    std::unique_ptr<rocksdb::FSDirectory> d;
    ASSERT_TRUE(fs_->NewDirectory(dir_.string(), IOOptions(), &d, nullptr).ok());
    ASSERT_TRUE(d->Fsync(IOOptions(), nullptr).ok());
  }
  // A file with `data`, synced, its creation durable.
  void Durable(const fs::path& p, const std::string& data) {
    auto f = Create(p);
    Append(*f, data);
    Sync(*f);
    Close(*f);
    SyncDir();
  }

  FaultEnv env_;
  std::shared_ptr<rocksdb::FileSystem> fs_;
  fs::path dir_;
};

TEST_F(FaultFsTest, DataAfterTheLastSyncIsDropped) {
  const fs::path p = dir_ / "a";
  auto f = Create(p);
  Append(*f, "synced-");
  Sync(*f);
  Append(*f, "lost");
  ASSERT_TRUE(f->RangeSync(0, 11, IOOptions(), nullptr).ok());  // not a durability point
  Close(*f);
  SyncDir();
  EXPECT_EQ(Slurp(p), "synced-lost");  // no crash yet: everything is there
  ASSERT_TRUE(env_.DropUnsyncedData().ok());
  EXPECT_EQ(Slurp(p), "synced-");
  EXPECT_EQ(env_.tracked_files(), 0u);
}

TEST_F(FaultFsTest, CreationWithoutDirectorySyncIsUndoneEvenIfDataWasSynced) {
  const fs::path p = dir_ / "new";
  auto f = Create(p);
  Append(*f, "data");
  Sync(*f);
  Close(*f);
  ASSERT_TRUE(fs::exists(p));
  ASSERT_TRUE(env_.DropUnsyncedData().ok());
  EXPECT_FALSE(fs::exists(p));
}

TEST_F(FaultFsTest, DurableCreationWithoutDataSyncLeavesAnEmptyFile) {
  const fs::path p = dir_ / "empty";
  auto f = Create(p);
  Append(*f, "never synced");
  Close(*f);
  SyncDir();
  ASSERT_TRUE(env_.DropUnsyncedData().ok());
  ASSERT_TRUE(fs::exists(p));
  EXPECT_EQ(fs::file_size(p), 0u);
}

TEST_F(FaultFsTest, RenameOverAFileIsUndoneWithoutDirectorySync) {
  // RocksDB's CURRENT update: write a temp file, sync it, rename it over CURRENT, fsync the dir.
  Durable(dir_ / "CURRENT", "MANIFEST-1\n");
  auto tmp = Create(dir_ / "000002.dbtmp");
  Append(*tmp, "MANIFEST-2\n");
  Sync(*tmp);
  Close(*tmp);
  ASSERT_TRUE(fs_->RenameFile((dir_ / "000002.dbtmp").string(), (dir_ / "CURRENT").string(),
                              IOOptions(), nullptr)
                  .ok());
  EXPECT_EQ(Slurp(dir_ / "CURRENT"), "MANIFEST-2\n");
  ASSERT_TRUE(env_.DropUnsyncedData().ok());
  EXPECT_EQ(Slurp(dir_ / "CURRENT"), "MANIFEST-1\n");
  EXPECT_FALSE(fs::exists(dir_ / "000002.dbtmp"));  // its creation was not durable either
}

TEST_F(FaultFsTest, RenameFollowedByDirectorySyncIsKept) {
  Durable(dir_ / "CURRENT", "MANIFEST-1\n");
  auto tmp = Create(dir_ / "tmp");
  Append(*tmp, "MANIFEST-2\n");
  Sync(*tmp);
  Close(*tmp);
  ASSERT_TRUE(
      fs_->RenameFile((dir_ / "tmp").string(), (dir_ / "CURRENT").string(), IOOptions(), nullptr)
          .ok());
  SyncDir();
  EXPECT_EQ(env_.pending_namespace_ops(), 0u);
  ASSERT_TRUE(env_.DropUnsyncedData().ok());
  EXPECT_EQ(Slurp(dir_ / "CURRENT"), "MANIFEST-2\n");
  EXPECT_FALSE(fs::exists(dir_ / "tmp"));
}

TEST_F(FaultFsTest, DeleteWithoutDirectorySyncComesBackWithItsSyncedData) {
  const fs::path p = dir_ / "old.log";
  auto f = Create(p);
  Append(*f, "durable|");
  Sync(*f);
  Append(*f, "volatile");
  Close(*f);
  SyncDir();
  ASSERT_TRUE(fs_->DeleteFile(p.string(), IOOptions(), nullptr).ok());
  ASSERT_FALSE(fs::exists(p));
  ASSERT_TRUE(env_.DropUnsyncedData().ok());
  EXPECT_EQ(Slurp(p), "durable|");
}

TEST_F(FaultFsTest, DeleteFollowedByDirectorySyncIsKept) {
  const fs::path p = dir_ / "gone";
  Durable(p, "x");
  ASSERT_TRUE(fs_->DeleteFile(p.string(), IOOptions(), nullptr).ok());
  SyncDir();
  ASSERT_TRUE(env_.DropUnsyncedData().ok());
  EXPECT_FALSE(fs::exists(p));
}

TEST_F(FaultFsTest, UntouchedFilesAreLeftAlone) {
  Spit(dir_ / "outside", "written without the env");
  Durable(dir_ / "inside", "y");
  ASSERT_TRUE(env_.DropUnsyncedData().ok());
  EXPECT_EQ(Slurp(dir_ / "outside"), "written without the env");
  EXPECT_EQ(Slurp(dir_ / "inside"), "y");
}

TEST_F(FaultFsTest, CrashMakesWritesSyncsAndRenamesFailWithoutEffect) {
  const fs::path p = dir_ / "f";
  Durable(dir_ / "keep", "k");
  auto f = Create(p);
  Append(*f, "before|");
  Sync(*f);
  env_.Crash();
  EXPECT_TRUE(env_.crashed());
  EXPECT_TRUE(f->Append("after", IOOptions(), nullptr).IsIOError());
  EXPECT_TRUE(f->Sync(IOOptions(), nullptr).IsIOError());
  EXPECT_TRUE(
      fs_->RenameFile((dir_ / "keep").string(), (dir_ / "moved").string(), IOOptions(), nullptr)
          .IsIOError());
  EXPECT_TRUE(fs_->DeleteFile((dir_ / "keep").string(), IOOptions(), nullptr).IsIOError());
  std::unique_ptr<rocksdb::FSWritableFile> g;
  EXPECT_TRUE(
      fs_->NewWritableFile((dir_ / "g").string(), rocksdb::FileOptions(), &g, nullptr).IsIOError());
  EXPECT_FALSE(fs::exists(dir_ / "g"));
  EXPECT_EQ(Slurp(p), "before|");  // the failed append wrote nothing
  Close(*f);
  ASSERT_TRUE(env_.DropUnsyncedData().ok());
  EXPECT_FALSE(env_.crashed());
  EXPECT_FALSE(fs::exists(p));  // its creation was never made durable
  EXPECT_EQ(Slurp(dir_ / "keep"), "k");
}

TEST_F(FaultFsTest, DropRefusesWhileAFileIsOpenForWriting) {
  auto f = Create(dir_ / "open");
  Append(*f, "abc");
  absl::Status s = env_.DropUnsyncedData();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(std::string(s.message()).find("open"), std::string::npos) << s;
  EXPECT_EQ(Slurp(dir_ / "open"), "abc");  // nothing changed
  f.reset();                               // destroyed without Close counts as closed
  EXPECT_TRUE(env_.DropUnsyncedData().ok());
}

TEST_F(FaultFsTest, RefusesFileKindsOutsideTheModel) {
  std::unique_ptr<rocksdb::FSRandomRWFile> rw;
  EXPECT_TRUE(fs_->NewRandomRWFile((dir_ / "rw").string(), rocksdb::FileOptions(), &rw, nullptr)
                  .IsNotSupported());
}

// Polls `pred` every millisecond for up to 30 s (the holds below wait for another thread).
template <typename Pred>
bool Eventually(Pred pred) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

TEST_F(FaultFsTest, HeldWalSyncWaitsForReleaseAndCoversOnlyWhatCameBeforeIt) {
  auto wal = Create(dir_ / "000004.log");
  auto manifest = Create(dir_ / "MANIFEST-000001");
  SyncDir();
  Append(*wal, "before|");
  Append(*manifest, "m");
  env_.HoldWalSyncs();
  Sync(*manifest);  // not a WAL: never held
  EXPECT_EQ(env_.wal_syncs(), 0u);
  std::atomic<bool> synced{false};
  rocksdb::IOStatus status;
  std::thread syncer([&] {
    status = wal->Sync(IOOptions(), nullptr);
    synced = true;
  });
  const bool held = Eventually([&] { return env_.waiting_wal_syncs() == 1; });
  if (held) Append(*wal, "after");  // written while the sync is in flight: not covered by it
  EXPECT_FALSE(synced.load());
  env_.ReleaseWalSyncs();
  syncer.join();
  ASSERT_TRUE(held);
  EXPECT_TRUE(status.ok()) << status.ToString();
  EXPECT_EQ(env_.waiting_wal_syncs(), 0u);
  EXPECT_EQ(env_.wal_syncs(), 1u);
  Sync(*wal);  // no longer held
  EXPECT_EQ(env_.wal_syncs(), 2u);
  Append(*wal, "|lost");
  Close(*wal);
  Close(*manifest);
  ASSERT_TRUE(env_.DropUnsyncedData().ok());
  EXPECT_EQ(Slurp(dir_ / "000004.log"), "before|after");
}

TEST_F(FaultFsTest, CrashWhileAWalSyncIsHeldFailsIt) {
  auto wal = Create(dir_ / "000004.log");
  SyncDir();
  Append(*wal, "synced|");
  Sync(*wal);
  Append(*wal, "pending");
  env_.HoldWalSyncs();
  rocksdb::IOStatus status;
  std::thread syncer([&] { status = wal->Fsync(IOOptions(), nullptr); });
  const bool held = Eventually([&] { return env_.waiting_wal_syncs() == 1; });
  env_.Crash();
  env_.ReleaseWalSyncs();
  syncer.join();
  ASSERT_TRUE(held);
  EXPECT_TRUE(status.IsIOError()) << status.ToString();
  Close(*wal);
  ASSERT_TRUE(env_.DropUnsyncedData().ok());
  EXPECT_EQ(Slurp(dir_ / "000004.log"), "synced|");
}

// ---------------------------------------------------------------------------------------------
// A real RocksDB through the env.

class FaultDbTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir();
    Open();
  }
  void TearDown() override {
    db_.reset();
    fs::remove_all(dir_);
  }

  void Open() {
    rocksdb::Options o;
    o.create_if_missing = true;
    o.env = env_.env();
    o.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
    o.info_log_level = rocksdb::InfoLogLevel::WARN_LEVEL;
    rocksdb::DB* raw = nullptr;
    rocksdb::Status s = rocksdb::DB::Open(o, (dir_ / "db").string(), &raw);
    ASSERT_TRUE(s.ok()) << s.ToString();
    db_.reset(raw);
  }
  // Power cut, then restart.
  void CrashAndReopen() {
    env_.Crash();
    db_.reset();  // the DB's own shutdown can no longer persist anything
    absl::Status s = env_.DropUnsyncedData();
    ASSERT_TRUE(s.ok()) << s;
    Open();
  }
  void Put(const std::string& k, const std::string& v, bool sync) {
    rocksdb::WriteOptions wo;
    wo.sync = sync;
    rocksdb::Status s = db_->Put(wo, k, v);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  // The value, or "<none>".
  std::string Get(const std::string& k) {
    if (!db_) return "<no db>";
    std::string v;
    rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), k, &v);
    if (s.IsNotFound()) return "<none>";
    EXPECT_TRUE(s.ok()) << s.ToString();
    return v;
  }
  int SstFiles() {
    int n = 0;
    for (const auto& e : fs::directory_iterator(dir_ / "db")) n += e.path().extension() == ".sst";
    return n;
  }

  FaultEnv env_;
  fs::path dir_;
  std::unique_ptr<rocksdb::DB> db_;
};

TEST_F(FaultDbTest, UnsyncedPutSurvivesWithoutAPowerCut) {
  // The control: the data does reach the files, so losing it below is the env's doing.
  Put("k", "v", /*sync=*/false);
  env_.Crash();
  db_.reset();
  ASSERT_TRUE(env_.ForgetUnsyncedState().ok());
  Open();
  EXPECT_EQ(Get("k"), "v");
}

TEST_F(FaultDbTest, UnsyncedPutIsLost) {
  Put("k", "v", /*sync=*/false);
  CrashAndReopen();
  EXPECT_EQ(Get("k"), "<none>");
}

TEST_F(FaultDbTest, SyncedPutSurvives) {
  Put("k", "v", /*sync=*/true);
  CrashAndReopen();
  EXPECT_EQ(Get("k"), "v");
}

TEST_F(FaultDbTest, SyncedPutMakesEarlierUnsyncedPutsDurable) {
  Put("a", "1", false);
  Put("b", "2", true);
  Put("c", "3", false);
  CrashAndReopen();
  EXPECT_EQ(Get("a"), "1");
  EXPECT_EQ(Get("b"), "2");
  EXPECT_EQ(Get("c"), "<none>");
}

TEST_F(FaultDbTest, FlushWalWithSyncMakesUnsyncedPutsDurable) {
  Put("a", "1", false);
  ASSERT_TRUE(db_->FlushWAL(/*sync=*/true).ok());
  Put("b", "2", false);
  CrashAndReopen();
  EXPECT_EQ(Get("a"), "1");
  EXPECT_EQ(Get("b"), "<none>");
}

TEST_F(FaultDbTest, SyncAfterTheCrashPersistsNothing) {
  Put("a", "1", false);
  env_.Crash();
  EXPECT_FALSE(db_->FlushWAL(/*sync=*/true).ok());
  db_.reset();
  ASSERT_TRUE(env_.DropUnsyncedData().ok());
  Open();
  EXPECT_EQ(Get("a"), "<none>");
}

TEST_F(FaultDbTest, MemtableFlushMakesUnsyncedPutsDurable) {
  Put("a", "1", false);
  ASSERT_TRUE(db_->Flush(rocksdb::FlushOptions()).ok());
  ASSERT_GE(SstFiles(), 1);
  Put("b", "2", false);  // into the new WAL, never synced
  CrashAndReopen();
  EXPECT_EQ(Get("a"), "1");
  EXPECT_EQ(Get("b"), "<none>");
  EXPECT_GE(SstFiles(), 1);
}

TEST_F(FaultDbTest, SyncedWriteInTheWalAfterAFlushSurvives) {
  Put("a", "1", false);
  ASSERT_TRUE(db_->Flush(rocksdb::FlushOptions()).ok());
  Put("b", "2", false);
  Put("c", "3", true);  // the first sync of the new WAL also syncs its directory entry
  Put("d", "4", false);
  CrashAndReopen();
  EXPECT_EQ(Get("a"), "1");
  EXPECT_EQ(Get("b"), "2");
  EXPECT_EQ(Get("c"), "3");
  EXPECT_EQ(Get("d"), "<none>");
}

TEST_F(FaultDbTest, ExactlyTheSyncedPrefixSurvivesManyCrashes) {
  std::mt19937_64 rng(20240601);
  int next = 0;
  int durable = 0;  // keys [0, durable) must be present, [durable, next) absent
  for (int round = 0; round < 6; ++round) {
    const int writes = 50 + static_cast<int>(rng() % 150);
    for (int i = 0; i < writes; ++i) {
      const bool sync = rng() % 10 == 0;
      Put(Key(next), std::string(100 + rng() % 2000, static_cast<char>('a' + round)), sync);
      ++next;
      if (sync) durable = next;
      if (rng() % 60 == 0) {
        ASSERT_TRUE(db_->Flush(rocksdb::FlushOptions()).ok());
        durable = next;
      }
    }
    CrashAndReopen();
    for (int k = 0; k < next; ++k) {
      const bool present = Get(Key(k)) != "<none>";
      ASSERT_EQ(present, k < durable)
          << "round " << round << " key " << k << " durable " << durable << " written " << next;
    }
    next = durable;  // the lost keys are written again in the next round
  }
}

}  // namespace
}  // namespace tvilling::storage
