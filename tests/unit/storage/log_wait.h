// log_wait.h: blocking wrappers around GroupLog's asynchronous Append and Sync, for tests.
#pragma once

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <future>
#include <string>
#include <utility>
#include <vector>

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

// A write record of `data` at `offset`.
inline AppendRequest WriteReq(uint64_t offset, std::string data, bool sync = false) {
  AppendRequest r;
  r.type = RecordType::kWrite;
  r.offset = offset;
  r.length = static_cast<uint32_t>(data.size());
  r.payload = Bytes::Copy(data);
  r.sync = sync;
  return r;
}

// Every record of the log; the views' payloads point into *payloads.
inline std::vector<LogRecordView> ReadAll(const GroupLog* log, std::vector<std::string>* payloads) {
  std::vector<LogRecordView> out;
  const GroupLogState st = log->State();
  payloads->reserve(payloads->size() + (st.last_lsn - st.first_lsn + 1));
  absl::Status s = log->ReadRange(st.first_lsn, st.last_lsn, [&](const LogRecordView& r) {
    payloads->emplace_back(r.payload);
    out.push_back(r);
    out.back().payload = payloads->back();
    return absl::OkStatus();
  });
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

inline bool Contains(const absl::Status& s, const std::string& text) {
  return std::string(s.message()).find(text) != std::string::npos;
}

}  // namespace tvilling::storage
