// replication.h: the replication logic of a group as plain state machines (docs/replication.md).
//
// No sockets, threads, disk or clock reads: time is an input (`Nanos`, a monotonic clock the
// caller reads), and every output is a value the caller acts on. agent/node drives these with real
// logs and gRPC streams; tests/sim drives them with a simulated network, disks and clock.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace tvilling::core {

using Nanos = int64_t;  // monotonic nanoseconds, supplied by the caller

enum class Mode : uint8_t { kAsync, kSync };
const char* ModeName(Mode m);

struct EpochStart {
  uint64_t epoch = 0;
  uint64_t first_lsn = 0;
  bool operator==(const EpochStart&) const = default;
};
// Ordered by epoch and by first_lsn (both strictly increasing... first_lsn non-decreasing).
using History = std::vector<EpochStart>;

// The epoch of the record at `lsn` under `history`: the epoch of the last entry whose first_lsn <=
// lsn; 0 if there is none (or lsn == 0).
uint64_t EpochAt(const History& history, uint64_t lsn);

// The entries of `history` with first_lsn <= lsn: the history of a log that ends at `lsn`. After a
// full copy with base L0 the replica's log history is HistoryUpTo(primary's history, L0), in
// core's view (ReplicaReceiver::OnCopyBegin) and in the log the node resets
// (GroupLog::ResetForCopy).
History HistoryUpTo(const History& history, uint64_t lsn);

// The longest common prefix of two logs, given their histories and last LSNs: the largest L <=
// min(a_last, b_last) such that EpochAt(a, l) == EpochAt(b, l) for every l in [1, L]. (Within one
// epoch only one site writes, so equal epochs at an LSN mean equal records.)
uint64_t CommonPrefix(const History& a, uint64_t a_last, const History& b, uint64_t b_last);

// Positions of a replica, as it reports them. received >= durable is not required (a replica
// may sync a prefix it received); each is monotone on its own.
struct Positions {
  uint64_t received = 0;  // in the replica's log (maybe not fsynced)
  uint64_t durable = 0;   // in the replica's log, fsynced
  uint64_t applied = 0;   // in the replica's volumes
  // A full copy is in progress at the replica (from CopyBegin until CopyDone is persisted). The
  // primary learns from the first report without it that a copy it sent is complete there.
  bool copying = false;
  bool operator==(const Positions&) const = default;
};

// A byte range of one volume of the group.
struct Extent {
  uint32_t volume = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  bool operator==(const Extent&) const = default;
};
// Sorted by (volume, offset), overlapping and adjacent ranges merged, empty ones dropped.
std::vector<Extent> MergeExtents(std::vector<Extent> extents);
// The part of merged `extents` at or after position (volume, offset) in (volume, offset) order:
// what a restore still has to copy after a chunk that ended there.
std::vector<Extent> ExtentsFrom(const std::vector<Extent>& extents, uint32_t volume,
                                uint64_t offset);
// Whether [offset, offset + length) of `volume` lies inside one of merged `extents`.
bool ExtentsCover(const std::vector<Extent>& extents, uint32_t volume, uint64_t offset,
                  uint64_t length);
// A rejoin restores at most this many (merged) extents; beyond it a full copy is simpler.
inline constexpr size_t kMaxRestoreExtents = 65536;

// ---------------------------------------------------------------------------------------------
// Handshake (decided by the replica)

struct PrimaryHello {
  std::string group;
  std::string site;  // the sender
  uint64_t epoch = 0;
  History history;
  std::vector<uint64_t> volume_sizes;
  uint64_t first_lsn = 1;  // oldest record the primary still holds (last_lsn + 1 if none)
  uint64_t last_lsn = 0;
};

// What a replica does when its log holds records the primary's history does not (the
// group's `on_divergence`; docs/replication.md, "Divergence"). The config's default is kRejoin;
// a view built without a config refuses, as before rejoin existed.
enum class OnDivergence : uint8_t { kRefuse, kRejoin };

