/*
 * Unit tests for compress: the compressed-cluster descriptor and the zlib
 * and zstd codecs.
 */
#include "testutil.h"

#include "compress.h"

#include <errno.h>
#include <zlib.h>
#include <zstd.h>

/* ---- helpers ------------------------------------------------------------- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng(void)
{
    /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dull;
}

static void fill_random(uint8_t *p, size_t len)
{
    for (size_t i = 0; i < len; i++)
        p[i] = (uint8_t)(rng() >> 56);
}

/* Text-like data: compresses well but is not trivially uniform. */
static void fill_compressible(uint8_t *p, size_t len)
{
    static const char *const words[] = {
        "qcow2 ", "cluster ", "refcount ", "L2 table ", "backing ",
        "snapshot ", "header ", "extension ", "zlib ", "zstd ",
    };
    size_t i = 0;

    while (i < len) {
        const char *w = words[rng() % 10];
        size_t n = strlen(w);
        if (n > len - i)
            n = len - i;
        memcpy(p + i, w, n);
        i += n;
        if (i < len && rng() % 16 == 0)
            p[i++] = (uint8_t)('0' + rng() % 10);
    }
}

static const char *type_name(enum compress_type t)
{
    return t == COMPRESS_ZLIB ? "zlib" : "zstd";
}

/* ---- descriptor ---------------------------------------------------------- */

/* Plain ifs rather than ck_assert: this runs a few hundred thousand times,
 * and every passing ck_assert costs a message to the parent process. */
static void check_descriptor(unsigned cb, uint64_t off, uint64_t len)
{
    uint64_t d = compress_descriptor_encode(off, len, cb);
    uint64_t host = 0, max_len = 0;
    int ret;

    if (d >> 62)
        ck_abort_msg("cb %u off 0x%llx len %llu: flag bits set in 0x%llx", cb,
                     (unsigned long long)off, (unsigned long long)len,
                     (unsigned long long)d);
    ret = compress_descriptor_decode(d, cb, &host, &max_len);
    if (ret != 0 || host != off)
        ck_abort_msg("cb %u off 0x%llx len %llu: decode returned %d, host 0x%llx", cb,
                     (unsigned long long)off, (unsigned long long)len, ret,
                     (unsigned long long)host);
    /* It covers the data and reaches exactly the end of the last sector the
     * data touches. */
    if (max_len < len || (off + max_len) % 512 != 0 || max_len - len >= 512)
        ck_abort_msg("cb %u off 0x%llx len %llu: max_len %llu", cb,
                     (unsigned long long)off, (unsigned long long)len,
                     (unsigned long long)max_len);
    /* Flag bits in the entry are not the descriptor's business. */
    ret = compress_descriptor_decode(d | (1ull << 62), cb, &host, &max_len);
    if (ret != 0 || host != off)
        ck_abort_msg("cb %u off 0x%llx: with bit 62 set, decode returned %d, host 0x%llx",
                     cb, (unsigned long long)off, ret, (unsigned long long)host);
}

START_TEST(descriptor_roundtrip)
{
    static const unsigned cbs[] = { 9, 12, 16, 21 };

    for (unsigned k = 0; k < sizeof(cbs) / sizeof(cbs[0]); k++) {
        unsigned cb = cbs[k];
        uint64_t cs = 1ull << cb;
        unsigned x = 62 - (cb - 8);
        uint64_t off_limit = x < 56 ? 1ull << x : 1ull << 56;
        const uint64_t offs[] = {
            0, 1, 511, 512, 513, 4096, 12345, cs, cs + 100, 7 * cs - 1,
            0x123456789ull, off_limit - cs - 512, off_limit - cs - 1,
        };
        const uint64_t lens[] = { 1, 2, 100, 511, 512, 513, 1000, cs / 2, cs - 1, cs };

        for (unsigned i = 0; i < sizeof(offs) / sizeof(offs[0]); i++)
            for (unsigned j = 0; j < sizeof(lens) / sizeof(lens[0]); j++)
                if (lens[j] <= cs)      /* compressed data is below a cluster */
                    check_descriptor(cb, offs[i], lens[j]);
    }
}
END_TEST

