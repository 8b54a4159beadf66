#!/usr/bin/env bash
#
# Copy-on-read and streaming of the backing chain (-o copy-on-read,
# -o stream[=RATE]).  The chain is three deep: a raw base of random bytes,
# a qcow2 mid over it (data, zero clusters and compressed clusters written
# by qemu-io) and a qcow2 top over mid (data, a zero cluster over base
# data), top larger than mid and mid larger than base.  The oracle is
# qemu-img convert -O raw of the chain taken before the mount: the guest
# view never changes by streaming.
#
# Cases:
#   stream      stream to the end: the statistics say done, qemu-img info
#               shows no backing file (nor its format), the content equals
#               the chain's, qemu-img check is clean, mid and base unchanged
#   resume      stream=RATE, SIGKILL midway: the image is as the chain
#               (no corruption, the backing file still there); a second
#               mount with -o stream completes, filling less than the first
#               run would have to (it resumes from the map)
#   cor         -o copy-on-read: the ranges read by dd are allocated in top
#               afterwards (qemu-io alloc), the rest is not; content equal,
#               check clean, the backing file stays
#   guest-wins  guest writes (dd) while the stream runs, ahead of it and
#               behind it: the final content has them
#   unmount     unmounted midway: prompt exit, clean image over its chain
#   subclusters extended L2: partly allocated clusters filled unit by unit
#   refusals    ro + stream, ro + copy-on-read, snapshot= + stream are
#               refused with a message; stream on an image without a
#               backing file says nothing to stream and changes nothing
# shellcheck disable=SC2317  # case functions are called indirectly (run_case)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io getfattr
requires_fuse

M=$((1024 * 1024))
# seconds a stream may take before the test gives up
STREAM_TIMEOUT=${STREAM_TIMEOUT:-60}

# make_chain DIR: DIR/base.raw (12 MiB) <- DIR/mid.qcow2 (14 MiB) <-
# DIR/top.qcow2 (16 MiB), with data in every layer.  Sets TOP and REF (the
# chain's content, qemu-img convert -O raw).
make_chain() {
    local d=$1
    head -c $((12 * M)) /dev/urandom >"$d/base.raw"
    qemu-img create -q -f qcow2 -b "$d/base.raw" -F raw "$d/mid.qcow2" $((14 * M)) \
        || fail "test setup: qemu-img create mid failed"
    qio "$d/mid.qcow2" "write -P 0x11 $((1 * M)) $((1 * M))" \
        "write -z $((3 * M)) $((1 * M))" \
        "write -c -P 0x22 $((5 * M)) 256k" \
        "write -P 0x23 $((13 * M)) 64k"
    qemu-img create -q -f qcow2 -b "$d/mid.qcow2" -F qcow2 "$d/top.qcow2" $((16 * M)) \
        || fail "test setup: qemu-img create top failed"
    qio "$d/top.qcow2" "write -P 0x33 $((1536 * 1024)) 64k" \
        "write -z $((7 * M)) 64k" \
        "write -P 0x44 $((9 * M)) 512k"
    TOP=$d/top.qcow2
    REF=$(ref_raw "$TOP" "$d/ref.raw")
}

# stats MNT: the statistics line of MNT/disk.
stats() {
    io_timeout getfattr --only-values -n user.qcow2fuse.stats "$1/disk" 2>/dev/null || true
}

# wait_stats MNT REGEX: poll the statistics until they match REGEX (fail
# after STREAM_TIMEOUT seconds).
wait_stats() {
    local mnt=$1 re=$2 deadline s
    deadline=$(($(date +%s) + STREAM_TIMEOUT))
    while :; do
        s=$(stats "$mnt")
        [[ $s =~ $re ]] && break
        [[ $s == *"stream failed"* ]] && fail "the stream failed: $s"
        (($(date +%s) <= deadline)) || fail "no /$re/ in the statistics after ${STREAM_TIMEOUT}s: $s"
        sleep 0.1
    done
    STATS=$s
}

# filled STATS: the bytes the stream filled, from a statistics line.
filled() {
    sed -n 's/.*, \([0-9]*\) bytes filled).*/\1/p' <<<"$1"
}

