#!/usr/bin/env bash
# Images that QEMU itself left behind when it died mid-write: qemu-io
# killed by "abort" after a run of writes, discards, zero writes and
# compressed writes, and qemu-storage-daemon killed with SIGKILL while dd,
# fio and fallocate wrote through its FUSE export.  The matrix crosses the
# crash kind with lazy refcounts on/off and cluster sizes 512 B .. 2 MiB;
# refcount widths 1, 16 and 64 rotate over it.
#
# For each leftover: "qemu-img check -r all" + "qemu-img convert -O raw" on
# a copy is the reference.  A writable mount of the leftover itself must
# repair it (a lazy image is dirty: refcounts rebuilt, never marked
# corrupt), read byte for byte like the reference, take more writes (into
# clusters QEMU allocated, so the repaired COPIED flags and refcounts
# matter) and end, after unmount, clean by "qemu-img check" and equal to
# the reference with the same writes applied.
#
# Two more cases make the repair change an OFLAG_COPIED flag in the active
# L1 table (cleared where the L2 table has one reference, set where it is
# shared with a snapshot): the mount must not keep the L1 it had before the
# repair, or a later write of that L1 chunk restores the wrong flag (or
# writes into a table the snapshot shares).
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io qemu-storage-daemon fio fallocate
requires_fuse
make_sources

M=$((1 << 20))
SIZE=$((64 * M))

# incompat_bit IMG N: prints bit N of the incompatible features (N < 8).
incompat_bit() {
    local b
    b=$(od -An -t u1 -j79 -N1 "$1" | tr -d ' ')
    echo $(((b >> $2) & 1))
}

# be64_at FILE OFFSET: the big-endian 64-bit number at OFFSET, in decimal.
be64_at() {
    od -An -t u8 --endian=big -j "$2" -N8 "$1" | tr -d ' '
}

# set_l1_copied IMG INDEX 0|1: clear or set OFLAG_COPIED (bit 63) of the
# active L1 table's entry INDEX, as a wrong flag that a repair must fix.
set_l1_copied() {
    local img=$1 index=$2 on=$3 l1 pos b
    l1=$(be64_at "$img" 40)
    pos=$((l1 + 8 * index))
    b=$(od -An -t u1 -j "$pos" -N1 "$img" | tr -d ' ')
    ((b & 0x7f)) && fail "test setup: L1 entry $index has bits 56-62 set"
    if ((on)); then b=$((b | 0x80)); else b=$((b & 0x7f)); fi
    printf '%b' "\\x$(printf %02x "$b")" | dd of="$img" bs=1 seek="$pos" conv=notrunc status=none
}

# qemu_check_counts IMG: prints "ERRORS LEAKS" of "qemu-img check IMG"
# (errors = corruptions + check errors); fails if qemu-img check itself
# could not run.
qemu_check_counts() {
    local out rc=0 c e l
    out=$(qemu-img check --output=json "$1" 2>/dev/null) || rc=$?
    ((rc == 0 || rc == 2 || rc == 3)) || fail "qemu-img check $(basename "$1") failed with status $rc"
    c=$(sed -n 's/^ *"corruptions": *\([0-9]*\).*/\1/p' <<<"$out")
    e=$(sed -n 's/^ *"check-errors": *\([0-9]*\).*/\1/p' <<<"$out")
    l=$(sed -n 's/^ *"leaks": *\([0-9]*\).*/\1/p' <<<"$out")
    echo "$((${c:-0} + ${e:-0})) ${l:-0}"
}