START_TEST(descriptor_random)
{
    for (unsigned cb = 9; cb <= 21; cb++) {
        uint64_t cs = 1ull << cb;
        unsigned x = 62 - (cb - 8);
        uint64_t off_limit = x < 56 ? 1ull << x : 1ull << 56;

        for (unsigned n = 0; n < 2000; n++) {
            uint64_t len = 1 + rng() % cs;
            uint64_t off = rng() % (off_limit - cs - 512);
            check_descriptor(cb, off, len);
        }
    }
}
END_TEST

START_TEST(descriptor_known_values)
{
    uint64_t host, max_len;

    /* cluster_bits 16: offset in bits 0..53, extra sectors in 54..61. */
    ck_assert_int_eq(compress_descriptor_decode(0x1000ull | 3ull << 54, 16, &host, &max_len), 0);
    ck_assert_uint_eq(host, 0x1000);
    ck_assert_uint_eq(max_len, 4 * 512);
    /* Unaligned offset: up to the end of its sector plus the extra ones. */
    ck_assert_int_eq(compress_descriptor_decode(0x1234ull | 1ull << 54, 16, &host, &max_len), 0);
    ck_assert_uint_eq(host, 0x1234);
    ck_assert_uint_eq(max_len, 0x1400 + 512 - 0x1234);
    /* cluster_bits 9: a single sector-count bit, 61. */
    ck_assert_int_eq(compress_descriptor_decode(0x200ull | 1ull << 61, 9, &host, &max_len), 0);
    ck_assert_uint_eq(host, 0x200);
    ck_assert_uint_eq(max_len, 1024);
    /* cluster_bits 21: offset in 0..48, 13 bits of sectors. */
    ck_assert_int_eq(compress_descriptor_decode(0x10ull | 0x1fffull << 49, 21, &host, &max_len), 0);
    ck_assert_uint_eq(host, 0x10);
    ck_assert_uint_eq(max_len, 0x2000ull * 512 - 0x10);
    /* cluster_bits 14: bit 56 is the low sector bit, not offset. */
    ck_assert_int_eq(compress_descriptor_decode(1ull << 56, 14, &host, &max_len), 0);
    ck_assert_uint_eq(host, 0);
    ck_assert_uint_eq(max_len, 1024);

    /* Encoding the same values gives the same descriptors. */
    ck_assert_uint_eq(compress_descriptor_encode(0x1000, 2048, 16), 0x1000ull | 3ull << 54);
    ck_assert_uint_eq(compress_descriptor_encode(0x1000, 1537, 16), 0x1000ull | 3ull << 54);
    ck_assert_uint_eq(compress_descriptor_encode(0x1000, 1536, 16), 0x1000ull | 2ull << 54);
    ck_assert_uint_eq(compress_descriptor_encode(0x11ff, 2, 16), 0x11ffull | 1ull << 54);
    ck_assert_uint_eq(compress_descriptor_encode(0x11fe, 2, 16), 0x11feull);
}
END_TEST

START_TEST(descriptor_offset_beyond_55)
{
    uint64_t host = 0, max_len = 0;

    /* cluster_bits 9..13 leave offset bits above 55 in the descriptor. */
    ck_assert_int_eq(compress_descriptor_decode(1ull << 56, 9, &host, &max_len), -EINVAL);
    ck_assert_int_eq(compress_descriptor_decode(1ull << 60 | 0x200, 9, &host, &max_len), -EINVAL);
    ck_assert_int_eq(compress_descriptor_decode((1ull << 61) - 1, 9, &host, &max_len), -EINVAL);
    ck_assert_int_eq(compress_descriptor_decode(1ull << 57, 12, &host, &max_len), -EINVAL);
    ck_assert_int_eq(compress_descriptor_decode(1ull << 56, 13, &host, &max_len), -EINVAL);
    /* The largest legal offset is fine. */
    ck_assert_int_eq(compress_descriptor_decode((1ull << 56) - 1, 9, &host, &max_len), 0);
    ck_assert_uint_eq(host, (1ull << 56) - 1);
    ck_assert_int_eq(compress_descriptor_decode((1ull << 56) - 1, 13, &host, &max_len), 0);
    ck_assert_uint_eq(host, (1ull << 56) - 1);
}
END_TEST

