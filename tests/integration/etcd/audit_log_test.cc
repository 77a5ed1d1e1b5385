// audit_log_test.cc: node::AuditLog against the real Debian `etcd` (3.4) on 127.0.0.1. A record
// made while etcd is away (a role switch during a partition is exactly that) is kept once etcd is
// back, under the key it was stamped with, once; an agent stopping with etcd away does not hang on
// the records still waiting and writes them to its own log instead.
#include "agent/node/audit_log.h"

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "tests/integration/etcd/etcd_cluster.h"

namespace tvilling::node {
namespace {

using namespace std::chrono_literals;
using testing::EtcdCluster;

ops::Config ConfigFor(const EtcdCluster& etcd) {
  ops::Config c;
  c.agent.site = "site-a";
  ops::CoordinatorConfig co;
  co.endpoints = etcd.endpoints();
  co.timeout_ms = 500;
  c.coordinator = co;
  return c;
}

v1::AuditRecord Demoted(const std::string& detail) {
  v1::AuditRecord r;
  r.set_group("g0");
  r.set_action("demoted");
  r.set_outcome("ok");
  r.set_detail(detail);
  return r;
}

std::vector<coordinator::KeyValue> AuditKeys(const EtcdCluster& etcd) {
  auto c = coordinator::EtcdClient::Create(etcd.ClientOptions(etcd.endpoints()));
  EXPECT_TRUE(c.ok()) << c.status();
  if (!c.ok()) return {};
  const std::string prefix = "/tvilling/groups/g0/audit/";
  auto r = (*c)->Range(prefix, coordinator::PrefixEnd(prefix));
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? r->kvs : std::vector<coordinator::KeyValue>{};
}

TEST(AuditLogEtcd, ARecordMadeWhileEtcdIsAwayIsKeptOnceItIsBack) {
  EtcdCluster etcd(1);
  ASSERT_TRUE(etcd.WaitReady()) << "etcd did not start; see " << etcd.dir();
  auto audit = AuditLog::Open(ConfigFor(etcd));
  ASSERT_TRUE(audit.ok()) << audit.status();

  etcd.Kill(0);
  const auto made = std::chrono::system_clock::now();
  (*audit)->RecordLater(Demoted("while etcd was away"));
  // A synchronous record says that etcd did not take it.
  absl::Status now = (*audit)->Record(Demoted("synchronous"));
  EXPECT_EQ(now.code(), absl::StatusCode::kUnavailable) << now;
  EXPECT_NE(now.message().find("not kept in etcd"), std::string::npos) << now;
  std::this_thread::sleep_for(2s);  // several attempts fail meanwhile

  etcd.Restart(0);
  ASSERT_TRUE(etcd.WaitReady()) << "etcd did not come back; see " << etcd.dir();
  std::vector<coordinator::KeyValue> kvs;
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (std::chrono::steady_clock::now() < deadline) {
    kvs = AuditKeys(etcd);
    if (!kvs.empty()) break;
    std::this_thread::sleep_for(100ms);
  }
  ASSERT_EQ(kvs.size(), 1u) << "the record made while etcd was away is not in etcd (once)";
  EXPECT_NE(kvs[0].value.find("while etcd was away"), std::string::npos) << kvs[0].value;
  // Stamped when it was made, not when etcd took it.
  auto listed = (*audit)->List("g0", 0);
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->records_size(), 1);
  const auto made_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(made.time_since_epoch()).count();
  EXPECT_LT(listed->records(0).unix_ms(), static_cast<uint64_t>(made_ms) + 1000);
}

TEST(AuditLogEtcd, StoppingWithEtcdAwayDoesNotWaitForIt) {
  EtcdCluster etcd(1);
  ASSERT_TRUE(etcd.WaitReady()) << "etcd did not start; see " << etcd.dir();
  auto audit = AuditLog::Open(ConfigFor(etcd));
  ASSERT_TRUE(audit.ok()) << audit.status();
  etcd.Kill(0);
  for (int i = 0; i < 20; ++i) (*audit)->RecordLater(Demoted("record " + std::to_string(i)));
  std::this_thread::sleep_for(1s);
  const auto t0 = std::chrono::steady_clock::now();
  audit->reset();
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_LT(took, 5s) << "stopping waited for etcd for each of the records";
}

}  // namespace
}  // namespace tvilling::node
