// failover.cc: see failover.h and docs/coordinator.md.
#include "agent/core/failover.h"

#include <algorithm>
#include <cstdio>

namespace tvilling::core {
namespace {

std::string Ms(Nanos n) { return std::to_string(n / 1'000'000) + " ms"; }

std::string Seconds(Nanos n) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f s", static_cast<double>(n) / 1e9);
  return buf;
}

}  // namespace

const char* FailoverPolicyName(FailoverPolicy p) {
  switch (p) {
    case FailoverPolicy::kAutomatic:
      return "automatic";
    case FailoverPolicy::kManual:
      return "manual";
    case FailoverPolicy::kApprove:
      return "approve";
  }
  return "?";
}

const char* ActionName(FailoverAction::Kind k) {
  using K = FailoverAction::Kind;
  switch (k) {
    case K::kCampaign:
      return "campaign";
    case K::kPromote:
      return "promote";
    case K::kDemote:
      return "demote";
    case K::kFollow:
      return "follow";
    case K::kSuspendIo:
      return "suspend-io";
    case K::kResumeIo:
      return "resume-io";
    case K::kReadLeader:
      return "read-leader";
    case K::kNewSession:
      return "new-session";
    case K::kPublishPending:
      return "publish-pending";
    case K::kClearPending:
      return "clear-pending";
    case K::kResign:
      return "resign";
    case K::kRefused:
      return "refused";
  }
  return "?";
}

const char* FailoverMachine::StateName(State s) {
  switch (s) {
    case State::kStarting:
      return "starting";
    case State::kReplica:
      return "replica";
    case State::kLeaderless:
      return "leaderless";
    case State::kCampaigning:
      return "campaigning";
    case State::kAwaitingApproval:
      return "awaiting-approval";
    case State::kPrimary:
      return "primary";
    case State::kSuspended:
      return "suspended";
  }
  return "?";
}

std::string CandidatePlan::Describe() const {
  std::string s;
  if (winner.empty()) {
    s = "no eligible candidate";
  } else {
    s = "promote " + winner;
    if (loss.none()) {
      s += " (loses nothing)";
    } else {
      s += " (loses LSN " + std::to_string(loss.from_lsn) + ".." + std::to_string(loss.to_lsn) +
           ", " + std::to_string(loss.bytes) + " bytes, " + Seconds(loss.age) +
           " of writes, as of the primary's last report: what it completed after that is lost too)";
    }
  }
  bool first = true;
  for (const auto& [site, why] : refused) {
    s += first ? "; not eligible: " : ", ";
    s += site + " (" + why + ")";
    first = false;
  }
  return s;
}

std::string PublishedSyncSet::Describe() const {
  return "the sync set " + DescribeSyncSet(set) + " published by " + site + " in epoch " +
         std::to_string(epoch);
}

