#!/usr/bin/env bash
#
# QEMU-compatible image locking of writable mounts:
#   * while qcow2fuse has IMG mounted writable, a writable QEMU open
#     (qemu-io write) fails with a lock message, "qemu-img info" either
#     works or fails cleanly with a lock message, "qemu-img info -U" works,
#     a second writable qcow2fuse mount of IMG is refused with a lock
#     message; after the unmount QEMU can write again;
#   * while QEMU (qemu-io, and qemu-storage-daemon exporting IMG writable)
#     holds IMG open for writing, a writable mount is refused with a
#     message about the lock; whether a read-only mount is refused too is
#     recorded (QEMU itself refuses a read-only open there);
#   * while IMG is mounted read-only, what a writable QEMU open does is
#     recorded.
# shellcheck disable=SC2317  # case functions are called indirectly (run_case)
# shellcheck disable=SC2001  # sed indents multi-line tool output
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io mkfifo cmp
requires_fuse

M=$((1024 * 1024))

# qemu_run WHAT CMD...: run CMD (a QEMU tool), output in QOUT, status in QRC;
# fails the test if the tool crashed or hung.
qemu_run() {
    local what=$1
    shift
    QRC=0
    QOUT=$(timeout -k 5 30 "$@" 2>&1) || QRC=$?
    if ((QRC > 125)); then
        sed 's/^/    | /' <<<"$QOUT" >&2
        fail "$what: $1 crashed or hung (status $QRC)"
    fi
}

# mentions_lock WHAT: QOUT must be about a lock.
mentions_lock() {
    if ! grep -qi 'lock' <<<"$QOUT"; then
        sed 's/^/    | /' <<<"$QOUT" >&2
        fail "$1: failed (status $QRC), but the message does not mention a lock"
    fi
}

new_image() {
    qemu-img create -q -f qcow2 "$1" $((64 * M)) || fail "test setup: qemu-img create failed"
    qio "$1" "write -P 0x11 0 1M"
}

# ro_mount_attempt IMG MNT HOLDER: try a read-only mount while HOLDER has
# IMG open for writing; either outcome is accepted, but a refusal must be
# clean and about the lock.  Sets RO_RESULT.
ro_mount_attempt() {
    local img=$1 mnt=$2 holder=$3
    if try_mount "$img" "$mnt" ro; then
        RO_RESULT="allowed"
        timeout -k 5 "$IO_TIMEOUT" dd if="$mnt/disk" of=/dev/null bs=1M count=1 status=none \
            || fail "read from the read-only mount failed"
        unmount_image "$mnt"
    else
        ((TRY_RC != 0 && TRY_RC < 126)) || fail "read-only mount: daemon exited with status $TRY_RC"
        grep -qi 'lock' "$DAEMON_LOG" || {
            sed 's/^/    | /' "$DAEMON_LOG" >&2
            fail "read-only mount refused (status $TRY_RC) without a message about the lock"
        }
        RO_RESULT="refused (status $TRY_RC): $(grep -i -m1 'lock' "$DAEMON_LOG")"
    fi
    info "read-only mount while $holder holds the image for writing: $RO_RESULT"
}

# after_holder IMG MNT: once the other process is gone, a writable mount
# works, writes go through, and the image is clean afterwards.
after_holder() {
    local img=$1 mnt=$2
    mount_image "$img" "$mnt"
    printf 'after' | dd of="$mnt/disk" bs=1 seek=12345 conv=notrunc status=none \
        || fail "write after the other process exited failed"
    unmount_image "$mnt"
    check_clean "$img" "after the lock checks"
    qemu_run "read back" qemu-io -f qcow2 -r -c "read -v 12345 5" "$img"
    grep -q 'after' <<<"$QOUT" || fail "the write after the other process exited is not in the image: $QOUT"
}

case_mounted_rw() {
    local img="$T/img.qcow2" mnt="$T/mnt" mnt2="$T/mnt2" h
    new_image "$img"
    mount_image "$img" "$mnt"
    printf 'mounted' | dd of="$mnt/disk" bs=1 seek=4096 conv=notrunc status=none \
        || fail "write to the mount failed"

    qemu_run "qemu-img info" qemu-img info "$img"
    if ((QRC == 0)); then
        info "qemu-img info while mounted writable: works"
    else
        mentions_lock "qemu-img info while mounted writable"
        info "qemu-img info while mounted writable: fails cleanly (status $QRC): $(head -n1 <<<"$QOUT")"
    fi
    qemu_run "qemu-img info -U" qemu-img info -U "$img"
    ((QRC == 0)) || fail "qemu-img info -U failed while mounted writable: $QOUT"

    h=$(md5sum <"$img")
    qemu_run "qemu-io write" qemu-io -f qcow2 -c 'write -P 0x22 0 4k' "$img"
    if ((QRC == 0)); then
        fail "a writable QEMU open (qemu-io write) succeeded while the image is mounted writable: $QOUT"
    fi
    mentions_lock "qemu-io write while mounted writable"
    info "qemu-io write while mounted writable: refused: $(head -n1 <<<"$QOUT")"
    [[ $(md5sum <"$img") == "$h" ]] || fail "the refused qemu-io changed the image file"

    qemu_run "qemu-io -r" qemu-io -f qcow2 -r -c 'read 0 4k' "$img"
    if ((QRC == 0)); then
        info "qemu-io -r (read-only QEMU open) while mounted writable: works"
    else
        mentions_lock "qemu-io -r while mounted writable"
        info "qemu-io -r while mounted writable: refused: $(head -n1 <<<"$QOUT")"
    fi

    # a second daemon on the same image
    expect_refusal "$img" "$mnt2"
    stderr_mentions 'lock'
    ro_mount_attempt "$img" "$mnt2" "a writable qcow2fuse mount"

    unmount_image "$mnt"
    qemu_run "qemu-io write after unmount" qemu-io -f qcow2 -c 'write -P 0x22 8k 4k' "$img"
    ((QRC == 0)) || fail "qemu-io write after the unmount failed: $QOUT"
    qemu_run "read back" qemu-io -f qcow2 -r -c "read -v 4096 7" "$img"
    grep -q 'mounted' <<<"$QOUT" || fail "data written through the mount is not in the image: $QOUT"
    check_clean "$img" "after the lock checks"
}

