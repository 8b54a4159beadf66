#!/usr/bin/env bash
#
# Hardening: hundreds of corrupted images.  Six valid images made by
# qemu-img/qemu-io (v3 64K with data, zero and preallocated-zero clusters;
# 4K clusters with 1-bit refcounts; zlib-compressed; extended L2 entries; an
# internal snapshot; v2) are damaged in targeted ways by $TOOLS/mutate
# ("mutate --plan" prints the list: every header field to 0, all-ones, +1,
# -1, huge, misaligned, past EOF; header_length; header extension types and
# lengths; L1 and L2 entries with reserved bits, misaligned, past EOF, or
# pointing at the header, the L1 table, the refcount table or a refcount
# block; compressed descriptors with huge sector counts or offsets past EOF;
# the zero flag on v2; extended-L2 bitmaps with both alloc and zero bits;
# refcount table and block entries; snapshot table fields; truncation) plus
# seeded random byte flips in the metadata areas.
#
# For each mutated image (a copy named m.qcow2):
#   0. qcow2check (check, and -r all on another copy when the check found
#      something) finishes without a crash, a hang or a sanitizer report,
#      with an exit status 0-3, and -r all grows the file by at most 4 MiB.
#   a. read-only mount: refused (non-zero exit, not a signal, a message that
#      names the structure, field or offset) or mounted; if mounted, the
#      whole disk is read (EIO allowed: then it is read again in 64K blocks
#      with conv=noerror, and the daemon must still serve); the image file
#      is left untouched; the daemon exits 0 after the unmount.  Mutations
#      that leave the active mapping intact (flag S) must read back exactly
#      the original guest content.
#   b. read-write mount of another copy: refused, or mounted, written in up
#      to five places and fsynced; EIO/EROFS/ENOSPC are allowed; data whose
#      writes and fsync succeeded must read back (flag R: refcounts and
#      mapping intact); the daemon must exit (any status) without a signal.
#   c. the file grows by at most the data written plus 4 MiB.
# No crash, hang or sanitizer report anywhere; a table of outcomes at the
# end.
#
# Knobs: MUT_FLIPS (random mutations per image, default 25), MUT_SEED,
# MUT_JOBS (parallel workers, default 3: a mutation spends part of its time
# waiting for mounts and unmounts, so on 2 cores 3 workers finish the 1210
# mutations in 153 s where 2 took 179 s), MUT_IO_TIMEOUT (60 s),
# MUT_FILTER (glob over mutation names, e.g. 'l2.*'), MUT_BUDGET (seconds
# for all mutations, default 180: each image gets a share in proportion to
# its number of mutations; what does not fit is counted as "not run", so a
# slow machine or a sanitizer build covers less instead of timing out).
# Reproduce one mutation: cp the base image to m.qcow2, apply the printed
# "poke OFFSET HEX..." with "$TOOLS/mutate m.qcow2 OFFSET HEX..." (or
# "truncate -s LEN m.qcow2"), then mount it.
# shellcheck disable=SC2317  # case functions are called indirectly (run_case)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io dd cksum cmp timeout truncate shuf split
requires_fuse
MUTATE=$(require_tool mutate)
[[ -n ${QCOW2CHECK:-} && -x $QCOW2CHECK ]] || fail "QCOW2CHECK is not set (absolute path of qcow2check)"

K=1024
M=$((1024 * 1024))
MUT_FLIPS=${MUT_FLIPS:-25}
MUT_SEED=${MUT_SEED:-7100}
MUT_JOBS=${MUT_JOBS:-3}
MUT_IO_TIMEOUT=${MUT_IO_TIMEOUT:-60}
MUT_FILTER=${MUT_FILTER:-*}
MUT_BUDGET=${MUT_BUDGET:-180}
GROWTH_SLACK=$((4 * M))
WRITE_ERRORS='Input/output error|Read-only file system|No space left on device'
BASES="$TEST_TMP/bases"
PAT="$TEST_TMP/pattern"

