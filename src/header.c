/*
 * header — qcow2 header and header-extension decoding, validation, encoding.
 * Every check names the field, its byte offset in the header and its value,
 * so that a user handed a broken image learns exactly what is wrong.
 */
#include "header.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(char *err, size_t err_len, int ret, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int fail(char *err, size_t err_len, int ret, const char *fmt, ...)
{
    va_list ap;

    if (err && err_len) {
        va_start(ap, fmt);
        vsnprintf(err, err_len, fmt, ap);
        va_end(ap);
    }
    return ret;
}

static const char *const known_incompat[] = {
    "dirty bit", "corrupt bit", "external data file",
    "compression type", "extended L2 entries",
};

const char *header_feature_name(const struct qcow2_header *h, unsigned type,
                                unsigned bit)
{
    for (unsigned i = 0; h && i < h->nb_feature_names; i++)
        if (h->feature_names[i].type == type && h->feature_names[i].bit == bit &&
            h->feature_names[i].name[0])
            return h->feature_names[i].name;
    if (type == 0 && bit < sizeof(known_incompat) / sizeof(known_incompat[0]))
        return known_incompat[bit];
    if (type == 1 && bit == 0)
        return "lazy refcounts";
    if (type == 2 && bit == 0)
        return "bitmaps";
    if (type == 2 && bit == 1)
        return "raw external data";
    return "unknown";
}

void header_free(struct qcow2_header *h)
{
    for (unsigned i = 0; i < h->nb_exts; i++)
        free(h->exts[i].data);
    free(h->exts);
    free(h->extra_fields);
    free(h->backing_file);
    free(h->backing_format);
    free(h->data_file);
    free(h->feature_names);
    memset(h, 0, sizeof(*h));
}

static char *dup_string(const uint8_t *p, size_t len)
{
    char *s = malloc(len + 1);
    if (s) {
        memcpy(s, p, len);
        s[len] = '\0';
    }
    return s;
}

/* A name stored in the image may not contain NUL bytes (it would silently
 * become a different name). */
static bool has_nul(const uint8_t *p, size_t len)
{
    return memchr(p, 0, len) != NULL;
}

static int decode_extensions(const uint8_t *buf, size_t area_end,
                             struct qcow2_header *h, char *err, size_t err_len)
{
    size_t off = h->version == 2 ? QCOW2_V2_HEADER_LEN : h->header_length;
    unsigned cap = 0;
    uint32_t seen_mask = 0;