case_mounted_ro() {
    local img="$T/img.qcow2" mnt="$T/mnt" h
    new_image "$img"
    mount_image "$img" "$mnt" ro
    h=$(md5sum <"$img")
    qemu_run "qemu-io write" qemu-io -f qcow2 -c 'write -P 0x22 0 4k' "$img"
    if ((QRC == 0)); then
        info "NOTE: a writable QEMU open succeeded while the image is mounted read-only"
        info "      (the mount may now serve stale data; QEMU's own read-only users refuse to share write)"
    else
        mentions_lock "qemu-io write while mounted read-only"
        info "qemu-io write while mounted read-only: refused: $(head -n1 <<<"$QOUT")"
        [[ $(md5sum <"$img") == "$h" ]] || fail "the refused qemu-io changed the image file"
    fi
    qemu_run "qemu-img info" qemu-img info "$img"
    ((QRC == 0)) || fail "qemu-img info failed while mounted read-only: $QOUT"
    info "qemu-img info while mounted read-only: works"
    unmount_image "$mnt"
}

# qemu-io holding the image open for writing, reading commands from a fifo
# that this shell keeps open.
case_qemu_io_holds() {
    local img="$T/img.qcow2" mnt="$T/mnt" fifo="$T/cmds" qpid i
    new_image "$img"
    mkfifo "$fifo"
    qemu-io -f qcow2 "$img" <"$fifo" >"$T/qemu-io.out" 2>&1 &
    qpid=$!
    track_pid "$qpid"
    exec 7>"$fifo"
    echo 'write -P 0x33 64k 4k' >&7
    for ((i = 0; i < 100; i++)); do
        grep -q 'wrote 4096' "$T/qemu-io.out" 2>/dev/null && break
        pid_alive "$qpid" || { cat "$T/qemu-io.out" >&2; fail "test setup: qemu-io exited"; }
        sleep 0.1
    done
    grep -q 'wrote 4096' "$T/qemu-io.out" || { cat "$T/qemu-io.out" >&2; fail "test setup: qemu-io did not write"; }
    info "qemu-io (pid $qpid) holds the image open for writing"

    expect_refusal "$img" "$mnt"
    stderr_mentions 'lock'
    ro_mount_attempt "$img" "$mnt" "qemu-io"

    # end qemu-io: EOF on its command input
    exec 7>&-
    for ((i = 0; i < 100; i++)); do
        pid_alive "$qpid" || break
        sleep 0.1
    done
    pid_alive "$qpid" && fail "qemu-io did not exit at the end of its input"
    wait "$qpid" || true
    after_holder "$img" "$mnt"
    qemu_run "read back" qemu-io -f qcow2 -r -c "read -P 0x33 64k 4k" "$img"
    if ((QRC != 0)) || grep -q 'Pattern verification failed' <<<"$QOUT"; then
        fail "qemu-io's own write is not in the image: $QOUT"
    fi
}

# qemu-storage-daemon exporting the image writable over NBD
case_qsd_holds() {
    local img="$T/img.qcow2" mnt="$T/mnt" sock="$T/nbd.sock" qpid i
    new_image "$img"
    # started in $T with a relative socket path: a UNIX socket path must be
    # shorter than 108 bytes
    (cd "$T" && exec qemu-storage-daemon \
        --blockdev driver=file,filename="$img",node-name=f \
        --blockdev driver=qcow2,file=f,node-name=q \
        --nbd-server addr.type=unix,addr.path=nbd.sock \
        --export type=nbd,id=e,node-name=q,writable=on) \
        </dev/null >"$T/qsd.out" 2>&1 &
    qpid=$!
    track_pid "$qpid"
    for ((i = 0; i < 100; i++)); do
        [[ -S $sock ]] && break
        pid_alive "$qpid" || { cat "$T/qsd.out" >&2; fail "test setup: qemu-storage-daemon exited"; }
        sleep 0.1
    done
    [[ -S $sock ]] || fail "test setup: qemu-storage-daemon did not create $sock"
    info "qemu-storage-daemon (pid $qpid) exports the image writable"

    expect_refusal "$img" "$mnt"
    stderr_mentions 'lock'
    ro_mount_attempt "$img" "$mnt" "qemu-storage-daemon"

    kill -TERM "$qpid"
    for ((i = 0; i < 100; i++)); do
        pid_alive "$qpid" || break
        sleep 0.1
    done
    pid_alive "$qpid" && fail "qemu-storage-daemon did not exit on SIGTERM"
    wait "$qpid" || true
    after_holder "$img" "$mnt"
}

run_case mounted_rw_vs_qemu case_mounted_rw
run_case mounted_ro_vs_qemu case_mounted_ro
run_case qemu_io_holds_write case_qemu_io_holds
if command -v qemu-storage-daemon >/dev/null 2>&1; then
    run_case qemu_storage_daemon_holds_write case_qsd_holds
else
    info "qemu-storage-daemon not installed: case qemu_storage_daemon_holds_write not run"
fi

finish_cases
