// pki.h: test helper: a development PKI made once per test binary by deploy/pki/make-dev-pki.sh.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "agent/transport/tls.h"

namespace tvilling::transport::testing {

// The directory holding the PKI; generated on first use (and removed at exit).
inline const std::filesystem::path& PkiDir() {
  static const std::filesystem::path dir = [] {
    std::string tmpl = (std::filesystem::temp_directory_path() / "tvilling-pki-XXXXXX").string();
    char* d = mkdtemp(tmpl.data());
    if (d == nullptr) std::abort();
    std::filesystem::path p(d);
    std::string cmd = "bash '" TVILLING_PKI_SCRIPT "' '" + p.string() + "/pki'";
    if (std::system(cmd.c_str()) != 0) {
      ADD_FAILURE() << "make-dev-pki.sh failed: " << cmd;
    }
    static std::filesystem::path cleanup = p;
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(cleanup, ec);
    });
    return p / "pki";
  }();
  return dir;
}

// Files for a leaf NAME (e.g. "site-a") under CA (e.g. "ca").
inline TlsFiles Files(const std::string& name, const std::string& ca = "ca") {
  return TlsFiles{PkiDir() / (ca + ".pem"), PkiDir() / (name + ".pem"), PkiDir() / (name + ".key")};
}

}  // namespace tvilling::transport::testing
