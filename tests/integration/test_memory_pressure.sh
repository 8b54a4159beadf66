#!/usr/bin/env bash
#
# No deadlock under memory pressure: the daemon serves a loop device whose
# dirty pages memory reclaim may try to write back through the daemon.  The
# daemon runs in a memory cgroup of its own (v2 memory.max, or v1
# memory.limit_in_bytes) limited to LIMIT_MIB; ext4 on a loop device on
# MNT/disk gets a file of twice the limit written with conv=fsync, under a
# deadline (on the deadline the daemon's stacks are shown, the daemon is
# killed and its FUSE connection aborted).  Then: the file reads back after
# a remount, e2fsck finds the file system clean, the image is clean
# (qemu-img check), and qemu's view of the disk holds the same file.
#
# Two cases:
#   daemon_limited  the daemon alone in the cgroup (the writer outside):
#                   its own page cache and buffers are squeezed.
#   shared_limit    the writer in the cgroup too, so the ext4 pages that
#                   reclaim waits for are written back through the daemon,
#                   which allocates while it serves them: without
#                   PR_SET_IO_FLUSHER this deadlocks (seen with cgroup v1:
#                   a daemon thread copying a write request faults a
#                   buffer page, the charge reclaims and waits on the
#                   writeback of a loop folio that waits for the daemon).
#                   It needs the flag, so it is skipped (not passed) where
#                   the daemon lacks CAP_SYS_RESOURCE (PRESSURE_FORCE_SHARED=1
#                   runs it anyway, to watch the deadlock being caught).
#
# PR_SET_IO_FLUSHER: where the daemon has CAP_SYS_RESOURCE every one of its
# threads must carry the flag's task flags (PF_MEMALLOC_NOIO and
# PF_LOCAL_THROTTLE, /proc/PID/task/TID/stat field 9); where it has not,
# the daemon must say so once in its log and no thread may carry them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img losetup mkfs.ext4 e2fsck mount umount mountpoint
requires_fuse
[[ $(id -u) == 0 ]] || skip "needs root (losetup, mount, cgroups)"

LIMIT_MIB=${LIMIT_MIB:-64}
# AddressSanitizer keeps up to 256 MiB of freed memory in quarantine, which
# the cgroup counts: the OOM killer then ends the daemon of a sanitizer
# build (seen in CI).  A small quarantine keeps the limit about the daemon.
if sanitized_build "$QCOW2FUSE"; then
    export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}quarantine_size_mb=4"
fi
WRITE_MIB=$((2 * LIMIT_MIB))
WRITEMIX_TIMEOUT=${PRESSURE_TIMEOUT:-90}    # seconds for the write (a hang)
PF_MEMALLOC_NOIO=$((0x00080000))
PF_LOCAL_THROTTLE=$((0x00100000))
CAP_SYS_RESOURCE=24

# ---- a memory cgroup of our own, below the one we run in ----------------

CG=""
CG_LIMIT_FILE=""
if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
    parent=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)
    grep -qw memory "$parent/cgroup.subtree_control" 2>/dev/null ||
        skip "cgroup v2 without the memory controller enabled below $parent"
    CG_LIMIT_FILE=memory.max
elif [[ -d /sys/fs/cgroup/memory ]]; then
    parent=/sys/fs/cgroup/memory$(sed -n 's/^[0-9]*:memory://p' /proc/self/cgroup)
    CG_LIMIT_FILE=memory.limit_in_bytes
else
    skip "no memory cgroup (neither cgroup v2 memory.max nor v1 memory.limit_in_bytes)"
fi
# ---- cleanup: kernel mounts, loop devices, the daemon, then the cgroup ---

FUSE_CONN=""        # the daemon's FUSE connection (fusectl), while it may hang

# abort_connection: a daemon thread stuck in reclaim cannot be killed, and
# its connection keeps every process that touches the disk file waiting:
# abort it through fusectl (mounted for that if need be).
abort_connection() {
    local ctl=/sys/fs/fuse/connections mounted_here=0
    [[ -n $FUSE_CONN ]] || return 0
    if ! mountpoint -q "$ctl"; then
        mount -t fusectl fusectl "$ctl" 2>/dev/null && mounted_here=1
    fi
    if [[ -e $ctl/$FUSE_CONN/abort ]]; then
        echo "cleanup: aborting FUSE connection $FUSE_CONN" >&2
        echo 1 >"$ctl/$FUSE_CONN/abort"
    fi
    if ((mounted_here)); then umount "$ctl" 2>/dev/null; fi
    FUSE_CONN=""
}

