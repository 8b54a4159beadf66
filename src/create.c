/*
 * create — new qcow2 images.
 */
#include "create.h"

#include "backing.h"
#include "header.h"
#include "image.h"
#include "io.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Our feature-name table, so that older readers can name what they lack. */
static const struct { uint8_t type, bit; const char *name; } features[] = {
    { 0, 0, "dirty bit" }, { 0, 1, "corrupt bit" }, { 0, 2, "external data file" },
    { 0, 3, "compression type" }, { 0, 4, "extended L2 entries" },
    { 1, 0, "lazy refcounts" }, { 2, 0, "bitmaps" }, { 2, 1, "raw external data" },
};

static bool cluster_bits_valid(unsigned bits)
{
    return bits >= QCOW2_MIN_CLUSTER_BITS && bits <= QCOW2_MAX_CLUSTER_BITS;
}

int create_cluster_bits(uint64_t bytes, unsigned *bits)
{
    unsigned shift;

    if (bytes == 0 || (bytes & (bytes - 1)))
        return -EINVAL;                 /* not a power of two */
    shift = (unsigned)__builtin_ctzll(bytes);
    if (!cluster_bits_valid(shift))
        return -EINVAL;
    *bits = shift;
    return 0;
}

static int backing_info(const char *path, const struct create_options *o,
                        uint64_t *size, const char **format)
{
    struct image_options io_opts = { .read_only = true, .trace_fd = -1,
                                     .backing = { BACKING_ALLOW, NULL } };
    enum backing_format fmt;
    struct image *img;
    struct io *bio;
    char *bpath;
    int ret;

    ret = backing_resolve(path, o->backing_file, "backing file",
                          &io_opts.backing, &bpath);
    if (ret < 0)
        return ret;
    ret = io_open_file(bpath, false, &bio);
    if (ret < 0) {
        log_error("cannot open backing file %s: %s", bpath, strerror(-ret));
        goto out;
    }
    ret = backing_format(bio, bpath, o->backing_format, &fmt);
    io_close(bio);
    if (ret < 0)
        goto out;
    *format = fmt == BACKING_FORMAT_QCOW2 ? "qcow2" : "raw";
    if (fmt == BACKING_FORMAT_QCOW2) {
        ret = image_open(bpath, &io_opts, &img);
        if (ret < 0)
            goto out;
        *size = image_size(img);
        image_close(img);
    } else {
        ret = io_open_file(bpath, false, &bio);
        if (ret == 0) {
            ret = io_get_size(bio, size);
            io_close(bio);
        }
    }
out:
    free(bpath);
    return ret;
}

