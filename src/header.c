/*
 * header — qcow2 header and header-extension decoding, validation, encoding,
 * and the in-place writes of single header fields.
 * Every check names the field, its byte offset in the header and its value,
 * so that a user handed a broken image learns exactly what is wrong.
 */
#include "header.h"

#include "io.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

_Static_assert(QCOW2_V2_HEADER_LEN == QCOW2_HDR_INCOMPATIBLE_FEATURES &&
               QCOW2_V3_MIN_HEADER_LEN == QCOW2_HDR_COMPRESSION_TYPE &&
               QCOW2_V3_HEADER_LEN == QCOW2_HDR_EXTRA_FIELDS,
               "header lengths follow the field layout");

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

/*
 * Decode the payload of one extension of a type we know (at header offset
 * @off, @len bytes at @data) into h; other types are only kept.
 * Returns: 0, -EINVAL (invalid payload, message in @err), -ENOMEM.
 */
static int decode_extension_payload(uint32_t type, const uint8_t *data, uint32_t len,
                                    size_t off, struct qcow2_header *h,
                                    char *err, size_t err_len)
{
    switch (type) {
    case QCOW2_EXT_BACKING_FORMAT:
        if (len == 0 || len > 255 || has_nul(data, len))
            return fail(err, err_len, -EINVAL,
                        "backing format extension at offset %zu: invalid "
                        "name of length %u", off, len);
        h->backing_format = dup_string(data, len);
        return h->backing_format ? 0 : -ENOMEM;
    case QCOW2_EXT_DATA_FILE:
        if (len == 0 || len > HEADER_MAX_EXT_NAME || has_nul(data, len))
            return fail(err, err_len, -EINVAL,
                        "external data file name extension at offset %zu: "
                        "invalid name of length %u", off, len);
        h->data_file = dup_string(data, len);
        return h->data_file ? 0 : -ENOMEM;
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
        return 0;
    case QCOW2_EXT_BITMAPS:
        if (len < 24)
            return fail(err, err_len, -EINVAL,
                        "bitmaps extension at offset %zu: length %u is "
                        "shorter than 24", off, len);
        return 0;
    default:
        return 0;
    }
}

/* Append a copy of one extension to h->exts (capacity *cap).
 * Returns: 0 or -ENOMEM. */
static int keep_extension(struct qcow2_header *h, unsigned *cap, uint32_t type,
                          const uint8_t *data, uint32_t len)
{
    struct header_ext *e;

    if (h->nb_exts == *cap) {
        unsigned ncap = *cap ? *cap * 2 : 8;
        struct header_ext *n = realloc(h->exts, ncap * sizeof(*n));
        if (!n)
            return -ENOMEM;
        h->exts = n;
        *cap = ncap;
    }
    e = &h->exts[h->nb_exts];
    e->type = type;
    e->len = len;
    e->data = malloc(len ? len : 1);
    if (!e->data)
        return -ENOMEM;
    memcpy(e->data, data, len);
    h->nb_exts++;
    return 0;
}

/*
 * Walk the extensions from the end of the header fields to the END marker
 * or @area_end, decoding the known ones and keeping a copy of all.
 * On exit: h->exts, h->ext_end and the decoded fields are set (even on
 * failure, what was decoded is owned by h).
 * Returns: 0, -EINVAL (message in @err), -ENOMEM.
 */
static int decode_extensions(const uint8_t *buf, size_t area_end,
                             struct qcow2_header *h, char *err, size_t err_len)
{
    size_t off = h->version == 2 ? QCOW2_V2_HEADER_LEN : h->header_length;
    unsigned cap = 0;
    uint32_t seen_mask = 0;

