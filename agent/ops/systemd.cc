// systemd.cc: sd_notify(3) and the event-loop watchdog.
#include "agent/ops/systemd.h"

#include <spdlog/spdlog.h>
#include <string.h>
#include <systemd/sd-daemon.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/post.hpp>

namespace tvilling::ops {

bool Notify(std::string_view state) {
  const std::string s(state);
  const int rc = sd_notify(0, s.c_str());
  if (rc < 0) {
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true)) {
      spdlog::warn("systemd: cannot send a notification to $NOTIFY_SOCKET: {}", strerror(-rc));
    }
    return false;
  }
  return true;
}

bool NotifyStatus(std::string_view text) {
  std::string line = "STATUS=";
  for (char c : text) line.push_back(c == '\n' ? ' ' : c);
  return Notify(line);
}

std::optional<std::chrono::microseconds> WatchdogInterval() {
  uint64_t usec = 0;
  if (sd_watchdog_enabled(0, &usec) <= 0 || usec == 0) return std::nullopt;
  return std::chrono::microseconds(usec);
}

Watchdog::Watchdog(std::vector<Loop> loops, std::chrono::microseconds interval,
                   std::function<void()> ping)
    : loops_(std::move(loops)),
      period_(std::max<std::chrono::microseconds>(interval / 2, std::chrono::milliseconds(1))),
      ping_(std::move(ping)),
      state_(std::make_shared<State>()) {
  state_->answered.assign(loops_.size(), false);
}

Watchdog::~Watchdog() { Stop(); }

void Watchdog::Start() {
  thread_ = std::thread([this] { Run(); });
}

void Watchdog::Stop() {
  {
    std::lock_guard l(state_->mu);
    state_->stopping = true;
  }
  state_->cv.notify_all();
  if (thread_.joinable()) thread_.join();
}

uint64_t Watchdog::pings() const {
  std::lock_guard l(state_->mu);
  return state_->pings;
}

void Watchdog::Run() {
  State& st = *state_;
  std::unique_lock l(st.mu);
  bool stalled = false;
  while (!st.stopping) {
    const auto deadline = std::chrono::steady_clock::now() + period_;
    const uint64_t gen = ++st.generation;
    std::fill(st.answered.begin(), st.answered.end(), false);
    for (size_t i = 0; i < loops_.size(); ++i) {
      boost::asio::post(*loops_[i].io, [state = state_, gen, i] {
        std::lock_guard pl(state->mu);
        if (gen != state->generation) return;  // a late answer to an old probe
        state->answered[i] = true;
        state->cv.notify_all();
      });
    }
    const auto all_answered = [&] {
      return std::all_of(st.answered.begin(), st.answered.end(), [](bool b) { return b; });
    };
    st.cv.wait_until(l, deadline, [&] { return st.stopping || all_answered(); });
    if (st.stopping) break;
    if (all_answered()) {
      ++st.pings;
      if (stalled) spdlog::info("watchdog: every event loop answers again; feeding systemd");
      stalled = false;
      l.unlock();
      ping_();
      l.lock();
      st.cv.wait_until(l, deadline, [&] { return st.stopping; });
    } else if (!stalled) {
      stalled = true;
      std::string late;
      for (size_t i = 0; i < loops_.size(); ++i) {
        if (!st.answered[i]) late += (late.empty() ? "" : ", ") + loops_[i].name;
      }
      spdlog::error(
          "watchdog: event loop(s) {} did not run a probe within {} ms; not feeding systemd's "
          "watchdog (it restarts the agent if this lasts)",
          late, std::chrono::duration_cast<std::chrono::milliseconds>(period_).count());
    }
  }
}

}  // namespace tvilling::ops
