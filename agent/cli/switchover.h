// switchover.h: `tvillingctl switchover --group G --to SITE [--dry-run] [--timeout S]`
// (docs/coordinator.md, "Switchover"). --dry-run asks the local agent (the group's primary) for
// its status and prints core::PlanSwitchover's plan: the steps, the target's current lag and the
// expected write pause, or why the switchover would be refused. Without it the agent carries the
// switchover out and the measured write pause is printed; a refusal or a roll-back exits 3.
#pragma once

#include <chrono>
#include <ostream>
#include <string>
#include <vector>

namespace tvilling::cli {

// A plan that cannot be carried out (its reasons are printed).
inline constexpr int kExitRefused = 3;

struct SwitchoverArgs {
  std::string group;
  std::string to;
  bool dry_run = false;
  double timeout_s = 30;  // how long the target may take to catch up
};

struct EvacuateArgs {
  std::string from;
  std::string to;
  size_t concurrency = 1;
  std::vector<std::string> order;  // these first, then the others in name order
  bool dry_run = false;
  double timeout_s = 30;  // per group, as SwitchoverArgs::timeout_s
};

int Evacuate(const std::string& socket, std::chrono::milliseconds rpc_timeout,
             const EvacuateArgs& args, std::ostream& out, std::ostream& err);

int Switchover(const std::string& socket, std::chrono::milliseconds rpc_timeout,
               const SwitchoverArgs& args, std::ostream& out, std::ostream& err);

}  // namespace tvilling::cli
