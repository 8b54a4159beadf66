#!/usr/bin/env bash
# Growing an overlay whose backing file is larger never shows the backing
# file's bytes in the new range: QEMU (since 5.0) makes that range read as
# zeros, also inside a partial last cluster and after a shrink, and refuses
# the growth on a version 2 image (no zero flag).  Each case does the same on
# a copy with qemu-io/qemu-img resize (the oracle) and on the mount with
# dd/truncate, then compares byte for byte, and checks the image afterwards.
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io
requires_fuse

# grow NAME CREATE_OPTS OLD NEW WRITE_OFF [SHRINK]: a 32 MiB backing file
# of 0x5a bytes under an overlay of OLD bytes (qemu-img create CREATE_OPTS);
# 4 KiB of 0x33 written at WRITE_OFF (it allocates, and copies the backing
# file into, the cluster around it), then optionally a shrink to SHRINK, then
# growth to NEW.
case_grow() {
    local name=$1 copts=$2 old=$3 new=$4 woff=$5 shrink=${6:-}
    local base=$T/base.qcow2 ov=$T/ov.qcow2 q=$T/qemu.qcow2 mnt=$T/mnt from
    qemu-img create -q -f qcow2 "$base" 32M
    qio "$base" "write -P 0x5a 0 32M"
    # shellcheck disable=SC2086
    qemu-img create -q -f qcow2 $copts -b "$base" -F qcow2 "$ov" "$old"
    cp "$ov" "$q"

    qio "$q" "write -P 0x33 $woff 4096"
    [[ -n $shrink ]] && qemu-img resize -q --shrink "$q" "$shrink"
    qemu-img resize -q "$q" "$new"

    mount_image "$ov" "$mnt"
    head -c 4096 /dev/zero | tr '\0' '\063' |
        dd of="$mnt/disk" bs=4096 seek=$((woff / 4096)) conv=notrunc status=none
    if [[ -n $shrink ]]; then
        truncate -s "$shrink" "$mnt/disk" || fail "$name: shrink to $shrink refused"
    fi
    truncate -s "$new" "$mnt/disk" || fail "$name: growing to $new failed"
    from=${shrink:-$old}
    [[ $(stat -c %s "$mnt/disk") == "$new" ]] || fail "$name: size $(stat -c %s "$mnt/disk") after truncate"
    # The new range reads as zeros, not as the backing file's 0x5a.
    dd if="$mnt/disk" bs=64k iflag=skip_bytes,count_bytes skip="$from" count=$((new - from)) \
        status=none >"$T/new_range"
    head -c $((new - from)) /dev/zero >"$T/zeros"
    same_bytes "$T/new_range" "$T/zeros" "$name: the range grown from $from to $new (zeros)"
    compare_raw "$q" "$mnt"
    unmount_image "$mnt"
    check_clean "$ov" "$name"
    qemu-img compare -q "$ov" "$q" || fail "$name: image differs from QEMU's resized copy"
    info "$name: grown from $from to $new, zeros as in QEMU's copy"
}

# v2 NAME: on a version 2 overlay the growth is refused, as by QEMU, and the
# image is left as it was; over a backing file shorter than the disk it is
# allowed (nothing shows through).
case_v2() {
    local base=$T/base.qcow2 ov=$T/ov.qcow2 q=$T/qemu.qcow2 mnt=$T/mnt
    qemu-img create -q -f qcow2 "$base" 32M
    qio "$base" "write -P 0x5a 0 32M"
    qemu-img create -q -f qcow2 -o compat=0.10 -b "$base" -F qcow2 "$ov" 10M
    cp "$ov" "$q"
    if qemu-img resize -q "$q" 20M 2>"$T/qemu.err"; then
        fail "test setup: QEMU grew a v2 overlay over a larger backing file (the oracle changed?)"
    fi
    info "QEMU refuses: $(head -n1 "$T/qemu.err")"

    mount_image "$ov" "$mnt"
    if truncate -s 20M "$mnt/disk" 2>"$T/trunc.err"; then
        fail "growing a v2 overlay over a larger backing file succeeded"
    fi
    grep -q "Operation not supported" "$T/trunc.err" || fail "truncate failed otherwise: $(cat "$T/trunc.err")"
    grep -q "version 2" "$DAEMON_LOG" || fail "the daemon did not say why it refused the growth"
    [[ $(stat -c %s "$mnt/disk") == $((10 << 20)) ]] || fail "size changed by the refused growth"
    compare_raw "$q" "$mnt"
    unmount_image "$mnt"
    check_clean "$ov" "v2 refused"
    qemu-img compare -q "$ov" "$q" || fail "the refused growth changed the image"

    # A backing file shorter than the disk: growth is allowed, as in QEMU.
    rm -f "$ov" "$q"
    qemu-img create -q -f qcow2 -o compat=0.10 -b "$base" -F qcow2 "$ov" 40M
    cp "$ov" "$q"
    qemu-img resize -q "$q" 48M
    mount_image "$ov" "$mnt"
    truncate -s 48M "$mnt/disk" || fail "growing a v2 overlay past its shorter backing file failed"
    compare_raw "$q" "$mnt"
    unmount_image "$mnt"
    check_clean "$ov" "v2 over a shorter backing file"
    qemu-img compare -q "$ov" "$q" || fail "v2: image differs from QEMU's resized copy"
}

M=$((1 << 20))
run_case aligned case_grow aligned "" $((10 * M)) $((40 * M)) $((10 * M - 4096))
run_case unaligned case_grow unaligned "" $((10 * M + 4608)) $((20 * M)) $((10 * M))
run_case unaligned_unallocated case_grow unaligned_unallocated "" $((10 * M + 4608)) $((10 * M + 65536)) $((1 * M))
run_case unaligned_extl2 case_grow unaligned_extl2 "-o extended_l2=on" $((10 * M + 4608)) $((20 * M)) $((10 * M))
run_case shrink_then_grow case_grow shrink_then_grow "" $((16 * M)) $((20 * M)) $((1 * M)) $((10 * M + 4608))
run_case v2 case_v2
finish_cases
