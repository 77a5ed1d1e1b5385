// config_test.cc: tvillingd's config: every validation rule and its message (file name and key
// path), sizes, listen addresses, unknown keys, parse errors with line:col, defaults, state-dir
// resolution, the replication tables ([tls], [replication], [[group.peer]], [[acl]], [control]),
// AuthorizePeer, and every example config shipped in deploy/examples.
#include "agent/ops/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <fstream>
#include <map>
#include <string>

namespace tvilling::ops {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

// Line numbers matter: tests below point at them.
constexpr std::string_view kMinimal = R"([agent]
site = "sto-1"
state_dir = "/srv/t"

[nbd]
listen = ["127.0.0.1:10809"]

[[group]]
name = "g0"

[[group.volume]]
name = "vol0"
path = "vol0.img"
size = "1GiB"
)";

std::string Replace(std::string_view text, std::string_view from, std::string_view to) {
  std::string out(text);
  const size_t at = out.find(from);
  EXPECT_NE(at, std::string::npos) << "test bug: \"" << from << "\" not in the text";
  if (at != std::string::npos) out.replace(at, from.size(), to);
  return out;
}

std::string Append(std::string_view text, std::string_view more) {
  return std::string(text) + std::string(more);
}

absl::StatusOr<Config> Parse(std::string_view text) { return ParseConfig(text, "test.toml"); }

// The error message of a config that must not load.
std::string ErrorOf(std::string_view text) {
  absl::StatusOr<Config> config = Parse(text);
  EXPECT_FALSE(config.ok()) << "expected an error for:\n" << text;
  if (config.ok()) return "";
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(config.status().message());
}

std::string MakeTempDir() {
  std::string pattern = ::testing::TempDir() + "/ops_config_XXXXXX";
  const char* dir = ::mkdtemp(pattern.data());
  EXPECT_NE(dir, nullptr);
  return std::filesystem::path(pattern).lexically_normal().string();
}

// ---- loading and defaults ----

TEST(ConfigTest, MinimalConfigGetsDefaults) {
  absl::StatusOr<Config> config = Parse(kMinimal);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->source, "test.toml");
  EXPECT_EQ(config->agent.site, "sto-1");
  EXPECT_EQ(config->agent.state_dir, "/srv/t");
  EXPECT_EQ(config->log.dir, "/srv/t/log");
  EXPECT_EQ(config->log.write_buffer_bytes, 256ull << 20);
  EXPECT_EQ(config->log.max_batch_bytes, 8ull << 20);
  EXPECT_EQ(config->log.max_batch_records, 4096u);
  EXPECT_EQ(config->log.retention_bytes, 0u);
  EXPECT_EQ(config->log.retention_seconds, 0u);
  EXPECT_EQ(config->log.hard_cap_bytes, 0u);
  EXPECT_EQ(config->log.checkpoint_interval_ms, 1000u);
  EXPECT_EQ(config->log.checkpoint_bytes, 16ull << 20);
  EXPECT_EQ(config->log.checkpoint_chunk_bytes, 4ull << 20);
  EXPECT_EQ(config->log.writeback_bytes, 1ull << 20);
  ASSERT_EQ(config->nbd.listen.size(), 1u);
  EXPECT_EQ(config->nbd.listen[0], (ListenAddress{"127.0.0.1", 10809}));
  EXPECT_TRUE(config->nbd.unix_sockets.empty());
  EXPECT_EQ(config->nbd.threads, 1u);
  EXPECT_EQ(config->nbd.max_inflight_requests, 256u);
  EXPECT_EQ(config->nbd.max_inflight_bytes, 128ull << 20);
  ASSERT_EQ(config->groups.size(), 1u);
  EXPECT_EQ(config->groups[0].name, "g0");
  ASSERT_EQ(config->groups[0].volumes.size(), 1u);
  const VolumeConfig& volume = config->groups[0].volumes[0];
  EXPECT_EQ(volume.name, "vol0");
  EXPECT_EQ(volume.export_name, "vol0");
  EXPECT_EQ(volume.path, "/srv/t/vol0.img");
  EXPECT_EQ(volume.size_bytes, 1ull << 30);
  EXPECT_FALSE(volume.read_only);
  EXPECT_FALSE(volume.direct_io);
}

TEST(ConfigTest, EveryKeyIsRead) {
  const std::string text = R"([agent]
site = "sun-2"
state_dir = "/data/tv/"
[log]
dir = "/fast/log"
write_buffer = "64MiB"
max_batch_bytes = 1048576
max_batch_records = 100
external_payload_min = "4KiB"
retention_bytes = "1GiB"
retention_seconds = 3600
hard_cap = "2GiB"
checkpoint_interval_ms = 250
checkpoint_bytes = "8MiB"
checkpoint_chunk = "1MiB"
writeback = "2MiB"
[nbd]
listen = ["[::1]:10810", "0.0.0.0:10809"]
unix_sockets = ["run/nbd.sock", "/run/tv.sock"]
threads = 4
max_inflight_requests = 16
max_inflight_bytes = "64MiB"
[[group]]
name = "db"
[[group.volume]]
name = "data"
export = "db/data"
path = "/dev/null-but-sized"
size = 4096
read_only = true
direct_io = true
[[group.volume]]
name = "wal"
path = "v/wal.img"
size = "512 MiB"
)";
  absl::StatusOr<Config> config = Parse(text);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->agent.state_dir, "/data/tv");  // trailing separator dropped
  EXPECT_EQ(config->log.dir, "/fast/log");         // absolute stays
  EXPECT_EQ(config->log.write_buffer_bytes, 64ull << 20);
  EXPECT_EQ(config->log.max_batch_bytes, 1048576u);
  EXPECT_EQ(config->log.max_batch_records, 100u);
  EXPECT_EQ(config->log.external_payload_min_bytes, 4096u);
  EXPECT_EQ(config->log.retention_bytes, 1ull << 30);
  EXPECT_EQ(config->log.retention_seconds, 3600u);
  EXPECT_EQ(config->log.hard_cap_bytes, 2ull << 30);
  EXPECT_EQ(config->log.checkpoint_interval_ms, 250u);
  EXPECT_EQ(config->log.checkpoint_bytes, 8ull << 20);
  EXPECT_EQ(config->log.checkpoint_chunk_bytes, 1ull << 20);
  EXPECT_EQ(config->log.writeback_bytes, 2ull << 20);
  ASSERT_EQ(config->nbd.listen.size(), 2u);
  EXPECT_EQ(config->nbd.listen[0], (ListenAddress{"::1", 10810}));
  EXPECT_EQ(config->nbd.listen[0].ToString(), "[::1]:10810");
  EXPECT_EQ(config->nbd.listen[1].ToString(), "0.0.0.0:10809");
  ASSERT_EQ(config->nbd.unix_sockets.size(), 2u);
  EXPECT_EQ(config->nbd.unix_sockets[0], "/data/tv/run/nbd.sock");
  EXPECT_EQ(config->nbd.unix_sockets[1], "/run/tv.sock");
  EXPECT_EQ(config->nbd.threads, 4u);
  EXPECT_EQ(config->nbd.max_inflight_requests, 16u);
  EXPECT_EQ(config->nbd.max_inflight_bytes, 64ull << 20);
  ASSERT_EQ(config->groups.size(), 1u);
  ASSERT_EQ(config->groups[0].volumes.size(), 2u);
  const VolumeConfig& data = config->groups[0].volumes[0];
  EXPECT_EQ(data.export_name, "db/data");
  EXPECT_EQ(data.path, "/dev/null-but-sized");
  EXPECT_EQ(data.size_bytes, 4096u);
  EXPECT_TRUE(data.read_only);
  EXPECT_TRUE(data.direct_io);
  const VolumeConfig& wal = config->groups[0].volumes[1];
  EXPECT_EQ(wal.export_name, "wal");
  EXPECT_EQ(wal.path, "/data/tv/v/wal.img");
  EXPECT_EQ(wal.size_bytes, 512ull << 20);
}

TEST(ConfigTest, StateDirDefaultsWhenAbsent) {
  absl::StatusOr<Config> config = Parse(Replace(kMinimal, "state_dir = \"/srv/t\"\n", ""));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->agent.state_dir, kDefaultStateDir);
  EXPECT_EQ(config->log.dir, std::string(kDefaultStateDir) + "/log");
  EXPECT_EQ(config->groups[0].volumes[0].path, std::string(kDefaultStateDir) + "/vol0.img");
}

TEST(ConfigTest, StateDirOverrideWinsAndResolvesPaths) {
  absl::StatusOr<Config> config = ParseConfig(kMinimal, "test.toml", "/override/dir");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->agent.state_dir, "/override/dir");
  EXPECT_EQ(config->log.dir, "/override/dir/log");
  EXPECT_EQ(config->groups[0].volumes[0].path, "/override/dir/vol0.img");
}

TEST(ConfigTest, RelativeStateDirOverrideIsMadeAbsolute) {
  absl::StatusOr<Config> config = ParseConfig(kMinimal, "test.toml", "rel/state");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->agent.state_dir, std::filesystem::current_path() / "rel/state");
  EXPECT_EQ(config->groups[0].volumes[0].path,
            std::filesystem::current_path() / "rel/state/vol0.img");
}

TEST(ConfigTest, RelativeStateDirInFileIsAnErrorUnlessOverridden) {
  const std::string text = Replace(kMinimal, "\"/srv/t\"", "\"srv/t\"");
  EXPECT_THAT(ErrorOf(text),
              HasSubstr("test.toml:3:1: agent.state_dir: must be an absolute path, got \"srv/t\""));
  EXPECT_TRUE(ParseConfig(text, "test.toml", "/x").ok());
}

TEST(ConfigTest, PathsAreNormalized) {
  absl::StatusOr<Config> config =
      Parse(Replace(kMinimal, "path = \"vol0.img\"", "path = \"a/../b/./vol0.img\""));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->groups[0].volumes[0].path, "/srv/t/b/vol0.img");
}

TEST(ConfigTest, ValidateIsIdempotent) {
  absl::StatusOr<Config> config = Parse(kMinimal);
  ASSERT_TRUE(config.ok()) << config.status();
  Config again = *config;
  ASSERT_TRUE(Validate(again).ok());
  EXPECT_EQ(again.groups[0].volumes[0].path, config->groups[0].volumes[0].path);
  EXPECT_EQ(again.log.dir, config->log.dir);
}

TEST(ConfigTest, ValidateOnAConfigBuiltInCode) {
  Config config;
  config.nbd.unix_sockets.push_back("nbd.sock");
  config.groups.push_back(
      GroupConfig{"g", {VolumeConfig{.name = "v", .path = "v.img", .size_bytes = 1 << 20}}});
  absl::Status status = Validate(config);
  EXPECT_THAT(std::string(status.message()), HasSubstr("<config>: agent.site: required"));
  config.agent.site = "s";
  ASSERT_TRUE(Validate(config).ok());
  EXPECT_EQ(config.groups[0].volumes[0].export_name, "v");
  EXPECT_EQ(config.nbd.unix_sockets[0], std::string(kDefaultStateDir) + "/nbd.sock");

  config.nbd.listen.push_back(ListenAddress{"localhost", 80});
  EXPECT_THAT(std::string(Validate(config).message()),
              HasSubstr("nbd.listen[0]: invalid listen address \"localhost:80\""));
}

