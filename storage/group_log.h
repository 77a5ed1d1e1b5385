// group_log.h: the ordered, durable log of a consistency group, kept in an embedded RocksDB.
//
// One LogStore (one RocksDB instance under the agent's state directory) holds the logs of all the
// agent's groups. Each GroupLog gives its records dense LSNs starting at 1 and commits them with
// group commit: appends from any thread go to a queue, one committer thread per group turns
// everything queued into one WriteBatch and one write, and a syncer thread per group fsyncs only
// when someone waits for durability (FLUSH, FUA, a sync peer), while the committer writes on.
// `last_lsn` is what is in the log (the page cache), `durable_lsn` what is fsynced.
//
// Metadata that must agree with the records (epoch history, the applied LSN, peer positions, the
// segment index used for retention) lives in the same RocksDB and is written in the same WriteBatch
// as the records it describes.
//
// Thread safety: every public method may be called from any thread, except where noted.
#pragma once

#include <absl/functional/any_invocable.h>
#include <absl/functional/function_ref.h>
#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
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
#include <string_view>
#include <thread>
#include <vector>

#include "storage/bytes.h"
#include "storage/latency_histogram.h"
#include "storage/log_record.h"
#include "storage/payload_files.h"

namespace rocksdb {
class DB;
class Env;
struct Options;
class Status;
}  // namespace rocksdb

namespace tvilling::storage {

class GroupLog;
struct GroupLogOptions;

// The first write error of a RocksDB instance, and the gate every call that writes or syncs its
// WAL goes through. RocksDB refuses (and Debian's build, which keeps its assertions, aborts on) a
// WAL sync that finds a failed write on the WAL it is about to sync (WritableFileWriter::
// SyncWithoutFlush checks the writer's error just before its fsync), and a failure is known only
// when the failing call returns. So a sync starts only while no write is in flight, a write waits
// while a sync waits (a stream of writes from several groups cannot starve the syncs) and while an
// entered sync has not yet reached the fsync of the newest WAL (past every check it makes: the
// store's WAL files report that moment, WalSyncStarting), and nothing starts once a call failed.
// Syncs go one at a time, so a sync waiting for another's fsync holds no write back. A write may
// overlap the fsync itself: RocksDB supports that, and it is what lets the committer write the
// next batch while the syncer fsyncs this one. Once any group's WAL call fails, no group
// of the store writes or syncs again until the agent restarts.
class StoreHealth {
 public:
  enum class Call { kWrite, kSync };

  // OK, or the first failure: the one a caller reported with Fail(), else that a WAL call failed
  // (between its return and its caller's Fail()).
  absl::Status status() const {
    std::lock_guard lock(mu_);
    return StatusLocked();
  }
  // Records the first failure (and says once, in the agent's log, what it means for writes).
  void Fail(const absl::Status& s);

  // Before a WAL call: OK, and then Leave() is due after the call; or the earlier failure, and
  // the call must not be made. One kSync at a time (RocksDB runs one SyncWAL at a time anyway; one
  // waiting for another holds no write back); it then waits for the writes in flight. A kWrite
  // waits from then until the kSync reaches its fsync (WalSyncStarting, on the kSync's thread) or
  // leaves.
  absl::Status Enter(Call call) {
    std::unique_lock lock(mu_);
    if (call == Call::kWrite) {
      cv_.wait(lock, [&] { return !sync_ || sync_at_fsync_ || call_failed_; });
      if (call_failed_) return StatusLocked();
      ++writes_;
      return absl::OkStatus();
    }
    cv_.wait(lock, [&] { return !sync_ || call_failed_; });
    if (call_failed_) return StatusLocked();
    sync_ = true;
    sync_at_fsync_ = false;
    ++syncs_waiting_;
    cv_.wait(lock, [&] { return writes_ == 0 || call_failed_; });
    --syncs_waiting_;
    absl::Status st = StatusLocked();
    if (st.ok()) {
      checking_sync_ = this;
    } else {
      sync_ = false;
    }
    lock.unlock();
    cv_.notify_all();
    return st;
  }
  // A sync of the store's newest WAL file starts on this thread: if it is the sync this thread
  // entered (Enter(kSync)), it is past RocksDB's checks, and writes may go on beside its fsync.
  void WalSyncStarting() {
    if (checking_sync_ != this) return;
    checking_sync_ = nullptr;
    {
      std::lock_guard lock(mu_);
      sync_at_fsync_ = true;
    }
    cv_.notify_all();
  }
  int syncs_waiting() const {
    std::lock_guard lock(mu_);
    return syncs_waiting_;
  }
  void Leave(Call call, bool ok) {
    {
      std::lock_guard lock(mu_);
      if (call == Call::kWrite) {
        --writes_;
      } else {
        sync_ = false;
        sync_at_fsync_ = false;
        if (checking_sync_ == this) checking_sync_ = nullptr;  // it never reached the newest WAL
      }
      if (!ok) call_failed_ = true;
    }
    cv_.notify_all();
  }

