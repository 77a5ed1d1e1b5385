// tvilling-check: a Jepsen-style checker of what a tvilling group keeps across fail-overs.
//
//   tvilling-check write --uri URI [--uri URI2 ...] --size BYTES --qd N --duration S --log FILE
//                        [--writer ID] [--seed N]
//   tvilling-check verify --log FILE [--log FILE2 ...] --image (URI|PATH) [--mode sync|async]
//                         [--loss-bound N]
//   tvilling-check encode --writer ID --seq N --block B   (the block's 4 KiB on stdout: tests
//                         forge images with it, e.g. an old version of a block)
//
// `write` writes self-describing 4 KiB blocks (check.h) at queue depth N to the first `--size`
// bytes of the export, overwriting blocks often (half the writes go to a small hot set), never
// with two writes to one block in flight. Every issue and completion is logged to FILE with a
// CLOCK_MONOTONIC timestamp, one write(2) a line, so a kill -9 of the tool keeps what it logged.
// It keeps going across errors: on a failed write or a dead connection it waits for its writes in
// flight, reconnects, and tries the next URI (the primary may have moved; ESHUTDOWN is expected
// during a fail-over). It prints its counts as JSON on stdout.
//
// `verify` reads every block of the image (an NBD URI, read-only, or a file) and checks it against
// the logs (check.h, Verify): no torn or foreign block; in sync mode no completed write is missing
// (each block holds its last completed write or a later one); the image is a prefix of the log in
// real-time order; in async mode the missing completed writes are counted and, with
// --loss-bound, must not exceed it. Exit 0 ok, 1 violation, 2 usage or I/O error.
#include <fcntl.h>
#include <libnbd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "tests/checker/check.h"

namespace {

using namespace tvilling::check;

[[noreturn]] void Usage(const std::string& msg) {
  std::fprintf(stderr,
               "tvilling-check: %s\n"
               "usage: tvilling-check write --uri URI [--uri URI ...] --size BYTES --qd N "
               "--duration S --log FILE [--writer ID] [--seed N]\n"
               "       tvilling-check verify --log FILE [--log FILE ...] --image URI|PATH "
               "[--mode sync|async] [--loss-bound N]\n",
               msg.c_str());
  std::exit(2);
}

[[noreturn]] void IoError(const std::string& msg) {
  std::fprintf(stderr, "tvilling-check: %s\n", msg.c_str());
  std::exit(2);
}

int64_t NowNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

uint64_t ParseU64(std::string_view flag, const char* v) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long n = std::strtoull(v, &end, 10);
  if (end == v || *end != '\0' || errno != 0 || v[0] == '-') {
    Usage(std::string(flag) + ": not a number: " + v);
  }
  return n;
}

// ---- write -----------------------------------------------------------------------------------

struct WriteOptions {
  std::vector<std::string> uris;
  uint64_t size = 0;
  uint64_t qd = 0;
  uint64_t duration_s = 0;
  std::string log;
  uint32_t writer = 1;
  uint64_t seed = 0;
};

