#!/usr/bin/env bash
#
# The corruptions that QEMU's own qemu-iotests poke into qcow2 images
# (060: overlapping metadata, 080: header input validation, 036: feature
# bits, 138: a data cluster at 32 PB), re-made here on images that qemu-img
# creates, and what the daemon must do with each:
#
#   * a mount refused with a message that names the field, or
#   * the read or write that meets the damage fails with EIO (and only that
#     one: the daemon stays up and answers),
#   * never a signal, a hang, guest data written into a metadata cluster or
#     a changed header: after a writable attempt the image file is byte for
#     byte what it was, except the corrupt bit (incompatible bit 1), which a
#     writable mount that met corrupt metadata must have set; a read-only
#     mount changes nothing at all.
#
# An image with the corrupt bit is refused writable, served read-only (what
# qemu-img convert reads) and, after qcow2check -r all, writable again.
#
# Scenarios that test_read_errors.sh or test_mutated_images.sh already pin
# down with the same values are not repeated here (misaligned L1 and
# refcount table offsets, l1_size 0x7fffffff, header_length 100/108,
# incompatible bit 40, backing_file_size 5000, the bare corrupt bit).
# The discard, shrink and compressed-write scenarios of 060 are not here:
# qcow2fuse writes no compressed clusters, and discard/shrink validation is
# tested with the discard code.
#
# At the end a table lists every case with its outcome.
# shellcheck disable=SC2317  # case functions are called indirectly (run_case)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io cmp od dd prlimit
requires_fuse
MUTATE=$(require_tool mutate)
[[ -n ${QCOW2CHECK:-} && -x $QCOW2CHECK ]] || fail "QCOW2CHECK is not set (absolute path of qcow2check)"

K=1024
M=$((1024 * 1024))
COPIED=0x8000000000000000
OUTCOMES="$TEST_TMP/outcomes"
mkdir -p "$OUTCOMES"
PAT="$TEST_TMP/pattern"
head -c $((1 * M)) /dev/urandom >"$PAT"

# ---------------------------------------------------------------------------
# Helpers

# outcome TEXT: what this case ended with, for the table at the end.
outcome() {
    printf '%s\n' "$*" >>"$OUTCOMES/$CASE_NAME"
    info "outcome: $*"
}

