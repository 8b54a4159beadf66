/*
 * Unit tests for refcount: the on-disk layout of refcount entries of every
 * width, reading and changing refcounts (ranges, overflow, underflow),
 * allocation (first fit, reuse, fresh clusters), new refcount blocks written
 * at allocation but linked into the table only by the next refcount-cache
 * flush (and the order of those writes), relocation of the refcount table,
 * and deferred frees.  Images are built in a memory backend, wrapped in the
 * trace backend where the order of writes and flushes matters.
 */
#include "testutil.h"

#include "cache.h"
#include "io.h"
#include "meta.h"
#include "refcount.h"

#include <errno.h>

/* ---- entry layout -------------------------------------------------------- */

/* The qcow2 spec's layout, bit by bit: entries narrower than a byte are
 * packed from the least significant bit; wider ones are big endian. */
static uint64_t ref_entry_get(unsigned order, const uint8_t *b, uint64_t i)
{
    unsigned bits = 1u << order;
    uint64_t v = 0;

    if (bits < 8) {
        for (unsigned k = 0; k < bits; k++) {
            uint64_t bit = i * bits + k;
            v |= (uint64_t)((b[bit / 8] >> (bit % 8)) & 1u) << k;
        }
        return v;
    }
    for (unsigned k = 0; k < bits / 8; k++)
        v = v << 8 | b[i * (bits / 8) + k];
    return v;
}

static uint64_t lcg(uint64_t *r)
{
    *r = *r * 6364136223846793005ull + 1442695040888963407ull;
    return *r >> 11 ^ *r << 29;
}

static uint64_t max_refcount(unsigned order)
{
    return order == 6 ? UINT64_MAX : (1ull << (1u << order)) - 1;
}

START_TEST(entry_roundtrip_all_orders)
{
    for (unsigned order = 0; order <= 6; order++) {
        const uint64_t max = max_refcount(order);
        const uint64_t n = 64 * 8 >> order;     /* entries in a 64-byte block */
        uint8_t block[64];
        uint64_t want[512];
        uint64_t r = 12345 + order;

        /* Start from noise: a set must leave every other bit alone. */
        for (unsigned i = 0; i < sizeof(block); i++)
            block[i] = (uint8_t)lcg(&r);
        for (uint64_t i = 0; i < n; i++) {
            want[i] = ref_entry_get(order, block, i);
            if (refcount_entry_get(order, block, i) != want[i])
                ck_abort_msg("order %u: entry %llu of noise reads 0x%llx, expected 0x%llx",
                             order, (unsigned long long)i,
                             (unsigned long long)refcount_entry_get(order, block, i),
                             (unsigned long long)want[i]);
        }
        for (uint64_t step = 0; step < 3 * n; step++) {
            uint64_t i = lcg(&r) % n, v;

            switch (lcg(&r) % 4) {
            case 0: v = 0; break;
            case 1: v = max; break;
            case 2: v = 1; break;
            default: v = lcg(&r) & max; break;
            }
            refcount_entry_set(order, block, i, v);
            want[i] = v;
            for (uint64_t j = 0; j < n; j++) {
                uint64_t got = refcount_entry_get(order, block, j);
                uint64_t disk = ref_entry_get(order, block, j);
                if (got != want[j] || disk != want[j])
                    ck_abort_msg("order %u: after setting entry %llu to 0x%llx, entry "
                                 "%llu reads 0x%llx (spec layout 0x%llx), expected 0x%llx",
                                 order, (unsigned long long)i, (unsigned long long)v,
                                 (unsigned long long)j, (unsigned long long)got,
                                 (unsigned long long)disk, (unsigned long long)want[j]);
            }
        }
    }
}
END_TEST

START_TEST(entry_exact_bytes)
{
    uint8_t b[16];

    /* 1-bit: entry 0 is bit 0 of byte 0, entry 9 bit 1 of byte 1. */
    memset(b, 0, sizeof(b));
    refcount_entry_set(0, b, 0, 1);
    refcount_entry_set(0, b, 9, 1);
    ck_assert_uint_eq(b[0], 0x01);
    ck_assert_uint_eq(b[1], 0x02);
    refcount_entry_set(0, b, 0, 0);
    ck_assert_uint_eq(b[0], 0x00);
    ck_assert_uint_eq(b[1], 0x02);

    /* 2-bit: entry 1 is bits 2-3. */
    memset(b, 0, sizeof(b));
    refcount_entry_set(1, b, 1, 3);
    ck_assert_uint_eq(b[0], 0x0c);
    refcount_entry_set(1, b, 0, 2);
    ck_assert_uint_eq(b[0], 0x0e);
    refcount_entry_set(1, b, 7, 1);
    ck_assert_uint_eq(b[1], 0x40);
    ck_assert_uint_eq(refcount_entry_get(1, b, 1), 3);
    ck_assert_uint_eq(refcount_entry_get(1, b, 0), 2);

    /* 4-bit: entry 0 is the low nibble. */
    memset(b, 0, sizeof(b));
    refcount_entry_set(2, b, 0, 0xa);
    refcount_entry_set(2, b, 1, 0x5);
    ck_assert_uint_eq(b[0], 0x5a);
    refcount_entry_set(2, b, 3, 0xf);
    ck_assert_uint_eq(b[1], 0xf0);

    /* 8-bit. */
    memset(b, 0, sizeof(b));
    refcount_entry_set(3, b, 3, 0xab);
    ck_assert_uint_eq(b[3], 0xab);
    ck_assert_uint_eq(b[2], 0);
    ck_assert_uint_eq(b[4], 0);

    /* 16-bit big endian. */
    memset(b, 0, sizeof(b));
    refcount_entry_set(4, b, 1, 0x1234);
    ck_assert_uint_eq(b[0], 0);
    ck_assert_uint_eq(b[1], 0);
    ck_assert_uint_eq(b[2], 0x12);
    ck_assert_uint_eq(b[3], 0x34);
    ck_assert_uint_eq(b[4], 0);
    ck_assert_uint_eq(refcount_entry_get(4, b, 1), 0x1234);

    /* 32-bit big endian. */
    memset(b, 0, sizeof(b));
    refcount_entry_set(5, b, 1, 0x12345678u);
    ck_assert_uint_eq(b[3], 0);
    ck_assert_uint_eq(b[4], 0x12);
    ck_assert_uint_eq(b[5], 0x34);
    ck_assert_uint_eq(b[6], 0x56);
    ck_assert_uint_eq(b[7], 0x78);
    ck_assert_uint_eq(b[8], 0);

    /* 64-bit big endian. */
    memset(b, 0, sizeof(b));
    refcount_entry_set(6, b, 1, 0x0102030405060708ull);
    for (unsigned i = 0; i < 8; i++) {
        ck_assert_uint_eq(b[i], 0);
        ck_assert_uint_eq(b[8 + i], i + 1);
    }
    ck_assert_uint_eq(refcount_entry_get(6, b, 1), 0x0102030405060708ull);
    refcount_entry_set(6, b, 0, UINT64_MAX);
    ck_assert_uint_eq(refcount_entry_get(6, b, 0), UINT64_MAX);
    ck_assert_uint_eq(refcount_entry_get(6, b, 1), 0x0102030405060708ull);
}
END_TEST

/* ---- images in memory ---------------------------------------------------- */

struct rimg {
    uint8_t *buf;
    size_t len;
    unsigned cb, order;
    uint64_t cs;
    uint64_t table_off;
    uint32_t table_clusters;
};

/* Refcounts per block. */
static uint64_t rimg_be(const struct rimg *im)
{
    return (im->cs * 8) >> im->order;
}

static void rimg_set(struct rimg *im, uint64_t ci, uint64_t v)
{
    uint64_t be = rimg_be(im), blk = be64_get(im->buf + im->table_off + 8 * (ci / be));

    ck_assert_uint_ne(blk, 0);
    ck_assert_uint_le(blk + im->cs, im->len);
    refcount_entry_set(im->order, im->buf + blk, ci % be, v);
}

/*
 * An image of @nb_clusters clusters of 2^@cb bytes with 2^@order-bit
 * refcounts:
 *   cluster 0 header, cluster 1 refcount table (one cluster),
 *   clusters 2 .. 2+@nb_blocks-1 the refcount blocks of table entries
 *   0 .. @nb_blocks-1,
 * with refcount 1 for clusters 0 .. @nb_used-1 and 0 for the others.
 */
static void rimg_init(struct rimg *im, unsigned cb, unsigned order, uint64_t nb_clusters,
                      unsigned nb_blocks, uint64_t nb_used)
{
    struct tu_hdr h = tu_hdr_default(3, cb);

    im->cb = cb;
    im->cs = 1ull << cb;
    im->order = order;
    im->len = nb_clusters << cb;
    im->buf = tu_zalloc(im->len);
    im->table_off = im->cs;
    im->table_clusters = 1;
    ck_assert_uint_ge(nb_clusters, 2 + nb_blocks);
    h.refcount_order = order;
    h.refcount_table_offset = im->table_off;
    h.refcount_table_clusters = im->table_clusters;
    h.l1_size = 0;
    h.l1_table_offset = 0;
    tu_hdr_write(im->buf, &h);
    for (unsigned b = 0; b < nb_blocks; b++)
        be64_put(im->buf + im->table_off + 8 * b, (2 + b) * im->cs);
    for (uint64_t ci = 0; ci < nb_used; ci++)
        rimg_set(im, ci, 1);
}

/* ---- a backend whose reads can be made to fail ---------------------------- */

struct flaky_io {
    struct tu_fwd_io fwd;
    bool fail_reads;
    unsigned failed_reads;
    /* Writes that touch [fail_lo, fail_hi) fail with -ENOSPC, as on a full
     * host file system (nothing fails while fail_hi is 0). */
    uint64_t fail_lo, fail_hi;
    unsigned failed_writes;
};

