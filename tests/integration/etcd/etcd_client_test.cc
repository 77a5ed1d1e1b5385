// etcd_client_test.cc: coordinator::EtcdClient against the real Debian `etcd` (3.4) on 127.0.0.1:
// one member, three members with one killed, and TLS with client certificates.
#include "agent/coordinator/etcd_client.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <thread>

#include "tests/integration/etcd/etcd_cluster.h"

namespace tvilling::coordinator {
namespace {

using namespace std::chrono_literals;
using testing::EtcdCluster;

std::unique_ptr<EtcdClient> Client(const EtcdOptions& o) {
  auto c = EtcdClient::Create(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(*c) : nullptr;
}

// Polls `pred` until true or `timeout`.
template <class Pred>
bool Eventually(Pred pred, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(20ms);
  }
  return pred();
}

class OneMember : public ::testing::Test {
 protected:
  void SetUp() override {
    cluster_ = std::make_unique<EtcdCluster>(1);
    ASSERT_TRUE(cluster_->WaitReady()) << "etcd did not start; see " << cluster_->dir();
    client_ = Client(cluster_->ClientOptions(cluster_->endpoints()));
    ASSERT_NE(client_, nullptr);
  }
  std::unique_ptr<EtcdCluster> cluster_;
  std::unique_ptr<EtcdClient> client_;
};

TEST_F(OneMember, PutGetRangeDelete) {
  auto r1 = client_->Put("/t/a", "1");
  ASSERT_TRUE(r1.ok()) << r1.status();
  auto r2 = client_->Put("/t/b", "2");
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_GT(*r2, *r1);
  ASSERT_TRUE(client_->Put("/u/c", "3").ok());

  auto g = client_->Get("/t/a");
  ASSERT_TRUE(g.ok()) << g.status();
  ASSERT_EQ(g->kvs.size(), 1u);
  EXPECT_EQ(g->kvs[0].value, "1");
  EXPECT_EQ(g->kvs[0].create_revision, *r1);
  EXPECT_EQ(g->kvs[0].version, 1);

  auto prefix = client_->Range("/t/", PrefixEnd("/t/"));
  ASSERT_TRUE(prefix.ok()) << prefix.status();
  ASSERT_EQ(prefix->kvs.size(), 2u);
  EXPECT_EQ(prefix->kvs[0].key, "/t/a");
  EXPECT_EQ(prefix->kvs[1].key, "/t/b");
  EXPECT_GE(prefix->revision, *r2);

  auto missing = client_->Get("/t/none");
  ASSERT_TRUE(missing.ok());
  EXPECT_TRUE(missing->kvs.empty());

  auto deleted = client_->DeleteRange("/t/", PrefixEnd("/t/"));
  ASSERT_TRUE(deleted.ok()) << deleted.status();
  EXPECT_EQ(*deleted, 2);
  auto after = client_->Range("/", PrefixEnd("/"));
  ASSERT_TRUE(after.ok());
  ASSERT_EQ(after->kvs.size(), 1u);
  EXPECT_EQ(after->kvs[0].key, "/u/c");
}

TEST_F(OneMember, TxnCreateIfAbsentAndGuardedUpdates) {
  const std::string k = "/g/leader";
  auto create = [&](const std::string& me) {
    return client_->Txn({Compare::CreateRevision(k, Compare::Result::kEqual, 0)},
                        {TxnOp::Put(k, me)}, {TxnOp::Get(k)});
  };
  auto first = create("site-a");
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(first->succeeded);
  const int64_t epoch = first->revision;  // the key's create revision

  auto second = create("site-b");
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_FALSE(second->succeeded);
  ASSERT_EQ(second->ranges.size(), 1u);
  ASSERT_EQ(second->ranges[0].kvs.size(), 1u);
  EXPECT_EQ(second->ranges[0].kvs[0].value, "site-a");
  EXPECT_EQ(second->ranges[0].kvs[0].create_revision, epoch);

  // Guarded on value and on create revision: succeeds for the holder, fails for a stale epoch.
  auto by_value = client_->Txn({Compare::Value(k, Compare::Result::kEqual, "site-a")},
                               {TxnOp::Put("/g/state", "x")}, {});
  ASSERT_TRUE(by_value.ok());
  EXPECT_TRUE(by_value->succeeded);
  auto wrong_value = client_->Txn({Compare::Value(k, Compare::Result::kEqual, "site-b")},
                                  {TxnOp::Put("/g/state", "y")}, {});
  ASSERT_TRUE(wrong_value.ok());
  EXPECT_FALSE(wrong_value->succeeded);
  auto stale_epoch = client_->Txn({Compare::CreateRevision(k, Compare::Result::kEqual, epoch - 1)},
                                  {TxnOp::Put("/g/state", "z")}, {});
  ASSERT_TRUE(stale_epoch.ok());
  EXPECT_FALSE(stale_epoch->succeeded);

  // Optimistic update on mod revision: once, then the revision moved.
  auto state = client_->Get("/g/state");
  ASSERT_TRUE(state.ok());
  ASSERT_EQ(state->kvs.size(), 1u);
  EXPECT_EQ(state->kvs[0].value, "x");
  const int64_t seen = state->kvs[0].mod_revision;
  auto cas1 = client_->Txn({Compare::ModRevision("/g/state", Compare::Result::kEqual, seen)},
                           {TxnOp::Put("/g/state", "x2")}, {});
  ASSERT_TRUE(cas1.ok());
  EXPECT_TRUE(cas1->succeeded);
  auto cas2 = client_->Txn({Compare::ModRevision("/g/state", Compare::Result::kEqual, seen)},
                           {TxnOp::Put("/g/state", "x3")}, {});
  ASSERT_TRUE(cas2.ok());
  EXPECT_FALSE(cas2->succeeded);

  // etcd refuses a Txn that deletes and re-creates one key ("duplicate key"): a hand-over deletes
  // the leader key and names the target in another key in one Txn; the target then creates the
  // leader key, with a new, larger create revision (its epoch).
  auto dup = client_->Txn({Compare::Value(k, Compare::Result::kEqual, "site-a")},
                          {TxnOp::Delete(k), TxnOp::Put(k, "site-b")}, {});
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kInvalidArgument) << dup.status();
  EXPECT_NE(dup.status().message().find("duplicate key"), std::string::npos) << dup.status();
  auto handover = client_->Txn({Compare::Value(k, Compare::Result::kEqual, "site-a"),
                                Compare::CreateRevision(k, Compare::Result::kEqual, epoch)},
                               {TxnOp::Delete(k), TxnOp::Put("/g/handover", "site-b")}, {});
  ASSERT_TRUE(handover.ok()) << handover.status();
  EXPECT_TRUE(handover->succeeded);
  auto taken = create("site-b");
  ASSERT_TRUE(taken.ok()) << taken.status();
  EXPECT_TRUE(taken->succeeded);
  auto leader = client_->Get(k);
  ASSERT_TRUE(leader.ok());
  ASSERT_EQ(leader->kvs.size(), 1u);
  EXPECT_EQ(leader->kvs[0].value, "site-b");
  EXPECT_GT(leader->kvs[0].create_revision, epoch);
}

TEST_F(OneMember, LeaseKeptAliveThenExpiresAndRevoke) {
  auto lease = client_->LeaseGrant(2);
  ASSERT_TRUE(lease.ok()) << lease.status();
  EXPECT_EQ(lease->ttl_s, 2);
  ASSERT_TRUE(client_->Put("/l/key", "v", lease->id).ok());

  std::atomic<int> renewals{0};
  std::atomic<int> lost{0};
  auto keeper = std::make_unique<LeaseKeeper>(
      client_.get(), lease->id, 500ms,
      LeaseKeeper::Callbacks{[&](SteadyTime sent, int64_t ttl) {
                               EXPECT_LE(sent, std::chrono::steady_clock::now());
                               EXPECT_EQ(ttl, 2);
                               ++renewals;
                             },
                             [&](absl::Status) { ++lost; }, nullptr});
  std::this_thread::sleep_for(3500ms);  // well past the TTL
  EXPECT_GE(renewals.load(), 5);
  EXPECT_EQ(lost.load(), 0);
  auto still = client_->Get("/l/key");
  ASSERT_TRUE(still.ok());
  EXPECT_EQ(still->kvs.size(), 1u) << "the key vanished although its lease was kept alive";
  keeper->Stop();

  // Without keep-alives the lease ends after its TTL (etcd may take a little longer).
  const auto stopped = std::chrono::steady_clock::now();
  ASSERT_TRUE(Eventually(
      [&] {
        auto g = client_->Get("/l/key");
        return g.ok() && g->kvs.empty();
      },
      6s));
  EXPECT_GE(std::chrono::steady_clock::now() - stopped, 1s);
  auto ttl = client_->LeaseTimeToLive(lease->id);
  ASSERT_TRUE(ttl.ok()) << ttl.status();
  EXPECT_EQ(ttl->ttl_s, -1);

  // Revoke deletes the attached keys at once.
  auto l2 = client_->LeaseGrant(30);
  ASSERT_TRUE(l2.ok());
  ASSERT_TRUE(client_->Put("/l/k2", "v", l2->id).ok());
  ASSERT_TRUE(client_->LeaseRevoke(l2->id).ok());
  auto g2 = client_->Get("/l/k2");
  ASSERT_TRUE(g2.ok());
  EXPECT_TRUE(g2->kvs.empty());
  auto bad = client_->LeaseRevoke(l2->id);
  EXPECT_EQ(bad.code(), absl::StatusCode::kNotFound) << bad;
  EXPECT_NE(bad.message().find("LeaseRevoke"), std::string::npos) << bad;
}

TEST_F(OneMember, KeeperReportsRevokedLease) {
  auto lease = client_->LeaseGrant(10);
  ASSERT_TRUE(lease.ok());
  std::atomic<int> renewals{0}, lost{0};
  LeaseKeeper keeper(client_.get(), lease->id, 200ms,
                     LeaseKeeper::Callbacks{[&](SteadyTime, int64_t) { ++renewals; },
                                            [&](absl::Status st) {
                                              EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
                                              ++lost;
                                            },
                                            nullptr});
  ASSERT_TRUE(Eventually([&] { return renewals.load() >= 1; }, 3s));
  ASSERT_TRUE(client_->LeaseRevoke(lease->id).ok());
  ASSERT_TRUE(Eventually([&] { return lost.load() == 1; }, 3s));
  const int after = renewals.load();
  std::this_thread::sleep_for(600ms);
  EXPECT_EQ(renewals.load(), after) << "the keeper went on after the lease was gone";
  EXPECT_EQ(lost.load(), 1);
}

struct Recorder {
  std::mutex mu;
  std::vector<std::pair<std::string, std::string>> events;  // key, value ("" for delete)
  std::vector<int64_t> revisions;
  std::atomic<int64_t> compacted{0};
  std::atomic<int> errors{0};
  Watcher::Callbacks callbacks() {
    return {[this](const std::vector<WatchEvent>& evs, int64_t) {
              std::lock_guard l(mu);
              for (const auto& e : evs) {
                events.emplace_back(e.kv.key,
                                    e.type == WatchEvent::Type::kDelete ? "" : e.kv.value);
                revisions.push_back(e.kv.mod_revision);
              }
            },
            [this](int64_t rev) { compacted = rev; }, [this](absl::Status) { ++errors; }};
  }
  size_t size() {
    std::lock_guard l(mu);
    return events.size();
  }
};

TEST_F(OneMember, WatchDeliversInOrderAndResumesFromRevision) {
  Recorder rec;
  auto w = std::make_unique<Watcher>(client_.get(), "/w/", PrefixEnd("/w/"), 0, rec.callbacks());
  // The watch is created asynchronously: wait until it reports its start revision.
  ASSERT_TRUE(Eventually([&] { return w->next_revision() > 0; }, 5s));
  ASSERT_TRUE(client_->Put("/w/1", "a").ok());
  ASSERT_TRUE(client_->Put("/other", "x").ok());
  ASSERT_TRUE(client_->Put("/w/2", "b").ok());
  ASSERT_TRUE(client_->DeleteRange("/w/1").ok());
  ASSERT_TRUE(Eventually([&] { return rec.size() == 3; }, 5s));
  const int64_t resume = w->next_revision();
  w->Stop();
  {
    std::lock_guard l(rec.mu);
    ASSERT_EQ(rec.events.size(), 3u);
    EXPECT_EQ(rec.events[0], std::make_pair(std::string("/w/1"), std::string("a")));
    EXPECT_EQ(rec.events[1], std::make_pair(std::string("/w/2"), std::string("b")));
    EXPECT_EQ(rec.events[2], std::make_pair(std::string("/w/1"), std::string("")));
    EXPECT_LT(rec.revisions[0], rec.revisions[1]);
    EXPECT_LT(rec.revisions[1], rec.revisions[2]);
    EXPECT_EQ(resume, rec.revisions[2] + 1);
  }
  // Missed while nobody watched: a new watcher from `resume` gets exactly these.
  ASSERT_TRUE(client_->Put("/w/3", "c").ok());
  ASSERT_TRUE(client_->Put("/w/4", "d").ok());
  Recorder rec2;
  Watcher w2(client_.get(), "/w/", PrefixEnd("/w/"), resume, rec2.callbacks());
  ASSERT_TRUE(Eventually([&] { return rec2.size() >= 2; }, 5s));
  std::this_thread::sleep_for(200ms);
  std::lock_guard l(rec2.mu);
  ASSERT_EQ(rec2.events.size(), 2u);
  EXPECT_EQ(rec2.events[0].first, "/w/3");
  EXPECT_EQ(rec2.events[1].first, "/w/4");
}

TEST_F(OneMember, WatchFromCompactedRevisionIsReported) {
  auto r1 = client_->Put("/c/1", "a");
  ASSERT_TRUE(r1.ok());
  auto r2 = client_->Put("/c/1", "b");
  ASSERT_TRUE(r2.ok());
  ASSERT_TRUE(client_->Compact(*r2).ok());
  Recorder rec;
  Watcher w(client_.get(), "/c/", PrefixEnd("/c/"), *r1, rec.callbacks());
  ASSERT_TRUE(Eventually([&] { return rec.compacted.load() != 0; }, 5s));
  EXPECT_EQ(rec.compacted.load(), *r2);
  EXPECT_EQ(rec.size(), 0u);
}

TEST(EtcdClientErrors, UnreachableEndpointFailsWithinDeadlineNamingIt) {
  EtcdOptions o;
  const int port = testing::FreePort();
  o.endpoints = {fmt::format("127.0.0.1:{}", port)};
  o.call_timeout = 800ms;
  o.attempt_timeout = 300ms;
  auto c = Client(o);
  ASSERT_NE(c, nullptr);
  const auto t0 = std::chrono::steady_clock::now();
  auto g = c->Get("/x");
  const auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), absl::StatusCode::kUnavailable) << g.status();
  EXPECT_NE(g.status().message().find(o.endpoints[0]), std::string::npos) << g.status();
  EXPECT_LT(took, 2s);
  auto p = c->Put("/x", "y");
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("etcd Put \"/x\""), std::string::npos) << p.status();
}

