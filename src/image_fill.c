/*
 * image_fill — copying what the top image lacks from its backing chain into
 * it (copy-on-read, and the walk of the stream module), and dropping the
 * backing file once nothing is left beneath.
 *
 * A fill only fills.  It holds the guest range of the span it copies, as a
 * write does, looks at every cluster's L2 entry under it, and copies only
 * the units (subclusters, or the whole cluster) that are still unallocated;
 * a guest write that allocated a cluster first is never overwritten, and
 * one that comes later waits for the range and then wins.  The data goes
 * through image_write_range (clusters that read as zeros become zero
 * clusters through image_zero_range), so the write ordering of
 * image_flush.c holds for it as for any guest write.
 *
 * Why inside the image module: the fill needs the request ranges, the L2
 * entries as they are under them, and the write plan, none of which the
 * image interface shows; the stream module above only walks, throttles and
 * reports.
 */
#include "image_impl.h"

#include "cluster.h"
#include "header.h"
#include "io.h"
#include "log.h"
#include "meta.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* At most this many bytes (or one cluster) are read from the chain and
 * filled under one range: a guest write to the span waits that long. */
#define FILL_SPAN_MAX   (1u << 20)

bool image_has_backing(struct image *img)
{
    return img->backing != NULL;
}

unsigned image_guest_requests(struct image *img)
{
    return img->guest_requests;
}

uint64_t image_chain_size(struct image *img)
{
    struct image *chain;
    uint64_t size = 0;

    img->backing_users++;
    chain = img->backing;
    if (chain)
        size = image_size(chain);
    img->backing_users--;
    return size;
}

void image_report_stream(struct image *img, enum image_stream_state state, uint64_t pos,
                         uint64_t total)
{
    img->stream_pos = pos;
    img->stream_total = total;
    img->stream_state = (int)state;
}

/* The units of guest cluster @gc that read from the backing chain: neither
 * allocated nor zero (compressed clusters are whole).  Called with the
 * metadata lock held. */
static int missing_units(struct image *img, uint64_t gc, uint32_t *missing)
{
    uint32_t all = img->meta.extended_l2 ? CLUSTER_ALL_SUBCLUSTERS : 1u;
    struct old_state st;
    int ret = image_old_state(img, gc, &st);

    if (ret < 0)
        return ret;
    *missing = st.compressed ? 0 : all & ~(st.alloc | st.zero);
    return 0;
}

/* Read [@offset, +@len) of the chain (a read as read_backing's in
 * image_read.c).  Returns -ENOENT when the chain is gone. */
static int read_chain(struct image *img, uint8_t *buf, uint64_t len, uint64_t offset)
{
    struct image *chain;
    int ret = -ENOENT;

    img->backing_users++;
    chain = img->backing;
    if (chain)
        ret = image_read_range(chain, buf, len, offset);
    img->backing_users--;
    return ret;
}

/*
 * Fill the units @missing of the one cluster at @off (its first @n bytes
 * lie inside the disk) from @data, its contents in the chain.  Whole
 * missing clusters that read as zeros become zero clusters.
 * On entry: the range is held, the metadata lock not.
 */
static int fill_cluster(struct image *img, uint64_t off, uint64_t n, uint32_t missing,
                        const uint8_t *data)
{
    const struct meta *m = &img->meta;
    uint32_t all = m->extended_l2 ? CLUSTER_ALL_SUBCLUSTERS : 1u;
    uint64_t unit = m->extended_l2 ? m->cluster_size / 32 : m->cluster_size;
    int ret = 0;

    if (missing == all && n == m->cluster_size && image_all_zero(data, n))
        return image_zero_range(img, off, n, false);
    for (unsigned u = 0; u < 32 && ret == 0 && u * unit < n; u++) {
        unsigned v = u;
        if (!(missing & (1u << u)))
            continue;
        while (v + 1 < 32 && (missing & (1u << (v + 1))) && (v + 1) * unit < n)
            v++;
        uint64_t start = u * unit, end = (v + 1) * unit < n ? (v + 1) * unit : n;
        lock_exclusive(img);
        ret = image_write_range(img, data + start, end - start, off + start);
        unlock_exclusive(img);
        u = v;
    }
    return ret;
}

/*
 * Fill what is missing of the clusters of [@start, +@len) (cluster aligned,
 * @len at most FILL_SPAN_MAX).  Whole clusters missing in a row are written
 * as one run (one allocation, one host write).
 * On exit: *filled grew by the bytes filled.
 */
