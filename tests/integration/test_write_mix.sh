#!/usr/bin/env bash
#
# Random write/read mixes ($TOOLS/writemix) on writable mounts of every image
# kind the daemon can write: qcow2 v2 and v3, cluster sizes 512 B, 4 KiB
# (with tiny metadata caches), 64 KiB and 2 MiB, refcount widths 1 and 64
# bits, zlib and zstd compressed images, backing chains, extended L2 entries
# over a backing file, external data files (raw and not), images with zero
# clusters, an odd virtual size, and cache=writethrough.
#
# For each kind: RAW = "qemu-img convert -O raw IMG" before mounting;
# writemix applies the same operations to MNT/disk and RAW (checking reads
# as it goes and comparing everything at the end); after the unmount (daemon
# exit 0) "qemu-img check" must be clean (no leaks, no errors) and
# "qemu-img compare IMG RAW" must report identical images.
# shellcheck disable=SC2317  # case functions are called indirectly (run_case)
# shellcheck disable=SC2001  # sed indents multi-line tool output
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io cmp dd md5sum
requires_fuse
WRITEMIX=$(require_tool writemix)

K=1024
M=$((1024 * 1024))
NOPS=${WRITEMIX_OPS:-300}
# one writemix run takes a few seconds; much longer means a hung daemon

# run_writemix MNT RAW SEED NOPS MAXLEN
run_writemix() {
    local mnt=$1 raw=$2 seed=$3 nops=$4 maxlen=$5 out rc=0
    info "writemix seed $seed, $nops ops, max write $maxlen"
    guarded "$mnt" "$T/writemix.out" "$WRITEMIX" "$mnt/disk" "$raw" "$seed" "$nops" "$maxlen" || rc=$?
    out=$(cat "$T/writemix.out")
    if ((rc != 0)); then
        sed 's/^/    | /' <<<"$out" >&2
        if [[ -n ${DAEMON_LOG:-} && -s $DAEMON_LOG ]]; then sed 's/^/    daemon| /' "$DAEMON_LOG" >&2; fi
        if ((rc == 124 || rc == 137)); then
            fail "writemix (seed $seed) did not finish within ${WRITEMIX_TIMEOUT}s (daemon hung?)"
        fi
        fail "writemix (seed $seed) failed with status $rc"
    fi
    info "$out"
}

# mix IMG SEED MAXLEN [MOUNT_OPTS]: the whole cycle on an image that is
# ready to be mounted.  Leaves RAW in $MIX_RAW.
mix() {
    local img=$1 seed=$2 maxlen=$3 opts=${4:-} mnt="$T/mnt"
    MIX_RAW=$(ref_raw "$img" "$T/ref.raw")
    mount_image "$img" "$mnt" "$opts"
    [[ $(stat -c %s "$mnt/disk") == $(stat -c %s "$MIX_RAW") ]] \
        || fail "disk size $(stat -c %s "$mnt/disk") differs from the virtual size $(stat -c %s "$MIX_RAW")"
    run_writemix "$mnt" "$MIX_RAW" "$seed" "$NOPS" "$maxlen"
    unmount_image "$mnt"
    check_clean "$img" "after writemix"
    check_identical "$img" "$MIX_RAW" "after writemix"
}

# prefill IMG: some data for the writes to overwrite: random and
# compressible data, at cluster-aligned and unaligned places.
prefill() {
    local img=$1
    qio "$img" \
        "write -s $R1 0 $((3 * M))" \
        "write -s $X1 $((5 * M + 1536)) $((2 * M))" \
        "write -s $R2 $((32 * M - 100 * K)) $((200 * K))" \
        "write -s $X2 $((40 * M)) $((64 * K))" \
        "write -s $R3 $((60 * M + 512)) $((1 * M))"
}

# md5 FILE
md5() { md5sum "$1" | cut -d' ' -f1; }

case_v2() {
    local img="$T/v2.qcow2"
    qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=64k "$img" $((128 * M))
    prefill "$img"
    mix "$img" 1001 1M
}