TEST(EtcdClientErrors, BadOptionsRefused) {
  for (const char* bad : {"http://127.0.0.1:2379", "127.0.0.1", "127.0.0.1:", ":2379",
                          "127.0.0.1:99999", "127.0.0.1:x"}) {
    EtcdOptions o;
    o.endpoints = {bad};
    auto c = EtcdClient::Create(o);
    ASSERT_FALSE(c.ok()) << bad;
    EXPECT_NE(c.status().message().find(bad), std::string::npos) << c.status();
  }
  EXPECT_FALSE(EtcdClient::Create(EtcdOptions{}).ok());
  EtcdOptions o;
  o.endpoints = {"127.0.0.1:2379"};
  o.tls = EtcdTls{"/nonexistent/ca.pem", {}, {}, {}};
  auto c = EtcdClient::Create(o);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("/nonexistent/ca.pem"), std::string::npos) << c.status();
}

TEST(PrefixEnd, Basics) {
  EXPECT_EQ(PrefixEnd("/a/"), "/a0");
  EXPECT_EQ(PrefixEnd("a\xff"), "b");
  EXPECT_EQ(PrefixEnd(""), std::string(1, '\0'));
}

// Three members; the member the client talks to is killed: calls, the watch and the lease
// keep-alive carry on through another member.
TEST(ThreeMembers, ClientWatchAndKeeperSurviveKilledMember) {
  EtcdCluster cluster(3);
  ASSERT_TRUE(cluster.WaitReady()) << "etcd did not start; see " << cluster.dir();
  EtcdOptions o = cluster.ClientOptions(cluster.endpoints());
  o.attempt_timeout = 500ms;
  o.call_timeout = 5s;
  auto c = Client(o);
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(c->Put("/k", "0").ok());

  auto lease = c->LeaseGrant(3);
  ASSERT_TRUE(lease.ok()) << lease.status();
  ASSERT_TRUE(c->Put("/leased", "v", lease->id).ok());
  std::atomic<int> renewals{0}, lost{0}, keeper_errors{0};
  LeaseKeeper keeper(c.get(), lease->id, 500ms,
                     LeaseKeeper::Callbacks{[&](SteadyTime, int64_t) { ++renewals; },
                                            [&](absl::Status) { ++lost; },
                                            [&](absl::Status) { ++keeper_errors; }});
  Recorder rec;
  Watcher w(c.get(), "/w/", PrefixEnd("/w/"), 0, rec.callbacks());
  ASSERT_TRUE(Eventually([&] { return w.next_revision() > 0; }, 5s));
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(c->Put(fmt::format("/w/{}", i), "x").ok());
  ASSERT_TRUE(Eventually([&] { return rec.size() == 5; }, 5s));

  const int victim = cluster.member_of(c->current_endpoint());
  ASSERT_GE(victim, 0);
  cluster.Kill(victim);

  // Calls go on through another member. A write that was sent but not answered in time (the
  // killed member may have been etcd's leader: the others elect a new one first) is reported as
  // DEADLINE_EXCEEDED and not repeated by the client (it may have been applied); this one is
  // harmless to repeat, so the test does, as the coordinator does with its guarded Txns.
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 5; i < 20; ++i) {
    absl::StatusOr<int64_t> p = c->Put(fmt::format("/w/{}", i), "x");
    for (int retry = 0;
         !p.ok() && p.status().code() == absl::StatusCode::kDeadlineExceeded && retry < 5;
         ++retry) {
      p = c->Put(fmt::format("/w/{}", i), "x");
    }
    ASSERT_TRUE(p.ok()) << "put " << i << ": " << p.status();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
  EXPECT_NE(cluster.member_of(c->current_endpoint()), victim);
  auto g = c->Range("/w/", PrefixEnd("/w/"));
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->kvs.size(), 20u);

  // The watch resumed on another member without losing or repeating an event: one event per
  // version of each key (a repeated put is a second version), in order, with increasing revisions.
  size_t versions = 0;
  for (const KeyValue& kv : g->kvs) versions += static_cast<size_t>(kv.version);
  ASSERT_TRUE(Eventually([&] { return rec.size() >= versions; }, 10s)) << rec.size();
  std::this_thread::sleep_for(200ms);
  {
    std::lock_guard l(rec.mu);
    ASSERT_EQ(rec.events.size(), versions);
    std::vector<std::string> keys;
    for (size_t i = 0; i < rec.events.size(); ++i) {
      if (i > 0) {
        EXPECT_LT(rec.revisions[i - 1], rec.revisions[i]);
      }
      if (keys.empty() || keys.back() != rec.events[i].first) keys.push_back(rec.events[i].first);
    }
    ASSERT_EQ(keys.size(), 20u);
    for (int i = 0; i < 20; ++i) EXPECT_EQ(keys[i], fmt::format("/w/{}", i));
  }

  // The lease outlives two of its TTLs after the kill: the keeper moved too.
  const int before = renewals.load();
  std::this_thread::sleep_for(6s);
  EXPECT_GT(renewals.load(), before + 5);
  EXPECT_EQ(lost.load(), 0);
  auto leased = c->Get("/leased");
  ASSERT_TRUE(leased.ok()) << leased.status();
  EXPECT_EQ(leased->kvs.size(), 1u) << "the lease expired although a member was alive";

  // The killed member comes back and catches up; a client bound only to it sees everything.
  cluster.Restart(victim);
  auto only = Client(cluster.ClientOptions({cluster.endpoint(victim)}));
  ASSERT_TRUE(Eventually(
      [&] {
        auto r = only->Range("/w/", PrefixEnd("/w/"));
        return r.ok() && r->kvs.size() == 20u;
      },
      20s));
}

