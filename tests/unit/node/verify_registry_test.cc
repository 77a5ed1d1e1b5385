// verify_registry_test.cc: the last finished verify of each peer survives an agent restart (the
// registry's file), a verify still running is not saved and does not hide the last finished one,
// and a damaged file is reported and replaced instead of failing the agent.
#include <gtest/gtest.h>

#include <fstream>

#include "agent/node/verify_command.h"
#include "tests/unit/storage/temp_dir.h"

namespace tvilling::node {
namespace {

v1::VerifyStatus Status(const std::string& state, uint64_t mismatches) {
  v1::VerifyStatus s;
  s.set_state(state);
  s.set_mismatch_chunks(mismatches);
  s.set_finished_unix_ms(state == "running" ? 0 : 1764600000000);
  if (mismatches > 0) {
    v1::VerifyRange* r = s.add_mismatches();
    r->set_volume("vol0");
    r->set_offset(1 << 20);
    r->set_length(4096);
  }
  return s;
}

// The verify status the registry shows for (g0, peer), or "" if none.
std::string Shown(const VerifyRegistry& r, const std::string& peer) {
  v1::GroupStatus g;
  g.set_name("g0");
  g.add_peers()->set_peer(peer);
  r.Fill(&g);
  return g.peers(0).has_verify() ? g.peers(0).verify().state() : "";
}

TEST(VerifyRegistry, TheLastFinishedResultSurvivesARestart) {
  TempDir dir;
  const auto file = dir.path() / "verify-results.pb";
  {
    VerifyRegistry r(file);
    EXPECT_EQ(Shown(r, "site-b"), "");
    r.Update("g0", "site-b", Status("mismatches", 1));
    r.Update("g0", "site-c", Status("identical", 0));
    // A new verify of site-b starts and the agent stops before it ends.
    r.Update("g0", "site-b", Status("running", 0));
    EXPECT_EQ(Shown(r, "site-b"), "running");
  }
  VerifyRegistry again(file);
  EXPECT_EQ(Shown(again, "site-b"), "mismatches") << "the finished result was lost";
  EXPECT_EQ(Shown(again, "site-c"), "identical");
  v1::GroupStatus g;
  g.set_name("g0");
  g.add_peers()->set_peer("site-b");
  again.Fill(&g);
  ASSERT_EQ(g.peers(0).verify().mismatches_size(), 1);
  EXPECT_EQ(g.peers(0).verify().mismatches(0).offset(), 1u << 20);

  VerifyRegistry memory_only;
  memory_only.Update("g0", "site-b", Status("identical", 0));
  EXPECT_EQ(Shown(memory_only, "site-b"), "identical");
}

TEST(VerifyRegistry, ADamagedFileIsIgnoredAndRewritten) {
  TempDir dir;
  const auto file = dir.path() / "verify-results.pb";
  {
    VerifyRegistry r(file);
    r.Update("g0", "site-b", Status("identical", 0));
  }
  {
    std::ofstream out(file, std::ios::binary | std::ios::app);
    out << std::string("\xff\xff\xff\xff\x0f garbage", 13);
  }
  VerifyRegistry damaged(file);  // must not throw or abort
  EXPECT_EQ(Shown(damaged, "site-b"), "identical") << "the results before the damage are kept";
  damaged.Update("g0", "site-c", Status("mismatches", 2));
  VerifyRegistry again(file);
  EXPECT_EQ(Shown(again, "site-b"), "identical");
  EXPECT_EQ(Shown(again, "site-c"), "mismatches");
}

}  // namespace
}  // namespace tvilling::node
