/*
 * image_zero — zeroing and discard (by changing L2 entries where the format
 * allows, else by writing zeros), preallocation, and resize.
 */
#include "image_impl.h"

#include "bitmap.h"
#include "cluster.h"
#include "header.h"
#include "io.h"
#include "log.h"
#include "meta.h"
#include "refcount.h"

#include <errno.h>
#include <stdlib.h>

/* ---- zeroing, discard, preallocation, resize ----------------------------- */

/*
 * Make whole guest cluster @gc read as zeros by changing its L2 entry.
 * *need_write is set when the format cannot express it (v2 over a backing
 * file): the caller then writes zeros.  Called with the metadata lock held.
 */
static int zero_cluster(struct image *img, uint64_t gc, bool unmap, bool *need_write)
{
    struct meta *m = &img->meta;
    uint64_t new_entry, new_bitmap = 0;
    bool backing = img->backing && (gc << m->cluster_bits) < image_size(img->backing);
    bool keep_host = false;
    struct old_state st;
    int ret;

    *need_write = false;
    /* What the entry names is freed below: a corrupt entry frees nothing. */
    ret = image_old_state(img, gc, &st);
    if (ret < 0)
        return ret;

    if (!m->v3 && backing) {
        *need_write = true;
        return 0;
    }
    if (m->has_data_file) {
        keep_host = true;       /* the mapping is fixed; raw files get zeros */
    } else if (!unmap && st.has_host && (st.entry & META_L2_COPIED) &&
               (m->v3 || m->extended_l2)) {
        keep_host = true;       /* zero range keeps the allocation (needs the
                                 * zero flag: v2 has none) */
    }

    if (keep_host && st.has_host) {
        new_entry = st.host | META_L2_COPIED;
        if (m->extended_l2)
            new_bitmap = (uint64_t)CLUSTER_ALL_SUBCLUSTERS << 32;
        else
            new_entry |= META_L2_ZERO;
    } else if (!backing && (unmap || !m->v3)) {
        new_entry = 0;          /* nothing beneath: unallocated reads zero */
    } else if (m->extended_l2) {
        new_entry = 0;
        new_bitmap = (uint64_t)CLUSTER_ALL_SUBCLUSTERS << 32;
    } else {
        new_entry = META_L2_ZERO;
    }
    if (new_entry == st.entry && new_bitmap == st.bitmap)
        return 0;
    if (st.entry == 0 && st.bitmap == 0 && new_entry == 0 && new_bitmap == 0)
        return 0;

    ret = image_prepare_write(img);
    if (ret < 0)
        return ret;
    ret = cluster_prepare_l2(img->cl, gc);
    if (ret < 0)
        return ret;
    ret = cluster_set_entry(img->cl, gc, new_entry, new_bitmap, false);
    if (ret < 0)
        return ret;
    if (m->data_file_raw) {
        /* The raw data file must read as the disk does. */
        ret = io_punch_hole(m->data_io, gc << m->cluster_bits, m->cluster_size);
        if (ret < 0) {
            *need_write = true;
            ret = 0;
        }
    }
    if (st.free_len && !keep_host)
        ret = refcount_defer_free(img->rc, st.free_host, st.free_len);
    return ret;
}

/* Zero [offset, offset + len).  On entry the range is held exclusively. */
int image_zero_range(struct image *img, uint64_t offset, uint64_t len, bool unmap)
{
    struct meta *m = &img->meta;
    uint64_t cs = m->cluster_size, end = offset + len;
    uint8_t *zeros = NULL;
    int ret = 0;

    while (offset < end && ret == 0) {
        uint64_t in = cluster_offset_in(offset, cs);
        uint64_t n = cs - in < end - offset ? cs - in : end - offset;

        if (n == cs) {
            bool need_write;
            lock_exclusive(img);
            ret = zero_cluster(img, offset >> m->cluster_bits, unmap, &need_write);
            unlock_exclusive(img);
            if (ret < 0 || !need_write)
                goto next;
        } else {
            /* A partial cluster: only what does not already read as zero
             * is written. */
            struct cluster_run run;
            lock_exclusive(img);
            ret = cluster_lookup(img->cl, offset, n, &run);
            unlock_exclusive(img);
            if (ret < 0)
                break;
            if (run.kind == CLUSTER_ZERO ||
                (run.kind == CLUSTER_UNALLOCATED &&
                 (!img->backing || offset >= image_size(img->backing)))) {
                n = run.bytes;
                goto next;
            }
        }
        if (!zeros && !(zeros = calloc(1, cs))) {
            ret = -ENOMEM;
            break;
        }
        lock_exclusive(img);
        ret = image_write_range(img, zeros, n, offset);
        unlock_exclusive(img);
next:
        offset += n;
    }
    free(zeros);
    if (ret == 0 && refcount_nb_deferred(img->rc) >= 4096) {
        /* Give freed space back before the queue grows without bound. */
        lock_exclusive(img);
        ret = image_flush_locked(img);
        unlock_exclusive(img);
    }
    return ret;
}

