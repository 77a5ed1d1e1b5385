#!/usr/bin/env bash
# tests/run.sh: installs what is needed, builds, and runs the whole test suite on a Debian 12 machine.
#   1. the Debian packages (deploy/install-deps.sh)
#   2. a RelWithDebInfo build and every ctest (unit, integration with real NBD clients, crash, bench smoke)
#   3. the unit tests again under ASan+UBSan
#   4. the unit tests of the suites whose code runs on several threads (storage, transport, nbd,
#      node, cli) under TSan
#   5. the NBD fuzzer (clang, libFuzzer) for a bounded time
# Build trees: build/ (main), build-asan/, build-tsan/, build-fuzz/. The first three are unity builds (CMake batches
# each target's sources: about a third less compile time on two cores). Exit status: non-zero if
# anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
JOBS=${JOBS:-$(nproc)}

./deploy/install-deps.sh

step() { printf '\n=== %s\n' "$*"; }

step "build (RelWithDebInfo)"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_UNITY_BUILD=ON >/dev/null
cmake --build build -j "$JOBS"

step "tests: unit, integration, crash, bench smoke"
(cd build && ctest -j "$JOBS" --output-on-failure --timeout 900)

step "build with ASan+UBSan (unit tests)"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DTVILLING_SANITIZE=address,undefined \
  -DTVILLING_BENCH=OFF -DCMAKE_UNITY_BUILD=ON >/dev/null
cmake --build build-asan -j "$JOBS" --target tvilling_storage_tests tvilling_nbd_tests \
  tvilling_ops_tests tvilling_metrics_tests tvilling_node_tests tvilling_core_tests \
  tvilling_transport_tests tvilling_coordinator_tests \
  tvilling_cli_tests log_crash_writer

step "unit tests under ASan+UBSan"
lsan_supp="$PWD/tests/lsan.supp"  # absolute: ctest runs each test in its own directory
(cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  LSAN_OPTIONS="suppressions=$lsan_supp" \
  ctest -j "$JOBS" -L unit --output-on-failure --timeout 900)

# TSan: only the suites whose code meets itself on several threads (the log's committer, syncer
# and gate; the streams' queue threads; the NBD connections; a node's threads; evacuate's parallel
# switchovers). The others (core, metrics, ops, coordinator) would add ~1.5 min for little.
step "build with TSan (unit tests of storage, transport, nbd, node, cli)"
cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DTVILLING_SANITIZE=thread \
  -DTVILLING_BENCH=OFF -DCMAKE_UNITY_BUILD=ON >/dev/null
cmake --build build-tsan -j "$JOBS" --target tvilling_storage_tests tvilling_transport_tests \
  tvilling_nbd_tests tvilling_node_tests tvilling_cli_tests log_crash_writer

step "unit tests under TSan"
tsan_supp="$PWD/tests/tsan.supp"
(cd build-tsan && TSAN_OPTIONS="suppressions=$tsan_supp" \
  ctest -j "$JOBS" -L unit --output-on-failure --timeout 900)

step "fuzz the NBD parser (clang + libFuzzer)"
cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
  -DCMAKE_CXX_COMPILER=clang++ -DTVILLING_FUZZ=ON -DTVILLING_BENCH=OFF >/dev/null
cmake --build build-fuzz -j "$JOBS" --target nbd_fuzz batch_fuzz
(cd build-fuzz && ctest -L fuzz --output-on-failure --timeout 300)

step "all tests passed"
