// group_log.cc: the group log on RocksDB: group commit, range reads, metadata, retention, and the
// replica's side of replication (appending shipped records, reset for a full copy).
//
// Key space (one RocksDB, default column family; docs/log-format.md):
//   'G' name                    -> group id (u32 LE)                       group registry
//   'L' gid(BE32) lsn(BE64)     -> record (log_record.h)                   the log
//   'M' gid(BE32) 'h' epoch(BE64) -> first LSN of the epoch (u64 LE)       epoch history
//   'M' gid(BE32) 'a'           -> applied LSN (u64 LE)                    volume checkpoint
//   'M' gid(BE32) 'f'           -> first LSN kept after truncation (u64 LE)
//   'M' gid(BE32) 'p' peer      -> peer position (4 x u64 LE)
//   'M' gid(BE32) 's' first(BE64) -> closed segment (last, bytes, first_ts, last_ts: 4 x u64 LE)
//   'M' gid(BE32) 'r'           -> replica/role metadata (ReplicaMeta: 12 x u64 LE, then
//                                  3 x u64 LE per restore extent)
//   'M' gid(BE32) 'y'           -> payload sync mark (u64 LE): every external payload of a
//                                  record <= it was fdatasynced
// External payloads live in <store dir>/payload/<gid>/<segment's first LSN>.pay (payload_files.h).
#include "storage/group_log.h"

#include <fmt/format.h>
#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/file_system.h>
#include <rocksdb/iterator.h>
#include <rocksdb/options.h>
#include <rocksdb/slice.h>
#include <rocksdb/write_batch.h>
#include <spdlog/spdlog.h>
#include <time.h>

#include <algorithm>
#include <cassert>
#include <chrono>
#include <cstring>
#include <mutex>

#include "storage/rocksdb_crc32c.h"
#include "storage/rocksdb_logger.h"
#include "storage/thread_name.h"

