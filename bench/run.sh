#!/usr/bin/env bash
#
# bench/run.sh — throughput of qcow2fuse against qemu-storage-daemon's FUSE
# export of the same kind of qcow2 image, and against bench/passthrough (the
# same FUSE session set-up over a raw file: the ceiling without any qcow2
# translation), and against "host": the same fio job run directly on a raw
# file next to the images, with no FUSE and no daemon at all (the ceiling
# for any daemon that does buffered I/O on its host file).  See
# bench/README for what every job measures.
#
# usage: bench/run.sh [--quick]
#
# Environment:
#   QCOW2FUSE     the daemon (default: build/qcow2fuse)
#   PASSTHROUGH   the baseline daemon (default: build/bench/passthrough)
#   BASELINE      a second qcow2fuse binary (e.g. a build of an older
#                 commit): it runs as one more implementation, taking turns
#                 with the others, and a last table compares the two builds
#                 (figures and CPU per request, qcow2fuse/baseline)
#   QCOW2FUSE_OPTS, BASELINE_OPTS
#                 -o options for the qcow2fuse and the baseline daemon
#                 (e.g. transport=io_uring; BASELINE may then be the same
#                 binary with BASELINE_OPTS=transport=classic)
#   QSD           qemu-storage-daemon (default: from PATH; without it the
#                 qsd column shows "-")
#   HOST=0        leave out host (default on; its columns then show "-",
#                 as qsd's do without QSD).  host: fio on a
#                 raw file in the image directory, prepared as the
#                 passthrough's, with --direct=0 --ioengine=io_uring
#                 --invalidate=0 (the cache left by the fill kept) and
#                 every --fsync=N of a job turned into --fdatasync=N: the
#                 host page cache and the host flush every daemon here uses
#                 (buffered pread/pwrite and fdatasync on its image file),
#                 without the FUSE round trip or a daemon.
#                 HOST_FLUSH=fsync keeps the job's own fsync instead.
#   COPY_CEILING  build/bench/copy_ceiling (default; "" leaves it out): in
#                 each repetition of the seq read job, on host's raw file
#                 right after host's fio run, 2 threads (the CPUs) doing
#                 what a daemon's 1 MiB read must, pread then memcpy, with
#                 no FUSE: the most a daemon that reads into its own
#                 buffers could serve that job at
#   FIO_CPUS      run fio on these CPUs only (fio --cpus_allowed, e.g. 0):
#                 a submitter that stays on one CPU, which is where FUSE
#                 over io_uring queues its requests (default: anywhere)
#   BUSY_LOOPS    N busy loops (shell processes that only spin, nice 0)
#                 running beside every fio run of every implementation, to
#                 see each on a host with no idle CPU (default 0; the
#                 ext4-tree job runs without them)
#   RUNTIME       seconds per fio run (default 10, --quick 3)
#   REPS          runs of every (job, implementation) pair; the table shows
#                 the median (default 3, --quick 1)
#   JOBS          space-separated subset of job names (default: all)
#   RESULTS       results directory (default build/bench/results-DATE)
#   BENCH_TMPDIR  where the images are made (default build/bench); needs
#                 about 35 GiB free, on a real disk file system
#   SCRATCH       auto (default), loop or dir.  loop: the images live on a
#                 private ext4 on a loop device (direct I/O to a zero-filled
#                 SCRATCH_SIZE file under BENCH_TMPDIR, default 32G, 16G
#                 with --quick), mounted without online discard; dir: right
#                 in BENCH_TMPDIR.  auto picks loop when running as root and
#                 BENCH_TMPDIR's file system is mounted with "discard": there,
#                 deleting an image that random allocating writes left in
#                 tens of thousands of extents issues one discard per extent
#                 and takes minutes.
#   PERF=1        perf record the qcow2fuse daemon during every run
#                 (perf.JOB.rREP.data and a text report in RESULTS);
#                 PERF_ARGS: its options (default: -F 999 --call-graph
#                 dwarf,8192, as the daemon has no frame pointers)
#   EXTRAS=0      skip the RSS and mount-time part (1 TiB image)
#   TREE_FILES    files in the ext4-tree job's tarball (default 3000, about
#                 320 MB; sizes 1 KiB to 1 MiB); TREE_SEED (default 13)
#                 seeds it; TREE_DISK: the virtual disk size (default 4G)
#   COLD=0        skip the cold-cache mount time (it drops the page cache
#                 of the whole machine: echo 3 > /proc/sys/vm/drop_caches)
#
# The ext4-tree job (root only) is a real workload: mkfs.ext4 on a loop
# device over the disk file, a tarball of TREE_FILES files extracted into it
# and synced, then a cold read of every file (see bench/README).
#
# Every run starts from a fresh image: the implementations take turns within
# each job, in an order that rotates with each repetition (qcow2fuse qsd
# passthrough host, then qsd passthrough host qcow2fuse, ...).
# Raw fio JSON, the daemons' logs and a summary.tsv go to RESULTS.
# The figures are for comparing implementations on one machine; nothing here
# is a pass/fail test.

set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)

QUICK=0
for arg in "$@"; do
    case $arg in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "bench/run.sh: unknown argument $arg (usage: bench/run.sh [--quick])" >&2; exit 2 ;;
    esac
done

if ((QUICK)); then
    RUNTIME=${RUNTIME:-3}
    REPS=${REPS:-1}
else
    RUNTIME=${RUNTIME:-10}
    REPS=${REPS:-3}
fi
QCOW2FUSE=${QCOW2FUSE:-$ROOT/build/qcow2fuse}
PASSTHROUGH=${PASSTHROUGH:-$ROOT/build/bench/passthrough}
QSD=${QSD:-$(command -v qemu-storage-daemon || true)}
QCOW2FUSE_OPTS=${QCOW2FUSE_OPTS:-}
BASELINE_OPTS=${BASELINE_OPTS:-}
PERF=${PERF:-0}
SCRATCH=${SCRATCH:-auto}
if ((QUICK)); then SCRATCH_SIZE=${SCRATCH_SIZE:-16G}; else SCRATCH_SIZE=${SCRATCH_SIZE:-32G}; fi
PERF_ARGS=${PERF_ARGS:--F 999 --call-graph dwarf,8192}
COLD=${COLD:-1}
EXTRAS=${EXTRAS:-1}
HOST=${HOST:-1}
HOST_FLUSH=${HOST_FLUSH:-fdatasync}
FIO_CPUS=${FIO_CPUS:-}
BUSY_LOOPS=${BUSY_LOOPS:-0}
COPY_CEILING=${COPY_CEILING-$ROOT/build/bench/copy_ceiling}

CLUSTER=65536
EMPTY_SIZE=64G          # allocating jobs: large enough that no run wraps
FILL_SIZE=4G            # read and overwrite jobs: virtual size ...
FILL_BYTES=1G           # ... and the prefilled working set at its start
FILL_SIZE_BYTES=$((4 << 30))    # FILL_SIZE in bytes
BIG_SIZE=1T             # RSS and mount time image
BIG_CLUSTERS=100000     # allocated clusters in it, evenly spread
TREE_FILES=${TREE_FILES:-3000}  # ext4-tree: files in the tarball ...
TREE_SEED=${TREE_SEED:-13}      # ... made from this seed
TREE_DISK=${TREE_DISK:-4G}      # ... and the virtual disk it goes to

die() { echo "bench/run.sh: $*" >&2; exit 1; }
note() { echo "bench/run.sh: $*" >&2; }