# poke IMG OFFSET VALUE WIDTH: store VALUE big-endian in WIDTH bytes.
poke() {
    local hex
    printf -v hex '%0*x' $(($4 * 2)) "$(($3))"
    ((${#hex} == $4 * 2)) || fail "poke: $3 does not fit in $4 bytes"
    "$MUTATE" "$1" "$(($2))" "$hex" || fail "test setup: mutate $1 $2 $hex failed"
}

# peek IMG OFFSET WIDTH: big-endian integer (printed as unsigned hex).
peek() {
    od -A n -t x1 -j "$2" -N "$3" "$1" | tr -d ' \n'
}

# geo IMG KEY: one value of "mutate --info".
geo() {
    "$MUTATE" --info "$1" | sed -n "s/^$2=//p"
}

# l2_entry_offset IMG GUEST [SNAPSHOT]: file offset of the L2 entry.
l2_entry_offset() {
    local out
    out=$("$MUTATE" --l2entry "$@") || fail "test setup: mutate --l2entry $* failed"
    [[ $out != none ]] || fail "test setup: guest offset $2 of $1 has no L2 table"
    echo "${out%% *}"
}

# make_base IMG [CREATE_OPTS]: 64 MiB, v3, 64 KiB clusters (unless the
# options say otherwise), guest cluster 0 written: header, refcount table,
# refcount block, L1, one L2 table and one data cluster, in that order.
make_base() {
    local img=$1 opts=${2:-}
    qemu-img create -q -f qcow2 -o "compat=1.1${opts:+,$opts}" "$img" $((64 * M)) \
        || fail "test setup: qemu-img create failed"
    qio "$img" "write -P 0x11 0 64k"
    qemu-img check -q "$img" || fail "test setup: the base image is not clean"
}

# Geometry of a base image (set by load_geo).
load_geo() {
    RT=$(geo "$1" refcount_table_offset)
    RB0=$(geo "$1" rt.0)
    L1=$(geo "$1" l1_offset)
    L2=$(geo "$1" l1.0)
    DATA=$(geo "$1" first_data_host)
    CS=$(geo "$1" cluster_size)
    [[ -n $RT && -n $RB0 && -n $L1 && -n $L2 && -n $DATA ]] || fail "test setup: mutate --info misses a table"
}

incompat_of() { peek "$1" 72 8; }

# only_corrupt_bit_changed BEFORE AFTER: AFTER is BEFORE byte for byte,
# except incompatible_features (header bytes 72-79), which may have gained
# the corrupt bit and nothing else.
only_corrupt_bit_changed() {
    local before=$1 after=$2 n first b a
    [[ $(stat -c %s "$before") == $(stat -c %s "$after") ]] \
        || fail "the image file changed size: $(stat -c %s "$before") -> $(stat -c %s "$after")"
    # cmp -l numbers bytes from 1: the incompatible field is 73..80.
    cmp -l "$before" "$after" >"$T/cmp.out" || true
    n=$(awk '$1 < 73 || $1 > 80' "$T/cmp.out" | wc -l)
    if ((n > 0)); then
        first=$(awk '$1 < 73 || $1 > 80 {print $1 - 1; exit}' "$T/cmp.out")
        awk '($1 < 73 || $1 > 80) && n++ < 8 {printf "    changed: 0x%x %s -> %s (octal)\n", $1 - 1, $2, $3}' "$T/cmp.out" >&2
        fail "$n byte(s) of the image changed outside the corrupt bit, the first at 0x$(printf %x "$first") (cluster 0x$(printf %x $((first / CS * CS))))"
    fi
    b=$((16#$(incompat_of "$before"))) a=$((16#$(incompat_of "$after")))
    ((a == b || a == (b | 2))) \
        || fail "incompatible_features changed from 0x$(printf %x "$b") to 0x$(printf %x "$a") (only bit 1 may be added)"
}

corrupt_bit_set() {
    (((16#$(incompat_of "$1")) & 2)) || fail "the corrupt bit is not set in $(basename "$1")"
}

# unmount_any MNT: fusermount3 -u and wait for the daemon; any exit status
# is accepted except death by a signal (a corrupt image may make the final
# metadata flush fail).  Sets STOP_RC.
unmount_any() {
    local mnt pid i
    mnt=$(canon_path "$1")
    pid=${_MNT_PID[$mnt]}
    for ((i = 0; ; i++)); do
        fusermount3 -u "$mnt" 2>"$T/fusermount.err" && break
        pid_alive "$pid" || fail "the daemon died while mounted"
        ((i < 40)) || fail "fusermount3 -u $mnt failed: $(head -n1 "$T/fusermount.err")"
        sleep 0.25
    done
    for ((i = 0; i < EXIT_TIMEOUT * 50; i++)); do
        pid_alive "$pid" || break
        sleep 0.02
    done
    pid_alive "$pid" && fail "the daemon did not exit within ${EXIT_TIMEOUT}s of the unmount"
    STOP_RC=0
    wait "$pid" || STOP_RC=$?
    unset "_MNT_PID[$mnt]"
    ((STOP_RC < 128)) || fail "the daemon was killed by signal $((STOP_RC - 128))"
    _check_sanitizer_output "${_MNT_LOG[$mnt]}" "daemon"
}

# alive MNT: the daemon still answers.
alive() {
    timeout -k 2 10 stat "$1/disk" >/dev/null 2>"$T/stat.err" \
        || fail "the daemon stopped answering: $(head -n1 "$T/stat.err")"
}

# io_op read|write MNT OFFSET LEN: one dd request; sets IO_RC, IO_ERR.
io_op() {
    local op=$1 mnt=$2 off=$3 len=$4
    IO_ERR="$T/io.$(_seq).err"
    IO_RC=0
    if [[ $op == read ]]; then
        io_timeout dd if="$mnt/disk" of=/dev/null bs="$len" count=1 skip="$off" \
            iflag=skip_bytes status=none 2>"$IO_ERR" || IO_RC=$?
    else
        io_timeout dd if="$PAT" of="$mnt/disk" bs="$len" count=1 seek="$off" \
            oflag=seek_bytes conv=notrunc,fsync status=none 2>"$IO_ERR" || IO_RC=$?
    fi
    ((IO_RC != 124 && IO_RC != 137)) || fail "$op of $len bytes at $off hung"
    if grep -Eq 'Transport endpoint|connection abort|No such device' "$IO_ERR"; then
        fail "$op at $off: the mount lost its daemon: $(head -n1 "$IO_ERR")"
    fi
}

# expect_eio read|write MNT OFFSET LEN
expect_eio() {
    io_op "$@"
    ((IO_RC != 0)) || fail "$1 of $4 bytes at $3 succeeded; expected EIO"
    grep -q 'Input/output error' "$IO_ERR" \
        || fail "$1 of $4 bytes at $3 failed, but not with EIO: $(head -n1 "$IO_ERR")"
    alive "$2"
}

# log_mentions LOG REGEX...: the daemon's output matches every regex.
log_mentions() {
    local log=$1 p
    shift
    for p in "$@"; do
        if ! grep -Eqi -- "$p" "$log"; then
            sed 's/^/    | /' "$log" >&2
            fail "the daemon's message does not mention /$p/"
        fi
    done
}

# first_error FILE: the daemon's first error message, without the program
# name and the image path.
first_error() {
    { grep -m1 'error: ' "$1" || head -n1 "$1"; } | sed -E 's/^.*error: //; s|^/[^:]*: ||' | cut -c1-160
}

# ---------------------------------------------------------------------------
# The scenario runners

# attempt_rw IMG OP OFFSET LEN REGEX: a writable mount of IMG, then OP
# (read or write) of LEN bytes at OFFSET must fail with EIO, or the mount
# must be refused; the daemon's message matches REGEX; the file is unchanged
# but for the corrupt bit, which is set.
attempt_rw() {
    local img=$1 op=$2 off=$3 len=$4 re=$5 before="$T/before.qcow2"
    cp "$img" "$before"
    if try_mount "$img" "$T/rw"; then
        expect_eio "$op" "$T/rw" "$off" "$len"
        # A second access is refused as well, without a second report.
        expect_eio "$op" "$T/rw" "$off" "$len"
        if (($(stat -c %s "$T/rw/disk") >= 16 * M)); then expect_eio write "$T/rw" $((8 * M)) 4096; fi
        unmount_any "$T/rw"
        log_mentions "$DAEMON_LOG" 'corrupt image metadata' "$re"
        outcome "rw: $op EIO (exit $STOP_RC): $(first_error "$DAEMON_LOG")"
    else
        ((TRY_RC < 126)) || fail "the daemon died with status $TRY_RC"
        log_mentions "$DAEMON_LOG" "$re"
        outcome "rw: mount refused: $(first_error "$DAEMON_LOG")"
    fi
    only_corrupt_bit_changed "$before" "$img"
    corrupt_bit_set "$img"
}

# attempt_ro IMG OFFSET LEN eio|any [REGEX]: a read-only mount; a read of
# LEN bytes at OFFSET fails with EIO (eio) or may do either (any: the
# damage is invisible without the overlap map); the file is untouched.
attempt_ro() {
    local img=$1 off=$2 len=$3 want=$4 re=${5:-} sum
    sum=$(cksum <"$img")
    mount_image "$img" "$T/ro" ro
    if [[ $want == eio ]]; then
        expect_eio read "$T/ro" "$off" "$len"
        expect_eio read "$T/ro" "$off" "$len"
        [[ -z $re ]] || log_mentions "$DAEMON_LOG" "$re"
        # Reported once, however often it is met (060).
        [[ $(grep -c 'corrupt image metadata' "$DAEMON_LOG") == 1 ]] \
            || fail "the corruption was reported $(grep -c 'corrupt image metadata' "$DAEMON_LOG") times, expected once"
        outcome "ro: read EIO: $(first_error "$DAEMON_LOG")"
    else
        io_op read "$T/ro" "$off" "$len"
        alive "$T/ro"
        if ((IO_RC == 0)); then outcome "ro: read succeeds (as in QEMU)"
        else outcome "ro: read fails: $(head -n1 "$IO_ERR")"; fi
    fi
    unmount_image "$T/ro"
    [[ $(cksum <"$img") == "$sum" ]] || fail "a read-only mount modified the image"
}

# refused_both IMG REGEX: read-only and writable mounts are refused, the
# message names the field (REGEX), the file is untouched.
refused_both() {
    local img=$1 re=$2 sum
    sum=$(cksum <"$img")
    expect_refusal "$img" "$T/mnt" ro
    stderr_mentions "$re"
    expect_refusal "$img" "$T/mnt"
    stderr_mentions "$re"
    [[ $(cksum <"$img") == "$sum" ]] || fail "a refused mount modified the image"
    outcome "mount refused: $(first_error "$REFUSE_ERR")"
}

# ---------------------------------------------------------------------------
# 060: metadata pointing at metadata

# An L1 entry naming another structure as the L2 table (COPIED set, so a
# write would go in place).
case_l1_points_at() {
    local what=$1 img="$T/i.qcow2" target
    make_base "$img"
    load_geo "$img"
    case $what in
    header) target=0 ;;
    reftable) target=$RT ;;
    refblock) target=$RB0 ;;
    l1) target=$L1 ;;
    esac
    if ((target == 0)); then
        # Offset 0 in an L1 entry means "no L2 table": the header can only
        # be named with a nonzero offset inside it, which is unaligned.
        poke "$img" "$L1" $((COPIED | 0x200)) 8
    else
        poke "$img" "$L1" $((COPIED | target)) 8
    fi
    cp "$img" "$T/ro.qcow2"
    attempt_ro "$T/ro.qcow2" 0 512 any
    attempt_rw "$img" write 0 512 'L2 table|L1'
}

# An L2 entry naming another structure as guest data (COPIED set, as in
# 060, so that a write would go in place; with "nocopied" a write copies
# the cluster and would then free the structure).
case_l2_points_at() {
    local what=$1 flag=$COPIED img="$T/i.qcow2" target
    if [[ $what == *_nocopied ]]; then
        what=${what%_nocopied}
        flag=0
    fi
    make_base "$img"
    load_geo "$img"
    case $what in
    header) target=0 ;;
    reftable) target=$RT ;;
    refblock) target=$RB0 ;;
    l1) target=$L1 ;;
    l2) target=$L2 ;;
    esac
    if ((target == 0)); then
        # Offset 0 means unallocated; COPIED then is itself corrupt.
        poke "$img" "$L2" $((COPIED)) 8
    else
        poke "$img" "$L2" $((flag | target)) 8
    fi
    cp "$img" "$T/ro.qcow2"
    attempt_ro "$T/ro.qcow2" 0 512 any
    attempt_rw "$img" write 0 512 'header|refcount|L1|L2|COPIED'
}