namespace tvilling::storage {
namespace {

constexpr size_t kMetaPrefixSize = 6;  // 'M' + gid + tag

void AppendBE32(std::string* s, uint32_t v) {
  for (int i = 3; i >= 0; --i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void AppendBE64(std::string* s, uint64_t v) {
  for (int i = 7; i >= 0; --i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t ReadBE64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
std::string U64s(std::initializer_list<uint64_t> values) {
  std::string s;
  for (uint64_t v : values) s.append(reinterpret_cast<const char*>(&v), sizeof v);
  return s;
}
uint64_t U64At(std::string_view s, size_t i) {
  uint64_t v = 0;
  if (s.size() >= (i + 1) * 8) std::memcpy(&v, s.data() + i * 8, 8);
  return v;
}

std::string MetaKey(uint32_t gid, char tag) {
  std::string k = "M";
  AppendBE32(&k, gid);
  k.push_back(tag);
  return k;
}
std::string MetaKey(uint32_t gid, char tag, uint64_t n) {
  std::string k = MetaKey(gid, tag);
  AppendBE64(&k, n);
  return k;
}
std::string MetaKey(uint32_t gid, char tag, std::string_view name) {
  std::string k = MetaKey(gid, tag);
  k.append(name);
  return k;
}

// Field order is the on-disk order (docs/log-format.md); new fields go at the end, and a shorter
// value from an older build reads them as 0.
std::string EncodeReplicaMeta(const ReplicaMeta& m) {
  std::string s =
      U64s({m.newest_epoch_seen, m.copy_in_progress ? 1u : 0u, m.copy_volume, m.copy_offset,
            m.copy_base_lsn, m.consistent_at_lsn, m.consistent ? 1u : 0u, m.primary_epoch,
            m.copy_epoch, m.consistent_at_epoch, m.restore_pending ? 1u : 0u, m.restore_epoch});
  for (const VolumeExtent& e : m.restore_extents) s += U64s({e.volume, e.offset, e.length});
  return s;
}
ReplicaMeta DecodeReplicaMeta(std::string_view v) {
  ReplicaMeta m;
  m.newest_epoch_seen = U64At(v, 0);
  m.copy_in_progress = U64At(v, 1) != 0;
  m.copy_volume = static_cast<uint32_t>(U64At(v, 2));
  m.copy_offset = U64At(v, 3);
  m.copy_base_lsn = U64At(v, 4);
  m.consistent_at_lsn = U64At(v, 5);
  m.consistent = U64At(v, 6) != 0;
  m.primary_epoch = U64At(v, 7);
  m.copy_epoch = U64At(v, 8);
  m.consistent_at_epoch = U64At(v, 9);
  m.restore_pending = U64At(v, 10) != 0;
  m.restore_epoch = U64At(v, 11);
  for (size_t i = 12; (i + 3) * 8 <= v.size(); i += 3) {
    m.restore_extents.push_back(
        {static_cast<uint32_t>(U64At(v, i)), U64At(v, i + 1), U64At(v, i + 2)});
  }
  return m;
}

uint64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

absl::Status FromRocks(const rocksdb::Status& s, std::string_view context) {
  if (s.ok()) return absl::OkStatus();
  std::string msg = fmt::format("{}: {}", context, s.ToString());
  if (s.IsCorruption()) return absl::DataLossError(msg);
  if (s.IsNoSpace()) return absl::ResourceExhaustedError(msg);
  if (s.IsIOError()) return absl::InternalError(msg);
  if (s.IsShutdownInProgress()) return absl::UnavailableError(msg);
  return absl::InternalError(msg);
}

// How a call the gate refused begins its message (StoreHealth::Fail tells it from the failure).
constexpr std::string_view kFailedEarlier = "the log store failed earlier";

// Makes `call`, one RocksDB call that writes (kWrite) or syncs (kSync) the WAL, through the store's
// gate (StoreHealth), or returns the store's earlier failure without making it.
template <class Fn>
rocksdb::Status GatedWal(StoreHealth* health, StoreHealth::Call kind, Fn&& call) {
  if (absl::Status h = health->Enter(kind); !h.ok()) {
    // Keeps the first failure's kind (FromRocks maps these back to the same codes).
    const std::string msg = fmt::format("{}: {}", kFailedEarlier, std::string(h.message()));
    if (h.code() == absl::StatusCode::kResourceExhausted) return rocksdb::Status::NoSpace(msg);
    if (h.code() == absl::StatusCode::kDataLoss) return rocksdb::Status::Corruption(msg);
    return rocksdb::Status::IOError(msg);
  }
  if (kind == StoreHealth::Call::kSync && health->before_wal_sync) health->before_wal_sync();
  rocksdb::Status s = call();
  health->Leave(kind, s.ok());
  return s;
}

// RocksDB's WAL file numbers: `<number>.log` in the store's directory (RocksDB's own info log is
// `LOG`, and the store sends it to spdlog anyway).
std::optional<uint64_t> WalNumber(const std::string& fname) {
  const std::string name = std::filesystem::path(fname).filename().string();
  constexpr std::string_view kSuffix = ".log";
  if (name.size() <= kSuffix.size() || !name.ends_with(kSuffix)) return std::nullopt;
  uint64_t n = 0;
  for (size_t i = 0; i + kSuffix.size() < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return std::nullopt;
    n = n * 10 + static_cast<uint64_t>(name[i] - '0');
  }
  return n;
}

// A WAL file that tells the store's gate when a sync of the newest WAL starts (StoreHealth::
// WalSyncStarting): RocksDB's SyncWAL syncs the WALs oldest first and checks each writer for an
// earlier failed write just before its fsync, and only the newest WAL is written to meanwhile.
class WalSyncFile : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  WalSyncFile(std::unique_ptr<rocksdb::FSWritableFile> file, uint64_t number,
              const std::atomic<uint64_t>* newest, StoreHealth* health)
      : FSWritableFileOwnerWrapper(std::move(file)),
        number_(number),
        newest_(newest),
        health_(health) {}

  rocksdb::IOStatus Sync(const rocksdb::IOOptions& options, rocksdb::IODebugContext* dbg) override {
    Starting();
    return target()->Sync(options, dbg);
  }
  rocksdb::IOStatus Fsync(const rocksdb::IOOptions& options,
                          rocksdb::IODebugContext* dbg) override {
    Starting();
    return target()->Fsync(options, dbg);
  }
  void SetIOPriority(rocksdb::Env::IOPriority pri) override { target()->SetIOPriority(pri); }
  rocksdb::Env::IOPriority GetIOPriority() override { return target()->GetIOPriority(); }

 private:
  void Starting() {
    if (number_ >= newest_->load(std::memory_order_acquire)) health_->WalSyncStarting();
  }

  const uint64_t number_;
  const std::atomic<uint64_t>* newest_;
  StoreHealth* health_;
};

// The store's file system: its base, with the WAL files opened for writing wrapped in WalSyncFile.
class WalSyncFs : public rocksdb::FileSystemWrapper {
 public:
  WalSyncFs(const std::shared_ptr<rocksdb::FileSystem>& base, StoreHealth* health)
      : FileSystemWrapper(base), health_(health) {}
  const char* Name() const override { return "TvillingWalSyncFs"; }

  rocksdb::IOStatus NewWritableFile(const std::string& fname, const rocksdb::FileOptions& opts,
                                    std::unique_ptr<rocksdb::FSWritableFile>* result,
                                    rocksdb::IODebugContext* dbg) override {
    return Wrap(fname, target()->NewWritableFile(fname, opts, result, dbg), result);
  }
  rocksdb::IOStatus ReopenWritableFile(const std::string& fname, const rocksdb::FileOptions& opts,
                                       std::unique_ptr<rocksdb::FSWritableFile>* result,
                                       rocksdb::IODebugContext* dbg) override {
    return Wrap(fname, target()->ReopenWritableFile(fname, opts, result, dbg), result);
  }
  rocksdb::IOStatus ReuseWritableFile(const std::string& fname, const std::string& old_fname,
                                      const rocksdb::FileOptions& opts,
                                      std::unique_ptr<rocksdb::FSWritableFile>* result,
                                      rocksdb::IODebugContext* dbg) override {
    return Wrap(fname, target()->ReuseWritableFile(fname, old_fname, opts, result, dbg), result);
  }

 private:
  rocksdb::IOStatus Wrap(const std::string& fname, rocksdb::IOStatus s,
                         std::unique_ptr<rocksdb::FSWritableFile>* result) {
    const std::optional<uint64_t> number = WalNumber(fname);
    if (!s.ok() || !number) return s;
    uint64_t newest = newest_.load(std::memory_order_relaxed);
    while (*number > newest && !newest_.compare_exchange_weak(newest, *number)) {
    }
    *result = std::make_unique<WalSyncFile>(std::move(*result), *number, &newest_, health_);
    return s;
  }

  StoreHealth* health_;
  std::atomic<uint64_t> newest_{0};
};

// Visits every key with `prefix`, in order.
absl::Status ScanPrefix(
    rocksdb::DB* db, const std::string& prefix,
    const std::function<void(std::string_view key, std::string_view value)>& fn) {
  rocksdb::ReadOptions ro;
  std::string upper = prefix;
  upper.back() = static_cast<char>(upper.back() + 1);
  rocksdb::Slice ub(upper);
  ro.iterate_upper_bound = &ub;
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(ro));
  for (it->Seek(prefix); it->Valid(); it->Next()) {
    fn(std::string_view(it->key().data(), it->key().size()),
       std::string_view(it->value().data(), it->value().size()));
  }
  return FromRocks(it->status(), fmt::format("scanning metadata"));
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// StoreHealth

void StoreHealth::Fail(const absl::Status& s) {
  // A call the gate refused (GatedWal: "the log store failed earlier") may be reported before the
  // call that failed is: only the latter says what went wrong (e.g. ENOSPC and the file).
  const bool refusal =
      std::string_view(s.message().data(), s.message().size()).find(kFailedEarlier) !=
      std::string_view::npos;
  bool first = false;
  {
    std::lock_guard lock(mu_);
    first = failed_.ok() && !refusal;
    if (first) failed_ = s;
    call_failed_ = true;
  }
  cv_.notify_all();
  if (first) {
    spdlog::error(
        "log store stopped writing: {}. Every later write of its groups fails with this error "
        "(ENOSPC to NBD clients if the disk is full) until tvillingd restarts; what was "
        "acknowledged stays in the log and reads go on. Free space on (or repair) the log's file "
        "system, then restart tvillingd",
        std::string(s.message()));
  }
}

// ---------------------------------------------------------------------------------------------------
// LogStore

void ConfigureRocksOptions(const LogStoreOptions& options, rocksdb::Options* out) {
  rocksdb::Options& o = *out;
  o.create_if_missing = true;
  o.write_buffer_size = options.write_buffer_bytes;
  o.max_write_buffer_number = options.max_write_buffers;
  // The memtable's arena in blocks of 32 MiB (RocksDB's default: 1 MiB): a handful of allocations
  // per memtable. Chosen when tvillingd ran on glibc's malloc with transparent huge pages (each
  // block a mapping of its own); on jemalloc, 1, 4 and 32 MiB blocks ran 4 KiB writes alike
  // (2026-12-04); what mattered was that freed blocks keep their pages (agent/allocator.cc). A
  // memtable flushes at most a block early (RocksDB's ShouldFlush), and an empty one reserves a
  // block it does not touch.
  o.arena_block_size = MemtableBlockBytes(options.write_buffer_bytes);
  o.compression = rocksdb::kNoCompression;
  o.paranoid_checks = true;
  o.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
  o.max_background_jobs = 2;
  // RocksDB's warnings and errors go to the agent's log, never to a LOG file beside the WAL
  // (storage/rocksdb_logger.h: on a full disk that file's writer made RocksDB abort).
  o.info_log_level = rocksdb::InfoLogLevel::WARN_LEVEL;
  o.info_log = std::make_shared<SpdlogRocksLogger>(options.dir.string(), o.info_log_level);
  o.recycle_log_file_num = options.recycle_wal_files;
  o.allow_fallocate = false;

  if (options.env != nullptr) o.env = options.env;
}

absl::StatusOr<std::unique_ptr<LogStore>> LogStore::Open(const LogStoreOptions& options) {
  std::error_code ec;
  std::filesystem::create_directories(options.dir, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        fmt::format("cannot create log directory {}: {}", options.dir.string(), ec.message()));
  }
  static std::once_flag crc_noted;
  std::call_once(crc_noted, [] {
    if (RocksDbCrc32cAccelerated()) {
      spdlog::debug("RocksDB's CRC32C runs on ISA-L (storage/rocksdb_crc32c.h)");
    } else {
      spdlog::warn(
          "RocksDB's CRC32C runs its portable software loop: this executable does not export "
          "rocksdb::crc32c::Extend (link it with the storage library's options)");
    }
  });
  auto store = std::unique_ptr<LogStore>(new LogStore());
  store->dir_ = options.dir;
  store->health_.before_wal_sync = options.before_wal_sync;
  rocksdb::Options o;
  ConfigureRocksOptions(options, &o);
  store->env_ = rocksdb::NewCompositeEnv(
      std::make_shared<WalSyncFs>(o.env->GetFileSystem(), &store->health_));
  o.env = store->env_.get();
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(o, options.dir.string(), &raw);
  if (!s.ok()) return FromRocks(s, fmt::format("opening log store {}", options.dir.string()));
  store->db_.reset(raw);
  // Whatever survived a crash in the WAL's page cache is made durable now, so durable_lsn can start
  // at last_lsn.
  s = raw->FlushWAL(/*sync=*/true);
  if (!s.ok()) return FromRocks(s, fmt::format("syncing log store {}", options.dir.string()));
  return store;
}

LogStore::~LogStore() {
  for (auto& [name, log] : groups_) log->Stop();
  groups_.clear();
  if (db_) {
    if (health_.status().ok()) db_->FlushWAL(true).PermitUncheckedError();
    db_->Close().PermitUncheckedError();
  }
}

absl::StatusOr<GroupLog*> LogStore::OpenGroup(const std::string& group,
                                              const GroupLogOptions& options) {
  std::lock_guard lock(mu_);
  if (groups_.count(group)) return absl::AlreadyExistsError(fmt::format("group {} is open", group));
  const std::string reg_key = "G" + group;
  std::string value;
  uint32_t gid = 0;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), reg_key, &value);
  if (s.ok() && value.size() == 4) {
    std::memcpy(&gid, value.data(), 4);
  } else if (s.IsNotFound()) {
    uint32_t max_gid = 0;
    absl::Status st = ScanPrefix(db_.get(), "G", [&](std::string_view, std::string_view v) {
      uint32_t id = 0;
      if (v.size() == 4) std::memcpy(&id, v.data(), 4);
      max_gid = std::max(max_gid, id);
    });
    if (!st.ok()) return st;
    gid = max_gid + 1;
    value.assign(reinterpret_cast<const char*>(&gid), 4);
    rocksdb::WriteOptions wo;
    wo.sync = true;
    s = GatedWal(&health_, StoreHealth::Call::kWrite, [&] { return db_->Put(wo, reg_key, value); });
    if (!s.ok()) {
      absl::Status failed = FromRocks(s, fmt::format("registering group {}", group));
      health_.Fail(failed);
      return failed;
    }
  } else {
    return FromRocks(s.ok() ? rocksdb::Status::Corruption("bad group id") : s,
                     fmt::format("looking up group {}", group));
  }
  if (options.external_payload_min_bytes != 0 &&
      options.external_payload_min_bytes <= kPayloadRefSize) {
    return absl::InvalidArgumentError(
        fmt::format("group {}: external_payload_min_bytes must be 0 or more than {}, got {}", group,
                    kPayloadRefSize, options.external_payload_min_bytes));
  }
  auto log = std::unique_ptr<GroupLog>(new GroupLog(db_.get(), &health_, group, gid, options,
                                                    dir_ / "payload" / std::to_string(gid)));
  if (absl::Status st = log->Load(); !st.ok()) return st;
  log->committer_ = std::thread([l = log.get()] {
    SetThreadName("tvl-commit");
    l->CommitterLoop();
  });
  log->syncer_ = std::thread([l = log.get()] {
    SetThreadName("tvl-fsync");
    l->SyncerLoop();
  });
  log->payload_syncer_ = std::thread([l = log.get()] {
    SetThreadName("tvl-paysync");
    l->PayloadSyncerLoop();
  });
  GroupLog* out = log.get();
  groups_.emplace(group, std::move(log));
  return out;
}

// ---------------------------------------------------------------------------------------------------
// GroupLog: opening

GroupLog::GroupLog(rocksdb::DB* db, StoreHealth* health, std::string name, uint32_t group_id,
                   GroupLogOptions options, std::filesystem::path payload_dir)
    : db_(db),
      health_(health),
      name_(std::move(name)),
      group_id_(group_id),
      options_(std::move(options)),
      payloads_(std::make_unique<PayloadFiles>(std::move(payload_dir), name_,
                                               options_.payload_writeback_bytes,
                                               options_.recycle_payload_files)) {}

GroupLog::~GroupLog() { Stop(); }

absl::StatusOr<GroupLog::Segment> GroupLog::ScanSegment(uint64_t from, uint64_t to) {
  Segment seg{from, from - 1, 0, 0, 0};
  if (from > to) return seg;
  absl::Status st = ReadRange(from, to, [&](const LogRecordView& r) {
    seg.last_lsn = r.lsn;
    seg.bytes += kRecordHeaderSize + r.payload.size();
    if (seg.first_timestamp_ns == 0) seg.first_timestamp_ns = r.header.timestamp_ns;
    seg.last_timestamp_ns = r.header.timestamp_ns;
    return absl::OkStatus();
  });
  if (!st.ok()) return st;
  return seg;
}

absl::Status GroupLog::Load() {
  const std::string ctx = fmt::format("group {}: loading log", name_);
  std::string v;
  // History.
  absl::Status st =
      ScanPrefix(db_, MetaKey(group_id_, 'h'), [&](std::string_view k, std::string_view val) {
        if (k.size() != kMetaPrefixSize + 8) return;
        history_.push_back({ReadBE64(k.data() + kMetaPrefixSize), U64At(val, 0)});
      });
  if (!st.ok()) return st;
  if (!history_.empty()) current_epoch_ = history_.back().epoch;
  // Applied LSN and truncation point.
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), MetaKey(group_id_, 'a'), &v);
  if (s.ok()) applied_lsn_ = U64At(v, 0);
  uint64_t truncated_to = 1;
  s = db_->Get(rocksdb::ReadOptions(), MetaKey(group_id_, 'f'), &v);
  if (s.ok()) truncated_to = U64At(v, 0);
  s = db_->Get(rocksdb::ReadOptions(), MetaKey(group_id_, 'y'), &v);
  if (s.ok()) payload_mark_ = U64At(v, 0);
  s = db_->Get(rocksdb::ReadOptions(), MetaKey(group_id_, 'r'), &v);
  if (s.ok()) {
    replica_meta_ = DecodeReplicaMeta(v);
  } else if (!s.IsNotFound()) {
    return FromRocks(s, fmt::format("{}: reading replica metadata", ctx));
  }
  // Peers.
  st = ScanPrefix(db_, MetaKey(group_id_, 'p'), [&](std::string_view k, std::string_view val) {
    PeerPosition p;
    p.peer = std::string(k.substr(kMetaPrefixSize));
    p.received_lsn = U64At(val, 0);
    p.durable_lsn = U64At(val, 1);
    p.applied_lsn = U64At(val, 2);
    p.needs_full_copy = U64At(val, 3) != 0;
    peers_[p.peer] = p;
  });
  if (!st.ok()) return st;
  // Closed segments.
  st = ScanPrefix(db_, MetaKey(group_id_, 's'), [&](std::string_view k, std::string_view val) {
    if (k.size() != kMetaPrefixSize + 8) return;
    Segment seg{ReadBE64(k.data() + kMetaPrefixSize), U64At(val, 0), U64At(val, 1), U64At(val, 2),
                U64At(val, 3)};
    segments_.push_back(seg);
  });
  if (!st.ok()) return st;

