// thread_name.h: names the calling thread (at most 15 bytes, the kernel's limit), so that
// `top -H`, `perf`, /proc/PID/task/*/comm and gdb tell tvillingd's threads apart.
#pragma once

#include <pthread.h>

#include <algorithm>
#include <string_view>

namespace tvilling::storage {

inline void SetThreadName(std::string_view name) {
  char buf[16] = {};
  const size_t n = std::min<size_t>(name.size(), sizeof(buf) - 1);
  std::copy_n(name.data(), n, buf);
  pthread_setname_np(pthread_self(), buf);
}

}  // namespace tvilling::storage
