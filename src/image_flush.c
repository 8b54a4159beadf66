/*
 * image_flush — making what was written durable, in the order that keeps
 * the image consistent after a crash at any point.  This is the one place
 * where the write ordering is written down; other modules refer to these
 * invariants by number.  A crash under them can leave a leak (a refcount
 * without a reference: harmless, repaired by a check), never a reference
 * with refcount 0, never an L2 entry that shows stale host data.
 *
 * 1. Refcounts before references.  A refcount increment is durable before
 *    the L2 entry, L1 entry, table or header field that uses the cluster
 *    reaches the disk: a host flush lies between.  Two ways:
 *    a. Ahead of time, by the reservation (refcount.c): step 0 of
 *       image_flush_locked (refcount_reserve) raises the refcounts of a
 *       bounded run at the allocation frontier, step 2 writes them, and
 *       only the host flush after that write makes the run usable
 *       (refcount_host_flushed).  refcount_alloc hands out only that
 *       durable part (REFCOUNT_RESERVED), so an L2 entry that points at a
 *       reserved cluster can reach the disk, in the next flush or by
 *       eviction, only after its refcount was flushed.
 *    b. Otherwise by step 1 (refcount_flush before step 2), for every
 *       allocation outside the durable reservation.  cluster_set_entry
 *       with new_data records that the L2 cache waits (its dependency on
 *       the refcount cache, and on a flush); step 1 runs whenever it does
 *       (cluster_l2_waits_for_flush).  For an L2 slice that leaves the
 *       cache by eviction, inside a cache_get in the middle of a write
 *       where no caller can order it, the same dependency makes the cache
 *       flush the refcounts first (cache.c flush_dependency, recorded by
 *       cluster_set_refcount and cluster_set_entry): this, with 2 and 3,
 *       is the only ordering the cache keeps by itself.
 *    Increments nothing waits for (the staged reservation, new tables
 *    named only after their own flush by 5 and 6) are written in step 2
 *    without a flush of their own: early refcounts only leak.
 * 2. Guest data before the L2 entry that makes it visible, with a flush of
 *    the file that holds the data (the image, or its external data file)
 *    between.  Kept by step 1 (the image flush of 1b, and the data file's
 *    flush whenever it changed); on eviction by cache_depends_on_flush
 *    (cluster_set_entry for new data) and cache_set_data_io (cluster_open).
 *    One exception, the design notes': data in a reserved cluster whose
 *    guest cluster read as zeros everywhere before the write (no data, and
 *    zero flags or no backing file; image_write.c entry_needs_no_flush).
 *    Such a cluster lies inside the file (refcount_reserve extended it,
 *    durably with the reservation) and was never written, so after a
 *    crash every sector of it shows the new data or zeros: the old
 *    content.  Its data and its L2 entry go out under the one flush of
 *    step 2: the entry is set with new_data false and makes nothing wait.
 *    Reused clusters (stale bytes), copy-on-write from a backing file or
 *    of compressed or shared clusters (old content not zeros) and clusters
 *    outside the reservation (perhaps past the durable end of the file)
 *    keep the flush.  So an fsync after allocating appends costs the data
 *    and L2 writes and one host flush.
 * 3. New refcount blocks linked in holder order.  A new block's entry in
 *    the refcount table is written only after the block is durable and
 *    after the block that holds the new block's own refcount is linked,
 *    with a host flush before each round of entries.  Kept by refcount.c
 *    link_pending, called by refcount_flush (step 1, cluster_grow_l1, the
 *    refcount table's growth).  When an evicted L2 slice flushes the
 *    refcount cache (1), the cache runs it through its flush hook: the one
 *    up-call left, as the eviction happens inside the cache.
 * 4. Frees only after the dropping change is durable.  A reference that is
 *    still on disk is dropped through refcount_defer_free (cluster_prepare_l2
 *    for a copied L2 table; image_write.c commit_plan and image_zero.c for
 *    replaced clusters), and the queue is applied (refcount_apply_deferred)
 *    only in step 3, after step 2's host flush made the L2 and L1 entries
 *    that no longer name the clusters durable; free_gen is bumped first so
 *    reads in flight read again (image_read_range).  Old tables replaced by
 *    6 are released only after the header that stops naming them is
 *    flushed.
 * 5. An L2 table before the L1 entry that points at it, with a host flush
 *    between.  Kept by cluster_prepare_l2 (a new or copied table is written
 *    at once) and image_flush_locked (step 2 flushes before
 *    cluster_flush_l1).
 * 6. New tables before the header that names them.  A grown L1 table
 *    (cluster_grow_l1) or a relocated refcount table (refcount.c
 *    grow_table) is written and flushed with the refcounts (refcount_flush)
 *    before the header switch, and the switch is flushed before the old
 *    table's clusters are released.
 * 7. Errors are never dropped.  A table whose write fails stays dirty
 *    (cache.c entry_write), a link that fails stays pending (link_pending),
 *    a decrement that fails stays queued (refcount_apply_deferred); settling
 *    an earlier dependency returns its error and keeps it
 *    (cache_set_dependency); each step below returns its first error.  A
 *    failed host flush is sticky: the io refuses every later write and
 *    flush (io_flush_failed), the image takes none (image_flush_failed),
 *    and the cache evicts only clean tables, as the dirty ones hold the only
 *    copy of what reads must see (cache.c take_entry).  A reservation that
 *    cannot be made (step 0) is no error: nothing depends on it, and the
 *    allocations that miss it fall back to 1b.
 * 8. The reservation costs at most itself.  Its clusters have refcount 1
 *    and no reference, so a crash leaks at most what is left of it
 *    (bounded: refcount.c RESERVE_MAX_BYTES, 8 MiB), never more: check
 *    reports leaks, no corruption.  Each reserved cluster is handed out
 *    once: the allocator's free search skips it (its refcount is 1) and
 *    the reservation's next cluster only moves up; a cluster given back
 *    after a failed write is free space like any other, no longer fresh.
 *    A clean close (image_close, after the final flush made every
 *    reference durable) drops the rest of it, flushes, and cuts the file
 *    back when nothing after it is in use
 *    (refcount_release_reservation): no leak.
 * 9. The backing file goes only after what was copied from it is durable.
 *    Streaming (image_fill.c) fills the image through the write path (1, 2,
 *    5 hold for it as for guest writes); image_drop_backing then flushes
 *    (image_flush_quiet: data, refcounts, L2 and L1 tables), clears the
 *    header's backing file name, flushes, drops the backing format
 *    extension, flushes.  A crash anywhere leaves a header that either
 *    still names the chain (its content unchanged) or stands alone over a
 *    disk that is all local.
 */
