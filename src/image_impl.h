/*
 * image_impl — what the parts of the image module share (image.c,
 * image_read.c, image_write.c, image_flush.c, image_zero.c): the image
 * itself, its locks and request ranges, and the helpers one part calls in
 * another.  Private: only src/image*.c include it; everything else uses
 * image.h.
 */
#ifndef QCOW2FUSE_IMAGE_IMPL_H
#define QCOW2FUSE_IMAGE_IMPL_H

#include "image.h"

#include "cluster.h"
#include "compress.h"
#include "header.h"
#include "meta.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

struct cluster_run;

/* A guest byte range in use by a request that changes the image (cluster
 * aligned): two writes never allocate or move one cluster at once.  Reads
 * take no range: a write sets an L2 entry only after the data it points at
 * is written, and the host cluster it replaces stays allocated until a flush
 * applies the deferred frees; a read that raced with that (free_gen moved
 * while it read a host cluster) reads the run again. */
struct range {
    uint64_t start, end;
    struct range *next;
};

struct image {
    char *path;
    bool is_raw;                /* a raw backing file: no translation */
    struct io *io;
    struct io *data_io;         /* external data file, owned; or NULL */
    char *data_path;            /* its path, for messages */
    struct meta meta;
    struct qcow2_header hdr;
    struct cluster *cl;
    /* Atomic: image_drop_backing() sets it to NULL while reads run (see
     * there); backing_users counts the readers inside the chain, chain_gen
     * moves when it goes, so a lookup made before reads again. */
    struct image *_Atomic backing;
    _Atomic unsigned backing_users;
    _Atomic uint64_t chain_gen;
    bool copy_on_read;          /* fill what guest reads fetch from the chain */
    _Atomic unsigned guest_requests;    /* in flight: reads, writes, zeroing, flushes */
    _Atomic uint64_t bytes_filled, bytes_copied_on_read;
    _Atomic int stream_state;   /* enum image_stream_state, set by the stream */
    _Atomic uint64_t stream_pos, stream_total;
    _Atomic uint64_t size;      /* read without the lock by reads */
    enum compress_type compression;
    struct refcount *rc;        /* writable images only */
    struct bitmaps *bitmaps;    /* persistent dirty bitmaps kept (writable
                                 * images with valid ones), or NULL */
    bool write_prepared;        /* header feature bits updated for writing */
    bool set_dirty_bit;         /* we set the lazy-refcounts dirty bit */
    uint64_t flush_seq;
    /* io->changes of img->io and img->data_io as of their last completed
     * flush: what a flush still has to make durable. */
    _Atomic uint64_t synced, synced_data;
    enum image_discard_mode discard;
    enum image_detect_zeroes detect_zeroes;
    _Atomic uint64_t bytes_read, bytes_written, clusters_allocated, flushes;
    struct range *ranges;
    unsigned range_waiters;
    pthread_cond_t range_cond;
    _Atomic uint64_t free_gen;  /* bumped before host clusters are released */
    /*
     * The metadata lock is the pair: `lock` serialises everything that
     * changes metadata (and guards ranges; range_cond waits on it), and
     * every holder of `lock` also holds `tables` for writing, released only
     * while waiting on range_cond.  Lookups of cached L2 slices hold just
     * `tables` for reading, so concurrent reads never serialise; everything
     * else takes both through lock_exclusive().  Order: lock, then tables.
     *
     * One exception: image_flush() holds only `lock`.  A flush writes
     * tables back and waits for the host, but changes no L1 entry, no L2
     * entry and no L2 cache membership (only dirty flags, which lookups do
     * not read), so lookups go on while it waits.  The host clusters it
     * releases are no longer referenced by any L2 entry, and free_gen is
     * bumped first, so a read that looked one up earlier reads again.
     */
    pthread_mutex_t lock;
    pthread_rwlock_t tables;
    /*
     * A snapshot view (image.c, image_snapshot_view_open) points at the image it views: it
     * borrows that image's files, backing chain and L2 cache (its cl
     * shares the cache), so its lookups take that image's metadata lock
     * and read its free_gen (lock_owner).  Views are read-only and change
     * nothing; `views` counts those open on an image, which must reach 0
     * before it closes.
     */
    struct image *view_of;
    atomic_uint views;
};

/* The image whose metadata lock covers @img's tables (see view_of). */
static inline struct image *lock_owner(struct image *img)
{
    return img->view_of ? img->view_of : img;
}

/* ---- the metadata lock ----------------------------------------------------- */

