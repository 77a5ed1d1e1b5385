// batch_fuzz.cc: libFuzzer target over what a replica does with bytes from the network before
// anything reaches its log: parse a ToReplica, and if it is a Batch, DecodeBatch (codec, sizes,
// decompression, checksum) and SplitRecords. Checks that bad input is an error, never a crash or
// an unbounded allocation, and that whatever is accepted is self-consistent: the decoded size is
// the one announced, the records tile the buffer exactly, and re-encoding round-trips.
//
// Checksums stop random mutations early, so two more paths go past them: the raw `records` field is
// split as if uncompressed, and an uncompressed batch is decoded again with its checksum fixed up.
//
// Seeds (tests/fuzz/corpus/batch): TVILLING_WRITE_BATCH_CORPUS=<dir> ./batch_fuzz writes them and
// exits.
#include <google/protobuf/stubs/logging.h>
#include <xxhash.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "agent/transport/codec.h"

using namespace tvilling::transport;
using tvilling::v1::Batch;
using tvilling::v1::ToReplica;

namespace {

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "batch_fuzz: invariant failed: %s\n", what);
    std::abort();
  }
}

uint32_t PayloadSize(std::string_view rec) {
  uint32_t n = 0;
  for (int i = 3; i >= 0; --i) n = n << 8 | static_cast<uint8_t>(rec[kRecordPayloadSizeOffset + i]);
  return n;
}

void CheckSplit(std::string_view buf, uint32_t count, uint64_t first_lsn) {
  std::vector<std::string_view> views;
  if (!SplitRecords(buf, count, &views).ok()) {
    (void)first_lsn;
    return;
  }
  Check(views.size() == count, "SplitRecords returned another count");
  size_t total = 0;
  for (auto v : views) {
    Check(v.size() >= kRecordHeaderBytes, "record shorter than a header");
    Check(v.size() == kRecordHeaderBytes + PayloadSize(v), "record size is not header+payload");
    Check(v.data() == buf.data() + total, "records do not tile the buffer");
    total += v.size();
  }
  Check(total == buf.size(), "records do not cover the buffer");
}

void DecodeAndSplit(const Batch& b) {
  std::string out;
  if (!DecodeBatch(b, &out).ok()) return;
  Check(out.size() == b.uncompressed_bytes(), "decoded size differs from uncompressed_bytes");
  Check(out.size() <= kMaxBatchBytes, "decoded batch over the limit");
  Check(b.checksum() == 0 || XXH3_64bits(out.data(), out.size()) == b.checksum(),
        "accepted a wrong checksum");
  CheckSplit(out, b.record_count(), b.first_lsn());
  // Whatever was accepted re-encodes to something that decodes to the same bytes.
  for (auto codec : {tvilling::v1::CODEC_LZ4, tvilling::v1::CODEC_ZSTD}) {
    Batch again;
    Check(EncodeBatch(b.epoch(), b.first_lsn(), b.record_count(), out, codec, b.durable_requested(),
                      &again)
              .ok(),
          "re-encoding an accepted batch failed");
    std::string back;
    Check(DecodeBatch(again, &back).ok() && back == out, "re-encoded batch does not round-trip");
  }
}

void WriteSeed(const std::filesystem::path& dir, const char* name, const ToReplica& m) {
  std::ofstream(dir / name, std::ios::binary) << m.SerializeAsString();
}

std::string SeedRecords(uint64_t first_lsn, uint32_t count, uint32_t payload) {
  std::string out;
  for (uint32_t i = 0; i < count; ++i) {
    char h[kRecordHeaderBytes] = {};
    h[0] = 1;
    h[1] = payload ? 1 : 2;
    uint64_t lsn = first_lsn + i;
    std::memcpy(h + 8, &lsn, 8);
    for (int k = 0; k < 4; ++k) {
      h[24 + k] = static_cast<char>((payload >> (8 * k)) & 0xff);
      h[28 + k] = static_cast<char>((payload >> (8 * k)) & 0xff);
    }
    out.append(h, sizeof h);
    for (uint32_t j = 0; j < payload; ++j) out.push_back(static_cast<char>("tvilling"[j % 8]));
  }
  return out;
}

void WriteCorpus(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  struct Seed {
    const char* name;
    tvilling::v1::Codec codec;
    uint32_t count, payload;
  };
  for (const Seed& s : {Seed{"batch_none", tvilling::v1::CODEC_NONE, 3, 64},
                        Seed{"batch_lz4", tvilling::v1::CODEC_LZ4, 4, 256},
                        Seed{"batch_zstd", tvilling::v1::CODEC_ZSTD, 4, 256},
                        Seed{"batch_trim", tvilling::v1::CODEC_NONE, 2, 0},
                        Seed{"batch_empty", tvilling::v1::CODEC_NONE, 0, 0}}) {
    ToReplica m;
    std::string recs = SeedRecords(17, s.count, s.payload);
    if (!EncodeBatch(2, 17, s.count, recs, s.codec, true, m.mutable_batch()).ok()) std::abort();
    WriteSeed(dir, s.name, m);
  }
  ToReplica hello;
  hello.mutable_hello()->set_group("g0");
  hello.mutable_hello()->set_sender_site("site-a");
  hello.mutable_hello()->set_epoch(2);
  WriteSeed(dir, "hello", hello);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Parsing random bytes logs every invalid UTF-8 string field; that is expected, not news.
  google::protobuf::SetLogHandler(nullptr);
  if (const char* dir = std::getenv("TVILLING_WRITE_BATCH_CORPUS")) {
    WriteCorpus(dir);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  ToReplica m;
  if (!m.ParseFromArray(data, static_cast<int>(size)) || !m.has_batch()) return 0;
  const Batch& b = m.batch();
  DecodeAndSplit(b);
  // Past the checksum: split the raw field, and decode an uncompressed batch with a right checksum.
  if (b.record_count() <= kMaxBatchRecords)
    CheckSplit(b.records(), b.record_count(), b.first_lsn());
  if (b.codec() == tvilling::v1::CODEC_NONE) {
    Batch fixed = b;
    fixed.set_checksum(XXH3_64bits(b.records().data(), b.records().size()));
    DecodeAndSplit(fixed);
  }
  return 0;
}
