// failover_test.cc: unit tests of core::FailoverMachine and core::ChooseCandidate (the fail-over
// rules of docs/coordinator.md), and a seeded simulation of several sites, an etcd with leases
// that may be extended, and delayed or lost keep-alives, checking that no two sites ever complete
// I/O as primary at the same time.
#include "agent/core/failover.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <functional>
#include <random>

#include "tests/unit/core/units.h"

namespace tvilling::core {
namespace {

using ::testing::HasSubstr;
using K = FailoverAction::Kind;
using S = FailoverMachine::State;

FailoverOptions Opts(std::string site, FailoverPolicy policy = FailoverPolicy::kAutomatic) {
  FailoverOptions o;
  o.group = "g";
  o.site = std::move(site);
  o.sites = {"a", "b", "c"};
  o.configured_primary = "a";
  o.policy = policy;
  o.lease_ttl = 3 * kS;
  o.suspend_after = 1500 * kMs;
  o.max_lag_bytes = 1 << 20;
  o.max_lag_time = 10 * kS;
  o.anti_flap = 60 * kS;
  o.settle = 1 * kS;
  return o;
}

std::vector<K> Kinds(const std::vector<FailoverAction>& a) {
  std::vector<K> k;
  for (const auto& x : a) k.push_back(x.kind);
  return k;
}

bool Has(const std::vector<FailoverAction>& a, K k) {
  for (const auto& x : a) {
    if (x.kind == k) return true;
  }
  return false;
}

const FailoverAction* Find(const std::vector<FailoverAction>& a, K k) {
  for (const auto& x : a) {
    if (x.kind == k) return &x;
  }
  return nullptr;
}

LeaderView Leader(std::string site, uint64_t epoch, int64_t lease) {
  return LeaderView{true, std::move(site), epoch, lease};
}

PrimaryReport Report(std::string site, uint64_t last, std::map<std::string, PeerLag> peers = {}) {
  return PrimaryReport{std::move(site), 7, last, std::move(peers)};
}

// A machine started with a session (lease 100 + index) and the given view of etcd.
struct Fixture {
  FailoverMachine m;
  int64_t lease;
  explicit Fixture(FailoverOptions o, int64_t lease_id = 100) : m(std::move(o)), lease(lease_id) {}
  std::vector<FailoverAction> Start(Nanos now, std::optional<PrimaryReport> report,
                                    LeaderView leader) {
    std::vector<FailoverAction> all;
    auto add = [&](std::vector<FailoverAction> a) { all.insert(all.end(), a.begin(), a.end()); };
    add(m.Handle(now, EvSessionStarted{lease, now}));
    add(m.Handle(now, EvPrimaryReport{std::move(report)}));
    add(m.Handle(now, EvLeader{std::move(leader)}));
    return all;
  }
};

TEST(FailoverBootstrap, ConfiguredPrimaryCampaignsForANewGroupReplicasDoNot) {
  Fixture a(Opts("a"), 101);
  auto acts = a.Start(0, std::nullopt, LeaderView{});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kCampaign));
  EXPECT_EQ(a.m.state(), S::kCampaigning);
  // Won: primary in the key's create revision, I/O on.
  acts = a.m.Handle(10 * kMs, EvCampaignDone{true, Leader("a", 42, 101)});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kPromote, K::kResumeIo));
  EXPECT_EQ(acts[0].epoch, 42u);
  EXPECT_EQ(a.m.state(), S::kPrimary);
  EXPECT_EQ(a.m.epoch(), 42u);

  Fixture b(Opts("b"), 102);
  acts = b.Start(0, std::nullopt, LeaderView{});
  EXPECT_TRUE(acts.empty());
  EXPECT_TRUE(b.m.Handle(0, EvSites{{{"b", {0, true, false}}, {"c", {0, true, false}}}}).empty());
  EXPECT_EQ(b.m.state(), S::kLeaderless);
  // Long after: still nothing (no primary ever reported, so no lag is known): refused, said why.
  acts = b.m.Handle(5 * kS, EvTick{});
  ASSERT_TRUE(Has(acts, K::kRefused));
  EXPECT_THAT(Find(acts, K::kRefused)->message, HasSubstr("no report from a primary"));
  EXPECT_FALSE(Has(acts, K::kCampaign));
  // a takes the key: b follows it.
  acts = b.m.Handle(6 * kS, EvLeader{Leader("a", 42, 101)});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kFollow));
  EXPECT_EQ(acts[0].site, "a");
  EXPECT_EQ(acts[0].epoch, 42u);
  EXPECT_EQ(b.m.state(), S::kReplica);
  // The same view again is no news.
  EXPECT_TRUE(b.m.Handle(7 * kS, EvLeader{Leader("a", 42, 101)}).empty());
}

TEST(FailoverBootstrap, LostCampaignFollowsTheWinner) {
  Fixture a(Opts("a"), 101);
  a.Start(0, std::nullopt, LeaderView{});
  auto acts = a.m.Handle(1 * kMs, EvCampaignDone{false, Leader("b", 50, 102)});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kFollow));
  EXPECT_EQ(a.m.state(), S::kReplica);
}

TEST(FailoverBootstrap, LastPrimaryTakesItsKeyBackAtOnceWhateverThePolicy) {
  for (auto policy :
       {FailoverPolicy::kAutomatic, FailoverPolicy::kManual, FailoverPolicy::kApprove}) {
    Fixture b(Opts("b", policy), 102);
    auto acts = b.Start(0, Report("b", 500), LeaderView{});
    EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kCampaign)) << FailoverPolicyName(policy);
  }
  // The configured primary does NOT bootstrap a group whose last primary was another site.
  Fixture a(Opts("a"), 101);
  auto acts = a.Start(0, Report("b", 500), LeaderView{});
  EXPECT_FALSE(Has(acts, K::kCampaign));
}

TEST(FailoverBootstrap, OwnKeyFromAnEarlierRunIsNotOurs) {
  Fixture a(Opts("a"), 101);
  // The key names us but under another lease (the agent restarted): wait for it to expire.
  auto acts = a.Start(0, Report("a", 10), Leader("a", 40, 77));
  EXPECT_TRUE(acts.empty());
  EXPECT_EQ(a.m.state(), S::kReplica);
  acts = a.m.Handle(3 * kS, EvLeader{LeaderView{}});
  EXPECT_TRUE(acts.empty()) << "the report it holds was read before the key vanished";
  // The coordinator reads the reports as it sees the key vanish: still the last primary.
  acts = a.m.Handle(3 * kS + 5 * kMs, EvPrimaryReport{Report("a", 10)});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kCampaign));
}

// A primary at t=0 with a fresh lease; returns the fixture.
Fixture Primary(Nanos t0 = 0) {
  Fixture a(Opts("a"), 101);
  a.Start(t0, std::nullopt, LeaderView{});
  a.m.Handle(t0, EvCampaignDone{true, Leader("a", 42, 101)});
  EXPECT_EQ(a.m.state(), S::kPrimary);
  return a;
}

TEST(FailoverLease, PrimarySuspendsOnItsOwnClockBeforeTheLeaseCanEnd) {
  Fixture a = Primary();
  // Renewals keep it going; the deadline follows the SEND time of the last answered keep-alive.
  EXPECT_TRUE(a.m.Handle(500 * kMs, EvSessionRenewed{400 * kMs}).empty());
  EXPECT_EQ(a.m.suspend_deadline(), 1900 * kMs);
  EXPECT_TRUE(a.m.Handle(1899 * kMs, EvTick{}).empty());
  auto acts = a.m.Handle(1900 * kMs, EvTick{});
  ASSERT_THAT(Kinds(acts), ::testing::ElementsAre(K::kSuspendIo));
  EXPECT_THAT(acts[0].message, HasSubstr("not renewed for 1500 ms"));
  EXPECT_EQ(a.m.state(), S::kSuspended);
  // Strictly before the lease could end at etcd (sent + TTL).
  EXPECT_LT(a.m.suspend_deadline(), 400 * kMs + 3 * kS);
  // Further ticks do not repeat it.
  EXPECT_TRUE(a.m.Handle(2500 * kMs, EvTick{}).empty());
}

