/*
 * Unit tests for image: reads racing with the release and reuse of the host
 * cluster they read (plain and compressed clusters: a read never returns
 * another guest offset's data), write/read round trips across a cluster
 * boundary and a reopen, reads past the virtual size, read-only images,
 * detect-zeroes, flushes (nothing to do when nothing changed; the
 * write-back of much guest data without the metadata lock), and lookups
 * from several threads racing with L2 cache evictions, discards and the
 * reuse of freed host clusters; and a host whose N-th flush fails and loses
 * the writes before it, for every N of a workload (a power-loss judge);
 * and the write plan's branches (in place, fresh allocation, COW from a
 * backing file, compressed overwrite, subclusters, a snapshot-shared
 * cluster), through a backend that records the host I/O; and views of
 * internal snapshots beside the writable disk (equal to -o snapshot=,
 * unchanged by writes racing with their reads, a snapshot of a smaller
 * disk, bad snapshot tables refused naming the field and offset).
 *
 * Images are made with create_image() in a temporary directory, loaded into
 * the memory backend and opened with image_open_io() through a "gate"
 * backend that can hold one pread of a chosen host offset until the test
 * lets it go.
 */
#include "testutil.h"

#include "check.h"
#include "compress.h"
#include "header.h"
#include "create.h"
#include "image.h"
#include "io.h"
#include "meta.h"
#include "snapshot.h"

#include <errno.h>
#include <stdatomic.h>
#include <pthread.h>
#include <sys/stat.h>
#include <time.h>

#define CB          16u                 /* cluster bits */
#define CS          (1u << CB)          /* 64 KiB clusters */
#define VSIZE       (16ull << 20)       /* 16 MiB virtual disk */
#define OTHER_GOFF  (1ull << 20)        /* a second guest cluster: 1 MiB */
#define SAFETY_S    5                   /* a wait longer than this fails */

/* ---- a gating backend around the memory backend -------------------------- */

/*
 * Forwards everything to @inner.  When armed with a host offset, the first
 * pread whose range contains it announces itself (blocked) and waits until
 * the test sets released; only then does it read from @inner, so it sees
 * what the host holds at that later time.  The gate is one-shot.
 */
struct gate_io {
    struct tu_fwd_io fwd;
    bool keep_inner;            /* close leaves @inner open (for a reopen) */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool armed, blocked, released, timed_out;
    uint64_t arm_offset;
    unsigned hits;              /* preads containing arm_offset since arming */
    bool flush_armed;           /* hold the next flush instead of a pread */
    bool write_armed;           /* hold the next pwrite instead of a pread */
    unsigned flushes;           /* host flushes seen */
    uint8_t gated_first, gated_last;    /* what the held pread returned */
    _Atomic bool fail_punch;    /* punches fail with -EOPNOTSUPP */
    _Atomic uint64_t written;   /* bytes written through pwrite */
};

static void deadline(struct timespec *ts)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += SAFETY_S;
}

static int gate_pread(struct io *io, void *buf, size_t len, uint64_t off)
{
    struct gate_io *g = (struct gate_io *)io;
    bool held = false;
    int ret;

    pthread_mutex_lock(&g->lock);
    if (g->arm_offset >= off && g->arm_offset - off < len) {
        g->hits++;
        if (g->armed) {
            struct timespec ts;
            g->armed = false;
            g->blocked = true;
            held = true;
            pthread_cond_broadcast(&g->cond);
            deadline(&ts);
            while (!g->released && !g->timed_out)
                if (pthread_cond_timedwait(&g->cond, &g->lock, &ts) == ETIMEDOUT)
                    g->timed_out = true;
        }
    }
    pthread_mutex_unlock(&g->lock);
    ret = io_pread(g->fwd.inner, buf, len, off);
    if (held && len) {
        pthread_mutex_lock(&g->lock);
        g->gated_first = ((uint8_t *)buf)[g->arm_offset - off];
        g->gated_last = ((uint8_t *)buf)[len - 1];
        pthread_mutex_unlock(&g->lock);
    }
    return ret;
}

static int gate_flush(struct io *io)
{
    struct gate_io *g = (struct gate_io *)io;

    pthread_mutex_lock(&g->lock);
    g->flushes++;
    if (g->flush_armed) {
        struct timespec ts;
        g->flush_armed = false;
        g->blocked = true;
        pthread_cond_broadcast(&g->cond);
        deadline(&ts);
        while (!g->released && !g->timed_out)
            if (pthread_cond_timedwait(&g->cond, &g->lock, &ts) == ETIMEDOUT)
                g->timed_out = true;
    }
    pthread_mutex_unlock(&g->lock);
    return tu_fwd_flush(io);
}

static void gate_close(struct io *io)
{
    struct gate_io *g = (struct gate_io *)io;

    if (!g->keep_inner)
        io_close(g->fwd.inner);
    pthread_mutex_destroy(&g->lock);
    pthread_cond_destroy(&g->cond);
    free(g);
}

static int gate_pwrite(struct io *io, const void *buf, size_t len, uint64_t off)
{
    struct gate_io *g = (struct gate_io *)io;

    pthread_mutex_lock(&g->lock);
    if (g->write_armed) {
        struct timespec ts;
        g->write_armed = false;
        g->blocked = true;
        pthread_cond_broadcast(&g->cond);
        deadline(&ts);
        while (!g->released && !g->timed_out)
            if (pthread_cond_timedwait(&g->cond, &g->lock, &ts) == ETIMEDOUT)
                g->timed_out = true;
    }
    pthread_mutex_unlock(&g->lock);
    g->written += len;
    return tu_fwd_pwrite(io, buf, len, off);
}

static int gate_punch(struct io *io, uint64_t off, uint64_t len)
{
    struct gate_io *g = (struct gate_io *)io;

    if (g->fail_punch)
        return -EOPNOTSUPP;
    return tu_fwd_punch(io, off, len);
}

static const struct io_ops gate_ops = {
    .pread = gate_pread,
    .pwrite = gate_pwrite,
    .flush = gate_flush,
    .get_size = tu_fwd_get_size,
    .truncate = tu_fwd_truncate,
    .punch_hole = gate_punch,
    .close = gate_close,
};

static struct gate_io *gate_new(struct io *inner, bool keep_inner)
{
    struct gate_io *g = tu_zalloc(sizeof(*g));

    g->fwd.io.ops = &gate_ops;
    g->fwd.io.read_only = inner->read_only;
    g->fwd.inner = inner;
    g->keep_inner = keep_inner;
    g->arm_offset = UINT64_MAX;
    pthread_mutex_init(&g->lock, NULL);
    pthread_cond_init(&g->cond, NULL);
    return g;
}

static void gate_arm(struct gate_io *g, uint64_t host)
{
    pthread_mutex_lock(&g->lock);
    g->arm_offset = host;
    g->armed = true;
    g->blocked = g->released = g->timed_out = false;
    g->hits = 0;
    pthread_mutex_unlock(&g->lock);
}

/* Wait until a pread is held at the gate; false after the safety timeout. */
static bool gate_wait_blocked(struct gate_io *g)
{
    struct timespec ts;
    bool ok;

    deadline(&ts);
    pthread_mutex_lock(&g->lock);
    while (!g->blocked)
        if (pthread_cond_timedwait(&g->cond, &g->lock, &ts) == ETIMEDOUT)
            break;
    ok = g->blocked;
    pthread_mutex_unlock(&g->lock);
    return ok;
}

static void gate_arm_flush(struct gate_io *g)
{
    pthread_mutex_lock(&g->lock);
    g->flush_armed = true;
    g->blocked = g->released = g->timed_out = false;
    pthread_mutex_unlock(&g->lock);
}

static void gate_arm_write(struct gate_io *g)
{
    pthread_mutex_lock(&g->lock);
    g->write_armed = true;
    g->blocked = g->released = g->timed_out = false;
    pthread_mutex_unlock(&g->lock);
}

static unsigned gate_flushes(struct gate_io *g)
{
    unsigned n;

    pthread_mutex_lock(&g->lock);
    n = g->flushes;
    pthread_mutex_unlock(&g->lock);
    return n;
}

static void gate_release(struct gate_io *g)
{
    pthread_mutex_lock(&g->lock);
    g->released = true;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
}

/* ---- fixtures ------------------------------------------------------------ */

/* A fresh, empty image of @vsize with 2^@cluster_bits byte clusters, in a
 * memory backend. */
static struct io *new_image_io_geom(uint64_t vsize, unsigned cluster_bits)
{
    char dir[] = "/tmp/check_image.XXXXXX", path[64];
    struct create_options co = { .size = vsize, .cluster_bits = cluster_bits };
    struct io *mem;

    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/t.qcow2", dir);
    ck_assert_int_eq(create_image(path, &co), 0);
    mem = tu_file_to_memory(path);
    unlink(path);
    rmdir(dir);
    return mem;
}

/* The same with 64 KiB clusters. */
static struct io *new_image_io_sized(uint64_t vsize)
{
    return new_image_io_geom(vsize, CB);
}

static struct io *new_image_io(void)
{
    return new_image_io_sized(VSIZE);
}

static struct image_options default_opts(void)
{
    struct image_options o = {
        .read_only = false,
        .discard = IMAGE_DISCARD_UNMAP,
        .detect_zeroes = IMAGE_DETECT_ZEROES_OFF,
        .trace_fd = -1,
        .backing = { BACKING_DENY, NULL },
    };
    return o;
}

static struct image *open_on(struct gate_io *g, const struct image_options *o)
{
    struct image *img = NULL;

    ck_assert_int_eq(image_open_io(&g->fwd.io, "test.qcow2", o, &img), 0);
    ck_assert_ptr_nonnull(img);
    return img;
}

/* The on-disk L2 entry of guest cluster @gc (0 when it has no L2 table):
 * what a flush has made durable, read straight from the backend. */
static uint64_t disk_u64(struct io *inner, uint64_t off)
{
    uint8_t b[8];

    ck_assert_int_eq(io_pread(inner, b, 8, off), 0);
    return be64_get(b);
}

/* The file offset of the on-disk L2 entry of guest cluster @gc (0 when it
 * has no L2 table), for the cluster size in the image's header. */
static uint64_t disk_l2_entry_offset(struct io *inner, uint64_t gc)
{
    uint8_t b[4];
    uint64_t cs, l1_off, l2_off;

    ck_assert_int_eq(io_pread(inner, b, 4, 20), 0);
    cs = 1ull << be32_get(b);
    l1_off = disk_u64(inner, 40);
    ck_assert_uint_ne(l1_off, 0);
    l2_off = disk_u64(inner, l1_off + 8 * (gc / (cs / 8))) & META_OFFSET_MASK;
    return l2_off ? l2_off + 8 * (gc % (cs / 8)) : 0;
}

static uint64_t disk_l2_entry(struct io *inner, uint64_t gc)
{
    uint64_t off = disk_l2_entry_offset(inner, gc);

    return off ? disk_u64(inner, off) : 0;
}

static void put_disk_l2_entry(struct io *inner, uint64_t gc, uint64_t entry)
{
    uint64_t off = disk_l2_entry_offset(inner, gc);
    uint8_t b[8];

    ck_assert_uint_ne(off, 0);
    be64_put(b, entry);
    ck_assert_int_eq(io_pwrite(inner, b, 8, off), 0);
}

/* Whether the backend holds @len bytes of @byte at @off. */
static bool host_is(struct io *inner, uint64_t off, size_t len, uint8_t byte)
{
    uint8_t *b = tu_zalloc(len);
    bool ok = true;

    ck_assert_int_eq(io_pread(inner, b, len, off), 0);
    for (size_t i = 0; i < len && ok; i++)
        ok = b[i] == byte;
    free(b);
    return ok;
}

static bool all_bytes(const uint8_t *p, size_t len, uint8_t byte)
{
    for (size_t i = 0; i < len; i++)
        if (p[i] != byte)
            return false;
    return true;
}

static void write_pattern(struct image *img, uint64_t goff, size_t len, uint8_t byte)
{
    uint8_t *b = tu_zalloc(len);

    memset(b, byte, len);
    ck_assert_int_eq(image_write(img, b, len, goff), 0);
    free(b);
}

/* ---- the racing reader ---------------------------------------------------- */

struct reader {
    struct image *img;
    uint64_t offset;
    uint8_t buf[4096];
    int ret;
};

static void *reader_main(void *arg)
{
    struct reader *r = arg;

    memset(r->buf, 0x5a, sizeof(r->buf));       /* neither 0x00, 0xAA nor 0xBB */
    r->ret = image_read(r->img, r->buf, sizeof(r->buf), r->offset);
    return NULL;
}

/*
 * Hold a 4 KiB read of guest cluster 0 at its host pread of @host; meanwhile
 * discard guest cluster 0 (its host cluster is released at the flush) and
 * write 0xBB to guest cluster OTHER_GOFF, which must reuse @host; then let
 * the read go on.  On return the reader has finished.
 */
static void race_release_and_reuse(struct image *img, struct gate_io *g, uint64_t host,
                                   struct reader *r)
{
    pthread_t t;

    r->img = img;
    r->offset = 0;
    gate_arm(g, host);
    ck_assert_int_eq(pthread_create(&t, NULL, reader_main, r), 0);
    if (!gate_wait_blocked(g)) {
        gate_release(g);
        pthread_join(t, NULL);
        ck_abort_msg("the read never reached host offset 0x%llx", (unsigned long long)host);
    }

    /* The read holds no lock now: release and reuse the cluster under it. */
    ck_assert_int_eq(image_zero(img, 0, CS, true), 0);
    ck_assert_int_eq(image_flush(img), 0);      /* applies the deferred free */
    ck_assert_uint_eq(disk_l2_entry(g->fwd.inner, 0) & META_OFFSET_MASK, 0);
    write_pattern(img, OTHER_GOFF, CS, 0xbb);
    ck_assert_int_eq(image_flush(img), 0);
    /* The allocator handed the released cluster to the other guest offset. */
    ck_assert_uint_eq(disk_l2_entry(g->fwd.inner, OTHER_GOFF / CS) & META_OFFSET_MASK, host);
    ck_assert(host_is(g->fwd.inner, host, CS, 0xbb));

    gate_release(g);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    ck_assert_msg(!g->timed_out, "the held read timed out at the gate");
}

/* ---- tests --------------------------------------------------------------- */

/*
 * A read of a plain data cluster, held at its host pread while the cluster
 * is discarded, freed by a flush and reallocated to another guest offset
 * with other data, must not return that data: the host pread did return
 * 0xBB, but free_gen moved, so read_range looks the run up again and finds
 * the discarded (zero) cluster.
 */
START_TEST(read_races_with_release_and_reuse)
{
    struct image_options o = default_opts();
    struct io *inner = new_image_io();
    struct gate_io *g = gate_new(inner, false);
    struct image *img = open_on(g, &o);
    struct reader r;
    uint8_t check[4096];
    uint64_t entry, host;

    write_pattern(img, 0, CS, 0xaa);
    ck_assert_int_eq(image_flush(img), 0);
    entry = disk_l2_entry(inner, 0);
    host = entry & META_OFFSET_MASK;
    ck_assert_uint_ne(host, 0);
    ck_assert_uint_eq(host % CS, 0);
    ck_assert(!(entry & META_L2_COMPRESSED));
    ck_assert(host_is(inner, host, CS, 0xaa));
    /* The L2 table is cached now: the read's only pread is the data one. */

    race_release_and_reuse(img, g, host, &r);

    ck_assert_int_eq(r.ret, 0);
    /* The race did happen: the held pread saw the other guest's data. */
    ck_assert_uint_eq(g->gated_first, 0xbb);
    ck_assert_uint_eq(g->gated_last, 0xbb);
    ck_assert_uint_eq(g->hits, 1);
    /* Never 0xBB; with the retry, the discarded cluster's zeros. */
    ck_assert_msg(!memchr(r.buf, 0xbb, sizeof(r.buf)),
                  "a read returned another guest offset's data");
    ck_assert_msg(all_bytes(r.buf, sizeof(r.buf), 0x00) ||
                  all_bytes(r.buf, sizeof(r.buf), 0xaa),
                  "a read returned neither the old nor the new content");
    ck_assert(all_bytes(r.buf, sizeof(r.buf), 0x00));

    /* Both guest clusters read as they should afterwards. */
    ck_assert_int_eq(image_read(img, check, sizeof(check), 0), 0);
    ck_assert(all_bytes(check, sizeof(check), 0x00));
    ck_assert_int_eq(image_read(img, check, sizeof(check), OTHER_GOFF), 0);
    ck_assert(all_bytes(check, sizeof(check), 0xbb));
    ck_assert_int_eq(image_close(img), 0);
}
END_TEST

