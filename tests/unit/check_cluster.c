/*
 * Unit tests for cluster: L2 entry decoding, guest-to-host lookups over
 * small images built in memory, and the write side (preparing, copying and
 * allocating L2 tables, setting entries, growing the L1 table) judged by
 * the image checker afterwards.
 */
#include "testutil.h"

#include "cache.h"
#include "check.h"
#include "cluster.h"
#include "compress.h"
#include "io.h"
#include "meta.h"
#include "refcount.h"

#include <errno.h>

#define COPIED      META_L2_COPIED
#define COMPRESSED  META_L2_COMPRESSED
#define ZEROFLAG    META_L2_ZERO

/* ---- cluster_decode_entry ------------------------------------------------ */

struct decoded {
    int ret;
    enum cluster_kind kind;
    uint64_t host;
    const char *why;
};

static struct decoded decode(const struct meta *m, uint64_t entry, uint64_t bitmap,
                             unsigned sc)
{
    struct decoded d = { .kind = (enum cluster_kind)99, .host = 0xdeadbeef, .why = NULL };

    d.ret = cluster_decode_entry(m, entry, bitmap, sc, &d.kind, &d.host, &d.why);
    return d;
}

static void expect_kind(const struct meta *m, uint64_t entry, uint64_t bitmap,
                        unsigned sc, enum cluster_kind kind, uint64_t host)
{
    struct decoded d = decode(m, entry, bitmap, sc);

    ck_assert_msg(d.ret == 0, "entry 0x%016llx bitmap 0x%016llx sc %u: returned %d (%s)",
                  (unsigned long long)entry, (unsigned long long)bitmap, sc, d.ret,
                  d.why ? d.why : "no reason");
    ck_assert_msg(d.kind == kind, "entry 0x%016llx bitmap 0x%016llx sc %u: kind %d, expected %d",
                  (unsigned long long)entry, (unsigned long long)bitmap, sc, d.kind, kind);
    if (kind == CLUSTER_DATA || kind == CLUSTER_COMPRESSED)
        ck_assert_msg(d.host == host, "entry 0x%016llx: host 0x%llx, expected 0x%llx",
                      (unsigned long long)entry, (unsigned long long)d.host,
                      (unsigned long long)host);
}

static void expect_invalid(const struct meta *m, uint64_t entry, uint64_t bitmap,
                           unsigned sc)
{
    struct decoded d = decode(m, entry, bitmap, sc);

    ck_assert_msg(d.ret == -EINVAL, "entry 0x%016llx bitmap 0x%016llx sc %u: returned %d, "
                  "kind %d", (unsigned long long)entry, (unsigned long long)bitmap, sc,
                  d.ret, d.kind);
    ck_assert_msg(d.why != NULL && d.why[0] != '\0', "entry 0x%016llx: no reason given",
                  (unsigned long long)entry);
}

START_TEST(decode_standard_v3)
{
    struct meta m;
    const uint64_t cs = 1u << 16;

    tu_meta_init(&m, NULL, 16, true, false);
    expect_kind(&m, 0, 0, 0, CLUSTER_UNALLOCATED, 0);
    expect_kind(&m, 5 * cs | COPIED, 0, 0, CLUSTER_DATA, 5 * cs);
    expect_kind(&m, 5 * cs, 0, 0, CLUSTER_DATA, 5 * cs);
    /* The highest offset the format allows. */
    expect_kind(&m, (META_OFFSET_MASK & ~(cs - 1)) | COPIED, 0, 0, CLUSTER_DATA,
                META_OFFSET_MASK & ~(cs - 1));
    /* Zero clusters: plain, and with an allocation kept (preallocated). */
    expect_kind(&m, ZEROFLAG, 0, 0, CLUSTER_ZERO, 0);
    expect_kind(&m, 7 * cs | ZEROFLAG, 0, 0, CLUSTER_ZERO, 0);
    expect_kind(&m, 7 * cs | COPIED | ZEROFLAG, 0, 0, CLUSTER_ZERO, 0);
    {
        struct decoded d = decode(&m, 7 * cs | COPIED | ZEROFLAG, 0, 0);
        ck_assert_uint_eq(d.host, 7 * cs);
    }
}
END_TEST

START_TEST(decode_zero_flag_v2)
{
    struct meta m;
    const uint64_t cs = 1u << 16;

    tu_meta_init(&m, NULL, 16, false, false);
    expect_invalid(&m, ZEROFLAG, 0, 0);
    expect_invalid(&m, 7 * cs | COPIED | ZEROFLAG, 0, 0);
    /* The rest of v2 is as v3. */
    expect_kind(&m, 0, 0, 0, CLUSTER_UNALLOCATED, 0);
    expect_kind(&m, 7 * cs | COPIED, 0, 0, CLUSTER_DATA, 7 * cs);
}
END_TEST

START_TEST(decode_reserved_bits)
{
    struct meta m;
    const uint64_t cs = 1u << 16;

    tu_meta_init(&m, NULL, 16, true, false);
    for (unsigned b = 1; b <= 8; b++) {
        expect_invalid(&m, 5 * cs | COPIED | 1ull << b, 0, 0);
        expect_invalid(&m, 1ull << b, 0, 0);
    }
    for (unsigned b = 56; b <= 61; b++) {
        expect_invalid(&m, 5 * cs | COPIED | 1ull << b, 0, 0);
        expect_invalid(&m, 5 * cs | 1ull << b, 0, 0);
        expect_invalid(&m, 1ull << b, 0, 0);
    }
}
END_TEST

START_TEST(decode_misaligned)
{
    struct meta m;

    tu_meta_init(&m, NULL, 16, true, false);
    expect_invalid(&m, 0x50200 | COPIED, 0, 0);
    expect_invalid(&m, 0x58000, 0, 0);
    expect_invalid(&m, 0x200 | COPIED, 0, 0);
    /* With 512-byte clusters every sector offset is aligned. */
    tu_meta_init(&m, NULL, 9, true, false);
    expect_kind(&m, 0x50200 | COPIED, 0, 0, CLUSTER_DATA, 0x50200);
    /* 4 KiB clusters. */
    tu_meta_init(&m, NULL, 12, true, false);
    expect_invalid(&m, 0x50200 | COPIED, 0, 0);
    expect_kind(&m, 0x51000 | COPIED, 0, 0, CLUSTER_DATA, 0x51000);
}
END_TEST

START_TEST(decode_compressed)
{
    struct meta m;

    for (unsigned cb = 9; cb <= 21; cb += 4) {
        uint64_t cs = 1ull << cb;
        uint64_t d;

        tu_meta_init(&m, NULL, cb, true, false);
        d = compress_descriptor_encode(0x123400 + 17, cs / 2, cb);
        expect_kind(&m, COMPRESSED | d, 0, 0, CLUSTER_COMPRESSED, 0x123400 + 17);
        /* The descriptor's offset and sector bits are not "reserved": an
         * offset with low bits set and the largest sector count. */
        d = 0x1234567ull | ((1ull << (cb - 8)) - 1) << (62 - (cb - 8));
        expect_kind(&m, COMPRESSED | d, 0, 0, CLUSTER_COMPRESSED, 0x1234567);
        /* COPIED is never set on a compressed cluster. */
        expect_invalid(&m, COMPRESSED | COPIED | d, 0, 0);
    }
    /* Offset bits beyond 55 (only representable with small clusters). */
    tu_meta_init(&m, NULL, 9, true, false);
    expect_invalid(&m, COMPRESSED | 1ull << 56, 0, 0);
    /* No compressed clusters with an external data file. */
    tu_meta_init(&m, NULL, 16, true, false);
    m.has_data_file = true;
    expect_invalid(&m, COMPRESSED | compress_descriptor_encode(0x10000, 100, 16), 0, 0);
}
END_TEST

START_TEST(decode_copied_offset_zero)
{
    struct meta m;

    tu_meta_init(&m, NULL, 16, true, false);
    expect_invalid(&m, COPIED, 0, 0);
    /* With an external data file, offset 0 is real data when COPIED. */
    m.has_data_file = true;
    expect_kind(&m, COPIED, 0, 0, CLUSTER_DATA, 0);
    expect_kind(&m, 0, 0, 0, CLUSTER_UNALLOCATED, 0);
    expect_kind(&m, (1u << 16) | COPIED, 0, 0, CLUSTER_DATA, 1u << 16);
}
END_TEST

START_TEST(decode_extended_l2)
{
    struct meta m;
    const uint64_t cs = 1u << 16;
    const uint64_t host = 9 * cs | COPIED;

    tu_meta_init(&m, NULL, 16, true, true);
    /* alloc bitmap in bits 0..31, zero bitmap in 32..63 */
    for (unsigned sc = 0; sc < 32; sc++) {
        expect_kind(&m, host, 1ull << sc, sc, CLUSTER_DATA, 9 * cs);
        expect_kind(&m, host, 1ull << (32 + sc), sc, CLUSTER_ZERO, 0);
        expect_kind(&m, host, 0, sc, CLUSTER_UNALLOCATED, 0);
        /* Other subclusters' bits do not matter. */
        expect_kind(&m, host, ~(1ull << sc) & 0xffffffffull, sc, CLUSTER_UNALLOCATED, 0);
        expect_kind(&m, host, ~(1ull << sc) & 0xffffffffull, (sc + 1) % 32,
                    CLUSTER_DATA, 9 * cs);
        /* Both bits for the same subcluster: contradictory. */
        expect_invalid(&m, host, 1ull << sc | 1ull << (32 + sc), sc);
        /* Allocated subclusters in an unallocated cluster. */
        expect_invalid(&m, 0, 1ull << sc, sc);
        /* Zero subclusters need no allocation. */
        expect_kind(&m, 0, 1ull << (32 + sc), sc, CLUSTER_ZERO, 0);
        expect_kind(&m, 0, 0, sc, CLUSTER_UNALLOCATED, 0);
    }
    /* Standard-descriptor checks still apply. */
    expect_invalid(&m, 9 * cs | COPIED | 1ull << 3, 1, 0);
    expect_invalid(&m, (9 * cs + 512) | COPIED, 1, 0);
}
END_TEST

/* ---- images in memory ---------------------------------------------------- */

struct img {
    uint8_t *buf;
    size_t len;
    unsigned cb;
    uint64_t cs;
    unsigned ebytes;            /* L2 entry bytes */
};

static void img_init(struct img *im, unsigned cb, bool ext, size_t nb_clusters)
{
    im->cb = cb;
    im->cs = 1ull << cb;
    im->ebytes = ext ? 16 : 8;
    im->len = nb_clusters << cb;
    im->buf = tu_zalloc(im->len);
}

static void l1_set(struct img *im, uint64_t l1_cluster, unsigned idx, uint64_t v)
{
    be64_put(im->buf + (l1_cluster << im->cb) + 8ull * idx, v);
}

static void l2_set(struct img *im, uint64_t l2_cluster, unsigned idx, uint64_t entry,
                   uint64_t bitmap)
{
    uint8_t *p = im->buf + (l2_cluster << im->cb) + (uint64_t)im->ebytes * idx;
    be64_put(p, entry);
    if (im->ebytes == 16)
        be64_put(p + 8, bitmap);
}

/* Host-offset fill so that reads of data clusters can be told apart. */
static void fill_data(struct img *im, uint64_t cluster)
{
    for (uint64_t i = 0; i < im->cs; i++)
        im->buf[(cluster << im->cb) + i] = (uint8_t)(cluster * 3 + i);
}

