// wire_test.cc: the sans-I/O NBD protocol code (agent/nbd/wire.h) driven byte by byte: the
// handshake state machine through every option, the encoders, request parsing, and one test per
// validation rule of the spec ("Error values", "Block size constraints", "Command flags").
#include "agent/nbd/wire.h"

#include <gtest/gtest.h>

#include "tests/unit/nbd/nbd_test_client.h"

namespace tvilling::nbd::wire {
namespace {

using testing::Get;
using testing::MemoryExport;
using testing::Put;

constexpr uint64_t kSize = 1 << 20;

// One decoded option reply.
struct OptReply {
  uint32_t option, type;
  std::string data;
};
std::vector<OptReply> DecodeOptReplies(std::string_view s) {
  std::vector<OptReply> out;
  while (s.size() >= 20) {
    EXPECT_EQ(Get(s, 0, 8), kOptReplyMagic);
    const size_t len = Get(s, 16, 4);
    out.push_back({static_cast<uint32_t>(Get(s, 8, 4)), static_cast<uint32_t>(Get(s, 12, 4)),
                   std::string(s.substr(20, len))});
    s.remove_prefix(20 + len);
  }
  EXPECT_TRUE(s.empty()) << "trailing bytes after option replies";
  return out;
}

std::string OptionHeader(uint32_t opt, uint32_t len, uint64_t magic = kOptMagic) {
  std::string s;
  Put(&s, magic, 8);
  Put(&s, opt, 4);
  Put(&s, len, 4);
  return s;
}

std::string InfoData(std::string_view name, std::vector<uint16_t> infos = {}) {
  std::string d;
  Put(&d, name.size(), 4);
  d.append(name);
  Put(&d, infos.size(), 2);
  for (uint16_t i : infos) Put(&d, i, 2);
  return d;
}

class HandshakeTest : public ::testing::Test {
 protected:
  HandshakeTest()
      : hs_(
            [this](std::string_view n) -> std::shared_ptr<Export> {
              if (n.empty() || n == "vol0") return vol_;
              if (n == "ro") return ro_;
              return nullptr;
            },
            [this] {
              return std::vector<std::shared_ptr<Export>>{vol_, ro_};
            }) {}

  Handshake::Step Flags(uint32_t flags = kClientFlagFixedNewstyle | kClientFlagNoZeroes) {
    EXPECT_EQ(hs_.Need(), 4u);
    std::string s;
    Put(&s, flags, 4);
    return hs_.Feed(s);
  }
  // Feeds an option header and, if the machine asks for it, its data.
  Handshake::Step Option(uint32_t opt, std::string_view data) {
    EXPECT_EQ(hs_.Need(), 16u);
    Handshake::Step st = hs_.Feed(OptionHeader(opt, static_cast<uint32_t>(data.size())));
    if (data.empty() || st.next != Handshake::Next::kContinue) return st;
    EXPECT_EQ(hs_.Need(), data.size());
    return hs_.Feed(data);
  }