class Writer {
 public:
  explicit Writer(WriteOptions o) : o_(std::move(o)), rng_(o_.seed ? o_.seed : NowNs()) {
    fd_ = ::open(o_.log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
    if (fd_ < 0) IoError("cannot create log " + o_.log + ": " + std::strerror(errno));
    blocks_ = o_.size / kBlockSize;
    hot_ = std::min<uint64_t>(blocks_, 64);
    Log("tvilling-check 1 writer=" + std::to_string(o_.writer) +
        " size=" + std::to_string(o_.size) + "\n");
  }
  ~Writer() { ::close(fd_); }

  int Run() {
    const int64_t end = NowNs() + static_cast<int64_t>(o_.duration_s) * 1'000'000'000;
    size_t next_uri = 0;
    while (NowNs() < end) {
      nbd_handle* h = Connect(o_.uris[next_uri]);
      next_uri = (next_uri + 1) % o_.uris.size();
      if (h == nullptr) {
        ::usleep(200'000);
        continue;
      }
      if (!Valid(h)) {
        nbd_close(h);
        ::usleep(200'000);
        continue;
      }
      Drive(h, end);
      Close(h);
      if (NowNs() < end) ::usleep(100'000);
    }
    std::printf(
        "{\"writer\":%u,\"issued\":%llu,\"completed\":%llu,\"failed\":%llu,\"unknown\":%llu,"
        "\"connects\":%llu,\"failed_connects\":%llu}\n",
        o_.writer, static_cast<unsigned long long>(issued_),
        static_cast<unsigned long long>(completed_), static_cast<unsigned long long>(failed_),
        static_cast<unsigned long long>(unknown_), static_cast<unsigned long long>(connects_),
        static_cast<unsigned long long>(failed_connects_));
    return 0;
  }

 private:
  struct Ctx {
    Writer* self;
    uint64_t seq;
    std::vector<char> buf;
  };

  void Log(const std::string& line) {
    // One write(2) a line: in the page cache at once, so a kill -9 of this process keeps it.
    size_t off = 0;
    while (off < line.size()) {
      const ssize_t n = ::write(fd_, line.data() + off, line.size() - off);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) IoError("cannot write log " + o_.log + ": " + std::strerror(errno));
      off += static_cast<size_t>(n);
    }
  }

  // Connects within 5 s (a primary that is partitioned away, or stopped, must not hang the run).
  nbd_handle* Connect(const std::string& uri) {
    nbd_handle* h = nbd_create();
    if (h == nullptr) IoError(std::string("nbd_create: ") + nbd_get_error());
    std::string err;
    bool ok = nbd_aio_connect_uri(h, uri.c_str()) == 0;
    const int64_t deadline = NowNs() + 5'000'000'000;
    while (ok && nbd_aio_is_connecting(h) == 1) {
      if (NowNs() > deadline) {
        ok = false;
        err = "timed out after 5 s";
      } else if (nbd_poll(h, 100) < 0) {
        ok = false;
      }
    }
    ok = ok && nbd_aio_is_ready(h) == 1;
    if (!ok && err.empty()) err = nbd_get_error() ? nbd_get_error() : "not ready";
    Log("R " + std::to_string(NowNs()) + (ok ? " ok " : " fail ") + uri + "\n");
    if (!ok) {
      ++failed_connects_;
      std::fprintf(stderr, "tvilling-check: connect %s: %s\n", uri.c_str(), err.c_str());
      nbd_close(h);
      return nullptr;
    }
    ++connects_;
    return h;
  }

  bool Valid(nbd_handle* h) {
    const int64_t size = nbd_get_size(h);
    if (size < 0 || static_cast<uint64_t>(size) < o_.size) {
      std::fprintf(stderr, "tvilling-check: export is %lld bytes, smaller than --size\n",
                   static_cast<long long>(size));
      return false;
    }
    if (nbd_is_read_only(h) == 1) {
      std::fprintf(stderr, "tvilling-check: export is read-only (a replica); next URI\n");
      return false;
    }
    return true;
  }

  static int OnComplete(void* user, int* error) {
    auto* c = static_cast<Ctx*>(user);
    c->self->Complete(c->seq, *error);
    return 1;
  }
  static void Free(void* user) { delete static_cast<Ctx*>(user); }

  void Complete(uint64_t seq, int error) {
    auto it = in_flight_.find(seq);
    if (it == in_flight_.end()) return;  // already retired as failed
    Log("C " + std::to_string(seq) + " " + std::to_string(NowNs()) + " " + std::to_string(error) +
        "\n");
    busy_.erase(it->second);
    in_flight_.erase(it);
    if (error == 0) {
      ++completed_;
    } else {
      ++failed_;
      broken_ = true;
      if (failed_ <= 10) {
        std::fprintf(stderr, "tvilling-check: write %llu failed: %s\n",
                     static_cast<unsigned long long>(seq), std::strerror(error));
      }
    }
  }

  // A block with no write in flight: half the time from the hot set (overwrites), else anywhere.
  std::optional<uint64_t> PickBlock() {
    for (int attempt = 0; attempt < 32; ++attempt) {
      const uint64_t range = (rng_() & 1) ? hot_ : blocks_;
      const uint64_t b = rng_() % range;
      if (!busy_.contains(b)) return b;
    }
    return std::nullopt;
  }

  void Issue(nbd_handle* h) {
    const auto b = PickBlock();
    if (!b) return;
    const uint64_t seq = ++seq_;
    auto* c = new Ctx{this, seq, std::vector<char>(kBlockSize)};
    EncodeBlock(o_.writer, seq, *b, c->buf.data());
    Log("I " + std::to_string(seq) + " " + std::to_string(*b) + " " + std::to_string(NowNs()) +
        "\n");
    ++issued_;
    in_flight_.emplace(seq, *b);
    busy_.insert(*b);
    const int64_t r = nbd_aio_pwrite(h, c->buf.data(), kBlockSize, *b * kBlockSize,
                                     nbd_completion_callback{OnComplete, c, Free}, 0);
    if (r < 0) {
      const int err = nbd_get_errno() ? nbd_get_errno() : ENOTCONN;
      // libnbd freed the callback's data; retire the write here.
      Complete(seq, err);
    }
  }

  // Writes until the deadline or the connection breaks.
  void Drive(nbd_handle* h, int64_t end) {
    broken_ = false;
    while (NowNs() < end && !broken_) {
      while (in_flight_.size() < o_.qd && !broken_) {
        const size_t before = in_flight_.size();
        Issue(h);
        if (in_flight_.size() == before && !broken_) break;  // no free block
      }
      if (nbd_poll(h, 100) < 0 || nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) broken_ = true;
    }
  }

  // Waits (at most 10 s) for the writes in flight, then closes. A write still in flight keeps no
  // completion line: its fate is unknown (it may still land), which the verifier allows for.
  void Close(nbd_handle* h) {
    const int64_t drain_end = NowNs() + 10'000'000'000;
    while (!in_flight_.empty() && NowNs() < drain_end && !nbd_aio_is_dead(h) &&
           !nbd_aio_is_closed(h)) {
      if (nbd_poll(h, 100) < 0) break;
    }
    if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) {
      // The connection is gone: what is still in flight failed (the server never answered).
      std::vector<uint64_t> lost;
      for (const auto& [seq, b] : in_flight_) lost.push_back(seq);
      for (uint64_t seq : lost) Complete(seq, ENOTCONN);
    } else {
      unknown_ += in_flight_.size();
      in_flight_.clear();
      busy_.clear();
      nbd_shutdown(h, 0);
    }
    nbd_close(h);
  }

  WriteOptions o_;
  std::mt19937_64 rng_;
  int fd_ = -1;
  uint64_t blocks_ = 0, hot_ = 0, seq_ = 0;
  std::map<uint64_t, uint64_t> in_flight_;  // seq -> block
  std::set<uint64_t> busy_;                 // blocks with a write in flight
  bool broken_ = false;
  uint64_t issued_ = 0, completed_ = 0, failed_ = 0, unknown_ = 0, connects_ = 0,
           failed_connects_ = 0;
};

int CmdWrite(int argc, char** argv) {
  WriteOptions o;
  for (int i = 2; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (i + 1 >= argc) Usage("missing value after " + std::string(a));
    const char* v = argv[++i];
    if (a == "--uri") {
      o.uris.emplace_back(v);
    } else if (a == "--size") {
      o.size = ParseU64(a, v);
    } else if (a == "--qd") {
      o.qd = ParseU64(a, v);
    } else if (a == "--duration") {
      o.duration_s = ParseU64(a, v);
    } else if (a == "--log") {
      o.log = v;
    } else if (a == "--writer") {
      o.writer = static_cast<uint32_t>(ParseU64(a, v));
    } else if (a == "--seed") {
      o.seed = ParseU64(a, v);
    } else {
      Usage("write: unknown argument " + std::string(a));
    }
  }
  if (o.uris.empty()) Usage("write: --uri is required");
  if (o.log.empty()) Usage("write: --log is required");
  if (o.size < kBlockSize || o.size % kBlockSize != 0) {
    Usage("write: --size must be a positive multiple of 4096");
  }
  if (o.qd < 1 || o.qd > 1024) Usage("write: --qd must be 1..1024");
  if (o.duration_s < 1) Usage("write: --duration must be >= 1 (seconds)");
  Writer w(std::move(o));
  return w.Run();
}

// ---- verify ----------------------------------------------------------------------------------

class FileImage : public Image {
 public:
  explicit FileImage(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) IoError("cannot open image " + path + ": " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd_, &st) != 0) IoError("cannot stat image " + path + ": " + std::strerror(errno));
    blocks_ = static_cast<uint64_t>(st.st_size) / kBlockSize;
  }
  ~FileImage() override { ::close(fd_); }
  uint64_t blocks() const override { return blocks_; }
  bool Read(uint64_t i, char* out, std::string* error) override {
    const ssize_t n = ::pread(fd_, out, kBlockSize, static_cast<off_t>(i * kBlockSize));
    if (n != static_cast<ssize_t>(kBlockSize)) {
      *error = "cannot read block " + std::to_string(i) + " of " + path_ + ": " +
               (n < 0 ? std::strerror(errno) : "short read");
      return false;
    }
    return true;
  }

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t blocks_ = 0;
};