/* ---- codecs -------------------------------------------------------------- */

static const size_t codec_sizes[] = { 512, 64 * 1024, 2 * 1024 * 1024 };

static void roundtrip(enum compress_type type, size_t len, bool zeros)
{
    uint8_t *src = tu_zalloc(len), *comp = tu_zalloc(len + 512), *out = tu_zalloc(len);
    long n;
    size_t padded;

    if (!zeros)
        fill_compressible(src, len);
    n = compress_encode(type, src, len, comp, len);
    ck_assert_msg(n > 0 && (size_t)n < len, "%s %zu: compress_encode returned %ld",
                  type_name(type), len, n);

    ck_assert_int_eq(compress_decode(type, comp, (size_t)n, out, len), 0);
    ck_assert_mem_eq(out, src, len);

    /* As read from disk: the stream runs on to a sector end, followed by
     * whatever happens to be there. */
    padded = ((size_t)n + 511) & ~(size_t)511;
    fill_random(comp + n, padded - (size_t)n + 512);
    memset(out, 0xcc, len);
    ck_assert_int_eq(compress_decode(type, comp, padded + 512, out, len), 0);
    ck_assert_mem_eq(out, src, len);

    free(src);
    free(comp);
    free(out);
}

START_TEST(codec_roundtrip_zlib)
{
    roundtrip(COMPRESS_ZLIB, codec_sizes[_i], false);
}
END_TEST

START_TEST(codec_roundtrip_zstd)
{
    roundtrip(COMPRESS_ZSTD, codec_sizes[_i], false);
}
END_TEST

START_TEST(codec_roundtrip_zeros)
{
    roundtrip(COMPRESS_ZLIB, codec_sizes[_i], true);
    roundtrip(COMPRESS_ZSTD, codec_sizes[_i], true);
}
END_TEST

START_TEST(codec_truncated)
{
    for (int t = 0; t <= 1; t++) {
        enum compress_type type = t ? COMPRESS_ZSTD : COMPRESS_ZLIB;
        for (unsigned k = 0; k < 3; k++) {
            size_t len = codec_sizes[k];
            uint8_t *src = tu_zalloc(len), *comp = tu_zalloc(len), *out = tu_zalloc(len);
            long n;

            fill_compressible(src, len);
            n = compress_encode(type, src, len, comp, len);
            ck_assert_int_gt(n, 0);
            ck_assert_msg(compress_decode(type, comp, (size_t)n / 2, out, len) == -EIO,
                          "%s %zu: half the stream decoded", type_name(type), len);
            ck_assert_int_eq(compress_decode(type, comp, 1, out, len), -EIO);
            ck_assert_int_eq(compress_decode(type, comp, 0, out, len), -EIO);
            free(src);
            free(comp);
            free(out);
        }
    }
}
END_TEST

START_TEST(codec_output_too_short)
{
    /* A stream holding 512 bytes cannot fill a 1024-byte cluster. */
    for (int t = 0; t <= 1; t++) {
        enum compress_type type = t ? COMPRESS_ZSTD : COMPRESS_ZLIB;
        uint8_t src[512], comp[1024], out[1024];
        long n;

        fill_compressible(src, sizeof(src));
        n = compress_encode(type, src, sizeof(src), comp, sizeof(src));
        ck_assert_int_gt(n, 0);
        memset(comp + n, 0, sizeof(comp) - (size_t)n);
        ck_assert_int_eq(compress_decode(type, comp, (size_t)n, out, sizeof(out)), -EIO);
        ck_assert_int_eq(compress_decode(type, comp, sizeof(comp), out, sizeof(out)), -EIO);
    }
}
END_TEST

