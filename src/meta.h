/*
 * meta — the geometry of one open qcow2 image, the overlap map of its
 * metadata clusters, its incompatible feature bits and its corruption path,
 * shared by the modules that interpret on-disk metadata (cluster, refcount,
 * check, image, qcow2check).  The geometry is fixed at open, except that
 * file_end only ever grows.  meta_corrupt() is the single way to raise the
 * corrupt flag: it logs once with the offending offsets, sets the corrupt
 * bit in the image header (on a writable version 3 image) and from then on
 * every write is refused.
 */
#ifndef QCOW2FUSE_META_H
#define QCOW2FUSE_META_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

struct io;

/* Kinds of metadata cluster, for the overlap check. */
enum meta_kind {
    META_KIND_NONE = 0,         /* guest data or free */
    META_KIND_HEADER,
    META_KIND_L1,
    META_KIND_L2,
    META_KIND_REFTABLE,
    META_KIND_REFBLOCK,
    META_KIND_SNAPSHOTS,        /* snapshot table and snapshot L1 tables */
    META_KIND_SNAPSHOT_L2,      /* an L2 table a snapshot's L1 names (it may
                                 * also be an active one: shared, never
                                 * written in place) */
    META_KIND_BITMAPS,          /* bitmap directory, tables and data */
};

struct meta_set;

struct meta {
    struct io *io;              /* the qcow2 file: all metadata lives here */
    struct io *data_io;         /* guest data: external data file, or io */
    unsigned cluster_bits;
    uint64_t cluster_size;
    unsigned l2_entry_bytes;    /* 8, or 16 with extended L2 entries */
    uint64_t l2_entries;        /* entries per L2 table */
    bool extended_l2;
    bool has_data_file;
    bool data_file_raw;
    bool v3;                    /* zero flag available */
    bool read_only;
    unsigned refcount_order;
    uint64_t virtual_size;
    /* Incompatible feature bits as on disk.  Change them only through
     * meta_update_incompatible() (or meta_corrupt()): a read that reports
     * corruption holds no metadata lock, so a plain read-modify-write, or
     * two header writes in either order, could lose the other's bit. */
    _Atomic uint64_t incompatible;
    pthread_mutex_t header_lock;    /* guards changes of incompatible and
                                     * their header writes */
    struct meta_set *set;       /* metadata clusters (writable images) */
    _Atomic uint64_t file_end;  /* bytes of the image file in use: every
                                 * valid offset lies below it */
    atomic_bool corrupt;
    atomic_flag corrupt_reported;
};

/* Offsets in L1/L2 entries and refcount-table entries: bits 9-55. */
#define META_OFFSET_MASK        0x00fffffffffffe00ull
#define META_L2_COPIED          (1ull << 63)
#define META_L2_COMPRESSED      (1ull << 62)
#define META_L2_ZERO            1ull
#define META_L1_RESERVED        0x7f000000000001ffull
#define META_L2_STD_RESERVED    0x3f000000000001feull
#define META_REFTABLE_RESERVED  0x1ffull

struct qcow2_header;

/* Fill @m's geometry from a decoded header; data_io starts as @io. */
void meta_init(struct meta *m, const struct qcow2_header *h, struct io *io,
               bool read_only);

/*
 * Report corrupt metadata: @what names the structure and offsets.
 * On exit: the image is marked corrupt (writes refused); the first call also
 * logs an error and, on a writable version 3 image, sets the corrupt bit on
 * disk (version 2 has no feature bits).
 * Returns -EIO, so callers can `return meta_corrupt(...)`.
 */
int meta_corrupt(struct meta *m, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/*
 * Set the incompatible feature bits @set and clear @clear, in memory and in
 * the header (header_write_incompatible), as one step against every other change of them
 * (meta_corrupt included), so the header always ends up holding the last
 * value.  No host flush: the caller flushes.
 * On entry: the image is writable and version 3.
 * Returns: 0, or -errno of the header write (the bits are then as before).
 */
int meta_update_incompatible(struct meta *m, uint64_t set, uint64_t clear);

/*
 * The overlap check.  meta_mark() records the clusters of [@offset, +@len)
 * as metadata of @kind (META_KIND_NONE forgets them).  meta_check_write()
 * is called before writing [@offset, +@len) as @kind: if any cluster there
 * is metadata of another kind, the image is marked corrupt (one report
 * naming both structures) and -EIO is returned.  Without a set (read-only
 * images) both do nothing.  Call with the metadata lock held.
 * An L2 table shared by the active L1 and a snapshot is recorded as
 * META_KIND_SNAPSHOT_L2 whichever is marked first: writing it as an active
 * L2 table is then refused too (a shared table is copied, never written).
 */
int meta_set_create(struct meta *m);
void meta_set_destroy(struct meta *m);
int meta_mark(struct meta *m, uint64_t offset, uint64_t len, enum meta_kind kind);
int meta_check_write(struct meta *m, uint64_t offset, uint64_t len, enum meta_kind kind);
const char *meta_kind_name(enum meta_kind kind);

/* The kind of metadata in the host cluster holding @offset: what a free of
 * that cluster would destroy (META_KIND_NONE without a set).  Call with the
 * metadata lock held. */
enum meta_kind meta_kind_at(const struct meta *m, uint64_t offset);

static inline bool meta_is_corrupt(const struct meta *m)
{
    return atomic_load(&m->corrupt);
}

#endif