struct ReplicaView {
  bool group_known = false;
  OnDivergence on_divergence = OnDivergence::kRefuse;
  bool is_primary = false;    // this agent is itself configured primary of the group
  uint64_t newest_epoch = 0;  // newest epoch this agent has seen (persisted)
  History history;            // of its log
  uint64_t last_lsn = 0;
  std::vector<uint64_t> volume_sizes;
  // Copy state (persisted). A replica that never completed a copy, or whose copy is in
  // progress, is not consistent.
  bool consistent = false;
  bool copy_in_progress = false;
  uint32_t copy_volume = 0;  // resume point of an interrupted copy
  uint64_t copy_offset = 0;
  // The copy's L1 (docs/replication.md, "Full copy"): after a completed copy (consistent set),
  // the volumes are a prefix state only once applied >= this (persisted with `consistent`).
  uint64_t consistent_at_lsn = 0;
  // The epoch of the stream that began the copy (from CopyBegin; persisted with the copy state).
  // Chunks reflect the volumes of that primary at LSNs this log may not hold yet, so an
  // interrupted copy resumes only on a stream of the same epoch (the same primary run: a primary
  // begins a new epoch on every restart, and only a restart can lose records of its log).
  uint64_t copy_epoch = 0;
  // The epoch, in the copying primary's history, of the record at consistent_at_lsn (persisted
  // with it). While the log has not reached consistent_at_lsn the volumes hold records it does not
  // hold; the handshake checks them against the primary's history through this.
  uint64_t consistent_at_epoch = 0;
  // Rejoin (docs/replication.md, "Rejoin"): the log was cut back to a fork LSN and the volumes
  // still hold the saved tail's data in `restore_extents` (merged): those extents are copied from
  // the primary before the replica is consistent again. The resume point is (copy_volume,
  // copy_offset) in extent order; it is valid only on a stream of `restore_epoch` (the epoch of
  // the stream that began restoring; 0 = not begun).
  bool restore_pending = false;
  uint64_t restore_epoch = 0;
  std::vector<Extent> restore_extents;
};

enum class RefuseCode : uint8_t {
  kNone = 0,
  kUnknownGroup,
  kNotReplica,
  kStaleEpoch,
  kDiverged,
  kVolumeMismatch,
  kNotAuthorised,  // decided by the transport's ACL, listed here so every refusal has one code
  kProtocol,       // a malformed or out-of-order message
};
const char* RefuseCodeName(RefuseCode c);

struct HandshakeDecision {
  // kRejoin never goes on the wire: the replica saves its records after fork_lsn, cuts its log
  // back to fork_lsn (PlanRejoin) and decides again on the cut log. kRestore: the primary copies
  // `extents` (CopyChunks, then CopyDone; no CopyBegin: the log is kept) while the log streams
  // from start_lsn.
  enum class Kind : uint8_t { kStreamFrom, kFullCopy, kRefuse, kRejoin, kRestore };
  Kind kind = Kind::kRefuse;
  uint64_t start_lsn =
      0;  // kStreamFrom: first LSN to send. kFullCopy resume: the log continues here
  bool copy_resume = false;  // kFullCopy: resume at (copy_volume, copy_offset) instead of from 0
  uint32_t copy_volume = 0;
  uint64_t copy_offset = 0;
  RefuseCode code = RefuseCode::kNone;
  std::string reason;           // for an operator, always set (also for kFullCopy: why)
  uint64_t fork_lsn = 0;        // kRejoin: the last LSN both logs share
  std::vector<Extent> extents;  // kRestore: what is left to copy (from the resume point)
};

// The replica's answer to a Hello (docs/replication.md, "The stream"). Rules, in order:
// unknown group -> refuse; is_primary -> refuse kNotReplica; hello.epoch < newest_epoch -> refuse
// kStaleEpoch; volume count or sizes differ -> refuse kVolumeMismatch; the replica holds records
// beyond CommonPrefix -> refuse kDiverged (reason names the LSN and both epochs) if
// view.on_divergence is kRefuse, else kRejoin with fork_lsn = CommonPrefix; copy in progress
// -> full copy resuming at the persisted point, if the hello's epoch is the copy's epoch and the
// primary still holds last_lsn + 1, else a full copy from the start; restore pending -> kRestore
// of the extents (resuming at the persisted point if hello.epoch is restore_epoch) if the primary
// holds last_lsn + 1, else a full copy from the start; not consistent -> full copy;
// a completed copy whose consistent_at_lsn the log has not reached, where the primary's history
// does not have consistent_at_epoch at consistent_at_lsn (the volumes hold records the primary
// lost: they cannot become a prefix state of its log) -> full copy from the start; last_lsn + 1 <
// hello.first_lsn -> full copy; else stream from last_lsn + 1.
HandshakeDecision DecideHandshake(const PrimaryHello& hello, const ReplicaView& view);

