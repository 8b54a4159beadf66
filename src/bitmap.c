/*
 * bitmap — persistent dirty bitmaps: decoding and validating the bitmaps
 * extension, directory and tables; loading the enabled bitmaps; marking
 * them in use; setting bits; storing them back on a clean close.
 *
 * Crash safety of the in-place directory writes: only the first 16 bytes
 * of an entry change (table offset, table size, flags).  An entry starts
 * 8-byte aligned, so those bytes never straddle a 512-byte sector and land
 * together; any mix of old and new entries after a crash is a valid
 * directory (an old entry still names its old clusters, freed only after
 * the new directory is durable; the new clusters of an entry that stayed
 * old are leaks, which a check repairs).
 */
#include "bitmap.h"

#include "header.h"
#include "io.h"
#include "log.h"
#include "meta.h"
#include "refcount.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Byte offsets inside the extension and a directory entry (qcow2.txt). */
enum {
    EXT_NB_BITMAPS = 0, EXT_RESERVED = 4, EXT_DIR_SIZE = 8, EXT_DIR_OFFSET = 16,
    EXT_LEN = 24,
};
enum {
    ENT_TABLE_OFFSET = 0, ENT_TABLE_SIZE = 8, ENT_FLAGS = 12, ENT_TYPE = 16,
    ENT_GRANULARITY = 17, ENT_NAME_SIZE = 18, ENT_EXTRA_SIZE = 20, ENT_LEN = 24,
};

/* Bitmap table entries: bits 1-8 and 56-63 reserved; bit 0 "all ones"
 * only without an offset. */
#define TABLE_RESERVED      0xff000000000001feull
#define TABLE_OFFSET_MASK   0x00fffffffffffe00ull
#define TABLE_ALL_ONES      1ull

#define KNOWN_FLAGS         (BITMAP_FLAG_IN_USE | BITMAP_FLAG_AUTO)

struct bitmap {
    char *name;                 /* NUL-terminated copy */
    uint64_t entry_pos;         /* where its entry starts in the directory */
    uint64_t table_offset;
    uint32_t table_size;        /* entries */
    uint32_t flags;
    unsigned granularity_bits;
    uint64_t *table;            /* validated entries, host order */
    uint64_t *new_table;        /* during a store: the entries written */
    uint64_t new_table_offset;
    uint8_t *bits;              /* loaded (enabled, consistent): its data */
    uint64_t bytes;             /* bytes of data the disk needs */
    uint64_t nb_bits;
    bool changed;               /* a bit was set since loading */
};

struct bitmaps {
    struct meta *m;
    const char *path;           /* for messages; owned by the image */
    uint64_t dir_offset, dir_size;
    uint32_t nb;
    uint8_t *dir;               /* the directory as on disk */
    struct bitmap *bm;
    uint32_t *loaded;           /* indices of the loaded bitmaps */
    unsigned nb_loaded;
    bool in_use_written;
    pthread_mutex_t lock;       /* bits and changed of every bitmap */
};

static uint64_t align8(uint64_t v)
{
    return (v + 7) & ~7ull;
}

/* Bytes of data a bitmap of 2^@gbits granularity needs for @size bytes of
 * disk, and the table entries (clusters of 2^@cbits) they take. */
static uint64_t data_bytes(uint64_t size, unsigned gbits)
{
    uint64_t nbits = (size + (1ull << gbits) - 1) >> gbits;
    return (nbits + 7) / 8;
}

static uint64_t table_entries(uint64_t size, unsigned gbits, unsigned cbits)
{
    return (data_bytes(size, gbits) + (1ull << cbits) - 1) >> cbits;
}

void bitmap_close(struct bitmaps *b)
{
    if (!b)
        return;
    for (uint32_t i = 0; b->bm && i < b->nb; i++) {
        free(b->bm[i].name);
        free(b->bm[i].table);
        free(b->bm[i].new_table);
        free(b->bm[i].bits);
    }
    free(b->bm);
    free(b->loaded);
    free(b->dir);
    pthread_mutex_destroy(&b->lock);
    free(b);
}

