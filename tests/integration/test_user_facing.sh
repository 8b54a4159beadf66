#!/usr/bin/env bash
# What a new user meets: image creation, snapshot views, the mount helper
# and fstab forms, make install, uninstall and deps, file naming and
# ownership, statistics, manual pages, and the messages of refusals.
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img qemu-io

top=$(cd "$TESTS_DIR/../.." && pwd)

case_create() {
    local mnt=$T/mnt size
    mount_image "$T/new.qcow2" "$mnt" create,size=3G,cluster_size=4k
    dd if=/dev/urandom of="$T/blob" bs=1M count=3 status=none
    dd if="$T/blob" of="$mnt/disk" bs=1M seek=2000 conv=notrunc,fsync status=none
    unmount_image "$mnt"
    qemu-img check "$T/new.qcow2" | grep -q '^No errors were found' || fail "created image not clean"
    size=$(virtual_size "$T/new.qcow2")
    [[ $size == $((3 << 30)) ]] || fail "created image has size $size"
    qemu-img info "$T/new.qcow2" | grep -q 'cluster_size: 4096' || fail "cluster_size not honoured"
    ref_range "$T/new.qcow2" $((2000 << 20)) $((3 << 20)) "$T/back"
    cmp "$T/back" "$T/blob" || fail "data written into the created image differs"
    # An overlay on a backing file: size from the backing file, reads its data.
    qemu-img create -q -f raw "$T/base.raw" 32M
    qio "$T/base.raw" "write -P 0x61 0 32M"
    mount_image "$T/overlay.qcow2" "$mnt" create,backing_file=base.raw
    cmp "$mnt/disk" "$T/base.raw" || fail "overlay does not read through to its backing file"
    unmount_image "$mnt"
    qemu-img info "$T/overlay.qcow2" | grep -q 'backing file: base.raw' || fail "backing file not recorded"
    qemu-img check "$T/overlay.qcow2" | grep -q '^No errors were found' || fail "overlay not clean"
    # An existing image is mounted, not recreated.
    mount_image "$T/new.qcow2" "$mnt" create,size=1G
    [[ $(stat -c %s "$mnt/disk") == $((3 << 30)) ]] || fail "-o create replaced an existing image"
    unmount_image "$mnt"
    expect_refusal "$T/none.qcow2" "$mnt" create
    stderr_mentions size
}

case_snapshot() {
    local img=$T/snap.qcow2 mnt=$T/mnt
    qemu-img create -q -f qcow2 "$img" 64M
    qio "$img" "write -P 1 0 4M"
    qemu-img snapshot -c before "$img"
    qio "$img" "write -P 2 0 1M"
    "$QCOW2FUSE" --list-snapshots "$img" >"$T/list" || fail "--list-snapshots failed"
    grep -q ' before ' "$T/list" || fail "--list-snapshots does not show the snapshot: $(cat "$T/list")"
    mount_image "$img" "$mnt" snapshot=before
    qemu-img convert -U -l snapshot.name=before -O raw "$img" "$T/snap.raw"
    cmp "$mnt/disk" "$T/snap.raw" || fail "snapshot view differs from qemu-img convert -l"
    write_fails_erofs "$mnt/disk"
    unmount_image "$mnt"
    expect_refusal "$img" "$mnt" snapshot=nosuch
    stderr_mentions nosuch
}

case_mount_helper() {
    requires mount
    local img=$T/m.qcow2 mnt=$T/mnt
    mkdir -p "$mnt"
    qemu-img create -q -f qcow2 "$img" 64M
    # mount(8) with the program#source form of type fuse (mount.fuse3).
    mount -t fuse "$QCOW2FUSE#$img" "$mnt" -o ro,dev,suid || fail "mount -t fuse failed"
    track_mount "$mnt"
    grep -q " $mnt fuse.qcow2fuse ro," /proc/mounts || fail "not mounted read-only as fuse.qcow2fuse"
    fusermount3 -u "$mnt"
    # An fstab line with options after the positional arguments.
    echo "$QCOW2FUSE#$img $mnt fuse defaults,nofail,rw,l2-cache-size=1M,discard=unmap 0 0" >"$T/fstab"
    mount -T "$T/fstab" "$mnt" || fail "mount from an fstab line failed"
    track_mount "$mnt"
    dd if=/dev/urandom of="$mnt/disk" bs=64k count=4 conv=notrunc,fsync status=none
    fusermount3 -u "$mnt"
    for _ in $(seq 100); do fuser "$img" >/dev/null 2>&1 || break; sleep 0.05; done
    qemu-img check "$img" | grep -q '^No errors were found' || fail "image written through the fstab mount is not clean"
}

