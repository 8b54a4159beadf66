/*
 * image — opening and closing an image and its chain (backing files, an
 * external data file, the repair of a dirty lazy-refcounts image), views of
 * its internal snapshots, the
 * request ranges that keep changes of one cluster apart, the sticky host
 * flush failure, and statistics.  The I/O paths are in image_read.c,
 * image_write.c, image_flush.c and image_zero.c; what they share is in
 * image_impl.h.
 */
#include "image_impl.h"

#include "bitmap.h"
#include "cache.h"          /* struct cache_stats */
#include "check.h"
#include "cluster.h"
#include "header.h"
#include "io.h"
#include "log.h"
#include "meta.h"
#include "refcount.h"
#include "snapshot.h"

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void view_free(struct image *view);

static void image_free(struct image *img)
{
    if (!img)
        return;
    if (img->view_of) {
        view_free(img);
        return;
    }
    if (img->backing)
        image_close(img->backing);
    bitmap_close(img->bitmaps);
    cluster_close(img->cl);
    refcount_close(img->rc);
    meta_set_destroy(&img->meta);
    io_close(img->data_io);
    io_close(img->io);
    header_free(&img->hdr);
    pthread_rwlock_destroy(&img->tables);
    pthread_mutex_destroy(&img->lock);
    pthread_cond_destroy(&img->range_cond);
    free(img->data_path);
    free(img->path);
    free(img);
}

static struct image *image_alloc(void)
{
    struct image *img = calloc(1, sizeof(*img));

    if (img) {
        pthread_mutexattr_t attr;
        /* Held for table lookups of a few hundred nanoseconds: spinning
         * briefly beats sleeping in the kernel and switching threads. */
        pthread_mutexattr_init(&attr);
        pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP);
        pthread_mutex_init(&img->lock, &attr);
        pthread_mutexattr_destroy(&attr);
        /* Writers first: a steady stream of lookups must not starve an
         * allocation.  No reader takes the lock twice, as that deadlocks
         * with this kind when a writer waits in between. */
        pthread_rwlockattr_t rwattr;
        pthread_rwlockattr_init(&rwattr);
        pthread_rwlockattr_setkind_np(&rwattr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
        pthread_rwlock_init(&img->tables, &rwattr);
        pthread_rwlockattr_destroy(&rwattr);
        pthread_cond_init(&img->range_cond, NULL);
    }
    return img;
}

static int open_chain(const char *path, struct io *given_io,
                      const struct image_options *opts, bool writable,
                      unsigned depth, struct image **out);

static int open_raw(const char *path, struct io *io, struct image **out)
{
    uint64_t size = 0;
    struct image *img = image_alloc();
    int ret;

    if (!img) {
        io_close(io);
        return -ENOMEM;
    }
    img->is_raw = true;
    img->io = io;
    img->path = strdup(path);
    ret = io_get_size(io, &size);
    img->size = size;
    if (ret < 0 || !img->path) {
        image_free(img);
        return ret < 0 ? ret : -ENOMEM;
    }
    *out = img;
    return 0;
}

static int open_backing(struct image *img, const struct image_options *opts,
                        unsigned depth)
{
    /* The chain below is opened for the top image's owner. */
    struct image_options below = *opts;
    struct backing_owners owners = { .namer = backing_owner(img->io) };
    struct image *chain = NULL;
    enum backing_format fmt;
    struct io *bio = NULL;
    char *bpath = NULL;
    int ret;

    if (depth + 1 >= IMAGE_MAX_CHAIN_DEPTH) {
        log_error("%s: backing chain deeper than %d images (a loop?)",
                  img->path, IMAGE_MAX_CHAIN_DEPTH);
        return -ELOOP;
    }
    owners.top = opts->backing.top_owner ? opts->backing.top_owner : owners.namer;
    below.backing.top_owner = owners.top;
    ret = backing_open(img->path, img->hdr.backing_file, "backing file",
                       &opts->backing, &owners, false, &bpath, &bio);
    if (ret < 0)
        return ret;
    ret = backing_format(bio, bpath, img->hdr.backing_format, &fmt);
    if (ret < 0) {
        io_close(bio);
        goto out;
    }
    if (fmt == BACKING_FORMAT_RAW) {
        ret = open_raw(bpath, bio, &chain);
    } else {
        /* The descriptor opened for the owner, not a second open by name. */
        ret = io_lock_image(bio, bpath, false);
        if (ret < 0) {
            io_close(bio);
            goto out;
        }
        ret = open_chain(bpath, bio, &below, false, depth + 1, &chain);
    }
    img->backing = chain;
out:
    free(bpath);
    return ret;
}

