#!/usr/bin/env bash
#
# Power-loss simulation.  The daemon is mounted with -o io-trace=TRACE and
# driven by $TOOLS/plwriter (a seeded single-threaded workload of
# self-describing sector writes, some zeroing fallocates (punch hole, zero
# range), fsyncs, resizes that grow the disk (one in the middle of every
# run, a few random ones; later writes land in the new area too) and a
# refused shrink over written data); after a clean unmount
# $TOOLS/plreplay rebuilds crash states from the trace (everything before
# a host flush F, any subset of the records between F and the next flush,
# writes torn at 4 KiB) and checks every state with qemu-img check (no
# corruption; leaks are allowed) and its guest content against plwriter's
# log (every write covered by a completed fsync must be there; the virtual
# size must be at least the one set by the last resize before that fsync,
# and a grown area never written reads as zeros).
#
# Every case checks that the final image's virtual size grew; the cases
# whose growth needs a larger L1 table (64K clusters grown past 512 MiB, 4K
# and 512-byte clusters, whose L1 tables exactly cover the created size)
# check that the L1 table moved.
#
# Cases: 64K clusters, 4K clusters with refcount_bits=16 (new L2 tables and
# refcount blocks), 512-byte clusters with refcount_bits=1 and =64 (the
# refcount table grows), an overlay over a raw backing file (partial-cluster
# copy-on-write from the backing file), a compressed image and an image with
# an internal snapshot (copy-on-write of shared clusters, freed clusters),
# and streaming (a chain of three filled into the image while plwriter
# runs, then the backing file dropped).
# Appends (plwriter -a) on 64K clusters and on 512-byte clusters with
# refcount_bits=64: crash states inside the cluster reservation, one host
# flush per fsync (counted from the trace), refcount growth inside it.
# And flush-fails: the image file (or its external data file) behind
# qemu-storage-daemon's blkdebug, whose K-th flush fails once (see
# flush_fails): the failure must stick, the daemon exit with status 1, and
# the trace replay as above.
#
# Environment: POWERLOSS_SEED (default fixed, printed) changes every
# workload and every choice of states; POWERLOSS_SCALE=N multiplies the
# number of operations and states; POWERLOSS_JOBS (default 2) is the number
# of plreplay workers.  Run with KEEP_TMP=1 to keep the images of the bad
# states (plreplay --keep-bad) for inspection.
# shellcheck disable=SC2317  # case functions are called indirectly (run_case)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img seq timeout
requires_fuse
PLWRITER=$(require_tool plwriter)
PLREPLAY=$(require_tool plreplay)

M=$((1024 * 1024))
WRITER_FLAGS=()             # plwriter options of the next powerloss call
SEED=${POWERLOSS_SEED:-1913}
SCALE=${POWERLOSS_SCALE:-1}
JOBS=${POWERLOSS_JOBS:-2}
# plwriter takes about a second; plreplay runs qemu-img twice per state.
WRITER_TIMEOUT=${WRITER_TIMEOUT:-60}
REPLAY_TIMEOUT=${REPLAY_TIMEOUT:-240}

echo "powerloss: seed $SEED (set POWERLOSS_SEED to change), scale $SCALE, $JOBS replay jobs"

# A 32 MiB raw file of text lines "000000000000001\n"... (every 16 bytes
# unique): the backing file, and its first 16 MiB the source of the
# pre-filled images (small, so that the workload overwrites most clusters).
BASE_RAW="$TEST_TMP/base.raw"
BASE16_RAW="$TEST_TMP/base16.raw"
seq -f '%015g' 1 2097152 >"$BASE_RAW"
head -c $((16 * M)) "$BASE_RAW" >"$BASE16_RAW"

