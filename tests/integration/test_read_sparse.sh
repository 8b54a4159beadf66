#!/usr/bin/env bash
#
# Sparse images: a 4 TiB image mounts fast, SEEK_DATA/SEEK_HOLE report the
# cluster map (checked with $TOOLS/seekmap), data and holes read correctly,
# and "cp --sparse=always" of a mounted disk produces a correct sparse copy.
# shellcheck disable=SC2317  # case functions are called indirectly (run_case)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io cmp dd cp du seq
requires_fuse
SEEKMAP=$(require_tool seekmap)

K=1024
M=$((1024 * 1024))
G=$((1024 * M))
TB=$((1024 * G))

# expected_extents CS OFF LEN [OFF LEN...]: the data extents ("START LENGTH"
# lines) that writes of LEN bytes at OFF produce with cluster size CS: every
# touched cluster is data, adjacent or overlapping ranges merge.
expected_extents() {
    local cs=$1
    shift
    local ranges=()
    while (($# >= 2)); do
        local s=$(($1 / cs * cs)) e=$((($1 + $2 + cs - 1) / cs * cs))
        ranges+=("$s $e")
        shift 2
    done
    printf '%s\n' "${ranges[@]}" | merge_ranges
}

# merge_ranges: read "START END" lines, print merged "START LENGTH" lines
# (adjacent or overlapping ranges merge).  Numbers stay exact up to 2^53.
merge_ranges() {
    sort -n -k1,1 | awk '
        NR == 1 { s = $1; e = $2; next }
        $1 <= e { if ($2 > e) e = $2; next }
        { printf "%.0f %.0f\n", s, e - s; s = $1; e = $2 }
        END { if (NR > 0) printf "%.0f %.0f\n", s, e - s }'
}

# map_extents CS IMG: what qemu-img map reports as data and not zero,
# widened to whole clusters (qemu also looks at holes in the host file, at
# a finer granularity than the cluster map) and merged.
map_extents() {
    local cs=$1 img=$2
    qemu-img map -U --output=json "$img" \
        | sed -n 's/.*"start": *\([0-9]*\), *"length": *\([0-9]*\),.*"zero": *\([a-z]*\), *"data": *\([a-z]*\).*/\1 \2 \3 \4/p' \
        | while read -r start len zero data; do
            if [[ $zero == false && $data == true ]]; then
                echo "$((start / cs * cs)) $(((start + len + cs - 1) / cs * cs))"
            fi
        done | merge_ranges
}

# check_seekmap FILE EXPECTED_FILE WHAT
check_seekmap() {
    local f=$1 want=$2 what=$3 got
    got="$T/seekmap.$(_seq).out"
    if ! io_timeout "$SEEKMAP" "$f" >"$got" 2>"$got.err"; then
        cat "$got.err" >&2
        fail "$what: seekmap $f failed"
    fi
    if ! cmp -s "$got" "$want"; then
        echo "    expected data extents:" >&2
        sed 's/^/      /' "$want" >&2
        echo "    SEEK_DATA/SEEK_HOLE reported:" >&2
        sed 's/^/      /' "$got" >&2
        fail "$what: SEEK_DATA/SEEK_HOLE extents differ from the cluster map"
    fi
    info "$what: $(wc -l <"$got") data extent(s) as expected"
}

# read_range_matches IMG MNT OFF LEN: bytes [OFF, OFF+LEN) of MNT/disk equal
# the same range of the image according to qemu.
read_range_matches() {
    local img=$1 mnt=$2 off=$3 len=$4 want got
    want="$T/want.$(_seq)"
    got="$want.got"
    ref_range "$img" "$off" "$len" "$want"
    io_timeout dd if="$mnt/disk" of="$got" bs=64k iflag=skip_bytes,count_bytes \
        skip="$off" count="$len" status=none || fail "dd of $len bytes at $off from $mnt/disk failed"
    same_bytes "$got" "$want" "range $off+$len"
    rm -f "$want" "$got"
}

# reads_zero MNT OFF LEN: bytes [OFF, OFF+LEN) of MNT/disk are all zero.
reads_zero() {
    local mnt=$1 off=$2 len=$3 got
    got="$T/zero.$(_seq)"
    io_timeout dd if="$mnt/disk" of="$got" bs=64k iflag=skip_bytes,count_bytes \
        skip="$off" count="$len" status=none || fail "dd of $len bytes at $off from $mnt/disk failed"
    [[ $(stat -c %s "$got") == "$len" ]] || fail "short read at $off: got $(stat -c %s "$got") of $len bytes"
    cmp -s -n "$len" "$got" /dev/zero || fail "hole at $off+$len does not read as zeros"
    rm -f "$got"
}

case_4tib() {
    local img="$T/big.qcow2" cs=65536 mnt="$T/mnt"
    qemu-img create -q -f qcow2 "$img" 4T || fail "test setup: qemu-img create 4T failed"
    # OFF LEN pairs: start of disk, 1 GiB + 4 KiB (spills into a second
    # cluster), across 2 TiB, two adjacent clusters at 3 TiB (written
    # separately, must merge), the last cluster of the disk.
    local writes=(
        0 4096
        $((G + 4 * K)) $((100 * K))
        $((2 * TB - K)) $((2 * K))
        $((3 * TB)) $((64 * K))
        $((3 * TB + 64 * K)) $((64 * K))
        $((4 * TB - 64 * K)) $((64 * K))
    )
    local cmds=() i srcs=("$R1" "$R2" "$X1" "$R3" "$X2" "$R1")
    for ((i = 0; i < ${#writes[@]}; i += 2)); do
        cmds+=("write -s ${srcs[i / 2]} ${writes[i]} ${writes[i + 1]}")
    done
    qio "$img" "${cmds[@]}"
    [[ $(virtual_size "$img") == $((4 * TB)) ]] || fail "test setup: virtual size is not 4 TiB"

    expected_extents "$cs" "${writes[@]}" >"$T/expected"
    # sanity check of the expectation against qemu's own view
    map_extents "$cs" "$img" >"$T/qemu-map"
    if ! cmp -s "$T/expected" "$T/qemu-map"; then
        paste "$T/expected" "$T/qemu-map" >&2
        fail "test setup: computed extents differ from qemu-img map"
    fi

    mount_image "$img" "$mnt" ro
    echo "  time from start to mount ready for a 4 TiB image: ${MOUNT_MS} ms"
    ((MOUNT_MS < 1000)) || fail "mounting the 4 TiB image took ${MOUNT_MS} ms (limit: 1000 ms)"
    [[ $(stat -c %s "$mnt/disk") == $((4 * TB)) ]] \
        || fail "disk size is $(stat -c %s "$mnt/disk"), expected $((4 * TB))"

    check_seekmap "$mnt/disk" "$T/expected" "4 TiB image"

    # every data extent reads like qemu reads it
    local s l
    while read -r s l; do
        read_range_matches "$img" "$mnt" "$s" "$l"
    done <"$T/expected"
    # holes read as zeros (some near data, some far away)
    reads_zero "$mnt" $((64 * K)) $((M - 64 * K))
    reads_zero "$mnt" $((G - M)) "$M"
    reads_zero "$mnt" $((G + 128 * K)) $((64 * K))
    reads_zero "$mnt" $((TB + 12345)) 100000
    reads_zero "$mnt" $((3 * TB + 128 * K)) $((M))
    reads_zero "$mnt" $((4 * TB - M - 64 * K)) "$M"
    # an unaligned read across a data/hole boundary
    read_range_matches "$img" "$mnt" $((2 * TB + 64 * K - 777)) 5000
    # reading at EOF returns nothing
    local n
    n=$(io_timeout dd if="$mnt/disk" bs=4096 iflag=skip_bytes skip=$((4 * TB)) count=1 status=none | wc -c)
    [[ $n == 0 ]] || fail "read at EOF returned $n bytes"
    unmount_image "$mnt"
}

# A small image with every kind of cluster: normal (also one whose content
# is all zeros: still data), zero (allocated and not), compressed, and
# unallocated.  Zero and unallocated clusters are holes, the rest is data.
case_seek_vs_map() {
    local img="$T/img.qcow2" cs=65536 mnt="$T/mnt" vsize=$((64 * M))
    qemu-img create -q -f qcow2 "$img" "$vsize" || fail "test setup: qemu-img create failed"
    qio "$img" \
        "write -s $R1 0 $((5 * cs))" \
        "write -z $cs $cs" \
        "write -z -u $((3 * cs)) $cs" \
        "write -P 0 $((10 * cs)) $((2 * cs))" \
        "write -c -s $X1 $((20 * cs)) $cs" \
        "write -s $X2 $((21 * cs + 5)) 10" \
        "write -z $((30 * cs)) $((4 * cs))" \
        "write -s $R2 $((33 * cs)) $((2 * cs))" \
        "write -s $R3 $((vsize - 100)) 100"
    # data clusters (OFF LEN pairs) left by the writes above
    expected_extents "$cs" \
        0 "$cs" $((2 * cs)) "$cs" $((4 * cs)) "$cs" \
        $((10 * cs)) $((2 * cs)) \
        $((20 * cs)) $((2 * cs)) \
        $((33 * cs)) $((2 * cs)) \
        $((vsize - 100)) 100 >"$T/expected"
    map_extents "$cs" "$img" >"$T/qemu-map"
    if ! cmp -s "$T/expected" "$T/qemu-map"; then
        paste "$T/expected" "$T/qemu-map" >&2
        fail "test setup: computed extents differ from qemu-img map"
    fi
    mount_image "$img" "$mnt" ro
    check_seekmap "$mnt/disk" "$T/expected" "mixed clusters"
    compare_raw "$img" "$mnt"
    unmount_image "$mnt"
}

# cp --sparse=always of a mounted disk: identical content, sparse result.
case_cp_sparse() {
    local img="$T/img.qcow2" mnt="$T/mnt" ref copy="$T/copy.raw" apparent used
    qemu-img create -q -f qcow2 "$img" $((64 * M)) || fail "test setup: qemu-img create failed"
    qio "$img" \
        "write -s $R1 0 $((256 * K))" \
        "write -s $X1 $((10 * M + 3)) $((300 * K))" \
        "write -z $((12 * M)) $((128 * K))" \
        "write -s $R2 $((40 * M)) $((64 * K))" \
        "write -s $R3 $((64 * M - 4096)) 4096"
    ref=$(ref_raw "$img")
    mount_image "$img" "$mnt" ro
    io_timeout cp --sparse=always "$mnt/disk" "$copy" || fail "cp --sparse=always failed"
    same_bytes "$copy" "$ref" "cp --sparse=always copy vs qemu-img convert"
    apparent=$(stat -c %s "$copy")
    used=$(du -B1 "$copy" | cut -f1)
    info "copy: apparent size $apparent, allocated $used bytes"
    ((used < apparent / 4)) || fail "copy is not sparse: $used bytes allocated for $apparent bytes"
    unmount_image "$mnt"
}

make_sources

run_case sparse_4tib case_4tib
run_case seek_data_hole_vs_qemu_map case_seek_vs_map
run_case cp_sparse case_cp_sparse

finish_cases
