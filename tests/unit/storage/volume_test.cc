// volume_test.cc: tests of storage::Volume on files (ext4 temp dir), a loop block device and a tiny
// tmpfs (ENOSPC, no FALLOC_FL_ZERO_RANGE). The loop and tmpfs cases need root and skip without it.
#include "storage/volume.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace tvilling::storage {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kMiB = 1 << 20;

fs::path MakeTempDir(const char* tag) {
  std::string tmpl = (fs::temp_directory_path() / (std::string("tvilling-") + tag + "-XXXXXX"));
  char* made = ::mkdtemp(tmpl.data());
  EXPECT_NE(made, nullptr) << "mkdtemp " << tmpl << ": " << std::strerror(errno);
  return fs::path(tmpl);
}

std::string Pattern(uint64_t seed, size_t length) {
  std::mt19937_64 rng(seed);
  std::string s(length, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

// Sizes of the file in 512-byte units actually allocated.
uint64_t AllocatedBlocks(const fs::path& p) {
  struct stat st {};
  EXPECT_EQ(::stat(p.c_str(), &st), 0) << p;
  return static_cast<uint64_t>(st.st_blocks);
}

uint64_t FileSize(const fs::path& p) {
  struct stat st {};
  EXPECT_EQ(::stat(p.c_str(), &st), 0) << p;
  return static_cast<uint64_t>(st.st_size);
}

std::string ReadAll(const Volume& v) {
  std::string out(v.size(), '\0');
  absl::Status s = v.Read(0, std::span<char>(out.data(), out.size()));
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

std::string ReadRange(const Volume& v, uint64_t offset, uint64_t length) {
  std::string out(length, '\0');
  absl::Status s = v.Read(offset, std::span<char>(out.data(), out.size()));
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

std::string RawFileBytes(const fs::path& p, uint64_t offset, uint64_t length) {
  std::ifstream in(p, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  std::string out(length, '\0');
  in.read(out.data(), static_cast<std::streamsize>(length));
  EXPECT_EQ(static_cast<uint64_t>(in.gcount()), length) << p;
  return out;
}

// Compares volume contents without dumping megabytes on failure: names the first differing byte.
::testing::AssertionResult SameBytes(const std::string& actual, const std::string& expected) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure()
           << "size " << actual.size() << " != expected " << expected.size();
  }
  const auto [a, e] = std::mismatch(actual.begin(), actual.end(), expected.begin());
  if (a == actual.end()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "first difference at offset " << (a - actual.begin()) << ": got byte "
         << static_cast<int>(static_cast<unsigned char>(*a)) << ", expected "
         << static_cast<int>(static_cast<unsigned char>(*e));
}

uint64_t AlignTo512(uint64_t v) { return v - v % 512; }

bool AllZero(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c == 0; });
}

// Runs a shell command; returns its stdout (trimmed) and sets *ok to whether it exited 0.
std::string RunCommand(const std::string& cmd, bool* ok) {
  std::string out;
  FILE* p = ::popen((cmd + " 2>/dev/null").c_str(), "r");
  if (p == nullptr) {
    *ok = false;
    return out;
  }
  std::array<char, 256> buf{};
  while (std::fgets(buf.data(), buf.size(), p) != nullptr) out += buf.data();
  *ok = ::pclose(p) == 0;
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

// Applies writes at odd offsets and lengths to the volume and to a shadow copy.
void RandomWrites(Volume& v, std::string& shadow, uint64_t seed, int count, uint64_t max_len) {
  std::mt19937_64 rng(seed);
  for (int i = 0; i < count; ++i) {
    const uint64_t len = 1 + rng() % max_len;
    const uint64_t off = rng() % (v.size() - len + 1);
    const std::string data = Pattern(rng(), len);
    ASSERT_TRUE(v.Write(off, data).ok()) << "write " << off << "+" << len;
    shadow.replace(off, len, data);
  }
}

class VolumeFileTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = MakeTempDir("vol"); }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path Path(const char* name = "vol.img") const { return dir_ / name; }

  fs::path dir_;
};

TEST_F(VolumeFileTest, CreatesSparseFileOfTheGivenSize) {
  auto v = Volume::Open({.path = Path(), .size_bytes = 64 * kMiB});
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ((*v)->size(), 64 * kMiB);
  EXPECT_FALSE((*v)->is_block_device());
  EXPECT_EQ(FileSize(Path()), 64 * kMiB);
  EXPECT_EQ(AllocatedBlocks(Path()), 0u);
  EXPECT_TRUE(AllZero(ReadRange(**v, 0, kMiB)));
}

TEST_F(VolumeFileTest, HoleBytesAtFindsWhereDataBeginsBeforeAnyFsync) {
  auto v = Volume::Open({.path = Path(), .size_bytes = 64 * kMiB});
  ASSERT_TRUE(v.ok()) << v.status();
  if ((*v)->HoleBytesAt(0, 64 * kMiB) != 64 * kMiB) {
    GTEST_SKIP() << "the file system under " << Path() << " does not report holes (SEEK_DATA)";
  }
  const std::string data(4096, 'x');
  ASSERT_TRUE((*v)->Write(8 * kMiB, data).ok());  // in the page cache only: not yet allocated
  EXPECT_EQ((*v)->HoleBytesAt(0, 64 * kMiB), 8 * kMiB);  // up to the data
  EXPECT_EQ((*v)->HoleBytesAt(0, kMiB), kMiB);           // capped
  EXPECT_EQ((*v)->HoleBytesAt(8 * kMiB, 64 * kMiB), 0u);
  EXPECT_EQ((*v)->HoleBytesAt(8 * kMiB - 4096, 64 * kMiB), 4096u);
  EXPECT_EQ((*v)->HoleBytesAt(9 * kMiB, 64 * kMiB), 55 * kMiB);  // to the end, not beyond
  EXPECT_EQ((*v)->HoleBytesAt(64 * kMiB, kMiB), 0u);
  ASSERT_TRUE((*v)->WriteZeroes(8 * kMiB, kMiB, /*may_trim=*/true).ok());  // punched out again
  EXPECT_EQ((*v)->HoleBytesAt(0, 64 * kMiB), 64 * kMiB);
}

TEST_F(VolumeFileTest, ReopenKeepsDataAndSizeZeroMeansWholeFile) {
  const std::string data = Pattern(1, 12345);
  {
    auto v = Volume::Open({.path = Path(), .size_bytes = kMiB});
    ASSERT_TRUE(v.ok()) << v.status();
    ASSERT_TRUE((*v)->Write(777, data).ok());
    ASSERT_TRUE((*v)->Flush().ok());
  }
  auto same = Volume::Open({.path = Path(), .size_bytes = kMiB, .create = false});
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_EQ(ReadRange(**same, 777, data.size()), data);
  same->reset();
  auto whole = Volume::Open({.path = Path(), .size_bytes = 0, .create = false});
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ((*whole)->size(), kMiB);
}

// Pages resident in the page cache for the first `bytes` of `path`.
size_t ResidentPages(const fs::path& path, size_t bytes) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  void* m = ::mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0);
  std::vector<unsigned char> vec((bytes + 4095) / 4096);
  ::mincore(m, bytes, vec.data());
  ::munmap(m, bytes);
  ::close(fd);
  size_t n = 0;
  for (unsigned char c : vec) n += c & 1;
  return n;
}

