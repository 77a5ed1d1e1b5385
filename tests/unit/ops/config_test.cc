// config_test.cc: tvillingd's config: every validation rule and its message (file name and key
// path), sizes, listen addresses, unknown keys, parse errors with line:col, defaults, state-dir
// resolution, and the example config shipped in deploy/examples.
#include "agent/ops/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <fstream>
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
retention_bytes = "1GiB"
retention_seconds = 3600
hard_cap = "2GiB"
checkpoint_interval_ms = 250
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
  EXPECT_EQ(config->log.retention_bytes, 1ull << 30);
  EXPECT_EQ(config->log.retention_seconds, 3600u);
  EXPECT_EQ(config->log.hard_cap_bytes, 2ull << 30);
  EXPECT_EQ(config->log.checkpoint_interval_ms, 250u);
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
              HasSubstr("group[0].colour: unknown key \"colour\" (known keys here: name, volume)"));
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

}  // namespace
}  // namespace tvilling::ops