# no_backing IMG: qemu-img info shows neither a backing file nor its format.
no_backing() {
    local out
    out=$(qemu-img info --output=json "$1") || fail "qemu-img info $1 failed"
    if grep -q '"backing-filename\|"full-backing-filename\|"backing-filename-format' <<<"$out"; then
        sed 's/^/    | /' <<<"$out" >&2
        fail "$(basename "$1") still names a backing file"
    fi
}

# has_backing IMG
has_backing() {
    qemu-img info -U --output=json "$1" | grep -q '"backing-filename"' \
        || fail "$(basename "$1") lost its backing file"
}

# allocated IMG OFF LEN: the bytes of [OFF, +LEN) allocated in IMG itself
# (not in its backing chain), as qemu-io's alloc counts them.
allocated() {
    local out
    out=$(qemu-io -r -U -f qcow2 -c "alloc $2 $3" "$1") || fail "qemu-io alloc on $1 failed"
    sed -n 's,^\([0-9]*\)/[0-9]* bytes allocated.*,\1,p' <<<"$out"
}

case_stream() {
    local mnt=$T/mnt mid_sum base_sum
    make_chain "$T"
    mid_sum=$(md5sum <"$T/mid.qcow2")
    base_sum=$(md5sum <"$T/base.raw")
    mount_image "$TOP" "$mnt" stream
    wait_stats "$mnt" "stream done 100%"
    info "statistics: $STATS"
    same_bytes "$mnt/disk" "$REF" "the disk after streaming"
    unmount_image "$mnt"
    grep -q "stream: done" "$DAEMON_LOG" || fail "no 'stream: done' in the log"
    grep -q "stream: 50% walked" "$DAEMON_LOG" || fail "no progress lines in the log"
    no_backing "$TOP"
    check_clean "$TOP" "streamed image"
    same_bytes "$(ref_raw "$TOP")" "$REF" "the streamed image (qemu-img convert) vs the chain before"
    [[ $(md5sum <"$T/mid.qcow2") == "$mid_sum" ]] || fail "mid.qcow2 changed"
    [[ $(md5sum <"$T/base.raw") == "$base_sum" ]] || fail "base.raw changed"
    # mid's zero clusters (3 MiB) are zero clusters in top, not data
    qemu-img map --output=json "$TOP" >"$T/map.json"
    grep -q "\"start\": $((3 * M)), \"length\": $M, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false" "$T/map.json" \
        || { sed 's/^/    | /' "$T/map.json" >&2; fail "mid's zero range is not a zero range in top"; }
    # and a remount with -o stream has nothing to do
    mount_image "$TOP" "$mnt" stream
    grep -q "nothing to stream" "$DAEMON_LOG" || fail "second mount: no 'nothing to stream'"
    unmount_image "$mnt"
}

case_resume() {
    local mnt=$T/mnt pid s first second total
    make_chain "$T"
    total=$((12 * M + 2 * M))   # at most what the chain can fill (its 14 MiB)
    mount_image "$TOP" "$mnt" stream=3M
    pid=${_MNT_PID[$(canon_path "$mnt")]}
    wait_stats "$mnt" "stream running ([3-9][0-9])%"
    first=$(filled "$STATS")
    info "killing the daemon at: $STATS"
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
    unset "_MNT_PID[$(canon_path "$mnt")]"
    fusermount3 -uz "$mnt" 2>/dev/null || true
    has_backing "$TOP"
    local rc=0
    qemu-img check "$TOP" >"$T/check.out" 2>&1 || rc=$?
    ((rc == 0 || rc == 3)) || { sed 's/^/    | /' "$T/check.out" >&2; fail "qemu-img check after SIGKILL: exit $rc"; }
    same_bytes "$(ref_raw "$TOP")" "$REF" "the image after SIGKILL mid-stream"
    s=$(allocated "$TOP" 0 $((16 * M)))
    info "after the kill: $s bytes allocated in top (the daemon had filled $first)"
    ((s > 2 * M)) || fail "nothing of the stream's progress reached the disk"
    ((rc == 0)) || qemu-img check -q -r leaks "$TOP" || fail "qemu-img check -r leaks failed"

    mount_image "$TOP" "$mnt" stream
    wait_stats "$mnt" "stream done 100%"
    second=$(filled "$STATS")
    info "second run: $STATS"
    # It resumed: what the first run made durable was not copied again.
    ((second < total - 2 * M)) || fail "the second run filled $second bytes: it did not resume"
    same_bytes "$mnt/disk" "$REF" "the disk after the resumed stream"
    unmount_image "$mnt"
    no_backing "$TOP"
    check_clean "$TOP" "resumed stream"
    same_bytes "$(ref_raw "$TOP")" "$REF" "the image after the resumed stream"
}

