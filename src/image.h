/*
 * image — one open disk image (qcow2, or a raw backing file) with its
 * backing chain: byte-granular reads, writes, flushes and block status over
 * the virtual disk.  This is the only interface the FUSE layer uses.
 *
 * Locking rule: every function may be called from several threads at once.
 * Internally a metadata mutex covers table lookups and allocation; guest
 * data I/O runs outside it.
 */
#ifndef QCOW2FUSE_IMAGE_H
#define QCOW2FUSE_IMAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backing.h"

struct image;

struct image_options {
    bool read_only;
    uint64_t l2_cache_size;         /* bytes; 0: enough for the whole disk, capped */
    uint64_t refcount_cache_size;   /* bytes; 0: default */
    bool writethrough;              /* write metadata on every update */
    struct backing_options backing;
    int trace_fd;                   /* >= 0: record host I/O (tests) */
};

#define IMAGE_MAX_CHAIN_DEPTH   64
#define IMAGE_DEFAULT_L2_CACHE_MAX  (32u << 20)

/*
 * Open @path and its backing chain.
 * On exit: *out is the open image; errors were logged with the field or
 * file concerned.
 * Returns: 0 or -errno.
 */
int image_open(const char *path, const struct image_options *opts,
               struct image **out);

/* Write back all metadata, release locks, close files.
 * Returns: 0, or the first -errno of the final flush. */
int image_close(struct image *img);

uint64_t image_size(const struct image *img);
bool image_is_read_only(const struct image *img);
uint32_t image_cluster_size(const struct image *img);

/*
 * Read @len bytes at @offset into @buf.  Bytes at or past the virtual size
 * read as zeros.
 * Returns: 0 or -errno (-EIO for a corrupt region).
 */
int image_read(struct image *img, void *buf, size_t len, uint64_t offset);

/*
 * Write @len bytes from @buf at @offset.
 * On entry: @offset + @len <= virtual size.
 * Returns: 0, -EROFS (read-only or corrupt image), -ENOSPC, -EIO, -errno.
 */
int image_write(struct image *img, const void *buf, size_t len, uint64_t offset);

/*
 * Make every completed write durable: refcount blocks, host flush, L2
 * tables, L1 table, host flush, then deferred refcount decrements.
 * Returns: 0 or the first -errno (failed tables stay dirty for a retry).
 */
int image_flush(struct image *img);

/* Trace mark recorded after every successful image_flush(); the argument is
 * the flush's sequence number (1, 2, ...).  Used by the power-loss tests. */
#define IMAGE_MARK_FLUSHED  1

/*
 * Find the next data (SEEK_DATA) or hole (SEEK_HOLE) at or after @offset.
 * On exit: *result is the offset found (the virtual size for a hole at EOF).
 * Returns: 0, -ENXIO when @offset is at/after the end or no data follows.
 */
int image_seek(struct image *img, uint64_t offset, bool data, uint64_t *result);

#endif
