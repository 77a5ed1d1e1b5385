// frontend_test.cc: the NBD server over real sockets on 127.0.0.1 and a unix socket: handshake
// variants, the malformed-request suite (each answered as the protocol prescribes, none crashing
// the server), pipelining with out-of-order completion, FUA/FLUSH routing, back-pressure, draining
// on Stop(), and real clients (nbdinfo, qemu-io) when they are installed.
#include "agent/nbd/frontend.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <map>
#include <random>
#include <set>

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
      {"DF on READ (no structured replies)", kCmdRead, kCmdFlagDf, 0, 512, kEinval, false},
      {"FAST_ZERO (not advertised)", kCmdWriteZeroes, kCmdFlagFastZero, 0, 512, kEinval, false},
      {"BLOCK_STATUS without meta context", kCmdBlockStatus, 0, 0, 512, kEinval, false},
      {"NO_HOLE on WRITE", kCmdWrite, kCmdFlagNoHole, 0, 16, kEinval, true},
      {"READ beyond the end", kCmdRead, 0, kSize - 512, 1024, kEinval, false},
      {"READ at an offset past the end", kCmdRead, 0, kSize * 4, 1, kEinval, false},
      {"READ with offset+length overflowing", kCmdRead, 0, UINT64_MAX - 10, 512, kEinval, false},
      {"WRITE beyond the end", kCmdWrite, 0, kSize - 8, 16, kEnospc, true},
      {"TRIM beyond the end", kCmdTrim, 0, kSize, 1, kEinval, false},
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
  // Zero-length requests are valid (and never bother the export).
  c.Request(kCmdRead, 0, 600, 10, 0);
  EXPECT_EQ(c.ReadReply().error, 0u);
  c.Request(kCmdWrite, 0, 601, 10, 0);
  EXPECT_EQ(c.ReadReply().error, 0u);
  c.Request(kCmdTrim, 0, 602, kSize, 0);
  EXPECT_EQ(c.ReadReply().error, 0u);
  c.Request(kCmdWriteZeroes, 0, 603, 0, 0);
  EXPECT_EQ(c.ReadReply().error, 0u);
  EXPECT_EQ(vol_->reads.load() + vol_->writes.load() + vol_->trims.load() + vol_->zeroes.load(), 0);
  // A write that fits goes through.
  c.Request(kCmdWrite, kCmdFlagFua, 604, 4096, 5, "hello");
  EXPECT_EQ(c.ReadReply().error, 0u);
  EXPECT_EQ(vol_->DataAt(4096, 5), "hello");
  EXPECT_EQ(vol_->fua_writes.load(), 1);
  // A bad magic cannot be resynchronised: the connection closes.
  c.Request(kCmdRead, 0, 700, 0, 512, {}, 0xdeadbeef);
  EXPECT_TRUE(c.Closed());
  EXPECT_EQ(s.frontend().stats().requests_refused.load(), std::size(cases) + 1);
  ExpectServerHealthy(s.port());
}

TEST_F(FrontendTest, RequestsSplitAcrossManySegmentsAreReassembled) {
  TestServer s({vol_});
  RawClient c(s.port());
  ASSERT_NE(c.Connect("vol0"), 0);
  std::string req;
  testing::Put(&req, kRequestMagic, 4);
  testing::Put(&req, 0, 2);
  testing::Put(&req, kCmdWrite, 2);
  testing::Put(&req, 31, 8);
  testing::Put(&req, 100, 8);
  testing::Put(&req, 6, 4);
  req += "abcdef";
  for (char ch : req) {  // one byte per send
    c.Send(std::string(1, ch));
    usleep(500);
  }
  auto r = c.ReadReply();
  EXPECT_EQ(r.cookie, 31u);
  EXPECT_EQ(r.error, 0u);
  EXPECT_EQ(vol_->DataAt(100, 6), "abcdef");
}

TEST_F(FrontendTest, FuaOnReadIsAcceptedAndIgnored) {
  TestServer s({vol_});
  vol_->Fill(0, "data");
  RawClient c(s.port());
  ASSERT_NE(c.Connect("vol0"), 0);
  c.Request(kCmdRead, kCmdFlagFua, 8, 0, 4);
  auto r = c.ReadReply();
  EXPECT_EQ(r.error, 0u) << "the spec: FUA is valid on every command once SEND_FUA is set";
  EXPECT_EQ(c.Recv(4), "data");
}

