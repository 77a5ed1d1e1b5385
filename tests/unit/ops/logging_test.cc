// logging_test.cc: tvillingd's log lines: text and JSON, journald mode (priority prefix, no
// timestamp), escaping that keeps one event on one line, fields, levels, and $JOURNAL_STREAM
// detection.
#include "agent/ops/logging.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <sstream>
#include <string>

namespace tvilling::ops {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// 2024-05-01T12:00:00.123456Z
const spdlog::log_clock::time_point kTime =
    spdlog::log_clock::time_point(std::chrono::seconds(1714564800)) +
    std::chrono::microseconds(123456);

std::string FormatOne(LogFormat format, bool journal, spdlog::level::level_enum level,
                      std::string_view payload) {
  spdlog::details::log_msg msg(spdlog::source_loc{}, "t", level,
                               spdlog::string_view_t(payload.data(), payload.size()));
  msg.time = kTime;
  spdlog::memory_buf_t out;
  MakeLogFormatter(format, journal)->format(msg, out);
  return std::string(out.data(), out.size());
}

TEST(LoggingTest, ParseLogLevel) {
  EXPECT_EQ(*ParseLogLevel("trace"), spdlog::level::trace);
  EXPECT_EQ(*ParseLogLevel("debug"), spdlog::level::debug);
  EXPECT_EQ(*ParseLogLevel("info"), spdlog::level::info);
  EXPECT_EQ(*ParseLogLevel("warn"), spdlog::level::warn);
  EXPECT_EQ(*ParseLogLevel("warning"), spdlog::level::warn);
  EXPECT_EQ(*ParseLogLevel("error"), spdlog::level::err);
  EXPECT_EQ(*ParseLogLevel("critical"), spdlog::level::critical);
  absl::StatusOr<spdlog::level::level_enum> bad = ParseLogLevel("verbose");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()),
              HasSubstr("invalid log level \"verbose\": want trace, debug, info, warn, error or "
                        "critical"));
  EXPECT_FALSE(ParseLogLevel("INFO").ok());
}

TEST(LoggingTest, ParseLogFormat) {
  EXPECT_EQ(*ParseLogFormat("text"), LogFormat::kText);
  EXPECT_EQ(*ParseLogFormat("json"), LogFormat::kJson);
  EXPECT_THAT(std::string(ParseLogFormat("yaml").status().message()),
              HasSubstr("invalid log format \"yaml\": want text or json"));
}

TEST(LoggingTest, TextLineHasAnIsoTimestampInUtc) {
  EXPECT_EQ(FormatOne(LogFormat::kText, false, spdlog::level::info, "hello"),
            "2024-05-01T12:00:00.123456Z info hello\n");
  EXPECT_EQ(FormatOne(LogFormat::kText, false, spdlog::level::err, "bad"),
            "2024-05-01T12:00:00.123456Z error bad\n");
}

TEST(LoggingTest, JournalTextHasPriorityAndNoTimestamp) {
  EXPECT_EQ(FormatOne(LogFormat::kText, true, spdlog::level::info, "hello"), "<6>info hello\n");
  EXPECT_EQ(FormatOne(LogFormat::kText, true, spdlog::level::warn, "w"), "<4>warn w\n");
  EXPECT_EQ(FormatOne(LogFormat::kText, true, spdlog::level::err, "e"), "<3>error e\n");
  EXPECT_EQ(FormatOne(LogFormat::kText, true, spdlog::level::critical, "c"), "<2>critical c\n");
  EXPECT_EQ(FormatOne(LogFormat::kText, true, spdlog::level::debug, "d"), "<7>debug d\n");
}

TEST(LoggingTest, TextKeepsOneEventOnOneLine) {
  EXPECT_EQ(FormatOne(LogFormat::kText, true, spdlog::level::info, "a\nb\tc\x01"),
            "<6>info a\\nb\\tc\\x01\n");
}

TEST(LoggingTest, JsonLine) {
  EXPECT_EQ(FormatOne(LogFormat::kJson, false, spdlog::level::warn, "say \"hi\"\\\n\x02"),
            "{\"ts\":\"2024-05-01T12:00:00.123456Z\",\"level\":\"warn\",\"msg\":\"say "
            "\\\"hi\\\"\\\\\\n\\u0002\"}\n");
  // Journald: the prefix is stripped by journald, leaving pure JSON in MESSAGE.
  EXPECT_EQ(FormatOne(LogFormat::kJson, true, spdlog::level::info, "x"),
            "<6>{\"ts\":\"2024-05-01T12:00:00.123456Z\",\"level\":\"info\",\"msg\":\"x\"}\n");
}

class LoggingSinkTest : public ::testing::Test {
 protected:
  void SetUp() override { previous_ = spdlog::default_logger(); }
  void TearDown() override { spdlog::set_default_logger(previous_); }

  void Setup(LogFormat format, spdlog::level::level_enum level) {
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out_);
    SetupLogging(LoggingOptions{.level = level, .format = format, .journal = false}, sink);
  }

  std::ostringstream out_;
  std::shared_ptr<spdlog::logger> previous_;
};

