/*
 * cluster — guest-to-host translation through the L1 table and the L2 table
 * cache, and (for writes) the changes to those tables.  A lookup returns the
 * longest run of guest bytes that share a kind and, for data, a contiguous
 * host range, so the caller issues one host I/O per run.
 *
 * L2 tables are cached in slices of up to 4 KiB, so a small cache serves
 * random I/O over a large disk.
 *
 * Locking rule: every function must be called with the image's metadata
 * lock held exclusively, except cluster_lookup_shared, which needs it held
 * at least shared.  The returned run is a snapshot: after the lock is
 * dropped it may be used for I/O only as image_impl.h's rules allow (the guest
 * range held, or the free generation checked after the I/O).
 */
#ifndef QCOW2FUSE_CLUSTER_H
#define QCOW2FUSE_CLUSTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct meta;
struct cache;
struct cluster;

enum cluster_kind {
    CLUSTER_UNALLOCATED,        /* read from backing file, or zeros */
    CLUSTER_ZERO,               /* reads as zeros, never from backing */
    CLUSTER_DATA,               /* at host_offset in the data file */
    CLUSTER_COMPRESSED,         /* one whole cluster, see l2_entry */
};

struct cluster_run {
    enum cluster_kind kind;
    uint64_t host_offset;       /* DATA: host offset of the run's first byte */
    uint64_t bytes;             /* run length from the looked-up offset */
    uint64_t l2_entry;          /* COMPRESSED: the raw descriptor */
};

/* ---- cluster arithmetic ---------------------------------------------------- */

/* @cs: the cluster size, a power of two. */
static inline uint64_t cluster_offset_in(uint64_t offset, uint64_t cs)
{
    return offset & (cs - 1);
}

static inline uint64_t cluster_align_down(uint64_t offset, uint64_t cs)
{
    return offset & ~(cs - 1);
}

static inline uint64_t cluster_align_up(uint64_t offset, uint64_t cs)
{
    return (offset + cs - 1) & ~(cs - 1);
}

/* The extended-L2 bitmap bits of subclusters @first..@last (<= 31). */
static inline uint32_t cluster_subcluster_mask(unsigned first, unsigned last)
{
    uint32_t upto = last >= 31 ? 0xffffffffu : (1u << (last + 1)) - 1;

    return upto & ~((1u << first) - 1);
}

/* All subclusters of a cluster: the whole bitmap half. */
#define CLUSTER_ALL_SUBCLUSTERS 0xffffffffu

/*
 * Decode one L2 entry (and, with extended L2, its bitmap) for subcluster
 * @sc (0 without extended L2).  Pure: used by lookups and unit tests.
 * On exit: *kind and *host (host offset of the cluster, not the subcluster).
 * Returns: 0, or -EINVAL with a reason in @why (reserved bits, misaligned
 * offset, contradictory bitmap).
 */
int cluster_decode_entry(const struct meta *m, uint64_t entry, uint64_t bitmap,
                         unsigned sc, enum cluster_kind *kind, uint64_t *host,
                         const char **why);

/*
 * Where the compressed L2 entry @entry (COMPRESSED set) keeps its data.
 * On exit: *host is its first byte, *len the bytes from there to the end
 *          of its last 512-byte sector (what a read takes; the file may end
 *          sooner); if @sectors_host is not NULL, *sectors_host and
 *          *sectors_len are the whole sectors it occupies (what its
 *          refcounts count, and a replacement frees).
 * Returns: 0, or -EINVAL when the offset lies beyond 2^56.
 */
int cluster_compressed_extent(const struct meta *m, uint64_t entry, uint64_t *host,
                              uint64_t *len, uint64_t *sectors_host,
                              uint64_t *sectors_len);

/*
 * Open the translation for the active L1 table.
 * @l2_cache_bytes bounds the L2 cache (at least 16 slices are kept).
 * On entry: @m->data_io is set (the image file, or an external data file).
 * Returns: 0 or -errno (read error; -EIO after meta_corrupt for a bad L1).
 */
