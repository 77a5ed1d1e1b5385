// control_service.cc: the Control gRPC service on the agent's unix socket.
#include "agent/node/control_service.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <chrono>
#include <system_error>

namespace tvilling::node {

class ControlServer::Service final : public v1::Control::Service {
 public:
  explicit Service(StatusFn fn) : fn_(std::move(fn)) {}
  grpc::Status Status(grpc::ServerContext*, const v1::StatusRequest*,
                      v1::StatusReply* reply) override {
    fn_(reply);
    return grpc::Status::OK;
  }

 private:
  StatusFn fn_;
};

absl::StatusOr<std::unique_ptr<ControlServer>> ControlServer::Start(
    const std::filesystem::path& socket_path, StatusFn status) {
  auto s = std::unique_ptr<ControlServer>(new ControlServer());
  s->path_ = socket_path;
  std::error_code ec;
  std::filesystem::remove(socket_path, ec);  // a socket left by a crashed agent (we hold the lock)
  s->service_ = std::make_unique<Service>(std::move(status));
  grpc::ServerBuilder b;
  b.AddListeningPort("unix:" + socket_path.string(), grpc::InsecureServerCredentials());
  b.RegisterService(s->service_.get());
  // Status is cheap; a small pool is plenty and keeps the agent's thread count down.
  b.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, 1);
  s->server_ = b.BuildAndStart();
  if (!s->server_) {
    return absl::FailedPreconditionError(
        fmt::format("control: cannot listen on unix socket {}", socket_path.string()));
  }
  chmod(socket_path.c_str(), 0600);
  return s;
}

ControlServer::~ControlServer() { Shutdown(); }

void ControlServer::Shutdown() {
  if (!server_) return;
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  server_.reset();
  std::error_code ec;
  std::filesystem::remove(path_, ec);
}

}  // namespace tvilling::node
