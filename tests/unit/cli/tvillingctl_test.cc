// tvillingctl_test.cc: tvillingctl against a tiny in-process Control server on a temporary unix
// socket that returns a fixed StatusReply: the table form, the JSON form (round trip and exact
// shape), socket selection (--socket, --state-dir), the exit codes (0 ok, 1 unreachable or
// refused, 2 usage) and the number formats. The real status comes from the node; this tests the
// CLI.
#include <gmock/gmock.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/message_differencer.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "agent/cli/ctl.h"
#include "agent/cli/switchover.h"
#include "agent/cli/verify.h"
#include "tvilling/v1/control.grpc.pb.h"

namespace tvilling::cli {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

v1::StatusReply FixedReply() {
  v1::StatusReply reply;
  v1::AgentInfo* agent = reply.mutable_agent();
  agent->set_site("site-a");
  agent->set_version("0.1.0");
  agent->set_uptime_s(7384);

  v1::GroupStatus* g0 = reply.add_groups();
  g0->set_name("g0");
  g0->set_role("primary");
  g0->set_epoch(3);
  g0->set_consistent(true);
  g0->set_last_lsn(1200);
  g0->set_durable_lsn(1200);
  g0->set_applied_lsn(1190);
  g0->set_write_released(1200);
  g0->set_flush_released(1195);
  v1::PeerStatus* b = g0->add_peers();
  b->set_peer("site-b");
  b->set_mode("sync");
  b->set_link_state("connected");
  b->set_received_lsn(1200);
  b->set_durable_lsn(1198);
  b->set_applied_lsn(1100);
  b->set_in_sync_set(true);
  b->set_lag_lsns(2);
  b->set_lag_bytes(8192);
  b->set_lag_seconds(0.003);
  b->set_rtt_us(250);
  b->set_window_bytes(4 << 20);
  b->set_inflight_bytes(65536);
  v1::PeerStatus* c = g0->add_peers();
  c->set_peer("site-c");
  c->set_mode("async");
  c->set_link_state("copying");
  c->set_received_lsn(900);
  c->set_durable_lsn(900);
  c->set_lag_lsns(300);
  c->set_lag_bytes(1258291);
  c->set_lag_seconds(4.2);
  c->set_rtt_us(12500);
  c->set_window_bytes(8 << 20);
  c->set_copy_total_bytes(1ull << 30);
  c->set_copy_done_bytes(483183821);
  c->set_copy_bytes_per_s(54840934);  // 52.3 MiB/s
  c->set_copy_eta_s(11.3);
  c->set_last_error("connection reset by peer");

  v1::GroupStatus* g1 = reply.add_groups();
  g1->set_name("g1");
  g1->set_role("replica");
  g1->set_epoch(2);
  g1->set_last_lsn(50);
  g1->set_durable_lsn(50);
  g1->set_applied_lsn(40);
  g1->set_coordinator_state("replica");
  g1->set_leader_site("site-a");
  g1->set_leader_epoch(3);
  g1->set_failover_refusal("a group of two sites without a witness");

  // A candidate under the approve policy: the plan and its loss bound, not an older refusal.
  v1::GroupStatus* g2 = reply.add_groups();
  g2->set_name("g2");
  g2->set_role("replica");
  g2->set_epoch(4);
  g2->set_last_lsn(95);
  g2->set_durable_lsn(95);
  g2->set_applied_lsn(95);
  g2->set_consistent(true);
  g2->set_coordinator_state("awaiting-approval");
  g2->set_failover_refusal("an older refusal");
  g2->set_failover_pending(
      "the primary site-a is gone: promote site-b (loses LSN 96..100, 5000 bytes, 2.0 s of "
      "writes)");
  g2->set_failover_pending_loss_from_lsn(96);
  g2->set_failover_pending_loss_to_lsn(100);
  g2->set_failover_pending_loss_bytes(5000);
  g2->set_failover_pending_loss_seconds(2.0);
  return reply;
}

class FakeControl final : public v1::Control::Service {
 public:
  grpc::Status Status(grpc::ServerContext*, const v1::StatusRequest*,
                      v1::StatusReply* reply) override {
    ++calls;
    if (!error.ok()) return error;
    *reply = FixedReply();
    return grpc::Status::OK;
  }