TEST_F(VolumeFileTest, DropCleanCacheEvictsFlushedPagesAndKeepsData) {
  auto v = Volume::Open({.path = Path(), .size_bytes = 4 * kMiB});
  ASSERT_TRUE(v.ok());
  ASSERT_TRUE((*v)->Write(0, std::string(2 * kMiB, 'd')).ok());
  ASSERT_GT(ResidentPages(Path(), 2 * kMiB), 256u) << "written pages should be cached";
  ASSERT_TRUE((*v)->Flush().ok());
  (*v)->DropCleanCache();
  EXPECT_LT(ResidentPages(Path(), 2 * kMiB), 16u) << "flushed pages were not dropped";
  std::string back(2 * kMiB, '\0');
  ASSERT_TRUE((*v)->Read(0, std::span<char>(back.data(), back.size())).ok());
  EXPECT_EQ(back, std::string(2 * kMiB, 'd'));
}

// Dirty and under-writeback pages of the file's [offset, offset + length): cachestat(2),
// Linux 6.5+. nullopt where the kernel has no such call.
std::optional<std::pair<uint64_t, uint64_t>> DirtyPages(const fs::path& p, uint64_t offset,
                                                        uint64_t length) {
  struct Range {
    uint64_t off, len;
  } range{offset, length};
  struct Stat {
    uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
  } cs{};
  constexpr long kSysCachestat = 451;
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0) << p;
  const long rc = ::syscall(kSysCachestat, fd, &range, &cs, 0);
  ::close(fd);
  if (rc != 0) return std::nullopt;
  return std::make_pair(cs.nr_dirty, cs.nr_writeback);
}

