#!/usr/bin/env bash
# Persistent dirty bitmaps are kept, as QEMU keeps them (issue 14, item 3).
# QEMU is the oracle: the same writes, zero ranges and punches go through
# the daemon on one image and through qemu-io on a copy; both images'
# bitmaps, exported by qemu-storage-daemon over NBD and read with
# "nbdinfo --map=qemu:dirty-bitmap:NAME", must show the same dirty extents
# (a 64 KiB and a 4 KiB enabled bitmap), a disabled bitmap keeps its bits,
# and qemu-img check stays clean with no leaks.  A daemon killed with
# SIGKILL leaves the enabled bitmaps in use (qemu-img info says in-use), a
# later writable mount leaves them so (as QEMU does), and a bitmap with a
# flag we do not know refuses the writable mount, as QEMU refuses it, while
# a read-only mount still reads.
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io qemu-storage-daemon nbdinfo

M=$((1024 * 1024))
SIZE=$((64 * M))

# make_image IMG [CLUSTER_SIZE]: 64 MiB with bitmaps b64 (64 KiB) and b4
# (4 KiB) enabled and "off" (64 KiB) disabled, each already holding bits
# from a qemu-io write.
make_image() {
    local img=$1 cs=${2:-65536}
    qemu-img create -q -f qcow2 -o cluster_size="$cs" "$img" "$SIZE"
    qemu-img bitmap --add -g 65536 "$img" b64
    qemu-img bitmap --add -g 4096 "$img" b4
    qemu-img bitmap --add -g 65536 "$img" off
    qio "$img" "write -P 0x11 $((8 * M)) 12288"
    qemu-img bitmap --disable "$img" off
}

# bitmap_maps IMG OUT: the dirty extents of every bitmap of IMG, one
# "NAME: nbdinfo line" per extent, from qemu-storage-daemon's NBD export.
bitmap_maps() {
    local img=$1 out=$2 sockdir sock pid i b
    # A unix socket path must stay below 108 bytes: not under $T.
    sockdir=$(mktemp -d /tmp/qcow2fuse-nbd.XXXXXX)
    sock=$sockdir/s
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f,filename=$img,read-only=on" \
        --blockdev driver=qcow2,node-name=q,file=f,read-only=on \
        --nbd-server "addr.type=unix,addr.path=$sock" \
        --export type=nbd,id=e,node-name=q,bitmaps.0=b64,bitmaps.1=b4,bitmaps.2=off \
        </dev/null >"$T/qsd.log" 2>&1 &
    pid=$!
    _PIDS+=("$pid")
    for ((i = 0; i < 500; i++)); do
        [[ -S $sock ]] && break
        pid_alive "$pid" || { cat "$T/qsd.log" >&2; fail "qemu-storage-daemon exited on $img"; }
        sleep 0.02
    done
    [[ -S $sock ]] || fail "qemu-storage-daemon did not listen on $sock"
    : >"$out"
    for b in b64 b4 off; do
        nbdinfo --map="qemu:dirty-bitmap:$b" "nbd+unix:///q?socket=$sock" | sed "s/^/$b: /" >>"$out" \
            || fail "nbdinfo --map=qemu:dirty-bitmap:$b on $img failed"
    done
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "$sockdir"
}

# in_use IMG NAME: prints 1 when qemu-img info shows NAME's in-use flag.
in_use() {
    qemu-img info -U --output=json "$1" | tr -d ' \n' \
        | grep -q "\"flags\":\[\"in-use\"[^]]*\],\"name\":\"$2\"" && echo 1 || echo 0
}

# pattern BYTE LEN OUT: LEN bytes of BYTE (as qemu-io write -P BYTE).
pattern() {
    head -c "$2" /dev/zero | tr '\0' "\\$(printf '%03o' "$1")" >"$3"
}

# The same changes through the daemon (MNT/disk) and through qemu-io.
# Each: kind offset length; unaligned at both granularities where it can be.
OPS=(
    "write 100000 5000"
    "write $((M + 32768)) 65536"
    "zero $((2 * M + 4096)) 204800"
    "punch $((4 * M)) 131072"
    "punch $((6 * M + 4096)) 8192"
    "write $((SIZE - 1)) 1"
)

