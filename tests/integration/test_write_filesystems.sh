#!/usr/bin/env bash
#
# Real file systems on a writable mount, one case each: ext4 on a 256 MiB
# qcow2, XFS on a 512 MiB one (mkfs.xfs refuses less than 300 MiB, and
# discards the whole device first: that goes through the loop device to
# the daemon as one large punch-hole) and btrfs on a 512 MiB one
# (copy-on-write, checksums of data and metadata, which its checker reads
# back: --check-data-csum).  For each, the image is mounted, its
# disk attached to a loop device, formatted and mounted; a generated tree
# (~45 MiB, a few thousand files: small and odd-sized files, large random
# and text files, empty files, symlinks, a hard link, a sparse file) is
# copied twice, one copy partly deleted and rewritten; then everything is
# unmounted and detached and the daemon unmounted.  Then: "qemu-img check"
# clean; "qemu-img convert -O raw" gives a file system that the file
# system's own checker (e2fsck -fn, xfs_repair -n, btrfs check) finds
# clean, and that, loop-mounted read-only, holds exactly the expected
# trees (diff -r, and names/modes/sizes/link targets).  And FAT32 the way
# image builders make an EFI system partition without root: mkfs.vfat and
# mtools on the disk file itself, checked with fsck.fat and mtools (see
# case_vfat).
# shellcheck disable=SC2317  # case functions are called indirectly (run_case)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img losetup mount umount diff split find cp
requires_fuse
[[ $(id -u) == 0 ]] || skip "needs root (losetup, mount)"

M=$((1024 * 1024))

# loop_attach FILE [OPTS...]: attach FILE to a free loop device, print it.
# Sets LOOP_DEV (the caller must not use $(...), so that track_loop
# registers the device in this shell).
loop_attach() {
    local f=$1 dev err
    shift
    err="$T/losetup.$(_seq).err"
    if ! dev=$(losetup -f --show "$@" "$f" 2>"$err"); then
        LOOP_DEV=""
        LOOP_ERR=$(cat "$err")
        return 1
    fi
    track_loop "$dev"
    LOOP_DEV=$dev
}

# make_tree DIR: the generated source tree.
make_tree() {
    local d=$1 i
    mkdir -p "$d"/{a,b,c,e}
    head -c $((16 * M)) /dev/urandom | split -b 8192 -a 4 - "$d/a/f"
    head -c $((12 * M)) /dev/urandom | split -b 99991 -a 3 - "$d/b/odd_"
    seq 1 1000000 >"$d/c/text"
    head -c $((5 * M)) /dev/urandom >"$d/c/big1"
    head -c $((4 * M + 123)) /dev/urandom >"$d/c/big2"
    for i in 0 1 2 3 4; do
        mkdir -p "$d/d$i/level2/level3"
        head -c 65536 /dev/urandom | split -b 200 -a 3 - "$d/d$i/level2/level3/s"
        printf 'dir %s\n' "$i" >"$d/d$i/README"
    done
    for i in $(seq 1 40); do : >"$d/e/empty$i"; done
    ln -s ../c/text "$d/e/link"
    ln -s does-not-exist "$d/e/dangling"
    ln "$d/c/big1" "$d/e/hardlink"
    truncate -s $((20 * M)) "$d/e/sparse"
    printf 'middle' | dd of="$d/e/sparse" bs=1 seek=$((7 * M + 3)) conv=notrunc status=none
    printf 'end' | dd of="$d/e/sparse" bs=1 seek=$((20 * M - 3)) conv=notrunc status=none
    chmod 0600 "$d/c/big2"
    chmod 0755 "$d/d0"
    printf 'x' >"$d/long_name_$(printf 'n%.0s' $(seq 1 200))"
}

# listing DIR: names, types, modes, link counts, sizes (not of directories)
# and link targets, sorted.
listing() {
    (cd "$1" && {
        find . -type d -printf '%p %y %m\n'
        find . ! -type d -printf '%p %y %m %n %s %l\n'
    } | sort)
}