unsigned bitmap_count(const struct bitmaps *b)
{
    return b ? b->nb : 0;
}

const uint8_t *bitmap_bits(const struct bitmaps *b, unsigned i, uint64_t *bytes)
{
    if (!b || i >= b->nb || !b->bm[i].bits)
        return NULL;
    *bytes = b->bm[i].bytes;
    return b->bm[i].bits;
}

/* ---- open: the extension --------------------------------------------------- */

static const struct header_ext *find_ext(const struct qcow2_header *h)
{
    for (unsigned i = 0; i < h->nb_exts; i++)
        if (h->exts[i].type == QCOW2_EXT_BITMAPS)
            return &h->exts[i];
    return NULL;
}

static int decode_extension(struct bitmaps *b, const struct header_ext *e)
{
    struct meta *m = b->m;
    uint32_t reserved;

    if (e->len != EXT_LEN)
        return meta_corrupt(m, "bitmaps extension: length %u, must be %u", e->len,
                            EXT_LEN);
    b->nb = be32_get(e->data + EXT_NB_BITMAPS);
    reserved = be32_get(e->data + EXT_RESERVED);
    b->dir_size = be64_get(e->data + EXT_DIR_SIZE);
    b->dir_offset = be64_get(e->data + EXT_DIR_OFFSET);

    if (reserved)
        return meta_corrupt(m, "bitmaps extension: reserved field (extension byte "
                            "%d) is 0x%x, must be zero", EXT_RESERVED, reserved);
    if (b->nb == 0)
        return meta_corrupt(m, "bitmaps extension: nb_bitmaps (extension byte %d) "
                            "is 0, must be at least 1", EXT_NB_BITMAPS);
    if (b->nb > BITMAP_MAX_BITMAPS || b->dir_size > BITMAP_MAX_DIR_BYTES) {
        log_error("%s: %u persistent bitmaps in a directory of %llu bytes: more "
                  "than QEMU supports (%u bitmaps, %u bytes); mount it read-only "
                  "(-o ro)", b->path, b->nb, (unsigned long long)b->dir_size,
                  BITMAP_MAX_BITMAPS, BITMAP_MAX_DIR_BYTES);
        return -ENOTSUP;
    }
    /* Every entry takes at least ENT_LEN bytes. */
    if (b->dir_size < (uint64_t)b->nb * ENT_LEN)
        return meta_corrupt(m, "bitmaps extension: bitmap_directory_size (extension "
                            "byte %d) is %llu, too small for %u bitmaps",
                            EXT_DIR_SIZE, (unsigned long long)b->dir_size, b->nb);
    if (b->dir_offset == 0 || (b->dir_offset & (m->cluster_size - 1)) ||
        b->dir_offset > m->file_end || b->dir_size > m->file_end - b->dir_offset)
        return meta_corrupt(m, "bitmaps extension: bitmap_directory_offset (extension "
                            "byte %d) 0x%llx with size %llu is not a cluster-aligned "
                            "range inside the file", EXT_DIR_OFFSET,
                            (unsigned long long)b->dir_offset,
                            (unsigned long long)b->dir_size);
    return 0;
}

/* ---- open: the directory ----------------------------------------------------- */

/* A valid entry we cannot update: refuse the writable open, as QEMU does. */
static int refuse(struct bitmaps *b, const struct bitmap *bm, uint64_t pos,
                  const char *why)
{
    log_error("%s: persistent bitmap '%s' (directory entry at 0x%llx): %s; it "
              "cannot be kept up to date, so the image is not mounted writable "
              "(QEMU refuses to open it at all); mount it read-only (-o ro)", b->path,
              bm->name ? bm->name : "?", (unsigned long long)(b->dir_offset + pos),
              why);
    return -ENOTSUP;
}

/*
 * Decode and validate the entry at directory byte @pos into @bm.
 * On exit: *next is where the next entry starts.
 */
