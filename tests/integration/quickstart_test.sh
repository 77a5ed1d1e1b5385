#!/usr/bin/env bash
# quickstart_test.sh: the README's first command, as a new user runs it (without the install and
# build steps, which CI has done): deploy/quickstart.sh starts a three-member etcd and two agents
# on 127.0.0.1, writes on site-a and reads it back on site-b, switches over and prints the write
# pause, writes on site-b and reads it back on site-a; then `quickstart.sh stop` stops every
# process it started and removes its state. Fails if the demo fails, if the output lacks a step,
# or if anything the demo started is still running after `stop`.
#
#   quickstart_test.sh SOURCE_DIR BUILD_DIR
set -euo pipefail
SRC=$1
BUILD=$2
TMP=$(mktemp -d /tmp/tvilling-quickstart.XXXXXX)
export TVILLING_BUILD_DIR=$BUILD TVILLING_QUICKSTART_STATE=$TMP/state
log() { printf '[%s quickstart_test] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fail() {
  log "FAIL: $*"
  for f in "$TMP"/state/site-*/tvillingd.log; do
    [ -f "$f" ] && { echo "---- $f (last 30 lines)"; tail -30 "$f"; } >&2
  done
  exit 1
}
cleanup() {
  "$SRC/deploy/quickstart.sh" stop >/dev/null 2>&1 || true
  rm -rf "$TMP"
}
trap cleanup EXIT

log "running deploy/quickstart.sh --no-build (state in $TMP/state)"
if ! timeout 240 "$SRC/deploy/quickstart.sh" --no-build >"$TMP/out" 2>&1; then
  cat "$TMP/out" >&2
  fail "the demo exited non-zero"
fi
# The pids the demo gave its processes, before `stop` removes the state directory.
pids=$(cat "$TMP"/state/site-*/tvillingd.pid "$TMP"/state/etcd-*/etcd.pid)
[ "$(echo "$pids" | wc -w)" -eq 5 ] || fail "expected 5 pid files (3 etcd, 2 agents), got: $pids"
for p in $pids; do kill -0 "$p" 2>/dev/null || fail "pid $p from the demo is not running after it"; done

want() { grep -Eq -- "$1" "$TMP/out" || { cat "$TMP/out" >&2; fail "the output lacks: $1"; }; }
want 'read 4194304/4194304 bytes at offset 1048576'  # site-a's write, read on site-b
want 'write pause'                                    # the switchover's measured pause
want 'read 1048576/1048576 bytes at offset 8388608'   # site-b's write, read on site-a
want 'Stop: +deploy/quickstart.sh stop'
if grep -q 'Pattern verification failed' "$TMP/out"; then
  cat "$TMP/out" >&2
  fail "qemu-io read back something else than was written"
fi
log "$(grep -m1 'write pause' "$TMP/out")"

log "deploy/quickstart.sh stop"
timeout 60 "$SRC/deploy/quickstart.sh" stop >"$TMP/stop.out" 2>&1 || fail "stop exited non-zero"
for p in $pids; do
  if kill -0 "$p" 2>/dev/null; then fail "pid $p still runs after quickstart.sh stop"; fi
done
[ ! -e "$TMP/state" ] || fail "quickstart.sh stop left $TMP/state"
log "PASS"