static int flaky_pwrite(struct io *io, const void *buf, size_t len, uint64_t off)
{
    struct flaky_io *f = (struct flaky_io *)io;

    if (off < f->fail_hi && off + len > f->fail_lo) {
        f->failed_writes++;
        return -ENOSPC;
    }
    return io_pwrite(f->fwd.inner, buf, len, off);
}

static int flaky_pread(struct io *io, void *buf, size_t len, uint64_t off)
{
    struct flaky_io *f = (struct flaky_io *)io;

    if (f->fail_reads) {
        f->failed_reads++;
        return -EIO;
    }
    return io_pread(f->fwd.inner, buf, len, off);
}

static void flaky_close(struct io *io)
{
    struct flaky_io *f = (struct flaky_io *)io;
    io_close(f->fwd.inner);
    free(f);
}

static const struct io_ops flaky_ops = {
    .pread = flaky_pread,
    .pwrite = flaky_pwrite,
    .flush = tu_fwd_flush,
    .get_size = tu_fwd_get_size,
    .truncate = tu_fwd_truncate,
    .punch_hole = tu_fwd_punch,
    .close = flaky_close,
};

/* ---- fixture: a refcount structure opened on an image -------------------- */

enum fx_mode { FX_PLAIN, FX_TRACED, FX_FLAKY };

struct fx {
    struct meta m;
    struct io *mem;             /* the memory backend (inside io unless plain) */
    struct io *io;              /* what the refcount module writes to */
    struct flaky_io *flaky;     /* FX_FLAKY */
    int trace_fd;               /* FX_TRACED: our descriptor of the log */
    struct refcount *rc;
    unsigned cb, order;
    uint64_t cs, be;
};

/* Open @im (its buffer is consumed) as a writable image would be opened. */
static void fx_open(struct fx *f, struct rimg *im, enum fx_mode mode)
{
    memset(f, 0, sizeof(*f));
    f->trace_fd = -1;
    f->cb = im->cb;
    f->cs = im->cs;
    f->order = im->order;
    f->be = rimg_be(im);
    ck_assert_int_eq(io_open_memory(im->buf, im->len, &f->mem), 0);
    free(im->buf);
    im->buf = NULL;
    f->io = f->mem;
    if (mode == FX_TRACED) {
        f->trace_fd = tu_trace_fd();
        ck_assert_int_eq(io_open_trace(f->mem, dup(f->trace_fd), &f->io), 0);
    } else if (mode == FX_FLAKY) {
        f->flaky = tu_zalloc(sizeof(*f->flaky));
        f->flaky->fwd.io.ops = &flaky_ops;
        f->flaky->fwd.inner = f->mem;
        f->io = &f->flaky->fwd.io;
    }
    tu_log_capture();
    tu_meta_init(&f->m, f->io, im->cb, true, false);
    f->m.refcount_order = im->order;
    f->m.read_only = false;
    f->m.file_end = (im->len + im->cs - 1) & ~(im->cs - 1);
    ck_assert_int_eq(meta_set_create(&f->m), 0);
    ck_assert_int_eq(meta_mark(&f->m, 0, f->cs, META_KIND_HEADER), 0);
    /* A large cache: nothing is evicted, so every write in a trace is one
     * the code under test asked for. */
    ck_assert_int_eq(refcount_open(&f->m, im->table_off, im->table_clusters, 1u << 20,
                                   &f->rc), 0);
}

static void fx_close(struct fx *f)
{
    refcount_close(f->rc);
    meta_set_destroy(&f->m);
    io_close(f->io);
    if (f->trace_fd >= 0)
        close(f->trace_fd);
    tu_log_release();
}

/* The refcount of cluster @ci as the module reports it. */
static uint64_t rc_of(struct fx *f, uint64_t ci)
{
    uint64_t v = 0xdeadbeef;
    int ret = refcount_get(f->rc, ci << f->cb, &v);

    if (ret != 0)
        ck_abort_msg("refcount_get(cluster %llu) returned %d", (unsigned long long)ci, ret);
    return v;
}

/* Allocate @nb clusters; returns the first cluster index. */
static uint64_t alloc(struct fx *f, uint64_t nb, int *fresh)
{
    uint64_t off = 0xdeadbeef;
    int ret;

    *fresh = -1;
    ret = refcount_alloc(f->rc, nb, &off, fresh);
    ck_assert_msg(ret == 0, "refcount_alloc(%llu) returned %d", (unsigned long long)nb, ret);
    ck_assert_msg(off % f->cs == 0, "refcount_alloc returned unaligned 0x%llx",
                  (unsigned long long)off);
    ck_assert_msg(*fresh == REFCOUNT_REUSED || *fresh == REFCOUNT_FRESH ||
                  *fresh == REFCOUNT_RESERVED, "fresh = %d", *fresh);
    return off >> f->cb;
}

/* Every cluster below @nb has refcount @expect(ci). */
typedef uint64_t expect_fn(uint64_t ci);
static void expect_refcounts(struct fx *f, uint64_t nb, expect_fn *expect)
{
    for (uint64_t ci = 0; ci < nb; ci++) {
        uint64_t v = rc_of(f, ci);
        if (v != expect(ci))
            ck_abort_msg("cluster %llu: refcount %llu, expected %llu",
                         (unsigned long long)ci, (unsigned long long)v,
                         (unsigned long long)expect(ci));
    }
}

/* The memory backend's bytes at @off (at least @len of them). */
static const uint8_t *mem_at(struct fx *f, uint64_t off, uint64_t len)
{
    size_t size;
    const uint8_t *d = io_memory_data(f->mem, &size);

    ck_assert_uint_le(off + len, size);
    return d + off;
}

/* The refcount of cluster @ci according to the bytes on "disk", through the
 * table at @table_off of @table_clusters clusters. */
static uint64_t disk_refcount(struct fx *f, uint64_t table_off, uint32_t table_clusters,
                              uint64_t ci)
{
    uint64_t ti = ci / f->be, blk;

    if (ti >= (uint64_t)table_clusters * f->cs / 8)
        return 0;
    blk = be64_get(mem_at(f, table_off + 8 * ti, 8));
    if (!blk)
        return 0;
    return ref_entry_get(f->order, mem_at(f, blk, f->cs), ci % f->be);
}

/* After a flush: for every cluster below @nb, the disk says what
 * refcount_get says. */
static void expect_disk_matches(struct fx *f, uint64_t table_off, uint32_t table_clusters,
                                uint64_t nb)
{
    for (uint64_t ci = 0; ci < nb; ci++) {
        uint64_t mem = rc_of(f, ci), disk = disk_refcount(f, table_off, table_clusters, ci);
        if (mem != disk)
            ck_abort_msg("cluster %llu: refcount %llu in memory, %llu on disk",
                         (unsigned long long)ci, (unsigned long long)mem,
                         (unsigned long long)disk);
    }
}

/* Open the flushed file afresh, as the next open of the image would, and
 * compare every cluster below @nb. */
static void expect_reopen_matches(struct fx *f, uint64_t table_off, uint32_t table_clusters,
                                  uint64_t nb)
{
    struct meta m2;
    struct io *io2;
    struct refcount *rc2;
    size_t size;
    const uint8_t *d = io_memory_data(f->mem, &size);

    ck_assert_int_eq(io_open_memory(d, size, &io2), 0);
    tu_meta_init(&m2, io2, f->cb, true, false);
    m2.refcount_order = f->order;
    m2.file_end = (size + f->cs - 1) & ~(f->cs - 1);
    ck_assert_int_eq(refcount_open(&m2, table_off, table_clusters, 1u << 20, &rc2), 0);
    for (uint64_t ci = 0; ci < nb; ci++) {
        uint64_t v1 = rc_of(f, ci), v2 = 0xdeadbeef;
        int ret = refcount_get(rc2, ci << f->cb, &v2);
        if (ret != 0 || v1 != v2)
            ck_abort_msg("cluster %llu: refcount %llu before, %llu (ret %d) after reopening",
                         (unsigned long long)ci, (unsigned long long)v1,
                         (unsigned long long)v2, ret);
    }
    refcount_close(rc2);
    io_close(io2);
}

/* ---- trace helpers -------------------------------------------------------- */

static int index_of(const struct tu_trace *t, uint32_t type, uint64_t offset, unsigned from)
{
    for (unsigned i = from; i < t->nb; i++)
        if (t->recs[i].r.type == type &&
            (type != IO_TRACE_WRITE || t->recs[i].r.offset == offset))
            return (int)i;
    return -1;
}

/* The last write at exactly @offset before record @before, or -1. */
static int last_write_before(const struct tu_trace *t, uint64_t offset, int before)
{
    for (int i = before - 1; i >= 0; i--)
        if (t->recs[i].r.type == IO_TRACE_WRITE && t->recs[i].r.offset == offset)
            return i;
    return -1;
}

/* A host flush strictly between records @a and @b. */
static bool flush_between(const struct tu_trace *t, int a, int b)
{
    for (int i = a + 1; i < b; i++)
        if (t->recs[i].r.type == IO_TRACE_FLUSH)
            return true;
    return false;
}

/* Writes overlapping [@lo, @hi) among records [@from, @to). */
static unsigned writes_overlapping(const struct tu_trace *t, uint64_t lo, uint64_t hi,
                                   unsigned from, unsigned to)
{
    unsigned n = 0;

    for (unsigned i = from; i < to && i < t->nb; i++) {
        const struct io_trace_record *r = &t->recs[i].r;
        n += r->type == IO_TRACE_WRITE && r->offset < hi && r->offset + r->length > lo;
    }
    return n;
}

