#!/usr/bin/env bash
#
# Read-only mounts of many kinds of qcow2 images: the mounted disk must be
# byte-identical to "qemu-img convert -O raw" of the image and have the
# image's virtual size.  Each image kind is a separate case (see the list at
# the bottom); CASE_FILTER='glob' runs a subset.
# shellcheck disable=SC2317  # case functions are called indirectly (run_case)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io cmp od seq
requires_fuse

K=1024
M=$((1024 * 1024))

# l2_span CS [EXT]: guest bytes covered by one L2 table (EXT=1: extended L2,
# 16-byte entries).
l2_span() {
    local cs=$1 ext=${2:-0} esz=8
    ((ext)) && esz=16
    echo $((cs * cs / esz))
}

# create IMG SIZE [OPTS]: qemu-img create -f qcow2.
create() {
    local img=$1 size=$2 opts=${3:-}
    local args=(-q -f qcow2)
    [[ -n $opts ]] && args+=(-o "$opts")
    qemu-img create "${args[@]}" "$img" "$size" >/dev/null \
        || fail "test setup: qemu-img create ${opts:+-o $opts} $img $size failed"
}

# std_writes IMG CS VSIZE [EXT]: a recognisable mix of writes relative to the
# cluster size: multi-cluster, unaligned start/end, inside one cluster,
# single byte, overwrite of earlier data, holes in between, near the end of
# the disk, and across L2-table boundaries when the disk is big enough.
std_writes() {
    local img=$1 cs=$2 vsize=$3 ext=${4:-0} span
    span=$(l2_span "$cs" "$ext")
    local cmds=(
        "write -s $R1 0 $((3 * cs + 1234))"
        "write -P 0xa5 $((5 * cs + 17)) 999"
        "write -s $X1 $((8 * cs - 300)) $((2 * cs + 600))"
        "write -P 0x3c $((12 * cs)) $cs"
        "write -s $R2 $((16 * cs + 511)) 1"
        "write -P 0x7e $((2 * cs + 5)) 100"
        "write -s $R3 $((vsize - 3000)) 3000"
    )
    if ((vsize > span + 2 * cs)); then
        cmds+=("write -s $X2 $((span - 1000)) 5000")
    fi
    if ((vsize > 2 * span + 2 * cs)); then
        cmds+=("write -s $R2 $((2 * span - cs / 2 - 7)) $((cs + 100))")
    fi
    qio "$img" "${cmds[@]}"
}

# check_image IMG [OPTS]: mount (default -o ro), check size and content.
check_image() {
    local img=$1 opts=${2:-ro} vs got
    vs=$(virtual_size "$img")
    [[ -n $vs ]] || fail "test setup: cannot get the virtual size of $img"
    mount_image "$img" "$T/mnt" "$opts"
    got=$(stat -c %s "$T/mnt/disk") || fail "stat $T/mnt/disk failed"
    [[ $got == "$vs" ]] || fail "stat -c %s disk = $got, expected the virtual size $vs"
    compare_raw "$img" "$T/mnt"
    unmount_image "$T/mnt"
}

# info_has IMG REGEX: qemu-img info must match (sanity check of the setup).
info_has() {
    qemu-img info -U "$1" | grep -Eq -- "$2" \
        || fail "test setup: qemu-img info $1 does not show /$2/"
}

# has_compressed IMG: the image must contain compressed clusters.
has_compressed() {
    local out
    out=$(qemu-img check "$1" 2>&1) || fail "test setup: qemu-img check $1 failed: $out"
    grep -Eq '[0-9]+\.[0-9]+% compressed clusters' <<<"$out" || fail "test setup: no compression statistics: $out"
    if grep -Eq ' 0\.00% compressed clusters' <<<"$out"; then
        fail "test setup: $1 has no compressed clusters"
    fi
}

# map_has IMG REGEX: some line of qemu-img map --output=json matches.
map_has() {
    qemu-img map -U --output=json "$1" | grep -Eq -- "$2" \
        || fail "test setup: qemu-img map of $1 has no entry matching /$2/"
}

# ---------------------------------------------------------------------------
# Cases

# Plain image: compat, cluster size, virtual size, extra create options.
case_plain() {
    local compat=$1 cs=$2 vsize=$3 extra=${4:-} img="$T/img.qcow2"
    create "$img" "$vsize" "compat=$compat,cluster_size=$cs${extra:+,$extra}"
    info_has "$img" "compat: $compat"
    info_has "$img" "cluster_size: $cs"
    std_writes "$img" "$cs" "$vsize"
    # a zero write over allocated data (v2: no zero flag, qemu writes zeroes
    # or deallocates) and an unaligned zero write
    qio "$img" "write -z $((12 * cs)) $cs" "write -z $((cs / 2)) $((cs / 4 + 3))"
    check_image "$img"
}

