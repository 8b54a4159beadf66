/*
 * cluster — L1/L2 translation and L2 updates.
 */
#include "cluster.h"

#include "cache.h"
#include "compress.h"
#include "header.h"
#include "io.h"
#include "log.h"
#include "meta.h"
#include "refcount.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define L2_SLICE_MAX    4096u
#define L2_CACHE_MIN    16u

struct cluster {
    struct meta *m;
    uint64_t *l1;               /* host byte order */
    uint32_t l1_size;
    uint64_t l1_offset;
    struct cache *l2_cache;
    size_t slice_bytes;
    uint64_t slice_entries;
    struct refcount *rc;        /* NULL on read-only images */
    uint8_t *l1_dirty;          /* one flag per L1_CHUNK entries */
    bool any_l1_dirty;
    bool borrowed_cache;        /* a view's: l2_cache belongs to another */
};

#define L1_CHUNK 512            /* entries per L1 write unit (4 KiB) */

int cluster_compressed_extent(const struct meta *m, uint64_t entry, uint64_t *host,
                              uint64_t *len, uint64_t *sectors_host,
                              uint64_t *sectors_len)
{
    uint64_t first, bytes;
    int ret = compress_descriptor_decode(entry & ~(META_L2_COPIED | META_L2_COMPRESSED),
                                         m->cluster_bits, &first, &bytes);

    if (ret < 0)
        return ret;
    *host = first;
    *len = bytes;
    if (sectors_host)
        compress_sectors(first, bytes, sectors_host, sectors_len);
    return 0;
}

int cluster_decode_entry(const struct meta *m, uint64_t entry, uint64_t bitmap,
                         unsigned sc, enum cluster_kind *kind, uint64_t *host,
                         const char **why)
{
    uint64_t off;

    *host = 0;
    if (entry & META_L2_COMPRESSED) {
        uint64_t len;
        if (m->has_data_file) {
            *why = "compressed cluster in an image with an external data file";
            return -EINVAL;
        }
        if (cluster_compressed_extent(m, entry, host, &len, NULL, NULL) < 0) {
            *why = "compressed cluster offset beyond 2^56";
            return -EINVAL;
        }
        if (entry & META_L2_COPIED) {
            *why = "compressed cluster with the COPIED flag";
            return -EINVAL;
        }
        if (*host >= m->file_end) {
            *why = "compressed data past the end of the image file";
            return -EINVAL;
        }
        *kind = CLUSTER_COMPRESSED;
        return 0;
    }

    if (entry & META_L2_STD_RESERVED) {
        *why = "reserved bits set in L2 entry";
        return -EINVAL;
    }
    off = entry & META_OFFSET_MASK;
    if (off & (m->cluster_size - 1)) {
        *why = "data cluster offset not aligned to the cluster size";
        return -EINVAL;
    }
    if ((entry & META_L2_ZERO) && (!m->v3 || m->extended_l2)) {
        *why = "zero flag set where the image version does not allow it";
        return -EINVAL;
    }
    /* Offset 0 is a real host offset only with an external data file, and
     * then only with COPIED set. */
    bool allocated = off != 0 || (m->has_data_file && (entry & META_L2_COPIED));
    if (off == 0 && (entry & META_L2_COPIED) && !m->has_data_file) {
        *why = "COPIED flag on an unallocated cluster";
        return -EINVAL;
    }
    *host = off;
    if (!m->has_data_file && off >= m->file_end) {
        *why = "data cluster offset past the end of the image file";
        return -EINVAL;
    }

    if (m->extended_l2) {
        uint32_t alloc = (uint32_t)bitmap, zero = (uint32_t)(bitmap >> 32);
        if (alloc & zero) {
            *why = "subcluster both allocated and zero";
            return -EINVAL;
        }
        if (!allocated && alloc) {
            *why = "allocated subclusters in an unallocated cluster";
            return -EINVAL;
        }
        if (alloc & (1u << sc))
            *kind = CLUSTER_DATA;
        else if (zero & (1u << sc))
            *kind = CLUSTER_ZERO;
        else
            *kind = CLUSTER_UNALLOCATED;
        return 0;
    }

    if (entry & META_L2_ZERO)
        *kind = CLUSTER_ZERO;
    else if (allocated)
        *kind = CLUSTER_DATA;
    else
        *kind = CLUSTER_UNALLOCATED;
    return 0;
}