int cluster_open(struct meta *m, uint64_t l1_offset, uint32_t l1_size,
                 uint64_t l2_cache_bytes, struct cluster **out);
void cluster_close(struct cluster *cl);

/*
 * A read-only translation through another L1 table (a snapshot's:
 * @l1_size entries at @l1_offset, bounds checked by the caller) that
 * shares @base's L2 cache, so it is looked up under @base's metadata lock
 * (the locking rule above, for @base's image).  @m is the view's own
 * geometry: corruption it finds is reported through it.  The write side is
 * never enabled on it.
 * On exit: close *out (cluster_close) before @base.
 * Returns: 0 or -errno (the L1 read failed, logged).
 */
int cluster_open_view(struct cluster *base, struct meta *m, uint64_t l1_offset,
                      uint32_t l1_size, struct cluster **out);

/*
 * Translate guest bytes [@offset, @offset + @max_bytes).
 * On entry: @offset < virtual size, @max_bytes > 0.
 * On exit:  *run describes 1..@max_bytes bytes starting at @offset.
 * Returns:  0, -EIO for corrupt metadata (reported once), or -errno.
 */
int cluster_lookup(struct cluster *cl, uint64_t offset, uint64_t max_bytes,
                   struct cluster_run *run);

/*
 * As cluster_lookup, for a caller that holds the metadata lock only shared
 * (see cache_peek): it uses cached L2 slices and changes nothing.
 * Returns: 0, or -EAGAIN when the lookup needs the lock held exclusively
 *          (the slice is not cached, or an entry looks corrupt and must be
 *          reported): call cluster_lookup then.
 */
int cluster_lookup_shared(struct cluster *cl, uint64_t offset, uint64_t max_bytes,
                          struct cluster_run *run);

/* The L2 cache, for unit tests: everything else goes through the functions
 * below, so that this module owns its cache. */
struct cache *cluster_l2_cache(struct cluster *cl);

/* Dirty L2 slices wait to be written. */
bool cluster_l2_dirty(const struct cluster *cl);

/*
 * The caller has made the refcounts and the guest data durable (invariants
 * 1 and 2 of image_flush.c: refcount_flush, and a flush of the data file):
 * the next L2 write needs no flush of its own.
 */
void cluster_refcounts_durable(struct cluster *cl);

/* Whether an L2 entry set with @new_data (cluster_set_entry) since the
 * last cluster_refcounts_durable waits for a host flush. */
bool cluster_l2_waits_for_flush(const struct cluster *cl);

/* Write the dirty L2 slices (no host flush).  Returns: 0 or the first
 * -errno; a slice whose write failed stays dirty. */
int cluster_write_l2(struct cluster *cl);

/* Write-through mode of the L2 cache (see cache_set_writethrough). */
void cluster_set_writethrough(struct cluster *cl, bool on);

struct cache_stats;
void cluster_cache_stats(const struct cluster *cl, struct cache_stats *out);

/* ---- write side (writable images only) ------------------------------------ */

struct refcount;

/* Enable the write side: allocations go through @rc; the active L1 and L2
 * tables are registered for the overlap check. */
int cluster_set_refcount(struct cluster *cl, struct refcount *rc);

/*
 * Register the L2 tables named by a snapshot's L1 table (@l1_size entries
 * at @l1_offset) as META_KIND_SNAPSHOT_L2 for the overlap check, so that
 * no guest data or new table is ever written over one.  Entries that
 * cannot name a table (reserved bits, unaligned, past the end of the file)
 * are skipped: a read through them is refused anyway, and no write goes
 * there.  Call on a writable image before cluster_set_refcount.
 * Returns: 0, -EIO when a table overlaps other metadata (meta_mark reports
 *          it), or -errno.
 */
int cluster_mark_snapshot_l2(struct meta *m, uint64_t l1_offset, uint32_t l1_size);

/*
 * The raw L2 entry (and extended-L2 bitmap, else 0) of guest cluster @gc;
 * both 0 when its L2 table is unallocated.
 */
int cluster_get_entry(struct cluster *cl, uint64_t gc, uint64_t *entry,
                      uint64_t *bitmap);