// What a replica persists when it cuts its log back to a fork (after saving the records after it).
struct RejoinPlan {
  uint64_t fork_lsn = 0;
  History history;           // the log's history after the cut: HistoryUpTo(view.history, fork)
  uint64_t applied_lsn = 0;  // the applied checkpoint after the cut: min(applied, fork)
  // Restore the extents the saved records touched (and any still pending from an earlier
  // rejoin), merged; else the volumes are no image of anything and a full copy follows
  // (consistent = false, no restore pending).
  bool restore = false;
  std::vector<Extent> extents;
  std::string reason;  // for an operator
};
// A replica whose log diverged at `fork_lsn` (a kRejoin decision) and whose records after it
// touched `tail_extents`. The extents can be restored when the volumes were an image before
// (consistent, or a restore pending from an earlier rejoin: the two merge), no full copy is in
// progress, a completed copy's end (consistent_at_lsn) is not beyond the fork (else the volumes
// hold copied data of records after the fork that the log never held, at unknown places), and at
// most kMaxRestoreExtents remain after merging. Otherwise a full copy.
RejoinPlan PlanRejoin(const ReplicaView& view, uint64_t fork_lsn, std::vector<Extent> tail_extents,
                      uint64_t applied_lsn);

// ---------------------------------------------------------------------------------------------
// Primary side

enum class LinkState : uint8_t {
  kDisconnected,  // not connected; the transport redials with backoff
  kHandshake,     // connected, Hello sent, waiting for the decision
  kCopying,       // full copy in progress (the log streams too)
  kStreaming,     // the log streams
  kRefused,       // the peer refused; redialled only after refuse_backoff
};
const char* LinkStateName(LinkState s);

struct SenderOptions {
  Mode mode = Mode::kAsync;
  uint64_t min_window_bytes = 4ull << 20;
  uint64_t max_window_bytes = 256ull << 20;
  uint64_t max_batch_bytes = 4ull << 20;
  uint32_t max_batch_records = 4096;
  Nanos max_batch_delay = 1'000'000;  // 1 ms
  // A sync peer that is not connected (or not keeping up) for this long leaves the sync set
  // (0 = never: writes wait for it).
  Nanos sync_degrade_after = 0;
};

// What the shipper should read from the log and send next.
struct SendPlan {
  uint64_t from_lsn = 0;   // first LSN to send
  uint64_t to_lsn = 0;     // last LSN it may include (<= the local last LSN)
  uint64_t max_bytes = 0;  // stop after the record that crosses this (window and batch cap)
  uint32_t max_records = 0;
};

// The unreplicated range of a peer: what would be lost if the primary site were destroyed now.
struct Lag {
  uint64_t lsns = 0;                 // last_lsn - durable
  uint64_t bytes = 0;                // stored bytes of those records
  uint64_t oldest_timestamp_ns = 0;  // capture time of the oldest unreplicated record (0 if none)
};

// Everything the primary knows about one peer.
struct PeerStatus {
  std::string peer;
  Mode mode = Mode::kAsync;
  LinkState state = LinkState::kDisconnected;
  Positions positions;
  // Sync peers only: writes wait for it (a member in memory, or in the published set while a set
  // without it is not yet in etcd).
  bool in_sync_set = false;
  bool degraded = false;  // a sync peer that left the sync set
  // Its positions count for the release points: from a handshake of this PrimaryGroup that
  // decided to stream (the replica's log is the one they describe), or from the confirmed end of
  // a full copy (copy_pending). Until then it holds no record for the release points: a sync peer
  // in the sync set holds back every WRITE and FLUSH not released before (see OnDecision).
  bool confirmed = false;
  // A full copy to it is not known complete: from the decision until the replica reports the
  // copy done and its received and durable reach the copy's end LSN.
  bool copy_pending = false;
  uint64_t next_lsn = 0;  // next LSN to send
  uint64_t inflight_bytes = 0;
  uint64_t window_bytes = 0;
  Nanos rtt = 0;               // min RTT over the last 10 s, 0 if unknown
  uint64_t delivery_rate = 0;  // bytes/s acknowledged as received, recent
  Lag lag;
  std::string last_error;  // the last disconnect or refusal reason
};

