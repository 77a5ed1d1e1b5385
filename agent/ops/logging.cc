// logging.cc: the line formatter (text or JSON) behind tvillingd's spdlog logger, and its setup.
//
// Fields travel inside the spdlog payload, after the message, as
//   \x1f <key> \x1e <'r' raw | 's' string> <value>
// so that they pass through spdlog untouched and the formatter alone decides how to render them.
// Log() strips these two separator bytes from keys and values, so they cannot be forged by data.
#include "agent/ops/logging.h"

#include <fmt/format.h>
#include <spdlog/logger.h>
#include <spdlog/sinks/dup_filter_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <time.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdlib>
#include <iterator>

namespace tvilling::ops {
namespace {

constexpr char kFieldSeparator = '\x1f';
constexpr char kValueSeparator = '\x1e';

std::string_view LevelName(spdlog::level::level_enum level) {
  switch (level) {
    case spdlog::level::trace:
      return "trace";
    case spdlog::level::debug:
      return "debug";
    case spdlog::level::info:
      return "info";
    case spdlog::level::warn:
      return "warn";
    case spdlog::level::err:
      return "error";
    case spdlog::level::critical:
      return "critical";
    default:
      return "off";
  }
}

// sd-daemon(3) priorities: journald reads "<N>" at the start of a line as the entry's priority.
int SyslogPriority(spdlog::level::level_enum level) {
  switch (level) {
    case spdlog::level::trace:
    case spdlog::level::debug:
      return 7;
    case spdlog::level::info:
      return 6;
    case spdlog::level::warn:
      return 4;
    case spdlog::level::err:
      return 3;
    default:
      return 2;
  }
}

bool IsControl(char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; }

// Keeps a text line one line: control characters become \n, \t, \r or \xNN.
void AppendEscapedText(std::string_view text, spdlog::memory_buf_t& out) {
  for (char c : text) {
    if (!IsControl(c)) {
      out.push_back(c);
    } else if (c == '\n') {
      out.append(std::string_view("\\n"));
    } else if (c == '\t') {
      out.append(std::string_view("\\t"));
    } else if (c == '\r') {
      out.append(std::string_view("\\r"));
    } else {
      fmt::format_to(std::back_inserter(out), "\\x{:02x}", static_cast<unsigned char>(c));
    }
  }
}

// A text field value: bare if it is a simple token, else quoted with " and \ escaped.
void AppendTextValue(std::string_view value, spdlog::memory_buf_t& out) {
  const bool bare = !value.empty() && value.find_first_of(" \"=\\") == std::string_view::npos &&
                    std::none_of(value.begin(), value.end(), IsControl);
  if (bare) {
    out.append(value);
    return;
  }
  out.push_back('"');
  for (char c : value) {
    if (c == '"' || c == '\\') out.push_back('\\');
    AppendEscapedText(std::string_view(&c, 1), out);
  }
  out.push_back('"');
}

void AppendJsonString(std::string_view text, spdlog::memory_buf_t& out) {
  out.push_back('"');
  for (char c : text) {
    switch (c) {
      case '"':
        out.append(std::string_view("\\\""));
        break;
      case '\\':
        out.append(std::string_view("\\\\"));
        break;
      case '\n':
        out.append(std::string_view("\\n"));
        break;
      case '\r':
        out.append(std::string_view("\\r"));
        break;
      case '\t':
        out.append(std::string_view("\\t"));
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          fmt::format_to(std::back_inserter(out), "\\u{:04x}", static_cast<unsigned char>(c));
        } else {
          out.push_back(c);
        }
    }
  }
  out.push_back('"');
}

// ISO 8601 in UTC with microseconds: 2024-05-01T12:00:00.123456Z.
void AppendTimestamp(spdlog::log_clock::time_point time, spdlog::memory_buf_t& out) {
  const auto since_epoch_us =
      std::chrono::duration_cast<std::chrono::microseconds>(time.time_since_epoch()).count();
  const time_t seconds = static_cast<time_t>(since_epoch_us / 1'000'000);
  const int64_t micros = since_epoch_us % 1'000'000;
  struct tm utc {};
  gmtime_r(&seconds, &utc);
  fmt::format_to(std::back_inserter(out), "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
                 utc.tm_year + 1900, utc.tm_mon + 1, utc.tm_mday, utc.tm_hour, utc.tm_min,
                 utc.tm_sec, micros);
}

struct ParsedField {
  std::string_view key;
  std::string_view value;
  bool raw = false;
};

// Calls fn(field) for each field encoded after the message; returns the message.
template <typename Fn>
std::string_view SplitPayload(std::string_view payload, Fn fn) {
  size_t cut = payload.find(kFieldSeparator);
  const std::string_view message = payload.substr(0, cut);
  while (cut != std::string_view::npos) {
    const size_t next = payload.find(kFieldSeparator, cut + 1);
    std::string_view field = payload.substr(
        cut + 1, next == std::string_view::npos ? std::string_view::npos : next - cut - 1);
    const size_t sep = field.find(kValueSeparator);
    if (sep != std::string_view::npos && sep + 1 < field.size()) {
      fn(ParsedField{field.substr(0, sep), field.substr(sep + 2), field[sep + 1] == 'r'});
    }
    cut = next;
  }
  return message;
}

class LineFormatter final : public spdlog::formatter {
 public:
  LineFormatter(LogFormat format, bool journal) : format_(format), journal_(journal) {}

  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    if (journal_) fmt::format_to(std::back_inserter(dest), "<{}>", SyslogPriority(msg.level));
    const std::string_view payload(msg.payload.data(), msg.payload.size());
    if (format_ == LogFormat::kJson) {
      FormatJson(msg, payload, dest);
    } else {
      FormatText(msg, payload, dest);
    }
    dest.push_back('\n');
  }

  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<LineFormatter>(format_, journal_);
  }

 private:
  void FormatText(const spdlog::details::log_msg& msg, std::string_view payload,
                  spdlog::memory_buf_t& dest) const {
    if (!journal_) {
      AppendTimestamp(msg.time, dest);
      dest.push_back(' ');
    }
    dest.append(LevelName(msg.level));
    dest.push_back(' ');
    spdlog::memory_buf_t fields;
    const std::string_view message = SplitPayload(payload, [&](const ParsedField& f) {
      fields.push_back(' ');
      AppendEscapedText(f.key, fields);
      fields.push_back('=');
      AppendTextValue(f.value, fields);
    });
    AppendEscapedText(message, dest);
    dest.append(fields);
  }

  // Fields come after ts, level and msg; a field named like one of those is emitted anyway (JSON
  // readers keep the last), so callers should not use those three names.
  void FormatJson(const spdlog::details::log_msg& msg, std::string_view payload,
                  spdlog::memory_buf_t& dest) const {
    dest.append(std::string_view("{\"ts\":\""));
    AppendTimestamp(msg.time, dest);
    dest.append(std::string_view("\",\"level\":\""));
    dest.append(LevelName(msg.level));
    dest.append(std::string_view("\",\"msg\":"));
    spdlog::memory_buf_t fields;
    const std::string_view message = SplitPayload(payload, [&](const ParsedField& f) {
      fields.push_back(',');
      AppendJsonString(f.key, fields);
      fields.push_back(':');
      if (f.raw) {
        fields.append(f.value);
      } else {
        AppendJsonString(f.value, fields);
      }
    });
    AppendJsonString(message, dest);
    dest.append(fields);
    dest.push_back('}');
  }

  const LogFormat format_;
  const bool journal_;
};