case_install() {
    requires make
    make -s -C "$top" install DESTDIR="$T/root" PREFIX=/usr >/dev/null || fail "make install failed"
    for f in usr/bin/qcow2fuse usr/bin/qcow2check usr/share/man/man1/qcow2fuse.1 \
             usr/share/man/man1/qcow2check.1; do
        [[ -e $T/root/$f ]] || fail "make install did not install /$f"
    done
    "$T/root/usr/bin/qcow2fuse" --version | grep -q qcow2fuse || fail "installed binary does not run"
}

case_uninstall() {
    requires make find
    local root=$T/root left
    mkdir -p "$root/opt/q/bin"
    echo other >"$root/opt/q/bin/not-ours"         # make uninstall leaves it
    make -s -C "$top" install DESTDIR="$root" PREFIX=/opt/q >/dev/null || fail "make install failed"
    [[ -x $root/opt/q/bin/qcow2fuse && -e $root/opt/q/share/man/man1/qcow2fuse.1 ]] ||
        fail "make install did not honour PREFIX=/opt/q"
    make -s -C "$top" uninstall DESTDIR="$root" PREFIX=/opt/q >/dev/null || fail "make uninstall failed"
    left=$(cd "$root" && find . ! -type d | sort)
    [[ $left == ./opt/q/bin/not-ours ]] || fail "after make uninstall, files left: ${left//$'\n'/ }"
    make -s -C "$top" uninstall DESTDIR="$root" PREFIX=/opt/q >/dev/null ||
        fail "make uninstall with nothing installed failed"
}

# make deps installs only what is missing, and make check and make demo
# run it before they build anything.  apt-get is a stub that logs its
# arguments (update succeeds, install fails): nothing is installed.
case_deps() {
    requires make dpkg-query
    local stub=$T/stub out target
    mkdir -p "$stub"
    # shellcheck disable=SC2016  # $* and $1 are the stub's own
    printf '#!/bin/sh\necho "apt-get $*" >>"%s/apt.log"\n[ "$1" = update ]\n' "$T" >"$stub/apt-get"
    chmod +x "$stub/apt-get"
    out=$(PATH=$stub:$PATH make -s -C "$top" deps) || fail "make deps failed with everything installed"
    [[ $out == "deps: all build and test dependencies are installed" ]] || fail "make deps said: $out"
    [[ ! -e $T/apt.log ]] || fail "make deps ran apt-get with everything installed: $(cat "$T/apt.log")"

    PATH=$stub:$PATH make -s -C "$top" deps DEPS_PKGS="coreutils qcow2fuse-no-such-package" \
        >"$T/deps.out" 2>&1 && fail "make deps succeeded though apt-get install failed"
    grep -q '^deps: installing: qcow2fuse-no-such-package$' "$T/deps.out" ||
        fail "make deps did not say what it installs: $(cat "$T/deps.out")"
    [[ $(cat "$T/apt.log") == "apt-get update"$'\n'"apt-get install -y qcow2fuse-no-such-package" ]] ||
        fail "apt-get was not asked for the missing package only: $(cat "$T/apt.log")"

    # With CC=false nothing builds: apt-get asked and no build tree made
    # means deps ran first.
    for target in check demo; do
        rm -f "$T/apt.log"
        PATH=$stub:$PATH make -s -C "$top" "$target" CC=false BUILD="$T/build-$target" \
            DEPS_PKGS=qcow2fuse-no-such-package >"$T/$target.out" 2>&1 &&
            fail "make $target succeeded though its dependencies could not be installed"
        grep -q 'install -y qcow2fuse-no-such-package' "$T/apt.log" 2>/dev/null ||
            fail "make $target did not install what is missing first: $(cat "$T/$target.out")"
        [[ ! -e $T/build-$target ]] || fail "make $target started building before make deps"
    done
}