  // For tests: called on the syncing thread after a sync entered the gate, before its RocksDB
  // call (LogStoreOptions::before_wal_sync).
  std::function<void()> before_wal_sync;

 private:
  absl::Status StatusLocked() const {
    if (!failed_.ok() || !call_failed_) return failed_;
    return absl::InternalError("a write or sync of the log store failed");
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  absl::Status failed_;
  bool call_failed_ = false;
  int writes_ = 0;              // WAL writes in flight
  int syncs_waiting_ = 0;       // a sync waiting for them to finish (0 or 1)
  bool sync_ = false;           // a sync is waiting for writes or running
  bool sync_at_fsync_ = false;  // and has reached the newest WAL's fsync
  // The store whose gate this thread's sync entered and that has not yet reached that fsync.
  static inline thread_local const StoreHealth* checking_sync_ = nullptr;
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
  // For tests: runs on the syncing thread each time a WAL sync has passed the store's gate
  // (StoreHealth), just before RocksDB's SyncWAL.
  std::function<void()> before_wal_sync;
};

// The size of the memtable's arena blocks for a memtable of `write_buffer_bytes` (the allocation
// RocksDB makes as a memtable fills; what agent/allocator.h keeps resident through a quiet spell).
inline uint64_t MemtableBlockBytes(uint64_t write_buffer_bytes) {
  return std::min<uint64_t>(32ull << 20, write_buffer_bytes / 4);
}

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
  StoreHealth health_;
  // RocksDB's file system with the WAL files reporting their syncs to health_ (WalSyncFs in
  // group_log.cc); outlives db_.
  std::unique_ptr<rocksdb::Env> env_;
  std::unique_ptr<rocksdb::DB> db_;
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
  // A record whose payload has at least this many bytes keeps it in the payload file of its
  // segment (`<store dir>/payload/<group id>/`), appended with one pwritev per batch, and RocksDB
  // holds only its header and a 16-byte reference (docs/log-format.md, "External payloads"): the
  // payload then costs one write to disk and no copy through the WriteBatch, WAL (with its
  // software CRC32c), memtable and SST flush. 0 = every payload inline; otherwise it must be more
  // than 16 (kPayloadRefSize). Only new records follow it: either kind is read at any setting.
  uint64_t external_payload_min_bytes = 64ull << 10;
  // Once this many bytes were appended to a payload file since its last writeback, the committer
  // starts writing them back (sync_file_range(SYNC_FILE_RANGE_WRITE): no wait, no fsync), so a log
  // that nobody fsyncs for a while (a primary in async mode) does not leave a segment's worth of
  // dirty pages for the next fsync or the kernel's flusher to push out at once. 0 = never.
  uint64_t payload_writeback_bytes = 1ull << 20;
  // Payload files of dropped segments kept for reuse by new segments (PayloadFiles, "Recycling"):
  // overwriting a file the file system has allocated and the page cache holds costs a fraction
  // of a new one. Each holds about a segment's bytes of disk. 0 = unlink them.
  size_t recycle_payload_files = 4;
  // A Sync() that finds the log idle (nothing queued, no batch being written, no fsync in flight)
  // fsyncs on the caller's thread, saving two thread hand-offs on a FLUSH at queue depth 1;
  // otherwise the syncer does it.
  bool sync_inline_when_idle = true;
  // An AppendReplicated that finds nothing queued and no batch being written commits on the
  // caller's thread (its callback runs there, before AppendReplicated returns) instead of waking
  // the committer.
  bool replicated_inline_when_idle = true;
  // A batch in which every record waits for durability (FUA appends, Sync() callers) is written
  // with a synced write on the committer when the syncer is idle, instead of being handed to it.
  bool sync_on_committer_when_all_durable = true;
  // Appends made under an AppendPlug are written by the plugging thread when the plug is released
  // and the log is idle (no batch being written; the fsync, if one is wanted, stays the syncer's),
  // instead of waking the committer. Off: they wake the committer at the release.
  bool plugged_inline_when_idle = true;
  // A batch of replicated records none of which waits for its fsync completes (the replica's
  // `received`) before on_batch_written applies it: the replica's readers see its volumes only, so
  // nothing needs the apply first, and the primary's sync WRITE no longer waits for it. An error of
  // on_batch_written then fails only the part of a replicated run still to come (GroupRuntime's
  // applier also refuses every later batch once an apply failed). Off: after.
  bool replicated_complete_before_apply = true;
  RetentionOptions retention;
  // Called on the committer thread after a batch is in the log (written, maybe not yet fsynced),
  // with the batch's records in LSN order, before any append callback of the batch runs (except
  // as replicated_complete_before_apply says). The primary uses it to apply writes to its volume,
  // so a completed write is visible to reads. An error fails the batch's appends with that error
  // (the records stay in the log and are applied again at replay).
  std::function<absl::Status(std::span<const LogRecordView> records)> on_batch_written;
  // Called every time durable_lsn advances, with the new value, outside the log's mutex. Calls
  // never overlap and their values strictly increase; a call may come from whichever thread
  // advanced durable_lsn (the syncer, a Sync() that fsynced inline) or from one that advanced it
  // concurrently. It may call Append, Sync and any other method. Not called at open (durable_lsn()
  // then equals last_lsn()) nor by ResetForCopy, which moves durable_lsn to a value the caller
  // chose. The replica acknowledges `durable` from it, the primary feeds its core with it.
  std::function<void(uint64_t durable_lsn)> on_durable;
  // Called by the payload syncer before each round of payload fdatasyncs it runs beside a WAL
  // fsync (tests hold it there to see the two overlap).
  std::function<void()> before_payload_sync;
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

// A byte range of one volume (a rejoin's extents to restore; core::Extent in the log).
struct VolumeExtent {
  uint32_t volume = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  bool operator==(const VolumeExtent&) const = default;
};

// Replication state of the group at this agent (docs/replication.md, "Roles and epochs", "Full
// copy", "Replica"), persisted with a synced write by SetReplicaMeta / ResetForCopy and loaded at
// open. A brand-new log has consistent = false; a primary's own log is consistent by definition,
// which the node decides (this struct only stores what it is told).
struct ReplicaMeta {
  // Newest epoch seen in a Hello: the fence against stale primaries.
  uint64_t newest_epoch_seen = 0;
  bool copy_in_progress = false;  // a full copy began and has not finished
  uint32_t copy_volume = 0;       // where an interrupted copy resumes
  uint64_t copy_offset = 0;
  uint64_t copy_base_lsn = 0;        // L0: the copy's log starts at copy_base_lsn + 1
  uint64_t consistent_at_lsn = 0;    // L1: consistent once the applied LSN reaches it
  bool consistent = false;           // the volumes are a consistent image (at the applied LSN)
  uint64_t primary_epoch = 0;        // the epoch this agent began as primary (0 = never)
  uint64_t copy_epoch = 0;           // the epoch of the stream that began the copy (CopyBegin)
  uint64_t consistent_at_epoch = 0;  // epoch of the record at consistent_at_lsn (core::ReplicaView)
  // Rejoin (docs/replication.md, "Rejoin"): the log was cut back to a fork and the volumes still
  // hold the saved records' data in restore_extents, to be copied from the primary; the resume
  // point is (copy_volume, copy_offset), valid on a stream of restore_epoch.
  bool restore_pending = false;
  uint64_t restore_epoch = 0;
  std::vector<VolumeExtent> restore_extents;
  bool operator==(const ReplicaMeta&) const = default;
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
  ReplicaMeta replica;
};

// Batches the appends one thread makes in one go, such as an NBD connection dispatching the
// requests it has already read: while the thread holds a plug, GroupLog::Append on that thread
// queues its record without waking the committer, and the release writes everything queued in one
// batch on this thread if the log is idle (no batch being written), else wakes the committer. That
// saves the committer's wake-up and the completions' hand-back per burst. A plug must be released
// before the thread blocks or goes on to unrelated work (a coroutine: before it suspends), because
// until then nothing writes those records. Per thread; Engage while engaged is a no-op.
class AppendPlug {
 public:
  static void Engage();
  static void Release();
  static bool Engaged();
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