CandidatePlan ChooseCandidate(const FailoverOptions& o,
                              const std::map<std::string, SiteReport>& sites,
                              const std::optional<PrimaryReport>& primary,
                              const std::string& exclude,
                              const std::optional<PublishedSyncSet>& sync) {
  CandidatePlan plan;
  std::vector<std::string> order = o.sites;
  std::sort(order.begin(), order.end());
  const SiteReport* best = nullptr;
  const PeerLag* best_lag = nullptr;
  for (const std::string& site : order) {
    if (site == exclude) continue;
    auto it = sites.find(site);
    if (it == sites.end()) {
      plan.refused[site] = "no report: its agent has no etcd session";
      continue;
    }
    const SiteReport& r = it->second;
    if (!r.consistent) {
      plan.refused[site] = "inconsistent";
      continue;
    }
    if (r.no_failover) {
      plan.refused[site] = "marked no-failover";
      continue;
    }
    if (r.promotion_failed) {
      plan.refused[site] = "its promotion failed";
      continue;
    }
    if (!primary) {
      plan.refused[site] = "no report from a primary: its lag is unknown";
      continue;
    }
    // The sync set: its members hold every write completed in sync mode; with none, the floor
    // bounds them. Its publisher completed those writes itself.
    bool member = false;
    if (sync && site != sync->site) {
      const auto& m = sync->set.members;
      member = std::find(m.begin(), m.end(), site) != m.end();
      if (!m.empty() && !member) {
        plan.refused[site] = "not in " + sync->Describe();
        continue;
      }
      if (r.durable_lsn < sync->set.floor_lsn) {
        plan.refused[site] = "durable LSN " + std::to_string(r.durable_lsn) +
                             " is below the floor of " + sync->Describe();
        continue;
      }
    }
    const PeerLag* lag = nullptr;
    if (site != primary->site) {
      auto p = primary->peers.find(site);
      if (p == primary->peers.end()) {
        plan.refused[site] = "the primary's last report has no lag for it";
        continue;
      }
      lag = &p->second;
      // The replica may have caught up since the primary's report: what it holds now is what
      // counts; the report's figures are then an upper bound.
      if (!member && r.durable_lsn < primary->last_lsn &&
          (lag->bytes > o.max_lag_bytes || lag->age > o.max_lag_time)) {
        plan.refused[site] = "lag " + std::to_string(lag->bytes) + " bytes / " + Seconds(lag->age) +
                             " exceeds the gate (" + std::to_string(o.max_lag_bytes) + " bytes / " +
                             Seconds(o.max_lag_time) + ")";
        continue;
      }
    }
    if (best == nullptr || r.durable_lsn > best->durable_lsn) {
      best = &r;
      best_lag = lag;
      plan.winner = site;
    }
  }
  if (best != nullptr) {
    // A site that cannot promote may still hold writes completed in sync mode that the winner
    // lacks (it was a member the primary counted before etcd had the set with it): only an
    // operator may give those up.
    for (const std::string& site : order) {
      auto it = sites.find(site);
      if (site == exclude || it == sites.end() || !it->second.promotion_failed) continue;
      if (it->second.durable_lsn > best->durable_lsn) {
        plan.held_back = site + " (its promotion failed) holds records up to LSN " +
                         std::to_string(it->second.durable_lsn) + " that " + plan.winner +
                         " lacks (durable LSN " + std::to_string(best->durable_lsn) + ")";
        break;
      }
    }
    plan.loss.from_lsn = best->durable_lsn + 1;
    plan.loss.to_lsn = primary->last_lsn;
    if (!plan.loss.none() && best_lag != nullptr) {
      plan.loss.bytes = best_lag->bytes;
      plan.loss.age = best_lag->age;
    }
  }
  return plan;
}

FailoverMachine::FailoverMachine(FailoverOptions options) : o_(std::move(options)) {}

bool FailoverMachine::automatic_refused_for_lack_of_witness() const {
  return o_.policy == FailoverPolicy::kAutomatic && o_.sites.size() < 3 && o_.witness.empty();
}

bool FailoverMachine::Ours(const LeaderView& v) const {
  return v.present && v.site == o_.site && session_ != 0 && v.lease == session_;
}