static inline void lock_exclusive(struct image *img)
{
    img = lock_owner(img);
    pthread_mutex_lock(&img->lock);
    pthread_rwlock_wrlock(&img->tables);
}

static inline void unlock_exclusive(struct image *img)
{
    img = lock_owner(img);
    pthread_rwlock_unlock(&img->tables);
    pthread_mutex_unlock(&img->lock);
}

/* Wait for a range to be released, holding the lock exclusively before and
 * after; lookups may run meanwhile. */
static inline void wait_exclusive(struct image *img)
{
    pthread_rwlock_unlock(&img->tables);
    pthread_cond_wait(&img->range_cond, &img->lock);
    pthread_rwlock_wrlock(&img->tables);
}

/* A guest request (image_read, image_write, image_zero, image_flush) in
 * flight: what a background stream backs off for. */
static inline void guest_begin(struct image *img)
{
    img->guest_requests++;
}

static inline void guest_end(struct image *img)
{
    img->guest_requests--;
}

/* ---- image.c ---------------------------------------------------------------- */

/* Wait until no other request holds a range overlapping [offset, +len),
 * then hold it.  The _locked forms are called with the metadata lock held
 * (released while waiting); the others take it. */
void image_range_lock_locked(struct image *img, struct range *r, uint64_t offset,
                             uint64_t len);
void image_range_unlock_locked(struct image *img, struct range *r);
void image_range_lock(struct image *img, struct range *r, uint64_t offset, uint64_t len);
void image_range_unlock(struct image *img, struct range *r);

/* Whether a host flush has failed; if so the image takes no more writes or
 * flushes (see there). */
bool image_flush_failed(struct image *img);

/* ---- image_read.c ----------------------------------------------------------- */

/* Read and decompress the cluster of @run into @buf; @gen: see there. */
int image_read_compressed(struct image *img, const struct cluster_run *run,
                          uint64_t offset, void *buf, const uint64_t *gen);
/* A read of the disk, without counting it in the statistics. */
int image_read_range(struct image *img, uint8_t *p, size_t len, uint64_t offset);

/* ---- image_write.c ---------------------------------------------------------- */

/* Header changes before the first write.  Called with the metadata lock held. */
int image_prepare_write(struct image *img);
/* The write proper: the caller holds the guest range and the metadata lock
 * (dropped around data I/O). */
int image_write_range(struct image *img, const uint8_t *data, uint64_t len,
                      uint64_t offset);
/* -ENOSPC past the end of the disk; check_writable also refuses a read-only,
 * corrupt or failed image. */
int image_check_inside(struct image *img, uint64_t offset, uint64_t len);
int image_check_writable(struct image *img, uint64_t offset, uint64_t len);
/* Whether @len bytes at @p are all zero. */
bool image_all_zero(const uint8_t *p, size_t len);

/* What the L2 entry of one guest cluster said before a write, zeroing or
 * discard replaces it, in units (subclusters with extended L2, else the
 * whole cluster as unit 0). */
struct old_state {
    uint64_t entry, bitmap;     /* as found */
    struct cluster_entry dec;   /* the one decoding of them (validation) */
    bool compressed;
    bool has_host;
    uint64_t host;
    uint32_t alloc;             /* units whose data is at host */
    uint32_t zero;              /* units that read as zero */
    /* Validated: the host bytes of the image file a replacement releases
     * (see cluster_check_old_entry); 0 when none. */
    uint64_t free_host, free_len;
};

/* Read, decode and validate (cluster_check_old_entry) the L2 entry of
 * guest cluster @gc.  Called with the metadata lock held.
 * Returns: 0, or -EIO after meta_corrupt() (free nothing then), -errno. */
int image_old_state(struct image *img, uint64_t gc, struct old_state *st);

/* ---- image_flush.c ---------------------------------------------------------- */

/* The metadata part of a flush.  Called with the metadata lock held. */
int image_flush_locked(struct image *img);

/* ---- image_fill.c ----------------------------------------------------------- */

/* Copy-on-read of the clusters of [@offset, +@len), after a guest read that
 * fetched some of it from the backing chain: failures are logged, not
 * returned (the read has its data). */
void image_copy_on_read(struct image *img, uint64_t offset, uint64_t len);

/* ---- image_zero.c ----------------------------------------------------------- */

/* Zero [offset, offset + len).  On entry the range is held exclusively. */
int image_zero_range(struct image *img, uint64_t offset, uint64_t len, bool unmap);

#endif
