// corrupt_record: flips one byte of a stored group-log record, to test that the agent notices.
// It writes through RocksDB (the record's bytes change, RocksDB's own checksums stay valid), so
// what is exercised is tvilling's record checksum, as for damage RocksDB cannot see (a bug, a bad
// copy).
//
// Usage: corrupt_record LOG_DIR GROUP [LSN]   (default LSN: the last record of the group)
// Prints the LSN it corrupted.
#include <rocksdb/db.h>

#include <cstdio>
#include <memory>
#include <string>

#include "storage/log_record.h"

using namespace tvilling::storage;

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s LOG_DIR GROUP [LSN]\n", argv[0]);
    return 2;
  }
  rocksdb::DB* raw = nullptr;
  rocksdb::Options o;
  rocksdb::Status s = rocksdb::DB::Open(o, argv[1], &raw);
  if (!s.ok()) {
    fprintf(stderr, "open %s: %s\n", argv[1], s.ToString().c_str());
    return 1;
  }
  std::unique_ptr<rocksdb::DB> db(raw);
  std::string gid_value;
  if (!db->Get({}, std::string("G") + argv[2], &gid_value).ok() || gid_value.size() != 4) {
    fprintf(stderr, "no group %s\n", argv[2]);
    return 1;
  }
  uint32_t gid;
  memcpy(&gid, gid_value.data(), 4);
  uint64_t lsn = 0;
  if (argc > 3) {
    lsn = std::stoull(argv[3]);
  } else {
    std::unique_ptr<rocksdb::Iterator> it(db->NewIterator({}));
    it->SeekForPrev(EncodeLogKey(gid, UINT64_MAX));
    uint32_t g = 0;
    if (!it->Valid() || !DecodeLogKey({it->key().data(), it->key().size()}, &g, &lsn) || g != gid) {
      fprintf(stderr, "group %s has no records\n", argv[2]);
      return 1;
    }
  }
  std::string key = EncodeLogKey(gid, lsn), value;
  if (!db->Get({}, key, &value).ok()) {
    fprintf(stderr, "no record LSN %llu\n", static_cast<unsigned long long>(lsn));
    return 1;
  }
  value[value.size() > kRecordHeaderSize ? kRecordHeaderSize : 20] ^= 0x5a;
  rocksdb::WriteOptions wo;
  wo.sync = true;
  if (!db->Put(wo, key, value).ok()) return 1;
  printf("%llu\n", static_cast<unsigned long long>(lsn));
  return 0;
}
