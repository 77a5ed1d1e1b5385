// tls_test.cc: LoadTls accepts the development PKI and names the file for each kind of bad
// material.
#include "agent/transport/tls.h"

#include <gtest/gtest.h>

#include <fstream>

#include "tests/unit/transport/pki.h"

namespace tvilling::transport {
namespace {

using testing::Files;
using testing::PkiDir;

std::string Msg(const absl::Status& s) { return std::string(s.message()); }

TEST(Tls, LoadsGoodMaterial) {
  for (const char* site : {"site-a", "site-b", "site-c", "operator", "tenant-b"}) {
    auto m = LoadTls(Files(site));
    ASSERT_TRUE(m.ok()) << site << ": " << m.status();
    EXPECT_NE(m->cert_pem.find("BEGIN CERTIFICATE"), std::string::npos);
    EXPECT_NE(m->key_pem.find("PRIVATE KEY"), std::string::npos);
    EXPECT_NE(m->ca_pem.find("BEGIN CERTIFICATE"), std::string::npos);
  }
  EXPECT_TRUE(LoadTls(Files("other-site-a", "other-ca")).ok());
}

TEST(Tls, ExpiredCertificate) {
  auto m = LoadTls(Files("expired"));
  ASSERT_FALSE(m.ok());
  const std::string msg = Msg(m.status());
  EXPECT_NE(msg.find("certificate " + (PkiDir() / "expired.pem").string() + " expired on "),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("2020"), std::string::npos) << msg;
}

TEST(Tls, WrongCa) {
  auto m = LoadTls(Files("other-site-a"));
  ASSERT_FALSE(m.ok());
  const std::string msg = Msg(m.status());
  EXPECT_NE(msg.find((PkiDir() / "other-site-a.pem").string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("does not verify"), std::string::npos) << msg;
}

TEST(Tls, MismatchedKey) {
  TlsFiles f = Files("site-a");
  f.key = PkiDir() / "site-b.key";
  auto m = LoadTls(f);
  ASSERT_FALSE(m.ok());
  const std::string msg = Msg(m.status());
  EXPECT_NE(msg.find((PkiDir() / "site-b.key").string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("does not match"), std::string::npos) << msg;
}

TEST(Tls, MissingAndNonPemFiles) {
  TlsFiles f = Files("site-a");
  f.ca = PkiDir() / "nonexistent.pem";
  auto m = LoadTls(f);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(Msg(m.status()).find("nonexistent.pem"), std::string::npos) << m.status();

  const auto junk = PkiDir() / "junk.pem";
  std::ofstream(junk) << "not a certificate\n";
  f = Files("site-a");
  f.cert = junk;
  m = LoadTls(f);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(Msg(m.status()).find("junk.pem"), std::string::npos) << m.status();

  f = Files("site-a");
  f.key = junk;
  m = LoadTls(f);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(Msg(m.status()).find("junk.pem"), std::string::npos) << m.status();
}

}  // namespace
}  // namespace tvilling::transport
