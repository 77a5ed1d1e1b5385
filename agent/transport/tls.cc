// tls.cc: TLS file checks with OpenSSL and gRPC credentials (see tls.h).
#include "agent/transport/tls.h"

#include <fcntl.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_certificate_verifier.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "fmt/format.h"

namespace tvilling::transport {

namespace {

template <typename T, void (*F)(T*)>
struct Deleter {
  void operator()(T* p) const { F(p); }
};
using X509Ptr = std::unique_ptr<X509, Deleter<X509, X509_free>>;
using KeyPtr = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY, EVP_PKEY_free>>;
using BioPtr = std::unique_ptr<BIO, Deleter<BIO, BIO_free_all>>;
using StorePtr = std::unique_ptr<X509_STORE, Deleter<X509_STORE, X509_STORE_free>>;
using CtxPtr = std::unique_ptr<X509_STORE_CTX, Deleter<X509_STORE_CTX, X509_STORE_CTX_free>>;
struct StackDeleter {
  void operator()(STACK_OF(X509) * s) const { sk_X509_pop_free(s, X509_free); }
};
using StackPtr = std::unique_ptr<STACK_OF(X509), StackDeleter>;

std::string OpenSslError() {
  unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "no PEM data found";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  return buf;
}

absl::StatusOr<std::string> ReadFile(const std::filesystem::path& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(fmt::format("TLS {} file {}: cannot be read: {}", what,
                                           path.string(), std::strerror(errno)));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) {
    return absl::DataLossError(fmt::format("TLS {} file {}: read error", what, path.string()));
  }
  return ss.str();
}

// All certificates in a PEM text, in order.
absl::StatusOr<std::vector<X509Ptr>> ParseCerts(const std::string& pem,
                                                const std::filesystem::path& path,
                                                const char* what) {
  ERR_clear_error();
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  std::vector<X509Ptr> certs;
  while (X509* x = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) certs.emplace_back(x);
  ERR_clear_error();  // the loop ends on "no start line"
  if (certs.empty()) {
    return absl::InvalidArgumentError(
        fmt::format("TLS {} file {}: no PEM certificate in it", what, path.string()));
  }
  return certs;
}

std::string AsnTime(const ASN1_TIME* t) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  ASN1_TIME_print(bio.get(), t);
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

absl::Status CheckValidity(X509* cert, const std::filesystem::path& path) {
  if (X509_cmp_current_time(X509_get0_notAfter(cert)) <= 0) {
    return absl::FailedPreconditionError(fmt::format("certificate {} expired on {}", path.string(),
                                                     AsnTime(X509_get0_notAfter(cert))));
  }
  if (X509_cmp_current_time(X509_get0_notBefore(cert)) >= 0) {
    return absl::FailedPreconditionError(fmt::format("certificate {} is not valid before {}",
                                                     path.string(),
                                                     AsnTime(X509_get0_notBefore(cert))));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> CertificateCommonName(const std::filesystem::path& cert) {
  auto pem = ReadFile(cert, "certificate");
  if (!pem.ok()) return pem.status();
  auto certs = ParseCerts(*pem, cert, "certificate");
  if (!certs.ok()) return certs.status();
  char cn[256] = {};
  const int n = X509_NAME_get_text_by_NID(X509_get_subject_name((*certs)[0].get()), NID_commonName,
                                          cn, sizeof cn);
  if (n < 0) {
    return absl::InvalidArgumentError(
        fmt::format("TLS certificate file {}: no subject common name", cert.string()));
  }
  return std::string(cn, static_cast<size_t>(n));
}

absl::StatusOr<TlsMaterial> LoadTls(const TlsFiles& files) {
  TlsMaterial m;
  auto ca = ReadFile(files.ca, "CA");
  if (!ca.ok()) return ca.status();
  auto cert = ReadFile(files.cert, "certificate");
  if (!cert.ok()) return cert.status();
  auto key = ReadFile(files.key, "key");
  if (!key.ok()) return key.status();
  m.ca_pem = *std::move(ca);
  m.cert_pem = *std::move(cert);
  m.key_pem = *std::move(key);

  auto ca_certs = ParseCerts(m.ca_pem, files.ca, "CA");
  if (!ca_certs.ok()) return ca_certs.status();
  auto chain = ParseCerts(m.cert_pem, files.cert, "certificate");
  if (!chain.ok()) return chain.status();

  ERR_clear_error();
  BioPtr key_bio(BIO_new_mem_buf(m.key_pem.data(), static_cast<int>(m.key_pem.size())));
  KeyPtr pkey(PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr));
  if (!pkey) {
    return absl::InvalidArgumentError(fmt::format("TLS key file {}: not a PEM private key ({})",
                                                  files.key.string(), OpenSslError()));
  }
  X509* leaf = chain->front().get();
  if (X509_check_private_key(leaf, pkey.get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(fmt::format("TLS key file {} does not match certificate {}",
                                                  files.key.string(), files.cert.string()));
  }
  for (auto& c : *ca_certs) {
    if (auto s = CheckValidity(c.get(), files.ca); !s.ok()) return s;
  }
  if (auto s = CheckValidity(leaf, files.cert); !s.ok()) return s;

  StorePtr store(X509_STORE_new());
  for (auto& c : *ca_certs) X509_STORE_add_cert(store.get(), c.get());
  StackPtr untrusted(sk_X509_new_null());
  for (size_t i = 1; i < chain->size(); ++i) {
    X509_up_ref((*chain)[i].get());
    sk_X509_push(untrusted.get(), (*chain)[i].get());
  }
  CtxPtr ctx(X509_STORE_CTX_new());
  if (!ctx || X509_STORE_CTX_init(ctx.get(), store.get(), leaf, untrusted.get()) != 1) {
    return absl::InternalError(fmt::format("TLS: cannot set up verification of {}: {}",
                                           files.cert.string(), OpenSslError()));
  }
  if (X509_verify_cert(ctx.get()) != 1) {
    int err = X509_STORE_CTX_get_error(ctx.get());
    ERR_clear_error();
    return absl::InvalidArgumentError(
        fmt::format("certificate {} does not verify against CA {}: {}", files.cert.string(),
                    files.ca.string(), X509_verify_cert_error_string(err)));
  }
  return m;
}

std::shared_ptr<grpc::ServerCredentials> ServerCredentials(const TlsMaterial& tls) {
  grpc::SslServerCredentialsOptions o(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  o.pem_root_certs = tls.ca_pem;
  o.pem_key_cert_pairs.push_back({tls.key_pem, tls.cert_pem});
  return grpc::SslServerCredentials(o);
}

std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials(const TlsMaterial& tls) {
  grpc::SslCredentialsOptions o;
  o.pem_root_certs = tls.ca_pem;
  o.pem_private_key = tls.key_pem;
  o.pem_cert_chain = tls.cert_pem;
  return grpc::SslCredentials(o);
}

namespace {

// Writes `data` to dir/name through a temporary file and rename, so a reader sees the old or the
// new file, never a partial one.
absl::Status WriteAtomically(const std::filesystem::path& dir, const std::string& name,
                             const std::string& data, mode_t mode) {
  const std::filesystem::path tmp = dir / ("." + name + ".tmp");
  const std::filesystem::path final_path = dir / name;
  const int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        fmt::format("tls: cannot write {}: {}", tmp.string(), strerror(errno)));
  }
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      close(fd);
      return absl::FailedPreconditionError(
          fmt::format("tls: cannot write {}: {}", tmp.string(), strerror(err)));
    }
    done += static_cast<size_t>(n);
  }
  fchmod(fd, mode);
  close(fd);
  if (rename(tmp.c_str(), final_path.c_str()) != 0) {
    return absl::FailedPreconditionError(fmt::format(
        "tls: cannot rename {} to {}: {}", tmp.string(), final_path.string(), strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<ReloadableTls>> ReloadableTls::Create(
    const TlsFiles& files, const std::filesystem::path& active_dir, unsigned refresh_seconds) {
  absl::StatusOr<TlsMaterial> m = LoadTls(files);
  if (!m.ok()) return m.status();
  auto tls = std::unique_ptr<ReloadableTls>(new ReloadableTls());
  tls->files_ = files;
  tls->active_dir_ = active_dir;
  tls->refresh_seconds_ = std::max(1u, refresh_seconds);
  std::error_code ec;
  std::filesystem::create_directories(active_dir, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        fmt::format("tls: cannot create {}: {}", active_dir.string(), ec.message()));
  }
  std::filesystem::permissions(active_dir, std::filesystem::perms::owner_all, ec);
  if (absl::Status st = tls->Install(*m); !st.ok()) return st;

  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      (active_dir / "key.pem").string(), (active_dir / "cert.pem").string(),
      (active_dir / "ca.pem").string(), tls->refresh_seconds_);
  grpc::experimental::TlsServerCredentialsOptions so(provider);
  so.watch_root_certs();
  so.watch_identity_key_cert_pairs();
  so.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  tls->server_ = grpc::experimental::TlsServerCredentials(so);
  grpc::experimental::TlsChannelCredentialsOptions co;
  co.set_certificate_provider(provider);
  co.watch_root_certs();
  co.watch_identity_key_cert_pairs();
  co.set_verify_server_certs(true);
  // The server's certificate must carry the name dialled (or the tls_name override), as with
  // SslCredentials.
  co.set_certificate_verifier(std::make_shared<grpc::experimental::HostNameCertificateVerifier>());
  co.set_check_call_host(true);
  tls->channel_ = grpc::experimental::TlsCredentials(co);
  if (!tls->server_ || !tls->channel_) {
    return absl::InternalError("tls: gRPC refused the TLS credentials options");
  }
  return tls;
}

absl::Status ReloadableTls::Install(const TlsMaterial& m) {
  // Three renames: a refresh of gRPC's watcher that falls between them may read a mixed set, which
  // lasts one refresh period at most (handshakes in it fail and are retried by the dialer).
  if (absl::Status st = WriteAtomically(active_dir_, "ca.pem", m.ca_pem, 0600); !st.ok()) {
    return st;
  }
  if (absl::Status st = WriteAtomically(active_dir_, "key.pem", m.key_pem, 0600); !st.ok()) {
    return st;
  }
  return WriteAtomically(active_dir_, "cert.pem", m.cert_pem, 0600);
}

absl::Status ReloadableTls::Reload() {
  absl::StatusOr<TlsMaterial> m = LoadTls(files_);
  if (!m.ok()) return m.status();
  return Install(*m);
}

std::vector<std::string> PeerIdentities(const grpc::AuthContext& ctx) {
  std::vector<std::string> out;
  for (const char* prop : {"x509_common_name", "x509_subject_alternative_name"}) {
    for (const grpc::string_ref& v : ctx.FindPropertyValues(prop)) {
      std::string s(v.data(), v.size());
      if (std::find(out.begin(), out.end(), s) == out.end()) out.push_back(std::move(s));
    }
  }
  return out;
}

}  // namespace tvilling::transport
