// etcd_cluster.h: runs the real Debian `etcd` binary (3.4) for integration tests: one or more
// members on 127.0.0.1 with free ports, data in a temp dir, every process stopped by its PID.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "agent/coordinator/etcd_client.h"

namespace tvilling::testing {

inline int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

inline std::filesystem::path MakeTempDir(const char* tag) {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = fmt::format("{}/tvilling-{}-XXXXXX", base ? base : "/tmp", tag);
  if (mkdtemp(tmpl.data()) == nullptr) return {};
  return tmpl;
}

struct EtcdTlsFiles {
  std::string ca, cert, key;  // server side; client certs are required when ca is set
};

class EtcdCluster {
 public:
  // Starts `n` members. With `tls`, clients must use https and present a certificate.
  explicit EtcdCluster(int n, std::optional<EtcdTlsFiles> tls = std::nullopt)
      : n_(n), tls_(std::move(tls)) {
    dir_ = MakeTempDir("etcd");
    for (int i = 0; i < n; ++i) {
      members_.push_back({fmt::format("m{}", i), FreePort(), FreePort(), -1});
    }
    for (int i = 0; i < n; ++i) Start(i, /*initial=*/true);
  }
  ~EtcdCluster() {
    for (int i = 0; i < n_; ++i) Kill(i);
    std::error_code ec;
    if (std::getenv("TVILLING_KEEP_TMP") == nullptr) std::filesystem::remove_all(dir_, ec);
  }
  EtcdCluster(const EtcdCluster&) = delete;
  EtcdCluster& operator=(const EtcdCluster&) = delete;

  std::string endpoint(int i) const { return fmt::format("127.0.0.1:{}", members_[i].client); }
  std::vector<std::string> endpoints() const {
    std::vector<std::string> out;
    for (int i = 0; i < n_; ++i) out.push_back(endpoint(i));
    return out;
  }
  int member_of(const std::string& endpoint) const {
    for (int i = 0; i < n_; ++i) {
      if (this->endpoint(i) == endpoint) return i;
    }
    return -1;
  }
  const std::filesystem::path& dir() const { return dir_; }

  // Waits until every running member answers Status. Returns false after `timeout`.
  bool WaitReady(std::chrono::seconds timeout = std::chrono::seconds(30)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (int i = 0; i < n_; ++i) {
      if (members_[i].pid < 0) continue;
      coordinator::EtcdOptions o = ClientOptions({endpoint(i)});
      auto c = coordinator::EtcdClient::Create(o);
      if (!c.ok()) return false;
      while (true) {
        auto st = (*c)->Status();
        if (st.ok() && st->leader != 0) {
          // A leader is known; check a linearizable read works too.
          auto g = (*c)->Get("/ready");
          if (g.ok()) break;
          last_error_ = g.status().ToString();
        } else {
          last_error_ = st.ok() ? "no leader yet" : st.status().ToString();
        }
        if (std::chrono::steady_clock::now() > deadline) {
          fmt::print(stderr, "etcd member {} not ready: {}\n", i, last_error_);
          return false;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
    return true;
  }

  // Client options for these members (TLS material only if the cluster uses TLS).
  coordinator::EtcdOptions ClientOptions(std::vector<std::string> endpoints) const {
    coordinator::EtcdOptions o;
    o.endpoints = std::move(endpoints);
    if (tls_) {
      o.tls = coordinator::EtcdTls{tls_->ca, client_cert_, client_key_, {}};
    }
    return o;
  }
  void SetClientCert(std::string cert, std::string key) {
    client_cert_ = std::move(cert);
    client_key_ = std::move(key);
  }

  void Kill(int i, int sig = SIGKILL) {
    Member& m = members_[i];
    if (m.pid <= 0) return;
    ::kill(m.pid, sig);
    int status = 0;
    waitpid(m.pid, &status, 0);
    m.pid = -1;
  }
  void Restart(int i) { Start(i, /*initial=*/false); }
  bool running(int i) const { return members_[i].pid > 0; }

 private:
  struct Member {
    std::string name;
    int client, peer;
    pid_t pid;
  };

  void Start(int i, bool initial) {
    Member& m = members_[i];
    const std::string scheme = tls_ ? "https" : "http";
    std::string cluster;
    for (int j = 0; j < n_; ++j) {
      cluster +=
          fmt::format("{}{}=http://127.0.0.1:{}", j ? "," : "", members_[j].name, members_[j].peer);
    }
    std::vector<std::string> args = {
        "etcd",
        "--name",
        m.name,
        "--data-dir",
        (dir_ / m.name).string(),
        "--listen-client-urls",
        fmt::format("{}://127.0.0.1:{}", scheme, m.client),
        "--advertise-client-urls",
        fmt::format("{}://127.0.0.1:{}", scheme, m.client),
        "--listen-peer-urls",
        fmt::format("http://127.0.0.1:{}", m.peer),
        "--initial-advertise-peer-urls",
        fmt::format("http://127.0.0.1:{}", m.peer),
        "--initial-cluster",
        cluster,
        "--initial-cluster-state",
        initial ? "new" : "existing",
        "--initial-cluster-token",
        dir_.filename().string(),
        "--logger",
        "zap",
        "--log-outputs",
        (dir_ / (m.name + ".log")).string(),
    };
    if (tls_) {
      args.insert(args.end(), {"--cert-file", tls_->cert, "--key-file", tls_->key,
                               "--trusted-ca-file", tls_->ca, "--client-cert-auth"});
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t pid = fork();
    if (pid == 0) {
      int devnull = open("/dev/null", O_RDWR);
      dup2(devnull, 0);
      int out = open((dir_ / (m.name + ".out")).c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      dup2(out, 1);
      dup2(out, 2);
      execvp("etcd", argv.data());
      _exit(127);
    }
    m.pid = pid;
  }

  int n_;
  std::optional<EtcdTlsFiles> tls_;
  std::string client_cert_, client_key_;
  std::string last_error_;
  std::filesystem::path dir_;
  std::vector<Member> members_;
};

}  // namespace tvilling::testing
