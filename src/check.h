/*
 * check — consistency checking of an image's reference counts, and their
 * repair: walk every structure that references host clusters (header, L1
 * and L2 tables of the active state and of every snapshot, data and
 * compressed clusters, snapshot table, refcount structures, bitmaps),
 * count the references in memory, and compare with the on-disk refcounts.
 * Used by qcow2check and by the daemon when it opens a dirty lazy-refcounts
 * image for writing.
 *
 * Locking rule: the image must not be in use by anyone else (run before
 * serving requests).
 */
#ifndef QCOW2FUSE_CHECK_H
#define QCOW2FUSE_CHECK_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

struct meta;
struct qcow2_header;

/* Finding codes: each names one kind of problem (see check_code_name). */
enum check_code {
    CHECK_LEAK,                 /* refcount > references */
    CHECK_REFCOUNT_TOO_LOW,     /* refcount < references (corruption) */
    CHECK_OFFSET_INVALID,       /* misaligned or beyond the end of the file */
    CHECK_RESERVED_BITS,        /* reserved bits set in a table entry */
    CHECK_COPIED_WRONG,         /* OFLAG_COPIED disagrees with refcount == 1 */
    CHECK_TABLE_INVALID,        /* a table that cannot be parsed */
    CHECK_NB_CODES
};

const char *check_code_name(enum check_code code);

struct check_report {
    uint64_t count[CHECK_NB_CODES];
    uint64_t corruptions;       /* every finding except leaks */
    uint64_t leaks;
    uint64_t clusters;          /* host clusters in the file */
    uint64_t allocated_clusters;/* guest clusters with data */
    uint64_t image_end;         /* one past the last referenced byte */
    FILE *log;                  /* one line per finding, or NULL */
};

struct check_refs;

/*
 * Count the references of every host cluster.  Problems found on the way
 * (invalid offsets, reserved bits) go into @rep.
 * Returns: 0 or -errno (-ENOMEM; -EIO when a table cannot be read).
 */
int check_count_refs(struct meta *m, const struct qcow2_header *h,
                     struct check_report *rep, struct check_refs **out);
void check_refs_free(struct check_refs *r);

/*
 * Compare the counted references with the refcounts on disk, adding leaks,
 * too-low refcounts and wrong COPIED flags to @rep.
 */
int check_compare(struct meta *m, const struct qcow2_header *h,
                  struct check_refs *r, struct check_report *rep);

/*
 * Replace the refcount structures by new ones built from @r, written past
 * the end of everything in use (possibly past the end of the file); then
 * point the header at them.  The old structures become free space.
 * On entry: @r counts the references of the image as it is (from
 * check_count_refs), nothing else uses the image.
 * On exit: h->refcount_table_offset/clusters describe the new table, and
 * m->file_end covers the new refcount blocks and table (it is raised,
 * never lowered), so that offsets into them validate.  @r covers them too,
 * each with one reference.
 * Returns: 0 or -errno (-ERANGE: a cluster has more references than the
 * refcount width can hold; -EFBIG: the table would be too large).
 */
int check_rebuild_refcounts(struct meta *m, struct qcow2_header *h,
                            struct check_refs *r);

/*
 * Lower every refcount that is higher than the counted references (leaks)
 * to the count.  Returns the number of clusters fixed, or -errno.
 */
long check_fix_leaks(struct meta *m, const struct qcow2_header *h,
                     struct check_refs *r);

/*
 * Set the COPIED flags in the active L1 and L2 tables to match refcount 1
 * exactly, according to @r.  Returns the number of entries fixed, or -errno.
 */
long check_fix_copied(struct meta *m, const struct qcow2_header *h,
                      struct check_refs *r);

#endif
