// systemd_test.cc: sd_notify messages reach a NOTIFY_SOCKET the test binds, and the watchdog
// pings only while the event loop it watches runs handlers.
#include "agent/ops/systemd.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>
#include <filesystem>
#include <future>
#include <string>

namespace tvilling::ops {
namespace {

class NotifySocket {
 public:
  NotifySocket() {
    path_ = std::filesystem::temp_directory_path() /
            ("tvilling-notify-" + std::to_string(getpid()) + ".sock");
    std::filesystem::remove(path_);
    fd_ = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path_.c_str());
    EXPECT_EQ(bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    timeval tv{.tv_sec = 5, .tv_usec = 0};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setenv("NOTIFY_SOCKET", path_.c_str(), 1);
  }
  ~NotifySocket() {
    unsetenv("NOTIFY_SOCKET");
    close(fd_);
    std::filesystem::remove(path_);
  }
  std::string Receive() {
    char buf[4096];
    const ssize_t n = recv(fd_, buf, sizeof(buf), 0);
    return n < 0 ? std::string("<timeout>") : std::string(buf, static_cast<size_t>(n));
  }

 private:
  std::filesystem::path path_;
  int fd_ = -1;
};

TEST(NotifyTest, SendsStateLinesToNotifySocket) {
  NotifySocket sock;
  EXPECT_TRUE(Notify("READY=1\nSTATUS=serving"));
  EXPECT_EQ(sock.Receive(), "READY=1\nSTATUS=serving");
  EXPECT_TRUE(NotifyStatus("two\nlines"));
  EXPECT_EQ(sock.Receive(), "STATUS=two lines");
}

TEST(NotifyTest, NoSocketIsANoOp) {
  unsetenv("NOTIFY_SOCKET");
  EXPECT_TRUE(Notify("READY=1"));
}

TEST(NotifyTest, WatchdogIntervalComesFromTheEnvironment) {
  unsetenv("WATCHDOG_USEC");
  EXPECT_FALSE(WatchdogInterval().has_value());
  setenv("WATCHDOG_USEC", "200000", 1);
  setenv("WATCHDOG_PID", std::to_string(getpid()).c_str(), 1);
  ASSERT_TRUE(WatchdogInterval().has_value());
  EXPECT_EQ(WatchdogInterval()->count(), 200000);
  setenv("WATCHDOG_PID", "1", 1);  // for another process
  EXPECT_FALSE(WatchdogInterval().has_value());
  unsetenv("WATCHDOG_USEC");
  unsetenv("WATCHDOG_PID");
}

TEST(WatchdogTest, PingsOnlyWhileTheLoopRunsHandlers) {
  boost::asio::io_context io;
  auto guard = boost::asio::make_work_guard(io);
  std::thread loop([&] { io.run(); });
  std::atomic<int> pings{0};
  Watchdog dog({{"nbd", &io}}, std::chrono::milliseconds(40), [&] { ++pings; });
  dog.Start();
  auto wait_pings = [&](int at_least) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (pings.load() < at_least && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return pings.load();
  };
  EXPECT_GE(wait_pings(3), 3);

  // Block the loop in a handler: the pings stop.
  std::promise<void> release;
  std::promise<void> blocked;
  boost::asio::post(io, [&] {
    blocked.set_value();
    release.get_future().wait();
  });
  blocked.get_future().wait();
  std::this_thread::sleep_for(std::chrono::milliseconds(60));  // a ping in progress may finish
  const int frozen = pings.load();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(pings.load(), frozen) << "the watchdog was fed while its loop was stuck";

  // Unblock it: the pings resume.
  release.set_value();
  EXPECT_GE(wait_pings(frozen + 3), frozen + 3);
  dog.Stop();
  EXPECT_EQ(dog.pings(), static_cast<uint64_t>(pings.load()));
  guard.reset();
  io.stop();
  loop.join();
}

}  // namespace
}  // namespace tvilling::ops
