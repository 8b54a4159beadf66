/*
 * check_partition — the partition table parser over disks in memory (MBR
 * primaries, extended chains, GPT with its backup; bad tables of every
 * kind), and the partition files of a mount over an image in memory:
 * windows, bounds, seek, re-reading when the table is written, inode
 * stability and ESTALE, resize, read-only images, concurrent re-reads.
 */
#include "testutil.h"

#include "create.h"
#include "image.h"
#include "partition.h"
#include "vfs.h"

#include <fcntl.h>
#include <zlib.h>

#define SEC         512u
#define DISK_SECTORS 16384u     /* 8 MiB */
#define DISK_SIZE   ((uint64_t)DISK_SECTORS * SEC)

/* ---- log capture: every message, for strstr ---- */

static char log_text[1 << 16];
static size_t log_len;

static void log_keep(enum log_level level, const char *msg)
{
    int n = snprintf(log_text + log_len, sizeof(log_text) - log_len, "%s\n", msg);

    (void)level;
    if (n > 0 && (size_t)n < sizeof(log_text) - log_len)
        log_len += (size_t)n;
}

static void log_start(void)
{
    log_len = 0;
    log_text[0] = '\0';
    log_set_level(LOG_LEVEL_DEBUG);
    log_set_hook(log_keep);
}

static void log_stop(void)
{
    log_set_hook(NULL);
    log_set_level(LOG_LEVEL_INFO);
}

#define ck_assert_logged(s) \
    ck_assert_msg(strstr(log_text, (s)) != NULL, "log lacks \"%s\"; it has:\n%.1500s", (s), log_text)

/* ---- disks in memory ---- */

struct mem_disk {
    uint8_t *bytes;
    uint64_t size;
    unsigned reads;
};

static int mem_read(void *arg, void *buf, size_t len, uint64_t off)
{
    struct mem_disk *d = arg;

    d->reads++;
    if (off > d->size || len > d->size - off)
        return -EIO;
    memcpy(buf, d->bytes + off, len);
    return 0;
}

static struct mem_disk *disk_new(uint64_t size)
{
    struct mem_disk *d = tu_zalloc(sizeof(*d));

    d->bytes = tu_zalloc((size_t)size);
    d->size = size;
    return d;
}

static void disk_free(struct mem_disk *d)
{
    free(d->bytes);
    free(d);
}

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

/* An MBR-style entry @slot of the sector at @lba. */
static void mbr_entry(struct mem_disk *d, uint64_t lba, unsigned slot, uint8_t type,
                      uint32_t start, uint32_t count)
{
    uint8_t *s = d->bytes + lba * SEC;
    uint8_t *e = s + 446 + 16 * slot;

    s[510] = 0x55;
    s[511] = 0xaa;
    e[0] = 0;
    e[4] = type;
    put32(e + 8, start);
    put32(e + 12, count);
}

static void mbr_signature(struct mem_disk *d, uint64_t lba)
{
    d->bytes[lba * SEC + 510] = 0x55;
    d->bytes[lba * SEC + 511] = 0xaa;
}

static void read_ok(struct mem_disk *d, struct partition_table *t)
{
    ck_assert_int_eq(partition_table_read(mem_read, d, d->size, t), 0);
}

static void expect_part(const struct partition_table *t, unsigned i, unsigned number,
                        uint64_t start_lba, uint64_t sectors)
{
    ck_assert_uint_gt(t->count, i);
    ck_assert_uint_eq(t->part[i].number, number);
    ck_assert_uint_eq(t->part[i].start, start_lba * SEC);
    ck_assert_uint_eq(t->part[i].length, sectors * SEC);
}

/* ---- GPT ---- */

struct gpt_part {
    unsigned index;             /* entry index: number - 1 */
    uint64_t first, last;
};

#define GPT_ENTRIES     128u
#define GPT_ESIZE       128u
#define GPT_ARRAY_SECTORS (GPT_ENTRIES * GPT_ESIZE / SEC)   /* 32 */

static uint32_t crc(const uint8_t *p, size_t len)
{
    return (uint32_t)crc32(crc32(0L, Z_NULL, 0), p, (uInt)len);
}

/* The header at @lba over the array at @array_lba. */
static void gpt_header(struct mem_disk *d, uint64_t lba, uint64_t other, uint64_t array_lba)
{
    uint64_t sectors = d->size / SEC;
    uint8_t *h = d->bytes + lba * SEC;

    memset(h, 0, SEC);
    memcpy(h, "EFI PART", 8);
    put32(h + 8, 0x00010000);
    put32(h + 12, 92);
    put64(h + 24, lba);
    put64(h + 32, other);
    put64(h + 40, 34);
    put64(h + 48, sectors - 34);
    put64(h + 72, array_lba);
    put32(h + 80, GPT_ENTRIES);
    put32(h + 84, GPT_ESIZE);
    put32(h + 88, crc(d->bytes + array_lba * SEC, GPT_ENTRIES * GPT_ESIZE));
    put32(h + 16, crc(h, 92));
}

/* Re-seal the header at @lba after a field was changed. */
static void gpt_reseal(struct mem_disk *d, uint64_t lba)
{
    uint8_t *h = d->bytes + lba * SEC;

    put32(h + 16, 0);
    put32(h + 16, crc(h, 92));
}

