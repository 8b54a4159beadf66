#!/usr/bin/env bash
# make demo: the main job on a built-in default, printing each step.
# Creates an image with qcow2fuse itself, mounts it, writes through /disk
# (and, where loop devices are available, builds an ext4 file system in it and
# copies a tree in), unmounts, and checks the result with qemu-img and
# qcow2check.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
bin=${QCOW2FUSE:-$top/build/qcow2fuse}
check=${QCOW2CHECK:-$top/build/qcow2check}
work=$(mktemp -d "${TMPDIR:-/tmp}/qcow2fuse-demo.XXXXXX")
mnt=$work/mnt
loopdev=""
fsmnt=$work/fs

step() { printf '\n==> %s\n' "$*"; }
cleanup() {
    set +e
    mountpoint -q "$fsmnt" 2>/dev/null && umount "$fsmnt"
    [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null
    mountpoint -q "$mnt" 2>/dev/null && fusermount3 -u "$mnt"
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$mnt" "$fsmnt"

step "create a 1 GiB qcow2 image and mount it: $bin -o create,size=1G $work/demo.qcow2 $mnt"
"$bin" -o create,size=1G "$work/demo.qcow2" "$mnt"
ls -l "$mnt"

step "write 8 MiB of random data through $mnt/disk at offset 100 MiB, then fsync"
head -c 8M /dev/urandom > "$work/data"
dd if="$work/data" of="$mnt/disk" bs=1M seek=100 conv=notrunc,fsync status=none
cmp -n 8388608 -i 0:104857600 "$work/data" "$mnt/disk" && echo "read back: identical"

copied_tree=""
if [ "$(id -u)" -eq 0 ] && command -v losetup >/dev/null && command -v mkfs.ext4 >/dev/null &&
   loopdev=$(losetup -f --show -o $((256 * 1024 * 1024)) \
                     --sizelimit $((512 * 1024 * 1024)) "$mnt/disk" 2>/dev/null); then
    step "loop device $loopdev on 512 MiB of the disk: mkfs.ext4, mount, copy $top/src in"
    mkfs.ext4 -q "$loopdev"
    mount "$loopdev" "$fsmnt"
    cp -a "$top/src" "$fsmnt/"
    sync
    diff -r "$top/src" "$fsmnt/src" && echo "copied tree: identical"
    umount "$fsmnt"
    losetup -d "$loopdev"
    loopdev=""
    copied_tree=yes
else
    step "no loop devices here (needs root): skipping the file-system part"
fi

step "statistics of the mount"
if command -v getfattr >/dev/null; then
    getfattr --absolute-names -n user.qcow2fuse.stats --only-values "$mnt/disk"; echo
else
    echo "(install the attr package to read the user.qcow2fuse.stats xattr)"
fi

step "unmount: fusermount3 -u $mnt (all metadata is written back)"
fusermount3 -u "$mnt"
for _ in $(seq 50); do
    fuser "$work/demo.qcow2" >/dev/null 2>&1 || break
    sleep 0.1
done

step "qemu-img check"
qemu-img check "$work/demo.qcow2"
step "qcow2check"
"$check" "$work/demo.qcow2"
step "qemu-img info"
qemu-img info "$work/demo.qcow2"

step "the data as QEMU sees it"
qemu-img convert -O raw "$work/demo.qcow2" "$work/disk.raw"
cmp -n 8388608 -i 0:104857600 "$work/data" "$work/disk.raw" && echo "qemu-img convert: identical"
if [ -n "$copied_tree" ] && command -v e2fsck >/dev/null; then
    dd if="$work/disk.raw" of="$work/fs.raw" bs=1M skip=256 count=512 status=none
    e2fsck -fn "$work/fs.raw" >/dev/null && echo "e2fsck -fn: clean"
fi
step "demo finished"