/* Allocate @cl's L1 table of @l1_size entries and read it from @l1_offset. */
static int load_l1(struct cluster *cl, uint64_t l1_offset, uint32_t l1_size)
{
    struct meta *m = cl->m;
    int ret;

    cl->l1_size = l1_size;
    cl->l1_offset = l1_offset;
    cl->slice_bytes = m->cluster_size < L2_SLICE_MAX ? m->cluster_size : L2_SLICE_MAX;
    cl->slice_entries = cl->slice_bytes / m->l2_entry_bytes;
    cl->l1 = calloc(l1_size ? l1_size : 1, sizeof(uint64_t));
    cl->l1_dirty = calloc(l1_size / L1_CHUNK + 1, 1);
    if (!cl->l1 || !cl->l1_dirty)
        return -ENOMEM;
    if (l1_size) {
        ret = io_pread(m->io, cl->l1, (size_t)l1_size * 8, l1_offset);
        if (ret < 0) {
            log_error("reading the L1 table (%u entries at 0x%llx) failed: %s",
                      l1_size, (unsigned long long)l1_offset, strerror(-ret));
            return ret;
        }
        for (uint32_t i = 0; i < l1_size; i++)
            cl->l1[i] = be64_get(&cl->l1[i]);
    }
    return 0;
}

int cluster_open(struct meta *m, uint64_t l1_offset, uint32_t l1_size,
                 uint64_t l2_cache_bytes, struct cluster **out)
{
    struct cluster *cl = calloc(1, sizeof(*cl));
    uint64_t nb_slices;
    int ret;

    if (!cl)
        return -ENOMEM;
    cl->m = m;
    ret = load_l1(cl, l1_offset, l1_size);
    if (ret < 0)
        goto fail;

    nb_slices = l2_cache_bytes / cl->slice_bytes;
    if (nb_slices < L2_CACHE_MIN)
        nb_slices = L2_CACHE_MIN;
    if (nb_slices > (1u << 24))
        nb_slices = 1u << 24;
    cl->l2_cache = cache_create(m->io, "L2", cl->slice_bytes, (unsigned)nb_slices);
    if (!cl->l2_cache) {
        ret = -ENOMEM;
        goto fail;
    }
    /* An L2 entry names guest data in the data file: that file is the one
     * to flush before the entry reaches the disk (image_flush.c,
     * invariant 2). */
    if (m->data_io && m->data_io != m->io)
        cache_set_data_io(cl->l2_cache, m->data_io);
    *out = cl;
    return 0;

fail:
    cluster_close(cl);
    return ret;
}

int cluster_open_view(struct cluster *base, struct meta *m, uint64_t l1_offset,
                      uint32_t l1_size, struct cluster **out)
{
    struct cluster *cl = calloc(1, sizeof(*cl));
    int ret;

    if (!cl)
        return -ENOMEM;
    cl->m = m;
    /* Slices are keyed by host offset and a snapshot's tables are never
     * written in place, so whatever @base cached of them is what they
     * hold on disk: one cache serves both. */
    cl->l2_cache = base->l2_cache;
    cl->borrowed_cache = true;
    ret = load_l1(cl, l1_offset, l1_size);
    if (ret < 0) {
        cluster_close(cl);
        return ret;
    }
    *out = cl;
    return 0;
}

void cluster_close(struct cluster *cl)
{
    if (!cl)
        return;
    if (!cl->borrowed_cache)
        cache_destroy(cl->l2_cache);
    free(cl->l1_dirty);
    free(cl->l1);
    free(cl);
}

