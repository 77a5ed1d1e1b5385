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
//
// LoadConfig/ParseConfig reject a file with any unknown key, wrong type or broken rule, and report
// every problem at once, each as `<file>:<line>:<col>: <key path>: <what is wrong>` (e.g.
// `tvilling.toml:14:8: group[0].volume[1].size: must be a multiple of 512 bytes, got 1000`). A
// config that loads is complete: defaults are filled in and every path is absolute, so nothing
// downstream needs to check it again. Later issues add [[peer]], [tls], [etcd] and [metrics] tables
// next to these; an older agent rejects them as unknown keys rather than silently ignoring them.
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
inline constexpr uint32_t kMaxInflightRequests = 65536;
// One NBD request may carry up to 32 MiB (nbd::ExportInfo::max_payload_bytes); a per-connection
// byte budget below that could never admit it.
inline constexpr uint64_t kMinInflightBytes = 32ull << 20;
inline constexpr uint64_t kMaxInflightBytes = 64ull << 30;
inline constexpr size_t kMaxUnixSocketPathBytes = 107;  // sizeof(sockaddr_un::sun_path) - 1
inline constexpr size_t kMaxConfigFileBytes = 1u << 20;

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

// [[group]]: a consistency group: one ordered log for all its volumes.
struct GroupConfig {
  // `name`: [A-Za-z0-9_-]{1,63}, unique. Required.
  std::string name;
  // [[group.volume]]: at least one.
  std::vector<VolumeConfig> volumes;
};

struct Config {
  // Where the config came from (a file name), used in messages.
  std::string source;
  AgentConfig agent;
  LogConfig log;
  NbdConfig nbd;
  // [[group]]: at least one.
  std::vector<GroupConfig> groups;
};

// Checks every rule and fills defaults (state_dir, export names) and resolves relative paths
// against the state directory. Reports every problem, not only the first, as one InvalidArgument.
// ParseConfig calls this; call it yourself only for a Config built in code. Idempotent. Reads the
// file system only to tell whether a volume without `size` is a block device.
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