TEST_F(FrontendTest, FuaFlushTrimAndZeroesReachTheExportWithTheirFlags) {
  TestServer s({vol_});
  RawClient c(s.port());
  ASSERT_NE(c.Connect("vol0"), 0);
  vol_->Fill(0, std::string(8192, 'x'));
  c.Request(kCmdWrite, 0, 1, 0, 3, "abc");
  c.Request(kCmdWrite, kCmdFlagFua, 2, 3, 3, "def");
  c.Request(kCmdFlush, 0, 3, 0, 0);
  c.Request(kCmdTrim, kCmdFlagFua, 4, 4096, 512);
  c.Request(kCmdTrim, 0, 5, 4608, 512);
  c.Request(kCmdWriteZeroes, kCmdFlagFua | kCmdFlagNoHole, 6, 5120, 512);
  c.Request(kCmdWriteZeroes, 0, 7, 5632, 512);
  for (int i = 0; i < 7; ++i) {
    auto r = c.ReadReply();
    ASSERT_TRUE(r.ok);
    EXPECT_EQ(r.error, 0u) << "cookie " << r.cookie;
  }
  EXPECT_EQ(vol_->writes.load(), 2);
  EXPECT_EQ(vol_->fua_writes.load(), 1);
  EXPECT_EQ(vol_->flushes.load(), 1);
  EXPECT_EQ(vol_->trims.load(), 2);
  EXPECT_EQ(vol_->fua_trims.load(), 1);
  EXPECT_EQ(vol_->zeroes.load(), 2);
  EXPECT_EQ(vol_->fua_zeroes.load(), 1);
  EXPECT_EQ(vol_->no_hole_zeroes.load(), 1);
  EXPECT_EQ(vol_->DataAt(0, 6), "abcdef");
  EXPECT_EQ(vol_->DataAt(4096, 2048), std::string(2048, '\0'));
  EXPECT_EQ(vol_->DataAt(6144, 8), "xxxxxxxx");
}

TEST_F(FrontendTest, ExportErrorsBecomeNbdErrorsAndReadsCarryNoData) {
  TestServer s({vol_});
  RawClient c(s.port());
  ASSERT_NE(c.Connect("vol0"), 0);
  vol_->FailNext(absl::ResourceExhaustedError("log full"));
  c.Request(kCmdWrite, 0, 1, 0, 3, "abc");
  EXPECT_EQ(c.ReadReply().error, kEnospc);
  vol_->FailNext(absl::DataLossError("bad sector"));
  c.Request(kCmdRead, 0, 2, 0, 4096);
  auto r = c.ReadReply();
  EXPECT_EQ(r.cookie, 2u);
  EXPECT_EQ(r.error, kEio);
  vol_->FailNext(absl::UnavailableError("stopping"));
  c.Request(kCmdFlush, 0, 3, 0, 0);
  auto f = c.ReadReply();
  EXPECT_EQ(f.cookie, 3u) << "no READ payload was sent after the error reply";
  EXPECT_EQ(f.error, kEshutdown);
  EXPECT_EQ(s.frontend().stats().request_errors.load(), 3u);
}

