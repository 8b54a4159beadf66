/*
 * testutil.h — helpers shared by the unit tests: building qcow2 headers and
 * metadata in memory (big-endian writes), capturing log messages, reading
 * back a trace log, io backends for tests (forwarding; a host that loses
 * the writes of a failed flush).  Everything is static inline so that a
 * test file that uses only part of it still compiles warning-free.
 */
#ifndef QCOW2FUSE_TESTUTIL_H
#define QCOW2FUSE_TESTUTIL_H

/* Tests are built with -iquote src: <check.h> is the Check framework,
 * "check.h" the image consistency checker. */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "header.h"
#include "io.h"
#include "log.h"
#include "meta.h"

/* ---- allocation ---------------------------------------------------------- */

static inline void *tu_zalloc(size_t len)
{
    void *p = calloc(1, len ? len : 1);
    ck_assert_ptr_nonnull(p);
    return p;
}

/* The bytes of the file at @path in a new memory backend (the file itself
 * is left as it is). */
static inline struct io *tu_file_to_memory(const char *path)
{
    struct io *file, *mem;
    uint64_t size;
    uint8_t *bytes;

    ck_assert_int_eq(io_open_file(path, false, &file), 0);
    ck_assert_int_eq(io_get_size(file, &size), 0);
    bytes = tu_zalloc((size_t)size);
    ck_assert_int_eq(io_pread(file, bytes, (size_t)size, 0), 0);
    io_close(file);
    ck_assert_int_eq(io_open_memory(bytes, (size_t)size, &mem), 0);
    free(bytes);
    return mem;
}

/* ---- qcow2 header fields ------------------------------------------------- */

/* The fixed header fields, in host order, as the test wants them on disk. */
struct tu_hdr {
    uint32_t version;
    uint64_t backing_file_offset;
    uint32_t backing_file_size;
    uint32_t cluster_bits;
    uint64_t size;
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    /* version 3 */
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint32_t refcount_order;
    uint32_t header_length;
    uint8_t compression_type;
};

/*
 * A valid header for an image laid out as
 *   cluster 0 header, cluster 1 refcount table, cluster 2 refcount block,
 *   cluster 3 L1 table
 * with a virtual size of 64 clusters (at least one L2 table's worth).
 * The file is then tu_default_file_size() bytes long.
 */
static inline struct tu_hdr tu_hdr_default(uint32_t version, uint32_t cluster_bits)
{
    struct tu_hdr h;
    uint64_t cs = 1ull << cluster_bits;

    memset(&h, 0, sizeof(h));
    h.version = version;
    h.cluster_bits = cluster_bits;
    h.size = 64 * cs;
    h.l1_size = 1;
    h.l1_table_offset = 3 * cs;
    h.refcount_table_offset = 1 * cs;
    h.refcount_table_clusters = 1;
    h.refcount_order = 4;
    h.header_length = version == 2 ? 72 : 112;
    return h;
}

static inline uint64_t tu_default_file_size(uint32_t cluster_bits)
{
    return 4ull << cluster_bits;
}

/* Write the fixed fields; returns where extensions start. */
static inline size_t tu_hdr_write(uint8_t *buf, const struct tu_hdr *h)
{
    be32_put(buf, QCOW2_MAGIC);
    be32_put(buf + 4, h->version);
    be64_put(buf + 8, h->backing_file_offset);
    be32_put(buf + 16, h->backing_file_size);
    be32_put(buf + 20, h->cluster_bits);
    be64_put(buf + 24, h->size);
    be32_put(buf + 32, h->crypt_method);
    be32_put(buf + 36, h->l1_size);
    be64_put(buf + 40, h->l1_table_offset);
    be64_put(buf + 48, h->refcount_table_offset);
    be32_put(buf + 56, h->refcount_table_clusters);
    be32_put(buf + 60, h->nb_snapshots);
    be64_put(buf + 64, h->snapshots_offset);
    if (h->version < 3)
        return 72;
    be64_put(buf + 72, h->incompatible_features);
    be64_put(buf + 80, h->compatible_features);
    be64_put(buf + 88, h->autoclear_features);
    be32_put(buf + 96, h->refcount_order);
    be32_put(buf + 100, h->header_length);
    if (h->header_length > 104)
        buf[104] = h->compression_type;
    return h->header_length;
}

