#!/usr/bin/env bash
# deploy/quickstart.sh: installs what is needed, builds, and runs a two-site mirror with automatic
# fail-over on this machine, everything on 127.0.0.1:
#   - etcd, three members: one per site (site-a, site-b) and one for the witness;
#   - tvillingd site-a (primary of group g0) and site-b (its synchronous replica), mutual TLS with a
#     development PKI, each with a [coordinator] table pointing at the etcd members;
# then writes through NBD on site-a (qemu-io), reads it back on site-b's read-only export, shows
# `tvillingctl status --watch` while fio writes, switches the primary over to site-b and prints the
# measured write pause, writes on site-b and reads that back on site-a. Everything keeps running
# afterwards; the script prints how to use, watch and stop it.
#
#   deploy/quickstart.sh            # the demo above (stops and wipes an earlier run first)
#   deploy/quickstart.sh stop       # stops every process it started (by PID) and deletes its state
#   deploy/quickstart.sh --no-build # the demo with the binaries already in $TVILLING_BUILD_DIR
#                                   # (default ./build), without installing or building (tests)
# If a step fails, every process it started is stopped (the logs stay in the state directory).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STATE=${TVILLING_QUICKSTART_STATE:-$ROOT/quickstart-state}
URI_A=nbd://127.0.0.1:10809/vol0
URI_B=nbd://127.0.0.1:10909/vol0
BUILD=${TVILLING_BUILD_DIR:-$ROOT/build}
D=$BUILD/agent/tvillingd
CTL=$BUILD/agent/cli/tvillingctl
ETCD_MEMBERS=(site-a site-b witness)
ETCD_CLIENT=(12379 12479 12579)
ETCD_PEER=(12380 12480 12580)
ENDPOINTS=$(printf '"127.0.0.1:%s", ' "${ETCD_CLIENT[@]}")
ENDPOINTS="[${ENDPOINTS%, }]"

stop_all() {
  # Agents first (a primary flushes its log), then etcd. Every process by the PID it was given.
  local pidf pid
  for pidf in "$STATE"/site-a/tvillingd.pid "$STATE"/site-b/tvillingd.pid "$STATE"/etcd-*/etcd.pid; do
    [ -f "$pidf" ] || continue
    pid=$(cat "$pidf")
    if kill -0 "$pid" 2>/dev/null; then
      echo "quickstart: stopping $(basename "$(dirname "$pidf")") (pid $pid)"
      kill -TERM "$pid"
      for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$pidf"
  done
}

if [ "${1:-}" = stop ]; then
  stop_all
  rm -rf "$STATE"
  echo "quickstart: stopped; $STATE removed"
  exit 0
fi

if [ "${1:-}" != --no-build ]; then
  ./deploy/install-deps.sh
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_UNITY_BUILD=ON >/dev/null
  cmake --build "$BUILD" -j "$(nproc)" --target tvillingd tvillingctl
fi

stop_all
rm -rf "$STATE"
on_exit() {
  local rc=$?
  [ "$rc" -eq 0 ] && return
  echo "quickstart: failed (exit $rc); stopping what it started; logs stay in $STATE" >&2
  stop_all
}
trap on_exit EXIT
mkdir -p "$STATE/site-a" "$STATE/site-b"
./deploy/pki/make-dev-pki.sh "$STATE/pki" >/dev/null

echo "== etcd: three members on 127.0.0.1 (site-a, site-b, witness)"
cluster=""
for i in 0 1 2; do cluster+="${ETCD_MEMBERS[$i]}=http://127.0.0.1:${ETCD_PEER[$i]},"; done
for i in 0 1 2; do
  m=${ETCD_MEMBERS[$i]}
  mkdir -p "$STATE/etcd-$m"
  nohup etcd --name "$m" --data-dir "$STATE/etcd-$m/data" \
    --listen-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" \
    --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${ETCD_PEER[$i]}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER[$i]}" \
    --initial-cluster "${cluster%,}" --initial-cluster-state new \
    --logger zap --log-outputs "$STATE/etcd-$m/etcd.log" >"$STATE/etcd-$m/etcd.out" 2>&1 &
  echo $! >"$STATE/etcd-$m/etcd.pid"
done
for _ in $(seq 150); do
  ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:${ETCD_CLIENT[0]}" endpoint health >/dev/null 2>&1 && break
  sleep 0.2
done

# The two-site example configs plus a [coordinator] table: the leader key in etcd decides the
# primary, the witness makes automatic fail-over safe with two sites (docs/operations.md).
# A demo's sync peer may be killed: after 5 s away it leaves the sync set and writes go on without
# it (the examples keep the safe default, 0: wait however long it is away).
for site in site-a site-b; do
  sed -e '/^sync_degrade_after_ms/d' -e 's/^mode = "sync".*/&\nsync_degrade_after_ms = 5000/' \
    "deploy/examples/$site.toml" >"$STATE/$site.toml"
  cat >>"$STATE/$site.toml" <<EOF

