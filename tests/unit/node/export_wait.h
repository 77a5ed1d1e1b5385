// export_wait.h: waits for an export operation's completion in node tests.
#pragma once
#include <absl/status/status.h>

#include <chrono>
#include <functional>
#include <future>
#include <memory>

#include "agent/nbd/export.h"

namespace tvilling::node {

// Runs `op` and waits for its completion; an operation left hanging fails the test
// (DeadlineExceeded) instead of hanging it.
inline absl::Status Wait(const std::function<void(nbd::Export::Done)>& op) {
  auto p = std::make_shared<std::promise<absl::Status>>();
  auto f = p->get_future();
  op([p](absl::Status s) { p->set_value(s); });
  if (f.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    return absl::DeadlineExceededError("the operation did not complete within 10 s");
  }
  return f.get();
}

}  // namespace tvilling::node
