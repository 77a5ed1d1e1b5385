// group_log.h: the ordered, durable log of a consistency group, kept in an embedded RocksDB.
//
// One LogStore (one RocksDB instance under the agent's state directory) holds the logs of all the
// agent's groups. Each GroupLog gives its records dense LSNs starting at 1 and commits them with
// group commit: appends from any thread go to a queue, one committer thread per group turns
// everything queued into one WriteBatch and one write, and fsyncs only when someone waits for
// durability (FLUSH, FUA, a sync peer). `last_lsn` is what is in the log (the page cache),
// `durable_lsn` what is fsynced.
//
// Metadata that must agree with the records (epoch history, the applied LSN, peer positions, the
// segment index used for retention) lives in the same RocksDB and is written in the same WriteBatch
// as the records it describes.
//
// Thread safety: every public method may be called from any thread, except where noted.
#pragma once

#include <absl/functional/any_invocable.h>
#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "storage/bytes.h"
#include "storage/log_record.h"

namespace rocksdb {
class DB;
class Env;
struct Options;
}  // namespace rocksdb

namespace tvilling::storage {

class GroupLog;
struct GroupLogOptions;

// The first write error of a RocksDB instance. RocksDB refuses (and, in Debian's build with
// assertions on, aborts on) WAL writes and syncs after a failed one, so once any group's write
// fails, no group of the store writes or syncs again until the agent restarts.
class StoreHealth {
 public:
  absl::Status status() const {
    std::lock_guard lock(mu_);
    return failed_;
  }
  void Fail(const absl::Status& s) {
    std::lock_guard lock(mu_);
    if (failed_.ok()) failed_ = s;
  }

 private:
  mutable std::mutex mu_;
  absl::Status failed_;
};

struct LogStoreOptions {
  std::filesystem::path dir;  // the RocksDB directory; created if missing
  // Memtable size. Records that are applied and truncated before their memtable is flushed are
  // never written to an SST, so the log costs one write (the WAL) per byte when peers keep up.
  uint64_t write_buffer_bytes = 256ull << 20;
  int max_write_buffers = 3;
  // WAL files reused after their memtable is flushed: appends then overwrite blocks that are
  // already allocated (and often cached) instead of growing a new file, which makes buffered WAL
  // writes several times faster and fsyncs cheaper (no size change to journal). 0 = off.
  int recycle_wal_files = 4;
  // For tests: an Env that can drop unsynced data. nullptr = rocksdb::Env::Default().
  rocksdb::Env* env = nullptr;
};

// The RocksDB options the log store runs with (also the baseline of bench/log_append_bench).
void ConfigureRocksOptions(const LogStoreOptions& options, rocksdb::Options* out);

class LogStore {
 public:
  static absl::StatusOr<std::unique_ptr<LogStore>> Open(const LogStoreOptions& options);
  // Stops every group's committer (finishing what is queued) and closes RocksDB.
  ~LogStore();
  LogStore(const LogStore&) = delete;
  LogStore& operator=(const LogStore&) = delete;

  // Opens the log of `group`, creating it on first use. The GroupLog lives as long as the store.
  // Fails if the group is already open.
  absl::StatusOr<GroupLog*> OpenGroup(const std::string& group, const GroupLogOptions& options);

  rocksdb::DB* db() { return db_.get(); }
  const std::filesystem::path& dir() const { return dir_; }