    for (;;) {
        uint32_t type, len;
        size_t padded;
        int idx = -1, ret;

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

        ret = decode_extension_payload(type, buf + off + 8, len, off, h, err, err_len);
        if (ret == 0)
            ret = keep_extension(h, &cap, type, buf + off + 8, len);
        if (ret < 0)
            return ret;
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

/*
 * header_decode in steps, in the order a broken image is judged (the first
 * failing check is the one reported).  Each step:
 * On entry: h holds what the steps before it decoded.
 * On exit:  on success it has filled its part of h; on failure @err holds
 *           the message, and whatever h owns is freed by header_decode.
 * Returns:  0, -EINVAL, -ENOTSUP or -ENOMEM.
 */

/* Step 1: the fixed fields of versions 2 and 3, and their ranges. */
static int decode_fixed_fields(const uint8_t *buf, size_t buf_len,
                               struct qcow2_header *h, char *err, size_t err_len)
{
    if (buf_len < QCOW2_V2_HEADER_LEN)
        return fail(err, err_len, -EINVAL,
                    "file is %zu bytes, too short for a qcow2 header", buf_len);
    if (be32_get(buf + QCOW2_HDR_MAGIC) != QCOW2_MAGIC)
        return fail(err, err_len, -EINVAL,
                    "not a qcow2 image: magic (offset 0) is 0x%08x, "
                    "expected 0x%08x (\"QFI\\xfb\")", be32_get(buf + QCOW2_HDR_MAGIC),
                    QCOW2_MAGIC);

    h->version = be32_get(buf + QCOW2_HDR_VERSION);
    h->backing_file_offset = be64_get(buf + QCOW2_HDR_BACKING_FILE_OFFSET);
    h->backing_file_size = be32_get(buf + QCOW2_HDR_BACKING_FILE_SIZE);
    h->cluster_bits = be32_get(buf + QCOW2_HDR_CLUSTER_BITS);
    h->size = be64_get(buf + QCOW2_HDR_SIZE);
    h->crypt_method = be32_get(buf + QCOW2_HDR_CRYPT_METHOD);
    h->l1_size = be32_get(buf + QCOW2_HDR_L1_SIZE);
    h->l1_table_offset = be64_get(buf + QCOW2_HDR_L1_TABLE_OFFSET);
    h->refcount_table_offset = be64_get(buf + QCOW2_HDR_REFCOUNT_TABLE_OFFSET);
    h->refcount_table_clusters = be32_get(buf + QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS);
    h->nb_snapshots = be32_get(buf + QCOW2_HDR_NB_SNAPSHOTS);
    h->snapshots_offset = be64_get(buf + QCOW2_HDR_SNAPSHOTS_OFFSET);

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
        h->incompatible_features = be64_get(buf + QCOW2_HDR_INCOMPATIBLE_FEATURES);
        h->compatible_features = be64_get(buf + QCOW2_HDR_COMPATIBLE_FEATURES);
        h->autoclear_features = be64_get(buf + QCOW2_HDR_AUTOCLEAR_FEATURES);
        h->refcount_order = be32_get(buf + QCOW2_HDR_REFCOUNT_ORDER);
        h->header_length = be32_get(buf + QCOW2_HDR_HEADER_LENGTH);
    }

    if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        h->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
        return fail(err, err_len, -EINVAL,
                    "cluster_bits (offset 20) is %u, must be between %u and %u",
                    h->cluster_bits, QCOW2_MIN_CLUSTER_BITS, QCOW2_MAX_CLUSTER_BITS);
    return 0;
}

/* Step 2 (version 3): header_length, and the fields it covers past the ones
 * every version 3 header has: compression_type, and unknown newer fields
 * (kept verbatim for a header rewrite).  Then refcount_order. */
static int decode_header_length(const uint8_t *buf, size_t buf_len,
                                struct qcow2_header *h, char *err, size_t err_len)
{
    uint64_t cluster_size = 1ull << h->cluster_bits;

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
        if (h->header_length > QCOW2_HDR_COMPRESSION_TYPE)
            h->compression_type = buf[QCOW2_HDR_COMPRESSION_TYPE];
        if (h->header_length > QCOW2_HDR_EXTRA_FIELDS) {
            h->extra_fields_len = h->header_length - QCOW2_HDR_EXTRA_FIELDS;
            h->extra_fields = malloc(h->extra_fields_len);
            if (!h->extra_fields)
                return -ENOMEM;
            memcpy(h->extra_fields, buf + QCOW2_HDR_EXTRA_FIELDS, h->extra_fields_len);
        }
    }

