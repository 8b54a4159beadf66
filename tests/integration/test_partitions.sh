#!/usr/bin/env bash
#
# -o partitions: files disk-p1, disk-p2, ... beside the disk, one per
# partition, followed live as the table is written through MNT/disk.
#
# MBR: sfdisk writes two primaries and an extended partition with two
# logical ones through MNT/disk of a mounted image; disk-p1 p2 p5 p6 appear
# without a remount.  mkfs.ext4 on disk-p1 (loop-mounted, a tree copied in)
# and on disk-p5 (a file written with debugfs, no mount); dd into p2 and
# p6; fsync through disk-p6 makes its data reach the image (qemu-img sees
# it while mounted); a hole punched through disk-p6 reads as zeros;
# SEEK_DATA/SEEK_HOLE on disk-p6 equal the disk's map cut to the window; a
# write across disk-p2's end is short and ENOSPC and leaves the EBR behind
# it alone.  After unmount: qemu-img check clean; every partition file, on
# a read-only remount, equals byte for byte the same partition of a
# `qemu-img convert -O raw` copy attached with `losetup -P -r`, and the
# file systems hold what was written.  Then bad tables written through the
# disk: an EBR chain that loops, a primary overlapping another, one past
# the end: each a log line naming it, the sound partitions kept with their
# inodes; growing the disk makes the one past the end appear.
#
# GPT: sgdisk makes three partitions through MNT/disk; partition 3 is
# moved while disk-p3 is open: the open handle gets ESTALE, p1 and p2 keep
# their inodes, disk-p3 is a new file; a write across p1's end leaves p2
# alone; compared with losetup -P as above.  Then the primary header's CRC
# is broken through the disk: the log says so and that the backup is used,
# the files stay; the backup broken too: the files go, the disk stays; the
# primary repaired: they come back, equal to before.  Growing the disk
# (its backup header now short of the end) keeps the files.  qemu-img
# check clean.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=functions.sh
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires qemu-img losetup partx sfdisk sgdisk mkfs.ext4 debugfs mount umount cmp od
requires_fuse
[[ $(id -u) == 0 ]] || skip "needs root (losetup, mount)"
SEEKMAP=$(require_tool seekmap)
FSYNC=$(require_tool fsyncfile)

M=$((1024 * 1024))

