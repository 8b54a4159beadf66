/*
 * partition — partition table parsing (MBR, extended chains, GPT) and the
 * partition files of a mount.  See partition.h for the rules.
 */
#include "partition.h"

#include "image.h"
#include "log.h"
#include "vfs.h"

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define SECTOR                  PARTITION_SECTOR
#define MBR_ENTRIES_OFF         446u
#define MBR_ENTRY_SIZE          16u
#define MBR_SIGNATURE_OFF       510u
#define MBR_TYPE_GPT            0xeeu

#define GPT_SIGNATURE           "EFI PART"
#define GPT_HEADER_MIN          92u
#define GPT_ENTRY_MIN           128u
/* Linux watches nothing else; a table is re-read when a write touches
 * these, or a sector it was read from. */
#define GPT_AREA_SECTORS        34u     /* MBR, header, 16 KiB of entries */
#define GPT_BACKUP_SECTORS      33u

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static uint64_t le64(const uint8_t *p)
{
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

static bool ranges_meet(uint64_t a_off, uint64_t a_len, uint64_t b_off, uint64_t b_len)
{
    return a_off < b_off + b_len && b_off < a_off + a_len;
}

/* ---- The parser ---- */

struct parser {
    partition_read_fn read;
    void *arg;
    uint64_t sectors;           /* whole sectors of the disk */
    struct partition_table *t;
    /* MBR: the extended partitions kept, for overlap checks */
    struct partition ext[4];
    unsigned n_ext;
    uint64_t ebr[PARTITION_MAX_EBRS];   /* LBAs of the EBRs read */
    unsigned n_ebr;
    bool number_cap_logged;
};

static void problem(struct parser *p, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* One problem of the table: a warning, counted. */
static void problem(struct parser *p, const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    p->t->problems++;
    log_warn("partition table: %s", msg);
}

/* Read @count sectors at @lba into @buf and remember the range.
 * Returns 0 or the read's -errno (logged). */
static int read_sectors(struct parser *p, void *buf, uint64_t lba, uint64_t count)
{
    struct partition_table *t = p->t;
    int ret;

    assert(t->n_read < PARTITION_MAX_READS);
    t->read[t->n_read++] = (struct partition_range){ lba * SECTOR, count * SECTOR };
    ret = p->read(p->arg, buf, (size_t)(count * SECTOR), lba * SECTOR);
    if (ret < 0)
        log_error("partition table: reading %" PRIu64 " bytes at byte %" PRIu64
                  " failed: %s", count * SECTOR, lba * SECTOR, strerror(-ret));
    return ret;
}

/* The kept partition or extended partition that [@start, @start + @len)
 * overlaps, as text in @what; false when none. */
static bool find_overlap(const struct parser *p, uint64_t start, uint64_t len,
                         int skip_ext, char *what, size_t what_len)
{
    for (unsigned i = 0; i < p->t->count; i++) {
        const struct partition *q = &p->t->part[i];
        if (ranges_meet(start, len, q->start / SECTOR, q->length / SECTOR)) {
            snprintf(what, what_len, "partition %u (sectors %" PRIu64 "-%" PRIu64 ")",
                     q->number, q->start / SECTOR, (q->start + q->length) / SECTOR - 1);
            return true;
        }
    }
    for (unsigned i = 0; i < p->n_ext; i++) {
        const struct partition *q = &p->ext[i];
        if ((int)i != skip_ext &&
            ranges_meet(start, len, q->start / SECTOR, q->length / SECTOR)) {
            snprintf(what, what_len, "extended partition %u (sectors %" PRIu64 "-%"
                     PRIu64 ")", q->number, q->start / SECTOR,
                     (q->start + q->length) / SECTOR - 1);
            return true;
        }
    }
    return false;
}

/*
 * Keep partition @number, sectors [@start, @start + @len), unless it ends
 * past the disk or overlaps one kept before; @what names the entry and
 * @field_off is its byte offset on the disk, for the messages.  With
 * @extended it is an extended partition (kept for the chain walk and the
 * overlap checks, no file); @skip_ext is the extended partition a logical
 * one lies in (-1: none).
 * Returns: true when kept.
 */
static bool keep(struct parser *p, unsigned number, uint64_t start, uint64_t len,
                 bool extended, int skip_ext, const char *what, uint64_t field_off)
{
    char other[128];

    if (start >= p->sectors || len > p->sectors - start) {
        problem(p, "%s (byte %" PRIu64 "): sectors %" PRIu64 "-%" PRIu64 " end past the "
                "end of the disk (%" PRIu64 " sectors): dropped", what, field_off, start,
                start + len - 1, p->sectors);
        return false;
    }
    if (find_overlap(p, start, len, skip_ext, other, sizeof(other))) {
        problem(p, "%s (byte %" PRIu64 "): sectors %" PRIu64 "-%" PRIu64 " overlap %s: "
                "dropped", what, field_off, start, start + len - 1, other);
        return false;
    }
    if (extended) {
        p->ext[p->n_ext++] = (struct partition){ number, start * SECTOR, len * SECTOR };
        return true;
    }
    if (number > PARTITION_MAX || p->t->count == PARTITION_MAX) {
        if (!p->number_cap_logged)
            problem(p, "%s (byte %" PRIu64 "): partition numbers above %u get no file",
                    what, field_off, PARTITION_MAX);
        p->number_cap_logged = true;
        return false;
    }
    p->t->part[p->t->count++] = (struct partition){ number, start * SECTOR, len * SECTOR };
    return true;
}

static bool mbr_type_extended(uint8_t type)
{
    return type == 0x05 || type == 0x0f || type == 0x85;
}

static bool has_signature(const uint8_t *sector)
{
    return sector[MBR_SIGNATURE_OFF] == 0x55 && sector[MBR_SIGNATURE_OFF + 1] == 0xaa;
}

/*
 * Follow the EBR chain of extended partition @ext (index into p->ext),
 * numbering logical partitions from *next on, as Linux does: the data
 * entries of each EBR are relative to that EBR, the link to the next EBR
 * relative to the extended partition's start.
 * Returns: 0 or a read's -errno.
 */
static int walk_chain(struct parser *p, int ext, unsigned *next)
{
    uint64_t ext_start = p->ext[ext].start / SECTOR;
    uint64_t ext_len = p->ext[ext].length / SECTOR;
    unsigned ext_number = p->ext[ext].number;
    uint64_t lba = ext_start;
    uint8_t buf[SECTOR];

    for (;;) {
        const uint8_t *link = NULL;
        uint64_t link_off = 0;
        int ret;

        for (unsigned i = 0; i < p->n_ebr; i++)
            if (p->ebr[i] == lba) {
                problem(p, "extended partition %u: the EBR chain comes back to LBA %"
                        PRIu64 " (byte %" PRIu64 "), read before: chain cut there",
                        ext_number, lba, lba * SECTOR);
                return 0;
            }
        if (p->n_ebr == PARTITION_MAX_EBRS) {
            problem(p, "extended partition %u: more than %u EBRs: chain cut at LBA %"
                    PRIu64 " (byte %" PRIu64 ")", ext_number, PARTITION_MAX_EBRS, lba,
                    lba * SECTOR);
            return 0;
        }
        p->ebr[p->n_ebr++] = lba;
        ret = read_sectors(p, buf, lba, 1);
        if (ret < 0)
            return ret;
        if (!has_signature(buf)) {
            /* The end of a chain whose last link points at nothing. */
            problem(p, "EBR at LBA %" PRIu64 ": no 0x55AA signature at byte %" PRIu64
                    ": chain cut there", lba, lba * SECTOR + MBR_SIGNATURE_OFF);
            return 0;
        }
        for (unsigned i = 0; i < 4; i++) {
            const uint8_t *e = buf + MBR_ENTRIES_OFF + i * MBR_ENTRY_SIZE;
            uint64_t field_off = lba * SECTOR + MBR_ENTRIES_OFF + i * MBR_ENTRY_SIZE;
            uint64_t start = lba + le32(e + 8), len = le32(e + 12);
            bool inside = start >= ext_start && start - ext_start < ext_len &&
                          len <= ext_len - (start - ext_start);
            char what[64];

            if (len == 0)
                continue;
            if (mbr_type_extended(e[4])) {
                if (!link) {
                    link = e;
                    link_off = field_off;
                }
                continue;
            }
            /* Entries 3 and 4 often hold garbage: Linux skips them
             * unnumbered unless they lie inside the extended partition. */
            if (i >= 2 && !inside) {
                problem(p, "EBR at LBA %" PRIu64 ", entry %u (byte %" PRIu64 "): sectors %"
                        PRIu64 "-%" PRIu64 " outside extended partition %u: ignored",
                        lba, i + 1, field_off + 8, start, start + len - 1, ext_number);
                continue;
            }
            snprintf(what, sizeof(what), "logical partition %u", *next);
            if (!inside)
                problem(p, "%s (byte %" PRIu64 "): sectors %" PRIu64 "-%" PRIu64 " outside "
                        "extended partition %u (sectors %" PRIu64 "-%" PRIu64 "): dropped",
                        what, field_off + 8, start, start + len - 1, ext_number, ext_start,
                        ext_start + ext_len - 1);
            else
                keep(p, *next, start, len, false, ext, what, field_off + 8);
            (*next)++;
        }
        if (!link)
            return 0;
        lba = ext_start + le32(link + 8);
        if (lba - ext_start >= ext_len) {
            problem(p, "EBR at LBA %" PRIu64 ": link to LBA %" PRIu64 " (byte %" PRIu64
                    ") outside extended partition %u: chain cut there", p->ebr[p->n_ebr - 1],
                    lba, link_off + 8, ext_number);
            return 0;
        }
    }
}

/* Primaries in slot order, then each extended partition's chain. */
static int parse_mbr(struct parser *p, const uint8_t *mbr)
{
    unsigned next = 5;

    for (unsigned slot = 0; slot < 4; slot++) {
        const uint8_t *e = mbr + MBR_ENTRIES_OFF + slot * MBR_ENTRY_SIZE;
        uint64_t field_off = MBR_ENTRIES_OFF + slot * MBR_ENTRY_SIZE;
        uint64_t start = le32(e + 8), len = le32(e + 12);
        bool extended = mbr_type_extended(e[4]);
        char what[64];

        if (len == 0)
            continue;
        snprintf(what, sizeof(what), "%spartition %u", extended ? "extended " : "", slot + 1);
        keep(p, slot + 1, start, len, extended, -1, what, field_off + 8);
    }
    for (unsigned i = 0; i < p->n_ext; i++) {
        int ret = walk_chain(p, (int)i, &next);
        if (ret < 0)
            return ret;
    }
    return 0;
}

struct gpt_header {
    uint64_t first_usable, last_usable;
    uint64_t entries_lba;
    uint32_t n_entries, entry_size, entries_crc;
};

/*
 * Check the GPT header in @buf, read from @lba (@which names it).
 * Returns: true with *h filled when every field is sound; false after a
 * message naming the first field that is not.
 */
static bool gpt_header_valid(struct parser *p, const char *which, uint64_t lba,
                             const uint8_t *buf, struct gpt_header *h)
{
    uint8_t copy[SECTOR];
    uint64_t base = lba * SECTOR, my_lba, array_bytes, array_sectors;
    uint32_t revision = le32(buf + 8), size = le32(buf + 12), crc = le32(buf + 16);

    if (memcmp(buf, GPT_SIGNATURE, 8) != 0) {
        problem(p, "GPT %s header at LBA %" PRIu64 ": no \"EFI PART\" signature at byte %"
                PRIu64, which, lba, base);
        return false;
    }
    if (revision >> 16 != 1) {
        problem(p, "GPT %s header at LBA %" PRIu64 ": revision 0x%08x at byte %" PRIu64
                ": only 1.x is known", which, lba, revision, base + 8);
        return false;
    }
    if (size < GPT_HEADER_MIN || size > SECTOR) {
        problem(p, "GPT %s header at LBA %" PRIu64 ": header size %u at byte %" PRIu64
                " is outside %u-%u", which, lba, size, base + 12, GPT_HEADER_MIN, SECTOR);
        return false;
    }
    memcpy(copy, buf, size);
    memset(copy + 16, 0, 4);
    if ((uint32_t)crc32(crc32(0L, Z_NULL, 0), copy, size) != crc) {
        problem(p, "GPT %s header at LBA %" PRIu64 ": header CRC32 0x%08x at byte %" PRIu64
                " does not match its %u bytes (0x%08x)", which, lba, crc, base + 16, size,
                (uint32_t)crc32(crc32(0L, Z_NULL, 0), copy, size));
        return false;
    }
    my_lba = le64(buf + 24);
    if (my_lba != lba) {
        problem(p, "GPT %s header at LBA %" PRIu64 ": its own LBA at byte %" PRIu64
                " says %" PRIu64, which, lba, base + 24, my_lba);
        return false;
    }
    h->first_usable = le64(buf + 40);
    h->last_usable = le64(buf + 48);
    if (h->first_usable == 0 || h->first_usable > h->last_usable ||
        h->last_usable >= p->sectors || (lba >= h->first_usable && lba <= h->last_usable)) {
        problem(p, "GPT %s header at LBA %" PRIu64 ": usable LBAs %" PRIu64 "-%" PRIu64
                " (bytes %" PRIu64 " and %" PRIu64 ") are not inside the disk (%" PRIu64
                " sectors) clear of LBA 0 and the header", which, lba, h->first_usable,
                h->last_usable, base + 40, base + 48, p->sectors);
        return false;
    }
    h->entries_lba = le64(buf + 72);
    h->n_entries = le32(buf + 80);
    h->entry_size = le32(buf + 84);
    h->entries_crc = le32(buf + 88);
    if (h->entry_size < GPT_ENTRY_MIN || h->entry_size > PARTITION_GPT_MAX_ENTRY_SIZE ||
        (h->entry_size & (h->entry_size - 1))) {
        problem(p, "GPT %s header at LBA %" PRIu64 ": entry size %u at byte %" PRIu64
                " is not a power of two from %u to %u", which, lba, h->entry_size,
                base + 84, GPT_ENTRY_MIN, PARTITION_GPT_MAX_ENTRY_SIZE);
        return false;
    }
    array_bytes = (uint64_t)h->n_entries * h->entry_size;
    if (h->n_entries > PARTITION_GPT_MAX_ENTRIES || array_bytes > PARTITION_GPT_MAX_ARRAY) {
        problem(p, "GPT %s header at LBA %" PRIu64 ": %u entries (byte %" PRIu64 ") of %u "
                "bytes: more than %u entries or %u bytes", which, lba, h->n_entries,
                base + 80, h->entry_size, PARTITION_GPT_MAX_ENTRIES, PARTITION_GPT_MAX_ARRAY);
        return false;
    }
    array_sectors = (array_bytes + SECTOR - 1) / SECTOR;
    if (array_sectors &&
        (h->entries_lba == 0 || h->entries_lba >= p->sectors ||
         array_sectors > p->sectors - h->entries_lba ||
         ranges_meet(h->entries_lba, array_sectors, lba, 1) ||
         ranges_meet(h->entries_lba, array_sectors, h->first_usable,
                     h->last_usable - h->first_usable + 1))) {
        problem(p, "GPT %s header at LBA %" PRIu64 ": entry array at LBA %" PRIu64
                " (byte %" PRIu64 "), %" PRIu64 " sectors, is not inside the disk clear of "
                "LBA 0, the header and the usable LBAs", which, lba, h->entries_lba,
                base + 72, array_sectors);
        return false;
    }
    return true;
}

/*
 * Read and check the GPT header at @lba and its entry array.
 * Returns: 1 with *h and *array (malloc'd) when both are sound, 0 when
 * not (logged), or -errno.
 */
static int gpt_read(struct parser *p, const char *which, uint64_t lba,
                    struct gpt_header *h, uint8_t **array)
{
    uint8_t buf[SECTOR];
    uint64_t bytes, sectors;
    uint32_t crc;
    uint8_t *a;
    int ret;

    *array = NULL;
    ret = read_sectors(p, buf, lba, 1);
    if (ret < 0)
        return ret;
    if (!gpt_header_valid(p, which, lba, buf, h))
        return 0;
    bytes = (uint64_t)h->n_entries * h->entry_size;
    sectors = (bytes + SECTOR - 1) / SECTOR;
    a = calloc(1, sectors ? (size_t)(sectors * SECTOR) : 1);
    if (!a)
        return -ENOMEM;
    if (sectors && (ret = read_sectors(p, a, h->entries_lba, sectors)) < 0) {
        free(a);
        return ret;
    }
    crc = (uint32_t)crc32(crc32(0L, Z_NULL, 0), a, (uInt)bytes);
    if (crc != h->entries_crc) {
        problem(p, "GPT %s header at LBA %" PRIu64 ": entry array CRC32 0x%08x (byte %"
                PRIu64 ") does not match the %" PRIu64 " bytes at LBA %" PRIu64
                " (0x%08x)", which, lba, h->entries_crc, lba * SECTOR + 88, bytes,
                h->entries_lba, crc);
        free(a);
        return 0;
    }
    *array = a;
    return 1;
}

static int parse_gpt(struct parser *p)
{
    uint64_t backup = p->sectors - 1;
    struct gpt_header h;
    uint8_t *array;
    int ret;

    ret = gpt_read(p, "primary", 1, &h, &array);
    if (ret == 0) {
        if (backup <= 1) {
            problem(p, "the disk is too small for a backup GPT header: no partitions");
            return 0;
        }
        ret = gpt_read(p, "backup", backup, &h, &array);
        if (ret == 0) {
            problem(p, "neither GPT header is usable: no partitions");
            return 0;
        }
        if (ret > 0) {
            p->t->gpt_backup = true;
            log_warn("partition table: using the backup GPT header at LBA %" PRIu64
                     " (byte %" PRIu64 ")", backup, backup * SECTOR);
        }
    }
    if (ret < 0)
        return ret;
    p->t->scheme = PARTITION_GPT;
    for (uint32_t i = 0; i < h.n_entries; i++) {
        const uint8_t *e = array + (size_t)i * h.entry_size;
        uint64_t field_off = h.entries_lba * SECTOR + (uint64_t)i * h.entry_size + 32;
        uint64_t first = le64(e + 32), last = le64(e + 40);
        static const uint8_t unused[16];
        char what[64];

        if (memcmp(e, unused, sizeof(unused)) == 0)
            continue;
        snprintf(what, sizeof(what), "GPT entry %u (partition %u)", i, i + 1);
        if (last < first)
            problem(p, "%s (byte %" PRIu64 "): ending LBA %" PRIu64 " is before starting "
                    "LBA %" PRIu64 ": dropped", what, field_off + 8, last, first);
        else if (last >= p->sectors)
            problem(p, "%s (byte %" PRIu64 "): LBAs %" PRIu64 "-%" PRIu64 " end past the "
                    "end of the disk (%" PRIu64 " sectors): dropped", what, field_off,
                    first, last, p->sectors);
        else if (first < h.first_usable || last > h.last_usable)
            problem(p, "%s (byte %" PRIu64 "): LBAs %" PRIu64 "-%" PRIu64 " are outside "
                    "the usable LBAs %" PRIu64 "-%" PRIu64 ": dropped", what, field_off,
                    first, last, h.first_usable, h.last_usable);
        else
            keep(p, i + 1, first, last - first + 1, false, -1, what, field_off);
    }
    free(array);
    return 0;
}

/* Drop the partitions that cover a sector the table was read from: a
 * write through their file would change the table under them. */
static void drop_over_table(struct parser *p)
{
    struct partition_table *t = p->t;
    unsigned kept = 0;

    for (unsigned i = 0; i < t->count; i++) {
        const struct partition *q = &t->part[i];
        bool over = false;
        for (unsigned r = 0; r < t->n_read && !over; r++) {
            if (ranges_meet(q->start, q->length, t->read[r].off, t->read[r].len)) {
                problem(p, "partition %u (sectors %" PRIu64 "-%" PRIu64 ") covers the "
                        "table's sector at byte %" PRIu64 ": dropped", q->number,
                        q->start / SECTOR, (q->start + q->length) / SECTOR - 1,
                        t->read[r].off);
                over = true;
            }
        }
        if (!over)
            t->part[kept++] = *q;
    }
    t->count = kept;
}

int partition_table_read(partition_read_fn read, void *arg, uint64_t disk_size,
                         struct partition_table *t)
{
    struct parser p = { .read = read, .arg = arg, .sectors = disk_size / SECTOR, .t = t };
    uint8_t mbr[SECTOR];
    bool gpt = false;
    int ret;

    memset(t, 0, sizeof(*t));
    t->disk_size = disk_size;
    if (p.sectors == 0)
        return 0;
    ret = read_sectors(&p, mbr, 0, 1);
    if (ret < 0)
        goto fail;
    if (!has_signature(mbr))
        return 0;               /* no table: a file system on the whole disk */
    for (unsigned i = 0; i < 4; i++) {
        const uint8_t *e = mbr + MBR_ENTRIES_OFF + i * MBR_ENTRY_SIZE;
        uint64_t field_off = MBR_ENTRIES_OFF + i * MBR_ENTRY_SIZE;
        /* Linux's test: a FAT or NTFS boot sector has the signature too,
         * but not these bytes. */
        if (e[0] != 0 && e[0] != 0x80) {
            log_info("partition table: boot indicator 0x%02x of MBR entry %u (byte %"
                     PRIu64 ") is neither 0 nor 0x80: not a partition table", e[0], i + 1,
                     field_off);
            return 0;
        }
        if (e[4] == MBR_TYPE_GPT) {
            if (le32(e + 8) != 1) {
                problem(&p, "protective MBR entry %u: starting LBA %u at byte %" PRIu64
                        " is not 1: no partitions", i + 1, le32(e + 8), field_off + 8);
                return 0;
            }
            gpt = true;
        }
    }
    if (gpt) {
        ret = parse_gpt(&p);
    } else {
        t->scheme = PARTITION_MBR;
        ret = parse_mbr(&p, mbr);
    }
    if (ret < 0)
        goto fail;
    drop_over_table(&p);
    return 0;
fail:
    t->scheme = PARTITION_NONE;
    t->count = 0;
    return ret;
}

/* ---- Partition files: windows on the disk ---- */

struct window {
    struct image *img;
    uint64_t start;
    uint64_t length;
};

static uint64_t window_size(void *priv)
{
    return ((struct window *)priv)->length;
}

static bool window_read_only(void *priv)
{
    return image_is_read_only(((struct window *)priv)->img);
}

/* vfs keeps ranges inside the window; the image reads zeros past its end
 * should the disk have shrunk under a request. */
static int window_read(void *priv, void *buf, size_t len, uint64_t off)
{
    struct window *w = priv;

    return image_read(w->img, buf, len, w->start + off);
}

static int window_write(void *priv, const void *buf, size_t len, uint64_t off)
{
    struct window *w = priv;

    if (w->start + off + len > image_size(w->img))
        return -ENOSPC;
    return image_write(w->img, buf, len, w->start + off);
}

static int window_flush(void *priv)
{
    return image_flush(((struct window *)priv)->img);
}

static int window_zero(void *priv, uint64_t off, uint64_t len, bool punch)
{
    struct window *w = priv;

    if (w->start + off + len > image_size(w->img))
        return -ENOSPC;
    return image_zero(w->img, w->start + off, len, punch);
}

static int window_preallocate(void *priv, uint64_t off, uint64_t len)
{
    struct window *w = priv;

    if (w->start + off + len > image_size(w->img))
        return -ENOSPC;
    return image_preallocate(w->img, w->start + off, len);
}

/* The disk's answer, cut at the window: data past it is none, a hole past
 * it is the window's end. */
static int window_seek(void *priv, uint64_t off, bool data, uint64_t *result)
{
    struct window *w = priv;
    uint64_t found;
    int ret = image_seek(w->img, w->start + off, data, &found);

    if (ret == -ENXIO || (ret == 0 && found >= w->start + w->length)) {
        if (data)
            return -ENXIO;
        *result = w->length;
        return 0;
    }
    if (ret < 0)
        return ret;
    *result = found - w->start;
    return 0;
}

static void window_release(void *priv)
{
    free(priv);
}

static const struct vfs_file_ops window_ops = {
    .size = window_size,
    .read_only = window_read_only,
    .read = window_read,
    .write = window_write,
    .flush = window_flush,
    .zero = window_zero,
    .preallocate = window_preallocate,
    .seek = window_seek,
    .release = window_release,
};

/* ---- The set of partition files of a mount ---- */

struct part_node {
    unsigned number;
    uint64_t start, length;
    uint64_t ino;
};

#define MAX_WATCH   (PARTITION_MAX_READS + 2)

struct partition_set {
    struct vfs *vfs;
    struct image *img;
    char *disk_name;
    mode_t mode;
    /* One reading of the table at a time; guards nodes[] and read_once. */
    pthread_mutex_t reread_lock;
    bool read_once;
    struct part_node nodes[PARTITION_MAX];
    unsigned n_nodes;
    /* Guards what a write is compared with; held only for that. */
    pthread_mutex_t watch_lock;
    uint64_t watched_size;
    unsigned n_watch;
    struct partition_range watch[MAX_WATCH];
};

static int read_disk(void *arg, void *buf, size_t len, uint64_t off)
{
    return image_read(arg, buf, len, off);
}

/* Add the file of partition @q.  A failure is logged; the others go on. */
static void add_node(struct partition_set *ps, const struct partition *q)
{
    char name[512];
    struct window *w;
    uint64_t ino;
    int ret;

    snprintf(name, sizeof(name), "%s-p%u", ps->disk_name, q->number);
    w = malloc(sizeof(*w));
    if (!w) {
        log_error("partition %u: out of memory: %s not added", q->number, name);
        return;
    }
    *w = (struct window){ ps->img, q->start, q->length };
    ret = vfs_add_file(ps->vfs, VFS_ROOT_INO, name, ps->mode, &window_ops, w, &ino);
    if (ret < 0) {
        log_error("partition %u: cannot add %s: %s", q->number, name, strerror(-ret));
        free(w);
        return;
    }
    ps->nodes[ps->n_nodes++] = (struct part_node){ q->number, q->start, q->length, ino };
    log_info("%s: partition %u, bytes %" PRIu64 "-%" PRIu64 " of the disk (%" PRIu64
             " MiB)", name, q->number, q->start, q->start + q->length - 1,
             q->length >> 20);
}

/*
 * Make the files match @t: keep those whose partition has the same number,
 * start and length; remove the rest, then add the new ones.
 * On entry: reread_lock is held.
 * Returns: how many files were removed or added.
 */
static unsigned apply_table(struct partition_set *ps, const struct partition_table *t)
{
    unsigned changes = 0;
    bool have[PARTITION_MAX] = { false };
    unsigned kept = 0;

    for (unsigned i = 0; i < ps->n_nodes; i++) {
        struct part_node *n = &ps->nodes[i];
        bool same = false;
        for (unsigned j = 0; j < t->count && !same; j++)
            if (t->part[j].number == n->number && t->part[j].start == n->start &&
                t->part[j].length == n->length) {
                same = true;
                have[j] = true;
            }
        if (same) {
            ps->nodes[kept++] = *n;
            continue;
        }
        /* Handles open on it get ESTALE from now on. */
        vfs_remove(ps->vfs, n->ino);
        changes++;
        log_info("%s-p%u removed: partition %u moved, changed size or is gone",
                 ps->disk_name, n->number, n->number);
    }
    ps->n_nodes = kept;
    for (unsigned j = 0; j < t->count; j++)
        if (!have[j]) {
            add_node(ps, &t->part[j]);
            changes++;
        }
    return changes;
}

/* Read the table again and update the files and what writes are
 * compared with. */
static void reread(struct partition_set *ps)
{
    static const char *const scheme_names[] = { "none found", "MBR", "GPT" };
    struct partition_table *t = malloc(sizeof(*t));
    uint64_t size;
    int ret;

    if (!t) {
        log_error("partition table: out of memory: not read again");
        return;
    }
    pthread_mutex_lock(&ps->reread_lock);
    size = image_size(ps->img);
    ret = partition_table_read(read_disk, ps->img, size, t);
    if (ret < 0) {
        log_error("partition table: not read (%s): the partition files stay as they were",
                  strerror(-ret));
    } else {
        unsigned changes = apply_table(ps, t);
        /* A file system on the whole disk rewrites its superblock in LBA
         * 2 and so has its (absent) table read again often: say nothing
         * then. */
        log_msg(!ps->read_once || changes || t->problems ? LOG_LEVEL_INFO : LOG_LEVEL_DEBUG,
                "partition table: %s%s, %u partition%s%s", scheme_names[t->scheme],
                t->gpt_backup ? " (backup header)" : "", t->count,
                t->count == 1 ? "" : "s", t->problems ? " (problems above)" : "");
        ps->read_once = true;
    }
    pthread_mutex_lock(&ps->watch_lock);
    ps->watched_size = size;
    ps->n_watch = 0;
    ps->watch[ps->n_watch++] = (struct partition_range){ 0, GPT_AREA_SECTORS * SECTOR };
    if (size >= GPT_BACKUP_SECTORS * SECTOR)
        ps->watch[ps->n_watch++] = (struct partition_range){
            size - GPT_BACKUP_SECTORS * SECTOR, GPT_BACKUP_SECTORS * SECTOR };
    for (unsigned i = 0; i < t->n_read; i++)
        ps->watch[ps->n_watch++] = t->read[i];
    pthread_mutex_unlock(&ps->watch_lock);
    pthread_mutex_unlock(&ps->reread_lock);
    free(t);
}

/* The disk's write watcher: a write over the table, or a resize. */
static void disk_changed(void *arg, uint64_t off, uint64_t len)
{
    struct partition_set *ps = arg;
    bool again;

    pthread_mutex_lock(&ps->watch_lock);
    again = image_size(ps->img) != ps->watched_size;
    for (unsigned i = 0; i < ps->n_watch && !again; i++)
        again = ranges_meet(off, len, ps->watch[i].off, ps->watch[i].len);
    pthread_mutex_unlock(&ps->watch_lock);
    if (again)
        reread(ps);
}

int partition_set_new(struct vfs *vfs, struct image *img, const char *disk_name,
                      mode_t mode, struct partition_set **out)
{
    struct partition_set *ps = calloc(1, sizeof(*ps));

    if (!ps || !(ps->disk_name = strdup(disk_name))) {
        free(ps);
        return -ENOMEM;
    }
    ps->vfs = vfs;
    ps->img = img;
    ps->mode = mode;
    pthread_mutex_init(&ps->reread_lock, NULL);
    pthread_mutex_init(&ps->watch_lock, NULL);
    reread(ps);
    /* Only -ENOMEM: the disk file is there. */
    if (vfs_watch_writes(vfs, VFS_DISK_INO, disk_changed, ps) < 0) {
        partition_set_free(ps);
        return -ENOMEM;
    }
    *out = ps;
    return 0;
}

void partition_set_free(struct partition_set *ps)
{
    if (!ps)
        return;
    vfs_watch_writes(ps->vfs, VFS_DISK_INO, NULL, NULL);
    pthread_mutex_destroy(&ps->reread_lock);
    pthread_mutex_destroy(&ps->watch_lock);
    free(ps->disk_name);
    free(ps);
}
