// group_log_replication_test.cc: the group log's replication side on real RocksDB stores: shipping
// records with ReadRaw from one store and appending them with AppendReplicated to another
// (different group ids), the full-copy reset, replica metadata, and on_durable.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <rocksdb/db.h>

#include <atomic>
#include <future>
#include <mutex>
#include <thread>

#include "storage/group_log.h"
#include "tests/unit/storage/log_wait.h"
#include "tests/unit/storage/temp_dir.h"

namespace tvilling::storage {
namespace {

absl::StatusOr<uint64_t> ReplicateWait(GroupLog* log, uint32_t sender_gid, uint64_t first_lsn,
                                       ShippedRecords records, bool sync = false) {
  std::promise<absl::StatusOr<uint64_t>> p;
  auto f = p.get_future();
  log->AppendReplicated(sender_gid, first_lsn, std::move(records), sync,
                        [&p](absl::StatusOr<uint64_t> lsn) { p.set_value(lsn); });
  return f.get();
}

// What the shipper does: the stored values of [from, to] back to back.
std::string Ship(const GroupLog* log, uint64_t from, uint64_t to) {
  std::string out;
  absl::Status st =
      log->ReadRaw(from, to, UINT64_MAX, UINT32_MAX, [&](uint64_t, std::string_view value) {
        out.append(value);
        return absl::OkStatus();
      });
  EXPECT_TRUE(st.ok()) << st;
  return out;
}

ShippedRecords Parsed(std::string buffer) {
  auto r = ShippedRecords::Parse(std::move(buffer));
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? std::move(*r) : ShippedRecords();
}

// A primary store and a replica store in separate directories. The replica's store registers
// another group first, so the two logs of "g" have different group ids.
class ReplicationLogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    OpenPrimary();
    OpenReplica();
  }
  void OpenPrimary(GroupLogOptions o = {}) {
    primary_ = nullptr;
    primary_store_.reset();
    auto s = LogStore::Open({.dir = dir_.path() / "primary"});
    ASSERT_TRUE(s.ok()) << s.status();
    primary_store_ = std::move(*s);
    auto l = primary_store_->OpenGroup("g", o);
    ASSERT_TRUE(l.ok()) << l.status();
    primary_ = *l;
  }
  void OpenReplica(GroupLogOptions o = {}) {
    replica_ = nullptr;
    replica_store_.reset();
    auto s = LogStore::Open({.dir = dir_.path() / "replica"});
    ASSERT_TRUE(s.ok()) << s.status();
    replica_store_ = std::move(*s);
    ASSERT_TRUE(replica_store_->OpenGroup("other", {}).ok());
    auto l = replica_store_->OpenGroup("g", o);
    ASSERT_TRUE(l.ok()) << l.status();
    replica_ = *l;
    ASSERT_NE(replica_->group_id(), primary_->group_id());
  }
  // Appends `n` writes to the primary: payload "p<lsn>-" padded to `size` bytes.
  void FillPrimary(int n, size_t size = 100) {
    for (int i = 0; i < n; ++i) {
      std::string data = "p" + std::to_string(primary_->last_lsn() + 1) + "-";
      data.resize(size, 'x');
      AppendRequest r = WriteReq(4096ull * static_cast<uint64_t>(i), data);
      r.flags = (i % 3 == 0) ? kRecordFlagFua : 0;
      ASSERT_TRUE(AppendWait(primary_, std::move(r)).ok());
    }
  }

  TempDir dir_;
  std::unique_ptr<LogStore> primary_store_, replica_store_;
  GroupLog* primary_ = nullptr;
  GroupLog* replica_ = nullptr;
};

