// rocksdb_crc32c.cc: rocksdb::crc32c::Extend on ISA-L's crc32_iscsi (see rocksdb_crc32c.h).
#include "storage/rocksdb_crc32c.h"

#include <dlfcn.h>
#include <isa-l/crc.h>

#include <cstddef>
#include <cstdint>

// RocksDB's util/crc32c.h (not installed): the CRC32C of data[0, n) continuing from init_crc, the
// CRC of what came before (0 for none). Mangled _ZN7rocksdb6crc32c6ExtendEjPKcm, the symbol
// librocksdb's PLT resolves; the storage library's link options export it from every executable.
namespace rocksdb::crc32c {
uint32_t Extend(uint32_t init_crc, const char* data, size_t n);

uint32_t Extend(uint32_t init_crc, const char* data, size_t n) {
  // RocksDB inverts the CRC before and after the loop; crc32_iscsi does neither, so the inversions
  // go around it. Its length is an int: longer buffers go in pieces, each continuing the last.
  uint32_t crc = ~init_crc;
  auto* p = reinterpret_cast<unsigned char*>(const_cast<char*>(data));
  while (n > 0) {
    const size_t piece = n < (size_t{1} << 30) ? n : (size_t{1} << 30);
    crc = crc32_iscsi(p, static_cast<int>(piece), crc);
    p += piece;
    n -= piece;
  }
  return ~crc;
}
}  // namespace rocksdb::crc32c

namespace tvilling::storage {

bool RocksDbCrc32cAccelerated() {
  // The global lookup (RTLD_DEFAULT) is the one the library's PLT makes: it finds the executable's
  // definition first when the executable exports it.
  void* resolved = ::dlsym(RTLD_DEFAULT, "_ZN7rocksdb6crc32c6ExtendEjPKcm");
  return resolved == reinterpret_cast<void*>(&rocksdb::crc32c::Extend);
}

}  // namespace tvilling::storage