static int fill_span(struct image *img, uint64_t start, uint64_t len, uint64_t *filled)
{
    const struct meta *m = &img->meta;
    uint64_t cs = m->cluster_size, nb, size;
    uint32_t all = m->extended_l2 ? CLUSTER_ALL_SUBCLUSTERS : 1u;
    uint32_t missing[FILL_SPAN_MAX / 512];  /* nb <= this: cs >= 512 */
    uint8_t *buf = NULL;
    bool any = false;
    struct range r;
    int ret;

    lock_exclusive(img);
    image_range_lock_locked(img, &r, start, len);
    size = img->size;           /* a resize may have run: now it cannot */
    if (start >= size) {
        ret = 0;
        goto unlock;
    }
    if (len > size - start)
        len = size - start;
    nb = (len + cs - 1) / cs;
    for (uint64_t i = 0; i < nb; i++) {
        ret = missing_units(img, (start >> m->cluster_bits) + i, &missing[i]);
        if (ret < 0)
            goto unlock;
        any |= missing[i] != 0;
    }
    unlock_exclusive(img);
    if (!any) {
        ret = 0;
        goto out;
    }

    buf = malloc(len);
    ret = buf ? read_chain(img, buf, len, start) : -ENOMEM;
    if (ret == -ENOENT)
        ret = 0;                /* dropped: everything is local */
    if (ret < 0 || !img->backing)
        goto out;

    for (uint64_t i = 0; i < nb && ret == 0;) {
        uint64_t off = i * cs, n = len - off < cs ? len - off : cs, j = i;
        /* Whole clusters, missing, not all zero: one write for the lot. */
        while (j < nb && missing[j] == all && (j + 1) * cs <= len &&
               !image_all_zero(buf + j * cs, cs))
            j++;
        if (j - i >= 2) {
            lock_exclusive(img);
            ret = image_write_range(img, buf + off, (j - i) * cs, start + off);
            unlock_exclusive(img);
            if (ret == 0)
                *filled += (j - i) * cs;
            i = j;
            continue;
        }
        if (missing[i]) {
            ret = fill_cluster(img, start + off, n, missing[i], buf + off);
            if (ret == 0)
                *filled += n;
        }
        i++;
    }
out:
    free(buf);
    image_range_unlock(img, &r);
    return ret;
unlock:
    image_range_unlock_locked(img, &r);
    unlock_exclusive(img);
    return ret;
}

int image_fill(struct image *img, uint64_t offset, uint64_t len, uint64_t *filled)
{
    const struct meta *m = &img->meta;
    uint64_t cs = m->cluster_size, pos, end, chain_size;
    uint64_t span_max = cs > FILL_SPAN_MAX ? cs : FILL_SPAN_MAX;
    int ret;

    *filled = 0;
    chain_size = image_chain_size(img);
    if (chain_size == 0 || len == 0)
        return 0;
    ret = image_check_writable(img, 0, 0);
    if (ret < 0)
        return ret;
    pos = cluster_align_down(offset, cs);
    end = cluster_align_up(offset + len, cs);
    /* Past the chain's end the disk reads as zeros with or without it. */
    if (end > cluster_align_up(chain_size, cs))
        end = cluster_align_up(chain_size, cs);

    while (pos < end) {
        struct cluster_run run;
        uint64_t size = img->size, stop;

        if (pos >= size)
            break;
        lock_exclusive(img);
        ret = cluster_lookup(img->cl, pos, (end < size ? end : size) - pos, &run);
        unlock_exclusive(img);
        if (ret < 0)
            return ret;
        if (run.kind != CLUSTER_UNALLOCATED) {
            pos += run.bytes;
            continue;
        }
        /* An unallocated subcluster may start inside a cluster: fill from
         * the cluster's start (fill_span looks at every unit). */
        stop = cluster_align_up(pos + (run.bytes < span_max ? run.bytes : span_max), cs);
        pos = cluster_align_down(pos, cs);
        if (stop - pos > span_max)
            stop = pos + span_max;
        if (stop > end)
            stop = end;
        ret = fill_span(img, pos, stop - pos, filled);
        if (ret < 0)
            return ret;
        pos = stop;
    }
    img->bytes_filled += *filled;
    return 0;
}

void image_copy_on_read(struct image *img, uint64_t offset, uint64_t len)
{
    uint64_t filled = 0;
    int ret = image_fill(img, offset, len, &filled);

    img->bytes_copied_on_read += filled;
    if (ret < 0)
        log_warn("%s: copy-on-read of [0x%llx, +%llu) failed: %s (the read "
                 "succeeded; the clusters still read from the backing chain)",
                 img->path, (unsigned long long)offset, (unsigned long long)len,
                 strerror(-ret));
}

int image_drop_backing(struct image *img)
{
    struct image *chain;
    int ret;

    if (!img->backing)
        return 0;
    /* Internal snapshots read the chain where they have no cluster of
     * their own: without it they would read zeros there. */
    if (img->hdr.nb_snapshots) {
        log_warn("%s: the whole disk is local, but the backing file stays in the "
                 "header: the image's %u internal snapshots still read from it "
                 "where they have no data of their own", img->path,
                 img->hdr.nb_snapshots);
        return -EBUSY;
    }
    /* Invariant 9 of image_flush.c: what was copied is durable first. */
    ret = image_flush_quiet(img);
    if (ret < 0)
        return ret;
    lock_exclusive(img);
    ret = header_write_backing_file(img->io, 0, 0);
    if (ret == 0)
        ret = io_flush(img->io);
    if (ret == 0)
        ret = header_remove_extension(img->io, &img->hdr, QCOW2_EXT_BACKING_FORMAT);
    if (ret == 0)
        ret = io_flush(img->io);
    if (ret < 0) {
        unlock_exclusive(img);
        (void)image_flush_failed(img);
        log_error("%s: dropping the backing file from the header failed: %s",
                  img->path, strerror(-ret));
        return ret;
    }
    header_forget_backing(&img->hdr);
    /* Under the lock: a lookup made from now on sees the new generation
     * and no chain; one made before reads again (read_backing). */
    img->chain_gen++;
    chain = img->backing;
    img->backing = NULL;
    unlock_exclusive(img);
    /* The write path (copy-on-write of a partial cluster) reads the chain
     * only for units that are unallocated, and there are none (On entry);
     * reads that looked a cluster up before it was filled may still be in
     * it: wait for them. */
    while (img->backing_users)
        usleep(1000);
    image_close(chain);
    return 0;
}