# ---------------------------------------------------------------------------
# Base images

make_bases() {
    local r1="$TEST_TMP/r1" x1="$TEST_TMP/x1" b
    mkdir -p "$BASES"
    head -c $((8 * M)) /dev/urandom >"$r1"
    head -c $((1 * M)) /dev/urandom >"$PAT"
    seq -f '%015g' 1 524288 >"$x1"
    cd "$BASES"

    qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=65536 v3_64k.qcow2 $((16 * M))
    qio_unmap v3_64k.qcow2 "write -s $r1 0 $((192 * K))" "write -s $r1 $((M + 512)) $((64 * K))" \
        "write -z $((4 * M)) $((128 * K))" "write -s $r1 $((6 * M)) $((64 * K))" \
        "write -z $((6 * M)) $((64 * K))" "write -s $r1 $((15 * M)) $M" \
        "discard $((128 * K)) $((64 * K))"

    qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=1 rc1_4k.qcow2 $((16 * M))
    qio_unmap rc1_4k.qcow2 "write -s $r1 0 $((64 * K))" "write -s $r1 $((2 * M)) $((8 * K))" \
        "write -s $r1 $((5 * M)) $((4 * K))" "write -z $((9 * M)) $((64 * K))" \
        "write -s $r1 $((13 * M)) $((12 * K))" "discard $((16 * K)) $((8 * K))"

    { head -c $((4 * M)) "$x1"; head -c $((2 * M)) "$r1"; head -c $((2 * M)) /dev/zero
      tail -c $((4 * M)) "$x1"; } >zlib.raw
    qemu-img convert -q -c -O qcow2 -o cluster_size=65536,compression_type=zlib zlib.raw zlib.qcow2
    rm -f zlib.raw
    qemu-img resize -q zlib.qcow2 $((16 * M))
    qio_unmap zlib.qcow2 "write -s $r1 $((12 * M)) $((128 * K))"

    qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=65536 extl2.qcow2 $((16 * M))
    qio_unmap extl2.qcow2 "write -s $r1 0 $((4 * K))" "write -z $((8 * K)) $((4 * K))" \
        "write -s $r1 $M $((64 * K))" "write -s $r1 $((2 * M)) $((128 * K))" \
        "write -z $((2 * M)) $((8 * K))" "write -z $((3 * M)) $((64 * K))" \
        "write -s $r1 $((5 * M)) $((30 * K))"

    qemu-img create -q -f qcow2 -o cluster_size=65536 snap.qcow2 $((16 * M))
    qio_unmap snap.qcow2 "write -s $r1 0 $((256 * K))" "write -s $r1 $((8 * M)) $((64 * K))"
    qemu-img snapshot -c s1 snap.qcow2
    qio_unmap snap.qcow2 "write -s $x1 $((64 * K)) $((64 * K))" "write -s $x1 $((9 * M)) $((64 * K))" \
        "discard $((8 * M)) $((64 * K))"

    qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=65536 v2.qcow2 $((16 * M))
    qio_unmap v2.qcow2 "write -s $r1 0 $((128 * K))" "write -z $M $((64 * K))" \
        "write -s $r1 $((3 * M)) $((100 * K))" "write -s $r1 $((15 * M)) $((64 * K))" \
        "discard $((64 * K)) $((64 * K))"

    for b in *.qcow2; do
        qemu-img check -q "$b" || fail "test setup: $b is not clean"
        # cksum of the guest view: what an intact mapping must read back
        qemu-img convert -O raw "$b" "${b%.qcow2}.raw"
        cksum <"${b%.qcow2}.raw" >"${b%.qcow2}.sum"
        stat -c %s "${b%.qcow2}.raw" >"${b%.qcow2}.size"
        rm -f "${b%.qcow2}.raw"
    done
    cd /
}

# ---------------------------------------------------------------------------
# One mutation.  Runs in its own subshell (mutation_subshell); results go to
# $RES as key=value lines; "verdict=..." names the first problem.

