/*
 * header — the one owner of the on-disk qcow2 header: decode, validate and
 * encode it with its extensions, read it from the image, and rewrite single
 * fields in place.  Header bytes are turned from big endian into host values
 * only here, and every field is checked before any other module sees it; no
 * other module names a header byte offset.  No global state; the only I/O
 * (header_read, header_write_*) goes through io, the one layer below.
 */
#ifndef QCOW2FUSE_HEADER_H
#define QCOW2FUSE_HEADER_H

#include <stddef.h>
#include <stdint.h>

struct io;

#define QCOW2_MAGIC                 0x514649fbu     /* "QFI\xfb" */

/* Byte offsets of the header fields (qcow2.txt, "Header"), all big endian. */
enum qcow2_header_offset {
    QCOW2_HDR_MAGIC                   = 0,      /* u32 */
    QCOW2_HDR_VERSION                 = 4,      /* u32 */
    QCOW2_HDR_BACKING_FILE_OFFSET     = 8,      /* u64 */
    QCOW2_HDR_BACKING_FILE_SIZE       = 16,     /* u32 */
    QCOW2_HDR_CLUSTER_BITS            = 20,     /* u32 */
    QCOW2_HDR_SIZE                    = 24,     /* u64: virtual size */
    QCOW2_HDR_CRYPT_METHOD            = 32,     /* u32 */
    QCOW2_HDR_L1_SIZE                 = 36,     /* u32: entries */
    QCOW2_HDR_L1_TABLE_OFFSET         = 40,     /* u64 */
    QCOW2_HDR_REFCOUNT_TABLE_OFFSET   = 48,     /* u64 */
    QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS = 56,     /* u32 */
    QCOW2_HDR_NB_SNAPSHOTS            = 60,     /* u32 */
    QCOW2_HDR_SNAPSHOTS_OFFSET        = 64,     /* u64 */
    /* Version 3 only. */
    QCOW2_HDR_INCOMPATIBLE_FEATURES   = 72,     /* u64 */
    QCOW2_HDR_COMPATIBLE_FEATURES     = 80,     /* u64 */
    QCOW2_HDR_AUTOCLEAR_FEATURES      = 88,     /* u64 */
    QCOW2_HDR_REFCOUNT_ORDER          = 96,     /* u32 */
    QCOW2_HDR_HEADER_LENGTH           = 100,    /* u32 */
    QCOW2_HDR_COMPRESSION_TYPE        = 104,    /* u8, if header_length > 104;
                                                 * 105..111 padding */
    QCOW2_HDR_EXTRA_FIELDS            = 112,    /* fields newer than this code */
};

#define QCOW2_V2_HEADER_LEN         72u     /* = QCOW2_HDR_INCOMPATIBLE_FEATURES */
#define QCOW2_V3_MIN_HEADER_LEN     104u    /* = QCOW2_HDR_COMPRESSION_TYPE */
#define QCOW2_V3_HEADER_LEN         112u    /* every field this code knows */
#define QCOW2_MIN_CLUSTER_BITS      9u
#define QCOW2_MAX_CLUSTER_BITS      21u
#define QCOW2_MAX_BACKING_NAME      1023u

/* Incompatible feature bits */
#define QCOW2_INCOMPAT_DIRTY        (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT      (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE    (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION  (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2        (1ull << 4)
#define QCOW2_INCOMPAT_KNOWN        0x1full
/* Compatible feature bits */
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)
/* Autoclear feature bits */
#define QCOW2_AUTOCLEAR_BITMAPS     (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_RAW    (1ull << 1)

/* Header extension types */
#define QCOW2_EXT_END               0x00000000u
#define QCOW2_EXT_BACKING_FORMAT    0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE     0x6803f857u
#define QCOW2_EXT_BITMAPS           0x23852875u
#define QCOW2_EXT_CRYPTO            0x0537be77u
#define QCOW2_EXT_DATA_FILE         0x44415441u

/* Limits that keep memory bounded whatever the image claims. */
#define HEADER_MAX_L1_BYTES         (32u << 20)     /* as QEMU */
#define HEADER_MAX_REFTABLE_BYTES   (8u << 20)      /* as QEMU */
#define HEADER_MAX_SNAPSHOTS        65536u
#define HEADER_MAX_EXT_NAME         4096u

struct header_ext {
    uint32_t type;
    uint32_t len;
    uint8_t *data;              /* copy of the extension payload */
};

struct header_feature_name {
    uint8_t type;               /* 0 incompatible, 1 compatible, 2 autoclear */
    uint8_t bit;
    char name[47];              /* NUL-terminated */
};

struct qcow2_header {
    uint32_t version;
    uint64_t backing_file_offset;
    uint32_t backing_file_size;
    uint32_t cluster_bits;
    uint64_t size;
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint32_t refcount_order;
    uint32_t header_length;
    uint8_t compression_type;

    /* Header bytes 112..header_length we do not understand, kept verbatim. */
    uint8_t *extra_fields;
    uint32_t extra_fields_len;

    /* Decoded extensions (NULL when absent). */
    char *backing_file;         /* from backing_file_offset, NUL-terminated */
    char *backing_format;
    char *data_file;
    struct header_feature_name *feature_names;
    unsigned nb_feature_names;
    /* Every extension except END, in file order, including the ones decoded
     * above: a header rewrite reproduces them all. */
    struct header_ext *exts;
    unsigned nb_exts;
    /* Bytes the header + extensions occupy (end of the END marker). */
    uint32_t ext_end;
};