/* Guest cluster 0 of the closed image in @inner holds @byte: make it a
 * compressed cluster (zlib) in the same host cluster, by hand.  Returns
 * that host offset; *clen: the compressed length. */
static uint64_t compress_cluster0(struct io *inner, uint8_t byte, long *clen)
{
    uint8_t *plain = tu_zalloc(CS), *comp = tu_zalloc(CS);
    uint64_t host = disk_l2_entry(inner, 0) & META_OFFSET_MASK;

    ck_assert_uint_ne(host, 0);
    memset(plain, byte, CS);
    *clen = compress_encode(COMPRESS_ZLIB, plain, CS, comp, CS);
    ck_assert_int_gt(*clen, 0);
    ck_assert_int_eq(io_pwrite(inner, comp, (size_t)*clen, host), 0);
    put_disk_l2_entry(inner, 0, META_L2_COMPRESSED |
                      compress_descriptor_encode(host, (uint64_t)*clen, CB));
    free(plain);
    free(comp);
    return host;
}

/*
 * The same race on a compressed cluster (made by rewriting guest cluster 0's
 * data and L2 entry by hand): the held pread returns 0xBB bytes that do not
 * decompress; as free_gen moved this is a retry, not corruption.
 */
START_TEST(compressed_read_races_with_release_and_reuse)
{
    struct image_options o = default_opts();
    struct io *inner = new_image_io();
    struct gate_io *g = gate_new(inner, true);
    struct image *img = open_on(g, &o);
    uint8_t *plain = tu_zalloc(CS), *comp = tu_zalloc(CS);
    struct reader r;
    uint8_t check[4096];
    uint64_t host;
    long clen;

    /* Allocate guest cluster 0 (and its L2 table), then compress it. */
    write_pattern(img, 0, CS, 0xaa);
    ck_assert_int_eq(image_close(img), 0);
    host = compress_cluster0(inner, 0xaa, &clen);
    /* What the held read will find there must not decompress, so that the
     * read_compressed path (not only the final free_gen check) is taken. */
    memset(plain, 0xbb, CS);
    ck_assert_int_ne(compress_decode(COMPRESS_ZLIB, plain, CS, comp, CS), 0);

    g = gate_new(inner, false);
    img = open_on(g, &o);
    memset(check, 0, sizeof(check));
    ck_assert_int_eq(image_read(img, check, sizeof(check), 0), 0);
    ck_assert(all_bytes(check, sizeof(check), 0xaa));      /* compressed read works */

    race_release_and_reuse(img, g, host, &r);

    ck_assert_int_eq(r.ret, 0);
    ck_assert_uint_eq(g->gated_first, 0xbb);
    ck_assert_uint_eq(g->hits, 1);
    ck_assert_msg(!memchr(r.buf, 0xbb, sizeof(r.buf)),
                  "a read returned another guest offset's data");
    ck_assert(all_bytes(r.buf, sizeof(r.buf), 0x00));
    /* Not taken for corruption: the image still accepts writes. */
    write_pattern(img, 2 * CS, 4096, 0xcc);
    ck_assert_int_eq(image_read(img, check, sizeof(check), 2 * CS), 0);
    ck_assert(all_bytes(check, sizeof(check), 0xcc));
    ck_assert_int_eq(image_close(img), 0);
    free(plain);
    free(comp);
}
END_TEST

/* A write spanning two clusters reads back the same, before and after a
 * close and reopen; the bytes around it stay zero. */
START_TEST(write_read_across_cluster_boundary)
{
    struct image_options o = default_opts();
    struct io *inner = new_image_io();
    struct gate_io *g = gate_new(inner, true);
    struct image *img = open_on(g, &o);
    const size_t len = 12288, around = 4096;
    const uint64_t off = CS - 5000;
    uint8_t *data = tu_zalloc(len), *back = tu_zalloc(len + 2 * around);

    for (size_t i = 0; i < len; i++)
        data[i] = (uint8_t)(i * 131 + 7 + (i >> 8));
    ck_assert_int_eq(image_write(img, data, len, off), 0);

    for (int pass = 0; pass < 2; pass++) {
        memset(back, 0x5a, len + 2 * around);
        ck_assert_int_eq(image_read(img, back, len + 2 * around, off - around), 0);
        ck_assert(all_bytes(back, around, 0));
        ck_assert_mem_eq(back + around, data, len);
        ck_assert(all_bytes(back + around + len, around, 0));
        /* A read that starts exactly at the boundary. */
        ck_assert_int_eq(image_read(img, back, 4096, CS), 0);
        ck_assert_mem_eq(back, data + (CS - off), 4096);
        if (pass == 0) {
            ck_assert_int_eq(image_close(img), 0);
            g = gate_new(inner, false);
            img = open_on(g, &o);
        }
    }
    /* Two host clusters, one per guest cluster. */
    ck_assert_uint_ne(disk_l2_entry(inner, 0) & META_OFFSET_MASK, 0);
    ck_assert_uint_ne(disk_l2_entry(inner, 1) & META_OFFSET_MASK, 0);
    ck_assert_int_eq(image_close(img), 0);
    free(data);
    free(back);
}
END_TEST

/* Reads at or past the virtual size return zeros for the part beyond it. */
START_TEST(read_past_end)
{
    struct image_options o = default_opts();
    struct gate_io *g = gate_new(new_image_io(), false);
    struct image *img = open_on(g, &o);
    uint8_t buf[8192];

    ck_assert_uint_eq(image_size(img), VSIZE);
    write_pattern(img, VSIZE - CS, CS, 0xee);

    memset(buf, 0x5a, sizeof(buf));
    ck_assert_int_eq(image_read(img, buf, sizeof(buf), VSIZE - 4096), 0);
    ck_assert(all_bytes(buf, 4096, 0xee));
    ck_assert(all_bytes(buf + 4096, 4096, 0));

    memset(buf, 0x5a, sizeof(buf));
    ck_assert_int_eq(image_read(img, buf, sizeof(buf), VSIZE), 0);
    ck_assert(all_bytes(buf, sizeof(buf), 0));
    memset(buf, 0x5a, sizeof(buf));
    ck_assert_int_eq(image_read(img, buf, sizeof(buf), VSIZE + 12345), 0);
    ck_assert(all_bytes(buf, sizeof(buf), 0));

    /* Writes may not go past it. */
    ck_assert_int_eq(image_write(img, buf, sizeof(buf), VSIZE - 4096), -ENOSPC);
    ck_assert_int_eq(image_close(img), 0);
}
END_TEST

/* A read-only image refuses writes, zeroing and resizes with -EROFS and
 * leaves the host bytes alone. */
START_TEST(read_only_refuses_writes)
{
    struct image_options o = default_opts();
    struct io *inner = new_image_io();
    struct gate_io *g;
    struct image *img;
    uint8_t buf[4096], *before, *after;
    uint64_t size;

    ck_assert_int_eq(io_get_size(inner, &size), 0);
    before = tu_zalloc((size_t)size);
    after = tu_zalloc((size_t)size);
    ck_assert_int_eq(io_pread(inner, before, (size_t)size, 0), 0);

    o.read_only = true;
    inner->read_only = true;
    g = gate_new(inner, true);
    img = open_on(g, &o);
    ck_assert(image_is_read_only(img));
    memset(buf, 0xab, sizeof(buf));
    ck_assert_int_eq(image_write(img, buf, sizeof(buf), 0), -EROFS);
    ck_assert_int_eq(image_zero(img, 0, CS, true), -EROFS);
    ck_assert_int_eq(image_resize(img, 2 * VSIZE), -EROFS);
    ck_assert_int_eq(image_flush(img), 0);
    ck_assert_int_eq(image_read(img, buf, sizeof(buf), 0), 0);
    ck_assert(all_bytes(buf, sizeof(buf), 0));
    ck_assert_int_eq(image_close(img), 0);

    ck_assert_int_eq(io_get_size(inner, &size), 0);
    ck_assert_int_eq(io_pread(inner, after, (size_t)size, 0), 0);
    ck_assert_mem_eq(before, after, (size_t)size);
    io_close(inner);
    free(before);
    free(after);
}
END_TEST

/* With detect-zeroes on, an all-zero write allocates no host cluster (a
 * whole cluster becomes a zero entry, a partial one is left alone); with it
 * off, the same write allocates one. */
START_TEST(detect_zeroes_leaves_cluster_unallocated)
{
    struct image_options o = default_opts();
    uint8_t *zeros = tu_zalloc(CS), buf[4096];
    uint64_t pos = 0, entry;

    for (int on = 1; on >= 0; on--) {
        struct io *inner = new_image_io();
        struct gate_io *g = gate_new(inner, true);
        struct image *img;

        o.detect_zeroes = on ? IMAGE_DETECT_ZEROES_ON : IMAGE_DETECT_ZEROES_OFF;
        img = open_on(g, &o);
        write_pattern(img, 4 * CS, 4096, 0x11);    /* so an L2 table exists */
        ck_assert_int_eq(image_write(img, zeros, CS, 0), 0);
        ck_assert_int_eq(image_write(img, zeros, 4096, 2 * CS + 512), 0);
        ck_assert_int_eq(image_flush(img), 0);

        entry = disk_l2_entry(inner, 0);
        if (on) {
            ck_assert_uint_eq(entry & META_OFFSET_MASK, 0);
            ck_assert_uint_eq(disk_l2_entry(inner, 2) & META_OFFSET_MASK, 0);
            /* No data before the cluster written with 0x11. */
            ck_assert_int_eq(image_seek(img, 0, true, &pos), 0);
            ck_assert_uint_eq(pos, 4 * CS);
        } else {
            ck_assert_uint_ne(entry & META_OFFSET_MASK, 0);
            ck_assert_uint_ne(disk_l2_entry(inner, 2) & META_OFFSET_MASK, 0);
            ck_assert_int_eq(image_seek(img, 0, true, &pos), 0);
            ck_assert_uint_eq(pos, 0);
        }
        memset(buf, 0x5a, sizeof(buf));
        ck_assert_int_eq(image_read(img, buf, sizeof(buf), 0), 0);
        ck_assert(all_bytes(buf, sizeof(buf), 0));
        memset(buf, 0x5a, sizeof(buf));
        ck_assert_int_eq(image_read(img, buf, sizeof(buf), 2 * CS + 512), 0);
        ck_assert(all_bytes(buf, sizeof(buf), 0));
        ck_assert_int_eq(image_close(img), 0);
        io_close(inner);
    }
    free(zeros);
}
END_TEST

/* A flush with nothing written since the last one costs no host flush; an
 * in-place overwrite costs exactly one. */
START_TEST(flush_only_what_changed)
{
    struct image_options o = default_opts();
    struct io *inner = new_image_io();
    struct gate_io *g = gate_new(inner, false);
    struct image *img = open_on(g, &o);
    unsigned n0;

    write_pattern(img, 0, CS, 0x31);
    ck_assert_int_eq(image_flush(img), 0);
    n0 = gate_flushes(g);
    ck_assert_int_eq(image_flush(img), 0);
    ck_assert_uint_eq(gate_flushes(g), n0);

    write_pattern(img, 4096, 4096, 0x32);       /* in place: no metadata */
    ck_assert_int_eq(image_flush(img), 0);
    ck_assert_uint_eq(gate_flushes(g), n0 + 1);
    ck_assert_int_eq(image_flush(img), 0);
    ck_assert_uint_eq(gate_flushes(g), n0 + 1);

    write_pattern(img, 2 * CS, 4096, 0x33);     /* allocates: refcount, L2 */
    ck_assert_int_eq(image_flush(img), 0);
    ck_assert_uint_gt(gate_flushes(g), n0 + 1);
    ck_assert_uint_ne(disk_l2_entry(inner, 2) & META_OFFSET_MASK, 0);
    ck_assert_int_eq(image_close(img), 0);
}
END_TEST

struct flusher {
    struct image *img;
    pthread_t tid;
    int ret;
};

static void *flush_thread(void *arg)
{
    struct flusher *f = arg;
    f->ret = image_flush(f->img);
    return NULL;
}

/* Start image_flush() in a thread and return once its next host flush is
 * held at the gate. */
static void held_flush_start(struct gate_io *g, struct flusher *f)
{
    gate_arm_flush(g);
    ck_assert_int_eq(pthread_create(&f->tid, NULL, flush_thread, f), 0);
    ck_assert_msg(gate_wait_blocked(g), "the flush never reached the host");
}

/* Let the held flush go; it must succeed without the gate timing out. */
static void held_flush_finish(struct gate_io *g, struct flusher *f)
{
    gate_release(g);
    ck_assert_int_eq(pthread_join(f->tid, NULL), 0);
    ck_assert_int_eq(f->ret, 0);
    ck_assert(!g->timed_out);
}

/* Writing back many megabytes of guest data happens without the metadata
 * lock: reads and in-place writes complete while that host flush is held.
 * (With the lock held they would wait for the flush: the test times out.) */
START_TEST(big_flush_leaves_requests_running)
{
    struct image_options o = default_opts();
    struct io *inner = new_image_io();
    struct gate_io *g = gate_new(inner, false);
    struct image *img = open_on(g, &o);
    struct flusher f = { .img = img };
    uint8_t buf[4096];

    write_pattern(img, 0, 10u << 20, 0x41);     /* 10 MiB: above the threshold */
    held_flush_start(g, &f);

    ck_assert_int_eq(image_read(img, buf, sizeof(buf), 3 * CS), 0);
    ck_assert(all_bytes(buf, sizeof(buf), 0x41));
    write_pattern(img, 5 * CS, 4096, 0x42);
    ck_assert_int_eq(image_read(img, buf, sizeof(buf), 5 * CS), 0);
    ck_assert(all_bytes(buf, sizeof(buf), 0x42));

    held_flush_finish(g, &f);
    /* The flush still made the metadata durable. */
    ck_assert_uint_ne(disk_l2_entry(inner, 159) & META_OFFSET_MASK, 0);
    ck_assert_int_eq(image_close(img), 0);
}
END_TEST

/*
 * A partial write into a host cluster that was freed and is reused must not
 * show the cluster's old bytes.  The free's own punch fails here (as on a
 * file system without hole punching), so the old bytes are still on the
 * host.  Then: with punching back, the write punches the cluster and writes
 * only its 4 KiB; with punching still failing, it writes the whole cluster
 * with zeros around the data.
 */
START_TEST(reused_cluster_reads_zeros_around_write)
{
    struct image_options o = default_opts();
    struct io *inner = new_image_io();
    struct gate_io *g = gate_new(inner, false);
    struct image *img = open_on(g, &o);
    uint64_t host[2];
    uint8_t *buf = tu_zalloc(CS);

    write_pattern(img, 0, CS, 0x61);
    write_pattern(img, CS, CS, 0x62);
    ck_assert_int_eq(image_flush(img), 0);
    host[0] = disk_l2_entry(inner, 0) & META_OFFSET_MASK;
    host[1] = disk_l2_entry(inner, 1) & META_OFFSET_MASK;
    g->fail_punch = true;
    ck_assert_int_eq(image_zero(img, 0, 2 * CS, true), 0);
    ck_assert_int_eq(image_flush(img), 0);       /* both host clusters free */
    ck_assert(host_is(inner, host[0], CS, 0x61));
    ck_assert(host_is(inner, host[1], CS, 0x62));

    for (unsigned k = 0; k < 2; k++) {
        uint64_t goff = (10 + k) * CS, written, h;

        g->fail_punch = k == 1;
        written = g->written;
        write_pattern(img, goff + 8192, 4096, 0x70);
        written = g->written - written;         /* metadata waits for the flush */
        ck_assert_int_eq(image_flush(img), 0);
        h = disk_l2_entry(inner, 10 + k) & META_OFFSET_MASK;
        ck_assert_msg(h == host[0] || h == host[1], "a freed cluster was not reused");
        ck_assert_int_eq(image_read(img, buf, CS, goff), 0);
        ck_assert(all_bytes(buf, 8192, 0));
        ck_assert(all_bytes(buf + 8192, 4096, 0x70));
        ck_assert(all_bytes(buf + 12288, CS - 12288, 0));
        /* Punched: only the data is written; else a cluster of zeros. */
        if (k == 0)
            ck_assert_uint_eq(written, 4096);
        else
            ck_assert_uint_eq(written, CS);
    }
    free(buf);
    ck_assert_int_eq(image_close(img), 0);
}
END_TEST

