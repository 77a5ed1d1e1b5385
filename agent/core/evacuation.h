// evacuation.h: `tvillingctl switchover --all-groups --from SITE --to SITE` as pure decisions
// (docs/tvillingctl.md, "Evacuating a site"): which groups move and in what order
// (OrderEvacuation), and a scheduler (Evacuation) that starts at most `concurrency` switchovers at
// a time and stops starting new ones at the first failure or on an interrupt, so that the report
// can say for each group: moved, rolled back (and why), failed, or not started. The caller runs the
// switchovers (tvillingctl, one Control.Switchover RPC each) and feeds their results back; nothing
// here does I/O, threads or clocks.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace tvilling::core {

// A group as the agent of the site to evacuate reports it.
struct EvacuationCandidate {
  std::string group;
  std::string role;         // this site's role in the group: "primary" | "replica" | ...
  bool has_target = false;  // the target site is one of the group's peers
};

struct EvacuationOrder {
  std::vector<std::string> groups;  // to move, in this order
  // Groups that stay where they are, each with the reason ("g1: site-a is its replica, not its
  // primary").
  std::vector<std::string> skipped;
  // A bad --order: a name that is not a group of the agent, or one listed twice. Nothing may start.
  std::vector<std::string> errors;
};

// The groups whose primary is `from_site` and that have `to_site` as a peer: first those named in
// `order`, in that order, then the others in name order. A group named in `order` that is not
// primary here is skipped with its reason like any other; an unknown or repeated name is an error.
// A group that is primary here but has no peer `to_site` is skipped (a switchover to it would be
// refused) and the result says so.
EvacuationOrder OrderEvacuation(const std::vector<EvacuationCandidate>& candidates,
                                const std::string& from_site, const std::string& to_site,
                                const std::vector<std::string>& order);

// How one switchover ended.
enum class EvacuationState {
  kNotStarted,  // never asked (after an abort, or waiting)
  kRunning,
  kMoved,       // the target holds the leader key
  kRolledBack,  // the target did not catch up: writes resumed on the old primary, nothing changed
  kFailed,      // refused before it began, or an error (the agent's message says which)
};

const char* EvacuationStateName(EvacuationState s);  // "not started", "moved", ...

// The scheduler. Typical loop:
//   Evacuation e(order.groups, n);
//   for (;;) { for (g : e.NextToStart()) run(g); if (e.Done()) break;
//              wait for one result; e.OnFinished(g, state, detail); }
// REQUIRES: concurrency >= 1, group names unique.
class Evacuation {
 public:
  struct Entry {
    std::string group;
    EvacuationState state = EvacuationState::kNotStarted;
    std::string detail;  // the agent's message (moved, rolled back, failed)
  };

  Evacuation(const std::vector<std::string>& groups, size_t concurrency);

  // The groups to start now, in order: as many as free slots allow; none after an abort. They are
  // marked running.
  std::vector<std::string> NextToStart();
  // A running group ended. kRolledBack or kFailed aborts the evacuation (the first one is the
  // abort reason): no new group starts, the running ones are waited for.
  void OnFinished(const std::string& group, EvacuationState state, const std::string& detail);
  // An operator's interrupt (SIGINT): no new group starts; the running ones finish or roll back.
  void Abort(const std::string& reason);

  // Nothing runs and nothing more will start.
  [[nodiscard]] bool Done() const;
  [[nodiscard]] size_t running() const { return running_; }
  [[nodiscard]] bool aborted() const { return !abort_reason_.empty(); }
  [[nodiscard]] const std::string& abort_reason() const { return abort_reason_; }
  [[nodiscard]] const std::vector<Entry>& entries() const { return entries_; }
  // Every group moved (an empty evacuation succeeds too).
  [[nodiscard]] bool Succeeded() const;
  // The report tvillingctl prints: one line per group, then a summary line.
  [[nodiscard]] std::string Report(const std::string& from_site, const std::string& to_site) const;

 private:
  std::vector<Entry> entries_;
  size_t concurrency_;
  size_t next_ = 0;  // entries_[next_..] have not been started
  size_t running_ = 0;
  std::string abort_reason_;
};

}  // namespace tvilling::core