// ---- parse errors and unknown keys ----

TEST(ConfigTest, ParseErrorNamesFileLineAndColumn) {
  const std::string message = ErrorOf(Append(kMinimal, "\n[nbd\n"));
  EXPECT_THAT(message, HasSubstr("test.toml:16:"));
  EXPECT_THAT(message, HasSubstr("parse error"));
  EXPECT_THAT(ErrorOf("[agent]\nsite = \"a\nstate_dir = 1\n"), HasSubstr("test.toml:2:"));
  // The column, exactly: a value missing after '=' on line 2.
  EXPECT_THAT(ErrorOf("[agent]\nsite = \n"), HasSubstr("test.toml:2:8: parse error"));
}

TEST(ConfigTest, DuplicateKeyIsAParseError) {
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "site = \"sto-1\"", "site = \"sto-1\"\nsite = \"sto-2\"")),
              HasSubstr("test.toml:3:"));
}

TEST(ConfigTest, UnknownKeysAreErrorsWithTheirPath) {
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "size = ", "sise = ")),
              HasSubstr("test.toml:14:1: group[0].volume[0].sise: unknown key \"sise\" (did you "
                        "mean \"size\"?)"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "[nbd]", "[nbd]\nthread = 2")),
              HasSubstr("test.toml:6:1: nbd.thread: unknown key \"thread\" (did you mean "
                        "\"threads\"?)"));
  EXPECT_THAT(
      ErrorOf(Append(kMinimal, "[agents]\n")),
      HasSubstr("test.toml:15:2: agents: unknown key \"agents\" (did you mean \"agent\"?)"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "name = \"g0\"", "name = \"g0\"\ncolour = \"blue\"")),
              HasSubstr("group[0].colour: unknown key \"colour\" (known keys here: name, volume, "
                        "primary, peer, on_divergence)"));
  // Tables of later issues are unknown to this agent, not ignored.
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[[peer]]\nsite = \"x\"\n")),
              HasSubstr("test.toml:15:3: peer: unknown key \"peer\""));
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[log]\nretention = 5\n")),
              HasSubstr("log.retention: unknown key"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "state_dir", "statedir")),
              HasSubstr("agent.statedir: unknown key \"statedir\" (did you mean \"state_dir\"?)"));
}

TEST(ConfigTest, AllErrorsAreReportedAtOnce) {
  const std::string message =
      ErrorOf(Replace(Replace(kMinimal, "size = ", "sise = "), "[nbd]", "[nbd]\nthread = 2"));
  EXPECT_THAT(message, HasSubstr("group[0].volume[0].sise"));
  EXPECT_THAT(message, HasSubstr("nbd.thread"));
  const std::string rules =
      ErrorOf(Replace(Replace(kMinimal, "\"sto-1\"", "\"STO\""), "listen = [\"127.0.0.1:10809\"]",
                      "listen = []\nthreads = 0"));
  EXPECT_THAT(rules, HasSubstr("agent.site"));
  EXPECT_THAT(rules, HasSubstr("nbd: no listener"));
  EXPECT_THAT(rules, HasSubstr("nbd.threads"));
}

// ---- types ----

TEST(ConfigTest, WrongTypesNameTheKeyAndTheType) {
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "\"sto-1\"", "5")),
              HasSubstr("test.toml:2:1: agent.site: expected a string, got an integer"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "[nbd]", "[nbd]\nthreads = \"4\"")),
              HasSubstr("nbd.threads: expected an integer, got a string"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "size = \"1GiB\"", "size = \"1GiB\"\nread_only = \"yes\"")),
              HasSubstr("group[0].volume[0].read_only: expected a boolean (true or false), got a "
                        "string"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "size = \"1GiB\"", "size = 1.5")),
              HasSubstr("group[0].volume[0].size: expected a size (an integer number of bytes or "
                        "a string like \"1GiB\"), got a floating-point number"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "listen = [\"127.0.0.1:10809\"]", "listen = \"x:1\"")),
              HasSubstr("nbd.listen: expected an array of strings, got a string"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "[\"127.0.0.1:10809\"]", "[\"127.0.0.1:10809\", 5]")),
              HasSubstr("test.toml:6:"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "[\"127.0.0.1:10809\"]", "[\"127.0.0.1:10809\", 5]")),
              HasSubstr("nbd.listen[1]: expected a string, got an integer"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "[agent]\n", "agent = 3\n[agentx]\n")),
              HasSubstr("agent: expected a table ([agent]), got an integer"));
  EXPECT_THAT(ErrorOf("group = 1\n"),
              HasSubstr("group: expected an array of tables ([[group]]), got an integer"));
  EXPECT_THAT(ErrorOf("group = [1]\n"),
              HasSubstr("group[0]: expected an array of tables ([[group]]), got an integer"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "[[group.volume]]", "[group.volume]")),
              HasSubstr("group[0].volume: expected an array of tables ([[group[0].volume]]), got "
                        "a table"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "path = \"vol0.img\"", "path = \"\"")),
              HasSubstr("group[0].volume[0].path: must not be empty"));
}

TEST(ConfigTest, NegativeNumbersAreRejected) {
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[log]\nretention_seconds = -1\n")),
              HasSubstr("test.toml:16:1: log.retention_seconds: must not be negative, got -1"));
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[log]\nhard_cap = -5\n")),
              HasSubstr("log.hard_cap: must not be negative, got -5"));
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[log]\ncheckpoint_interval_ms = -1000\n")),
              HasSubstr("log.checkpoint_interval_ms: must not be negative"));
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[log]\nmax_batch_records = 5000000000\n")),
              HasSubstr("log.max_batch_records: must be at most 4294967295, got 5000000000"));
}

// ---- sizes ----

// ---- [coordinator] ----

TEST(CoordinatorConfigTest, AbsentMeansStaticRolesAndDefaultsAreFilled) {
  absl::StatusOr<Config> config = Parse(kMinimal);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_FALSE(config->coordinator.has_value());

  config =
      Parse(Append(kMinimal, "[coordinator]\nendpoints = [\"127.0.0.1:2379\", \"h2:2379\"]\n"));
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_TRUE(config->coordinator.has_value());
  const CoordinatorConfig& c = *config->coordinator;
  EXPECT_EQ(c.endpoints, (std::vector<std::string>{"127.0.0.1:2379", "h2:2379"}));
  EXPECT_EQ(c.prefix, "/tvilling");
  EXPECT_EQ(c.lease_ttl_ms, 3000u);
  EXPECT_EQ(c.suspend_after_ms, 2000u);
  EXPECT_EQ(c.policy, FailoverPolicy::kAutomatic);
  EXPECT_EQ(c.max_lag_bytes, 1u << 20);
  EXPECT_TRUE(c.ca.empty());
  Config again = *config;
  ASSERT_TRUE(Validate(again).ok());
  EXPECT_EQ(again.coordinator->suspend_after_ms, 2000u);
}

TEST(CoordinatorConfigTest, EveryKeyIsRead) {
  absl::StatusOr<Config> config = Parse(Append(kMinimal, R"([coordinator]
endpoints = ["10.0.0.1:2379"]
prefix = "/prod/tv"
lease_ttl_ms = 6000
suspend_after_ms = 2500
policy = "approve"
witness = "wit-3"
no_failover = true
max_lag = "16MiB"
max_lag_ms = 5000
anti_flap_ms = 600000
timeout_ms = 2000
)"));
  ASSERT_TRUE(config.ok()) << config.status();
  const CoordinatorConfig& c = *config->coordinator;
  EXPECT_EQ(c.prefix, "/prod/tv");
  EXPECT_EQ(c.lease_ttl_ms, 6000u);
  EXPECT_EQ(c.suspend_after_ms, 2500u);
  EXPECT_EQ(c.policy, FailoverPolicy::kApprove);
  EXPECT_EQ(c.witness, "wit-3");
  EXPECT_TRUE(c.no_failover);
  EXPECT_EQ(c.max_lag_bytes, 16u << 20);
  EXPECT_EQ(c.max_lag_ms, 5000u);
  EXPECT_EQ(c.anti_flap_ms, 600000u);
  EXPECT_EQ(c.timeout_ms, 2000u);
}

TEST(CoordinatorConfigTest, BrokenValuesNameTheKey) {
  const std::string base = Append(kMinimal, "[coordinator]\n");
  EXPECT_THAT(ErrorOf(base), HasSubstr("coordinator.endpoints: required"));
  EXPECT_THAT(ErrorOf(base + "endpoints = [\"http://10.0.0.1:2379\"]\n"),
              HasSubstr("coordinator.endpoints[0]: \"http://10.0.0.1:2379\" is not \"host:port\""));
  EXPECT_THAT(ErrorOf(base + "endpoints = [\"10.0.0.1\"]\n"),
              HasSubstr("coordinator.endpoints[0]"));
  const std::string ok = base + "endpoints = [\"10.0.0.1:2379\"]\n";
  EXPECT_THAT(ErrorOf(ok + "lease_ttl_ms = 1000\n"),
              HasSubstr("coordinator.lease_ttl_ms: must be from 2000"));
  EXPECT_THAT(ErrorOf(ok + "suspend_after_ms = 3000\n"),
              HasSubstr("coordinator.suspend_after_ms: must be at least lease_ttl_ms / 3 (1000"));
  EXPECT_THAT(ErrorOf(ok + "suspend_after_ms = 500\n"), HasSubstr("coordinator.suspend_after_ms"));
  EXPECT_THAT(ErrorOf(ok + "policy = \"sometimes\"\n"),
              HasSubstr("coordinator.policy: must be \"automatic\" or \"manual\" or \"approve\""));
  EXPECT_THAT(ErrorOf(ok + "prefix = \"tv/\"\n"), HasSubstr("coordinator.prefix"));
  EXPECT_THAT(ErrorOf(ok + "cert = \"/x.pem\"\n"),
              AllOf(HasSubstr("coordinator.cert and coordinator.key go together"),
                    HasSubstr("coordinator.ca: required")));
  EXPECT_THAT(ErrorOf(ok + "ca = \"/nonexistent/etcd-ca.pem\"\n"),
              AllOf(HasSubstr("coordinator.ca"), HasSubstr("/nonexistent/etcd-ca.pem")));
  EXPECT_THAT(ErrorOf(ok + "witness = \"sto-1\"\n"),
              HasSubstr("coordinator.witness: \"sto-1\" holds group \"g0\""));
  EXPECT_THAT(ErrorOf(ok + "endpoint = [\"x:1\"]\n"), HasSubstr("coordinator.endpoint"));
}

TEST(ParseSizeTest, AcceptsIntegersAndBinaryUnits) {
  const std::pair<std::string_view, uint64_t> cases[] = {
      {"0", 0},
      {"512", 512},
      {"512B", 512},
      {"1KiB", 1024},
      {"8MiB", 8ull << 20},
      {"1GiB", 1ull << 30},
      {"1 GiB", 1ull << 30},
      {"3TiB", 3ull << 40},
      {"18446744073709551615", UINT64_MAX},
      {"16777215TiB", 16777215ull << 40},
  };
  for (const auto& [text, want] : cases) {
    absl::StatusOr<uint64_t> got = ParseSize(text);
    ASSERT_TRUE(got.ok()) << text << ": " << got.status();
    EXPECT_EQ(*got, want) << text;
  }
}

TEST(ParseSizeTest, RejectsDecimalUnitsFractionsAndOverflow) {
  for (std::string_view text : {"1G", "1GB", "1k", "1KB", "1M", "1mib", "1gib", "1 G"}) {
    absl::StatusOr<uint64_t> got = ParseSize(text);
    ASSERT_FALSE(got.ok()) << text;
    EXPECT_THAT(
        std::string(got.status().message()),
        AllOf(HasSubstr("invalid size \"" + std::string(text) + "\""), HasSubstr("unknown unit"),
              HasSubstr("B, KiB, MiB, GiB, TiB"), HasSubstr("decimal units")))
        << text;
  }
  for (std::string_view text : {"1.5GiB", "1e9"}) {
    EXPECT_THAT(std::string(ParseSize(text).status().message()), HasSubstr("fractions"));
  }
  for (std::string_view text : {"18446744073709551616", "16777216TiB"}) {
    EXPECT_THAT(std::string(ParseSize(text).status().message()), HasSubstr("too large"));
  }
  for (std::string_view text : {"", "-1", "GiB", " 1GiB", "1  GiB", "0x10"}) {
    EXPECT_FALSE(ParseSize(text).ok()) << text;
  }
}

TEST(ParseSizeTest, FormatSizePicksTheLargestExactUnit) {
  EXPECT_EQ(FormatSize(0), "0 B");
  EXPECT_EQ(FormatSize(1000), "1000 B");
  EXPECT_EQ(FormatSize(1536 << 10), "1536 KiB");
  EXPECT_EQ(FormatSize(1ull << 30), "1 GiB");
  EXPECT_EQ(FormatSize(5ull << 40), "5 TiB");
}

TEST(ConfigTest, SizeErrorsInTheConfigNameTheKey) {
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "\"1GiB\"", "\"1G\"")),
              HasSubstr("test.toml:14:1: group[0].volume[0].size: invalid size \"1G\": unknown "
                        "unit \"G\""));
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[log]\nwrite_buffer = \"256MB\"\n")),
              HasSubstr("log.write_buffer: invalid size \"256MB\""));
}

