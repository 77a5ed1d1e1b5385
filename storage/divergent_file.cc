// divergent_file.cc: writing and reading divergent record files (divergent_file.h).
#include "storage/divergent_file.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <vector>

namespace tvilling::storage {
namespace {

// A record's stored value is at most its header and the largest payload.
constexpr uint64_t kMaxStoredValue = kRecordHeaderSize + kMaxRecordPayload;

void PutU32(std::string* s, uint32_t v) { s->append(reinterpret_cast<const char*>(&v), 4); }
void PutU64(std::string* s, uint64_t v) { s->append(reinterpret_cast<const char*>(&v), 8); }

absl::Status Errno(std::string_view what, const std::filesystem::path& path) {
  return absl::InternalError(fmt::format("{} {}: {}", what, path.string(), std::strerror(errno)));
}

absl::Status FsyncDir(const std::filesystem::path& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Errno("opening directory", dir);
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return Errno("fsyncing directory", dir);
  return absl::OkStatus();
}

}  // namespace

std::string DivergentFileName(const std::string& group, uint64_t fork_lsn, uint64_t unix_ns) {
  const time_t secs = static_cast<time_t>(unix_ns / 1000000000ull);
  tm t{};
  gmtime_r(&secs, &t);
  char buf[32];
  strftime(buf, sizeof buf, "%Y%m%dT%H%M%S", &t);
  return fmt::format("{}-fork{}-{}.{:09d}Z{}", group, fork_lsn, buf, unix_ns % 1000000000ull,
                     kDivergentSuffix);
}

absl::StatusOr<std::unique_ptr<DivergentFileWriter>> DivergentFileWriter::Create(
    const std::filesystem::path& dir, const DivergentFileInfo& info) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::InternalError(
        fmt::format("creating directory {}: {}", dir.string(), ec.message()));
  }
  auto w = std::unique_ptr<DivergentFileWriter>(new DivergentFileWriter());
  w->dir_ = dir;
  w->info_ = info;
  const std::string name = DivergentFileName(info.group, info.fork_lsn, info.saved_unix_ns);
  w->final_ = dir / name;
  w->tmp_ = dir / ("." + name + ".tmp");
  w->fd_ = ::open(w->tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (w->fd_ < 0) return Errno("creating", w->tmp_);
  w->hash_ = XXH3_createState();
  XXH3_64bits_reset(static_cast<XXH3_state_t*>(w->hash_));
  w->next_lsn_ = info.first_lsn;
  std::string h(kDivergentMagic, 8);
  PutU32(&h, kDivergentFormatVersion);
  PutU32(&h, info.group_id);
  PutU64(&h, info.fork_lsn);
  PutU64(&h, info.first_lsn);
  PutU64(&h, info.last_lsn);
  PutU64(&h, info.saved_unix_ns);
  PutU64(&h, info.primary_epoch);
  PutU32(&h, static_cast<uint32_t>(info.group.size()));
  h += info.group;
  PutU32(&h, static_cast<uint32_t>(info.primary_site.size()));
  h += info.primary_site;
  if (absl::Status st = w->Write(h); !st.ok()) return st;
  return w;
}

DivergentFileWriter::~DivergentFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!finished_ && !tmp_.empty()) {
    std::error_code ec;
    std::filesystem::remove(tmp_, ec);
  }
  if (hash_) XXH3_freeState(static_cast<XXH3_state_t*>(hash_));
}

