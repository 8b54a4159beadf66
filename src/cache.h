/*
 * cache — a writeback cache of fixed-size metadata tables (L2 table slices,
 * refcount blocks), modelled on QEMU's qcow2 table cache.
 *
 *   cache_get()        table at a host offset, read from disk on a miss
 *   cache_get_empty()  table for a freshly allocated cluster: no read
 *   cache_put()        give the reference back
 *   cache_mark_dirty() the table changed; it is written back later
 *   cache_flush()      write every dirty table (dependencies first), run
 *                      the flush hook, then flush the host file
 *   cache_set_dependency(c, d)  before any table of c is written, d is
 *                      flushed (cache_flush: its dirty tables, its flush
 *                      hook, a host flush).  No chains: another dependency
 *                      of c, or one of d, is flushed at once; an error of
 *                      that flush is returned and the old dependency kept
 *   cache_depends_on_flush(c)   before any table of c is written, the host
 *                      file is flushed (guest data before the L2 entry that
 *                      makes it visible)
 *   cache_set_data_io(c, d)     guest data lives in d (an external data
 *                      file): the flush that depends_on_flush asks for is
 *                      a flush of d, also when a table is evicted
 *
 *   cache_peek()       table at a host offset if cached, for readers that
 *                      share the lock (no reference, no read, no change)
 *
 * Entries carry a reference count; an entry with references is never
 * evicted.  Lookup is a hash on the host offset; replacement is LRU over the
 * unreferenced entries, with a second chance for entries that cache_peek
 * found since they were last put (a peek cannot move an entry in the list).
 * Table memory is allocated on first use, so a large configured cache costs
 * nothing until it fills.
 *
 * Locking rule: a cache has no lock of its own.  The owner has a lock that
 * can be held shared or exclusively: cache_peek needs it held at least
 * shared; every other call needs it held exclusively.
 */
#ifndef QCOW2FUSE_CACHE_H
#define QCOW2FUSE_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct io;
struct cache;

struct cache_stats {
    uint64_t hits, misses, writes, evictions;
};

/*
 * Create a cache of @nb_entries tables of @table_size bytes on @io.
 * @name appears in log messages ("L2", "refcount").
 * Returns NULL on allocation failure.
 */
struct cache *cache_create(struct io *io, const char *name, size_t table_size,
                           unsigned nb_entries);

/* Free the cache.  Dirty entries are dropped: flush first. */
void cache_destroy(struct cache *c);

/*
 * On entry: @offset is a multiple of the table size.
 * On exit:  *table points at the cached table, with one more reference.
 *           get_empty zeroes the table and forgets any cached copy of that
 *           offset (it belonged to a freed table).
 * Returns:  0, or -errno (read error, or every entry is referenced;
 *           get_empty: -EBUSY when the offset is still referenced).
 */
int cache_get(struct cache *c, uint64_t offset, void **table);
int cache_get_empty(struct cache *c, uint64_t offset, void **table);

/*
 * On entry: @offset is a multiple of the table size; the owner's lock is
 *           held shared (or exclusively).
 * On exit:  on a hit, *table points at the cached table, which stays valid
 *           and unchanged until that lock is released.  No reference is
 *           taken; the entry gets a second chance at replacement.
 * Returns:  0, or -ENOENT when the table is not cached: take the lock
 *           exclusively and use cache_get.
 */
int cache_peek(struct cache *c, uint64_t offset, const void **table);

/* Drop the reference taken by get; *table is set to NULL. */
void cache_put(struct cache *c, void **table);

void cache_mark_dirty(struct cache *c, void *table);

/* The host offset a table pointer belongs to. */
uint64_t cache_offset_of(struct cache *c, const void *table);

/*
 * Write every dirty table (after satisfying the dependency), then flush the
 * host file.  A table whose write fails stays dirty.
 * Returns: 0 or the first -errno.
 */
int cache_flush(struct cache *c);

/* As cache_flush, but without the final host flush. */
int cache_write_dirty(struct cache *c);

/*
 * The write orderings of image_flush.c (invariants 1, 2 and 3) as seen from
 * one cache: they hold also when a table leaves by eviction, where no
 * caller is there to order the writes.
 * cache_set_dependency: On exit @c depends on @dependency.  Returns 0, or
 * the -errno of settling an earlier dependency (of @c on another cache, or
 * of @dependency itself); nothing is changed then.
 */
int cache_set_dependency(struct cache *c, struct cache *dependency);
void cache_depends_on_flush(struct cache *c);

/*
 * Guest data that this cache's tables make visible lives in @data_io, not in
 * the cache's own file (an external data file; NULL: the own file).  From
 * then on the flush required by cache_depends_on_flush() flushes @data_io
 * before the table write, whether the table leaves by cache_flush() or by
 * eviction; the dependency cache, if any, is still flushed as well.
 */
void cache_set_data_io(struct cache *c, struct io *data_io);

/* The caller has itself written the dependency and flushed the host: clear
 * both requirements so the next table write does not repeat them. */
void cache_dependency_met(struct cache *c);

/* Whether a table write of @c must first flush its dependency or the host
 * (cache_set_dependency, cache_depends_on_flush, not met yet). */
bool cache_has_dependency(const struct cache *c);

/* Forget the table at @offset (its cluster was freed): no write-back.
 * On entry the entry must not be referenced. */
void cache_discard(struct cache *c, uint64_t offset);

bool cache_has_dirty(const struct cache *c);

/* Write-through mode: a dirty table is written when its last reference is
 * put.  For debugging ordering problems; slow. */
void cache_set_writethrough(struct cache *c, bool on);

/*
 * Called before every table write with the host range about to be written;
 * a non-zero return cancels the write and is returned (the overlap check).
 */
typedef int cache_write_check_fn(void *opaque, uint64_t offset, size_t len);
void cache_set_write_check(struct cache *c, cache_write_check_fn *fn, void *opaque);

/*
 * Called by cache_flush() after the dirty tables are written and before the
 * final host flush; it may write and flush on its own.  The refcount module
 * uses it to link new refcount blocks into the table (the table itself is
 * not cached) when a dependent L2 slice is evicted (image_flush.c,
 * invariant 3: the one up-call left); its own flushes link them by an
 * explicit call.
 * Returns 0 or -errno (returned by cache_flush).
 */
typedef int cache_flush_hook_fn(void *opaque);
void cache_set_flush_hook(struct cache *c, cache_flush_hook_fn *fn, void *opaque);

void cache_get_stats(const struct cache *c, struct cache_stats *out);
unsigned cache_nb_entries(const struct cache *c);
size_t cache_table_size(const struct cache *c);

#endif
