// agent_metrics.h: tvillingd's metrics, built at scrape time from what the agent already keeps:
// the Control API's status snapshot (the one `tvillingctl status` prints), each group log's state
// and fsync histogram, the NBD frontend's counters and the client I/O counters of each volume.
// docs/operations.md lists every metric and what the alert rules make of them.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "agent/ops/metrics.h"
#include "storage/group_log.h"
#include "tvilling/v1/control.pb.h"

namespace tvilling::nbd {
struct FrontendStats;
}

namespace tvilling::ops {

// What a group contributes beyond the status snapshot.
struct GroupMetricsSource {
  std::string name;
  storage::GroupLogState log;   // first_lsn, bytes
  uint64_t hard_cap_bytes = 0;  // [log] hard_cap, 0 = none
  storage::LatencyHistogram::Snapshot fsync;
  uint64_t appended_records = 0;  // storage::GroupLog::counters()
  uint64_t appended_bytes = 0;
  uint64_t commits = 0;
  uint64_t checkpoints = 0;
  uint64_t replayed_records = 0;
  std::vector<std::pair<std::string, std::shared_ptr<const VolumeIoMetrics>>> volumes;
};

// Agent, group and peer metrics from the status snapshot. Every series carries site=<this site>.
void AppendStatusMetrics(const v1::StatusReply& status, Exposition& out);
void AppendGroupMetrics(const std::string& site, const GroupMetricsSource& group, Exposition& out);
void AppendNbdMetrics(const std::string& site, const nbd::FrontendStats& stats, Exposition& out);

}  // namespace tvilling::ops