case_refcount() {
    local bits=$1 cs=4096 vsize=$((8 * M)) img="$T/img.qcow2"
    create "$img" "$vsize" "cluster_size=$cs,refcount_bits=$bits"
    info_has "$img" "refcount bits: $bits"
    std_writes "$img" "$cs" "$vsize"
    # enough host clusters for several refcount blocks
    qio "$img" "write -s $R3 $((4 * M)) $((3 * M))"
    check_image "$img"
}

# Compressed clusters: convert of a raw file with compressible text,
# incompressible random data and holes, then compressed and normal writes
# on top (a partial write into a compressed cluster, a zero write over one).
case_compressed() {
    local ctype=$1 cs=$2 img="$T/img.qcow2" src="$T/src.raw" vsize=$((8 * M))
    ((cs >= 2 * M)) && vsize=$((24 * M))
    truncate -s "$vsize" "$src"
    dd if="$X1" of="$src" bs=64k count=40 conv=notrunc status=none
    dd if="$R1" of="$src" bs=4k seek=$((3 * M / 4096)) count=50 conv=notrunc status=none
    dd if="$X2" of="$src" oflag=seek_bytes seek=$((5 * M + 777)) bs=100000 count=10 conv=notrunc status=none
    dd if="$X1" of="$src" oflag=seek_bytes seek=$((vsize - 5000)) bs=5000 count=1 conv=notrunc status=none
    qemu-img convert -c -O qcow2 -o "compression_type=$ctype,cluster_size=$cs" "$src" "$img" \
        || fail "test setup: qemu-img convert -c failed"
    info_has "$img" "compression type: $ctype"
    has_compressed "$img"
    local c_off=$(((vsize / 2 / cs + 1) * cs)) # an unallocated, aligned cluster
    qio "$img" \
        "write -c -s $X2 $c_off $cs" \
        "write -P 0x42 $((cs + 100)) 200" \
        "write -z $((2 * cs)) $cs"
    has_compressed "$img"
    check_image "$img"
}

# Zero clusters (v3): allocated zero clusters (write -z over data),
# unmapped zero clusters (write -z -u), zero flags on unallocated clusters,
# partial zero writes and data written into a zero cluster afterwards.
case_zero() {
    local cs=$1 img="$T/img.qcow2" vsize=$((4 * M))
    create "$img" "$vsize" "compat=1.1,cluster_size=$cs"
    qio "$img" \
        "write -s $R1 0 $((16 * cs))" \
        "write -s $X1 $((40 * cs)) $((4 * cs))" \
        "write -z $cs $cs" \
        "write -z -u $((2 * cs)) $((2 * cs))" \
        "write -z $((5 * cs + 10)) $((cs / 2))" \
        "write -z $((24 * cs)) $((2 * cs))" \
        "write -z -u $((28 * cs)) $cs" \
        "write -z $((41 * cs)) $cs" \
        "write -P 0x61 $((cs + 100)) 50" \
        "write -P 0x62 $((3 * cs)) 10"
    map_has "$img" '"zero": true, "data": false, "offset"'
    map_has "$img" '"present": true, "zero": true, "data": false}'
    check_image "$img"
}

# Three-level chain with a raw base, relative backing names (one into a
# sibling directory), mixed cluster sizes, compressed data in the middle and
# zero writes in the top that must hide backing data.  Mounted from "/".
case_chain() {
    local d="$T/chain"
    mkdir -p "$d/bases" "$d/images"
    truncate -s $((4 * M)) "$d/bases/base.raw"
    dd if="$R1" of="$d/bases/base.raw" bs=64k count=16 conv=notrunc status=none
    dd if="$R2" of="$d/bases/base.raw" oflag=seek_bytes seek=$((1536 * K)) bs=$((512 * K + 333)) count=1 conv=notrunc status=none
    dd if="$X1" of="$d/bases/base.raw" oflag=seek_bytes seek=$((3 * M)) bs=1M count=1 conv=notrunc status=none
    (
        cd "$d/images"
        qemu-img create -q -f qcow2 -b ../bases/base.raw -F raw mid.qcow2 $((4 * M))
        qemu-img create -q -f qcow2 -o cluster_size=4096 -b mid.qcow2 -F qcow2 top.qcow2 $((4 * M))
    ) || fail "test setup: creating the chain failed"
    info_has "$d/images/mid.qcow2" '^backing file: \.\./bases/base\.raw'
    info_has "$d/images/top.qcow2" '^backing file: mid\.qcow2'
    qio "$d/images/mid.qcow2" \
        "write -s $X2 $((64 * K)) $((100 * K))" \
        "write -c -s $X1 $((1 * M)) $((64 * K))" \
        "write -z $((1600 * K)) $((64 * K))" \
        "write -P 0x4d $((3584 * K + 7)) 9000" \
        "write -s $R3 $((2560 * K)) $((128 * K))"
    qio "$d/images/top.qcow2" \
        "write -P 0x7a $((100 * K)) 3000" \
        "write -z 0 $((64 * K))" \
        "write -z -u $((3 * M)) 4096" \
        "write -z $((3584 * K)) 4096" \
        "write -s $R2 $((2 * M)) 5000" \
        "write -z $((2600 * K)) $((8 * K))" \
        "write -s $X2 $((1 * M + 4096)) 4096"
    check_image "$d/images/top.qcow2"
}

