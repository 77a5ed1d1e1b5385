// latency_histogram.h: a fixed-bucket latency histogram that the hot path can record into without a
// lock (one relaxed atomic add per bucket and one for the sum), read by the metrics endpoint.
//
// The bucket bounds are fixed, in the style of Prometheus' default buckets, from 50 us to 10 s, so
// every histogram of the agent (fsync, client I/O) can be compared and aggregated across agents.
// A snapshot is not atomic as a whole: a reader may see a count without its sum, which Prometheus
// tolerates (the next scrape catches up).
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>

namespace tvilling::storage {

class LatencyHistogram {
 public:
  // Upper bounds (inclusive, as Prometheus' `le`) in nanoseconds; a last implicit bucket is +Inf.
  static constexpr std::array<uint64_t, 17> kBoundsNs = {
      50'000,      100'000,       250'000,       500'000,       1'000'000,     2'500'000,
      5'000'000,   10'000'000,    25'000'000,    50'000'000,    100'000'000,   250'000'000,
      500'000'000, 1'000'000'000, 2'500'000'000, 5'000'000'000, 10'000'000'000};
  static constexpr size_t kBuckets = kBoundsNs.size() + 1;

  struct Snapshot {
    std::array<uint64_t, kBuckets> counts{};  // per bucket, not cumulative; last is +Inf
    uint64_t count = 0;
    uint64_t sum_ns = 0;
  };

  void Record(uint64_t ns) {
    size_t i = 0;
    while (i < kBoundsNs.size() && ns > kBoundsNs[i]) ++i;
    counts_[i].fetch_add(1, std::memory_order_relaxed);
    sum_ns_.fetch_add(ns, std::memory_order_relaxed);
  }
  void RecordSince(std::chrono::steady_clock::time_point start) {
    const auto d = std::chrono::steady_clock::now() - start;
    Record(static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count()));
  }

  [[nodiscard]] Snapshot Read() const {
    Snapshot s;
    for (size_t i = 0; i < kBuckets; ++i) {
      s.counts[i] = counts_[i].load(std::memory_order_relaxed);
      s.count += s.counts[i];
    }
    s.sum_ns = sum_ns_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  std::array<std::atomic<uint64_t>, kBuckets> counts_{};
  std::atomic<uint64_t> sum_ns_{0};
};

}  // namespace tvilling::storage
