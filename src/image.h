/*
 * image — one open disk image (qcow2, or a raw backing file) with its
 * backing chain: byte-granular reads, writes, flushes and block status over
 * the virtual disk.  This is the only interface the FUSE layer uses.
 *
 * Locking rule: every function may be called from several threads at once.
 * Internally a metadata lock covers table lookups, allocation and the
 * metadata part of a flush (table writes and their host flushes).  Lookups
 * for reads hold it shared when the L2 slice is cached, so reads of
 * allocated data do not serialise; everything else holds it exclusively.
 * Guest data I/O runs outside it, and so does the write-back of much guest
 * data at a flush.  Writes, zeroing, preallocation and resize also hold their
 * guest range (cluster aligned) against each other; reads hold nothing while
 * they do I/O (see struct range in image_impl.h).
 */
#ifndef QCOW2FUSE_IMAGE_H
#define QCOW2FUSE_IMAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backing.h"

struct image;

enum image_discard_mode {
    IMAGE_DISCARD_UNMAP,        /* punched clusters give their space back */
    IMAGE_DISCARD_IGNORE,       /* punched ranges read as zero, stay allocated */
};

enum image_detect_zeroes {
    IMAGE_DETECT_ZEROES_OFF,
    IMAGE_DETECT_ZEROES_ON,     /* all-zero writes become zero clusters */
    IMAGE_DETECT_ZEROES_UNMAP,  /* ... and give their space back */
};

