#!/usr/bin/env bash
# Installs every Debian 12 package that tvilling's build, tests, benchmarks and lab use.
# Idempotent: a second run installs nothing new. Needs root (or sudo).
set -euo pipefail

BUILD_PKGS=(
  build-essential cmake ninja-build pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  librocksdb-dev libboost-dev libssl-dev openssl
  libabsl-dev libtomlplusplus-dev libspdlog-dev libfmt-dev libcli11-dev
  libxxhash-dev libzstd-dev liblz4-dev libsystemd-dev libnbd-dev libjemalloc-dev libisal-dev
  libgtest-dev libgmock-dev libbenchmark-dev prometheus-cpp-dev help2man
  clang libclang-rt-14-dev clang-format
)
TEST_PKGS=(
  qemu-utils libnbd-bin python3-libnbd nbdkit fio fuse3 e2fsprogs util-linux
  iproute2 iputils-ping iperf3 nftables socat procps psmisc kmod curl
  etcd-server etcd-client prometheus
)
# The WAN lab (bench/run): QEMU's mirror as the side-by-side peer, plots.
LAB_PKGS=(
  qemu-system-common python3-matplotlib
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${BUILD_PKGS[@]}" "${TEST_PKGS[@]}" "${LAB_PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#BUILD_PKGS[@]}+${#TEST_PKGS[@]}+${#LAB_PKGS[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
