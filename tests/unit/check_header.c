/*
 * Unit tests for header: header_decode (and the order of its steps),
 * header_encode, header_feature_name, header_read and the header_write_*
 * field writers.
 */
#include "testutil.h"

#include "header.h"

#include <errno.h>
#include <string.h>

#define EXT_UNKNOWN     0x12345678u

/* ---- helpers ------------------------------------------------------------- */

static uint8_t *cluster_buf(unsigned cluster_bits)
{
    return tu_zalloc((size_t)1 << cluster_bits);
}

/* Decode @buf, expecting success; fails the test with the message if not. */
static void decode_ok(const uint8_t *buf, size_t len, uint64_t file_size,
                      struct qcow2_header *h)
{
    char err[512] = "";
    int ret = header_decode(buf, len, file_size, h, err, sizeof(err));

    ck_assert_msg(ret == 0, "header_decode returned %d: %s", ret, err);
}

/* Decode, re-encode into one cluster and require identical bytes. */
static void check_roundtrip(const uint8_t *buf, size_t cluster_size,
                            struct qcow2_header *h)
{
    uint8_t *out = tu_zalloc(cluster_size);
    uint32_t ext_end = h->ext_end;
    uint64_t bfo = h->backing_file_offset;
    uint32_t bfs = h->backing_file_size;
    int n = header_encode(h, out, cluster_size);

    ck_assert_int_gt(n, 0);
    ck_assert_int_le(n, (int)cluster_size);
    if (memcmp(out, buf, cluster_size) != 0) {
        size_t i = 0;
        while (out[i] == buf[i])
            i++;
        ck_abort_msg("encoded byte %zu is 0x%02x, expected 0x%02x", i, out[i], buf[i]);
    }
    ck_assert_uint_eq(h->ext_end, ext_end);
    ck_assert_uint_eq(h->backing_file_offset, bfo);
    ck_assert_uint_eq(h->backing_file_size, bfs);
    /* Bytes used: up to the end of the backing name, or of the END marker. */
    ck_assert_uint_eq((unsigned)n, bfo ? bfo + bfs : ext_end);
    free(out);
}

/* Decode @buf and expect failure @code with @needle in the message
 * (case-insensitive). */
static void expect_fail_buf(const uint8_t *buf, size_t len, uint64_t file_size,
                            int code, const char *needle)
{
    struct qcow2_header h;
    char err[512] = "";
    int ret = header_decode(buf, len, file_size, &h, err, sizeof(err));

    ck_assert_msg(ret == code, "expected %d (%s), got %d; message: \"%s\"",
                  code, needle, ret, err);
    ck_assert_msg(strcasestr(err, needle) != NULL,
                  "message \"%s\" does not name \"%s\"", err, needle);
}

static void expect_fail(const struct tu_hdr *th, uint64_t file_size, int code,
                        const char *needle)
{
    size_t cs = (size_t)1 << (th->cluster_bits >= 9 && th->cluster_bits <= 21 ?
                              th->cluster_bits : 16);
    uint8_t *buf = tu_zalloc(cs);

    tu_hdr_write(buf, th);
    expect_fail_buf(buf, cs, file_size, code, needle);
    free(buf);
}

static void check_fixed_fields(const struct qcow2_header *h, const struct tu_hdr *th)
{
    ck_assert_uint_eq(h->version, th->version);
    ck_assert_uint_eq(h->cluster_bits, th->cluster_bits);
    ck_assert_uint_eq(h->size, th->size);
    ck_assert_uint_eq(h->crypt_method, 0);
    ck_assert_uint_eq(h->l1_size, th->l1_size);
    ck_assert_uint_eq(h->l1_table_offset, th->l1_table_offset);
    ck_assert_uint_eq(h->refcount_table_offset, th->refcount_table_offset);
    ck_assert_uint_eq(h->refcount_table_clusters, th->refcount_table_clusters);
    ck_assert_uint_eq(h->nb_snapshots, th->nb_snapshots);
    ck_assert_uint_eq(h->snapshots_offset, th->snapshots_offset);
    if (th->version == 2) {
        ck_assert_uint_eq(h->refcount_order, 4);
        ck_assert_uint_eq(h->header_length, 72);
        ck_assert_uint_eq(h->incompatible_features, 0);
        ck_assert_uint_eq(h->compatible_features, 0);
        ck_assert_uint_eq(h->autoclear_features, 0);
    } else {
        ck_assert_uint_eq(h->refcount_order, th->refcount_order);
        ck_assert_uint_eq(h->header_length, th->header_length);
        ck_assert_uint_eq(h->incompatible_features, th->incompatible_features);
        ck_assert_uint_eq(h->compatible_features, th->compatible_features);
        ck_assert_uint_eq(h->autoclear_features, th->autoclear_features);
    }
}

/* ---- valid headers ------------------------------------------------------- */

START_TEST(v2_minimal)
{
    struct tu_hdr th = tu_hdr_default(2, 16);
    uint8_t *buf = cluster_buf(16);
    struct qcow2_header h;

    tu_hdr_write(buf, &th);
    decode_ok(buf, 1u << 16, tu_default_file_size(16), &h);
    check_fixed_fields(&h, &th);
    ck_assert_ptr_null(h.backing_file);
    ck_assert_ptr_null(h.backing_format);
    ck_assert_ptr_null(h.data_file);
    ck_assert_uint_eq(h.nb_exts, 0);
    ck_assert_uint_eq(h.nb_feature_names, 0);
    ck_assert_uint_eq(h.extra_fields_len, 0);
    ck_assert_uint_eq(h.compression_type, 0);
    ck_assert_uint_eq(h.ext_end, 72 + 8);
    check_roundtrip(buf, 1u << 16, &h);
    header_free(&h);
    free(buf);
}
END_TEST

/* v2 and v3 over every cluster size, with a backing name and extensions. */
static void full_header(uint32_t version, uint32_t cb)
{
    struct tu_hdr th = tu_hdr_default(version, cb);
    size_t cs = (size_t)1 << cb, off;
    uint8_t *buf = cluster_buf(cb);
    uint8_t ft[48];
    struct qcow2_header h;
    const char *bname = "../base image.qcow2";

    th.size = 64ull * cs - 4096 + 1;        /* not a cluster multiple */
    if (version == 3)
        th.compatible_features = QCOW2_COMPAT_LAZY_REFCOUNTS;
    off = tu_hdr_write(buf, &th);
    tu_ext_put(buf, &off, QCOW2_EXT_BACKING_FORMAT, "qcow2", 5);
    tu_feature_put(ft, 1, 0, "lazy refcounts");
    tu_ext_put(buf, &off, QCOW2_EXT_FEATURE_TABLE, ft, 48);
    off += 8;                               /* END */
    th.backing_file_offset = off;
    th.backing_file_size = (uint32_t)strlen(bname);
    memcpy(buf + off, bname, strlen(bname));
    tu_hdr_write(buf, &th);

    decode_ok(buf, cs, tu_default_file_size(cb), &h);
    check_fixed_fields(&h, &th);
    ck_assert_str_eq(h.backing_file, bname);
    ck_assert_str_eq(h.backing_format, "qcow2");
    ck_assert_uint_eq(h.nb_exts, 2);
    ck_assert_uint_eq(h.nb_feature_names, 1);
    ck_assert_uint_eq(h.ext_end, off);
    check_roundtrip(buf, cs, &h);
    header_free(&h);
    free(buf);
}

START_TEST(v2_cluster_bits)
{
    full_header(2, (uint32_t)_i);
}
END_TEST

START_TEST(v3_cluster_bits)
{
    full_header(3, (uint32_t)_i);
}
END_TEST

START_TEST(v3_refcount_order)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);
    struct qcow2_header h;

    th.refcount_order = (uint32_t)_i;
    tu_hdr_write(buf, &th);
    decode_ok(buf, 1u << 16, tu_default_file_size(16), &h);
    ck_assert_uint_eq(h.refcount_order, (uint32_t)_i);
    check_roundtrip(buf, 1u << 16, &h);
    header_free(&h);
    free(buf);
}
END_TEST

START_TEST(v3_header_length_104)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);
    struct qcow2_header h;
    size_t off;

    th.header_length = 104;
    off = tu_hdr_write(buf, &th);
    ck_assert_uint_eq(off, 104);
    /* Extensions start right at byte 104. */
    tu_ext_put(buf, &off, QCOW2_EXT_BACKING_FORMAT, "raw", 3);
    decode_ok(buf, 1u << 16, tu_default_file_size(16), &h);
    ck_assert_uint_eq(h.header_length, 104);
    ck_assert_uint_eq(h.compression_type, 0);
    ck_assert_uint_eq(h.extra_fields_len, 0);
    ck_assert_str_eq(h.backing_format, "raw");
    ck_assert_uint_eq(h.ext_end, 104 + 16 + 8);
    check_roundtrip(buf, 1u << 16, &h);
    header_free(&h);
    free(buf);
}
END_TEST

