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

// Server side: requires and verifies a client certificate signed by the CA.
std::shared_ptr<grpc::ServerCredentials> ServerCredentials(const TlsMaterial& tls);
// Client side: presents our certificate, verifies the server's against the CA.
std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials(const TlsMaterial& tls);

// The verified peer's names: the certificate's CN first, then its SAN entries, without duplicates.
// Empty for an unauthenticated (insecure) call.
std::vector<std::string> PeerIdentities(const grpc::AuthContext& ctx);

}  // namespace tvilling::transport