  // First and last LSN from the keys.
  rocksdb::ReadOptions ro;
  std::string lower = EncodeLogKey(group_id_, 0), upper = EncodeLogKey(group_id_, UINT64_MAX);
  rocksdb::Slice lb(lower), ub(upper);
  ro.iterate_lower_bound = &lb;
  ro.iterate_upper_bound = &ub;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(ro));
  uint32_t gid = 0;
  uint64_t first = 0, last = 0;
  it->SeekToFirst();
  if (it->Valid()) {
    DecodeLogKey(std::string_view(it->key().data(), it->key().size()), &gid, &first);
    it->SeekToLast();
    if (it->Valid())
      DecodeLogKey(std::string_view(it->key().data(), it->key().size()), &gid, &last);
  }
  if (!it->status().ok()) return FromRocks(it->status(), ctx);
  if (first == 0) {  // empty: everything below the truncation point is gone
    first_lsn_ = std::max<uint64_t>(truncated_to, applied_lsn_ + 1);
    last = first_lsn_ - 1;
  } else {
    first_lsn_ = std::max(first, truncated_to);
  }
  first_lsn_seen_.store(first_lsn_, std::memory_order_release);
  // Segments already truncated away are forgotten.
  while (!segments_.empty() && segments_.front().last_lsn < first_lsn_) segments_.pop_front();
  // A power cut may have kept WAL records whose external payloads never reached the disk: they
  // are above the payload sync mark, none was acknowledged durable, and they go.
  bool external_above_mark = false;
  if (first != 0) {
    auto cut =
        CutTornPayloadTail(std::max(first_lsn_, payload_mark_ + 1), last, &external_above_mark);
    if (!cut.ok()) return cut.status();
    last = *cut;
  }
  if (last < applied_lsn_) {
    return absl::DataLossError(fmt::format(
        "group {}: the log ends at LSN {} but the volumes were checkpointed at LSN {}; records "
        "that were applied are missing from the log store (lost WAL data?) -- refusing to continue",
        name_, last, applied_lsn_));
  }
  // The open segment is rebuilt by a scan.
  const uint64_t open_from = segments_.empty() ? first_lsn_ : segments_.back().last_lsn + 1;
  for (const Segment& seg : segments_) bytes_ += seg.bytes;
  auto open = ScanSegment(open_from, last);
  if (!open.ok()) return open.status();
  bytes_ += open->bytes;
  // A truncation inside the open segment (TruncateBefore at any LSN) leaves records whose payloads
  // are in the file of the segment's true first LSN, below open_from: the segment keeps that id,
  // so its file is neither removed below nor replaced by a new one for the segment's next records.
  const absl::Status first_ref =
      ForEachValue(open_from, last, [&](uint64_t, std::string_view value) {
        if (!IsExternalValue(value)) return absl::OkStatus();
        open->first_lsn = std::min(open->first_lsn, DecodePayloadRef(value).file_id);
        return absl::CancelledError("found");  // file ids grow with LSNs: the first is the least
      });
  if (!first_ref.ok() && !absl::IsCancelled(first_ref)) return first_ref;
  segments_.push_back(*open);
  // Payload files of no segment held (truncated, cut, or written after the last record that
  // survived) go; the rest is made durable with the WAL that LogStore::Open synced, so durable_lsn
  // can be last_lsn and the mark says so.
  const uint64_t keep_from = segments_.front().first_lsn, keep_to = segments_.back().first_lsn;
  if (absl::Status rm =
          payloads_->RemoveIf([&](uint64_t id) { return id < keep_from || id > keep_to; });
      !rm.ok()) {
    return rm;
  }
  if (external_above_mark || payload_mark_ > last) {
    if (absl::Status ps = payloads_->SyncAll(); !ps.ok()) return ps;
    rocksdb::WriteOptions wo;
    wo.sync = true;
    s = GatedWal(health_, StoreHealth::Call::kWrite,
                 [&] { return db_->Put(wo, MetaKey(group_id_, 'y'), U64s({last})); });
    if (!s.ok()) {
      absl::Status failed = FromRocks(s, fmt::format("{}: writing the payload sync mark", ctx));
      health_->Fail(failed);
      return failed;
    }
    payload_mark_ = last;
  }
  payload_synced_lsn_ = payload_mark_;
  payload_written_lsn_.store(payload_mark_);
  next_lsn_ = last + 1;
  last_lsn_.store(last, std::memory_order_release);
  durable_lsn_.store(last, std::memory_order_release);  // LogStore::Open synced the WAL
  notified_lsn_ = last;
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> GroupLog::CutTornPayloadTail(uint64_t from, uint64_t last,
                                                      bool* checked_any) {
  if (from > last) return last;
  std::string buf;
  uint64_t cut_at = 0;
  absl::Status why;
  const absl::Status scan = ForEachValue(from, last, [&](uint64_t lsn, std::string_view value) {
    if (!IsExternalValue(value)) return absl::OkStatus();
    *checked_any = true;
    auto stored = Materialize(lsn, value, buf);
    why = stored.ok() ? DecodeRecord(group_id_, lsn, *stored).status() : stored.status();
    if (why.ok()) return absl::OkStatus();
    cut_at = lsn;
    return absl::CancelledError("the torn tail starts here");  // ends the scan
  });
  if (cut_at == 0 && !scan.ok()) return scan;
  if (cut_at == 0) return last;
  // Cut [cut_at, last] like CutBackTo: records, the segments and epochs that begin in the cut.
  rocksdb::WriteBatch wb;
  wb.DeleteRange(EncodeLogKey(group_id_, cut_at), EncodeLogKey(group_id_, UINT64_MAX));
  while (!segments_.empty() && segments_.back().last_lsn >= cut_at) {
    wb.Delete(MetaKey(group_id_, 's', segments_.back().first_lsn));
    segments_.pop_back();
  }
  while (!history_.empty() && history_.back().first_lsn >= cut_at) {
    wb.Delete(MetaKey(group_id_, 'h', history_.back().epoch));
    history_.pop_back();
  }
  current_epoch_ = history_.empty() ? 0 : history_.back().epoch;
  wb.Put(MetaKey(group_id_, 'f'), U64s({first_lsn_}));
  rocksdb::WriteOptions wo;
  wo.sync = true;
  rocksdb::Status s =
      GatedWal(health_, StoreHealth::Call::kWrite, [&] { return db_->Write(wo, &wb); });
  if (!s.ok()) {
    absl::Status st =
        FromRocks(s, fmt::format("group {}: cutting the torn tail at LSN {}", name_, cut_at));
    health_->Fail(st);
    return st;
  }
  spdlog::warn(
      "group {}: records LSN {}..{} were cut from the log at open: the payload of LSN {} does not "
      "verify and it is above the payload sync mark (LSN {}), so a power cut left their log "
      "records without their payloads; none of them was acknowledged durable ({})",
      name_, cut_at, last, cut_at, payload_mark_, std::string(why.message()));
  return cut_at - 1;
}

absl::StatusOr<std::string_view> GroupLog::Materialize(uint64_t lsn, std::string_view value,
                                                       std::string& buf) const {
  if (!IsExternalValue(value)) return value;
  const RecordHeader h = PeekRecordHeader(value);
  const PayloadRef ref = DecodePayloadRef(value);
  if (h.payload_size > kMaxRecordPayload) {
    return absl::DataLossError(fmt::format(
        "group {}: log record LSN {} is corrupt: external payload of {} bytes (at most {})", name_,
        lsn, h.payload_size, kMaxRecordPayload));
  }
  buf.resize(kRecordHeaderSize + h.payload_size);
  std::memcpy(buf.data(), value.data(), kRecordHeaderSize);
  absl::Status st =
      payloads_->Read(ref.file_id, ref.offset, buf.data() + kRecordHeaderSize, h.payload_size);
  if (!st.ok()) {
    // Not under mu_: CutBackTo scans with it held. A truncation stores first_lsn_seen_ before it
    // removes files, so a file gone because of it is seen as such here.
    if (const uint64_t first = first_lsn_seen_.load(std::memory_order_acquire); lsn < first) {
      return absl::OutOfRangeError(fmt::format(
          "group {}: LSN {} was truncated while being read (the log now starts at LSN {})", name_,
          lsn, first));
    }
    return absl::DataLossError(
        fmt::format("group {}: payload of log record LSN {} (file {}, offset {}, {} bytes): {}",
                    name_, lsn, payloads_->PathOf(ref.file_id).string(), ref.offset, h.payload_size,
                    std::string(st.message())));
  }
  return std::string_view(buf);
}

absl::Status GroupLog::RecordError(uint64_t lsn, std::string_view value,
                                   const absl::Status& st) const {
  if (!IsExternalValue(value)) {
    return absl::DataLossError(fmt::format("group {}: {}", name_, std::string(st.message())));
  }
  const PayloadRef ref = DecodePayloadRef(value);
  return absl::DataLossError(fmt::format(
      "group {}: {} (external payload of LSN {}: file {}, offset {})", name_,
      std::string(st.message()), lsn, payloads_->PathOf(ref.file_id).string(), ref.offset));
}

// ---------------------------------------------------------------------------------------------------
// GroupLog: appending

namespace {

// AppendPlug's state: whether this thread holds a plug, and the logs it appended to meanwhile.
struct AppendPlugState {
  bool engaged = false;
  std::vector<GroupLog*> logs;
};
thread_local AppendPlugState t_append_plug;

// Whether an Append on this thread leaves the committer asleep (a plug is engaged); notes the log.
bool AppendPlugDefers(GroupLog* log) {
  AppendPlugState& s = t_append_plug;
  if (!s.engaged) return false;
  if (std::find(s.logs.begin(), s.logs.end(), log) == s.logs.end()) s.logs.push_back(log);
  return true;
}

}  // namespace

void AppendPlug::Engage() { t_append_plug.engaged = true; }

bool AppendPlug::Engaged() { return t_append_plug.engaged; }

void AppendPlug::Release() {
  AppendPlugState& s = t_append_plug;
  if (!s.engaged) return;
  s.engaged = false;
  // Writing may run callbacks (completions, on_batch_written); take the list before.
  std::vector<GroupLog*> logs;
  logs.swap(s.logs);
  for (GroupLog* log : logs) log->Unplug();
  logs.clear();
  if (s.logs.empty()) s.logs.swap(logs);  // keeps the capacity for the next burst
}

void GroupLog::Unplug() {
  std::unique_lock lock(mu_);
  if (queue_.empty()) return;  // the committer took them meanwhile
  if (options_.plugged_inline_when_idle && !committing_ && !stopping_ && failed_.ok()) {
    // The fsync a FUA record or a Sync() wants stays the syncer's: this thread must not block.
    CommitOnCallerThread(lock, /*may_fsync=*/false);
    return;
  }
  lock.unlock();
  cv_.notify_one();
}

void GroupLog::Append(AppendRequest req, AppendDone done) {
  // The expensive part of the checksum, on the caller's thread and outside the lock.
  const uint64_t payload_hash = PayloadHash(req.payload.view());
  if (req.timestamp_ns == 0) req.timestamp_ns = NowNs();
  std::unique_lock lock(mu_);
  if (!failed_.ok() || stopping_) {
    absl::Status st = !failed_.ok()
                          ? failed_
                          : absl::UnavailableError(fmt::format("group {}: log is stopping", name_));
    lock.unlock();
    std::move(done)(st);
    return;
  }
  Pending p;
  p.lsn = next_lsn_++;
  if (pending_epoch_) {
    current_epoch_ = *pending_epoch_;
    pending_epoch_.reset();
    p.starts_epoch = true;
  }
  RecordHeader& h = p.header;
  h.type = req.type;
  h.flags = req.flags;
  h.volume = req.volume;
  h.epoch = current_epoch_;
  h.offset = req.offset;
  h.length = req.length;
  h.timestamp_ns = req.timestamp_ns;
  EncodeRecordHeader(group_id_, p.lsn, h, static_cast<uint32_t>(req.payload.size()), payload_hash,
                     p.encoded.data());
  p.req = std::move(req);
  p.payload = p.req.payload.view();  // the buffer is on the heap: moving `p` keeps the view valid
  p.done = std::move(done);
  queue_.push_back(std::move(p));
  lock.unlock();
  if (AppendPlugDefers(this)) return;  // the plug's release writes it
  cv_.notify_one();
}

struct GroupLog::ReplicatedRun {
  ShippedRecords records;  // owns the buffer the records' payloads point into
  absl::Status status;     // first error of a record of the run (see GroupLog::Complete)
};