# be_int FILE OFFSET BYTES: a big-endian unsigned header field
be_int() {
    local hex
    hex=$(od -An -t x1 -j "$2" -N "$3" "$1" | tr -d ' \n')
    [[ ${#hex} == $((2 * $3)) ]] || fail "cannot read $3 bytes at $2 of $1"
    printf '%s\n' "$((16#$hex))"
}

# json_field JSON KEY: an integer field of qemu-img's JSON output (0 if absent)
json_field() {
    local v
    v=$(sed -n "s/^ *\"$2\": *\([0-9][0-9]*\),*\$/\1/p" <<<"$1" | head -n1)
    printf '%s\n' "${v:-0}"
}

# powerloss IMG NOPS STATES SEED [BASE_RAW [GROW]]: IMG is the prepared
# image (its state before the mount); mount it with an I/O trace (and the
# options in PL_MOUNT_OPTS), run plwriter (GROW: the growth of its mid-run
# resize, default random 1..64 MiB), run PL_BEFORE_UNMOUNT MNT if set,
# unmount, check the final image (it must have grown to the last size
# plwriter logged), replay STATES crash states.  Sets IMAGE_END (the final
# image's end offset according to qemu-img check) and L1_MOVED (1 if the
# header's L1 table offset changed).
powerloss() {
    local img=$1 nops=$(($2 * SCALE)) states=$(($3 * SCALE)) seed=$4 base=${5:-} grow=${6:-}
    local orig="$T/orig.qcow2" trace="$T/trace" log="$T/plwriter.log" mnt="$T/mnt"
    local rc out json size0 size1 l1off0 l1off1 l1n0 l1n1 logged nres nshrink

    cp --sparse=always "$img" "$orig" || fail "test setup: cp failed"
    size0=$(be_int "$img" 24 8)
    l1n0=$(be_int "$img" 36 4)
    l1off0=$(be_int "$img" 40 8)
    mount_image "$img" "$mnt" "io-trace=$trace${PL_MOUNT_OPTS:+,$PL_MOUNT_OPTS}"
    info "plwriter: seed $seed, $nops operations${grow:+, mid-run growth $grow bytes}"
    rc=0
    timeout -k 5 "$WRITER_TIMEOUT" "$PLWRITER" ${WRITER_FLAGS[@]+"${WRITER_FLAGS[@]}"} \
        "$mnt/disk" "$log" "$seed" "$nops" ${grow:+"$grow"} || rc=$?
    if ((rc == 124 || rc == 137)); then
        echo "    last operations that returned:" >&2
        tail -n 3 "$log" | sed 's/^/    | /' >&2
        fail "plwriter did not finish within ${WRITER_TIMEOUT}s (daemon hung?; seed $seed)"
    fi
    ((rc == 0)) || fail "plwriter failed (exit $rc; seed $seed)"
    if [[ -n ${PL_BEFORE_UNMOUNT:-} ]]; then "$PL_BEFORE_UNMOUNT" "$mnt"; fi
    unmount_image "$mnt"

    # The image the daemon left behind is clean: no corruption, no leaks.
    rc=0
    json=$(qemu-img check -f qcow2 --output=json "$img" 2>"$T/check.err") || rc=$?
    if ((rc != 0)); then
        sed 's/^/    | /' "$T/check.err" >&2
        printf '%s\n' "$json" | sed 's/^/    | /' >&2
        fail "qemu-img check of the final image: exit $rc (seed $seed)"
    fi
    IMAGE_END=$(json_field "$json" image-end-offset)
    IMAGE_FILE_SIZE=$(stat -c %s "$img")

    # It grew to the size of the last resize plwriter logged.
    size1=$(be_int "$img" 24 8)
    l1n1=$(be_int "$img" 36 4)
    l1off1=$(be_int "$img" 40 8)
    logged=$(sed -n 's/^R \([0-9][0-9]*\)$/\1/p' "$log" | tail -n1)
    nres=$(grep -c '^R ' "$log" || true)
    nshrink=$(grep -c '^X ' "$log" || true)
    info "virtual size $size0 -> $size1 ($nres resizes, $nshrink refused shrinks);" \
        "L1 table $l1n0 entries at $l1off0 -> $l1n1 entries at $l1off1"
    [[ -n $logged ]] || fail "plwriter logged no resize (seed $seed)"
    ((size1 > size0)) || fail "the virtual size did not grow ($size0 -> $size1; seed $seed)"
    ((size1 == logged)) || fail "the virtual size is $size1, plwriter's last resize $logged"
    L1_MOVED=0
    if ((l1off1 != l1off0)); then L1_MOVED=1; fi

    local args=("$orig" "$trace" "$log" "$states" "$seed" "$T/replay"
        --keep-bad --expect-final "$img" --jobs "$JOBS")
    if [[ -n $base ]]; then args+=(--base "$base"); fi
    rc=0
    out=$(timeout -k 5 "$REPLAY_TIMEOUT" "$PLREPLAY" "${args[@]}" 2>&1) || rc=$?
    printf '%s\n' "$out" | sed 's/^/    /'
    if ((rc == 124 || rc == 137)); then
        fail "plreplay timed out after ${REPLAY_TIMEOUT}s"
    fi
    local summary
    summary=$(grep '^powerloss: states=' <<<"$out" | tail -n1) || true
    [[ -n $summary ]] || fail "plreplay printed no summary (exit $rc)"
    if ((rc != 0)); then
        echo "    reproduce one state: $PLREPLAY ${args[*]} --only N" >&2
        [[ ${KEEP_TMP:-0} == 1 ]] && echo "    bad state images kept in $T/replay" >&2
        fail "crash states with corruption or lost data (seed $seed): $summary"
    fi
    local n=${summary#*states=}
    n=${n%% *}
    ((n == states)) || fail "plreplay checked $n states, expected $states"
    LEAKY=${summary##*leaky=}
    FLUSH_STATS=$(grep '^plreplay: host flushes per fsync:' <<<"$out" | tail -n1) || true
    [[ -n $FLUSH_STATS ]] || fail "plreplay printed no host flush counts"
}

# fsync_stat N: from FLUSH_STATS, how many fsyncs cost N host flushes ("3"
# stands for 3 or more; "fsyncs": all of them)
fsync_stat() {
    local v
    if [[ $1 == fsyncs ]]; then
        v=$(sed -n 's/.*: \([0-9][0-9]*\) fsyncs;.*/\1/p' <<<"$FLUSH_STATS")
    else
        v=$(sed -n "s/.*[;,] $1\( or more\)*: \([0-9][0-9]*\).*/\2/p" <<<"$FLUSH_STATS")
    fi
    [[ -n $v ]] || fail "cannot read '$1' from: $FLUSH_STATS"
    printf '%s\n' "$v"
}

case_64k() {
    local img="$T/img.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" $((256 * M)) \
        || fail "test setup: qemu-img create failed"
    # grown past 512 MiB (what one L1 entry maps): the L1 table grows
    powerloss "$img" 300 150 "$SEED" "" $((300 * M))
    ((L1_MOVED)) || fail "the L1 table did not move"
}

# 4K clusters: one L2 table maps 2 MiB and one refcount block (16-bit
# refcounts) covers 8 MiB of the image file, so writes spread over 256 MiB
# allocate many L2 tables and several refcount blocks.
case_4k() {
    local img="$T/img.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=16 "$img" $((256 * M)) \
        || fail "test setup: qemu-img create failed"
    powerloss "$img" 400 150 $((SEED + 1))
    info "final image ends at $IMAGE_END"
    ((IMAGE_END > 8 * M)) || fail "the workload did not need a second refcount block (image end $IMAGE_END)"
    ((L1_MOVED)) || fail "the L1 table did not move"
}

# 512-byte clusters, 1-bit refcounts: one L2 table maps 32 KiB, one
# refcount block covers 2 MiB.
case_512_rb1() {
    local img="$T/img.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=1 "$img" $((64 * M)) \
        || fail "test setup: qemu-img create failed"
    powerloss "$img" 150 100 $((SEED + 2))
    ((L1_MOVED)) || fail "the L1 table did not move"
}

# 512-byte clusters, 64-bit refcounts: a refcount block covers 32 KiB and
# the one-cluster refcount table 2 MiB, so the table has to grow (and move).
case_512_rb64() {
    local img="$T/img.qcow2" before after
    qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 "$img" $((64 * M)) \
        || fail "test setup: qemu-img create failed"
    before=$(od -An -t x1 -j 48 -N 12 "$img")
    powerloss "$img" 150 80 $((SEED + 3))
    after=$(od -An -t x1 -j 48 -N 12 "$img")
    info "refcount table (offset, clusters): $before -> $after"
    [[ $before != "$after" ]] || fail "the refcount table did not grow"
    ((L1_MOVED)) || fail "the L1 table did not move"
}

# An overlay over a raw backing file: a sector never written reads the
# backing file's content; partial-cluster writes copy the rest from it.
case_backing() {
    local img="$T/img.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=65536 -b "$BASE_RAW" -F raw "$img" \
        || fail "test setup: qemu-img create failed"
    powerloss "$img" 300 100 $((SEED + 4)) "$BASE_RAW"
}

# Every cluster compressed: overwrites copy the clusters out, the
# compressed clusters' refcounts drop, host clusters are freed (punched)
# and reused.
case_compressed() {
    local img="$T/img.qcow2"
    qemu-img convert -c -O qcow2 -o cluster_size=65536 "$BASE16_RAW" "$img" \
        || fail "test setup: qemu-img convert -c failed"
    powerloss "$img" 300 100 $((SEED + 5))
}

# An internal snapshot: every cluster has refcount 2, overwrites copy.
case_snapshot() {
    local img="$T/img.qcow2"
    qemu-img convert -O qcow2 -o cluster_size=65536 "$BASE16_RAW" "$img" \
        || fail "test setup: qemu-img convert failed"
    qemu-img snapshot -c before "$img" || fail "test setup: qemu-img snapshot failed"
    powerloss "$img" 300 100 $((SEED + 6))
}

# wait_stream_done MNT: poll the statistics of MNT/disk until the stream is
# done (fail after WRITER_TIMEOUT seconds or when it failed).
wait_stream_done() {
    local mnt=$1 s deadline
    deadline=$(($(date +%s) + WRITER_TIMEOUT))
    while :; do
        s=$(io_timeout getfattr --only-values -n user.qcow2fuse.stats "$mnt/disk" 2>/dev/null) || true
        [[ $s == *"stream done 100%"* ]] && break
        [[ $s == *"stream failed"* ]] && fail "the stream failed: $s"
        (($(date +%s) <= deadline)) || fail "the stream did not end within ${WRITER_TIMEOUT}s: $s"
        sleep 0.1
    done
    info "stream: ${s##*, stream }"
}

# Streaming the backing chain: a raw file <- a qcow2 mid (data, zero and
# compressed clusters) <- the image, mounted with stream=RATE while
# plwriter runs, then to the end (the backing file dropped).  The states
# are taken while the stream fills clusters beside the guest's writes and
# around the header's switch; each must show the chain's content (--base:
# the chain as qemu-img converted it before) where the guest did not write.
case_stream() {
    local mid="$T/mid.qcow2" img="$T/img.qcow2" chain="$T/chain.raw" out
    qemu-img create -q -f qcow2 -o cluster_size=65536 -b "$BASE_RAW" -F raw "$mid" \
        || fail "test setup: qemu-img create failed"
    qemu-io -f qcow2 -c "write -P 0x11 $M $M" -c "write -z $((3 * M)) $M" \
        -c "write -c -P 0x22 $((5 * M)) 256k" "$mid" >/dev/null \
        || fail "test setup: qemu-io failed"
    qemu-img create -q -f qcow2 -o cluster_size=65536 -b "$mid" -F qcow2 "$img" \
        || fail "test setup: qemu-img create failed"
    qemu-img convert -O raw "$img" "$chain" || fail "test setup: qemu-img convert failed"
    PL_MOUNT_OPTS=stream=16M PL_BEFORE_UNMOUNT=wait_stream_done \
        powerloss "$img" 300 100 $((SEED + 10)) "$chain"
    out=$(qemu-img info --output=json "$img")
    ! grep -q '"backing-filename' <<<"$out" || fail "the streamed image still names a backing file"
}

# Appends (plwriter -a: small writes into new clusters, an fsync after
# every 1..3) on 64K clusters: the steady state the cluster reservation
# (refcount.c) is for.  Almost every fsync costs one host flush (data, L2
# slice and the reservation's top-ups, then one flush); the crash states
# fall inside reservations (between the flush that made one durable and
# the L2 entries that use it, and inside top-ups), and every one may leak
# what is left of it but nothing else.  After the clean unmount the
# reservation is given back: no leak (powerloss checks qemu-img check exit
# 0), and the file ends at its last cluster in use.
case_append_64k() {
    local img="$T/img.qcow2" fsyncs more
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" $((256 * M)) \
        || fail "test setup: qemu-img create failed"
    WRITER_FLAGS=(-a)
    powerloss "$img" 300 100 $((SEED + 10))
    WRITER_FLAGS=()
    info "$FLUSH_STATS; $LEAKY leaky states; file $IMAGE_FILE_SIZE bytes, image end $IMAGE_END"
    fsyncs=$(fsync_stat fsyncs)
    more=$(($(fsync_stat 2) + $(fsync_stat 3)))
    ((fsyncs > 100)) || fail "only $fsyncs fsyncs"
    # the first ones, the resizes and the L2 tables of the grown area
    ((more <= fsyncs / 20 + 4)) || fail "$more of $fsyncs fsyncs cost more than one host flush"
    ((LEAKY > 0)) || fail "no crash state leaked: no reservation was ever durable?"
    ((IMAGE_FILE_SIZE == IMAGE_END)) \
        || fail "the image file ($IMAGE_FILE_SIZE bytes) goes past its last cluster in use ($IMAGE_END)"
}

# Appends on 512-byte clusters with 64-bit refcounts: a refcount block
# covers 32 KiB and the first refcount table 2 MiB, so nearly every
# reservation needs new refcount blocks and the table moves: growth inside
# reservations, crash states among the links of new blocks.
case_append_512_rb64() {
    local img="$T/img.qcow2" before after
    qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 "$img" $((64 * M)) \
        || fail "test setup: qemu-img create failed"
    before=$(od -An -t x1 -j 48 -N 12 "$img")
    WRITER_FLAGS=(-a)
    powerloss "$img" 150 80 $((SEED + 11))
    WRITER_FLAGS=()
    after=$(od -An -t x1 -j 48 -N 12 "$img")
    info "$FLUSH_STATS; $LEAKY leaky states; refcount table $before -> $after"
    [[ $before != "$after" ]] || fail "the refcount table did not grow"
    ((LEAKY > 0)) || fail "no crash state leaked: no reservation was ever durable?"
}

# unmount_expect_status1 MNT: as unmount_image (functions.sh, whose
# _MNT_PID/_MNT_LOG name the daemon), but the daemon must exit with status 1.
unmount_expect_status1() {
    local mnt pid log rc=0 deadline
    mnt=$(canon_path "$1")
    pid=${_MNT_PID[$mnt]:-}
    log=${_MNT_LOG[$mnt]:-}
    [[ -n $pid ]] || fail "unmount_expect_status1: $mnt was not mounted by mount_image"
    fusermount3 -u "$mnt" || fail "fusermount3 -u $mnt failed"
    deadline=$(($(date +%s%N) + EXIT_TIMEOUT * 1000000000))
    while pid_alive "$pid"; do
        (($(date +%s%N) <= deadline)) || fail "daemon $pid did not exit after fusermount3 -u"
        sleep 0.02
    done
    wait "$pid" || rc=$?
    unset "_MNT_PID[$mnt]"
    if ((rc != 1)); then
        sed 's/^/    | /' "$log" >&2
        fail "daemon exited with status $rc after a failed host flush (expected 1)"
    fi
    ! is_mounted "$mnt" || fail "$mnt is still mounted after fusermount3 -u"
    _check_sanitizer_output "$log" "daemon for $mnt"
}

# blkdebug_export FILE EXPORT K: serve FILE on EXPORT (an empty regular
# file) through qemu-storage-daemon as a FUSE export of raw over blkdebug
# over FILE, whose K-th flush fails with EIO once; the next ones succeed,
# as fdatasync on Linux does after dropping the pages it could not write.
# Sets QSD_PID.
blkdebug_export() {
    local file=$1 exp=$2 k=$3 rules="$T/blkdebug.conf" i
    {
        for ((i = 1; i < k; i++)); do
            printf '[set-state]\nstate = "%d"\nevent = "flush_to_os"\nnew_state = "%d"\n\n' \
                "$i" $((i + 1))
        done
        printf '[inject-error]\nstate = "%d"\nevent = "flush_to_os"\niotype = "flush"\n' "$k"
        printf 'errno = "5"\nonce = "on"\n'
    } >"$rules"
    qemu-storage-daemon --blockdev "driver=file,node-name=file,filename=$file,discard=unmap" \
        --blockdev "driver=blkdebug,node-name=dbg,image=file,config=$rules,discard=unmap" \
        --blockdev driver=raw,node-name=top,file=dbg,discard=unmap \
        --export "type=fuse,id=exp,node-name=top,mountpoint=$exp,writable=on" \
        </dev/null >"$T/qsd.log" 2>&1 &
    QSD_PID=$!
    track_mount "$exp" "$QSD_PID"
    for ((i = 0; i < 500; i++)); do
        is_mounted "$exp" && return 0
        pid_alive "$QSD_PID" || { cat "$T/qsd.log" >&2; fail "qemu-storage-daemon exited"; }
        sleep 0.02
    done
    fail "qemu-storage-daemon did not export $exp"
}

# flush_fails K SEED STATES [data]: a host flush fails, the K-th of the
# image file (served by blkdebug_export) or, with "data", of its external
# data file.  The daemon (4K clusters, a small L2 cache: flushes in
# evictions too) runs plwriter -e, which stops at its first EIO and checks
# that every later write, fsync, fallocate and ftruncate fails too while
# reads go on.  The daemon says once which flush failed and exits with
# status 1 after the unmount; qemu-img check finds no corruption (leaks
# allowed) and, for the image file, plreplay finds every fsync that
# returned 0 in every crash state of the trace.
flush_fails() {
    local k=$1 seed=$2 states=$3 data=${4:-}
    local img="$T/img.qcow2" orig="$T/orig.qcow2" exp="$T/export" mnt="$T/mnt"
    local trace="$T/trace" log="$T/plwriter.log" rc=0 n out json failing

    if [[ -n $data ]]; then
        # qemu-img create sizes the data file: a placeholder at EXPORT
        truncate -s $((128 * M)) "$T/data.raw"
        qemu-img create -q -f qcow2 -o "cluster_size=4096,data_file=$exp,data_file_raw=on" \
            "$img" $((128 * M)) || fail "test setup: qemu-img create failed"
        blkdebug_export "$T/data.raw" "$exp" "$k"
        mount_image "$img" "$mnt" "l2-cache-size=64K"
    else
        qemu-img create -q -f qcow2 -o cluster_size=4096 "$img" $((128 * M)) \
            || fail "test setup: qemu-img create failed"
        # blkdebug cannot grow the file (writes past its end fail): room up front
        truncate -s $((1024 * M)) "$img"
        cp --sparse=always "$img" "$orig"
        : >"$exp"
        blkdebug_export "$img" "$exp" "$k"
        mount_image "$exp" "$mnt" "io-trace=$trace,l2-cache-size=64K"
    fi
    failing=${data:+the data file\'s }
    info "plwriter -e: seed $seed, host flush $k ${data:+of the data file }fails"
    out=$(timeout -k 5 "$WRITER_TIMEOUT" "$PLWRITER" -e "$mnt/disk" "$log" "$seed" 300 2>&1) \
        || rc=$?
    printf '%s\n' "$out" | sed 's/^/    /'
    ((rc == 0)) || fail "plwriter -e failed (exit $rc; seed $seed, ${failing}flush $k)"
    grep -q '^! ' "$log" || fail "no call failed"
    unmount_expect_status1 "$mnt"
    n=$(grep -c "$exp: host flush failed: Input/output error" "$DAEMON_LOG" || true)
    if ((n != 1)) || ! grep -q "failed: Input/output error; exiting with status 1" "$DAEMON_LOG"; then
        sed 's/^/    | /' "$DAEMON_LOG" >&2
        fail "expected one line naming the failed flush of $exp and one at exit"
    fi
    kill -TERM "$QSD_PID"
    wait "$QSD_PID" || true

    rc=0
    json=$(qemu-img check -f qcow2 --output=json "$img" 2>"$T/check.err") || rc=$?
    if ((rc != 0 && rc != 3)); then
        sed 's/^/    | /' "$T/check.err" >&2
        printf '%s\n' "$json" | sed 's/^/    | /' >&2
        fail "qemu-img check after the failed flush: exit $rc (seed $seed, ${failing}flush $k)"
    fi
    info "qemu-img check: $(json_field "$json" leaks) leaked clusters, no corruption"
    [[ -z $data ]] || return 0
    rc=0
    out=$(timeout -k 5 "$REPLAY_TIMEOUT" "$PLREPLAY" "$orig" "$trace" "$log" "$states" "$seed" \
        "$T/replay" --keep-bad --expect-final "$img" --jobs "$JOBS" 2>&1) || rc=$?
    printf '%s\n' "$out" | sed 's/^/    /'
    ((rc == 0)) || fail "plreplay after host flush $k failed: exit $rc (seed $seed)"
}

case_flush_fails() {
    requires qemu-storage-daemon
    # the first flush, a few fsyncs in, more; 97: in the mid-run resize
    # (today's flush counts: plwriter prints the call that failed)
    flush_fails 1 $((SEED + 7)) 10
    flush_fails 9 $((SEED + 8)) 20
    flush_fails 40 $((SEED + 8)) 20
    flush_fails 97 $((SEED + 8)) 20
    flush_fails 2 $((SEED + 9)) 0 data
    flush_fails 30 $((SEED + 9)) 0 data
}

run_case 64k case_64k
run_case 4k case_4k
run_case 512-rb1 case_512_rb1
run_case 512-rb64 case_512_rb64
run_case backing case_backing
run_case compressed case_compressed
run_case snapshot case_snapshot
run_case stream case_stream
run_case append-64k case_append_64k
run_case append-512-rb64 case_append_512_rb64
run_case flush-fails case_flush_fails
finish_cases