static struct io *img_io(struct img *im)
{
    struct io *io;
    ck_assert_int_eq(io_open_memory(im->buf, im->len, &io), 0);
    free(im->buf);
    im->buf = NULL;
    return io;
}

/*
 * The slice that @run came from was just used, so it is cached: the shared
 * lookup must find it and give the same run.  (Plain ifs: this runs for
 * every lookup of the walk tests.)
 */
static void same_as_shared(struct cluster *cl, uint64_t off, uint64_t max,
                           const struct cluster_run *run)
{
    struct cluster_run shared;
    int ret;

    memset(&shared, 0x5a, sizeof(shared));
    ret = cluster_lookup_shared(cl, off, max, &shared);
    if (ret != 0)
        ck_abort_msg("shared lookup at 0x%llx returned %d", (unsigned long long)off, ret);
    if (shared.kind != run->kind || shared.bytes != run->bytes ||
        (run->kind == CLUSTER_DATA && shared.host_offset != run->host_offset) ||
        (run->kind == CLUSTER_COMPRESSED && shared.l2_entry != run->l2_entry))
        ck_abort_msg("shared lookup at 0x%llx max %llu: kind %d, %llu bytes, host "
                     "0x%llx; exclusive: kind %d, %llu bytes, host 0x%llx",
                     (unsigned long long)off, (unsigned long long)max, shared.kind,
                     (unsigned long long)shared.bytes,
                     (unsigned long long)shared.host_offset, run->kind,
                     (unsigned long long)run->bytes, (unsigned long long)run->host_offset);
}

static struct cluster_run lookup(struct cluster *cl, uint64_t off, uint64_t max)
{
    struct cluster_run run;
    int ret;

    memset(&run, 0xa5, sizeof(run));
    ret = cluster_lookup(cl, off, max, &run);
    ck_assert_msg(ret == 0, "lookup at 0x%llx returned %d", (unsigned long long)off, ret);
    ck_assert_msg(run.bytes >= 1 && run.bytes <= max,
                  "lookup at 0x%llx max %llu: %llu bytes", (unsigned long long)off,
                  (unsigned long long)max, (unsigned long long)run.bytes);
    same_as_shared(cl, off, max, &run);
    return run;
}

static void expect_run(struct cluster *cl, uint64_t off, uint64_t max,
                       enum cluster_kind kind, uint64_t host, uint64_t bytes)
{
    struct cluster_run r = lookup(cl, off, max);

    ck_assert_msg(r.kind == kind, "lookup 0x%llx: kind %d, expected %d",
                  (unsigned long long)off, r.kind, kind);
    ck_assert_msg(r.bytes == bytes, "lookup 0x%llx: %llu bytes, expected %llu",
                  (unsigned long long)off, (unsigned long long)r.bytes,
                  (unsigned long long)bytes);
    if (kind == CLUSTER_DATA)
        ck_assert_msg(r.host_offset == host, "lookup 0x%llx: host 0x%llx, expected 0x%llx",
                      (unsigned long long)off, (unsigned long long)r.host_offset,
                      (unsigned long long)host);
}

/* Expected state of each unit (cluster or subcluster) for the walk test. */
struct unit_exp {
    enum cluster_kind kind;
    uint64_t host;              /* DATA: host offset of the unit's first byte */
};

/*
 * Walk the whole range with lookups of assorted lengths and check every
 * unit covered by every run against @exp.
 */
static void walk_check(struct cluster *cl, const struct unit_exp *exp, uint64_t nb_units,
                       uint64_t unit, uint64_t cs, uint64_t seed)
{
    uint64_t end = nb_units * unit, off = 0, r = seed;

    while (off < end) {
        uint64_t max;
        struct cluster_run run;

        r = r * 6364136223846793005ull + 1442695040888963407ull;
        switch ((r >> 40) % 4) {
        case 0: max = end - off; break;
        case 1: max = 1 + (r >> 20) % (3 * cs); break;
        case 2: max = 1 + (r >> 20) % 700; break;
        default: max = 1 + (r >> 20) % (64 * cs); break;
        }
        if (max > end - off)
            max = end - off;
        run = lookup(cl, off, max);
        if (run.kind == CLUSTER_COMPRESSED)
            ck_assert_uint_le(run.bytes, cs - off % cs);
        for (uint64_t u = off / unit; u * unit < off + run.bytes; u++) {
            uint64_t from = u * unit > off ? u * unit : off;
            /* (plain ifs: a passing ck_assert costs a message to the
             * parent process, too slow for this many units) */
            if (exp[u].kind != run.kind)
                ck_abort_msg("run at 0x%llx (%llu bytes): unit %llu is kind %d, run says %d",
                             (unsigned long long)off, (unsigned long long)run.bytes,
                             (unsigned long long)u, exp[u].kind, run.kind);
            if (run.kind == CLUSTER_DATA &&
                exp[u].host + (from - u * unit) != run.host_offset + (from - off))
                ck_abort_msg("run at 0x%llx: unit %llu host mismatch",
                             (unsigned long long)off, (unsigned long long)u);
        }
        off += run.bytes;
    }
}

/*
 * Standard image, cluster_bits 12 (512 L2 entries, one slice per table):
 *   cluster 1: L1 (4 entries)   cluster 2: L2 of L1[0]   cluster 3: L2 of L1[2]
 *   data clusters from 16.
 * L1[0] guest clusters:
 *   0-2 data at 16,17,18 (contiguous)   3-4 data at 25,26   5 zero   6 zero
 *   (allocated at 27)   7-8 unallocated   9-10 compressed   11 data at 30
 *   12.. unallocated
 * L1[1] unallocated.  L1[2]: guest cluster 1024+1 data at 40, 1024+2 at 41.
 */
#define STD_CB      12
#define STD_CS      (1ull << STD_CB)
#define STD_L2E     512ull
#define STD_L1SIZE  4u

static uint64_t std_comp_desc(unsigned k)
{
    return compress_descriptor_encode(28 * STD_CS + 100 + 2000 * k, 1000, STD_CB);
}

static struct io *std_image(void)
{
    struct img im;

    img_init(&im, STD_CB, false, 48);
    l1_set(&im, 1, 0, 2 * STD_CS | COPIED);
    l1_set(&im, 1, 2, 3 * STD_CS);
    l2_set(&im, 2, 0, 16 * STD_CS | COPIED, 0);
    l2_set(&im, 2, 1, 17 * STD_CS, 0);
    l2_set(&im, 2, 2, 18 * STD_CS | COPIED, 0);
    l2_set(&im, 2, 3, 25 * STD_CS | COPIED, 0);
    l2_set(&im, 2, 4, 26 * STD_CS | COPIED, 0);
    l2_set(&im, 2, 5, ZEROFLAG, 0);
    l2_set(&im, 2, 6, 27 * STD_CS | COPIED | ZEROFLAG, 0);
    l2_set(&im, 2, 9, COMPRESSED | std_comp_desc(0), 0);
    l2_set(&im, 2, 10, COMPRESSED | std_comp_desc(1), 0);
    l2_set(&im, 2, 11, 30 * STD_CS | COPIED, 0);
    l2_set(&im, 3, 1, 40 * STD_CS | COPIED, 0);
    l2_set(&im, 3, 2, 41 * STD_CS | COPIED, 0);
    for (uint64_t c = 16; c < 48; c++)
        fill_data(&im, c);
    return img_io(&im);
}

static void std_open(struct meta *m, struct io **io, struct cluster **cl)
{
    *io = std_image();
    tu_meta_init(m, *io, STD_CB, true, false);
    m->virtual_size = STD_L1SIZE * STD_L2E * STD_CS;
    ck_assert_int_eq(cluster_open(m, STD_CS, STD_L1SIZE, 1u << 20, cl), 0);
}

START_TEST(open_cache_minimum)
{
    struct meta m;
    struct io *io = std_image();
    struct cluster *cl;

    tu_meta_init(&m, io, STD_CB, true, false);
    ck_assert_int_eq(cluster_open(&m, STD_CS, STD_L1SIZE, 0, &cl), 0);
    ck_assert_ptr_nonnull(cluster_l2_cache(cl));
    ck_assert_uint_ge(cache_nb_entries(cluster_l2_cache(cl)), 16);
    ck_assert_uint_le(cache_table_size(cluster_l2_cache(cl)), 4096);
    /* Works with the minimum cache. */
    expect_run(cl, 0, 1ull << 40, CLUSTER_DATA, 16 * STD_CS, 3 * STD_CS);
    cluster_close(cl);
    io_close(io);
}
END_TEST

START_TEST(lookup_merges_contiguous)
{
    struct meta m;
    struct io *io;
    struct cluster *cl;

    std_open(&m, &io, &cl);
    expect_run(cl, 0, 1ull << 40, CLUSTER_DATA, 16 * STD_CS, 3 * STD_CS);
    /* Stops at the host discontinuity between guest clusters 2 and 3. */
    expect_run(cl, 2 * STD_CS, 1ull << 40, CLUSTER_DATA, 18 * STD_CS, STD_CS);
    expect_run(cl, 3 * STD_CS, 1ull << 40, CLUSTER_DATA, 25 * STD_CS, 2 * STD_CS);
    /* Bounded by max_bytes. */
    expect_run(cl, 0, 5000, CLUSTER_DATA, 16 * STD_CS, 5000);
    expect_run(cl, 0, 1, CLUSTER_DATA, 16 * STD_CS, 1);
    expect_run(cl, 11 * STD_CS, 1ull << 40, CLUSTER_DATA, 30 * STD_CS, STD_CS);
    ck_assert(!meta_is_corrupt(&m));
    cluster_close(cl);
    io_close(io);
}
END_TEST

START_TEST(lookup_mid_cluster)
{
    struct meta m;
    struct io *io;
    struct cluster *cl;

    std_open(&m, &io, &cl);
    expect_run(cl, 100, 1ull << 40, CLUSTER_DATA, 16 * STD_CS + 100, 3 * STD_CS - 100);
    expect_run(cl, STD_CS + 4095, 1ull << 40, CLUSTER_DATA, 17 * STD_CS + 4095,
               STD_CS + 1);
    expect_run(cl, 4 * STD_CS + 7, 10, CLUSTER_DATA, 26 * STD_CS + 7, 10);
    expect_run(cl, 5 * STD_CS + 1, 1ull << 40, CLUSTER_ZERO, 0, 2 * STD_CS - 1);
    expect_run(cl, 1024 * STD_CS + STD_CS + 333, 1ull << 40, CLUSTER_DATA,
               40 * STD_CS + 333, 2 * STD_CS - 333);
    cluster_close(cl);
    io_close(io);
}
END_TEST

START_TEST(lookup_kind_changes)
{
    struct meta m;
    struct io *io;
    struct cluster *cl;

    std_open(&m, &io, &cl);
    /* Data run ends where the zero clusters start. */
    expect_run(cl, 4 * STD_CS, 1ull << 40, CLUSTER_DATA, 26 * STD_CS, STD_CS);
    /* Plain and allocated zero clusters are one zero run. */
    expect_run(cl, 5 * STD_CS, 1ull << 40, CLUSTER_ZERO, 0, 2 * STD_CS);
    /* Unallocated until the compressed cluster. */
    expect_run(cl, 7 * STD_CS, 1ull << 40, CLUSTER_UNALLOCATED, 0, 2 * STD_CS);
    expect_run(cl, 8 * STD_CS + 5, 1ull << 40, CLUSTER_UNALLOCATED, 0, STD_CS - 5);
    /* Unallocated from 12 to the end of the first L2 table. */
    expect_run(cl, 12 * STD_CS, 1ull << 40, CLUSTER_UNALLOCATED, 0,
               (STD_L2E - 12) * STD_CS);
    cluster_close(cl);
    io_close(io);
}
END_TEST

