// metrics.h: what tvillingd exports to Prometheus, and the pieces that count it.
//
// Exposition collects metric families for one scrape and renders them in the text format with
// prometheus-cpp's serializer (Debian's prometheus-cpp-core). Values that the agent already keeps
// (LSNs, lag, link state: the same snapshot `tvillingctl status` shows) are read at scrape time;
// only what nobody counted before is counted here: client I/O per volume (MeteredExport) and the
// log's fsyncs (storage::GroupLog::fsync_latency). docs/operations.md lists every metric.
//
// Conventions (https://prometheus.io/docs/practices/naming/): the prefix `tvilling_`, base units
// (seconds, bytes), `_total` on counters, and the labels `site` (this agent's site, on every series
// so that alerts can name it), `group`, `volume`, `peer`.
#pragma once

#include <absl/status/status.h>
#include <prometheus/metric_family.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "agent/nbd/export.h"
#include "storage/latency_histogram.h"

namespace tvilling::ops {

using MetricLabels = std::vector<std::pair<std::string, std::string>>;

class Exposition {
 public:
  void Gauge(std::string_view name, std::string_view help, const MetricLabels& labels,
             double value);
  void Counter(std::string_view name, std::string_view help, const MetricLabels& labels,
               double value);
  // Nanosecond samples, exported in seconds with the histogram's fixed `le` bounds.
  void Histogram(std::string_view name, std::string_view help, const MetricLabels& labels,
                 const storage::LatencyHistogram::Snapshot& snapshot);
  // The text exposition format, version 0.0.4. Families appear in the order first added.
  [[nodiscard]] std::string Render() const;

 private:
  prometheus::ClientMetric& Add(std::string_view name, std::string_view help,
                                prometheus::MetricType type, const MetricLabels& labels);
  std::vector<prometheus::MetricFamily> families_;
  std::map<std::string, size_t, std::less<>> index_;
};

// Client I/O of one volume, by operation: latency (from the request reaching the volume's export to
// its completion), bytes, and errors by status code.
class VolumeIoMetrics {
 public:
  enum Op : size_t { kRead, kWrite, kFlush, kTrim, kWriteZeroes, kOps };
  static std::string_view OpName(Op op);
  // absl::StatusCode values are 0..16.
  static constexpr size_t kCodes = 17;

  void Done(Op op, std::chrono::steady_clock::time_point started, uint64_t bytes,
            const absl::Status& status);
  void AppendTo(Exposition& out, const MetricLabels& volume_labels) const;

 private:
  struct PerOp {
    storage::LatencyHistogram latency;
    std::atomic<uint64_t> bytes{0};
    std::array<std::atomic<uint64_t>, kCodes> errors{};
  };
  std::array<PerOp, kOps> ops_;
};

// An nbd::Export that forwards to another and records every request's outcome in `metrics`.
class MeteredExport final : public nbd::Export {
 public:
  MeteredExport(std::shared_ptr<nbd::Export> inner, std::shared_ptr<VolumeIoMetrics> metrics)
      : inner_(std::move(inner)), metrics_(std::move(metrics)) {}
  const nbd::ExportInfo& info() const override { return inner_->info(); }
  void Read(uint64_t offset, uint32_t length, char* out, Done done) override;
  void Write(uint64_t offset, storage::Bytes data, bool fua, Done done) override;
  void Flush(Done done) override;
  void Trim(uint64_t offset, uint32_t length, bool fua, Done done) override;
  void WriteZeroes(uint64_t offset, uint32_t length, bool fua, bool no_hole, Done done) override;

 private:
  Done Wrap(VolumeIoMetrics::Op op, uint64_t bytes, Done done);
  std::shared_ptr<nbd::Export> inner_;
  std::shared_ptr<VolumeIoMetrics> metrics_;
};

}  // namespace tvilling::ops
