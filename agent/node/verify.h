// verify.h: online verify of a group's replicas (docs/replication.md, "Verify"), the I/O around
// core/verify.h: sampling a chunk of a running group's volume (both sites), and the primary's job
// that walks the volumes, asks a peer for its samples over the replication channel, applies the
// consistency rule, and optionally has the mismatching ranges restored through the copy path.
#pragma once

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "agent/core/verify.h"
#include "agent/node/group_runtime.h"
#include "tvilling/v1/control.pb.h"
#include "tvilling/v1/replication.pb.h"

namespace tvilling::node {

// Reads and hashes (XXH3-128) `chunk` of the runtime's volume with the last-write notes around the
// read (core::SampleFromRead). A read that raced a write is taken again, up to `attempts` times;
// the last sample is returned either way (stable = false then). An I/O error names the volume.
absl::StatusOr<core::ChunkSample> SampleChunk(GroupRuntime& runtime, const core::VerifyChunk& chunk,
                                              std::string& buffer, int attempts = 3);

v1::ChunkHash ToProto(const core::ChunkSample& s);
core::ChunkSample FromProto(const v1::ChunkHash& h);

// How the primary reaches a peer's agent (the ReplicationService implements it over the peer's
// mutual-TLS channel).
class VerifyPeer {
 public:
  virtual ~VerifyPeer() = default;
  virtual absl::StatusOr<v1::VerifyChunksReply> VerifyChunks(const std::string& site,
                                                             const v1::VerifyChunksRequest& req,
                                                             std::chrono::milliseconds timeout) = 0;
  virtual absl::StatusOr<v1::MarkResyncReply> MarkResync(const std::string& site,
                                                         const v1::MarkResyncRequest& req,
                                                         std::chrono::milliseconds timeout) = 0;
};

struct VerifyJob {
  std::string group;
  std::string site;  // this agent's
  std::string peer;
  uint64_t epoch = 0;  // the primary's; the job fails if it changes
  std::vector<std::string> volume_names;
  std::optional<uint32_t> volume;  // only this one
  uint64_t chunk_bytes = core::kVerifyChunkBytes;
  uint64_t rate_bytes_per_s = 64ull << 20;  // 0 = no limit
  bool resync = false;
  std::chrono::milliseconds resync_timeout{600'000};
  std::chrono::milliseconds progress_interval{500};
  // Whether this site is still the group's primary in `epoch` (checked before every request).
  std::function<bool()> still_primary;
  // The peer's status as the replicator sees it (for waiting on a resync's restore).
  std::function<std::optional<v1::PeerStatus>()> peer_status;
};

// Runs the verify of one peer and returns its final status. `progress` is called about every
// progress_interval with the running status; returning false cancels the verify (state
// "cancelled").
v1::VerifyStatus RunVerify(GroupRuntime& runtime, VerifyPeer& peer, const VerifyJob& job,
                           const std::function<bool(const v1::VerifyStatus&)>& progress);

}  // namespace tvilling::node
