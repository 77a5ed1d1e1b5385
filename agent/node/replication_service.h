// replication_service.h: wires a group's replication (replication.h) to the transport
// (agent/transport): TLS from the config, the listener that accepts primaries' streams and checks
// their certificate identity against [[acl]], and the dialer for this agent's own primaries.
#pragma once

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "agent/node/replication.h"
#include "agent/node/verify.h"
#include "agent/ops/config.h"

namespace tvilling::transport {
class ReplicationServer;
}

namespace tvilling::node {

// Loads and checks the TLS files of `config` (expiry, key match, CA), if TLS is on.
absl::Status CheckTls(const ops::Config& config);

// The replicator options of a group this agent is primary of.
PrimaryOptions PrimaryOptionsFor(const ops::Config& config, const ops::GroupConfig& group);
// The replica's options of `group` (the divergent-record directory under state_dir, the group's
// on_divergence).
ReplicaOptions ReplicaOptionsFor(const ops::Config& config, const ops::GroupConfig& group);

class ReplicationService {
 public:
  static absl::StatusOr<std::unique_ptr<ReplicationService>> Create(const ops::Config& config);
  ~ReplicationService();

  Dialer* dialer();
  // The primary's side of an online verify: unary calls to a peer site's agent on the same
  // channel (mutual TLS) as the streams (docs/replication.md, "Verify").
  VerifyPeer* verify_peer();
  // Groups this agent holds: streams for them are accepted (replicas) or refused (primaries).
  // Either call replaces the group's earlier role (a role switch); a stream already handed to a
  // ReplicaGroup stays with it (ReplicaGroup::Stop ends it).
  void AddReplica(const std::string& group, ReplicaGroup* replica);
  void AddPrimaryGroup(const std::string& group);
  // Starts listening on [replication] listen.
  absl::Status Start();
  // Re-reads the [tls] files (SIGHUP). If they pass the checks of CheckTls, new handshakes (new
  // streams, redials) use them within a second; open streams are not touched. Otherwise the error
  // names the file and the current certificates stay.
  absl::Status ReloadTls();
  void Shutdown();

 private:
  class Impl;
  explicit ReplicationService(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tvilling::node
