// export.h: what the NBD server serves. The node implements Export for each volume it exposes; the
// server (frontend.h) speaks the protocol and calls these methods, never touching storage itself.
//
// Every Done must be called exactly once (a connection waits for all of them before it closes, and
// Stop() waits for the connections). Completion callbacks may run on any thread (the group's
// committer, an I/O thread); the server hands the reply back to the connection's executor. Errors
// are absl::Status and map to NBD errors: InvalidArgument/OutOfRange -> EINVAL, ResourceExhausted
// -> ENOSPC, PermissionDenied/FailedPrecondition
// -> EPERM, Unavailable -> ESHUTDOWN, Unimplemented -> ENOTSUP, anything else -> EIO.
#pragma once

#include <absl/functional/any_invocable.h>
#include <absl/status/status.h>

#include <cstdint>
#include <string>

#include "storage/bytes.h"

namespace tvilling::nbd {

struct ExportInfo {
  std::string name;
  std::string description;
  uint64_t size_bytes = 0;
  bool read_only = false;
  bool can_trim = true;
  bool can_write_zeroes = true;
  bool can_fua = true;
  // FLUSH on any connection makes every write completed on any connection durable.
  bool can_multi_conn = true;
  uint32_t min_block_bytes = 1;
  uint32_t preferred_block_bytes = 4096;
  uint32_t max_payload_bytes = 32u << 20;
};

class Export {
 public:
  using Done = absl::AnyInvocable<void(absl::Status) &&>;
  virtual ~Export() = default;

  virtual const ExportInfo& info() const = 0;

  // Ranges are checked by the server against info().size_bytes before these are called.
  // READ: fill `out` (length bytes, owned by the caller until done runs).
  virtual void Read(uint64_t offset, uint32_t length, char* out, Done done) = 0;
  // WRITE: completes when the data is in the group log (and durable if fua).
  virtual void Write(uint64_t offset, storage::Bytes data, bool fua, Done done) = 0;
  // FLUSH: completes when every write completed before it (on any connection) is durable.
  virtual void Flush(Done done) = 0;
  virtual void Trim(uint64_t offset, uint32_t length, bool fua, Done done) = 0;
  virtual void WriteZeroes(uint64_t offset, uint32_t length, bool fua, bool no_hole, Done done) = 0;
};

}  // namespace tvilling::nbd