START_TEST(codec_corrupt)
{
    size_t len = 64 * 1024;
    uint8_t *src = tu_zalloc(len), *comp = tu_zalloc(len), *bad = tu_zalloc(len),
            *out = tu_zalloc(len);

    fill_compressible(src, len);
    for (int t = 0; t <= 1; t++) {
        enum compress_type type = t ? COMPRESS_ZSTD : COMPRESS_ZLIB;
        long n = compress_encode(type, src, len, comp, len);

        ck_assert_int_gt(n, 16);
        /* Invalid from the first byte: zlib block type 3 is reserved, a
         * zstd frame starts with its magic number. */
        memcpy(bad, comp, (size_t)n);
        memset(bad, 0xff, 4);
        ck_assert_int_eq(compress_decode(type, bad, (size_t)n, out, len), -EIO);

        /* Random damage: either detected or decoded to something, but
         * never a crash or an out-of-bounds access (ASan build). */
        for (unsigned iter = 0; iter < 300; iter++) {
            int ret;
            memcpy(bad, comp, (size_t)n);
            for (unsigned k = 0; k < 1 + iter % 8; k++)
                bad[rng() % (uint64_t)n] ^= (uint8_t)(1 + rng() % 255);
            ret = compress_decode(type, bad, (size_t)n, out, len);
            ck_assert_msg(ret == 0 || ret == -EIO, "%s: returned %d", type_name(type), ret);
        }

        /* Pure garbage. */
        for (unsigned iter = 0; iter < 50; iter++) {
            int ret;
            fill_random(bad, 4096);
            ret = compress_decode(type, bad, 4096, out, len);
            ck_assert_msg(ret == 0 || ret == -EIO, "%s: returned %d", type_name(type), ret);
        }
        ck_assert_int_eq(compress_decode(type, bad, 0, out, len), -EIO);
    }
    free(src);
    free(comp);
    free(bad);
    free(out);
}
END_TEST

START_TEST(codec_incompressible_enospc)
{
    for (int t = 0; t <= 1; t++) {
        enum compress_type type = t ? COMPRESS_ZSTD : COMPRESS_ZLIB;
        for (unsigned k = 0; k < 3; k++) {
            size_t len = codec_sizes[k];
            uint8_t *src = tu_zalloc(len), *dst = tu_zalloc(len);
            long n;

            fill_random(src, len);
            n = compress_encode(type, src, len, dst, len - 1);
            ck_assert_msg(n == -ENOSPC, "%s %zu: returned %ld", type_name(type), len, n);
            n = compress_encode(type, src, len, dst, len / 2);
            ck_assert_msg(n == -ENOSPC, "%s %zu: returned %ld", type_name(type), len, n);
            n = compress_encode(type, src, len, dst, len);
            ck_assert_msg(n == -ENOSPC, "%s %zu: returned %ld", type_name(type), len, n);
            free(src);
            free(dst);
        }
    }
}
END_TEST

