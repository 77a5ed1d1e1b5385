// check.h: the pure part of tvilling-check (a Jepsen-style checker of what survives fail-overs).
//
// The writer (tvilling_check.cc) writes 4 KiB blocks that describe themselves: which writer, which
// sequence number, which block, and a checksum over all of it. It logs each write's issue and
// completion with a CLOCK_MONOTONIC timestamp. The verifier reads a surviving image, decodes every
// block and checks it against the logs. Everything here works on memory (no I/O) so the unit tests
// (check_test.cc) drive it with synthetic logs and images.
//
// Block layout (little-endian), kBlockSize bytes:
//   [0, 8)     magic "TVCHECK1"
//   [8, 12)    writer id
//   [12, 16)   zero
//   [16, 24)   sequence number (per writer, from 1, in issue order)
//   [24, 32)   block index (offset / kBlockSize)
//   [32, 4088) payload, a function of (writer, sequence, block)
//   [4088, 4096) XXH64 of bytes [0, 4088)
//
// Log format (text, one event a line, each line one write(2) so a kill -9 keeps what was logged):
//   tvilling-check 1 writer=<id> size=<bytes>
//   I <seq> <block> <t_ns>        issued (logged before the write is sent)
//   C <seq> <t_ns> <errno>        completed: 0 = success, else the error the client saw
//   R <t_ns> <ok|fail> <uri>      a connection attempt (informational)
// A last line without its newline (the writer was killed while writing it) is ignored.
//
// The order between two writes is real time: `a` precedes `b` iff a's completion (success or
// error) was logged before b was issued. The writer never has two writes to one block in flight,
// so the writes to one block are totally ordered.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tvilling::check {

inline constexpr uint64_t kBlockSize = 4096;

// ---- blocks ----
void EncodeBlock(uint32_t writer, uint64_t seq, uint64_t block, char* out /* kBlockSize */);

struct Decoded {
  enum class Kind : uint8_t {
    kZero,     // never written (all zeros)
    kValid,    // a whole write of ours
    kTorn,     // our magic, but the checksum does not match (parts of several writes)
    kForeign,  // not zero and not ours
  };
  Kind kind = Kind::kZero;
  uint32_t writer = 0;
  uint64_t seq = 0;
  uint64_t block = 0;
};
Decoded DecodeBlock(const char* data /* kBlockSize */);
const char* KindName(Decoded::Kind k);

// ---- logs ----
struct Write {
  uint32_t writer = 0;
  uint64_t seq = 0;
  uint64_t block = 0;
  int64_t issued_ns = 0;
  std::optional<int64_t> ended_ns;  // completion logged (success or error)
  int error = 0;                    // errno of the completion, 0 = success
  bool ok() const { return ended_ns.has_value() && error == 0; }
};

struct WriterLog {
  uint32_t writer = 0;
  uint64_t size = 0;
  std::map<uint64_t, Write> writes;  // by seq
  uint64_t connects = 0, failed_connects = 0;
};

// Parses one log; on error returns nullopt and sets *error to "<name>:<line>: what".
std::optional<WriterLog> ParseLog(std::string_view text, const std::string& name,
                                  std::string* error);

// ---- verification ----
enum class Mode : uint8_t { kSync, kAsync };

struct VerifyOptions {
  Mode mode = Mode::kSync;
  std::optional<uint64_t> loss_bound;  // async: the reported bound, in writes (records)
  size_t max_listed = 20;              // violations listed per kind
};

struct Violation {
  std::string kind;  // torn, foreign, misplaced, unknown-write, missing, prefix, loss-bound
  std::string what;
};

struct VerifyResult {
  uint64_t blocks = 0;         // blocks checked
  uint64_t held = 0;           // blocks holding one of our writes
  uint64_t completed = 0;      // writes that completed successfully
  uint64_t missing = 0;        // completed writes neither present nor overwritten by a later one
  uint64_t prefix_breaks = 0;  // ... of which completed before a present write was issued
  std::map<std::string, uint64_t> counts;  // violations per kind
  std::vector<Violation> violations;       // the first max_listed of each kind
  bool ok() const { return counts.empty(); }
  std::string Summary() const;
};

// The image as a function: block index -> its kBlockSize bytes.
class Image {
 public:
  virtual ~Image() = default;
  virtual uint64_t blocks() const = 0;
  // Reads block `i` into out; returns false and sets *error on an I/O error.
  virtual bool Read(uint64_t i, char* out, std::string* error) = 0;
};

// Checks `image` against the logs. Returns nullopt and sets *error on an I/O or usage error.
std::optional<VerifyResult> Verify(const std::vector<WriterLog>& logs, Image& image,
                                   const VerifyOptions& o, std::string* error);

}  // namespace tvilling::check
