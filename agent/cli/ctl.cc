// ctl.cc: tvillingctl's command line (CLI11), its Control client (gRPC on the agent's unix socket)
// and the human and JSON forms of `status`. Nothing here throws out: CLI11 reports by exception,
// and every exception is caught in RunTvillingctl.
#include "agent/cli/ctl.h"

#include <fmt/format.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <thread>
#include <vector>

#include "agent/cli/divergent.h"
#include "agent/cli/roles.h"
#include "agent/cli/switchover.h"
#include "agent/cli/verify.h"
#include "tvilling/v1/control.grpc.pb.h"

namespace tvilling::cli {
namespace {

// Left-aligned columns separated by two spaces; trailing spaces trimmed.
class Table {
 public:
  void Add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }

  void Print(std::string& out, std::string_view indent) const {
    std::vector<size_t> widths;
    for (const auto& row : rows_) {
      if (widths.size() < row.size()) widths.resize(row.size(), 0);
      for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
    }
    for (const auto& row : rows_) {
      std::string line(indent);
      for (size_t i = 0; i < row.size(); ++i) {
        line += row[i];
        if (i + 1 < row.size()) line.append(widths[i] - row[i].size() + 2, ' ');
      }
      while (!line.empty() && line.back() == ' ') line.pop_back();
      out += line;
      out += '\n';
    }
  }

 private:
  std::vector<std::vector<std::string>> rows_;
};

std::string YesNo(bool value) { return value ? "yes" : "no"; }

std::string Or(const std::string& value, std::string_view fallback) {
  return value.empty() ? std::string(fallback) : value;
}

std::string PeerState(const v1::PeerStatus& peer) {
  if (peer.degraded()) return "degraded";
  if (peer.in_sync_set() && peer.copy_pending()) return "in-sync-set, copy pending";
  if (peer.in_sync_set()) return "in-sync-set";
  return "-";
}

std::string CopyProgress(const v1::PeerStatus& peer) {
  if (peer.copy_total_bytes() == 0) return "-";
  return FormatProgressBar(peer.copy_done_bytes(), peer.copy_total_bytes(), peer.copy_bytes_per_s(),
                           peer.copy_eta_s());
}

// Exit code and message for a socket that is missing or is not a socket, before gRPC tries it
// (gRPC's own message for these is "connect failed", which says less).
std::string CheckSocket(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return fmt::format(
        "cannot reach tvillingd: no socket at {} ({}); is tvillingd running? "
        "(--socket PATH or --state-dir DIR selects another agent)",
        path, std::strerror(errno));
  }
  if (!S_ISSOCK(st.st_mode)) {
    return fmt::format("cannot reach tvillingd: {} is not a unix socket", path);
  }
  return "";
}

// status --watch: repeat every `interval` (0 = once), `count` times (0 = until interrupted).
struct Watch {
  std::chrono::microseconds interval{0};
  uint64_t count = 0;
};

int Status(const std::string& socket, std::chrono::milliseconds timeout, bool json,
           std::ostream& out, std::ostream& err, const Watch& watch) {
  if (std::string problem = CheckSocket(socket); !problem.empty()) {
    err << "tvillingctl: " << problem << '\n';
    return kExitUnreachable;
  }
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials());
  std::unique_ptr<v1::Control::Stub> stub = v1::Control::NewStub(channel);
  auto next = std::chrono::steady_clock::now();
  for (uint64_t n = 1;; ++n) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + timeout);
    v1::StatusReply reply;
    const grpc::Status status = stub->Status(&context, v1::StatusRequest(), &reply);
    if (!status.ok()) {
      const bool unreachable = status.error_code() == grpc::StatusCode::UNAVAILABLE ||
                               status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
      if (unreachable) {
        err << fmt::format("tvillingctl: cannot reach tvillingd at unix socket {}: {}\n", socket,
                           status.error_message());
      } else {
        err << fmt::format(
            "tvillingctl: tvillingd at unix socket {} refused Status: {} (gRPC code "
            "{})\n",
            socket, status.error_message(), static_cast<int>(status.error_code()));
      }
      return kExitUnreachable;
    }
    if (json) {
      absl::StatusOr<std::string> text = FormatStatusJson(reply);
      if (!text.ok()) {
        err << "tvillingctl: " << text.status().message() << '\n';
        return kExitUnreachable;
      }
      out << *text << '\n';  // with --watch: one object per line (JSON Lines)
    } else {
      if (watch.interval.count() > 0 && n > 1) out << '\n';
      out << FormatStatusText(reply);
    }
    out.flush();
    if (!out.good()) return kExitUnreachable;
    if (watch.interval.count() <= 0 || (watch.count > 0 && n >= watch.count)) return kExitOk;
    // Fixed ticks: a slow answer does not push later samples back.
    next += watch.interval;
    const auto now = std::chrono::steady_clock::now();
    if (next < now) next = now;
    std::this_thread::sleep_until(next);
  }
}

}  // namespace

