// control_service.h: the agent's control API (proto/tvilling/v1/control.proto) on a unix socket,
// for tvillingctl: status, the operator's role commands (promote, demote, approve) and the audit
// history. The handlers are the agent's (main.cc); a missing one answers UNIMPLEMENTED.
//
// The socket is created mode 0600 in the state directory: whoever can open it is as trusted as the
// user running the agent, like DRBD's netlink or Ceph's admin socket.
#pragma once

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <grpcpp/grpcpp.h>

#include <filesystem>
#include <functional>
#include <memory>

#include "tvilling/v1/control.grpc.pb.h"

namespace tvilling::node {

struct ControlHandlers {
  std::function<void(v1::StatusReply* out)> status;
  // An error status is answered as is (FailedPrecondition: refused, with the reason).
  std::function<absl::StatusOr<v1::RoleReply>(const v1::RoleRequest&)> promote, demote, approve,
      pause, resume;
  std::function<absl::StatusOr<v1::HistoryReply>(const v1::HistoryRequest&)> history;
  std::function<absl::StatusOr<v1::SwitchoverReply>(const v1::SwitchoverRequest&)> switchover;
  // Online verify: runs while the call lasts; `send` streams a progress message and returns false
  // once the client went away (the verify then stops).
  std::function<absl::Status(const v1::VerifyRequest&,
                             const std::function<bool(const v1::VerifyProgress&)>& send)>
      verify;
};

class ControlServer {
 public:
  using StatusFn = std::function<void(v1::StatusReply* out)>;
  // Listens on `socket_path` (an existing stale socket file is replaced).
  static absl::StatusOr<std::unique_ptr<ControlServer>> Start(
      const std::filesystem::path& socket_path, StatusFn status);
  static absl::StatusOr<std::unique_ptr<ControlServer>> Start(
      const std::filesystem::path& socket_path, ControlHandlers handlers);
  ~ControlServer();
  void Shutdown();

 private:
  class Service;
  ControlServer() = default;
  std::filesystem::path path_;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
};

}  // namespace tvilling::node
