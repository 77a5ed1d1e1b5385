// group_runtime_test.cc: a group on a real RocksDB and real volume files: writes through the export
// land in the log and the volume, replay after a crash, refusal to serve when the replay range is
// corrupt, checkpoints and truncation, and the I/O fence a coordinator suspends and resumes.
#include "agent/node/group_runtime.h"

#include <gtest/gtest.h>
#include <rocksdb/db.h>

#include <future>
#include <mutex>
#include <optional>
#include <thread>

#include "tests/unit/node/export_wait.h"
#include "tests/unit/storage/temp_dir.h"

namespace tvilling::node {
namespace {

using storage::Bytes;

class GroupRuntimeTest : public ::testing::Test {
 protected:
  GroupRuntimeOptions Options() {
    GroupRuntimeOptions o;
    o.name = "g0";
    o.checkpoint_interval_ms = 3600 * 1000;  // checkpoints only when the test asks
    o.log.segment_records = 16;
    for (const char* name : {"vol0", "vol1"}) {
      VolumeSpec v;
      v.name = name;
      v.volume.path = dir_.path() / (std::string(name) + ".img");
      v.volume.size_bytes = 8 << 20;
      o.volumes.push_back(v);
    }
    return o;
  }
  void OpenStore() {
    auto s = storage::LogStore::Open({.dir = dir_.path() / "log"});
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = std::move(*s);
  }
  absl::StatusOr<std::unique_ptr<GroupRuntime>> OpenGroup() {
    return GroupRuntime::Open(*store_, Options());
  }
  std::string ReadVolumeFile(const char* name, uint64_t offset, size_t n) {
    auto v = storage::Volume::Open({.path = dir_.path() / (std::string(name) + ".img"),
                                    .size_bytes = 8 << 20,
                                    .create = false,
                                    .read_only = true});
    EXPECT_TRUE(v.ok()) << v.status();
    std::string out(n, '\0');
    EXPECT_TRUE((*v)->Read(offset, std::span<char>(out.data(), n)).ok());
    return out;
  }
  TempDir dir_;
  std::unique_ptr<storage::LogStore> store_;
};

TEST_F(GroupRuntimeTest, WritesGoThroughTheLogAndAreVisibleWhenComplete) {
  OpenStore();
  auto g = OpenGroup();
  ASSERT_TRUE(g.ok()) << g.status();
  auto& exports = (*g)->exports();
  ASSERT_EQ(exports.size(), 2u);
  EXPECT_EQ(exports[0]->info().name, "vol0");
  EXPECT_EQ(exports[0]->info().size_bytes, 8u << 20);
  ASSERT_TRUE(Wait([&](auto d) {
                exports[1]->Write(4096, Bytes::Copy(std::string(4096, 'b')), false, std::move(d));
              }).ok());
  ASSERT_TRUE(
      Wait([&](auto d) { exports[0]->Write(0, Bytes::Copy("hello"), true, std::move(d)); }).ok());
  EXPECT_EQ((*g)->log().last_lsn(), 2u);
  EXPECT_GE((*g)->log().durable_lsn(), 2u) << "FUA completes only when durable";
  std::string buf(5, '\0');
  ASSERT_TRUE(Wait([&](auto d) { exports[0]->Read(0, 5, buf.data(), std::move(d)); }).ok());
  EXPECT_EQ(buf, "hello");
  ASSERT_TRUE(Wait([&](auto d) { exports[1]->Trim(4096, 2048, false, std::move(d)); }).ok());
  ASSERT_TRUE(
      Wait([&](auto d) { exports[1]->WriteZeroes(6144, 1024, false, true, std::move(d)); }).ok());
  ASSERT_TRUE(Wait([&](auto d) { exports[1]->Flush(std::move(d)); }).ok());
  std::string v1(4096, '\0');
  ASSERT_TRUE(Wait([&](auto d) { exports[1]->Read(4096, 4096, v1.data(), std::move(d)); }).ok());
  EXPECT_EQ(v1, std::string(3072, '\0') + std::string(1024, 'b'));
  auto st = (*g)->log().State();
  EXPECT_EQ(st.last_lsn, 4u);
  EXPECT_EQ(st.durable_lsn, 4u);
}

// Online verify's notes (core/verify.h): per 1 MiB block, the LSN of the last record applied there;
// complete from the applied LSN at Open (records replayed then are noted too).
TEST_F(GroupRuntimeTest, NotesTheLastWriteLsnOfEveryMiB) {
  OpenStore();
  {
    auto g = OpenGroup();
    ASSERT_TRUE(g.ok()) << g.status();
    auto& exports = (*g)->exports();
    EXPECT_EQ((*g)->write_track_from(), 0u);
    EXPECT_EQ((*g)->LastWriteLsn(0, 0, 8 << 20), 0u);
    // LSN 1: vol0, crossing from block 0 into block 1. LSN 2: vol1 block 3. LSN 3: vol0 block 1.
    ASSERT_TRUE(Wait([&](auto d) {
                  exports[0]->Write((1 << 20) - 4096, Bytes::Copy(std::string(8192, 'a')), false,
                                    std::move(d));
                }).ok());
    ASSERT_TRUE(Wait([&](auto d) {
                  exports[1]->Write(3 << 20, Bytes::Copy(std::string(4096, 'b')), false,
                                    std::move(d));
                }).ok());
    ASSERT_TRUE(Wait([&](auto d) {
                  exports[0]->Write((1 << 20) + 4096, Bytes::Copy(std::string(4096, 'c')), false,
                                    std::move(d));
                }).ok());
    EXPECT_EQ((*g)->LastWriteLsn(0, 0, 1 << 20), 1u);
    EXPECT_EQ((*g)->LastWriteLsn(0, 1 << 20, 1 << 20), 3u);
    EXPECT_EQ((*g)->LastWriteLsn(0, 0, 2 << 20), 3u);  // a 2 MiB chunk: the larger note
    EXPECT_EQ((*g)->LastWriteLsn(0, 2 << 20, 6 << 20), 0u);
    EXPECT_EQ((*g)->LastWriteLsn(1, 3 << 20, 1 << 20), 2u);
    EXPECT_EQ((*g)->LastWriteLsn(7, 0, 1), 0u);  // no such volume
    ASSERT_TRUE((*g)->Checkpoint().ok());
    ASSERT_TRUE((*g)->Stop().ok());
  }
  // After a restart the notes begin at the applied checkpoint: what came before is unknown.
  store_.reset();
  OpenStore();
  auto g = OpenGroup();
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ((*g)->write_track_from(), 3u);
  EXPECT_EQ((*g)->LastWriteLsn(0, 0, 8 << 20), 0u);
}

TEST_F(GroupRuntimeTest, ReplaysRecordsTheVolumesDoNotHold) {
  // Records reach the log, but the process dies before the volume saw them: append with no applier.
  OpenStore();
  {
    auto log = store_->OpenGroup("g0", {});
    ASSERT_TRUE(log.ok());
    for (int i = 0; i < 20; ++i) {
      storage::AppendRequest r;
      r.volume = i % 2;
      r.offset = 512ull * i;
      r.length = 512;
      r.payload = Bytes::Copy(std::string(512, static_cast<char>('A' + i)));
      std::promise<void> p;
      (*log)->Append(std::move(r), [&](absl::StatusOr<uint64_t> l) {
        EXPECT_TRUE(l.ok());
        p.set_value();
      });
      p.get_future().wait();
    }
  }
  store_.reset();
  OpenStore();
  auto g = OpenGroup();
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ((*g)->Stats().replayed_records, 20u);
  EXPECT_EQ((*g)->log().State().applied_lsn, 20u) << "replay ends with a checkpoint";
  ASSERT_TRUE((*g)->Stop().ok());
  g->reset();
  EXPECT_EQ(ReadVolumeFile("vol0", 512 * 4, 512), std::string(512, 'E'));
  EXPECT_EQ(ReadVolumeFile("vol1", 512 * 19, 512), std::string(512, 'T'));
  // A second start has nothing to replay.
  store_.reset();
  OpenStore();
  auto g2 = OpenGroup();
  ASSERT_TRUE(g2.ok());
  EXPECT_EQ((*g2)->Stats().replayed_records, 0u);
}

TEST_F(GroupRuntimeTest, RefusesToServeWhenTheReplayRangeIsCorrupt) {
  OpenStore();
  uint32_t gid = 0;
  {
    auto log = store_->OpenGroup("g0", {});
    ASSERT_TRUE(log.ok());
    gid = (*log)->group_id();
    for (int i = 0; i < 5; ++i) {
      storage::AppendRequest r;
      r.length = 8;
      r.payload = Bytes::Copy("abcdefgh");
      std::promise<void> p;
      (*log)->Append(std::move(r), [&](absl::StatusOr<uint64_t>) { p.set_value(); });
      p.get_future().wait();
    }
  }
  std::string key = storage::EncodeLogKey(gid, 4), value;
  ASSERT_TRUE(store_->db()->Get({}, key, &value).ok());
  value.back() ^= 1;
  ASSERT_TRUE(store_->db()->Put({}, key, value).ok());
  store_.reset();
  OpenStore();
  auto g = OpenGroup();
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(g.status().message().find("LSN 4"), absl::string_view::npos) << g.status();
  EXPECT_NE(g.status().message().find("refusing to serve"), absl::string_view::npos) << g.status();
}

TEST_F(GroupRuntimeTest, CheckpointRecordsAppliedLsnAndTruncatesAppliedSegments) {
  OpenStore();
  auto g = OpenGroup();
  ASSERT_TRUE(g.ok());
  auto e = (*g)->exports()[0];
  for (int i = 0; i < 40; ++i) {
    ASSERT_TRUE(Wait([&](auto d) {
                  e->Write(4096ull * i, Bytes::Copy(std::string(4096, 'c')), false, std::move(d));
                }).ok());
  }
  ASSERT_TRUE((*g)->Checkpoint().ok());
  auto st = (*g)->log().State();
  EXPECT_EQ(st.applied_lsn, 40u);
  EXPECT_EQ(st.first_lsn, 33u) << "segments of 16 records: [1,16] and [17,32] go, [33,40] is open";
  EXPECT_EQ((*g)->Stats().checkpoints, 1u);
}

// A rejoin cuts the log back (a full copy resets it) and lowers the applied LSN with checkpoints
// held: a checkpoint that took the applied LSN before the cut must not record it after (the new
// log's records up to it would count as applied). Here one starts during the reset, waits for it,
// then finds nothing above the reset's applied LSN to record.
TEST_F(GroupRuntimeTest, ResetLogHoldsCheckpointsAndPausesTheApplier) {
  OpenStore();
  auto g = OpenGroup();
  ASSERT_TRUE(g.ok());
  auto e = (*g)->exports()[0];
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(Wait([&](auto d) {
                  e->Write(4096ull * i, Bytes::Copy(std::string(4096, 'h')), false, std::move(d));
                }).ok());
  }
  ASSERT_EQ((*g)->applied_lsn(), 10u);
  std::future<absl::Status> checkpoint;
  ASSERT_TRUE((*g)->ResetLog(4,
                             [&] {
                               checkpoint = std::async(std::launch::async,
                                                       [&] { return (*g)->Checkpoint(); });
                               EXPECT_EQ(checkpoint.wait_for(std::chrono::milliseconds(200)),
                                         std::future_status::timeout)
                                   << "a checkpoint ran during the reset";
                               return absl::OkStatus();
                             })
                  .ok());
  EXPECT_TRUE((*g)->apply_paused());
  EXPECT_EQ((*g)->applied_lsn(), 4u);
  ASSERT_TRUE(checkpoint.get().ok());
  EXPECT_EQ((*g)->log().State().applied_lsn, 0u)
      << "recorded an applied LSN taken before the reset";
  EXPECT_EQ((*g)->Stats().checkpoints, 0u);
}

// A reset that fails (the log is unchanged) leaves the applier running at its applied LSN.
TEST_F(GroupRuntimeTest, AFailedResetLogLeavesTheApplierAsItWas) {
  OpenStore();
  auto g = OpenGroup();
  ASSERT_TRUE(g.ok());
  auto e = (*g)->exports()[0];
  ASSERT_TRUE(Wait([&](auto d) {
                e->Write(0, Bytes::Copy(std::string(4096, 'f')), false, std::move(d));
              }).ok());
  absl::Status st =
      (*g)->ResetLog(0, [] { return absl::FailedPreconditionError("the log moved on"); });
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE((*g)->apply_paused());
  EXPECT_EQ((*g)->applied_lsn(), 1u);
  ASSERT_TRUE(Wait([&](auto d) {
                e->Write(4096, Bytes::Copy(std::string(4096, 'g')), false, std::move(d));
              }).ok());
  EXPECT_EQ((*g)->applied_lsn(), 2u);
}

// Issue 4 (async lag tail): a checkpoint writes back what the applier wrote, in pieces of at most
// checkpoint_chunk_bytes, before its fsync; unpaced (0) it only fsyncs.
TEST_F(GroupRuntimeTest, CheckpointWritesBackTheAppliedRangesInChunks) {
  for (const uint64_t chunk : {uint64_t{1} << 20, uint64_t{0}}) {
    SCOPED_TRACE(chunk);
    TempDir dir;
    auto s = storage::LogStore::Open({.dir = dir.path() / "log"});
    ASSERT_TRUE(s.ok()) << s.status();
    GroupRuntimeOptions o = Options();
    for (VolumeSpec& v : o.volumes) v.volume.path = dir.path() / v.volume.path.filename();
    o.checkpoint_chunk_bytes = chunk;
    o.writeback_bytes = 0;  // the checkpoints alone (WritesBackBetweenCheckpoints)
    auto g = GroupRuntime::Open(**s, o);
    ASSERT_TRUE(g.ok()) << g.status();
    auto& ex = (*g)->exports();
    // vol0: 2.5 MiB in 64 KiB writes (3 chunks of <= 1 MiB); vol1: one 4 KiB write (1 chunk); a
    // trim is not paced (no dirty pages).
    for (uint64_t off = 0; off < (5ull << 19); off += 64 << 10) {
      ASSERT_TRUE(Wait([&](auto d) {
                    ex[0]->Write(off, Bytes::Copy(std::string(64 << 10, 'w')), false, std::move(d));
                  }).ok());
    }
    ASSERT_TRUE(Wait([&](auto d) {
                  ex[1]->Write(6 << 20, Bytes::Copy(std::string(4096, 'x')), false, std::move(d));
                }).ok());
    ASSERT_TRUE(Wait([&](auto d) { ex[1]->Trim(0, 4 << 20, false, std::move(d)); }).ok());
    ASSERT_TRUE((*g)->Checkpoint().ok());
    EXPECT_EQ((*g)->Stats().writeback_chunks, chunk == 0 ? 0u : 4u);
    EXPECT_EQ((*g)->log().State().applied_lsn, (*g)->log().last_lsn());
    // Nothing new: the next checkpoint writes nothing back.
    ASSERT_TRUE(Wait([&](auto d) {
                  ex[0]->Write(0, Bytes::Copy(std::string(4096, 'y')), false, std::move(d));
                }).ok());
    ASSERT_TRUE((*g)->Checkpoint().ok());
    EXPECT_EQ((*g)->Stats().writeback_chunks, chunk == 0 ? 0u : 5u);
    ASSERT_TRUE((*g)->Stop().ok());
  }
}

// Between checkpoints the checkpointer writes back every writeback_bytes applied, without an
// fsync or a checkpoint, so the disk sees a steady stream; with writeback_bytes 0 it waits for the
// checkpoint.
TEST_F(GroupRuntimeTest, WritesBackBetweenCheckpoints) {
  for (const uint64_t step : {uint64_t{1} << 20, uint64_t{0}}) {
    SCOPED_TRACE(step);
    TempDir dir;
    auto s = storage::LogStore::Open({.dir = dir.path() / "log"});
    ASSERT_TRUE(s.ok()) << s.status();
    GroupRuntimeOptions o = Options();
    for (VolumeSpec& v : o.volumes) v.volume.path = dir.path() / v.volume.path.filename();
    o.checkpoint_chunk_bytes = 1 << 20;
    o.checkpoint_bytes = 1ull << 30;
    o.writeback_bytes = step;
    auto g = GroupRuntime::Open(**s, o);
    ASSERT_TRUE(g.ok()) << g.status();
    auto& ex = (*g)->exports();
    for (uint64_t off = 0; off < (4ull << 20); off += 64 << 10) {
      ASSERT_TRUE(Wait([&](auto d) {
                    ex[0]->Write(off, Bytes::Copy(std::string(64 << 10, 'w')), false, std::move(d));
                  }).ok());
    }
    // At least one pass (each takes what was applied until it runs, so a late one covers more).
    for (int i = 0; i < 500 && (step ? (*g)->Stats().writebacks < 1 : i < 20); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    const GroupRuntimeStats st = (*g)->Stats();
    EXPECT_EQ(st.checkpoints, 0u);
    EXPECT_EQ(st.checkpointed_lsn, 0u) << "nothing is recorded durable by a writeback";
    if (step) {
      EXPECT_GE(st.writebacks, 1u);
      EXPECT_LE(st.writebacks, 4u) << "one pass per MiB applied, at most";
      EXPECT_GE(st.writeback_chunks, 1u);
    } else {
      EXPECT_EQ(st.writebacks, 0u);
      EXPECT_EQ(st.writeback_chunks, 0u);
    }
    ASSERT_TRUE((*g)->Stop().ok());
  }
}

TEST_F(GroupRuntimeTest, VolumeErrorsNameTheGroupAndVolume) {
  OpenStore();
  auto o = Options();
  o.volumes[1].volume.path = dir_.path() / "missing-dir" / "vol1.img";
  o.volumes[1].volume.create = false;
  auto g = GroupRuntime::Open(*store_, o);
  ASSERT_FALSE(g.ok());
  EXPECT_NE(g.status().message().find("group g0: volume vol1"), absl::string_view::npos)
      << g.status();
}

// ---- I/O fencing (SuspendIo / ResumeIo / FailHeldIo) ----

// Completes a write "in the log" only when the test says so (stands in for replication).
class ManualGate : public CompletionGate {
 public:
  void WriteInLog(uint64_t, bool, nbd::Export::Done done) override {
    std::lock_guard l(mu);
    held.push_back(std::move(done));
  }
  void FlushedLocally(uint64_t, nbd::Export::Done done) override {
    std::move(done)(absl::OkStatus());
  }
  size_t size() {
    std::lock_guard l(mu);
    return held.size();
  }
  void ReleaseAll() {
    std::vector<nbd::Export::Done> h;
    {
      std::lock_guard l(mu);
      h.swap(held);
    }
    for (auto& d : h) std::move(d)(absl::OkStatus());
  }
  std::mutex mu;
  std::vector<nbd::Export::Done> held;
};

struct Completion {
  std::mutex mu;
  std::optional<absl::Status> status;
  nbd::Export::Done done() {
    return [this](absl::Status s) {
      std::lock_guard l(mu);
      status = s;
    };
  }
  std::optional<absl::Status> get() {
    std::lock_guard l(mu);
    return status;
  }
};

TEST_F(GroupRuntimeTest, SuspendedIoHoldsNewWritesBeforeTheLogAndResumesThem) {
  OpenStore();
  auto g = OpenGroup();
  ASSERT_TRUE(g.ok()) << g.status();
  auto& e = (*g)->exports()[0];
  (*g)->SuspendIo("test");
  EXPECT_TRUE((*g)->io_suspended());
  Completion w, f;
  e->Write(0, Bytes::Copy("held"), false, w.done());
  e->Flush(f.done());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(w.get().has_value());
  EXPECT_FALSE(f.get().has_value());
  EXPECT_EQ((*g)->log().last_lsn(), 0u) << "a held write must not reach the log";
  // Reads are served while suspended.
  std::string buf(4, 'x');
  ASSERT_TRUE(Wait([&](auto d) { e->Read(0, 4, buf.data(), std::move(d)); }).ok());
  EXPECT_EQ(buf, std::string(4, '\0'));
  (*g)->ResumeIo();
  for (int i = 0; i < 200 && !(w.get() && f.get()); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_TRUE(w.get().has_value());
  EXPECT_TRUE(w.get()->ok());
  ASSERT_TRUE(f.get().has_value());
  EXPECT_TRUE(f.get()->ok());
  EXPECT_EQ((*g)->log().last_lsn(), 1u);
}

TEST_F(GroupRuntimeTest, SuspendHoldsCompletionsOfWritesAlreadyInFlight) {
  OpenStore();
  auto g = OpenGroup();
  ASSERT_TRUE(g.ok()) << g.status();
  auto gate = std::make_shared<ManualGate>();
  (*g)->SetCompletionGate(gate);
  auto& e = (*g)->exports()[0];
  Completion w;
  e->Write(0, Bytes::Copy("in flight"), false, w.done());
  for (int i = 0; i < 200 && gate->size() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_EQ(gate->size(), 1u) << "the write should be in the log, waiting for the gate";
  (*g)->SuspendIo("test");
  gate->ReleaseAll();  // replication says done, but the fence holds it
  EXPECT_FALSE(w.get().has_value()) << "a write completed while I/O was suspended";
  (*g)->ResumeIo();
  ASSERT_TRUE(w.get().has_value());
  EXPECT_TRUE(w.get()->ok());
}

TEST_F(GroupRuntimeTest, FailHeldIoFailsWhatWasHeldAndStaysSuspended) {
  OpenStore();
  auto g = OpenGroup();
  ASSERT_TRUE(g.ok()) << g.status();
  auto gate = std::make_shared<ManualGate>();
  (*g)->SetCompletionGate(gate);
  auto& e = (*g)->exports()[0];
  Completion in_flight, held;
  e->Write(0, Bytes::Copy("a"), false, in_flight.done());
  for (int i = 0; i < 200 && gate->size() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  (*g)->SuspendIo("test");
  gate->ReleaseAll();
  e->Write(4096, Bytes::Copy("b"), false, held.done());
  (*g)->FailHeldIo(absl::UnavailableError("no longer primary"));
  ASSERT_TRUE(in_flight.get().has_value());
  EXPECT_EQ(in_flight.get()->code(), absl::StatusCode::kUnavailable);
  ASSERT_TRUE(held.get().has_value());
  EXPECT_EQ(held.get()->code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ((*g)->log().last_lsn(), 1u) << "the held write never reached the log";
  EXPECT_TRUE((*g)->io_suspended());
  Completion later;
  e->Write(8192, Bytes::Copy("c"), false, later.done());
  EXPECT_FALSE(later.get().has_value()) << "still suspended after FailHeldIo";
  (*g)->FailHeldIo(absl::UnavailableError("stop"));
  EXPECT_TRUE(later.get().has_value());
}

}  // namespace
}  // namespace tvilling::node