 private:
  LogStore() = default;
  std::filesystem::path dir_;
  std::unique_ptr<rocksdb::DB> db_;
  StoreHealth health_;
  std::mutex mu_;
  std::map<std::string, std::unique_ptr<GroupLog>> groups_;
};

struct RetentionOptions {
  // Keep at least this many bytes / seconds of records even when nobody needs them any more
  // (a short history for peers that reconnect and for point-in-time inspection). 0 = none.
  uint64_t keep_bytes = 0;
  uint64_t keep_seconds = 0;
  // Above this size records are dropped even if a peer still needs them; such a peer is marked as
  // needing a full copy. 0 = no cap.
  uint64_t hard_cap_bytes = 0;
};

struct GroupLogOptions {
  // A batch is cut at whichever limit comes first.
  uint64_t max_batch_bytes = 8ull << 20;
  uint32_t max_batch_records = 4096;
  // Segments are the unit of retention: truncation removes whole segments with one range delete.
  uint64_t segment_bytes = 16ull << 20;
  uint32_t segment_records = 65536;
  // A Sync() that finds the log idle (nothing queued, no batch being written) fsyncs on the
  // caller's thread, saving two thread hand-offs on a FLUSH at queue depth 1; otherwise the
  // committer does it.
  bool sync_inline_when_idle = true;
  RetentionOptions retention;
  // Called on the committer thread after a batch is in the log (written, maybe not yet fsynced),
  // with the batch's records in LSN order, before any append callback of the batch runs. The
  // primary uses it to apply writes to its volume, so a completed write is visible to reads. An
  // error fails the batch's appends with that error (the records stay in the log and are applied
  // again at replay).
  std::function<absl::Status(std::span<const LogRecordView> records)> on_batch_written;
};

struct AppendRequest {
  RecordType type = RecordType::kWrite;
  uint16_t flags = 0;  // kRecordFlag*
  uint32_t volume = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
  Bytes payload;              // size == length for kWrite, empty otherwise
  bool sync = false;          // complete only once the record is fsynced (FUA)
  uint64_t timestamp_ns = 0;  // 0 = now (CLOCK_REALTIME)
};

struct EpochStart {
  uint64_t epoch = 0;
  uint64_t first_lsn = 0;
  bool operator==(const EpochStart&) const = default;
};

struct PeerPosition {
  std::string peer;
  uint64_t received_lsn = 0;
  uint64_t durable_lsn = 0;
  uint64_t applied_lsn = 0;
  bool needs_full_copy = false;
  bool operator==(const PeerPosition&) const = default;
};

// What the log knows about itself; a consistent snapshot.
struct GroupLogState {
  uint32_t group_id = 0;
  uint64_t first_lsn = 0;  // oldest record still held (last_lsn + 1 when empty)
  uint64_t last_lsn = 0;
  uint64_t durable_lsn = 0;
  uint64_t applied_lsn = 0;  // checkpoint: the volumes hold every record <= this, durably
  uint64_t current_epoch = 0;
  uint64_t bytes = 0;  // stored bytes of records first..last (values, keys not counted)
  std::vector<EpochStart> history;
  std::vector<PeerPosition> peers;
};

class GroupLog {
 public:
  using AppendDone = absl::AnyInvocable<void(absl::StatusOr<uint64_t> lsn) &&>;
  using SyncDone = absl::AnyInvocable<void(absl::Status) &&>;

  GroupLog(const GroupLog&) = delete;
  GroupLog& operator=(const GroupLog&) = delete;
  ~GroupLog();

  const std::string& name() const { return name_; }
  uint32_t group_id() const { return group_id_; }

  // Queues a record. `done` runs on the committer thread with the record's LSN once it is in the
  // log (and fsynced if req.sync), or with the error that kept it out.
  void Append(AppendRequest req, AppendDone done);
  // `done` runs once every record appended before this call is fsynced.
  void Sync(SyncDone done);

  uint64_t last_lsn() const { return last_lsn_.load(std::memory_order_acquire); }
  uint64_t durable_lsn() const { return durable_lsn_.load(std::memory_order_acquire); }
  GroupLogState State() const;

  // Calls `fn` for each record in [from_lsn, to_lsn] in order, verifying each checksum, until `fn`
  // returns an error or the range ends. A record that is missing or corrupt is a DataLoss error
  // naming the group and LSN. REQUIRES: first_lsn <= from_lsn.
  absl::Status ReadRange(uint64_t from_lsn, uint64_t to_lsn,
                         const std::function<absl::Status(const LogRecordView&)>& fn) const;

