// failover.h: the fail-over decisions of one group at one site, as a pure state machine
// (docs/coordinator.md).
//
// No sockets, threads, etcd or clock reads: the coordinator (agent/coordinator/) feeds it events —
// what it read or watched in etcd, its lease's renewals, operator commands, and the monotonic time
// `now` — and carries out the actions it returns (campaign for the leader key, promote, demote,
// suspend or resume client I/O, publish an approval request, log a refusal).
//
// The rules (docs/coordinator.md has the argument):
// - The primary of a group is the site whose value is in the group's leader key, written under
//   that site's etcd lease ("session"). The key's create revision is the primary's epoch.
// - A primary suspends client I/O once `suspend_after` (default 2/3 TTL) has passed on ITS OWN
//   monotonic clock since it sent the last keep-alive that etcd answered. Its lease cannot end at
//   etcd before `sent + TTL` (etcd renews it for TTL when it handles the request, after it was
//   sent; etcd may extend a lease, never shorten it), so the primary stops before anyone can take
//   the key. It resumes only after a fresh renewal AND a read of the leader key that still shows
//   it, with the same epoch.
// - When the leader key is gone, a replica may take it only if it is eligible: its site reports
//   it consistent, it is not marked no-failover, and its lag, as the last primary report gave it,
//   is within the gate (bytes and seconds). Among the eligible sites the most advanced durable
//   LSN wins (ties: the smaller site name); only the winner campaigns (the leader key's
//   create-if-absent Txn decides races anyway).
// - With the primary's sync set in etcd (EvSyncSet), automatic promotion is limited to the sites it
//   allows (its members holding its floor; with no member, the sites holding the floor), so no
//   write completed in sync mode is lost; a site it excludes needs an operator's approval.
// - Candidates decide only on site reports that arrived at least `settle` after the leader key
//   vanished (EvSites is re-read periodically): a site cut off from etcd, or just started, may
//   hold an old view in which a more advanced site has no report.
// - Anti-flapping: no automatic promotion within `anti_flap` of the last leader change this site
//   observed.
// - Policy: kAutomatic campaigns; kApprove publishes the plan and its loss bound and waits for
//   an approval naming this site; kManual never campaigns on its own (only an operator's promote).
// - Two sites without a witness refuse automatic fail-over (a partition and a lost site look the
//   same from either side); the refusal says so.
// - Bootstrap: with no leader key and no primary report in etcd (a new group), the configured
//   primary campaigns at once; so does the last primary (nothing can be ahead of it): the site
//   of the newest epoch this site has heard of (leader keys seen, the sync set and the primary
//   report read). Only on a primary report read in this session after the key vanished: one read
//   earlier may be stale (a primary cut off from etcd still holds its own report while another
//   site is promoted, completes writes in sync mode and is lost in turn), and a primary lost
//   within a report interval of its promotion never published one (its sync set names it).
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "agent/core/replication.h"  // Nanos