TEST_F(ReplicationLogTest, ShippedRecordsRoundTripWithEpochsAndLocalChecksums) {
  std::vector<uint64_t> written;  // LSNs on_batch_written saw on the replica
  GroupLogOptions ro;
  ro.max_batch_records = 3;  // the 13 records are written by several batches
  ro.on_batch_written = [&](std::span<const LogRecordView> recs) {
    for (const LogRecordView& r : recs) {
      written.push_back(r.lsn);
      EXPECT_EQ(StoredSize(r), kRecordHeaderSize + r.header.payload_size);
      EXPECT_NE(r.header.timestamp_ns, 0u);
    }
    return absl::OkStatus();
  };
  OpenReplica(ro);
  FillPrimary(3);
  ASSERT_TRUE(primary_->BeginEpoch(4).ok());
  FillPrimary(5);
  ASSERT_TRUE(primary_->BeginEpoch(6).ok());
  FillPrimary(1);
  AppendRequest trim;
  trim.type = RecordType::kTrim;
  trim.offset = 8192;
  trim.length = 1 << 20;
  ASSERT_TRUE(AppendWait(primary_, std::move(trim)).ok());
  FillPrimary(2, 5000);  // 12 records so far
  AppendRequest zeroes;
  zeroes.type = RecordType::kWriteZeroes;
  zeroes.flags = kRecordFlagNoHole;
  zeroes.volume = 2;
  zeroes.length = 4096;
  ASSERT_TRUE(AppendWait(primary_, std::move(zeroes)).ok());

  // Shipped in two batches, the second one synced.
  auto last = ReplicateWait(replica_, primary_->group_id(), 1, Parsed(Ship(primary_, 1, 5)));
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(*last, 5u);
  last = ReplicateWait(replica_, primary_->group_id(), 6, Parsed(Ship(primary_, 6, 13)), true);
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(*last, 13u);
  EXPECT_EQ(replica_->last_lsn(), 13u);
  EXPECT_EQ(replica_->durable_lsn(), 13u) << "sync was asked for";
  std::vector<uint64_t> want_lsns(13);
  for (size_t i = 0; i < 13; ++i) want_lsns[i] = i + 1;
  EXPECT_EQ(written, want_lsns);

  auto check = [&] {
    std::vector<std::string> pp, rp;
    const auto p = ReadAll(primary_, &pp);
    const auto r = ReadAll(replica_, &rp);  // ReadRange verifies with the replica's group id
    ASSERT_EQ(p.size(), 13u);
    ASSERT_EQ(r.size(), 13u);
    for (size_t i = 0; i < p.size(); ++i) {
      SCOPED_TRACE(i);
      const RecordHeader &a = p[i].header, &b = r[i].header;
      EXPECT_EQ(r[i].lsn, p[i].lsn);
      EXPECT_EQ(b.type, a.type);
      EXPECT_EQ(b.flags, a.flags);
      EXPECT_EQ(b.volume, a.volume);
      EXPECT_EQ(b.epoch, a.epoch);
      EXPECT_EQ(b.offset, a.offset);
      EXPECT_EQ(b.length, a.length);
      EXPECT_EQ(b.payload_size, a.payload_size);
      EXPECT_EQ(b.timestamp_ns, a.timestamp_ns);
      EXPECT_NE(b.checksum, a.checksum) << "checksums are bound to the group id";
      EXPECT_EQ(rp[i], pp[i]);
    }
    const GroupLogState ps = primary_->State(), rs = replica_->State();
    EXPECT_EQ(rs.history, ps.history);
    EXPECT_EQ(rs.history, (std::vector<EpochStart>{{4, 4}, {6, 9}}));
    EXPECT_EQ(rs.current_epoch, 6u);
    EXPECT_EQ(replica_->current_epoch(), 6u);
    EXPECT_EQ(replica_->history(), ps.history);
    EXPECT_EQ(rs.bytes, ps.bytes);
    EXPECT_TRUE(replica_->Verify().ok()) << replica_->Verify();
  };
  check();
  // The history entries were written with their records: they survive a reopen.
  OpenReplica();
  check();
  // Records appended locally after replicated ones continue the numbering and the epoch.
  auto lsn = AppendWait(replica_, WriteReq(0, "local"));
  ASSERT_TRUE(lsn.ok());
  EXPECT_EQ(*lsn, 14u);
  EXPECT_TRUE(replica_->Verify().ok());
}

TEST_F(ReplicationLogTest, WrongFirstLsnIsRefusedNamingBothLsns) {
  FillPrimary(6);
  ASSERT_TRUE(ReplicateWait(replica_, primary_->group_id(), 1, Parsed(Ship(primary_, 1, 2))).ok());
  // A gap (LSN 4 while the log expects 3) and a resend (LSN 2) are both refused.
  for (uint64_t first : {4u, 2u}) {
    auto r = ReplicateWait(replica_, primary_->group_id(), first,
                           Parsed(Ship(primary_, first, first + 1)));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
    EXPECT_TRUE(Contains(r.status(), "LSN " + std::to_string(first))) << r.status();
    EXPECT_TRUE(Contains(r.status(), "next LSN is 3")) << r.status();
  }
  EXPECT_EQ(replica_->last_lsn(), 2u);
  // Nothing was queued either: the right LSN still fits.
  auto r = ReplicateWait(replica_, primary_->group_id(), 3, Parsed(Ship(primary_, 3, 6)));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 6u);
  // An empty batch at the right place is a no-op.
  r = ReplicateWait(replica_, primary_->group_id(), 7, ShippedRecords());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 6u);
}