/*
 * Decode and validate the header held in @buf (the first @buf_len bytes of
 * the image, at least the first cluster or the whole file if shorter).
 * @file_size is the image file's size, used to check offsets.
 *
 * On entry: *h is uninitialised.
 * On exit:  on success *h is filled and owns its allocations (header_free);
 *           on failure *h holds nothing to free and @err (if not NULL)
 *           holds a message naming the field, its byte offset and value.
 * Returns:  0; -EINVAL for an invalid header; -ENOTSUP for a valid header
 *           using something we do not implement (encryption, unknown
 *           incompatible feature); -ENOMEM.
 */
int header_decode(const uint8_t *buf, size_t buf_len, uint64_t file_size,
                  struct qcow2_header *h, char *err, size_t err_len);

/*
 * Read the header of the image on @io and decode it (header_decode): the
 * first cluster, at most 2 MiB (the largest cluster), or the whole file if
 * it is shorter.
 * On entry: *h is uninitialised.
 * On exit:  as header_decode.  On failure @err (if not NULL) holds
 *           header_decode's message when the header was refused, and is
 *           the empty string when it could not be read (or on -ENOMEM).
 * Returns:  as header_decode, or the -errno of sizing or reading the file.
 */
int header_read(struct io *io, struct qcow2_header *h, char *err, size_t err_len);

/*
 * Rewrite fields of the header on @io in place.  Each is one io_pwrite of
 * exactly the bytes of its field(s), so a table switch (offset and size) is
 * one write that lands whole or not at all; none flushes: the caller orders
 * the write against its data and flushes.  Returns 0 or the -errno of the
 * write.
 */
/* size (8 bytes at 24). */
int header_write_size(struct io *io, uint64_t size);
/* l1_size and l1_table_offset together (12 bytes at 36). */
int header_write_l1_table(struct io *io, uint32_t l1_size, uint64_t l1_offset);
/* refcount_table_offset and refcount_table_clusters together (12 bytes at 48). */
int header_write_refcount_table(struct io *io, uint64_t offset, uint32_t clusters);
/* incompatible_features (8 bytes at 72; version 3).  On an open image only
 * through meta_update_incompatible(), which serialises changes of the bits. */
int header_write_incompatible(struct io *io, uint64_t bits);
/* autoclear_features (8 bytes at 88; version 3). */
int header_write_autoclear(struct io *io, uint64_t bits);
/* backing_file_offset and backing_file_size together (12 bytes at 8):
 * (0, 0) makes the image stand alone.  The name's bytes stay where they
 * were, unreferenced. */
int header_write_backing_file(struct io *io, uint64_t offset, uint32_t size);

/*
 * Rewrite the extension area of the header on @io without the extensions
 * of @type, in one io_pwrite from the first extension to the old end of
 * the area (the END marker moves up, the bytes it leaves are zeroed), and
 * drop them from @h (for QCOW2_EXT_BACKING_FORMAT also h->backing_format).
 * The area is read back from @io first, so a change another owner of an
 * extension wrote in place is kept.  No flush.
 * On entry: the header on @io has no backing file name (or it is outside
 *           the extension area: the area ends where the name starts).
 * Returns: 0 (also when there is no such extension: nothing is written),
 *          or -errno of the read or the write.
 */
int header_remove_extension(struct io *io, struct qcow2_header *h, uint32_t type);

/* Forget the backing file of @h in memory (name, format, offset, size),
 * after header_write_backing_file(io, 0, 0) made it so on disk. */
void header_forget_backing(struct qcow2_header *h);

/* Minimum bytes header_decode needs to learn the cluster size. */
#define HEADER_PROBE_LEN            QCOW2_V3_MIN_HEADER_LEN

/* Free what header_decode allocated; *h may then be decoded into again. */
void header_free(struct qcow2_header *h);

/*
 * Encode @h (fixed fields, kept unknown fields, every extension, the backing
 * file name after the extensions) into @buf of @buf_len bytes (one cluster).
 * The backing name is placed after the extensions and
 * h->backing_file_offset/size are updated to match.
 * Returns: bytes used, or -ENOSPC when it does not fit in @buf_len.
 */
int header_encode(struct qcow2_header *h, uint8_t *buf, size_t buf_len);

/* A name for incompatible feature @bit: from the image's feature-name table
 * when present, else our own table, else "unknown". */
const char *header_feature_name(const struct qcow2_header *h, unsigned type,
                                unsigned bit);

/* Big-endian helpers, shared by every module that decodes on-disk tables. */
static inline uint16_t be16_get(const void *p)
{
    const uint8_t *b = p;
    return (uint16_t)(b[0] << 8 | b[1]);
}
static inline uint32_t be32_get(const void *p)
{
    const uint8_t *b = p;
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}
static inline uint64_t be64_get(const void *p)
{
    const uint8_t *b = p;
    return (uint64_t)be32_get(b) << 32 | be32_get(b + 4);
}
static inline void be16_put(void *p, uint16_t v)
{
    uint8_t *b = p;
    b[0] = (uint8_t)(v >> 8);
    b[1] = (uint8_t)v;
}
static inline void be32_put(void *p, uint32_t v)
{
    uint8_t *b = p;
    b[0] = (uint8_t)(v >> 24);
    b[1] = (uint8_t)(v >> 16);
    b[2] = (uint8_t)(v >> 8);
    b[3] = (uint8_t)v;
}
static inline void be64_put(void *p, uint64_t v)
{
    be32_put(p, (uint32_t)(v >> 32));
    be32_put((uint8_t *)p + 4, (uint32_t)v);
}

#endif