static int decode_entry(struct bitmaps *b, uint64_t pos, struct bitmap *bm,
                        uint64_t *next)
{
    struct meta *m = b->m;
    const uint8_t *p = b->dir + pos;
    uint64_t at = b->dir_offset + pos, end, size;
    uint32_t extra;
    uint16_t name_size;
    uint8_t type;
    char why[160];

    if (b->dir_size - pos < ENT_LEN)
        return meta_corrupt(m, "bitmap directory at 0x%llx: entry at 0x%llx runs "
                            "past the directory's end (%llu bytes)",
                            (unsigned long long)b->dir_offset, (unsigned long long)at,
                            (unsigned long long)b->dir_size);
    bm->entry_pos = pos;
    bm->table_offset = be64_get(p + ENT_TABLE_OFFSET);
    bm->table_size = be32_get(p + ENT_TABLE_SIZE);
    bm->flags = be32_get(p + ENT_FLAGS);
    type = p[ENT_TYPE];
    bm->granularity_bits = p[ENT_GRANULARITY];
    name_size = be16_get(p + ENT_NAME_SIZE);
    extra = be32_get(p + ENT_EXTRA_SIZE);

    end = pos + align8((uint64_t)ENT_LEN + extra + name_size);
    if (end > b->dir_size)
        return meta_corrupt(m, "bitmap directory entry at 0x%llx: extra_data_size "
                            "(byte %d) %u and name_size (byte %d) %u run past the "
                            "directory's end (%llu bytes)", (unsigned long long)at,
                            ENT_EXTRA_SIZE, extra, ENT_NAME_SIZE, name_size,
                            (unsigned long long)b->dir_size);
    if (name_size == 0)
        return meta_corrupt(m, "bitmap directory entry at 0x%llx: name_size (byte "
                            "%d) is 0", (unsigned long long)at, ENT_NAME_SIZE);
    for (uint64_t i = pos + ENT_LEN + extra + name_size; i < end; i++)
        if (b->dir[i])
            return meta_corrupt(m, "bitmap directory entry at 0x%llx: padding byte "
                                "at 0x%llx is 0x%02x, must be zero",
                                (unsigned long long)at,
                                (unsigned long long)(b->dir_offset + i), b->dir[i]);
    bm->name = malloc((size_t)name_size + 1);
    if (!bm->name)
        return -ENOMEM;
    memcpy(bm->name, p + ENT_LEN + extra, name_size);
    bm->name[name_size] = '\0';
    *next = end;

    /* Valid, but not ours to update. */
    if (type != BITMAP_TYPE_DIRTY_TRACKING) {
        snprintf(why, sizeof(why), "type (byte %d) is %u, only 1 (dirty tracking) "
                 "is known", ENT_TYPE, type);
        return refuse(b, bm, pos, why);
    }
    if (bm->flags & ~KNOWN_FLAGS) {
        snprintf(why, sizeof(why), "flags (byte %d) 0x%x has unknown bits 0x%x",
                 ENT_FLAGS, bm->flags, bm->flags & ~KNOWN_FLAGS);
        return refuse(b, bm, pos, why);
    }
    if (extra) {
        snprintf(why, sizeof(why), "extra_data_size (byte %d) is %u: extra data is "
                 "not understood", ENT_EXTRA_SIZE, extra);
        return refuse(b, bm, pos, why);
    }
    if (bm->granularity_bits < BITMAP_MIN_GRANULARITY_BITS ||
        bm->granularity_bits > BITMAP_MAX_GRANULARITY_BITS) {
        snprintf(why, sizeof(why), "granularity_bits (byte %d) is %u, outside %u..%u",
                 ENT_GRANULARITY, bm->granularity_bits, BITMAP_MIN_GRANULARITY_BITS,
                 BITMAP_MAX_GRANULARITY_BITS);
        return refuse(b, bm, pos, why);
    }
    if (name_size > BITMAP_MAX_NAME) {
        snprintf(why, sizeof(why), "name_size (byte %d) is %u, longer than %u",
                 ENT_NAME_SIZE, name_size, BITMAP_MAX_NAME);
        return refuse(b, bm, pos, why);
    }
    if (bm->table_size > BITMAP_MAX_TABLE_ENTRIES ||
        (uint64_t)bm->table_size * m->cluster_size > BITMAP_MAX_DATA_BYTES) {
        snprintf(why, sizeof(why), "bitmap_table_size (byte %d) %u: more than %u "
                 "bytes of data", ENT_TABLE_SIZE, bm->table_size, BITMAP_MAX_DATA_BYTES);
        return refuse(b, bm, pos, why);
    }

    if (bm->table_offset == 0 || (bm->table_offset & (m->cluster_size - 1)) ||
        bm->table_offset > m->file_end ||
        (uint64_t)bm->table_size * 8 > m->file_end - bm->table_offset)
        return meta_corrupt(m, "bitmap '%s' (directory entry at 0x%llx): "
                            "bitmap_table_offset (byte %d) 0x%llx with %u entries is "
                            "not a cluster-aligned range inside the file", bm->name,
                            (unsigned long long)at, ENT_TABLE_OFFSET,
                            (unsigned long long)bm->table_offset, bm->table_size);
    if (bm->table_size == 0)
        return meta_corrupt(m, "bitmap '%s' (directory entry at 0x%llx): "
                            "bitmap_table_size (byte %d) is 0", bm->name,
                            (unsigned long long)at, ENT_TABLE_SIZE);
    size = m->virtual_size;
    /* In use: not saved, its size may be stale (QEMU does not check it). */
    if (!(bm->flags & BITMAP_FLAG_IN_USE) &&
        bm->table_size != table_entries(size, bm->granularity_bits, m->cluster_bits))
        return meta_corrupt(m, "bitmap '%s' (directory entry at 0x%llx): "
                            "bitmap_table_size (byte %d) is %u, but a disk of %llu "
                            "bytes at granularity %llu needs %llu entries", bm->name,
                            (unsigned long long)at, ENT_TABLE_SIZE, bm->table_size,
                            (unsigned long long)size,
                            1ull << bm->granularity_bits,
                            (unsigned long long)table_entries(size, bm->granularity_bits,
                                                              m->cluster_bits));
    bm->bytes = data_bytes(size, bm->granularity_bits);
    bm->nb_bits = (size + (1ull << bm->granularity_bits) - 1) >> bm->granularity_bits;
    return 0;
}

