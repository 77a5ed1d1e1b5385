// frontend.h: the NBD server of an agent: TCP and unix-socket listeners, one connection per client,
// pipelined requests answered as they complete (out of order), over Boost.Asio.
//
// Threading: the caller runs the io_context (on one or more threads); every connection lives on its
// own strand. Export completions may arrive on any thread and are posted back to the connection.
// Back-pressure: a connection stops reading requests while it has max_inflight_requests or
// max_inflight_bytes outstanding (read but not yet answered on the socket: WRITE payloads and READ
// data both count until their reply is written), so a fast client, or one that does not read its
// replies, slows down instead of growing our queues.
//
// The protocol itself is in wire.h (the brief's "protocol.h"); this is the brief's "server.h".
#pragma once

#include <absl/status/status.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "agent/nbd/export.h"

namespace tvilling::nbd {

// A TCP listener: an IP literal (the config has parsed and validated it) and a port (0 = any).
struct TcpListen {
  std::string host;  // "127.0.0.1", "::1"
  uint16_t port = 0;
  std::string ToString() const;  // "127.0.0.1:10809", "[::1]:10809"
};

struct FrontendOptions {
  std::vector<TcpListen> tcp_listen;
  std::vector<std::string> unix_sockets;  // paths; a stale socket file is replaced
  uint32_t max_inflight_requests = 256;   // per connection
  uint64_t max_inflight_bytes = 128ull << 20;
  // Called around each burst of requests a connection hands to its Export without waiting in
  // between (the requests already read): burst_begin before the first, burst_end before the
  // connection waits for anything (a read, a completion) or ends, on the connection's thread.
  // tvillingd sets them to storage::AppendPlug::Engage/Release, so that a burst of WRITEs becomes
  // one batch of the group log, written on this thread when the log is idle.
  void (*burst_begin)() = nullptr;
  void (*burst_end)() = nullptr;
  // A WRITE/FLUSH/TRIM/WRITE_ZEROES that completes as its connection's only outstanding request
  // is answered by the completing thread with a non-blocking send (frontend.cc, "Direct
  // replies"). Off: every reply is written by the connection's own thread.
  bool direct_replies = true;
};

// Server-wide counters (monotonic unless noted). Each connection keeps the same counts for itself
// and logs them when it closes (debug level).
struct FrontendStats {
  std::atomic<uint64_t> connections{0};         // accepted so far
  std::atomic<uint64_t> connections_open{0};    // gauge
  std::atomic<uint64_t> handshakes_refused{0};  // malformed, truncated or aborted handshakes
  std::atomic<uint64_t> requests{0};            // transmission requests read (DISC excluded)
  std::atomic<uint64_t> request_errors{0};      // requests answered with an NBD error
  std::atomic<uint64_t> requests_refused{0};    // of those, refused by validation (client bugs)
  std::atomic<uint64_t> bytes_read{0};          // READ payload sent to clients
  std::atomic<uint64_t> bytes_written{0};       // WRITE payload received
  std::atomic<uint64_t> backpressure_waits{0};  // times a connection paused reading at its limit
  std::atomic<uint64_t> direct_replies{0};      // replies sent by the completing thread
};

class Frontend {
 public:
  Frontend(boost::asio::io_context& io, FrontendOptions options);
  ~Frontend();
  Frontend(const Frontend&) = delete;
  Frontend& operator=(const Frontend&) = delete;

  // Before Start. Export names must be unique; the first export is the default ("" name).
  void AddExport(std::shared_ptr<Export> e);
  // Binds every listener; an error names the address. Nothing is served until this succeeds.
  absl::Status Start();
  // The bound TCP ports, in tcp_listen order (useful with port 0).
  std::vector<uint16_t> tcp_ports() const;
  // Stops accepting and stops reading new requests; requests already read are answered, then each
  // connection closes. The io_context runs out of work once all of that is done. Thread-safe,
  // idempotent; a connection accepted concurrently with Stop() is closed too.
  void Stop();
  const FrontendStats& stats() const;

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace tvilling::nbd