# same_tree A B WHAT [contents]: with "contents", names and bytes only (a
# file system without owners, modes and links).
same_tree() {
    local a=$1 b=$2 what=$3
    if ! diff -r --no-dereference "$a" "$b" >"$T/diff.out" 2>&1; then
        head -n 20 "$T/diff.out" >&2
        fail "$what: diff -r found differences"
    fi
    [[ ${4:-} != contents ]] || return 0
    if ! diff <(listing "$a") <(listing "$b") >"$T/diff.out" 2>&1; then
        head -n 20 "$T/diff.out" >&2
        fail "$what: names/types/modes/link counts/sizes/link targets differ"
    fi
}

# expected_tree1 TREE NEW OUT: what tree1 holds after the deletes and
# rewrites of the cases (a/ and c/big2 gone, b/ again as b2/, NEW as c/new).
expected_tree1() {
    cp -a "$1" "$3"
    rm -rf "$3/a" "$3/c/big2"
    cp -a "$1/b" "$3/b2"
    cp "$2" "$3/c/new"
}

# The file systems: mkfs, mount type, the read-only mount options for an
# image whose log must not be replayed, the checker of an image file, and
# the disk size.
fs_mkfs() {
    case $1 in
    ext4) mkfs.ext4 -q -F "$2" ;;
    xfs) mkfs.xfs -q -f "$2" ;;
    btrfs) mkfs.btrfs -q -f "$2" ;;
    esac
}
fs_ro_opts() {
    case $1 in
    ext4) echo ro,noload ;;
    xfs) echo ro,norecovery ;;
    btrfs) echo ro,rescue=nologreplay ;;
    esac
}
fs_check() {
    case $1 in
    ext4) e2fsck -fn "$2" ;;
    xfs) xfs_repair -n -f "$2" ;;
    btrfs) btrfs check --readonly --check-data-csum "$2" ;;
    esac
}
fs_disk_size() {
    case $1 in
    ext4) echo $((256 * M)) ;;
    xfs) echo $((512 * M)) ;;
    btrfs) echo $((512 * M)) ;;
    esac
}

src="$TEST_TMP/src"
make_tree "$src"
info "source tree: $(find "$src" | wc -l) entries, $(du -sm "$src" | cut -f1) MiB"

# case_fs FS MKFS CHECKER: the whole run on file system FS.
case_fs() {
    local fs=$1 img="$T/fs.qcow2" mnt="$T/mnt" ext="$T/ext" dev rodev out raw t0 exp1
    requires "$2" "$3"
    mkdir -p "$ext" "$T/ro"

    qemu-img create -q -f qcow2 "$img" "$(fs_disk_size "$fs")" || fail "qemu-img create failed"
    mount_image "$img" "$mnt"

    if ! loop_attach "$mnt/disk"; then
        info "losetup on the FUSE file failed ($LOOP_ERR); trying --direct-io=off"
        if ! loop_attach "$mnt/disk" --direct-io=off; then
            if [[ ! -e /dev/loop-control ]] || grep -qiE 'no such device|could not find any free|permission' <<<"$LOOP_ERR"; then
                skip "loop devices are not available: $LOOP_ERR"
            fi
            fail "losetup $mnt/disk failed: $LOOP_ERR"
        fi
    fi
    dev=$LOOP_DEV
    info "loop device $dev -> $mnt/disk"

    fs_mkfs "$fs" "$dev" || fail "$2 on $dev failed"
    mount -t "$fs" "$dev" "$ext" || fail "mount -t $fs $dev failed"
    track_kmount "$ext"

    t0=$(date +%s%N)
    cp -a "$src" "$ext/tree1" || fail "cp -a to $fs (tree1) failed"
    cp -a "$src" "$ext/tree2" || fail "cp -a to $fs (tree2) failed"
    sync
    # free blocks in the middle of the file system and reuse them
    rm -rf "$ext/tree1/a" "$ext/tree1/c/big2"
    sync
    cp -a "$src/b" "$ext/tree1/b2" || fail "cp -a to $fs (b2) failed"
    head -c $((3 * M)) /dev/urandom >"$T/new"
    cp "$T/new" "$ext/tree1/c/new" || fail "cp to $fs failed"
    sync
    info "copied ~$(du -sm "$ext" | cut -f1) MiB in $((($(date +%s%N) - t0) / 1000000)) ms"

    exp1="$T/exp1"
    expected_tree1 "$src" "$T/new" "$exp1"

    same_tree "$src" "$ext/tree2" "live $fs, tree2"
    same_tree "$exp1" "$ext/tree1" "live $fs, tree1"

    umount "$ext" || fail "umount $ext failed"
    loop_detach "$dev"
    unmount_image "$mnt"

    check_clean "$img" "$fs"

    raw=$(ref_raw "$img" "$T/fs.raw")
    if ! out=$(fs_check "$fs" "$raw" 2>&1); then
        echo "$out" | head -n 40 >&2
        fail "$3 on the converted raw image is not clean"
    fi
    info "$3 clean: $(tail -n1 <<<"$out")"

    loop_attach "$raw" -r || fail "losetup -r $raw failed: $LOOP_ERR"
    rodev=$LOOP_DEV
    mount -t "$fs" -o "$(fs_ro_opts "$fs")" "$rodev" "$T/ro" || fail "mount -o ro $rodev failed"
    track_kmount "$T/ro"
    same_tree "$src" "$T/ro/tree2" "converted image, tree2"
    same_tree "$exp1" "$T/ro/tree1" "converted image, tree1 (after deletes and rewrites)"
    info "converted image: both trees as expected"
    umount "$T/ro" || fail "umount $T/ro failed"
    loop_detach "$rodev"
}

