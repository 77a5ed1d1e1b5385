// verify.h: online verification of a replica's volumes against the primary's (docs/replication.md,
// "Verify"), the pure parts: which chunks to compare, when two hashes of a chunk taken on two
// sites while writes continue describe the same LSN (the consistency rule), the pacing of the
// reads, and the summary's verdict. No I/O, no clock (time is an input).
//
// The rule. Each site's applier notes, per 1 MiB block of each volume, the LSN of the last record
// it applied there (set before the record is written, so a reader sees it change). A site reads
// a chunk as: w1 = last-write LSN of the chunk, a = applied LSN, the read and hash, w2 = last-write
// LSN again. If w1 == w2 and w1 <= a, no record touched the chunk during the read and the last one
// that did is complete: the bytes read are the chunk's content at every LSN in
// [max(w1, tracking start), a] (the tracking start is the applied LSN when the site began noting:
// writes before it are unknown). Two samples whose intervals share an LSN describe the chunk at
// that same LSN (every replica is a prefix of the primary's log), so their hashes must be equal;
// two samples that share none are not compared (retried), never counted as a mismatch.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "agent/core/replication.h"

namespace tvilling::core {

// Granularity of the last-write notes (8 bytes of memory per MiB of volume).
inline constexpr uint64_t kWriteTrackBytes = 1ull << 20;
// Default chunk: one hash per MiB.
inline constexpr uint64_t kVerifyChunkBytes = 1ull << 20;
// A chunk is a multiple of kWriteTrackBytes, at most this.
inline constexpr uint64_t kVerifyMaxChunkBytes = 16ull << 20;
// One request between sites: at most this many chunks and bytes to hash.
inline constexpr size_t kVerifyMaxChunksPerRequest = 64;
inline constexpr uint64_t kVerifyMaxRequestBytes = 64ull << 20;
// A chunk whose samples never shared an LSN after this many tries is reported unverified (a
// block rewritten faster than the replica applies it), not mismatching.
inline constexpr uint32_t kVerifyMaxAttempts = 8;
// Mismatching ranges kept in a result (the count goes on beyond it).
inline constexpr size_t kVerifyMaxListedRanges = 4096;

struct VerifyChunk {
  uint32_t volume = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  bool operator==(const VerifyChunk&) const = default;
};

// The chunks of a verify in (volume, offset) order: every volume, or only `only_volume`; each
// volume cut into `chunk_bytes` pieces, its last one shorter. Handed out a few at a time (a large
// volume has millions of chunks).
class VerifyPlan {
 public:
  VerifyPlan(std::vector<uint64_t> volume_sizes, std::optional<uint32_t> only_volume,
             uint64_t chunk_bytes);
  uint64_t total_chunks() const { return total_chunks_; }
  uint64_t total_bytes() const { return total_bytes_; }
  bool done() const { return volume_ >= end_volume_; }
  // The next chunks, at most `max_chunks` of them and (beyond the first) `max_bytes` in all.
  std::vector<VerifyChunk> Next(size_t max_chunks, uint64_t max_bytes);

 private:
  void SkipEmpty();
  std::vector<uint64_t> sizes_;
  uint64_t chunk_bytes_;
  uint32_t volume_ = 0;
  uint32_t end_volume_ = 0;
  uint64_t offset_ = 0;
  uint64_t total_chunks_ = 0;
  uint64_t total_bytes_ = 0;
};

// Checks a verify's options against the group's volumes: `only_volume` exists, chunk_bytes is a
// non-zero multiple of kWriteTrackBytes and at most kVerifyMaxChunkBytes. Empty when fine, else
// the reason for an operator.
std::string CheckVerifyOptions(const std::vector<uint64_t>& volume_sizes,
                               std::optional<uint32_t> only_volume, uint64_t chunk_bytes);

// What a site observed around one read of a chunk (see the file comment).
struct ChunkRead {
  uint64_t last_write_before = 0;  // w1
  uint64_t applied_before = 0;     // a
  uint64_t last_write_after = 0;   // w2
  uint64_t track_from = 0;         // the site's tracking start
};

// A chunk's hash and the LSNs at which it is the chunk's content.
struct ChunkSample {
  uint64_t hash_high = 0;
  uint64_t hash_low = 0;
  bool stable = false;      // false: a record was applied to the chunk during the read; retry
  uint64_t last_write = 0;  // w1, for ExtendSample
  uint64_t valid_from = 0;
  uint64_t valid_to = 0;
};

// The sample a read gives (stable, valid_from, valid_to; the hash is the caller's).
ChunkSample SampleFromRead(const ChunkRead& read, uint64_t hash_high, uint64_t hash_low);

// The primary, comparing later: if the chunk's last-write LSN is still the sample's and the site
// has applied up to `applied_now`, the content is unchanged up to there.
ChunkSample ExtendSample(ChunkSample sample, uint64_t last_write_now, uint64_t applied_now);

enum class ChunkVerdict : uint8_t { kMatch, kMismatch, kRetry };
const char* ChunkVerdictName(ChunkVerdict v);
// kRetry unless both samples are stable and their intervals share an LSN; then kMatch if the
// hashes are equal, else kMismatch.
ChunkVerdict CompareChunk(const ChunkSample& primary, const ChunkSample& replica);

// The replica answers a request once its applied LSN reaches the largest valid_from of the
// primary's samples in it (then every interval can meet the replica's).
uint64_t VerifyWaitLsn(const std::vector<ChunkSample>& primary_samples);

// Paces reads to `bytes_per_s` (0 = no limit): Reserve(now, n) returns when the n bytes may be
// read (now, or later), and books them. A burst of at most 100 ms of the rate.
class VerifyPacer {
 public:
  explicit VerifyPacer(uint64_t bytes_per_s) : rate_(bytes_per_s) {}
  Nanos Reserve(Nanos now, uint64_t bytes);

 private:
  uint64_t rate_;
  Nanos next_ = 0;
};

// Bytes per second and seconds left, from the bytes done since `started_at` (0 and 0 during the
// first second: too little to say).
struct VerifyRate {
  uint64_t bytes_per_s = 0;
  double eta_s = 0;
};
VerifyRate VerifyRateAt(uint64_t done_bytes, uint64_t total_bytes, Nanos started_at, Nanos now);

// Adds a mismatching chunk to sorted, merged `ranges` (adjacent chunks of one volume join).
// Returns false once kVerifyMaxListedRanges ranges are listed and the chunk would need a new one.
bool AddMismatch(std::vector<Extent>& ranges, const VerifyChunk& chunk);

}  // namespace tvilling::core
