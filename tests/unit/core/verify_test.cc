// verify_test.cc: core's part of an online verify: chunk planning, the consistency rule (when two
// samples of a chunk taken on two sites under writes may be compared), pacing and mismatch ranges.
#include "agent/core/verify.h"

#include <gtest/gtest.h>

#include "tests/unit/core/units.h"

namespace tvilling::core {
namespace {

TEST(VerifyPlan, CutsEveryVolumeIntoChunksWithAShortLastOne) {
  VerifyPlan plan({3 * kMiB + 4096, 0, 2 * kMiB}, std::nullopt, kMiB);
  EXPECT_EQ(plan.total_chunks(), 6u);
  EXPECT_EQ(plan.total_bytes(), 5 * kMiB + 4096);
  std::vector<VerifyChunk> all;
  while (!plan.done()) {
    auto next = plan.Next(4, 64 * kMiB);
    ASSERT_FALSE(next.empty());
    ASSERT_LE(next.size(), 4u);
    all.insert(all.end(), next.begin(), next.end());
  }
  const std::vector<VerifyChunk> want = {{0, 0, kMiB},        {0, kMiB, kMiB}, {0, 2 * kMiB, kMiB},
                                         {0, 3 * kMiB, 4096}, {2, 0, kMiB},    {2, kMiB, kMiB}};
  EXPECT_EQ(all, want);
}

TEST(VerifyPlan, OneVolumeOnlyAndByteLimitPerRequest) {
  VerifyPlan plan({4 * kMiB, 4 * kMiB}, 1u, kMiB);
  EXPECT_EQ(plan.total_chunks(), 4u);
  auto first = plan.Next(64, 2 * kMiB);
  ASSERT_EQ(first.size(), 2u);
  EXPECT_EQ(first[0], (VerifyChunk{1, 0, kMiB}));
  auto rest = plan.Next(64, 64 * kMiB);
  ASSERT_EQ(rest.size(), 2u);
  EXPECT_EQ(rest[1], (VerifyChunk{1, 3 * kMiB, kMiB}));
  EXPECT_TRUE(plan.done());
  EXPECT_TRUE(plan.Next(64, kMiB).empty());
}

TEST(VerifyPlan, ChecksOptions) {
  EXPECT_EQ(CheckVerifyOptions({kMiB}, std::nullopt, kMiB), "");
  EXPECT_NE(CheckVerifyOptions({kMiB}, 1u, kMiB), "");
  EXPECT_NE(CheckVerifyOptions({kMiB}, std::nullopt, 4096), "");
  EXPECT_NE(CheckVerifyOptions({kMiB}, std::nullopt, 0), "");
  EXPECT_NE(CheckVerifyOptions({kMiB}, std::nullopt, 32 * kMiB), "");
}

ChunkSample Sample(uint64_t w1, uint64_t applied, uint64_t w2, uint64_t hash,
                   uint64_t track_from = 0) {
  return SampleFromRead({w1, applied, w2, track_from}, hash, ~hash);
}

// The rule: a quiet chunk is the same on both sites at every LSN since its last write.
TEST(ConsistencyRule, QuietChunkComparesAcrossDifferentAppliedLsns) {
  const ChunkSample p = Sample(10, 500, 10, 1);
  const ChunkSample r = Sample(10, 300, 10, 1);  // the replica lags, the chunk last written at 10
  EXPECT_EQ(CompareChunk(p, r), ChunkVerdict::kMatch);
  EXPECT_EQ(CompareChunk(p, Sample(10, 300, 10, 2)), ChunkVerdict::kMismatch);
}

TEST(ConsistencyRule, ChunkWrittenBetweenTheTwoSamplesIsRetriedNotAMismatch) {
  // The primary hashed at applied 100 (last write 90); the replica hashed after applying 150,
  // which wrote the chunk: different content, but no LSN in common.
  const ChunkSample p = Sample(90, 100, 90, 1);
  const ChunkSample r = Sample(150, 160, 150, 2);
  EXPECT_EQ(CompareChunk(p, r), ChunkVerdict::kRetry);
  // Later the primary sees that 150 wrote it too: its fresh sample compares.
  EXPECT_EQ(CompareChunk(Sample(150, 170, 150, 2), r), ChunkVerdict::kMatch);
}

TEST(ConsistencyRule, ReadDuringAWriteIsUnstable) {
  // The note changed during the read.
  EXPECT_FALSE(Sample(10, 500, 11, 1).stable);
  // The last record noted is not applied yet (being written now).
  EXPECT_FALSE(Sample(501, 500, 501, 1).stable);
  EXPECT_EQ(CompareChunk(Sample(10, 500, 11, 1), Sample(10, 400, 10, 1)), ChunkVerdict::kRetry);
  EXPECT_EQ(CompareChunk(Sample(10, 500, 10, 1), Sample(501, 500, 501, 2)), ChunkVerdict::kRetry);
}

TEST(ConsistencyRule, WritesBeforeTheTrackingStartAreUnknown) {
  // The replica restarted with its volumes at 400: a write at 350 would not be noted, so its
  // sample holds from 400 only, and a primary sample ending at 300 cannot be compared.
  const ChunkSample r = Sample(0, 450, 0, 1, /*track_from=*/400);
  EXPECT_EQ(r.valid_from, 400u);
  EXPECT_EQ(CompareChunk(Sample(5, 300, 5, 9), r), ChunkVerdict::kRetry);
  EXPECT_EQ(CompareChunk(Sample(5, 420, 5, 9), r), ChunkVerdict::kMismatch);
}

TEST(ConsistencyRule, PrimaryExtendsItsSampleWhileTheChunkIsUntouched) {
  ChunkSample p = Sample(20, 100, 20, 7);
  // The replica restarted at 130 (nothing noted before): its sample holds from 130 on.
  const ChunkSample r = Sample(20, 140, 20, 7, /*track_from=*/130);
  EXPECT_EQ(CompareChunk(p, r), ChunkVerdict::kRetry);
  // When the answer comes, the primary's note is still 20 and it has applied 200: its bytes were
  // the chunk's content up to 200, which meets the replica's interval.
  EXPECT_EQ(CompareChunk(ExtendSample(p, 20, 200), r), ChunkVerdict::kMatch);
  EXPECT_EQ(CompareChunk(ExtendSample(p, 20, 200), Sample(20, 140, 20, 8, 130)),
            ChunkVerdict::kMismatch);
  // A changed note: no extension.
  EXPECT_EQ(ExtendSample(p, 120, 200).valid_to, 100u);
}

TEST(ConsistencyRule, WaitLsnIsTheLatestStartOfThePrimarysIntervals) {
  EXPECT_EQ(VerifyWaitLsn({Sample(5, 100, 5, 0), Sample(70, 100, 70, 0)}), 70u);
  EXPECT_EQ(VerifyWaitLsn({}), 0u);
}

TEST(VerifyPacer, HoldsTheRateAfterABurst) {
  VerifyPacer pacer(10 * kMiB);  // 10 MiB/s: 1 MiB every 100 ms
  const Nanos t0 = 1'000'000'000;
  EXPECT_EQ(pacer.Reserve(t0, kMiB), t0);
  // Idle before t0 earned 100 ms: the second MiB may go at once too.
  EXPECT_EQ(pacer.Reserve(t0, kMiB), t0);
  const Nanos third = pacer.Reserve(t0, kMiB);
  EXPECT_EQ(third, t0 + 100'000'000);
  const Nanos fourth = pacer.Reserve(third, kMiB);
  EXPECT_EQ(fourth, t0 + 200'000'000);
  // A batch larger than the burst waits for its own cost first: 16 MiB at 8 MiB/s.
  VerifyPacer batches(8 * kMiB);
  EXPECT_EQ(batches.Reserve(t0, 16 * kMiB), t0 + 1'800'000'000);  // 100 ms of idle credit
  EXPECT_EQ(batches.Reserve(t0 + 1'800'000'000, 16 * kMiB), t0 + 3'800'000'000);
  VerifyPacer unlimited(0);
  EXPECT_EQ(unlimited.Reserve(5, 1ull << 40), 5);
}

TEST(VerifyRate, RateAndEtaAfterTheFirstSecond) {
  EXPECT_EQ(VerifyRateAt(10, 100, 0, 500'000'000).bytes_per_s, 0u);
  const VerifyRate r = VerifyRateAt(40 * kMiB, 100 * kMiB, 0, 2'000'000'000);
  EXPECT_EQ(r.bytes_per_s, 20 * kMiB);
  EXPECT_DOUBLE_EQ(r.eta_s, 3.0);
}

TEST(Mismatches, AdjacentChunksJoinOtherVolumesStayApart) {
  std::vector<Extent> ranges;
  EXPECT_TRUE(AddMismatch(ranges, {0, 2 * kMiB, kMiB}));
  EXPECT_TRUE(AddMismatch(ranges, {0, 0, kMiB}));
  EXPECT_TRUE(AddMismatch(ranges, {1, kMiB, kMiB}));
  EXPECT_EQ(ranges.size(), 3u);
  EXPECT_TRUE(AddMismatch(ranges, {0, kMiB, kMiB}));  // fills the gap: 0..3 MiB joins
  ASSERT_EQ(ranges.size(), 2u);
  EXPECT_EQ(ranges[0], (Extent{0, 0, 3 * kMiB}));
  EXPECT_EQ(ranges[1], (Extent{1, kMiB, kMiB}));
}

TEST(Mismatches, ListIsBounded) {
  std::vector<Extent> ranges;
  for (uint64_t i = 0; i < kVerifyMaxListedRanges; ++i) {
    ASSERT_TRUE(AddMismatch(ranges, {0, 2 * i * kMiB, kMiB}));
  }
  EXPECT_FALSE(AddMismatch(ranges, {0, 2 * kVerifyMaxListedRanges * kMiB, kMiB}));
  // Joining an existing range still works.
  EXPECT_TRUE(AddMismatch(ranges, {0, kMiB, kMiB}));
}

}  // namespace
}  // namespace tvilling::core
