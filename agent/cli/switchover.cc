// switchover.cc: see switchover.h.
#include "agent/cli/switchover.h"

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>

#include "agent/cli/ctl.h"
#include "agent/core/switchover.h"
#include "tvilling/v1/control.grpc.pb.h"

namespace tvilling::cli {

int Switchover(const std::string& socket, std::chrono::milliseconds rpc_timeout,
               const SwitchoverArgs& args, std::ostream& out, std::ostream& err) {
  if (!args.dry_run) {
    err << "tvillingctl: switchover: only --dry-run is available yet (it prints the plan and "
           "changes nothing); the switchover itself is not built (docs/coordinator.md)\n";
    return kExitUsage;
  }
  auto channel = grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials());
  auto stub = v1::Control::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + rpc_timeout);
  v1::StatusReply reply;
  const grpc::Status status = stub->Status(&context, v1::StatusRequest(), &reply);
  if (!status.ok()) {
    err << fmt::format("tvillingctl: cannot reach tvillingd at unix socket {}: {}\n", socket,
                       status.error_message());
    return kExitUnreachable;
  }
  const v1::GroupStatus* group = nullptr;
  for (const v1::GroupStatus& g : reply.groups()) {
    if (g.name() == args.group) group = &g;
  }
  if (group == nullptr) {
    std::string names;
    for (const v1::GroupStatus& g : reply.groups()) names += (names.empty() ? "" : ", ") + g.name();
    err << fmt::format(
        "tvillingctl: switchover: tvillingd at {} (site {}) has no group \"{}\" "
        "(it has: {})\n",
        socket, reply.agent().site(), args.group, names.empty() ? "none" : names);
    return kExitUsage;
  }
  core::SwitchoverInput in;
  in.group = group->name();
  in.from_site = reply.agent().site();
  in.role = group->role();
  in.epoch = group->epoch();
  in.last_lsn = group->last_lsn();
  in.to_site = args.to;
  in.timeout = static_cast<core::Nanos>(args.timeout_s * 1e9);
  for (const v1::PeerStatus& p : group->peers()) {
    if (p.peer() != args.to) continue;
    in.target =
        core::SwitchoverTarget{p.mode(),      p.link_state(),  p.copy_pending(), p.durable_lsn(),
                               p.lag_bytes(), p.lag_seconds(), p.rtt_us(),       p.window_bytes()};
  }
  const core::SwitchoverPlan plan = core::PlanSwitchover(in);
  out << plan.Describe(in);
  return plan.possible ? kExitOk : kExitRefused;
}

}  // namespace tvilling::cli