class NbdImage : public Image {
 public:
  explicit NbdImage(const std::string& uri) : uri_(uri), h_(nbd_create()) {
    if (h_ == nullptr) IoError(std::string("nbd_create: ") + nbd_get_error());
    if (nbd_connect_uri(h_, uri.c_str()) != 0) {
      IoError("cannot connect to " + uri + ": " + nbd_get_error());
    }
    const int64_t size = nbd_get_size(h_);
    if (size < 0) IoError("cannot get the size of " + uri + ": " + nbd_get_error());
    blocks_ = static_cast<uint64_t>(size) / kBlockSize;
  }
  ~NbdImage() override {
    nbd_shutdown(h_, 0);
    nbd_close(h_);
  }
  uint64_t blocks() const override { return blocks_; }
  bool Read(uint64_t i, char* out, std::string* error) override {
    // Read 1 MiB at a time and serve blocks from it.
    constexpr uint64_t kChunk = 256;
    if (i < chunk_first_ || i >= chunk_first_ + chunk_blocks_) {
      chunk_first_ = i;
      chunk_blocks_ = std::min(kChunk, blocks_ - i);
      chunk_.resize(chunk_blocks_ * kBlockSize);
      if (nbd_pread(h_, chunk_.data(), chunk_.size(), i * kBlockSize, 0) != 0) {
        *error = "cannot read block " + std::to_string(i) + " of " + uri_ + ": " + nbd_get_error();
        chunk_blocks_ = 0;
        return false;
      }
    }
    std::memcpy(out, chunk_.data() + (i - chunk_first_) * kBlockSize, kBlockSize);
    return true;
  }

