// coordination.h: connects the fail-over coordinator (agent/coordinator/) to this agent's groups
// (docs/coordinator.md): what each group reports to etcd, and what the coordinator's actions do
// to the group.
//
// What works today: the configured primary serves writes only while the coordinator has it hold
// the group's leader key with a fresh lease (its client I/O starts suspended and is resumed on
// promotion; suspended when the lease cannot be renewed in time; held writes are failed on
// demotion). Replicas publish their durable LSN and consistency. Switching a running group between
// primary and replica is not implemented yet: a replica that the coordinator elects logs that it
// cannot take over, and stays a replica.
#pragma once

#include <absl/status/statusor.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "agent/coordinator/coordinator.h"
#include "agent/node/group_runtime.h"
#include "agent/ops/config.h"
#include "tvilling/v1/control.pb.h"

namespace tvilling::node {

// Builds the coordinator for `config` (which must have a [coordinator] table) and starts it.
// `status[group]` fills the group's status (as for tvillingctl). Suspends the client I/O of every
// group this agent is configured primary of until the coordinator promotes it.
absl::StatusOr<std::unique_ptr<coordinator::Coordinator>> StartCoordination(
    const ops::Config& config, const std::vector<std::unique_ptr<GroupRuntime>>& groups,
    const std::map<std::string, std::function<void(v1::GroupStatus*)>>& status);

}  // namespace tvilling::node
