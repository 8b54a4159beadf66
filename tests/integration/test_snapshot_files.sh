#!/usr/bin/env bash
#
# MNT/snapshots/NAME: one read-only file per internal snapshot, beside the
# disk, each byte-identical to "qemu-img convert -l snapshot.name=NAME -O
# raw" (the oracle), and unchanged by writes to the disk that copy the
# clusters and tables it shares.
#
# Cases:
#   writable   data, snapshot s1, qemu-io writes, snapshot s2, more writes;
#              mounted writable: every snapshot file equals its oracle and
#              refuses writes; then, with both files held open (fds 3, 4)
#              and a reader of s2 running, MNT/disk takes zero ranges and
#              a punch over clusters the snapshots share, an overwrite of
#              the whole disk, another punch and zero range, an fsync;
#              the held fds read the oracles again; the disk equals a model
#              (a raw file given the same writes); after unmount qemu-img
#              check is clean (no leaks), the oracles are unchanged and
#              qemu-img compare says the disk equals the model.
#   read_only  -o ro: the same files, equal to their oracles.
#   option     -o snapshot=s1: disk is s1, and snapshots/ still lists every
#              snapshot (s1 and s2), each equal to its oracle.
#   names      names that are no file names or are taken ("a/b", "..", a
#              second "x") are shown as id-ID, logged; each equals
#              qemu-img convert -l snapshot.id=ID.
#   smaller    a snapshot taken before the disk grew: its file has the
#              snapshot's disk size and equals that much of the oracle
#              (qemu-img gives the current size, zeros past the old end).
#   shown      no snapshots: no snapshots/ unless -o snapshots (then empty);
#              -o nosnapshots hides it on an image that has some.
# shellcheck disable=SC2317  # case functions are called indirectly (run_case)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io cmp fallocate
requires_fuse

K=1024
M=$((1024 * 1024))
SIZE=$((32 * M))

make_sources

# oracle IMG SEL OUT: the snapshot selected by SEL (name=NAME or id=ID) as
# a raw file, from qemu-img.
oracle() {
    qemu-img convert -U -f qcow2 -l "snapshot.$2" -O raw "$1" "$3" \
        || fail "qemu-img convert -l snapshot.$2 failed"
}

# listing DIR: the names in DIR, sorted, each followed by a space.
listing() {
    local f
    for f in "$1"/*; do [[ -e $f ]] && printf '%s ' "${f##*/}"; done
    return 0
}

# same_size_bytes FILE WANT WHAT: equal sizes and bytes.
same_size_bytes() {
    local got want
    got=$(stat -c %s "$1") || fail "stat $1 failed"
    want=$(stat -c %s "$2")
    [[ $got == "$want" ]] || fail "$3: size $got, expected $want"
    same_bytes "$1" "$2" "$3"
}

# two_snapshots IMG: data, s1, writes, s2, writes (each snapshot differs
# from the other and from the active disk).
two_snapshots() {
    local img=$1
    qemu-img create -q -f qcow2 "$img" "$SIZE" || fail "test setup: qemu-img create failed"
    qio "$img" "write -s $R1 0 $((8 * M))" "write -s $X1 $((12 * M + 512)) $((4 * M))" \
        "write -s $R2 $((24 * M)) $((2 * M))"
    qemu-img snapshot -c s1 "$img" || fail "test setup: qemu-img snapshot -c s1 failed"
    qio "$img" "write -s $R3 $((2 * M + 4 * K)) $((2 * M))" "write -z $((13 * M)) $((192 * K))"
    qio_unmap "$img" "discard $((24 * M)) $((1 * M))"
    qemu-img snapshot -c s2 "$img" || fail "test setup: qemu-img snapshot -c s2 failed"
    qio "$img" "write -s $X2 $((5 * M - 1536)) $((3 * M))" "write -s $R1 $((28 * M)) $((1 * M))"
}

# zero_both DISK MODEL -p|-z OFF LEN: punch (-p) or zero (-z) a range of
# the mounted disk with fallocate, and write zeros there in the model.
zero_both() {
    fallocate "$3" -o "$4" -l "$5" "$1" || fail "fallocate $3 -o $4 -l $5 of $1 failed"
    dd if=/dev/zero of="$2" bs=512 count=$(($5 / 512)) seek=$(($4 / 512)) conv=notrunc status=none \
        || fail "dd of zeros to the model failed"
}

