// metrics_test.cc: the Prometheus exposition (names, types, histogram buckets, label escaping), the
// client I/O counters, and the /metrics HTTP server on 127.0.0.1 spoken to over a real socket.
#include "agent/ops/metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <string>

#include "agent/ops/agent_metrics.h"
#include "agent/ops/metrics_server.h"

namespace tvilling::ops {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

TEST(ExpositionTest, RendersFamiliesWithHelpTypeAndLabels) {
  Exposition e;
  e.Gauge("tvilling_peer_lag_bytes", "Bytes.", {{"site", "a"}, {"peer", "b"}}, 4096);
  e.Counter("tvilling_x_total", "A counter.", {{"site", "a"}}, 7);
  e.Gauge("tvilling_peer_lag_bytes", "Bytes.", {{"site", "a"}, {"peer", "c\"d\\e\nf"}}, 0);
  const std::string text = e.Render();
  EXPECT_THAT(text, HasSubstr("# HELP tvilling_peer_lag_bytes Bytes.\n"
                              "# TYPE tvilling_peer_lag_bytes gauge\n"
                              "tvilling_peer_lag_bytes{site=\"a\",peer=\"b\"} 4096\n"));
  // Label values are escaped as the text format demands; both series share one family.
  EXPECT_THAT(text, HasSubstr("tvilling_peer_lag_bytes{site=\"a\",peer=\"c\\\"d\\\\e\\nf\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("# TYPE tvilling_x_total counter\ntvilling_x_total{site=\"a\"} 7\n"));
  EXPECT_EQ(text.find("# TYPE tvilling_peer_lag_bytes"),
            text.rfind("# TYPE tvilling_peer_lag_bytes"));
}

TEST(ExpositionTest, HistogramHasCumulativeBucketsInSecondsAndInf) {
  storage::LatencyHistogram h;
  h.Record(40'000);          // <= 50 us
  h.Record(50'000);          // <= 50 us (le is inclusive)
  h.Record(3'000'000);       // <= 5 ms
  h.Record(20'000'000'000);  // +Inf
  Exposition e;
  e.Histogram("tvilling_log_fsync_duration_seconds", "Fsyncs.", {{"group", "g0"}}, h.Read());
  const std::string text = e.Render();
  EXPECT_THAT(text, HasSubstr("# TYPE tvilling_log_fsync_duration_seconds histogram\n"));
  EXPECT_THAT(text, HasSubstr("tvilling_log_fsync_duration_seconds_count{group=\"g0\"} 4\n"));
  EXPECT_THAT(text, HasSubstr("tvilling_log_fsync_duration_seconds_sum{group=\"g0\"} 20.00309\n"));
  EXPECT_THAT(
      text, HasSubstr("tvilling_log_fsync_duration_seconds_bucket{group=\"g0\",le=\"5e-05\"} 2\n"));
  EXPECT_THAT(
      text,
      HasSubstr("tvilling_log_fsync_duration_seconds_bucket{group=\"g0\",le=\"0.0025\"} 2\n"));
  EXPECT_THAT(
      text, HasSubstr("tvilling_log_fsync_duration_seconds_bucket{group=\"g0\",le=\"0.005\"} 3\n"));
  EXPECT_THAT(text,
              HasSubstr("tvilling_log_fsync_duration_seconds_bucket{group=\"g0\",le=\"10\"} 3\n"));
  EXPECT_THAT(
      text, HasSubstr("tvilling_log_fsync_duration_seconds_bucket{group=\"g0\",le=\"+Inf\"} 4\n"));
}

TEST(VolumeIoMetricsTest, CountsBytesOfSuccessesAndErrorsByCode) {
  VolumeIoMetrics m;
  const auto now = std::chrono::steady_clock::now();
  m.Done(VolumeIoMetrics::kWrite, now, 4096, absl::OkStatus());
  m.Done(VolumeIoMetrics::kWrite, now, 4096, absl::OkStatus());
  m.Done(VolumeIoMetrics::kWrite, now, 4096, absl::FailedPreconditionError("read-only"));
  m.Done(VolumeIoMetrics::kFlush, now, 0, absl::UnavailableError("peer away"));
  Exposition e;
  m.AppendTo(e, {{"group", "g0"}, {"volume", "v"}});
  const std::string text = e.Render();
  EXPECT_THAT(text, HasSubstr("tvilling_client_io_bytes_total{group=\"g0\",volume=\"v\",op="
                              "\"write\"} 8192\n"));
  EXPECT_THAT(text, HasSubstr("tvilling_client_io_duration_seconds_count{group=\"g0\",volume="
                              "\"v\",op=\"write\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("tvilling_client_io_errors_total{group=\"g0\",volume=\"v\",op="
                              "\"write\",code=\"FAILED_PRECONDITION\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("tvilling_client_io_errors_total{group=\"g0\",volume=\"v\",op="
                              "\"flush\",code=\"UNAVAILABLE\"} 1\n"));
  EXPECT_THAT(text, Not(HasSubstr("op=\"read\",code=")));
}

TEST(StatusMetricsTest, PrimaryRpoBoundIsTheMostCurrentPeersLagAndStatesAreSets) {
  v1::StatusReply r;
  r.mutable_agent()->set_site("site-a");
  r.mutable_agent()->set_version("9.9.9");
  v1::GroupStatus* g = r.add_groups();
  g->set_name("g0");
  g->set_role("primary");
  g->set_epoch(3);
  g->set_last_lsn(100);
  v1::PeerStatus* b = g->add_peers();
  b->set_peer("site-b");
  b->set_mode("sync");
  b->set_link_state("streaming");
  b->set_lag_lsns(2);
  b->set_lag_bytes(8192);
  b->set_lag_seconds(0.25);
  b->set_rtt_us(1500);
  b->set_delivery_rate_bytes_per_s(125'000'000);
  v1::PeerStatus* c = g->add_peers();
  c->set_peer("site-c");
  c->set_mode("async");
  c->set_link_state("disconnected");
  c->set_lag_lsns(40);
  c->set_lag_bytes(1 << 20);
  c->set_lag_seconds(12.5);
  v1::GroupStatus* g1 = r.add_groups();  // a replica no primary has streamed to yet
  g1->set_name("g1");
  g1->set_role("replica");
  g1->add_peers()->set_link_state("disconnected");
  Exposition e;
  AppendStatusMetrics(r, e);
  const std::string t = e.Render();
  EXPECT_THAT(t, HasSubstr("tvilling_agent_info{site=\"site-a\",version=\"9.9.9\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("tvilling_group_rpo_bound_records{site=\"site-a\",group=\"g0\"} 2\n"));
  EXPECT_THAT(t, HasSubstr("tvilling_group_rpo_bound_bytes{site=\"site-a\",group=\"g0\"} 8192\n"));
  EXPECT_THAT(t,
              HasSubstr("tvilling_group_rpo_bound_seconds{site=\"site-a\",group=\"g0\"} 0.25\n"));
  EXPECT_THAT(t,
              HasSubstr("tvilling_group_role{site=\"site-a\",group=\"g0\",role=\"primary\"} 1\n"));
  EXPECT_THAT(t,
              HasSubstr("tvilling_group_role{site=\"site-a\",group=\"g0\",role=\"replica\"} 0\n"));
  EXPECT_THAT(t, HasSubstr("tvilling_peer_up{site=\"site-a\",group=\"g0\",peer=\"site-b\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("tvilling_peer_up{site=\"site-a\",group=\"g0\",peer=\"site-c\"} 0\n"));
  EXPECT_THAT(t, HasSubstr("tvilling_peer_link_state{site=\"site-a\",group=\"g0\",peer=\"site-c\","
                           "state=\"disconnected\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("tvilling_peer_link_state{site=\"site-a\",group=\"g0\",peer=\"site-c\","
                           "state=\"streaming\"} 0\n"));
  EXPECT_THAT(t,
              HasSubstr("tvilling_peer_rtt_seconds{site=\"site-a\",group=\"g0\",peer=\"site-b\"} "
                        "0.0015\n"));
  EXPECT_THAT(t, HasSubstr("tvilling_peer_delivery_rate_bytes_per_second{site=\"site-a\","
                           "group=\"g0\",peer=\"site-b\"} 125000000\n"));
  EXPECT_THAT(
      t, HasSubstr("tvilling_peer_sync_mode{site=\"site-a\",group=\"g0\",peer=\"site-b\"} 1\n"));
  // The replica's unnamed peer is left out; its role is.
  EXPECT_THAT(t, Not(HasSubstr("peer=\"\"")));
  EXPECT_THAT(t,
              HasSubstr("tvilling_group_role{site=\"site-a\",group=\"g1\",role=\"replica\"} 1\n"));
  EXPECT_THAT(t, Not(HasSubstr("tvilling_group_rpo_bound_seconds{site=\"site-a\",group=\"g1\"}")));
}

// tvilling_verify_*: for every peer of a primary; state "none" and zeros before the first verify
// since the start (the alert rules' series exist from the start).
TEST(StatusMetricsTest, VerifyResultOfAPeerIsExported) {
  v1::StatusReply r;
  r.mutable_agent()->set_site("site-a");
  v1::GroupStatus* g = r.add_groups();
  g->set_name("g0");
  g->set_role("primary");
  v1::PeerStatus* b = g->add_peers();
  b->set_peer("site-b");
  v1::VerifyStatus* v = b->mutable_verify();
  v->set_state("mismatches");
  v->set_total_bytes(64 << 20);
  v->set_done_bytes(64 << 20);
  v->set_compared_chunks(64);
  v->set_mismatch_chunks(1);
  v->set_mismatch_bytes(1 << 20);
  v->set_finished_unix_ms(1'700'000'000'500);
  g->add_peers()->set_peer("site-c");  // never verified
  Exposition e;
  AppendStatusMetrics(r, e);
  const std::string t = e.Render();
  const std::string l = "{site=\"site-a\",group=\"g0\",peer=\"site-b\"";
  EXPECT_THAT(t, HasSubstr("tvilling_verify_mismatch_chunks" + l + "} 1\n"));
  EXPECT_THAT(t, HasSubstr("tvilling_verify_mismatch_bytes" + l + "} 1048576\n"));
  EXPECT_THAT(t, HasSubstr("tvilling_verify_compared_chunks" + l + "} 64\n"));
  EXPECT_THAT(t, HasSubstr("tvilling_verify_state" + l + ",state=\"mismatches\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("tvilling_verify_state" + l + ",state=\"identical\"} 0\n"));
  EXPECT_THAT(
      t, HasSubstr("tvilling_verify_last_finished_timestamp_seconds" + l + "} 1700000000.5\n"));
  const std::string c = "{site=\"site-a\",group=\"g0\",peer=\"site-c\"";
  EXPECT_THAT(t, HasSubstr("tvilling_verify_state" + c + ",state=\"none\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("tvilling_verify_state" + c + ",state=\"mismatches\"} 0\n"));
  EXPECT_THAT(t, HasSubstr("tvilling_verify_mismatch_chunks" + c + "} 0\n"));
  EXPECT_THAT(t, HasSubstr("tvilling_verify_state" + l + ",state=\"none\"} 0\n"));
}

// One HTTP/1.1 exchange on a fresh connection; returns the whole response.
std::string Http(uint16_t port, const std::string& request) {
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket s(io);
  s.connect({boost::asio::ip::make_address("127.0.0.1"), port});
  boost::asio::write(s, boost::asio::buffer(request));
  std::string response;
  boost::system::error_code ec;
  boost::asio::read(s, boost::asio::dynamic_buffer(response), ec);  // until the server closes
  return response;
}

TEST(MetricsServerTest, ServesMetricsAndRefusesTheRest) {
  int renders = 0;
  auto server = MetricsServer::Start("127.0.0.1", 0, [&] {
    ++renders;
    return std::string("tvilling_up 1\n");
  });
  ASSERT_TRUE(server.ok()) << server.status();
  const uint16_t port = (*server)->port();
  ASSERT_NE(port, 0);

  const std::string ok =
      Http(port, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_THAT(ok, StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(ok, HasSubstr("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
  EXPECT_THAT(ok, HasSubstr("\r\n\r\ntvilling_up 1\n"));
  EXPECT_EQ(renders, 1);

  EXPECT_THAT(Http(port, "GET /metrics?x=1 HTTP/1.0\r\n\r\n"), StartsWith("HTTP/1.0 200 OK"));
  EXPECT_THAT(Http(port, "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
              StartsWith("HTTP/1.1 404 Not Found"));
  const std::string post =
      Http(port, "POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_THAT(post, StartsWith("HTTP/1.1 405 Method Not Allowed"));
  EXPECT_THAT(post, HasSubstr("Allow: GET\r\n"));
  // A request with a body is refused by closing the connection, without an answer.
  EXPECT_EQ(Http(port, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"), "");
  // Garbage is not HTTP: closed.
  EXPECT_EQ(Http(port, "\x01\x02\x03 nonsense\r\n\r\n"), "");

  // Keep-alive: two requests on one connection.
  const std::string two = Http(port,
                               "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                               "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  size_t first = two.find("HTTP/1.1 200 OK");
  ASSERT_NE(first, std::string::npos);
  EXPECT_NE(two.find("HTTP/1.1 200 OK", first + 1), std::string::npos);
  (*server)->Stop();
  (*server)->Stop();  // idempotent
}

TEST(MetricsServerTest, BindErrorsNameTheAddress) {
  auto first = MetricsServer::Start("127.0.0.1", 0, [] { return std::string(); });
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = MetricsServer::Start("127.0.0.1", (*first)->port(), [] { return std::string(); });
  ASSERT_FALSE(second.ok());
  EXPECT_THAT(
      std::string(second.status().message()),
      HasSubstr("metrics: cannot listen on 127.0.0.1:" + std::to_string((*first)->port()) + ": "));
  auto bad = MetricsServer::Start("not-an-ip", 9464, [] { return std::string(); });
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("not-an-ip is not an IP address"));
}

}  // namespace
}  // namespace tvilling::ops
