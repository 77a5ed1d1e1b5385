// switchover.cc: see switchover.h.
#include "agent/core/switchover.h"

#include <algorithm>
#include <cstdio>

namespace tvilling::core {
namespace {

std::string Dur(Nanos n) {
  char buf[32];
  if (n < 1'000'000) {
    std::snprintf(buf, sizeof buf, "%lld us", static_cast<long long>(n / 1000));
  } else if (n < 10'000'000'000) {
    std::snprintf(buf, sizeof buf, "%.1f ms", static_cast<double>(n) / 1e6);
  } else {
    std::snprintf(buf, sizeof buf, "%.1f s", static_cast<double>(n) / 1e9);
  }
  return buf;
}

std::string Bytes(uint64_t b) {
  char buf[32];
  if (b < 1024) {
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(b));
  } else if (b < (1ull << 20)) {
    std::snprintf(buf, sizeof buf, "%.1f KiB", static_cast<double>(b) / 1024);
  } else {
    std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(b) / (1 << 20));
  }
  return buf;
}

}  // namespace

SwitchoverPlan PlanSwitchover(const SwitchoverInput& in) {
  SwitchoverPlan p;
  if (in.role != "primary") {
    p.refusals.push_back("this agent (" + in.from_site + ") is " +
                         (in.role.empty() ? "not serving the group" : "a " + in.role) +
                         " of group " + in.group + ": run the switchover on its primary");
  }
  if (in.to_site == in.from_site) {
    p.refusals.push_back(in.to_site + " is already the primary of group " + in.group);
  } else if (!in.target) {
    p.refusals.push_back(in.to_site + " is not a peer of group " + in.group);
  }
  const Nanos rtt = in.target ? static_cast<Nanos>(in.target->rtt_us) * 1000 : 0;
  if (in.target && in.role == "primary" && in.to_site != in.from_site) {
    const SwitchoverTarget& t = *in.target;
    if (t.link_state != "streaming") {
      p.refusals.push_back(in.to_site + "'s link is " + t.link_state +
                           " (it must be streaming to catch up)");
    }
    if (t.copy_pending) {
      p.refusals.push_back(in.to_site + " has a full copy pending: it is not consistent yet");
    }
    // Drain: the lag at the throughput the window allows over one RTT (a bound, not a measure).
    if (t.lag_bytes > 0) {
      if (rtt > 0 && t.window_bytes > 0) {
        const double per_ns = static_cast<double>(t.window_bytes) / static_cast<double>(rtt);
        p.expected_drain = static_cast<Nanos>(static_cast<double>(t.lag_bytes) / per_ns) + rtt;
      } else {
        p.expected_drain = rtt;
      }
    }
    p.expected_pause = p.expected_drain + 2 * rtt;
    if (in.timeout > 0 && p.expected_drain > in.timeout) {
      p.refusals.push_back(in.to_site + " would need about " + Dur(p.expected_drain) +
                           " to catch up, more than the timeout of " + Dur(in.timeout));
    }
  }
  p.possible = p.refusals.empty();
  const std::string& from = in.from_site;
  const std::string& to = in.to_site;
  p.steps = {
      "pause new writes at " + from + " (held, not failed)",
      "wait until " + to + "'s durable LSN reaches " + from + "'s last LSN (now " +
          std::to_string(in.last_lsn) + ")",
      "hand the leader key of group " + in.group + " to " + to +
          " in one etcd Txn, guarded by the key's current epoch",
      to + " takes the key and promotes in a new epoch (the key's create revision)",
      from + " becomes a replica of " + to + "; writes held at " + from +
          " are failed with ESHUTDOWN (retryable) for the client to send to " + to,
      "if " + to + " has not caught up within the timeout: " + from +
          " resumes as primary, nothing is lost, and the command says why",
  };
  return p;
}

std::string SwitchoverPlan::Describe(const SwitchoverInput& in) const {
  std::string s = "switchover of group " + in.group + " from " + in.from_site + " (epoch " +
                  std::to_string(in.epoch) + ") to " + in.to_site + ": dry run, nothing changed\n";
  if (in.target) {
    const SwitchoverTarget& t = *in.target;
    s += "  target " + in.to_site + ": " + t.mode + ", link " + t.link_state + ", durable LSN " +
         std::to_string(t.durable_lsn) + " of " + std::to_string(in.last_lsn) + ", lag " +
         Bytes(t.lag_bytes) + " / ";
    char lag[32];
    std::snprintf(lag, sizeof lag, "%.3f s", t.lag_seconds);
    s += std::string(lag) + ", rtt " + Dur(static_cast<Nanos>(t.rtt_us) * 1000) + "\n";
  }
  s += "  steps:\n";
  for (size_t i = 0; i < steps.size(); ++i) {
    s += "    " + std::to_string(i + 1) + ". " + steps[i] + "\n";
  }
  if (in.target) {
    s += "  expected write pause: about " + Dur(expected_pause) + " (drain " + Dur(expected_drain) +
         " + 2 RTT + one etcd transaction; an estimate from the current lag, "
         "RTT and window)\n";
  }
  if (possible) {
    s += "  possible now\n";
  } else {
    s += "  refused:\n";
    for (const std::string& r : refusals) s += "    - " + r + "\n";
  }
  return s;
}

}  // namespace tvilling::core