// ---- rules ----

TEST(ConfigTest, VolumeSizeMustBePositiveAndAMultipleOf512) {
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "\"1GiB\"", "1000")),
              HasSubstr("test.toml:14:1: group[0].volume[0].size: must be a multiple of 512 "
                        "bytes, got 1000"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "\"1GiB\"", "\"0\"")),
              HasSubstr("group[0].volume[0].size: must be > 0"));
  EXPECT_TRUE(Parse(Replace(kMinimal, "\"1GiB\"", "512")).ok());
}

TEST(ConfigTest, VolumeSizeIsRequiredForAFile) {
  const std::string message = ErrorOf(Replace(kMinimal, "size = \"1GiB\"\n", ""));
  EXPECT_THAT(message, HasSubstr("test.toml:11:1: group[0].volume[0].size: required for a file "
                                 "volume (\"/srv/t/vol0.img\" is not a block device)"));
}

TEST(ConfigTest, RequiredKeys) {
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "site = \"sto-1\"\n", "")),
              HasSubstr("test.toml:1:1: agent.site: required"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "name = \"vol0\"\n", "")),
              HasSubstr("test.toml:11:1: group[0].volume[0].name: required"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "path = \"vol0.img\"\n", "")),
              HasSubstr("group[0].volume[0].path: required"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "name = \"g0\"\n", "")),
              HasSubstr("test.toml:8:1: group[0].name: required"));
}

TEST(ConfigTest, SiteAndNames) {
  const std::string too_long(kMaxNameLength + 1, 'a');
  for (std::string_view bad : {std::string_view("Sto-1"), std::string_view("sto_1"),
                               std::string_view("sto.1"), std::string_view(too_long)}) {
    EXPECT_THAT(ErrorOf(Replace(kMinimal, "\"sto-1\"", "\"" + std::string(bad) + "\"")),
                HasSubstr("test.toml:2:1: agent.site: must be 1..63 characters of a-z, 0-9 and "
                          "'-'"))
        << bad;
  }
  EXPECT_TRUE(Parse(Replace(kMinimal, "\"sto-1\"", "\"a-0\"")).ok());
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "name = \"g0\"", "name = \"g 0\"")),
              HasSubstr("group[0].name: must be 1..63 characters of A-Z, a-z, 0-9, '-' and '_'"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "name = \"vol0\"", "name = \"../vol0\"")),
              HasSubstr("group[0].volume[0].name: must be 1..63 characters"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "name = \"vol0\"", "name = \"vol0\"\nexport = \"a b\"")),
              HasSubstr("group[0].volume[0].export: must be 1..255 printable ASCII characters "
                        "without spaces, got \"a b\""));
}

constexpr std::string_view kSecondGroup = R"(
[[group]]
name = "g1"

[[group.volume]]
name = "vol1"
path = "vol1.img"
size = "1GiB"
)";

TEST(ConfigTest, GroupNamesAreUnique) {
  EXPECT_THAT(ErrorOf(Replace(Append(kMinimal, kSecondGroup), "\"g1\"", "\"g0\"")),
              HasSubstr("test.toml:17:1: group[1].name: duplicate group name \"g0\" (also at "
                        "group[0].name)"));
}

TEST(ConfigTest, VolumeNamesAreUniqueAcrossTheAgent) {
  const std::string text = Append(kMinimal, kSecondGroup);
  ASSERT_TRUE(Parse(text).ok());
  const std::string message = ErrorOf(Replace(text, "\"vol1\"", "\"vol0\""));
  // The export defaults to the name: one clash, reported once.
  EXPECT_THAT(message, Not(HasSubstr("duplicate export")));
  EXPECT_THAT(message,
              HasSubstr("test.toml:20:1: group[1].volume[0].name: duplicate volume name \"vol0\" "
                        "(also at group[0].volume[0].name)"));
}

TEST(ConfigTest, ExportNamesAreUniqueAcrossTheAgent) {
  const std::string text = Replace(Append(kMinimal, kSecondGroup), "name = \"vol1\"",
                                   "name = \"vol1\"\nexport = \"vol0\"");
  EXPECT_THAT(ErrorOf(text),
              HasSubstr("test.toml:21:1: group[1].volume[0].export: duplicate export "
                        "name \"vol0\" (also at group[0].volume[0].name)"));
  // An export may differ from its volume's name and still be unique.
  EXPECT_TRUE(Parse(Replace(text, "export = \"vol0\"", "export = \"other\"")).ok());
}

TEST(ConfigTest, VolumePathsAreUniqueAndOutsideTheLog) {
  EXPECT_THAT(ErrorOf(Replace(Append(kMinimal, kSecondGroup), "\"vol1.img\"", "\"./vol0.img\"")),
              HasSubstr("group[1].volume[0].path: duplicate volume path \"/srv/t/vol0.img\" (also "
                        "at group[0].volume[0].path)"));
  EXPECT_THAT(
      ErrorOf(Replace(kMinimal, "\"vol0.img\"", "\"log/vol0.img\"")),
      HasSubstr("test.toml:13:1: group[0].volume[0].path: \"/srv/t/log/vol0.img\" is inside "
                "the log directory \"/srv/t/log\""));
  EXPECT_TRUE(Parse(Replace(kMinimal, "\"vol0.img\"", "\"logs/vol0.img\"")).ok());
}

TEST(ConfigTest, GroupsAndVolumesMustExist) {
  EXPECT_THAT(ErrorOf(R"([agent]
site = "a"
[nbd]
listen = ["127.0.0.1:1"]
)"),
              HasSubstr("test.toml: group: no [[group]]"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal,
                              "[[group.volume]]\nname = \"vol0\"\npath = \"vol0.img\"\n"
                              "size = \"1GiB\"\n",
                              "")),
              HasSubstr("test.toml:8:1: group[0].volume: no [[group.volume]]"));
}

// ---- listeners ----

TEST(ListenAddressTest, Parses) {
  absl::StatusOr<ListenAddress> v4 = ParseListenAddress("127.0.0.1:10809");
  ASSERT_TRUE(v4.ok()) << v4.status();
  EXPECT_EQ(*v4, (ListenAddress{"127.0.0.1", 10809}));
  absl::StatusOr<ListenAddress> v6 = ParseListenAddress("[::1]:1");
  ASSERT_TRUE(v6.ok()) << v6.status();
  EXPECT_EQ(*v6, (ListenAddress{"::1", 1}));
  EXPECT_EQ(v6->ToString(), "[::1]:1");
  EXPECT_TRUE(ParseListenAddress("0.0.0.0:65535").ok());
  EXPECT_TRUE(ParseListenAddress("[::]:10809").ok());
}

TEST(ListenAddressTest, RejectsWithAReason) {
  const std::pair<std::string_view, std::string_view> cases[] = {
      {"127.0.0.1", "missing \":port\""},
      {"127.0.0.1:0", "port must be 1..65535, got \"0\""},
      {"127.0.0.1:65536", "port must be 1..65535"},
      {"127.0.0.1:", "port must be 1..65535"},
      {"127.0.0.1:80x", "port must be 1..65535"},
      {"127.0.0.1:-1", "port must be 1..65535"},
      {"localhost:10809", "\"localhost\" is not an IPv4 address (host names are not resolved)"},
      {"::1:10809", "an IPv6 address must be in brackets"},
      {"[::1]10809", "missing \":port\""},
      {"[::1:10809", "missing ']'"},
      {"[127.0.0.1]:1", "is not an IPv6 address"},
      {":10809", "\"\" is not an IPv4 address"},
      {"300.0.0.1:1", "is not an IPv4 address"},
  };
  for (const auto& [text, reason] : cases) {
    absl::StatusOr<ListenAddress> got = ParseListenAddress(text);
    ASSERT_FALSE(got.ok()) << text;
    EXPECT_THAT(
        std::string(got.status().message()),
        AllOf(HasSubstr("invalid listen address \"" + std::string(text) + "\""), HasSubstr(reason)))
        << text;
  }
}

TEST(ConfigTest, ListenAddressErrorsNameTheElement) {
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "[\"127.0.0.1:10809\"]", "[\"127.0.0.1:1\", \"x:1\"]")),
              HasSubstr("test.toml:6:26: nbd.listen[1]: invalid listen address \"x:1\""));
  EXPECT_THAT(
      ErrorOf(Replace(kMinimal, "[\"127.0.0.1:10809\"]", "[\"127.0.0.1:1\", \"127.0.0.1:1\"]")),
      HasSubstr("nbd.listen[1]: duplicate listen address \"127.0.0.1:1\" (also at nbd.listen[0])"));
}