# 060 "cluster data reference into inactive L2 table": after a snapshot
# and a copy-on-write, the active L2 entry names the snapshot's L2 table.
case_l2_points_at_snapshot_l2() {
    local img="$T/i.qcow2" snap_l2 entry
    qemu-img create -q -f qcow2 -o compat=1.1 "$img" $((64 * M))
    qio "$img" "write -P 1 0 512"
    qemu-img snapshot -c foo "$img" || fail "test setup: qemu-img snapshot failed"
    qio "$img" "write -P 2 0 512"
    load_geo "$img"
    snap_l2=$(geo "$img" snap.0.l1_offset)
    snap_l2=$(($(od -A n -t u8 --endian=big -j "$snap_l2" -N 8 "$img") & 0x00fffffffffffe00))
    entry=$(l2_entry_offset "$img" 0)
    ((snap_l2 != L2)) || fail "test setup: the snapshot shares the active L2 table"
    poke "$img" "$entry" $((COPIED | snap_l2)) 8
    attempt_rw "$img" write 0 512 'L2 table|snapshot'
    # The snapshot still reads as it was taken.
    qemu-img convert -U -l snapshot.name=foo -O raw "$img" "$T/snap.raw" \
        || fail "qemu-img convert of snapshot foo failed"
    cmp -s -n 512 "$T/snap.raw" <(head -c 512 /dev/zero | tr '\0' '\1') \
        || fail "the snapshot's guest cluster 0 no longer reads as pattern 1"
}