 private:
  std::string uri_;
  nbd_handle* h_;
  uint64_t blocks_ = 0;
  uint64_t chunk_first_ = 0, chunk_blocks_ = 0;
  std::vector<char> chunk_;
};

std::string ReadFile(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) IoError("cannot open log " + path + ": " + std::strerror(errno));
  std::string s;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
  const bool bad = std::ferror(f);
  std::fclose(f);
  if (bad) IoError("cannot read log " + path);
  return s;
}

int CmdVerify(int argc, char** argv) {
  std::vector<std::string> log_paths;
  std::string image;
  VerifyOptions o;
  for (int i = 2; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (i + 1 >= argc) Usage("missing value after " + std::string(a));
    const char* v = argv[++i];
    if (a == "--log") {
      log_paths.emplace_back(v);
    } else if (a == "--image") {
      image = v;
    } else if (a == "--mode") {
      const std::string_view m = v;
      if (m == "sync") {
        o.mode = Mode::kSync;
      } else if (m == "async") {
        o.mode = Mode::kAsync;
      } else {
        Usage("verify: --mode must be sync or async, not " + std::string(m));
      }
    } else if (a == "--loss-bound") {
      o.loss_bound = ParseU64(a, v);
    } else {
      Usage("verify: unknown argument " + std::string(a));
    }
  }
  if (log_paths.empty()) Usage("verify: --log is required");
  if (image.empty()) Usage("verify: --image is required");
  if (o.loss_bound && o.mode != Mode::kAsync) Usage("verify: --loss-bound needs --mode async");
  std::vector<WriterLog> logs;
  for (const auto& p : log_paths) {
    std::string err;
    auto l = ParseLog(ReadFile(p), p, &err);
    if (!l) IoError(err);
    logs.push_back(std::move(*l));
  }
  std::unique_ptr<Image> img;
  if (image.starts_with("nbd:") || image.starts_with("nbd+") || image.starts_with("nbds")) {
    img = std::make_unique<NbdImage>(image);
  } else {
    img = std::make_unique<FileImage>(image);
  }
  std::string err;
  const auto r = Verify(logs, *img, o, &err);
  if (!r) IoError(err);
  for (const auto& v : r->violations)
    std::printf("VIOLATION %s: %s\n", v.kind.c_str(), v.what.c_str());
  std::printf("%s: %s\n", r->ok() ? "OK" : "FAIL", r->Summary().c_str());
  if (o.mode == Mode::kAsync) {
    std::printf("async: %llu completed writes missing",
                static_cast<unsigned long long>(r->missing));
    if (o.loss_bound) {
      std::printf(", reported loss bound %llu", static_cast<unsigned long long>(*o.loss_bound));
    }
    std::printf("\n");
  }
  return r->ok() ? 0 : 1;
}

int CmdEncode(int argc, char** argv) {
  std::optional<uint64_t> writer, seq, block;
  for (int i = 2; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (i + 1 >= argc) Usage("missing value after " + std::string(a));
    const char* v = argv[++i];
    if (a == "--writer") {
      writer = ParseU64(a, v);
    } else if (a == "--seq") {
      seq = ParseU64(a, v);
    } else if (a == "--block") {
      block = ParseU64(a, v);
    } else {
      Usage("encode: unknown argument " + std::string(a));
    }
  }
  if (!writer || !seq || !block) Usage("encode: --writer, --seq and --block are required");
  std::vector<char> buf(kBlockSize);
  EncodeBlock(static_cast<uint32_t>(*writer), *seq, *block, buf.data());
  if (std::fwrite(buf.data(), 1, buf.size(), stdout) != buf.size()) IoError("cannot write stdout");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) Usage("missing command (write or verify)");
  const std::string_view cmd = argv[1];
  if (cmd == "write") return CmdWrite(argc, argv);
  if (cmd == "verify") return CmdVerify(argc, argv);
  if (cmd == "encode") return CmdEncode(argc, argv);
  Usage("unknown command " + std::string(cmd));
}
