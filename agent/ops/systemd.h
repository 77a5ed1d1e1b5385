// systemd.h: tvillingd under systemd (Type=notify, WatchdogSec; deploy/systemd/tvillingd.service).
//
// Notify() sends sd_notify(3) state lines (READY=1, STATUS=..., STOPPING=1, WATCHDOG=1) to
// $NOTIFY_SOCKET; without it (not started by systemd) every call is a no-op. READY=1 is sent only
// once the logs are replayed and every listener accepts, so `systemctl start` returns when the
// agent really serves.
//
// Watchdog feeds systemd's watchdog (WATCHDOG=1 every WatchdogSec / 2) only while every event loop
// it watches runs handlers: each period it posts a probe to each loop and pings only if all of them
// ran it in time. A loop stuck in a handler (a deadlock, a blocking call) stops the pings, and
// systemd kills and restarts the agent (Restart=on-failure) once WatchdogSec passes.
#pragma once

#include <boost/asio/io_context.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace tvilling::ops {

// Sends one sd_notify message, e.g. "READY=1\nSTATUS=serving". Returns false only on a send error
// (logged once); true also when there is no $NOTIFY_SOCKET.
bool Notify(std::string_view state);
// STATUS=<text> (newlines replaced: a state line is one line).
bool NotifyStatus(std::string_view text);

// The watchdog interval systemd asked for ($WATCHDOG_USEC, for this PID), if any.
std::optional<std::chrono::microseconds> WatchdogInterval();

class Watchdog {
 public:
  struct Loop {
    std::string name;  // for the log: "nbd", "metrics"
    boost::asio::io_context* io;
  };
  // Every `interval` / 2 probes each loop and, if all answered within that half period, calls
  // `ping` (Notify("WATCHDOG=1") in the agent).
  Watchdog(std::vector<Loop> loops, std::chrono::microseconds interval, std::function<void()> ping);
  ~Watchdog();
  void Start();
  void Stop();
  uint64_t pings() const;

 private:
  void Run();
  const std::vector<Loop> loops_;
  const std::chrono::microseconds period_;
  const std::function<void()> ping_;
  // Shared with the probes in flight, which may outlive the Watchdog in a loop that never runs
  // them.
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    bool stopping = false;
    uint64_t generation = 0;
    std::vector<bool> answered;
    uint64_t pings = 0;
  };
  std::shared_ptr<State> state_;
  std::thread thread_;
};

}  // namespace tvilling::ops