  // Queues a record. `done` runs with the record's LSN once it is in the log (and fsynced if
  // req.sync), or with the error that kept it out: on the committer thread, or on the syncer thread
  // once a req.sync record is fsynced. So a record without req.sync may complete before an earlier
  // one with it.
  // Under an AppendPlug on this thread, the committer is not woken: the plug's release writes the
  // records (see AppendPlug).
  void Append(AppendRequest req, AppendDone done);
  // `done` runs once every record appended before this call is fsynced.
  // `fsync_here = false` never fsyncs on the caller's thread (the syncer does it), for a caller
  // that must not block, such as a replica's stream, which goes on receiving meanwhile.
  // `within` > 0 (only with fsync_here = false) lets the fsync wait up to that long for more to
  // cover: a replica whose primary does not wait on a batch's durability fsyncs a burst once
  // instead of once per batch. Any sooner fsync (another Sync, a synced append, a WaitIdle)
  // covers it earlier.
  void Sync(SyncDone done, bool fsync_here = true,
            std::chrono::microseconds within = std::chrono::microseconds(0));

  // Replica: appends records shipped from another agent's log of the group. `records` are stored
  // values of the sender's log (its group id `sender_group_id`) for LSNs first_lsn, first_lsn+1,
  // ...; each is verified against that group id and its LSN, then re-encoded with this log's group
  // id, keeping its epoch, flags, timestamp, volume, offset and length, and appended through the
  // queue like any record (on_batch_written sees them). A record with a newer epoch than the log's
  // begins that epoch (history entry in the record's batch). `done` runs with the last LSN once all
  // are in the log (fsynced if `sync`), or with the first error. Nothing is appended when:
  // first_lsn is not the log's next LSN (FailedPrecondition naming both), a record does not verify
  // (DataLoss naming its LSN), or an epoch goes backwards (FailedPrecondition naming the LSN and
  // both epochs). No records: `done` gets first_lsn - 1 (after the same first_lsn check).
  // The payload bytes are copied once, into RocksDB's WriteBatch; `records` keeps its buffer alive
  // until then.
  void AppendReplicated(uint32_t sender_group_id, uint64_t first_lsn, ShippedRecords records,
                        bool sync, AppendDone done);

