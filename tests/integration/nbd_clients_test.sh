#!/usr/bin/env bash
# nbd_clients_test.sh: real NBD clients against a running tvillingd, one scenario per invocation.
#
#   nbd_clients_test.sh TVILLINGD SCENARIO
#
# Scenarios (each is its own ctest, so a failure names the client that broke):
#   nbdinfo      size and the flags the export advertises
#   qemu_io      write/read patterns, aio writes, flush, FUA, discard and write-zeroes, verified by
#                reads, and again after a clean restart
#   nbdcopy      a random 256 MiB image round-trips byte for byte, and again after a restart
#   fio_verify   fio's nbd engine: 4 KiB randwrite QD16 with crc32c verification, then a restart and
#                a verify-only pass over the same data
#   nbdfuse_ext4 nbdfuse + loop device + mkfs.ext4 + files with checksums + fsck -fn + remount, and
#                the file system checked again through a fresh agent after a restart (needs root)
#
# TV_SERVER=nbdkit runs the same scenarios against nbdkit (to debug the test itself).
TV_SUBTEST="${2:-}"
source "$(dirname "$(readlink -f "$0")")/lib.sh"

SCENARIO="${2:-}"
[[ -n "$SCENARIO" ]] || { echo "usage: $0 TVILLINGD SCENARIO" >&2; exit 2; }

MiB=$((1 << 20))

