// switchover.h: the plan of a controlled switchover of one group from its primary to a replica
// (docs/coordinator.md, "Switchover"), as a pure function of what the primary knows: what
// `tvillingctl switchover --dry-run` prints, and the checks the switchover itself will make first.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "agent/core/replication.h"  // Nanos

namespace tvilling::core {

// The target as the primary sees it (its PeerStatus).
struct SwitchoverTarget {
  std::string mode;        // "sync" | "async"
  std::string link_state;  // core::LinkStateName: "streaming" is the only one that can catch up
  bool copy_pending = false;
  uint64_t durable_lsn = 0;
  uint64_t lag_bytes = 0;
  double lag_seconds = 0;
  uint64_t rtt_us = 0;
  uint64_t window_bytes = 0;
};

struct SwitchoverInput {
  std::string group;
  std::string from_site;  // the agent asked
  std::string role;       // its role in the group: "primary" | "replica"
  uint64_t epoch = 0;
  uint64_t last_lsn = 0;
  std::string to_site;
  std::optional<SwitchoverTarget> target;  // nullopt: not a peer of the group
  Nanos timeout = 0;                       // how long the target may take to catch up
};

struct SwitchoverPlan {
  bool possible = false;
  std::vector<std::string> refusals;  // why not (possible == false)
  std::vector<std::string> steps;
  // Estimates from the current lag, RTT and window (not measurements): time to drain the target's
  // lag once writes are paused, and the whole write pause.
  Nanos expected_drain = 0;
  Nanos expected_pause = 0;
  // The text tvillingctl prints.
  std::string Describe(const SwitchoverInput& in) const;
};

SwitchoverPlan PlanSwitchover(const SwitchoverInput& in);

}  // namespace tvilling::core