  std::shared_ptr<MemoryExport> vol_ = std::make_shared<MemoryExport>("vol0", kSize);
  std::shared_ptr<MemoryExport> ro_ = std::make_shared<MemoryExport>("ro", kSize, true);
  Handshake hs_;
};

TEST(WireTest, GreetingIsNbdmagicIhaveoptAndFixedNewstyleNoZeroes) {
  const std::string g = Handshake::Greeting();
  ASSERT_EQ(g.size(), 18u);
  EXPECT_EQ(g.substr(0, 8), "NBDMAGIC");
  EXPECT_EQ(g.substr(8, 8), "IHAVEOPT");
  EXPECT_EQ(Get(g, 16, 2), 3u);
}

TEST_F(HandshakeTest, ClientFlagsWithUnknownBitsClose) {
  auto st = Flags(kClientFlagFixedNewstyle | 0x4);
  EXPECT_EQ(st.next, Handshake::Next::kClose);
  EXPECT_NE(st.reason.find("unknown client flags"), std::string::npos) << st.reason;
  EXPECT_TRUE(st.out.empty());
}

TEST_F(HandshakeTest, ClientWithoutFixedNewstyleIsClosed) {
  EXPECT_EQ(Flags(0).next, Handshake::Next::kClose);
}

TEST_F(HandshakeTest, BadOptionMagicCloses) {
  Flags();
  auto st = hs_.Feed(OptionHeader(kOptGo, 0, 0x1122334455667788ull));
  EXPECT_EQ(st.next, Handshake::Next::kClose);
  EXPECT_EQ(st.reason, "bad option magic");
}

TEST_F(HandshakeTest, HugeOptionLengthClosesWithoutAskingForTheData) {
  Flags();
  auto st = hs_.Feed(OptionHeader(kOptGo, 1u << 30));
  EXPECT_EQ(st.next, Handshake::Next::kClose);
  EXPECT_NE(st.reason.find("1073741824"), std::string::npos) << st.reason;
  // Exactly at the limit is still read.
  Handshake hs2([](std::string_view) { return nullptr; },
                [] { return std::vector<std::shared_ptr<Export>>{}; });
  std::string f;
  Put(&f, kClientFlagFixedNewstyle, 4);
  hs2.Feed(f);
  EXPECT_EQ(hs2.Feed(OptionHeader(999, kMaxOptionBytes)).next, Handshake::Next::kContinue);
  EXPECT_EQ(hs2.Need(), kMaxOptionBytes);
}

TEST_F(HandshakeTest, TooManyOptionsClose) {
  Flags();
  for (uint32_t i = 0; i < kMaxOptions; ++i) {
    ASSERT_EQ(Option(kOptStructuredReply, {}).next, Handshake::Next::kContinue) << i;
  }
  EXPECT_EQ(Option(kOptStructuredReply, {}).next, Handshake::Next::kClose);
}

TEST_F(HandshakeTest, ExportNameEntersTransmissionWithOrWithoutZeroes) {
  Flags(kClientFlagFixedNewstyle);
  auto st = Option(kOptExportName, "vol0");
  EXPECT_EQ(st.next, Handshake::Next::kTransmission);
  ASSERT_EQ(st.out.size(), 134u);
  EXPECT_EQ(Get(st.out, 0, 8), kSize);
  EXPECT_EQ(Get(st.out, 8, 2), TransmissionFlags(vol_->info()));
  EXPECT_EQ(st.out.substr(10), std::string(124, '\0'));
  EXPECT_EQ(hs_.chosen(), vol_);
  EXPECT_EQ(EncodeExportNameReply(vol_->info(), /*no_zeroes=*/true).size(), 10u);
}

TEST_F(HandshakeTest, ExportNameEmptyIsTheDefaultAndUnknownCloses) {
  Flags();
  auto st = Option(kOptExportName, {});
  EXPECT_EQ(st.next, Handshake::Next::kTransmission);
  EXPECT_EQ(st.out.size(), 10u);
  EXPECT_EQ(hs_.chosen(), vol_);

  Handshake hs2([](std::string_view) { return nullptr; },
                [] { return std::vector<std::shared_ptr<Export>>{}; });
  std::string f;
  Put(&f, kClientFlagFixedNewstyle, 4);
  hs2.Feed(f);
  hs2.Feed(OptionHeader(kOptExportName, 4));
  auto st2 = hs2.Feed("nope");
  EXPECT_EQ(st2.next, Handshake::Next::kClose);
  EXPECT_TRUE(st2.out.empty()) << "EXPORT_NAME has no error reply";
}

TEST_F(HandshakeTest, AbortIsAckedThenClosed) {
  Flags();
  auto st = Option(kOptAbort, "ignored data");
  EXPECT_EQ(st.next, Handshake::Next::kClose);
  auto r = DecodeOptReplies(st.out);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].option, kOptAbort);
  EXPECT_EQ(r[0].type, kRepAck);
}

TEST_F(HandshakeTest, ListNamesEveryExportThenAcks) {
  Flags();
  auto st = Option(kOptList, {});
  EXPECT_EQ(st.next, Handshake::Next::kContinue);
  auto r = DecodeOptReplies(st.out);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].type, kRepServer);
  EXPECT_EQ(Get(r[0].data, 0, 4), 4u);
  EXPECT_EQ(r[0].data.substr(4), "vol0memory");  // name, then the description
  EXPECT_EQ(r[1].data.substr(4, 2), "ro");
  EXPECT_EQ(r[2].type, kRepAck);
  auto bad = DecodeOptReplies(Option(kOptList, "x").out);
  ASSERT_EQ(bad.size(), 1u);
  EXPECT_EQ(bad[0].type, kRepErrInvalid);
}

