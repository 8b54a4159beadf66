/*
 * Unit tests for bitmap: decoding and validation of the bitmaps extension,
 * directory and tables (each bad field refused with its offset), what is
 * loaded (enabled, not in use), setting bits at each granularity, and the
 * in-use mark written before the first change.
 */
#include "testutil.h"

#include "bitmap.h"

#define CB      16u                     /* 64 KiB clusters */
#define CS      (1ull << CB)
#define VSIZE   (64ull << 20)           /* virtual size */
#define DIR_AT  (4 * CS)
#define TBL_A   (5 * CS)
#define DATA_A  (6 * CS)
#define TBL_B   (7 * CS)
#define FILE_LEN (8 * CS)

/* How the test image is built; each test changes a field or patches bytes. */
struct layout {
    uint32_t flags_a, flags_b;
    uint8_t type_a, gran_a, gran_b;
    uint32_t extra_a;                   /* zero bytes of extra data in entry a */
    const char *name_b;
    uint32_t table_size_a;
    uint64_t table_entry_a;             /* the one entry of a's table */
    uint8_t ext[24];
    uint32_t ext_len;
    uint8_t *file;
    uint32_t dir_size;
};

static void put_entry(uint8_t *p, uint64_t table, uint32_t table_size, uint32_t flags,
                      uint8_t type, uint8_t gran, const char *name, uint32_t extra,
                      uint32_t *len)
{
    size_t n = strlen(name);

    be64_put(p, table);
    be32_put(p + 8, table_size);
    be32_put(p + 12, flags);
    p[16] = type;
    p[17] = gran;
    be16_put(p + 18, (uint16_t)n);
    be32_put(p + 20, extra);
    memcpy(p + 24 + extra, name, n);
    *len = (uint32_t)((24 + extra + n + 7) & ~7ull);
}

static struct layout default_layout(void)
{
    struct layout l;

    memset(&l, 0, sizeof(l));
    l.flags_a = BITMAP_FLAG_AUTO;
    l.flags_b = 0;                      /* disabled */
    l.type_a = 1;
    l.gran_a = 16;                      /* 1024 bits: 128 bytes, one cluster */
    l.gran_b = 12;                      /* 16384 bits: 2048 bytes, one cluster */
    l.name_b = "b";
    l.table_size_a = 1;
    l.table_entry_a = DATA_A;
    l.ext_len = 24;
    return l;
}

/* Lay the file out: directory, a's table and data (bit 0 and bit 9 set),
 * b's table (one zero entry); and the extension payload. */
static void build(struct layout *l)
{
    uint32_t len_a, len_b;

    l->file = tu_zalloc(FILE_LEN);
    put_entry(l->file + DIR_AT, TBL_A, l->table_size_a, l->flags_a, l->type_a,
              l->gran_a, "a", l->extra_a, &len_a);
    put_entry(l->file + DIR_AT + len_a, TBL_B, 1, l->flags_b, 1, l->gran_b, l->name_b,
              0, &len_b);
    l->dir_size = len_a + len_b;
    be64_put(l->file + TBL_A, l->table_entry_a);
    l->file[DATA_A] = 0x01;
    l->file[DATA_A + 1] = 0x02;
    be32_put(l->ext + 0, 2);
    be32_put(l->ext + 4, 0);
    be64_put(l->ext + 8, l->dir_size);
    be64_put(l->ext + 16, DIR_AT);
}

struct opened {
    struct io *io;
    struct meta m;
    struct bitmaps *b;
    int ret;
};

static void open_layout(struct layout *l, struct opened *o)
{
    struct qcow2_header h;
    struct header_ext e = { QCOW2_EXT_BITMAPS, l->ext_len, l->ext };

    memset(&h, 0, sizeof(h));
    h.version = 3;
    h.cluster_bits = CB;
    h.size = VSIZE;
    h.autoclear_features = QCOW2_AUTOCLEAR_BITMAPS;
    h.exts = &e;
    h.nb_exts = 1;
    ck_assert_int_eq(io_open_memory(l->file, FILE_LEN, &o->io), 0);
    tu_meta_init(&o->m, o->io, CB, true, false);
    o->m.virtual_size = VSIZE;
    o->m.file_end = FILE_LEN;
    tu_log_capture();
    o->ret = bitmap_open(&o->m, &h, "test.qcow2", &o->b);
    tu_log_release();
}

