// fault_env.cc: FaultInjectionFs, the rocksdb::FileSystemWrapper behind FaultEnv. It tracks synced
// sizes per file (shared by every name the file has) and a log of namespace changes not yet made
// durable by a directory fsync; DropUnsyncedData replays that log backwards, then cuts files back.
#include "tests/unit/storage/fault_env.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace tvilling::storage {

namespace {

using rocksdb::DataVerificationInfo;
using rocksdb::FileOptions;
using rocksdb::FSDirectory;
using rocksdb::FSWritableFile;
using rocksdb::IODebugContext;
using rocksdb::IOOptions;
using rocksdb::IOStatus;
using rocksdb::Slice;

// One file's data state (an inode's, not a name's: renames carry it along).
struct FileState {
  uint64_t size_bytes = 0;    // written through us so far
  uint64_t synced_bytes = 0;  // durable
  int open_writers = 0;
};
using StatePtr = std::shared_ptr<FileState>;

// A namespace change that the next fsync of `dir` makes durable.
struct NsOp {
  enum class Kind { kCreate, kDelete, kRename };
  Kind kind = Kind::kCreate;
  std::string dir;
  std::string path;  // the name created or deleted; for a rename the destination
  std::string from;  // rename: the source
  // Delete: the deleted file; rename: the destination it replaced. -1 = none (kept open so the
  // content survives the unlink).
  int old_fd = -1;
  StatePtr old_state;  // its tracking, if it was tracked
};

std::string Normalize(const std::string& name) {
  std::filesystem::path p = std::filesystem::path(name).lexically_normal();
  if (!p.has_filename() && p.has_relative_path()) p = p.parent_path();
  return p.string();
}

std::string DirOf(const std::string& normalized) {
  std::string d = std::filesystem::path(normalized).parent_path().string();
  return d.empty() ? "." : d;
}

bool Exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

IOStatus CrashedError(const char* op, const std::string& name) {
  return IOStatus::IOError(fmt::format("fault env: simulated power cut; {} {}", op, name));
}

// RocksDB names its WAL files <number>.log (the info log is LOG, and is not opened through us).
bool IsWal(const std::string& normalized) {
  return std::filesystem::path(normalized).extension() == ".log";
}

std::string ErrnoText(int err) { return fmt::format("{} (errno {})", std::strerror(err), err); }

// Recreates `path` with the content of the open file `fd`.
absl::Status RestoreFromFd(int fd, const std::string& path) {
  const int out = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out < 0) {
    return absl::InternalError(fmt::format("restore {}: open: {}", path, ErrnoText(errno)));
  }
  std::vector<char> buf(1 << 20);
  off_t pos = 0;
  absl::Status status;
  while (true) {
    const ssize_t n = ::pread(fd, buf.data(), buf.size(), pos);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      status = absl::InternalError(fmt::format("restore {}: read: {}", path, ErrnoText(errno)));
      break;
    }
    if (n == 0) break;
    for (ssize_t done = 0; done < n;) {
      const ssize_t w = ::pwrite(out, buf.data() + done, static_cast<size_t>(n - done), pos + done);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        status = absl::InternalError(fmt::format("restore {}: write: {}", path, ErrnoText(errno)));
        break;
      }
      done += w;
    }
    if (!status.ok()) break;
    pos += n;
  }
  ::close(out);
  return status;
}

}  // namespace

class FaultInjectionFs : public rocksdb::FileSystemWrapper {
 public:
  explicit FaultInjectionFs(const std::shared_ptr<rocksdb::FileSystem>& base)
      : FileSystemWrapper(base) {}
  ~FaultInjectionFs() override {
    for (NsOp& op : ops_) CloseOld(op);
  }

  const char* Name() const override { return "TvillingFaultInjectionFs"; }

  bool crashed() const { return crashed_.load(std::memory_order_acquire); }
  void Crash() { crashed_.store(true, std::memory_order_release); }