TEST(ConfigTest, AtLeastOneListener) {
  const std::string none = Replace(kMinimal, "listen = [\"127.0.0.1:10809\"]", "listen = []");
  EXPECT_THAT(ErrorOf(none), HasSubstr("test.toml:5:1: nbd: no listener"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "[nbd]\nlisten = [\"127.0.0.1:10809\"]\n", "")),
              HasSubstr("test.toml: nbd: no listener"));
  absl::StatusOr<Config> unix_only =
      Parse(Replace(none, "listen = []", "listen = []\nunix_sockets = [\"nbd.sock\"]"));
  ASSERT_TRUE(unix_only.ok()) << unix_only.status();
  ASSERT_EQ(unix_only->nbd.unix_sockets.size(), 1u);
  EXPECT_EQ(unix_only->nbd.unix_sockets[0], "/srv/t/nbd.sock");
}

TEST(ConfigTest, UnixSocketRules) {
  const std::string long_name(120, 's');
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "[nbd]", "[nbd]\nunix_sockets = [\"" + long_name + "\"]")),
              AllOf(HasSubstr("test.toml:6:17: nbd.unix_sockets[0]: \"/srv/t/" + long_name +
                              "\" is 127 bytes"),
                    HasSubstr("at most 107 bytes")));
  EXPECT_THAT(
      ErrorOf(Replace(kMinimal, "[nbd]", "[nbd]\nunix_sockets = [\"a.sock\", \"/srv/t/a.sock\"]")),
      HasSubstr("nbd.unix_sockets[1]: duplicate unix socket \"/srv/t/a.sock\""));
}

TEST(ConfigTest, NbdLimits) {
  for (std::string_view bad : {"0", "65"}) {
    EXPECT_THAT(ErrorOf(Replace(kMinimal, "[nbd]", "[nbd]\nthreads = " + std::string(bad))),
                HasSubstr("test.toml:6:1: nbd.threads: must be 1..64, got " + std::string(bad)));
  }
  EXPECT_TRUE(Parse(Replace(kMinimal, "[nbd]", "[nbd]\nthreads = 64")).ok());
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "[nbd]", "[nbd]\nmax_inflight_requests = 0")),
              HasSubstr("nbd.max_inflight_requests: must be 1..65536, got 0"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "[nbd]", "[nbd]\nmax_inflight_bytes = \"1MiB\"")),
              HasSubstr("nbd.max_inflight_bytes: must be between 32 MiB and 64 GiB, got 1 MiB"));
}

// ---- the group-log store ----

TEST(ConfigTest, BatchLimits) {
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[log]\nexternal_payload_min = 16\n")),
              HasSubstr("log.external_payload_min: must be 0 (off) or from 17 bytes to 32 MiB"));
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[log]\nmax_batch_records = 0\n")),
              HasSubstr("test.toml:16:1: log.max_batch_records: must be 1..1048576, got 0"));
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[log]\nmax_batch_bytes = 100\n")),
              HasSubstr("log.max_batch_bytes: must be between 4 KiB and 1 GiB, got 100 B"));
  EXPECT_THAT(
      ErrorOf(Append(kMinimal, "[log]\nwrite_buffer = \"16MiB\"\nmax_batch_bytes = \"32MiB\"\n")),
      HasSubstr("test.toml:17:1: log.max_batch_bytes: must not exceed log.write_buffer "
                "(16 MiB), got 32 MiB"));
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[log]\nwrite_buffer = 4096\n")),
              HasSubstr("log.write_buffer: must be between 1 MiB and 64 GiB, got 4 KiB"));
}

TEST(ConfigTest, RetentionAndDurations) {
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[log]\nretention_bytes = \"2GiB\"\nhard_cap = \"1GiB\"\n")),
              HasSubstr("test.toml:17:1: log.hard_cap: must be >= log.retention_bytes (2 GiB) or 0 "
                        "(no cap), got 1 GiB"));
  EXPECT_TRUE(
      Parse(Append(kMinimal, "[log]\nretention_bytes = \"2GiB\"\nhard_cap = \"0\"\n")).ok());
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[log]\ncheckpoint_interval_ms = 0\n")),
              HasSubstr("log.checkpoint_interval_ms: must be 1..3600000 ms, got 0"));
  EXPECT_TRUE(Parse(Append(kMinimal, "[log]\ncheckpoint_chunk = 0\n")).ok());  // unpaced
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[log]\ncheckpoint_bytes = \"512KiB\"\n")),
              HasSubstr("log.checkpoint_bytes: must be between 1 MiB and 64 GiB, got 512 KiB"));
  EXPECT_THAT(
      ErrorOf(Append(kMinimal, "[log]\ncheckpoint_chunk = \"4KiB\"\n")),
      HasSubstr(
          "log.checkpoint_chunk: must be 0 (unpaced) or between 64 KiB and 1 GiB, got 4 KiB"));
  EXPECT_TRUE(Parse(Append(kMinimal, "[log]\nwriteback = 0\n")).ok());  // only at checkpoints
  EXPECT_THAT(
      ErrorOf(Append(kMinimal, "[log]\nwriteback = \"2GiB\"\n")),
      HasSubstr("log.writeback: must be 0 (only at checkpoints) or between 64 KiB and 1 GiB, got "
                "2 GiB"));
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[log]\ndir = \"\"\n")),
              HasSubstr("log.dir: must not be empty"));
}

// ---- files ----

TEST(LoadConfigTest, ExampleConfigIsValid) {
  const std::string state_dir = MakeTempDir();
  const std::filesystem::path file =
      std::filesystem::path(TVILLING_SOURCE_DIR) / "deploy/examples/single-node.toml";
  absl::StatusOr<Config> config = LoadConfig(file, state_dir);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->source, file.string());
  EXPECT_EQ(config->agent.site, "sto-1");
  EXPECT_EQ(config->agent.state_dir, state_dir);
  ASSERT_EQ(config->nbd.listen.size(), 1u);
  EXPECT_EQ(config->nbd.listen[0].ToString(), "127.0.0.1:10809");
  ASSERT_TRUE(config->metrics.listen.has_value());
  EXPECT_EQ(config->metrics.listen->ToString(), "127.0.0.1:9464");
  ASSERT_EQ(config->groups.size(), 1u);
  EXPECT_EQ(config->groups[0].name, "g0");
  ASSERT_EQ(config->groups[0].volumes.size(), 1u);
  EXPECT_EQ(config->groups[0].volumes[0].name, "vol0");
  EXPECT_EQ(config->groups[0].volumes[0].export_name, "vol0");
  EXPECT_EQ(config->groups[0].volumes[0].size_bytes, 1ull << 30);
  // All data under the state dir.
  const std::string prefix = state_dir + "/";
  EXPECT_EQ(config->log.dir.string().rfind(prefix, 0), 0u) << config->log.dir;
  EXPECT_EQ(config->groups[0].volumes[0].path.string().rfind(prefix, 0), 0u)
      << config->groups[0].volumes[0].path;
  for (const auto& socket : config->nbd.unix_sockets) {
    EXPECT_EQ(socket.string().rfind(prefix, 0), 0u) << socket;
  }
  // And as shipped, without the override.
  absl::StatusOr<Config> as_shipped = LoadConfig(file);
  ASSERT_TRUE(as_shipped.ok()) << as_shipped.status();
  EXPECT_EQ(as_shipped->agent.state_dir, "/var/lib/tvilling");
  std::filesystem::remove_all(state_dir);
}

TEST(LoadConfigTest, ErrorsNameTheFile) {
  const std::string dir = MakeTempDir();
  const std::string file = dir + "/bad.toml";
  {
    std::ofstream out(file);
    out << Replace(kMinimal, "size = ", "sise = ");
  }
  absl::StatusOr<Config> config = LoadConfig(file);
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(std::string(config.status().message()),
              HasSubstr(file + ":14:1: group[0].volume[0].sise: unknown key"));

  absl::StatusOr<Config> missing = LoadConfig(dir + "/missing.toml");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()),
              HasSubstr("cannot open config file \"" + dir + "/missing.toml\""));

  absl::StatusOr<Config> directory = LoadConfig(dir);
  ASSERT_FALSE(directory.ok());
  EXPECT_THAT(std::string(directory.status().message()), HasSubstr("is not a regular file"));

  {
    std::ofstream out(file, std::ios::trunc);
    out << std::string(kMaxConfigFileBytes + 1, '#');
  }
  EXPECT_THAT(std::string(LoadConfig(file).status().message()), HasSubstr("is larger than 1 MiB"));
  std::filesystem::remove_all(dir);
}

// ---- replication: [tls], [replication], [[group.peer]], [[acl]], [control] ----

// Two sites, this agent (site-a) primary, insecure so that no files are needed. Line numbers
// matter: tests below point at them.
constexpr std::string_view kPair = R"([agent]
site = "site-a"
state_dir = "/srv/a"

[nbd]
listen = ["127.0.0.1:10809"]

[tls]
insecure = true

[replication]
listen = "127.0.0.1:7301"

[[group]]
name = "g0"
primary = "site-a"

[[group.volume]]
name = "vol0"
path = "vol0.img"
size = "1GiB"

[[group.peer]]
site = "site-b"
address = "127.0.0.1:7302"
mode = "sync"

[[acl]]
identity = "*"
site = "site-b"
groups = ["g0"]
)";

// The same pair seen from this agent as g0's replica.
std::string Replica() { return Replace(kPair, "primary = \"site-a\"", "primary = \"site-b\""); }

constexpr std::string_view kCertPem =
    "-----BEGIN CERTIFICATE-----\nMIIBdummy\n-----END CERTIFICATE-----\n";
constexpr std::string_view kKeyPem =
    "-----BEGIN PRIVATE KEY-----\nMIGHdummy\n-----END PRIVATE KEY-----\n";

