// rocksdb_logger.cc: see rocksdb_logger.h.
#include "storage/rocksdb_logger.h"

#include <spdlog/spdlog.h>

#include <cstdio>
#include <utility>

namespace tvilling::storage {

std::string FormatRocksMessage(const char* format, va_list ap) {
  char small[512];
  va_list copy;
  va_copy(copy, ap);
  const int n = std::vsnprintf(small, sizeof small, format, copy);
  va_end(copy);
  if (n < 0) return format;  // a bad format: the template is better than nothing
  if (static_cast<size_t>(n) < sizeof small) return std::string(small, n);
  std::string out(static_cast<size_t>(n) + 1, '\0');
  std::vsnprintf(out.data(), out.size(), format, ap);
  out.resize(static_cast<size_t>(n));
  return out;
}

SpdlogRocksLogger::SpdlogRocksLogger(std::string where, rocksdb::InfoLogLevel level)
    : rocksdb::Logger(level), where_(std::move(where)) {}

void SpdlogRocksLogger::Logv(const char* format, va_list ap) {
  Logv(rocksdb::InfoLogLevel::INFO_LEVEL, format, ap);
}

void SpdlogRocksLogger::Logv(rocksdb::InfoLogLevel level, const char* format, va_list ap) {
  if (level < GetInfoLogLevel()) return;
  spdlog::level::level_enum to = spdlog::level::info;
  switch (level) {
    case rocksdb::InfoLogLevel::DEBUG_LEVEL:
      to = spdlog::level::debug;
      break;
    case rocksdb::InfoLogLevel::INFO_LEVEL:
    case rocksdb::InfoLogLevel::HEADER_LEVEL:
      to = spdlog::level::info;
      break;
    case rocksdb::InfoLogLevel::WARN_LEVEL:
      to = spdlog::level::warn;
      break;
    default:  // ERROR_LEVEL, FATAL_LEVEL
      to = spdlog::level::err;
      break;
  }
  if (!spdlog::should_log(to)) return;
  std::string msg = FormatRocksMessage(format, ap);
  while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
  spdlog::log(to, "rocksdb ({}): {}", where_, msg);
}

}  // namespace tvilling::storage