    if (h->refcount_order > 6)
        return fail(err, err_len, -EINVAL,
                    "refcount_order (offset 96) is %u, must be at most 6",
                    h->refcount_order);
    return 0;
}

/* Step 3: what the image demands of a reader: incompatible features we
 * know, no encryption, a compression type that agrees with its feature
 * bit, clusters large enough for extended L2 entries. */
static int check_features(const uint8_t *buf, size_t buf_len,
                          struct qcow2_header *h, char *err, size_t err_len)
{
    uint64_t cluster_size = 1ull << h->cluster_bits;

    if (h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN)
        return fail_unknown_incompat(buf, buf_len, cluster_size, h, err, err_len);

    if (h->crypt_method != 0) {
        if (h->crypt_method == 1 || h->crypt_method == 2)
            return fail(err, err_len, -ENOTSUP,
                        "encrypted images (crypt_method %u, %s, at offset 32) "
                        "are not supported", h->crypt_method,
                        h->crypt_method == 1 ? "AES" : "LUKS");
        return fail(err, err_len, -EINVAL,
                    "crypt_method (offset 32) is %u, must be 0, 1 or 2",
                    h->crypt_method);
    }

    if (h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION) {
        if (h->header_length <= QCOW2_HDR_COMPRESSION_TYPE || h->compression_type == 0)
            return fail(err, err_len, -EINVAL,
                        "compression type bit (incompatible_features bit 3) is "
                        "set but compression_type (offset 104) is %s",
                        h->header_length <= QCOW2_HDR_COMPRESSION_TYPE ? "absent"
                                                                        : "0 (zlib)");
    } else if (h->compression_type != 0) {
        return fail(err, err_len, -EINVAL,
                    "compression_type (offset 104) is %u but the compression "
                    "type bit (incompatible_features bit 3) is clear",
                    h->compression_type);
    }
    if (h->compression_type > 1)
        return fail(err, err_len, -ENOTSUP,
                    "compression_type (offset 104) %u is not supported "
                    "(0 zlib, 1 zstd)", h->compression_type);

    if ((h->incompatible_features & QCOW2_INCOMPAT_EXTL2) && h->cluster_bits < 14)
        return fail(err, err_len, -EINVAL,
                    "extended L2 entries (incompatible_features bit 4) need "
                    "cluster_bits >= 14, but cluster_bits (offset 20) is %u",
                    h->cluster_bits);
    return 0;
}

/* Step 4a: the L1 table: size bound, the virtual size it must map, and its
 * placement inside the file. */
