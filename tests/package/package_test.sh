#!/usr/bin/env bash
# package_test.sh BUILD_DIR SOURCE_DIR: builds the .deb with CPack, installs it on this machine
# with dpkg, checks what an operator gets, and removes it again.
#
#   - tvillingd --version and tvillingctl --version run from /usr/bin
#   - the user tvilling exists; /var/lib/tvilling is tvilling:tvilling 0750; /etc/tvilling exists
#   - the installed unit passes `systemd-analyze verify` (man pages included: its Documentation=)
#   - the man pages open; bash completion works; the example config checks with the installed
#     binary
#   - nothing was started: no process runs as tvilling
#   - walkthrough.py: the packaged PKI script and two-site examples, two agents run as tvilling
#     under a NOTIFY_SOCKET harness (READY=1, a mirrored write read back on the replica,
#     STOPPING=1 and exit 0)
#   - dpkg -r removes the binaries and the unit, and keeps /var/lib/tvilling (the data)
#
# It refuses to run (exit 77 = skipped) if a tvilling package is already installed, so that it
# never removes an operator's installation. Needs root (dpkg).
set -euo pipefail
build=$(realpath "$1") src=$(realpath "$2")
if [ "$(id -u)" -ne 0 ]; then echo "SKIP: needs root for dpkg"; exit 77; fi
if dpkg-query -W -f='${Status}' tvilling 2>/dev/null | grep -q "installed"; then
  echo "SKIP: a tvilling package is already installed; not touching it"
  exit 77
fi
tmp=$(mktemp -d /tmp/tvilling-package.XXXXXX)
installed=0
# Leave the machine as it was: what the package created and kept on purpose (the user, the state
# and config directories) goes too if it was not there before.
had_user=0 had_state=0 had_etc=0
getent passwd tvilling >/dev/null && had_user=1
[ -e /var/lib/tvilling ] && had_state=1
[ -e /etc/tvilling ] && had_etc=1
cleanup() {
  if [ $installed -eq 1 ]; then dpkg_wait -r tvilling >/dev/null 2>&1 || true; fi
  dpkg_wait --purge tvilling >/dev/null 2>&1 || true
  [ $had_state -eq 1 ] || rmdir /var/lib/tvilling 2>/dev/null || true
  [ $had_etc -eq 1 ] || rmdir /etc/tvilling 2>/dev/null || true
  if [ $had_user -eq 0 ] && getent passwd tvilling >/dev/null; then
    deluser --system --quiet tvilling >/dev/null 2>&1 || true
    delgroup --system --quiet tvilling >/dev/null 2>&1 || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }
# dpkg with patience: another apt or dpkg on the machine holds its lock for a while.
dpkg_wait() {
  local try out
  for try in $(seq 1 90); do
    if out=$(dpkg "$@" 2>&1); then
      printf '%s\n' "$out"
      return 0
    fi
    grep -q "lock" <<<"$out" || { printf '%s\n' "$out"; return 1; }
    sleep 2
  done
  printf '%s\n' "$out"
  return 1
}

(cd "$build" && cpack -G DEB -B "$tmp/out" >"$tmp/cpack.log" 2>&1) ||
  { cat "$tmp/cpack.log"; fail "cpack -G DEB"; }
deb=$(ls "$tmp"/out/tvilling_*_amd64.deb)
echo "built $(basename "$deb") ($(stat -c %s "$deb") bytes)"
# (grep -q on a pipe would SIGPIPE the writer under pipefail: read whole outputs first.)
info=$(dpkg-deb -I "$deb")
grep -q "Architecture: amd64" <<<"$info" || fail "not an amd64 package"

installed=1
dpkg_wait -i "$deb" >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log"; fail "dpkg -i"; }
echo "installed"

version=$(/usr/bin/tvillingd --version)
[[ "$version" =~ ^tvillingd\ [0-9]+\.[0-9]+\.[0-9]+$ ]] || fail "tvillingd --version said '$version'"
/usr/bin/tvillingctl --version >/dev/null || fail "tvillingctl --version"
echo "$version"

getent passwd tvilling >/dev/null || fail "no user tvilling"
[ "$(stat -c '%U:%G %a' /var/lib/tvilling)" = "tvilling:tvilling 750" ] ||
  fail "/var/lib/tvilling is $(stat -c '%U:%G %a' /var/lib/tvilling)"
[ -d /etc/tvilling ] || fail "no /etc/tvilling"

unit=/usr/lib/systemd/system/tvillingd.service
[ -f "$unit" ] || fail "no $unit"
bash "$src/tests/integration/systemd_unit_test.sh" "$unit" /usr/bin/tvillingd --installed ||
  fail "systemd-analyze verify on the installed unit"

if command -v man >/dev/null; then
  page=$(man -P cat tvillingd 2>/dev/null) || fail "man tvillingd"
  grep -q "EXIT STATUS" <<<"$page" || fail "man tvillingd has no EXIT STATUS"
  page=$(man -P cat tvillingctl 2>/dev/null) || fail "man tvillingctl"
  grep -q "status" <<<"$page" || fail "man tvillingctl does not mention status"
  echo "man pages open"
fi

completion=/usr/share/bash-completion/completions/tvillingctl
bash "$src/tests/integration/bash_completion_test.sh" "$completion" /usr/bin/tvillingctl \
  >"$tmp/completion.log" || { cat "$tmp/completion.log"; fail "bash completion"; }
echo "bash completion works with the installed tvillingctl"

/usr/share/tvilling/make-dev-pki.sh "$tmp/pki" >/dev/null || fail "make-dev-pki.sh"
/usr/bin/tvillingd --config /usr/share/doc/tvilling/examples/single-node.toml \
  --state-dir "$tmp/state" --check-config || fail "the example config does not check"

if pgrep -u tvilling >/dev/null; then fail "a process runs as tvilling after install"; fi
echo "nothing started"

# What docs/operations.md has an operator do: certificates, the example configs, two agents as the
# service user under a NOTIFY_SOCKET harness, a mirrored write.
chmod 755 "$tmp"  # the agents run as tvilling and must reach $tmp/walk
mkdir "$tmp/walk"
/usr/bin/python3 "$src/tests/package/walkthrough.py" "$tmp/walk" || fail "the walkthrough"

dpkg_wait -r tvilling >"$tmp/dpkg-r.log" 2>&1 || { cat "$tmp/dpkg-r.log"; fail "dpkg -r"; }
installed=0
[ ! -e /usr/bin/tvillingd ] || fail "/usr/bin/tvillingd is still there after dpkg -r"
[ ! -e "$unit" ] || fail "$unit is still there after dpkg -r"
[ -d /var/lib/tvilling ] || fail "dpkg -r removed /var/lib/tvilling (the data)"
echo "PASS: installed, checked and removed $(basename "$deb")"
