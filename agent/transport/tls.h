// tls.h: mutual-TLS material for the replication transport: loading and checking the CA,
// certificate and key files up front (so an operator sees which file is wrong at startup rather
// than a handshake failure later), gRPC credentials built from them, and the peer identities of an
// authenticated call.
#pragma once

#include <grpcpp/grpcpp.h>
#include <grpcpp/security/auth_context.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace tvilling::transport {

struct TlsFiles {
  std::filesystem::path ca, cert, key;
};

struct TlsMaterial {
  std::string ca_pem, cert_pem, key_pem;
};

// Reads the three files and checks: readable and PEM; the key matches the certificate; the
// certificate verifies against the CA; neither is expired or not yet valid ("certificate <file>
// expired on <date>"). Every error names the file it is about.
absl::StatusOr<TlsMaterial> LoadTls(const TlsFiles& files);

// The subject common name of the first certificate in `cert` (this site's identity, as peers see
// it), for the audit log.
absl::StatusOr<std::string> CertificateCommonName(const std::filesystem::path& cert);

// Server side: requires and verifies a client certificate signed by the CA.
std::shared_ptr<grpc::ServerCredentials> ServerCredentials(const TlsMaterial& tls);
// Client side: presents our certificate, verifies the server's against the CA.
std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials(const TlsMaterial& tls);

// Mutual-TLS credentials whose certificates can be replaced while the agent runs (SIGHUP,
// `systemctl reload`) without touching established streams: only new handshakes use the new
// files. The configured files are validated with LoadTls and then copied, each by an atomic
// rename, into `active_dir`, which gRPC's FileWatcherCertificateProvider re-reads every
// `refresh_seconds`; so gRPC only ever sees files that passed the checks, and a file the operator
// is still writing is never picked up. Both credentials (the server's and the dialer's) follow.
class ReloadableTls {
 public:
  static absl::StatusOr<std::unique_ptr<ReloadableTls>> Create(
      const TlsFiles& files, const std::filesystem::path& active_dir, unsigned refresh_seconds = 1);
  // Re-reads the configured files. If they pass LoadTls they become active (for handshakes from
  // at most refresh_seconds later); otherwise the error names the file and the current
  // certificates stay.
  absl::Status Reload();
  std::shared_ptr<grpc::ServerCredentials> server_credentials() const { return server_; }
  std::shared_ptr<grpc::ChannelCredentials> channel_credentials() const { return channel_; }
  unsigned refresh_seconds() const { return refresh_seconds_; }

 private:
  ReloadableTls() = default;
  absl::Status Install(const TlsMaterial& m);
  TlsFiles files_;
  std::filesystem::path active_dir_;
  unsigned refresh_seconds_ = 1;
  std::shared_ptr<grpc::ServerCredentials> server_;
  std::shared_ptr<grpc::ChannelCredentials> channel_;
};

// The verified peer's names: the certificate's CN first, then its SAN entries, without duplicates.
// Empty for an unauthenticated (insecure) call.
std::vector<std::string> PeerIdentities(const grpc::AuthContext& ctx);

}  // namespace tvilling::transport