  IOStatus NewWritableFile(const std::string& fname, const FileOptions& opts,
                           std::unique_ptr<FSWritableFile>* result, IODebugContext* dbg) override;
  IOStatus ReopenWritableFile(const std::string& fname, const FileOptions& opts,
                              std::unique_ptr<FSWritableFile>* result,
                              IODebugContext* dbg) override;
  IOStatus ReuseWritableFile(const std::string& fname, const std::string& old_fname,
                             const FileOptions&, std::unique_ptr<FSWritableFile>*,
                             IODebugContext*) override {
    return IOStatus::NotSupported(
        fmt::format("fault env: ReuseWritableFile {} <- {} is not modelled", fname, old_fname));
  }
  IOStatus NewRandomRWFile(const std::string& fname, const FileOptions&,
                           std::unique_ptr<rocksdb::FSRandomRWFile>*, IODebugContext*) override {
    return IOStatus::NotSupported(
        fmt::format("fault env: NewRandomRWFile {} is not modelled", fname));
  }
  IOStatus NewDirectory(const std::string& name, const IOOptions& io_opts,
                        std::unique_ptr<FSDirectory>* result, IODebugContext* dbg) override;
  IOStatus DeleteFile(const std::string& fname, const IOOptions& options,
                      IODebugContext* dbg) override;
  IOStatus RenameFile(const std::string& src, const std::string& dst, const IOOptions& options,
                      IODebugContext* dbg) override;
  IOStatus LinkFile(const std::string& src, const std::string& dst, const IOOptions& options,
                    IODebugContext* dbg) override;
  IOStatus Truncate(const std::string& fname, size_t size, const IOOptions& options,
                    IODebugContext* dbg) override;
  IOStatus CreateDir(const std::string& d, const IOOptions& options, IODebugContext* dbg) override {
    if (crashed()) return CrashedError("create directory", d);
    return target_->CreateDir(d, options, dbg);
  }
  IOStatus CreateDirIfMissing(const std::string& d, const IOOptions& options,
                              IODebugContext* dbg) override {
    if (crashed()) return CrashedError("create directory", d);
    return target_->CreateDirIfMissing(d, options, dbg);
  }
  IOStatus DeleteDir(const std::string& d, const IOOptions& options, IODebugContext* dbg) override {
    if (crashed()) return CrashedError("delete directory", d);
    return target_->DeleteDir(d, options, dbg);
  }

  // Called by the file and directory wrappers.
  void Appended(const StatePtr& st, uint64_t bytes) {
    std::lock_guard lock(mu_);
    st->size_bytes += bytes;
  }
  void WroteUpTo(const StatePtr& st, uint64_t end) {
    std::lock_guard lock(mu_);
    st->size_bytes = std::max(st->size_bytes, end);
  }
  void Truncated(const StatePtr& st, uint64_t size) {
    std::lock_guard lock(mu_);
    st->size_bytes = size;
    st->synced_bytes = std::min(st->synced_bytes, size);
  }
  uint64_t SizeOf(const StatePtr& st) {
    std::lock_guard lock(mu_);
    return st->size_bytes;
  }
  void Synced(const StatePtr& st, uint64_t size) {
    std::lock_guard lock(mu_);
    st->synced_bytes = std::max(st->synced_bytes, std::min(size, st->size_bytes));
  }
  void WriterClosed(const StatePtr& st) {
    std::lock_guard lock(mu_);
    --st->open_writers;
  }
  void DirSynced(const std::string& dir);
  // A sync of a WAL file is about to reach the target: counts it and, while syncs are held, blocks
  // until ReleaseWalSyncs().
  void WalSyncCalled() {
    std::unique_lock lock(hold_mu_);
    ++wal_syncs_;
    if (!holding_) return;
    ++waiting_wal_syncs_;
    hold_cv_.wait(lock, [&] { return !holding_; });
    --waiting_wal_syncs_;
  }
  void HoldWalSyncs() {
    std::lock_guard lock(hold_mu_);
    holding_ = true;
  }
  void ReleaseWalSyncs() {
    {
      std::lock_guard lock(hold_mu_);
      holding_ = false;
    }
    hold_cv_.notify_all();
  }
  size_t waiting_wal_syncs() const {
    std::lock_guard lock(hold_mu_);
    return waiting_wal_syncs_;
  }
  uint64_t wal_syncs() const {
    std::lock_guard lock(hold_mu_);
    return wal_syncs_;
  }