static int check_l1_table(const struct qcow2_header *h, uint64_t file_size,
                          char *err, size_t err_len)
{
    uint64_t cluster_size = 1ull << h->cluster_bits;
    uint64_t l2_entries, need_l1, max_vsize_clusters;

    l2_entries = cluster_size / ((h->incompatible_features & QCOW2_INCOMPAT_EXTL2) ? 16 : 8);
    if ((uint64_t)h->l1_size * 8 > HEADER_MAX_L1_BYTES)
        return fail(err, err_len, -EINVAL,
                    "l1_size (offset 36) is %u entries, more than the limit of "
                    "%u", h->l1_size, HEADER_MAX_L1_BYTES / 8);
    /* Virtual size cap: what a maximal L1 table can map, and below 2^61. */
    max_vsize_clusters = (uint64_t)(HEADER_MAX_L1_BYTES / 8) * l2_entries;
    if (h->size >> 61 || h->size / cluster_size > max_vsize_clusters)
        return fail(err, err_len, -EINVAL,
                    "size (offset 24) is %llu bytes, too large for cluster size "
                    "%llu", (unsigned long long)h->size,
                    (unsigned long long)cluster_size);
    need_l1 = ((h->size + cluster_size - 1) / cluster_size + l2_entries - 1) / l2_entries;
    if (h->l1_size < need_l1)
        return fail(err, err_len, -EINVAL,
                    "l1_size (offset 36) is %u, too small for the virtual size "
                    "%llu (needs %llu entries)", h->l1_size,
                    (unsigned long long)h->size, (unsigned long long)need_l1);
    if (h->l1_size == 0 && h->l1_table_offset == 0)
        return 0;
    if (h->l1_table_offset % cluster_size || h->l1_table_offset == 0)
        return fail(err, err_len, -EINVAL,
                    "l1_table_offset (offset 40) is 0x%llx, not a non-zero "
                    "multiple of the cluster size",
                    (unsigned long long)h->l1_table_offset);
    if (h->l1_table_offset > file_size ||
        (uint64_t)h->l1_size * 8 > file_size - h->l1_table_offset)
        return fail(err, err_len, -EINVAL,
                    "l1_table_offset (offset 40) 0x%llx with l1_size %u "
                    "lies past the end of the file (%llu bytes)",
                    (unsigned long long)h->l1_table_offset, h->l1_size,
                    (unsigned long long)file_size);
    return 0;
}

/* Step 4b: the refcount table: alignment, size bound, placement. */
static int check_refcount_table(const struct qcow2_header *h, uint64_t file_size,
                                char *err, size_t err_len)
{
    uint64_t cluster_size = 1ull << h->cluster_bits;

    if (h->refcount_table_offset == 0 || h->refcount_table_offset % cluster_size)
        return fail(err, err_len, -EINVAL,
                    "refcount_table_offset (offset 48) is 0x%llx, not a non-zero "
                    "multiple of the cluster size",
                    (unsigned long long)h->refcount_table_offset);
    if (h->refcount_table_clusters == 0 ||
        (uint64_t)h->refcount_table_clusters * cluster_size > HEADER_MAX_REFTABLE_BYTES)
        return fail(err, err_len, -EINVAL,
                    "refcount_table_clusters (offset 56) is %u: must be between "
                    "1 and %llu", h->refcount_table_clusters,
                    (unsigned long long)(HEADER_MAX_REFTABLE_BYTES / cluster_size));
    /* The last refcount-table cluster may be only partly written. */
    if (h->refcount_table_offset > file_size ||
        (uint64_t)h->refcount_table_clusters * cluster_size >
            file_size - h->refcount_table_offset + cluster_size)
        return fail(err, err_len, -EINVAL,
                    "refcount_table_offset (offset 48) 0x%llx with %u clusters "
                    "lies past the end of the file (%llu bytes)",
                    (unsigned long long)h->refcount_table_offset,
                    h->refcount_table_clusters, (unsigned long long)file_size);
    return 0;
}

/* Step 4c: the snapshot table's count and placement (its entries are
 * parsed by the snapshot code). */
static int check_snapshot_table(const struct qcow2_header *h, uint64_t file_size,
                                char *err, size_t err_len)
{
    uint64_t cluster_size = 1ull << h->cluster_bits;

    if (h->nb_snapshots > HEADER_MAX_SNAPSHOTS)
        return fail(err, err_len, -EINVAL,
                    "nb_snapshots (offset 60) is %u, more than the limit of %u",
                    h->nb_snapshots, HEADER_MAX_SNAPSHOTS);
    /* Even without snapshots the offset must be one (as QEMU demands). */
    if (h->snapshots_offset % cluster_size || h->snapshots_offset > INT64_MAX ||
        (h->nb_snapshots &&
         (h->snapshots_offset == 0 || h->snapshots_offset >= file_size)))
        return fail(err, err_len, -EINVAL,
                    "snapshots_offset (offset 64) is 0x%llx: not cluster "
                    "aligned or outside the file (%llu bytes)",
                    (unsigned long long)h->snapshots_offset,
                    (unsigned long long)file_size);
    return 0;
}

