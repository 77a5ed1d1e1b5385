// switchover.cc: see switchover.h.
#include "agent/cli/switchover.h"

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>
#include <pwd.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>

#include "agent/cli/ctl.h"
#include "agent/core/evacuation.h"
#include "agent/core/switchover.h"
#include "tvilling/v1/control.grpc.pb.h"

namespace tvilling::cli {
namespace {

// What core::PlanSwitchover needs, from the agent's status of the group.
core::SwitchoverInput PlanInput(const std::string& site, const v1::GroupStatus& group,
                                const std::string& to, double timeout_s) {
  core::SwitchoverInput in;
  in.group = group.name();
  in.from_site = site;
  in.role = group.role();
  in.epoch = group.epoch();
  in.last_lsn = group.last_lsn();
  in.to_site = to;
  in.timeout = static_cast<core::Nanos>(timeout_s * 1e9);
  for (const v1::PeerStatus& p : group.peers()) {
    if (p.peer() != to) continue;
    in.target =
        core::SwitchoverTarget{p.mode(),      p.link_state(),  p.copy_pending(), p.durable_lsn(),
                               p.lag_bytes(), p.lag_seconds(), p.rtt_us(),       p.window_bytes()};
  }
  return in;
}

// One Control.Switchover call (the agent pauses, drains, hands over, or rolls back).
grpc::Status CallSwitchover(v1::Control::Stub* stub, const std::string& group,
                            const std::string& to, double timeout_s, v1::SwitchoverReply* reply,
                            const std::string& why = "") {
  grpc::ClientContext context;
  // The agent waits up to the timeout for the drain, then for the target to take the key.
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 2000)) +
                       std::chrono::seconds(30));
  v1::SwitchoverRequest req;
  req.set_group(group);
  req.set_to(to);
  req.set_timeout_ms(static_cast<uint64_t>(timeout_s * 1000));
  req.set_user(LocalUser());
  req.set_uid(getuid());
  req.set_context(why);
  return stub->Switchover(&context, req, reply);
}

int RunSwitchover(const std::string& socket, const SwitchoverArgs& args, std::ostream& out,
                  std::ostream& err) {
  auto channel = grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials());
  auto stub = v1::Control::NewStub(channel);
  v1::SwitchoverReply reply;
  const grpc::Status status =
      CallSwitchover(stub.get(), args.group, args.to, args.timeout_s, &reply);
  if (!status.ok()) {
    const bool refused = status.error_code() == grpc::StatusCode::FAILED_PRECONDITION ||
                         status.error_code() == grpc::StatusCode::ABORTED ||
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

// SIGINT during an evacuation: stop starting groups (the handler only sets the flag).
volatile std::sig_atomic_t g_interrupted = 0;
extern "C" void OnEvacuationInterrupt(int) { g_interrupted = 1; }

// Installs OnEvacuationInterrupt for SIGINT while it lives; the previous action comes back after.
class InterruptGuard {
 public:
  InterruptGuard() {
    g_interrupted = 0;
    struct sigaction sa {};
    sa.sa_handler = OnEvacuationInterrupt;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_);
  }
  ~InterruptGuard() { sigaction(SIGINT, &old_, nullptr); }
  InterruptGuard(const InterruptGuard&) = delete;
  InterruptGuard& operator=(const InterruptGuard&) = delete;

 private:
  struct sigaction old_ {};
};

// How a switchover RPC ended, for the scheduler and the report.
struct GroupResult {
  std::string group;
  core::EvacuationState state = core::EvacuationState::kFailed;
  std::string detail;
};

GroupResult ClassifySwitchover(const std::string& group, const std::string& socket,
                               const grpc::Status& status, const v1::SwitchoverReply& reply) {
  if (status.ok()) {
    return {group, core::EvacuationState::kMoved,
            fmt::format("{} (write pause {} ms)", reply.message(), reply.pause_ms())};
  }
  const std::string why = status.error_message().empty()
                              ? fmt::format("gRPC code {} from tvillingd at unix socket {}",
                                            static_cast<int>(status.error_code()), socket)
                              : status.error_message();
  // RunSwitchover's roll-back (ABORTED): the target did not catch up, writes resumed here,
  // nothing changed.
  const bool rolled_back = status.error_code() == grpc::StatusCode::ABORTED;
  return {group, rolled_back ? core::EvacuationState::kRolledBack : core::EvacuationState::kFailed,
          why};
}

// The agent's status, or an error printed to `err` (nullopt).
std::optional<v1::StatusReply> AgentStatus(v1::Control::Stub* stub, const std::string& socket,
                                           std::chrono::milliseconds rpc_timeout,
                                           std::ostream& err) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + rpc_timeout);
  v1::StatusReply reply;
  const grpc::Status status = stub->Status(&context, v1::StatusRequest(), &reply);
  if (!status.ok()) {
    err << fmt::format("tvillingctl: cannot reach tvillingd at unix socket {}: {}\n", socket,
                       status.error_message());
    return std::nullopt;
  }
  return reply;
}

std::string Join(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ",") + n;
  return out.empty() ? "none" : out;
}

int EvacuateDryRun(const v1::StatusReply& status, const core::EvacuationOrder& order,
                   const EvacuateArgs& args, std::ostream& out) {
  bool possible = true;
  for (const std::string& name : order.groups) {
    for (const v1::GroupStatus& g : status.groups()) {
      if (g.name() != name) continue;
      const core::SwitchoverInput in = PlanInput(args.from, g, args.to, args.timeout_s);
      const core::SwitchoverPlan plan = core::PlanSwitchover(in);
      possible = possible && plan.possible;
      out << "\n" << plan.Describe(in);
    }
  }
  out << fmt::format("\nevacuation of {} to {}: {}\n", args.from, args.to,
                     possible ? "every plan is possible now"
                              : "some plans would be refused now (above): the evacuation would "
                                "stop at the first of them");
  return possible ? kExitOk : kExitRefused;
}