TEST(FailoverLease, OldRenewalAnsweredLateDoesNotMoveTheDeadline) {
  Fixture a = Primary();
  a.m.Handle(500 * kMs, EvSessionRenewed{400 * kMs});
  // An answer to a keep-alive sent earlier (reordered) must not pull the deadline back or forward.
  a.m.Handle(600 * kMs, EvSessionRenewed{100 * kMs});
  EXPECT_EQ(a.m.suspend_deadline(), 1900 * kMs);
}

TEST(FailoverLease, ResumesOnlyAfterRenewalAndConfirmedKey) {
  Fixture a = Primary();
  a.m.Handle(2 * kS, EvTick{});
  ASSERT_EQ(a.m.state(), S::kSuspended);
  // A renewal: the lease lives, but the key must be read before I/O resumes.
  auto acts = a.m.Handle(2100 * kMs, EvSessionRenewed{2000 * kMs});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kReadLeader));
  EXPECT_EQ(a.m.state(), S::kSuspended);
  acts = a.m.Handle(2150 * kMs, EvLeader{Leader("a", 42, 101)});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kResumeIo));
  EXPECT_EQ(a.m.state(), S::kPrimary);
}

TEST(FailoverLease, ConfirmationTooLateStaysSuspended) {
  Fixture a = Primary();
  a.m.Handle(2 * kS, EvTick{});
  a.m.Handle(2100 * kMs, EvSessionRenewed{2000 * kMs});
  // The read answer comes after the renewal's own deadline (2000 + 1500 ms): no resume.
  auto acts = a.m.Handle(3600 * kMs, EvLeader{Leader("a", 42, 101)});
  EXPECT_FALSE(Has(acts, K::kResumeIo));
  EXPECT_EQ(a.m.state(), S::kSuspended);
}

TEST(FailoverLease, SuspendedPrimaryThatFindsAnotherLeaderDemotes) {
  Fixture a = Primary();
  a.m.Handle(2 * kS, EvTick{});
  auto acts = a.m.Handle(5 * kS, EvLeader{Leader("b", 60, 102)});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kDemote, K::kFollow));
  EXPECT_EQ(acts[0].site, "b");
  EXPECT_EQ(a.m.state(), S::kReplica);
  EXPECT_EQ(a.m.epoch(), 0u);
}

TEST(FailoverLease, LeaseLostOrKeyDeletedDemotesAtOnce) {
  {
    Fixture a = Primary();
    auto acts = a.m.Handle(100 * kMs, EvSessionLost{});
    EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kSuspendIo, K::kDemote, K::kNewSession));
    EXPECT_EQ(a.m.state(), S::kStarting);
  }
  {
    Fixture a = Primary();
    auto acts = a.m.Handle(100 * kMs, EvLeader{LeaderView{}});
    EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kSuspendIo, K::kDemote))
        << "deleted key: suspend and demote";
    acts = a.m.Handle(105 * kMs, EvPrimaryReport{Report("a", 10)});
    EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kCampaign))
        << "as the last primary (in a report read since) it may campaign again";
  }
  {
    Fixture a = Primary();
    auto acts = a.m.Handle(100 * kMs, EvLeader{Leader("c", 70, 103)});
    EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kSuspendIo, K::kDemote, K::kFollow));
  }
}

// Found by tests/sim/failover_sim.cc (seed 2321 --mixed): a, primary, was cut off from etcd and
// suspended its I/O; b was promoted, completed writes in sync mode with c, and was lost in turn.
// a then saw the key vanish while it still held its own primary report from before b's reign. It
// took the key back as "the last primary" and lost those writes. It must decide on reports read
// after the key vanished, in its current session.
TEST(FailoverBootstrap, AReportReadBeforeTheKeyVanishedDoesNotMakeTheLastPrimary) {
  Fixture a = Primary();
  a.m.Handle(200 * kMs, EvPrimaryReport{Report("a", 160)});
  ASSERT_TRUE(Has(a.m.Handle(2 * kS, EvTick{}), K::kSuspendIo)) << "cut off: no renewal";
  // (b reigns and is lost; a sees none of it.) The key's deletion reaches a:
  auto acts = a.m.Handle(10 * kS, EvLeader{LeaderView{}});
  EXPECT_TRUE(Has(acts, K::kDemote));
  EXPECT_FALSE(Has(acts, K::kCampaign)) << "on its own report, read before b's reign";
  // Its lease is gone too; in a new session the old reads count for nothing either.
  EXPECT_TRUE(Has(a.m.Handle(10 * kS, EvSessionLost{}), K::kNewSession));
  EXPECT_FALSE(Has(a.m.Handle(11 * kS, EvSessionStarted{111, 11 * kS}), K::kCampaign));
  EXPECT_FALSE(Has(a.m.Handle(11 * kS, EvLeader{LeaderView{}}), K::kCampaign));
  // What the new session reads: b's sync set {c} and b's report; c is down (no site report). a
  // is not eligible: only an operator may promote it, knowing what it lacks.
  const PrimaryReport b_report{"b", 60, 410, {{"a", {160, 1 << 20, kS}}, {"c", {407, 12288, 0}}}};
  const std::map<std::string, SiteReport> sites = {{"a", {160, true, false}}};
  for (Nanos t : {11 * kS, 13 * kS, 80 * kS}) {
    EXPECT_FALSE(Has(a.m.Handle(t, EvSyncSet{PublishedSyncSet{"b", 60, SyncSet{{"c"}, 160}}}),
                     K::kCampaign));
    EXPECT_FALSE(Has(a.m.Handle(t, EvSites{sites}), K::kCampaign));
    acts = a.m.Handle(t, EvPrimaryReport{b_report});
    EXPECT_FALSE(Has(acts, K::kCampaign)) << t / kS << " s";
    EXPECT_FALSE(Has(a.m.Handle(t, EvTick{}), K::kCampaign)) << t / kS << " s";
  }
  EXPECT_THAT(a.m.last_refusal(), HasSubstr("not in the sync set {c} floor 160"));
  EXPECT_EQ(a.m.state(), S::kAwaitingApproval);
}

// Found by tests/sim/failover_sim.cc (seed 216 --mixed --promotion-failures): c was the last
// primary to publish a report (epoch 91); b was promoted after it (epoch 195), published its
// sync set {a}, completed writes in sync mode, and was lost before its first report. c, reading
// its own report as the last one, took the key back and lost those writes. A newer epoch seen
// anywhere (b's key, b's sync set) means the report is not the last word.
TEST(FailoverBootstrap, ANewerPrimaryThanTheReportsMakesItNotTheLastWord) {
  const PrimaryReport c_report{"c", 91, 1651, {{"a", {1600, 1 << 20, kS}}, {"b", {1649, 0, 0}}}};
  const PublishedSyncSet b_set{"b", 195, SyncSet{{"a"}, 1695}};
  for (bool saw_key : {true, false}) {
    SCOPED_TRACE(saw_key ? "c followed b" : "c only read b's sync set");
    Fixture c(Opts("c"), 103);
    // (Without seeing b's key: c's own key from an earlier run is still there at the start.)
    c.Start(0, c_report, saw_key ? Leader("b", 195, 102) : Leader("c", 91, 77));
    if (!saw_key) c.m.Handle(0, EvSyncSet{b_set});
    auto acts = c.m.Handle(10 * kS, EvLeader{LeaderView{}});
    EXPECT_FALSE(Has(acts, K::kCampaign));
    // The reports read after the key vanished: still c's report, and b's set.
    EXPECT_FALSE(Has(c.m.Handle(10 * kS, EvSyncSet{b_set}), K::kCampaign));
    EXPECT_FALSE(Has(c.m.Handle(10 * kS, EvSites{{{"c", {1695, true, false}}}}), K::kCampaign));
    EXPECT_FALSE(Has(c.m.Handle(10 * kS, EvPrimaryReport{c_report}), K::kCampaign))
        << "not the last primary: b came after it";
    EXPECT_NE(c.m.state(), S::kCampaigning);
  }
  // Without the newer epoch, c is the last primary and takes its key back.
  Fixture c(Opts("c"), 103);
  c.Start(0, c_report, Leader("c", 91, 77));
  c.m.Handle(10 * kS, EvLeader{LeaderView{}});
  EXPECT_TRUE(Has(c.m.Handle(10 * kS, EvPrimaryReport{c_report}), K::kCampaign));
}

