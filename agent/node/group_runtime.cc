// group_runtime.cc: applier, checkpointer, replay, and the NBD exports of a group.
#include "agent/node/group_runtime.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <time.h>

#include <chrono>
#include <future>

#include "agent/core/verify.h"
#include "storage/thread_name.h"

namespace tvilling::node {
namespace {

uint64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// One volume of a group, served over NBD. Writes go through the group log; reads come from the
// volume, which holds every completed write (the applier runs before a write completes).
class VolumeExport final : public nbd::Export {
 public:
  // `info` as configured; `forced_read_only`: the spec itself is read-only (never writable).
  VolumeExport(GroupRuntime* group, storage::GroupLog* log, storage::Volume* volume, uint32_t index,
               nbd::ExportInfo info)
      : group_(group),
        log_(log),
        volume_(volume),
        index_(index),
        info_rw_(info),
        info_ro_(ReadOnly(std::move(info))) {}

  // Two immutable infos: a connection keeps the one it negotiated (the frontend holds a reference
  // to it for the connection's life), a new connection gets the one for the group's current role.
  const nbd::ExportInfo& info() const override { return group_->writable() ? info_rw_ : info_ro_; }

  void Read(uint64_t offset, uint32_t length, char* out, Done done) override {
    std::move(done)(volume_->Read(offset, std::span<char>(out, length)));
  }

  void Write(uint64_t offset, storage::Bytes data, bool fua, Done done) override {
    Fenced(std::move(done), [this, offset, data = std::move(data), fua](Done d) mutable {
      DoWrite(offset, std::move(data), fua, std::move(d));
    });
  }
  void Flush(Done done) override {
    Fenced(std::move(done), [this](Done d) mutable { DoFlush(std::move(d)); });
  }
  void Trim(uint64_t offset, uint32_t length, bool fua, Done done) override {
    Fenced(std::move(done), [this, offset, length, fua](Done d) mutable {
      DoTrim(offset, length, fua, std::move(d));
    });
  }
  void WriteZeroes(uint64_t offset, uint32_t length, bool fua, bool no_hole, Done done) override {
    Fenced(std::move(done), [this, offset, length, fua, no_hole](Done d) mutable {
      DoWriteZeroes(offset, length, fua, no_hole, std::move(d));
    });
  }

 private:
  // Every mutating operation passes the group's I/O fence twice: before it starts and when it
  // completes (GroupRuntime::SuspendIo).
  static nbd::ExportInfo ReadOnly(nbd::ExportInfo info) {
    info.read_only = true;
    return info;
  }

  template <class Start>
  void Fenced(Done done, Start start) {
    if (!group_->writable() || info_rw_.read_only) {
      // A connection negotiated while this site was primary, after a demotion.
      return std::move(done)(absl::UnavailableError(
          fmt::format("export {}: this site is not the group's primary", info_rw_.name)));
    }
    done = group_->GuardCompletion(std::move(done));
    group_->RunFenced(
        [start = std::move(start), done = std::move(done)](const absl::Status* fail) mutable {
          if (fail != nullptr) return std::move(done)(*fail);
          start(std::move(done));
        });
  }

  void DoWrite(uint64_t offset, storage::Bytes data, bool fua, Done done) {
    storage::AppendRequest req;
    req.type = storage::RecordType::kWrite;
    req.flags = fua ? storage::kRecordFlagFua : 0;
    req.volume = index_;
    req.offset = offset;
    req.length = static_cast<uint32_t>(data.size());
    req.payload = std::move(data);
    req.sync = fua;
    Append(std::move(req), std::move(done));
  }

  void DoFlush(Done done) {
    CompletionGate* gate = group_->gate();
    if (gate == nullptr) {
      log_->Sync([done = std::move(done)](absl::Status st) mutable { std::move(done)(st); });
      return;
    }
    // Every write completed before this FLUSH is in the log, so at or below last_lsn.
    const uint64_t target = log_->last_lsn();
    log_->Sync([gate, target, done = std::move(done)](absl::Status st) mutable {
      if (!st.ok()) return std::move(done)(st);
      gate->FlushedLocally(target, std::move(done));
    });
  }

  void DoTrim(uint64_t offset, uint32_t length, bool fua, Done done) {
    storage::AppendRequest req;
    req.type = storage::RecordType::kTrim;
    req.flags = fua ? storage::kRecordFlagFua : 0;
    req.volume = index_;
    req.offset = offset;
    req.length = length;
    req.sync = fua;
    Append(std::move(req), std::move(done));
  }

