#!/usr/bin/env bash
# Discard, zeroing and resize: hole punches and zero ranges at any offset and
# length read back as zeros (never backing data) on every writable image
# kind, mirrored onto a raw copy with the same fallocate calls; freed space
# goes back to the host; SEEK_DATA/SEEK_HOLE stay exact; the disk grows with
# truncate and refuses to shrink over data.  An L2 entry naming metadata or
# an unaligned offset is reported as corruption and frees nothing.
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io

# mix KIND: create the image kind, pre-fill it, run fallocmix, compare.
case_mix() {
    local kind=$1 seed=$2 opts=${3:-} img=$T/img.qcow2 mnt=$T/mnt raw=$T/mirror.raw
    local fm
    fm=$(require_tool fallocmix)
    case $kind in
    v3) qemu-img create -q -f qcow2 "$img" 64M ;;
    v2) qemu-img create -q -f qcow2 -o compat=0.10 "$img" 64M ;;
    c512) qemu-img create -q -f qcow2 -o cluster_size=512 "$img" 64M ;;
    c2m) qemu-img create -q -f qcow2 -o cluster_size=2M "$img" 64M ;;
    extl2) qemu-img create -q -f qcow2 -o extended_l2=on "$img" 64M ;;
    backing | backing_v2 | backing_extl2)
        qemu-img create -q -f raw "$T/base.raw" 64M
        qio "$T/base.raw" "write -P 0xba 0 64M"
        local o=""
        [[ $kind == backing_v2 ]] && o="-o compat=0.10"
        [[ $kind == backing_extl2 ]] && o="-o extended_l2=on"
        # shellcheck disable=SC2086
        qemu-img create -q -f qcow2 $o -b "$T/base.raw" -F raw "$img"
        ;;
    compressed)
        qemu-img create -q -f qcow2 "$T/plain.qcow2" 64M
        qio "$T/plain.qcow2" "write -P 0x11 0 64M"
        qemu-img convert -c -O qcow2 "$T/plain.qcow2" "$img"
        ;;
    datafile)
        qemu-img create -q -f qcow2 -o data_file="$T/data.raw",data_file_raw=on "$img" 64M
        ;;
    esac
    # Some data everywhere, so punches have something to remove.
    [[ $kind == compressed ]] || qio "$img" "write -P 0x5e 1M 20M" "write -z 30M 2M"
    ref_raw "$img" "$raw" >/dev/null
    mount_image "$img" "$mnt" "$opts"
    io_timeout "$fm" "$mnt/disk" "$raw" "$seed" 400 3145728 || fail "fallocmix on $kind failed"
    unmount_image "$mnt"
    check_clean "$img" "$(basename "$img")"
    qemu-img compare -q "$img" "$raw" || fail "$kind: image differs from the mirrored raw copy"
    if [[ $kind == backing* ]]; then
        cmp -s "$T/base.raw" <(head -c 64M /dev/zero | tr '\0' '\272') ||
            fail "$kind: the backing file was modified"
    fi
    info "$kind${opts:+ ($opts)}: fallocmix seed $seed identical, check clean"
}

case_space() {
    local img=$T/space.qcow2 mnt=$T/mnt before after
    qemu-img create -q -f qcow2 "$img" 256M
    mount_image "$img" "$mnt"
    dd if=/dev/urandom of="$mnt/disk" bs=1M count=64 conv=notrunc,fsync status=none
    before=$(du -k "$img" | cut -f1)
    fallocate --punch-hole --offset 0 --length 64M "$mnt/disk"
    "$(require_tool fsyncfile)" "$mnt/disk"
    after=$(du -k "$img" | cut -f1)
    info "du: ${before} KiB after writing 64 MiB, ${after} KiB after punching it"
    ((before - after >= 60 * 1024)) || fail "punching 64 MiB freed only $((before - after)) KiB"
    cmp -n $((64 << 20)) "$mnt/disk" /dev/zero || fail "punched range does not read as zeros"
    unmount_image "$mnt"
    check_clean "$img" "$(basename "$img")"
}