std::string FormatBytesIec(uint64_t bytes) {
  if (bytes < 1024) return fmt::format("{} B", bytes);
  static constexpr std::string_view kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double value = static_cast<double>(bytes) / 1024.0;
  size_t unit = 0;
  // Round first, so that 1023.96 KiB prints as 1.0 MiB rather than 1024.0 KiB.
  while (value * 10.0 + 0.5 >= 1024.0 * 10.0 && unit + 1 < std::size(kUnits)) {
    value /= 1024.0;
    ++unit;
  }
  return fmt::format("{:.1f} {}", value, kUnits[unit]);
}

std::string FormatMicros(uint64_t micros) {
  if (micros < 1000) return fmt::format("{}us", micros);
  if (micros < 1'000'000) return fmt::format("{:.1f}ms", static_cast<double>(micros) / 1e3);
  return fmt::format("{:.2f}s", static_cast<double>(micros) / 1e6);
}

std::string FormatUptime(uint64_t seconds) {
  const uint64_t days = seconds / 86400;
  const uint64_t hours = seconds / 3600 % 24;
  const uint64_t minutes = seconds / 60 % 60;
  const uint64_t secs = seconds % 60;
  if (days > 0) return fmt::format("{}d{:02}h{:02}m", days, hours, minutes);
  if (hours > 0) return fmt::format("{}h{:02}m{:02}s", hours, minutes, secs);
  if (minutes > 0) return fmt::format("{}m{:02}s", minutes, secs);
  return fmt::format("{}s", secs);
}

std::string FormatStatusText(const v1::StatusReply& reply) {
  std::string out;
  const v1::AgentInfo& agent = reply.agent();
  out += fmt::format("agent {}  version {}  up {}\n", Or(agent.site(), "?"),
                     Or(agent.version(), "?"), FormatUptime(agent.uptime_s()));
  if (reply.groups().empty()) out += "no groups\n";
  for (const v1::GroupStatus& group : reply.groups()) {
    out += fmt::format("\n{} role:{} epoch:{} consistent:{}", group.name(), Or(group.role(), "?"),
                       group.epoch(), YesNo(group.consistent()));
    if (!group.coordinator_state().empty()) {
      out += fmt::format(" coordinator:{} leader:{}", group.coordinator_state(),
                         group.leader_site().empty()
                             ? std::string("none")
                             : fmt::format("{}@{}", group.leader_site(), group.leader_epoch()));
      if (!group.sync_set().empty()) {
        out += fmt::format(" sync-set:{} ({}@{})", group.sync_set(), group.sync_set_site(),
                           group.sync_set_epoch());
      }
    }
    out += "\n";
    if (!group.write_error().empty()) {
      out += fmt::format("  WRITES REFUSED until tvillingd restarts: {}\n", group.write_error());
    }
    if (group.failover_paused()) {
      out += "  automatic fail-over paused (tvillingctl resume to let it act)\n";
    }
    if (!group.failover_pending().empty()) {
      out += fmt::format(
          "  promotion pending approval: {}; approve with `tvillingctl failover approve --group "
          "{}` on this site\n",
          group.failover_pending(), group.name());
    } else if (!group.failover_refusal().empty()) {
      out += fmt::format("  automatic fail-over refused: {}\n", group.failover_refusal());
    }
    Table lsns;
    lsns.Add({"LAST-LSN", "DURABLE", "APPLIED", "WRITE-RELEASED", "FLUSH-RELEASED"});
    lsns.Add({std::to_string(group.last_lsn()), std::to_string(group.durable_lsn()),
              std::to_string(group.applied_lsn()), std::to_string(group.write_released()),
              std::to_string(group.flush_released())});
    lsns.Print(out, "  ");
    if (group.peers().empty()) {
      out += "  no peers\n";
      continue;
    }
    Table peers;
    peers.Add({"PEER", "MODE", "LINK", "RECEIVED", "DURABLE", "APPLIED", "STATE", "LAG-LSNS", "LAG",
               "LAG-S", "RTT", "WINDOW", "IN-FLIGHT", "COPY"});
    for (const v1::PeerStatus& peer : group.peers()) {
      peers.Add({peer.peer(), Or(peer.mode(), "?"), Or(peer.link_state(), "?"),
                 std::to_string(peer.received_lsn()), std::to_string(peer.durable_lsn()),
                 std::to_string(peer.applied_lsn()), PeerState(peer),
                 std::to_string(peer.lag_lsns()), FormatBytesIec(peer.lag_bytes()),
                 fmt::format("{:.3f}", peer.lag_seconds()),
                 peer.rtt_us() == 0 ? "-" : FormatMicros(peer.rtt_us()),
                 FormatBytesIec(peer.window_bytes()), FormatBytesIec(peer.inflight_bytes()),
                 CopyProgress(peer)});
    }
    peers.Print(out, "  ");
    for (const v1::PeerStatus& peer : group.peers()) {
      if (!peer.last_error().empty()) {
        out += fmt::format("  {}: last error: {}\n", peer.peer(), peer.last_error());
      }
      if (peer.has_verify() && !peer.verify().state().empty()) {
        const v1::VerifyStatus& v = peer.verify();
        out += fmt::format("  {}: verify: {}", peer.peer(), v.state());
        if (v.state() == "running") {
          out +=
              " " + FormatProgressBar(v.done_bytes(), v.total_bytes(), v.bytes_per_s(), v.eta_s());
        }
        out += fmt::format(", {} of {} chunk(s) compared, {} mismatching, {} unverified",
                           v.compared_chunks(), v.total_chunks(), v.mismatch_chunks(),
                           v.unverified_chunks());
        if (!v.resync().empty()) out += ", resync " + v.resync();
        out += "\n";
      }
    }
  }
  return out;
}