    for (;;) {
        uint32_t type, len;
        size_t padded;
        struct header_ext *e;

        if (off + 8 > area_end) {
            /* No room for an END marker: QEMU accepts a header whose
             * extension area simply runs out. */
            h->ext_end = (uint32_t)off;
            return 0;
        }
        type = be32_get(buf + off);
        len = be32_get(buf + off + 4);
        if (type == QCOW2_EXT_END) {
            h->ext_end = (uint32_t)(off + 8);
            return 0;
        }
        padded = ((size_t)len + 7) & ~(size_t)7;
        if (len > area_end || off + 8 + padded > area_end)
            return fail(err, err_len, -EINVAL,
                        "header extension 0x%08x at offset %zu: length %u "
                        "runs past the end of the header area (%zu bytes)",
                        type, off, len, area_end);

        const uint8_t *data = buf + off + 8;
        int idx = -1;
        switch (type) {
        case QCOW2_EXT_BACKING_FORMAT: idx = 0; break;
        case QCOW2_EXT_FEATURE_TABLE:  idx = 1; break;
        case QCOW2_EXT_BITMAPS:        idx = 2; break;
        case QCOW2_EXT_CRYPTO:         idx = 3; break;
        case QCOW2_EXT_DATA_FILE:      idx = 4; break;
        }
        if (idx >= 0) {
            if (seen_mask & (1u << idx))
                return fail(err, err_len, -EINVAL,
                            "header extension 0x%08x at offset %zu appears twice",
                            type, off);
            seen_mask |= 1u << idx;
        }

        switch (type) {
        case QCOW2_EXT_BACKING_FORMAT:
            if (len == 0 || len > 255 || has_nul(data, len))
                return fail(err, err_len, -EINVAL,
                            "backing format extension at offset %zu: invalid "
                            "name of length %u", off, len);
            h->backing_format = dup_string(data, len);
            if (!h->backing_format)
                return -ENOMEM;
            break;
        case QCOW2_EXT_DATA_FILE:
            if (len == 0 || len > HEADER_MAX_EXT_NAME || has_nul(data, len))
                return fail(err, err_len, -EINVAL,
                            "external data file name extension at offset %zu: "
                            "invalid name of length %u", off, len);
            h->data_file = dup_string(data, len);
            if (!h->data_file)
                return -ENOMEM;
            break;
        case QCOW2_EXT_FEATURE_TABLE:
            if (len % 48)
                return fail(err, err_len, -EINVAL,
                            "feature name table at offset %zu: length %u is "
                            "not a multiple of 48", off, len);
            h->nb_feature_names = len / 48;
            h->feature_names = calloc(h->nb_feature_names ? h->nb_feature_names : 1,
                                      sizeof(*h->feature_names));
            if (!h->feature_names)
                return -ENOMEM;
            for (unsigned i = 0; i < h->nb_feature_names; i++) {
                const uint8_t *f = data + 48 * i;
                h->feature_names[i].type = f[0];
                h->feature_names[i].bit = f[1];
                memcpy(h->feature_names[i].name, f + 2, 46);
                h->feature_names[i].name[46] = '\0';
            }
            break;
        case QCOW2_EXT_BITMAPS:
            if (len < 24)
                return fail(err, err_len, -EINVAL,
                            "bitmaps extension at offset %zu: length %u is "
                            "shorter than 24", off, len);
            break;
        default:
            break;
        }

        if (h->nb_exts == cap) {
            unsigned ncap = cap ? cap * 2 : 8;
            struct header_ext *n = realloc(h->exts, ncap * sizeof(*n));
            if (!n)
                return -ENOMEM;
            h->exts = n;
            cap = ncap;
        }
        e = &h->exts[h->nb_exts];
        e->type = type;
        e->len = len;
        e->data = malloc(len ? len : 1);
        if (!e->data)
            return -ENOMEM;
        memcpy(e->data, data, len);
        h->nb_exts++;
        off += 8 + padded;
    }
}

/*
 * The refusal of unknown incompatible features: every unknown bit, each
 * with its name when the image's feature-name table gives one (QEMU lists
 * them all, too).  Returns -ENOTSUP.
 */
static int fail_unknown_incompat(const uint8_t *buf, size_t buf_len,
                                 uint64_t cluster_size, struct qcow2_header *h,
                                 char *err, size_t err_len)
{
    uint64_t unknown = h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN;
    size_t area_end = buf_len < cluster_size ? buf_len : (size_t)cluster_size;
    char list[768];
    size_t pos = 0;
    bool named;

    /* The feature-name table may name them: decode extensions first (a
     * damaged extension area just means no names). */
    named = decode_extensions(buf, area_end, h, NULL, 0) == 0;
    list[0] = '\0';
    for (unsigned bit = 0; bit < 64 && pos < sizeof(list); bit++) {
        const char *name;
        if (!(unknown & (1ull << bit)))
            continue;
        name = named ? header_feature_name(h, 0, bit) : "unknown";
        if (strcmp(name, "unknown") != 0)
            pos += (size_t)snprintf(list + pos, sizeof(list) - pos, "%s\"%s\" (bit %u)",
                                    pos ? ", " : "", name, bit);
        else
            pos += (size_t)snprintf(list + pos, sizeof(list) - pos, "%sunknown bit %u",
                                    pos ? ", " : "", bit);
    }
    return fail(err, err_len, -ENOTSUP,
                "unsupported incompatible feature%s %s (incompatible_features, "
                "offset 72, value 0x%llx)", (unknown & (unknown - 1)) ? "s" : "",
                list, (unsigned long long)h->incompatible_features);
}