case_seek_after_discard() {
    local img=$T/seek.qcow2 mnt=$T/mnt got want
    qemu-img create -q -f qcow2 "$img" 64M
    mount_image "$img" "$mnt"
    for off in 1 8 20; do
        dd if=/dev/urandom of="$mnt/disk" bs=1M count=2 seek="$off" conv=notrunc status=none
    done
    fallocate --punch-hole --offset $((8 << 20)) --length $((2 << 20)) "$mnt/disk"
    fallocate --zero-range --keep-size --offset $((20 << 20)) --length $((1 << 20)) "$mnt/disk"
    got=$("$(require_tool seekmap)" "$mnt/disk")
    want=$(printf '%s %s\n' $((1 << 20)) $((2 << 20)) $((21 << 20)) $((1 << 20)))
    [[ $got == "$want" ]] || fail "SEEK_DATA extents after discards: got [$got], want [$want]"
    unmount_image "$mnt"
    check_clean "$img" "$(basename "$img")"
}

case_resize() {
    local img=$T/resize.qcow2 mnt=$T/mnt size
    qemu-img create -q -f qcow2 "$img" 64M
    qio "$img" "write -P 0x77 0 1M"
    mount_image "$img" "$mnt"
    truncate -s +1G "$mnt/disk"
    size=$(stat -c %s "$mnt/disk")
    ((size == (64 << 20) + (1 << 30))) || fail "size after truncate -s +1G is $size"
    printf 'end of the grown disk' | dd of="$mnt/disk" bs=1 seek=$((size - 100)) conv=notrunc status=none
    # Shrinking over data is refused; over unallocated space it works.
    if truncate -s 512K "$mnt/disk" 2>"$T/shrink.err"; then
        fail "shrinking over allocated data succeeded"
    fi
    info "shrink over data refused: $(head -n1 "$T/shrink.err")"
    truncate -s $((1 << 30)) "$mnt/disk" 2>"$T/shrink.err" && fail "shrink cutting off the written end succeeded"
    dd if=/dev/zero of="$mnt/disk" bs=100 count=1 seek=$(((size - 100) / 100)) conv=notrunc status=none
    fallocate --punch-hole --offset $((size - 65536)) --length 65536 "$mnt/disk"
    truncate -s $((512 << 20)) "$mnt/disk" || fail "shrinking over unallocated clusters was refused"
    unmount_image "$mnt"
    check_clean "$img" "$(basename "$img")"
    [[ $(virtual_size "$img") == $((512 << 20)) ]] || fail "qemu-img info shows $(virtual_size "$img") bytes"
    # Grow past what the L1 table maps (64K clusters: 512 MiB per L1 entry).
    mount_image "$img" "$mnt"
    truncate -s 100G "$mnt/disk"
    dd if=/dev/urandom of="$T/tail" bs=64k count=1 status=none
    dd if="$T/tail" of="$mnt/disk" bs=64k seek=$(((100 << 30) / 65536 - 1)) conv=notrunc status=none
    unmount_image "$mnt"
    check_clean "$img" "$(basename "$img")"
    [[ $(virtual_size "$img") == $((100 << 30)) ]] || fail "qemu-img info shows $(virtual_size "$img") after growing to 100G"
    ref_range "$img" $(((100 << 30) - 65536)) 65536 "$T/got"
    cmp "$T/got" "$T/tail" || fail "data written at the end of the grown disk differs"
    ref_range "$img" 0 $((1 << 20)) "$T/head"
    cmp "$T/head" <(head -c 1M /dev/zero | tr '\0' '\167') || fail "data before the resize changed"
}

case_detect_zeroes() {
    local img=$T/dz.qcow2 mnt=$T/mnt before after
    qemu-img create -q -f qcow2 "$img" 64M
    qio "$img" "write -P 0x42 0 16M"
    before=$(du -k "$img" | cut -f1)
    mount_image "$img" "$mnt" detect-zeroes=unmap
    dd if=/dev/zero of="$mnt/disk" bs=1M count=16 conv=notrunc,fsync status=none
    unmount_image "$mnt"
    after=$(du -k "$img" | cut -f1)
    info "detect-zeroes=unmap: du ${before} KiB -> ${after} KiB"
    ((before - after >= 15 * 1024)) || fail "all-zero writes did not free the clusters"
    check_clean "$img" "$(basename "$img")"
    ref_range "$img" 0 $((16 << 20)) "$T/z"
    cmp -n $((16 << 20)) "$T/z" /dev/zero || fail "zeroed range does not read as zeros"
}

