#!/usr/bin/env bash
# deploy/quickstart.sh: installs what is needed, builds, and starts a two-site mirror on this machine:
# site-a (primary, deploy/examples/site-a.toml) and site-b (replica, site-b.toml), both on 127.0.0.1,
# talking gRPC over mutual TLS with a development PKI (deploy/pki/make-dev-pki.sh). It writes to
# site-a with a real NBD client (qemu-io), waits until site-b has applied it, reads it back from
# site-b's read-only export, and shows `tvillingctl status` on both sides. The agents keep running
# afterwards; the script prints how to use, watch and stop them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STATE=${TVILLING_QUICKSTART_STATE:-$ROOT/quickstart-state}
URI_A=nbd://127.0.0.1:10809/vol0
URI_B=nbd://127.0.0.1:10909/vol0
D=build/agent/tvillingd
CTL=build/agent/cli/tvillingctl

./deploy/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" --target tvillingd tvillingctl

for site in site-a site-b; do
  pidf="$STATE/$site/tvillingd.pid"
  if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
    echo "quickstart: stopping the previous $site agent (pid $(cat "$pidf"))"
    kill -TERM "$(cat "$pidf")"
    for _ in $(seq 100); do kill -0 "$(cat "$pidf")" 2>/dev/null || break; sleep 0.1; done
  fi
done
mkdir -p "$STATE/site-a" "$STATE/site-b"
./deploy/pki/make-dev-pki.sh "$STATE/pki" >/dev/null
for site in site-b site-a; do
  $D --check-config --config "deploy/examples/$site.toml" --state-dir "$STATE/$site"
  nohup $D --config "deploy/examples/$site.toml" --state-dir "$STATE/$site" --status-interval 2 \
    >"$STATE/$site/tvillingd.log" 2>&1 &
  echo $! >"$STATE/$site/tvillingd.pid"
done
for _ in $(seq 200); do
  nbdinfo "$URI_A" >/dev/null 2>&1 && nbdinfo "$URI_B" >/dev/null 2>&1 && break
  sleep 0.1
done

echo
echo "== write 4 MiB of 0xab at 1 MiB on site-a and flush (sync mode: site-b has it in its log)"
qemu-io -f raw -c "write -P 0xab 1M 4M" -c "flush" "$URI_A"
echo
echo "== wait until site-b has applied site-a's last LSN, then read it back there (read-only export)"
last=$($CTL --state-dir "$STATE/site-a" status --json | /usr/bin/python3 -c \
  'import json,sys; print(int(json.load(sys.stdin)["groups"][0]["last_lsn"]))')
for _ in $(seq 300); do
  applied=$($CTL --state-dir "$STATE/site-b" status --json | /usr/bin/python3 -c \
    'import json,sys; g=json.load(sys.stdin)["groups"][0]; print(int(g["applied_lsn"]) if g["consistent"] else -1)')
  [ "$applied" -ge "$last" ] && break
  sleep 0.1
done
qemu-io -f raw -r -c "read -P 0xab 1M 4M" "$URI_B"
echo
echo "== tvillingctl status (site-a, the primary)"
$CTL --state-dir "$STATE/site-a" status
echo
echo "== tvillingctl status (site-b, the replica)"
$CTL --state-dir "$STATE/site-b" status
cat <<MSG

Two agents are running: site-a (pid $(cat "$STATE/site-a/tvillingd.pid")) serves $URI_A and mirrors
group g0 synchronously over mutual TLS to site-b (pid $(cat "$STATE/site-b/tvillingd.pid")), which
serves the copy read-only at $URI_B.
Write: qemu-io -f raw -c "write -P 0x5a 0 64k" $URI_A
       fio --ioengine=nbd --uri=$URI_A --rw=randwrite --bs=4k --iodepth=16 --size=64M --name=w
Watch: $CTL --state-dir $STATE/site-a status --watch 1
       tail -f $STATE/site-a/tvillingd.log $STATE/site-b/tvillingd.log
Check: cmp <(nbdcopy $URI_A -) <(nbdcopy $URI_B -) && echo identical
Stop:  kill \$(cat $STATE/site-a/tvillingd.pid) \$(cat $STATE/site-b/tvillingd.pid)
MSG
