#!/usr/bin/env bash
#
# Run the qcow2fuse integration tests.
#
#   QCOW2FUSE=/abs/path/qcow2fuse TOOLS=/abs/path/tools tests/integration/run.sh [GLOB]
#
# Runs every tests/integration/test_*.sh in sorted order, each in its own
# bash process with a timeout, and prints one line per test:
#   PASS name | FAIL name | SKIP name (reason)
# followed by "N passed, N failed, N skipped".  Exits 1 if a test failed.
#
# GLOB (optional) selects tests by name, e.g. 'test_read_*' or '*errors*'
# (the name is the file name without .sh; the ".sh" suffix is accepted too).
#
# Environment:
#   TEST_TIMEOUT  seconds per test script (default 300)
#   VERBOSE=1     print the log of every test, not only of failed ones
#   LOG_DIR       keep the per-test logs there (default: a temporary dir
#                 that is removed at the end)

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

(($# <= 1)) || die "usage: $0 [GLOB]"
filter=${1:-*}
filter=${filter%.sh}

timeout_s=${TEST_TIMEOUT:-300}
if [[ -n ${LOG_DIR:-} ]]; then
    mkdir -p "$LOG_DIR"
    logdir=$(cd "$LOG_DIR" && pwd -P)
    keep_logs=1
else
    logdir=$(mktemp -d "${TMPDIR:-/tmp}/qcow2fuse-logs.XXXXXX")
    keep_logs=0
fi
trap '[[ $keep_logs == 1 ]] || rm -rf "$logdir"' EXIT

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
    # shellcheck disable=SC2053  # glob match on purpose
    [[ $name == $filter ]] || continue
    ran=$((ran + 1))
    log="$logdir/$name.log"
    start=$(date +%s%N)
    rc=0
    timeout -k 15 "$timeout_s" bash "$t" </dev/null >"$log" 2>&1 || rc=$?
    ms=$((($(date +%s%N) - start) / 1000000))
    case $rc in
    0)
        passed=$((passed + 1))
        echo "PASS $name"
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
    echo "run.sh: no test matches '$filter'" >&2
fi
echo "$passed passed, $failed failed, $skipped skipped"
if ((failed > 0 || ran == 0)); then
    exit 1
fi
exit 0