# 060 "overlap while COW is in flight", without the breakpoint: the
# refcount block says the L2 table is free, so the next allocation hands
# out the L2 table's cluster.
case_l2_table_refcount_zero() {
    local img="$T/i.qcow2"
    make_base "$img"
    load_geo "$img"
    "$MUTATE" --refcount "$img" $((L2 / CS)) 0 || fail "test setup: mutate --refcount failed"
    attempt_rw "$img" write $((M)) 4096 'L2 table'
}

# 060 "unallocated image header": the header's refcount is 0.
case_header_refcount_zero() {
    local img="$T/i.qcow2"
    make_base "$img"
    load_geo "$img"
    "$MUTATE" --refcount "$img" 0 0 || fail "test setup: mutate --refcount failed"
    attempt_rw "$img" write $((64 * K)) $((64 * K)) 'header'
}

# 060 "empty refcount table" (with and without the L2 table in place).
case_reftable_entry_zero() {
    local with_data=$1 img="$T/i.qcow2"
    if ((with_data)); then
        make_base "$img"
    else
        qemu-img create -q -f qcow2 -o compat=1.1 "$img" $((64 * M))
    fi
    load_geo_partial "$img"
    poke "$img" "$RT" 0 8
    # (060 writes 0-128k; the first half would be a valid in-place write.)
    attempt_rw "$img" write $((64 * K)) $((64 * K)) 'header|refcount|L1|L2'
}

# load_geo without the L2 table (a fresh image has none).
load_geo_partial() {
    RT=$(geo "$1" refcount_table_offset)
    CS=$(geo "$1" cluster_size)
}

