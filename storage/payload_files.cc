// payload_files.cc: append, fdatasync, pread and removal of a group's payload files.
#include "storage/payload_files.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <limits.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace tvilling::storage {
namespace {

constexpr std::string_view kSuffix = ".pay";
constexpr size_t kIdDigits = 20;
constexpr std::string_view kFreePrefix = "free-";  // recycled files: free-<n>, n decimal

std::string ErrnoText(int e) { return std::strerror(e); }

// The number `s` spells in decimal: false if it is empty or holds anything but digits.
bool ParseDecimal(std::string_view s, uint64_t* out) {
  if (s.empty()) return false;
  uint64_t n = 0;
  for (const char c : s) {
    if (c < '0' || c > '9') return false;
    n = n * 10 + static_cast<uint64_t>(c - '0');
  }
  *out = n;
  return true;
}

absl::Status FsyncPath(const std::filesystem::path& p) {
  const int fd = open(p.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    return absl::InternalError(
        fmt::format("opening directory {}: {}", p.string(), ErrnoText(errno)));
  }
  const int rc = fsync(fd);
  const int e = errno;
  close(fd);
  if (rc != 0) {
    return absl::InternalError(fmt::format("fsyncing directory {}: {}", p.string(), ErrnoText(e)));
  }
  return absl::OkStatus();
}

}  // namespace

struct PayloadFiles::File {
  ~File() {
    if (fd >= 0) close(fd);
  }
  int fd = -1;
  uint64_t size = 0;          // end of the last append (appends are serialised by the committer)
  uint64_t written_back = 0;  // writeback started up to here (touched by Append only)
  bool dirty = false;         // appended to since the last SyncDirty (guarded by PayloadFiles::mu_)
};

PayloadFiles::PayloadFiles(std::filesystem::path dir, std::string group, uint64_t writeback_bytes,
                           size_t recycle_files)
    : dir_(std::move(dir)),
      group_(std::move(group)),
      writeback_bytes_(writeback_bytes),
      recycle_files_(recycle_files) {}

PayloadFiles::~PayloadFiles() = default;

std::filesystem::path PayloadFiles::PathOf(uint64_t file_id) const {
  return dir_ / fmt::format("{:0{}}{}", file_id, kIdDigits, kSuffix);
}