# attach_parts RAW: attach RAW read-only with partition scanning; sets
# LOOP_DEV.  A kernel built without the partition parsers attaches the
# device but shows no partitions: partx -a (util-linux's own parser) adds
# them then.
attach_parts() {
    local n p
    LOOP_DEV=$(losetup -f --show -P -r "$1") || fail "losetup -P -r $1 failed"
    track_loop "$LOOP_DEV"
    n=${LOOP_DEV#/dev/}
    if ! compgen -G "/sys/block/$n/${n}p*" >/dev/null; then
        info "the kernel did not scan $LOOP_DEV's partitions; adding them with partx -a"
        partx -a "$LOOP_DEV" || fail "partx -a $LOOP_DEV failed"
    fi
    for p in /sys/block/"$n"/"$n"p*; do
        [[ -b /dev/${p##*/} ]] || mknod "/dev/${p##*/}" b "$(cut -d: -f1 "$p/dev")" \
            "$(cut -d: -f2 "$p/dev")"
    done
}

# compare_parts MNT DEV "N..." EXTENDED: MNT holds exactly disk-pN for the
# numbers given, each the size of DEV's partition N and byte-identical to
# it; DEV's only other partition is EXTENDED's 1 KiB stub (or none: -).
compare_parts() {
    local mnt=$1 dev=$2 numbers=$3 extended=${4/-/} n=${2#/dev/} k p want got linux
    for k in $numbers; do
        [[ -e /sys/block/$n/${n}p$k ]] || fail "Linux shows no partition $k on $dev"
        [[ -f $mnt/disk-p$k ]] || fail "$mnt/disk-p$k is missing: $(ls "$mnt" | tr '\n' ' ')"
        want=$(($(cat "/sys/block/$n/${n}p$k/size") * 512))
        got=$(stat -c %s "$mnt/disk-p$k")
        [[ $got == "$want" ]] || fail "disk-p$k has size $got, ${n}p$k $want"
        same_bytes "$mnt/disk-p$k" "/dev/${n}p$k" "disk-p$k vs ${n}p$k (losetup -P of qemu-img convert)"
    done
    want=$(for k in $numbers; do echo "disk-p$k"; done | sort)
    got=$(for p in "$mnt"/disk-p*; do [[ -e $p ]] && echo "${p##*/}"; done | sort)
    [[ $got == "$want" ]] || fail "partition files: ${got//$'\n'/ }, expected ${want//$'\n'/ }"
    linux=$(for p in /sys/block/"$n"/"$n"p*; do echo "${p##*p}"; done | sort -n | tr '\n' ' ')
    want=$(for k in $numbers $extended; do echo "$k"; done | sort -n | tr '\n' ' ')
    [[ $linux == "$want" ]] || fail "Linux shows partitions $linux, expected $want"
    info "partition files $numbers equal to ${n}p${numbers// /,}, the only partitions Linux shows${extended:+ besides the 1 KiB stub of extended partition $extended}"
}

# logged TEXT: the daemon's log has the line (it is written before the
# write that caused it returns).
logged() {
    grep -qF -- "$1" "$DAEMON_LOG" || {
        sed 's/^/    | /' "$DAEMON_LOG" >&2
        fail "the daemon's log lacks \"$1\""
    }
    info "logged: ...$1..."
}

ino() { stat -c %i "$1"; }

# put_bytes FILE OFFSET HEX: write the bytes HEX ("05 00 ...") at OFFSET.
put_bytes() {
    local f=$1 off=$2 hex=$3 esc="" b
    for b in $hex; do esc+="\\x$b"; done
    # shellcheck disable=SC2059  # the escapes are the point
    printf "$esc" | dd of="$f" bs=1 seek="$off" conv=notrunc status=none \
        || fail "writing bytes at $off of $f failed"
}

# le32 FILE OFFSET: the little-endian 32-bit value there.
le32() {
    od -A n -t u4 -j "$2" -N 4 --endian=little "$1" | tr -d ' '
}

# cross_end FILE NEXT_FILE NEXT_OFF: a 64 KiB write that starts 32 KiB
# before FILE's end writes 32 KiB and then fails with ENOSPC; a write at
# the end writes nothing; NEXT_FILE's 1 MiB at NEXT_OFF does not change.
cross_end() {
    local f=$1 next=$2 next_off=$3 size out before
    size=$(stat -c %s "$f")
    before=$(dd if="$next" bs=64k iflag=skip_bytes,count_bytes skip="$next_off" count=$M status=none | md5sum)
    head -c 65536 /dev/urandom >"$T/block"
    if out=$(dd if="$T/block" of="$f" bs=64k seek=$((size - 32768)) oflag=seek_bytes conv=notrunc 2>&1); then
        fail "a write across the end of $f succeeded: $out"
    fi
    grep -q "No space left on device" <<<"$out" || fail "a write across the end of $f: $out"
    grep -q "^32768 bytes" <<<"$out" || fail "a write across the end of $f did not write the 32768 bytes inside: $out"
    if out=$(dd if="$T/block" of="$f" bs=512 count=1 seek=$((size / 512)) conv=notrunc 2>&1); then
        fail "a write at the end of $f succeeded: $out"
    fi
    grep -q "No space left on device" <<<"$out" || fail "a write at the end of $f: $out"
    cmp -s -n 32768 "$T/block" <(tail -c 32768 "$f") || fail "the end of $f does not hold the 32 KiB written"
    [[ $(dd if="$next" bs=64k iflag=skip_bytes,count_bytes skip="$next_off" count=$M status=none | md5sum) == "$before" ]] \
        || fail "a write across the end of $f changed what follows it"
    info "$(basename "$f"): a write across its end is short + ENOSPC and leaves what follows alone"
}

# clipped_map MAP START LEN: the extents of MAP (seekmap output) inside
# [START, START+LEN), relative to START.
clipped_map() {
    awk -v s="$2" -v l="$3" '{ a = $1; b = $1 + $2; if (a < s) a = s; if (b > s + l) b = s + l;
        if (a < b) print a - s, b - a }' "$1"
}

# ---------------------------------------------------------------------------
# MBR

mnt="$T/mnt"
img="$T/mbr.qcow2"
mkdir -p "$T/src" "$T/ext" "$T/ro"
head -c $((3 * M)) /dev/urandom >"$T/src/big"
seq 1 100000 >"$T/src/text"
for i in 1 2 3 4 5; do head -c $((i * 10000 + 7)) /dev/urandom >"$T/src/small$i"; done

qemu-img create -q -f qcow2 "$img" $((64 * M))
mount_image "$img" "$mnt" partitions
[[ $(ls "$mnt") == disk ]] || fail "an empty disk has partition files: $(ls "$mnt")"

# p1 2048+16M, p2 16M, p3 extended (the rest) holding p5 8M and p6 (the rest)
printf 'label: dos\n2048,32768,83\n,32768,83\n,,5\n,16384,83\n,,83\n' \
    | sfdisk -q --no-reread --no-tell-kernel "$mnt/disk" || fail "sfdisk on $mnt/disk failed"
[[ $(ls "$mnt" | tr '\n' ' ') == "disk disk-p1 disk-p2 disk-p5 disk-p6 " ]] \
    || fail "after sfdisk through the disk: $(ls "$mnt" | tr '\n' ' ')"
info "sfdisk through $mnt/disk: disk-p1 p2 p5 p6 appeared"
logged "disk-p6: partition 6, bytes 45088768-67108863 of the disk"
p6_start=45088768
p6_len=$((67108864 - p6_start))

mkfs.ext4 -q -F "$mnt/disk-p1" || fail "mkfs.ext4 on disk-p1 failed"
mkfs.ext4 -q -F "$mnt/disk-p5" || fail "mkfs.ext4 on disk-p5 failed"
mount -o loop "$mnt/disk-p1" "$T/ext" || fail "mount -o loop disk-p1 failed"
track_kmount "$T/ext"
cp -a "$T/src" "$T/ext/tree" || fail "cp into ext4 on disk-p1 failed"
umount "$T/ext" || fail "umount of disk-p1's ext4 failed"
debugfs -w -R "write $T/src/big big" "$mnt/disk-p5" >/dev/null 2>&1 || fail "debugfs write into disk-p5 failed"
info "ext4 on disk-p1 (loop-mounted, a tree copied in) and disk-p5 (debugfs write)"

head -c $((4 * M)) /dev/urandom | dd of="$mnt/disk-p2" bs=1M conv=notrunc status=none
head -c $((4 * M)) /dev/urandom >"$T/p6data"
dd if="$T/p6data" of="$mnt/disk-p6" bs=1M seek=2 conv=notrunc status=none
"$FSYNC" "$mnt/disk-p6" || fail "fsync of disk-p6 failed"
ref_range "$img" $((p6_start + 2 * M)) $((4 * M)) "$T/p6.ref"
same_bytes "$T/p6data" "$T/p6.ref" "data fsynced through disk-p6 vs qemu-img on the mounted image"
info "fsync through disk-p6: qemu-img sees its data in the image"

fallocate -p -o $((3 * M)) -l $M "$mnt/disk-p6" || fail "punch through disk-p6 failed"
cmp -s -n $M <(dd if="$mnt/disk-p6" bs=1M skip=3 count=1 status=none) /dev/zero \
    || fail "a hole punched through disk-p6 does not read as zeros"
"$SEEKMAP" "$mnt/disk" >"$T/disk.map" || fail "seekmap of the disk failed"
# p2 is followed by data (the first EBR's cluster, ext4 in p5), p6 by the
# end of the disk.
for k in 2 6; do
    "$SEEKMAP" "$mnt/disk-p$k" >"$T/p$k.map" || fail "seekmap of disk-p$k failed"
done
clipped_map "$T/disk.map" $((34816 * 512)) $((32768 * 512)) >"$T/p2.want"
clipped_map "$T/disk.map" "$p6_start" "$p6_len" >"$T/p6.want"
for k in 2 6; do
    diff "$T/p$k.want" "$T/p$k.map" >&2 || fail "SEEK_DATA/SEEK_HOLE of disk-p$k differ from the disk's map in its window"
done
grep -q "^$((2 * M)) $M\$" "$T/p6.map" && grep -q "^$((4 * M)) $((2 * M))\$" "$T/p6.map" \
    || fail "disk-p6's map does not show the punched hole at 3 MiB: $(cat "$T/p6.map")"
info "disk-p6: punched hole reads as zeros; SEEK_DATA/HOLE maps of p2 and p6 are the disk's, cut to each window"

# The first EBR sits right behind p2: a write across p2's end must not reach it.
cross_end "$mnt/disk-p2" "$mnt/disk" $((34816 * 512 + 32768 * 512))
[[ $(ls "$mnt" | tr '\n' ' ') == "disk disk-p1 disk-p2 disk-p5 disk-p6 " ]] || fail "the table changed"

unmount_image "$mnt"
check_clean "$img" "MBR image"
raw=$(ref_raw "$img" "$T/mbr.raw")
attach_parts "$raw"
mbr_dev=$LOOP_DEV
mount_image "$img" "$mnt" ro,partitions
compare_parts "$mnt" "$mbr_dev" "1 2 5 6" 3
compare_raw "$img" "$mnt"
write_fails_erofs "$mnt/disk-p1"
mount -o ro "${mbr_dev}p1" "$T/ro" || fail "mount ${mbr_dev}p1 failed"
track_kmount "$T/ro"
diff -r "$T/src" "$T/ro/tree" >&2 || fail "the tree copied into disk-p1's ext4 differs"
umount "$T/ro"
debugfs -R "dump big $T/big.back" "${mbr_dev}p5" >/dev/null 2>&1
same_bytes "$T/src/big" "$T/big.back" "file written into disk-p5 with debugfs"
info "the ext4 file systems of p1 and p5 hold what was written"
unmount_image "$mnt"

# Bad tables, written through the disk of a writable mount.
mount_image "$img" "$mnt" partitions
declare -A before=()
for k in 1 2 5 6; do before[$k]=$(ino "$mnt/disk-p$k"); done
ebr1=67584
ebr2=$((ebr1 + $(le32 "$mnt/disk" $((ebr1 * 512 + 446 + 16 + 8)))))
# EBR 2's second entry: a link back to the first EBR (relative start 0).
put_bytes "$mnt/disk" $((ebr2 * 512 + 446 + 16)) "00 00 00 00 05 00 00 00 00 00 00 00 01 00 00 00"
logged "extended partition 3: the EBR chain comes back to LBA $ebr1 (byte $((ebr1 * 512))), read before: chain cut there"
# MBR slot 4: overlapping partition 1, then past the end of the disk.
put_bytes "$mnt/disk" $((446 + 48)) "00 00 00 00 83 00 00 00 00 10 00 00 00 08 00 00"
logged "partition 4 (byte 502): sectors 4096-6143 overlap partition 1 (sectors 2048-34815): dropped"
put_bytes "$mnt/disk" $((446 + 48)) "00 00 00 00 83 00 00 00 00 00 02 00 00 00 01 00"
logged "partition 4 (byte 502): sectors 131072-196607 end past the end of the disk (131072 sectors): dropped"
for k in 1 2 5 6; do
    [[ $(ino "$mnt/disk-p$k") == "${before[$k]}" ]] || fail "disk-p$k changed inode over a bad table"
done
[[ ! -e $mnt/disk-p4 ]] || fail "a bad partition 4 got a file"
compare_parts "$mnt" "$mbr_dev" "1 2 5 6" 3
info "bad MBR tables: logged, sound partitions kept with their inodes and bytes"
# Partition 4 (64-96 MiB) fits once the disk grows: the table is read again.
truncate -s $((96 * M)) "$mnt/disk" || fail "growing the disk failed"
[[ $(stat -c %s "$mnt/disk-p4" 2>/dev/null) == $((32 * M)) ]] \
    || fail "growing the disk did not bring partition 4: $(ls "$mnt" | tr '\n' ' ')"
for k in 1 2 5 6; do
    [[ $(ino "$mnt/disk-p$k") == "${before[$k]}" ]] || fail "disk-p$k changed inode when the disk grew"
done
info "growing the disk read the table again: disk-p4 appeared, the others kept"
unmount_image "$mnt"
check_clean "$img" "MBR image after the bad tables"
loop_detach "$mbr_dev"

# ---------------------------------------------------------------------------
# GPT

img="$T/gpt.qcow2"
qemu-img create -q -f qcow2 "$img" $((64 * M))
mount_image "$img" "$mnt" partitions
sgdisk -n 1:2048:+10M -n 2:0:+20M -n 3:0:0 "$mnt/disk" >/dev/null 2>&1 \
    || fail "sgdisk on $mnt/disk failed"
[[ $(ls "$mnt" | tr '\n' ' ') == "disk disk-p1 disk-p2 disk-p3 " ]] \
    || fail "after sgdisk through the disk: $(ls "$mnt" | tr '\n' ' ')"
info "sgdisk through $mnt/disk: disk-p1 p2 p3 appeared"
for k in 1 2 3; do
    head -c $((2 * M)) /dev/urandom | dd of="$mnt/disk-p$k" bs=1M conv=notrunc status=none
done
cross_end "$mnt/disk-p1" "$mnt/disk-p2" 0

# Move partition 3 by 1 MiB while disk-p3 is open.
p1_ino=$(ino "$mnt/disk-p1")
p2_ino=$(ino "$mnt/disk-p2")
p3_ino=$(ino "$mnt/disk-p3")
p3_start=$(sgdisk -i 3 "$mnt/disk" | sed -n 's/^First sector: \([0-9]*\).*/\1/p')
exec 3<"$mnt/disk-p3"
dd bs=4k count=1 status=none <&3 >/dev/null || fail "reading the open disk-p3 failed"
sgdisk -d 3 -n 3:$((p3_start + 2048)):0 "$mnt/disk" >/dev/null 2>&1 || fail "sgdisk moving partition 3 failed"
if out=$(dd bs=4k count=1 status=none <&3 2>&1 >/dev/null); then
    fail "reading disk-p3 opened before its partition moved succeeded"
fi
exec 3<&-
grep -q "Stale file handle" <<<"$out" || fail "the open disk-p3 after the move: $out (expected ESTALE)"
[[ $(ino "$mnt/disk-p1") == "$p1_ino" && $(ino "$mnt/disk-p2") == "$p2_ino" ]] \
    || fail "unchanged partitions 1 and 2 changed inode"
[[ $(ino "$mnt/disk-p3") != "$p3_ino" ]] || fail "the moved partition 3 kept its inode"
logged "disk-p3 removed: partition 3 moved, changed size or is gone"
info "moved partition 3: the open handle gets ESTALE, disk-p3 is a new file, p1 and p2 kept"

unmount_image "$mnt"
check_clean "$img" "GPT image"
raw=$(ref_raw "$img" "$T/gpt.raw")
attach_parts "$raw"
gpt_dev=$LOOP_DEV
mount_image "$img" "$mnt" ro,partitions
compare_parts "$mnt" "$gpt_dev" "1 2 3" -
unmount_image "$mnt"

mount_image "$img" "$mnt" partitions
crc=$(od -A n -t x1 -j $((512 + 16)) -N 4 "$mnt/disk")
put_bytes "$mnt/disk" $((512 + 16)) "de ad be ef"
logged "GPT primary header at LBA 1: header CRC32 0xefbeadde at byte 528 does not match its 92 bytes"
logged "using the backup GPT header at LBA 131071 (byte 67108352)"
[[ $(ino "$mnt/disk-p1") == "$p1_ino" ]] || fail "disk-p1 changed inode when the backup header took over"
compare_parts "$mnt" "$gpt_dev" "1 2 3" -
put_bytes "$mnt/disk" $((67108352 + 16)) "de ad be ef"
logged "neither GPT header is usable: no partitions"
[[ $(ls "$mnt") == disk ]] || fail "with both GPT headers bad: $(ls "$mnt" | tr '\n' ' ')"
put_bytes "$mnt/disk" $((512 + 16)) "$crc"
compare_parts "$mnt" "$gpt_dev" "1 2 3" -
info "GPT: bad primary CRC -> backup used, both bad -> only the disk, primary repaired -> back"

# The backup header is no longer at the last LBA; the primary still holds.
p1_ino=$(ino "$mnt/disk-p1")
truncate -s $((80 * M)) "$mnt/disk" || fail "growing the disk failed"
[[ $(ino "$mnt/disk-p1") == "$p1_ino" ]] || fail "growing the disk changed disk-p1's inode"
compare_parts "$mnt" "$gpt_dev" "1 2 3" -
info "growing a GPT disk kept the files"
unmount_image "$mnt"
check_clean "$img" "GPT image after the bad headers and the resize"
loop_detach "$gpt_dev"