namespace tvilling::core {

enum class FailoverPolicy : uint8_t { kAutomatic, kManual, kApprove };
const char* FailoverPolicyName(FailoverPolicy p);

struct FailoverOptions {
  std::string group;
  std::string site;                // this agent's site
  std::vector<std::string> sites;  // every site that holds the group, this one included
  std::string configured_primary;  // the config's `primary` (bootstrap only)
  std::string witness;             // a third site that holds only an etcd member ("" = none)
  FailoverPolicy policy = FailoverPolicy::kAutomatic;
  Nanos lease_ttl = 3'000'000'000;
  // Suspend I/O this long after the send time of the last answered keep-alive. Must be < TTL.
  Nanos suspend_after = 2'000'000'000;
  // Lag gate for candidates (as of the primary's last report): both must hold.
  uint64_t max_lag_bytes = 1ull << 20;
  Nanos max_lag_time = 10'000'000'000;
  // No automatic promotion within this long of the last observed leader change.
  Nanos anti_flap = 60'000'000'000;
  // A leaderless group waits this long before candidates decide (site reports settle).
  Nanos settle = 500'000'000;
};

// The leader key as read or watched.
struct LeaderView {
  bool present = false;
  std::string site;
  uint64_t epoch = 0;  // the key's create revision
  int64_t lease = 0;
  bool operator==(const LeaderView&) const = default;
};

// What a site publishes under its own lease (so it vanishes with the site's session).
struct SiteReport {
  uint64_t durable_lsn = 0;
  bool consistent = false;
  bool no_failover = false;
  // Its promotion failed lately (EvPromotionFailed): not eligible, and while its durable LSN is
  // above a candidate's, that candidate needs an operator's approval (it would lose what this
  // site holds, which may be writes completed in sync mode).
  bool promotion_failed = false;
};

struct PeerLag {
  uint64_t lsn = 0;    // the peer's durable LSN as the primary knew it
  uint64_t bytes = 0;  // bytes in (lsn, last_lsn]
  Nanos age = 0;       // capture age of the oldest of those records when reported
};

// What the primary publishes (not under a lease: it outlives the primary, for loss accounting).
struct PrimaryReport {
  std::string site;
  uint64_t epoch = 0;
  uint64_t last_lsn = 0;
  std::map<std::string, PeerLag> peers;
};

// The sync set in etcd (<prefix>/groups/<g>/sync), as a primary published it, guarded by its
// epoch, before any write completed without a member it drops (docs/coordinator.md).
struct PublishedSyncSet {
  std::string site;    // the primary that published it
  uint64_t epoch = 0;  // in its epoch
  SyncSet set;
  // "the sync set {a} floor 17 published by b in epoch 145"
  std::string Describe() const;
};

// The data a promotion of `site` would lose, as of the primary's last report.
struct LossBound {
  uint64_t from_lsn = 0;  // first LSN lost (durable + 1)
  uint64_t to_lsn = 0;    // last LSN lost (primary's last); from > to: nothing
  uint64_t bytes = 0;
  Nanos age = 0;
  bool none() const { return from_lsn > to_lsn; }
};

struct CandidatePlan {
  std::string winner;                          // "" if nobody is eligible
  LossBound loss;                              // if winner != ""
  std::map<std::string, std::string> refused;  // site -> why it is not eligible
  // Why the winner needs an operator's approval although it is eligible ("" = it does not): a
  // site whose promotion failed holds records the winner lacks.
  std::string held_back;
  std::string Describe() const;
};

// The choice every site computes alike from the same reports (pure). With a published sync set
// (`sync`, the last one in etcd) a site other than its publisher is eligible only if its durable
// LSN reaches the set's floor and, when the set has members, only if it is one (a member holds
// every write completed in sync mode, so the lag gate does not apply to it); with no member the
// lag gate decides as without a set.
CandidatePlan ChooseCandidate(const FailoverOptions& o,
                              const std::map<std::string, SiteReport>& sites,
                              const std::optional<PrimaryReport>& primary,
                              const std::string& exclude = {},
                              const std::optional<PublishedSyncSet>& sync = std::nullopt);

// ---- events ----
struct EvTick {};
struct EvSessionStarted {  // a new lease; `sent` = when the LeaseGrant was sent
  int64_t lease = 0;
  Nanos sent = 0;
};
struct EvSessionRenewed {  // a keep-alive answered with TTL > 0; `sent` = when it was sent
  Nanos sent = 0;
};
struct EvSessionLost {};  // etcd says the lease is gone
// `revision`: the etcd store revision the view is as of (a read's header revision, a watch
// event's mod revision); 0 = unknown, taken as new. A view older than one already handled is
// ignored: a read answered before a watch event but handled after it (two threads) must not undo
// what the event said (a deletion, another site's key, our own key deleted and re-created).
struct EvLeader {  // the leader key as read or watched
  LeaderView leader;
  int64_t revision = 0;
};
struct EvCampaignDone {  // answer of a kCampaign Txn; `leader` = the key after it
  bool won = false;
  LeaderView leader;
  int64_t revision = 0;
};
struct EvSites {
  std::map<std::string, SiteReport> sites;
};
struct EvPrimaryReport {
  std::optional<PrimaryReport> report;
};
struct EvApprove {  // tvillingctl failover approve
  std::string site;
  std::string who;
};
struct EvPromote {  // tvillingctl promote (manual), on the site to promote
  std::string who;
};
// A controlled switchover (docs/coordinator.md, "Switchover"): the primary deleted the leader key
// and named `to` in <prefix>/groups/<g>/handover in one Txn. Until a leader appears, or for
// 2 x lease TTL, `to` campaigns at once (whatever the policy) and no other site campaigns — not
// even the last primary under the bootstrap rule. After that the usual rules apply (a target that
// never campaigned: the old primary takes its key back as the last primary).
struct EvHandover {
  std::string to;
};
// Maintenance mode (`tvillingctl pause` / `resume`, the key <prefix>/groups/<g>/paused): while
// paused no site promotes itself automatically (a lost primary leaves the group without one until
// an operator promotes or resumes); switchovers, promote and approve still work, and the last
// primary may still take its own key back.
struct EvPaused {
  bool paused = false;
  std::string by;  // who paused, as the key says
};
// The sync set key as read or watched (nullopt: absent). In automatic policy only the sites it
// allows (ChooseCandidate) are promoted automatically; a site it excludes needs an operator's
// `tvillingctl failover approve` (the plan and its loss bound are published as under the approve
// policy) or `tvillingctl promote`.
struct EvSyncSet {
  std::optional<PublishedSyncSet> sync;
};
// The site's promotion in `epoch` (after a kPromote) failed and it stayed a replica: its volumes
// are not a consistent image, its log has seen a newer epoch, or a disk error. Holding the key in
// that epoch, the machine resigns it (kResign) so that another site can be elected. For
// max(anti_flap, 2 x lease TTL) after the failure the site then does not campaign on its own (not
// under the bootstrap rule, nor as a switchover's target) and its site report says promotion_failed
// (promotion_refused()), so that the other sites choose someone else. An operator's promote or
// approve ends that hold.
struct EvPromotionFailed {
  uint64_t epoch = 0;
  std::string why;
};
using FailoverEvent = std::variant<EvTick, EvSessionStarted, EvSessionRenewed, EvSessionLost,
                                   EvLeader, EvCampaignDone, EvSites, EvPrimaryReport, EvApprove,
                                   EvPromote, EvHandover, EvPaused, EvSyncSet, EvPromotionFailed>;

// ---- actions ----
struct FailoverAction {
  enum class Kind : uint8_t {
    kCampaign,        // Txn: create the leader key with this site under the session lease
    kPromote,         // become primary in `epoch`
    kDemote,          // stop being primary (I/O stays suspended); follow `site` if not empty
    kFollow,          // (as a replica) the primary is `site` in `epoch`
    kSuspendIo,       // stop completing client I/O (hold it)
    kResumeIo,        // complete client I/O again
    kReadLeader,      // read the leader key and report it with EvLeader
    kNewSession,      // grant a new lease (the old one is gone)
    kPublishPending,  // approve policy: publish `message` (plan, loss) and wait
    kClearPending,
    kRefused,  // an automatic fail-over was refused: `message` says why
    kResign,   // Txn: delete the leader key if it holds this site in `epoch` (EvPromotionFailed)
  };
  Kind kind;
  std::string site;
  uint64_t epoch = 0;
  std::string message;
  LossBound loss;
};
const char* ActionName(FailoverAction::Kind k);

class FailoverMachine {
 public:
  enum class State : uint8_t {
    kStarting,          // no session or no leader observation yet
    kReplica,           // another site holds the leader key
    kLeaderless,        // nobody holds it
    kCampaigning,       // our Txn is in flight
    kAwaitingApproval,  // approve policy: waiting for the operator
    kPrimary,           // we hold the key; I/O allowed
    kSuspended,         // we may hold the key, but cannot prove it: I/O suspended
  };
  static const char* StateName(State s);

