// metrics.cc: the exposition builder and the per-volume client I/O counters.
#include "agent/ops/metrics.h"

#include <prometheus/text_serializer.h>

#include <sstream>

namespace tvilling::ops {

prometheus::ClientMetric& Exposition::Add(std::string_view name, std::string_view help,
                                          prometheus::MetricType type, const MetricLabels& labels) {
  auto it = index_.find(name);
  if (it == index_.end()) {
    prometheus::MetricFamily family;
    family.name = std::string(name);
    family.help = std::string(help);
    family.type = type;
    it = index_.emplace(std::string(name), families_.size()).first;
    families_.push_back(std::move(family));
  }
  prometheus::MetricFamily& family = families_[it->second];
  prometheus::ClientMetric& metric = family.metric.emplace_back();
  metric.label.reserve(labels.size());
  for (const auto& [k, v] : labels) metric.label.push_back({k, v});
  return metric;
}

void Exposition::Gauge(std::string_view name, std::string_view help, const MetricLabels& labels,
                       double value) {
  Add(name, help, prometheus::MetricType::Gauge, labels).gauge.value = value;
}

void Exposition::Counter(std::string_view name, std::string_view help, const MetricLabels& labels,
                         double value) {
  Add(name, help, prometheus::MetricType::Counter, labels).counter.value = value;
}

void Exposition::Histogram(std::string_view name, std::string_view help, const MetricLabels& labels,
                           const storage::LatencyHistogram::Snapshot& snapshot) {
  prometheus::ClientMetric::Histogram& h =
      Add(name, help, prometheus::MetricType::Histogram, labels).histogram;
  uint64_t cumulative = 0;
  for (size_t i = 0; i < storage::LatencyHistogram::kBoundsNs.size(); ++i) {
    cumulative += snapshot.counts[i];
    h.bucket.push_back(
        {cumulative, static_cast<double>(storage::LatencyHistogram::kBoundsNs[i]) / 1e9});
  }
  h.bucket.push_back({snapshot.count, std::numeric_limits<double>::infinity()});
  h.sample_count = snapshot.count;
  h.sample_sum = static_cast<double>(snapshot.sum_ns) / 1e9;
}

std::string Exposition::Render() const {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, families_);
  return out.str();
}

std::string_view VolumeIoMetrics::OpName(Op op) {
  switch (op) {
    case kRead:
      return "read";
    case kWrite:
      return "write";
    case kFlush:
      return "flush";
    case kTrim:
      return "trim";
    case kWriteZeroes:
      return "write_zeroes";
    default:
      return "unknown";
  }
}

void VolumeIoMetrics::Done(Op op, std::chrono::steady_clock::time_point started, uint64_t bytes,
                           const absl::Status& status) {
  PerOp& o = ops_[op];
  o.latency.RecordSince(started);
  if (status.ok()) {
    if (bytes != 0) o.bytes.fetch_add(bytes, std::memory_order_relaxed);
  } else {
    const size_t code = static_cast<size_t>(status.code());
    o.errors[code < kCodes ? code : static_cast<size_t>(absl::StatusCode::kUnknown)].fetch_add(
        1, std::memory_order_relaxed);
  }
}

void VolumeIoMetrics::AppendTo(Exposition& out, const MetricLabels& volume_labels) const {
  for (size_t i = 0; i < kOps; ++i) {
    const PerOp& o = ops_[i];
    MetricLabels labels = volume_labels;
    labels.emplace_back("op", std::string(OpName(static_cast<Op>(i))));
    out.Histogram("tvilling_client_io_duration_seconds",
                  "Time from an NBD request reaching the volume to its completion, by operation.",
                  labels, o.latency.Read());
    if (i == kRead || i == kWrite) {
      out.Counter("tvilling_client_io_bytes_total",
                  "Bytes read or written by NBD clients (successful requests).", labels,
                  static_cast<double>(o.bytes.load(std::memory_order_relaxed)));
    }
    for (size_t code = 1; code < kCodes; ++code) {
      const uint64_t n = o.errors[code].load(std::memory_order_relaxed);
      if (n == 0) continue;  // error series appear once they happen
      MetricLabels with_code = labels;
      with_code.emplace_back("code", absl::StatusCodeToString(static_cast<absl::StatusCode>(code)));
      out.Counter("tvilling_client_io_errors_total",
                  "NBD requests that failed, by operation and status code (e.g. UNAVAILABLE: "
                  "the group could not reach a sync peer; FAILED_PRECONDITION: a read-only "
                  "volume).",
                  with_code, static_cast<double>(n));
    }
  }
}

nbd::Export::Done MeteredExport::Wrap(VolumeIoMetrics::Op op, uint64_t bytes, Done done) {
  return [m = metrics_.get(), op, bytes, started = std::chrono::steady_clock::now(),
          done = std::move(done)](absl::Status st) mutable {
    m->Done(op, started, bytes, st);
    std::move(done)(std::move(st));
  };
}

void MeteredExport::Read(uint64_t offset, uint32_t length, char* out, Done done) {
  inner_->Read(offset, length, out, Wrap(VolumeIoMetrics::kRead, length, std::move(done)));
}

void MeteredExport::Write(uint64_t offset, storage::Bytes data, bool fua, Done done) {
  const uint64_t n = data.size();
  inner_->Write(offset, std::move(data), fua, Wrap(VolumeIoMetrics::kWrite, n, std::move(done)));
}

void MeteredExport::Flush(Done done) {
  inner_->Flush(Wrap(VolumeIoMetrics::kFlush, 0, std::move(done)));
}

void MeteredExport::Trim(uint64_t offset, uint32_t length, bool fua, Done done) {
  inner_->Trim(offset, length, fua, Wrap(VolumeIoMetrics::kTrim, 0, std::move(done)));
}

void MeteredExport::WriteZeroes(uint64_t offset, uint32_t length, bool fua, bool no_hole,
                                Done done) {
  inner_->WriteZeroes(offset, length, fua, no_hole,
                      Wrap(VolumeIoMetrics::kWriteZeroes, 0, std::move(done)));
}

}  // namespace tvilling::ops