START_TEST(lookup_compressed)
{
    struct meta m;
    struct io *io;
    struct cluster *cl;
    struct cluster_run r;
    uint64_t host, len;

    std_open(&m, &io, &cl);
    for (unsigned k = 0; k < 2; k++) {
        uint64_t g = 9 + k;
        r = lookup(cl, g * STD_CS, 1ull << 40);
        ck_assert_int_eq(r.kind, CLUSTER_COMPRESSED);
        ck_assert_uint_eq(r.bytes, STD_CS);     /* never merged */
        ck_assert_uint_eq(r.l2_entry & ~(COPIED | COMPRESSED), std_comp_desc(k));
        ck_assert_int_eq(compress_descriptor_decode(r.l2_entry & ~(COPIED | COMPRESSED),
                                                    STD_CB, &host, &len), 0);
        ck_assert_uint_eq(host, 28 * STD_CS + 100 + 2000 * k);
        ck_assert_uint_ge(len, 1000);
        /* From the middle: to the end of that cluster. */
        r = lookup(cl, g * STD_CS + 1000, 1ull << 40);
        ck_assert_int_eq(r.kind, CLUSTER_COMPRESSED);
        ck_assert_uint_eq(r.bytes, STD_CS - 1000);
        ck_assert_uint_eq(r.l2_entry & ~(COPIED | COMPRESSED), std_comp_desc(k));
        r = lookup(cl, g * STD_CS + 1000, 10);
        ck_assert_int_eq(r.kind, CLUSTER_COMPRESSED);
        ck_assert_uint_eq(r.bytes, 10);
    }
    cluster_close(cl);
    io_close(io);
}
END_TEST

START_TEST(lookup_unallocated_l1)
{
    struct meta m;
    struct io *io;
    struct cluster *cl;
    const uint64_t table = STD_L2E * STD_CS;

    std_open(&m, &io, &cl);
    expect_run(cl, table, 1ull << 40, CLUSTER_UNALLOCATED, 0, table);
    expect_run(cl, table + 7, 1ull << 40, CLUSTER_UNALLOCATED, 0, table - 7);
    expect_run(cl, table + 12345, 1000, CLUSTER_UNALLOCATED, 0, 1000);
    expect_run(cl, 2 * table - 1, 1ull << 40, CLUSTER_UNALLOCATED, 0, 1);
    /* L1[3] as well: up to the end of the disk. */
    expect_run(cl, 3 * table + STD_CS, 1ull << 40, CLUSTER_UNALLOCATED, 0,
               table - STD_CS);
    /* L1[2] is allocated; its first entry is unallocated. */
    expect_run(cl, 2 * table, 1ull << 40, CLUSTER_UNALLOCATED, 0, STD_CS);
    cluster_close(cl);
    io_close(io);
}
END_TEST

START_TEST(lookup_walk_standard)
{
    struct meta m;
    struct io *io;
    struct cluster *cl;
    uint64_t n = STD_L1SIZE * STD_L2E;
    struct unit_exp *exp = tu_zalloc(n * sizeof(*exp));
    static const struct { uint64_t g; enum cluster_kind k; uint64_t host; } set[] = {
        { 0, CLUSTER_DATA, 16 }, { 1, CLUSTER_DATA, 17 }, { 2, CLUSTER_DATA, 18 },
        { 3, CLUSTER_DATA, 25 }, { 4, CLUSTER_DATA, 26 }, { 5, CLUSTER_ZERO, 0 },
        { 6, CLUSTER_ZERO, 0 }, { 9, CLUSTER_COMPRESSED, 0 },
        { 10, CLUSTER_COMPRESSED, 0 }, { 11, CLUSTER_DATA, 30 },
        { 1025, CLUSTER_DATA, 40 }, { 1026, CLUSTER_DATA, 41 },
    };

    for (uint64_t g = 0; g < n; g++)
        exp[g].kind = CLUSTER_UNALLOCATED;
    for (unsigned i = 0; i < sizeof(set) / sizeof(set[0]); i++) {
        exp[set[i].g].kind = set[i].k;
        exp[set[i].g].host = set[i].host * STD_CS;
    }
    std_open(&m, &io, &cl);
    for (uint64_t seed = 1; seed <= 20; seed++)
        walk_check(cl, exp, n, STD_CS, STD_CS, seed);
    ck_assert(!meta_is_corrupt(&m));
    cluster_close(cl);
    io_close(io);
    free(exp);
}
END_TEST

START_TEST(lookup_get_entry)
{
    struct meta m;
    struct io *io;
    struct cluster *cl;
    uint64_t e, b;

    std_open(&m, &io, &cl);
    ck_assert_int_eq(cluster_get_entry(cl, 3, &e, &b), 0);
    ck_assert_uint_eq(e, 25 * STD_CS | COPIED);
    ck_assert_uint_eq(b, 0);
    ck_assert_int_eq(cluster_get_entry(cl, 9, &e, &b), 0);
    ck_assert_uint_eq(e, COMPRESSED | std_comp_desc(0));
    ck_assert_int_eq(cluster_get_entry(cl, 1026, &e, &b), 0);
    ck_assert_uint_eq(e, 41 * STD_CS | COPIED);
    e = b = 99;
    ck_assert_int_eq(cluster_get_entry(cl, 600, &e, &b), 0);    /* L1[1] empty */
    ck_assert_uint_eq(e, 0);
    ck_assert_uint_eq(b, 0);
    cluster_close(cl);
    io_close(io);
}
END_TEST

/* Corrupt metadata. */

static struct io *corrupt_image(uint64_t l1_0, uint64_t l2_5)
{
    struct img im;

    img_init(&im, STD_CB, false, 8);
    l1_set(&im, 1, 0, l1_0);
    l1_set(&im, 1, 1, 3 * STD_CS | COPIED);
    l2_set(&im, 2, 0, 5 * STD_CS | COPIED, 0);
    l2_set(&im, 2, 5, l2_5, 0);
    l2_set(&im, 3, 0, 6 * STD_CS | COPIED, 0);
    /* A v3 header's incompatible_features: the dirty bit is set. */
    be64_put(im.buf + 72, QCOW2_INCOMPAT_DIRTY);
    return img_io(&im);
}

START_TEST(lookup_corrupt_l2_entry)
{
    static const uint64_t bad[] = {
        6 * STD_CS | COPIED | 1ull << 4,        /* reserved bit */
        6 * STD_CS + 512,                       /* misaligned */
        COPIED,                                 /* COPIED, no offset */
        COMPRESSED | COPIED | 0x10000,          /* compressed + COPIED */
    };

    for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct meta m;
        struct io *io = corrupt_image(2 * STD_CS | COPIED, bad[i]);
        struct cluster *cl;
        struct cluster_run r;

        tu_log_capture();
        tu_meta_init(&m, io, STD_CB, true, false);
        ck_assert_int_eq(cluster_open(&m, STD_CS, 2, 1u << 20, &cl), 0);
        ck_assert(!meta_is_corrupt(&m));
        /* Reaching the bad entry from the start of the table, or directly. */
        ck_assert_int_eq(cluster_lookup(cl, 5 * STD_CS + 10, STD_CS, &r), -EIO);
        ck_assert(meta_is_corrupt(&m));
        ck_assert_uint_eq(tu_log_state()->nb_errors, 1);
        ck_assert_int_eq(cluster_lookup(cl, 5 * STD_CS, 1, &r), -EIO);
        /* Reported once. */
        ck_assert_uint_eq(tu_log_state()->nb_errors, 1);
        /* The entries before it still translate. */
        r = lookup(cl, 0, STD_CS);
        ck_assert_int_eq(r.kind, CLUSTER_DATA);
        ck_assert_uint_eq(r.host_offset, 5 * STD_CS);
        tu_log_release();
        cluster_close(cl);
        io_close(io);
    }
}
END_TEST

START_TEST(lookup_corrupt_run_stops_before)
{
    /* A run from a good cluster towards a corrupt one either stops before
     * it or fails: it never reports the corrupt cluster as data. */
    struct meta m;
    struct io *io = corrupt_image(2 * STD_CS | COPIED, 6 * STD_CS | 1ull << 60);
    struct cluster *cl;
    struct cluster_run r;
    int ret;

    tu_log_capture();
    tu_meta_init(&m, io, STD_CB, true, false);
    ck_assert_int_eq(cluster_open(&m, STD_CS, 2, 1u << 20, &cl), 0);
    ret = cluster_lookup(cl, 1 * STD_CS, 10 * STD_CS, &r);
    if (ret == 0) {
        ck_assert_int_eq(r.kind, CLUSTER_UNALLOCATED);
        ck_assert_uint_le(r.bytes, 4 * STD_CS);
    } else {
        ck_assert_int_eq(ret, -EIO);
    }
    tu_log_release();
    cluster_close(cl);
    io_close(io);
}
END_TEST

START_TEST(lookup_corrupt_l1_entry)
{
    static const uint64_t bad[] = {
        2 * STD_CS | COPIED | 1ull << 60,       /* reserved bit */
        2 * STD_CS | COPIED | 1,                /* reserved bit 0 */
        2 * STD_CS + 512,                       /* misaligned */
    };

    for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct meta m;
        struct io *io = corrupt_image(bad[i], 0);
        struct cluster *cl;
        struct cluster_run r;
        int ret;

        tu_log_capture();
        tu_meta_init(&m, io, STD_CB, true, false);
        ret = cluster_open(&m, STD_CS, 2, 1u << 20, &cl);
        if (ret == 0) {
            ck_assert_int_eq(cluster_lookup(cl, 0, STD_CS, &r), -EIO);
            /* The other L1 entry is fine. */
            r = lookup(cl, STD_L2E * STD_CS, STD_CS);
            ck_assert_int_eq(r.kind, CLUSTER_DATA);
            ck_assert_uint_eq(r.host_offset, 6 * STD_CS);
            cluster_close(cl);
        } else {
            /* cluster.h allows rejecting a bad L1 at open. */
            ck_assert_int_eq(ret, -EIO);
        }
        ck_assert(meta_is_corrupt(&m));
        ck_assert_uint_eq(tu_log_state()->nb_errors, 1);
        tu_log_release();
        io_close(io);
    }
}
END_TEST

START_TEST(corrupt_sets_header_bit)
{
    /* On a writable v3 image the corrupt bit is recorded in the header; on
     * a read-only one, or a v2 one (no feature bits: bytes 72.. belong to
     * the extensions), the file is left alone. */
    static const struct { bool writable, v3, sets; } cases[] = {
        { false, true, false }, { true, true, true }, { true, false, false },
    };

    for (unsigned i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct meta m;
        struct io *io = corrupt_image(2 * STD_CS | COPIED, 6 * STD_CS | 1ull << 2);
        struct cluster *cl;
        struct cluster_run r;
        size_t len;

        tu_log_capture();
        tu_meta_init(&m, io, STD_CB, cases[i].v3, false);
        m.read_only = !cases[i].writable;
        m.incompatible = cases[i].v3 ? QCOW2_INCOMPAT_DIRTY : 0;
        ck_assert_int_eq(cluster_open(&m, STD_CS, 2, 1u << 20, &cl), 0);
        ck_assert_int_eq(cluster_lookup(cl, 5 * STD_CS, STD_CS, &r), -EIO);
        ck_assert(meta_is_corrupt(&m));
        ck_assert_uint_eq(tu_log_state()->nb_errors, 1);
        ck_assert_uint_eq(be64_get(io_memory_data(io, &len) + 72),
                          QCOW2_INCOMPAT_DIRTY |
                          (cases[i].sets ? QCOW2_INCOMPAT_CORRUPT : 0));
        tu_log_release();
        cluster_close(cl);
        io_close(io);
    }
}
END_TEST

