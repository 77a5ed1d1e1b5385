// log_record.h: the on-disk format of one group-log record and its key (docs/log-format.md).
//
// A record is one block operation of a group, in LSN order: a WRITE (with its payload), a TRIM or a
// WRITE_ZEROES (no payload). The checksum covers the group id, the LSN, the header and the payload,
// so a record that is damaged, truncated or stored under the wrong key is detected when it is read.
#pragma once

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "storage/bytes.h"

namespace tvilling::storage {

enum class RecordType : uint8_t {
  kWrite = 1,
  kTrim = 2,
  kWriteZeroes = 3,
};
const char* RecordTypeName(RecordType t);

// Record flags (persisted).
inline constexpr uint16_t kRecordFlagFua = 1u << 0;     // the client asked for FUA
inline constexpr uint16_t kRecordFlagNoHole = 1u << 1;  // WRITE_ZEROES must allocate

inline constexpr uint8_t kRecordFormatVersion = 1;
inline constexpr size_t kRecordHeaderSize = 48;
inline constexpr size_t kLogKeySize = 13;  // 'L' + group id (u32 BE) + LSN (u64 BE)
inline constexpr uint32_t kMaxRecordPayload = 32u << 20;
// An external record's stored value: the header, then a reference to its payload in a payload file
// of the group (docs/log-format.md, "External payloads"). External payloads are always larger than
// the reference, so a value is external iff it is kExternalValueSize bytes and its header's payload
// size is not kPayloadRefSize.
inline constexpr size_t kPayloadRefSize = 16;  // file id (u64 LE), byte offset (u64 LE)
inline constexpr size_t kExternalValueSize = kRecordHeaderSize + kPayloadRefSize;

// Fixed-size header, little-endian on disk (layout in docs/log-format.md).
struct RecordHeader {
  uint8_t version = kRecordFormatVersion;
  RecordType type = RecordType::kWrite;
  uint16_t flags = 0;
  uint32_t volume = 0;        // index of the volume within its group
  uint64_t epoch = 0;         // epoch the record was written in
  uint64_t offset = 0;        // byte offset in the volume
  uint32_t length = 0;        // bytes of the volume the operation covers
  uint32_t payload_size = 0;  // == length for kWrite, 0 otherwise
  uint64_t timestamp_ns = 0;  // CLOCK_REALTIME when the primary captured the write
  uint64_t checksum = 0;      // XXH3-64 over group id, LSN, header bytes [0, 40), XXH3-64(payload)
};

// A decoded record that points into memory owned by someone else (an iterator, a batch).
struct LogRecordView {
  uint64_t lsn = 0;
  RecordHeader header;
  std::string_view payload;
  // The header's kRecordHeaderSize encoded bytes (with the checksum): header_bytes + payload is
  // the stored value ReadRaw hands out. Set by DecodeRecord and for a batch just written.
  std::string_view header_bytes;
  // For a record just written by Append (GroupLogOptions::on_batch_written): the buffer `payload`
  // points into, which a reader may keep to use `payload` after the callback. Null otherwise.
  std::shared_ptr<const void> payload_owner;
};

// Bytes the record takes as a stored value (header + payload): what the log's byte counts,
// retention and batch limits measure, and what ReadRaw hands out.
inline uint64_t StoredSize(const LogRecordView& r) { return kRecordHeaderSize + r.payload.size(); }

// Keys.
std::string EncodeLogKey(uint32_t group_id, uint64_t lsn);
void EncodeLogKeyTo(uint32_t group_id, uint64_t lsn, char out[kLogKeySize]);
// Returns false if `key` is not a log key.
bool DecodeLogKey(std::string_view key, uint32_t* group_id, uint64_t* lsn);

// XXH3-64 of a payload: the part of the checksum that does not depend on the record's place, so
// writers compute it before they take the log's lock.
uint64_t PayloadHash(std::string_view payload);

// Fills header.checksum and writes the 48 header bytes to `out`.
void EncodeRecordHeader(uint32_t group_id, uint64_t lsn, RecordHeader& header,
                        std::string_view payload, char out[kRecordHeaderSize]);
// The same with the payload's size and PayloadHash() given.
void EncodeRecordHeader(uint32_t group_id, uint64_t lsn, RecordHeader& header,
                        uint32_t payload_size, uint64_t payload_hash, char out[kRecordHeaderSize]);

// The header fields of a stored value, unverified (no checksum or field checks): for a caller that
// must look at fields before the record is verified, e.g. a replica checking shipped records
// against the batch and the group before appending them. REQUIRES: value.size() >=
// kRecordHeaderSize.
RecordHeader PeekRecordHeader(std::string_view value);

// Where an external record's payload is: the payload file of the segment that begins at LSN
// `file_id`, at byte `offset`.
struct PayloadRef {
  uint64_t file_id = 0;
  uint64_t offset = 0;
  bool operator==(const PayloadRef&) const = default;
};
void EncodePayloadRef(const PayloadRef& ref, char out[kPayloadRefSize]);
// Whether `value` (a value stored in RocksDB under a log key) is an external record.
bool IsExternalValue(std::string_view value);
// The reference of an external value. REQUIRES: IsExternalValue(value).
PayloadRef DecodePayloadRef(std::string_view value);

// Parses and verifies a stored value. Errors are DataLoss and name the group id and LSN.
// `payload_hash`, if given, receives PayloadHash(payload) (computed anyway for the checksum), so a
// record can be re-encoded under another group id without hashing its payload twice.
absl::StatusOr<LogRecordView> DecodeRecord(uint32_t group_id, uint64_t lsn, std::string_view value,
                                           uint64_t* payload_hash = nullptr);

// Records shipped from one log to another (docs/replication.md, "Records on the wire"): stored
// values (header + payload each, as GroupLog::ReadRaw hands them out) back to back in LSN order.
// Owns the buffer it was parsed from -- moved in, never copied -- and views into it, which stay
// valid while any copy of the object lives (the group log keeps one until the records are written).
class ShippedRecords {
 public:
  ShippedRecords() = default;
  // Splits `buffer` at each header's payload size. Checks framing only (a truncated or oversized
  // record is DataLoss naming its index and byte offset); checksums are checked by
  // GroupLog::AppendReplicated, which knows the LSNs.
  static absl::StatusOr<ShippedRecords> Parse(std::string buffer);
  static absl::StatusOr<ShippedRecords> Parse(Bytes buffer);

  size_t size() const { return records_.size(); }
  bool empty() const { return records_.empty(); }
  std::string_view operator[](size_t i) const { return records_[i]; }
  const std::vector<std::string_view>& records() const { return records_; }
  // Forgets the first `n` records (a resend of records already held); the buffer stays.
  void DropFront(size_t n);

 private:
  struct Owner {
    std::string str;
    Bytes bytes;
  };
  static absl::StatusOr<ShippedRecords> Split(std::shared_ptr<const Owner> owner,
                                              std::string_view data);
  std::shared_ptr<const Owner> owner_;
  std::vector<std::string_view> records_;
};

}  // namespace tvilling::storage