void WriteFile(const std::filesystem::path& file, std::string_view text) {
  std::filesystem::create_directories(file.parent_path());
  std::ofstream out(file, std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << file;
}

// <dir>/pki/ca.pem and <site>.pem / <site>.key for each site, as deploy/pki/make-dev-pki.sh
// lays them out (the content only needs to look like PEM for Validate).
void WriteDummyPki(const std::filesystem::path& dir) {
  WriteFile(dir / "pki/ca.pem", kCertPem);
  for (std::string_view site : {"site-a", "site-b", "site-c"}) {
    WriteFile(dir / "pki" / (std::string(site) + ".pem"), kCertPem);
    WriteFile(dir / "pki" / (std::string(site) + ".key"), kKeyPem);
  }
}

// kPair with mutual TLS files under `dir`/pki and the state dir `dir`/site-a.
std::string WithTls(std::string_view text) {
  return Replace(Replace(text, "insecure = true",
                         "ca = \"../pki/ca.pem\"\ncert = \"../pki/site-a.pem\"\n"
                         "key = \"../pki/site-a.key\""),
                 "identity = \"*\"", "identity = \"site-b\"");
}

TEST(ReplicationConfigTest, PairGetsDefaults) {
  absl::StatusOr<Config> config = Parse(kPair);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->HasPeers());
  EXPECT_TRUE(config->tls.insecure);
  EXPECT_FALSE(config->tls.enabled());
  ASSERT_TRUE(config->replication.listen.has_value());
  EXPECT_EQ(*config->replication.listen, (ListenAddress{"127.0.0.1", 7301}));
  EXPECT_EQ(config->replication.max_window_bytes, 256ull << 20);
  EXPECT_EQ(config->replication.min_window_bytes, 4ull << 20);
  EXPECT_EQ(config->replication.max_batch_bytes, 4ull << 20);
  EXPECT_EQ(config->replication.max_batch_delay_us, 1000u);
  EXPECT_EQ(config->replication.keepalive_ms, 10000u);
  EXPECT_EQ(config->replication.replica_sync_interval_ms, 5u);
  EXPECT_EQ(config->control.unix_socket, "/srv/a/tvillingd.sock");
  const GroupConfig& group = config->groups[0];
  EXPECT_EQ(group.primary, "site-a");
  EXPECT_TRUE(group.IsPrimary("site-a"));
  ASSERT_EQ(group.peers.size(), 1u);
  const PeerConfig& peer = group.peers[0];
  EXPECT_EQ(peer.site, "site-b");
  EXPECT_EQ(peer.address, (ListenAddress{"127.0.0.1", 7302}));
  EXPECT_EQ(peer.tls_name, "site-b");  // defaults to the site
  EXPECT_EQ(peer.mode, PeerMode::kSync);
  EXPECT_EQ(peer.rate_limit_bytes_per_second, 0u);
  EXPECT_EQ(peer.compression, Compression::kLz4);
  EXPECT_EQ(peer.sync_degrade_after_ms, 0u);
  ASSERT_EQ(config->acl.size(), 1u);
  EXPECT_EQ(config->acl[0].identity, "*");
  EXPECT_EQ(config->acl[0].site, "site-b");
  EXPECT_EQ(config->acl[0].groups, std::vector<std::string>{"g0"});
  // The peer's mode defaults to async.
  absl::StatusOr<Config> async = Parse(Replace(kPair, "mode = \"sync\"\n", ""));
  ASSERT_TRUE(async.ok()) << async.status();
  EXPECT_EQ(async->groups[0].peers[0].mode, PeerMode::kAsync);
  EXPECT_EQ(PeerModeName(PeerMode::kSync), "sync");
  EXPECT_EQ(CompressionName(Compression::kZstd), "zstd");
  EXPECT_EQ(group.on_divergence, GroupConfig::OnDivergence::kRejoin);
}

TEST(ReplicationConfigTest, OnDivergence) {
  absl::StatusOr<Config> refuse = Parse(
      Replace(kPair, "primary = \"site-a\"", "primary = \"site-a\"\non_divergence = \"refuse\""));
  ASSERT_TRUE(refuse.ok()) << refuse.status();
  EXPECT_EQ(refuse->groups[0].on_divergence, GroupConfig::OnDivergence::kRefuse);
  EXPECT_THAT(ErrorOf(Replace(kPair, "primary = \"site-a\"",
                              "primary = \"site-a\"\non_divergence = \"discard\"")),
              HasSubstr("group[0].on_divergence: \"discard\": expected \"rejoin\" or \"refuse\""));
}

TEST(ReplicationConfigTest, SingleNodeNeedsNoneOfIt) {
  absl::StatusOr<Config> config = Parse(kMinimal);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_FALSE(config->HasPeers());
  EXPECT_FALSE(config->tls.enabled());
  EXPECT_FALSE(config->tls.insecure);
  EXPECT_FALSE(config->replication.listen.has_value());
  EXPECT_TRUE(config->acl.empty());
  EXPECT_EQ(config->groups[0].primary, "sto-1");  // a local-only group is this agent's
  EXPECT_EQ(config->control.unix_socket, "/srv/t/tvillingd.sock");
  // A primary named explicitly must be this agent.
  EXPECT_TRUE(Parse(Replace(kMinimal, "name = \"g0\"", "name = \"g0\"\nprimary = \"sto-1\"")).ok());
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "name = \"g0\"", "name = \"g0\"\nprimary = \"sto-2\"")),
              HasSubstr("test.toml:10:1: group[0].primary: \"sto-2\" is not this agent's site "
                        "(\"sto-1\") and the group has no [[group.peer]]"));
}

TEST(ReplicationConfigTest, EveryKeyIsRead) {
  const std::string dir = MakeTempDir();
  WriteDummyPki(dir);
  const std::string text = Append(
      Replace(Replace(WithTls(kPair), "mode = \"sync\"",
                      "mode = \"sync\"\ntls_name = \"b.example.net\"\nrate_limit = \"100MiB\"\n"
                      "compression = \"zstd\"\nsync_degrade_after_ms = 30000"),
              "listen = \"127.0.0.1:7301\"",
              "listen = \"[::1]:7301\"\nmax_window = \"1GiB\"\nmin_window = \"8MiB\"\n"
              "max_batch_bytes = \"2MiB\"\nmax_batch_delay_us = 0\nkeepalive_ms = 3000\n"
              "replica_sync_interval_ms = 20"),
      "[control]\nunix_socket = \"run/ctl.sock\"\n");
  absl::StatusOr<Config> config = ParseConfig(text, "test.toml", dir + "/site-a");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->tls.enabled());
  EXPECT_FALSE(config->tls.insecure);
  EXPECT_EQ(config->tls.ca, dir + "/pki/ca.pem");  // relative to state_dir, normalized
  EXPECT_EQ(config->tls.cert, dir + "/pki/site-a.pem");
  EXPECT_EQ(config->tls.key, dir + "/pki/site-a.key");
  EXPECT_EQ(config->replication.listen->ToString(), "[::1]:7301");
  EXPECT_EQ(config->replication.max_window_bytes, 1ull << 30);
  EXPECT_EQ(config->replication.min_window_bytes, 8ull << 20);
  EXPECT_EQ(config->replication.max_batch_bytes, 2ull << 20);
  EXPECT_EQ(config->replication.max_batch_delay_us, 0u);
  EXPECT_EQ(config->replication.keepalive_ms, 3000u);
  EXPECT_EQ(config->replication.replica_sync_interval_ms, 20u);
  EXPECT_EQ(config->control.unix_socket, dir + "/site-a/run/ctl.sock");
  const PeerConfig& peer = config->groups[0].peers[0];
  EXPECT_EQ(peer.tls_name, "b.example.net");
  EXPECT_EQ(peer.rate_limit_bytes_per_second, 100ull << 20);
  EXPECT_EQ(peer.compression, Compression::kZstd);
  EXPECT_EQ(peer.sync_degrade_after_ms, 30000u);
  EXPECT_EQ(config->acl[0].identity, "site-b");
  // Validate again on the result: idempotent.
  Config again = *config;
  ASSERT_TRUE(Validate(again).ok()) << Validate(again);
  EXPECT_EQ(again.tls.ca, config->tls.ca);
  EXPECT_EQ(again.control.unix_socket, config->control.unix_socket);
  EXPECT_EQ(again.groups[0].peers[0].tls_name, "b.example.net");
  std::filesystem::remove_all(dir);
}

TEST(ReplicationConfigTest, UnknownKeysInTheNewTables) {
  EXPECT_THAT(ErrorOf(Replace(kPair, "mode = \"sync\"", "mode = \"sync\"\nmodes = 1")),
              HasSubstr("test.toml:27:1: group[0].peer[0].modes: unknown key \"modes\" (did you "
                        "mean \"mode\"?)"));
  EXPECT_THAT(ErrorOf(Replace(kPair, "insecure = true", "insecure = true\ncafile = \"x\"")),
              HasSubstr("tls.cafile: unknown key"));
  EXPECT_THAT(ErrorOf(Replace(kPair, "listen = \"127.0.0.1:7301\"",
                              "listen = \"127.0.0.1:7301\"\nwindow = \"1MiB\"")),
              HasSubstr("replication.window: unknown key"));
  EXPECT_THAT(ErrorOf(Replace(kPair, "groups = [\"g0\"]", "groups = [\"g0\"]\ngroup = \"g0\"")),
              HasSubstr("acl[0].group: unknown key \"group\" (did you mean \"groups\"?)"));
  EXPECT_THAT(ErrorOf(Append(kPair, "[control]\nsocket = \"x\"\n")),
              HasSubstr("control.socket: unknown key"));
  EXPECT_THAT(ErrorOf(Append(kPair, "[acl]\nidentity = \"x\"\n")), HasSubstr("parse error"));
  EXPECT_THAT(ErrorOf(Replace(kPair, "[[acl]]", "[acl]")),
              HasSubstr("acl: expected an array of tables ([[acl]]), got a table"));
}

TEST(ReplicationConfigTest, WrongTypes) {
  EXPECT_THAT(ErrorOf(Replace(kPair, "insecure = true", "insecure = \"yes\"")),
              HasSubstr("test.toml:9:1: tls.insecure: expected a boolean (true or false), got a "
                        "string"));
  EXPECT_THAT(
      ErrorOf(Replace(kPair, "listen = \"127.0.0.1:7301\"", "listen = [\"127.0.0.1:7301\"]")),
      HasSubstr("replication.listen: expected a string, got an array"));
  EXPECT_THAT(ErrorOf(Replace(kPair, "groups = [\"g0\"]", "groups = \"g0\"")),
              HasSubstr("acl[0].groups: expected an array of strings, got a string"));
  EXPECT_THAT(ErrorOf(Replace(kPair, "mode = \"sync\"", "mode = \"sync\"\nrate_limit = \"1GB\"")),
              HasSubstr("group[0].peer[0].rate_limit: invalid size \"1GB\""));
  EXPECT_THAT(ErrorOf(Replace(kPair, "mode = \"sync\"", "mode = \"sync\"\nrate_limit = -1")),
              HasSubstr("group[0].peer[0].rate_limit: must not be negative"));
}

// ---- [tls] ----

TEST(ReplicationConfigTest, PeersNeedTlsOrInsecure) {
  const std::string message = ErrorOf(Replace(kPair, "[tls]\ninsecure = true\n", ""));
  EXPECT_THAT(message,
              HasSubstr("test.toml: tls: groups have peers but neither TLS nor insecure mode is "
                        "configured: set tls.ca, tls.cert and tls.key (mutual TLS between agents), "
                        "or tls.insecure = true"));
  // insecure = false is the same as leaving it out.
  EXPECT_THAT(ErrorOf(Replace(kPair, "insecure = true", "insecure = false")),
              HasSubstr("test.toml:8:1: tls: groups have peers but neither TLS nor insecure"));
}