static int open_data_file(struct image *img, const struct image_options *opts,
                          bool writable)
{
    struct backing_owners owners = { .namer = backing_owner(img->io) };
    char *dpath = NULL;
    int ret;

    if (!img->hdr.data_file) {
        log_error("%s: the external data file bit (incompatible bit 2) is set "
                  "but the image names no data file", img->path);
        return -EINVAL;
    }
    /* The data file is part of the image, not a backing file: under
     * backing=deny it is still allowed, but only as a regular file outside
     * /proc, /sys and /dev.  It is opened for the same users as a backing
     * file would be: as readable as one, and written to as well. */
    struct backing_options policy = opts->backing;
    if (policy.policy == BACKING_DENY)
        policy.policy = BACKING_DIR, policy.dir = "/";
    owners.top = opts->backing.top_owner ? opts->backing.top_owner : owners.namer;
    ret = backing_open(img->path, img->hdr.data_file, "external data file",
                       &policy, &owners, writable, &dpath, &img->data_io);
    if (ret < 0) {
        free(dpath);
        return ret;
    }
    img->data_path = dpath;
    io_set_name(img->data_io, img->data_path);
    return 0;
}

/*
 * A lazy-refcounts image left dirty by a crash: its refcounts cannot be
 * trusted, so they are rebuilt from the L1/L2 and snapshot tables before
 * anything is allocated, the COPIED flags of the active tables are set to
 * match, then the dirty bit is cleared.
 * On entry: the header is decoded and img->meta set up; neither the L1
 * table nor the refcount structures are loaded yet (this changes both on
 * disk).
 * On exit: img->hdr and img->meta describe the new refcount table, which
 * lies inside img->meta.file_end.
 */
static int rebuild_dirty(struct image *img)
{
    struct check_report rep = { 0 };
    struct check_refs *refs = NULL;
    long fixed;
    int ret;

    log_info("%s was not closed cleanly (dirty bit set): rebuilding refcounts",
             img->path);
    ret = check_count_refs(&img->meta, &img->hdr, &rep, &refs);
    if (ret < 0)
        goto out;
    if (rep.corruptions) {
        log_error("%s: %llu problems found while rebuilding refcounts of a dirty "
                  "image; run qemu-img check -r all", img->path,
                  (unsigned long long)rep.corruptions);
        ret = -EIO;
        goto out;
    }
    ret = check_rebuild_refcounts(&img->meta, &img->hdr, refs);
    if (ret < 0)
        goto out;
    fixed = check_fix_copied(&img->meta, &img->hdr, refs);
    if (fixed < 0) {
        ret = (int)fixed;
        goto out;
    }
    ret = meta_update_incompatible(&img->meta, 0, QCOW2_INCOMPAT_DIRTY);
    img->hdr.incompatible_features = img->meta.incompatible;
    if (ret == 0)
        ret = io_flush(img->io);
out:
    if (ret < 0)
        log_error("%s: rebuilding the refcounts failed: %s", img->path, strerror(-ret));
    check_refs_free(refs);
    return ret;
}

/*
 * Register the snapshot table and the snapshots' L1 tables for the overlap
 * check.  A writable open needs a valid table: we could not protect it.
 */