absl::StatusOr<std::vector<uint64_t>> PayloadFiles::List() const {
  std::vector<uint64_t> ids;
  std::error_code ec;
  if (!std::filesystem::exists(dir_, ec)) return ids;
  for (const auto& entry : std::filesystem::directory_iterator(dir_, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.size() != kIdDigits + kSuffix.size() || !name.ends_with(kSuffix)) continue;
    uint64_t id = 0;
    if (ParseDecimal(std::string_view(name).substr(0, kIdDigits), &id)) ids.push_back(id);
  }
  if (ec) {
    return absl::InternalError(fmt::format("group {}: listing payload files in {}: {}", group_,
                                           dir_.string(), ec.message()));
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

absl::StatusOr<std::shared_ptr<PayloadFiles::File>> PayloadFiles::Get(uint64_t file_id,
                                                                      bool create) const {
  std::lock_guard lock(mu_);
  if (auto it = files_.find(file_id); it != files_.end()) return it->second;
  const std::filesystem::path path = PathOf(file_id);
  const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0644);
  if (fd < 0) {
    const int e = errno;
    const std::string msg =
        fmt::format("group {}: payload file {}: {}", group_, path.string(), ErrnoText(e));
    return e == ENOENT ? absl::NotFoundError(msg) : absl::InternalError(msg);
  }
  auto f = std::make_shared<File>();
  f->fd = fd;
  struct stat st;
  if (fstat(fd, &st) != 0) {
    return absl::InternalError(fmt::format("group {}: payload file {}: fstat: {}", group_,
                                           path.string(), ErrnoText(errno)));
  }
  f->size = static_cast<uint64_t>(st.st_size);
  f->written_back = f->size;
  files_.emplace(file_id, f);
  return f;
}

void PayloadFiles::AdoptRecycledLocked() const {
  if (free_adopted_) return;
  free_adopted_ = true;
  std::error_code ec;
  if (!std::filesystem::exists(dir_, ec)) return;
  std::vector<std::pair<uint64_t, std::filesystem::path>> found;
  for (const auto& entry : std::filesystem::directory_iterator(dir_, ec)) {
    const std::string name = entry.path().filename().string();
    uint64_t n = 0;
    if (name.starts_with(kFreePrefix) &&
        ParseDecimal(std::string_view(name).substr(kFreePrefix.size()), &n)) {
      found.emplace_back(n, entry.path());
    }
  }
  std::sort(found.begin(), found.end());
  for (const auto& [n, path] : found) {
    free_seq_ = std::max(free_seq_, n + 1);
    const int fd = free_.size() < recycle_files_ ? open(path.c_str(), O_RDWR | O_CLOEXEC) : -1;
    if (fd < 0) {
      (void)unlink(path.c_str());  // beyond the cap (or unusable): only space
      continue;
    }
    auto f = std::make_shared<File>();
    f->fd = fd;
    free_.emplace_back(path, std::move(f));
  }
}

std::shared_ptr<PayloadFiles::File> PayloadFiles::ReuseLocked(uint64_t file_id) {
  AdoptRecycledLocked();
  while (!free_.empty()) {
    auto [path, f] = std::move(free_.front());
    free_.erase(free_.begin());
    if (rename(path.c_str(), PathOf(file_id).c_str()) != 0) {
      (void)unlink(path.c_str());
      continue;
    }
    // The old bytes stay until overwritten; appends start at 0 (no record refers past them).
    f->size = 0;
    f->written_back = 0;
    f->dirty = false;
    files_.emplace(file_id, f);
    dir_dirty_ = true;  // the new name must be durable before a record refers to it
    files_reused_.fetch_add(1, std::memory_order_relaxed);
    return f;
  }
  return nullptr;
}

size_t PayloadFiles::recycled_files() const {
  std::lock_guard lock(mu_);
  AdoptRecycledLocked();
  return free_.size();
}

absl::StatusOr<uint64_t> PayloadFiles::Append(uint64_t file_id,
                                              std::span<const std::string_view> parts) {
  {
    std::lock_guard lock(mu_);
    if (!dir_created_) {
      std::error_code ec;
      const bool existed = std::filesystem::exists(dir_, ec);
      std::filesystem::create_directories(dir_, ec);
      if (ec) {
        return absl::InternalError(fmt::format("group {}: creating payload directory {}: {}",
                                               group_, dir_.string(), ec.message()));
      }
      if (!existed) {
        // The new directories' names must be durable before any reference to a file in them.
        for (auto p = dir_.parent_path(); !p.empty(); p = p.parent_path()) {
          if (absl::Status st = FsyncPath(p); !st.ok()) return st;
          if (p == dir_.parent_path().parent_path()) break;  // up to the RocksDB directory
        }
      }
      dir_created_ = true;
    }
    if (!files_.count(file_id) && !std::filesystem::exists(PathOf(file_id)) &&
        ReuseLocked(file_id) == nullptr) {
      dir_dirty_ = true;  // created below
    }
  }
  auto f = Get(file_id, /*create=*/true);
  if (!f.ok()) return f.status();
  File& file = **f;
  const uint64_t start = file.size;
  uint64_t pos = start;
  // One pwritev per IOV_MAX parts, resumed after a short write.
  std::vector<iovec> iov;
  iov.reserve(std::min<size_t>(parts.size(), IOV_MAX));
  size_t next = 0;
  while (next < parts.size()) {
    iov.clear();
    uint64_t want = 0;
    for (; next < parts.size() && iov.size() < IOV_MAX; ++next) {
      if (parts[next].empty()) continue;
      iov.push_back({const_cast<char*>(parts[next].data()), parts[next].size()});
      want += parts[next].size();
    }
    size_t first = 0;
    while (want > 0) {
      const ssize_t n = pwritev(file.fd, iov.data() + first, static_cast<int>(iov.size() - first),
                                static_cast<off_t>(pos));
      if (n < 0) {
        if (errno == EINTR) continue;
        const int e = errno;
        const std::string msg = fmt::format("group {}: writing payload file {} at offset {}: {}",
                                            group_, PathOf(file_id).string(), pos, ErrnoText(e));
        return e == ENOSPC ? absl::ResourceExhaustedError(msg) : absl::InternalError(msg);
      }
      pos += static_cast<uint64_t>(n);
      want -= static_cast<uint64_t>(n);
      size_t done = static_cast<size_t>(n);
      while (first < iov.size() && done >= iov[first].iov_len) done -= iov[first++].iov_len;
      if (first < iov.size()) {
        iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + done;
        iov[first].iov_len -= done;
      }
    }
  }
  if (writeback_bytes_ > 0 && pos - file.written_back >= writeback_bytes_) {
    // Advisory: it only starts the writeback (durability is SyncDirty's fdatasync), so a failure
    // changes nothing but the pacing.
    while (::sync_file_range(file.fd, static_cast<off64_t>(file.written_back),
                             static_cast<off64_t>(pos - file.written_back),
                             SYNC_FILE_RANGE_WRITE) != 0 &&
           errno == EINTR) {
    }
    file.written_back = pos;
    writebacks_started_.fetch_add(1, std::memory_order_relaxed);
  }
  std::lock_guard lock(mu_);
  file.size = pos;
  file.dirty = true;
  return start;
}

absl::Status PayloadFiles::SyncDir() {
  bool dir_dirty = false;
  {
    std::lock_guard lock(mu_);
    dir_dirty = std::exchange(dir_dirty_, false);
  }
  if (!dir_dirty) return absl::OkStatus();
  absl::Status st = FsyncPath(dir_);
  if (!st.ok()) {
    std::lock_guard lock(mu_);
    dir_dirty_ = true;
  }
  return st;
}

absl::Status PayloadFiles::SyncDirty() {
  std::lock_guard sync_lock(sync_mu_);
  std::vector<std::pair<uint64_t, std::shared_ptr<File>>> dirty;
  {
    std::lock_guard lock(mu_);
    for (auto& [id, f] : files_) {
      if (f->dirty) {
        dirty.emplace_back(id, f);
        f->dirty = false;
      }
    }
  }
  absl::Status first;
  for (auto& [id, f] : dirty) {
    if (fdatasync(f->fd) != 0 && first.ok()) {
      first = absl::InternalError(fmt::format("group {}: fdatasync of payload file {}: {}", group_,
                                              PathOf(id).string(), ErrnoText(errno)));
    }
  }
  if (!first.ok()) {
    std::lock_guard lock(mu_);
    for (auto& [id, f] : dirty) f->dirty = true;
    return first;
  }
  return SyncDir();
}

absl::Status PayloadFiles::SyncAll() {
  auto ids = List();
  if (!ids.ok()) return ids.status();
  {
    std::lock_guard sync_lock(sync_mu_);
    for (uint64_t id : *ids) {
      auto f = Get(id, /*create=*/false);
      if (!f.ok()) return f.status();
      if (fdatasync((*f)->fd) != 0) {
        return absl::InternalError(fmt::format("group {}: fdatasync of payload file {}: {}", group_,
                                               PathOf(id).string(), ErrnoText(errno)));
      }
    }
  }
  if (ids->empty()) return absl::OkStatus();
  return FsyncPath(dir_);
}

absl::Status PayloadFiles::Read(uint64_t file_id, uint64_t offset, char* out, size_t n) const {
  auto f = Get(file_id, /*create=*/false);
  if (!f.ok()) {
    if (absl::IsNotFound(f.status())) {
      return absl::NotFoundError(
          fmt::format("payload file {} is missing (wanted {} bytes at offset {})",
                      PathOf(file_id).string(), n, offset));
    }
    return f.status();
  }
  size_t got = 0;
  while (got < n) {
    const ssize_t r = pread((*f)->fd, out + got, n - got, static_cast<off_t>(offset + got));
    if (r < 0) {
      if (errno == EINTR) continue;
      return absl::DataLossError(fmt::format("reading payload file {} at offset {}: {}",
                                             PathOf(file_id).string(), offset + got,
                                             ErrnoText(errno)));
    }
    if (r == 0) {
      return absl::DataLossError(
          fmt::format("payload file {} ends before offset {} + {} bytes (short read of {} bytes)",
                      PathOf(file_id).string(), offset, n, got));
    }
    got += static_cast<size_t>(r);
  }
  return absl::OkStatus();
}

absl::Status PayloadFiles::RemoveIf(const std::function<bool(uint64_t file_id)>& pred) {
  auto ids = List();
  if (!ids.ok()) return ids.status();
  absl::Status first;
  for (uint64_t id : *ids) {
    if (!pred(id)) continue;
    const std::filesystem::path path = PathOf(id);
    {
      std::lock_guard lock(mu_);
      AdoptRecycledLocked();
      // A reader holding the file (a pread in flight) keeps its descriptor, so the file must not
      // be overwritten under it: it is unlinked instead. Get opens by name under mu_, so nobody
      // can take the file between this check and the rename.
      std::shared_ptr<File> f;
      bool held = false;
      if (auto it = files_.find(id); it != files_.end()) {
        held = it->second.use_count() > 1;
        f = std::move(it->second);
        files_.erase(it);
      }
      if (!held && free_.size() < recycle_files_) {
        if (f == nullptr) {
          const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
          if (fd >= 0) {
            f = std::make_shared<File>();
            f->fd = fd;
          }
        }
        const std::filesystem::path to = dir_ / fmt::format("{}{}", kFreePrefix, free_seq_);
        if (f != nullptr && rename(path.c_str(), to.c_str()) == 0) {
          ++free_seq_;
          free_.emplace_back(to, std::move(f));
          continue;
        }
      }
    }
    if (unlink(path.c_str()) != 0 && errno != ENOENT && first.ok()) {
      first = absl::InternalError(fmt::format("group {}: removing payload file {}: {}", group_,
                                              PathOf(id).string(), ErrnoText(errno)));
    }
  }
  return first;
}

uint64_t PayloadFiles::SizeOf(uint64_t file_id) const {
  auto f = Get(file_id, /*create=*/false);
  return f.ok() ? (*f)->size : 0;
}

}  // namespace tvilling::storage