case_writable() {
    local img="$T/a.qcow2" mnt="$T/mnt" model="$T/model.raw" s rpid rc=0
    two_snapshots "$img"
    for s in s1 s2; do oracle "$img" "name=$s" "$T/$s.raw"; done
    ref_raw "$img" "$model" >/dev/null
    cmp -s "$T/s1.raw" "$T/s2.raw" && fail "test setup: s1 and s2 read the same"

    mount_image "$img" "$mnt"
    [[ $(listing "$mnt/snapshots") == "s1 s2 " ]] || fail "snapshots/ lists: $(listing "$mnt/snapshots")"
    for s in s1 s2; do
        same_size_bytes "$mnt/snapshots/$s" "$T/$s.raw" "snapshots/$s vs qemu-img convert -l"
        write_fails_erofs "$mnt/snapshots/$s"
    done
    compare_raw "$img" "$mnt"
    info "snapshots/s1 and s2 equal qemu-img convert -l; writes refused"

    exec 3<"$mnt/snapshots/s1" 4<"$mnt/snapshots/s2"
    # A reader of s2 while the disk is written (one pass: a race, not a
    # timing assertion).
    cmp -s "$mnt/snapshots/s2" "$T/s2.raw" &
    rpid=$!
    # First over clusters and tables the snapshots share, then after an
    # overwrite of the whole disk (clusters the disk owns by then).
    zero_both "$mnt/disk" "$model" -z $((1 * M)) $((1 * M))
    zero_both "$mnt/disk" "$model" -p $((6 * M - 512)) $((1 * M + 1024))
    zero_both "$mnt/disk" "$model" -z $((12 * M + 4 * K)) $((3 * M))
    for f in "$mnt/disk" "$model"; do
        dd if="$R2" of="$f" bs=1M count=8 conv=notrunc status=none || fail "dd to $f failed"
        dd if="$R3" of="$f" bs=1M count=8 seek=8 conv=notrunc status=none || fail "dd to $f failed"
        dd if="$X1" of="$f" bs=1M count=8 seek=16 conv=notrunc status=none || fail "dd to $f failed"
        dd if="$R1" of="$f" bs=1M count=8 seek=24 conv=notrunc status=none || fail "dd to $f failed"
    done
    zero_both "$mnt/disk" "$model" -p $((6 * M)) $((3 * M + 512))
    zero_both "$mnt/disk" "$model" -z $((20 * M - 4 * K)) $((2 * M))
    for f in "$mnt/disk" "$model"; do
        dd if="$X2" of="$f" bs=4k count=3 seek=$((30 * 256 + 1)) conv=notrunc,fsync status=none \
            || fail "dd with fsync to $f failed"
    done
    wait "$rpid" || rc=$?
    ((rc == 0)) || fail "snapshots/s2 read while the disk was written differs from qemu-img convert -l (cmp status $rc)"
    # Through the descriptors held open across the writes (offset 0 still).
    io_timeout cmp - "$T/s1.raw" <&3 || fail "snapshots/s1 read through the fd held open differs after the writes"
    io_timeout cmp - "$T/s2.raw" <&4 || fail "snapshots/s2 read through the fd held open differs after the writes"
    exec 3<&- 4<&-
    for s in s1 s2; do
        same_size_bytes "$mnt/snapshots/$s" "$T/$s.raw" "snapshots/$s after writes to disk"
    done
    same_bytes "$mnt/disk" "$model" "disk after the writes vs the model"
    info "snapshot files unchanged by overwrite, punch, zero range and fsync of disk"
    unmount_image "$mnt"

    check_clean "$img" "after writes beside open snapshot files"
    for s in s1 s2; do
        oracle "$img" "name=$s" "$T/$s.after.raw"
        same_bytes "$T/$s.after.raw" "$T/$s.raw" "qemu-img convert -l snapshot.name=$s after the mount"
    done
    check_identical "$img" "$model" "disk after the mount vs the model"
}

case_read_only() {
    local img="$T/a.qcow2" mnt="$T/mnt" s
    two_snapshots "$img"
    mount_image "$img" "$mnt" ro
    for s in s1 s2; do
        oracle "$img" "name=$s" "$T/$s.raw"
        same_size_bytes "$mnt/snapshots/$s" "$T/$s.raw" "ro: snapshots/$s vs qemu-img convert -l"
    done
    compare_raw "$img" "$mnt"
    unmount_image "$mnt"
}

case_option() {
    local img="$T/a.qcow2" mnt="$T/mnt" s
    two_snapshots "$img"
    for s in s1 s2; do oracle "$img" "name=$s" "$T/$s.raw"; done
    mount_image "$img" "$mnt" snapshot=s1
    same_size_bytes "$mnt/disk" "$T/s1.raw" "-o snapshot=s1: disk vs qemu-img convert -l"
    [[ $(listing "$mnt/snapshots") == "s1 s2 " ]] || fail "-o snapshot=s1: snapshots/ lists: $(listing "$mnt/snapshots")"
    for s in s1 s2; do
        same_size_bytes "$mnt/snapshots/$s" "$T/$s.raw" "-o snapshot=s1: snapshots/$s"
    done
    unmount_image "$mnt"
}