# crash_abort IMG CS: qemu-io writes, discards, zero writes and compressed
# writes, then "abort" (SIGABRT: no metadata written back, no flush).
# With clusters of 64 KiB and more the compressed write comes last, so the
# file ends inside a cluster; with smaller ones it comes early (QEMU writes
# its refcounts back around a compressed write to small clusters, which
# would leave little of the crash state).
crash_abort() {
    local img=$1 cs=$2 clen rc=0 early=() late=()
    clen=$((cs <= 65536 ? 4 * cs : cs))
    if ((cs < 65536)); then
        early=(-c "write -c -s $X1 $((32 * M)) $clen")
    else
        late=(-c "write -c -s $X1 $((32 * M)) $clen")
    fi
    # In a subshell of its own, which reports the SIGABRT in the log.
    (timeout -k 5 60 qemu-io -d unmap -f qcow2 \
        -c "write -s $R1 0 3M" \
        -c "write -s $R2 $((5 * M + 1536)) 70000" \
        -c "write -z $M 512k" \
        -c "discard $((2 * M)) 256k" \
        -c "write -s $R3 $((10 * M)) 3M" \
        "${early[@]}" \
        -c "discard $((11 * M)) 64k" \
        -c "write -s $X2 $((20 * M)) 1M" \
        -c "write -z $((30 * M)) 1M" \
        -c "write -s $R1 $((63 * M)) 1M" \
        -c "write -P 0x5c $((12 * M + 512)) 4k" \
        "${late[@]}" \
        -c abort "$img"; exit $?) >"$T/qemu-io.log" 2>&1 || rc=$?
    # timeout passes on the status of the aborted qemu-io: 128 + SIGABRT.
    ((rc == 134)) || { cat "$T/qemu-io.log" >&2; fail "test setup: qemu-io did not abort (status $rc)"; }
}

# crash_kill IMG: qemu-storage-daemon exports IMG through FUSE; dd, fio and
# fallocate write into it (the first write is fsynced), then SIGKILL.
crash_kill() {
    local img=$1 exp=$T/export qpid i
    : >"$exp"
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$img" \
        --blockdev driver=qcow2,node-name=fmt0,file=file0,discard=unmap \
        --export "type=fuse,id=exp0,node-name=fmt0,mountpoint=$exp,writable=on" \
        </dev/null >"$T/qsd.log" 2>&1 &
    qpid=$!
    track_pid "$qpid"
    track_mount "$exp"
    for ((i = 0; i < MOUNT_TIMEOUT * 100; i++)); do
        [[ $(stat -c %s "$exp") == "$SIZE" ]] && break
        pid_alive "$qpid" || { cat "$T/qsd.log" >&2; fail "test setup: qemu-storage-daemon exited"; }
        sleep 0.01
    done
    [[ $(stat -c %s "$exp") == "$SIZE" ]] || fail "test setup: the FUSE export did not come up"
    dd if="$R1" of="$exp" bs=1M count=3 conv=notrunc,fsync status=none
    io_timeout fio --name=crash --filename="$exp" --rw=randwrite --bs=4k \
        --offset=4M --size=32M --io_size=2M --ioengine=psync --direct=1 \
        --randrepeat=0 --randseed=12 --output="$T/fio.log" \
        || { cat "$T/fio.log" >&2; fail "test setup: fio on the export failed"; }
    fallocate -p -o $((1 * M)) -l $((512 << 10)) "$exp"
    fallocate -z -o $((40 * M)) -l $M "$exp"
    dd if="$R2" of="$exp" bs=64k count=32 seek=$((20 * 16)) conv=notrunc status=none
    dd if="$R3" of="$exp" bs=4k count=3 seek=$((63 * 256 + 7)) conv=notrunc status=none
    kill -KILL "$qpid"
    wait "$qpid" 2>/dev/null || true
    fusermount3 -u "$exp" 2>/dev/null || umount -l "$exp"
    ! is_mounted "$exp" || fail "test setup: the dead export is still mounted"
}