std::vector<FailoverAction> FailoverMachine::Handle(Nanos now, const FailoverEvent& event) {
  std::vector<FailoverAction> out;
  using K = FailoverAction::Kind;
  if (std::holds_alternative<EvTick>(event)) {
    CheckLease(now, out);
    // A resign that etcd did not carry out (unreachable): again, once a second, while our lease
    // keeps the key alive.
    if (resigned_epoch_ != 0 && Ours(leader_) && leader_.epoch == resigned_epoch_ &&
        now - resign_sent_at_ >= 1'000'000'000) {
      resign_sent_at_ = now;
      out.push_back({K::kResign, o_.site, resigned_epoch_, "the promotion failed", {}});
    }
    Evaluate(now, out);
  } else if (auto* s = std::get_if<EvSessionStarted>(&event)) {
    session_ = s->lease;
    last_renewal_sent_ = s->sent;
    // What was read before this session may be stale by however long it took to get one: decide
    // only on what is read again.
    primary_report_read_.reset();
    sites_read_.reset();
    if (leader_known_) OnLeader(now, leader_, out);
  } else if (auto* r = std::get_if<EvSessionRenewed>(&event)) {
    if (session_ != 0 && r->sent > last_renewal_sent_) last_renewal_sent_ = r->sent;
    if (state_ == State::kSuspended && LeaseFresh(now)) {
      // The lease lives; whether the key is still ours (same epoch) needs a read (again on every
      // renewal until one answers: a read can fail).
      confirm_pending_ = true;
      out.push_back({K::kReadLeader, {}, 0, "lease renewed: confirming the leader key", {}});
    }
    CheckLease(now, out);
  } else if (std::holds_alternative<EvSessionLost>(event)) {
    session_ = 0;
    if (state_ == State::kPrimary || state_ == State::kSuspended) {
      LoseLeadership("", 0, "the etcd lease is gone (so is the leader key under it)", out);
    } else if (state_ == State::kAwaitingApproval) {
      out.push_back({K::kClearPending, {}, 0, "the etcd lease is gone", {}});
    }
    state_ = State::kStarting;
    out.push_back({K::kNewSession, {}, 0, "the etcd lease is gone", {}});
  } else if (auto* l = std::get_if<EvLeader>(&event)) {
    if (StaleView(l->revision)) return out;
    OnLeader(now, l->leader, out);
  } else if (auto* c = std::get_if<EvCampaignDone>(&event)) {
    if (StaleView(c->revision)) {
      // Overtaken by a newer view (a watch event handled first): that one decides.
      if (state_ == State::kCampaigning) {
        state_ = State::kLeaderless;
        if (!leaderless_since_) leaderless_since_ = now;
        if (leader_known_) OnLeader(now, leader_, out);
      }
      return out;
    }
    if (state_ != State::kCampaigning) {
      OnLeader(now, c->leader, out);
    } else if (c->won && Ours(c->leader)) {
      OnLeader(now, c->leader, out);
    } else if (c->leader.present) {
      OnLeader(now, c->leader, out);
    } else {
      // The Txn failed (etcd unreachable?): try again on a later tick, not in a loop.
      state_ = State::kLeaderless;
      if (!leaderless_since_) leaderless_since_ = now;
    }
  } else if (auto* st = std::get_if<EvSites>(&event)) {
    sites_ = st->sites;
    sites_read_ = now;
    Evaluate(now, out);
  } else if (auto* p = std::get_if<EvPrimaryReport>(&event)) {
    primary_report_ = p->report;
    primary_report_known_ = true;
    primary_report_read_ = now;
    if (p->report) NoteEpoch(p->report->epoch, p->report->site);
    Evaluate(now, out);
  } else if (auto* a = std::get_if<EvApprove>(&event)) {
    if (a->site != o_.site) return out;
    promotion_failed_at_.reset();  // the operator decides
    if (state_ == State::kAwaitingApproval) {
      out.push_back({K::kClearPending, {}, 0, "approved by " + a->who, {}});
      Campaign(out);
    } else {
      Refuse("",
             "approval by " + a->who + " ignored: no promotion of " + o_.site +
                 " is pending (state " + StateName(state_) + ")",
             out);
    }
  } else if (auto* ss = std::get_if<EvSyncSet>(&event)) {
    sync_set_ = ss->sync;
    if (sync_set_) NoteEpoch(sync_set_->epoch, sync_set_->site);
    Evaluate(now, out);
  } else if (auto* pz = std::get_if<EvPaused>(&event)) {
    paused_ = pz->paused;
    paused_by_ = pz->by;
    Evaluate(now, out);
  } else if (auto* h = std::get_if<EvHandover>(&event)) {
    handover_to_ = h->to;
    handover_at_ = now;
    Evaluate(now, out);
  } else if (auto* pf = std::get_if<EvPromotionFailed>(&event)) {
    promotion_failed_at_ = now;
    promotion_failed_why_ = pf->why;
    if ((state_ == State::kPrimary || state_ == State::kSuspended) && epoch_ == pf->epoch) {
      if (!io_suspended_) {
        io_suspended_ = true;
        out.push_back({K::kSuspendIo, {}, epoch_, "the promotion failed", {}});
      }
      resigned_epoch_ = epoch_;
      resign_sent_at_ = now;
      out.push_back({K::kResign, o_.site, epoch_, pf->why, {}});
      Refuse("",
             "the promotion in epoch " + std::to_string(epoch_) + " failed (" + pf->why +
                 "): resigning the leader key so that another site can be elected; this site "
                 "does not campaign for " +
                 Seconds(PromotionHold()),
             out);
      epoch_ = 0;
      confirm_pending_ = false;
      state_ = State::kLeaderless;
      leaderless_since_ = now;
      last_leader_change_ = now;
    }
  } else if (auto* pr = std::get_if<EvPromote>(&event)) {
    promotion_failed_at_.reset();  // the operator decides
    if (state_ == State::kPrimary || state_ == State::kSuspended) return out;
    if (leader_.present && !Ours(leader_)) {
      Refuse("",
             "promote by " + pr->who + " refused: " + leader_.site +
                 " holds the leader key (epoch " + std::to_string(leader_.epoch) +
                 "); use a switchover",
             out);
    } else if (session_ == 0) {
      Refuse("", "promote by " + pr->who + " refused: no etcd session", out);
    } else if (auto it = sites_.find(o_.site); it == sites_.end() || !it->second.consistent) {
      Refuse("", "promote by " + pr->who + " refused: " + o_.site + " is not consistent", out);
    } else if (state_ != State::kCampaigning) {
      Campaign(out);
    }
  }
  return out;
}