# 060 "empty refcount block": every refcount in the first block is 0.
case_refblock_zeroed() {
    local img="$T/i.qcow2"
    make_base "$img"
    load_geo "$img"
    "$MUTATE" "$img" "$RB0" "$(printf '%0128d' 0)"
    attempt_rw "$img" write $((64 * K)) $((64 * K)) 'header|refcount|L1|L2'
}

# 060 "unaligned reftable entry" / "out-of-bounds refblock": refcounts are
# read only by a writable mount, which must refuse the image.
case_reftable_entry_bad() {
    local which=$1 img="$T/i.qcow2"
    make_base "$img"
    load_geo "$img"
    case $which in
    unaligned) poke "$img" "$RT" 0x22a00 8 ;;
    past_eof) poke "$img" $((RT + 8)) 0x00ffffff00000000 8 ;;
    esac
    attempt_ro "$img" 0 $((64 * K)) any
    attempt_rw "$img" write 0 512 'refcount table entry'
}

# 060 "unaligned L1 entry", also read-only: EIO, reported once, the image
# untouched ("read-only corruption report", "incoming inactive image").
case_l1_entry_unaligned() {
    local img="$T/i.qcow2"
    make_base "$img"
    load_geo "$img"
    poke "$img" "$L1" $((COPIED | L2 + 0x2a00)) 8
    cp "$img" "$T/ro.qcow2"
    attempt_ro "$T/ro.qcow2" 0 $((64 * K)) eio 'L1 entry 0.*not cluster aligned'
    attempt_rw "$img" read 0 $((64 * K)) 'L1 entry 0.*not cluster aligned'
}

# 060 "unaligned L2 entry" and "unaligned pre-allocated zero cluster"
# (read), and "writing to an unaligned preallocated zero cluster" whose
# offset lies inside the header (write).
case_l2_entry_unaligned() {
    local kind=$1 img="$T/i.qcow2"
    make_base "$img"
    load_geo "$img"
    case $kind in
    data) poke "$img" "$L2" $((COPIED | DATA + 0x2a00)) 8 ;;
    zero) poke "$img" "$L2" $((COPIED | DATA + 0x2a00 | 1)) 8 ;;
    zero_in_header) poke "$img" "$L2" $((COPIED | 0x2a00 | 1)) 8 ;;
    esac
    cp "$img" "$T/ro.qcow2"
    attempt_ro "$T/ro.qcow2" 0 512 eio 'L2 table.*not aligned'
    if [[ $kind == zero_in_header ]]; then
        attempt_rw "$img" write 0 $((64 * K)) 'L2 (table|entry).*not aligned'
    else
        attempt_rw "$img" read 0 512 'L2 (table|entry).*not aligned'
    fi
}