# case_vfat: FAT32 made and filled from user space, as image builders make
# an EFI system partition without root or a kernel FAT driver: mkfs.vfat
# and mtools on the disk file itself (no loop device); then fsck.fat on the
# converted image, and the trees copied back out of it with mtools.
case_vfat() {
    requires mkfs.vfat fsck.fat mcopy mdel mdeltree
    local img="$T/fs.qcow2" mnt="$T/mnt" tree="$T/src" out raw exp1="$T/exp1" disk
    export MTOOLS_SKIP_CHECK=1
    # The tree without what FAT cannot hold: symlinks and a hard link.
    cp -a "$src" "$tree"
    rm "$tree/e/link" "$tree/e/dangling" "$tree/e/hardlink"

    qemu-img create -q -f qcow2 "$img" $((256 * M)) || fail "qemu-img create failed"
    mount_image "$img" "$mnt"
    disk="$mnt/disk"
    mkfs.vfat -F 32 "$disk" >/dev/null || fail "mkfs.vfat on $disk failed"
    mcopy -s -Q -i "$disk" "$tree" ::/tree1 || fail "mcopy (tree1) failed"
    mcopy -s -Q -i "$disk" "$tree" ::/tree2 || fail "mcopy (tree2) failed"
    mdeltree -i "$disk" ::/tree1/a || fail "mdeltree failed"
    mdel -i "$disk" ::/tree1/c/big2 || fail "mdel failed"
    mcopy -s -Q -i "$disk" "$tree/b" ::/tree1/b2 || fail "mcopy (b2) failed"
    head -c $((3 * M)) /dev/urandom >"$T/new"
    mcopy -Q -i "$disk" "$T/new" ::/tree1/c/new || fail "mcopy (new) failed"
    unmount_image "$mnt"

    expected_tree1 "$tree" "$T/new" "$exp1"

    check_clean "$img" vfat
    raw=$(ref_raw "$img" "$T/fs.raw")
    if ! out=$(fsck.fat -n "$raw" 2>&1); then
        echo "$out" | head -n 40 >&2
        fail "fsck.fat on the converted raw image is not clean"
    fi
    info "fsck.fat clean: $(tail -n1 <<<"$out")"
    mkdir -p "$T/out"
    mcopy -s -Q -i "$raw" ::/tree1 ::/tree2 "$T/out/" || fail "mcopy out of the converted image failed"
    same_tree "$tree" "$T/out/tree2" "converted image, tree2" contents
    same_tree "$exp1" "$T/out/tree1" "converted image, tree1 (after deletes and rewrites)" contents
    info "converted image: both trees as expected"
}

run_case ext4 case_fs ext4 mkfs.ext4 e2fsck
run_case xfs case_fs xfs mkfs.xfs xfs_repair
run_case btrfs case_fs btrfs mkfs.btrfs btrfs
run_case vfat case_vfat
finish_cases