/* A flush holds only the mutex half of the metadata lock: while it waits
 * for the host (here: held at its first host flush, inside the metadata
 * part), reads of cached slices complete.  (If the flush held the lock
 * exclusively they would wait for it: the test times out.) */
START_TEST(reads_go_on_during_metadata_flush)
{
    struct image_options o = default_opts();
    struct io *inner = new_image_io();
    struct gate_io *g = gate_new(inner, false);
    struct image *img = open_on(g, &o);
    struct flusher f = { .img = img };
    uint8_t buf[4096];

    write_pattern(img, 0, CS, 0x51);
    ck_assert_int_eq(image_flush(img), 0);
    write_pattern(img, 2 * CS, 4096, 0x52);     /* new cluster: metadata dirty */
    held_flush_start(g, &f);

    ck_assert_int_eq(image_read(img, buf, sizeof(buf), 0), 0);
    ck_assert(all_bytes(buf, sizeof(buf), 0x51));
    ck_assert_int_eq(image_read(img, buf, sizeof(buf), 2 * CS), 0);
    ck_assert(all_bytes(buf, sizeof(buf), 0x52));
    ck_assert_int_eq(image_read(img, buf, sizeof(buf), 7 * CS), 0);
    ck_assert(all_bytes(buf, sizeof(buf), 0));

    held_flush_finish(g, &f);
    ck_assert_uint_ne(disk_l2_entry(inner, 2) & META_OFFSET_MASK, 0);
    ck_assert_int_eq(image_close(img), 0);
}
END_TEST

/* ---- lookups racing with evictions, frees and reuse ---------------------- */

/*
 * 128 blocks of 4 KiB, one per 32 MiB of a 4 GiB disk, so each has its own
 * L2 slice; the L2 cache holds only 16 slices.  Readers look blocks up
 * concurrently (shared lookups on hits, exclusive ones that evict on
 * misses) while a writer discards blocks, rewrites them into freshly
 * allocated (often reused) host clusters and flushes.  Block k reads as
 * zeros or as k's tag, never as anything else.
 */
#define STRESS_BLOCKS   128u
#define STRESS_STRIDE   (32ull << 20)
#define STRESS_READERS  3u

struct stress {
    struct image *img;
    _Atomic bool stop;
    _Atomic unsigned long reads, zero_reads;
};

struct stress_reader {
    struct stress *st;
    pthread_t tid;
    uint64_t seed;
    char failure[160];
};

static uint8_t stress_tag(unsigned k)
{
    return (uint8_t)(k + 1);
}

static void *stress_reader_main(void *arg)
{
    struct stress_reader *r = arg;
    uint8_t buf[4096];
    uint64_t x = r->seed;

    while (!atomic_load(&r->st->stop) && !r->failure[0]) {
        unsigned k;
        int ret;

        x = x * 6364136223846793005ull + 1442695040888963407ull;
        k = (unsigned)(x >> 33) % STRESS_BLOCKS;
        ret = image_read(r->st->img, buf, sizeof(buf), k * STRESS_STRIDE);
        if (ret < 0) {
            snprintf(r->failure, sizeof(r->failure), "read of block %u: %d", k, ret);
            break;
        }
        if (all_bytes(buf, sizeof(buf), 0)) {
            r->st->zero_reads++;
        } else if (!all_bytes(buf, sizeof(buf), stress_tag(k))) {
            snprintf(r->failure, sizeof(r->failure),
                     "block %u read bytes 0x%02x..0x%02x, expected 0x%02x or zeros",
                     k, buf[0], buf[4095], stress_tag(k));
            break;
        }
        r->st->reads++;
    }
    return NULL;
}

START_TEST(lookups_race_with_evictions_and_reuse)
{
    struct image_options o = default_opts();
    struct io *inner = new_image_io_sized(STRESS_BLOCKS * STRESS_STRIDE);
    struct gate_io *g = gate_new(inner, false);
    struct stress st = { 0 };
    struct stress_reader rd[STRESS_READERS];
    uint64_t x = 99;
    unsigned writes = 0, discards = 0;

    o.l2_cache_size = 16 * 4096;
    st.img = open_on(g, &o);
    for (unsigned k = 0; k < STRESS_BLOCKS; k++)
        write_pattern(st.img, k * STRESS_STRIDE, 4096, stress_tag(k));
    ck_assert_int_eq(image_flush(st.img), 0);

    memset(rd, 0, sizeof(rd));
    for (unsigned i = 0; i < STRESS_READERS; i++) {
        rd[i].st = &st;
        rd[i].seed = 1000 + i;
        ck_assert_int_eq(pthread_create(&rd[i].tid, NULL, stress_reader_main, &rd[i]), 0);
    }
    for (unsigned op = 0; op < 3000; op++) {
        unsigned k;

        x = x * 6364136223846793005ull + 1442695040888963407ull;
        k = (unsigned)(x >> 33) % STRESS_BLOCKS;
        if ((x >> 20) % 2) {
            ck_assert_int_eq(image_zero(st.img, k * STRESS_STRIDE, CS, true), 0);
            discards++;
        } else {
            write_pattern(st.img, k * STRESS_STRIDE, 4096, stress_tag(k));
            writes++;
        }
        if (op % 8 == 7)
            ck_assert_int_eq(image_flush(st.img), 0);
    }
    atomic_store(&st.stop, true);
    for (unsigned i = 0; i < STRESS_READERS; i++) {
        ck_assert_int_eq(pthread_join(rd[i].tid, NULL), 0);
        ck_assert_msg(!rd[i].failure[0], "reader %u: %s", i, rd[i].failure);
    }
    /* The race was real: reads saw both states, and ran throughout. */
    ck_assert_uint_gt(st.reads, 3000);
    ck_assert_uint_gt(st.zero_reads, 0);
    ck_assert_uint_gt(st.reads, st.zero_reads);
    ck_assert_uint_gt(writes, 0);
    ck_assert_uint_gt(discards, 0);
    ck_assert_int_eq(image_close(st.img), 0);
}
END_TEST

/* ---- a failed host flush ------------------------------------------------- */

/*
 * The power-loss judge for a host whose flush fails: for every N over the
 * host flushes of a workload (writes, batched allocations of new L2 tables
 * and refcount blocks, discards, zero ranges, fsyncs, L2 cache evictions, a
 * write big enough for the unlocked data flush), the N-th flush fails and
 * the writes since the flush before it are lost (tu_lossy_io).  Then:
 * every operation after the failure fails with -EIO while reads go on;
 * nothing reaches the host any more; one error names the file and errno;
 * the close fails; and the disk (with or without the host writing back the
 * rest later) reads, opened read-only, every sector as of the last fsync
 * that returned 0 or as a later write left it, and has no corruption
 * (leaks allowed), unless its dirty bit makes it rebuild its refcounts.
 */
#define PF_CB       12u                         /* 4 KiB clusters */
#define PF_CS       (1u << PF_CB)
#define PF_VSIZE    (64ull << 20)               /* 32 L2 tables */
#define PF_SECTORS  (PF_VSIZE / 512)
#define PF_BIG      ((8u << 20) + PF_CS * 64)   /* > the unlocked flush's 8 MiB */
#define PF_MAX_OPS  96

enum pf_kind { PF_WRITE, PF_DISCARD, PF_ZERO, PF_FSYNC };
static const char *const pf_kind_name[] = { "write", "discard", "zero range", "fsync" };

struct pf_op {
    enum pf_kind kind;
    uint64_t offset, len;
};

/* A fixed workload: every few operations an fsync. */
static unsigned pf_workload(struct pf_op *ops)
{
    uint64_t x = 12;
    unsigned n = 0;

    while (n < PF_MAX_OPS - 1) {
        struct pf_op *op = &ops[n];
        unsigned r;

        x = x * 6364136223846793005ull + 1442695040888963407ull;
        r = (unsigned)(x >> 33);
        op->offset = (uint64_t)(r % PF_SECTORS) * 512;
        if (n == 6) {                           /* one big run of new clusters */
            op->kind = PF_WRITE;
            op->offset = 40ull << 20;
            op->len = PF_BIG;
        } else if (n % 6 == 5) {
            op->kind = PF_FSYNC;
            op->offset = op->len = 0;
        } else if (r % 10 < 6) {
            op->kind = PF_WRITE;
            if (r % 3 == 0) {                   /* whole clusters: batched */
                op->offset &= ~(uint64_t)(PF_CS - 1);
                op->len = (2 + (r >> 8) % 6) * (uint64_t)PF_CS;
            } else {
                op->len = (1 + (r >> 8) % 24) * 512ull;
            }
        } else if (r % 10 < 9) {
            op->kind = PF_DISCARD;
            op->len = (1 + (r >> 8) % 4) * (uint64_t)PF_CS;
            if (r % 2)
                op->offset &= ~(uint64_t)(PF_CS - 1);
        } else {
            op->kind = PF_ZERO;
            op->len = (1 + (r >> 8) % 16) * 512ull;
        }
        if (op->offset + op->len > PF_VSIZE)
            op->offset = PF_VSIZE - op->len;
        n++;
    }
    ops[n].kind = PF_FSYNC;
    ops[n].offset = ops[n].len = 0;
    return n + 1;
}

/* Sector @s as written by operation @id (1-based): self-describing. */
static void pf_stamp(uint8_t *p, uint32_t id, uint64_t s)
{
    be32_put(p, id);
    be32_put(p + 4, (uint32_t)s);
    for (unsigned i = 8; i < 512; i++)
        p[i] = (uint8_t)(id * 31 + s + i);
}

/* The operation id a sector holds: 0 for zeros, UINT32_MAX for anything
 * that is not a whole stamp of sector @s. */
static uint32_t pf_decode(const uint8_t *p, uint64_t s)
{
    static const uint8_t zeros[512];
    uint8_t want[512];
    uint32_t id = be32_get(p);

    if (id == 0 && memcmp(p, zeros, 512) == 0)
        return 0;
    if (id == 0 || id > PF_MAX_OPS)
        return UINT32_MAX;
    pf_stamp(want, id, s);
    return memcmp(p, want, 512) == 0 ? id : UINT32_MAX;
}

static bool pf_covers(const struct pf_op *op, uint64_t s)
{
    return op->kind != PF_FSYNC && s * 512 >= op->offset &&
           s * 512 < op->offset + op->len;
}

/* Whether sector @s holding @id is what some operation after @last_ack
 * (the last acknowledged fsync; -1: none) up to @nops left there. */
static bool pf_later_write(const struct pf_op *ops, int last_ack, unsigned nops,
                           uint64_t s, uint32_t id)
{
    for (unsigned j = (unsigned)(last_ack + 1); j < nops; j++)
        if (pf_covers(&ops[j], s) &&
            (ops[j].kind == PF_WRITE ? id == j + 1 : id == 0))
            return true;
    return false;
}

/* A fresh image in memory: 4 KiB clusters, PF_VSIZE; *len bytes. */
static uint8_t *pf_new_image(bool lazy, size_t *len)
{
    char dir[] = "/tmp/check_image.XXXXXX", path[64];
    struct create_options co = { .size = PF_VSIZE, .cluster_bits = PF_CB,
                                 .lazy_refcounts = lazy };
    struct io *file;
    uint64_t size;
    uint8_t *bytes;

    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/t.qcow2", dir);
    ck_assert_int_eq(create_image(path, &co), 0);
    ck_assert_int_eq(io_open_file(path, false, &file), 0);
    ck_assert_int_eq(io_get_size(file, &size), 0);
    bytes = tu_zalloc((size_t)size);
    ck_assert_int_eq(io_pread(file, bytes, (size_t)size, 0), 0);
    io_close(file);
    unlink(path);
    rmdir(dir);
    *len = (size_t)size;
    return bytes;
}

static int pf_run_op(struct image *img, const struct pf_op *op, unsigned i)
{
    uint8_t *buf;
    int ret;

    switch (op->kind) {
    case PF_WRITE:
        buf = tu_zalloc(op->len);
        for (uint64_t k = 0; k < op->len / 512; k++)
            pf_stamp(buf + k * 512, i + 1, op->offset / 512 + k);
        ret = image_write(img, buf, op->len, op->offset);
        free(buf);
        return ret;
    case PF_DISCARD:
        return image_zero(img, op->offset, op->len, true);
    case PF_ZERO:
        return image_zero(img, op->offset, op->len, false);
    case PF_FSYNC:
        return image_flush(img);
    }
    return -EINVAL;
}

/*
 * Judge one state of the disk: every sector holds what the last
 * acknowledged fsync saw there (@acked) or what a later operation wrote;
 * no corruption unless the dirty bit is set.  Returns a description of the
 * first problem, or NULL.
 */
static const char *pf_judge_disk(const uint8_t *disk, size_t len, const uint32_t *acked,
                                 const struct pf_op *ops, int last_ack, unsigned nops,
                                 char *why, size_t why_len)
{
    struct image_options o = default_opts();
    struct check_report rep = { 0 };
    struct check_refs *refs = NULL;
    struct qcow2_header h;
    struct image *img = NULL;
    struct meta m;
    struct io *io;
    uint8_t *buf;
    char err[256];
    int ret;

    o.read_only = true;
    ck_assert_int_eq(io_open_memory(disk, len, &io), 0);
    ret = image_open_io(io, "durable.qcow2", &o, &img);
    if (ret < 0) {
        snprintf(why, why_len, "the disk does not open read-only: %s", strerror(-ret));
        return why;
    }
    buf = tu_zalloc(1u << 20);
    why[0] = 0;
    for (uint64_t off = 0; off < PF_VSIZE && !why[0]; off += 1u << 20) {
        ret = image_read(img, buf, 1u << 20, off);
        if (ret < 0) {
            snprintf(why, why_len, "reading the disk at %llu: %s",
                     (unsigned long long)off, strerror(-ret));
            break;
        }
        for (uint64_t k = 0; k < (1u << 20) / 512; k++) {
            uint64_t s = off / 512 + k;
            uint32_t id = pf_decode(buf + k * 512, s);
            if (id != acked[s] && (id == UINT32_MAX ||
                                   !pf_later_write(ops, last_ack, nops, s, id))) {
                snprintf(why, why_len, "sector %llu holds %s (op id %u; 0: zeros), "
                         "the last acknowledged fsync (op %d) saw op %u's data there",
                         (unsigned long long)s, id == UINT32_MAX ? "garbage" : "old data",
                         id == UINT32_MAX ? 0 : id, last_ack, acked[s]);
                break;
            }
        }
    }
    free(buf);
    ck_assert_int_eq(image_close(img), 0);
    if (why[0])
        return why;

    ck_assert_int_eq(io_open_memory(disk, len, &io), 0);
    ck_assert_int_eq(header_decode(disk, len < (2u << 20) ? len : (2u << 20), len, &h,
                                   err, sizeof(err)), 0);
    meta_init(&m, &h, io, true);
    ret = check_count_refs(&m, &h, &rep, &refs);
    if (ret == 0)
        ret = check_compare(&m, &h, refs, &rep);
    check_refs_free(refs);
    io_close(io);
    if (ret < 0)
        snprintf(why, why_len, "check failed: %s", strerror(-ret));
    else if (rep.corruptions && !(h.incompatible_features & QCOW2_INCOMPAT_DIRTY))
        snprintf(why, why_len, "%llu corruptions (%llu refcounts too low), "
                 "dirty bit clear", (unsigned long long)rep.corruptions,
                 (unsigned long long)rep.count[CHECK_REFCOUNT_TOO_LOW]);
    header_free(&h);
    return why[0] ? why : NULL;
}

/* One run whose @fail_at-th host flush fails (0: none).  Returns the host
 * flushes it saw. */