// Found by tests/sim/failover_sim.cc (seed 3348 --mixed --promotion-failures, once its sites read
// the key on every new session): a read answered before a watch event but handled after it
// must not undo what the event said. The coordinator handles reads on its worker thread and
// watch events on the watcher's; each view carries the store revision it is as of.
TEST(FailoverLeaderViews, AViewOlderThanOneHandledIsIgnored) {
  {
    // The primary's key is deleted and b takes one (watch); then a read from before both
    // arrives, showing a's own key: a must not promote in it again.
    Fixture a(Opts("a"), 101);
    a.Start(0, std::nullopt, LeaderView{});
    a.m.Handle(10 * kMs, EvCampaignDone{true, Leader("a", 42, 101), 42});
    ASSERT_EQ(a.m.state(), S::kPrimary);
    auto acts = a.m.Handle(1 * kS, EvLeader{LeaderView{}, 50});
    EXPECT_TRUE(Has(acts, K::kDemote));
    acts = a.m.Handle(1 * kS, EvLeader{Leader("b", 51, 102), 51});
    EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kFollow));
    acts = a.m.Handle(1100 * kMs, EvLeader{Leader("a", 42, 101), 45});
    EXPECT_TRUE(acts.empty()) << "a stale read of its own key";
    EXPECT_EQ(a.m.state(), S::kReplica);
  }
  {
    // A campaign's answer overtaken by the watch: the key the campaign won was deleted since.
    Fixture a(Opts("a"), 101);
    ASSERT_THAT(Kinds(a.Start(0, std::nullopt, LeaderView{})),
                ::testing::ElementsAre(K::kCampaign));
    a.m.Handle(20 * kMs, EvLeader{Leader("a", 42, 101), 42});
    ASSERT_EQ(a.m.state(), S::kPrimary);
    a.m.Handle(30 * kMs, EvLeader{LeaderView{}, 44});
    auto acts = a.m.Handle(40 * kMs, EvCampaignDone{true, Leader("a", 42, 101), 42});
    EXPECT_FALSE(Has(acts, K::kPromote));
    EXPECT_NE(a.m.state(), S::kPrimary);
  }
  {
    // A replica: the key vanished (watch), then a stale read shows it again: still leaderless.
    Fixture b(Opts("b"), 102);
    b.Start(0, Report("a", 500), Leader("a", 42, 101));
    b.m.Handle(0, EvLeader{Leader("a", 42, 101), 43});
    b.m.Handle(1 * kS, EvLeader{LeaderView{}, 60});
    EXPECT_EQ(b.m.state(), S::kLeaderless);
    EXPECT_TRUE(b.m.Handle(1 * kS, EvLeader{Leader("a", 42, 101), 55}).empty());
    EXPECT_EQ(b.m.state(), S::kLeaderless);
    // Views without a revision (0) are taken as they come.
    EXPECT_THAT(Kinds(b.m.Handle(2 * kS, EvLeader{Leader("c", 70, 103)})),
                ::testing::ElementsAre(K::kFollow));
  }
}

// A replica b of primary a, with reports from all three sites; a then vanishes.
struct Replica {
  Fixture f;
  std::map<std::string, SiteReport> sites;
  PrimaryReport report;
  explicit Replica(std::string /*site*/, FailoverOptions o, int64_t lease,
                   std::map<std::string, SiteReport> s, PrimaryReport r)
      : f(std::move(o), lease), sites(std::move(s)), report(std::move(r)) {
    f.Start(0, report, Leader("a", 42, 101));
    f.m.Handle(0, EvSites{sites});
  }
  std::vector<FailoverAction> LoseLeader(Nanos at) {
    return f.m.Handle(at, EvLeader{LeaderView{}});
  }
  // The coordinator's read of the reports: the site reports, then the primary report.
  std::vector<FailoverAction> Read(Nanos at, std::map<std::string, SiteReport> s) {
    sites = std::move(s);
    std::vector<FailoverAction> all = f.m.Handle(at, EvSites{sites});
    std::vector<FailoverAction> p = f.m.Handle(at, EvPrimaryReport{report});
    all.insert(all.end(), p.begin(), p.end());
    return all;
  }
  // What the coordinator does every second: read the reports again, then tick.
  std::vector<FailoverAction> Tick(Nanos at) {
    std::vector<FailoverAction> all = Read(at, sites);
    std::vector<FailoverAction> t = f.m.Handle(at, EvTick{});
    all.insert(all.end(), t.begin(), t.end());
    return all;
  }
};

std::map<std::string, SiteReport> Sites(uint64_t b_durable, uint64_t c_durable) {
  return {{"b", {b_durable, true, false}}, {"c", {c_durable, true, false}}};
}

PrimaryReport ReportFor(uint64_t last, PeerLag b, PeerLag c) {
  return Report("a", last, {{"b", b}, {"c", c}});
}

TEST(FailoverAutomatic, MostAdvancedEligibleReplicaCampaignsAfterSettling) {
  auto report = ReportFor(100, {95, 5000, 2 * kS}, {90, 10000, 3 * kS});
  Replica b("b", Opts("b"), 102, Sites(95, 90), report);
  Replica c("c", Opts("c"), 103, Sites(95, 90), report);
  const Nanos t = 100 * kS;  // well past anti-flapping
  EXPECT_TRUE(b.LoseLeader(t).empty());
  EXPECT_TRUE(c.LoseLeader(t).empty());
  EXPECT_TRUE(b.Tick(t + 999 * kMs).empty());
  auto acts = b.Tick(t + 1 * kS);
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kCampaign));
  EXPECT_TRUE(c.Tick(t + 1 * kS).empty()) << "c is behind b: it does not run";
  // b wins: promote in the new key's epoch (its lease was renewed meanwhile).
  b.f.m.Handle(t + 1050 * kMs, EvSessionRenewed{t + 1000 * kMs});
  acts = b.f.m.Handle(t + 1100 * kMs, EvCampaignDone{true, Leader("b", 80, 102)});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kPromote, K::kResumeIo));
  EXPECT_EQ(acts[0].epoch, 80u);
  acts = c.f.m.Handle(t + 1100 * kMs, EvLeader{Leader("b", 80, 102)});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kFollow));
  EXPECT_EQ(acts[0].site, "b");
}

