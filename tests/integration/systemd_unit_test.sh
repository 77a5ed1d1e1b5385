#!/usr/bin/env bash
# systemd_unit_test.sh UNIT TVILLINGD [--installed]: `systemd-analyze verify` on tvillingd's unit.
# systemd-analyze exits 0 on many problems (an unknown key, a bad value) and only prints them, so
# any output counts as a failure. The in-tree unit is checked with ExecStart pointing at the built
# binary and without the man pages (which only the package installs); --installed checks the unit
# as the package installed it, man pages included. A broken copy must be caught too, so that this
# test cannot pass by ignoring what systemd-analyze says.
set -euo pipefail
unit=$1 tvillingd=$(realpath "$2") mode=${3:-}
tmp=$(mktemp -d /tmp/tvilling-unit.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

verify() {  # verify FILE [extra args]: prints what systemd-analyze said; returns non-zero on any
  local out rc=0
  out=$(systemd-analyze verify "${@:2}" "$1" 2>&1) || rc=$?
  if [ -n "$out" ] || [ $rc -ne 0 ]; then
    printf '%s\n' "$out"
    return 1
  fi
}

if [ "$mode" = "--installed" ]; then
  man_args=()
  command -v man >/dev/null || man_args=(--man=no)
  verify "$unit" "${man_args[@]}" || { echo "FAIL: systemd-analyze verify $unit"; exit 1; }
  echo "PASS: $unit verifies as installed"
  exit 0
fi

sed "s|/usr/bin/tvillingd|$tvillingd|g" "$unit" >"$tmp/tvillingd.service"
verify "$tmp/tvillingd.service" --man=no || { echo "FAIL: systemd-analyze verify $unit"; exit 1; }
echo "PASS: $unit verifies"

for breakage in 's/^Type=notify/Type=notifyy/' 's/^WatchdogSec=/WatchdogSecc=/' \
    "s|^ExecStart=.*|ExecStart=$tmp/missing-binary|"; do
  sed "$breakage" "$tmp/tvillingd.service" >"$tmp/broken.service"
  if out=$(verify "$tmp/broken.service" --man=no); then
    echo "FAIL: a unit broken with '$breakage' passed verification"
    exit 1
  fi
  echo "ok: broken with '$breakage' is caught: $(head -1 <<<"$out")"
done