/* External data file: offset 0 is real. */

START_TEST(lookup_data_file)
{
    struct img im;
    struct meta m;
    struct io *io, *data;
    struct cluster *cl;

    img_init(&im, STD_CB, false, 4);
    l1_set(&im, 1, 0, 2 * STD_CS | COPIED);
    l2_set(&im, 2, 0, 0 | COPIED, 0);
    l2_set(&im, 2, 1, STD_CS | COPIED, 0);
    l2_set(&im, 2, 2, 0, 0);
    l2_set(&im, 2, 3, 3 * STD_CS | COPIED, 0);
    io = img_io(&im);
    ck_assert_int_eq(io_open_memory(NULL, 0, &data), 0);
    tu_meta_init(&m, io, STD_CB, true, false);
    m.data_io = data;
    m.has_data_file = true;
    m.incompatible = QCOW2_INCOMPAT_DATA_FILE;
    ck_assert_int_eq(cluster_open(&m, STD_CS, 1, 1u << 20, &cl), 0);
    expect_run(cl, 0, 1ull << 40, CLUSTER_DATA, 0, 2 * STD_CS);
    expect_run(cl, 10, 1ull << 40, CLUSTER_DATA, 10, 2 * STD_CS - 10);
    expect_run(cl, 2 * STD_CS, 1ull << 40, CLUSTER_UNALLOCATED, 0, STD_CS);
    expect_run(cl, 3 * STD_CS, 1ull << 40, CLUSTER_DATA, 3 * STD_CS, STD_CS);
    ck_assert(!meta_is_corrupt(&m));
    cluster_close(cl);
    io_close(io);
    io_close(data);
}
END_TEST

/* Lookups under the shared lock: only what is cached, nothing reported. */

START_TEST(lookup_shared_needs_cached_slice)
{
    struct meta m;
    struct io *io;
    struct cluster *cl;
    struct cluster_run r;
    struct cache_stats st, st2;

    std_open(&m, &io, &cl);
    cache_get_stats(cluster_l2_cache(cl), &st);
    /* Not cached yet: no read, the caller must take the lock exclusively. */
    ck_assert_int_eq(cluster_lookup_shared(cl, STD_CS, STD_CS, &r), -EAGAIN);
    ck_assert_int_eq(cluster_lookup_shared(cl, 1025 * STD_CS, STD_CS, &r), -EAGAIN);
    cache_get_stats(cluster_l2_cache(cl), &st2);
    ck_assert_uint_eq(st2.misses, st.misses);
    ck_assert_uint_eq(st2.hits, st.hits);
    /* An unallocated L2 table needs no slice. */
    ck_assert_int_eq(cluster_lookup_shared(cl, 600 * STD_CS, STD_CS, &r), 0);
    ck_assert_int_eq(r.kind, CLUSTER_UNALLOCATED);
    ck_assert_uint_eq(r.bytes, STD_CS);
    /* Once the exclusive lookup has read the slice, the shared one hits
     * (and counts as a hit). */
    expect_run(cl, STD_CS, STD_CS, CLUSTER_DATA, 17 * STD_CS, STD_CS);
    cache_get_stats(cluster_l2_cache(cl), &st);
    ck_assert_int_eq(cluster_lookup_shared(cl, 3 * STD_CS + 7, 1ull << 40, &r), 0);
    ck_assert_int_eq(r.kind, CLUSTER_DATA);
    ck_assert_uint_eq(r.host_offset, 25 * STD_CS + 7);
    ck_assert_uint_eq(r.bytes, 2 * STD_CS - 7);
    cache_get_stats(cluster_l2_cache(cl), &st2);
    ck_assert_uint_eq(st2.hits, st.hits + 1);
    /* Still only L1[0]'s table is cached. */
    ck_assert_int_eq(cluster_lookup_shared(cl, 1025 * STD_CS, STD_CS, &r), -EAGAIN);
    ck_assert(!meta_is_corrupt(&m));
    cluster_close(cl);
    io_close(io);
}
END_TEST

START_TEST(lookup_shared_leaves_corruption_to_exclusive)
{
    /* A corrupt entry met under the shared lock is not reported there (that
     * changes state); the exclusive lookup the caller falls back to does. */
    struct meta m;
    struct io *io = corrupt_image(2 * STD_CS | COPIED, 6 * STD_CS + 512);
    struct cluster *cl;
    struct cluster_run r;

    tu_log_capture();
    tu_meta_init(&m, io, STD_CB, true, false);
    ck_assert_int_eq(cluster_open(&m, STD_CS, 2, 1u << 20, &cl), 0);
    r = lookup(cl, 0, STD_CS);                  /* caches the slice */
    ck_assert_int_eq(r.kind, CLUSTER_DATA);
    ck_assert_int_eq(cluster_lookup_shared(cl, 5 * STD_CS, STD_CS, &r), -EAGAIN);
    ck_assert_int_eq(cluster_lookup_shared(cl, 4 * STD_CS, 2 * STD_CS, &r), 0);
    ck_assert_int_eq(r.kind, CLUSTER_UNALLOCATED);
    ck_assert_uint_eq(r.bytes, STD_CS);         /* stops before the bad entry */
    ck_assert(!meta_is_corrupt(&m));
    ck_assert_uint_eq(tu_log_state()->nb_errors, 0);
    ck_assert_int_eq(cluster_lookup(cl, 5 * STD_CS, STD_CS, &r), -EIO);
    ck_assert(meta_is_corrupt(&m));
    ck_assert_uint_eq(tu_log_state()->nb_errors, 1);
    tu_log_release();
    cluster_close(cl);
    io_close(io);

    /* The same for a bad L1 entry. */
    io = corrupt_image(2 * STD_CS | COPIED | 1ull << 60, 0);
    tu_log_capture();
    tu_meta_init(&m, io, STD_CB, true, false);
    if (cluster_open(&m, STD_CS, 2, 1u << 20, &cl) == 0) {
        ck_assert_int_eq(cluster_lookup_shared(cl, 0, STD_CS, &r), -EAGAIN);
        ck_assert(!meta_is_corrupt(&m));
        ck_assert_int_eq(cluster_lookup(cl, 0, STD_CS, &r), -EIO);
        ck_assert(meta_is_corrupt(&m));
        cluster_close(cl);
    }
    tu_log_release();
    io_close(io);
}
END_TEST

/* Large clusters: L2 tables are cached in slices. */

START_TEST(lookup_slices)
{
    /* cluster_bits 16: 8192 entries per table, 512 per 4 KiB slice. */
    const unsigned cb = 16;
    const uint64_t cs = 1ull << cb;
    struct img im;
    struct meta m;
    struct io *io;
    struct cluster *cl;
    static const uint64_t gs[] = { 0, 511, 512, 600, 1023, 1024, 5000, 8191 };

    img_init(&im, cb, false, 4);
    l1_set(&im, 1, 0, 2 * cs | COPIED);
    for (unsigned i = 0; i < sizeof(gs) / sizeof(gs[0]); i++)
        l2_set(&im, 2, (unsigned)gs[i], (100 + gs[i]) * cs | COPIED, 0);
    io = img_io(&im);
    tu_meta_init(&m, io, cb, true, false);
    m.virtual_size = 8192 * cs;
    ck_assert_int_eq(cluster_open(&m, cs, 1, 0, &cl), 0);
    for (unsigned i = 0; i < sizeof(gs) / sizeof(gs[0]); i++) {
        struct cluster_run r = lookup(cl, gs[i] * cs + 3, cs - 3);
        ck_assert_int_eq(r.kind, CLUSTER_DATA);
        ck_assert_uint_eq(r.host_offset, (100 + gs[i]) * cs + 3);
        ck_assert_uint_eq(r.bytes, cs - 3);
        r = lookup(cl, gs[i] * cs + cs / 2, 1ull << 40);
        ck_assert_int_eq(r.kind, CLUSTER_DATA);
        ck_assert_uint_eq(r.host_offset, (100 + gs[i]) * cs + cs / 2);
        ck_assert_uint_ge(r.bytes, cs / 2);
    }
    /* 511 and 512 are contiguous on the host; a run may merge them or stop
     * at the slice boundary, but must not get the host offset wrong. */
    {
        struct cluster_run r = lookup(cl, 511 * cs, 2 * cs);
        ck_assert_int_eq(r.kind, CLUSTER_DATA);
        ck_assert_uint_eq(r.host_offset, 611 * cs);
        ck_assert(r.bytes == cs || r.bytes == 2 * cs);
    }
    /* Unallocated between them. */
    expect_run(cl, 601 * cs, 422 * cs, CLUSTER_UNALLOCATED, 0, 422 * cs);
    cluster_close(cl);
    io_close(io);
}
END_TEST

/* Extended L2 entries. */

#define EXT_CB      14
#define EXT_CS      (1ull << EXT_CB)
#define EXT_SC      (EXT_CS / 32)
#define EXT_L2E     1024ull

static uint64_t alloc_bits(unsigned from, unsigned to)   /* [from, to) */
{
    uint64_t b = 0;
    for (unsigned i = from; i < to; i++)
        b |= 1ull << i;
    return b;
}

static struct io *ext_image(void)
{
    struct img im;

    img_init(&im, EXT_CB, true, 16);
    l1_set(&im, 1, 0, 2 * EXT_CS | COPIED);
    /* g0: sc 0-3 data, 4-5 zero, rest unallocated */
    l2_set(&im, 2, 0, 8 * EXT_CS | COPIED, alloc_bits(0, 4) | alloc_bits(4, 6) << 32);
    /* g1: all data */
    l2_set(&im, 2, 1, 9 * EXT_CS | COPIED, alloc_bits(0, 32));
    /* g2: sc 28-31 data; g3 all data, contiguous with it */
    l2_set(&im, 2, 2, 10 * EXT_CS | COPIED, alloc_bits(28, 32));
    l2_set(&im, 2, 3, 11 * EXT_CS | COPIED, alloc_bits(0, 32));
    /* g4: unallocated, all zero; g5: unallocated */
    l2_set(&im, 2, 4, 0, alloc_bits(0, 32) << 32);
    /* g6: alternating data / unallocated subclusters */
    l2_set(&im, 2, 6, 12 * EXT_CS | COPIED, 0x5555555555555555ull & 0xffffffffull);
    /* g300: in the second 4 KiB slice of the table */
    l2_set(&im, 2, 300, 13 * EXT_CS | COPIED, alloc_bits(0, 32));
    return img_io(&im);
}

