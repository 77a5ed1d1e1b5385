// verify.cc: see verify.h.
#include "agent/cli/verify.h"

#include <fmt/format.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <pwd.h>
#include <unistd.h>

#include <cstdlib>

#include "agent/cli/ctl.h"
#include "agent/cli/switchover.h"
#include "tvilling/v1/control.grpc.pb.h"

namespace tvilling::cli {
namespace {

std::string ProgressLine(const v1::VerifyProgress& p) {
  const v1::VerifyStatus& st = p.status();
  std::string line = fmt::format(
      "verify {} -> {} {}", p.group(), p.peer(),
      FormatProgressBar(st.done_bytes(), st.total_bytes(), st.bytes_per_s(), st.eta_s()));
  line += fmt::format(", {} mismatching", st.mismatch_chunks());
  if (!st.resync().empty()) line += ", resync " + st.resync();
  return line;
}

std::string Json(const v1::VerifyProgress& p) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  std::string text;
  if (!google::protobuf::util::MessageToJsonString(p, &text, options).ok()) return "{}";
  return text;
}

}  // namespace

int VerifyExitCode(const std::vector<v1::VerifyStatus>& results) {
  bool mismatch = false;
  bool incomplete = results.empty();
  for (const v1::VerifyStatus& r : results) {
    if (r.state() == "mismatches" || r.mismatch_chunks() > 0) mismatch = true;
    if (r.state() != "identical" && r.state() != "mismatches") incomplete = true;
    if (r.resync().rfind("failed", 0) == 0) incomplete = true;
  }
  if (mismatch) return kExitVerifyMismatch;
  return incomplete ? kExitVerifyIncomplete : kExitOk;
}

std::string FormatVerifyResult(const v1::VerifyProgress& p) {
  const v1::VerifyStatus& st = p.status();
  const double secs =
      st.finished_unix_ms() > st.started_unix_ms()
          ? static_cast<double>(st.finished_unix_ms() - st.started_unix_ms()) / 1000.0
          : 0.0;
  std::string out = fmt::format(
      "group {} peer {}: {}: {} of {} chunk(s) compared ({} of {}) in {:.1f}s, {} mismatching "
      "({}), {} unverified, {} retried\n",
      p.group(), p.peer(), st.state(), st.compared_chunks(), st.total_chunks(),
      FormatBytesIec(st.done_bytes()), FormatBytesIec(st.total_bytes()), secs, st.mismatch_chunks(),
      FormatBytesIec(st.mismatch_bytes()), st.unverified_chunks(), st.retried_chunks());
  for (const v1::VerifyRange& r : st.mismatches()) {
    out += fmt::format("  mismatch: volume {} offset {} length {} ({})\n", r.volume(), r.offset(),
                       r.length(), FormatBytesIec(r.length()));
  }
  if (static_cast<uint64_t>(st.mismatches_size()) > 0 && st.mismatch_bytes() > 0) {
    uint64_t listed = 0;
    for (const v1::VerifyRange& r : st.mismatches()) listed += r.length();
    if (listed < st.mismatch_bytes()) {
      out += fmt::format("  ({} of mismatching chunks not listed: too many ranges)\n",
                         FormatBytesIec(st.mismatch_bytes() - listed));
    }
  }
  if (!st.resync().empty()) {
    out += fmt::format("  resync: {}{}\n", st.resync(),
                       st.resynced_bytes() > 0 ? fmt::format(" ({} restored from this site)",
                                                             FormatBytesIec(st.resynced_bytes()))
                                               : "");
  }
  if (!st.error().empty()) out += fmt::format("  error: {}\n", st.error());
  return out;
}

int Verify(const std::string& socket, const VerifyArgs& args, bool progress_bar, std::ostream& out,
           std::ostream& err) {
  auto channel = grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials());
  auto stub = v1::Control::NewStub(channel);
  grpc::ClientContext context;  // no deadline: a verify takes as long as the volumes need
  v1::VerifyRequest req;
  req.set_group(args.group);
  req.set_volume(args.volume);
  req.set_peer(args.peer);
  req.set_rate_bytes_per_s(static_cast<uint64_t>(args.rate_mib_s * 1048576.0));
  req.set_resync(args.resync);
  req.set_resync_timeout_ms(static_cast<uint64_t>(args.resync_timeout_s * 1000));
  req.set_user(LocalUser());
  req.set_uid(getuid());
  auto reader = stub->Verify(&context, req);
  v1::VerifyProgress msg;
  std::vector<v1::VerifyStatus> results;
  bool bar_drawn = false;
  while (reader->Read(&msg)) {
    if (!msg.done()) {
      if (progress_bar) {
        err << '\r' << ProgressLine(msg) << "\x1b[K" << std::flush;
        bar_drawn = true;
      }
      continue;
    }
    if (bar_drawn) {
      err << '\r' << ProgressLine(msg) << "\x1b[K\n" << std::flush;
      bar_drawn = false;
    }
    results.push_back(msg.status());
    if (args.json) {
      out << Json(msg) << '\n';
    } else {
      out << FormatVerifyResult(msg);
    }
    out.flush();
  }
  if (bar_drawn) err << '\n';
  const grpc::Status status = reader->Finish();
  if (!status.ok()) {
    const bool refused = status.error_code() == grpc::StatusCode::FAILED_PRECONDITION ||
                         status.error_code() == grpc::StatusCode::NOT_FOUND ||
                         status.error_code() == grpc::StatusCode::INVALID_ARGUMENT;
    err << fmt::format("tvillingctl: verify of group {} {}: {}\n", args.group,
                       refused ? "refused" : "failed",
                       status.error_message().empty()
                           ? fmt::format("gRPC code {} from tvillingd at unix socket {}",
                                         static_cast<int>(status.error_code()), socket)
                           : status.error_message());
    return refused ? kExitRefused : kExitUnreachable;
  }
  return VerifyExitCode(results);
}

}  // namespace tvilling::cli