/* Step 4: the tables the header points at, each checked against the file. */
static int check_tables(const struct qcow2_header *h, uint64_t file_size,
                        char *err, size_t err_len)
{
    int ret = check_l1_table(h, file_size, err, err_len);

    if (ret == 0)
        ret = check_refcount_table(h, file_size, err, err_len);
    if (ret == 0)
        ret = check_snapshot_table(h, file_size, err, err_len);
    return ret;
}

/* Step 5: the backing file name: inside the first cluster, after the fixed
 * fields, at most 1023 bytes, no NUL. */
static int decode_backing_name(const uint8_t *buf, size_t buf_len,
                               struct qcow2_header *h, char *err, size_t err_len)
{
    uint64_t cluster_size = 1ull << h->cluster_bits;

    if (!h->backing_file_offset)
        return 0;
    if (h->backing_file_size == 0 || h->backing_file_size > QCOW2_MAX_BACKING_NAME)
        return fail(err, err_len, -EINVAL,
                    "backing_file_size (offset 16) is %u, must be between 1 "
                    "and %u", h->backing_file_size, QCOW2_MAX_BACKING_NAME);
    if (h->backing_file_offset < h->header_length ||
        h->backing_file_offset > cluster_size ||
        h->backing_file_size > cluster_size - h->backing_file_offset ||
        h->backing_file_offset + h->backing_file_size > buf_len)
        return fail(err, err_len, -EINVAL,
                    "backing_file_offset (offset 8) 0x%llx with "
                    "backing_file_size %u is not inside the first cluster",
                    (unsigned long long)h->backing_file_offset,
                    h->backing_file_size);
    if (has_nul(buf + h->backing_file_offset, h->backing_file_size))
        return fail(err, err_len, -EINVAL,
                    "backing file name at offset 0x%llx contains a NUL byte",
                    (unsigned long long)h->backing_file_offset);
    h->backing_file = dup_string(buf + h->backing_file_offset, h->backing_file_size);
    return h->backing_file ? 0 : -ENOMEM;
}

/* Step 6: the extensions, which end where the backing name starts, or at
 * the end of the first cluster. */
static int decode_extension_area(const uint8_t *buf, size_t buf_len,
                                 struct qcow2_header *h, char *err, size_t err_len)
{
    size_t area_end = h->backing_file_offset ? (size_t)h->backing_file_offset
                                             : (size_t)1 << h->cluster_bits;

    if (area_end > buf_len)
        area_end = buf_len;
    return decode_extensions(buf, area_end, h, err, err_len);
}

/* Step 7: the external data file's raw flag, which needs the data file bit
 * and no backing file. */
static int check_data_file(struct qcow2_header *h, char *err, size_t err_len)
{
    if (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
        if (h->backing_file && (h->autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW))
            return fail(err, err_len, -EINVAL,
                        "raw external data file (autoclear bit 1) cannot be "
                        "combined with a backing file");
    } else if (h->autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW) {
        /* Meaningless without a data file; autoclear bits may simply be
         * dropped, which is what a writer does with it. */
        h->autoclear_features &= ~QCOW2_AUTOCLEAR_DATA_RAW;
    }
    return 0;
}

int header_decode(const uint8_t *buf, size_t buf_len, uint64_t file_size,
                  struct qcow2_header *h, char *err, size_t err_len)
{
    int ret;

    memset(h, 0, sizeof(*h));
    ret = decode_fixed_fields(buf, buf_len, h, err, err_len);
    if (ret == 0)
        ret = decode_header_length(buf, buf_len, h, err, err_len);
    if (ret == 0)
        ret = check_features(buf, buf_len, h, err, err_len);
    if (ret == 0)
        ret = check_tables(h, file_size, err, err_len);
    if (ret == 0)
        ret = decode_backing_name(buf, buf_len, h, err, err_len);
    if (ret == 0)
        ret = decode_extension_area(buf, buf_len, h, err, err_len);
    if (ret == 0)
        ret = check_data_file(h, err, err_len);
    if (ret < 0)
        header_free(h);
    return ret;
}