# Backing file shorter than the overlay: the tail reads as zeros.
# KIND: raw (1 MiB), raw_unaligned (1 MiB + 1536: a cluster straddles the
# end of the backing file), qcow2 (1 MiB qcow2 backing).
case_short_backing() {
    local kind=$1 d="$T/sb" base
    mkdir -p "$d"
    case $kind in
    raw | raw_unaligned)
        base=base.raw
        local bsize=$((1 * M))
        [[ $kind == raw_unaligned ]] && bsize=$((1 * M + 1536))
        head -c "$bsize" "$R1" >"$d/$base"
        ;;
    qcow2)
        base=base.qcow2
        create "$d/$base" $((1 * M))
        qio "$d/$base" "write -s $R1 0 $((1 * M))" "write -z $((256 * K)) $((64 * K))"
        ;;
    esac
    (cd "$d" && qemu-img create -q -f qcow2 -b "$base" -F "$(img_fmt "$base")" top.qcow2 $((4 * M))) \
        || fail "test setup: creating the overlay failed"
    if [[ $kind == raw_unaligned ]]; then
        # leave the cluster at 1 MiB (straddling the backing EOF) unallocated
        qio "$d/top.qcow2" "write -P 0x51 $((2 * M)) 4096" "write -P 0x52 $((512 * K)) 100"
    else
        qio "$d/top.qcow2" \
            "write -P 0x51 $((2 * M)) 4096" \
            "write -s $X1 $((1 * M - 2000)) 4000" \
            "write -z $((3 * M)) $((64 * K))" \
            "write -P 0x52 $((512 * K)) 100"
    fi
    check_image "$d/top.qcow2"
}

# Extended L2 entries: 32 subclusters per cluster; 4K (and smaller) writes
# at various subclusters, one across a cluster boundary, zero subclusters
# (allocated and unallocated clusters), a compressed cluster, optionally
# over a backing file so that unallocated subclusters show backing data.
case_ext_l2() {
    local cs=$1 backing=$2 d="$T/ext" sc
    sc=$((cs / 32))
    mkdir -p "$d"
    local opts="extended_l2=on,cluster_size=$cs"
    if ((backing)); then
        head -c $((4 * M)) "$R1" >"$d/base.raw"
        (cd "$d" && qemu-img create -q -f qcow2 -o "$opts" -b base.raw -F raw img.qcow2 $((4 * M))) \
            || fail "test setup: qemu-img create failed"
    else
        create "$d/img.qcow2" $((4 * M)) "$opts"
    fi
    info_has "$d/img.qcow2" "extended l2: true"
    local img="$d/img.qcow2"
    qio "$img" \
        "write -P 0x11 $((2 * sc)) $((2 * sc))" \
        "write -s $R2 $((cs + 5 * sc)) $((2 * sc))" \
        "write -s $X1 $((2 * cs - sc)) $((2 * sc))" \
        "write -P 0x22 $((3 * cs + 31 * sc)) $sc" \
        "write -s $X2 $((4 * cs + 300)) 1000" \
        "write -s $R3 $((5 * cs)) $cs" \
        "write -z $((5 * cs + 2 * sc)) $((2 * sc))" \
        "write -z -u $((5 * cs + 10 * sc)) $sc" \
        "write -z $((6 * cs + 3 * sc)) $((3 * sc))" \
        "write -c -s $X1 $((8 * cs)) $cs" \
        "write -z $((9 * cs)) $cs" \
        "write -s $R1 $((12 * cs + 7 * sc)) 4096" \
        "write -s $R2 $((20 * cs)) $((3 * cs + 100))"
    has_compressed "$img"
    check_image "$img"
}

