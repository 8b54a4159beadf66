# shellcheck shell=bash
#
# Helpers for the qcow2fuse integration tests.  Sourced by every
# tests/integration/test_*.sh script:
#
#     . "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
#
# Environment:
#   QCOW2FUSE   absolute path of the daemon binary (required)
#   TOOLS       directory with the helper tools built from tests/tools/*.c
#   TMPDIR      where per-test temporary directories are created (default /tmp)
#   KEEP_TMP=1  keep the temporary directory (for debugging)
#   CASE_FILTER glob: only run the cases (run_case) whose name matches
#   QCOW2FUSE_TRANSPORT  classic|io_uring|auto: mount helpers add
#               -o transport=VALUE (unless the test's own options name one)
#
# Exit codes of a test script: 0 pass, 1 fail, 77 skip.
#
# Conventions:
#   * $T is the scratch directory of the current test (or of the current
#     case, inside run_case).  It is removed by the cleanup trap.
#   * mount_image starts the daemon in the foreground (-f) in the background
#     of the calling shell; unmount_image must therefore be called from the
#     same shell (never call mount_image inside $(...) or a pipeline).
#   * fail / skip exit the current test (or the current case inside run_case).
#   * Cleanup undoes what the current scope (test, or case inside run_case)
#     registered: kernel mounts (track_kmount, newest first), then loop
#     devices (track_loop), then FUSE mounts and daemons (track_mount,
#     track_pid; mount_image registers its own), so that ext4 on a loop
#     device over MNT/disk is unmounted, then the loop freed, then MNT;
#     last the file systems that hold the images (track_host_fs) and their
#     loop devices.

set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C

# shellcheck disable=SC2034  # for the test scripts
TESTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
TEST_NAME=$(basename "${BASH_SOURCE[1]:-$0}" .sh)
CASE_NAME=""
SKIP_STATUS=77

# Timeouts (seconds).
MOUNT_TIMEOUT=${MOUNT_TIMEOUT:-10}   # daemon start -> mount ready
EXIT_TIMEOUT=${EXIT_TIMEOUT:-10}     # unmount -> daemon exit
IO_TIMEOUT=${IO_TIMEOUT:-120}        # one command reading the mount

# io_timeout CMD...: run CMD with a time limit of IO_TIMEOUT seconds.
# --foreground keeps CMD in the test's process group, so that a signal sent
# to the whole test (run.sh's timeout) also reaches it.
io_timeout() {
    timeout --foreground -k 5 "$IO_TIMEOUT" "$@"
}

# ---------------------------------------------------------------------------
# Reporting

# fail MSG...: report a failure and exit 1 (the case, or the whole test).
fail() {
    echo "FAIL${CASE_NAME:+ [$CASE_NAME]}: $*" >&2
    exit 1
}

# skip REASON...: report a skip and exit 77.  run.sh shows the reason.
skip() {
    echo "SKIP: $*"
    if [[ -n $CASE_NAME && -n ${_CASE_SKIPFILE:-} ]]; then
        printf '%s\n' "$*" >"$_CASE_SKIPFILE"
    fi
    exit "$SKIP_STATUS"
}

# info MSG...: progress message (goes to the test log).
info() {
    echo "  ${CASE_NAME:+[$CASE_NAME] }$*"
}