case_man_pages() {
    requires man
    local p s
    for p in qcow2fuse qcow2check; do
        MANWIDTH=80 man -l "$top/man/$p.1" >"$T/$p.txt" 2>"$T/$p.err" || fail "man -l $p.1 failed"
        for s in NAME SYNOPSIS DESCRIPTION OPTIONS EXAMPLES "EXIT STATUS" "SEE ALSO"; do
            grep -q "^$s" "$T/$p.txt" || fail "$p(1) lacks the $s section"
        done
    done
    for s in SIGNALS LIMITATIONS; do
        grep -q "^$s" "$T/qcow2fuse.txt" || fail "qcow2fuse(1) lacks the $s section"
    done
    # Every -o option the daemon's --help lists is documented.
    for o in $("$QCOW2FUSE" --help | grep -oE -- '-o [a-z0-9_-]+' | awk '{print $2}' | sort -u); do
        grep -q -- "$o" "$T/qcow2fuse.txt" || fail "option $o is not in qcow2fuse(1)"
    done
}

case_naming_and_ownership() {
    local img=$T/o.qcow2 mnt=$T/mnt
    qemu-img create -q -f qcow2 "$img" 64M
    chmod 0640 "$img"
    mount_image "$img" "$mnt" ro
    [[ $(stat -c %a "$mnt/disk") == 440 ]] || fail "mode of disk on an ro mount of a 0640 image: $(stat -c %a "$mnt/disk")"
    unmount_image "$mnt"
    mkdir -p "$mnt"
    "$QCOW2FUSE" "${TRANSPORT_ARGS[@]}" -f -o name=vm.img,uid=1234,gid=4321,umask=027 "$img" "$mnt" &
    track_pid $!
    for _ in $(seq 200); do [[ -e $mnt/vm.img ]] && break; sleep 0.02; done
    track_mount "$mnt"
    [[ -e $mnt/vm.img && ! -e $mnt/disk ]] || fail "-o name=vm.img did not rename the disk file"
    [[ $(stat -c '%u %g %a' "$mnt/vm.img") == "1234 4321 640" ]] ||
        fail "uid/gid/umask not applied: $(stat -c '%u %g %a' "$mnt/vm.img")"
    if command -v getfattr >/dev/null; then
        getfattr --absolute-names -n user.qcow2fuse.stats --only-values "$mnt/vm.img" >"$T/stats"
        grep -q 'clusters allocated' "$T/stats" || fail "statistics xattr: $(cat "$T/stats")"
    fi
    fusermount3 -u "$mnt"
}

case_stats_signal() {
    local img=$T/s.qcow2 mnt=$T/mnt pid
    qemu-img create -q -f qcow2 "$img" 64M
    mount_image "$img" "$mnt"
    pid=${_MNT_PID[$(canon_path "$mnt")]}
    dd if=/dev/urandom of="$mnt/disk" bs=64k count=3 conv=notrunc status=none
    kill -USR1 "$pid"
    for _ in $(seq 100); do grep -q statistics "$DAEMON_LOG" && break; sleep 0.02; done
    grep -q 'statistics: read .* written 196608 bytes, 3 clusters allocated' "$DAEMON_LOG" ||
        fail "SIGUSR1 statistics line missing or wrong: $(grep statistics "$DAEMON_LOG")"
    unmount_image "$mnt"
}

case_messages() {
    local mnt=$T/mnt
    mkdir -p "$mnt"
    expect_refusal "$T/missing.qcow2" "$mnt"
    stderr_mentions "No such file"
    head -c 1M /dev/urandom >"$T/random.bin"
    expect_refusal "$T/random.bin" "$mnt"
    stderr_mentions "not a qcow2 image"
    qemu-img create -q -f qcow2 "$T/ok.qcow2" 1M
    if "$QCOW2FUSE" -f "$T/ok.qcow2" "$T/no-such-dir" 2>"$T/mp.err"; then
        fail "mounting on a missing directory succeeded"
    fi
    grep -q "mount point $T/no-such-dir" "$T/mp.err" || fail "missing mount point message: $(cat "$T/mp.err")"
    mount_image "$T/ok.qcow2" "$mnt"
    expect_refusal "$T/ok.qcow2" "$T/mnt2"
    stderr_mentions lock
    unmount_image "$mnt"
}

