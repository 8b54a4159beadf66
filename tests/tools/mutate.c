/*
 * mutate — targeted and random corruptions of qcow2 images, for the
 * hardening tests (tests/integration/test_mutated_images.sh and
 * test_qcow2check.sh).  Parses a *valid* image (one made by qemu-img) to
 * find where its structures are, and prints or applies changes.
 *
 *   mutate IMG OFFSET HEXBYTES [OFFSET HEXBYTES]...
 *       Overwrite bytes at OFFSET (decimal or 0x...) with HEXBYTES.
 *   mutate --plan IMG full|short|min FLIPS SEED
 *       Print the targeted mutations for IMG, then FLIPS random ones (each
 *       one to four bytes of metadata changed; seeds SEED, SEED+1, ...).
 *       One per line:   NAME FLAGS poke OFFSET HEX [OFFSET HEX]...
 *                   or  NAME FLAGS trunc LENGTH
 *       FLAGS: "S" the active guest view is unchanged (a read-only mount,
 *       if it comes up, must show the original content); "R" refcounts and
 *       mapping are unchanged (data written through a read-write mount must
 *       read back); "-" neither.
 *   mutate --info IMG
 *       key=value lines: geometry, table offsets, the L1 and refcount table.
 *   mutate --l2entry IMG GUEST_OFFSET [SNAPSHOT_INDEX]
 *       Print "ENTRY_FILE_OFFSET ENTRY_HEX" for the L2 entry mapping the
 *       guest offset (of the active state, or of snapshot SNAPSHOT_INDEX);
 *       "none" when the L1 entry is empty.
 *   mutate --refcount IMG CLUSTER [VALUE]
 *       Print (or set) the refcount of host cluster CLUSTER.
 *   mutate --snapshot IMG INDEX
 *       Print "L1_OFFSET L1_SIZE ENTRY_OFFSET" of snapshot INDEX.
 *   mutate --counted-past-eof IMG
 *       Print how many clusters at or past the end of the file have a
 *       nonzero refcount (leaks that qemu-img check does not look for).
 *   mutate --ext IMG TYPE [HEXBYTES]
 *       Rewrite the header extension area: drop every extension of TYPE
 *       (e.g. 0x6803f857, the feature name table) and, with HEXBYTES, add
 *       one of TYPE with that payload before the END marker.  Fails when
 *       the result would not fit before the backing file name (or the end
 *       of the first cluster).
 *
 * Exit status: 0 ok, 1 error, 2 usage.  Uses libc only.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_FILE    (256ull << 20)
#define OFF_MASK    0x00fffffffffffe00ull
#define COPIED      (1ull << 63)
#define COMPRESSED  (1ull << 62)
#define TIB         (1ull << 40)

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;

    fputs("mutate: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

static uint64_t get_be(const uint8_t *p, unsigned width)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < width; i++)
        v = v << 8 | p[i];
    return v;
}

static void put_be(uint8_t *p, unsigned width, uint64_t v)
{
    for (unsigned i = width; i-- > 0; v >>= 8)
        p[i] = (uint8_t)v;
}

static uint64_t parse_u64(const char *s)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno || end == s || *end)
        die("invalid number \"%s\"", s);
    return v;
}

/* ---- the image ------------------------------------------------------------ */

struct ext { uint64_t off; uint32_t type, len; };
struct snap {
    uint64_t off;               /* entry offset in the file */
    uint64_t l1_off;
    uint32_t l1_size;
    uint16_t id_len, name_len;
    uint32_t extra_len;
};

struct img {
    const char *path;
    uint8_t *d;
    uint64_t len;
    unsigned version, cb, rorder;
    uint64_t cs, size, l1_off, rt_off, snap_off, incompat, compat, autoclear;
    uint32_t l1_size, rt_clusters, nb_snap, hlen;
    bool extl2;
    unsigned l2eb;              /* bytes per L2 entry */
    uint64_t l2n;               /* entries per L2 table */
    struct ext exts[64];
    unsigned nb_exts;
    uint64_t end_marker;        /* offset of the END extension, or 0 */
    uint64_t ext_end;
    struct snap snaps[16];
    unsigned nb_snaps;
    uint64_t snap_bytes;
};

static uint64_t be64at(const struct img *im, uint64_t off)
{
    if (off + 8 > im->len)
        die("%s: read of 8 bytes at 0x%" PRIx64 " past the end", im->path, off);
    return get_be(im->d + off, 8);
}

static void load(struct img *im, const char *path)
{
    struct stat st;
    int fd = open(path, O_RDONLY);
    uint64_t off;

    memset(im, 0, sizeof(*im));
    im->path = path;
    if (fd < 0 || fstat(fd, &st) < 0)
        die("%s: %s", path, strerror(errno));
    if ((uint64_t)st.st_size > MAX_FILE || st.st_size < 112)
        die("%s: unexpected size %lld", path, (long long)st.st_size);
    im->len = (uint64_t)st.st_size;
    im->d = malloc(im->len);
    if (!im->d)
        die("out of memory");
    for (uint64_t done = 0; done < im->len;) {
        ssize_t n = pread(fd, im->d + done, im->len - done, (off_t)done);
        if (n <= 0)
            die("%s: read failed", path);
        done += (uint64_t)n;
    }
    close(fd);

    if (get_be(im->d, 4) != 0x514649fbu)
        die("%s: not a qcow2 image", path);
    im->version = (unsigned)get_be(im->d + 4, 4);
    im->cb = (unsigned)get_be(im->d + 20, 4);
    if (im->cb < 9 || im->cb > 21)
        die("%s: bad cluster_bits", path);
    im->cs = 1ull << im->cb;
    im->size = get_be(im->d + 24, 8);
    im->l1_size = (uint32_t)get_be(im->d + 36, 4);
    im->l1_off = get_be(im->d + 40, 8);
    im->rt_off = get_be(im->d + 48, 8);
    im->rt_clusters = (uint32_t)get_be(im->d + 56, 4);
    im->nb_snap = (uint32_t)get_be(im->d + 60, 4);
    im->snap_off = get_be(im->d + 64, 8);
    if (im->version >= 3) {
        im->incompat = get_be(im->d + 72, 8);
        im->compat = get_be(im->d + 80, 8);
        im->autoclear = get_be(im->d + 88, 8);
        im->rorder = (unsigned)get_be(im->d + 96, 4);
        im->hlen = (uint32_t)get_be(im->d + 100, 4);
    } else {
        im->rorder = 4;
        im->hlen = 72;
    }
    im->extl2 = im->incompat & (1u << 4);
    im->l2eb = im->extl2 ? 16 : 8;
    im->l2n = im->cs / im->l2eb;

    off = im->hlen;
    for (;;) {
        uint32_t type, len;
        if (off + 8 > im->cs || off + 8 > im->len)
            break;
        type = (uint32_t)get_be(im->d + off, 4);
        len = (uint32_t)get_be(im->d + off + 4, 4);
        if (type == 0) {
            im->end_marker = off;
            off += 8;
            break;
        }
        if (im->nb_exts < 64)
            im->exts[im->nb_exts++] = (struct ext){ off, type, len };
        off += 8 + (((uint64_t)len + 7) & ~7ull);
    }
    im->ext_end = off;

    off = im->snap_off;
    for (uint32_t i = 0; i < im->nb_snap && i < 16; i++) {
        struct snap *s = &im->snaps[im->nb_snaps++];
        if (off + 40 > im->len)
            die("%s: snapshot table past the end", path);
        s->off = off;
        s->l1_off = get_be(im->d + off, 8);
        s->l1_size = (uint32_t)get_be(im->d + off + 8, 4);
        s->id_len = (uint16_t)get_be(im->d + off + 12, 2);
        s->name_len = (uint16_t)get_be(im->d + off + 14, 2);
        s->extra_len = (uint32_t)get_be(im->d + off + 36, 4);
        off += (40 + (uint64_t)s->extra_len + s->id_len + s->name_len + 7) & ~7ull;
    }
    im->snap_bytes = off - im->snap_off;
}

static void unload(struct img *im)
{
    free(im->d);
    im->d = NULL;
}