  // Primary's shipper: calls `fn(lsn, stored_value)` for the records from `from_lsn` up to
  // min(max_lsn, last_lsn()) in order, verifying each (checksum, no gap), stopping before the
  // record that would take the total of stored values past `max_bytes` or the count past
  // `max_records` -- but always handing out at least one record when from_lsn <= min(max_lsn,
  // last_lsn()). Records written but not yet fsynced are included. `stored_value` (header +
  // payload, as ShippedRecords expects) is valid only during the call. from_lsn below the first
  // LSN held is OutOfRange (truncated: the peer needs a full copy); a bad record is DataLoss naming
  // its LSN; an error from `fn` ends the read and is returned.
  absl::Status ReadRaw(
      uint64_t from_lsn, uint64_t max_lsn, uint64_t max_bytes, uint32_t max_records,
      const std::function<absl::Status(uint64_t lsn, std::string_view stored_value)>& fn) const;

  // Replica, full copy: drops every record and starts the log over at `log_start_lsn` (> 0):
  // first_lsn = next LSN = log_start_lsn, last = durable = applied = log_start_lsn - 1, segments
  // dropped, and the history becomes `history`: the copying primary's history up to
  // log_start_lsn - 1 (the records the copy stands for), so later handshakes compare that prefix
  // too. Its entries must have increasing epochs (> 0) and increasing first LSNs in
  // [1, log_start_lsn - 1] (InvalidArgument otherwise); empty when log_start_lsn is 1. The log's
  // current epoch becomes that of the last entry (0 if none): the first record of a newer epoch
  // writes its own entry, as with any AppendReplicated. The history and, if given, `meta` are
  // stored in the same synced WriteBatch as the reset (pass copy_in_progress = true in `meta`, so
  // a crash never leaves a reset log with a `consistent` mark, nor a copy mark on the old log).
  // Waits for a batch being written; REQUIRES nothing queued (FailedPrecondition otherwise: stop
  // what appends first). Peer positions stay.
  absl::Status ResetForCopy(uint64_t log_start_lsn, std::vector<EpochStart> history,
                            const std::optional<ReplicaMeta>& meta = std::nullopt);