  std::atomic<int> calls{0};
  grpc::Status error = grpc::Status::OK;
};

struct Result {
  int code = -1;
  std::string out;
  std::string err;
};

Result Ctl(std::vector<std::string> args) {
  args.insert(args.begin(), "tvillingctl");
  std::vector<const char*> argv;
  for (const std::string& arg : args) argv.push_back(arg.c_str());
  std::ostringstream out;
  std::ostringstream err;
  Result result;
  result.code = RunTvillingctl(static_cast<int>(argv.size()), argv.data(), out, err);
  result.out = out.str();
  result.err = err.str();
  return result;
}

class TvillingctlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "/tvillingctl_XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = std::filesystem::path(pattern).lexically_normal().string();
    socket_ = dir_ + "/tvillingd.sock";
  }

  void TearDown() override {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    std::filesystem::remove_all(dir_);
  }

  void StartServer() {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("unix:" + socket_, grpc::InsecureServerCredentials());
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr) << socket_;
  }

  std::string dir_;
  std::string socket_;
  FakeControl service_;
  std::unique_ptr<grpc::Server> server_;
};

TEST_F(TvillingctlTest, StatusPrintsTables) {
  StartServer();
  const Result r = Ctl({"--socket", socket_, "status"});
  EXPECT_EQ(r.code, kExitOk) << r.err;
  EXPECT_EQ(r.err, "");
  EXPECT_EQ(service_.calls.load(), 1);
  const std::string want =
      "agent site-a  version 0.1.0  up 2h03m04s\n"
      "\n"
      "g0 role:primary epoch:3 consistent:yes\n"
      "  LAST-LSN  DURABLE  APPLIED  WRITE-RELEASED  FLUSH-RELEASED\n"
      "  1200      1200     1190     1200            1195\n"
      "  PEER    MODE   LINK       RECEIVED  DURABLE  APPLIED  STATE        LAG-LSNS  LAG      "
      "LAG-S  RTT     WINDOW   IN-FLIGHT  COPY\n"
      "  site-b  sync   connected  1200      1198     1100     in-sync-set  2         8.0 KiB  "
      "0.003  250us   4.0 MiB  64.0 KiB   -\n"
      "  site-c  async  copying    900       900      0        -            300       1.2 MiB  "
      "4.200  12.5ms  8.0 MiB  0 B        [####------] 45.0% (460.8 MiB of 1.0 GiB) 52.3 MiB/s "
      "ETA 11s\n"
      "  site-c: last error: connection reset by peer\n"
      "\n"
      "g1 role:replica epoch:2 consistent:no coordinator:replica leader:site-a@3\n"
      "  automatic fail-over refused: a group of two sites without a witness\n"
      "  LAST-LSN  DURABLE  APPLIED  WRITE-RELEASED  FLUSH-RELEASED\n"
      "  50        50       40       0               0\n"
      "  no peers\n"
      "\n"
      "g2 role:replica epoch:4 consistent:yes coordinator:awaiting-approval leader:none\n"
      "  promotion pending approval: the primary site-a is gone: promote site-b (loses LSN "
      "96..100, 5000 bytes, 2.0 s of writes); approve with `tvillingctl failover approve --group "
      "g2` on this site\n"
      "  LAST-LSN  DURABLE  APPLIED  WRITE-RELEASED  FLUSH-RELEASED\n"
      "  95        95       95       0               0\n"
      "  no peers\n";
  EXPECT_EQ(r.out, want);
}

