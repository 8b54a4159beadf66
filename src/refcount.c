/*
 * refcount — reference counts of host clusters, allocation, and growth of the
 * refcount structures.
 */
#include "refcount.h"

#include "cache.h"
#include "header.h"
#include "io.h"
#include "log.h"
#include "meta.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct refcount {
    struct meta *m;
    uint64_t *table;            /* host byte order */
    uint64_t table_entries;
    uint64_t table_offset;
    uint32_t table_clusters;
    struct cache *cache;
    uint64_t block_entries;     /* refcounts per block */
    uint64_t max_refcount;
    uint64_t free_hint;         /* cluster index: no free cluster below */
    uint64_t file_end;          /* bytes: clusters from here on read as zero */
    uint64_t used_end;          /* cluster index past the last one in use */
    struct { uint64_t offset, len; } *deferred;
    size_t nb_deferred, cap_deferred;
    uint64_t *pending;          /* table indices of new blocks not linked on disk */
    size_t nb_pending, cap_pending;
    /*
     * The reservation (cluster indices): clusters at the allocation
     * frontier whose refcount is 1 with no reference, so that allocations
     * taken from it need no refcount flush (image_flush.c, invariant 1).
     * [res_next, res_end) is durable and handed out from res_next up;
     * [stg_start, stg_end) is staged: raised in the cache, durable only
     * after a host flush that follows the write of every dirty block
     * (refcount_host_flushed).  Both lie past everything written before
     * they were taken, inside the file (extended to cover them), so they
     * read as zeros until handed out.
     */
    uint64_t res_next, res_end, stg_start, stg_end;
    uint64_t res_target;        /* clusters a top-up fills the reservation to */
    uint64_t res_taken;         /* clusters handed out from it since the last top-up */
    uint64_t res_missed;        /* ... and taken fresh past it (it was too small) */
    bool res_disabled;          /* the file cannot be extended: no reservations */
};

static int link_pending(struct refcount *rc);
static int link_pending_hook(void *opaque);

/* ---- refcount block entry access ----------------------------------------- */