for tool in fio jq qemu-img qemu-io fusermount3 awk; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
[[ -x $QCOW2FUSE ]] || die "QCOW2FUSE=$QCOW2FUSE is not an executable (run make)"
[[ -x $PASSTHROUGH ]] || die "PASSTHROUGH=$PASSTHROUGH is not an executable (run make bench)"
[[ -n $QSD && -x $QSD ]] || { note "qemu-storage-daemon not found: the qsd column stays empty"; QSD=""; }
[[ -e /dev/fuse ]] || die "/dev/fuse is missing"
[[ $BUSY_LOOPS =~ ^[0-9]+$ ]] || die "BUSY_LOOPS=$BUSY_LOOPS is not a number"
QCOW2FUSE=$(realpath "$QCOW2FUSE")
PASSTHROUGH=$(realpath "$PASSTHROUGH")

# --- jobs ------------------------------------------------------------------
# name | label | image (empty: fresh empty EMPTY_SIZE image; filled: FILL_SIZE
# image with FILL_BYTES prefilled) | fio direction | figure (bw: MB/s,
# iops) | fio arguments
ALL_JOBS=(
    "seqwrite-alloc|alloc seq write 1M QD16|empty|write|bw|--rw=write --bs=1M --iodepth=16"
    "seqread|seq read 1M QD16|filled|read|bw|--rw=read --bs=1M --iodepth=16"
    "randread-qd1|rand read 4k QD1|filled|read|iops|--rw=randread --bs=4k --iodepth=1"
    "randread-qd16|rand read 4k QD16|filled|read|iops|--rw=randread --bs=4k --iodepth=16"
    "randwrite-alloc|alloc rand write 4k QD16|empty|write|iops|--rw=randwrite --bs=4k --iodepth=16"
    "randwrite-over|overwrite rand write 4k QD16|filled|write|iops|--rw=randwrite --bs=4k --iodepth=16"
    "randwrite-fsync|rand write 4k QD1 fsync=1|filled|write|iops|--rw=randwrite --bs=4k --iodepth=1 --fsync=1"
    # Not a throughput job (left out of the geometric mean, marked +):
    # the reads of randread-qd1 while a second fio job streams 1 MiB writes
    # (QD4) into the upper half of the disk with an fsync every 64 MiB.  It
    # shows whether a flush stalls the other requests.
    "mixed-read-qd1|+ rand read 4k QD1 + writer|filled|read|iops|--rw=randread --bs=4k --iodepth=1 --name=writer --filename=@TARGET@ --direct=@DIRECT@ --ioengine=@ENGINE@ --time_based --runtime=@RUNTIME@ --rw=write --bs=1M --iodepth=4 --offset=@HALF@ --size=@HALF@ --fsync=64"
    # Not fio: ext4 on a loop device over the disk file, a tarball extracted
    # into it and synced, then a cold read of every file (run_tree).  Its
    # own table; left out of the geometric mean.
    "ext4-tree|ext4 tree|tree|-|time|"
)
SELECTED=()
for j in "${ALL_JOBS[@]}"; do
    name=${j%%|*}
    if [[ -z ${JOBS:-} || " $JOBS " == *" $name "* ]]; then
        SELECTED+=("$j")
    fi
done
((${#SELECTED[@]})) || die "JOBS=$JOBS matches no job"
# ext4-tree needs root (losetup, mount, drop_caches), mkfs.ext4, GNU tar
# and python3 (for the tarball): without them it is left out, said so.
TREE_JOB=0
for j in "${SELECTED[@]}"; do [[ $j == ext4-tree\|* ]] && TREE_JOB=1; done
if ((TREE_JOB)); then
    why=""
    [[ $EUID == 0 ]] || why="it needs root (losetup, mount, drop_caches)"
    for tool in losetup mkfs.ext4 tar python3 mount umount; do
        command -v "$tool" >/dev/null || why="${why:-$tool is not installed}"
    done
    if [[ -n $why ]]; then
        note "leaving out the ext4-tree job: $why"
        TREE_JOB=0
        kept=()
        for j in "${SELECTED[@]}"; do [[ $j == ext4-tree\|* ]] || kept+=("$j"); done
        SELECTED=("${kept[@]}")
        ((${#SELECTED[@]})) || die "no job left to run"
    fi
fi
IMPLS=(qcow2fuse qsd passthrough)
case $HOST in
0) ;;
1) IMPLS+=(host) ;;
*) die "HOST=$HOST: expected 0 or 1" ;;
esac
case $HOST_FLUSH in
fdatasync|fsync) ;;
*) die "HOST_FLUSH=$HOST_FLUSH: expected fdatasync or fsync" ;;
esac
BASELINE=${BASELINE:-}
if [[ -n $BASELINE ]]; then
    [[ -x $BASELINE ]] || die "BASELINE=$BASELINE is not an executable file"
    IMPLS+=(baseline)
fi

# --- directories and clean-up ------------------------------------------------
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS=${RESULTS:-$ROOT/build/bench/results-$STAMP}
mkdir -p "$RESULTS/logs"
RESULTS=$(cd "$RESULTS" && pwd -P)
TMPBASE=${BENCH_TMPDIR:-$ROOT/build/bench}
mkdir -p "$TMPBASE"
WORKBASE=$(mktemp -d "$(cd "$TMPBASE" && pwd -P)/work.XXXXXX")
WORK=$WORKBASE
LOOPDEV=""
SCRATCH_MNT=""
TREE_LOOP=""    # ext4-tree: the loop device over the disk file ...
TREE_MNT=""     # ... and where its ext4 is mounted
SUMMARY=$RESULTS/summary.tsv
printf 'job\timpl\trep\tvalue\tunit\tdaemon_vmhwm_kb\tloadavg1_before\tdaemon_cpu_us_per_io\tsteal_pct\n' >"$SUMMARY"
rm -f "$RESULTS/copy_ceiling.txt"    # the seq read job's copy ceiling, one line per repetition

CUR_PID=""      # the daemon currently running (started by this script)
CUR_MP=""       # its mount point
CUR_KIND=""

is_mounted() {
    awk -v p="$1" '$5 == p { found = 1 } END { exit !found }' /proc/self/mountinfo
}

# alive PID: the process exists and is not a zombie.
alive() {
    local st
    st=$(awk '/^State:/ { print $2 }' "/proc/$1/status" 2>/dev/null) || return 1
    [[ -n $st && $st != Z ]]
}

# wait_exit PID SECONDS: wait for a process this shell started (or, for
# the daemonized qcow2fuse, found by its exact command line) to exit.
wait_exit() {
    local pid=$1 t=$(($2 * 20))
    while alive "$pid" && ((t-- > 0)); do
        sleep 0.05
    done
    if alive "$pid"; then
        note "process $pid did not exit; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    if [[ -n $TREE_MNT ]] && is_mounted "$TREE_MNT"; then
        umount "$TREE_MNT" 2>/dev/null || umount -l "$TREE_MNT" 2>/dev/null || true
    fi
    [[ -z $TREE_LOOP ]] || losetup -d "$TREE_LOOP" 2>/dev/null || true
    if [[ -n $CUR_MP ]] && is_mounted "$CUR_MP"; then
        fusermount3 -u "$CUR_MP" 2>/dev/null || fusermount3 -uz "$CUR_MP" 2>/dev/null || true
    fi
    if [[ -n $CUR_PID ]] && alive "$CUR_PID"; then
        kill -TERM "$CUR_PID" 2>/dev/null || true
        wait_exit "$CUR_PID" 20
    fi
    if [[ -n $SCRATCH_MNT ]]; then
        umount "$SCRATCH_MNT" 2>/dev/null || umount -l "$SCRATCH_MNT" 2>/dev/null || true
    fi
    [[ -z $LOOPDEV ]] || losetup -d "$LOOPDEV" 2>/dev/null || true
    rm -rf "$WORKBASE"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[[ $WORKBASE != *[[:space:]]* ]] || die "BENCH_TMPDIR must not contain white space"
avail_gib=$(df -P -BG "$WORKBASE" | awk 'NR == 2 { sub("G", "", $4); print $4 }')
need_gib=25
if [[ $SCRATCH == auto ]]; then
    SCRATCH=dir
    if [[ $EUID == 0 ]] && findmnt -no OPTIONS -T "$WORKBASE" | tr ',' '\n' | grep -qx discard; then
        SCRATCH=loop
    fi
fi
case $SCRATCH in
loop)
    need_gib=$(($(numfmt --from=iec "$SCRATCH_SIZE") >> 30))
    ((avail_gib > need_gib)) || die "SCRATCH_SIZE=$SCRATCH_SIZE does not fit in the ${avail_gib} GiB free under $WORKBASE"
    for tool in losetup mkfs.ext4 dd; do
        command -v "$tool" >/dev/null || die "$tool is not installed (or run with SCRATCH=dir)"
    done
    note "writing a $SCRATCH_SIZE scratch file system (SCRATCH=loop) ..."
    dd if=/dev/zero of="$WORKBASE/scratch.img" bs=64M count=$((need_gib * 16)) \
        oflag=direct status=none
    LOOPDEV=$(losetup --find --show --direct-io=on "$WORKBASE/scratch.img")
    mkfs.ext4 -q -F -m 0 -N 4096 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$LOOPDEV"
    SCRATCH_MNT=$WORKBASE/fs
    mkdir -p "$SCRATCH_MNT"
    mount -t ext4 -o nodiscard "$LOOPDEV" "$SCRATCH_MNT"
    WORK=$SCRATCH_MNT
    ;;
dir)
    ((avail_gib >= need_gib)) || note "only ${avail_gib} GiB free under $WORK; the allocating jobs may need ~20 GiB"
    ;;
