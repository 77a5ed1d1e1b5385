// wire.h: the NBD protocol without I/O (the fixed newstyle handshake and the transmission phase
// with simple replies), after NetworkBlockDevice/nbd doc/proto.md.
//
// Handshake is a state machine fed exactly the bytes it asks for (Need()), which returns what to
// send and what happens next; RequestHeader/ValidateRequest judge one transmission request. The
// Asio connection (frontend.cc) only moves bytes, and the fuzzer (tests/fuzz) and the unit tests
// (tests/unit/nbd/wire_test.cc) drive these directly. Every number on the wire is big-endian.
#pragma once

#include <absl/status/status.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "agent/nbd/export.h"

namespace tvilling::nbd::wire {

inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943ull;  // "NBDMAGIC"
inline constexpr uint64_t kOptMagic = 0x49484156454f5054ull;  // "IHAVEOPT"
inline constexpr uint64_t kOptReplyMagic = 0x0003e889045565a9ull;
inline constexpr uint32_t kRequestMagic = 0x25609513u;
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698u;

// Handshake flags (server) and client flags.
inline constexpr uint16_t kFlagFixedNewstyle = 1u << 0;
inline constexpr uint16_t kFlagNoZeroes = 1u << 1;
inline constexpr uint32_t kClientFlagFixedNewstyle = 1u << 0;
inline constexpr uint32_t kClientFlagNoZeroes = 1u << 1;

// Options.
inline constexpr uint32_t kOptExportName = 1;
inline constexpr uint32_t kOptAbort = 2;
inline constexpr uint32_t kOptList = 3;
inline constexpr uint32_t kOptStartTls = 5;
inline constexpr uint32_t kOptInfo = 6;
inline constexpr uint32_t kOptGo = 7;
inline constexpr uint32_t kOptStructuredReply = 8;
inline constexpr uint32_t kOptListMetaContext = 9;
inline constexpr uint32_t kOptSetMetaContext = 10;
inline constexpr uint32_t kOptExtendedHeaders = 11;

// Option replies.
inline constexpr uint32_t kRepAck = 1;
inline constexpr uint32_t kRepServer = 2;
inline constexpr uint32_t kRepInfo = 3;
inline constexpr uint32_t kRepErrUnsup = 0x80000001u;
inline constexpr uint32_t kRepErrPolicy = 0x80000002u;
inline constexpr uint32_t kRepErrInvalid = 0x80000003u;
inline constexpr uint32_t kRepErrUnknown = 0x80000006u;
inline constexpr uint32_t kRepErrShutdown = 0x80000007u;
inline constexpr uint32_t kRepErrTooBig = 0x80000009u;

// NBD_INFO_* for NBD_REP_INFO.
inline constexpr uint16_t kInfoExport = 0;
inline constexpr uint16_t kInfoName = 1;
inline constexpr uint16_t kInfoDescription = 2;
inline constexpr uint16_t kInfoBlockSize = 3;

// Transmission flags.
inline constexpr uint16_t kTxHasFlags = 1u << 0;
inline constexpr uint16_t kTxReadOnly = 1u << 1;
inline constexpr uint16_t kTxSendFlush = 1u << 2;
inline constexpr uint16_t kTxSendFua = 1u << 3;
inline constexpr uint16_t kTxSendTrim = 1u << 5;
inline constexpr uint16_t kTxSendWriteZeroes = 1u << 6;
inline constexpr uint16_t kTxCanMultiConn = 1u << 8;

// Commands and command flags.
inline constexpr uint16_t kCmdRead = 0;
inline constexpr uint16_t kCmdWrite = 1;
inline constexpr uint16_t kCmdDisc = 2;
inline constexpr uint16_t kCmdFlush = 3;
inline constexpr uint16_t kCmdTrim = 4;
inline constexpr uint16_t kCmdCache = 5;  // not offered: EINVAL
inline constexpr uint16_t kCmdWriteZeroes = 6;
inline constexpr uint16_t kCmdBlockStatus = 7;  // needs structured replies: EINVAL
inline constexpr uint16_t kCmdFlagFua = 1u << 0;
inline constexpr uint16_t kCmdFlagNoHole = 1u << 1;
inline constexpr uint16_t kCmdFlagDf = 1u << 2;        // structured replies only: EINVAL
inline constexpr uint16_t kCmdFlagFastZero = 1u << 4;  // not advertised: EINVAL

// Errors.
inline constexpr uint32_t kEperm = 1;
inline constexpr uint32_t kEio = 5;
inline constexpr uint32_t kEnomem = 12;
inline constexpr uint32_t kEinval = 22;
inline constexpr uint32_t kEnospc = 28;
inline constexpr uint32_t kEoverflow = 75;
inline constexpr uint32_t kEnotsup = 95;
inline constexpr uint32_t kEshutdown = 108;

// Bounds on what a client can make us hold.
inline constexpr uint32_t kMaxOptionBytes = 64u << 10;  // larger options close the connection
inline constexpr uint32_t kMaxOptions = 128;            // per connection, before transmission
inline constexpr size_t kMaxStringBytes = 4096;         // names, per the spec
inline constexpr size_t kRequestHeaderBytes = 28;
inline constexpr size_t kSimpleReplyBytes = 16;
// An oversized WRITE's payload is read and thrown away up to this size; beyond it, the connection
// is closed (the spec allows either).
inline constexpr uint64_t kMaxDiscardBytes = 256ull << 20;

// Finds an export by name ("" = the default, i.e. the first). nullptr if unknown.
using ExportLookup = std::function<std::shared_ptr<Export>(std::string_view name)>;
// Every export, for NBD_OPT_LIST.
using ExportList = std::function<std::vector<std::shared_ptr<Export>>()>;

uint16_t TransmissionFlags(const ExportInfo& info);

// The server side of the fixed newstyle handshake.
class Handshake {
 public:
  enum class Next { kContinue, kTransmission, kClose };
  struct Step {
    std::string out;  // send this (may be empty)
    Next next = Next::kContinue;
    std::string reason;  // for kClose: what the client did wrong (or "client aborted")
  };