/* Refcount of host cluster @ci, with the file offset of its entry. */
static uint64_t refcount_at(const struct img *im, uint64_t ci, uint64_t *entry_bit)
{
    unsigned bits = 1u << im->rorder;
    uint64_t per_block = im->cs * 8 / bits, ti = ci / per_block, blk, bit;

    if (ti >= (uint64_t)im->rt_clusters * im->cs / 8)
        die("cluster %" PRIu64 " is beyond the refcount table", ci);
    blk = be64at(im, im->rt_off + 8 * ti) & ~0x1ffull;
    if (!blk)
        die("cluster %" PRIu64 " has no refcount block", ci);
    bit = blk * 8 + (ci % per_block) * bits;
    if (entry_bit)
        *entry_bit = bit;
    if (bits >= 8)
        return get_be(im->d + bit / 8, bits / 8);
    return (im->d[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
}

/* The bytes that set the refcount of @ci to @v: *off, *width, *value. */
static void refcount_poke(const struct img *im, uint64_t ci, uint64_t v, uint64_t *off,
                          unsigned *width, uint64_t *value)
{
    unsigned bits = 1u << im->rorder;
    uint64_t bit;

    refcount_at(im, ci, &bit);
    *off = bit / 8;
    if (bits >= 8) {
        *width = bits / 8;
        *value = bits == 64 ? v : v & ((1ull << bits) - 1);
    } else {
        unsigned mask = ((1u << bits) - 1) << (bit % 8);
        *width = 1;
        *value = (im->d[bit / 8] & ~mask) | ((unsigned)(v << (bit % 8)) & mask);
    }
}

static uint64_t refcount_max(const struct img *im)
{
    return im->rorder == 6 ? UINT64_MAX : (1ull << (1u << im->rorder)) - 1;
}

/* ---- plan output ------------------------------------------------------------ */

struct change { uint64_t off; unsigned n; uint8_t b[48]; };

static struct img *P;           /* the image being planned */
static int LEVEL;               /* 0 min, 1 short, 2 full */
static char **seen;
static size_t nb_seen, cap_seen;

/* Print one mutation (skipped when it changes nothing or repeats one). */
static void emit(const char *name, const char *flags, const struct change *c, unsigned nc)
{
    char line[1024];
    size_t pos = 0;
    bool changes = false;

    for (unsigned i = 0; i < nc; i++) {
        pos += (size_t)snprintf(line + pos, sizeof(line) - pos, " %" PRIu64 " ", c[i].off);
        for (unsigned k = 0; k < c[i].n; k++) {
            pos += (size_t)snprintf(line + pos, sizeof(line) - pos, "%02x", c[i].b[k]);
            if (c[i].off + k >= P->len || P->d[c[i].off + k] != c[i].b[k])
                changes = true;
        }
    }
    if (!changes)
        return;
    for (size_t i = 0; i < nb_seen; i++)
        if (strcmp(seen[i], line) == 0)
            return;
    if (nb_seen == cap_seen) {
        cap_seen = cap_seen ? cap_seen * 2 : 256;
        seen = realloc(seen, cap_seen * sizeof(*seen));
        if (!seen)
            die("out of memory");
    }
    seen[nb_seen++] = strdup(line);
    printf("%s %s poke%s\n", name, flags, line);
}

static void field(const char *name, const char *flags, uint64_t off, unsigned width,
                  uint64_t v)
{
    struct change c = { .off = off, .n = width };
    put_be(c.b, width, v);
    emit(name, flags, &c, 1);
}

static void fieldf(const char *flags, uint64_t off, unsigned width, uint64_t v,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void fieldf(const char *flags, uint64_t off, unsigned width, uint64_t v,
                   const char *fmt, ...)
{
    char name[200];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(name, sizeof(name), fmt, ap);
    va_end(ap);
    field(name, flags, off, width, v);
}

static uint64_t nb_trunc_seen[64];
static unsigned nb_truncs;

static void trunc_at(const char *name, uint64_t len)
{
    if (len >= P->len)
        return;
    for (unsigned i = 0; i < nb_truncs; i++)
        if (nb_trunc_seen[i] == len)
            return;
    if (nb_truncs < 64)
        nb_trunc_seen[nb_truncs++] = len;
    printf("%s - trunc %" PRIu64 "\n", name, len);
}

/* ---- header ------------------------------------------------------------------ */

struct hfield { const char *name; unsigned off, width; const char *flags; bool offset; };

static const struct hfield hfields[] = {
    { "magic", 0, 4, "-", false },
    { "version", 4, 4, "-", false },
    { "backing_file_offset", 8, 8, "-", true },
    { "backing_file_size", 16, 4, "-", false },
    { "cluster_bits", 20, 4, "-", false },
    { "size", 24, 8, "-", false },
    { "crypt_method", 32, 4, "-", false },
    { "l1_size", 36, 4, "-", false },
    { "l1_table_offset", 40, 8, "-", true },
    { "refcount_table_offset", 48, 8, "S", true },
    { "refcount_table_clusters", 56, 4, "S", false },
    { "nb_snapshots", 60, 4, "SR", false },
    { "snapshots_offset", 64, 8, "SR", true },
    { "incompatible_features", 72, 8, "-", false },
    { "compatible_features", 80, 8, "SR", false },
    { "autoclear_features", 88, 8, "SR", false },
    { "refcount_order", 96, 4, "S", false },
    { "header_length", 100, 4, "SR", false },
    { "compression_type", 104, 1, "-", false },
};

/* Flags of the header byte at @off. */
static const char *header_byte_flags(const struct img *im, uint64_t off)
{
    for (size_t i = 0; i < sizeof(hfields) / sizeof(hfields[0]); i++)
        if (off >= hfields[i].off && off < hfields[i].off + hfields[i].width)
            return hfields[i].flags;
    return off < im->hlen ? "SR" : "SR";    /* padding, extensions */
}

static uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

/* An aligned offset just past the end of the file (a few clusters). */
static uint64_t past_eof(const struct img *im) { return round_up(im->len, im->cs) + 4 * im->cs; }
/* The largest cluster-aligned offset an entry can hold. */
static uint64_t max_off(const struct img *im) { return OFF_MASK & ~(im->cs - 1); }

static void plan_header(struct img *im, int level)
{
    unsigned nf = sizeof(hfields) / sizeof(hfields[0]);
    bool full = level >= 2;

    for (unsigned i = 0; i < nf; i++) {
        const struct hfield *f = &hfields[i];
        uint64_t v, ones;
        if (f->off + f->width > (im->version >= 3 ? im->hlen : 72u))
            continue;
        v = get_be(im->d + f->off, f->width);
        ones = f->width == 8 ? UINT64_MAX : (1ull << (8 * f->width)) - 1;
        if (level == 0) {
            /* min: a few geometry fields, to 0 and off by one */
            if (f->off != 20 && f->off != 24 && f->off != 36)
                continue;
            fieldf(f->flags, f->off, f->width, 0, "hdr.%s.zero", f->name);
            fieldf(f->flags, f->off, f->width, (v + 1) & ones, "hdr.%s.inc", f->name);
            continue;
        }
        fieldf(f->flags, f->off, f->width, 0, "hdr.%s.zero", f->name);
        fieldf(f->flags, f->off, f->width, ones, "hdr.%s.ones", f->name);
        fieldf(f->flags, f->off, f->width, (v + 1) & ones, "hdr.%s.inc", f->name);
        fieldf(f->flags, f->off, f->width, f->width == 8 ? 1ull << 55 : ones >> 1,
               "hdr.%s.huge", f->name);
        if (f->offset) {
            fieldf(f->flags, f->off, f->width, v + 512, "hdr.%s.misaligned", f->name);
            fieldf(f->flags, f->off, f->width, past_eof(im), "hdr.%s.past_eof", f->name);
        }
        if (!full)
            continue;
        fieldf(f->flags, f->off, f->width, (v - 1) & ones, "hdr.%s.dec", f->name);
        if (f->offset)
            fieldf(f->flags, f->off, f->width, TIB, "hdr.%s.far", f->name);
    }

    /* Field-specific values. */
    for (unsigned cb = 9; cb <= 22; cb++)
        if (full || cb == 9 || cb == 21)
            fieldf("-", 20, 4, cb, "hdr.cluster_bits.%u", cb);
    if (im->version >= 3)
        for (unsigned o = 0; o <= 7; o++)
            fieldf("S", 96, 4, o, "hdr.refcount_order.%u", o);
    fieldf("-", 4, 4, im->version == 3 ? 2 : 3, "hdr.version.other");
    if (level == 0)
        goto specific;
    fieldf("-", 24, 8, 512, "hdr.size.512");
    fieldf("-", 24, 8, im->size * 2, "hdr.size.double");
    fieldf("-", 24, 8, (uint64_t)im->l1_size * im->l2n * im->cs, "hdr.size.l1_max");
    fieldf("-", 24, 8, (uint64_t)im->l1_size * im->l2n * im->cs + im->cs, "hdr.size.l1_max_plus");
    fieldf("-", 36, 4, im->l1_size * 2, "hdr.l1_size.double");
    fieldf("-", 40, 8, im->rt_off, "hdr.l1_table_offset.at_reftable");
    fieldf("-", 40, 8, be64at(im, im->rt_off) & OFF_MASK, "hdr.l1_table_offset.at_refblock");
    fieldf("S", 48, 8, im->l1_off, "hdr.refcount_table_offset.at_l1");
    fieldf("S", 48, 8, im->cs, "hdr.refcount_table_offset.cluster1");
    fieldf("S", 56, 4, 0x7ffff, "hdr.refcount_table_clusters.big");
    for (uint32_t i = 0; i < im->l1_size; i++) {
        uint64_t l2 = be64at(im, im->l1_off + 8 * i) & OFF_MASK;
        if (l2) {
            fieldf("-", 40, 8, l2, "hdr.l1_table_offset.at_l2");
            fieldf("S", 48, 8, l2, "hdr.refcount_table_offset.at_l2");
            break;
        }
    }
specific:
    if (im->nb_snap) {
        fieldf("SR", 64, 8, im->l1_off, "hdr.snapshots_offset.at_l1");
        fieldf("SR", 64, 8, im->rt_off, "hdr.snapshots_offset.at_reftable");
        fieldf("-", 40, 8, im->snap_off, "hdr.l1_table_offset.at_snapshots");
        fieldf("SR", 60, 4, im->nb_snap + 1, "hdr.nb_snapshots.plus1");
        fieldf("SR", 60, 4, 65536, "hdr.nb_snapshots.65536");
    } else if (level > 0) {
        fieldf("SR", 60, 4, 1, "hdr.nb_snapshots.1_at_zero");
        {
            struct change c[2] = { { .off = 60, .n = 4 }, { .off = 64, .n = 8 } };
            put_be(c[0].b, 4, 1);
            put_be(c[1].b, 8, im->l1_off);
            emit("hdr.nb_snapshots.1_at_l1", "SR", c, 2);
            put_be(c[1].b, 8, im->rt_off);
            emit("hdr.nb_snapshots.1_at_reftable", "SR", c, 2);
        }
    }
    if (im->version >= 3) {
        for (unsigned b = 0; b <= 5; b++)
            fieldf(b <= 1 ? "SR" : "-", 72, 8, im->incompat ^ (1ull << b),
                   "hdr.incompatible.bit%u", b);
        fieldf("-", 72, 8, im->incompat | (1ull << 63), "hdr.incompatible.bit63");
        fieldf("SR", 80, 8, im->compat ^ 1, "hdr.compatible.lazy");
        if (level > 0) {
            fieldf("SR", 80, 8, im->compat | (1ull << 63), "hdr.compatible.bit63");
            fieldf("SR", 88, 8, im->autoclear ^ 1, "hdr.autoclear.bitmaps");
            fieldf("SR", 88, 8, im->autoclear ^ 2, "hdr.autoclear.raw_data");
        }
        {
            /* Dirty bit together with lazy refcounts: the daemon rebuilds
             * the refcounts on a writable open. */
            struct change c[2] = { { .off = 72, .n = 8 }, { .off = 80, .n = 8 } };
            put_be(c[0].b, 8, im->incompat | 1);
            put_be(c[1].b, 8, im->compat | 1);
            emit("hdr.dirty_lazy", "SR", c, 2);
        }
        {
            static const uint32_t hl[] = { 72, 100, 104, 105, 108, 112, 120, 128, 4096 };
            for (size_t i = 0; i < sizeof(hl) / sizeof(hl[0]); i++)
                if (full || hl[i] == 104 || hl[i] == 120)
                    fieldf("SR", 100, 4, hl[i], "hdr.header_length.%u", hl[i]);
            if (level > 0) {
                fieldf("SR", 100, 4, (uint32_t)im->cs, "hdr.header_length.cluster");
                fieldf("SR", 100, 4, (uint32_t)im->cs + 8, "hdr.header_length.cluster_plus8");
                fieldf("SR", 100, 4, (uint32_t)im->ext_end, "hdr.header_length.ext_end");
            }
        }
        if (im->hlen > 104) {
            fieldf("-", 104, 1, 1, "hdr.compression_type.1");
            fieldf("-", 104, 1, 2, "hdr.compression_type.2");
            fieldf("-", 104, 1, 0xff, "hdr.compression_type.255");
            {
                struct change c[2] = { { .off = 72, .n = 8 }, { .off = 104, .n = 1 } };
                put_be(c[0].b, 8, im->incompat ^ 8);
                c[1].b[0] = im->d[104] ? 0 : 1;
                emit("hdr.compression_type.flip_with_bit", "-", c, 2);
            }
        }
    }

    /* Backing file: a name that does not exist, the image itself (the tests
     * name every mutated copy m.qcow2: a loop), a device, a path outside. */
    {
        static const char *names[] = { "missing-backing.img", "m.qcow2", "/dev/zero",
                                       "../../../../../../../../etc/passwd" };
        static const char *what[] = { "missing", "self", "dev_zero", "etc_passwd" };
        for (unsigned i = 0; i < (level > 0 ? 4u : 2u); i++) {
            size_t n = strlen(names[i]);
            uint64_t at = im->cs - 64;
            struct change c[3] = { { .off = at, .n = (unsigned)n },
                                   { .off = 8, .n = 8 }, { .off = 16, .n = 4 } };
            char nm[64];
            memcpy(c[0].b, names[i], n);
            put_be(c[1].b, 8, at);
            put_be(c[2].b, 4, n);
            snprintf(nm, sizeof(nm), "hdr.backing.%s", what[i]);
            emit(nm, "-", c, 3);
        }
    }
}

static void plan_extensions(struct img *im, int level)
{
    bool full = level >= 2;
    static const uint32_t types[] = { 0xe2792aca, 0x6803f857, 0x23852875, 0x0537be77,
                                      0x44415441 };
    static const char *tnames[] = { "backing_format", "feature_table", "bitmaps", "crypto",
                                    "data_file" };

    for (unsigned i = 0; i < im->nb_exts; i++) {
        const struct ext *e = &im->exts[i];
        if (level == 0) {
            fieldf("SR", e->off, 4, 0x23852875, "ext%u.type.bitmaps", i);
            fieldf("SR", e->off + 4, 4, 0xffffffff, "ext%u.len.ones", i);
            fieldf("SR", e->off + 4, 4, e->len + 1, "ext%u.len.inc", i);
            continue;
        }
        fieldf("SR", e->off, 4, 0, "ext%u.type.zero", i);
        fieldf("SR", e->off, 4, 0xffffffff, "ext%u.type.ones", i);
        for (unsigned t = 0; t < 5; t++)
            if (full || t == 0 || t == 2)
                fieldf("SR", e->off, 4, types[t], "ext%u.type.%s", i, tnames[t]);
        fieldf("SR", e->off + 4, 4, 0, "ext%u.len.zero", i);
        fieldf("SR", e->off + 4, 4, 0xffffffff, "ext%u.len.ones", i);
        fieldf("SR", e->off + 4, 4, e->len + 1, "ext%u.len.inc", i);
        fieldf("SR", e->off + 4, 4, 0x7fffffff, "ext%u.len.huge", i);
        fieldf("SR", e->off + 4, 4, (uint32_t)(im->cs - e->off - 8), "ext%u.len.to_cluster_end", i);
        fieldf("SR", e->off + 4, 4, (uint32_t)(im->cs - e->off), "ext%u.len.past_cluster", i);
        if (full) {
            fieldf("SR", e->off + 4, 4, e->len - 1, "ext%u.len.dec", i);
            fieldf("SR", e->off + 4, 4, e->len + 8, "ext%u.len.plus8", i);
            fieldf("SR", e->off + 4, 4, (uint32_t)im->cs, "ext%u.len.cluster", i);
        }
    }
    if (im->end_marker && level > 0) {
        struct change c[2] = { { .off = im->end_marker, .n = 4 },
                               { .off = im->end_marker + 4, .n = 4 } };
        put_be(c[0].b, 4, 0x12345678);
        put_be(c[1].b, 4, 16);
        emit("ext.end.unknown16", "SR", c, 2);
        put_be(c[1].b, 4, 0xfffffff0);
        emit("ext.end.unknown_huge", "SR", c, 2);
        for (unsigned t = 0; t < 5; t++) {
            char nm[64];
            put_be(c[0].b, 4, types[t]);
            put_be(c[1].b, 4, 0);
            snprintf(nm, sizeof(nm), "ext.end.%s_len0", tnames[t]);
            emit(nm, "SR", c, 2);
            if (full || t == 2) {
                put_be(c[1].b, 4, 24);
                snprintf(nm, sizeof(nm), "ext.end.%s_len24", tnames[t]);
                emit(nm, "SR", c, 2);
            }
        }
    }
}

/* ---- L1 / L2 ------------------------------------------------------------------ */

struct l2info {
    int l1_idx;                 /* first used L1 entry */
    int l1_unused;              /* first unused L1 entry, or -1 */
    uint64_t l2;                /* its L2 table */
    uint64_t l2_second;         /* another L2 table, or 0 */
    int data, data2, zero, unalloc, compr, prealloc_zero, partial;  /* entry indices */
    uint64_t data_host, data2_host, compr_host;
    uint64_t refblock0;
};

static uint64_t l2e_off(const struct img *im, uint64_t l2, int idx)
{
    return l2 + (uint64_t)idx * im->l2eb;
}

static void scan(const struct img *im, struct l2info *s)
{
    uint64_t guest_clusters = (im->size + im->cs - 1) / im->cs;

    memset(s, 0, sizeof(*s));
    s->l1_idx = s->l1_unused = -1;
    s->data = s->data2 = s->zero = s->unalloc = s->compr = s->prealloc_zero = s->partial = -1;
    for (uint32_t i = 0; i < im->l1_size; i++) {
        uint64_t l2 = be64at(im, im->l1_off + 8 * i) & OFF_MASK;
        if (!l2) {
            if (s->l1_unused < 0)
                s->l1_unused = (int)i;
            continue;
        }
        if (s->l1_idx < 0) {
            s->l1_idx = (int)i;
            s->l2 = l2;
        } else if (!s->l2_second) {
            s->l2_second = l2;
        }
    }
    if (s->l1_idx < 0)
        return;
    for (uint64_t j = 0; j < im->l2n && (uint64_t)s->l1_idx * im->l2n + j < guest_clusters; j++) {
        uint64_t e = be64at(im, l2e_off(im, s->l2, (int)j));
        uint64_t bm = im->extl2 ? be64at(im, l2e_off(im, s->l2, (int)j) + 8) : 0;
        uint64_t host = e & OFF_MASK;
        if (e & COMPRESSED) {
            if (s->compr < 0) {
                s->compr = (int)j;
                s->compr_host = e & ((1ull << (62 - (im->cb - 8))) - 1);
            }
        } else if (host && ((e & 1) || (im->extl2 && (bm >> 32) == 0xffffffffu))) {
            if (s->prealloc_zero < 0)
                s->prealloc_zero = (int)j;
        } else if (host) {
            if (s->data < 0) {
                s->data = (int)j;
                s->data_host = host;
            } else if (s->data2 < 0) {
                s->data2 = (int)j;
                s->data2_host = host;
            }
            if (im->extl2 && s->partial < 0 && (uint32_t)bm != 0xffffffffu)
                s->partial = (int)j;
        } else if ((e & 1) || (im->extl2 && (bm >> 32))) {
            if (s->zero < 0)
                s->zero = (int)j;
        } else if (!e && !bm && s->unalloc < 0) {
            s->unalloc = (int)j;
        }
    }
    s->refblock0 = be64at(im, im->rt_off) & OFF_MASK;
}

/* Mutations of the 8-byte table entry at @off (an L1 or L2 entry). */
static void entry_targets(const struct img *im, const struct l2info *s, const char *pfx,
                          uint64_t off, uint64_t flagbits)
{
    fieldf("-", off, 8, past_eof(im) | flagbits, "%s.past_eof", pfx);
    fieldf("-", off, 8, TIB | flagbits, "%s.far", pfx);
    fieldf("-", off, 8, im->l1_off | flagbits, "%s.at_l1", pfx);
    fieldf("-", off, 8, s->refblock0 | flagbits, "%s.at_refblock", pfx);
    if (LEVEL == 0)
        return;
    fieldf("-", off, 8, max_off(im) | flagbits, "%s.max_offset", pfx);
    fieldf("-", off, 8, im->rt_off | flagbits, "%s.at_reftable", pfx);
    if (s->l2)
        fieldf("-", off, 8, s->l2 | flagbits, "%s.at_l2", pfx);
    if (s->data_host)
        fieldf("-", off, 8, s->data_host | flagbits, "%s.at_data", pfx);
    if (im->nb_snap)
        fieldf("-", off, 8, im->snap_off | flagbits, "%s.at_snapshots", pfx);
}

static void plan_l1(struct img *im, const struct l2info *s, bool full)
{
    if (s->l1_idx >= 0) {
        uint64_t off = im->l1_off + 8 * (uint64_t)s->l1_idx;
        uint64_t e = be64at(im, off);
        char pfx[32];
        snprintf(pfx, sizeof(pfx), "l1.%d", s->l1_idx);
        fieldf("-", off, 8, 0, "%s.zero", pfx);
        fieldf("-", off, 8, COPIED, "%s.copied_only", pfx);
        fieldf("-", off, 8, e | 1, "%s.reserved_bit0", pfx);
        fieldf("-", off, 8, e | 0x100, "%s.reserved_bit8", pfx);
        fieldf("-", off, 8, e | (1ull << 56), "%s.reserved_bit56", pfx);
        fieldf("-", off, 8, e | (1ull << 62), "%s.reserved_bit62", pfx);
        fieldf("-", off, 8, e ^ COPIED, "%s.copied_flip", pfx);
        fieldf("-", off, 8, e + 512, "%s.misaligned", pfx);
        fieldf("-", off, 8, UINT64_MAX, "%s.ones", pfx);
        entry_targets(im, s, pfx, off, COPIED);
        if (s->l2_second)
            fieldf("-", off, 8, s->l2_second | COPIED, "%s.at_other_l2", pfx);
        if (s->compr_host)
            fieldf("-", off, 8, (s->compr_host & ~(im->cs - 1)) | COPIED, "%s.at_compressed", pfx);
        (void)full;
    }
    if (s->l1_unused >= 0 && s->l2) {
        uint64_t off = im->l1_off + 8 * (uint64_t)s->l1_unused;
        char pfx[32];
        snprintf(pfx, sizeof(pfx), "l1.%d", s->l1_unused);
        fieldf("-", off, 8, s->l2 | COPIED, "%s.share_l2", pfx);
        fieldf("-", off, 8, past_eof(im) | COPIED, "%s.past_eof", pfx);
        fieldf("-", off, 8, im->l1_off | COPIED, "%s.at_l1", pfx);
        fieldf("-", off, 8, s->refblock0 | COPIED, "%s.at_refblock", pfx);
        fieldf("-", off, 8, 1, "%s.reserved_only", pfx);
        if (s->data_host)
            fieldf("-", off, 8, s->data_host | COPIED, "%s.at_data", pfx);
    }
    /* The L1 entry just past l1_size (inside the L1 cluster). */
    if (im->l1_size && s->l2 && (im->l1_size * 8ull) % im->cs)
        fieldf("-", im->l1_off + 8ull * im->l1_size, 8, s->l2 | COPIED, "l1.past_size.share_l2");
}

static void plan_l2(struct img *im, const struct l2info *s, bool full)
{
    char pfx[48];

    if (!s->l2)
        return;
    if (s->data >= 0) {
        uint64_t off = l2e_off(im, s->l2, s->data), e = be64at(im, off);
        snprintf(pfx, sizeof(pfx), "l2.data%d", s->data);
        fieldf("-", off, 8, 0, "%s.zero", pfx);
        fieldf("-", off, 8, COPIED, "%s.copied_only", pfx);
        fieldf("-", off, 8, e | 2, "%s.reserved_bit1", pfx);
        if (LEVEL > 0) {
            fieldf("-", off, 8, e | 0x100, "%s.reserved_bit8", pfx);
            fieldf("-", off, 8, e | (1ull << 56), "%s.reserved_bit56", pfx);
            fieldf("-", off, 8, e | (1ull << 61), "%s.reserved_bit61", pfx);
        }
        fieldf("-", off, 8, e ^ COPIED, "%s.copied_flip", pfx);
        fieldf("-", off, 8, e | COMPRESSED, "%s.compressed_flag", pfx);
        fieldf("-", off, 8, e | 1, "%s.zero_flag", pfx);
        fieldf("-", off, 8, e + 512, "%s.misaligned", pfx);
        fieldf("-", off, 8, UINT64_MAX, "%s.ones", pfx);
        entry_targets(im, s, pfx, off, COPIED);
        fieldf("-", off, 8, 0 | COPIED | 1, "%s.zero_flag_no_offset", pfx);
        if (s->data2 >= 0)
            fieldf("-", off, 8, s->data2_host | COPIED, "%s.share_data", pfx);
        if (im->extl2) {
            uint64_t bo = off + 8, bm = be64at(im, bo);
            fieldf("-", bo, 8, bm | (1ull << 32) | 1, "%s.bitmap_alloc_and_zero", pfx);
            fieldf("-", bo, 8, UINT64_MAX, "%s.bitmap_ones", pfx);
            fieldf("-", bo, 8, 0, "%s.bitmap_zero", pfx);
            fieldf("-", bo, 8, 0xffffffff00000000ull, "%s.bitmap_all_zero_bits", pfx);
            fieldf("-", bo, 8, 0x00000000ffff0000ull, "%s.bitmap_upper_half", pfx);
        }
    }
    if (s->partial >= 0) {
        uint64_t bo = l2e_off(im, s->l2, s->partial) + 8, bm = be64at(im, bo);
        snprintf(pfx, sizeof(pfx), "l2.partial%d", s->partial);
        fieldf("-", bo, 8, bm | ((bm & 0xffffffffu) << 32), "%s.bitmap_zero_over_alloc", pfx);
        fieldf("-", bo, 8, bm ^ 0xffffffffu, "%s.bitmap_invert_alloc", pfx);
    }
    if (s->unalloc >= 0) {
        uint64_t off = l2e_off(im, s->l2, s->unalloc);
        snprintf(pfx, sizeof(pfx), "l2.unalloc%d", s->unalloc);
        fieldf("-", off, 8, 1, "%s.zero_flag", pfx);
        fieldf("-", off, 8, 2, "%s.reserved_bit1", pfx);
        fieldf("-", off, 8, COMPRESSED, "%s.compressed_empty", pfx);
        fieldf("-", off, 8, past_eof(im) | COPIED | 1, "%s.zero_flag_past_eof", pfx);
        entry_targets(im, s, pfx, off, COPIED);
        if (full)
            entry_targets(im, s, pfx, off, 0);
        if (im->extl2) {
            fieldf("-", off + 8, 8, 0xffffffffu, "%s.bitmap_alloc_unallocated", pfx);
            fieldf("-", off + 8, 8, 0x0000000100000001ull, "%s.bitmap_alloc_and_zero", pfx);
        }
    }
    if (s->zero >= 0) {
        uint64_t off = l2e_off(im, s->l2, s->zero), e = be64at(im, off);
        snprintf(pfx, sizeof(pfx), "l2.zero%d", s->zero);
        fieldf("-", off, 8, e | (past_eof(im) + 512), "%s.misaligned_offset", pfx);
        fieldf("-", off, 8, e | past_eof(im) | COPIED, "%s.past_eof", pfx);
        fieldf("-", off, 8, e | im->l1_off | COPIED, "%s.at_l1", pfx);
        fieldf("-", off, 8, e | im->rt_off | COPIED, "%s.at_reftable", pfx);
        fieldf("-", off, 8, e | s->refblock0 | COPIED, "%s.at_refblock", pfx);
        fieldf("-", off, 8, e | s->l2 | COPIED, "%s.at_l2", pfx);
        fieldf("-", off, 8, e | COMPRESSED, "%s.compressed", pfx);
        if (im->extl2)
            fieldf("-", off + 8, 8, UINT64_MAX, "%s.bitmap_ones", pfx);
    }
    if (s->prealloc_zero >= 0) {
        uint64_t off = l2e_off(im, s->l2, s->prealloc_zero), e = be64at(im, off);
        snprintf(pfx, sizeof(pfx), "l2.prealloc%d", s->prealloc_zero);
        fieldf("-", off, 8, (e & ~OFF_MASK) | im->l1_off, "%s.at_l1", pfx);
        fieldf("-", off, 8, (e & ~OFF_MASK) | past_eof(im), "%s.past_eof", pfx);
        fieldf("-", off, 8, e + 512, "%s.misaligned", pfx);
    }
    if (s->compr >= 0) {
        unsigned x = 62 - (im->cb - 8);
        uint64_t off = l2e_off(im, s->l2, s->compr), e = be64at(im, off);
        uint64_t omask = (1ull << x) - 1, smask = ((1ull << 62) - 1) & ~omask;
        uint64_t host = e & omask;
        snprintf(pfx, sizeof(pfx), "l2.compr%d", s->compr);
        fieldf("-", off, 8, e | smask, "%s.sectors_max", pfx);
        fieldf("-", off, 8, e & ~smask, "%s.sectors_zero", pfx);
        fieldf("-", off, 8, (e & ~omask) | past_eof(im), "%s.past_eof", pfx);
        fieldf("-", off, 8, (e & ~omask) | (im->len - 100), "%s.runs_past_eof", pfx);
        fieldf("-", off, 8, (e & ~omask) | (omask & ~0xffull), "%s.offset_max", pfx);
        fieldf("-", off, 8, (e & ~omask), "%s.at_header", pfx);
        fieldf("-", off, 8, e + 1, "%s.offset_plus1", pfx);
        fieldf("-", off, 8, (e & ~omask) | im->l1_off, "%s.at_l1", pfx);
        fieldf("-", off, 8, (e & ~omask) | s->l2, "%s.at_l2", pfx);
        fieldf("-", off, 8, e | COPIED, "%s.copied", pfx);
        fieldf("-", off, 8, e | smask | omask, "%s.all_ones_descriptor", pfx);
        if (full)
            fieldf("-", off, 8, (e & ~omask) | (host + 17), "%s.offset_plus17", pfx);
        if (im->extl2)
            fieldf("-", off + 8, 8, 1, "%s.bitmap_nonzero", pfx);
    }
    if (im->extl2 && s->data >= 0) {
        /* In extended L2 entries bit 0 of the first word is reserved. */
        uint64_t off = l2e_off(im, s->l2, s->data);
        fieldf("-", off, 8, be64at(im, off) | 1, "l2.ext_reserved_bit0");
    }
}

/* ---- refcounts ------------------------------------------------------------------ */

static void plan_refcounts(struct img *im, const struct l2info *s, bool full)
{
    uint64_t rtn = (uint64_t)im->rt_clusters * im->cs / 8, used = 0;
    unsigned bits = 1u << im->rorder;
    uint64_t per_block = im->cs * 8 / bits;
    uint64_t file_clusters = (im->len + im->cs - 1) / im->cs;
    struct target { const char *name; uint64_t ci; } targets[12];
    unsigned nt = 0;

    for (uint64_t i = 0; i < rtn; i++)
        if (be64at(im, im->rt_off + 8 * i))
            used = i + 1;
    /* refcount table entry 0 */
    {
        uint64_t off = im->rt_off, e = be64at(im, off);
        fieldf("S", off, 8, 0, "rt.0.zero");
        fieldf("S", off, 8, e + 512, "rt.0.misaligned");
        fieldf("S", off, 8, e | 1, "rt.0.reserved_bit0");
        fieldf("S", off, 8, past_eof(im), "rt.0.past_eof");
        fieldf("S", off, 8, TIB, "rt.0.far");
        fieldf("S", off, 8, UINT64_MAX & ~0x1ffull, "rt.0.max");
        fieldf("S", off, 8, im->l1_off, "rt.0.at_l1");
        fieldf("S", off, 8, im->rt_off, "rt.0.at_reftable");
        if (s->l2)
            fieldf("S", off, 8, s->l2, "rt.0.at_l2");
        if (s->data_host)
            fieldf("S", off, 8, s->data_host, "rt.0.at_data");
        if (full)
            fieldf("S", off, 8, im->cs * 1000, "rt.0.inside_far");
    }
    if (used < rtn) {
        uint64_t off = im->rt_off + 8 * used;
        fieldf("S", off, 8, s->refblock0, "rt.%" PRIu64 ".share_refblock", used);
        fieldf("S", off, 8, past_eof(im), "rt.%" PRIu64 ".past_eof", used);
        fieldf("S", off, 8, im->l1_off, "rt.%" PRIu64 ".at_l1", used);
        fieldf("S", off, 8, 1, "rt.%" PRIu64 ".reserved_only", used);
    }
    /* The last entry of the table. */
    fieldf("S", im->rt_off + 8 * (rtn - 1), 8, past_eof(im), "rt.last.past_eof");

    targets[nt++] = (struct target){ "header", 0 };
    targets[nt++] = (struct target){ "l1", im->l1_off / im->cs };
    targets[nt++] = (struct target){ "reftable", im->rt_off / im->cs };
    targets[nt++] = (struct target){ "refblock", s->refblock0 / im->cs };
    if (s->l2)
        targets[nt++] = (struct target){ "l2", s->l2 / im->cs };
    if (s->data_host)
        targets[nt++] = (struct target){ "data", s->data_host / im->cs };
    if (s->compr_host)
        targets[nt++] = (struct target){ "compressed", s->compr_host / im->cs };
    if (im->nb_snap)
        targets[nt++] = (struct target){ "snapshots", im->snap_off / im->cs };
    if (im->nb_snaps && im->snaps[0].l1_off)
        targets[nt++] = (struct target){ "snap_l1", im->snaps[0].l1_off / im->cs };
    targets[nt++] = (struct target){ "last", file_clusters - 1 };
    if (file_clusters + 2 < per_block)
        targets[nt++] = (struct target){ "past_eof", file_clusters + 2 };

    for (unsigned i = 0; i < nt; i++) {
        static const uint64_t vals[] = { 0, 1, 2, UINT64_MAX };
        static const char *vn[] = { "zero", "one", "two", "max" };
        for (unsigned k = 0; k < 4; k++) {
            uint64_t off, value, v = vals[k] == UINT64_MAX ? refcount_max(im) : vals[k];
            unsigned width;
            char nm[64];
            if (v > refcount_max(im))
                continue;
            if ((!full && k == 1) || (LEVEL == 0 && k == 2))
                continue;
            if (targets[i].ci / per_block >= used)
                continue;
            refcount_poke(im, targets[i].ci, v, &off, &width, &value);
            snprintf(nm, sizeof(nm), "rb.%s.%s", targets[i].name, vn[k]);
            field(nm, "S", off, width, value);
        }
    }
    /* The whole start of the block zeroed: every in-use cluster free. */
    {
        uint64_t n = (file_clusters * bits + 7) / 8;
        struct change c[8];
        unsigned nc = 0;
        for (uint64_t o = 0; o < n && nc < 8; o += 16, nc++) {
            c[nc].off = s->refblock0 + o;
            c[nc].n = (unsigned)(n - o < 16 ? n - o : 16);
            memset(c[nc].b, 0, sizeof(c[nc].b));
        }
        emit("rb.all_in_use.zero", "S", c, nc);
        for (unsigned i = 0; i < nc; i++)
            memset(c[i].b, 0xff, sizeof(c[i].b));
        emit("rb.all_in_use.max", "S", c, nc);
    }
}

/* ---- snapshots ------------------------------------------------------------------- */

static void plan_snapshots(struct img *im, bool full)
{
    if (!im->nb_snaps)
        return;
    const struct snap *s = &im->snaps[0];
    uint64_t o = s->off;

    fieldf("SR", o, 8, 0, "snap0.l1_offset.zero");
    fieldf("SR", o, 8, s->l1_off + 512, "snap0.l1_offset.misaligned");
    fieldf("SR", o, 8, past_eof(im), "snap0.l1_offset.past_eof");
    fieldf("SR", o, 8, TIB, "snap0.l1_offset.far");
    fieldf("SR", o, 8, UINT64_MAX, "snap0.l1_offset.ones");
    fieldf("SR", o, 8, im->l1_off, "snap0.l1_offset.at_active_l1");
    fieldf("SR", o, 8, im->rt_off, "snap0.l1_offset.at_reftable");
    fieldf("SR", o, 8, im->snap_off, "snap0.l1_offset.at_snapshots");
    fieldf("SR", o + 8, 4, 0, "snap0.l1_size.zero");
    fieldf("SR", o + 8, 4, 0xffffffff, "snap0.l1_size.ones");
    fieldf("SR", o + 8, 4, s->l1_size + 1, "snap0.l1_size.inc");
    fieldf("SR", o + 8, 4, 0x7fffffff, "snap0.l1_size.huge");
    fieldf("SR", o + 8, 4, 4u << 20, "snap0.l1_size.4M");
    fieldf("SR", o + 8, 4, (uint32_t)(im->len / 8 + 1), "snap0.l1_size.past_eof");
    fieldf("SR", o + 12, 2, 0, "snap0.id_len.zero");
    fieldf("SR", o + 12, 2, 0xffff, "snap0.id_len.ones");
    fieldf("SR", o + 12, 2, s->id_len + 1u, "snap0.id_len.inc");
    fieldf("SR", o + 14, 2, 0, "snap0.name_len.zero");
    fieldf("SR", o + 14, 2, 0xffff, "snap0.name_len.ones");
    fieldf("SR", o + 14, 2, s->name_len + 1u, "snap0.name_len.inc");
    fieldf("SR", o + 32, 4, 0xffffffff, "snap0.vm_state_size.ones");
    fieldf("SR", o + 36, 4, 0, "snap0.extra_len.zero");
    fieldf("SR", o + 36, 4, 0xffffffff, "snap0.extra_len.ones");
    fieldf("SR", o + 36, 4, 1u << 20, "snap0.extra_len.1M");
    fieldf("SR", o + 36, 4, 7, "snap0.extra_len.7");
    fieldf("SR", o + 36, 4, s->extra_len + 1, "snap0.extra_len.inc");
    if (full)
        fieldf("SR", o + 36, 4, 8, "snap0.extra_len.8");
    if (s->extra_len >= 16) {
        fieldf("SR", o + 48, 8, 0, "snap0.disk_size.zero");
        fieldf("SR", o + 48, 8, UINT64_MAX, "snap0.disk_size.ones");
        fieldf("SR", o + 48, 8, 1ull << 60, "snap0.disk_size.huge");
        fieldf("SR", o + 48, 8, get_be(im->d + o + 48, 8) + 1, "snap0.disk_size.inc");
        fieldf("SR", o + 40, 8, UINT64_MAX, "snap0.vm_state_size_large.ones");
    }
    if (s->l1_off && s->l1_size) {
        uint64_t e = be64at(im, s->l1_off);
        fieldf("SR", s->l1_off, 8, past_eof(im), "snap0.l1e0.past_eof");
        fieldf("SR", s->l1_off, 8, e + 512, "snap0.l1e0.misaligned");
        fieldf("SR", s->l1_off, 8, e | 1, "snap0.l1e0.reserved_bit0");
        fieldf("SR", s->l1_off, 8, im->l1_off, "snap0.l1e0.at_active_l1");
        fieldf("SR", s->l1_off, 8, im->rt_off, "snap0.l1e0.at_reftable");
        fieldf("SR", s->l1_off, 8, 0, "snap0.l1e0.zero");
    }
}

/* ---- truncation -------------------------------------------------------------------- */

static void plan_truncation(struct img *im, const struct l2info *s)
{
    trunc_at("trunc.100", 100);
    trunc_at("trunc.mid_header_cluster", im->cs / 2);
    trunc_at("trunc.one_cluster", im->cs);
    trunc_at("trunc.mid_l1", im->l1_off + (im->l1_size > 1 ? im->l1_size * 4ull : 4));
    trunc_at("trunc.l1_start", im->l1_off);
    if (s->l2)
        trunc_at("trunc.mid_l2", s->l2 + im->cs / 2);
    trunc_at("trunc.mid_refblock", s->refblock0 + im->cs / 2);
    trunc_at("trunc.mid_reftable", im->rt_off + 8);
    if (s->data_host)
        trunc_at("trunc.mid_data", s->data_host + im->cs / 2);
    if (s->compr_host)
        trunc_at("trunc.mid_compressed", s->compr_host + 16);
    if (im->nb_snap)
        trunc_at("trunc.mid_snapshots", im->snap_off + 20);
    trunc_at("trunc.minus1", im->len - 1);
    trunc_at("trunc.minus512", im->len - 512);
    trunc_at("trunc.minus_cluster", im->len - im->cs);
    trunc_at("trunc.minus_cluster_plus1", im->len - im->cs + 1);
}

/* ---- random flips ------------------------------------------------------------------- */

struct region { uint64_t off, len; const char *flags; const char *name; };

static uint64_t rng_state;
static uint64_t rnd(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static unsigned regions(struct img *im, const struct l2info *s, struct region *r, unsigned max)
{
    uint64_t guest_clusters = (im->size + im->cs - 1) / im->cs;
    uint64_t file_clusters = (im->len + im->cs - 1) / im->cs;
    unsigned bits = 1u << im->rorder, n = 0;
    uint64_t per_block = im->cs * 8 / bits, rtn = (uint64_t)im->rt_clusters * im->cs / 8;

    (void)s;
    r[n++] = (struct region){ 0, im->version >= 3 ? im->hlen : 72, NULL, "header" };
    if (im->ext_end > im->hlen)
        r[n++] = (struct region){ im->hlen, im->ext_end - im->hlen, "SR", "extensions" };
    if (im->l1_size)
        r[n++] = (struct region){ im->l1_off, im->l1_size * 8ull, "-", "l1" };
    for (uint32_t i = 0; i < im->l1_size && n < max - 8; i++) {
        uint64_t l2 = be64at(im, im->l1_off + 8 * i) & OFF_MASK, cover;
        if (!l2)
            continue;
        cover = guest_clusters - (uint64_t)i * im->l2n;
        if (cover > im->l2n)
            cover = im->l2n;
        r[n++] = (struct region){ l2, cover * im->l2eb, "-", "l2" };
    }
    {
        uint64_t used = 0;
        for (uint64_t i = 0; i < rtn && n < max - 4; i++) {
            uint64_t b = be64at(im, im->rt_off + 8 * i) & OFF_MASK, cover;
            if (!b)
                continue;
            used = i + 1;
            cover = file_clusters + 2 > (i + 1) * per_block ? per_block
                                                             : file_clusters + 2 - i * per_block;
            r[n++] = (struct region){ b, (cover * bits + 7) / 8, "S", "refblock" };
        }
        r[n++] = (struct region){ im->rt_off, 8 * (used + 1), "S", "reftable" };
    }
    if (im->nb_snaps && n < max - 1)
        r[n++] = (struct region){ im->snap_off, im->snap_bytes, "SR", "snapshots" };
    for (unsigned i = 0; i < im->nb_snaps && n < max; i++)
        if (im->snaps[i].l1_off && im->snaps[i].l1_size)
            r[n++] = (struct region){ im->snaps[i].l1_off, im->snaps[i].l1_size * 8ull, "SR",
                                      "snap_l1" };
    return n;
}

static void plan_flips(struct img *im, const struct l2info *s, unsigned count, uint64_t seed)
{
    struct region r[128];
    unsigned nr = regions(im, s, r, 128);

    for (unsigned k = 0; k < count; k++) {
        struct change c[4];
        unsigned nb = 0, nbytes;
        bool s_ok = true, r_ok = true;
        char name[128], where[64] = "";
        uint64_t this_seed = seed + k;

        rng_state = this_seed * 0x2545f4914f6cdd1dull + 1;
        nbytes = 1 + (unsigned)(rnd() % 4);
        for (unsigned i = 0; i < nbytes; i++) {
            const struct region *g = &r[rnd() % nr];
            uint64_t off = g->off + rnd() % g->len;
            uint8_t old = im->d[off], nv;
            unsigned how = (unsigned)(rnd() % 4);
            const char *fl = g->flags ? g->flags : header_byte_flags(im, off);
            if (how == 0)
                nv = (uint8_t)(old ^ (1u << (rnd() % 8)));
            else if (how == 1)
                nv = old == 0xff ? 0 : 0xff;
            else
                nv = (uint8_t)(old ^ (1 + rnd() % 255));
            bool dup = false;
            for (unsigned j = 0; j < nb; j++)
                dup |= c[j].off == off;
            if (dup)
                continue;
            c[nb].off = off;
            c[nb].n = 1;
            c[nb].b[0] = nv;
            nb++;
            s_ok = s_ok && strchr(fl, 'S');
            r_ok = r_ok && strchr(fl, 'R');
            if (!where[0])
                snprintf(where, sizeof(where), "%s", g->name);
        }
        snprintf(name, sizeof(name), "rnd.%" PRIu64 ".%s", this_seed, where);
        emit(name, s_ok ? (r_ok ? "SR" : "S") : "-", c, nb);
    }
}

static int cmd_plan(const char *path, const char *lvl, unsigned flips, uint64_t seed)
{
    struct img im;
    struct l2info s;
    int level = !strcmp(lvl, "full") ? 2 : !strcmp(lvl, "short") ? 1 : !strcmp(lvl, "min") ? 0 : -1;
    bool full = level == 2;

    if (level < 0)
        die("level must be full, short or min");
    load(&im, path);
    P = &im;
    LEVEL = level;
    scan(&im, &s);
    plan_header(&im, level);
    plan_extensions(&im, level);
    plan_l1(&im, &s, full);
    plan_l2(&im, &s, full);
    plan_refcounts(&im, &s, full);
    plan_snapshots(&im, full);
    plan_truncation(&im, &s);
    plan_flips(&im, &s, flips, seed);
    for (size_t i = 0; i < nb_seen; i++)
        free(seen[i]);
    free(seen);
    unload(&im);
    return 0;
}

/* ---- queries ---------------------------------------------------------------------------- */

static int cmd_info(const char *path)
{
    struct img im;
    struct l2info s;
    uint64_t rtn;

    load(&im, path);
    scan(&im, &s);
    printf("version=%u\ncluster_bits=%u\ncluster_size=%" PRIu64 "\nsize=%" PRIu64
           "\nrefcount_order=%u\nrefcount_bits=%u\nl1_size=%u\nl1_offset=%" PRIu64
           "\nrefcount_table_offset=%" PRIu64 "\nrefcount_table_clusters=%u\n"
           "nb_snapshots=%u\nsnapshots_offset=%" PRIu64 "\nheader_length=%u\n"
           "extensions_end=%" PRIu64 "\nextended_l2=%d\nfile_size=%" PRIu64
           "\nfile_clusters=%" PRIu64 "\n",
           im.version, im.cb, im.cs, im.size, im.rorder, 1u << im.rorder, im.l1_size,
           im.l1_off, im.rt_off, im.rt_clusters, im.nb_snap, im.snap_off, im.hlen,
           im.ext_end, im.extl2, im.len, (im.len + im.cs - 1) / im.cs);
    for (uint32_t i = 0; i < im.l1_size; i++)
        printf("l1.%u=%" PRIu64 "\n", i, (uint64_t)(be64at(&im, im.l1_off + 8 * i) & OFF_MASK));
    rtn = (uint64_t)im.rt_clusters * im.cs / 8;
    for (uint64_t i = 0; i < rtn; i++) {
        uint64_t b = be64at(&im, im.rt_off + 8 * i);
        if (b)
            printf("rt.%" PRIu64 "=%" PRIu64 "\n", i, b);
    }
    for (unsigned i = 0; i < im.nb_snaps; i++)
        printf("snap.%u.l1_offset=%" PRIu64 "\nsnap.%u.l1_size=%u\nsnap.%u.entry=%" PRIu64 "\n",
               i, im.snaps[i].l1_off, i, im.snaps[i].l1_size, i, im.snaps[i].off);
    printf("first_data_host=%" PRIu64 "\nfirst_compressed_host=%" PRIu64 "\n",
           s.data_host, s.compr_host);
    unload(&im);
    return 0;
}

static int cmd_l2entry(const char *path, uint64_t guest, int snap)
{
    struct img im;
    uint64_t l1_off, l1_size, l1i, l2, eoff;

    load(&im, path);
    if (snap >= 0) {
        if ((unsigned)snap >= im.nb_snaps)
            die("no snapshot %d", snap);
        l1_off = im.snaps[snap].l1_off;
        l1_size = im.snaps[snap].l1_size;
    } else {
        l1_off = im.l1_off;
        l1_size = im.l1_size;
    }
    l1i = guest / im.cs / im.l2n;
    if (l1i >= l1_size)
        die("guest offset %" PRIu64 " is beyond the L1 table", guest);
    l2 = be64at(&im, l1_off + 8 * l1i) & OFF_MASK;
    if (!l2) {
        printf("none\n");
    } else {
        eoff = l2 + (guest / im.cs % im.l2n) * im.l2eb;
        printf("%" PRIu64 " %016" PRIx64 "\n", eoff, be64at(&im, eoff));
    }
    unload(&im);
    return 0;
}

static void write_bytes(const char *path, uint64_t off, const uint8_t *b, size_t n)
{
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        die("%s: %s", path, strerror(errno));
    if (pwrite(fd, b, n, (off_t)off) != (ssize_t)n)
        die("%s: write at %" PRIu64 " failed: %s", path, off, strerror(errno));
    if (close(fd) < 0)
        die("%s: close: %s", path, strerror(errno));
}

static int cmd_refcount(const char *path, uint64_t ci, const char *value)
{
    struct img im;

    load(&im, path);
    if (!value) {
        printf("%" PRIu64 "\n", refcount_at(&im, ci, NULL));
    } else {
        uint64_t off, v;
        unsigned width;
        uint8_t b[8];
        refcount_poke(&im, ci, parse_u64(value), &off, &width, &v);
        put_be(b, width, v);
        write_bytes(path, off, b, width);
    }
    unload(&im);
    return 0;
}

static int cmd_snapshot(const char *path, unsigned idx)
{
    struct img im;

    load(&im, path);
    if (idx >= im.nb_snaps)
        die("no snapshot %u", idx);
    printf("%" PRIu64 " %u %" PRIu64 "\n", im.snaps[idx].l1_off, im.snaps[idx].l1_size,
           im.snaps[idx].off);
    unload(&im);
    return 0;
}

/* Bytes of a hex string; *n gets the count.  Dies on bad input. */
static uint8_t *parse_hex(const char *hex, size_t *n)
{
    size_t len = strlen(hex);
    uint8_t *b;

    if (len % 2 || len / 2 > 65536)
        die("bad hex string \"%.40s\"", hex);
    *n = len / 2;
    b = malloc(*n ? *n : 1);
    if (!b)
        die("out of memory");
    for (size_t k = 0; k < *n; k++) {
        unsigned v;
        if (sscanf(hex + 2 * k, "%2x", &v) != 1)
            die("bad hex string \"%.40s\"", hex);
        b[k] = (uint8_t)v;
    }
    return b;
}

static int cmd_ext(const char *path, uint32_t type, const char *hex)
{
    struct img im;
    uint64_t start, limit, pos, backing;
    uint8_t *area, *payload = NULL;
    size_t plen = 0;

    load(&im, path);
    if (im.version < 3)
        die("%s: header extensions need a version 3 image here", path);
    if (!im.end_marker)
        die("%s: no END marker in the extension area", path);
    backing = get_be(im.d + 8, 8);
    start = im.hlen;
    limit = backing ? backing : im.cs;
    if (limit > im.len)
        limit = im.len;
    area = calloc(1, limit - start + 8);
    if (!area)
        die("out of memory");
    pos = 0;
    for (unsigned i = 0; i < im.nb_exts; i++) {
        uint64_t whole = 8 + (((uint64_t)im.exts[i].len + 7) & ~7ull);
        if (im.exts[i].type == type)
            continue;
        if (start + pos + whole > limit)
            die("%s: extension area overflows", path);
        memcpy(area + pos, im.d + im.exts[i].off, whole);
        pos += whole;
    }
    if (hex) {
        payload = parse_hex(hex, &plen);
        uint64_t whole = 8 + ((plen + 7) & ~(size_t)7);
        if (start + pos + whole + 8 > limit)
            die("%s: a %zu-byte extension does not fit", path, plen);
        put_be(area + pos, 4, type);
        put_be(area + pos + 4, 4, plen);
        memcpy(area + pos + 8, payload, plen);
        pos += whole;
    }
    if (start + pos + 8 > limit)
        die("%s: no room for the END marker", path);
    pos += 8;                           /* END: zeros */
    /* Zero what the old area used beyond the new one. */
    if (im.ext_end > start + pos)
        pos = (im.ext_end < limit ? im.ext_end : limit) - start;
    write_bytes(path, start, area, pos);
    free(payload);
    free(area);
    unload(&im);
    return 0;
}

static int cmd_counted_past_eof(const char *path)
{
    struct img im;
    unsigned bits;
    uint64_t per_block, rtn, file_clusters, n = 0;

    load(&im, path);
    bits = 1u << im.rorder;
    per_block = im.cs * 8 / bits;
    rtn = (uint64_t)im.rt_clusters * im.cs / 8;
    file_clusters = (im.len + im.cs - 1) / im.cs;
    for (uint64_t ti = 0; ti < rtn; ti++) {
        if (im.rt_off + 8 * ti + 8 > im.len)
            break;
        uint64_t blk = be64at(&im, im.rt_off + 8 * ti) & ~0x1ffull;
        if (!blk || blk + im.cs > im.len || (ti + 1) * per_block <= file_clusters)
            continue;
        for (uint64_t i = 0; i < per_block; i++) {
            uint64_t ci = ti * per_block + i;
            if (ci >= file_clusters && refcount_at(&im, ci, NULL))
                n++;
        }
    }
    printf("%" PRIu64 "\n", n);
    unload(&im);
    return 0;
}

static int cmd_poke(int argc, char **argv)
{
    const char *path = argv[1];

    if (argc < 4 || argc % 2)
        return 2;
    for (int i = 2; i + 1 < argc; i += 2) {
        uint64_t off = parse_u64(argv[i]);
        const char *hex = argv[i + 1];
        size_t n = strlen(hex) / 2;
        uint8_t b[64];
        if (strlen(hex) % 2 || n == 0 || n > sizeof(b))
            die("bad hex string \"%s\"", hex);
        for (size_t k = 0; k < n; k++) {
            unsigned v;
            if (sscanf(hex + 2 * k, "%2x", &v) != 1)
                die("bad hex string \"%s\"", hex);
            b[k] = (uint8_t)v;
        }
        write_bytes(path, off, b, n);
    }
    return 0;
}

static void usage(void)
{
    fputs("usage: mutate IMG OFFSET HEXBYTES [OFFSET HEXBYTES]...\n"
          "       mutate --plan IMG full|short|min FLIPS SEED\n"
          "       mutate --info IMG\n"
          "       mutate --l2entry IMG GUEST_OFFSET [SNAPSHOT_INDEX]\n"
          "       mutate --refcount IMG CLUSTER [VALUE]\n"
          "       mutate --snapshot IMG INDEX\n"
          "       mutate --counted-past-eof IMG\n"
          "       mutate --ext IMG TYPE [HEXBYTES]\n", stderr);
}

int main(int argc, char **argv)
{
    int ret = 2;

    if (argc >= 2 && argv[1][0] == '-') {
        const char *c = argv[1];
        if (!strcmp(c, "--plan") && argc == 6)
            ret = cmd_plan(argv[2], argv[3], (unsigned)parse_u64(argv[4]), parse_u64(argv[5]));
        else if (!strcmp(c, "--info") && argc == 3)
            ret = cmd_info(argv[2]);
        else if (!strcmp(c, "--l2entry") && (argc == 4 || argc == 5))
            ret = cmd_l2entry(argv[2], parse_u64(argv[3]),
                              argc == 5 ? (int)parse_u64(argv[4]) : -1);
        else if (!strcmp(c, "--refcount") && (argc == 4 || argc == 5))
            ret = cmd_refcount(argv[2], parse_u64(argv[3]), argc == 5 ? argv[4] : NULL);
        else if (!strcmp(c, "--snapshot") && argc == 4)
            ret = cmd_snapshot(argv[2], (unsigned)parse_u64(argv[3]));
        else if (!strcmp(c, "--counted-past-eof") && argc == 3)
            ret = cmd_counted_past_eof(argv[2]);
        else if (!strcmp(c, "--ext") && (argc == 4 || argc == 5))
            ret = cmd_ext(argv[2], (uint32_t)parse_u64(argv[3]), argc == 5 ? argv[4] : NULL);
    } else if (argc >= 4) {
        ret = cmd_poke(argc, argv);
    }
    if (ret == 2)
        usage();
    if (fflush(stdout) != 0)
        return 1;
    return ret;
}