// The checkpoint's paced writeback (core/dirty_ranges.h): WriteBack leaves the range's pages
// clean and written (not just queued), leaves other ranges alone, and clamps to the volume.
TEST_F(VolumeFileTest, WriteBackCleansExactlyTheRangeAndWaitsForIt) {
  auto v = Volume::Open({.path = Path(), .size_bytes = 16 * kMiB});
  ASSERT_TRUE(v.ok());
  ASSERT_TRUE((*v)->Write(0, std::string(8 * kMiB, 'a')).ok());
  ASSERT_TRUE((*v)->Write(12 * kMiB, std::string(kMiB, 'b')).ok());
  auto before = DirtyPages(Path(), 0, 8 * kMiB);
  if (!before) GTEST_SKIP() << "no cachestat(2) on this kernel";
  if (before->first == 0) GTEST_SKIP() << "the file system wrote the pages at once";
  ASSERT_TRUE((*v)->WriteBack(0, 8 * kMiB).ok());
  EXPECT_EQ(DirtyPages(Path(), 0, 8 * kMiB), std::make_pair(uint64_t{0}, uint64_t{0}))
      << "dirty or still under writeback after WriteBack (was " << before->first << " dirty)";
  EXPECT_GT(DirtyPages(Path(), 12 * kMiB, kMiB)->first, 0u) << "WriteBack wrote another range";
  ASSERT_TRUE((*v)->WriteBack(12 * kMiB, 100 * kMiB).ok());  // past the end: clamped
  EXPECT_EQ(DirtyPages(Path(), 12 * kMiB, kMiB)->first, 0u);
  EXPECT_TRUE((*v)->WriteBack(20 * kMiB, 1).ok());  // outside: nothing to do
  EXPECT_TRUE((*v)->WriteBack(0, 0).ok());
  EXPECT_EQ(ReadRange(**v, 12 * kMiB, kMiB), std::string(kMiB, 'b'));
  ASSERT_TRUE((*v)->Flush().ok());
}

TEST_F(VolumeFileTest, LargerExistingFileIsAnErrorNamingBothSizes) {
  ASSERT_TRUE(Volume::Open({.path = Path(), .size_bytes = 2 * kMiB}).ok());
  auto v = Volume::Open({.path = Path(), .size_bytes = kMiB});
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string msg(v.status().message());
  EXPECT_NE(msg.find(Path().string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("2097152"), std::string::npos) << msg;
  EXPECT_NE(msg.find("1048576"), std::string::npos) << msg;
  EXPECT_EQ(FileSize(Path()), 2 * kMiB) << "a failed open must not shrink the file";
}

TEST_F(VolumeFileTest, SmallerExistingFileIsExtendedOnlyWithCreate) {
  const std::string data = Pattern(2, 4096);
  {
    auto v = Volume::Open({.path = Path(), .size_bytes = kMiB});
    ASSERT_TRUE(v.ok()) << v.status();
    ASSERT_TRUE((*v)->Write(kMiB - 4096, data).ok());
  }
  auto no_create = Volume::Open({.path = Path(), .size_bytes = 4 * kMiB, .create = false});
  ASSERT_FALSE(no_create.ok());
  EXPECT_EQ(no_create.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(no_create.status().message()).find("4194304"), std::string::npos);
  auto read_only = Volume::Open({.path = Path(), .size_bytes = 4 * kMiB, .read_only = true});
  EXPECT_FALSE(read_only.ok());
  EXPECT_EQ(FileSize(Path()), kMiB);

  auto grown = Volume::Open({.path = Path(), .size_bytes = 4 * kMiB, .create = true});
  ASSERT_TRUE(grown.ok()) << grown.status();
  EXPECT_EQ((*grown)->size(), 4 * kMiB);
  EXPECT_EQ(FileSize(Path()), 4 * kMiB);
  EXPECT_EQ(ReadRange(**grown, kMiB - 4096, 4096), data);
  EXPECT_TRUE(AllZero(ReadRange(**grown, kMiB, 3 * kMiB)));
}

TEST_F(VolumeFileTest, MissingFileWithoutCreateOrSizeIsNotFound) {
  auto a = Volume::Open({.path = Path(), .size_bytes = kMiB, .create = false});
  EXPECT_EQ(a.status().code(), absl::StatusCode::kNotFound) << a.status();
  auto b = Volume::Open({.path = Path(), .size_bytes = kMiB, .create = true, .read_only = true});
  EXPECT_EQ(b.status().code(), absl::StatusCode::kNotFound) << b.status();
  auto c = Volume::Open({.path = Path(), .size_bytes = 0, .create = true});
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound) << c.status();
  EXPECT_FALSE(fs::exists(Path()));
  EXPECT_NE(std::string(a.status().message()).find(Path().string()), std::string::npos);
}

TEST_F(VolumeFileTest, RejectsDirectoriesAndEmptyPaths) {
  auto d = Volume::Open({.path = dir_, .size_bytes = 0, .create = false, .read_only = true});
  EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << d.status();
  auto e = Volume::Open({.path = "", .size_bytes = kMiB});
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument) << e.status();
}