case_cor() {
    local mnt=$T/mnt a
    make_chain "$T"
    a=$(allocated "$TOP" $((2 * M)) $((3 * M)))
    ((a == 0)) || fail "test setup: [2M, 5M) of top is allocated before the reads ($a)"
    mount_image "$TOP" "$mnt" copy-on-read
    # [2M, 5M): base data, mid's zero clusters; [5M, 5M+256k): mid's
    # compressed clusters; an unaligned read at 11M+1000
    dd if="$mnt/disk" of="$T/r1" bs=64k skip=32 count=48 status=none || fail "dd failed"
    dd if="$mnt/disk" of="$T/r2" bs=64k skip=80 count=4 status=none || fail "dd failed"
    dd if="$mnt/disk" of="$T/r3" bs=1000 skip=$((11 * M / 1000 + 1)) count=3 status=none || fail "dd failed"
    ref_range "$TOP" $((2 * M)) $((3 * M)) "$T/e1"
    same_bytes "$T/r1" "$T/e1" "copy-on-read: the bytes read"
    info "statistics: $(stats "$mnt")"
    [[ $(stats "$mnt") =~ "copied on read "[1-9] ]] || fail "the statistics show no copy-on-read"
    unmount_image "$mnt"
    has_backing "$TOP"
    check_clean "$TOP" "after copy-on-read"
    # what was read is in top now; what was not stays in the chain
    a=$(allocated "$TOP" $((2 * M)) $((3 * M + 256 * 1024)))
    ((a == 3 * M + 256 * 1024)) || fail "[2M, 5M+256k) has $a bytes allocated in top after the reads"
    a=$(allocated "$TOP" $((11 * M)) 65536)
    ((a == 65536)) || fail "the cluster of the unaligned read is not allocated in top ($a)"
    a=$(allocated "$TOP" $((10 * M)) $M)
    ((a == 0)) || fail "[10M, 11M) was not read but is allocated in top ($a)"
    same_bytes "$(ref_raw "$TOP")" "$REF" "the image after copy-on-read"
}

case_guest_wins() {
    local mnt=$T/mnt exp=$T/expected.raw off
    make_chain "$T"
    cp "$REF" "$exp"
    head -c $((4 * M)) /dev/urandom >"$T/pattern"
    mount_image "$TOP" "$mnt" stream=4M
    wait_stats "$mnt" "stream running ([1-9][0-9]?)%"
    info "writing while: $STATS"
    # behind and ahead of the stream, whole and partial clusters
    for off in $((100 * 1024)) $((6 * M + 4096)) $((10 * M)) $((12 * M - 8192)) $((13 * M + 512)); do
        dd if="$T/pattern" of="$mnt/disk" bs=4096 count=20 seek=$((off / 512)) oflag=seek_bytes \
            conv=notrunc status=none || fail "dd into the disk at $off failed"
        dd if="$T/pattern" of="$exp" bs=4096 count=20 seek=$((off / 512)) oflag=seek_bytes \
            conv=notrunc status=none
    done
    wait_stats "$mnt" "stream done 100%"
    same_bytes "$mnt/disk" "$exp" "the disk after streaming with guest writes"
    unmount_image "$mnt"
    no_backing "$TOP"
    check_clean "$TOP" "stream with guest writes"
    same_bytes "$(ref_raw "$TOP")" "$exp" "the image after streaming with guest writes"
}

# Unmounted while it streams: the daemon exits at once (unmount_image's
# deadline), the stream says where it stopped, the image is clean and
# still over its chain with the chain's content.
case_unmount() {
    local mnt=$T/mnt
    make_chain "$T"
    mount_image "$TOP" "$mnt" stream=2M
    wait_stats "$mnt" "stream running ([1-9][0-9])%"
    unmount_image "$mnt"
    grep -q "stream: stopped at byte" "$DAEMON_LOG" || fail "no 'stream: stopped' in the log"
    has_backing "$TOP"
    check_clean "$TOP" "stream stopped by unmount"
    same_bytes "$(ref_raw "$TOP")" "$REF" "the image after a stopped stream"
}

