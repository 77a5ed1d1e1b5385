// replication_test.cc: unit tests of agent/core (histories, handshake rules, release points,
// degrade/rejoin, flow control, lag, and the replica's batch verdicts).
#include "agent/core/replication.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/unit/core/units.h"

namespace tvilling::core {
namespace {

using ::testing::HasSubstr;

TEST(EpochAt, EdgeCases) {
  EXPECT_EQ(EpochAt({}, 5), 0u);
  History h{{1, 1}, {3, 10}, {4, 10}, {7, 20}};
  EXPECT_EQ(EpochAt(h, 0), 0u);
  EXPECT_EQ(EpochAt(h, 1), 1u);
  EXPECT_EQ(EpochAt(h, 9), 1u);
  EXPECT_EQ(EpochAt(h, 10), 4u);  // an empty epoch (3) is overtaken at the same LSN
  EXPECT_EQ(EpochAt(h, 19), 4u);
  EXPECT_EQ(EpochAt(h, 20), 7u);
  EXPECT_EQ(EpochAt(h, 1'000'000), 7u);
  EXPECT_EQ(EpochAt({{2, 5}}, 4), 0u);  // a copied log whose history starts late
}

TEST(CommonPrefix, EdgeCases) {
  History a{{1, 1}, {2, 11}};
  EXPECT_EQ(CommonPrefix(a, 20, a, 15), 15u);
  EXPECT_EQ(CommonPrefix(a, 20, a, 0), 0u);
  EXPECT_EQ(CommonPrefix({}, 0, {}, 0), 0u);
  // Split at an epoch change: b went on in epoch 1 past 10, a began epoch 2 at 11.
  History b{{1, 1}};
  EXPECT_EQ(CommonPrefix(a, 20, b, 15), 10u);
  EXPECT_EQ(CommonPrefix(b, 15, a, 20), 10u);
  EXPECT_EQ(CommonPrefix(a, 20, b, 10), 10u);
  // Different first epoch: nothing in common.
  EXPECT_EQ(CommonPrefix({{2, 1}}, 5, {{1, 1}}, 5), 0u);
  // Same epochs starting at different LSNs.
  EXPECT_EQ(CommonPrefix({{1, 1}, {3, 8}}, 20, {{1, 1}, {3, 9}}, 20), 7u);
  // Equal EpochAt although the histories differ in an empty epoch.
  EXPECT_EQ(CommonPrefix({{1, 1}, {2, 5}, {3, 5}}, 9, {{1, 1}, {3, 5}}, 9), 9u);
}

TEST(HistoryUpTo, KeepsEntriesThatStartAtOrBeforeTheLsn) {
  History h{{1, 1}, {3, 101}, {4, 150}};
  EXPECT_EQ(HistoryUpTo(h, 0), History{});
  EXPECT_EQ(HistoryUpTo(h, 1), (History{{1, 1}}));
  EXPECT_EQ(HistoryUpTo(h, 100), (History{{1, 1}}));
  EXPECT_EQ(HistoryUpTo(h, 101), (History{{1, 1}, {3, 101}}));
  EXPECT_EQ(HistoryUpTo(h, 1000), h);
  EXPECT_EQ(HistoryUpTo({}, 5), History{});
}

PrimaryHello Hello() {
  PrimaryHello h;
  h.group = "g";
  h.site = "sto-1";
  h.epoch = 3;
  h.history = {{1, 1}, {3, 101}};
  h.volume_sizes = {1 << 20, 2 << 20};
  h.first_lsn = 50;
  h.last_lsn = 200;
  return h;
}

ReplicaView View() {
  ReplicaView v;
  v.group_known = true;
  v.newest_epoch = 3;
  v.history = {{1, 1}, {3, 101}};
  v.last_lsn = 150;
  v.volume_sizes = {1 << 20, 2 << 20};
  v.consistent = true;
  return v;
}

TEST(DecideHandshake, StreamsFromNextLsn) {
  HandshakeDecision d = DecideHandshake(Hello(), View());
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kStreamFrom);
  EXPECT_EQ(d.start_lsn, 151u);
  EXPECT_EQ(d.code, RefuseCode::kNone);
  EXPECT_THAT(d.reason, HasSubstr("151"));
}

TEST(DecideHandshake, RefusesUnknownGroup) {
  ReplicaView v = View();
  v.group_known = false;
  v.is_primary = true;  // the first rule wins
  HandshakeDecision d = DecideHandshake(Hello(), v);
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kRefuse);
  EXPECT_EQ(d.code, RefuseCode::kUnknownGroup);
  EXPECT_THAT(d.reason, HasSubstr("unknown group"));
  EXPECT_THAT(d.reason, HasSubstr("sto-1"));
}

TEST(DecideHandshake, RefusesWhenPrimaryItself) {
  ReplicaView v = View();
  v.is_primary = true;
  v.newest_epoch = 9;  // would also be stale; not-a-replica comes first
  HandshakeDecision d = DecideHandshake(Hello(), v);
  EXPECT_EQ(d.code, RefuseCode::kNotReplica);
  EXPECT_THAT(d.reason, HasSubstr("not a replica"));
}

TEST(DecideHandshake, RefusesStaleEpoch) {
  ReplicaView v = View();
  v.newest_epoch = 4;
  v.volume_sizes = {1};  // would also mismatch; the epoch comes first
  HandshakeDecision d = DecideHandshake(Hello(), v);
  EXPECT_EQ(d.code, RefuseCode::kStaleEpoch);
  EXPECT_THAT(d.reason, HasSubstr("epoch 3"));
  EXPECT_THAT(d.reason, HasSubstr("epoch 4"));
  // The same epoch is not stale.
  v = View();
  EXPECT_EQ(DecideHandshake(Hello(), v).kind, HandshakeDecision::Kind::kStreamFrom);
}

TEST(DecideHandshake, RefusesVolumeMismatch) {
  ReplicaView v = View();
  v.volume_sizes = {1 << 20};
  HandshakeDecision d = DecideHandshake(Hello(), v);
  EXPECT_EQ(d.code, RefuseCode::kVolumeMismatch);
  EXPECT_THAT(d.reason, HasSubstr("[1048576, 2097152]"));
  EXPECT_THAT(d.reason, HasSubstr("[1048576]"));
  v.volume_sizes = {1 << 20, 3 << 20};
  EXPECT_EQ(DecideHandshake(Hello(), v).code, RefuseCode::kVolumeMismatch);
}

TEST(DecideHandshake, RefusesDivergedWithLsnAndEpochs) {
  // The replica went on in epoch 1 past 100 (an old primary's unreplicated writes).
  ReplicaView v = View();
  v.history = {{1, 1}};
  v.last_lsn = 120;
  HandshakeDecision d = DecideHandshake(Hello(), v);
  EXPECT_EQ(d.code, RefuseCode::kDiverged);
  EXPECT_THAT(d.reason, HasSubstr("LSN 101"));
  EXPECT_THAT(d.reason, HasSubstr("holds epoch 1"));
  EXPECT_THAT(d.reason, HasSubstr("has epoch 3"));
  // Holding nothing beyond the split is fine.
  v.last_lsn = 100;
  EXPECT_EQ(DecideHandshake(Hello(), v).kind, HandshakeDecision::Kind::kStreamFrom);
}

TEST(DecideHandshake, RefusesReplicaAheadOfPrimaryInSameEpoch) {
  ReplicaView v = View();
  v.last_lsn = 210;  // the primary lost its tail 201..210
  HandshakeDecision d = DecideHandshake(Hello(), v);
  EXPECT_EQ(d.code, RefuseCode::kDiverged);
  EXPECT_THAT(d.reason, HasSubstr("LSN 201"));
  EXPECT_THAT(d.reason, HasSubstr("no record"));
}

TEST(DecideHandshake, ResumesInterruptedCopy) {
  ReplicaView v = View();
  v.consistent = false;
  v.copy_in_progress = true;
  v.copy_epoch = 3;  // begun by this primary's epoch
  v.copy_volume = 1;
  v.copy_offset = 65536;
  HandshakeDecision d = DecideHandshake(Hello(), v);
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kFullCopy);
  EXPECT_TRUE(d.copy_resume);
  EXPECT_EQ(d.start_lsn, 151u);
  EXPECT_EQ(d.copy_volume, 1u);
  EXPECT_EQ(d.copy_offset, 65536u);
  EXPECT_THAT(d.reason, HasSubstr("resuming"));
}

TEST(DecideHandshake, RestartsCopyWhenLogTruncated) {
  ReplicaView v = View();
  v.consistent = false;
  v.copy_in_progress = true;
  v.copy_epoch = 3;
  v.last_lsn = 40;  // the primary holds only from 50
  HandshakeDecision d = DecideHandshake(Hello(), v);
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kFullCopy);
  EXPECT_FALSE(d.copy_resume);
  EXPECT_THAT(d.reason, HasSubstr("cannot resume"));
  // 49 + 1 == first_lsn: still resumable.
  v.last_lsn = 49;
  EXPECT_TRUE(DecideHandshake(Hello(), v).copy_resume);
}

TEST(DecideHandshake, FullCopyWhenNeverConsistent) {
  ReplicaView v = View();
  v.consistent = false;
  v.history.clear();
  v.last_lsn = 0;
  HandshakeDecision d = DecideHandshake(Hello(), v);
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kFullCopy);
  EXPECT_FALSE(d.copy_resume);
  EXPECT_THAT(d.reason, HasSubstr("never completed a copy"));
}

TEST(DecideHandshake, FullCopyWhenBehindTruncation) {
  ReplicaView v = View();
  v.history = {{1, 1}};
  v.last_lsn = 48;
  HandshakeDecision d = DecideHandshake(Hello(), v);
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kFullCopy);
  EXPECT_FALSE(d.copy_resume);
  EXPECT_THAT(d.reason, HasSubstr("ends at LSN 48"));
  EXPECT_THAT(d.reason, HasSubstr("from LSN 50"));
  v.last_lsn = 49;
  EXPECT_EQ(DecideHandshake(Hello(), v).start_lsn, 50u);
}

// Regression (tests/sim --primary-restarts): a completed copy whose end LSN (consistent_at) the
// log has not reached holds those records in its volumes only. They may be records the primary
// lost in a crash (the copy read its volumes, which run ahead of its log's fsync): the replica
// counts them as held and is copied again unless the primary's history has the same epoch there.
TEST(DecideHandshake, CopyEndBeyondTheLogCountsAsHeldRecords) {
  ReplicaView v = View();  // log to 150, copy completed at 170 in epoch 3 (not yet reached)
  v.consistent_at_lsn = 170;
  v.consistent_at_epoch = 3;
  // The same lineage through 170: stream.
  EXPECT_EQ(DecideHandshake(Hello(), v).kind, HandshakeDecision::Kind::kStreamFrom);
  // The primary crashed keeping 160 and began epoch 4: records 161..170 of the copy are lost.
  PrimaryHello h = Hello();
  h.epoch = 4;
  h.history = {{1, 1}, {3, 101}, {4, 161}};
  HandshakeDecision d = DecideHandshake(h, v);
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kFullCopy);
  EXPECT_FALSE(d.copy_resume);
  EXPECT_THAT(d.reason, HasSubstr("up to LSN 170"));
  EXPECT_THAT(d.reason, HasSubstr("epoch 4 there"));
  // A primary whose log ends before 170 (same epoch so far) cannot hold them either.
  h = Hello();
  h.last_lsn = 165;
  d = DecideHandshake(h, v);
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kFullCopy);
  EXPECT_THAT(d.reason, HasSubstr("only up to LSN 165"));
  // A clean restart (nothing lost, new epoch after 200) keeps them: stream.
  h = Hello();
  h.epoch = 4;
  h.history = {{1, 1}, {3, 101}, {4, 201}};
  EXPECT_EQ(DecideHandshake(h, v).kind, HandshakeDecision::Kind::kStreamFrom);
  // Reached (the log holds 170): the ordinary divergence rules decide.
  v.last_lsn = 170;
  h.history = {{1, 1}, {3, 101}, {4, 161}};
  EXPECT_EQ(DecideHandshake(h, v).code, RefuseCode::kDiverged);
}