START_TEST(codec_encode_result_below_cap)
{
    /* compress.h: "-ENOSPC when it would not be smaller than @dst_cap": a
     * success is always shorter than @dst_cap, and decodes. */
    for (int t = 0; t <= 1; t++) {
        enum compress_type type = t ? COMPRESS_ZSTD : COMPRESS_ZLIB;
        size_t len = 64 * 1024;
        uint8_t *src = tu_zalloc(len), *dst = tu_zalloc(len), *out = tu_zalloc(len);
        long n, m;
        unsigned ok = 0;

        fill_compressible(src, len);
        n = compress_encode(type, src, len, dst, len);
        ck_assert_int_gt(n, 0);
        for (long cap = n - 2; cap <= n + 256; cap++) {
            m = compress_encode(type, src, len, dst, (size_t)cap);
            if (cap <= n) {
                ck_assert_msg(m == -ENOSPC, "%s: %ld-byte result with dst_cap %ld",
                              type_name(type), m, cap);
                continue;
            }
            ck_assert_msg(m == -ENOSPC || (m > 0 && m < cap),
                          "%s: %ld-byte result with dst_cap %ld", type_name(type), m, cap);
            if (m > 0) {
                ok++;
                memset(out, 0, len);
                ck_assert_int_eq(compress_decode(type, dst, (size_t)m, out, len), 0);
                ck_assert_mem_eq(out, src, len);
            }
        }
        /* With some slack the compression succeeds. */
        ck_assert_uint_gt(ok, 0);
        if (type == COMPRESS_ZLIB) {
            /* zlib's output does not depend on the room it is given. */
            ck_assert_int_eq(compress_encode(type, src, len, dst, (size_t)n + 1), n);
        }
        free(src);
        free(dst);
        free(out);
    }
}
END_TEST

START_TEST(codec_decode_foreign_streams)
{
    /* Streams made directly with the codec libraries, as another qcow2
     * writer would: raw deflate with a 32 KiB window, and zstd written as
     * two frames for one cluster. */
    size_t len = 64 * 1024, half = len / 2;
    uint8_t *src = tu_zalloc(len), *comp = tu_zalloc(2 * len), *out = tu_zalloc(len);
    z_stream s;
    size_t n, n2;

    fill_compressible(src, len);

    memset(&s, 0, sizeof(s));
    ck_assert_int_eq(deflateInit2(&s, 9, Z_DEFLATED, -15, 9, Z_DEFAULT_STRATEGY), Z_OK);
    s.next_in = src;
    s.avail_in = (uInt)len;
    s.next_out = comp;
    s.avail_out = (uInt)(2 * len);
    ck_assert_int_eq(deflate(&s, Z_FINISH), Z_STREAM_END);
    n = 2 * len - s.avail_out;
    deflateEnd(&s);
    ck_assert_int_eq(compress_decode(COMPRESS_ZLIB, comp, n, out, len), 0);
    ck_assert_mem_eq(out, src, len);

    n = ZSTD_compress(comp, 2 * len, src, half, 19);
    ck_assert(!ZSTD_isError(n));
    n2 = ZSTD_compress(comp + n, 2 * len - n, src + half, half, 1);
    ck_assert(!ZSTD_isError(n2));
    memset(out, 0, len);
    ck_assert_int_eq(compress_decode(COMPRESS_ZSTD, comp, n + n2, out, len), 0);
    ck_assert_mem_eq(out, src, len);
    /* Only the first frame: too short. */
    ck_assert_int_eq(compress_decode(COMPRESS_ZSTD, comp, n, out, len), -EIO);

    free(src);
    free(comp);
    free(out);
}
END_TEST

static Suite *compress_suite(void)
{
    Suite *s = suite_create("compress");
    TCase *tc = tcase_create("descriptor");
    tcase_set_timeout(tc, 60);

    tcase_add_test(tc, descriptor_roundtrip);
    tcase_add_test(tc, descriptor_random);
    tcase_add_test(tc, descriptor_known_values);
    tcase_add_test(tc, descriptor_offset_beyond_55);
    suite_add_tcase(s, tc);

    tc = tcase_create("codec");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, codec_roundtrip_zlib, 0, 3);
    tcase_add_loop_test(tc, codec_roundtrip_zstd, 0, 3);
    tcase_add_loop_test(tc, codec_roundtrip_zeros, 0, 3);
    tcase_add_test(tc, codec_truncated);
    tcase_add_test(tc, codec_output_too_short);
    tcase_add_test(tc, codec_corrupt);
    tcase_add_test(tc, codec_incompressible_enospc);
    tcase_add_test(tc, codec_encode_result_below_cap);
    tcase_add_test(tc, codec_decode_foreign_streams);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(compress_suite());
}