int header_read(struct io *io, struct qcow2_header *h, char *err, size_t err_len)
{
    uint64_t file_size;
    size_t len;
    uint8_t *buf;
    int ret;

    if (err && err_len)
        err[0] = '\0';
    memset(h, 0, sizeof(*h));
    ret = io_get_size(io, &file_size);
    if (ret < 0)
        return ret;
    /* The header and its extensions live in the first cluster. */
    len = file_size < (1u << QCOW2_MAX_CLUSTER_BITS) ? (size_t)file_size
                                                     : (1u << QCOW2_MAX_CLUSTER_BITS);
    buf = malloc(len ? len : 1);
    if (!buf)
        return -ENOMEM;
    ret = io_pread(io, buf, len, 0);
    if (ret == 0)
        ret = header_decode(buf, len, file_size, h, err, err_len);
    free(buf);
    return ret;
}

/* ---- in-place field writes ------------------------------------------------- */

/* One 64-bit field, in one pwrite. */
static int write_u64_field(struct io *io, enum qcow2_header_offset field, uint64_t v)
{
    uint8_t b[8];

    be64_put(b, v);
    return io_pwrite(io, b, sizeof(b), field);
}

int header_write_size(struct io *io, uint64_t size)
{
    return write_u64_field(io, QCOW2_HDR_SIZE, size);
}

int header_write_l1_table(struct io *io, uint32_t l1_size, uint64_t l1_offset)
{
    uint8_t b[12];

    _Static_assert(QCOW2_HDR_L1_TABLE_OFFSET == QCOW2_HDR_L1_SIZE + 4,
                   "l1_size and l1_table_offset are adjacent");
    be32_put(b, l1_size);
    be64_put(b + 4, l1_offset);
    return io_pwrite(io, b, sizeof(b), QCOW2_HDR_L1_SIZE);
}

int header_write_refcount_table(struct io *io, uint64_t offset, uint32_t clusters)
{
    uint8_t b[12];

    _Static_assert(QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS == QCOW2_HDR_REFCOUNT_TABLE_OFFSET + 8,
                   "refcount_table_offset and _clusters are adjacent");
    be64_put(b, offset);
    be32_put(b + 8, clusters);
    return io_pwrite(io, b, sizeof(b), QCOW2_HDR_REFCOUNT_TABLE_OFFSET);
}

int header_write_incompatible(struct io *io, uint64_t bits)
{
    return write_u64_field(io, QCOW2_HDR_INCOMPATIBLE_FEATURES, bits);
}

int header_write_autoclear(struct io *io, uint64_t bits)
{
    return write_u64_field(io, QCOW2_HDR_AUTOCLEAR_FEATURES, bits);
}

int header_write_backing_file(struct io *io, uint64_t offset, uint32_t size)
{
    uint8_t b[12];

    _Static_assert(QCOW2_HDR_BACKING_FILE_SIZE == QCOW2_HDR_BACKING_FILE_OFFSET + 8,
                   "backing_file_offset and _size are adjacent");
    be64_put(b, offset);
    be32_put(b + 8, size);
    return io_pwrite(io, b, sizeof(b), QCOW2_HDR_BACKING_FILE_OFFSET);
}

/* Remove the extensions of @type from h->exts (the list only). */
static void drop_exts_of_type(struct qcow2_header *h, uint32_t type)
{
    unsigned kept = 0;

    for (unsigned i = 0; i < h->nb_exts; i++) {
        if (h->exts[i].type == type)
            free(h->exts[i].data);
        else
            h->exts[kept++] = h->exts[i];
    }
    h->nb_exts = kept;
}