TEST_F(HandshakeTest, UnsupportedOptionsAreRefusedAndTheNextOneIsParsed) {
  Flags();
  const std::pair<uint32_t, uint32_t> cases[] = {
      {kOptStartTls, kRepErrPolicy},       {kOptStructuredReply, kRepErrUnsup},
      {kOptListMetaContext, kRepErrUnsup}, {kOptSetMetaContext, kRepErrUnsup},
      {kOptExtendedHeaders, kRepErrUnsup}, {4 /* PEEK_EXPORT */, kRepErrUnsup},
      {0x7fffffffu, kRepErrUnsup},
  };
  for (auto [opt, want] : cases) {
    auto st = Option(opt, opt == kOptListMetaContext ? InfoData("vol0") : std::string());
    EXPECT_EQ(st.next, Handshake::Next::kContinue) << OptionName(opt);
    auto r = DecodeOptReplies(st.out);
    ASSERT_EQ(r.size(), 1u) << OptionName(opt);
    EXPECT_EQ(r[0].option, opt);
    EXPECT_EQ(r[0].type, want) << OptionName(opt);
  }
  EXPECT_EQ(Option(kOptGo, InfoData("vol0")).next, Handshake::Next::kTransmission);
}

TEST_F(HandshakeTest, InfoThenGo) {
  Flags();
  auto st = Option(kOptInfo, InfoData("ro", {kInfoBlockSize, kInfoName, kInfoDescription, 77}));
  EXPECT_EQ(st.next, Handshake::Next::kContinue);
  EXPECT_EQ(hs_.chosen(), nullptr) << "INFO does not choose";
  auto r = DecodeOptReplies(st.out);
  ASSERT_EQ(r.size(), 5u) << "EXPORT, BLOCK_SIZE, NAME, DESCRIPTION (77 ignored), ACK";
  EXPECT_EQ(Get(r[0].data, 0, 2), kInfoExport);
  EXPECT_EQ(r[0].data.size(), 12u);
  EXPECT_EQ(Get(r[0].data, 2, 8), kSize);
  EXPECT_TRUE(Get(r[0].data, 10, 2) & kTxReadOnly);
  EXPECT_EQ(Get(r[1].data, 0, 2), kInfoBlockSize);
  ASSERT_EQ(r[1].data.size(), 14u);
  EXPECT_EQ(Get(r[1].data, 2, 4), 1u);
  EXPECT_EQ(Get(r[1].data, 6, 4), 4096u);
  EXPECT_EQ(Get(r[1].data, 10, 4), 32u << 20);
  EXPECT_EQ(r[2].data, std::string("\0\1ro", 4));
  EXPECT_EQ(r[3].data, std::string("\0\2memory", 8));
  EXPECT_EQ(r[4].type, kRepAck);
  for (const auto& x : r) EXPECT_EQ(x.option, kOptInfo);

  auto go = Option(kOptGo, InfoData("vol0"));
  EXPECT_EQ(go.next, Handshake::Next::kTransmission);
  auto g = DecodeOptReplies(go.out);
  ASSERT_EQ(g.size(), 2u);
  EXPECT_EQ(g[0].option, kOptGo);
  EXPECT_EQ(g[1].type, kRepAck);
  EXPECT_EQ(hs_.chosen(), vol_);
  EXPECT_EQ(hs_.Need(), 0u);
}

TEST_F(HandshakeTest, GoForAnUnknownExportIsErrUnknownAndHagglingContinues) {
  Flags();
  auto st = Option(kOptGo, InfoData("nope"));
  EXPECT_EQ(st.next, Handshake::Next::kContinue);
  auto r = DecodeOptReplies(st.out);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrUnknown);
  EXPECT_NE(r[0].data.find("nope"), std::string::npos);
  EXPECT_EQ(hs_.chosen(), nullptr);
}