static unsigned count_type(const struct tu_trace *t, uint32_t type, unsigned from,
                           unsigned to)
{
    unsigned n = 0;

    for (unsigned i = from; i < to && i < t->nb; i++)
        n += t->recs[i].r.type == type;
    return n;
}

/*
 * The table entry @ti (table at @table_off) is written after @from_rec, with
 * the value @blk_cluster; before it, a host flush follows the last write of
 * that block.  Returns the index of the entry write.
 */
static int expect_entry_linked(struct fx *f, const struct tu_trace *t, uint64_t table_off,
                               uint64_t ti, uint64_t blk_cluster, unsigned from_rec)
{
    int iw = index_of(t, IO_TRACE_WRITE, table_off + 8 * ti, from_rec), ib;

    ck_assert_msg(iw >= 0, "table entry %llu never written", (unsigned long long)ti);
    ck_assert_uint_eq(t->recs[iw].r.length, 8);
    ck_assert_msg(be64_get(t->recs[iw].payload) == blk_cluster << f->cb,
                  "table entry %llu written as 0x%llx, expected 0x%llx",
                  (unsigned long long)ti, (unsigned long long)be64_get(t->recs[iw].payload),
                  (unsigned long long)(blk_cluster << f->cb));
    ib = last_write_before(t, blk_cluster << f->cb, iw);
    ck_assert_msg(ib >= 0, "block of entry %llu never written before its entry",
                  (unsigned long long)ti);
    ck_assert_msg(flush_between(t, ib, iw), "entry %llu (record %d) written without a "
                  "flush after its block's write (record %d)", (unsigned long long)ti, iw, ib);
    /* Written once. */
    ck_assert_int_eq(index_of(t, IO_TRACE_WRITE, table_off + 8 * ti, (unsigned)iw + 1), -1);
    return iw;
}

/* ---- refcount_get / refcount_update ---------------------------------------- */

START_TEST(update_ranges)
{
    struct rimg im;
    struct fx f;

    /* 512-byte clusters, 16-bit refcounts: 256 per block; blocks for table
     * entries 0 and 1 at clusters 2 and 3; clusters 0-9 in use. */
    rimg_init(&im, 9, 4, 300, 2, 10);
    fx_open(&f, &im, FX_PLAIN);
    ck_assert_uint_eq(f.be, 256);

    ck_assert_uint_eq(rc_of(&f, 5), 1);
    ck_assert_uint_eq(rc_of(&f, 20), 0);
    {
        uint64_t v = 77;
        ck_assert_int_eq(refcount_get(f.rc, 5 * f.cs + 17, &v), 0);
        ck_assert_uint_eq(v, 1);
        /* No block for table entry 2, and past the table: 0. */
        ck_assert_int_eq(refcount_get(f.rc, 600 * f.cs, &v), 0);
        ck_assert_uint_eq(v, 0);
        ck_assert_int_eq(refcount_get(f.rc, 1ull << 40, &v), 0);
        ck_assert_uint_eq(v, 0);
    }

    /* Two bytes straddling clusters 5 and 6. */
    ck_assert_int_eq(refcount_update(f.rc, 6 * f.cs - 1, 2, 1), 0);
    ck_assert_uint_eq(rc_of(&f, 4), 1);
    ck_assert_uint_eq(rc_of(&f, 5), 2);
    ck_assert_uint_eq(rc_of(&f, 6), 2);
    ck_assert_uint_eq(rc_of(&f, 7), 1);
    /* One cluster's worth, misaligned: again clusters 5 and 6. */
    ck_assert_int_eq(refcount_update(f.rc, 5 * f.cs + 10, f.cs, -1), 0);
    ck_assert_uint_eq(rc_of(&f, 4), 1);
    ck_assert_uint_eq(rc_of(&f, 5), 1);
    ck_assert_uint_eq(rc_of(&f, 6), 1);
    ck_assert_uint_eq(rc_of(&f, 7), 1);
    /* Empty range: nothing. */
    ck_assert_int_eq(refcount_update(f.rc, 5 * f.cs, 0, -1), 0);
    ck_assert_uint_eq(rc_of(&f, 5), 1);

    /* Across the boundary of two refcount blocks (clusters 255 and 256). */
    ck_assert_int_eq(refcount_update(f.rc, 255 * f.cs, 2 * f.cs, 1), 0);
    ck_assert_uint_eq(rc_of(&f, 254), 0);
    ck_assert_uint_eq(rc_of(&f, 255), 1);
    ck_assert_uint_eq(rc_of(&f, 256), 1);
    ck_assert_uint_eq(rc_of(&f, 257), 0);
    ck_assert_int_eq(refcount_update(f.rc, 255 * f.cs, 2 * f.cs, 2), 0);
    ck_assert_uint_eq(rc_of(&f, 255), 3);
    ck_assert_uint_eq(rc_of(&f, 256), 3);
    ck_assert_int_eq(refcount_update(f.rc, 256 * f.cs - 1, 2, -3), 0);
    ck_assert_uint_eq(rc_of(&f, 255), 0);
    ck_assert_uint_eq(rc_of(&f, 256), 0);
    ck_assert_int_eq(refcount_update(f.rc, 256 * f.cs, 1, 1), 0);
    ck_assert_uint_eq(rc_of(&f, 255), 0);
    ck_assert_uint_eq(rc_of(&f, 256), 1);

    /* The changes reach the disk with the next flush. */
    ck_assert_uint_eq(disk_refcount(&f, f.cs, 1, 5), 1);
    ck_assert_uint_eq(disk_refcount(&f, f.cs, 1, 256), 0);
    ck_assert_int_eq(cache_flush(refcount_cache(f.rc)), 0);
    expect_disk_matches(&f, f.cs, 1, 512);
    ck_assert_uint_eq(disk_refcount(&f, f.cs, 1, 256), 1);
    ck_assert(!meta_is_corrupt(&f.m));
    ck_assert_uint_eq(tu_log_state()->nb_errors, 0);
    fx_close(&f);
}
END_TEST

START_TEST(update_underflow)
{
    struct rimg im;
    struct fx f;

    rimg_init(&im, 9, 4, 300, 2, 10);
    fx_open(&f, &im, FX_PLAIN);

    /* Cluster 20 is free: -1 would go below zero. */
    ck_assert_int_eq(refcount_update(f.rc, 20 * f.cs, f.cs, -1), -EIO);
    ck_assert_uint_eq(rc_of(&f, 20), 0);
    ck_assert(meta_is_corrupt(&f.m));
    ck_assert_uint_eq(tu_log_state()->nb_errors, 1);
    /* The corrupt bit is set in the header (incompatible features). */
    ck_assert_uint_eq(be64_get(mem_at(&f, 72, 8)) & QCOW2_INCOMPAT_CORRUPT,
                      QCOW2_INCOMPAT_CORRUPT);

    /* Refcount 1, -2: refused, unchanged. */
    ck_assert_int_eq(refcount_update(f.rc, 7 * f.cs, 1, -2), -EIO);
    ck_assert_uint_eq(rc_of(&f, 7), 1);
    ck_assert_uint_eq(rc_of(&f, 6), 1);
    ck_assert_uint_eq(rc_of(&f, 8), 1);
    /* No refcount block: below zero too. */
    ck_assert_int_eq(refcount_update(f.rc, 600 * f.cs, f.cs, -1), -EIO);
    ck_assert_uint_eq(rc_of(&f, 600), 0);
    /* Raising a refcount that has no block is an internal error. */
    ck_assert_int_eq(refcount_update(f.rc, 600 * f.cs, f.cs, 1), -EIO);
    ck_assert_uint_eq(rc_of(&f, 600), 0);
    fx_close(&f);
}
END_TEST

START_TEST(update_overflow_all_orders)
{
    for (unsigned order = 0; order <= 6; order++) {
        const uint64_t max = max_refcount(order);
        struct rimg im;
        struct fx f;

        rimg_init(&im, 9, order, 16, 1, 10);
        rimg_set(&im, 5, max);
        rimg_set(&im, 6, max - 1);
        fx_open(&f, &im, FX_PLAIN);

        ck_assert_uint_eq(rc_of(&f, 5), max);
        ck_assert_uint_eq(rc_of(&f, 6), max - 1);
        /* Up to the maximum is fine. */
        ck_assert_int_eq(refcount_update(f.rc, 6 * f.cs, f.cs, 1), 0);
        ck_assert_uint_eq(rc_of(&f, 6), max);
        ck_assert(!meta_is_corrupt(&f.m));
        /* One more is not, and changes nothing. */
        ck_assert_msg(refcount_update(f.rc, 5 * f.cs, f.cs, 1) == -EIO,
                      "order %u: overflow not refused", order);
        ck_assert_uint_eq(rc_of(&f, 5), max);
        ck_assert_uint_eq(rc_of(&f, 4), 1);
        ck_assert(meta_is_corrupt(&f.m));
        ck_assert_uint_eq(tu_log_state()->nb_errors, 1);
        /* Down from the maximum works. */
        ck_assert_int_eq(refcount_update(f.rc, 5 * f.cs, f.cs, -1), 0);
        ck_assert_uint_eq(rc_of(&f, 5), max - 1);
        fx_close(&f);
    }
}
END_TEST