/* A protective MBR, both headers, both arrays holding @parts. */
static void gpt_make(struct mem_disk *d, const struct gpt_part *parts, unsigned n)
{
    uint64_t sectors = d->size / SEC, backup_array = sectors - 1 - GPT_ARRAY_SECTORS;

    mbr_entry(d, 0, 0, 0xee, 1, (uint32_t)(sectors - 1));
    for (unsigned i = 0; i < n; i++) {
        for (int copy = 0; copy < 2; copy++) {
            uint8_t *e = d->bytes + (copy ? backup_array : 2) * SEC + parts[i].index * GPT_ESIZE;
            memset(e, 0x11, 16);            /* type GUID */
            memset(e + 16, 0x22 + (int)i, 16);
            put64(e + 32, parts[i].first);
            put64(e + 40, parts[i].last);
        }
    }
    gpt_header(d, 1, sectors - 1, 2);
    gpt_header(d, sectors - 1, 1, backup_array);
}

static const struct gpt_part three_parts[] = {
    { 0, 2048, 4095 }, { 1, 4096, 8191 }, { 3, 10000, 16000 },
};

static void expect_three_gpt(const struct partition_table *t)
{
    ck_assert_int_eq(t->scheme, PARTITION_GPT);
    ck_assert_uint_eq(t->count, 3);
    expect_part(t, 0, 1, 2048, 2048);
    expect_part(t, 1, 2, 4096, 4096);
    expect_part(t, 2, 4, 10000, 6001);
}

/* ---- parser tests ---- */

START_TEST(mbr_primaries)
{
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;

    mbr_entry(d, 0, 0, 0x83, 2048, 2048);
    mbr_entry(d, 0, 1, 0x83, 4096, 1000);
    mbr_entry(d, 0, 3, 0x07, 8192, DISK_SECTORS - 8192);   /* to the last sector */
    log_start();
    read_ok(d, &t);
    log_stop();
    ck_assert_int_eq(t.scheme, PARTITION_MBR);
    ck_assert_uint_eq(t.count, 3);
    expect_part(&t, 0, 1, 2048, 2048);
    expect_part(&t, 1, 2, 4096, 1000);
    expect_part(&t, 2, 4, 8192, DISK_SECTORS - 8192);       /* slot 3 keeps its number */
    ck_assert_uint_eq(t.problems, 0);
    ck_assert_uint_eq(t.n_read, 1);
    ck_assert_uint_eq(t.read[0].off, 0);
    ck_assert_uint_eq(t.read[0].len, SEC);
    disk_free(d);
}
END_TEST

/* Primary 1, extended 2 (sectors 4096-16383) with three logical partitions
 * whose EBRs are at 4096, 6144 and 10240: numbers 5, 6, 7. */
static void make_chain(struct mem_disk *d)
{
    mbr_entry(d, 0, 0, 0x83, 2048, 2048);
    mbr_entry(d, 0, 1, 0x05, 4096, DISK_SECTORS - 4096);
    mbr_entry(d, 4096, 0, 0x83, 2048, 1024);            /* 6144-7167 */
    mbr_entry(d, 4096, 1, 0x05, 3072, 2048);            /* next EBR at 4096 + 3072 */
    mbr_entry(d, 7168, 0, 0x83, 1, 2047);               /* 7169-9215 */
    mbr_entry(d, 7168, 1, 0x0f, 6144, 4096);            /* next EBR at 10240 */
    mbr_entry(d, 10240, 0, 0x83, 2048, 4096);           /* 12288-16383 */
}

START_TEST(mbr_extended_chain)
{
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;

    make_chain(d);
    log_start();
    read_ok(d, &t);
    log_stop();
    ck_assert_int_eq(t.scheme, PARTITION_MBR);
    ck_assert_uint_eq(t.problems, 0);
    ck_assert_uint_eq(t.count, 4);
    expect_part(&t, 0, 1, 2048, 2048);
    expect_part(&t, 1, 5, 6144, 1024);
    expect_part(&t, 2, 6, 7169, 2047);
    expect_part(&t, 3, 7, 12288, 4096);
    /* The MBR and the three EBRs, in the order read. */
    ck_assert_uint_eq(t.n_read, 4);
    ck_assert_uint_eq(t.read[1].off, 4096 * SEC);
    ck_assert_uint_eq(t.read[2].off, 7168 * SEC);
    ck_assert_uint_eq(t.read[3].off, 10240 * SEC);
    disk_free(d);
}
END_TEST

START_TEST(mbr_chain_loops)
{
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;

    make_chain(d);
    mbr_entry(d, 10240, 1, 0x05, 3072, 2048);           /* back to the EBR at 7168 */
    log_start();
    read_ok(d, &t);
    log_stop();
    ck_assert_logged("extended partition 2: the EBR chain comes back to LBA 7168 (byte 3670016), read before: chain cut there");
    ck_assert_uint_eq(t.problems, 1);
    ck_assert_uint_eq(t.count, 4);              /* every sound partition stays */
    expect_part(&t, 3, 7, 12288, 4096);
    ck_assert_uint_eq(t.n_read, 4);             /* nothing read twice */
    disk_free(d);
}
END_TEST

