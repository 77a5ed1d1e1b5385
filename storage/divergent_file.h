// divergent_file.h: the file a replica writes before it cuts a diverged log back to the fork
// (docs/replication.md, "Rejoin", and "Divergent record files" for the format): every record
// after the fork, exactly as its log stored it, so nothing a former primary accepted is thrown
// away silently. `tvillingctl divergent show|export` reads these files with the agent stopped.
//
// A file is written under a temporary name, fsynced, renamed into place and its directory
// fsynced: a file with the final name is complete (its trailer and whole-file hash say so too).
#pragma once

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "storage/log_record.h"

namespace tvilling::storage {

inline constexpr char kDivergentMagic[8] = {'T', 'V', 'D', 'I', 'V', 'G', '0', '1'};
inline constexpr char kDivergentEndMagic[8] = {'T', 'V', 'D', 'I', 'V', 'E', 'N', 'D'};
inline constexpr uint32_t kDivergentFormatVersion = 1;
inline constexpr const char* kDivergentSuffix = ".tvdiv";

struct DivergentFileInfo {
  std::string group;
  uint32_t group_id = 0;   // the log's group id: each record's checksum is bound to it
  uint64_t fork_lsn = 0;   // the last LSN the two logs share
  uint64_t first_lsn = 0;  // first record saved (fork_lsn + 1 unless the log had dropped some)
  uint64_t last_lsn = 0;   // last record saved
  uint64_t saved_unix_ns = 0;
  uint64_t primary_epoch = 0;  // the epoch of the primary whose history showed the divergence
  std::string primary_site;
};

// The file name for a save: "<group>-fork<fork_lsn>-<UTC yyyymmddThhmmss.nnnnnnnnnZ>.tvdiv".
std::string DivergentFileName(const std::string& group, uint64_t fork_lsn, uint64_t unix_ns);

class DivergentFileWriter {
 public:
  // Creates `dir` if needed and a temporary file in it.
  static absl::StatusOr<std::unique_ptr<DivergentFileWriter>> Create(
      const std::filesystem::path& dir, const DivergentFileInfo& info);
  ~DivergentFileWriter();  // removes the temporary file unless Finish succeeded

  // The next record (LSN first_lsn, first_lsn + 1, ...): its stored value (header + payload).
  absl::Status Add(uint64_t lsn, std::string_view stored_value);
  // Writes the trailer, fsyncs, renames to the final name, fsyncs the directory. Returns the path.
  absl::StatusOr<std::filesystem::path> Finish();

 private:
  DivergentFileWriter() = default;
  absl::Status Write(std::string_view bytes);
  int fd_ = -1;
  std::filesystem::path dir_, tmp_, final_;
  DivergentFileInfo info_;
  uint64_t next_lsn_ = 0;
  uint64_t count_ = 0;
  void* hash_ = nullptr;  // XXH3_state_t*
  bool finished_ = false;
};

struct DivergentRecord {
  uint64_t lsn = 0;
  RecordHeader header;  // as stored (unverified if !checksum_ok)
  std::string payload;
  bool checksum_ok = false;
  std::string error;  // why the checksum or header did not verify
};

// Reads a file: the header, then `fn` for every record in order. A record whose checksum does
// not verify is handed out with checksum_ok = false (an operator may still want it); broken
// framing, a missing trailer (incomplete file) or a whole-file hash mismatch is a DataLoss
// error naming the file and byte offset. An error from `fn` stops the read and is returned.
absl::Status ReadDivergentFile(const std::filesystem::path& path, DivergentFileInfo* info,
                               const std::function<absl::Status(const DivergentRecord&)>& fn);

}  // namespace tvilling::storage
