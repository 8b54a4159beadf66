/*
 * compress — compressed clusters: the L2 descriptor, and zlib (raw deflate)
 * and zstd decoding and encoding of one cluster.  Pure functions apart from
 * the codec libraries and zlib's working memory (the calling thread's
 * scratch buffer); thread-safe.
 */
#ifndef QCOW2FUSE_COMPRESS_H
#define QCOW2FUSE_COMPRESS_H

#include <stddef.h>
#include <stdint.h>

enum compress_type {
    COMPRESS_ZLIB = 0,
    COMPRESS_ZSTD = 1,
};

/*
 * Decode the compressed-cluster descriptor of an L2 entry (bits 0..61).
 * On exit: *host_offset is the byte offset of the compressed data, *max_len
 * the number of bytes that may hold it (to the end of its last sector).
 * Returns: 0, or -EINVAL when the host offset has bits beyond 55 set.
 */
int compress_descriptor_decode(uint64_t l2_entry, unsigned cluster_bits,
                               uint64_t *host_offset, uint64_t *max_len);

/* The 512-byte sectors that hold @len compressed bytes at @host_offset:
 * what the refcounts of a compressed cluster count. */
#define COMPRESS_SECTOR 512u
static inline void compress_sectors(uint64_t host_offset, uint64_t len,
                                    uint64_t *sectors_offset, uint64_t *sectors_len)
{
    *sectors_offset = host_offset & ~(uint64_t)(COMPRESS_SECTOR - 1);
    *sectors_len = len + (host_offset & (COMPRESS_SECTOR - 1));
}

/* Encode a descriptor for @len bytes at @host_offset (without flag bits). */
uint64_t compress_descriptor_encode(uint64_t host_offset, uint64_t len,
                                    unsigned cluster_bits);

/*
 * Decompress @src (@src_len bytes, possibly with trailing garbage) into
 * exactly @dst_len bytes.
 * Returns: 0, or -EIO when the data is invalid or too short.
 */
int compress_decode(enum compress_type type, const void *src, size_t src_len,
                    void *dst, size_t dst_len);

/*
 * Compress @src_len bytes into @dst (capacity @dst_cap).
 * Returns: the compressed length, or -ENOSPC when it would not be smaller
 * than @dst_cap, or -EIO.
 */
long compress_encode(enum compress_type type, const void *src, size_t src_len,
                     void *dst, size_t dst_cap);

#endif