# v3, 1 GiB so that writes cross the 512 MiB L2 table boundary; then a
# remount read-only (data persisted), a read-only mount refusing writes, a
# write at the disk end failing with ENOSPC, and a second round of writes
# on the image the daemon wrote.
case_v3() {
    local img="$T/v3.qcow2" mnt="$T/mnt" size out
    qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=64k "$img" $((1024 * M))
    prefill "$img"
    qio "$img" "write -s $R3 $((512 * M - 32 * K)) $((64 * K))"
    mix "$img" 1002 2M

    mount_image "$img" "$mnt" ro
    same_bytes "$mnt/disk" "$MIX_RAW" "remount (ro) after writemix: disk vs RAW"
    write_fails_erofs "$mnt/disk"
    unmount_image "$mnt"
    info "remount: read-back identical"

    mount_image "$img" "$mnt"
    size=$(stat -c %s "$mnt/disk")
    if out=$(timeout -k 5 "$IO_TIMEOUT" dd if=/dev/zero of="$mnt/disk" bs=512 count=1 \
        oflag=seek_bytes seek="$size" conv=notrunc 2>&1); then
        fail "a write at the end of the disk (offset $size) succeeded"
    fi
    grep -q 'No space left on device' <<<"$out" || fail "a write at the disk end failed, but not with ENOSPC: $out"
    [[ $(stat -c %s "$mnt/disk") == "$size" ]] || fail "the disk size changed after a write past its end"
    run_writemix "$mnt" "$MIX_RAW" 2002 "$NOPS" 1M
    unmount_image "$mnt"
    check_clean "$img" "second round"
    check_identical "$img" "$MIX_RAW" "second round"
}

case_cluster512() {
    local img="$T/c512.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=512 "$img" $((64 * M))
    prefill "$img"
    mix "$img" 1003 256K
}

# 4 KiB clusters (an L2 table covers 2 MiB) with metadata caches far
# smaller than the metadata: constant eviction and write-back.
case_cluster4k_small_caches() {
    local img="$T/c4k.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=4k "$img" $((128 * M))
    prefill "$img"
    mix "$img" 1004 1M "l2-cache-size=16K,refcount-cache-size=8K"
}

case_cluster2m() {
    local img="$T/c2m.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=2M "$img" $((256 * M))
    prefill "$img"
    mix "$img" 1005 3M
}

case_refcount1() {
    local img="$T/rc1.qcow2"
    qemu-img create -q -f qcow2 -o refcount_bits=1 "$img" $((128 * M))
    prefill "$img"
    mix "$img" 1006 1M
}

case_refcount64() {
    local img="$T/rc64.qcow2"
    qemu-img create -q -f qcow2 -o refcount_bits=64 "$img" $((128 * M))
    prefill "$img"
    mix "$img" 1007 1M
}

# compressed IMG TYPE SEED: an image whose data clusters are compressed
# (qemu-img convert -c); partial overwrites need read-modify-write.
compressed() {
    local type=$1 seed=$2 src="$T/src.qcow2" img="$T/comp-$1.qcow2" n
    qemu-img create -q -f qcow2 "$src" $((128 * M))
    prefill "$src"
    qio "$src" "write -s $X2 $((80 * M)) $((8 * M))" "write -s $X1 $((100 * M - 3 * K)) $((4 * M))"
    qemu-img convert -c -O qcow2 -o compression_type="$type" "$src" "$img" \
        || fail "test setup: qemu-img convert -c ($type) failed"
    n=$(qemu-img check "$img" | grep -o '[0-9.]*% compressed' || true)
    info "source image: $n clusters"
    [[ $n != 0.00%* && -n $n ]] || fail "test setup: convert -c produced no compressed clusters"
    mix "$img" "$seed" 1M
}
case_compressed_zlib() { compressed zlib 1008; }
case_compressed_zstd() { compressed zstd 1009; }

