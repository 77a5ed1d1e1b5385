// units.h: sizes and durations the core tests write their cases in.
#pragma once
#include <cstdint>

#include "agent/core/replication.h"

namespace tvilling::core {

inline constexpr uint64_t kKiB = 1024;
inline constexpr uint64_t kMiB = 1024 * kKiB;
inline constexpr Nanos kMs = 1'000'000;
inline constexpr Nanos kS = 1000 * kMs;

}  // namespace tvilling::core
