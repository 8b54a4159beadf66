/*
 * image_write — the write path: overwrites in place of clusters we own,
 * runs of whole clusters allocated together, and single clusters that need
 * a new (or taken-over) host cluster with copy-on-write of what the write
 * does not cover.  Guest data is written with the metadata lock dropped,
 * the guest range held.
 */
#include "image_impl.h"

#include "cluster.h"
#include "header.h"
#include "io.h"
#include "meta.h"
#include "refcount.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static int write_header_u64(struct image *img, unsigned offset, uint64_t v)
{
    uint8_t buf[8];

    be64_put(buf, v);
    return io_pwrite(img->io, buf, sizeof(buf), offset);
}

/* ---- write path ---------------------------------------------------------- */

/*
 * Before the first write: drop autoclear bits we do not maintain (QEMU then
 * ignores stale bitmaps instead of trusting them) and, with lazy refcounts,
 * set the dirty bit, durably.  Called with the metadata lock held.
 */
int image_prepare_write(struct image *img)
{
    struct qcow2_header *h = &img->hdr;
    bool changed = false;
    int ret;

    if (img->write_prepared)
        return 0;
    if (h->version >= 3) {
        uint64_t keep = h->autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW;
        if (keep != h->autoclear_features) {
            ret = write_header_u64(img, 88, keep);
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

void image_decode_state(const struct image *img, uint64_t entry, uint64_t bitmap,
                         struct old_state *st)
{
    const struct meta *m = &img->meta;

    memset(st, 0, sizeof(*st));
    st->entry = entry;
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

/*
 * Bytes from @offset that can be overwritten in place: clusters we own
 * (COPIED) whose touched units all hold data, contiguous on the host.
 * Called with the metadata lock held.
 */
static int inplace_run(struct image *img, uint64_t offset, uint64_t len,
                       uint64_t *host, uint64_t *bytes)
{
    const struct meta *m = &img->meta;
    uint64_t cs = m->cluster_size, unit = m->extended_l2 ? cs / 32 : cs;
    uint64_t pos = offset, end = offset + len;
    int ret;

    *bytes = 0;
    while (pos < end) {
        uint64_t entry, bitmap, in = pos & (cs - 1);
        uint64_t n = cs - in < end - pos ? cs - in : end - pos;
        struct old_state st;
        const char *why;
        enum cluster_kind kind;
        uint64_t h;

        ret = cluster_get_entry(img->cl, pos >> m->cluster_bits, &entry, &bitmap);
        if (ret < 0)
            return ret;
        if (cluster_decode_entry(m, entry, bitmap, 0, &kind, &h, &why) < 0)
            break;              /* the slow path reports it */
        image_decode_state(img, entry, bitmap, &st);
        if (st.compressed || !st.has_host || !(entry & META_L2_COPIED))
            break;
        if (m->extended_l2) {
            unsigned u0 = (unsigned)(in / unit), u1 = (unsigned)((in + n - 1) / unit);
            uint32_t need = (uint32_t)((u1 == 31 ? 0xffffffffu : ((1u << (u1 + 1)) - 1)) &
                                       ~((1u << u0) - 1));
            if ((st.alloc & need) != need)
                break;
        } else if (!st.alloc) {
            break;
        }
        if (*bytes == 0)
            *host = st.host + in;
        else if (*host + *bytes != st.host + in)
            break;
        *bytes += n;
        pos += n;
    }
    return 0;
}

/* Fill @len bytes of @buf with what guest offset @goff of a unit held
 * before the write, per its old state. */
static int old_content(struct image *img, const struct old_state *st,
                       unsigned u, const uint8_t *decompressed,
                       uint64_t goff, uint8_t *buf, size_t len)
{
    const struct meta *m = &img->meta;
    uint64_t in = goff & (m->cluster_size - 1);

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

static uint32_t unit_mask(unsigned u0, unsigned u1)
{
    uint32_t hi = u1 >= 31 ? 0xffffffffu : (1u << (u1 + 1)) - 1;
    return hi & ~((1u << u0) - 1);
}

/*
 * Write [offset, offset + n) of one guest cluster that cannot be written in
 * place: allocate (or take over) its host cluster, copy what the write does
 * not cover from the old contents, then point the L2 entry at it.
 * Called with the metadata lock held; drops it around the data I/O.
 */
static int write_cluster(struct image *img, const uint8_t *data, uint64_t offset,
                         uint64_t n)
{
    struct meta *m = &img->meta;
    uint64_t cs = m->cluster_size, gc = offset >> m->cluster_bits;
    uint64_t in = offset & (cs - 1), unit = m->extended_l2 ? cs / 32 : cs;
    unsigned u0 = (unsigned)(in / unit), u1 = (unsigned)((in + n - 1) / unit);
    uint32_t all = m->extended_l2 ? 0xffffffffu : 1u;
    uint32_t written = m->extended_l2 ? unit_mask(u0, u1) : 1u;
    uint32_t carry, new_alloc, new_zero, span;
    uint64_t entry, bitmap, new_host, refs, old_host, old_len;
    uint8_t *buf = NULL, *plain = NULL;
    struct old_state st;
    bool reuse = false, allocated = false;
    int fresh = 0, ret;
    unsigned lo, hi;

    ret = cluster_prepare_l2(img->cl, gc);
    if (ret < 0)
        return ret;
    ret = cluster_get_entry(img->cl, gc, &entry, &bitmap);
    if (ret == 0)
        ret = cluster_check_old_entry(img->cl, gc, entry, bitmap, &old_host, &old_len);
    if (ret < 0)
        return ret;
    image_decode_state(img, entry, bitmap, &st);

    /* Where the cluster will live. */
    if (m->has_data_file) {
        new_host = gc << m->cluster_bits;   /* fixed guest = host mapping */
        reuse = true;
        st.host = new_host;
    } else if (st.has_host) {
        if (entry & META_L2_COPIED) {
            reuse = true;
        } else {
            ret = refcount_get(img->rc, st.host, &refs);
            if (ret < 0)
                return ret;
            reuse = refs == 1;
        }
    }
    if (reuse) {
        new_host = st.host;
    } else {
        ret = refcount_alloc(img->rc, 1, &new_host, &fresh);
        if (ret < 0)
            return ret;
        allocated = true;
        img->clusters_allocated++;
    }
    if (!m->has_data_file) {
        ret = meta_check_write(m, new_host, cs, META_KIND_NONE);
        if (ret < 0)
            return ret;
    }

    /* Units that move from the old host cluster (or the compressed data)
     * into the new one, and the new allocation state. */
    carry = st.compressed ? all : (!reuse ? st.alloc : 0);
    new_alloc = (reuse ? st.alloc : carry) | written;
    new_zero = st.zero & ~new_alloc;
    span = written | carry;
    lo = (unsigned)__builtin_ctz(span);
    hi = 31 - (unsigned)__builtin_clz(span);

    unlock_exclusive(img);

    buf = malloc(cs);
    if (!buf) {
        ret = -ENOMEM;
        goto relock;
    }
    if (st.compressed) {
        struct cluster_run run = { .kind = CLUSTER_COMPRESSED, .bytes = cs,
                                   .l2_entry = entry };
        plain = malloc(cs);
        ret = plain ? image_read_compressed(img, &run, gc << m->cluster_bits, plain, NULL) : -ENOMEM;
        if (ret < 0)
            goto relock;
    }

    if (!m->extended_l2 && !st.compressed && !st.alloc &&
        ((st.zero & 1) || !img->backing)) {
        /*
         * The guest cluster reads as zeros around the write.  A fresh host
         * cluster does too: write only the data.  A reused one (freed
         * earlier) may hold old bytes: rather than writing a cluster of
         * zeros, punch it, as discard=unmap gives freed space back anyway
         * (discard=ignore keeps space allocated, so it gets the zeros).
         */
        if (!fresh && allocated && n < cs && img->discard == IMAGE_DISCARD_UNMAP &&
            io_punch_hole(m->data_io, new_host, cs) == 0)
            fresh = 1;
        if (fresh) {
            ret = io_pwrite(m->data_io, data, n, new_host + in);
            goto relock;
        }
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
        if (reuse && (st.alloc & (1u << u)) && !(written & (1u << u)))
            continue;                           /* not written: already there */
        ret = old_content(img, &st, u, plain, (gc << m->cluster_bits) + ustart,
                          buf + ustart, unit);
        if (ret < 0)
            goto relock;
    }
    memcpy(buf + in, data, n);

    if (reuse && m->extended_l2) {
        /* Only the written units' span changes on the host. */
        ret = io_pwrite(m->data_io, buf + (uint64_t)u0 * unit,
                        (uint64_t)(u1 - u0 + 1) * unit, new_host + (uint64_t)u0 * unit);
    } else {
        ret = io_pwrite(m->data_io, buf + (uint64_t)lo * unit,
                        (uint64_t)(hi - lo + 1) * unit, new_host + (uint64_t)lo * unit);
    }

relock:
    free(buf);
    free(plain);
    lock_exclusive(img);
    if (ret < 0) {
        if (allocated)          /* nothing refers to it yet */
            (void)refcount_update(img->rc, new_host, cs, -1);
        return ret;
    }

    entry = new_host | META_L2_COPIED;
    bitmap = m->extended_l2 ? ((uint64_t)new_zero << 32 | new_alloc) : 0;
    ret = cluster_set_entry(img->cl, gc, entry, bitmap, true);
    if (ret < 0)
        return ret;
    if (old_len && !reuse)      /* compressed data, or a shared cluster */
        ret = refcount_defer_free(img->rc, old_host, old_len);
    return ret;
}

static int64_t write_batch(struct image *img, const uint8_t *data, uint64_t offset,
                           uint64_t len);

/* The write proper.  On entry the caller holds the guest range and the
 * metadata lock; on exit it still holds both (the lock is dropped around
 * data I/O). */
int image_write_range(struct image *img, const uint8_t *p, uint64_t len,
                       uint64_t offset)
{
    int ret;

    ret = image_prepare_write(img);
    while (ret == 0 && len > 0) {
        uint64_t host = 0, bytes;

        ret = inplace_run(img, offset, len, &host, &bytes);
        if (ret < 0)
            break;
        if (bytes) {
            if (!img->meta.has_data_file) {
                ret = meta_check_write(&img->meta, host, bytes, META_KIND_NONE);
                if (ret < 0)
                    break;
            }
            unlock_exclusive(img);
            ret = io_pwrite(img->meta.data_io, p, bytes, host);
            lock_exclusive(img);
        } else {
            uint64_t cs = img->meta.cluster_size;
            int64_t done = write_batch(img, p, offset, len);
            if (done < 0) {
                ret = (int)done;
                break;
            }
            bytes = (uint64_t)done;
            if (!bytes) {
                bytes = cs - (offset & (cs - 1));
                if (bytes > len)
                    bytes = len;
                ret = write_cluster(img, p, offset, bytes);
            }
        }
        p += bytes;
        offset += bytes;
        len -= bytes;
    }
    return ret;
}

/* Whether [@offset, +@len) lies inside the disk: -ENOSPC past its end, as
 * for a write that starts there (see fuse_ops.c). */
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

static bool all_zero(const uint8_t *p, size_t len)
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

/*
 * Whole clusters that the write covers entirely and that need a new host
 * cluster: allocate them as one contiguous run and write them with one host
 * I/O.  Returns the bytes written (0 when the first cluster does not
 * qualify).  Called with the metadata lock held; drops it around the I/O.
 */
#define BATCH_MAX_CLUSTERS 256

static int64_t write_batch(struct image *img, const uint8_t *data, uint64_t offset,
                           uint64_t len)
{
    struct meta *m = &img->meta;
    uint64_t cs = m->cluster_size, gc0 = offset >> m->cluster_bits;
    uint64_t old_host[BATCH_MAX_CLUSTERS], old_len[BATCH_MAX_CLUSTERS];
    uint64_t n = 0, host;
    int fresh, ret;

    if ((offset & (cs - 1)) || len < 2 * cs || m->has_data_file)
        return 0;
    while (n < BATCH_MAX_CLUSTERS && (n + 1) * cs <= len) {
        uint64_t entry, bitmap;
        ret = cluster_prepare_l2(img->cl, gc0 + n);
        if (ret == 0)
            ret = cluster_get_entry(img->cl, gc0 + n, &entry, &bitmap);
        if (ret < 0)
            return ret;
        /* Clusters we own are overwritten in place by the caller. */
        if (!(entry & META_L2_COMPRESSED) && (entry & META_L2_COPIED))
            break;
        ret = cluster_check_old_entry(img->cl, gc0 + n, entry, bitmap, &old_host[n],
                                      &old_len[n]);
        if (ret < 0)
            return ret;
        n++;
    }
    if (n < 2)
        return 0;

    ret = refcount_alloc(img->rc, n, &host, &fresh);
    if (ret < 0)
        return ret;
    ret = meta_check_write(m, host, n * cs, META_KIND_NONE);
    if (ret < 0)
        return ret;
    img->clusters_allocated += n;

    unlock_exclusive(img);
    ret = io_pwrite(m->data_io, data, n * cs, host);
    lock_exclusive(img);
    if (ret < 0) {
        (void)refcount_update(img->rc, host, n * cs, -1);
        return ret;
    }

    for (uint64_t i = 0; i < n; i++) {
        ret = cluster_set_entry(img->cl, gc0 + i, (host + i * cs) | META_L2_COPIED,
                                m->extended_l2 ? 0xffffffffull : 0, true);
        if (ret == 0 && old_len[i])
            ret = refcount_defer_free(img->rc, old_host[i], old_len[i]);
        if (ret < 0)
            return ret;
    }
    return (int64_t)(n * cs);
}

int image_write(struct image *img, const void *buf, size_t len, uint64_t offset)
{
    struct range r;
    int ret = image_check_writable(img, offset, len);

    if (ret < 0 || len == 0)
        return ret;
    img->bytes_written += len;
    /* The range may have been held by a shrinking resize: once it is ours,
     * the size is checked again, so nothing is allocated past the end. */
    if (img->detect_zeroes != IMAGE_DETECT_ZEROES_OFF && all_zero(buf, len)) {
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