ops_on_disk() {
    local disk=$1 op kind off len
    for op in "${OPS[@]}"; do
        read -r kind off len <<<"$op"
        case $kind in
        write)
            pattern 0x5a "$len" "$T/pat"
            dd if="$T/pat" of="$disk" bs=64k oflag=seek_bytes seek="$off" conv=notrunc status=none \
                || fail "dd write at $off failed"
            ;;
        zero) fallocate -z -o "$off" -l "$len" "$disk" || fail "fallocate -z at $off failed" ;;
        punch) fallocate -p -o "$off" -l "$len" "$disk" || fail "fallocate -p at $off failed" ;;
        esac
    done
}

ops_qemu_io() {
    local img=$1 op kind off len cmds=()
    for op in "${OPS[@]}"; do
        read -r kind off len <<<"$op"
        case $kind in
        write) cmds+=("write -P 0x5a $off $len") ;;
        zero) cmds+=("write -z $off $len") ;;
        punch) cmds+=("discard $off $len") ;;
        esac
    done
    qio_unmap "$img" "${cmds[@]}"
}

# case_same_extents CLUSTER_SIZE (512: the 4 KiB bitmap's data spans
# several clusters, so its table has several entries)
case_same_extents() {
    local img=$T/fuse.qcow2 ref=$T/qemu.qcow2 mnt=$T/mnt b
    make_image "$img" "$1"
    cp "$img" "$ref"
    bitmap_maps "$img" "$T/before.map"
    grep -q '^off: .*dirty' "$T/before.map" || fail "setup: the disabled bitmap has no bits"

    mount_image "$img" "$mnt"
    [[ $(in_use "$img" b64) == 0 ]] || fail "b64 in use before any write"
    ops_on_disk "$mnt/disk"
    [[ $(in_use "$img" b64) == 1 && $(in_use "$img" b4) == 1 ]] \
        || fail "the enabled bitmaps are not marked in use after the first write"
    [[ $(in_use "$img" off) == 0 ]] || fail "the disabled bitmap was marked in use"
    # Resizing would need the bitmaps resized: refused, logged.
    if truncate -s $((2 * SIZE)) "$mnt/disk" 2>/dev/null; then
        fail "resize of an image with persistent bitmaps succeeded"
    fi
    grep -q 'resize to .* refused: the image has 3 persistent dirty bitmaps' "$DAEMON_LOG" \
        || fail "resize refusal not logged"
    unmount_image "$mnt"

    ops_qemu_io "$ref"
    for b in b64 b4 off; do
        [[ $(in_use "$img" "$b") == 0 ]] || fail "bitmap $b still in use after a clean unmount"
    done
    check_clean "$img" "after the daemon's writes"
    check_clean "$ref" "after qemu-io's writes (the oracle)"
    qemu-img compare -q "$img" "$ref" || fail "content differs from qemu-io's"

    bitmap_maps "$img" "$T/fuse.map"
    bitmap_maps "$ref" "$T/qemu.map"
    if ! diff -u "$T/qemu.map" "$T/fuse.map" >&2; then
        fail "dirty extents differ from QEMU's (- qemu-io, + qcow2fuse)"
    fi
    # Not vacuous: every enabled bitmap gained extents, the disabled one did not change.
    for b in b64 b4; do
        (($(grep -c "^$b: .*dirty" "$T/fuse.map") > $(grep -c "^$b: .*dirty" "$T/before.map"))) \
            || fail "bitmap $b gained no dirty extents"
    done
    diff <(grep '^off:' "$T/before.map") <(grep '^off:' "$T/fuse.map") >&2 \
        || fail "the disabled bitmap changed"
    info "dirty extents equal to QEMU's: $(grep -c dirty "$T/fuse.map") dirty extents in 3 bitmaps"

    # A second mount starts from the stored bitmaps and adds to them; its
    # only change is a zero range over zeros, which leaves the image as it
    # is and is still marked (as QEMU marks it).
    mount_image "$img" "$mnt"
    fallocate -z -o $((40 * M)) -l 4096 "$mnt/disk" || fail "fallocate -z at 40M failed"
    unmount_image "$mnt"
    qio_unmap "$ref" "write -z $((40 * M)) 4096"
    check_clean "$img" "after a second mount"
    bitmap_maps "$img" "$T/fuse2.map"
    bitmap_maps "$ref" "$T/qemu2.map"
    diff -u "$T/qemu2.map" "$T/fuse2.map" >&2 || fail "dirty extents differ after a second mount"
}

