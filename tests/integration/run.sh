#!/usr/bin/env bash
#
# Run the qcow2fuse integration tests.
#
#   QCOW2FUSE=/abs/path/qcow2fuse TOOLS=/abs/path/tools tests/integration/run.sh [GLOB...]
#
# Runs every tests/integration/test_*.sh in sorted order, each in its own
# bash process with a timeout, and prints one line per test:
#   PASS name | FAIL name | SKIP name (reason)
# followed by "N passed, N failed, N skipped".  Exits 1 if a test failed.
#
# GLOBs (optional) select tests by name, e.g. 'test_read_*' or '*errors*'
# (the name is the file name without .sh; the ".sh" suffix is accepted too);
# a test runs when it matches any of them.
#
# Environment:
#   TEST_TIMEOUT  seconds per test script (default 300)
#   VERBOSE=1     print the log of every test, not only of failed ones
#   LOG_DIR       keep the per-test logs there (default: they are removed
#                 at the end)
#   TMPDIR        where the run's scratch directory is created (default /tmp)

set -euo pipefail
export LC_ALL=C

die() {
    echo "run.sh: $*" >&2
    exit 2
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

[[ -n ${QCOW2FUSE:-} ]] || die "QCOW2FUSE is not set (absolute path of the qcow2fuse binary)"
[[ -n ${TOOLS:-} ]] || die "TOOLS is not set (directory with the tools built from tests/tools/*.c)"
[[ $QCOW2FUSE == /* ]] || die "QCOW2FUSE=$QCOW2FUSE must be an absolute path"
[[ -x $QCOW2FUSE ]] || die "QCOW2FUSE=$QCOW2FUSE is not an executable file"
[[ $TOOLS == /* ]] || die "TOOLS=$TOOLS must be an absolute path"
[[ -d $TOOLS ]] || die "TOOLS=$TOOLS is not a directory"
export QCOW2FUSE TOOLS

filters=()
for f in "${@:-*}"; do filters+=("${f%.sh}"); done

timeout_s=${TEST_TIMEOUT:-300}

# Every test gets its own TMPDIR below $workroot, so that whatever a test
# leaves behind (after a crash or a timeout) can be found and removed.
workroot=$(mktemp -d "${TMPDIR:-/tmp}/qcow2fuse-run.XXXXXX")
workroot=$(cd "$workroot" && pwd -P)
if [[ -n ${LOG_DIR:-} ]]; then
    mkdir -p "$LOG_DIR"
    logdir=$(cd "$LOG_DIR" && pwd -P)
else
    logdir="$workroot/logs"
    mkdir -p "$logdir"
fi

# mounts_under DIR: mount points at or below DIR (deepest first).
mounts_under() {
    local dir=${1// /\\040} fields
    while read -r -a fields; do
        case ${fields[4]} in
        "$dir" | "$dir"/*) printf '%s\n' "${fields[4]//\\040/ }" ;;
        esac
    done </proc/self/mountinfo | sort -r
}

# pids_under DIR: processes with an open file or their cwd below DIR.
pids_under() {
    local pat
    pat=$(printf '%s' "$1" | sed 's/[][*?\\]/\\&/g')
    {
        find /proc/[0-9]*/fd /proc/[0-9]*/map_files -mindepth 1 -maxdepth 1 -lname "$pat/*" 2>/dev/null
        find /proc/[0-9]*/cwd -maxdepth 0 \( -lname "$pat" -o -lname "$pat/*" \) 2>/dev/null
    } | cut -d/ -f3 | sort -un | grep -vx "$$" || true
}

# reap_leftovers DIR: unmount and stop what a test left below DIR; prints
# one "LEAK: ..." line per item; returns 1 if there was anything.
reap_leftovers() {
    local dir=$1 m p leaked=0 i
    while read -r m; do
        [[ -n $m ]] || continue
        echo "    LEAK: mount left behind: $m"
        leaked=1
        fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done < <(mounts_under "$dir")
    for p in $(pids_under "$dir"); do
        echo "    LEAK: process left behind: $p ($(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null))"
        leaked=1
        kill -TERM "$p" 2>/dev/null || true
    done
    for ((i = 0; i < 50; i++)); do
        [[ -z $(pids_under "$dir") ]] && break
        sleep 0.1
    done
    for p in $(pids_under "$dir"); do
        kill -KILL "$p" 2>/dev/null || true
    done
    while read -r m; do
        [[ -n $m ]] || continue
        fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done < <(mounts_under "$dir")
    return $((leaked))
}

# shellcheck disable=SC2317  # called from the EXIT trap
cleanup_run() {
    reap_leftovers "$workroot" >/dev/null 2>&1 || true
    if [[ -z $(mounts_under "$workroot") ]]; then
        rm -rf --one-file-system "$workroot"
    else
        echo "run.sh: could not unmount everything below $workroot; left in place" >&2
    fi
}
trap cleanup_run EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

shopt -s nullglob
tests=("$here"/test_*.sh)
shopt -u nullglob
mapfile -t tests < <(printf '%s\n' "${tests[@]}" | sort)

passed=0
failed=0
skipped=0
ran=0
for t in "${tests[@]}"; do
    [[ -n $t ]] || continue
    name=$(basename "$t" .sh)
    selected=0
    for f in "${filters[@]}"; do
        # shellcheck disable=SC2053  # glob match on purpose
        [[ $name == $f ]] && selected=1
    done
    ((selected)) || continue
    ran=$((ran + 1))
    log="$logdir/$name.log"
    tdir="$workroot/$name"
    mkdir -p "$tdir"
    start=$(date +%s%N)
    rc=0
    TMPDIR=$tdir timeout -k 15 "$timeout_s" bash "$t" </dev/null >"$log" 2>&1 || rc=$?
    if ! reap_leftovers "$tdir" >>"$log" 2>&1; then
        echo "run.sh: $name left mounts or processes behind (see LEAK lines)" >>"$log"
        [[ $rc == 0 || $rc == 77 ]] && rc=1
    fi
    rm -rf --one-file-system "$tdir" 2>/dev/null || true
    ms=$((($(date +%s%N) - start) / 1000000))
    case $rc in
    0)
        passed=$((passed + 1))
        echo "PASS $name ($((ms / 1000)).$((ms % 1000 / 100)) s)"
        ;;
    77)
        skipped=$((skipped + 1))
        reason=$(grep '^SKIP: ' "$log" | tail -n1 | sed 's/^SKIP: //')
        echo "SKIP $name (${reason:-no reason given})"
        ;;
    *)
        failed=$((failed + 1))
        if ((rc == 124 || rc == 137)); then
            echo "FAIL $name (timed out after ${timeout_s}s)"
        else
            echo "FAIL $name (exit status $rc)"
        fi
        ;;
    esac
    if [[ $rc != 0 && $rc != 77 ]] || [[ ${VERBOSE:-0} == 1 ]]; then
        echo "    ---- log of $name (${ms} ms) ----"
        sed 's/^/    /' "$log"
        echo "    ---- end of $name ----"
    fi
done

if ((ran == 0)); then
    echo "run.sh: no test matches ${filters[*]}" >&2
fi
echo "$passed passed, $failed failed, $skipped skipped"
if ((failed > 0 || ran == 0)); then
    exit 1
fi
exit 0