// Found by tests/sim/failover_sim.cc (seed 1556 --mixed): c, cut off from etcd, last read the site
// reports when b had no session; it must not choose from that old view once the key vanishes.
TEST(FailoverAutomatic, DecidesOnlyOnSiteReportsReadAfterSettling) {
  auto report = ReportFor(100, {100, 0, 0}, {90, 4096, kS});
  Replica c("c", Opts("c"), 103, {{"c", {90, true, false}}}, report);  // b has no report yet
  const Nanos t = 100 * kS;
  EXPECT_TRUE(c.LoseLeader(t).empty());
  // Settled, but the reports it holds were read before: it waits for a fresh read.
  EXPECT_TRUE(c.f.m.Handle(t + 1 * kS, EvTick{}).empty());
  EXPECT_TRUE(c.f.m.Handle(t + 5 * kS, EvTick{}).empty());
  EXPECT_EQ(c.f.m.state(), S::kLeaderless);
  // The fresh read shows b, more advanced: c does not run.
  EXPECT_TRUE(c.Read(t + 5100 * kMs, Sites(100, 90)).empty());
  EXPECT_EQ(c.f.m.state(), S::kLeaderless);
  // Had the fresh read shown c alone, c would run.
  Replica c2("c", Opts("c"), 103, {{"c", {90, true, false}}}, report);
  c2.LoseLeader(t);
  EXPECT_TRUE(c2.f.m.Handle(t + 2 * kS, EvTick{}).empty());
  EXPECT_THAT(Kinds(c2.Read(t + 2100 * kMs, {{"c", {90, true, false}}})),
              ::testing::ElementsAre(K::kCampaign));
}

TEST(ChooseCandidate, LagGateEligibilityTiesAndLossBound) {
  FailoverOptions o = Opts("b");
  o.sites = {"a", "b", "c", "d"};
  auto report = Report("a", 1000,
                       {{"b", {990, 2 << 20, 1 * kS}},  // over the byte gate
                        {"c", {980, 4096, 20 * kS}},    // over the time gate
                        {"d", {970, 8192, 2 * kS}}});
  std::map<std::string, SiteReport> sites{
      {"b", {990, true, false}}, {"c", {980, true, false}}, {"d", {970, true, false}}};
  CandidatePlan p = ChooseCandidate(o, sites, report);
  EXPECT_EQ(p.winner, "d");
  EXPECT_EQ(p.loss.from_lsn, 971u);
  EXPECT_EQ(p.loss.to_lsn, 1000u);
  EXPECT_EQ(p.loss.bytes, 8192u);
  EXPECT_EQ(p.loss.age, 2 * kS);
  EXPECT_THAT(p.refused.at("b"), HasSubstr("exceeds the gate"));
  EXPECT_THAT(p.refused.at("c"), HasSubstr("exceeds the gate"));
  EXPECT_THAT(p.refused.at("a"), HasSubstr("no report"));
  EXPECT_THAT(p.Describe(), HasSubstr("promote d (loses LSN 971..1000, 8192 bytes, 2.0 s"));

  // A replica that caught up since the report is in, whatever the report's lag said.
  sites["b"].durable_lsn = 1000;
  p = ChooseCandidate(o, sites, report);
  EXPECT_EQ(p.winner, "b");
  EXPECT_TRUE(p.loss.none());
  EXPECT_THAT(p.Describe(), HasSubstr("loses nothing"));

  // Inconsistent and no-failover sites are out; ties go to the smaller name.
  sites = {{"b", {970, false, false}}, {"c", {970, true, true}}, {"d", {970, true, false}}};
  report.peers["b"].bytes = report.peers["c"].bytes = 10;
  report.peers["c"].age = 0;
  p = ChooseCandidate(o, sites, report);
  EXPECT_EQ(p.winner, "d");
  EXPECT_EQ(p.refused.at("b"), "inconsistent");
  EXPECT_EQ(p.refused.at("c"), "marked no-failover");
  sites["c"].no_failover = false;
  p = ChooseCandidate(o, sites, report);
  EXPECT_EQ(p.winner, "c");
}

TEST(ChooseCandidate, SyncSetMembersOnlyAndTheFloor) {
  FailoverOptions o = Opts("c");
  // c is closest (async, within the gate), b is a member that lags more than the gate allows.
  auto report = ReportFor(100, {90, 2 << 20, 1 * kS}, {99, 4096, 0});
  const PublishedSyncSet sync{"a", 145, SyncSet{{"b"}, 40}};
  CandidatePlan p = ChooseCandidate(o, Sites(90, 99), report, {}, sync);
  EXPECT_EQ(p.winner, "b") << "a member holds every completed sync write: no lag gate";
  EXPECT_THAT(p.refused.at("c"),
              HasSubstr("not in the sync set {b} floor 40 published by a in epoch 145"));
  EXPECT_EQ(ChooseCandidate(o, Sites(90, 99), report).winner, "c") << "without the set";
  // A member that does not hold the floor (it joined this epoch's set before catching up).
  p = ChooseCandidate(o, Sites(30, 99), report, {}, sync);
  EXPECT_TRUE(p.winner.empty());
  EXPECT_THAT(p.refused.at("b"), HasSubstr("durable LSN 30 is below the floor"));
  // No member: the floor, then the lag gate as before.
  const PublishedSyncSet none{"a", 145, SyncSet{{}, 95}};
  p = ChooseCandidate(o, Sites(90, 99), report, {}, none);
  EXPECT_EQ(p.winner, "c");
  EXPECT_THAT(p.refused.at("b"), HasSubstr("below the floor"));
}

TEST(FailoverSyncSet, OutsideTheSetNeedsAnApprovalWithTheLossBound) {
  auto report = ReportFor(100, {90, 40960, 1 * kS}, {97, 12288, 2 * kS});
  const PublishedSyncSet sync{"a", 145, SyncSet{{"b"}, 50}};
  // b, the member, has no session: c is within the gate but outside the set.
  Replica c("c", Opts("c"), 103, {{"c", {97, true, false}}}, report);
  c.f.m.Handle(0, EvSyncSet{sync});
  const Nanos t = 100 * kS;
  c.LoseLeader(t);
  auto acts = c.Tick(t + 1 * kS);
  ASSERT_THAT(Kinds(acts), ::testing::ElementsAre(K::kRefused, K::kPublishPending));
  EXPECT_THAT(acts[0].message,
              HasSubstr("c (not in the sync set {b} floor 50 published by a in epoch 145)"));
  EXPECT_THAT(acts[0].message, HasSubstr("loses LSN 98..100, 12288 bytes"));
  EXPECT_THAT(acts[0].message, HasSubstr("tvillingctl failover approve --group g --site c"));
  EXPECT_EQ(acts[1].loss.from_lsn, 98u);
  EXPECT_EQ(c.f.m.state(), S::kAwaitingApproval);
  EXPECT_TRUE(c.Tick(t + 5 * kS).empty()) << "the refusal is said once";
  // The operator approves: c campaigns.
  acts = c.f.m.Handle(t + 6 * kS, EvApprove{"c", "CN=alice"});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kClearPending, K::kCampaign));

  // The same without a set: c is elected automatically (today's lag gate).
  Replica c2("c", Opts("c"), 103, {{"c", {97, true, false}}}, report);
  c2.LoseLeader(t);
  EXPECT_THAT(Kinds(c2.Tick(t + 1 * kS)), ::testing::ElementsAre(K::kCampaign));
  // ... or with a set that has no member and a floor c holds.
  Replica c3("c", Opts("c"), 103, {{"c", {97, true, false}}}, report);
  c3.f.m.Handle(0, EvSyncSet{PublishedSyncSet{"a", 145, SyncSet{{}, 97}}});
  c3.LoseLeader(t);
  EXPECT_THAT(Kinds(c3.Tick(t + 1 * kS)), ::testing::ElementsAre(K::kCampaign));
  // The member back: it is elected, and c's pending plan is not its business.
  Replica b("b", Opts("b"), 102, {{"b", {90, true, false}}, {"c", {97, true, false}}}, report);
  b.f.m.Handle(0, EvSyncSet{sync});
  b.LoseLeader(t);
  EXPECT_THAT(Kinds(b.Tick(t + 1 * kS)), ::testing::ElementsAre(K::kCampaign));
}