  // Replica, rejoin of a diverged log: drops every record after `fork_lsn` (< last_lsn, >= 0) and
  // the history entries that start after it (`history` is the history of the records up to
  // fork_lsn: the log's own, cut, as core::PlanRejoin computes it; the same checks as
  // ResetForCopy's), lowers the applied LSN to at most fork_lsn, and stores `meta`, all in one
  // synced WriteBatch: after a crash the log is either the old one or the cut one with its meta.
  // last = durable = fork_lsn; the log's current epoch becomes that of the last entry. The
  // caller saves the records first (docs/replication.md: nothing accepted is thrown away
  // silently). Waits for a batch being written; REQUIRES nothing queued (FailedPrecondition
  // otherwise). A fork below first_lsn - 1 leaves an empty log starting at fork_lsn + 1.
  // `expected_last_lsn` is the last LSN the caller saved: if the log has grown since (an append
  // that raced the save), nothing is cut (FailedPrecondition naming both LSNs).
  absl::Status CutBackTo(uint64_t fork_lsn, uint64_t expected_last_lsn,
                         std::vector<EpochStart> history, const ReplicaMeta& meta);

  // Replica/role metadata: written with a synced write before SetReplicaMeta returns.
  absl::Status SetReplicaMeta(const ReplicaMeta& meta);
  ReplicaMeta replica_meta() const;

  uint64_t last_lsn() const { return last_lsn_.load(std::memory_order_acquire); }
  uint64_t durable_lsn() const { return durable_lsn_.load(std::memory_order_acquire); }
  // An fsync is running or written records wait for one: a Sync() issued now completes after
  // that fsync and one more, not after one.
  bool SyncBusy() const;
  // Why this log takes no more writes (its own sticky failure, else its store's), or OK.
  absl::Status write_error() const;
  GroupLogState State() const;
  // How long each fsync of this group's log took (the syncer's, an inline Sync()'s, or a synced
  // write on the committer, which includes the write). For the metrics endpoint.
  const LatencyHistogram& fsync_latency() const { return fsync_latency_; }
  // Since open: records and their stored bytes (header + payload) written to this log, and the
  // batches (one RocksDB write each) they went in. On a primary that is what clients wrote; on a
  // replica what it received. For the metrics endpoint (throughput, mean batch size).
  struct Counters {
    std::atomic<uint64_t> records{0};
    std::atomic<uint64_t> bytes{0};
    std::atomic<uint64_t> commits{0};
    std::atomic<uint64_t> payload_syncs{0};  // rounds of payload file fdatasyncs that succeeded
  };
  const Counters& counters() const { return counters_; }
  // The epoch of the newest record queued, or of the last history entry ResetForCopy installed (a
  // BeginEpoch not yet used by a record does not count), and the epoch history. State() has both
  // too.
  uint64_t current_epoch() const;
  std::vector<EpochStart> history() const;