TEST_F(VolumeFileTest, RoundTripsAtOddOffsetsAndLengthsAndAcrossReopen) {
  const uint64_t size = 3 * kMiB + 123;  // odd sizes are fine without O_DIRECT
  std::string shadow(size, '\0');
  {
    auto v = Volume::Open({.path = Path(), .size_bytes = size});
    ASSERT_TRUE(v.ok()) << v.status();
    RandomWrites(**v, shadow, 42, 200, 70000);
    ASSERT_TRUE((*v)->Write(0, std::string_view("x", 1)).ok());
    shadow[0] = 'x';
    ASSERT_TRUE((*v)->Write(size - 7, "tail-7!").ok());
    shadow.replace(size - 7, 7, "tail-7!");
    EXPECT_TRUE(SameBytes(ReadAll(**v), shadow));
    EXPECT_EQ(ReadRange(**v, 1, 333), shadow.substr(1, 333));
    ASSERT_TRUE((*v)->Flush().ok());
  }
  auto again = Volume::Open({.path = Path(), .size_bytes = size, .create = false});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(SameBytes(ReadAll(**again), shadow));
}

TEST_F(VolumeFileTest, RangeErrorsNamePathOffsetLengthAndSize) {
  auto v = Volume::Open({.path = Path(), .size_bytes = kMiB});
  ASSERT_TRUE(v.ok()) << v.status();
  char buf[16];
  absl::Status r = (*v)->Read(kMiB - 8, std::span<char>(buf, 16));
  ASSERT_EQ(r.code(), absl::StatusCode::kInvalidArgument) << r;
  const std::string msg(r.message());
  for (const std::string& want :
       {Path().string(), std::string("1048568"), std::string("16"), std::string("1048576")}) {
    EXPECT_NE(msg.find(want), std::string::npos) << "missing " << want << " in: " << msg;
  }
  EXPECT_EQ((*v)->Write(kMiB, "a").code(), absl::StatusCode::kInvalidArgument);
  // offset + length overflows u64: must be rejected by the range check, not by the kernel.
  for (const absl::Status& s : {(*v)->Write(UINT64_MAX, "ab"), (*v)->Trim(4096, UINT64_MAX - 100),
                                (*v)->Read(UINT64_MAX - 1, std::span<char>(buf, 4))}) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(std::string(s.message()).find("outside the volume"), std::string::npos) << s;
  }
  EXPECT_EQ((*v)->WriteZeroes(kMiB + 1, 0, false).code(), absl::StatusCode::kInvalidArgument);
  // Exactly up to the end is fine, and so are empty requests at the end.
  EXPECT_TRUE((*v)->Write(kMiB - 5, "12345").ok());
  EXPECT_TRUE((*v)->Read(kMiB, std::span<char>(buf, 0)).ok());
  EXPECT_EQ(ReadRange(**v, kMiB - 5, 5), "12345");
}

TEST_F(VolumeFileTest, TrimReadsZeroesAndDeallocates) {
  auto v = Volume::Open({.path = Path(), .size_bytes = 8 * kMiB});
  ASSERT_TRUE(v.ok()) << v.status();
  const std::string data = Pattern(3, 4 * kMiB);
  ASSERT_TRUE((*v)->Write(0, data).ok());
  ASSERT_TRUE((*v)->Flush().ok());
  const uint64_t before = AllocatedBlocks(Path());
  ASSERT_GE(before, 4 * kMiB / 512);

  ASSERT_TRUE((*v)->Trim(0, 2 * kMiB).ok());
  // Unaligned edges: the partial blocks are zeroed, the bytes around them kept.
  ASSERT_TRUE((*v)->Trim(2 * kMiB + 100, 10000).ok());
  const uint64_t after = AllocatedBlocks(Path());
  EXPECT_LE(after, before - 2 * kMiB / 512) << "trim did not deallocate";
  std::string expect = data;
  std::fill(expect.begin(), expect.begin() + 2 * kMiB, '\0');
  std::fill(expect.begin() + 2 * kMiB + 100, expect.begin() + 2 * kMiB + 10100, '\0');
  EXPECT_TRUE(SameBytes(ReadRange(**v, 0, 4 * kMiB), expect));
}

TEST_F(VolumeFileTest, WriteZeroesKeepsAllocationUnlessMayTrim) {
  auto v = Volume::Open({.path = Path(), .size_bytes = 8 * kMiB});
  ASSERT_TRUE(v.ok()) << v.status();
  const std::string data = Pattern(4, 4 * kMiB);
  ASSERT_TRUE((*v)->Write(0, data).ok());
  ASSERT_TRUE((*v)->Flush().ok());
  const uint64_t before = AllocatedBlocks(Path());

  ASSERT_TRUE((*v)->WriteZeroes(4096, kMiB, /*may_trim=*/false).ok());
  EXPECT_GE(AllocatedBlocks(Path()), before) << "NO_HOLE zeroing deallocated";
  ASSERT_TRUE((*v)->WriteZeroes(2 * kMiB, kMiB + 3, /*may_trim=*/true).ok());
  EXPECT_LE(AllocatedBlocks(Path()), before - kMiB / 512) << "may_trim zeroing kept the blocks";

  std::string expect = data;
  std::fill(expect.begin() + 4096, expect.begin() + 4096 + kMiB, '\0');
  std::fill(expect.begin() + 2 * kMiB, expect.begin() + 3 * kMiB + 3, '\0');
  EXPECT_TRUE(SameBytes(ReadRange(**v, 0, 4 * kMiB), expect));
}