int header_decode(const uint8_t *buf, size_t buf_len, uint64_t file_size,
                  struct qcow2_header *h, char *err, size_t err_len)
{
    uint64_t cluster_size, l2_entries, need_l1, max_vsize_clusters;
    size_t area_end;
    int ret;

    memset(h, 0, sizeof(*h));
    if (buf_len < QCOW2_V2_HEADER_LEN)
        return fail(err, err_len, -EINVAL,
                    "file is %zu bytes, too short for a qcow2 header", buf_len);
    if (be32_get(buf) != QCOW2_MAGIC)
        return fail(err, err_len, -EINVAL,
                    "not a qcow2 image: magic (offset 0) is 0x%08x, "
                    "expected 0x%08x (\"QFI\\xfb\")", be32_get(buf), QCOW2_MAGIC);

    h->version = be32_get(buf + 4);
    h->backing_file_offset = be64_get(buf + 8);
    h->backing_file_size = be32_get(buf + 16);
    h->cluster_bits = be32_get(buf + 20);
    h->size = be64_get(buf + 24);
    h->crypt_method = be32_get(buf + 32);
    h->l1_size = be32_get(buf + 36);
    h->l1_table_offset = be64_get(buf + 40);
    h->refcount_table_offset = be64_get(buf + 48);
    h->refcount_table_clusters = be32_get(buf + 56);
    h->nb_snapshots = be32_get(buf + 60);
    h->snapshots_offset = be64_get(buf + 64);

    if (h->version != 2 && h->version != 3)
        return fail(err, err_len, -ENOTSUP,
                    "unsupported qcow2 version (offset 4): %u (2 and 3 are "
                    "supported)", h->version);

    if (h->version == 2) {
        h->refcount_order = 4;
        h->header_length = QCOW2_V2_HEADER_LEN;
    } else {
        if (buf_len < QCOW2_V3_MIN_HEADER_LEN)
            return fail(err, err_len, -EINVAL,
                        "file is %zu bytes, too short for a version 3 header",
                        buf_len);
        h->incompatible_features = be64_get(buf + 72);
        h->compatible_features = be64_get(buf + 80);
        h->autoclear_features = be64_get(buf + 88);
        h->refcount_order = be32_get(buf + 96);
        h->header_length = be32_get(buf + 100);
    }

    if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        h->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
        return fail(err, err_len, -EINVAL,
                    "cluster_bits (offset 20) is %u, must be between %u and %u",
                    h->cluster_bits, QCOW2_MIN_CLUSTER_BITS, QCOW2_MAX_CLUSTER_BITS);
    cluster_size = 1ull << h->cluster_bits;

    if (h->version == 3) {
        if (h->header_length < QCOW2_V3_MIN_HEADER_LEN || h->header_length % 8)
            return fail(err, err_len, -EINVAL,
                        "header_length (offset 100) is %u, must be at least %u "
                        "and a multiple of 8", h->header_length,
                        QCOW2_V3_MIN_HEADER_LEN);
        if (h->header_length > cluster_size)
            return fail(err, err_len, -EINVAL,
                        "header_length (offset 100) is %u, larger than the "
                        "cluster size %llu", h->header_length,
                        (unsigned long long)cluster_size);
        if (h->header_length > buf_len)
            return fail(err, err_len, -EINVAL,
                        "header_length (offset 100) is %u but the file holds "
                        "only %zu bytes", h->header_length, buf_len);
        if (h->header_length > 104)
            h->compression_type = buf[104];
        if (h->header_length > 112) {
            h->extra_fields_len = h->header_length - 112;
            h->extra_fields = malloc(h->extra_fields_len);
            if (!h->extra_fields)
                return -ENOMEM;
            memcpy(h->extra_fields, buf + 112, h->extra_fields_len);
        }
    }

    if (h->refcount_order > 6) {
        ret = fail(err, err_len, -EINVAL,
                   "refcount_order (offset 96) is %u, must be at most 6",
                   h->refcount_order);
        goto fail;
    }