void GroupLog::AppendReplicated(uint32_t sender_group_id, uint64_t first_lsn,
                                ShippedRecords records, bool sync, AppendDone done) {
  // Verification (a hash over every payload) and re-encoding happen here, on the caller's thread
  // and outside the lock; only the LSN and epoch checks need it.
  auto run = std::make_shared<ReplicatedRun>();
  run->records = std::move(records);
  const size_t n = run->records.size();
  std::vector<Pending> pending(n);
  for (size_t i = 0; i < n; ++i) {
    Pending& p = pending[i];
    p.lsn = first_lsn + i;
    uint64_t payload_hash = 0;
    auto rec = DecodeRecord(sender_group_id, p.lsn, run->records[i], &payload_hash);
    if (!rec.ok()) {
      std::move(done)(absl::DataLossError(
          fmt::format("group {}: replicated record LSN {} does not verify, nothing appended: {}",
                      name_, p.lsn, std::string(rec.status().message()))));
      return;
    }
    p.header = rec->header;
    p.payload = rec->payload;
    EncodeRecordHeader(group_id_, p.lsn, p.header, p.header.payload_size, payload_hash,
                       p.encoded.data());
    p.run = run;
  }
  std::unique_lock lock(mu_);
  absl::Status st;
  if (!failed_.ok()) {
    st = failed_;
  } else if (stopping_) {
    st = absl::UnavailableError(fmt::format("group {}: log is stopping", name_));
  } else if (first_lsn != next_lsn_) {
    st = absl::FailedPreconditionError(
        fmt::format("group {}: replicated records start at LSN {} but the log's next LSN is {}; "
                    "nothing appended",
                    name_, first_lsn, next_lsn_));
  }
  // Epochs: never backwards; a newer one begins there. A BeginEpoch not yet used by a record sets
  // the floor (the log was told it is in that epoch).
  uint64_t epoch = current_epoch_;
  const uint64_t floor = pending_epoch_.value_or(current_epoch_);
  for (size_t i = 0; st.ok() && i < n; ++i) {
    const uint64_t e = pending[i].header.epoch;
    if (e < floor || e < epoch) {
      st = absl::FailedPreconditionError(fmt::format(
          "group {}: replicated record LSN {} has epoch {}, older than the log's epoch {}; "
          "nothing appended",
          name_, pending[i].lsn, e, std::max(floor, epoch)));
    } else if (e > epoch) {
      pending[i].starts_epoch = true;
      epoch = e;
    }
  }
  if (!st.ok()) {
    lock.unlock();
    std::move(done)(st);
    return;
  }
  if (n == 0) {
    lock.unlock();
    std::move(done)(first_lsn - 1);
    return;
  }
  current_epoch_ = epoch;
  pending_epoch_.reset();
  next_lsn_ += n;
  pending.back().req.sync = sync;
  pending.back().done = std::move(done);
  const bool was_idle = queue_.empty() && !committing_;
  for (Pending& p : pending) queue_.push_back(std::move(p));
  if (was_idle && options_.replicated_inline_when_idle) {
    // Nothing queued and no batch being written: write this one here rather than wake the
    // committer (on a replica that hand-off is part of every sync WRITE's latency at the
    // primary). The committer waits meanwhile; what queues behind this batch is its.
    CommitOnCallerThread(lock);
    return;
  }
  lock.unlock();
  cv_.notify_one();
}

void GroupLog::Sync(SyncDone done, bool fsync_here, std::chrono::microseconds within) {
  std::unique_lock lock(mu_);
  if (!failed_.ok()) {
    absl::Status st = failed_;
    lock.unlock();
    std::move(done)(st);
    return;
  }
  const uint64_t target = next_lsn_ - 1;
  if (target <= durable_lsn_.load(std::memory_order_acquire) && !meta_dirty_) {
    lock.unlock();
    std::move(done)(absl::OkStatus());
    return;
  }
  // When the fsync is due; the epoch = at once.
  const auto due = within.count() > 0 ? std::chrono::steady_clock::now() + within
                                      : std::chrono::steady_clock::time_point{};
  if (within.count() > 0) fsync_here = false;
  if (fsync_here && options_.sync_inline_when_idle && queue_.empty() && !committing_ &&
      !meta_dirty_ && sync_waiters_.empty() && !syncing_ && sync_jobs_.empty() && !stopping_) {
    // Everything up to `target` is written (nothing queued, no batch in flight): only the fsync is
    // missing, and this thread can do it. Not while the syncer fsyncs or has jobs: this thread
    // would wait for that fsync (RocksDB runs one WAL sync at a time) and then fsync again, where
    // the syncer's next fsync covers this Sync() together with whatever else arrives meanwhile.
    ++inline_syncs_;
    lock.unlock();
    absl::Status st = SyncWritten(target);
    lock.lock();
    --inline_syncs_;
    lock.unlock();
    idle_cv_.notify_all();
    std::move(done)(st);
    return;
  }
  if (queue_.empty() && !committing_ && !meta_dirty_ && !stopping_) {
    // Everything up to `target` is written: only an fsync is missing, which is the syncer's job.
    // Going through the committer would wake it for nothing (and a replicated append that comes
    // meanwhile would find the log busy and not be written on its caller's thread).
    // The syncer sleeps until the earliest job is due and then takes every job: one due no
    // earlier than a job already there needs no wake-up. A replica defers the fsync of each batch
    // a sync peer's WRITE does not wait on, so this saves a context switch per replicated write.
    const bool wake = std::none_of(sync_jobs_.begin(), sync_jobs_.end(),
                                   [&](const SyncJob& j) { return j.due <= due; });
    SyncJob job;
    job.target_lsn = target;
    job.due = due;
    job.waiters.push_back({target, std::move(done), due});
    sync_jobs_.push_back(std::move(job));
    lock.unlock();
    if (wake) sync_cv_.notify_one();
    return;
  }
  // Records are queued or being written: the committer hands this to the syncer with them, due
  // when the caller asked (so a deferred Sync on a busy log still waits for its time).
  sync_waiters_.push_back({target, std::move(done), due});
  lock.unlock();
  cv_.notify_one();
}

absl::Status GroupLog::SyncPayloadFilesLocked(uint64_t* mark) {
  *mark = 0;
  // Read before the fdatasync: every payload appended up to it is covered by the fdatasync.
  const uint64_t target = payload_written_lsn_.load(std::memory_order_acquire);
  if (target != payload_synced_lsn_) {  // else nothing appended since
    if (absl::Status st = FdatasyncPayloads(); !st.ok()) return st;
    payload_synced_lsn_ = target;
  }
  // The syncer's fdatasyncs (SyncWritten) leave the mark behind: it catches up here.
  if (payload_synced_lsn_ > payload_mark_) *mark = payload_synced_lsn_;
  return absl::OkStatus();
}

absl::Status GroupLog::SyncPayloads() {
  std::lock_guard lock(payload_sync_mu_);
  uint64_t mark = 0;
  absl::Status st = SyncPayloadFilesLocked(&mark);
  if (st.ok() && mark != 0) {
    st = FromRocks(GatedWal(health_, StoreHealth::Call::kWrite,
                            [&] {
                              return db_->Put(rocksdb::WriteOptions(), MetaKey(group_id_, 'y'),
                                              U64s({mark}));
                            }),
                   fmt::format("group {}: writing the payload sync mark", name_));
    if (!st.ok()) health_->Fail(st);
    if (st.ok()) payload_mark_ = mark;
  }
  return st;
}

absl::Status GroupLog::SyncWritten(uint64_t target) {
  if (absl::Status h = health_->status(); !h.ok()) return h;
  const auto started = std::chrono::steady_clock::now();
  absl::Status ps;
  const rocksdb::Status s = WithPayloadsSynced(
      [&] {
        return GatedWal(health_, StoreHealth::Call::kSync,
                        [&] { return db_->FlushWAL(/*sync=*/true); });
      },
      &ps);
  fsync_latency_.RecordSince(started);
  if (!ps.ok()) {
    absl::Status st =
        absl::Status(ps.code(), fmt::format("group {}: syncing log at LSN {}: {}", name_, target,
                                            std::string(ps.message())));
    health_->Fail(st);
    FailQueued(st);
    return st;
  }
  if (!s.ok()) {
    absl::Status st = FromRocks(s, fmt::format("group {}: syncing log at LSN {}", name_, target));
    health_->Fail(st);
    FailQueued(st);
    return st;
  }
  AdvanceDurable(target);
  return absl::OkStatus();
}

rocksdb::Status GroupLog::WithPayloadsSynced(absl::FunctionRef<rocksdb::Status()> wal_op,
                                             absl::Status* payloads) {
  // The payload files' fdatasync runs beside the WAL's (each is a device cache flush on a disk
  // with a volatile cache; one after the other doubled the replica's fsync cycle and with it the
  // async lag's tail). The caller advances durable_lsn only after both, so no record is
  // acknowledged durable before its payload. The WAL may become durable first with records above
  // the 'y' mark whose payloads are not: a power cut then leaves what open verifies and cuts
  // (docs/log-format.md). The mark follows once both are done, written to the WAL unsynced: the
  // next fsync of the WAL makes it durable, so at most the last round's records are above a
  // durable mark. payload_sync_mu_ is held throughout, so marks are written in increasing order.
  std::lock_guard payload_lock(payload_sync_mu_);
  // Read before the fdatasync: every payload appended up to it is covered by the fdatasync.
  const uint64_t payload_target = payload_written_lsn_.load(std::memory_order_acquire);
  const bool sync_payloads = payload_target != payload_synced_lsn_;
  const bool side = sync_payloads && StartPayloadSync();
  rocksdb::Status wal = wal_op();
  *payloads = sync_payloads ? WaitPayloadSync(side) : absl::OkStatus();
  if (payloads->ok() && sync_payloads) payload_synced_lsn_ = payload_target;
  if (payloads->ok() && wal.ok()) wal = PutPayloadMarkLocked();
  return wal;
}

rocksdb::Status GroupLog::PutPayloadMarkLocked() {
  if (payload_synced_lsn_ <= payload_mark_) return rocksdb::Status::OK();
  rocksdb::Status s = GatedWal(health_, StoreHealth::Call::kWrite, [&] {
    return db_->Put(rocksdb::WriteOptions(), MetaKey(group_id_, 'y'), U64s({payload_synced_lsn_}));
  });
  if (s.ok()) payload_mark_ = payload_synced_lsn_;
  return s;
}

absl::Status GroupLog::FdatasyncPayloads() {
  absl::Status st = payloads_->SyncDirty();
  if (st.ok()) counters_.payload_syncs.fetch_add(1, std::memory_order_relaxed);
  return st;
}

void GroupLog::PayloadSyncerLoop() {
  std::unique_lock lock(payload_syncer_mu_);
  for (;;) {
    payload_syncer_cv_.wait(lock,
                            [&] { return payload_syncer_stopping_ || payload_sync_requested_; });
    if (!payload_sync_requested_) return;  // stopping
    payload_sync_requested_ = false;
    lock.unlock();
    if (options_.before_payload_sync) options_.before_payload_sync();
    absl::Status st = FdatasyncPayloads();
    lock.lock();
    payload_sync_status_ = std::move(st);
    payload_sync_done_ = true;
    payload_syncer_cv_.notify_all();
  }
}

