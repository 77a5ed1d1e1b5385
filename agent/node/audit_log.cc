// audit_log.cc: see audit_log.h.
#include "agent/node/audit_log.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <google/protobuf/util/json_util.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>

#include "agent/transport/tls.h"

namespace tvilling::node {
namespace {

std::string ToJson(const v1::AuditRecord& r) {
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(r, &out, o);
  return out;
}

bool FromJson(const std::string& text, v1::AuditRecord* r) {
  return google::protobuf::util::JsonStringToMessage(text, r).ok();
}

std::string AuditPrefix(const std::string& prefix, const std::string& group) {
  return fmt::format("{}/groups/{}/audit/", prefix, group);
}

}  // namespace

absl::StatusOr<std::unique_ptr<AuditLog>> AuditLog::Open(const ops::Config& config) {
  auto a = std::unique_ptr<AuditLog>(new AuditLog());
  a->site_ = config.agent.site;
  a->identity_ = config.agent.site;
  if (config.tls.enabled()) {
    auto cn = transport::CertificateCommonName(config.tls.cert);
    if (cn.ok()) a->identity_ = *cn;
  }
  if (config.coordinator) {
    const ops::CoordinatorConfig& c = *config.coordinator;
    coordinator::EtcdOptions o;
    o.endpoints = c.endpoints;
    if (!c.ca.empty()) o.tls = coordinator::EtcdTls{c.ca, c.cert, c.key, c.server_name};
    o.call_timeout = coordinator::Millis(c.timeout_ms);
    o.attempt_timeout = coordinator::Millis(std::min<uint32_t>(1000, c.timeout_ms));
    auto client = coordinator::EtcdClient::Create(o);
    if (!client.ok()) return client.status();
    a->etcd_ = std::move(*client);
    a->prefix_ = c.prefix;
  } else {
    a->file_ = config.agent.state_dir / "audit.jsonl";
  }
  return a;
}

AuditLog::~AuditLog() {
  {
    std::lock_guard l(queue_mu_);
    stopping_ = true;
  }
  queue_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void AuditLog::RecordLater(v1::AuditRecord r) {
  // Stamped now, kept later: the record's time is the event's, and its etcd key stays the same
  // through retries (a Put that timed out but landed is not doubled by the next).
  Prepared p = Stamp(std::move(r));
  std::lock_guard l(queue_mu_);
  if (stopping_) return;
  if (queue_.size() >= kMaxQueued) {
    spdlog::error("audit: {} records wait already; dropping: {}", queue_.size(), p.line);
    return;
  }
  queue_.push_back(std::move(p));
  if (!thread_.joinable()) thread_ = std::thread([this] { KeepQueued(); });
  queue_cv_.notify_one();
}

void AuditLog::KeepQueued() {
  std::unique_lock lk(queue_mu_);
  auto delay = kRetryFirst;
  uint32_t failures = 0;  // of the record at the head
  for (;;) {
    queue_cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, everything kept
    const Prepared next = queue_.front();
    lk.unlock();
    const absl::Status st = Keep(next);
    lk.lock();
    if (st.ok()) {
      if (failures > 0) {
        spdlog::info("audit: record {} kept after {} failed attempt(s)", next.key, failures);
      }
      queue_.pop_front();
      failures = 0;
      delay = kRetryFirst;
      continue;
    }
    if (stopping_) {
      // Shutting down with etcd (or the file) away: each record waiting goes to this log instead.
      spdlog::error("audit: {}; shutting down, so {} record(s) are not kept there:",
                    std::string(st.message()), queue_.size());
      for (const Prepared& p : queue_) spdlog::error("audit: not kept: {}", p.line);
      queue_.clear();
      return;
    }
    if (failures++ == 0) {
      spdlog::warn("audit: {}; trying again until it is kept (the record: {})",
                   std::string(st.message()), next.line);
    }
    queue_cv_.wait_for(lk, delay, [&] { return stopping_; });
    delay = std::min(delay * 2, kRetryMax);
  }
}

AuditLog::Prepared AuditLog::Stamp(v1::AuditRecord r) const {
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  const uint64_t ns =
      static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(now).count());
  r.set_unix_ms(ns / 1'000'000);
  r.set_site(site_);
  r.set_identity(identity_);
  Prepared p;
  p.line = ToJson(r);
  if (etcd_) p.key = fmt::format("{}{:020}-{}", AuditPrefix(prefix_, r.group()), ns, site_);
  return p;
}

absl::Status AuditLog::Record(v1::AuditRecord r) { return Keep(Stamp(std::move(r))); }

absl::Status AuditLog::Keep(const Prepared& p) {
  if (etcd_) {
    auto put = etcd_->Put(p.key, p.line);
    if (!put.ok()) {
      return absl::UnavailableError(fmt::format("audit record {} not kept in etcd: {}", p.key,
                                                std::string(put.status().message())));
    }
    return absl::OkStatus();
  }
  std::lock_guard l(mu_);
  const int fd = open(file_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) {
    return absl::UnavailableError(
        fmt::format("audit file {}: cannot open: {}", file_.string(), std::strerror(errno)));
  }
  const std::string text = p.line + "\n";
  const bool ok =
      write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && fsync(fd) == 0;
  const int err = errno;
  close(fd);
  if (!ok) {
    return absl::UnavailableError(
        fmt::format("audit file {}: cannot append: {}", file_.string(), std::strerror(err)));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::HistoryReply> AuditLog::List(const std::string& group, uint32_t limit) {
  v1::HistoryReply out;
  std::vector<v1::AuditRecord> records;
  if (etcd_) {
    const std::string from = group.empty() ? prefix_ + "/groups/" : AuditPrefix(prefix_, group);
    out.set_source(fmt::format("etcd {}", group.empty() ? from + "*/audit/" : from));
    auto r = etcd_->Range(from, coordinator::PrefixEnd(from));
    if (!r.ok()) return r.status();
    for (const coordinator::KeyValue& kv : r->kvs) {
      if (kv.key.find("/audit/") == std::string::npos) continue;
      v1::AuditRecord rec;
      if (!FromJson(kv.value, &rec)) {
        rec.set_action("unreadable");
        rec.set_detail(fmt::format("etcd key {}: not an audit record", kv.key));
      }
      records.push_back(std::move(rec));
    }
  } else {
    out.set_source(file_.string());
    std::lock_guard l(mu_);
    std::ifstream in(file_);
    std::string line;
    for (uint64_t n = 1; std::getline(in, line); ++n) {
      if (line.empty()) continue;
      v1::AuditRecord rec;
      if (!FromJson(line, &rec)) {
        rec.set_action("unreadable");
        rec.set_detail(fmt::format("{} line {}: not an audit record", file_.string(), n));
      } else if (!group.empty() && rec.group() != group) {
        continue;
      }
      records.push_back(std::move(rec));
    }
  }
  std::stable_sort(records.begin(), records.end(),
                   [](const auto& a, const auto& b) { return a.unix_ms() < b.unix_ms(); });
  const size_t skip = limit == 0 || records.size() <= limit ? 0 : records.size() - limit;
  for (size_t i = skip; i < records.size(); ++i) *out.add_records() = std::move(records[i]);
  return out;
}

}  // namespace tvilling::node