rec() { printf '%s\n' "$@" >>"$RES"; }

# bad CATEGORY MSG: record the problem and end this mutation.
bad() {
    rec "verdict=$1"
    fail "$1: $2"
}

# daemon_log_check LOG WHAT: no sanitizer report, no crash message.
daemon_log_check() {
    if grep -Eq 'ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|AddressSanitizer:DEADLYSIGNAL' "$1"; then
        sed 's/^/    | /' "$1" >&2
        bad crash "$2: sanitizer report"
    fi
    if grep -Eq 'Segmentation fault|core dumped|Aborted|stack smashing|double free|malloc\(\)|free\(\)' "$1"; then
        sed 's/^/    | /' "$1" >&2
        bad crash "$2: crash message in the output"
    fi
}

# refusal_check WHAT: after try_mount returned 1 (TRY_RC, DAEMON_LOG).
refusal_check() {
    local what=$1 msg
    daemon_log_check "$DAEMON_LOG" "$what"
    ((TRY_RC != 0)) || bad badexit "$what: the daemon exited 0 without mounting"
    ((TRY_RC < 126)) || bad crash "$what: the daemon died with status $TRY_RC (signal $((TRY_RC - 128)))"
    [[ -s $DAEMON_LOG ]] || bad badmsg "$what: refused (status $TRY_RC) without a message"
    # The message must say what is wrong: a structure, a field or an
    # offset, not only errno text.  The image path is not counted.
    msg=$(sed "s|$IMG_DIR/m\.qcow2||g; s|$IMG_DIR||g" "$DAEMON_LOG")
    if ! grep -Eqi 'offset|0x[0-9a-f]+|\bl1\b|l1_|\bl2\b|l2_|refcount|header|snapshot|cluster|table|extension|magic|version|feature|compress|backing|_bits|corrupt|size|length|entr|encrypt|crypt|data file|lock|name' <<<"$msg"; then
        sed 's/^/    | /' "$DAEMON_LOG" >&2
        bad badmsg "$what: the refusal message names no structure, field or offset"
    fi
    info "$what refused (status $TRY_RC): $(head -n1 "$DAEMON_LOG" | cut -c1-200)"
}

# stop_daemon MNT WHAT: fusermount3 -u, wait for the daemon (bounded), and
# set STOP_RC.  A signal, a sanitizer report or a hang is a failure.
stop_daemon() {
    local mnt pid log i deadline what=$2
    mnt=$(canon_path "$1")
    pid=${_MNT_PID[$mnt]}
    log=${_MNT_LOG[$mnt]}
    for ((i = 0; ; i++)); do
        fusermount3 -u "$mnt" 2>"$T/fusermount.err" && break
        if ! pid_alive "$pid"; then
            sed 's/^/    | /' "$log" >&2
            bad crash "$what: the daemon died while mounted ($(head -n1 "$T/fusermount.err"))"
        fi
        ((i < 40)) || bad hang "$what: fusermount3 -u failed for 10 s: $(head -n1 "$T/fusermount.err")"
        sleep 0.25
    done
    deadline=$(($(date +%s%N) + EXIT_TIMEOUT * 1000000000))
    while pid_alive "$pid"; do
        (($(date +%s%N) < deadline)) || bad hang "$what: the daemon did not exit within ${EXIT_TIMEOUT}s of the unmount"
        sleep 0.02
    done
    STOP_RC=0
    wait "$pid" || STOP_RC=$?
    unset "_MNT_PID[$mnt]"
    daemon_log_check "$log" "$what"
    if ((STOP_RC > 128)); then
        sed 's/^/    | /' "$log" >&2
        bad crash "$what: the daemon was killed by signal $((STOP_RC - 128))"
    fi
    ! is_mounted "$mnt" || bad hang "$what: still mounted after the unmount"
}

