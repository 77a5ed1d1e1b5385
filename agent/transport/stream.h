// stream.h: the Replication service on gRPC's completion-queue API (no thread per stream): a server
// that hands each accepted stream to a StreamAcceptor, and a client stream for the primary. Both
// sides queue outgoing messages (one write in flight) and deliver incoming ones one at a time, in
// order: the next read starts only after the message callback returns. Threads: a server's
// streams and unary calls run on its one queue thread (`tvl-grpc-srv`), every client stream's
// callbacks on the process's one client queue thread (`tvl-grpc-cli`); callbacks must not block
// for long, as they hold up the other streams of that thread. stream.cc says why.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tvilling/v1/replication.pb.h"

namespace tvilling::transport {

namespace v1 = ::tvilling::v1;

// Largest message either side accepts (a 64 MiB batch plus framing).
inline constexpr int kMaxMessageBytes = 80 << 20;

// Receives one accepted stream's messages. Calls never overlap. OnClosed is called exactly once,
// last, with the status given to Close, INVALID_ARGUMENT if a message did not parse or the client
// half-closed (gRPC does not tell these apart; a primary never half-closes), or CANCELLED if the
// client went away, gRPC refused a message (e.g. over kMaxMessageBytes) or the server shut down.
class ServerStreamHandler {
 public:
  virtual ~ServerStreamHandler() = default;
  // `msg` is the stream's receive buffer: the handler may move fields out of it (a batch's
  // records); it is cleared before the next message is read into it.
  virtual void OnMessage(v1::ToReplica& msg) = 0;
  virtual void OnClosed(const absl::Status& status) = 0;
};

// The server's side of one stream. Thread-safe; may be used from any thread, also from inside the
// handler's callbacks. Calls after the RPC ended are ignored.
class ServerStream {
 public:
  virtual ~ServerStream() = default;
  // Queues a message; it is written after those queued before it.
  virtual void Send(v1::FromReplica msg) = 0;
  // Serialized bytes queued and not yet written (including the one in flight).
  virtual uint64_t queued_bytes() const = 0;
  // Ends the RPC with `status` (absl code -> same gRPC code, and its message) once the messages
  // already queued are written; later Sends are dropped. The first Close wins.
  virtual void Close(absl::Status status) = 0;
};

class StreamAcceptor {
 public:
  virtual ~StreamAcceptor() = default;
  // Replication.VerifyChunks and MarkResync (unary, docs/replication.md "Verify"). Called on the
  // server's thread with the caller's identities and address (as Accept); must not block: `done` is
  // called exactly once, from any thread, with the answer (an error status is the RPC's status).
  // The server's Shutdown waits for every `done`. Without an override: UNIMPLEMENTED.
  template <class Reply>
  using Done = std::function<void(absl::StatusOr<Reply>)>;
  virtual void VerifyChunks(const v1::VerifyChunksRequest& req,
                            std::vector<std::string> peer_identities, std::string peer_address,
                            Done<v1::VerifyChunksReply> done);
  virtual void MarkResync(const v1::MarkResyncRequest& req,
                          std::vector<std::string> peer_identities, std::string peer_address,
                          Done<v1::MarkResyncReply> done);
  // Called once per new stream, on the server's thread, before any message is read.
  // `peer_identities` are the verified client certificate's CN then SANs (empty without TLS);
  // `peer_address` is gRPC's peer string (e.g. "ipv4:127.0.0.1:5555"). Returning nullptr refuses
  // the stream with PERMISSION_DENIED (unless Close was already called on it). The handler is
  // destroyed after OnClosed.
  virtual std::unique_ptr<ServerStreamHandler> Accept(std::shared_ptr<ServerStream> stream,
                                                      std::vector<std::string> peer_identities,
                                                      std::string peer_address) = 0;
};

class ReplicationServer {
 public:
  // Listens on `listen` ("host:port"; port 0 picks one) and serves Replication.Stream. The acceptor
  // must outlive the server.
  static absl::StatusOr<std::unique_ptr<ReplicationServer>> Start(
      const std::string& listen, std::shared_ptr<grpc::ServerCredentials> creds,
      StreamAcceptor* acceptor);
  virtual ~ReplicationServer() = default;
  virtual int port() const = 0;
  // Cancels open streams (their handlers see OnClosed(CANCELLED)) and stops the server; returns
  // within about 2 s. Idempotent; the destructor calls it.
  virtual void Shutdown() = 0;

 protected:
  ReplicationServer() = default;
};

// A channel to a peer: keepalive every 10 s (5 s timeout, also without calls), 80 MiB message
// limits, and the TLS name to check instead of the target's host if `tls_name_override` is not
// empty.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target,
                                           std::shared_ptr<grpc::ChannelCredentials> creds,
                                           const std::string& tls_name_override);

// The unary verify calls on a channel from MakeChannel (sync; `timeout` is the deadline).
absl::StatusOr<v1::VerifyChunksReply> CallVerifyChunks(
    const std::shared_ptr<grpc::Channel>& channel, const v1::VerifyChunksRequest& req,
    std::chrono::milliseconds timeout);
absl::StatusOr<v1::MarkResyncReply> CallMarkResync(const std::shared_ptr<grpc::Channel>& channel,
                                                   const v1::MarkResyncRequest& req,
                                                   std::chrono::milliseconds timeout);

// The client (primary) side of one stream.
//
// Callback rules: on_message and on_closed are called on the client queue's thread, one at a time
// (on_closed also inside Close, see below). on_closed is called exactly once; after it, nothing
// else is called. Close(status) calls on_closed(status) itself before returning (unless it was
// called already), so after Close returns no callback runs any more; Close may be called from
// inside a callback. Without Close, the stream lives until the RPC ends, even if every shared_ptr
// to it is dropped.
class ClientStream {
 public:
  static std::shared_ptr<ClientStream> Open(std::shared_ptr<grpc::Channel> channel,
                                            std::function<void(v1::FromReplica)> on_message,
                                            std::function<void(absl::Status)> on_closed);
  virtual ~ClientStream() = default;
  // Queues a message (thread-safe); dropped after the stream ended.
  virtual void Send(v1::ToReplica msg) = 0;
  virtual uint64_t queued_bytes() const = 0;
  // Cancels the RPC and reports `status` through on_closed (see above).
  virtual void Close(absl::Status status) = 0;

  // Waits up to `timeout` until every client stream of the process has been released and their
  // shared completion-queue thread has exited; returns whether it has. For the end of main: a
  // closed stream lets go of itself only once gRPC has handed back its last operation, and that
  // thread must not outlive main (static destructors run then).
  static bool WaitAllReleased(std::chrono::milliseconds timeout);

 protected:
  ClientStream() = default;
};

}  // namespace tvilling::transport
