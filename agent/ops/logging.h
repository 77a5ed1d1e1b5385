// logging.h: tvillingd's own log (spdlog): one line per event on stderr, as text or JSON lines.
//
// Text:  2024-05-01T12:00:00.123456Z info group opened group=g0 last_lsn=42
// JSON:  {"ts":"2024-05-01T12:00:00.123456Z","level":"info","msg":"group opened","group":"g0",
//         "last_lsn":42}
//
// Under systemd (stderr is the stream named by $JOURNAL_STREAM) text lines carry no timestamp,
// since journald adds its own, and every line starts with a syslog priority prefix ("<6>") that
// journald turns into the entry's priority and strips. Messages are one line: newlines and other
// control characters are escaped. Consecutive repeats of one line are logged once per window
// (LoggingOptions::repeat_window).
//
// Code logs with spdlog as usual (spdlog::info("...")); Log() adds key=value fields.
#pragma once

#include <absl/status/statusor.h>
#include <spdlog/common.h>
#include <spdlog/formatter.h>

#include <chrono>
#include <concepts>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace tvilling::ops {

enum class LogFormat { kText, kJson };

struct LoggingOptions {
  spdlog::level::level_enum level = spdlog::level::info;
  LogFormat format = LogFormat::kText;
  // Journald mode (no timestamps in text, "<N>" priority prefixes). Unset = StderrIsJournal().
  std::optional<bool> journal;
  // Repeats of the line just logged (same level-independent text and fields) within this window
  // are dropped and counted; the next different line is preceded by "Skipped N duplicate
  // messages..". A link that fails every second then logs once per window. 0 = log every line.
  std::chrono::milliseconds repeat_window{10'000};
};

// "trace", "debug", "info", "warn" (or "warning"), "error", "critical".
[[nodiscard]] absl::StatusOr<spdlog::level::level_enum> ParseLogLevel(std::string_view text);
// "text" or "json".
[[nodiscard]] absl::StatusOr<LogFormat> ParseLogFormat(std::string_view text);

// Whether `fd` is the stream systemd connected to journald: $JOURNAL_STREAM is "<dev>:<inode>" of
// it. Comparing with fstat (as sd_journal_stream_fd(3) advises) keeps a child whose stderr was
// redirected from inheriting journald mode with the variable.
[[nodiscard]] bool StreamIsJournal(int fd);
[[nodiscard]] inline bool StderrIsJournal() { return StreamIsJournal(2); }

// The formatter SetupLogging installs; exposed for tests.
[[nodiscard]] std::unique_ptr<spdlog::formatter> MakeLogFormatter(LogFormat format, bool journal);

// Replaces spdlog's default logger with one that writes to `sink` (nullptr = stderr) in the given
// level and format. Call once at startup, before other threads log.
void SetupLogging(const LoggingOptions& options, spdlog::sink_ptr sink = nullptr);

// A key=value field of a log event. Numbers and booleans stay numbers and booleans in JSON.
struct LogField {
  LogField(std::string_view k, std::string_view v) : key(k), value(v) {}
  LogField(std::string_view k, const char* v) : key(k), value(v) {}
  LogField(std::string_view k, const std::string& v) : key(k), value(v) {}
  LogField(std::string_view k, bool v) : key(k), value(v ? "true" : "false"), raw(true) {}
  template <std::integral T>
  LogField(std::string_view k, T v) : key(k), value(std::to_string(v)), raw(true) {}

  std::string key;
  std::string value;
  bool raw = false;  // a JSON number or boolean: emitted without quotes
};

// Logs `message` with fields through the default logger, e.g.
//   Log(spdlog::level::warn, "peer lagging", {{"peer", "sun-2"}, {"lag_bytes", lag_bytes}});
void Log(spdlog::level::level_enum level, std::string_view message,
         std::initializer_list<LogField> fields);

}  // namespace tvilling::ops
