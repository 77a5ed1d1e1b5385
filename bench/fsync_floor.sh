#!/bin/bash
# fsync_floor.sh: what a log fsync costs on this disk while other writers share it, with their
# writeback in bursts and in steps (docs/benchmarks.md, "Steady writeback, one ack per async
# batch"). Four fio jobs at RATE each, 64 KiB writes: "replog" fdatasyncs every 256 KiB (a
# replica's log at the async lag benchmark's rate), "repvol", "prilog" and "privol" (the replica's
# volume and the primary's log and volume on the same disk) fdatasync every BURST, first 16 MiB
# (a checkpoint's worth), then 1 MiB (steady writeback). Prints replog's fdatasync latency.
#
#   bench/fsync_floor.sh [--dir DIR] [--rate 100m] [--runtime 20]
set -euo pipefail
dir=/var/tmp rate=100m runtime=20
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    *) echo "usage: $0 [--dir DIR] [--rate 100m] [--runtime 20]" >&2; exit 2 ;;
  esac
done
work=$(mktemp -d "$dir/fsync-floor.XXXXXX")
trap 'rm -rf "$work"' EXIT
for burst in 256 16; do  # in 64 KiB writes: 16 MiB, 1 MiB
  fio --output-format=json --directory="$work" --bs=64k --rate="$rate" --runtime="$runtime" \
    --time_based --ioengine=psync --size=1g \
    --name=replog --rw=write --fdatasync=4 \
    --name=repvol --rw=write --fdatasync=$burst \
    --name=prilog --rw=write --fdatasync=$burst \
    --name=privol --rw=write --fdatasync=$burst > "$work/out.json"
  /usr/bin/python3 - "$work/out.json" "$((burst * 64 / 1024))" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
job = next(x for x in j["jobs"] if x["jobname"] == "replog")
s = job["sync"]["lat_ns"]
p = {k: v / 1e6 for k, v in s["percentile"].items()}
bw = sum(x["write"]["bw"] for x in j["jobs"]) / 1024
print(f"others flushing every {sys.argv[2]} MiB: log fdatasync p50 {p['50.000000']:.2f} ms, "
      f"p99 {p['99.000000']:.2f} ms, max {s['max'] / 1e6:.2f} ms ({s['N']} fsyncs; "
      f"all four writers {bw:.0f} MiB/s)")
PY
  rm -f "$work"/*.0.0
done
