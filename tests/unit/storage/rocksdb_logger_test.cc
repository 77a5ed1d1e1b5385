// RocksDB's messages reach the agent's log (spdlog) at their level, formatted whatever their
// length, and none below the configured level (storage/rocksdb_logger.h).
#include "storage/rocksdb_logger.h"

#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <memory>
#include <sstream>
#include <string>

namespace tvilling::storage {
namespace {

class RocksLoggerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    previous_ = spdlog::default_logger();
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out_);
    auto logger = std::make_shared<spdlog::logger>("test", sink);
    logger->set_pattern("%l %v");
    logger->set_level(spdlog::level::debug);
    spdlog::set_default_logger(logger);
  }
  void TearDown() override { spdlog::set_default_logger(previous_); }

  std::ostringstream out_;
  std::shared_ptr<spdlog::logger> previous_;
};

TEST_F(RocksLoggerTest, LevelsMapAndLowerOnesAreDropped) {
  auto log = std::make_shared<SpdlogRocksLogger>("/var/lib/tvilling/log",
                                                 rocksdb::InfoLogLevel::WARN_LEVEL);
  std::shared_ptr<rocksdb::Logger> base = log;
  rocksdb::Log(rocksdb::InfoLogLevel::INFO_LEVEL, base, "flushed %d files", 3);
  rocksdb::Log(rocksdb::InfoLogLevel::WARN_LEVEL, base, "background error: %s", "no space\n");
  rocksdb::Log(rocksdb::InfoLogLevel::ERROR_LEVEL, base, "cannot clear hard error");
  EXPECT_EQ(out_.str(),
            "warning rocksdb (/var/lib/tvilling/log): background error: no space\n"
            "error rocksdb (/var/lib/tvilling/log): cannot clear hard error\n");
}

TEST_F(RocksLoggerTest, LongMessagesAreFormattedWhole) {
  auto log = std::make_shared<SpdlogRocksLogger>("d", rocksdb::InfoLogLevel::DEBUG_LEVEL);
  std::shared_ptr<rocksdb::Logger> base = log;
  const std::string big(5000, 'x');
  rocksdb::Log(rocksdb::InfoLogLevel::INFO_LEVEL, base, "[%s] %d", big.c_str(), 42);
  EXPECT_EQ(out_.str(), "info rocksdb (d): [" + big + "] 42\n");
}

}  // namespace
}  // namespace tvilling::storage