# raw base with data <- qcow2 mid with writes <- qcow2 top (mounted).
# Base and mid must stay untouched.
case_backing_chain() {
    local base="$T/base.raw" mid="$T/mid.qcow2" top="$T/top.qcow2" h_base h_mid
    truncate -s $((128 * M)) "$base"
    dd if="$R1" of="$base" bs=1M seek=1 conv=notrunc status=none
    dd if="$X1" of="$base" bs=1M seek=50 conv=notrunc status=none
    dd if="$R2" of="$base" bs=1M seek=120 conv=notrunc status=none
    qemu-img create -q -f qcow2 -b "$base" -F raw "$mid"
    qio "$mid" "write -s $R3 $((3 * M + 512)) $((2 * M))" "write -z $((52 * M)) $((1 * M))" \
        "write -s $X2 $((100 * M)) $((300 * K))"
    qemu-img create -q -f qcow2 -b "$mid" -F qcow2 "$top"
    qio "$top" "write -s $R2 $((6 * M - 7 * K)) $((64 * K))" "write -z -u $((124 * M)) $((64 * K))"
    h_base=$(md5 "$base")
    h_mid=$(md5 "$mid")
    mix "$top" 1010 1M
    [[ $(md5 "$base") == "$h_base" ]] || fail "the raw base image was modified"
    [[ $(md5 "$mid") == "$h_mid" ]] || fail "the middle image of the chain was modified"
    check_clean "$mid" "middle image"
}

# extended L2 entries (32 subclusters of 2 KiB) over a raw backing file,
# pre-filled with subcluster-sized writes and zeroes.
case_extended_l2() {
    local base="$T/base.raw" img="$T/xl2.qcow2" h_base
    truncate -s $((128 * M)) "$base"
    dd if="$R1" of="$base" bs=1M seek=0 conv=notrunc status=none
    dd if="$X2" of="$base" bs=1M seek=64 conv=notrunc status=none
    qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k -b "$base" -F raw "$img"
    qio "$img" \
        "write -s $R2 $((2 * K)) $((2 * K))" \
        "write -s $R3 $((64 * K + 6 * K)) $((10 * K))" \
        "write -z $((128 * K + 4 * K)) $((8 * K))" \
        "write -z -u $((256 * K)) $((64 * K))" \
        "write -s $X1 $((1 * M + 1000)) $((300 * K))" \
        "write -z $((65 * M + 2 * K)) $((30 * K))" \
        "write -s $R2 $((100 * M)) $((4 * M))"
    h_base=$(md5 "$base")
    mix "$img" 1011 1M
    [[ $(md5 "$base") == "$h_base" ]] || fail "the raw backing file was modified"
}

# external data file; with data_file_raw=on the data file itself must end
# up equal to the disk content.
datafile() {
    local raw_flag=$1 seed=$2 img="$T/df.qcow2" data="$T/df.data" dsize
    qemu-img create -q -f qcow2 -o data_file="$data",data_file_raw="$raw_flag" "$img" $((128 * M))
    prefill "$img"
    mix "$img" "$seed" 1M
    if [[ $raw_flag == on ]]; then
        dsize=$(stat -c %s "$data")
        if ((dsize < $(stat -c %s "$MIX_RAW"))); then
            truncate -s "$(stat -c %s "$MIX_RAW")" "$data"
        fi
        cmp -s -n "$(stat -c %s "$MIX_RAW")" "$data" "$MIX_RAW" \
            || fail "with data_file_raw=on the data file differs from the disk content"
        info "data file (raw) equals the disk content"
    fi
}
case_datafile_raw() { datafile on 1012; }
case_datafile() { datafile off 1013; }

# zero clusters, with (write -z) and without (write -z -u) a host cluster,
# over data and over unallocated space.
case_zero_clusters() {
    local img="$T/zero.qcow2" n
    qemu-img create -q -f qcow2 "$img" $((128 * M))
    prefill "$img"
    qio "$img" \
        "write -z $((1 * M)) $((1 * M))" \
        "write -z -u $((5 * M + 64 * K)) $((512 * K))" \
        "write -z $((70 * M)) $((2 * M))" \
        "write -z -u $((90 * M)) $((1 * M))" \
        "write -z $((32 * M - 64 * K)) $((64 * K))"
    n=$(qemu-img map --output=json "$img" | grep -c '"zero": true, "data": false' || true)
    ((n > 0)) || fail "test setup: no zero clusters in the image"
    mix "$img" 1014 1M
}