std::string LocalUser() {
  if (const char* s = std::getenv("SUDO_USER"); s != nullptr && *s != '\0') return s;
  // getpwuid_r: evacuate asks for several switchovers at once, each from its own thread, and
  // getpwuid's answer lives in one static buffer.
  passwd pw{};
  passwd* found = nullptr;
  std::array<char, 4096> buf{};
  if (getpwuid_r(getuid(), &pw, buf.data(), buf.size(), &found) == 0 && found != nullptr) {
    return found->pw_name;
  }
  return std::to_string(getuid());
}

std::string FormatProgressBar(uint64_t done_bytes, uint64_t total_bytes, uint64_t bytes_per_s,
                              double eta_s) {
  const uint64_t done = std::min(done_bytes, total_bytes);
  const double fraction =
      total_bytes == 0 ? 1.0 : static_cast<double>(done) / static_cast<double>(total_bytes);
  // A 10-cell bar, then the figures: [####------] 45.0% (460.8 MiB of 1.0 GiB) 52.3 MiB/s ETA 11s
  const size_t cells = static_cast<size_t>(fraction * 10.0);
  std::string out = "[" + std::string(std::min<size_t>(cells, 10), '#') +
                    std::string(10 - std::min<size_t>(cells, 10), '-') + "] " +
                    fmt::format("{:.1f}% ({} of {})", 100.0 * fraction, FormatBytesIec(done),
                                FormatBytesIec(total_bytes));
  if (bytes_per_s > 0) {
    out += fmt::format(" {}/s ETA {}", FormatBytesIec(bytes_per_s),
                       FormatUptime(static_cast<uint64_t>(eta_s + 0.5)));
  }
  return out;
}

absl::StatusOr<std::string> FormatStatusJson(const v1::StatusReply& reply) {
  // `agent` is a message field, which proto3 JSON omits when unset; keep the shape fixed.
  v1::StatusReply copy = reply;
  copy.mutable_agent();
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  options.add_whitespace = false;
  std::string text;
  const auto status = google::protobuf::util::MessageToJsonString(copy, &text, options);
  if (!status.ok()) {
    return absl::InternalError(
        fmt::format("cannot print the status as JSON: {}", std::string(status.message())));
  }
  return text;
}