// Regression: chunks of an interrupted copy show the primary's volumes at LSNs the replica's log
// may not hold, so the copy resumes only with a primary of the epoch that began it.
TEST(DecideHandshake, InterruptedCopyResumesOnlyInItsEpoch) {
  ReplicaView v = View();
  v.consistent = false;
  v.copy_in_progress = true;
  v.copy_epoch = 2;
  v.copy_volume = 1;
  v.copy_offset = 65536;
  HandshakeDecision d = DecideHandshake(Hello(), v);  // epoch 3
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kFullCopy);
  EXPECT_FALSE(d.copy_resume);
  EXPECT_THAT(d.reason, HasSubstr("begun in epoch 2"));
  v.copy_epoch = 3;
  EXPECT_TRUE(DecideHandshake(Hello(), v).copy_resume);
}

// ---------------------------------------------------------------------------------------------

SenderOptions Opts(Mode mode, Nanos degrade_after = 0) {
  SenderOptions o;
  o.mode = mode;
  o.min_window_bytes = 10'000;
  o.max_window_bytes = 1'000'000;
  o.max_batch_bytes = 4'000;
  o.max_batch_records = 100;
  o.max_batch_delay = 1 * kMs;
  o.sync_degrade_after = degrade_after;
  return o;
}

void Append(PrimaryGroup& g, uint64_t from, uint64_t to, uint64_t bytes, Nanos now) {
  for (uint64_t l = from; l <= to; ++l) g.OnLocalAppend(l, bytes, 1000 + l, now);
}

void Stream(PrimaryGroup& g, const std::string& peer, uint64_t from, Nanos now) {
  g.OnConnected(peer, now);
  HandshakeDecision d;
  d.kind = HandshakeDecision::Kind::kStreamFrom;
  d.start_lsn = from;
  EXPECT_EQ(g.OnDecision(peer, d, 0, now), from);
}

PeerStatus StatusOf(const PrimaryGroup& g, const std::string& peer, Nanos now = 0) {
  for (PeerStatus& s : g.Status(now))
    if (s.peer == peer) return s;
  ADD_FAILURE() << "no peer " << peer;
  return {};
}

TEST(PrimaryGroup, NoPeersReleasesLocalPositions) {
  PrimaryGroup g;
  Append(g, 1, 10, 100, 0);
  g.OnLocalDurable(7);
  EXPECT_EQ(g.write_released(), 10u);
  EXPECT_EQ(g.flush_released(), 7u);
  EXPECT_EQ(g.MinPeerDurable(), 10u);
}

TEST(PrimaryGroup, AsyncPeersNeverHoldWrites) {
  PrimaryGroup g;
  g.AddPeer("a", Opts(Mode::kAsync), {}, 0);
  Append(g, 1, 10, 100, 0);
  g.OnLocalDurable(10);
  EXPECT_EQ(g.write_released(), 10u);
  EXPECT_EQ(g.flush_released(), 10u);
  EXPECT_EQ(g.MinPeerDurable(), 0u);
}

TEST(PrimaryGroup, SyncReleasePoints) {
  PrimaryGroup g;
  g.AddPeer("s1", Opts(Mode::kSync), {}, 0);
  g.AddPeer("s2", Opts(Mode::kSync), {}, 0);
  g.AddPeer("a", Opts(Mode::kAsync), {}, 0);
  Append(g, 1, 10, 100, 0);
  g.OnLocalDurable(6);
  EXPECT_EQ(g.write_released(), 0u);
  Stream(g, "s1", 1, 0);
  Stream(g, "s2", 1, 0);
  Stream(g, "a", 1, 0);
  EXPECT_TRUE(g.OnPosition("s1", {8, 5, 0}, 0));
  EXPECT_TRUE(g.OnPosition("s2", {9, 7, 0}, 0));
  EXPECT_TRUE(g.OnPosition("a", {10, 10, 10}, 0));
  EXPECT_EQ(g.write_released(), 8u);  // min received of sync peers
  EXPECT_EQ(g.flush_released(), 5u);  // min(local durable 6, sync durables 5, 7)
  g.OnPosition("s1", {10, 10, 0}, 0);
  EXPECT_EQ(g.write_released(), 9u);
  EXPECT_EQ(g.flush_released(), 6u);  // the local log is the limit now
  // Never backwards.
  EXPECT_FALSE(g.OnPosition("s2", {3, 2, 0}, 0));
  EXPECT_EQ(StatusOf(g, "s2").positions, (Positions{9, 7, 0}));
  EXPECT_EQ(g.write_released(), 9u);
  EXPECT_EQ(g.MinPeerDurable(), 7u);
}