    if (h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN) {
        ret = fail_unknown_incompat(buf, buf_len, cluster_size, h, err, err_len);
        goto fail;
    }

    if (h->crypt_method != 0) {
        if (h->crypt_method == 1 || h->crypt_method == 2)
            ret = fail(err, err_len, -ENOTSUP,
                       "encrypted images (crypt_method %u, %s, at offset 32) "
                       "are not supported", h->crypt_method,
                       h->crypt_method == 1 ? "AES" : "LUKS");
        else
            ret = fail(err, err_len, -EINVAL,
                       "crypt_method (offset 32) is %u, must be 0, 1 or 2",
                       h->crypt_method);
        goto fail;
    }

    if (h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION) {
        if (h->header_length <= 104 || h->compression_type == 0) {
            ret = fail(err, err_len, -EINVAL,
                       "compression type bit (incompatible_features bit 3) is "
                       "set but compression_type (offset 104) is %s",
                       h->header_length <= 104 ? "absent" : "0 (zlib)");
            goto fail;
        }
    } else if (h->compression_type != 0) {
        ret = fail(err, err_len, -EINVAL,
                   "compression_type (offset 104) is %u but the compression "
                   "type bit (incompatible_features bit 3) is clear",
                   h->compression_type);
        goto fail;
    }
    if (h->compression_type > 1) {
        ret = fail(err, err_len, -ENOTSUP,
                   "compression_type (offset 104) %u is not supported "
                   "(0 zlib, 1 zstd)", h->compression_type);
        goto fail;
    }

    if ((h->incompatible_features & QCOW2_INCOMPAT_EXTL2) && h->cluster_bits < 14) {
        ret = fail(err, err_len, -EINVAL,
                   "extended L2 entries (incompatible_features bit 4) need "
                   "cluster_bits >= 14, but cluster_bits (offset 20) is %u",
                   h->cluster_bits);
        goto fail;
    }

    /* L1 table: size bound, placement, and large enough for the disk. */
    l2_entries = cluster_size / ((h->incompatible_features & QCOW2_INCOMPAT_EXTL2) ? 16 : 8);
    if ((uint64_t)h->l1_size * 8 > HEADER_MAX_L1_BYTES) {
        ret = fail(err, err_len, -EINVAL,
                   "l1_size (offset 36) is %u entries, more than the limit of "
                   "%u", h->l1_size, HEADER_MAX_L1_BYTES / 8);
        goto fail;
    }
    /* Virtual size cap: what a maximal L1 table can map, and below 2^61. */
    max_vsize_clusters = (uint64_t)(HEADER_MAX_L1_BYTES / 8) * l2_entries;
    if (h->size >> 61 || h->size / cluster_size > max_vsize_clusters) {
        ret = fail(err, err_len, -EINVAL,
                   "size (offset 24) is %llu bytes, too large for cluster size "
                   "%llu", (unsigned long long)h->size,
                   (unsigned long long)cluster_size);
        goto fail;
    }
    need_l1 = ((h->size + cluster_size - 1) / cluster_size + l2_entries - 1) / l2_entries;
    if (h->l1_size < need_l1) {
        ret = fail(err, err_len, -EINVAL,
                   "l1_size (offset 36) is %u, too small for the virtual size "
                   "%llu (needs %llu entries)", h->l1_size,
                   (unsigned long long)h->size, (unsigned long long)need_l1);
        goto fail;
    }
    if (h->l1_size > 0 || h->l1_table_offset != 0) {
        if (h->l1_table_offset % cluster_size || h->l1_table_offset == 0) {
            ret = fail(err, err_len, -EINVAL,
                       "l1_table_offset (offset 40) is 0x%llx, not a non-zero "
                       "multiple of the cluster size",
                       (unsigned long long)h->l1_table_offset);
            goto fail;
        }
        if (h->l1_table_offset > file_size ||
            (uint64_t)h->l1_size * 8 > file_size - h->l1_table_offset) {
            ret = fail(err, err_len, -EINVAL,
                       "l1_table_offset (offset 40) 0x%llx with l1_size %u "
                       "lies past the end of the file (%llu bytes)",
                       (unsigned long long)h->l1_table_offset, h->l1_size,
                       (unsigned long long)file_size);
            goto fail;
        }
    }