*) die "SCRATCH=$SCRATCH: expected auto, loop or dir" ;;
esac

# host needs fio's io_uring engine on a buffered file of this file system
# (a kernel with io_uring enabled): one tiny run to find out.
if [[ $HOST == 1 ]]; then
    if ! fio --name=probe --filename="$WORK/io_uring-probe" --size=1M --bs=4k --rw=write \
        --direct=0 --ioengine=io_uring --output=/dev/null >/dev/null 2>&1; then
        note "fio's io_uring engine does not work here: leaving out the host column"
        HOST=0
        kept=()
        for impl in "${IMPLS[@]}"; do [[ $impl == host ]] || kept+=("$impl"); done
        IMPLS=("${kept[@]}")
    fi
    rm -f "$WORK/io_uring-probe"
fi

# --- machine -----------------------------------------------------------------
machine_info() {
    echo "date:        $(date -Is)"
    echo "machine:     $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)," \
        "$(awk '/^MemTotal/ { printf "%.1f GiB RAM", $2 / 1048576 }' /proc/meminfo)"
    echo "kernel:      $(uname -sr)"
    echo "qcow2fuse:   $QCOW2FUSE ($("$QCOW2FUSE" --version 2>&1 | head -n1)," \
        "git $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown))"
    [[ -z $QCOW2FUSE_OPTS ]] || echo "             -o $QCOW2FUSE_OPTS"
    [[ -z $BASELINE ]] || echo "baseline:    $BASELINE${BASELINE_OPTS:+ -o $BASELINE_OPTS}"
    echo "qsd:         ${QSD:-none}${QSD:+ ($("$QSD" --version | head -n1))}"
    echo "fio:         $(fio --version)"
    if [[ $SCRATCH == loop ]]; then
        echo "image dir:   $WORK (ext4 on $LOOPDEV, direct I/O to a zero-filled $SCRATCH_SIZE file" \
            "on $(df -PT "$WORKBASE" | awk 'NR == 2 { print $2 " " $1 }'), nodiscard)"
    else
        echo "image dir:   $WORK ($(df -PT "$WORK" | awk 'NR == 2 { print $2 " " $1 }'))"
    fi
    echo "runs:        ${RUNTIME}s each, $REPS repetition(s), median shown"
    echo "load:        $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min) before the first run"
}

# --- images ------------------------------------------------------------------
# make_image IMPL KIND: a fresh image for IMPL (qcow2, or raw for the
# passthrough and for host: the same sparse file, filled the same way);
# prints its path.
make_image() {
    local impl=$1 kind=$2 fmt=qcow2 img size cmds=()
    [[ $impl == passthrough || $impl == host ]] && fmt=raw
    img=$WORK/img.$fmt
    rm -f "$img"
    case $kind in
    empty) size=$EMPTY_SIZE ;;
    tree) size=$TREE_DISK ;;
    *) size=$FILL_SIZE ;;
    esac
    if [[ $fmt == qcow2 ]]; then
        qemu-img create -q -f qcow2 -o cluster_size=$CLUSTER "$img" "$size"
    else
        truncate -s "$size" "$img"
    fi
    if [[ $kind == filled ]]; then
        local chunk=$((64 << 20)) total off
        total=$(numfmt --from=iec "$FILL_BYTES")
        for ((off = 0; off < total; off += chunk)); do
            cmds+=(-c "write -q -P 0xa5 $off $chunk")
        done
        qemu-io -f "$fmt" "${cmds[@]}" "$img" >/dev/null
    fi
    sync -f "$img"
    if [[ $kind == filled ]]; then
        # The same page cache for every implementation.  What the fill
        # leaves cached depends on how QEMU's qcow2 and raw drivers wrote
        # (the size of the folios ext4 made for those writes), and a
        # daemon's reads of it cost more or less by that alone: 1 MiB
        # reads at QD16 had qcow2fuse 0.92x the passthrough on the fill's
        # cache and 1.11x with both files read back (bench/README).  So
        # drop the file's pages and read the part in use back, as a first
        # reader would.
        dd if="$img" iflag=nocache count=0 status=none
        if [[ $fmt == qcow2 ]]; then
            cat "$img" >/dev/null
        else
            head -c "$(numfmt --from=iec "$FILL_BYTES")" "$img" >/dev/null
        fi
    fi
    echo "$img"
}

# make_big_image: BIG_SIZE qcow2 with BIG_CLUSTERS allocated clusters spread
# evenly over the disk (so every L2 table exists).  fio writes 4 KiB every
# STRIDE clusters into a sparse raw file; qemu-img convert skips the holes.
make_big_image() {
    local raw=$WORK/big.raw img=$WORK/big.qcow2 total stride
    total=$(($(numfmt --from=iec "$BIG_SIZE") / CLUSTER))
    stride=$((total / BIG_CLUSTERS))
    rm -f "$raw" "$img"
    truncate -s "$BIG_SIZE" "$raw"
    fio --name=gen --filename="$raw" --rw=write:$((stride * CLUSTER - 4096)) --bs=4k \
        --number_ios=$BIG_CLUSTERS --size="$BIG_SIZE" --ioengine=psync \
        --buffer_pattern=0x5a --output=/dev/null
    qemu-img convert -f raw -O qcow2 -o cluster_size=$CLUSTER "$raw" "$img"
    rm -f "$raw"
    sync -f "$img"
    echo "$img"
}