# A snapshot whose recorded disk size is not a size: both ways of showing
# it (--list-snapshots, -o snapshot=NAME) refuse it with the snapshot, the
# field and its offset named; the other snapshot is still listed and shown,
# and the active state still mounts writable.
case_snapshot_disk_size() {
    local img=$T/snap.qcow2 mnt=$T/mnt mutate entry field off bad
    mutate=$(require_tool mutate)
    qemu-img create -q -f qcow2 "$img" 64M
    qio "$img" "write -P 1 0 1M"
    qemu-img snapshot -c odd "$img"
    qio "$img" "write -P 2 0 1M"
    qemu-img snapshot -c good "$img"
    read -r _ _ entry < <("$mutate" --snapshot "$img" 0)
    [[ -n $entry ]] || fail "test setup: mutate --snapshot printed nothing"
    field=$((entry + 48))            # disk_size: extra data bytes 8..15
    off=$(printf '0x%x' "$field")
    # 64 MiB + 256 bytes (not a multiple of 512); -512 as a signed value.
    for bad in 0000000004000100 fffffffffffffe00; do
        printf "$(sed 's/../\\x&/g' <<<"$bad")" |
            dd of="$img" bs=1 seek="$field" conv=notrunc status=none
        if "$QCOW2FUSE" --list-snapshots "$img" >"$T/list" 2>"$T/list.err"; then
            fail "--list-snapshots exited 0 with disk_size 0x$bad: $(cat "$T/list")"
        fi
        grep -q "disk_size" "$T/list.err" && grep -q '"odd"' "$T/list.err" &&
            grep -q "$off" "$T/list.err" ||
            fail "--list-snapshots message does not name the snapshot, field and offset $off: $(cat "$T/list.err")"
        grep -q ' good ' "$T/list" || fail "--list-snapshots dropped the good snapshot: $(cat "$T/list")"
        grep -q ' odd ' "$T/list" && fail "--list-snapshots showed the bad snapshot: $(cat "$T/list")"
        expect_refusal "$img" "$mnt" snapshot=odd
        stderr_mentions disk_size '"odd"' "$off"
    done
    mount_image "$img" "$mnt" snapshot=good
    qemu-img convert -U -l snapshot.name=good -O raw "$img" "$T/good.raw"
    cmp "$mnt/disk" "$T/good.raw" || fail "the good snapshot's view differs from qemu-img convert -l"
    unmount_image "$mnt"
    mount_image "$img" "$mnt"
    dd if=/dev/urandom of="$mnt/disk" bs=64k count=2 seek=3 conv=notrunc,fsync status=none
    compare_raw "$img" "$mnt"
    unmount_image "$mnt"
}

# ---------------------------------------------------------------------------
# Every option the daemon parses: its error message (naming the option, the
# bad value and what is accepted) and its effect.

# refuse_option OPTS PATTERN...: -o OPTS on a good image is refused with
# exit status 1 and a message matching every PATTERN (extended regex).
refuse_option() {
    local opts=$1
    shift
    [[ -e $T/ok.qcow2 ]] || qemu-img create -q -f qcow2 "$T/ok.qcow2" 1M
    expect_refusal "$T/ok.qcow2" "$T/mnt" "$opts"
    ((REFUSE_RC == 1)) || fail "-o $opts: exit status $REFUSE_RC, expected 1"
    stderr_mentions "$@"
}