START_TEST(v3_header_length_112_zstd)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);
    struct qcow2_header h;
    size_t off;

    th.incompatible_features = QCOW2_INCOMPAT_COMPRESSION;
    th.compression_type = 1;
    off = tu_hdr_write(buf, &th);
    ck_assert_uint_eq(off, 112);
    tu_ext_put(buf, &off, QCOW2_EXT_BACKING_FORMAT, "raw", 3);
    decode_ok(buf, 1u << 16, tu_default_file_size(16), &h);
    ck_assert_uint_eq(h.header_length, 112);
    ck_assert_uint_eq(h.compression_type, 1);
    ck_assert_uint_eq(h.incompatible_features, QCOW2_INCOMPAT_COMPRESSION);
    ck_assert_uint_eq(h.extra_fields_len, 0);
    ck_assert_str_eq(h.backing_format, "raw");
    check_roundtrip(buf, 1u << 16, &h);
    header_free(&h);
    free(buf);
}
END_TEST

START_TEST(v3_header_length_120_extra_fields)
{
    static const uint8_t extra[16] = {
        0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04,
        0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0xff,
    };
    for (unsigned len = 120; len <= 128; len += 8) {
        struct tu_hdr th = tu_hdr_default(3, 12);
        uint8_t *buf = cluster_buf(12);
        struct qcow2_header h;
        size_t off;

        th.header_length = len;
        off = tu_hdr_write(buf, &th);
        ck_assert_uint_eq(off, len);
        memcpy(buf + 112, extra, len - 112);
        tu_ext_put(buf, &off, EXT_UNKNOWN, "abc", 3);
        decode_ok(buf, 1u << 12, tu_default_file_size(12), &h);
        ck_assert_uint_eq(h.header_length, len);
        ck_assert_uint_eq(h.extra_fields_len, len - 112);
        ck_assert_mem_eq(h.extra_fields, extra, len - 112);
        ck_assert_uint_eq(h.nb_exts, 1);
        ck_assert_uint_eq(h.exts[0].type, EXT_UNKNOWN);
        check_roundtrip(buf, 1u << 12, &h);
        header_free(&h);
        free(buf);
    }
}
END_TEST

START_TEST(extensions_all)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);
    uint8_t ft[4 * 48], bitmaps[24], unknown[13];
    struct qcow2_header h;
    size_t off, exts_start;
    const char *bname = "base.qcow2";

    th.incompatible_features = QCOW2_INCOMPAT_DATA_FILE;
    th.autoclear_features = QCOW2_AUTOCLEAR_BITMAPS;
    exts_start = off = tu_hdr_write(buf, &th);
    tu_ext_put(buf, &off, QCOW2_EXT_BACKING_FORMAT, "qcow2", 5);
    tu_feature_put(ft, 0, 0, "dirty");
    tu_feature_put(ft + 48, 0, 2, "external data file (test name)");
    tu_feature_put(ft + 96, 1, 0, "lazy refcounts");
    /* A full 46-byte name without a NUL. */
    tu_feature_put(ft + 144, 2, 0, "bitmaps-bitmaps-bitmaps-bitmaps-bitmaps-bitmap");
    tu_ext_put(buf, &off, QCOW2_EXT_FEATURE_TABLE, ft, sizeof(ft));
    tu_ext_put(buf, &off, QCOW2_EXT_DATA_FILE, "disk.data", 9);
    for (unsigned i = 0; i < sizeof(bitmaps); i++)
        bitmaps[i] = (uint8_t)(0xa0 + i);
    tu_ext_put(buf, &off, QCOW2_EXT_BITMAPS, bitmaps, sizeof(bitmaps));
    for (unsigned i = 0; i < sizeof(unknown); i++)
        unknown[i] = (uint8_t)(0xf0 ^ i);
    tu_ext_put(buf, &off, EXT_UNKNOWN, unknown, sizeof(unknown));
    off += 8;
    memcpy(buf + off, bname, strlen(bname));
    th.backing_file_offset = off;
    th.backing_file_size = (uint32_t)strlen(bname);
    tu_hdr_write(buf, &th);

    decode_ok(buf, 1u << 16, tu_default_file_size(16), &h);
    ck_assert_str_eq(h.backing_file, bname);
    ck_assert_str_eq(h.backing_format, "qcow2");
    ck_assert_str_eq(h.data_file, "disk.data");
    ck_assert_uint_eq(h.nb_feature_names, 4);
    ck_assert_uint_eq(h.feature_names[0].type, 0);
    ck_assert_uint_eq(h.feature_names[0].bit, 0);
    ck_assert_str_eq(h.feature_names[0].name, "dirty");
    ck_assert_uint_eq(h.feature_names[1].bit, 2);
    ck_assert_uint_eq(h.feature_names[2].type, 1);
    ck_assert_uint_eq(h.feature_names[3].type, 2);
    ck_assert_str_eq(h.feature_names[3].name,
                     "bitmaps-bitmaps-bitmaps-bitmaps-bitmaps-bitmap");
    ck_assert_uint_eq(h.autoclear_features, QCOW2_AUTOCLEAR_BITMAPS);
    ck_assert_uint_eq(h.incompatible_features, QCOW2_INCOMPAT_DATA_FILE);

    /* Every extension, in file order, payload byte for byte. */
    ck_assert_uint_eq(h.nb_exts, 5);
    ck_assert_uint_eq(h.exts[0].type, QCOW2_EXT_BACKING_FORMAT);
    ck_assert_uint_eq(h.exts[0].len, 5);
    ck_assert_mem_eq(h.exts[0].data, "qcow2", 5);
    ck_assert_uint_eq(h.exts[1].type, QCOW2_EXT_FEATURE_TABLE);
    ck_assert_uint_eq(h.exts[1].len, sizeof(ft));
    ck_assert_mem_eq(h.exts[1].data, ft, sizeof(ft));
    ck_assert_uint_eq(h.exts[2].type, QCOW2_EXT_DATA_FILE);
    ck_assert_mem_eq(h.exts[2].data, "disk.data", 9);
    ck_assert_uint_eq(h.exts[3].type, QCOW2_EXT_BITMAPS);
    ck_assert_uint_eq(h.exts[3].len, 24);
    ck_assert_mem_eq(h.exts[3].data, bitmaps, 24);
    ck_assert_uint_eq(h.exts[4].type, EXT_UNKNOWN);
    ck_assert_uint_eq(h.exts[4].len, sizeof(unknown));
    ck_assert_mem_eq(h.exts[4].data, unknown, sizeof(unknown));
    ck_assert_uint_eq(h.ext_end, off);
    ck_assert_uint_gt(h.ext_end, exts_start);

    check_roundtrip(buf, 1u << 16, &h);

    /* Feature names from the table override the built-in ones. */
    ck_assert_str_eq(header_feature_name(&h, 0, 0), "dirty");
    ck_assert_str_eq(header_feature_name(&h, 0, 2), "external data file (test name)");
    ck_assert_str_eq(header_feature_name(&h, 1, 0), "lazy refcounts");
    /* Not in the table: built-in names, then "unknown". */
    ck_assert_str_ne(header_feature_name(&h, 0, 1), "unknown");
    ck_assert_str_eq(header_feature_name(&h, 0, 40), "unknown");
    header_free(&h);
    free(buf);
}
END_TEST

START_TEST(feature_name_builtin)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);
    struct qcow2_header h;

    tu_hdr_write(buf, &th);
    decode_ok(buf, 1u << 16, tu_default_file_size(16), &h);
    for (unsigned bit = 0; bit < 5; bit++) {
        const char *n = header_feature_name(&h, 0, bit);
        ck_assert_ptr_nonnull(n);
        ck_assert_str_ne(n, "unknown");
        ck_assert_str_ne(n, "");
        /* Distinct names for distinct bits. */
        for (unsigned b2 = 0; b2 < bit; b2++)
            ck_assert_str_ne(n, header_feature_name(&h, 0, b2));
    }
    ck_assert_str_eq(header_feature_name(&h, 0, 5), "unknown");
    ck_assert_str_eq(header_feature_name(&h, 0, 20), "unknown");
    ck_assert_str_eq(header_feature_name(&h, 0, 63), "unknown");
    header_free(&h);
    free(buf);
}
END_TEST

START_TEST(feature_name_type_matters)
{
    /* A name for compatible bit 7 must not be used for incompatible bit 7. */
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);
    uint8_t ft[48];
    struct qcow2_header h;
    size_t off;

    off = tu_hdr_write(buf, &th);
    tu_feature_put(ft, 1, 7, "compat seven");
    tu_ext_put(buf, &off, QCOW2_EXT_FEATURE_TABLE, ft, sizeof(ft));
    decode_ok(buf, 1u << 16, tu_default_file_size(16), &h);
    ck_assert_str_eq(header_feature_name(&h, 1, 7), "compat seven");
    ck_assert_str_eq(header_feature_name(&h, 0, 7), "unknown");
    ck_assert_str_eq(header_feature_name(&h, 2, 7), "unknown");
    header_free(&h);
    free(buf);
}
END_TEST