TEST_F(VolumeFileTest, ReadOnlyRejectsWritesWithFailedPrecondition) {
  const std::string data = Pattern(5, 1000);
  {
    auto v = Volume::Open({.path = Path(), .size_bytes = kMiB});
    ASSERT_TRUE(v.ok()) << v.status();
    ASSERT_TRUE((*v)->Write(10, data).ok());
  }
  auto ro = Volume::Open({.path = Path(), .size_bytes = kMiB, .read_only = true});
  ASSERT_TRUE(ro.ok()) << ro.status();
  EXPECT_EQ(ReadRange(**ro, 10, data.size()), data);
  absl::Status w = (*ro)->Write(0, "abc");
  EXPECT_EQ(w.code(), absl::StatusCode::kFailedPrecondition) << w;
  EXPECT_NE(std::string(w.message()).find(Path().string()), std::string::npos) << w;
  EXPECT_EQ((*ro)->Write(0, "").code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*ro)->Trim(0, 4096).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*ro)->WriteZeroes(0, 4096, true).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE((*ro)->Flush().ok());
  EXPECT_EQ(ReadRange(**ro, 10, data.size()), data);
}

TEST_F(VolumeFileTest, DirectIoBouncesUnalignedRequests) {
  const uint64_t size = 4 * kMiB;
  auto v = Volume::Open({.path = Path(), .size_bytes = size, .direct_io = true});
  if (!v.ok() && absl::IsInvalidArgument(v.status())) GTEST_SKIP() << v.status();
  ASSERT_TRUE(v.ok()) << v.status();
  std::string shadow(size, '\0');
  // std::string data is rarely 4096-aligned; the odd offsets and lengths force read-modify-write.
  RandomWrites(**v, shadow, 7, 100, 50000);
  // Larger than one bounce chunk, starting and ending inside blocks.
  const std::string big = Pattern(8, 2 * kMiB + 555);
  ASSERT_TRUE((*v)->Write(4097, big).ok());
  shadow.replace(4097, big.size(), big);
  // Head and tail in the same block.
  ASSERT_TRUE((*v)->Write(8192 + 10, "same-block").ok());
  shadow.replace(8192 + 10, 10, "same-block");

  // Unaligned reads, into an unaligned buffer.
  std::vector<char> buf(300001 + 1);
  ASSERT_TRUE((*v)->Read(12345, std::span<char>(buf.data() + 1, 300001)).ok());
  EXPECT_EQ(std::string(buf.data() + 1, 300001), shadow.substr(12345, 300001));

  // Aligned fast path, from an aligned buffer.
  void* raw = nullptr;
  ASSERT_EQ(::posix_memalign(&raw, 4096, 8192), 0);
  std::unique_ptr<char, decltype(&std::free)> aligned(static_cast<char*>(raw), &std::free);
  std::memset(aligned.get(), 'A', 8192);
  ASSERT_TRUE((*v)->Write(3 * kMiB, std::string_view(aligned.get(), 8192)).ok());
  shadow.replace(3 * kMiB, 8192, std::string(8192, 'A'));
  ASSERT_TRUE((*v)->Read(3 * kMiB - 4096, std::span<char>(aligned.get(), 8192)).ok());
  EXPECT_EQ(std::string(aligned.get(), 8192), shadow.substr(3 * kMiB - 4096, 8192));

  ASSERT_TRUE((*v)->WriteZeroes(100, 5000, false).ok());
  std::fill(shadow.begin() + 100, shadow.begin() + 5100, '\0');
  ASSERT_TRUE((*v)->Trim(kMiB + 1, 9000).ok());
  std::fill(shadow.begin() + kMiB + 1, shadow.begin() + kMiB + 9001, '\0');
  ASSERT_TRUE((*v)->Flush().ok());
  EXPECT_TRUE(SameBytes(ReadAll(**v), shadow));
  v->reset();
  auto buffered = Volume::Open({.path = Path(), .size_bytes = size, .create = false});
  ASSERT_TRUE(buffered.ok()) << buffered.status();
  EXPECT_TRUE(SameBytes(ReadAll(**buffered), shadow));
}

TEST_F(VolumeFileTest, DirectIoNeedsABlockMultipleSize) {
  auto v = Volume::Open({.path = Path(), .size_bytes = kMiB + 512, .direct_io = true});
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument) << v.status();
}

