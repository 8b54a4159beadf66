#!/usr/bin/env bash
#
# The FUSE surface: directory listing, stat, read-only enforcement, reads
# of every shape (large, odd offsets and sizes, O_DIRECT, at and past EOF,
# concurrent), a small L2 cache, daemon mode, --help / --version, usage
# errors, a clean daemon exit on unmount, and mmap of the disk.
# shellcheck disable=SC2317  # case functions are called indirectly (run_case)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io cmp dd stat ls
requires_fuse
MMAPCHECK=$(require_tool mmapcheck)
READSIZES=$(require_tool readsizes)

K=1024
M=$((1024 * 1024))

# make_image IMG: 8 MiB + 3 KiB v3 image (size not a multiple of the page
# or cluster size), 64K clusters, data and holes.
make_image() {
    local img=$1 vsize=$((8 * M + 3 * K))
    qemu-img create -q -f qcow2 "$img" "$vsize" || fail "test setup: qemu-img create failed"
    qio "$img" \
        "write -s $R1 0 $((300 * K + 17))" \
        "write -s $X1 $((1 * M - 5000)) 10000" \
        "write -z $((128 * K)) $((64 * K))" \
        "write -s $R2 $((4 * M + 12345)) $((200 * K))" \
        "write -s $R3 $((vsize - 7000)) 7000"
}

IMG="$TEST_TMP/img.qcow2"

# dd_range FILE OFF LEN OUT [DD_FLAGS]: copy bytes [OFF, OFF+LEN) of FILE.
dd_range() {
    local f=$1 off=$2 len=$3 out=$4 flags=${5:-}
    io_timeout dd if="$f" of="$out" bs=1M iflag=skip_bytes,count_bytes${flags:+,$flags} \
        skip="$off" count="$len" status=none
}

case_listing() {
    local mnt="$T/mnt" entries vs
    mount_image "$IMG" "$mnt" ro
    entries=$(ls -A "$mnt")
    [[ $entries == disk ]] || fail "ls -A of the mount shows '$(tr '\n' ' ' <<<"$entries")', expected exactly 'disk'"
    entries=$(find "$mnt" -mindepth 1 | wc -l)
    [[ $entries == 1 ]] || fail "find shows $entries entries below the mount, expected 1"
    [[ $(stat -c %F "$mnt") == directory ]] || fail "the mount point is not a directory"
    [[ $(stat -c %F "$mnt/disk") == "regular file" ]] || fail "disk is a $(stat -c %F "$mnt/disk"), not a regular file"
    vs=$(virtual_size "$IMG")
    [[ $(stat -c %s "$mnt/disk") == "$vs" ]] || fail "stat size $(stat -c %s "$mnt/disk") != virtual size $vs"
    [[ $(stat -L -c %s "$mnt/disk") == "$vs" ]] || fail "stat -L size differs"
    if stat "$mnt/nope" >/dev/null 2>&1; then fail "stat of a non-existent name succeeded"; fi
    ls -la "$mnt" >/dev/null || fail "ls -la of the mount failed"
    unmount_image "$mnt"
}

case_readonly() {
    local mnt="$T/mnt" sum1 sum2 out
    sum1=$(cksum <"$IMG")
    mount_image "$IMG" "$mnt" ro
    write_fails_erofs "$mnt/disk"
    if out=$(exec 2>&1 3<>"$mnt/disk"); then fail "opening disk O_RDWR succeeded on a read-only mount"; fi
    grep -q "Read-only file system" <<<"$out" || fail "O_RDWR open failed, but not with EROFS: $out"
    if truncate -s 0 "$mnt/disk" 2>/dev/null; then fail "truncate of disk succeeded on a read-only mount"; fi
    [[ $(stat -c %s "$mnt/disk") == "$(virtual_size "$IMG")" ]] || fail "disk size changed"
    compare_raw "$IMG" "$mnt"
    unmount_image "$mnt"
    sum2=$(cksum <"$IMG")
    [[ $sum1 == "$sum2" ]] || fail "the image file was modified by a read-only mount"
}

case_dd_1m() {
    local mnt="$T/mnt" ref
    ref=$(ref_raw "$IMG")
    mount_image "$IMG" "$mnt" ro
    io_timeout dd if="$mnt/disk" of="$T/dd.out" bs=1M status=none || fail "dd bs=1M failed"
    same_bytes "$T/dd.out" "$ref" "dd bs=1M of disk"
    unmount_image "$mnt"
}