static void close_opened(struct opened *o, struct layout *l)
{
    bitmap_close(o->b);
    io_close(o->io);
    free(l->file);
}

/* Open, expect @want and an error naming @what. */
static void expect_refused(struct layout *l, int want, const char *what)
{
    struct opened o;

    open_layout(l, &o);
    ck_assert_int_eq(o.ret, want);
    ck_assert_ptr_null(o.b);
    ck_assert_uint_ge(tu_log_state()->nb_errors, 1);
    if (!strstr(tu_log_state()->first_error, what))
        ck_abort_msg("message \"%s\" does not name \"%s\"", tu_log_state()->first_error,
                     what);
    /* Bad data is corruption; what we do not know is only refused. */
    ck_assert(meta_is_corrupt(&o.m) == (want == -EIO));
    close_opened(&o, l);
}

START_TEST(test_valid_loads_enabled_only)
{
    struct layout l = default_layout();
    struct opened o;
    const uint8_t *bits;
    uint64_t bytes = 0;

    build(&l);
    open_layout(&l, &o);
    ck_assert_int_eq(o.ret, 0);
    ck_assert_ptr_nonnull(o.b);
    ck_assert_uint_eq(tu_log_state()->nb_errors, 0);
    ck_assert_uint_eq(bitmap_count(o.b), 2);
    bits = bitmap_bits(o.b, 0, &bytes);
    ck_assert_ptr_nonnull(bits);
    ck_assert_uint_eq(bytes, 128);
    ck_assert_uint_eq(bits[0], 0x01);
    ck_assert_uint_eq(bits[1], 0x02);
    ck_assert_ptr_null(bitmap_bits(o.b, 1, &bytes));        /* disabled */
    close_opened(&o, &l);
}
END_TEST

START_TEST(test_without_autoclear_bit_ignored)
{
    struct layout l = default_layout();
    struct qcow2_header h;
    struct header_ext e;
    struct io *io;
    struct meta m;
    struct bitmaps *b = NULL;

    build(&l);
    be32_put(l.ext + 0, 0);             /* would be refused if looked at */
    e = (struct header_ext){ QCOW2_EXT_BITMAPS, 24, l.ext };
    memset(&h, 0, sizeof(h));
    h.version = 3;
    h.exts = &e;
    h.nb_exts = 1;
    ck_assert_int_eq(io_open_memory(l.file, FILE_LEN, &io), 0);
    tu_meta_init(&m, io, CB, true, false);
    ck_assert_int_eq(bitmap_open(&m, &h, "t", &b), 0);
    ck_assert_ptr_null(b);
    ck_assert(!meta_is_corrupt(&m));
    io_close(io);
    free(l.file);
}
END_TEST

/* Each bad field: refused as corrupt, the message naming field and offset. */
enum patch { P_EXT_LEN, P_EXT_RESERVED, P_NB_ZERO, P_NB_FEWER, P_DIR_SIZE_SMALL,
             P_DIR_UNALIGNED, P_DIR_PAST_END, P_TABLE_UNALIGNED, P_TABLE_ZERO,
             P_TABLE_PAST_END, P_TABLE_SIZE, P_NAME_ZERO, P_NAME_PAST_END, P_PADDING,
             P_DUP_NAME, P_ENTRY_RESERVED, P_ENTRY_ONES_WITH_OFFSET,
             P_ENTRY_UNALIGNED, P_ENTRY_PAST_END, P_NB_CORRUPT };

