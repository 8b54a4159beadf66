#!/usr/bin/env bash
# FUSE over io_uring (-o transport=io_uring): the test turns the kernel's
# switch on (/sys/module/fuse/parameters/enable_uring, restored on exit),
# mounts on the ring and proves from the daemon's own log that the requests
# went through it (the ring's start line and a served-request count that
# covers the I/O done, not a silent fallback to /dev/fuse reads); writes,
# reads, fsync and discards through it match a raw mirror that got the same
# calls, and qemu-img (check, compare, convert) agrees.  With the switch off
# the daemon refuses transport=io_uring naming the switch, and auto mounts
# on the classic transport.  SIGTERM while a writer is busy unmounts and
# exits 0 with the ring's threads gone.  SKIP (with the reason) when the
# kernel has no io_uring support for FUSE or the switch cannot be set.
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires_fuse
requires qemu-img qemu-io fallocate

SWITCH=/sys/module/fuse/parameters/enable_uring
[[ -e $SWITCH ]] || skip "$SWITCH is missing: this kernel has no FUSE over io_uring (CONFIG_FUSE_IO_URING, Linux 6.14+)"
[[ -w $SWITCH ]] || skip "$SWITCH is not writable (needs root)"
OLD_SWITCH=$(cat "$SWITCH")

# set_switch Y|N
set_switch() {
    echo "$1" >"$SWITCH" 2>/dev/null || skip "cannot write $1 to $SWITCH"
    [[ $(cat "$SWITCH") == "$1" ]] || skip "$SWITCH does not keep the value $1"
}
restore_switch() { echo "$OLD_SWITCH" >"$SWITCH" 2>/dev/null || true; }
# The test's EXIT trap (functions.sh's cleanup) also puts the switch back,
# whatever way the test ends; the cases run in subshells and leave it to it.
cleanup_and_restore() {
    local rc=$?
    restore_switch
    (exit "$rc")
    cleanup
}
trap cleanup_and_restore EXIT

SRC=$TEST_TMP/src
head -c $((6 << 20)) /dev/urandom >"$SRC"

# ring_requests LOG: the count of the daemon's "N requests served through
# the ring" line (empty when there is none).
ring_requests() {
    sed -n 's/.*io_uring: \([0-9][0-9]*\) requests served through the ring.*/\1/p' "$1" | tail -n1
}

# on_both DISK RAW CMD...: run CMD with @F@ in its words replaced by the
# disk file, then by the mirror.
on_both() {
    local disk=$1 raw=$2
    shift 2
    io_timeout "${@//@F@/$disk}" || fail "$* on the disk file failed"
    "${@//@F@/$raw}" || fail "test setup: $* on the mirror failed"
}

# case_ring_io [LAYOUT]: with QCOW2FUSE_URING_LAYOUT=LAYOUT (the ring
# threads' layout: threads=N, depth=N, spread, pin, ...; see fuse_uring.h).
case_ring_io() {
    local img=$T/img.qcow2 raw=$T/mirror.raw mnt=$T/mnt fs n
    fs=$(require_tool fsyncfile)
    export QCOW2FUSE_URING_LAYOUT=${1:-}
    set_switch Y
    qemu-img create -q -f qcow2 "$img" 64M
    qio "$img" "write -P 0x33 0 16M"
    ref_raw "$img" "$raw" >/dev/null
    mount_image "$img" "$mnt" transport=io_uring
    if grep -qi "does not offer FUSE over io_uring" "$DAEMON_LOG"; then
        skip "the kernel did not offer FUSE_OVER_IO_URING in FUSE_INIT although $SWITCH is Y: $(grep -i io_uring "$DAEMON_LOG" | head -n1)"
    fi
    grep -Eq 'io_uring: [0-9]+ queues, [0-9]+ threads' "$DAEMON_LOG" ||
        { sed 's/^/    | /' "$DAEMON_LOG" >&2; fail "the daemon's log does not show the ring starting"; }
    info "$(grep -m1 'io_uring: [0-9]* queues' "$DAEMON_LOG" | sed 's/^.*io_uring/io_uring/')"
    # Direct and buffered writes at unaligned places, a large one, holes
    # punched and a range zeroed, with fsyncs in between.
    on_both "$mnt/disk" "$raw" dd if="$SRC" bs=1M count=6 seek=3 conv=notrunc,fsync oflag=direct status=none of=@F@
    on_both "$mnt/disk" "$raw" dd if="$SRC" bs=4k count=37 skip=5 seek=9001 conv=notrunc status=none of=@F@
    on_both "$mnt/disk" "$raw" dd if="$SRC" bs=1000 count=77 seek=33333 conv=notrunc status=none of=@F@
    on_both "$mnt/disk" "$raw" "$fs" @F@
    on_both "$mnt/disk" "$raw" fallocate --punch-hole --offset $((4 << 20)) --length $((1 << 20)) @F@
    on_both "$mnt/disk" "$raw" fallocate --punch-hole --offset 12345 --length 70000 @F@
    on_both "$mnt/disk" "$raw" fallocate --zero-range --keep-size --offset $((40 << 20)) --length 300000 @F@
    on_both "$mnt/disk" "$raw" "$fs" @F@
    # Reads through the ring: the disk file against the mirror, by 1 MiB
    # direct reads and by the page cache.
    io_timeout dd if="$mnt/disk" of="$T/direct.raw" bs=1M iflag=direct status=none ||
        fail "direct read of the disk file failed"
    same_bytes "$T/direct.raw" "$raw" "1 MiB direct reads through the ring vs the mirror"
    same_bytes "$mnt/disk" "$raw" "reads through the ring vs the mirror"
    compare_raw "$img" "$mnt"
    unmount_image "$mnt"
    n=$(ring_requests "$DAEMON_LOG")
    [[ -n $n ]] || { sed 's/^/    | /' "$DAEMON_LOG" >&2; fail "no served-request count from the ring in the daemon's log"; }
    # 64 direct 1 MiB reads and 6 direct 1 MiB writes alone are 70 requests.
    ((n >= 70)) || fail "only $n requests went through the ring"
    info "$n requests served through the ring"
    check_clean "$img" "image written through the ring"
    check_identical "$img" "$raw" "image written through the ring vs the mirror"
}