# 060 "dirty corrupt image": a wild refcount table entry on an image with
# the dirty bit (lazy refcounts) set: the writable open repairs (rebuilds
# the refcounts) or refuses; either way no crash and a consistent image.
case_dirty_wild_reftable() {
    local img="$T/i.qcow2" before="$T/before.qcow2" out rc=0
    make_base "$img" lazy_refcounts=on
    load_geo "$img"
    poke "$img" "$RT" 0xffff2a00 8
    poke "$img" 72 $((16#$(incompat_of "$img") | 1)) 8
    cp "$img" "$before"
    if try_mount "$img" "$T/rw"; then
        io_op write "$T/rw" $((M)) 4096
        ((IO_RC == 0)) || fail "after the repair a write failed: $(head -n1 "$IO_ERR")"
        unmount_image "$T/rw"
        out=$(qemu-img check "$img" 2>&1) || rc=$?
        ((rc == 0 || rc == 3)) || { echo "$out" >&2; fail "after the repair qemu-img check exits $rc"; }
        outcome "rw: repaired on mount (qemu-img check exit $rc): $(first_error "$DAEMON_LOG")"
    else
        ((TRY_RC < 126)) || fail "the daemon died with status $TRY_RC"
        log_mentions "$DAEMON_LOG" 'refcount'
        only_corrupt_bit_changed "$before" "$img"
        outcome "rw: mount refused: $(first_error "$DAEMON_LOG")"
    fi
}

# The corrupt bit, end to end (060 "cluster data reference into refcount
# block"): the write that would land in the refcount block fails and marks
# the image; then a writable mount is refused, a read-only one serves what
# qemu reads, and after qcow2check -r all the image is writable and clean.
case_corrupt_bit_lifecycle() {
    local img="$T/i.qcow2" rc=0
    make_base "$img"
    load_geo "$img"
    poke "$img" "$L2" $((COPIED | RB0)) 8
    attempt_rw "$img" write 0 512 'refcount block'

    expect_refusal "$img" "$T/mnt"
    stderr_mentions 'corrupt'
    outcome "corrupt bit: rw refused: $(first_error "$REFUSE_ERR")"

    mount_image "$img" "$T/ro" ro
    compare_raw "$img" "$T/ro"
    unmount_image "$T/ro"
    outcome "corrupt bit: ro serves what qemu-img convert reads"

    "$QCOW2CHECK" -r all "$img" >"$T/repair.out" 2>&1 || rc=$?
    ((rc == 0)) || { sed 's/^/    | /' "$T/repair.out" >&2; fail "qcow2check -r all exited $rc"; }
    (((16#$(incompat_of "$img")) & 2)) && fail "qcow2check -r all left the corrupt bit set"
    mount_image "$img" "$T/rw2"
    dd if="$PAT" of="$T/rw2/disk" bs=4096 count=1 conv=notrunc,fsync status=none \
        || fail "after qcow2check -r all a write failed"
    dd if="$PAT" of="$T/rw2/disk" bs=4096 count=1 skip=1 seek=$((2 * M / 4096)) conv=notrunc,fsync \
        status=none || fail "after qcow2check -r all a write failed"
    unmount_image "$T/rw2"
    check_clean "$img" "after qcow2check -r all and two writes"
    qemu-img convert -O raw "$img" "$T/after.raw"
    cmp -s -n 4096 "$T/after.raw" "$PAT" || fail "the write after the repair does not read back"
    cmp -s -n 4096 -i $((2 * M)):4096 "$T/after.raw" "$PAT" || fail "the write after the repair does not read back"
    outcome "corrupt bit: writable and clean after qcow2check -r all"
}

# ---------------------------------------------------------------------------
# 080: header fields out of range

# case_header FIELDS REGEX: poke OFFSET:VALUE:WIDTH triples into a base
# image; both mounts must be refused naming the field.
case_header() {
    local re=$1 img="$T/i.qcow2" f off val width
    shift
    make_base "$img"
    CS=65536
    for f in "$@"; do
        IFS=: read -r off val width <<<"$f"
        poke "$img" "$off" "$val" "$width"
    done
    refused_both "$img" "$re"
}

# A header extension whose length runs far past the cluster.
case_ext_huge() {
    local backing=$1 img="$T/i.qcow2" hl
    make_base "$img"
    hl=$((16#$(peek "$img" 100 4)))
    poke "$img" "$hl" 0x12345678 4
    poke "$img" $((hl + 4)) 0x7fffffff 4
    [[ $backing == none ]] || poke "$img" 8 "$backing" 8
    refused_both "$img" 'backing_file|extension'
}

# snapshots: l1_size 0 in an image with a snapshot; a snapshot's L1 table
# unaligned or too large: the active view still mounts read-only, the
# snapshot view and writable mounts are refused naming the table.
case_l1_size_zero_with_snapshot() {
    local img="$T/i.qcow2"
    make_base "$img"
    qemu-img snapshot -c foo "$img" || fail "test setup: qemu-img snapshot failed"
    poke "$img" 36 0 4
    refused_both "$img" 'l1_size'
}

case_snapshot_l1_bad() {
    local what=$1 img="$T/i.qcow2" entry sum
    make_base "$img"
    qemu-img snapshot -c test "$img" || fail "test setup: qemu-img snapshot failed"
    entry=$(geo "$img" snap.0.entry)
    case $what in
    offset) poke "$img" "$entry" 0x400200 8 ;;
    size) poke "$img" $((entry + 8)) 0x10000000 4 ;;
    esac
    sum=$(cksum <"$img")
    mount_image "$img" "$T/ro" ro
    compare_raw "$img" "$T/ro"
    unmount_image "$T/ro"
    expect_refusal "$img" "$T/mnt" ro,snapshot=test
    stderr_mentions 'l1'
    outcome "snapshot view refused: $(first_error "$REFUSE_ERR")"
    expect_refusal "$img" "$T/mnt"
    stderr_mentions 'snapshot'
    outcome "rw refused: $(first_error "$REFUSE_ERR")"
    [[ $(cksum <"$img") == "$sum" ]] || fail "a refused mount modified the image"
}

# 080 "invalid L2 entry (huge physical offset)": the offset past the end
# of the file, or reserved bits set.
case_l2_entry_wild() {
    local value=$1 img="$T/i.qcow2"
    make_base "$img"
    load_geo "$img"
    poke "$img" "$L2" "$value" 8
    cp "$img" "$T/ro.qcow2"
    attempt_ro "$T/ro.qcow2" 0 512 eio 'L2 table'
    attempt_rw "$img" write 0 512 'L2 (table|entry)'
}

# ---------------------------------------------------------------------------
# 036: feature bits

# feature_entry TYPE BIT NAME: one 48-byte feature-name table entry (hex).
feature_entry() {
    local name_hex
    name_hex=$(printf '%s' "$3" | od -A n -t x1 | tr -d ' \n')
    printf '%02x%02x%s' "$1" "$2" "$name_hex"
    printf '%0*d' $((92 - ${#name_hex})) 0
}

case_unknown_incompat() {
    local variant=$1 img="$T/i.qcow2" v
    make_base "$img"
    v=$((16#$(incompat_of "$img")))
    case $variant in
    bit63_no_table)
        "$MUTATE" --ext "$img" 0x6803f857
        poke "$img" 72 $((v | 1 << 63)) 8
        refused_both "$img" 'incompatible.*\b63\b'
        ;;
    bit63_named)
        "$MUTATE" --ext "$img" 0x6803f857 "$(feature_entry 0 63 'Test feature')"
        poke "$img" 72 $((v | 1 << 63)) 8
        refused_both "$img" 'Test feature'
        stderr_mentions '\b63\b'
        ;;
    bits61to63)
        # Named 61 and 62, unnamed 63; the names of other types do not count.
        "$MUTATE" --ext "$img" 0x6803f857 "$(feature_entry 0 61 test1)$(feature_entry 0 62 test2)$(feature_entry 2 63 test3)"
        poke "$img" 72 $((v | 7 << 61)) 8
        refused_both "$img" 'test1'
        stderr_mentions 'test2' '\b61\b' '\b62\b' '\b63\b'
        if grep -q test3 "$REFUSE_ERR"; then fail "autoclear bit 63's name was given for incompatible bit 63"; fi
        ;;
    esac
}

# An unknown autoclear bit: kept by a read-only mount, cleared by a
# writable one before its first write; nothing else in the header changes.
case_unknown_autoclear() {
    local img="$T/i.qcow2" v before="$T/before.qcow2" n
    make_base "$img"
    CS=65536
    v=$((16#$(peek "$img" 88 8)))
    poke "$img" 88 $((v | 1 << 63)) 8
    attempt_ro "$img" 0 512 any
    [[ $(peek "$img" 88 8) == 8000000000000000 ]] || fail "read-only: the autoclear bit is gone"
    cp "$img" "$before"
    mount_image "$img" "$T/rw"
    dd if="$PAT" of="$T/rw/disk" bs=4096 count=1 conv=notrunc,fsync status=none \
        || fail "writing to the image failed"
    unmount_image "$T/rw"
    [[ $(peek "$img" 88 8) == 0000000000000000 ]] \
        || fail "after a writable mount and a write, autoclear_features is 0x$(peek "$img" 88 8)"
    # The rest of the header cluster (bytes 0-87, 96-end) is unchanged.
    n=$(cmp -l -n "$CS" "$before" "$img" | awk '$1 < 89 || $1 > 96' | wc -l) || true
    ((n == 0)) || fail "the writable mount changed $n header byte(s) besides autoclear_features"
    check_clean "$img" "after the write"
    outcome "ro: bit 63 kept; rw: cleared before the first write, header otherwise unchanged"
}

# ---------------------------------------------------------------------------
# 138: a data cluster at 32 PB, 512-byte clusters

case_data_at_32pb() {
    local img="$T/i.qcow2" entry rc=0
    qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=512 "$img" 512 \
        || fail "test setup: qemu-img create failed"
    qio "$img" "write 0 512"
    CS=512
    entry=$(l2_entry_offset "$img" 0)
    poke "$img" "$entry" 0x8080000000000000 8
    cp "$img" "$T/ro.qcow2"
    attempt_ro "$T/ro.qcow2" 0 512 eio 'L2 table'
    cp "$img" "$T/chk.qcow2"
    attempt_rw "$img" write 0 512 'L2 (table|entry)'
    # The checker must neither size its tables by the wild offset (128 TB)
    # nor crash: under a 1 GiB address-space limit it reports the damage.
    # (A sanitizer build reserves terabytes of shadow memory: no limit.)
    local limit=(prlimit --as=$((1024 * M)))
    if sanitized_build "$QCOW2CHECK"; then limit=(); fi
    timeout -k 5 60 "${limit[@]}" "$QCOW2CHECK" "$T/chk.qcow2" >"$T/chk.out" 2>&1 || rc=$?
    ((rc == 2)) || { sed 's/^/    | /' "$T/chk.out" >&2; fail "qcow2check exited $rc, expected 2 (corruptions found)"; }
    outcome "qcow2check${limit[*]:+ under a 1 GiB limit}: exit 2: $(grep -m1 -i 'error\|corrupt' "$T/chk.out" | cut -c1-100)"
}

# ---------------------------------------------------------------------------

# 060
for w in header reftable refblock l1; do run_case "l1_entry_at_$w" case_l1_points_at "$w"; done
for w in header reftable refblock l1 l2 refblock_nocopied l1_nocopied; do
    run_case "l2_entry_at_$w" case_l2_points_at "$w"
done
run_case l2_entry_at_snapshot_l2 case_l2_points_at_snapshot_l2
run_case l2_table_refcount_zero case_l2_table_refcount_zero
run_case header_refcount_zero case_header_refcount_zero
run_case reftable_entry_zero case_reftable_entry_zero 0
run_case reftable_entry_zero_with_l2 case_reftable_entry_zero 1
run_case refblock_zeroed case_refblock_zeroed
run_case reftable_entry_unaligned case_reftable_entry_bad unaligned
run_case reftable_entry_past_eof case_reftable_entry_bad past_eof
run_case l1_entry_unaligned case_l1_entry_unaligned
run_case l2_entry_unaligned_data case_l2_entry_unaligned data
run_case l2_entry_unaligned_zero case_l2_entry_unaligned zero
run_case l2_entry_unaligned_zero_in_header case_l2_entry_unaligned zero_in_header
run_case dirty_wild_reftable_entry case_dirty_wild_reftable
run_case corrupt_bit_lifecycle case_corrupt_bit_lifecycle
run_case refcount_table_size_zero case_header 'refcount_table_clusters' 56:0:4
run_case refcount_table_offset_zero case_header 'refcount_table_offset' 48:0:8
# 080
run_case header_length_ffffffff case_header 'header_length' 100:0xffffffff:4
run_case header_length_7fffffff case_header 'header_length' 100:0x7fffffff:4
run_case ext_huge_bad_backing_offset case_ext_huge 0xffffffffffffffff
run_case ext_huge_backing_offset_inside case_ext_huge 108
run_case ext_huge case_ext_huge none
run_case refcount_table_clusters_ffffffff case_header 'refcount_table_clusters' 56:0xffffffff:4
run_case refcount_table_clusters_20001 case_header 'refcount_table_clusters' 56:0x20001:4
run_case refcount_table_offset_wild case_header 'refcount_table_offset' 48:0x1234567890abcdef:8
run_case refcount_table_offset_huge case_header 'refcount_table_offset' 48:0xffffffffffff0000:8 56:0x7f:4
run_case nb_snapshots_ffffffff case_header 'nb_snapshots' 60:0xffffffff:4
run_case nb_snapshots_7fffffff case_header 'nb_snapshots' 60:0x7fffffff:4
run_case snapshots_offset_huge case_header 'snapshots_offset' 64:0xffffffffffff0000:8 60:0xffff:4
run_case snapshots_offset_wild_no_snapshots case_header 'snapshots_offset' 64:0x1234567890abcdef:8
run_case snapshot_table_past_eof case_header 'snapshots_offset' 64:0x1000000:8 60:0x10000:4
run_case l1_size_ffffffff case_header 'l1_size' 36:0xffffffff:4
run_case l1_table_offset_huge case_header 'l1_table_offset' 40:0x7fffffffffff0000:8 36:0xffff:4
run_case l1_size_zero_with_snapshot case_l1_size_zero_with_snapshot
run_case backing_file_size_ffffffff case_header 'backing_file_size' 8:0x1000:8 16:0xffffffff:4
run_case l2_entry_past_eof case_l2_entry_wild 0x800000ffffff0000
run_case l2_entry_reserved_bits case_l2_entry_wild 0xbfffffffffff0000
run_case snapshot_l1_offset_unaligned case_snapshot_l1_bad offset
run_case snapshot_l1_size_huge case_snapshot_l1_bad size
# 036
run_case incompat_bit63_no_table case_unknown_incompat bit63_no_table
run_case incompat_bit63_named case_unknown_incompat bit63_named
run_case incompat_bits61_63 case_unknown_incompat bits61to63
run_case autoclear_bit63 case_unknown_autoclear
# 138
run_case data_cluster_at_32pb case_data_at_32pb

echo "=== outcomes"
for f in "$OUTCOMES"/*; do
    [[ -e $f ]] || continue
    name=${f##*/}
    while read -r line; do printf '  %-36s %s\n' "$name" "$line"; done <"$f"
done
finish_cases