# io_errors FILE WHAT: classify dd's error messages; EIO (and for writes
# EROFS/ENOSPC) are allowed; a lost connection is a crash.  Prints the
# number of allowed errors.
io_errors() {
    local f=$1 what=$2 allowed=$3 n
    if grep -Eq 'Transport endpoint is not connected|Software caused connection abort|No such device' "$f"; then
        sed 's/^/    | /' "$f" >&2
        bad crash "$what: the mount lost its daemon"
    fi
    n=$(grep -Ec "$allowed" "$f" || true)
    if grep -v -E "$allowed" "$f" | grep -q .; then
        sed 's/^/    | /' "$f" >&2
        bad errno "$what: unexpected error"
    fi
    echo "$n"
}

# alive_check MNT WHAT: the daemon still runs and answers.
alive_check() {
    local mnt
    mnt=$(canon_path "$1")
    pid_alive "${_MNT_PID[$mnt]}" || bad crash "$2: the daemon is gone"
    timeout -k 2 10 stat "$mnt/disk" >/dev/null 2>"$T/stat.err" \
        || bad crash "$2: stat of the disk failed: $(head -n1 "$T/stat.err")"
}

read_only_pass() {
    local img=$1 flags=$2 sum0 sum1 rc=0 n size base_size good partial blocks
    sum0=$(cksum <"$img")
    if ! try_mount "$img" "$T/ro" ro; then
        refusal_check "read-only mount"
        rec ro=refused
        return 0
    fi
    rec ro=mounted
    size=$(stat -c %s "$T/ro/disk")
    base_size=$(<"$BASES/$BASE.size")
    { timeout -k 5 "$MUT_IO_TIMEOUT" dd if="$T/ro/disk" bs=1M status=none 2>"$T/rd.err" \
        || echo $? >"$T/rd.rc"; } | cksum >"$T/rd.sum"
    if [[ -f $T/rd.rc ]]; then rc=$(<"$T/rd.rc"); fi
    if ((rc == 124 || rc == 137)); then bad hang "read-only: reading the disk did not finish in ${MUT_IO_TIMEOUT}s"; fi
    if ((rc != 0)); then
        io_errors "$T/rd.err" "read-only: reading the disk" 'Input/output error' >/dev/null
        alive_check "$T/ro" "read-only after EIO"
        rec eio=1
        # The rest must stay readable: every 64K block, errors skipped
        # (status=noxfer: status=none would hide the errors too).
        rc=0
        timeout -k 5 "$MUT_IO_TIMEOUT" dd if="$T/ro/disk" of=/dev/null bs=64k conv=noerror \
            status=noxfer 2>"$T/rd2.out" || rc=$?
        if ((rc == 124 || rc == 137)); then bad hang "read-only: the block-wise re-read did not finish in ${MUT_IO_TIMEOUT}s"; fi
        grep -v 'records \(in\|out\)$' "$T/rd2.out" >"$T/rd2.err" || true
        n=$(io_errors "$T/rd2.err" "read-only: block-wise re-read" 'Input/output error')
        alive_check "$T/ro" "read-only after the block-wise re-read"
        good=$(sed -n 's/^\([0-9]*\)+\([0-9]*\) records in$/\1 \2/p' "$T/rd2.out" | tail -n1)
        read -r good partial <<<"${good:-0 0}"
        blocks=$(((size + 65535) / 65536))
        rec "eio_blocks=$n" "blocks=$blocks"
        info "read-only: EIO in $n of $blocks 64K blocks ($good read)"
        ((good + partial + n >= blocks)) \
            || bad eio "read-only: the block-wise re-read covered only $((good + partial)) + $n of $blocks blocks"
        [[ $flags != *S* ]] || bad wrongdata "read-only: EIO although the mapping is intact"
    else
        alive_check "$T/ro" "read-only after the read"
        if [[ $flags == *S* && $size == "$base_size" ]]; then
            [[ $(<"$T/rd.sum") == $(<"$BASES/$BASE.sum") ]] \
                || bad wrongdata "read-only: the disk does not read as the original guest content"
        fi
    fi
    stop_daemon "$T/ro" "read-only"
    ((STOP_RC == 0)) || bad badexit "read-only: the daemon exited with status $STOP_RC after the unmount"
    sum1=$(cksum <"$img")
    [[ $sum0 == "$sum1" ]] || bad modified "read-only: the image file was modified"
}