TEST(ReplicationConfigTest, TlsFilesAreResolvedAndChecked) {
  const std::string dir = MakeTempDir();
  WriteDummyPki(dir);
  const std::string state_dir = dir + "/site-a";
  auto error_of = [&](const std::string& text) {
    absl::StatusOr<Config> config = ParseConfig(text, "test.toml", state_dir);
    EXPECT_FALSE(config.ok()) << text;
    return config.ok() ? std::string() : std::string(config.status().message());
  };
  const std::string tls = WithTls(kPair);
  ASSERT_TRUE(ParseConfig(tls, "test.toml", state_dir).ok());

  std::filesystem::remove(dir + "/pki/site-a.key");
  EXPECT_THAT(error_of(tls), HasSubstr("test.toml:11:1: tls.key: cannot read \"" + dir +
                                       "/pki/site-a.key\": No such file or directory"));
  std::filesystem::create_directory(dir + "/pki/site-a.key");
  EXPECT_THAT(error_of(tls), HasSubstr("tls.key: \"" + dir +
                                       "/pki/site-a.key\" is not a regular "
                                       "file"));
  std::filesystem::remove(dir + "/pki/site-a.key");
  // Swapped cert and key.
  WriteFile(dir + "/pki/site-a.key", kCertPem);
  WriteFile(dir + "/pki/site-a.pem", kKeyPem);
  const std::string swapped = error_of(tls);
  EXPECT_THAT(swapped, HasSubstr("test.toml:10:1: tls.cert: \"" + dir +
                                 "/pki/site-a.pem\" holds no PEM certificate"));
  EXPECT_THAT(swapped, HasSubstr("tls.key: \"" + dir +
                                 "/pki/site-a.key\" holds no PEM private "
                                 "key"));
  WriteFile(dir + "/pki/site-a.pem", kCertPem);
  WriteFile(dir + "/pki/site-a.key",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nx\n-----END ENCRYPTED PRIVATE KEY-----\n");
  EXPECT_THAT(error_of(tls), HasSubstr("tls.key: \"" + dir +
                                       "/pki/site-a.key\" is an encrypted "
                                       "private key; tvillingd needs it unencrypted"));
  // Other PEM private key flavours are accepted.
  WriteFile(dir + "/pki/site-a.key",
            "-----BEGIN EC PRIVATE KEY-----\nx\n-----END EC PRIVATE KEY-----\n");
  EXPECT_TRUE(ParseConfig(tls, "test.toml", state_dir).ok());

  // All three are required once one is set.
  const std::string partial = error_of(Replace(tls, "cert = \"../pki/site-a.pem\"\n", ""));
  EXPECT_THAT(partial, HasSubstr("test.toml:8:1: tls.cert: required with TLS (PEM file of this "
                                 "agent's certificate)"));
  // Given files are checked even without peers.
  EXPECT_THAT(error_of(Append(kMinimal, "[tls]\nca = \"nope.pem\"\n")),
              HasSubstr("tls.ca: cannot read \"" + state_dir + "/nope.pem\""));
  // insecure and files at once is ambiguous.
  EXPECT_THAT(
      error_of(Replace(tls, "[tls]", "[tls]\ninsecure = true")),
      HasSubstr("tls.insecure: true turns TLS off, but tls.ca, tls.cert or tls.key is set"));
  std::filesystem::remove_all(dir);
}

// ---- [replication] ----

TEST(ReplicationConfigTest, ListenIsRequiredWithPeers) {
  EXPECT_THAT(ErrorOf(Replace(kPair, "listen = \"127.0.0.1:7301\"\n", "")),
              HasSubstr("test.toml:11:1: replication.listen: required when a group has peers: "
                        "the \"host:port\" where peers connect"));
  EXPECT_THAT(ErrorOf(Replace(kPair, "\"127.0.0.1:7301\"", "\"localhost:7301\"")),
              HasSubstr("test.toml:12:1: replication.listen: invalid listen address "
                        "\"localhost:7301\""));
  EXPECT_THAT(ErrorOf(Replace(kPair, "\"127.0.0.1:7301\"", "\"127.0.0.1:10809\"")),
              HasSubstr("replication.listen: \"127.0.0.1:10809\" is also nbd.listen[0]"));
  // Without peers it may still be set (an agent waiting to be given groups).
  EXPECT_TRUE(Parse(Append(kMinimal, "[replication]\nlisten = \"0.0.0.0:7301\"\n")).ok());
}

TEST(ReplicationConfigTest, TuningBounds) {
  auto with = [](std::string_view more) {
    return Replace(kPair, "listen = \"127.0.0.1:7301\"",
                   "listen = \"127.0.0.1:7301\"\n" + std::string(more));
  };
  EXPECT_THAT(ErrorOf(with("min_window = \"512MiB\"")),
              HasSubstr("test.toml:13:1: replication.min_window: must not exceed "
                        "replication.max_window (256 MiB), got 512 MiB"));
  EXPECT_THAT(ErrorOf(with("max_window = \"32GiB\"")),
              HasSubstr("replication.max_window: must be between 64 KiB and 16 GiB, got 32 GiB"));
  EXPECT_THAT(ErrorOf(with("min_window = 1024")),
              HasSubstr("replication.min_window: must be between 64 KiB and 16 GiB, got 1 KiB"));
  EXPECT_THAT(ErrorOf(with("max_batch_bytes = \"8MiB\"")),
              HasSubstr("replication.max_batch_bytes: must not exceed replication.min_window "
                        "(4 MiB), got 8 MiB"));
  EXPECT_THAT(ErrorOf(with("max_batch_bytes = \"128MiB\"\nmin_window = \"256MiB\"")),
              HasSubstr("replication.max_batch_bytes: must be between 4 KiB and 64 MiB, got "
                        "128 MiB"));
  EXPECT_THAT(ErrorOf(with("max_batch_delay_us = 2000000")),
              HasSubstr("replication.max_batch_delay_us: must be 0..1000000 us, got 2000000"));
  EXPECT_THAT(ErrorOf(with("keepalive_ms = 10")),
              HasSubstr("replication.keepalive_ms: must be 100..600000 ms, got 10"));
  EXPECT_THAT(ErrorOf(with("replica_sync_interval_ms = 0")),
              HasSubstr("replication.replica_sync_interval_ms: must be 1..60000 ms, got 0"));
  EXPECT_TRUE(Parse(with("min_window = \"64KiB\"\nmax_batch_bytes = \"64KiB\"")).ok());
}

// ---- [[group]] primary and [[group.peer]] ----

TEST(ReplicationConfigTest, PrimaryRules) {
  EXPECT_THAT(ErrorOf(Replace(kPair, "primary = \"site-a\"\n", "")),
              HasSubstr("test.toml:14:1: group[0].primary: required when the group has peers: "
                        "\"site-a\" (this agent) or one of \"site-b\""));
  EXPECT_THAT(ErrorOf(Replace(kPair, "primary = \"site-a\"", "primary = \"site-c\"")),
              HasSubstr("test.toml:16:1: group[0].primary: \"site-c\" is neither this agent's "
                        "site (\"site-a\") nor a peer of the group (\"site-b\")"));
  absl::StatusOr<Config> replica = Parse(Replica());
  ASSERT_TRUE(replica.ok()) << replica.status();
  EXPECT_FALSE(replica->groups[0].IsPrimary("site-a"));
  EXPECT_EQ(replica->groups[0].primary, "site-b");
}

TEST(ReplicationConfigTest, PeerSiteRules) {
  EXPECT_THAT(ErrorOf(Replace(kPair, "site = \"site-b\"\naddress", "address")),
              HasSubstr("test.toml:23:1: group[0].peer[0].site: required (the peer's site, as in "
                        "its agent.site)"));
  EXPECT_THAT(ErrorOf(Replace(kPair, "site = \"site-b\"\naddress", "site = \"Site_B\"\naddress")),
              HasSubstr("test.toml:24:1: group[0].peer[0].site: must be 1..63 characters of a-z, "
                        "0-9 and '-', got \"Site_B\""));
  EXPECT_THAT(ErrorOf(Replace(kPair, "site = \"site-b\"\naddress", "site = \"site-a\"\naddress")),
              HasSubstr("group[0].peer[0].site: \"site-a\" is this agent's own site (agent.site); "
                        "list only the other sites"));
  const std::string twice = Replace(
      kPair, "mode = \"sync\"\n",
      "mode = \"sync\"\n\n[[group.peer]]\nsite = \"site-b\"\naddress = \"10.0.0.2:7302\"\n");
  EXPECT_THAT(ErrorOf(twice),
              HasSubstr("test.toml:29:1: group[0].peer[1].site: duplicate peer site \"site-b\" "
                        "(also at group[0].peer[0].site)"));
  // The same site may be a peer of two groups.
  const std::string two_groups =
      Append(Replace(kPair, "groups = [\"g0\"]", "groups = [\"*\"]"),
             "[[group]]\nname = \"g1\"\nprimary = \"site-a\"\n[[group.volume]]\nname = \"vol1\"\n"
             "path = \"vol1.img\"\nsize = \"1GiB\"\n[[group.peer]]\nsite = \"site-b\"\n"
             "address = \"127.0.0.1:7302\"\n");
  EXPECT_TRUE(Parse(two_groups).ok()) << ErrorOf(two_groups);
}

TEST(ReplicationConfigTest, PeerAddressAndOptions) {
  auto peer = [](std::string_view from, std::string_view to) { return Replace(kPair, from, to); };
  EXPECT_THAT(ErrorOf(peer("address = \"127.0.0.1:7302\"\n", "")),
              HasSubstr("group[0].peer[0].address: required: \"host:port\" of the peer's "
                        "replication.listen"));
  EXPECT_THAT(ErrorOf(peer("\"127.0.0.1:7302\"", "\"127.0.0.1\"")),
              HasSubstr("test.toml:25:1: group[0].peer[0].address: invalid listen address "
                        "\"127.0.0.1\": missing \":port\""));
  EXPECT_THAT(ErrorOf(peer("\"127.0.0.1:7302\"", "\"site b:7302\"")),
              HasSubstr("group[0].peer[0].address: invalid address \"site b:7302\": \"site b\" is "
                        "neither an IP address nor a host name"));
  absl::StatusOr<Config> named = Parse(peer("\"127.0.0.1:7302\"", "\"site-b.example.net:7302\""));
  ASSERT_TRUE(named.ok()) << named.status();
  EXPECT_EQ(named->groups[0].peers[0].address.ToString(), "site-b.example.net:7302");

  EXPECT_THAT(ErrorOf(peer("mode = \"sync\"", "mode = \"SYNC\"")),
              HasSubstr("test.toml:26:1: group[0].peer[0].mode: must be \"async\" or \"sync\", got "
                        "\"SYNC\""));
  EXPECT_THAT(ErrorOf(peer("mode = \"sync\"", "mode = \"sync\"\ncompression = \"gzip\"")),
              HasSubstr("group[0].peer[0].compression: must be \"none\" or \"lz4\" or \"zstd\", "
                        "got \"gzip\""));
  EXPECT_THAT(ErrorOf(peer("mode = \"sync\"", "mode = \"sync\"\ntls_name = \"b_example\"")),
              HasSubstr("group[0].peer[0].tls_name: must be a DNS name (letters, digits, '-', "
                        "'.'), 1..253 characters, got \"b_example\""));
  EXPECT_TRUE(Parse(peer("mode = \"sync\"", "mode = \"sync\"\ntls_name = \"*.example.net\"")).ok());
  EXPECT_THAT(ErrorOf(peer("mode = \"sync\"", "mode = \"async\"\nsync_degrade_after_ms = 100")),
              HasSubstr("group[0].peer[0].sync_degrade_after_ms: applies only to mode = \"sync\""));
  EXPECT_THAT(
      ErrorOf(peer("mode = \"sync\"", "mode = \"sync\"\nsync_degrade_after_ms = 100000000")),
      HasSubstr("group[0].peer[0].sync_degrade_after_ms: must be 0..86400000 ms"));
  absl::StatusOr<Config> none =
      Parse(peer("mode = \"sync\"", "mode = \"sync\"\ncompression = \"none\"\nrate_limit = 1000"));
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->groups[0].peers[0].compression, Compression::kNone);
  EXPECT_EQ(none->groups[0].peers[0].rate_limit_bytes_per_second, 1000u);
}