TEST(VolumeIsAllZeroTest, FindsAnyNonZeroByteAtAnyAlignment) {
  EXPECT_TRUE(Volume::IsAllZero({}));
  std::vector<char> buf(kMiB + 200, 0);
  // Every start alignment and lengths around the 64-byte blocks and the word alignment.
  for (size_t start = 0; start < 16; ++start) {
    for (size_t len : {size_t{1}, size_t{7}, size_t{63}, size_t{64}, size_t{65}, size_t{127},
                       size_t{129}, size_t{4096}, size_t{kMiB}}) {
      const std::string_view v(buf.data() + start, len);
      ASSERT_TRUE(Volume::IsAllZero(v)) << start << "+" << len;
      for (size_t at : {size_t{0}, len / 2, len - 1}) {
        buf[start + at] = 1;
        EXPECT_FALSE(Volume::IsAllZero(v)) << start << "+" << len << " byte " << at;
        buf[start + at] = 0;
      }
      // A byte just outside the range does not count.
      buf[start + len] = static_cast<char>(0x80);
      EXPECT_TRUE(Volume::IsAllZero(v)) << start << "+" << len;
      buf[start + len] = 0;
    }
  }
  // Every position of a high bit in a 200-byte range.
  for (size_t at = 0; at < 200; ++at) {
    buf[at + 3] = static_cast<char>(0x80);
    EXPECT_FALSE(Volume::IsAllZero(std::string_view(buf.data() + 3, 200))) << at;
    buf[at + 3] = 0;
  }
}

// The full copy's loop: 1 MiB chunks from a 512-aligned start (a resumed copy) to the end of the
// volume, whose size is not a multiple of 1 MiB; all-zero chunks are sent as zeroes.
void CopyInChunks(const Volume& from, Volume& to, uint64_t start, int* zero_chunks) {
  std::string chunk;
  for (uint64_t off = start; off < from.size(); off += kMiB) {
    chunk.resize(std::min<uint64_t>(kMiB, from.size() - off));
    ASSERT_TRUE(from.Read(off, std::span<char>(chunk.data(), chunk.size())).ok()) << off;
    if (Volume::IsAllZero(chunk)) {
      ++*zero_chunks;
      ASSERT_TRUE(to.WriteZeroes(off, chunk.size(), /*may_trim=*/true).ok()) << off;
    } else {
      ASSERT_TRUE(to.Write(off, chunk).ok()) << off;
    }
  }
}

TEST_F(VolumeFileTest, ChunkedCopyFromAny512AlignedOffsetIncludingThePartialLastChunk) {
  for (const bool direct : {false, true}) {
    SCOPED_TRACE(direct ? "direct_io" : "buffered");
    // Direct I/O needs a 4096-multiple size; the copy start (512-aligned) still is not.
    const uint64_t size = direct ? 5 * kMiB + 3 * 4096 : 5 * kMiB + 1536;
    const std::string src_name = direct ? "src-direct.img" : "src.img";
    const std::string dst_name = direct ? "dst-direct.img" : "dst.img";
    auto src = Volume::Open({.path = Path(src_name.c_str()), .size_bytes = size});
    ASSERT_TRUE(src.ok()) << src.status();
    std::string shadow(size, '\0');
    // Data in chunk 0, the second chunk all zero, data across a chunk boundary and at the very end.
    const std::string a = Pattern(1, 300000), b = Pattern(2, 9000), c = Pattern(3, 777);
    ASSERT_TRUE((*src)->Write(4096 + 512, a).ok());
    shadow.replace(4096 + 512, a.size(), a);
    ASSERT_TRUE((*src)->Write(3 * kMiB + 7 * 512 - 4000, b).ok());
    shadow.replace(3 * kMiB + 7 * 512 - 4000, b.size(), b);
    ASSERT_TRUE((*src)->Write(size - c.size(), c).ok());
    shadow.replace(size - c.size(), c.size(), c);

    auto dst =
        Volume::Open({.path = Path(dst_name.c_str()), .size_bytes = size, .direct_io = direct});
    if (direct && !dst.ok() && absl::IsInvalidArgument(dst.status())) GTEST_SKIP() << dst.status();
    ASSERT_TRUE(dst.ok()) << dst.status();
    // Garbage everywhere first, so zero chunks must really be zeroed.
    const std::string junk = Pattern(9, size);
    ASSERT_TRUE((*dst)->Write(0, junk).ok());
    // A copy interrupted after 7 sectors resumes there; the first 7 sectors came before.
    const uint64_t resume = 7 * 512;
    ASSERT_TRUE((*dst)->Write(0, std::string_view(shadow).substr(0, resume)).ok());
    int zero_chunks = 0;
    CopyInChunks(**src, **dst, resume, &zero_chunks);
    EXPECT_GE(zero_chunks, 1) << "[1 MiB+3584, 2 MiB+3584) holds no data";
    ASSERT_TRUE((*dst)->Flush().ok());
    EXPECT_TRUE(SameBytes(ReadAll(**dst), shadow));
    // The partial last chunk read back on its own, at a 512-aligned, 4096-unaligned offset.
    const uint64_t tail = AlignTo512(size - kMiB / 2 - 512 * 3);
    EXPECT_EQ(ReadRange(**dst, tail, size - tail), shadow.substr(tail));
  }
}

