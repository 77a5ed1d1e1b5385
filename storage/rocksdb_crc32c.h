// rocksdb_crc32c.h: RocksDB's CRC32C on the CPU's crc32 instruction.
//
// Debian's librocksdb is built portable, so its crc32c::Extend, which checksums every WAL record
// and every SST block, runs a table-driven loop: 8 % of a single node's CPU at 4 KiB QD16 writes
// (docs/benchmarks.md, "RocksDB's checksums on the crc32 instruction"). The library calls Extend
// through its PLT, so a definition exported by the executable takes precedence over its own:
// rocksdb_crc32c.cc defines it with ISA-L's crc32_iscsi (libisal, which picks SSE4.2 or PCLMUL
// code at run time). The result is bit-identical, so what either one wrote the other reads.
#pragma once

namespace tvilling::storage {

// True if the process's calls to rocksdb::crc32c::Extend, RocksDB's own included, resolve to
// rocksdb_crc32c.cc's definition (false if the executable does not export it: then RocksDB keeps
// its software loop, correct but slower). LogStore::Open logs which one runs.
bool RocksDbCrc32cAccelerated();

}  // namespace tvilling::storage