static int mark_snapshots(struct image *img)
{
    struct snapshot_table t;
    char err[256];
    int ret = snapshot_table_read(img->io, &img->hdr, &t, err, sizeof(err));

    if (ret < 0) {
        if (ret == -EINVAL)
            log_error("%s: %s; mount it read-only (-o ro) or run qcow2check",
                      img->path, err);
        return ret;
    }
    if (t.nb)
        ret = meta_mark(&img->meta, t.offset, t.bytes, META_KIND_SNAPSHOTS);
    for (uint32_t i = 0; ret == 0 && i < t.nb; i++) {
        ret = meta_mark(&img->meta, t.s[i].l1_offset, (uint64_t)t.s[i].l1_size * 8,
                        META_KIND_SNAPSHOTS);
        /* Their L2 tables too: an active L2 entry naming one must not
         * send guest data into a snapshot (qemu-iotests 060). */
        if (ret == 0)
            ret = cluster_mark_snapshot_l2(&img->meta, t.s[i].l1_offset, t.s[i].l1_size);
    }
    snapshot_table_free(&t);
    return ret;
}

/*
 * The L1 table and size a view of snapshot @s shows under header @h, with
 * @current the active disk's size: validated as every viewer of a
 * snapshot does (-o snapshot= and image_snapshot_view_open).  The table
 * reader bounded the L1 table's offset and size; here its disk size.  L1
 * entries are checked where a lookup uses them (cluster.c l2_table_of), as
 * for the active table.
 * Returns: 0, or -EINVAL with @err naming the snapshot, field and offset.
 */
static int snapshot_geometry(const struct qcow2_header *h, uint64_t current,
                             const struct snapshot *s, uint64_t *l1_offset,
                             uint32_t *l1_size, uint64_t *size, char *err,
                             size_t err_len)
{
    int ret = snapshot_check_view(h, s, err, err_len);

    if (ret < 0)
        return ret;
    *l1_offset = s->l1_offset;
    *l1_size = s->l1_size;
    *size = snapshot_disk_size(s, current);
    return 0;
}

/* The L1 table and size to show: the active ones, or a snapshot's. */
static int choose_view(struct image *img, const char *snap_name, uint64_t *l1_offset,
                       uint32_t *l1_size)
{
    const struct snapshot *s;
    struct snapshot_table t;
    uint64_t size;
    char err[256];
    int ret;

    *l1_offset = img->hdr.l1_table_offset;
    *l1_size = img->hdr.l1_size;
    if (!snap_name)
        return 0;
    ret = snapshot_table_read(img->io, &img->hdr, &t, err, sizeof(err));
    if (ret < 0) {
        if (ret == -EINVAL)
            log_error("%s: %s", img->path, err);
        return ret;
    }
    s = snapshot_find(&t, snap_name);
    if (!s) {
        log_error("%s: no internal snapshot named \"%s\" (%u snapshots; list "
                  "them with qcow2fuse --list-snapshots)", img->path, snap_name, t.nb);
        snapshot_table_free(&t);
        return -ENOENT;
    }
    ret = snapshot_geometry(&img->hdr, img->hdr.size, s, l1_offset, l1_size, &size,
                            err, sizeof(err));
    if (ret < 0)
        log_error("%s: %s", img->path, err);
    else
        img->size = size;
    snapshot_table_free(&t);
    return ret;
}

static uint64_t default_l2_cache(const struct image *img)
{
    uint64_t clusters = (img->size + img->meta.cluster_size - 1) >> img->meta.cluster_bits;
    uint64_t bytes = clusters * img->meta.l2_entry_bytes;

    return bytes < IMAGE_DEFAULT_L2_CACHE_MAX ? bytes : IMAGE_DEFAULT_L2_CACHE_MAX;
}