TEST(DialAddressTest, ParsesLiteralsAndHostNames) {
  EXPECT_EQ(*ParseDialAddress("10.1.2.3:7301"), (ListenAddress{"10.1.2.3", 7301}));
  EXPECT_EQ(*ParseDialAddress("[2001:db8::1]:7301"), (ListenAddress{"2001:db8::1", 7301}));
  EXPECT_EQ(*ParseDialAddress("localhost:1"), (ListenAddress{"localhost", 1}));
  EXPECT_EQ(*ParseDialAddress("B-1.example.net:65535"), (ListenAddress{"B-1.example.net", 65535}));
  for (std::string_view bad : {"", "host", "host:", "host:0", "host:65536", "host:7x", ":7301",
                               "-host:1", "host.:1", "a..b:1", "a_b:1", "2001:db8::1:7301",
                               "[2001:db8::1:7301", "300.1.1.1:7301", "1.2.3:7301"}) {
    EXPECT_FALSE(ParseDialAddress(bad).ok()) << bad;
  }
  EXPECT_THAT(std::string(ParseDialAddress("2001:db8::1:7301").status().message()),
              HasSubstr("an IPv6 address must be in brackets"));
  EXPECT_THAT(std::string(ParseDialAddress("300.1.1.1:7301").status().message()),
              HasSubstr("\"300.1.1.1\" is not an IPv4 address"));
  EXPECT_THAT(std::string(ParseDialAddress("host:0").status().message()),
              HasSubstr("port must be 1..65535, got \"0\""));
}

// ---- [[acl]] ----

TEST(AclConfigTest, ReplicaNeedsAnEntryForItsPrimary) {
  const std::string no_acl = Replica().substr(0, Replica().find("[[acl]]"));
  EXPECT_THAT(ErrorOf(no_acl),
              HasSubstr("test.toml:16:1: group[0].primary: this agent is a replica of group "
                        "\"g0\" but no [[acl]] entry lets site \"site-b\" replicate it: add one "
                        "with identity = <CN of site-b's certificate>, site = \"site-b\", groups = "
                        "[\"g0\"]"));
  // An entry for another group does not count; "*" does.
  const std::string two_groups =
      Append(Replace(Replica(), "groups = [\"g0\"]", "groups = [\"g1\"]"),
             "[[group]]\nname = \"g1\"\nprimary = \"site-a\"\n[[group.volume]]\nname = \"vol1\"\n"
             "path = \"vol1.img\"\nsize = \"1GiB\"\n[[group.peer]]\nsite = \"site-b\"\n"
             "address = \"127.0.0.1:7302\"\n");
  EXPECT_THAT(ErrorOf(two_groups), HasSubstr("this agent is a replica of group \"g0\""));
  EXPECT_TRUE(Parse(Replace(two_groups, "groups = [\"g1\"]", "groups = [\"*\"]")).ok());
  // The primary itself needs none.
  EXPECT_TRUE(Parse(kPair.substr(0, kPair.find("[[acl]]"))).ok());
}

TEST(AclConfigTest, IdentityRules) {
  EXPECT_THAT(ErrorOf(Replace(kPair, "identity = \"*\"\n", "")),
              HasSubstr("test.toml:28:1: acl[0].identity: required (the CN or a DNS SAN of the "
                        "peer's certificate, or \"*\" with tls.insecure)"));
  EXPECT_THAT(ErrorOf(Replace(kPair, "identity = \"*\"", "identity = \"site-b\"")),
              HasSubstr("test.toml:29:1: acl[0].identity: \"site-b\" can never match: with "
                        "tls.insecure = true peers have no certificate; use identity = \"*\""));

  const std::string dir = MakeTempDir();
  WriteDummyPki(dir);
  auto tls_error = [&](const std::string& text) {
    absl::StatusOr<Config> config = ParseConfig(text, "test.toml", dir + "/site-a");
    EXPECT_FALSE(config.ok()) << text;
    return config.ok() ? std::string() : std::string(config.status().message());
  };
  const std::string tls = WithTls(kPair);
  ASSERT_TRUE(ParseConfig(tls, "test.toml", dir + "/site-a").ok());
  EXPECT_THAT(tls_error(Replace(tls, "identity = \"site-b\"", "identity = \"*\"")),
              HasSubstr("acl[0].identity: \"*\" (any peer) is accepted only with tls.insecure = "
                        "true; name the CN or a DNS SAN of the peer's certificate"));
  EXPECT_THAT(tls_error(Replace(tls, "identity = \"site-b\"", "identity = \"site b\"")),
              HasSubstr("acl[0].identity: must be printable ASCII without spaces, got \"site b\""));
  // One identity, one site: a second entry for the same certificate is refused.
  const std::string again = Append(tls,
                                   "\n[[acl]]\nidentity = \"site-b\"\nsite = \"site-c\"\n"
                                   "groups = [\"g0\"]\n");
  EXPECT_THAT(tls_error(again),
              HasSubstr("test.toml:36:1: acl[1].identity: duplicate acl identity \"site-b\" (also "
                        "at acl[0].identity): an identity acts as exactly one site"));
  std::filesystem::remove_all(dir);

  // Insecure: "*" may appear once per site.
  const std::string star_twice = Append(kPair,
                                        "[[acl]]\nidentity = \"*\"\nsite = \"site-b\"\n"
                                        "groups = [\"g0\"]\n");
  EXPECT_THAT(ErrorOf(star_twice),
              HasSubstr("acl[1].site: duplicate site for identity \"*\" \"site-b\" (also at "
                        "acl[0].site)"));
}

TEST(AclConfigTest, SiteAndGroupRules) {
  EXPECT_THAT(ErrorOf(Replace(kPair, "site = \"site-b\"\ngroups", "groups")),
              HasSubstr("acl[0].site: required (the site this identity may act as)"));
  EXPECT_THAT(ErrorOf(Replace(kPair, "site = \"site-b\"\ngroups", "site = \"B\"\ngroups")),
              HasSubstr("test.toml:30:1: acl[0].site: must be 1..63 characters of a-z, 0-9 and "
                        "'-', got \"B\""));
  EXPECT_THAT(ErrorOf(Replace(kPair, "site = \"site-b\"\ngroups", "site = \"site-a\"\ngroups")),
              HasSubstr("acl[0].site: \"site-a\" is this agent's own site"));
  EXPECT_THAT(ErrorOf(Replace(kPair, "groups = [\"g0\"]\n", "")),
              HasSubstr("acl[0].groups: required: the groups this identity may replicate, e.g. "
                        "[\"g0\"], or [\"*\"]"));
  EXPECT_THAT(ErrorOf(Replace(kPair, "groups = [\"g0\"]", "groups = []")),
              HasSubstr("test.toml:31:1: acl[0].groups: required"));
  EXPECT_THAT(ErrorOf(Replace(kPair, "groups = [\"g0\"]", "groups = [\"g0\", \"g9\"]")),
              HasSubstr("test.toml:31:"));
  EXPECT_THAT(ErrorOf(Replace(kPair, "groups = [\"g0\"]", "groups = [\"g0\", \"g9\"]")),
              HasSubstr("acl[0].groups[1]: unknown group \"g9\" (groups of this agent: g0)"));
  EXPECT_THAT(ErrorOf(Replace(kPair, "groups = [\"g0\"]", "groups = [\"g0\", \"*\"]")),
              HasSubstr("acl[0].groups[1]: \"*\" means every group and must be the only element"));
  // The site must be a peer of what it may replicate: a typo in either is caught.
  EXPECT_THAT(ErrorOf(Replace(kPair, "site = \"site-b\"\ngroups", "site = \"site-x\"\ngroups")),
              HasSubstr("acl[0].groups[0]: site \"site-x\" is not a peer of group \"g0\""));
  EXPECT_THAT(
      ErrorOf(Replace(Replace(kPair, "site = \"site-b\"\ngroups", "site = \"site-x\"\ngroups"),
                      "[\"g0\"]", "[\"*\"]")),
      HasSubstr("acl[0].site: \"site-x\" is not a peer of any group"));
  EXPECT_TRUE(Parse(Replace(kPair, "[\"g0\"]", "[\"*\"]")).ok());
}

TEST(AclConfigTest, AuthorizePeer) {
  const std::string dir = MakeTempDir();
  WriteDummyPki(dir);
  // site-b (this agent) replica of g0 and g1 from site-a; site-c may replicate g1 only.
  const std::string text = R"([agent]
site = "site-b"
[nbd]
listen = ["127.0.0.1:10909"]
[tls]
ca = "../pki/ca.pem"
cert = "../pki/site-b.pem"
key = "../pki/site-b.key"
[replication]
listen = "127.0.0.1:7302"
[[group]]
name = "g0"
primary = "site-a"
[[group.volume]]
name = "vol0"
path = "vol0.img"
size = "1GiB"
[[group.peer]]
site = "site-a"
address = "127.0.0.1:7301"
[[group]]
name = "g1"
primary = "site-c"
[[group.volume]]
name = "vol1"
path = "vol1.img"
size = "1GiB"
[[group.peer]]
site = "site-a"
address = "127.0.0.1:7301"
[[group.peer]]
site = "site-c"
address = "127.0.0.1:7303"
[[acl]]
identity = "site-a.example.net"
site = "site-a"
groups = ["*"]
[[acl]]
identity = "site-c"
site = "site-c"
groups = ["g1"]
)";
  absl::StatusOr<Config> config = ParseConfig(text, "test.toml", dir + "/site-b");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(AuthorizePeer(*config, {"site-a.example.net"}, "site-a", "g0").ok());
  EXPECT_TRUE(AuthorizePeer(*config, {"x", "site-a.example.net"}, "site-a", "g1").ok());
  EXPECT_TRUE(AuthorizePeer(*config, {"site-c"}, "site-c", "g1").ok());

  // Tenant site-c cannot write g0, nor pose as site-a.
  absl::Status status = AuthorizePeer(*config, {"site-c"}, "site-c", "g0");
  EXPECT_EQ(status.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("not authorised: site \"site-c\" (identity \"site-c\") may not replicate "
                        "group \"g0\" (its [[acl]] allows: g1)"));
  status = AuthorizePeer(*config, {"site-c"}, "site-a", "g0");
  EXPECT_EQ(status.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("not authorised: identity \"site-c\" may act as site \"site-c\" only, not "
                        "\"site-a\""));
  status = AuthorizePeer(*config, {"mallory"}, "site-a", "g0");
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("not authorised: no [[acl]] entry for identity \"mallory\" (claiming site "
                        "\"site-a\", group \"g0\")"));
  EXPECT_THAT(std::string(AuthorizePeer(*config, {}, "site-a", "g0").message()),
              HasSubstr("identity (no certificate)"));

  // Insecure mode: "*" entries match without a certificate, still bound to their site and groups.
  absl::StatusOr<Config> insecure = Parse(kPair);
  ASSERT_TRUE(insecure.ok()) << insecure.status();
  EXPECT_TRUE(AuthorizePeer(*insecure, {}, "site-b", "g0").ok());
  EXPECT_FALSE(AuthorizePeer(*insecure, {}, "site-c", "g0").ok());
  EXPECT_FALSE(AuthorizePeer(*insecure, {}, "site-b", "g1").ok());
  // A "*" entry built in code never matches with TLS on.
  Config widened = *config;
  widened.acl.push_back(AclConfig{"*", "site-c", {"*"}});
  EXPECT_FALSE(AuthorizePeer(widened, {"anyone"}, "site-c", "g0").ok());
  std::filesystem::remove_all(dir);
}

