// rocksdb_logger.h: RocksDB's own messages go to the agent's log (spdlog), not to a LOG file.
//
// Why: by default RocksDB writes its info log to <log dir>/LOG, on the same file system as the
// WAL. When that file system is full, the LOG file's writer fails too, and the next message
// RocksDB logs (its error handler and SstFileManager log as they react to the full disk) goes
// through the same writer again, which Debian's build of RocksDB (assertions kept) answers with an
// abort (WritableFileWriter::AssertFalseAndGetStatusForPrevError). Through this logger a full
// disk costs only what it must: the writes that cannot be logged fail with ENOSPC, and the agent
// goes on serving reads and answering clients. Operators also get RocksDB's warnings and errors
// where they read tvillingd's (the journal), each naming the log directory.
#pragma once

#include <rocksdb/env.h>

#include <cstdarg>
#include <memory>
#include <string>

namespace tvilling::storage {

class SpdlogRocksLogger final : public rocksdb::Logger {
 public:
  // `where` names the log store in every line (its directory). Messages below `level` are dropped
  // before they are formatted.
  SpdlogRocksLogger(std::string where, rocksdb::InfoLogLevel level);

  using rocksdb::Logger::Logv;
  void Logv(const char* format, va_list ap) override;
  void Logv(rocksdb::InfoLogLevel level, const char* format, va_list ap) override;

 private:
  const std::string where_;
};

// Formats a printf-style message of any length (RocksDB's messages have no fixed bound).
std::string FormatRocksMessage(const char* format, va_list ap);

}  // namespace tvilling::storage