static int by_name(const void *x, const void *y)
{
    const struct bitmap *const *a = x, *const *c = y;
    int d = strcmp((*a)->name, (*c)->name);

    return d ? d : ((*a)->entry_pos > (*c)->entry_pos) - ((*a)->entry_pos < (*c)->entry_pos);
}

/* Names are unique (sorted, not pairwise: there may be 65535). */
static int check_unique_names(struct bitmaps *b)
{
    struct bitmap **sorted = malloc(b->nb * sizeof(*sorted));
    int ret = 0;

    if (!sorted)
        return -ENOMEM;
    for (uint32_t i = 0; i < b->nb; i++)
        sorted[i] = &b->bm[i];
    qsort(sorted, b->nb, sizeof(*sorted), by_name);
    for (uint32_t i = 1; i < b->nb && ret == 0; i++)
        if (strcmp(sorted[i - 1]->name, sorted[i]->name) == 0)
            ret = meta_corrupt(b->m, "bitmap directory at 0x%llx: two bitmaps named "
                               "'%s' (entries at 0x%llx and 0x%llx)",
                               (unsigned long long)b->dir_offset, sorted[i]->name,
                               (unsigned long long)(b->dir_offset + sorted[i - 1]->entry_pos),
                               (unsigned long long)(b->dir_offset + sorted[i]->entry_pos));
    free(sorted);
    return ret;
}

