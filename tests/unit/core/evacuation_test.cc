// evacuation_test.cc: core::OrderEvacuation and core::Evacuation, the decisions of
// `tvillingctl switchover --all-groups`: order, concurrency, and the one abort.
#include "agent/core/evacuation.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace tvilling::core {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

std::vector<EvacuationCandidate> Groups() {
  return {{"g2", "primary", true},
          {"g0", "primary", true},
          {"g1", "replica", true},
          {"g3", "primary", false},
          {"g4", "primary", true}};
}

TEST(OrderEvacuation, PrimariesInNameOrderWithoutOrder) {
  const EvacuationOrder o = OrderEvacuation(Groups(), "site-a", "site-b", {});
  EXPECT_THAT(o.errors, IsEmpty());
  EXPECT_THAT(o.groups, ElementsAre("g0", "g2", "g4"));
  EXPECT_THAT(o.skipped, ElementsAre("g1: site site-a is its replica, not its primary",
                                     "g3: site-b is not one of its peers"));
}

TEST(OrderEvacuation, ListedGroupsFirstThenTheRest) {
  const EvacuationOrder o = OrderEvacuation(Groups(), "site-a", "site-b", {"g4", "g1", "g2"});
  EXPECT_THAT(o.errors, IsEmpty());
  EXPECT_THAT(o.groups, ElementsAre("g4", "g2", "g0"));
  ASSERT_EQ(o.skipped.size(), 2u);
  EXPECT_THAT(o.skipped[0], HasSubstr("g1: site site-a is its replica"));
}

TEST(OrderEvacuation, UnknownOrRepeatedNameIsAnError) {
  const EvacuationOrder o = OrderEvacuation(Groups(), "site-a", "site-b", {"g0", "gx", "g0"});
  EXPECT_THAT(o.groups, IsEmpty());
  ASSERT_EQ(o.errors.size(), 2u);
  EXPECT_EQ(o.errors[0],
            "--order names group \"gx\", which site site-a does not have (it has: g0, g1, g2, g3, "
            "g4)");
  EXPECT_EQ(o.errors[1], "--order names group \"g0\" twice");
}

TEST(Evacuation, OneAtATimeInOrder) {
  Evacuation e({"g0", "g1", "g2"}, 1);
  EXPECT_THAT(e.NextToStart(), ElementsAre("g0"));
  EXPECT_THAT(e.NextToStart(), IsEmpty());  // the slot is taken
  EXPECT_FALSE(e.Done());
  e.OnFinished("g0", EvacuationState::kMoved, "site-b is the primary");
  EXPECT_THAT(e.NextToStart(), ElementsAre("g1"));
  e.OnFinished("g1", EvacuationState::kMoved, "");
  EXPECT_THAT(e.NextToStart(), ElementsAre("g2"));
  EXPECT_FALSE(e.Done());
  e.OnFinished("g2", EvacuationState::kMoved, "");
  EXPECT_THAT(e.NextToStart(), IsEmpty());
  EXPECT_TRUE(e.Done());
  EXPECT_TRUE(e.Succeeded());
  EXPECT_FALSE(e.aborted());
  EXPECT_THAT(e.Report("site-a", "site-b"),
              HasSubstr("  g0: moved: site-b is the primary\n  g1: moved\n  g2: moved\n"
                        "evacuation of site-a to site-b: 3 of 3 groups moved\n"));
}

TEST(Evacuation, ConcurrencyFillsFreedSlots) {
  Evacuation e({"g0", "g1", "g2", "g3"}, 2);
  EXPECT_THAT(e.NextToStart(), ElementsAre("g0", "g1"));
  EXPECT_EQ(e.running(), 2u);
  e.OnFinished("g1", EvacuationState::kMoved, "");
  EXPECT_THAT(e.NextToStart(), ElementsAre("g2"));
  e.OnFinished("g0", EvacuationState::kMoved, "");
  e.OnFinished("g2", EvacuationState::kMoved, "");
  EXPECT_THAT(e.NextToStart(), ElementsAre("g3"));
  e.OnFinished("g3", EvacuationState::kMoved, "");
  EXPECT_TRUE(e.Done());
  EXPECT_TRUE(e.Succeeded());
}

TEST(Evacuation, FirstRollBackStopsNewStartsAndWaitsForTheRunning) {
  Evacuation e({"g0", "g1", "g2", "g3"}, 2);
  EXPECT_THAT(e.NextToStart(), ElementsAre("g0", "g1"));
  e.OnFinished("g0", EvacuationState::kRolledBack, "site-b did not catch up within 1500 ms");
  EXPECT_TRUE(e.aborted());
  EXPECT_EQ(e.abort_reason(), "group g0 rolled back");
  EXPECT_THAT(e.NextToStart(), IsEmpty());
  EXPECT_FALSE(e.Done());  // g1 still runs
  e.OnFinished("g1", EvacuationState::kFailed, "later failure");
  EXPECT_EQ(e.abort_reason(), "group g0 rolled back");  // the first failure stays the reason
  EXPECT_THAT(e.NextToStart(), IsEmpty());
  EXPECT_TRUE(e.Done());
  EXPECT_FALSE(e.Succeeded());
  EXPECT_EQ(e.Report("site-a", "site-b"),
            "  g0: rolled back: site-b did not catch up within 1500 ms\n"
            "  g1: failed: later failure\n"
            "  g2: not started\n"
            "  g3: not started\n"
            "evacuation of site-a to site-b: 0 of 4 groups moved; aborted: group g0 rolled "
            "back\n");
}

TEST(Evacuation, InterruptLetsTheRunningFinish) {
  Evacuation e({"g0", "g1", "g2"}, 1);
  EXPECT_THAT(e.NextToStart(), ElementsAre("g0"));
  e.Abort("interrupted (SIGINT)");
  EXPECT_FALSE(e.Done());
  EXPECT_THAT(e.NextToStart(), IsEmpty());
  e.OnFinished("g0", EvacuationState::kMoved, "");
  EXPECT_TRUE(e.Done());
  EXPECT_FALSE(e.Succeeded());
  EXPECT_EQ(e.entries()[0].state, EvacuationState::kMoved);
  EXPECT_EQ(e.entries()[1].state, EvacuationState::kNotStarted);
  EXPECT_THAT(e.Report("site-a", "site-b"),
              HasSubstr("1 of 3 groups moved; aborted: interrupted (SIGINT)"));
}

TEST(Evacuation, ResultForAGroupNotRunningIsIgnoredAndUnfinishedStatesCountAsFailed) {
  Evacuation e({"g0", "g1"}, 1);
  e.OnFinished("g1", EvacuationState::kMoved, "");  // never started: ignored
  EXPECT_EQ(e.entries()[1].state, EvacuationState::kNotStarted);
  EXPECT_THAT(e.NextToStart(), ElementsAre("g0"));
  e.OnFinished("g0", EvacuationState::kRunning, "bogus");
  EXPECT_EQ(e.entries()[0].state, EvacuationState::kFailed);
  EXPECT_TRUE(e.aborted());
  EXPECT_TRUE(e.Done());
}

TEST(Evacuation, NothingToMoveIsDoneAndSucceeds) {
  Evacuation e({}, 3);
  EXPECT_THAT(e.NextToStart(), IsEmpty());
  EXPECT_TRUE(e.Done());
  EXPECT_TRUE(e.Succeeded());
  EXPECT_EQ(e.Report("site-a", "site-b"), "evacuation of site-a to site-b: 0 of 0 groups moved\n");
}

}  // namespace
}  // namespace tvilling::core
