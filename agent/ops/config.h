// config.h: the configuration file of tvillingd (TOML), as plain structs, parsed and validated
// once.
//
// An operator writes a file like deploy/examples/single-node.toml:
//
//   [agent]    site, state_dir          who this agent is and where its data lives
//   [log]      the group-log store      one RocksDB for every group of the agent (not daemon
//   logging;
//                                       that is --log-level / --log-format, see logging.h)
//   [nbd]      listeners and limits     the NBD frontend
//   [[group]]  name, [[group.volume]]   consistency groups and their volumes
//              primary, [[group.peer]]  ...and the sites that mirror them (docs/replication.md)
//   [tls]      ca, cert, key, insecure  mutual TLS between the agents' replication endpoints
//   [replication]  listen, tuning       where peers connect; windows, batching, keepalive
//   [[acl]]    identity, site, groups   which certificate may act as which site, for which groups
//   [control]  unix_socket              the control API that tvillingctl talks to
//   [metrics]  listen                   the Prometheus endpoint (GET /metrics)
//   [coordinator]  endpoints, policy    fail-over on etcd (docs/coordinator.md)
//
// docs/configuration.md describes every key for operators.
//
// LoadConfig/ParseConfig reject a file with any unknown key, wrong type or broken rule, and report
// every problem at once, each as `<file>:<line>:<col>: <key path>: <what is wrong>` (e.g.
// `tvilling.toml:14:8: group[0].volume[1].size: must be a multiple of 512 bytes, got 1000`). A
// config that loads is complete: defaults are filled in and every path is absolute, so nothing
// downstream needs to check it again (TLS files were readable when the config was validated). Later
// issues add tables next to these; an older agent rejects them as unknown keys
// rather than silently ignoring them. A single-node config needs none of the replication tables.
#pragma once

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tvilling::ops {

inline constexpr std::string_view kDefaultStateDir = "/var/lib/tvilling";

// Bounds that Validate() enforces. They keep every queue and batch finite and catch unit mistakes
// (e.g. a byte count typed where MiB was meant).
inline constexpr uint32_t kMaxNameLength = 63;
inline constexpr uint32_t kMaxExportNameLength = 255;
inline constexpr uint32_t kMaxGroups = 1024;
inline constexpr uint32_t kMaxVolumesPerGroup = 1024;
inline constexpr uint32_t kMaxListeners = 64;
inline constexpr uint32_t kMaxNbdThreads = 64;
inline constexpr uint64_t kVolumeSizeAlignmentBytes = 512;  // NBD clients address 512-byte sectors
inline constexpr uint64_t kMinWriteBufferBytes = 1ull << 20;
inline constexpr uint64_t kMaxWriteBufferBytes = 64ull << 30;
inline constexpr uint64_t kMinBatchBytes = 4096;
inline constexpr uint64_t kMaxBatchBytes = 1ull << 30;
inline constexpr uint32_t kMaxBatchRecords = 1u << 20;
inline constexpr uint32_t kMaxCheckpointIntervalMs = 3'600'000;  // 1 h
inline constexpr uint64_t kMinCheckpointChunkBytes = 64ull << 10;
inline constexpr uint64_t kMaxCheckpointChunkBytes = 1ull << 30;
inline constexpr uint64_t kMinCheckpointBytes = 1ull << 20;
inline constexpr uint64_t kMaxCheckpointBytes = 64ull << 30;
inline constexpr uint32_t kMaxInflightRequests = 65536;
// One NBD request may carry up to 32 MiB (nbd::ExportInfo::max_payload_bytes); a per-connection
// byte budget below that could never admit it.
inline constexpr uint64_t kMinInflightBytes = 32ull << 20;
inline constexpr uint64_t kMaxInflightBytes = 64ull << 30;
inline constexpr size_t kMaxUnixSocketPathBytes = 107;  // sizeof(sockaddr_un::sun_path) - 1
inline constexpr size_t kMaxConfigFileBytes = 1u << 20;
inline constexpr uint32_t kMaxPeersPerGroup = 16;
inline constexpr uint32_t kMaxAclEntries = 1024;
inline constexpr uint32_t kMaxTlsNameLength = 253;  // a DNS name
// Replication tuning bounds. A batch is at most 64 MiB uncompressed on the wire
// (docs/replication.md, "Records on the wire").
inline constexpr uint64_t kMinReplicationWindowBytes = 64ull << 10;
inline constexpr uint64_t kMaxReplicationWindowBytes = 16ull << 30;
inline constexpr uint64_t kMinReplicationBatchBytes = 4096;
inline constexpr uint64_t kMaxReplicationBatchBytes = 64ull << 20;
inline constexpr uint32_t kMaxBatchDelayUs = 1'000'000;  // 1 s
inline constexpr uint32_t kMinKeepaliveMs = 100;
inline constexpr uint32_t kMaxKeepaliveMs = 600'000;  // 10 min
inline constexpr uint32_t kMaxReplicaSyncIntervalMs = 60'000;
inline constexpr uint32_t kMaxSyncDegradeAfterMs = 86'400'000;  // 1 day
// The identity of an [[acl]] entry that matches any peer; accepted only with tls.insecure.
inline constexpr std::string_view kAnyIdentity = "*";
// A [[acl]] groups element that means every group of this agent.
inline constexpr std::string_view kAnyGroup = "*";

// [agent]
struct AgentConfig {
  // `site`: this agent's site, [a-z0-9-]{1,63}. Required.
  std::string site;
  // `state_dir`: root of the agent's data; absolute. Default kDefaultStateDir. The --state-dir flag
  // (state_dir_override below) replaces it. Relative paths elsewhere in the config resolve against
  // it.
  std::filesystem::path state_dir;
};

// [log]: the group-log store, one RocksDB shared by all groups (storage::LogStore).
struct LogConfig {
  // `dir`: the RocksDB directory. Default "log" (i.e. <state_dir>/log).
  std::filesystem::path dir = "log";
  // `write_buffer`: memtable size, bytes. Default 256 MiB. Records applied and truncated while
  // still in the memtable never reach an SST, so this bounds write amplification when peers keep
  // up.
  uint64_t write_buffer_bytes = 256ull << 20;
  // `max_batch_bytes` / `max_batch_records`: one commit (one WriteBatch, at most one fsync) is cut
  // at whichever comes first. Defaults 8 MiB and 4096.
  uint64_t max_batch_bytes = 8ull << 20;
  uint32_t max_batch_records = 4096;
  // `external_payload_min`: bytes; a record whose payload is at least this big keeps it in a
  // payload file next to RocksDB, which holds only a reference (docs/log-format.md, "External
  // payloads"). 0 = every payload in RocksDB. Default 64 KiB; 0 or 17 B to 32 MiB.
  uint64_t external_payload_min_bytes = 64ull << 10;
  // `retention_bytes` / `retention_seconds`: keep at least this much history even when no one needs
  // it. 0 (default) = none.
  uint64_t retention_bytes = 0;
  uint64_t retention_seconds = 0;
  // `hard_cap`: bytes; above it records are dropped even if a peer still needs them (that peer then
  // needs a full copy). 0 (default) = no cap. Must be >= retention_bytes when both are set.
  uint64_t hard_cap_bytes = 0;
  // `checkpoint_interval_ms`: how often the applier fsyncs the volumes and records the applied LSN,
  // i.e. how much log a restart may replay. Default 1000.
  uint32_t checkpoint_interval_ms = 1000;
  // `checkpoint_bytes`: ... or sooner, once this many bytes were applied since the last checkpoint.
  // The log is truncated only behind a checkpoint, so this also bounds how much of the log is
  // still live when the memtable is flushed (and written to an SST). Default 16 MiB.
  uint64_t checkpoint_bytes = 16ull << 20;
  // `checkpoint_chunk`: a checkpoint writes the volumes' dirty ranges back in pieces of at most
  // this many bytes, one at a time, before it fsyncs them, so a log fsync never waits behind a
  // whole checkpoint (node::GroupRuntimeOptions::checkpoint_chunk_bytes). 0 = one unpaced fsync.
  // Default 4 MiB.
  uint64_t checkpoint_chunk_bytes = 4ull << 20;
  // `writeback`: the log's payload files and, between checkpoints, the volumes are written back
  // once this many bytes were written to them, without an fsync, so the disk sees a steady stream
  // rather than a checkpoint's worth at once (node::GroupRuntimeOptions::writeback_bytes,
  // storage::GroupLogOptions::payload_writeback_bytes). 0 = only at checkpoints and fsyncs.
  // Default 1 MiB.
  uint64_t writeback_bytes = 1ull << 20;
};

// One TCP listener: an IP literal and a port (host names are not resolved; bind to what is
// written).
struct ListenAddress {
  std::string host;  // without brackets: "127.0.0.1", "::1", "0.0.0.0", "::"
  uint16_t port = 0;
  // "127.0.0.1:10809", "[::1]:10809".
  [[nodiscard]] std::string ToString() const;
  bool operator==(const ListenAddress&) const = default;
};

// Parses "host:port": an IPv4 literal or a bracketed IPv6 literal, and a port 1..65535.
[[nodiscard]] absl::StatusOr<ListenAddress> ParseListenAddress(std::string_view text);

// Parses the "host:port" of a peer to dial: like ParseListenAddress, but the host may also be a DNS
// name (letters, digits, '-', '.'; resolved when dialling, not here). ToString() gives the gRPC
// target ("site-b.example.net:7301", "[::1]:7301").
[[nodiscard]] absl::StatusOr<ListenAddress> ParseDialAddress(std::string_view text);

// [nbd]: the NBD frontend.
struct NbdConfig {
  // `listen`: TCP listeners, "host:port" each (e.g. "127.0.0.1:10809", "[::1]:10809"). Default
  // none.
  std::vector<ListenAddress> listen;
  // `unix_sockets`: unix socket paths (relative to state_dir). Default none. At least one listener
  // (TCP or unix) is required: nothing is exposed unless the operator asked for it.
  std::vector<std::filesystem::path> unix_sockets;
  // `threads`: I/O threads, 1..64. Default 1.
  uint32_t threads = 1;
  // `max_inflight_requests` / `max_inflight_bytes`: per connection; the server stops reading
  // requests beyond them. Defaults 256 and 128 MiB.
  uint32_t max_inflight_requests = 256;
  uint64_t max_inflight_bytes = 128ull << 20;
};

// [[group.volume]]
struct VolumeConfig {
  // `name`: [A-Za-z0-9_-]{1,63}, unique across the agent. Required.
  std::string name;
  // `export`: the NBD export name, printable ASCII without spaces, 1..255 bytes, unique across the
  // agent. Default: `name`.
  std::string export_name;
  // `path`: a file or a block device (relative to state_dir). Required.
  std::filesystem::path path;
  // `size`: bytes, > 0 and a multiple of 512. Required for a file (created sparse if missing); a
  // block device may omit it (0 here = the whole device).
  uint64_t size_bytes = 0;
  // `read_only`: refuse writes from NBD clients. Default false.
  bool read_only = false;
  // `direct_io`: open the volume with O_DIRECT. Default false.
  bool direct_io = false;
};

// How a WRITE waits for a peer (docs/ARCHITECTURE.md, "Modes").
enum class PeerMode {
  kAsync,  // a write completes in the primary's log; the peer follows
  kSync,   // a write completes once it is in the peer's log too; a FLUSH once it is durable there
};
// "async", "sync".
[[nodiscard]] std::string_view PeerModeName(PeerMode mode);

// How batches are compressed on the wire (skipped per batch when it does not shrink).
enum class Compression { kNone, kLz4, kZstd };
// "none", "lz4", "zstd".
[[nodiscard]] std::string_view CompressionName(Compression compression);

// [[group.peer]]: another site that holds this group. The settings apply to the link from this
// agent when it is the group's primary (a replica only answers the stream the primary opens), so
// each site's config can describe the links it would drive after a switchover.
struct PeerConfig {
  // `site`: the peer's site, [a-z0-9-]{1,63}; not this agent's site; unique in the group. Required.
  std::string site;
  // `address`: "host:port" of the peer's [replication] listener; the host is an IP literal or a DNS
  // name. Required.
  ListenAddress address;
  // `tls_name`: the name the peer's certificate must carry (CN or DNS SAN). Default: `site`.
  std::string tls_name;
  // `mode`: "sync" or "async". Default async.
  PeerMode mode = PeerMode::kAsync;
  // `rate_limit`: bytes per second sent to this peer (a size: "100MiB" = 100 MiB/s). 0 (default) =
  // no limit.
  uint64_t rate_limit_bytes_per_second = 0;
  // `compression`: "none", "lz4" or "zstd". Default lz4.
  Compression compression = Compression::kLz4;
  // `sync_degrade_after_ms`: a sync peer disconnected this long leaves the sync set and writes
  // complete without it (reported as degraded) until it catches up again. 0 (default) = never:
  // writes wait for the peer. Only for mode = "sync".
  uint32_t sync_degrade_after_ms = 0;
};

// [[group]]: a consistency group: one ordered log for all its volumes.
struct GroupConfig {
  // `name`: [A-Za-z0-9_-]{1,63}, unique. Required.
  std::string name;
  // [[group.volume]]: at least one.
  std::vector<VolumeConfig> volumes;
  // `primary`: the site that writes this group: this agent's site or one of `peers`. Required when
  // the group has peers; defaults to this agent's site when it has none.
  std::string primary;
  // [[group.peer]]: the other sites that hold this group. Default none (a local-only group).
  std::vector<PeerConfig> peers;
  // `on_divergence`: what this agent does as a replica when its log holds records the primary's
  // history does not (an old primary's unreplicated writes; docs/replication.md, "Rejoin"):
  // "rejoin" (default) saves them to a file under state_dir/divergent, cuts the log back to the
  // fork and restores the extents they touched from the primary; "refuse" refuses the stream
  // (the operator resyncs).
  enum class OnDivergence { kRejoin, kRefuse };
  OnDivergence on_divergence = OnDivergence::kRejoin;

  // Whether this agent is the group's primary (valid after Validate).
  [[nodiscard]] bool IsPrimary(std::string_view own_site) const { return primary == own_site; }
};

// [tls]: the certificates of this agent's replication endpoints (server and client side). Required
// when any group has peers, unless `insecure = true`.
struct TlsConfig {
  // `ca`: PEM file of the CA(s) that sign every agent's certificate (relative to state_dir).
  std::filesystem::path ca;
  // `cert`: PEM file of this agent's certificate chain; its CN or a DNS SAN is the identity peers
  // see in their [[acl]] (relative to state_dir).
  std::filesystem::path cert;
  // `key`: PEM file of the private key of `cert` (relative to state_dir).
  std::filesystem::path key;
  // `insecure`: plain TCP without any authentication between agents. Default false. For tests and
  // labs only; with it, ca/cert/key must not be set and [[acl]] identities must be "*".
  bool insecure = false;

  // Whether the replication endpoints use mutual TLS (valid after Validate).
  [[nodiscard]] bool enabled() const { return !insecure && !ca.empty(); }
};

// [replication]: this agent's replication endpoint and the flow-control knobs of its outgoing
// streams (docs/replication.md, "Flow control").
struct ReplicationConfig {
  // `listen`: "host:port" (IP literal) where peers connect. Required when any group has peers;
  // must differ from every nbd.listen.
  std::optional<ListenAddress> listen;
  // `max_window` / `min_window`: bounds of the bytes in flight per peer (the window is 2 x rtt x
  // delivery rate, clamped to them). Defaults 256 MiB and 4 MiB.
  uint64_t max_window_bytes = 256ull << 20;
  uint64_t min_window_bytes = 4ull << 20;
  // `max_batch_bytes`: a batch is cut at this many uncompressed bytes. Default 4 MiB, at most
  // 64 MiB and at most min_window (a full batch always fits the window).
  uint64_t max_batch_bytes = 4ull << 20;
  // `max_batch_delay_us`: while bytes are in flight, wait at most this long to fill a batch.
  // Default 1000.
  uint32_t max_batch_delay_us = 1000;
  // `keepalive_ms`: a link silent this long is cut and redialled; heartbeats go out more often.
  // Default 10000.
  uint32_t keepalive_ms = 10000;
  // `replica_sync_interval_ms`: as a replica, fsync a batch that its primary does not wait on (a
  // sync peer's writes while no FLUSH/FUA is pending) within this long, one fsync for the burst;
  // batches the primary waits on (an async peer's, any while a FLUSH/FUA waits) are fsynced at
  // once. 1 to 60000, default 5.
  uint32_t replica_sync_interval_ms = 5;
};

// [[acl]]: who may open a replication stream into this agent. A stream is accepted only if an entry
// has the peer certificate's identity, the site the peer claims in its Hello, and the group.
struct AclConfig {
  // `identity`: a certificate CN or DNS SAN; "*" (kAnyIdentity) = any peer, only with
  // tls.insecure. A named identity appears in one entry only: it maps to exactly one site.
  // Required.
  std::string identity;
  // `site`: the site this identity may act as; a peer of the listed groups. Required.
  std::string site;
  // `groups`: the groups it may replicate into this agent, or ["*"] (kAnyGroup) for all of them.
  // Required, non-empty.
  std::vector<std::string> groups;
};

// [control]: the control API (gRPC) that tvillingctl uses.
struct ControlConfig {
  // `unix_socket`: its unix socket (relative to state_dir). Default "tvillingd.sock".
  std::filesystem::path unix_socket = "tvillingd.sock";
};

// [metrics]: the Prometheus endpoint (GET /metrics, docs/operations.md).
struct MetricsConfig {
  // `listen`: "host:port" (IP literal) of the HTTP listener. Default none: no endpoint. Must
  // differ from nbd.listen and replication.listen.
  std::optional<ListenAddress> listen;
};

// [coordinator]: the fail-over coordinator on etcd (docs/coordinator.md). Absent: roles are
// static, from each group's `primary`.
enum class FailoverPolicy { kAutomatic, kManual, kApprove };
inline constexpr uint32_t kMinLeaseTtlMs = 2000;  // etcd refuses shorter leases
inline constexpr uint32_t kMaxLeaseTtlMs = 600'000;
struct CoordinatorConfig {
  // `endpoints`: the etcd members' client addresses, "host:port" (no scheme). Required, 1 to 16.
  std::vector<std::string> endpoints;
  // `prefix`: every key the coordinator writes is under it. Default "/tvilling".
  std::string prefix = "/tvilling";
  // `ca`, `cert`, `key`: TLS to etcd (relative to state_dir). `ca` alone: TLS without a client
  // certificate; with `cert` and `key`: etcd's --client-cert-auth. None: plain TCP.
  std::filesystem::path ca, cert, key;
  // `server_name`: the name the members' certificates carry, if not the endpoint's host.
  std::string server_name;
  // `lease_ttl_ms`: TTL of this agent's etcd lease (its session). Default 3000.
  uint32_t lease_ttl_ms = 3000;
  // `suspend_after_ms`: a primary suspends client I/O this long after the send time of its last
  // answered keep-alive. Default lease_ttl_ms * 2 / 3; at least lease_ttl_ms / 3
  // and less than lease_ttl_ms.
  uint32_t suspend_after_ms = 0;
  // `policy`: "automatic", "manual" or "approve". Default "automatic".
  FailoverPolicy policy = FailoverPolicy::kAutomatic;
  // `witness`: a third site that runs only an etcd member; without one, groups with two sites
  // refuse automatic fail-over.
  std::string witness;
  // `no_failover`: never promote this site automatically. Default false.
  bool no_failover = false;
  // `max_lag` / `max_lag_ms`: the lag gate of a candidate. Defaults 1 MiB and 10000.
  uint64_t max_lag_bytes = 1ull << 20;
  uint32_t max_lag_ms = 10'000;
  // `anti_flap_ms`: no automatic promotion this soon after a leader change. Default 60000.
  uint32_t anti_flap_ms = 60'000;
  // `timeout_ms`: deadline of one etcd call (across endpoints). Default 3000.
  uint32_t timeout_ms = 3000;
};

struct Config {
  // Where the config came from (a file name), used in messages.
  std::string source;
  AgentConfig agent;
  LogConfig log;
  NbdConfig nbd;
  // [[group]]: at least one.
  std::vector<GroupConfig> groups;
  TlsConfig tls;
  ReplicationConfig replication;
  // [[acl]]: default none (no stream is accepted).
  std::vector<AclConfig> acl;
  ControlConfig control;
  MetricsConfig metrics;
  std::optional<CoordinatorConfig> coordinator;

  // Whether any group has a peer, i.e. this agent replicates at all.
  [[nodiscard]] bool HasPeers() const;
};

// Whether a peer may stream `group` into this agent: some [[acl]] entry names one of the peer's
// certificate `identities` (CN and DNS SANs; none in insecure mode, where only "*" entries match),
// has site == `claimed_site` (the Hello's sender site) and lists `group` (or "*"). Otherwise
// PermissionDenied naming the identities, the site and the group.
[[nodiscard]] absl::Status AuthorizePeer(const Config& config,
                                         const std::vector<std::string>& identities,
                                         std::string_view claimed_site, std::string_view group);

// Checks every rule and fills defaults (state_dir, export names) and resolves relative paths
// against the state directory. Reports every problem, not only the first, as one InvalidArgument.
// ParseConfig calls this; call it yourself only for a Config built in code. Idempotent. Reads the
// file system only to tell whether a volume without `size` is a block device and whether the TLS
// files are readable.
[[nodiscard]] absl::Status Validate(Config& config);

// Parses and validates TOML text. `file_name_for_errors` prefixes every message. A
// state_dir_override (the --state-dir flag) replaces agent.state_dir; a relative one is made
// absolute against the current directory.
[[nodiscard]] absl::StatusOr<Config> ParseConfig(
    std::string_view text, std::string_view file_name_for_errors,
    std::optional<std::filesystem::path> state_dir_override = std::nullopt);

// Reads `file` (at most kMaxConfigFileBytes) and calls ParseConfig.
[[nodiscard]] absl::StatusOr<Config> LoadConfig(
    const std::filesystem::path& file,
    std::optional<std::filesystem::path> state_dir_override = std::nullopt);

// Parses a size: a plain integer ("4096") or an integer with a binary unit: B, KiB, MiB, GiB, TiB
// ("1GiB", "1 GiB"). Decimal units (k, M, G, GB, ...) and fractions are rejected, with a message
// saying so. Overflow is an error.
[[nodiscard]] absl::StatusOr<uint64_t> ParseSize(std::string_view text);

// "1 GiB", "1536 KiB", "1000 B": the largest binary unit that divides the value exactly.
[[nodiscard]] std::string FormatSize(uint64_t size_bytes);

}  // namespace tvilling::ops