START_TEST(mbr_chain_too_long)
{
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;

    /* 200 EBRs, one every 16 sectors, each with a 15-sector partition. */
    mbr_entry(d, 0, 0, 0x05, 1024, 200 * 16);
    for (unsigned i = 0; i < 200; i++) {
        mbr_entry(d, 1024 + i * 16, 0, 0x83, 1, 15);
        if (i + 1 < 200)
            mbr_entry(d, 1024 + i * 16, 1, 0x05, (i + 1) * 16, 16);
    }
    log_start();
    read_ok(d, &t);
    log_stop();
    ck_assert_logged("extended partition 1: more than 128 EBRs: chain cut at LBA 3072 (byte 1572864)");
    ck_assert_uint_eq(t.count, 128);
    expect_part(&t, 0, 5, 1025, 15);
    expect_part(&t, 127, 132, 1024 + 127 * 16 + 1, 15);
    ck_assert_uint_eq(t.n_read, 129);
    disk_free(d);
}
END_TEST

START_TEST(mbr_entries_past_end)
{
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;

    mbr_entry(d, 0, 0, 0x83, 2048, 2048);
    mbr_entry(d, 0, 1, 0x83, 8192, DISK_SECTORS - 8192 + 1);    /* one sector too many */
    mbr_entry(d, 0, 2, 0x83, 0xffffff00u, 0x1000);              /* far past it */
    log_start();
    read_ok(d, &t);
    log_stop();
    ck_assert_logged("partition 2 (byte 470): sectors 8192-16384 end past the end of the disk (16384 sectors): dropped");
    ck_assert_logged("partition 3 (byte 486): sectors 4294967040-4294971135 end past the end of the disk");
    ck_assert_uint_eq(t.problems, 2);
    ck_assert_uint_eq(t.count, 1);
    expect_part(&t, 0, 1, 2048, 2048);
    disk_free(d);
}
END_TEST

START_TEST(mbr_overlaps)
{
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;

    mbr_entry(d, 0, 0, 0x83, 2048, 4096);               /* 2048-6143 */
    mbr_entry(d, 0, 1, 0x83, 6000, 1000);               /* overlaps 1: dropped */
    mbr_entry(d, 0, 2, 0x05, 8192, 8192);               /* extended */
    mbr_entry(d, 0, 3, 0x83, 9000, 100);                /* inside the extended: dropped */
    mbr_entry(d, 8192, 0, 0x83, 2048, 2048);            /* logical 5: 10240-12287 */
    mbr_entry(d, 8192, 1, 0x05, 1024, 1024);            /* EBR at 9216 */
    mbr_entry(d, 9216, 0, 0x83, 2048, 1024);            /* logical 6: 11264: overlaps 5 */
    log_start();
    read_ok(d, &t);
    log_stop();
    ck_assert_logged("partition 2 (byte 470): sectors 6000-6999 overlap partition 1 (sectors 2048-6143): dropped");
    ck_assert_logged("partition 4 (byte 502): sectors 9000-9099 overlap extended partition 3 (sectors 8192-16383): dropped");
    ck_assert_logged("logical partition 6 (byte 4719046): sectors 11264-12287 overlap partition 5 (sectors 10240-12287): dropped");
    ck_assert_uint_eq(t.problems, 3);
    ck_assert_uint_eq(t.count, 2);
    expect_part(&t, 0, 1, 2048, 4096);
    expect_part(&t, 1, 5, 10240, 2048);
    disk_free(d);
}
END_TEST

START_TEST(mbr_partition_over_table)
{
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;

    mbr_entry(d, 0, 0, 0x83, 0, 2048);                  /* covers the MBR */
    mbr_entry(d, 0, 1, 0x05, 4096, 4096);
    mbr_entry(d, 4096, 0, 0x83, 1, 1000);
    mbr_entry(d, 4096, 1, 0x05, 2048, 2048);            /* EBR at 6144 */
    mbr_entry(d, 6144, 0, 0x83, 0, 100);                /* covers its own EBR */
    log_start();
    read_ok(d, &t);
    log_stop();
    ck_assert_logged("partition 1 (sectors 0-2047) covers the table's sector at byte 0: dropped");
    ck_assert_logged("partition 6 (sectors 6144-6243) covers the table's sector at byte 3145728: dropped");
    ck_assert_uint_eq(t.count, 1);
    expect_part(&t, 0, 5, 4097, 1000);
    disk_free(d);
}
END_TEST

START_TEST(mbr_empty_and_none)
{
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;

    log_start();
    read_ok(d, &t);                             /* no signature: no table */
    ck_assert_int_eq(t.scheme, PARTITION_NONE);
    ck_assert_uint_eq(t.count, 0);
    ck_assert_uint_eq(t.problems, 0);
    mbr_signature(d, 0);                        /* an empty table */
    read_ok(d, &t);
    ck_assert_int_eq(t.scheme, PARTITION_MBR);
    ck_assert_uint_eq(t.count, 0);
    ck_assert_uint_eq(t.problems, 0);
    /* A boot sector of a file system (boot indicator byte not 0/0x80). */
    mbr_entry(d, 0, 0, 0x83, 2048, 2048);
    d->bytes[446] = 0x3c;
    read_ok(d, &t);
    log_stop();
    ck_assert_int_eq(t.scheme, PARTITION_NONE);
    ck_assert_uint_eq(t.count, 0);
    ck_assert_logged("boot indicator 0x3c of MBR entry 1 (byte 446) is neither 0 nor 0x80");
    disk_free(d);
}
END_TEST

