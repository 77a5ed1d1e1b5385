// verify.h: `tvillingctl verify --group G [--volume V] [--peer SITE] [--rate MiB/s] [--resync]
// [--json]` (docs/tvillingctl.md, "verify"): asks the local agent, the group's primary, to compare
// its volumes with each replica's (or one peer's) while writes continue, draws a progress bar with
// rate and ETA on a terminal (as `status` draws a copy's), and prints the mismatching ranges.
#pragma once

#include <chrono>
#include <ostream>
#include <string>
#include <vector>

#include "tvilling/v1/control.pb.h"

namespace tvilling::cli {

// Exit codes of verify (besides kExitOk = every peer identical, kExitUnreachable, kExitUsage and
// kExitRefused = the agent refused: not the primary, unknown group, volume or peer, a verify of
// the group already running).
// At least one peer differs (with --resync: and the ranges were restored, or not: see the output).
inline constexpr int kExitVerifyMismatch = 5;
// No mismatch found, but not everything was compared: chunks left unverified (rewritten faster
// than the replica applied them), a peer failed or the verify was cancelled.
inline constexpr int kExitVerifyIncomplete = 6;

struct VerifyArgs {
  std::string group;
  std::string volume;
  std::string peer;
  double rate_mib_s = 0;  // 0: the agent's default (64 MiB/s)
  bool resync = false;
  double resync_timeout_s = 600;
  bool json = false;
};

int Verify(const std::string& socket, const VerifyArgs& args, bool progress_bar, std::ostream& out,
           std::ostream& err);

// The exit code for the peers' final states ("identical", "mismatches", "incomplete", "failed",
// "cancelled").
int VerifyExitCode(const std::vector<v1::VerifyStatus>& results);

// One peer's result as text: the verdict line, the mismatching ranges, the resync.
std::string FormatVerifyResult(const v1::VerifyProgress& p);

}  // namespace tvilling::cli