    /* Refcount table. */
    if (h->refcount_table_offset == 0 || h->refcount_table_offset % cluster_size) {
        ret = fail(err, err_len, -EINVAL,
                   "refcount_table_offset (offset 48) is 0x%llx, not a non-zero "
                   "multiple of the cluster size",
                   (unsigned long long)h->refcount_table_offset);
        goto fail;
    }
    if (h->refcount_table_clusters == 0 ||
        (uint64_t)h->refcount_table_clusters * cluster_size > HEADER_MAX_REFTABLE_BYTES) {
        ret = fail(err, err_len, -EINVAL,
                   "refcount_table_clusters (offset 56) is %u: must be between "
                   "1 and %llu", h->refcount_table_clusters,
                   (unsigned long long)(HEADER_MAX_REFTABLE_BYTES / cluster_size));
        goto fail;
    }
    if (h->refcount_table_offset > file_size ||
        (uint64_t)h->refcount_table_clusters * cluster_size >
            file_size - h->refcount_table_offset + cluster_size) {
        /* The last refcount-table cluster may be only partly written. */
        ret = fail(err, err_len, -EINVAL,
                   "refcount_table_offset (offset 48) 0x%llx with %u clusters "
                   "lies past the end of the file (%llu bytes)",
                   (unsigned long long)h->refcount_table_offset,
                   h->refcount_table_clusters, (unsigned long long)file_size);
        goto fail;
    }

    /* Snapshot table placement (entries are parsed by the snapshot code). */
    if (h->nb_snapshots > HEADER_MAX_SNAPSHOTS) {
        ret = fail(err, err_len, -EINVAL,
                   "nb_snapshots (offset 60) is %u, more than the limit of %u",
                   h->nb_snapshots, HEADER_MAX_SNAPSHOTS);
        goto fail;
    }
    /* Even without snapshots the offset must be one (as QEMU demands). */
    if (h->snapshots_offset % cluster_size || h->snapshots_offset > INT64_MAX ||
        (h->nb_snapshots &&
         (h->snapshots_offset == 0 || h->snapshots_offset >= file_size))) {
        ret = fail(err, err_len, -EINVAL,
                   "snapshots_offset (offset 64) is 0x%llx: not cluster "
                   "aligned or outside the file (%llu bytes)",
                   (unsigned long long)h->snapshots_offset,
                   (unsigned long long)file_size);
        goto fail;
    }

    /* Backing file name: inside the first cluster, at most 1023 bytes. */
    if (h->backing_file_offset) {
        if (h->backing_file_size == 0 || h->backing_file_size > QCOW2_MAX_BACKING_NAME) {
            ret = fail(err, err_len, -EINVAL,
                       "backing_file_size (offset 16) is %u, must be between 1 "
                       "and %u", h->backing_file_size, QCOW2_MAX_BACKING_NAME);
            goto fail;
        }
        if (h->backing_file_offset < h->header_length ||
            h->backing_file_offset > cluster_size ||
            h->backing_file_size > cluster_size - h->backing_file_offset ||
            h->backing_file_offset + h->backing_file_size > buf_len) {
            ret = fail(err, err_len, -EINVAL,
                       "backing_file_offset (offset 8) 0x%llx with "
                       "backing_file_size %u is not inside the first cluster",
                       (unsigned long long)h->backing_file_offset,
                       h->backing_file_size);
            goto fail;
        }
        if (has_nul(buf + h->backing_file_offset, h->backing_file_size)) {
            ret = fail(err, err_len, -EINVAL,
                       "backing file name at offset 0x%llx contains a NUL byte",
                       (unsigned long long)h->backing_file_offset);
            goto fail;
        }
        h->backing_file = dup_string(buf + h->backing_file_offset,
                                     h->backing_file_size);
        if (!h->backing_file) {
            ret = -ENOMEM;
            goto fail;
        }
    }