# a virtual size that is not a multiple of the cluster size
case_odd_size() {
    local img="$T/odd.qcow2"
    qemu-img create -q -f qcow2 "$img" $((64 * M + 1536))
    qio "$img" "write -s $R1 $((64 * M - 64 * K)) $((64 * K + 1536))" "write -s $R2 0 $((1 * M))"
    mix "$img" 1015 512K
}

case_writethrough() {
    local img="$T/wt.qcow2"
    qemu-img create -q -f qcow2 "$img" $((128 * M))
    prefill "$img"
    mix "$img" 1016 1M cache=writethrough
}

# Concurrent writers: 4 fio jobs interleaved in 4 KiB stripes, so that every
# 64 KiB cluster (and its copy-on-write from the raw backing file) is written
# by all jobs at the same time; fio verifies the data after writing and
# again (verify_only) after a remount.
case_concurrent_fio() {
    requires fio
    local base="$T/base.raw" img="$T/conc.qcow2" mnt="$T/mnt" out rc h
    truncate -s $((64 * M)) "$base"
    dd if="$R1" of="$base" bs=1M seek=8 conv=notrunc status=none
    qemu-img create -q -f qcow2 -b "$base" -F raw "$img"
    local fio_args=(--name=conc --filename="$mnt/disk" --rw=randwrite --bs=2k --size=16M
        --zonemode=strided --zonesize=4k --zoneskip=12k --offset_increment=4k --numjobs=4
        --verify=crc32c --verify_fatal=1 --ioengine=psync --randrepeat=1 --randseed=1017
        --group_reporting --minimal --verify_state_save=0)
    mount_image "$img" "$mnt"
    rc=0
    out=$(cd "$T" && timeout -k 5 "$IO_TIMEOUT" fio "${fio_args[@]}" --do_verify=1 2>&1) || rc=$?
    if ((rc != 0)) || grep -Eqi 'verify failed|bad magic|verify:' <<<"$out"; then
        sed 's/^/    | /' <<<"$out" >&2
        fail "fio write+verify with 4 concurrent jobs failed (status $rc)"
    fi
    info "fio: 4 jobs wrote and verified $(grep '^3;' <<<"$out" | cut -d';' -f6) KiB"
    unmount_image "$mnt"
    check_clean "$img" "after concurrent fio"
    h=$(md5 "$img")
    mount_image "$img" "$mnt"
    rc=0
    out=$(cd "$T" && timeout -k 5 "$IO_TIMEOUT" fio "${fio_args[@]}" --verify_only 2>&1) || rc=$?
    if ((rc != 0)) || grep -Eqi 'verify failed|bad magic|verify:' <<<"$out"; then
        sed 's/^/    | /' <<<"$out" >&2
        fail "fio verify_only after a remount failed (status $rc)"
    fi
    unmount_image "$mnt"
    info "remount: fio verify_only ok"
    [[ $(md5 "$img") == "$h" ]] || info "note: the image file changed during a read-only fio verify (header/dirty bit rewritten?)"
    check_clean "$img" "after verify_only"
}

make_sources

run_case v2_64k case_v2
run_case v3_64k case_v3
run_case cluster_512 case_cluster512
run_case cluster_4k_small_caches case_cluster4k_small_caches
run_case cluster_2m case_cluster2m
run_case refcount_bits_1 case_refcount1
run_case refcount_bits_64 case_refcount64
run_case compressed_zlib case_compressed_zlib
run_case compressed_zstd case_compressed_zstd
run_case backing_chain case_backing_chain
run_case extended_l2_backing case_extended_l2
run_case data_file_raw case_datafile_raw
run_case data_file case_datafile
run_case zero_clusters case_zero_clusters
run_case odd_size case_odd_size
run_case cache_writethrough case_writethrough
run_case concurrent_fio case_concurrent_fio

finish_cases