static unsigned pf_run(const uint8_t *image, size_t image_len, const struct pf_op *ops,
                       unsigned nops, unsigned fail_at)
{
    struct image_options o = default_opts();
    struct tu_lossy_io *l = tu_lossy_new(image, image_len, fail_at);
    uint32_t *cur = tu_zalloc(PF_SECTORS * sizeof(uint32_t));
    uint32_t *acked = tu_zalloc(PF_SECTORS * sizeof(uint32_t));
    int last_ack = -1, partial = -1, failed_op = -1, ret;
    bool failed_before_close;
    struct image *img = NULL;
    unsigned flushes;
    uint8_t *buf;
    char why[512];

    o.l2_cache_size = 16 * PF_CS;               /* half the tables: evictions */
    o.refcount_cache_size = 4 * PF_CS;
    tu_log_capture();
    ck_assert_int_eq(image_open_io(&l->fwd.io, "test.qcow2", &o, &img), 0);
    for (unsigned i = 0; i < nops; i++) {
        const struct pf_op *op = &ops[i];
        bool failed_before = l->failed;
        ret = pf_run_op(img, op, i);

        if (failed_before)
            ck_assert_msg(ret == -EIO, "host flush %u failed before op %u (%s), "
                          "which returned %d, not -EIO", fail_at, i, pf_kind_name[op->kind],
                          ret);
        if (op->kind == PF_FSYNC && l->failed)
            ck_assert_msg(ret < 0, "fsync (op %u) returned 0 after host flush %u "
                          "failed", i, fail_at);
        if (ret < 0) {
            ck_assert_msg(l->failed, "op %u (%s) failed (%d) with no failed flush", i,
                          pf_kind_name[op->kind], ret);
            if (failed_op < 0)
                failed_op = (int)i;
            if (!failed_before)
                partial = (int)i;           /* may have done part of its work */
            continue;
        }
        for (uint64_t k = 0; k < op->len / 512; k++)
            cur[op->offset / 512 + k] = op->kind == PF_WRITE ? i + 1 : 0;
        if (op->kind == PF_FSYNC) {
            memcpy(acked, cur, PF_SECTORS * sizeof(uint32_t));
            last_ack = (int)i;
        }
    }

    /* Reads go on, and see every write that returned 0. */
    buf = tu_zalloc(1u << 20);
    for (uint64_t off = 0; off < PF_VSIZE; off += 1u << 20) {
        ck_assert_int_eq(image_read(img, buf, 1u << 20, off), 0);
        for (uint64_t k = 0; k < (1u << 20) / 512; k++) {
            uint64_t s = off / 512 + k;
            uint32_t id = pf_decode(buf + k * 512, s);
            /* (no ck_assert per sector: each one costs a system call) */
            if (id != cur[s] && !(partial >= 0 && pf_covers(&ops[partial], s) &&
                                  id == (ops[partial].kind == PF_WRITE
                                         ? (uint32_t)partial + 1 : 0)))
                ck_abort_msg("flush %u failed: sector %llu reads op %u's data, not "
                             "op %u's", fail_at, (unsigned long long)s, id, cur[s]);
        }
    }
    free(buf);

    failed_before_close = l->failed;
    ret = image_close(img);
    if (l->failed) {
        ck_assert_msg(ret < 0, "close returned 0, host flush %u failed", fail_at);
        ck_assert_msg(l->changes_after_failure == 0, "%u writes reached the host "
                      "after flush %u failed", l->changes_after_failure, fail_at);
        ck_assert_msg(strstr(tu_log_state()->first_error,
                             "test.qcow2: host flush failed: Input/output error"),
                      "first error: %s", tu_log_state()->first_error);
        /* That one line, and the close's if the image was poisoned by then. */
        ck_assert_uint_eq(tu_log_state()->nb_errors, failed_before_close ? 2 : 1);
    } else {
        ck_assert_int_eq(failed_op, -1);
        ck_assert_int_eq(ret, 0);
    }
    tu_log_release();

    /* (with nothing queued the written-back disk is the same) */
    for (int writeback = 0; writeback < (l->nb_pending ? 2 : 1); writeback++) {
        size_t len;
        uint8_t *disk = tu_lossy_disk(l, writeback, &len);
        const char *bad = pf_judge_disk(disk, len, acked, ops, last_ack, nops,
                                        why, sizeof(why));
        ck_assert_msg(!bad, "host flush %u failed (op %d first failed)%s: %s",
                      fail_at, failed_op, writeback ? ", the rest written back" : "",
                      bad);
        free(disk);
    }
    flushes = l->flushes;
    free(cur);
    free(acked);
    tu_lossy_free(l);
    return flushes;
}

static void pf_every_flush(bool lazy)
{
    struct pf_op ops[PF_MAX_OPS];
    unsigned nops = pf_workload(ops), flushes;
    size_t len;
    uint8_t *image = pf_new_image(lazy, &len);

    flushes = pf_run(image, len, ops, nops, 0);
    /* Far more host flushes than fsyncs: evictions, refcount blocks, the
     * unlocked data flush are in there. */
    ck_assert_uint_gt(flushes, nops / 6 + 4);
    for (unsigned n = 1; n <= flushes; n++)
        pf_run(image, len, ops, nops, n);
    free(image);
}

START_TEST(failed_flush_is_sticky)
{
    pf_every_flush(false);
}
END_TEST

START_TEST(failed_flush_is_sticky_lazy_refcounts)
{
    pf_every_flush(true);
}
END_TEST


/* ---- requests that waited behind a resize -------------------------------- */

struct resizer {
    struct image *img;
    uint64_t size;
    pthread_t tid;
    _Atomic pid_t os_tid;
    int ret;
};

static void *resize_thread(void *arg)
{
    struct resizer *rs = arg;
    atomic_store(&rs->os_tid, gettid());
    rs->ret = image_resize(rs->img, rs->size);
    return NULL;
}

struct writer {
    struct image *img;
    uint64_t offset;
    uint8_t buf[4096];
    _Atomic pid_t tid;
    pthread_t pt;
    int ret;
};

static void *writer_main(void *arg)
{
    struct writer *w = arg;
    atomic_store(&w->tid, gettid());
    w->ret = image_write(w->img, w->buf, sizeof(w->buf), w->offset);
    return NULL;
}

/* Whether thread @tid of this process is asleep (state S: blocked on a
 * futex, as a request waiting for the metadata lock or a range is). */
static bool thread_asleep(pid_t tid)
{
    char path[64], line[256], *p;
    FILE *f;
    bool asleep = false;

    snprintf(path, sizeof(path), "/proc/self/task/%d/stat", (int)tid);
    f = fopen(path, "r");
    if (!f)
        return false;
    if (fgets(line, sizeof(line), f) && (p = strrchr(line, ')')) && p[1] == ' ')
        asleep = p[2] == 'S';
    fclose(f);
    return asleep;
}

/* Wait until the thread that stores its id in *@tid sleeps (inside the
 * request it makes next); false after the safety timeout. */
static bool wait_asleep(_Atomic pid_t *tid)
{
    struct timespec pause = { 0, 1000000 };

    for (unsigned i = 0; i < SAFETY_S * 1000u; i++) {
        pid_t t = atomic_load(tid);
        if (t && thread_asleep(t))
            return true;
        nanosleep(&pause, NULL);
    }
    return false;
}

/*
 * A write past the new end that waits behind a shrinking resize (held at
 * the host flush of its header update, with the metadata lock and the
 * whole disk's range) must fail with -ENOSPC once it runs, as it would have
 * after the resize: it checked the size before waiting, when the offset
 * was still inside the disk.  It must allocate nothing: after growing the
 * disk again the offset reads as zeros, and its L2 entry stays empty.
 */
START_TEST(write_behind_shrinking_resize_rechecks_size)
{
    struct image_options o = default_opts();
    struct io *inner = new_image_io();
    struct gate_io *g = gate_new(inner, false);
    struct image *img = open_on(g, &o);
    struct resizer rs = { .img = img, .size = VSIZE / 2 };
    struct writer w = { .img = img, .offset = VSIZE / 2 + VSIZE / 4 };
    uint8_t buf[4096];

    write_pattern(img, 0, 4096, 0x11);          /* the L2 table exists */
    ck_assert_int_eq(image_flush(img), 0);

    gate_arm_flush(g);
    ck_assert_int_eq(pthread_create(&rs.tid, NULL, resize_thread, &rs), 0);
    ck_assert_msg(gate_wait_blocked(g), "the resize never reached its host flush");
    memset(w.buf, 0x77, sizeof(w.buf));
    ck_assert_int_eq(pthread_create(&w.pt, NULL, writer_main, &w), 0);
    ck_assert_msg(wait_asleep(&w.tid), "the write never waited for the resize");

    gate_release(g);
    ck_assert_int_eq(pthread_join(rs.tid, NULL), 0);
    ck_assert_int_eq(pthread_join(w.pt, NULL), 0);
    ck_assert(!g->timed_out);
    ck_assert_int_eq(rs.ret, 0);
    ck_assert_uint_eq(image_size(img), VSIZE / 2);
    ck_assert_int_eq(w.ret, -ENOSPC);

    ck_assert_int_eq(image_flush(img), 0);
    ck_assert_uint_eq(disk_l2_entry(inner, w.offset / CS), 0);
    ck_assert_int_eq(image_resize(img, VSIZE), 0);
    memset(buf, 0x5a, sizeof(buf));
    ck_assert_int_eq(image_read(img, buf, sizeof(buf), w.offset), 0);
    ck_assert_msg(all_bytes(buf, sizeof(buf), 0),
                  "a write refused past the end shows after growing again");
    ck_assert_int_eq(image_close(img), 0);
}
END_TEST

/*
 * An overlay of VSIZE bytes (64 KiB clusters) over a raw backing file of
 * 2 * VSIZE bytes of 0x5a, created in the directory @dir (a mkdtemp
 * template, filled in); the overlay is returned in a memory backend, its
 * path in @path (open it under that name so the backing file is found).
 */
static struct io *new_overlay_io(char *dir, char *path, size_t path_len)
{
    char base[96];
    struct create_options co = { .size = VSIZE, .cluster_bits = CB,
                                 .backing_format = "raw" };
    uint8_t *buf = tu_zalloc(1u << 20);
    struct io *mem;

    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(base, sizeof(base), "%s/base.raw", dir);
    snprintf(path, path_len, "%s/t.qcow2", dir);
    memset(buf, 0x5a, 1u << 20);
    {
        FILE *f = fopen(base, "w");
        ck_assert_ptr_nonnull(f);
        for (uint64_t off = 0; off < 2 * VSIZE; off += 1u << 20)
            ck_assert_uint_eq(fwrite(buf, 1, 1u << 20, f), 1u << 20);
        ck_assert_int_eq(fclose(f), 0);
    }
    free(buf);
    co.backing_file = base;
    ck_assert_int_eq(create_image(path, &co), 0);
    mem = tu_file_to_memory(path);
    return mem;
}

static void remove_overlay_dir(const char *dir)
{
    char p[96];

    snprintf(p, sizeof(p), "%s/base.raw", dir);
    unlink(p);
    snprintf(p, sizeof(p), "%s/t.qcow2", dir);
    unlink(p);
    rmdir(dir);
}

/*
 * A resize that waits behind another takes the disk's size only once it
 * runs: here a growth to 2 * VSIZE waits behind a shrink to VSIZE / 2 (held
 * at its header flush) of an overlay whose backing file is 2 * VSIZE bytes.
 * The growth must make all of [VSIZE / 2, 2 * VSIZE) read as zeros; taking
 * the size from before it waited, it zeroed only from VSIZE on and the
 * backing file's 0x5a showed in between.
 */
START_TEST(resize_behind_resize_takes_the_new_size)
{
    char dir[] = "/tmp/check_image.XXXXXX", path[96];
    struct image_options o = default_opts();
    struct gate_io *g;
    struct image *img = NULL;
    struct resizer shrink = { .size = VSIZE / 2 }, grow = { .size = 2 * VSIZE };
    uint8_t *buf = tu_zalloc(CS);

    g = gate_new(new_overlay_io(dir, path, sizeof(path)), false);
    o.backing.policy = BACKING_ALLOW;
    ck_assert_int_eq(image_open_io(&g->fwd.io, path, &o, &img), 0);
    ck_assert_int_eq(image_read(img, buf, 4096, VSIZE - 4096), 0);
    ck_assert(all_bytes(buf, 4096, 0x5a));      /* the backing file shows */
    shrink.img = grow.img = img;

    gate_arm_flush(g);
    ck_assert_int_eq(pthread_create(&shrink.tid, NULL, resize_thread, &shrink), 0);
    ck_assert_msg(gate_wait_blocked(g), "the shrink never reached its host flush");
    ck_assert_int_eq(pthread_create(&grow.tid, NULL, resize_thread, &grow), 0);
    ck_assert_msg(wait_asleep(&grow.os_tid), "the growth never waited for the shrink");
    gate_release(g);
    ck_assert_int_eq(pthread_join(shrink.tid, NULL), 0);
    ck_assert_int_eq(pthread_join(grow.tid, NULL), 0);
    ck_assert(!g->timed_out);
    ck_assert_int_eq(shrink.ret, 0);
    ck_assert_int_eq(grow.ret, 0);
    ck_assert_uint_eq(image_size(img), 2 * VSIZE);

    for (uint64_t off = VSIZE / 2; off < 2 * VSIZE; off += CS) {
        memset(buf, 0x11, CS);
        ck_assert_int_eq(image_read(img, buf, CS, off), 0);
        ck_assert_msg(all_bytes(buf, CS, 0), "guest offset 0x%llx of the grown range "
                      "does not read as zeros (0x%02x)", (unsigned long long)off, buf[0]);
    }
    ck_assert_int_eq(image_close(img), 0);
    remove_overlay_dir(dir);
    free(buf);
}
END_TEST

/* ---- copy-on-read and streaming: a fill only fills ---------------------- */

struct filler {
    struct image *img;
    uint64_t offset, len, filled;
    _Atomic pid_t tid;
    pthread_t pt;
    int ret;
};

static void *filler_main(void *arg)
{
    struct filler *f = arg;
    atomic_store(&f->tid, gettid());
    f->ret = image_fill(f->img, f->offset, f->len, &f->filled);
    return NULL;
}

/* The overlay of new_overlay_io() opened through a gate, with its L2 table
 * made and the header prepared for writing by a write at guest 0 (so that
 * the next host write of a write or fill is its data). */
static struct image *open_overlay(char *dir, char *path, size_t path_len,
                                  struct gate_io **g, int trace_fd)
{
    struct image_options o = default_opts();
    struct image *img = NULL;

    *g = gate_new(new_overlay_io(dir, path, path_len), false);
    o.backing.policy = BACKING_ALLOW;
    o.trace_fd = trace_fd;
    ck_assert_int_eq(image_open_io(&(*g)->fwd.io, path, &o, &img), 0);
    write_pattern(img, 0, 4096, 0x11);
    ck_assert_int_eq(image_flush(img), 0);
    return img;
}

/* Guest cluster @gc reads 0x5a (the backing file) but for 0x77 at
 * [4096, 8192). */
static void assert_guest_write_kept(struct image *img, uint64_t gc)
{
    uint8_t *buf = tu_zalloc(CS);

    ck_assert_int_eq(image_read(img, buf, CS, gc * CS), 0);
    ck_assert_msg(all_bytes(buf, 4096, 0x5a) && all_bytes(buf + 8192, CS - 8192, 0x5a),
                  "the backing file's bytes around the guest write are gone");
    ck_assert_msg(all_bytes(buf + 4096, 4096, 0x77),
                  "the guest write was overwritten by the fill (0x%02x)", buf[4096]);
    free(buf);
}

/*
 * A fill that finds a cluster unallocated at its lookup while a guest write
 * into it is under way (held at the write of its data, the L2 entry not
 * yet set) must wait for the write's range and then leave the cluster
 * alone: it is allocated now.  Filling it from what the lookup said wrote
 * the backing file's bytes over the guest's.
 */