TEST_F(FrontendTest, UnixSocketServesTheSameProtocol) {
  char dir_template[] = "/tmp/tvilling-nbd-XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  const std::string path = std::string(dir_template) + "/nbd.sock";
  FrontendOptions o;
  o.unix_sockets = {path};
  {
    TestServer s({vol_}, o);
    RawClient c(path);
    ASSERT_NE(c.Connect("vol0"), 0);
    c.Request(kCmdWrite, 0, 1, 512, 4, "unix");
    EXPECT_EQ(c.ReadReply().error, 0u);
    c.Request(kCmdRead, 0, 2, 512, 4);
    EXPECT_EQ(c.ReadReply().error, 0u);
    EXPECT_EQ(c.Recv(4), "unix");
    RawClient bad(path);  // a malformed handshake on the unix socket closes just that one
    bad.Greeting();
    bad.ClientFlags(0xffffffffu);
    EXPECT_TRUE(bad.Closed());
    c.Request(kCmdFlush, 0, 3, 0, 0);  // reuses the READ's slot: must carry no data
    auto r = c.ReadReply();
    EXPECT_EQ(r.cookie, 3u);
    EXPECT_EQ(r.error, 0u);
    c.Request(kCmdRead, 0, 4, 512, 4);
    EXPECT_EQ(c.ReadReply().cookie, 4u);
    EXPECT_EQ(c.Recv(4), "unix");
  }
  std::filesystem::remove_all(dir_template);
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
  for (int i = 0; i < 8; ++i) vol_->Fill(4096 * i, std::string(1, static_cast<char>('a' + i)));
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

// FrontendOptions::burst_begin/burst_end (tvillingd: storage::AppendPlug): every request reaches
// the Export inside a burst, bursts never nest, and a burst ends before the connection waits (for
// the client's next request, a completion, or its end), so begins and ends stay balanced.
namespace burst {
std::atomic<int> begins{0}, ends{0}, nested{0}, stray_ends{0};
thread_local bool in = false;
void Begin() {
  if (in) ++nested;
  in = true;
  ++begins;
}
void End() {
  if (!in) ++stray_ends;
  in = false;
  ++ends;
}
}  // namespace burst

class BurstCheckedExport : public Export {
 public:
  explicit BurstCheckedExport(std::shared_ptr<Export> e) : e_(std::move(e)) {}
  const ExportInfo& info() const override { return e_->info(); }
  void Read(uint64_t offset, uint32_t length, char* out, Done done) override {
    Check();
    e_->Read(offset, length, out, std::move(done));
  }
  void Write(uint64_t offset, storage::Bytes data, bool fua, Done done) override {
    Check();
    e_->Write(offset, std::move(data), fua, std::move(done));
  }
  void Flush(Done done) override {
    Check();
    e_->Flush(std::move(done));
  }
  void Trim(uint64_t offset, uint32_t length, bool fua, Done done) override {
    Check();
    e_->Trim(offset, length, fua, std::move(done));
  }
  void WriteZeroes(uint64_t offset, uint32_t length, bool fua, bool no_hole, Done done) override {
    Check();
    e_->WriteZeroes(offset, length, fua, no_hole, std::move(done));
  }
  std::atomic<int> outside{0}, calls{0};

 private:
  void Check() {
    ++calls;
    if (!burst::in) ++outside;
  }
  std::shared_ptr<Export> e_;
};

TEST_F(FrontendTest, RequestsReachTheExportInBurstsThatEndBeforeTheConnectionWaits) {
  FrontendOptions o;
  o.burst_begin = &burst::Begin;
  o.burst_end = &burst::End;
  auto checked = std::make_shared<BurstCheckedExport>(vol_);
  {
    TestServer s({checked}, o);
    RawClient c(s.port());
    ASSERT_NE(c.Connect("vol0"), 0);
    // Pipelined, some completions held (the connection then waits for them with a burst ended).
    vol_->set_hold(true);
    for (int i = 0; i < 16; ++i) c.Request(kCmdWrite, 0, i, 4096 * i, 4, "abcd");
    for (int i = 0; i < 200 && vol_->held() < 16; ++i) usleep(10000);
    ASSERT_EQ(vol_->held(), 16u);
    vol_->set_hold(false);
    vol_->ReleaseReversed();
    for (int i = 0; i < 16; ++i) EXPECT_EQ(c.ReadReply().error, 0u);
    c.Request(kCmdRead, 0, 100, 0, 4);
    EXPECT_EQ(c.ReadReply().error, 0u);
    EXPECT_EQ(c.Recv(4), "abcd");
    c.Request(kCmdFlush, 0, 101, 0, 0);
    EXPECT_EQ(c.ReadReply().error, 0u);
    c.Request(kCmdDisc, 0, 102, 0, 0);
    EXPECT_TRUE(c.Closed());
  }
  EXPECT_EQ(checked->calls.load(), 18);
  EXPECT_EQ(checked->outside.load(), 0) << "a request reached the Export outside a burst";
  EXPECT_EQ(burst::nested.load(), 0);
  EXPECT_EQ(burst::stray_ends.load(), 0);
  EXPECT_GE(burst::begins.load(), 1);
  EXPECT_EQ(burst::ends.load(), burst::begins.load()) << "a burst was left open";
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

TEST_F(FrontendTest, AClientThatDoesNotReadRepliesCannotMakeTheServerHoldUnboundedData) {
  FrontendOptions o;
  o.max_inflight_bytes = 1 << 20;
  TestServer s({vol_}, o);
  RawClient c(s.port());
  ASSERT_NE(c.Connect("vol0"), 0);
  constexpr int kReads = 1000;  // 1000 x 64 KiB = 64 MiB of replies, none read for now
  std::thread sender([&] {
    for (int i = 0; i < kReads; ++i) c.Request(kCmdRead, 0, i, 0, 65536);
  });
  usleep(700000);
  const int served = vol_->reads.load();
  // Socket buffers on both sides hold a few MiB; the server itself at most 1 MiB more.
  EXPECT_LT(served, 300) << "the server kept reading requests while its replies piled up";
  std::cerr << "reads served while the client did not read: " << served << "\n";
  EXPECT_GT(s.frontend().stats().backpressure_waits.load(), 0u);
  for (int i = 0; i < kReads; ++i) {
    auto r = c.ReadReply();
    ASSERT_TRUE(r.ok) << i;
    ASSERT_EQ(r.cookie, static_cast<uint64_t>(i)) << "one connection, in-order completions";
    ASSERT_EQ(c.Recv(65536).size(), 65536u);
  }
  sender.join();
  EXPECT_EQ(vol_->reads.load(), kReads);
}

TEST_F(FrontendTest, ManyConnectionsOnSeveralThreadsKeepTheirDataApart) {
  TestServer s({vol_}, {}, /*threads=*/3);
  constexpr int kClients = 4, kOps = 300;
  std::vector<std::thread> clients;
  std::atomic<int> bad{0};
  for (int k = 0; k < kClients; ++k) {
    clients.emplace_back([&, k] {
      RawClient c(s.port());
      if (c.Connect("vol0") == 0) {
        ++bad;
        return;
      }
      std::mt19937 rng(k);
      // Each client owns a 64 KiB region; pipelined writes then reads of random 4 KiB blocks.
      const uint64_t base = static_cast<uint64_t>(k) << 16;
      std::string shadow(65536, '\0');
      for (int i = 0; i < kOps; ++i) {
        const uint64_t off = (rng() % 16) * 4096;
        const std::string block(4096, static_cast<char>('a' + (rng() % 26)));
        shadow.replace(off, 4096, block);
        c.Request(kCmdWrite, i % 3 == 0 ? kCmdFlagFua : 0, i, base + off, 4096, block);
      }
      for (int i = 0; i < kOps; ++i) {
        if (c.ReadReply().error != 0) ++bad;
      }
      c.Request(kCmdRead, 0, 9999, base, 65536);
      auto r = c.ReadReply();
      if (!r.ok || r.error != 0 || c.Recv(65536) != shadow) ++bad;
      c.Request(kCmdDisc, 0, 0, 0, 0);
      if (!c.Closed()) ++bad;
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(s.frontend().stats().requests.load(), uint64_t{kClients} * (kOps + 1));
  for (int i = 0; i < 100 && s.frontend().stats().connections_open.load() != 0; ++i) {
    usleep(10000);
  }
  EXPECT_EQ(s.frontend().stats().connections_open.load(), 0u);
}

// Completes every operation of the export it wraps on one of its own threads, after a random
// pause of up to `max_delay_us` (as a group log's committer or a replication stream does).
class OffThreadExport : public Export {
 public:
  OffThreadExport(std::shared_ptr<Export> e, int max_delay_us)
      : e_(std::move(e)), max_delay_us_(max_delay_us) {
    for (int i = 0; i < 2; ++i) {
      workers_.emplace_back([this, i] {
        std::mt19937 rng(i);
        std::unique_lock l(mu_);
        for (;;) {
          cv_.wait(l, [&] { return stop_ || !q_.empty(); });
          if (q_.empty()) return;
          auto fn = std::move(q_.front());
          q_.pop_front();
          l.unlock();
          if (max_delay_us_ > 0) usleep(rng() % max_delay_us_);
          fn();
          l.lock();
        }
      });
    }
  }
  ~OffThreadExport() override {
    {
      std::lock_guard l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  const ExportInfo& info() const override { return e_->info(); }
  void Read(uint64_t offset, uint32_t length, char* out, Done done) override {
    e_->Read(offset, length, out, Later(std::move(done)));
  }
  void Write(uint64_t offset, storage::Bytes data, bool fua, Done done) override {
    e_->Write(offset, std::move(data), fua, Later(std::move(done)));
  }
  void Flush(Done done) override { e_->Flush(Later(std::move(done))); }
  void Trim(uint64_t offset, uint32_t length, bool fua, Done done) override {
    e_->Trim(offset, length, fua, Later(std::move(done)));
  }
  void WriteZeroes(uint64_t offset, uint32_t length, bool fua, bool no_hole, Done done) override {
    e_->WriteZeroes(offset, length, fua, no_hole, Later(std::move(done)));
  }

 private:
  Done Later(Done done) {
    return [this, d = std::make_shared<Done>(std::move(done))](absl::Status st) {
      {
        std::lock_guard l(mu_);
        q_.push_back([d, st] { std::move (*d)(st); });
      }
      cv_.notify_one();
    };
  }
  std::shared_ptr<Export> e_;
  const int max_delay_us_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> q_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

// Direct replies (frontend.cc): a WRITE/FLUSH that completes on another thread as the only
// outstanding request is answered by that thread; deeper pipelines go through the connection's
// thread. Both kinds, and READ replies with data, interleave on one socket: each reply must arrive
// whole, once, with its own data.
TEST_F(FrontendTest, DirectRepliesAndTheConnectionsRepliesNeverMix) {
  for (const bool direct : {true, false}) {
    SCOPED_TRACE(fmt::format("direct_replies={}", direct));
    FrontendOptions o;
    o.direct_replies = direct;
    auto slow = std::make_shared<OffThreadExport>(vol_, 200);
    TestServer s({slow}, o);
    RawClient c(s.port());
    // A small receive buffer, so that a large READ reply is written in several steps while other
    // requests complete.
    const int rcvbuf = 32768;
    ASSERT_EQ(setsockopt(c.fd(), SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf), 0);
    ASSERT_NE(c.Connect("vol0"), 0);
    std::mt19937 rng(direct ? 1 : 2);
    std::string shadow(kSize, '\0');
    vol_->Fill(0, shadow);
    uint64_t cookie = 0;
    int bad = 0;
    for (int round = 0; round < 300 && bad == 0; ++round) {
      // Depth 1 most of the time (direct replies), sometimes a pipeline of up to 8 with READs.
      const int depth = round % 4 == 0 ? 1 + static_cast<int>(rng() % 8) : 1;
      std::map<uint64_t, std::pair<uint64_t, uint32_t>> reads;  // cookie -> offset, length
      std::set<uint64_t> others;
      for (int i = 0; i < depth; ++i) {
        const uint64_t off = (rng() % 64) * 4096;
        ++cookie;
        switch (rng() % 4) {
          case 0:
            if (depth > 1 && reads.empty()) {  // a READ of 256 KiB that no WRITE touches
              reads[cookie] = {kSize / 2, 256 << 10};
              c.Request(kCmdRead, 0, cookie, kSize / 2, 256 << 10);
              break;
            }
            [[fallthrough]];
          case 1:
          case 2: {
            const std::string block(4096, static_cast<char>('a' + rng() % 26));
            shadow.replace(off, 4096, block);
            c.Request(kCmdWrite, 0, cookie, off, 4096, block);
            others.insert(cookie);
            break;
          }
          default:
            c.Request(kCmdFlush, 0, cookie, 0, 0);
            others.insert(cookie);
        }
      }
      for (int i = 0; i < depth; ++i) {
        auto r = c.ReadReply();
        if (!r.ok || r.error != 0) {
          ADD_FAILURE() << "round " << round << ": bad reply";
          ++bad;
          break;
        }
        if (auto it = reads.find(r.cookie); it != reads.end()) {
          if (c.Recv(it->second.second) != shadow.substr(it->second.first, it->second.second)) {
            ADD_FAILURE() << "round " << round << ": READ " << r.cookie << " got other data";
            ++bad;
          }
          reads.erase(it);
        } else if (others.erase(r.cookie) != 1) {
          ADD_FAILURE() << "round " << round << ": unknown or repeated cookie " << r.cookie;
          ++bad;
        }
      }
    }
    c.Request(kCmdRead, 0, ++cookie, 0, 64 * 4096);
    auto r = c.ReadReply();
    ASSERT_TRUE(r.ok);
    EXPECT_EQ(c.Recv(64 * 4096), shadow.substr(0, 64 * 4096));
    if (direct) {
      EXPECT_GT(s.frontend().stats().direct_replies.load(), 100u);
    } else {
      EXPECT_EQ(s.frontend().stats().direct_replies.load(), 0u);
    }
  }
}

TEST_F(FrontendTest, StopClosesConnectionsStillInTheHandshake) {
  auto s = std::make_unique<TestServer>(std::vector<std::shared_ptr<Export>>{vol_});
  RawClient c(s->port());
  ASSERT_EQ(c.Greeting().size(), 18u);
  s->frontend().Stop();
  EXPECT_TRUE(c.Closed());
  EXPECT_TRUE(s->JoinWithin(5000));
  // The listener is gone.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(s->port());
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_NE(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  close(fd);
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

TEST_F(FrontendTest, DiscAnswersOutstandingRequestsThenCloses) {
  TestServer s({vol_});
  RawClient c(s.port());
  ASSERT_NE(c.Connect("vol0"), 0);
  vol_->set_hold(true);
  c.Request(kCmdWrite, 0, 1, 0, 2, "hi");
  c.Request(kCmdDisc, 0, 2, 0, 0);
  for (int i = 0; i < 200 && vol_->held() < 1; ++i) usleep(10000);
  EXPECT_FALSE(c.Closed(100)) << "closed before the write in flight was answered";
  vol_->set_hold(false);
  vol_->ReleaseReversed();
  auto r = c.ReadReply();
  EXPECT_EQ(r.cookie, 1u);
  EXPECT_EQ(r.error, 0u);
  EXPECT_TRUE(c.Closed());
}

// --- Real clients, when installed. ---

int RunCommand(const std::string& cmd, std::string* out) {
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return -1;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out->append(buf, n);
  return pclose(p);
}

TEST_F(FrontendTest, NbdinfoDescribesTheExport) {
  if (access("/usr/bin/nbdinfo", X_OK) != 0) GTEST_SKIP() << "nbdinfo is not installed";
  TestServer s({vol_, ro_});
  std::string out;
  const int rc = RunCommand(
      fmt::format("timeout 30 /usr/bin/nbdinfo --json nbd://127.0.0.1:{}/vol0", s.port()), &out);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("\"export-size\": 1048576"), std::string::npos) << out;
  EXPECT_NE(out.find("\"can_multi_conn\": true"), std::string::npos) << out;
  EXPECT_NE(out.find("\"can_fua\": true"), std::string::npos) << out;
  EXPECT_NE(out.find("\"description\": \"memory\""), std::string::npos) << out;
  EXPECT_NE(out.find("\"block_size_maximum\": 33554432"), std::string::npos) << out;
  out.clear();
  ASSERT_EQ(RunCommand(fmt::format("timeout 30 /usr/bin/nbdinfo --list --json nbd://127.0.0.1:{}",
                                   s.port()),
                       &out),
            0)
      << out;
  EXPECT_NE(out.find("\"ro\""), std::string::npos) << out;
}

TEST_F(FrontendTest, QemuIoWritesAndReadsAPattern) {
  if (access("/usr/bin/qemu-io", X_OK) != 0) GTEST_SKIP() << "qemu-io is not installed";
  TestServer s({vol_});
  std::string out;
  const int rc =
      RunCommand(fmt::format("timeout 60 /usr/bin/qemu-io -f raw -c 'write -P 0xab 0 64k' "
                             "-c 'write -z 64k 4k' -c 'flush' -c 'read -P 0xab 0 64k' "
                             "-c 'read -P 0 64k 4k' nbd://127.0.0.1:{}/vol0",
                             s.port()),
                 &out);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_EQ(out.find("fail"), std::string::npos) << out;
  EXPECT_EQ(vol_->DataAt(0, 65536), std::string(65536, '\xab'));
  EXPECT_GE(vol_->flushes.load(), 1);
}

}  // namespace
}  // namespace tvilling::nbd