int image_zero(struct image *img, uint64_t offset, uint64_t len, bool punch)
{
    struct range r;
    int ret = image_check_writable(img, offset, len);

    if (ret < 0 || len == 0)
        return ret;
    bitmap_mark(img->bitmaps, offset, len);
    guest_begin(img);
    image_range_lock(img, &r, offset, len);
    ret = image_check_inside(img, offset, len);       /* a resize may have run */
    if (ret == 0)
        ret = image_zero_range(img, offset, len, punch && img->discard == IMAGE_DISCARD_UNMAP);
    image_range_unlock(img, &r);
    guest_end(img);
    return ret;
}

int image_preallocate(struct image *img, uint64_t offset, uint64_t len)
{
    uint64_t cs = img->meta.cluster_size, end;
    uint8_t *buf = NULL;
    struct range r;
    int ret = image_check_writable(img, offset, len);

    if (ret < 0 || len == 0)
        return ret;
    end = offset + len;
    offset = cluster_align_down(offset, cs);
    image_range_lock(img, &r, offset, end - offset);
    buf = malloc(cs);
    if (!buf)
        ret = -ENOMEM;
    while (ret == 0 && offset < end && offset < img->size) {
        struct cluster_run run;
        uint64_t n = img->size - offset < cs ? img->size - offset : cs;

        lock_exclusive(img);
        ret = cluster_lookup(img->cl, offset, n, &run);
        unlock_exclusive(img);
        if (ret < 0)
            break;
        /* Writing back what the cluster reads allocates it unchanged.  The
         * content stays, the image changes: marked, as QEMU marks every
         * write. */
        if (!(run.kind == CLUSTER_DATA && run.bytes == n)) {
            bitmap_mark(img->bitmaps, offset, n);
            ret = image_read_range(img, buf, n, offset);
            if (ret == 0) {
                lock_exclusive(img);
                ret = image_write_range(img, buf, n, offset);
                unlock_exclusive(img);
            }
        }
        offset += n;
    }
    free(buf);
    image_range_unlock(img, &r);
    return ret;
}

/*
 * Make the range a resize adds, [@old, @new_size), read as zeros instead of
 * the backing file beneath it, as QEMU does (since 5.0).  The bytes of the
 * old last cluster from @old on may hold backing or old data: they are
 * written as zeros.  Whole clusters after it become zero clusters (no data
 * written; unallocated where the backing file ends before them), the last
 * one too when it reaches past the new end: its tail lies outside the disk,
 * and the next growth starts zeroing at the new end again.
 * On entry: the range is held, the L1 table maps @new_size, the image has
 *           the zero flag (v3).
 */
static int zero_grown_range(struct image *img, uint64_t old, uint64_t new_size)
{
    uint64_t cs = img->meta.cluster_size;
    uint64_t head_end = cluster_align_up(old, cs);
    uint64_t end = cluster_align_up(new_size, cs);
    int ret = 0;

    if (head_end > old)
        ret = image_zero_range(img, old, (head_end < new_size ? head_end : new_size) - old,
                         false);
    /* Unmapped: the new clusters hold nothing worth keeping allocated. */
    if (ret == 0 && end > head_end)
        ret = image_zero_range(img, head_end, end - head_end, true);
    return ret;
}

