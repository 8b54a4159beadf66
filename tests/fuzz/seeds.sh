#!/usr/bin/env bash
# Seed corpus for the fuzz targets: small images of every kind qemu-img makes.
set -euo pipefail
out=$1
mkdir -p "$out"
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
mk() { # name, create options, size
    qemu-img create -q -f qcow2 -o "$2" "$t/$1" "$3"
    qemu-io -c "write -P 0x5a 0 64k" -c "write -z 128k 64k" -c "write 300k 5k" "$t/$1" >/dev/null
    cp "$t/$1" "$out/$1"
}
mk v2.qcow2 compat=0.10 1M
mk v3.qcow2 compat=1.1 1M
mk c512.qcow2 cluster_size=512 1M
mk c4k.qcow2 cluster_size=4096 1M
mk rc1.qcow2 refcount_bits=1 1M
mk rc64.qcow2 refcount_bits=64 1M
mk extl2.qcow2 extended_l2=on,cluster_size=16k 1M
mk lazy.qcow2 lazy_refcounts=on 1M
qemu-img convert -c -O qcow2 "$t/v3.qcow2" "$out/zlib.qcow2"
qemu-img convert -c -O qcow2 -o compression_type=zstd "$t/v3.qcow2" "$out/zstd.qcow2"
qemu-img snapshot -c s1 "$out/v3.qcow2"
# Persistent dirty bitmaps (an enabled 4k one with bits, a disabled one).
qemu-img create -q -f qcow2 -o cluster_size=4096 "$t/bitmaps.qcow2" 1M
qemu-img bitmap --add -g 4096 "$t/bitmaps.qcow2" on
qemu-img bitmap --add --disable "$t/bitmaps.qcow2" off
qemu-io -c "write 8k 12k" "$t/bitmaps.qcow2" >/dev/null
cp "$t/bitmaps.qcow2" "$out/bitmaps.qcow2"
