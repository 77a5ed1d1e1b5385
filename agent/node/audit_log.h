// audit_log.h: the record of every operator command and role change of this site's groups
// (docs/coordinator.md, "Operator commands"): who (the local user tvillingctl reports, and this
// site's certificate identity), what, when, and the outcome, refusals included.
//
// With a [coordinator] the records are kept in etcd, one key per record under the group's prefix,
// `<prefix>/groups/<g>/audit/<unix_ns>-<site>` (no lease: they outlive the site), so every site's
// `tvillingctl history` shows every site's records. Without one they are appended to the local file
// <state_dir>/audit.jsonl (one JSON object per line, fsynced).
#pragma once

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "agent/coordinator/etcd_client.h"
#include "agent/ops/config.h"
#include "tvilling/v1/control.pb.h"

namespace tvilling::node {

class AuditLog {
 public:
  static absl::StatusOr<std::unique_ptr<AuditLog>> Open(const ops::Config& config);
  ~AuditLog();

  // Fills the time, this site and its identity, and keeps `r`. An error names where.
  absl::Status Record(v1::AuditRecord r);
  // Record on the log's own thread (for callers that must not wait for etcd, e.g. a role switch),
  // stamped now. A record etcd (or the file) does not take is tried again, 0.5 s later and then
  // up to every 30 s, until it is kept; the records after it wait. Its first failure is logged
  // with the record. At most kMaxQueued wait; more are dropped, each written to the agent's log
  // instead, as is every record still waiting when the agent stops.
  void RecordLater(v1::AuditRecord r);
  static constexpr size_t kMaxQueued = 1000;
  // The records of `group` ("" = every group), oldest first; the newest `limit` (0 = all).
  absl::StatusOr<v1::HistoryReply> List(const std::string& group, uint32_t limit);

  const std::string& identity() const { return identity_; }

 private:
  AuditLog() = default;
  // A record stamped with its time, site and identity: its etcd key (empty for the file) and JSON.
  struct Prepared {
    std::string key;
    std::string line;
  };
  Prepared Stamp(v1::AuditRecord r) const;
  absl::Status Keep(const Prepared& p);
  void KeepQueued();  // the thread RecordLater starts
  static constexpr std::chrono::milliseconds kRetryFirst{500};
  static constexpr std::chrono::milliseconds kRetryMax{30000};
  std::string site_;
  std::string identity_;
  std::string prefix_;
  std::unique_ptr<coordinator::EtcdClient> etcd_;  // or the file:
  std::filesystem::path file_;
  std::mutex mu_;  // the file

  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::deque<Prepared> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace tvilling::node
