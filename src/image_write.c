/*
 * image_write — the write path: overwrites in place of clusters we own,
 * runs of whole clusters allocated together, and single clusters that need
 * a new (or taken-over) host cluster with copy-on-write of what the write
 * does not cover.  Guest data is written with the metadata lock dropped,
 * the guest range held.
 */
#include "image_impl.h"

#include "bitmap.h"
#include "cluster.h"
#include "header.h"
#include "io.h"
#include "meta.h"
#include "refcount.h"
#include "scratch.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* ---- write path ---------------------------------------------------------- */

/*
 * Before the first write: mark the kept persistent bitmaps in use; drop
 * autoclear bits we do not maintain (bitmaps we do not keep: QEMU then
 * ignores them instead of trusting them) and, with lazy refcounts, set the
 * dirty bit, durably.  Called with the metadata lock held.
 */
int image_prepare_write(struct image *img)
{
    struct qcow2_header *h = &img->hdr;
    bool changed = false;
    int ret;

    if (img->write_prepared)
        return 0;
    ret = bitmap_prepare_write(img->bitmaps);
    if (ret < 0)
        return ret;
    if (h->version >= 3) {
        uint64_t keep = h->autoclear_features &
                        (QCOW2_AUTOCLEAR_DATA_RAW |
                         (img->bitmaps ? QCOW2_AUTOCLEAR_BITMAPS : 0));
        if (keep != h->autoclear_features) {
            ret = header_write_autoclear(img->io, keep);
            if (ret < 0)
                return ret;
            h->autoclear_features = keep;
            changed = true;
        }
        if (h->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS) {
            ret = meta_update_incompatible(&img->meta, QCOW2_INCOMPAT_DIRTY, 0);
            if (ret < 0)
                return ret;
            img->set_dirty_bit = true;
            changed = true;
        }
    }
    if (changed) {
        ret = io_flush(img->io);
        if (ret < 0)
            return ret;
    }
    img->write_prepared = true;
    return 0;
}

/*
 * The write path, in the spirit of QEMU's QCowL2Meta.  Each step of
 * image_write_range() handles one run of guest clusters through a plan:
 *
 *   decide  (metadata lock held): look the clusters up, decode each L2
 *           entry the write replaces once, and validate it once
 *           (cluster_check_old_entry, the one check of what a write
 *           frees); choose the host clusters, allocating where needed.
 *   write   (lock dropped, guest range held): the guest data, with what
 *           the write does not cover of a cluster copied from its old
 *           contents (copy-on-write).
 *   commit  (lock held again): point the L2 entries at the new data and
 *           defer the frees of what they replaced; after a failed write,
 *           give the allocation back instead.
 *
 * A plan is one of three kinds:
 *   PLAN_INPLACE   clusters we own whose written units hold data, contiguous
 *                  on the host: overwritten, no metadata changes;
 *   PLAN_NEW_RUN   two or more whole clusters that need new host clusters:
 *                  allocated as one contiguous run, written with one I/O;
 *   PLAN_CLUSTER   the rest of one cluster: a new or taken-over host cluster,
 *                  filled from the old contents where the write does not
 *                  cover it.
 */

/* Set *st from an L2 entry: what it says about the units of its cluster
 * (subclusters with extended L2, else the whole cluster as unit 0). */
static void decode_state(const struct image *img, uint64_t entry, uint64_t bitmap,
                         struct old_state *st)
{
    const struct meta *m = &img->meta;

    memset(st, 0, sizeof(*st));
    st->entry = entry;
    st->bitmap = bitmap;
    cluster_entry_decode(m, entry, bitmap, &st->dec);
    if (entry & META_L2_COMPRESSED) {
        st->compressed = true;
        return;
    }
    st->host = entry & META_OFFSET_MASK;
    st->has_host = st->host != 0 || (m->has_data_file && (entry & META_L2_COPIED));
    if (m->extended_l2) {
        st->alloc = (uint32_t)bitmap;
        st->zero = (uint32_t)(bitmap >> 32);
    } else if (entry & META_L2_ZERO) {
        st->zero = 1;
    } else if (st->has_host) {
        st->alloc = 1;
    }
}