TEST(PrimaryGroup, SyncPeerWithoutDegradeHoldsWritesForever) {
  PrimaryGroup g;
  g.AddPeer("s", Opts(Mode::kSync, 0), {}, 0);
  Append(g, 1, 5, 100, 0);
  EXPECT_FALSE(g.OnTick(3600'000 * kMs));
  EXPECT_EQ(g.write_released(), 0u);
  EXPECT_TRUE(StatusOf(g, "s").in_sync_set);
}

TEST(PrimaryGroup, DegradesDisconnectedSyncPeerAndRejoins) {
  PrimaryGroup g;
  g.AddPeer("s", Opts(Mode::kSync, 100 * kMs), {}, 0);
  Append(g, 1, 5, 100, 0);
  g.OnLocalDurable(5);
  EXPECT_EQ(g.NextDeadline(), 100 * kMs);
  EXPECT_FALSE(g.OnTick(99 * kMs));
  EXPECT_EQ(g.write_released(), 0u);
  EXPECT_TRUE(g.OnTick(100 * kMs));
  PeerStatus st = StatusOf(g, "s");
  EXPECT_TRUE(st.degraded);
  EXPECT_FALSE(st.in_sync_set);
  EXPECT_THAT(st.last_error, HasSubstr("sync set"));
  EXPECT_EQ(g.write_released(), 5u);
  EXPECT_EQ(g.flush_released(), 5u);
  // Catching up only partly does not rejoin.
  Stream(g, "s", 1, 200 * kMs);
  EXPECT_TRUE(g.OnPosition("s", {4, 4, 0}, 200 * kMs));
  EXPECT_TRUE(StatusOf(g, "s").degraded);
  Append(g, 6, 6, 100, 210 * kMs);
  g.OnPosition("s", {5, 5, 0}, 220 * kMs);
  EXPECT_TRUE(StatusOf(g, "s").degraded);  // 6 is the local last now
  EXPECT_TRUE(g.OnPosition("s", {6, 6, 0}, 230 * kMs));
  EXPECT_FALSE(StatusOf(g, "s").degraded);
  EXPECT_TRUE(StatusOf(g, "s").in_sync_set);
  Append(g, 7, 7, 100, 240 * kMs);
  EXPECT_EQ(g.write_released(), 6u);
}

// docs/coordinator.md, "Sync writes and the election": with the sync set in etcd, a degrade takes
// effect on the release points only once a set without the member is published.
TEST(PrimaryGroup, GatedDegradeWaitsForThePublishedSet) {
  PrimaryGroup g;
  g.AddPeer("s", Opts(Mode::kSync, 100 * kMs), {}, 0);
  g.AddPeer("a", Opts(Mode::kAsync), {}, 0);
  Append(g, 1, 3, 100, 0);  // the log before this epoch
  g.OnLocalDurable(3);
  g.GateOnPublishedSyncSet();
  // Nothing of this epoch completes before its first set is in etcd.
  Append(g, 4, 5, 100, 0);
  g.OnLocalDurable(5);
  Stream(g, "s", 6, 0);
  g.OnPosition("s", {5, 5, 0}, 0);
  EXPECT_EQ(g.write_released(), 3u);
  std::optional<SyncSet> want = g.SyncSetToPublish();
  ASSERT_TRUE(want);
  EXPECT_EQ(*want, (SyncSet{{"s"}, 3}));
  g.OnSyncSetSent(*want);
  EXPECT_FALSE(g.SyncSetToPublish()) << "one at a time";
  EXPECT_TRUE(g.OnSyncSetPublished(*want, true));
  EXPECT_EQ(g.write_released(), 5u);
  EXPECT_EQ(g.flush_released(), 5u);
  EXPECT_FALSE(g.SyncSetToPublish()) << "etcd holds the wanted set";

  // s goes away and degrades: writes keep waiting until the smaller set is published.
  g.OnDisconnected("s", "gone", 10 * kMs);
  Append(g, 6, 8, 100, 20 * kMs);
  g.OnLocalDurable(8);
  EXPECT_TRUE(g.OnTick(110 * kMs));
  EXPECT_TRUE(StatusOf(g, "s").degraded);
  EXPECT_TRUE(StatusOf(g, "s").in_sync_set) << "still in the published set";
  EXPECT_EQ(g.write_released(), 5u);
  want = g.SyncSetToPublish();
  ASSERT_TRUE(want);
  EXPECT_EQ(*want, (SyncSet{{}, 8}));  // no member: the floor is the last LSN
  g.OnSyncSetSent(*want);
  Append(g, 9, 9, 100, 120 * kMs);
  g.OnLocalDurable(9);
  EXPECT_EQ(g.write_released(), 5u);
  // A failed Txn publishes nothing: still waiting, and the next attempt carries a new floor.
  EXPECT_TRUE(g.OnSyncSetPublished(*want, false));
  EXPECT_EQ(g.write_released(), 5u);
  want = g.SyncSetToPublish();
  ASSERT_TRUE(want);
  EXPECT_EQ(*want, (SyncSet{{}, 9}));
  g.OnSyncSetSent(*want);
  Append(g, 10, 10, 100, 130 * kMs);
  g.OnLocalDurable(10);
  EXPECT_TRUE(g.OnSyncSetPublished(*want, true));
  EXPECT_FALSE(StatusOf(g, "s").in_sync_set);
  EXPECT_EQ(g.write_released(), 10u);
  EXPECT_EQ(g.flush_released(), 10u);
  EXPECT_FALSE(g.SyncSetToPublish()) << "no member still: nothing to publish for new writes";

  // s catches up and rejoins: it counts at once, and is published after.
  Stream(g, "s", 6, 200 * kMs);
  EXPECT_TRUE(g.OnPosition("s", {10, 10, 0}, 200 * kMs));
  EXPECT_TRUE(StatusOf(g, "s").in_sync_set);
  Append(g, 11, 11, 100, 210 * kMs);
  g.OnLocalDurable(11);
  EXPECT_EQ(g.write_released(), 10u);
  want = g.SyncSetToPublish();
  ASSERT_TRUE(want);
  EXPECT_EQ(*want, (SyncSet{{"s"}, 9}));
  // Found by tests/sim/failover_sim.cc (seed 5787 --mixed): s has 11, but etcd still holds the
  // set with no member (floor 10), under which any site holding 10 may be elected. A write
  // completed with s would be lost there: nothing passes the floor until {s} is in etcd.
  g.OnPosition("s", {11, 11, 0}, 220 * kMs);
  EXPECT_EQ(g.write_released(), 10u);
  EXPECT_EQ(g.flush_released(), 10u);
  g.OnSyncSetSent(*want);
  EXPECT_EQ(g.write_released(), 10u);
  EXPECT_TRUE(g.OnSyncSetPublished(*want, false));
  EXPECT_EQ(g.write_released(), 10u) << "a failed Txn: maybe in etcd, maybe not";
  want = g.SyncSetToPublish();
  ASSERT_TRUE(want);
  g.OnSyncSetSent(*want);
  EXPECT_TRUE(g.OnSyncSetPublished(*want, true));
  EXPECT_EQ(g.write_released(), 11u);
  EXPECT_EQ(g.flush_released(), 11u);
}

// The set the group wants, published by one Txn that succeeds.
SyncSet PublishWanted(PrimaryGroup& g) {
  std::optional<SyncSet> want = g.SyncSetToPublish();
  EXPECT_TRUE(want);
  if (!want) return {};
  g.OnSyncSetSent(*want);
  EXPECT_TRUE(g.OnSyncSetPublished(*want, true));
  return *want;
}

// A gated group whose sync peer s never came: {s} floor 3 published, s degraded, {} floor 3
// published.
void DegradeToTheEmptySet(PrimaryGroup& g) {
  g.AddPeer("s", Opts(Mode::kSync, 100 * kMs), {}, 0);
  Append(g, 1, 3, 100, 0);
  g.OnLocalDurable(3);
  g.GateOnPublishedSyncSet();
  EXPECT_EQ(PublishWanted(g), (SyncSet{{"s"}, 3}));
  EXPECT_TRUE(g.OnTick(100 * kMs));
  EXPECT_EQ(PublishWanted(g), (SyncSet{{}, 3}));
}

// A member that rejoins under a set with none and leaves again before a set with it is sent: the
// writes held for that set complete without it again (degraded), they are not held forever.
TEST(PrimaryGroup, ARejoinThatLeavesBeforeItsSetIsSentHoldsNothingForever) {
  PrimaryGroup g;
  DegradeToTheEmptySet(g);
  Append(g, 4, 5, 100, 110 * kMs);
  g.OnLocalDurable(5);
  EXPECT_EQ(g.write_released(), 5u) << "degraded: without s";
  // s connects and catches up: it rejoins, and nothing passes 5 until {s} is in etcd.
  Stream(g, "s", 1, 200 * kMs);
  g.OnPosition("s", {5, 5, 0}, 200 * kMs);
  EXPECT_TRUE(StatusOf(g, "s").in_sync_set);
  Append(g, 6, 6, 100, 210 * kMs);
  g.OnLocalDurable(6);
  g.OnPosition("s", {6, 6, 0}, 220 * kMs);
  EXPECT_EQ(g.write_released(), 5u);
  EXPECT_EQ(g.flush_released(), 5u);
  // s goes away before the set is sent and degrades again: writes complete without it.
  g.OnDisconnected("s", "gone", 230 * kMs);
  Append(g, 7, 7, 100, 240 * kMs);
  g.OnLocalDurable(7);
  EXPECT_TRUE(g.OnTick(330 * kMs));
  EXPECT_FALSE(StatusOf(g, "s").in_sync_set);
  EXPECT_EQ(g.write_released(), 7u);
  EXPECT_EQ(g.flush_released(), 7u);
}

// The set with a rejoined member fails without an answer (etcd may hold it), and the member
// leaves again: the set etcd may hold makes writes wait for it, so the set without it is sent
// again to replace that one, although it equals the last one published; then writes complete
// without the member.
TEST(PrimaryGroup, AnUncertainSetWithAMemberWhoLeftIsReplaced) {
  PrimaryGroup g;
  DegradeToTheEmptySet(g);
  Stream(g, "s", 1, 200 * kMs);
  g.OnPosition("s", {3, 3, 0}, 200 * kMs);  // rejoins
  std::optional<SyncSet> want = g.SyncSetToPublish();
  ASSERT_TRUE(want);
  EXPECT_EQ(*want, (SyncSet{{"s"}, 3}));
  g.OnSyncSetSent(*want);
  EXPECT_TRUE(g.OnSyncSetPublished(*want, false));  // no answer: etcd may hold {s}
  g.OnDisconnected("s", "gone", 210 * kMs);
  Append(g, 4, 4, 100, 220 * kMs);
  g.OnLocalDurable(4);
  EXPECT_TRUE(g.OnTick(310 * kMs));  // degraded again
  EXPECT_EQ(g.write_released(), 3u) << "{s} may be in etcd: writes wait for s";
  want = g.SyncSetToPublish();
  ASSERT_TRUE(want) << "the set without s must replace the one that may be in etcd";
  EXPECT_TRUE(want->members.empty());
  g.OnSyncSetSent(*want);
  EXPECT_TRUE(g.OnSyncSetPublished(*want, true));
  EXPECT_EQ(g.write_released(), 4u);
  EXPECT_EQ(g.flush_released(), 4u);
}

TEST(PrimaryGroup, UngatedDegradeActsAtOnceAndPublishesNothing) {
  PrimaryGroup g;
  g.AddPeer("s", Opts(Mode::kSync, 100 * kMs), {}, 0);
  Append(g, 1, 5, 100, 0);
  g.OnLocalDurable(5);
  EXPECT_FALSE(g.SyncSetToPublish());
  EXPECT_TRUE(g.OnTick(100 * kMs));
  EXPECT_EQ(g.write_released(), 5u);
  EXPECT_FALSE(g.SyncSetToPublish());
}

TEST(PrimaryGroup, DegradesConnectedSyncPeerThatDoesNotAck) {
  PrimaryGroup g;
  g.AddPeer("s", Opts(Mode::kSync, 100 * kMs), {}, 0);
  Stream(g, "s", 1, 0);
  EXPECT_EQ(g.NextDeadline(), std::nullopt);  // connected and nothing unacknowledged
  Append(g, 1, 1, 100, 50 * kMs);
  EXPECT_EQ(g.NextDeadline(), 150 * kMs);
  EXPECT_FALSE(g.OnTick(149 * kMs));
  g.OnPosition("s", {1, 1, 0}, 120 * kMs);
  EXPECT_EQ(g.NextDeadline(), std::nullopt);
  Append(g, 2, 2, 100, 130 * kMs);
  EXPECT_FALSE(g.OnTick(229 * kMs));
  EXPECT_TRUE(g.OnTick(230 * kMs));
  EXPECT_TRUE(StatusOf(g, "s").degraded);
  EXPECT_EQ(g.write_released(), 2u);
}

TEST(PrimaryGroup, DegradesWhenAWriteWaitedTooLongBeforeTheLinkDropped) {
  PrimaryGroup g;
  g.AddPeer("s", Opts(Mode::kSync, 100 * kMs), {}, 0);
  Stream(g, "s", 1, 0);
  Append(g, 1, 1, 100, 10 * kMs);
  g.OnDisconnected("s", "cut", 50 * kMs);
  // The write has waited since 10 ms: 110 ms, not 50 + 100.
  EXPECT_EQ(g.NextDeadline(), 110 * kMs);
  EXPECT_FALSE(g.OnTick(109 * kMs));
  EXPECT_TRUE(g.OnTick(110 * kMs));
  EXPECT_EQ(g.write_released(), 1u);
  EXPECT_THAT(StatusOf(g, "s").last_error, HasSubstr("degrade limit"));
}

TEST(PrimaryGroup, SendsAtOnceWhenIdleThenCoalesces) {
  PrimaryGroup g;
  g.AddPeer("p", Opts(Mode::kAsync), {}, 0);
  EXPECT_EQ(g.NextSend("p", 0), std::nullopt);  // not connected
  Stream(g, "p", 1, 0);
  EXPECT_EQ(g.NextSend("p", 0), std::nullopt);  // nothing to send
  Append(g, 1, 1, 100, 0);
  std::optional<SendPlan> plan = g.NextSend("p", 0);
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->from_lsn, 1u);
  EXPECT_EQ(plan->to_lsn, 1u);
  EXPECT_EQ(plan->max_bytes, 4'000u);
  EXPECT_EQ(plan->max_records, 100u);
  g.OnSent("p", 1, 1, 100, 0);
  EXPECT_EQ(StatusOf(g, "p").inflight_bytes, 100u);
  // Something in flight: coalesce until 1 ms has passed since LSN 2 was appended...
  Append(g, 2, 3, 100, 10 * kMs);
  EXPECT_EQ(g.NextSend("p", 10 * kMs), std::nullopt);
  EXPECT_EQ(g.NextDeadline(), 11 * kMs);
  plan = g.NextSend("p", 11 * kMs);
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->from_lsn, 2u);
  EXPECT_EQ(plan->to_lsn, 3u);
  g.OnSent("p", 2, 3, 200, 11 * kMs);
  // ...or until max_batch_bytes are waiting.
  Append(g, 4, 42, 100, 12 * kMs);
  EXPECT_EQ(g.NextSend("p", 12 * kMs), std::nullopt);  // 3900 bytes
  Append(g, 43, 43, 100, 12 * kMs);
  plan = g.NextSend("p", 12 * kMs);
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->from_lsn, 4u);
  EXPECT_EQ(plan->to_lsn, 43u);
  // Acked: nothing in flight, sends at once.
  g.OnSent("p", 4, 43, 4000, 12 * kMs);
  g.OnPosition("p", {43, 0, 0}, 13 * kMs);
  EXPECT_EQ(StatusOf(g, "p").inflight_bytes, 0u);
  Append(g, 44, 44, 100, 13 * kMs);
  EXPECT_TRUE(g.NextSend("p", 13 * kMs));
}

TEST(PrimaryGroup, ASyncPeerIsNotHeldToCoalesceUnlessDegraded) {
  PrimaryGroup g;
  g.AddPeer("p", Opts(Mode::kSync, /*degrade_after=*/50 * kMs), {}, 0);
  Stream(g, "p", 1, 0);
  Append(g, 1, 1, 100, 0);
  ASSERT_TRUE(g.NextSend("p", 0));
  g.OnSent("p", 1, 1, 100, 0);
  // In flight, and a write waits for this peer: it goes at once, no coalescing timer.
  Append(g, 2, 2, 100, 1 * kMs);
  std::optional<SendPlan> plan = g.NextSend("p", 1 * kMs);
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->from_lsn, 2u);
  g.OnSent("p", 2, 2, 100, 1 * kMs);
  // Degraded (it held writes back for 50 ms), it is batched like an async peer.
  g.OnTick(60 * kMs);
  ASSERT_TRUE(StatusOf(g, "p", 60 * kMs).degraded);
  Append(g, 3, 3, 100, 60 * kMs);
  EXPECT_EQ(g.NextSend("p", 60 * kMs), std::nullopt);
  EXPECT_TRUE(g.NextSend("p", 61 * kMs));
}

