// coordination.h: connects the fail-over coordinator (agent/coordinator/) to this agent's groups
// (docs/coordinator.md): what each group reports to etcd, and what the coordinator's actions do
// to the group.
//
// A site serves a group as primary only while the coordinator has it hold the group's leader key
// with a fresh lease: every site starts as a replica (the configured primary with its client
// writes held, not refused, until the election); the coordinator's promote starts the group's
// replicator in the etcd epoch (the key's create revision) and its resume releases client I/O;
// suspend holds it when the lease cannot be renewed in time; demote (or another site's key)
// switches the group back to a replica and fails held writes (group_controller.h). Each site
// publishes its durable LSN and consistency, the primary its lag report.
#pragma once

#include <absl/status/statusor.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "agent/coordinator/coordinator.h"
#include "agent/node/group_controller.h"
#include "agent/ops/config.h"
#include "tvilling/v1/control.pb.h"

namespace tvilling::node {

// Builds the coordinator for `config` (which must have a [coordinator] table) and starts it.
// `groups[i]` is the controller of config.groups[i], started as a replica (GroupController::Start
// with await_election for the configured primary).
absl::StatusOr<std::unique_ptr<coordinator::Coordinator>> StartCoordination(
    const ops::Config& config, const std::vector<std::unique_ptr<GroupController>>& groups);

}  // namespace tvilling::node