#include "image_impl.h"

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

/* After a host flush that followed the write of every dirty refcount
 * block: the staged reservation is durable. */
static int sync_io_refcounts(struct image *img)
{
    int ret = sync_io(img);

    if (ret == 0)
        refcount_host_flushed(img->rc);
    return ret;
}

int image_flush_locked(struct image *img)
{
    bool tables, ordered;
    int ret = 0;
    uint64_t io_snap, data_snap;

    /* 0. Top the reservation up: its refcounts go out with this flush and
     *    serve the allocations after it (invariant 1).  Optional: an
     *    allocation that finds none raises refcounts itself. */
    ret = refcount_reserve(img->rc);
    if (ret < 0)
        log_debug("%s: no cluster reservation: %s", img->path, strerror(-ret));
    ret = 0;
    tables = cluster_l2_dirty(img->cl) || cluster_l1_dirty(img->cl);
    io_snap = img->io->changes;
    data_snap = img->data_io ? img->data_io->changes : 0;

    /* 1. Guest data, refcount increments and links of new refcount
     *    blocks, then a host flush (invariants 1, 2, 3), when a dirty L2
     *    entry waits for them or a new block must be linked; skipped when
     *    nothing was written since the last one (writes counted before a
     *    snapshot have completed, so the flush after it covers them).  The
     *    external data file is flushed here whenever it changed. */
    if (img->data_io && data_snap != img->synced_data) {
        ret = io_flush(img->data_io);
        if (ret < 0) {
            (void)image_flush_failed(img);    /* before any L2 write: see there */
            return ret;
        }
        advance(&img->synced_data, data_snap);
    }
    ordered = cluster_l2_waits_for_flush(img->cl) || refcount_has_pending(img->rc);
    if (ordered && (io_snap != img->synced || refcount_has_dirty(img->rc) ||
                    refcount_has_pending(img->rc))) {
        ret = refcount_flush(img->rc);
        if (ret < 0)
            return ret;
        advance(&img->synced, io_snap);
    }
    cluster_refcounts_durable(img->cl);         /* flushed, or nothing waits */

    /* 2. Refcount blocks nothing waits for (the staged reservation, the
     *    increments of new tables, give-backs), the L2 tables, then the L1
     *    entries that point at new tables (invariant 5), and the one host
     *    flush that makes all of it and the guest data durable. */
    if (refcount_has_dirty(img->rc)) {
        ret = refcount_write_dirty(img->rc);
        if (ret < 0)
            return ret;
    }
    if (tables) {
        ret = cluster_write_l2(img->cl);
        if (ret < 0)
            return ret;
        if (cluster_l1_dirty(img->cl)) {
            ret = io_flush(img->io);
            if (ret == 0)
                ret = cluster_flush_l1(img->cl);
            if (ret < 0)
                return ret;
        }
    }
    if (img->io->changes != img->synced) {
        ret = sync_io_refcounts(img);
        if (ret < 0)
            return ret;
    }

    /* 3. The references are gone from disk: drop their refcounts
     *    (invariant 4). */
    if (refcount_has_deferred(img->rc)) {
        img->free_gen++;        /* reads in flight re-read (image_read_range) */
        ret = refcount_apply_deferred(img->rc, punch_freed, img);
        if (ret < 0)
            return ret;
        /* Decrements create no refcount blocks (step 1 linked them all):
         * the dirty blocks and a flush are all there is. */
        ret = refcount_write_dirty(img->rc);
        if (ret == 0)
            ret = sync_io_refcounts(img);
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

static int flush_image(struct image *img, bool mark);

int image_flush(struct image *img)
{
    int ret;

    guest_begin(img);
    ret = flush_image(img, true);
    guest_end(img);
    return ret;
}

int image_flush_quiet(struct image *img)
{
    return flush_image(img, false);
}

/* The flush; @mark: record the trace mark of a guest flush. */
static int flush_image(struct image *img, bool mark)
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
    if (ret == 0 && mark)
        io_mark(img->io, IMAGE_MARK_FLUSHED, ++img->flush_seq);
    img->flushes++;
    pthread_mutex_unlock(&img->lock);
    if (ret < 0 && !image_flush_failed(img))
        log_error("%s: flushing metadata failed: %s", img->path, strerror(-ret));
    return ret;
}

