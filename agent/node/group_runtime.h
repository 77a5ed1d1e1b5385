// group_runtime.h: one consistency group running on this node: its log, its volumes, the applier
// that writes log records into the volumes in LSN order, the checkpointer, and the NBD exports.
//
// The write path of a primary: NBD WRITE -> GroupLog::Append (queued) -> the committer writes the
// batch to RocksDB -> the applier (on the committer thread, in LSN order) pwrites the volumes ->
// the WRITE completes. So a completed write is in the log and visible to reads. FLUSH/FUA complete
// once the log is fsynced; the volumes are fsynced later by the checkpointer, which then records
// the applied LSN and lets retention drop what nobody needs. After a crash, Open() replays the log
// from the applied LSN before any export serves I/O.
#pragma once

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "agent/core/dirty_ranges.h"
#include "agent/nbd/export.h"
#include "storage/group_log.h"
#include "storage/volume.h"

namespace tvilling::node {

struct VolumeSpec {
  std::string name;         // volume name within the group
  std::string export_name;  // NBD export name (defaults to name)
  storage::VolumeOptions volume;
};

struct GroupRuntimeOptions {
  std::string name;
  std::vector<VolumeSpec> volumes;
  storage::GroupLogOptions log;  // on_batch_written is owned by the runtime
  // The checkpointer fsyncs the volumes and records the applied LSN this often, or sooner once this
  // many bytes were applied since the last checkpoint.
  uint64_t checkpoint_interval_ms = 1000;
  uint64_t checkpoint_bytes = 16ull << 20;
  // A checkpoint writes the ranges the applier dirtied back in pieces of at most this many bytes,
  // each waited for before the next (Volume::WriteBack), and then fsyncs: a log fsync issued
  // meanwhile waits for one piece instead of the whole checkpoint (core/dirty_ranges.h). 0: one
  // fdatasync per volume, unpaced.
  uint64_t checkpoint_chunk_bytes = 4ull << 20;
  // Between checkpoints, once this many bytes were applied, the checkpointer writes those ranges
  // back the same way without an fsync: the disk gets a steady stream of the volumes' writes
  // instead of a checkpoint's worth at a time, which a log fsync (on either site, if they share a
  // disk) would queue behind. 0: only at checkpoints. Needs checkpoint_chunk_bytes > 0.
  uint64_t writeback_bytes = 1ull << 20;
  // Start with the applier paused (a replica whose full copy is in progress): records are
  // appended to the log but not applied, and nothing is replayed at Open.
  bool start_apply_paused = false;
  // Serve every volume read-only whatever its spec says (a replica: only the log writes it).
  bool exports_read_only = false;
};

// Decides when a primary's client I/O may complete beyond the local log: with sync peers a WRITE
// also waits until every sync peer has it, a FLUSH until they have fsynced it (the replication
// layer implements this; without one, I/O completes on the local log alone).
class CompletionGate {
 public:
  virtual ~CompletionGate() = default;
  // The record `lsn` is in the local log (and fsynced, if `durable`). Run `done` once the mode
  // allows, maybe later on another thread.
  virtual void WriteInLog(uint64_t lsn, bool durable, nbd::Export::Done done) = 0;
  // The local log is fsynced through `lsn` for a FLUSH.
  virtual void FlushedLocally(uint64_t lsn, nbd::Export::Done done) = 0;
};

struct GroupRuntimeStats {
  uint64_t replayed_records = 0;  // at Open
  uint64_t checkpoints = 0;
  uint64_t writeback_chunks = 0;  // pieces written back (checkpoint_chunk_bytes) by checkpoints
                                  // and between them (writeback_bytes)
  uint64_t writebacks = 0;        // passes between checkpoints (writeback_bytes)
  uint64_t applied_lsn = 0;       // in the volumes' page cache
  uint64_t checkpointed_lsn = 0;  // in the volumes, durably
};

class GroupRuntime {
 public:
  // Opens the volumes and the group log and replays records after the applied checkpoint. A corrupt
  // or missing record in that range is a DataLoss error naming the LSN: the group does not serve.
  static absl::StatusOr<std::unique_ptr<GroupRuntime>> Open(storage::LogStore& store,
                                                            GroupRuntimeOptions options);
  ~GroupRuntime();
  GroupRuntime(const GroupRuntime&) = delete;
  GroupRuntime& operator=(const GroupRuntime&) = delete;