[coordinator]
endpoints = $ENDPOINTS
witness = "witness"
EOF
done
for site in site-b site-a; do
  $D --check-config --config "$STATE/$site.toml" --state-dir "$STATE/$site"
  nohup $D --config "$STATE/$site.toml" --state-dir "$STATE/$site" --status-interval 2 \
    >"$STATE/$site/tvillingd.log" 2>&1 &
  echo $! >"$STATE/$site/tvillingd.pid"
done
ctl() { local site=$1; shift; $CTL --state-dir "$STATE/$site" "$@"; }
role() {
  ctl "$1" status --json 2>/dev/null | /usr/bin/python3 -c \
    'import json,sys; print(json.load(sys.stdin)["groups"][0]["role"])' 2>/dev/null || true
}
wait_caught_up() {  # wait_caught_up PRIMARY REPLICA: the replica has applied the primary's last LSN
  local last applied
  last=$(ctl "$1" status --json | /usr/bin/python3 -c \
    'import json,sys; print(int(json.load(sys.stdin)["groups"][0]["last_lsn"]))')
  for _ in $(seq 300); do
    applied=$(ctl "$2" status --json | /usr/bin/python3 -c \
      'import json,sys; g=json.load(sys.stdin)["groups"][0]; print(int(g["applied_lsn"]) if g["consistent"] else -1)')
    [ "$applied" -ge "$last" ] && return 0
    sleep 0.1
  done
  echo "quickstart: $2 did not catch up with $1" >&2
  return 1
}
echo "== waiting for site-a to hold g0's leader key in etcd and serve"
for _ in $(seq 300); do
  [ "$(role site-a)" = primary ] && nbdinfo "$URI_B" >/dev/null 2>&1 && break
  sleep 0.1
done

echo
echo "== write 4 MiB of 0xab at 1 MiB on site-a and flush (sync mode: site-b has it in its log)"
qemu-io -f raw -c "write -P 0xab 1M 4M" -c "flush" "$URI_A"
wait_caught_up site-a site-b
echo "== read it back on site-b (read-only export)"
qemu-io -f raw -r -c "read -P 0xab 1M 4M" "$URI_B"

echo
echo "== tvillingctl status --watch 1 on site-a while fio writes 4 KiB blocks for 3 s"
fio --name=demo --ioengine=nbd --uri="$URI_A" --rw=randwrite --bs=4k --iodepth=8 --offset=16M --size=48M \
  --time_based --runtime=3 --output=/dev/null &
fio_pid=$!
ctl site-a status --watch 1 --count 3 || true
wait "$fio_pid" || true

echo
echo "== switchover: site-b becomes the primary of g0 (writes pause, nothing is lost)"
ctl site-a switchover --group g0 --to site-b
for _ in $(seq 300); do
  [ "$(role site-b)" = primary ] && [ "$(role site-a)" = replica ] && break
  sleep 0.1
done
echo
echo "== write 1 MiB of 0xcd on site-b, the new primary, and read it back on site-a"
qemu-io -f raw -c "write -P 0xcd 8M 1M" -c "flush" "$URI_B"
wait_caught_up site-b site-a
qemu-io -f raw -r -c "read -P 0xcd 8M 1M" -c "read -P 0xab 1M 4M" "$URI_A"
echo
ctl site-b status
cat <<MSG

Running on 127.0.0.1: etcd (3 members), site-b (pid $(cat "$STATE/site-b/tvillingd.pid"), now the
primary of g0, $URI_B) and site-a (pid $(cat "$STATE/site-a/tvillingd.pid"), its synchronous
replica, read-only at $URI_A). State and logs: $STATE.
Write:     qemu-io -f raw -c "write -P 0x5a 0 64k" $URI_B
           fio --ioengine=nbd --uri=$URI_B --rw=randwrite --bs=4k --iodepth=16 --size=64M --name=w
Watch:     $CTL --state-dir $STATE/site-b status --watch 1
           tail -f $STATE/site-a/tvillingd.log $STATE/site-b/tvillingd.log
Switch:    $CTL --state-dir $STATE/site-b switchover --group g0 --to site-a
Fail over: kill -9 \$(cat $STATE/site-b/tvillingd.pid)
           # site-a takes over about 4 s later (once 60 s have passed since the last change of
           # primary: anti_flap_ms); its writes wait 5 s for site-b, then go on without it
           # (sync_degrade_after_ms; the examples default to 0: wait). Restart site-b with
           # $D --config $STATE/site-b.toml --state-dir $STATE/site-b \\
           #   >>$STATE/site-b/tvillingd.log 2>&1 & echo \$! >$STATE/site-b/tvillingd.pid
History:   $CTL --state-dir $STATE/site-a history
Check:     cmp <(nbdcopy $URI_A -) <(nbdcopy $URI_B -) && echo identical
Stop:      deploy/quickstart.sh stop      # stops everything by PID and deletes $STATE
MSG