/* Validate the entry *st of guest cluster @gc before it is replaced, and
 * note the host bytes its replacement frees (see cluster_check_old_entry):
 * the decoding decode_state() made is the one validated. */
static int check_old_state(struct image *img, uint64_t gc, struct old_state *st)
{
    return cluster_check_decoded(img->cl, gc, &st->dec, &st->free_host, &st->free_len);
}

int image_old_state(struct image *img, uint64_t gc, struct old_state *st)
{
    uint64_t entry, bitmap;
    int ret = cluster_get_entry(img->cl, gc, &entry, &bitmap);

    if (ret < 0)
        return ret;
    decode_state(img, entry, bitmap, st);
    return check_old_state(img, gc, st);
}

#define PLAN_MAX_CLUSTERS 256

enum plan_kind { PLAN_INPLACE, PLAN_NEW_RUN, PLAN_CLUSTER };

struct write_plan {
    enum plan_kind kind;
    uint64_t gc;                /* first guest cluster */
    uint64_t in;                /* where the write starts in it */
    uint64_t bytes;             /* guest bytes the plan writes, from gc's @in */
    uint64_t nb;                /* clusters whose entries commit sets */
    uint64_t host;              /* host cluster of gc (INPLACE: the first byte) */
    bool reuse;                 /* CLUSTER: host is the old cluster, taken over */
    bool allocated;             /* host was allocated for this write */
    int fresh;                  /* ... reads zeros: a REFCOUNT_ value (refcount.h) */
    /* CLUSTER, in units: those the write touches, those that move from
     * the old host cluster (or the compressed data) into the new one, and
     * the entry's new allocation and zero state. */
    uint32_t written, carry, new_alloc, new_zero;
    struct old_state old[PLAN_MAX_CLUSTERS];    /* each entry before the write */
};

/* The units (subclusters, or the whole cluster as unit 0) of guest bytes
 * [@in, @in + @n) of one cluster. */
static uint32_t units_of(const struct meta *m, uint64_t in, uint64_t n)
{
    uint64_t unit = m->cluster_size / 32;

    if (!m->extended_l2)
        return 1u;
    return cluster_subcluster_mask((unsigned)(in / unit), (unsigned)((in + n - 1) / unit));
}

/*
 * Decide a PLAN_INPLACE: the bytes from @offset that can be overwritten in
 * place, clusters we own (COPIED) whose touched units all hold data,
 * contiguous on the host.  The entry of the first cluster is decoded into
 * p->old[0] whatever it is: a plan of another kind starts from it.
 * On exit: p->bytes is 0 when the first cluster does not qualify.
 */
static int plan_inplace(struct image *img, uint64_t offset, uint64_t len,
                        struct write_plan *p)
{
    const struct meta *m = &img->meta;
    uint64_t cs = m->cluster_size, pos = offset, end = offset + len;
    int ret;

    p->kind = PLAN_INPLACE;
    p->gc = offset >> m->cluster_bits;
    p->in = cluster_offset_in(offset, cs);
    p->bytes = 0;
    p->nb = 0;
    /* commit_plan reads these for every kind; the plan is reused across a
     * write's loop, so they must not be left from an earlier plan (or the
     * stack: UBSan saw a bool of 138 on a ring thread). */
    p->reuse = p->allocated = false;
    p->fresh = 0;
    while (pos < end) {
        uint64_t entry, bitmap, in = cluster_offset_in(pos, cs);
        uint64_t n = cs - in < end - pos ? cs - in : end - pos;
        struct old_state st;
        uint32_t need = units_of(m, in, n);

        ret = cluster_get_entry(img->cl, pos >> m->cluster_bits, &entry, &bitmap);
        if (ret < 0)
            return ret;
        decode_state(img, entry, bitmap, &st);
        if (pos == offset)
            p->old[0] = st;
        if (st.dec.ret < 0)
            break;              /* a plan of another kind reports it */
        if (st.compressed || !st.has_host || !(entry & META_L2_COPIED))
            break;
        if ((st.alloc & need) != need)
            break;
        if (p->bytes == 0)
            p->host = st.host + in;
        else if (p->host + p->bytes != st.host + in)
            break;
        p->bytes += n;
        pos += n;
    }
    if (p->bytes && !m->has_data_file)
        return meta_check_write(&img->meta, p->host, p->bytes, META_KIND_NONE);
    return 0;
}