static const struct {
    const char *what;
} corrupt_cases[P_NB_CORRUPT] = {
    [P_EXT_LEN] = { "bitmaps extension: length 16, must be 24" },
    [P_EXT_RESERVED] = { "reserved field (extension byte 4) is 0x1" },
    [P_NB_ZERO] = { "nb_bitmaps (extension byte 0) is 0" },
    [P_NB_FEWER] = { "more entries than nb_bitmaps (1)" },
    [P_DIR_SIZE_SMALL] = { "bitmap_directory_size (extension byte 8) is 40, too small for 2" },
    [P_DIR_UNALIGNED] = { "bitmap_directory_offset (extension byte 16) 0x40008" },
    [P_DIR_PAST_END] = { "bitmap_directory_offset (extension byte 16) 0x80000" },
    [P_TABLE_UNALIGNED] = { "bitmap_table_offset (byte 0) 0x50200" },
    [P_TABLE_ZERO] = { "bitmap_table_offset (byte 0) 0x0" },
    [P_TABLE_PAST_END] = { "bitmap_table_offset (byte 0) 0x80000" },
    [P_TABLE_SIZE] = { "bitmap_table_size (byte 8) is 2, but a disk of 67108864 bytes "
                       "at granularity 65536 needs 1" },
    [P_NAME_ZERO] = { "entry at 0x40000: name_size (byte 18) is 0" },
    [P_NAME_PAST_END] = { "entry at 0x40020: extra_data_size (byte 20) 0 and name_size "
                          "(byte 18) 200 run past" },
    [P_PADDING] = { "padding byte at 0x40019 is 0x55" },
    [P_DUP_NAME] = { "two bitmaps named 'a' (entries at 0x40000 and 0x40020)" },
    [P_ENTRY_RESERVED] = { "table entry 0 (at 0x50000) = 0x0000000000060002" },
    [P_ENTRY_ONES_WITH_OFFSET] = { "table entry 0 (at 0x50000) = 0x0000000000060001" },
    [P_ENTRY_UNALIGNED] = { "table entry 0 (at 0x50000) = 0x0000000000060200" },
    [P_ENTRY_PAST_END] = { "table entry 0 (at 0x50000) = 0x0000000000080000" },
};

START_TEST(test_corrupt_field_refused)
{
    struct layout l = default_layout();

    switch (_i) {
    case P_TABLE_SIZE: l.table_size_a = 2; break;
    case P_DUP_NAME: l.name_b = "a"; break;
    case P_ENTRY_RESERVED: l.table_entry_a = DATA_A | 2; break;
    case P_ENTRY_ONES_WITH_OFFSET: l.table_entry_a = DATA_A | 1; break;
    case P_ENTRY_UNALIGNED: l.table_entry_a = DATA_A + 512; break;
    case P_ENTRY_PAST_END: l.table_entry_a = FILE_LEN; break;
    default: break;
    }
    build(&l);
    switch (_i) {
    case P_EXT_LEN: l.ext_len = 16; break;
    case P_EXT_RESERVED: be32_put(l.ext + 4, 1); break;
    case P_NB_ZERO: be32_put(l.ext, 0); break;
    case P_NB_FEWER: be32_put(l.ext, 1); break;
    case P_DIR_SIZE_SMALL: be64_put(l.ext + 8, 40); break;
    case P_DIR_UNALIGNED: be64_put(l.ext + 16, DIR_AT + 8); break;
    case P_DIR_PAST_END: be64_put(l.ext + 16, FILE_LEN); break;
    case P_TABLE_UNALIGNED: be64_put(l.file + DIR_AT, TBL_A + 512); break;
    case P_TABLE_ZERO: be64_put(l.file + DIR_AT, 0); break;
    case P_TABLE_PAST_END: be64_put(l.file + DIR_AT, FILE_LEN); break;
    case P_NAME_ZERO: be16_put(l.file + DIR_AT + 18, 0); break;
    case P_NAME_PAST_END: be16_put(l.file + DIR_AT + 32 + 18, 200); break;
    case P_PADDING: l.file[DIR_AT + 25] = 0x55; break;
    default: break;
    }
    expect_refused(&l, -EIO, corrupt_cases[_i].what);
}
END_TEST

