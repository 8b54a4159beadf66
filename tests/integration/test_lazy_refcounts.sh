#!/usr/bin/env bash
# Lazy refcounts: the dirty bit is set (durably) before the first write and
# cleared by a clean unmount; an image left dirty by a crash (the daemon
# killed with SIGKILL) has its refcounts rebuilt when it is next mounted
# writable, then takes a random write mix and ends check-clean.
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io

dirty_bit() { # prints 1 when incompatible bit 0 is set
    local b
    b=$(od -An -t u1 -j79 -N1 "$1" | tr -d ' ')
    echo $((b & 1))
}

case_lazy() {
    local img=$T/lazy.qcow2 mnt=$T/mnt raw=$T/mirror.raw pid wm out rc
    wm=$(require_tool writemix)
    qemu-img create -q -f qcow2 -o lazy_refcounts=on "$img" 128M
    qio "$img" "write -P 0x21 0 8M"
    [[ $(dirty_bit "$img") == 0 ]] || fail "fresh image already dirty"

    mount_image "$img" "$mnt"
    [[ $(dirty_bit "$img") == 0 ]] || fail "dirty bit set before any write"
    dd if=/dev/urandom of="$mnt/disk" bs=64k count=32 seek=300 conv=notrunc,fsync status=none
    [[ $(dirty_bit "$img") == 1 ]] || fail "dirty bit not set after the first write"
    unmount_image "$mnt"
    [[ $(dirty_bit "$img") == 0 ]] || fail "dirty bit still set after a clean unmount"

    # Crash: writes (some fsynced, some not), then SIGKILL.
    mount_image "$img" "$mnt"
    pid=${_MNT_PID[$(canon_path "$mnt")]}
    dd if=/dev/urandom of="$mnt/disk" bs=64k count=64 seek=600 conv=notrunc,fsync status=none
    dd if=/dev/urandom of="$mnt/disk" bs=4k count=100 seek=9000 conv=notrunc status=none
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
    unset "_MNT_PID[$(canon_path "$mnt")]"
    fusermount3 -uz "$mnt" 2>/dev/null || true
    [[ $(dirty_bit "$img") == 1 ]] || fail "a crashed image is not marked dirty"
    info "crashed image: dirty bit set, as expected"

    # The writable mount rebuilds the refcounts first.
    ref_raw "$img" "$raw" >/dev/null
    mount_image "$img" "$mnt"
    grep -q 'rebuilding refcounts' "$DAEMON_LOG" || fail "no refcount rebuild reported"
    [[ $(dirty_bit "$img") == 0 ]] || fail "dirty bit not cleared after the rebuild"
    out=$(io_timeout "$wm" "$mnt/disk" "$raw" 8080 300 1048576) || fail "writemix after the rebuild failed"
    info "$out"
    unmount_image "$mnt"
    rc=0
    out=$(qemu-img check "$img" 2>&1) || rc=$?
    ((rc == 0)) && grep -q '^No errors were found' <<<"$out" || { echo "$out" >&2; fail "not clean after rebuild + writes"; }
    qemu-img compare -q "$img" "$raw" || fail "content differs from the mirror"
    [[ $(dirty_bit "$img") == 0 ]] || fail "dirty bit set after the final clean unmount"

    # A read-only mount of a dirty image just reads.
    cp "$img" "$T/dirty.qcow2"
    printf '\x01' | dd of="$T/dirty.qcow2" bs=1 seek=79 conv=notrunc status=none
    mount_image "$T/dirty.qcow2" "$mnt" ro
    cmp "$mnt/disk" "$raw" || fail "read-only mount of a dirty image reads wrong data"
    unmount_image "$mnt"
    [[ $(dirty_bit "$T/dirty.qcow2") == 1 ]] || fail "a read-only mount changed the dirty bit"
}

run_case lazy_refcounts case_lazy
finish_cases