// Found by tests/sim/failover_sim.cc (seed 795 --mixed --promotion-failures): b, a sync peer the
// primary counted before etcd held the set with it, is the only site with the last writes; its
// promotion fails. c holds the set's floor, but promoting it automatically would lose them.
TEST(FailoverPromotionFailed, ALessAdvancedSiteNeedsAnApprovalWhileTheFailedOneHoldsMore) {
  auto report = ReportFor(100, {100, 0, 0}, {100, 0, 0});
  std::map<std::string, SiteReport> sites = {{"b", {130, true, false, true}},
                                             {"c", {110, true, false}}};
  CandidatePlan plan = ChooseCandidate(Opts("c"), sites, report);
  EXPECT_EQ(plan.winner, "c");
  EXPECT_EQ(plan.refused["b"], "its promotion failed");
  EXPECT_THAT(plan.held_back, HasSubstr("b (its promotion failed) holds records up to LSN 130"));

  Replica c("c", Opts("c"), 103, sites, report);
  const Nanos t = 100 * kS;
  c.LoseLeader(t);
  auto acts = c.Tick(t + 1 * kS);
  ASSERT_THAT(Kinds(acts), ::testing::ElementsAre(K::kRefused, K::kPublishPending));
  EXPECT_THAT(acts[0].message, HasSubstr("holds records up to LSN 130 that c lacks"));
  EXPECT_THAT(acts[0].message, HasSubstr("tvillingctl failover approve --group g --site c"));
  EXPECT_EQ(c.f.m.state(), S::kAwaitingApproval);
  EXPECT_THAT(Kinds(c.f.m.Handle(t + 2 * kS, EvApprove{"c", "CN=alice"})),
              ::testing::ElementsAre(K::kClearPending, K::kCampaign));

  // Once b holds no more than c (or its hold ended and it says so no longer), c goes ahead.
  Replica c2("c", Opts("c"), 103, {{"b", {110, true, false, true}}, {"c", {110, true, false}}},
             report);
  c2.LoseLeader(t);
  EXPECT_THAT(Kinds(c2.Tick(t + 1 * kS)), ::testing::ElementsAre(K::kCampaign));
}

TEST(FailoverAutomatic, NobodyEligibleIsRefusedWithReasons) {
  auto report = ReportFor(100, {50, 5 << 20, 2 * kS}, {40, 6 << 20, 3 * kS});
  Replica b("b", Opts("b"), 102, Sites(50, 40), report);
  b.LoseLeader(100 * kS);
  auto acts = b.Tick(102 * kS);
  ASSERT_THAT(Kinds(acts), ::testing::ElementsAre(K::kRefused));
  EXPECT_THAT(acts[0].message, HasSubstr("the primary a is gone: no eligible candidate"));
  EXPECT_THAT(acts[0].message, HasSubstr("b (lag 5242880 bytes"));
  EXPECT_THAT(acts[0].message, HasSubstr("c (lag 6291456 bytes"));
  // Not repeated every tick.
  EXPECT_TRUE(b.Tick(103 * kS).empty());
  // c catches up (its report now within what a had): still not eligible for lag? The report is
  // the primary's last one, and c's durable is below its last LSN: the gate stands.
  EXPECT_TRUE(b.Read(104 * kS, Sites(50, 60)).empty());
}

TEST(FailoverAutomatic, AntiFlappingHoldsPromotionAfterARecentLeaderChange) {
  auto report = ReportFor(100, {100, 0, 0}, {90, 100, kS});
  Replica b("b", Opts("b"), 102, Sites(100, 90), report);
  // A leader change observed at t=10 s (a -> c), then c disappears at t=20 s.
  b.f.m.Handle(10 * kS, EvLeader{Leader("c", 50, 103)});
  b.f.m.Handle(10 * kS,
               EvPrimaryReport{Report("c", 100, {{"b", {100, 0, 0}}, {"a", {90, 100, kS}}})});
  b.LoseLeader(20 * kS);
  auto acts = b.f.m.Handle(22 * kS, EvTick{});
  ASSERT_THAT(Kinds(acts), ::testing::ElementsAre(K::kRefused));
  EXPECT_THAT(acts[0].message, HasSubstr("anti-flapping"));
  EXPECT_THAT(acts[0].message, HasSubstr("12.0 s ago"));
  EXPECT_TRUE(b.Tick(69 * kS).empty());
  acts = b.Tick(70 * kS);
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kCampaign));
}

TEST(FailoverPolicy, ManualWaitsForAnOperatorPromote) {
  auto report = ReportFor(100, {100, 0, 0}, {90, 100, kS});
  Replica b("b", Opts("b", FailoverPolicy::kManual), 102, Sites(100, 90), report);
  b.LoseLeader(100 * kS);
  auto acts = b.f.m.Handle(102 * kS, EvTick{});
  ASSERT_THAT(Kinds(acts), ::testing::ElementsAre(K::kRefused));
  EXPECT_THAT(acts[0].message, HasSubstr("policy is manual"));
  acts = b.f.m.Handle(103 * kS, EvPromote{"operator"});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kCampaign));
}

TEST(FailoverPolicy, PausedHoldsAutomaticPromotionUntilResumed) {
  auto report = ReportFor(100, {100, 0, 0}, {90, 100, kS});
  Replica b("b", Opts("b"), 102, Sites(100, 90), report);
  EXPECT_TRUE(b.f.m.Handle(50 * kS, EvPaused{true, "by root at site-a"}).empty());
  EXPECT_TRUE(b.f.m.paused());
  b.LoseLeader(100 * kS);
  auto acts = b.Tick(102 * kS);
  ASSERT_THAT(Kinds(acts), ::testing::ElementsAre(K::kRefused));
  EXPECT_THAT(acts[0].message, HasSubstr("paused (by root at site-a)"));
  EXPECT_THAT(acts[0].message, HasSubstr("tvillingctl resume --group"));
  EXPECT_TRUE(b.Tick(110 * kS).empty()) << "the refusal is said once";
  EXPECT_EQ(b.f.m.state(), S::kLeaderless);
  // An operator may still promote while paused.
  Replica b2("b", Opts("b"), 102, Sites(100, 90), report);
  b2.f.m.Handle(50 * kS, EvPaused{true, "x"});
  b2.LoseLeader(100 * kS);
  b2.Tick(102 * kS);
  EXPECT_THAT(Kinds(b2.f.m.Handle(103 * kS, EvPromote{"operator"})),
              ::testing::ElementsAre(K::kCampaign));
  // Resumed: the most advanced replica campaigns at once.
  acts = b.f.m.Handle(111 * kS, EvPaused{false, ""});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kCampaign));
}

TEST(FailoverPolicy, PromoteRefusedWhileAnotherSiteIsPrimaryOrWhenInconsistent) {
  auto report = ReportFor(100, {100, 0, 0}, {90, 100, kS});
  Replica b("b", Opts("b", FailoverPolicy::kManual), 102, Sites(100, 90), report);
  auto acts = b.f.m.Handle(1 * kS, EvPromote{"operator"});
  ASSERT_THAT(Kinds(acts), ::testing::ElementsAre(K::kRefused));
  EXPECT_THAT(acts[0].message, HasSubstr("a holds the leader key (epoch 42); use a switchover"));
  b.LoseLeader(2 * kS);
  b.f.m.Handle(2 * kS, EvSites{{{"b", {100, false, false}}}});
  acts = b.f.m.Handle(3 * kS, EvPromote{"operator"});
  ASSERT_THAT(Kinds(acts), ::testing::ElementsAre(K::kRefused));
  EXPECT_THAT(acts[0].message, HasSubstr("b is not consistent"));
}

