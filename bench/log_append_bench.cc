// log_append_bench.cc: durable group-log appends against the floor: a raw RocksDB loop that writes
// one WriteBatch of N records and fsyncs it, on the same disk, in the same run.
//
// GroupLog is driven closed-loop with N FUA appends in flight (each completion issues the next), so
// its committer forms batches of about N on its own; the baseline writes batches of exactly N.
// After both ran, the binary prints the ratio per batch size (goal: >= 0.9). Run from the repo
// root:
//   build/bench/log_append_bench [--dir=/path/on/the/disk/to/measure]
// By default 5 repetitions of each, interleaved at random, compared by their medians.
#include <benchmark/benchmark.h>
#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "storage/group_log.h"

namespace {

using namespace tvilling::storage;

constexpr size_t kRecordBytes = 4096;
std::filesystem::path g_base = "bench-log-tmp";

std::filesystem::path FreshDir(const std::string& name) {
  auto d = g_base / name;
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

void BM_RawRocksDBWriteBatchSync(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  auto dir = FreshDir("raw");
  rocksdb::Options o;  // exactly the log store's options: the ratio isolates group commit
  ConfigureRocksOptions({.dir = dir}, &o);
  rocksdb::DB* db = nullptr;
  if (!rocksdb::DB::Open(o, dir.string(), &db).ok()) {
    state.SkipWithError("open failed");
    return;
  }
  std::string payload(kRecordBytes + kRecordHeaderSize, 'x');
  rocksdb::WriteOptions wo;
  wo.sync = true;
  uint64_t lsn = 0;
  for (auto _ : state) {
    rocksdb::WriteBatch wb;
    for (int i = 0; i < batch; ++i) wb.Put(EncodeLogKey(1, ++lsn), payload);
    if (!db->Write(wo, &wb).ok()) state.SkipWithError("write failed");
  }
  state.SetItemsProcessed(static_cast<int64_t>(lsn));
  state.SetBytesProcessed(static_cast<int64_t>(lsn * kRecordBytes));
  delete db;
  std::filesystem::remove_all(dir);
}

void BM_GroupLogDurableAppend(benchmark::State& state) {
  const int inflight = static_cast<int>(state.range(0));
  auto dir = FreshDir("grouplog");
  auto store = LogStore::Open({.dir = dir});
  if (!store.ok()) {
    state.SkipWithError("open failed");
    return;
  }
  auto log = (*store)->OpenGroup("bench", {.max_batch_records = static_cast<uint32_t>(inflight)});
  GroupLog* g = *log;
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<uint64_t> completed{0};
  std::atomic<bool> stop{false};
  std::atomic<int> outstanding{0};
  std::atomic<uint64_t> wake_at{UINT64_MAX};
  const std::string payload(kRecordBytes, 'x');
  std::function<void()> issue = [&] {
    AppendRequest r;
    r.offset = 0;
    r.length = kRecordBytes;
    r.payload = Bytes::Copy(payload);
    r.sync = true;
    outstanding.fetch_add(1);
    g->Append(std::move(r), [&](absl::StatusOr<uint64_t> lsn) {
      if (!lsn.ok()) std::abort();
      const uint64_t c = completed.fetch_add(1) + 1;
      if (!stop.load()) issue();
      if (outstanding.fetch_sub(1) == 1 || c >= wake_at.load(std::memory_order_acquire)) {
        std::lock_guard l(mu);
        cv.notify_all();
      }
    });
  };
  for (int i = 0; i < inflight; ++i) issue();
  // One benchmark iteration = `inflight` completed durable appends (the baseline's batch).
  uint64_t target = 0;
  for (auto _ : state) {
    // At least 64 completions per iteration, so waking this thread (a futex and a context switch)
    // is not charged to every append at small batch sizes; the baseline has no such thread.
    target += static_cast<uint64_t>(std::max(inflight, 64));
    wake_at.store(target, std::memory_order_release);
    std::unique_lock l(mu);
    cv.wait(l, [&] { return completed.load(std::memory_order_acquire) >= target; });
  }
  stop = true;
  {
    std::unique_lock l(mu);
    cv.wait(l, [&] { return outstanding.load() == 0; });
  }
  state.SetItemsProcessed(static_cast<int64_t>(target));
  state.SetBytesProcessed(static_cast<int64_t>(target * kRecordBytes));
  store->reset();
  std::filesystem::remove_all(dir);
}

BENCHMARK(BM_RawRocksDBWriteBatchSync)->Arg(1)->Arg(8)->Arg(32)->Arg(128)->UseRealTime();
BENCHMARK(BM_GroupLogDurableAppend)->Arg(1)->Arg(8)->Arg(32)->Arg(128)->UseRealTime();

// Collects items/s per run so main can print ratios once everything ran.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& r : runs) {
      auto it = r.counters.find("items_per_second");
      if (it == r.counters.end()) continue;
      // With --benchmark_repetitions the median aggregate ("..._median") is what main compares.
      rates_[r.benchmark_name()] = it->second.value;
    }
  }
  std::map<std::string, double> rates_;
};

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--dir=", 0) == 0) g_base = a.substr(6);
  }
  // Defaults that make the ratio fair on a noisy disk: repetitions interleaved at random between
  // the two benchmarks (run back to back, drift in fsync latency lands on one side), compared by
  // their medians. Flags on the command line override them.
  std::vector<char*> args(argv, argv + argc);
  std::string reps = "--benchmark_repetitions=5";
  std::string interleave = "--benchmark_enable_random_interleaving=true";
  std::string min_time = "--benchmark_min_time=0.5";
  auto given = [&](const char* flag) {
    for (int i = 1; i < argc; ++i) {
      if (std::string(argv[i]).rfind(flag, 0) == 0) return true;
    }
    return false;
  };
  if (!given("--benchmark_repetitions")) args.push_back(reps.data());
  if (!given("--benchmark_enable_random_interleaving")) args.push_back(interleave.data());
  if (!given("--benchmark_min_time")) args.push_back(min_time.data());
  int bench_argc = static_cast<int>(args.size());
  benchmark::Initialize(&bench_argc, args.data());
  RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  std::printf("\nratio group-log durable appends / raw RocksDB WriteBatch+sync (goal >= 0.90):\n");
  for (int n : {1, 8, 32, 128}) {
    const std::string suffix = "/" + std::to_string(n) + "/real_time";
    auto find = [&](const std::string& name) {
      auto med = reporter.rates_.find(name + suffix + "_median");
      return med != reporter.rates_.end() ? med : reporter.rates_.find(name + suffix);
    };
    auto a = find("BM_GroupLogDurableAppend");
    auto b = find("BM_RawRocksDBWriteBatchSync");
    if (a == reporter.rates_.end() || b == reporter.rates_.end() || b->second == 0) continue;
    std::printf("  batch %4d: %10.0f vs %10.0f records/s  ratio %.2f\n", n, a->second, b->second,
                a->second / b->second);
  }
  std::filesystem::remove_all(g_base);
  benchmark::Shutdown();
  return 0;
}