  absl::Status DropUnsyncedData();
  absl::Status ForgetUnsyncedState();
  size_t tracked_files() const {
    std::lock_guard lock(mu_);
    return files_.size();
  }
  size_t pending_namespace_ops() const {
    std::lock_guard lock(mu_);
    return ops_.size();
  }
  size_t forgotten_deletes() const {
    std::lock_guard lock(mu_);
    return forgotten_deletes_;
  }

 private:
  static void CloseOld(NsOp& op) {
    if (op.old_fd >= 0) ::close(op.old_fd);
    op.old_fd = -1;
  }
  IOStatus Wrap(const std::string& path, StatePtr st, std::unique_ptr<FSWritableFile>* result);
  absl::Status UndoLocked(NsOp& op);
  absl::Status CheckNoWritersLocked() const;
  void ClearLocked();

  std::atomic<bool> crashed_{false};
  mutable std::mutex mu_;
  std::map<std::string, StatePtr> files_;  // GUARDED_BY(mu_), by normalized name
  std::deque<NsOp> ops_;                   // GUARDED_BY(mu_), oldest first
  size_t preserved_deletes_ = 0;           // GUARDED_BY(mu_)
  size_t forgotten_deletes_ = 0;           // GUARDED_BY(mu_)

  // WAL sync holding: its own mutex, never held with mu_, so a held sync blocks nothing else.
  mutable std::mutex hold_mu_;
  std::condition_variable hold_cv_;
  bool holding_ = false;          // GUARDED_BY(hold_mu_)
  size_t waiting_wal_syncs_ = 0;  // GUARDED_BY(hold_mu_)
  uint64_t wal_syncs_ = 0;        // GUARDED_BY(hold_mu_)
};

namespace {

class TrackedFile : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  TrackedFile(std::unique_ptr<FSWritableFile> target, FaultInjectionFs* fs, StatePtr state,
              std::string name)
      : FSWritableFileOwnerWrapper(std::move(target)),
        fs_(fs),
        state_(std::move(state)),
        name_(std::move(name)),
        wal_(IsWal(name_)) {}
  ~TrackedFile() override {
    if (!closed_) fs_->WriterClosed(state_);
  }