void FailoverMachine::OnLeader(Nanos now, const LeaderView& v, std::vector<FailoverAction>& out) {
  using K = FailoverAction::Kind;
  const LeaderView prev = leader_;
  const bool prev_known = leader_known_;
  leader_known_ = true;
  leader_ = v;
  if (v.present) NoteEpoch(v.epoch, v.site);
  if (v.present && prev_known && prev.present && prev.epoch != v.epoch) last_leader_change_ = now;
  if (v.present && prev_known && !prev.present && state_ != State::kStarting) {
    last_leader_change_ = now;
  }
  if (session_ == 0) {
    state_ = State::kStarting;
    return;  // nothing can be decided without a session
  }
  if (v.present) handover_to_.clear();
  if (Ours(v)) {
    leaderless_since_.reset();
    if (state_ == State::kPrimary || state_ == State::kSuspended) {
      if (state_ == State::kSuspended && confirm_pending_ && v.epoch == epoch_) {
        confirm_pending_ = false;
        if (LeaseFresh(now)) {
          state_ = State::kPrimary;
          io_suspended_ = false;
          out.push_back({K::kResumeIo, {}, epoch_, "lease renewed and leader key confirmed", {}});
        }
      }
      return;
    }
    // The key we resigned, still seen until etcd deletes it: never promote in it again.
    if (v.epoch == resigned_epoch_) {
      state_ = State::kLeaderless;
      return;
    }
    // We hold the key (our campaign's answer, or a watch that saw it first).
    if (state_ == State::kAwaitingApproval) out.push_back({K::kClearPending, {}, 0, "", {}});
    state_ = State::kPrimary;
    epoch_ = v.epoch;
    last_leader_change_ = now;
    out.push_back({K::kPromote, o_.site, epoch_, "holds the leader key", {}});
    if (LeaseFresh(now)) {
      io_suspended_ = false;
      out.push_back({K::kResumeIo, {}, epoch_, "primary", {}});
    } else {
      state_ = State::kSuspended;
    }
    return;
  }
  if (v.present) {
    leaderless_since_.reset();
    last_refusal_kind_.clear();  // a new leaderless episode reports its refusals again
    const bool was_following = state_ == State::kReplica && prev_known && prev == v;
    if (state_ == State::kPrimary || state_ == State::kSuspended) {
      LoseLeadership(v.site, v.epoch, "the leader key is held by " + v.site, out);
    }
    if (state_ == State::kAwaitingApproval) {
      out.push_back({K::kClearPending, {}, 0, v.site + " took the leader key", {}});
    }
    state_ = State::kReplica;
    // Our own key from an earlier run (another lease) expires by itself: nobody to follow.
    if (!was_following && v.site != o_.site) {
      out.push_back({K::kFollow, v.site, v.epoch, "", {}});
    }
    return;
  }
  // Nobody holds the key.
  if (state_ == State::kPrimary || state_ == State::kSuspended) {
    LoseLeadership("", 0, "the leader key was deleted", out);
  }
  if (!leaderless_since_) leaderless_since_ = now;
  if (state_ != State::kCampaigning && state_ != State::kAwaitingApproval) {
    state_ = State::kLeaderless;
  }
  Evaluate(now, out);
}