bool GroupLog::StartPayloadSync() {
  {
    std::lock_guard lock(payload_syncer_mu_);
    // A request made before the syncer was told to stop is still served (its loop takes requests
    // first); after that, the caller syncs the files itself.
    if (payload_syncer_stopping_) return false;
    payload_sync_requested_ = true;
    payload_sync_done_ = false;
  }
  payload_syncer_cv_.notify_all();
  return true;
}

absl::Status GroupLog::WaitPayloadSync(bool started) {
  if (!started) return FdatasyncPayloads();
  std::unique_lock lock(payload_syncer_mu_);
  payload_syncer_cv_.wait(lock, [&] { return payload_sync_done_; });
  return std::move(payload_sync_status_);
}

absl::Status GroupLog::write_error() const {
  {
    std::lock_guard lock(mu_);
    if (!failed_.ok()) return failed_;
  }
  return health_->status();
}

bool GroupLog::SyncBusy() const {
  std::lock_guard lock(mu_);
  return fsyncing_ || !sync_jobs_.empty() || inline_syncs_ > 0;
}

void GroupLog::AdvanceDurable(uint64_t lsn) {
  uint64_t d = durable_lsn_.load(std::memory_order_acquire);
  while (d < lsn && !durable_lsn_.compare_exchange_weak(d, lsn, std::memory_order_acq_rel)) {
  }
  if (d < lsn) NotifyDurable();
}

void GroupLog::NotifyDurable() {
  if (!options_.on_durable) return;
  std::unique_lock lock(notify_mu_);
  // One thread reports at a time, so values reach the callback in order; a thread that advances
  // durable_lsn meanwhile leaves its value to that one, which re-reads durable_lsn before it stops.
  // That also makes a callback that syncs inline (and so gets back here) safe.
  if (notifying_) return;
  notifying_ = true;
  for (;;) {
    const uint64_t d = durable_lsn_.load(std::memory_order_acquire);
    if (d <= notified_lsn_) break;
    notified_lsn_ = d;
    lock.unlock();
    options_.on_durable(d);
    lock.lock();
  }
  notifying_ = false;
}

void GroupLog::CommitterLoop() {
  std::vector<Pending> batch;
  std::vector<SyncWaiter> syncs;
  for (;;) {
    bool write_meta = false;
    {
      std::unique_lock lock(mu_);
      // Not while a caller commits on its own thread (CommitOnCallerThread): one batch at a time.
      cv_.wait(lock, [&] {
        return !committing_ &&
               (stopping_ || !queue_.empty() || !sync_waiters_.empty() || meta_dirty_);
      });
      if (stopping_ && queue_.empty() && sync_waiters_.empty() && !meta_dirty_) return;
      write_meta = TakeBatchLocked(batch, syncs);
    }
    Commit(batch, syncs, write_meta);
    batch.clear();
    syncs.clear();
    {
      std::lock_guard lock(mu_);
      committing_ = false;
    }
    idle_cv_.notify_all();
  }
}

bool GroupLog::TakeBatchLocked(std::vector<Pending>& batch, std::vector<SyncWaiter>& syncs) {
  uint64_t bytes = 0;
  while (!queue_.empty() && batch.size() < options_.max_batch_records &&
         (batch.empty() || bytes + queue_.front().payload.size() <= options_.max_batch_bytes)) {
    bytes += queue_.front().payload.size() + kRecordHeaderSize;
    batch.push_back(std::move(queue_.front()));
    queue_.pop_front();
  }
  // Waiters whose records are all written by the end of this batch are served by it.
  const uint64_t batch_last = batch.empty() ? last_lsn_.load() : batch.back().lsn;
  auto covered = std::partition(sync_waiters_.begin(), sync_waiters_.end(),
                                [&](const SyncWaiter& w) { return w.target_lsn <= batch_last; });
  for (auto i = sync_waiters_.begin(); i != covered; ++i) syncs.push_back(std::move(*i));
  sync_waiters_.erase(sync_waiters_.begin(), covered);
  committing_ = true;
  return meta_dirty_;
}

void GroupLog::CommitOnCallerThread(std::unique_lock<std::mutex>& lock, bool may_fsync) {
  std::vector<Pending> batch;
  std::vector<SyncWaiter> syncs;
  const bool write_meta = TakeBatchLocked(batch, syncs);
  lock.unlock();
  Commit(batch, syncs, write_meta, may_fsync);
  lock.lock();
  committing_ = false;
  const bool more = !queue_.empty() || !sync_waiters_.empty() || meta_dirty_ || stopping_;
  lock.unlock();
  if (more) cv_.notify_one();
  idle_cv_.notify_all();
}

void GroupLog::Commit(std::vector<Pending>& batch, std::vector<SyncWaiter>& syncs, bool write_meta,
                      bool may_fsync) {
  // Reserve the whole batch, payloads included: growing WriteBatch's buffer by doubling copied
  // every payload again and faulted in fresh pages each time (a sixth of a replica's CPU).
  // (External payloads go to their payload file instead: only a 16-byte reference.)
  const uint64_t external_min = options_.external_payload_min_bytes;
  auto is_external = [&](const Pending& p) {
    return external_min != 0 && p.payload.size() >= external_min;
  };
  size_t reserve = (1 << 10);
  bool any_external = false;
  for (const Pending& p : batch) {
    const bool external = is_external(p);
    any_external |= external;
    reserve +=
        kLogKeySize + kRecordHeaderSize + 32 + (external ? kPayloadRefSize : p.payload.size());
  }
  rocksdb::WriteBatch wb(reserve);
  std::vector<LogRecordView> views;
  views.reserve(batch.size());
  bool need_sync = !syncs.empty();
  // Whether an fsync is wanted now: a FUA append or a Sync() due at once (not a deferred one).
  bool sync_now = std::any_of(syncs.begin(), syncs.end(), [](const SyncWaiter& w) {
    return w.due == std::chrono::steady_clock::time_point{};
  });
  absl::Status st;
  uint64_t batch_bytes = 0;
  // The payload file of each external record: that of the segment it belongs to.
  std::vector<uint64_t> file_ids(any_external ? batch.size() : 0);
  {
    // Metadata that describes these records goes into the same batch.
    std::lock_guard lock(mu_);
    for (size_t i = 0; i < batch.size(); ++i) {
      const Pending& p = batch[i];
      if (any_external) file_ids[i] = segments_.back().first_lsn;
      const RecordHeader& h = p.header;
      if (p.starts_epoch) {
        history_.push_back({h.epoch, p.lsn});
        wb.Put(MetaKey(group_id_, 'h', h.epoch), U64s({p.lsn}));
      }
      // Segment bookkeeping: the open segment is the last one.
      Segment& seg = segments_.back();
      const uint64_t rec_bytes = kRecordHeaderSize + p.payload.size();
      if (seg.last_lsn < seg.first_lsn) seg.first_timestamp_ns = h.timestamp_ns;
      seg.last_lsn = p.lsn;
      seg.bytes += rec_bytes;
      seg.last_timestamp_ns = h.timestamp_ns;
      bytes_ += rec_bytes;
      if (seg.bytes >= options_.segment_bytes ||
          seg.last_lsn - seg.first_lsn + 1 >= options_.segment_records) {
        wb.Put(MetaKey(group_id_, 's', seg.first_lsn),
               U64s({seg.last_lsn, seg.bytes, seg.first_timestamp_ns, seg.last_timestamp_ns}));
        segments_.push_back(Segment{p.lsn + 1, p.lsn, 0, 0, 0});
      }
    }
    if (write_meta || meta_dirty_) {
      st = WriteMetaLocked(&wb);
      meta_dirty_ = false;
    }
    if (!failed_.ok()) st = failed_;
  }
  if (st.ok()) {
    if (absl::Status h = health_->status(); !h.ok()) {
      st = absl::Status(h.code(), fmt::format("group {}: log store failed earlier: {}", name_,
                                              std::string(h.message())));
      FailQueued(st);
    }
  }
  // External payloads are appended to their files before the batch that refers to them is
  // written: after a process crash no log record points at bytes the page cache does not hold.
  std::vector<std::array<char, kPayloadRefSize>> refs(any_external ? batch.size() : 0);
  if (st.ok() && any_external) {
    std::vector<std::string_view> parts;
    size_t i = 0;
    while (st.ok() && i < batch.size()) {
      if (!is_external(batch[i])) {
        ++i;
        continue;
      }
      // Every external payload of the batch in this file, with one pwritev.
      const uint64_t file_id = file_ids[i];
      parts.clear();
      size_t j = i;
      for (; j < batch.size() && file_ids[j] == file_id; ++j) {
        if (is_external(batch[j])) parts.push_back(batch[j].payload);
      }
      auto at = payloads_->Append(file_id, parts);
      if (!at.ok()) {
        st = at.status();
        health_->Fail(st);
        FailQueued(st);
        break;
      }
      uint64_t offset = *at;
      for (size_t k = i; k < j; ++k) {
        if (!is_external(batch[k])) continue;
        EncodePayloadRef({file_id, offset}, refs[k].data());
        offset += batch[k].payload.size();
        payload_written_lsn_.store(batch[k].lsn, std::memory_order_release);
      }
      i = j;
    }
  }
  // The records go into the batch without the lock: the batch is ours.
  for (size_t i = 0; st.ok() && i < batch.size(); ++i) {
    Pending& p = batch[i];
    char key[kLogKeySize];
    EncodeLogKeyTo(group_id_, p.lsn, key);
    rocksdb::Slice key_slice(key, kLogKeySize);
    const bool external = any_external && is_external(p);
    rocksdb::Slice value_parts[2] = {rocksdb::Slice(p.encoded.data(), kRecordHeaderSize),
                                     external ? rocksdb::Slice(refs[i].data(), kPayloadRefSize)
                                              : rocksdb::Slice(p.payload.data(), p.payload.size())};
    wb.Put(rocksdb::SliceParts(&key_slice, 1), rocksdb::SliceParts(value_parts, 2));
  }
  for (Pending& p : batch) {
    views.push_back({p.lsn, p.header, p.payload,
                     std::string_view(p.encoded.data(), kRecordHeaderSize),
                     p.run ? nullptr : p.req.payload.owner()});
    need_sync |= p.req.sync;
    sync_now |= p.req.sync;
    batch_bytes += kRecordHeaderSize + p.payload.size();
  }

  // The write and its fsync are two steps on two threads: the committer writes the batch (to the
  // page cache), applies it, completes what need not be durable, and hands the rest to the syncer.
  // So the next batch is written while this one is fsynced (one fsync then covers several
  // batches), and a WRITE without FUA, or a replica's `received`, never waits for a Sync() or FUA
  // that merely shares its batch.
  // Except when everything in the batch waits for durability anyway and the syncer is idle: then
  // one synced write here saves two thread hand-offs per batch (a FUA write at queue depth 1 took
  // several times the raw write+fsync loop's time through the syncer on this 2-vCPU VM, where a
  // futex wake-up costs tens of microseconds).
  bool sync_here = false;
  if (sync_now && may_fsync && options_.sync_on_committer_when_all_durable &&
      std::all_of(batch.begin(), batch.end(),
                  [](const Pending& p) { return p.req.sync || (p.run && !p.done); })) {
    std::lock_guard lock(mu_);
    sync_here = !syncing_ && sync_jobs_.empty();
  }
  if (st.ok() && (wb.Count() > 0 || sync_here)) {
    rocksdb::WriteOptions wo;
    wo.sync = sync_here;
    const auto started = std::chrono::steady_clock::now();
    auto write = [&] {
      return wb.Count() > 0
                 ? GatedWal(health_, StoreHealth::Call::kWrite, [&] { return db_->Write(wo, &wb); })
                 : GatedWal(health_, StoreHealth::Call::kSync,
                            [&] { return db_->FlushWAL(/*sync=*/true); });
    };
    rocksdb::Status s;
    if (sync_here) {
      // A synced write fdatasyncs the payload files beside it, as SyncWritten's fsync does.
      absl::Status ps;
      s = WithPayloadsSynced(write, &ps);
      if (s.ok() && !ps.ok()) s = rocksdb::Status::IOError(std::string(ps.message()));
    } else {
      s = write();
    }
    if (sync_here) fsync_latency_.RecordSince(started);
    if (!s.ok()) {
      const uint64_t at = batch.empty() ? last_lsn_.load() + 1 : batch.front().lsn;
      st = FromRocks(s, fmt::format("group {}: writing log at LSN {}", name_, at));
      health_->Fail(st);
      FailQueued(st);
    }
  }
  // Whether the batch's appends completed before on_batch_written (see the option).
  bool completed = false;
  if (st.ok() && !batch.empty()) {
    last_lsn_.store(batch.back().lsn, std::memory_order_release);
    counters_.records.fetch_add(batch.size(), std::memory_order_relaxed);
    counters_.bytes.fetch_add(batch_bytes, std::memory_order_relaxed);
    counters_.commits.fetch_add(1, std::memory_order_relaxed);
    if (options_.replicated_complete_before_apply && !sync_here &&
        std::all_of(batch.begin(), batch.end(),
                    [](const Pending& p) { return p.run && !p.req.sync; })) {
      for (Pending& p : batch) Complete(p, st);
      completed = true;
    }
    if (options_.on_batch_written) st = options_.on_batch_written(views);
  }
  if (sync_here) {
    // A synced write makes everything before it in the WAL durable too.
    if (st.ok()) AdvanceDurable(last_lsn_.load(std::memory_order_acquire));
    for (Pending& p : batch) Complete(p, st);
    for (SyncWaiter& w : syncs) std::move(w.done)(st);
    return;
  }
  if (completed && !st.ok()) {
    // Too late for these records' callbacks; a run that goes on in a later batch reports it.
    for (Pending& p : batch) {
      if (p.run && p.run->status.ok()) p.run->status = st;
    }
  }
  SyncJob job;
  for (Pending& p : batch) {
    if (completed) break;  // none waits for the fsync, and every callback has run
    if (st.ok() && p.req.sync) {
      job.appends.push_back(std::move(p));
    } else {
      Complete(p, st);
    }
  }
  if (!st.ok()) {
    for (SyncWaiter& w : syncs) std::move(w.done)(st);
    return;
  }
  if (!need_sync) return;
  job.target_lsn = last_lsn_.load(std::memory_order_acquire);
  if (!sync_now) {
    // Only deferred Sync() callers: the fsync is due at the earliest of their times.
    job.due = std::chrono::steady_clock::time_point::max();
    for (const SyncWaiter& w : syncs) job.due = std::min(job.due, w.due);
  }
  job.waiters = std::move(syncs);
  {
    std::lock_guard lock(mu_);
    sync_jobs_.push_back(std::move(job));
  }
  sync_cv_.notify_one();
}