struct cache *cluster_l2_cache(struct cluster *cl)
{
    return cl->l2_cache;
}

bool cluster_l2_dirty(const struct cluster *cl)
{
    return cache_has_dirty(cl->l2_cache);
}

void cluster_refcounts_durable(struct cluster *cl)
{
    cache_dependency_met(cl->l2_cache);
}

bool cluster_l2_waits_for_flush(const struct cluster *cl)
{
    return cache_has_dependency(cl->l2_cache);
}

int cluster_write_l2(struct cluster *cl)
{
    return cache_write_dirty(cl->l2_cache);
}

void cluster_set_writethrough(struct cluster *cl, bool on)
{
    cache_set_writethrough(cl->l2_cache, on);
}

void cluster_cache_stats(const struct cluster *cl, struct cache_stats *out)
{
    cache_get_stats(cl->l2_cache, out);
}

/* Whether L1 entry @e is fit to use as it stands: no reserved bits, an
 * aligned L2 offset inside the file. */
static bool l1_entry_sane(const struct meta *m, uint64_t e)
{
    uint64_t l2 = e & META_OFFSET_MASK;

    return !(e & META_L1_RESERVED) && (l2 == 0 || l2 < m->file_end) &&
           !(l2 & (m->cluster_size - 1));
}

/* The L2 table offset for guest cluster @gc, 0 if none; -EIO if corrupt. */
static int l2_table_of(struct cluster *cl, uint64_t l1_index, uint64_t *l2_offset)
{
    struct meta *m = cl->m;
    uint64_t e;

    if (l1_index >= cl->l1_size) {
        *l2_offset = 0;
        return 0;
    }
    e = cl->l1[l1_index];
    if (e & META_L1_RESERVED)
        return meta_corrupt(m, "L1 entry %llu (table at 0x%llx) = 0x%016llx has "
                            "reserved bits set", (unsigned long long)l1_index,
                            (unsigned long long)cl->l1_offset, (unsigned long long)e);
    *l2_offset = e & META_OFFSET_MASK;
    if (*l2_offset && *l2_offset >= m->file_end)
        return meta_corrupt(m, "L1 entry %llu (table at 0x%llx) points at L2 "
                            "table offset 0x%llx, past the end of the image "
                            "file (0x%llx)", (unsigned long long)l1_index,
                            (unsigned long long)cl->l1_offset,
                            (unsigned long long)*l2_offset,
                            (unsigned long long)m->file_end);
    if (*l2_offset & (m->cluster_size - 1))
        return meta_corrupt(m, "L1 entry %llu (table at 0x%llx) points at L2 "
                            "table offset 0x%llx, not cluster aligned",
                            (unsigned long long)l1_index,
                            (unsigned long long)cl->l1_offset,
                            (unsigned long long)*l2_offset);
    return 0;
}

static inline uint64_t unit_bytes(const struct meta *m)
{
    return m->extended_l2 ? m->cluster_size / 32 : m->cluster_size;
}

/*
 * Translate [@offset, @offset + @max_bytes) within one L2 slice.  With
 * @shared the caller holds the metadata lock only shared: nothing may be
 * read from disk, reported or changed, so whatever needs that ends the
 * lookup with -EAGAIN and the caller retries with the lock held exclusively.
 */
static int lookup(struct cluster *cl, uint64_t offset, uint64_t max_bytes,
                  struct cluster_run *run, bool shared)
{
    struct meta *m = cl->m;
    uint64_t gc = offset >> m->cluster_bits;
    uint64_t l1_index = gc / m->l2_entries;
    uint64_t l2_index = gc % m->l2_entries;
    uint64_t slice_first = l2_index - l2_index % cl->slice_entries;
    uint64_t slice_end = slice_first + cl->slice_entries;   /* exclusive, in entries */
    uint64_t unit = unit_bytes(m);
    uint64_t l2_offset = 0, pos, end, slice_offset;
    const uint8_t *slice = NULL;
    int ret;

