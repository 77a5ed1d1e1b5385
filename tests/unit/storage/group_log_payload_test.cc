// group_log_payload_test.cc: external payloads (docs/log-format.md, "External payloads"): large
// payloads in the group's payload files, RocksDB holding a reference; round trips through every
// reader and the replica, retention, reset and cut-back, and the torn-tail rule at open.
#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "storage/group_log.h"
#include "storage/payload_files.h"
#include "tests/unit/storage/fault_env.h"
#include "tests/unit/storage/log_wait.h"
#include "tests/unit/storage/temp_dir.h"

namespace tvilling::storage {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kThreshold = 1024;

// A payload that says which record it belongs to: `tag` repeated.
std::string PayloadOf(uint64_t tag, size_t size) {
  std::string p(size, '\0');
  for (size_t i = 0; i < size; ++i) p[i] = static_cast<char>('a' + (tag * 7 + i / 8) % 26);
  return p;
}

AppendRequest WriteReq(uint64_t tag, size_t size, bool sync = false) {
  AppendRequest r;
  r.offset = tag * 4096;
  r.length = static_cast<uint32_t>(size);
  r.payload = Bytes::Copy(PayloadOf(tag, size));
  r.sync = sync;
  return r;
}

// Every record's payload, by LSN, through ReadRange.
absl::StatusOr<std::map<uint64_t, std::string>> ReadPayloads(GroupLog* log) {
  std::map<uint64_t, std::string> out;
  const GroupLogState st = log->State();
  absl::Status s = log->ReadRange(st.first_lsn, st.last_lsn, [&](const LogRecordView& r) {
    out[r.lsn] = std::string(r.payload);
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  return out;
}

std::string RawValue(LogStore* store, uint32_t gid, uint64_t lsn) {
  std::string v;
  EXPECT_TRUE(store->db()->Get(rocksdb::ReadOptions(), EncodeLogKey(gid, lsn), &v).ok());
  return v;
}

// The segments' payload files (`<first LSN>.pay`), or the recycled ones (`free-<n>`).
std::vector<fs::path> PayloadFilesOf(const fs::path& store_dir, uint32_t gid,
                                     bool recycled = false) {
  std::vector<fs::path> out;
  const fs::path d = store_dir / "payload" / std::to_string(gid);
  if (!fs::exists(d)) return out;
  for (const auto& e : fs::directory_iterator(d)) {
    if (e.path().filename().string().starts_with("free-") == recycled) out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

ino_t InodeOf(const fs::path& p) {
  struct stat st {};
  EXPECT_EQ(stat(p.c_str(), &st), 0) << p;
  return st.st_ino;
}

// Overwrites one byte of `path` at `offset` (through its own descriptor; the page cache is shared).
void FlipByte(const fs::path& path, uint64_t offset) {
  const int fd = open(path.c_str(), O_RDWR);
  ASSERT_GE(fd, 0) << path;
  char c = 0;
  ASSERT_EQ(pread(fd, &c, 1, static_cast<off_t>(offset)), 1);
  c = static_cast<char>(c ^ 0x5a);
  ASSERT_EQ(pwrite(fd, &c, 1, static_cast<off_t>(offset)), 1);
  close(fd);
}

class PayloadTest : public ::testing::Test {
 protected:
  GroupLogOptions Options() {
    GroupLogOptions o;
    o.external_payload_min_bytes = kThreshold;
    o.max_batch_records = 8;
    return o;
  }
  void Open(GroupLogOptions opts, rocksdb::Env* env = nullptr) {
    log_ = nullptr;
    store_.reset();
    auto s = LogStore::Open({.dir = StoreDir(), .env = env});
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = std::move(*s);
    auto l = store_->OpenGroup("g0", opts);
    ASSERT_TRUE(l.ok()) << l.status();
    log_ = *l;
  }
  absl::Status Reopen(GroupLogOptions opts, rocksdb::Env* env = nullptr) {
    log_ = nullptr;
    store_.reset();
    auto s = LogStore::Open({.dir = StoreDir(), .env = env});
    if (!s.ok()) return s.status();
    store_ = std::move(*s);
    auto l = store_->OpenGroup("g0", opts);
    if (!l.ok()) return l.status();
    log_ = *l;
    return absl::OkStatus();
  }
  fs::path StoreDir() const { return dir_.path() / "log"; }
  // Appends records with the given payload sizes (tags = their index) and returns their LSNs.
  std::vector<uint64_t> AppendSizes(const std::vector<size_t>& sizes, uint64_t first_tag = 0) {
    std::vector<uint64_t> lsns;
    for (size_t i = 0; i < sizes.size(); ++i) {
      auto lsn = AppendWait(log_, WriteReq(first_tag + i, sizes[i]));
      EXPECT_TRUE(lsn.ok()) << lsn.status();
      lsns.push_back(lsn.value_or(0));
    }
    return lsns;
  }

  TempDir dir_;
  std::unique_ptr<LogStore> store_;
  GroupLog* log_ = nullptr;
};

TEST_F(PayloadTest, InlineAndExternalRecordsRoundTripThroughEveryReaderAndReopen) {
  Open(Options());
  const std::vector<size_t> sizes = {100, kThreshold - 1, kThreshold, 4096, 200 << 10, 16, 8};
  const std::vector<uint64_t> lsns = AppendSizes(sizes);
  auto trim = AppendWait(log_, [] {
    AppendRequest r;
    r.type = RecordType::kTrim;
    r.offset = 0;
    r.length = 1 << 20;
    return r;
  }());
  ASSERT_TRUE(trim.ok());
  const uint32_t gid = log_->group_id();
  // Below the threshold the value is header + payload; at and above it header + reference.
  for (size_t i = 0; i < sizes.size(); ++i) {
    const std::string v = RawValue(store_.get(), gid, lsns[i]);
    if (sizes[i] >= kThreshold) {
      EXPECT_EQ(v.size(), kExternalValueSize) << "LSN " << lsns[i];
      EXPECT_TRUE(IsExternalValue(v));
    } else {
      EXPECT_EQ(v.size(), kRecordHeaderSize + sizes[i]) << "LSN " << lsns[i];
      EXPECT_FALSE(IsExternalValue(v));  // a 16-byte inline payload included
    }
  }
  EXPECT_EQ(PayloadFilesOf(StoreDir(), gid).size(), 1u);
  // Byte counts measure stored sizes (header + payload) either way.
  uint64_t want_bytes = kRecordHeaderSize;  // the trim
  for (size_t s : sizes) want_bytes += kRecordHeaderSize + s;
  EXPECT_EQ(log_->State().bytes, want_bytes);

  auto check = [&] {
    auto payloads = ReadPayloads(log_);
    ASSERT_TRUE(payloads.ok()) << payloads.status();
    for (size_t i = 0; i < sizes.size(); ++i) {
      EXPECT_EQ((*payloads)[lsns[i]], PayloadOf(i, sizes[i])) << "LSN " << lsns[i];
    }
    // ReadRaw: header and payload contiguous, exactly what an inline record stores.
    size_t seen = 0;
    ASSERT_TRUE(log_->ReadRaw(1, UINT64_MAX, 1 << 30, 1000,
                              [&](uint64_t lsn, std::string_view stored) {
                                auto rec = DecodeRecord(gid, lsn, stored);
                                if (!rec.ok()) return rec.status();
                                if (lsn <= sizes.size()) {
                                  EXPECT_EQ(rec->payload, PayloadOf(lsn - 1, sizes[lsn - 1]));
                                }
                                ++seen;
                                return absl::OkStatus();
                              })
                    .ok());
    EXPECT_EQ(seen, sizes.size() + 1);
    EXPECT_TRUE(log_->Verify().ok()) << log_->Verify();
  };
  check();
  ASSERT_TRUE(Reopen(Options()).ok());
  check();
  // Read at another threshold (0: all inline from now on), and appends continue.
  GroupLogOptions off = Options();
  off.external_payload_min_bytes = 0;
  ASSERT_TRUE(Reopen(off).ok());
  check();
  auto more = AppendWait(log_, WriteReq(99, 8192));
  ASSERT_TRUE(more.ok());
  EXPECT_FALSE(IsExternalValue(RawValue(store_.get(), gid, *more)));
}

// Every writeback_bytes appended to a payload file, Append starts their writeback; a reopened
// file counts from its end. The bytes read back the same either way.
TEST(PayloadFilesTest, AppendStartsAWritebackEveryWritebackBytes) {
  for (const uint64_t step : {uint64_t{1} << 20, uint64_t{0}}) {
    SCOPED_TRACE(step);
    TempDir dir;
    const std::string part(64 << 10, 'p');
    const std::string_view parts[] = {part};
    {
      PayloadFiles f(dir.path() / "payload", "g0", step);
      for (int i = 0; i < 40; ++i) ASSERT_TRUE(f.Append(7, parts).ok());  // 2.5 MiB
      EXPECT_EQ(f.writebacks_started(), step ? 2u : 0u);
      ASSERT_TRUE(f.SyncDirty().ok());
    }
    PayloadFiles f(dir.path() / "payload", "g0", step);
    for (int i = 0; i < 8; ++i) ASSERT_TRUE(f.Append(7, parts).ok());  // 0.5 MiB after the 2.5
    EXPECT_EQ(f.writebacks_started(), 0u) << "counted from the end of the reopened file";
    for (int i = 0; i < 8; ++i) ASSERT_TRUE(f.Append(7, parts).ok());
    EXPECT_EQ(f.writebacks_started(), step ? 1u : 0u);
    EXPECT_EQ(f.SizeOf(7), 56u * (64 << 10));
    std::string back(64 << 10, '\0');
    ASSERT_TRUE(f.Read(7, 55u * (64 << 10), back.data(), back.size()).ok());
    EXPECT_EQ(back, part);
  }
}

// A removed file is kept as free-<n> (up to the cap) and becomes the next new file: same inode,
// appends from offset 0 over the old bytes. Beyond the cap removed files are unlinked; a later
// instance adopts what an earlier one kept, down to its own cap.
TEST(PayloadFilesTest, RemovedFilesAreRecycledUpToTheCapAndOverwrittenFromTheStart) {
  TempDir dir;
  const fs::path d = dir.path() / "payload";
  const std::string old_bytes(256 << 10, 'o');
  const std::string_view old_parts[] = {old_bytes};
  auto path = [&](uint64_t id) { return d / fmt::format("{:020}.pay", id); };
  {
    PayloadFiles f(d, "g0", 0, /*recycle_files=*/2);
    for (uint64_t id : {1, 2, 3}) ASSERT_TRUE(f.Append(id, old_parts).ok());
    const ino_t ino1 = InodeOf(path(1)), ino2 = InodeOf(path(2));
    ASSERT_TRUE(f.RemoveIf([](uint64_t id) { return id < 3; }).ok());
    EXPECT_FALSE(fs::exists(path(1)));
    EXPECT_FALSE(fs::exists(path(2)));
    EXPECT_EQ(f.recycled_files(), 2u);
    auto ids = f.List();
    ASSERT_TRUE(ids.ok());
    EXPECT_EQ(*ids, std::vector<uint64_t>{3}) << "recycled files are no segment's";

    const std::string a = "new bytes of file 4", b(100 << 10, 'b');
    const std::string_view pa[] = {a}, pb[] = {b};
    auto at = f.Append(4, pa);
    ASSERT_TRUE(at.ok()) << at.status();
    EXPECT_EQ(*at, 0u);
    EXPECT_EQ(InodeOf(path(4)), ino1) << "the oldest recycled file is reused first";
    at = f.Append(4, pb);
    ASSERT_TRUE(at.ok());
    EXPECT_EQ(*at, a.size());
    EXPECT_EQ(f.SizeOf(4), a.size() + b.size());
    EXPECT_EQ(fs::file_size(path(4)), old_bytes.size()) << "old bytes past the appends stay";
    std::string back(a.size(), '\0');
    ASSERT_TRUE(f.Read(4, 0, back.data(), back.size()).ok());
    EXPECT_EQ(back, a);
    back.assign(b.size(), '\0');
    ASSERT_TRUE(f.Read(4, a.size(), back.data(), back.size()).ok());
    EXPECT_EQ(back, b);
    ASSERT_TRUE(f.SyncDirty().ok());
    EXPECT_EQ(f.files_reused(), 1u);
    EXPECT_EQ(f.recycled_files(), 1u);

    ASSERT_TRUE(f.Append(5, pa).ok());  // takes the last recycled file (file 2's)
    EXPECT_EQ(InodeOf(path(5)), ino2);
    ASSERT_TRUE(f.Append(6, pa).ok());  // none left: created
    EXPECT_EQ(f.files_reused(), 2u);
    EXPECT_EQ(fs::file_size(path(6)), a.size());
    // Four files go, two are kept.
    ASSERT_TRUE(f.RemoveAll().ok());
    EXPECT_EQ(f.recycled_files(), 2u);
    size_t entries = 0;
    for ([[maybe_unused]] const auto& e : fs::directory_iterator(d)) ++entries;
    EXPECT_EQ(entries, 2u);
  }
  {
    PayloadFiles f(d, "g0", 0, /*recycle_files=*/2);
    EXPECT_EQ(f.recycled_files(), 2u) << "kept across instances";
    const std::string c = "c";
    const std::string_view pc[] = {c};
    auto at = f.Append(9, pc);
    ASSERT_TRUE(at.ok());
    EXPECT_EQ(*at, 0u);
    EXPECT_EQ(f.files_reused(), 1u);
  }
  {
    PayloadFiles f(d, "g0", 0, /*recycle_files=*/0);
    EXPECT_EQ(f.recycled_files(), 0u);
    ASSERT_TRUE(f.RemoveAll().ok());
    EXPECT_TRUE(fs::is_empty(d)) << "with recycling off, kept files and removed ones go";
  }
}

// Retention drops segments while new ones are written: their files come back as the new
// segments' files, and every payload reads back, before and after a reopen.
TEST_F(PayloadTest, NewSegmentsReuseTheFilesOfDroppedOnes) {
  GroupLogOptions o = Options();
  o.segment_bytes = 64 << 10;
  o.recycle_payload_files = 2;
  Open(o);
  // 20 KiB records: a segment closes every 4 records, so 24 records are 6 segments and files.
  AppendSizes(std::vector<size_t>(24, 20 << 10));
  const fs::path d = StoreDir() / "payload" / std::to_string(log_->group_id());
  auto name = [&](uint64_t first_lsn) { return d / fmt::format("{:020}.pay", first_lsn); };
  const ino_t ino1 = InodeOf(name(1)), ino5 = InodeOf(name(5));
  ASSERT_TRUE(log_->SetAppliedLsn(14).ok());
  ASSERT_TRUE(log_->EnforceRetention(0).ok());
  EXPECT_EQ(PayloadFilesOf(StoreDir(), log_->group_id()).size(), 3u);
  EXPECT_EQ(PayloadFilesOf(StoreDir(), log_->group_id(), /*recycled=*/true).size(), 2u);
  // Smaller records, three new segments: two on recycled files (whose old bytes lie past the new
  // appends), one created.
  AppendSizes(std::vector<size_t>(12, 17000), 100);
  EXPECT_EQ(PayloadFilesOf(StoreDir(), log_->group_id()).size(), 6u);
  EXPECT_EQ(InodeOf(name(25)), ino1);
  EXPECT_EQ(InodeOf(name(29)), ino5);
  EXPECT_TRUE(PayloadFilesOf(StoreDir(), log_->group_id(), /*recycled=*/true).empty());
  ASSERT_TRUE(SyncWait(log_).ok());
  for (int round = 0; round < 2; ++round) {
    auto payloads = ReadPayloads(log_);
    ASSERT_TRUE(payloads.ok()) << payloads.status();
    ASSERT_EQ(payloads->size(), 24u);
    EXPECT_EQ((*payloads)[13], PayloadOf(12, 20 << 10));
    for (uint64_t i = 0; i < 12; ++i) EXPECT_EQ((*payloads)[25 + i], PayloadOf(100 + i, 17000));
    ASSERT_TRUE(Reopen(o).ok());
  }
}

TEST_F(PayloadTest, ThresholdOfSixteenBytesOrLessIsRefused) {
  GroupLogOptions o;
  o.external_payload_min_bytes = kPayloadRefSize;
  auto s = LogStore::Open({.dir = StoreDir()});
  ASSERT_TRUE(s.ok());
  auto l = (*s)->OpenGroup("g0", o);
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(l.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(PayloadTest, ReplicatedRecordsBecomeExternalOnTheReplicaToo) {
  Open(Options());
  const std::vector<size_t> sizes = {64 << 10, 10, 3000, 1 << 20, 500};
  AppendSizes(sizes);
  auto replica_or = store_->OpenGroup("replica", Options());
  ASSERT_TRUE(replica_or.ok());
  GroupLog* replica = *replica_or;
  std::string buffer;
  ASSERT_TRUE(log_->ReadRaw(1, UINT64_MAX, 1 << 30, 100,
                            [&](uint64_t, std::string_view stored) {
                              buffer.append(stored);
                              return absl::OkStatus();
                            })
                  .ok());
  auto shipped = ShippedRecords::Parse(std::move(buffer));
  ASSERT_TRUE(shipped.ok()) << shipped.status();
  std::promise<absl::StatusOr<uint64_t>> done;
  replica->AppendReplicated(log_->group_id(), 1, std::move(*shipped), /*sync=*/true,
                            [&](absl::StatusOr<uint64_t> lsn) { done.set_value(lsn); });
  auto last = done.get_future().get();
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(*last, sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    const std::string v = RawValue(store_.get(), replica->group_id(), i + 1);
    EXPECT_EQ(IsExternalValue(v), sizes[i] >= kThreshold) << "LSN " << i + 1;
  }
  auto payloads = ReadPayloads(replica);
  ASSERT_TRUE(payloads.ok()) << payloads.status();
  for (size_t i = 0; i < sizes.size(); ++i) EXPECT_EQ((*payloads)[i + 1], PayloadOf(i, sizes[i]));
  EXPECT_EQ(PayloadFilesOf(StoreDir(), replica->group_id()).size(), 1u);
}

TEST_F(PayloadTest, RetentionRemovesThePayloadFilesOfDroppedSegments) {
  GroupLogOptions o = Options();
  o.segment_bytes = 64 << 10;
  Open(o);
  // 20 KiB records: a segment closes every 4 records, so 24 records are 6 segments and files.
  std::vector<size_t> sizes(24, 20 << 10);
  const std::vector<uint64_t> lsns = AppendSizes(sizes);
  ASSERT_EQ(PayloadFilesOf(StoreDir(), log_->group_id()).size(), 6u);
  ASSERT_TRUE(log_->SetAppliedLsn(14).ok());
  auto first = log_->EnforceRetention(0);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(*first, 13u);  // segments 1-4, 5-8, 9-12 dropped
  const auto files = PayloadFilesOf(StoreDir(), log_->group_id());
  ASSERT_EQ(files.size(), 3u);
  EXPECT_EQ(files.front().filename().string(), "00000000000000000013.pay");
  auto payloads = ReadPayloads(log_);
  ASSERT_TRUE(payloads.ok()) << payloads.status();
  EXPECT_EQ(payloads->size(), 12u);
  EXPECT_EQ((*payloads)[13], PayloadOf(12, 20 << 10));
  // ReadRaw below the new start is OutOfRange, as for inline records.
  EXPECT_EQ(
      log_->ReadRaw(5, 10, 1 << 20, 10, [](uint64_t, std::string_view) { return absl::OkStatus(); })
          .code(),
      absl::StatusCode::kOutOfRange);
  // After a reopen the files of what remains are used, nothing else is there.
  ASSERT_TRUE(Reopen(o).ok());
  payloads = ReadPayloads(log_);
  ASSERT_TRUE(payloads.ok()) << payloads.status();
  EXPECT_EQ(payloads->size(), 12u);
  EXPECT_EQ(PayloadFilesOf(StoreDir(), log_->group_id()).size(), 3u);
}

// TruncateBefore may cut inside the open segment (retention never does): after a reopen the rest
// of that segment still finds its payloads, and a later truncation keeps them until they go.
TEST_F(PayloadTest, TruncationInsideTheOpenSegmentKeepsItsFileAcrossReopen) {
  Open(Options());
  AppendSizes({4096, 4096, 4096, 4096});
  ASSERT_TRUE(log_->SetAppliedLsn(4).ok());
  ASSERT_TRUE(log_->TruncateBefore(3).ok());
  ASSERT_TRUE(Reopen(Options()).ok());
  AppendSizes({5000}, 10);
  ASSERT_TRUE(log_->SetAppliedLsn(5).ok());
  ASSERT_TRUE(log_->TruncateBefore(4).ok());
  for (int i = 0; i < 2; ++i) {
    auto payloads = ReadPayloads(log_);
    ASSERT_TRUE(payloads.ok()) << payloads.status();
    ASSERT_EQ(payloads->size(), 2u);
    EXPECT_EQ((*payloads)[4], PayloadOf(3, 4096));
    EXPECT_EQ((*payloads)[5], PayloadOf(10, 5000));
    EXPECT_EQ(PayloadFilesOf(StoreDir(), log_->group_id()).size(), 1u);
    ASSERT_TRUE(Reopen(Options()).ok());
  }
}

TEST_F(PayloadTest, OpenRemovesPayloadFilesNoRecordReferences) {
  Open(Options());
  AppendSizes({4096, 4096});
  const fs::path d = StoreDir() / "payload" / std::to_string(log_->group_id());
  // A file of a segment that was truncated (below) and one past the open segment (above), as a
  // crash between a truncation's write and its unlink, or a cut, can leave them.
  { std::ofstream(d / "00000000000000000000.pay") << "old"; }
  { std::ofstream(d / "00000000000000000099.pay") << "new"; }
  ASSERT_TRUE(Reopen(Options()).ok());
  const auto files = PayloadFilesOf(StoreDir(), log_->group_id());
  ASSERT_EQ(files.size(), 1u);
  EXPECT_EQ(files[0].filename().string(), "00000000000000000001.pay");
  auto payloads = ReadPayloads(log_);
  ASSERT_TRUE(payloads.ok()) << payloads.status();
  EXPECT_EQ((*payloads)[2], PayloadOf(1, 4096));
}

TEST_F(PayloadTest, ResetForCopyRemovesEveryPayloadFile) {
  Open(Options());
  AppendSizes({4096, 8192, 100});
  ASSERT_TRUE(SyncWait(log_).ok());
  ASSERT_EQ(PayloadFilesOf(StoreDir(), log_->group_id()).size(), 1u);
  ASSERT_TRUE(log_->ResetForCopy(2, {}).ok());
  EXPECT_TRUE(PayloadFilesOf(StoreDir(), log_->group_id()).empty());
  // The log goes on from LSN 2 (below its old end): new payloads, new file.
  const std::vector<uint64_t> lsns = AppendSizes({5000, 6000}, 10);
  EXPECT_EQ(lsns, (std::vector<uint64_t>{2, 3}));
  ASSERT_TRUE(SyncWait(log_).ok());
  ASSERT_TRUE(Reopen(Options()).ok());
  auto payloads = ReadPayloads(log_);
  ASSERT_TRUE(payloads.ok()) << payloads.status();
  EXPECT_EQ((*payloads)[2], PayloadOf(10, 5000));
  EXPECT_EQ((*payloads)[3], PayloadOf(11, 6000));
}

TEST_F(PayloadTest, CutBackToAppendsAfterTheCutBytesOfTheOpenSegment) {
  Open(Options());
  AppendSizes({4096, 4096, 4096, 4096, 4096});
  ASSERT_TRUE(SyncWait(log_).ok());
  const fs::path file = PayloadFilesOf(StoreDir(), log_->group_id()).at(0);
  const uint64_t size_before = fs::file_size(file);
  ASSERT_TRUE(log_->CutBackTo(2, 5, {}, ReplicaMeta{}).ok());
  EXPECT_EQ(fs::file_size(file), size_before);  // kept; LSN 1-2 are still in it
  const std::vector<uint64_t> lsns = AppendSizes({7000, 3000}, 20);
  EXPECT_EQ(lsns, (std::vector<uint64_t>{3, 4}));
  EXPECT_EQ(fs::file_size(file), size_before + 7000 + 3000);
  auto check = [&] {
    auto payloads = ReadPayloads(log_);
    ASSERT_TRUE(payloads.ok()) << payloads.status();
    ASSERT_EQ(payloads->size(), 4u);
    EXPECT_EQ((*payloads)[2], PayloadOf(1, 4096));
    EXPECT_EQ((*payloads)[3], PayloadOf(20, 7000));
    EXPECT_EQ((*payloads)[4], PayloadOf(21, 3000));
  };
  check();
  ASSERT_TRUE(Reopen(Options()).ok());
  check();
}

TEST_F(PayloadTest, CorruptExternalPayloadIsDataLossNamingLsnAndFile) {
  Open(Options());
  AppendSizes({4096, 4096, 4096});
  const fs::path file = PayloadFilesOf(StoreDir(), log_->group_id()).at(0);
  FlipByte(file, 4096 + 100);  // in LSN 2's payload
  absl::Status st = log_->ReadRange(1, 3, [](const LogRecordView&) { return absl::OkStatus(); });
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("LSN 2"), std::string_view::npos) << st;
  EXPECT_NE(st.message().find(file.string()), std::string_view::npos) << st;
  st =
      log_->ReadRaw(1, 3, 1 << 20, 10, [](uint64_t, std::string_view) { return absl::OkStatus(); });
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("LSN 2"), std::string_view::npos) << st;
  // A payload file that is gone: DataLoss naming the LSN, file and offset.
  fs::remove(file);
  ASSERT_TRUE(Reopen(Options()).code() == absl::StatusCode::kDataLoss);
}

// The payload files are fdatasynced beside the WAL's fsync, not before it (one device flush's time
// per cycle, not two), and durable_lsn waits for both.
TEST_F(PayloadTest, PayloadFilesAreFdatasyncedWhileTheWalSyncRuns) {
  auto wait_for = [](auto pred) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!pred()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return true;
  };
  std::mutex mu;
  std::condition_variable cv;
  bool payload_sync_entered = false, payload_sync_released = false;
  GroupLogOptions opts = Options();
  opts.before_payload_sync = [&] {
    std::unique_lock lock(mu);
    payload_sync_entered = true;
    cv.wait(lock, [&] { return payload_sync_released; });
  };
  auto release_payload_sync = [&] {
    std::lock_guard lock(mu);
    payload_sync_released = true;
    cv.notify_all();
  };
  FaultEnv fault;
  Open(opts, fault.env());
  AppendSizes({4096, 4096});
  fault.HoldWalSyncs();
  // From a thread of its own: Sync() on an idle log may fsync on the caller's thread.
  std::promise<absl::Status> synced;
  std::thread caller([&] { log_->Sync([&synced](absl::Status s) { synced.set_value(s); }); });
  // Both in flight at once: the payload round held in the hook, the WAL's fsync in the env.
  const bool both = wait_for([&] {
    std::lock_guard lock(mu);
    return payload_sync_entered && fault.waiting_wal_syncs() == 1;
  });
  // The WAL's fsync done, the payloads' not: nothing is durable yet.
  fault.ReleaseWalSyncs();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const uint64_t durable_before_payloads = log_->State().durable_lsn;
  release_payload_sync();
  caller.join();
  ASSERT_TRUE(synced.get_future().get().ok());
  EXPECT_TRUE(both);
  EXPECT_EQ(durable_before_payloads, 0u);
  EXPECT_EQ(log_->State().durable_lsn, 2u);
  log_ = nullptr;
  store_.reset();  // before the env it runs on
}

// The torn-tail rule: a power cut that keeps the WAL's pages but not a payload file's.
class PayloadPowerCutTest : public PayloadTest {
 protected:
  // The store goes before the env it runs on (members of the base class outlive fault_).
  void TearDown() override {
    log_ = nullptr;
    store_.reset();
  }
  // LSNs 1-3 synced (the mark is at 3), 4-6 written and their WAL records fsynced by another
  // synced write (SetReplicaMeta) but their payloads not; then the power cut.
  void WriteAndCut() {
    Open(Options(), fault_.env());
    AppendSizes({4096, 4096, 4096});
    ASSERT_TRUE(SyncWait(log_).ok());
    AppendSizes({4096, 4096, 4096}, 3);
    ASSERT_TRUE(log_->SetReplicaMeta(ReplicaMeta{.newest_epoch_seen = 1}).ok());
    fault_.Crash();
    log_ = nullptr;
    store_.reset();
    ASSERT_TRUE(fault_.DropUnsyncedData().ok());
    file_ = PayloadFilesOf(StoreDir(), 1).at(0);
  }
  FaultEnv fault_;
  fs::path file_;
};

TEST_F(PayloadPowerCutTest, RecordAboveTheSyncMarkWithoutItsPayloadIsCutWithItsSuccessors) {
  WriteAndCut();
  // LSN 5's payload (and everything after it) never reached the disk.
  fs::resize_file(file_, 4 * 4096 + 1000);
  ASSERT_TRUE(Reopen(Options(), fault_.env()).ok());
  const GroupLogState st = log_->State();
  EXPECT_EQ(st.last_lsn, 4u);
  EXPECT_EQ(st.durable_lsn, 4u);
  EXPECT_EQ(st.bytes, 4 * (kRecordHeaderSize + 4096));
  auto payloads = ReadPayloads(log_);
  ASSERT_TRUE(payloads.ok()) << payloads.status();
  EXPECT_EQ((*payloads)[4], PayloadOf(3, 4096));
  // Numbering continues after the cut; the new payloads go after the torn bytes.
  auto lsn = AppendWait(log_, WriteReq(50, 4096, /*sync=*/true));
  ASSERT_TRUE(lsn.ok());
  EXPECT_EQ(*lsn, 5u);
  ASSERT_TRUE(Reopen(Options(), fault_.env()).ok());
  payloads = ReadPayloads(log_);
  ASSERT_TRUE(payloads.ok()) << payloads.status();
  EXPECT_EQ(payloads->size(), 5u);
  EXPECT_EQ((*payloads)[5], PayloadOf(50, 4096));
}

// A recycled file holds old bytes where a lost write would have gone: a record above the mark
// that finds them instead of its payload fails its checksum and is cut like a torn one.
TEST_F(PayloadPowerCutTest, StaleBytesOfARecycledFileAboveTheMarkAreCutLikeATornTail) {
  WriteAndCut();
  {
    std::fstream f(file_, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(4 * 4096);
    const std::string stale = PayloadOf(77, 2 * 4096);  // LSNs 5 and 6: another segment's bytes
    f.write(stale.data(), static_cast<std::streamsize>(stale.size()));
  }
  ASSERT_TRUE(Reopen(Options(), fault_.env()).ok());
  EXPECT_EQ(log_->State().last_lsn, 4u);
  EXPECT_EQ(log_->State().durable_lsn, 4u);
  auto payloads = ReadPayloads(log_);
  ASSERT_TRUE(payloads.ok()) << payloads.status();
  EXPECT_EQ(payloads->size(), 4u);
}

// Retention removes (or recycles and overwrites) payload files only once the truncation that
// dropped their records is durable: after a power cut the log starts where the truncation put it,
// and no record whose payload file went comes back.
TEST_F(PayloadPowerCutTest, TruncationIsDurableBeforeItsPayloadFilesGo) {
  for (const size_t recycle : {size_t{0}, size_t{4}}) {
    SCOPED_TRACE(recycle);
    GroupLogOptions o = Options();
    o.segment_bytes = 64 << 10;
    o.recycle_payload_files = recycle;
    fs::remove_all(StoreDir());
    Open(o, fault_.env());
    AppendSizes(std::vector<size_t>(24, 20 << 10));
    ASSERT_TRUE(SyncWait(log_).ok());
    ASSERT_TRUE(log_->SetAppliedLsn(14).ok());
    auto first = log_->EnforceRetention(0);
    ASSERT_TRUE(first.ok()) << first.status();
    ASSERT_EQ(*first, 13u);
    // New records overwrite what was recycled; none of them is synced.
    AppendSizes(std::vector<size_t>(8, 20 << 10), 200);
    fault_.Crash();
    log_ = nullptr;
    store_.reset();
    ASSERT_TRUE(fault_.DropUnsyncedData().ok());
    ASSERT_TRUE(Reopen(o, fault_.env()).ok());
    EXPECT_EQ(log_->State().first_lsn, 13u);
    auto payloads = ReadPayloads(log_);
    ASSERT_TRUE(payloads.ok()) << payloads.status();
    ASSERT_GE(payloads->size(), 12u);
    EXPECT_EQ((*payloads)[13], PayloadOf(12, 20 << 10));
    log_ = nullptr;
    store_.reset();
  }
}

TEST_F(PayloadPowerCutTest, IntactPayloadsAboveTheMarkStay) {
  WriteAndCut();
  ASSERT_TRUE(Reopen(Options(), fault_.env()).ok());
  EXPECT_EQ(log_->State().last_lsn, 6u);
  auto payloads = ReadPayloads(log_);
  ASSERT_TRUE(payloads.ok()) << payloads.status();
  EXPECT_EQ((*payloads)[6], PayloadOf(5, 4096));
}

TEST_F(PayloadPowerCutTest, BadPayloadAtOrBelowTheMarkIsDataLossAtOpen) {
  WriteAndCut();
  FlipByte(file_, 2 * 4096 + 7);  // LSN 3: synced, at the mark
  const absl::Status st = Reopen(Options(), fault_.env());
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_NE(st.message().find("LSN 3"), std::string_view::npos) << st;
}

}  // namespace
}  // namespace tvilling::storage
