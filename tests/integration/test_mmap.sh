#!/usr/bin/env bash
# Shared mmap of the disk file (FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6+):
# MAP_SHARED read and write mappings of MNT/disk work instead of failing
# with ENODEV.  Writes through two shared mappings (at offset 0 and at
# 40 MiB), of every shape (unaligned, across pages and clusters, over
# data, holes and zero clusters), are msync'ed, read back with pread, and
# after unmount the image is clean and qemu-img convert gives exactly a
# model file that received the same writes with pwrite.  A shared read
# mapping of a read-only mount shows what qemu-img convert shows.
. "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires_fuse
requires qemu-img qemu-io python3

# Linux 6.6 brought FUSE_DIRECT_IO_ALLOW_MMAP; before it the kernel refuses
# a shared mapping of a direct_io file whatever the daemon asks.
kernel=$(uname -r)
IFS=. read -r kmaj kmin _ <<<"${kernel%%-*}"
if ((kmaj < 6 || (kmaj == 6 && kmin < 6))); then
    skip "kernel $kernel is older than 6.6: no shared mmap of direct_io FUSE files"
fi

M=$((1024 * 1024))

# make_image IMG: 64 MiB, 64 KiB clusters: random data in the first
# 6 MiB and at 41-43 MiB, a zero cluster run at 2 MiB, the rest holes.
make_image() {
    local img=$1
    head -c $((8 * M)) /dev/urandom >"$T/rand"
    qemu-img create -q -f qcow2 "$img" 64M
    qio "$img" \
        "write -s $T/rand 0 $((6 * M))" \
        "write -z $((2 * M)) $((256 * 1024))" \
        "write -s $T/rand $((41 * M)) $((2 * M))"
}

# mmap_writes.py DISK MODEL: map DISK shared at 0 and 40 MiB (16 MiB
# each), check the mappings against MODEL, write 300 deterministic random
# ranges through them and the same into MODEL with pwrite, msync, and
# compare DISK read back with pread (direct I/O, through the daemon) with
# MODEL.
cat >"$TEST_TMP/mmap_writes.py" <<'EOF'
import mmap, os, random, sys

disk, model = sys.argv[1], sys.argv[2]
M = 1 << 20
fd = os.open(disk, os.O_RDWR)
mfd = os.open(model, os.O_RDWR)
maps = {}
for base in (0, 40 * M):
    try:
        maps[base] = mmap.mmap(fd, 16 * M, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
    except OSError as e:
        sys.exit("MAP_SHARED read-write mapping at %d refused: %s" % (base, e))
    if maps[base][:] != os.pread(mfd, 16 * M, base):
        sys.exit("the mapping at %d does not show the disk's bytes" % base)
rng = random.Random(20261201)
for i in range(300):
    base = rng.choice((0, 40 * M))
    # Small and unaligned, page- and cluster-crossing, up to 300 KiB.
    n = rng.choice((1, 7, 512, 4095, 4096, 4097, 65536 + 13, rng.randrange(1, 300 * 1024)))
    off = rng.randrange(0, 16 * M - n)
    data = rng.randbytes(n)
    maps[base][off:off + n] = data
    os.pwrite(mfd, data, base + off)
for base, m in maps.items():
    m.flush()           # msync(MS_SYNC)
for base in maps:
    got = os.pread(fd, 16 * M, base)
    if got != os.pread(mfd, 16 * M, base):
        first = next(i for i in range(len(got)) if got[i] != os.pread(mfd, 1, base + i)[0])
        sys.exit("after msync, pread of the disk differs from the model at %d" % (base + first))
for m in maps.values():
    m.close()
os.close(fd)
os.close(mfd)
print("300 writes through 2 shared mappings")
EOF

case_shared_write() {
    local img=$T/img.qcow2 mnt=$T/mnt model=$T/model.raw out
    make_image "$img"
    ref_raw "$img" "$model" >/dev/null
    mount_image "$img" "$mnt"
    out=$(io_timeout python3 "$TEST_TMP/mmap_writes.py" "$mnt/disk" "$model" 2>&1) ||
        fail "shared mapping of the writable disk: $out"
    info "$out"
    unmount_image "$mnt"
    check_clean "$img" "after the writes through shared mappings"
    same_bytes "$(ref_raw "$img")" "$model" "the image after unmount vs the model file"
}

case_shared_read_ro() {
    local img=$T/img.qcow2 mnt=$T/mnt ref out
    make_image "$img"
    ref=$(ref_raw "$img")
    mount_image "$img" "$mnt" ro
    out=$(io_timeout python3 - "$mnt/disk" "$ref" <<'EOF' 2>&1
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
try:
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
except OSError as e:
    sys.exit("MAP_SHARED read mapping refused: %s" % e)
with open(sys.argv[2], "rb") as f:
    if m[:] != f.read():
        sys.exit("the shared mapping differs from qemu-img convert")
# Writable shared mappings of a read-only open stay refused (EACCES).
try:
    mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    sys.exit("a writable shared mapping of a read-only open was allowed")
except OSError:
    pass
print("%d bytes through a shared read mapping" % size)
EOF
    ) || fail "shared read mapping of the read-only disk: $out"
    info "$out"
    unmount_image "$mnt"
}

run_case shared_write case_shared_write
run_case shared_read_ro case_shared_read_ro
finish_cases