# The case's kernel mounts and loop devices (track_kmount, track_loop) and
# its daemon are undone by _cleanup_scope of functions.sh, in that order.
pressure_cleanup() {
    local i
    abort_connection            # first: a hung daemon would hang the rest
    _cleanup_scope
    # Processes leave a cgroup only when they are reaped.
    for ((i = 0; i < 50; i++)); do
        [[ -n $CG && -d $CG ]] || break
        rmdir "$CG" 2>/dev/null && break
        sleep 0.1
    done
    [[ -z $CG || ! -d $CG ]] || echo "cleanup: could not remove $CG" >&2
    return 0
}
_status() { return "$1"; }
pressure_exit_trap() {
    local rc=$?
    set +e
    trap - ERR
    pressure_cleanup
    _status "$rc"
    cleanup
}

# make_cgroup NAME: create and limit the case's cgroup (CG).
make_cgroup() {
    CG=$parent/qcow2fuse-$TEST_NAME.$1.$$
    mkdir "$CG" 2>"$T/cg.err" || skip "cannot create a memory cgroup in $parent: $(cat "$T/cg.err")"
    [[ -f $CG/$CG_LIMIT_FILE ]] || { rmdir "$CG"; skip "$CG has no $CG_LIMIT_FILE"; }
    echo $((LIMIT_MIB << 20)) >"$CG/$CG_LIMIT_FILE"
    info "memory cgroup $CG, $CG_LIMIT_FILE = $LIMIT_MIB MiB; writing $WRITE_MIB MiB"
}

# in_cgroup CMD...: run CMD inside the cgroup.
in_cgroup() {
    echo "$BASHPID" >"$CG/cgroup.procs"
    exec "$@"
}