  const std::string& name() const { return options_.name; }
  storage::GroupLog& log() { return *log_; }
  const std::vector<std::shared_ptr<nbd::Export>>& exports() const { return exports_; }
  GroupRuntimeStats Stats() const;
  // The LSN the volumes hold (page cache; durable after the next checkpoint).
  uint64_t applied_lsn() const { return applied_lsn_.load(std::memory_order_acquire); }
  // Why the group refuses writes for good until a restart (its log store failed, or applying a
  // record to a volume did), or OK. Not the fencing of io_suspended().
  absl::Status write_error() const;
  storage::Volume& volume(size_t i) { return *volumes_[i]; }
  size_t volume_count() const { return volumes_.size(); }

  // Wiring for replication. Both may change while exports serve (a role switch,
  // group_controller.h): a replaced gate is kept alive until the runtime is destroyed (a WRITE in
  // flight may still call it; a stopped replicator fails what it gets), and once
  // SetRecordsObserver returns the old observer is not running and will not run again.
  void SetCompletionGate(std::shared_ptr<CompletionGate> gate);
  // Called on the thread that wrote each batch to the log, twice: with kWritten once the batch is
  // in the log, before it is applied to the volumes (the primary ships it then, so the network
  // round trip overlaps the apply), and with kApplied after the apply.
  enum class RecordsPhase { kWritten, kApplied };
  using RecordsObserver =
      std::function<void(RecordsPhase phase, std::span<const storage::LogRecordView> records)>;
  void SetRecordsObserver(RecordsObserver fn);
  CompletionGate* gate() const { return gate_.load(std::memory_order_acquire); }

  // Whether the exports accept writes (the group's role, group_controller.h). While not writable,
  // a WRITE/TRIM/WRITE_ZEROES/FLUSH fails at once with Unavailable (NBD ESHUTDOWN: retryable, the
  // client should find the primary), before the I/O fence. The NBD handshake advertises the
  // read-only flag as of the connection's negotiation: a client connected to a replica must
  // reconnect after a promotion to write.
  void SetWritable(bool writable);
  bool writable() const { return writable_.load(std::memory_order_acquire); }

  // Full copy on a replica: pause the applier (records keep going into the log), and resume it,
  // which first applies every record after the applied LSN, in order.
  void PauseApply();
  absl::Status ResumeApply();
  bool apply_paused() const { return apply_paused_.load(std::memory_order_acquire); }
  // Runs `reset`, a reset of the log for a full copy (ResetForCopy) or a cut back to a fork
  // (CutBackTo), either of which lowers the log's applied LSN; if it succeeds, pauses the applier
  // and tells it the volumes are as of `applied_lsn` as far as the log is concerned. Checkpoints
  // wait meanwhile: a checkpoint takes the applied LSN, fsyncs the volumes and then records that
  // LSN in the log, and one that took it before the reset and recorded it after would mark
  // records of the new log applied that never were (a restart or the retention would skip them).
  absl::Status ResetLog(uint64_t applied_lsn, const std::function<absl::Status()>& reset);

  // I/O fencing (docs/coordinator.md). While suspended, client writes, trims, write-zeroes and
  // flushes are held, not failed: a new one waits before it reaches the log, and one already in the
  // log does not complete. ResumeIo runs and completes what was held; FailHeldIo fails it (a
  // demoted primary: the client sees an error and retries elsewhere) and stays suspended. Reads
  // are served throughout. `reason` is logged.
  void SuspendIo(const std::string& reason);
  void ResumeIo();
  void FailHeldIo(const absl::Status& status);
  bool io_suspended() const;
  // REQUIRES: suspended. Waits until no operation that passed the fence before the suspension is
  // still handing its record to the log; after it, a log Sync() covers every admitted write.
  void WaitFencedIdle();
  // Used by the exports: run `op` now (nullptr) or when resumed, or with the error it must fail
  // with. Held operations keep their order.
  using HeldOp = absl::AnyInvocable<void(const absl::Status* fail) &&>;
  void RunFenced(HeldOp op);
  // Wraps a completion so that a success reported while suspended is held until ResumeIo.
  nbd::Export::Done GuardCompletion(nbd::Export::Done done);