TEST(PrimaryGroup, CoalescesOnRecordCount) {
  PrimaryGroup g;
  SenderOptions o = Opts(Mode::kAsync);
  o.max_batch_records = 3;
  g.AddPeer("p", o, {}, 0);
  Stream(g, "p", 1, 0);
  Append(g, 1, 1, 10, 0);
  g.OnSent("p", 1, 1, 10, 0);
  Append(g, 2, 3, 10, 0);
  EXPECT_EQ(g.NextSend("p", 0), std::nullopt);
  Append(g, 4, 9, 10, 0);
  std::optional<SendPlan> plan = g.NextSend("p", 0);
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->to_lsn, 4u);  // capped by max_batch_records
}

TEST(PrimaryGroup, WindowLimitsInflight) {
  PrimaryGroup g;
  g.AddPeer("p", Opts(Mode::kAsync), {}, 0);
  Stream(g, "p", 1, 0);
  Append(g, 1, 200, 1000, 0);
  std::optional<SendPlan> plan = g.NextSend("p", 0);
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->max_bytes, 4'000u);
  g.OnSent("p", 1, 4, 4000, 0);
  plan = g.NextSend("p", 0);
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->max_bytes, 4'000u);
  g.OnSent("p", 5, 8, 4000, 0);
  plan = g.NextSend("p", 0);
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->max_bytes, 2'000u);  // the window (10 000) minus 8 000 in flight
  g.OnSent("p", 9, 10, 2000, 0);
  EXPECT_EQ(StatusOf(g, "p").inflight_bytes, 10'000u);
  EXPECT_EQ(g.NextSend("p", 0), std::nullopt);  // window full
  EXPECT_EQ(g.NextDeadline(), std::nullopt);    // an ack, not a timer, opens it
  g.OnPosition("p", {4, 0, 0}, 1 * kMs);
  EXPECT_EQ(StatusOf(g, "p").inflight_bytes, 6'000u);
  plan = g.NextSend("p", 1 * kMs);  // 190 unsent records > max_batch_bytes: no coalescing
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->from_lsn, 11u);
  EXPECT_EQ(plan->max_bytes, 4'000u);
}

TEST(PrimaryGroup, WindowFollowsRttAndDeliveryRate) {
  PrimaryGroup g;
  g.AddPeer("p", Opts(Mode::kAsync), {}, 0);
  Stream(g, "p", 1, 0);
  EXPECT_EQ(StatusOf(g, "p").window_bytes, 10'000u);  // nothing known: the minimum
  g.OnRttSample("p", 50 * kMs, 0);
  g.OnRttSample("p", 20 * kMs, 1 * kMs);
  g.OnRttSample("p", 80 * kMs, 2 * kMs);
  EXPECT_EQ(StatusOf(g, "p").rtt, 20 * kMs);
  Append(g, 1, 1000, 1000, 0);
  // 100 000 bytes acknowledged per 20 ms interval = 5 MB/s.
  g.OnPosition("p", {100, 0, 0}, 0);
  g.OnPosition("p", {200, 0, 0}, 20 * kMs);
  g.OnPosition("p", {300, 0, 0}, 40 * kMs);
  PeerStatus st = StatusOf(g, "p");
  EXPECT_EQ(st.delivery_rate, 5'000'000u);
  EXPECT_EQ(st.window_bytes, 200'000u);  // 2 x 20 ms x 5 MB/s
  // Capped by max_window.
  g.OnPosition("p", {1000, 0, 0}, 60 * kMs);  // 35 MB/s
  EXPECT_EQ(StatusOf(g, "p").window_bytes, 1'000'000u);
  // The rtt minimum forgets samples older than 10 s before the newest.
  g.OnRttSample("p", 40 * kMs, 10'500 * kMs);
  EXPECT_EQ(StatusOf(g, "p").rtt, 40 * kMs);
}

// A replica that stalls and then acknowledges its backlog at once (ack compression): the bytes
// acknowledged in an interval were sent over a longer time, and the rate must not exceed the rate
// they were sent at. Before, the sample after such a burst read as several times the link's rate
// (up to 3-4x on the WAN lab's 50 ms link) and the window grew into a standing queue.
TEST(PrimaryGroup, DeliveryRateIsBoundedByTheRateTheBytesWereSentAt) {
  PrimaryGroup g;
  SenderOptions o = Opts(Mode::kAsync);
  o.max_window_bytes = 100'000'000;
  g.AddPeer("p", o, {}, 0);
  Stream(g, "p", 1, 1 * kMs);
  g.OnRttSample("p", 20 * kMs, 1 * kMs);
  Append(g, 1, 3000, 1000, 1 * kMs);
  // Batch k (k = 0..29): records 100k+1 .. 100k+100, sent at 10k + 1 ms: 10 MB/s.
  for (uint64_t k = 0; k < 30; ++k)
    g.OnSent("p", 100 * k + 1, 100 * k + 100, 100'000, (10 * k + 1) * kMs);
  g.OnPosition("p", {100, 0, 0}, 5 * kMs);  // the first batch; the interval starts
  // Nothing until 200 ms: the replica stalled. Then the backlog, acknowledged in a burst.
  g.OnPosition("p", {1000, 0, 0}, 200 * kMs);  // closes the interval: 900 kB over 195 ms
  g.OnPosition("p", {1500, 0, 0}, 200'500'000);
  g.OnPosition("p", {1900, 0, 0}, 201 * kMs);
  g.OnPosition("p", {2100, 0, 0}, 210 * kMs);
  g.OnPosition("p", {2200, 0, 0}, 220 * kMs);  // 1.2 MB acknowledged in 20 ms: 60 MB/s
  // ... but sent between 91 ms (batch 9, holding LSN 1000) and 211 ms (batch 21): 10 MB/s.
  EXPECT_EQ(StatusOf(g, "p").delivery_rate, 10'000'000u);
  EXPECT_EQ(StatusOf(g, "p").window_bytes, 400'000u);  // 2 x 20 ms x 10 MB/s
}

// Acknowledgements of records the replica had before this connection sent them (it may be ahead
// of the decision) have no send time: the acknowledgements' own interval counts.
TEST(PrimaryGroup, DeliveryRateWithoutSendTimesUsesTheAckInterval) {
  PrimaryGroup g;
  g.AddPeer("p", Opts(Mode::kAsync), {}, 0);
  Stream(g, "p", 1, 1 * kMs);
  g.OnRttSample("p", 20 * kMs, 1 * kMs);
  Append(g, 1, 1000, 1000, 1 * kMs);
  g.OnSent("p", 301, 400, 100'000, 2 * kMs);
  g.OnPosition("p", {100, 0, 0}, 10 * kMs);
  g.OnPosition("p", {300, 0, 0}, 30 * kMs);  // 200 kB in 20 ms, none of it sent here
  EXPECT_EQ(StatusOf(g, "p").delivery_rate, 10'000'000u);
}

// A replica slower than the primary queues what the window lets through; every heartbeat then
// waits behind that queue, and the window (2 x rtt x rate) grew from it: on loopback 54-183 MiB
// in flight, held in memory at both ends. After 100 RTTs (at least 2 s) of such samples the link
// drains and times one heartbeat alone.
TEST(PrimaryGroup, RttProbeDrainsAQueueBehindTheWindow) {
  PrimaryGroup g;
  g.AddPeer("p", Opts(Mode::kAsync), {}, 0);
  Stream(g, "p", 1, 0);
  g.OnHeartbeatSent("p", 1 * kMs);  // nothing in flight: its echo is the link's RTT
  g.OnRttSample("p", 1 * kMs, 2 * kMs);
  Append(g, 1, 1000, 1000, 0);
  g.OnSent("p", 1, 5, 5'000, 1 * kMs);
  g.OnRttSample("p", 100 * kMs, 1 * kS);  // queued behind the records
  g.OnRttSample("p", 100 * kMs, 2 * kS);
  EXPECT_TRUE(g.NextSend("p", 2 * kS));  // not yet: the RTT was confirmed 1.998 s ago
  g.OnRttSample("p", 100 * kMs, 2'100 * kMs);
  EXPECT_FALSE(g.NextSend("p", 2'100 * kMs)) << "probing: nothing new goes until drained";
  EXPECT_FALSE(g.RttProbeReady("p"));  // 5 records still in flight
  g.OnPosition("p", {5, 0, 0}, 2'150 * kMs);
  ASSERT_TRUE(g.RttProbeReady("p"));
  g.OnHeartbeatSent("p", 2'150 * kMs);
  EXPECT_FALSE(g.RttProbeReady("p"));  // one heartbeat per probe
  // An echo of a heartbeat sent before the probe's does not end it.
  g.OnRttSample("p", 100 * kMs, 2'200 * kMs);
  EXPECT_FALSE(g.NextSend("p", 2'200 * kMs));
  g.OnRttSample("p", 2 * kMs, 2'152 * kMs);  // the probe's echo
  EXPECT_TRUE(g.NextSend("p", 2'152 * kMs));
  EXPECT_EQ(StatusOf(g, "p").rtt, 1 * kMs);
  // The next probe comes 2 s after the probe's sample.
  g.OnRttSample("p", 100 * kMs, 4'100 * kMs);
  EXPECT_TRUE(g.NextSend("p", 4'100 * kMs));
  g.OnRttSample("p", 100 * kMs, 4'200 * kMs);
  EXPECT_FALSE(g.NextSend("p", 4'200 * kMs));
  // Not drained within 2 s (or its echo lost): sending resumes, the next probe is 2 s later.
  g.OnSent("p", 6, 6, 1'000, 4'200 * kMs);
  g.OnTick(6'100 * kMs);
  EXPECT_FALSE(g.NextSend("p", 6'100 * kMs));
  g.OnTick(6'200 * kMs);
  EXPECT_TRUE(g.NextSend("p", 6'200 * kMs));
  g.OnRttSample("p", 100 * kMs, 8'100 * kMs);
  EXPECT_TRUE(g.NextSend("p", 8'100 * kMs));
  g.OnRttSample("p", 100 * kMs, 8'300 * kMs);
  EXPECT_FALSE(g.NextSend("p", 8'300 * kMs));
  // A disconnect ends a probe.
  g.OnDisconnected("p", "cut", 8'400 * kMs);
  Stream(g, "p", 7, 8'500 * kMs);
  EXPECT_TRUE(g.NextSend("p", 8'500 * kMs));
}

// A heartbeat sent behind records in flight does not time the link: with no RTT without a queue
// known, the link probes once samples have come for 2 s.
TEST(PrimaryGroup, RttProbeWhenNoCleanSampleIsKnown) {
  PrimaryGroup g;
  g.AddPeer("p", Opts(Mode::kAsync), {}, 0);
  Stream(g, "p", 1, 0);
  Append(g, 1, 10, 1000, 0);
  g.OnSent("p", 1, 5, 5'000, 0);
  g.OnHeartbeatSent("p", 1 * kMs);
  g.OnRttSample("p", 300 * kMs, 301 * kMs);
  EXPECT_TRUE(g.NextSend("p", 301 * kMs));
  g.OnRttSample("p", 300 * kMs, 2'100 * kMs);
  EXPECT_FALSE(g.NextSend("p", 2'100 * kMs));
  g.OnPosition("p", {5, 0, 0}, 2'200 * kMs);
  EXPECT_TRUE(g.RttProbeReady("p"));
}

// On a long link a probe waits 100 RTTs (at most 8 s), so its two idle RTTs cost ~2 %.
TEST(PrimaryGroup, RttProbeOnALongLinkWaitsAHundredRtts) {
  PrimaryGroup g;
  g.AddPeer("p", Opts(Mode::kAsync), {}, 0);
  Stream(g, "p", 1, 0);
  g.OnHeartbeatSent("p", 1 * kMs);
  g.OnRttSample("p", 50 * kMs, 51 * kMs);
  Append(g, 1, 10, 1000, 0);
  for (Nanos t = 1; t <= 4; ++t) g.OnRttSample("p", 60 * kMs, t * kS);  // within 2 x
  g.OnRttSample("p", 200 * kMs, 5 * kS);
  g.OnRttSample("p", 200 * kMs, 8'900 * kMs);
  EXPECT_TRUE(g.NextSend("p", 8'900 * kMs));  // 4.9 s since the last confirming sample
  g.OnRttSample("p", 200 * kMs, 9 * kS);
  EXPECT_FALSE(g.NextSend("p", 9 * kS));
  EXPECT_TRUE(g.RttProbeReady("p"));
}

// A sync peer in the sync set is not probed: its client's queue depth bounds what is in flight,
// and its writes wait while it does not send.
TEST(PrimaryGroup, SyncPeerIsNotProbed) {
  PrimaryGroup g;
  g.AddPeer("p", Opts(Mode::kSync), {}, 0);
  Stream(g, "p", 1, 0);
  g.OnRttSample("p", 1 * kMs, 0);
  Append(g, 1, 10, 1000, 0);
  for (Nanos t = 1; t <= 12; ++t) g.OnRttSample("p", 100 * kMs, t * kS);
  EXPECT_TRUE(g.NextSend("p", 12 * kS));
  EXPECT_FALSE(g.RttProbeReady("p"));
}

TEST(PrimaryGroup, LagIsExact) {
  PrimaryGroup g;
  g.AddPeer("p", Opts(Mode::kAsync), {}, 0);
  g.AddPeer("q", Opts(Mode::kAsync), {}, 0);
  for (uint64_t l = 1; l <= 10; ++l) g.OnLocalAppend(l, 10 * l, 5000 + l, 0);
  Lag lag = StatusOf(g, "p").lag;
  EXPECT_EQ(lag.lsns, 10u);
  EXPECT_EQ(lag.bytes, 550u);
  EXPECT_EQ(lag.oldest_timestamp_ns, 5001u);
  g.OnPosition("p", {10, 6, 0}, 0);
  lag = StatusOf(g, "p").lag;
  EXPECT_EQ(lag.lsns, 4u);
  EXPECT_EQ(lag.bytes, 70u + 80 + 90 + 100);
  EXPECT_EQ(lag.oldest_timestamp_ns, 5007u);
  // Pruning (min durable is q's 0 here, then 3) keeps everything both still need exact.
  g.OnPosition("q", {3, 3, 0}, 0);
  lag = StatusOf(g, "q").lag;
  EXPECT_EQ(lag.bytes, 550u - 60);
  EXPECT_EQ(lag.oldest_timestamp_ns, 5004u);
  g.OnPosition("q", {10, 10, 0}, 0);
  EXPECT_EQ(StatusOf(g, "q").lag.lsns, 0u);
  EXPECT_EQ(StatusOf(g, "q").lag.oldest_timestamp_ns, 0u);
  EXPECT_EQ(StatusOf(g, "p").lag.bytes, 340u);
  g.OnPosition("p", {10, 10, 0}, 0);
  g.OnLocalAppend(11, 7, 9999, 0);
  EXPECT_EQ(StatusOf(g, "p").lag.bytes, 7u);
  EXPECT_EQ(StatusOf(g, "p").lag.oldest_timestamp_ns, 9999u);
}

TEST(PrimaryGroup, DisconnectAndResendFromReplicaPosition) {
  PrimaryGroup g;
  g.AddPeer("p", Opts(Mode::kAsync), {}, 0);
  Stream(g, "p", 1, 0);
  Append(g, 1, 5, 100, 0);
  g.OnSent("p", 1, 5, 500, 0);
  g.OnPosition("p", {5, 3, 0}, 1 * kMs);
  g.OnDisconnected("p", "stream reset", 2 * kMs);
  PeerStatus st = StatusOf(g, "p");
  EXPECT_EQ(st.state, LinkState::kDisconnected);
  EXPECT_EQ(st.last_error, "stream reset");
  EXPECT_EQ(g.NextSend("p", 2 * kMs), std::nullopt);
  // The replica crashed and kept only 3: resend from 4; known positions stay.
  Stream(g, "p", 4, 3 * kMs);
  EXPECT_EQ(StatusOf(g, "p").positions, (Positions{5, 3, 0}));
  std::optional<SendPlan> plan = g.NextSend("p", 3 * kMs);
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->from_lsn, 4u);
}

TEST(PrimaryGroup, RefusalIsKeptWithReason) {
  PrimaryGroup g;
  g.AddPeer("p", Opts(Mode::kAsync), {}, 0);
  g.OnConnected("p", 0);
  HandshakeDecision d;
  d.kind = HandshakeDecision::Kind::kRefuse;
  d.code = RefuseCode::kStaleEpoch;
  d.reason = "stale epoch: 3 < 4";
  g.OnDecision("p", d, 0, 0);
  g.OnDisconnected("p", "stream closed", 0);
  PeerStatus st = StatusOf(g, "p");
  EXPECT_EQ(st.state, LinkState::kRefused);
  EXPECT_THAT(st.last_error, HasSubstr("stale epoch: 3 < 4"));
}

TEST(PrimaryGroup, FullCopyRegistersBaseAndStreamsAfterIt) {
  PrimaryGroup g;
  g.AddPeer("p", Opts(Mode::kSync), {20, 20, 20}, 0);
  Append(g, 1, 30, 10, 0);
  g.OnConnected("p", 0);
  HandshakeDecision d;
  d.kind = HandshakeDecision::Kind::kFullCopy;
  EXPECT_EQ(g.OnDecision("p", d, 12, 0), 13u);
  PeerStatus st = StatusOf(g, "p");
  EXPECT_EQ(st.state, LinkState::kCopying);
  EXPECT_EQ(st.positions, (Positions{12, 12, 12}));
  EXPECT_EQ(g.MinPeerDurable(), 12u);
  EXPECT_EQ(st.lag.bytes, 180u);  // exact: records after 12 were kept
  std::optional<SendPlan> plan = g.NextSend("p", 0);
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->from_lsn, 13u);
  g.OnCopyDone("p", 14, 0);
  EXPECT_EQ(StatusOf(g, "p").state, LinkState::kStreaming);
  // A resumed copy streams from the replica's log end and keeps positions.
  g.OnDisconnected("p", "cut", 0);
  g.OnConnected("p", 0);
  d.copy_resume = true;
  d.start_lsn = 17;
  EXPECT_EQ(g.OnDecision("p", d, 25, 0), 17u);
  EXPECT_EQ(StatusOf(g, "p").positions, (Positions{12, 12, 12}));
}

// Regression (tests/sim --primary-restarts): a copy from the start is based on the applied LSN,
// which can be below every peer's durable LSN; the lag index keeps the records after it, so the
// copied peer's lag stays exact.
TEST(PrimaryGroup, LagIsExactAfterACopyBelowEveryPeersDurable) {
  PrimaryGroup g;
  g.AddPeer("p", Opts(Mode::kAsync), {}, 0);
  g.AddPeer("q", Opts(Mode::kAsync), {}, 0);
  for (uint64_t l = 1; l <= 30; ++l) g.OnLocalAppend(l, l, 5000 + l, 0);
  g.OnLocalApplied(12);
  Stream(g, "p", 1, 0);
  Stream(g, "q", 1, 0);
  g.OnPosition("p", {30, 30, 0}, 0);
  g.OnPosition("q", {30, 30, 0}, 0);
  g.OnLocalApplied(14);
  // q is resynced: a copy from the start at the applied LSN 14.
  g.OnDisconnected("q", "resync", 0);
  g.OnConnected("q", 0);
  HandshakeDecision d;
  d.kind = HandshakeDecision::Kind::kFullCopy;
  EXPECT_EQ(g.OnDecision("q", d, 14, 0), 15u);
  Lag lag = StatusOf(g, "q").lag;
  EXPECT_EQ(lag.lsns, 16u);
  EXPECT_EQ(lag.bytes, (15u + 30) * 16 / 2);
  EXPECT_EQ(lag.oldest_timestamp_ns, 5015u);
  // The index drops records once both the applier and every peer are past them.
  g.OnPosition("q", {20, 20, 0}, 0);
  g.OnLocalApplied(30);
  lag = StatusOf(g, "q").lag;
  EXPECT_EQ(lag.bytes, (21u + 30) * 10 / 2);
  EXPECT_EQ(lag.oldest_timestamp_ns, 5021u);
}

// Regression (tests/sim --primary-restarts): a sync peer that takes a full copy holds records up
// to the copy's base only as copied chunks, and is consistent only once the copy is complete and
// its log reaches the copy's end. Until the replica reports that, it holds no write: WRITEs and
// FLUSHes not released at the decision wait (they used to complete on the copy's base).
TEST(PrimaryGroup, SyncPeerUnderACopyHoldsNoWriteUntilTheCopyIsComplete) {
  PrimaryGroup g;
  g.AddPeer("s", Opts(Mode::kSync), {}, 0);
  Stream(g, "s", 1, 0);
  Append(g, 1, 30, 10, 0);
  g.OnLocalDurable(30);
  g.OnLocalApplied(30);
  g.OnPosition("s", {5, 5, 5}, 0);
  EXPECT_EQ(g.write_released(), 5u);
  // The replica was resynced: a copy from the start at 20.
  g.OnDisconnected("s", "resync", 0);
  g.OnConnected("s", 0);
  HandshakeDecision d;
  d.kind = HandshakeDecision::Kind::kFullCopy;
  EXPECT_EQ(g.OnDecision("s", d, 20, 0), 21u);
  PeerStatus st = StatusOf(g, "s");
  EXPECT_EQ(st.positions, (Positions{20, 20, 5}));  // its log restarts after 20
  EXPECT_TRUE(st.copy_pending);
  EXPECT_FALSE(st.confirmed);
  EXPECT_TRUE(st.in_sync_set);
  EXPECT_EQ(g.write_released(), 0u);  // not 20: LSNs 6..20 are nowhere at the replica yet
  EXPECT_EQ(g.flush_released(), 0u);
  Positions copying{25, 25, 20};
  copying.copying = true;
  g.OnPosition("s", copying, 0);
  EXPECT_EQ(g.write_released(), 0u);
  g.OnCopyDone("s", 28, 0);
  copying.received = copying.durable = 30;
  g.OnPosition("s", copying, 0);  // sent before the replica had CopyDone
  EXPECT_EQ(g.write_released(), 0u);
  // The replica persisted the copy's end: it holds the copy up to 20 and its log after it.
  EXPECT_TRUE(g.OnPosition("s", {30, 30, 20}, 0));
  st = StatusOf(g, "s");
  EXPECT_FALSE(st.copy_pending);
  EXPECT_TRUE(st.confirmed);
  EXPECT_EQ(g.write_released(), 30u);
  EXPECT_EQ(g.flush_released(), 30u);
}

TEST(PrimaryGroup, CopyIsCompleteOnlyOnceTheLogReachesItsEnd) {
  PrimaryGroup g;
  g.AddPeer("s", Opts(Mode::kSync), {}, 0);
  Append(g, 1, 30, 10, 0);
  g.OnLocalDurable(30);
  g.OnLocalApplied(10);
  g.OnConnected("s", 0);
  HandshakeDecision d;
  d.kind = HandshakeDecision::Kind::kFullCopy;
  g.OnDecision("s", d, 10, 0);
  g.OnCopyDone("s", 25, 0);
  // Copy done at the replica, but its log ends at 22 < 25: it cannot become consistent alone.
  g.OnPosition("s", {22, 22, 10}, 0);
  EXPECT_TRUE(StatusOf(g, "s").copy_pending);
  EXPECT_EQ(g.write_released(), 0u);
  g.OnPosition("s", {25, 24, 12}, 0);
  EXPECT_EQ(g.write_released(), 0u);  // durable too
  g.OnPosition("s", {26, 25, 12}, 0);
  EXPECT_EQ(g.write_released(), 26u);
  EXPECT_EQ(g.flush_released(), 25u);
  // A cut and a resumed copy keep it pending; a new copy from the start makes it pending again.
  g.OnDisconnected("s", "cut", 0);
  g.OnConnected("s", 0);
  g.OnDecision("s", d, 30, 0);
  EXPECT_TRUE(StatusOf(g, "s").copy_pending);
  EXPECT_EQ(g.write_released(), 0u);
}

TEST(PrimaryGroup, SyncPeerUnderACopyDegradesOnTheOldestWriteItHoldsBack) {
  PrimaryGroup g;
  g.AddPeer("s", Opts(Mode::kSync, 100 * kMs), {}, 0);
  Stream(g, "s", 1, 0);
  Append(g, 1, 4, 100, 0);
  g.OnPosition("s", {4, 4, 0}, 0);
  Append(g, 5, 5, 100, 10 * kMs);  // waits from 10 ms
  g.OnLocalApplied(5);
  g.OnPosition("s", {5, 5, 0}, 20 * kMs);
  g.OnDisconnected("s", "resync", 30 * kMs);
  g.OnConnected("s", 40 * kMs);
  Append(g, 6, 6, 100, 45 * kMs);
  HandshakeDecision d;
  d.kind = HandshakeDecision::Kind::kFullCopy;
  g.OnDecision("s", d, 5, 50 * kMs);
  // Everything after the release point at the decision (5) waits; the oldest is 6 from 45 ms.
  EXPECT_EQ(g.write_released(), 0u);
  EXPECT_EQ(g.NextDeadline(), 145 * kMs);
  g.OnLocalTruncate(7);  // the log may drop them: the clock does not depend on it
  EXPECT_EQ(g.NextDeadline(), 145 * kMs);
  EXPECT_FALSE(g.OnTick(144 * kMs));
  EXPECT_TRUE(g.OnTick(145 * kMs));
  PeerStatus st = StatusOf(g, "s");
  EXPECT_TRUE(st.degraded);
  EXPECT_EQ(g.write_released(), 6u);
  // Caught up but the copy is not confirmed: it does not rejoin.
  g.OnCopyDone("s", 6, 150 * kMs);
  Positions copying{6, 6, 5};
  copying.copying = true;
  g.OnPosition("s", copying, 160 * kMs);
  g.OnTick(160 * kMs);
  EXPECT_TRUE(StatusOf(g, "s").degraded);
  g.OnPosition("s", {6, 6, 6}, 170 * kMs);
  EXPECT_FALSE(StatusOf(g, "s").degraded);
  EXPECT_EQ(g.write_released(), 6u);
}

// Regression (tests/sim --primary-restarts): positions persisted by an earlier run of the primary
// count only once the peer's handshake decides to stream: the replica may have been resynced or
// be in a copy meanwhile, and a FLUSH must not complete on the strength of a log it no longer has.
TEST(PrimaryGroup, PersistedPositionsCountAfterTheHandshake) {
  PrimaryGroup g;
  g.AddPeer("s", Opts(Mode::kSync), {10, 10, 10}, 0);
  Append(g, 1, 10, 100, 0);
  g.OnLocalDurable(10);
  EXPECT_FALSE(StatusOf(g, "s").confirmed);
  EXPECT_EQ(g.write_released(), 0u);
  EXPECT_EQ(g.flush_released(), 0u);
  Stream(g, "s", 11, 0);
  EXPECT_TRUE(StatusOf(g, "s").confirmed);
  EXPECT_EQ(g.write_released(), 10u);
  EXPECT_EQ(g.flush_released(), 10u);
  // A refusal means its log is not the one they describe.
  g.OnDisconnected("s", "cut", 0);
  g.OnConnected("s", 0);
  HandshakeDecision d;
  d.kind = HandshakeDecision::Kind::kRefuse;
  d.code = RefuseCode::kVolumeMismatch;
  g.OnDecision("s", d, 0, 0);
  EXPECT_EQ(g.flush_released(), 0u);
}

TEST(PrimaryGroup, StartsFromALogThatDoesNotBeginAtOne) {
  PrimaryGroup g;
  g.AddPeer("p", Opts(Mode::kAsync), {500, 500, 500}, 0);
  for (uint64_t l = 501; l <= 503; ++l) g.OnLocalAppend(l, 10, l, 0);
  g.OnLocalAppend(502, 99, 0, 0);  // out of order: ignored
  EXPECT_EQ(g.last_lsn(), 503u);
  EXPECT_EQ(StatusOf(g, "p").lag.bytes, 30u);
  EXPECT_EQ(StatusOf(g, "p").lag.oldest_timestamp_ns, 501u);
}

// ---------------------------------------------------------------------------------------------

ReplicaReceiver Receiver() {
  ReplicaReceiver r(View());
  EXPECT_EQ(r.OnHello(Hello()).kind, HandshakeDecision::Kind::kStreamFrom);
  return r;
}

TEST(ReplicaReceiver, RaisesNewestEpochOnHello) {
  ReplicaView v = View();
  v.newest_epoch = 2;
  v.history = {{1, 1}};
  v.last_lsn = 90;
  ReplicaReceiver r(v);
  EXPECT_EQ(r.OnHello(Hello()).kind, HandshakeDecision::Kind::kStreamFrom);
  EXPECT_EQ(r.newest_epoch(), 3u);
  PrimaryHello old = Hello();
  old.epoch = 2;
  EXPECT_EQ(r.OnHello(old).code, RefuseCode::kStaleEpoch);
  EXPECT_EQ(r.newest_epoch(), 3u);
}

TEST(ReplicaReceiver, AppendsNextBatch) {
  ReplicaReceiver r = Receiver();
  auto c = r.OnBatch(3, 151, 10);
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kAppend);
  EXPECT_EQ(c.skip_records, 0u);
  EXPECT_FALSE(c.begins_epoch);
  r.OnAppended(160);
  EXPECT_EQ(r.view().last_lsn, 160u);
  EXPECT_EQ(r.positions().received, 160u);
}

// The log may report an fsync before the append's own callback has run: that fsync still counts
// once the append is reported (durable never passes what was appended).
TEST(ReplicaReceiver, DurableReportedBeforeItsAppendCountsOnceAppended) {
  ReplicaReceiver r = Receiver();
  ASSERT_EQ(r.OnBatch(3, 151, 10).verdict, ReplicaReceiver::BatchCheck::Verdict::kAppend);
  r.OnDurable(160);
  EXPECT_EQ(r.positions().durable, 150u);
  r.OnAppended(160);
  EXPECT_EQ(r.positions().received, 160u);
  EXPECT_EQ(r.positions().durable, 160u);
}

// An async link's batch that asked for durable is acknowledged by its durable ack alone when its
// fsync starts at once; a sync link's, one that did not ask, or one behind a running fsync, at
// once; and at once too if its fsync was reported before the append.
TEST(ReplicaReceiver, AcknowledgesAnAsyncBatchOnceWhenItsFsyncStartsAtOnce) {
  ReplicaReceiver r = Receiver();
  ASSERT_EQ(r.OnBatch(3, 151, 10).verdict, ReplicaReceiver::BatchCheck::Verdict::kAppend);
  r.OnAppended(160);
  EXPECT_FALSE(r.AckAppendNow(/*async_link=*/true, /*durable_requested=*/true, false, 160));
  EXPECT_TRUE(r.AckAppendNow(true, true, /*fsync_busy=*/true, 160));
  EXPECT_TRUE(r.AckAppendNow(true, /*durable_requested=*/false, false, 160));
  EXPECT_TRUE(r.AckAppendNow(/*async_link=*/false, true, false, 160));
  ASSERT_EQ(r.OnBatch(3, 161, 10).verdict, ReplicaReceiver::BatchCheck::Verdict::kAppend);
  r.OnDurable(170);  // the fsync came first
  r.OnAppended(170);
  EXPECT_TRUE(r.AckAppendNow(true, true, false, 170));
}

TEST(ReplicaReceiver, SkipsResentPrefix) {
  ReplicaReceiver r = Receiver();
  auto c = r.OnBatch(3, 141, 20);
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kAppend);
  EXPECT_EQ(c.skip_records, 10u);
  c = r.OnBatch(3, 141, 5);  // wholly old
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kAppend);
  EXPECT_EQ(c.skip_records, 5u);
}

TEST(ReplicaReceiver, RejectsGap) {
  ReplicaReceiver r = Receiver();
  auto c = r.OnBatch(3, 152, 1);
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kReject);
  EXPECT_THAT(c.reason, HasSubstr("gap"));
  EXPECT_THAT(c.reason, HasSubstr("ends at LSN 150"));
}

TEST(ReplicaReceiver, RejectsEpochNotInPrimaryHistory) {
  ReplicaReceiver r = Receiver();
  auto c = r.OnBatch(1, 151, 1);  // the Hello's history says 151 is epoch 3
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kReject);
  EXPECT_THAT(c.reason, HasSubstr("epoch 3 at LSN 151"));
  c = r.OnBatch(4, 151, 1);  // newer than the stream
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kReject);
}

TEST(ReplicaReceiver, RejectsBatchBeforeHelloAndFencedStream) {
  ReplicaReceiver r(View());
  auto c = r.OnBatch(3, 151, 1);
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kReject);
  EXPECT_THAT(c.reason, HasSubstr("before an accepted Hello"));
  r = Receiver();
  PrimaryHello newer = Hello();
  newer.epoch = 5;
  newer.history.push_back({5, 201});
  ASSERT_NE(r.OnHello(newer).kind, HandshakeDecision::Kind::kRefuse);
  PrimaryHello old = Hello();
  EXPECT_EQ(r.OnHello(old).code, RefuseCode::kStaleEpoch);
  c = r.OnBatch(3, 151, 1);
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kReject);
}

TEST(ReplicaReceiver, CatchesUpAcrossAnEpochChange) {
  // The replica stopped at 90 in epoch 1; the primary (epoch 3) began epoch 3 at 101.
  ReplicaView v = View();
  v.newest_epoch = 1;
  v.history = {{1, 1}};
  v.last_lsn = 90;
  ReplicaReceiver r(v);
  ASSERT_EQ(r.OnHello(Hello()).start_lsn, 91u);
  auto c = r.OnBatch(1, 91, 10);  // older records keep their epoch
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kAppend);
  EXPECT_FALSE(c.begins_epoch);
  r.OnAppended(100);
  c = r.OnBatch(3, 99, 5);  // spans 100 (epoch 1) and 101 (epoch 3): malformed
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kReject);
  c = r.OnBatch(3, 101, 5);
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kAppend);
  EXPECT_TRUE(c.begins_epoch);
  EXPECT_EQ(r.view().history, (History{{1, 1}, {3, 101}}));
  r.OnAppended(105);
  c = r.OnBatch(3, 106, 1);
  EXPECT_FALSE(c.begins_epoch);
}

TEST(ReplicaReceiver, AckReportsChangesOnlyAndAgainAfterHello) {
  ReplicaReceiver r = Receiver();
  std::optional<Positions> a = r.TakeAck();
  ASSERT_TRUE(a);
  EXPECT_EQ(*a, (Positions{150, 150, 0}));
  EXPECT_EQ(r.TakeAck(), std::nullopt);
  r.OnBatch(3, 151, 1);
  r.OnAppended(151);
  EXPECT_EQ(r.TakeAck(), (Positions{151, 150, 0}));
  r.OnDurable(151);
  r.OnApplied(151);
  EXPECT_EQ(r.TakeAck(), (Positions{151, 151, 151}));
  EXPECT_EQ(r.TakeAck(), std::nullopt);
  r.OnHello(Hello());
  EXPECT_EQ(r.TakeAck(), (Positions{151, 151, 151}));
  r.OnDurable(500);  // never beyond the log
  EXPECT_EQ(r.positions().durable, 151u);
}

TEST(ReplicaReceiver, FullCopyLifecycle) {
  ReplicaView v = View();
  v.consistent = false;
  v.history.clear();
  v.last_lsn = 0;
  v.newest_epoch = 0;
  ReplicaReceiver r(v);
  EXPECT_FALSE(r.consistent());
  HandshakeDecision d = r.OnHello(Hello());
  ASSERT_EQ(d.kind, HandshakeDecision::Kind::kFullCopy);
  r.OnCopyBegin(3, 121, Hello().history);
  EXPECT_TRUE(r.view().copy_in_progress);
  EXPECT_EQ(r.view().last_lsn, 120u);
  EXPECT_EQ(r.view().history, (History{{1, 1}, {3, 101}}));
  EXPECT_EQ(r.positions().received, 120u);
  auto c = r.OnBatch(3, 121, 10);
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kAppend);
  EXPECT_FALSE(c.begins_epoch);  // epoch 3 is already in the copied history
  r.OnAppended(130);
  r.OnCopyChunk(1, 4096);
  EXPECT_EQ(r.view().copy_volume, 1u);
  EXPECT_EQ(r.view().copy_offset, 4096u);
  // An interrupted copy resumes where it was.
  ReplicaReceiver again(r.view());
  d = again.OnHello(Hello());
  EXPECT_TRUE(d.copy_resume);
  EXPECT_EQ(d.start_lsn, 131u);
  r.OnCopyDone(128);
  EXPECT_FALSE(r.consistent());  // applied has not reached 128
  r.OnApplied(127);
  EXPECT_FALSE(r.consistent());
  r.OnApplied(128);
  EXPECT_TRUE(r.consistent());
  // After a restart the copy is done: stream, and consistent once the checkpoint says so.
  ReplicaReceiver restarted(r.view());
  EXPECT_EQ(restarted.OnHello(Hello()).kind, HandshakeDecision::Kind::kStreamFrom);
  EXPECT_FALSE(restarted.consistent());
  restarted.OnApplied(128);
  EXPECT_TRUE(restarted.consistent());
}

TEST(ReplicaReceiver, CopyRecordsItsEpochsAndReportsWhenDone) {
  ReplicaView v = View();
  v.consistent = false;
  v.history.clear();
  v.last_lsn = 0;
  ReplicaReceiver r(v);
  PrimaryHello h = Hello();  // epoch 3, history {1,1},{3,101}, last 200
  ASSERT_EQ(r.OnHello(h).kind, HandshakeDecision::Kind::kFullCopy);
  EXPECT_EQ(r.TakeAck(), std::nullopt);  // nothing until CopyBegin
  r.OnCopyBegin(3, 91);
  EXPECT_EQ(r.view().copy_epoch, 3u);
  std::optional<Positions> a = r.TakeAck();
  ASSERT_TRUE(a);
  EXPECT_TRUE(a->copying);
  EXPECT_EQ(a->received, 90u);
  // The end LSN is past the Hello's last LSN: written in the primary's own epoch.
  r.OnCopyDone(230);
  EXPECT_EQ(r.view().consistent_at_lsn, 230u);
  EXPECT_EQ(r.view().consistent_at_epoch, 3u);
  a = r.TakeAck();
  ASSERT_TRUE(a);
  EXPECT_FALSE(a->copying);
  // A copy whose end is in an older epoch of the history.
  ReplicaReceiver r2(v);
  r2.OnHello(h);
  r2.OnCopyBegin(3, 51);
  r2.OnCopyDone(95);
  EXPECT_EQ(r2.view().consistent_at_epoch, 1u);
  // Restarted mid-copy: still reports the copy in progress.
  ReplicaReceiver r3(r.view());
  EXPECT_FALSE(r3.positions().copying);
  ReplicaView mid = v;
  mid.copy_in_progress = true;
  mid.copy_epoch = 3;
  EXPECT_TRUE(ReplicaReceiver(mid).positions().copying);
}

// Regression (reconnect after a copy with base L0 > 0 refused as diverged at LSN 1): the node
// persisted the copied log's history as {(copy epoch, L0 + 1)}, so the view rebuilt after any
// restart disagreed with every primary whose history starts at LSN 1. What a restarted replica
// reads back must be core's own view after the copy: the primary's history up to L0.
TEST(ReplicaReceiver, ReconnectAfterCopyWithBaseAboveZeroIsNotDiverged) {
  ReplicaView v = View();
  v.consistent = false;
  v.history.clear();
  v.last_lsn = 0;
  v.newest_epoch = 0;
  ReplicaReceiver r(v);
  const PrimaryHello h = Hello();  // epoch 3, history {1,1},{3,101}, last 200
  ASSERT_EQ(r.OnHello(h).kind, HandshakeDecision::Kind::kFullCopy);
  r.OnCopyBegin(3, 181, h.history);  // L0 = 180
  EXPECT_EQ(r.view().history, HistoryUpTo(h.history, 180));
  ASSERT_EQ(r.OnBatch(3, 181, 20).verdict, ReplicaReceiver::BatchCheck::Verdict::kAppend);
  r.OnAppended(200);
  r.OnCopyDone(200);
  r.OnApplied(200);
  ASSERT_TRUE(r.consistent());

  // The replica restarts: its view is rebuilt from what the log persisted.
  ReplicaView persisted = r.view();
  persisted.history = HistoryUpTo(h.history, 180);  // what GroupLog::ResetForCopy now installs
  EXPECT_EQ(persisted.history, r.view().history);
  ReplicaReceiver restarted(persisted);
  HandshakeDecision d = restarted.OnHello(h);
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kStreamFrom) << d.reason;
  EXPECT_EQ(d.start_lsn, 201u);
  // And after the primary restarted (epoch 5, first record at 201).
  PrimaryHello later = h;
  later.epoch = 5;
  later.history.push_back({5, 201});
  ReplicaReceiver restarted2(persisted);
  d = restarted2.OnHello(later);
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kStreamFrom) << d.reason;
  EXPECT_TRUE(restarted2.OnBatch(5, 201, 3).begins_epoch);

  // The history the log used to persist: refused as diverged at LSN 1, forever.
  ReplicaView buggy = persisted;
  buggy.history = {{3, 181}};
  d = ReplicaReceiver(buggy).OnHello(h);
  EXPECT_EQ(d.code, RefuseCode::kDiverged);
  EXPECT_THAT(d.reason, HasSubstr("split at LSN 1"));
}

TEST(ReplicaReceiver, CopyOfEmptyPrimaryBeginsEpochWithFirstBatch) {
  ReplicaView v = View();
  v.consistent = false;
  v.history.clear();
  v.last_lsn = 0;
  ReplicaReceiver r(v);
  PrimaryHello h = Hello();
  h.history = {{3, 1}};
  h.first_lsn = 1;
  h.last_lsn = 0;
  ASSERT_EQ(r.OnHello(h).kind, HandshakeDecision::Kind::kFullCopy);
  r.OnCopyBegin(3, 1);
  EXPECT_TRUE(r.view().history.empty());
  auto c = r.OnBatch(3, 1, 2);
  EXPECT_TRUE(c.begins_epoch);
  EXPECT_EQ(r.view().history, (History{{3, 1}}));
}

}  // namespace
}  // namespace tvilling::core

// ---------------------------------------------------------------------------------------------
// Rejoin of a diverged replica (docs/replication.md, "Rejoin")

namespace tvilling::core {
namespace {

TEST(Extents, MergeSortsJoinsAndDropsEmpty) {
  std::vector<Extent> in{{1, 100, 10}, {0, 50, 10}, {0, 0, 10}, {0, 10, 5},
                         {0, 55, 20},  {1, 0, 0},   {1, 200, 1}};
  EXPECT_EQ(MergeExtents(in),
            (std::vector<Extent>{{0, 0, 15}, {0, 50, 25}, {1, 100, 10}, {1, 200, 1}}));
  EXPECT_EQ(MergeExtents({}), std::vector<Extent>{});
  // Contained ranges do not shrink the container.
  EXPECT_EQ(MergeExtents({{0, 0, 100}, {0, 10, 5}}), (std::vector<Extent>{{0, 0, 100}}));
}

TEST(Extents, FromResumePointAndCover) {
  const std::vector<Extent> e{{0, 0, 15}, {0, 50, 25}, {1, 100, 10}};
  EXPECT_EQ(ExtentsFrom(e, 0, 0), e);
  EXPECT_EQ(ExtentsFrom(e, 0, 60), (std::vector<Extent>{{0, 60, 15}, {1, 100, 10}}));
  EXPECT_EQ(ExtentsFrom(e, 0, 75), (std::vector<Extent>{{1, 100, 10}}));
  EXPECT_EQ(ExtentsFrom(e, 1, 0), (std::vector<Extent>{{1, 100, 10}}));
  EXPECT_EQ(ExtentsFrom(e, 1, 110), std::vector<Extent>{});
  EXPECT_EQ(ExtentsFrom(e, 2, 0), std::vector<Extent>{});
  EXPECT_TRUE(ExtentsCover(e, 0, 50, 25));
  EXPECT_TRUE(ExtentsCover(e, 0, 60, 5));
  EXPECT_FALSE(ExtentsCover(e, 0, 60, 16));
  EXPECT_FALSE(ExtentsCover(e, 1, 0, 1));
  EXPECT_FALSE(ExtentsCover(e, 0, 15, 1));
}

ReplicaView RejoinView() {
  ReplicaView v;
  v.group_known = true;
  v.on_divergence = OnDivergence::kRejoin;
  v.newest_epoch = 2;
  v.history = {{1, 1}, {2, 101}};  // an old primary: went on in epoch 2 from 101 to 130
  v.last_lsn = 130;
  v.volume_sizes = {1 << 20};
  v.consistent = true;
  return v;
}

PrimaryHello RejoinHello() {
  PrimaryHello h;
  h.group = "g";
  h.site = "b";
  h.epoch = 3;
  h.history = {{1, 1}, {3, 121}};  // promoted after LSN 120
  h.volume_sizes = {1 << 20};
  h.first_lsn = 1;
  h.last_lsn = 160;
  return h;
}

TEST(Rejoin, DivergedReplicaRejoinsAtTheFork) {
  HandshakeDecision d = DecideHandshake(RejoinHello(), RejoinView());
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kRejoin);
  EXPECT_EQ(d.fork_lsn, 100u);  // epoch 2 from 101 at the replica, epoch 1 up to 120 at the primary
  EXPECT_THAT(d.reason, HasSubstr("LSN 101"));
  EXPECT_THAT(d.reason, HasSubstr("101..130"));
}

TEST(Rejoin, RefuseConfigKeepsTheRefusal) {
  ReplicaView v = RejoinView();
  v.on_divergence = OnDivergence::kRefuse;
  HandshakeDecision d = DecideHandshake(RejoinHello(), v);
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kRefuse);
  EXPECT_EQ(d.code, RefuseCode::kDiverged);
  EXPECT_THAT(d.reason, HasSubstr("on_divergence = refuse"));
}

// The view after the cut that PlanRejoin describes, as the node rebuilds it from the log.
ReplicaView AfterCut(ReplicaView v, const RejoinPlan& p) {
  v.history = p.history;
  v.last_lsn = p.fork_lsn;
  if (!v.copy_in_progress) {
    v.consistent = false;
    v.restore_pending = p.restore;
    v.restore_extents = p.extents;
    v.restore_epoch = 0;
    v.copy_volume = 0;
    v.copy_offset = 0;
  }
  return v;
}

TEST(Rejoin, ForkInsideTheAppliedRangeRestoresAndStreamsFromTheFork) {
  const ReplicaView v = RejoinView();
  RejoinPlan p = PlanRejoin(v, 100, {{0, 4096, 4096}, {0, 0, 4096}, {0, 65536, 512}}, 125);
  EXPECT_TRUE(p.restore);
  EXPECT_EQ(p.applied_lsn, 100u);  // the volumes hold records up to 125: cut to the fork
  EXPECT_EQ(p.history, (History{{1, 1}}));
  EXPECT_EQ(p.extents, (std::vector<Extent>{{0, 0, 8192}, {0, 65536, 512}}));
  // Applied below the fork stays.
  EXPECT_EQ(PlanRejoin(v, 100, {}, 90).applied_lsn, 90u);

  ReplicaReceiver rx(AfterCut(v, p));
  EXPECT_TRUE(rx.positions().copying);
  EXPECT_FALSE(rx.consistent());
  HandshakeDecision d = rx.OnHello(RejoinHello());
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kRestore);
  EXPECT_EQ(d.start_lsn, 101u);
  EXPECT_FALSE(d.copy_resume);
  EXPECT_EQ(d.extents, p.extents);
  EXPECT_EQ(rx.view().restore_epoch, 3u);
  // Acks flow during a restore (no CopyBegin comes), marked as copying.
  auto ack = rx.TakeAck();
  ASSERT_TRUE(ack.has_value());
  EXPECT_TRUE(ack->copying);
  // Records after the fork come in the primary's epochs.
  EXPECT_EQ(rx.OnBatch(1, 101, 20).verdict, ReplicaReceiver::BatchCheck::Verdict::kAppend);
  rx.OnAppended(120);
  auto c = rx.OnBatch(3, 121, 40);
  EXPECT_EQ(c.verdict, ReplicaReceiver::BatchCheck::Verdict::kAppend);
  EXPECT_TRUE(c.begins_epoch);
  rx.OnAppended(160);
  rx.OnCopyDone(160);
  EXPECT_FALSE(rx.view().restore_pending);
  EXPECT_FALSE(rx.consistent());
  rx.OnApplied(160);
  EXPECT_TRUE(rx.consistent());
  EXPECT_FALSE(rx.TakeAck()->copying);
}

TEST(Rejoin, InterruptedRestoreResumesOnlyInItsEpoch) {
  ReplicaView v =
      AfterCut(RejoinView(), PlanRejoin(RejoinView(), 100, {{0, 0, 8192}, {0, 65536, 512}}, 100));
  v.restore_epoch = 3;
  v.copy_volume = 0;
  v.copy_offset = 4096;
  v.last_lsn = 140;
  v.history = {{1, 1}, {3, 121}};
  HandshakeDecision d = DecideHandshake(RejoinHello(), v);
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kRestore);
  EXPECT_TRUE(d.copy_resume);
  EXPECT_EQ(d.start_lsn, 141u);
  EXPECT_EQ(d.extents, (std::vector<Extent>{{0, 4096, 4096}, {0, 65536, 512}}));
  // A primary of a newer epoch (restarted: it may have lost records that restored chunks show)
  // restores every extent again.
  PrimaryHello h = RejoinHello();
  h.epoch = 4;
  h.history = {{1, 1}, {3, 121}, {4, 161}};
  d = DecideHandshake(h, v);
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kRestore);
  EXPECT_FALSE(d.copy_resume);
  EXPECT_EQ(d.extents, (std::vector<Extent>{{0, 0, 8192}, {0, 65536, 512}}));
}

TEST(Rejoin, ForkBeforeThePrimarysLogStartMeansFullCopy) {
  PrimaryHello h = RejoinHello();
  h.first_lsn = 110;  // the primary no longer holds 101..109
  ReplicaView v = RejoinView();
  HandshakeDecision d = DecideHandshake(h, v);
  ASSERT_EQ(d.kind, HandshakeDecision::Kind::kRejoin);  // the tail is saved first
  RejoinPlan p = PlanRejoin(v, d.fork_lsn, {{0, 0, 4096}}, 130);
  d = DecideHandshake(h, AfterCut(v, p));
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kFullCopy);
  EXPECT_FALSE(d.copy_resume);
  EXPECT_THAT(d.reason, HasSubstr("only from LSN 110"));
}

TEST(Rejoin, CopyInProgressOrNeverConsistentMeansFullCopy) {
  ReplicaView v = RejoinView();
  v.copy_in_progress = true;
  v.consistent = false;
  v.copy_epoch = 2;
  RejoinPlan p = PlanRejoin(v, 100, {{0, 0, 4096}}, 90);
  EXPECT_FALSE(p.restore);
  EXPECT_TRUE(p.extents.empty());
  HandshakeDecision d = DecideHandshake(RejoinHello(), AfterCut(v, p));
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kFullCopy);
  EXPECT_FALSE(d.copy_resume);  // begun in epoch 2, the primary is in 3

  v = RejoinView();
  v.consistent = false;
  p = PlanRejoin(v, 100, {{0, 0, 4096}}, 90);
  EXPECT_FALSE(p.restore);
  EXPECT_EQ(DecideHandshake(RejoinHello(), AfterCut(v, p)).kind,
            HandshakeDecision::Kind::kFullCopy);
}

TEST(Rejoin, CopyEndBeyondTheForkMeansFullCopy) {
  ReplicaView v = RejoinView();
  v.consistent_at_lsn = 110;  // the volumes hold a copy of records up to 110
  v.consistent_at_epoch = 2;
  RejoinPlan p = PlanRejoin(v, 100, {{0, 0, 4096}}, 130);
  EXPECT_FALSE(p.restore);
  EXPECT_THAT(p.reason, HasSubstr("beyond the fork"));
  v.consistent_at_lsn = 100;
  EXPECT_TRUE(PlanRejoin(v, 100, {{0, 0, 4096}}, 130).restore);
}

TEST(Rejoin, TooManyExtentsMeansFullCopy) {
  std::vector<Extent> many;
  for (uint64_t i = 0; i <= kMaxRestoreExtents; ++i) many.push_back({0, i * 8192, 4096});
  EXPECT_FALSE(PlanRejoin(RejoinView(), 100, many, 130).restore);
  many.pop_back();
  EXPECT_TRUE(PlanRejoin(RejoinView(), 100, many, 130).restore);
}

// Diverged twice: a replica whose restore is pending (it rejoined B, got records of B's epoch)
// meets C, which lost B's last records: it saves and cuts again, and restores the union.
TEST(Rejoin, DivergedTwiceMergesThePendingExtents) {
  ReplicaView v = AfterCut(RejoinView(), PlanRejoin(RejoinView(), 100, {{0, 0, 4096}}, 130));
  v.restore_epoch = 3;
  v.copy_offset = 2048;
  v.history = {{1, 1}, {3, 121}};
  v.last_lsn = 150;  // B's records 101..150 (epoch 3 from 121)
  PrimaryHello c = RejoinHello();
  c.site = "c";
  c.epoch = 5;
  c.history = {{1, 1}, {3, 121}, {5, 141}};  // C had B's records up to 140 only
  c.last_lsn = 170;
  HandshakeDecision d = DecideHandshake(c, v);
  ASSERT_EQ(d.kind, HandshakeDecision::Kind::kRejoin);
  EXPECT_EQ(d.fork_lsn, 140u);
  RejoinPlan p = PlanRejoin(v, d.fork_lsn, {{0, 4096, 4096}, {0, 1 << 19, 4096}}, 100);
  EXPECT_TRUE(p.restore);
  EXPECT_EQ(p.extents, (std::vector<Extent>{{0, 0, 8192}, {0, 1 << 19, 4096}}));
  EXPECT_EQ(p.applied_lsn, 100u);
  d = DecideHandshake(c, AfterCut(v, p));
  EXPECT_EQ(d.kind, HandshakeDecision::Kind::kRestore);
  EXPECT_FALSE(d.copy_resume);  // from the start: C is another epoch
  EXPECT_EQ(d.start_lsn, 141u);
  EXPECT_EQ(d.extents, p.extents);
}

TEST(Rejoin, PrimaryTreatsRestoreAsAResumedCopy) {
  PrimaryGroup g;
  SenderOptions so;
  so.mode = Mode::kSync;
  g.AddPeer("a", so, {}, 0);
  for (uint64_t l = 1; l <= 160; ++l) g.OnLocalAppend(l, 100, l, 0);
  g.OnLocalDurable(160);
  g.OnLocalApplied(160);
  g.OnConnected("a", 0);
  HandshakeDecision d;
  d.kind = HandshakeDecision::Kind::kRestore;
  d.start_lsn = 101;
  d.extents = {{0, 0, 4096}};
  EXPECT_EQ(g.OnDecision("a", d, 160, 0), 101u);
  auto st = g.Status(0);
  EXPECT_TRUE(st[0].copy_pending);
  EXPECT_FALSE(st[0].confirmed);
  EXPECT_EQ(st[0].state, LinkState::kCopying);
  EXPECT_EQ(g.write_released(), 0u);  // a sync peer in a restore holds writes back
  g.OnCopyDone("a", 160, 0);
  g.OnPosition("a", {160, 160, 100, false}, 0);
  EXPECT_TRUE(g.Status(0)[0].confirmed);
  EXPECT_EQ(g.flush_released(), 160u);
}

}  // namespace
}  // namespace tvilling::core
