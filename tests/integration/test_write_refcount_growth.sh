#!/usr/bin/env bash
#
# Refcount structure growth while writing:
#   * 4 KiB clusters with 1-bit refcounts (a refcount block covers 32768
#     clusters = 128 MiB of host file): 160 MiB (GROWTH_MIB) of data written
#     in 4 MiB chunks at strided, mostly unaligned offsets of a 2 GiB disk
#     need new refcount blocks;
#   * 512-byte clusters with 64-bit refcounts (a block covers 64 clusters =
#     32 KiB, the initial one-cluster table 64 blocks = 2 MiB of host file):
#     a few MiB of writes force the refcount table to be relocated (and
#     grown) several times.
# The number of refcount blocks and the refcount table's place and size are
# read from the image before and after; afterwards "qemu-img check" must be
# clean and "qemu-img compare" against the raw reference identical, also
# after a second round of writes on a remount.
# shellcheck disable=SC2317  # case functions are called indirectly (run_case)
# shellcheck disable=SC2001  # sed indents multi-line tool output
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io cmp dd od
requires_fuse
WRITEMIX=$(require_tool writemix)

K=1024
M=$((1024 * 1024))
G=$((1024 * M))
# one writemix run or dd takes seconds at most; much longer means a hung daemon

# be FILE OFF N: the big-endian unsigned N-byte (N <= 8) field at OFF.
be() {
    local hex
    hex=$(od -An -v -t x1 -j "$2" -N "$3" "$1" | tr -d ' \n')
    [[ ${#hex} == $(($3 * 2)) ]] || fail "cannot read $3 bytes at $2 of $1"
    echo $((16#$hex))
}

# rc_layout IMG: sets RT_OFF, RT_CLUSTERS and RT_BLOCKS (number of non-zero
# refcount table entries, i.e. refcount blocks) from the image file.
rc_layout() {
    local img=$1 cs
    cs=$((1 << $(be "$img" 20 4)))
    RT_OFF=$(be "$img" 48 8)
    RT_CLUSTERS=$(be "$img" 56 4)
    RT_BLOCKS=$(od -An -v -t x8 --endian=big -w8 -j "$RT_OFF" -N $((RT_CLUSTERS * cs)) "$img" \
        | grep -cv '^ *0\{16\}$' || true)
}

# chunk_writes DISK RAW N STRIDE [CHUNK]: N writes of CHUNK bytes (default
# 1 MiB) at offsets i*STRIDE + (i*4608 mod 64 KiB) (mostly unaligned), each
# from a different window of the random source $RND, to both files.
chunk_writes() {
    local disk=$1 raw=$2 n=$3 stride=$4 chunk=${5:-$M} i off skip f rc
    for ((i = 0; i < n; i++)); do
        off=$((i * stride + (i * 4608) % (64 * K)))
        skip=$(((i * 1234567) % (60 * M)))
        for f in "$disk" "$raw"; do
            rc=0
            guarded "$(dirname "$disk")" "$T/dd.out" dd if="$RND" of="$f" bs="$chunk" count=1 \
                iflag=skip_bytes,fullblock oflag=seek_bytes skip="$skip" seek="$off" \
                conv=notrunc status=none || rc=$?
            if ((rc == 124)); then
                fail "dd of $chunk bytes at $off to $f did not finish within ${WRITEMIX_TIMEOUT}s (daemon hung?)"
            elif ((rc != 0)); then
                cat "$T/dd.out" >&2
                fail "dd of $chunk bytes at $off to $f failed (status $rc)"
            fi
        done
    done
}

# run_writemix MNT RAW SEED NOPS MAXLEN
run_writemix() {
    local out rc=0
    guarded "$1" "$T/writemix.out" "$WRITEMIX" "$1/disk" "$2" "$3" "$4" "$5" || rc=$?
    out=$(cat "$T/writemix.out")
    if ((rc != 0)); then
        sed 's/^/    | /' <<<"$out" >&2
        if ((rc == 124 || rc == 137)); then
            fail "writemix (seed $3) did not finish within ${WRITEMIX_TIMEOUT}s (daemon hung?)"
        fi
        fail "writemix (seed $3) failed with status $rc"
    fi
    info "$out"
}

# 4 KiB clusters, refcount_bits=1: new refcount blocks.
case_new_blocks() {
    local img="$T/rc1.qcow2" raw="$T/ref.raw" mnt="$T/mnt" b0 t0 out
    qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=1 "$img" $((2 * G))
    qio "$img" "write -s $R1 $((7 * M)) $((8 * M))"
    ref_raw "$img" "$raw" >/dev/null
    rc_layout "$img"
    b0=$RT_BLOCKS t0=$RT_OFF
    info "before: refcount table at $RT_OFF ($RT_CLUSTERS cluster(s)), $RT_BLOCKS refcount block(s)"

    mount_image "$img" "$mnt"
    # $GROWTH_MIB MiB in chunks of 4 MiB spread over the whole 2 GiB: more
    # than the 128 MiB of host file the first refcount block covers
    local n=$((GROWTH_MIB / 4))
    chunk_writes "$mnt/disk" "$raw" "$n" $((2 * G / n / M * M)) $((4 * M))
    run_writemix "$mnt" "$raw" 5001 100 1M
    unmount_image "$mnt"

    rc_layout "$img"
    info "after:  refcount table at $RT_OFF ($RT_CLUSTERS cluster(s)), $RT_BLOCKS refcount block(s)"
    local want=$(((GROWTH_MIB + 8 + 127) / 128))
    ((RT_BLOCKS >= want)) || fail "expected at least $want refcount blocks for $GROWTH_MIB MiB of data (before $b0, after $RT_BLOCKS)"
    check_clean "$img" "after $GROWTH_MIB MiB of writes"
    check_identical "$img" "$raw" "after $GROWTH_MIB MiB of writes"

    # the grown structures are read back and used by a second mount
    mount_image "$img" "$mnt"
    chunk_writes "$mnt/disk" "$raw" 8 $((256 * M - 3 * K))
    unmount_image "$mnt"
    check_clean "$img" "second round"
    check_identical "$img" "$raw" "second round"
    [[ $t0 == "$RT_OFF" ]] || info "note: the refcount table also moved ($t0 -> $RT_OFF)"
}

# relocate OPTS SEED NCHUNKS NOPS: 512-byte clusters, 64-bit refcounts:
# after NCHUNKS MiB of data and a writemix of NOPS ops the refcount table
# must have moved and grown.
relocate() {
    local opts=$1 seed=$2 nchunks=$3 nops=$4 img="$T/rc64.qcow2" raw="$T/ref.raw" mnt="$T/mnt" t0 c0 b0 out
    qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 "$img" $((64 * M))
    qio "$img" "write -s $R1 $((1 * M + 100)) $((256 * K))"
    ref_raw "$img" "$raw" >/dev/null
    rc_layout "$img"
    t0=$RT_OFF c0=$RT_CLUSTERS b0=$RT_BLOCKS
    info "before: refcount table at $RT_OFF ($RT_CLUSTERS cluster(s)), $RT_BLOCKS refcount block(s)"

    mount_image "$img" "$mnt" "$opts"
    # NCHUNKS chunks of 1 MiB spread over the disk (plus the L2 tables for
    # them; a refcount table of one cluster covers only 2 MiB)
    chunk_writes "$mnt/disk" "$raw" "$nchunks" $((60 * M / nchunks - 512))
    run_writemix "$mnt" "$raw" "$seed" "$nops" 32K
    unmount_image "$mnt"

    rc_layout "$img"
    info "after:  refcount table at $RT_OFF ($RT_CLUSTERS cluster(s)), $RT_BLOCKS refcount block(s)"
    [[ $RT_OFF != "$t0" ]] || fail "the refcount table was not relocated (still at $t0)"
    ((RT_CLUSTERS > c0)) || fail "the refcount table did not grow ($c0 -> $RT_CLUSTERS clusters)"
    ((RT_BLOCKS > 64)) || fail "only $RT_BLOCKS refcount blocks (before: $b0); expected more than one table cluster holds"
    check_clean "$img" "after the relocation"
    check_identical "$img" "$raw" "after the relocation"

    mount_image "$img" "$mnt" "$opts"
    same_bytes "$mnt/disk" "$raw" "remount after the relocation"
    chunk_writes "$mnt/disk" "$raw" 2 $((31 * M - 1536))
    unmount_image "$mnt"
    check_clean "$img" "second round"
    check_identical "$img" "$raw" "second round"
}
case_table_relocation() { relocate "" 5002 6 100; }
case_table_relocation_small_cache() { relocate "refcount-cache-size=2K,l2-cache-size=4K" 5003 4 60; }
case_table_relocation_writethrough() { relocate "cache=writethrough" 5004 3 30; }

# data written in the 4 KiB / 1-bit case (MiB; more than 128 needed)
GROWTH_MIB=${GROWTH_MIB:-160}
RND="$TEST_TMP/rnd"
head -c $((64 * M)) /dev/urandom >"$RND"
make_sources

run_case new_refcount_blocks_4k_1bit case_new_blocks
run_case table_relocation_512_64bit case_table_relocation
run_case table_relocation_small_caches case_table_relocation_small_cache
run_case table_relocation_writethrough case_table_relocation_writethrough

finish_cases