TEST_F(TvillingctlTest, StatusJsonRoundTripsWithEveryField) {
  StartServer();
  const Result r = Ctl({"--socket", socket_, "status", "--json"});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  // One line, one object.
  ASSERT_FALSE(r.out.empty());
  EXPECT_EQ(r.out.back(), '\n');
  EXPECT_EQ(r.out.find('\n'), r.out.size() - 1);
  v1::StatusReply parsed;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(r.out, &parsed).ok()) << r.out;
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(parsed, FixedReply()))
      << parsed.DebugString();
  // The documented shape: .proto field names, 64-bit numbers as strings, defaults present.
  for (std::string_view fragment :
       {"\"agent\":{\"site\":\"site-a\",\"version\":\"0.1.0\",\"uptime_s\":\"7384\"}",
        "\"write_released\":\"1200\"", "\"lag_seconds\":0.003", "\"in_sync_set\":true",
        "\"degraded\":false", "\"applied_lsn\":\"0\"", "\"copy_total_bytes\":\"0\"",
        "\"last_error\":\"\"", "\"last_error\":\"connection reset by peer\"",
        "\"consistent\":false", "\"peers\":[]", "\"failover_pending\":\"\"",
        "\"failover_pending_loss_from_lsn\":\"96\"", "\"failover_pending_loss_bytes\":\"5000\"",
        "\"failover_pending_loss_seconds\":2"}) {
    EXPECT_THAT(r.out, HasSubstr(fragment));
  }
  EXPECT_THAT(r.out, Not(HasSubstr("lagSeconds")));
}

TEST_F(TvillingctlTest, StatusWatchJsonPrintsOneObjectPerReport) {
  StartServer();
  const auto t0 = std::chrono::steady_clock::now();
  const Result r =
      Ctl({"--socket", socket_, "status", "--json", "--watch", "0.05", "--count", "4"});
  const auto elapsed = std::chrono::steady_clock::now() - t0;
  ASSERT_EQ(r.code, kExitOk) << r.err;
  EXPECT_EQ(service_.calls.load(), 4);
  std::istringstream lines(r.out);
  std::string line;
  int n = 0;
  while (std::getline(lines, line)) {
    v1::StatusReply parsed;
    ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(line, &parsed).ok()) << line;
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(parsed, FixedReply()));
    ++n;
  }
  EXPECT_EQ(n, 4);
  // Three intervals between four reports.
  EXPECT_GE(elapsed, std::chrono::milliseconds(150));
}

TEST_F(TvillingctlTest, StatusWatchStopsAtTheFirstError) {
  StartServer();
  const Result r = Ctl({"--socket", socket_, "status", "--watch", "0.01", "--count", "3"});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  // Tables: the reports are separated by an empty line.
  EXPECT_EQ(service_.calls.load(), 3);
  service_.error = grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "no");
  const Result bad = Ctl({"--socket", socket_, "status", "--watch", "0.01", "--count", "3"});
  EXPECT_EQ(bad.code, kExitUnreachable);
  EXPECT_EQ(service_.calls.load(), 4);
  EXPECT_THAT(bad.err, HasSubstr("refused Status: no"));
}

TEST(FormatStatusJsonTest, EmptyReplyHasTheFullShape) {
  absl::StatusOr<std::string> json = FormatStatusJson(v1::StatusReply());
  ASSERT_TRUE(json.ok()) << json.status();
  EXPECT_EQ(*json, "{\"agent\":{\"site\":\"\",\"version\":\"\",\"uptime_s\":\"0\"},\"groups\":[]}");
  EXPECT_EQ(FormatStatusText(v1::StatusReply()), "agent ?  version ?  up 0s\nno groups\n");
}

TEST_F(TvillingctlTest, StateDirSelectsItsSocket) {
  StartServer();
  const Result r = Ctl({"--state-dir", dir_, "status"});
  EXPECT_EQ(r.code, kExitOk) << r.err;
  EXPECT_THAT(r.out, HasSubstr("agent site-a"));
  // A relative --socket works too (made absolute against the current directory).
  const std::filesystem::path cwd = std::filesystem::current_path();
  std::filesystem::current_path(dir_);
  const Result relative = Ctl({"--socket", "tvillingd.sock", "status"});
  std::filesystem::current_path(cwd);
  EXPECT_EQ(relative.code, kExitOk) << relative.err;
}

TEST_F(TvillingctlTest, MissingSocketIsUnreachable) {
  const Result r = Ctl({"--socket", socket_, "status"});
  EXPECT_EQ(r.code, kExitUnreachable);
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, HasSubstr("cannot reach tvillingd: no socket at " + socket_ +
                               " (No such file or directory); is tvillingd running?"));
  const Result json = Ctl({"--state-dir", dir_, "status", "--json"});
  EXPECT_EQ(json.code, kExitUnreachable);
  EXPECT_EQ(json.out, "");
  EXPECT_THAT(json.err, HasSubstr("no socket at " + socket_));
}