  void DoWriteZeroes(uint64_t offset, uint32_t length, bool fua, bool no_hole, Done done) {
    storage::AppendRequest req;
    req.type = storage::RecordType::kWriteZeroes;
    req.flags = static_cast<uint16_t>((fua ? storage::kRecordFlagFua : 0) |
                                      (no_hole ? storage::kRecordFlagNoHole : 0));
    req.volume = index_;
    req.offset = offset;
    req.length = length;
    req.sync = fua;
    Append(std::move(req), std::move(done));
  }

  void Append(storage::AppendRequest req, Done done) {
    CompletionGate* gate = group_->gate();
    if (gate == nullptr) {
      log_->Append(std::move(req), [done = std::move(done)](absl::StatusOr<uint64_t> lsn) mutable {
        std::move(done)(lsn.status());
      });
      return;
    }
    const bool durable = req.sync;
    log_->Append(std::move(req),
                 [gate, durable, done = std::move(done)](absl::StatusOr<uint64_t> lsn) mutable {
                   if (!lsn.ok()) return std::move(done)(lsn.status());
                   gate->WriteInLog(*lsn, durable, std::move(done));
                 });
  }

  GroupRuntime* const group_;
  storage::GroupLog* const log_;
  storage::Volume* const volume_;
  const uint32_t index_;
  const nbd::ExportInfo info_rw_;
  const nbd::ExportInfo info_ro_;
};

}  // namespace

GroupRuntime::GroupRuntime(GroupRuntimeOptions options) : options_(std::move(options)) {}

void GroupRuntime::SuspendIo(const std::string& reason) {
  {
    std::lock_guard l(fence_mu_);
    if (io_suspended_) return;
    io_suspended_ = true;
  }
  spdlog::warn("group {}: client I/O suspended: {}", options_.name, reason);
}

void GroupRuntime::ResumeIo() {
  std::vector<HeldOp> ops;
  std::vector<std::pair<nbd::Export::Done, absl::Status>> done;
  {
    std::lock_guard l(fence_mu_);
    if (!io_suspended_) return;
    io_suspended_ = false;
    ops.swap(held_ops_);
    done.swap(held_done_);
  }
  spdlog::info("group {}: client I/O resumed ({} held completion(s), {} held request(s))",
               options_.name, done.size(), ops.size());
  for (auto& [d, st] : done) std::move(d)(st);
  for (auto& op : ops) std::move(op)(nullptr);
}

void GroupRuntime::FailHeldIo(const absl::Status& status) {
  std::vector<HeldOp> ops;
  std::vector<std::pair<nbd::Export::Done, absl::Status>> done;
  {
    std::lock_guard l(fence_mu_);
    ops.swap(held_ops_);
    done.swap(held_done_);
  }
  if (!ops.empty() || !done.empty()) {
    spdlog::warn("group {}: failing {} held request(s): {}", options_.name,
                 ops.size() + done.size(), std::string(status.message()));
  }
  for (auto& [d, st] : done) std::move(d)(status);
  for (auto& op : ops) std::move(op)(&status);
}

bool GroupRuntime::io_suspended() const {
  std::lock_guard l(fence_mu_);
  return io_suspended_;
}

void GroupRuntime::RunFenced(HeldOp op) {
  {
    std::lock_guard l(fence_mu_);
    if (io_suspended_) {
      held_ops_.push_back(std::move(op));
      return;
    }
    ++fenced_running_;
  }
  std::move(op)(nullptr);
  {
    std::lock_guard l(fence_mu_);
    if (--fenced_running_ == 0) fenced_idle_cv_.notify_all();
  }
}

void GroupRuntime::WaitFencedIdle() {
  std::unique_lock l(fence_mu_);
  fenced_idle_cv_.wait(l, [&] { return fenced_running_ == 0; });
}

void GroupRuntime::SetCompletionGate(std::shared_ptr<CompletionGate> gate) {
  std::lock_guard l(gates_mu_);
  gate_.store(gate.get(), std::memory_order_release);
  if (gate) gates_.push_back(std::move(gate));
}

void GroupRuntime::SetRecordsObserver(RecordsObserver fn) {
  std::lock_guard l(observer_mu_);
  observer_ = std::move(fn);
}

void GroupRuntime::SetWritable(bool writable) {
  writable_.store(writable, std::memory_order_release);
}

nbd::Export::Done GroupRuntime::GuardCompletion(nbd::Export::Done done) {
  return [this, done = std::move(done)](absl::Status st) mutable {
    if (st.ok()) {
      std::lock_guard l(fence_mu_);
      if (io_suspended_) {
        held_done_.emplace_back(std::move(done), st);
        return;
      }
    }
    std::move(done)(st);
  };
}

GroupRuntime::~GroupRuntime() { (void)Stop(); }

absl::StatusOr<std::unique_ptr<GroupRuntime>> GroupRuntime::Open(storage::LogStore& store,
                                                                 GroupRuntimeOptions options) {
  auto g = std::unique_ptr<GroupRuntime>(new GroupRuntime(std::move(options)));
  const std::string& group = g->options_.name;
  for (const VolumeSpec& spec : g->options_.volumes) {
    auto vol = storage::Volume::Open(spec.volume);
    if (!vol.ok()) {
      return absl::Status(vol.status().code(),
                          fmt::format("group {}: volume {}: {}", group, spec.name,
                                      std::string(vol.status().message())));
    }
    g->volumes_.push_back(std::move(*vol));
    const uint64_t blocks =
        (g->volumes_.back()->size() + core::kWriteTrackBytes - 1) / core::kWriteTrackBytes;
    g->last_write_.push_back(std::make_unique<std::atomic<uint64_t>[]>(blocks));
    g->last_write_blocks_.push_back(blocks);
    g->dirty_.emplace_back();
  }

  storage::GroupLogOptions log_options = g->options_.log;
  log_options.on_batch_written = [gp = g.get()](std::span<const storage::LogRecordView> records) {
    return gp->Apply(records);
  };
  auto log = store.OpenGroup(group, log_options);
  if (!log.ok()) {
    if (log.status().code() != absl::StatusCode::kDataLoss) return log.status();
    return absl::DataLossError(
        fmt::format("{}; refusing to serve stale data", std::string(log.status().message())));
  }
  g->log_ = *log;
  // A replica whose full copy was interrupted must not apply anything until the copy completes
  // (docs/replication.md, "Full copy"): the copied chunks and the log are merged then.
  // Nor one restoring a rejoin's extents (docs/replication.md, "Rejoin"): the same merge.
  g->apply_paused_ = g->options_.start_apply_paused || g->log_->replica_meta().copy_in_progress ||
                     g->log_->replica_meta().restore_pending;
  g->writable_ = !g->options_.exports_read_only;

  // Replay what the volumes may not hold yet. New appends cannot arrive: no export serves yet.
  const storage::GroupLogState state = g->log_->State();
  const uint64_t from = std::max(state.applied_lsn + 1, state.first_lsn);
  g->applied_lsn_ = state.applied_lsn;
  g->checkpointed_lsn_ = state.applied_lsn;
  // The replay below and every later record are noted; what wrote the volumes before is unknown.
  g->write_track_from_ = state.applied_lsn;
  if (from <= state.last_lsn && !g->apply_paused_) {
    spdlog::info("group {}: replaying log LSN {}..{} into {} volume(s)", group, from,
                 state.last_lsn, g->volumes_.size());
    absl::Status st =
        g->log_->ReadRange(from, state.last_lsn, [&](const storage::LogRecordView& r) {
          ++g->replayed_records_;
          return g->ApplyOne(r);
        });
    if (!st.ok()) {
      return absl::Status(
          st.code(), fmt::format("{}; refusing to serve stale data", std::string(st.message())));
    }
    g->applied_lsn_ = state.last_lsn;
    if (absl::Status cst = g->Checkpoint(); !cst.ok()) return cst;
  }

  for (size_t i = 0; i < g->volumes_.size(); ++i) {
    const VolumeSpec& spec = g->options_.volumes[i];
    nbd::ExportInfo info;
    info.name = spec.export_name.empty() ? spec.name : spec.export_name;
    info.description = fmt::format("tvilling group {} volume {}", group, spec.name);
    info.size_bytes = g->volumes_[i]->size();
    info.read_only = spec.volume.read_only;
    g->exports_.push_back(std::make_shared<VolumeExport>(g.get(), g->log_, g->volumes_[i].get(),
                                                         static_cast<uint32_t>(i), info));
  }
  g->checkpointer_ = std::thread([gp = g.get()] {
    storage::SetThreadName("tvl-checkpoint");
    gp->CheckpointerLoop();
  });
  return g;
}

absl::Status GroupRuntime::Apply(std::span<const storage::LogRecordView> records) {
  {
    std::lock_guard lock(observer_mu_);
    if (observer_) observer_(RecordsPhase::kWritten, records);
  }
  {
    std::lock_guard lock(apply_mu_);
    if (absl::Status st = ApplyLocked(records); !st.ok()) return st;
  }
  std::lock_guard lock(observer_mu_);
  if (observer_) observer_(RecordsPhase::kApplied, records);
  return absl::OkStatus();
}

absl::Status GroupRuntime::ApplyLocked(std::span<const storage::LogRecordView> records) {
  if (!apply_failed_.ok()) return apply_failed_;
  if (apply_paused_.load(std::memory_order_relaxed)) return absl::OkStatus();
  uint64_t bytes = 0;
  for (const storage::LogRecordView& r : records) {
    if (absl::Status st = ApplyOne(r); !st.ok()) {
      // The volume no longer follows the log; stop accepting writes until an operator intervenes.
      apply_failed_ = absl::Status(
          st.code(), fmt::format("group {}: applying LSN {} failed, writes suspended: {}",
                                 options_.name, r.lsn, std::string(st.message())));
      spdlog::error(
          "{}. Reads go on; the log keeps LSN {} and later. Fix the volume's storage (a full file "
          "system: free space on it), then restart tvillingd, which applies them again",
          std::string(apply_failed_.message()), r.lsn);
      return apply_failed_;
    }
    bytes += r.header.length;
  }
  if (!records.empty()) applied_lsn_.store(records.back().lsn, std::memory_order_release);
  const bool checkpoint_due =
      applied_bytes_since_checkpoint_.fetch_add(bytes) + bytes >= options_.checkpoint_bytes;
  // Woken once as the count crosses writeback_bytes, not for every batch after it.
  bool writeback_due = false;
  if (WritebackPaced()) {
    const uint64_t wb = applied_bytes_since_writeback_.fetch_add(bytes);
    writeback_due = wb < options_.writeback_bytes && wb + bytes >= options_.writeback_bytes;
  }
  if (checkpoint_due || writeback_due) cv_.notify_one();
  return absl::OkStatus();
}

absl::Status GroupRuntime::write_error() const {
  {
    std::lock_guard lock(apply_mu_);
    if (!apply_failed_.ok()) return apply_failed_;
  }
  return log_ != nullptr ? log_->write_error() : absl::OkStatus();
}

void GroupRuntime::PauseApply() {
  std::lock_guard lock(apply_mu_);
  apply_paused_ = true;
}

absl::Status GroupRuntime::ResetLog(uint64_t applied_lsn,
                                    const std::function<absl::Status()>& reset) {
  std::lock_guard hold(checkpoint_mu_);
  if (absl::Status st = reset(); !st.ok()) return st;
  std::lock_guard lock(apply_mu_);
  apply_paused_ = true;
  applied_lsn_ = applied_lsn;
  checkpointed_lsn_ = applied_lsn;
  // A copy's chunks were written without notes: the volumes are known from `applied_lsn` on.
  if (applied_lsn > write_track_from_.load()) write_track_from_.store(applied_lsn);
  return absl::OkStatus();
}

absl::Status GroupRuntime::ResumeApply() {
  std::lock_guard lock(apply_mu_);
  if (!apply_paused_) return absl::OkStatus();
  // Batches the committer writes meanwhile wait on apply_mu_ and are applied after this catch-up.
  const storage::GroupLogState state = log_->State();
  const uint64_t from = std::max(applied_lsn_.load() + 1, state.first_lsn);
  if (from <= state.last_lsn) {
    spdlog::info("group {}: applying log LSN {}..{} after the copy", options_.name, from,
                 state.last_lsn);
    absl::Status st = log_->ReadRange(from, state.last_lsn,
                                      [&](const storage::LogRecordView& r) { return ApplyOne(r); });
    if (!st.ok()) {
      apply_failed_ = st;
      return st;
    }
    applied_lsn_.store(state.last_lsn, std::memory_order_release);
  }
  apply_paused_ = false;
  return absl::OkStatus();
}

absl::Status GroupRuntime::ApplyOne(const storage::LogRecordView& r) {
  const storage::RecordHeader& h = r.header;
  if (h.volume >= volumes_.size()) {
    return absl::DataLossError(
        fmt::format("group {}: record LSN {} names volume {} but the group has {}", options_.name,
                    r.lsn, h.volume, volumes_.size()));
  }
  storage::Volume& v = *volumes_[h.volume];
  if (h.offset > v.size() || h.length > v.size() - h.offset) {
    return absl::DataLossError(fmt::format(
        "group {}: record LSN {} ({} {}+{}) is beyond volume {} of {} bytes", options_.name, r.lsn,
        storage::RecordTypeName(h.type), h.offset, h.length, h.volume, v.size()));
  }
  // Noted before the write (core/verify.h): a verify reading the chunk meanwhile sees the note
  // change and does not trust its bytes.
  if (h.length > 0) {
    std::atomic<uint64_t>* notes = last_write_[h.volume].get();
    const uint64_t last = (h.offset + h.length - 1) / core::kWriteTrackBytes;
    for (uint64_t b = h.offset / core::kWriteTrackBytes; b <= last; ++b) {
      notes[b].store(r.lsn, std::memory_order_seq_cst);
    }
  }
  // Only writes leave dirty pages worth pacing: trims and write-zeroes punch or zero ranges with
  // fallocate (a huge trim would otherwise become thousands of no-op chunks); where they fall back
  // to writing zeroes, the checkpoint's fsync writes those unpaced.
  if (options_.checkpoint_chunk_bytes > 0 && h.type == storage::RecordType::kWrite &&
      h.length > 0) {
    std::lock_guard lock(dirty_mu_);
    dirty_[h.volume].Add(h.offset, h.length);
  }
  switch (h.type) {
    case storage::RecordType::kWrite:
      return v.Write(h.offset, r.payload);
    case storage::RecordType::kTrim:
      return v.Trim(h.offset, h.length);
    case storage::RecordType::kWriteZeroes:
      return v.WriteZeroes(h.offset, h.length, (h.flags & storage::kRecordFlagNoHole) == 0);
  }
  return absl::DataLossError(
      fmt::format("group {}: record LSN {} has unknown type", options_.name, r.lsn));
}

uint64_t GroupRuntime::LastWriteLsn(size_t volume, uint64_t offset, uint64_t length) const {
  if (volume >= last_write_.size() || length == 0) return 0;
  const std::atomic<uint64_t>* notes = last_write_[volume].get();
  const uint64_t first = offset / core::kWriteTrackBytes;
  const uint64_t last =
      std::min((offset + length - 1) / core::kWriteTrackBytes, last_write_blocks_[volume] - 1);
  uint64_t lsn = 0;
  for (uint64_t b = first; b <= last; ++b) {
    lsn = std::max(lsn, notes[b].load(std::memory_order_seq_cst));
  }
  return lsn;
}

absl::Status GroupRuntime::Checkpoint() {
  std::lock_guard lock(checkpoint_mu_);
  const uint64_t target = applied_lsn_.load(std::memory_order_acquire);
  if (target > checkpointed_lsn_.load()) {
    applied_bytes_since_checkpoint_.store(0);
    applied_bytes_since_writeback_.store(0);
    for (size_t i = 0; i < volumes_.size(); ++i) {
      absl::Status st = WriteBackDirty(i);
      // The fsync also writes whatever the ranges missed (applied after they were taken): the
      // applied LSN below is recorded only once the volume is durable.
      if (st.ok()) st = volumes_[i]->Flush();
      if (!st.ok()) {
        return absl::Status(st.code(), fmt::format("group {}: checkpoint: {}", options_.name,
                                                   std::string(st.message())));
      }
    }
    for (auto& v : volumes_) v->DropCleanCache();
    if (absl::Status st = log_->SetAppliedLsn(target); !st.ok()) return st;
    checkpointed_lsn_.store(target);
    checkpoints_.fetch_add(1);
  }
  auto first = log_->EnforceRetention(NowNs());
  return first.status();
}

absl::Status GroupRuntime::WriteBackDirty(size_t i) {
  if (options_.checkpoint_chunk_bytes == 0) return absl::OkStatus();
  std::vector<core::WritebackChunk> chunks;
  {
    std::lock_guard lock(dirty_mu_);
    chunks = dirty_[i].TakeChunks(options_.checkpoint_chunk_bytes);
  }
  // One chunk at a time, each complete before the next starts: the disk's queue never holds more
  // than one chunk of this volume's writeback for a log fsync to wait behind.
  for (const core::WritebackChunk& c : chunks) {
    if (absl::Status st = volumes_[i]->WriteBack(c.offset, c.length); !st.ok()) return st;
    writeback_chunks_.fetch_add(1, std::memory_order_relaxed);
  }
  return absl::OkStatus();
}

absl::Status GroupRuntime::WriteBackBetweenCheckpoints() {
  std::lock_guard lock(checkpoint_mu_);
  applied_bytes_since_writeback_.store(0);
  for (size_t i = 0; i < volumes_.size(); ++i) {
    if (absl::Status st = WriteBackDirty(i); !st.ok()) {
      return absl::Status(st.code(), fmt::format("group {}: writeback: {}", options_.name,
                                                 std::string(st.message())));
    }
  }
  // Counted once done: a reader that sees the pass sees its chunks too.
  writebacks_.fetch_add(1, std::memory_order_release);
  return absl::OkStatus();
}

void GroupRuntime::CheckpointerLoop() {
  std::unique_lock lock(mu_);
  const auto interval = std::chrono::milliseconds(options_.checkpoint_interval_ms);
  auto next_checkpoint = std::chrono::steady_clock::now() + interval;
  // A failure that repeats (a log store that stopped writing fails every checkpoint until the
  // restart) is logged when it first appears and then once a minute with the count, not every
  // interval.
  std::string last_error;
  auto last_error_logged = std::chrono::steady_clock::time_point();
  uint64_t repeats = 0;
  while (!stopping_) {
    cv_.wait_until(lock, next_checkpoint, [&] {
      return stopping_ || applied_bytes_since_checkpoint_.load() >= options_.checkpoint_bytes ||
             (WritebackPaced() &&
              applied_bytes_since_writeback_.load() >= options_.writeback_bytes);
    });
    if (stopping_) break;
    const bool checkpoint = applied_bytes_since_checkpoint_.load() >= options_.checkpoint_bytes ||
                            std::chrono::steady_clock::now() >= next_checkpoint;
    lock.unlock();
    // Between checkpoints the applied ranges are only written back (no fsync, no applied LSN):
    // the checkpoint that follows finds little left to write.
    absl::Status st = checkpoint ? Checkpoint() : WriteBackBetweenCheckpoints();
    if (!st.ok()) {
      std::string what =
          fmt::format("{} failed (will retry): {}", checkpoint ? "checkpoint" : "writeback",
                      std::string(st.message()));
      const auto now = std::chrono::steady_clock::now();
      if (what != last_error || now - last_error_logged >= std::chrono::minutes(1)) {
        if (repeats > 0 && what == last_error) {
          spdlog::error("group {}: {} ({} more times since the last report)", options_.name, what,
                        repeats);
        } else {
          spdlog::error("group {}: {}", options_.name, what);
        }
        last_error = std::move(what);
        last_error_logged = now;
        repeats = 0;
      } else {
        ++repeats;
      }
    } else if (!last_error.empty()) {
      spdlog::info("group {}: checkpoints succeed again", options_.name);
      last_error.clear();
      repeats = 0;
    }
    if (checkpoint) next_checkpoint = std::chrono::steady_clock::now() + interval;
    lock.lock();
  }
}

absl::Status GroupRuntime::Stop() {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return absl::OkStatus();
    stopping_ = true;
  }
  cv_.notify_all();
  if (checkpointer_.joinable()) checkpointer_.join();
  if (log_ == nullptr) return absl::OkStatus();
  absl::Status st = Checkpoint();
  // Make the checkpoint record (and everything before it) durable.
  std::promise<absl::Status> synced;
  auto fut = synced.get_future();
  log_->Sync([&synced](absl::Status s) { synced.set_value(s); });
  absl::Status sync_st = fut.get();
  return st.ok() ? sync_st : st;
}

GroupRuntimeStats GroupRuntime::Stats() const {
  GroupRuntimeStats s;
  s.replayed_records = replayed_records_;
  s.checkpoints = checkpoints_.load();
  // The passes first: a pass counted is one whose chunks are counted (WriteBackBetweenCheckpoints).
  s.writebacks = writebacks_.load(std::memory_order_acquire);
  s.writeback_chunks = writeback_chunks_.load(std::memory_order_relaxed);
  s.applied_lsn = applied_lsn_.load();
  s.checkpointed_lsn = checkpointed_lsn_.load();
  return s;
}

}  // namespace tvilling::node
