#!/usr/bin/env bash
#
# Run the integration suite (every script: each one mounts) once more on the
# io_uring transport:
#
#   QCOW2FUSE=... TOOLS=... tests/integration/on_io_uring.sh [GLOB...]
#
# Two tests run shorter here, unless set (make check must stay within its
# 15 minutes on 2 cores): test_mutated_images gets a 30 s budget instead of
# 180 s (MUT_BUDGET): the classic pass already put every mutation through
# the parsers, which do not depend on the transport; this pass checks that
# refusals, EIO replies and unmounts work on the ring, on a sample.  And
# test_concurrency's stress runs 4 s per case instead of 8 (STRESS_SECONDS).
#
# Turns the kernel's switch (/sys/module/fuse/parameters/enable_uring) on,
# runs run.sh with QCOW2FUSE_TRANSPORT=io_uring (the mount helpers then add
# -o transport=io_uring and fail a mount whose daemon did not start its
# ring) and puts the switch back however it ends.  Without the switch (a
# kernel without FUSE over io_uring, or not root) it says SKIP and why, and
# exits 0: the classic run already covered the same tests.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
switch=/sys/module/fuse/parameters/enable_uring

if [[ ! -e $switch ]]; then
    echo "SKIP io_uring pass: $switch is missing (no FUSE over io_uring in this kernel)"
    exit 0
fi
if [[ ! -w $switch ]]; then
    echo "SKIP io_uring pass: $switch is not writable (needs root)"
    exit 0
fi
old=$(cat "$switch")
trap 'echo "$old" >"$switch"' EXIT
echo Y >"$switch"
echo "--- the integration tests again, on -o transport=io_uring"
rc=0
MUT_BUDGET=${MUT_BUDGET:-30} STRESS_SECONDS=${STRESS_SECONDS:-4} QCOW2FUSE_TRANSPORT=io_uring "$here/run.sh" "$@" || rc=$?
exit "$rc"