START_TEST(backing_name_from_offset)
{
    /* The name is read where backing_file_offset points, not assumed to
     * follow the extensions. */
    for (uint32_t version = 2; version <= 3; version++) {
        struct tu_hdr th = tu_hdr_default(version, 12);
        uint8_t *buf = cluster_buf(12), *out = cluster_buf(12);
        struct qcow2_header h, h2;
        const char *name = "/images/base.raw";
        size_t off;
        int n;

        off = tu_hdr_write(buf, &th);
        tu_ext_put(buf, &off, QCOW2_EXT_BACKING_FORMAT, "raw", 3);
        th.backing_file_offset = 1000;
        th.backing_file_size = (uint32_t)strlen(name);
        memcpy(buf + 1000, name, strlen(name));
        memcpy(buf + 1000 + strlen(name), "garbage", 7);
        tu_hdr_write(buf, &th);

        decode_ok(buf, 1u << 12, tu_default_file_size(12), &h);
        ck_assert_str_eq(h.backing_file, name);
        ck_assert_str_eq(h.backing_format, "raw");

        /* Encoding moves the name right after the END marker. */
        n = header_encode(&h, out, 1u << 12);
        ck_assert_int_gt(n, 0);
        ck_assert_uint_eq(h.backing_file_offset, h.ext_end);
        ck_assert_uint_eq(h.backing_file_size, strlen(name));
        ck_assert_uint_eq(be64_get(out + 8), h.ext_end);
        ck_assert_uint_eq(be32_get(out + 16), strlen(name));
        ck_assert_mem_eq(out + h.ext_end, name, strlen(name));
        ck_assert_uint_eq((unsigned)n, h.ext_end + strlen(name));

        decode_ok(out, 1u << 12, tu_default_file_size(12), &h2);
        ck_assert_str_eq(h2.backing_file, name);
        ck_assert_str_eq(h2.backing_format, "raw");
        header_free(&h2);
        header_free(&h);
        free(out);
        free(buf);
    }
}
END_TEST

START_TEST(encode_changed_backing)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16), *out = cluster_buf(16);
    struct qcow2_header h, h2;
    size_t off;
    int n;

    off = tu_hdr_write(buf, &th);
    tu_ext_put(buf, &off, EXT_UNKNOWN, "0123456789", 10);
    decode_ok(buf, 1u << 16, tu_default_file_size(16), &h);
    ck_assert_ptr_null(h.backing_file);

    h.backing_file = strdup("new-backing.qcow2");
    n = header_encode(&h, out, 1u << 16);
    ck_assert_int_gt(n, 0);
    decode_ok(out, 1u << 16, tu_default_file_size(16), &h2);
    ck_assert_str_eq(h2.backing_file, "new-backing.qcow2");
    ck_assert_uint_eq(h2.nb_exts, 1);
    ck_assert_mem_eq(h2.exts[0].data, "0123456789", 10);
    header_free(&h2);

    /* And removing it again clears offset and size. */
    free(h.backing_file);
    h.backing_file = NULL;
    n = header_encode(&h, out, 1u << 16);
    ck_assert_int_gt(n, 0);
    ck_assert_uint_eq(be64_get(out + 8), 0);
    ck_assert_uint_eq(be32_get(out + 16), 0);
    ck_assert_uint_eq(h.backing_file_offset, 0);
    ck_assert_uint_eq(h.backing_file_size, 0);
    ck_assert_mem_eq(out, buf, 1u << 16);
    header_free(&h);
    free(out);
    free(buf);
}
END_TEST

START_TEST(encode_enospc)
{
    struct tu_hdr th = tu_hdr_default(3, 9);
    uint8_t *buf = cluster_buf(9), *out = cluster_buf(9);
    uint8_t payload[200];
    struct qcow2_header h;
    size_t off;

    memset(payload, 0x5a, sizeof(payload));
    off = tu_hdr_write(buf, &th);
    tu_ext_put(buf, &off, EXT_UNKNOWN, payload, sizeof(payload));
    decode_ok(buf, 512, tu_default_file_size(9), &h);
    /* 112 + 208 + 8 = 328 bytes fit in 512; with a 300-byte name they do not. */
    ck_assert_int_eq(header_encode(&h, out, 512), 328);
    ck_assert_int_eq(header_encode(&h, out, 327), -ENOSPC);
    h.backing_file = tu_zalloc(301);
    memset(h.backing_file, 'x', 300);
    ck_assert_int_eq(header_encode(&h, out, 512), -ENOSPC);
    header_free(&h);
    free(out);
    free(buf);
}
END_TEST

START_TEST(decode_short_buffer_v2)
{
    /* A v2 image of only 72 bytes + END (the whole file). */
    struct tu_hdr th = tu_hdr_default(2, 16);
    uint8_t buf[80] = { 0 };
    struct qcow2_header h;

    th.l1_size = 0;
    th.l1_table_offset = 0;
    th.size = 0;
    th.refcount_table_offset = 1u << 16;
    tu_hdr_write(buf, &th);
    decode_ok(buf, sizeof(buf), 2u << 16, &h);
    ck_assert_uint_eq(h.size, 0);
    header_free(&h);
}
END_TEST

START_TEST(decode_reuse_after_free)
{
    /* header_free leaves *h ready to be decoded into again. */
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);
    struct qcow2_header h;
    size_t off;

    off = tu_hdr_write(buf, &th);
    tu_ext_put(buf, &off, QCOW2_EXT_BACKING_FORMAT, "qcow2", 5);
    decode_ok(buf, 1u << 16, tu_default_file_size(16), &h);
    header_free(&h);
    decode_ok(buf, 1u << 16, tu_default_file_size(16), &h);
    ck_assert_str_eq(h.backing_format, "qcow2");
    header_free(&h);
    free(buf);
}
END_TEST

/* ---- invalid headers ----------------------------------------------------- */

START_TEST(bad_magic)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);

    tu_hdr_write(buf, &th);
    buf[3] = 0xfa;
    expect_fail_buf(buf, 1u << 16, tu_default_file_size(16), -EINVAL, "magic");
    memset(buf, 0, 4);
    expect_fail_buf(buf, 1u << 16, tu_default_file_size(16), -EINVAL, "magic");
    free(buf);
}
END_TEST

START_TEST(bad_version)
{
    struct tu_hdr th = tu_hdr_default(3, 16);

    th.version = 1;
    expect_fail(&th, tu_default_file_size(16), -ENOTSUP, "version");
    th.version = 4;
    expect_fail(&th, tu_default_file_size(16), -ENOTSUP, "version");
    th.version = 0;
    expect_fail(&th, tu_default_file_size(16), -ENOTSUP, "version");
}
END_TEST

START_TEST(bad_cluster_bits)
{
    for (uint32_t v = 2; v <= 3; v++) {
        struct tu_hdr th = tu_hdr_default(v, 16);
        th.cluster_bits = 8;
        expect_fail(&th, 1u << 20, -EINVAL, "cluster_bits");
        th.cluster_bits = 22;
        expect_fail(&th, 1u << 24, -EINVAL, "cluster_bits");
        th.cluster_bits = 0;
        expect_fail(&th, 1u << 20, -EINVAL, "cluster_bits");
        th.cluster_bits = 64;
        expect_fail(&th, 1u << 20, -EINVAL, "cluster_bits");
    }
}
END_TEST

START_TEST(bad_header_length)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf;

    th.header_length = 100;
    expect_fail(&th, tu_default_file_size(16), -EINVAL, "header_length");
    th.header_length = 108;             /* not a multiple of 8 */
    expect_fail(&th, tu_default_file_size(16), -EINVAL, "header_length");
    th.header_length = 113;
    expect_fail(&th, tu_default_file_size(16), -EINVAL, "header_length");
    th.header_length = 0;
    expect_fail(&th, tu_default_file_size(16), -EINVAL, "header_length");

    /* Bigger than the cluster. */
    th = tu_hdr_default(3, 9);
    th.header_length = 520;
    buf = tu_zalloc(1024);
    tu_hdr_write(buf, &th);
    expect_fail_buf(buf, 1024, tu_default_file_size(9), -EINVAL, "header_length");
    free(buf);

    /* Longer than the file. */
    th = tu_hdr_default(3, 16);
    th.header_length = 256;
    buf = tu_zalloc(200);
    tu_hdr_write(buf, &th);
    expect_fail_buf(buf, 200, 200, -EINVAL, "header_length");
    free(buf);
}
END_TEST