/*
 * Decide a PLAN_NEW_RUN: whole clusters from the cluster-aligned @offset
 * that need a new host cluster, allocated as one contiguous run.
 * On entry: p->old[0] holds the first cluster's entry (plan_inplace).
 * On exit: p->nb is 0 when fewer than two clusters qualify; either way
 *          *checked entries of p->old[] are validated (a PLAN_CLUSTER for
 *          the first cluster need not check it again).
 */
static int plan_new_run(struct image *img, uint64_t offset, uint64_t len,
                        struct write_plan *p, uint64_t *checked)
{
    struct meta *m = &img->meta;
    uint64_t cs = m->cluster_size, n = 0;
    int ret;

    *checked = 0;
    if (cluster_offset_in(offset, cs) || len < 2 * cs || m->has_data_file)
        return 0;
    while (n < PLAN_MAX_CLUSTERS && (n + 1) * cs <= len) {
        struct old_state *st = &p->old[n];
        ret = cluster_prepare_l2(img->cl, p->gc + n);
        if (ret < 0)
            return ret;
        if (n > 0) {
            uint64_t entry, bitmap;
            ret = cluster_get_entry(img->cl, p->gc + n, &entry, &bitmap);
            if (ret < 0)
                return ret;
            decode_state(img, entry, bitmap, st);
        }
        /* Clusters we own are overwritten in place. */
        if (!st->compressed && (st->entry & META_L2_COPIED))
            break;
        ret = check_old_state(img, p->gc + n, st);
        if (ret < 0)
            return ret;
        *checked = ++n;
    }
    if (n < 2)
        return 0;

    ret = refcount_alloc(img->rc, n, &p->host, &p->fresh);
    if (ret < 0)
        return ret;
    ret = meta_check_write(m, p->host, n * cs, META_KIND_NONE);
    if (ret < 0)
        return ret;
    img->clusters_allocated += n;
    p->kind = PLAN_NEW_RUN;
    p->allocated = true;
    p->reuse = false;
    p->nb = n;
    p->bytes = n * cs;
    p->new_alloc = CLUSTER_ALL_SUBCLUSTERS;
    p->new_zero = 0;
    return 0;
}

/*
 * Decide a PLAN_CLUSTER for the bytes from @offset to the end of its
 * cluster (at most @len): where the cluster will live, and which units
 * the write fills from the old contents.
 * On entry: p->old[0] holds the cluster's entry, validated if @checked.
 */
static int plan_cluster(struct image *img, uint64_t offset, uint64_t len,
                        struct write_plan *p, bool checked)
{
    struct meta *m = &img->meta;
    struct old_state *st = &p->old[0];
    uint64_t cs = m->cluster_size, refs;
    uint32_t all = m->extended_l2 ? CLUSTER_ALL_SUBCLUSTERS : 1u;
    int ret;

    p->kind = PLAN_CLUSTER;
    p->nb = 1;
    p->bytes = cs - p->in < len ? cs - p->in : len;
    p->written = units_of(m, p->in, p->bytes);
    p->reuse = p->allocated = false;
    p->fresh = 0;
    ret = cluster_prepare_l2(img->cl, p->gc);
    if (ret == 0 && !checked)
        ret = check_old_state(img, p->gc, st);
    if (ret < 0)
        return ret;

