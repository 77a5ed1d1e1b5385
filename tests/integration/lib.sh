# lib.sh: shared helpers for tvilling's integration tests (sourced by bash test scripts, never run).
#
# What a test gets: a private temp dir, a free port on 127.0.0.1, a config, an agent started in the
# background and waited for (bounded), and one EXIT trap that undoes everything the test set up, in
# reverse order, even when the test fails half-way (umount, losetup -d, fusermount3 -u, kill by PID,
# rm -rf the temp dir).
#
# The server under test is chosen by one switch, so the scripts can be debugged against a reference
# NBD server before tvillingd exists:
#   TV_SERVER=tvillingd (default)  needs TVILLINGD=/path/to/tvillingd (CMake passes
#                                  $<TARGET_FILE:tvillingd>; scripts also accept it as argument 1)
#   TV_SERVER=nbdkit               `nbdkit file` on the same volume path (same persistence model)
#
# Usage in a test:
#   source "$(dirname "$0")/lib.sh"
#   tv_init "$@"            # temp dir, trap, config (TV_VOLUME_SIZE, default 1GiB)
#   tv_start                # start the agent, wait until nbdinfo answers
#   qemu-io -f raw -c ... "$(tv_uri)"
#   tv_stop                 # SIGTERM, wait (bounded), fail if the agent exited non-zero
#   tv_pass
# shellcheck shell=bash
set -euo pipefail

TV_SERVER="${TV_SERVER:-tvillingd}"
TV_VOLUME_SIZE="${TV_VOLUME_SIZE:-1GiB}"
TV_EXPORT="${TV_EXPORT:-vol0}"
TV_START_TIMEOUT_S="${TV_START_TIMEOUT_S:-60}"
TV_STOP_TIMEOUT_S="${TV_STOP_TIMEOUT_S:-30}"
TV_NAME="$(basename "${0%.*}")${TV_SUBTEST:+/$TV_SUBTEST}"

TV_TMP=""
TV_PID=""
TV_PORT=""
TV_STARTS=0
TV_CLEANUPS=()

tv_log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "$TV_NAME" "$*" >&2; }

# Prints the agent's log tail (where the cause usually is) and exits non-zero; the trap cleans up.
tv_fail() {
  printf '[%s %s] FAIL: %s\n' "$(date +%H:%M:%S)" "$TV_NAME" "$*" >&2
  if [[ -n "$TV_TMP" && -f "$TV_TMP/server.log" ]]; then
    echo "---- last 40 lines of $TV_TMP/server.log ----" >&2
    tail -n 40 "$TV_TMP/server.log" >&2 || true
    echo "----" >&2
  fi
  exit 1
}

tv_pass() { tv_log "PASS"; exit 0; }

# Requires commands to exist; a missing tool is a failure, never a skip (CI installs everything).
tv_need() {
  local c
  for c in "$@"; do
    command -v "$c" > /dev/null 2>&1 || tv_fail "required command '$c' not found (deploy/install-deps.sh installs it)"
  done
}

# Registers a command to run at exit (LIFO). Commands are strings run with eval; they must not fail
# the cleanup (errors are reported and ignored).
tv_on_exit() { TV_CLEANUPS+=("$1"); }

_tv_cleanup() {
  local rc=$? i
  set +e
  for ((i = ${#TV_CLEANUPS[@]} - 1; i >= 0; i--)); do
    eval "${TV_CLEANUPS[$i]}" || tv_log "cleanup step failed (ignored): ${TV_CLEANUPS[$i]}"
  done
  if [[ -n "$TV_PID" ]]; then _tv_kill_bounded "$TV_PID" TERM; TV_PID=""; fi
  if [[ -n "$TV_TMP" && -d "$TV_TMP" ]]; then
    if [[ $rc -ne 0 && -n "${TV_KEEP_ON_FAILURE:-}" ]]; then
      tv_log "keeping $TV_TMP for inspection (TV_KEEP_ON_FAILURE is set)"
    else
      rm -rf "$TV_TMP"
    fi
  fi
  exit $rc
}

# A port that was free a moment ago on 127.0.0.1 (the kernel picks it; a tiny race remains, so the
# start is retried with a new port if the agent cannot bind).
tv_free_port() {
  /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

tv_uri() { echo "nbd://127.0.0.1:${TV_PORT}/${TV_EXPORT}"; }
tv_state_dir() { echo "$TV_TMP/state"; }
tv_volume_path() { echo "$TV_TMP/state/volumes/${TV_EXPORT}.img"; }
tv_config_path() { echo "$TV_TMP/tvilling.toml"; }

tv_size_bytes() {
  local s="$1"
  case "$s" in
    *GiB) echo $((${s%GiB} << 30)) ;;
    *MiB) echo $((${s%MiB} << 20)) ;;
    *KiB) echo $((${s%KiB} << 10)) ;;
    *) echo "$s" ;;
  esac
}