TEST_F(ReplicationLogTest, CorruptRecordFailsTheWholeCallNamingItsLsn) {
  FillPrimary(5);
  std::string batch = Ship(primary_, 1, 5);
  const size_t rec = kRecordHeaderSize + 100;
  batch[3 * rec + kRecordHeaderSize + 7] ^= 0x01;  // a payload bit of LSN 4
  auto r = ReplicateWait(replica_, primary_->group_id(), 1, Parsed(batch));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  EXPECT_TRUE(Contains(r.status(), "LSN 4")) << r.status();
  EXPECT_TRUE(Contains(r.status(), "checksum mismatch")) << r.status();
  EXPECT_EQ(replica_->last_lsn(), 0u) << "LSNs 1-3 were fine but must not be appended either";

  // Verified against the sender's group id: the replica's own id does not verify them.
  r = ReplicateWait(replica_, replica_->group_id(), 1, Parsed(Ship(primary_, 1, 5)));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  EXPECT_TRUE(Contains(r.status(), "LSN 1")) << r.status();
  // Records shifted by one LSN do not verify (the checksum binds the LSN).
  ASSERT_TRUE(ReplicateWait(replica_, primary_->group_id(), 1, Parsed(Ship(primary_, 1, 1))).ok());
  r = ReplicateWait(replica_, primary_->group_id(), 2, Parsed(Ship(primary_, 3, 3)));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  EXPECT_TRUE(Contains(r.status(), "LSN 2")) << r.status();
  EXPECT_EQ(replica_->last_lsn(), 1u);

  // Framing: a truncated last record is found by Parse.
  std::string cut = Ship(primary_, 1, 2);
  cut.resize(cut.size() - 10);
  auto parsed = ShippedRecords::Parse(cut);
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kDataLoss) << parsed.status();
  EXPECT_TRUE(Contains(parsed.status(), "record #1")) << parsed.status();
  parsed = ShippedRecords::Parse(std::string(20, 'x'));
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kDataLoss) << parsed.status();
}

