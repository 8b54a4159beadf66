/*
 * image_flush — making what was written durable, in the order that keeps
 * the image consistent after a crash at any point: guest data and refcount
 * increments, then L2 and L1 tables, then the deferred frees.
 */
#include "image_impl.h"

#include "cache.h"
#include "cluster.h"
#include "io.h"
#include "log.h"
#include "meta.h"
#include "refcount.h"

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

/* Release the host space of clusters whose refcount dropped to zero. */
static void punch_freed(void *opaque, uint64_t offset, uint64_t len)
{
    struct image *img = opaque;
    (void)io_punch_hole(img->io, offset, len);   /* space only: best effort */
}

/* *synced = @snap unless another flush already got further. */
static void advance(_Atomic uint64_t *synced, uint64_t snap)
{
    uint64_t cur = *synced;

    while ((int64_t)(snap - cur) > 0 &&
           !atomic_compare_exchange_weak(synced, &cur, snap))
        ;
}

/* Flush img->io and remember how far that got. */
static int sync_io(struct image *img)
{
    uint64_t snap = img->io->changes;
    int ret = io_flush(img->io);

    if (ret == 0)
        advance(&img->synced, snap);
    return ret;
}

int image_flush_locked(struct image *img)
{
    struct cache *l2 = cluster_l2_cache(img->cl);
    struct cache *rcc = refcount_cache(img->rc);
    bool tables = cache_has_dirty(l2) || cluster_l1_dirty(img->cl);
    int ret = 0;
    uint64_t io_snap = img->io->changes;
    uint64_t data_snap = img->data_io ? img->data_io->changes : 0;

    /* 1. Guest data, refcount increments and links of new refcount
     *    blocks, then a host flush; skipped when nothing was written since
     *    the last one (writes counted before a snapshot have completed, so
     *    the flush after it covers them). */
    if (img->data_io && data_snap != img->synced_data) {
        ret = io_flush(img->data_io);
        if (ret < 0) {
            (void)image_flush_failed(img);    /* before any L2 write: see there */
            return ret;
        }
        advance(&img->synced_data, data_snap);
    }
    if (io_snap != img->synced || cache_has_dirty(rcc) || refcount_has_pending(img->rc)) {
        ret = cache_flush(rcc);
        if (ret < 0)
            return ret;
        advance(&img->synced, io_snap);
    }
    cache_dependency_met(l2);

    /* 2. L2 tables; then the L1 entries that point at new tables. */
    if (tables) {
        ret = cache_write_dirty(l2);
        if (ret < 0)
            return ret;
        if (cluster_l1_dirty(img->cl)) {
            ret = io_flush(img->io);
            if (ret == 0)
                ret = cluster_flush_l1(img->cl);
            if (ret < 0)
                return ret;
        }
        ret = sync_io(img);
        if (ret < 0)
            return ret;
    }

    /* 3. The references are gone from disk: drop their refcounts. */
    if (refcount_has_deferred(img->rc)) {
        img->free_gen++;        /* reads in flight re-read (image_read_range) */
        ret = refcount_apply_deferred(img->rc, punch_freed, img);
        if (ret < 0)
            return ret;
        /* Decrements create no refcount blocks (step 1 linked them all):
         * the dirty blocks and a flush are all there is. */
        ret = cache_write_dirty(rcc);
        if (ret == 0)
            ret = sync_io(img);
    }
    return ret;
}

/*
 * When much guest data was written since the last flush, write it back
 * before taking the metadata lock: that is the long part of a flush, and
 * requests go on meanwhile; image_flush_locked() then syncs only what came after.
 * With little data one flush under the lock is cheaper than two.
 */
#define FLUSH_UNLOCKED_MIN (8u << 20)

/* Flush @io if at least FLUSH_UNLOCKED_MIN bytes changed since *@synced. */
static int flush_if_much_changed(struct io *io, _Atomic uint64_t *synced)
{
    uint64_t snap = io->changes;
    int ret;

    if (snap - *synced < FLUSH_UNLOCKED_MIN)
        return 0;
    ret = io_flush(io);
    if (ret == 0)
        advance(synced, snap);
    return ret;
}

static int flush_data_unlocked(struct image *img)
{
    int ret = 0;

    if (img->data_io)
        ret = flush_if_much_changed(img->data_io, &img->synced_data);
    if (ret == 0)
        ret = flush_if_much_changed(img->io, &img->synced);
    if (ret < 0)
        (void)image_flush_failed(img);
    return ret;
}

int image_flush(struct image *img)
{
    int ret;

    if (image_is_read_only(img))
        return 0;
    /* Sticky, and logged once already (io_flush_failed). */
    if (image_flush_failed(img))
        return -EIO;
    ret = flush_data_unlocked(img);
    /* The mutex alone: see struct image for why lookups may go on. */
    pthread_mutex_lock(&img->lock);
    if (ret == 0)
        ret = image_flush_locked(img);
    if (ret == 0)
        io_mark(img->io, IMAGE_MARK_FLUSHED, ++img->flush_seq);
    img->flushes++;
    pthread_mutex_unlock(&img->lock);
    if (ret < 0 && !image_flush_failed(img))
        log_error("%s: flushing metadata failed: %s", img->path, strerror(-ret));
    return ret;
}