START_TEST(read_error_reported)
{
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;

    make_chain(d);
    d->size = 7168 * SEC;                      /* the second EBR cannot be read */
    log_start();
    ck_assert_int_eq(partition_table_read(mem_read, d, DISK_SIZE, &t), -EIO);
    log_stop();
    ck_assert_uint_eq(t.count, 0);
    ck_assert_logged("reading 512 bytes at byte 3670016 failed");
    d->size = DISK_SIZE;
    disk_free(d);
}
END_TEST

START_TEST(gpt_good)
{
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;

    gpt_make(d, three_parts, 3);
    log_start();
    read_ok(d, &t);
    log_stop();
    expect_three_gpt(&t);
    ck_assert(!t.gpt_backup);
    ck_assert_uint_eq(t.problems, 0);
    /* MBR, header, array: the backup is not read when the primary is good. */
    ck_assert_uint_eq(t.n_read, 3);
    ck_assert_uint_eq(t.read[2].off, 2 * SEC);
    ck_assert_uint_eq(t.read[2].len, 32 * SEC);
    disk_free(d);
}
END_TEST

START_TEST(gpt_bad_header_crc_good_backup)
{
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;

    gpt_make(d, three_parts, 3);
    d->bytes[SEC + 40] ^= 1;                    /* first usable LBA, unsealed */
    log_start();
    read_ok(d, &t);
    log_stop();
    ck_assert_logged("GPT primary header at LBA 1: header CRC32 0x");
    ck_assert_logged("at byte 528 does not match its 92 bytes");
    ck_assert_logged("using the backup GPT header at LBA 16383 (byte 8388096)");
    ck_assert(t.gpt_backup);
    expect_three_gpt(&t);
    disk_free(d);
}
END_TEST

START_TEST(gpt_header_fields)
{
    static const struct {
        unsigned off;           /* in the header */
        uint64_t value;
        bool is64;
        const char *logged;
    } cases[] = {
        { 0, 0x5452415020494646ull, true, "no \"EFI PART\" signature at byte 512" },
        { 8, 0x00020000, false, "revision 0x00020000 at byte 520: only 1.x is known" },
        { 12, 91, false, "header size 91 at byte 524 is outside 92-512" },
        { 12, 513, false, "header size 513 at byte 524 is outside 92-512" },
        { 24, 2, true, "its own LBA at byte 536 says 2" },
        { 40, 20000, true, "usable LBAs 20000-16350 (bytes 552 and 560)" },
        { 48, 16384, true, "usable LBAs 34-16384" },
        { 40, 1, true, "usable LBAs 1-16350" },     /* would cover the header */
        { 84, 100, false, "entry size 100 at byte 596 is not a power of two from 128 to 4096" },
        { 84, 8192, false, "entry size 8192 at byte 596" },
        { 80, 1000000, false, "1000000 entries (byte 592) of 128 bytes: more than 4096 entries" },
        { 72, 16380, true, "entry array at LBA 16380 (byte 584), 32 sectors, is not inside" },
        { 72, 20, true, "entry array at LBA 20 (byte 584)" },       /* into the usable LBAs */
        { 72, 0, true, "entry array at LBA 0 (byte 584)" },
    };

    for (unsigned c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        struct mem_disk *d = disk_new(DISK_SIZE);
        struct partition_table t;

        gpt_make(d, three_parts, 3);
        if (cases[c].is64)
            put64(d->bytes + SEC + cases[c].off, cases[c].value);
        else
            put32(d->bytes + SEC + cases[c].off, (uint32_t)cases[c].value);
        gpt_reseal(d, 1);                       /* only the field is wrong */
        log_start();
        read_ok(d, &t);
        log_stop();
        ck_assert_logged(cases[c].logged);
        ck_assert_logged("using the backup GPT header");
        expect_three_gpt(&t);
        disk_free(d);
    }
}
END_TEST

START_TEST(gpt_bad_entries_crc)
{
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;

    gpt_make(d, three_parts, 3);
    d->bytes[2 * SEC + 32] ^= 0x80;             /* entry 0's starting LBA */
    log_start();
    read_ok(d, &t);
    ck_assert_logged("GPT primary header at LBA 1: entry array CRC32 0x");
    ck_assert_logged("(byte 600) does not match the 16384 bytes at LBA 2");
    ck_assert(t.gpt_backup);
    expect_three_gpt(&t);
    /* Both arrays bad: no partitions, the disk alone. */
    d->bytes[(DISK_SECTORS - 33) * SEC + 32] ^= 0x80;
    read_ok(d, &t);
    log_stop();
    ck_assert_logged("GPT backup header at LBA 16383: entry array CRC32");
    ck_assert_logged("neither GPT header is usable: no partitions");
    ck_assert_int_eq(t.scheme, PARTITION_NONE);
    ck_assert_uint_eq(t.count, 0);
    disk_free(d);
}
END_TEST