  // Calls `fn` for each record in [from_lsn, to_lsn] in order, verifying each checksum, until `fn`
  // returns an error or the range ends. A record that is missing or corrupt is a DataLoss error
  // naming the group and LSN. REQUIRES: first_lsn <= from_lsn.
  absl::Status ReadRange(uint64_t from_lsn, uint64_t to_lsn,
                         const std::function<absl::Status(const LogRecordView&)>& fn) const;

  // Like ReadRange, for a caller that needs only the headers (sizes, timestamps): external
  // payloads are not read, so their checksums are not checked (inline records' are).
  absl::Status ReadHeaders(
      uint64_t from_lsn, uint64_t to_lsn,
      const std::function<absl::Status(uint64_t lsn, const RecordHeader& header)>& fn) const;

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

  // Stops the committer after draining the queue, then the syncer after fsyncing what the
  // committer handed it. Later appends fail with Unavailable.
  void Stop();

 private:
  friend class LogStore;
  // The records of one AppendReplicated call: the buffer their payloads point into, and the first
  // error of any of them (they may be written by several batches; only the last has the callback).
  struct ReplicatedRun;
  struct Pending {
    uint64_t lsn = 0;
    bool starts_epoch = false;
    RecordHeader header;  // encoded by Append, with its checksum
    std::array<char, kRecordHeaderSize> encoded;
    AppendRequest req;         // Append: the request (owns the payload); replicated: only .sync
    std::string_view payload;  // into req.payload or run's buffer
    std::shared_ptr<ReplicatedRun> run;
    AppendDone done;  // empty for all but the last record of a replicated run
  };
  struct Segment {
    uint64_t first_lsn = 0;
    uint64_t last_lsn = 0;
    uint64_t bytes = 0;
    uint64_t first_timestamp_ns = 0;
    uint64_t last_timestamp_ns = 0;
  };