# Five writes: OFFSET LENGTH (clipped to the disk size at run time).
write_plan() {
    local size=$1
    echo "0 4096"
    echo "$((M + 2048)) 6144"
    echo "$((size / 2 / 4096 * 4096)) 65536"
    echo "$((4 * M)) 8192"
    echo "$((size - 4096)) 4096"
}

read_write_pass() {
    local img=$1 flags=$2 size off len i=0 rc nerr=0 ok=0 written=0 all_ok=1
    local -a done_off=() done_len=()
    if ! try_mount "$img" "$T/rw"; then
        refusal_check "read-write mount"
        rec rw=refused
        return 0
    fi
    rec rw=mounted
    size=$(stat -c %s "$T/rw/disk")
    while read -r off len; do
        i=$((i + 1))
        ((off >= 0 && len > 0 && off + len <= size)) || continue
        rc=0
        timeout -k 5 "$MUT_IO_TIMEOUT" dd if="$PAT" of="$T/rw/disk" bs="$len" count=1 \
            skip=$((i * 65536)) seek="$off" iflag=skip_bytes oflag=seek_bytes \
            conv=notrunc status=none 2>"$T/wr.err" || rc=$?
        if ((rc == 124 || rc == 137)); then bad hang "read-write: write $i ($len bytes at $off) did not finish in ${MUT_IO_TIMEOUT}s"; fi
        written=$((written + len))
        if ((rc != 0)); then
            io_errors "$T/wr.err" "read-write: write $i" "$WRITE_ERRORS" >/dev/null
            nerr=$((nerr + 1))
            all_ok=0
        else
            ok=$((ok + 1))
            done_off+=("$off")
            done_len+=("$len")
        fi
    done < <(write_plan "$size")
    # One fsync for all of them: only then is the data acknowledged.
    rc=0
    timeout -k 5 "$MUT_IO_TIMEOUT" sync "$T/rw/disk" 2>"$T/sync.err" || rc=$?
    if ((rc == 124 || rc == 137)); then bad hang "read-write: fsync did not finish in ${MUT_IO_TIMEOUT}s"; fi
    if ((rc != 0)); then
        io_errors "$T/sync.err" "read-write: fsync" "$WRITE_ERRORS" >/dev/null
        nerr=$((nerr + 1))
        all_ok=0
        done_off=() done_len=()
    fi
    alive_check "$T/rw" "read-write after the writes"
    rec "writes_ok=$ok" "writes_failed=$nerr" "written=$written"
    # Acknowledged data must read back where nothing can alias it.
    if [[ $flags == *R* ]]; then
        # (the pattern bytes depend on the write's index in write_plan)
        i=0
        while read -r off len; do
            i=$((i + 1))
            local j found=0
            for j in "${!done_off[@]}"; do
                if [[ ${done_off[j]} == "$off" && ${done_len[j]} == "$len" ]]; then found=1; fi
            done
            ((found)) || continue
            dd if="$T/rw/disk" of="$T/got" bs="$len" count=1 skip="$off" iflag=skip_bytes status=none \
                2>/dev/null || bad readback "read-write: reading back $len bytes at $off failed"
            dd if="$PAT" of="$T/want" bs="$len" count=1 skip=$((i * 65536)) iflag=skip_bytes status=none
            cmp -s "$T/got" "$T/want" \
                || bad readback "read-write: $len bytes written (and fsynced) at $off do not read back"
        done < <(write_plan "$size")
    fi
    stop_daemon "$T/rw" "read-write"
    rec "rw_exit=$STOP_RC"
    ((all_ok)) || info "read-write: $nerr of $((ok + nerr)) writes refused; daemon exit status $STOP_RC"
    RW_WRITTEN=$written
}

