#!/usr/bin/env bash
#
# A full host file system.  The image lives on a 48 MiB ext4 of its own (a
# file in $T, loop-mounted); the guest disk is far larger.  Then:
#
#   1. 4 MiB written at guest offset 0 (region A) and 2 MiB at 16 MiB,
#      fsynced;
#   2. a sequential write of more than the file system holds fails with
#      ENOSPC ("No space left on device"; not EIO, not a hang); the bytes
#      dd reports written were acknowledged;
#   3. 128 KiB is freed on the host file system and 4 KiB writes that
#      each need a new L2 table (4 KiB clusters: one table per 2 MiB) are
#      made until well past the space again: every one succeeds or fails
#      with ENOSPC, and the run sees both (allocations failing at every
#      step of an allocation: table, refcount block, data);
#   4. the first fsync after the ENOSPC succeeds (the acknowledged writes
#      are not lost), region A is overwritten in place with new data
#      (allocated clusters need no space) and fsynced;
#   5. the daemon unmounts with status 0, the file system is unmounted and
#      mounted again, and the image is what the acknowledged writes make
#      it: qemu-img compare against a raw model, a read-only mount against
#      qemu-img convert, qemu-img check without errors or leaks, and no
#      cluster past the end of the file with a refcount (a refused
#      allocation must give its cluster back: qemu-img check does not look
#      there, and the daemon refuses an image that counts more than 8192
#      clusters past its end).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img mkfs.ext4 losetup mount umount truncate dd cmp
requires_fuse
((EUID == 0)) || skip "needs root (loop devices, mount)"
MUTATE=$(require_tool mutate)

K=1024
M=$((1024 * 1024))
FS_IMG="$T/fs.ext4"
FS_MNT="$T/fs"
IMG="$FS_MNT/disk.qcow2"
DISK_SIZE=$((1024 * M))
MODEL="$T/model.raw"

mount_fs() {
    mkdir -p "$FS_MNT"
    mount -t ext4 "$LOOPDEV" "$FS_MNT" || fail "test setup: mounting the ext4 file system failed"
}

umount_fs() {
    umount "$FS_MNT" || fail "unmounting the ext4 file system failed"
}

# dd_bytes ERRFILE: the byte count of dd's final "N bytes ... copied".
dd_bytes() {
    sed -n 's/^\([0-9][0-9]*\) bytes.*copied.*/\1/p' "$1" | tail -n1
}

# enospc_only ERRFILE WHAT: dd failed, and with ENOSPC only.
enospc_only() {
    if grep -q 'Input/output error' "$1"; then
        sed 's/^/    | /' "$1" >&2
        fail "$2: EIO where the host file system is full (expected ENOSPC)"
    fi
    grep -q 'No space left on device' "$1" || {
        sed 's/^/    | /' "$1" >&2
        fail "$2: failed, but not with ENOSPC"
    }
}

# model_put SRC SRC_OFF LEN DISK_OFF: the model gets what the guest wrote.
model_put() {
    dd if="$1" of="$MODEL" bs=64k iflag=skip_bytes,count_bytes oflag=seek_bytes \
        skip="$2" count="$3" seek="$4" conv=notrunc status=none || fail "test setup: model update failed"
}

# --- the host file system and the image
truncate -s $((48 * M)) "$FS_IMG"
mkfs.ext4 -q -m 0 -E lazy_itable_init=0,lazy_journal_init=0 "$FS_IMG" \
    || fail "test setup: mkfs.ext4 failed"
LOOPDEV=$(losetup -f --show "$FS_IMG") || fail "test setup: losetup failed"
# Cleanup: the daemon (its image lives in this file system) first, then the
# file system, then its loop device.
track_host_fs "$FS_MNT" "$LOOPDEV"
mount_fs
qemu-img create -q -f qcow2 -o cluster_size=4096 "$IMG" "$DISK_SIZE" \
    || fail "test setup: qemu-img create failed"
# Room that step 3 gives back to the file system.
head -c $((128 * K)) /dev/zero >"$FS_MNT/spacer"
sync -f "$FS_MNT"

head -c $((4 * M)) /dev/urandom >"$T/A"
head -c $((4 * M)) /dev/urandom >"$T/B"
head -c $((64 * M)) /dev/urandom >"$T/S"
truncate -s "$DISK_SIZE" "$MODEL"

mount_image "$IMG" "$T/m"

# --- 1. region A and 2 MiB at 16 MiB (never written again), fsynced
guarded "$T/m" "$T/a.err" dd if="$T/A" of="$T/m/disk" bs=1M conv=notrunc status=none \
    || fail "writing region A failed: $(head -n1 "$T/a.err")"
