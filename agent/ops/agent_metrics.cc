// agent_metrics.cc: the families tvillingd exports (docs/operations.md, "Metrics").
#include "agent/ops/agent_metrics.h"

#include <algorithm>
#include <limits>
#include <span>
#include <string>
#include <string_view>

#include "agent/nbd/frontend.h"

namespace tvilling::ops {
namespace {

constexpr std::string_view kRoles[] = {"primary", "replica"};
// core::LinkStateName's values on the primary, and the replica's view of its primary's stream.
constexpr std::string_view kLinkStates[] = {"disconnected", "handshake", "copying", "streaming",
                                            "refused"};
// An online verify's states (tvillingctl verify; node::RunVerify); "none": not since the start.
constexpr std::string_view kVerifyStates[] = {"none",       "running", "identical", "mismatches",
                                              "incomplete", "failed",  "cancelled"};
constexpr std::string_view kCoordinatorStates[] = {"starting",    "replica",           "leaderless",
                                                   "campaigning", "awaiting-approval", "primary",
                                                   "suspended"};

double D(uint64_t v) { return static_cast<double>(v); }
double B(bool v) { return v ? 1.0 : 0.0; }

MetricLabels With(MetricLabels labels, std::string key, std::string value) {
  labels.emplace_back(std::move(key), std::move(value));
  return labels;
}

// A state set: one series per known state, 1 for the current one (and the current one too if it
// is a state the list does not know yet; nothing for an empty current state).
void AppendStateSet(std::string_view name, std::string_view help, const MetricLabels& l,
                    std::span<const std::string_view> states, const std::string& current,
                    Exposition& out) {
  bool known = false;
  for (std::string_view s : states) {
    known |= s == current;
    out.Gauge(name, help, With(l, "state", std::string(s)), B(s == current));
  }
  if (!known && !current.empty()) out.Gauge(name, help, With(l, "state", current), 1);
}

// The running or last online verify of a peer since the agent started: state "none" and zeros
// before the first, so that the series (and the alert on them) exist from the start.
void AppendVerify(const MetricLabels& l, const v1::VerifyStatus& v, Exposition& out) {
  AppendStateSet("tvilling_verify_state",
                 "State of the running or last online verify of the peer: 1 for the current one.",
                 l, kVerifyStates, v.state().empty() ? std::string("none") : v.state(), out);
  out.Gauge("tvilling_verify_total_bytes", "Bytes the running or last verify covers.", l,
            D(v.total_bytes()));
  out.Gauge("tvilling_verify_done_bytes", "Bytes the running or last verify has settled.", l,
            D(v.done_bytes()));
  out.Gauge("tvilling_verify_compared_chunks",
            "Chunks compared at a common LSN by the running or last verify.", l,
            D(v.compared_chunks()));
  out.Gauge("tvilling_verify_mismatch_chunks",
            "Chunks that differ from the primary's, found by the running or last verify.", l,
            D(v.mismatch_chunks()));
  out.Gauge("tvilling_verify_mismatch_bytes", "Bytes of those chunks.", l, D(v.mismatch_bytes()));
  out.Gauge("tvilling_verify_unverified_chunks",
            "Chunks never sampled at a common LSN (rewritten faster than applied) in the running "
            "or last verify.",
            l, D(v.unverified_chunks()));
  out.Gauge("tvilling_verify_rate_bytes_per_second", "Rate of the running verify (0 when none).", l,
            v.state() == "running" ? D(v.bytes_per_s()) : 0.0);
  out.Gauge("tvilling_verify_last_finished_timestamp_seconds",
            "Unix time the last verify of the peer finished (0 while the first runs).", l,
            D(v.finished_unix_ms()) / 1e3);
}

void AppendPeer(const MetricLabels& group_labels, const v1::PeerStatus& p, bool sender,
                Exposition& out) {
  const MetricLabels l = With(group_labels, "peer", p.peer());
  AppendStateSet("tvilling_peer_link_state",
                 "State of the replication link to the peer: 1 for the current state.", l,
                 kLinkStates, p.link_state(), out);
  out.Gauge("tvilling_peer_up",
            "1 if a replication stream to or from the peer is established (streaming or copying).",
            l, B(p.link_state() == "streaming" || p.link_state() == "copying"));
  out.Gauge("tvilling_peer_sync_mode", "1 if the peer is a sync peer, 0 if async.", l,
            B(p.mode() == "sync"));
  out.Gauge("tvilling_peer_in_sync_set", "1 if WRITEs wait for this peer.", l, B(p.in_sync_set()));
  out.Gauge("tvilling_peer_degraded",
            "1 if this sync peer was dropped from the sync set (sync_degrade_after_ms).", l,
            B(p.degraded()));
  out.Gauge("tvilling_peer_received_lsn", "Last LSN in the peer's log.", l, D(p.received_lsn()));
  out.Gauge("tvilling_peer_durable_lsn", "Last LSN fsynced in the peer's log.", l,
            D(p.durable_lsn()));
  out.Gauge("tvilling_peer_applied_lsn", "Last LSN written to the peer's volumes.", l,
            D(p.applied_lsn()));
  out.Gauge("tvilling_peer_lag_records",
            "Records not yet durable at the peer (last LSN - the peer's durable LSN).", l,
            D(p.lag_lsns()));
  out.Gauge("tvilling_peer_lag_bytes", "Bytes of the records not yet durable at the peer.", l,
            D(p.lag_bytes()));
  out.Gauge("tvilling_peer_lag_seconds",
            "Age of the oldest record not yet durable at the peer (0 when caught up).", l,
            p.lag_seconds());
  out.Gauge("tvilling_peer_rtt_seconds", "Measured round-trip time to the peer (0 = not yet).", l,
            D(p.rtt_us()) / 1e6);
  out.Gauge("tvilling_peer_window_bytes", "Current flow-control window to the peer.", l,
            D(p.window_bytes()));
  out.Gauge("tvilling_peer_inflight_bytes", "Bytes sent to the peer and not yet received.", l,
            D(p.inflight_bytes()));
  out.Gauge("tvilling_peer_delivery_rate_bytes_per_second",
            "Delivery-rate estimate the window is sized from (0 = not yet).", l,
            D(p.delivery_rate_bytes_per_s()));
  out.Gauge("tvilling_peer_copy_total_bytes",
            "Size of the running full copy to or from the peer (0 when none runs).", l,
            D(p.copy_total_bytes()));
  out.Gauge("tvilling_peer_copy_done_bytes", "Bytes of the running full copy done so far.", l,
            D(p.copy_done_bytes()));
  out.Gauge("tvilling_peer_copy_pending",
            "1 while a full copy to the peer is not yet confirmed complete.", l,
            B(p.copy_pending()));
  if (!sender) return;
  // What the primary sent on this link since it became primary here.
  out.Gauge("tvilling_peer_rate_limit_bytes_per_second",
            "The link's rate cap (rate_limit; 0 = none). Changed by a reload.", l,
            D(p.rate_limit_bytes_per_s()));
  out.Counter("tvilling_peer_sent_batches_total", "Log batches sent to the peer.", l,
              D(p.sent_batches()));
  out.Counter("tvilling_peer_sent_records_total", "Log records sent to the peer (resends count).",
              l, D(p.sent_records()));
  out.Counter("tvilling_peer_sent_records_read_back_total",
              "Of the records sent, those read back from the log instead of sent from memory "
              "right after they were written (a link behind by more than a few batches, resends).",
              l, D(p.sent_records_read_back()));
  out.Counter("tvilling_peer_sent_log_bytes_total",
              "Bytes of the log records sent to the peer, as in the log (before compression).", l,
              D(p.sent_log_bytes()));
  out.Counter("tvilling_peer_sent_wire_bytes_total",
              "Bytes of the batch messages sent to the peer, after compression; "
              "log_bytes / wire_bytes is the compression ratio.",
              l, D(p.sent_wire_bytes()));
  out.Counter("tvilling_peer_sent_copy_bytes_total",
              "Bytes of full-copy messages sent to the peer.", l, D(p.sent_copy_bytes()));
  out.Counter("tvilling_peer_dials_total", "Streams opened to the peer (each starts a handshake).",
              l, D(p.dials()));
  out.Counter("tvilling_peer_disconnects_total",
              "Streams to the peer that ended, failed dials included.", l, D(p.disconnects()));
  AppendVerify(l, p.verify(), out);  // the default (empty) status before the first verify
}

}  // namespace

void AppendStatusMetrics(const v1::StatusReply& status, Exposition& out) {
  const std::string& site = status.agent().site();
  const MetricLabels agent = {{"site", site}};
  out.Gauge("tvilling_agent_info", "Always 1; labels: the agent's site and version.",
            With(agent, "version", status.agent().version()), 1);
  out.Gauge("tvilling_agent_uptime_seconds", "Seconds since the agent started.", agent,
            D(status.agent().uptime_s()));
  for (const v1::GroupStatus& g : status.groups()) {
    const MetricLabels l = With(agent, "group", g.name());
    for (std::string_view r : kRoles) {
      out.Gauge("tvilling_group_role", "This agent's role in the group: 1 for the current role.",
                With(l, "role", std::string(r)), B(r == g.role()));
    }
    out.Gauge("tvilling_group_epoch", "Current epoch (term of primaryship) of the group's log.", l,
              D(g.epoch()));
    out.Gauge("tvilling_group_consistent",
              "1 if the group's volumes equal the primary's at some LSN (a replica in or right "
              "after a full copy is 0 and can never be promoted).",
              l, B(g.consistent()));
    if (!g.coordinator_state().empty()) {
      AppendStateSet("tvilling_group_coordinator_state",
                     "This site's fail-over state for the group: 1 for the current state "
                     "(suspended: a primary whose lease renewal is overdue holds client I/O).",
                     l, kCoordinatorStates, g.coordinator_state(), out);
      out.Gauge("tvilling_group_leader_epoch",
                "Create revision (epoch) of the group's leader key in etcd as this site last saw "
                "it; 0 while nobody holds it.",
                l, D(g.leader_epoch()));
      out.Gauge("tvilling_group_failover_paused",
                "1 while automatic fail-over of the group is paused (tvillingctl pause).", l,
                B(g.failover_paused()));
      out.Gauge("tvilling_group_failover_refused",
                "1 while this site's last automatic fail-over decision was a refusal (the reason "
                "is in tvillingctl status and the journal).",
                l, B(!g.failover_refusal().empty()));
      if (!g.sync_set().empty()) {
        out.Gauge("tvilling_group_sync_set_epoch",
                  "Epoch of the primary that published the group's sync set in etcd, as this site "
                  "last read it.",
                  l, D(g.sync_set_epoch()));
        out.Gauge("tvilling_group_sync_set_members",
                  "Members of the group's sync set in etcd (0: no site is known to hold every "
                  "write completed in sync mode beyond the set's floor).",
                  l, D(g.sync_set_members()));
      }
    }
    out.Gauge("tvilling_group_last_lsn", "Last LSN in the local log.", l, D(g.last_lsn()));
    out.Gauge("tvilling_group_durable_lsn", "Last LSN fsynced in the local log.", l,
              D(g.durable_lsn()));
    out.Gauge("tvilling_group_applied_lsn", "Last LSN written to the local volumes.", l,
              D(g.applied_lsn()));
    out.Gauge("tvilling_group_write_released_lsn", "Primary: WRITEs up to this LSN have completed.",
              l, D(g.write_released()));
    out.Gauge("tvilling_group_flush_released_lsn",
              "Primary: FLUSH/FUA up to this LSN have completed.", l, D(g.flush_released()));
    if (g.role() == "primary" && g.peers_size() > 0) {
      // What a fail-over to the most current peer would lose now: the records it does not hold
      // durably. With a sync peer in the sync set this is at most the writes still in flight.
      uint64_t records = std::numeric_limits<uint64_t>::max();
      uint64_t bytes = std::numeric_limits<uint64_t>::max();
      double seconds = std::numeric_limits<double>::infinity();
      for (const v1::PeerStatus& p : g.peers()) {
        records = std::min<uint64_t>(records, p.lag_lsns());
        bytes = std::min<uint64_t>(bytes, p.lag_bytes());
        seconds = std::min(seconds, p.lag_seconds());
      }
      const char* why =
          " a fail-over to the most current peer would lose now (the minimum of the peers' "
          "lag).";
      out.Gauge("tvilling_group_rpo_bound_records", std::string("Records") + why, l, D(records));
      out.Gauge("tvilling_group_rpo_bound_bytes", std::string("Bytes") + why, l, D(bytes));
      out.Gauge("tvilling_group_rpo_bound_seconds", std::string("Age of the oldest record") + why,
                l, seconds);
    }
    for (const v1::PeerStatus& p : g.peers()) {
      // A replica that no primary has streamed to yet knows no peer name: nothing to label (the
      // primary's own series cover that link).
      if (!p.peer().empty()) AppendPeer(l, p, g.role() == "primary", out);
    }
  }
}

void AppendGroupMetrics(const std::string& site, const GroupMetricsSource& g, Exposition& out) {
  const MetricLabels l = {{"site", site}, {"group", g.name}};
  out.Gauge("tvilling_log_bytes", "Bytes of the records the group's log holds.", l, D(g.log.bytes));
  out.Gauge("tvilling_log_first_lsn", "Oldest LSN still held in the group's log.", l,
            D(g.log.first_lsn));
  out.Gauge("tvilling_log_retained_records",
            "Records the group's log holds (the retained window, last - first + 1).", l,
            D(g.log.last_lsn >= g.log.first_lsn ? g.log.last_lsn - g.log.first_lsn + 1 : 0));
  out.Gauge("tvilling_log_hard_cap_bytes",
            "The configured [log] hard_cap (0 = none): above it records a peer still needs are "
            "dropped and that peer needs a full copy.",
            l, D(g.hard_cap_bytes));
  out.Histogram("tvilling_log_fsync_duration_seconds",
                "Duration of the group log's fsyncs (a synced write counts as one).", l, g.fsync);
  out.Counter("tvilling_log_appended_records_total",
              "Records written to the group's log since start (a primary: client writes; a "
              "replica: what it received).",
              l, D(g.appended_records));
  out.Counter("tvilling_log_appended_bytes_total",
              "Stored bytes (record header + payload) written to the group's log since start.", l,
              D(g.appended_bytes));
  out.Counter("tvilling_log_commits_total",
              "Batches the group's records were written in (one RocksDB write each); records / "
              "commits is the mean batch size.",
              l, D(g.commits));
  out.Counter("tvilling_group_checkpoints_total",
              "Checkpoints (volumes fsynced, applied LSN recorded) since start.", l,
              D(g.checkpoints));
  out.Gauge("tvilling_group_replayed_records", "Records replayed from the log at start.", l,
            D(g.replayed_records));
  for (const auto& [volume, io] : g.volumes) {
    if (io) io->AppendTo(out, With(l, "volume", volume));
  }
}

void AppendNbdMetrics(const std::string& site, const nbd::FrontendStats& s, Exposition& out) {
  const MetricLabels l = {{"site", site}};
  auto load = [](const std::atomic<uint64_t>& a) { return D(a.load(std::memory_order_relaxed)); };
  out.Counter("tvilling_nbd_connections_total", "NBD connections accepted.", l,
              load(s.connections));
  out.Gauge("tvilling_nbd_connections_open", "NBD connections open now.", l,
            load(s.connections_open));
  out.Counter("tvilling_nbd_handshakes_refused_total",
              "NBD handshakes that were malformed, truncated or aborted.", l,
              load(s.handshakes_refused));
  out.Counter("tvilling_nbd_requests_total", "NBD transmission requests read.", l,
              load(s.requests));
  out.Counter("tvilling_nbd_request_errors_total", "NBD requests answered with an error.", l,
              load(s.request_errors));
  out.Counter("tvilling_nbd_requests_refused_total",
              "NBD requests refused by validation (client bugs: out of range, bad flags).", l,
              load(s.requests_refused));
  out.Counter("tvilling_nbd_backpressure_waits_total",
              "Times an NBD connection paused reading at its in-flight limit.", l,
              load(s.backpressure_waits));
  out.Counter("tvilling_nbd_direct_replies_total",
              "NBD replies sent by the thread that completed the request (queue depth 1).", l,
              load(s.direct_replies));
}

}  // namespace tvilling::ops