START_TEST(open_rejects_bad_table_entry)
{
    /* 4 KiB clusters: an entry aligned to 512 but not to the cluster, one
     * with a reserved bit, one past the end of the file. */
    const uint64_t bad[] = { 2 * 4096 + 512, 2 * 4096 | 1, 1ull << 40 };

    for (unsigned k = 0; k < sizeof(bad) / sizeof(bad[0]); k++) {
        struct rimg im;
        struct meta m;
        struct io *io;
        struct refcount *rc = NULL;

        rimg_init(&im, 12, 4, 8, 1, 4);
        be64_put(im.buf + im.table_off + 8 * 3, bad[k]);
        ck_assert_int_eq(io_open_memory(im.buf, im.len, &io), 0);
        free(im.buf);
        tu_log_capture();
        tu_meta_init(&m, io, 12, true, false);
        m.file_end = 8 * 4096;
        ck_assert_int_eq(refcount_open(&m, im.table_off, 1, 1u << 20, &rc), -EIO);
        ck_assert(meta_is_corrupt(&m));
        ck_assert_uint_eq(tu_log_state()->nb_errors, 1);
        tu_log_release();
        io_close(io);
    }
}
END_TEST

/*
 * A crash can leave refcounts for clusters whose data never reached the
 * file: as many as the requests in flight allocate, 16 x 1 MiB = 32768
 * clusters of 512 bytes.  Such an image must open; a block counting
 * clusters gigabytes further out must still be refused.
 */
START_TEST(open_allows_inflight_allocations_past_end)
{
    const uint64_t nb = 16, inflight = nb + 30000, wild = nb + 250000;

    for (unsigned k = 0; k < 2; k++) {
        uint64_t ci = k == 0 ? inflight : wild;
        struct rimg im;
        struct meta m;
        struct io *io;
        struct refcount *rc = NULL;

        /* 512-byte clusters, 1-bit refcounts: 4096 clusters per block. */
        rimg_init(&im, 9, 0, nb, 2, 4);
        /* The second block (cluster 3) moves to the table entry of @ci. */
        be64_put(im.buf + im.table_off + 8, 0);
        be64_put(im.buf + im.table_off + 8 * (ci / 4096), 3 * 512);
        refcount_entry_set(0, im.buf + 3 * 512, ci % 4096, 1);
        ck_assert_int_eq(io_open_memory(im.buf, im.len, &io), 0);
        free(im.buf);
        tu_log_capture();
        tu_meta_init(&m, io, 9, true, false);
        m.refcount_order = 0;
        m.file_end = nb * 512;
        if (k == 0) {
            ck_assert_int_eq(refcount_open(&m, im.table_off, 1, 1u << 20, &rc), 0);
            ck_assert(!meta_is_corrupt(&m));
            refcount_close(rc);
        } else {
            ck_assert_int_eq(refcount_open(&m, im.table_off, 1, 1u << 20, &rc), -EIO);
            ck_assert(meta_is_corrupt(&m));
        }
        tu_log_release();
        io_close(io);
    }
}
END_TEST

/* ---- allocation ------------------------------------------------------------ */

START_TEST(alloc_first_fit_and_reuse)
{
    struct rimg im;
    struct fx f;
    int fresh;

    /* 4 KiB clusters, clusters 0-5 in use but for a hole at 3. */
    rimg_init(&im, 12, 4, 6, 1, 6);
    rimg_set(&im, 3, 0);
    fx_open(&f, &im, FX_PLAIN);
    ck_assert_uint_eq(refcount_end(f.rc), 6);

    /* The hole first: inside the file, so not fresh. */
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 3);
    ck_assert_int_eq(fresh, 0);
    ck_assert_uint_eq(rc_of(&f, 3), 1);
    /* Then after the used clusters, contiguous runs without overlap. */
    ck_assert_uint_eq(alloc(&f, 2, &fresh), 6);
    ck_assert_int_eq(fresh, 1);
    ck_assert_uint_eq(alloc(&f, 3, &fresh), 8);
    ck_assert_int_eq(fresh, 1);
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 11);
    ck_assert_int_eq(fresh, 1);
    for (uint64_t ci = 0; ci < 12; ci++)
        ck_assert_uint_eq(rc_of(&f, ci), 1);
    ck_assert_uint_eq(rc_of(&f, 12), 0);
    ck_assert_uint_eq(refcount_end(f.rc), 12);

    /* A freed cluster is handed out again, and may hold stale data. */
    ck_assert_int_eq(refcount_update(f.rc, 7 * f.cs, f.cs, -1), 0);
    refcount_hint_free(f.rc, 7 * f.cs);
    ck_assert_uint_eq(rc_of(&f, 7), 0);
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 7);
    ck_assert_int_eq(fresh, 0);
    ck_assert_uint_eq(rc_of(&f, 7), 1);

    /* A one-cluster hole is skipped by a two-cluster request, and filled by
     * the next one-cluster request. */
    ck_assert_int_eq(refcount_update(f.rc, 9 * f.cs, f.cs, -1), 0);
    refcount_hint_free(f.rc, 9 * f.cs);
    ck_assert_uint_eq(alloc(&f, 2, &fresh), 12);
    ck_assert_int_eq(fresh, 1);
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 9);
    ck_assert_int_eq(fresh, 0);
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 14);
    ck_assert_int_eq(fresh, 1);
    for (uint64_t ci = 0; ci < 15; ci++)
        ck_assert_uint_eq(rc_of(&f, ci), 1);
    ck_assert_uint_eq(rc_of(&f, 15), 0);
    ck_assert_uint_eq(refcount_end(f.rc), 15);

    ck_assert_int_eq(cache_flush(refcount_cache(f.rc)), 0);
    expect_disk_matches(&f, f.cs, 1, 64);
    ck_assert_uint_eq(tu_log_state()->nb_errors, 0);
    fx_close(&f);
}
END_TEST

/*
 * refcount.h: *fresh is 1 when the clusters lie at or beyond the end of the
 * file as it was.  Here the file ends at cluster 64 and cluster 64 is
 * handed out, with a new refcount block placed after it (cluster 65).
 */
START_TEST(alloc_fresh_with_new_block)
{
    struct rimg im;
    struct fx f;
    int fresh;

    rimg_init(&im, 9, 6, 64, 1, 64);
    fx_open(&f, &im, FX_PLAIN);
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 64);
    ck_assert_uint_eq(rc_of(&f, 65), 1);
    ck_assert_msg(fresh == 1, "cluster 64 lies at the end of a 64-cluster file but "
                  "fresh = %d", fresh);
    fx_close(&f);
}
END_TEST

/* ---- the reservation ---------------------------------------------------------- */

/*
 * refcount_reserve (image_flush.c, invariants 1a and 8): 4 KiB clusters,
 * 16-bit refcounts, clusters 0-5 in use.  After a first allocation at the
 * frontier, a top-up stages 1 MiB (256 clusters) right after it, raised in
 * the cache and the file extended over it; it is handed out only once a
 * flush made it durable, from its start up, each cluster once; freed space
 * comes first, and a cluster given back is free space, not reserved again.
 * Releasing it drops the rest to 0 on disk.
 */
START_TEST(reservation_hands_out_each_cluster_once)
{
    struct rimg im;
    struct fx f;
    uint64_t size, past;
    int fresh;

    rimg_init(&im, 12, 4, 6, 1, 6);
    fx_open(&f, &im, FX_PLAIN);
    ck_assert_int_eq(refcount_reserve(f.rc), 0);        /* no demand yet */
    ck_assert_uint_eq(refcount_reserved(f.rc), 0);
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 6);
    ck_assert_int_eq(fresh, REFCOUNT_FRESH);

    /* Staged: counted, the file covers it, not handed out yet. */
    ck_assert_int_eq(refcount_reserve(f.rc), 0);
    ck_assert_uint_eq(refcount_reserved(f.rc), 256);
    for (uint64_t ci = 7; ci < 7 + 256; ci++)
        ck_assert_uint_eq(rc_of(&f, ci), 1);
    ck_assert_uint_eq(rc_of(&f, 7 + 256), 0);
    ck_assert_int_eq(io_get_size(f.io, &size), 0);
    ck_assert_uint_eq(size, (7 + 256) * f.cs);
    past = alloc(&f, 1, &fresh);
    ck_assert_uint_eq(past, 7 + 256);
    ck_assert_int_eq(fresh, REFCOUNT_FRESH);
    ck_assert_int_eq(refcount_reserve(f.rc), 0);        /* one staged run at a time */
    ck_assert_uint_eq(refcount_reserved(f.rc), 256);

    /* Durable: handed out from its start, each cluster once. */
    ck_assert_int_eq(refcount_flush(f.rc), 0);
    expect_disk_matches(&f, f.cs, 1, 7 + 257);
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 7);
    ck_assert_int_eq(fresh, REFCOUNT_RESERVED);
    ck_assert_uint_eq(alloc(&f, 3, &fresh), 8);
    ck_assert_int_eq(fresh, REFCOUNT_RESERVED);
    ck_assert_uint_eq(refcount_reserved(f.rc), 252);
    /* Freed space first: not fresh. */
    ck_assert_int_eq(refcount_update(f.rc, 3 * f.cs, f.cs, -1), 0);
    refcount_hint_free(f.rc, 3 * f.cs);
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 3);
    ck_assert_int_eq(fresh, REFCOUNT_REUSED);
    /* A reserved cluster given back (a failed write) is free space. */
    ck_assert_int_eq(refcount_update(f.rc, 9 * f.cs, f.cs, -1), 0);
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 9);
    ck_assert_int_eq(fresh, REFCOUNT_REUSED);
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 11);
    ck_assert_int_eq(fresh, REFCOUNT_RESERVED);
    for (uint64_t ci = 0; ci < 7 + 257; ci++)
        ck_assert_uint_eq(rc_of(&f, ci), 1);
    ck_assert_uint_eq(refcount_reserved(f.rc), 251);

    /* Released: the rest drops to 0 on disk; cluster 263 is still in use
     * after it, so the file keeps its length. */
    ck_assert_int_eq(refcount_release_reservation(f.rc), 0);
    ck_assert_uint_eq(refcount_reserved(f.rc), 0);
    for (uint64_t ci = 0; ci < 7 + 257; ci++)
        ck_assert_uint_eq(rc_of(&f, ci), ci < 12 || ci == past ? 1 : 0);
    expect_disk_matches(&f, f.cs, 1, 7 + 257);
    ck_assert_int_eq(io_get_size(f.io, &size), 0);
    ck_assert_uint_eq(size, (7 + 256) * f.cs);
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 12);        /* plain free space now */
    ck_assert_int_eq(fresh, REFCOUNT_REUSED);
    ck_assert_uint_eq(tu_log_state()->nb_errors, 0);
    fx_close(&f);
}
END_TEST