int create_image(const char *path, const struct create_options *o)
{
    unsigned cb = o->cluster_bits ? o->cluster_bits : 16;
    uint64_t cs, size = o->size, l2_entries, l1_size, l1_clusters;
    uint64_t block_entries, nb_blocks = 1, rt_clusters = 1, total;
    struct qcow2_header h = { 0 };
    struct header_ext exts[2];
    const char *format = NULL;
    uint8_t *buf = NULL;
    struct io *io = NULL;
    int fd, ret;

    if (!cluster_bits_valid(cb)) {
        log_error("cluster size must be a power of two between 512 and 2M");
        return -EINVAL;
    }
    cs = 1ull << cb;
    if (o->backing_file) {
        uint64_t bsize = 0;
        if (strlen(o->backing_file) > QCOW2_MAX_BACKING_NAME) {
            log_error("backing file name longer than %u bytes", QCOW2_MAX_BACKING_NAME);
            return -EINVAL;
        }
        ret = backing_info(path, o, &bsize, &format);
        if (ret < 0)
            return ret;
        if (!size)
            size = bsize;
    }
    if (size == 0 || size % 512) {
        log_error("image size %llu: must be a non-zero multiple of 512 bytes",
                  (unsigned long long)size);
        return -EINVAL;
    }
    l2_entries = cs / 8;
    l1_size = ((size + cs - 1) / cs + l2_entries - 1) / l2_entries;
    if (l1_size * 8 > HEADER_MAX_L1_BYTES) {
        log_error("image size %llu is too large for %llu-byte clusters",
                  (unsigned long long)size, (unsigned long long)cs);
        return -EINVAL;
    }
    l1_clusters = (l1_size * 8 + cs - 1) / cs;

    /* header, refcount table, L1 table, refcount blocks: the blocks must
     * cover every cluster including themselves. */
    block_entries = cs * 8 / 16;
    for (;;) {
        total = 1 + rt_clusters + l1_clusters + nb_blocks;
        uint64_t need_blocks = (total + block_entries - 1) / block_entries;
        uint64_t need_rt = (need_blocks * 8 + cs - 1) / cs;
        if (need_blocks == nb_blocks && need_rt == rt_clusters)
            break;
        nb_blocks = need_blocks;
        rt_clusters = need_rt;
    }

    h.version = 3;
    h.cluster_bits = cb;
    h.size = size;
    h.l1_size = (uint32_t)l1_size;
    h.refcount_table_offset = cs;
    h.refcount_table_clusters = (uint32_t)rt_clusters;
    h.l1_table_offset = l1_size ? (1 + rt_clusters) * cs : 0;
    h.refcount_order = 4;
    h.header_length = QCOW2_V3_HEADER_LEN;
    if (o->lazy_refcounts)
        h.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS;
    h.backing_file = (char *)o->backing_file;

    buf = calloc(1, cs > 4096 ? cs : 4096);
    uint8_t *ftable = calloc(sizeof(features) / sizeof(features[0]), 48);
    if (!buf || !ftable) {
        free(buf);
        free(ftable);
        return -ENOMEM;
    }
    for (size_t i = 0; i < sizeof(features) / sizeof(features[0]); i++) {
        ftable[48 * i] = features[i].type;
        ftable[48 * i + 1] = features[i].bit;
        strncpy((char *)ftable + 48 * i + 2, features[i].name, 46);
    }
    h.nb_exts = 0;
    if (format) {
        exts[h.nb_exts].type = QCOW2_EXT_BACKING_FORMAT;
        exts[h.nb_exts].len = (uint32_t)strlen(format);
        exts[h.nb_exts].data = (uint8_t *)format;
        h.nb_exts++;
    }
    exts[h.nb_exts].type = QCOW2_EXT_FEATURE_TABLE;
    exts[h.nb_exts].len = (uint32_t)(48 * (sizeof(features) / sizeof(features[0])));
    exts[h.nb_exts].data = ftable;
    h.nb_exts++;
    h.exts = exts;
    ret = header_encode(&h, buf, cs);
    free(ftable);
    if (ret < 0) {
        log_error("the header with its backing file name does not fit in one "
                  "%llu-byte cluster", (unsigned long long)cs);
        free(buf);
        return -EINVAL;
    }

    fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        ret = -errno;
        log_error("cannot create %s: %s", path, strerror(errno));
        free(buf);
        return ret;
    }
    close(fd);
    ret = io_open_file(path, true, &io);
    if (ret < 0)
        goto fail;
    ret = io_pwrite(io, buf, cs, 0);
    if (ret < 0)
        goto fail;

    /* Refcount table: block i at cluster 1 + rt + l1 + i. */
    free(buf);
    buf = calloc(rt_clusters, cs);
    if (!buf) {
        ret = -ENOMEM;
        goto fail;
    }
    for (uint64_t i = 0; i < nb_blocks; i++)
        be64_put(buf + 8 * i, (1 + rt_clusters + l1_clusters + i) * cs);
    ret = io_pwrite(io, buf, rt_clusters * cs, cs);
    if (ret < 0)
        goto fail;

    /* Refcount blocks: every cluster laid out above has refcount 1. */
    free(buf);
    buf = calloc(1, cs);
    if (!buf) {
        ret = -ENOMEM;
        goto fail;
    }
    for (uint64_t b = 0; b < nb_blocks; b++) {
        memset(buf, 0, cs);
        for (uint64_t i = 0; i < block_entries && b * block_entries + i < total; i++)
            be16_put(buf + 2 * i, 1);
        ret = io_pwrite(io, buf, cs, (1 + rt_clusters + l1_clusters + b) * cs);
        if (ret < 0)
            goto fail;
    }
    /* The L1 table is all zeros: make the file cover it. */
    ret = io_truncate(io, total * cs);
    if (ret == 0)
        ret = io_flush(io);
    if (ret < 0)
        goto fail;
    io_close(io);
    free(buf);
    return 0;

fail:
    log_error("creating %s failed: %s", path, strerror(-ret));
    io_close(io);
    free(buf);
    unlink(path);
    return ret;
}
