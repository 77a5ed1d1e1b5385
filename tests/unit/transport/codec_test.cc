// codec_test.cc: round trips of EncodeBatch/DecodeBatch for each codec, and each rejection.
#include "agent/transport/codec.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <xxhash.h>

#include <cstring>
#include <random>

namespace tvilling::transport {
namespace {

// A log record: 48-byte header with payload size at offset 28, then the payload.
void AppendRecord(std::string* out, uint32_t payload_size, char fill) {
  std::string header(kRecordHeaderBytes, '\0');
  for (int i = 0; i < 4; ++i)
    header[kRecordPayloadSizeOffset + i] = static_cast<char>(payload_size >> (8 * i));
  *out += header;
  out->append(payload_size, fill);
}

std::string Records(int n, uint32_t payload = 4096) {
  std::string s;
  for (int i = 0; i < n; ++i) AppendRecord(&s, payload, static_cast<char>('a' + i % 26));
  return s;
}

std::string Random(size_t n) {
  std::mt19937_64 rng(42);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

TEST(Codec, RoundTripEachCodec) {
  const std::string recs = Records(10);
  for (v1::Codec c : {v1::CODEC_NONE, v1::CODEC_LZ4, v1::CODEC_ZSTD}) {
    v1::Batch b;
    ASSERT_TRUE(EncodeBatch(7, 100, 10, recs, c, true, &b).ok());
    EXPECT_EQ(b.codec(), c);
    EXPECT_EQ(b.epoch(), 7u);
    EXPECT_EQ(b.first_lsn(), 100u);
    EXPECT_EQ(b.record_count(), 10u);
    EXPECT_TRUE(b.durable_requested());
    EXPECT_EQ(b.uncompressed_bytes(), recs.size());
    if (c != v1::CODEC_NONE) {
      EXPECT_LT(b.records().size(), recs.size() / 8);
    }
    std::string out;
    ASSERT_TRUE(DecodeBatch(b, &out).ok());
    EXPECT_EQ(out, recs);
    std::vector<std::string_view> split;
    ASSERT_TRUE(SplitRecords(out, 10, &split).ok());
    ASSERT_EQ(split.size(), 10u);
    EXPECT_EQ(split[3].size(), kRecordHeaderBytes + 4096);
    EXPECT_EQ(split[3].back(), 'd');
  }
}

// A batch over 16 KiB is judged on its first 8 KiB: an incompressible start skips the attempt on
// the rest (cheap for the common case of encrypted or compressed guest data), a compressible one
// is compressed whole. Either way the batch decodes to exactly its records.
TEST(Codec, LargeBatchJudgedOnItsFirst8KiB) {
  const std::string compressible = Records(64, 16 << 10);  // 1 MiB of runs
  std::string random_start = Random(8 << 10) + compressible;
  for (v1::Codec c : {v1::CODEC_LZ4, v1::CODEC_ZSTD}) {
    v1::Batch skipped;
    ASSERT_TRUE(EncodeBatch(1, 1, 1, random_start, c, false, &skipped).ok());
    EXPECT_EQ(skipped.codec(), v1::CODEC_NONE) << "the random first 8 KiB decide";
    v1::Batch packed;
    ASSERT_TRUE(EncodeBatch(1, 1, 64, compressible, c, false, &packed).ok());
    EXPECT_EQ(packed.codec(), c);
    EXPECT_LT(packed.records().size(), compressible.size() / 8);
    for (const v1::Batch* b : {&skipped, &packed}) {
      std::string out;
      ASSERT_TRUE(DecodeBatch(*b, &out).ok());
      EXPECT_EQ(out, b == &skipped ? random_start : compressible);
    }
  }
}

// The replica's overload takes uncompressed records out of the message instead of copying them,
// with the same checks.
TEST(Codec, DecodeFromAMutableBatchMovesUncompressedRecords) {
  const std::string recs = Records(4);
  v1::Batch b;
  ASSERT_TRUE(EncodeBatch(1, 9, 4, recs, v1::CODEC_NONE, false, &b).ok());
  v1::Batch corrupt = b;
  std::string out;
  ASSERT_TRUE(DecodeBatch(&b, &out).ok());
  EXPECT_EQ(out, recs);
  EXPECT_TRUE(b.records().empty());
  corrupt.set_checksum(XXH3_64bits(recs.data(), recs.size()));  // a sender that sets one
  corrupt.mutable_records()->back() ^= 1;
  const absl::Status st = DecodeBatch(&corrupt, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(st.message()), ::testing::HasSubstr("batch at LSN 9: checksum mismatch"));
  v1::Batch packed;
  ASSERT_TRUE(EncodeBatch(1, 9, 4, recs, v1::CODEC_LZ4, false, &packed).ok());
  ASSERT_TRUE(DecodeBatch(&packed, &out).ok());
  EXPECT_EQ(out, recs);
}

TEST(Codec, IncompressibleFallsBackToNone) {
  const std::string data = Random(64 << 10);
  for (v1::Codec c : {v1::CODEC_LZ4, v1::CODEC_ZSTD}) {
    v1::Batch b;
    ASSERT_TRUE(EncodeBatch(1, 1, 1, data, c, false, &b).ok());
    EXPECT_EQ(b.codec(), v1::CODEC_NONE);
    std::string out;
    ASSERT_TRUE(DecodeBatch(b, &out).ok());
    EXPECT_EQ(out, data);
  }
}

TEST(Codec, EmptyBatch) {
  v1::Batch b;
  ASSERT_TRUE(EncodeBatch(1, 1, 0, "", v1::CODEC_LZ4, false, &b).ok());
  std::string out = "x";
  ASSERT_TRUE(DecodeBatch(b, &out).ok());
  EXPECT_TRUE(out.empty());
}

TEST(Codec, EncodeRejectsOversize) {
  v1::Batch b;
  std::string big(kMaxBatchBytes + 1, 'x');
  EXPECT_EQ(EncodeBatch(1, 1, 1, big, v1::CODEC_NONE, false, &b).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodeBatch(1, 1, kMaxBatchRecords + 1, "x", v1::CODEC_NONE, false, &b).code(),
            absl::StatusCode::kInvalidArgument);
}

// EncodeBatch sends no batch checksum (each record has its own, which the log verifies on
// append), so DecodeBatch hands a batch with a damaged record on: the bytes come out as sent, for
// GroupLog::AppendReplicated to refuse (tests/integration/repl_test.py, case bad_record).
TEST(Codec, NoBatchChecksumIsSentAndRecordsAreNotVerifiedHere) {
  std::string recs = Records(3);
  for (v1::Codec c : {v1::CODEC_NONE, v1::CODEC_LZ4, v1::CODEC_ZSTD}) {
    v1::Batch b;
    ASSERT_TRUE(EncodeBatch(1, 7, 3, recs, c, false, &b).ok());
    EXPECT_EQ(b.checksum(), 0u);
  }
  recs.back() ^= 1;
  v1::Batch b;
  ASSERT_TRUE(EncodeBatch(1, 7, 3, recs, v1::CODEC_LZ4, false, &b).ok());
  ASSERT_EQ(b.codec(), v1::CODEC_LZ4);
  std::string out;
  ASSERT_TRUE(DecodeBatch(b, &out).ok());
  EXPECT_EQ(out, recs);
}

TEST(Codec, DecodeRejectsChecksumMismatch) {
  for (v1::Codec c : {v1::CODEC_NONE, v1::CODEC_LZ4, v1::CODEC_ZSTD}) {
    v1::Batch b;
    ASSERT_TRUE(EncodeBatch(1, 55, 2, Records(2), c, false, &b).ok());
    b.set_checksum(b.checksum() ^ 1);
    std::string out;
    absl::Status s = DecodeBatch(b, &out);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_NE(std::string(s.message()).find("checksum"), std::string::npos) << s;
    EXPECT_NE(std::string(s.message()).find("LSN 55"), std::string::npos) << s;
  }
}

TEST(Codec, DecodeRejectsCorruptCompressedData) {
  for (v1::Codec c : {v1::CODEC_LZ4, v1::CODEC_ZSTD}) {
    v1::Batch b;
    ASSERT_TRUE(EncodeBatch(1, 1, 4, Records(4), c, false, &b).ok());
    ASSERT_EQ(b.codec(), c);
    std::string garbled = b.records();
    garbled.resize(garbled.size() / 2);
    b.set_records(garbled);
    std::string out;
    EXPECT_EQ(DecodeBatch(b, &out).code(), absl::StatusCode::kDataLoss);
    b.set_records(Random(200));
    EXPECT_FALSE(DecodeBatch(b, &out).ok());
  }
}

TEST(Codec, DecodeRejectsWrongUncompressedSize) {
  for (v1::Codec c : {v1::CODEC_NONE, v1::CODEC_LZ4, v1::CODEC_ZSTD}) {
    for (int delta : {-1, 1}) {
      v1::Batch b;
      ASSERT_TRUE(EncodeBatch(1, 1, 4, Records(4), c, false, &b).ok());
      b.set_uncompressed_bytes(b.uncompressed_bytes() + delta);
      std::string out;
      absl::Status s = DecodeBatch(b, &out);
      EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << c << " " << delta << " " << s;
    }
  }
}

TEST(Codec, DecodeRejectsLimitsAndUnknownCodec) {
  v1::Batch b;
  ASSERT_TRUE(EncodeBatch(1, 1, 1, Records(1), v1::CODEC_NONE, false, &b).ok());
  std::string out;
  v1::Batch big = b;
  big.set_uncompressed_bytes(kMaxBatchBytes + 1);
  EXPECT_EQ(DecodeBatch(big, &out).code(), absl::StatusCode::kInvalidArgument);
  v1::Batch many = b;
  many.set_record_count(kMaxBatchRecords + 1);
  EXPECT_EQ(DecodeBatch(many, &out).code(), absl::StatusCode::kInvalidArgument);
  v1::Batch unknown = b;
  unknown.set_codec(static_cast<v1::Codec>(9));
  absl::Status s = DecodeBatch(unknown, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("codec 9"), std::string::npos) << s;
}

TEST(Codec, SplitRejectsTruncatedHeader) {
  std::string recs = Records(3);
  recs.resize(2 * (kRecordHeaderBytes + 4096) + 10);
  std::vector<std::string_view> v;
  absl::Status s = SplitRecords(recs, 3, &v);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("record 2"), std::string::npos) << s;
  EXPECT_NE(std::string(s.message()).find("header"), std::string::npos) << s;
}

TEST(Codec, SplitRejectsTruncatedPayload) {
  std::string recs = Records(3);
  recs.pop_back();
  std::vector<std::string_view> v;
  absl::Status s = SplitRecords(recs, 3, &v);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("record 2"), std::string::npos) << s;
  EXPECT_NE(std::string(s.message()).find("payload"), std::string::npos) << s;
}

TEST(Codec, SplitRejectsTrailingBytesAndHugePayloadSize) {
  std::string recs = Records(2) + "xyz";
  std::vector<std::string_view> v;
  absl::Status s = SplitRecords(recs, 2, &v);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("3 trailing bytes"), std::string::npos) << s;
  // Fewer records declared than present is the same error.
  EXPECT_FALSE(SplitRecords(Records(2), 1, &v).ok());
  // A payload size near 4 GiB must not overflow the bounds check.
  std::string huge;
  AppendRecord(&huge, 0, 'x');
  for (int i = 0; i < 4; ++i) huge[kRecordPayloadSizeOffset + i] = '\xff';
  EXPECT_EQ(SplitRecords(huge, 1, &v).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tvilling::transport