static int open_chain(const char *path, struct io *given_io,
                      const struct image_options *opts, bool writable,
                      unsigned depth, struct image **out)
{
    struct image *img = image_alloc();
    char err[512];
    int ret;

    if (!img) {
        io_close(given_io);
        return -ENOMEM;
    }
    img->io = given_io;
    img->path = strdup(path);
    if (!img->path) {
        ret = -ENOMEM;
        goto fail;
    }
    if (given_io) {
        img->io = given_io;
    } else {
        ret = io_open_file(path, writable, &img->io);
        if (ret < 0) {
            log_error("cannot open %s%s: %s", path, writable ? " for writing" : "",
                      strerror(-ret));
            goto fail;
        }
        ret = io_lock_image(img->io, path, writable);
        if (ret < 0)
            goto fail;
    }
    if (depth == 0 && opts->trace_fd >= 0) {
        struct io *traced;
        ret = io_open_trace(img->io, dup(opts->trace_fd), &traced);
        if (ret < 0)
            goto fail;
        img->io = traced;
    }
    ret = header_read(img->io, &img->hdr, err, sizeof(err));
    if (ret < 0) {
        /* A refused header is named; a failed read only returns its
         * -errno (as before header_read). */
        if (err[0] || ret == -ENOMEM)
            log_error("%s: %s", path, err[0] ? err : strerror(ENOMEM));
        goto fail;
    }

    if (writable && (img->hdr.incompatible_features & QCOW2_INCOMPAT_CORRUPT)) {
        log_error("%s: the image is marked corrupt (incompatible bit 1); it can "
                  "only be mounted read-only (-o ro); run qemu-img check -r all "
                  "to repair it", path);
        ret = -EROFS;
        goto fail;
    }

    img->size = img->hdr.size;
    img->compression = img->hdr.compression_type == 1 ? COMPRESS_ZSTD : COMPRESS_ZLIB;
    meta_init(&img->meta, &img->hdr, img->io, !writable);

    if (img->meta.has_data_file) {
        ret = open_data_file(img, opts, writable);
        if (ret < 0)
            goto fail;
        img->meta.data_io = img->data_io;
    } else {
        img->meta.data_io = img->io;
    }

    /* Before the L1 table is loaded: the repair may rewrite its COPIED
     * flags on disk, and an L1 read earlier would write the old flags
     * back with its next change. */
    if (writable && (img->hdr.incompatible_features & QCOW2_INCOMPAT_DIRTY)) {
        ret = rebuild_dirty(img);
        if (ret < 0)
            goto fail;
    }

    {
        uint64_t l1_offset;
        uint32_t l1_size;
        ret = choose_view(img, depth == 0 ? opts->snapshot : NULL, &l1_offset, &l1_size);
        if (ret < 0)
            goto fail;
        ret = cluster_open(&img->meta, l1_offset, l1_size,
                           opts->l2_cache_size ? opts->l2_cache_size
                                               : default_l2_cache(img),
                           &img->cl);
    }
    if (ret < 0)
        goto fail;

    if (writable) {
        uint64_t rc_bytes = opts->refcount_cache_size ? opts->refcount_cache_size
                                                      : (1u << 20);
        ret = meta_set_create(&img->meta);
        if (ret == 0)
            ret = meta_mark(&img->meta, 0, img->meta.cluster_size, META_KIND_HEADER);
        if (ret == 0)
            ret = mark_snapshots(img);
        if (ret == 0)
            ret = bitmap_open(&img->meta, &img->hdr, img->path, &img->bitmaps);
        if (ret < 0)
            goto fail;
        ret = refcount_open(&img->meta, img->hdr.refcount_table_offset,
                            img->hdr.refcount_table_clusters, rc_bytes, &img->rc);
        if (ret < 0)
            goto fail;
        ret = cluster_set_refcount(img->cl, img->rc);
        if (ret < 0)
            goto fail;
        if (opts->writethrough) {
            cluster_set_writethrough(img->cl, true);
            refcount_set_writethrough(img->rc, true);
        }
    }

    if (img->hdr.backing_file) {
        ret = open_backing(img, opts, depth);
        if (ret < 0)
            goto fail;
    }
    *out = img;
    return 0;

fail:
    image_free(img);
    return ret;
}

static int open_top(const char *path, struct io *io, const struct image_options *opts,
                    struct image **out)
{
    /* A snapshot's view is history: never written. */
    int ret = open_chain(path, io, opts, !opts->read_only && !opts->snapshot, 0, out);