# task_flags PID: "TID FLAGS" for every thread of PID.
task_flags() {
    local st rest
    for st in /proc/"$1"/task/*/stat; do
        rest=$(<"$st") || continue
        rest=${rest##*) }                   # after the command name
        # shellcheck disable=SC2086  # fields
        set -- $rest
        echo "$(basename "$(dirname "$st")") ${7}"    # field 9 overall
    done
}

# check_io_flusher PID LOG WHEN
check_io_flusher() {
    local pid=$1 log=$2 when=$3 capeff tid flags n=0 refused
    capeff=$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")
    refused=$(grep -c 'PR_SET_IO_FLUSHER refused' "$log" || true)
    if (((0x$capeff >> CAP_SYS_RESOURCE) & 1)); then
        ((refused == 0)) || fail "$when: PR_SET_IO_FLUSHER was refused although the daemon has CAP_SYS_RESOURCE"
        while read -r tid flags; do
            n=$((n + 1))
            ((flags & PF_MEMALLOC_NOIO && flags & PF_LOCAL_THROTTLE)) ||
                fail "$when: daemon thread $tid has task flags $(printf '%#x' "$flags"): PR_SET_IO_FLUSHER is not in effect there"
        done < <(task_flags "$pid")
        info "$when: PR_SET_IO_FLUSHER in effect on all $n daemon threads"
    else
        ((refused == 1)) ||
            fail "$when: without CAP_SYS_RESOURCE the daemon must log the refused PR_SET_IO_FLUSHER once (found $refused lines)"
        while read -r tid flags; do
            n=$((n + 1))
            ((!(flags & PF_MEMALLOC_NOIO))) ||
                fail "$when: daemon thread $tid has PF_MEMALLOC_NOIO although PR_SET_IO_FLUSHER was refused"
        done < <(task_flags "$pid")
        info "$when: no CAP_SYS_RESOURCE here: the refusal is logged once; $n threads run without the flag"
    fi
}

# expect_big FILE WHAT: FILE holds WRITE_MIB/16 copies of src16.
expect_big() {
    local i
    [[ $(stat -c %s "$1") == $((WRITE_MIB << 20)) ]] || fail "$2: $1 has size $(stat -c %s "$1")"
    for ((i = 0; i < WRITE_MIB / 16; i++)); do cat "$T/src16"; done | cmp - "$1" ||
        fail "$2: the file does not read back as written"
}


# daemon_has_cap PID: the process has CAP_SYS_RESOURCE in effect.
daemon_has_cap() {
    local capeff
    capeff=$(awk '/^CapEff:/ {print $2}' "/proc/$1/status")
    (((0x$capeff >> CAP_SYS_RESOURCE) & 1))
}

# pressure_case shared|alone
pressure_case() {
    local share=$1 img=$T/p.qcow2 mnt ext=$T/ext log=$T/daemon.log pid dev rodev rc=0 t0 deadline
    trap pressure_exit_trap EXIT
    make_cgroup "$CASE_NAME"
    mnt=$(canon_path "$T/mnt")
    mkdir -p "$mnt" "$ext" "$T/ro"
    qemu-img create -q -f qcow2 "$img" 512M
    head -c $((16 << 20)) /dev/urandom >"$T/src16"

    local opts
    opts=$(with_transport "")
    (in_cgroup "$QCOW2FUSE" -f ${opts:+-o "$opts"} "$img" "$mnt") </dev/null >"$log" 2>&1 &
    pid=$!
    track_mount "$mnt" "$pid"
    _MNT_PID[$mnt]=$pid
    _MNT_LOG[$mnt]=$log
    deadline=$(($(date +%s%N) + MOUNT_TIMEOUT * 1000000000))
    until is_mounted "$mnt" && [[ -e $mnt/disk ]]; do
        pid_alive "$pid" || { sed 's/^/    | /' "$log" >&2; fail "the daemon exited before mounting"; }
        (($(date +%s%N) < deadline)) || fail "mount not ready after ${MOUNT_TIMEOUT}s"
        sleep 0.02
    done
    FUSE_CONN=$(awk -v m="$mnt" '$5 == m { split($3, d, ":"); print d[2] }' /proc/self/mountinfo)
    grep -qx "$pid" "$CG/cgroup.procs" || fail "test setup: the daemon is not in $CG"
    if [[ $share == shared && ${PRESSURE_FORCE_SHARED:-0} != 1 ]] && ! daemon_has_cap "$pid"; then
        check_io_flusher "$pid" "$log" "at start"
        skip "the daemon has no CAP_SYS_RESOURCE here, so PR_SET_IO_FLUSHER is refused, and a writer sharing its memory cgroup deadlocks it (the case this flag exists for)"
    fi

    dev=$(losetup -f --show "$mnt/disk") || fail "losetup of $mnt/disk failed"
    track_loop "$dev"
    mkfs.ext4 -q -F -N 1024 -J size=8 -E lazy_itable_init=0,lazy_journal_init=0 "$dev" ||
        fail "mkfs.ext4 on $dev failed"
    mount "$dev" "$ext" || fail "mount $dev failed"
    track_kmount "$ext"

    write_big() {
        local i
        if [[ $share == shared ]]; then echo "$BASHPID" >"$CG/cgroup.procs"; fi
        for ((i = 0; i < WRITE_MIB / 16; i++)); do cat "$T/src16"; done |
            dd of="$ext/big" bs=1M iflag=fullblock conv=fsync status=none
    }
    t0=$(date +%s)
    guarded "$mnt" "$T/write.out" write_big || rc=$?
    if ((rc == 124)); then
        abort_connection
        fail "writing $WRITE_MIB MiB into ext4 on the loop device hung (no end within ${WRITEMIX_TIMEOUT}s)"
    fi
    ((rc == 0)) || fail "writing $WRITE_MIB MiB into ext4 on the loop device failed (status $rc): $(head -n3 "$T/write.out")"
    info "wrote $WRITE_MIB MiB with conv=fsync in $(($(date +%s) - t0)) s; cgroup peak $(($(cat "$CG/memory.max_usage_in_bytes" 2>/dev/null || cat "$CG/memory.peak" 2>/dev/null || echo 0) >> 20)) MiB"
    pid_alive "$pid" || fail "the daemon died under memory pressure"
    check_io_flusher "$pid" "$log" "after the write"

    # A remount drops the file's pages: it is read from the disk again.
    umount "$ext" || fail "umount $ext failed"
    mount "$dev" "$ext" || fail "remount of $dev failed"
    expect_big "$ext/big" "through the daemon after a remount"
    umount "$ext" || fail "umount $ext failed"
    e2fsck -fn "$dev" >"$T/fsck.out" 2>&1 || { cat "$T/fsck.out" >&2; fail "e2fsck -fn found errors"; }
    loop_detach "$dev"
    unmount_image "$mnt"
    FUSE_CONN=""

    check_clean "$img" "after the memory-pressure write"
    qemu-img convert -O raw "$img" "$T/p.raw" || fail "qemu-img convert failed"
    rodev=$(losetup -f --show -r "$T/p.raw") || fail "losetup of the converted image failed"
    track_loop "$rodev"
    mount -o ro "$rodev" "$T/ro" || fail "mount of the converted image failed"
    track_kmount "$T/ro"
    expect_big "$T/ro/big" "in qemu-img convert's view of the image"
    umount "$T/ro"
    loop_detach "$rodev"
}

run_case daemon_limited pressure_case alone
run_case shared_limit pressure_case shared
finish_cases
