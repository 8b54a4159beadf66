/*
 * check — reference counting from the metadata, comparison with the
 * on-disk refcounts, rebuilding of the refcount structures, and the repair
 * of leaks and of OFLAG_COPIED flags.
 */
#include "check.h"

#include "compress.h"
#include "header.h"
#include "io.h"
#include "log.h"
#include "meta.h"
#include "refcount.h"
#include "snapshot.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BITMAP_DIR      (64u << 20)

struct check_refs {
    uint32_t *ref;              /* references per host cluster */
    uint64_t nb;                /* clusters in the file */
};

static const char *const code_names[CHECK_NB_CODES] = {
    [CHECK_LEAK] = "leaked cluster",
    [CHECK_REFCOUNT_TOO_LOW] = "refcount too low",
    [CHECK_OFFSET_INVALID] = "invalid offset",
    [CHECK_RESERVED_BITS] = "reserved bits set",
    [CHECK_COPIED_WRONG] = "wrong OFLAG_COPIED",
    [CHECK_TABLE_INVALID] = "invalid table",
};

const char *check_code_name(enum check_code code)
{
    return code < CHECK_NB_CODES ? code_names[code] : "unknown";
}

static void finding(struct check_report *rep, enum check_code code,
                    const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void finding(struct check_report *rep, enum check_code code,
                    const char *fmt, ...)
{
    va_list ap;

    rep->count[code]++;
    if (code == CHECK_LEAK)
        rep->leaks++;
    else
        rep->corruptions++;
    if (rep->log) {
        fprintf(rep->log, "%s: ", code == CHECK_LEAK ? "Leaked" : "ERROR");
        va_start(ap, fmt);
        vfprintf(rep->log, fmt, ap);
        va_end(ap);
        fputc('\n', rep->log);
    }
}

void check_refs_free(struct check_refs *r)
{
    if (r) {
        free(r->ref);
        free(r);
    }
}

/* Count one reference to every cluster overlapping [offset, offset+len). */
static void inc_refs(struct meta *m, struct check_refs *r, struct check_report *rep,
                     uint64_t offset, uint64_t len, const char *what)
{
    uint64_t first, last;

    if (len == 0)
        return;
    first = offset >> m->cluster_bits;
    last = (offset + len - 1) >> m->cluster_bits;
    if (offset + len > rep->image_end)
        rep->image_end = offset + len;
    for (uint64_t ci = first; ci <= last; ci++) {
        if (ci >= r->nb) {
            finding(rep, CHECK_OFFSET_INVALID, "%s at 0x%llx lies beyond the "
                    "end of the file", what, (unsigned long long)(ci << m->cluster_bits));
            return;
        }
        if (r->ref[ci] != UINT32_MAX)
            r->ref[ci]++;
    }
}

static int read_table(struct meta *m, uint64_t offset, uint64_t bytes, uint8_t **out)
{
    uint8_t *buf = malloc(bytes ? bytes : 1);
    int ret;

    if (!buf)
        return -ENOMEM;
    ret = io_pread(m->io, buf, bytes, offset);
    if (ret < 0) {
        free(buf);
        return ret;
    }
    *out = buf;
    return 0;
}

static int walk_l2(struct meta *m, struct check_refs *r, struct check_report *rep,
                   uint64_t l2_offset, bool active)
{
    uint8_t *t;
    int ret = read_table(m, l2_offset, m->cluster_size, &t);

    if (ret < 0)
        return ret;
    for (uint64_t i = 0; i < m->l2_entries; i++) {
        uint64_t e = be64_get(t + i * m->l2_entry_bytes);
        if (e & META_L2_COMPRESSED) {
            uint64_t host, len, sectors, sectors_len;
            if (compress_descriptor_decode(e & ~(META_L2_COPIED | META_L2_COMPRESSED),
                                           m->cluster_bits, &host, &len) < 0) {
                finding(rep, CHECK_OFFSET_INVALID, "compressed cluster in L2 "
                        "table 0x%llx entry %llu has an offset beyond 2^56",
                        (unsigned long long)l2_offset, (unsigned long long)i);
                continue;
            }
            compress_sectors(host, len, &sectors, &sectors_len);
            inc_refs(m, r, rep, sectors, sectors_len, "compressed cluster");
            if (active)
                rep->allocated_clusters++;
            continue;
        }
        /* Reported, but the offset still counts as a reference, as QEMU
         * counts it: freeing it as a leak would lose data. */
        if (e & META_L2_STD_RESERVED)
            finding(rep, CHECK_RESERVED_BITS, "L2 table 0x%llx entry %llu = "
                    "0x%016llx has reserved bits set", (unsigned long long)l2_offset,
                    (unsigned long long)i, (unsigned long long)e);
        uint64_t host = e & META_OFFSET_MASK;
        if (!host)
            continue;
        if (host & (m->cluster_size - 1)) {
            finding(rep, CHECK_OFFSET_INVALID, "L2 table 0x%llx entry %llu: data "
                    "cluster offset 0x%llx is not cluster aligned",
                    (unsigned long long)l2_offset, (unsigned long long)i,
                    (unsigned long long)host);
            continue;
        }
        if (active)
            rep->allocated_clusters++;
        if (!m->has_data_file)
            inc_refs(m, r, rep, host, m->cluster_size, "data cluster");
    }
    free(t);
    return 0;
}

static int walk_l1(struct meta *m, struct check_refs *r, struct check_report *rep,
                   uint64_t l1_offset, uint32_t l1_size, bool active)
{
    uint8_t *t;
    int ret;

    if (l1_size == 0)
        return 0;
    inc_refs(m, r, rep, l1_offset, (uint64_t)l1_size * 8, "L1 table");
    ret = read_table(m, l1_offset, (uint64_t)l1_size * 8, &t);
    if (ret < 0)
        return ret;
    for (uint32_t i = 0; i < l1_size && ret == 0; i++) {
        uint64_t e = be64_get(t + 8 * i), l2 = e & META_OFFSET_MASK;
        if (e & META_L1_RESERVED)
            finding(rep, CHECK_RESERVED_BITS, "L1 table 0x%llx entry %u = 0x%016llx "
                    "has reserved bits set", (unsigned long long)l1_offset, i,
                    (unsigned long long)e);
        if (!l2)
            continue;
        if (l2 & (m->cluster_size - 1)) {
            finding(rep, CHECK_OFFSET_INVALID, "L1 table 0x%llx entry %u: L2 "
                    "offset 0x%llx is not cluster aligned",
                    (unsigned long long)l1_offset, i, (unsigned long long)l2);
            continue;
        }
        if ((l2 >> m->cluster_bits) >= r->nb) {
            finding(rep, CHECK_OFFSET_INVALID, "L1 table 0x%llx entry %u: L2 "
                    "table 0x%llx lies beyond the end of the file",
                    (unsigned long long)l1_offset, i, (unsigned long long)l2);
            continue;
        }
        inc_refs(m, r, rep, l2, m->cluster_size, "L2 table");
        ret = walk_l2(m, r, rep, l2, active);
    }
    free(t);
    return ret;
}

static int walk_snapshots(struct meta *m, const struct qcow2_header *h,
                          struct check_refs *r, struct check_report *rep)
{
    struct snapshot_table t;
    char err[256];
    int ret = snapshot_table_read(m->io, h, &t, err, sizeof(err));

    if (ret == -EINVAL) {
        finding(rep, CHECK_TABLE_INVALID, "%s", err);
        return 0;
    }
    if (ret < 0 || t.nb == 0)
        return ret;
    for (uint32_t i = 0; i < t.nb && ret == 0; i++)
        ret = walk_l1(m, r, rep, t.s[i].l1_offset, t.s[i].l1_size, false);
    inc_refs(m, r, rep, t.offset, t.bytes, "snapshot table");
    snapshot_table_free(&t);
    return ret;
}

static const struct header_ext *find_ext(const struct qcow2_header *h, uint32_t type)
{
    for (unsigned i = 0; i < h->nb_exts; i++)
        if (h->exts[i].type == type)
            return &h->exts[i];
    return NULL;
}

static int walk_bitmaps(struct meta *m, const struct qcow2_header *h,
                        struct check_refs *r, struct check_report *rep)
{
    const struct header_ext *e = find_ext(h, QCOW2_EXT_BITMAPS);
    uint64_t dir_size, dir_offset, pos = 0;
    uint32_t nb;
    uint8_t *dir;
    int ret;

    /* Without the autoclear bit the bitmaps are not in use (QEMU ignores
     * them too), so their clusters are not referenced. */
    if (!e || e->len < 24 || !(h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
        return 0;
    nb = be32_get(e->data);
    dir_size = be64_get(e->data + 8);
    dir_offset = be64_get(e->data + 16);
    if (dir_size > MAX_BITMAP_DIR || (dir_offset & (m->cluster_size - 1)) ||
        dir_offset + dir_size > (r->nb << m->cluster_bits)) {
        finding(rep, CHECK_TABLE_INVALID, "bitmap directory at 0x%llx (%llu "
                "bytes) is invalid", (unsigned long long)dir_offset,
                (unsigned long long)dir_size);
        return 0;
    }
    inc_refs(m, r, rep, dir_offset, dir_size, "bitmap directory");
    ret = read_table(m, dir_offset, dir_size, &dir);
    if (ret < 0)
        return ret;
    for (uint32_t i = 0; i < nb && pos + 24 <= dir_size; i++) {
        uint64_t toff = be64_get(dir + pos);
        uint32_t tsize = be32_get(dir + pos + 8);
        uint16_t name_size = be16_get(dir + pos + 18);
        uint32_t extra = be32_get(dir + pos + 20);
        uint8_t *tbl;

        pos += (24 + (uint64_t)extra + name_size + 7) & ~7ull;
        if ((toff & (m->cluster_size - 1)) || (uint64_t)tsize * 8 > MAX_BITMAP_DIR ||
            toff + (uint64_t)tsize * 8 > (r->nb << m->cluster_bits)) {
            finding(rep, CHECK_TABLE_INVALID, "bitmap %u: table 0x%llx is invalid",
                    i, (unsigned long long)toff);
            continue;
        }
        inc_refs(m, r, rep, toff, (uint64_t)tsize * 8, "bitmap table");
        ret = read_table(m, toff, (uint64_t)tsize * 8, &tbl);
        if (ret < 0)
            break;
        for (uint32_t j = 0; j < tsize; j++) {
            uint64_t d = be64_get(tbl + 8 * j) & META_OFFSET_MASK;
            if (d)
                inc_refs(m, r, rep, d, m->cluster_size, "bitmap data");
        }
        free(tbl);
    }
    free(dir);
    return ret;
}

int check_count_refs(struct meta *m, const struct qcow2_header *h,
                     struct check_report *rep, struct check_refs **out)
{
    struct check_refs *r = calloc(1, sizeof(*r));
    uint64_t file_size, rt_bytes;
    uint8_t *rt = NULL;
    int ret;

    if (!r)
        return -ENOMEM;
    ret = io_get_size(m->io, &file_size);
    if (ret < 0)
        goto fail;
    r->nb = (file_size + m->cluster_size - 1) >> m->cluster_bits;
    rep->clusters = r->nb;
    r->ref = calloc(r->nb ? r->nb : 1, sizeof(uint32_t));
    if (!r->ref) {
        ret = -ENOMEM;
        goto fail;
    }

    inc_refs(m, r, rep, 0, m->cluster_size, "header");
    ret = walk_l1(m, r, rep, h->l1_table_offset, h->l1_size, true);
    if (ret < 0)
        goto fail;
    ret = walk_snapshots(m, h, r, rep);
    if (ret < 0)
        goto fail;
    ret = walk_bitmaps(m, h, r, rep);
    if (ret < 0)
        goto fail;

    rt_bytes = (uint64_t)h->refcount_table_clusters << m->cluster_bits;
    inc_refs(m, r, rep, h->refcount_table_offset, rt_bytes, "refcount table");
    ret = read_table(m, h->refcount_table_offset, rt_bytes, &rt);
    if (ret < 0)
        goto fail;
    for (uint64_t i = 0; i < rt_bytes / 8; i++) {
        uint64_t b = be64_get(rt + 8 * i);
        if (!b)
            continue;
        if ((b & (m->cluster_size - 1)) || (b >> m->cluster_bits) >= r->nb) {
            finding(rep, CHECK_OFFSET_INVALID, "refcount table entry %llu: block "
                    "offset 0x%llx is misaligned or beyond the end of the file",
                    (unsigned long long)i, (unsigned long long)b);
            continue;
        }
        inc_refs(m, r, rep, b, m->cluster_size, "refcount block");
    }
    free(rt);
    *out = r;
    return 0;

fail:
    check_refs_free(r);
    return ret;
}

/* ---- comparison ---------------------------------------------------------- */

struct disk_refcounts {
    struct meta *m;
    uint8_t *table;             /* raw refcount table */
    uint64_t entries;
    uint8_t *block;
    uint64_t block_index;
    uint64_t block_entries;
};

static int disk_refcount(struct disk_refcounts *d, uint64_t ci, uint64_t *v)
{
    uint64_t ti = ci / d->block_entries, b;
    int ret;

    *v = 0;
    if (ti >= d->entries)
        return 0;
    b = be64_get(d->table + 8 * ti) & ~META_REFTABLE_RESERVED;
    if (!b)
        return 0;
    if (d->block_index != ti) {
        ret = io_pread(d->m->io, d->block, d->m->cluster_size, b);
        if (ret < 0)
            return ret;
        d->block_index = ti;
    }
    *v = refcount_entry_get(d->m->refcount_order, d->block, ci % d->block_entries);
    return 0;
}

/*
 * Walk the active L1 and L2 tables and compare every OFLAG_COPIED flag with
 * "refcount is exactly one", the refcount coming from @refcount_of.  Each
 * mismatch is reported in @rep, or with @fix the flag is corrected and the
 * table written back.  Returns the number of mismatches, or -errno.
 */
typedef int refcount_of_fn(void *opaque, uint64_t ci, uint64_t *v);

static long walk_copied(struct meta *m, const struct qcow2_header *h,
                        refcount_of_fn *refcount_of, void *opaque,
                        struct check_report *rep, bool fix)
{
    uint64_t file_clusters = m->file_end >> m->cluster_bits;
    uint8_t *l1 = NULL, *l2 = NULL;
    long mismatches = 0;
    int ret;

    if (!h->l1_size)
        return 0;
    ret = read_table(m, h->l1_table_offset, (uint64_t)h->l1_size * 8, &l1);
    if (ret < 0)
        return ret;
    l2 = malloc(m->cluster_size);
    if (!l2) {
        ret = -ENOMEM;
        goto out;
    }
    for (uint32_t i = 0; i < h->l1_size; i++) {
        uint64_t e = be64_get(l1 + 8 * i), off = e & META_OFFSET_MASK, v;
        bool l2_changed = false;
        if (!off || (off & (m->cluster_size - 1)) || (e & META_L1_RESERVED) ||
            (off >> m->cluster_bits) >= file_clusters)
            continue;
        ret = refcount_of(opaque, off >> m->cluster_bits, &v);
        if (ret < 0)
            goto out;
        if ((v == 1) != !!(e & META_L2_COPIED)) {
            mismatches++;
            if (fix) {
                be64_put(l1 + 8 * i, e ^ META_L2_COPIED);
                ret = io_pwrite(m->io, l1 + 8 * i, 8, h->l1_table_offset + 8 * i);
                if (ret < 0)
                    goto out;
            } else {
                finding(rep, CHECK_COPIED_WRONG, "OFLAG_COPIED L2 cluster: "
                        "l1_index=%u l1_entry=%llx refcount=%llu", i,
                        (unsigned long long)e, (unsigned long long)v);
            }
        }
        ret = io_pread(m->io, l2, m->cluster_size, off);
        if (ret < 0)
            goto out;
        for (uint64_t j = 0; j < m->l2_entries; j++) {
            uint64_t le = be64_get(l2 + j * m->l2_entry_bytes);
            uint64_t host = le & META_OFFSET_MASK;
            if ((le & META_L2_COMPRESSED) || !host || m->has_data_file ||
                (le & META_L2_STD_RESERVED) || (host >> m->cluster_bits) >= file_clusters)
                continue;
            ret = refcount_of(opaque, host >> m->cluster_bits, &v);
            if (ret < 0)
                goto out;
            if ((v == 1) == !!(le & META_L2_COPIED))
                continue;
            mismatches++;
            if (fix) {
                be64_put(l2 + j * m->l2_entry_bytes, le ^ META_L2_COPIED);
                l2_changed = true;
            } else {
                finding(rep, CHECK_COPIED_WRONG, "OFLAG_COPIED data cluster: "
                        "l2_entry=%llx refcount=%llu", (unsigned long long)le,
                        (unsigned long long)v);
            }
        }
        if (l2_changed) {
            ret = io_pwrite(m->io, l2, m->cluster_size, off);
            if (ret < 0)
                goto out;
        }
    }
    if (fix)
        ret = io_flush(m->io);
out:
    free(l1);
    free(l2);
    return ret < 0 ? ret : mismatches;
}

static int disk_refcount_of(void *opaque, uint64_t ci, uint64_t *v)
{
    return disk_refcount(opaque, ci, v);
}

int check_compare(struct meta *m, const struct qcow2_header *h,
                  struct check_refs *r, struct check_report *rep)
{
    struct disk_refcounts d = { .m = m, .block_index = UINT64_MAX };
    uint64_t rt_bytes = (uint64_t)h->refcount_table_clusters << m->cluster_bits;
    uint64_t covered;
    int ret;

    d.entries = rt_bytes / 8;
    d.block_entries = (m->cluster_size * 8) >> m->refcount_order;
    ret = read_table(m, h->refcount_table_offset, rt_bytes, &d.table);
    if (ret < 0)
        return ret;
    d.block = malloc(m->cluster_size);
    if (!d.block) {
        ret = -ENOMEM;
        goto out;
    }
    covered = r->nb;
    for (uint64_t ci = 0; ci < covered; ci++) {
        uint64_t v, want = r->ref[ci];
        ret = disk_refcount(&d, ci, &v);
        if (ret < 0)
            goto out;
        if (v > want)
            finding(rep, CHECK_LEAK, "cluster %llu refcount=%llu reference=%llu",
                    (unsigned long long)ci, (unsigned long long)v,
                    (unsigned long long)want);
        else if (v < want)
            finding(rep, CHECK_REFCOUNT_TOO_LOW, "cluster %llu refcount=%llu "
                    "reference=%llu", (unsigned long long)ci,
                    (unsigned long long)v, (unsigned long long)want);
    }
    {
        long n = walk_copied(m, h, disk_refcount_of, &d, rep, false);
        ret = n < 0 ? (int)n : 0;
    }
out:
    free(d.table);
    free(d.block);
    return ret;
}

/* ---- rebuild ------------------------------------------------------------- */

static void drop_ref(struct check_refs *r, uint64_t ci)
{
    if (ci < r->nb && r->ref[ci] && r->ref[ci] != UINT32_MAX)
        r->ref[ci]--;
}

static int drop_old_structures(struct meta *m, const struct qcow2_header *h,
                               struct check_refs *r)
{
    uint64_t rt_bytes = (uint64_t)h->refcount_table_clusters << m->cluster_bits;
    uint8_t *rt;
    int ret = read_table(m, h->refcount_table_offset, rt_bytes, &rt);

    if (ret < 0)
        return ret;
    for (uint64_t i = 0; i < h->refcount_table_clusters; i++)
        drop_ref(r, (h->refcount_table_offset >> m->cluster_bits) + i);
    for (uint64_t i = 0; i < rt_bytes / 8; i++) {
        uint64_t b = be64_get(rt + 8 * i);
        if (b && !(b & (m->cluster_size - 1)))
            drop_ref(r, b >> m->cluster_bits);
    }
    free(rt);
    return 0;
}

int check_rebuild_refcounts(struct meta *m, struct qcow2_header *h,
                            struct check_refs *r)
{
    uint64_t be = (m->cluster_size * 8) >> m->refcount_order;   /* per block */
    uint64_t max = m->refcount_order == 6 ? UINT64_MAX
                                          : (1ull << (1u << m->refcount_order)) - 1;
    uint64_t used = 0, start, nb_blocks = 0, table_clusters = 0, entries = 0;
    uint64_t *block_at = NULL;
    uint8_t *buf = NULL, *table = NULL;
    uint32_t *grown;
    int ret;

    for (uint64_t ci = 0; ci < r->nb; ci++)
        if (r->ref[ci]) {
            used = ci + 1;
            if (r->ref[ci] > max) {
                log_error("cluster %llu has %u references, more than %u-bit "
                          "refcounts can hold", (unsigned long long)ci, r->ref[ci],
                          1u << m->refcount_order);
                return -ERANGE;
            }
        }

    /* The new structures go after everything in use, the old refcount
     * structures included (they stay valid until the header switches), and
     * the old ones are not counted in the new refcounts: once the header
     * points at the new table nothing refers to them. */
    ret = drop_old_structures(m, h, r);
    if (ret < 0)
        return ret;
    start = used;
    /* Their own clusters need refcounts too: iterate until stable. */
    for (;;) {
        uint64_t end = start + nb_blocks + table_clusters;
        uint64_t need_entries = (end + be - 1) / be;
        uint64_t blocks = 0, tc;

        for (uint64_t ti = 0; ti < need_entries; ti++) {
            bool any = false;
            for (uint64_t ci = ti * be; ci < (ti + 1) * be && ci < end; ci++)
                if ((ci < used && r->ref[ci]) || ci >= start) {
                    any = true;
                    break;
                }
            blocks += any;
        }
        tc = (need_entries * 8 + m->cluster_size - 1) >> m->cluster_bits;
        if (blocks == nb_blocks && tc == table_clusters)
            break;
        nb_blocks = blocks;
        table_clusters = tc;
    }
    if (table_clusters << m->cluster_bits > HEADER_MAX_REFTABLE_BYTES)
        return -EFBIG;
    entries = (table_clusters << m->cluster_bits) / 8;

    if (start + nb_blocks + table_clusters > r->nb) {
        /* The array covers the file; the new structures may extend it. */
        grown = realloc(r->ref, (start + nb_blocks + table_clusters) * sizeof(uint32_t));
        if (!grown)
            return -ENOMEM;
        r->ref = grown;
        for (uint64_t ci = r->nb; ci < start + nb_blocks + table_clusters; ci++)
            r->ref[ci] = 0;
        r->nb = start + nb_blocks + table_clusters;
    }
    for (uint64_t ci = start; ci < start + nb_blocks + table_clusters; ci++)
        r->ref[ci] = 1;

    block_at = calloc(entries, sizeof(uint64_t));
    buf = malloc(m->cluster_size);
    table = calloc(entries, 8);
    if (!block_at || !buf || !table) {
        ret = -ENOMEM;
        goto out;
    }
    {
        uint64_t next = start;
        for (uint64_t ti = 0; ti < entries; ti++) {
            bool any = false;
            for (uint64_t ci = ti * be; ci < (ti + 1) * be && ci < r->nb; ci++)
                if (r->ref[ci]) {
                    any = true;
                    break;
                }
            if (!any)
                continue;
            block_at[ti] = next++;
        }
        if (next != start + nb_blocks) {
            ret = -EIO;         /* layout arithmetic disagrees: a bug */
            log_error("refcount rebuild: %llu blocks laid out, %llu expected",
                      (unsigned long long)(next - start), (unsigned long long)nb_blocks);
            goto out;
        }
    }
    for (uint64_t ti = 0; ti < entries; ti++) {
        if (!block_at[ti])
            continue;
        memset(buf, 0, m->cluster_size);
        for (uint64_t i = 0; i < be && ti * be + i < r->nb; i++)
            refcount_entry_set(m->refcount_order, buf, i, r->ref[ti * be + i]);
        ret = io_pwrite(m->io, buf, m->cluster_size, block_at[ti] << m->cluster_bits);
        if (ret < 0)
            goto out;
        be64_put(table + 8 * ti, block_at[ti] << m->cluster_bits);
    }
    ret = io_pwrite(m->io, table, entries * 8, (start + nb_blocks) << m->cluster_bits);
    if (ret == 0)
        ret = io_flush(m->io);
    if (ret < 0)
        goto out;
    /* The new structures may lie past the end the image had when it was
     * opened: every later validation against m->file_end (the refcount
     * table's entries first) must see them inside the file. */
    {
        uint64_t new_end = (start + nb_blocks + table_clusters) << m->cluster_bits;
        if (new_end > m->file_end)
            m->file_end = new_end;
    }

    ret = header_write_refcount_table(m->io, (start + nb_blocks) << m->cluster_bits,
                                      (uint32_t)table_clusters);
    if (ret == 0)
        ret = io_flush(m->io);
    if (ret < 0)
        goto out;
    h->refcount_table_offset = (start + nb_blocks) << m->cluster_bits;
    h->refcount_table_clusters = (uint32_t)table_clusters;
out:
    free(block_at);
    free(buf);
    free(table);
    return ret;
}

static int counted_refcount_of(void *opaque, uint64_t ci, uint64_t *v)
{
    struct check_refs *r = opaque;

    *v = ci < r->nb ? r->ref[ci] : 0;
    return 0;
}

long check_fix_copied(struct meta *m, const struct qcow2_header *h,
                      struct check_refs *r)
{
    return walk_copied(m, h, counted_refcount_of, r, NULL, true);
}

long check_fix_leaks(struct meta *m, const struct qcow2_header *h,
                     struct check_refs *r)
{
    uint64_t rt_bytes = (uint64_t)h->refcount_table_clusters << m->cluster_bits;
    uint64_t be = (m->cluster_size * 8) >> m->refcount_order;
    uint8_t *rt = NULL, *block = NULL;
    long fixed = 0;
    int ret;

    ret = read_table(m, h->refcount_table_offset, rt_bytes, &rt);
    if (ret < 0)
        return ret;
    block = malloc(m->cluster_size);
    if (!block) {
        ret = -ENOMEM;
        goto out;
    }
    for (uint64_t ti = 0; ti < rt_bytes / 8; ti++) {
        uint64_t b = be64_get(rt + 8 * ti) & ~META_REFTABLE_RESERVED;
        bool changed = false;
        if (!b || (b & (m->cluster_size - 1)) || (b >> m->cluster_bits) >= r->nb)
            continue;
        ret = io_pread(m->io, block, m->cluster_size, b);
        if (ret < 0)
            goto out;
        for (uint64_t i = 0; i < be; i++) {
            uint64_t ci = ti * be + i;
            uint64_t want = ci < r->nb ? r->ref[ci] : 0;
            uint64_t v = refcount_entry_get(m->refcount_order, block, i);
            if (v > want) {
                refcount_entry_set(m->refcount_order, block, i, want);
                changed = true;
                fixed++;
            }
        }
        if (changed) {
            ret = io_pwrite(m->io, block, m->cluster_size, b);
            if (ret < 0)
                goto out;
        }
    }
    ret = io_flush(m->io);
out:
    free(rt);
    free(block);
    return ret < 0 ? ret : fixed;
}
