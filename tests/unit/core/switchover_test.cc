// switchover_test.cc: core::PlanSwitchover, the plan `tvillingctl switchover --dry-run` prints.
#include "agent/core/switchover.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace tvilling::core {
namespace {

using ::testing::HasSubstr;

SwitchoverInput Input() {
  SwitchoverInput in;
  in.group = "g0";
  in.from_site = "site-a";
  in.role = "primary";
  in.epoch = 42;
  in.last_lsn = 1000;
  in.to_site = "site-b";
  in.target = SwitchoverTarget{"sync", "streaming", false, 998, 8 << 20, 0.5, 1000, 4 << 20};
  in.timeout = 30'000'000'000;
  return in;
}

TEST(PlanSwitchover, PossiblePlanWithStepsAndEstimates) {
  const SwitchoverInput in = Input();
  const SwitchoverPlan p = PlanSwitchover(in);
  EXPECT_TRUE(p.possible);
  EXPECT_TRUE(p.refusals.empty());
  ASSERT_EQ(p.steps.size(), 6u);
  EXPECT_THAT(p.steps[0], HasSubstr("pause new writes at site-a (held, not failed)"));
  EXPECT_THAT(p.steps[2], HasSubstr("in one etcd Txn, guarded by the key's current epoch"));
  // 8 MiB at 4 MiB per 1 ms RTT = 2 ms, plus one RTT; the pause adds two RTTs.
  EXPECT_EQ(p.expected_drain, 3'000'000);
  EXPECT_EQ(p.expected_pause, 5'000'000);
  const std::string text = p.Describe(in);
  EXPECT_THAT(text, HasSubstr("switchover of group g0 from site-a (epoch 42) to site-b: dry run"));
  EXPECT_THAT(text, HasSubstr("target site-b: sync, link streaming, durable LSN 998 of 1000, "
                              "lag 8.0 MiB / 0.500 s, rtt 1.0 ms"));
  EXPECT_THAT(text, HasSubstr("expected write pause: about 5.0 ms"));
  EXPECT_THAT(text, HasSubstr("possible now"));
}

TEST(PlanSwitchover, RefusalsSayWhy) {
  SwitchoverInput in = Input();
  in.role = "replica";
  EXPECT_THAT(PlanSwitchover(in).refusals.at(0),
              HasSubstr("site-a) is a replica of group g0: run the switchover on its primary"));
  in = Input();
  in.to_site = "site-a";
  EXPECT_THAT(PlanSwitchover(in).refusals.at(0), HasSubstr("already the primary"));
  in = Input();
  in.to_site = "site-x";
  in.target.reset();
  EXPECT_THAT(PlanSwitchover(in).refusals.at(0), HasSubstr("site-x is not a peer of group g0"));
  in = Input();
  in.target->link_state = "copying";
  in.target->copy_pending = true;
  SwitchoverPlan p = PlanSwitchover(in);
  EXPECT_FALSE(p.possible);
  ASSERT_EQ(p.refusals.size(), 2u);
  EXPECT_THAT(p.refusals[0], HasSubstr("link is copying"));
  EXPECT_THAT(p.refusals[1], HasSubstr("full copy pending"));
  EXPECT_THAT(p.Describe(in), HasSubstr("refused:\n    - site-b's link is copying"));
  in = Input();
  in.target->lag_bytes = 64ull << 30;  // 64 GiB at 4 GiB/s: 16 s
  in.timeout = 10'000'000'000;
  p = PlanSwitchover(in);
  EXPECT_FALSE(p.possible);
  EXPECT_THAT(p.refusals.at(0), HasSubstr("more than the timeout of 10.0 s"));
}

}  // namespace
}  // namespace tvilling::core