// ---- [control] ----

TEST(ReplicationConfigTest, ControlSocket) {
  absl::StatusOr<Config> absolute =
      Parse(Append(kMinimal, "[control]\nunix_socket = \"/run/tvilling/ctl.sock\"\n"));
  ASSERT_TRUE(absolute.ok()) << absolute.status();
  EXPECT_EQ(absolute->control.unix_socket, "/run/tvilling/ctl.sock");
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[control]\nunix_socket = \"\"\n")),
              HasSubstr("test.toml:16:1: control.unix_socket: must not be empty"));
  EXPECT_THAT(
      ErrorOf(Append(kMinimal, "[control]\nunix_socket = \"" + std::string(120, 'x') + "\"\n")),
      HasSubstr("control.unix_socket: \"/srv/t/xxxx"));
  EXPECT_THAT(
      ErrorOf(Append(kMinimal, "[control]\nunix_socket = \"" + std::string(120, 'x') + "\"\n")),
      HasSubstr("a unix socket path must be at most 107 bytes"));
  EXPECT_THAT(ErrorOf(Replace(kMinimal, "[nbd]", "[nbd]\nunix_sockets = [\"tvillingd.sock\"]")),
              HasSubstr("control.unix_socket: \"/srv/t/tvillingd.sock\" is also "
                        "nbd.unix_sockets[0]"));
}

TEST(MetricsConfigTest, ListenIsOptionalAndValidated) {
  absl::StatusOr<Config> none = Parse(kMinimal);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->metrics.listen.has_value());

  absl::StatusOr<Config> set = Parse(Append(kMinimal, "[metrics]\nlisten = \"127.0.0.1:9464\"\n"));
  ASSERT_TRUE(set.ok()) << set.status();
  ASSERT_TRUE(set->metrics.listen.has_value());
  EXPECT_EQ(*set->metrics.listen, (ListenAddress{"127.0.0.1", 9464}));
  absl::StatusOr<Config> v6 = Parse(Append(kMinimal, "[metrics]\nlisten = \"[::]:9464\"\n"));
  ASSERT_TRUE(v6.ok()) << v6.status();
  EXPECT_EQ(v6->metrics.listen->ToString(), "[::]:9464");

  // Bad input names the file, line, key and what is wrong.
  EXPECT_THAT(
      ErrorOf(Append(kMinimal, "[metrics]\nlisten = \"localhost:9464\"\n")),
      HasSubstr("test.toml:16:1: metrics.listen: invalid listen address \"localhost:9464\""));
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[metrics]\nlisten = \"127.0.0.1:0\"\n")),
              HasSubstr("metrics.listen:"));
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[metrics]\nlisten = 9464\n")),
              HasSubstr("metrics.listen: expected a string"));
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[metrics]\nlisten = \"127.0.0.1:10809\"\n")),
              HasSubstr("metrics.listen: \"127.0.0.1:10809\" is also nbd.listen[0]"));
  EXPECT_THAT(ErrorOf(Append(kMinimal, "[metrics]\nlisen = \"127.0.0.1:9464\"\n")),
              HasSubstr("unknown key \"lisen\" (did you mean \"listen\"?)"));
}

// ---- the shipped replication examples ----

// Loads `relative` (under deploy/examples) with the state dir <root>/<site> and the PKI at
// <root>/pki, as the quick start lays them out.
absl::StatusOr<Config> LoadExample(const std::string& root, std::string_view relative,
                                   std::string_view site) {
  return LoadConfig(std::filesystem::path(TVILLING_SOURCE_DIR) / "deploy/examples" / relative,
                    std::filesystem::path(root) / site);
}

TEST(LoadConfigTest, EveryExampleConfigLoads) {
  const std::string root = MakeTempDir();
  WriteDummyPki(root);
  const std::filesystem::path examples =
      std::filesystem::path(TVILLING_SOURCE_DIR) / "deploy/examples";
  size_t loaded = 0;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(examples)) {
    if (entry.path().extension() != ".toml") continue;
    // Read the site first, to give each agent its own state dir next to the PKI.
    absl::StatusOr<Config> config = LoadConfig(entry.path(), root + "/any");
    if (config.ok()) config = LoadConfig(entry.path(), root + "/" + config->agent.site);
    EXPECT_TRUE(config.ok()) << entry.path() << ": " << config.status();
    ++loaded;
  }
  EXPECT_GE(loaded, 6u);  // single-node, site-a, site-b, three-sites/{a,b,c}
  std::filesystem::remove_all(root);
}

TEST(LoadConfigTest, TwoSiteExamplesMatchEachOther) {
  const std::string root = MakeTempDir();
  WriteDummyPki(root);
  absl::StatusOr<Config> a = LoadExample(root, "site-a.toml", "site-a");
  absl::StatusOr<Config> b = LoadExample(root, "site-b.toml", "site-b");
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->agent.site, "site-a");
  EXPECT_EQ(b->agent.site, "site-b");
  EXPECT_TRUE(a->tls.enabled());
  EXPECT_EQ(a->tls.ca, root + "/pki/ca.pem");
  EXPECT_EQ(a->tls.cert, root + "/pki/site-a.pem");
  EXPECT_EQ(b->tls.key, root + "/pki/site-b.key");
  EXPECT_EQ(a->nbd.listen[0].ToString(), "127.0.0.1:10809");
  EXPECT_EQ(b->nbd.listen[0].ToString(), "127.0.0.1:10909");
  EXPECT_EQ(a->replication.listen->ToString(), "127.0.0.1:7301");
  EXPECT_EQ(b->replication.listen->ToString(), "127.0.0.1:7302");
  EXPECT_EQ(a->control.unix_socket, root + "/site-a/tvillingd.sock");
  ASSERT_EQ(a->groups.size(), 1u);
  ASSERT_EQ(b->groups.size(), 1u);
  const GroupConfig& ga = a->groups[0];
  const GroupConfig& gb = b->groups[0];
  EXPECT_EQ(ga.name, "g0");
  EXPECT_EQ(gb.name, "g0");
  EXPECT_TRUE(ga.IsPrimary("site-a"));
  EXPECT_FALSE(gb.IsPrimary("site-b"));
  EXPECT_EQ(gb.primary, "site-a");
  // Same volume on both sides.
  ASSERT_EQ(ga.volumes.size(), 1u);
  ASSERT_EQ(gb.volumes.size(), 1u);
  EXPECT_EQ(ga.volumes[0].name, "vol0");
  EXPECT_EQ(gb.volumes[0].name, "vol0");
  EXPECT_EQ(ga.volumes[0].size_bytes, 1ull << 30);
  EXPECT_EQ(gb.volumes[0].size_bytes, ga.volumes[0].size_bytes);
  // Each dials the other's listener, in sync mode.
  ASSERT_EQ(ga.peers.size(), 1u);
  ASSERT_EQ(gb.peers.size(), 1u);
  EXPECT_EQ(ga.peers[0].site, "site-b");
  EXPECT_EQ(ga.peers[0].address, *b->replication.listen);
  EXPECT_EQ(ga.peers[0].mode, PeerMode::kSync);
  EXPECT_EQ(gb.peers[0].site, "site-a");
  EXPECT_EQ(gb.peers[0].address, *a->replication.listen);
  // site-b lets site-a's certificate (CN site-a) replicate g0; a and b let nothing else in.
  EXPECT_TRUE(AuthorizePeer(*b, {"site-a"}, "site-a", "g0").ok());
  EXPECT_FALSE(AuthorizePeer(*b, {"site-c"}, "site-a", "g0").ok());
  EXPECT_TRUE(AuthorizePeer(*a, {"site-b"}, "site-b", "g0").ok());
  EXPECT_FALSE(AuthorizePeer(*a, {"site-a"}, "site-a", "g0").ok());
  std::filesystem::remove_all(root);
}

TEST(LoadConfigTest, ThreeSiteExamplesMatchEachOther) {
  const std::string root = MakeTempDir();
  WriteDummyPki(root);
  const std::pair<std::string_view, std::string_view> files[] = {{"three-sites/a.toml", "site-a"},
                                                                 {"three-sites/b.toml", "site-b"},
                                                                 {"three-sites/c.toml", "site-c"}};
  std::map<std::string, Config> by_site;
  for (const auto& [file, site] : files) {
    absl::StatusOr<Config> config = LoadExample(root, file, site);
    ASSERT_TRUE(config.ok()) << file << ": " << config.status();
    EXPECT_EQ(config->agent.site, site);
    by_site.emplace(std::string(site), *config);
  }
  EXPECT_EQ(by_site["site-c"].nbd.listen[0].ToString(), "127.0.0.1:11009");
  EXPECT_EQ(by_site["site-c"].replication.listen->ToString(), "127.0.0.1:7303");
  for (const auto& [site, config] : by_site) {
    ASSERT_EQ(config.groups.size(), 1u);
    const GroupConfig& group = config.groups[0];
    EXPECT_EQ(group.primary, "site-a") << site;
    ASSERT_EQ(group.peers.size(), 2u) << site;
    for (const PeerConfig& peer : group.peers) {
      // Every peer address is that site's listener, and every peer is let in.
      EXPECT_EQ(peer.address, *by_site[peer.site].replication.listen)
          << site << " -> " << peer.site;
      EXPECT_TRUE(AuthorizePeer(config, {peer.site}, peer.site, "g0").ok())
          << site << " <- " << peer.site;
    }
  }
  const GroupConfig& primary = by_site["site-a"].groups[0];
  EXPECT_EQ(primary.peers[0].site, "site-b");
  EXPECT_EQ(primary.peers[0].mode, PeerMode::kSync);
  EXPECT_EQ(primary.peers[1].site, "site-c");
  EXPECT_EQ(primary.peers[1].mode, PeerMode::kAsync);
  std::filesystem::remove_all(root);
}

}  // namespace
}  // namespace tvilling::ops
