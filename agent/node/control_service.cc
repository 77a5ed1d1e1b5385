// control_service.cc: the Control gRPC service on the agent's unix socket.
#include "agent/node/control_service.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <chrono>
#include <system_error>

namespace tvilling::node {

namespace {

grpc::Status ToGrpc(const absl::Status& st) {
  return grpc::Status(static_cast<grpc::StatusCode>(st.code()), std::string(st.message()));
}

template <class Reply, class Fn, class Request>
grpc::Status Answer(const Fn& fn, const Request& req, Reply* reply) {
  if (!fn) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "not served by this agent");
  auto r = fn(req);
  if (!r.ok()) return ToGrpc(r.status());
  *reply = std::move(*r);
  return grpc::Status::OK;
}

}  // namespace

class ControlServer::Service final : public v1::Control::Service {
 public:
  explicit Service(ControlHandlers h) : h_(std::move(h)) {}
  grpc::Status Status(grpc::ServerContext*, const v1::StatusRequest*,
                      v1::StatusReply* reply) override {
    h_.status(reply);
    return grpc::Status::OK;
  }
  grpc::Status Promote(grpc::ServerContext*, const v1::RoleRequest* req,
                       v1::RoleReply* reply) override {
    return Answer(h_.promote, *req, reply);
  }
  grpc::Status Demote(grpc::ServerContext*, const v1::RoleRequest* req,
                      v1::RoleReply* reply) override {
    return Answer(h_.demote, *req, reply);
  }
  grpc::Status Approve(grpc::ServerContext*, const v1::RoleRequest* req,
                       v1::RoleReply* reply) override {
    return Answer(h_.approve, *req, reply);
  }
  grpc::Status Pause(grpc::ServerContext*, const v1::RoleRequest* req,
                     v1::RoleReply* reply) override {
    return Answer(h_.pause, *req, reply);
  }
  grpc::Status Resume(grpc::ServerContext*, const v1::RoleRequest* req,
                      v1::RoleReply* reply) override {
    return Answer(h_.resume, *req, reply);
  }
  grpc::Status History(grpc::ServerContext*, const v1::HistoryRequest* req,
                       v1::HistoryReply* reply) override {
    return Answer(h_.history, *req, reply);
  }
  grpc::Status Switchover(grpc::ServerContext*, const v1::SwitchoverRequest* req,
                          v1::SwitchoverReply* reply) override {
    return Answer(h_.switchover, *req, reply);
  }
  grpc::Status Verify(grpc::ServerContext* ctx, const v1::VerifyRequest* req,
                      grpc::ServerWriter<v1::VerifyProgress>* writer) override {
    if (!h_.verify)
      return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "not served by this agent");
    const auto send = [ctx, writer](const v1::VerifyProgress& p) {
      return !ctx->IsCancelled() && writer->Write(p);
    };
    return ToGrpc(h_.verify(*req, send));
  }

 private:
  ControlHandlers h_;
};

absl::StatusOr<std::unique_ptr<ControlServer>> ControlServer::Start(
    const std::filesystem::path& socket_path, StatusFn status) {
  ControlHandlers h;
  h.status = std::move(status);
  return Start(socket_path, std::move(h));
}

absl::StatusOr<std::unique_ptr<ControlServer>> ControlServer::Start(
    const std::filesystem::path& socket_path, ControlHandlers handlers) {
  auto s = std::unique_ptr<ControlServer>(new ControlServer());
  s->path_ = socket_path;
  std::error_code ec;
  std::filesystem::remove(socket_path, ec);  // a socket left by a crashed agent (we hold the lock)
  s->service_ = std::make_unique<Service>(std::move(handlers));
  grpc::ServerBuilder b;
  b.AddListeningPort("unix:" + socket_path.string(), grpc::InsecureServerCredentials());
  b.RegisterService(s->service_.get());
  // Status is cheap and commands are rare; a small pool is plenty and keeps the agent's thread
  // count down. Two pollers, not one: gRPC's sync server keeps MIN_POLLERS (1) threads polling,
  // so with a maximum of 1 it started a thread for every request (to poll while the first one
  // answered) and ended it afterwards: 100 threads a second under `status --watch 0.01`.
  b.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MIN_POLLERS, 1);
  b.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, 2);
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