/*
 * A reservation that ends the file is cut off it when released: nothing
 * after it is in use.
 */
START_TEST(reservation_release_cuts_the_file)
{
    struct rimg im;
    struct fx f;
    uint64_t size;
    int fresh;

    rimg_init(&im, 12, 4, 6, 1, 6);
    fx_open(&f, &im, FX_PLAIN);
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 6);
    ck_assert_int_eq(refcount_reserve(f.rc), 0);
    ck_assert_int_eq(refcount_flush(f.rc), 0);
    ck_assert_uint_eq(alloc(&f, 2, &fresh), 7);
    ck_assert_int_eq(fresh, REFCOUNT_RESERVED);
    ck_assert_int_eq(io_get_size(f.io, &size), 0);
    ck_assert_uint_eq(size, (7 + 256) * f.cs);
    ck_assert_int_eq(refcount_release_reservation(f.rc), 0);
    ck_assert_int_eq(io_get_size(f.io, &size), 0);
    ck_assert_uint_eq(size, 9 * f.cs);
    for (uint64_t ci = 0; ci < 9; ci++)
        ck_assert_uint_eq(rc_of(&f, ci), 1);
    expect_disk_matches(&f, f.cs, 1, 9);
    fx_close(&f);
}
END_TEST

/* ---- new refcount blocks ----------------------------------------------------- */

/*
 * 512-byte clusters, 64-bit refcounts: 64 refcounts per block, one table
 * cluster of 64 entries.  Clusters 0-59 in use (header, table, block 0 at
 * cluster 2, data).
 */
#define SMALL_CB    9
#define SMALL_CS    512ull
#define TABLE_OFF   SMALL_CS

/* The two ways new blocks get linked (image_flush.c, invariant 3), for
 * loop tests: 0, the refcount cache's own flush, as when an evicted L2
 * slice needs the refcounts (the flush hook links); 1, refcount_flush, as
 * the image's flush and the table growths call it. */
static int flush_by(struct fx *f, int how)
{
    return how ? refcount_flush(f->rc) : cache_flush(refcount_cache(f->rc));
}

START_TEST(new_block_linked_at_flush)
{
    struct rimg im;
    struct fx f;
    struct tu_trace t;
    unsigned n1;
    int fresh, iw_e, ib0;

    rimg_init(&im, SMALL_CB, 6, 60, 1, 60);
    fx_open(&f, &im, FX_TRACED);
    ck_assert_uint_eq(f.be, 64);

    for (unsigned i = 0; i < 4; i++) {
        ck_assert_uint_eq(alloc(&f, 1, &fresh), 60 + i);
        ck_assert_int_eq(fresh, 1);
    }
    /* Cluster 64 is the first of table entry 1, which has no block: the
     * new block goes right after it, at 65, and the next run after that. */
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 64);
    ck_assert_uint_eq(alloc(&f, 2, &fresh), 66);
    ck_assert_int_eq(fresh, 1);
    ck_assert_uint_eq(rc_of(&f, 64), 1);
    ck_assert_uint_eq(rc_of(&f, 65), 1);
    ck_assert_uint_eq(rc_of(&f, 66), 1);
    ck_assert_uint_eq(rc_of(&f, 67), 1);
    ck_assert_uint_eq(rc_of(&f, 68), 0);

    /* Allocation wrote the block but neither flushed nor touched the table. */
    tu_trace_read(f.trace_fd, &t);
    n1 = t.nb;
    ck_assert_uint_eq(count_type(&t, IO_TRACE_FLUSH, 0, n1), 0);
    ck_assert_uint_eq(writes_overlapping(&t, TABLE_OFF, TABLE_OFF + SMALL_CS, 0, n1), 0);
    {
        int ib = index_of(&t, IO_TRACE_WRITE, 65 * SMALL_CS, 0);
        ck_assert_int_ge(ib, 0);
        ck_assert_uint_eq(t.recs[ib].r.length, SMALL_CS);
        /* Written holding its own refcount. */
        for (uint64_t i = 0; i < 64; i++)
            ck_assert_uint_eq(ref_entry_get(6, t.recs[ib].payload, i), i == 1);
    }
    ck_assert_uint_eq(be64_get(mem_at(&f, TABLE_OFF + 8, 8)), 0);
    tu_trace_free(&t);

    /* The flush links it: blocks written, flush, entry, flush. */
    ck_assert_int_eq(flush_by(&f, _i), 0);
    tu_trace_read(f.trace_fd, &t);
    iw_e = expect_entry_linked(&f, &t, TABLE_OFF, 1, 65, n1);
    ck_assert_uint_eq(writes_overlapping(&t, TABLE_OFF, TABLE_OFF + SMALL_CS, 0, t.nb), 1);
    ib0 = last_write_before(&t, 2 * SMALL_CS, iw_e);
    ck_assert_int_ge(ib0, (int)n1);
    ck_assert(flush_between(&t, ib0, iw_e));
    ck_assert_int_ge(index_of(&t, IO_TRACE_FLUSH, 0, (unsigned)iw_e + 1), 0);
    tu_trace_free(&t);

    /* On disk: the entry, and a block that agrees with refcount_get. */
    ck_assert_uint_eq(be64_get(mem_at(&f, TABLE_OFF, 8)), 2 * SMALL_CS);
    ck_assert_uint_eq(be64_get(mem_at(&f, TABLE_OFF + 8, 8)), 65 * SMALL_CS);
    for (unsigned ti = 2; ti < 64; ti++)
        ck_assert_uint_eq(be64_get(mem_at(&f, TABLE_OFF + 8 * ti, 8)), 0);
    for (uint64_t i = 0; i < 64; i++)
        ck_assert_uint_eq(ref_entry_get(6, mem_at(&f, 65 * SMALL_CS, SMALL_CS), i), i < 4);
    expect_disk_matches(&f, TABLE_OFF, 1, 256);
    expect_reopen_matches(&f, TABLE_OFF, 1, 4096);
    ck_assert(!meta_is_corrupt(&f.m));
    ck_assert_uint_eq(tu_log_state()->nb_errors, 0);
    fx_close(&f);
}
END_TEST

static uint64_t exp_upto_161(uint64_t ci)
{
    return ci < 162;
}

START_TEST(several_blocks_one_run)
{
    struct rimg im;
    struct fx f;
    struct tu_trace t;
    unsigned n1;
    int fresh, iw1, iw2;

    rimg_init(&im, SMALL_CB, 6, 60, 1, 60);
    fx_open(&f, &im, FX_TRACED);

    /*
     * 100 clusters from 60 need blocks for table entries 1 and 2, placed
     * after the run: entry 1's at 160, entry 2's at 161.  Both blocks lie
     * in entry 2's range, so entry 2's block holds both their refcounts and
     * must be linked first.
     */
    ck_assert_uint_eq(alloc(&f, 100, &fresh), 60);
    expect_refcounts(&f, 256, exp_upto_161);

    tu_trace_read(f.trace_fd, &t);
    n1 = t.nb;
    ck_assert_uint_eq(count_type(&t, IO_TRACE_FLUSH, 0, n1), 0);
    ck_assert_uint_eq(writes_overlapping(&t, TABLE_OFF, TABLE_OFF + SMALL_CS, 0, n1), 0);
    ck_assert_int_ge(index_of(&t, IO_TRACE_WRITE, 160 * SMALL_CS, 0), 0);
    ck_assert_int_ge(index_of(&t, IO_TRACE_WRITE, 161 * SMALL_CS, 0), 0);
    tu_trace_free(&t);

    ck_assert_int_eq(cache_flush(refcount_cache(f.rc)), 0);
    tu_trace_read(f.trace_fd, &t);
    iw2 = expect_entry_linked(&f, &t, TABLE_OFF, 2, 161, n1);
    iw1 = expect_entry_linked(&f, &t, TABLE_OFF, 1, 160, n1);
    ck_assert_msg(iw2 < iw1, "entry 1 (record %d) written before entry 2 (record %d), "
                  "which holds its block's refcount", iw1, iw2);
    ck_assert_msg(flush_between(&t, iw2, iw1), "no flush between entry 2 and entry 1");
    ck_assert_int_ge(index_of(&t, IO_TRACE_FLUSH, 0, (unsigned)iw1 + 1), 0);
    ck_assert_uint_eq(writes_overlapping(&t, TABLE_OFF, TABLE_OFF + SMALL_CS, 0, t.nb), 2);
    tu_trace_free(&t);

    ck_assert_uint_eq(be64_get(mem_at(&f, TABLE_OFF + 8, 8)), 160 * SMALL_CS);
    ck_assert_uint_eq(be64_get(mem_at(&f, TABLE_OFF + 16, 8)), 161 * SMALL_CS);
    ck_assert_uint_eq(be64_get(mem_at(&f, TABLE_OFF + 24, 8)), 0);
    expect_disk_matches(&f, TABLE_OFF, 1, 256);
    expect_reopen_matches(&f, TABLE_OFF, 1, 4096);
    ck_assert_uint_eq(tu_log_state()->nb_errors, 0);
    fx_close(&f);
}
END_TEST

static uint64_t exp_upto_160(uint64_t ci)
{
    return ci < 161;
}