static int decode_directory(struct bitmaps *b)
{
    uint64_t pos = 0;
    uint32_t i = 0;
    int ret;

    b->bm = calloc(b->nb, sizeof(*b->bm));
    b->loaded = calloc(b->nb, sizeof(*b->loaded));
    b->dir = malloc(b->dir_size);
    if (!b->bm || !b->loaded || !b->dir)
        return -ENOMEM;
    ret = io_pread(b->m->io, b->dir, b->dir_size, b->dir_offset);
    if (ret < 0)
        return ret;
    while (pos < b->dir_size) {
        if (i == b->nb)
            return meta_corrupt(b->m, "bitmap directory at 0x%llx: more entries "
                                "than nb_bitmaps (%u) in its %llu bytes",
                                (unsigned long long)b->dir_offset, b->nb,
                                (unsigned long long)b->dir_size);
        ret = decode_entry(b, pos, &b->bm[i], &pos);
        if (ret < 0)
            return ret;
        i++;
    }
    if (i != b->nb)
        return meta_corrupt(b->m, "bitmap directory at 0x%llx: %u entries in its "
                            "%llu bytes, but nb_bitmaps says %u",
                            (unsigned long long)b->dir_offset, i,
                            (unsigned long long)b->dir_size, b->nb);
    return check_unique_names(b);
}

/* ---- open: tables and data --------------------------------------------------- */

/* Read and validate @bm's table; record its clusters and its data clusters
 * as bitmap metadata. */
static int load_table(struct bitmaps *b, struct bitmap *bm)
{
    struct meta *m = b->m;
    uint64_t bytes = (uint64_t)bm->table_size * 8;
    int ret;

    bm->table = malloc(bytes);
    if (!bm->table)
        return -ENOMEM;
    ret = io_pread(m->io, bm->table, bytes, bm->table_offset);
    if (ret < 0)
        return ret;
    ret = meta_mark(m, bm->table_offset, bytes, META_KIND_BITMAPS);
    for (uint32_t j = 0; ret == 0 && j < bm->table_size; j++) {
        uint64_t e = be64_get(&bm->table[j]), off = e & TABLE_OFFSET_MASK;
        if ((e & TABLE_RESERVED) || (off && (e & TABLE_ALL_ONES)) ||
            (off & (m->cluster_size - 1)) || off > m->file_end ||
            m->file_end - off < m->cluster_size)
            return meta_corrupt(m, "bitmap '%s': table entry %u (at 0x%llx) = "
                                "0x%016llx: reserved bits set, not cluster aligned, "
                                "or past the end of the file", bm->name, j,
                                (unsigned long long)(bm->table_offset + 8ull * j),
                                (unsigned long long)e);
        bm->table[j] = e;
        if (off)
            ret = meta_mark(m, off, m->cluster_size, META_KIND_BITMAPS);
    }
    return ret;
}

/* Load the data of an enabled, consistent bitmap. */
static int load_data(struct bitmaps *b, struct bitmap *bm)
{
    uint64_t cs = b->m->cluster_size;
    int ret;

    bm->bits = calloc(1, bm->bytes ? bm->bytes : 1);
    if (!bm->bits)
        return -ENOMEM;
    for (uint32_t j = 0; j < bm->table_size; j++) {
        uint64_t from = (uint64_t)j * cs, n = bm->bytes - from < cs ? bm->bytes - from : cs;
        uint64_t off = bm->table[j] & TABLE_OFFSET_MASK;
        if (off) {
            ret = io_pread(b->m->io, bm->bits + from, n, off);
            if (ret < 0)
                return ret;
        } else if (bm->table[j] & TABLE_ALL_ONES) {
            memset(bm->bits + from, 0xff, n);
        }
    }
    /* The unused tail bits must be zero; keep them so whatever was read. */
    if (bm->nb_bits % 8)
        bm->bits[bm->bytes - 1] &= (uint8_t)((1u << (bm->nb_bits % 8)) - 1);
    return 0;
}

int bitmap_open(struct meta *m, const struct qcow2_header *h, const char *path,
                struct bitmaps **out)
{
    const struct header_ext *e = find_ext(h);
    struct bitmaps *b;
    uint64_t memory = 0, tables = 0;
    int ret;