guarded "$T/m" "$T/a2.err" dd if="$T/S" of="$T/m/disk" bs=1M count=2 seek=16 conv=notrunc,fsync \
    status=none || fail "writing 2 MiB at 16 MiB failed: $(head -n1 "$T/a2.err")"
model_put "$T/A" 0 $((4 * M)) 0
model_put "$T/S" 0 $((2 * M)) $((16 * M))

# --- 2. a sequential write past the space
rc=0
guarded "$T/m" "$T/fill.err" dd if="$T/S" of="$T/m/disk" bs=1M seek=64 count=64 \
    conv=notrunc || rc=$?
((rc != 124)) || fail "the write past the space hung"
((rc != 0)) || fail "64 MiB were written to a 48 MiB file system"
enospc_only "$T/fill.err" "the sequential write past the space"
fill=$(dd_bytes "$T/fill.err")
[[ -n $fill ]] || fail "no byte count in dd's output"
info "sequential write: ENOSPC after $fill bytes (acknowledged)"
((fill > 0)) || fail "the sequential write was refused at once (the file system was not filled by it)"
model_put "$T/S" 0 "$fill" $((64 * M))

# --- 3. allocations of new L2 tables at the edge of the space
rm -f "$FS_MNT/spacer"
sync -f "$FS_MNT"
ok=0 nospace=0
for ((i = 0; i < 200; i++)); do
    off=$((512 * M + i * 2 * M + (i % 7) * 4096))
    rc=0
    guarded "$T/m" "$T/s.err" dd if="$T/S" of="$T/m/disk" bs=4k count=1 skip=$((i * 4096)) \
        seek="$off" iflag=skip_bytes oflag=seek_bytes conv=notrunc status=none || rc=$?
    ((rc != 124)) || fail "scattered write $i hung"
    if ((rc == 0)); then
        ok=$((ok + 1))
        model_put "$T/S" $((i * 4096)) 4096 "$off"
    else
        enospc_only "$T/s.err" "scattered write $i (at $off)"
        nospace=$((nospace + 1))
        # Far enough past the edge: ten refusals in a row.
        ((nospace < 10 || ok == 0)) || break
    fi
done
info "scattered writes needing new L2 tables: $ok succeeded, $nospace refused with ENOSPC"
((ok > 0)) || fail "no write needing a new L2 table succeeded after space was freed"
((nospace > 0)) || fail "no scattered write met ENOSPC"

# --- 4. fsync after ENOSPC; then allocated clusters are still writable
rc=0
guarded "$T/m" "$T/sync1.err" "$TOOLS/fsyncfile" "$T/m/disk" || rc=$?
((rc == 0)) || fail "the first fsync after ENOSPC failed (status $rc): $(head -n1 "$T/sync1.err")"
guarded "$T/m" "$T/b.err" dd if="$T/B" of="$T/m/disk" bs=1M conv=notrunc,fsync status=none \
    || fail "overwriting allocated region A after ENOSPC failed: $(head -n1 "$T/b.err")"
model_put "$T/B" 0 $((4 * M)) 0
rc=0
guarded "$T/m" "$T/sync2.err" "$TOOLS/fsyncfile" "$T/m/disk" || rc=$?
((rc == 0)) || fail "fsync after the overwrite failed (status $rc): $(head -n1 "$T/sync2.err")"
unmount_image "$T/m"

# --- 5. after a remount of the host file system
umount_fs
mount_fs
out=$(qemu-img check "$IMG" 2>&1) || rc=$?
rc=${rc:-0}
if ((rc != 0 && rc != 3)) || grep -Eq 'ERROR|corrupt' <<<"$out"; then
    printf '%s\n' "$out" | sed 's/^/    | /' >&2
    fail "qemu-img check: errors in the image (exit status $rc)"
fi
leaks=$(sed -n 's/^\([0-9][0-9]*\) leaked clusters were found.*/\1/p' <<<"$out")
leaks=${leaks:-0}
info "qemu-img check: no errors, $leaks leaked cluster(s)"
((leaks == 0)) || fail "$leaks leaked clusters after a clean unmount: a failed allocation kept its refcount"
# qemu-img check looks only at clusters inside the file: a refused
# allocation that kept its refcount leaks a cluster past the end, where it
# is counted forever (and past 8192 of them the image no longer opens).
past=$("$MUTATE" --counted-past-eof "$IMG") || fail "mutate --counted-past-eof failed"
((past == 0)) || fail "$past cluster(s) past the end of the image file have a refcount: leaked by refused allocations"
check_identical "$IMG" "$MODEL" "every acknowledged write after the remount"
mount_image "$IMG" "$T/m" ro
compare_raw "$IMG" "$T/m"
unmount_image "$T/m"
echo "ok: ENOSPC reported, $fill + $ok x 4096 acknowledged bytes kept, $leaks leak(s)"