struct image_options {
    bool read_only;
    enum image_discard_mode discard;
    enum image_detect_zeroes detect_zeroes;
    uint64_t l2_cache_size;         /* bytes; 0: enough for the whole disk, capped */
    uint64_t refcount_cache_size;   /* bytes; 0: default */
    bool writethrough;              /* write metadata on every update */
    struct backing_options backing;
    int trace_fd;                   /* >= 0: record host I/O (tests) */
    const char *snapshot;           /* show this internal snapshot (read-only) */
    bool copy_on_read;              /* reads fill the top image from the chain */
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

/*
 * As image_open, over an already open @io (e.g. the memory backend, for
 * fuzzing); @name is used in messages and to resolve backing names.  The
 * image owns @io from then on, also on failure.
 */
struct io;
int image_open_io(struct io *io, const char *name, const struct image_options *opts,
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
 * Returns: 0, -EROFS (read-only or corrupt image), -ENOSPC (past the end,
 * also when a concurrent resize shrank the disk under the request), -EIO,
 * -errno.
 */
int image_write(struct image *img, const void *buf, size_t len, uint64_t offset);

/*
 * Make every completed write durable: refcount blocks, host flush, L2
 * tables, L1 table, host flush, then deferred refcount decrements.
 * Returns: 0 or the first -errno (failed tables stay dirty for a retry).
 */
int image_flush(struct image *img);

/*
 * Make [@offset, @offset + @len) read as zeros.  With @punch (a hole punch
 * or discard) whole clusters are unmapped where the discard mode allows it,
 * their space released after the change is durable; without it (zero
 * range) whole clusters keep their allocation.  Partial clusters are
 * zero-filled.  Never exposes backing data.
 * Returns: 0, -EROFS, -ENOSPC (range past the end), -errno.
 */
int image_zero(struct image *img, uint64_t offset, uint64_t len, bool punch);

/*
 * Allocate host clusters for [@offset, @offset + @len) without changing
 * what the range reads (fallocate mode 0).
 */
int image_preallocate(struct image *img, uint64_t offset, uint64_t len);

/*
 * Change the virtual size.  Growing may move the L1 table; the new range
 * reads as zeros, also where a larger backing file lies beneath it (zero
 * clusters; refused with -EOPNOTSUPP, logged, on a version 2 image, which
 * cannot express them).  Shrinking is refused (-EOPNOTSUPP, logged) unless
 * nothing is allocated past the new end.  @new_size must be a multiple of
 * 512 (-EINVAL).
 */
int image_resize(struct image *img, uint64_t new_size);

/* A one-line summary of the counters: bytes read and written, clusters
 * allocated, flushes, cache hits and misses. */
void image_stats(struct image *img, char *buf, size_t len);

/*
 * As image_flush, for a flush the guest did not ask for (a background
 * stream's): no trace mark, so the marks stay the guest's fsyncs.
 */
int image_flush_quiet(struct image *img);

/* ---- copy-on-read and streaming (image_fill.c) ----------------------------- */

/* Whether the image still has a backing chain. */
bool image_has_backing(struct image *img);

/* The virtual size of the backing chain (its top image's), 0 without:
 * past it the disk reads as zeros with or without the chain. */
uint64_t image_chain_size(struct image *img);

/* Guest requests in flight (reads, writes, zeroing, flushes). */
unsigned image_guest_requests(struct image *img);

/*
 * Copy the clusters of [@offset, @offset + @len) (widened to whole
 * clusters) that the top image does not have from the backing chain into
 * it: data as a write would write it, clusters that read as zeros as zero
 * clusters.  Only what is still unallocated is filled: each span is held
 * as a write holds its range, and looked at again under it, so a guest
 * write that got there first is never overwritten.  Clusters the image
 * has are skipped at lookup speed, and so is what lies past the end of the
 * backing chain (it reads as zeros with or without it).
 * On exit: *filled is the number of bytes filled.
 * Returns: 0 (also with no backing chain: nothing to do), -EROFS, -EIO,
 *          -ENOSPC, -errno.
 */
int image_fill(struct image *img, uint64_t offset, uint64_t len, uint64_t *filled);

/*
 * Make the image stand alone: make everything written durable (data, then
 * L2 and L1 tables: image_flush_quiet), then clear the header's backing
 * file name (flushed) and drop its backing format extension (flushed), then
 * close the backing chain once no read is inside it.
 * On entry: the whole disk is local (a pass of image_fill over it
 *           succeeded: nothing makes a cluster unallocated again while a
 *           backing file is there).
 * Returns: 0, -EBUSY (logged: the image has internal snapshots, which
 *          still read through the chain), or -errno (the backing chain
 *          stays; a crash in between leaves either header, both valid for
 *          the same content).
 */
int image_drop_backing(struct image *img);

enum image_stream_state {
    IMAGE_STREAM_OFF,
    IMAGE_STREAM_RUNNING,
    IMAGE_STREAM_DONE,          /* the backing file is dropped */
    IMAGE_STREAM_STOPPED,       /* by unmount: the next -o stream resumes */
    IMAGE_STREAM_FAILED,
};

/* Where a stream is (@pos of @total bytes walked), for image_stats. */
void image_report_stream(struct image *img, enum image_stream_state state, uint64_t pos,
                         uint64_t total);

/* Trace mark recorded after every successful image_flush(); the argument is
 * the flush's sequence number (1, 2, ...).  Used by the power-loss tests. */
#define IMAGE_MARK_FLUSHED  1

/*
 * Find the next data (SEEK_DATA) or hole (SEEK_HOLE) at or after @offset.
 * On exit: *result is the offset found (the virtual size for a hole at EOF).
 * Returns: 0, -ENXIO when @offset is at/after the end or no data follows.
 */
int image_seek(struct image *img, uint64_t offset, bool data, uint64_t *result);

/* ---- internal snapshots ---------------------------------------------------- */

struct snapshot;
struct snapshot_table;

/*
 * The internal snapshot table of @img, read and validated as for
 * -o snapshot= (snapshot_table_read; a raw image has none).
 * On exit: *t holds the entries (snapshot_table_free); a refused table
 * was logged with the entry, field and offset.
 * Returns: 0, -EINVAL, -ENOMEM, -errno.
 */
int image_snapshot_table(struct image *img, struct snapshot_table *t);

/*
 * Whether snapshot @s (an entry of image_snapshot_table) can be viewed, and
 * the virtual size its view has: its recorded disk size (snapshot_disk_size).
 * Returns: 0, or -EINVAL with @err naming the snapshot, field and offset.
 */
int image_snapshot_view_size(struct image *img, const struct snapshot *s,
                             uint64_t *size, char *err, size_t err_len);

/*
 * A read-only view of internal snapshot @index (its position in the table)
 * over the open image @img, writable or not: an image of the snapshot's
 * disk that shares @img's file, metadata lock, L2 cache and backing chain,
 * with the snapshot's own L1 table and virtual size.  Validated as
 * -o snapshot= is (see image_snapshot_view_size).  Reads, image_seek and
 * image_stats work on it as on any image; writes, zeroing, resize give
 * -EROFS; flush does nothing.  Writes to @img leave what it reads
 * unchanged (see image.c for why).  VM state saved with the snapshot is
 * not part of it.
 * On exit: *view is open; close it (image_snapshot_view_close or
 * image_close) before @img.
 * Returns: 0, -ENOENT (no such entry), -EINVAL (a snapshot that cannot be
 * viewed, or @img is raw or a view), -EOPNOTSUPP (an image with an
 * external data file), -ENOMEM, -errno; failures are logged.
 */
int image_snapshot_view_open(struct image *img, uint32_t index, struct image **view);
void image_snapshot_view_close(struct image *view);

#endif
