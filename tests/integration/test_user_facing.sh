#!/usr/bin/env bash
# What a new user meets: image creation, snapshot views, the mount helper
# and fstab forms, make install, file naming and ownership, statistics,
# manual pages, and the messages of refusals.
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
    "$QCOW2FUSE" -f -o name=vm.img,uid=1234,gid=4321,umask=027 "$img" "$mnt" &
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

run_case create case_create
run_case snapshot case_snapshot
run_case snapshot_disk_size case_snapshot_disk_size
run_case mount_helper case_mount_helper
run_case install case_install
run_case man_pages case_man_pages
run_case naming_and_ownership case_naming_and_ownership
run_case stats_signal case_stats_signal
run_case messages case_messages
finish_cases