START_TEST(bad_short_file)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t buf[112] = { 0 };
    struct qcow2_header h;
    char err[256] = "";

    tu_hdr_write(buf, &th);
    ck_assert_int_eq(header_decode(buf, 60, 60, &h, err, sizeof(err)), -EINVAL);
    ck_assert_str_ne(err, "");
    ck_assert_int_eq(header_decode(buf, 90, 90, &h, err, sizeof(err)), -EINVAL);
    /* A NULL err is allowed. */
    ck_assert_int_eq(header_decode(buf, 0, 0, &h, NULL, 0), -EINVAL);
}
END_TEST

START_TEST(bad_refcount_order)
{
    struct tu_hdr th = tu_hdr_default(3, 16);

    th.refcount_order = 7;
    expect_fail(&th, tu_default_file_size(16), -EINVAL, "refcount_order");
    th.refcount_order = 0xffffffffu;
    expect_fail(&th, tu_default_file_size(16), -EINVAL, "refcount_order");
    /* With unknown extra header fields allocated first (no leak). */
    th.refcount_order = 7;
    th.header_length = 128;
    expect_fail(&th, tu_default_file_size(16), -EINVAL, "refcount_order");
}
END_TEST

START_TEST(bad_l1)
{
    struct tu_hdr th;
    uint64_t fsz = tu_default_file_size(9);

    /* cluster_bits 9: one L2 table maps 64 clusters. */
    th = tu_hdr_default(3, 9);
    th.size = 64 * 512 + 1;
    expect_fail(&th, fsz, -EINVAL, "l1_size");
    th.size = 640 * 512;
    th.l1_size = 9;
    expect_fail(&th, 1u << 20, -EINVAL, "l1_size");

    th = tu_hdr_default(3, 16);
    th.l1_size = HEADER_MAX_L1_BYTES / 8 + 1;
    expect_fail(&th, 1ull << 40, -EINVAL, "l1_size");
    th.l1_size = 0xffffffffu;
    expect_fail(&th, 1ull << 40, -EINVAL, "l1_size");

    th = tu_hdr_default(3, 16);
    th.l1_table_offset += 8;
    expect_fail(&th, tu_default_file_size(16), -EINVAL, "l1_table_offset");
    th.l1_table_offset = 0;
    expect_fail(&th, tu_default_file_size(16), -EINVAL, "l1_table_offset");

    /* Past the end of the file. */
    th = tu_hdr_default(3, 16);
    th.l1_table_offset = 10ull << 16;
    expect_fail(&th, tu_default_file_size(16), -EINVAL, "l1_table_offset");
    /* Starts inside but runs past the end. */
    th = tu_hdr_default(3, 16);
    th.l1_size = (1u << 16) / 8 + 1;
    expect_fail(&th, tu_default_file_size(16), -EINVAL, "l1_table_offset");
    /* Offset so large that offset + size would wrap. */
    th = tu_hdr_default(3, 16);
    th.l1_table_offset = 0xffffffffffff0000ull;
    expect_fail(&th, tu_default_file_size(16), -EINVAL, "l1_table_offset");
}
END_TEST

START_TEST(bad_size)
{
    struct tu_hdr th = tu_hdr_default(3, 16);

    th.size = 1ull << 62;
    th.l1_size = HEADER_MAX_L1_BYTES / 8;
    expect_fail(&th, 1ull << 40, -EINVAL, "size");
    th.size = UINT64_MAX;
    expect_fail(&th, 1ull << 40, -EINVAL, "size");
}
END_TEST

START_TEST(bad_refcount_table)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint64_t fsz = tu_default_file_size(16);

    th.refcount_table_offset += 512;
    expect_fail(&th, fsz, -EINVAL, "refcount_table_offset");
    th.refcount_table_offset = 0;
    expect_fail(&th, fsz, -EINVAL, "refcount_table_offset");
    th.refcount_table_offset = 100ull << 16;
    expect_fail(&th, fsz, -EINVAL, "refcount_table_offset");
    th.refcount_table_offset = 0xffffffffffff0000ull;
    expect_fail(&th, fsz, -EINVAL, "refcount_table_offset");

    th = tu_hdr_default(3, 16);
    th.refcount_table_clusters = 0;
    expect_fail(&th, fsz, -EINVAL, "refcount_table_clusters");
    th.refcount_table_clusters = HEADER_MAX_REFTABLE_BYTES / (1u << 16) + 1;
    expect_fail(&th, 1ull << 40, -EINVAL, "refcount_table_clusters");
    th.refcount_table_clusters = 0xffffffffu;
    expect_fail(&th, 1ull << 40, -EINVAL, "refcount_table_clusters");
    /* Within the limit but running well past the end of the file. */
    th.refcount_table_clusters = 10;
    expect_fail(&th, fsz, -EINVAL, "refcount_table");
}
END_TEST

START_TEST(bad_snapshots)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint64_t fsz = tu_default_file_size(16);

    th.nb_snapshots = HEADER_MAX_SNAPSHOTS + 1;
    th.snapshots_offset = 2ull << 16;
    expect_fail(&th, fsz, -EINVAL, "nb_snapshots");
    th.nb_snapshots = 1;
    th.snapshots_offset = (2ull << 16) + 8;
    expect_fail(&th, fsz, -EINVAL, "snapshots_offset");
    th.snapshots_offset = 0;
    expect_fail(&th, fsz, -EINVAL, "snapshots_offset");
    th.snapshots_offset = 50ull << 16;
    expect_fail(&th, fsz, -EINVAL, "snapshots_offset");
    /* Without snapshots the offset is still checked for alignment and
     * range, as QEMU does (qemu-iotests 080); 0 or aligned is fine. */
    th.nb_snapshots = 0;
    th.snapshots_offset = 0x1234567890abcdefull;
    expect_fail(&th, fsz, -EINVAL, "snapshots_offset");
    th.snapshots_offset = 0xffffffffffff0000ull;
    expect_fail(&th, fsz, -EINVAL, "snapshots_offset");
}
END_TEST

START_TEST(ok_snapshots_offset_without_snapshots)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);
    struct qcow2_header h;

    th.nb_snapshots = 0;
    th.snapshots_offset = 50ull << 16;      /* past the end, but unused */
    tu_hdr_write(buf, &th);
    decode_ok(buf, 1u << 16, tu_default_file_size(16), &h);
    header_free(&h);
    free(buf);
}
END_TEST

START_TEST(bad_backing_file)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint64_t fsz = tu_default_file_size(16);
    uint8_t *buf;

    th.backing_file_offset = 200;
    th.backing_file_size = 0;
    expect_fail(&th, fsz, -EINVAL, "backing_file_size");
    th.backing_file_size = 1024;
    expect_fail(&th, fsz, -EINVAL, "backing_file_size");

    /* Partly outside the first cluster. */
    th.backing_file_offset = (1u << 16) - 4;
    th.backing_file_size = 10;
    expect_fail(&th, fsz, -EINVAL, "backing_file_offset");
    /* Entirely outside. */
    th.backing_file_offset = 3ull << 16;
    expect_fail(&th, fsz, -EINVAL, "backing_file_offset");
    th.backing_file_offset = 0xfffffffffffffff0ull;
    expect_fail(&th, fsz, -EINVAL, "backing_file_offset");
    /* Overlapping the fixed header. */
    th.backing_file_offset = 8;
    expect_fail(&th, fsz, -EINVAL, "backing_file_offset");

    /* Inside the cluster but beyond the bytes we were given. */
    th.backing_file_offset = 300;
    th.backing_file_size = 10;
    buf = tu_zalloc(304);
    tu_hdr_write(buf, &th);
    expect_fail_buf(buf, 304, 304 + (1u << 20), -EINVAL, "backing_file_offset");
    free(buf);
}
END_TEST

START_TEST(bad_backing_file_nul)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);

    th.backing_file_offset = 200;
    th.backing_file_size = 8;
    tu_hdr_write(buf, &th);
    memcpy(buf + 200, "ab\0cdefg", 8);
    expect_fail_buf(buf, 1u << 16, tu_default_file_size(16), -EINVAL, "backing");
    free(buf);
}
END_TEST

START_TEST(bad_compression)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint64_t fsz = tu_default_file_size(16);

    /* Bit without a type byte (header_length 104) or with type 0. */
    th.incompatible_features = QCOW2_INCOMPAT_COMPRESSION;
    th.header_length = 104;
    expect_fail(&th, fsz, -EINVAL, "compression_type");
    th.header_length = 112;
    th.compression_type = 0;
    expect_fail(&th, fsz, -EINVAL, "compression_type");
    /* Type without the bit. */
    th.incompatible_features = 0;
    th.compression_type = 1;
    expect_fail(&th, fsz, -EINVAL, "compression_type");
    /* An unknown type. */
    th.incompatible_features = QCOW2_INCOMPAT_COMPRESSION;
    th.compression_type = 2;
    expect_fail(&th, fsz, -ENOTSUP, "compression_type");
    th.compression_type = 0xff;
    expect_fail(&th, fsz, -ENOTSUP, "compression_type");
}
END_TEST