TEST_F(LoggingSinkTest, JsonFields) {
  Setup(LogFormat::kJson, spdlog::level::info);
  Log(spdlog::level::info, "group opened",
      {{"group", "g0"},
       {"last_lsn", uint64_t{42}},
       {"lag", -3},
       {"sync", true},
       {"path", std::string("/a \"b\"")}});
  EXPECT_THAT(out_.str(), HasSubstr("\"level\":\"info\",\"msg\":\"group opened\",\"group\":\"g0\","
                                    "\"last_lsn\":42,\"lag\":-3,\"sync\":true,"
                                    "\"path\":\"/a \\\"b\\\"\"}\n"));
  EXPECT_EQ(out_.str().rfind("{\"ts\":\"", 0), 0u) << out_.str();
}

TEST_F(LoggingSinkTest, TextFields) {
  Setup(LogFormat::kText, spdlog::level::info);
  Log(spdlog::level::warn, "peer lagging",
      {{"peer", "sun-2"}, {"lag_bytes", 1024}, {"note", "two words"}, {"empty", ""}});
  EXPECT_THAT(out_.str(),
              HasSubstr(" warn peer lagging peer=sun-2 lag_bytes=1024 note=\"two words\" "
                        "empty=\"\"\n"));
}

TEST_F(LoggingSinkTest, LevelFiltersAndPlainSpdlogCallsWork) {
  Setup(LogFormat::kText, spdlog::level::warn);
  spdlog::info("hidden {}", 1);
  Log(spdlog::level::info, "hidden too", {{"k", 1}});
  spdlog::warn("shown {}", 2);
  spdlog::error("also shown");
  const std::string text = out_.str();
  EXPECT_THAT(text, Not(HasSubstr("hidden")));
  EXPECT_THAT(text, HasSubstr(" warn shown 2\n"));
  EXPECT_THAT(text, HasSubstr(" error also shown\n"));
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 2);
}

TEST_F(LoggingSinkTest, RepeatsAreLoggedOncePerWindowAndCounted) {
  Setup(LogFormat::kJson, spdlog::level::info);
  for (int i = 0; i < 5; ++i) {
    Log(spdlog::level::warn, "cannot connect", {{"peer", "site-b"}, {"error", "refused"}});
  }
  Log(spdlog::level::warn, "cannot connect", {{"peer", "site-c"}, {"error", "refused"}});
  spdlog::info("connected");
  const std::string text = out_.str();
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 4) << text;
  const size_t first = text.find("\"peer\":\"site-b\"");
  ASSERT_NE(first, std::string::npos);
  EXPECT_EQ(text.find("\"peer\":\"site-b\"", first + 1), std::string::npos) << text;
  const size_t skipped = text.find("\"msg\":\"Skipped 4 duplicate messages..\"");
  ASSERT_NE(skipped, std::string::npos) << text;
  EXPECT_LT(skipped, text.find("\"peer\":\"site-c\""));
  EXPECT_THAT(text, HasSubstr("\"msg\":\"connected\""));
}

TEST_F(LoggingSinkTest, RepeatWindowZeroLogsEveryLine) {
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out_);
  SetupLogging(LoggingOptions{.level = spdlog::level::info,
                              .format = LogFormat::kText,
                              .journal = false,
                              .repeat_window = std::chrono::milliseconds(0)},
               sink);
  for (int i = 0; i < 3; ++i) spdlog::warn("same");
  const std::string text = out_.str();
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 3) << text;
}

TEST_F(LoggingSinkTest, SeparatorBytesInDataCannotForgeFields) {
  Setup(LogFormat::kJson, spdlog::level::info);
  Log(spdlog::level::info,
      "m\x1f"
      "evil\x1esx",
      {{"k\x1f",
        "v\x1f"
        "evil\x1erx"}});
  EXPECT_THAT(out_.str(), HasSubstr("\"msg\":\"m?evil?sx\",\"k?\":\"v?evil?rx\"}"));
  EXPECT_THAT(out_.str(), Not(HasSubstr("\"evil\"")));
}

TEST(LoggingTest, StreamIsJournalComparesDeviceAndInode) {
  std::string path = ::testing::TempDir() + "/ops_journal_XXXXXX";
  const int fd = ::mkstemp(path.data());
  ASSERT_GE(fd, 0);
  struct stat st {};
  ASSERT_EQ(::fstat(fd, &st), 0);
  const std::string match = std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino);
  const std::string other = std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino + 1);

  ::unsetenv("JOURNAL_STREAM");
  EXPECT_FALSE(StreamIsJournal(fd));
  ::setenv("JOURNAL_STREAM", match.c_str(), 1);
  EXPECT_TRUE(StreamIsJournal(fd));
  ::setenv("JOURNAL_STREAM", other.c_str(), 1);
  EXPECT_FALSE(StreamIsJournal(fd));
  ::setenv("JOURNAL_STREAM", (match + "x").c_str(), 1);
  EXPECT_FALSE(StreamIsJournal(fd));
  ::setenv("JOURNAL_STREAM", "garbage", 1);
  EXPECT_FALSE(StreamIsJournal(fd));
  ::unsetenv("JOURNAL_STREAM");
  ::close(fd);
  ::unlink(path.c_str());
}

}  // namespace
}  // namespace tvilling::ops