int header_remove_extension(struct io *io, struct qcow2_header *h, uint32_t type)
{
    struct qcow2_header disk;
    size_t start, off, area;
    bool found = false;
    uint8_t *buf = NULL;
    int ret;

    ret = header_read(io, &disk, NULL, 0);
    if (ret < 0)
        return ret;
    start = disk.version == 2 ? QCOW2_V2_HEADER_LEN : disk.header_length;
    area = disk.ext_end > start ? disk.ext_end - start : 0;
    for (unsigned i = 0; i < disk.nb_exts; i++)
        found |= disk.exts[i].type == type;
    if (!found || area < 8)
        goto out;
    buf = calloc(1, area);
    if (!buf) {
        ret = -ENOMEM;
        goto out;
    }
    off = 0;
    for (unsigned i = 0; i < disk.nb_exts; i++) {
        const struct header_ext *e = &disk.exts[i];
        if (e->type == type)
            continue;
        /* Fewer bytes than were decoded from this same area: it fits. */
        be32_put(buf + off, e->type);
        be32_put(buf + off + 4, e->len);
        memcpy(buf + off + 8, e->data, e->len);
        off += 8 + (((size_t)e->len + 7) & ~(size_t)7);
    }
    /* buf[off..] stays zero: the END marker and the freed bytes. */
    ret = io_pwrite(io, buf, area, start);
out:
    if (ret == 0) {
        drop_exts_of_type(h, type);
        if (type == QCOW2_EXT_BACKING_FORMAT) {
            free(h->backing_format);
            h->backing_format = NULL;
        }
    }
    free(buf);
    header_free(&disk);
    return ret;
}

void header_forget_backing(struct qcow2_header *h)
{
    free(h->backing_file);
    h->backing_file = NULL;
    h->backing_file_offset = 0;
    h->backing_file_size = 0;
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
    be32_put(buf + QCOW2_HDR_MAGIC, QCOW2_MAGIC);
    be32_put(buf + QCOW2_HDR_VERSION, h->version);
    be32_put(buf + QCOW2_HDR_CLUSTER_BITS, h->cluster_bits);
    be64_put(buf + QCOW2_HDR_SIZE, h->size);
    be32_put(buf + QCOW2_HDR_CRYPT_METHOD, h->crypt_method);
    be32_put(buf + QCOW2_HDR_L1_SIZE, h->l1_size);
    be64_put(buf + QCOW2_HDR_L1_TABLE_OFFSET, h->l1_table_offset);
    be64_put(buf + QCOW2_HDR_REFCOUNT_TABLE_OFFSET, h->refcount_table_offset);
    be32_put(buf + QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS, h->refcount_table_clusters);
    be32_put(buf + QCOW2_HDR_NB_SNAPSHOTS, h->nb_snapshots);
    be64_put(buf + QCOW2_HDR_SNAPSHOTS_OFFSET, h->snapshots_offset);
    if (h->version == 3) {
        be64_put(buf + QCOW2_HDR_INCOMPATIBLE_FEATURES, h->incompatible_features);
        be64_put(buf + QCOW2_HDR_COMPATIBLE_FEATURES, h->compatible_features);
        be64_put(buf + QCOW2_HDR_AUTOCLEAR_FEATURES, h->autoclear_features);
        be32_put(buf + QCOW2_HDR_REFCOUNT_ORDER, h->refcount_order);
        be32_put(buf + QCOW2_HDR_HEADER_LENGTH, h->header_length);
        if (h->header_length > QCOW2_HDR_COMPRESSION_TYPE)
            buf[QCOW2_HDR_COMPRESSION_TYPE] = h->compression_type;
        if (h->extra_fields_len)
            memcpy(buf + QCOW2_HDR_EXTRA_FIELDS, h->extra_fields, h->extra_fields_len);
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
    be64_put(buf + QCOW2_HDR_BACKING_FILE_OFFSET, h->backing_file_offset);
    be32_put(buf + QCOW2_HDR_BACKING_FILE_SIZE, h->backing_file_size);
    return (int)off;
}