START_TEST(lookup_extended_l2)
{
    struct meta m;
    struct io *io = ext_image();
    struct cluster *cl;
    struct cluster_run r;

    tu_meta_init(&m, io, EXT_CB, true, true);
    m.virtual_size = EXT_L2E * EXT_CS;
    ck_assert_int_eq(cluster_open(&m, EXT_CS, 1, 1u << 20, &cl), 0);

    expect_run(cl, 0, 1ull << 40, CLUSTER_DATA, 8 * EXT_CS, 4 * EXT_SC);
    expect_run(cl, 100, 1ull << 40, CLUSTER_DATA, 8 * EXT_CS + 100, 4 * EXT_SC - 100);
    expect_run(cl, 4 * EXT_SC, 1ull << 40, CLUSTER_ZERO, 0, 2 * EXT_SC);
    expect_run(cl, 5 * EXT_SC + 1, 1ull << 40, CLUSTER_ZERO, 0, EXT_SC - 1);
    expect_run(cl, 6 * EXT_SC, 1ull << 40, CLUSTER_UNALLOCATED, 0, EXT_CS - 6 * EXT_SC);
    expect_run(cl, EXT_CS, 1ull << 40, CLUSTER_DATA, 9 * EXT_CS, EXT_CS);
    expect_run(cl, EXT_CS + 17 * EXT_SC + 5, 1ull << 40, CLUSTER_DATA,
               9 * EXT_CS + 17 * EXT_SC + 5, 15 * EXT_SC - 5);
    /* g2 sc 0-27 unallocated, then data contiguous into g3. */
    expect_run(cl, 2 * EXT_CS, 1ull << 40, CLUSTER_UNALLOCATED, 0, 28 * EXT_SC);
    expect_run(cl, 2 * EXT_CS + 28 * EXT_SC, 1ull << 40, CLUSTER_DATA,
               10 * EXT_CS + 28 * EXT_SC, 4 * EXT_SC + EXT_CS);
    expect_run(cl, 4 * EXT_CS, 1ull << 40, CLUSTER_ZERO, 0, EXT_CS);
    /* Alternating subclusters: one subcluster per run. */
    for (unsigned sc = 0; sc < 32; sc++) {
        r = lookup(cl, 6 * EXT_CS + sc * EXT_SC, 1ull << 40);
        if (sc % 2 == 0) {
            ck_assert_int_eq(r.kind, CLUSTER_DATA);
            ck_assert_uint_eq(r.host_offset, 12 * EXT_CS + sc * EXT_SC);
            ck_assert_uint_eq(r.bytes, EXT_SC);
        } else {
            ck_assert_int_eq(r.kind, CLUSTER_UNALLOCATED);
            if (sc < 31)
                ck_assert_uint_eq(r.bytes, EXT_SC);
        }
    }
    expect_run(cl, 300 * EXT_CS + 1, 1ull << 40, CLUSTER_DATA, 13 * EXT_CS + 1,
               EXT_CS - 1);
    ck_assert(!meta_is_corrupt(&m));
    cluster_close(cl);
    io_close(io);
}
END_TEST

START_TEST(lookup_walk_extended_l2)
{
    struct meta m;
    struct io *io = ext_image();
    struct cluster *cl;
    uint64_t n = EXT_L2E * 32;
    struct unit_exp *exp = tu_zalloc(n * sizeof(*exp));

    for (uint64_t u = 0; u < n; u++)
        exp[u].kind = CLUSTER_UNALLOCATED;
    for (unsigned sc = 0; sc < 32; sc++) {
        if (sc < 4)
            exp[sc] = (struct unit_exp){ CLUSTER_DATA, 8 * EXT_CS + sc * EXT_SC };
        else if (sc < 6)
            exp[sc].kind = CLUSTER_ZERO;
        exp[32 + sc] = (struct unit_exp){ CLUSTER_DATA, 9 * EXT_CS + sc * EXT_SC };
        if (sc >= 28)
            exp[64 + sc] = (struct unit_exp){ CLUSTER_DATA, 10 * EXT_CS + sc * EXT_SC };
        exp[96 + sc] = (struct unit_exp){ CLUSTER_DATA, 11 * EXT_CS + sc * EXT_SC };
        exp[128 + sc].kind = CLUSTER_ZERO;
        if (sc % 2 == 0)
            exp[192 + sc] = (struct unit_exp){ CLUSTER_DATA, 12 * EXT_CS + sc * EXT_SC };
        exp[300 * 32 + sc] = (struct unit_exp){ CLUSTER_DATA, 13 * EXT_CS + sc * EXT_SC };
    }
    tu_meta_init(&m, io, EXT_CB, true, true);
    m.virtual_size = EXT_L2E * EXT_CS;
    ck_assert_int_eq(cluster_open(&m, EXT_CS, 1, 1u << 20, &cl), 0);
    for (uint64_t seed = 1; seed <= 10; seed++)
        walk_check(cl, exp, n, EXT_SC, EXT_CS, seed);
    ck_assert(!meta_is_corrupt(&m));
    cluster_close(cl);
    io_close(io);
    free(exp);
}
END_TEST

START_TEST(lookup_extended_l2_corrupt)
{
    struct img im;
    struct meta m;
    struct io *io;
    struct cluster *cl;
    struct cluster_run r;

    tu_log_capture();
    img_init(&im, EXT_CB, true, 8);
    l1_set(&im, 1, 0, 2 * EXT_CS | COPIED);
    l2_set(&im, 2, 0, 4 * EXT_CS | COPIED, 1 | 1ull << 32);      /* both bits */
    l2_set(&im, 2, 1, 0, 1ull << 5);                             /* alloc, no host */
    io = img_io(&im);
    tu_meta_init(&m, io, EXT_CB, true, true);
    ck_assert_int_eq(cluster_open(&m, EXT_CS, 1, 1u << 20, &cl), 0);
    ck_assert_int_eq(cluster_lookup(cl, 0, EXT_CS, &r), -EIO);
    ck_assert(meta_is_corrupt(&m));
    ck_assert_int_eq(cluster_lookup(cl, EXT_CS + 5 * EXT_SC, EXT_SC, &r), -EIO);
    ck_assert_uint_eq(tu_log_state()->nb_errors, 1);
    tu_log_release();
    cluster_close(cl);
    io_close(io);
}
END_TEST

/* ---- cluster_check_old_entry ------------------------------------------------ */

struct extent {
    int ret;
    uint64_t host, len;
};

static struct extent old_extent(struct cluster *cl, uint64_t gc, uint64_t entry)
{
    struct extent e = { .host = 0xdeadbeef, .len = 0xdeadbeef };

    e.ret = cluster_check_old_entry(cl, gc, entry, 0, &e.host, &e.len);
    return e;
}

static void expect_extent(struct cluster *cl, uint64_t entry, uint64_t host, uint64_t len)
{
    struct extent e = old_extent(cl, 3, entry);

    ck_assert_msg(e.ret == 0, "entry 0x%016llx: %d", (unsigned long long)entry, e.ret);
    ck_assert_uint_eq(e.host, host);
    ck_assert_uint_eq(e.len, len);
}

static void expect_refused(struct meta *m, struct cluster *cl, uint64_t entry,
                           const char *why)
{
    struct extent e;

    tu_log_capture();
    e = old_extent(cl, 3, entry);
    tu_log_release();
    ck_assert_msg(e.ret == -EIO, "entry 0x%016llx: %d, not -EIO", (unsigned long long)entry,
                  e.ret);
    ck_assert_uint_eq(e.host, 0);       /* nothing to free */
    ck_assert_uint_eq(e.len, 0);
    ck_assert(meta_is_corrupt(m));
    ck_assert_msg(strstr(tu_log_state()->last, why), "report \"%s\" lacks \"%s\"",
                  tu_log_state()->last, why);
    ck_assert_msg(strstr(tu_log_state()->last, "guest offset 0x3000"),
                  "report \"%s\" lacks the guest offset", tu_log_state()->last);
    /* Only the first report is logged: start the next one afresh. */
    atomic_store(&m->corrupt, false);
    atomic_flag_clear(&m->corrupt_reported);
}

/*
 * The host extent an entry about to be replaced holds: the whole cluster of
 * a data or allocated zero cluster, the 512-byte sectors of compressed data
 * (what its refcounts cover), nothing for unallocated and plain zero
 * clusters or an external data file.  Entries that do not decode, reach past
 * the file's end or name a metadata cluster (also with only their last
 * compressed sector) are reported and give nothing to free.
 */
START_TEST(old_entry_extent)
{
    struct meta m;
    struct io *io;
    struct cluster *cl;
    uint64_t off = 28 * STD_CS + 100, sectors;

    std_open(&m, &io, &cl);
    m.file_end = 48 * STD_CS;
    ck_assert_int_eq(meta_set_create(&m), 0);
    ck_assert_int_eq(meta_mark(&m, 2 * STD_CS, STD_CS, META_KIND_L2), 0);
    ck_assert_int_eq(meta_mark(&m, 46 * STD_CS, STD_CS, META_KIND_REFBLOCK), 0);

    expect_extent(cl, 16 * STD_CS | COPIED, 16 * STD_CS, STD_CS);
    expect_extent(cl, 17 * STD_CS, 17 * STD_CS, STD_CS);
    expect_extent(cl, 27 * STD_CS | COPIED | ZEROFLAG, 27 * STD_CS, STD_CS);
    expect_extent(cl, ZEROFLAG, 0, 0);
    expect_extent(cl, 0, 0, 0);
    sectors = (off + 999) / 512 - off / 512 + 1;
    expect_extent(cl, COMPRESSED | std_comp_desc(0), off & ~511ull, sectors * 512);
    /* Three sectors across the end of host cluster 44 into 45. */
    expect_extent(cl, COMPRESSED | compress_descriptor_encode(45 * STD_CS - 1024, 1400, STD_CB),
                  45 * STD_CS - 1024, 1536);
    ck_assert(!meta_is_corrupt(&m));

    expect_refused(&m, cl, (16 * STD_CS + 512) | COPIED, "not aligned");
    expect_refused(&m, cl, 2 * STD_CS | COPIED, "L2 table");
    expect_refused(&m, cl, 46 * STD_CS, "refcount block");
    expect_refused(&m, cl, COMPRESSED | compress_descriptor_encode(46 * STD_CS - 512, 600, STD_CB),
                   "refcount block");
    expect_refused(&m, cl, COMPRESSED | compress_descriptor_encode(48 * STD_CS - 512, 600, STD_CB),
                   "past the end");
    expect_refused(&m, cl, 50 * STD_CS | COPIED, "past the end");
    expect_refused(&m, cl, COMPRESSED | COPIED | std_comp_desc(0), "COPIED");

    /* With an external data file the image file holds no guest data. */
    m.has_data_file = true;
    expect_extent(cl, 16 * STD_CS | COPIED, 0, 0);
    expect_extent(cl, COPIED, 0, 0);
    m.has_data_file = false;

    meta_set_destroy(&m);
    cluster_close(cl);
    io_close(io);
}
END_TEST

/* ---- write side: ordering of an evicted L2 slice ------------------------- */

/*
 * Two memory files (the image and an external data file) whose writes and
 * flushes go into one shared event log, so a test can tell which file was
 * flushed before which write.
 */
enum { EV_IMAGE, EV_DATA };

struct seq_event {
    int file;                   /* EV_IMAGE or EV_DATA */
    uint32_t type;              /* IO_TRACE_WRITE or IO_TRACE_FLUSH */
    uint64_t offset;
};

struct seq_log {
    struct seq_event ev[4096];
    unsigned nb;
};

struct seq_io {
    struct tu_fwd_io fwd;
    struct seq_log *log;
    int file;
};

static void seq_record(struct io *io, uint32_t type, uint64_t offset)
{
    struct seq_io *s = (struct seq_io *)io;

    ck_assert_uint_lt(s->log->nb, sizeof(s->log->ev) / sizeof(s->log->ev[0]));
    s->log->ev[s->log->nb++] = (struct seq_event){ s->file, type, offset };
}