START_TEST(gpt_absurd_entries_sealed)
{
    /* Count and size are checked before anything is allocated or read:
     * sealed headers (both) asking for 2^32-1 entries of 4096 bytes. */
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;

    gpt_make(d, three_parts, 3);
    put32(d->bytes + SEC + 80, 0xffffffffu);
    put32(d->bytes + SEC + 84, 4096);
    gpt_reseal(d, 1);
    put32(d->bytes + (DISK_SECTORS - 1) * SEC + 80, 4096);
    put32(d->bytes + (DISK_SECTORS - 1) * SEC + 84, 4096);      /* 16 MiB */
    gpt_reseal(d, DISK_SECTORS - 1);
    log_start();
    read_ok(d, &t);
    log_stop();
    ck_assert_logged("GPT primary header at LBA 1: 4294967295 entries (byte 592) of 4096 bytes");
    ck_assert_logged("GPT backup header at LBA 16383: 4096 entries (byte 8388176) of 4096 bytes: more than 4096 entries or 1048576 bytes");
    ck_assert_uint_eq(t.count, 0);
    ck_assert_uint_eq(t.n_read, 3);             /* MBR and the two headers only */
    disk_free(d);
}
END_TEST

START_TEST(gpt_bad_entries)
{
    static const struct gpt_part parts[] = {
        { 0, 2048, 4095 },
        { 1, 5000, 4999 },          /* ends before it starts */
        { 2, 16000, 16384 },        /* past the end of the disk */
        { 3, 10, 100 },             /* outside the usable LBAs */
        { 4, 4000, 4100 },          /* overlaps 1 */
        { 127, 9000, 9100 },        /* the last entry: number 128 */
    };
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;

    gpt_make(d, parts, sizeof(parts) / sizeof(parts[0]));
    log_start();
    read_ok(d, &t);
    log_stop();
    ck_assert_logged("GPT entry 1 (partition 2) (byte 1192): ending LBA 4999 is before starting LBA 5000: dropped");
    ck_assert_logged("GPT entry 2 (partition 3) (byte 1312): LBAs 16000-16384 end past the end of the disk (16384 sectors): dropped");
    ck_assert_logged("GPT entry 3 (partition 4) (byte 1440): LBAs 10-100 are outside the usable LBAs 34-16350: dropped");
    ck_assert_logged("GPT entry 4 (partition 5) (byte 1568): sectors 4000-4100 overlap partition 1 (sectors 2048-4095): dropped");
    ck_assert_uint_eq(t.problems, 4);
    ck_assert_uint_eq(t.count, 2);
    expect_part(&t, 0, 1, 2048, 2048);
    expect_part(&t, 1, 128, 9000, 101);
    disk_free(d);
}
END_TEST

START_TEST(protective_mbr_without_gpt)
{
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;

    mbr_entry(d, 0, 0, 0xee, 1, DISK_SECTORS - 1);
    log_start();
    read_ok(d, &t);
    ck_assert_logged("GPT primary header at LBA 1: no \"EFI PART\" signature at byte 512");
    ck_assert_logged("GPT backup header at LBA 16383: no \"EFI PART\" signature at byte 8388096");
    ck_assert_logged("neither GPT header is usable: no partitions");
    ck_assert_int_eq(t.scheme, PARTITION_NONE);
    ck_assert_uint_eq(t.count, 0);
    /* A protective entry that does not start at LBA 1 is not one. */
    put32(d->bytes + 446 + 8, 2);
    read_ok(d, &t);
    log_stop();
    ck_assert_logged("protective MBR entry 1: starting LBA 2 at byte 454 is not 1: no partitions");
    ck_assert_uint_eq(t.count, 0);
    disk_free(d);
}
END_TEST

/* Random bytes never crash the parser, and whatever it keeps is inside the
 * disk, clear of the table and of each other. */
START_TEST(random_tables_stay_sound)
{
    struct mem_disk *d = disk_new(DISK_SIZE);
    struct partition_table t;
    unsigned seed = 12345;

    log_set_level(LOG_LEVEL_ERROR);
    for (unsigned round = 0; round < 300; round++) {
        memset(d->bytes, 0, (size_t)d->size);
        if (round % 2)
            gpt_make(d, three_parts, 3);
        else
            make_chain(d);
        for (unsigned k = 0; k < 8; k++) {
            /* Hit the table areas: MBR, GPT header and array, EBRs. */
            static const uint64_t areas[] = { 446, 512, 1024, 4096 * 512 + 446,
                                              7168 * 512 + 446, 8388096 };
            uint64_t off = areas[rand_r(&seed) % 6] + (uint64_t)(rand_r(&seed) % 96);
            d->bytes[off] = (uint8_t)rand_r(&seed);
        }
        ck_assert_int_eq(partition_table_read(mem_read, d, d->size, &t), 0);
        for (unsigned i = 0; i < t.count; i++) {
            const struct partition *p = &t.part[i];
            ck_assert_uint_gt(p->length, 0);
            ck_assert_uint_le(p->start + p->length, d->size);
            for (unsigned j = 0; j < i; j++)
                ck_assert(p->start >= t.part[j].start + t.part[j].length ||
                          t.part[j].start >= p->start + p->length);
            for (unsigned r = 0; r < t.n_read; r++)
                ck_assert(p->start >= t.read[r].off + t.read[r].len ||
                          t.read[r].off >= p->start + p->length);
        }
    }
    log_set_level(LOG_LEVEL_INFO);
    disk_free(d);
}
END_TEST

/* ---- the partition files of a mount ---- */

#define IMG_SIZE    (8u << 20)

struct mount {
    char dir[64];
    char path[96];
    struct image *img;
    struct vfs *vfs;
    struct partition_set *ps;
};

