/*
 * Unit tests for snapshot: decoding the snapshot table, and the checks on
 * the fields a snapshot's view shows (its disk size).
 */
#include "testutil.h"

#include "header.h"
#include "io.h"
#include "snapshot.h"

#include <errno.h>
#include <string.h>

#define CB          16u
#define CS          (1ull << CB)
#define TABLE_OFF   (2 * CS)    /* the snapshot table lives in cluster 2 */
#define L1_OFF      (3 * CS)    /* each snapshot's L1 table: cluster 3 */
#define FILE_CLUSTERS 4u

/* One snapshot entry to put into the table. */
struct snap_in {
    const char *id, *name;
    uint32_t extra;             /* extra data bytes: 0, 8, 16 or more */
    uint64_t disk_size;         /* written when extra >= 16 */
};

/* A header for a 1 GiB image whose snapshot table holds @nb entries. */
static struct qcow2_header snap_header(uint32_t nb, uint64_t incompatible)
{
    struct qcow2_header h;

    memset(&h, 0, sizeof(h));
    h.version = 3;
    h.cluster_bits = CB;
    h.size = 1ull << 30;
    h.nb_snapshots = nb;
    h.snapshots_offset = TABLE_OFF;
    h.incompatible_features = incompatible;
    return h;
}

/* An image file holding the entries; *entry_off[i] is where entry i starts. */
static struct io *snap_file(const struct snap_in *in, uint32_t nb, uint64_t *entry_off)
{
    uint8_t *buf = tu_zalloc(FILE_CLUSTERS * CS);
    uint64_t pos = TABLE_OFF;
    struct io *io;

    for (uint32_t i = 0; i < nb; i++) {
        uint8_t *e = buf + pos;
        size_t id_len = strlen(in[i].id), name_len = strlen(in[i].name);

        if (entry_off)
            entry_off[i] = pos;
        be64_put(e, L1_OFF);
        be32_put(e + 8, 16);                    /* l1_size */
        be16_put(e + 12, (uint16_t)id_len);
        be16_put(e + 14, (uint16_t)name_len);
        be32_put(e + 36, in[i].extra);
        if (in[i].extra >= 16)
            be64_put(e + 48, in[i].disk_size);
        memcpy(e + 40 + in[i].extra, in[i].id, id_len);
        memcpy(e + 40 + in[i].extra + id_len, in[i].name, name_len);
        pos += (40 + in[i].extra + id_len + name_len + 7) & ~7ull;
    }
    ck_assert_int_eq(io_open_memory(buf, FILE_CLUSTERS * CS, &io), 0);
    free(buf);
    return io;
}

static int read_table(const struct snap_in *in, uint32_t nb, uint64_t incompatible,
                      struct snapshot_table *t, char *err, size_t err_len,
                      uint64_t *entry_off)
{
    struct qcow2_header h = snap_header(nb, incompatible);
    struct io *io = snap_file(in, nb, entry_off);
    int ret;

    err[0] = '\0';
    ret = snapshot_table_read(io, &h, t, err, err_len);
    io_close(io);
    return ret;
}

/* The table reads; the view of entry @bad is refused with -EINVAL and a
 * message naming the snapshot, the field and the field's offset in the
 * file; the other entries' views are fine. */
static void expect_bad_disk_size(const struct snap_in *in, uint32_t nb, uint32_t bad,
                                 uint64_t incompatible, const char *why)
{
    struct qcow2_header h = snap_header(nb, incompatible);
    struct snapshot_table t;
    char err[512], off[32];
    uint64_t entry_off[8];

    ck_assert_uint_le(nb, 8);
    ck_assert_msg(read_table(in, nb, incompatible, &t, err, sizeof(err), entry_off) == 0,
                  "%s", err);
    for (uint32_t i = 0; i < nb; i++) {
        err[0] = '\0';
        if (i != bad) {
            ck_assert_msg(snapshot_check_view(&h, &t.s[i], err, sizeof(err)) == 0,
                          "%s", err);
            continue;
        }
        ck_assert_int_eq(snapshot_check_view(&h, &t.s[i], err, sizeof(err)), -EINVAL);
        snprintf(off, sizeof(off), "0x%llx", (unsigned long long)(entry_off[bad] + 48));
        ck_assert_msg(strstr(err, "disk_size") && strstr(err, in[bad].name) &&
                      strstr(err, off) && strstr(err, why),
                      "message \"%s\" should name disk_size, snapshot \"%s\", offset "
                      "%s and \"%s\"", err, in[bad].name, off, why);
    }
    snapshot_table_free(&t);
}

/* Every entry of the table reads and may be shown. */
static void expect_views_ok(const struct snap_in *in, uint32_t nb, uint64_t incompatible,
                            struct snapshot_table *t)
{
    struct qcow2_header h = snap_header(nb, incompatible);
    char err[512];