// The sync set as a primary publishes it to etcd (docs/coordinator.md, "Sync writes and the
// election"): the peers client writes wait for (sorted names), and a floor. Every write that may
// have completed in sync mode is on every member, and at or below floor_lsn (so with no member, a
// site that holds floor_lsn holds every such write).
struct SyncSet {
  std::vector<std::string> members;
  uint64_t floor_lsn = 0;
  bool operator==(const SyncSet&) const = default;
};
// "{a,b} floor 17"
std::string DescribeSyncSet(const SyncSet& s);

// The primary's view of one group: the local log's progress, every peer, and the release points
// that decide when client I/O may complete.
class PrimaryGroup {
 public:
  PrimaryGroup();
  ~PrimaryGroup();
  PrimaryGroup(PrimaryGroup&&) noexcept;
  PrimaryGroup& operator=(PrimaryGroup&&) noexcept;

  // Peers (from config). A peer starts kDisconnected, positions from `initial` (persisted), not
  // confirmed: they count for the release points only after its handshake decides to stream (a
  // replica may have been resynced, or be in a copy, while this primary was down).
  void AddPeer(const std::string& peer, const SenderOptions& options, Positions initial, Nanos now);

  // The local log: records up to `lsn` are in the local log; `bytes` is the stored size of the
  // record `lsn` and `timestamp_ns` its capture time. Call once per record, in LSN order.
  void OnLocalAppend(uint64_t lsn, uint64_t bytes, uint64_t timestamp_ns, Nanos now);
  void OnLocalDurable(uint64_t lsn);
  // The local log dropped records below `first_lsn` (retention).
  void OnLocalTruncate(uint64_t first_lsn);
  // The local applier has applied records up to `lsn` to the volumes. A full copy from the start
  // is based on this LSN (OnDecision's copy_base_lsn), which can be below every peer's durable LSN,
  // so the lag index keeps every record after min(applied, every peer's durable): a copy's base is
  // then always in it and the lag of the copied peer stays exact. Call it as the applier advances;
  // until it is first called nothing is dropped from the index.
  void OnLocalApplied(uint64_t lsn);

  // Link events.
  void OnConnected(const std::string& peer, Nanos now);  // Hello sent -> kHandshake
  // The decision came back. For kStreamFrom the stream continues at d.start_lsn; for kFullCopy
  // the caller starts a copy at `copy_base_lsn` (its applied LSN) and the log streams from
  // copy_base_lsn + 1 (or from d.start_lsn when resuming). Returns the LSN to stream from.
  // A full copy from the start replaces the peer's log, so it is the one event that lowers the
  // peer's known positions: received and durable become copy_base_lsn (retention must keep every
  // record after it), applied at most that. copy_base_lsn must be at least the LSN last given to
  // OnLocalApplied (the lag index keeps records only from there). kRefuse -> kRefused with the
  // reason in last_error.
  // kStreamFrom confirms the peer's positions (PeerStatus::confirmed). Any kFullCopy makes the
  // peer copy_pending and unconfirmed: it holds records up to the copy's base only as copied
  // chunks, and a replica is consistent (promotable) only once the copy is complete and its log
  // reaches the copy's end LSN. Until then it counts as holding no record for the release points,
  // so a sync peer in the sync set holds back every WRITE and FLUSH not released before the
  // decision (the release points may drop); with sync_degrade_after it leaves the sync set once
  // the oldest of those has waited that long, and rejoins only when the copy is complete. kRefuse
  // unconfirms too.
  uint64_t OnDecision(const std::string& peer, const HandshakeDecision& d, uint64_t copy_base_lsn,
                      Nanos now);
  // The last chunk is sent, then CopyDone{end_lsn}: kCopying -> kStreaming. The copy is complete
  // for the release points once the replica reports positions without `copying` and with received
  // and durable at least end_lsn.
  void OnCopyDone(const std::string& peer, uint64_t end_lsn, Nanos now);
  void OnDisconnected(const std::string& peer, const std::string& reason, Nanos now);
  // A position update. Values below what is known are ignored (never go backwards). Returns true
  // if a release point may have moved.
  bool OnPosition(const std::string& peer, const Positions& p, Nanos now);
  // A heartbeat with an echo request went at `now` (every one, so that those sent with nothing in
  // flight time the link's RTT without a queue).
  void OnHeartbeatSent(const std::string& peer, Nanos now);
  // A heartbeat's echo, `rtt` after it was sent. Also starts and ends RTT probes (as BBR's
  // PROBE_RTT): when an async (or degraded) streaming link's samples have all been over 2 x
  // its RTT without a queue (from a heartbeat sent with nothing in flight) for 100 such RTTs
  // (2-8 s), or no such RTT is known, it stops sending until nothing is in flight
  // (RttProbeReady); the caller then sends a heartbeat, whose echo ends the probe (OnTick gives
  // a probe up after 2 s). The window (2 x rtt x rate) then no longer grows from a queue the
  // window itself let build at a slow replica.
  void OnRttSample(const std::string& peer, Nanos rtt, Nanos now);
  bool RttProbeReady(const std::string& peer) const;
  // Timers: degrading sync peers, batch delays. Returns true if a release point may have moved.
  bool OnTick(Nanos now);

