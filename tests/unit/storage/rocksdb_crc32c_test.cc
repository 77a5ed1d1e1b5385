// rocksdb_crc32c_test.cc: the CRC32C that replaces librocksdb's (storage/rocksdb_crc32c.h) is the
// one RocksDB's own calls reach, and it computes what the library's software loop computes.
#include "storage/rocksdb_crc32c.h"

#include <dlfcn.h>
#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "tests/unit/storage/temp_dir.h"

namespace rocksdb::crc32c {
uint32_t Extend(uint32_t init_crc, const char* data, size_t n);
}

namespace tvilling::storage {
namespace {

using ExtendFn = uint32_t (*)(uint32_t, const char*, size_t);
constexpr const char* kSymbol = "_ZN7rocksdb6crc32c6ExtendEjPKcm";

// librocksdb's own definition: the next one after this executable's in the lookup order.
ExtendFn LibraryExtend() { return reinterpret_cast<ExtendFn>(::dlsym(RTLD_NEXT, kSymbol)); }

TEST(RocksDbCrc32cTest, RocksDbsCallsResolveToTheReplacement) {
  EXPECT_TRUE(RocksDbCrc32cAccelerated());
  ASSERT_NE(LibraryExtend(), nullptr) << "librocksdb defines no " << kSymbol;
  EXPECT_NE(reinterpret_cast<void*>(LibraryExtend()),
            reinterpret_cast<void*>(&rocksdb::crc32c::Extend));
}

TEST(RocksDbCrc32cTest, StandardCheckValue) {
  // CRC-32C (Castagnoli) of "123456789" (RFC 3720, and RocksDB's own crc32c_test).
  EXPECT_EQ(rocksdb::crc32c::Extend(0, "123456789", 9), 0xE3069283u);
  EXPECT_EQ(rocksdb::crc32c::Extend(0, "", 0), 0u);
  const std::string zeros(32, '\0');
  EXPECT_EQ(rocksdb::crc32c::Extend(0, zeros.data(), zeros.size()), 0x8a9136aau);
}

TEST(RocksDbCrc32cTest, SameAsTheLibrarysLoopOnEveryLengthAlignmentAndContinuation) {
  const ExtendFn lib = LibraryExtend();
  ASSERT_NE(lib, nullptr);
  std::mt19937_64 rng(20261203);
  std::vector<char> buf(1 << 20);
  for (char& c : buf) c = static_cast<char>(rng());
  // Every short length at every alignment (the instruction loop's head and tail), then longer
  // random pieces, each continuing a random CRC as the WAL's record fragments do.
  for (size_t align = 0; align < 16; ++align) {
    for (size_t n = 0; n <= 300; ++n) {
      const auto init = static_cast<uint32_t>(rng());
      ASSERT_EQ(rocksdb::crc32c::Extend(init, buf.data() + align, n),
                lib(init, buf.data() + align, n))
          << "length " << n << " at offset " << align;
    }
  }
  for (int i = 0; i < 200; ++i) {
    const size_t off = rng() % 4096;
    const size_t n = rng() % (buf.size() - off);
    const auto init = static_cast<uint32_t>(rng());
    ASSERT_EQ(rocksdb::crc32c::Extend(init, buf.data() + off, n), lib(init, buf.data() + off, n))
        << "length " << n << " at offset " << off;
  }
  const size_t split = 12345;
  EXPECT_EQ(rocksdb::crc32c::Extend(rocksdb::crc32c::Extend(0, buf.data(), split),
                                    buf.data() + split, buf.size() - split),
            rocksdb::crc32c::Extend(0, buf.data(), buf.size()));
}

// Writes four 4 KiB values to a new DB at `path` and closes it: they are in its WAL only.
void WriteWalOnly(const std::string& path, const std::string& value) {
  rocksdb::Options o;
  o.create_if_missing = true;
  rocksdb::DB* raw = nullptr;
  ASSERT_TRUE(rocksdb::DB::Open(o, path, &raw).ok());
  std::unique_ptr<rocksdb::DB> db(raw);
  rocksdb::WriteOptions wo;
  wo.sync = true;
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(db->Put(wo, "k" + std::to_string(i), value).ok());
  ASSERT_TRUE(db->Close().ok());
}

rocksdb::Status Reopen(const std::string& path, std::string* k3) {
  rocksdb::Options o;
  o.paranoid_checks = true;
  o.wal_recovery_mode = rocksdb::WALRecoveryMode::kAbsoluteConsistency;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(o, path, &raw);
  std::unique_ptr<rocksdb::DB> db(raw);
  if (s.ok()) s = db->Get({}, "k3", k3);
  if (db) db->Close().PermitUncheckedError();
  return s;
}

// A WAL written with the replacement reads back, and a flipped byte in one is found: RocksDB's
// record checksums go through it (a CRC that always matched would let the flip through).
TEST(RocksDbCrc32cTest, RocksDbsWalChecksumsStillCatchAFlippedByte) {
  TempDir dir;
  const std::string value(4096, 'v');
  const std::string good = (dir.path() / "good").string();
  const std::string flipped = (dir.path() / "flipped").string();
  ASSERT_NO_FATAL_FAILURE(WriteWalOnly(good, value));
  ASSERT_NO_FATAL_FAILURE(WriteWalOnly(flipped, value));

  std::string got;
  ASSERT_TRUE(Reopen(good, &got).ok());
  EXPECT_EQ(got, value);

  std::filesystem::path wal;
  for (const auto& e : std::filesystem::directory_iterator(flipped)) {
    if (e.path().extension() == ".log") wal = e.path();
  }
  ASSERT_FALSE(wal.empty()) << "no WAL under " << flipped;
  {
    std::fstream f(wal, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(2048);  // inside the first record's value
    char c = 0;
    f.read(&c, 1);
    f.seekp(2048);
    c = static_cast<char>(c ^ 0x01);
    f.write(&c, 1);
    ASSERT_TRUE(f.good());
  }
  const rocksdb::Status s = Reopen(flipped, &got);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
}

}  // namespace
}  // namespace tvilling::storage