/* Append one header extension at *off (padded to 8 bytes). */
static inline void tu_ext_put(uint8_t *buf, size_t *off, uint32_t type,
                              const void *data, uint32_t len)
{
    be32_put(buf + *off, type);
    be32_put(buf + *off + 4, len);
    if (len)
        memcpy(buf + *off + 8, data, len);
    *off += 8 + (((size_t)len + 7) & ~(size_t)7);
}

/* One entry of a feature-name table extension payload (48 bytes). */
static inline void tu_feature_put(uint8_t *p, uint8_t type, uint8_t bit,
                                  const char *name)
{
    memset(p, 0, 48);
    p[0] = type;
    p[1] = bit;
    memcpy(p + 2, name, strlen(name) < 46 ? strlen(name) : 46);
}

/* ---- log capture --------------------------------------------------------- */

struct tu_log_state {
    unsigned nb_errors;
    unsigned nb_total;
    char last[1024];
    char first_error[1024];
};

static inline struct tu_log_state *tu_log_state(void)
{
    static struct tu_log_state st;
    return &st;
}

static inline void tu_log_hook(enum log_level level, const char *msg)
{
    struct tu_log_state *st = tu_log_state();

    st->nb_total++;
    if (level == LOG_LEVEL_ERROR && st->nb_errors++ == 0)
        snprintf(st->first_error, sizeof(st->first_error), "%s", msg);
    snprintf(st->last, sizeof(st->last), "%s", msg);
}

/* Start capturing log messages (and clear earlier ones). */
static inline void tu_log_capture(void)
{
    memset(tu_log_state(), 0, sizeof(struct tu_log_state));
    log_set_level(LOG_LEVEL_DEBUG);
    log_set_hook(tu_log_hook);
}

static inline void tu_log_release(void)
{
    log_set_hook(NULL);
    log_set_level(LOG_LEVEL_INFO);
}

/* ---- trace log ----------------------------------------------------------- */

struct tu_trace_rec {
    struct io_trace_record r;
    uint8_t *payload;           /* WRITE: r.length bytes, else NULL */
};

struct tu_trace {
    struct tu_trace_rec *recs;
    unsigned nb;
};

/* An anonymous file for a trace log; the caller keeps this descriptor and
 * hands a dup() of it to io_open_trace. */
static inline int tu_trace_fd(void)
{
    int fd = memfd_create("qcow2fuse-trace", 0);
    ck_assert_int_ge(fd, 0);
    return fd;
}

/* Parse the whole log held in @fd (from offset 0). */
static inline void tu_trace_read(int fd, struct tu_trace *t)
{
    uint64_t off = 0;
    unsigned cap = 0;

    t->recs = NULL;
    t->nb = 0;
    for (;;) {
        struct io_trace_record r;
        ssize_t n = pread(fd, &r, sizeof(r), (off_t)off);

        if (n == 0)
            break;
        ck_assert_int_eq((int)n, (int)sizeof(r));
        off += sizeof(r);
        if (t->nb == cap) {
            cap = cap ? cap * 2 : 16;
            t->recs = realloc(t->recs, cap * sizeof(*t->recs));
            ck_assert_ptr_nonnull(t->recs);
        }
        t->recs[t->nb].r = r;
        t->recs[t->nb].payload = NULL;
        if (r.type == IO_TRACE_WRITE && r.length) {
            uint8_t *p = tu_zalloc(r.length);
            n = pread(fd, p, r.length, (off_t)off);
            ck_assert_int_eq((long)n, (long)r.length);
            off += r.length;
            t->recs[t->nb].payload = p;
        }
        t->nb++;
    }
}

static inline void tu_trace_free(struct tu_trace *t)
{
    for (unsigned i = 0; i < t->nb; i++)
        free(t->recs[i].payload);
    free(t->recs);
    t->recs = NULL;
    t->nb = 0;
}

/* ---- meta ---------------------------------------------------------------- */

/* Fill @m for an image of @cluster_bits on @io (data in the same file). */
static inline void tu_meta_init(struct meta *m, struct io *io, unsigned cluster_bits,
                                bool v3, bool extended_l2)
{
    memset(m, 0, sizeof(*m));
    m->io = io;
    m->data_io = io;
    m->cluster_bits = cluster_bits;
    m->cluster_size = 1ull << cluster_bits;
    m->extended_l2 = extended_l2;
    m->l2_entry_bytes = extended_l2 ? 16 : 8;
    m->l2_entries = m->cluster_size / m->l2_entry_bytes;
    m->v3 = v3;
    m->read_only = true;
    m->refcount_order = 4;
    m->virtual_size = 1ull << 40;
    m->incompatible = extended_l2 ? QCOW2_INCOMPAT_EXTL2 : 0;
    pthread_mutex_init(&m->header_lock, NULL);
    /* Offsets are checked against the file's end; the decode tests use
     * offsets anywhere below 2^56, the memory images lie far below. */
    m->file_end = 1ull << 56;
    atomic_init(&m->corrupt, false);
    atomic_flag_clear(&m->corrupt_reported);
}

