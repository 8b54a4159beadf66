/*
 * Unit tests for check: rebuilding the refcounts of an image whose on-disk
 * refcounts are stale (what a crash of a lazy-refcounts writer leaves), for
 * every cluster size class and refcount width.  The new structures go past
 * the end of the file; the geometry's file end must grow to cover them, so
 * that refcount_open (which validates the table against it) accepts them.
 * Images are built in a memory backend.
 */
#include "testutil.h"

#include "check.h"
#include "header.h"
#include "io.h"
#include "meta.h"
#include "refcount.h"

#include <errno.h>

/*
 * An image laid out as header, refcount table, refcount block, L1 table,
 * one L2 table (cluster 4) mapping guest cluster 0 to cluster 5, and
 * @trailing unreferenced clusters after that.  The refcount block counts
 * only clusters 0-3: the L2 table and the data cluster have refcount 0.
 */
static struct io *stale_image(unsigned cluster_bits, unsigned order, unsigned trailing,
                              struct qcow2_header *h, struct meta *m)
{
    uint64_t cs = 1ull << cluster_bits, len = (6 + trailing) * cs;
    struct tu_hdr th = tu_hdr_default(3, cluster_bits);
    uint8_t *img = tu_zalloc(len);
    char err[256];
    struct io *io;
    size_t n;

    th.refcount_order = order;
    tu_hdr_write(img, &th);
    be64_put(img + cs, 2 * cs);                         /* table -> block */
    for (uint64_t ci = 0; ci < 4; ci++)
        refcount_entry_set(order, img + 2 * cs, ci, 1);
    be64_put(img + 3 * cs, 4 * cs | META_L2_COPIED);    /* L1 -> L2 */
    be64_put(img + 4 * cs, 5 * cs | META_L2_COPIED);    /* L2 -> data */
    memset(img + 5 * cs, 0xa5, cs);
    for (unsigned i = 0; i < trailing; i++)
        memset(img + (6 + i) * cs, 0x5a, cs);
    ck_assert_int_eq(io_open_memory(img, len, &io), 0);
    free(img);
    ck_assert_int_eq(header_decode(io_memory_data(io, &n), cs, len, h, err, sizeof(err)), 0);
    memset(m, 0, sizeof(*m));  /* as in a calloc'ed image: no set, not corrupt */
    meta_init(m, h, io, false);
    ck_assert_uint_eq(m->file_end, len);
    return io;
}

/* Rebuild, then open the refcounts the way a writable mount does and read
 * every count back. */
static void rebuild_and_open(unsigned cluster_bits, unsigned order, unsigned trailing)
{
    uint64_t cs = 1ull << cluster_bits, old_end = (6 + trailing) * cs, new_end, v;
    struct check_report rep = { 0 };
    struct check_refs *refs = NULL;
    struct qcow2_header h;
    struct refcount *rc = NULL;
    struct meta m;
    struct io *io = stale_image(cluster_bits, order, trailing, &h, &m);
    size_t file_len;

    ck_assert_int_eq(check_count_refs(&m, &h, &rep, &refs), 0);
    ck_assert_uint_eq(rep.corruptions, 0);
    ck_assert_int_eq(check_rebuild_refcounts(&m, &h, refs), 0);

    /* The new table and its blocks follow everything referenced (cluster
     * 5), over the trailing garbage if any, past the old end otherwise. */
    ck_assert_uint_ge(h.refcount_table_offset, 6 * cs);
    new_end = h.refcount_table_offset + ((uint64_t)h.refcount_table_clusters << cluster_bits);
    io_memory_data(io, &file_len);
    ck_assert_uint_ge(file_len, new_end);
    ck_assert_uint_ge(m.file_end, new_end);
    /* Raised, never lowered below what was in the file. */
    ck_assert_uint_ge(m.file_end, old_end);
    ck_assert_uint_eq(m.file_end % cs, 0);

    tu_log_capture();
    ck_assert_int_eq(refcount_open(&m, h.refcount_table_offset, h.refcount_table_clusters,
                                   1u << 20, &rc), 0);
    tu_log_release();
    ck_assert(!meta_is_corrupt(&m));
    for (uint64_t ci = 0; ci < 6; ci++) {
        uint64_t want = ci == 1 || ci == 2 ? 0 : 1;     /* old table and block: free */
        ck_assert_int_eq(refcount_get(rc, ci * cs, &v), 0);
        ck_assert_msg(v == want, "cluster %llu: refcount %llu, want %llu (cluster_bits %u, "
                      "order %u)", (unsigned long long)ci, (unsigned long long)v,
                      (unsigned long long)want, cluster_bits, order);
    }
    for (uint64_t off = h.refcount_table_offset; off < new_end; off += cs) {
        ck_assert_int_eq(refcount_get(rc, off, &v), 0);
        ck_assert_uint_eq(v, 1);
    }
    refcount_close(rc);
    check_refs_free(refs);
    header_free(&h);
    io_close(io);
}

START_TEST(rebuild_past_end_all_geometries)
{
    static const unsigned bits[] = { 9, 12, 16, 21 };
    static const unsigned orders[] = { 0, 4, 6 };

    for (unsigned b = 0; b < sizeof(bits) / sizeof(bits[0]); b++)
        for (unsigned o = 0; o < sizeof(orders) / sizeof(orders[0]); o++)
            rebuild_and_open(bits[b], orders[o], 0);
}
END_TEST

START_TEST(rebuild_over_trailing_garbage_keeps_file_end)
{
    rebuild_and_open(12, 4, 8);
    rebuild_and_open(9, 0, 3);
}
END_TEST

/* check_fix_copied after the rebuild: the flags follow the rebuilt counts. */
START_TEST(fix_copied_after_rebuild)
{
    struct check_report rep = { 0 };
    struct check_refs *refs = NULL;
    struct qcow2_header h;
    struct meta m;
    struct io *io = stale_image(12, 4, 0, &h, &m);
    const uint8_t *d;
    uint64_t cs = 4096;
    size_t n;

    /* Drop the L1 entry's flag: the L2 table has one reference. */
    {
        uint8_t e[8];
        be64_put(e, 4 * cs);
        ck_assert_int_eq(io_pwrite(io, e, 8, 3 * cs), 0);
    }
    ck_assert_int_eq(check_count_refs(&m, &h, &rep, &refs), 0);
    ck_assert_int_eq(check_rebuild_refcounts(&m, &h, refs), 0);
    ck_assert_int_eq(check_fix_copied(&m, &h, refs), 1);
    d = io_memory_data(io, &n);
    ck_assert_uint_eq(be64_get(d + 3 * cs), 4 * cs | META_L2_COPIED);
    ck_assert_uint_eq(be64_get(d + 4 * cs), 5 * cs | META_L2_COPIED);
    check_refs_free(refs);
    header_free(&h);
    io_close(io);
}
END_TEST

static Suite *check_suite(void)
{
    Suite *s = suite_create("check");
    TCase *tc = tcase_create("rebuild");

    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, rebuild_past_end_all_geometries);
    tcase_add_test(tc, rebuild_over_trailing_garbage_keeps_file_end);
    tcase_add_test(tc, fix_copied_after_rebuild);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(check_suite());
}
