// replication_test.cc: the pure replication state machines (agent/core/replication.h).
#include "agent/core/replication.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace tvilling::core {
namespace {

using ::testing::HasSubstr;
using Kind = HandshakeDecision::Kind;

TEST(History, EpochAtAndCommonPrefix) {
  History a = {{1, 1}, {3, 50}};
  EXPECT_EQ(EpochAt(a, 0), 0u);
  EXPECT_EQ(EpochAt(a, 1), 1u);
  EXPECT_EQ(EpochAt(a, 49), 1u);
  EXPECT_EQ(EpochAt(a, 50), 3u);
  History b = {{1, 1}, {2, 40}};
  EXPECT_EQ(CommonPrefix(a, 100, b, 100), 39u);
  EXPECT_EQ(CommonPrefix(a, 30, b, 100), 30u);
  EXPECT_EQ(CommonPrefix(a, 100, a, 80), 80u);
  EXPECT_EQ(CommonPrefix({}, 0, a, 10), 0u);
}

PrimaryHello Hello() {
  PrimaryHello h;
  h.group = "g0";
  h.site = "site-a";
  h.epoch = 2;
  h.history = {{1, 1}, {2, 101}};
  h.volume_sizes = {1 << 20};
  h.first_lsn = 50;
  h.last_lsn = 200;
  return h;
}

ReplicaView View() {
  ReplicaView v;
  v.group_known = true;
  v.newest_epoch = 2;
  v.history = {{1, 1}, {2, 101}};
  v.last_lsn = 150;
  v.volume_sizes = {1 << 20};
  v.consistent = true;
  return v;
}

TEST(Handshake, Rules) {
  EXPECT_EQ(DecideHandshake(Hello(), View()).kind, Kind::kStreamFrom);
  EXPECT_EQ(DecideHandshake(Hello(), View()).start_lsn, 151u);

  ReplicaView v = View();
  v.group_known = false;
  EXPECT_EQ(DecideHandshake(Hello(), v).code, RefuseCode::kUnknownGroup);
  v = View();
  v.is_primary = true;
  EXPECT_EQ(DecideHandshake(Hello(), v).code, RefuseCode::kNotReplica);
  v = View();
  v.newest_epoch = 3;
  auto d = DecideHandshake(Hello(), v);
  EXPECT_EQ(d.code, RefuseCode::kStaleEpoch);
  EXPECT_THAT(d.reason, HasSubstr("stale epoch"));
  v = View();
  v.volume_sizes = {2 << 20};
  EXPECT_EQ(DecideHandshake(Hello(), v).code, RefuseCode::kVolumeMismatch);
  // The replica wrote LSNs 101.. in epoch 1 (an old primary's unreplicated tail).
  v = View();
  v.newest_epoch = 1;
  v.history = {{1, 1}};
  d = DecideHandshake(Hello(), v);
  EXPECT_EQ(d.code, RefuseCode::kDiverged);
  EXPECT_THAT(d.reason, HasSubstr("LSN 101"));
  // Ahead of the primary.
  v = View();
  v.last_lsn = 250;
  EXPECT_EQ(DecideHandshake(Hello(), v).code, RefuseCode::kDiverged);
  // Behind the primary's retention.
  v = View();
  v.last_lsn = 10;
  d = DecideHandshake(Hello(), v);
  EXPECT_EQ(d.kind, Kind::kFullCopy);
  EXPECT_FALSE(d.copy_resume);
  EXPECT_THAT(d.reason, HasSubstr("retention"));
  // New replica.
  v = ReplicaView{};
  v.group_known = true;
  v.volume_sizes = {1 << 20};
  EXPECT_EQ(DecideHandshake(Hello(), v).kind, Kind::kFullCopy);
  // Interrupted copy: resumes where it was while the log still holds the next LSN.
  v = View();
  v.consistent = false;
  v.copy_in_progress = true;
  v.copy_volume = 0;
  v.copy_offset = 4096;
  v.history = {{2, 120}};
  v.last_lsn = 150;
  d = DecideHandshake(Hello(), v);
  EXPECT_EQ(d.kind, Kind::kFullCopy);
  EXPECT_TRUE(d.copy_resume);
  EXPECT_EQ(d.copy_offset, 4096u);
  EXPECT_EQ(d.start_lsn, 151u);
}

SenderOptions Opt(Mode m) {
  SenderOptions o;
  o.mode = m;
  return o;
}

TEST(PrimaryGroup, SyncPeerHoldsWritesAndFlushes) {
  PrimaryGroup g;
  g.AddPeer("b", Opt(Mode::kSync), {}, 0);
  g.AddPeer("c", Opt(Mode::kAsync), {}, 0);
  HandshakeDecision d;
  d.kind = Kind::kStreamFrom;
  d.start_lsn = 1;
  g.OnConnected("b", 0);
  g.OnDecision("b", d, 0, 0);
  for (uint64_t l = 1; l <= 10; ++l) g.OnLocalAppend(l, 100, 1000 + l, 10);
  g.OnLocalDurable(10);
  EXPECT_EQ(g.write_released(), 0u);
  EXPECT_EQ(g.flush_released(), 0u);
  auto plan = g.NextSend("b", 20);
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->from_lsn, 1u);
  g.OnSent("b", 1, 10, 1000, 20);
  EXPECT_TRUE(g.OnPosition("b", {6, 4, 0}, 30));
  EXPECT_EQ(g.write_released(), 6u);
  EXPECT_EQ(g.flush_released(), 4u);
  // A position beyond what was sent is not believed; positions never go back.
  g.OnPosition("b", {99, 99, 0}, 31);
  EXPECT_EQ(g.write_released(), 10u);
  g.OnPosition("b", {1, 1, 0}, 32);
  EXPECT_EQ(g.flush_released(), 10u);
  // The async peer never held anything, and its lag is exact.
  auto st = g.Status(40);
  ASSERT_EQ(st.size(), 2u);
  EXPECT_EQ(st[1].lag.lsns, 10u);
  EXPECT_EQ(st[1].lag.bytes, 1000u);
  EXPECT_EQ(st[1].lag.oldest_timestamp_ns, 1001u);
  EXPECT_EQ(st[0].lag.lsns, 0u);
}