void GroupLog::SyncerLoop() {
  std::vector<SyncJob> jobs;
  for (;;) {
    {
      std::unique_lock lock(mu_);
      for (;;) {
        sync_cv_.wait(lock, [&] { return syncer_stopping_ || !sync_jobs_.empty(); });
        if (sync_jobs_.empty()) return;  // stopping, and the committer has stopped too
        if (syncer_stopping_ || sync_expedite_) break;
        // Jobs with a due time (Sync(within)) wait for it unless a job due at once came, or an
        // idle waiter asked: one fsync then covers them all.
        auto due = std::chrono::steady_clock::time_point::max();
        for (const SyncJob& j : sync_jobs_) due = std::min(due, j.due);
        if (due <= std::chrono::steady_clock::now()) break;
        sync_cv_.wait_until(lock, due);
      }
      sync_expedite_ = false;
      for (SyncJob& j : sync_jobs_) jobs.push_back(std::move(j));
      sync_jobs_.clear();
      syncing_ = true;
      fsyncing_ = true;
    }
    // One fsync for every job taken: the WAL holds all of their records (written in LSN order).
    const uint64_t target = jobs.back().target_lsn;
    absl::Status st = SyncWritten(target);
    {
      // Done before the callbacks run: one of them may append and ask SyncBusy() (a replica's
      // next batch), and a Sync() issued now needs one fsync, not this one and another.
      std::lock_guard lock(mu_);
      fsyncing_ = false;
    }
    for (SyncJob& j : jobs) {
      for (Pending& p : j.appends) Complete(p, st);
      for (SyncWaiter& w : j.waiters) std::move(w.done)(st);
    }
    jobs.clear();
    {
      std::lock_guard lock(mu_);
      syncing_ = false;
    }
    idle_cv_.notify_all();
  }
}

void GroupLog::Complete(Pending& p, const absl::Status& st) {
  if (p.run) {
    // The committer completes written records in LSN order, except that the last record of a
    // synced run (the one with the callback) goes to the syncer, handed over under mu_ after the
    // run's earlier records completed: so the run's first error is recorded before its last record
    // completes, and no two threads touch the run at once.
    if (!st.ok() && p.run->status.ok()) p.run->status = st;
    if (!p.done) return;
    if (!p.run->status.ok()) {
      std::move(p.done)(p.run->status);
      return;
    }
  }
  if (st.ok()) {
    std::move(p.done)(p.lsn);
  } else {
    std::move(p.done)(st);
  }
}

absl::Status GroupLog::WriteMetaLocked(void* write_batch) {
  auto* wb = static_cast<rocksdb::WriteBatch*>(write_batch);
  wb->Put(MetaKey(group_id_, 'a'), U64s({applied_lsn_}));
  for (const auto& [peer, p] : peers_) {
    wb->Put(MetaKey(group_id_, 'p', peer),
            U64s({p.received_lsn, p.durable_lsn, p.applied_lsn, p.needs_full_copy ? 1u : 0u}));
  }
  return absl::OkStatus();
}

void GroupLog::FailQueued(absl::Status status) {
  std::deque<Pending> queue;
  std::vector<SyncWaiter> waiters;
  {
    std::lock_guard lock(mu_);
    if (failed_.ok()) failed_ = std::move(status);
    status = failed_;
    // Everything still queued fails too: the log cannot hold records after a gap.
    queue.swap(queue_);
    waiters.swap(sync_waiters_);
  }
  for (Pending& p : queue) {
    if (p.done) std::move(p.done)(status);  // the last record of a replicated run speaks for it
  }
  for (SyncWaiter& w : waiters) std::move(w.done)(status);
}

void GroupLog::Stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (committer_.joinable()) committer_.join();
  // The committer may hand over a last job before it stops: the syncer finishes every job first.
  {
    std::lock_guard lock(mu_);
    syncer_stopping_ = true;
  }
  sync_cv_.notify_all();
  if (syncer_.joinable()) syncer_.join();
  {
    std::lock_guard lock(payload_syncer_mu_);
    payload_syncer_stopping_ = true;
  }
  payload_syncer_cv_.notify_all();
  if (payload_syncer_.joinable()) payload_syncer_.join();
  // A clean stop leaves every payload durable and the mark at the last one (LogStore then syncs
  // the WAL), so the next open has nothing to check.
  if (health_->status().ok()) SyncPayloads().IgnoreError();
}

// ---------------------------------------------------------------------------------------------------
// GroupLog: state, reading, verification

GroupLogState GroupLog::State() const {
  std::lock_guard lock(mu_);
  GroupLogState s;
  s.group_id = group_id_;
  s.first_lsn = first_lsn_;
  s.last_lsn = last_lsn_.load(std::memory_order_acquire);
  s.durable_lsn = durable_lsn_.load(std::memory_order_acquire);
  s.applied_lsn = applied_lsn_;
  s.current_epoch = current_epoch_;
  s.bytes = bytes_;
  s.history = history_;
  for (const auto& [name, p] : peers_) s.peers.push_back(p);
  s.replica = replica_meta_;
  return s;
}

uint64_t GroupLog::current_epoch() const {
  std::lock_guard lock(mu_);
  return current_epoch_;
}

std::vector<EpochStart> GroupLog::history() const {
  std::lock_guard lock(mu_);
  return history_;
}

ReplicaMeta GroupLog::replica_meta() const {
  std::lock_guard lock(mu_);
  return replica_meta_;
}

absl::Status GroupLog::ForEachValue(
    uint64_t from_lsn, uint64_t to_lsn,
    const std::function<absl::Status(uint64_t lsn, std::string_view value)>& fn) const {
  if (from_lsn > to_lsn) return absl::OkStatus();
  rocksdb::ReadOptions ro;
  ro.verify_checksums = true;
  std::string lower = EncodeLogKey(group_id_, from_lsn);
  std::string upper = EncodeLogKey(group_id_, to_lsn == UINT64_MAX ? to_lsn : to_lsn + 1);
  rocksdb::Slice lb(lower), ub(upper);
  ro.iterate_lower_bound = &lb;
  ro.iterate_upper_bound = &ub;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(ro));
  uint64_t expect = from_lsn;
  // A record not where it should be: below the log's start, truncated (the checkpointer may
  // truncate while a reader that took the log's first LSN before reads; ReadRaw tells the two
  // apart too), or above it and lost.
  auto missing = [&](const std::string& what) {
    if (const uint64_t first = first_lsn_seen_.load(std::memory_order_acquire); expect < first) {
      return absl::OutOfRangeError(fmt::format(
          "group {}: LSN {} is no longer in the log (truncated; it starts at LSN {} now)", name_,
          expect, first));
    }
    return absl::DataLossError(
        fmt::format("group {}: log record LSN {} is missing ({})", name_, expect, what));
  };
  for (it->Seek(lower); it->Valid(); it->Next()) {
    uint32_t gid = 0;
    uint64_t lsn = 0;
    if (!DecodeLogKey(std::string_view(it->key().data(), it->key().size()), &gid, &lsn) ||
        gid != group_id_) {
      return absl::DataLossError(
          fmt::format("group {}: malformed log key near LSN {}", name_, expect));
    }
    if (lsn != expect) return missing(fmt::format("next record is LSN {}", lsn));
    if (absl::Status st = fn(lsn, std::string_view(it->value().data(), it->value().size()));
        !st.ok()) {
      return st;
    }
    ++expect;
  }
  if (!it->status().ok()) {
    return FromRocks(it->status(),
                     fmt::format("group {}: reading log record LSN {}", name_, expect));
  }
  if (expect <= to_lsn && to_lsn != UINT64_MAX) {
    return missing(fmt::format("log should reach LSN {}", to_lsn));
  }
  return absl::OkStatus();
}

absl::Status GroupLog::ReadRange(
    uint64_t from_lsn, uint64_t to_lsn,
    const std::function<absl::Status(const LogRecordView&)>& fn) const {
  std::string buf;  // an external record's header and payload
  return ForEachValue(from_lsn, to_lsn, [&](uint64_t lsn, std::string_view value) {
    auto stored = Materialize(lsn, value, buf);
    if (!stored.ok()) return stored.status();
    auto rec = DecodeRecord(group_id_, lsn, *stored);
    if (!rec.ok()) return RecordError(lsn, value, rec.status());
    return fn(*rec);
  });
}

