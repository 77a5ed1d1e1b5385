// corrupt_record: flips one byte of a stored group-log record, to test that the agent notices.
// It writes through RocksDB (the record's bytes change, RocksDB's own checksums stay valid), so
// what is exercised is tvilling's record checksum, as for damage RocksDB cannot see (a bug, a bad
// copy). A record whose payload is external (docs/log-format.md, "External payloads") gets the
// byte flipped in its payload file instead, and the file and offset are printed to stderr.
//
// Usage: corrupt_record LOG_DIR GROUP [LSN]   (default LSN: the last record of the group)
// Prints the LSN it corrupted.
#include <fcntl.h>
#include <fmt/format.h>
#include <rocksdb/db.h>
#include <unistd.h>

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
  if (IsExternalValue(value)) {
    const PayloadRef ref = DecodePayloadRef(value);
    const std::string path = fmt::format("{}/payload/{}/{:020}.pay", argv[1], gid, ref.file_id);
    const int fd = open(path.c_str(), O_RDWR);
    char c = 0;
    if (fd < 0 || pread(fd, &c, 1, static_cast<off_t>(ref.offset)) != 1) {
      fprintf(stderr, "cannot read %s at offset %llu\n", path.c_str(),
              static_cast<unsigned long long>(ref.offset));
      return 1;
    }
    c ^= 0x5a;
    if (pwrite(fd, &c, 1, static_cast<off_t>(ref.offset)) != 1 || fsync(fd) != 0) return 1;
    close(fd);
    fprintf(stderr, "flipped the payload byte at %s offset %llu\n", path.c_str(),
            static_cast<unsigned long long>(ref.offset));
    printf("%llu\n", static_cast<unsigned long long>(lsn));
    return 0;
  }
  value[value.size() > kRecordHeaderSize ? kRecordHeaderSize : 20] ^= 0x5a;
  rocksdb::WriteOptions wo;
  wo.sync = true;
  if (!db->Put(wo, key, value).ok()) return 1;
  printf("%llu\n", static_cast<unsigned long long>(lsn));
  return 0;
}