# ---- nbdinfo ---------------------------------------------------------------------------------------
scenario_nbdinfo() {
  tv_init "$1"
  tv_start
  local json
  json="$(nbdinfo --json "$(tv_uri)")" || tv_fail "nbdinfo --json failed"
  echo "$json" > "$TV_TMP/nbdinfo.json"
  /usr/bin/python3 - "$TV_TMP/nbdinfo.json" "$TV_EXPORT" << 'EOF' || tv_fail "nbdinfo output is wrong (above)"
import json, sys
info = json.load(open(sys.argv[1]))
exports = info["exports"]
problems = []
if len(exports) != 1:
    problems.append(f"expected 1 export, got {len(exports)}")
e = exports[0]
want = {
    "export-name": sys.argv[2],
    "export-size": 1 << 30,
    "is_read_only": False,
    "can_flush": True,
    "can_fua": True,
    "can_trim": True,
    "can_zero": True,
    "can_multi_conn": True,
}
for k, v in want.items():
    if e.get(k) != v:
        problems.append(f"{k}: want {v!r}, got {e.get(k)!r}")
if info.get("protocol") != "newstyle-fixed":
    problems.append(f"protocol: want 'newstyle-fixed', got {info.get('protocol')!r}")
for p in problems:
    print("nbdinfo:", p, file=sys.stderr)
print(json.dumps(e, indent=1), file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
  # An export that does not exist must be refused, not served as some default.
  if [[ "$TV_SERVER" == tvillingd ]] && nbdinfo "nbd://127.0.0.1:${TV_PORT}/no-such-export" > /dev/null 2>&1; then
    tv_fail "nbdinfo on a non-existent export name succeeded"
  fi
  tv_stop
  tv_pass
}

# ---- qemu-io ---------------------------------------------------------------------------------------
# Runs qemu-io with the given -c commands; fails on a non-zero exit or any verification/error line
# (qemu-io reports a pattern mismatch on stdout, and older versions exit 0 after it).
qio() {
  local out rc=0
  out="$(qemu-io -f raw -d unmap "$@" "$(tv_uri)" 2>&1)" || rc=$?
  echo "$out" >> "$TV_TMP/qemu-io.log"
  if [[ $rc -ne 0 ]] || grep -qiE 'fail|error|mismatch|Input/output' <<< "$out"; then
    echo "$out" >&2
    tv_fail "qemu-io $* (exit $rc)"
  fi
}

# The layout the qemu-io scenario leaves behind, as reads that verify it (used before and after a
# restart). Offsets are in MiB of a 1 GiB volume.
qio_verify_layout() {
  qio -c "read -P 0xa1 0 1M" \
    -c "read -P 0xb2 1M 1M" \
    -c "read -P 0xc3 2M 64k" -c "read -P 0x00 2162688 983040" \
    -c "read -P 0x00 4M 1M" \
    -c "read -P 0x00 6M 1M" \
    -c "read -P 0xd4 7M 4k" -c "read -P 0x00 7344128 4096" -c "read -P 0xd4 7348224 4096" \
    -c "read -P 0xe5 8M 1M" \
    -c "read -P 0xf6 1020M 4M" \
    -c "read -P 0x17 10M 512" -c "read -P 0x00 10486272 3584"
}

scenario_qemu_io() {
  tv_need qemu-io
  tv_init "$1"
  tv_start
  # Plain writes, each read back; an unaligned small write inside a zero block.
  qio -c "write -P 0xa1 0 1M" -c "read -P 0xa1 0 1M"
  qio -c "write -P 0x17 10M 512" -c "read -P 0x17 10M 512" -c "read -P 0x00 10486272 3584"
  # Asynchronous writes in flight together, then flush (aio_flush waits for them; flush sends FLUSH).
  qio -c "aio_write -P 0xb2 1M 512k" -c "aio_write -P 0xb2 1572864 512k" \
    -c "aio_write -P 0xc3 2M 64k" -c "aio_flush" -c "flush" \
    -c "read -P 0xb2 1M 1M" -c "read -P 0xc3 2M 64k"
  # FUA write.
  qio -c "write -f -P 0xe5 8M 1M" -c "read -P 0xe5 8M 1M"
  # Discard: written data that is then trimmed must read back as zeroes.
  qio -c "write -P 0x5a 4M 1M" -c "read -P 0x5a 4M 1M" -c "discard 4M 1M" -c "read -P 0x00 4M 1M"
  # Write-zeroes over data, whole range and a hole in the middle of a range.
  qio -c "write -P 0x6b 6M 1M" -c "write -z 6M 1M" -c "read -P 0x00 6M 1M"
  qio -c "write -P 0xd4 7M 12k" -c "write -z 7344128 4096" \
    -c "read -P 0xd4 7M 4k" -c "read -P 0x00 7344128 4096" -c "read -P 0xd4 7348224 4096"
  # Write-zeroes with unmap allowed (NBD_CMD_WRITE_ZEROES without NO_HOLE).
  qio -c "write -P 0x7c 9M 1M" -c "write -z -u 9M 1M" -c "read -P 0x00 9M 1M"
  # The last bytes of the volume, and a write past its end that must fail.
  qio -c "write -P 0xf6 1020M 4M" -c "read -P 0xf6 1020M 4M"
  local out
  if out="$(qemu-io -f raw -c "write -P 0x11 1023M 2M" "$(tv_uri)" 2>&1)" &&
    ! grep -qiE 'error|fail|beyond|out of|invalid' <<< "$out"; then
    tv_fail "a write past the end of the volume was accepted: $out"
  fi
  qio -c "flush"
  qio_verify_layout
  # Everything survives a clean restart.
  tv_stop
  tv_verify_log
  tv_start
  qio_verify_layout
  tv_stop
  tv_pass
}

# ---- nbdcopy ---------------------------------------------------------------------------------------
scenario_nbdcopy() {
  tv_need nbdcopy cmp
  tv_init "$1"
  local img="$TV_TMP/rand.img" out="$TV_TMP/out.img" size=$((256 * MiB))
  local vol_bytes
  vol_bytes="$(tv_size_bytes "$TV_VOLUME_SIZE")"
  head -c "$size" /dev/urandom > "$img"
  tv_start
  # Dirty the whole volume first so the tail check below proves nbdcopy's zeroing too.
  nbdcopy --flush -- "$img" "$(tv_uri)" || tv_fail "nbdcopy image -> nbd failed"
  check_copy() {
    rm -f "$out"
    nbdcopy -- "$(tv_uri)" "$out" || tv_fail "nbdcopy nbd -> file failed ($1)"
    [[ "$(stat -c %s "$out")" == "$vol_bytes" ]] || tv_fail "copied-out size $(stat -c %s "$out") != $vol_bytes ($1)"
    cmp -n "$size" "$img" "$out" || tv_fail "first 256 MiB differ from the image ($1)"
    cmp -n $((vol_bytes - size)) -i "$size:0" "$out" /dev/zero ||
      tv_fail "bytes after the image are not zero ($1)"
    tv_log "round trip OK ($1)"
  }
  check_copy "live"
  # Also a single-connection copy (nbdcopy uses multi-conn by default).
  rm -f "$out"
  nbdcopy --connections=1 --requests=1 -- "$(tv_uri)" "$out" || tv_fail "single-connection nbdcopy failed"
  cmp -n "$size" "$img" "$out" || tv_fail "single-connection read differs from the image"
  tv_stop
  tv_verify_log
  tv_start
  check_copy "after SIGTERM + restart"
  # A second image over the first, through a restart without FLUSH being sent by the copy: the
  # clean shutdown must still make it durable.
  head -c "$size" /dev/urandom > "$img"
  nbdcopy -- "$img" "$(tv_uri)" || tv_fail "second nbdcopy image -> nbd failed"
  tv_stop
  tv_start
  check_copy "second image, after restart"
  tv_stop
  tv_pass
}

# ---- fio -------------------------------------------------------------------------------------------
scenario_fio_verify() {
  tv_need fio
  tv_init "$1"
  tv_start
  local common=(--ioengine=nbd --uri="$(tv_uri)" --bs=4k --iodepth=16 --size=64M
    --offset=128M --verify=crc32c --verify_fatal=1 --randrepeat=1)
  fio --name=randwrite-verify --rw=randwrite --do_verify=1 "${common[@]}" \
    --output="$TV_TMP/fio1.txt" || { cat "$TV_TMP/fio1.txt" >&2; tv_fail "fio randwrite+verify failed"; }
  grep -q 'err= 0' "$TV_TMP/fio1.txt" || { cat "$TV_TMP/fio1.txt" >&2; tv_fail "fio reported an error"; }
  # Mixed sizes with QD16 and flushes, then verify.
  fio --name=mixed-verify --rw=randwrite --bsrange=512-64k --bs_unaligned=0 --fsync=32 \
    --do_verify=1 --ioengine=nbd --uri="$(tv_uri)" --iodepth=16 --size=32M --offset=512M \
    --verify=crc32c --verify_fatal=1 --output="$TV_TMP/fio2.txt" ||
    { cat "$TV_TMP/fio2.txt" >&2; tv_fail "fio mixed-size randwrite+verify failed"; }
  # The first job's data must still verify after a clean restart (read-only verify pass).
  tv_stop
  tv_verify_log
  tv_start
  fio --name=randwrite-verify --rw=randwrite --verify_only=1 "${common[@]}" \
    --output="$TV_TMP/fio3.txt" || { cat "$TV_TMP/fio3.txt" >&2; tv_fail "fio verify after restart failed"; }
  grep -qE 'verify|err= 0' "$TV_TMP/fio3.txt" || { cat "$TV_TMP/fio3.txt" >&2; tv_fail "fio verify-only printed no result"; }
  tv_stop
  tv_pass
}

# ---- nbdfuse + loop + ext4 -------------------------------------------------------------------------
FUSE_DIR=""
FUSE_PID=""
LOOP_DEV=""
FS_DIR=""
FS_MOUNTED=""

fuse_up() {
  mkdir -p "$FUSE_DIR"
  rm -f "$TV_TMP/nbdfuse.pid"
  nbdfuse -P "$TV_TMP/nbdfuse.pid" "$FUSE_DIR/disk" "$(tv_uri)" > "$TV_TMP/nbdfuse.log" 2>&1 &
  FUSE_PID=$!
  local i
  for ((i = 0; i < 300; i++)); do
    [[ -s "$TV_TMP/nbdfuse.pid" && -e "$FUSE_DIR/disk" ]] && break
    kill -0 "$FUSE_PID" 2> /dev/null || { cat "$TV_TMP/nbdfuse.log" >&2; tv_fail "nbdfuse exited"; }
    sleep 0.1
  done
  [[ -e "$FUSE_DIR/disk" ]] || tv_fail "nbdfuse did not mount within 30 s"
  LOOP_DEV="$(losetup -f --show "$FUSE_DIR/disk")" || tv_fail "losetup on the nbdfuse file failed"
  tv_log "nbdfuse pid $FUSE_PID, loop device $LOOP_DEV"
}

fs_mount() {
  mount -t ext4 "$LOOP_DEV" "$FS_DIR" || tv_fail "mount $LOOP_DEV failed"
  FS_MOUNTED=1
}

fs_umount() {
  if [[ -n "$FS_MOUNTED" ]]; then
    umount "$FS_DIR" || tv_fail "umount $FS_DIR failed"
    FS_MOUNTED=""
  fi
}

fuse_down() {
  fs_umount
  if [[ -n "$LOOP_DEV" ]]; then
    losetup -d "$LOOP_DEV" || tv_fail "losetup -d $LOOP_DEV failed"
    LOOP_DEV=""
  fi
  if [[ -n "$FUSE_PID" ]]; then
    fusermount3 -u "$FUSE_DIR" || tv_fail "fusermount3 -u $FUSE_DIR failed"
    local i
    for ((i = 0; i < 100; i++)); do kill -0 "$FUSE_PID" 2> /dev/null || break; sleep 0.1; done
    kill -0 "$FUSE_PID" 2> /dev/null && tv_fail "nbdfuse pid $FUSE_PID still running after unmount"
    wait "$FUSE_PID" 2> /dev/null || true
    FUSE_PID=""
  fi
}

# Best-effort teardown for the EXIT trap (never fails, never hangs on a dead FUSE server: lazy
# unmounts and kill by PID).
fuse_cleanup() {
  if [[ -n "$FS_MOUNTED" ]]; then umount "$FS_DIR" 2> /dev/null || umount -l "$FS_DIR"; fi
  if [[ -n "$LOOP_DEV" ]]; then losetup -d "$LOOP_DEV"; fi
  if [[ -n "$FUSE_PID" ]]; then
    fusermount3 -u "$FUSE_DIR" 2> /dev/null || fusermount3 -uz "$FUSE_DIR" 2> /dev/null || true
    sleep 0.5
    kill "$FUSE_PID" 2> /dev/null || true
    wait "$FUSE_PID" 2> /dev/null || true
  fi
  true
}

scenario_nbdfuse_ext4() {
  tv_need nbdfuse fusermount3 losetup mkfs.ext4 fsck.ext4 mount umount sha256sum nbdcopy
  [[ $EUID -eq 0 ]] || tv_fail "needs root for losetup and mount (CI runs as root); uid is $EUID"
  [[ -c /dev/fuse ]] || tv_fail "/dev/fuse is missing"
  [[ -e /dev/loop-control ]] || tv_fail "/dev/loop-control is missing (no loop device support)"
  tv_init "$1"
  FUSE_DIR="$TV_TMP/fuse"
  FS_DIR="$TV_TMP/fs"
  mkdir -p "$FS_DIR"
  tv_on_exit fuse_cleanup
  tv_start
  fuse_up
  mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$LOOP_DEV" > "$TV_TMP/mkfs.log" 2>&1 ||
    { cat "$TV_TMP/mkfs.log" >&2; tv_fail "mkfs.ext4 failed"; }
  fs_mount
  # Files of several sizes, one large enough to span many extents, plus a directory tree.
  local i
  for i in 1 2 3 4 5 6 7 8; do head -c $((i * 37 * 1024 + i)) /dev/urandom > "$FS_DIR/small$i"; done
  head -c $((48 * MiB)) /dev/urandom > "$FS_DIR/big"
  mkdir -p "$FS_DIR/d/e/f"
  for i in $(seq 1 50); do echo "file $i" > "$FS_DIR/d/e/f/n$i"; done
  (cd "$FS_DIR" && find . -type f ! -name SUMS -print0 | sort -z | xargs -0 sha256sum > "$TV_TMP/SUMS")
  cp "$TV_TMP/SUMS" "$FS_DIR/SUMS"
  rm "$FS_DIR/small8"  # frees blocks: ext4 may discard them (mount default has no discard; fstrim below)
  sed -i '/small8$/d' "$TV_TMP/SUMS"
  fstrim -v "$FS_DIR" || tv_fail "fstrim failed"
  sync -f "$FS_DIR"
  fs_umount
  fsck.ext4 -fn "$LOOP_DEV" > "$TV_TMP/fsck1.log" 2>&1 ||
    { cat "$TV_TMP/fsck1.log" >&2; tv_fail "fsck.ext4 -fn reported problems after unmount"; }
  fs_mount
  (cd "$FS_DIR" && sha256sum --quiet -c "$TV_TMP/SUMS") || tv_fail "checksums differ after remount"
  fs_umount
  fuse_down
  # The file system must be intact through the agent's clean restart, read from a fresh copy.
  tv_stop
  tv_verify_log
  tv_start
  nbdcopy -- "$(tv_uri)" "$TV_TMP/fs.img" || tv_fail "nbdcopy of the volume failed"
  fsck.ext4 -fn "$TV_TMP/fs.img" > "$TV_TMP/fsck2.log" 2>&1 ||
    { cat "$TV_TMP/fsck2.log" >&2; tv_fail "fsck.ext4 -fn of the volume after restart reported problems"; }
  # Mount through NBD again and check every file.
  fuse_up
  fs_mount
  (cd "$FS_DIR" && sha256sum --quiet -c "$TV_TMP/SUMS") || tv_fail "checksums differ after agent restart"
  fs_umount
  fuse_down
  tv_stop
  tv_pass
}

case "$SCENARIO" in
  nbdinfo | qemu_io | nbdcopy | fio_verify | nbdfuse_ext4) "scenario_$SCENARIO" "${1:-}" ;;
  *) echo "unknown scenario '$SCENARIO'" >&2; exit 2 ;;
esac