    if (ret == 0) {
        (*out)->discard = opts->discard;
        (*out)->detect_zeroes = opts->detect_zeroes;
        (*out)->copy_on_read = opts->copy_on_read && !image_is_read_only(*out);
        io_set_name((*out)->io, (*out)->path);
    }
    return ret;
}

int image_open(const char *path, const struct image_options *opts,
               struct image **out)
{
    return open_top(path, NULL, opts, out);
}

int image_open_io(struct io *io, const char *name, const struct image_options *opts,
                  struct image **out)
{
    return open_top(name, io, opts, out);
}

/* ---- a failed host flush -------------------------------------------------- */

/* The -errno of the first failed host flush of the image file or of its
 * external data file, or 0. */
static int flush_error_of(const struct image *img)
{
    int err = io_flush_error(img->io);

    if (err == 0 && img->data_io)
        err = io_flush_error(img->data_io);
    return err;
}

/*
 * After a failed host flush the data written since the last good one may be
 * gone from the disk while the host's next flush succeeds; metadata written
 * from then on could point at it.  So, as QEMU does, the image takes no more
 * writes or flushes (the io layer refuses them: see struct io); reads go
 * on.  The two files fail together: the metadata in one depends on the data
 * in the other.
 * Returns whether a host flush has failed.
 */
bool image_flush_failed(struct image *img)
{
    int err = flush_error_of(img);

    if (err == 0)
        return false;
    io_poison(img->io, err);
    if (img->data_io)
        io_poison(img->data_io, err);
    return true;
}

int image_close(struct image *img)
{
    int ret = 0;

    /* Views borrow this image's files, chain and L2 cache. */
    assert(img->view_of || atomic_load(&img->views) == 0);
    if (!img->meta.read_only && !img->is_raw && image_flush_failed(img)) {
        /* Nothing more is written, not even the dirty bit: a lazy-refcounts
         * image is then rebuilt at its next writable open. */
        log_error("%s: closed without writing metadata back: a host flush "
                  "failed earlier (%s); writes after the last successful fsync "
                  "may be lost", img->path, strerror(-flush_error_of(img)));
        ret = -EIO;
    } else if (!img->meta.read_only && !img->is_raw) {
        ret = image_flush(img);
        /* The bitmaps after every change: they must cover it, and their
         * old clusters are freed by the flush after them. */
        if (ret == 0 && img->bitmaps) {
            lock_exclusive(img);
            ret = bitmap_store(img->bitmaps, img->rc);
            unlock_exclusive(img);
            if (ret == 0)
                ret = image_flush(img);
        }
        /* Every reference is durable: what is left of the reservation
         * goes back, or it would stay as leaked clusters. */
        if (ret == 0) {
            lock_exclusive(img);
            ret = refcount_release_reservation(img->rc);
            unlock_exclusive(img);
        }
        if (ret == 0 && img->set_dirty_bit) {
            ret = meta_update_incompatible(&img->meta, 0, QCOW2_INCOMPAT_DIRTY);
            if (ret == 0)
                ret = io_flush(img->io);
        }
    }
    image_free(img);
    return ret;
}

uint64_t image_size(const struct image *img)
{
    return img->size;
}

bool image_is_read_only(const struct image *img)
{
    return img->meta.read_only || img->is_raw;
}

uint32_t image_cluster_size(const struct image *img)
{
    return img->is_raw ? 65536 : (uint32_t)img->meta.cluster_size;
}

/* ---- request ranges -------------------------------------------------------- */

/* Wait until no other request holds a range overlapping [offset, +len),
 * then hold it.  Called with the metadata lock held (released while
 * waiting). */
void image_range_lock_locked(struct image *img, struct range *r, uint64_t offset,
                             uint64_t len)
{
    uint64_t cs = img->meta.cluster_size;

    r->start = cluster_align_down(offset, cs);
    r->end = cluster_align_up(offset + len, cs);
    for (;;) {
        struct range *o;
        for (o = img->ranges; o; o = o->next)
            if (o->start < r->end && r->start < o->end)
                break;
        if (!o)
            break;
        img->range_waiters++;
        wait_exclusive(img);
        img->range_waiters--;
    }
    r->next = img->ranges;
    img->ranges = r;
}

