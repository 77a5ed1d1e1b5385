// allocator.h: which malloc tvillingd runs on, for its start-up log line.
#pragma once

#include <string>

namespace tvilling {

// "jemalloc 5.3.0-0-g54eaed1d8b56b1aa528be3bdd1877e59c56fa90c, dirty_decay_ms 10000, ..." (the
// settings in force, an operator's MALLOC_CONF included), or what else allocates (a sanitizer's
// allocator in sanitizer builds).
std::string DescribeAllocator();

}  // namespace tvilling