int image_resize(struct image *img, uint64_t new_size)
{
    struct meta *m = &img->meta;
    uint64_t cs = m->cluster_size, old;
    uint64_t clusters, need_l1;
    bool zero_new;
    struct range r;
    int ret;

    if (image_is_read_only(img))
        return -EROFS;
    if (meta_is_corrupt(m) || image_flush_failed(img))
        return -EIO;
    if (bitmap_count(img->bitmaps)) {
        /* QEMU resizes only bitmaps it has loaded, and none marked in use;
         * we do not resize them at all. */
        log_warn("%s: resize to %llu refused: the image has %u persistent dirty "
                 "bitmaps, which qcow2fuse does not resize (qemu-img resize does, "
                 "unmounted)", img->path, (unsigned long long)new_size,
                 bitmap_count(img->bitmaps));
        return -EOPNOTSUPP;
    }
    if (new_size % 512) {
        log_warn("%s: resize to %llu refused: the size must be a multiple of 512",
                 img->path, (unsigned long long)new_size);
        return -EINVAL;
    }
    clusters = (new_size + cs - 1) / cs;
    need_l1 = (clusters + m->l2_entries - 1) / m->l2_entries;
    if (need_l1 * 8 > HEADER_MAX_L1_BYTES || new_size >> 61)
        return -EFBIG;

    /* All of the disk (sizes stay below 2^61), and the size read only once
     * it is ours: another resize may have changed it while this one
     * waited. */
    image_range_lock(img, &r, 0, 1ull << 62);
    old = img->size;
    ret = 0;
    if (new_size == old)
        goto out;
    /* A backing file that reaches past the old end would show through the
     * new range (read as zeros in QEMU); v2 has no zero flag to hide it. */
    zero_new = new_size > old && img->backing && image_size(img->backing) > old;
    if (zero_new && !m->v3) {
        log_warn("%s: growing to %llu bytes refused: the backing file (%llu bytes) "
                 "is larger than the disk (%llu bytes) and would show in the new "
                 "range; a version 2 image has no zero flag to hide it (QEMU "
                 "refuses this too; qemu-img amend -o compat=1.1 upgrades the image)",
                 img->path, (unsigned long long)new_size,
                 (unsigned long long)image_size(img->backing), (unsigned long long)old);
        ret = -EOPNOTSUPP;
        goto out;
    }
    if (new_size < old) {
        /* Only unallocated clusters may be cut off. */
        uint64_t pos = cluster_align_up(new_size, cs);
        while (pos < old) {
            struct cluster_run run;
            lock_exclusive(img);
            ret = cluster_lookup(img->cl, pos, old - pos, &run);
            unlock_exclusive(img);
            if (ret < 0)
                goto out;
            if (run.kind != CLUSTER_UNALLOCATED) {
                log_warn("%s: shrinking to %llu bytes refused: guest offset "
                         "0x%llx beyond the new end holds data; discard it first",
                         img->path, (unsigned long long)new_size,
                         (unsigned long long)pos);
                ret = -EOPNOTSUPP;
                goto out;
            }
            pos += run.bytes;
        }
        /* The cut-off tail of the last cluster must not come back if the
         * disk grows again. */
        if (cluster_offset_in(new_size, cs)) {
            uint64_t tail_end = cluster_align_up(new_size, cs);
            ret = image_zero_range(img, new_size, (tail_end < old ? tail_end : old) - new_size,
                             false);
            if (ret < 0)
                goto out;
        }
    }

    lock_exclusive(img);
    ret = image_prepare_write(img);
    if (ret == 0 && need_l1 > cluster_l1_size(img->cl)) {
        ret = image_flush_locked(img);
        if (ret == 0)
            ret = cluster_grow_l1(img->cl, (uint32_t)need_l1);
    }
    if (ret == 0 && zero_new) {
        unlock_exclusive(img);
        ret = zero_grown_range(img, old, new_size);
        lock_exclusive(img);
        /* Durable before the header shows the range: after a crash it must
         * not read as backing data either. */
        if (ret == 0)
            ret = image_flush_locked(img);
    }
    if (ret == 0 && m->data_file_raw && new_size > old) {
        uint64_t dsize;
        ret = io_get_size(m->data_io, &dsize);
        if (ret == 0 && dsize < new_size)
            ret = io_truncate(m->data_io, new_size);
    }
    if (ret == 0) {
        ret = header_write_size(img->io, new_size);
        if (ret == 0)
            ret = io_flush(img->io);
    }
    if (ret == 0) {
        img->size = new_size;
        img->hdr.size = new_size;
        m->virtual_size = new_size;
        log_info("%s: virtual size changed from %llu to %llu bytes", img->path,
                 (unsigned long long)old, (unsigned long long)new_size);
    }
    unlock_exclusive(img);
out:
    image_range_unlock(img, &r);
    return ret;
}

