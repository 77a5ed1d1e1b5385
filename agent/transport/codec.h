// codec.h: a replication Batch on the wire: records compressed as a whole (lz4 or zstd), and the
// inverse with every field a peer sends checked. The records' own checksums are the integrity
// check; a batch checksum (XXH3-64 of the uncompressed bytes) is verified if a sender sets one.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "tvilling/v1/replication.pb.h"

namespace tvilling::transport {

namespace v1 = ::tvilling::v1;

// Limits a receiver enforces before allocating anything (docs/replication.md, "Records on the
// wire").
inline constexpr uint32_t kMaxBatchBytes = 64u << 20;
inline constexpr uint32_t kMaxBatchRecords = 1u << 20;
// The on-disk record header (docs/log-format.md); payload size is a u32 LE at offset 28.
inline constexpr size_t kRecordHeaderBytes = 48;
inline constexpr size_t kRecordPayloadSizeOffset = 28;

// Fills *out from `records` (whole records as stored in the log, concatenated). Compresses with
// `preferred` (lz4 default acceleration, zstd level 1) and keeps the result only if it is at most
// 7/8 of the input; otherwise sends CODEC_NONE. InvalidArgument if records exceed kMaxBatchBytes or
// record_count exceeds kMaxBatchRecords. A batch over 16 KiB whose first 8 KiB do not shrink
// is sent uncompressed without trying the rest. `records` is moved into *out when uncompressed.
absl::Status EncodeBatch(uint64_t epoch, uint64_t first_lsn, uint32_t record_count,
                         std::string records, v1::Codec preferred, bool durable_requested,
                         v1::Batch* out);

// Decompresses batch.records into *out and checks codec, size limits, decompressed size and,
// if the batch has one (nonzero), its checksum. Records are not verified here: the log does that
// when it appends them. Errors are DataLoss (corrupt content) or InvalidArgument (fields out of
// range) and name the batch's first LSN.
absl::Status DecodeBatch(const v1::Batch& batch, std::string* out);
// The same, moving the records out of `batch` instead of copying them when they are uncompressed
// (batch->records() is then unspecified).
absl::Status DecodeBatch(v1::Batch* batch, std::string* out);

// Splits decoded records into `count` views, one per record (header + payload). InvalidArgument,
// naming the record index, if a record is truncated or bytes are left over.
absl::Status SplitRecords(std::string_view records, uint32_t count,
                          std::vector<std::string_view>* out);

}  // namespace tvilling::transport