  GroupLog(rocksdb::DB* db, StoreHealth* health, std::string name, uint32_t group_id,
           GroupLogOptions options, std::filesystem::path payload_dir);
  absl::Status Load();
  // The open segment from the records in [from, to] (empty if from > to), read and checked.
  absl::StatusOr<Segment> ScanSegment(uint64_t from, uint64_t to);
  struct SyncWaiter {
    uint64_t target_lsn;
    SyncDone done;
    // When its fsync is due (Sync(within > 0)); the epoch = at once.
    std::chrono::steady_clock::time_point due{};
  };
  // What the committer hands the syncer: records written up to target_lsn that complete only once
  // fsynced (FUA appends) and Sync() callers.
  struct SyncJob {
    uint64_t target_lsn = 0;
    // When the fsync is due; the epoch (time_point{}) = at once. Sync(within > 0) sets it.
    std::chrono::steady_clock::time_point due{};
    std::vector<Pending> appends;
    std::vector<SyncWaiter> waiters;
  };
  void CommitterLoop();
  // Moves what the next commit holds out of the queue and sets committing_; returns whether
  // metadata must be written with it. REQUIRES: mu_ held, !committing_.
  bool TakeBatchLocked(std::vector<Pending>& batch, std::vector<SyncWaiter>& syncs);
  // Takes and commits a batch on the calling thread. REQUIRES: `lock` holds mu_, !committing_;
  // returns with it released. `may_fsync = false`: a batch that wants an fsync hands it to the
  // syncer instead of writing it synced here.
  void CommitOnCallerThread(std::unique_lock<std::mutex>& lock, bool may_fsync = true);
  // An AppendPlug released: write what this thread queued, here if the log is idle, else wake the
  // committer.
  void Unplug();
  friend class AppendPlug;
  void SyncerLoop();
  // Fsyncs the WAL and, beside it on the payload syncer, the payload files appended to since the
  // last fdatasync; advances durable_lsn to `target` (already written) once both are done. Any
  // thread.
  absl::Status SyncWritten(uint64_t target);
  // The payload syncer (a thread started with the log): fdatasyncs the payload files when asked,
  // so that a cycle of SyncWritten costs one device flush's time, not two in a row.
  // StartPayloadSync asks it (false once it is stopping); WaitPayloadSync(started) waits for its
  // answer, or fdatasyncs on the caller's thread if it was not started. REQUIRES:
  // payload_sync_mu_ held from the start to the end of the wait.
  void PayloadSyncerLoop();
  // One round of payload fdatasyncs (PayloadFiles::SyncDirty), counted in payload_syncs.
  absl::Status FdatasyncPayloads();
  bool StartPayloadSync();
  absl::Status WaitPayloadSync(bool started);
  // Payload durability (docs/log-format.md, "External payloads"). SyncPayloadFilesLocked
  // fdatasyncs every payload file appended to since the last fdatasync and sets *mark to the LSN
  // the 'y' key must now say (0: no change). SyncPayloads does that and writes the key (not synced:
  // the next WAL fsync makes it durable together with the records it covers). REQUIRES (Locked):
  // payload_sync_mu_ held.
  absl::Status SyncPayloadFilesLocked(uint64_t* mark);
  // Writes the 'y' key (not synced) if payload_synced_lsn_ is above it. REQUIRES: payload_sync_mu_.
  rocksdb::Status PutPayloadMarkLocked();
  // Runs `wal_op` (a WAL fsync or a synced write) while the payload files appended to since the
  // last round are fdatasynced beside it, then moves the mark. Returns wal_op's status (or the
  // mark's write's) and sets *payloads to the payload round's. Takes payload_sync_mu_.
  rocksdb::Status WithPayloadsSynced(absl::FunctionRef<rocksdb::Status()> wal_op,
                                     absl::Status* payloads);
  absl::Status SyncPayloads();
  // The record's stored value as ReadRaw hands it out (header + payload): `value` itself if inline,
  // else the header and the payload read from its file into `buf`. Errors name the group, LSN,
  // file and offset: DataLoss, or OutOfRange if the record was truncated meanwhile.
  absl::StatusOr<std::string_view> Materialize(uint64_t lsn, std::string_view value,
                                               std::string& buf) const;
  // `st` (a failed DecodeRecord of the record at `lsn` stored as `value`) as the log reports it:
  // DataLoss naming the group, and the payload's file and offset if it is external.
  absl::Status RecordError(uint64_t lsn, std::string_view value, const absl::Status& st) const;
  // At open: verifies the external records in [from, last] (above the payload sync mark) and cuts
  // the log at the first that does not verify (a torn tail after a power cut). Returns the new
  // last LSN. REQUIRES: Load's history and segments are loaded.
  absl::StatusOr<uint64_t> CutTornPayloadTail(uint64_t from, uint64_t last, bool* checked_any);
  // durable_lsn = max(durable_lsn, lsn): the committer and an inline Sync() may both advance it.
  void AdvanceDurable(uint64_t lsn);
  // Writes one batch (records, metadata, fsync if asked); completes what it covers.
  void Commit(std::vector<Pending>& batch, std::vector<SyncWaiter>& syncs, bool write_meta,
              bool may_fsync = true);
  absl::Status WriteMetaLocked(
      void* write_batch);  // REQUIRES: mu_ held; write_batch: rocksdb::WriteBatch*
  // Waits until no batch is being written and no sync is in flight; then OK if nothing is
  // queued (else FailedPrecondition naming `what`). REQUIRES: `lock` holds mu_.
  absl::Status WaitIdleLocked(std::unique_lock<std::mutex>& lock, std::string_view what);
  absl::Status ValidateHistory(const std::vector<EpochStart>& history, uint64_t next_lsn) const;
  // The stored values of [from_lsn, to_lsn] in LSN order (unverified), checking the keys and that
  // LSNs are dense: a gap or a range that ends early is DataLoss naming the LSN. ReadRange and
  // ReadHeaders decode what it hands out.
  absl::Status ForEachValue(
      uint64_t from_lsn, uint64_t to_lsn,
      const std::function<absl::Status(uint64_t lsn, std::string_view value)>& fn) const;
  // Makes the log refuse further appends and fails everything queued (callbacks run unlocked).
  void FailQueued(absl::Status status);
  // Runs p's callback (if it has one) with its LSN or `st`.
  static void Complete(Pending& p, const absl::Status& st);
  // Calls on_durable for every advance not yet reported; see GroupLogOptions::on_durable.
  void NotifyDurable();