/* Valid, but not ours to update: the writable open is refused. */
enum unsup { U_TYPE, U_FLAG_EXTRA_COMPAT, U_FLAG_HIGH, U_EXTRA_DATA, U_GRAN_LOW,
             U_GRAN_HIGH, U_NB };

static const char *const unsupported_cases[U_NB] = {
    [U_TYPE] = "type (byte 16) is 2, only 1 (dirty tracking) is known",
    [U_FLAG_EXTRA_COMPAT] = "flags (byte 12) 0x6 has unknown bits 0x4",
    [U_FLAG_HIGH] = "flags (byte 12) 0x80000002 has unknown bits 0x80000000",
    [U_EXTRA_DATA] = "extra_data_size (byte 20) is 8",
    [U_GRAN_LOW] = "granularity_bits (byte 17) is 8, outside 9..31",
    [U_GRAN_HIGH] = "granularity_bits (byte 17) is 32, outside 9..31",
};

START_TEST(test_unsupported_refused)
{
    struct layout l = default_layout();

    switch (_i) {
    case U_TYPE: l.type_a = 2; break;
    case U_FLAG_EXTRA_COMPAT: l.flags_a |= BITMAP_FLAG_EXTRA_DATA_COMPATIBLE; break;
    case U_FLAG_HIGH: l.flags_a |= 1u << 31; break;
    case U_EXTRA_DATA: l.extra_a = 8; break;
    case U_GRAN_LOW: l.gran_a = 8; break;
    case U_GRAN_HIGH: l.gran_a = 32; break;
    }
    build(&l);
    expect_refused(&l, -ENOTSUP, unsupported_cases[_i]);
    /* Named, with what to do. */
    ck_assert_ptr_nonnull(strstr(tu_log_state()->first_error, "bitmap 'a' (directory "
                                 "entry at 0x40000)"));
    ck_assert_ptr_nonnull(strstr(tu_log_state()->first_error, "-o ro"));
}
END_TEST

START_TEST(test_in_use_left_alone)
{
    struct layout l = default_layout();
    struct opened o;
    uint64_t bytes;

    l.flags_a |= BITMAP_FLAG_IN_USE;
    l.table_size_a = 3;                 /* size unchecked: stale after a crash */
    build(&l);
    open_layout(&l, &o);
    ck_assert_int_eq(o.ret, 0);
    ck_assert_ptr_nonnull(o.b);
    ck_assert_ptr_null(bitmap_bits(o.b, 0, &bytes));
    ck_assert_ptr_nonnull(strstr(tu_log_state()->last, "'a' is marked in use"));
    /* Nothing loaded: nothing is marked in use either. */
    ck_assert_int_eq(bitmap_prepare_write(o.b), 0);
    {
        size_t len;
        const uint8_t *d = io_memory_data(o.io, &len);
        ck_assert_uint_eq(be32_get(d + DIR_AT + 12), BITMAP_FLAG_IN_USE | BITMAP_FLAG_AUTO);
        ck_assert_uint_eq(be32_get(d + DIR_AT + 32 + 12), 0);
    }
    close_opened(&o, &l);
}
END_TEST

/* Bits set at each bitmap's granularity, a range's first and last bit
 * included, nothing past the disk's last bit. */