void FailoverMachine::LoseLeadership(const std::string& follow, uint64_t epoch,
                                     const std::string& why, std::vector<FailoverAction>& out) {
  using K = FailoverAction::Kind;
  if (!io_suspended_) {
    io_suspended_ = true;
    out.push_back({K::kSuspendIo, {}, epoch_, why, {}});
  }
  out.push_back({K::kDemote, follow, epoch, why, {}});
  epoch_ = 0;
  confirm_pending_ = false;
  state_ = follow.empty() ? State::kLeaderless : State::kReplica;
}

void FailoverMachine::CheckLease(Nanos now, std::vector<FailoverAction>& out) {
  if (state_ != State::kPrimary || LeaseFresh(now)) return;
  state_ = State::kSuspended;
  confirm_pending_ = false;
  if (!io_suspended_) {
    io_suspended_ = true;
    out.push_back({FailoverAction::Kind::kSuspendIo,
                   {},
                   epoch_,
                   "the etcd lease was not renewed for " + Ms(now - last_renewal_sent_) +
                       " (I/O is suspended " + Ms(o_.suspend_after) +
                       " after the last renewal, before the " + Ms(o_.lease_ttl) +
                       " lease could end at etcd)",
                   {}});
  }
}

void FailoverMachine::Refuse(const std::string& kind, const std::string& why,
                             std::vector<FailoverAction>& out) {
  // An empty kind (an answer to an operator's command) is always emitted.
  const bool repeat = !kind.empty() && kind == last_refusal_kind_;
  if (!kind.empty()) last_refusal_kind_ = kind;
  last_refusal_ = why;
  if (repeat) return;
  out.push_back({FailoverAction::Kind::kRefused, o_.site, 0, "group " + o_.group + ": " + why, {}});
}

void FailoverMachine::Campaign(std::vector<FailoverAction>& out) {
  state_ = State::kCampaigning;
  out.push_back({FailoverAction::Kind::kCampaign, o_.site, 0, "", {}});
}