# possible_cpus: how many CPUs /sys/devices/system/cpu/possible names
# ("0-1,4" is 3): the kernel keeps one ring queue per possible CPU.
possible_cpus() {
    local part n=0 IFS=,
    for part in $(cat /sys/devices/system/cpu/possible); do
        if [[ $part == *-* ]]; then
            n=$((n + ${part#*-} - ${part%-*} + 1))
        else
            n=$((n + 1))
        fi
    done
    echo "$n"
}

# by_thread LOG: the per-thread request counts of the ring's last line.
by_thread() {
    sed -n 's/.*requests served through the ring (by thread: \([0-9 ]*\)).*/\1/p' "$1" | tail -n1
}

# Two threads per queue (threads=4 on two queues; one entry each, so a
# second request in flight on a queue must go to the other thread): four
# readers and four writers pinned to CPU 0 put their requests on queue 0,
# and both of its threads (0, pinned, and 2, floating) serve some of them,
# with every byte as the mirror has it.  With one CPU there is a single
# queue, and its two threads are threads 0 and 1.
case_ring_two_threads_per_queue() {
    local img=$T/img.qcow2 raw=$T/mirror.raw mnt=$T/mnt i counts queues extra pids=() pid
    requires taskset
    set_switch Y
    queues=$(possible_cpus)
    qemu-img create -q -f qcow2 "$img" 32M
    qio "$img" "write -P 0x5c 0 32M"
    ref_raw "$img" "$raw" >/dev/null
    export QCOW2FUSE_URING_LAYOUT=threads=4,depth=1
    mount_image "$img" "$mnt" transport=io_uring
    grep -q 'io_uring: [0-9]* queues, 4 threads (several per queue' "$DAEMON_LOG" ||
        grep -q 'io_uring: 1 queues, 4 threads' "$DAEMON_LOG" ||
        { sed 's/^/    | /' "$DAEMON_LOG" >&2; fail "the log does not show 4 ring threads"; }
    for i in 0 1 2 3; do
        taskset -c 0 dd if="$mnt/disk" of="$T/r$i" bs=64k skip=$((i * 64)) count=64 \
            iflag=direct status=none &
        pids+=($!)
        taskset -c 0 dd if="$SRC" of="$mnt/disk" bs=64k skip=$((i * 16)) seek=$((256 + i * 64)) \
            count=64 oflag=direct conv=notrunc status=none &
        pids+=($!)
    done
    # Not a bare wait: the daemon is a child of this shell too.
    for pid in "${pids[@]}"; do
        wait "$pid" || fail "a reader or writer on CPU 0 failed"
    done
    for i in 0 1 2 3; do
        dd if="$SRC" of="$raw" bs=64k skip=$((i * 16)) seek=$((256 + i * 64)) count=64 \
            conv=notrunc status=none
        cmp "$T/r$i" <(dd if="$raw" bs=64k skip=$((i * 64)) count=64 status=none) ||
            fail "reader $i read other bytes than the image holds"
    done
    same_bytes "$mnt/disk" "$raw" "the disk after concurrent readers and writers on one CPU"
    compare_raw "$img" "$mnt"
    unmount_image "$mnt"
    counts=$(by_thread "$DAEMON_LOG")
    info "requests by thread: $counts"
    read -r -a counts <<<"$counts"
    ((${#counts[@]} == 4)) || fail "expected 4 per-thread counts, got '${counts[*]}'"
    # Queue 0's threads: 0 and the first extra one.
    if ((queues == 1)); then extra=1; else extra=$queues; fi
    ((extra < 4)) || skip "$queues queues: threads=4 gives each queue one thread"
    ((counts[0] > 0)) || fail "thread 0 (queue 0's pinned thread) served nothing: ${counts[*]}"
    ((counts[extra] > 0)) || fail "thread $extra (queue 0's second thread) served nothing: ${counts[*]}"
    check_clean "$img" "written through two threads per queue"
    check_identical "$img" "$raw" "written through two threads per queue vs the mirror"
}

case_switch_off() {
    local img=$T/img.qcow2 mnt=$T/mnt
    # Classic is what this case expects: a run of the whole suite on the
    # ring (QCOW2FUSE_TRANSPORT=io_uring) must not demand a ring here.
    unset QCOW2FUSE_TRANSPORT
    set_switch N
    qemu-img create -q -f qcow2 "$img" 16M
    expect_refusal "$img" "$mnt" transport=io_uring
    stderr_mentions "io_uring" "enable_uring"
    mount_image "$img" "$mnt" transport=auto
    io_timeout dd if="$SRC" of="$mnt/disk" bs=1M count=2 conv=notrunc,fsync status=none ||
        fail "write on the auto transport with the switch off failed"
    unmount_image "$mnt"
    if grep -q 'io_uring: [0-9]* queues' "$DAEMON_LOG"; then
        fail "transport=auto started a ring although $SWITCH is N"
    fi
    qio "$img" "read -P 0 2M 14M"
    check_clean "$img" "auto transport with the switch off"
}

case_sigterm() {
    local img=$T/img.qcow2 mnt=$T/mnt pid writer deadline rc=0
    set_switch Y
    qemu-img create -q -f qcow2 "$img" 64M
    mount_image "$img" "$mnt" transport=io_uring
    pid=${_MNT_PID[$(canon_path "$mnt")]}
    grep -q 'io_uring: [0-9]* queues' "$DAEMON_LOG" || fail "the ring did not start"
    (while dd if="$SRC" of="$mnt/disk" bs=64k conv=notrunc,nocreat oflag=dsync status=none 2>/dev/null; do :; done) &
    writer=$!
    track_pid "$writer"
    deadline=$(($(date +%s) + 30))
    until (($(stat -c %s "$img") > (4 << 20))); do
        (($(date +%s) < deadline)) || fail "the writer did not fill the image within 30s"
        sleep 0.05
    done
    kill -TERM "$pid"
    deadline=$(($(date +%s) + EXIT_TIMEOUT))
    while pid_alive "$pid"; do
        (($(date +%s) < deadline)) || fail "daemon $pid still running ${EXIT_TIMEOUT}s after SIGTERM (a ring thread hangs?)"
        sleep 0.05
    done
    wait "$pid" || rc=$?
    unset "_MNT_PID[$(canon_path "$mnt")]"
    ((rc == 0)) || { sed 's/^/    | /' "$DAEMON_LOG" >&2; fail "daemon exited with status $rc after SIGTERM"; }
    is_mounted "$mnt" && fail "$mnt is still mounted after SIGTERM"
    deadline=$(($(date +%s) + EXIT_TIMEOUT))
    while pid_alive "$writer"; do
        (($(date +%s) < deadline)) || fail "the writer did not stop after the unmount"
        sleep 0.05
    done
    wait "$writer" 2>/dev/null || true
    [[ -n $(ring_requests "$DAEMON_LOG") ]] || fail "no served-request count in the log after SIGTERM"
    info "SIGTERM: exit 0, $(ring_requests "$DAEMON_LOG") requests had gone through the ring"
    check_clean "$img" "image after SIGTERM on the ring"
}

run_case ring_io case_ring_io
run_case ring_io_two_threads_per_queue case_ring_io threads=4
run_case ring_io_spread case_ring_io spread,threads=2
run_case ring_two_threads_per_queue case_ring_two_threads_per_queue
run_case switch_off case_switch_off
run_case sigterm case_sigterm
finish_cases
