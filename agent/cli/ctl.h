// ctl.h: tvillingctl, the operator's CLI, as a library: argument parsing, the Control client and
// the output formats. tvillingctl.cc only calls RunTvillingctl; the tests call it with their own
// streams and a Control server of their own.
//
//   tvillingctl [--socket PATH | --state-dir DIR] [--timeout S] status [--json]
//
// The agent's control API is gRPC on a unix socket ([control] unix_socket in the agent's config,
// by default <state_dir>/tvillingd.sock); no TLS on it: access is the socket's file permissions.
// Output formats and exit codes: docs/tvillingctl.md.
#pragma once

#include <absl/status/statusor.h>

#include <cstdint>
#include <ostream>
#include <string>
#include <string_view>

#include "tvilling/v1/control.pb.h"

namespace tvilling::cli {

inline constexpr int kExitOk = 0;
// The agent could not be reached, or answered with an error; the message names the socket.
inline constexpr int kExitUnreachable = 1;
// Bad command line.
inline constexpr int kExitUsage = 2;

inline constexpr std::string_view kDefaultSocket = "/var/lib/tvilling/tvillingd.sock";
// The socket's name under a state directory (--state-dir), as [control] unix_socket defaults it.
inline constexpr std::string_view kSocketName = "tvillingd.sock";

// Runs tvillingctl: parses argv (argv[0] is the program name), talks to the agent, writes results
// to `out` and diagnostics to `err`, and returns the process exit code.
int RunTvillingctl(int argc, const char* const* argv, std::ostream& out, std::ostream& err);

// The human form of `status`: the agent, then per group a line with its role, epoch and LSNs and a
// table of its peers (mode, link, LSNs, lag, RTT, copy progress).
[[nodiscard]] std::string FormatStatusText(const v1::StatusReply& reply);

// The JSON form of `status --json`: the StatusReply in proto3 JSON with the .proto field names and
// every field present (defaults included), on one line.
[[nodiscard]] absl::StatusOr<std::string> FormatStatusJson(const v1::StatusReply& reply);

// 0 B, 1023 B, 1.0 KiB, 1.5 MiB, ... (IEC units, one decimal from KiB on).
[[nodiscard]] std::string FormatBytesIec(uint64_t bytes);

// The progress bar of a copy (status) and of a verify: a 10-cell bar, the percentage, the bytes,
// and the rate with the time left when the rate is known (bytes_per_s > 0):
// [####------] 45.0% (460.8 MiB of 1.0 GiB) 52.3 MiB/s ETA 11s
[[nodiscard]] std::string FormatProgressBar(uint64_t done_bytes, uint64_t total_bytes,
                                            uint64_t bytes_per_s, double eta_s);

// Who runs the command, for the agent's audit records: the login behind sudo if any (the person,
// not root), else this process's user name, else its uid.
[[nodiscard]] std::string LocalUser();

// 250us, 12.5ms, 1.20s.
[[nodiscard]] std::string FormatMicros(uint64_t micros);

// 45s, 12m03s, 2h03m04s, 3d04h05m.
[[nodiscard]] std::string FormatUptime(uint64_t seconds);

}  // namespace tvilling::cli