START_TEST(bad_extended_l2_small_cluster)
{
    struct tu_hdr th = tu_hdr_default(3, 13);

    th.incompatible_features = QCOW2_INCOMPAT_EXTL2;
    expect_fail(&th, tu_default_file_size(13), -EINVAL, "cluster_bits");
    th = tu_hdr_default(3, 9);
    th.incompatible_features = QCOW2_INCOMPAT_EXTL2;
    expect_fail(&th, tu_default_file_size(9), -EINVAL, "cluster_bits");
}
END_TEST

START_TEST(ok_extended_l2_14)
{
    struct tu_hdr th = tu_hdr_default(3, 14);
    uint8_t *buf = cluster_buf(14);
    struct qcow2_header h;

    th.incompatible_features = QCOW2_INCOMPAT_EXTL2;
    tu_hdr_write(buf, &th);
    decode_ok(buf, 1u << 14, tu_default_file_size(14), &h);
    ck_assert_uint_eq(h.incompatible_features, QCOW2_INCOMPAT_EXTL2);
    header_free(&h);
    free(buf);
}
END_TEST

START_TEST(bad_crypt_method)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint64_t fsz = tu_default_file_size(16);

    for (uint32_t m = 1; m <= 2; m++) {
        uint8_t *buf = cluster_buf(16);
        struct qcow2_header h;
        char err[512] = "";

        th.crypt_method = m;
        tu_hdr_write(buf, &th);
        ck_assert_int_eq(header_decode(buf, 1u << 16, fsz, &h, err, sizeof(err)),
                         -ENOTSUP);
        ck_assert_msg(strstr(err, "not supported"), "message: %s", err);
        ck_assert_msg(strstr(err, "crypt_method") || strcasestr(err, "encrypt"),
                      "message: %s", err);
        free(buf);
    }
    th.crypt_method = 3;
    expect_fail(&th, fsz, -EINVAL, "crypt_method");
}
END_TEST

START_TEST(bad_unknown_incompat_bit)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint64_t fsz = tu_default_file_size(16);

    th.incompatible_features = 1ull << 20;
    expect_fail(&th, fsz, -ENOTSUP, "bit 20");
    th.incompatible_features = (1ull << 20) | (1ull << 33) | QCOW2_INCOMPAT_DIRTY;
    expect_fail(&th, fsz, -ENOTSUP, "bit 20");
    th.incompatible_features = 1ull << 63;
    expect_fail(&th, fsz, -ENOTSUP, "bit 63");
    /* On a v2 header the field does not exist: bytes 72.. are extensions. */
}
END_TEST

START_TEST(bad_unknown_incompat_bit_named)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);
    uint8_t ft[3 * 48];
    size_t off;

    th.incompatible_features = 1ull << 20;
    off = tu_hdr_write(buf, &th);
    tu_ext_put(buf, &off, QCOW2_EXT_BACKING_FORMAT, "qcow2", 5);
    tu_feature_put(ft, 1, 20, "compat twenty");
    tu_feature_put(ft + 48, 0, 20, "frobnication");
    tu_feature_put(ft + 96, 2, 20, "autoclear twenty");
    tu_ext_put(buf, &off, QCOW2_EXT_FEATURE_TABLE, ft, sizeof(ft));
    tu_ext_put(buf, &off, EXT_UNKNOWN, "xyz", 3);
    expect_fail_buf(buf, 1u << 16, tu_default_file_size(16), -ENOTSUP,
                    "frobnication");
    free(buf);
}
END_TEST

/* Every unknown bit is named, each by its own entry of the table. */
START_TEST(bad_unknown_incompat_bits_all_named)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);
    uint8_t ft[3 * 48];
    const char *want[] = { "\"test1\" (bit 61)", "\"test2\" (bit 62)",
                           "unknown bit 63", "features" };
    struct qcow2_header h;
    char err[512] = "";
    size_t off;

    th.incompatible_features = 7ull << 61;
    off = tu_hdr_write(buf, &th);
    tu_feature_put(ft, 0, 61, "test1");
    tu_feature_put(ft + 48, 0, 62, "test2");
    tu_feature_put(ft + 96, 2, 63, "autoclear name");
    tu_ext_put(buf, &off, QCOW2_EXT_FEATURE_TABLE, ft, sizeof(ft));
    ck_assert_int_eq(header_decode(buf, 1u << 16, tu_default_file_size(16), &h,
                                   err, sizeof(err)), -ENOTSUP);
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++)
        ck_assert_msg(strstr(err, want[i]), "message \"%s\" lacks \"%s\"", err, want[i]);
    ck_assert_msg(!strstr(err, "autoclear name"), "message \"%s\" names another type's bit", err);
    free(buf);
}
END_TEST

START_TEST(bad_ext_past_cluster)
{
    struct tu_hdr th = tu_hdr_default(3, 9);
    uint8_t *buf = tu_zalloc(4096);
    size_t off;

    off = tu_hdr_write(buf, &th);
    tu_ext_put(buf, &off, QCOW2_EXT_BACKING_FORMAT, "qcow2", 5);
    /* 112 + 16 + 8 + 392 = 528 > 512: the payload runs into cluster 1. */
    be32_put(buf + off, EXT_UNKNOWN);
    be32_put(buf + off + 4, 392);
    expect_fail_buf(buf, 4096, 4096, -EINVAL, "extension");
    /* A huge length must not wrap around. */
    be32_put(buf + off + 4, 0xfffffff8u);
    expect_fail_buf(buf, 4096, 4096, -EINVAL, "extension");
    free(buf);
}
END_TEST

START_TEST(bad_ext_past_backing_name)
{
    /* Extensions end where the backing name starts. */
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);
    uint8_t payload[64] = { 0 };
    size_t off;

    th.backing_file_offset = 160;
    th.backing_file_size = 4;
    off = tu_hdr_write(buf, &th);
    tu_ext_put(buf, &off, EXT_UNKNOWN, payload, sizeof(payload));  /* to 184 */
    memcpy(buf + 160, "base", 4);
    expect_fail_buf(buf, 1u << 16, tu_default_file_size(16), -EINVAL, "extension");
    free(buf);
}
END_TEST

START_TEST(bad_ext_duplicate)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);
    uint8_t ft[48];
    size_t off;

    off = tu_hdr_write(buf, &th);
    tu_ext_put(buf, &off, QCOW2_EXT_BACKING_FORMAT, "qcow2", 5);
    tu_feature_put(ft, 0, 0, "dirty");
    tu_ext_put(buf, &off, QCOW2_EXT_FEATURE_TABLE, ft, sizeof(ft));
    tu_ext_put(buf, &off, QCOW2_EXT_BACKING_FORMAT, "raw", 3);
    expect_fail_buf(buf, 1u << 16, tu_default_file_size(16), -EINVAL, "e2792aca");
    free(buf);
}
END_TEST

START_TEST(bad_ext_payloads)
{
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint64_t fsz = tu_default_file_size(16);
    uint8_t *buf = cluster_buf(16);
    uint8_t data[100] = { 0 };
    size_t off;

    /* Backing format: empty, too long, or with a NUL. */
    off = tu_hdr_write(buf, &th);
    tu_ext_put(buf, &off, QCOW2_EXT_BACKING_FORMAT, "", 0);
    expect_fail_buf(buf, 1u << 16, fsz, -EINVAL, "backing format");
    memset(buf, 0, 1u << 16);
    off = tu_hdr_write(buf, &th);
    tu_ext_put(buf, &off, QCOW2_EXT_BACKING_FORMAT, "qc\0w2", 5);
    expect_fail_buf(buf, 1u << 16, fsz, -EINVAL, "backing format");

    /* Feature table not a multiple of 48. */
    memset(buf, 0, 1u << 16);
    off = tu_hdr_write(buf, &th);
    tu_ext_put(buf, &off, QCOW2_EXT_FEATURE_TABLE, data, 50);
    expect_fail_buf(buf, 1u << 16, fsz, -EINVAL, "feature");

    /* Bitmaps extension too short. */
    memset(buf, 0, 1u << 16);
    off = tu_hdr_write(buf, &th);
    tu_ext_put(buf, &off, QCOW2_EXT_BITMAPS, data, 16);
    expect_fail_buf(buf, 1u << 16, fsz, -EINVAL, "bitmaps");

    /* Data file name empty. */
    memset(buf, 0, 1u << 16);
    off = tu_hdr_write(buf, &th);
    tu_ext_put(buf, &off, QCOW2_EXT_DATA_FILE, "", 0);
    expect_fail_buf(buf, 1u << 16, fsz, -EINVAL, "data file");
    free(buf);
}
END_TEST