tv_write_config() {
  cat > "$(tv_config_path)" << EOF
# Written by tests/integration/lib.sh for one test run.
[agent]
site = "sto-1"
state_dir = "$(tv_state_dir)"
[log]
dir = "log"
${TV_EXTRA_LOG_CONFIG:-}
[nbd]
listen = ["127.0.0.1:${TV_PORT}"]
[[group]]
name = "g0"
[[group.volume]]
name = "${TV_EXPORT}"
path = "volumes/${TV_EXPORT}.img"
size = "${TV_VOLUME_SIZE}"
EOF
}

# tv_init [TVILLINGD]: temp dir, trap, port, config. Argument 1 (or $TVILLINGD) is the agent binary.
tv_init() {
  if [[ $# -ge 1 && -n "$1" ]]; then TVILLINGD="$1"; fi
  TVILLINGD="${TVILLINGD:-}"
  trap _tv_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  TV_TMP="$(mktemp -d "${TMPDIR:-/tmp}/tvilling-it.XXXXXX")"
  mkdir -p "$(tv_state_dir)/volumes"
  tv_need nbdinfo
  case "$TV_SERVER" in
    tvillingd)
      [[ -n "$TVILLINGD" && -x "$TVILLINGD" ]] ||
        tv_fail "tvillingd binary not given or not executable: '${TVILLINGD}' (pass it as argument 1 or TVILLINGD=...)"
      ;;
    nbdkit) tv_need nbdkit ;;
    *) tv_fail "unknown TV_SERVER '$TV_SERVER' (tvillingd or nbdkit)" ;;
  esac
  TV_PORT="$(tv_free_port)"
  tv_write_config
  tv_log "server=$TV_SERVER tmp=$TV_TMP port=$TV_PORT"
}

# Sends SIG to PID, waits up to TV_STOP_TIMEOUT_S for it to exit, then SIGKILLs it. Prints the exit
# status in TV_KILL_RC ("timeout:<rc>" when SIGKILL was needed). Not for use in $(...): wait only
# works in the shell that started PID.
TV_KILL_RC=""
# Whether PID still runs: one look at its state. (A zombie still answers kill -0, and bash reaps
# its children whenever SIGCHLD comes, so "kill -0, then ps" could see a zombie and then nothing:
# a process that had exited looked alive.)
_tv_running() {
  local st
  st="$(ps -o stat= -p "$1" 2> /dev/null)" || return 1
  [[ -n "$st" && "$st" != Z* ]]
}
_tv_kill_bounded() {
  local pid="$1" sig="$2" i rc
  kill -"$sig" "$pid" 2> /dev/null || true
  for ((i = 0; i < TV_STOP_TIMEOUT_S * 10; i++)); do
    _tv_running "$pid" || break
    sleep 0.1
  done
  if _tv_running "$pid"; then
    tv_log "pid $pid did not exit within ${TV_STOP_TIMEOUT_S}s of SIG$sig; sending SIGKILL"
    kill -KILL "$pid" 2> /dev/null || true
    rc=0
    wait "$pid" 2> /dev/null || rc=$?
    TV_KILL_RC="timeout:$rc"
    return 0
  fi
  rc=0
  wait "$pid" 2> /dev/null || rc=$?
  TV_KILL_RC="$rc"
}