    if (shared) {
        if (l1_index < cl->l1_size) {
            if (!l1_entry_sane(m, cl->l1[l1_index]))
                return -EAGAIN;
            l2_offset = cl->l1[l1_index] & META_OFFSET_MASK;
        }
    } else {
        ret = l2_table_of(cl, l1_index, &l2_offset);
        if (ret < 0)
            return ret;
    }

    /* Nothing beyond this slice is looked at in one call. */
    end = ((l1_index * m->l2_entries + slice_end) << m->cluster_bits);
    if (end - offset > max_bytes)
        end = offset + max_bytes;

    if (l2_offset == 0) {
        /* Whole L2 table unallocated: the run reaches the table's end. */
        uint64_t table_end = (l1_index + 1) * m->l2_entries << m->cluster_bits;
        run->kind = CLUSTER_UNALLOCATED;
        run->host_offset = 0;
        run->bytes = (table_end - offset < max_bytes) ? table_end - offset : max_bytes;
        return 0;
    }

    slice_offset = l2_offset + slice_first * m->l2_entry_bytes;
    if (shared) {
        if (cache_peek(cl->l2_cache, slice_offset, (const void **)&slice) < 0)
            return -EAGAIN;
    } else {
        ret = cache_get(cl->l2_cache, slice_offset, (void **)&slice);
        if (ret < 0)
            return ret;
    }

    ret = 0;
    run->bytes = 0;
    pos = offset;
    while (pos < end) {
        uint64_t idx = (pos >> m->cluster_bits) % m->l2_entries - slice_first;
        uint64_t entry = be64_get(slice + idx * m->l2_entry_bytes);
        uint64_t bitmap = m->extended_l2 ? be64_get(slice + idx * 16 + 8) : 0;
        unsigned sc = m->extended_l2 ? (unsigned)((pos & (m->cluster_size - 1)) / unit) : 0;
        enum cluster_kind kind;
        uint64_t host, step_end, unit_host;
        const char *why;

        ret = cluster_decode_entry(m, entry, bitmap, sc, &kind, &host, &why);
        if (ret < 0 && run->bytes > 0) {
            ret = 0;            /* end the run here; the next lookup reports */
            break;
        }
        if (ret < 0 && shared) {
            ret = -EAGAIN;
            break;
        }
        if (ret < 0) {
            ret = meta_corrupt(m, "L2 table at 0x%llx, entry %llu (guest offset "
                               "0x%llx) = 0x%016llx: %s",
                               (unsigned long long)l2_offset,
                               (unsigned long long)(idx + slice_first),
                               (unsigned long long)(pos & ~(m->cluster_size - 1)),
                               (unsigned long long)entry, why);
            break;
        }
        if (kind == CLUSTER_COMPRESSED) {
            step_end = (pos | (m->cluster_size - 1)) + 1;
            if (run->bytes == 0) {
                run->kind = kind;
                run->l2_entry = entry;
                run->host_offset = host;
                run->bytes = (step_end < end ? step_end : end) - pos;
            }
            break;              /* compressed clusters are never merged */
        }
        step_end = (pos | (unit - 1)) + 1;
        if (step_end > end)
            step_end = end;
        unit_host = host + (pos & (m->cluster_size - 1));
        if (run->bytes == 0) {
            run->kind = kind;
            run->host_offset = kind == CLUSTER_DATA ? unit_host : 0;
            run->l2_entry = 0;
        } else if (kind != run->kind ||
                   (kind == CLUSTER_DATA && run->host_offset + run->bytes != unit_host)) {
            break;
        }
        run->bytes += step_end - pos;
        pos = step_end;
    }

    if (!shared)
        cache_put(cl->l2_cache, (void **)&slice);
    return ret;
}

int cluster_lookup(struct cluster *cl, uint64_t offset, uint64_t max_bytes,
                   struct cluster_run *run)
{
    return lookup(cl, offset, max_bytes, run, false);
}