  IOStatus Append(const Slice& data, const IOOptions& options, IODebugContext* dbg) override {
    if (fs_->crashed()) return CrashedError("append", name_);
    IOStatus s = target()->Append(data, options, dbg);
    if (s.ok()) fs_->Appended(state_, data.size());
    return s;
  }
  IOStatus Append(const Slice& data, const IOOptions& options, const DataVerificationInfo& info,
                  IODebugContext* dbg) override {
    if (fs_->crashed()) return CrashedError("append", name_);
    IOStatus s = target()->Append(data, options, info, dbg);
    if (s.ok()) fs_->Appended(state_, data.size());
    return s;
  }
  IOStatus PositionedAppend(const Slice& data, uint64_t offset, const IOOptions& options,
                            IODebugContext* dbg) override {
    if (fs_->crashed()) return CrashedError("append", name_);
    IOStatus s = target()->PositionedAppend(data, offset, options, dbg);
    if (s.ok()) fs_->WroteUpTo(state_, offset + data.size());
    return s;
  }
  IOStatus PositionedAppend(const Slice& data, uint64_t offset, const IOOptions& options,
                            const DataVerificationInfo& info, IODebugContext* dbg) override {
    if (fs_->crashed()) return CrashedError("append", name_);
    IOStatus s = target()->PositionedAppend(data, offset, options, info, dbg);
    if (s.ok()) fs_->WroteUpTo(state_, offset + data.size());
    return s;
  }
  IOStatus Truncate(uint64_t size, const IOOptions& options, IODebugContext* dbg) override {
    if (fs_->crashed()) return CrashedError("truncate", name_);
    IOStatus s = target()->Truncate(size, options, dbg);
    if (s.ok()) fs_->Truncated(state_, size);
    return s;
  }
  IOStatus Flush(const IOOptions& options, IODebugContext* dbg) override {
    if (fs_->crashed()) return CrashedError("flush", name_);
    return target()->Flush(options, dbg);
  }
  IOStatus Sync(const IOOptions& options, IODebugContext* dbg) override {
    if (fs_->crashed()) return CrashedError("sync", name_);
    // Only bytes appended before the sync started are covered by it.
    const uint64_t size = fs_->SizeOf(state_);
    if (wal_) {
      fs_->WalSyncCalled();  // may be held; then a Crash() meanwhile makes it fail
      if (fs_->crashed()) return CrashedError("sync", name_);
    }
    IOStatus s = target()->Sync(options, dbg);
    if (s.ok()) fs_->Synced(state_, size);
    return s;
  }
  IOStatus Fsync(const IOOptions& options, IODebugContext* dbg) override {
    if (fs_->crashed()) return CrashedError("fsync", name_);
    const uint64_t size = fs_->SizeOf(state_);
    if (wal_) {
      fs_->WalSyncCalled();
      if (fs_->crashed()) return CrashedError("fsync", name_);
    }
    IOStatus s = target()->Fsync(options, dbg);
    if (s.ok()) fs_->Synced(state_, size);
    return s;
  }
  IOStatus RangeSync(uint64_t offset, uint64_t nbytes, const IOOptions& options,
                     IODebugContext* dbg) override {
    // Writeback only (sync_file_range): never durable, see the model in fault_env.h.
    if (fs_->crashed()) return CrashedError("range sync", name_);
    return target()->RangeSync(offset, nbytes, options, dbg);
  }
  IOStatus Allocate(uint64_t offset, uint64_t len, const IOOptions& options,
                    IODebugContext* dbg) override {
    if (fs_->crashed()) return CrashedError("allocate", name_);
    return target()->Allocate(offset, len, options, dbg);
  }
  IOStatus Close(const IOOptions& options, IODebugContext* dbg) override {
    // Always forwarded, even after the crash: the descriptor must be released. What the target
    // does on close (trim preallocation) cannot grow the durable state.
    IOStatus s = target()->Close(options, dbg);
    if (!closed_) {
      closed_ = true;
      fs_->WriterClosed(state_);
    }
    return s;
  }

 private:
  FaultInjectionFs* fs_;
  StatePtr state_;
  std::string name_;
  const bool wal_;  // a WAL file: its syncs can be held (FaultEnv::HoldWalSyncs)
  bool closed_ = false;
};

class TrackedDir : public FSDirectory {
 public:
  TrackedDir(std::unique_ptr<FSDirectory> target, FaultInjectionFs* fs, std::string name)
      : target_(std::move(target)), fs_(fs), name_(std::move(name)) {}

  IOStatus Fsync(const IOOptions& options, IODebugContext* dbg) override {
    if (fs_->crashed()) return CrashedError("fsync directory", name_);
    IOStatus s = target_->Fsync(options, dbg);
    if (s.ok()) fs_->DirSynced(name_);
    return s;
  }
  IOStatus FsyncWithDirOptions(const IOOptions& options, IODebugContext* dbg,
                               const rocksdb::DirFsyncOptions& dir_options) override {
    if (fs_->crashed()) return CrashedError("fsync directory", name_);
    IOStatus s = target_->FsyncWithDirOptions(options, dbg, dir_options);
    if (s.ok()) fs_->DirSynced(name_);
    return s;
  }
  IOStatus Close(const IOOptions& options, IODebugContext* dbg) override {
    return target_->Close(options, dbg);
  }
  size_t GetUniqueId(char* id, size_t max_size) const override {
    return target_->GetUniqueId(id, max_size);
  }