TEST_F(HandshakeTest, MalformedInfoDataIsErrInvalid) {
  Flags();
  std::string overrun;
  Put(&overrun, 100, 4);
  overrun += "ab";  // name length 100 in a 6-byte option
  std::string count = InfoData("vol0", {kInfoName});
  count.pop_back();  // the count says 1 request, the option holds half of one
  std::string long_name = InfoData(std::string(kMaxStringBytes + 1, 'n'));
  for (const std::string& d : {std::string("\0\0", 2), overrun, count, long_name}) {
    auto st = Option(kOptGo, d);
    EXPECT_EQ(st.next, Handshake::Next::kContinue);
    auto r = DecodeOptReplies(st.out);
    ASSERT_EQ(r.size(), 1u);
    EXPECT_EQ(r[0].type, kRepErrInvalid);
  }
}

TEST(WireTest, ParseInfoRequestDropsDuplicatesSoTheReplyStaysSmall) {
  std::vector<uint16_t> many(30000, kInfoBlockSize);
  many.push_back(kInfoName);
  const std::string d = InfoData("vol0", many);
  InfoRequest req;
  ASSERT_EQ(ParseInfoRequest(d, &req), "");
  EXPECT_EQ(req.name, "vol0");
  EXPECT_EQ(req.requests, (std::vector<uint16_t>{kInfoBlockSize, kInfoName}));
  ExportInfo info;
  EXPECT_LT(EncodeInfoReplies(kOptGo, info, req.requests).size(), 200u);
}

TEST(WireTest, TransmissionFlagsFollowTheExport) {
  ExportInfo info;
  EXPECT_EQ(TransmissionFlags(info), kTxHasFlags | kTxSendFlush | kTxSendFua | kTxSendTrim |
                                         kTxSendWriteZeroes | kTxCanMultiConn);
  info.read_only = true;
  info.can_multi_conn = false;
  EXPECT_EQ(TransmissionFlags(info), kTxHasFlags | kTxReadOnly | kTxSendFlush);
  info = {};
  info.can_trim = info.can_fua = info.can_write_zeroes = false;
  EXPECT_EQ(TransmissionFlags(info), kTxHasFlags | kTxSendFlush | kTxCanMultiConn);
}

TEST(WireTest, RequestHeaderIsBigEndianAndMagicChecked) {
  std::string s;
  Put(&s, kRequestMagic, 4);
  Put(&s, 0x0102, 2);
  Put(&s, 0x0304, 2);
  Put(&s, 0x1122334455667788ull, 8);
  Put(&s, 0x0000000100000002ull, 8);
  Put(&s, 0xa0b0c0d0u, 4);
  RequestHeader h;
  ASSERT_TRUE(ParseRequestHeader(s.data(), &h));
  EXPECT_EQ(h.flags, 0x0102);
  EXPECT_EQ(h.type, 0x0304);
  EXPECT_EQ(h.cookie, 0x1122334455667788ull);
  EXPECT_EQ(h.offset, 0x0000000100000002ull);
  EXPECT_EQ(h.length, 0xa0b0c0d0u);
  s[3] ^= 1;
  EXPECT_FALSE(ParseRequestHeader(s.data(), &h));
}

TEST(WireTest, SimpleReplyEncoding) {
  char out[kSimpleReplyBytes];
  EncodeSimpleReply(kEnospc, 0xfeedfacecafebeefull, out);
  std::string_view s(out, sizeof out);
  EXPECT_EQ(Get(s, 0, 4), kSimpleReplyMagic);
  EXPECT_EQ(Get(s, 4, 4), 28u);
  EXPECT_EQ(Get(s, 8, 8), 0xfeedfacecafebeefull);
}

TEST(WireTest, OptionReplyEncoding) {
  const std::string r = EncodeOptionReply(kOptGo, kRepErrUnknown, "why");
  ASSERT_EQ(r.size(), 23u);
  EXPECT_EQ(Get(r, 0, 8), kOptReplyMagic);
  EXPECT_EQ(Get(r, 8, 4), kOptGo);
  EXPECT_EQ(Get(r, 12, 4), kRepErrUnknown);
  EXPECT_EQ(Get(r, 16, 4), 3u);
  EXPECT_EQ(r.substr(20), "why");
}

