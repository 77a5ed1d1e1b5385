// switchover.cc: see switchover.h.
#include "agent/cli/switchover.h"

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>
#include <pwd.h>
#include <unistd.h>

#include <cstdlib>

#include "agent/cli/ctl.h"
#include "agent/core/switchover.h"
#include "tvilling/v1/control.grpc.pb.h"

namespace tvilling::cli {
namespace {

std::string LocalUser() {
  if (const char* s = std::getenv("SUDO_USER"); s != nullptr && *s != '\0') return s;
  if (const passwd* pw = getpwuid(getuid()); pw != nullptr) return pw->pw_name;
  return std::to_string(getuid());
}

int RunSwitchover(const std::string& socket, const SwitchoverArgs& args, std::ostream& out,
                  std::ostream& err) {
  auto channel = grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials());
  auto stub = v1::Control::NewStub(channel);
  grpc::ClientContext context;
  // The agent waits up to the timeout for the drain, then for the target to take the key.
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(args.timeout_s * 2000)) +
                       std::chrono::seconds(30));
  v1::SwitchoverRequest req;
  req.set_group(args.group);
  req.set_to(args.to);
  req.set_timeout_ms(static_cast<uint64_t>(args.timeout_s * 1000));
  req.set_user(LocalUser());
  req.set_uid(getuid());
  v1::SwitchoverReply reply;
  const grpc::Status status = stub->Switchover(&context, req, &reply);
  if (!status.ok()) {
    const bool refused = status.error_code() == grpc::StatusCode::FAILED_PRECONDITION ||
                         status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED ||
                         status.error_code() == grpc::StatusCode::NOT_FOUND;
    err << fmt::format("tvillingctl: switchover of group {} to {} {}: {}\n", args.group, args.to,
                       refused ? "failed" : "could not be asked",
                       status.error_message().empty()
                           ? fmt::format("gRPC code {} from tvillingd at unix socket {}",
                                         static_cast<int>(status.error_code()), socket)
                           : status.error_message());
    return refused ? kExitRefused : kExitUnreachable;
  }
  out << fmt::format("switchover: {}\n", reply.message());
  out << fmt::format("write pause: {} ms (of which {} ms waiting for {} to make LSN {} durable)\n",
                     reply.pause_ms(), reply.drain_ms(), args.to, reply.last_lsn());
  return kExitOk;
}

}  // namespace

int Switchover(const std::string& socket, std::chrono::milliseconds rpc_timeout,
               const SwitchoverArgs& args, std::ostream& out, std::ostream& err) {
  if (!args.dry_run) return RunSwitchover(socket, args, out, err);
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