START_TEST(bad_after_extensions_no_leak)
{
    /* An error found after extensions were decoded must free them (the
     * ASan build checks): an invalid bitmaps extension after several valid
     * ones, with a backing name and extra header fields. */
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);
    uint8_t ft[96], data[8] = { 0 };
    size_t off;

    th.header_length = 128;
    th.backing_file_offset = 4000;
    th.backing_file_size = 4;
    off = tu_hdr_write(buf, &th);
    tu_ext_put(buf, &off, QCOW2_EXT_BACKING_FORMAT, "qcow2", 5);
    tu_feature_put(ft, 0, 0, "a");
    tu_feature_put(ft + 48, 0, 1, "b");
    tu_ext_put(buf, &off, QCOW2_EXT_FEATURE_TABLE, ft, sizeof(ft));
    tu_ext_put(buf, &off, QCOW2_EXT_DATA_FILE, "d", 1);
    tu_ext_put(buf, &off, EXT_UNKNOWN, "u", 1);
    tu_ext_put(buf, &off, QCOW2_EXT_BITMAPS, data, sizeof(data));
    memcpy(buf + 4000, "base", 4);
    expect_fail_buf(buf, 1u << 16, tu_default_file_size(16), -EINVAL, "bitmaps");
    free(buf);
}
END_TEST

/* ---- named offsets --------------------------------------------------------- */

START_TEST(field_offsets_match_layout)
{
    /* testutil writes the fields at the spec's offsets, spelled out: each
     * named offset must find its field there. */
    struct tu_hdr th = tu_hdr_default(3, 16);
    uint8_t *buf = cluster_buf(16);

    th.backing_file_offset = 0x1111;
    th.backing_file_size = 0x2222;
    th.crypt_method = 0x3333;
    th.nb_snapshots = 0x4444;
    th.snapshots_offset = 0x5555000000ull;
    th.incompatible_features = 0x0102030405060708ull;
    th.compatible_features = 0x1112131415161718ull;
    th.autoclear_features = 0x2122232425262728ull;
    th.refcount_order = 5;
    th.header_length = 120;
    th.compression_type = 0x77;
    tu_hdr_write(buf, &th);

    ck_assert_uint_eq(be32_get(buf + QCOW2_HDR_MAGIC), QCOW2_MAGIC);
    ck_assert_uint_eq(be32_get(buf + QCOW2_HDR_VERSION), th.version);
    ck_assert_uint_eq(be64_get(buf + QCOW2_HDR_BACKING_FILE_OFFSET), th.backing_file_offset);
    ck_assert_uint_eq(be32_get(buf + QCOW2_HDR_BACKING_FILE_SIZE), th.backing_file_size);
    ck_assert_uint_eq(be32_get(buf + QCOW2_HDR_CLUSTER_BITS), th.cluster_bits);
    ck_assert_uint_eq(be64_get(buf + QCOW2_HDR_SIZE), th.size);
    ck_assert_uint_eq(be32_get(buf + QCOW2_HDR_CRYPT_METHOD), th.crypt_method);
    ck_assert_uint_eq(be32_get(buf + QCOW2_HDR_L1_SIZE), th.l1_size);
    ck_assert_uint_eq(be64_get(buf + QCOW2_HDR_L1_TABLE_OFFSET), th.l1_table_offset);
    ck_assert_uint_eq(be64_get(buf + QCOW2_HDR_REFCOUNT_TABLE_OFFSET), th.refcount_table_offset);
    ck_assert_uint_eq(be32_get(buf + QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS),
                      th.refcount_table_clusters);
    ck_assert_uint_eq(be32_get(buf + QCOW2_HDR_NB_SNAPSHOTS), th.nb_snapshots);
    ck_assert_uint_eq(be64_get(buf + QCOW2_HDR_SNAPSHOTS_OFFSET), th.snapshots_offset);
    ck_assert_uint_eq(be64_get(buf + QCOW2_HDR_INCOMPATIBLE_FEATURES), th.incompatible_features);
    ck_assert_uint_eq(be64_get(buf + QCOW2_HDR_COMPATIBLE_FEATURES), th.compatible_features);
    ck_assert_uint_eq(be64_get(buf + QCOW2_HDR_AUTOCLEAR_FEATURES), th.autoclear_features);
    ck_assert_uint_eq(be32_get(buf + QCOW2_HDR_REFCOUNT_ORDER), th.refcount_order);
    ck_assert_uint_eq(be32_get(buf + QCOW2_HDR_HEADER_LENGTH), th.header_length);
    ck_assert_uint_eq(buf[QCOW2_HDR_COMPRESSION_TYPE], th.compression_type);
    ck_assert_uint_eq(QCOW2_V2_HEADER_LEN, tu_hdr_default(2, 16).header_length);
    ck_assert_uint_eq(QCOW2_V3_HEADER_LEN, tu_hdr_default(3, 16).header_length);
    free(buf);
}
END_TEST

/* ---- header_read and the field writers, through a watching backend -------- */

/* Forwards to a memory backend; records reads and writes; can fail reads
 * or the size query. */
struct watch_io {
    struct tu_fwd_io fwd;
    unsigned preads, pwrites;
    uint64_t pread_off, pwrite_off;
    size_t pread_len, pwrite_len;
    int fail_pread, fail_size;          /* -errno to return, or 0 */
};

static int watch_pread(struct io *io, void *buf, size_t len, uint64_t off)
{
    struct watch_io *w = (struct watch_io *)io;

    w->preads++;
    w->pread_off = off;
    w->pread_len = len;
    return w->fail_pread ? w->fail_pread : tu_fwd_pread(io, buf, len, off);
}

static int watch_pwrite(struct io *io, const void *buf, size_t len, uint64_t off)
{
    struct watch_io *w = (struct watch_io *)io;

    w->pwrites++;
    w->pwrite_off = off;
    w->pwrite_len = len;
    return tu_fwd_pwrite(io, buf, len, off);
}

static int watch_get_size(struct io *io, uint64_t *size)
{
    struct watch_io *w = (struct watch_io *)io;

    return w->fail_size ? w->fail_size : tu_fwd_get_size(io, size);
}

static void watch_close(struct io *io)
{
    io_close(tu_fwd_inner(io));
    free(io);
}

static const struct io_ops watch_ops = {
    .pread = watch_pread,
    .pwrite = watch_pwrite,
    .flush = tu_fwd_flush,
    .get_size = watch_get_size,
    .truncate = tu_fwd_truncate,
    .punch_hole = tu_fwd_punch,
    .close = watch_close,
};

/* A watching backend over a copy of @data. */
static struct watch_io *watch_open(const void *data, size_t len)
{
    struct watch_io *w = tu_zalloc(sizeof(*w));

    ck_assert_int_eq(io_open_memory(data, len, &w->fwd.inner), 0);
    w->fwd.io.ops = &watch_ops;
    return w;
}

/* A valid image file of tu_default_file_size(@cb) bytes: the default header
 * with a backing format extension and a backing name. */
static uint8_t *image_file(unsigned cb, size_t *len)
{
    struct tu_hdr th = tu_hdr_default(3, cb);
    uint8_t *file;
    size_t off;

    *len = (size_t)tu_default_file_size(cb);
    file = tu_zalloc(*len);
    th.backing_file_offset = 400;
    th.backing_file_size = 4;
    off = tu_hdr_write(file, &th);
    tu_ext_put(file, &off, QCOW2_EXT_BACKING_FORMAT, "qcow2", 5);
    memcpy(file + 400, "base", 4);
    return file;
}

START_TEST(read_whole_short_file)
{
    /* A file shorter than 2 MiB is read whole, in one read from 0, and
     * decoded as header_decode decodes the same bytes. */
    size_t len;
    uint8_t *file = image_file(16, &len);
    struct watch_io *w = watch_open(file, len);
    struct qcow2_header h, ref;
    char err[512] = "x";

    ck_assert_int_eq(header_read(&w->fwd.io, &h, err, sizeof(err)), 0);
    ck_assert_uint_eq(w->preads, 1);
    ck_assert_uint_eq(w->pread_off, 0);
    ck_assert_uint_eq(w->pread_len, len);
    decode_ok(file, len, len, &ref);
    ck_assert_uint_eq(h.size, ref.size);
    ck_assert_uint_eq(h.l1_table_offset, ref.l1_table_offset);
    ck_assert_uint_eq(h.refcount_table_offset, ref.refcount_table_offset);
    ck_assert_uint_eq(h.ext_end, ref.ext_end);
    ck_assert_uint_eq(h.nb_exts, 1);
    ck_assert_str_eq(h.backing_file, "base");
    ck_assert_str_eq(h.backing_format, "qcow2");
    header_free(&ref);
    header_free(&h);
    io_close(&w->fwd.io);
    free(file);
}
END_TEST