TEST(WireTest, StatusMapsToTheErrorsExportHDocuments) {
  EXPECT_EQ(ErrorFromStatus(absl::OkStatus()), 0u);
  EXPECT_EQ(ErrorFromStatus(absl::InvalidArgumentError("")), kEinval);
  EXPECT_EQ(ErrorFromStatus(absl::OutOfRangeError("")), kEinval);
  EXPECT_EQ(ErrorFromStatus(absl::ResourceExhaustedError("")), kEnospc);
  EXPECT_EQ(ErrorFromStatus(absl::PermissionDeniedError("")), kEperm);
  EXPECT_EQ(ErrorFromStatus(absl::FailedPreconditionError("")), kEperm);
  EXPECT_EQ(ErrorFromStatus(absl::UnavailableError("")), kEshutdown);
  EXPECT_EQ(ErrorFromStatus(absl::UnimplementedError("")), kEnotsup);
  EXPECT_EQ(ErrorFromStatus(absl::DataLossError("")), kEio);
  EXPECT_EQ(ErrorFromStatus(absl::InternalError("")), kEio);
}

// --- ValidateRequest: one row per rule. ---

struct Rule {
  const char* what;
  uint16_t type, flags;
  uint64_t offset;
  uint32_t length;
  uint32_t error;  // 0 = served
  bool read_only = false;
  bool close = false;
};

ExportInfo InfoFor(const Rule& r) {
  ExportInfo info;
  info.name = "vol0";
  info.size_bytes = kSize;
  info.read_only = r.read_only;
  return info;
}

TEST(ValidateRequestTest, EveryRule) {
  const uint32_t kMax = 32u << 20;
  const Rule rules[] = {
      {"plain READ", kCmdRead, 0, 0, 4096, 0},
      {"READ up to the last byte", kCmdRead, 0, kSize - 1, 1, 0},
      {"zero-length READ at the end", kCmdRead, 0, kSize, 0, 0},
      {"zero-length WRITE", kCmdWrite, 0, 0, 0, 0},
      {"WRITE+FUA", kCmdWrite, kCmdFlagFua, 0, 4096, 0},
      {"TRIM+FUA", kCmdTrim, kCmdFlagFua, 0, 4096, 0},
      {"WRITE_ZEROES+FUA+NO_HOLE", kCmdWriteZeroes, kCmdFlagFua | kCmdFlagNoHole, 0, 4096, 0},
      {"FLUSH", kCmdFlush, 0, 0, 0, 0},
      {"FUA on READ (clients do it; the spec says accept)", kCmdRead, kCmdFlagFua, 0, 512, 0},
      {"FUA on FLUSH", kCmdFlush, kCmdFlagFua, 0, 0, 0},
      {"TRIM longer than the maximum payload", kCmdTrim, 0, 0, kSize, 0},
      {"DISC, even with junk", kCmdDisc, 0x8000, 5, 5, 0},
      {"unknown command", 42, 0, 0, 0, kEinval},
      {"CACHE (not offered)", kCmdCache, 0, 0, 4096, kEinval},
      {"BLOCK_STATUS (no structured replies)", kCmdBlockStatus, 0, 0, 4096, kEinval},
      {"unknown flag on READ", kCmdRead, 0x80, 0, 512, kEinval},
      {"NO_HOLE on WRITE", kCmdWrite, kCmdFlagNoHole, 0, 16, kEinval},
      {"NO_HOLE on TRIM", kCmdTrim, kCmdFlagNoHole, 0, 16, kEinval},
      {"DF on READ (no structured replies)", kCmdRead, kCmdFlagDf, 0, 16, kEinval},
      {"FAST_ZERO (not advertised)", kCmdWriteZeroes, kCmdFlagFastZero, 0, 16, kEinval},
      {"FLUSH with a length", kCmdFlush, 0, 0, 5, kEinval},
      {"FLUSH with an offset", kCmdFlush, 0, 7, 0, kEinval},
      {"READ beyond the end", kCmdRead, 0, kSize - 512, 1024, kEinval},
      {"READ at an offset past the end", kCmdRead, 0, kSize + 1, 0, kEinval},
      {"READ whose offset+length overflows u64", kCmdRead, 0, UINT64_MAX - 10, 512, kEinval},
      {"WRITE beyond the end", kCmdWrite, 0, kSize - 8, 16, kEnospc},
      {"WRITE_ZEROES beyond the end", kCmdWriteZeroes, 0, 0, kSize + 1, kEnospc},
      {"TRIM beyond the end", kCmdTrim, 0, kSize, 1, kEinval},
      {"READ over the maximum payload", kCmdRead, 0, 0, kMax + 1, kEinval},
      {"WRITE over the maximum payload", kCmdWrite, 0, 0, kMax + 1, kEinval},
      {"WRITE too large to skip", kCmdWrite, 0, 0, 0xfffffff0u, kEinval, false, true},
      {"WRITE on read-only", kCmdWrite, 0, 0, 4, kEperm, true},
      {"WRITE+FUA on read-only", kCmdWrite, kCmdFlagFua, 0, 4, kEperm, true},
      {"TRIM on read-only", kCmdTrim, 0, 0, 4096, kEperm, true},
      {"WRITE_ZEROES on read-only", kCmdWriteZeroes, 0, 0, 4096, kEperm, true},
      {"READ on read-only", kCmdRead, 0, 0, 4096, 0, true},
      {"FLUSH on read-only", kCmdFlush, 0, 0, 0, 0, true},
  };
  for (const Rule& r : rules) {
    RequestHeader h{r.flags, r.type, 1, r.offset, r.length};
    const Verdict v = ValidateRequest(h, InfoFor(r));
    EXPECT_EQ(v.error, r.error) << r.what << ": " << v.reason;
    EXPECT_EQ(v.close, r.close) << r.what;
    EXPECT_EQ(v.payload_follows, r.type == kCmdWrite) << r.what;
    if (r.error != 0) {
      EXPECT_FALSE(v.reason.empty()) << r.what;
    }
  }
}