# qcow2check on the mutated image: check only, then (when it found
# something) -r all on a copy.
checker_pass() {
    local img=$1 rc=0 size0 size1
    timeout -k 5 30 "$QCOW2CHECK" --output=json "$img" >"$T/chk.out" 2>"$T/chk.err" || rc=$?
    ((rc != 124 && rc != 137)) || bad hang "qcow2check did not finish in 30 s"
    daemon_log_check "$T/chk.err" "qcow2check"
    ((rc <= 3)) || bad crash "qcow2check exited with status $rc"
    rec "check=$rc"
    # Repair only what the check found (exit 2 or 3).
    ((rc == 2 || rc == 3)) || return 0
    cp "$img" "$T/rep.qcow2"
    size0=$(stat -c %s "$T/rep.qcow2")
    rc=0
    timeout -k 5 30 "$QCOW2CHECK" -r all "$T/rep.qcow2" >"$T/rep.out" 2>"$T/rep.err" || rc=$?
    ((rc != 124 && rc != 137)) || bad hang "qcow2check -r all did not finish in 30 s"
    daemon_log_check "$T/rep.err" "qcow2check -r all"
    ((rc <= 3)) || bad crash "qcow2check -r all exited with status $rc"
    size1=$(stat -c %s "$T/rep.qcow2")
    ((size1 <= size0 + GROWTH_SLACK)) \
        || bad growth "qcow2check -r all grew the file from $size0 to $size1 bytes"
    rec "repair=$rc"
    rm -f "$T/rep.qcow2"
}

# one_mutation BASE NAME FLAGS OP ARGS...
one_mutation() {
    local name=$2 flags=$3 op=$4 size0 size1 limit
    shift 4
    IMG_DIR="$T/a"
    mkdir -p "$T/a" "$T/b"
    cp "$BASES/$BASE.qcow2" "$T/a/m.qcow2"
    case $op in
    poke) "$MUTATE" "$T/a/m.qcow2" "$@" ;;
    trunc) truncate -s "$1" "$T/a/m.qcow2" ;;
    *) fail "unknown operation $op" ;;
    esac
    cp "$T/a/m.qcow2" "$T/b/m.qcow2"

    checker_pass "$T/a/m.qcow2"
    read_only_pass "$T/a/m.qcow2" "$flags"

    IMG_DIR="$T/b"
    size0=$(stat -c %s "$T/b/m.qcow2")
    RW_WRITTEN=0
    read_write_pass "$T/b/m.qcow2" "$flags"
    size1=$(stat -c %s "$T/b/m.qcow2")
    limit=$((size0 + RW_WRITTEN + GROWTH_SLACK))
    ((size1 <= limit)) \
        || bad growth "the image grew from $size0 to $size1 bytes (limit $limit: written $RW_WRITTEN + 4 MiB)"
    rec "growth=$((size1 - size0))"
    rec verdict=ok
}

mutation_subshell() {
    CASE_NAME="$BASE:$1"
    _MOUNTS=()
    _PIDS=()
    _MNT_PID=()
    _MNT_LOG=()
    T=$(mktemp -d "$WORK/m.XXXXXX")
    _set_traps
    one_mutation "$BASE" "$@"
}

# worker LIST DEADLINE: run every mutation line of LIST (until the epoch
# second DEADLINE: later ones are recorded as not run).
worker() {
    local list=$1 deadline=$2 id name flags rest rc t0 t1
    while IFS=$'\t' read -r id name flags rest; do
        RES="$RDIR/$id.res"
        if ((EPOCHSECONDS >= deadline)); then
            echo "notrun=1" >"$RES"
            continue
        fi
        : >"$RES"
        rc=0
        t0=$EPOCHREALTIME
        # shellcheck disable=SC2086  # rest holds the operation and arguments
        (mutation_subshell "$name" "$flags" $rest) >"$RDIR/$id.log" 2>&1 </dev/null || rc=$?
        t1=$EPOCHREALTIME
        echo "rc=$rc" >>"$RES"
        echo "ms=$(((${t1/./} - ${t0/./}) / 1000))" >>"$RES"
    done <"$list"
}

