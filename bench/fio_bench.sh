#!/usr/bin/env bash
# bench/fio_bench.sh: tvillingd against baselines measured in the same run, on the same disk.
#
#   bench/fio_bench.sh [--quick] [--out DIR] [--tvillingd PATH] [--dir SCRATCH] [--log-config TOML]
#
# --log-config: lines added to tvillingd's [log] table, e.g. 'external_payload_min = "4KiB"'.
#
# Figures (each a ratio to a baseline taken in this run; the median of the repetitions):
#   1. fio nbd 4 KiB randwrite QD16, IOPS: tvillingd / `nbdkit file` on a file in the same directory
#   2. fio nbd 1 MiB sequential write QD4, MB/s: the same
#   3. FLUSH p50 at QD1 (fio nbd, 4 KiB write + fsync=1, which fio sends as NBD FLUSH) /
#      fio's fdatasync p50 appending 4 KiB writes to a new file (what a log costs on this disk);
#      fio's fdatasync p50 overwriting a written file is reported too
#   4. bytes written to disk per byte written by the client (tvillingd's /proc/PID/io write_bytes):
#      1 GiB of 1 MiB sequential writes, then 2 GiB of 4 KiB random writes, each ending with a FLUSH
#      and a checkpoint. 4 KiB writes fill RocksDB's memtable (256 MiB) and every flush of it writes
#      the records still live then to an SST: 2 GiB spans ~8 flushes, so where they fall in the
#      window moves the figure by ~0.02 (512 MiB spanned 1 to 3: +-0.1)
# Both servers get a prefilled 1 GiB volume. Prints a markdown table; writes DIR/results.json.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=0
OUT=""
TVILLINGD="$ROOT/build/agent/tvillingd"
SCRATCH_PARENT="${TMPDIR:-/tmp}"
LOG_CONFIG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT=$2; shift ;;
    --tvillingd) TVILLINGD=$2; shift ;;
    --dir) SCRATCH_PARENT=$2; shift ;;
    --log-config) LOG_CONFIG=$2; shift ;;
    *) echo "usage: $0 [--quick] [--out DIR] [--tvillingd PATH] [--dir SCRATCH] [--log-config TOML]" >&2
       exit 2 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ]; then RUNTIME=3; REPS=1; else RUNTIME=15; REPS=3; fi
for t in fio nbdkit nbdinfo /usr/bin/python3; do
  command -v "$t" >/dev/null || { echo "fio_bench: $t is missing (deploy/install-deps.sh)" >&2; exit 1; }
done
[ -x "$TVILLINGD" ] || { echo "fio_bench: no tvillingd at $TVILLINGD (build first)" >&2; exit 1; }