absl::Status GroupLog::ReadHeaders(
    uint64_t from_lsn, uint64_t to_lsn,
    const std::function<absl::Status(uint64_t lsn, const RecordHeader& header)>& fn) const {
  return ForEachValue(from_lsn, to_lsn, [&](uint64_t lsn, std::string_view value) {
    if (IsExternalValue(value)) return fn(lsn, PeekRecordHeader(value));
    auto rec = DecodeRecord(group_id_, lsn, value);
    if (!rec.ok()) return RecordError(lsn, value, rec.status());
    return fn(lsn, rec->header);
  });
}

absl::Status GroupLog::ReadRaw(
    uint64_t from_lsn, uint64_t max_lsn, uint64_t max_bytes, uint32_t max_records,
    const std::function<absl::Status(uint64_t lsn, std::string_view stored_value)>& fn) const {
  uint64_t first = 0;
  {
    std::lock_guard lock(mu_);
    first = first_lsn_;
  }
  if (from_lsn < first) {
    return absl::OutOfRangeError(fmt::format(
        "group {}: LSN {} is no longer in the log (it starts at LSN {})", name_, from_lsn, first));
  }
  // last_lsn_ is stored after the batch's write returned: everything up to it is readable (from
  // the memtable if not yet flushed), fsynced or not.
  const uint64_t to = std::min(max_lsn, last_lsn());
  if (from_lsn > to || max_records == 0) return absl::OkStatus();
  rocksdb::ReadOptions ro;
  ro.verify_checksums = true;
  // Shipping reads each record once, usually while still in the memtable; when a peer lags, the
  // reads go to SSTs sequentially, so read ahead and keep those blocks out of the block cache.
  ro.fill_cache = false;
  ro.readahead_size = 2 << 20;
  ro.adaptive_readahead = true;
  char lower[kLogKeySize], upper[kLogKeySize];
  EncodeLogKeyTo(group_id_, from_lsn, lower);
  EncodeLogKeyTo(group_id_, to + 1, upper);  // to < UINT64_MAX: it is at most last_lsn
  rocksdb::Slice lb(lower, kLogKeySize), ub(upper, kLogKeySize);
  ro.iterate_lower_bound = &lb;
  ro.iterate_upper_bound = &ub;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(ro));
  uint64_t expect = from_lsn;
  uint64_t bytes = 0;
  uint32_t count = 0;
  std::string buf;  // an external record's header and payload
  auto missing = [&](std::string_view what) {
    std::lock_guard lock(mu_);
    if (expect < first_lsn_) {
      return absl::OutOfRangeError(fmt::format(
          "group {}: LSN {} was truncated while being read (the log now starts at LSN {})", name_,
          expect, first_lsn_));
    }
    return absl::DataLossError(
        fmt::format("group {}: log record LSN {} is missing ({})", name_, expect, what));
  };
  bool limited = false;  // stopped by max_records / max_bytes, not by the end of the range
  for (it->Seek(lb); it->Valid(); it->Next()) {
    if (count == max_records) {
      limited = true;
      break;
    }
    uint32_t gid = 0;
    uint64_t lsn = 0;
    if (!DecodeLogKey(std::string_view(it->key().data(), it->key().size()), &gid, &lsn) ||
        gid != group_id_) {
      return absl::DataLossError(
          fmt::format("group {}: malformed log key near LSN {}", name_, expect));
    }
    if (lsn != expect) return missing(fmt::format("next record is LSN {}", lsn));
    const std::string_view value(it->value().data(), it->value().size());
    const uint64_t stored_size = IsExternalValue(value)
                                     ? kRecordHeaderSize + PeekRecordHeader(value).payload_size
                                     : value.size();
    if (count > 0 && bytes + stored_size > max_bytes) {
      limited = true;
      break;
    }
    auto stored = Materialize(lsn, value, buf);
    if (!stored.ok()) return stored.status();
    auto rec = DecodeRecord(group_id_, lsn, *stored);
    if (!rec.ok()) return RecordError(lsn, value, rec.status());
    if (absl::Status st = fn(lsn, *stored); !st.ok()) return st;
    bytes += stored_size;
    ++count;
    ++expect;
  }
  if (!it->status().ok()) {
    return FromRocks(it->status(),
                     fmt::format("group {}: reading log record LSN {}", name_, expect));
  }
  // The range ended early: records the log says it holds are not there.
  if (!limited && expect <= to) return missing(fmt::format("the log should reach LSN {}", to));
  return absl::OkStatus();
}

absl::Status GroupLog::Verify() const {
  const GroupLogState s = State();
  size_t h = 0;  // index of the epoch a record must belong to
  return ReadRange(s.first_lsn, s.last_lsn, [&](const LogRecordView& r) {
    while (h + 1 < s.history.size() && s.history[h + 1].first_lsn <= r.lsn) ++h;
    const uint64_t want =
        s.history.empty() || s.history[0].first_lsn > r.lsn ? 0 : s.history[h].epoch;
    if (r.header.epoch != want) {
      return absl::DataLossError(
          fmt::format("group {}: record LSN {} has epoch {} but the history puts it in epoch {}",
                      name_, r.lsn, r.header.epoch, want));
    }
    return absl::OkStatus();
  });
}

// ---------------------------------------------------------------------------------------------------
// GroupLog: metadata, retention

absl::Status GroupLog::BeginEpoch(uint64_t epoch) {
  std::lock_guard lock(mu_);
  const uint64_t newest = pending_epoch_.value_or(current_epoch_);
  if (epoch <= newest) {
    return absl::FailedPreconditionError(
        fmt::format("group {}: epoch {} is not newer than epoch {}", name_, epoch, newest));
  }
  pending_epoch_ = epoch;
  return absl::OkStatus();
}

absl::Status GroupLog::SetAppliedLsn(uint64_t lsn) {
  // The applied LSN must never be durable in the WAL while a payload at or below it is not (a log
  // cut below it at open refuses to start): the payloads and their mark go first.
  if (absl::Status st = SyncPayloads(); !st.ok()) {
    health_->Fail(st);
    FailQueued(st);
    return st;
  }
  {
    std::lock_guard lock(mu_);
    if (lsn > last_lsn_.load()) {
      return absl::InvalidArgumentError(fmt::format(
          "group {}: applied LSN {} is beyond the last LSN {}", name_, lsn, last_lsn_.load()));
    }
    if (lsn <= applied_lsn_) return absl::OkStatus();
    applied_lsn_ = lsn;
    meta_dirty_ = true;
  }
  cv_.notify_one();
  return absl::OkStatus();
}

absl::Status GroupLog::SetPeerPosition(const PeerPosition& position) {
  {
    std::lock_guard lock(mu_);
    peers_[position.peer] = position;
    meta_dirty_ = true;
  }
  cv_.notify_one();
  return absl::OkStatus();
}

absl::Status GroupLog::RemovePeer(const std::string& peer) {
  std::lock_guard lock(mu_);
  if (peers_.erase(peer) == 0) return absl::OkStatus();
  rocksdb::Status s = GatedWal(health_, StoreHealth::Call::kWrite, [&] {
    return db_->Delete(rocksdb::WriteOptions(), MetaKey(group_id_, 'p', peer));
  });
  absl::Status st = FromRocks(s, fmt::format("group {}: removing peer {}", name_, peer));
  if (!st.ok()) health_->Fail(st);
  return st;
}

absl::Status GroupLog::SetReplicaMeta(const ReplicaMeta& meta) {
  // Serialised so two callers' writes land in the order of their in-memory updates.
  std::lock_guard write_lock(replica_meta_write_mu_);
  rocksdb::WriteOptions wo;
  wo.sync = true;
  rocksdb::Status s = GatedWal(health_, StoreHealth::Call::kWrite, [&] {
    return db_->Put(wo, MetaKey(group_id_, 'r'), EncodeReplicaMeta(meta));
  });
  if (!s.ok()) {
    absl::Status st = FromRocks(s, fmt::format("group {}: writing replica metadata", name_));
    health_->Fail(st);
    FailQueued(st);
    return st;
  }
  std::lock_guard lock(mu_);
  replica_meta_ = meta;
  return absl::OkStatus();
}

absl::Status GroupLog::ValidateHistory(const std::vector<EpochStart>& history,
                                       uint64_t next_lsn) const {
  for (size_t i = 0; i < history.size(); ++i) {
    const EpochStart& e = history[i];
    const bool ordered =
        i == 0 || (e.epoch > history[i - 1].epoch && e.first_lsn > history[i - 1].first_lsn);
    if (e.epoch == 0 || e.first_lsn == 0 || e.first_lsn >= next_lsn || !ordered) {
      return absl::InvalidArgumentError(fmt::format(
          "group {}: history entry {} (epoch {} from LSN {}) is not a valid history of the "
          "records before LSN {}",
          name_, i, e.epoch, e.first_lsn, next_lsn));
    }
  }
  return absl::OkStatus();
}

absl::Status GroupLog::WaitIdleLocked(std::unique_lock<std::mutex>& lock, std::string_view what) {
  // A batch being written or a sync in flight would move last/durable afterwards: wait for them
  // (they finish on their own; an fsync not yet due is done now). Queued records are the caller's
  // to stop.
  if (!sync_jobs_.empty()) {
    sync_expedite_ = true;
    sync_cv_.notify_one();
  }
  idle_cv_.wait(lock, [&] {
    return !failed_.ok() || stopping_ || !queue_.empty() ||
           (!committing_ && sync_waiters_.empty() && inline_syncs_ == 0 && !syncing_ &&
            sync_jobs_.empty());
  });
  if (!failed_.ok()) return failed_;
  if (stopping_) return absl::UnavailableError(fmt::format("group {}: log is stopping", name_));
  if (!queue_.empty()) {
    return absl::FailedPreconditionError(
        fmt::format("group {}: cannot {} while records are queued (LSN {}..{}); stop the appends "
                    "first",
                    name_, what, queue_.front().lsn, queue_.back().lsn));
  }
  return health_->status();
}