case_option_messages() {
    local v sz
    refuse_option cache=bogus 'cache=bogus: expected writeback or writethrough'
    refuse_option discard=trim 'discard=trim: expected unmap or ignore'
    refuse_option detect-zeroes=yes 'detect-zeroes=yes: expected off, on or unmap'
    refuse_option "backing=$T/no-such-dir" "backing=$T/no-such-dir: expected allow, deny or an existing directory"
    refuse_option "backing=$T/ok.qcow2" "backing=$T/ok\.qcow2: expected allow, deny or an existing directory"
    sz='expected a size in bytes with an optional K, M, G or T suffix'
    # 17179869184G is 2^64 bytes: the suffix's shift must not wrap it to 0.
    for v in abc 1.5M 4X 64KiB "" 17179869184G 16777216T; do
        refuse_option "l2-cache-size=$v" "invalid l2-cache-size \"$v\": $sz"
        refuse_option "refcount-cache-size=$v" "invalid refcount-cache-size \"$v\": $sz"
    done
    for v in abc 12x -1 4294967295 ""; do
        refuse_option "uid=$v" "invalid uid \"$v\""
        refuse_option "gid=$v" "invalid gid \"$v\""
    done
    # umask is octal: 8 and 9 are not digits, 1000 is above 0777.
    for v in 8 19 1000 0x1 abc ""; do
        refuse_option "umask=$v" "invalid umask \"$v\""
    done
    for v in "" a/b . ..; do
        refuse_option "name=$v" "name=${v//./\\.}: not a valid file name"
    done
    refuse_option "io-trace=$T/no-such-dir/trace" "io-trace=$T/no-such-dir/trace: No such file or directory"
    refuse_option snapshot= 'no internal snapshot named ""'
    refuse_option nosuchoption "unknown option.*nosuchoption"
    for v in size=1G cluster_size=4k backing_file=base.raw; do
        refuse_option "$v" 'size=, cluster_size= and backing_file= only apply with -o create'
    done
    # -o create: nothing is created when an option is refused.
    expect_refusal "$T/new.qcow2" "$T/mnt" create,cluster_size=4k
    stderr_mentions '-o create needs size=SIZE \(or backing_file=FILE\)'
    expect_refusal "$T/new.qcow2" "$T/mnt" create,size=lots
    stderr_mentions 'invalid size "lots": '"$sz"
    # 2^64 + 1M: wrapped by the suffix's shift it would read as a valid 1M.
    expect_refusal "$T/new.qcow2" "$T/mnt" create,size=17592186044417M
    stderr_mentions 'invalid size "17592186044417M": '"$sz"
    for v in 256 3000 1k5 4M 0; do
        expect_refusal "$T/new.qcow2" "$T/mnt" "create,size=1M,cluster_size=$v"
        ((REFUSE_RC == 1)) || fail "cluster_size=$v: exit status $REFUSE_RC, expected 1"
        if [[ $v == 1k5 ]]; then
            stderr_mentions "invalid cluster_size \"1k5\": $sz"
        else
            stderr_mentions "cluster_size=$v: must be a power of two from 512 to 2M"
        fi
    done
    expect_refusal "$T/new.qcow2" "$T/mnt" create,size=1000
    stderr_mentions 'image size 1000: must be a non-zero multiple of 512 bytes'
    [[ ! -e $T/new.qcow2 ]] || fail "a refused -o create left $T/new.qcow2 behind"
    # An existing image is mounted as it is: create's values are not read.
    qemu-img create -q -f qcow2 "$T/new.qcow2" 1M
    mount_image "$T/new.qcow2" "$T/mnt" create,size=lots,cluster_size=3000
    [[ $(stat -c %s "$T/mnt/disk") == 1048576 ]] || fail "-o create changed the size of an existing image"
    unmount_image "$T/mnt"
}