TEST(FailoverPolicy, ApprovePublishesThePlanWithItsLossAndWaits) {
  auto report = ReportFor(100, {95, 5000, 2 * kS}, {90, 10000, 3 * kS});
  Replica b("b", Opts("b", FailoverPolicy::kApprove), 102, Sites(95, 90), report);
  b.LoseLeader(100 * kS);
  auto acts = b.Tick(101 * kS);
  ASSERT_THAT(Kinds(acts), ::testing::ElementsAre(K::kPublishPending));
  EXPECT_EQ(acts[0].loss.from_lsn, 96u);
  EXPECT_EQ(acts[0].loss.to_lsn, 100u);
  EXPECT_EQ(acts[0].loss.bytes, 5000u);
  EXPECT_THAT(acts[0].message, HasSubstr("loses LSN 96..100, 5000 bytes, 2.0 s of writes"));
  EXPECT_THAT(acts[0].message, HasSubstr("tvillingctl failover approve --group g --site b"));
  EXPECT_EQ(b.f.m.state(), S::kAwaitingApproval);
  // tvillingctl status shows the plan and its bound while it waits.
  EXPECT_EQ(b.f.m.pending_plan(),
            "the primary a is gone: promote b (loses LSN 96..100, 5000 bytes, 2.0 s of writes, as "
            "of the primary's last report: what it completed after that is lost too); "
            "not eligible: a (no report: its agent has no etcd session)");
  EXPECT_EQ(b.f.m.pending_loss().from_lsn, 96u);
  EXPECT_EQ(b.f.m.pending_loss().to_lsn, 100u);
  EXPECT_EQ(b.f.m.pending_loss().bytes, 5000u);
  EXPECT_EQ(b.f.m.pending_loss().age, 2 * kS);
  EXPECT_TRUE(b.Tick(150 * kS).empty()) << "waits, however long";
  // An approval for another site is not ours; ours starts the campaign.
  EXPECT_TRUE(b.f.m.Handle(151 * kS, EvApprove{"c", "op"}).empty());
  acts = b.f.m.Handle(152 * kS, EvApprove{"b", "CN=alice"});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kClearPending, K::kCampaign));
  EXPECT_EQ(b.f.m.pending_plan(), "") << "no longer pending once approved";
  EXPECT_EQ(b.f.m.pending_loss().bytes, 0u);
}

TEST(FailoverPolicy, ApprovalWithdrawnWhenTheOldPrimaryReturns) {
  auto report = ReportFor(100, {95, 5000, 2 * kS}, {90, 10000, 3 * kS});
  Replica b("b", Opts("b", FailoverPolicy::kApprove), 102, Sites(95, 90), report);
  b.LoseLeader(100 * kS);
  b.Tick(101 * kS);
  EXPECT_NE(b.f.m.pending_plan(), "");
  auto acts = b.f.m.Handle(102 * kS, EvLeader{Leader("a", 90, 111)});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kClearPending, K::kFollow));
  EXPECT_EQ(b.f.m.pending_plan(), "") << "withdrawn";
  acts = b.f.m.Handle(103 * kS, EvApprove{"b", "late"});
  ASSERT_THAT(Kinds(acts), ::testing::ElementsAre(K::kRefused));
  EXPECT_THAT(acts[0].message, HasSubstr("no promotion of b is pending"));
}

TEST(FailoverTwoSites, AutomaticRefusedWithoutAWitnessAndSaysWhy) {
  FailoverOptions o = Opts("b");
  o.sites = {"a", "b"};
  auto report = Report("a", 100, {{"b", {100, 0, 0}}});
  Replica b("b", o, 102, {{"b", {100, true, false}}}, report);
  EXPECT_TRUE(b.f.m.automatic_refused_for_lack_of_witness());
  b.LoseLeader(100 * kS);
  auto acts = b.f.m.Handle(102 * kS, EvTick{});
  ASSERT_THAT(Kinds(acts), ::testing::ElementsAre(K::kRefused));
  EXPECT_THAT(acts[0].message, HasSubstr("only two sites and no witness"));
  EXPECT_THAT(acts[0].message, HasSubstr("neither can tell a lost peer from a partition"));

  o.witness = "w";
  Replica b2("b", o, 102, {{"b", {100, true, false}}}, report);
  EXPECT_FALSE(b2.f.m.automatic_refused_for_lack_of_witness());
  b2.LoseLeader(100 * kS);
  acts = b2.Tick(102 * kS);
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kCampaign));

  // approve is allowed with two sites: a human decides that the peer is really gone.
  o.witness.clear();
  o.policy = FailoverPolicy::kApprove;
  Replica b3("b", o, 102, {{"b", {100, true, false}}}, report);
  b3.LoseLeader(100 * kS);
  acts = b3.Tick(102 * kS);
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kPublishPending));
}

TEST(FailoverSession, NothingHappensWithoutASession) {
  FailoverMachine m(Opts("a"));
  EXPECT_TRUE(m.Handle(0, EvPrimaryReport{std::nullopt}).empty());
  EXPECT_TRUE(m.Handle(0, EvLeader{LeaderView{}}).empty());
  EXPECT_TRUE(m.Handle(5 * kS, EvTick{}).empty());
  EXPECT_EQ(m.state(), S::kStarting);
  auto acts = m.Handle(6 * kS, EvSessionStarted{9, 6 * kS});
  EXPECT_TRUE(acts.empty()) << "the report was read before the session";
  // The coordinator reads the key, then the reports, once it has a session.
  EXPECT_TRUE(m.Handle(6 * kS, EvLeader{LeaderView{}}).empty());
  acts = m.Handle(6 * kS, EvPrimaryReport{std::nullopt});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kCampaign));
}

// ---- simulation ----
//
// Three sites and one etcd, in steps of 10 ms. etcd holds the leader key and the leases; a lease
// ends at etcd TTL after etcd handled its last keep-alive, and etcd may extend every lease (a
// leader change). Keep-alives are sent every 500 ms; each request and each answer may be lost or
// delayed up to `max_delay`. Watch notifications of the key reach each site with their own delay.
// A site with a lost session gets a new one. The invariant, checked at every step: at most one
// site has client I/O on as primary, and that site's epoch is the key's current create revision.
struct SimResult {
  int violations = 0;
  int promotions = 0;
  std::string first_violation;
};

