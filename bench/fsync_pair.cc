// fsync_pair: what one fsync cycle of a replica's log costs on this disk while other writers share
// it, with the log's two files (a payload segment, RocksDB's WAL) fdatasynced one after the other
// (the log until the tenth session) or both at once (GroupLog::SyncWritten since), and the floor
// of a single fdatasync per cycle. Each is a device cache flush on a disk with a volatile cache.
//
// The cycle loop appends what arrived at --rate since the last cycle (64 KiB at least) to the
// payload file (a new 16 MiB segment when one is full, as the log's are) and 4 KiB to the WAL,
// then syncs. Meanwhile --others writers each write 64 KiB blocks at --other-rate and fdatasync
// every MiB (the other logs and volumes on the disk, with the steady writeback's step). Rounds of
// --seconds alternate between the three ways; the figures are the medians over --rounds, and the
// ratios are taken in the same run (docs/benchmarks.md).
//
//   fsync_pair [--dir /var/tmp] [--rate 78] [--others 3] [--other-rate 78] [--seconds 10]
//              [--rounds 3]
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kSegment = 16u << 20;
constexpr size_t kBlock = 64u << 10;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "fsync_pair: %s: %s\n", what.c_str(), std::strerror(errno));
  std::exit(1);
}

void WriteAll(int fd, const char* p, size_t n, off_t off, const std::string& what) {
  while (n > 0) {
    const ssize_t w = pwrite(fd, p, n, off);
    if (w < 0) Die("pwrite " + what);
    p += w;
    n -= static_cast<size_t>(w);
    off += w;
  }
}

void Fdatasync(int fd, const std::string& what) {
  if (fdatasync(fd) != 0) Die("fdatasync " + what);
}

int OpenNew(const std::string& path) {
  unlink(path.c_str());
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) Die("open " + path);
  return fd;
}

// One writer like another log or volume on the disk: 64 KiB blocks at `rate` bytes/s, an
// fdatasync every MiB, over a 1 GiB file.
void Other(const std::string& path, double rate, const std::atomic<bool>& stop,
           const std::vector<char>& buf) {
  const int fd = OpenNew(path);
  const auto start = Clock::now();
  uint64_t written = 0;
  while (!stop.load()) {
    const double due = static_cast<double>(written) / rate;
    const double now = std::chrono::duration<double>(Clock::now() - start).count();
    if (now < due) {
      std::this_thread::sleep_for(std::chrono::duration<double>(due - now));
      continue;
    }
    WriteAll(fd, buf.data(), kBlock, static_cast<off_t>(written % (1u << 30)), path);
    written += kBlock;
    if (written % (1u << 20) == 0) Fdatasync(fd, path);
  }
  close(fd);
  unlink(path.c_str());
}

struct Figures {
  double p50 = 0, p99 = 0;
  size_t cycles = 0;
};

Figures Cycles(const std::string& dir, char way, double rate, double seconds,
               const std::vector<char>& buf) {
  const std::string payload_path = dir + "/payload", wal_path = dir + "/wal";
  int payload = OpenNew(payload_path);
  const int wal = OpenNew(wal_path);
  std::vector<double> lat;
  size_t off = 0, wal_off = 0;
  const auto start = Clock::now();
  auto last = start;
  while (Ms(Clock::now() - start) < seconds * 1000) {
    const auto now = Clock::now();
    size_t bytes = static_cast<size_t>(rate * std::chrono::duration<double>(now - last).count());
    bytes = std::clamp<size_t>(bytes / 4096 * 4096, kBlock, 4u << 20);
    last = now;
    if (off + bytes > kSegment) {  // a new segment, as the log starts one every 16 MiB
      close(payload);
      payload = OpenNew(payload_path);
      off = 0;
    }
    for (size_t done = 0; done < bytes; done += kBlock) {
      WriteAll(payload, buf.data(), std::min(kBlock, bytes - done), static_cast<off_t>(off + done),
               payload_path);
    }
    off += bytes;
    WriteAll(wal, buf.data(), 4096, static_cast<off_t>(wal_off), wal_path);
    wal_off = (wal_off + 4096) % (64u << 20);
    const auto t0 = Clock::now();
    if (way == 's') {
      Fdatasync(payload, payload_path);
      Fdatasync(wal, wal_path);
    } else if (way == 'p') {
      std::thread side([&] { Fdatasync(payload, payload_path); });
      Fdatasync(wal, wal_path);
      side.join();
    } else {
      Fdatasync(wal, wal_path);
    }
    lat.push_back(Ms(Clock::now() - t0));
  }
  close(payload);
  close(wal);
  unlink(payload_path.c_str());
  unlink(wal_path.c_str());
  std::sort(lat.begin(), lat.end());
  Figures f;
  f.cycles = lat.size();
  if (!lat.empty()) {
    f.p50 = lat[lat.size() / 2];
    f.p99 = lat[std::min(lat.size() - 1, lat.size() * 99 / 100)];
  }
  return f;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = "/var/tmp";
  double rate = 78, other_rate = 78, seconds = 10;
  int others = 3, rounds = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--dir") {
      dir = v;
    } else if (k == "--rate") {
      rate = std::stod(v);
    } else if (k == "--others") {
      others = std::stoi(v);
    } else if (k == "--other-rate") {
      other_rate = std::stod(v);
    } else if (k == "--seconds") {
      seconds = std::stod(v);
    } else if (k == "--rounds") {
      rounds = std::stoi(v);
    } else {
      std::fprintf(stderr, "fsync_pair: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if (argc % 2 == 0) {
    std::fprintf(stderr, "fsync_pair: every option takes a value\n");
    return 2;
  }
  char tmpl[4096];
  std::snprintf(tmpl, sizeof tmpl, "%s/fsync-pair.XXXXXX", dir.c_str());
  if (mkdtemp(tmpl) == nullptr) Die("mkdtemp under " + dir);
  const std::string work = tmpl;
  std::vector<char> buf(4u << 20);
  std::mt19937_64 rng(1);
  for (char& c : buf) c = static_cast<char>(rng());

  const char* names[] = {"payload then WAL", "payload beside WAL", "WAL only (floor)"};
  const char ways[] = {'s', 'p', 'w'};
  std::map<char, std::vector<double>> p50, p99;
  std::map<char, size_t> cycles;
  for (int r = 0; r < rounds; ++r) {
    for (char way : ways) {
      std::atomic<bool> stop{false};
      std::vector<std::thread> bg;
      for (int i = 0; i < others; ++i) {
        bg.emplace_back(Other, work + "/other" + std::to_string(i), other_rate * 1048576,
                        std::cref(stop), std::cref(buf));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      const Figures f = Cycles(work, way, rate * 1048576, seconds, buf);
      stop = true;
      for (auto& t : bg) t.join();
      p50[way].push_back(f.p50);
      p99[way].push_back(f.p99);
      cycles[way] += f.cycles;
    }
  }
  std::filesystem::remove_all(work);
  std::printf(
      "one log fsync cycle at %.0f MiB/s beside %d writers at %.0f MiB/s (fdatasync every "
      "MiB), %d rounds of %.0f s, medians:\n",
      rate, others, other_rate, rounds, seconds);
  for (int i = 0; i < 3; ++i) {
    const char w = ways[i];
    std::printf("  %-20s p50 %6.2f ms  p99 %6.2f ms  (%zu cycles)\n", names[i], Median(p50[w]),
                Median(p99[w]), cycles[w]);
  }
  std::printf("ratio beside / then: p50 %.2f, p99 %.2f\n", Median(p50['p']) / Median(p50['s']),
              Median(p99['p']) / Median(p99['s']));
  return 0;
}