TEST(PrimaryGroup, AsyncOnlyReleasesOnLocalLog) {
  PrimaryGroup g;
  g.AddPeer("c", Opt(Mode::kAsync), {}, 0);
  g.OnLocalAppend(1, 10, 1, 0);
  g.OnLocalDurable(1);
  EXPECT_EQ(g.write_released(), 1u);
  EXPECT_EQ(g.flush_released(), 1u);
}

TEST(PrimaryGroup, DegradeAndRejoin) {
  PrimaryGroup g;
  SenderOptions o = Opt(Mode::kSync);
  o.sync_degrade_after = 1000;
  g.AddPeer("b", o, {}, 0);
  g.OnLocalAppend(1, 10, 1, 100);
  g.OnLocalDurable(1);
  EXPECT_EQ(g.write_released(), 0u);
  EXPECT_FALSE(g.OnTick(500));
  EXPECT_TRUE(g.OnTick(1200));
  EXPECT_EQ(g.write_released(), 1u);
  EXPECT_TRUE(g.Status(1200)[0].degraded);
  HandshakeDecision d;
  d.kind = Kind::kStreamFrom;
  d.start_lsn = 1;
  g.OnDecision("b", d, 0, 1300);
  g.OnSent("b", 1, 1, 10, 1300);
  EXPECT_TRUE(g.OnPosition("b", {1, 1, 1}, 1400));
  EXPECT_FALSE(g.Status(1400)[0].degraded);
  EXPECT_TRUE(g.Status(1400)[0].in_sync_set);
}

TEST(PrimaryGroup, CoalescesWhileDataInFlight) {
  PrimaryGroup g;
  SenderOptions o = Opt(Mode::kAsync);
  o.max_batch_delay = 1000;
  g.AddPeer("b", o, {}, 0);
  HandshakeDecision d;
  d.kind = Kind::kStreamFrom;
  d.start_lsn = 1;
  g.OnDecision("b", d, 0, 0);
  g.OnLocalAppend(1, 10, 1, 0);
  ASSERT_TRUE(g.NextSend("b", 0));  // nothing in flight: at once
  g.OnSent("b", 1, 1, 10, 0);
  g.OnLocalAppend(2, 10, 2, 10);
  EXPECT_FALSE(g.NextSend("b", 20));  // coalescing
  ASSERT_TRUE(g.NextDeadline());
  EXPECT_EQ(*g.NextDeadline(), 1010);
  EXPECT_TRUE(g.NextSend("b", 1010));
}

TEST(ReplicaReceiver, AcceptsInOrderRefusesGapsAndOldEpochs) {
  ReplicaView v = View();
  ReplicaReceiver rx(v);
  auto c = rx.OnBatch(2, 151, 10);
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kAppend);
  EXPECT_EQ(c.skip_records, 0u);
  // The next batch may arrive before the first is appended.
  c = rx.OnBatch(2, 161, 5);
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kAppend);
  c = rx.OnBatch(2, 160, 10);  // overlaps: skip what is held
  EXPECT_EQ(c.skip_records, 6u);
  c = rx.OnBatch(2, 200, 1);
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kReject);
  EXPECT_THAT(c.reason, HasSubstr("gap"));
  c = rx.OnBatch(1, 170, 1);
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kReject);
  c = rx.OnBatch(3, 170, 2);
  EXPECT_TRUE(c.begins_epoch);
  EXPECT_EQ(rx.view().history.back(), (EpochStart{3, 170}));
  // Acks report only what was appended / synced.
  auto ack = rx.TakeAck();
  ASSERT_TRUE(ack);
  EXPECT_EQ(ack->received, 150u);
  EXPECT_FALSE(rx.TakeAck());
  rx.OnAppended(160);
  EXPECT_EQ(rx.TakeAck()->received, 160u);
}

TEST(ReplicaReceiver, CopyMakesConsistentOnlyOnceApplied) {
  ReplicaView v;
  v.group_known = true;
  v.volume_sizes = {1 << 20};
  ReplicaReceiver rx(v);
  rx.OnCopyBegin(2, 101);
  EXPECT_FALSE(rx.consistent());
  EXPECT_EQ(rx.OnBatch(2, 101, 3).verdict, ReplicaReceiver::BatchCheck::Verdict::kAppend);
  rx.OnCopyDone(103);
  rx.OnApplied(102);
  EXPECT_FALSE(rx.consistent());
  rx.OnApplied(103);
  EXPECT_TRUE(rx.consistent());
}

}  // namespace
}  // namespace tvilling::core