START_TEST(fill_leaves_cluster_a_guest_write_allocated)
{
    char dir[] = "/tmp/check_image.XXXXXX", path[96];
    struct gate_io *g;
    struct image *img = open_overlay(dir, path, sizeof(path), &g, -1);
    struct writer w = { .img = img, .offset = 3 * CS + 4096 };
    struct filler f = { .img = img, .offset = 3 * CS, .len = CS };
    bool waited;

    memset(w.buf, 0x77, sizeof(w.buf));
    gate_arm_write(g);
    ck_assert_int_eq(pthread_create(&w.pt, NULL, writer_main, &w), 0);
    ck_assert_msg(gate_wait_blocked(g), "the guest write never wrote its data");
    ck_assert_int_eq(pthread_create(&f.pt, NULL, filler_main, &f), 0);
    waited = wait_asleep(&f.tid);
    gate_release(g);
    ck_assert_int_eq(pthread_join(w.pt, NULL), 0);
    ck_assert_int_eq(pthread_join(f.pt, NULL), 0);
    ck_assert(!g->timed_out);
    ck_assert_int_eq(w.ret, 0);
    ck_assert_int_eq(f.ret, 0);
    assert_guest_write_kept(img, 3);
    ck_assert_msg(waited, "the fill never waited for the guest write");
    ck_assert_uint_eq(f.filled, 0);
    ck_assert_int_eq(image_close(img), 0);
    remove_overlay_dir(dir);
}
END_TEST

/*
 * A guest write that comes while a fill of its cluster is under way (held
 * at the write of the copied data) waits for the fill's range and then
 * wins.  A fill that held no range let the write allocate a cluster of its
 * own, then pointed the L2 entry at the copy: the guest's bytes were lost.
 */
START_TEST(guest_write_behind_fill_wins)
{
    char dir[] = "/tmp/check_image.XXXXXX", path[96];
    struct gate_io *g;
    struct image *img = open_overlay(dir, path, sizeof(path), &g, -1);
    struct writer w = { .img = img, .offset = 3 * CS + 4096 };
    struct filler f = { .img = img, .offset = 3 * CS, .len = CS };
    bool waited;

    memset(w.buf, 0x77, sizeof(w.buf));
    gate_arm_write(g);
    ck_assert_int_eq(pthread_create(&f.pt, NULL, filler_main, &f), 0);
    ck_assert_msg(gate_wait_blocked(g), "the fill never wrote its data");
    ck_assert_int_eq(pthread_create(&w.pt, NULL, writer_main, &w), 0);
    waited = wait_asleep(&w.tid);
    gate_release(g);
    ck_assert_int_eq(pthread_join(f.pt, NULL), 0);
    ck_assert_int_eq(pthread_join(w.pt, NULL), 0);
    ck_assert(!g->timed_out);
    ck_assert_int_eq(f.ret, 0);
    ck_assert_int_eq(w.ret, 0);
    assert_guest_write_kept(img, 3);
    ck_assert_msg(waited, "the guest write never waited for the fill");
    ck_assert_uint_eq(f.filled, CS);
    ck_assert_int_eq(image_close(img), 0);
    remove_overlay_dir(dir);
}
END_TEST

/* ---- replaced entries that must not be freed ----------------------------- */

/* What the corrupt L2 entry of guest cluster 2 names. */
enum victim {
    VICTIM_UNALIGNED,           /* guest cluster 0's host cluster + 512 */
    VICTIM_L2,                  /* the L2 table itself */
    VICTIM_REFBLOCK,
    VICTIM_REFTABLE,
    VICTIM_L1,
    VICTIM_HEADER,              /* a compressed descriptor at host offset 0 */
    VICTIM_UNDECODABLE,         /* compressed, offset beyond 2^56 (< 16 KiB clusters) */
    VICTIM_FREE,                /* a host cluster freed earlier (refcount 0) */
};

static const char *const victim_names[] = {
    "unaligned data offset", "L2 table", "refcount block", "refcount table",
    "L1 table", "header (compressed)", "undecodable compressed descriptor",
    "free cluster",
};

enum zap_op { OP_PUNCH, OP_ZERO_RANGE, OP_OVERWRITE };
static const char *const op_names[] = { "punch", "zero range", "two-cluster write" };

static const struct { unsigned cb; enum victim v; } zap_cases[] = {
    { 16, VICTIM_UNALIGNED }, { 16, VICTIM_L2 }, { 16, VICTIM_REFBLOCK },
    { 16, VICTIM_REFTABLE }, { 16, VICTIM_L1 }, { 16, VICTIM_HEADER },
    { 12, VICTIM_UNALIGNED }, { 12, VICTIM_L2 }, { 12, VICTIM_REFBLOCK },
    { 12, VICTIM_REFTABLE }, { 12, VICTIM_L1 }, { 12, VICTIM_HEADER },
    { 12, VICTIM_UNDECODABLE }, { 16, VICTIM_FREE }, { 12, VICTIM_FREE },
};
#define NB_ZAP_CASES (sizeof(zap_cases) / sizeof(zap_cases[0]))

static uint8_t *file_bytes(struct io *inner, uint64_t *size)
{
    uint8_t *b;

    ck_assert_int_eq(io_get_size(inner, size), 0);
    b = tu_zalloc((size_t)*size);
    ck_assert_int_eq(io_pread(inner, b, (size_t)*size, 0), 0);
    return b;
}

/*
 * Guest clusters 0 and 1 hold 0xAA and 0xBB; then the L2 entry of guest
 * cluster 2 is made to name a victim (an unaligned offset straddling the
 * data of clusters 0 and 1, a metadata cluster, a cluster freed before, or
 * nothing decodable), and a
 * punch, a zero range or a two-cluster write (the batch path) replaces it.
 * That must take the corruption path: -EIO, one error naming the guest
 * offset, writes refused from then on; and free nothing: after the close
 * the image file is byte for byte what it was apart from the corrupt bit
 * (no refcount dropped, no cluster punched, no entry rewritten).
 */
START_TEST(replacing_corrupt_entry_frees_nothing)
{
    unsigned cb = zap_cases[_i / 3].cb;
    enum victim v = zap_cases[_i / 3].v;
    enum zap_op op = (enum zap_op)(_i % 3);
    uint64_t cs = 1ull << cb, goff = 2 * cs, entry = 0, l1, rt;
    struct image_options o = default_opts();
    struct io *inner = new_image_io_geom(VSIZE, cb);
    struct gate_io *g = gate_new(inner, true);
    struct image *img = open_on(g, &o);
    uint8_t *data = tu_zalloc(2 * cs), *before, *after;
    uint64_t size_before, size_after;
    char where[64];
    int ret;

    write_pattern(img, 0, cs, 0xaa);
    write_pattern(img, cs, cs, 0xbb);
    if (v == VICTIM_FREE) {
        write_pattern(img, 5 * cs, cs, 0xdd);
        ck_assert_int_eq(image_flush(img), 0);
        entry = disk_l2_entry(inner, 5) & META_OFFSET_MASK;
        ck_assert_int_eq(image_zero(img, 5 * cs, cs, true), 0);
    }
    ck_assert_int_eq(image_close(img), 0);
    l1 = disk_u64(inner, 40);
    rt = disk_u64(inner, 48);
    switch (v) {
    case VICTIM_UNALIGNED:
        entry = ((disk_l2_entry(inner, 0) & META_OFFSET_MASK) + 512) | META_L2_COPIED;
        ck_assert_uint_eq((disk_l2_entry(inner, 1) & META_OFFSET_MASK),
                          (entry & META_OFFSET_MASK) - 512 + cs);
        break;
    case VICTIM_L2:
        entry = disk_u64(inner, l1) & META_OFFSET_MASK;
        break;
    case VICTIM_REFBLOCK:
        entry = disk_u64(inner, rt) & META_OFFSET_MASK;
        break;
    case VICTIM_REFTABLE:
        entry = rt;
        break;
    case VICTIM_L1:
        entry = l1;
        break;
    case VICTIM_HEADER:
        entry = META_L2_COMPRESSED | compress_descriptor_encode(0, 512, cb);
        break;
    case VICTIM_UNDECODABLE:
        entry = META_L2_COMPRESSED | 1ull << 56;
        break;
    case VICTIM_FREE:
        ck_assert_uint_eq(disk_l2_entry(inner, 5), 0);  /* freed at the close */
        break;
    }
    ck_assert_uint_ne(entry, 0);
    put_disk_l2_entry(inner, 2, entry);
    before = file_bytes(inner, &size_before);

    g = gate_new(inner, true);
    img = open_on(g, &o);
    tu_log_capture();
    switch (op) {
    case OP_PUNCH:
        ret = image_zero(img, goff, cs, true);
        break;
    case OP_ZERO_RANGE:
        ret = image_zero(img, goff, cs, false);
        break;
    default:
        memset(data, 0xcc, 2 * cs);
        ret = image_write(img, data, 2 * cs, goff);
        break;
    }
    tu_log_release();
    ck_assert_msg(ret == -EIO, "%u-bit clusters, %s over an entry naming the %s: "
                  "returned %d, not -EIO", cb, op_names[op], victim_names[v], ret);
    ck_assert_uint_eq(tu_log_state()->nb_errors, 1);
    snprintf(where, sizeof(where), "guest offset 0x%llx", (unsigned long long)goff);
    ck_assert_msg(strstr(tu_log_state()->last, where), "report \"%s\" does not name %s",
                  tu_log_state()->last, where);
    ck_assert_int_eq(image_write(img, data, 512, 10 * cs), -EIO);
    (void)image_close(img);

    after = file_bytes(inner, &size_after);
    ck_assert_uint_eq(size_after, size_before);
    ck_assert(after[79] & QCOW2_INCOMPAT_CORRUPT);
    after[79] &= (uint8_t)~QCOW2_INCOMPAT_CORRUPT;
    for (uint64_t i = 0; i < size_after; i++)
        ck_assert_msg(before[i] == after[i], "%u-bit clusters, %s over an entry naming "
                      "the %s: file byte 0x%llx changed from 0x%02x to 0x%02x", cb,
                      op_names[op], victim_names[v], (unsigned long long)i,
                      before[i], after[i]);
    free(before);
    free(after);
    free(data);
    io_close(inner);
}
END_TEST

/* ---- the write plan's branches --------------------------------------------- */

/*
 * A backend that records the host preads and pwrites made while it is on:
 * what each kind of write plan (src/image_write.c) reads and writes.
 * Closing it leaves @inner open, to be inspected.
 */
#define REC_MAX     64

struct rec_op {
    char kind;                  /* 'r' or 'w' */
    uint64_t off, len;
};

struct rec_io {
    struct tu_fwd_io fwd;
    pthread_mutex_t lock;
    bool on;
    unsigned nb;
    struct rec_op ops[REC_MAX];
};

static void rec_add(struct rec_io *r, char kind, uint64_t off, uint64_t len)
{
    pthread_mutex_lock(&r->lock);
    if (r->on) {
        ck_assert_uint_lt(r->nb, REC_MAX);
        r->ops[r->nb++] = (struct rec_op){ kind, off, len };
    }
    pthread_mutex_unlock(&r->lock);
}

static int rec_pread(struct io *io, void *buf, size_t len, uint64_t off)
{
    rec_add((struct rec_io *)io, 'r', off, len);
    return tu_fwd_pread(io, buf, len, off);
}

static int rec_pwrite(struct io *io, const void *buf, size_t len, uint64_t off)
{
    rec_add((struct rec_io *)io, 'w', off, len);
    return tu_fwd_pwrite(io, buf, len, off);
}

static void rec_close(struct io *io)
{
    struct rec_io *r = (struct rec_io *)io;

    pthread_mutex_destroy(&r->lock);
    free(r);
}

static const struct io_ops rec_ops = {
    .pread = rec_pread,
    .pwrite = rec_pwrite,
    .flush = tu_fwd_flush,
    .get_size = tu_fwd_get_size,
    .truncate = tu_fwd_truncate,
    .punch_hole = tu_fwd_punch,
    .close = rec_close,
};

/* Open the image held in @inner through a new recorder (*rec); @name is
 * where a backing file is looked up from. */
static struct image *open_rec(struct io *inner, const char *name,
                              const struct image_options *o, struct rec_io **rec)
{
    struct rec_io *r = tu_zalloc(sizeof(*r));
    struct image *img = NULL;

    r->fwd.io.ops = &rec_ops;
    r->fwd.inner = inner;
    pthread_mutex_init(&r->lock, NULL);
    ck_assert_int_eq(image_open_io(&r->fwd.io, name, o, &img), 0);
    *rec = r;
    return img;
}

static void rec_start(struct rec_io *r)
{
    pthread_mutex_lock(&r->lock);
    r->on = true;
    r->nb = 0;
    pthread_mutex_unlock(&r->lock);
}

/* Stop recording; the ops recorded since rec_start, as text for messages. */
static const char *rec_stop(struct rec_io *r, char *buf, size_t len)
{
    size_t used = 0;

    pthread_mutex_lock(&r->lock);
    r->on = false;
    buf[0] = 0;
    for (unsigned i = 0; i < r->nb && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, "%c 0x%llx+0x%llx; ",
                                 r->ops[i].kind, (unsigned long long)r->ops[i].off,
                                 (unsigned long long)r->ops[i].len);
    pthread_mutex_unlock(&r->lock);
    return buf;
}

/* Whether op @i of @r is a @kind of @len bytes at @off. */
static bool rec_is(const struct rec_io *r, unsigned i, char kind, uint64_t off,
                   uint64_t len)
{
    return i < r->nb && r->ops[i].kind == kind && r->ops[i].off == off &&
           r->ops[i].len == len;
}

/* The image in @inner is consistent as qemu-img check sees it: every
 * refcount equals its references (no leak, no corruption, COPIED right). */
static void assert_refcounts_exact(struct io *inner, const char *what)
{
    struct check_report rep = { 0 };
    struct check_refs *refs = NULL;
    struct qcow2_header h;
    struct meta m;
    char err[256];
    size_t len;
    const uint8_t *disk = io_memory_data(inner, &len);

    ck_assert_int_eq(header_decode(disk, len < (2u << 20) ? len : (2u << 20), len, &h,
                                   err, sizeof(err)), 0);
    meta_init(&m, &h, inner, true);
    ck_assert_int_eq(check_count_refs(&m, &h, &rep, &refs), 0);
    ck_assert_int_eq(check_compare(&m, &h, refs, &rep), 0);
    check_refs_free(refs);
    ck_assert_msg(rep.corruptions == 0 && rep.leaks == 0, "%s: %llu corruptions "
                  "(%llu COPIED wrong), %llu leaks", what,
                  (unsigned long long)rep.corruptions,
                  (unsigned long long)rep.count[CHECK_COPIED_WRONG],
                  (unsigned long long)rep.leaks);
    header_free(&h);
}

static bool image_reads(struct image *img, uint64_t goff, size_t len, uint8_t byte)
{
    uint8_t *b = tu_zalloc(len);
    bool ok;

    ck_assert_int_eq(image_read(img, b, len, goff), 0);
    ok = all_bytes(b, len, byte);
    free(b);
    return ok;
}

/*
 * Clusters we own whose written part holds data are overwritten in place
 * (PLAN_INPLACE): one pwrite at the host offset, across two clusters
 * contiguous on the host, nothing read, no metadata changed.
 */
START_TEST(plan_overwrites_owned_clusters_in_place)
{
    struct image_options o = default_opts();
    struct io *inner = new_image_io();
    struct rec_io *rec;
    struct image *img = open_rec(inner, "t.qcow2", &o, &rec);
    uint64_t host, size_before, size_after;
    char ops[512];

    write_pattern(img, 0, 2 * CS, 0xaa);
    ck_assert_int_eq(image_flush(img), 0);
    host = disk_l2_entry(inner, 0) & META_OFFSET_MASK;
    ck_assert_uint_eq(disk_l2_entry(inner, 1) & META_OFFSET_MASK, host + CS);
    ck_assert_int_eq(io_get_size(inner, &size_before), 0);

    rec_start(rec);
    write_pattern(img, CS - 4096, 8192, 0xcc);
    rec_stop(rec, ops, sizeof(ops));
    ck_assert_msg(rec->nb == 1 && rec_is(rec, 0, 'w', host + CS - 4096, 8192),
                  "in-place overwrite: %s", ops);
    ck_assert_int_eq(image_flush(img), 0);
    ck_assert_int_eq(io_get_size(inner, &size_after), 0);
    ck_assert_uint_eq(size_after, size_before);
    ck_assert(image_reads(img, CS - 4096, 8192, 0xcc));
    ck_assert(image_reads(img, 0, CS - 4096, 0xaa));
    ck_assert_int_eq(image_close(img), 0);
    ck_assert_uint_eq(disk_l2_entry(inner, 0), host | META_L2_COPIED);
    ck_assert_uint_eq(disk_l2_entry(inner, 1), (host + CS) | META_L2_COPIED);
    assert_refcounts_exact(inner, "after an in-place overwrite");
    io_close(inner);
}
END_TEST