// ---------------------------------------------------------------------------------------------
// A real block device: a loop device over a temp file.

class VolumeLoopTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kBackingBytes = 16 * kMiB;

  void SetUp() override {
    dir_ = MakeTempDir("loop");
    backing_ = dir_ / "backing.img";
    { std::ofstream f(backing_, std::ios::binary); }
    fs::resize_file(backing_, kBackingBytes);
    bool ok = false;
    device_ = RunCommand("losetup -f --show " + backing_.string(), &ok);
    if (!ok || device_.rfind("/dev/", 0) != 0) {
      device_.clear();
      GTEST_SKIP() << "losetup unavailable or failed (needs root and /dev/loop-control)";
    }
  }
  void TearDown() override {
    if (!device_.empty()) {
      bool ok = false;
      RunCommand("losetup -d " + device_, &ok);
      EXPECT_TRUE(ok) << "losetup -d " << device_;
    }
    fs::remove_all(dir_);
  }

  fs::path dir_;
  fs::path backing_;
  std::string device_;
};

TEST_F(VolumeLoopTest, SizesFromTheDevice) {
  {
    auto whole = Volume::Open({.path = device_, .size_bytes = 0});
    ASSERT_TRUE(whole.ok()) << whole.status();
    EXPECT_TRUE((*whole)->is_block_device());
    EXPECT_EQ((*whole)->size(), kBackingBytes);
  }
  {
    auto part = Volume::Open({.path = device_, .size_bytes = 4 * kMiB});
    ASSERT_TRUE(part.ok()) << part.status();
    EXPECT_EQ((*part)->size(), 4 * kMiB);
    EXPECT_EQ((*part)->Write(4 * kMiB, "x").code(), absl::StatusCode::kInvalidArgument);
  }
  auto big = Volume::Open({.path = device_, .size_bytes = 32 * kMiB});
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string msg(big.status().message());
  EXPECT_NE(msg.find("16777216"), std::string::npos) << msg;
  EXPECT_NE(msg.find("33554432"), std::string::npos) << msg;
}

TEST_F(VolumeLoopTest, DeviceIsClaimedExclusively) {
  auto first = Volume::Open({.path = device_});
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = Volume::Open({.path = device_, .read_only = true});
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition) << second.status();
  first->reset();
  EXPECT_TRUE(Volume::Open({.path = device_, .read_only = true}).ok());
}

// A checkpoint's paced writeback on a block device: the device's page cache is written back too.
TEST_F(VolumeLoopTest, WriteBackOnTheDevice) {
  auto v = Volume::Open({.path = device_});
  ASSERT_TRUE(v.ok()) << v.status();
  const std::string data = Pattern(13, 4 * kMiB);
  ASSERT_TRUE((*v)->Write(2 * kMiB, data).ok());
  ASSERT_TRUE((*v)->WriteBack(2 * kMiB, 4 * kMiB).ok());
  if (auto d = DirtyPages(device_, 2 * kMiB, 4 * kMiB)) {
    EXPECT_EQ(d->first + d->second, 0u) << "dirty or under writeback after WriteBack";
  }
  ASSERT_TRUE((*v)->WriteBack(0, 1ull << 40).ok());  // clamped to the device
  ASSERT_TRUE((*v)->Flush().ok());
  EXPECT_TRUE(SameBytes(ReadRange(**v, 2 * kMiB, 4 * kMiB), data));
}

TEST_F(VolumeLoopTest, RoundTripTrimAndZeroes) {
  auto v = Volume::Open({.path = device_});
  ASSERT_TRUE(v.ok()) << v.status();
  std::string shadow(kBackingBytes, '\0');
  RandomWrites(**v, shadow, 11, 100, 100000);
  const std::string block = Pattern(12, 6 * kMiB);
  ASSERT_TRUE((*v)->Write(kMiB, block).ok());
  shadow.replace(kMiB, block.size(), block);
  ASSERT_TRUE((*v)->Flush().ok());
  // The data reached the backing file.
  EXPECT_TRUE(SameBytes(RawFileBytes(backing_, 0, kBackingBytes), shadow));
  const uint64_t before = AllocatedBlocks(backing_);

  // Trim with unaligned edges, may_trim zeroes and plain zeroes.
  ASSERT_TRUE((*v)->Trim(kMiB + 7, 2 * kMiB).ok());
  std::fill(shadow.begin() + kMiB + 7, shadow.begin() + 3 * kMiB + 7, '\0');
  ASSERT_TRUE((*v)->WriteZeroes(4 * kMiB, kMiB, /*may_trim=*/true).ok());
  std::fill(shadow.begin() + 4 * kMiB, shadow.begin() + 5 * kMiB, '\0');
  ASSERT_TRUE((*v)->WriteZeroes(5 * kMiB + 511, 1025, /*may_trim=*/false).ok());
  std::fill(shadow.begin() + 5 * kMiB + 511, shadow.begin() + 5 * kMiB + 1536, '\0');
  ASSERT_TRUE((*v)->Flush().ok());
  EXPECT_TRUE(SameBytes(ReadAll(**v), shadow));
  EXPECT_TRUE(SameBytes(RawFileBytes(backing_, 0, kBackingBytes), shadow));
  // The loop driver punches holes in the backing file for discards / unmapping zeroes.
  EXPECT_LT(AllocatedBlocks(backing_), before) << "trim on the device deallocated nothing";
}