START_TEST(read_first_2mib_only)
{
    /* A file larger than the largest cluster: only its first 2 MiB are
     * read, and that is enough for a 2 MiB-cluster header. */
    size_t len;
    uint8_t *file = image_file(21, &len);
    struct watch_io *w = watch_open(file, len);
    struct qcow2_header h;
    char err[512] = "";

    ck_assert_uint_gt(len, 2u << 20);
    ck_assert_msg(header_read(&w->fwd.io, &h, err, sizeof(err)) == 0, "%s", err);
    ck_assert_uint_eq(w->preads, 1);
    ck_assert_uint_eq(w->pread_off, 0);
    ck_assert_uint_eq(w->pread_len, 2u << 20);
    ck_assert_uint_eq(h.cluster_bits, 21);
    ck_assert_str_eq(h.backing_file, "base");
    header_free(&h);
    io_close(&w->fwd.io);
    free(file);
}
END_TEST

START_TEST(read_refusals)
{
    /* A refused header: header_decode's code and message; the message of a
     * file shorter than a header names the bytes it has. */
    static const uint8_t garbage[200] = { 'Q', 'F', 'I', 0 };
    struct qcow2_header h;
    char err[512];
    struct watch_io *w = watch_open(NULL, 0);

    ck_assert_int_eq(header_read(&w->fwd.io, &h, err, sizeof(err)), -EINVAL);
    ck_assert_str_eq(err, "file is 0 bytes, too short for a qcow2 header");
    io_close(&w->fwd.io);

    w = watch_open(garbage, 60);
    ck_assert_int_eq(header_read(&w->fwd.io, &h, err, sizeof(err)), -EINVAL);
    ck_assert_str_eq(err, "file is 60 bytes, too short for a qcow2 header");
    io_close(&w->fwd.io);

    w = watch_open(garbage, sizeof(garbage));
    ck_assert_int_eq(header_read(&w->fwd.io, &h, err, sizeof(err)), -EINVAL);
    ck_assert_str_eq(err, "not a qcow2 image: magic (offset 0) is 0x51464900, "
                          "expected 0x514649fb (\"QFI\\xfb\")");
    io_close(&w->fwd.io);
}
END_TEST

START_TEST(read_io_errors)
{
    /* A file that cannot be sized or read: that -errno, and no message
     * (nothing was decoded; the caller names the failed read). */
    size_t len;
    uint8_t *file = image_file(16, &len);
    struct watch_io *w = watch_open(file, len);
    struct qcow2_header h;
    char err[512];

    w->fail_size = -EBADF;
    strcpy(err, "stale");
    ck_assert_int_eq(header_read(&w->fwd.io, &h, err, sizeof(err)), -EBADF);
    ck_assert_str_eq(err, "");
    ck_assert_uint_eq(w->preads, 0);

    w->fail_size = 0;
    w->fail_pread = -EIO;
    strcpy(err, "stale");
    ck_assert_int_eq(header_read(&w->fwd.io, &h, err, sizeof(err)), -EIO);
    ck_assert_str_eq(err, "");
    ck_assert_uint_eq(w->preads, 1);
    /* A NULL message buffer is allowed. */
    ck_assert_int_eq(header_read(&w->fwd.io, &h, NULL, 0), -EIO);
    io_close(&w->fwd.io);
    free(file);
}
END_TEST

enum field_write {
    FW_SIZE, FW_L1_TABLE, FW_REFCOUNT_TABLE, FW_INCOMPATIBLE, FW_AUTOCLEAR,
    FW_BACKING_FILE, FW_COUNT
};

START_TEST(write_fields)
{
    /* Each writer: one pwrite of exactly its field(s) (a table switch never
     * torn in two), every other byte of the file unchanged, and the header
     * reads back with the new value. */
    static const struct { uint64_t off; size_t len; } want[FW_COUNT] = {
        [FW_SIZE]           = { 24, 8 },
        [FW_L1_TABLE]       = { 36, 12 },
        [FW_REFCOUNT_TABLE] = { 48, 12 },
        [FW_INCOMPATIBLE]   = { 72, 8 },
        [FW_AUTOCLEAR]      = { 88, 8 },
        [FW_BACKING_FILE]   = { 8, 12 },
    };
    const unsigned cb = 16;
    const uint64_t cs = 1ull << cb;
    size_t len, now_len;
    uint8_t *file = image_file(cb, &len);
    struct watch_io *w = watch_open(file, len);
    struct io *io = &w->fwd.io;
    struct qcow2_header h;
    const uint8_t *now;
    char err[512] = "";
    int ret = -1;

    switch (_i) {
    case FW_SIZE:           ret = header_write_size(io, 32 * cs); break;
    case FW_L1_TABLE:       ret = header_write_l1_table(io, 2, 2 * cs); break;
    case FW_REFCOUNT_TABLE: ret = header_write_refcount_table(io, 2 * cs, 2); break;
    case FW_INCOMPATIBLE:   ret = header_write_incompatible(io, QCOW2_INCOMPAT_DIRTY); break;
    case FW_AUTOCLEAR:      ret = header_write_autoclear(io, QCOW2_AUTOCLEAR_BITMAPS); break;
    case FW_BACKING_FILE:   ret = header_write_backing_file(io, 0, 0); break;
    }
    ck_assert_int_eq(ret, 0);
    ck_assert_uint_eq(w->pwrites, 1);
    ck_assert_uint_eq(w->pwrite_off, want[_i].off);
    ck_assert_uint_eq(w->pwrite_len, want[_i].len);
    now = io_memory_data(tu_fwd_inner(io), &now_len);
    ck_assert_uint_eq(now_len, len);
    ck_assert_mem_eq(now, file, want[_i].off);
    ck_assert_mem_eq(now + want[_i].off + want[_i].len, file + want[_i].off + want[_i].len,
                     len - want[_i].off - want[_i].len);

    ck_assert_msg(header_read(io, &h, err, sizeof(err)) == 0, "%s", err);
    switch (_i) {
    case FW_SIZE:
        ck_assert_uint_eq(h.size, 32 * cs);
        break;
    case FW_L1_TABLE:
        ck_assert_uint_eq(h.l1_size, 2);
        ck_assert_uint_eq(h.l1_table_offset, 2 * cs);
        break;
    case FW_REFCOUNT_TABLE:
        ck_assert_uint_eq(h.refcount_table_offset, 2 * cs);
        ck_assert_uint_eq(h.refcount_table_clusters, 2);
        break;
    case FW_INCOMPATIBLE:
        ck_assert_uint_eq(h.incompatible_features, QCOW2_INCOMPAT_DIRTY);
        break;
    case FW_AUTOCLEAR:
        ck_assert_uint_eq(h.autoclear_features, QCOW2_AUTOCLEAR_BITMAPS);
        break;
    case FW_BACKING_FILE:
        ck_assert_uint_eq(h.backing_file_offset, 0);
        ck_assert_ptr_null(h.backing_file);
        break;
    }
    header_free(&h);
    io_close(io);
    free(file);
}
END_TEST

START_TEST(remove_extension)
{
    /* The backing format extension goes from the disk (one pwrite over the
     * extension area) and from the decoded header; the extensions after it
     * move up, unknown ones included, and the header still decodes. */
    const unsigned cb = 16;
    struct tu_hdr th = tu_hdr_default(3, cb);
    size_t len = (size_t)tu_default_file_size(cb), off, now_len;
    uint8_t *file = tu_zalloc(len), ft[48];
    struct watch_io *w;
    struct qcow2_header h, after;
    const uint8_t *now;
    char err[512] = "";

    off = tu_hdr_write(file, &th);
    tu_ext_put(file, &off, QCOW2_EXT_BACKING_FORMAT, "qcow2", 5);
    tu_feature_put(ft, 0, 0, "dirty bit");
    tu_ext_put(file, &off, QCOW2_EXT_FEATURE_TABLE, ft, 48);
    tu_ext_put(file, &off, 0x12345678u, "abc", 3);
    w = watch_open(file, len);
    ck_assert_msg(header_read(&w->fwd.io, &h, err, sizeof(err)) == 0, "%s", err);
    ck_assert_str_eq(h.backing_format, "qcow2");
    ck_assert_uint_eq(h.nb_exts, 3);
    w->pwrites = 0;

    ck_assert_int_eq(header_remove_extension(&w->fwd.io, &h, QCOW2_EXT_BACKING_FORMAT), 0);
    ck_assert_uint_eq(w->pwrites, 1);
    ck_assert_uint_eq(w->pwrite_off, th.header_length);
    ck_assert_uint_eq(w->pwrite_len, off + 8 - th.header_length);
    ck_assert_ptr_null(h.backing_format);
    ck_assert_uint_eq(h.nb_exts, 2);
    ck_assert_uint_eq(h.exts[0].type, QCOW2_EXT_FEATURE_TABLE);
    ck_assert_uint_eq(h.exts[1].type, 0x12345678u);
    now = io_memory_data(tu_fwd_inner(&w->fwd.io), &now_len);
    ck_assert_mem_eq(now, file, th.header_length);
    ck_assert_uint_eq(be32_get(now + th.header_length), QCOW2_EXT_FEATURE_TABLE);

    ck_assert_msg(header_read(&w->fwd.io, &after, err, sizeof(err)) == 0, "%s", err);
    ck_assert_ptr_null(after.backing_format);
    ck_assert_uint_eq(after.nb_exts, 2);
    ck_assert_uint_eq(after.nb_feature_names, 1);
    ck_assert_uint_eq(after.exts[1].len, 3);
    ck_assert_mem_eq(after.exts[1].data, "abc", 3);
    ck_assert_uint_eq(after.ext_end, off + 8 - 16); /* END; 8 + 8 bytes fewer */
    header_free(&after);

    /* None left: nothing is written. */
    w->pwrites = 0;
    ck_assert_int_eq(header_remove_extension(&w->fwd.io, &h, QCOW2_EXT_BACKING_FORMAT), 0);
    ck_assert_uint_eq(w->pwrites, 0);
    header_free(&h);
    io_close(&w->fwd.io);
    free(file);
}
END_TEST