# --- daemons -----------------------------------------------------------------
wait_mounted() {
    local mp=$1 pid=$2 t=600
    while ! is_mounted "$mp"; do
        alive "$pid" || { wait "$pid" 2>/dev/null || true; return 1; }
        ((t-- > 0)) || return 1
        sleep 0.05
    done
}

# start_impl IMPL IMAGE LOG: mount IMAGE with IMPL in the background of this
# shell; sets CUR_PID, CUR_MP and TARGET (the file fio uses).  host mounts
# nothing and starts no daemon: fio uses the raw file itself (CUR_PID and
# CUR_MP stay empty, so the daemon CPU figures are "-").
start_impl() {
    local impl=$1 img=$2 log=$3
    CUR_KIND=$impl
    case $impl in
    host)
        CUR_PID="" CUR_MP=""
        TARGET=$img
        return 0
        ;;
    qcow2fuse|baseline|passthrough)
        CUR_MP=$WORK/mnt
        mkdir -p "$CUR_MP"
        if [[ $impl == qcow2fuse ]]; then
            "$QCOW2FUSE" -f ${QCOW2FUSE_OPTS:+-o "$QCOW2FUSE_OPTS"} "$img" "$CUR_MP" >>"$log" 2>&1 &
        elif [[ $impl == baseline ]]; then
            "$BASELINE" -f ${BASELINE_OPTS:+-o "$BASELINE_OPTS"} "$img" "$CUR_MP" >>"$log" 2>&1 &
        else
            "$PASSTHROUGH" -f "$img" "$CUR_MP" >>"$log" 2>&1 &
        fi
        CUR_PID=$!
        TARGET=$CUR_MP/disk
        ;;
    qsd)
        CUR_MP=$WORK/qsd-export
        : >"$CUR_MP"
        "$QSD" \
            --blockdev "driver=file,node-name=file,filename=$img,cache.direct=off" \
            --blockdev driver=qcow2,node-name=qcow2,file=file \
            --export "type=fuse,id=exp,node-name=qcow2,mountpoint=$CUR_MP,writable=on" \
            >>"$log" 2>&1 &
        CUR_PID=$!
        TARGET=$CUR_MP
        ;;
    esac
    if ! wait_mounted "$CUR_MP" "$CUR_PID"; then
        note "$impl did not mount $img (log: $log)"
        tail -n 5 "$log" >&2 || true
        if alive "$CUR_PID"; then
            kill -TERM "$CUR_PID" 2>/dev/null || true
            wait_exit "$CUR_PID" 20
        fi
        return 1
    fi
}

# stop_impl: unmount, wait for the daemon to exit; sets HWM to its VmHWM
# (KiB) read just before the unmount.  Runs in the main shell (the daemon
# is its child).
stop_impl() {
    local hwm
    if [[ $CUR_KIND == host ]]; then
        HWM=-
        return 0
    fi
    hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$CUR_PID/status" 2>/dev/null || true)
    fusermount3 -u "$CUR_MP" || note "fusermount3 -u $CUR_MP failed"
    # qsd keeps running without exports: end it (qcow2fuse and the
    # passthrough exit on unmount, after writing their metadata back).
    [[ $CUR_KIND == qsd ]] && kill -TERM "$CUR_PID" 2>/dev/null
    wait_exit "$CUR_PID" 120
    CUR_PID="" CUR_MP=""
    HWM=${hwm:--}
}

