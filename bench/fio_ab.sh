#!/usr/bin/env bash
# bench/fio_ab.sh: A/B of two tvillingd binaries with bench/fio_bench.sh --quick, the binaries
# alternating round by round (a drift of the shared machine then lands on both); prints the 4 KiB
# QD16, 1 MiB, FLUSH and 4 KiB write-amplification figures of every run. Binaries are paths from
# the repository's root or absolute. Results stay in /tmp/abfio-{A,B}-ROUND/.
#   bench/fio_ab.sh ROUNDS BIN_A BIN_B [SCRATCH_DIR]
set -u
rounds=$1; a=$2; b=$3
scratch=${4:-/tmp}
cd "$(dirname "$0")/.."
for r in $(seq 1 "$rounds"); do
  for pair in "A:$a" "B:$b"; do
    tag=${pair%%:*}; bin=${pair#*:}
    out=/tmp/abfio-$tag-$r
    rm -rf "$out"
    bash bench/fio_bench.sh --quick --tvillingd "$bin" --dir "$scratch" --out "$out" >/dev/null 2>&1
    /usr/bin/python3 - "$out/results.json" "$tag" "$r" <<'PY'
import json,sys
j=json.load(open(sys.argv[1]))
f={x['name']:x for x in j['figures']}
k=f['fio nbd 4KiB randwrite QD16 vs nbdkit file']; fl=f['FLUSH p50 QD1 vs fio append+fdatasync p50']
m=f['fio nbd 1MiB write QD4 vs nbdkit file']
w=f['disk MiB per client MiB, 4KiB random']
print(f"{sys.argv[2]} round {sys.argv[3]}: 4K QD16 {k['value']:.0f} IOPS / nbdkit {k['baseline']:.0f}"
      f" = {k['ratio']}; 1M {m['value']:.0f} MB/s ratio {m['ratio']}; FLUSH p50 {fl['value']:.0f} us"
      f" ratio {fl['ratio']}; disk bytes per byte 4K {w['ratio']}", flush=True)
PY
  done
done
