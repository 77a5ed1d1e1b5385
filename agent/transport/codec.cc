// codec.cc: batch compression and validation (see codec.h).
#include "agent/transport/codec.h"

#include <lz4.h>
#include <xxhash.h>
#include <zstd.h>

#include <algorithm>
#include <cstring>

#include "fmt/format.h"

namespace tvilling::transport {

namespace {

uint64_t Checksum(std::string_view data) { return XXH3_64bits(data.data(), data.size()); }

// A batch larger than twice this is first tried on its first kSampleBytes: data that does not
// shrink (already compressed or encrypted, as most of a busy volume's writes are) then costs an
// 8 KiB attempt instead of a whole one. With the sample at 64 KiB, a primary shipping 64 KiB
// writes of such data at 100 MiB/s spent 14 % of its CPU in LZ4 (docs/benchmarks.md, "Steady
// writeback, one ack per async batch").
constexpr size_t kSampleBytes = 8u << 10;

bool CompressWhole(v1::Codec codec, std::string_view in, std::string* out);

// Returns false if the codec failed or did not pay off; `out` is then unspecified.
bool Compress(v1::Codec codec, std::string_view in, std::string* out) {
  if (in.empty()) return false;
  if (in.size() > 2 * kSampleBytes && !CompressWhole(codec, in.substr(0, kSampleBytes), out)) {
    return false;
  }
  return CompressWhole(codec, in, out);
}

bool CompressWhole(v1::Codec codec, std::string_view in, std::string* out) {
  switch (codec) {
    case v1::CODEC_LZ4: {
      int bound = LZ4_compressBound(static_cast<int>(in.size()));
      if (bound <= 0) return false;
      out->resize(static_cast<size_t>(bound));
      int n = LZ4_compress_default(in.data(), out->data(), static_cast<int>(in.size()), bound);
      if (n <= 0) return false;
      out->resize(static_cast<size_t>(n));
      break;
    }
    case v1::CODEC_ZSTD: {
      out->resize(ZSTD_compressBound(in.size()));
      size_t n = ZSTD_compress(out->data(), out->size(), in.data(), in.size(), 1);
      if (ZSTD_isError(n)) return false;
      out->resize(n);
      break;
    }
    default:
      return false;
  }
  // Only worth the receiver's CPU if it saves at least 1/8.
  return static_cast<uint64_t>(out->size()) * 8 <= static_cast<uint64_t>(in.size()) * 7;
}

}  // namespace

absl::Status EncodeBatch(uint64_t epoch, uint64_t first_lsn, uint32_t record_count,
                         std::string records, v1::Codec preferred, bool durable_requested,
                         v1::Batch* out) {
  if (records.size() > kMaxBatchBytes) {
    return absl::InvalidArgumentError(
        fmt::format("batch at LSN {}: {} bytes of records exceed the {} byte limit", first_lsn,
                    records.size(), kMaxBatchBytes));
  }
  if (record_count > kMaxBatchRecords) {
    return absl::InvalidArgumentError(
        fmt::format("batch at LSN {}: {} records exceed the limit of {}", first_lsn, record_count,
                    kMaxBatchRecords));
  }
  out->Clear();
  out->set_epoch(epoch);
  out->set_first_lsn(first_lsn);
  out->set_record_count(record_count);
  out->set_uncompressed_bytes(static_cast<uint32_t>(records.size()));
  // No batch checksum: every record carries its own over header and payload, which the replica
  // verifies before it appends (GroupLog::AppendReplicated), so a second pass over the batch on
  // each side would check nothing more (docs/replication.md, "Records on the wire").
  out->set_durable_requested(durable_requested);
  std::string compressed;
  if (preferred != v1::CODEC_NONE && Compress(preferred, records, &compressed)) {
    out->set_codec(preferred);
    out->set_records(std::move(compressed));
  } else {
    out->set_codec(v1::CODEC_NONE);
    out->set_records(std::move(records));
  }
  return absl::OkStatus();
}

namespace {

// `take`, if set, is batch.records() itself, which may then be moved out instead of copied.
absl::Status Decode(const v1::Batch& batch, std::string* take, std::string* out) {
  const uint64_t lsn = batch.first_lsn();
  const uint32_t want = batch.uncompressed_bytes();
  if (want > kMaxBatchBytes) {
    return absl::InvalidArgumentError(
        fmt::format("batch at LSN {}: uncompressed_bytes {} exceeds the {} byte limit", lsn, want,
                    kMaxBatchBytes));
  }
  if (batch.record_count() > kMaxBatchRecords) {
    return absl::InvalidArgumentError(
        fmt::format("batch at LSN {}: record_count {} exceeds the limit of {}", lsn,
                    batch.record_count(), kMaxBatchRecords));
  }
  const std::string& in = batch.records();
  switch (batch.codec()) {
    case v1::CODEC_NONE:
      if (in.size() != want) {
        return absl::DataLossError(fmt::format(
            "batch at LSN {}: {} bytes of records, header says {}", lsn, in.size(), want));
      }
      if (take != nullptr) {
        out->swap(*take);
      } else {
        out->assign(in);
      }
      break;
    case v1::CODEC_LZ4: {
      out->resize(want);
      int n = LZ4_decompress_safe(in.data(), out->data(), static_cast<int>(in.size()),
                                  static_cast<int>(want));
      if (n < 0) {
        return absl::DataLossError(
            fmt::format("batch at LSN {}: lz4 data is corrupt ({} bytes)", lsn, in.size()));
      }
      if (static_cast<uint32_t>(n) != want) {
        return absl::DataLossError(fmt::format(
            "batch at LSN {}: lz4 data decompresses to {} bytes, header says {}", lsn, n, want));
      }
      break;
    }
    case v1::CODEC_ZSTD: {
      // The frame may state its content size; reject a lie before decompressing.
      unsigned long long framed = ZSTD_getFrameContentSize(in.data(), in.size());
      if (framed == ZSTD_CONTENTSIZE_ERROR) {
        return absl::DataLossError(
            fmt::format("batch at LSN {}: zstd data is corrupt ({} bytes)", lsn, in.size()));
      }
      if (framed != ZSTD_CONTENTSIZE_UNKNOWN && framed != want) {
        return absl::DataLossError(
            fmt::format("batch at LSN {}: zstd data decompresses to {} bytes, header says {}", lsn,
                        framed, want));
      }
      // One spare byte so that output longer than `want` is detected rather than truncated.
      out->resize(static_cast<size_t>(want) + 1);
      size_t n = ZSTD_decompress(out->data(), out->size(), in.data(), in.size());
      if (ZSTD_isError(n)) {
        return absl::DataLossError(
            fmt::format("batch at LSN {}: zstd data is corrupt: {}", lsn, ZSTD_getErrorName(n)));
      }
      if (n != want) {
        return absl::DataLossError(fmt::format(
            "batch at LSN {}: zstd data decompresses to {} bytes, header says {}", lsn, n, want));
      }
      out->resize(want);
      break;
    }
    default:
      return absl::InvalidArgumentError(
          fmt::format("batch at LSN {}: unknown codec {}", lsn, static_cast<int>(batch.codec())));
  }
  // Optional (0: not sent; our own sender does not, see EncodeBatch).
  if (batch.checksum() == 0) return absl::OkStatus();
  const uint64_t sum = Checksum(*out);
  if (sum != batch.checksum()) {
    return absl::DataLossError(
        fmt::format("batch at LSN {}: checksum mismatch (computed {:016x}, batch says {:016x})",
                    lsn, sum, batch.checksum()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status DecodeBatch(const v1::Batch& batch, std::string* out) {
  return Decode(batch, nullptr, out);
}

absl::Status DecodeBatch(v1::Batch* batch, std::string* out) {
  return Decode(*batch, batch->mutable_records(), out);
}

absl::Status SplitRecords(std::string_view records, uint32_t count,
                          std::vector<std::string_view>* out) {
  out->clear();
  out->reserve(std::min<uint32_t>(count, kMaxBatchRecords));
  size_t pos = 0;
  for (uint32_t i = 0; i < count; ++i) {
    const size_t left = records.size() - pos;
    if (left < kRecordHeaderBytes) {
      return absl::InvalidArgumentError(
          fmt::format("record {} of {}: truncated header ({} of {} bytes)", i, count, left,
                      kRecordHeaderBytes));
    }
    const auto* p =
        reinterpret_cast<const unsigned char*>(records.data() + pos + kRecordPayloadSizeOffset);
    const uint32_t payload = static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
                             (static_cast<uint32_t>(p[2]) << 16) |
                             (static_cast<uint32_t>(p[3]) << 24);
    if (left - kRecordHeaderBytes < payload) {
      return absl::InvalidArgumentError(
          fmt::format("record {} of {}: truncated payload ({} of {} bytes)", i, count,
                      left - kRecordHeaderBytes, payload));
    }
    const size_t len = kRecordHeaderBytes + payload;
    out->push_back(records.substr(pos, len));
    pos += len;
  }
  if (pos != records.size()) {
    return absl::InvalidArgumentError(
        fmt::format("record {}: {} trailing bytes after the {} records the batch declares", count,
                    records.size() - pos, count));
  }
  return absl::OkStatus();
}

}  // namespace tvilling::transport