    /* Where the cluster will live. */
    if (m->has_data_file) {
        p->host = p->gc << m->cluster_bits;     /* fixed guest = host mapping */
        p->reuse = true;
        st->host = p->host;
    } else if (st->has_host) {
        if (st->entry & META_L2_COPIED) {
            p->reuse = true;
        } else {
            ret = refcount_get(img->rc, st->host, &refs);
            if (ret < 0)
                return ret;
            p->reuse = refs == 1;
        }
    }
    if (p->reuse) {
        p->host = st->host;
    } else {
        ret = refcount_alloc(img->rc, 1, &p->host, &p->fresh);
        if (ret < 0)
            return ret;
        p->allocated = true;
        img->clusters_allocated++;
    }
    if (!m->has_data_file) {
        ret = meta_check_write(m, p->host, cs, META_KIND_NONE);
        if (ret < 0)
            return ret;
    }

    p->carry = st->compressed ? all : (!p->reuse ? st->alloc : 0);
    p->new_alloc = (p->reuse ? st->alloc : p->carry) | p->written;
    p->new_zero = st->zero & ~p->new_alloc;
    return 0;
}

/* Decide how to write the next run of [@offset, +@len).  Called with the
 * metadata lock held. */
static int plan_write(struct image *img, uint64_t offset, uint64_t len,
                      struct write_plan *p)
{
    uint64_t checked;
    int ret = plan_inplace(img, offset, len, p);

    if (ret < 0 || p->bytes)
        return ret;
    ret = plan_new_run(img, offset, len, p, &checked);
    if (ret < 0 || p->nb)
        return ret;
    return plan_cluster(img, offset, len, p, checked > 0);
}

/* Fill @len bytes of @buf with what guest offset @goff of a unit held
 * before the write, per its old state. */
static int old_content(struct image *img, const struct old_state *st,
                       unsigned u, const uint8_t *decompressed,
                       uint64_t goff, uint8_t *buf, size_t len)
{
    const struct meta *m = &img->meta;
    uint64_t in = cluster_offset_in(goff, m->cluster_size);

    if (st->compressed) {
        memcpy(buf, decompressed + in, len);
        return 0;
    }
    if (st->alloc & (1u << u))
        return io_pread(m->data_io, buf, len, st->host + in);
    if ((st->zero & (1u << u)) || !img->backing) {
        memset(buf, 0, len);
        return 0;
    }
    return image_read(img->backing, buf, len, goff);
}

/*
 * The guest I/O of a PLAN_CLUSTER: copy what the write does not cover from
 * the old contents, then write the units that change.  Called without the
 * metadata lock.  The cluster is built in the thread's SCRATCH_COW buffer
 * and a compressed old cluster decompressed into SCRATCH_COW_OLD: nothing
 * it calls (image_read_compressed, the backing image's read) writes, so
 * neither is in use further down.
 */