// TLS to etcd with client certificates (the dev PKI: site-a serves, site-b is the client).
class Tls : public ::testing::Test {
 protected:
  void SetUp() override {
    pki_ = testing::MakeTempDir("etcd-pki");
    const std::string cmd =
        fmt::format("bash {} {} >/dev/null 2>&1", TVILLING_PKI_SCRIPT, pki_.string());
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    cluster_ = std::make_unique<EtcdCluster>(
        1, testing::EtcdTlsFiles{(pki_ / "ca.pem").string(), (pki_ / "site-a.pem").string(),
                                 (pki_ / "site-a.key").string()});
    cluster_->SetClientCert((pki_ / "site-b.pem").string(), (pki_ / "site-b.key").string());
    ASSERT_TRUE(cluster_->WaitReady()) << "etcd did not start; see " << cluster_->dir();
  }
  void TearDown() override {
    cluster_.reset();
    std::error_code ec;
    std::filesystem::remove_all(pki_, ec);
  }
  std::filesystem::path pki_;
  std::unique_ptr<EtcdCluster> cluster_;
};

TEST_F(Tls, ClientCertificateWorks) {
  auto c = Client(cluster_->ClientOptions(cluster_->endpoints()));
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(c->Put("/tls", "ok").ok());
  auto g = c->Get("/tls");
  ASSERT_TRUE(g.ok()) << g.status();
  ASSERT_EQ(g->kvs.size(), 1u);
}

