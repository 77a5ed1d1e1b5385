// payload_files.h: the payload files of one group log: large record payloads kept outside RocksDB
// (docs/log-format.md, "External payloads").
//
// One file per log segment, named after the segment's first LSN (20 digits, ".pay"), in
// `<rocksdb dir>/payload/<group id>/`. Payloads are only appended (one pwritev per batch and file)
// and read back with pread; a file goes whole when retention drops its segment. The group log
// decides which file a payload goes to and keeps the references; this class does the file I/O and
// remembers which files hold bytes not yet fdatasynced.
//
// Recycling: a file that goes is renamed `free-<n>` and kept (up to `recycle_files` of them),
// and the next new segment's file is such a file renamed back, its old bytes overwritten from
// offset 0. Overwriting blocks the file system already allocated, through pages the page cache
// already holds, costs a fraction of what a new file costs (allocation, fresh zeroed pages, the
// extent updates in the fdatasync): docs/log-format.md, "Recycled payload files". Bytes past a
// recycled file's last append are stale; no record refers to them, and a record that would (a
// power cut between the WAL and the payload's fdatasync) fails its checksum like a torn payload.
//
// Thread safety: every method may be called from any thread. Append is called by one thread at a
// time (the group's committer); reads run concurrently with it and with Remove (a file removed
// while being read stays readable through the descriptor the reader holds).
#pragma once

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace tvilling::storage {

class PayloadFiles {
 public:
  // `dir` is created (with its parent) on the first Append. `group` names the group in errors.
  // Every `writeback_bytes` appended to a file (0: never), Append starts their writeback
  // (sync_file_range(SYNC_FILE_RANGE_WRITE), which neither waits for it nor makes it durable).
  // Up to `recycle_files` removed files are kept for reuse (0: removed files are unlinked).
  PayloadFiles(std::filesystem::path dir, std::string group, uint64_t writeback_bytes = 0,
               size_t recycle_files = 0);
  ~PayloadFiles();
  PayloadFiles(const PayloadFiles&) = delete;
  PayloadFiles& operator=(const PayloadFiles&) = delete;

  const std::filesystem::path& dir() const { return dir_; }
  std::filesystem::path PathOf(uint64_t file_id) const;

  // The ids of the files in the directory (ascending); empty if it does not exist.
  absl::StatusOr<std::vector<uint64_t>> List() const;

  // Appends `parts` back to back at the end of file `file_id` with pwritev; returns the offset of
  // the first byte. A missing file is made from a recycled one (appends start at 0) or created.
  // The file is dirty until the next SyncDirty().
  absl::StatusOr<uint64_t> Append(uint64_t file_id, std::span<const std::string_view> parts);

  // fdatasyncs every file appended to since the last SyncDirty (and the directory, after a file
  // was created): once it returns OK, every byte appended before the call is durable. Calls are
  // serialised, so a caller never returns before an fdatasync that another caller started.
  absl::Status SyncDirty();
  // fdatasyncs every file in the directory and the directory (at open).
  absl::Status SyncAll();

  // Reads `n` bytes at `offset` of file `file_id` into `out`. A missing file or a short read is
  // NotFound / DataLoss naming the group, the file and the offset.
  absl::Status Read(uint64_t file_id, uint64_t offset, char* out, size_t n) const;

  // Removes files: keeps them for recycling while there is room and no reader holds them, unlinks
  // the rest. Errors other than "not there" are returned (the first one).
  absl::Status RemoveIf(const std::function<bool(uint64_t file_id)>& pred);
  absl::Status RemoveAll() {
    return RemoveIf([](uint64_t) { return true; });
  }

  // Bytes the file `file_id` holds (0 if missing); for tests.
  uint64_t SizeOf(uint64_t file_id) const;
  // How many times Append started a writeback (writeback_bytes); for tests.
  uint64_t writebacks_started() const { return writebacks_started_.load(); }
  // Files kept for recycling now, and files Append made from recycled ones; for tests and status.
  size_t recycled_files() const;
  uint64_t files_reused() const { return files_reused_.load(); }

 private:
  struct File;
  // The open file `file_id`, opened (and created if `create`) on first use.
  absl::StatusOr<std::shared_ptr<File>> Get(uint64_t file_id, bool create) const;
  absl::Status SyncDir();
  // Adopts the `free-<n>` files a previous run left (once, under mu_; the extra ones go).
  void AdoptRecycledLocked() const;
  // Renames a recycled file to `file_id`'s name and returns it (nullptr if none could be).
  std::shared_ptr<File> ReuseLocked(uint64_t file_id);

  const std::filesystem::path dir_;
  const std::string group_;
  const uint64_t writeback_bytes_;
  const size_t recycle_files_;
  std::atomic<uint64_t> writebacks_started_{0};
  std::atomic<uint64_t> files_reused_{0};
  std::mutex sync_mu_;  // serialises SyncDirty/SyncAll; taken before mu_
  mutable std::mutex mu_;
  mutable std::map<uint64_t, std::shared_ptr<File>> files_;  // guarded by mu_
  bool dir_created_ = false;                                 // guarded by mu_
  bool dir_dirty_ = false;  // a file was created since the directory was last fsynced (mu_)
  // Files kept for reuse, oldest first: their names (`free-<n>`) and open descriptors (mu_).
  mutable std::vector<std::pair<std::filesystem::path, std::shared_ptr<File>>> free_;
  mutable bool free_adopted_ = false;  // AdoptRecycledLocked ran (mu_)
  mutable uint64_t free_seq_ = 0;      // next `free-<n>` number (mu_)
};

}  // namespace tvilling::storage
