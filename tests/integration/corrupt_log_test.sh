#!/usr/bin/env bash
# corrupt_log_test.sh TVILLINGD CORRUPT_RECORD: a record damaged on disk is reported at start with its
# LSN, the agent refuses to serve (exit 1, nothing listening), and --verify-log names the same LSN.
# Twice: a 64 KiB write (its payload in a payload file, docs/log-format.md "External payloads", so
# the payload file is damaged) and a 4 KiB write (payload inside the RocksDB value).
set -euo pipefail
TVILLINGD=$1
CORRUPT=$2
DIR=$(mktemp -d "${TMPDIR:-/tmp}/tvilling-corrupt-XXXXXX")
PID=
cleanup() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then kill -KILL "$PID"; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$DIR"
}
trap cleanup EXIT
PORT=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$DIR/tvilling.toml" <<TOML
[agent]
site = "sto-1"
[nbd]
listen = ["127.0.0.1:$PORT"]
[[group]]
name = "g0"
[[group.volume]]
name = "vol0"
path = "volumes/vol0.img"
size = "64MiB"
TOML
URI="nbd://127.0.0.1:$PORT/vol0"
scenario() {  # NAME LAST_WRITE_SIZE
rm -rf "$DIR/state"
echo "--- $1: the last record is a $2 write"
"$TVILLINGD" --config "$DIR/tvilling.toml" --state-dir "$DIR/state" 2>"$DIR/run1.log" &
PID=$!
for _ in $(seq 100); do nbdinfo "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
qemu-io -f raw -c "write -P 0x11 0 64k" -c "write -P 0x22 64k $2" -c flush "$URI" >/dev/null
kill -KILL "$PID"; wait "$PID" 2>/dev/null || true; PID=

LSN=$("$CORRUPT" "$DIR/state/log" g0)
echo "corrupted LSN $LSN"

set +e
timeout 30 "$TVILLINGD" --config "$DIR/tvilling.toml" --state-dir "$DIR/state" 2>"$DIR/run2.log"
RC=$?
set -e
cat "$DIR/run2.log"
[ "$RC" -eq 1 ] || { echo "FAIL: expected exit 1 from a corrupt log, got $RC"; exit 1; }
grep -q "LSN $LSN" "$DIR/run2.log" || { echo "FAIL: the error does not name LSN $LSN"; exit 1; }
grep -q "refusing to serve" "$DIR/run2.log" || { echo "FAIL: the error does not say it refuses to serve"; exit 1; }
if nbdinfo "$URI" >/dev/null 2>&1; then echo "FAIL: something serves $URI"; exit 1; fi

set +e
"$TVILLINGD" --config "$DIR/tvilling.toml" --state-dir "$DIR/state" --verify-log >"$DIR/verify.out" 2>&1
VRC=$?
set -e
cat "$DIR/verify.out"
[ "$VRC" -eq 1 ] && grep -q "LSN $LSN" "$DIR/verify.out" || { echo "FAIL: --verify-log did not report LSN $LSN"; exit 1; }
echo "PASS ($1): corrupt record LSN $LSN refused at start and reported by --verify-log"
}
scenario external 64k
scenario inline 4k