TEST_F(Tls, StrangersAreRefusedWithAClearError) {
  EtcdOptions base = cluster_->ClientOptions(cluster_->endpoints());
  base.call_timeout = 1500ms;
  base.attempt_timeout = 500ms;
  {  // plain TCP against a TLS member
    EtcdOptions o = base;
    o.tls.reset();
    auto c = Client(o);
    auto g = c->Get("/tls");
    ASSERT_FALSE(g.ok());
    EXPECT_NE(g.status().message().find(o.endpoints[0]), std::string::npos) << g.status();
  }
  {  // no client certificate
    EtcdOptions o = base;
    o.tls->cert.clear();
    o.tls->key.clear();
    auto g = Client(o)->Get("/tls");
    EXPECT_FALSE(g.ok());
  }
  {  // a certificate from another CA
    EtcdOptions o = base;
    o.tls->cert = pki_ / "other-site-a.pem";
    o.tls->key = pki_ / "other-site-a.key";
    auto g = Client(o)->Get("/tls");
    EXPECT_FALSE(g.ok());
  }
  {  // the server's certificate does not chain to the CA we trust
    EtcdOptions o = base;
    o.tls->ca = pki_ / "other-ca.pem";
    auto g = Client(o)->Get("/tls");
    EXPECT_FALSE(g.ok());
  }
  {  // a key that is not a key
    EtcdOptions o = base;
    o.tls->key = pki_ / "site-b.pem";
    auto c = EtcdClient::Create(o);
    ASSERT_FALSE(c.ok());
    EXPECT_NE(c.status().message().find("site-b.pem"), std::string::npos) << c.status();
  }
}

}  // namespace
}  // namespace tvilling::coordinator