/*
 * A new block that lands in the range of a block that already exists: its
 * refcount goes there.  Table entries 0 (cluster 2) and 2 (cluster 3) have
 * blocks, entry 1 not.  100 clusters from 60 run into entry 2's range; entry
 * 1's block goes at 160, counted in entry 2's block, which must reach the
 * disk before entry 1 does.
 */
START_TEST(new_block_held_by_existing_block)
{
    struct rimg im;
    struct fx f;
    struct tu_trace t;
    unsigned n1;
    int fresh, iw, ih;

    rimg_init(&im, SMALL_CB, 6, 60, 1, 60);
    be64_put(im.buf + TABLE_OFF + 16, 3 * SMALL_CS);
    fx_open(&f, &im, FX_TRACED);

    ck_assert_uint_eq(alloc(&f, 100, &fresh), 60);
    expect_refcounts(&f, 256, exp_upto_160);
    tu_trace_read(f.trace_fd, &t);
    n1 = t.nb;
    ck_assert_uint_eq(count_type(&t, IO_TRACE_FLUSH, 0, n1), 0);
    ck_assert_uint_eq(writes_overlapping(&t, TABLE_OFF, TABLE_OFF + SMALL_CS, 0, n1), 0);
    tu_trace_free(&t);

    ck_assert_int_eq(cache_flush(refcount_cache(f.rc)), 0);
    tu_trace_read(f.trace_fd, &t);
    iw = expect_entry_linked(&f, &t, TABLE_OFF, 1, 160, n1);
    ih = last_write_before(&t, 3 * SMALL_CS, iw);
    ck_assert_int_ge(ih, (int)n1);
    ck_assert_uint_eq(ref_entry_get(6, t.recs[ih].payload, 160 - 128), 1);
    ck_assert_msg(flush_between(&t, ih, iw), "entry 1 (record %d) written without a "
                  "flush after the block holding its refcount (record %d)", iw, ih);
    ck_assert_uint_eq(writes_overlapping(&t, TABLE_OFF, TABLE_OFF + SMALL_CS, 0, t.nb), 1);
    tu_trace_free(&t);

    ck_assert_uint_eq(be64_get(mem_at(&f, TABLE_OFF + 8, 8)), 160 * SMALL_CS);
    ck_assert_uint_eq(be64_get(mem_at(&f, TABLE_OFF + 16, 8)), 3 * SMALL_CS);
    expect_disk_matches(&f, TABLE_OFF, 1, 256);
    expect_reopen_matches(&f, TABLE_OFF, 1, 4096);
    ck_assert_uint_eq(tu_log_state()->nb_errors, 0);
    fx_close(&f);
}
END_TEST

static uint64_t exp_upto_202(uint64_t ci)
{
    return ci < 203;
}

START_TEST(several_allocations_one_flush)
{
    static const uint64_t blocks[3] = { 65, 129, 193 };   /* of entries 1, 2, 3 */
    struct rimg im;
    struct fx f;
    struct tu_trace t;
    uint64_t next = 60;
    unsigned n1;
    int fresh, last = -1;

    rimg_init(&im, SMALL_CB, 6, 60, 1, 60);
    fx_open(&f, &im, FX_TRACED);

    /* 140 single clusters: each time one crosses into a range without a
     * block, the block takes the cluster after it. */
    for (unsigned i = 0; i < 140; i++) {
        uint64_t got = alloc(&f, 1, &fresh);
        if (next == 65 || next == 129 || next == 193)
            next++;
        ck_assert_msg(got == next, "allocation %u: cluster %llu, expected %llu", i,
                      (unsigned long long)got, (unsigned long long)next);
        next++;
    }
    ck_assert_uint_eq(next, 203);
    expect_refcounts(&f, 320, exp_upto_202);

    tu_trace_read(f.trace_fd, &t);
    n1 = t.nb;
    ck_assert_uint_eq(count_type(&t, IO_TRACE_FLUSH, 0, n1), 0);
    ck_assert_uint_eq(writes_overlapping(&t, TABLE_OFF, TABLE_OFF + SMALL_CS, 0, n1), 0);
    tu_trace_free(&t);

    ck_assert_int_eq(cache_flush(refcount_cache(f.rc)), 0);
    tu_trace_read(f.trace_fd, &t);
    for (unsigned k = 0; k < 3; k++) {
        int iw = expect_entry_linked(&f, &t, TABLE_OFF, k + 1, blocks[k], n1);
        if (iw > last)
            last = iw;
    }
    ck_assert_int_ge(index_of(&t, IO_TRACE_FLUSH, 0, (unsigned)last + 1), 0);
    ck_assert_uint_eq(writes_overlapping(&t, TABLE_OFF, TABLE_OFF + SMALL_CS, 0, t.nb), 3);
    tu_trace_free(&t);

    for (unsigned k = 0; k < 3; k++)
        ck_assert_uint_eq(be64_get(mem_at(&f, TABLE_OFF + 8 * (k + 1), 8)),
                          blocks[k] * SMALL_CS);
    expect_disk_matches(&f, TABLE_OFF, 1, 320);
    expect_reopen_matches(&f, TABLE_OFF, 1, 4096);
    ck_assert_uint_eq(tu_log_state()->nb_errors, 0);
    fx_close(&f);
}
END_TEST

/* ---- refcount table growth ------------------------------------------------------ */

static uint64_t exp_grow(uint64_t ci)
{
    return ci != 1 && ci < 4232;
}

/*
 * One table cluster covers 64 * 64 = 4096 clusters.  With clusters 0-63 in
 * use, 4100 more need table entries up to 66, so the table moves:
 *   new table at clusters 64-65 (128 entries), followed by a new block for
 *   entry 1 at 66 (its range holds the table and itself);
 *   then the run 67-4166 and its 65 new blocks (entries 2-66) at 4167-4231.
 */
START_TEST(grow_table_relocates)
{
    const uint64_t cs = SMALL_CS, new_off = 64 * SMALL_CS;
    struct rimg im;
    struct fx f;
    struct tu_trace t;
    unsigned n1;
    int fresh, iw_tab, iw_blk, iw_hdr, ifl, last = -1;
    const uint8_t *p;

    rimg_init(&im, SMALL_CB, 6, 64, 1, 64);
    fx_open(&f, &im, FX_TRACED);

    ck_assert_uint_eq(alloc(&f, 4100, &fresh), 67);

    tu_trace_read(f.trace_fd, &t);
    n1 = t.nb;
    /* The new table and the block for its area. */
    iw_tab = index_of(&t, IO_TRACE_WRITE, new_off, 0);
    ck_assert_int_ge(iw_tab, 0);
    ck_assert_uint_eq(t.recs[iw_tab].r.length, 2 * cs);
    p = t.recs[iw_tab].payload;
    ck_assert_uint_eq(be64_get(p), 2 * cs);
    ck_assert_uint_eq(be64_get(p + 8), 66 * cs);
    for (unsigned ti = 2; ti < 128; ti++)
        ck_assert_uint_eq(be64_get(p + 8 * ti), 0);
    iw_blk = index_of(&t, IO_TRACE_WRITE, 66 * cs, 0);
    ck_assert_int_ge(iw_blk, 0);
    for (uint64_t i = 0; i < 64; i++)
        ck_assert_uint_eq(ref_entry_get(6, t.recs[iw_blk].payload, i), i < 3);
    /* The header switches once, after a flush that follows both. */
    iw_hdr = index_of(&t, IO_TRACE_WRITE, 48, 0);
    ck_assert_int_ge(iw_hdr, 0);
    ck_assert_int_eq(index_of(&t, IO_TRACE_WRITE, 48, (unsigned)iw_hdr + 1), -1);
    ck_assert_uint_eq(t.recs[iw_hdr].r.length, 12);
    ck_assert_uint_eq(be64_get(t.recs[iw_hdr].payload), new_off);
    ck_assert_uint_eq(be32_get(t.recs[iw_hdr].payload + 8), 2);
    ck_assert_int_lt(iw_tab, iw_hdr);
    ck_assert_int_lt(iw_blk, iw_hdr);
    ck_assert_msg(flush_between(&t, iw_tab > iw_blk ? iw_tab : iw_blk, iw_hdr),
                  "header (record %d) written without a flush after the new table "
                  "(record %d) and block (record %d)", iw_hdr, iw_tab, iw_blk);
    ifl = index_of(&t, IO_TRACE_FLUSH, 0, (unsigned)iw_hdr + 1);
    ck_assert_int_ge(ifl, 0);
    /* Block 0 holds the old table's refcount: until the header is durable
     * it is written only with the old table still counted. */
    for (unsigned i = 0; i < t.nb; i++) {
        const struct tu_trace_rec *r = &t.recs[i];
        if (r->r.type != IO_TRACE_WRITE || r->r.offset != 2 * cs)
            continue;
        if ((int)i < ifl)
            ck_assert_uint_eq(ref_entry_get(6, r->payload, 1), 1);
    }
    /* The old table is neither written nor linked to; nothing else flushed. */
    ck_assert_uint_eq(writes_overlapping(&t, TABLE_OFF, TABLE_OFF + cs, 0, n1), 0);
    tu_trace_free(&t);

    /* Header on disk; the old table's cluster is free; everything else kept. */
    ck_assert_uint_eq(be64_get(mem_at(&f, 48, 8)), new_off);
    ck_assert_uint_eq(be32_get(mem_at(&f, 56, 4)), 2);
    ck_assert_uint_eq(rc_of(&f, 1), 0);
    expect_refcounts(&f, 4400, exp_grow);

    /* The next flush links entries 2-66 into the new table, holders first:
     * 66 (holds itself), then 59-65 (held by 66), then 2-58 (held by 65). */
    ck_assert_int_eq(flush_by(&f, _i), 0);
    tu_trace_read(f.trace_fd, &t);
    {
        int iw[67];
        for (uint64_t ti = 2; ti <= 66; ti++) {
            iw[ti] = expect_entry_linked(&f, &t, new_off, ti, 4165 + ti, n1);
            if (iw[ti] > last)
                last = iw[ti];
        }
        for (uint64_t ti = 2; ti <= 66; ti++) {
            uint64_t holder = (4165 + ti) / 64;
            if (holder == ti)
                continue;
            ck_assert_msg(iw[holder] < iw[ti] && flush_between(&t, iw[holder], iw[ti]),
                          "entry %llu (record %d) not after a flush after entry %llu "
                          "(record %d), which holds its block's refcount",
                          (unsigned long long)ti, iw[ti], (unsigned long long)holder,
                          iw[holder]);
        }
    }
    ck_assert_int_ge(index_of(&t, IO_TRACE_FLUSH, 0, (unsigned)last + 1), 0);
    ck_assert_uint_eq(writes_overlapping(&t, TABLE_OFF, TABLE_OFF + cs, 0, t.nb), 0);
    /* Block 0 with the old table freed reached the disk only now. */
    {
        int ib0 = last_write_before(&t, 2 * cs, (int)t.nb);
        ck_assert_int_ge(ib0, (int)n1);
        ck_assert_uint_eq(ref_entry_get(6, t.recs[ib0].payload, 1), 0);
    }
    tu_trace_free(&t);

    expect_refcounts(&f, 4400, exp_grow);
    expect_disk_matches(&f, new_off, 2, 4400);
    expect_reopen_matches(&f, new_off, 2, 4400);
    ck_assert(!meta_is_corrupt(&f.m));
    ck_assert_uint_eq(tu_log_state()->nb_errors, 0);
    fx_close(&f);
}
END_TEST