TEST(ValidateRequestTest, FeaturesNotAdvertisedAreEinval) {
  ExportInfo info;
  info.size_bytes = kSize;
  info.can_fua = info.can_trim = info.can_write_zeroes = false;
  EXPECT_EQ(ValidateRequest({kCmdFlagFua, kCmdWrite, 1, 0, 4}, info).error, kEinval);
  EXPECT_EQ(ValidateRequest({0, kCmdTrim, 1, 0, 4}, info).error, kEinval);
  EXPECT_EQ(ValidateRequest({0, kCmdWriteZeroes, 1, 0, 4}, info).error, kEinval);
  EXPECT_EQ(ValidateRequest({0, kCmdWrite, 1, 0, 4}, info).error, 0u);
}

TEST(ValidateRequestTest, MinimumBlockSizeIsEnforcedWhenAdvertised) {
  ExportInfo info;
  info.size_bytes = kSize;
  info.min_block_bytes = 512;
  EXPECT_EQ(ValidateRequest({0, kCmdRead, 1, 512, 1024}, info).error, 0u);
  EXPECT_EQ(ValidateRequest({0, kCmdRead, 1, 100, 512}, info).error, kEinval);
  EXPECT_EQ(ValidateRequest({0, kCmdWrite, 1, 0, 100}, info).error, kEinval);
  EXPECT_EQ(ValidateRequest({0, kCmdTrim, 1, 0, 100}, info).error, kEinval);
}

TEST(ValidateRequestTest, SmallerMaximumPayloadIsHonoured) {
  ExportInfo info;
  info.size_bytes = kSize;
  info.max_payload_bytes = 65536;
  EXPECT_EQ(ValidateRequest({0, kCmdRead, 1, 0, 65536}, info).error, 0u);
  const Verdict v = ValidateRequest({0, kCmdWrite, 1, 0, 65537}, info);
  EXPECT_EQ(v.error, kEinval);
  EXPECT_TRUE(v.payload_follows);
  EXPECT_FALSE(v.close) << "small enough to read and discard";
}

}  // namespace
}  // namespace tvilling::nbd::wire
