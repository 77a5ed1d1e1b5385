// check_test.cc: tvilling-check's decoding and checks on synthetic logs and in-memory images.
#include "tests/checker/check.h"

#include <gtest/gtest.h>

#include <cstring>

namespace tvilling::check {
namespace {

class MemImage : public Image {
 public:
  explicit MemImage(uint64_t blocks) : data_(blocks * kBlockSize, 0) {}
  uint64_t blocks() const override { return data_.size() / kBlockSize; }
  bool Read(uint64_t i, char* out, std::string*) override {
    std::memcpy(out, data_.data() + i * kBlockSize, kBlockSize);
    return true;
  }
  void Put(uint32_t writer, uint64_t seq, uint64_t block) {
    EncodeBlock(writer, seq, block, data_.data() + block * kBlockSize);
  }
  char* at(uint64_t block) { return data_.data() + block * kBlockSize; }

 private:
  std::vector<char> data_;
};

// A log built event by event, as the writer would write it.
struct LogBuilder {
  uint32_t writer = 1;
  uint64_t size = 8 * kBlockSize;
  std::string text;
  LogBuilder() { text = "tvilling-check 1 writer=1 size=" + std::to_string(size) + "\n"; }
  LogBuilder& I(uint64_t seq, uint64_t block, int64_t t) {
    text +=
        "I " + std::to_string(seq) + " " + std::to_string(block) + " " + std::to_string(t) + "\n";
    return *this;
  }
  LogBuilder& C(uint64_t seq, int64_t t, int err = 0) {
    text += "C " + std::to_string(seq) + " " + std::to_string(t) + " " + std::to_string(err) + "\n";
    return *this;
  }
  WriterLog Parse() const {
    std::string err;
    auto l = ParseLog(text, "test.log", &err);
    EXPECT_TRUE(l) << err;
    return l.value_or(WriterLog{});
  }
};

VerifyResult Check(const LogBuilder& b, MemImage& img, Mode mode = Mode::kSync,
                   std::optional<uint64_t> bound = std::nullopt) {
  std::string err;
  VerifyOptions o;
  o.mode = mode;
  o.loss_bound = bound;
  auto r = Verify({b.Parse()}, img, o, &err);
  EXPECT_TRUE(r) << err;
  return r.value_or(VerifyResult{});
}

TEST(CheckBlock, RoundTrip) {
  std::vector<char> buf(kBlockSize);
  EncodeBlock(7, 123456789, 42, buf.data());
  const Decoded d = DecodeBlock(buf.data());
  EXPECT_EQ(d.kind, Decoded::Kind::kValid);
  EXPECT_EQ(d.writer, 7u);
  EXPECT_EQ(d.seq, 123456789u);
  EXPECT_EQ(d.block, 42u);
}

TEST(CheckBlock, ZeroTornForeign) {
  std::vector<char> a(kBlockSize, 0), b(kBlockSize);
  EXPECT_EQ(DecodeBlock(a.data()).kind, Decoded::Kind::kZero);
  EncodeBlock(1, 1, 3, a.data());
  EncodeBlock(1, 2, 3, b.data());
  // A torn write: the first 512-byte sector of one write, the rest of another.
  std::memcpy(a.data() + 512, b.data() + 512, kBlockSize - 512);
  EXPECT_EQ(DecodeBlock(a.data()).kind, Decoded::Kind::kTorn);
  // One flipped payload bit.
  EncodeBlock(1, 1, 3, a.data());
  a[2000] ^= 1;
  EXPECT_EQ(DecodeBlock(a.data()).kind, Decoded::Kind::kTorn);
  std::vector<char> junk(kBlockSize, 'x');
  EXPECT_EQ(DecodeBlock(junk.data()).kind, Decoded::Kind::kForeign);
}

TEST(CheckLog, ParsesAndIgnoresTornLastLine) {
  LogBuilder b;
  b.I(1, 0, 100).C(1, 150).I(2, 1, 160);
  b.text += "R 170 fail nbd+unix:///x\nC 2 200 5";  // the last line has no newline
  const WriterLog l = b.Parse();
  EXPECT_EQ(l.writer, 1u);
  ASSERT_EQ(l.writes.size(), 2u);
  EXPECT_TRUE(l.writes.at(1).ok());
  EXPECT_FALSE(l.writes.at(2).ended_ns.has_value());
  EXPECT_EQ(l.failed_connects, 1u);
}

TEST(CheckLog, RefusesMalformedWithLine) {
  std::string err;
  EXPECT_FALSE(ParseLog("hello\n", "a.log", &err));
  EXPECT_NE(err.find("a.log:1: not a tvilling-check log"), std::string::npos) << err;
  LogBuilder b;
  b.I(1, 0, 100).C(2, 150);
  EXPECT_FALSE(ParseLog(b.text, "b.log", &err));
  EXPECT_NE(err.find("b.log:3: completion of unissued write 2"), std::string::npos) << err;
  LogBuilder c;
  c.text += "I 1 99 100\n";  // block 99 of an 8-block log
  EXPECT_FALSE(ParseLog(c.text, "c.log", &err));
  EXPECT_NE(err.find("c.log:2: block beyond"), std::string::npos) << err;
  LogBuilder d;
  d.I(2, 0, 100).I(1, 1, 110);
  EXPECT_FALSE(ParseLog(d.text, "d.log", &err));
  EXPECT_NE(err.find("does not increase"), std::string::npos) << err;
}

TEST(CheckVerify, LatestCompletedPresentIsOk) {
  LogBuilder b;
  b.I(1, 0, 100).C(1, 110).I(2, 0, 120).C(2, 130).I(3, 1, 140).C(3, 150);
  MemImage img(8);
  img.Put(1, 2, 0);
  img.Put(1, 3, 1);
  const auto r = Check(b, img);
  EXPECT_TRUE(r.ok()) << r.Summary();
  EXPECT_EQ(r.completed, 3u);
  EXPECT_EQ(r.missing, 0u);
  EXPECT_EQ(r.held, 2u);
}

TEST(CheckVerify, InFlightWriteMayOrMayNotBePresent) {
  LogBuilder b;
  b.I(1, 0, 100).C(1, 110).I(2, 0, 120);  // 2 never completed
  MemImage with(8), without(8);
  with.Put(1, 2, 0);
  without.Put(1, 1, 0);
  EXPECT_TRUE(Check(b, with).ok());
  EXPECT_TRUE(Check(b, without).ok());
}

TEST(CheckVerify, OlderVersionOfCompletedWriteIsMissing) {
  LogBuilder b;
  b.I(1, 0, 100).C(1, 110).I(2, 0, 120).C(2, 130);
  MemImage img(8);
  img.Put(1, 1, 0);  // the older version: write 2 is lost
  const auto r = Check(b, img);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.counts.at("missing"), 1u);
  ASSERT_FALSE(r.violations.empty());
  EXPECT_NE(r.violations[0].what.find("write 1/2"), std::string::npos) << r.violations[0].what;
  // Zeros where a completed write should be: missing too.
  MemImage zero(8);
  EXPECT_EQ(Check(b, zero).counts.at("missing"), 2u);
}

TEST(CheckVerify, FailedWriteThenRetrySupersedes) {
  // Write 1 failed (connection lost, fate unknown), write 2 to the same block completed after.
  LogBuilder b;
  b.I(1, 0, 100).C(1, 110, 108).I(2, 0, 120).C(2, 130);
  MemImage img(8);
  img.Put(1, 1, 0);  // the failed write landed, the later completed one did not
  EXPECT_EQ(Check(b, img).counts.at("missing"), 1u);
  MemImage ok(8);
  ok.Put(1, 2, 0);
  EXPECT_TRUE(Check(b, ok).ok());
}

TEST(CheckVerify, TornForeignMisplacedUnknown) {
  LogBuilder b;
  b.I(1, 0, 100).C(1, 110).I(2, 1, 120).C(2, 130);
  MemImage img(8);
  img.Put(1, 1, 0);
  img.Put(1, 2, 1);
  img.at(1)[100] ^= 1;              // torn
  std::memset(img.at(2), 'x', 64);  // foreign
  img.Put(1, 1, 3);                 // block 3 holds a copy of block 0's bytes: misplaced
  std::memcpy(img.at(3), img.at(0), kBlockSize);
  img.Put(9, 1, 4);   // a writer with no log
  img.Put(1, 77, 5);  // a sequence never issued
  const auto r = Check(b, img);
  EXPECT_EQ(r.counts.at("torn"), 1u);
  EXPECT_EQ(r.counts.at("foreign"), 1u);
  EXPECT_EQ(r.counts.at("misplaced"), 1u);
  EXPECT_EQ(r.counts.at("unknown-write"), 2u);
  EXPECT_EQ(r.counts.at("missing"), 1u);  // block 1's completed write is torn away
}

TEST(CheckVerify, PrefixBrokenInAsyncMode) {
  // 1 completes before 2 is issued; the image has 2 but not 1: not a prefix.
  LogBuilder b;
  b.I(1, 0, 100).C(1, 110).I(2, 1, 120).C(2, 130);
  MemImage img(8);
  img.Put(1, 2, 1);
  const auto r = Check(b, img, Mode::kAsync);
  EXPECT_EQ(r.counts.at("prefix"), 1u);
  EXPECT_EQ(r.prefix_breaks, 1u);
  // Concurrent writes (2 issued before 1 completed) may land in either order.
  LogBuilder c;
  c.I(1, 0, 100).I(2, 1, 105).C(1, 110).C(2, 130);
  EXPECT_TRUE(Check(c, img, Mode::kAsync).ok());
}

TEST(CheckVerify, AsyncCountsMissingAgainstBound) {
  LogBuilder b;
  b.I(1, 0, 100).C(1, 110).I(2, 1, 120).C(2, 130).I(3, 2, 140).C(3, 150).I(4, 0, 160).C(4, 170);
  MemImage img(8);
  img.Put(1, 1, 0);  // the replica got write 1 only: 2, 3 and 4 are missing
  const auto free = Check(b, img, Mode::kAsync);
  EXPECT_TRUE(free.ok()) << free.Summary();
  EXPECT_EQ(free.missing, 3u);
  EXPECT_TRUE(Check(b, img, Mode::kAsync, 3).ok());
  const auto over = Check(b, img, Mode::kAsync, 2);
  EXPECT_EQ(over.counts.at("loss-bound"), 1u);
  // The same image in sync mode: every missing write is a violation.
  EXPECT_EQ(Check(b, img, Mode::kSync).counts.at("missing"), 3u);
}

TEST(CheckVerify, TwoWritersRealTimeOrder) {
  LogBuilder a;
  a.I(1, 0, 100).C(1, 110);
  LogBuilder b;
  b.writer = 2;
  b.text = "tvilling-check 1 writer=2 size=" + std::to_string(8 * kBlockSize) + "\n";
  b.I(1, 0, 120).C(1, 130);  // writer 2 overwrites block 0 after writer 1's write completed
  MemImage img(8);
  img.Put(1, 1, 0);
  std::string err;
  auto r = Verify({a.Parse(), b.Parse()}, img, VerifyOptions{}, &err);
  ASSERT_TRUE(r) << err;
  EXPECT_EQ(r->counts.at("missing"), 1u);
  img.Put(2, 1, 0);
  r = Verify({a.Parse(), b.Parse()}, img, VerifyOptions{}, &err);
  EXPECT_TRUE(r->ok()) << r->Summary();
  EXPECT_FALSE(Verify({a.Parse(), a.Parse()}, img, VerifyOptions{}, &err));
  EXPECT_NE(err.find("two logs for writer 1"), std::string::npos);
}

TEST(CheckVerify, ImageTooSmall) {
  LogBuilder b;
  MemImage img(4);
  std::string err;
  EXPECT_FALSE(Verify({b.Parse()}, img, VerifyOptions{}, &err));
  EXPECT_NE(err.find("the image has 4 blocks"), std::string::npos) << err;
}

}  // namespace
}  // namespace tvilling::check