# The words outside -o: help, version, missing and extra arguments.
case_command_line() {
    local out=$T/out err=$T/err rc pid
    qemu-img create -q -f qcow2 "$T/ok.qcow2" 1M
    mkdir -p "$T/mnt"
    for v in -h --help; do
        "$QCOW2FUSE" "$v" >"$out" 2>"$err" || fail "$v: exit status $?"
        grep -q '^usage: qcow2fuse \[-f\] \[-o OPTIONS\] IMAGE MOUNTPOINT' "$out" || fail "$v: no usage on stdout"
    done
    for v in -V --version; do
        "$QCOW2FUSE" "$v" >"$out" 2>"$err" || fail "$v: exit status $?"
        grep -Eq '^qcow2fuse [0-9.]+ \(libfuse [0-9.]+\)$' "$out" || fail "$v printed: $(cat "$out")"
    done
    for args in "" "$T/ok.qcow2" "--list-snapshots" "-f $T/ok.qcow2 $T/mnt extra"; do
        rc=0
        # shellcheck disable=SC2086  # word splitting wanted
        "$QCOW2FUSE" $args >"$out" 2>"$err" || rc=$?
        ((rc == 1)) || fail "qcow2fuse $args: exit status $rc, expected 1"
        [[ ! -s $out ]] || fail "qcow2fuse $args wrote to stdout: $(cat "$out")"
        if [[ $args == *extra ]]; then
            grep -q 'unexpected argument "extra"' "$err" || fail "extra argument: $(cat "$err")"
        else
            grep -q '^usage: qcow2fuse' "$err" || fail "qcow2fuse $args: no usage on stderr"
        fi
    done
    rc=0
    "$QCOW2FUSE" -f "$T/ok.qcow2" "$T/ok.qcow2" 2>"$err" || rc=$?
    ((rc == 1)) || fail "a file as mount point: exit status $rc"
    grep -q "mount point $T/ok.qcow2: not a directory" "$err" || fail "file as mount point: $(cat "$err")"
    # -s (one thread) and -d (FUSE debug output) serve requests as well.
    mkdir -p "$T/mnt"
    "$QCOW2FUSE" "${TRANSPORT_ARGS[@]}" -s -f "$T/ok.qcow2" "$T/mnt" 2>"$err" &
    pid=$!
    track_pid $pid
    for _ in $(seq 200); do [[ -e $T/mnt/disk ]] && break; sleep 0.02; done
    track_mount "$T/mnt"
    dd if=/dev/urandom of="$T/mnt/disk" bs=64k count=2 conv=notrunc,fsync status=none
    compare_raw "$T/ok.qcow2" "$T/mnt"
    fusermount3 -u "$T/mnt"
    # The next mount takes the image's lock: this daemon must have let go.
    wait "$pid" || fail "-s -f: exit status $? after fusermount3 -u"
    "$QCOW2FUSE" "${TRANSPORT_ARGS[@]}" -d "$T/ok.qcow2" "$T/mnt" >"$out" 2>"$err" &
    track_pid $!
    for _ in $(seq 200); do [[ -e $T/mnt/disk ]] && break; sleep 0.02; done
    compare_raw "$T/ok.qcow2" "$T/mnt"
    fusermount3 -u "$T/mnt"
    grep -q 'INIT' "$err" || fail "-d printed no FUSE debug output"
}

# map_of IMG: qemu-img map of IMG, one line per extent.
map_of() {
    qemu-img map -U --output=json "$1"
}

# Each value of each enum option, seen in the image qemu-img reads back.
case_enum_values() {
    local img=$T/e.qcow2 mnt=$T/mnt v n
    # discard: a punched cluster is given back (unmap, on) or kept allocated
    # as a zero cluster (ignore, off).
    for v in unmap on ignore off; do
        qemu-img create -q -f qcow2 "$img" 64M
        mount_image "$img" "$mnt" "discard=$v"
        dd if=/dev/urandom of="$mnt/disk" bs=64k count=2 conv=notrunc status=none
        fallocate -p -o 0 -l 64k "$mnt/disk"
        unmount_image "$mnt"
        check_clean "$img" "discard=$v"
        case $v in
        unmap | on) map_of "$img" | grep -q '"start": 0, "length": [0-9]*, .*"present": false, "zero": true, "data": false}' ;;
        *) map_of "$img" | grep -q '"start": 0, "length": 65536, .*"present": true, "zero": true, "data": false, "offset"' ;;
        esac || fail "discard=$v: first cluster after the punch: $(map_of "$img" | head -n1)"
    done
    # detect-zeroes: zeros written over data stay data (off), become a zero
    # cluster that keeps its space (on) or that gives it back (unmap).
    for v in off on unmap; do
        qemu-img create -q -f qcow2 "$img" 64M
        qio "$img" "write -P 1 0 64k"
        mount_image "$img" "$mnt" "detect-zeroes=$v"
        dd if=/dev/zero of="$mnt/disk" bs=64k count=1 conv=notrunc status=none
        unmount_image "$mnt"
        check_clean "$img" "detect-zeroes=$v"
        case $v in
        off) map_of "$img" | grep -q '"start": 0, "length": 65536, .*"zero": false, "data": true' ;;
        on) map_of "$img" | grep -q '"start": 0, "length": 65536, .*"present": true, "zero": true, "data": false, "offset"' ;;
        unmap) map_of "$img" | grep -q '"start": 0, "length": [0-9]*, .*"present": false, "zero": true, "data": false}' ;;
        esac || fail "detect-zeroes=$v: first cluster after writing zeros: $(map_of "$img" | head -n1)"
    done
    # cache: writethrough puts an L2 change on disk before the write
    # returns; writeback keeps it in memory until fsync.
    for v in writeback writethrough; do
        qemu-img create -q -f qcow2 "$img" 64M
        mount_image "$img" "$mnt" "cache=$v"
        dd if=/dev/urandom of="$mnt/disk" bs=64k count=1 seek=3 conv=notrunc,fsync status=none
        dd if=/dev/urandom of="$mnt/disk" bs=64k count=1 seek=5 conv=notrunc status=none
        n=$(map_of "$img" | grep -c '"data": true') || true
        unmount_image "$mnt"
        [[ $n == "$([[ $v == writethrough ]] && echo 2 || echo 1)" ]] ||
            fail "cache=$v: $n data extents on disk before fsync"
        check_clean "$img" "cache=$v"
    done
}