  explicit FailoverMachine(FailoverOptions options);
  std::vector<FailoverAction> Handle(Nanos now, const FailoverEvent& event);

  State state() const { return state_; }
  uint64_t epoch() const { return epoch_; }
  const LeaderView& leader() const { return leader_; }
  const std::string& last_refusal() const { return last_refusal_; }
  // Under the approve policy, while this site awaits approval: the plan it published (who is
  // lost, whom to promote and its loss bound, without the hint how to approve) and that bound;
  // "" and an empty bound otherwise.
  std::string pending_plan() const {
    return state_ == State::kAwaitingApproval ? pending_for_ : std::string();
  }
  LossBound pending_loss() const {
    return state_ == State::kAwaitingApproval ? pending_loss_ : LossBound{};
  }
  bool paused() const { return paused_; }
  const std::optional<PublishedSyncSet>& sync_set() const { return sync_set_; }
  const FailoverOptions& options() const { return o_; }
  // The instant I/O must be suspended at if no renewal comes (primary only).
  Nanos suspend_deadline() const { return last_renewal_sent_ + o_.suspend_after; }
  // Two sites and no witness: automatic fail-over is refused (docs/coordinator.md).
  bool automatic_refused_for_lack_of_witness() const;
  // Within max(anti_flap, 2 x lease TTL) of a failed promotion (EvPromotionFailed): the site keeps
  // out of elections and publishes its site report with promotion_failed set.
  bool promotion_refused(Nanos now) const {
    return promotion_failed_at_.has_value() && now - *promotion_failed_at_ < PromotionHold();
  }
  Nanos PromotionHold() const { return std::max(o_.anti_flap, 2 * o_.lease_ttl); }