# Extended L2 entries: partial writes in top leave clusters with some
# subclusters allocated; the stream fills only the others.
case_subclusters() {
    local mnt=$T/mnt
    make_chain "$T"
    qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=65536 -b "$T/mid.qcow2" \
        -F qcow2 "$TOP" $((16 * M)) || fail "test setup: qemu-img create failed"
    qio "$TOP" "write -P 0x33 $((1536 * 1024 + 4096)) 4096" \
        "write -P 0x34 $((9 * M + 30000)) 70000" \
        "write -z $((3 * M + 8192)) 4096"
    REF=$(ref_raw "$TOP" "$T/ref.raw")
    mount_image "$TOP" "$mnt" stream
    wait_stats "$mnt" "stream done 100%"
    same_bytes "$mnt/disk" "$REF" "the disk after streaming (extended L2)"
    unmount_image "$mnt"
    no_backing "$TOP"
    check_clean "$TOP" "streamed image with extended L2"
    same_bytes "$(ref_raw "$TOP")" "$REF" "the streamed image with extended L2"
}

# An internal snapshot reads the chain where it has no cluster of its own:
# streaming fills the disk but must keep the backing file, or the snapshot
# would read zeros there.
case_snapshots_keep_backing() {
    local mnt=$T/mnt snap_ref
    make_chain "$T"
    qemu-img snapshot -c s1 "$TOP" || fail "test setup: qemu-img snapshot failed"
    snap_ref=$T/snap.raw
    qemu-img convert -U -l snapshot.name=s1 -O raw "$TOP" "$snap_ref" \
        || fail "test setup: converting snapshot s1 failed"
    mount_image "$TOP" "$mnt" stream
    wait_stats "$mnt" "stream done 100%"
    same_bytes "$mnt/disk" "$REF" "the disk after streaming"
    unmount_image "$mnt"
    grep -q "internal snapshots still read from it" "$DAEMON_LOG" \
        || fail "no log line saying why the backing file stays"
    has_backing "$TOP"
    check_clean "$TOP" "streamed image with a snapshot"
    qemu-img convert -U -l snapshot.name=s1 -O raw "$TOP" "$T/snap_after.raw" \
        || fail "converting snapshot s1 after streaming failed"
    same_bytes "$T/snap_after.raw" "$snap_ref" "snapshot s1 after streaming"
    same_bytes "$(ref_raw "$TOP")" "$REF" "the streamed image vs the chain before"
}

case_refusals() {
    local mnt=$T/mnt img=$T/alone.qcow2 sum
    make_chain "$T"
    expect_refusal "$TOP" "$mnt" ro,stream
    stderr_mentions "stream" "-o ro"
    expect_refusal "$TOP" "$mnt" ro,copy-on-read
    stderr_mentions "copy-on-read" "-o ro"
    qemu-img snapshot -c snap "$TOP" || fail "test setup: qemu-img snapshot failed"
    expect_refusal "$TOP" "$mnt" snapshot=snap,stream=1M
    stderr_mentions "stream" "snapshot"
    expect_refusal "$TOP" "$mnt" stream=fast
    stderr_mentions "stream"

    qemu-img create -q -f qcow2 "$img" $((4 * M))
    qio "$img" "write -P 0x55 0 64k"
    sum=$(md5sum <"$img")
    mount_image "$img" "$mnt" stream,copy-on-read
    dd if="$mnt/disk" of=/dev/null bs=64k status=none || fail "dd failed"
    unmount_image "$mnt"
    grep -q "nothing to stream" "$DAEMON_LOG" || fail "no 'nothing to stream' for an image without backing file"
    [[ $(md5sum <"$img") == "$sum" ]] || fail "stream on an image without a backing file changed it"
}

run_case stream case_stream
run_case resume case_resume
run_case cor case_cor
run_case guest-wins case_guest_wins
run_case unmount case_unmount
run_case subclusters case_subclusters
run_case refusals case_refusals
run_case snapshots-keep-backing case_snapshots_keep_backing
finish_cases