# Reads with odd offsets and sizes, through the page cache and with O_DIRECT
# (which passes the exact offsets and sizes to the daemon).
case_odd_reads() {
    local mnt="$T/mnt" ref size flags off len i
    ref=$(ref_raw "$IMG")
    size=$(stat -c %s "$ref")
    mount_image "$IMG" "$mnt" ro
    # dd bs=4097 with block skips
    for i in 0 1 15 16 255 256 1000 2047; do
        io_timeout dd if="$mnt/disk" of="$T/a" bs=4097 skip="$i" count=3 status=none \
            || fail "dd bs=4097 skip=$i failed"
        dd if="$ref" of="$T/b" bs=4097 skip="$i" count=3 status=none
        same_bytes "$T/a" "$T/b" "dd bs=4097 skip=$i count=3"
    done
    # byte-granular ranges: inside a cluster, across cluster boundaries,
    # across data/hole boundaries, the last bytes of the disk
    local ranges=(
        1 1
        4095 2
        65535 2
        $((64 * K - 100)) $((64 * K + 200))
        $((128 * K - 3)) $((64 * K + 6))
        $((300 * K + 10)) 20
        $((1 * M - 5001)) 10002
        $((4 * M + 12345 - 1)) $((200 * K + 2))
        $((size - 7001)) 7001
        $((size - 1)) 1
        12345 $((3 * M + 777))
    )
    for flags in "" direct; do
        for ((i = 0; i < ${#ranges[@]}; i += 2)); do
            off=${ranges[i]} len=${ranges[i + 1]}
            dd_range "$mnt/disk" "$off" "$len" "$T/a" "$flags" \
                || fail "read of $len bytes at $off${flags:+ (O_DIRECT)} failed"
            dd_range "$ref" "$off" "$len" "$T/b"
            [[ $(stat -c %s "$T/a") == "$len" ]] \
                || fail "short read of $len bytes at $off${flags:+ (O_DIRECT)}: got $(stat -c %s "$T/a")"
            same_bytes "$T/a" "$T/b" "read of $len bytes at $off${flags:+ (O_DIRECT)}"
        done
    done
    unmount_image "$mnt"
}

case_eof() {
    local mnt="$T/mnt" ref size flags n
    ref=$(ref_raw "$IMG")
    size=$(stat -c %s "$ref")
    mount_image "$IMG" "$mnt" ro
    for flags in "" direct; do
        n=$(dd_range "$mnt/disk" "$size" 4096 /dev/stdout "$flags" | wc -c)
        [[ $n == 0 ]] || fail "read at EOF${flags:+ (O_DIRECT)} returned $n bytes"
        n=$(dd_range "$mnt/disk" $((size + 1000000)) 4096 /dev/stdout "$flags" | wc -c)
        [[ $n == 0 ]] || fail "read past EOF${flags:+ (O_DIRECT)} returned $n bytes"
        # a read straddling EOF returns only the bytes before it
        dd_range "$mnt/disk" $((size - 100)) 8192 "$T/a" "$flags" || fail "read across EOF failed"
        [[ $(stat -c %s "$T/a") == 100 ]] \
            || fail "read across EOF${flags:+ (O_DIRECT)} returned $(stat -c %s "$T/a") bytes, expected 100"
        dd_range "$ref" $((size - 100)) 100 "$T/b"
        same_bytes "$T/a" "$T/b" "last 100 bytes${flags:+ (O_DIRECT)}"
    done
    # tail -c uses a seek to the end
    tail -c 3000 "$mnt/disk" >"$T/a"
    tail -c 3000 "$ref" >"$T/b"
    same_bytes "$T/a" "$T/b" "tail -c 3000"
    unmount_image "$mnt"
}

# Concurrent O_DIRECT readers on different and overlapping regions.
case_parallel() {
    local mnt="$T/mnt" ref size i pids=() rc=0 chunk
    ref=$(ref_raw "$IMG")
    size=$(stat -c %s "$ref")
    mount_image "$IMG" "$mnt" ro
    chunk=$((size / 4))
    for i in 0 1 2 3 4 5 6 7; do
        # 4 disjoint quarters, then 4 readers at odd offsets spanning quarters
        local off=$((i < 4 ? i * chunk : (i - 4) * chunk + 4097 * (i + 1)))
        local len=$((i < 4 ? chunk : chunk + 11111))
        ((off + len <= size)) || len=$((size - off))
        (
            dd_range "$mnt/disk" "$off" "$len" "$T/p$i" direct
            dd_range "$ref" "$off" "$len" "$T/r$i"
            cmp -s "$T/p$i" "$T/r$i"
        ) &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        wait "${pids[i]}" || {
            rc=1
            echo "    parallel reader $i failed or read wrong data" >&2
        }
    done
    ((rc == 0)) || fail "concurrent reads returned wrong data or failed"
    unmount_image "$mnt"
}

# A tiny L2 cache on an image with 512-byte clusters (one L2 table maps
# 32 KiB, so this image has hundreds of L2 tables), sequential and
# concurrent reads.
case_small_l2_cache() {
    local img="$T/small.qcow2" mnt="$T/mnt" vsize=$((32 * M)) cmds=() off i ref pids=() rc=0
    qemu-img create -q -f qcow2 -o cluster_size=512 "$img" "$vsize" || fail "test setup: qemu-img create failed"
    for ((off = 0, i = 0; off < vsize - 4096; off += 32 * K * 3 + 1536, i++)); do
        cmds+=("write -P $((i % 250 + 1)) $off 1000")
    done
    qio "$img" "${cmds[@]}"
    ref=$(ref_raw "$img")
    mount_image "$img" "$mnt" ro,l2-cache-size=65536
    same_bytes "$mnt/disk" "$ref" "disk with l2-cache-size=65536"
    for i in 0 1 2 3; do
        (
            dd_range "$mnt/disk" $((i * 8 * M)) $((8 * M)) "$T/p$i" direct
            dd_range "$ref" $((i * 8 * M)) $((8 * M)) "$T/r$i"
            cmp -s "$T/p$i" "$T/r$i"
        ) &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do wait "${pids[i]}" || rc=1; done
    ((rc == 0)) || fail "concurrent reads with a small L2 cache returned wrong data"
    unmount_image "$mnt"
}

# Reads of every size from 1 byte to 12 KiB and of sizes around every power
# of two up to 2 MiB + 1 (more than one FUSE request), at odd offsets, some
# past the end, from 6 threads at once with O_DIRECT (the daemon sees these
# exact sizes), each compared with qemu-img convert's bytes.  The daemon
# keeps one reply buffer per worker thread and reuses it: no reply may carry
# bytes of an earlier or a concurrent request, and holes, zero clusters and
# compressed clusters read after data must come back as themselves.
case_read_sizes() {
    local img="$T/sizes.qcow2" mnt="$T/mnt" ref out vsize=$((12 * M + 3 * K)) seed=$RANDOM
    qemu-img create -q -f qcow2 "$img" "$vsize" || fail "test setup: qemu-img create failed"
    qio "$img" \
        "write -s $R1 0 $((3 * M + 17))" \
        "write -z $((1 * M)) $((192 * K))" \
        "write -s $R2 $((5 * M + 12345)) $((4 * M))" \
        "write -c -s $X1 $((10 * M)) $((256 * K))" \
        "write -s $R3 $((vsize - 7000)) 7000"
    ref=$(ref_raw "$img")
    mount_image "$img" "$mnt" ro
    out=$(io_timeout "$READSIZES" "$mnt/disk" "$ref" 6 "$seed" 2>&1) \
        || fail "reads of many sizes from 6 threads (seed $seed): $out"
    info "$out (seed $seed)"
    unmount_image "$mnt"
}

case_bad_option_value() {
    expect_refusal "$IMG" "$T/mnt" ro,l2-cache-size=abc
    stderr_mentions 'l2-cache-size'
}

# Daemon mode (no -f): returns 0 with the mount up.  Started from the image
# directory with relative IMAGE and MOUNTPOINT; the image is an overlay with
# a relative backing file name (the daemon may chdir("/") when it
# daemonizes).  The daemon is found by the image file it holds open.
case_daemon_mode() {
    local d="$T/dm" rc=0 p pids deadline
    mkdir -p "$d/mnt"
    cp "$IMG" "$d/base.qcow2"
    (cd "$d" && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 "$(virtual_size "$IMG")") \
        || fail "test setup: qemu-img create of the overlay failed"
    qio "$d/top.qcow2" "write -P 0x77 $((64 * K)) 4096"
    track_mount "$d/mnt"
    (cd "$d" && exec timeout --foreground -k 5 20 "$QCOW2FUSE" -o ro top.qcow2 mnt) </dev/null >"$T/out" 2>"$T/err" || rc=$?
    pids=$(pids_holding "$d/top.qcow2")
    for p in $pids; do track_pid "$p"; done
    if ((rc != 0)); then
        sed 's/^/    | /' "$T/err" >&2
        fail "daemon mode: $QCOW2FUSE -o ro top.qcow2 mnt exited with status $rc"
    fi
    # "returns 0 once the mount is up": no waiting here
    is_mounted "$d/mnt" || fail "daemon mode: exit status 0 but $d/mnt is not mounted"
    [[ -e $d/mnt/disk ]] || fail "daemon mode: $d/mnt/disk does not exist"
    [[ -n $pids ]] || fail "daemon mode: no process holds the image open"
    info "daemon pid(s): $pids"
    compare_raw "$d/top.qcow2" "$d/mnt"
    fusermount3 -u "$d/mnt" || fail "fusermount3 -u failed"
    deadline=$(($(date +%s%N) + EXIT_TIMEOUT * 1000000000))
    for p in $pids; do
        while pid_alive "$p"; do
            (($(date +%s%N) < deadline)) || fail "daemon $p still running ${EXIT_TIMEOUT}s after unmount"
            sleep 0.02
        done
    done
    is_mounted "$d/mnt" && fail "still mounted after fusermount3 -u"
    _check_sanitizer_output "$T/err" "daemon mode"
    return 0
}

case_help_version() {
    local out rc=0
    out=$(timeout --foreground -k 5 20 "$QCOW2FUSE" --help 2>"$T/err") || rc=$?
    ((rc == 0)) || fail "--help exited with status $rc"
    grep -qi 'usage' <<<"$out" || fail "--help output on stdout has no usage line: $out"
    grep -q 'MOUNTPOINT\|mountpoint' <<<"$out" || fail "--help does not mention the mountpoint: $out"
    grep -q -- '-o' <<<"$out" || fail "--help does not describe -o options"
    grep -q 'ro' <<<"$out" || fail "--help does not mention the ro option"
    grep -q 'l2-cache-size' <<<"$out" || fail "--help does not mention l2-cache-size"
    rc=0
    out=$(timeout --foreground -k 5 20 "$QCOW2FUSE" --version 2>"$T/err") || rc=$?
    ((rc == 0)) || fail "--version exited with status $rc"
    grep -Eq '[0-9]+\.[0-9]+' <<<"$out" || fail "--version output on stdout has no version number: $out"
    info "--version: $out"
}

case_usage_errors() {
    local rc
    rc=0
    timeout --foreground -k 5 20 "$QCOW2FUSE" </dev/null >"$T/out" 2>"$T/err" || rc=$?
    ((rc != 0 && rc < 124)) || fail "no arguments: exit status $rc, expected a usage error"
    [[ -s $T/err ]] || fail "no arguments: nothing on stderr"
    rc=0
    timeout --foreground -k 5 20 "$QCOW2FUSE" -f "$IMG" </dev/null >"$T/out" 2>"$T/err" || rc=$?
    ((rc != 0 && rc < 124)) || fail "no mountpoint: exit status $rc, expected a usage error"
    [[ -s $T/err ]] || fail "no mountpoint: nothing on stderr"
    rc=0
    timeout --foreground -k 5 20 "$QCOW2FUSE" -f -o ro "$IMG" "$T/no-such-dir" </dev/null >"$T/out" 2>"$T/err" || rc=$?
    ((rc != 0 && rc < 124)) || fail "non-existent mountpoint: exit status $rc, expected an error"
    [[ -s $T/err ]] || fail "non-existent mountpoint: nothing on stderr"
}

# Several mounts at once, unmounted in a different order; every daemon exits 0.
# mmap of the disk: a private mapping shows the disk's bytes; shared
# mappings (read, and read-write on a writable mount) either work and agree
# with read/write or are refused at mmap time (direct_io files on older
# kernels) -- never a hang, a SIGBUS or other bytes.
case_mmap() {
    local mnt="$T/mnt" img="$T/mmap.qcow2" ref out
    mount_image "$IMG" "$mnt" ro
    out=$(io_timeout "$MMAPCHECK" "$mnt/disk" $((8 * M + 3 * K))) \
        || fail "mmap of a read-only disk: $out"
    info "$(tr '\n' ' ' <<<"$out")"
    unmount_image "$mnt"

    cp "$IMG" "$img"
    ref=$(ref_raw "$img")
    mount_image "$img" "$mnt"
    out=$(io_timeout "$MMAPCHECK" "$mnt/disk" $((1 * M)) rw) \
        || fail "mmap of a writable disk: $out"
    info "$(tr '\n' ' ' <<<"$out")"
    unmount_image "$mnt"
    check_clean "$img" "after mmap of the writable disk"
    same_bytes "$(ref_raw "$img")" "$ref" "disk after the mapping put the old bytes back"
}

case_multiple_mounts() {
    local i
    for i in 1 2 3; do mount_image "$IMG" "$T/m$i" ro; done
    for i in 2 3 1; do
        compare_raw "$IMG" "$T/m$i"
        unmount_image "$T/m$i"
    done
}

make_sources
make_image "$IMG"

run_case listing case_listing
run_case read_only case_readonly
run_case dd_bs_1m case_dd_1m
run_case odd_offsets_and_sizes case_odd_reads
run_case eof case_eof
run_case parallel_reads case_parallel
run_case small_l2_cache case_small_l2_cache
run_case read_sizes_concurrent case_read_sizes
run_case bad_option_value case_bad_option_value
run_case daemon_mode case_daemon_mode
run_case help_version case_help_version
run_case usage_errors case_usage_errors
run_case multiple_mounts case_multiple_mounts
run_case mmap case_mmap

finish_cases