  // Online verify (core/verify.h): the largest LSN noted for the 1 MiB blocks of
  // [offset, offset + length) of `volume`: the last record the applier wrote there since
  // write_track_from() (noted before the write). 0 if none.
  uint64_t LastWriteLsn(size_t volume, uint64_t offset, uint64_t length) const;
  // Notes are complete for records after this LSN (the applied LSN at Open, raised by a copy's
  // ResetLog: chunks are written without notes).
  uint64_t write_track_from() const { return write_track_from_.load(std::memory_order_acquire); }

  // Fsyncs the volumes, records the applied LSN, enforces retention. Also run by the checkpointer.
  absl::Status Checkpoint();
  // Stops the checkpointer and takes a final checkpoint; then makes the log durable.
  absl::Status Stop();

 private:
  explicit GroupRuntime(GroupRuntimeOptions options);
  absl::Status Apply(std::span<const storage::LogRecordView> records);
  absl::Status ApplyLocked(std::span<const storage::LogRecordView> records);
  absl::Status ApplyOne(const storage::LogRecordView& r);
  void CheckpointerLoop();
  // Writes back what the applier dirtied in volume `i` since the last call, paced in chunks.
  absl::Status WriteBackDirty(size_t i);
  absl::Status WriteBackBetweenCheckpoints();
  bool WritebackPaced() const {
    return options_.checkpoint_chunk_bytes > 0 && options_.writeback_bytes > 0;
  }

  GroupRuntimeOptions options_;
  storage::GroupLog* log_ = nullptr;
  std::vector<std::unique_ptr<storage::Volume>> volumes_;
  std::vector<std::shared_ptr<nbd::Export>> exports_;

  std::atomic<CompletionGate*> gate_{nullptr};
  std::mutex gates_mu_;
  std::vector<std::shared_ptr<CompletionGate>> gates_;  // every gate ever set (see above)
  std::mutex observer_mu_;  // held while the observer runs (committer thread) or is replaced
  RecordsObserver observer_;
  std::atomic<bool> writable_{true};

  // Applier state: touched on the committer thread (and by Open / ResumeApply under apply_mu_).
  mutable std::mutex apply_mu_;
  std::atomic<bool> apply_paused_{false};
  absl::Status apply_failed_;
  std::atomic<uint64_t> applied_lsn_{0};
  std::atomic<uint64_t> applied_bytes_since_checkpoint_{0};
  std::atomic<uint64_t> applied_bytes_since_writeback_{0};
  // Per volume, per core::kWriteTrackBytes block: the LSN of the last record applied there.
  std::vector<std::unique_ptr<std::atomic<uint64_t>[]>> last_write_;
  std::vector<uint64_t> last_write_blocks_;
  std::atomic<uint64_t> write_track_from_{0};
  // Per volume: the ranges applied since the last checkpoint took them (only with
  // checkpoint_chunk_bytes > 0). Written by the applier, taken by the checkpointer.
  std::mutex dirty_mu_;
  std::vector<core::DirtyRanges> dirty_;  // guarded by dirty_mu_

  mutable std::mutex fence_mu_;
  bool io_suspended_ = false;  // guarded by fence_mu_
  std::vector<HeldOp> held_ops_;
  std::vector<std::pair<nbd::Export::Done, absl::Status>> held_done_;
  int fenced_running_ = 0;  // guarded by fence_mu_: operations admitted and still starting
  std::condition_variable fenced_idle_cv_;

  std::mutex checkpoint_mu_;  // serialises Checkpoint()
  std::atomic<uint64_t> checkpointed_lsn_{0};
  std::atomic<uint64_t> checkpoints_{0};
  std::atomic<uint64_t> writeback_chunks_{0};
  std::atomic<uint64_t> writebacks_{0};
  uint64_t replayed_records_ = 0;

  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::thread checkpointer_;
};

}  // namespace tvilling::node