static int seq_pwrite(struct io *io, const void *buf, size_t len, uint64_t off)
{
    seq_record(io, IO_TRACE_WRITE, off);
    return tu_fwd_pwrite(io, buf, len, off);
}

static int seq_flush(struct io *io)
{
    seq_record(io, IO_TRACE_FLUSH, 0);
    return tu_fwd_flush(io);
}

static void seq_close(struct io *io)
{
    io_close(tu_fwd_inner(io));
    free(io);
}

static const struct io_ops seq_ops = {
    .pread = tu_fwd_pread,
    .pwrite = seq_pwrite,
    .flush = seq_flush,
    .get_size = tu_fwd_get_size,
    .truncate = tu_fwd_truncate,
    .punch_hole = tu_fwd_punch,
    .close = seq_close,
};

static struct io *seq_io_new(struct io *inner, struct seq_log *log, int file)
{
    struct seq_io *s = tu_zalloc(sizeof(*s));

    s->fwd.io.ops = &seq_ops;
    s->fwd.inner = inner;
    s->log = log;
    s->file = file;
    return &s->fwd.io;
}

static int seq_find(const struct seq_log *log, int file, uint32_t type,
                    uint64_t offset)
{
    for (unsigned i = 0; i < log->nb; i++)
        if (log->ev[i].file == file && log->ev[i].type == type &&
            (type != IO_TRACE_WRITE || log->ev[i].offset == offset))
            return (int)i;
    return -1;
}

/* 20 L2 tables (clusters 2..21) behind an L1 at cluster 1, a refcount table
 * at cluster 22 naming a block at cluster 23: enough tables to overflow the
 * minimum L2 cache of 16 slices. */
#define EVICT_L2S   20u

static struct io *evict_image(void)
{
    struct img im;

    img_init(&im, STD_CB, false, 24);
    for (unsigned i = 0; i < EVICT_L2S; i++)
        l1_set(&im, 1, i, (2 + i) * STD_CS | COPIED);
    be64_put(im.buf + 22 * STD_CS, 23 * STD_CS);
    return img_io(&im);
}

START_TEST(evicted_l2_waits_for_data_file_flush)
{
    /* An L2 entry that makes new guest data in the external data file
     * visible may reach the disk only after that data does: when the L2
     * cache evicts the dirty slice to make room, the data file is flushed
     * before the slice is written. */
    struct seq_log *log = tu_zalloc(sizeof(*log));
    struct io *mem_data, *io, *data;
    struct meta m;
    struct cluster *cl;
    struct refcount *rc;
    struct cluster_run r;
    uint8_t buf[STD_CS];
    int i_data_write, i_l2_write, i_data_flush;

    ck_assert_int_eq(io_open_memory(NULL, 0, &mem_data), 0);
    io = seq_io_new(evict_image(), log, EV_IMAGE);
    data = seq_io_new(mem_data, log, EV_DATA);
    tu_meta_init(&m, io, STD_CB, true, false);
    m.read_only = false;
    m.data_io = data;
    m.has_data_file = true;
    m.incompatible = QCOW2_INCOMPAT_DATA_FILE;
    m.virtual_size = EVICT_L2S * STD_L2E * STD_CS;
    ck_assert_int_eq(cluster_open(&m, STD_CS, EVICT_L2S, 0, &cl), 0);
    ck_assert_int_eq(refcount_open(&m, 22 * STD_CS, 1, 0, &rc), 0);
    ck_assert_int_eq(cluster_set_refcount(cl, rc), 0);

    /* Guest cluster 0: its data written to the data file, then its entry. */
    memset(buf, 0x5a, sizeof(buf));
    ck_assert_int_eq(io_pwrite(data, buf, sizeof(buf), 7 * STD_CS), 0);
    ck_assert_int_eq(cluster_set_entry(cl, 0, 7 * STD_CS | COPIED, 0, true), 0);

    /* Other tables push the dirty slice out of the cache. */
    for (unsigned t = 1; t < EVICT_L2S; t++)
        ck_assert_int_eq(cluster_lookup(cl, (uint64_t)t * STD_L2E * STD_CS,
                                        STD_CS, &r), 0);

    i_data_write = seq_find(log, EV_DATA, IO_TRACE_WRITE, 7 * STD_CS);
    i_l2_write = seq_find(log, EV_IMAGE, IO_TRACE_WRITE, 2 * STD_CS);
    i_data_flush = seq_find(log, EV_DATA, IO_TRACE_FLUSH, 0);
    ck_assert_int_ge(i_data_write, 0);
    ck_assert_msg(i_l2_write >= 0, "the dirty L2 slice was not evicted");
    ck_assert_msg(i_data_flush >= 0 && i_data_flush < i_l2_write,
                  "the L2 slice (event %d) was written before any flush of "
                  "the data file (event %d)", i_l2_write, i_data_flush);
    ck_assert_int_gt(i_data_flush, i_data_write);

    refcount_close(rc);
    cluster_close(cl);
    io_close(io);
    io_close(data);
    free(log);
}
END_TEST

/* ---- write side: prepare_l2, set_entry, grow_l1 ----------------------- */

/*
 * A whole v3 image with 4 KiB clusters, 16-bit refcounts and one internal
 * snapshot, so that every refcount can be judged by check_count_refs /
 * check_compare afterwards:
 *
 *   0 header  1 refcount table  2 refcount block  3 active L1 (3 entries)
 *   4 L2 table shared with the snapshot (L1[0], COPIED clear, refcount 2):
 *     entry 0 -> data cluster 7 (refcount 2, COPIED clear)
 *   5 the snapshot's L1 (1 entry -> 4)   6 the snapshot table
 *   8 L2 table of L1[1] (COPIED, refcount 1): entry 0 -> data 9 (COPIED)
 *   L1[2] empty
 *  10 free (refcount 0) and full of garbage: the first cluster a new
 *     table gets, so a table that is not written out reads as garbage
 */
#define W_CLUSTERS  11u
#define W_L1SIZE    3u
#define W_GARBAGE   0xa5

static const uint64_t w_refs[W_CLUSTERS] = { 1, 1, 1, 1, 2, 1, 1, 2, 1, 1, 0 };

static struct io *write_image(bool l1_copied)
{
    struct img im;
    struct tu_hdr th = tu_hdr_default(3, STD_CB);
    uint8_t *e;

    img_init(&im, STD_CB, false, W_CLUSTERS);
    th.size = W_L1SIZE * STD_L2E * STD_CS;
    th.l1_size = W_L1SIZE;
    th.nb_snapshots = 1;
    th.snapshots_offset = 6 * STD_CS;
    tu_hdr_write(im.buf, &th);
    be64_put(im.buf + STD_CS, 2 * STD_CS);
    for (unsigned c = 0; c < W_CLUSTERS; c++)
        refcount_entry_set(4, im.buf + 2 * STD_CS, c, w_refs[c]);
    l1_set(&im, 3, 0, 4 * STD_CS);
    l1_set(&im, 3, 1, 8 * STD_CS | (l1_copied ? COPIED : 0));
    l2_set(&im, 4, 0, 7 * STD_CS, 0);
    l1_set(&im, 5, 0, 4 * STD_CS);
    e = im.buf + 6 * STD_CS;
    be64_put(e, 5 * STD_CS);                    /* the snapshot's L1 */
    be32_put(e + 8, 1);
    be16_put(e + 12, 1);                        /* id "1" */
    be16_put(e + 14, 4);                        /* name "snap" */
    be32_put(e + 36, 16);                       /* extra: vm state, disk size */
    be64_put(e + 48, STD_L2E * STD_CS);
    memcpy(e + 56, "1snap", 5);
    fill_data(&im, 7);
    l2_set(&im, 8, 0, 9 * STD_CS | COPIED, 0);
    fill_data(&im, 9);
    memset(im.buf + 10 * STD_CS, W_GARBAGE, STD_CS);
    return img_io(&im);
}

/* A writable image open at the cluster level, as image.c's open does it. */
struct wfx {
    struct seq_log *log;
    struct io *mem;             /* the memory file under @io */
    struct io *io;              /* records writes and flushes into @log */
    struct qcow2_header h;
    struct meta m;
    struct cluster *cl;
    struct refcount *rc;
};

static const uint8_t *wfx_disk(struct wfx *f, uint64_t off, uint64_t len)
{
    size_t n;
    const uint8_t *p = io_memory_data(f->mem, &n);

    ck_assert_msg(off + len <= n, "0x%llx..+%llu lies past the file's end 0x%zx",
                  (unsigned long long)off, (unsigned long long)len, n);
    return p + off;
}

static uint64_t wfx_disk64(struct wfx *f, uint64_t off)
{
    return be64_get(wfx_disk(f, off, 8));
}

/* Open @mem, an image of @cs-byte clusters, for writing. */
static void wfx_open(struct wfx *f, struct io *mem, uint64_t cs)
{
    const uint8_t *p;
    char err[256];
    size_t n;

    memset(f, 0, sizeof(*f));
    f->log = tu_zalloc(sizeof(*f->log));
    f->mem = mem;
    f->io = seq_io_new(mem, f->log, EV_IMAGE);
    p = io_memory_data(mem, &n);
    ck_assert_msg(header_decode(p, cs, n, &f->h, err, sizeof(err)) == 0, "header: %s",
                  err);
    meta_init(&f->m, &f->h, f->io, false);
    ck_assert_int_eq(meta_set_create(&f->m), 0);
    ck_assert_int_eq(meta_mark(&f->m, 0, cs, META_KIND_HEADER), 0);
    if (f->h.nb_snapshots) {
        ck_assert_int_eq(meta_mark(&f->m, 6 * STD_CS, STD_CS, META_KIND_SNAPSHOTS), 0);
        ck_assert_int_eq(meta_mark(&f->m, 5 * STD_CS, 8, META_KIND_SNAPSHOTS), 0);
        ck_assert_int_eq(cluster_mark_snapshot_l2(&f->m, 5 * STD_CS, 1), 0);
    }
    ck_assert_int_eq(cluster_open(&f->m, f->h.l1_table_offset, f->h.l1_size, 1u << 20,
                                  &f->cl), 0);
    ck_assert_int_eq(refcount_open(&f->m, f->h.refcount_table_offset,
                                   f->h.refcount_table_clusters, 1u << 20, &f->rc), 0);
    ck_assert_int_eq(cluster_set_refcount(f->cl, f->rc), 0);
}

/* What image.c's flush does: refcounts, host flush, L2, L1, host flush, then
 * the deferred decrements (written and flushed). */
static void wfx_flush(struct wfx *f)
{
    struct cache *l2 = cluster_l2_cache(f->cl), *rcc = refcount_cache(f->rc);

    ck_assert_int_eq(cache_flush(rcc), 0);
    cache_dependency_met(l2);
    ck_assert_int_eq(cache_write_dirty(l2), 0);
    ck_assert_int_eq(io_flush(f->io), 0);
    ck_assert_int_eq(cluster_flush_l1(f->cl), 0);
    ck_assert_int_eq(io_flush(f->io), 0);
    if (refcount_has_deferred(f->rc))   /* as image.c: never with none queued */
        ck_assert_int_eq(refcount_apply_deferred(f->rc, NULL, NULL), 0);
    ck_assert_int_eq(cache_flush(rcc), 0);
    ck_assert(!cluster_l1_dirty(f->cl));
    ck_assert(!cache_has_dirty(l2));
    ck_assert(!refcount_has_deferred(f->rc));
}

