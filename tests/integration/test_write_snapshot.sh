#!/usr/bin/env bash
#
# Writes to images with internal snapshots: the clusters shared with a
# snapshot (refcount > 1) must be copied on write, the snapshot must keep
# its content, and the refcounts must stay exact so that QEMU can delete the
# snapshot afterwards without finding errors or leaks.
#
# For each kind: fill the image, "qemu-img snapshot -c", SNAPRAW = the
# snapshot's content (convert -l snapshot.name=...), RAW = the active
# content; mount writable, writemix, unmount; then check clean, active ==
# RAW, snapshot == SNAPRAW; delete the snapshot(s) with qemu-img, check
# clean again, and write once more (the image's clusters are now unshared).
# shellcheck disable=SC2317  # case functions are called indirectly (run_case)
# shellcheck disable=SC2001  # sed indents multi-line tool output
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io cmp
requires_fuse
WRITEMIX=$(require_tool writemix)

K=1024
M=$((1024 * 1024))
NOPS=${WRITEMIX_OPS:-300}
# one writemix run takes a few seconds; much longer means a hung daemon

# snap_raw IMG NAME OUT: the content of snapshot NAME as a raw file.
snap_raw() {
    qemu-img convert -U -f qcow2 -l snapshot.name="$2" -O raw "$1" "$3" \
        || fail "qemu-img convert -l snapshot.name=$2 failed"
}

# check_snapshot IMG NAME SNAPRAW: snapshot NAME still has its content.
check_snapshot() {
    local img=$1 name=$2 want=$3 got="$T/snap-$2.now.raw"
    snap_raw "$img" "$name" "$got"
    same_bytes "$got" "$want" "snapshot $name after writes to the active layer"
    rm -f "$got"
    info "snapshot $name unchanged"
}

# writemix_round IMG SEED MAXLEN RAW
writemix_round() {
    local img=$1 seed=$2 maxlen=$3 raw=$4 mnt="$T/mnt" out rc=0
    mount_image "$img" "$mnt"
    guarded "$mnt" "$T/writemix.out" "$WRITEMIX" "$mnt/disk" "$raw" "$seed" "$NOPS" "$maxlen" || rc=$?
    out=$(cat "$T/writemix.out")
    if ((rc != 0)); then
        sed 's/^/    | /' <<<"$out" >&2
        if ((rc == 124 || rc == 137)); then
            fail "writemix (seed $seed) did not finish within ${WRITEMIX_TIMEOUT}s (daemon hung?)"
        fi
        fail "writemix (seed $seed) failed with status $rc"
    fi
    info "$out"
    unmount_image "$mnt"
}

fill() {
    local img=$1
    qio "$img" \
        "write -s $R1 0 $((8 * M))" \
        "write -s $X1 $((9 * M + 512)) $((4 * M))" \
        "write -s $R2 $((30 * M)) $((4 * M))" \
        "write -z $((31 * M)) $((64 * K))" \
        "write -s $X2 $((60 * M - 3 * K)) $((1 * M))"
}

# snapshot_case IMG SEED MAXLEN SNAP...: IMG is filled; the snapshots are
# taken one after the other, with some qemu-io writes in between.
snapshot_case() {
    local img=$1 seed=$2 maxlen=$3 s i=0 raw="$T/active.raw"
    shift 3
    local snaps=("$@")
    for s in "${snaps[@]}"; do
        if ((i > 0)); then
            qio "$img" "write -s $R3 $((i * 5 * M + 4 * K)) $((2 * M))" "write -z $((i * M)) $((192 * K))"
        fi
        qemu-img snapshot -c "$s" "$img" || fail "test setup: qemu-img snapshot -c $s failed"
        snap_raw "$img" "$s" "$T/snap-$s.raw"
        i=$((i + 1))
    done
    qio "$img" "write -s $R2 $((40 * M)) $((1 * M))"
    ref_raw "$img" "$raw" >/dev/null
    check_clean "$img" "before mounting"

    writemix_round "$img" "$seed" "$maxlen" "$raw"
    check_clean "$img" "after writemix"
    check_identical "$img" "$raw" "active layer after writemix"
    for s in "${snaps[@]}"; do
        check_snapshot "$img" "$s" "$T/snap-$s.raw"
    done
    qemu-img snapshot -l "$img" >"$T/snaplist" || fail "qemu-img snapshot -l failed"
    for s in "${snaps[@]}"; do
        grep -Eq "[[:space:]]${s}[[:space:]]" "$T/snaplist" || fail "snapshot $s is no longer listed"
    done

    for s in "${snaps[@]}"; do
        qemu-img snapshot -d "$s" "$img" || fail "qemu-img snapshot -d $s failed"
        check_clean "$img" "after deleting snapshot $s"
        check_identical "$img" "$raw" "active layer after deleting snapshot $s"
    done

    writemix_round "$img" $((seed + 1000)) "$maxlen" "$raw"
    check_clean "$img" "writes after deleting the snapshots"
    check_identical "$img" "$raw" "writes after deleting the snapshots"
}

case_v3() {
    local img="$T/v3.qcow2"
    qemu-img create -q -f qcow2 "$img" $((64 * M))
    fill "$img"
    snapshot_case "$img" 3001 1M s1
}

case_v2() {
    local img="$T/v2.qcow2"
    qemu-img create -q -f qcow2 -o compat=0.10 "$img" $((64 * M))
    fill "$img"
    snapshot_case "$img" 3002 1M s1
}

# two snapshots with 2-bit refcounts: shared clusters reach refcount 3,
# the largest value a 2-bit refcount can hold.
case_two_snapshots_refcount2() {
    local img="$T/rc2.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=2 "$img" $((64 * M))
    fill "$img"
    snapshot_case "$img" 3003 512K s1 s2
}

# compressed clusters shared with a snapshot
case_compressed() {
    local src="$T/src.qcow2" img="$T/comp.qcow2"
    qemu-img create -q -f qcow2 "$src" $((64 * M))
    fill "$src"
    qemu-img convert -c -O qcow2 "$src" "$img" || fail "test setup: qemu-img convert -c failed"
    snapshot_case "$img" 3004 1M s1
}

make_sources

run_case v3_one_snapshot case_v3
run_case v2_one_snapshot case_v2
run_case two_snapshots_refcount_bits_2 case_two_snapshots_refcount2
run_case compressed_snapshot case_compressed

finish_cases