int cluster_lookup_shared(struct cluster *cl, uint64_t offset, uint64_t max_bytes,
                          struct cluster_run *run)
{
    return lookup(cl, offset, max_bytes, run, true);
}

/* ---- write side ---------------------------------------------------------- */

static int l2_write_check(void *opaque, uint64_t offset, size_t len)
{
    return meta_check_write(opaque, offset, len, META_KIND_L2);
}

int cluster_set_refcount(struct cluster *cl, struct refcount *rc)
{
    struct meta *m = cl->m;
    int ret;

    cl->rc = rc;
    ret = cache_set_dependency(cl->l2_cache, refcount_cache(rc));
    if (ret < 0)
        return ret;
    cache_set_write_check(cl->l2_cache, l2_write_check, m);
    /* The active L1 and L2 tables, for the overlap check. */
    ret = meta_mark(m, cl->l1_offset, (uint64_t)cl->l1_size * 8, META_KIND_L1);
    for (uint32_t i = 0; ret == 0 && i < cl->l1_size; i++) {
        uint64_t l2 = cl->l1[i] & META_OFFSET_MASK;
        if (l2 && !(l2 & (m->cluster_size - 1)))
            ret = meta_mark(m, l2, m->cluster_size, META_KIND_L2);
    }
    return ret;
}

void cluster_entry_decode(const struct meta *m, uint64_t entry, uint64_t bitmap,
                          struct cluster_entry *e)
{
    e->entry = entry;
    e->bitmap = bitmap;
    e->host = 0;
    e->why = NULL;
    e->ret = cluster_decode_entry(m, entry, bitmap, 0, &e->kind, &e->host, &e->why);
}

int cluster_check_old_entry(struct cluster *cl, uint64_t gc, uint64_t entry,
                            uint64_t bitmap, uint64_t *host, uint64_t *len)
{
    struct cluster_entry e;

    cluster_entry_decode(cl->m, entry, bitmap, &e);
    return cluster_check_decoded(cl, gc, &e, host, len);
}

int cluster_check_decoded(struct cluster *cl, uint64_t gc, const struct cluster_entry *e,
                          uint64_t *host, uint64_t *len)
{
    struct meta *m = cl->m;
    uint64_t l1_index = gc / m->l2_entries;
    uint64_t l2_offset = l1_index < cl->l1_size ? cl->l1[l1_index] & META_OFFSET_MASK : 0;
    uint64_t entry = e->entry, h = e->host, n = 0, max_len;
    const char *why = e->why;
    char what[96];

    *host = *len = 0;
    if (e->ret < 0)
        goto corrupt;
    if (entry & META_L2_COMPRESSED) {
        /* Decoded above; the refcounts cover every sector it names. */
        (void)cluster_compressed_extent(m, entry, &h, &max_len, &h, &n);
    } else if (!m->has_data_file && h) {
        n = m->cluster_size;
    } else {
        return 0;               /* nothing of the image file to free */
    }
    if (h + n > m->file_end) {
        snprintf(what, sizeof(what), "host bytes 0x%llx..0x%llx lie past the end "
                 "of the image file", (unsigned long long)h,
                 (unsigned long long)(h + n - 1));
        why = what;
        goto corrupt;
    }
    for (uint64_t off = cluster_align_down(h, m->cluster_size); off < h + n;
         off += m->cluster_size) {
        enum meta_kind k = meta_kind_at(m, off);
        uint64_t refs = 1;
        int ret;
        if (k != META_KIND_NONE) {
            snprintf(what, sizeof(what), "names host offset 0x%llx, which holds the "
                     "%s (not freed)", (unsigned long long)off, meta_kind_name(k));
            why = what;
            goto corrupt;
        }
        /* A free cluster may belong to someone else by now. */
        if (cl->rc && (ret = refcount_get(cl->rc, off, &refs)) < 0)
            return ret;
        if (refs == 0) {
            snprintf(what, sizeof(what), "names host offset 0x%llx, whose refcount "
                     "is 0 (not freed)", (unsigned long long)off);
            why = what;
            goto corrupt;
        }
    }
    *host = h;
    *len = n;
    return 0;

corrupt:
    return meta_corrupt(m, "L2 table at 0x%llx, entry %llu (guest offset 0x%llx) = "
                        "0x%016llx: %s", (unsigned long long)l2_offset,
                        (unsigned long long)(gc % m->l2_entries),
                        (unsigned long long)(gc << m->cluster_bits),
                        (unsigned long long)entry, why);
}