# verdict_of RESFILE LOGFILE: the verdict of a finished mutation.
verdict_of() {
    local v rc
    v=$(sed -n 's/^verdict=//p' "$1" | head -n1)
    rc=$(sed -n 's/^rc=//p' "$1" | tail -n1)
    if [[ -z $v ]]; then
        if grep -Eq 'not ready after|timed out|did not exit|did not finish' "$2"; then v=hang
        elif grep -Eq 'sanitizer|signal|died|left .* mounted' "$2"; then v=crash
        else v=error; fi
    fi
    if [[ $v == ok && $rc != 0 ]]; then v=error; fi
    echo "$v"
}

# make_plan BASE LEVEL SEED: $PLANS/BASE.list, one line per mutation:
# id<TAB>name<TAB>flags<TAB>operation and arguments.
make_plan() {
    local base=$1 level=$2 seed=$3 n=0 name flags rest
    mkdir -p "$PLANS"
    "$MUTATE" --plan "$BASES/$base.qcow2" "$level" "$MUT_FLIPS" "$seed" >"$PLANS/$base.plan" \
        || fail "mutate --plan $base failed"
    : >"$PLANS/$base.list"
    while read -r name flags rest; do
        # shellcheck disable=SC2053  # glob on purpose
        [[ $name == $MUT_FILTER ]] || continue
        n=$((n + 1))
        printf '%04d\t%s\t%s\t%s\n' "$n" "$name" "$flags" "$rest" >>"$PLANS/$base.list"
    done <"$PLANS/$base.plan"
    echo "$level $seed" >"$PLANS/$base.info"
}

plan_size() { wc -l <"$PLANS/$1.list"; }