  Handshake(ExportLookup lookup, ExportList list);
  // The 18-byte greeting the server sends first.
  static std::string Greeting();
  // Bytes to feed next (client flags, an option header or an option's data).
  size_t Need() const { return need_; }
  // REQUIRES: in.size() == Need().
  Step Feed(std::string_view in);
  // Valid once Feed returned kTransmission.
  const std::shared_ptr<Export>& chosen() const { return chosen_; }

 private:
  enum class State { kClientFlags, kOptionHeader, kOptionData, kDone };
  Step OnOption(std::string_view data);
  Step InfoOrGo(std::string_view data, bool go);

  ExportLookup lookup_;
  ExportList list_;
  State state_ = State::kClientFlags;
  size_t need_ = 4;
  bool no_zeroes_ = false;
  uint32_t option_ = 0;
  uint32_t options_seen_ = 0;
  std::shared_ptr<Export> chosen_;
};

std::string EncodeOptionReply(uint32_t option, uint32_t type, std::string_view data);

// The data of NBD_OPT_INFO / NBD_OPT_GO: a name and the NBD_INFO_* items the client asks for.
struct InfoRequest {
  std::string_view name;           // points into the option data
  std::vector<uint16_t> requests;  // as sent, duplicates removed (at most 65,535 distinct anyway)
};
// Returns an empty string on success, else why the data is malformed (for NBD_REP_ERR_INVALID).
std::string ParseInfoRequest(std::string_view data, InfoRequest* out);
// NBD_REP_INFO replies for `info`: NBD_INFO_EXPORT always (the spec requires it), then NAME,
// DESCRIPTION and BLOCK_SIZE only when asked for; unknown requests are ignored. No final ACK.
std::string EncodeInfoReplies(uint32_t option, const ExportInfo& info,
                              const std::vector<uint16_t>& requests);
// The answer to NBD_OPT_EXPORT_NAME: size, transmission flags and (unless NO_ZEROES) 124 zeroes.
std::string EncodeExportNameReply(const ExportInfo& info, bool no_zeroes);
// NBD_REP_SERVER for NBD_OPT_LIST: name length, name, description.
std::string EncodeListReply(const ExportInfo& info);
const char* OptionName(uint32_t option);

struct RequestHeader {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};

// Returns false when the magic is wrong (the stream cannot be resynchronised: close it).
bool ParseRequestHeader(const char in[kRequestHeaderBytes], RequestHeader* out);

struct Verdict {
  uint32_t error = 0;  // 0: serve it; else reply this NBD error
  std::string reason;  // why, for the log
  // For a refused WRITE: its payload is still on the wire and must be read and discarded, or, above
  // kMaxDiscardBytes, the connection closed.
  bool payload_follows = false;
  bool close = false;
};
// Checks a request against the export per the spec ("Error values", "Block size constraints"):
// - unknown command (CACHE, BLOCK_STATUS included: not offered) or a flag not documented for the
//   command: EINVAL. FUA is accepted on every command once SEND_FUA was advertised (the spec says
//   the server MUST, since clients set it on READ/FLUSH), and ignored where nothing is written;
// - WRITE, TRIM, WRITE_ZEROES on a read-only export: EPERM; TRIM/WRITE_ZEROES not advertised:
// EINVAL;
// - READ/WRITE longer than max_payload_bytes: EINVAL (a WRITE's payload is still on the wire;
//   above kMaxDiscardBytes the verdict is close);
// - beyond the end: ENOSPC for WRITE and WRITE_ZEROES, EINVAL for READ and TRIM;
// - offset or length not a multiple of min_block_bytes: EINVAL;
// - FLUSH with offset or length: EINVAL. DISC is always accepted (it has no reply to carry an
// error). TRIM and WRITE_ZEROES may exceed max_payload_bytes: they carry no payload, and clients
// (the Linux kernel) send large ones.
Verdict ValidateRequest(const RequestHeader& h, const ExportInfo& info);

void EncodeSimpleReply(uint32_t error, uint64_t cookie, char out[kSimpleReplyBytes]);

// Maps a Status from an Export to the NBD error a client understands (see export.h).
uint32_t ErrorFromStatus(const absl::Status& s);

const char* CommandName(uint16_t type);

}  // namespace tvilling::nbd::wire