  rocksdb::DB* const db_;
  StoreHealth* const health_;
  const std::string name_;
  const uint32_t group_id_;
  const GroupLogOptions options_;

  std::atomic<uint64_t> last_lsn_{0};
  std::atomic<uint64_t> durable_lsn_{0};

  // on_durable reporting: notify_mu_ is never held while the callback runs.
  std::mutex notify_mu_;
  bool notifying_ = false;     // a thread is in NotifyDurable's loop
  uint64_t notified_lsn_ = 0;  // the last value reported

  std::mutex replica_meta_write_mu_;  // orders SetReplicaMeta's writes; taken before mu_

  mutable std::mutex mu_;            // guards everything below
  std::condition_variable cv_;       // wakes the committer
  std::condition_variable idle_cv_;  // a batch or a sync finished (ResetForCopy waits for that)
  std::condition_variable sync_cv_;  // wakes the syncer
  std::deque<Pending> queue_;
  std::vector<SyncWaiter> sync_waiters_;
  absl::Status failed_;  // sticky: once the log cannot be written, every later append fails with it
  uint64_t next_lsn_ = 1;  // assigned at enqueue, so the queue is in LSN order
  bool stopping_ = false;
  bool committing_ = false;        // the committer is between taking a batch and completing it
  int inline_syncs_ = 0;           // Sync() calls fsyncing on their own thread
  std::deque<SyncJob> sync_jobs_;  // written, waiting for the syncer's fsync, in LSN order
  bool syncing_ = false;           // the syncer is between taking jobs and completing them
  bool fsyncing_ = false;          // the syncer's fsync runs (SyncBusy; its callbacks are not)
  bool syncer_stopping_ = false;   // set once the committer has stopped
  bool sync_expedite_ = false;     // a waiter for idleness: fsync the jobs not yet due now
  bool meta_dirty_ = false;
  uint64_t first_lsn_ = 1;
  uint64_t applied_lsn_ = 0;
  uint64_t current_epoch_ = 0;
  std::optional<uint64_t> pending_epoch_;
  std::vector<EpochStart> history_;
  std::map<std::string, PeerPosition> peers_;
  std::deque<Segment> segments_;  // closed segments, oldest first, then the open one
  uint64_t bytes_ = 0;
  ReplicaMeta replica_meta_;
  std::thread committer_;
  std::thread syncer_;              // fsyncs what the committer wrote (SyncerLoop)
  LatencyHistogram fsync_latency_;  // every fsync of the log (a synced write counts as one)
  Counters counters_;

  // External payloads. payload_written_lsn_: the last LSN whose payload the committer appended
  // (stored before the batch's WAL write). Under payload_sync_mu_ (taken after mu_ when both are
  // held): payload_synced_lsn_, the value of payload_written_lsn_ at the start of the last
  // fdatasync of the files, and payload_mark_, the value of the 'y' key written last.
  std::unique_ptr<PayloadFiles> payloads_;
  std::atomic<uint64_t> payload_written_lsn_{0};
  std::atomic<uint64_t> first_lsn_seen_{1};  // first_lsn_, for readers that may not take mu_
  std::mutex payload_sync_mu_;
  uint64_t payload_synced_lsn_ = 0;
  uint64_t payload_mark_ = 0;
  // The payload syncer: one request at a time (SyncWritten holds payload_sync_mu_ through it).
  std::thread payload_syncer_;
  std::mutex payload_syncer_mu_;
  std::condition_variable payload_syncer_cv_;
  bool payload_sync_requested_ = false;  // guarded by payload_syncer_mu_, like the two below
  bool payload_sync_done_ = false;
  bool payload_syncer_stopping_ = false;
  absl::Status payload_sync_status_;
};

}  // namespace tvilling::storage