# apply_writes FILE CS: the writes after the repair, to the mounted disk and
# to the reference alike: into QEMU's clusters (whole and partial), across
# a cluster boundary, into zeroed, discarded and compressed ranges, a punch
# of whole clusters, a fresh range, and at 16 MiB a new L2 table (with 4 KiB
# clusters: L1 entry 8, in the first L1 chunk).
apply_writes() {
    local f=$1 cs=$2 pc
    pc=$((cs > 4096 ? cs : 4096))
    wr() { # wr SRC SKIP OFFSET LEN
        dd if="$1" of="$f" bs=64k iflag=skip_bytes,count_bytes oflag=seek_bytes \
            skip="$2" seek="$3" count="$4" conv=notrunc status=none
    }
    wr "$R3" 4096 $((512 << 10)) 4096
    wr "$R2" 77777 $((5 * M + 1000)) 1400
    wr "$R1" 12345 $((10 * M + 65536 - 700)) 1400
    wr "$X2" 0 $((M + 4096)) 8192
    wr "$R3" 99 $((2 * M)) 100000
    wr "$X1" 4321 $((32 * M + 512)) 3000
    wr "$R2" 0 $((16 * M)) 65536
    wr "$R1" 0 $((48 * M)) $M
    fallocate -p -o $((62 * M)) -l "$pc" "$f"
    wr "$R3" 5 $((63 * M + 12345)) 20000
}