static int write_cluster_data(struct image *img, const struct write_plan *p,
                              const uint8_t *data)
{
    const struct meta *m = &img->meta;
    const struct old_state *st = &p->old[0];
    uint64_t cs = m->cluster_size, unit = m->extended_l2 ? cs / 32 : cs;
    uint64_t in = p->in, n = p->bytes, goff = p->gc << m->cluster_bits;
    unsigned u0 = (unsigned)(in / unit), u1 = (unsigned)((in + n - 1) / unit);
    uint32_t span = p->written | p->carry;
    unsigned lo = (unsigned)__builtin_ctz(span), hi = 31 - (unsigned)__builtin_clz(span);
    uint8_t *buf, *plain = NULL;
    int fresh = p->fresh, ret;

    buf = scratch_get(SCRATCH_COW, cs);
    if (!buf)
        return -ENOMEM;
    if (st->compressed) {
        struct cluster_run run = { .kind = CLUSTER_COMPRESSED, .bytes = cs,
                                   .l2_entry = st->entry };
        plain = scratch_get(SCRATCH_COW_OLD, cs);
        ret = plain ? image_read_compressed(img, &run, goff, plain, NULL) : -ENOMEM;
        if (ret < 0)
            return ret;
    }

    if (!m->extended_l2 && !st->compressed && !st->alloc &&
        ((st->zero & 1) || !img->backing)) {
        /*
         * The guest cluster reads as zeros around the write.  A fresh host
         * cluster does too: write only the data.  A reused one (freed
         * earlier) may hold old bytes: rather than writing a cluster of
         * zeros, punch it, as discard=unmap gives freed space back anyway
         * (discard=ignore keeps space allocated, so it gets the zeros).
         */
        if (!fresh && p->allocated && n < cs && img->discard == IMAGE_DISCARD_UNMAP &&
            io_punch_hole(m->data_io, p->host, cs) == 0)
            fresh = 1;
        if (fresh)
            return io_pwrite(m->data_io, data, n, p->host + in);
    }

    for (unsigned u = lo; u <= hi; u++) {
        uint64_t ustart = u * unit, uend = ustart + unit;
        bool covered = ustart >= in && uend <= in + n;

        if (covered)
            continue;
        if (!(span & (1u << u))) {
            memset(buf + ustart, 0, unit);      /* never read: state says so */
            continue;
        }
        if (p->reuse && (st->alloc & (1u << u)) && !(p->written & (1u << u)))
            continue;                           /* not written: already there */
        ret = old_content(img, st, u, plain, goff + ustart, buf + ustart, unit);
        if (ret < 0)
            return ret;
    }
    memcpy(buf + in, data, n);

    if (p->reuse && m->extended_l2) {
        /* Only the written units' span changes on the host. */
        ret = io_pwrite(m->data_io, buf + (uint64_t)u0 * unit,
                        (uint64_t)(u1 - u0 + 1) * unit, p->host + (uint64_t)u0 * unit);
    } else {
        ret = io_pwrite(m->data_io, buf + (uint64_t)lo * unit,
                        (uint64_t)(hi - lo + 1) * unit, p->host + (uint64_t)lo * unit);
    }
    return ret;
}

/* The guest I/O of plan @p.  Called without the metadata lock. */
static int write_plan_data(struct image *img, const struct write_plan *p,
                           const uint8_t *data)
{
    switch (p->kind) {
    case PLAN_INPLACE:
    case PLAN_NEW_RUN:
        return io_pwrite(img->meta.data_io, data, p->bytes, p->host);
    case PLAN_CLUSTER:
        return write_cluster_data(img, p, data);
    }
    return -EIO;
}

/* Whether the guest cluster read as zeros everywhere before the write
 * (no data, and zero flags or no backing file beneath). */
static bool old_reads_zero(const struct image *img, const struct old_state *st)
{
    uint32_t all = img->meta.extended_l2 ? CLUSTER_ALL_SUBCLUSTERS : 1u;

    return !st->compressed && st->alloc == 0 && (!img->backing || st->zero == all);
}

/*
 * Invariant 2's exception (image_flush.c): plan @p's L2 entries may reach
 * the disk under the same host flush as its data.  So when its clusters
 * come from the durable reservation (refcounts on disk, inside the file,
 * never written: a crash shows zeros where the data did not land) and the
 * guest clusters read as zeros before: every sector is then the old or the
 * new content.
 */
static bool entry_needs_no_flush(const struct image *img, const struct write_plan *p)
{
    if (!p->allocated || p->fresh != REFCOUNT_RESERVED)
        return false;
    for (uint64_t i = 0; i < p->nb; i++)
        if (!old_reads_zero(img, &p->old[i]))
            return false;
    return true;
}

/*
 * Make plan @p's data visible: set its L2 entries and defer the frees of
 * what they replaced.  After a failed write (@ret < 0) give back what the
 * plan allocated instead: nothing refers to it yet.
 * Called with the metadata lock held.  Returns: @ret, or -errno.
 */