    ck_assert_msg(read_table(in, nb, incompatible, t, err, sizeof(err), NULL) == 0,
                  "%s", err);
    for (uint32_t i = 0; i < nb; i++)
        ck_assert_msg(snapshot_check_view(&h, &t->s[i], err, sizeof(err)) == 0,
                      "%s", err);
}

START_TEST(valid_table_decodes)
{
    static const struct snap_in in[] = {
        { "1", "plain", 0, 0 },
        { "2", "vmstate", 8, 0 },
        { "3", "sized", 16, 2ull << 30 },
        { "4", "more-extra", 24, 512 },
    };
    struct snapshot_table t;

    expect_views_ok(in, 4, 0, &t);
    ck_assert_uint_eq(t.nb, 4);
    ck_assert_str_eq(t.s[2].name, "sized");
    ck_assert_uint_eq(t.s[0].disk_size, 0);     /* not recorded */
    ck_assert_uint_eq(t.s[2].disk_size, 2ull << 30);
    ck_assert_uint_eq(t.s[3].disk_size, 512);
    ck_assert_ptr_eq(snapshot_find(&t, "3"), &t.s[2]);
    ck_assert_ptr_eq(snapshot_find(&t, "more-extra"), &t.s[3]);
    snapshot_table_free(&t);
}
END_TEST

START_TEST(disk_size_not_multiple_of_512)
{
    struct snap_in in[] = {
        { "1", "good", 16, 1ull << 30 },
        { "2", "odd", 16, (1ull << 30) + 100 },
    };

    expect_bad_disk_size(in, 2, 1, 0, "multiple of 512");
    in[1].disk_size = 1;
    expect_bad_disk_size(in, 2, 1, 0, "multiple of 512");
}
END_TEST

START_TEST(disk_size_negative)
{
    /* Huge as unsigned: QEMU reads the field as a signed int64. */
    struct snap_in in[] = { { "7", "neg", 16, 0xfffffffffffffe00ull } };

    expect_bad_disk_size(in, 1, 0, 0, "negative");
    in[0].disk_size = 1ull << 63;
    expect_bad_disk_size(in, 1, 0, 0, "negative");
}
END_TEST

START_TEST(disk_size_above_format_cap)
{
    /* 64 KiB clusters: a maximal L1 table (4 Mi entries) of L2 tables of 8 Ki
     * entries maps 2^22 * 2^13 * 2^16 = 2^51 bytes; with extended L2 entries
     * half of that.  The header's size is held to the same cap. */
    const uint64_t cap = 1ull << 51;
    struct snap_in in[] = { { "1", "big", 16, cap } };
    struct snapshot_table t;

    expect_views_ok(in, 1, 0, &t);
    ck_assert_uint_eq(t.s[0].disk_size, cap);
    snapshot_table_free(&t);

    in[0].disk_size = cap + CS;
    expect_bad_disk_size(in, 1, 0, 0, "larger than");
    in[0].disk_size = cap;
    expect_bad_disk_size(in, 1, 0, QCOW2_INCOMPAT_EXTL2, "larger than");
    in[0].disk_size = 1ull << 61;
    expect_bad_disk_size(in, 1, 0, 0, "larger than");
}
END_TEST

START_TEST(disk_size_not_read_without_extra)
{
    /* Without 16 bytes of extra data there is no disk_size field: the bytes
     * at offset 48 belong to the ID and name and are not checked. */
    static const struct snap_in in[] = { { "12345678", "name-without-size", 8, 0 } };
    struct snapshot_table t;

    expect_views_ok(in, 1, 0, &t);
    ck_assert_uint_eq(t.s[0].disk_size, 0);
    ck_assert_str_eq(t.s[0].id, "12345678");
    snapshot_table_free(&t);
}
END_TEST

START_TEST(bad_name_printed_safely)
{
    /* A name with control characters is shown with '?' in their place. */
    struct snap_in in[] = { { "1", "a\033[2Jb", 16, 777 } };
    struct qcow2_header h = snap_header(1, 0);
    struct snapshot_table t;
    char err[512];

    ck_assert_int_eq(read_table(in, 1, 0, &t, err, sizeof(err), NULL), 0);
    ck_assert_int_eq(snapshot_check_view(&h, &t.s[0], err, sizeof(err)), -EINVAL);
    ck_assert_msg(strstr(err, "\"a?[2Jb\"") && !strchr(err, '\033'), "%s", err);
    snapshot_table_free(&t);
}
END_TEST

static Suite *snapshot_suite(void)
{
    Suite *s = suite_create("snapshot");
    TCase *tc = tcase_create("disk_size");

    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, valid_table_decodes);
    tcase_add_test(tc, disk_size_not_multiple_of_512);
    tcase_add_test(tc, disk_size_negative);
    tcase_add_test(tc, disk_size_above_format_cap);
    tcase_add_test(tc, disk_size_not_read_without_extra);
    tcase_add_test(tc, bad_name_printed_safely);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(snapshot_suite());
}