# requires CMD...: skip the test (case) unless every command is available.
requires() {
    local c missing=()
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || missing+=("$c")
    done
    if ((${#missing[@]} > 0)); then
        skip "required command(s) not found: ${missing[*]}"
    fi
}

# requires_fuse: skip unless FUSE can be used at all.
requires_fuse() {
    requires fusermount3 mountpoint
    [[ -c /dev/fuse ]] || skip "/dev/fuse is not available"
}

# require_tool NAME: path of a helper tool from $TOOLS; failing (not
# skipping) when it is missing, because the Makefile always builds them.
require_tool() {
    local p="${TOOLS:-}/$1"
    [[ -n ${TOOLS:-} ]] || fail "TOOLS is not set (directory of the tools built from tests/tools/*.c)"
    [[ -x $p ]] || fail "helper tool $p is missing (build it with make)"
    printf '%s\n' "$p"
}

# ---------------------------------------------------------------------------
# Process / mount tracking and cleanup

_KMOUNTS=()                # kernel (non-FUSE) mounts of this scope, in order
_LOOPS=()                  # loop devices this scope attached and still owns
_HOST_FS=()                # kernel mounts that hold images (track_host_fs)
_HOST_LOOPS=()             # ... and the loop devices under them
_MOUNTS=()                 # every mountpoint this scope mounted (canonical)
_PIDS=()                   # every daemon PID this scope started/discovered
declare -A _MNT_PID=()     # mountpoint -> PID of its foreground daemon
declare -A _MNT_LOG=()     # mountpoint -> daemon output file

# _seq: a number no other _seq call of this test has given, for unique
# file names.  Every caller writes $(_seq), a subshell whose variables
# die with it (a shell counter gave every call the same number, so two
# ref_raw copies were one file and a comparison of them could not fail):
# the count lives in a file, under a lock for callers in background jobs.
_seq() {
    local n
    {
        flock 9
        n=$(($(cat "$TEST_TMP/.seq" 2>/dev/null || echo 0) + 1))
        echo "$n" >"$TEST_TMP/.seq"
    } 9>>"$TEST_TMP/.seq.lock"
    printf '%s\n' "$n"
}

# canon_path PATH: absolute path with symlinks in the *parent* resolved
# (the last component is not touched, so this works on dead FUSE mounts).
canon_path() {
    local p=$1 d b
    [[ $p == /* ]] || p="$PWD/$p"
    p=${p%/}
    d=$(dirname "$p")
    b=$(basename "$p")
    d=$(cd "$d" && pwd -P) || return 1
    if [[ $d == / ]]; then printf '/%s\n' "$b"; else printf '%s/%s\n' "$d" "$b"; fi
}

# is_mounted PATH: true if PATH is a mount point according to
# /proc/self/mountinfo (also true for a FUSE mount whose daemon died).
is_mounted() {
    local target fields
    target=$(canon_path "$1") || return 1
    target=${target// /\\040}
    while read -r -a fields; do
        [[ ${fields[4]} == "$target" ]] && return 0
    done </proc/self/mountinfo
    return 1
}

# pid_alive PID: process exists and is not a zombie.
pid_alive() {
    local st
    [[ -r /proc/$1/stat ]] || return 1
    st=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z && $st != X ]]
}

# pids_holding FILE: PIDs of processes that have FILE open (fd or mapping).
# Used only to find the daemon started in daemon mode (no -f); FILE is a
# unique path in the test's own scratch directory.
pids_holding() {
    local want pat
    want=$(readlink -f "$1")
    pat=$(printf '%s' "$want" | sed 's/[][*?\\]/\\&/g')
    find /proc/[0-9]*/fd /proc/[0-9]*/map_files -mindepth 1 -maxdepth 1 \
        -lname "$pat" 2>/dev/null | cut -d/ -f3 | sort -un || true
}

# track_mount MNT [PID]: register a mount (and daemon PID) for cleanup.
track_mount() {
    _MOUNTS+=("$(canon_path "$1")")
    if [[ -n ${2:-} ]]; then _PIDS+=("$2"); fi
}

# track_pid PID: register a daemon PID for cleanup.
track_pid() {
    _PIDS+=("$1")
}

# track_kmount DIR: register a kernel mount on DIR (e.g. ext4 on a loop
# device) for cleanup, which unmounts it (lazily if busy) before it detaches
# the loop devices and unmounts the FUSE mounts.  Call it right after the
# mount; an explicit umount later is fine (cleanup skips what is unmounted).
track_kmount() {
    _KMOUNTS+=("$(canon_path "$1")")
}

# track_loop DEV: register a loop device this test attached for cleanup,
# which detaches it after the kernel mounts and before the FUSE mounts go (a
# loop device over MNT/disk keeps MNT busy).
track_loop() {
    _LOOPS+=("$1")
}

# track_host_fs DIR [DEV]: register a kernel file system on DIR (on loop
# device DEV, if given) that holds the images, for cleanup, which unmounts
# it (lazily if busy) and detaches DEV only after the FUSE mounts and their
# daemons are gone: the other way round from track_kmount, whose file
# system lives on a FUSE disk file.  An explicit umount later is fine.
track_host_fs() {
    _HOST_FS+=("$(canon_path "$1")")
    if [[ -n ${2:-} ]]; then _HOST_LOOPS+=("$2"); fi
}

# _loop_wait_free DEV: wait up to 10 s until DEV is no longer attached
# (losetup -d of a device still open only sets autoclear).
_loop_wait_free() {
    local i
    for ((i = 0; i < 100; i++)); do
        losetup "$1" >/dev/null 2>&1 || return 0
        sleep 0.1
    done
    return 1
}

# loop_detach DEV: detach DEV, wait until it is free and stop tracking it;
# fails the test if it stays attached.
loop_detach() {
    local dev=$1 d i kept=()
    for ((i = 0; i < 50; i++)); do
        losetup -d "$dev" 2>/dev/null && break
        sleep 0.1
    done
    # Once detached the number is free for anyone's losetup -f: cleanup must
    # not detach it again.
    if ((i < 50)); then
        for d in "${_LOOPS[@]}"; do
            [[ $d == "$dev" ]] || kept+=("$d")
        done
        _LOOPS=("${kept[@]}")
    fi
    _loop_wait_free "$dev" || fail "loop device $dev is still attached"
}

# _undo_kernel_mounts MOUNTS LOOPS: unmount the kernel mounts listed in the
# array named MOUNTS (newest first, lazily if busy), then detach the loop
# devices in the array named LOOPS, and empty that one.
_undo_kernel_mounts() {
    local -n _um_mounts=$1 _um_loops=$2
    local i d
    for ((i = ${#_um_mounts[@]} - 1; i >= 0; i--)); do
        d=${_um_mounts[i]}
        if is_mounted "$d"; then
            umount "$d" 2>/dev/null || umount -l "$d" 2>/dev/null
        fi
    done
    for d in "${_um_loops[@]}"; do
        if losetup -d "$d" 2>/dev/null; then
            _loop_wait_free "$d" || echo "cleanup: loop device $d is still attached" >&2
        fi
    done
    _um_loops=()
}

_cleanup_scope() {
    local m p i
    _undo_kernel_mounts _KMOUNTS _LOOPS
    for m in "${_MOUNTS[@]}"; do
        if is_mounted "$m"; then
            fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null \
                || umount -l "$m" 2>/dev/null
        fi
    done
    for p in "${_PIDS[@]}"; do
        if pid_alive "$p"; then
            kill -TERM "$p" 2>/dev/null
            for ((i = 0; i < 50; i++)); do
                pid_alive "$p" || break
                sleep 0.1
            done
            if pid_alive "$p"; then
                echo "cleanup: daemon $p ignored SIGTERM, sending SIGKILL" >&2
                kill -KILL "$p" 2>/dev/null
            fi
        fi
        wait "$p" 2>/dev/null
    done
    # A killed daemon can leave a dead mount behind ("Transport endpoint is
    # not connected"); detach it.
    for m in "${_MOUNTS[@]}"; do
        if is_mounted "$m"; then
            fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
        fi
    done
    _undo_kernel_mounts _HOST_FS _HOST_LOOPS
}

_remove_dir() {
    local d=$1 m
    [[ -n $d && -d $d ]] || return 0
    if [[ ${KEEP_TMP:-0} == 1 ]]; then
        echo "keeping $d" >&2
        return 0
    fi
    # Never recurse into something that is still mounted.
    for m in "${_KMOUNTS[@]}" "${_MOUNTS[@]}" "${_HOST_FS[@]}"; do
        if is_mounted "$m"; then
            echo "cleanup: $m is still mounted; leaving $d in place" >&2
            return 0
        fi
    done
    rm -rf --one-file-system "$d"
}

# The EXIT trap: unmount what we mounted, stop daemons we started (by PID),
# remove the scratch directory, keep the exit status.
cleanup() {
    local rc=$?
    set +e
    # Cleanup commands may fail on purpose (a daemon already reaped): they
    # are not the failure the ERR trap should name.
    trap - EXIT ERR
    _cleanup_scope
    if [[ -n $CASE_NAME ]]; then
        _remove_dir "$T"
    else
        _remove_dir "$TEST_TMP"
    fi
    exit "$rc"
}

# ERR trap: say which command made "set -e" end the test.
_on_err() {
    local rc=$1 cmd=$2 line=$3
    echo "ERROR${CASE_NAME:+ [$CASE_NAME]}: command failed with status $rc at line $line${FUNCNAME[1]:+ (in ${FUNCNAME[*]:1})}: $cmd" >&2
}

_set_traps() {
    set -o errtrace
    trap '_on_err $? "$BASH_COMMAND" "$LINENO"' ERR
    trap cleanup EXIT
    trap 'exit 129' HUP
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# ---------------------------------------------------------------------------
# Environment

if [[ -z ${QCOW2FUSE:-} ]]; then
    echo "FAIL: QCOW2FUSE is not set (absolute path of the qcow2fuse binary)" >&2
    exit 1
fi
if [[ $QCOW2FUSE != /* || ! -x $QCOW2FUSE ]]; then
    echo "FAIL: QCOW2FUSE=$QCOW2FUSE is not an absolute path to an executable" >&2
    exit 1
fi

TEST_TMP=$(mktemp -d "${TMPDIR:-/tmp}/qcow2fuse-$TEST_NAME.XXXXXX")
TEST_TMP=$(cd "$TEST_TMP" && pwd -P)
T=$TEST_TMP
_set_traps

# ---------------------------------------------------------------------------
# Cases: independent sub-tests inside one script.  Each runs in a subshell
# with its own scratch directory ($T), its own mount/PID tracking and its own
# cleanup, so one failing case does not stop the others.

_CASES_PASS=()
_CASES_FAIL=()
_CASES_SKIP=()

_case_body() {
    CASE_NAME=$1
    shift
    _KMOUNTS=()
    _LOOPS=()
    _HOST_FS=()
    _HOST_LOOPS=()
    _MOUNTS=()
    _PIDS=()
    _MNT_PID=()
    _MNT_LOG=()
    _CASE_SKIPFILE="$TEST_TMP/.skip.$CASE_NAME"
    T=$(mktemp -d "$TEST_TMP/case-$CASE_NAME.XXXXXX")
    _set_traps
    "$@"
}

# run_case NAME FUNC [ARGS...]: run FUNC ARGS in a subshell as case NAME.
run_case() {
    local name=$1 rc=0 t0 t1
    shift
    # shellcheck disable=SC2053  # CASE_FILTER is a glob on purpose
    if [[ -n ${CASE_FILTER:-} && $name != $CASE_FILTER ]]; then
        return 0
    fi
    echo "--- case $name"
    t0=$(date +%s%N)
    trap - ERR
    set +e
    (
        set -euo pipefail
        _case_body "$name" "$@"
    )
    rc=$?
    set -e
    trap '_on_err $? "$BASH_COMMAND" "$LINENO"' ERR
    t1=$(date +%s%N)
    local ms
    ms=$(((t1 - t0) / 1000000))
    case $rc in
    0)
        echo "--- ok   $name (${ms} ms)"
        _CASES_PASS+=("$name")
        ;;
    "$SKIP_STATUS")
        local why="?"
        [[ -f $TEST_TMP/.skip.$name ]] && why=$(head -n1 "$TEST_TMP/.skip.$name")
        echo "--- skip $name ($why)"
        _CASES_SKIP+=("$name ($why)")
        ;;
    *)
        echo "--- FAIL $name (exit status $rc, ${ms} ms)"
        _CASES_FAIL+=("$name")
        ;;
    esac
    return 0
}

# finish_cases: summary; exits 1 if a case failed, 77 if a case was skipped
# (a skipped check is never reported as a pass), 0 otherwise.
finish_cases() {
    local np=${#_CASES_PASS[@]} nf=${#_CASES_FAIL[@]} ns=${#_CASES_SKIP[@]}
    echo "=== $TEST_NAME: $np case(s) passed, $nf failed, $ns skipped"
    if ((nf > 0)); then
        echo "FAIL: failed cases: ${_CASES_FAIL[*]}" >&2
        exit 1
    fi
    if ((ns > 0)); then
        local IFS=';'
        skip "$ns of $((np + ns)) cases skipped: ${_CASES_SKIP[*]}"
    fi
    if ((np == 0)); then
        skip "no case matched CASE_FILTER=${CASE_FILTER:-}"
    fi
    exit 0
}

# ---------------------------------------------------------------------------
# Images

# virtual_size IMG: virtual size in bytes according to qemu-img.
virtual_size() {
    local out
    out=$(qemu-img info -U --output=json "$1") || fail "qemu-img info $1 failed"
    sed -n 's/^ *"virtual-size": *\([0-9][0-9]*\),*$/\1/p' <<<"$out" | head -n1
}

# img_fmt IMG: qemu format name guessed from the file name.
img_fmt() {
    case $1 in
    *.raw | *.img) echo raw ;;
    *) echo qcow2 ;;
    esac
}

# qio IMG CMD...: run qemu-io commands on IMG; fail the test if one fails.
qio() {
    local img=$1 c log
    shift
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    log="$T/qemu-io.$(_seq).log"
    if ! qemu-io -f "$(img_fmt "$img")" "${args[@]}" "$img" >"$log" 2>&1; then
        cat "$log" >&2
        fail "test setup: qemu-io on $img failed (commands: $*)"
    fi
}

# qio_unmap IMG CMD...: qemu-io with discard=unmap (qio's default ignores
# discard requests, so "discard" would leave the clusters allocated).
qio_unmap() {
    local img=$1 c log="$T/qemu-io.$(_seq).log"
    shift
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    if ! qemu-io -d unmap -f qcow2 "${args[@]}" "$img" >"$log" 2>&1; then
        cat "$log" >&2
        fail "test setup: qemu-io on $img failed (commands: $*)"
    fi
}

# make_sources: create pattern files for "qemu-io write -s FILE" in
# $TEST_TMP/src (call once, at the top level of a test):
#   R1 R2 R3  8 MiB of random bytes each (incompressible, all different)
#   X1 X2     8 MiB of text (compressible, every 16-byte line unique)
make_sources() {
    local d="$TEST_TMP/src"
    mkdir -p "$d"
    R1="$d/r1" R2="$d/r2" R3="$d/r3" X1="$d/x1" X2="$d/x2"
    head -c 8388608 /dev/urandom >"$R1"
    head -c 8388608 /dev/urandom >"$R2"
    head -c 8388608 /dev/urandom >"$R3"
    seq -f '%015g' 1 524288 >"$X1"
    seq -f '%015g' 100000001 100524288 >"$X2"
}

# ref_raw IMG [OUT]: qemu-img convert -O raw of IMG, prints the output path.
ref_raw() {
    local img=$1 out=${2:-"$T/ref.$(_seq).raw"}
    qemu-img convert -U -O raw "$img" "$out" >&2 \
        || fail "test setup: qemu-img convert -O raw $img failed"
    printf '%s\n' "$out"
}

# ref_range IMG OFF LEN OUT: the bytes [OFF, OFF+LEN) of IMG's guest view,
# as produced by qemu (raw filter with offset/size over the image; qemu
# wants 512-byte alignment, so a covering aligned range is cut down).
ref_range() {
    local img=$1 off=$2 len=$3 out=$4 abs a_off a_end
    abs=$(readlink -f "$img")
    a_off=$((off / 512 * 512))
    a_end=$(((off + len + 511) / 512 * 512))
    qemu-img convert -U --image-opts \
        "driver=raw,offset=$a_off,size=$((a_end - a_off)),file.driver=$(img_fmt "$img"),file.file.driver=file,file.file.filename=$abs" \
        -O raw "$out.aligned" >&2 || fail "test setup: qemu-img convert of range $off+$len of $img failed"
    dd if="$out.aligned" of="$out" bs=64k iflag=skip_bytes,count_bytes skip=$((off - a_off)) count="$len" status=none \
        || fail "test setup: dd failed"
    rm -f "$out.aligned"
    [[ $(stat -c %s "$out") == "$len" ]] || fail "test setup: ref_range produced a short file"
}

# describe_diff A B: print where two files first differ.
describe_diff() {
    local a=$1 b=$2 first n
    first=$(io_timeout cmp "$a" "$b" 2>&1 | head -n1) || true
    echo "    cmp: $first" >&2
    n=$(io_timeout cmp -l "$a" "$b" 2>/dev/null | wc -l) || true
    echo "    number of differing bytes (within the common length): $n" >&2
    local off
    off=$(io_timeout cmp -l "$a" "$b" 2>/dev/null | head -n1 | awk '{print $1 - 1}') || true
    if [[ -n $off ]]; then
        printf '    first difference at offset %d (0x%x)\n' "$off" "$off" >&2
        echo "    $a:" >&2
        od -A d -t x1 -j $((off / 16 * 16)) -N 32 "$a" 2>&1 | sed 's/^/      /' >&2 || true
        echo "    $b:" >&2
        od -A d -t x1 -j $((off / 16 * 16)) -N 32 "$b" 2>&1 | sed 's/^/      /' >&2 || true
    fi
}

# same_bytes A B WHAT: A and B must be byte-identical (and equally long).
same_bytes() {
    local a=$1 b=$2 what=$3 rc=0
    io_timeout cmp -s "$a" "$b" || rc=$?
    case $rc in
    0) return 0 ;;
    124 | 137) fail "$what: cmp timed out after ${IO_TIMEOUT}s" ;;
    1)
        describe_diff "$a" "$b"
        fail "$what: contents differ"
        ;;
    *) fail "$what: cmp failed (exit $rc): $(cmp "$a" "$b" 2>&1 | head -n1)" ;;
    esac
}

# compare_raw IMG MNT: MNT/disk must have the virtual size of IMG and be
# byte-identical to "qemu-img convert -O raw IMG".
compare_raw() {
    local img=$1 mnt=$2 ref want got
    ref=$(ref_raw "$img")
    want=$(stat -c %s "$ref")
    got=$(stat -c %s "$mnt/disk") || fail "stat $mnt/disk failed"
    [[ $got == "$want" ]] || fail "$mnt/disk has size $got, expected $want (virtual size of $(basename "$img"))"
    same_bytes "$mnt/disk" "$ref" "$(basename "$img"): $mnt/disk vs qemu-img convert -O raw"
    rm -f "$ref"
}

# ---------------------------------------------------------------------------
# Mounting

# Directory the daemon is started from.  "/" by default, so that nothing can
# accidentally be resolved relative to the test's working directory.
MOUNT_CWD=${MOUNT_CWD:-/}

# _check_sanitizer_output FILE WHAT
_check_sanitizer_output() {
    if [[ -f $1 ]] && grep -Eq 'ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:' "$1"; then
        sed 's/^/    | /' "$1" >&2
        fail "$2: sanitizer reported an error"
    fi
}

# For the tests that start the daemon themselves: "${TRANSPORT_ARGS[@]}"
# is -o transport=$QCOW2FUSE_TRANSPORT, or nothing.
TRANSPORT_ARGS=()
if [[ -n ${QCOW2FUSE_TRANSPORT:-} ]]; then TRANSPORT_ARGS=(-o "transport=$QCOW2FUSE_TRANSPORT"); fi

# with_transport OPTS: OPTS with transport=$QCOW2FUSE_TRANSPORT added when
# that is set and OPTS name no transport of their own.
with_transport() {
    local opts=$1
    if [[ -n ${QCOW2FUSE_TRANSPORT:-} && ,$opts, != *,transport=* ]]; then
        opts=${opts:+$opts,}transport=$QCOW2FUSE_TRANSPORT
    fi
    printf '%s' "$opts"
}

# try_mount IMG MNT [OPTS]: start "$QCOW2FUSE -f [-o OPTS] IMG MNT" in the
# background (from $MOUNT_CWD, IMG made absolute) and wait until MNT/disk
# exists.  Returns 0 when the mount is up (sets MOUNT_MS, the time from
# start to ready in milliseconds), 1 when the daemon exited without mounting
# (sets TRY_RC to its exit status).  Fails the test after MOUNT_TIMEOUT
# seconds.  DAEMON_LOG is the file with the daemon's stdout+stderr.
try_mount() {
    local img=$1 mnt=$2 opts=${3:-} pid t0 now deadline log
    [[ $img == /* ]] || img="$PWD/$img"
    mkdir -p "$mnt"
    mnt=$(canon_path "$mnt")
    if is_mounted "$mnt"; then fail "try_mount: $mnt is already mounted"; fi
    log="$T/daemon.$(_seq).log"
    local args=(-f)
    opts=$(with_transport "$opts")
    if [[ -n $opts ]]; then args+=(-o "$opts"); fi
    t0=$(date +%s%N)
    deadline=$((t0 + MOUNT_TIMEOUT * 1000000000))
    (cd "$MOUNT_CWD" && exec "$QCOW2FUSE" "${args[@]}" "$img" "$mnt") </dev/null >"$log" 2>&1 &
    pid=$!
    _PIDS+=("$pid")
    _MOUNTS+=("$mnt")
    _MNT_PID[$mnt]=$pid
    _MNT_LOG[$mnt]=$log
    DAEMON_LOG=$log
    DAEMON_CMD="$QCOW2FUSE ${args[*]} $img $mnt"
    while :; do
        if is_mounted "$mnt" && [[ -e $mnt/disk ]]; then
            break
        fi
        if ! pid_alive "$pid"; then
            TRY_RC=0
            wait "$pid" || TRY_RC=$?
            unset "_MNT_PID[$mnt]"
            if is_mounted "$mnt"; then
                sed 's/^/    | /' "$log" >&2
                fail "daemon exited with status $TRY_RC but left $mnt mounted"
            fi
            return 1
        fi
        now=$(date +%s%N)
        if ((now > deadline)); then
            sed 's/^/    | /' "$log" >&2
            fail "mount of $img on $mnt not ready after ${MOUNT_TIMEOUT}s"
        fi
        sleep 0.01
    done
    now=$(date +%s%N)
    MOUNT_MS=$(((now - t0) / 1000000))
    info "mounted $(basename "$img") on $mnt${opts:+ (-o $opts)} in ${MOUNT_MS} ms (pid $pid)"
    return 0
}

# mount_image IMG MNT [OPTS]: like try_mount, but the mount must come up.
mount_image() {
    if ! try_mount "$@"; then
        sed 's/^/    | /' "$DAEMON_LOG" >&2
        fail "daemon exited with status $TRY_RC before the mount came up ($DAEMON_CMD)"
    fi
}

# unmount_image MNT: fusermount3 -u, wait for the daemon to exit, require
# exit status 0.
unmount_image() {
    local mnt pid rc i deadline log
    mnt=$(canon_path "$1")
    pid=${_MNT_PID[$mnt]:-}
    log=${_MNT_LOG[$mnt]:-}
    [[ -n $pid ]] || fail "unmount_image: $mnt was not mounted by mount_image"
    for ((i = 0; ; i++)); do
        if fusermount3 -u "$mnt" 2>"$T/fusermount.err"; then
            break
        fi
        if ((i >= 20)); then
            cat "$T/fusermount.err" >&2
            fail "fusermount3 -u $mnt failed"
        fi
        sleep 0.25
    done
    deadline=$(($(date +%s%N) + EXIT_TIMEOUT * 1000000000))
    while pid_alive "$pid"; do
        if (($(date +%s%N) > deadline)); then
            fail "daemon $pid did not exit within ${EXIT_TIMEOUT}s after fusermount3 -u $mnt"
        fi
        sleep 0.02
    done
    rc=0
    wait "$pid" || rc=$?
    unset "_MNT_PID[$mnt]"
    if ((rc != 0)); then
        [[ -n $log ]] && sed 's/^/    | /' "$log" >&2
        fail "daemon for $mnt exited with status $rc after unmount (expected 0)"
    fi
    is_mounted "$mnt" && fail "$mnt is still mounted after fusermount3 -u"
    [[ -n $log ]] && _check_sanitizer_output "$log" "daemon for $mnt"
    # A run of the suite on the ring must not pass on a silent fallback.
    if [[ ${QCOW2FUSE_TRANSPORT:-} == io_uring && -n $log ]] &&
        ! grep -Eq 'io_uring: [0-9]+ queues' "$log"; then
        sed 's/^/    | /' "$log" >&2
        fail "QCOW2FUSE_TRANSPORT=io_uring, but the daemon for $mnt did not start its ring"
    fi
    return 0
}

# expect_refusal IMG MNT [OPTS]: the daemon (foreground) must exit non-zero
# without mounting.  Sets REFUSE_RC and REFUSE_ERR (file with stderr).
expect_refusal() {
    local img=$1 mnt=$2 opts=${3:-} pid rc deadline out
    [[ $img == /* ]] || img="$PWD/$img"
    mkdir -p "$mnt"
    mnt=$(canon_path "$mnt")
    REFUSE_ERR="$T/refuse.$(_seq).err"
    out="$REFUSE_ERR.stdout"
    local args=(-f)
    [[ -n $opts ]] && args+=(-o "$opts")
    (cd "$MOUNT_CWD" && exec "$QCOW2FUSE" "${args[@]}" "$img" "$mnt") </dev/null >"$out" 2>"$REFUSE_ERR" &
    pid=$!
    _PIDS+=("$pid")
    _MOUNTS+=("$mnt")
    deadline=$(($(date +%s%N) + MOUNT_TIMEOUT * 1000000000))
    while pid_alive "$pid"; do
        if is_mounted "$mnt"; then
            sed 's/^/    | /' "$REFUSE_ERR" >&2
            fail "$(basename "$img") was mounted, but the daemon should have refused it"
        fi
        if (($(date +%s%N) > deadline)); then
            fail "daemon neither exited nor mounted $(basename "$img") within ${MOUNT_TIMEOUT}s (expected a refusal)"
        fi
        sleep 0.01
    done
    rc=0
    wait "$pid" || rc=$?
    # shellcheck disable=SC2034  # for the test scripts
    REFUSE_RC=$rc
    if is_mounted "$mnt" || mountpoint -q "$mnt" 2>/dev/null; then
        fail "$mnt is mounted after the daemon exited (exit status $rc)"
    fi
    if ((rc == 0)); then
        sed 's/^/    | /' "$REFUSE_ERR" >&2
        fail "daemon exited with status 0 for $(basename "$img"); expected non-zero"
    fi
    if ((rc > 125)); then
        sed 's/^/    | /' "$REFUSE_ERR" >&2
        fail "daemon died with status $rc (signal $((rc - 128))?) on $(basename "$img") instead of refusing it cleanly"
    fi
    _check_sanitizer_output "$REFUSE_ERR" "daemon on $(basename "$img")"
    [[ -s $REFUSE_ERR ]] || fail "daemon refused $(basename "$img") (status $rc) but printed nothing on stderr"
    info "refused with status $rc: $(head -n3 "$REFUSE_ERR" | tr '\n' ' ')"
}

# stderr_mentions PATTERN...: the last refusal's stderr must match every
# extended regex (case-insensitive).
stderr_mentions() {
    local p
    for p in "$@"; do
        if ! grep -Eqi -- "$p" "$REFUSE_ERR"; then
            sed 's/^/    | /' "$REFUSE_ERR" >&2
            fail "error message does not mention /$p/ (case-insensitive)"
        fi
    done
}

# write_fails FILE: opening FILE for writing (append) must fail with EROFS.
# Checks the message "Read-only file system" from the shell.
write_fails_erofs() {
    local f=$1 out
    # shellcheck disable=SC2016  # $1 is expanded by the inner sh
    if out=$(io_timeout sh -c 'echo x >> "$1"' sh "$f" 2>&1); then
        fail "appending to $f succeeded on a read-only mount"
    fi
    grep -q "Read-only file system" <<<"$out" \
        || fail "appending to $f failed, but not with EROFS: $out"
    if out=$(io_timeout dd if=/dev/zero of="$f" bs=512 count=1 conv=notrunc status=none 2>&1); then
        fail "dd of=$f conv=notrunc succeeded on a read-only mount"
    fi
    grep -q "Read-only file system" <<<"$out" \
        || fail "dd of=$f failed, but not with EROFS: $out"
}

# ---------------------------------------------------------------------------
# Checks shared by the write-path tests

# WRITEMIX_TIMEOUT: seconds one guarded I/O run may take (a hung daemon).
WRITEMIX_TIMEOUT=${WRITEMIX_TIMEOUT:-60}

# check_clean IMG WHAT: "qemu-img check IMG" exits 0 and reports neither
# leaked clusters nor errors.
check_clean() {
    local img=$1 what=$2 out rc=0
    out=$(qemu-img check "$img" 2>&1) || rc=$?
    if ((rc != 0)) || grep -Eqi 'leak' <<<"$out" || grep -Eq 'ERROR|[0-9]+ errors? were found|corrupt' <<<"$out"; then
        sed 's/^/    | /' <<<"$out" >&2
        fail "$what: qemu-img check $(basename "$img") is not clean (exit status $rc)"
    fi
    info "$what: qemu-img check clean ($(grep -m1 -o '[0-9.]*% allocated' <<<"$out" || echo '?'))"
}

# check_identical IMG RAW WHAT: "qemu-img compare IMG RAW" says identical.
check_identical() {
    local img=$1 raw=$2 what=$3 out rc=0
    out=$(qemu-img compare -f qcow2 -F raw "$img" "$raw" 2>&1) || rc=$?
    if ((rc != 0)); then
        sed 's/^/    | /' <<<"$out" >&2
        fail "$what: qemu-img compare $(basename "$img") $(basename "$raw") exit status $rc (expected identical)"
    fi
    grep -q 'Images are identical' <<<"$out" || fail "$what: qemu-img compare said: $out"
}

# guarded MNT OUT CMD...: run CMD (which does I/O on MNT/disk) with its
# output in OUT and a deadline of WRITEMIX_TIMEOUT seconds.  A process
# waiting for a FUSE request the daemon never answers cannot even be killed,
# so on the deadline the daemon's stacks are shown (with gdb, if installed)
# and the daemon, started by this test, is killed to abort the connection.
# Returns CMD's status, or 124 on the deadline.
guarded() {
    local mnt=$1 out=$2 cpid dpid i rc=0
    shift 2
    "$@" >"$out" 2>&1 &
    cpid=$!
    for ((i = 0; i < WRITEMIX_TIMEOUT * 10; i++)); do
        pid_alive "$cpid" || break
        sleep 0.1
    done
    if pid_alive "$cpid"; then
        dpid=${_MNT_PID[$(canon_path "$mnt")]:-}
        echo "    $1 did not finish within ${WRITEMIX_TIMEOUT}s; daemon pid ${dpid:-?}" >&2
        if [[ -n $dpid ]] && command -v gdb >/dev/null 2>&1; then
            timeout -k 5 30 gdb -p "$dpid" -batch -ex 'thread apply all bt 10' 2>/dev/null \
                | grep -E '^(Thread|#)' | sed 's/^/    gdb| /' >&2 || true
        fi
        if [[ -n $dpid ]]; then kill -KILL "$dpid" 2>/dev/null || true; fi
        kill -KILL "$cpid" 2>/dev/null || true
        wait "$cpid" 2>/dev/null || true
        return 124
    fi
    wait "$cpid" || rc=$?
    return "$rc"
}

# sanitized_build BINARY: BINARY is linked with AddressSanitizer or
# ThreadSanitizer.  (Not `ldd | grep -q`: grep's early exit can end ldd with
# SIGPIPE, and under pipefail the test then reads as false.)
sanitized_build() {
    local libs
    libs=$(ldd "$1" 2>/dev/null) || true
    [[ $libs == *libasan* || $libs == *libtsan* ]]
}