    *out = NULL;
    /* Without the autoclear bit the bitmaps are stale: QEMU ignores them,
     * and the bit stays clear. */
    if (!e || h->version < 3 || !(h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
        return 0;
    b = calloc(1, sizeof(*b));
    if (!b)
        return -ENOMEM;
    b->m = m;
    b->path = path;
    pthread_mutex_init(&b->lock, NULL);

    ret = decode_extension(b, e);
    if (ret == 0)
        ret = decode_directory(b);
    if (ret == 0)
        ret = meta_mark(m, b->dir_offset, b->dir_size, META_KIND_BITMAPS);
    for (uint32_t i = 0; ret == 0 && i < b->nb; i++) {
        struct bitmap *bm = &b->bm[i];
        /* Tables may overlap each other: bound what is read, too. */
        tables += (uint64_t)bm->table_size * 8;
        if (tables > BITMAP_MAX_MEMORY) {
            log_error("%s: the bitmap tables of the persistent bitmaps take more "
                      "than %llu MiB; mount it read-only (-o ro)", path,
                      BITMAP_MAX_MEMORY >> 20);
            ret = -ENOTSUP;
            break;
        }
        ret = load_table(b, bm);
        if (ret < 0)
            break;
        if ((bm->flags & BITMAP_FLAG_IN_USE) || !(bm->flags & BITMAP_FLAG_AUTO)) {
            /* Never stored: its table is not needed again. */
            free(bm->table);
            bm->table = NULL;
        }
        if (bm->flags & BITMAP_FLAG_IN_USE) {
            log_warn("%s: persistent bitmap '%s' is marked in use: it was not saved "
                     "cleanly (a crash?), and QEMU takes it as inconsistent; it is "
                     "left as it is, not updated (remove it with qemu-img bitmap "
                     "--remove and start a new backup chain)", path, bm->name);
            continue;
        }
        if (!(bm->flags & BITMAP_FLAG_AUTO))
            continue;           /* disabled: stays unchanged */
        memory += bm->bytes + (uint64_t)bm->table_size * 8;
        if (memory > BITMAP_MAX_MEMORY) {
            log_error("%s: the enabled persistent bitmaps need more than %llu MiB "
                      "of memory; mount it read-only (-o ro)", path,
                      BITMAP_MAX_MEMORY >> 20);
            ret = -ENOTSUP;
            break;
        }
        ret = load_data(b, bm);
        if (ret == 0)
            b->loaded[b->nb_loaded++] = i;
    }
    if (ret < 0) {
        bitmap_close(b);
        return ret;
    }
    *out = b;
    return 0;
}

/* ---- in use, marking ----------------------------------------------------------- */

/* Write @dir as the directory in place and flush. */
static int write_directory(struct bitmaps *b, const uint8_t *dir)
{
    int ret = meta_check_write(b->m, b->dir_offset, b->dir_size, META_KIND_BITMAPS);

    if (ret == 0)
        ret = io_pwrite(b->m->io, dir, b->dir_size, b->dir_offset);
    if (ret == 0)
        ret = io_flush(b->m->io);
    return ret;
}

int bitmap_prepare_write(struct bitmaps *b)
{
    uint8_t *dir;
    int ret;

    if (!b || b->nb_loaded == 0 || b->in_use_written)
        return 0;
    dir = malloc(b->dir_size);
    if (!dir)
        return -ENOMEM;
    memcpy(dir, b->dir, b->dir_size);
    for (uint32_t i = 0; i < b->nb; i++)
        if (b->bm[i].bits)
            be32_put(dir + b->bm[i].entry_pos + ENT_FLAGS,
                     b->bm[i].flags | BITMAP_FLAG_IN_USE);
    ret = write_directory(b, dir);
    if (ret == 0) {
        free(b->dir);
        b->dir = dir;
        b->in_use_written = true;
    } else {
        free(dir);
    }
    return ret;
}

/* Set bits @first..@last of @bits. */
static void set_bits(uint8_t *bits, uint64_t first, uint64_t last)
{
    uint64_t fb = first / 8, lb = last / 8;

    if (fb == lb) {
        bits[fb] |= (uint8_t)((0xffu << (first % 8)) & (0xffu >> (7 - last % 8)));
        return;
    }
    bits[fb] |= (uint8_t)(0xffu << (first % 8));
    if (lb > fb + 1)
        memset(bits + fb + 1, 0xff, lb - fb - 1);
    bits[lb] |= (uint8_t)(0xffu >> (7 - last % 8));
}

void bitmap_mark(struct bitmaps *b, uint64_t offset, uint64_t len)
{
    if (!b || b->nb_loaded == 0 || len == 0)
        return;
    pthread_mutex_lock(&b->lock);
    for (unsigned i = 0; i < b->nb_loaded; i++) {
        struct bitmap *bm = &b->bm[b->loaded[i]];
        uint64_t first = offset >> bm->granularity_bits;
        uint64_t last = (offset + len - 1) >> bm->granularity_bits;

        if (!bm->bits || first >= bm->nb_bits)
            continue;
        if (last >= bm->nb_bits)
            last = bm->nb_bits - 1;
        set_bits(bm->bits, first, last);
        bm->changed = true;
    }
    pthread_mutex_unlock(&b->lock);
}

/* ---- store ----------------------------------------------------------------------- */

/* The clusters one store allocated, to give back if it fails. */
struct allocs {
    uint64_t *off;
    size_t nb, cap;
    uint64_t cs;
};

static int alloc_cluster(struct bitmaps *b, struct refcount *rc, struct allocs *a,
                         uint64_t nb, uint64_t *off)
{
    int fresh, ret;

    if (a->nb + nb > a->cap) {
        size_t cap = (a->cap + nb) * 2;
        uint64_t *n = realloc(a->off, cap * sizeof(*n));
        if (!n)
            return -ENOMEM;
        a->off = n;
        a->cap = cap;
    }
    ret = refcount_alloc(rc, nb, off, &fresh);
    if (ret < 0)
        return ret;
    for (uint64_t i = 0; i < nb; i++)
        a->off[a->nb++] = *off + i * a->cs;
    ret = meta_mark(b->m, *off, nb * a->cs, META_KIND_BITMAPS);
    if (ret == 0)
        ret = meta_check_write(b->m, *off, nb * a->cs, META_KIND_BITMAPS);
    return ret;
}

static bool all_zero(const uint8_t *p, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        if (p[i])
            return false;
    return true;
}

/*
 * Write @bm's data into new clusters and a new table.
 * On exit: bm->new_table and bm->new_table_offset describe them (as many
 *          entries as before: the disk's size has not changed).
 */
static int store_one(struct bitmaps *b, struct refcount *rc, struct allocs *a,
                     struct bitmap *bm)
{
    uint64_t cs = b->m->cluster_size;
    uint64_t tclusters = ((uint64_t)bm->table_size * 8 + cs - 1) / cs;
    uint8_t *buf = malloc(cs), *table = calloc(tclusters, cs);
    int ret = 0;

    bm->new_table = calloc(bm->table_size, sizeof(*bm->new_table));
    if (!buf || !table || !bm->new_table) {
        ret = -ENOMEM;
        goto out;
    }
    for (uint32_t j = 0; j < bm->table_size && ret == 0; j++) {
        uint64_t from = (uint64_t)j * cs, n = bm->bytes - from < cs ? bm->bytes - from : cs;
        uint64_t off = 0;
        if (from >= bm->bytes || all_zero(bm->bits + from, n))
            continue;           /* entry 0: reads as zeros */
        memset(buf, 0, cs);
        memcpy(buf, bm->bits + from, n);
        ret = alloc_cluster(b, rc, a, 1, &off);
        if (ret == 0)
            ret = io_pwrite(b->m->io, buf, cs, off);
        be64_put(table + 8ull * j, off);
        bm->new_table[j] = off;
    }
    if (ret == 0)
        ret = alloc_cluster(b, rc, a, tclusters, &bm->new_table_offset);
    if (ret == 0)
        ret = io_pwrite(b->m->io, table, tclusters * cs, bm->new_table_offset);
out:
    free(buf);
    free(table);
    return ret;
}

/* Queue the frees of @bm's old table and data (their references are gone
 * from the durable directory). */
static int free_old(struct bitmaps *b, struct refcount *rc, const struct bitmap *bm)
{
    struct meta *m = b->m;
    int ret = 0;

    for (uint32_t j = 0; j < bm->table_size && ret == 0; j++) {
        uint64_t off = bm->table[j] & TABLE_OFFSET_MASK;
        if (off) {
            (void)meta_mark(m, off, m->cluster_size, META_KIND_NONE);
            ret = refcount_defer_free(rc, off, m->cluster_size);
        }
    }
    if (ret == 0) {
        (void)meta_mark(m, bm->table_offset, (uint64_t)bm->table_size * 8, META_KIND_NONE);
        ret = refcount_defer_free(rc, bm->table_offset, (uint64_t)bm->table_size * 8);
    }
    return ret;
}

int bitmap_store(struct bitmaps *b, struct refcount *rc)
{
    struct allocs a = { .cs = b ? b->m->cluster_size : 0 };
    uint8_t *dir = NULL;
    bool changed = false;
    int ret = 0;

    if (!b)
        return 0;
    /* A change that left the image as it was (zeroing zeros) wrote no in
     * use mark, and is stored all the same: QEMU marks every request. */
    for (unsigned i = 0; i < b->nb_loaded; i++)
        changed |= b->bm[b->loaded[i]].changed;
    if (!b->in_use_written && !changed)
        return 0;
    if (meta_is_corrupt(b->m)) {
        /* Reported already; nothing more is written. */
        log_warn("%s: the persistent bitmaps are not stored (the image is marked "
                 "corrupt): they stay in use, which QEMU takes as inconsistent",
                 b->path);
        return 0;
    }
    dir = malloc(b->dir_size);
    if (!dir) {
        ret = -ENOMEM;
        goto fail;
    }
    memcpy(dir, b->dir, b->dir_size);
    for (uint32_t i = 0; i < b->nb && ret == 0; i++) {
        struct bitmap *bm = &b->bm[i];
        uint8_t *ent = dir + bm->entry_pos;
        if (!bm->bits)
            continue;
        if (bm->changed) {
            ret = store_one(b, rc, &a, bm);
            be64_put(ent + ENT_TABLE_OFFSET, bm->new_table_offset);
        }
        be32_put(ent + ENT_FLAGS, bm->flags & ~BITMAP_FLAG_IN_USE);
    }
    /* New data and tables and their refcounts durable before the directory
     * names them (invariants 1 and 2 of image_flush.c). */
    if (ret == 0)
        ret = refcount_flush(rc);
    if (ret < 0)
        goto fail;
    ret = write_directory(b, dir);
    if (ret < 0) {
        /* The directory may be partly written: what it may name stays
         * allocated (a leak at worst). */
        goto out;
    }
    free(b->dir);
    b->dir = dir;
    dir = NULL;
    b->in_use_written = false;
    for (uint32_t i = 0; i < b->nb && ret == 0; i++) {
        struct bitmap *bm = &b->bm[i];
        if (!bm->bits || !bm->changed)
            continue;
        ret = free_old(b, rc, bm);
        free(bm->table);
        bm->table = bm->new_table;
        bm->new_table = NULL;
        bm->table_offset = bm->new_table_offset;
        bm->changed = false;
    }
    goto out;
fail:
    for (size_t i = 0; i < a.nb; i++) {
        (void)meta_mark(b->m, a.off[i], a.cs, META_KIND_NONE);
        (void)refcount_update(rc, a.off[i], a.cs, -1);
    }
out:
    for (uint32_t i = 0; i < b->nb; i++) {
        free(b->bm[i].new_table);
        b->bm[i].new_table = NULL;
    }
    if (ret < 0)
        log_error("%s: storing the persistent bitmaps failed (%s): they stay "
                  "marked in use, which QEMU takes as inconsistent", b->path,
                  strerror(-ret));
    free(a.off);
    free(dir);
    return ret;
}
