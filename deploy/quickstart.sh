#!/usr/bin/env bash
# deploy/quickstart.sh: installs what is needed, builds, and starts a single-node tvillingd on
# deploy/examples/single-node.toml with its data under ./quickstart-state, then writes and reads
# through it with a real NBD client (qemu-io) and shows what the agent reports. The agent keeps running
# afterwards; the script prints how to use it and how to stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STATE=${TVILLING_QUICKSTART_STATE:-$ROOT/quickstart-state}
URI=nbd://127.0.0.1:10809/vol0

./deploy/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" --target tvillingd

if [ -f "$STATE/tvillingd.pid" ] && kill -0 "$(cat "$STATE/tvillingd.pid")" 2>/dev/null; then
  echo "quickstart: stopping the previous agent (pid $(cat "$STATE/tvillingd.pid"))"
  kill -TERM "$(cat "$STATE/tvillingd.pid")"
  for _ in $(seq 50); do kill -0 "$(cat "$STATE/tvillingd.pid")" 2>/dev/null || break; sleep 0.1; done
fi
mkdir -p "$STATE"
build/agent/tvillingd --check-config --config deploy/examples/single-node.toml --state-dir "$STATE"
nohup build/agent/tvillingd --config deploy/examples/single-node.toml --state-dir "$STATE" --status-interval 2 \
  >"$STATE/tvillingd.log" 2>&1 &
echo $! >"$STATE/tvillingd.pid"
for _ in $(seq 100); do nbdinfo "$URI" >/dev/null 2>&1 && break; sleep 0.1; done

echo
echo "== the export, as a client sees it (nbdinfo)"
nbdinfo "$URI" | sed -n '1,20p'
echo
echo "== write 4 MiB of 0xab at 1 MiB, flush, read it back and verify (qemu-io)"
qemu-io -f raw -c "write -P 0xab 1M 4M" -c "flush" -c "read -P 0xab 1M 4M" "$URI"
echo
echo "== the agent's log of what happened ($STATE/tvillingd.log)"
tail -n 5 "$STATE/tvillingd.log"
cat <<MSG

tvillingd is running (pid $(cat "$STATE/tvillingd.pid")), serving $URI.
Every write goes through the group log in $STATE/log before it reaches $STATE/volumes/vol0.img.
Try:   qemu-io -f raw -c "write -P 0x5a 0 64k" -c "read -v 0 64" $URI
       nbdcopy $URI - | sha256sum
       fio --ioengine=nbd --uri=$URI --rw=randwrite --bs=4k --iodepth=16 --size=64M --name=w
Watch: tail -f $STATE/tvillingd.log
Stop:  kill \$(cat $STATE/tvillingd.pid)      (clean shutdown: the log is flushed)
MSG
