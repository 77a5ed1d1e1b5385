// The payload hash in every record (docs/log-format.md) is XXH3-64 with seed 0, whichever vector
// path computes it: records written before and after a change of path, or by sites on different
// CPUs, must verify alike.
#include <gtest/gtest.h>
#include <xxhash.h>

#include <cstdint>
#include <random>
#include <string>

#include "storage/log_record.h"

namespace tvilling::storage {
namespace {

TEST(PayloadHashTest, IsXxh3OfThePayloadAtEveryLengthAndAlignment) {
  std::mt19937_64 rng(42);
  std::string buf(70000, '\0');
  for (char& c : buf) c = static_cast<char>(rng());
  for (size_t offset = 0; offset < 8; ++offset) {
    for (size_t len = 0; len <= 1100; ++len) {
      const std::string_view p(buf.data() + offset, len);
      ASSERT_EQ(PayloadHash(p), XXH3_64bits(p.data(), p.size())) << len << " at " << offset;
    }
    for (size_t len : {4095u, 4096u, 65536u, 65537u, 69000u}) {
      const std::string_view p(buf.data() + offset, len);
      ASSERT_EQ(PayloadHash(p), XXH3_64bits(p.data(), p.size())) << len << " at " << offset;
    }
  }
}

TEST(PayloadHashTest, KnownValues) {
  // Pinned values of XXH3-64 (seed 0): records on disk and on the wire carry these.
  EXPECT_EQ(PayloadHash(""), 0x2d06800538d394c2ull);
  EXPECT_EQ(PayloadHash("tvilling"), 0xbb907ae6dd8dfea0ull);
  EXPECT_EQ(PayloadHash(std::string(65536, '\0')), 0x33b202d302b65caaull);
}

}  // namespace
}  // namespace tvilling::storage