    /* Extensions end where the backing name starts, or at the cluster end. */
    area_end = h->backing_file_offset ? (size_t)h->backing_file_offset : (size_t)cluster_size;
    if (area_end > buf_len)
        area_end = buf_len;
    for (unsigned i = 0; i < h->nb_exts; i++)   /* from the feature probe */
        free(h->exts[i].data);
    free(h->exts);
    h->exts = NULL;
    h->nb_exts = 0;
    free(h->feature_names);
    h->feature_names = NULL;
    h->nb_feature_names = 0;
    ret = decode_extensions(buf, area_end, h, err, err_len);
    if (ret < 0)
        goto fail;

    if (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
        if (h->backing_file && (h->autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW)) {
            ret = fail(err, err_len, -EINVAL,
                       "raw external data file (autoclear bit 1) cannot be "
                       "combined with a backing file");
            goto fail;
        }
    } else if (h->autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW) {
        /* Meaningless without a data file; autoclear bits may simply be
         * dropped, which is what a writer does with it. */
        h->autoclear_features &= ~QCOW2_AUTOCLEAR_DATA_RAW;
    }
    return 0;

fail:
    header_free(h);
    return ret;
}

int header_encode(struct qcow2_header *h, uint8_t *buf, size_t buf_len)
{
    size_t off, need;

    need = h->version == 2 ? QCOW2_V2_HEADER_LEN : h->header_length;
    for (unsigned i = 0; i < h->nb_exts; i++)
        need += 8 + (((size_t)h->exts[i].len + 7) & ~(size_t)7);
    need += 8;
    if (h->backing_file)
        need += strlen(h->backing_file);
    if (need > buf_len)
        return -ENOSPC;

    memset(buf, 0, buf_len);
    be32_put(buf, QCOW2_MAGIC);
    be32_put(buf + 4, h->version);
    be32_put(buf + 20, h->cluster_bits);
    be64_put(buf + 24, h->size);
    be32_put(buf + 32, h->crypt_method);
    be32_put(buf + 36, h->l1_size);
    be64_put(buf + 40, h->l1_table_offset);
    be64_put(buf + 48, h->refcount_table_offset);
    be32_put(buf + 56, h->refcount_table_clusters);
    be32_put(buf + 60, h->nb_snapshots);
    be64_put(buf + 64, h->snapshots_offset);
    if (h->version == 3) {
        be64_put(buf + 72, h->incompatible_features);
        be64_put(buf + 80, h->compatible_features);
        be64_put(buf + 88, h->autoclear_features);
        be32_put(buf + 96, h->refcount_order);
        be32_put(buf + 100, h->header_length);
        if (h->header_length > 104)
            buf[104] = h->compression_type;
        if (h->extra_fields_len)
            memcpy(buf + 112, h->extra_fields, h->extra_fields_len);
        off = h->header_length;
    } else {
        off = QCOW2_V2_HEADER_LEN;
    }

    for (unsigned i = 0; i < h->nb_exts; i++) {
        be32_put(buf + off, h->exts[i].type);
        be32_put(buf + off + 4, h->exts[i].len);
        memcpy(buf + off + 8, h->exts[i].data, h->exts[i].len);
        off += 8 + (((size_t)h->exts[i].len + 7) & ~(size_t)7);
    }
    off += 8;                           /* END marker: zeros */
    h->ext_end = (uint32_t)off;

    if (h->backing_file) {
        size_t n = strlen(h->backing_file);
        memcpy(buf + off, h->backing_file, n);
        h->backing_file_offset = off;
        h->backing_file_size = (uint32_t)n;
        off += n;
    } else {
        h->backing_file_offset = 0;
        h->backing_file_size = 0;
    }
    be64_put(buf + 8, h->backing_file_offset);
    be32_put(buf + 16, h->backing_file_size);
    return (int)off;
}