case_crash_in_use() {
    local img=$T/crash.qcow2 mnt=$T/mnt pid
    make_image "$img"
    mount_image "$img" "$mnt"
    pid=${_MNT_PID[$(canon_path "$mnt")]}
    dd if=/dev/urandom of="$mnt/disk" bs=64k count=4 seek=10 conv=notrunc,fsync status=none
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
    unset "_MNT_PID[$(canon_path "$mnt")]"
    fusermount3 -uz "$mnt" 2>/dev/null || true
    [[ $(in_use "$img" b64) == 1 && $(in_use "$img" b4) == 1 ]] \
        || fail "after SIGKILL the enabled bitmaps are not in use"
    [[ $(in_use "$img" off) == 0 ]] || fail "after SIGKILL the disabled bitmap is in use"
    qemu-img info "$img" | grep -q 'in-use' || fail "qemu-img info does not show in-use"
    check_clean "$img" "after SIGKILL"
    info "after SIGKILL: b64 and b4 in use (inconsistent for QEMU), off not"

    # QEMU opens such an image writable and leaves the bitmaps in use; so do we.
    mount_image "$img" "$mnt"
    grep -q "bitmap 'b64' is marked in use" "$DAEMON_LOG" || fail "no warning about the in-use bitmap"
    dd if=/dev/urandom of="$mnt/disk" bs=64k count=1 seek=20 conv=notrunc status=none
    unmount_image "$mnt"
    [[ $(in_use "$img" b64) == 1 ]] || fail "an in-use bitmap was cleared without being tracked"
    check_clean "$img" "after a mount of the crashed image"
}

# dir_entry_flags_offset IMG: the file offset of the first bitmap directory
# entry's flags field (from the bitmaps header extension).
dir_entry_flags_offset() {
    local img=$1 off type len hlen dir
    hlen=$(od -An -t u4 --endian=big -j100 -N4 "$img" | tr -d ' ')
    off=$hlen
    while :; do
        type=$(od -An -t x4 --endian=big -j "$off" -N4 "$img" | tr -d ' ')
        len=$(od -An -t u4 --endian=big -j $((off + 4)) -N4 "$img" | tr -d ' ')
        [[ $type != 00000000 ]] || fail "no bitmaps extension in $img"
        if [[ $type == 23852875 ]]; then
            dir=$(od -An -t u8 --endian=big -j $((off + 8 + 16)) -N8 "$img" | tr -d ' ')
            echo $((dir + 12))
            return
        fi
        off=$((off + 8 + (len + 7) / 8 * 8))
    done
}

case_unknown_flag() {
    local img=$T/flag.qcow2 mnt=$T/mnt raw=$T/ref.raw pos
    make_image "$img"
    qio "$img" "write -P 0x33 0 1M"
    ref_raw "$img" "$raw" >/dev/null
    pos=$(dir_entry_flags_offset "$img")
    # b64's flags: auto (bit 1) and bit 3, reserved.
    printf '\x00\x00\x00\x0a' | dd of="$img" bs=1 seek="$pos" conv=notrunc status=none
    if qemu-io -c 'write 0 4k' "$img" >"$T/qemu-io.out" 2>&1; then
        fail "setup: QEMU opened the image with an unknown bitmap flag for writing"
    fi
    info "QEMU refuses it too: $(head -n1 "$T/qemu-io.out")"
    expect_refusal "$img" "$mnt"
    stderr_mentions "bitmap 'b64'" "flags \(byte 12\) 0xa has unknown bits 0x8" "-o ro"
    mount_image "$img" "$mnt" ro
    same_bytes "$mnt/disk" "$raw" "read-only mount of an image with an unknown bitmap flag"
    unmount_image "$mnt"
    [[ $(od -An -t x1 -j "$pos" -N4 "$img" | tr -d ' ') == 0000000a ]] \
        || fail "the refused image was changed"
}

run_case same_extents case_same_extents 65536
run_case same_extents_512 case_same_extents 512
run_case crash_in_use case_crash_in_use
run_case unknown_flag case_unknown_flag
finish_cases