absl::Status DivergentFileWriter::Write(std::string_view bytes) {
  XXH3_64bits_update(static_cast<XXH3_state_t*>(hash_), bytes.data(), bytes.size());
  while (!bytes.empty()) {
    const ssize_t n = ::write(fd_, bytes.data(), bytes.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("writing", tmp_);
    }
    bytes.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

absl::Status DivergentFileWriter::Add(uint64_t lsn, std::string_view stored_value) {
  if (lsn != next_lsn_ || lsn > info_.last_lsn) {
    return absl::InvalidArgumentError(
        fmt::format("{}: record LSN {} out of order (expected LSN {}, last {})", tmp_.string(), lsn,
                    next_lsn_, info_.last_lsn));
  }
  std::string h;
  PutU64(&h, lsn);
  PutU32(&h, static_cast<uint32_t>(stored_value.size()));
  if (absl::Status st = Write(h); !st.ok()) return st;
  if (absl::Status st = Write(stored_value); !st.ok()) return st;
  ++next_lsn_;
  ++count_;
  return absl::OkStatus();
}

absl::StatusOr<std::filesystem::path> DivergentFileWriter::Finish() {
  if (next_lsn_ != info_.last_lsn + 1) {
    return absl::FailedPreconditionError(fmt::format("{}: {} records written, LSN {}..{} announced",
                                                     tmp_.string(), count_, info_.first_lsn,
                                                     info_.last_lsn));
  }
  std::string t(kDivergentEndMagic, 8);
  PutU64(&t, count_);
  if (absl::Status st = Write(t); !st.ok()) return st;
  std::string hash;
  PutU64(&hash, XXH3_64bits_digest(static_cast<XXH3_state_t*>(hash_)));
  if (absl::Status st = Write(hash); !st.ok()) return st;
  if (::fsync(fd_) != 0) return Errno("fsyncing", tmp_);
  ::close(fd_);
  fd_ = -1;
  if (::rename(tmp_.c_str(), final_.c_str()) != 0) return Errno("renaming into place", final_);
  finished_ = true;
  if (absl::Status st = FsyncDir(dir_); !st.ok()) return st;
  return final_;
}

namespace {

class Reader {
 public:
  explicit Reader(const std::filesystem::path& path)
      : path_(path), in_(path, std::ios::binary), state_(XXH3_createState()) {
    XXH3_64bits_reset(state_);
  }
  ~Reader() { XXH3_freeState(state_); }
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;
  bool ok() const { return static_cast<bool>(in_); }
  uint64_t offset() const { return offset_; }
  absl::Status Read(size_t n, std::string* out, bool hash = true) {
    out->resize(n);
    in_.read(out->data(), static_cast<std::streamsize>(n));
    if (static_cast<size_t>(in_.gcount()) != n) {
      return absl::DataLossError(fmt::format(
          "{}: truncated at byte {} (wanted {} more bytes): the file is incomplete or damaged",
          path_.string(), offset_ + static_cast<uint64_t>(in_.gcount()), n));
    }
    if (hash) XXH3_64bits_update(state_, out->data(), n);
    offset_ += n;
    return absl::OkStatus();
  }
  absl::StatusOr<uint64_t> U64() {
    std::string b;
    if (absl::Status st = Read(8, &b); !st.ok()) return st;
    uint64_t v;
    std::memcpy(&v, b.data(), 8);
    return v;
  }
  absl::StatusOr<uint32_t> U32() {
    std::string b;
    if (absl::Status st = Read(4, &b); !st.ok()) return st;
    uint32_t v;
    std::memcpy(&v, b.data(), 4);
    return v;
  }
  uint64_t Digest() { return XXH3_64bits_digest(state_); }
  bool AtEnd() { return in_.peek() == std::char_traits<char>::eof(); }

 private:
  std::filesystem::path path_;
  std::ifstream in_;
  XXH3_state_t* state_;
  uint64_t offset_ = 0;
};

#define TV_ASSIGN(var, expr)          \
  {                                   \
    auto _v = (expr);                 \
    if (!_v.ok()) return _v.status(); \
    var = *_v;                        \
  }

}  // namespace

absl::Status ReadDivergentFile(const std::filesystem::path& path, DivergentFileInfo* info,
                               const std::function<absl::Status(const DivergentRecord&)>& fn) {
  Reader r(path);
  if (!r.ok()) return absl::NotFoundError(fmt::format("cannot open {}", path.string()));
  auto bad = [&](const std::string& what) {
    return absl::DataLossError(fmt::format("{}: {} (at byte {})", path.string(), what, r.offset()));
  };
  std::string magic;
  if (absl::Status st = r.Read(8, &magic); !st.ok()) return st;
  if (std::memcmp(magic.data(), kDivergentMagic, 8) != 0) {
    return bad("not a tvilling divergent record file (bad magic)");
  }
  uint32_t version = 0;
  TV_ASSIGN(version, r.U32());
  if (version != kDivergentFormatVersion) {
    return bad(
        fmt::format("format version {} (this build reads {})", version, kDivergentFormatVersion));
  }
  DivergentFileInfo h;
  TV_ASSIGN(h.group_id, r.U32());
  TV_ASSIGN(h.fork_lsn, r.U64());
  TV_ASSIGN(h.first_lsn, r.U64());
  TV_ASSIGN(h.last_lsn, r.U64());
  TV_ASSIGN(h.saved_unix_ns, r.U64());
  TV_ASSIGN(h.primary_epoch, r.U64());
  uint32_t len = 0;
  TV_ASSIGN(len, r.U32());
  if (len > 4096) return bad(fmt::format("group name of {} bytes", len));
  if (absl::Status st = r.Read(len, &h.group); !st.ok()) return st;
  TV_ASSIGN(len, r.U32());
  if (len > 4096) return bad(fmt::format("site name of {} bytes", len));
  if (absl::Status st = r.Read(len, &h.primary_site); !st.ok()) return st;
  if (h.first_lsn == 0 || h.last_lsn < h.first_lsn || h.first_lsn <= h.fork_lsn) {
    return bad(fmt::format("fork LSN {}, records {}..{}: inconsistent header", h.fork_lsn,
                           h.first_lsn, h.last_lsn));
  }
  if (info) *info = h;
  uint64_t count = 0;
  for (uint64_t expect = h.first_lsn; expect <= h.last_lsn; ++expect) {
    uint64_t lsn = 0;
    uint32_t size = 0;
    TV_ASSIGN(lsn, r.U64());
    if (lsn != expect) return bad(fmt::format("record LSN {} where LSN {} belongs", lsn, expect));
    TV_ASSIGN(size, r.U32());
    if (size < kRecordHeaderSize || size > kMaxStoredValue) {
      return bad(fmt::format("record LSN {} of {} bytes", lsn, size));
    }
    std::string value;
    if (absl::Status st = r.Read(size, &value); !st.ok()) return st;
    DivergentRecord rec;
    rec.lsn = lsn;
    rec.header = PeekRecordHeader(value);
    auto decoded = DecodeRecord(h.group_id, lsn, value);
    if (decoded.ok()) {
      rec.checksum_ok = true;
      rec.payload.assign(decoded->payload);
    } else {
      rec.error = std::string(decoded.status().message());
      rec.payload = value.substr(kRecordHeaderSize);
    }
    ++count;
    if (absl::Status st = fn(rec); !st.ok()) return st;
  }
  std::string end;
  if (absl::Status st = r.Read(8, &end); !st.ok()) return st;
  if (std::memcmp(end.data(), kDivergentEndMagic, 8) != 0)
    return bad("no trailer after the records");
  uint64_t n = 0;
  TV_ASSIGN(n, r.U64());
  if (n != count) return bad(fmt::format("trailer says {} records, the file holds {}", n, count));
  const uint64_t digest = r.Digest();
  std::string stored;
  if (absl::Status st = r.Read(8, &stored, /*hash=*/false); !st.ok()) return st;
  uint64_t want;
  std::memcpy(&want, stored.data(), 8);
  if (want != digest) return bad("whole-file hash mismatch");
  if (!r.AtEnd()) return bad("bytes after the trailer");
  return absl::OkStatus();
}

}  // namespace tvilling::storage