  // Sending. NextSend is nullopt when nothing is due (nothing new, window full, or coalescing);
  // after sending, OnSent with what the batch really held.
  std::optional<SendPlan> NextSend(const std::string& peer, Nanos now) const;
  void OnSent(const std::string& peer, uint64_t first_lsn, uint64_t last_lsn, uint64_t bytes,
              Nanos now);
  // Earliest time a coalescing peer should be asked again (nullopt: no timer needed).
  std::optional<Nanos> NextDeadline() const;

  // Release points: client WRITEs with LSN <= write_released() and FLUSH/FUA targets <=
  // flush_released() may complete. With no sync peer in the sync set these are the local last and
  // durable LSN.
  uint64_t write_released() const;
  uint64_t flush_released() const;

  // The sync set in etcd (with a coordinator; docs/coordinator.md, "Sync writes and the
  // election"). The election trusts the set the primary last published, so once gated:
  //   - nothing completes before the first set of this PrimaryGroup is published (the set in etcd
  //     is then an older epoch's, whose members need not be this primary's sync peers);
  //   - a member counts for the release points until a set without it is published (a degrade
  //     takes effect in memory at once, on the release points only once etcd has it);
  //   - while a set with no member is in flight, or failed without an answer (etcd may have
  //     applied it), the release points stay at its floor until a later set is published;
  //   - a member that rejoins counts at once and is published after; but under a published set
  //     with no member (which lets the election choose any site holding its floor) the release
  //     points stay where they were at the rejoin until a set with a member is in etcd.
  // Call once, after the log's records were given to OnLocalAppend and before any client write.
  void GateOnPublishedSyncSet();
  // The set to publish now: nullopt if not gated, one is in flight, or etcd holds what is wanted
  // (and no set that failed without an answer is left to replace).
  // The caller publishes it (one at a time) and reports OnSyncSetSent, then OnSyncSetPublished.
  std::optional<SyncSet> SyncSetToPublish() const;
  void OnSyncSetSent(const SyncSet& s);
  // The answer: `ok` = etcd holds `s` now; false = it may or may not (a later Txn of the same
  // primary must not be overtaken by it: the caller's deadline exceeds any delay of a request).
  // Returns true if a release point may have moved.
  bool OnSyncSetPublished(const SyncSet& s, bool ok);
  std::optional<SyncSet> published_sync_set() const;

  uint64_t last_lsn() const;
  uint64_t durable_lsn() const;
  std::vector<PeerStatus> Status(Nanos now) const;
  // The smallest durable LSN over all peers (what retention must keep after); last_lsn if none.
  uint64_t MinPeerDurable() const;

 private:
  struct Impl;  // replication.cc
  std::unique_ptr<Impl> impl_;
};

// ---------------------------------------------------------------------------------------------
// Replica side

class ReplicaReceiver {
 public:
  // From the persisted view. received and durable start at view.last_lsn (the caller syncs its
  // log when it opens it); applied at 0 until OnApplied(checkpoint).
  explicit ReplicaReceiver(ReplicaView view);

  // Decides the handshake (DecideHandshake) and, when hello.epoch > newest_epoch, raises it: the
  // caller persists newest_epoch() BEFORE sending the decision. On kRestore the view's
  // restore_epoch becomes hello.epoch and, unless resuming, the resume point (copy_volume,
  // copy_offset) goes back to the start: persist both with the epoch.
  HandshakeDecision OnHello(const PrimaryHello& hello);