# case_mutate BASE LATER: run BASE's mutations; LATER is the number of
# mutations of the images after this one (for the share of the budget).
case_mutate() {
    local base=$1 later=$2 n w now deadline level seed
    BASE=$base
    WORK="$T/work"
    RDIR="$T/results"
    mkdir -p "$WORK" "$RDIR"
    n=$(plan_size "$base")
    ((n > 0)) || skip "no mutation matches MUT_FILTER=$MUT_FILTER"
    read -r level seed <"$PLANS/$base.info"
    # This image's share of what is left of the time budget.
    now=$EPOCHSECONDS
    deadline=$((now + (DEADLINE - now) * n / (n + later)))
    info "$base: $n mutations ($level plan, $MUT_FLIPS random from seed $seed)," \
        "$MUT_JOBS workers, $((deadline - now)) s of the time budget"
    # Run them in a shuffled (but fixed) order, so that running out of time
    # leaves out a sample rather than the end of the plan.
    seq "$seed" $((seed + 30000)) >"$T/random-source"
    shuf --random-source="$T/random-source" "$PLANS/$base.list" >"$T/order"
    split -n "r/$MUT_JOBS" -d -a 2 "$T/order" "$T/list."
    local pids=()
    for w in "$T"/list.*; do
        worker "$w" "$deadline" &
        pids+=($!)
    done
    local p
    for p in "${pids[@]}"; do wait "$p" || fail "a worker failed"; done

    # Summary: one line per mutation (plan order); logs of the failed ones.
    local tried=0 ro_ref=0 ro_mnt=0 eio=0 rw_ref=0 rw_mnt=0 wfail=0 crash=0 hang=0 other=0
    local notrun=0 v res log failed=() id name flags rest
    while IFS=$'\t' read -r id name flags rest; do
        res="$RDIR/$id.res" log="$RDIR/$id.log"
        if grep -qx 'notrun=1' "$res"; then
            notrun=$((notrun + 1))
            continue
        fi
        v=$(verdict_of "$res" "$log")
        tried=$((tried + 1))
        grep -qx 'ro=refused' "$res" && ro_ref=$((ro_ref + 1))
        grep -qx 'ro=mounted' "$res" && ro_mnt=$((ro_mnt + 1))
        grep -qx 'eio=1' "$res" && eio=$((eio + 1))
        grep -qx 'rw=refused' "$res" && rw_ref=$((rw_ref + 1))
        grep -qx 'rw=mounted' "$res" && rw_mnt=$((rw_mnt + 1))
        grep -Eq '^writes_failed=[1-9]' "$res" && wfail=$((wfail + 1))
        case $v in
        ok) ;;
        crash) crash=$((crash + 1)) ;;
        hang) hang=$((hang + 1)) ;;
        *) other=$((other + 1)) ;;
        esac
        printf '  %-40s %-2s %-5s %s| %s\n' "$name" "$flags" "$v" \
            "$(grep -E '^(ro|eio_blocks|rw|writes_failed|rw_exit|check|repair|growth|ms)=' "$res" | tr '\n' ' ')" \
            "$rest"
        if [[ $v != ok ]]; then
            failed+=("$name")
            echo "  ---- $base $name: $flags $rest"
            sed 's/^/    /' "$log"
            echo "  ----"
        fi
    done <"$PLANS/$base.list"
    ((notrun == 0)) || info "$base: time budget used up, $notrun of $n mutations not run"
    printf '%s %d %d %d %d %d %d %d %d %d %d %d\n' "$base" "$tried" "$ro_ref" "$ro_mnt" "$eio" \
        "$rw_ref" "$rw_mnt" "$wfail" "$crash" "$hang" "$other" "$notrun" >>"$TEST_TMP/table"
    ((${#failed[@]} == 0)) || fail "${#failed[@]} mutation(s) of $base failed: ${failed[*]}"
}

print_table() {
    local t=(0 0 0 0 0 0 0 0 0 0 0) f i
    echo "=== outcomes (MUT_SEED=$MUT_SEED, MUT_FLIPS=$MUT_FLIPS random mutations per image)"
    printf '  %-8s %6s %8s %7s %5s %8s %7s %9s %7s %5s %5s %7s\n' image tried ro-refus ro-mnt EIO \
        rw-refus rw-mnt wr-refus crashes hangs other not-run
    [[ -f $TEST_TMP/table ]] || return 0
    while read -r -a f; do
        printf '  %-8s %6s %8s %7s %5s %8s %7s %9s %7s %5s %5s %7s\n' "${f[@]}"
        for ((i = 0; i < 11; i++)); do t[i]=$((t[i] + f[i + 1])); done
    done <"$TEST_TMP/table"
    printf '  %-8s %6s %8s %7s %5s %8s %7s %9s %7s %5s %5s %7s\n' total "${t[@]}"
}

t_start=$EPOCHSECONDS
make_bases
info "base images: $(cd "$BASES" && echo *.qcow2)"
PLANS="$TEST_TMP/plans"
# image plan-level seed
IMAGES=(
    "v3_64k full $MUT_SEED"
    "rc1_4k min $((MUT_SEED + 1000))"
    "zlib min $((MUT_SEED + 2000))"
    "extl2 min $((MUT_SEED + 3000))"
    "snap short $((MUT_SEED + 4000))"
    "v2 min $((MUT_SEED + 5000))"
)
total=0
for spec in "${IMAGES[@]}"; do
    # shellcheck disable=SC2086  # split the spec
    make_plan $spec
    total=$((total + $(plan_size "${spec%% *}")))
done
DEADLINE=$((EPOCHSECONDS + MUT_BUDGET))
info "$total mutations; time budget ${MUT_BUDGET} s (MUT_BUDGET)"
for spec in "${IMAGES[@]}"; do
    b=${spec%% *}
    total=$((total - $(plan_size "$b")))
    run_case "$b" case_mutate "$b" "$total"
done

print_table
info "total time $((EPOCHSECONDS - t_start)) s"
finish_cases