# Starts the server in the background and waits until nbdinfo gets an answer.
tv_start() {
  for _ in 1 2 3; do
    TV_STARTS=$((TV_STARTS + 1))
    echo "==== start #$TV_STARTS ($TV_SERVER, port $TV_PORT) ====" >> "$TV_TMP/server.log"
    case "$TV_SERVER" in
      tvillingd)
        "$TVILLINGD" --config "$(tv_config_path)" --log-level "${TV_LOG_LEVEL:-info}" \
          >> "$TV_TMP/server.log" 2>&1 &
        ;;
      nbdkit)
        local vol
        vol="$(tv_volume_path)"
        [[ -f "$vol" ]] || truncate -s "$(tv_size_bytes "$TV_VOLUME_SIZE")" "$vol"
        nbdkit -f -i 127.0.0.1 -p "$TV_PORT" file "$vol" >> "$TV_TMP/server.log" 2>&1 &
        ;;
    esac
    TV_PID=$!
    if _tv_wait_ready; then
      tv_log "server up (pid $TV_PID, start #$TV_STARTS)"
      return 0
    fi
    # Exited before serving: a lost port race is retried on a fresh port, anything else fails.
    if ! grep -qiE 'address already in use|EADDRINUSE' "$TV_TMP/server.log"; then
      tv_fail "server did not come up (pid $TV_PID, start #$TV_STARTS)"
    fi
    TV_PORT="$(tv_free_port)"
    tv_write_config
  done
  tv_fail "server could not bind a port after 3 attempts"
}

_tv_wait_ready() {
  local deadline=$((SECONDS + TV_START_TIMEOUT_S))
  while ((SECONDS < deadline)); do
    if ! _tv_running "$TV_PID"; then
      local rc=0
      wait "$TV_PID" 2> /dev/null || rc=$?
      tv_log "server pid $TV_PID exited with status $rc before serving"
      TV_PID=""
      return 1
    fi
    if timeout 5 nbdinfo --size "$(tv_uri)" > /dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  tv_log "server pid $TV_PID did not answer nbdinfo within ${TV_START_TIMEOUT_S}s"
  _tv_kill_bounded "$TV_PID" KILL
  TV_PID=""
  return 1
}

# Clean stop: SIGTERM, bounded wait; the agent must exit 0 (it promises a clean shutdown).
tv_stop() {
  [[ -n "$TV_PID" ]] || tv_fail "tv_stop: no server running"
  local pid="$TV_PID" rc
  _tv_kill_bounded "$pid" TERM
  rc="$TV_KILL_RC"
  TV_PID=""
  case "$rc" in
    0) tv_log "server pid $pid stopped cleanly" ;;
    timeout:*) tv_fail "server pid $pid ignored SIGTERM for ${TV_STOP_TIMEOUT_S}s (killed)" ;;
    # nbdkit exits by the signal's default action on SIGTERM in some builds; only tvillingd must be 0.
    143) [[ "$TV_SERVER" == nbdkit ]] || tv_fail "server pid $pid died of SIGTERM instead of shutting down cleanly" ;;
    *) tv_fail "server pid $pid exited with status $rc after SIGTERM" ;;
  esac
}

# Crash: SIGKILL, no chance to flush anything.
tv_kill9() {
  [[ -n "$TV_PID" ]] || tv_fail "tv_kill9: no server running"
  local pid="$TV_PID"
  kill -KILL "$pid"
  wait "$pid" 2> /dev/null || true
  TV_PID=""
  tv_log "server pid $pid killed with SIGKILL"
}

# Offline log check (tvillingd --verify-log); nbdkit has no log, so nothing to check there.
tv_verify_log() {
  [[ "$TV_SERVER" == tvillingd ]] || return 0
  [[ -z "$TV_PID" ]] || tv_fail "tv_verify_log: stop the server first"
  local out rc=0
  out="$("$TVILLINGD" --config "$(tv_config_path)" --verify-log 2>&1)" || rc=$?
  [[ $rc -eq 0 ]] || tv_fail "tvillingd --verify-log exited $rc: $out"
  tv_log "verify-log: $out"
}

# JSON field of nbdinfo for the export (python: no jq on the machines).
tv_nbdinfo_field() {
  nbdinfo --json "$(tv_uri)" | /usr/bin/python3 -c '
import json, sys
e = json.load(sys.stdin)["exports"][0]
v = e[sys.argv[1]]
print(str(v).lower() if isinstance(v, bool) else v)' "$1"
}
