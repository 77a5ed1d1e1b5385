// log_wait.h: blocking wrappers around GroupLog's asynchronous Append and Sync, for tests.
#pragma once

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <cstdint>
#include <future>
#include <utility>

#include "storage/group_log.h"

namespace tvilling::storage {

// Appends and waits for the LSN (or the error that kept the record out).
inline absl::StatusOr<uint64_t> AppendWait(GroupLog* log, AppendRequest req) {
  std::promise<absl::StatusOr<uint64_t>> p;
  auto f = p.get_future();
  log->Append(std::move(req), [&p](absl::StatusOr<uint64_t> lsn) { p.set_value(lsn); });
  return f.get();
}

// Waits until every record appended before the call is fsynced.
inline absl::Status SyncWait(GroupLog* log) {
  std::promise<absl::Status> p;
  auto f = p.get_future();
  log->Sync([&p](absl::Status s) { p.set_value(s); });
  return f.get();
}

}  // namespace tvilling::storage