TEST_F(TvillingctlTest, SocketWithoutAServerIsUnreachable) {
  // Bound but not listening: connect() is refused, as after tvillingd died.
  const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  ASSERT_LT(socket_.size(), sizeof(address.sun_path));
  std::memcpy(address.sun_path, socket_.c_str(), socket_.size() + 1);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  const Result r = Ctl({"--socket", socket_, "--timeout", "2", "status"});
  ::close(fd);
  EXPECT_EQ(r.code, kExitUnreachable);
  EXPECT_THAT(r.err, HasSubstr("cannot reach tvillingd at unix socket " + socket_ + ": "));

  std::filesystem::remove(socket_);
  { std::ofstream(socket_) << "not a socket"; }
  const Result file = Ctl({"--socket", socket_, "status"});
  EXPECT_EQ(file.code, kExitUnreachable);
  EXPECT_THAT(file.err, HasSubstr(socket_ + " is not a unix socket"));
}

TEST_F(TvillingctlTest, ServerErrorIsReported) {
  service_.error = grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no status yet");
  StartServer();
  const Result r = Ctl({"--socket", socket_, "status"});
  EXPECT_EQ(r.code, kExitUnreachable);
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, HasSubstr("tvillingd at unix socket " + socket_ +
                               " refused Status: no status yet (gRPC code 12)"));
}

TEST(TvillingctlUsageTest, BadCommandLinesExitWith2) {
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{},
                                             {"stat"},
                                             {"--bogus", "status"},
                                             {"status", "--bogus"},
                                             {"--socket", "a", "--state-dir", "b", "status"},
                                             {"--timeout", "0", "status"},
                                             {"--socket"}}) {
    const Result r = Ctl(args);
    EXPECT_EQ(r.code, kExitUsage) << ::testing::PrintToString(args);
    EXPECT_FALSE(r.err.empty()) << ::testing::PrintToString(args);
    EXPECT_EQ(r.out, "") << ::testing::PrintToString(args);
  }
  const Result help = Ctl({"--help"});
  EXPECT_EQ(help.code, kExitOk);
  EXPECT_THAT(help.out, HasSubstr("--state-dir"));
  EXPECT_THAT(help.out, HasSubstr("status"));
  const Result status_help = Ctl({"status", "--help"});
  EXPECT_EQ(status_help.code, kExitOk);
  EXPECT_THAT(status_help.out, HasSubstr("--json"));
}

TEST(FormatTest, Numbers) {
  EXPECT_EQ(FormatBytesIec(0), "0 B");
  EXPECT_EQ(FormatBytesIec(1023), "1023 B");
  EXPECT_EQ(FormatBytesIec(1024), "1.0 KiB");
  EXPECT_EQ(FormatBytesIec(1536), "1.5 KiB");
  EXPECT_EQ(FormatBytesIec((1 << 20) - 1), "1.0 MiB");
  EXPECT_EQ(FormatBytesIec(1ull << 30), "1.0 GiB");
  EXPECT_EQ(FormatBytesIec(5ull << 40), "5.0 TiB");
  EXPECT_EQ(FormatBytesIec(UINT64_MAX), "16.0 EiB");
  EXPECT_EQ(FormatMicros(0), "0us");
  EXPECT_EQ(FormatMicros(999), "999us");
  EXPECT_EQ(FormatMicros(12500), "12.5ms");
  EXPECT_EQ(FormatMicros(1'200'000), "1.20s");
  EXPECT_EQ(FormatUptime(0), "0s");
  EXPECT_EQ(FormatUptime(59), "59s");
  EXPECT_EQ(FormatUptime(723), "12m03s");
  EXPECT_EQ(FormatUptime(7384), "2h03m04s");
  EXPECT_EQ(FormatUptime(3 * 86400 + 4 * 3600 + 5 * 60 + 6), "3d04h05m");
}