absl::Status GroupLog::CutBackTo(uint64_t fork_lsn, uint64_t expected_last_lsn,
                                 std::vector<EpochStart> history, const ReplicaMeta& meta) {
  if (fork_lsn == UINT64_MAX) {
    return absl::InvalidArgumentError(
        fmt::format("group {}: cannot cut at LSN {}", name_, fork_lsn));
  }
  if (absl::Status st = ValidateHistory(history, fork_lsn + 1); !st.ok()) return st;
  std::lock_guard write_lock(replica_meta_write_mu_);
  std::unique_lock lock(mu_);
  if (absl::Status st = WaitIdleLocked(lock, fmt::format("cut the log back to LSN {}", fork_lsn));
      !st.ok()) {
    return st;
  }
  const uint64_t last = last_lsn_.load();
  if (last != expected_last_lsn) {
    return absl::FailedPreconditionError(
        fmt::format("group {}: cannot cut the log back to LSN {}: it ends at LSN {}, not at the "
                    "LSN {} the caller saved up to",
                    name_, fork_lsn, last, expected_last_lsn));
  }
  if (fork_lsn >= last) {
    return absl::InvalidArgumentError(fmt::format(
        "group {}: cannot cut the log back to LSN {}: it ends at LSN {}", name_, fork_lsn, last));
  }
  // The segments that end at or before the fork stay; the rest is dropped and the open segment
  // rebuilt from the records that remain after the last closed one.
  std::deque<Segment> segments = segments_;
  rocksdb::WriteBatch wb;
  while (!segments.empty() && segments.back().last_lsn > fork_lsn) {
    const Segment& seg = segments.back();
    if (segments.size() < segments_.size() || seg.first_lsn != segments_.back().first_lsn) {
      wb.Delete(MetaKey(group_id_, 's', seg.first_lsn));  // a closed one
    }
    segments.pop_back();
  }
  const uint64_t first = std::min(first_lsn_, fork_lsn + 1);
  const uint64_t open_from = segments.empty() ? first : segments.back().last_lsn + 1;
  uint64_t bytes = 0;
  for (const Segment& seg : segments) bytes += seg.bytes;
  auto open = ScanSegment(open_from, fork_lsn);
  if (!open.ok()) return open.status();
  bytes += open->bytes;
  segments.push_back(*open);
  wb.DeleteRange(EncodeLogKey(group_id_, fork_lsn + 1), EncodeLogKey(group_id_, UINT64_MAX));
  wb.DeleteRange(MetaKey(group_id_, 'h'), MetaKey(group_id_, 'h' + 1));
  for (const EpochStart& e : history) wb.Put(MetaKey(group_id_, 'h', e.epoch), U64s({e.first_lsn}));
  wb.Put(MetaKey(group_id_, 'f'), U64s({first}));
  wb.Put(MetaKey(group_id_, 'r'), EncodeReplicaMeta(meta));
  // The payload sync mark must not cover the LSNs above the fork that new records will take. The
  // payload files keep their bytes (the open segment's file is appended to after them); files of
  // segments that begin after the fork hold only cut records and go after the write.
  std::unique_lock payload_lock(payload_sync_mu_);
  const uint64_t mark = std::min(payload_mark_, fork_lsn);
  wb.Put(MetaKey(group_id_, 'y'), U64s({mark}));
  const uint64_t old_applied = applied_lsn_;
  applied_lsn_ = std::min(applied_lsn_, fork_lsn);
  (void)WriteMetaLocked(&wb);  // the applied LSN (and peers) with the cut
  rocksdb::WriteOptions wo;
  wo.sync = true;
  rocksdb::Status s =
      GatedWal(health_, StoreHealth::Call::kWrite, [&] { return db_->Write(wo, &wb); });
  if (!s.ok()) {
    applied_lsn_ = old_applied;
    absl::Status st =
        FromRocks(s, fmt::format("group {}: cutting the log back to LSN {}", name_, fork_lsn));
    health_->Fail(st);
    if (failed_.ok()) failed_ = st;  // nothing is queued, so nothing else to fail
    return st;
  }
  payload_mark_ = mark;
  payload_synced_lsn_ = std::min(payload_synced_lsn_, fork_lsn);
  payload_written_lsn_.store(std::min(payload_written_lsn_.load(), fork_lsn),
                             std::memory_order_release);
  payload_lock.unlock();
  const uint64_t open_first = segments.back().first_lsn;
  if (absl::Status rm = payloads_->RemoveIf([&](uint64_t id) { return id > open_first; });
      !rm.ok()) {
    spdlog::warn("group {}: cutting the log back to LSN {}: {}", name_, fork_lsn,
                 std::string(rm.message()));
  }
  meta_dirty_ = false;
  first_lsn_ = first;
  first_lsn_seen_.store(first, std::memory_order_release);
  next_lsn_ = fork_lsn + 1;
  current_epoch_ = history.empty() ? 0 : history.back().epoch;
  pending_epoch_.reset();
  history_ = std::move(history);
  segments_ = std::move(segments);
  bytes_ = bytes;
  replica_meta_ = meta;
  last_lsn_.store(fork_lsn, std::memory_order_release);
  durable_lsn_.store(fork_lsn, std::memory_order_release);
  lock.unlock();
  std::lock_guard notify_lock(notify_mu_);
  notified_lsn_ = fork_lsn;  // later advances are reported from here
  return absl::OkStatus();
}

absl::Status GroupLog::ResetForCopy(uint64_t log_start_lsn, std::vector<EpochStart> history,
                                    const std::optional<ReplicaMeta>& meta) {
  if (log_start_lsn == 0 || log_start_lsn == UINT64_MAX) {
    return absl::InvalidArgumentError(
        fmt::format("group {}: cannot start the log at LSN {}", name_, log_start_lsn));
  }
  if (absl::Status st = ValidateHistory(history, log_start_lsn); !st.ok()) return st;
  std::lock_guard write_lock(replica_meta_write_mu_);
  std::unique_lock lock(mu_);
  if (absl::Status st = WaitIdleLocked(lock, "reset the log for a full copy"); !st.ok()) return st;
  const uint64_t last = log_start_lsn - 1;
  rocksdb::WriteBatch wb;
  wb.DeleteRange(EncodeLogKey(group_id_, 0), EncodeLogKey(group_id_, UINT64_MAX));
  wb.DeleteRange(MetaKey(group_id_, 'h'), MetaKey(group_id_, 'h' + 1));
  wb.DeleteRange(MetaKey(group_id_, 's'), MetaKey(group_id_, 's' + 1));
  for (const EpochStart& e : history) wb.Put(MetaKey(group_id_, 'h', e.epoch), U64s({e.first_lsn}));
  wb.Put(MetaKey(group_id_, 'f'), U64s({log_start_lsn}));
  if (meta) wb.Put(MetaKey(group_id_, 'r'), EncodeReplicaMeta(*meta));
  // No payload below the new start is referenced any more (its files go after the write).
  std::unique_lock payload_lock(payload_sync_mu_);
  wb.Put(MetaKey(group_id_, 'y'), U64s({last}));
  const uint64_t old_applied = applied_lsn_;
  applied_lsn_ = last;
  (void)WriteMetaLocked(&wb);  // the applied LSN (and peers) with the reset
  rocksdb::WriteOptions wo;
  wo.sync = true;
  rocksdb::Status s =
      GatedWal(health_, StoreHealth::Call::kWrite, [&] { return db_->Write(wo, &wb); });
  if (!s.ok()) {
    applied_lsn_ = old_applied;
    absl::Status st = FromRocks(
        s, fmt::format("group {}: resetting the log to start at LSN {}", name_, log_start_lsn));
    health_->Fail(st);
    if (failed_.ok()) failed_ = st;  // nothing is queued, so nothing else to fail
    return st;
  }
  payload_mark_ = payload_synced_lsn_ = last;
  payload_written_lsn_.store(last, std::memory_order_release);
  payload_lock.unlock();
  if (absl::Status rm = payloads_->RemoveAll(); !rm.ok()) {
    spdlog::warn("group {}: reset for a full copy: {}", name_, std::string(rm.message()));
  }
  meta_dirty_ = false;
  first_lsn_ = log_start_lsn;
  first_lsn_seen_.store(log_start_lsn, std::memory_order_release);
  next_lsn_ = log_start_lsn;
  current_epoch_ = history.empty() ? 0 : history.back().epoch;
  pending_epoch_.reset();
  history_ = std::move(history);
  segments_.clear();
  segments_.push_back(Segment{log_start_lsn, last, 0, 0, 0});
  bytes_ = 0;
  if (meta) replica_meta_ = *meta;
  last_lsn_.store(last, std::memory_order_release);
  durable_lsn_.store(last, std::memory_order_release);
  lock.unlock();
  std::lock_guard notify_lock(notify_mu_);
  notified_lsn_ = last;  // later advances are reported from here
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> GroupLog::EnforceRetention(uint64_t now_ns) {
  uint64_t truncate_to = 0;
  {
    std::lock_guard lock(mu_);
    const RetentionOptions& r = options_.retention;
    uint64_t needed_by_peers = UINT64_MAX;
    for (const auto& [name, p] : peers_) {
      if (!p.needs_full_copy) needed_by_peers = std::min(needed_by_peers, p.durable_lsn + 1);
    }
    const uint64_t applied_floor = applied_lsn_ + 1;
    uint64_t remaining = bytes_;
    size_t drop = 0;
    // Closed segments only (the open one is last), oldest first.
    for (size_t i = 0; i + 1 < segments_.size(); ++i) {
      const Segment& seg = segments_[i];
      if (seg.last_lsn >= applied_floor) break;  // never drop what the volumes do not hold yet
      const bool over_cap = r.hard_cap_bytes != 0 && remaining > r.hard_cap_bytes;
      const bool peers_done = seg.last_lsn < needed_by_peers;
      const bool kept_by_size = r.keep_bytes != 0 && remaining - seg.bytes < r.keep_bytes;
      const bool kept_by_age =
          r.keep_seconds != 0 && seg.last_timestamp_ns + r.keep_seconds * 1000000000ull > now_ns;
      if (!over_cap && (!peers_done || kept_by_size || kept_by_age)) break;
      remaining -= seg.bytes;
      drop = i + 1;
    }
    if (drop == 0) return first_lsn_;
    truncate_to = segments_[drop - 1].last_lsn + 1;
    for (auto& [name, p] : peers_) {
      if (!p.needs_full_copy && p.durable_lsn + 1 < truncate_to) {
        p.needs_full_copy = true;  // persisted with the truncation below
        meta_dirty_ = true;
      }
    }
  }
  if (absl::Status st = TruncateBefore(truncate_to); !st.ok()) return st;
  return truncate_to;
}

absl::Status GroupLog::TruncateBefore(uint64_t lsn) {
  std::unique_lock lock(mu_);
  if (lsn <= first_lsn_) return absl::OkStatus();
  if (lsn > applied_lsn_ + 1) {
    return absl::FailedPreconditionError(fmt::format(
        "group {}: truncating below LSN {} would drop records not yet applied (applied LSN {})",
        name_, lsn, applied_lsn_));
  }
  rocksdb::WriteBatch wb;
  wb.DeleteRange(EncodeLogKey(group_id_, first_lsn_), EncodeLogKey(group_id_, lsn));
  wb.Put(MetaKey(group_id_, 'f'), U64s({lsn}));
  while (segments_.size() > 1 && segments_.front().last_lsn < lsn) {
    wb.Delete(MetaKey(group_id_, 's', segments_.front().first_lsn));
    bytes_ -= segments_.front().bytes;
    segments_.pop_front();
  }
  // The applied LSN goes with the truncation, so the log never starts above an older checkpoint.
  (void)WriteMetaLocked(&wb);
  meta_dirty_ = false;
  const uint64_t keep_from = segments_.front().first_lsn;
  rocksdb::Status s = GatedWal(health_, StoreHealth::Call::kWrite,
                               [&] { return db_->Write(rocksdb::WriteOptions(), &wb); });
  if (!s.ok()) {
    absl::Status st = FromRocks(s, fmt::format("group {}: truncating below LSN {}", name_, lsn));
    health_->Fail(st);
    return st;
  }
  first_lsn_ = lsn;
  first_lsn_seen_.store(lsn, std::memory_order_release);
  lock.unlock();
  // The payload files of the segments dropped (every record in them is below the first segment)
  // go, or are recycled and overwritten, only once the truncation is durable: a power cut that
  // lost it would bring back records whose payloads are gone. The WAL is synced here, outside mu_,
  // so appends do not wait for it; only when there are such files.
  auto files = payloads_->List();
  if (!files.ok()) return files.status();
  if (files->empty() || files->front() >= keep_from) return absl::OkStatus();
  s = GatedWal(health_, StoreHealth::Call::kWrite, [&] { return db_->FlushWAL(/*sync=*/true); });
  if (!s.ok()) {
    absl::Status st = FromRocks(s, fmt::format("group {}: truncating below LSN {}", name_, lsn));
    health_->Fail(st);
    return st;
  }
  return payloads_->RemoveIf([&](uint64_t id) { return id < keep_from; });
}

}  // namespace tvilling::storage
