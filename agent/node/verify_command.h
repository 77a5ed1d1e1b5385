// verify_command.h: `tvillingctl verify` inside the agent (Control.Verify): checks the request
// against the config and the group's role, runs node::RunVerify for each peer asked, streams the
// progress, keeps the results for the status and the metrics (VerifyRegistry) and audits them.
#pragma once

#include <absl/status/status.h>

#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <string>

#include "agent/node/audit_log.h"
#include "agent/node/group_controller.h"
#include "agent/node/verify.h"
#include "agent/ops/config.h"
#include "tvilling/v1/control.pb.h"

namespace tvilling::node {

// The running and last verify of each (group, peer). With a file, the last finished result of
// each survives restarts (a verify of a large volume takes hours; its mismatches must not vanish
// with an agent restart): written atomically after every finished verify, loaded at start. A file
// that does not parse is reported (its path and why) and replaced by the next result.
class VerifyRegistry {
 public:
  VerifyRegistry() = default;
  explicit VerifyRegistry(std::filesystem::path file);
  // Sets `verify` of every peer of `group` that has one.
  void Fill(v1::GroupStatus* group) const;
  void Update(const std::string& group, const std::string& peer, const v1::VerifyStatus& status);
  // One verify per group at a time: false if one runs.
  bool TryBegin(const std::string& group);
  void End(const std::string& group);

 private:
  // Writes finished_ to file_ (tmp file, fsync, rename). REQUIRES: mu_ held.
  void SaveLocked();

  std::filesystem::path file_;  // empty: in memory only
  mutable std::mutex mu_;
  std::map<std::pair<std::string, std::string>, v1::VerifyStatus> last_;
  // The last finished result of each (what the file holds while a new verify runs).
  std::map<std::pair<std::string, std::string>, v1::VerifyStatus> finished_;
  std::set<std::string> running_;
};

struct VerifyCommandContext {
  const ops::Config* config = nullptr;
  GroupController* controller = nullptr;  // the group's, null if not configured
  VerifyPeer* peer = nullptr;             // null if the agent has no peers
  VerifyRegistry* registry = nullptr;
  AuditLog* audit = nullptr;
};

// Default read rate of the primary's volumes (VerifyRequest.rate_bytes_per_s = 0).
inline constexpr uint64_t kDefaultVerifyRateBytesPerS = 64ull << 20;

// Serves one Control.Verify call. A refusal (unknown group, volume or peer; not the primary; a
// verify of the group running) is the returned status, before anything is sent; otherwise every
// peer's result goes out as its last VerifyProgress (done) and OK is returned.
absl::Status ServeVerify(const VerifyCommandContext& ctx, const v1::VerifyRequest& req,
                         const std::function<bool(const v1::VerifyProgress&)>& send);

}  // namespace tvilling::node