static uint64_t wfx_refcount(struct wfx *f, uint64_t off)
{
    uint64_t v;

    ck_assert_int_eq(refcount_get(f->rc, off, &v), 0);
    return v;
}

/* Check the refcounts of @mem (@cs-byte clusters) the way qcow2check does. */
static struct check_report check_file(struct io *mem, uint64_t cs)
{
    struct check_report rep = { 0 };
    struct check_refs *refs = NULL;
    struct qcow2_header h;
    struct meta m;
    char err[256];
    size_t n;
    const uint8_t *p = io_memory_data(mem, &n);

    ck_assert_int_eq(header_decode(p, cs, n, &h, err, sizeof(err)), 0);
    memset(&m, 0, sizeof(m));
    meta_init(&m, &h, mem, true);
    ck_assert_int_eq(check_count_refs(&m, &h, &rep, &refs), 0);
    ck_assert_int_eq(check_compare(&m, &h, refs, &rep), 0);
    check_refs_free(refs);
    header_free(&h);
    return rep;
}

static struct check_report expect_clean(struct io *mem, uint64_t cs)
{
    struct check_report rep = check_file(mem, cs);

    ck_assert_msg(rep.corruptions == 0 && rep.leaks == 0,
                  "check: %llu corruptions (%llu refcounts too low, %llu COPIED wrong, "
                  "%llu invalid offsets), %llu leaks",
                  (unsigned long long)rep.corruptions,
                  (unsigned long long)rep.count[CHECK_REFCOUNT_TOO_LOW],
                  (unsigned long long)rep.count[CHECK_COPIED_WRONG],
                  (unsigned long long)rep.count[CHECK_OFFSET_INVALID],
                  (unsigned long long)rep.leaks);
    return rep;
}

/* Close the caches (after wfx_flush), judge the file, free everything. */
static struct check_report wfx_close_clean(struct wfx *f)
{
    struct check_report rep;
    uint64_t cs = f->m.cluster_size;

    ck_assert(!meta_is_corrupt(&f->m));
    refcount_close(f->rc);
    cluster_close(f->cl);
    meta_set_destroy(&f->m);
    header_free(&f->h);
    rep = expect_clean(f->mem, cs);
    io_close(f->io);            /* closes mem */
    free(f->log);
    return rep;
}

/* Allocate a data cluster for guest cluster @gc, write @pattern over it and
 * set its entry (COPIED). */
static uint64_t wfx_write_cluster(struct wfx *f, uint64_t gc, uint8_t pattern)
{
    uint8_t buf[STD_CS];
    uint64_t host;
    int fresh;

    ck_assert_int_eq(cluster_prepare_l2(f->cl, gc), 0);
    ck_assert_int_eq(refcount_alloc(f->rc, 1, &host, &fresh), 0);
    memset(buf, pattern, sizeof(buf));
    ck_assert_int_eq(io_pwrite(f->io, buf, sizeof(buf), host), 0);
    ck_assert_int_eq(cluster_set_entry(f->cl, gc, host | COPIED, 0, true), 0);
    return host;
}

START_TEST(write_fixture_is_clean)
{
    struct io *mem = write_image(true);
    struct check_report rep;

    /* The image the write tests start from is consistent... */
    expect_clean(mem, STD_CS);
    io_close(mem);
    /* ...and the check sees a wrong refcount in it (so a clean verdict
     * after a test means something). */
    mem = write_image(false);
    rep = check_file(mem, STD_CS);
    ck_assert_uint_eq(rep.count[CHECK_COPIED_WRONG], 1);
    io_close(mem);
}
END_TEST

START_TEST(prepare_l2_allocates_empty_table)
{
    const uint64_t gc = 2 * STD_L2E + 5;        /* L1[2] is empty */
    struct wfx f;
    uint64_t l2, entry, bitmap, data;
    const uint8_t *t;

    wfx_open(&f, write_image(true), STD_CS);
    ck_assert_int_eq(cluster_prepare_l2(f.cl, gc), 0);

    /* A new table, zeroed on disk at once (over the garbage of the free
     * cluster it reuses), its refcount raised; the L1 entry changes in
     * memory only, until cluster_flush_l1. */
    ck_assert(cluster_l1_dirty(f.cl));
    ck_assert_uint_eq(wfx_disk64(&f, 3 * STD_CS + 16), 0);
    ck_assert_int_eq(cluster_get_entry(f.cl, gc, &entry, &bitmap), 0);
    ck_assert_uint_eq(entry, 0);
    l2 = 10 * STD_CS;                           /* the first free cluster */
    ck_assert_int_ge(seq_find(f.log, EV_IMAGE, IO_TRACE_WRITE, l2), 0);
    t = wfx_disk(&f, l2, STD_CS);
    for (uint64_t i = 0; i < STD_CS; i++)
        ck_assert_msg(t[i] == 0, "new L2 table byte %llu is 0x%02x", (unsigned long long)i,
                      t[i]);
    ck_assert_uint_eq(wfx_refcount(&f, l2), 1);
    ck_assert_int_eq(meta_kind_at(&f.m, l2), META_KIND_L2);
    ck_assert_int_eq(cluster_flush_l1(f.cl), 0);
    ck_assert_uint_eq(wfx_disk64(&f, 3 * STD_CS + 16), l2 | COPIED);
    /* Prepared once, the table is ours: a second call changes nothing. */
    ck_assert_int_eq(cluster_prepare_l2(f.cl, gc + 1), 0);
    ck_assert_uint_eq(wfx_refcount(&f, 11 * STD_CS), 0);

    data = wfx_write_cluster(&f, gc, 0x11);
    ck_assert_uint_eq(data, 11 * STD_CS);
    wfx_flush(&f);
    ck_assert_uint_eq(wfx_disk64(&f, 3 * STD_CS + 16), l2 | COPIED);
    ck_assert_uint_eq(wfx_disk64(&f, l2 + 5 * 8), data | COPIED);
    ck_assert_uint_eq(wfx_refcount(&f, l2), 1);
    ck_assert_uint_eq(wfx_refcount(&f, data), 1);
    expect_run(f.cl, gc * STD_CS, STD_CS, CLUSTER_DATA, data, STD_CS);
    wfx_close_clean(&f);
}
END_TEST

START_TEST(prepare_l2_uses_copied_table_in_place)
{
    const uint64_t gc = STD_L2E + 3;            /* L1[1]: table 8, COPIED */
    struct wfx f;
    unsigned nb_events;
    uint64_t data;

    wfx_open(&f, write_image(true), STD_CS);
    nb_events = f.log->nb;
    ck_assert_int_eq(cluster_prepare_l2(f.cl, gc), 0);
    ck_assert(!cluster_l1_dirty(f.cl));
    ck_assert_uint_eq(f.log->nb, nb_events);    /* nothing written */
    ck_assert_uint_eq(wfx_refcount(&f, 10 * STD_CS), 0);    /* nothing allocated */

    data = wfx_write_cluster(&f, gc, 0x22);
    wfx_flush(&f);
    ck_assert_uint_eq(wfx_disk64(&f, 3 * STD_CS + 8), 8 * STD_CS | COPIED);
    ck_assert_uint_eq(wfx_disk64(&f, 8 * STD_CS + 3 * 8), data | COPIED);
    ck_assert_uint_eq(wfx_disk64(&f, 8 * STD_CS), 9 * STD_CS | COPIED);
    ck_assert_uint_eq(wfx_refcount(&f, 8 * STD_CS), 1);
    wfx_close_clean(&f);
}
END_TEST

START_TEST(prepare_l2_sets_missing_copied)
{
    /* Refcount 1 with COPIED clear (what check calls a wrong COPIED flag):
     * the table is ours already; only the flag is set, nothing copied. */
    struct wfx f;

    wfx_open(&f, write_image(false), STD_CS);
    ck_assert_int_eq(cluster_prepare_l2(f.cl, STD_L2E), 0);
    ck_assert(cluster_l1_dirty(f.cl));
    ck_assert_uint_eq(wfx_refcount(&f, 10 * STD_CS), 0);
    wfx_flush(&f);
    ck_assert_uint_eq(wfx_disk64(&f, 3 * STD_CS + 8), 8 * STD_CS | COPIED);
    wfx_close_clean(&f);
}
END_TEST

START_TEST(prepare_l2_copies_shared_table)
{
    const uint64_t old = 4 * STD_CS, copy = 10 * STD_CS;
    struct wfx f;
    uint64_t entry, bitmap, data;

    wfx_open(&f, write_image(true), STD_CS);
    ck_assert_int_eq(cluster_prepare_l2(f.cl, 1), 0);

    /* The copy holds the shared table's entries and has its own refcount;
     * the shared table keeps both references until the L1 entry that drops
     * one is durable. */
    ck_assert(cluster_l1_dirty(f.cl));
    ck_assert_int_eq(memcmp(wfx_disk(&f, copy, STD_CS), wfx_disk(&f, old, STD_CS),
                            STD_CS), 0);
    ck_assert_int_eq(cluster_get_entry(f.cl, 0, &entry, &bitmap), 0);
    ck_assert_uint_eq(entry, 7 * STD_CS);       /* still shared: no COPIED */
    ck_assert_uint_eq(wfx_refcount(&f, copy), 1);
    ck_assert_int_eq(meta_kind_at(&f.m, copy), META_KIND_L2);
    ck_assert_uint_eq(wfx_refcount(&f, old), 2);
    ck_assert(refcount_has_deferred(f.rc));
    ck_assert_uint_eq(wfx_disk64(&f, 3 * STD_CS), old);
    ck_assert_int_eq(cluster_flush_l1(f.cl), 0);
    ck_assert_uint_eq(wfx_disk64(&f, 3 * STD_CS), copy | COPIED);

    data = wfx_write_cluster(&f, 1, 0x33);
    wfx_flush(&f);
    ck_assert_uint_eq(wfx_disk64(&f, 3 * STD_CS), copy | COPIED);
    ck_assert_uint_eq(wfx_disk64(&f, copy), 7 * STD_CS);
    ck_assert_uint_eq(wfx_disk64(&f, copy + 8), data | COPIED);
    /* The snapshot's table is untouched and still its own. */
    ck_assert_uint_eq(wfx_disk64(&f, 5 * STD_CS), old);
    ck_assert_uint_eq(wfx_disk64(&f, old + 8), 0);
    ck_assert_uint_eq(wfx_refcount(&f, old), 1);
    ck_assert_uint_eq(wfx_refcount(&f, 7 * STD_CS), 2);
    wfx_close_clean(&f);
}
END_TEST

