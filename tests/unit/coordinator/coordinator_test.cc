// coordinator_test.cc: the coordinator's etcd key layout and the encoding of the reports it
// publishes (docs/coordinator.md, "Keys in etcd"); a report that does not parse is ignored, never
// half-read.
#include "agent/coordinator/coordinator.h"

#include <gtest/gtest.h>

namespace tvilling::coordinator {
namespace {

TEST(CoordinatorKeys, Layout) {
  EXPECT_EQ(LeaderKey("/tvilling", "g0"), "/tvilling/groups/g0/leader");
  EXPECT_EQ(SitesPrefix("/tvilling", "g0"), "/tvilling/groups/g0/sites/");
  EXPECT_EQ(PrimaryKey("/p", "db"), "/p/groups/db/primary");
  EXPECT_EQ(PendingKey("/p", "db"), "/p/groups/db/pending");
  EXPECT_EQ(PrefixEnd(SitesPrefix("/t", "g")), "/t/groups/g/sites0");
}

TEST(CoordinatorReports, SiteReportRoundTripAndGarbage) {
  core::SiteReport r{12345, true, false};
  const std::string v = EncodeSiteReport(r);
  EXPECT_EQ(v, "durable=12345 consistent=1 no_failover=0 promotion_failed=0");
  auto back = DecodeSiteReport(v);
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->durable_lsn, 12345u);
  EXPECT_TRUE(back->consistent);
  EXPECT_FALSE(back->no_failover);
  EXPECT_FALSE(back->promotion_failed);
  r.promotion_failed = true;
  back = DecodeSiteReport(EncodeSiteReport(r));
  ASSERT_TRUE(back.has_value());
  EXPECT_TRUE(back->promotion_failed);
  // An older agent's report (no promotion_failed) still reads.
  back = DecodeSiteReport("durable=7 consistent=1 no_failover=1");
  ASSERT_TRUE(back.has_value());
  EXPECT_TRUE(back->no_failover);
  EXPECT_FALSE(back->promotion_failed);
  EXPECT_FALSE(DecodeSiteReport("durable=7 consistent=1 no_failover=0 promotion_failed=x"));
  EXPECT_FALSE(DecodeSiteReport("").has_value());
  EXPECT_FALSE(DecodeSiteReport("durable=12x consistent=1 no_failover=0").has_value());
  EXPECT_FALSE(DecodeSiteReport("durable=1 consistent=1").has_value());
}

TEST(CoordinatorReports, PrimaryReportRoundTripAndGarbage) {
  core::PrimaryReport r;
  r.site = "site-a";
  r.epoch = 42;
  r.last_lsn = 1000;
  r.peers["site-b"] = {990, 40960, 2'500'000'000};
  r.peers["site-c"] = {1000, 0, 0};
  const std::string v = EncodePrimaryReport(r);
  EXPECT_EQ(v, "site=site-a epoch=42 last=1000 peer.site-b=990,40960,2500 peer.site-c=1000,0,0");
  auto back = DecodePrimaryReport(v);
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->site, "site-a");
  EXPECT_EQ(back->epoch, 42u);
  EXPECT_EQ(back->last_lsn, 1000u);
  ASSERT_EQ(back->peers.size(), 2u);
  EXPECT_EQ(back->peers["site-b"].lsn, 990u);
  EXPECT_EQ(back->peers["site-b"].bytes, 40960u);
  EXPECT_EQ(back->peers["site-b"].age, 2'500'000'000);
  EXPECT_FALSE(DecodePrimaryReport("epoch=1 last=2").has_value());
  EXPECT_FALSE(DecodePrimaryReport("site=a epoch=1 last=2 peer.b=1,2").has_value());
  EXPECT_FALSE(DecodePrimaryReport("site=a epoch=1 last=2 peer.b=1,2,x").has_value());
}

TEST(CoordinatorReports, SyncSetRoundTripAndGarbage) {
  EXPECT_EQ(SyncKey("/tvilling", "g1"), "/tvilling/groups/g1/sync");
  core::PublishedSyncSet s{"site-a", 145, core::SyncSet{{"site-b", "site-c"}, 1000}};
  const std::string v = EncodeSyncSet(s);
  EXPECT_EQ(v, "site=site-a epoch=145 members=site-b,site-c floor=1000");
  auto back = DecodeSyncSet(v);
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->site, "site-a");
  EXPECT_EQ(back->epoch, 145u);
  EXPECT_EQ(back->set, s.set);
  // No member.
  s.set.members.clear();
  EXPECT_EQ(EncodeSyncSet(s), "site=site-a epoch=145 members= floor=1000");
  back = DecodeSyncSet(EncodeSyncSet(s));
  ASSERT_TRUE(back.has_value());
  EXPECT_TRUE(back->set.members.empty());
  EXPECT_FALSE(DecodeSyncSet("site=a epoch=1 floor=2").has_value()) << "members missing";
  EXPECT_FALSE(DecodeSyncSet("site=a epoch=1 members=b,,c floor=2").has_value());
  EXPECT_FALSE(DecodeSyncSet("site=a epoch=1 members=c,b floor=2").has_value()) << "unsorted";
  EXPECT_FALSE(DecodeSyncSet("site=a epoch=x members=b floor=2").has_value());
}

}  // namespace
}  // namespace tvilling::coordinator
