/*
 * refcount — host cluster reference counts: reading and changing them
 * through the refcount-block cache, finding free clusters, and growing the
 * refcount structures (new self-describing refcount blocks, and a relocated,
 * larger refcount table) when the file outgrows them.
 *
 * Ordering: the numbered invariants at the top of image_flush.c.  This
 * module keeps 3 (new blocks linked in holder order, by refcount_flush)
 * and 6 (a new refcount table durable before the header names it); it
 * queues decrements for 4 (refcount_defer_free, applied by image_flush.c)
 * and keeps the reservation of 1a and 8 (refcount_reserve).  So
 * allocation never waits for a host flush.
 *
 * Locking rule: call with the image's metadata lock held.
 */
#ifndef QCOW2FUSE_REFCOUNT_H
#define QCOW2FUSE_REFCOUNT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct meta;
struct cache;
struct refcount;

/* Entry @i of a refcount block of 2^@order-bit refcounts (the on-disk
 * layout: big endian, sub-byte widths from the least significant bit). */
uint64_t refcount_entry_get(unsigned order, const uint8_t *block, uint64_t i);
void refcount_entry_set(unsigned order, uint8_t *block, uint64_t i, uint64_t v);

/*
 * Load the refcount table.  @cache_bytes bounds the refcount-block cache.
 * Returns: 0, -EIO (corrupt table, reported) or -errno.
 */
int refcount_open(struct meta *m, uint64_t table_offset, uint32_t table_clusters,
                  uint64_t cache_bytes, struct refcount **out);
void refcount_close(struct refcount *rc);

/* The refcount-block cache, for unit tests: everything else goes through
 * the functions below, so that this module owns its cache. */
struct cache *refcount_cache(struct refcount *rc);

/*
 * Make every refcount change durable: write the dirty blocks, link new
 * blocks into the on-disk table (invariant 3: a host flush before each
 * round of links), then flush the host.
 * Returns: 0 or the first -errno (what failed stays dirty or pending, and
 *          the next flush retries).
 */
int refcount_flush(struct refcount *rc);

/* Write the dirty refcount blocks, no host flush and no linking.
 * On entry no new block is pending (refcount_flush linked them all).
 * Returns: 0 or the first -errno. */
int refcount_write_dirty(struct refcount *rc);
bool refcount_has_dirty(const struct refcount *rc);

/* Write-through mode of the block cache (see cache_set_writethrough). */
void refcount_set_writethrough(struct refcount *rc, bool on);

struct cache_stats;
void refcount_cache_stats(const struct refcount *rc, struct cache_stats *out);

/* The refcount of the host cluster containing byte @offset. */
int refcount_get(struct refcount *rc, uint64_t offset, uint64_t *value);

/*
 * Add @delta to the refcount of every host cluster overlapping
 * [@offset, @offset + @len).
 * Returns: 0, -EIO on overflow/underflow (reported as corruption, the
 * value unchanged), -errno.
 */
int refcount_update(struct refcount *rc, uint64_t offset, uint64_t len, int delta);

/* What refcount_alloc() says about the clusters it hands out (*fresh):
 * non-zero means they read as zeros. */
enum {
    REFCOUNT_REUSED = 0,        /* freed earlier: may hold stale data */
    REFCOUNT_FRESH = 1,         /* past the end of the file as it was */
    /* Fresh, inside the file, and taken from the durable reservation:
     * their refcount of 1 is on disk already (image_flush.c, invariant 1). */
    REFCOUNT_RESERVED = 2,
};

/*
 * Allocate @nb contiguous free clusters, setting their refcount to 1.
 * Freed space is used first; then the durable reservation, if it holds
 * @nb clusters; then fresh clusters past everything in use.
 * On exit: *offset is the host offset of the first; *fresh one of the
 * REFCOUNT_ values above.
 * Returns: 0 or -errno.
 */
int refcount_alloc(struct refcount *rc, uint64_t nb, uint64_t *offset, int *fresh);

/*
 * The reservation: clusters at the allocation frontier whose refcount is
 * raised ahead of time, so that once that is durable the allocations taken
 * from it need no refcount flush before their L2 entries (image_flush.c,
 * invariants 1 and 2).  A crash leaks what is left of it (at most
 * 8 MiB); a clean close gives it back.
 *
 * refcount_reserve tops it up when allocations at the frontier took from
 * it (or missed it) since the last top-up and less than half of its target
 * is left: a run past everything in use has its refcounts raised in the
 * cache (staged) and the file is extended to cover it.  It becomes usable
 * at refcount_host_flushed.
 * Returns: 0 or -errno; on error nothing is staged (new refcount blocks
 * the run needed may stay, linked by the next flush) and the caller may go
 * on: no allocation depends on it.
 */
int refcount_reserve(struct refcount *rc);

/*
 * A host flush completed after every dirty block was written (the caller
 * says so; nothing is checked but that no block is dirty and no new block
 * waits to be linked): the staged run is durable and joins the reservation.
 */
void refcount_host_flushed(struct refcount *rc);

/* Clusters reserved, durable and staged: what a crash now would leak. */
uint64_t refcount_reserved(const struct refcount *rc);

/*
 * Give back what is left of the reservation (clean close): drop its
 * refcounts, flush, and cut the file back to where the reservation began
 * when nothing after that is in use.
 * On entry every reference the image holds is durable (image_flush).
 * Returns: 0 or -errno (a leak at worst).
 */
int refcount_release_reservation(struct refcount *rc);

/*
 * Deferred decrement: the reference being dropped is still on disk, so the
 * decrement is queued and applied by refcount_apply_deferred() once the
 * caller has made the change that removes the reference durable.  Until
 * then the clusters stay allocated and cannot be handed out twice.
 */
int refcount_defer_free(struct refcount *rc, uint64_t offset, uint64_t len);
bool refcount_has_deferred(const struct refcount *rc);

/* New refcount blocks wait to be linked into the on-disk table (by the next
 * refcount_flush, or the flush an evicted L2 slice needs). */
bool refcount_has_pending(const struct refcount *rc);
size_t refcount_nb_deferred(const struct refcount *rc);

/*
 * Apply every queued decrement (in the cache; written by the caller's next
 * refcount_write_dirty or refcount_flush).
 * On entry: the changes that drop the queued references are durable
 *           (image_flush.c, invariant 4).
 * On exit:  host ranges whose clusters reached refcount 0 were reported to
 *           @freed (may be NULL) during this call, e.g. to release their
 *           space; nothing keeps @freed afterwards.
 * Returns: 0 or -errno; on error the failed ranges stay queued.
 */
typedef void refcount_freed_fn(void *opaque, uint64_t offset, uint64_t len);
int refcount_apply_deferred(struct refcount *rc, refcount_freed_fn *freed, void *opaque);

/* Tell the allocator that clusters from @offset on may be free again. */
void refcount_hint_free(struct refcount *rc, uint64_t offset);

/* One past the highest host cluster with a non-zero refcount known so far. */
uint64_t refcount_end(const struct refcount *rc);

#endif