TEST_F(TvillingctlTest, SwitchoverDryRunPrintsThePlanOrWhyNot) {
  StartServer();
  // The fixture's site-b link is "connected", not streaming: refused, with the plan and the reason.
  Result r =
      Ctl({"--socket", socket_, "switchover", "--group", "g0", "--to", "site-b", "--dry-run"});
  EXPECT_EQ(r.code, kExitRefused) << r.err;
  EXPECT_THAT(r.out, HasSubstr("switchover of group g0 from site-a (epoch 3) to site-b: dry run, "
                               "nothing changed"));
  EXPECT_THAT(r.out, HasSubstr("1. pause new writes at site-a (held, not failed)"));
  EXPECT_THAT(r.out, HasSubstr("lag 8.0 KiB / 0.003 s, rtt 250 us"));
  EXPECT_THAT(r.out, HasSubstr("refused:\n    - site-b's link is connected"));
  r = Ctl({"--socket", socket_, "switchover", "--group", "g0", "--to", "site-x", "--dry-run"});
  EXPECT_EQ(r.code, kExitRefused);
  EXPECT_THAT(r.out, HasSubstr("site-x is not a peer of group g0"));
  r = Ctl({"--socket", socket_, "switchover", "--group", "g1", "--to", "site-b", "--dry-run"});
  EXPECT_EQ(r.code, kExitRefused);
  EXPECT_THAT(r.out, HasSubstr("is a replica of group g1: run the switchover on its primary"));
  r = Ctl({"--socket", socket_, "switchover", "--group", "nope", "--to", "site-b", "--dry-run"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("has no group \"nope\" (it has: g0, g1, g2)"));
  // Without --dry-run the agent carries it out; this fixture serves Status only.
  r = Ctl({"--socket", socket_, "switchover", "--group", "g0", "--to", "site-b"});
  EXPECT_EQ(r.code, kExitUnreachable);
  EXPECT_THAT(r.err,
              HasSubstr("switchover of group g0 to site-b could not be asked: gRPC code 12"));
  r = Ctl({"--socket", socket_, "switchover", "--to", "site-b", "--dry-run"});
  EXPECT_EQ(r.code, kExitUsage);
}

// An agent at site-a, primary of g0..g3 (site-b a streaming sync peer of each) and replica of r0,
// that carries out Switchover by answering after a short while: OK, or for `fail` a roll-back.
class EvacControl final : public v1::Control::Service {
 public:
  grpc::Status Status(grpc::ServerContext*, const v1::StatusRequest*,
                      v1::StatusReply* reply) override {
    reply->mutable_agent()->set_site("site-a");
    for (const char* name : {"g3", "g1", "r0", "g0", "g2"}) {
      v1::GroupStatus* g = reply->add_groups();
      g->set_name(name);
      g->set_role(name[0] == 'r' ? "replica" : "primary");
      g->set_epoch(7);
      g->set_last_lsn(100);
      v1::PeerStatus* p = g->add_peers();
      p->set_peer("site-b");
      p->set_mode("sync");
      p->set_link_state("streaming");
      p->set_durable_lsn(100);
    }
    return grpc::Status::OK;
  }
  grpc::Status Switchover(grpc::ServerContext*, const v1::SwitchoverRequest* req,
                          v1::SwitchoverReply* reply) override {
    const int now = ++in_flight;
    int seen = max_in_flight.load();
    while (now > seen && !max_in_flight.compare_exchange_weak(seen, now)) {
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      calls.push_back(req->group());
      contexts.push_back(req->context());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(60));
    --in_flight;
    if (req->group() == fail) {
      return grpc::Status(grpc::StatusCode::ABORTED,
                          "site-b did not catch up within 1500 ms (its durable LSN 90 of 100); "
                          "rolled back: writes resumed on site-a after a pause of 1500 ms, "
                          "nothing changed");
    }
    reply->set_message("site-b is the primary of group " + req->group());
    reply->set_pause_ms(12);
    return grpc::Status::OK;
  }

  std::string fail;
  std::mutex mu;
  std::vector<std::string> calls;     // GUARDED_BY(mu)
  std::vector<std::string> contexts;  // GUARDED_BY(mu)
  std::atomic<int> in_flight{0};
  std::atomic<int> max_in_flight{0};
};

class EvacuateTest : public TvillingctlTest {
 protected:
  void StartEvac() {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("unix:" + socket_, grpc::InsecureServerCredentials());
    builder.RegisterService(&evac_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr) << socket_;
  }
  EvacControl evac_;
};

TEST_F(EvacuateTest, MovesEveryPrimaryGroupInOrder) {
  StartEvac();
  const Result r = Ctl({"--socket", socket_, "switchover", "--all-groups", "--from", "site-a",
                        "--to", "site-b", "--order", "g2,r0"});
  EXPECT_EQ(r.code, kExitOk) << r.out << r.err;
  EXPECT_EQ(evac_.calls, (std::vector<std::string>{"g2", "g0", "g1", "g3"}));
  EXPECT_EQ(evac_.max_in_flight.load(), 1);
  ASSERT_EQ(evac_.contexts.size(), 4u);
  EXPECT_EQ(evac_.contexts[0], "evacuation of site-a to site-b, group 1 of 4");
  EXPECT_EQ(evac_.contexts[3], "evacuation of site-a to site-b, group 4 of 4");
  EXPECT_THAT(r.out, HasSubstr("evacuation of site-a to site-b: 4 group(s) in this order: "
                               "g2,g0,g1,g3; concurrency 1"));
  EXPECT_THAT(r.out, HasSubstr("stays: r0: site site-a is its replica, not its primary"));
  EXPECT_THAT(r.out, HasSubstr("  g1: moved: site-b is the primary of group g1 (write pause 12 "
                               "ms)\n"));
  EXPECT_THAT(r.out, HasSubstr("evacuation of site-a to site-b: 4 of 4 groups moved\n"));
}

TEST_F(EvacuateTest, ConcurrencyRunsSeveralAtATime) {
  StartEvac();
  const Result r = Ctl({"--socket", socket_, "switchover", "--all-groups", "--from", "site-a",
                        "--to", "site-b", "--concurrency", "2"});
  EXPECT_EQ(r.code, kExitOk) << r.out << r.err;
  EXPECT_EQ(evac_.calls.size(), 4u);
  EXPECT_EQ(evac_.max_in_flight.load(), 2);
}

TEST_F(EvacuateTest, FirstRollBackAbortsTheRest) {
  evac_.fail = "g1";
  StartEvac();
  const Result r = Ctl(
      {"--socket", socket_, "switchover", "--all-groups", "--from", "site-a", "--to", "site-b"});
  EXPECT_EQ(r.code, kExitRefused) << r.out << r.err;
  EXPECT_EQ(evac_.calls, (std::vector<std::string>{"g0", "g1"}));
  EXPECT_THAT(r.out, HasSubstr("  g0: moved: "));
  EXPECT_THAT(r.out, HasSubstr("  g1: rolled back: site-b did not catch up within 1500 ms"));
  EXPECT_THAT(r.out, HasSubstr("  g2: not started\n  g3: not started\n"));
  EXPECT_THAT(r.out, HasSubstr("1 of 4 groups moved; aborted: group g1 rolled back"));
}

TEST_F(EvacuateTest, DryRunPrintsEveryPlanAndChangesNothing) {
  StartEvac();
  const Result r = Ctl({"--socket", socket_, "switchover", "--all-groups", "--from", "site-a",
                        "--to", "site-b", "--dry-run"});
  EXPECT_EQ(r.code, kExitOk) << r.out << r.err;
  EXPECT_TRUE(evac_.calls.empty());
  for (const char* g : {"g0", "g1", "g2", "g3"}) {
    EXPECT_THAT(r.out, HasSubstr(std::string("switchover of group ") + g +
                                 " from site-a (epoch 7) to site-b: dry run"));
  }
  EXPECT_THAT(r.out, HasSubstr("every plan is possible now"));
}

TEST_F(EvacuateTest, UsageErrors) {
  StartEvac();
  // The agent asked is not the site to evacuate.
  Result r = Ctl(
      {"--socket", socket_, "switchover", "--all-groups", "--from", "site-c", "--to", "site-b"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("is site site-a; run it on the agent of site site-c"));
  r = Ctl({"--socket", socket_, "switchover", "--all-groups", "--from", "site-a", "--to", "site-b",
           "--order", "g0,nope"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("--order names group \"nope\", which site site-a does not have"));
  r = Ctl({"--socket", socket_, "switchover", "--all-groups", "--to", "site-b"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_THAT(r.err, HasSubstr("needs --from SITE"));
  r = Ctl({"--socket", socket_, "switchover", "--all-groups", "--group", "g0", "--from", "site-a",
           "--to", "site-b"});
  EXPECT_EQ(r.code, kExitUsage);
  r = Ctl({"--socket", socket_, "switchover", "--from", "site-a", "--to", "site-b"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_TRUE(evac_.calls.empty());
}

v1::VerifyStatus VerifyResult(const std::string& state, uint64_t mismatches) {
  v1::VerifyStatus st;
  st.set_state(state);
  st.set_mismatch_chunks(mismatches);
  return st;
}

TEST(VerifyTest, ExitCodesTellIdenticalMismatchesAndIncompleteApart) {
  EXPECT_EQ(VerifyExitCode({VerifyResult("identical", 0)}), kExitOk);
  EXPECT_EQ(VerifyExitCode({VerifyResult("identical", 0), VerifyResult("mismatches", 2)}),
            kExitVerifyMismatch);
  // A mismatch wins over a failure elsewhere: something differs.
  EXPECT_EQ(VerifyExitCode({VerifyResult("failed", 0), VerifyResult("mismatches", 1)}),
            kExitVerifyMismatch);
  EXPECT_EQ(VerifyExitCode({VerifyResult("incomplete", 0)}), kExitVerifyIncomplete);
  EXPECT_EQ(VerifyExitCode({VerifyResult("failed", 0)}), kExitVerifyIncomplete);
  EXPECT_EQ(VerifyExitCode({VerifyResult("cancelled", 0)}), kExitVerifyIncomplete);
  EXPECT_EQ(VerifyExitCode({}), kExitVerifyIncomplete);
  v1::VerifyStatus resync_failed = VerifyResult("identical", 0);
  resync_failed.set_resync("failed: x");
  EXPECT_EQ(VerifyExitCode({resync_failed}), kExitVerifyIncomplete);
  EXPECT_NE(kExitVerifyMismatch, kExitRefused);
  EXPECT_NE(kExitVerifyIncomplete, kExitUnreachable);
}

TEST(VerifyTest, ResultListsTheRangesAndTheResync) {
  v1::VerifyProgress p;
  p.set_group("g0");
  p.set_peer("site-b");
  p.set_done(true);
  v1::VerifyStatus* st = p.mutable_status();
  *st = VerifyResult("mismatches", 1);
  st->set_total_chunks(64);
  st->set_compared_chunks(64);
  st->set_total_bytes(64 << 20);
  st->set_done_bytes(64 << 20);
  st->set_mismatch_bytes(1 << 20);
  v1::VerifyRange* r = st->add_mismatches();
  r->set_volume("vol0");
  r->set_offset(37 << 20);
  r->set_length(1 << 20);
  st->set_resync("done");
  st->set_resynced_bytes(1 << 20);
  const std::string text = FormatVerifyResult(p);
  EXPECT_THAT(text, HasSubstr("group g0 peer site-b: mismatches: 64 of 64 chunk(s) compared"));
  EXPECT_THAT(text, HasSubstr("1 mismatching (1.0 MiB)"));
  EXPECT_THAT(text, HasSubstr("mismatch: volume vol0 offset 38797312 length 1048576 (1.0 MiB)"));
  EXPECT_THAT(text, HasSubstr("resync: done (1.0 MiB restored from this site)"));
}

TEST(VerifyTest, ProgressBarIsTheCopysBar) {
  EXPECT_EQ(FormatProgressBar(40 << 20, 64 << 20, 16 << 20, 1.5),
            "[######----] 62.5% (40.0 MiB of 64.0 MiB) 16.0 MiB/s ETA 2s");
  EXPECT_EQ(FormatProgressBar(0, 64 << 20, 0, 0), "[----------] 0.0% (0 B of 64.0 MiB)");
}

}  // namespace
}  // namespace tvilling::cli
