// log_crash_test.cc: the group log alone, in a child process killed with SIGKILL mid-append, many
// times over the same directory. After every kill: every LSN the child reported durable is present,
// the log has no gap, every record's checksum holds and its payload is the one written for it.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <random>
#include <string>

#include "storage/group_log.h"
#include "tests/unit/storage/temp_dir.h"

extern char** environ;

namespace tvilling::storage {
namespace {

struct Child {
  pid_t pid = -1;
  int out = -1;
};

Child Spawn(const std::string& dir, unsigned seed, uint64_t external_min) {
  int fds[2];
  EXPECT_EQ(pipe2(fds, O_CLOEXEC), 0);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, fds[1], STDOUT_FILENO);
  std::string seed_s = std::to_string(seed);
  std::string min_s = std::to_string(external_min);
  char* argv[] = {const_cast<char*>(TVILLING_LOG_CRASH_WRITER), const_cast<char*>(dir.c_str()),
                  seed_s.data(), min_s.data(), nullptr};
  Child c;
  EXPECT_EQ(posix_spawn(&c.pid, argv[0], &fa, nullptr, argv, environ), 0);
  posix_spawn_file_actions_destroy(&fa);
  close(fds[1]);
  c.out = fds[0];
  return c;
}

// Reads "durable N" lines for `ms` milliseconds; returns the largest N.
uint64_t ReadDurable(int fd, int ms, std::string* rest) {
  uint64_t best = 0;
  auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  char buf[4096];
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    end - std::chrono::steady_clock::now())
                    .count();
    if (left <= 0) break;
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left)) <= 0) continue;
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) break;
    rest->append(buf, static_cast<size_t>(n));
    size_t nl;
    while ((nl = rest->find('\n')) != std::string::npos) {
      std::string line = rest->substr(0, nl);
      rest->erase(0, nl + 1);
      if (line.rfind("durable ", 0) == 0)
        best = std::max<uint64_t>(best, std::stoull(line.substr(8)));
    }
  }
  return best;
}

// external_min: the writer's GroupLogOptions::external_payload_min_bytes.
void KillAndCheck(uint64_t external_min) {
  TempDir dir;
  const std::string log_dir = (dir.path() / "log").string();
  std::mt19937 rng(std::random_device{}());
  const unsigned base_seed = rng();
  SCOPED_TRACE("base seed " + std::to_string(base_seed));
  uint64_t durable_total = 0, prev_last = 0;
  constexpr int kRounds = 12;
  for (int round = 0; round < kRounds; ++round) {
    Child c = Spawn(log_dir, base_seed + round, external_min);
    std::string rest;
    // The kill comes at a random moment after the writer is up and appending (a sanitizer build
    // may take long to start), so every round interrupts real work.
    uint64_t durable = 0;
    for (int waited_ms = 0; durable == 0 && waited_ms < 20000; waited_ms += 50) {
      durable = ReadDurable(c.out, 50, &rest);
    }
    ASSERT_GT(durable, 0u) << "round " << round << ": the writer never reported anything durable";
    const int run_ms = static_cast<int>(rng() % 400);
    durable = std::max(durable, ReadDurable(c.out, run_ms, &rest));
    ASSERT_EQ(kill(c.pid, SIGKILL), 0);
    int status = 0;
    ASSERT_EQ(waitpid(c.pid, &status, 0), c.pid);
    // Lines that were written before the kill still count.
    std::string tail;
    const uint64_t late = ReadDurable(c.out, 50, &rest);
    close(c.out);
    ASSERT_TRUE(WIFSIGNALED(status)) << "writer exited by itself with status " << status;
    const uint64_t reported = std::max(durable, late);
    durable_total = std::max(durable_total, reported);

    auto store = LogStore::Open({.dir = log_dir});
    ASSERT_TRUE(store.ok()) << store.status();
    auto log = (*store)->OpenGroup("g0", {});
    ASSERT_TRUE(log.ok()) << log.status();
    const GroupLogState st = (*log)->State();
    EXPECT_GE(st.last_lsn, durable_total) << "round " << round << ": lost durable records";
    EXPECT_GE(st.last_lsn, prev_last) << "round " << round << ": the log shrank";
    EXPECT_EQ(st.first_lsn, 1u);
    uint64_t count = 0;
    absl::Status vs = (*log)->ReadRange(st.first_lsn, st.last_lsn, [&](const LogRecordView& r) {
      ++count;
      for (size_t i = 0; i + 8 <= r.payload.size(); i += 8) {
        uint64_t v;
        std::memcpy(&v, r.payload.data() + i, 8);
        if (v != r.header.offset) {
          return absl::DataLossError("payload of LSN " + std::to_string(r.lsn) +
                                     " is not the one written");
        }
      }
      return absl::OkStatus();
    });
    ASSERT_TRUE(vs.ok()) << "round " << round << ": " << vs;
    EXPECT_EQ(count, st.last_lsn) << "gap";
    EXPECT_TRUE((*log)->Verify().ok());
    prev_last = st.last_lsn;
  }
  ::testing::Test::RecordProperty("records", std::to_string(prev_last));
}

TEST(LogCrashTest, SigkillMidAppendLosesNothingReportedDurableAndLeavesNoGap) { KillAndCheck(0); }

// About half of the payloads (4 KiB to 16 KiB) in payload files: a process crash never leaves a
// record whose payload is not there (the payload is written before its record), so nothing is cut.
TEST(LogCrashTest, SigkillWithExternalPayloadsLosesNothingAndLeavesNoGap) { KillAndCheck(4096); }

}  // namespace
}  // namespace tvilling::storage