/* ---- runner -------------------------------------------------------------- */

/* ---- a forwarding io backend --------------------------------------------- */

/*
 * The start of a test backend that watches some io calls: the backend's
 * struct begins with a struct tu_fwd_io, sets @inner, and takes the
 * tu_fwd_* functions for the calls it does not watch.
 */
struct tu_fwd_io {
    struct io io;
    struct io *inner;
};

static inline struct io *tu_fwd_inner(struct io *io)
{
    return ((struct tu_fwd_io *)io)->inner;
}

static inline int tu_fwd_pread(struct io *io, void *buf, size_t len, uint64_t off)
{
    return io_pread(tu_fwd_inner(io), buf, len, off);
}

static inline int tu_fwd_pwrite(struct io *io, const void *buf, size_t len, uint64_t off)
{
    return io_pwrite(tu_fwd_inner(io), buf, len, off);
}

static inline int tu_fwd_flush(struct io *io)
{
    return io_flush(tu_fwd_inner(io));
}

static inline int tu_fwd_get_size(struct io *io, uint64_t *size)
{
    return io_get_size(tu_fwd_inner(io), size);
}

static inline int tu_fwd_truncate(struct io *io, uint64_t size)
{
    return io_truncate(tu_fwd_inner(io), size);
}

static inline int tu_fwd_punch(struct io *io, uint64_t off, uint64_t len)
{
    return io_punch_hole(tu_fwd_inner(io), off, len);
}

/* ---- a host that loses the writes of a failed flush ---------------------- */

/*
 * Models Linux after a failed fdatasync: the dirty pages it could not write
 * are dropped (marked clean), and the next fdatasync returns 0.  @inner (a
 * memory backend) is what reads see, the page cache: it keeps every write.
 * @durable is what the disk holds: the writes, punches and truncates since
 * the last good flush wait in a list and reach it at the next good flush;
 * the fail_at-th flush (1-based; 0: none) returns -EIO and forgets them.
 * close keeps everything for the test to judge; tu_lossy_free releases it.
 */
struct tu_lossy_op {
    uint32_t type;              /* IO_TRACE_WRITE, _PUNCH, _TRUNCATE */
    uint64_t offset, length;    /* TRUNCATE: offset is the size */
    uint8_t *data;              /* WRITE: length bytes */
};

struct tu_lossy_io {
    struct tu_fwd_io fwd;
    pthread_mutex_t lock;
    struct io *durable;
    struct tu_lossy_op *pending;
    unsigned nb_pending, cap_pending;
    unsigned flushes;           /* flush calls so far, the failed one too */
    unsigned fail_at;
    bool failed;
    unsigned changes_after_failure;     /* writes/punches/truncates */
};

static inline void tu_lossy_apply(struct io *to, const struct tu_lossy_op *op)
{
    if (op->type == IO_TRACE_WRITE)
        ck_assert_int_eq(io_pwrite(to, op->data, op->length, op->offset), 0);
    else if (op->type == IO_TRACE_PUNCH)
        ck_assert_int_eq(io_punch_hole(to, op->offset, op->length), 0);
    else
        ck_assert_int_eq(io_truncate(to, op->offset), 0);
}

static inline void tu_lossy_drop_pending(struct tu_lossy_io *l)
{
    for (unsigned i = 0; i < l->nb_pending; i++)
        free(l->pending[i].data);
    l->nb_pending = 0;
}

/* Queue one change that reached the page cache; with the lock held. */
static inline void tu_lossy_queue(struct tu_lossy_io *l, uint32_t type, uint64_t off,
                                  uint64_t len, const void *data)
{
    struct tu_lossy_op *op;

    if (l->nb_pending == l->cap_pending) {
        l->cap_pending = l->cap_pending ? 2 * l->cap_pending : 64;
        l->pending = realloc(l->pending, l->cap_pending * sizeof(*l->pending));
        ck_assert_ptr_nonnull(l->pending);
    }
    op = &l->pending[l->nb_pending++];
    op->type = type;
    op->offset = off;
    op->length = len;
    op->data = NULL;
    if (data) {
        op->data = tu_zalloc(len);
        memcpy(op->data, data, len);
    }
    if (l->failed)
        l->changes_after_failure++;
}