# corrupt_entry NAME OP ENTRY_HEX VICTIM_CLUSTERS...: an image made by QEMU
# (header, refcount table, refcount block, L1, L2 at clusters 0-4; guest
# clusters 0 and 1 at host clusters 5 and 6) whose L2 entry of guest cluster
# 2 is set to ENTRY_HEX; then OP (punch or zero) over guest cluster 2 must
# fail with EIO and free nothing: the victims' refcounts and qemu-img
# check's report are what they were before the mount, and guest clusters 0
# and 1 still hold their data.
case_corrupt_entry() {
    local name=$1 op=$2 entry=$3 img=$T/ce.qcow2 mnt=$T/mnt mt l2e c rc
    shift 3
    mt=$(require_tool mutate)
    qemu-img create -q -f qcow2 "$img" 64M
    qio "$img" "write -P 0xaa 0 64k" "write -P 0xbb 64k 64k"
    [[ $("$mt" --l2entry "$img" 0) == "262144 8000000000050000" ]] || fail "test setup: unexpected layout"
    [[ $("$mt" --l2entry "$img" 65536) == "262152 8000000000060000" ]] || fail "test setup: unexpected layout"
    read -r l2e _ < <("$mt" --l2entry "$img" 131072)
    "$mt" "$img" "$l2e" "$entry"
    local -A before=()
    for c in "$@"; do before[$c]=$("$mt" --refcount "$img" "$c"); done
    rc=0
    qemu-img check "$img" >"$T/check.before" 2>&1 || rc=$?
    ((rc == 2)) || fail "test setup: qemu-img check exit status $rc on the damaged image (expected 2)"

    mount_image "$img" "$mnt"
    local args=(--punch-hole)
    [[ $op == zero ]] && args=(--zero-range --keep-size)
    if fallocate "${args[@]}" --offset 131072 --length 65536 "$mnt/disk" 2>"$T/falloc.err"; then
        fail "$name: $op over the corrupt entry succeeded"
    fi
    grep -q "Input/output error" "$T/falloc.err" || fail "$name: $op failed otherwise: $(cat "$T/falloc.err")"
    grep -q "corrupt image metadata: .*guest offset 0x20000" "$DAEMON_LOG" ||
        fail "$name: no corruption report naming guest offset 0x20000"
    info "$name: $(grep -m1 -o 'corrupt image metadata: .*' "$DAEMON_LOG" | cut -c1-200)"
    unmount_image "$mnt"

    for c in "$@"; do
        [[ $("$mt" --refcount "$img" "$c") == "${before[$c]}" ]] ||
            fail "$name: refcount of host cluster $c changed from ${before[$c]} to $("$mt" --refcount "$img" "$c")"
    done
    rc=0
    qemu-img check "$img" >"$T/check.after" 2>&1 || rc=$?
    ((rc == 2)) || fail "$name: qemu-img check exit status $rc after the mount (expected 2)"
    diff -u "$T/check.before" "$T/check.after" >&2 || fail "$name: qemu-img check reports differ"
    # The victims' guest data (QEMU reads guest cluster 2 of an unaligned
    # entry as an error: only guest clusters 0 and 1 are compared).
    ref_range "$img" 0 131072 "$T/view.after"
    { head -c 65536 /dev/zero | tr '\0' '\252'; head -c 65536 /dev/zero | tr '\0' '\273'; } >"$T/view.want"
    same_bytes "$T/view.after" "$T/view.want" "$name: guest clusters 0 and 1"
}

run_case mix_v3 case_mix v3 101
run_case mix_v2 case_mix v2 102
run_case mix_c512 case_mix c512 103
run_case mix_c2m case_mix c2m 104
run_case mix_extl2 case_mix extl2 105
run_case mix_backing case_mix backing 106
run_case mix_backing_v2 case_mix backing_v2 107
run_case mix_backing_extl2 case_mix backing_extl2 108
run_case mix_compressed case_mix compressed 109
run_case mix_datafile_raw case_mix datafile 110
run_case mix_discard_ignore case_mix v3 111 discard=ignore
run_case space_returned case_space
run_case seek_after_discard case_seek_after_discard
run_case resize case_resize
run_case detect_zeroes case_detect_zeroes
# Entries naming the L2 table itself, the refcount block, and an unaligned
# offset straddling guest clusters 0 and 1's host clusters.
run_case corrupt_entry_l2 case_corrupt_entry corrupt_entry_l2 punch 0000000000040000 4 5 6
run_case corrupt_entry_refblock case_corrupt_entry corrupt_entry_refblock zero 0000000000020000 2 5 6
run_case corrupt_entry_unaligned case_corrupt_entry corrupt_entry_unaligned punch 8000000000050200 5 6
finish_cases