/*
 * Fresh allocation: whole unallocated clusters become one contiguous run
 * written with one pwrite (PLAN_NEW_RUN); the part of a cluster that a
 * write leaves uncovered, with no backing file beneath, is not written at
 * all on a host cluster taken from past the end of the file (PLAN_CLUSTER:
 * it reads as zeros there).
 */
START_TEST(plan_allocates_fresh_clusters)
{
    struct image_options o = default_opts();
    struct io *inner = new_image_io();
    struct rec_io *rec;
    struct image *img = open_rec(inner, "t.qcow2", &o, &rec);
    uint64_t end, run;
    char ops[512];

    write_pattern(img, 0, 4096, 0x11);      /* the L2 table, the caches */
    ck_assert_int_eq(io_get_size(inner, &end), 0);

    rec_start(rec);
    write_pattern(img, 4 * CS, 4 * CS, 0xaa);
    rec_stop(rec, ops, sizeof(ops));
    ck_assert_msg(rec->nb == 1 && rec->ops[0].kind == 'w' && rec->ops[0].len == 4 * CS &&
                  rec->ops[0].off >= end, "a run of four new clusters: %s", ops);
    run = rec->ops[0].off;

    rec_start(rec);
    write_pattern(img, 9 * CS + 1000, 3000, 0xbb);
    rec_stop(rec, ops, sizeof(ops));
    ck_assert_msg(rec->nb == 1 && rec->ops[0].kind == 'w' && rec->ops[0].len == 3000 &&
                  rec->ops[0].off == run + 4 * CS + 1000,
                  "a partial write of a new cluster: %s", ops);
    ck_assert(image_reads(img, 9 * CS, 1000, 0));
    ck_assert(image_reads(img, 9 * CS + 1000, 3000, 0xbb));
    ck_assert(image_reads(img, 9 * CS + 4000, CS - 4000, 0));
    ck_assert_int_eq(image_close(img), 0);
    for (uint64_t i = 0; i < 4; i++)
        ck_assert_uint_eq(disk_l2_entry(inner, 4 + i), (run + i * CS) | META_L2_COPIED);
    ck_assert_uint_eq(disk_l2_entry(inner, 9), (run + 4 * CS) | META_L2_COPIED);
    assert_refcounts_exact(inner, "after fresh allocations");
    io_close(inner);
}
END_TEST

/*
 * Copy-on-write from a backing file (PLAN_CLUSTER): the new host cluster is
 * written whole, with the backing file's bytes around the guest's.
 */
START_TEST(plan_copies_from_backing_file)
{
    char dir[] = "/tmp/check_image.XXXXXX", path[96];
    struct image_options o = default_opts();
    struct io *inner = new_overlay_io(dir, path, sizeof(path));
    struct rec_io *rec;
    struct image *img;
    uint8_t *host_bytes = tu_zalloc(CS);
    uint64_t host;
    char ops[512];

    o.backing.policy = BACKING_ALLOW;
    img = open_rec(inner, path, &o, &rec);
    write_pattern(img, 0, 4096, 0x11);      /* the L2 table, the caches */

    rec_start(rec);
    write_pattern(img, 3 * CS + 1000, 4096, 0xcc);
    rec_stop(rec, ops, sizeof(ops));
    ck_assert_msg(rec->nb == 1 && rec->ops[0].kind == 'w' && rec->ops[0].len == CS,
                  "COW from the backing file: %s", ops);
    host = rec->ops[0].off;
    ck_assert_int_eq(image_close(img), 0);
    ck_assert_uint_eq(disk_l2_entry(inner, 3), host | META_L2_COPIED);
    ck_assert_int_eq(io_pread(inner, host_bytes, CS, host), 0);
    ck_assert(all_bytes(host_bytes, 1000, 0x5a));
    ck_assert(all_bytes(host_bytes + 1000, 4096, 0xcc));
    ck_assert(all_bytes(host_bytes + 5096, CS - 5096, 0x5a));
    assert_refcounts_exact(inner, "after COW from a backing file");
    remove_overlay_dir(dir);
    free(host_bytes);
    io_close(inner);
}
END_TEST

/*
 * Overwrite of part of a compressed cluster (PLAN_CLUSTER): the compressed
 * data is read and decompressed, a new host cluster is written whole, and
 * the compressed sectors are freed (refcounts exact after the close).
 */
START_TEST(plan_overwrites_compressed_cluster)
{
    struct image_options o = default_opts();
    struct io *inner = new_image_io();
    struct gate_io *g = gate_new(inner, true);
    struct image *img = open_on(g, &o);
    uint64_t old_host, new_host, entry;
    struct rec_io *rec;
    char ops[512];
    long clen;

    write_pattern(img, 0, CS, 0xaa);
    write_pattern(img, 5 * CS, 4096, 0x11);     /* the next write's caches */
    ck_assert_int_eq(image_close(img), 0);
    old_host = compress_cluster0(inner, 0xaa, &clen);
    assert_refcounts_exact(inner, "the compressed cluster made by hand");

    img = open_rec(inner, "t.qcow2", &o, &rec);
    write_pattern(img, 6 * CS, 4096, 0x22);     /* the L2 slice, cached */
    rec_start(rec);
    write_pattern(img, 8192, 4096, 0xcc);
    rec_stop(rec, ops, sizeof(ops));
    ck_assert_msg(rec->nb == 2 && rec->ops[0].kind == 'r' && rec->ops[0].off == old_host &&
                  rec->ops[0].len >= (uint64_t)clen && rec->ops[1].kind == 'w' &&
                  rec->ops[1].len == CS && rec->ops[1].off != old_host,
                  "overwrite of a compressed cluster: %s", ops);
    new_host = rec->ops[1].off;
    ck_assert(image_reads(img, 0, 8192, 0xaa));
    ck_assert(image_reads(img, 8192, 4096, 0xcc));
    ck_assert(image_reads(img, 12288, CS - 12288, 0xaa));
    ck_assert_int_eq(image_close(img), 0);
    entry = disk_l2_entry(inner, 0);
    ck_assert_uint_eq(entry, new_host | META_L2_COPIED);
    assert_refcounts_exact(inner, "after overwriting a compressed cluster");
    io_close(inner);
}
END_TEST

/* The L2 entry and bitmap of guest cluster 0 of an extended-L2 image. */
static void disk_ext_l2_entry0(struct io *inner, uint64_t *entry, uint64_t *bitmap)
{
    uint64_t l2 = disk_u64(inner, disk_u64(inner, 40)) & META_OFFSET_MASK;

    ck_assert_uint_ne(l2, 0);
    *entry = disk_u64(inner, l2);
    *bitmap = disk_u64(inner, l2 + 8);
}

/*
 * Subclusters with extended L2 (2 KiB of a 64 KiB cluster): a write into
 * a new cluster writes only the subcluster it touches (zeros around the
 * data within it), a later write into an allocated subcluster goes in
 * place, and one into an unallocated subcluster of a cluster we own
 * writes that subcluster of the same host cluster.  The bitmap says which
 * are allocated.
 */
START_TEST(plan_writes_subclusters)
{
    const uint64_t sc = CS / 32;
    struct image_options o = default_opts();
    struct io *inner = new_image_io();
    struct rec_io *rec;
    struct image *img;
    uint64_t host, entry, bitmap;
    uint8_t b = 0;
    char ops[512];

    /* An empty image: setting the extended-L2 bit (byte 79, bit 4) makes
     * it a valid extended-L2 image (no L2 table exists yet). */
    ck_assert_int_eq(io_pread(inner, &b, 1, 79), 0);
    b |= (uint8_t)QCOW2_INCOMPAT_EXTL2;
    ck_assert_int_eq(io_pwrite(inner, &b, 1, 79), 0);
    img = open_rec(inner, "t.qcow2", &o, &rec);
    write_pattern(img, 5 * CS, 4096, 0x11);     /* the L2 table, the caches */

    rec_start(rec);
    write_pattern(img, 2 * sc + 100, 1000, 0xaa);
    rec_stop(rec, ops, sizeof(ops));
    ck_assert_msg(rec->nb == 1 && rec->ops[0].kind == 'w' && rec->ops[0].len == sc &&
                  (rec->ops[0].off & (CS - 1)) == 2 * sc,
                  "a write into a new cluster's subcluster 2: %s", ops);
    host = rec->ops[0].off - 2 * sc;

    rec_start(rec);
    write_pattern(img, 2 * sc + 1500, 200, 0xbb);
    rec_stop(rec, ops, sizeof(ops));
    ck_assert_msg(rec->nb == 1 && rec_is(rec, 0, 'w', host + 2 * sc + 1500, 200),
                  "an overwrite of allocated subcluster 2: %s", ops);

    rec_start(rec);
    write_pattern(img, 5 * sc, sc, 0xcc);
    rec_stop(rec, ops, sizeof(ops));
    ck_assert_msg(rec->nb == 1 && rec_is(rec, 0, 'w', host + 5 * sc, sc),
                  "a write of unallocated subcluster 5 of an owned cluster: %s", ops);

    ck_assert(image_reads(img, 0, 2 * sc + 100, 0));
    ck_assert(image_reads(img, 2 * sc + 100, 1000, 0xaa));
    ck_assert(image_reads(img, 2 * sc + 1100, 400, 0));
    ck_assert(image_reads(img, 2 * sc + 1500, 200, 0xbb));
    ck_assert(image_reads(img, 2 * sc + 1700, 3 * sc - 1700, 0));
    ck_assert(image_reads(img, 5 * sc, sc, 0xcc));
    ck_assert(image_reads(img, 6 * sc, CS - 6 * sc, 0));
    ck_assert_int_eq(image_close(img), 0);
    disk_ext_l2_entry0(inner, &entry, &bitmap);
    ck_assert_uint_eq(entry, host | META_L2_COPIED);
    ck_assert_uint_eq(bitmap, (1ull << 2) | (1ull << 5));
    assert_refcounts_exact(inner, "after subcluster writes");
    io_close(inner);
}
END_TEST

/*
 * A cluster shared with an internal snapshot (refcount 2, COPIED clear;
 * its L2 table shared too): the write copies the L2 table, reads the old
 * cluster, writes a new one whole, and leaves the snapshot's data as it
 * was; the old cluster's refcount drops to 1 (refcounts exact).  The
 * snapshot is made by qemu-img.
 */
START_TEST(plan_copies_snapshot_shared_cluster)
{
    char dir[] = "/tmp/check_image.XXXXXX", path[64], cmd[256];
    struct create_options co = { .size = VSIZE, .cluster_bits = CB };
    struct image_options o = default_opts();
    struct image *img = NULL;
    struct io *inner;
    struct rec_io *rec;
    uint64_t old_host, old_l2, entry;
    char ops[512];

    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/t.qcow2", dir);
    ck_assert_int_eq(create_image(path, &co), 0);
    ck_assert_int_eq(image_open(path, &o, &img), 0);
    write_pattern(img, 0, CS, 0xaa);
    ck_assert_int_eq(image_close(img), 0);
    snprintf(cmd, sizeof(cmd), "qemu-img snapshot -c s1 '%s'", path);
    ck_assert_int_eq(system(cmd), 0);
    inner = tu_file_to_memory(path);
    entry = disk_l2_entry(inner, 0);
    ck_assert_uint_eq(entry & META_L2_COPIED, 0);
    old_host = entry & META_OFFSET_MASK;
    old_l2 = disk_u64(inner, disk_u64(inner, 40)) & META_OFFSET_MASK;

    img = open_rec(inner, path, &o, &rec);
    rec_start(rec);
    write_pattern(img, 8192, 4096, 0xcc);
    rec_stop(rec, ops, sizeof(ops));
    /* The L2 table copied, the old cluster read whole, the new one
     * written whole (refcount block reads aside). */
    {
        bool l2_read = false, l2_written = false, data_read = false;
        unsigned data_writes = 0;
        uint64_t new_host = 0;
        for (unsigned i = 0; i < rec->nb; i++) {
            const struct rec_op *op = &rec->ops[i];
            if (op->kind == 'r' && op->off == old_l2 && op->len == CS)
                l2_read = true;
            else if (op->kind == 'r' && op->off == old_host && op->len == CS)
                data_read = true;
            else if (op->kind == 'w' && op->len == CS && op->off != old_host &&
                     op->off != old_l2 && !l2_written && !data_read)
                l2_written = true;  /* the new, zeroed table comes first */
            else if (op->kind == 'w') {
                ck_assert_msg(op->len == CS && op->off != old_host,
                              "a write of a snapshot-shared cluster: %s", ops);
                data_writes++;
                new_host = op->off;
            }
        }
        ck_assert_msg(l2_read && l2_written && data_read && data_writes == 1,
                      "a write of a snapshot-shared cluster: %s", ops);
        ck_assert(image_reads(img, 0, 8192, 0xaa));
        ck_assert(image_reads(img, 8192, 4096, 0xcc));
        ck_assert(image_reads(img, 12288, CS - 12288, 0xaa));
        ck_assert_int_eq(image_close(img), 0);
        ck_assert_uint_eq(disk_l2_entry(inner, 0), new_host | META_L2_COPIED);
    }
    assert_refcounts_exact(inner, "after a write of a snapshot-shared cluster");

    /* The snapshot still shows the old data. */
    o.read_only = true;
    o.snapshot = "s1";
    img = open_rec(inner, path, &o, &rec);
    ck_assert(image_reads(img, 0, CS, 0xaa));
    ck_assert_int_eq(image_close(img), 0);
    io_close(inner);
    unlink(path);
    rmdir(dir);
}
END_TEST

/* ---- views of internal snapshots ------------------------------------------ */

/* An image file in a fresh temporary directory; snapshots are taken by
 * qemu-img, which the oracle (the -o snapshot= view) also reads. */
struct snap_file_img {
    char dir[32];
    char path[64];
};

