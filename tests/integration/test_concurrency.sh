#!/usr/bin/env bash
# Concurrency must stay correct: fio's own integrity check (4 jobs x libaio
# QD16, random writes of 4k-64k, verified while writing, then again after an
# unmount and remount), and a stress tool that races writes, reads, hole
# punches, zero ranges and fsyncs from 8 threads over the same clusters,
# for STRESS_SECONDS (default 8) per case.
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img
STRESS_SECONDS=${STRESS_SECONDS:-8}

case_fio_verify() {
    requires fio
    local img=$T/fio.qcow2 mnt=$T/mnt
    local -a job=(--filename="$mnt/disk" --direct=1 --ioengine=libaio --iodepth=16
                  --numjobs=4 --size=48M --offset_increment=48M --rw=randwrite
                  --bsrange=4k-64k --bs_unaligned=0 --randrepeat=1 --randseed=4242
                  --verify=crc32c --verify_backlog=256 --verify_fatal=1
                  --verify_state_save=1 --group_reporting)
    qemu-img create -q -f qcow2 "$img" 256M
    mount_image "$img" "$mnt"
    # verify_state files land in the working directory.
    (cd "$T" && io_timeout fio --name=conc "${job[@]}" --output="$T/fio1.log") ||
        { cat "$T/fio1.log" >&2; fail "fio write+verify failed"; }
    grep -E 'err= *0' "$T/fio1.log" >/dev/null || { cat "$T/fio1.log" >&2; fail "fio reported errors"; }
    info "fio: $(grep -oE 'WRITE: bw=[^,]*' "$T/fio1.log" | head -1)"
    unmount_image "$mnt"
    check_clean "$img" "$(basename "$img")"
    mount_image "$img" "$mnt"
    (cd "$T" && io_timeout fio --name=conc "${job[@]}" --verify_only --verify_state_load=1 \
        --output="$T/fio2.log") || { cat "$T/fio2.log" >&2; fail "fio --verify_only after remount failed"; }
    grep -E 'err= *0' "$T/fio2.log" >/dev/null || { cat "$T/fio2.log" >&2; fail "fio verify_only reported errors"; }
    info "fio --verify_only after remount: clean"
    unmount_image "$mnt"
    check_clean "$img" "$(basename "$img")"
}

# stress KIND CREATE_OPTS [BACKING]
run_stress() {
    require_tool stress >/dev/null
    local img=$T/s.qcow2 mnt=$T/mnt region=$((8 * 1024 * 1024)) out
    if [[ -n ${3:-} ]]; then
        qemu-img create -q -f raw "$T/base.raw" 64M
        qio "$T/base.raw" "write -P 0x3c 0 64M"
        qemu-img create -q -f qcow2 -o "$2" -b "$T/base.raw" -F raw "$img"
    else
        qemu-img create -q -f qcow2 -o "$2" "$img" 64M
    fi
    mount_image "$img" "$mnt"
    out=$(io_timeout "$TOOLS/stress" "$mnt/disk" "$region" 8 "$STRESS_SECONDS" "${RANDOM}" "$T/shadow.raw") ||
        { echo "$out" >&2; fail "stress found mismatches or failed"; }
    info "$out"
    unmount_image "$mnt"
    check_clean "$img" "$(basename "$img")"
    qemu-img convert -O raw "$img" "$T/final.raw"
    cmp -n "$region" "$T/final.raw" "$T/shadow.raw" ||
        fail "image content after unmount differs from what the threads wrote"
}

run_case fio_verify case_fio_verify
run_case stress_v3_64k run_stress v3 cluster_size=65536
run_case stress_4k_backing run_stress backing cluster_size=4096 yes
run_case stress_extl2_backing run_stress extl2 extended_l2=on,cluster_size=65536 yes
finish_cases