SimResult Simulate(uint64_t seed, Nanos suspend_after, Nanos max_delay,
                   bool answer_uses_receive_time) {
  std::mt19937_64 rng(seed);
  auto chance = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
  auto delay = [&] { return std::uniform_int_distribution<Nanos>(0, max_delay)(rng); };
  const Nanos step = 10 * kMs, ttl = 3 * kS;
  struct Lease {
    Nanos expiry;
  };
  std::map<int64_t, Lease> leases;
  int64_t next_lease = 1;
  LeaderView key;  // etcd's leader key
  uint64_t revision = 1;
  struct Msg {
    Nanos at;
    int site;
    std::function<void()> fn;
  };
  std::vector<Msg> inflight;
  struct Site {
    std::unique_ptr<FailoverMachine> m;
    int64_t lease = 0;
    bool io = false;
    Nanos next_keepalive = 0;
    bool partitioned = false;
    Nanos session_requested = 0;
    uint64_t campaigns = 0;
  };
  std::vector<std::string> names = {"a", "b", "c"};
  std::vector<Site> sites(3);
  SimResult res;
  Nanos now = 0;
  std::map<std::string, SiteReport> reports;
  for (int i = 0; i < 3; ++i) {
    FailoverOptions o = Opts(names[i]);
    o.suspend_after = suspend_after;
    o.anti_flap = 5 * kS;
    o.settle = 0;  // safety must not rest on candidates waiting
    o.max_lag_bytes = ~0ull;
    o.max_lag_time = 1'000'000 * kS;
    sites[i].m = std::make_unique<FailoverMachine>(o);
    reports[names[i]] = {100, true, false};
  }
  PrimaryReport report =
      Report("a", 100, {{"a", {100, 0, 0}}, {"b", {100, 0, 0}}, {"c", {100, 0, 0}}});
  std::optional<PrimaryReport> published;  // the last primary's report in etcd
  std::function<void(int, std::vector<FailoverAction>)> act;
  auto send = [&](int site, std::function<void()> fn) {
    if (sites[site].partitioned || chance(0.05)) return;  // lost
    inflight.push_back({now + delay(), site, std::move(fn)});
  };
  auto lease_alive = [&](int64_t id) { return leases.count(id) && leases[id].expiry > now; };
  auto new_session = [&](int i) {
    const Nanos sent = now;
    sites[i].session_requested = now;
    send(i, [&, i, sent] {
      const int64_t id = next_lease++;
      leases[id] = {now + ttl};
      send(i, [&, i, id, sent] {
        sites[i].lease = id;
        act(i, sites[i].m->Handle(now, EvSessionStarted{id, sent}));
      });
    });
  };
  act = [&](int i, std::vector<FailoverAction> actions) {
    for (const auto& a : actions) {
      switch (a.kind) {
        case K::kCampaign: {
          const int64_t lease = sites[i].lease;
          // The Txn's deadline: without an answer by then, the coordinator reports a failure.
          const uint64_t nr = ++sites[i].campaigns;
          inflight.push_back({now + 1 * kS, i, [&, i, nr] {
                                if (sites[i].campaigns == nr &&
                                    sites[i].m->state() == S::kCampaigning) {
                                  act(i, sites[i].m->Handle(now, EvCampaignDone{false, {}}));
                                }
                              }});
          send(i, [&, i, lease] {
            bool won = false;
            if (!key.present && lease_alive(lease)) {
              key = LeaderView{true, names[i], ++revision, lease};
              won = true;
            }
            const LeaderView v = key;
            send(i, [&, i, won, v, nr] {
              if (sites[i].campaigns != nr) return;
              ++sites[i].campaigns;  // answered: the timeout is void
              act(i, sites[i].m->Handle(now, EvCampaignDone{won, v}));
            });
          });
          break;
        }
        case K::kPromote:
          ++res.promotions;
          break;
        case K::kResumeIo:
          sites[i].io = true;
          break;
        case K::kSuspendIo:
        case K::kDemote:
          sites[i].io = false;
          break;
        case K::kReadLeader:
          send(i, [&, i] {
            const LeaderView v = key;
            send(i, [&, i, v] { act(i, sites[i].m->Handle(now, EvLeader{v})); });
          });
          break;
        case K::kNewSession:
          new_session(i);
          break;
        default:
          break;
      }
    }
  };
  for (int i = 0; i < 3; ++i) {
    act(i, sites[i].m->Handle(now, EvPrimaryReport{std::nullopt}));
    act(i, sites[i].m->Handle(now, EvSites{reports}));
    act(i, sites[i].m->Handle(now, EvLeader{LeaderView{}}));
    new_session(i);
  }
  LeaderView last_broadcast;
  for (now = 0; now < 120 * kS; now += step) {
    // Faults: partitions come and go; etcd sometimes extends every lease (leader change).
    for (int i = 0; i < 3; ++i) {
      // Cut off for 3.3 s on average (longer than a lease), every ~7 s.
      if (chance(sites[i].partitioned ? 0.003 : 0.0015))
        sites[i].partitioned = !sites[i].partitioned;
    }
    if (chance(0.001)) {
      for (auto& [id, l] : leases) l.expiry += std::uniform_int_distribution<Nanos>(0, 2 * kS)(rng);
    }
    // etcd: expire leases and the key under them.
    for (auto it = leases.begin(); it != leases.end();) {
      if (it->second.expiry <= now) {
        if (key.present && key.lease == it->first) key = LeaderView{};
        it = leases.erase(it);
      } else {
        ++it;
      }
    }
    // Watches: every change of the key is sent to every site.
    if (!(key == last_broadcast)) {
      last_broadcast = key;
      for (int i = 0; i < 3; ++i) {
        const LeaderView v = key;
        send(i, [&, i, v] { act(i, sites[i].m->Handle(now, EvLeader{v})); });
      }
      if (key.present) {
        // The new primary's report (lag 0 for all: the simulation checks fencing, not choice).
        report.site = key.site;
        published = report;
        for (int i = 0; i < 3; ++i) {
          send(i, [&, i, r = report] { act(i, sites[i].m->Handle(now, EvPrimaryReport{r})); });
        }
      }
    }
    // Each site re-reads the key every second (a watch that reconnects re-lists), and asks for a
    // new session if its request got lost.
    if (now % (1000 * kMs) == 0) {
      for (int i = 0; i < 3; ++i) {
        send(i, [&, i] {
          const LeaderView v = key;
          send(i, [&, i, v] { act(i, sites[i].m->Handle(now, EvLeader{v})); });
        });
        if (sites[i].lease == 0 && now - sites[i].session_requested > 1 * kS) new_session(i);
      }
    }
    // Site reports live under their site's lease: every 500 ms each site reads those alive, and
    // the primary report with them (as the coordinator does).
    if (now % (500 * kMs) == 0) {
      std::map<std::string, SiteReport> alive;
      for (int j = 0; j < 3; ++j) {
        if (sites[j].lease != 0 && lease_alive(sites[j].lease)) alive[names[j]] = reports[names[j]];
      }
      for (int i = 0; i < 3; ++i) {
        send(i, [&, i, alive, r = published] {
          act(i, sites[i].m->Handle(now, EvSites{alive}));
          act(i, sites[i].m->Handle(now, EvPrimaryReport{r}));
        });
      }
    }
    // Keep-alives.
    for (int i = 0; i < 3; ++i) {
      Site& s = sites[i];
      if (s.lease == 0 || now < s.next_keepalive) continue;
      s.next_keepalive = now + 500 * kMs;
      const int64_t id = s.lease;
      const Nanos sent = now;
      send(i, [&, i, id, sent] {
        const bool alive = lease_alive(id);
        if (alive) leases[id].expiry = std::max(leases[id].expiry, now + ttl);
        send(i, [&, i, id, sent, alive] {
          if (sites[i].lease != id) return;
          if (alive) {
            act(i,
                sites[i].m->Handle(now, EvSessionRenewed{answer_uses_receive_time ? now : sent}));
          } else {
            sites[i].lease = 0;
            act(i, sites[i].m->Handle(now, EvSessionLost{}));
          }
        });
      });
    }
    // Deliver due messages (in time order).
    std::sort(inflight.begin(), inflight.end(),
              [](const Msg& x, const Msg& y) { return x.at < y.at; });
    while (!inflight.empty() && inflight.front().at <= now) {
      Msg m = std::move(inflight.front());
      inflight.erase(inflight.begin());
      m.fn();
    }
    for (int i = 0; i < 3; ++i) act(i, sites[i].m->Handle(now, EvTick{}));
    // The invariant.
    int with_io = 0;
    for (int i = 0; i < 3; ++i) {
      if (!sites[i].io) continue;
      ++with_io;
      const bool holds = key.present && key.site == names[i] && key.epoch == sites[i].m->epoch();
      if (!holds && res.violations++ == 0) {
        res.first_violation = "t=" + std::to_string(now / kMs) + " ms: " + names[i] +
                              " completes I/O in epoch " + std::to_string(sites[i].m->epoch()) +
                              " but the key is " + (key.present ? key.site : "absent") + " epoch " +
                              std::to_string(key.epoch);
      }
    }
    if (with_io > 1 && res.violations++ == 0) res.first_violation = "two sites with I/O";
  }
  return res;
}

TEST(FailoverSimulation, AtMostOnePrimaryCompletesIoAcrossSeeds) {
  int promotions = 0;
  for (uint64_t seed = 1; seed <= 40; ++seed) {
    SimResult r = Simulate(seed, 1500 * kMs, 400 * kMs, false);
    EXPECT_EQ(r.violations, 0) << "seed " << seed << ": " << r.first_violation;
    promotions += r.promotions;
  }
  // The faults must actually move the primary around, or the check proves nothing: far more
  // promotions than the 40 bootstraps.
  EXPECT_GT(promotions, 200);
}