static uint64_t exp_grow_pending(uint64_t ci)
{
    return ci != 1 && ci < 4233;
}

/*
 * A block still waiting to be linked when the table moves: clusters 0-59 in
 * use; 5 clusters (60-64) create entry 1's block at 65, not linked on disk.
 * Then 4100 clusters move the table to 66-67: the new table must carry the
 * entry for block 65 (the header points at it before any other flush).
 * Then run 68-4167, blocks for entries 2-66 at 4168-4232.
 */
START_TEST(grow_table_keeps_pending_block)
{
    const uint64_t cs = SMALL_CS, new_off = 66 * SMALL_CS;
    struct rimg im;
    struct fx f;
    struct tu_trace t;
    unsigned n0;
    int fresh, iw_tab, iw_hdr, ib, ifl;

    rimg_init(&im, SMALL_CB, 6, 60, 1, 60);
    fx_open(&f, &im, FX_TRACED);

    ck_assert_uint_eq(alloc(&f, 5, &fresh), 60);
    ck_assert_uint_eq(rc_of(&f, 65), 1);
    tu_trace_read(f.trace_fd, &t);
    n0 = t.nb;
    ck_assert_uint_eq(count_type(&t, IO_TRACE_FLUSH, 0, n0), 0);
    tu_trace_free(&t);

    ck_assert_uint_eq(alloc(&f, 4100, &fresh), 68);
    tu_trace_read(f.trace_fd, &t);
    iw_tab = index_of(&t, IO_TRACE_WRITE, new_off, n0);
    ck_assert_int_ge(iw_tab, 0);
    ck_assert_uint_eq(t.recs[iw_tab].r.length, 2 * cs);
    ck_assert_uint_eq(be64_get(t.recs[iw_tab].payload), 2 * cs);
    ck_assert_uint_eq(be64_get(t.recs[iw_tab].payload + 8), 65 * cs);
    ck_assert_uint_eq(be64_get(t.recs[iw_tab].payload + 16), 0);
    iw_hdr = index_of(&t, IO_TRACE_WRITE, 48, n0);
    ck_assert_int_ge(iw_hdr, 0);
    ck_assert_uint_eq(be64_get(t.recs[iw_hdr].payload), new_off);
    ck_assert_uint_eq(be32_get(t.recs[iw_hdr].payload + 8), 2);
    ck_assert(flush_between(&t, iw_tab, iw_hdr));
    /* Block 65 (with the new table's refcounts) durable before the header. */
    ib = last_write_before(&t, 65 * cs, iw_hdr);
    ck_assert_int_ge(ib, 0);
    ck_assert(flush_between(&t, ib, iw_hdr));
    ck_assert_uint_eq(ref_entry_get(6, t.recs[ib].payload, 66 - 64), 1);
    ck_assert_uint_eq(ref_entry_get(6, t.recs[ib].payload, 67 - 64), 1);
    ifl = index_of(&t, IO_TRACE_FLUSH, 0, (unsigned)iw_hdr + 1);
    ck_assert_int_ge(ifl, 0);
    /* Block 0 is dirty here (60-64) and is written during the move: with
     * the old table still counted until the header is durable. */
    ib = last_write_before(&t, 2 * cs, iw_hdr);
    ck_assert_int_ge(ib, (int)n0);
    for (unsigned i = 0; i < t.nb; i++) {
        const struct tu_trace_rec *r = &t.recs[i];
        if (r->r.type == IO_TRACE_WRITE && r->r.offset == 2 * cs && (int)i < ifl)
            ck_assert_uint_eq(ref_entry_get(6, r->payload, 1), 1);
    }
    tu_trace_free(&t);

    ck_assert_uint_eq(rc_of(&f, 1), 0);
    expect_refcounts(&f, 4400, exp_grow_pending);
    ck_assert_int_eq(cache_flush(refcount_cache(f.rc)), 0);
    ck_assert_uint_eq(be64_get(mem_at(&f, new_off + 8, 8)), 65 * cs);
    for (uint64_t ti = 2; ti <= 66; ti++)
        ck_assert_uint_eq(be64_get(mem_at(&f, new_off + 8 * ti, 8)), (4166 + ti) * cs);
    expect_disk_matches(&f, new_off, 2, 4400);
    expect_reopen_matches(&f, new_off, 2, 4400);
    ck_assert(!meta_is_corrupt(&f.m));
    ck_assert_uint_eq(tu_log_state()->nb_errors, 0);
    fx_close(&f);
}
END_TEST

/* ---- deferred frees ----------------------------------------------------------- */

struct freed_log {
    unsigned nb;
    uint64_t off[16], len[16];
};

static void record_freed(void *opaque, uint64_t off, uint64_t len)
{
    struct freed_log *l = opaque;

    ck_assert_uint_lt(l->nb, 16);
    l->off[l->nb] = off;
    l->len[l->nb] = len;
    l->nb++;
}

/* ---- a full host file system ------------------------------------------------- */

/*
 * The block that an allocation past the end needs cannot be written
 * (ENOSPC): the allocation fails, nothing is counted, the block's cluster
 * is not left registered as a refcount block (it would pass for one when
 * handed out later), and once there is room the same allocation works.
 */
START_TEST(new_block_enospc)
{
    struct rimg im;
    struct fx f;
    uint64_t off;
    int fresh;

    rimg_init(&im, SMALL_CB, 6, 64, 1, 64);
    fx_open(&f, &im, FX_FLAKY);
    f.flaky->fail_lo = 64 * SMALL_CS;
    f.flaky->fail_hi = UINT64_MAX;
    ck_assert_int_eq(refcount_alloc(f.rc, 1, &off, &fresh), -ENOSPC);
    ck_assert_uint_ge(f.flaky->failed_writes, 1);
    ck_assert(!meta_is_corrupt(&f.m));
    ck_assert_int_eq(meta_kind_at(&f.m, 65 * SMALL_CS), META_KIND_NONE);
    f.flaky->fail_hi = 0;
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 64);
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 66);
    ck_assert(!meta_is_corrupt(&f.m));
    ck_assert_uint_eq(rc_of(&f, 64), 1);
    ck_assert_uint_eq(rc_of(&f, 65), 1);
    ck_assert_uint_eq(rc_of(&f, 66), 1);
    ck_assert_int_eq(cache_flush(refcount_cache(f.rc)), 0);
    ck_assert_uint_eq(tu_log_state()->nb_errors, 0);
    fx_close(&f);
}
END_TEST

/*
 * The same when the refcount table must move (as in grow_table_relocates:
 * new table at clusters 64-65, a block for its area at 66): whether the
 * block or the table cannot be written, the header keeps the old table,
 * nothing of the new area stays counted or registered, and a retry with
 * room succeeds.
 */
START_TEST(grow_table_enospc)
{
    const uint64_t cs = SMALL_CS;
    const uint64_t where[2][2] = { { 66 * cs, 67 * cs }, { 64 * cs, 66 * cs } };

    for (unsigned w = 0; w < 2; w++) {
        struct rimg im;
        struct fx f;
        uint64_t off;
        int fresh;

        rimg_init(&im, SMALL_CB, 6, 64, 1, 64);
        fx_open(&f, &im, FX_FLAKY);
        f.flaky->fail_lo = where[w][0];
        f.flaky->fail_hi = where[w][1];
        ck_assert_int_eq(refcount_alloc(f.rc, 4100, &off, &fresh), -ENOSPC);
        ck_assert(!meta_is_corrupt(&f.m));
        ck_assert_uint_eq(be64_get(mem_at(&f, 48, 8)), TABLE_OFF);
        for (uint64_t ci = 64; ci < 67; ci++) {
            ck_assert_uint_eq(rc_of(&f, ci), 0);
            ck_assert_int_eq(meta_kind_at(&f.m, ci * cs), META_KIND_NONE);
        }
        /* With room: the new table, its block, then the run (past the
         * clusters the failed attempt wrote, if it wrote any). */
        f.flaky->fail_hi = 0;
        off = alloc(&f, 4100, &fresh);
        ck_assert_uint_ge(off, 67);
        ck_assert(!meta_is_corrupt(&f.m));
        ck_assert_uint_eq(be64_get(mem_at(&f, 48, 8)), (off - 3) * cs);
        ck_assert_int_eq(meta_kind_at(&f.m, (off - 1) * cs), META_KIND_REFBLOCK);
        ck_assert_int_eq(cache_flush(refcount_cache(f.rc)), 0);
        ck_assert_uint_eq(tu_log_state()->nb_errors, 0);
        fx_close(&f);
    }
}
END_TEST