static void snap_img_create(struct snap_file_img *f, uint64_t vsize, unsigned cb)
{
    struct create_options co = { .size = vsize, .cluster_bits = cb };

    snprintf(f->dir, sizeof(f->dir), "/tmp/check_image.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(f->dir));
    snprintf(f->path, sizeof(f->path), "%s/t.qcow2", f->dir);
    ck_assert_int_eq(create_image(f->path, &co), 0);
}

static void snap_img_remove(struct snap_file_img *f)
{
    unlink(f->path);
    rmdir(f->dir);
}

static void qemu_img(const struct snap_file_img *f, const char *args)
{
    char cmd[256];

    snprintf(cmd, sizeof(cmd), "qemu-img %s '%s' >/dev/null", args, f->path);
    ck_assert_msg(system(cmd) == 0, "test setup: qemu-img %s failed", args);
}

static uint8_t *read_all(struct image *img, uint64_t size)
{
    uint8_t *b = tu_zalloc((size_t)size);

    ck_assert_int_eq(image_read(img, b, (size_t)size, 0), 0);
    return b;
}

/* What -o snapshot=@name shows (the oracle for views): its bytes and size. */
static uint8_t *read_by_option(const struct snap_file_img *f, const char *name,
                               uint64_t *size)
{
    struct image_options o = default_opts();
    struct image *img = NULL;
    uint8_t *b;

    o.read_only = true;
    o.snapshot = name;
    ck_assert_int_eq(image_open(f->path, &o, &img), 0);
    *size = image_size(img);
    b = read_all(img, *size);
    ck_assert_int_eq(image_close(img), 0);
    return b;
}

/* The position of snapshot @name in @img's table. */
static uint32_t snap_index(struct image *img, const char *name)
{
    struct snapshot_table t;
    const struct snapshot *s;
    uint32_t i;

    ck_assert_int_eq(image_snapshot_table(img, &t), 0);
    s = snapshot_find(&t, name);
    ck_assert_ptr_nonnull(s);
    i = s->index;
    snapshot_table_free(&t);
    return i;
}

static struct image *view_of(struct image *img, const char *name)
{
    struct image *v = NULL;

    ck_assert_int_eq(image_snapshot_view_open(img, snap_index(img, name), &v), 0);
    return v;
}

static void file_put(const struct snap_file_img *f, uint64_t off, const void *p, size_t n)
{
    struct io *io;

    ck_assert_int_eq(io_open_file(f->path, true, &io), 0);
    ck_assert_int_eq(io_pwrite(io, p, n, off), 0);
    io_close(io);
}

static uint64_t file_get(const struct snap_file_img *f, uint64_t off, unsigned bytes)
{
    uint8_t b[8] = { 0 };
    struct io *io;

    ck_assert_int_eq(io_open_file(f->path, false, &io), 0);
    ck_assert_int_eq(io_pread(io, b, bytes, off), 0);
    io_close(io);
    return bytes == 8 ? be64_get(b) : bytes == 4 ? be32_get(b) : b[0];
}

/* The first snapshot entry's offset in the file. */
static uint64_t first_snapshot_entry(const struct snap_file_img *f)
{
    return file_get(f, 64, 8);
}

static void assert_same(const uint8_t *got, const uint8_t *want, uint64_t size,
                        const char *what)
{
    uint64_t i = 0;

    if (memcmp(got, want, (size_t)size) == 0)
        return;
    while (got[i] == want[i])
        i++;
    ck_abort_msg("%s: byte 0x%llx is 0x%02x, the snapshot (-o snapshot=) has 0x%02x",
                 what, (unsigned long long)i, got[i], want[i]);
}

/* A reader that keeps reading two views and comparing them with what they
 * must show, while the test writes the disk they were taken from. */
struct view_reader {
    struct image *view[2];
    const uint8_t *want[2];
    uint64_t size[2];
    _Atomic bool stop;
    unsigned passes, mismatches, errors;
    uint64_t first_bad;
};

static void *view_reader_run(void *arg)
{
    struct view_reader *r = arg;
    uint8_t *b = tu_zalloc(1u << 20);

    do {
        for (int v = 0; v < 2; v++)
            for (uint64_t off = 0; off < r->size[v]; off += 1u << 20) {
                size_t n = r->size[v] - off < (1u << 20) ? (size_t)(r->size[v] - off)
                                                         : 1u << 20;
                if (image_read(r->view[v], b, n, off) < 0) {
                    r->errors++;
                    continue;
                }
                if (memcmp(b, r->want[v] + off, n) != 0 && r->mismatches++ == 0)
                    r->first_bad = off;
            }
        r->passes++;
    } while (!atomic_load(&r->stop));
    free(b);
    return NULL;
}

/*
 * Views of two snapshots over the writable image read exactly what
 * -o snapshot= reads, before, during (a reader thread) and after writes
 * that copy shared clusters and tables: an overwrite of the whole disk, a
 * zero range, a discard, a preallocation, an unaligned write, a flush.
 * Writes to a view are refused.  The disk reads as the model, refcounts
 * are exact after close, and the snapshots still read as before.
 */
START_TEST(snapshot_views_unchanged_by_writes)
{
    struct snap_file_img f;
    struct image_options o = default_opts();
    struct image *img = NULL;
    struct view_reader r = { 0 };
    uint8_t *want1, *want2, *model, *got, *after;
    uint64_t size1, size2, size;
    pthread_t th;

    snap_img_create(&f, VSIZE, CB);
    ck_assert_int_eq(image_open(f.path, &o, &img), 0);
    write_pattern(img, 0, 4u << 20, 0xa1);
    write_pattern(img, 6u << 20, 1u << 20, 0xa2);
    ck_assert_int_eq(image_close(img), 0);
    qemu_img(&f, "snapshot -c s1");
    ck_assert_int_eq(image_open(f.path, &o, &img), 0);
    write_pattern(img, 1u << 20, 1u << 20, 0xb1);
    write_pattern(img, (8u << 20) + 100, 4096, 0xb2);     /* inside one cluster */
    ck_assert_int_eq(image_zero(img, 3u << 20, 2 * CS, true), 0);
    ck_assert_int_eq(image_close(img), 0);
    qemu_img(&f, "snapshot -c s2");
    ck_assert_int_eq(image_open(f.path, &o, &img), 0);
    write_pattern(img, 0, 512u << 10, 0xc1);
    ck_assert_int_eq(image_close(img), 0);

    want1 = read_by_option(&f, "s1", &size1);
    want2 = read_by_option(&f, "s2", &size2);
    ck_assert_uint_eq(size1, VSIZE);
    ck_assert(want1[(1u << 20)] == 0xa1 && want2[(1u << 20)] == 0xb1);  /* they differ */

    ck_assert_int_eq(image_open(f.path, &o, &img), 0);
    model = read_all(img, VSIZE);
    r.view[0] = view_of(img, "s1");
    r.view[1] = view_of(img, "s2");
    r.want[0] = want1;
    r.want[1] = want2;
    r.size[0] = image_size(r.view[0]);
    r.size[1] = image_size(r.view[1]);
    ck_assert_uint_eq(r.size[0], size1);
    ck_assert_uint_eq(r.size[1], size2);
    ck_assert(image_is_read_only(r.view[0]));
    ck_assert_int_eq(image_write(r.view[0], want1, 512, 0), -EROFS);
    ck_assert_int_eq(image_zero(r.view[0], 0, CS, true), -EROFS);
    ck_assert_int_eq(image_resize(r.view[0], VSIZE * 2), -EROFS);
    got = read_all(r.view[0], size1);
    assert_same(got, want1, size1, "view of s1");
    free(got);

    ck_assert_int_eq(pthread_create(&th, NULL, view_reader_run, &r), 0);
    /* Each path first over clusters (and L2 tables) the snapshots share:
     * a write inside one cluster, a partial-cluster zeroing (written as
     * zeros), a zero range that keeps allocations, a discard, a
     * preallocation of a range the snapshot s1 holds data in; then an
     * overwrite of the whole disk. */
    write_pattern(img, (6u << 20) + 7, 100, 0xee);
    memset(model + (6u << 20) + 7, 0xee, 100);
    ck_assert_int_eq(image_zero(img, (6u << 20) + 2 * CS + 100, 1000, false), 0);
    memset(model + (6u << 20) + 2 * CS + 100, 0, 1000);
    ck_assert_int_eq(image_zero(img, (3u << 20) + (512u << 10), 4 * CS, false), 0);
    memset(model + (3u << 20) + (512u << 10), 0, 4 * CS);
    ck_assert_int_eq(image_zero(img, 1u << 20, 4 * CS, true), 0);
    memset(model + (1u << 20), 0, 4 * CS);
    ck_assert_int_eq(image_preallocate(img, 3u << 20, 2 * CS), 0);
    ck_assert_int_eq(image_flush(img), 0);
    got = read_all(img, VSIZE);
    ck_assert_msg(memcmp(got, model, VSIZE) == 0, "the disk differs from the model");
    free(got);
    for (uint64_t off = 0; off < VSIZE; off += 1u << 20)
        write_pattern(img, off, 1u << 20, (uint8_t)(0xd0 + (off >> 20)));
    for (uint64_t off = 0; off < VSIZE; off += 1u << 20)
        memset(model + off, 0xd0 + (int)(off >> 20), 1u << 20);
    ck_assert_int_eq(image_zero(img, 2u << 20, 1u << 20, false), 0);
    memset(model + (2u << 20), 0, 1u << 20);
    ck_assert_int_eq(image_zero(img, 4u << 20, 4u << 20, true), 0);
    memset(model + (4u << 20), 0, 4u << 20);
    ck_assert_int_eq(image_flush(img), 0);
    atomic_store(&r.stop, true);
    ck_assert_int_eq(pthread_join(th, NULL), 0);
    ck_assert_msg(r.errors == 0 && r.mismatches == 0, "while the disk was written, "
                  "%u passes over the views: %u reads failed, %u differed (first "
                  "at 0x%llx)", r.passes, r.errors, r.mismatches,
                  (unsigned long long)r.first_bad);

    for (int v = 0; v < 2; v++) {
        got = read_all(r.view[v], r.size[v]);
        assert_same(got, r.want[v], r.size[v], v ? "view of s2 after the writes"
                                                 : "view of s1 after the writes");
        free(got);
    }
    got = read_all(img, VSIZE);
    ck_assert_msg(memcmp(got, model, VSIZE) == 0, "the disk differs from the model");
    free(got);
    image_snapshot_view_close(r.view[0]);
    ck_assert_int_eq(image_close(r.view[1]), 0);      /* image_close works too */
    ck_assert_int_eq(image_close(img), 0);

    {
        struct io *inner = tu_file_to_memory(f.path);
        assert_refcounts_exact(inner, "after writes beside snapshot views");
        io_close(inner);
    }
    after = read_by_option(&f, "s1", &size);
    assert_same(after, want1, size1, "s1 after the writes (-o snapshot=)");
    free(after);
    after = read_by_option(&f, "s2", &size);
    assert_same(after, want2, size2, "s2 after the writes (-o snapshot=)");
    free(after);
    free(want1);
    free(want2);
    free(model);
    snap_img_remove(&f);
}
END_TEST

/*
 * A snapshot taken before the disk grew: its view has the snapshot's
 * disk_size, and its L1 table is smaller than the disk's (512-byte
 * clusters: one L1 entry maps 32 KiB).  With disk_size 0 (not recorded)
 * the view has the disk's size and reads zeros past what its L1 maps, as
 * -o snapshot= does.
 */
START_TEST(snapshot_view_of_smaller_disk)
{
    struct snap_file_img f;
    struct image_options o = default_opts();
    struct image *img = NULL, *v;
    uint64_t size, entry, zero = 0;
    uint8_t *want, *got;

    snap_img_create(&f, 1u << 20, 9);
    ck_assert_int_eq(image_open(f.path, &o, &img), 0);
    write_pattern(img, 0, 1u << 20, 0x5a);
    ck_assert_int_eq(image_close(img), 0);
    qemu_img(&f, "snapshot -c small");
    ck_assert_int_eq(image_open(f.path, &o, &img), 0);
    ck_assert_int_eq(image_resize(img, 4u << 20), 0);
    write_pattern(img, 0, 4u << 20, 0x77);
    ck_assert_int_eq(image_close(img), 0);

    entry = first_snapshot_entry(&f);
    ck_assert_uint_lt(file_get(&f, entry + 8, 4), file_get(&f, 36, 4));  /* L1 sizes */
    want = read_by_option(&f, "small", &size);
    ck_assert_uint_eq(size, 1u << 20);
    ck_assert_int_eq(image_open(f.path, &o, &img), 0);
    v = view_of(img, "small");
    ck_assert_uint_eq(image_size(v), 1u << 20);
    got = read_all(v, size);
    assert_same(got, want, size, "view of a smaller snapshot");
    ck_assert(all_bytes(got, size, 0x5a));
    free(got);
    ck_assert(image_reads(v, 1u << 20, 4096, 0));     /* past its end */
    image_snapshot_view_close(v);
    ck_assert_int_eq(image_close(img), 0);
    free(want);

    /* No disk size recorded: the disk's size, zeros past the snapshot's L1. */
    ck_assert_uint_ge(file_get(&f, entry + 36, 4), 16);        /* extra data */
    file_put(&f, entry + 48, &zero, 8);
    want = read_by_option(&f, "small", &size);
    ck_assert_uint_eq(size, 4u << 20);
    ck_assert_int_eq(image_open(f.path, &o, &img), 0);
    v = view_of(img, "small");
    ck_assert_uint_eq(image_size(v), 4u << 20);
    got = read_all(v, size);
    assert_same(got, want, size, "view of a snapshot without a disk size");
    ck_assert(all_bytes(got, 1u << 20, 0x5a));
    ck_assert(all_bytes(got + (1u << 20), 3u << 20, 0));
    free(got);
    image_snapshot_view_close(v);
    ck_assert_int_eq(image_close(img), 0);
    free(want);
    snap_img_remove(&f);
}
END_TEST

/*
 * Bad snapshot tables: refused by the view as by -o snapshot=, the message
 * naming the field and its offset (cases 0-2); an L1 entry with reserved
 * bits is reported when read, through the view (-EIO), and the writable
 * disk beside it stays writable and is not marked corrupt (case 3).
 */
START_TEST(snapshot_view_refuses_bad_tables)
{
    struct snap_file_img f;
    struct image_options o = default_opts();
    struct image *img = NULL, *v = NULL;
    uint64_t entry, l1, val;
    char want_msg[128], opt_msg[1024];
    uint8_t buf[512];

    snap_img_create(&f, 1u << 20, CB);
    ck_assert_int_eq(image_open(f.path, &o, &img), 0);
    write_pattern(img, 0, CS, 0x31);
    ck_assert_int_eq(image_close(img), 0);
    qemu_img(&f, "snapshot -c s1");
    entry = first_snapshot_entry(&f);
    l1 = file_get(&f, entry, 8);

    switch (_i) {
    case 0:     /* l1_table_offset misaligned */
        be64_put(buf, l1 + 512);
        file_put(&f, entry, buf, 8);
        snprintf(want_msg, sizeof(want_msg), "snapshot 0: L1 table 0x%llx",
                 (unsigned long long)(l1 + 512));
        o.read_only = true;     /* a writable open refuses the table itself */
        break;
    case 1:     /* l1_size too large */
        be32_put(buf, 0x10000000);
        file_put(&f, entry + 8, buf, 4);
        snprintf(want_msg, sizeof(want_msg), "with %u entries", 0x10000000u);
        o.read_only = true;
        break;
    case 2:     /* disk_size not a multiple of 512 */
        be64_put(buf, (1u << 20) + 100);
        file_put(&f, entry + 48, buf, 8);
        snprintf(want_msg, sizeof(want_msg), "disk_size (entry offset 48, at 0x%llx)",
                 (unsigned long long)(entry + 48));
        break;
    default:    /* reserved bits in the snapshot's L1 entry 0 */
        val = file_get(&f, l1, 8) | 2;
        be64_put(buf, val);
        file_put(&f, l1, buf, 8);
        snprintf(want_msg, sizeof(want_msg), "L1 entry 0 (table at 0x%llx)",
                 (unsigned long long)l1);
        break;
    }

    /* -o snapshot= refuses cases 0-2 with the same message. */
    if (_i < 3) {
        struct image_options so = default_opts();
        struct image *simg = NULL;
        so.read_only = true;
        so.snapshot = "s1";
        tu_log_capture();
        ck_assert_int_lt(image_open(f.path, &so, &simg), 0);
        snprintf(opt_msg, sizeof(opt_msg), "%s", tu_log_state()->first_error);
        tu_log_release();
        ck_assert_msg(strstr(opt_msg, want_msg), "-o snapshot= said \"%s\", not \"%s\"",
                      opt_msg, want_msg);
    }

    ck_assert_int_eq(image_open(f.path, &o, &img), 0);
    tu_log_capture();
    if (_i < 3) {
        ck_assert_int_eq(image_snapshot_view_open(img, 0, &v), -EINVAL);
    } else {
        ck_assert_int_eq(image_snapshot_view_open(img, 0, &v), 0);
        ck_assert_int_eq(image_read(v, buf, sizeof(buf), 0), -EIO);
    }
    ck_assert_msg(strstr(tu_log_state()->first_error, want_msg),
                  "the view said \"%s\", not \"%s\"", tu_log_state()->first_error,
                  want_msg);
    ck_assert_msg(_i >= 3 || strcmp(tu_log_state()->first_error, opt_msg) == 0,
                  "view: \"%s\", -o snapshot=: \"%s\"", tu_log_state()->first_error,
                  opt_msg);
    tu_log_release();
    if (v)
        image_snapshot_view_close(v);
    if (!o.read_only) {
        /* The disk beside it is not marked corrupt. */
        write_pattern(img, 0, 512, 0x32);
        ck_assert(image_reads(img, 0, 512, 0x32));
    }
    ck_assert_int_eq(image_close(img), 0);
    ck_assert_uint_eq(file_get(&f, 72, 8) & QCOW2_INCOMPAT_CORRUPT, 0);
    snap_img_remove(&f);
}
END_TEST

/* ---- write ordering (image_flush.c's invariants), seen in a trace ------ */

/* Open the image held in @inner (kept when the image closes) with its
 * host I/O traced into *fd. */
static struct image *open_traced(struct io *inner, int *fd)
{
    struct image_options o = default_opts();
    struct image *img = NULL;

    *fd = tu_trace_fd();
    o.trace_fd = *fd;
    /* The gate (never armed) keeps @inner for the test when closed. */
    ck_assert_int_eq(image_open_io(&gate_new(inner, true)->fwd.io, "t.qcow2", &o,
                                   &img), 0);
    return img;
}

/* The last record in [@from, @to) of @type (for writes and punches: at
 * @off, @len bytes), or -1. */
static int trace_last(const struct tu_trace *t, uint32_t type, uint64_t off,
                      uint64_t len, unsigned from, unsigned to)
{
    int found = -1;

    for (unsigned i = from; i < to && i < t->nb; i++)
        if (t->recs[i].r.type == type &&
            (type == IO_TRACE_FLUSH ||
             (t->recs[i].r.offset == off && t->recs[i].r.length == len)))
            found = (int)i;
    return found;
}

static bool trace_flush_between(const struct tu_trace *t, int a, int b)
{
    for (int i = a + 1; i < b; i++)
        if (t->recs[i].r.type == IO_TRACE_FLUSH)
            return true;
    return false;
}

/*
 * Invariants 1, 2 and 5: a write into an empty image allocates an L2 table
 * and a data cluster.  At the flush the refcount block is written, then
 * the host flushed, then the L2 slice; the guest data is flushed before
 * the L2 slice too; the L1 entry comes after the L2 table, with a flush
 * between.
 */
START_TEST(flush_orders_refcounts_data_l2_l1)
{
    struct io *inner = new_image_io();
    int fd;
    struct image *img = open_traced(inner, &fd);
    uint64_t rb, l1, l2, data;
    struct tu_trace t;
    int i_rb, i_data, i_l2, i_l2_new, i_l1;

    write_pattern(img, 0, CS, 0x5a);
    ck_assert_int_eq(image_flush(img), 0);
    tu_trace_read(fd, &t);
    rb = disk_u64(inner, disk_u64(inner, 48));
    l1 = disk_u64(inner, 40);
    l2 = disk_u64(inner, l1) & META_OFFSET_MASK;
    data = disk_l2_entry(inner, 0) & META_OFFSET_MASK;
    ck_assert_uint_ne(l2, 0);
    ck_assert_uint_ne(data, 0);

    i_rb = trace_last(&t, IO_TRACE_WRITE, rb, CS, 0, t.nb);
    i_data = trace_last(&t, IO_TRACE_WRITE, data, CS, 0, t.nb);
    i_l2_new = trace_last(&t, IO_TRACE_WRITE, l2, CS, 0, t.nb);  /* zeroed at once */
    i_l2 = trace_last(&t, IO_TRACE_WRITE, l2, 4096, 0, t.nb);    /* the slice */
    i_l1 = trace_last(&t, IO_TRACE_WRITE, l1, 8, 0, t.nb);
    ck_assert_msg(i_rb >= 0 && i_data >= 0 && i_l2_new >= 0 && i_l2 >= 0 && i_l1 >= 0,
                  "rb %d data %d new L2 %d slice %d L1 %d", i_rb, i_data, i_l2_new,
                  i_l2, i_l1);
    ck_assert_msg(i_rb < i_l2 && trace_flush_between(&t, i_rb, i_l2),
                  "refcount block (%d), flush, L2 slice (%d)", i_rb, i_l2);
    ck_assert_msg(i_data < i_l2 && trace_flush_between(&t, i_data, i_l2),
                  "guest data (%d), flush, L2 slice (%d)", i_data, i_l2);
    ck_assert_msg(i_l2_new < i_l1 && i_l2 < i_l1 && trace_flush_between(&t, i_l2, i_l1),
                  "L2 table (%d, %d), flush, L1 entry (%d)", i_l2_new, i_l2, i_l1);
    ck_assert_int_ge(trace_last(&t, IO_TRACE_FLUSH, 0, 0, (unsigned)i_l1, t.nb), 0);
    tu_trace_free(&t);
    ck_assert_int_eq(image_close(img), 0);
    close(fd);
    assert_refcounts_exact(inner, "after an ordered flush");
    io_close(inner);
}
END_TEST

/*
 * Invariant 4: a discard drops the reference to a data cluster; its
 * refcount reaches the disk (and its space is punched) only after the L2
 * slice that no longer names it, with a host flush between.
 */
START_TEST(deferred_free_after_durable_l2)
{
    struct io *inner = new_image_io();
    int fd;
    struct image *img = open_traced(inner, &fd);
    uint64_t rb, l2, data;
    struct tu_trace t;
    unsigned n0;
    int i_l2, i_rb, i_punch;

    write_pattern(img, 0, CS, 0x5a);
    ck_assert_int_eq(image_flush(img), 0);
    rb = disk_u64(inner, disk_u64(inner, 48));
    l2 = disk_u64(inner, disk_u64(inner, 40)) & META_OFFSET_MASK;
    data = disk_l2_entry(inner, 0) & META_OFFSET_MASK;
    tu_trace_read(fd, &t);
    n0 = t.nb;
    tu_trace_free(&t);

    ck_assert_int_eq(image_zero(img, 0, CS, true), 0);
    ck_assert_int_eq(image_flush(img), 0);
    tu_trace_read(fd, &t);
    i_l2 = trace_last(&t, IO_TRACE_WRITE, l2, 4096, n0, t.nb);
    i_rb = trace_last(&t, IO_TRACE_WRITE, rb, CS, n0, t.nb);
    i_punch = trace_last(&t, IO_TRACE_PUNCH, data, CS, n0, t.nb);
    ck_assert_msg(i_l2 >= 0 && i_rb >= 0 && i_punch >= 0, "slice %d block %d punch %d",
                  i_l2, i_rb, i_punch);
    ck_assert_msg(i_l2 < i_rb && trace_flush_between(&t, i_l2, i_rb),
                  "L2 slice (%d), flush, decremented refcount block (%d)", i_l2, i_rb);
    ck_assert_msg(i_l2 < i_punch && trace_flush_between(&t, i_l2, i_punch),
                  "L2 slice (%d), flush, punch (%d)", i_l2, i_punch);
    ck_assert_int_ge(trace_last(&t, IO_TRACE_FLUSH, 0, 0, (unsigned)i_rb, t.nb), 0);
    tu_trace_free(&t);
    ck_assert_int_eq(image_close(img), 0);
    close(fd);
    ck_assert_uint_eq(disk_l2_entry(inner, 0), 0);
    assert_refcounts_exact(inner, "after a deferred free");
    io_close(inner);
}
END_TEST

/*
 * Invariant 9: after a fill of the whole disk, image_drop_backing makes
 * the copies durable (their data and L2 tables written, then a host flush)
 * before the header's backing file name is cleared; that write is flushed
 * before the backing format extension goes, and that one is flushed too.
 * The image then stands alone with the same content.
 */
START_TEST(drop_backing_after_durable_fill)
{
    char dir[] = "/tmp/check_image.XXXXXX", path[96];
    struct gate_io *g;
    int fd = tu_trace_fd();
    struct image *img = open_overlay(dir, path, sizeof(path), &g, fd);
    struct io *inner = g->fwd.inner;
    struct image_options o = default_opts();
    struct qcow2_header h;
    struct tu_trace t;
    uint64_t filled;
    uint8_t *buf = tu_zalloc(CS);
    int i_name, i_ext = -1, i_before = -1;

    g->keep_inner = true;
    ck_assert_int_eq(image_fill(img, 0, VSIZE, &filled), 0);
    ck_assert_uint_eq(filled, VSIZE - CS);      /* cluster 0 was written */
    ck_assert(image_has_backing(img));
    ck_assert_int_eq(image_drop_backing(img), 0);
    ck_assert(!image_has_backing(img));
    ck_assert_int_eq(image_read(img, buf, CS, 7 * CS), 0);
    ck_assert(all_bytes(buf, CS, 0x5a));

    tu_trace_read(fd, &t);
    i_name = trace_last(&t, IO_TRACE_WRITE, 8, 12, 0, t.nb);
    ck_assert_int_ge(i_name, 0);
    for (int i = 0; i < i_name; i++)
        if (t.recs[i].r.type == IO_TRACE_WRITE)
            i_before = i;
    for (unsigned i = (unsigned)i_name + 1; i < t.nb; i++)
        if (t.recs[i].r.type == IO_TRACE_WRITE && t.recs[i].r.offset < CS)
            i_ext = (int)i;
    ck_assert_msg(i_before >= 0 && trace_flush_between(&t, i_before, i_name),
                  "the copies (last write %d) are not flushed before the header (%d)",
                  i_before, i_name);
    ck_assert_msg(i_ext > i_name && trace_flush_between(&t, i_name, i_ext),
                  "the name's write (%d), flush, the extension area's (%d)", i_name, i_ext);
    ck_assert_int_ge(trace_last(&t, IO_TRACE_FLUSH, 0, 0, (unsigned)i_ext, t.nb), 0);
    tu_trace_free(&t);
    ck_assert_int_eq(image_close(img), 0);
    close(fd);

    /* Stands alone: no name, no format; opens with backing files denied. */
    ck_assert_int_eq(header_read(inner, &h, NULL, 0), 0);
    ck_assert_ptr_null(h.backing_file);
    ck_assert_ptr_null(h.backing_format);
    ck_assert_uint_eq(h.backing_file_offset, 0);
    header_free(&h);
    remove_overlay_dir(dir);
    ck_assert_int_eq(image_open_io(inner, "t.qcow2", &o, &img), 0);
    ck_assert_int_eq(image_read(img, buf, CS, VSIZE - CS), 0);
    ck_assert(all_bytes(buf, CS, 0x5a));
    ck_assert_int_eq(image_close(img), 0);
    free(buf);
}
END_TEST

/* ---- one host flush per fsync (the reservation, refcount.c) ------------- */

/* A fresh image of VSIZE with 64 KiB clusters, its bytes in memory. */
static uint8_t *new_image_bytes(bool lazy, size_t *len)
{
    char dir[] = "/tmp/check_image.XXXXXX", path[64];
    struct create_options co = { .size = VSIZE, .cluster_bits = CB,
                                 .lazy_refcounts = lazy };
    struct io *mem;
    const uint8_t *p;
    uint8_t *bytes;

    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/t.qcow2", dir);
    ck_assert_int_eq(create_image(path, &co), 0);
    mem = tu_file_to_memory(path);
    unlink(path);
    rmdir(dir);
    p = io_memory_data(mem, len);
    bytes = tu_zalloc(*len);
    memcpy(bytes, p, *len);
    io_close(mem);
    return bytes;
}

/* What check finds on the disk of @l (what its flushes made durable);
 * *disk_len: the file's length there. */
static void lossy_check(struct tu_lossy_io *l, struct check_report *rep, size_t *disk_len)
{
    size_t len;
    uint8_t *disk = tu_lossy_disk(l, false, &len);
    struct check_refs *refs = NULL;
    struct qcow2_header h;
    struct meta m;
    struct io *io;
    char err[256];

    memset(rep, 0, sizeof(*rep));
    ck_assert_int_eq(io_open_memory(disk, len, &io), 0);
    ck_assert_int_eq(header_decode(disk, len < (2u << 20) ? len : (2u << 20), len, &h,
                                   err, sizeof(err)), 0);
    meta_init(&m, &h, io, true);
    ck_assert_int_eq(check_count_refs(&m, &h, rep, &refs), 0);
    ck_assert_int_eq(check_compare(&m, &h, refs, rep), 0);
    check_refs_free(refs);
    header_free(&h);
    io_close(io);
    free(disk);
    *disk_len = len;
}

/*
 * Invariants 1 and 2 with the reservation: once the first flush has made
 * the reservation durable, a 4 KiB write into a new cluster followed by a
 * flush costs exactly one host flush (data, L2 slice, the reservation's
 * top-ups, one flush), and what that flush left on disk has the new
 * cluster, no corruption and at most the reservation (1 MiB: 16 clusters)
 * leaked.  A clean close gives the reservation back: no leak, and the file
 * ends at its last cluster in use.  _i: 1 with lazy refcounts.
 */
START_TEST(allocating_fsync_costs_one_host_flush)
{
    struct image_options o = default_opts();
    size_t len, disk_len;
    uint8_t *image = new_image_bytes(_i == 1, &len);
    struct tu_lossy_io *l = tu_lossy_new(image, len, 0);
    struct check_report rep;
    struct image *img = NULL;

    ck_assert_int_eq(image_open_io(&l->fwd.io, "t.qcow2", &o, &img), 0);
    write_pattern(img, 0, 4096, 1);             /* no reservation yet */
    ck_assert_int_eq(image_flush(img), 0);
    for (unsigned k = 1; k < 48; k++) {
        unsigned n0 = l->flushes;

        write_pattern(img, (uint64_t)k * CS + 8192, 4096, (uint8_t)(k + 1));
        ck_assert_int_eq(image_flush(img), 0);
        ck_assert_msg(l->flushes - n0 == 1, "fsync %u after an allocating write: "
                      "%u host flushes", k, l->flushes - n0);
        lossy_check(l, &rep, &disk_len);
        ck_assert_msg(rep.corruptions == 0, "fsync %u: %llu corruptions", k,
                      (unsigned long long)rep.corruptions);
        ck_assert_uint_eq(rep.allocated_clusters, k + 1);
        ck_assert_msg(rep.leaks <= 16, "fsync %u: %llu leaked clusters", k,
                      (unsigned long long)rep.leaks);
    }
    for (unsigned k = 0; k < 48; k++)
        ck_assert(image_reads(img, (uint64_t)k * CS + (k ? 8192 : 0), 4096,
                              (uint8_t)(k + 1)));
    ck_assert_int_eq(image_close(img), 0);
    lossy_check(l, &rep, &disk_len);
    ck_assert_uint_eq(rep.corruptions, 0);
    ck_assert_uint_eq(rep.leaks, 0);
    ck_assert_uint_eq(rep.allocated_clusters, 48);
    ck_assert_uint_eq(disk_len, rep.image_end);
    tu_lossy_free(l);
    free(image);
}
END_TEST

static Suite *image_suite(void)
{
    Suite *s = suite_create("image");
    TCase *tc = tcase_create("core");

    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, read_races_with_release_and_reuse);
    tcase_add_test(tc, compressed_read_races_with_release_and_reuse);
    tcase_add_test(tc, write_read_across_cluster_boundary);
    tcase_add_test(tc, read_past_end);
    tcase_add_test(tc, read_only_refuses_writes);
    tcase_add_test(tc, detect_zeroes_leaves_cluster_unallocated);
    tcase_add_test(tc, flush_only_what_changed);
    tcase_add_test(tc, big_flush_leaves_requests_running);
    tcase_add_test(tc, reused_cluster_reads_zeros_around_write);
    tcase_add_test(tc, reads_go_on_during_metadata_flush);
    tcase_add_test(tc, lookups_race_with_evictions_and_reuse);
    tcase_add_test(tc, write_behind_shrinking_resize_rechecks_size);
    tcase_add_test(tc, resize_behind_resize_takes_the_new_size);
    tcase_add_test(tc, fill_leaves_cluster_a_guest_write_allocated);
    tcase_add_test(tc, guest_write_behind_fill_wins);
    tcase_add_test(tc, drop_backing_after_durable_fill);
    tcase_add_loop_test(tc, replacing_corrupt_entry_frees_nothing, 0, (int)(NB_ZAP_CASES * 3));
    tcase_add_test(tc, plan_overwrites_owned_clusters_in_place);
    tcase_add_test(tc, plan_allocates_fresh_clusters);
    tcase_add_test(tc, plan_copies_from_backing_file);
    tcase_add_test(tc, plan_overwrites_compressed_cluster);
    tcase_add_test(tc, plan_writes_subclusters);
    tcase_add_test(tc, plan_copies_snapshot_shared_cluster);
    tcase_add_test(tc, flush_orders_refcounts_data_l2_l1);
    tcase_add_test(tc, deferred_free_after_durable_l2);
    tcase_add_loop_test(tc, allocating_fsync_costs_one_host_flush, 0, 2);
    suite_add_tcase(s, tc);

    tc = tcase_create("snapshot_view");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, snapshot_views_unchanged_by_writes);
    tcase_add_test(tc, snapshot_view_of_smaller_disk);
    tcase_add_loop_test(tc, snapshot_view_refuses_bad_tables, 0, 4);
    suite_add_tcase(s, tc);

    /* One workload run per host flush: slow under a sanitizer. */
    tc = tcase_create("flush_error");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, failed_flush_is_sticky);
    tcase_add_test(tc, failed_flush_is_sticky_lazy_refcounts);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(image_suite());
}