# External data file.  RAW: data_file_raw=on|off.  NAME: abs (absolute
# data file name) or rel (relative name; the daemon is started from the
# image directory, so either way of resolving it finds the file).
case_data_file() {
    local raw=$1 name=$2 d="$T/df" cs=65536 vsize=$((4 * M)) df
    mkdir -p "$d"
    df="$d/data.raw"
    [[ $name == rel ]] && df=data.raw
    (cd "$d" && qemu-img create -q -f qcow2 -o "data_file=$df,data_file_raw=$raw" img.qcow2 "$vsize") \
        || fail "test setup: qemu-img create with data_file failed"
    info_has "$d/img.qcow2" "data file: $df"
    info_has "$d/img.qcow2" "data file raw: $([[ $raw == on ]] && echo true || echo false)"
    # qemu 7.2 resolves a relative data file name against the working
    # directory, so work from the image directory.
    cd "$d"
    std_writes "$d/img.qcow2" "$cs" "$vsize"
    qio "$d/img.qcow2" "write -z $((12 * cs)) $cs" "write -z -u $((16 * cs)) $cs"
    [[ -s $d/data.raw ]] || fail "test setup: data file $d/data.raw was not written"
    if [[ $name == rel ]]; then
        MOUNT_CWD=$d
    fi
    check_image "$d/img.qcow2"
}

# Internal snapshots: the mount shows the active state.
case_snapshot() {
    local img="$T/img.qcow2" a s
    create "$img" $((4 * M))
    qio "$img" "write -s $R1 0 $((512 * K))" "write -s $X1 $((2 * M)) $((100 * K))"
    qemu-img snapshot -c snap1 "$img" || fail "test setup: snapshot -c snap1 failed"
    qio "$img" \
        "write -P 0x21 $((64 * K + 3)) 5000" \
        "write -z $((128 * K)) $((64 * K))" \
        "write -z -u $((256 * K)) $((64 * K))" \
        "write -s $R2 $((3 * M)) $((64 * K))"
    qemu-img snapshot -c snap2 "$img" || fail "test setup: snapshot -c snap2 failed"
    qio "$img" "write -s $X2 $((2 * M + 4096)) 4096" "write -P 0x23 0 512"
    qemu-img snapshot -l "$img" | grep -q snap1 || fail "test setup: snap1 not listed"
    a=$(ref_raw "$img")
    s="$T/snap1.raw"
    qemu-img convert -U -O raw -l snapshot.name=snap1 "$img" "$s" || fail "test setup: convert of snap1 failed"
    if cmp -s "$a" "$s"; then fail "test setup: active state equals snap1"; fi
    rm -f "$a" "$s"
    check_image "$img"
}

# Virtual size 64 MiB + 1536 bytes (not a multiple of the cluster size),
# data up to the very end.
case_odd_size() {
    local img="$T/img.qcow2" vsize=67110400
    create "$img" "$vsize"
    qio "$img" \
        "write -s $R1 $((vsize - 1536)) 1536" \
        "write -s $R2 $((vsize - 70000)) 68000" \
        "write -P 0x44 0 512" \
        "write -s $X1 $((32 * M + 5)) 10000"
    [[ $(virtual_size "$img") == "$vsize" ]] || fail "test setup: virtual size is not $vsize"
    check_image "$img"
}

make_sources

run_case v2_cs64k case_plain 0.10 65536 $((520 * M))
run_case v2_cs512 case_plain 0.10 512 $((2 * M))
run_case v3_cs64k case_plain 1.1 65536 $((520 * M))
run_case v3_cs512 case_plain 1.1 512 $((4 * M))
run_case v3_cs4k case_plain 1.1 4096 $((6 * M))
run_case v3_cs2m case_plain 1.1 $((2 * M)) $((40 * M))
run_case v3_lazy_refcounts case_plain 1.1 65536 $((4 * M)) lazy_refcounts=on
run_case refcount_bits_1 case_refcount 1
run_case refcount_bits_16 case_refcount 16
run_case refcount_bits_64 case_refcount 64
run_case compressed_zlib_cs64k case_compressed zlib 65536
run_case compressed_zlib_cs4k case_compressed zlib 4096
run_case compressed_zlib_cs512 case_compressed zlib 512
run_case compressed_zlib_cs2m case_compressed zlib $((2 * M))
run_case compressed_zstd_cs64k case_compressed zstd 65536
run_case compressed_zstd_cs4k case_compressed zstd 4096
run_case compressed_zstd_cs2m case_compressed zstd $((2 * M))
run_case zero_clusters_cs64k case_zero 65536
run_case zero_clusters_cs512 case_zero 512
run_case backing_chain_3_levels case_chain
run_case short_backing_raw case_short_backing raw
run_case short_backing_raw_unaligned case_short_backing raw_unaligned
run_case short_backing_qcow2 case_short_backing qcow2
run_case extended_l2_cs64k case_ext_l2 65536 0
run_case extended_l2_cs16k case_ext_l2 16384 0
run_case extended_l2_backing case_ext_l2 65536 1
run_case data_file_raw case_data_file on abs
run_case data_file_not_raw case_data_file off abs
run_case data_file_relative_name case_data_file on rel
run_case internal_snapshot case_snapshot
run_case odd_virtual_size case_odd_size

finish_cases