START_TEST(deferred_free)
{
    struct rimg im;
    struct fx f;
    struct freed_log fl = { 0 };
    int fresh;

    /* 4 KiB clusters, 0-11 in use; cluster 7 referenced twice. */
    rimg_init(&im, 12, 4, 12, 1, 12);
    rimg_set(&im, 7, 2);
    fx_open(&f, &im, FX_PLAIN);

    ck_assert(!refcount_has_deferred(f.rc));
    ck_assert_uint_eq(refcount_nb_deferred(f.rc), 0);
    ck_assert_int_eq(refcount_defer_free(f.rc, 5 * f.cs, 2 * f.cs), 0);
    ck_assert_int_eq(refcount_defer_free(f.rc, 7 * f.cs, f.cs), 0);
    ck_assert_int_eq(refcount_defer_free(f.rc, 8 * f.cs + 100, 10), 0);
    ck_assert(refcount_has_deferred(f.rc));
    ck_assert_uint_eq(refcount_nb_deferred(f.rc), 3);

    /* Nothing changes until applied, and the clusters are not handed out. */
    ck_assert_uint_eq(rc_of(&f, 5), 1);
    ck_assert_uint_eq(rc_of(&f, 6), 1);
    ck_assert_uint_eq(rc_of(&f, 7), 2);
    ck_assert_uint_eq(rc_of(&f, 8), 1);
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 12);
    ck_assert_int_eq(fresh, 1);

    /* Applied: exactly the clusters that reached 0 are reported, one
     * cluster each, in order; 7 drops to 1 and is not. */
    ck_assert_int_eq(refcount_apply_deferred(f.rc, record_freed, &fl), 0);
    ck_assert_uint_eq(fl.nb, 3);
    ck_assert_uint_eq(fl.off[0], 5 * f.cs);
    ck_assert_uint_eq(fl.len[0], f.cs);
    ck_assert_uint_eq(fl.off[1], 6 * f.cs);
    ck_assert_uint_eq(fl.len[1], f.cs);
    ck_assert_uint_eq(fl.off[2], 8 * f.cs);
    ck_assert_uint_eq(fl.len[2], f.cs);
    ck_assert_uint_eq(rc_of(&f, 4), 1);
    ck_assert_uint_eq(rc_of(&f, 5), 0);
    ck_assert_uint_eq(rc_of(&f, 6), 0);
    ck_assert_uint_eq(rc_of(&f, 7), 1);
    ck_assert_uint_eq(rc_of(&f, 8), 0);
    ck_assert_uint_eq(rc_of(&f, 9), 1);
    ck_assert(!refcount_has_deferred(f.rc));
    ck_assert_uint_eq(refcount_nb_deferred(f.rc), 0);

    /* Nothing queued: nothing reported. */
    fl.nb = 0;
    ck_assert_int_eq(refcount_apply_deferred(f.rc, record_freed, &fl), 0);
    ck_assert_uint_eq(fl.nb, 0);

    /* The freed clusters are reused (not fresh). */
    ck_assert_uint_eq(alloc(&f, 2, &fresh), 5);
    ck_assert_int_eq(fresh, 0);
    ck_assert_uint_eq(alloc(&f, 1, &fresh), 8);
    ck_assert_int_eq(fresh, 0);

    /* No callback is fine; the second reference to 7 goes. */
    ck_assert_int_eq(refcount_defer_free(f.rc, 7 * f.cs, f.cs), 0);
    ck_assert_uint_eq(rc_of(&f, 7), 1);
    ck_assert_int_eq(refcount_apply_deferred(f.rc, NULL, NULL), 0);
    ck_assert_uint_eq(rc_of(&f, 7), 0);

    ck_assert_int_eq(cache_flush(refcount_cache(f.rc)), 0);
    expect_disk_matches(&f, f.cs, 1, 64);
    ck_assert_uint_eq(tu_log_state()->nb_errors, 0);
    fx_close(&f);
}
END_TEST

START_TEST(deferred_free_error_keeps_rest)
{
    struct rimg im;
    struct fx f;
    struct freed_log fl = { 0 };

    rimg_init(&im, 12, 4, 12, 1, 12);
    fx_open(&f, &im, FX_PLAIN);

    ck_assert_int_eq(refcount_defer_free(f.rc, 5 * f.cs, f.cs), 0);
    ck_assert_int_eq(refcount_defer_free(f.rc, 20 * f.cs, f.cs), 0);  /* refcount 0 */
    ck_assert_int_eq(refcount_defer_free(f.rc, 6 * f.cs, f.cs), 0);
    ck_assert_int_eq(refcount_apply_deferred(f.rc, record_freed, &fl), -EIO);
    ck_assert(meta_is_corrupt(&f.m));
    /* The first was applied and reported; the failed one and the rest stay. */
    ck_assert_uint_eq(fl.nb, 1);
    ck_assert_uint_eq(fl.off[0], 5 * f.cs);
    ck_assert_uint_eq(rc_of(&f, 5), 0);
    ck_assert_uint_eq(rc_of(&f, 20), 0);
    ck_assert_uint_eq(rc_of(&f, 6), 1);
    ck_assert_uint_eq(refcount_nb_deferred(f.rc), 2);
    fx_close(&f);
}
END_TEST

/*
 * A deferred free whose range spans two refcount blocks, applied while the
 * second block cannot be read: apply_deferred fails and, as documented,
 * keeps the range queued.  Retried once the block reads again, each
 * cluster's refcount must drop by exactly one in total.
 */
START_TEST(deferred_free_retry_after_read_error)
{
    struct rimg im;
    struct fx f;
    struct freed_log fl = { 0 };
    int ret;

    /* 512-byte clusters, 64 refcounts per block, blocks for entries 0 and 1
     * at clusters 2 and 3; 0-69 in use; 62-65 referenced twice. */
    rimg_init(&im, SMALL_CB, 6, 70, 2, 70);
    for (uint64_t ci = 62; ci < 66; ci++)
        rimg_set(&im, ci, 2);
    fx_open(&f, &im, FX_FLAKY);

    ck_assert_uint_eq(rc_of(&f, 62), 2);     /* block 0 cached, block 1 not */
    ck_assert_int_eq(refcount_defer_free(f.rc, 62 * f.cs, 4 * f.cs), 0);
    f.flaky->fail_reads = true;
    ret = refcount_apply_deferred(f.rc, record_freed, &fl);
    f.flaky->fail_reads = false;
    ck_assert_int_lt(ret, 0);
    ck_assert_uint_ge(f.flaky->failed_reads, 1);
    ck_assert_uint_eq(refcount_nb_deferred(f.rc), 1);

    ck_assert_int_eq(refcount_apply_deferred(f.rc, record_freed, &fl), 0);
    ck_assert_uint_eq(refcount_nb_deferred(f.rc), 0);
    for (uint64_t ci = 62; ci < 66; ci++)
        ck_assert_msg(rc_of(&f, ci) == 1, "cluster %llu: refcount %llu after a deferred "
                      "free that failed once and was retried; expected 2 - 1 = 1",
                      (unsigned long long)ci, (unsigned long long)rc_of(&f, ci));
    ck_assert_msg(fl.nb == 0, "%u clusters reported freed while still referenced "
                  "(first: 0x%llx)", fl.nb, (unsigned long long)fl.off[0]);
    fx_close(&f);
}
END_TEST

static Suite *refcount_suite(void)
{
    Suite *s = suite_create("refcount");
    TCase *tc = tcase_create("entries");
    tcase_set_timeout(tc, 60);

    tcase_add_test(tc, entry_roundtrip_all_orders);
    tcase_add_test(tc, entry_exact_bytes);
    suite_add_tcase(s, tc);

    tc = tcase_create("update");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, update_ranges);
    tcase_add_test(tc, update_underflow);
    tcase_add_test(tc, update_overflow_all_orders);
    tcase_add_test(tc, open_rejects_bad_table_entry);
    tcase_add_test(tc, open_allows_inflight_allocations_past_end);
    suite_add_tcase(s, tc);

    tc = tcase_create("alloc");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, alloc_first_fit_and_reuse);
    tcase_add_test(tc, alloc_fresh_with_new_block);
    tcase_add_test(tc, reservation_hands_out_each_cluster_once);
    tcase_add_test(tc, reservation_release_cuts_the_file);
    suite_add_tcase(s, tc);

    tc = tcase_create("growth");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, new_block_linked_at_flush, 0, 2);
    tcase_add_test(tc, several_blocks_one_run);
    tcase_add_test(tc, new_block_held_by_existing_block);
    tcase_add_test(tc, several_allocations_one_flush);
    tcase_add_loop_test(tc, grow_table_relocates, 0, 2);
    tcase_add_test(tc, new_block_enospc);
    tcase_add_test(tc, grow_table_enospc);
    tcase_add_test(tc, grow_table_keeps_pending_block);
    suite_add_tcase(s, tc);

    tc = tcase_create("deferred");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, deferred_free);
    tcase_add_test(tc, deferred_free_error_keeps_rest);
    tcase_add_test(tc, deferred_free_retry_after_read_error);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(refcount_suite());
}