# Sizes: K, M, G, T suffixes (either case, optional B) in size=,
# cluster_size= and the cache sizes.
case_sizes() {
    local mnt=$T/mnt spec size cs img n bytes
    for spec in 65536K:512:67108864:512 1g:2M:1073741824:2097152 \
                67108864B:4kb:67108864:4096 1T:2MB:1099511627776:2097152; do
        IFS=: read -r size cs n bytes <<<"$spec"
        img=$T/c-$size.qcow2
        mount_image "$img" "$mnt" "create,size=$size,cluster_size=$cs"
        unmount_image "$mnt"
        [[ $(virtual_size "$img") == "$n" ]] || fail "size=$size: virtual size $(virtual_size "$img")"
        qemu-img info "$img" | grep -q "cluster_size: $bytes\$" || fail "cluster_size=$cs not $bytes"
        check_clean "$img" "create,size=$size,cluster_size=$cs"
    done
    requires getfattr
    # 20 L2 tables of 4 KiB (4k clusters, 2M apart) in use: a 64k cache
    # (16 tables) evicts, 1M does not.
    img=$T/l2.qcow2
    qemu-img create -q -f qcow2 -o cluster_size=4k "$img" 64M
    local cmds=()
    for ((n = 0; n < 20; n++)); do cmds+=("write -P $((n + 1)) $((n * 2))M 4k"); done
    qio "$img" "${cmds[@]}"
    for spec in 64k:yes 65536:yes 1M:no 1048576b:no; do
        mount_image "$img" "$mnt" "l2-cache-size=${spec%:*},refcount-cache-size=8K"
        for ((n = 0; n < 20; n++)); do
            dd if="$mnt/disk" of=/dev/null bs=4k count=1 skip=$((n * 512)) status=none
        done
        getfattr --absolute-names -n user.qcow2fuse.stats --only-values "$mnt/disk" >"$T/stats"
        dd if=/dev/urandom of="$mnt/disk" bs=64k count=1 seek=7 conv=notrunc,fsync status=none
        compare_raw "$img" "$mnt"
        unmount_image "$mnt"
        if [[ ${spec#*:} == yes ]]; then
            grep -q ' 0 evictions' "$T/stats" && fail "l2-cache-size=${spec%:*}: no eviction: $(cat "$T/stats")"
        else
            grep -q 'L2 cache [0-9]* hits 20 misses 0 evictions' "$T/stats" ||
                fail "l2-cache-size=${spec%:*}: $(cat "$T/stats")"
        fi
        check_clean "$img" "l2-cache-size=${spec%:*}"
    done
}

# backing_fmt= is recorded in the created overlay, and checked against the
# backing file.
case_backing_fmt() {
    local mnt=$T/mnt
    qemu-img create -q -f raw "$T/base.raw" 4M
    qio "$T/base.raw" "write -P 0x5a 0 4M"
    mount_image "$T/top.qcow2" "$mnt" create,backing_file=base.raw,backing_fmt=raw
    cmp "$mnt/disk" "$T/base.raw" || fail "overlay with backing_fmt=raw does not read its backing file"
    unmount_image "$mnt"
    qemu-img info "$T/top.qcow2" | grep -q '^backing file format: raw$' || fail "backing_fmt=raw not recorded"
    check_clean "$T/top.qcow2" "create,backing_fmt=raw"
    expect_refusal "$T/vmdk.qcow2" "$mnt" create,backing_file=base.raw,backing_fmt=vmdk
    stderr_mentions 'has format "vmdk"; only raw and qcow2 backing files are supported'
    expect_refusal "$T/q.qcow2" "$mnt" create,backing_file=base.raw,backing_fmt=qcow2
    stderr_mentions 'base\.raw: not a qcow2 image'
    [[ ! -e $T/vmdk.qcow2 && ! -e $T/q.qcow2 ]] || fail "a refused -o create left an image behind"
}

# uid=, gid= (decimal) and umask= (octal) as stat shows them.
case_owner_and_mode() {
    local img=$T/o.qcow2 mnt=$T/mnt spec opts want
    qemu-img create -q -f qcow2 "$img" 1M
    chmod 0604 "$img"
    for spec in "uid=0,gid=0,umask=077:0 0 600" "uid=4294967294,umask=22:4294967294 0 644" \
                "gid=10,umask=0:0 10 666" "umask=7:0 0 660" "uid=017:17 0 604"; do
        opts=${spec%%:*} want=${spec#*:}
        mount_image "$img" "$mnt" "$opts"
        [[ $(stat -c '%u %g %a' "$mnt/disk") == "$want" ]] ||
            fail "-o $opts: disk is $(stat -c '%u %g %a' "$mnt/disk"), expected $want"
        unmount_image "$mnt"
    done
}

# host_flushes MNT: the daemon's count of host flushes, from its stats xattr.
host_flushes() {
    getfattr --absolute-names -n user.qcow2fuse.stats --only-values "$1/disk" |
        sed -n 's/.* \([0-9]*\) flushes,.*/\1/p'
}

# Writes that promise durability get it: a file opened O_DSYNC or O_SYNC,
# or a pwritev2 with RWF_DSYNC, costs a host flush before each write
# returns (the disk file is FOPEN_DIRECT_IO, so the kernel sends no FSYNC
# of its own), and plain writes cost none.  Overwrites of a filled image,
# so that no allocation or refcount reservation flushes on its own.
case_sync_writes() {
    local img=$T/sync.qcow2 mnt=$T/mnt before after mode
    requires getfattr python3
    qemu-img create -q -f qcow2 "$img" 4M
    qio "$img" "write -P 0x11 0 4M"
    mount_image "$img" "$mnt"
    for mode in none direct dsync direct,dsync sync direct,sync; do
        before=$(host_flushes "$mnt")
        [[ -n $before ]] || fail "no flush count in the stats xattr"
        if [[ $mode == none ]]; then
            dd if=/dev/urandom of="$mnt/disk" bs=4k count=8 seek=16 conv=notrunc status=none
        else
            dd if=/dev/urandom of="$mnt/disk" bs=4k count=8 seek=16 conv=notrunc \
               oflag="$mode" status=none
        fi
        after=$(host_flushes "$mnt")
        case $mode in
        none|direct)
            ((after == before)) || fail "oflag=$mode: $((after - before)) host flushes for 8 plain writes" ;;
        *)
            ((after - before >= 8)) ||
                fail "oflag=$mode: $((after - before)) host flushes for 8 writes, expected one each" ;;
        esac
    done
    before=$(host_flushes "$mnt")
    python3 - "$mnt/disk" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
for i in range(4):
    os.pwritev(fd, [bytes([0x40 + i]) * 4096], (64 + i) * 4096, os.RWF_DSYNC)
os.pwritev(fd, [b'\x55' * 4096], 72 * 4096)
os.close(fd)
PY
    after=$(host_flushes "$mnt")
    ((after - before == 4)) || fail "RWF_DSYNC: $((after - before)) host flushes for 4 such writes and 1 plain one"
    compare_raw "$img" "$mnt"
    unmount_image "$mnt"
    check_clean "$img" "sync writes"
}

run_case create case_create
run_case snapshot case_snapshot
run_case snapshot_disk_size case_snapshot_disk_size
run_case mount_helper case_mount_helper
run_case install case_install
run_case uninstall case_uninstall
run_case deps case_deps
run_case man_pages case_man_pages
run_case naming_and_ownership case_naming_and_ownership
run_case stats_signal case_stats_signal
run_case messages case_messages
run_case option_messages case_option_messages
run_case command_line case_command_line
run_case enum_values case_enum_values
run_case sizes case_sizes
run_case owner_and_mode case_owner_and_mode
run_case sync_writes case_sync_writes
run_case backing_fmt case_backing_fmt
finish_cases
