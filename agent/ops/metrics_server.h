// metrics_server.h: the agent's Prometheus endpoint: an HTTP/1.1 server (Boost.Beast) on its own
// thread and io_context, so a slow or hostile scraper never touches the data path's event loops.
//
//   GET /metrics   the text exposition format (version 0.0.4), rendered on each request
//   GET /          a one-line pointer to /metrics
//   anything else  404 (other paths) or 405 (other methods)
//
// Each connection may keep-alive; it is closed after 30 s without a request. Request headers are
// limited to 8 KiB and bodies are refused, so a scraper cannot make the agent buffer much.
#pragma once

#include <absl/status/statusor.h>

#include <boost/asio/io_context.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

namespace tvilling::ops {

class MetricsServer {
 public:
  // Returns the exposition text; called on the server's thread for every scrape.
  using RenderFn = std::function<std::string()>;

  // Binds host:port (an IP literal; port 0 picks a free one) and starts the thread. A bind error
  // (address in use, not an address of this host) names the address.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& host,
                                                              uint16_t port, RenderFn render);
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // Closes the listener and every connection and joins the thread. Idempotent.
  void Stop();
  uint16_t port() const { return port_; }
  // The server's event loop, for the watchdog's liveness probe.
  boost::asio::io_context& io() { return io_; }

 private:
  struct Impl;
  MetricsServer() = default;
  boost::asio::io_context io_{1};
  std::unique_ptr<Impl> impl_;
  std::thread thread_;
  uint16_t port_ = 0;
};

}  // namespace tvilling::ops
