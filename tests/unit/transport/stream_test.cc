// stream_test.cc: Replication.Stream over real mutual TLS (and insecure) on 127.0.0.1: round trips,
// peer identity, a client from another CA refused at the handshake, Close statuses, Shutdown.
#include "agent/transport/stream.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include "agent/transport/tls.h"
#include "tests/unit/transport/pki.h"

namespace tvilling::transport {
namespace {

using namespace std::chrono_literals;
using testing::Files;
using testing::PkiDir;

std::string Slurp(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Waits on a predicate with a timeout, for state shared with gRPC threads.
struct Waiter {
  std::mutex mu;
  std::condition_variable cv;
  template <typename P>
  bool WaitFor(P pred, std::chrono::milliseconds t = 10s) {
    std::unique_lock<std::mutex> l(mu);
    return cv.wait_for(l, t, pred);
  }
  void Notify() { cv.notify_all(); }
};

// A replica-like handler: answers a Hello with a Decision and each Batch with a Position, or closes
// the stream with a configured status on the first message.
class Acceptor : public StreamAcceptor {
 public:
  class Handler : public ServerStreamHandler {
   public:
    Handler(Acceptor* a, std::shared_ptr<ServerStream> s) : a_(a), s_(std::move(s)) {}
    void OnMessage(v1::ToReplica& m) override {
      {
        std::lock_guard<std::mutex> l(a_->w.mu);
        a_->received.push_back(m);
      }
      a_->w.Notify();
      if (a_->close_with) {
        s_->Close(*a_->close_with);
        return;
      }
      v1::FromReplica out;
      if (m.has_hello()) {
        out.mutable_decision()->set_kind(v1::Decision::STREAM_FROM);
        out.mutable_decision()->set_start_lsn(m.hello().last_lsn() + 1);
        out.mutable_decision()->set_epoch(m.hello().epoch());
      } else if (m.has_batch()) {
        out.mutable_position()->set_received_lsn(m.batch().first_lsn() + m.batch().record_count() -
                                                 1);
      } else {
        return;
      }
      s_->Send(std::move(out));
    }
    void OnClosed(const absl::Status& s) override {
      {
        std::lock_guard<std::mutex> l(a_->w.mu);
        a_->closed.push_back(s);
      }
      a_->w.Notify();
    }

   private:
    Acceptor* a_;
    std::shared_ptr<ServerStream> s_;
  };

  std::unique_ptr<ServerStreamHandler> Accept(std::shared_ptr<ServerStream> stream,
                                              std::vector<std::string> ids,
                                              std::string addr) override {
    std::lock_guard<std::mutex> l(w.mu);
    identities = ids;
    address = addr;
    ++accepted;
    return std::make_unique<Handler>(this, std::move(stream));
  }

  Waiter w;
  std::optional<absl::Status> close_with;
  int accepted = 0;
  std::vector<std::string> identities;
  std::string address;
  std::vector<v1::ToReplica> received;
  std::vector<absl::Status> closed;
};

// The client side's record of what arrived.
struct ClientLog {
  Waiter w;
  std::vector<v1::FromReplica> messages;
  std::vector<absl::Status> closed;
  std::function<void(v1::FromReplica)> OnMessage() {
    return [this](v1::FromReplica m) {
      std::lock_guard<std::mutex> l(w.mu);
      messages.push_back(std::move(m));
      w.Notify();
    };
  }
  std::function<void(absl::Status)> OnClosed() {
    return [this](absl::Status s) {
      std::lock_guard<std::mutex> l(w.mu);
      closed.push_back(std::move(s));
      w.Notify();
    };
  }
};

class StreamTest : public ::testing::Test {
 protected:
  void StartServer(std::shared_ptr<grpc::ServerCredentials> creds) {
    auto s = ReplicationServer::Start("127.0.0.1:0", std::move(creds), &acceptor_);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = *std::move(s);
    ASSERT_GT(server_->port(), 0);
  }
  void StartTlsServer() {
    auto m = LoadTls(Files("site-b"));
    ASSERT_TRUE(m.ok()) << m.status();
    StartServer(ServerCredentials(*m));
  }
  std::string Target() const { return "127.0.0.1:" + std::to_string(server_->port()); }
  std::shared_ptr<grpc::Channel> TlsChannel(const std::string& who) {
    auto m = LoadTls(Files(who));
    EXPECT_TRUE(m.ok()) << m.status();
    return MakeChannel(Target(), ChannelCredentials(*m), "");
  }
  void TearDown() override {
    if (server_) server_->Shutdown();
    // Every client stream lets go of itself once its RPC is over, and their thread exits.
    EXPECT_TRUE(ClientStream::WaitAllReleased(std::chrono::seconds(10)));
  }

  static v1::ToReplica Hello() {
    v1::ToReplica m;
    m.mutable_hello()->set_group("g1");
    m.mutable_hello()->set_sender_site("site-a");
    m.mutable_hello()->set_epoch(3);
    m.mutable_hello()->set_last_lsn(41);
    m.mutable_hello()->set_sender_group_id(9);
    return m;
  }
  static v1::ToReplica Batch(uint64_t lsn) {
    v1::ToReplica m;
    m.mutable_batch()->set_epoch(3);
    m.mutable_batch()->set_first_lsn(lsn);
    m.mutable_batch()->set_record_count(10);
    m.mutable_batch()->set_records(std::string(1000, 'r'));
    return m;
  }

  Acceptor acceptor_;
  std::unique_ptr<ReplicationServer> server_;
};

TEST_F(StreamTest, TlsRoundTripAndIdentity) {
  StartTlsServer();
  ClientLog log;
  auto c = ClientStream::Open(TlsChannel("site-a"), log.OnMessage(), log.OnClosed());
  c->Send(Hello());
  constexpr int kBatches = 50;
  for (int i = 0; i < kBatches; ++i) c->Send(Batch(42 + 10 * i));
  ASSERT_TRUE(log.w.WaitFor([&] { return log.messages.size() == kBatches + 1; }))
      << log.messages.size();
  EXPECT_EQ(c->queued_bytes(), 0u);
  {
    std::lock_guard<std::mutex> l(log.w.mu);
    ASSERT_TRUE(log.messages[0].has_decision());
    EXPECT_EQ(log.messages[0].decision().start_lsn(), 42u);
    for (int i = 0; i < kBatches; ++i) {  // in order
      ASSERT_TRUE(log.messages[i + 1].has_position());
      EXPECT_EQ(log.messages[i + 1].position().received_lsn(), 42u + 10 * i + 9);
    }
  }
  {
    std::lock_guard<std::mutex> l(acceptor_.w.mu);
    EXPECT_EQ(acceptor_.accepted, 1);
    ASSERT_FALSE(acceptor_.identities.empty());
    EXPECT_EQ(acceptor_.identities[0], "site-a");
    EXPECT_NE(std::find(acceptor_.identities.begin(), acceptor_.identities.end(), "localhost"),
              acceptor_.identities.end());
    EXPECT_NE(acceptor_.address.find("127.0.0.1"), std::string::npos) << acceptor_.address;
    ASSERT_EQ(acceptor_.received.size(), kBatches + 1u);
    EXPECT_EQ(acceptor_.received[0].hello().sender_group_id(), 9u);
  }
  c->Close(absl::CancelledError("done"));
  {
    std::lock_guard<std::mutex> l(log.w.mu);
    ASSERT_EQ(log.closed.size(), 1u);  // reported by Close itself
    EXPECT_EQ(log.closed[0].message(), "done");
  }
  // The server side learns of it too.
  ASSERT_TRUE(acceptor_.w.WaitFor([&] { return acceptor_.closed.size() == 1; }));
  EXPECT_EQ(acceptor_.closed[0].code(), absl::StatusCode::kCancelled);
  c->Close(absl::OkStatus());  // second Close: no second on_closed
  EXPECT_EQ(log.closed.size(), 1u);
}

TEST_F(StreamTest, ClientFromOtherCaIsRefusedAtHandshake) {
  StartTlsServer();
  TlsMaterial m{Slurp(PkiDir() / "ca.pem"), Slurp(PkiDir() / "other-site-a.pem"),
                Slurp(PkiDir() / "other-site-a.key")};
  ClientLog log;
  auto c = ClientStream::Open(MakeChannel(Target(), ChannelCredentials(m), ""), log.OnMessage(),
                              log.OnClosed());
  c->Send(Hello());
  ASSERT_TRUE(log.w.WaitFor([&] { return !log.closed.empty(); }));
  EXPECT_EQ(log.closed[0].code(), absl::StatusCode::kUnavailable) << log.closed[0];
  EXPECT_TRUE(log.messages.empty());
  {
    std::lock_guard<std::mutex> l(acceptor_.w.mu);
    EXPECT_EQ(acceptor_.accepted, 0);
  }
  // Debian's gRPC 1.51 can trip "ref_counted.h: assertion failed: prior > 0" on one of its own
  // threads when the process exits while it still cleans up the failed handshake (seen once in
  // ~20 full runs, after the test had passed). Let that cleanup finish before teardown.
  c.reset();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
}

// Certificate rotation with ReloadableTls: the server's certificate is replaced (by one from
// another CA, so the two are told apart by who can still connect) while a stream is open. The open
// stream keeps working; new handshakes see the new certificate; a broken set of files is refused
// by Reload and the certificate in use stays.
TEST_F(StreamTest, ReloadedCertificatesServeNewHandshakesAndKeepOpenStreams) {
  const std::filesystem::path dir = PkiDir().parent_path() / "reload";
  std::filesystem::create_directories(dir);
  {
    std::ofstream bundle(dir / "ca.pem");
    bundle << Slurp(PkiDir() / "ca.pem") << Slurp(PkiDir() / "other-ca.pem");
  }
  auto put = [&](const std::string& from_leaf) {
    std::filesystem::copy_file(PkiDir() / (from_leaf + ".pem"), dir / "server.pem",
                               std::filesystem::copy_options::overwrite_existing);
    std::filesystem::copy_file(PkiDir() / (from_leaf + ".key"), dir / "server.key",
                               std::filesystem::copy_options::overwrite_existing);
  };
  put("site-b");
  const TlsFiles files{dir / "ca.pem", dir / "server.pem", dir / "server.key"};
  auto tls = ReloadableTls::Create(files, dir / "active", 1);
  ASSERT_TRUE(tls.ok()) << tls.status();
  StartServer((*tls)->server_credentials());

  // Clients that trust only one of the two CAs (each with a certificate the server accepts).
  auto client_trusting = [&](const std::string& ca) {
    TlsMaterial m{Slurp(PkiDir() / (ca + ".pem")), Slurp(PkiDir() / "site-a.pem"),
                  Slurp(PkiDir() / "site-a.key")};
    return MakeChannel(Target(), ChannelCredentials(m), "");
  };
  // Opens a stream, sends a Hello and waits for the answer or the end; true if answered.
  size_t probes_ok = 0;
  auto handshake_ok = [&](std::shared_ptr<grpc::Channel> channel) {
    ClientLog log;
    auto c = ClientStream::Open(std::move(channel), log.OnMessage(), log.OnClosed());
    c->Send(Hello());
    EXPECT_TRUE(log.w.WaitFor([&] { return !log.messages.empty() || !log.closed.empty(); }));
    const bool ok = !log.messages.empty();
    c->Close(absl::CancelledError("probe done"));
    if (ok) ++probes_ok;
    return ok;
  };

  ClientLog log;
  auto open = ClientStream::Open(client_trusting("ca"), log.OnMessage(), log.OnClosed());
  open->Send(Hello());
  open->Send(Batch(42));
  ASSERT_TRUE(log.w.WaitFor([&] { return log.messages.size() == 2; }));
  EXPECT_FALSE(handshake_ok(client_trusting("other-ca")));  // site-b's cert is from "ca"

  // Rotate to a certificate from the other CA.
  put("other-site-a");
  ASSERT_TRUE((*tls)->Reload().ok());
  const auto deadline = std::chrono::steady_clock::now() + 15s;
  bool rotated = false;
  while (!rotated && std::chrono::steady_clock::now() < deadline) {
    rotated = handshake_ok(client_trusting("other-ca"));
    if (!rotated) std::this_thread::sleep_for(200ms);
  }
  ASSERT_TRUE(rotated) << "new handshakes never saw the new certificate";
  EXPECT_FALSE(handshake_ok(client_trusting("ca")));

  // The stream opened before the rotation is still the same stream and still works.
  open->Send(Batch(52));
  ASSERT_TRUE(log.w.WaitFor([&] { return log.messages.size() == 3; }));
  EXPECT_TRUE(log.closed.empty());
  // On the server: every stream accepted except the first one (the probes) has ended, and the
  // first one has not.
  ASSERT_TRUE(acceptor_.w.WaitFor([&] { return acceptor_.closed.size() == probes_ok; }));
  {
    std::lock_guard<std::mutex> l(acceptor_.w.mu);
    EXPECT_EQ(acceptor_.accepted, static_cast<int>(probes_ok) + 1);
  }

  // A key that does not match its certificate is refused, naming the file; the rotated
  // certificate stays in use.
  std::filesystem::copy_file(PkiDir() / "site-c.key", dir / "server.key",
                             std::filesystem::copy_options::overwrite_existing);
  absl::Status bad = (*tls)->Reload();
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.message()).find("server"), std::string::npos) << bad;
  std::this_thread::sleep_for(1500ms);  // past a refresh of the watcher
  EXPECT_TRUE(handshake_ok(client_trusting("other-ca")));
  open->Send(Batch(62));
  ASSERT_TRUE(log.w.WaitFor([&] { return log.messages.size() == 4; }));
  open->Close(absl::CancelledError("done"));
  // The server uses `tls`'s credentials and certificate files: stop it before they go with this
  // scope (TearDown would stop it only after them; CI saw the heap corrupted once at that exit).
  server_->Shutdown();
  server_.reset();
}

// The dialer's reloadable credentials still check the server's name (the tls_name override).
TEST_F(StreamTest, ReloadableChannelCredentialsCheckTheServerName) {
  StartTlsServer();  // site-b
  auto tls = ReloadableTls::Create(Files("site-a"), PkiDir().parent_path() / "active-a", 1);
  ASSERT_TRUE(tls.ok()) << tls.status();
  for (const auto& [name, want_ok] : {std::pair<std::string, bool>{"site-b", true},
                                      std::pair<std::string, bool>{"site-c", false}}) {
    ClientLog log;
    auto c = ClientStream::Open(MakeChannel(Target(), (*tls)->channel_credentials(), name),
                                log.OnMessage(), log.OnClosed());
    c->Send(Hello());
    ASSERT_TRUE(log.w.WaitFor([&] { return !log.messages.empty() || !log.closed.empty(); }));
    EXPECT_EQ(!log.messages.empty(), want_ok) << "tls_name " << name;
    c->Close(absl::CancelledError("done"));
  }
}

TEST_F(StreamTest, ServerCloseStatusReachesClient) {
  acceptor_.close_with = absl::PermissionDeniedError("x");
  StartTlsServer();
  ClientLog log;
  auto c = ClientStream::Open(TlsChannel("site-a"), log.OnMessage(), log.OnClosed());
  c->Send(Hello());
  ASSERT_TRUE(log.w.WaitFor([&] { return !log.closed.empty(); }));
  EXPECT_EQ(log.closed[0].code(), absl::StatusCode::kPermissionDenied) << log.closed[0];
  EXPECT_EQ(log.closed[0].message(), "x");
  ASSERT_TRUE(acceptor_.w.WaitFor([&] { return acceptor_.closed.size() == 1; }));
  EXPECT_EQ(acceptor_.closed[0].code(), absl::StatusCode::kPermissionDenied);
}

TEST_F(StreamTest, ReplyThenCloseDeliversReplyFirst) {
  // Close after Send: the queued Decision is written before the status.
  class RefuseAcceptor : public StreamAcceptor {
   public:
    std::unique_ptr<ServerStreamHandler> Accept(std::shared_ptr<ServerStream> s,
                                                std::vector<std::string>, std::string) override {
      v1::FromReplica d;
      d.mutable_decision()->set_kind(v1::Decision::REFUSE);
      d.mutable_decision()->set_code(v1::REFUSE_NOT_AUTHORISED);
      s->Send(d);
      s->Close(absl::PermissionDeniedError("peer not authorised"));
      return nullptr;  // refused anyway; the first Close wins
    }
  } refuse;
  auto srv = ReplicationServer::Start("127.0.0.1:0", grpc::InsecureServerCredentials(), &refuse);
  ASSERT_TRUE(srv.ok()) << srv.status();
  ClientLog log;
  auto c = ClientStream::Open(MakeChannel("127.0.0.1:" + std::to_string((*srv)->port()),
                                          grpc::InsecureChannelCredentials(), ""),
                              log.OnMessage(), log.OnClosed());
  ASSERT_TRUE(log.w.WaitFor([&] { return !log.closed.empty(); }));
  EXPECT_EQ(log.closed[0].code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(log.closed[0].message(), "peer not authorised");
  ASSERT_EQ(log.messages.size(), 1u);
  EXPECT_EQ(log.messages[0].decision().code(), v1::REFUSE_NOT_AUTHORISED);
  (*srv)->Shutdown();
}

TEST_F(StreamTest, InsecureWorks) {
  StartServer(grpc::InsecureServerCredentials());
  ClientLog log;
  auto c = ClientStream::Open(MakeChannel(Target(), grpc::InsecureChannelCredentials(), ""),
                              log.OnMessage(), log.OnClosed());
  c->Send(Hello());
  ASSERT_TRUE(log.w.WaitFor([&] { return log.messages.size() == 1; }));
  EXPECT_TRUE(log.messages[0].has_decision());
  {
    std::lock_guard<std::mutex> l(acceptor_.w.mu);
    EXPECT_TRUE(acceptor_.identities.empty());
  }
  // `log` dies with this scope: Close guarantees no callback touches it afterwards.
  c->Close(absl::CancelledError("test over"));
}

// Sends from threads outside gRPC's reactions race with the stream's end (the server closes it,
// or the client cancels it from a third thread). Before the client held the call open for such
// Sends, the primary crashed with "pure virtual method called" when a replica was killed under
// load: OnDone freed the call between Send's check and its StartWrite. ASan sees the old bug here.
TEST_F(StreamTest, SendsFromOtherThreadsRaceWithTheEnd) {
  acceptor_.close_with = absl::AbortedError("closed by the test server");
  StartServer(grpc::InsecureServerCredentials());
  auto channel = MakeChannel(Target(), grpc::InsecureChannelCredentials(), "");
  for (int round = 0; round < 60; ++round) {
    ClientLog log;
    auto c = ClientStream::Open(channel, log.OnMessage(), log.OnClosed());
    std::atomic<bool> stop{false};
    std::vector<std::thread> senders;
    for (int t = 0; t < 2; ++t) {
      senders.emplace_back([&, t] {
        for (uint64_t i = 0; !stop.load(); ++i) c->Send(Batch(1 + 10 * (2 * i + t)));
      });
    }
    std::thread closer;
    if (round % 3 == 0) {  // a client-side Close racing with the Sends and the server's end
      closer = std::thread([&] { c->Close(absl::CancelledError("closed by the test client")); });
    }
    ASSERT_TRUE(log.w.WaitFor([&] { return !log.closed.empty(); }));
    stop = true;
    for (auto& s : senders) s.join();
    if (closer.joinable()) closer.join();
    c->Close(absl::CancelledError("test round over"));
    std::lock_guard<std::mutex> l(log.w.mu);
    EXPECT_EQ(log.closed.size(), 1u);
  }
  {
    std::lock_guard<std::mutex> l(acceptor_.w.mu);
    // The 40 rounds without a client-side Close end only by the server's; the others may be
    // cancelled before the server sees them.
    EXPECT_GE(acceptor_.accepted, 40);
  }
}

TEST_F(StreamTest, ShutdownWithOpenStreamIsQuick) {
  StartTlsServer();
  ClientLog log;
  auto c = ClientStream::Open(TlsChannel("site-a"), log.OnMessage(), log.OnClosed());
  c->Send(Hello());
  ASSERT_TRUE(log.w.WaitFor([&] { return log.messages.size() == 1; }));
  const auto t0 = std::chrono::steady_clock::now();
  server_->Shutdown();
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_LT(took, 2s);
  ASSERT_TRUE(acceptor_.w.WaitFor([&] { return acceptor_.closed.size() == 1; }));
  EXPECT_EQ(acceptor_.closed[0].code(), absl::StatusCode::kCancelled);
  ASSERT_TRUE(log.w.WaitFor([&] { return !log.closed.empty(); }));
  EXPECT_FALSE(log.closed[0].ok());
  c->Send(Batch(42));  // after the end: dropped, no crash
  EXPECT_EQ(c->queued_bytes(), 0u);
}

// The unary verify calls: answered from another thread after the handler returned, with the
// caller's identity; an error status reaches the caller as it was; a method the acceptor does not
// serve is UNIMPLEMENTED; and Shutdown waits for an answer that is still outstanding.
class VerifyingAcceptor : public Acceptor {
 public:
  void VerifyChunks(const v1::VerifyChunksRequest& req, std::vector<std::string> ids, std::string,
                    Done<v1::VerifyChunksReply> done) override {
    std::thread([req, ids, done = std::move(done), this] {
      std::this_thread::sleep_for(std::chrono::milliseconds(req.wait_ms()));
      answered.fetch_add(1);  // before `done`: once done is called the server may shut down
      if (req.sender_site() == "refuse") {
        done(absl::FailedPreconditionError("refused by the test"));
      } else {
        v1::VerifyChunksReply r;
        r.set_applied_lsn(ids.empty() ? 0 : 7);
        done(std::move(r));
      }
    }).detach();
  }
  std::atomic<int> answered{0};
};

TEST_F(StreamTest, UnaryCallsAreAnsweredFromOtherThreads) {
  VerifyingAcceptor acceptor;
  auto tls = LoadTls(Files("site-b"));
  ASSERT_TRUE(tls.ok()) << tls.status();
  auto s = ReplicationServer::Start("127.0.0.1:0", ServerCredentials(*tls), &acceptor);
  ASSERT_TRUE(s.ok()) << s.status();
  auto client_tls = LoadTls(Files("site-a"));
  ASSERT_TRUE(client_tls.ok());
  auto channel =
      MakeChannel("127.0.0.1:" + std::to_string((*s)->port()), ChannelCredentials(*client_tls), "");
  v1::VerifyChunksRequest req;
  req.set_sender_site("site-a");
  req.set_wait_ms(20);
  auto r = CallVerifyChunks(channel, req, 10s);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->applied_lsn(), 7u);  // the handler saw the client's certificate
  // Several in a row and at once: each call is re-armed for the next.
  std::vector<std::thread> callers;
  std::atomic<int> ok{0};
  for (int i = 0; i < 4; ++i) {
    callers.emplace_back([&] {
      for (int j = 0; j < 5; ++j) ok += CallVerifyChunks(channel, req, 10s).ok() ? 1 : 0;
    });
  }
  for (auto& t : callers) t.join();
  EXPECT_EQ(ok.load(), 20);
  req.set_sender_site("refuse");
  r = CallVerifyChunks(channel, req, 10s);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_EQ(r.status().message(), "refused by the test");
  auto m = CallMarkResync(channel, v1::MarkResyncRequest(), 10s);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnimplemented) << m.status();
  // An answer outstanding at Shutdown: Shutdown waits for it (the call holds the acceptor).
  req.set_sender_site("site-a");
  req.set_wait_ms(300);
  std::thread late([&] { (void)CallVerifyChunks(channel, req, 10s); });
  while (acceptor.answered.load() < 22) std::this_thread::sleep_for(1ms);
  std::this_thread::sleep_for(100ms);  // the late call has reached the handler
  (*s)->Shutdown();
  EXPECT_EQ(acceptor.answered.load(), 23);
  late.join();
}

TEST_F(StreamTest, ListenErrorIsReported) {
  StartServer(grpc::InsecureServerCredentials());
  Acceptor other;
  auto s = ReplicationServer::Start(Target(), grpc::InsecureServerCredentials(), &other);
  // Port reuse may be allowed by SO_REUSEPORT; an invalid address must fail either way.
  auto bad = ReplicationServer::Start("256.1.1.1:1", grpc::InsecureServerCredentials(), &other);
  EXPECT_FALSE(bad.ok());
  if (s.ok()) (*s)->Shutdown();
}

}  // namespace
}  // namespace tvilling::transport
