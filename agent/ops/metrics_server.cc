// metrics_server.cc: the /metrics HTTP server (Boost.Beast), one thread, async sessions.
#include "agent/ops/metrics_server.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <optional>

namespace tvilling::ops {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
using tcp = boost::asio::ip::tcp;

constexpr auto kIdleTimeout = std::chrono::seconds(30);
constexpr uint32_t kHeaderLimitBytes = 8192;
constexpr const char* kExpositionContentType = "text/plain; version=0.0.4; charset=utf-8";

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, const MetricsServer::RenderFn& render)
      : stream_(std::move(socket)), render_(render) {}

  void Read() {
    parser_.emplace();
    parser_->header_limit(kHeaderLimitBytes);
    parser_->body_limit(0);
    stream_.expires_after(kIdleTimeout);
    http::async_read(
        stream_, buffer_, *parser_,
        [self = shared_from_this()](beast::error_code ec, size_t) { self->OnRead(ec); });
  }

 private:
  void OnRead(beast::error_code ec) {
    if (ec) {  // the client closed, timed out, or sent something we refuse to parse
      Close();
      return;
    }
    const auto& req = parser_->get();
    auto res = std::make_shared<http::response<http::string_body>>();
    res->version(req.version());
    res->keep_alive(req.keep_alive());
    res->set(http::field::server, "tvillingd");
    const std::string_view target(req.target().data(), req.target().size());
    const std::string_view path = target.substr(0, target.find('?'));
    if (req.method() != http::verb::get) {
      res->result(http::status::method_not_allowed);
      res->set(http::field::allow, "GET");
      res->set(http::field::content_type, "text/plain; charset=utf-8");
      res->body() = "only GET is supported\n";
    } else if (path == "/metrics") {
      res->result(http::status::ok);
      res->set(http::field::content_type, kExpositionContentType);
      res->body() = render_();
    } else if (path == "/") {
      res->result(http::status::ok);
      res->set(http::field::content_type, "text/plain; charset=utf-8");
      res->body() = "tvillingd: Prometheus metrics are at /metrics\n";
    } else {
      res->result(http::status::not_found);
      res->set(http::field::content_type, "text/plain; charset=utf-8");
      res->body() = fmt::format("not found: {} (metrics are at /metrics)\n", path);
    }
    res->prepare_payload();
    http::async_write(stream_, *res,
                      [self = shared_from_this(), res](beast::error_code wec, size_t) {
                        if (wec || !res->keep_alive()) {
                          self->Close();
                          return;
                        }
                        self->Read();
                      });
  }

  void Close() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.socket().close(ignored);
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::empty_body>> parser_;
  const MetricsServer::RenderFn& render_;
};

}  // namespace

struct MetricsServer::Impl {
  Impl(boost::asio::io_context& io, RenderFn r) : acceptor(io), render(std::move(r)) {}
  void Accept() {
    acceptor.async_accept([this](beast::error_code ec, tcp::socket socket) {
      if (ec == boost::asio::error::operation_aborted || !acceptor.is_open()) return;
      if (!ec) std::make_shared<Session>(std::move(socket), render)->Read();
      Accept();
    });
  }
  tcp::acceptor acceptor;
  RenderFn render;
};

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(const std::string& host,
                                                                    uint16_t port,
                                                                    RenderFn render) {
  auto server = std::unique_ptr<MetricsServer>(new MetricsServer());
  server->impl_ = std::make_unique<Impl>(server->io_, std::move(render));
  tcp::acceptor& acceptor = server->impl_->acceptor;
  const std::string where = host.find(':') != std::string::npos ? fmt::format("[{}]:{}", host, port)
                                                                : fmt::format("{}:{}", host, port);
  beast::error_code ec;
  const auto address = boost::asio::ip::make_address(host, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        fmt::format("metrics: {} is not an IP address: {}", host, ec.message()));
  }
  const tcp::endpoint endpoint(address, port);
  acceptor.open(endpoint.protocol(), ec);
  if (!ec) acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) acceptor.bind(endpoint, ec);
  if (!ec) acceptor.listen(boost::asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        fmt::format("metrics: cannot listen on {}: {}", where, ec.message()));
  }
  server->port_ = acceptor.local_endpoint().port();
  server->impl_->Accept();
  server->thread_ = std::thread([s = server.get()] {
    // A handler that throws (a bug) must not take the agent down with std::terminate silently.
    for (;;) {
      try {
        s->io_.run();
        return;
      } catch (const std::exception& e) {
        spdlog::error("metrics: request handler failed: {}", e.what());
      }
    }
  });
  return server;
}

MetricsServer::~MetricsServer() { Stop(); }

void MetricsServer::Stop() {
  if (!thread_.joinable()) return;
  boost::asio::post(io_, [this] {
    beast::error_code ignored;
    impl_->acceptor.close(ignored);
  });
  io_.stop();
  thread_.join();
}

}  // namespace tvilling::ops