int cluster_mark_snapshot_l2(struct meta *m, uint64_t l1_offset, uint32_t l1_size)
{
    enum { CHUNK = 4096 };      /* L1 entries read at a time */
    uint64_t *buf = malloc(CHUNK * sizeof(*buf));
    int ret = 0;

    if (!buf)
        return -ENOMEM;
    for (uint32_t first = 0; ret == 0 && first < l1_size; first += CHUNK) {
        uint32_t n = l1_size - first < CHUNK ? l1_size - first : CHUNK;
        ret = io_pread(m->io, buf, (size_t)n * 8, l1_offset + (uint64_t)first * 8);
        for (uint32_t i = 0; ret == 0 && i < n; i++) {
            uint64_t e = be64_get(&buf[i]), l2 = e & META_OFFSET_MASK;
            if (l2 && l1_entry_sane(m, e))
                ret = meta_mark(m, l2, m->cluster_size, META_KIND_SNAPSHOT_L2);
        }
    }
    free(buf);
    return ret;
}

static uint64_t slice_offset(const struct cluster *cl, uint64_t l2_offset,
                             uint64_t l2_index)
{
    return l2_offset + (l2_index - l2_index % cl->slice_entries) * cl->m->l2_entry_bytes;
}

int cluster_get_entry(struct cluster *cl, uint64_t gc, uint64_t *entry,
                      uint64_t *bitmap)
{
    struct meta *m = cl->m;
    uint64_t l1_index = gc / m->l2_entries, l2_index = gc % m->l2_entries;
    uint64_t l2_offset, i;
    uint8_t *slice;
    int ret;

    *entry = *bitmap = 0;
    ret = l2_table_of(cl, l1_index, &l2_offset);
    if (ret < 0 || l2_offset == 0)
        return ret;
    ret = cache_get(cl->l2_cache, slice_offset(cl, l2_offset, l2_index), (void **)&slice);
    if (ret < 0)
        return ret;
    i = l2_index % cl->slice_entries;
    *entry = be64_get(slice + i * m->l2_entry_bytes);
    if (m->extended_l2)
        *bitmap = be64_get(slice + i * 16 + 8);
    cache_put(cl->l2_cache, (void **)&slice);
    return 0;
}

static void l1_set(struct cluster *cl, uint64_t l1_index, uint64_t value)
{
    cl->l1[l1_index] = value;
    cl->l1_dirty[l1_index / L1_CHUNK] = 1;
    cl->any_l1_dirty = true;
}