 private:
  std::unique_ptr<FSDirectory> target_;
  FaultInjectionFs* fs_;
  std::string name_;
};

}  // namespace

IOStatus FaultInjectionFs::Wrap(const std::string& path, StatePtr st,
                                std::unique_ptr<FSWritableFile>* result) {
  result->reset(new TrackedFile(std::move(*result), this, std::move(st), path));
  return IOStatus::OK();
}

IOStatus FaultInjectionFs::NewWritableFile(const std::string& fname, const FileOptions& opts,
                                           std::unique_ptr<FSWritableFile>* result,
                                           IODebugContext* dbg) {
  if (crashed()) return CrashedError("create", fname);
  const std::string path = Normalize(fname);
  const bool existed = Exists(path);
  IOStatus s = target_->NewWritableFile(fname, opts, result, dbg);
  if (!s.ok()) return s;
  StatePtr st;
  {
    std::lock_guard lock(mu_);
    StatePtr& slot = files_[path];
    if (!slot) slot = std::make_shared<FileState>();
    // Opening truncates; the truncation itself is not durable, but losing the old content too is
    // one of the outcomes a crash may have, and the strictest.
    slot->size_bytes = 0;
    slot->synced_bytes = 0;
    ++slot->open_writers;
    st = slot;
    if (!existed) ops_.push_back(NsOp{NsOp::Kind::kCreate, DirOf(path), path, "", -1, nullptr});
  }
  return Wrap(path, std::move(st), result);
}

IOStatus FaultInjectionFs::ReopenWritableFile(const std::string& fname, const FileOptions& opts,
                                              std::unique_ptr<FSWritableFile>* result,
                                              IODebugContext* dbg) {
  if (crashed()) return CrashedError("reopen", fname);
  const std::string path = Normalize(fname);
  struct stat before {};
  const bool existed = ::stat(path.c_str(), &before) == 0;
  IOStatus s = target_->ReopenWritableFile(fname, opts, result, dbg);
  if (!s.ok()) return s;
  StatePtr st;
  {
    std::lock_guard lock(mu_);
    StatePtr& slot = files_[path];
    if (!slot) {
      // Untracked: what is there now is taken as durable.
      slot = std::make_shared<FileState>();
      slot->size_bytes = existed ? static_cast<uint64_t>(before.st_size) : 0;
      slot->synced_bytes = slot->size_bytes;
    }
    ++slot->open_writers;
    st = slot;
    if (!existed) ops_.push_back(NsOp{NsOp::Kind::kCreate, DirOf(path), path, "", -1, nullptr});
  }
  return Wrap(path, std::move(st), result);
}

IOStatus FaultInjectionFs::NewDirectory(const std::string& name, const IOOptions& io_opts,
                                        std::unique_ptr<FSDirectory>* result, IODebugContext* dbg) {
  std::unique_ptr<FSDirectory> dir;
  IOStatus s = target_->NewDirectory(name, io_opts, &dir, dbg);
  if (!s.ok()) return s;
  result->reset(new TrackedDir(std::move(dir), this, Normalize(name)));
  return s;
}

IOStatus FaultInjectionFs::DeleteFile(const std::string& fname, const IOOptions& options,
                                      IODebugContext* dbg) {
  if (crashed()) return CrashedError("delete", fname);
  const std::string path = Normalize(fname);
  bool preserve = false;
  {
    std::lock_guard lock(mu_);
    preserve = preserved_deletes_ < FaultEnv::kMaxPreservedDeletes;
  }
  // Keep the content reachable so an undone delete can bring it back.
  const int fd = preserve ? ::open(path.c_str(), O_RDONLY | O_CLOEXEC) : -1;
  IOStatus s = target_->DeleteFile(fname, options, dbg);
  if (!s.ok()) {
    if (fd >= 0) ::close(fd);
    return s;
  }
  std::lock_guard lock(mu_);
  StatePtr st;
  if (auto it = files_.find(path); it != files_.end()) {
    st = it->second;
    files_.erase(it);
  }
  if (fd < 0) {
    ++forgotten_deletes_;  // durable at once (over the limit, or nothing to keep)
    return s;
  }
  ++preserved_deletes_;
  ops_.push_back(NsOp{NsOp::Kind::kDelete, DirOf(path), path, "", fd, std::move(st)});
  return s;
}