TEST_F(ReplicationLogTest, EpochGoingBackwardsIsRefused) {
  ASSERT_TRUE(primary_->BeginEpoch(5).ok());
  FillPrimary(2);
  // The replica already is in epoch 7.
  ASSERT_TRUE(replica_->BeginEpoch(7).ok());
  auto r = ReplicateWait(replica_, primary_->group_id(), 1, Parsed(Ship(primary_, 1, 2)));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_TRUE(Contains(r.status(), "epoch 5")) << r.status();
  EXPECT_TRUE(Contains(r.status(), "epoch 7")) << r.status();
  EXPECT_EQ(replica_->last_lsn(), 0u);

  // Within one call: epoch 5 then 3 (records from two primaries spliced) is refused whole.
  OpenReplica();
  TempDir dir2;  // a second primary, whose log is in epoch 3
  auto store2 = LogStore::Open({.dir = dir2.path() / "p2"});
  ASSERT_TRUE(store2.ok());
  auto p2 = (*store2)->OpenGroup("g", {});
  ASSERT_TRUE(p2.ok());
  ASSERT_TRUE((*p2)->BeginEpoch(3).ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(AppendWait(*p2, WriteReq(0, "old")).ok());
  ASSERT_EQ((*p2)->group_id(), primary_->group_id()) << "both are the first group of their store";
  std::string spliced = Ship(primary_, 1, 2) + Ship(*p2, 3, 3);
  r = ReplicateWait(replica_, primary_->group_id(), 1, Parsed(spliced));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_TRUE(Contains(r.status(), "LSN 3")) << r.status();
  EXPECT_EQ(replica_->last_lsn(), 0u);
  EXPECT_TRUE(replica_->State().history.empty());
}

TEST_F(ReplicationLogTest, ReadRawLimitsAndUnsyncedRecords) {
  FillPrimary(10, 1000);  // no sync asked: nothing durable
  ASSERT_EQ(primary_->durable_lsn(), 0u);
  const uint64_t rec = kRecordHeaderSize + 1000;
  auto read = [&](uint64_t from, uint64_t max_lsn, uint64_t max_bytes, uint32_t max_records,
                  std::vector<uint64_t>* lsns) {
    lsns->clear();
    return primary_->ReadRaw(from, max_lsn, max_bytes, max_records,
                             [&](uint64_t lsn, std::string_view value) {
                               EXPECT_EQ(value.size(), rec);
                               auto d = DecodeRecord(primary_->group_id(), lsn, value);
                               EXPECT_TRUE(d.ok()) << d.status();
                               lsns->push_back(lsn);
                               return absl::OkStatus();
                             });
  };
  std::vector<uint64_t> lsns;
  ASSERT_TRUE(read(1, 100, UINT64_MAX, UINT32_MAX, &lsns).ok());
  EXPECT_EQ(lsns.size(), 10u) << "unsynced records are shipped; max_lsn is capped at last_lsn";
  ASSERT_TRUE(read(3, 100, UINT64_MAX, 4, &lsns).ok());
  EXPECT_EQ(lsns, (std::vector<uint64_t>{3, 4, 5, 6}));
  ASSERT_TRUE(read(3, 5, UINT64_MAX, 100, &lsns).ok());
  EXPECT_EQ(lsns, (std::vector<uint64_t>{3, 4, 5}));
  ASSERT_TRUE(read(2, 100, 3 * rec, 100, &lsns).ok());
  EXPECT_EQ(lsns, (std::vector<uint64_t>{2, 3, 4}));
  ASSERT_TRUE(read(2, 100, 3 * rec - 1, 100, &lsns).ok());
  EXPECT_EQ(lsns, (std::vector<uint64_t>{2, 3}));
  ASSERT_TRUE(read(7, 100, 1, 100, &lsns).ok());
  EXPECT_EQ(lsns, (std::vector<uint64_t>{7})) << "one record even if it alone exceeds max_bytes";
  ASSERT_TRUE(read(11, 100, UINT64_MAX, 100, &lsns).ok());
  EXPECT_TRUE(lsns.empty());
  ASSERT_TRUE(read(5, 4, UINT64_MAX, 100, &lsns).ok());
  EXPECT_TRUE(lsns.empty());

  // An error from fn ends the read and is returned.
  int calls = 0;
  absl::Status st = primary_->ReadRaw(1, 10, UINT64_MAX, 100, [&](uint64_t, std::string_view) {
    return ++calls == 2 ? absl::CancelledError("stream closed") : absl::OkStatus();
  });
  EXPECT_EQ(st.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(calls, 2);

  // A corrupt record and a gap are DataLoss naming the LSN; records before them are handed out.
  std::string key = EncodeLogKey(primary_->group_id(), 6), value;
  ASSERT_TRUE(primary_store_->db()->Get({}, key, &value).ok());
  value[kRecordHeaderSize + 1] ^= 0x10;
  ASSERT_TRUE(primary_store_->db()->Put({}, key, value).ok());
  st = read(4, 10, UINT64_MAX, 100, &lsns);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_TRUE(Contains(st, "LSN 6")) << st;
  EXPECT_EQ(lsns, (std::vector<uint64_t>{4, 5}));
  ASSERT_TRUE(primary_store_->db()->Delete({}, EncodeLogKey(primary_->group_id(), 9)).ok());
  st = read(8, 10, UINT64_MAX, 100, &lsns);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_TRUE(Contains(st, "LSN 9 is missing")) << st;
  ASSERT_TRUE(primary_store_->db()->Delete({}, EncodeLogKey(primary_->group_id(), 10)).ok());
  st = read(10, 10, UINT64_MAX, 100, &lsns);
  EXPECT_TRUE(Contains(st, "LSN 10 is missing")) << st;
}

TEST_F(ReplicationLogTest, ReadRawBelowTheFirstLsnIsOutOfRange) {
  GroupLogOptions o;
  o.segment_records = 4;
  OpenPrimary(o);
  FillPrimary(10);
  ASSERT_TRUE(primary_->SetAppliedLsn(10).ok());
  ASSERT_TRUE(primary_->TruncateBefore(5).ok());
  absl::Status st = primary_->ReadRaw(3, 10, UINT64_MAX, 100,
                                      [](uint64_t, std::string_view) { return absl::OkStatus(); });
  EXPECT_EQ(st.code(), absl::StatusCode::kOutOfRange) << st;
  EXPECT_TRUE(Contains(st, "LSN 3")) << st;
  EXPECT_TRUE(Contains(st, "starts at LSN 5")) << st;
}

TEST_F(ReplicationLogTest, ResetForCopyThenStreamFromLogStartSurvivesReopen) {
  // The replica held an older log (epoch 2, 8 records, applied 6, segments).
  GroupLogOptions small;
  small.segment_records = 3;
  OpenReplica(small);
  ASSERT_TRUE(replica_->BeginEpoch(2).ok());
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(AppendWait(replica_, WriteReq(0, "stale")).ok());
  ASSERT_TRUE(replica_->SetAppliedLsn(6).ok());
  ASSERT_TRUE(SyncWait(replica_).ok());
  ASSERT_TRUE(replica_->SetPeerPosition({.peer = "kept", .durable_lsn = 3}).ok());

  // The primary: epoch 5, 30 records; the copy starts at L0 = 20.
  ASSERT_TRUE(primary_->BeginEpoch(5).ok());
  FillPrimary(30);
  ReplicaMeta meta;
  meta.newest_epoch_seen = 5;
  meta.copy_in_progress = true;
  meta.copy_base_lsn = 20;
  ASSERT_TRUE(replica_->ResetForCopy(21, primary_->history(), meta).ok());
  GroupLogState s = replica_->State();
  EXPECT_EQ(s.first_lsn, 21u);
  EXPECT_EQ(s.last_lsn, 20u);
  EXPECT_EQ(s.durable_lsn, 20u);
  EXPECT_EQ(s.applied_lsn, 20u);
  EXPECT_EQ(s.current_epoch, 5u);
  EXPECT_EQ(s.history, (std::vector<EpochStart>{{5, 1}})) << "the primary's, up to L0";
  EXPECT_EQ(s.bytes, 0u);
  EXPECT_EQ(s.replica, meta);
  // Below the log's start: truncated, not lost (DataLoss is for a record missing above it).
  EXPECT_EQ(replica_->ReadRange(1, 8, [](const LogRecordView&) { return absl::OkStatus(); }).code(),
            absl::StatusCode::kOutOfRange)
      << "the old records are gone";

  auto r = ReplicateWait(replica_, primary_->group_id(), 1, Parsed(Ship(primary_, 1, 3)));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  r = ReplicateWait(replica_, primary_->group_id(), 21, Parsed(Ship(primary_, 21, 30)), true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 30u);
  EXPECT_TRUE(replica_->Verify().ok()) << replica_->Verify();

  OpenReplica(small);
  s = replica_->State();
  EXPECT_EQ(s.first_lsn, 21u);
  EXPECT_EQ(s.last_lsn, 30u);
  EXPECT_EQ(s.applied_lsn, 20u);
  EXPECT_EQ(s.current_epoch, 5u);
  EXPECT_EQ(s.history, (std::vector<EpochStart>{{5, 1}}));
  EXPECT_EQ(s.bytes, 10 * (kRecordHeaderSize + 100));
  EXPECT_EQ(s.replica, meta);
  ASSERT_EQ(s.peers.size(), 1u);
  EXPECT_EQ(s.peers[0].peer, "kept");
  EXPECT_TRUE(replica_->Verify().ok()) << replica_->Verify();
  std::vector<std::string> payloads;
  const auto recs = ReadAll(replica_, &payloads);
  ASSERT_EQ(recs.size(), 10u);
  EXPECT_EQ(payloads[0].substr(0, 4), "p21-");
  // Retention works from the new start: segments [21,23], [24,26], [27,29] are closed.
  ASSERT_TRUE(replica_->RemovePeer("kept").ok());
  ASSERT_TRUE(replica_->SetAppliedLsn(30).ok());
  auto first = replica_->EnforceRetention(0);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(*first, 30u);
}

// Regression (reconnect after a copy with base L0 > 0 refused as diverged at LSN 1): the reset
// stored the history {(copy epoch, L0 + 1)}, which a restarted replica read back and compared with
// its primary's history from LSN 1. The reset log must hold the primary's history up to L0, also
// after a reopen, and go on recording epochs from there like the primary's log.
TEST_F(ReplicationLogTest, ResetForCopyPersistsThePrimarysHistoryUpToTheBase) {
  // The primary: epoch 1 for LSN 1..10, epoch 3 for 11..30, epoch 4 from 41.
  ASSERT_TRUE(primary_->BeginEpoch(1).ok());
  FillPrimary(10);
  ASSERT_TRUE(primary_->BeginEpoch(3).ok());
  FillPrimary(20);
  ASSERT_TRUE(primary_->BeginEpoch(4).ok());
  FillPrimary(10);
  const std::vector<EpochStart> primary_history{{1, 1}, {3, 11}, {4, 31}};
  ASSERT_EQ(primary_->history(), primary_history);

  // L0 = 20, inside epoch 3: the copied prefix has two epochs.
  ReplicaMeta meta;
  meta.newest_epoch_seen = 4;
  meta.copy_in_progress = true;
  meta.copy_base_lsn = 20;
  meta.copy_epoch = 4;
  ASSERT_TRUE(replica_->ResetForCopy(21, {{1, 1}, {3, 11}}, meta).ok());
  EXPECT_EQ(replica_->history(), (std::vector<EpochStart>{{1, 1}, {3, 11}}));
  EXPECT_EQ(replica_->current_epoch(), 3u);
  OpenReplica();  // a crash right after the reset
  GroupLogState s = replica_->State();
  EXPECT_EQ(s.history, (std::vector<EpochStart>{{1, 1}, {3, 11}}));
  EXPECT_EQ(s.current_epoch, 3u);
  EXPECT_EQ(s.last_lsn, 20u);
  EXPECT_EQ(s.replica, meta);

  // Records 21..30 (epoch 3) add nothing; 31 begins epoch 4 as in the primary's log.
  auto r = ReplicateWait(replica_, primary_->group_id(), 21, Parsed(Ship(primary_, 21, 40)), true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 40u);
  EXPECT_EQ(replica_->history(), primary_history);
  OpenReplica();
  s = replica_->State();
  EXPECT_EQ(s.history, primary_history);
  EXPECT_EQ(s.current_epoch, 4u);
  EXPECT_EQ(s.last_lsn, 40u);
  EXPECT_TRUE(replica_->Verify().ok()) << replica_->Verify();
}

TEST_F(ReplicationLogTest, ResetForCopyAtAnEpochBoundaryRecordsTheNextEpochWithItsFirstRecord) {
  // L0 = 10 is the last record of epoch 1: the copy's records begin epoch 3, which the reset does
  // not claim; the first replicated record writes its entry.
  ASSERT_TRUE(primary_->BeginEpoch(1).ok());
  FillPrimary(10);
  ASSERT_TRUE(primary_->BeginEpoch(3).ok());
  FillPrimary(5);
  ASSERT_TRUE(replica_->BeginEpoch(7).ok());  // the old log's epochs go with it
  ASSERT_TRUE(AppendWait(replica_, WriteReq(0, "old")).ok());
  ASSERT_TRUE(replica_->ResetForCopy(11, {{1, 1}}).ok());
  EXPECT_EQ(replica_->current_epoch(), 1u);
  auto r = ReplicateWait(replica_, primary_->group_id(), 11, Parsed(Ship(primary_, 11, 15)), true);
  ASSERT_TRUE(r.ok()) << r.status();
  OpenReplica();
  EXPECT_EQ(replica_->history(), (std::vector<EpochStart>{{1, 1}, {3, 11}}));
  EXPECT_EQ(replica_->history(), primary_->history());
  EXPECT_EQ(replica_->current_epoch(), 3u);
  EXPECT_TRUE(replica_->Verify().ok()) << replica_->Verify();

  // A copy of an empty primary: no history yet.
  ASSERT_TRUE(replica_->ResetForCopy(1, {}).ok());
  EXPECT_TRUE(replica_->history().empty());
  EXPECT_EQ(replica_->current_epoch(), 0u);
  OpenReplica();
  EXPECT_TRUE(replica_->history().empty());
  EXPECT_EQ(replica_->last_lsn(), 0u);
}

TEST_F(ReplicationLogTest, ResetForCopyRefusesAHistoryThatIsNotOfTheCopiedPrefix) {
  ASSERT_TRUE(AppendWait(replica_, WriteReq(0, "kept")).ok());
  ASSERT_TRUE(SyncWait(replica_).ok());
  const GroupLogState before = replica_->State();
  for (const std::vector<EpochStart>& h : std::vector<std::vector<EpochStart>>{
           {{1, 1}, {3, 21}},  // begins at the log start: not part of the copied prefix
           {{1, 1}, {3, 30}},  // beyond it
           {{3, 1}, {1, 5}},   // epochs going backwards
           {{1, 5}, {3, 5}},   // first LSNs not increasing
           {{0, 1}},           // epoch 0
           {{1, 0}},           // LSN 0
       }) {
    absl::Status st = replica_->ResetForCopy(21, h);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_TRUE(Contains(st, "LSN 21")) << st;
  }
  EXPECT_EQ(replica_->State().history, before.history) << "nothing changed";
  EXPECT_EQ(replica_->last_lsn(), before.last_lsn);
}

TEST_F(ReplicationLogTest, ResetForCopyRefusesWhileRecordsAreQueued) {
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<bool> block{true};
  std::promise<void> entered;
  GroupLogOptions o;
  o.on_batch_written = [&](std::span<const LogRecordView>) {
    if (block.exchange(false)) {
      entered.set_value();
      released.wait();  // the committer is held inside the first batch
    }
    return absl::OkStatus();
  };
  OpenReplica(o);
  std::atomic<int> completed{0};
  replica_->Append(WriteReq(0, "a"), [&](absl::StatusOr<uint64_t>) { completed++; });
  entered.get_future().wait();
  replica_->Append(WriteReq(0, "b"), [&](absl::StatusOr<uint64_t>) { completed++; });
  absl::Status st = replica_->ResetForCopy(100, {{3, 1}});
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_TRUE(Contains(st, "LSN 2..2")) << st;
  release.set_value();
  ASSERT_TRUE(SyncWait(replica_).ok());
  EXPECT_EQ(completed.load(), 2);
  // Idle now (a batch may still be finishing: ResetForCopy waits for it).
  ASSERT_TRUE(replica_->ResetForCopy(100, {{3, 1}}).ok());
  EXPECT_EQ(replica_->last_lsn(), 99u);
  auto lsn = AppendWait(replica_, WriteReq(0, "c"));
  ASSERT_TRUE(lsn.ok());
  EXPECT_EQ(*lsn, 100u);
  EXPECT_EQ(replica_->ResetForCopy(0, {}).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ReplicationLogTest, ReplicaMetaPersistsAcrossReopen) {
  EXPECT_EQ(replica_->replica_meta(), ReplicaMeta{});
  EXPECT_FALSE(replica_->State().replica.consistent) << "a brand-new log is not consistent";
  ReplicaMeta m{.newest_epoch_seen = 9,
                .copy_in_progress = true,
                .copy_volume = 2,
                .copy_offset = 7ull << 30,
                .copy_base_lsn = 1234,
                .consistent_at_lsn = 5678,
                .consistent = true,
                .primary_epoch = 8};
  ASSERT_TRUE(replica_->SetReplicaMeta(m).ok());
  EXPECT_EQ(replica_->replica_meta(), m);
  OpenReplica();
  EXPECT_EQ(replica_->replica_meta(), m);
  EXPECT_EQ(replica_->State().replica, m);
  m.copy_in_progress = false;
  m.consistent = false;
  ASSERT_TRUE(replica_->SetReplicaMeta(m).ok());
  OpenReplica();
  EXPECT_EQ(replica_->replica_meta(), m);
  // Per group: the other group of the store has none.
  auto other = replica_store_->OpenGroup("third", {});
  ASSERT_TRUE(other.ok());
  EXPECT_EQ((*other)->replica_meta(), ReplicaMeta{});
}

TEST_F(ReplicationLogTest, OnDurableReportsEveryAdvanceInOrder) {
  std::mutex mu;
  std::vector<uint64_t> seen;
  std::atomic<bool> in_callback{false};
  GroupLog* log = nullptr;
  GroupLogOptions o;
  o.on_durable = [&](uint64_t d) {
    EXPECT_FALSE(in_callback.exchange(true)) << "calls overlap";
    EXPECT_GE(log->durable_lsn(), d);
    {
      std::lock_guard l(mu);
      seen.push_back(d);
    }
    in_callback = false;
  };
  OpenPrimary(o);
  log = primary_;
  FillPrimary(3);
  {
    std::lock_guard l(mu);
    EXPECT_TRUE(seen.empty()) << "nothing was synced";
  }
  ASSERT_TRUE(SyncWait(primary_).ok());  // inline fsync
  {
    std::lock_guard l(mu);
    EXPECT_EQ(seen, (std::vector<uint64_t>{3}));
  }
  ASSERT_TRUE(AppendWait(primary_, WriteReq(0, "fua", true)).ok());  // committer fsync
  {
    std::lock_guard l(mu);
    EXPECT_EQ(seen, (std::vector<uint64_t>{3, 4}));
  }
  // Many threads: FUA appends and Syncs race between the committer and inline syncs.
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        if ((i + t) % 5 == 0) {
          EXPECT_TRUE(SyncWait(primary_).ok());
        } else {
          EXPECT_TRUE(AppendWait(primary_, WriteReq(0, "x", i % 2 == 0)).ok());
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  ASSERT_TRUE(SyncWait(primary_).ok());
  std::lock_guard l(mu);
  for (size_t i = 1; i < seen.size(); ++i) ASSERT_LT(seen[i - 1], seen[i]) << "at " << i;
  EXPECT_EQ(seen.back(), primary_->durable_lsn());
  EXPECT_EQ(seen.back(), primary_->last_lsn());
}

TEST_F(ReplicationLogTest, OnDurableMaySyncAndAppend) {
  // A callback that syncs (inline, re-entering the notifier) and appends must not deadlock.
  std::atomic<int> calls{0};
  GroupLog* log = nullptr;
  GroupLogOptions o;
  o.on_durable = [&](uint64_t) {
    if (calls.fetch_add(1) < 3) {
      log->Append(WriteReq(0, "from-callback"), [](absl::StatusOr<uint64_t>) {});
      log->Sync([](absl::Status) {});
    }
  };
  OpenPrimary(o);
  log = primary_;
  ASSERT_TRUE(AppendWait(primary_, WriteReq(0, "first", true)).ok());
  for (int i = 0; i < 100 && primary_->durable_lsn() < 4; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(primary_->durable_lsn(), 4u);
  EXPECT_EQ(primary_->last_lsn(), 4u);
  // The callback uses this test's locals: stop the log's threads before they go (TSan saw the
  // syncer run it after the test body had returned).
  primary_ = nullptr;
  primary_store_.reset();
}

// A replica acknowledges `received` before it applies (replicated_complete_before_apply): the
// primary's sync WRITE waits for the ack, not for the replica's volume write. A synced run (FUA)
// completes only after its fsync, which comes after the apply.
TEST_F(ReplicationLogTest, AReplicatedBatchCompletesBeforeItIsApplied) {
  for (const bool early : {true, false}) {
    for (const bool sync : {false, true}) {
      SCOPED_TRACE(fmt::format("replicated_complete_before_apply={} sync={}", early, sync));
      std::atomic<bool> completed{false};
      std::atomic<int> batches{0}, applied_after_completion{0};
      GroupLogOptions o;
      o.replicated_complete_before_apply = early;
      o.on_batch_written = [&](std::span<const LogRecordView>) {
        ++batches;
        if (completed.load()) ++applied_after_completion;
        return absl::OkStatus();
      };
      OpenReplica(o);  // the same log, reopened with these options: it goes on where it was
      FillPrimary(3);
      const uint64_t first = replica_->last_lsn() + 1;
      std::promise<absl::StatusOr<uint64_t>> p;
      auto f = p.get_future();
      replica_->AppendReplicated(primary_->group_id(), first,
                                 Parsed(Ship(primary_, first, first + 2)), sync,
                                 [&](absl::StatusOr<uint64_t> lsn) {
                                   completed = true;
                                   p.set_value(lsn);
                                 });
      auto r = f.get();
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(*r, first + 2);
      EXPECT_EQ(batches.load(), 1);
      EXPECT_EQ(applied_after_completion.load(), early && !sync ? 1 : 0);
    }
  }
}

TEST_F(ReplicationLogTest, ARunWrittenByManyBatchesReportsAnErrorOfAnyOfThem) {
  std::atomic<int> batches{0};
  GroupLogOptions o;
  o.max_batch_records = 2;
  o.on_batch_written = [&](std::span<const LogRecordView> recs) {
    ++batches;
    for (const LogRecordView& r : recs) {
      if (r.lsn == 3) return absl::DataLossError("volume broke at LSN 3");
    }
    return absl::OkStatus();
  };
  OpenReplica(o);
  FillPrimary(7);
  auto r = ReplicateWait(replica_, primary_->group_id(), 1, Parsed(Ship(primary_, 1, 7)));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  EXPECT_TRUE(Contains(r.status(), "volume broke at LSN 3")) << r.status();
  // The run completes when its last batch is written (replicated_complete_before_apply); that
  // batch's apply may still be running on the committer.
  for (int i = 0; i < 500 && batches.load() < 4; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_GE(batches.load(), 4);
  EXPECT_EQ(replica_->last_lsn(), 7u) << "as with Append, the records stay in the log";
}

}  // namespace
}  // namespace tvilling::storage
