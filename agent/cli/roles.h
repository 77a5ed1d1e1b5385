// roles.h: tvillingctl's role commands and the audit history (docs/tvillingctl.md):
//
//   tvillingctl promote --group G [--yes]           this site becomes the group's primary
//   tvillingctl demote --group G [--yes]            this site becomes a replica (no coordinator)
//   tvillingctl failover approve --group G [--site S]   approve a pending automatic promotion
//   tvillingctl history [--group G] [--limit N] [--json]
//
// Promote and demote ask for confirmation on a terminal unless --yes is given (without one and
// without a terminal they refuse: exit 2). A refusal by the agent prints its reason and exits 3.
#pragma once

#include <chrono>
#include <istream>
#include <ostream>
#include <string>

namespace tvilling::cli {

struct RoleArgs {
  std::string command;  // "promote" | "demote" | "approve"
  std::string group;
  std::string site;  // approve
  bool yes = false;
};

// `in` answers the confirmation prompt when `interactive`.
int RoleCommand(const std::string& socket, std::chrono::milliseconds rpc_timeout,
                const RoleArgs& args, bool interactive, std::istream& in, std::ostream& out,
                std::ostream& err);

struct HistoryArgs {
  std::string group;
  uint32_t limit = 0;
  bool json = false;
};

int History(const std::string& socket, std::chrono::milliseconds rpc_timeout,
            const HistoryArgs& args, std::ostream& out, std::ostream& err);

}  // namespace tvilling::cli