IOStatus FaultInjectionFs::RenameFile(const std::string& src, const std::string& dst,
                                      const IOOptions& options, IODebugContext* dbg) {
  if (crashed()) return CrashedError("rename", src + " -> " + dst);
  const std::string from = Normalize(src);
  const std::string to = Normalize(dst);
  // The file the rename replaces, kept so that undoing the rename can bring it back.
  const int old_fd = ::open(to.c_str(), O_RDONLY | O_CLOEXEC);
  IOStatus s = target_->RenameFile(src, dst, options, dbg);
  if (!s.ok()) {
    if (old_fd >= 0) ::close(old_fd);
    return s;
  }
  std::lock_guard lock(mu_);
  StatePtr old_state;
  if (auto it = files_.find(to); it != files_.end()) {
    old_state = it->second;
    files_.erase(it);
  }
  if (auto it = files_.find(from); it != files_.end()) {
    files_[to] = it->second;
    files_.erase(from);
  }
  ops_.push_back(NsOp{NsOp::Kind::kRename, DirOf(to), to, from, old_fd, std::move(old_state)});
  return s;
}

IOStatus FaultInjectionFs::LinkFile(const std::string& src, const std::string& dst,
                                    const IOOptions& options, IODebugContext* dbg) {
  if (crashed()) return CrashedError("link", src + " -> " + dst);
  IOStatus s = target_->LinkFile(src, dst, options, dbg);
  if (!s.ok()) return s;
  const std::string from = Normalize(src);
  const std::string to = Normalize(dst);
  std::lock_guard lock(mu_);
  if (auto it = files_.find(from); it != files_.end()) files_[to] = it->second;
  ops_.push_back(NsOp{NsOp::Kind::kCreate, DirOf(to), to, "", -1, nullptr});
  return s;
}

IOStatus FaultInjectionFs::Truncate(const std::string& fname, size_t size, const IOOptions& options,
                                    IODebugContext* dbg) {
  if (crashed()) return CrashedError("truncate", fname);
  IOStatus s = target_->Truncate(fname, size, options, dbg);
  if (!s.ok()) return s;
  std::lock_guard lock(mu_);
  if (auto it = files_.find(Normalize(fname)); it != files_.end()) {
    it->second->size_bytes = size;
    it->second->synced_bytes = std::min<uint64_t>(it->second->synced_bytes, size);
  }
  return s;
}

void FaultInjectionFs::DirSynced(const std::string& dir) {
  std::lock_guard lock(mu_);
  for (auto it = ops_.begin(); it != ops_.end();) {
    if (it->dir != dir) {
      ++it;
      continue;
    }
    if (it->kind == NsOp::Kind::kDelete) --preserved_deletes_;
    CloseOld(*it);
    it = ops_.erase(it);
  }
}

absl::Status FaultInjectionFs::CheckNoWritersLocked() const {
  std::string names;
  size_t count = 0;
  auto add = [&](const std::string& name) { names += (count++ == 0 ? "" : ", ") + name; };
  for (const auto& [path, st] : files_) {
    if (st->open_writers > 0) add(path);
  }
  for (const NsOp& op : ops_) {
    if (op.old_state && op.old_state->open_writers > 0) add(op.path + " (unlinked)");
  }
  if (count == 0) return absl::OkStatus();
  return absl::FailedPreconditionError(fmt::format(
      "fault env: {} file(s) still open for writing (close the DB first): {}", count, names));
}

void FaultInjectionFs::ClearLocked() {
  for (NsOp& op : ops_) CloseOld(op);
  ops_.clear();
  preserved_deletes_ = 0;
  files_.clear();
  forgotten_deletes_ = 0;
  crashed_.store(false, std::memory_order_release);
}