 private:
  void OnLeader(Nanos now, const LeaderView& v, std::vector<FailoverAction>& out);
  void Evaluate(Nanos now, std::vector<FailoverAction>& out);
  void CheckLease(Nanos now, std::vector<FailoverAction>& out);
  // Emits a kRefused once per `kind` of refusal (not on every tick while its figures change).
  void Refuse(const std::string& kind, const std::string& why, std::vector<FailoverAction>& out);
  void Campaign(std::vector<FailoverAction>& out);
  void LoseLeadership(const std::string& follow, uint64_t epoch, const std::string& why,
                      std::vector<FailoverAction>& out);
  bool Ours(const LeaderView& v) const;
  bool LeaseFresh(Nanos now) const {
    return session_ != 0 && now < last_renewal_sent_ + o_.suspend_after;
  }

  const FailoverOptions o_;
  State state_ = State::kStarting;
  int64_t session_ = 0;
  Nanos last_renewal_sent_ = 0;
  bool leader_known_ = false;
  LeaderView leader_;
  int64_t view_revision_ = 0;  // the newest revision of a leader view handled
  // Whether a view as of `revision` is older than one already handled; if not, it is the newest.
  bool StaleView(int64_t revision) {
    if (revision != 0 && revision < view_revision_) return true;
    view_revision_ = std::max(view_revision_, revision);
    return false;
  }
  uint64_t epoch_ = 0;  // ours, while primary/suspended
  bool io_suspended_ = true;
  bool confirm_pending_ = false;  // kReadLeader sent while suspended
  std::optional<Nanos> leaderless_since_;
  std::optional<Nanos> last_leader_change_;
  std::map<std::string, SiteReport> sites_;
  std::optional<Nanos> sites_read_;  // when the last EvSites arrived
  std::optional<PrimaryReport> primary_report_;
  bool primary_report_known_ = false;
  // When the last EvPrimaryReport arrived in this session (reset by EvSessionStarted): the
  // bootstrap decides only on a report read after the key vanished.
  std::optional<Nanos> primary_report_read_;
  // The newest primary this site has heard of (epoch, site): from the leader keys it saw, the
  // sync sets and the primary reports it read. Only that site is "the last primary".
  uint64_t newest_epoch_ = 0;
  std::string newest_site_;
  void NoteEpoch(uint64_t epoch, const std::string& site) {
    if (epoch > newest_epoch_) {
      newest_epoch_ = epoch;
      newest_site_ = site;
    }
  }
  std::optional<PublishedSyncSet> sync_set_;  // EvSyncSet
  std::string last_refusal_;
  std::string last_refusal_kind_;
  std::string pending_for_;  // kAwaitingApproval: the plan we published (pending_plan())
  LossBound pending_loss_;   // ... and its loss bound
  bool paused_ = false;      // EvPaused
  std::string paused_by_;
  std::string handover_to_;  // a switchover's target, until a leader appears or it expires
  Nanos handover_at_ = 0;
  std::optional<Nanos> promotion_failed_at_;  // EvPromotionFailed (promotion_refused())
  std::string promotion_failed_why_;
  uint64_t resigned_epoch_ = 0;  // the key we resign; never promoted in again
  Nanos resign_sent_at_ = 0;     // kResign is repeated every second while the key stays
};

}  // namespace tvilling::core