# settle_case IMG LAZY [SNAPSHOT]: the checks after the crash (see the top).
settle_case() {
    local img=$1 lazy=$2 snap=${3:-} copy=$T/repaired.qcow2 mnt=$T/mnt
    local ref before after rc out cs snapref
    cs=$((1 << $(od -An -t u1 -j23 -N1 "$img" | tr -d ' ')))
    [[ $(incompat_bit "$img" 0) == "$lazy" ]] \
        || fail "test setup: leftover dirty bit is $(incompat_bit "$img" 0), expected $lazy"
    before=$(qemu_check_counts "$img")
    info "leftover: $(stat -c %s "$img") bytes, qemu-img check: errors/leaks $before"

    cp "$img" "$copy"
    rc=0
    out=$(qemu-img check -r all "$copy" 2>&1) || rc=$?
    [[ $(qemu_check_counts "$copy") == "0 0" ]] \
        || { echo "$out" >&2; fail "test setup: qemu-img check -r all could not repair the leftover"; }
    ref=$(ref_raw "$copy" "$T/ref.raw")
    if [[ -n $snap ]]; then
        snapref=$T/snap.raw
        qemu-img convert -O raw -l "snapshot.name=$snap" "$copy" "$snapref"
    fi

    mount_image "$img" "$mnt"
    if ((lazy)); then
        grep -q 'not closed cleanly.*rebuilding refcounts' "$DAEMON_LOG" \
            || { sed 's/^/    | /' "$DAEMON_LOG" >&2; fail "no refcount rebuild reported for a dirty image"; }
        [[ $(incompat_bit "$img" 0) == 0 ]] || fail "dirty bit still set after the repair"
    else
        ! grep -q 'rebuilding refcounts' "$DAEMON_LOG" || fail "a clean image had its refcounts rebuilt"
    fi
    [[ $(incompat_bit "$img" 1) == 0 ]] \
        || { sed 's/^/    | /' "$DAEMON_LOG" >&2; fail "the mount marked the leftover corrupt"; }
    [[ $(stat -c %s "$mnt/disk") == "$SIZE" ]] || fail "disk has size $(stat -c %s "$mnt/disk")"
    same_bytes "$mnt/disk" "$ref" "disk after the repair vs qemu-img check -r all + convert"

    apply_writes "$mnt/disk" "$cs"
    apply_writes "$ref" "$cs"
    io_timeout sync "$mnt/disk"
    same_bytes "$mnt/disk" "$ref" "disk after the writes vs the reference with the same writes"
    unmount_image "$mnt"
    ! grep -q 'corrupt image metadata' "$DAEMON_LOG" \
        || { sed 's/^/    | /' "$DAEMON_LOG" >&2; fail "the daemon reported corrupt metadata"; }

    [[ $(incompat_bit "$img" 1) == 0 ]] || fail "image marked corrupt after the writes"
    [[ $(incompat_bit "$img" 0) == 0 ]] || fail "dirty bit set after a clean unmount"
    after=$(qemu_check_counts "$img")
    # A lazy leftover is rebuilt: nothing may leak.  A clean leftover keeps
    # the leaks QEMU left (repairing them is qemu-img check's job), and
    # gets no new ones.
    local want_leaks=0
    ((lazy)) || want_leaks=${before#* }
    if [[ $after != "0 $want_leaks" ]]; then
        { qemu-img check "$img" 2>&1 || true; } | head -n 20 | sed 's/^/    | /' >&2
        fail "qemu-img check after the writes: errors/leaks $after, expected 0 $want_leaks"
    fi
    check_identical "$img" "$ref" "image after unmount vs the reference with the writes"
    if [[ -n $snap ]]; then
        qemu-img convert -O raw -l "snapshot.name=$snap" "$img" "$T/snap.after.raw"
        same_bytes "$T/snap.after.raw" "$snapref" "snapshot $snap after the writes"
    fi
    info "repaired, $(basename "$ref") matches before and after the writes; qemu-img check: errors/leaks $after"
}

# case_matrix CRASH LAZY CS RB
case_matrix() {
    local crash=$1 lazy=$2 cs=$3 rb=$4 img=$T/crash.qcow2
    qemu-img create -q -f qcow2 \
        -o "cluster_size=$cs,refcount_bits=$rb,lazy_refcounts=$([[ $lazy == 1 ]] && echo on || echo off)" \
        "$img" "$SIZE"
    "crash_$crash" "$img" "$cs"
    settle_case "$img" "$lazy"
}

# case_copied_cleared: a dirty leftover whose L1 entry 10 (guest 20 MiB)
# lacks OFLAG_COPIED although its L2 table has one reference.  No write goes
# under entry 10; the one at 16 MiB (entry 8, same L1 chunk) allocates an L2
# table, so the daemon writes that chunk of its L1 back.
case_copied_cleared() {
    local img=$T/crash.qcow2
    qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=16,lazy_refcounts=on "$img" "$SIZE"
    crash_abort "$img" 4096
    set_l1_copied "$img" 10 0
    settle_case "$img" 1
}

# case_copied_on_shared: a dirty leftover with an internal snapshot; L1
# entry 0 points at an L2 table shared with the snapshot but claims
# OFLAG_COPIED.  Trusting the stale flag, a write under it would change the
# snapshot's table in place.
case_copied_on_shared() {
    local img=$T/crash.qcow2 rc=0
    qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=16,lazy_refcounts=on "$img" "$SIZE"
    qio "$img" "write -s $R2 0 3M" "write -s $R1 $((10 * M)) 2M"
    qemu-img snapshot -c snap1 "$img"
    (timeout -k 5 60 qemu-io -f qcow2 \
        -c "write -s $R3 $((10 * M + 4096)) 512k" \
        -c "write -s $X1 $((30 * M)) 1M" \
        -c abort "$img"; exit $?) >"$T/qemu-io.log" 2>&1 || rc=$?
    ((rc == 134)) || { cat "$T/qemu-io.log" >&2; fail "test setup: qemu-io did not abort (status $rc)"; }
    set_l1_copied "$img" 0 1
    settle_case "$img" 1 snap1
}

# The matrix: every (crash kind, lazy) pair with every cluster size, the
# refcount width rotating so that each kind meets 1, 16 and 64 bits.
widths=(16 1 64)
n=0
for cs in 512 4096 65536 2097152; do
    for crash in abort kill; do
        for lazy in 1 0; do
            rb=${widths[n % 3]}
            n=$((n + 1))
            run_case "${crash}_lazy${lazy}_c${cs}_r${rb}" case_matrix "$crash" "$lazy" "$cs" "$rb"
        done
    done
done
run_case copied_cleared case_copied_cleared
run_case copied_on_shared case_copied_on_shared
finish_cases
