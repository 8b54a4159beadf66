/*
 * snapshot — internal snapshot table decoding, and the check of the disk
 * size a snapshot's view would show.
 */
#include "snapshot.h"

#include "header.h"
#include "io.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(char *err, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t len, const char *fmt, ...)
{
    va_list ap;

    if (err && len) {
        va_start(ap, fmt);
        vsnprintf(err, len, fmt, ap);
        va_end(ap);
    }
    return -EINVAL;
}

void snapshot_table_free(struct snapshot_table *t)
{
    for (uint32_t i = 0; t->s && i < t->nb; i++) {
        free(t->s[i].id);
        free(t->s[i].name);
    }
    free(t->s);
    memset(t, 0, sizeof(*t));
}

static char *dup_bytes(const uint8_t *p, size_t n)
{
    char *s = malloc(n + 1);
    if (s) {
        memcpy(s, p, n);
        s[n] = '\0';
    }
    return s;
}

/* Why @size cannot be a snapshot's disk size, or NULL when it can.  The
 * cap is the one header_decode puts on the header's size: what a maximal
 * L1 table maps, and below 2^61. */
static const char *disk_size_problem(const struct qcow2_header *h, uint64_t size)
{
    uint64_t cs = 1ull << h->cluster_bits;
    uint64_t l2_entries = cs / (h->incompatible_features & QCOW2_INCOMPAT_EXTL2 ? 16 : 8);
    uint64_t max_clusters = (uint64_t)(HEADER_MAX_L1_BYTES / 8) * l2_entries;

    if (size >> 63)
        return "negative as a signed 64-bit value";
    if (size % 512)
        return "not a multiple of 512";
    if (size >> 61 || size / cs > max_clusters)
        return "larger than the format allows for this cluster size";
    return NULL;
}

void snapshot_printable(char *out, size_t out_len, const char *s, size_t len)
{
    size_t n = 0;

    for (; n < len && n < 64 && n + 1 < out_len; n++)
        out[n] = s[n] >= 0x20 && s[n] < 0x7f ? s[n] : '?';
    out[n] = '\0';
}

int snapshot_table_read(struct io *io, const struct qcow2_header *h,
                        struct snapshot_table *t, char *err, size_t err_len)
{
    uint64_t file_size, avail, pos = 0, cs = 1ull << h->cluster_bits;
    uint8_t *buf = NULL;
    int ret;

    memset(t, 0, sizeof(*t));
    if (h->nb_snapshots == 0)
        return 0;
    ret = io_get_size(io, &file_size);
    if (ret < 0)
        return ret;
    if (h->snapshots_offset >= file_size)
        return fail(err, err_len, "snapshots_offset 0x%llx lies past the end of "
                    "the file", (unsigned long long)h->snapshots_offset);
    avail = file_size - h->snapshots_offset;
    if (avail > SNAPSHOT_MAX_TABLE)
        avail = SNAPSHOT_MAX_TABLE;
    buf = malloc(avail);
    t->s = calloc(h->nb_snapshots, sizeof(*t->s));
    if (!buf || !t->s) {
        ret = -ENOMEM;
        goto fail;
    }
    t->nb = h->nb_snapshots;    /* entries start zeroed: safe to free */
    ret = io_pread(io, buf, avail, h->snapshots_offset);
    if (ret < 0)
        goto fail;

    for (uint32_t i = 0; i < h->nb_snapshots; i++) {
        struct snapshot *s = &t->s[i];
        uint16_t id_len, name_len;
        uint32_t extra;
        uint64_t len;
        const uint8_t *e = buf + pos;

        if (pos > avail || avail - pos < 40) {
            ret = fail(err, err_len, "snapshot table at 0x%llx: entry %u is cut off",
                       (unsigned long long)h->snapshots_offset, i);
            goto fail;
        }
        s->l1_offset = be64_get(e);
        s->l1_size = be32_get(e + 8);
        id_len = be16_get(e + 12);
        name_len = be16_get(e + 14);
        s->date_sec = be32_get(e + 16);
        s->date_nsec = be32_get(e + 20);
        s->vm_clock_nsec = be64_get(e + 24);
        s->vm_state_size = be32_get(e + 32);
        extra = be32_get(e + 36);
        len = 40 + (uint64_t)extra + id_len + name_len;
        /* The padding of the last entry may lie past the end of the file. */
        if (extra > 1024 || len > avail - pos) {
            ret = fail(err, err_len, "snapshot table at 0x%llx: entry %u (extra "
                       "data %u, id %u, name %u bytes) runs past the table",
                       (unsigned long long)h->snapshots_offset, i, extra, id_len,
                       name_len);
            goto fail;
        }
        if (extra >= 8)
            s->vm_state_size = be64_get(e + 40);
        if (extra >= 16) {
            s->disk_size = be64_get(e + 48);
            s->has_disk_size = true;
        }
        s->index = i;
        s->entry_offset = h->snapshots_offset + pos;
        if ((s->l1_offset & (cs - 1)) || (uint64_t)s->l1_size * 8 > HEADER_MAX_L1_BYTES ||
            s->l1_offset > file_size ||
            (uint64_t)s->l1_size * 8 > file_size - s->l1_offset) {
            ret = fail(err, err_len, "snapshot %u: L1 table 0x%llx with %u entries "
                       "is misaligned, too large or outside the file", i,
                       (unsigned long long)s->l1_offset, s->l1_size);
            goto fail;
        }
        s->id_len = id_len;
        s->name_len = name_len;
        s->id = dup_bytes(e + 40 + extra, id_len);
        s->name = dup_bytes(e + 40 + extra + id_len, name_len);
        if (!s->id || !s->name) {
            ret = -ENOMEM;
            goto fail;
        }
        pos += (len + 7) & ~7ull;
    }
    t->offset = h->snapshots_offset;
    t->bytes = pos < avail ? pos : avail;
    free(buf);
    return 0;

fail:
    free(buf);
    snapshot_table_free(t);
    return ret;
}

int snapshot_check_view(const struct qcow2_header *h, const struct snapshot *s,
                        char *err, size_t err_len)
{
    const char *why = s->has_disk_size ? disk_size_problem(h, s->disk_size) : NULL;
    char id[72], name[72];

    if (!why)
        return 0;
    snapshot_printable(id, sizeof(id), s->id, s->id_len);
    snapshot_printable(name, sizeof(name), s->name, s->name_len);
    return fail(err, err_len, "snapshot %u (ID \"%s\", name \"%s\"): disk_size "
                "(entry offset 48, at 0x%llx) is %llu, %s", s->index, id, name,
                (unsigned long long)(s->entry_offset + 48),
                (unsigned long long)s->disk_size, why);
}

const struct snapshot *snapshot_find(const struct snapshot_table *t, const char *key)
{
    for (uint32_t i = 0; i < t->nb; i++)
        if (strcmp(t->s[i].name, key) == 0)
            return &t->s[i];
    for (uint32_t i = 0; i < t->nb; i++)
        if (strcmp(t->s[i].id, key) == 0)
            return &t->s[i];
    return NULL;
}