/*
 * Validate the L2 entry (@entry, @bitmap) of guest cluster @gc before it is
 * replaced (by a write, a zeroing or a discard) and its host space freed or
 * reused: it must decode (no reserved bits, aligned and inside the file, a
 * compressed descriptor that decodes), and the host space it names must hold
 * no metadata (the header, an L1 or L2 table, the refcount table or a block,
 * snapshot tables), which a free would hand out again, and must be in use
 * (refcount above 0; checked once the write side is enabled).
 * On exit: *host and *len are the host bytes the entry holds in the image
 *          file: its whole cluster, or the sectors of its compressed data;
 *          both 0 when it holds none (unallocated, a zero cluster without an
 *          offset, data in an external data file).
 * Returns: 0, or -EIO after meta_corrupt() (free nothing then).
 */
int cluster_check_old_entry(struct cluster *cl, uint64_t gc, uint64_t entry,
                            uint64_t bitmap, uint64_t *host, uint64_t *len);

/* An L2 entry decoded once (for subcluster 0), so that a caller who looks
 * at it before replacing it validates what it decoded, not a new decoding. */
struct cluster_entry {
    uint64_t entry, bitmap;     /* as found */
    int ret;                    /* cluster_decode_entry()'s result */
    enum cluster_kind kind;
    uint64_t host;
    const char *why;            /* the reason, when ret < 0 */
};

void cluster_entry_decode(const struct meta *m, uint64_t entry, uint64_t bitmap,
                          struct cluster_entry *e);

/* cluster_check_old_entry() of an entry decoded by cluster_entry_decode(). */
int cluster_check_decoded(struct cluster *cl, uint64_t gc, const struct cluster_entry *e,
                          uint64_t *host, uint64_t *len);

/*
 * Make the L2 table of guest cluster @gc exclusively ours: use it as it is
 * when its L1 entry has COPIED (or its refcount is 1: COPIED is then set),
 * allocate it if unallocated (written as zeros at once), or copy it if
 * shared with a snapshot (the old table's reference is dropped through a
 * deferred free).
 * On exit: the L1 entry has COPIED set; the L1 change is written by
 * cluster_flush_l1().
 * Returns: 0, -EIO after meta_corrupt (@gc beyond the L1 table, a bad L1
 *          entry, a table with refcount 0, an overlap), or -errno (a new
 *          table that could not be written is given back at once).
 */
int cluster_prepare_l2(struct cluster *cl, uint64_t gc);

/*
 * Set the L2 entry of guest cluster @gc.
 * On entry: cluster_prepare_l2(@gc) succeeded under the same lock hold or
 *           earlier (tables never become shared again while mounted).
 * On exit:  the slice is dirty; if @new_data, the L2 cache now depends on
 *           the refcount cache and on a host flush (invariants 1 and 2 of
 *           image_flush.c).  A caller passes @new_data false for a change
 *           that references no new host data, or for data in a reserved
 *           cluster that may reach the disk under the same flush as the
 *           entry (invariant 2's exception).
 * Returns:  0, or -errno of getting the slice (its read, or the write of
 *           the table evicted for it) or of settling an earlier dependency
 *           (the entry is unchanged then).
 */
int cluster_set_entry(struct cluster *cl, uint64_t gc, uint64_t entry,
                      uint64_t bitmap, bool new_data);

/*
 * Grow the active L1 table to @new_size entries: a new table is written
 * elsewhere and flushed, then the header's l1_size/l1_table_offset are
 * switched (flushed), then the old table's clusters are released.
 * On entry: the L1 table has no dirty entries (flush first).
 * Returns: 0, -EFBIG (beyond the L1 size limit), or -errno: up to the
 *          header's switch the old table stays in use; if that write or
 *          its flush fails, both tables stay allocated (a leak at worst).
 */
int cluster_grow_l1(struct cluster *cl, uint32_t new_size);
uint32_t cluster_l1_size(const struct cluster *cl);

/* Write the dirty parts of the L1 table (no host flush). */
int cluster_flush_l1(struct cluster *cl);
bool cluster_l1_dirty(const struct cluster *cl);

#endif