void image_range_unlock_locked(struct image *img, struct range *r)
{
    struct range **p;

    for (p = &img->ranges; *p != r; p = &(*p)->next)
        ;
    *p = r->next;
    if (img->range_waiters)
        pthread_cond_broadcast(&img->range_cond);
}

void image_range_lock(struct image *img, struct range *r, uint64_t offset,
                      uint64_t len)
{
    lock_exclusive(img);
    image_range_lock_locked(img, r, offset, len);
    unlock_exclusive(img);
}

void image_range_unlock(struct image *img, struct range *r)
{
    lock_exclusive(img);
    image_range_unlock_locked(img, r);
    unlock_exclusive(img);
}

/* The copy-on-read and stream part of the statistics line. */
static void append_fill_stats(struct image *img, char *buf, size_t len)
{
    static const char *const states[] = {
        [IMAGE_STREAM_RUNNING] = "running", [IMAGE_STREAM_DONE] = "done",
        [IMAGE_STREAM_STOPPED] = "stopped", [IMAGE_STREAM_FAILED] = "failed",
    };
    size_t used = strlen(buf);
    int state = img->stream_state;
    uint64_t size = img->stream_total, pos = img->stream_pos;

    if (img->copy_on_read && used < len)
        used += (size_t)snprintf(buf + used, len - used, ", copied on read %llu bytes",
                                 (unsigned long long)img->bytes_copied_on_read);
    if (state == IMAGE_STREAM_OFF || used >= len)
        return;
    if (pos > size)
        pos = size;
    snprintf(buf + used, len - used, ", stream %s %llu%% (%llu of %llu bytes walked, "
             "%llu bytes filled)", states[state],
             (unsigned long long)(size ? (double)pos * 100 / (double)size : 100),
             (unsigned long long)pos, (unsigned long long)size,
             (unsigned long long)img->bytes_filled);
}

void image_stats(struct image *img, char *buf, size_t len)
{
    struct cache_stats l2 = { 0 }, rc = { 0 };

    lock_exclusive(img);
    if (img->cl)
        cluster_cache_stats(img->cl, &l2);
    if (img->rc)
        refcount_cache_stats(img->rc, &rc);
    unlock_exclusive(img);
    snprintf(buf, len,
             "read %llu bytes, written %llu bytes, %llu clusters allocated, "
             "%llu flushes, L2 cache %llu hits %llu misses %llu evictions, "
             "refcount cache %llu hits %llu misses",
             (unsigned long long)img->bytes_read, (unsigned long long)img->bytes_written,
             (unsigned long long)img->clusters_allocated, (unsigned long long)img->flushes,
             (unsigned long long)l2.hits, (unsigned long long)l2.misses,
             (unsigned long long)l2.evictions, (unsigned long long)rc.hits,
             (unsigned long long)rc.misses);
    append_fill_stats(img, buf, len);
}

/* ---- views of internal snapshots ------------------------------------------ */

int image_snapshot_table(struct image *img, struct snapshot_table *t)
{
    char err[256];
    int ret;

    memset(t, 0, sizeof(*t));
    if (img->is_raw)
        return 0;
    ret = snapshot_table_read(img->io, &img->hdr, t, err, sizeof(err));
    if (ret == -EINVAL)
        log_error("%s: %s", img->path, err);
    return ret;
}

/* snapshot_geometry for a view over the open image @img, which may be
 * written (and resized) meanwhile. */
static int view_geometry(struct image *img, const struct snapshot *s,
                         uint64_t *l1_offset, uint32_t *l1_size, uint64_t *size,
                         char *err, size_t err_len)
{
    uint64_t current;

    if (img->meta.has_data_file) {
        /* QEMU refuses snapshots of such images: guest data lives at fixed
         * offsets of the data file, which holds only the current disk. */
        snprintf(err, err_len, "internal snapshots cannot be shown: the image "
                 "keeps its data in an external data file, which holds only "
                 "the current disk");
        return -EOPNOTSUPP;
    }
    lock_exclusive(img);        /* a resize changes it under the lock */
    current = img->hdr.size;
    unlock_exclusive(img);
    return snapshot_geometry(&img->hdr, current, s, l1_offset, l1_size, size, err,
                             err_len);
}