# --- fio -----------------------------------------------------------------------
# run_fio NAME OUT SIZE DIR FIGURE ARGS...: one time-based fio run on TARGET;
# prints the figure (MB/s or IOPS), or "-" if fio failed.
#
# On a FUSE file (CUR_KIND qcow2fuse, qsd, passthrough, baseline): O_DIRECT
# and libaio, so the FUSE page cache is out of the way and the daemon gets
# the job's queue depth.  On the host raw file (CUR_KIND host) the job has
# to use the host page cache the way the daemons do (they all do buffered
# pread/pwrite on their image file and answer a FUSE fsync with one
# fdatasync): --direct=0, and io_uring, which takes the job's queue depth
# at once on a buffered file (reads of cached pages complete at submission,
# writes that would block go to its kernel workers; libaio would do every
# buffered request inside io_submit, one at a time); --fsync=N becomes --fdatasync=N
# (HOST_FLUSH=fsync keeps fsync, which also commits the inode's mtime
# change through the journal: a cost no daemon's fdatasync pays).  What
# host does not pay: the FUSE round trip (request, daemon wake-up, reply)
# and any daemon code.  So its figure is the ceiling for a daemon that does
# buffered I/O on this file system, not a competitor.  --invalidate=0 on
# host: by default fio drops the file's cached pages before a job, which
# no daemon does to its image; every implementation's file starts with
# the cache make_image leaves (the used part read back once).  What is
# cached matters: overwriting 4 KiB inside the large folios of a file
# written in 64 MiB pieces costs ext4 a walk over every buffer head of
# the folio (measured here before make_image read files back: 25k IOPS
# with the fill's cache kept, 127k with it dropped).
run_fio() {
    local name=$1 out=$2 size=$3 dir=$4 fig=$5 a args=() global=() direct=1 engine=libaio
    shift 5
    if [[ $CUR_KIND == host ]]; then
        direct=0 engine=io_uring
        global+=(--invalidate=0)    # before the first --name: for every job
    fi
    [[ -z $FIO_CPUS ]] || global+=(--cpus_allowed="$FIO_CPUS")
    # A second job in ARGS names the target, the run time and the I/O mode
    # by placeholder (options after --name belong to that job only).
    for a in "$@"; do
        a=${a//@TARGET@/$TARGET}
        a=${a//@RUNTIME@/$RUNTIME}
        a=${a//@HALF@/$((FILL_SIZE_BYTES / 2))}
        a=${a//@DIRECT@/$direct}
        a=${a//@ENGINE@/$engine}
        if [[ $CUR_KIND == host && $HOST_FLUSH == fdatasync && $a == --fsync=* ]]; then
            a=--fdatasync=${a#--fsync=}
        fi
        args+=("$a")
    done
    local busy=() i ok=1
    for ((i = 0; i < BUSY_LOOPS; i++)); do
        bash -c 'while :; do :; done' </dev/null >/dev/null 2>&1 &
        busy+=($!)
    done
    fio "${global[@]}" --name="$name" --filename="$TARGET" --direct="$direct" --ioengine="$engine" \
        --time_based --runtime="$RUNTIME" --size="$size" "${args[@]}" \
        --output-format=json --output="$out" >/dev/null 2>"$out.err" || ok=0
    if ((${#busy[@]})); then
        kill "${busy[@]}" 2>/dev/null || true
        wait "${busy[@]}" 2>/dev/null || true
    fi
    if ((!ok)); then
        note "fio $name failed (see $out.err)"
        echo -
        return
    fi
    [[ -s $out.err ]] || rm -f "$out.err"
    if [[ $fig == bw ]]; then
        jq -r ".jobs[0].$dir.bw_bytes / 1e6" "$out"
    else
        jq -r ".jobs[0].$dir.iops" "$out"
    fi
}

# CPU time (user + system, all threads) the daemon has used, in clock ticks;
# "-" without a daemon (host: an empty PID would read /proc//stat, i.e.
# /proc/stat).
daemon_cpu_ticks() {
    [[ -n $1 ]] || { echo -; return; }
    awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo -
}

# "steal total" clock ticks of the whole machine so far (/proc/stat): on a
# VM whose host is busy, steal eats into every implementation's figure.
steal_ticks() {
    awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; print $9, t }' /proc/stat
}

# steal_pct "STEAL0 TOTAL0" "STEAL1 TOTAL1": the steal percentage between two
# steal_ticks readings.
steal_pct() {
    awk -v a="$1" -v b="$2" 'BEGIN { split(a, x); split(b, y);
        t = y[2] - x[2]; if (t <= 0) print "-"; else printf "%.1f", 100 * (y[1] - x[1]) / t }'
}

# cpu_per_io TICKS0 TICKS1 FIO_JSON: the daemon's CPU microseconds per I/O
# request that fio completed (all jobs, reads and writes).  Unlike the
# figure itself, it hardly moves when other guests steal CPU time.
cpu_per_io() {
    local ios
    [[ $1 == - || $2 == - || ! -s $3 ]] && { echo -; return; }
    ios=$(jq '[.jobs[] | .read.total_ios + .write.total_ios] | add' "$3" 2>/dev/null || echo 0)
    awk -v c=$(($2 - $1)) -v n="$ios" -v hz="$(getconf CLK_TCK)" \
        'BEGIN { if (n > 0) printf "%.2f", c * 1e6 / hz / n; else print "-" }'
}

# --- ext4-tree: a real workload ---------------------------------------------------
# make_tree_tar OUT: a tarball of TREE_FILES files of pseudo-random bytes
# (incompressible, never zero: no layer can skip or shrink them), sizes 1 KiB
# to 1 MiB drawn as 1 KiB * 1024^(u^1.5) (a few large files, many small
# ones; about 108 KB each on average), 50 to a directory, all from
# TREE_SEED: the same bytes in every run and on every machine.
make_tree_tar() {
    python3 - "$TREE_FILES" "$TREE_SEED" "$1" <<'PY'
import io, random, sys, tarfile
files, seed, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = random.Random(seed)
with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
    for i in range(files):
        if i % 50 == 0:
            d = tarfile.TarInfo("tree/d%03d" % (i // 50))
            d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1700000000
            tar.addfile(d)
        size = int(1024 * 1024 ** (rng.random() ** 1.5))
        f = tarfile.TarInfo("tree/d%03d/f%05d" % (i // 50, i))
        f.size, f.mode, f.mtime = size, 0o644, 1700000000
        tar.addfile(f, io.BytesIO(rng.randbytes(size)))
PY
}

now_ns() { date +%s%N; }

# drop_all_caches: the page cache of the whole machine (the ext4's files,
# the loop device's buffers, the FUSE disk file's pages, the image file
# under the daemon), dentries and inodes.
drop_all_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# run_tree IMPL REP: the ext4-tree job on TARGET (the mounted disk file of
# the daemon CUR_PID).  Appends a write and a read line to TREE_TSV.
# Returns 1 (after cleaning up) when a step fails.
run_tree() {
    local impl=$1 rep=$2 t0 t1 c0 c1 s0 s1 wsec rsec wcpu rcpu bytes hz load
    hz=$(getconf CLK_TCK)
    load=$(cut -d' ' -f1 /proc/loadavg)
    TREE_MNT=$WORK/tree-mnt
    mkdir -p "$TREE_MNT"
    # losetup's default, buffered I/O to the disk file (qcow2fuse and the
    # passthrough open it with FOPEN_DIRECT_IO, so no FUSE page cache; qsd
    # has one).  Not --direct-io=on: qemu-storage-daemon 7.2's export loses
    # the loop device's direct writes (mkfs.ext4 then leaves a file system
    # that does not mount: "iget: checksum invalid").
    TREE_LOOP=$(losetup --find --show "$TARGET") || { TREE_LOOP=""; return 1; }
    mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$TREE_LOOP" ||
        { tree_teardown; return 1; }
    mount -t ext4 -o nodiscard "$TREE_LOOP" "$TREE_MNT" || { tree_teardown; return 1; }
    cat "$TREE_TAR" >/dev/null         # the tarball itself read from memory
    # Write phase: extract, then syncfs (ext4 -> loop -> the daemon's fsync).
    c0=$(daemon_cpu_ticks "$CUR_PID") s0=$(steal_ticks) t0=$(now_ns)
    tar -xf "$TREE_TAR" -C "$TREE_MNT" || { tree_teardown; return 1; }
    sync -f "$TREE_MNT" || { tree_teardown; return 1; }
    t1=$(now_ns) c1=$(daemon_cpu_ticks "$CUR_PID") s1=$(steal_ticks)
    wsec=$(awk -v n=$((t1 - t0)) 'BEGIN { printf "%.3f", n / 1e9 }')
    wcpu=$(awk -v c=$((c1 - c0)) -v hz="$hz" 'BEGIN { printf "%.2f", c / hz }')
    printf 'ext4-tree\t%s\t%s\twrite\t%s\t%s\t%s\t%s\t-\n' "$impl" "$rep" "$wsec" "$wcpu" \
        "$(steal_pct "$s0" "$s1")" "$load" >>"$TREE_TSV"
    # Cold: nothing of the tree left in any cache (ext4 unmounted, the
    # whole page cache dropped, FUSE pages included), then every file read
    # in archive order.  tar -f - into a pipe: GNU tar does not read the
    # files' data when its archive is /dev/null.
    umount "$TREE_MNT" || { tree_teardown; return 1; }
    drop_all_caches
    mount -t ext4 -o ro "$TREE_LOOP" "$TREE_MNT" || { tree_teardown; return 1; }
    c0=$(daemon_cpu_ticks "$CUR_PID") s0=$(steal_ticks) t0=$(now_ns)
    bytes=$(tar -cf - -C "$TREE_MNT" tree | wc -c) || { tree_teardown; return 1; }
    t1=$(now_ns) c1=$(daemon_cpu_ticks "$CUR_PID") s1=$(steal_ticks)
    rsec=$(awk -v n=$((t1 - t0)) 'BEGIN { printf "%.3f", n / 1e9 }')
    rcpu=$(awk -v c=$((c1 - c0)) -v hz="$hz" 'BEGIN { printf "%.2f", c / hz }')
    # The same tar of the same tree: as many bytes as the tarball, or the
    # read went wrong.
    if [[ $bytes != "$TREE_TAR_BYTES" ]]; then
        note "ext4-tree on $impl: the cold read gave $bytes bytes of tar, expected $TREE_TAR_BYTES"
        rsec=- rcpu=-
    fi
    printf 'ext4-tree\t%s\t%s\tread\t%s\t%s\t%s\t%s\t%s\n' "$impl" "$rep" "$rsec" "$rcpu" \
        "$(steal_pct "$s0" "$s1")" "$load" "$bytes" >>"$TREE_TSV"
    printf '  %-16s %-12s run %d: extract+sync %8ss (daemon CPU %ss), cold read %8ss (daemon CPU %ss)\n' \
        ext4-tree "$impl" "$rep" "$wsec" "$wcpu" "$rsec" "$rcpu"
    tree_teardown
}

# tree_teardown: unmount the ext4 and detach the loop device (before the
# daemon goes).
tree_teardown() {
    if [[ -n $TREE_MNT ]] && is_mounted "$TREE_MNT"; then
        umount "$TREE_MNT" || umount -l "$TREE_MNT" || true
    fi
    [[ -z $TREE_LOOP ]] || losetup -d "$TREE_LOOP" || true
    TREE_LOOP=""
}

median() {
    sort -g | awk '$1 != "-" { a[++n] = $1 }
        END { if (!n) print "-"; else if (n % 2) print a[(n + 1) / 2];
              else print (a[n / 2] + a[n / 2 + 1]) / 2 }'
}

ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-";
                                     else printf "%.2fx", a / b }'
}

fmt_fig() {
    awk -v v="$1" 'BEGIN { if (v == "-") print "-"; else if (v >= 100) printf "%.0f", v;
                           else printf "%.1f", v }'
}

# --- main ----------------------------------------------------------------------
INFO=$(machine_info)
echo "$INFO" | tee "$RESULTS/machine.txt"
echo "cache:       qcow2fuse and the passthrough use the host page cache for the" \
    "image file; qsd runs with cache.direct=off (host page cache too);"
echo "             images are written, then read back once, just before each run, so reads hit warm cache"
echo "fio:         --direct=1 --ioengine=libaio on MNT/disk (qsd: its export file)${FIO_CPUS:+, on CPUs $FIO_CPUS only}$( ((BUSY_LOOPS)) && echo ", beside $BUSY_LOOPS busy loops")"
if [[ $HOST == 1 ]]; then
    echo "host:        fio on a raw file in the image dir, no FUSE, no daemon: --direct=0" \
        "--ioengine=io_uring --invalidate=0$([[ $HOST_FLUSH == fdatasync ]] && echo ", --fsync=N run as --fdatasync=N")" \
        "(the host page cache and flush the daemons use; a ceiling for them)"
fi
echo "images:      qcow2 with 64 KiB clusters; allocating jobs: fresh empty $EMPTY_SIZE" \
    "image, whole disk as fio's range; others: $FILL_SIZE image, first $FILL_BYTES" \
    "prefilled and used as fio's range"
echo "results:     $RESULTS"
echo

TREE_TSV=$RESULTS/tree.tsv
if ((TREE_JOB)); then
    printf 'job\timpl\trep\tphase\tseconds\tdaemon_cpu_s\tsteal_pct\tloadavg1_before\ttar_bytes\n' \
        >"$TREE_TSV"
    TREE_TAR=$WORKBASE/tree.tar
    note "making the ext4-tree tarball ($TREE_FILES files, seed $TREE_SEED) ..."
    make_tree_tar "$TREE_TAR"
    TREE_TAR_BYTES=$(stat -c %s "$TREE_TAR")
    echo "ext4-tree:   $TREE_FILES files, $(tar -tvf "$TREE_TAR" | awk '$1 !~ /^d/ { s += $3 }
        END { printf "%.1f MB", s / 1e6 }') of file data (seed $TREE_SEED), on ext4 on a" \
        "$TREE_DISK disk" | tee -a "$RESULTS/machine.txt"
fi

declare -A VAL CPU
for j in "${SELECTED[@]}"; do
    IFS='|' read -r name label kind dir fig args <<<"$j"
    if [[ $kind == empty ]]; then size=$EMPTY_SIZE; else size=$FILL_BYTES; fi
    read -r -a fio_args <<<"$args"
    for ((rep = 1; rep <= REPS; rep++)); do
        # The order rotates with every repetition (A B C, B C A, C A B, ...)
        # so that no implementation always runs first or last.
        order=()
        for ((k = 0; k < ${#IMPLS[@]}; k++)); do
            order+=("${IMPLS[(k + rep - 1) % ${#IMPLS[@]}]}")
        done
        for impl in "${order[@]}"; do
            [[ $impl == qsd && -z $QSD ]] && continue
            # ext4-tree needs a FUSE disk file under its loop device; host
            # has none (see bench/README).
            [[ $impl == host && $kind == tree ]] && continue
            img=$(make_image "$impl" "$kind")
            log=$RESULTS/logs/$name.$impl.r$rep.log
            if ! start_impl "$impl" "$img" "$log"; then
                CUR_PID="" CUR_MP=""
                printf '%s\t%s\t%s\t-\t\t-\t-\t-\t-\n' "$name" "$impl" "$rep" >>"$SUMMARY"
                rm -f "$img"
                continue
            fi
            if [[ $kind == tree ]]; then
                if ! run_tree "$impl" "$rep"; then
                    note "ext4-tree failed on $impl (log: $log)"
                    printf 'ext4-tree\t%s\t%s\twrite\t-\t-\t-\t-\t-\n' "$impl" "$rep" >>"$TREE_TSV"
                    printf 'ext4-tree\t%s\t%s\tread\t-\t-\t-\t-\t-\n' "$impl" "$rep" >>"$TREE_TSV"
                fi
                stop_impl
                rm -f "$img"
                continue
            fi
            load=$(cut -d' ' -f1 /proc/loadavg)
            perf_pid=""
            if [[ $PERF == 1 && $impl == qcow2fuse ]]; then
                # shellcheck disable=SC2086  # PERF_ARGS is a list of options
                perf record -q $PERF_ARGS -p "$CUR_PID" -o "$RESULTS/perf.$name.r$rep.data" \
                    -- sleep "$RUNTIME" >/dev/null 2>&1 &
                perf_pid=$!
            fi
            cpu0=$(daemon_cpu_ticks "$CUR_PID")
            steal0=$(steal_ticks)
            v=$(run_fio "$name" "$RESULTS/$name.$impl.r$rep.json" "$size" "$dir" "$fig" \
                "${fio_args[@]}")
            cpu1=$(daemon_cpu_ticks "$CUR_PID")
            steal1=$(steal_ticks)
            if [[ $impl == host && $name == seqread && -n $COPY_CEILING ]]; then
                if [[ -x $COPY_CEILING ]]; then
                    c=$("$COPY_CEILING" "$TARGET" "$(nproc)" "$RUNTIME" $((1 << 20)) \
                        "$(numfmt --from=iec "$FILL_BYTES")" | sed -n 's/.*: \([0-9.]*\) MB\/s$/\1/p')
                    printf '%s\n' "${c:--}" >>"$RESULTS/copy_ceiling.txt"
                    printf '  %-16s %-12s run %d: %10s MB/s  (pread + memcpy, %s threads, no FUSE)\n' \
                        "$name" copy-ceiling "$rep" "$(fmt_fig "${c:--}")" "$(nproc)"
                else
                    note "COPY_CEILING=$COPY_CEILING is not an executable (make build/bench/copy_ceiling)"
                fi
            fi
            cpu_io=$(cpu_per_io "$cpu0" "$cpu1" "$RESULTS/$name.$impl.r$rep.json")
            steal=$(steal_pct "$steal0" "$steal1")
            if [[ -n $perf_pid ]]; then
                wait "$perf_pid" || true
                perf report -i "$RESULTS/perf.$name.r$rep.data" --stdio --no-children \
                    --percent-limit 1 >"$RESULTS/perf.$name.r$rep.txt" 2>/dev/null || true
            fi
            stop_impl
            hwm=$HWM
            rm -f "$img"
            unit=IOPS
            [[ $fig == bw ]] && unit=MB/s
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$impl" "$rep" "$v" "$unit" \
                "$hwm" "$load" "$cpu_io" "$steal" >>"$SUMMARY"
            printf '  %-16s %-12s run %d: %10s %-5s (load %s, %s us CPU/IO, steal %s%%)\n' \
                "$name" "$impl" "$rep" "$(fmt_fig "$v")" "$unit" "$load" "$cpu_io" "$steal"
        done
    done
    for impl in "${IMPLS[@]}"; do
        VAL[$name.$impl]=$(awk -F'\t' -v j="$name" -v i="$impl" '$1 == j && $2 == i { print $4 }' \
            "$SUMMARY" | median)
        CPU[$name.$impl]=$(awk -F'\t' -v j="$name" -v i="$impl" '$1 == j && $2 == i { print $8 }' \
            "$SUMMARY" | median)
    done
done

# tree_med IMPL PHASE COLUMN: the median of a TREE_TSV column (5: seconds,
# 6: daemon CPU seconds, 7: steal) over the repetitions.
tree_med() {
    awk -F'\t' -v i="$1" -v p="$2" -v c="$3" 'NR > 1 && $2 == i && $4 == p { print $c }' \
        "$TREE_TSV" | median
}

# faster THEIRS OURS: how many times faster ours is (their time / ours).
faster() { ratio "$1" "$2"; }

# tree_table: the ext4-tree job's table (times, daemon CPU, ratios).
tree_table() {
    local phase label q s p b
    echo
    echo "ext4-tree: ext4 on a loop device over the disk file; $TREE_FILES files extracted" \
        "and synced, then a cold read of every file"
    echo "(seconds, median of $REPS; 'faster' = their time / qcow2fuse's time, > 1 is" \
        "qcow2fuse ahead; CPU: daemon user + system seconds, q/x = qcow2fuse's / theirs)"
    printf '%-16s %10s %10s %8s %11s %8s\n' phase qcow2fuse qsd faster passthrough faster
    for phase in write read; do
        label="extract + sync"
        [[ $phase == read ]] && label="cold read"
        q=$(tree_med qcow2fuse $phase 5) s=$(tree_med qsd $phase 5) p=$(tree_med passthrough $phase 5)
        printf '%-16s %10s %10s %8s %11s %8s\n' "$label" "$q" "$s" "$(faster "$s" "$q")" \
            "$p" "$(faster "$p" "$q")"
    done
    printf '%-16s %10s %10s %8s %11s %8s\n' "daemon CPU (s)" qcow2fuse qsd q/qsd passthrough q/pt
    for phase in write read; do
        label="extract + sync"
        [[ $phase == read ]] && label="cold read"
        q=$(tree_med qcow2fuse $phase 6) s=$(tree_med qsd $phase 6) p=$(tree_med passthrough $phase 6)
        printf '%-16s %10s %10s %8s %11s %8s\n' "$label" "$q" "$s" "$(ratio "$q" "$s")" \
            "$p" "$(ratio "$q" "$p")"
    done
    if [[ -n $BASELINE ]]; then
        printf '%-16s %10s %10s %8s %9s %9s %8s\n' "against baseline" qcow2fuse baseline faster \
            'CPU q' 'CPU b' q/base
        for phase in write read; do
            label="extract + sync"
            [[ $phase == read ]] && label="cold read"
            q=$(tree_med qcow2fuse $phase 5) b=$(tree_med baseline $phase 5)
            printf '%-16s %10s %10s %8s %9s %9s %8s\n' "$label" "$q" "$b" "$(faster "$b" "$q")" \
                "$(tree_med qcow2fuse $phase 6)" "$(tree_med baseline $phase 6)" \
                "$(ratio "$(tree_med qcow2fuse $phase 6)" "$(tree_med baseline $phase 6)")"
        done
    fi
    awk -F'\t' 'NR > 1 && $7 != "-" && $7 != "" { print $7 }' "$TREE_TSV" | sort -g |
        awk '{ a[++n] = $1 } END { if (n) printf "steal during the ext4-tree phases: median %s%%, max %s%%\n",
            a[int((n + 1) / 2)], a[n] }'
}

# --- table -----------------------------------------------------------------------
TABLE=$RESULTS/table.txt
FIO_SELECTED=()
for j in "${SELECTED[@]}"; do [[ $j == ext4-tree\|* ]] || FIO_SELECTED+=("$j"); done
{
    if ((${#FIO_SELECTED[@]})); then
        echo
        printf '%-30s %-5s %10s %10s %8s %11s %8s %10s %8s\n' job unit qcow2fuse qsd q/qsd \
            passthrough q/pt host q/host
        logsum=0 nlog=0 hlogsum=0 hnlog=0 blogsum=0 bnlog=0
        for j in "${FIO_SELECTED[@]}"; do
            IFS='|' read -r name label kind dir fig args <<<"$j"
            unit=IOPS
            [[ $fig == bw ]] && unit=MB/s
            q=${VAL[$name.qcow2fuse]} s=${VAL[$name.qsd]} p=${VAL[$name.passthrough]}
            h=${VAL[$name.host]:--}
            r=$(ratio "$q" "$s")
            printf '%-30s %-5s %10s %10s %8s %11s %8s %10s %8s\n' "$label" "$unit" "$(fmt_fig "$q")" \
                "$(fmt_fig "$s")" "$r" "$(fmt_fig "$p")" "$(ratio "$q" "$p")" \
                "$(fmt_fig "$h")" "$(ratio "$q" "$h")"
            if [[ $r != - && $label != +* ]]; then
                logsum=$(awk -v s="$logsum" -v q="$q" -v d="$s" 'BEGIN { printf "%.12g", s + log(q / d) }')
                nlog=$((nlog + 1))
            fi
            # best: the fastest daemon in this run, or host on a write job
            # (a daemon writes through the host page cache and flush, so
            # host's writes bound it; host's reads skip FUSE, which no
            # daemon can).
            b=$(printf '%s\n' "$q" "$p" "${VAL[$name.baseline]:--}" \
                    "$([[ $dir == write ]] && echo "$h" || echo -)" | awk '$1 != "-" && $1 > m { m = $1 } END { print m ? m : "-" }')
            if [[ $(ratio "$b" "$s") != - && $label != +* ]]; then
                blogsum=$(awk -v s="$blogsum" -v b="$b" -v d="$s" 'BEGIN { printf "%.12g", s + log(b / d) }')
                bnlog=$((bnlog + 1))
            fi
            if [[ $(ratio "$h" "$s") != - && $label != +* ]]; then
                hlogsum=$(awk -v s="$hlogsum" -v h="$h" -v d="$s" 'BEGIN { printf "%.12g", s + log(h / d) }')
                hnlog=$((hnlog + 1))
            fi
        done
        if ((nlog)); then
            awk -v s="$logsum" -v n="$nlog" \
                'BEGIN { printf "\ngeometric mean of qcow2fuse/qsd over %d jobs: %.2fx\n", n, exp(s / n) }'
        fi
        if ((bnlog)); then
            awk -v s="$blogsum" -v n="$bnlog" \
                'BEGIN { printf "geometric mean of best/qsd over %d jobs: %.2fx (best: the fastest daemon" \
                    " of this run per job, host on the write jobs)\n", n, exp(s / n) }'
        fi
        # host/qsd: the score against qsd of a daemon that cost nothing, its
        # requests going straight to the host page cache (no FUSE round
        # trip): the most any daemon doing buffered host I/O could reach in
        # this run.
        if ((hnlog)); then
            awk -v s="$hlogsum" -v n="$hnlog" \
                'BEGIN { printf "geometric mean of host/qsd over %d jobs: %.2fx (no FUSE, no daemon: the" \
                    " most a daemon doing buffered host I/O could score against qsd here)\n", n, exp(s / n) }'
        fi
        echo
        echo "daemon CPU time per I/O request (user + system, microseconds; median; host has no daemon):"
        printf '%-30s %10s %10s %11s %8s\n' job qcow2fuse qsd passthrough q/pt
        for j in "${FIO_SELECTED[@]}"; do
            IFS='|' read -r name label kind dir fig args <<<"$j"
            q=${CPU[$name.qcow2fuse]} s=${CPU[$name.qsd]} p=${CPU[$name.passthrough]}
            printf '%-30s %10s %10s %11s %8s\n' "$label" "$q" "$s" "$p" "$(ratio "$q" "$p")"
        done
        if [[ -s $RESULTS/copy_ceiling.txt ]]; then
            c=$(median <"$RESULTS/copy_ceiling.txt")
            printf '\nseq read 1M: the copy ceiling (pread + memcpy per 1 MiB on %s threads, no FUSE; median) %s MB/s:' \
                "$(nproc)" "$(fmt_fig "$c")"
            for impl in "${IMPLS[@]}"; do
                [[ -n ${VAL[seqread.$impl]:-} ]] && printf ' %s %s' "$impl" "$(ratio "${VAL[seqread.$impl]}" "$c")"
            done
            echo
        fi
        # The reads beside a writer share 2 CPUs with it: a daemon whose
        # writer goes faster leaves the reads less CPU.  The writer's
        # bandwidth is shown so that the figure is read as the trade it is.
        if [[ " ${FIO_SELECTED[*]} " == *" mixed-read-qd1|"* ]]; then
            printf '\nthe writer beside "+ rand read 4k QD1 + writer", MB/s (median):'
            for impl in "${IMPLS[@]}"; do
                w=$(for f in "$RESULTS"/mixed-read-qd1."$impl".r*.json; do
                        [[ -s $f ]] && jq -r '.jobs[] | select(.jobname == "writer") | .write.bw_bytes / 1e6' "$f"
                    done 2>/dev/null | median)
                printf ' %s %s' "$impl" "$(fmt_fig "$w")"
            done
            echo
        fi
        steals=$(awk -F'\t' 'NR > 1 && $9 != "-" && $9 != "" { print $9 }' "$SUMMARY")
        if [[ -n $steals ]]; then
            printf '\nsteal (CPU time the hypervisor gave to other guests) during the runs: median %s%%, max %s%%\n' \
                "$(median <<<"$steals")" "$(sort -g <<<"$steals" | tail -n 1)"
        fi
        awk -F'\t' 'NR > 1 && $2 == "qcow2fuse" && $6 != "-" && $6 > m { m = $6 }
            END { if (m) printf "qcow2fuse peak RSS (VmHWM) over these jobs: %.1f MiB\n", m / 1024 }' "$SUMMARY"
        if [[ -n $BASELINE ]]; then
            echo
            echo "qcow2fuse against the baseline build $BASELINE (medians):"
            printf '%-30s %-5s %10s %10s %8s %9s %9s %8s\n' job unit qcow2fuse baseline q/base \
                'CPU/IO q' 'CPU/IO b' q/base
            for j in "${FIO_SELECTED[@]}"; do
                IFS='|' read -r name label kind dir fig args <<<"$j"
                unit=IOPS
                [[ $fig == bw ]] && unit=MB/s
                q=${VAL[$name.qcow2fuse]} b=${VAL[$name.baseline]}
                printf '%-30s %-5s %10s %10s %8s %9s %9s %8s\n' "$label" "$unit" "$(fmt_fig "$q")" \
                    "$(fmt_fig "$b")" "$(ratio "$q" "$b")" "${CPU[$name.qcow2fuse]}" \
                    "${CPU[$name.baseline]}" "$(ratio "${CPU[$name.qcow2fuse]}" "${CPU[$name.baseline]}")"
            done
        fi
    fi
    if ((TREE_JOB)); then tree_table; fi
} | tee "$TABLE"

# --- RSS and mount time on a 1 TiB image ------------------------------------------
if [[ $EXTRAS != 1 ]]; then
    echo
    echo "raw fio JSON, daemon logs, summary.tsv and table.txt: $RESULTS"
    exit 0
fi
echo | tee -a "$TABLE"
echo "1 TiB image, $BIG_CLUSTERS allocated 64 KiB clusters spread evenly (every L2 table exists):" | tee -a "$TABLE"
BIG=$(make_big_image)
for impl in qcow2fuse qsd; do
    [[ $impl == qsd && -z $QSD ]] && continue
    log=$RESULTS/logs/rss.$impl.log
    start_impl "$impl" "$BIG" "$log" || { CUR_PID="" CUR_MP=""; continue; }
    v=$(run_fio rss-randread "$RESULTS/rss-randread.$impl.json" "$BIG_SIZE" read iops \
        --rw=randread --bs=4k --iodepth=16)
    stop_impl
    hwm=$HWM
    printf '%s\t%s\t1\t%s\tIOPS\t%s\t-\n' rss-randread "$impl" "$v" "$hwm" >>"$SUMMARY"
    awk -v i="$impl" -v h="$hwm" -v v="$v" -v t="$RUNTIME" 'BEGIN {
        printf "  peak RSS (VmHWM) of %-9s after %ss of 4k random reads QD16 over the whole disk: %s (%s IOPS)\n",
            i, t, h == "-" ? "-" : sprintf("%.1f MiB", h / 1024), v == "-" ? "-" : sprintf("%.0f", v) }' | tee -a "$TABLE"
done

# Mount time: from starting the daemon (it daemonizes once mounted)
# until that command returns.
mnt=$WORK/mnt
mkdir -p "$mnt"
# Sets MT (ms).
mount_once() {
    local s e pid
    MT=-
    s=$(date +%s%N)
    "$QCOW2FUSE" "$BIG" "$mnt" 2>>"$RESULTS/logs/mount-time.log" || return 0
    e=$(date +%s%N)
    CUR_MP=$mnt CUR_KIND=qcow2fuse
    # The daemon forked away; find it by its exact command line (made of
    # this run's own paths) so as to wait for its exit after unmount.
    pid=$(pgrep -o -x -f -- "$QCOW2FUSE $BIG $mnt" || true)
    fusermount3 -u "$mnt"
    [[ -n $pid ]] && wait_exit "$pid" 60
    CUR_MP=""
    MT=$(awk -v n=$((e - s)) 'BEGIN { printf "%.1f", n / 1e6 }')
}
tries=5
((QUICK)) && tries=3
times=()
for ((i = 0; i < tries; i++)); do
    mount_once
    times+=("$MT")
done
printf '  mount time, warm page cache: median %s ms of %d (%s)\n' \
    "$(printf '%s\n' "${times[@]}" | median)" "$tries" "${times[*]}" | tee -a "$TABLE"
if [[ $COLD == 1 && -w /proc/sys/vm/drop_caches ]]; then
    sync
    echo 3 >/proc/sys/vm/drop_caches
    mount_once
    printf '  mount time, cold page cache (after drop_caches): %s ms\n' "$MT" | tee -a "$TABLE"
fi
rm -f "$BIG"

echo
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min); per run: summary.tsv"
echo "raw fio JSON, daemon logs, summary.tsv and table.txt: $RESULTS"