static int commit_plan(struct image *img, const struct write_plan *p, int ret)
{
    const struct meta *m = &img->meta;
    uint64_t cs = m->cluster_size;
    uint64_t bitmap = m->extended_l2 ? ((uint64_t)p->new_zero << 32 | p->new_alloc) : 0;
    bool ordered = !entry_needs_no_flush(img, p);

    if (ret < 0) {
        if (p->allocated)
            (void)refcount_update(img->rc, p->host, p->nb * cs, -1);
        return ret;
    }
    for (uint64_t i = 0; i < p->nb; i++) {
        const struct old_state *st = &p->old[i];
        ret = cluster_set_entry(img->cl, p->gc + i, (p->host + i * cs) | META_L2_COPIED,
                                bitmap, ordered);
        /* Compressed data, or a shared cluster. */
        if (ret == 0 && st->free_len && !p->reuse)
            ret = refcount_defer_free(img->rc, st->free_host, st->free_len);
        if (ret < 0)
            return ret;
    }
    return 0;
}

/* The write proper, one plan after another.  On entry the caller holds the
 * guest range and the metadata lock; on exit it still holds both (the lock
 * is dropped around each plan's data I/O). */
int image_write_range(struct image *img, const uint8_t *data, uint64_t len,
                      uint64_t offset)
{
    struct write_plan plan, *p = &plan;
    int ret = image_prepare_write(img);

    while (ret == 0 && len > 0) {
        ret = plan_write(img, offset, len, p);
        if (ret < 0)
            break;
        unlock_exclusive(img);
        ret = write_plan_data(img, p, data);
        lock_exclusive(img);
        ret = commit_plan(img, p, ret);
        data += p->bytes;
        offset += p->bytes;
        len -= p->bytes;
    }
    return ret;
}

/* Whether [@offset, +@len) lies inside the disk: -ENOSPC past its end, as
 * for a write that starts there (see vfs_write). */
int image_check_inside(struct image *img, uint64_t offset, uint64_t len)
{
    uint64_t size = img->size;

    if (offset > size || len > size - offset)
        return -ENOSPC;
    return 0;
}

int image_check_writable(struct image *img, uint64_t offset, uint64_t len)
{
    if (image_is_read_only(img))
        return -EROFS;
    if (meta_is_corrupt(&img->meta) || image_flush_failed(img))
        return -EIO;
    return image_check_inside(img, offset, len);
}

bool image_all_zero(const uint8_t *p, size_t len)
{
    /* Word-wise scan; the first non-zero byte usually ends it at once. */
    while (len && ((uintptr_t)p & 7)) {
        if (*p++)
            return false;
        len--;
    }
    for (; len >= 8; p += 8, len -= 8)
        if (*(const uint64_t *)(const void *)p)
            return false;
    while (len--)
        if (*p++)
            return false;
    return true;
}

static int write_request(struct image *img, const void *buf, size_t len, uint64_t offset);

int image_write(struct image *img, const void *buf, size_t len, uint64_t offset)
{
    int ret;

    guest_begin(img);
    ret = write_request(img, buf, len, offset);
    guest_end(img);
    return ret;
}

static int write_request(struct image *img, const void *buf, size_t len, uint64_t offset)
{
    struct range r;
    int ret = image_check_writable(img, offset, len);

    if (ret < 0 || len == 0)
        return ret;
    bitmap_mark(img->bitmaps, offset, len);
    img->bytes_written += len;
    /* The range may have been held by a shrinking resize: once it is ours,
     * the size is checked again, so nothing is allocated past the end. */
    if (img->detect_zeroes != IMAGE_DETECT_ZEROES_OFF && image_all_zero(buf, len)) {
        image_range_lock(img, &r, offset, len);
        ret = image_check_inside(img, offset, len);
        if (ret == 0)
            ret = image_zero_range(img, offset, len,
                                   img->detect_zeroes == IMAGE_DETECT_ZEROES_UNMAP);
        image_range_unlock(img, &r);
        return ret;
    }
    /* One lock round trip for the range and the metadata. */
    lock_exclusive(img);
    image_range_lock_locked(img, &r, offset, len);
    ret = image_check_inside(img, offset, len);
    if (ret == 0)
        ret = image_write_range(img, buf, len, offset);
    image_range_unlock_locked(img, &r);
    unlock_exclusive(img);
    return ret;
}