void AppendClean(std::string_view text, std::string& out) {
  for (char c : text) out.push_back(c == kFieldSeparator || c == kValueSeparator ? '?' : c);
}

}  // namespace

absl::StatusOr<spdlog::level::level_enum> ParseLogLevel(std::string_view text) {
  static constexpr std::pair<std::string_view, spdlog::level::level_enum> kLevels[] = {
      {"trace", spdlog::level::trace},      {"debug", spdlog::level::debug},
      {"info", spdlog::level::info},        {"warn", spdlog::level::warn},
      {"warning", spdlog::level::warn},     {"error", spdlog::level::err},
      {"critical", spdlog::level::critical}};
  for (const auto& [name, level] : kLevels) {
    if (text == name) return level;
  }
  return absl::InvalidArgumentError(fmt::format(
      "invalid log level \"{}\": want trace, debug, info, warn, error or critical", text));
}

absl::StatusOr<LogFormat> ParseLogFormat(std::string_view text) {
  if (text == "text") return LogFormat::kText;
  if (text == "json") return LogFormat::kJson;
  return absl::InvalidArgumentError(
      fmt::format("invalid log format \"{}\": want text or json", text));
}

bool StreamIsJournal(int fd) {
  const char* env = std::getenv("JOURNAL_STREAM");
  if (env == nullptr) return false;
  const std::string_view value(env);
  const size_t colon = value.find(':');
  if (colon == std::string_view::npos) return false;
  uint64_t dev = 0;
  uint64_t ino = 0;
  const char* dev_end = value.data() + colon;
  const char* ino_end = value.data() + value.size();
  const auto dev_result = std::from_chars(value.data(), dev_end, dev);
  const auto ino_result = std::from_chars(dev_end + 1, ino_end, ino);
  if (dev_result.ec != std::errc() || dev_result.ptr != dev_end || ino_result.ec != std::errc() ||
      ino_result.ptr != ino_end) {
    return false;
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) return false;
  return static_cast<uint64_t>(st.st_dev) == dev && static_cast<uint64_t>(st.st_ino) == ino;
}

std::unique_ptr<spdlog::formatter> MakeLogFormatter(LogFormat format, bool journal) {
  return std::make_unique<LineFormatter>(format, journal);
}

void SetupLogging(const LoggingOptions& options, spdlog::sink_ptr sink) {
  if (sink == nullptr) sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  const bool journal = options.journal.value_or(StderrIsJournal());
  sink->set_formatter(MakeLogFormatter(options.format, journal));
  if (options.repeat_window.count() > 0) {
    // spdlog's duplicate filter: consecutive identical payloads within the window are counted,
    // not written.
    auto dedup = std::make_shared<spdlog::sinks::dup_filter_sink_mt>(options.repeat_window);
    dedup->add_sink(std::move(sink));
    sink = std::move(dedup);
  }
  auto logger = std::make_shared<spdlog::logger>("tvillingd", std::move(sink));
  logger->set_level(options.level);
  spdlog::set_default_logger(std::move(logger));
}

void Log(spdlog::level::level_enum level, std::string_view message,
         std::initializer_list<LogField> fields) {
  spdlog::logger* logger = spdlog::default_logger_raw();
  if (!logger->should_log(level)) return;
  std::string payload;
  AppendClean(message, payload);
  for (const LogField& field : fields) {
    payload += kFieldSeparator;
    AppendClean(field.key, payload);
    payload += kValueSeparator;
    payload += field.raw ? 'r' : 's';
    AppendClean(field.value, payload);
  }
  logger->log(level, spdlog::string_view_t(payload.data(), payload.size()));
}

}  // namespace tvilling::ops
