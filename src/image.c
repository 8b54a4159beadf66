/*
 * image — opening an image and its chain, and the read path: each request is
 * split into runs by a table lookup (under the metadata lock held shared,
 * when the L2 slice is cached), and each run is served by one host I/O
 * outside the lock.
 */
#include "image.h"

#include "backing.h"
#include "cache.h"
#include "check.h"
#include "cluster.h"
#include "compress.h"
#include "header.h"
#include "io.h"
#include "log.h"
#include "meta.h"
#include "refcount.h"
#include "snapshot.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A guest byte range in use by a request that changes the image (cluster
 * aligned): two writes never allocate or move one cluster at once.  Reads
 * take no range: a write sets an L2 entry only after the data it points at
 * is written, and the host cluster it replaces stays allocated until a flush
 * applies the deferred frees; a read that raced with that (free_gen moved
 * while it read a host cluster) reads the run again. */
struct range {
    uint64_t start, end;
    struct range *next;
};

struct image {
    char *path;
    bool is_raw;                /* a raw backing file: no translation */
    struct io *io;
    struct io *data_io;         /* external data file, owned; or NULL */
    char *data_path;            /* its path, for messages */
    struct meta meta;
    struct qcow2_header hdr;
    struct cluster *cl;
    struct image *backing;
    _Atomic uint64_t size;      /* read without the lock by reads */
    enum compress_type compression;
    struct refcount *rc;        /* writable images only */
    bool write_prepared;        /* header feature bits updated for writing */
    bool set_dirty_bit;         /* we set the lazy-refcounts dirty bit */
    uint64_t flush_seq;
    /* io->changes of img->io and img->data_io as of their last completed
     * flush: what a flush still has to make durable. */
    _Atomic uint64_t synced, synced_data;
    enum image_discard_mode discard;
    enum image_detect_zeroes detect_zeroes;
    _Atomic uint64_t bytes_read, bytes_written, clusters_allocated, flushes;
    struct range *ranges;
    unsigned range_waiters;
    pthread_cond_t range_cond;
    _Atomic uint64_t free_gen;  /* bumped before host clusters are released */
    /*
     * The metadata lock is the pair: `lock` serialises everything that
     * changes metadata (and guards ranges; range_cond waits on it), and
     * every holder of `lock` also holds `tables` for writing, released only
     * while waiting on range_cond.  Lookups of cached L2 slices hold just
     * `tables` for reading, so concurrent reads never serialise; everything
     * else takes both through lock_exclusive().  Order: lock, then tables.
     *
     * One exception: image_flush() holds only `lock`.  A flush writes
     * tables back and waits for the host, but changes no L1 entry, no L2
     * entry and no L2 cache membership (only dirty flags, which lookups do
     * not read), so lookups go on while it waits.  The host clusters it
     * releases are no longer referenced by any L2 entry, and free_gen is
     * bumped first, so a read that looked one up earlier reads again.
     */
    pthread_mutex_t lock;
    pthread_rwlock_t tables;
};

static void image_free(struct image *img)
{
    if (!img)
        return;
    if (img->backing)
        image_close(img->backing);
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
        ret = open_raw(bpath, bio, &img->backing);
    } else {
        /* The descriptor opened for the owner, not a second open by name. */
        ret = io_lock_image(bio, bpath, false);
        if (ret < 0) {
            io_close(bio);
            goto out;
        }
        ret = open_chain(bpath, bio, &below, false, depth + 1, &img->backing);
    }
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