int RunTvillingctl(int argc, const char* const* argv, std::ostream& out, std::ostream& err) {
  try {
    CLI::App app{"tvillingctl: the operator's CLI of a local tvillingd (its control socket).",
                 "tvillingctl"};
    std::string socket;
    std::string state_dir;
    double timeout_s = 5;
    CLI::Option* socket_option =
        app.add_option("--socket", socket,
                       fmt::format("the agent's control socket ([control] unix_socket); default {}",
                                   kDefaultSocket))
            ->type_name("PATH");
    CLI::Option* state_dir_option =
        app.add_option("--state-dir", state_dir,
                       fmt::format("the agent's state directory: use DIR/{}", kSocketName))
            ->type_name("DIR");
    socket_option->excludes(state_dir_option);
    app.add_option("--timeout", timeout_s, "seconds to wait for the agent (default 5)")
        ->type_name("SECONDS")
        ->check(CLI::Range(0.001, 3600.0));
#ifdef TVILLING_VERSION
    app.set_version_flag("--version", TVILLING_VERSION);
#endif
    bool json = false;
    double watch_s = 0;
    uint64_t watch_count = 0;
    CLI::App* status = app.add_subcommand("status", "the agent, its groups and their peers");
    status->add_flag("--json", json, "print JSON (docs/tvillingctl.md) instead of tables");
    status
        ->add_option("--watch", watch_s,
                     "repeat every SECONDS until interrupted (with --json: one object per line)")
        ->type_name("SECONDS")
        ->check(CLI::Range(0.001, 3600.0));
    status->add_option("--count", watch_count, "with --watch: stop after N reports")
        ->type_name("N")
        ->check(CLI::Range(uint64_t{1}, UINT64_MAX));
    SwitchoverArgs sw;
    CLI::App* switchover = app.add_subcommand(
        "switchover", "move a group's primary to another site (--dry-run: the plan)");
    EvacuateArgs evac;
    bool all_groups = false;
    CLI::Option* group_option = switchover->add_option("--group", sw.group, "the group");
    CLI::Option* all_option =
        switchover->add_flag("--all-groups", all_groups,
                             "evacuate a site: every group whose primary is --from moves to --to");
    group_option->excludes(all_option);
    CLI::Option* from_option =
        switchover
            ->add_option("--from", evac.from,
                         "with --all-groups: the site to evacuate (this agent's site)")
            ->type_name("SITE");
    from_option->needs(all_option);
    switchover->add_option("--to", sw.to, "the site to promote")->required()->type_name("SITE");
    switchover
        ->add_option("--concurrency", evac.concurrency,
                     "with --all-groups: switchovers at a time (default 1)")
        ->type_name("N")
        ->check(CLI::Range(size_t{1}, size_t{1024}))
        ->needs(all_option);
    switchover
        ->add_option("--order", evac.order,
                     "with --all-groups: these groups first, in this order (then the others by "
                     "name)")
        ->type_name("G1,G2,...")
        ->delimiter(',')
        ->needs(all_option);
    switchover->add_flag("--dry-run", sw.dry_run, "print the plan and change nothing");
    switchover
        ->add_option("--timeout", sw.timeout_s,
                     "seconds the target may take to catch up (default 30; per group)")
        ->type_name("SECONDS")
        ->check(CLI::Range(0.001, 86400.0));
    DivergentArgs div;
    const DivergentCommands divergent = AddDivergentCommands(app, &div);
    RoleArgs role;
    CLI::App* promote = app.add_subcommand("promote", "make this site the group's primary");
    promote->add_option("--group", role.group, "the group")->required();
    promote->add_flag("--yes", role.yes, "do not ask for confirmation");
    CLI::App* demote =
        app.add_subcommand("demote", "make this site a replica of the group (no coordinator)");
    demote->add_option("--group", role.group, "the group")->required();
    demote->add_flag("--yes", role.yes, "do not ask for confirmation");
    CLI::App* failover = app.add_subcommand("failover", "automatic fail-over under approval");
    CLI::App* approve =
        failover->add_subcommand("approve", "approve the pending promotion of this site");
    approve->add_option("--group", role.group, "the group")->required();
    approve->add_option("--site", role.site, "the site to promote (default: this agent's)")
        ->type_name("SITE");
    failover->require_subcommand(1);
    CLI::App* pause =
        app.add_subcommand("pause", "hold automatic fail-over of a group at every site");
    pause->add_option("--group", role.group, "the group")->required();
    CLI::App* resume = app.add_subcommand("resume", "let automatic fail-over act again");
    resume->add_option("--group", role.group, "the group")->required();
    HistoryArgs hist;
    CLI::App* history =
        app.add_subcommand("history", "the audit log: promotions, demotions, approvals, refusals");
    history->add_option("--group", hist.group, "only this group");
    history->add_option("--limit", hist.limit, "the newest N records")->type_name("N");
    history->add_flag("--json", hist.json, "one JSON object per record and line");
    VerifyArgs ver;
    CLI::App* verify = app.add_subcommand(
        "verify", "compare the group's volumes with its replicas' (on the primary; online)");
    verify->add_option("--group", ver.group, "the group")->required();
    verify->add_option("--volume", ver.volume, "only this volume (default: every volume)");
    verify->add_option("--peer", ver.peer, "only this peer (default: every peer)")
        ->type_name("SITE");
    verify
        ->add_option(
            "--rate", ver.rate_mib_s,
            "MiB/s read from the primary's volumes (default 64; the replica reads as much)")
        ->type_name("MiB/s")
        ->check(CLI::Range(0.001, 1e6));
    verify->add_flag("--resync", ver.resync,
                     "restore the mismatching ranges at the peer (through the copy path) and wait");
    verify
        ->add_option("--resync-timeout", ver.resync_timeout_s,
                     "seconds a resync may take (default 600)")
        ->type_name("SECONDS")
        ->check(CLI::Range(1.0, 86400.0));
    verify->add_flag("--json", ver.json, "one JSON object per peer and line (docs/tvillingctl.md)");
    app.require_subcommand(1);
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      const int code = app.exit(e, out, err);
      return code == 0 ? kExitOk : kExitUsage;
    }

    std::filesystem::path path;
    if (!socket.empty()) {
      path = socket;
    } else if (!state_dir.empty()) {
      path = std::filesystem::path(state_dir) / kSocketName;
    } else {
      path = kDefaultSocket;
    }
    std::error_code ec;
    std::filesystem::path absolute = std::filesystem::absolute(path, ec);
    if (!ec) path = absolute.lexically_normal();
    const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
    if (status->parsed()) {
      Watch watch;
      watch.interval = std::chrono::microseconds(static_cast<int64_t>(watch_s * 1e6));
      watch.count = watch_count;
      return Status(path.string(), timeout, json, out, err, watch);
    }
    if (switchover->parsed() && all_groups) {
      if (evac.from.empty()) {
        err << "tvillingctl: switchover --all-groups needs --from SITE (the site to evacuate)\n";
        return kExitUsage;
      }
      evac.to = sw.to;
      evac.dry_run = sw.dry_run;
      evac.timeout_s = sw.timeout_s;
      return Evacuate(path.string(), timeout, evac, out, err);
    }
    if (switchover->parsed()) {
      if (sw.group.empty()) {
        err << "tvillingctl: switchover needs --group G (or --all-groups --from SITE)\n";
        return kExitUsage;
      }
      return Switchover(path.string(), timeout, sw, out, err);
    }
    if (divergent.show->parsed()) {
      // The files, not the agent: <state dir>/divergent (the socket's directory by default).
      std::filesystem::path dir = div.dir;
      if (dir.empty()) {
        dir = (state_dir.empty() ? path.parent_path() : std::filesystem::path(state_dir)) /
              "divergent";
      }
      return DivergentShow(dir, div, out, err);
    }
    if (divergent.export_->parsed()) return DivergentExport(div, out, err);
    if (promote->parsed() || demote->parsed() || approve->parsed() || pause->parsed() ||
        resume->parsed()) {
      role.command = promote->parsed()  ? "promote"
                     : demote->parsed() ? "demote"
                     : pause->parsed()  ? "pause"
                     : resume->parsed() ? "resume"
                                        : "approve";
      // A switch may wait for the log and the replication threads: allow more than a status.
      const auto t = std::max(timeout, std::chrono::milliseconds(30000));
      return RoleCommand(path.string(), t, role, isatty(STDIN_FILENO) != 0, std::cin, out, err);
    }
    if (history->parsed()) return History(path.string(), timeout, hist, out, err);
    if (verify->parsed()) {
      if (std::string problem = CheckSocket(path.string()); !problem.empty()) {
        err << "tvillingctl: " << problem << '\n';
        return kExitUnreachable;
      }
      // The bar goes to stderr, only on a terminal (and only when `err` is the process's).
      const bool bar = &err == &std::cerr && isatty(STDERR_FILENO) != 0;
      return Verify(path.string(), ver, bar, out, err);
    }
    err << "tvillingctl: no command\n";
    return kExitUsage;
  } catch (const std::exception& e) {
    err << "tvillingctl: " << e.what() << '\n';
    return kExitUnreachable;
  }
}

}  // namespace tvilling::cli