void FailoverMachine::Evaluate(Nanos now, std::vector<FailoverAction>& out) {
  using K = FailoverAction::Kind;
  if (state_ != State::kLeaderless && state_ != State::kAwaitingApproval) return;
  if (session_ == 0) return;
  if (promotion_refused(now)) {
    if (state_ == State::kAwaitingApproval) {
      state_ = State::kLeaderless;
      out.push_back({K::kClearPending, {}, 0, "", {}});
    }
    Refuse("promotion-failed",
           "this site's promotion failed " + Seconds(now - *promotion_failed_at_) + " ago (" +
               promotion_failed_why_ + "): it does not campaign until " + Seconds(PromotionHold()) +
               " have passed, and says so in its site report meanwhile",
           out);
    return;
  }
  // A switchover's hand-over (EvHandover): only its target campaigns, at once.
  if (!handover_to_.empty() && now - handover_at_ < 2 * o_.lease_ttl) {
    if (handover_to_ == o_.site && state_ != State::kCampaigning) {
      if (state_ == State::kAwaitingApproval) out.push_back({K::kClearPending, {}, 0, "", {}});
      Campaign(out);
    }
    return;
  }
  if (!primary_report_known_) return;
  // Bootstrap: a new group (no primary ever reported) starts on its configured primary, and the
  // last primary may always take its key back (nobody can be ahead of it). Only on a report read
  // after the key vanished: only the key's holder writes the report, so that one is the last
  // primary's last word. A report read before may predate whole reigns of other sites that this
  // one missed while it was cut off from etcd (its own report, while a site it could not see was
  // promoted, completed writes in sync mode and was lost in turn).
  // And only if no newer primary is known than the report's: one that was lost within a report
  // interval of its promotion never published a report, but its leader key or its sync set may
  // have been seen (the sync set is published before any write completes in sync mode).
  const bool report_fresh =
      primary_report_read_ && leaderless_since_ && *primary_report_read_ >= *leaderless_since_;
  // (A group with no report: a sync set that another site published says that site may have
  // completed writes in sync mode.)
  const bool new_group = !primary_report_ && o_.site == o_.configured_primary &&
                         (!sync_set_ || sync_set_->site == o_.site);
  const bool last_primary = newest_epoch_ > 0 && newest_site_ == o_.site;
  if (report_fresh && (new_group || last_primary)) {
    if (state_ == State::kAwaitingApproval) out.push_back({K::kClearPending, {}, 0, "", {}});
    Campaign(out);
    return;
  }
  if (!leaderless_since_ || now - *leaderless_since_ < o_.settle) return;
  const std::string lost =
      primary_report_ ? "the primary " + primary_report_->site + " is gone" : "no primary";
  if (paused_) {
    Refuse("paused",
           lost + ", but automatic fail-over is paused (" + paused_by_ +
               "): waiting for `tvillingctl resume --group " + o_.group +
               "`, or `tvillingctl promote` on the site to promote",
           out);
    return;
  }
  if (o_.policy == FailoverPolicy::kManual) {
    Refuse(
        "manual",
        lost +
            " and the policy is manual: waiting for `tvillingctl promote` on the site to promote",
        out);
    return;
  }
  if (automatic_refused_for_lack_of_witness()) {
    Refuse("witness",
           lost +
               ", but automatic fail-over is refused: the group has only two sites and no witness, "
               "so neither can tell a lost peer from a partition (both could promote); add a "
               "third etcd member at another site (coordinator.witness) or use policy "
               "\"approve\" or \"manual\"",
           out);
    return;
  }
  if (last_leader_change_ && now - *last_leader_change_ < o_.anti_flap) {
    Refuse("anti-flap",
           lost + ", but the last leader change was " + Seconds(now - *last_leader_change_) +
               " ago: anti-flapping holds automatic promotion until " + Seconds(o_.anti_flap) +
               " have passed",
           out);
    return;
  }
  CandidatePlan plan = ChooseCandidate(o_, sites_, primary_report_, {}, sync_set_);
  // Nobody the sync set allows: a site outside it may lack writes completed in sync mode, so only
  // an operator may promote it (the approve path, with the loss bound).
  bool needs_approval = o_.policy != FailoverPolicy::kAutomatic;
  std::string outside;
  if (plan.winner.empty() && sync_set_) {
    CandidatePlan loose = ChooseCandidate(o_, sites_, primary_report_);
    if (!loose.winner.empty()) {
      CandidatePlan winner_only = loose;
      winner_only.refused.clear();
      outside = plan.Describe() + "; " + winner_only.Describe() +
                " could lose writes completed in sync mode";
      Refuse("sync-set:" + loose.winner,
             lost + ": " + outside + "; approve to promote it: `tvillingctl failover approve " +
                 "--group " + o_.group + " --site " + loose.winner + "`",
             out);
      plan = std::move(loose);
      needs_approval = true;
    }
  }
  if (plan.winner.empty()) {
    Refuse("no-candidate:" + plan.Describe(), lost + ": " + plan.Describe(), out);
    return;
  }
  if (!plan.held_back.empty() && !needs_approval) {
    needs_approval = true;
    outside = plan.Describe() + "; but " + plan.held_back;
    Refuse("held-back:" + plan.winner,
           lost + ": " + outside + "; approve to promote " + plan.winner +
               " anyway: `tvillingctl failover approve --group " + o_.group + " --site " +
               plan.winner + "`",
           out);
  }
  if (plan.winner != o_.site) return;  // the winner campaigns
  // ... on site reports read after the settle: a site that was cut off from etcd, or has just
  // started, may hold reports from before the other sites had sessions (or none at all), and would
  // choose itself over a more advanced site that holds writes it lacks.
  // The same for the primary report (the coordinator reads both in one pass): the lag gate and
  // the loss bound come from it, and one read before may name this site as the last primary.
  const Nanos settled = *leaderless_since_ + o_.settle;
  if (!sites_read_ || *sites_read_ < settled) return;
  if (!primary_report_read_ || *primary_report_read_ < settled) return;
  if (!needs_approval) {
    if (state_ == State::kAwaitingApproval) out.push_back({K::kClearPending, {}, 0, "", {}});
    Campaign(out);
    return;
  }
  const std::string plan_text = lost + ": " + (outside.empty() ? plan.Describe() : outside);
  if (state_ != State::kAwaitingApproval || plan_text != pending_for_) {
    state_ = State::kAwaitingApproval;
    pending_for_ = plan_text;
    pending_loss_ = plan.loss;
    out.push_back({K::kPublishPending, o_.site, 0,
                   plan_text + "; waiting for `tvillingctl failover approve --group " + o_.group +
                       " --site " + o_.site + "`",
                   plan.loss});
  }
}

}  // namespace tvilling::core
