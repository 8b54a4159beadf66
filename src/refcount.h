/*
 * refcount — host cluster reference counts: reading and changing them
 * through the refcount-block cache, finding free clusters, and growing the
 * refcount structures (new self-describing refcount blocks, and a relocated,
 * larger refcount table) when the file outgrows them.
 *
 * Ordering: a new refcount block is written when it is created but linked
 * into the on-disk table only when the refcount cache is next flushed (its
 * flush hook): blocks flushed first, then the table entries in dependency
 * rounds.  So allocation never waits for a host flush, and as L2 tables
 * depend on the refcount cache, no reference into a new block's range
 * reaches the disk before the block is linked.  A new refcount table is
 * written and flushed before the header points at it, and the old table is
 * released only after that.  Increments are always safe to write early (a
 * crash leaks); callers must make decrements visible only after the
 * references they drop are gone from disk (refcount_defer_free, applied by
 * image_flush.c).
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

struct cache *refcount_cache(struct refcount *rc);

/* The refcount of the host cluster containing byte @offset. */
int refcount_get(struct refcount *rc, uint64_t offset, uint64_t *value);

/*
 * Add @delta to the refcount of every host cluster overlapping
 * [@offset, @offset + @len).
 * Returns: 0, -EIO on overflow/underflow (reported as corruption, the
 * value unchanged), -errno.
 */
int refcount_update(struct refcount *rc, uint64_t offset, uint64_t len, int delta);

/*
 * Allocate @nb contiguous free clusters, setting their refcount to 1.
 * On exit: *offset is the host offset of the first; *fresh is 1 when the
 * clusters lie at or beyond the end of the file as it was (they read as
 * zeros), 0 when they are reused and may hold stale data.
 * Returns: 0 or -errno.
 */
int refcount_alloc(struct refcount *rc, uint64_t nb, uint64_t *offset, int *fresh);

/*
 * Deferred decrement: the reference being dropped is still on disk, so the
 * decrement is queued and applied by refcount_apply_deferred() once the
 * caller has made the change that removes the reference durable.  Until
 * then the clusters stay allocated and cannot be handed out twice.
 */
int refcount_defer_free(struct refcount *rc, uint64_t offset, uint64_t len);
bool refcount_has_deferred(const struct refcount *rc);

/* New refcount blocks wait to be linked into the on-disk table (by the next
 * flush of the refcount cache). */
bool refcount_has_pending(const struct refcount *rc);
size_t refcount_nb_deferred(const struct refcount *rc);

/*
 * Apply every queued decrement (in the cache; written by the next flush of
 * the refcount cache).  Host ranges whose clusters reach refcount 0 are
 * reported to @freed (may be NULL), e.g. to release their space.
 * Returns: 0 or -errno; on error the failed ranges stay queued.
 */
typedef void refcount_freed_fn(void *opaque, uint64_t offset, uint64_t len);
int refcount_apply_deferred(struct refcount *rc, refcount_freed_fn *freed, void *opaque);

/* Tell the allocator that clusters from @offset on may be free again. */
void refcount_hint_free(struct refcount *rc, uint64_t offset);

/* One past the highest host cluster with a non-zero refcount known so far. */
uint64_t refcount_end(const struct refcount *rc);

#endif