static void mount_open(struct mount *m, bool read_only)
{
    struct image_options o = { .read_only = read_only, .trace_fd = -1,
                               .backing = { BACKING_DENY, NULL } };
    struct vfs_config vc = { .disk_name = "disk", .disk_mode = 0644 };

    ck_assert_int_eq(image_open(m->path, &o, &m->img), 0);
    ck_assert_int_eq(vfs_new(m->img, &vc, &m->vfs), 0);
    ck_assert_int_eq(partition_set_new(m->vfs, m->img, "disk", 0644, &m->ps), 0);
}

static void mount_new(struct mount *m)
{
    struct create_options co = { .size = IMG_SIZE };

    snprintf(m->dir, sizeof(m->dir), "/tmp/check_partition.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(m->dir));
    snprintf(m->path, sizeof(m->path), "%s/t.qcow2", m->dir);
    ck_assert_int_eq(create_image(m->path, &co), 0);
    mount_open(m, false);
}

static void mount_close(struct mount *m)
{
    partition_set_free(m->ps);
    vfs_free(m->vfs);
    ck_assert_int_eq(image_close(m->img), 0);
}

static void mount_free(struct mount *m)
{
    mount_close(m);
    unlink(m->path);
    rmdir(m->dir);
}

static void disk_write(struct mount *m, const void *buf, size_t len, uint64_t off)
{
    size_t done;

    ck_assert_int_eq(vfs_write(m->vfs, VFS_DISK_INO, buf, len, off, &done), 0);
    ck_assert_uint_eq(done, len);
}

/* An MBR sector with up to 4 primaries (count 0: empty). */
static void write_mbr(struct mount *m, const uint32_t (*ent)[3], unsigned n)
{
    uint8_t s[SEC] = { 0 };

    for (unsigned i = 0; i < n; i++) {
        s[446 + 16 * i + 4] = (uint8_t)ent[i][0];
        put32(s + 446 + 16 * i + 8, ent[i][1]);
        put32(s + 446 + 16 * i + 12, ent[i][2]);
    }
    s[510] = 0x55;
    s[511] = 0xaa;
    disk_write(m, s, SEC, 0);
}

/* The inode of /NAME, 0 when there is none. */
static uint64_t ino_of(struct mount *m, const char *name)
{
    struct stat st;

    if (vfs_lookup(m->vfs, VFS_ROOT_INO, name, &st) != 0)
        return 0;
    ck_assert(S_ISREG(st.st_mode));
    return st.st_ino;
}

static uint64_t size_of(struct mount *m, uint64_t ino)
{
    struct stat st;

    ck_assert_int_eq(vfs_getattr(m->vfs, ino, &st), 0);
    return (uint64_t)st.st_size;
}

START_TEST(files_follow_the_table)
{
    static const uint32_t two[][3] = { { 0x83, 2048, 2048 }, { 0x83, 4096, 4096 } };
    static const uint32_t moved[][3] = { { 0x83, 2048, 2048 }, { 0x83, 6144, 2048 } };
    uint8_t buf[4096], back[4096];
    struct mount m;
    uint64_t p1, p2, p2_new;
    size_t len;

    mount_new(&m);
    ck_assert_uint_eq(ino_of(&m, "disk-p1"), 0);         /* no table yet */
    log_start();
    write_mbr(&m, two, 2);                              /* through the disk file */
    log_stop();
    p1 = ino_of(&m, "disk-p1");
    p2 = ino_of(&m, "disk-p2");
    ck_assert_uint_ne(p1, 0);
    ck_assert_uint_ne(p2, 0);
    ck_assert_uint_eq(size_of(&m, p1), 2048 * SEC);
    ck_assert_uint_eq(size_of(&m, p2), 4096 * SEC);
    ck_assert_logged("disk-p2: partition 2, bytes 2097152-4194303 of the disk (2 MiB)");

    /* A partition file is its window on the disk. */
    memset(buf, 0xa5, sizeof(buf));
    ck_assert_int_eq(vfs_write(m.vfs, p2, buf, sizeof(buf), 8192, &len), 0);
    ck_assert_int_eq(vfs_read(m.vfs, VFS_DISK_INO, back, sizeof(back), 4096 * SEC + 8192,
                              &len), 0);
    ck_assert_mem_eq(back, buf, sizeof(buf));

    /* Unrelated writes to the disk keep everything; a rewrite of the same
     * table keeps the inodes. */
    disk_write(&m, buf, sizeof(buf), 1 << 20);
    write_mbr(&m, two, 2);
    ck_assert_uint_eq(ino_of(&m, "disk-p1"), p1);
    ck_assert_uint_eq(ino_of(&m, "disk-p2"), p2);

    /* Partition 2 moves: p1 keeps its inode, p2 is a new node, the old one
     * and any handle on it get ESTALE. */
    log_start();
    write_mbr(&m, moved, 2);
    log_stop();
    ck_assert_logged("disk-p2 removed: partition 2 moved, changed size or is gone");
    ck_assert_uint_eq(ino_of(&m, "disk-p1"), p1);
    p2_new = ino_of(&m, "disk-p2");
    ck_assert_uint_ne(p2_new, 0);
    ck_assert_uint_ne(p2_new, p2);
    ck_assert_uint_eq(size_of(&m, p2_new), 2048 * SEC);
    ck_assert_int_eq(vfs_read(m.vfs, p2, back, sizeof(back), 0, &len), -ESTALE);
    ck_assert_int_eq(vfs_write(m.vfs, p2, buf, sizeof(buf), 0, &len), -ESTALE);
    ck_assert_int_eq(vfs_fsync(m.vfs, p2), -ESTALE);
    ck_assert_int_eq(vfs_read(m.vfs, p1, back, sizeof(back), 0, &len), 0);

    /* The table goes (a zeroed MBR): the files go, the disk stays. */
    ck_assert_int_eq(vfs_fallocate(m.vfs, VFS_DISK_INO, FALLOC_FL_ZERO_RANGE, 0, SEC), 0);
    ck_assert_uint_eq(ino_of(&m, "disk-p1"), 0);
    ck_assert_uint_eq(ino_of(&m, "disk-p2"), 0);
    ck_assert_uint_eq(ino_of(&m, "disk"), VFS_DISK_INO);
    mount_free(&m);
}
END_TEST

START_TEST(window_bounds_and_seek)
{
    static const uint32_t two[][3] = { { 0x83, 2048, 2048 }, { 0x83, 4096, 4096 } };
    uint8_t buf[8192], back[8192], zero[8192] = { 0 };
    struct mount m;
    uint64_t p1, p2, r;
    size_t len;

    mount_new(&m);
    write_mbr(&m, two, 2);
    p1 = ino_of(&m, "disk-p1");
    p2 = ino_of(&m, "disk-p2");

    /* A write across p1's end stops at it; one at its end is ENOSPC; p2
     * does not see either. */
    memset(buf, 0x5a, sizeof(buf));
    ck_assert_int_eq(vfs_write(m.vfs, p1, buf, sizeof(buf), 2048 * SEC - 4096, &len), 0);
    ck_assert_uint_eq(len, 4096);
    ck_assert_int_eq(vfs_write(m.vfs, p1, buf, sizeof(buf), 2048 * SEC, &len), -ENOSPC);
    ck_assert_int_eq(vfs_read(m.vfs, p2, back, sizeof(back), 0, &len), 0);
    ck_assert_mem_eq(back, zero, sizeof(back));
    ck_assert_int_eq(vfs_read(m.vfs, p1, back, sizeof(back), 2048 * SEC - 4096, &len), 0);
    ck_assert_uint_eq(len, 4096);
    ck_assert_mem_eq(back, buf, 4096);

    /* Seek: the data written is at 1 MiB - 4 KiB of p1 (cluster aligned
     * down to 960 KiB with 64 KiB clusters); nothing after it inside p1. */
    ck_assert_int_eq(vfs_lseek(m.vfs, p1, 0, SEEK_DATA, &r), 0);
    ck_assert_uint_eq(r, (2048 * SEC - 4096) / 65536 * 65536);
    ck_assert_int_eq(vfs_lseek(m.vfs, p1, 0, SEEK_HOLE, &r), 0);
    ck_assert_uint_eq(r, 0);
    ck_assert_int_eq(vfs_lseek(m.vfs, p1, 2048 * SEC - 1, SEEK_HOLE, &r), 0);
    ck_assert_uint_eq(r, 2048 * SEC);           /* the window's end */
    /* Data on the disk past p2's end is no data of p2's. */
    disk_write(&m, buf, sizeof(buf), 8192u * SEC + 65536);
    ck_assert_int_eq(vfs_lseek(m.vfs, p2, 0, SEEK_DATA, &r), -ENXIO);
    ck_assert_int_eq(vfs_lseek(m.vfs, p2, 0, SEEK_HOLE, &r), 0);
    ck_assert_uint_eq(r, 0);

    /* Punch through the window: the disk reads zeros there. */
    ck_assert_int_eq(vfs_fallocate(m.vfs, p1, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                   2048 * SEC - 4096, 4096), 0);
    ck_assert_int_eq(vfs_read(m.vfs, VFS_DISK_INO, back, 4096, 4096 * SEC - 4096, &len), 0);
    ck_assert_mem_eq(back, zero, 4096);
    /* No resize, no growth by fallocate. */
    {
        struct stat st;
        ck_assert_int_eq(vfs_setattr(m.vfs, p1, VFS_SET_SIZE, 4096, &st), -EPERM);
        ck_assert_int_eq(vfs_fallocate(m.vfs, p1, 0, 2048 * SEC - 1, 2), -EOPNOTSUPP);
    }
    ck_assert_int_eq(vfs_fsync(m.vfs, p1), 0);
    mount_free(&m);
}
END_TEST

START_TEST(resize_reads_again)
{
    /* Partition 2 lies past the end of the disk until the disk grows. */
    static const uint32_t two[][3] = { { 0x83, 2048, 2048 },
                                       { 0x83, 8192, IMG_SIZE / SEC } };
    struct mount m;
    struct stat st;

    mount_new(&m);
    log_start();
    write_mbr(&m, two, 2);
    log_stop();
    ck_assert_logged("partition 2 (byte 470): sectors 8192-24575 end past the end of the disk (16384 sectors): dropped");
    ck_assert_uint_eq(ino_of(&m, "disk-p2"), 0);
    ck_assert_int_eq(vfs_setattr(m.vfs, VFS_DISK_INO, VFS_SET_SIZE, 2 * IMG_SIZE, &st), 0);
    ck_assert_uint_ne(ino_of(&m, "disk-p2"), 0);
    ck_assert_uint_eq(size_of(&m, ino_of(&m, "disk-p2")), IMG_SIZE);
    mount_free(&m);
}
END_TEST

START_TEST(read_only_image_read_only_files)
{
    static const uint32_t one[][3] = { { 0x83, 2048, 2048 } };
    struct vfs_open_info oi;
    struct mount m;
    struct stat st;
    uint8_t buf[SEC] = { 0 };
    uint64_t p1;
    size_t len;

    mount_new(&m);
    write_mbr(&m, one, 1);
    mount_close(&m);
    mount_open(&m, true);                       /* the table is read at the start */
    p1 = ino_of(&m, "disk-p1");
    ck_assert_uint_ne(p1, 0);
    ck_assert_int_eq(vfs_getattr(m.vfs, p1, &st), 0);
    ck_assert_uint_eq(st.st_mode & 0222, 0);
    ck_assert_int_eq(vfs_open(m.vfs, p1, O_RDWR, &oi), -EROFS);
    ck_assert_int_eq(vfs_open(m.vfs, p1, O_RDONLY, &oi), 0);
    ck_assert_int_eq(vfs_write(m.vfs, p1, buf, sizeof(buf), 0, &len), -EROFS);
    mount_free(&m);
}
END_TEST

/* Writers race to rewrite the table (two layouts) and a reader reads the
 * partition files meanwhile: every re-read finishes, the last table wins,
 * nothing crashes (run under TSan by `make unit SANITIZE=thread`). */
struct racer {
    struct mount *m;
    unsigned which;
};

static const uint32_t layout_a[][3] = { { 0x83, 2048, 2048 }, { 0x83, 4096, 4096 } };
static const uint32_t layout_b[][3] = { { 0x83, 2048, 2048 }, { 0x83, 8192, 4096 } };

static void *racer_main(void *arg)
{
    struct racer *r = arg;

    for (unsigned i = 0; i < 50; i++)
        write_mbr(r->m, r->which ? layout_b : layout_a, 2);
    return NULL;
}

static void *reader_main(void *arg)
{
    struct mount *m = arg;
    uint8_t buf[4096];

    for (unsigned i = 0; i < 200; i++) {
        uint64_t ino = ino_of(m, "disk-p2");
        size_t len;
        int ret;
        if (!ino)
            continue;
        ret = vfs_read(m->vfs, ino, buf, sizeof(buf), 0, &len);
        ck_assert(ret == 0 || ret == -ESTALE);
    }
    return NULL;
}

START_TEST(concurrent_rereads)
{
    struct mount m;
    struct racer ra, rb;
    pthread_t ta, tb, tr;

    mount_new(&m);
    ra = (struct racer){ &m, 0 };
    rb = (struct racer){ &m, 1 };
    log_set_level(LOG_LEVEL_ERROR);
    ck_assert_int_eq(pthread_create(&ta, NULL, racer_main, &ra), 0);
    ck_assert_int_eq(pthread_create(&tb, NULL, racer_main, &rb), 0);
    ck_assert_int_eq(pthread_create(&tr, NULL, reader_main, &m), 0);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    pthread_join(tr, NULL);
    write_mbr(&m, layout_b, 2);
    log_set_level(LOG_LEVEL_INFO);
    ck_assert_uint_eq(size_of(&m, ino_of(&m, "disk-p2")), 4096 * SEC);
    {
        uint8_t mark[SEC], back[SEC];
        size_t len;
        memset(mark, 0x77, sizeof(mark));
        ck_assert_int_eq(vfs_write(m.vfs, ino_of(&m, "disk-p2"), mark, SEC, 0, &len), 0);
        ck_assert_int_eq(vfs_read(m.vfs, VFS_DISK_INO, back, SEC, 8192 * SEC, &len), 0);
        ck_assert_mem_eq(back, mark, SEC);      /* layout b's window */
    }
    mount_free(&m);
}
END_TEST

static Suite *partition_suite(void)
{
    Suite *s = suite_create("partition");
    TCase *tc = tcase_create("parser");
    TCase *tm = tcase_create("files");

    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, mbr_primaries);
    tcase_add_test(tc, mbr_extended_chain);
    tcase_add_test(tc, mbr_chain_loops);
    tcase_add_test(tc, mbr_chain_too_long);
    tcase_add_test(tc, mbr_entries_past_end);
    tcase_add_test(tc, mbr_overlaps);
    tcase_add_test(tc, mbr_partition_over_table);
    tcase_add_test(tc, mbr_empty_and_none);
    tcase_add_test(tc, read_error_reported);
    tcase_add_test(tc, gpt_good);
    tcase_add_test(tc, gpt_bad_header_crc_good_backup);
    tcase_add_test(tc, gpt_header_fields);
    tcase_add_test(tc, gpt_bad_entries_crc);
    tcase_add_test(tc, gpt_absurd_entries_sealed);
    tcase_add_test(tc, gpt_bad_entries);
    tcase_add_test(tc, protective_mbr_without_gpt);
    tcase_add_test(tc, random_tables_stay_sound);
    suite_add_tcase(s, tc);
    tcase_set_timeout(tm, 60);
    tcase_add_test(tm, files_follow_the_table);
    tcase_add_test(tm, window_bounds_and_seek);
    tcase_add_test(tm, resize_reads_again);
    tcase_add_test(tm, read_only_image_read_only_files);
    tcase_add_test(tm, concurrent_rereads);
    suite_add_tcase(s, tm);
    return s;
}

int main(void)
{
    return tu_run(partition_suite());
}