TEST_F(VolumeLoopTest, DirectIoOnTheDevice) {
  auto v = Volume::Open({.path = device_, .direct_io = true});
  ASSERT_TRUE(v.ok()) << v.status();
  std::string shadow(kBackingBytes, '\0');
  RandomWrites(**v, shadow, 13, 50, 30000);
  ASSERT_TRUE((*v)->Flush().ok());
  EXPECT_TRUE(SameBytes(ReadAll(**v), shadow));
  EXPECT_TRUE(SameBytes(RawFileBytes(backing_, 0, kBackingBytes), shadow));
}

// ---------------------------------------------------------------------------------------------
// A tiny tmpfs: ENOSPC, and a file system without FALLOC_FL_ZERO_RANGE.

class VolumeTmpfsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("tmpfs");
    if (::mount("tmpfs", dir_.c_str(), "tmpfs", 0, "size=4m") != 0) {
      GTEST_SKIP() << "mount tmpfs: " << std::strerror(errno) << " (needs root)";
    }
    mounted_ = true;
  }
  void TearDown() override {
    if (mounted_ && ::umount2(dir_.c_str(), 0) != 0) {
      ADD_FAILURE() << "umount " << dir_ << ": " << std::strerror(errno);
      ::umount2(dir_.c_str(), MNT_DETACH);
    }
    fs::remove_all(dir_);
  }

  fs::path dir_;
  bool mounted_ = false;
};

TEST_F(VolumeTmpfsTest, EnospcIsResourceExhausted) {
  const fs::path path = dir_ / "vol.img";
  auto v = Volume::Open({.path = path, .size_bytes = 16 * kMiB});  // sparse: fits
  ASSERT_TRUE(v.ok()) << v.status();
  const std::string data = Pattern(20, 6 * kMiB);
  absl::Status s = (*v)->Write(0, data);
  ASSERT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_NE(std::string(s.message()).find(path.string()), std::string::npos) << s;
  // Zeroing by writing runs out of space the same way.
  absl::Status z = (*v)->WriteZeroes(8 * kMiB, 6 * kMiB, /*may_trim=*/false);
  EXPECT_EQ(z.code(), absl::StatusCode::kResourceExhausted) << z;
}

// tmpfs has no writeback: WriteBack succeeds as a no-op (the checkpoint's Flush is what counts).
TEST_F(VolumeTmpfsTest, WriteBackIsANoOp) {
  auto v = Volume::Open({.path = dir_ / "vol.img", .size_bytes = 2 * kMiB});
  ASSERT_TRUE(v.ok()) << v.status();
  ASSERT_TRUE((*v)->Write(0, Pattern(22, kMiB)).ok());
  EXPECT_TRUE((*v)->WriteBack(0, 2 * kMiB).ok());
  EXPECT_TRUE((*v)->Flush().ok());
}

TEST_F(VolumeTmpfsTest, ZeroesFallBackToWritingWhereZeroRangeIsUnsupported) {
  const fs::path path = dir_ / "vol.img";
  auto v = Volume::Open({.path = path, .size_bytes = 2 * kMiB});
  ASSERT_TRUE(v.ok()) << v.status();
  const std::string data = Pattern(21, kMiB);
  ASSERT_TRUE((*v)->Write(0, data).ok());
  // tmpfs has no FALLOC_FL_ZERO_RANGE: the range is written with zeroes, so it stays allocated
  // (NO_HOLE), and the hole beyond becomes allocated too.
  ASSERT_TRUE((*v)->WriteZeroes(kMiB / 2, kMiB + 17, /*may_trim=*/false).ok());
  EXPECT_GE(AllocatedBlocks(path), (3 * kMiB / 2) / 512);
  std::string expect = data + std::string(kMiB, '\0');
  std::fill(expect.begin() + kMiB / 2, expect.begin() + 3 * kMiB / 2 + 17, '\0');
  EXPECT_TRUE(SameBytes(ReadAll(**v), expect));
  // tmpfs punches holes, so trim deallocates.
  ASSERT_TRUE((*v)->Trim(0, 2 * kMiB).ok());
  EXPECT_EQ(AllocatedBlocks(path), 0u);
  EXPECT_TRUE(AllZero(ReadAll(**v)));
}

}  // namespace
}  // namespace tvilling::storage