case_names() {
    local img="$T/n.qcow2" mnt="$T/mnt" i want
    qemu-img create -q -f qcow2 "$img" $((4 * M)) || fail "test setup: qemu-img create failed"
    local names=("a/b" "x" "x" "..")
    for i in 0 1 2 3; do
        qio "$img" "write -P $((0x41 + i)) $((i * M)) $((1 * M))"
        qemu-img snapshot -c "${names[i]}" "$img" || fail "test setup: qemu-img snapshot -c '${names[i]}' failed"
    done
    mount_image "$img" "$mnt"
    want="id-1 id-3 id-4 x "
    [[ $(listing "$mnt/snapshots") == "$want" ]] || fail "snapshots/ lists: $(listing "$mnt/snapshots"), expected $want"
    for i in 1 2 3 4; do
        oracle "$img" "id=$i" "$T/id$i.raw"
    done
    same_size_bytes "$mnt/snapshots/id-1" "$T/id1.raw" "snapshot 'a/b' as id-1"
    same_size_bytes "$mnt/snapshots/x" "$T/id2.raw" "the first snapshot 'x'"
    same_size_bytes "$mnt/snapshots/id-3" "$T/id3.raw" "the second snapshot 'x' as id-3"
    same_size_bytes "$mnt/snapshots/id-4" "$T/id4.raw" "snapshot '..' as id-4"
    unmount_image "$mnt"
    grep -q 'shown as snapshots/id-1.*contains' "$DAEMON_LOG" \
        || { sed 's/^/    | /' "$DAEMON_LOG" >&2; fail "the renaming of 'a/b' is not logged"; }
    grep -q 'shown as snapshots/id-3.*same name' "$DAEMON_LOG" \
        || { sed 's/^/    | /' "$DAEMON_LOG" >&2; fail "the renaming of the second 'x' is not logged"; }
}

case_smaller() {
    local img="$T/g.qcow2" mnt="$T/mnt" size
    qemu-img create -q -f qcow2 "$img" $((2 * M)) || fail "test setup: qemu-img create failed"
    qio "$img" "write -s $R1 0 $((2 * M))"
    qemu-img snapshot -c small "$img" || fail "test setup: qemu-img snapshot failed"
    qemu-img resize -q "$img" $((6 * M)) || fail "test setup: qemu-img resize failed"
    qio "$img" "write -s $R2 0 $((6 * M))"
    oracle "$img" "name=small" "$T/small.qemu.raw"
    # QEMU's convert -l keeps the current size: the old disk, then zeros.
    head -c $((2 * M)) "$T/small.qemu.raw" >"$T/small.raw"
    cmp -s <(tail -c +$((2 * M + 1)) "$T/small.qemu.raw") <(head -c $((4 * M)) /dev/zero) \
        || fail "test setup: qemu-img convert -l shows data past the snapshot's disk size"
    mount_image "$img" "$mnt"
    size=$(stat -c %s "$mnt/snapshots/small")
    ((size == 2 * M)) || fail "snapshots/small has size $size, expected the snapshot's disk size $((2 * M))"
    same_bytes "$mnt/snapshots/small" "$T/small.raw" "snapshots/small vs qemu-img convert -l"
    compare_raw "$img" "$mnt"
    unmount_image "$mnt"
}

case_shown() {
    local img="$T/p.qcow2" mnt="$T/mnt"
    qemu-img create -q -f qcow2 "$img" $((1 * M)) || fail "test setup: qemu-img create failed"
    mount_image "$img" "$mnt"
    [[ ! -e $mnt/snapshots ]] || fail "snapshots/ shown for an image without snapshots"
    unmount_image "$mnt"
    mount_image "$img" "$mnt" snapshots
    [[ -d $mnt/snapshots && -z $(listing "$mnt/snapshots") ]] || fail "-o snapshots: no empty snapshots/ directory"
    unmount_image "$mnt"
    qemu-img snapshot -c s1 "$img" || fail "test setup: qemu-img snapshot failed"
    mount_image "$img" "$mnt" nosnapshots
    [[ ! -e $mnt/snapshots ]] || fail "-o nosnapshots: snapshots/ shown"
    unmount_image "$mnt"
}

run_case writable case_writable
run_case read_only case_read_only
run_case option case_option
run_case names case_names
run_case smaller case_smaller
run_case shown case_shown
finish_cases