int cluster_prepare_l2(struct cluster *cl, uint64_t gc)
{
    struct meta *m = cl->m;
    uint64_t l1_index = gc / m->l2_entries;
    uint64_t old, refs, new_offset;
    uint8_t *buf = NULL;
    int fresh, ret;

    if (l1_index >= cl->l1_size)
        return meta_corrupt(m, "guest cluster %llu lies beyond the L1 table "
                            "(%u entries)", (unsigned long long)gc, cl->l1_size);
    ret = l2_table_of(cl, l1_index, &old);
    if (ret < 0)
        return ret;
    if (old && (cl->l1[l1_index] & META_L2_COPIED))
        return 0;
    if (old) {
        ret = refcount_get(cl->rc, old, &refs);
        if (ret < 0)
            return ret;
        if (refs == 1) {        /* COPIED was merely missing */
            l1_set(cl, l1_index, old | META_L2_COPIED);
            return 0;
        }
        if (refs == 0)
            return meta_corrupt(m, "L2 table at 0x%llx (L1 entry %llu) has "
                                "refcount 0", (unsigned long long)old,
                                (unsigned long long)l1_index);
    }

    buf = calloc(1, m->cluster_size);
    if (!buf)
        return -ENOMEM;
    if (old) {
        /* Shared with a snapshot: the copy starts from the table on disk
         * (a shared table is never modified, so the cache holds nothing
         * newer). */
        ret = io_pread(m->io, buf, m->cluster_size, old);
        if (ret < 0)
            goto out;
    }
    ret = refcount_alloc(cl->rc, 1, &new_offset, &fresh);
    if (ret < 0)
        goto out;
    ret = meta_check_write(m, new_offset, m->cluster_size, META_KIND_L2);
    if (ret < 0)
        goto out;               /* corrupt: no more writes of any kind */
    ret = meta_mark(m, new_offset, m->cluster_size, META_KIND_L2);
    if (ret < 0)
        goto out;
    for (uint64_t so = 0; so < m->cluster_size; so += cl->slice_bytes)
        cache_discard(cl->l2_cache, new_offset + so);
    /* Written at once: the table must be on disk before the L1 entry that
     * points at it, and the L1 is written only after a host flush
     * (image_flush.c, invariant 5). */
    ret = io_pwrite(m->io, buf, m->cluster_size, new_offset);
    if (ret < 0) {
        /* A full host file system (ENOSPC), say: nothing points at the
         * cluster yet, so give it back at once.  Kept, every refused write
         * would leak one cluster past the end of the file, where no check
         * sees it, until the image no longer opens. */
        (void)meta_mark(m, new_offset, m->cluster_size, META_KIND_NONE);
        (void)refcount_update(cl->rc, new_offset, m->cluster_size, -1);
        goto out;
    }
    l1_set(cl, l1_index, new_offset | META_L2_COPIED);
    if (old)
        ret = refcount_defer_free(cl->rc, old, m->cluster_size);
out:
    free(buf);
    return ret;
}

int cluster_set_entry(struct cluster *cl, uint64_t gc, uint64_t entry,
                      uint64_t bitmap, bool new_data)
{
    struct meta *m = cl->m;
    uint64_t l1_index = gc / m->l2_entries, l2_index = gc % m->l2_entries;
    uint64_t l2_offset = cl->l1[l1_index] & META_OFFSET_MASK, i;
    uint8_t *slice;
    int ret;

    ret = cache_get(cl->l2_cache, slice_offset(cl, l2_offset, l2_index), (void **)&slice);
    if (ret < 0)
        return ret;
    /* Invariants 1 and 2 of image_flush.c for a slice that leaves by
     * eviction; recorded before the entry changes, so that an error
     * leaves the slice as it was. */
    if (new_data) {
        ret = cache_set_dependency(cl->l2_cache, refcount_cache(cl->rc));
        if (ret < 0)
            goto out;
        cache_depends_on_flush(cl->l2_cache);
    }
    i = l2_index % cl->slice_entries;
    be64_put(slice + i * m->l2_entry_bytes, entry);
    if (m->extended_l2)
        be64_put(slice + i * 16 + 8, bitmap);
    cache_mark_dirty(cl->l2_cache, slice);
out:
    cache_put(cl->l2_cache, (void **)&slice);
    return ret;
}

bool cluster_l1_dirty(const struct cluster *cl)
{
    return cl->any_l1_dirty;
}