START_TEST(set_entry_dirty_slice_and_ordering)
{
    const uint64_t gc = STD_L2E + 7;
    struct wfx f;
    uint64_t data, entry, bitmap;
    int i_rc, i_flush, i_l2;

    wfx_open(&f, write_image(true), STD_CS);
    wfx_write_cluster(&f, STD_L2E + 1, 0x44);
    wfx_flush(&f);
    /* A second write after a flush: the entry waits in the cache, and the
     * refcount of its new cluster reaches the disk, flushed, before it. */
    f.log->nb = 0;
    data = wfx_write_cluster(&f, gc, 0x55);
    ck_assert(cache_has_dirty(cluster_l2_cache(f.cl)));
    ck_assert_uint_eq(wfx_disk64(&f, 8 * STD_CS + 7 * 8), 0);
    ck_assert_int_eq(cluster_get_entry(f.cl, gc, &entry, &bitmap), 0);
    ck_assert_uint_eq(entry, data | COPIED);

    ck_assert_int_eq(cache_flush(cluster_l2_cache(f.cl)), 0);
    i_rc = seq_find(f.log, EV_IMAGE, IO_TRACE_WRITE, 2 * STD_CS);
    i_l2 = seq_find(f.log, EV_IMAGE, IO_TRACE_WRITE, 8 * STD_CS);
    i_flush = seq_find(f.log, EV_IMAGE, IO_TRACE_FLUSH, 0);
    ck_assert_msg(i_l2 >= 0, "the L2 table was not written");
    ck_assert_msg(i_rc >= 0 && i_rc < i_l2, "refcount block written at event %d, L2 "
                  "table at %d", i_rc, i_l2);
    ck_assert_msg(i_flush > i_rc && i_flush < i_l2, "no host flush between the "
                  "refcount block (event %d) and the L2 table (%d)", i_rc, i_l2);
    ck_assert_uint_eq(wfx_disk64(&f, 8 * STD_CS + 7 * 8), data | COPIED);
    wfx_flush(&f);
    wfx_close_clean(&f);
}
END_TEST

/*
 * Extended L2 entries, 64 KiB clusters: an L2 table of 4096 16-byte
 * entries in 16 slices of 256.  0 header, 1 refcount table, 2 block,
 * 3 L1 (1 entry) -> 4 L2 table (COPIED).
 */
#define X_CB    16u
#define X_CS    (1ull << X_CB)
#define X_SC    (X_CS / 32)

START_TEST(set_entry_extended_l2_bitmap)
{
    const uint64_t gc = 300;                    /* slice 1, entry 44 */
    const uint64_t bitmap = 0xfull | 0xf0ull << 32;     /* sc 0-3 data, 4-7 zero */
    struct tu_hdr th = tu_hdr_default(3, X_CB);
    struct img im;
    struct wfx f;
    uint64_t host, entry, bm;
    uint8_t buf[X_SC * 4];
    int fresh;

    img_init(&im, X_CB, true, 5);
    th.size = 4096 * X_CS;
    th.incompatible_features = QCOW2_INCOMPAT_EXTL2;
    tu_hdr_write(im.buf, &th);
    be64_put(im.buf + X_CS, 2 * X_CS);
    for (unsigned c = 0; c < 5; c++)
        refcount_entry_set(4, im.buf + 2 * X_CS, c, 1);
    l1_set(&im, 3, 0, 4 * X_CS | COPIED);

    wfx_open(&f, img_io(&im), X_CS);
    ck_assert(f.m.extended_l2);

    ck_assert_int_eq(cluster_prepare_l2(f.cl, gc), 0);
    ck_assert_int_eq(refcount_alloc(f.rc, 1, &host, &fresh), 0);
    memset(buf, 0x66, sizeof(buf));
    ck_assert_int_eq(io_pwrite(f.io, buf, sizeof(buf), host), 0);
    ck_assert_int_eq(cluster_set_entry(f.cl, gc, host | COPIED, bitmap, true), 0);

    ck_assert_int_eq(cluster_get_entry(f.cl, gc, &entry, &bm), 0);
    ck_assert_uint_eq(entry, host | COPIED);
    ck_assert_uint_eq(bm, bitmap);
    for (uint64_t g = gc - 1; g <= gc + 1; g += 2) {
        ck_assert_int_eq(cluster_get_entry(f.cl, g, &entry, &bm), 0);
        ck_assert_uint_eq(entry, 0);
        ck_assert_uint_eq(bm, 0);
    }
    expect_run(f.cl, gc * X_CS, X_CS, CLUSTER_DATA, host, 4 * X_SC);
    expect_run(f.cl, gc * X_CS + 4 * X_SC, X_CS, CLUSTER_ZERO, 0, 4 * X_SC);
    expect_run(f.cl, gc * X_CS + 8 * X_SC, 24 * X_SC, CLUSTER_UNALLOCATED, 0, 24 * X_SC);

    wfx_flush(&f);
    /* On disk: the entry, then its bitmap half, in slice 1 of the table. */
    ck_assert_uint_eq(wfx_disk64(&f, 4 * X_CS + gc * 16), host | COPIED);
    ck_assert_uint_eq(wfx_disk64(&f, 4 * X_CS + gc * 16 + 8), bitmap);
    ck_assert_uint_eq(wfx_disk64(&f, 4 * X_CS + gc * 16 - 8), 0);
    ck_assert_uint_eq(wfx_disk64(&f, 4 * X_CS + gc * 16 + 16), 0);
    ck_assert_uint_eq(wfx_close_clean(&f).allocated_clusters, 1);
}
END_TEST

START_TEST(grow_l1_moves_table)
{
    const uint32_t new_size = 1024;             /* two clusters */
    struct wfx f;
    uint64_t data, l1;
    int i_table, i_rc, i_hdr, i_flush1, i_flush2;
    const uint8_t *t;

    wfx_open(&f, write_image(true), STD_CS);
    data = wfx_write_cluster(&f, 2 * STD_L2E, 0x77);   /* L1[2] gets table 10 */
    wfx_flush(&f);
    f.log->nb = 0;
    ck_assert_int_eq(cluster_grow_l1(f.cl, new_size), 0);

    ck_assert_uint_eq(cluster_l1_size(f.cl), new_size);
    l1 = be64_get(wfx_disk(&f, 40, 8));
    ck_assert_uint_eq(be32_get(wfx_disk(&f, 36, 4)), new_size);
    ck_assert_uint_ne(l1, 3 * STD_CS);
    ck_assert_uint_eq(l1 % STD_CS, 0);
    /* The entries moved with the table; the rest is empty. */
    t = wfx_disk(&f, l1, 2 * STD_CS);
    ck_assert_uint_eq(be64_get(t), 4 * STD_CS);
    ck_assert_uint_eq(be64_get(t + 8), 8 * STD_CS | COPIED);
    ck_assert_uint_eq(be64_get(t + 16), 10 * STD_CS | COPIED);
    for (uint32_t i = W_L1SIZE; i < new_size; i++)
        ck_assert_uint_eq(be64_get(t + 8 * i), 0);
    ck_assert_uint_eq(wfx_refcount(&f, l1), 1);
    ck_assert_uint_eq(wfx_refcount(&f, l1 + STD_CS), 1);
    ck_assert_int_eq(meta_kind_at(&f.m, l1), META_KIND_L1);
    ck_assert_int_eq(meta_kind_at(&f.m, l1 + STD_CS), META_KIND_L1);
    ck_assert_int_eq(meta_kind_at(&f.m, 3 * STD_CS), META_KIND_NONE);

    /* Order: the table and its refcounts, a flush, the header, a flush; the
     * old table is freed after that: in the cache, not yet on disk. */
    i_table = seq_find(f.log, EV_IMAGE, IO_TRACE_WRITE, l1);
    i_rc = seq_find(f.log, EV_IMAGE, IO_TRACE_WRITE, 2 * STD_CS);
    i_hdr = seq_find(f.log, EV_IMAGE, IO_TRACE_WRITE, 36);
    ck_assert_int_ge(i_table, 0);
    ck_assert_msg(i_rc >= 0 && i_hdr > i_rc, "refcount block at event %d, header %d",
                  i_rc, i_hdr);
    i_flush1 = -1;
    for (int i = (i_table > i_rc ? i_table : i_rc) + 1; i < i_hdr; i++)
        if (f.log->ev[i].type == IO_TRACE_FLUSH)
            i_flush1 = i;
    ck_assert_msg(i_flush1 > 0, "no host flush before the header write (event %d)", i_hdr);
    i_flush2 = -1;
    for (int i = i_hdr + 1; i < (int)f.log->nb && i_flush2 < 0; i++)
        if (f.log->ev[i].type == IO_TRACE_FLUSH)
            i_flush2 = i;
    ck_assert_msg(i_flush2 > i_hdr, "no host flush after the header write");
    ck_assert_uint_eq(wfx_refcount(&f, 3 * STD_CS), 0);
    ck_assert_uint_eq(refcount_entry_get(4, wfx_disk(&f, 2 * STD_CS, STD_CS), 3), 1);

    wfx_flush(&f);
    ck_assert_uint_eq(refcount_entry_get(4, wfx_disk(&f, 2 * STD_CS, STD_CS), 3), 0);

    /* The grown table is the one in use: an entry past the old size gets a
     * table (the old L1's cluster, free now). */
    ck_assert_int_eq(cluster_prepare_l2(f.cl, 1000 * STD_L2E), 0);
    ck_assert(cluster_l1_dirty(f.cl));
    wfx_flush(&f);
    ck_assert_uint_eq(wfx_disk64(&f, l1 + 1000 * 8), 3 * STD_CS | COPIED);
    ck_assert_uint_eq(wfx_refcount(&f, 3 * STD_CS), 1);
    expect_run(f.cl, 2 * STD_L2E * STD_CS, STD_CS, CLUSTER_DATA, data, STD_CS);
    wfx_close_clean(&f);
}
END_TEST

static Suite *cluster_suite(void)
{
    Suite *s = suite_create("cluster");
    TCase *tc = tcase_create("decode");
    tcase_set_timeout(tc, 60);

    tcase_add_test(tc, decode_standard_v3);
    tcase_add_test(tc, decode_zero_flag_v2);
    tcase_add_test(tc, decode_reserved_bits);
    tcase_add_test(tc, decode_misaligned);
    tcase_add_test(tc, decode_compressed);
    tcase_add_test(tc, decode_copied_offset_zero);
    tcase_add_test(tc, decode_extended_l2);
    suite_add_tcase(s, tc);

    tc = tcase_create("lookup");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, open_cache_minimum);
    tcase_add_test(tc, lookup_merges_contiguous);
    tcase_add_test(tc, lookup_mid_cluster);
    tcase_add_test(tc, lookup_kind_changes);
    tcase_add_test(tc, lookup_compressed);
    tcase_add_test(tc, lookup_unallocated_l1);
    tcase_add_test(tc, lookup_walk_standard);
    tcase_add_test(tc, lookup_get_entry);
    tcase_add_test(tc, lookup_data_file);
    tcase_add_test(tc, lookup_slices);
    tcase_add_test(tc, lookup_extended_l2);
    tcase_add_test(tc, lookup_walk_extended_l2);
    suite_add_tcase(s, tc);

    tc = tcase_create("corrupt");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, lookup_corrupt_l2_entry);
    tcase_add_test(tc, lookup_corrupt_run_stops_before);
    tcase_add_test(tc, lookup_corrupt_l1_entry);
    tcase_add_test(tc, lookup_shared_needs_cached_slice);
    tcase_add_test(tc, lookup_shared_leaves_corruption_to_exclusive);
    tcase_add_test(tc, corrupt_sets_header_bit);
    tcase_add_test(tc, lookup_extended_l2_corrupt);
    tcase_add_test(tc, old_entry_extent);
    suite_add_tcase(s, tc);

    tc = tcase_create("write");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, evicted_l2_waits_for_data_file_flush);
    tcase_add_test(tc, write_fixture_is_clean);
    tcase_add_test(tc, prepare_l2_allocates_empty_table);
    tcase_add_test(tc, prepare_l2_uses_copied_table_in_place);
    tcase_add_test(tc, prepare_l2_sets_missing_copied);
    tcase_add_test(tc, prepare_l2_copies_shared_table);
    tcase_add_test(tc, set_entry_dirty_slice_and_ordering);
    tcase_add_test(tc, set_entry_extended_l2_bitmap);
    tcase_add_test(tc, grow_l1_moves_table);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(cluster_suite());
}