TEST(FailoverSimulation, CatchesAPrimaryThatTrustsItsLeaseTooLong) {
  // Planted bugs: suspending only after the TTL, or timing renewals from the answer's arrival
  // instead of the request's send. The simulation must see two primaries.
  int caught_late_suspend = 0, caught_receive_time = 0;
  for (uint64_t seed = 1; seed <= 40; ++seed) {
    if (Simulate(seed, 6000 * kMs, 400 * kMs, false).violations > 0) ++caught_late_suspend;
    if (Simulate(seed, 2900 * kMs, 1500 * kMs, true).violations > 0) ++caught_receive_time;
  }
  EXPECT_GT(caught_late_suspend, 0);
  EXPECT_GT(caught_receive_time, 0);
}

}  // namespace
}  // namespace tvilling::core

namespace tvilling::core {
namespace {

// A switchover's hand-over: only the named target campaigns, at once and whatever the policy;
// the old primary (the last primary, which the bootstrap rule would let take its key back) waits
// until the hand-over expires.
TEST(FailoverHandover, OnlyTheTargetCampaignsAtOnceAndTheOldPrimaryWaits) {
  Fixture a(Opts("a"), 101);
  a.Start(0, Report("a", 500), Leader("a", 42, 101));
  ASSERT_EQ(a.m.state(), S::kPrimary);
  EXPECT_TRUE(a.m.Handle(1 * kS, EvHandover{"b"}).empty());
  auto acts = a.m.Handle(1 * kS, EvLeader{LeaderView{}});
  EXPECT_TRUE(Has(acts, K::kDemote));
  EXPECT_FALSE(Has(acts, K::kCampaign)) << "the old primary must leave the key to the target";
  // ... also once it read the reports again (it is still the last primary).
  EXPECT_FALSE(Has(a.m.Handle(1 * kS + 5 * kMs, EvPrimaryReport{Report("a", 500)}), K::kCampaign));
  EXPECT_FALSE(Has(a.m.Handle(2 * kS, EvTick{}), K::kCampaign));

  Fixture b(Opts("b", FailoverPolicy::kManual), 102);
  b.Start(0, Report("a", 500), Leader("a", 42, 101));
  ASSERT_EQ(b.m.state(), S::kReplica);
  EXPECT_TRUE(b.m.Handle(1 * kS, EvHandover{"b"}).empty()) << "the key is still a's";
  acts = b.m.Handle(1 * kS, EvLeader{LeaderView{}});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kCampaign)) << "no settle, any policy";
  acts = b.m.Handle(1 * kS + 5 * kMs, EvCampaignDone{true, Leader("b", 60, 102)});
  EXPECT_TRUE(Has(acts, K::kPromote));

  Fixture c(Opts("c"), 103);
  c.Start(0, Report("a", 500), Leader("a", 42, 101));
  c.m.Handle(1 * kS, EvHandover{"b"});
  c.m.Handle(1 * kS, EvSites{{{"b", {500, true, false}}, {"c", {500, true, false}}}});
  EXPECT_FALSE(Has(c.m.Handle(1 * kS, EvLeader{LeaderView{}}), K::kCampaign));
  EXPECT_FALSE(Has(c.m.Handle(3 * kS, EvTick{}), K::kCampaign));
  acts = c.m.Handle(3 * kS, EvLeader{Leader("b", 60, 102)});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kFollow));

  // a target that never campaigns: after 2 x TTL the old primary takes its key back.
  acts = a.m.Handle(1 * kS + 2 * 3 * kS, EvTick{});
  EXPECT_TRUE(Has(acts, K::kCampaign));
}

}  // namespace
}  // namespace tvilling::core

namespace tvilling::core {
namespace {

// docs/coordinator.md, "A failed promotion": the site that holds the key but cannot promote
// resigns it, stays out of elections for anti_flap (even as the last primary) and says why; an
// operator's promote ends the hold.
TEST(FailoverPromotionFailed, ResignsTheKeyAndStaysOutUntilAntiFlapPasses) {
  Fixture b(Opts("b"), 102);
  auto acts = b.Start(0, Report("b", 500), LeaderView{});
  ASSERT_THAT(Kinds(acts), ::testing::ElementsAre(K::kCampaign)) << "the last primary";
  acts = b.m.Handle(10 * kMs, EvCampaignDone{true, Leader("b", 60, 102)});
  ASSERT_THAT(Kinds(acts), ::testing::ElementsAre(K::kPromote, K::kResumeIo));

  acts = b.m.Handle(100 * kMs, EvPromotionFailed{60, "its log has seen epoch 70"});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kSuspendIo, K::kResign, K::kRefused));
  EXPECT_EQ(Find(acts, K::kResign)->epoch, 60u);
  EXPECT_THAT(Find(acts, K::kRefused)->message, HasSubstr("its log has seen epoch 70"));
  EXPECT_EQ(b.m.state(), S::kLeaderless);
  EXPECT_TRUE(b.m.promotion_refused(100 * kMs));

  // The watch still shows the key until etcd deletes it: no second promotion in it.
  acts = b.m.Handle(150 * kMs, EvLeader{Leader("b", 60, 102)});
  EXPECT_FALSE(Has(acts, K::kPromote));
  EXPECT_FALSE(Has(acts, K::kCampaign));
  // etcd did not delete it (unreachable): the resign is repeated after a second, not before.
  EXPECT_FALSE(Has(b.m.Handle(500 * kMs, EvTick{}), K::kResign));
  acts = b.m.Handle(1200 * kMs, EvTick{});
  ASSERT_TRUE(Has(acts, K::kResign));
  EXPECT_EQ(Find(acts, K::kResign)->epoch, 60u);

  // Deleted: the last primary would take it back at once; after a failed promotion it does not.
  acts = b.m.Handle(1300 * kMs, EvLeader{LeaderView{}});
  EXPECT_FALSE(Has(acts, K::kCampaign));
  EXPECT_FALSE(Has(b.m.Handle(1305 * kMs, EvPrimaryReport{Report("b", 500)}), K::kCampaign));
  EXPECT_FALSE(Has(b.m.Handle(30 * kS, EvTick{}), K::kCampaign));
  EXPECT_THAT(b.m.last_refusal(), HasSubstr("promotion failed"));
  EXPECT_TRUE(b.m.promotion_refused(30 * kS));
  // Once anti_flap has passed it may try again.
  acts = b.m.Handle(100 * kMs + 60 * kS, EvTick{});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kCampaign));
  EXPECT_FALSE(b.m.promotion_refused(100 * kMs + 60 * kS));
}

TEST(FailoverPromotionFailed, AnOperatorsPromoteEndsTheHoldAndAnOldEpochResignsNothing) {
  Fixture b(Opts("b"), 102);
  b.Start(0, Report("b", 500), LeaderView{});
  b.m.Handle(10 * kMs, EvCampaignDone{true, Leader("b", 60, 102)});
  b.m.Handle(20 * kMs, EvSites{{{"b", {500, true, false}}}});
  // A failure reported for an epoch the site does not hold (a late report): no resign, but the
  // site still keeps out of elections.
  auto acts = b.m.Handle(100 * kMs, EvPromotionFailed{59, "late"});
  EXPECT_FALSE(Has(acts, K::kResign));
  EXPECT_EQ(b.m.state(), S::kPrimary);
  EXPECT_TRUE(b.m.promotion_refused(100 * kMs));

  acts = b.m.Handle(200 * kMs, EvPromotionFailed{60, "disk error"});
  ASSERT_TRUE(Has(acts, K::kResign));
  b.m.Handle(300 * kMs, EvLeader{LeaderView{}});
  acts = b.m.Handle(400 * kMs, EvPromote{"ops@host"});
  EXPECT_THAT(Kinds(acts), ::testing::ElementsAre(K::kCampaign));
  EXPECT_FALSE(b.m.promotion_refused(400 * kMs));
}

}  // namespace
}  // namespace tvilling::core
