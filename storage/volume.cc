// volume.cc: Volume on a raw file or a block device. Positional I/O with loops for short I/O and
// EINTR, hole punching / zeroing with fallbacks, and an O_DIRECT bounce path for unaligned
// requests.
//
// errno becomes an absl::Status here, and only here (see ErrnoStatus for the mapping):
//   ENOSPC, EDQUOT, EFBIG -> ResourceExhausted (the NBD layer answers ENOSPC)
//   EIO                   -> DataLoss: the medium failed; the range, or for fdatasync writes
//   completed
//                            earlier, may be lost. Retrying cannot help; the agent must fail the
//                            volume.
//   EBADF on a write      -> FailedPrecondition (volume opened read-only)
//   ENOENT -> NotFound, EACCES/EPERM/EROFS -> PermissionDenied, EINVAL -> InvalidArgument,
//   EBUSY -> FailedPrecondition, ENXIO/ENODEV/EAGAIN -> Unavailable, anything else -> Internal.
#include "storage/volume.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <system_error>
#include <utility>

namespace tvilling::storage {
namespace {

// O_DIRECT alignment of buffers, offsets and lengths. 4096 covers every logical block size in use
// (512 and 4096) and the page size.
constexpr uint64_t kAlignBytes = 4096;
// Bounce buffers and zero-writing chunks are at most this big, so no request allocates more.
constexpr uint64_t kChunkBytes = 1 << 20;
// Linux transfers at most 0x7ffff000 bytes per call; stay below with an aligned figure.
constexpr uint64_t kMaxIoBytes = 1ull << 30;

// Zeroes for WriteZeroesByWriting. Static storage (.bss): the pages cost nothing until read, are
// shared by every volume, and are aligned so O_DIRECT writes straight from them. Never written.
alignas(kAlignBytes) char g_zeroes[kChunkBytes];

uint64_t AlignDown(uint64_t v, uint64_t a) { return v - v % a; }
uint64_t AlignUp(uint64_t v, uint64_t a) { return AlignDown(v + a - 1, a); }

bool IsAligned(const void* p, uint64_t offset, uint64_t length) {
  return (reinterpret_cast<uintptr_t>(p) | offset | length) % kAlignBytes == 0;
}

// `what` names the operation, the volume and the range; the errno text is appended.
absl::Status ErrnoStatus(int err, const std::string& what) {
  std::string msg =
      fmt::format("{}: {} (errno {})", what, std::generic_category().message(err), err);
  switch (err) {
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return absl::ResourceExhaustedError(msg);
    case EIO:
      return absl::DataLossError(msg);
    case ENOENT:
    case ENOTDIR:
      return absl::NotFoundError(msg);
    case EACCES:
    case EPERM:
    case EROFS:
      return absl::PermissionDeniedError(msg);
    case EINVAL:
      return absl::InvalidArgumentError(msg);
    case EBADF:
    case EBUSY:
      return absl::FailedPreconditionError(msg);
    case ENXIO:
    case ENODEV:
    case EAGAIN:
      return absl::UnavailableError(msg);
    default:
      return absl::InternalError(msg);
  }
}

std::string RangeText(const char* op, const std::string& path, uint64_t offset, uint64_t length) {
  return fmt::format("{} volume {} at offset {} length {}", op, path, offset, length);
}

// Reads exactly `length` bytes. End of file inside the volume means the file shrank under us.
absl::Status PreadFull(int fd, const std::string& path, char* buf, uint64_t length,
                       uint64_t offset) {
  uint64_t done = 0;
  while (done < length) {
    const uint64_t want = std::min(length - done, kMaxIoBytes);
    const ssize_t n = ::pread(fd, buf + done, want, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, RangeText("read", path, offset + done, length - done));
    }
    if (n == 0) {
      return absl::DataLossError(
          fmt::format("read volume {} at offset {} length {}: unexpected end of file (was the file "
                      "truncated by someone else?)",
                      path, offset + done, length - done));
    }
    done += static_cast<uint64_t>(n);
  }
  return absl::OkStatus();
}

absl::Status PwriteFull(int fd, const std::string& path, const char* buf, uint64_t length,
                        uint64_t offset) {
  uint64_t done = 0;
  while (done < length) {
    const uint64_t want = std::min(length - done, kMaxIoBytes);
    const ssize_t n = ::pwrite(fd, buf + done, want, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      if (err == EBADF) {
        return absl::FailedPreconditionError(
            RangeText("write", path, offset + done, length - done) + ": volume is read-only");
      }
      return ErrnoStatus(err, RangeText("write", path, offset + done, length - done));
    }
    // pwrite returns 0 only for a 0-byte request; guard the loop anyway.
    if (n == 0) return ErrnoStatus(ENOSPC, RangeText("write", path, offset + done, length - done));
    done += static_cast<uint64_t>(n);
  }
  return absl::OkStatus();
}

struct FreeDeleter {
  void operator()(char* p) const { std::free(p); }
};
using AlignedBuffer = std::unique_ptr<char, FreeDeleter>;

absl::StatusOr<AlignedBuffer> AllocateAligned(uint64_t bytes, const std::string& path) {
  void* p = nullptr;
  const int rc = ::posix_memalign(&p, kAlignBytes, bytes);
  if (rc != 0) {
    return absl::InternalError(
        fmt::format("volume {}: cannot allocate a {}-byte O_DIRECT bounce buffer", path, bytes));
  }
  return AlignedBuffer(static_cast<char*>(p));
}

// Bounce buffer size for an unaligned request: the aligned span, at most kChunkBytes.
uint64_t BounceBytes(uint64_t offset, uint64_t length) {
  return std::min(kChunkBytes,
                  AlignUp(offset + length, kAlignBytes) - AlignDown(offset, kAlignBytes));
}

absl::Status ReadAt(int fd, const std::string& path, bool direct_io, uint64_t offset, char* out,
                    uint64_t length) {
  if (!direct_io || IsAligned(out, offset, length)) {
    return PreadFull(fd, path, out, length, offset);
  }
  auto buf = AllocateAligned(BounceBytes(offset, length), path);
  if (!buf.ok()) return buf.status();
  const uint64_t end = offset + length;
  for (uint64_t pos = offset; pos < end;) {
    const uint64_t a_start = AlignDown(pos, kAlignBytes);
    const uint64_t chunk_end = std::min(end, a_start + kChunkBytes);
    const uint64_t a_end = AlignUp(chunk_end, kAlignBytes);
    absl::Status s = PreadFull(fd, path, buf->get(), a_end - a_start, a_start);
    if (!s.ok()) return s;
    std::memcpy(out + (pos - offset), buf->get() + (pos - a_start), chunk_end - pos);
    pos = chunk_end;
  }
  return absl::OkStatus();
}

// With O_DIRECT and an unaligned request, partial blocks at either end are read, patched and
// written back whole. Not atomic against a concurrent overlapping Write (the applier is the only
// writer); concurrent Reads are fine.
absl::Status WriteAt(int fd, const std::string& path, bool direct_io, uint64_t offset,
                     const char* data, uint64_t length) {
  if (!direct_io || IsAligned(data, offset, length)) {
    return PwriteFull(fd, path, data, length, offset);
  }
  auto buf = AllocateAligned(BounceBytes(offset, length), path);
  if (!buf.ok()) return buf.status();
  const uint64_t end = offset + length;
  for (uint64_t pos = offset; pos < end;) {
    const uint64_t a_start = AlignDown(pos, kAlignBytes);
    const uint64_t chunk_end = std::min(end, a_start + kChunkBytes);
    const uint64_t a_end = AlignUp(chunk_end, kAlignBytes);
    const bool partial_head = pos != a_start;
    const bool partial_tail = chunk_end != a_end;
    if (partial_head) {
      absl::Status s = PreadFull(fd, path, buf->get(), kAlignBytes, a_start);
      if (!s.ok()) return s;
    }
    const uint64_t tail_block = a_end - kAlignBytes;
    if (partial_tail && !(partial_head && tail_block == a_start)) {
      absl::Status s =
          PreadFull(fd, path, buf->get() + (tail_block - a_start), kAlignBytes, tail_block);
      if (!s.ok()) return s;
    }
    std::memcpy(buf->get() + (pos - a_start), data + (pos - offset), chunk_end - pos);
    absl::Status s = PwriteFull(fd, path, buf->get(), a_end - a_start, a_start);
    if (!s.ok()) return s;
    pos = chunk_end;
  }
  return absl::OkStatus();
}

// Returns 0 or errno.
int Fallocate(int fd, int mode, uint64_t offset, uint64_t length) {
  while (::fallocate(fd, mode, static_cast<off_t>(offset), static_cast<off_t>(length)) != 0) {
    if (errno != EINTR) return errno;
  }
  return 0;
}

// Returns 0 or errno. `request` is BLKDISCARD or BLKZEROOUT; the range must be sector-aligned.
int BlockRangeIoctl(int fd, unsigned long request, uint64_t offset, uint64_t length) {
  uint64_t range[2] = {offset, length};
  while (::ioctl(fd, request, range) != 0) {
    if (errno != EINTR) return errno;
  }
  return 0;
}

bool Unsupported(int err) { return err == EOPNOTSUPP || err == ENOSYS || err == ENOTTY; }

// Writes must be refused even when they would be no-ops. (The flag is kept from the open: a
// fcntl(F_GETFL) here was one more system call on every applied record.)
absl::Status RejectIfReadOnly(bool read_only, const char* op, const std::string& path) {
  if (read_only) {
    return absl::FailedPreconditionError(
        fmt::format("{} volume {}: volume is opened read-only", op, path));
  }
  return absl::OkStatus();
}

// Makes a created or extended file's size and directory entry durable: a volume that vanishes or
// shrinks after a power cut would silently lose every block written to it.
absl::Status SyncNewSize(int fd, const std::filesystem::path& path, bool created) {
  if (::fsync(fd) != 0) return ErrnoStatus(errno, fmt::format("fsync volume {}", path.string()));
  if (!created) return absl::OkStatus();
  std::filesystem::path dir = path.parent_path();
  if (dir.empty()) dir = ".";
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return ErrnoStatus(errno, fmt::format("open directory {}", dir.string()));
  const int rc = ::fsync(dfd);
  const int err = errno;
  ::close(dfd);
  if (rc != 0) return ErrnoStatus(err, fmt::format("fsync directory {}", dir.string()));
  return absl::OkStatus();
}

// Size of a regular-file volume, creating or extending the file as the options allow.
absl::StatusOr<uint64_t> SizeFile(int fd, const struct stat& st, const VolumeOptions& options,
                                  bool created) {
  const std::string path = options.path.string();
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  if (options.size_bytes == 0) {
    if (file_bytes == 0) {
      return absl::InvalidArgumentError(
          fmt::format("volume {} is an empty file; give its size (size_bytes)", path));
    }
    return file_bytes;
  }
  if (file_bytes == options.size_bytes) {
    if (created) {
      absl::Status s = SyncNewSize(fd, options.path, created);
      if (!s.ok()) return s;
    }
    return file_bytes;
  }
  if (file_bytes > options.size_bytes) {
    return absl::InvalidArgumentError(fmt::format(
        "volume {} is a file of {} bytes, larger than the configured size of {} bytes (shrinking "
        "would drop data; fix the size or the file)",
        path, file_bytes, options.size_bytes));
  }
  if (!options.create || options.read_only) {
    return absl::InvalidArgumentError(fmt::format(
        "volume {} is a file of {} bytes, smaller than the configured size of {} bytes (open with "
        "create and without read_only to extend it)",
        path, file_bytes, options.size_bytes));
  }
  // Sparse: ftruncate allocates nothing.
  if (::ftruncate(fd, static_cast<off_t>(options.size_bytes)) != 0) {
    return ErrnoStatus(errno, fmt::format("extend volume {} from {} to {} bytes", path, file_bytes,
                                          options.size_bytes));
  }
  absl::Status s = SyncNewSize(fd, options.path, created);
  if (!s.ok()) return s;
  return options.size_bytes;
}

absl::StatusOr<uint64_t> SizeDevice(int fd, const VolumeOptions& options) {
  const std::string path = options.path.string();
  uint64_t device_bytes = 0;
  if (::ioctl(fd, BLKGETSIZE64, &device_bytes) != 0) {
    return ErrnoStatus(errno, fmt::format("BLKGETSIZE64 on volume {}", path));
  }
  if (options.size_bytes == 0) return device_bytes;
  if (options.size_bytes > device_bytes) {
    return absl::InvalidArgumentError(
        fmt::format("volume {} is a block device of {} bytes, smaller than the configured size of "
                    "{} bytes",
                    path, device_bytes, options.size_bytes));
  }
  return options.size_bytes;
}

// Devices: the kernel wants sector-aligned ranges for fallocate and the BLK* ioctls, so partial
// sectors at either end are written as zeroes and only the aligned middle goes to `middle`.
// `middle` returns 0 or errno; its errors are reported with `op`. `zero` writes zeroes.
template <typename Middle, typename Zero>
absl::Status DeviceRange(int fd, const std::string& path, const char* op, uint64_t offset,
                         uint64_t length, Middle middle, Zero zero) {
  int sector_bytes = 512;
  if (::ioctl(fd, BLKSSZGET, &sector_bytes) != 0 || sector_bytes <= 0) sector_bytes = 512;
  const uint64_t sector = static_cast<uint64_t>(sector_bytes);
  const uint64_t end = offset + length;
  const uint64_t mid_start = std::min(end, AlignUp(offset, sector));
  const uint64_t mid_end = std::max(mid_start, AlignDown(end, sector));
  if (offset < mid_start) {
    absl::Status s = zero(offset, mid_start - offset);
    if (!s.ok()) return s;
  }
  if (mid_end < end) {
    absl::Status s = zero(mid_end, end - mid_end);
    if (!s.ok()) return s;
  }
  if (mid_start == mid_end) return absl::OkStatus();
  const int err = middle(mid_start, mid_end - mid_start);
  if (err != 0) return ErrnoStatus(err, RangeText(op, path, mid_start, mid_end - mid_start));
  return absl::OkStatus();
}

// Closes the descriptor unless released (error paths of Open).
class FdGuard {
 public:
  explicit FdGuard(int fd) : fd_(fd) {}
  ~FdGuard() {
    if (fd_ >= 0) ::close(fd_);
  }
  FdGuard(const FdGuard&) = delete;
  FdGuard& operator=(const FdGuard&) = delete;
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

}  // namespace

Volume::Volume(std::filesystem::path path, int fd, uint64_t size, bool block_device, bool direct_io,
               bool read_only)
    : path_(std::move(path)),
      fd_(fd),
      size_(size),
      block_device_(block_device),
      direct_io_(direct_io),
      read_only_(read_only) {}

Volume::~Volume() {
  // No retry on EINTR: Linux releases the descriptor even then.
  if (fd_ >= 0) ::close(fd_);
}

absl::StatusOr<std::unique_ptr<Volume>> Volume::Open(const VolumeOptions& options) {
  const std::string path = options.path.string();
  if (path.empty()) return absl::InvalidArgumentError("volume path is empty");
  struct stat pre {};
  const bool existed = ::stat(path.c_str(), &pre) == 0;
  if (!existed && errno != ENOENT) {
    return ErrnoStatus(errno, fmt::format("stat volume {}", path));
  }
  const bool is_device = existed && S_ISBLK(pre.st_mode);
  int flags = O_CLOEXEC | (options.read_only ? O_RDONLY : O_RDWR);
  if (options.direct_io) flags |= O_DIRECT;
  // A block device is claimed exclusively: open fails with EBUSY while it is mounted or claimed by
  // another program (or another Volume), so we never write under a file system.
  if (is_device) flags |= O_EXCL;
  // Creating needs a size; read-only never creates.
  const bool may_create =
      !existed && options.create && !options.read_only && options.size_bytes > 0;
  if (may_create) flags |= O_CREAT;
  const int fd = ::open(path.c_str(), flags, 0600);
  if (fd < 0) {
    const int err = errno;
    if (err == EINVAL && options.direct_io) {
      return absl::InvalidArgumentError(
          fmt::format("open volume {}: the file system does not support O_DIRECT", path));
    }
    if (err == EBUSY && is_device) {
      return absl::FailedPreconditionError(fmt::format(
          "open volume {}: the device is in use (mounted, or opened exclusively elsewhere)", path));
    }
    if (err == ENOENT) {
      return absl::NotFoundError(fmt::format(
          "open volume {}: no such file (it is created only with create, a size and without "
          "read_only)",
          path));
    }
    return ErrnoStatus(err, fmt::format("open volume {}", path));
  }
  FdGuard guard(fd);
  struct stat st {};
  if (::fstat(fd, &st) != 0) return ErrnoStatus(errno, fmt::format("fstat volume {}", path));
  absl::StatusOr<uint64_t> size;
  bool block_device = false;
  if (S_ISBLK(st.st_mode)) {
    block_device = true;
    size = SizeDevice(fd, options);
  } else if (S_ISREG(st.st_mode)) {
    size = SizeFile(fd, st, options, may_create);
  } else {
    return absl::InvalidArgumentError(
        fmt::format("volume {} is neither a regular file nor a block device", path));
  }
  if (!size.ok()) return size.status();
  if (options.direct_io && *size % kAlignBytes != 0) {
    // A partial last block could only be written by writing past the end of the volume.
    return absl::InvalidArgumentError(fmt::format(
        "volume {}: size {} bytes is not a multiple of {} bytes, required with direct_io", path,
        *size, kAlignBytes));
  }
  return std::unique_ptr<Volume>(new Volume(options.path, guard.release(), *size, block_device,
                                            options.direct_io, options.read_only));
}

bool Volume::IsAllZero(std::string_view data) {
  // All bytes equal the first, and the first is zero: memcmp of the buffer against itself shifted
  // by one byte. glibc's vectorised memcmp makes this ~75 GB/s on a cached 1 MiB chunk (an OR of
  // 64-byte blocks measured ~30 GB/s), it stops at the first non-zero byte, and needs no zero
  // buffer.
  if (data.empty()) return true;
  return data[0] == 0 && std::memcmp(data.data(), data.data() + 1, data.size() - 1) == 0;
}

absl::Status Volume::CheckRange(const char* op, uint64_t offset, uint64_t length) const {
  if (offset > size_ || length > size_ - offset) {
    return absl::InvalidArgumentError(
        fmt::format("{} volume {}: offset {} length {} is outside the volume (size {} bytes)", op,
                    path_.native(), offset, length, size_));
  }
  return absl::OkStatus();
}

absl::Status Volume::Read(uint64_t offset, std::span<char> out) const {
  absl::Status s = CheckRange("read", offset, out.size());
  if (!s.ok() || out.empty()) return s;
  return ReadAt(fd_, path_.native(), direct_io_, offset, out.data(), out.size());
}

uint64_t Volume::HoleBytesAt(uint64_t offset, uint64_t max) const {
  if (block_device_ || offset >= size_) return 0;
  max = std::min(max, size_ - offset);
  const off64_t data = ::lseek64(fd_, static_cast<off64_t>(offset), SEEK_DATA);
  if (data < 0) return errno == ENXIO ? max : 0;  // ENXIO: no data from offset to the end
  return std::min<uint64_t>(static_cast<uint64_t>(data) - offset, max);
}

absl::Status Volume::Write(uint64_t offset, std::string_view data) {
  const std::string& path = path_.native();  // no copy: POSIX paths are strings
  absl::Status s = RejectIfReadOnly(read_only_, "write", path);
  if (s.ok()) s = CheckRange("write", offset, data.size());
  if (!s.ok() || data.empty()) return s;
  return WriteAt(fd_, path, direct_io_, offset, data.data(), data.size());
}

absl::Status Volume::WriteZeroesByWriting(uint64_t offset, uint64_t length) {
  const std::string& path = path_.native();  // no copy: POSIX paths are strings
  const uint64_t end = offset + length;
  for (uint64_t pos = offset; pos < end;) {
    // Chunks end on kChunkBytes boundaries, so with O_DIRECT only the first and last are unaligned.
    const uint64_t chunk_end = std::min(end, AlignDown(pos, kChunkBytes) + kChunkBytes);
    absl::Status s = WriteAt(fd_, path, direct_io_, pos, g_zeroes, chunk_end - pos);
    if (!s.ok()) return s;
    pos = chunk_end;
  }
  return absl::OkStatus();
}

absl::Status Volume::Trim(uint64_t offset, uint64_t length) {
  const std::string& path = path_.native();  // no copy: POSIX paths are strings
  absl::Status s = RejectIfReadOnly(read_only_, "trim", path);
  if (s.ok()) s = CheckRange("trim", offset, length);
  if (!s.ok() || length == 0) return s;
  if (!block_device_) {
    const int err = Fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    if (err == 0) return absl::OkStatus();
    // Reads after a trim must return zeroes, also where holes cannot be punched.
    if (Unsupported(err)) return WriteZeroesByWriting(offset, length);
    return ErrnoStatus(err, RangeText("trim (punch hole)", path, offset, length));
  }
  // Punching a hole in a block device (Linux >= 4.9) unmaps and guarantees zeroes, so a trimmed
  // range reads the same on every replica. Without it BLKDISCARD deallocates with unspecified
  // contents (NBD allows that), and without discard the trim is dropped: it is advisory.
  const int fd = fd_;
  return DeviceRange(
      fd, path, "trim", offset, length,
      [fd](uint64_t off, uint64_t len) {
        int err = Fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
        if (Unsupported(err)) err = BlockRangeIoctl(fd, BLKDISCARD, off, len);
        return Unsupported(err) ? 0 : err;
      },
      [this](uint64_t off, uint64_t len) { return WriteZeroesByWriting(off, len); });
}

absl::Status Volume::WriteZeroes(uint64_t offset, uint64_t length, bool may_trim) {
  const std::string& path = path_.native();  // no copy: POSIX paths are strings
  absl::Status s = RejectIfReadOnly(read_only_, "write zeroes", path);
  if (s.ok()) s = CheckRange("write zeroes", offset, length);
  if (!s.ok() || length == 0) return s;
  if (!block_device_) {
    int err = EOPNOTSUPP;
    if (may_trim) err = Fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    // ZERO_RANGE keeps the blocks allocated: what a client asking for NO_HOLE expects.
    if (Unsupported(err)) {
      err = Fallocate(fd_, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
    }
    if (err == 0) return absl::OkStatus();
    if (Unsupported(err)) return WriteZeroesByWriting(offset, length);
    return ErrnoStatus(err, RangeText("write zeroes (fallocate)", path, offset, length));
  }
  bool fell_back = false;
  const int fd = fd_;
  s = DeviceRange(
      fd, path, "write zeroes", offset, length,
      [fd, may_trim, &fell_back](uint64_t off, uint64_t len) {
        int err = EOPNOTSUPP;
        if (may_trim) err = Fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
        if (Unsupported(err)) err = BlockRangeIoctl(fd, BLKZEROOUT, off, len);
        if (Unsupported(err)) {
          fell_back = true;
          return 0;
        }
        return err;
      },
      [this](uint64_t off, uint64_t len) { return WriteZeroesByWriting(off, len); });
  if (!s.ok() || !fell_back) return s;
  return WriteZeroesByWriting(offset, length);
}

absl::Status Volume::Flush() {
  // fdatasync on a block device also flushes the device's volatile write cache.
  while (::fdatasync(fd_) != 0) {
    if (errno == EINTR) continue;
    return ErrnoStatus(errno, fmt::format("flush (fdatasync) volume {}", path_.native()));
  }
  return absl::OkStatus();
}

absl::Status Volume::WriteBack(uint64_t offset, uint64_t length) {
  if (direct_io_ || offset >= size_ || length == 0) return absl::OkStatus();
  length = std::min(length, size_ - offset);
  constexpr unsigned kFlags =
      SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER;
  while (::sync_file_range(fd_, static_cast<off64_t>(offset), static_cast<off64_t>(length),
                           kFlags) != 0) {
    const int err = errno;
    if (err == EINTR) continue;
    // Nothing to pace on this file (e.g. ESPIPE, EINVAL on file systems without the call): the
    // checkpoint's Flush() writes everything.
    if (err == ESPIPE || err == EINVAL || Unsupported(err)) return absl::OkStatus();
    return ErrnoStatus(err,
                       RangeText("write back (sync_file_range)", path_.native(), offset, length));
  }
  return absl::OkStatus();
}

void Volume::DropCleanCache() {
  // Advisory: a failure only means the pages stay cached.
  (void)::posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED);
}

}  // namespace tvilling::storage
