#!/usr/bin/env bash
# SIGTERM and SIGINT while a writer is busy on the disk file, with the
# mount point given relative to the daemon's working directory and
# absolute: the daemon unmounts (it changes to / after mounting, so a
# relative mount point must have been resolved at start), exits 0, leaves
# no dead mount behind, and the image is clean with what was acknowledged
# before the signal in place (compared with qemu-img convert).  The
# foreground cases check the exit status; one case runs the daemon in the
# background, as users start it (not our child: no status, the rest holds).
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires_fuse
requires qemu-img

SRC=$TEST_TMP/src
head -c $((8 << 20)) /dev/urandom >"$SRC"

# wait_for WHAT SECONDS CMD...: poll CMD until it succeeds; fail after
# SECONDS (a hang, not a timing assertion).
wait_for() {
    local what=$1 secs=$2 deadline
    shift 2
    deadline=$(($(date +%s%N) + secs * 1000000000))
    until "$@"; do
        (($(date +%s%N) < deadline)) || fail "$what: not within ${secs}s"
        sleep 0.02
    done
}

mounted_with_disk() { is_mounted "$1" && [[ -e $1/disk ]]; }
file_larger() { (($(stat -c %s "$1") > $2)); }
not_alive() { ! pid_alive "$1"; }

# start_writer MNT: rewrite the first 8 MiB of MNT/disk with $SRC, with a
# sync after every 64 KiB, over and over until the disk file goes away
# (nocreat: not into a file of its own in the bare mount point).
start_writer() {
    local disk=$1/disk
    (
        while dd if="$SRC" of="$disk" bs=64k conv=notrunc,nocreat oflag=dsync status=none 2>/dev/null; do
            :
        done
    ) &
    WRITER=$!
    track_pid "$WRITER"
}

# signal_while_busy IMG MNT PID SIG: once the writer has put several MiB
# into the image, send SIG to the daemon PID and wait for it to exit.
signal_while_busy() {
    local img=$1 mnt=$2 pid=$3 sig=$4
    start_writer "$mnt"
    wait_for "the writer filling the image" 30 file_larger "$img" $((6 << 20))
    pid_alive "$WRITER" || fail "test setup: the writer stopped before the signal"
    info "SIG$sig to daemon $pid while the writer runs"
    kill -"$sig" "$pid"
    wait_for "daemon $pid exiting after SIG$sig" "$EXIT_TIMEOUT" not_alive "$pid"
    # The writer's disk file is gone: its next write fails, and it stops.
    wait_for "the writer stopping" "$EXIT_TIMEOUT" not_alive "$WRITER"
    wait "$WRITER" 2>/dev/null || true
}

# check_after IMG MNT LOG: no mount left (live or dead), the mount point
# usable again, a clean image that holds the first 4 MiB the writer had
# been acknowledged (every pass writes the same bytes).
check_after() {
    local img=$1 mnt=$2 log=$3
    if grep -q "failed to unmount" "$log"; then
        sed 's/^/    | /' "$log" >&2
        fail "the daemon could not unmount $mnt"
    fi
    if is_mounted "$mnt" || grep -qF " $mnt " /proc/mounts; then
        fail "$mnt is still in /proc/mounts after the daemon exited"
    fi
    ls "$mnt" >/dev/null 2>"$T/ls.err" || fail "$mnt is not usable after the daemon exited: $(cat "$T/ls.err")"
    check_clean "$img" "after the signal"
    ref_range "$img" 0 $((4 << 20)) "$T/head"
    cmp -n $((4 << 20)) "$T/head" "$SRC" ||
        fail "the image does not hold the 4 MiB written before the signal"
}

# case_foreground relative|absolute TERM|INT
case_foreground() {
    local how=$1 sig=$2 img=$T/img.qcow2 mnt=$T/m log=$T/daemon.log pid rc=0
    local img_arg=$img mnt_arg=$mnt
    if [[ $how == relative ]]; then img_arg=img.qcow2 mnt_arg=m; fi
    qemu-img create -q -f qcow2 "$img" 64M
    mkdir "$mnt"
    # A script's background jobs ignore SIGINT, and libfuse keeps an
    # ignored signal ignored: restore the default for the daemon.
    (cd "$T" && exec env --default-signal=INT "$QCOW2FUSE" "${TRANSPORT_ARGS[@]}" -f "$img_arg" "$mnt_arg") \
        </dev/null >"$log" 2>&1 &
    pid=$!
    track_mount "$mnt" "$pid"
    wait_for "mount of $mnt_arg" "$MOUNT_TIMEOUT" mounted_with_disk "$mnt"
    signal_while_busy "$img" "$mnt" "$pid" "$sig"
    wait "$pid" || rc=$?
    if ((rc != 0)); then
        sed 's/^/    | /' "$log" >&2
        fail "daemon exited with status $rc after SIG$sig (expected 0)"
    fi
    check_after "$img" "$mnt" "$log"
}

# The default mode: the daemon forks to the background and changes to /.
case_background() {
    local img=$T/img.qcow2 mnt=$T/m log=$T/daemon.log pid
    qemu-img create -q -f qcow2 "$img" 64M
    mkdir "$mnt"
    (cd "$T" && exec "$QCOW2FUSE" "${TRANSPORT_ARGS[@]}" img.qcow2 m) </dev/null >"$log" 2>&1 ||
        fail "the daemon did not start: $(cat "$log")"
    track_mount "$mnt"
    wait_for "mount of m" "$MOUNT_TIMEOUT" mounted_with_disk "$mnt"
    pid=$(pids_holding "$img")
    [[ $pid =~ ^[0-9]+$ ]] || fail "test setup: no single daemon holds the image: '$pid'"
    track_pid "$pid"
    [[ $(readlink "/proc/$pid/cwd") == / ]] || fail "the background daemon did not change to /"
    signal_while_busy "$img" "$mnt" "$pid" TERM
    check_after "$img" "$mnt" "$log"
}

run_case relative_term case_foreground relative TERM
run_case relative_int case_foreground relative INT
run_case absolute_term case_foreground absolute TERM
run_case absolute_int case_foreground absolute INT
run_case background_relative_term case_background
finish_cases