int cluster_flush_l1(struct cluster *cl)
{
    uint8_t *buf;
    int ret = 0;

    if (!cl->any_l1_dirty)
        return 0;
    buf = malloc(L1_CHUNK * 8);
    if (!buf)
        return -ENOMEM;
    for (uint64_t c = 0; c <= cl->l1_size / L1_CHUNK; c++) {
        uint64_t first = c * L1_CHUNK, n;
        if (!cl->l1_dirty[c] || first >= cl->l1_size)
            continue;
        n = cl->l1_size - first < L1_CHUNK ? cl->l1_size - first : L1_CHUNK;
        for (uint64_t i = 0; i < n; i++)
            be64_put(buf + 8 * i, cl->l1[first + i]);
        ret = meta_check_write(cl->m, cl->l1_offset + first * 8, n * 8, META_KIND_L1);
        if (ret < 0)
            break;
        ret = io_pwrite(cl->m->io, buf, n * 8, cl->l1_offset + first * 8);
        if (ret < 0) {
            log_error("writing the L1 table at 0x%llx failed: %s",
                      (unsigned long long)(cl->l1_offset + first * 8), strerror(-ret));
            break;              /* stays dirty */
        }
        cl->l1_dirty[c] = 0;
    }
    if (ret == 0)
        cl->any_l1_dirty = false;
    free(buf);
    return ret;
}

uint32_t cluster_l1_size(const struct cluster *cl)
{
    return cl->l1_size;
}

int cluster_grow_l1(struct cluster *cl, uint32_t new_size)
{
    struct meta *m = cl->m;
    uint64_t bytes = (uint64_t)new_size * 8;
    uint64_t nb = (bytes + m->cluster_size - 1) >> m->cluster_bits;
    uint64_t new_offset, old_offset = cl->l1_offset;
    uint64_t old_bytes = (uint64_t)cl->l1_size * 8;
    uint64_t *l1 = NULL;
    uint8_t *disk = NULL, *dirty = NULL;
    int fresh, ret;

    if (new_size <= cl->l1_size)
        return 0;
    if (bytes > HEADER_MAX_L1_BYTES)
        return -EFBIG;
    l1 = calloc(new_size, 8);
    disk = calloc(nb, m->cluster_size);
    dirty = calloc(new_size / L1_CHUNK + 1, 1);
    if (!l1 || !disk || !dirty) {
        ret = -ENOMEM;
        goto fail;
    }
    memcpy(l1, cl->l1, old_bytes);
    for (uint32_t i = 0; i < new_size; i++)
        be64_put(disk + 8 * i, l1[i]);

    ret = refcount_alloc(cl->rc, nb, &new_offset, &fresh);
    if (ret < 0)
        goto fail;
    ret = meta_check_write(m, new_offset, nb << m->cluster_bits, META_KIND_L1);
    if (ret == 0)
        ret = io_pwrite(m->io, disk, nb << m->cluster_bits, new_offset);
    /* The table and its refcounts on disk before the header points at it
     * (image_flush.c, invariant 6). */
    if (ret == 0)
        ret = refcount_flush(cl->rc);
    if (ret < 0) {
        (void)refcount_update(cl->rc, new_offset, nb << m->cluster_bits, -1);
        goto fail;
    }
    ret = header_write_l1_table(m->io, new_size, new_offset);
    if (ret == 0)
        ret = io_flush(m->io);
    if (ret < 0) {
        /* The header may or may not have switched: keep both tables
         * allocated (a leak at worst). */
        goto fail;
    }

    free(cl->l1);
    free(cl->l1_dirty);
    cl->l1 = l1;
    cl->l1_dirty = dirty;
    cl->l1_size = new_size;
    cl->l1_offset = new_offset;
    free(disk);
    ret = meta_mark(m, old_offset, old_bytes, META_KIND_NONE);
    if (ret == 0)
        ret = meta_mark(m, new_offset, nb << m->cluster_bits, META_KIND_L1);
    /* Nothing refers to the old table once the header is durable. */
    if (ret == 0 && old_bytes)
        ret = refcount_update(cl->rc, old_offset, old_bytes, -1);
    return ret;

fail:
    free(l1);
    free(disk);
    free(dirty);
    return ret;
}