  // Scans every record from first to last: checksums, no gap, epochs follow the history.
  absl::Status Verify() const;

  // Epochs. The next record appended starts `epoch` (> current); the history entry is written in
  // the same batch as that record.
  absl::Status BeginEpoch(uint64_t epoch);

  // Checkpoints. Written with the next batch (or now, if idle); durable with the next sync.
  absl::Status SetAppliedLsn(uint64_t lsn);
  absl::Status SetPeerPosition(const PeerPosition& position);
  absl::Status RemovePeer(const std::string& peer);

  // Drops whole segments that retention allows to drop: below the applied LSN and every peer's
  // durable LSN, beyond keep_bytes/keep_seconds; past hard_cap_bytes also segments a peer needs
  // (that peer is then marked needs_full_copy). Returns the new first LSN.
  absl::StatusOr<uint64_t> EnforceRetention(uint64_t now_ns);
  // Removes every record below `lsn` (one range delete). The caller vouches nobody needs them.
  absl::Status TruncateBefore(uint64_t lsn);

  // Stops the committer after draining the queue. Later appends fail with Unavailable.
  void Stop();

 private:
  friend class LogStore;
  struct Pending {
    uint64_t lsn = 0;
    bool starts_epoch = false;
    RecordHeader header;  // encoded by Append, with its checksum
    std::array<char, kRecordHeaderSize> encoded;
    AppendRequest req;
    AppendDone done;
  };
  struct Segment {
    uint64_t first_lsn = 0;
    uint64_t last_lsn = 0;
    uint64_t bytes = 0;
    uint64_t first_timestamp_ns = 0;
    uint64_t last_timestamp_ns = 0;
  };

  GroupLog(rocksdb::DB* db, StoreHealth* health, std::string name, uint32_t group_id,
           GroupLogOptions options);
  absl::Status Load();
  struct SyncWaiter {
    uint64_t target_lsn;
    SyncDone done;
  };
  void CommitterLoop();
  // Fsyncs the WAL now and advances durable_lsn to `target` (already written). Any thread.
  absl::Status SyncWritten(uint64_t target);
  // durable_lsn = max(durable_lsn, lsn): the committer and an inline Sync() may both advance it.
  void AdvanceDurable(uint64_t lsn);
  // Writes one batch (records, metadata, fsync if asked); completes what it covers.
  void Commit(std::vector<Pending>& batch, std::vector<SyncWaiter>& syncs, bool write_meta);
  absl::Status WriteMetaLocked(
      void* write_batch);  // REQUIRES: mu_ held; write_batch: rocksdb::WriteBatch*
  // Makes the log refuse further appends and fails everything queued (callbacks run unlocked).
  void FailQueued(absl::Status status);

  rocksdb::DB* const db_;
  StoreHealth* const health_;
  const std::string name_;
  const uint32_t group_id_;
  const GroupLogOptions options_;

  std::atomic<uint64_t> last_lsn_{0};
  std::atomic<uint64_t> durable_lsn_{0};

  mutable std::mutex mu_;  // guards everything below
  std::condition_variable cv_;
  std::deque<Pending> queue_;
  std::vector<SyncWaiter> sync_waiters_;
  absl::Status failed_;  // sticky: once the log cannot be written, every later append fails with it
  uint64_t next_lsn_ = 1;  // assigned at enqueue, so the queue is in LSN order
  bool stopping_ = false;
  bool committing_ = false;  // the committer is between taking a batch and completing it
  bool meta_dirty_ = false;
  uint64_t first_lsn_ = 1;
  uint64_t applied_lsn_ = 0;
  uint64_t current_epoch_ = 0;
  std::optional<uint64_t> pending_epoch_;
  std::vector<EpochStart> history_;
  std::map<std::string, PeerPosition> peers_;
  std::deque<Segment> segments_;  // closed segments, oldest first, then the open one
  uint64_t bytes_ = 0;
  std::thread committer_;
};

}  // namespace tvilling::storage