absl::Status FaultInjectionFs::ForgetUnsyncedState() {
  std::lock_guard lock(mu_);
  absl::Status s = CheckNoWritersLocked();
  if (s.ok()) ClearLocked();
  return s;
}

absl::Status FaultInjectionFs::UndoLocked(NsOp& op) {
  switch (op.kind) {
    case NsOp::Kind::kCreate:
      if (::unlink(op.path.c_str()) != 0 && errno != ENOENT) {
        return absl::InternalError(
            fmt::format("undo creation of {}: unlink: {}", op.path, ErrnoText(errno)));
      }
      files_.erase(op.path);
      return absl::OkStatus();
    case NsOp::Kind::kDelete: {
      absl::Status s = RestoreFromFd(op.old_fd, op.path);
      if (!s.ok()) return s;
      if (op.old_state) files_[op.path] = op.old_state;
      return absl::OkStatus();
    }
    case NsOp::Kind::kRename: {
      if (::rename(op.path.c_str(), op.from.c_str()) != 0) {
        return absl::InternalError(fmt::format("undo rename {} -> {}: rename back: {}", op.from,
                                               op.path, ErrnoText(errno)));
      }
      if (auto it = files_.find(op.path); it != files_.end()) {
        files_[op.from] = it->second;
        files_.erase(op.path);
      }
      if (op.old_fd >= 0) {
        absl::Status s = RestoreFromFd(op.old_fd, op.path);
        if (!s.ok()) return s;
        if (op.old_state) files_[op.path] = op.old_state;
      }
      return absl::OkStatus();
    }
  }
  return absl::OkStatus();
}

absl::Status FaultInjectionFs::DropUnsyncedData() {
  std::lock_guard lock(mu_);
  absl::Status status = CheckNoWritersLocked();
  if (!status.ok()) return status;
  // Names first, newest change first, so every file is back under the name it durably had.
  for (auto it = ops_.rbegin(); it != ops_.rend(); ++it) {
    absl::Status s = UndoLocked(*it);
    if (status.ok() && !s.ok()) status = s;
  }
  // Then data: every tracked file back to its synced size.
  for (const auto& [path, st] : files_) {
    if (::truncate(path.c_str(), static_cast<off_t>(st->synced_bytes)) != 0 && errno != ENOENT &&
        status.ok()) {
      status = absl::InternalError(fmt::format("drop unsynced data of {}: truncate to {}: {}", path,
                                               st->synced_bytes, ErrnoText(errno)));
    }
  }
  ClearLocked();
  return status;
}

FaultEnv::FaultEnv(std::shared_ptr<rocksdb::FileSystem> base)
    : fs_(std::make_shared<FaultInjectionFs>(base)), env_(rocksdb::NewCompositeEnv(fs_)) {}

FaultEnv::~FaultEnv() = default;

std::shared_ptr<rocksdb::FileSystem> FaultEnv::file_system() const { return fs_; }
void FaultEnv::Crash() { fs_->Crash(); }
bool FaultEnv::crashed() const { return fs_->crashed(); }
absl::Status FaultEnv::DropUnsyncedData() { return fs_->DropUnsyncedData(); }
absl::Status FaultEnv::ForgetUnsyncedState() { return fs_->ForgetUnsyncedState(); }
size_t FaultEnv::tracked_files() const { return fs_->tracked_files(); }
size_t FaultEnv::pending_namespace_ops() const { return fs_->pending_namespace_ops(); }
size_t FaultEnv::forgotten_deletes() const { return fs_->forgotten_deletes(); }
void FaultEnv::HoldWalSyncs() { fs_->HoldWalSyncs(); }
void FaultEnv::ReleaseWalSyncs() { fs_->ReleaseWalSyncs(); }
size_t FaultEnv::waiting_wal_syncs() const { return fs_->waiting_wal_syncs(); }
uint64_t FaultEnv::wal_syncs() const { return fs_->wal_syncs(); }

}  // namespace tvilling::storage
