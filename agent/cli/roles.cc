// roles.cc: see roles.h.
#include "agent/cli/roles.h"

#include <fmt/format.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <pwd.h>
#include <unistd.h>

#include <ctime>

#include "agent/cli/ctl.h"
#include "agent/cli/switchover.h"  // kExitRefused
#include "tvilling/v1/control.grpc.pb.h"

namespace tvilling::cli {
namespace {

int ReportError(const grpc::Status& status, const std::string& socket, const std::string& what,
                std::ostream& err) {
  if (status.error_code() == grpc::StatusCode::FAILED_PRECONDITION) {
    err << fmt::format("tvillingctl: {} refused: {}\n", what, status.error_message());
    return kExitRefused;
  }
  if (status.error_code() == grpc::StatusCode::NOT_FOUND) {
    err << fmt::format("tvillingctl: {}: {}\n", what, status.error_message());
    return kExitUsage;
  }
  err << fmt::format("tvillingctl: {}: tvillingd at unix socket {}: {}\n", what, socket,
                     status.error_message());
  return kExitUnreachable;
}

std::string Time(uint64_t unix_ms) {
  const time_t t = static_cast<time_t>(unix_ms / 1000);
  tm utc{};
  gmtime_r(&t, &utc);
  char buf[32];
  strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &utc);
  return fmt::format("{}.{:03}Z", buf, unix_ms % 1000);
}

}  // namespace

int RoleCommand(const std::string& socket, std::chrono::milliseconds rpc_timeout,
                const RoleArgs& args, bool interactive, std::istream& in, std::ostream& out,
                std::ostream& err) {
  const bool confirm = (args.command == "promote" || args.command == "demote") && !args.yes;
  if (confirm) {
    if (!interactive) {
      err << fmt::format(
          "tvillingctl: {} changes which site takes writes for group {}: confirm with --yes\n",
          args.command, args.group);
      return kExitUsage;
    }
    out << fmt::format(
        "{} this site for group {}? Without a coordinator, make sure no other site is primary "
        "(epochs fence replicas, not clients). Type yes: ",
        args.command == "promote" ? "Promote" : "Demote", args.group);
    out.flush();
    std::string answer;
    std::getline(in, answer);
    if (answer != "yes") {
      err << "tvillingctl: not confirmed; nothing changed\n";
      return kExitUsage;
    }
  }
  auto channel = grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials());
  auto stub = v1::Control::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + rpc_timeout);
  v1::RoleRequest req;
  req.set_group(args.group);
  req.set_site(args.site);
  req.set_user(LocalUser());
  req.set_uid(getuid());
  v1::RoleReply reply;
  grpc::Status status;
  if (args.command == "promote") {
    status = stub->Promote(&context, req, &reply);
  } else if (args.command == "demote") {
    status = stub->Demote(&context, req, &reply);
  } else if (args.command == "pause") {
    status = stub->Pause(&context, req, &reply);
  } else if (args.command == "resume") {
    status = stub->Resume(&context, req, &reply);
  } else {
    status = stub->Approve(&context, req, &reply);
  }
  if (!status.ok()) return ReportError(status, socket, args.command, err);
  out << fmt::format("{}: {} (role {}, epoch {})\n", args.command, reply.message(), reply.role(),
                     reply.epoch());
  return kExitOk;
}

int History(const std::string& socket, std::chrono::milliseconds rpc_timeout,
            const HistoryArgs& args, std::ostream& out, std::ostream& err) {
  auto channel = grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials());
  auto stub = v1::Control::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + rpc_timeout);
  v1::HistoryRequest req;
  req.set_group(args.group);
  req.set_limit(args.limit);
  v1::HistoryReply reply;
  const grpc::Status status = stub->History(&context, req, &reply);
  if (!status.ok()) return ReportError(status, socket, "history", err);
  if (args.json) {
    google::protobuf::util::JsonPrintOptions o;
    o.preserve_proto_field_names = true;
    o.always_print_primitive_fields = true;
    for (const v1::AuditRecord& r : reply.records()) {
      std::string line;
      (void)google::protobuf::util::MessageToJsonString(r, &line, o);
      out << line << '\n';
    }
    return kExitOk;
  }
  out << fmt::format("audit log: {} ({} record(s))\n", reply.source(), reply.records_size());
  for (const v1::AuditRecord& r : reply.records()) {
    const std::string who =
        r.user().empty() ? "coordinator" : fmt::format("{} (uid {})", r.user(), r.uid());
    out << fmt::format("{}  {}  {}  {}  by {} at {} ({}): {}\n", Time(r.unix_ms()), r.group(),
                       r.action(), r.outcome(), who, r.site(), r.identity(), r.detail());
  }
  return kExitOk;
}

}  // namespace tvilling::cli
