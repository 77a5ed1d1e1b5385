// group_controller_test.cc: run-time role switches of a group on a real RocksDB and real volume
// files: exports follow the role, a demotion fails what it held and keeps every acknowledged write
// in the log, a promotion begins the epoch it is given (refusing one the log has already seen), and
// the coordinator's fence and the promotion combine in either order.
#include "agent/node/group_controller.h"

#include <gtest/gtest.h>

#include <atomic>
#include <future>
#include <mutex>
#include <thread>

#include "tests/unit/node/export_wait.h"
#include "tests/unit/storage/temp_dir.h"

namespace tvilling::node {
namespace {

using storage::Bytes;

// A write whose completion the test polls.
struct Pending {
  std::promise<absl::Status> p;
  std::future<absl::Status> f = p.get_future();
  nbd::Export::Done done() {
    return [this](absl::Status s) { p.set_value(s); };
  }
  bool ready() { return f.wait_for(std::chrono::milliseconds(0)) == std::future_status::ready; }
  absl::Status get() { return f.get(); }
};

class GroupControllerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto s = storage::LogStore::Open({.dir = dir_.path() / "log"});
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = std::move(*s);
    GroupRuntimeOptions o;
    o.name = "g0";
    o.checkpoint_interval_ms = 3600 * 1000;
    VolumeSpec v;
    v.name = "vol0";
    v.volume.path = dir_.path() / "vol0.img";
    v.volume.size_bytes = 8 << 20;
    o.volumes.push_back(v);
    auto g = GroupRuntime::Open(*store_, o);
    ASSERT_TRUE(g.ok()) << g.status();
    rt_ = std::move(*g);
  }
  void TearDown() override {
    if (ctl_) ctl_->Stop();
    ctl_.reset();
    if (rt_) {
      EXPECT_TRUE(rt_->Stop().ok());
    }
  }
  // has_peers: a ReplicaGroup/PrimaryReplicator pair (with no peer to dial: no transport here).
  void MakeController(bool has_peers, bool coordinated) {
    GroupControllerOptions o;
    o.site = "site-a";
    o.has_peers = has_peers;
    o.coordinated = coordinated;
    o.primary.site = "site-a";
    o.replica.site = "site-a";
    ctl_ = std::make_unique<GroupController>(rt_.get(), o, nullptr);
  }
  nbd::Export& exp() { return *rt_->exports()[0]; }
  absl::Status Write(uint64_t offset, char c) {
    return Wait([&](auto d) {
      exp().Write(offset, Bytes::Copy(std::string(4096, c)), false, std::move(d));
    });
  }
  template <class Pred>
  static bool Eventually(Pred pred) {
    for (int i = 0; i < 500; ++i) {
      if (pred()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }

  TempDir dir_;
  std::unique_ptr<storage::LogStore> store_;
  std::unique_ptr<GroupRuntime> rt_;
  std::unique_ptr<GroupController> ctl_;
};

TEST_F(GroupControllerTest, ExportsFollowTheRole) {
  MakeController(/*has_peers=*/false, /*coordinated=*/false);
  ASSERT_TRUE(ctl_->Start(GroupRole::kPrimary).ok());
  EXPECT_EQ(ctl_->role(), GroupRole::kPrimary);
  EXPECT_FALSE(exp().info().read_only);
  ASSERT_TRUE(Write(0, 'a').ok());

  ASSERT_TRUE(ctl_->Demote("test").ok());
  EXPECT_EQ(ctl_->role(), GroupRole::kReplica);
  EXPECT_TRUE(exp().info().read_only) << "a new connection negotiates read-only";
  const absl::Status st = Write(4096, 'b');
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;  // NBD ESHUTDOWN: retryable
  EXPECT_NE(st.message().find("not the group's primary"), std::string::npos) << st;
  EXPECT_EQ(rt_->log().last_lsn(), 1u) << "the refused write never reached the log";
  ASSERT_TRUE(ctl_->Demote("again").ok()) << "demoting a replica does nothing";

  ASSERT_TRUE(ctl_->Promote(0, "test").ok());
  EXPECT_FALSE(exp().info().read_only);
  ASSERT_TRUE(Write(4096, 'c').ok());
  EXPECT_EQ(rt_->log().last_lsn(), 2u);
  v1::GroupStatus s;
  ctl_->FillStatus(&s);
  EXPECT_EQ(s.role(), "primary");
}

TEST_F(GroupControllerTest, AwaitingElectionHoldsWritesUntilPromotedAndAllowed) {
  MakeController(/*has_peers=*/false, /*coordinated=*/true);
  ASSERT_TRUE(ctl_->Start(GroupRole::kReplica, /*await_election=*/true).ok());
  Pending w;
  exp().Write(0, Bytes::Copy(std::string(4096, 'x')), false, w.done());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(w.ready()) << "held (not refused) while the election is pending";
  ASSERT_TRUE(ctl_->Promote(0, "elected").ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(w.ready()) << "promoted, but the coordinator has not allowed I/O yet";
  ctl_->CoordinatorResume();
  ASSERT_TRUE(w.get().ok());
  EXPECT_EQ(rt_->log().last_lsn(), 1u);

  // The fence wins over the role: suspended, a write waits again.
  ctl_->CoordinatorSuspend("lease not renewed");
  Pending w2;
  exp().Write(4096, Bytes::Copy(std::string(4096, 'y')), false, w2.done());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(w2.ready());
  // Losing the key demotes: the held write fails, retryable, and never reaches the log.
  ctl_->PostDemote("the leader key is held by site-b");
  const absl::Status st = w2.get();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_TRUE(Eventually([&] { return ctl_->role() == GroupRole::kReplica; }));
  EXPECT_EQ(rt_->log().last_lsn(), 1u);
}

TEST_F(GroupControllerTest, ResumeBeforePromotionCompletesTakesEffectAtPromotion) {
  MakeController(/*has_peers=*/false, /*coordinated=*/true);
  ASSERT_TRUE(ctl_->Start(GroupRole::kReplica, /*await_election=*/true).ok());
  ctl_->CoordinatorResume();  // the coordinator's kResumeIo right after its kPromote
  Pending w;
  exp().Write(0, Bytes::Copy(std::string(4096, 'x')), false, w.done());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(w.ready()) << "not primary yet";
  ctl_->PostPromote(0, "elected");
  ASSERT_TRUE(w.get().ok());
}

TEST_F(GroupControllerTest, AnotherSitesElectionFailsTheWritesHeldForIt) {
  MakeController(/*has_peers=*/false, /*coordinated=*/true);
  ASSERT_TRUE(ctl_->Start(GroupRole::kReplica, /*await_election=*/true).ok());
  Pending w;
  exp().Write(0, Bytes::Copy(std::string(4096, 'x')), false, w.done());
  ctl_->PostFollow("site-b");
  const absl::Status st = w.get();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_TRUE(Eventually([&] { return exp().info().read_only; }));
  EXPECT_EQ(rt_->log().last_lsn(), 0u);
}

TEST_F(GroupControllerTest, PromotionBeginsTheGivenEpochAndRefusesOneTheLogHasSeen) {
  MakeController(/*has_peers=*/true, /*coordinated=*/false);
  // The coordinator is told of a failed promotion in an etcd epoch (it then resigns the key).
  std::vector<std::pair<uint64_t, std::string>> failed;
  ctl_->SetPromotionFailedNotify(
      [&](uint64_t epoch, const std::string& why) { failed.emplace_back(epoch, why); });
  ASSERT_TRUE(ctl_->Start(GroupRole::kReplica).ok());
  v1::GroupStatus s;
  ctl_->FillStatus(&s);
  EXPECT_EQ(s.role(), "replica");
  ASSERT_TRUE(ctl_->Promote(17, "elected in etcd").ok());
  EXPECT_EQ(ctl_->epoch(), 17u);
  ASSERT_TRUE(Write(0, 'a').ok());
  ASSERT_FALSE(rt_->log().State().history.empty());
  EXPECT_EQ(rt_->log().State().history.back().epoch, 17u);
  EXPECT_TRUE(ctl_->Promote(17, "same epoch again").ok()) << "idempotent";
  EXPECT_EQ(ctl_->Promote(20, "newer").code(), absl::StatusCode::kFailedPrecondition)
      << "a primary demotes before it begins another epoch";

  ASSERT_TRUE(ctl_->Demote("switchover").ok());
  const absl::Status refused = ctl_->Promote(12, "a stale leader key");
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition) << refused;
  EXPECT_NE(refused.message().find("already seen epoch 17"), std::string::npos) << refused;
  EXPECT_EQ(ctl_->role(), GroupRole::kReplica) << "a refused promotion stays a replica";
  EXPECT_EQ(Write(4096, 'b').code(), absl::StatusCode::kUnavailable);
  ASSERT_EQ(failed.size(), 1u) << "the coordinator was not told of the failed promotion";
  EXPECT_EQ(failed[0].first, 12u);
  EXPECT_NE(failed[0].second.find("already seen epoch 17"), std::string::npos) << failed[0].second;

  // Without etcd: one above the newest seen.
  ASSERT_TRUE(ctl_->Promote(0, "operator").ok());
  EXPECT_EQ(ctl_->epoch(), 18u);
  ASSERT_TRUE(Write(4096, 'c').ok());
  EXPECT_EQ(rt_->log().State().history.back().epoch, 18u);
  EXPECT_EQ(rt_->log().State().history.back().first_lsn, 2u);
  EXPECT_EQ(failed.size(), 1u) << "only failures of promotions in an etcd epoch are reported";
}

// A demoted primary keeps the positions of its peers until a new primary's stream is accepted:
// they hold its unreplicated tail in the log, so that the rejoin can save it (a checkpoint's
// retention would otherwise drop it first: integration.rejoin.kill9_during_restore failed so).
// The replica forgets them on acceptance (ReplicaGroup), then its retention goes on
// (integration.repl.replica_retention_after_switch).
TEST_F(GroupControllerTest, ADemotionKeepsPeerPositionsForTheRejoin) {
  MakeController(/*has_peers=*/true, /*coordinated=*/false);
  ASSERT_TRUE(ctl_->Start(GroupRole::kPrimary).ok());
  ASSERT_TRUE(Write(0, 'a').ok());
  ASSERT_TRUE(rt_->log().SetPeerPosition({.peer = "site-b", .durable_lsn = 0}).ok());
  ASSERT_TRUE(ctl_->Demote("switchover").ok());
  EXPECT_EQ(rt_->log().State().peers.size(), 1u)
      << "the demotion dropped the positions that keep the unreplicated tail for the rejoin";
}

// Writers race a demotion: every write acknowledged OK is in the log (and on the volume), every
// other one failed with Unavailable; nothing completes OK after the demotion.
TEST_F(GroupControllerTest, DemotionUnderLoadKeepsEveryAcknowledgedWrite) {
  MakeController(/*has_peers=*/true, /*coordinated=*/false);
  ASSERT_TRUE(ctl_->Start(GroupRole::kPrimary).ok());
  constexpr int kWriters = 4, kPerWriter = 200;
  std::mutex mu;
  std::vector<uint64_t> acked;  // offsets
  std::atomic<int> failed{0}, other{0};
  std::atomic<bool> demoted{false};
  std::atomic<int> ok_after_demotion{0};
  std::vector<std::thread> writers;
  for (int w = 0; w < kWriters; ++w) {
    writers.emplace_back([&, w] {
      for (int i = 0; i < kPerWriter; ++i) {
        const uint64_t off = (static_cast<uint64_t>(w) * kPerWriter + i) * 4096;
        const bool after = demoted.load();
        const absl::Status st = Wait([&](auto d) {
          exp().Write(off, Bytes::Copy(std::string(4096, static_cast<char>('A' + w))), false,
                      std::move(d));
        });
        if (st.ok()) {
          if (after) ok_after_demotion.fetch_add(1);
          std::lock_guard l(mu);
          acked.push_back(off);
        } else if (st.code() == absl::StatusCode::kUnavailable) {
          failed.fetch_add(1);
        } else {
          other.fetch_add(1);
        }
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_TRUE(ctl_->Demote("under load").ok());
  demoted = true;
  for (auto& t : writers) t.join();
  EXPECT_EQ(other.load(), 0);
  EXPECT_EQ(ok_after_demotion.load(), 0) << "a write started after the demotion completed OK";
  EXPECT_GT(failed.load(), 0) << "the demotion came too late to race anything";
  ASSERT_GE(rt_->log().last_lsn(), acked.size());
  // Every acknowledged write's data is on the volume (applied from the log).
  for (uint64_t off : acked) {
    std::string buf(4096, '\0');
    ASSERT_TRUE(rt_->volume(0).Read(off, std::span<char>(buf.data(), buf.size())).ok());
    const char want = static_cast<char>('A' + off / 4096 / kPerWriter);
    ASSERT_EQ(buf, std::string(4096, want)) << "acknowledged write at " << off << " lost";
  }
}

}  // namespace
}  // namespace tvilling::node