// Runs the switchovers, `args.concurrency` at a time, each RPC on its own thread; the main thread
// only schedules (core::Evacuation), prints progress and watches for SIGINT.
int EvacuateRun(const std::shared_ptr<grpc::Channel>& channel, const std::string& socket,
                const core::EvacuationOrder& order, const EvacuateArgs& args, std::ostream& out) {
  InterruptGuard interrupt;
  core::Evacuation evacuation(order.groups, args.concurrency);
  std::mutex mu;
  std::condition_variable cv;
  std::deque<GroupResult> results;  // GUARDED_BY(mu)
  std::vector<std::thread> threads;
  bool told_interrupt = false;
  for (;;) {
    if (g_interrupted != 0 && !told_interrupt) {
      told_interrupt = true;
      evacuation.Abort("interrupted (SIGINT)");
      out << fmt::format("interrupted: no new group starts; waiting for {} in flight\n",
                         evacuation.running());
      out.flush();
    }
    for (const std::string& group : evacuation.NextToStart()) {
      out << fmt::format("{}: switching over to {}\n", group, args.to);
      out.flush();
      threads.emplace_back([&, group] {
        auto stub = v1::Control::NewStub(channel);
        v1::SwitchoverReply reply;
        const size_t position =
            std::find(order.groups.begin(), order.groups.end(), group) - order.groups.begin() + 1;
        const std::string why = fmt::format("evacuation of {} to {}, group {} of {}", args.from,
                                            args.to, position, order.groups.size());
        const grpc::Status st =
            CallSwitchover(stub.get(), group, args.to, args.timeout_s, &reply, why);
        GroupResult r = ClassifySwitchover(group, socket, st, reply);
        std::lock_guard<std::mutex> lock(mu);
        results.push_back(std::move(r));
        cv.notify_one();
      });
    }
    if (evacuation.Done()) break;
    std::unique_lock<std::mutex> lock(mu);
    // Wakes for a result, or every 100 ms to look at the SIGINT flag.
    cv.wait_for(lock, std::chrono::milliseconds(100), [&] { return !results.empty(); });
    while (!results.empty()) {
      GroupResult r = std::move(results.front());
      results.pop_front();
      out << fmt::format("{}: {}: {}\n", r.group, core::EvacuationStateName(r.state), r.detail);
      out.flush();
      evacuation.OnFinished(r.group, r.state, r.detail);
    }
  }
  for (std::thread& t : threads) t.join();
  out << "\n" << evacuation.Report(args.from, args.to);
  return evacuation.Succeeded() ? kExitOk : kExitRefused;
}

}  // namespace

int Switchover(const std::string& socket, std::chrono::milliseconds rpc_timeout,
               const SwitchoverArgs& args, std::ostream& out, std::ostream& err) {
  if (!args.dry_run) return RunSwitchover(socket, args, out, err);
  auto channel = grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials());
  auto stub = v1::Control::NewStub(channel);
  const std::optional<v1::StatusReply> status = AgentStatus(stub.get(), socket, rpc_timeout, err);
  if (!status) return kExitUnreachable;
  const v1::StatusReply& reply = *status;
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
  const core::SwitchoverInput in = PlanInput(reply.agent().site(), *group, args.to, args.timeout_s);
  const core::SwitchoverPlan plan = core::PlanSwitchover(in);
  out << plan.Describe(in);
  return plan.possible ? kExitOk : kExitRefused;
}

int Evacuate(const std::string& socket, std::chrono::milliseconds rpc_timeout,
             const EvacuateArgs& args, std::ostream& out, std::ostream& err) {
  if (args.from == args.to) {
    err << fmt::format("tvillingctl: switchover --all-groups: --from and --to are both {}\n",
                       args.from);
    return kExitUsage;
  }
  auto channel = grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials());
  auto stub = v1::Control::NewStub(channel);
  const std::optional<v1::StatusReply> status = AgentStatus(stub.get(), socket, rpc_timeout, err);
  if (!status) return kExitUnreachable;
  // Only a group's primary can run its switchover: this must be the agent of the site evacuated.
  if (status->agent().site() != args.from) {
    err << fmt::format(
        "tvillingctl: switchover --all-groups --from {}: tvillingd at unix socket {} is site {}; "
        "run it on the agent of site {} (--socket or --state-dir)\n",
        args.from, socket, status->agent().site(), args.from);
    return kExitUsage;
  }
  std::vector<core::EvacuationCandidate> candidates;
  for (const v1::GroupStatus& g : status->groups()) {
    bool has_target = false;
    for (const v1::PeerStatus& p : g.peers()) has_target = has_target || p.peer() == args.to;
    candidates.push_back({g.name(), g.role(), has_target});
  }
  const core::EvacuationOrder order =
      core::OrderEvacuation(candidates, args.from, args.to, args.order);
  if (!order.errors.empty()) {
    for (const std::string& e : order.errors)
      err << "tvillingctl: switchover --all-groups: " << e << '\n';
    return kExitUsage;
  }
  out << fmt::format(
      "evacuation of {} to {}{}: {} group(s) in this order: {}; concurrency {}; "
      "timeout {} s per group\n",
      args.from, args.to, args.dry_run ? " (dry run)" : "", order.groups.size(), Join(order.groups),
      args.concurrency, args.timeout_s);
  for (const std::string& s : order.skipped) out << "  stays: " << s << '\n';
  out.flush();
  if (args.dry_run) return EvacuateDryRun(*status, order, args, out);
  return EvacuateRun(channel, socket, order, args, out);
}

}  // namespace tvilling::cli