int image_snapshot_view_size(struct image *img, const struct snapshot *s,
                             uint64_t *size, char *err, size_t err_len)
{
    uint64_t l1_offset;
    uint32_t l1_size;

    return view_geometry(img, s, &l1_offset, &l1_size, size, err, err_len);
}

static void view_free(struct image *view)
{
    cluster_close(view->cl);
    atomic_fetch_sub(&view->view_of->views, 1);
    pthread_mutex_destroy(&view->meta.header_lock);
    pthread_rwlock_destroy(&view->tables);
    pthread_mutex_destroy(&view->lock);
    pthread_cond_destroy(&view->range_cond);
    free(view->path);
    free(view);
}

/*
 * Why a view needs no lock of its own against writes to the image it
 * views: a snapshot's L1 table is its own copy, and the tables and data
 * clusters it reaches are never changed in place nor freed while the
 * snapshot exists.  Each of them has a refcount of at least 2 (the
 * snapshot's and the active disk's) or is the snapshot's alone, and no
 * active entry names it with COPIED, so the write side copies before it
 * changes anything (cluster_prepare_l2 for a table; image_write.c
 * plan_inplace and plan_cluster take a cluster over only with COPIED or a
 * refcount of 1), and a zeroing or discard drops only the active disk's
 * reference (image_zero.c zero_cluster keeps a host cluster only with
 * COPIED; refcount_defer_free takes one reference away).  The overlap check
 * refuses any write of an L2 table a snapshot names (META_KIND_SNAPSHOT_L2),
 * also when its refcount is wrong.  So the slices of a snapshot's tables in
 * the shared cache always equal the disk, and what a view's lookup returns
 * stays valid after the lock is dropped; the lookups themselves follow the
 * active disk's rule (cluster.h), under its lock, since cache membership
 * changes under it.
 */
int image_snapshot_view_open(struct image *img, uint32_t index, struct image **out)
{
    struct snapshot_table t;
    struct image *view = NULL;
    uint64_t l1_offset, size;
    uint32_t l1_size;
    char err[256];
    int ret;

    if (img->is_raw || img->view_of)
        return -EINVAL;
    ret = image_snapshot_table(img, &t);
    if (ret < 0)
        return ret;
    if (index >= t.nb) {
        ret = -ENOENT;
        goto out;
    }
    ret = view_geometry(img, &t.s[index], &l1_offset, &l1_size, &size, err, sizeof(err));
    if (ret < 0) {
        log_error("%s: %s", img->path, err);
        goto out;
    }
    view = image_alloc();
    if (!view) {
        ret = -ENOMEM;
        goto out;
    }
    view->view_of = img;                /* from here on freed by view_free */
    atomic_fetch_add(&img->views, 1);
    if (asprintf(&view->path, "%s, snapshot %u", img->path, index) < 0) {
        view->path = NULL;
        ret = -ENOMEM;
        goto fail;
    }
    view->io = img->io;                 /* borrowed, as is all below */
    view->backing = img->backing;
    view->compression = img->compression;
    view->size = size;
    /* Its own geometry, read-only: corruption found in the snapshot's
     * tables marks the view, not the writable disk beside it.  The file's
     * end as of now bounds every offset: the snapshot's clusters all lie
     * below it, and the file only grows. */
    lock_exclusive(img);
    meta_init(&view->meta, &img->hdr, img->io, true);
    view->meta.data_io = img->meta.data_io;
    view->meta.file_end = img->meta.file_end;
    unlock_exclusive(img);
    ret = cluster_open_view(img->cl, &view->meta, l1_offset, l1_size, &view->cl);
    if (ret < 0)
        goto fail;
    *out = view;
    goto out;

fail:
    view_free(view);
out:
    snapshot_table_free(&t);
    return ret;
}

void image_snapshot_view_close(struct image *view)
{
    assert(view->view_of);
    view_free(view);
}