S=$(mktemp -d "$SCRATCH_PARENT/tvilling-bench-XXXXXX")
OUT=${OUT:-$S/out}
mkdir -p "$OUT"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  rm -rf "$S/tv" "$S/nbdkit" "$S"/*.dat
}
trap cleanup EXIT
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_nbd() { for _ in $(seq 100); do nbdinfo "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }

# --- servers -----------------------------------------------------------------------------------------
TV_PORT=$(free_port)
mkdir -p "$S/tv" "$S/nbdkit"
cat >"$S/tv/tvilling.toml" <<EOF
[agent]
site = "bench"
[log]
$LOG_CONFIG
[nbd]
listen = ["127.0.0.1:$TV_PORT"]
[[group]]
name = "g0"
[[group.volume]]
name = "vol0"
path = "volumes/vol0.img"
size = "1GiB"
EOF
"$TVILLINGD" --config "$S/tv/tvilling.toml" --state-dir "$S/tv/state" --status-interval 0 \
  >"$S/tv/agent.log" 2>&1 &
TV_PID=$!
PIDS+=("$TV_PID")
TV_URI="nbd://127.0.0.1:$TV_PORT/vol0"
NK_PORT=$(free_port)
truncate -s 1G "$S/nbdkit/vol0.img"
nbdkit -f -i 127.0.0.1 -p "$NK_PORT" file "$S/nbdkit/vol0.img" &
PIDS+=("$!")
NK_URI="nbd://127.0.0.1:$NK_PORT"
wait_nbd "$TV_URI" || { echo "fio_bench: tvillingd did not start" >&2; cat "$S/tv/agent.log"; exit 1; }
wait_nbd "$NK_URI" || { echo "fio_bench: nbdkit did not start" >&2; exit 1; }
for u in "$TV_URI" "$NK_URI"; do
  fio --name=prefill --ioengine=nbd --uri="$u" --rw=write --bs=1M --iodepth=4 --size=1G >/dev/null 2>&1
done

# --- helpers -----------------------------------------------------------------------------------------
# fio_json ARGS...: runs fio with JSON output and prints the JSON only.
fio_json() { fio --output-format=json "$@" 2>/dev/null | sed -n '/^{/,$p'; }
# pick FIELD < json: iops | bw_mb | clat_p50_us | sync_p50_us | sync_p99_us
pick() {
  /usr/bin/python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
w = j["write"]
f = sys.argv[1]
if f == "iops": print(w["iops"])
elif f == "bw_mb": print(w["bw_bytes"] / 1e6)
elif f == "clat_p50_us": print(w["clat_ns"]["percentile"]["50.000000"] / 1e3)
elif f == "sync_p50_us": print(j["sync"]["lat_ns"]["percentile"]["50.000000"] / 1e3)
elif f == "sync_p99_us": print(j["sync"]["lat_ns"]["percentile"]["99.000000"] / 1e3)
' "$1"
}
median() { /usr/bin/python3 -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
ratio() { /usr/bin/python3 -c 'import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f"{a/b:.2f}" if b else "nan")' "$1" "$2"; }
RESULTS=()
record() {  # name unit value baseline ratio goal
  RESULTS+=("$1|$2|$3|$4|$5|$6")
  printf '| %s | %s | %.1f | %.1f | %s | %s |\n' "$1" "$2" "$3" "$4" "$5" "$6"
}

echo "| figure | unit | tvillingd | baseline | ratio | goal |"
echo "|---|---|---|---|---|---|"

# --- 1, 2: throughput against nbdkit file ---------------------------------------------------------
# Before every run both volume files are fsynced and dropped from the page cache, so neither side
# starts with the other's cache state: a file left in large folios by a sequential pass makes every
# later 4 KiB write cost a whole-folio writeback (tvillingd drops its cache after each checkpoint;
# nbdkit does not, and would otherwise be measured at a third of its speed).
drop_cache() {
  /usr/bin/python3 -c '
import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)' "$S/nbdkit/vol0.img" "$S/tv/state/volumes/vol0.img"
}
throughput() {  # name rw bs qd field unit
  local tv=() nk=()
  for _ in $(seq "$REPS"); do
    drop_cache
    nk+=("$(fio_json --name=b --ioengine=nbd --uri="$NK_URI" --rw="$2" --bs="$3" --iodepth="$4" \
      --size=1G --time_based --runtime="$RUNTIME" | pick "$5")")
    drop_cache
    tv+=("$(fio_json --name=t --ioengine=nbd --uri="$TV_URI" --rw="$2" --bs="$3" --iodepth="$4" \
      --size=1G --time_based --runtime="$RUNTIME" | pick "$5")")
  done
  local a b
  a=$(median "${tv[@]}")
  b=$(median "${nk[@]}")
  record "$1" "$6" "$a" "$b" "$(ratio "$a" "$b")" ">= 0.70"
}
throughput "fio nbd 4KiB randwrite QD16 vs nbdkit file" randwrite 4k 16 iops IOPS
throughput "fio nbd 1MiB write QD4 vs nbdkit file" write 1M 4 bw_mb MB/s

# --- 3: FLUSH latency against fdatasync ---------------------------------------------------------------
tv_f=() app_f=() ow_f=()
dd if=/dev/zero of="$S/overwrite.dat" bs=1M count=256 status=none conv=fsync
for _ in $(seq "$REPS"); do
  tv_f+=("$(fio_json --name=t --ioengine=nbd --uri="$TV_URI" --rw=randwrite --bs=4k --iodepth=1 \
    --fsync=1 --size=256M --time_based --runtime="$RUNTIME" | pick sync_p50_us)")
  rm -f "$S/append.dat"
  app_f+=("$(fio_json --name=a --filename="$S/append.dat" --rw=write --bs=4k --ioengine=psync \
    --fdatasync=1 --size=256M --time_based --runtime="$RUNTIME" | pick sync_p50_us)")
  ow_f+=("$(fio_json --name=o --filename="$S/overwrite.dat" --rw=randwrite --bs=4k --ioengine=psync \
    --fdatasync=1 --size=256M --time_based --runtime="$RUNTIME" | pick sync_p50_us)")
done
a=$(median "${tv_f[@]}")
b=$(median "${app_f[@]}")
c=$(median "${ow_f[@]}")
record "FLUSH p50 QD1 vs fio append+fdatasync p50" us "$a" "$b" "$(ratio "$a" "$b")" "<= 1.30"
record "FLUSH p50 QD1 vs fio overwrite+fdatasync p50" us "$a" "$c" "$(ratio "$a" "$c")" "(reported)"

# --- 4: bytes written to disk per client byte ------------------------------------------------------
disk_bytes() { awk '/^write_bytes/ {print $2}' "/proc/$TV_PID/io"; }
amplification() {  # name client_bytes fio-args...
  local name=$1 client=$2
  shift 2
  local b0 b1
  b0=$(disk_bytes)
  fio --name=wa --ioengine=nbd --uri="$TV_URI" "$@" --end_fsync=1 >/dev/null 2>&1
  sleep 2.5  # one checkpoint interval and more: the volume is fsynced and the log truncated
  b1=$(disk_bytes)
  record "$name" "bytes/byte" "$(( (b1 - b0) / 1048576 ))" "$(( client / 1048576 ))" \
    "$(ratio "$((b1 - b0))" "$client")" "<= 2.20"
}
if [ "$QUICK" = 1 ]; then SEQ=256; RND=64; else SEQ=1024; RND=2048; fi
amplification "disk MiB per client MiB, 1MiB sequential" $((SEQ << 20)) \
  --rw=write --bs=1M --iodepth=4 --size=1G --io_size=${SEQ}M
amplification "disk MiB per client MiB, 4KiB random" $((RND << 20)) \
  --rw=randwrite --bs=4k --iodepth=16 --size=1G --io_size=${RND}M --randrepeat=0

# --- results.json ------------------------------------------------------------------------------------
/usr/bin/python3 - "$OUT/results.json" "$QUICK" "${RESULTS[@]}" <<'EOF'
import json, platform, sys, time
out, quick, rows = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
figures = []
for r in rows:
    name, unit, value, baseline, ratio, goal = r.split("|")
    figures.append({"name": name, "unit": unit, "value": float(value), "baseline": float(baseline),
                    "ratio": float(ratio), "goal": goal})
json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": quick,
           "machine": platform.platform(), "figures": figures}, open(out, "w"), indent=2)
EOF
echo
echo "results: $OUT/results.json"