/* The L1 table and size to show: the active ones, or a snapshot's. */
static int choose_view(struct image *img, const char *snap_name, uint64_t *l1_offset,
                       uint32_t *l1_size)
{
    const struct snapshot *s;
    struct snapshot_table t;
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
    ret = snapshot_check_view(&img->hdr, s, err, sizeof(err));
    if (ret < 0) {
        log_error("%s: %s", img->path, err);
        snapshot_table_free(&t);
        return ret;
    }
    *l1_offset = s->l1_offset;
    *l1_size = s->l1_size;
    if (s->disk_size)
        img->size = s->disk_size;
    snapshot_table_free(&t);
    return 0;
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
            cache_set_writethrough(cluster_l2_cache(img->cl), true);
            cache_set_writethrough(refcount_cache(img->rc), true);
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
static bool flush_failed(struct image *img)
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

    if (!img->meta.read_only && !img->is_raw && flush_failed(img)) {
        /* Nothing more is written, not even the dirty bit: a lazy-refcounts
         * image is then rebuilt at its next writable open. */
        log_error("%s: closed without writing metadata back: a host flush "
                  "failed earlier (%s); writes after the last successful fsync "
                  "may be lost", img->path, strerror(-flush_error_of(img)));
        ret = -EIO;
    } else if (!img->meta.read_only && !img->is_raw) {
        ret = image_flush(img);
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

/* ---- the metadata lock ----------------------------------------------------- */

static void lock_exclusive(struct image *img)
{
    pthread_mutex_lock(&img->lock);
    pthread_rwlock_wrlock(&img->tables);
}

static void unlock_exclusive(struct image *img)
{
    pthread_rwlock_unlock(&img->tables);
    pthread_mutex_unlock(&img->lock);
}

/* Wait for a range to be released, holding the lock exclusively before and
 * after; lookups may run meanwhile. */
static void wait_exclusive(struct image *img)
{
    pthread_rwlock_unlock(&img->tables);
    pthread_cond_wait(&img->range_cond, &img->lock);
    pthread_rwlock_wrlock(&img->tables);
}

/* ---- request ranges -------------------------------------------------------- */

/* Wait until no other request holds a range overlapping [offset, +len),
 * then hold it.  Called with the metadata lock held (released while
 * waiting). */
static void range_lock_locked(struct image *img, struct range *r, uint64_t offset,
                              uint64_t len)
{
    uint64_t cs = img->meta.cluster_size;

    r->start = offset & ~(cs - 1);
    r->end = (offset + len + cs - 1) & ~(cs - 1);
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

static void range_unlock_locked(struct image *img, struct range *r)
{
    struct range **p;

    for (p = &img->ranges; *p != r; p = &(*p)->next)
        ;
    *p = r->next;
    if (img->range_waiters)
        pthread_cond_broadcast(&img->range_cond);
}

static void range_lock(struct image *img, struct range *r, uint64_t offset,
                       uint64_t len)
{
    lock_exclusive(img);
    range_lock_locked(img, r, offset, len);
    unlock_exclusive(img);
}

static void range_unlock(struct image *img, struct range *r)
{
    lock_exclusive(img);
    range_unlock_locked(img, r);
    unlock_exclusive(img);
}

/* ---- read path ----------------------------------------------------------- */

/*
 * Read and decompress the cluster of @run into @buf.  @gen: the free_gen
 * seen at the lookup, for a reader that holds no range (else NULL): when it
 * moved, the data may have been released and reused under the read, so a
 * failure is -EAGAIN (read again) rather than corruption.
 */
static int read_compressed(struct image *img, const struct cluster_run *run,
                           uint64_t offset, void *buf, const uint64_t *gen)
{
    struct meta *m = &img->meta;
    uint64_t host, max_len, file_size;
    uint8_t *comp = NULL, *plain = NULL;
    int ret;

    ret = compress_descriptor_decode(run->l2_entry & ~(META_L2_COPIED | META_L2_COMPRESSED),
                                     m->cluster_bits, &host, &max_len);
    if (ret < 0)
        return -EIO;
    ret = io_get_size(img->io, &file_size);
    if (ret < 0)
        return ret;
    if (host >= file_size && gen && img->free_gen != *gen)
        return -EAGAIN;
    if (host >= file_size)
        return meta_corrupt(m, "compressed cluster at guest offset 0x%llx points "
                            "at host offset 0x%llx, past the end of the file",
                            (unsigned long long)(offset & ~(m->cluster_size - 1)),
                            (unsigned long long)host);
    if (max_len > file_size - host)     /* the last sector may be short */
        max_len = file_size - host;

    comp = malloc(max_len);
    plain = malloc(m->cluster_size);
    if (!comp || !plain) {
        ret = -ENOMEM;
        goto out;
    }
    ret = io_pread(img->io, comp, max_len, host);
    if (ret < 0)
        goto out;
    ret = compress_decode(img->compression, comp, max_len, plain, m->cluster_size);
    if (ret < 0 && gen && img->free_gen != *gen) {
        ret = -EAGAIN;
        goto out;
    }
    if (ret < 0) {
        ret = meta_corrupt(m, "compressed cluster at guest offset 0x%llx (host "
                           "offset 0x%llx, %llu bytes) does not decompress",
                           (unsigned long long)(offset & ~(m->cluster_size - 1)),
                           (unsigned long long)host, (unsigned long long)max_len);
        goto out;
    }
    memcpy(buf, plain + (offset & (m->cluster_size - 1)), run->bytes);
out:
    free(comp);
    free(plain);
    return ret;
}

/*
 * Look up [@offset, @offset + @max) for a request that holds no range:
 * with the lock shared when the slice is cached (the common case), else
 * exclusively.  *gen (if not NULL): the free generation seen at the lookup.
 */
static int lookup_for_read(struct image *img, uint64_t offset, uint64_t max,
                           struct cluster_run *run, uint64_t *gen)
{
    int ret;

    pthread_rwlock_rdlock(&img->tables);
    ret = cluster_lookup_shared(img->cl, offset, max, run);
    if (gen)
        *gen = img->free_gen;
    pthread_rwlock_unlock(&img->tables);
    if (ret != -EAGAIN)
        return ret;

    lock_exclusive(img);
    ret = cluster_lookup(img->cl, offset, max, run);
    if (gen)
        *gen = img->free_gen;
    unlock_exclusive(img);
    return ret;
}

static int read_range(struct image *img, uint8_t *p, size_t len, uint64_t offset);

int image_read(struct image *img, void *buf, size_t len, uint64_t offset)
{
    img->bytes_read += len;
    return read_range(img, buf, len, offset);
}

static int read_range(struct image *img, uint8_t *p, size_t len, uint64_t offset)
{
    void *buf = p;
    int ret;

    uint64_t size = img->size;  /* once: a resize may run concurrently */

    if (offset >= size) {
        memset(buf, 0, len);
        return 0;
    }
    if (len > size - offset) {
        size_t tail = len - (size_t)(size - offset);
        memset(p + len - tail, 0, tail);
        len -= tail;
    }
    if (img->is_raw)
        return io_pread(img->io, buf, len, offset);

    while (len > 0) {
        struct cluster_run run;
        uint64_t gen;

        ret = lookup_for_read(img, offset, len, &run, &gen);
        if (ret < 0)
            return ret;

        switch (run.kind) {
        case CLUSTER_DATA:
            ret = io_pread(img->meta.data_io, p, run.bytes, run.host_offset);
            break;
        case CLUSTER_ZERO:
            memset(p, 0, run.bytes);
            ret = 0;
            break;
        case CLUSTER_UNALLOCATED:
            if (img->backing)
                ret = image_read(img->backing, p, run.bytes, offset);
            else
                memset(p, 0, run.bytes);
            break;
        case CLUSTER_COMPRESSED:
            ret = read_compressed(img, &run, offset, p, &gen);
            break;
        }
        /* Host clusters released (and maybe reused) under the read: the
         * data or the error may belong to something else.  Look up again. */
        if ((run.kind == CLUSTER_DATA || run.kind == CLUSTER_COMPRESSED) &&
            img->free_gen != gen)
            continue;
        if (ret < 0)
            return ret;
        p += run.bytes;
        offset += run.bytes;
        len -= run.bytes;
    }
    return 0;
}

/* ---- block status -------------------------------------------------------- */

/* Whether [@offset, ...) holds data, and for how many bytes (<= @max). */
static int block_status(struct image *img, uint64_t offset, uint64_t max,
                        bool *data, uint64_t *bytes)
{
    struct cluster_run run;
    uint64_t size = img->size;
    int ret;

    if (offset >= size) {
        *data = false;
        *bytes = max;
        return 0;
    }
    if (max > size - offset)
        max = size - offset;
    if (img->is_raw) {
        *data = true;
        *bytes = max;
        return 0;
    }
    ret = lookup_for_read(img, offset, max, &run, NULL);
    if (ret < 0)
        return ret;
    switch (run.kind) {
    case CLUSTER_DATA:
    case CLUSTER_COMPRESSED:
        *data = true;
        *bytes = run.bytes;
        return 0;
    case CLUSTER_ZERO:
        *data = false;
        *bytes = run.bytes;
        return 0;
    case CLUSTER_UNALLOCATED:
        if (img->backing)
            return block_status(img->backing, offset, run.bytes, data, bytes);
        *data = false;
        *bytes = run.bytes;
        return 0;
    }
    return -EIO;
}

int image_seek(struct image *img, uint64_t offset, bool data, uint64_t *result)
{
    uint64_t pos = offset, size = img->size;

    if (offset >= size)
        return -ENXIO;
    while (pos < size) {
        bool is_data;
        uint64_t bytes;
        int ret = block_status(img, pos, size - pos, &is_data, &bytes);

        if (ret < 0)
            return ret;
        if (is_data == data) {
            *result = pos;
            return 0;
        }
        pos += bytes;
    }
    if (data)
        return -ENXIO;
    *result = size;
    return 0;
}

/* ---- write path ---------------------------------------------------------- */

/*
 * Before the first write: drop autoclear bits we do not maintain (QEMU then
 * ignores stale bitmaps instead of trusting them) and, with lazy refcounts,
 * set the dirty bit, durably.  Called with the metadata lock held.
 */
static int prepare_write(struct image *img)
{
    struct qcow2_header *h = &img->hdr;
    bool changed = false;
    int ret;

    if (img->write_prepared)
        return 0;
    if (h->version >= 3) {
        uint64_t keep = h->autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW;
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

/* What an L2 entry says about one guest cluster, in units (subclusters with
 * extended L2, else the whole cluster as unit 0). */
struct old_state {
    uint64_t entry;
    bool compressed;
    bool has_host;
    uint64_t host;
    uint32_t alloc;             /* units whose data is at host */
    uint32_t zero;              /* units that read as zero */
};

static void decode_state(const struct image *img, uint64_t entry, uint64_t bitmap,
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
        decode_state(img, entry, bitmap, &st);
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
    decode_state(img, entry, bitmap, &st);

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
        ret = plain ? read_compressed(img, &run, gc << m->cluster_bits, plain, NULL) : -ENOMEM;
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
static int write_range(struct image *img, const uint8_t *p, uint64_t len,
                       uint64_t offset)
{
    int ret;

    ret = prepare_write(img);
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
static int check_inside(struct image *img, uint64_t offset, uint64_t len)
{
    uint64_t size = img->size;

    if (offset > size || len > size - offset)
        return -ENOSPC;
    return 0;
}

static int check_writable(struct image *img, uint64_t offset, uint64_t len)
{
    if (image_is_read_only(img))
        return -EROFS;
    if (meta_is_corrupt(&img->meta) || flush_failed(img))
        return -EIO;
    return check_inside(img, offset, len);
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

static int zero_range(struct image *img, uint64_t offset, uint64_t len, bool unmap);

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
    int ret = check_writable(img, offset, len);

    if (ret < 0 || len == 0)
        return ret;
    img->bytes_written += len;
    /* The range may have been held by a shrinking resize: once it is ours,
     * the size is checked again, so nothing is allocated past the end. */
    if (img->detect_zeroes != IMAGE_DETECT_ZEROES_OFF && all_zero(buf, len)) {
        range_lock(img, &r, offset, len);
        ret = check_inside(img, offset, len);
        if (ret == 0)
            ret = zero_range(img, offset, len,
                             img->detect_zeroes == IMAGE_DETECT_ZEROES_UNMAP);
        range_unlock(img, &r);
        return ret;
    }
    /* One lock round trip for the range and the metadata. */
    lock_exclusive(img);
    range_lock_locked(img, &r, offset, len);
    ret = check_inside(img, offset, len);
    if (ret == 0)
        ret = write_range(img, buf, len, offset);
    range_unlock_locked(img, &r);
    unlock_exclusive(img);
    return ret;
}

/* Release the host space of clusters whose refcount dropped to zero. */
static void punch_freed(void *opaque, uint64_t offset, uint64_t len)
{
    struct image *img = opaque;
    (void)io_punch_hole(img->io, offset, len);   /* space only: best effort */
}

/* *synced = @snap unless another flush already got further. */
static void advance(_Atomic uint64_t *synced, uint64_t snap)
{
    uint64_t cur = *synced;

    while ((int64_t)(snap - cur) > 0 &&
           !atomic_compare_exchange_weak(synced, &cur, snap))
        ;
}

/* Flush img->io and remember how far that got. */
static int sync_io(struct image *img)
{
    uint64_t snap = img->io->changes;
    int ret = io_flush(img->io);

    if (ret == 0)
        advance(&img->synced, snap);
    return ret;
}

static int flush_locked(struct image *img)
{
    struct cache *l2 = cluster_l2_cache(img->cl);
    struct cache *rcc = refcount_cache(img->rc);
    bool tables = cache_has_dirty(l2) || cluster_l1_dirty(img->cl);
    int ret = 0;
    uint64_t io_snap = img->io->changes;
    uint64_t data_snap = img->data_io ? img->data_io->changes : 0;

    /* 1. Guest data, refcount increments and links of new refcount
     *    blocks, then a host flush; skipped when nothing was written since
     *    the last one (writes counted before a snapshot have completed, so
     *    the flush after it covers them). */
    if (img->data_io && data_snap != img->synced_data) {
        ret = io_flush(img->data_io);
        if (ret < 0) {
            (void)flush_failed(img);    /* before any L2 write: see there */
            return ret;
        }
        advance(&img->synced_data, data_snap);
    }
    if (io_snap != img->synced || cache_has_dirty(rcc) || refcount_has_pending(img->rc)) {
        ret = cache_flush(rcc);
        if (ret < 0)
            return ret;
        advance(&img->synced, io_snap);
    }
    cache_dependency_met(l2);

    /* 2. L2 tables; then the L1 entries that point at new tables. */
    if (tables) {
        ret = cache_write_dirty(l2);
        if (ret < 0)
            return ret;
        if (cluster_l1_dirty(img->cl)) {
            ret = io_flush(img->io);
            if (ret == 0)
                ret = cluster_flush_l1(img->cl);
            if (ret < 0)
                return ret;
        }
        ret = sync_io(img);
        if (ret < 0)
            return ret;
    }

    /* 3. The references are gone from disk: drop their refcounts. */
    if (refcount_has_deferred(img->rc)) {
        img->free_gen++;        /* reads in flight re-read (read_range) */
        ret = refcount_apply_deferred(img->rc, punch_freed, img);
        if (ret < 0)
            return ret;
        /* Decrements create no refcount blocks (step 1 linked them all):
         * the dirty blocks and a flush are all there is. */
        ret = cache_write_dirty(rcc);
        if (ret == 0)
            ret = sync_io(img);
    }
    return ret;
}

/*
 * When much guest data was written since the last flush, write it back
 * before taking the metadata lock: that is the long part of a flush, and
 * requests go on meanwhile; flush_locked() then syncs only what came after.
 * With little data one flush under the lock is cheaper than two.
 */
#define FLUSH_UNLOCKED_MIN (8u << 20)

/* Flush @io if at least FLUSH_UNLOCKED_MIN bytes changed since *@synced. */
static int flush_if_much_changed(struct io *io, _Atomic uint64_t *synced)
{
    uint64_t snap = io->changes;
    int ret;

    if (snap - *synced < FLUSH_UNLOCKED_MIN)
        return 0;
    ret = io_flush(io);
    if (ret == 0)
        advance(synced, snap);
    return ret;
}

static int flush_data_unlocked(struct image *img)
{
    int ret = 0;

    if (img->data_io)
        ret = flush_if_much_changed(img->data_io, &img->synced_data);
    if (ret == 0)
        ret = flush_if_much_changed(img->io, &img->synced);
    if (ret < 0)
        (void)flush_failed(img);
    return ret;
}

int image_flush(struct image *img)
{
    int ret;

    if (image_is_read_only(img))
        return 0;
    /* Sticky, and logged once already (io_flush_failed). */
    if (flush_failed(img))
        return -EIO;
    ret = flush_data_unlocked(img);
    /* The mutex alone: see struct image for why lookups may go on. */
    pthread_mutex_lock(&img->lock);
    if (ret == 0)
        ret = flush_locked(img);
    if (ret == 0)
        io_mark(img->io, IMAGE_MARK_FLUSHED, ++img->flush_seq);
    img->flushes++;
    pthread_mutex_unlock(&img->lock);
    if (ret < 0 && !flush_failed(img))
        log_error("%s: flushing metadata failed: %s", img->path, strerror(-ret));
    return ret;
}

/* ---- zeroing, discard, preallocation, resize ----------------------------- */

/*
 * Make whole guest cluster @gc read as zeros by changing its L2 entry.
 * *need_write is set when the format cannot express it (v2 over a backing
 * file): the caller then writes zeros.  Called with the metadata lock held.
 */
static int zero_cluster(struct image *img, uint64_t gc, bool unmap, bool *need_write)
{
    struct meta *m = &img->meta;
    uint64_t entry, bitmap, new_entry, new_bitmap = 0, old_host, old_len;
    bool backing = img->backing && (gc << m->cluster_bits) < image_size(img->backing);
    bool keep_host = false;
    struct old_state st;
    int ret;

    *need_write = false;
    ret = cluster_get_entry(img->cl, gc, &entry, &bitmap);
    /* What the entry names is freed below: a corrupt entry frees nothing. */
    if (ret == 0)
        ret = cluster_check_old_entry(img->cl, gc, entry, bitmap, &old_host, &old_len);
    if (ret < 0)
        return ret;
    decode_state(img, entry, bitmap, &st);

    if (!m->v3 && backing) {
        *need_write = true;
        return 0;
    }
    if (m->has_data_file) {
        keep_host = true;       /* the mapping is fixed; raw files get zeros */
    } else if (!unmap && st.has_host && (entry & META_L2_COPIED) &&
               (m->v3 || m->extended_l2)) {
        keep_host = true;       /* zero range keeps the allocation (needs the
                                 * zero flag: v2 has none) */
    }

    if (keep_host && st.has_host) {
        new_entry = st.host | META_L2_COPIED;
        if (m->extended_l2)
            new_bitmap = 0xffffffffull << 32;
        else
            new_entry |= META_L2_ZERO;
    } else if (!backing && (unmap || !m->v3)) {
        new_entry = 0;          /* nothing beneath: unallocated reads zero */
    } else if (m->extended_l2) {
        new_entry = 0;
        new_bitmap = 0xffffffffull << 32;
    } else {
        new_entry = META_L2_ZERO;
    }
    if (new_entry == entry && new_bitmap == bitmap)
        return 0;
    if (entry == 0 && bitmap == 0 && new_entry == 0 && new_bitmap == 0)
        return 0;

    ret = prepare_write(img);
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
    if (old_len && !keep_host)
        ret = refcount_defer_free(img->rc, old_host, old_len);
    return ret;
}

/* Zero [offset, offset + len).  On entry the range is held exclusively. */
static int zero_range(struct image *img, uint64_t offset, uint64_t len, bool unmap)
{
    struct meta *m = &img->meta;
    uint64_t cs = m->cluster_size, end = offset + len;
    uint8_t *zeros = NULL;
    int ret = 0;

    while (offset < end && ret == 0) {
        uint64_t in = offset & (cs - 1);
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
        ret = write_range(img, zeros, n, offset);
        unlock_exclusive(img);
next:
        offset += n;
    }
    free(zeros);
    if (ret == 0 && refcount_nb_deferred(img->rc) >= 4096) {
        /* Give freed space back before the queue grows without bound. */
        lock_exclusive(img);
        ret = flush_locked(img);
        unlock_exclusive(img);
    }
    return ret;
}

int image_zero(struct image *img, uint64_t offset, uint64_t len, bool punch)
{
    struct range r;
    int ret = check_writable(img, offset, len);

    if (ret < 0 || len == 0)
        return ret;
    range_lock(img, &r, offset, len);
    ret = check_inside(img, offset, len);       /* a resize may have run */
    if (ret == 0)
        ret = zero_range(img, offset, len, punch && img->discard == IMAGE_DISCARD_UNMAP);
    range_unlock(img, &r);
    return ret;
}

int image_preallocate(struct image *img, uint64_t offset, uint64_t len)
{
    uint64_t cs = img->meta.cluster_size, end;
    uint8_t *buf = NULL;
    struct range r;
    int ret = check_writable(img, offset, len);

    if (ret < 0 || len == 0)
        return ret;
    end = offset + len;
    offset &= ~(cs - 1);
    range_lock(img, &r, offset, end - offset);
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
        /* Writing back what the cluster reads allocates it unchanged. */
        if (!(run.kind == CLUSTER_DATA && run.bytes == n)) {
            ret = read_range(img, buf, n, offset);
            if (ret == 0) {
                lock_exclusive(img);
                ret = write_range(img, buf, n, offset);
                unlock_exclusive(img);
            }
        }
        offset += n;
    }
    free(buf);
    range_unlock(img, &r);
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
    uint64_t head_end = (old + cs - 1) & ~(cs - 1);
    uint64_t end = (new_size + cs - 1) & ~(cs - 1);
    int ret = 0;

    if (head_end > old)
        ret = zero_range(img, old, (head_end < new_size ? head_end : new_size) - old,
                         false);
    /* Unmapped: the new clusters hold nothing worth keeping allocated. */
    if (ret == 0 && end > head_end)
        ret = zero_range(img, head_end, end - head_end, true);
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
    if (meta_is_corrupt(m) || flush_failed(img))
        return -EIO;
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
    range_lock(img, &r, 0, 1ull << 62);
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
        uint64_t pos = (new_size + cs - 1) & ~(cs - 1);
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
        if (new_size & (cs - 1)) {
            uint64_t tail_end = ((new_size + cs - 1) & ~(cs - 1));
            ret = zero_range(img, new_size, (tail_end < old ? tail_end : old) - new_size,
                             false);
            if (ret < 0)
                goto out;
        }
    }

    lock_exclusive(img);
    ret = prepare_write(img);
    if (ret == 0 && need_l1 > cluster_l1_size(img->cl)) {
        ret = flush_locked(img);
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
            ret = flush_locked(img);
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
    range_unlock(img, &r);
    return ret;
}

void image_stats(struct image *img, char *buf, size_t len)
{
    struct cache_stats l2 = { 0 }, rc = { 0 };

    lock_exclusive(img);
    if (img->cl)
        cache_get_stats(cluster_l2_cache(img->cl), &l2);
    if (img->rc)
        cache_get_stats(refcount_cache(img->rc), &rc);
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
}
