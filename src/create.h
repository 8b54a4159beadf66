/*
 * create — write a new, empty qcow2 version 3 image: header (with a
 * feature-name table and, for an overlay, the backing file name and
 * format), refcount table, refcount blocks and L1 table, laid out so that
 * qemu-img check finds it clean.
 */
#ifndef QCOW2FUSE_CREATE_H
#define QCOW2FUSE_CREATE_H

#include <stdbool.h>
#include <stdint.h>

struct create_options {
    uint64_t size;              /* virtual size; 0 with a backing file: its size */
    unsigned cluster_bits;      /* 0: 16 (64 KiB) */
    const char *backing_file;   /* as stored in the image; may be NULL */
    const char *backing_format; /* "qcow2" or "raw"; NULL: probed */
    bool lazy_refcounts;
};

/*
 * The one rule for cluster sizes: a power of two from
 * 2^QCOW2_MIN_CLUSTER_BITS (512 bytes) to 2^QCOW2_MAX_CLUSTER_BITS (2 MiB),
 * the range QEMU creates and header_decode accepts.
 * On exit: *bits is log2(@bytes) if @bytes follows the rule.
 * Returns: 0, or -EINVAL if it does not (not logged: the caller names the
 * option).
 */
int create_cluster_bits(uint64_t bytes, unsigned *bits);

/*
 * Create @path (which must not exist).  A relative backing name is taken
 * relative to @path's directory, as when the image is opened.
 * Returns: 0, -EEXIST, -EINVAL (bad size or cluster size; logged), -errno.
 */
int create_image(const char *path, const struct create_options *opts);

#endif