START_TEST(test_mark_granularity)
{
    struct layout l = default_layout();
    struct opened o;
    const uint8_t *a, *b;
    uint64_t na, nb;

    l.flags_b = BITMAP_FLAG_AUTO;       /* both enabled: 64 KiB and 4 KiB */
    build(&l);
    l.file[DATA_A] = 0;
    l.file[DATA_A + 1] = 0;
    open_layout(&l, &o);
    ck_assert_int_eq(o.ret, 0);
    a = bitmap_bits(o.b, 0, &na);
    b = bitmap_bits(o.b, 1, &nb);
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_nonnull(b);
    ck_assert_uint_eq(na, 128);
    ck_assert_uint_eq(nb, 2048);

    bitmap_mark(o.b, 4095, 2);          /* 4 KiB bits 0 and 1; 64 KiB bit 0 */
    ck_assert_uint_eq(a[0], 0x01);
    ck_assert_uint_eq(b[0], 0x03);
    bitmap_mark(o.b, 65535, 1);         /* last byte of 64 KiB bit 0 */
    ck_assert_uint_eq(a[0], 0x01);
    ck_assert_uint_eq(b[1], 0x80);      /* 4 KiB bit 15 */
    bitmap_mark(o.b, 6 * 65536 + 1, 20 * 65536);    /* 64 KiB bits 6..26 */
    ck_assert_uint_eq(a[0], 0xc1);
    ck_assert_uint_eq(a[1], 0xff);
    ck_assert_uint_eq(a[2], 0xff);
    ck_assert_uint_eq(a[3], 0x07);
    ck_assert_uint_eq(a[4], 0x00);
    /* 4 KiB bits 96..416: bytes 12..51 all set, 52 bit 0 */
    ck_assert_uint_eq(b[11], 0x00);
    ck_assert_uint_eq(b[12], 0xff);
    ck_assert_uint_eq(b[51], 0xff);
    ck_assert_uint_eq(b[52], 0x01);
    ck_assert_uint_eq(b[53], 0x00);
    bitmap_mark(o.b, VSIZE - 1, 1);     /* the disk's last bit */
    ck_assert_uint_eq(a[127], 0x80);
    ck_assert_uint_eq(b[2047], 0x80);
    bitmap_mark(o.b, 0, 0);             /* nothing */
    ck_assert_uint_eq(b[2], 0x00);
    close_opened(&o, &l);
}
END_TEST

/* The unused tail bits of the last byte read as zero whatever the file
 * holds; the all-ones table entry loads as ones. */
START_TEST(test_all_ones_entry)
{
    struct layout l = default_layout();
    struct opened o;
    const uint8_t *a;
    uint64_t na;

    l.table_entry_a = 1;                /* no cluster, all ones */
    build(&l);
    open_layout(&l, &o);
    ck_assert_int_eq(o.ret, 0);
    a = bitmap_bits(o.b, 0, &na);
    ck_assert_ptr_nonnull(a);
    for (uint64_t i = 0; i < na; i++)
        ck_assert_uint_eq(a[i], 0xff);
    close_opened(&o, &l);
}
END_TEST

/* In use on disk before the first change, enabled bitmaps only; once. */
START_TEST(test_prepare_write_marks_in_use)
{
    struct layout l = default_layout();
    struct opened o;
    const uint8_t *d;
    size_t len;

    build(&l);
    open_layout(&l, &o);
    ck_assert_int_eq(o.ret, 0);
    d = io_memory_data(o.io, &len);
    ck_assert_uint_eq(be32_get(d + DIR_AT + 12), BITMAP_FLAG_AUTO);
    ck_assert_int_eq(bitmap_prepare_write(o.b), 0);
    d = io_memory_data(o.io, &len);
    ck_assert_uint_eq(be32_get(d + DIR_AT + 12), BITMAP_FLAG_AUTO | BITMAP_FLAG_IN_USE);
    ck_assert_uint_eq(be32_get(d + DIR_AT + 32 + 12), 0);      /* disabled: unchanged */
    ck_assert_int_eq(bitmap_prepare_write(o.b), 0);
    close_opened(&o, &l);
}
END_TEST

static Suite *bitmap_suite(void)
{
    Suite *s = suite_create("bitmap");
    TCase *tc = tcase_create("decode");

    tcase_add_test(tc, test_valid_loads_enabled_only);
    tcase_add_test(tc, test_without_autoclear_bit_ignored);
    tcase_add_loop_test(tc, test_corrupt_field_refused, 0, P_NB_CORRUPT);
    tcase_add_loop_test(tc, test_unsupported_refused, 0, U_NB);
    tcase_add_test(tc, test_in_use_left_alone);
    tcase_add_test(tc, test_all_ones_entry);
    suite_add_tcase(s, tc);

    tc = tcase_create("use");
    tcase_add_test(tc, test_mark_granularity);
    tcase_add_test(tc, test_prepare_write_marks_in_use);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(bitmap_suite());
}
