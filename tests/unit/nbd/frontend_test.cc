// frontend_test.cc: the NBD server over real sockets on 127.0.0.1: handshake variants, the
// malformed-request suite (each answered as the protocol prescribes, none crashing the server),
// pipelining with out-of-order completion, back-pressure, and draining on Stop().
#include "agent/nbd/frontend.h"

#include <gtest/gtest.h>

#include "tests/unit/nbd/nbd_test_client.h"

namespace tvilling::nbd {
namespace {

using testing::Get;
using testing::MemoryExport;
using testing::RawClient;
using testing::TestServer;
using namespace wire;

constexpr uint64_t kSize = 1 << 20;

class FrontendTest : public ::testing::Test {
 protected:
  std::shared_ptr<MemoryExport> vol_ = std::make_shared<MemoryExport>("vol0", kSize);
  std::shared_ptr<MemoryExport> ro_ = std::make_shared<MemoryExport>("ro", kSize, true);
};

// The server still works for a well-behaved client after whatever the test did.
void ExpectServerHealthy(uint16_t port) {
  RawClient c(port);
  ASSERT_NE(c.Connect("vol0"), 0) << "server no longer completes a handshake";
  c.Request(kCmdFlush, 0, 77, 0, 0);
  auto r = c.ReadReply();
  ASSERT_TRUE(r.ok);
  EXPECT_EQ(r.error, 0u);
  EXPECT_EQ(r.cookie, 77u);
}

TEST_F(FrontendTest, GreetingAndGoAdvertiseTheExport) {
  TestServer s({vol_, ro_});
  RawClient c(s.port());
  std::string g = c.Greeting();
  ASSERT_EQ(g.size(), 18u);
  EXPECT_EQ(Get(g, 0, 8), kNbdMagic);
  EXPECT_EQ(Get(g, 8, 8), kOptMagic);
  EXPECT_EQ(Get(g, 16, 2), kFlagFixedNewstyle | kFlagNoZeroes);
  c.ClientFlags();
  c.Option(kOptGo, RawClient::GoData("vol0", {kInfoBlockSize, kInfoName}));
  auto info = c.ReadOptReply();
  ASSERT_TRUE(info.ok);
  EXPECT_EQ(info.type, kRepInfo);
  EXPECT_EQ(Get(info.data, 0, 2), kInfoExport);
  EXPECT_EQ(Get(info.data, 2, 8), kSize);
  const uint16_t flags = static_cast<uint16_t>(Get(info.data, 10, 2));
  EXPECT_TRUE(flags & kTxSendFlush);
  EXPECT_TRUE(flags & kTxSendFua);
  EXPECT_TRUE(flags & kTxSendTrim);
  EXPECT_TRUE(flags & kTxSendWriteZeroes);
  EXPECT_TRUE(flags & kTxCanMultiConn);
  EXPECT_FALSE(flags & kTxReadOnly);
  auto bs = c.ReadOptReply();
  EXPECT_EQ(Get(bs.data, 0, 2), kInfoBlockSize);
  EXPECT_EQ(Get(bs.data, 10, 4), 32u << 20) << "maximum payload";
  auto name = c.ReadOptReply();
  EXPECT_EQ(name.data.substr(2), "vol0");
  EXPECT_EQ(c.ReadOptReply().type, kRepAck);
}

TEST_F(FrontendTest, UnknownExportIsAnErrorReplyAndTheClientMayTryAgain) {
  TestServer s({vol_});
  RawClient c(s.port());
  c.Greeting();
  c.ClientFlags();
  c.Option(kOptGo, RawClient::GoData("nope"));
  auto r = c.ReadOptReply();
  EXPECT_EQ(r.type, kRepErrUnknown);
  EXPECT_NE(r.data.find("nope"), std::string::npos);
  c.Option(kOptInfo, RawClient::GoData("vol0"));
  EXPECT_EQ(c.ReadOptReply().type, kRepInfo);
  EXPECT_EQ(c.ReadOptReply().type, kRepAck);
  c.Option(kOptGo, RawClient::GoData(""));  // the default export
  EXPECT_EQ(c.ReadOptReply().type, kRepInfo);
  EXPECT_EQ(c.ReadOptReply().type, kRepAck);
  c.Request(kCmdFlush, 0, 1, 0, 0);
  EXPECT_EQ(c.ReadReply().error, 0u);
}

TEST_F(FrontendTest, ListStructuredReplyStartTlsAndAbort) {
  TestServer s({vol_, ro_});
  RawClient c(s.port());
  c.Greeting();
  c.ClientFlags();
  c.Option(kOptList, {});
  auto a = c.ReadOptReply(), b = c.ReadOptReply(), ack = c.ReadOptReply();
  EXPECT_EQ(a.type, kRepServer);
  EXPECT_EQ(a.data.substr(4, 4), "vol0");
  EXPECT_EQ(b.data.substr(4, 2), "ro");
  EXPECT_EQ(ack.type, kRepAck);
  c.Option(kOptList, "x");
  EXPECT_EQ(c.ReadOptReply().type, kRepErrInvalid);
  c.Option(kOptStructuredReply, {});
  EXPECT_EQ(c.ReadOptReply().type, kRepErrUnsup);
  c.Option(kOptStartTls, {});
  EXPECT_EQ(c.ReadOptReply().type, kRepErrPolicy);
  c.Option(999, "whatever");
  EXPECT_EQ(c.ReadOptReply().type, kRepErrUnsup);
  c.Option(kOptAbort, {});
  EXPECT_EQ(c.ReadOptReply().type, kRepAck);
  EXPECT_TRUE(c.Closed());
}

TEST_F(FrontendTest, ExportNameOptionEntersTransmission) {
  TestServer s({vol_});
  RawClient c(s.port());
  c.Greeting();
  c.ClientFlags(kClientFlagFixedNewstyle);  // without NO_ZEROES: 124 zero bytes follow
  c.Option(kOptExportName, "vol0");
  std::string r = c.Recv(8 + 2 + 124);
  ASSERT_EQ(r.size(), 134u);
  EXPECT_EQ(Get(r, 0, 8), kSize);
  EXPECT_EQ(r.substr(10), std::string(124, '\0'));
  c.Request(kCmdFlush, 0, 5, 0, 0);
  EXPECT_EQ(c.ReadReply().cookie, 5u);
}

TEST_F(FrontendTest, MalformedHandshakesCloseOnlyThatConnection) {
  TestServer s({vol_});
  {
    RawClient c(s.port());  // unknown client flag bits
    c.Greeting();
    c.ClientFlags(0x80000001u);
    EXPECT_TRUE(c.Closed());
  }
  {
    RawClient c(s.port());  // not fixed newstyle
    c.Greeting();
    c.ClientFlags(0);
    EXPECT_TRUE(c.Closed());
  }
  {
    RawClient c(s.port());  // bad option magic
    c.Greeting();
    c.ClientFlags();
    c.Send(std::string(16, 'x'));
    EXPECT_TRUE(c.Closed());
  }
  {
    RawClient c(s.port());  // announces a 1 GiB option: must not be read or allocated
    c.Greeting();
    c.ClientFlags();
    std::string h;
    testing::Put(&h, kOptMagic, 8);
    testing::Put(&h, kOptGo, 4);
    testing::Put(&h, 1u << 30, 4);
    c.Send(h);
    EXPECT_TRUE(c.Closed());
  }
  {
    RawClient c(s.port());  // GO whose name length overruns the option
    c.Greeting();
    c.ClientFlags();
    std::string d;
    testing::Put(&d, 4000, 4);
    d += "ab";
    c.Option(kOptGo, d);
    EXPECT_EQ(c.ReadOptReply().type, kRepErrInvalid);
  }
  {
    RawClient c(s.port());  // EXPORT_NAME of an unknown export: no error reply exists, so close
    c.Greeting();
    c.ClientFlags();
    c.Option(kOptExportName, "nope");
    EXPECT_TRUE(c.Closed());
  }
  {
    RawClient c(s.port());  // truncated handshake: the client just goes away
    c.Greeting();
    c.Send("\0\0");
  }
  EXPECT_GE(s.frontend().stats().handshakes_refused.load(), 5u);
  ExpectServerHealthy(s.port());
}

TEST_F(FrontendTest, MalformedRequestsGetTheProtocolsErrors) {
  TestServer s({vol_, ro_});
  RawClient c(s.port());
  ASSERT_NE(c.Connect("vol0"), 0);
  struct Case {
    const char* what;
    uint16_t type, flags;
    uint64_t offset;
    uint32_t length;
    uint32_t error;
    bool payload;
  };
  const Case cases[] = {
      {"unknown command", 42, 0, 0, 0, kEinval, false},
      {"unknown flag on READ", kCmdRead, 0x80, 0, 512, kEinval, false},
      {"FUA on READ", kCmdRead, kCmdFlagFua, 0, 512, kEinval, false},
      {"NO_HOLE on WRITE", kCmdWrite, kCmdFlagNoHole, 0, 16, kEinval, true},
      {"READ beyond the end", kCmdRead, 0, kSize - 512, 1024, kEinval, false},
      {"READ at an offset past the end", kCmdRead, 0, kSize * 4, 1, kEinval, false},
      {"READ with offset+length overflowing", kCmdRead, 0, UINT64_MAX - 10, 512, kEinval, false},
      {"WRITE beyond the end", kCmdWrite, 0, kSize - 8, 16, kEnospc, true},
      {"TRIM beyond the end", kCmdTrim, 0, kSize, 1, kEnospc, false},
      {"WRITE_ZEROES beyond the end", kCmdWriteZeroes, 0, 0, kSize + 1, kEnospc, false},
      {"FLUSH with a length", kCmdFlush, 0, 0, 5, kEinval, false},
      {"READ over the maximum payload", kCmdRead, 0, 0, (32u << 20) + 1, kEinval, false},
  };
  uint64_t cookie = 100;
  for (const Case& k : cases) {
    c.Request(k.type, k.flags, ++cookie, k.offset, k.length,
              k.payload ? std::string(k.length, 'p') : std::string());
    auto r = c.ReadReply();
    ASSERT_TRUE(r.ok) << k.what << ": no reply (connection closed?)";
    EXPECT_EQ(r.cookie, cookie) << k.what;
    EXPECT_EQ(r.error, k.error) << k.what;
  }
  // An oversized WRITE's payload is consumed and the stream stays in sync.
  const uint32_t big = (32u << 20) + 4096;
  c.Request(kCmdWrite, 0, 555, 0, big, std::string(big, 'z'));
  auto r = c.ReadReply();
  EXPECT_EQ(r.cookie, 555u);
  EXPECT_EQ(r.error, kEinval);
  EXPECT_EQ(vol_->writes.load(), 0) << "no refused write reached the export";
  // Zero-length requests are valid.
  c.Request(kCmdRead, 0, 600, 10, 0);
  EXPECT_EQ(c.ReadReply().error, 0u);
  c.Request(kCmdWrite, 0, 601, 10, 0);
  EXPECT_EQ(c.ReadReply().error, 0u);
  // A write that fits goes through.
  c.Request(kCmdWrite, kCmdFlagFua, 602, 4096, 5, "hello");
  EXPECT_EQ(c.ReadReply().error, 0u);
  EXPECT_EQ(vol_->data().substr(4096, 5), "hello");
  EXPECT_EQ(vol_->fua_writes.load(), 1);
  // A bad magic cannot be resynchronised: the connection closes.
  c.Request(kCmdRead, 0, 700, 0, 512, {}, 0xdeadbeef);
  EXPECT_TRUE(c.Closed());
  ExpectServerHealthy(s.port());
}

TEST_F(FrontendTest, WritesToAReadOnlyExportAreEperm) {
  TestServer s({vol_, ro_});
  RawClient c(s.port());
  const uint16_t flags = c.Connect("ro");
  EXPECT_TRUE(flags & kTxReadOnly);
  c.Request(kCmdWrite, 0, 1, 0, 4, "abcd");
  EXPECT_EQ(c.ReadReply().error, kEperm);
  c.Request(kCmdTrim, 0, 2, 0, 4096);
  EXPECT_EQ(c.ReadReply().error, kEperm);
  c.Request(kCmdWriteZeroes, 0, 3, 0, 4096);
  EXPECT_EQ(c.ReadReply().error, kEperm);
  c.Request(kCmdRead, 0, 4, 0, 4);
  auto r = c.ReadReply();
  EXPECT_EQ(r.error, 0u);
  EXPECT_EQ(c.Recv(4), std::string(4, '\0'));
  EXPECT_EQ(ro_->writes.load(), 0);
}

TEST_F(FrontendTest, WriteTooLargeToSkipClosesTheConnection) {
  TestServer s({vol_});
  RawClient c(s.port());
  ASSERT_NE(c.Connect("vol0"), 0);
  c.Request(kCmdWrite, 0, 9, 0, 0xfffffff0u);  // 4 GiB announced, nothing sent
  EXPECT_TRUE(c.Closed());
  ExpectServerHealthy(s.port());
}

TEST_F(FrontendTest, PipelinedRequestsAreAnsweredOutOfOrderWithTheirOwnData) {
  TestServer s({vol_});
  for (int i = 0; i < 8; ++i) vol_->data()[4096 * i] = static_cast<char>('a' + i);
  RawClient c(s.port());
  ASSERT_NE(c.Connect("vol0"), 0);
  vol_->set_hold(true);
  for (int i = 0; i < 8; ++i) c.Request(kCmdRead, 0, 1000 + i, 4096 * i, 1);
  for (int i = 0; i < 200 && vol_->held() < 8; ++i) usleep(10000);
  ASSERT_EQ(vol_->held(), 8u);
  vol_->set_hold(false);
  vol_->ReleaseReversed();
  for (int i = 7; i >= 0; --i) {
    auto r = c.ReadReply();
    ASSERT_TRUE(r.ok);
    EXPECT_EQ(r.cookie, 1000u + i) << "replies follow completion order";
    EXPECT_EQ(c.Recv(1), std::string(1, static_cast<char>('a' + i)));
  }
}

TEST_F(FrontendTest, BackPressureStopsReadingRequestsAtTheLimit) {
  FrontendOptions o;
  o.max_inflight_requests = 4;
  TestServer s({vol_}, o);
  RawClient c(s.port());
  ASSERT_NE(c.Connect("vol0"), 0);
  vol_->set_hold(true);
  for (int i = 0; i < 10; ++i) c.Request(kCmdFlush, 0, i, 0, 0);
  usleep(200000);
  EXPECT_EQ(vol_->held(), 4u) << "the server read past its in-flight limit";
  vol_->set_hold(false);
  vol_->ReleaseReversed();
  for (int i = 0; i < 10; ++i) EXPECT_TRUE(c.ReadReply().ok);
  EXPECT_EQ(vol_->flushes.load(), 10);
}

TEST_F(FrontendTest, StopAnswersRequestsInFlightThenCloses) {
  auto s = std::make_unique<TestServer>(std::vector<std::shared_ptr<Export>>{vol_});
  RawClient c(s->port());
  ASSERT_NE(c.Connect("vol0"), 0);
  vol_->set_hold(true);
  c.Request(kCmdWrite, 0, 42, 0, 3, "abc");
  for (int i = 0; i < 200 && vol_->held() < 1; ++i) usleep(10000);
  s->frontend().Stop();
  usleep(50000);
  vol_->set_hold(false);
  vol_->ReleaseReversed();
  auto r = c.ReadReply();
  ASSERT_TRUE(r.ok) << "the request in flight was not answered";
  EXPECT_EQ(r.cookie, 42u);
  EXPECT_EQ(r.error, 0u);
  EXPECT_TRUE(c.Closed());
  EXPECT_TRUE(s->JoinWithin(5000)) << "io_context still has work after Stop";
}

TEST_F(FrontendTest, DiscIsAnsweredByClosing) {
  TestServer s({vol_});
  RawClient c(s.port());
  ASSERT_NE(c.Connect("vol0"), 0);
  c.Request(kCmdDisc, 0, 1, 0, 0);
  EXPECT_TRUE(c.Closed());
}

}  // namespace
}  // namespace tvilling::nbd