static inline int tu_lossy_pwrite(struct io *io, const void *buf, size_t len, uint64_t off)
{
    struct tu_lossy_io *l = (struct tu_lossy_io *)io;
    int ret;

    pthread_mutex_lock(&l->lock);
    ret = tu_fwd_pwrite(io, buf, len, off);
    if (ret == 0)
        tu_lossy_queue(l, IO_TRACE_WRITE, off, len, buf);
    pthread_mutex_unlock(&l->lock);
    return ret;
}

static inline int tu_lossy_punch(struct io *io, uint64_t off, uint64_t len)
{
    struct tu_lossy_io *l = (struct tu_lossy_io *)io;
    int ret;

    pthread_mutex_lock(&l->lock);
    ret = tu_fwd_punch(io, off, len);
    if (ret == 0)
        tu_lossy_queue(l, IO_TRACE_PUNCH, off, len, NULL);
    pthread_mutex_unlock(&l->lock);
    return ret;
}

static inline int tu_lossy_truncate(struct io *io, uint64_t size)
{
    struct tu_lossy_io *l = (struct tu_lossy_io *)io;
    int ret;

    pthread_mutex_lock(&l->lock);
    ret = tu_fwd_truncate(io, size);
    if (ret == 0)
        tu_lossy_queue(l, IO_TRACE_TRUNCATE, size, 0, NULL);
    pthread_mutex_unlock(&l->lock);
    return ret;
}

static inline int tu_lossy_flush(struct io *io)
{
    struct tu_lossy_io *l = (struct tu_lossy_io *)io;
    int ret = 0;

    pthread_mutex_lock(&l->lock);
    if (++l->flushes == l->fail_at) {
        l->failed = true;
        ret = -EIO;
    } else {
        for (unsigned i = 0; i < l->nb_pending; i++)
            tu_lossy_apply(l->durable, &l->pending[i]);
    }
    tu_lossy_drop_pending(l);
    pthread_mutex_unlock(&l->lock);
    return ret;
}

static inline void tu_lossy_close(struct io *io)
{
    (void)io;                   /* the test judges the state: tu_lossy_free */
}

static const struct io_ops tu_lossy_ops = {
    .pread = tu_fwd_pread,
    .pwrite = tu_lossy_pwrite,
    .flush = tu_lossy_flush,
    .get_size = tu_fwd_get_size,
    .truncate = tu_lossy_truncate,
    .punch_hole = tu_lossy_punch,
    .close = tu_lossy_close,
};

/* A lossy host over a copy of @data, whose @fail_at-th flush fails. */
static inline struct tu_lossy_io *tu_lossy_new(const void *data, size_t len,
                                               unsigned fail_at)
{
    struct tu_lossy_io *l = tu_zalloc(sizeof(*l));

    ck_assert_int_eq(io_open_memory(data, len, &l->fwd.inner), 0);
    ck_assert_int_eq(io_open_memory(data, len, &l->durable), 0);
    l->fwd.io.ops = &tu_lossy_ops;
    l->fail_at = fail_at;
    pthread_mutex_init(&l->lock, NULL);
    return l;
}

/*
 * A copy of what the disk holds: with @writeback, also what the host
 * writes back on its own later (the changes queued since the last flush).
 * Returns a malloc'ed buffer of *len bytes.
 */
static inline uint8_t *tu_lossy_disk(struct tu_lossy_io *l, bool writeback, size_t *len)
{
    const uint8_t *p;
    struct io *copy;
    uint8_t *out;

    pthread_mutex_lock(&l->lock);
    p = io_memory_data(l->durable, len);
    ck_assert_int_eq(io_open_memory(p, *len, &copy), 0);
    for (unsigned i = 0; writeback && i < l->nb_pending; i++)
        tu_lossy_apply(copy, &l->pending[i]);
    pthread_mutex_unlock(&l->lock);
    p = io_memory_data(copy, len);
    out = tu_zalloc(*len);
    memcpy(out, p, *len);
    io_close(copy);
    return out;
}

static inline void tu_lossy_free(struct tu_lossy_io *l)
{
    tu_lossy_drop_pending(l);
    free(l->pending);
    io_close(l->durable);
    io_close(l->fwd.inner);
    pthread_mutex_destroy(&l->lock);
    free(l);
}

static inline int tu_run(Suite *s)
{
    SRunner *sr = srunner_create(s);
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

#endif