uint64_t refcount_entry_get(unsigned order, const uint8_t *b, uint64_t i)
{
    switch (order) {
    case 0: case 1: case 2: {
        unsigned bits = 1u << order;
        uint64_t bit = i * bits;
        return (b[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
    }
    case 3: return b[i];
    case 4: return be16_get(b + 2 * i);
    case 5: return be32_get(b + 4 * i);
    default: return be64_get(b + 8 * i);
    }
}

void refcount_entry_set(unsigned order, uint8_t *b, uint64_t i, uint64_t v)
{
    switch (order) {
    case 0: case 1: case 2: {
        unsigned bits = 1u << order;
        uint64_t bit = i * bits;
        uint8_t mask = (uint8_t)(((1u << bits) - 1) << (bit % 8));
        b[bit / 8] = (uint8_t)((b[bit / 8] & ~mask) | ((v << (bit % 8)) & mask));
        break;
    }
    case 3: b[i] = (uint8_t)v; break;
    case 4: be16_put(b + 2 * i, (uint16_t)v); break;
    case 5: be32_put(b + 4 * i, (uint32_t)v); break;
    default: be64_put(b + 8 * i, v); break;
    }
}

static uint64_t block_get(const struct refcount *rc, const uint8_t *b, uint64_t i)
{
    return refcount_entry_get(rc->m->refcount_order, b, i);
}

static void block_set(const struct refcount *rc, uint8_t *b, uint64_t i, uint64_t v)
{
    refcount_entry_set(rc->m->refcount_order, b, i, v);
}

/* ---- open/close ------------------------------------------------------------ */

/* What a crash can leave counted past the end of the file: the allocations
 * in flight, whose data had not reached the file.  At most 16 requests run
 * at once (the worker threads), of up to 1 MiB each: 16 MiB, i.e. 32768
 * clusters of 512 bytes; and a staged reservation whose extension of the
 * file had not reached the disk (RESERVE_MAX_BYTES, 8 MiB).  Allowed: more
 * than twice that in bytes, and never less than 8192 clusters (16 GiB of
 * 2 MiB clusters). */
#define REFCOUNT_SLACK_BYTES        (64ull << 20)
#define REFCOUNT_SLACK_MIN_CLUSTERS 8192u

static uint64_t slack_past_end(const struct meta *m)
{
    uint64_t n = REFCOUNT_SLACK_BYTES >> m->cluster_bits;

    return n > REFCOUNT_SLACK_MIN_CLUSTERS ? n : REFCOUNT_SLACK_MIN_CLUSTERS;
}

/*
 * A refcount block that counts clusters far past the end of the file is not
 * a refcount block (a damaged table entry pointing at data, say): trusting
 * it would send allocations gigabytes past the end.  Only the blocks that
 * cover the end of the file are read.
 */
static int check_blocks_past_end(struct refcount *rc)
{
    struct meta *m = rc->m;
    uint64_t limit = (rc->file_end >> m->cluster_bits) + slack_past_end(m);
    uint8_t *buf = NULL;
    int ret = 0;

    for (uint64_t ti = limit / rc->block_entries; ti < rc->table_entries; ti++) {
        if (!rc->table[ti])
            continue;
        if (!buf && !(buf = malloc(m->cluster_size)))
            return -ENOMEM;
        ret = io_pread(m->io, buf, m->cluster_size, rc->table[ti]);
        if (ret < 0)
            break;
        for (uint64_t i = 0; i < rc->block_entries; i++) {
            uint64_t ci = ti * rc->block_entries + i;
            if (ci >= limit && refcount_entry_get(m->refcount_order, buf, i)) {
                ret = meta_corrupt(m, "the refcount block at 0x%llx (refcount "
                                   "table entry %llu) counts host cluster 0x%llx, "
                                   "far past the end of the file (0x%llx): it is "
                                   "not a refcount block",
                                   (unsigned long long)rc->table[ti],
                                   (unsigned long long)ti,
                                   (unsigned long long)(ci << m->cluster_bits),
                                   (unsigned long long)rc->file_end);
                goto out;
            }
        }
    }
out:
    free(buf);
    return ret;
}

static int block_write_check(void *opaque, uint64_t offset, size_t len)
{
    return meta_check_write(opaque, offset, len, META_KIND_REFBLOCK);
}

int refcount_open(struct meta *m, uint64_t table_offset, uint32_t table_clusters,
                  uint64_t cache_bytes, struct refcount **out)
{
    struct refcount *rc = calloc(1, sizeof(*rc));
    uint64_t nb_blocks, file_size;
    int ret;

    if (!rc)
        return -ENOMEM;
    rc->m = m;
    rc->table_offset = table_offset;
    rc->table_clusters = table_clusters;
    rc->table_entries = (uint64_t)table_clusters * m->cluster_size / 8;
    rc->block_entries = (m->cluster_size * 8) >> m->refcount_order;
    rc->max_refcount = m->refcount_order == 6 ? UINT64_MAX
                                              : (1ull << (1u << m->refcount_order)) - 1;
    rc->table = malloc(rc->table_entries * 8);
    if (!rc->table) {
        ret = -ENOMEM;
        goto fail;
    }
    ret = io_pread(m->io, rc->table, rc->table_entries * 8, table_offset);
    if (ret < 0)
        goto fail;
    ret = io_get_size(m->io, &file_size);
    if (ret < 0)
        goto fail;
    rc->file_end = (file_size + m->cluster_size - 1) & ~(m->cluster_size - 1);

    for (uint64_t i = 0; i < rc->table_entries; i++) {
        uint64_t e = be64_get(&rc->table[i]);
        if ((e & META_REFTABLE_RESERVED) || (e & (m->cluster_size - 1)) ||
            e >= m->file_end) {
            ret = meta_corrupt(m, "refcount table entry %llu (table at 0x%llx) = "
                               "0x%llx: reserved bits set, not cluster aligned, or past "
                               "the end of the file",
                               (unsigned long long)i,
                               (unsigned long long)table_offset,
                               (unsigned long long)e);
            goto fail;
        }
        rc->table[i] = e;
        if (e)
            rc->used_end = (i + 1) * rc->block_entries;
    }
    if (rc->used_end > rc->file_end >> m->cluster_bits)
        rc->used_end = rc->file_end >> m->cluster_bits;

    ret = check_blocks_past_end(rc);
    if (ret < 0)
        goto fail;

    nb_blocks = cache_bytes / m->cluster_size;
    if (nb_blocks < 4)
        nb_blocks = 4;
    if (nb_blocks > 65536)
        nb_blocks = 65536;
    rc->cache = cache_create(m->io, "refcount", m->cluster_size, (unsigned)nb_blocks);
    if (!rc->cache) {
        ret = -ENOMEM;
        goto fail;
    }
    cache_set_write_check(rc->cache, block_write_check, m);
    cache_set_flush_hook(rc->cache, link_pending_hook, rc);
    ret = meta_mark(m, table_offset, (uint64_t)table_clusters << m->cluster_bits,
                    META_KIND_REFTABLE);
    for (uint64_t i = 0; ret == 0 && i < rc->table_entries; i++)
        if (rc->table[i])
            ret = meta_mark(m, rc->table[i], m->cluster_size, META_KIND_REFBLOCK);
    if (ret < 0)
        goto fail;
    *out = rc;
    return 0;

fail:
    refcount_close(rc);
    return ret;
}

void refcount_close(struct refcount *rc)
{
    if (!rc)
        return;
    cache_destroy(rc->cache);
    free(rc->deferred);
    free(rc->pending);
    free(rc->table);
    free(rc);
}

struct cache *refcount_cache(struct refcount *rc)
{
    return rc->cache;
}

int refcount_flush(struct refcount *rc)
{
    int ret = cache_write_dirty(rc->cache);
    int ret2;

    if (ret == 0)
        ret = link_pending(rc);
    ret2 = io_flush(rc->m->io);
    if (ret == 0 && ret2 == 0)
        refcount_host_flushed(rc);
    return ret < 0 ? ret : ret2;
}

int refcount_write_dirty(struct refcount *rc)
{
    return cache_write_dirty(rc->cache);
}

bool refcount_has_dirty(const struct refcount *rc)
{
    return cache_has_dirty(rc->cache);
}

void refcount_set_writethrough(struct refcount *rc, bool on)
{
    cache_set_writethrough(rc->cache, on);
}

void refcount_cache_stats(const struct refcount *rc, struct cache_stats *out)
{
    cache_get_stats(rc->cache, out);
}

uint64_t refcount_end(const struct refcount *rc)
{
    return rc->used_end;
}

void refcount_hint_free(struct refcount *rc, uint64_t offset)
{
    uint64_t ci = offset >> rc->m->cluster_bits;
    if (ci < rc->free_hint)
        rc->free_hint = ci;
}

/* ---- reading ----------------------------------------------------------------- */

static bool has_block(const struct refcount *rc, uint64_t ti)
{
    return ti < rc->table_entries && rc->table[ti] != 0;
}

/* Refcount of cluster @ci; *block is the pinned block of the last lookup,
 * reused while lookups stay inside it. */
static int get_cluster(struct refcount *rc, uint64_t ci, uint64_t *value,
                       uint8_t **block, uint64_t *block_ti)
{
    uint64_t ti = ci / rc->block_entries;
    int ret;

    if (!has_block(rc, ti)) {
        *value = 0;
        return 0;
    }
    if (*block && *block_ti != ti)
        cache_put(rc->cache, (void **)block);
    if (!*block) {
        ret = cache_get(rc->cache, rc->table[ti], (void **)block);
        if (ret < 0)
            return ret;
        *block_ti = ti;
    }
    *value = block_get(rc, *block, ci % rc->block_entries);
    return 0;
}

int refcount_get(struct refcount *rc, uint64_t offset, uint64_t *value)
{
    uint8_t *block = NULL;
    uint64_t ti = 0;
    int ret = get_cluster(rc, offset >> rc->m->cluster_bits, value, &block, &ti);

    if (block)
        cache_put(rc->cache, (void **)&block);
    return ret;
}

/* ---- growth ------------------------------------------------------------------ */

static int write_table_entry(struct refcount *rc, uint64_t ti)
{
    uint8_t buf[8];

    be64_put(buf, rc->table[ti]);
    return io_pwrite(rc->m->io, buf, 8, rc->table_offset + ti * 8);
}

static void note_used(struct refcount *rc, uint64_t ci_end)
{
    uint64_t end_bytes = ci_end << rc->m->cluster_bits;

    if (ci_end > rc->used_end)
        rc->used_end = ci_end;
    if (end_bytes > rc->file_end)
        rc->file_end = end_bytes;
    if (end_bytes > rc->m->file_end)
        rc->m->file_end = end_bytes;
}

/*
 * First run of @nb free clusters at or after cluster @from.  Clusters in
 * ranges without a refcount block are free.
 */
static int find_free_run(struct refcount *rc, uint64_t from, uint64_t nb,
                         uint64_t *start)
{
    uint8_t *block = NULL;
    uint64_t block_ti = 0, run = 0, ci = from;
    bool scanning_from_hint = from == rc->free_hint;
    int ret = 0;

    while (run < nb) {
        uint64_t v, ti = ci / rc->block_entries;

        if (!has_block(rc, ti)) {
            /* The whole rest of this block's range is free. */
            uint64_t range_end = (ti + 1) * rc->block_entries;
            run += range_end - ci;
            ci = range_end;
            continue;
        }
        ret = get_cluster(rc, ci, &v, &block, &block_ti);
        if (ret < 0)
            goto out;
        /* Everything below the first free cluster is in use: the next
         * search can start there. */
        if (scanning_from_hint && v != 0 && run == 0 && ci == rc->free_hint)
            rc->free_hint = ci + 1;
        ci++;
        run = v == 0 ? run + 1 : 0;
    }
    *start = ci - run;
out:
    if (block)
        cache_put(rc->cache, (void **)&block);
    return ret;
}

/* Table indices in [lo, hi) (cluster indices) that have no refcount block. */
static uint64_t missing_blocks(const struct refcount *rc, uint64_t lo, uint64_t hi)
{
    uint64_t n = 0;

    for (uint64_t ti = lo / rc->block_entries; hi > lo && ti <= (hi - 1) / rc->block_entries; ti++)
        n += !has_block(rc, ti);
    return n;
}

/*
 * Write a new refcount block for table index @ti at cluster @at, holding
 * refcount 1 for the clusters of [@lo, @hi) in its range: the new
 * structures being laid out.  The block is not linked into the table yet.
 */
static int write_new_block(struct refcount *rc, uint64_t ti, uint64_t at,
                           uint64_t lo, uint64_t hi)
{
    struct meta *m = rc->m;
    uint64_t first = ti * rc->block_entries, last = first + rc->block_entries;
    uint8_t *buf = calloc(1, m->cluster_size);
    int ret;

    if (!buf)
        return -ENOMEM;
    for (uint64_t ci = lo > first ? lo : first; ci < hi && ci < last; ci++)
        block_set(rc, buf, ci - first, 1);
    cache_discard(rc->cache, at << m->cluster_bits);
    ret = meta_check_write(m, at << m->cluster_bits, m->cluster_size, META_KIND_REFBLOCK);
    if (ret == 0)
        ret = meta_mark(m, at << m->cluster_bits, m->cluster_size, META_KIND_REFBLOCK);
    if (ret == 0) {
        ret = io_pwrite(m->io, buf, m->cluster_size, at << m->cluster_bits);
        /* Not written (ENOSPC): the cluster is no block, and must not be
         * taken for one when it is handed out later. */
        if (ret < 0)
            (void)meta_mark(m, at << m->cluster_bits, m->cluster_size, META_KIND_NONE);
    }
    free(buf);
    if (ret == 0)
        note_used(rc, at + 1);
    return ret;
}

/*
 * Replace the refcount table by one with room for index @ti_needed.  The new
 * table goes past everything in use, followed by new refcount blocks for
 * whatever of that area no block covers yet (a block may describe clusters
 * outside itself).  Written and flushed, then the header switches, then
 * the old table is released.
 */
static int grow_table(struct refcount *rc, uint64_t ti_needed)
{
    struct meta *m = rc->m;
    uint64_t per_cluster = m->cluster_size / 8, be = rc->block_entries;
    uint64_t new_entries = rc->table_entries * 2, t_clusters, k = 0, start, end;
    uint64_t *new_table = NULL;
    uint64_t old_offset = rc->table_offset, old_clusters = rc->table_clusters;
    uint64_t ti_done = 0;       /* table indices below this one are laid out */
    int ret;

    if (new_entries < ti_needed + 1)
        new_entries = ti_needed + 1;
    start = rc->used_end > rc->file_end >> m->cluster_bits ? rc->used_end
                                                            : rc->file_end >> m->cluster_bits;
    for (;;) {
        uint64_t k2;
        new_entries = (new_entries + per_cluster - 1) / per_cluster * per_cluster;
        t_clusters = new_entries / per_cluster;
        while ((k2 = missing_blocks(rc, start, start + t_clusters + k)) != k)
            k = k2;
        end = start + t_clusters + k;
        if ((end - 1) / be < new_entries)
            break;
        new_entries = (end - 1) / be + 1;
    }
    if (t_clusters * m->cluster_size > HEADER_MAX_REFTABLE_BYTES) {
        log_error("the refcount table would exceed %u bytes; the image cannot "
                  "grow further", HEADER_MAX_REFTABLE_BYTES);
        return -EFBIG;
    }

    new_table = calloc(new_entries, 8);
    if (!new_table)
        return -ENOMEM;
    memcpy(new_table, rc->table, rc->table_entries * 8);

    /* Refcounts of the new area: new blocks where none exists, increments
     * in the existing blocks otherwise. */
    {
        uint64_t j = 0;
        for (ti_done = start / be; ti_done <= (end - 1) / be; ti_done++) {
            uint64_t ti = ti_done;
            uint64_t lo = ti * be > start ? ti * be : start;
            uint64_t hi = (ti + 1) * be < end ? (ti + 1) * be : end;
            if (has_block(rc, ti)) {
                ret = refcount_update(rc, lo << m->cluster_bits,
                                      (hi - lo) << m->cluster_bits, 1);
            } else {
                uint64_t at = start + t_clusters + j++;
                ret = write_new_block(rc, ti, at, start, end);
                if (ret == 0)
                    new_table[ti] = at << m->cluster_bits;
            }
            if (ret < 0)
                goto undo;
        }
    }
    note_used(rc, end);

    for (uint64_t i = 0; i < new_entries; i++)
        be64_put(&new_table[i], new_table[i]);
    ret = meta_check_write(m, start << m->cluster_bits, t_clusters << m->cluster_bits,
                           META_KIND_REFTABLE);
    if (ret == 0)
        ret = io_pwrite(m->io, new_table, new_entries * 8, start << m->cluster_bits);
    for (uint64_t i = 0; i < new_entries; i++)
        new_table[i] = be64_get(&new_table[i]);
    if (ret < 0)
        goto undo;
    /* Blocks, increments and table durable before the header points there
     * (image_flush.c, invariant 6). */
    ret = refcount_flush(rc);
    if (ret < 0)
        goto undo;
    ret = header_write_refcount_table(m->io, start << m->cluster_bits, (uint32_t)t_clusters);
    if (ret == 0)
        ret = io_flush(m->io);
    if (ret < 0)
        goto out;               /* the header may have switched: keep all */

    free(rc->table);
    rc->table = new_table;
    new_table = NULL;
    rc->table_entries = new_entries;
    rc->table_offset = start << m->cluster_bits;
    rc->table_clusters = (uint32_t)t_clusters;
    log_debug("refcount table moved to 0x%llx (%llu clusters)",
              (unsigned long long)rc->table_offset, (unsigned long long)t_clusters);

    ret = meta_mark(m, old_offset, (uint64_t)old_clusters << m->cluster_bits,
                    META_KIND_NONE);
    if (ret == 0)
        ret = meta_mark(m, rc->table_offset, t_clusters << m->cluster_bits,
                        META_KIND_REFTABLE);
    /* Nothing refers to the old table any more once the header is durable. */
    if (ret == 0)
        ret = refcount_update(rc, old_offset, (uint64_t)old_clusters << m->cluster_bits, -1);
    free(new_table);
    return ret;

undo:
    /* The header still names the old table (a full host file system, say):
     * take back the increments and forget the new blocks, or the new area
     * stays counted past the end of the file and its block clusters pass
     * for refcount blocks when they are handed out later. */
    for (uint64_t ti = start / be; ti < ti_done; ti++) {
        uint64_t lo = ti * be > start ? ti * be : start;
        uint64_t hi = (ti + 1) * be < end ? (ti + 1) * be : end;
        if (has_block(rc, ti))
            (void)refcount_update(rc, lo << m->cluster_bits, (hi - lo) << m->cluster_bits, -1);
        else if (new_table[ti])
            (void)meta_mark(m, new_table[ti], m->cluster_size, META_KIND_NONE);
    }
out:
    free(new_table);
    return ret;
}

/* ---- updates ----------------------------------------------------------------- */

int refcount_update(struct refcount *rc, uint64_t offset, uint64_t len, int delta)
{
    struct meta *m = rc->m;
    uint64_t first, last;
    uint8_t *block = NULL;
    uint64_t block_ti = UINT64_MAX;
    int ret = 0;

    if (len == 0)
        return 0;
    first = offset >> m->cluster_bits;
    last = (offset + len - 1) >> m->cluster_bits;

    for (uint64_t ci = first; ci <= last; ci++) {
        uint64_t ti = ci / rc->block_entries, v;

        if (ti != block_ti) {
            if (block)
                cache_put(rc->cache, (void **)&block);
            if (!has_block(rc, ti)) {
                if (delta < 0) {
                    ret = meta_corrupt(m, "refcount of host cluster 0x%llx would "
                                       "drop below zero (no refcount block)",
                                       (unsigned long long)(ci << m->cluster_bits));
                    goto out;
                }
                /* Allocation covers every run before raising refcounts. */
                log_error("internal error: refcount of host cluster 0x%llx "
                          "raised without a refcount block",
                          (unsigned long long)(ci << m->cluster_bits));
                ret = -EIO;
                goto out;
            }
            ret = cache_get(rc->cache, rc->table[ti], (void **)&block);
            if (ret < 0)
                goto out;
            block_ti = ti;
        }
        v = block_get(rc, block, ci % rc->block_entries);
        if ((delta < 0 && v < (uint64_t)-delta) ||
            (delta > 0 && rc->max_refcount - v < (uint64_t)delta)) {
            ret = meta_corrupt(m, "refcount of host cluster 0x%llx is %llu; "
                               "changing it by %d leaves the range of %u-bit "
                               "refcounts", (unsigned long long)(ci << m->cluster_bits),
                               (unsigned long long)v, delta, 1u << m->refcount_order);
            goto out;
        }
        block_set(rc, block, ci % rc->block_entries, v + (uint64_t)(int64_t)delta);
        cache_mark_dirty(rc->cache, block);
        if (v + (uint64_t)(int64_t)delta == 0 && ci < rc->free_hint)
            rc->free_hint = ci;
        if (delta > 0)
            note_used(rc, ci + 1);
    }
out:
    if (block)
        cache_put(rc->cache, (void **)&block);
    return ret;
}

/*
 * Create the refcount blocks missing for table indices [@ti_lo, @ti_hi],
 * placing them at clusters @first_new .. + @k, and enter them in the
 * in-memory table.  Their on-disk table entries are written by
 * link_pending() when the refcount cache is next flushed: linking here
 * would need a host flush (the block before the entry that points at it)
 * in the middle of the write stream, with the metadata lock held.  Until
 * then no L2 entry that points into their range reaches the disk
 * (image_flush.c, invariants 1 and 3), so a crash only leaks.
 */
static int create_blocks(struct refcount *rc, uint64_t ti_lo, uint64_t ti_hi,
                         uint64_t first_new, uint64_t k)
{
    struct meta *m = rc->m;
    uint64_t be = rc->block_entries, n = 0;
    int ret;

    if (rc->nb_pending + k > rc->cap_pending) {
        size_t cap = rc->cap_pending ? rc->cap_pending : 16;
        void *p;
        while (cap < rc->nb_pending + k)
            cap *= 2;
        p = realloc(rc->pending, cap * sizeof(*rc->pending));
        if (!p)
            return -ENOMEM;
        rc->pending = p;
        rc->cap_pending = cap;
    }
    for (uint64_t ti = ti_lo; ti <= ti_hi && n < k; ti++) {
        uint64_t at = first_new + n;
        if (has_block(rc, ti))
            continue;
        ret = write_new_block(rc, ti, at, first_new, first_new + k);
        if (ret < 0)
            return ret;
        rc->table[ti] = at << m->cluster_bits;
        rc->pending[rc->nb_pending++] = ti;
        n++;
    }
    if (n != k) {
        log_error("internal error: %llu refcount blocks laid out, %llu needed",
                  (unsigned long long)k, (unsigned long long)n);
        return -EIO;
    }
    /* A block whose own cluster lies in the range of a block that already
     * existed gets its refcount there (write_new_block only set the ones
     * inside the new blocks). */
    for (uint64_t i = 0; i < k; i++) {
        uint64_t at = first_new + i, holder = at / be;
        bool holder_new = false;
        for (size_t j = rc->nb_pending - k; j < rc->nb_pending; j++)
            holder_new |= rc->pending[j] == holder;
        if (!holder_new) {
            ret = refcount_update(rc, at << m->cluster_bits, m->cluster_size, 1);
            if (ret < 0)
                return ret;
        }
    }
    return 0;
}

static bool is_pending(const struct refcount *rc, uint64_t ti)
{
    for (size_t i = 0; i < rc->nb_pending; i++)
        if (rc->pending[i] == ti)
            return true;
    return false;
}

/*
 * Write the table entries of new blocks (image_flush.c, invariant 3).
 * On entry every dirty refcount block has been written (not flushed).
 *
 * A new block's own refcount lives in whichever block covers its cluster,
 * possibly another new one; an entry may reach the disk only after the
 * block holding its block's refcount is linked, or a crash between two
 * entry writes leaves a referenced cluster with refcount 0.  So the
 * entries are written in rounds, each round those whose holder is linked
 * (or themselves), with a host flush before each round: the first one
 * makes the blocks durable before anything points at them.  The caller
 * (refcount_flush, or cache_flush through the hook) flushes after the
 * last round.
 */
static int link_pending(struct refcount *rc)
{
    uint64_t be = rc->block_entries;
    int ret;

    while (rc->nb_pending > 0) {
        size_t kept = 0, nb = rc->nb_pending;
        uint64_t ready[64];
        size_t nb_ready = 0;

        for (size_t i = 0; i < nb && nb_ready < 64; i++) {
            uint64_t ti = rc->pending[i], holder = (rc->table[ti] >> rc->m->cluster_bits) / be;
            if (holder == ti || !is_pending(rc, holder))
                ready[nb_ready++] = ti;
        }
        if (!nb_ready) {
            log_error("internal error: refcount blocks depend on each other");
            return -EIO;
        }
        ret = io_flush(rc->m->io);
        if (ret < 0)
            return ret;
        for (size_t i = 0; i < nb_ready; i++) {
            ret = write_table_entry(rc, ready[i]);
            if (ret < 0)
                return ret;     /* still pending: the next flush retries */
        }
        for (size_t i = 0; i < nb; i++) {
            bool done = false;
            for (size_t j = 0; j < nb_ready; j++)
                done |= rc->pending[i] == ready[j];
            if (!done)
                rc->pending[kept++] = rc->pending[i];
        }
        rc->nb_pending = kept;
    }
    return 0;
}

/* The refcount cache's flush hook: the cache flushes refcounts on its own
 * only when an L2 slice that depends on them is evicted (invariant 3). */
static int link_pending_hook(void *opaque)
{
    return link_pending(opaque);
}

/*
 * A run the refcounts call free must hold no metadata we know of: a
 * refcount of 0 on the header, a table or a block (a damaged refcount
 * block, or a refcount table entry of 0) would otherwise hand that cluster
 * out, and the write to it would be refused only after its refcount had
 * been raised.  Caught here, nothing changes (qemu-iotests 060).
 */
static int check_run_free(struct refcount *rc, uint64_t start, uint64_t nb)
{
    struct meta *m = rc->m;

    for (uint64_t ci = start; ci < start + nb; ci++) {
        enum meta_kind kind = meta_kind_at(m, ci << m->cluster_bits);
        if (kind != META_KIND_NONE)
            return meta_corrupt(m, "host cluster 0x%llx holds the %s, but its "
                                "refcount is 0 (refcount table at 0x%llx): the "
                                "refcounts are damaged",
                                (unsigned long long)(ci << m->cluster_bits),
                                meta_kind_name(kind),
                                (unsigned long long)rc->table_offset);
    }
    return 0;
}

/*
 * Lay out @nb contiguous free clusters at or after cluster @from, with the
 * refcount blocks that must cover them (growing the table if needed), and
 * raise their refcounts to 1.  On exit *start is the first cluster and *k
 * the number of new refcount blocks placed right after the run.
 */
static int alloc_run(struct refcount *rc, uint64_t from, uint64_t nb,
                     uint64_t *start_out, uint64_t *k_out)
{
    struct meta *m = rc->m;
    uint64_t be = rc->block_entries, start = 0, k = 0, max_ti;
    int ret;

    for (;;) {
        /* A free run with room after it for the blocks that must cover
         * it and themselves. */
        unsigned tries = 0;
        for (;;) {
            uint64_t k2;
            ret = find_free_run(rc, from, nb + k, &start);
            if (ret < 0)
                return ret;
            k2 = missing_blocks(rc, start, start + nb + k);
            if (k2 == k)
                break;
            if (++tries > 64) {
                log_error("internal error: no stable layout for %llu clusters",
                          (unsigned long long)nb);
                return -EIO;
            }
            k = k2;
        }
        ret = check_run_free(rc, start, nb + k);
        if (ret < 0)
            return ret;
        if (k == 0)
            break;
        max_ti = (start + nb + k - 1) / be;
        if (max_ti >= rc->table_entries) {
            ret = grow_table(rc, max_ti);
            if (ret < 0)
                return ret;
            k = 0;
            continue;           /* the table took space: look again */
        }
        ret = create_blocks(rc, start / be, max_ti, start + nb, k);
        if (ret < 0)
            return ret;
        break;
    }

    ret = refcount_update(rc, start << m->cluster_bits, nb << m->cluster_bits, 1);
    if (ret < 0)
        return ret;
    *start_out = start;
    *k_out = k;
    return 0;
}

/* Whether the free run the allocator would take for @nb clusters lies
 * below the reservation (freed space is used first, as without one). */
static int free_run_below_reservation(struct refcount *rc, uint64_t nb, bool *below)
{
    uint64_t start;
    int ret;

    *below = false;
    if (rc->free_hint >= rc->res_next)
        return 0;
    ret = find_free_run(rc, rc->free_hint, nb, &start);
    if (ret == 0)
        *below = start < rc->res_next;
    return ret;
}

int refcount_alloc(struct refcount *rc, uint64_t nb, uint64_t *offset, int *fresh)
{
    struct meta *m = rc->m;
    uint64_t file_end = rc->file_end;   /* before new blocks extend it */
    uint64_t start, k;
    bool below = false;
    int ret;

    if (rc->res_end - rc->res_next >= nb) {
        ret = free_run_below_reservation(rc, nb, &below);
        if (ret < 0)
            return ret;
        if (!below) {
            /* Refcount 1 already, and durable (invariant 1). */
            *offset = rc->res_next << m->cluster_bits;
            *fresh = REFCOUNT_RESERVED;
            rc->res_next += nb;
            rc->res_taken += nb;
            return 0;
        }
    }
    ret = alloc_run(rc, rc->free_hint, nb, &start, &k);
    if (ret < 0)
        return ret;
    *fresh = (start << m->cluster_bits) >= file_end ? REFCOUNT_FRESH : REFCOUNT_REUSED;
    if (*fresh && !below)
        rc->res_missed += nb;   /* at the frontier: the reservation was short */
    if (rc->free_hint == start)
        rc->free_hint = start + nb + k;
    *offset = start << m->cluster_bits;
    return 0;
}

/* ---- the reservation ------------------------------------------------------ */

/*
 * Run sizes, in bytes of clusters.  A crash leaks at most the unused
 * reservation, so it is bounded: 8 MiB is below one second of writes on any
 * disk this serves and far inside the slack open allows past the end of the
 * file (REFCOUNT_SLACK_BYTES).  It starts at 1 MiB (sixteen 64 KiB
 * clusters: 256 fsyncs of 4 KiB appends) and doubles whenever one flush
 * interval took more than it held, so a stream of large writes reaches the
 * cap after a few fsyncs while a trickle never reserves more than a
 * megabyte.  A top-up refills it to the target once less than half is left:
 * one refcount block write per half run, not one per fsync.
 */
#define RESERVE_MIN_BYTES (1ull << 20)
#define RESERVE_MAX_BYTES (8ull << 20)

static uint64_t reserve_min(const struct refcount *rc)
{
    uint64_t n = RESERVE_MIN_BYTES >> rc->m->cluster_bits;
    return n ? n : 1;
}

static uint64_t reserve_max(const struct refcount *rc)
{
    uint64_t n = RESERVE_MAX_BYTES >> rc->m->cluster_bits;
    return n > reserve_min(rc) ? n : reserve_min(rc);
}

/* Give clusters [@lo, @hi) of the reservation back: nothing refers to
 * them, so their refcounts drop at once. */
static int release_run(struct refcount *rc, uint64_t lo, uint64_t hi)
{
    if (hi <= lo)
        return 0;
    return refcount_update(rc, lo << rc->m->cluster_bits, (hi - lo) << rc->m->cluster_bits, -1);
}

int refcount_reserve(struct refcount *rc)
{
    struct meta *m = rc->m;
    uint64_t demand = rc->res_taken + rc->res_missed, avail, frontier, nb, start, k;
    uint64_t size;
    int ret;

    if (rc->res_disabled || rc->stg_end > rc->stg_start || demand == 0)
        return 0;
    if (!rc->res_target) {
        /* The first: twice what the first interval took. */
        uint64_t t = 2 * demand > reserve_min(rc) ? 2 * demand : reserve_min(rc);
        rc->res_target = t < reserve_max(rc) ? t : reserve_max(rc);
    } else if (rc->res_missed) {
        uint64_t t = 2 * rc->res_target > 2 * demand ? 2 * rc->res_target : 2 * demand;
        rc->res_target = t < reserve_max(rc) ? t : reserve_max(rc);
    }
    rc->res_taken = rc->res_missed = 0;
    avail = rc->res_end - rc->res_next;
    if (2 * avail >= rc->res_target)
        return 0;

    /* The frontier: past every cluster in use and the end of the file.
     * What is left of a run the frontier moved away from goes back (the
     * allocator takes it as freed space). */
    frontier = rc->file_end >> m->cluster_bits;
    if (rc->used_end > frontier)
        frontier = rc->used_end;
    if (avail && rc->res_end != frontier) {
        ret = release_run(rc, rc->res_next, rc->res_end);
        if (ret < 0)
            return ret;
        rc->res_next = rc->res_end = 0;
        avail = 0;
    }
    nb = rc->res_target - avail;
    ret = alloc_run(rc, frontier, nb, &start, &k);
    if (ret < 0)
        return ret;
    if (start != frontier && avail) {
        /* Not contiguous after all: keep the reservation one run. */
        ret = release_run(rc, rc->res_next, rc->res_end);
        rc->res_next = rc->res_end = 0;
        if (ret < 0) {
            (void)release_run(rc, start, start + nb);
            return ret;
        }
    }
    /* Inside the file, so that an L2 entry that reaches the disk before
     * the data points at zeros, not past the end (new blocks after the run
     * have extended it already). */
    ret = io_get_size(m->io, &size);
    if (ret == 0 && size < (start + nb) << m->cluster_bits)
        ret = io_truncate(m->io, (start + nb) << m->cluster_bits);
    if (ret < 0) {
        log_debug("no cluster reservation: extending the image file to 0x%llx "
                  "failed: %s", (unsigned long long)((start + nb) << m->cluster_bits),
                  strerror(-ret));
        rc->res_disabled = true;
        (void)release_run(rc, start, start + nb);
        return ret;
    }
    rc->stg_start = start;
    rc->stg_end = start + nb;
    return 0;
}

void refcount_host_flushed(struct refcount *rc)
{
    if (rc->stg_end == rc->stg_start || cache_has_dirty(rc->cache) || rc->nb_pending)
        return;
    if (rc->res_next == rc->res_end) {
        rc->res_next = rc->stg_start;
        rc->res_end = rc->stg_end;
    } else if (rc->res_end == rc->stg_start) {
        rc->res_end = rc->stg_end;
    } else {
        /* refcount_reserve keeps them contiguous */
        log_error("internal error: cluster reservation not contiguous");
        return;
    }
    rc->stg_start = rc->stg_end = 0;
}

uint64_t refcount_reserved(const struct refcount *rc)
{
    return (rc->res_end - rc->res_next) + (rc->stg_end - rc->stg_start);
}

/* Whether every cluster in [@lo, @hi) has refcount 0. */
static int all_free(struct refcount *rc, uint64_t lo, uint64_t hi, bool *out)
{
    uint8_t *block = NULL;
    uint64_t ti = 0, v;
    int ret = 0;

    *out = true;
    for (uint64_t ci = lo; ci < hi && *out; ci++) {
        ret = get_cluster(rc, ci, &v, &block, &ti);
        if (ret < 0)
            break;
        *out = v == 0;
    }
    if (block)
        cache_put(rc->cache, (void **)&block);
    return ret;
}

int refcount_release_reservation(struct refcount *rc)
{
    struct meta *m = rc->m;
    uint64_t lo = UINT64_MAX, size, end;
    bool tail_free;
    int ret;

    if (rc->res_next < rc->res_end)
        lo = rc->res_next;
    if (rc->stg_start < rc->stg_end && rc->stg_start < lo)
        lo = rc->stg_start;
    if (lo == UINT64_MAX)
        return 0;
    ret = release_run(rc, rc->res_next, rc->res_end);
    if (ret == 0) {
        rc->res_next = rc->res_end = 0;
        ret = release_run(rc, rc->stg_start, rc->stg_end);
    }
    if (ret == 0)
        rc->stg_start = rc->stg_end = 0;
    if (ret == 0)
        ret = refcount_flush(rc);
    if (ret < 0)
        return ret;

    /* The file was extended for the reservation: when nothing after its
     * start is in use any more, cut the file back there. */
    ret = io_get_size(m->io, &size);
    if (ret < 0)
        return ret;
    end = (size + m->cluster_size - 1) >> m->cluster_bits;
    if (rc->used_end > end)
        end = rc->used_end;     /* in use past the end: not written yet */
    if (lo >= end)
        return 0;
    ret = all_free(rc, lo, end, &tail_free);
    if (ret < 0 || !tail_free)
        return ret;
    /* Only space: a file that keeps its length is as clean. */
    ret = io_truncate(m->io, lo << m->cluster_bits);
    if (ret < 0) {
        log_debug("cutting the image file back to 0x%llx failed: %s",
                  (unsigned long long)(lo << m->cluster_bits), strerror(-ret));
        return 0;
    }
    return io_flush(m->io);
}

int refcount_defer_free(struct refcount *rc, uint64_t offset, uint64_t len)
{
    if (rc->nb_deferred == rc->cap_deferred) {
        size_t cap = rc->cap_deferred ? rc->cap_deferred * 2 : 64;
        void *p = realloc(rc->deferred, cap * sizeof(*rc->deferred));
        if (!p)
            return -ENOMEM;
        rc->deferred = p;
        rc->cap_deferred = cap;
    }
    rc->deferred[rc->nb_deferred].offset = offset;
    rc->deferred[rc->nb_deferred].len = len;
    rc->nb_deferred++;
    return 0;
}

size_t refcount_nb_deferred(const struct refcount *rc)
{
    return rc->nb_deferred;
}

bool refcount_has_pending(const struct refcount *rc)
{
    return rc->nb_pending > 0;
}

bool refcount_has_deferred(const struct refcount *rc)
{
    return rc->nb_deferred > 0;
}

int refcount_apply_deferred(struct refcount *rc, refcount_freed_fn *freed, void *opaque)
{
    struct meta *m = rc->m;
    size_t i;
    int ret = 0;

    for (i = 0; i < rc->nb_deferred; i++) {
        uint64_t off = rc->deferred[i].offset, end = off + rc->deferred[i].len;
        uint64_t first = off >> m->cluster_bits;
        uint64_t last = (end - 1) >> m->cluster_bits;

        /* Cluster by cluster, so that after a failure the queue holds
         * exactly what is not done yet (a retry must not decrement twice). */
        for (uint64_t ci = first; ci <= last; ci++) {
            uint64_t v;
            ret = refcount_update(rc, ci << m->cluster_bits, 1, -1);
            if (ret < 0) {
                rc->deferred[i].offset = ci << m->cluster_bits;
                rc->deferred[i].len = end - (ci << m->cluster_bits);
                break;
            }
            if (freed && refcount_get(rc, ci << m->cluster_bits, &v) == 0 && v == 0)
                freed(opaque, ci << m->cluster_bits, m->cluster_size);
        }
        if (ret < 0)
            break;
    }
    if (i)      /* (an empty queue may have no array: memmove(NULL) is UB) */
        memmove(rc->deferred, rc->deferred + i,
                (rc->nb_deferred - i) * sizeof(*rc->deferred));
    rc->nb_deferred -= i;
    return ret;
}
