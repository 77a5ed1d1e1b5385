// evacuation.cc: see evacuation.h.
#include "agent/core/evacuation.h"

#include <algorithm>
#include <map>
#include <set>

namespace tvilling::core {

EvacuationOrder OrderEvacuation(const std::vector<EvacuationCandidate>& candidates,
                                const std::string& from_site, const std::string& to_site,
                                const std::vector<std::string>& order) {
  EvacuationOrder out;
  std::map<std::string, const EvacuationCandidate*> by_name;
  for (const EvacuationCandidate& c : candidates) by_name[c.group] = &c;
  std::set<std::string> listed;
  for (const std::string& name : order) {
    if (by_name.count(name) == 0) {
      std::string known;
      for (const auto& [n, c] : by_name) known += (known.empty() ? "" : ", ") + n;
      out.errors.push_back("--order names group \"" + name + "\", which site " + from_site +
                           " does not have (it has: " + (known.empty() ? "none" : known) + ")");
    } else if (!listed.insert(name).second) {
      out.errors.push_back("--order names group \"" + name + "\" twice");
    }
  }
  if (!out.errors.empty()) return out;
  std::vector<std::string> sequence = order;
  for (const auto& [name, c] : by_name) {  // std::map: name order
    if (listed.count(name) == 0) sequence.push_back(name);
  }
  for (const std::string& name : sequence) {
    const EvacuationCandidate& c = *by_name.at(name);
    if (c.role != "primary") {
      out.skipped.push_back(name + ": site " + from_site + " is its " +
                            (c.role.empty() ? std::string("?") : c.role) + ", not its primary");
    } else if (!c.has_target) {
      out.skipped.push_back(name + ": " + to_site + " is not one of its peers");
    } else {
      out.groups.push_back(name);
    }
  }
  return out;
}

const char* EvacuationStateName(EvacuationState s) {
  switch (s) {
    case EvacuationState::kNotStarted:
      return "not started";
    case EvacuationState::kRunning:
      return "running";
    case EvacuationState::kMoved:
      return "moved";
    case EvacuationState::kRolledBack:
      return "rolled back";
    case EvacuationState::kFailed:
      return "failed";
  }
  return "?";
}

Evacuation::Evacuation(const std::vector<std::string>& groups, size_t concurrency)
    : concurrency_(std::max<size_t>(concurrency, 1)) {
  entries_.reserve(groups.size());
  for (const std::string& g : groups)
    entries_.push_back(Entry{g, EvacuationState::kNotStarted, ""});
}

std::vector<std::string> Evacuation::NextToStart() {
  std::vector<std::string> out;
  while (!aborted() && running_ < concurrency_ && next_ < entries_.size()) {
    entries_[next_].state = EvacuationState::kRunning;
    out.push_back(entries_[next_].group);
    ++next_;
    ++running_;
  }
  return out;
}

void Evacuation::OnFinished(const std::string& group, EvacuationState state,
                            const std::string& detail) {
  for (Entry& e : entries_) {
    if (e.group != group || e.state != EvacuationState::kRunning) continue;
    // A result says how it ended: "running" or "not started" would leave the group unaccounted.
    e.state = (state == EvacuationState::kRunning || state == EvacuationState::kNotStarted)
                  ? EvacuationState::kFailed
                  : state;
    e.detail = detail;
    --running_;
    if (e.state != EvacuationState::kMoved && !aborted()) {
      abort_reason_ = "group " + group + " " + EvacuationStateName(e.state);
    }
    return;
  }
}

void Evacuation::Abort(const std::string& reason) {
  if (!aborted()) abort_reason_ = reason.empty() ? "aborted" : reason;
}

bool Evacuation::Done() const { return running_ == 0 && (aborted() || next_ == entries_.size()); }

bool Evacuation::Succeeded() const {
  return std::all_of(entries_.begin(), entries_.end(),
                     [](const Entry& e) { return e.state == EvacuationState::kMoved; });
}

std::string Evacuation::Report(const std::string& from_site, const std::string& to_site) const {
  std::string out;
  size_t moved = 0;
  for (const Entry& e : entries_) {
    out += "  " + e.group + ": " + EvacuationStateName(e.state);
    if (!e.detail.empty()) out += ": " + e.detail;
    out += "\n";
    if (e.state == EvacuationState::kMoved) ++moved;
  }
  out += "evacuation of " + from_site + " to " + to_site + ": " + std::to_string(moved) + " of " +
         std::to_string(entries_.size()) + " groups moved";
  if (aborted()) out += "; aborted: " + abort_reason_;
  out += "\n";
  return out;
}

}  // namespace tvilling::core