/* ---- the decode steps: each step's refusal wins over the later ones -------- */

START_TEST(decode_step_order)
{
    /* Headers with two faults, one for a step and one for a later step:
     * the message names the earlier one.  Steps: fixed fields, header
     * length and refcount order, features, tables (L1, refcount, snapshot),
     * backing name, extensions, external data file. */
    const unsigned cb = 16;
    const uint64_t cs = 1ull << cb, fsz = tu_default_file_size(cb);

    for (int c = 0; c < 10; c++) {
        struct tu_hdr th = tu_hdr_default(3, cb);
        uint8_t *buf = cluster_buf(cb);
        const char *needle = NULL;
        int code = -EINVAL;
        size_t off;

        switch (c) {
        case 0:     /* fixed fields before header length */
            th.version = 4;
            th.header_length = 100;
            needle = "version (offset 4)";
            code = -ENOTSUP;
            break;
        case 1:     /* header length before features */
            th.header_length = 100;
            th.incompatible_features = 1ull << 40;
            needle = "header_length (offset 100)";
            break;
        case 2:     /* refcount order before features */
            th.refcount_order = 7;
            th.incompatible_features = 1ull << 40;
            needle = "refcount_order (offset 96)";
            break;
        case 3:     /* features before tables */
            th.crypt_method = 2;
            th.l1_size = 0;
            needle = "crypt_method 2, LUKS";
            code = -ENOTSUP;
            break;
        case 4:     /* L1 table before refcount table */
            th.l1_table_offset = cs + 1;
            th.refcount_table_offset = 0;
            needle = "l1_table_offset (offset 40)";
            break;
        case 5:     /* refcount table before snapshot table */
            th.refcount_table_clusters = 0;
            th.snapshots_offset = 1;
            needle = "refcount_table_clusters (offset 56)";
            break;
        case 6:     /* snapshot table before backing name */
            th.snapshots_offset = 1;
            th.backing_file_offset = 400;
            th.backing_file_size = 0;
            needle = "snapshots_offset (offset 64)";
            break;
        case 7:     /* backing name before extensions */
            th.backing_file_offset = 400;
            th.backing_file_size = 2000;
            needle = "backing_file_size (offset 16)";
            break;
        case 8:     /* extensions before the external data file */
            th.incompatible_features = QCOW2_INCOMPAT_DATA_FILE;
            th.autoclear_features = QCOW2_AUTOCLEAR_DATA_RAW;
            th.backing_file_offset = 400;
            th.backing_file_size = 4;
            needle = "appears twice";
            break;
        case 9:     /* the external data file step itself */
            th.incompatible_features = QCOW2_INCOMPAT_DATA_FILE;
            th.autoclear_features = QCOW2_AUTOCLEAR_DATA_RAW;
            th.backing_file_offset = 400;
            th.backing_file_size = 4;
            needle = "raw external data file (autoclear bit 1) cannot be "
                     "combined with a backing file";
            break;
        }
        off = tu_hdr_write(buf, &th);
        if (c == 8) {
            tu_ext_put(buf, &off, QCOW2_EXT_BACKING_FORMAT, "raw", 3);
            tu_ext_put(buf, &off, QCOW2_EXT_BACKING_FORMAT, "raw", 3);
        }
        if (th.backing_file_offset)
            memcpy(buf + 400, "base", 4);
        expect_fail_buf(buf, cs, fsz, code, needle);
        free(buf);
    }
}
END_TEST

START_TEST(data_file_raw_flag)
{
    /* The raw flag without the data-file bit is dropped, not refused; with
     * it and no backing file, kept. */
    for (int with_data_file = 0; with_data_file <= 1; with_data_file++) {
        struct tu_hdr th = tu_hdr_default(3, 16);
        uint8_t *buf = cluster_buf(16);
        struct qcow2_header h;

        th.autoclear_features = QCOW2_AUTOCLEAR_DATA_RAW | QCOW2_AUTOCLEAR_BITMAPS;
        if (with_data_file)
            th.incompatible_features = QCOW2_INCOMPAT_DATA_FILE;
        tu_hdr_write(buf, &th);
        decode_ok(buf, 1u << 16, tu_default_file_size(16), &h);
        ck_assert_uint_eq(h.autoclear_features,
                          with_data_file ? th.autoclear_features : QCOW2_AUTOCLEAR_BITMAPS);
        header_free(&h);
        free(buf);
    }
}
END_TEST

static Suite *header_suite(void)
{
    Suite *s = suite_create("header");
    TCase *tc = tcase_create("valid");
    tcase_set_timeout(tc, 60);

    tcase_add_test(tc, v2_minimal);
    tcase_add_loop_test(tc, v2_cluster_bits, 9, 22);
    tcase_add_loop_test(tc, v3_cluster_bits, 9, 22);
    tcase_add_loop_test(tc, v3_refcount_order, 0, 7);
    tcase_add_test(tc, v3_header_length_104);
    tcase_add_test(tc, v3_header_length_112_zstd);
    tcase_add_test(tc, v3_header_length_120_extra_fields);
    tcase_add_test(tc, extensions_all);
    tcase_add_test(tc, feature_name_builtin);
    tcase_add_test(tc, feature_name_type_matters);
    tcase_add_test(tc, backing_name_from_offset);
    tcase_add_test(tc, encode_changed_backing);
    tcase_add_test(tc, remove_extension);
    tcase_add_test(tc, encode_enospc);
    tcase_add_test(tc, decode_short_buffer_v2);
    tcase_add_test(tc, decode_reuse_after_free);
    tcase_add_test(tc, ok_extended_l2_14);
    tcase_add_test(tc, ok_snapshots_offset_without_snapshots);
    suite_add_tcase(s, tc);

    tc = tcase_create("invalid");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, bad_magic);
    tcase_add_test(tc, bad_version);
    tcase_add_test(tc, bad_cluster_bits);
    tcase_add_test(tc, bad_header_length);
    tcase_add_test(tc, bad_short_file);
    tcase_add_test(tc, bad_refcount_order);
    tcase_add_test(tc, bad_l1);
    tcase_add_test(tc, bad_size);
    tcase_add_test(tc, bad_refcount_table);
    tcase_add_test(tc, bad_snapshots);
    tcase_add_test(tc, bad_backing_file);
    tcase_add_test(tc, bad_backing_file_nul);
    tcase_add_test(tc, bad_compression);
    tcase_add_test(tc, bad_extended_l2_small_cluster);
    tcase_add_test(tc, bad_crypt_method);
    tcase_add_test(tc, bad_unknown_incompat_bit);
    tcase_add_test(tc, bad_unknown_incompat_bit_named);
    tcase_add_test(tc, bad_unknown_incompat_bits_all_named);
    tcase_add_test(tc, bad_ext_past_cluster);
    tcase_add_test(tc, bad_ext_past_backing_name);
    tcase_add_test(tc, bad_ext_duplicate);
    tcase_add_test(tc, bad_ext_payloads);
    tcase_add_test(tc, bad_after_extensions_no_leak);
    tcase_add_test(tc, decode_step_order);
    tcase_add_test(tc, data_file_raw_flag);
    suite_add_tcase(s, tc);

    tc = tcase_create("layout_and_io");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, field_offsets_match_layout);
    tcase_add_test(tc, read_whole_short_file);
    tcase_add_test(tc, read_first_2mib_only);
    tcase_add_test(tc, read_refusals);
    tcase_add_test(tc, read_io_errors);
    tcase_add_loop_test(tc, write_fields, 0, FW_COUNT);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(header_suite());
}