  struct BatchCheck {
    enum class Verdict : uint8_t { kAppend, kReject } verdict = Verdict::kReject;
    uint64_t skip_records = 0;  // records at the front already held (a resend): drop them
    bool begins_epoch = false;  // the batch's epoch is newer than the log's: begin it first
    std::string reason;         // kReject: for the log and the stream's error
  };
  // A batch of `count` records from `first_lsn`, written in `epoch` (all records of one batch
  // share an epoch: the records' own epoch, which is older than the stream's while a replica
  // catches up across an epoch change; the shipper splits batches at epoch boundaries). Fencing
  // is per stream: the stream's Hello epoch must still be the newest seen. Accepted when the
  // epoch matches the Hello's history at every LSN of the batch, is not older than the log's
  // current epoch, and first_lsn <= last_lsn + 1. On kAppend with begins_epoch the view's
  // history already holds the new entry (epoch, first appended LSN).
  BatchCheck OnBatch(uint64_t epoch, uint64_t first_lsn, uint32_t count);
  // Full copy: the log is reset to start at log_start_lsn (nothing held yet). The view's history
  // becomes the primary's history (`primary_history`, from CopyBegin; the Hello's if omitted) up
  // to log_start_lsn - 1 (HistoryUpTo), so later handshakes compare the copied prefix too; the
  // caller persists that same history with the reset log. Positions drop to log_start_lsn - 1.
  void OnCopyBegin(uint64_t epoch, uint64_t log_start_lsn);
  void OnCopyBegin(uint64_t epoch, uint64_t log_start_lsn, const History& primary_history);
  // A chunk was written: the copy resumes at (volume, next_offset) after a restart (persist).
  void OnCopyChunk(uint32_t volume, uint64_t next_offset);
  // The copy finished at L1: the replica is consistent once applied >= L1 (persist the view, with
  // consistent_at_epoch: the epoch of L1 in the stream's history). The caller restarts its
  // applier from log_start_lsn; applied is log_start_lsn - 1 from here. Ends a restore of
  // extents (kRestore) too: no restore is pending after it.
  void OnCopyDone(uint64_t consistent_at_lsn);

  // Progress of the replica's own log and volumes.
  // The two may come in either order for the same records (a log may report an fsync before the
  // append's own callback): durable is reported up to min(highest fsynced, appended).
  void OnAppended(uint64_t last_lsn);
  void OnDurable(uint64_t lsn);
  void OnApplied(uint64_t lsn);
  // After OnAppended(appended): whether to acknowledge that append now. Nothing at the primary
  // waits for an async link's `received` but its window, so a batch that asked for `durable`
  // whose fsync starts at once (`fsync_busy` false) is acknowledged by the `durable` ack alone: one
  // Position per batch. Now otherwise: when an fsync is already running `durable` is two fsyncs
  // away (the window would hold them), and when the fsync was reported first it waited for this.
  bool AckAppendNow(bool async_link, bool durable_requested, bool fsync_busy,
                    uint64_t appended) const;

  // The position to report if it changed since the last TakeAck, else nullopt. After OnHello the
  // next TakeAck always reports (the new stream's primary knows nothing yet), except after a
  // decision for a full copy from the start: nothing until OnCopyBegin (the old log's positions
  // would undo the base the primary registered).
  std::optional<Positions> TakeAck();
  const Positions& positions() const;

  uint64_t newest_epoch() const;
  // The epoch of `lsn` in the stream's history: what OnCopyDone records as consistent_at_epoch
  // (for the caller to persist before it calls OnCopyDone).
  uint64_t StreamEpochAt(uint64_t lsn) const;
  const ReplicaView& view() const;
  bool consistent() const;  // not copying, and applied >= the copy's consistent-at LSN

 private:
  uint64_t LogEpoch() const;  // epoch of the log's newest record (its history's last entry)

  ReplicaView view_;
  Positions pos_;
  uint64_t synced_ = 0;  // highest LSN reported fsynced (OnDurable), perhaps not yet appended
  Positions acked_;
  bool acked_once_ = false;
  // The stream being served: its Hello (epoch and history). Batches check against it.
  bool have_stream_ = false;
  bool awaiting_copy_begin_ = false;  // decided a copy from the start: no acks until CopyBegin
  uint64_t stream_epoch_ = 0;
  // Last LSN of the batches accepted, which may not be appended yet: the node appends
  // asynchronously and the next batch may arrive first. Acks still follow OnAppended/OnDurable.
  uint64_t accepted_ = 0;
  History stream_history_;
};

}  // namespace tvilling::core
