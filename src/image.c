/*
 * image — opening an image and its chain, and the read path: each request is
 * split into runs by cluster_lookup() under the metadata lock, and each run
 * is served by one host I/O outside it.
 */
#include "image.h"

#include "backing.h"
#include "cache.h"
#include "cluster.h"
#include "compress.h"
#include "header.h"
#include "io.h"
#include "log.h"
#include "meta.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct image {
    char *path;
    bool is_raw;                /* a raw backing file: no translation */
    struct io *io;
    struct io *data_io;         /* external data file, owned; or NULL */
    struct meta meta;
    struct qcow2_header hdr;
    struct cluster *cl;
    struct image *backing;
    uint64_t size;
    enum compress_type compression;
    pthread_mutex_t lock;       /* metadata lock */
};

static void image_free(struct image *img)
{
    if (!img)
        return;
    if (img->backing)
        image_close(img->backing);
    cluster_close(img->cl);
    io_close(img->data_io);
    io_close(img->io);
    header_free(&img->hdr);
    pthread_mutex_destroy(&img->lock);
    free(img->path);
    free(img);
}

static int open_chain(const char *path, const struct image_options *opts,
                      bool writable, unsigned depth, struct image **out);

static int open_raw(const char *path, struct io *io, struct image **out)
{
    struct image *img = calloc(1, sizeof(*img));
    int ret;

    if (!img) {
        io_close(io);
        return -ENOMEM;
    }
    pthread_mutex_init(&img->lock, NULL);
    img->is_raw = true;
    img->io = io;
    img->path = strdup(path);
    ret = io_get_size(io, &img->size);
    if (ret < 0 || !img->path) {
        image_free(img);
        return ret < 0 ? ret : -ENOMEM;
    }
    *out = img;
    return 0;
}

static int open_backing(struct image *img, const struct image_options *opts,
                        unsigned depth)
{
    enum backing_format fmt;
    struct io *bio = NULL;
    char *bpath = NULL;
    int ret;

    if (depth + 1 >= IMAGE_MAX_CHAIN_DEPTH) {
        log_error("%s: backing chain deeper than %d images (a loop?)",
                  img->path, IMAGE_MAX_CHAIN_DEPTH);
        return -ELOOP;
    }
    ret = backing_resolve(img->path, img->hdr.backing_file, "backing file",
                          &opts->backing, &bpath);
    if (ret < 0)
        return ret;
    ret = io_open_file(bpath, false, &bio);
    if (ret < 0) {
        log_error("cannot open backing file %s of %s: %s", bpath, img->path,
                  strerror(-ret));
        goto out;
    }
    ret = backing_format(bio, bpath, img->hdr.backing_format, &fmt);
    if (ret < 0) {
        io_close(bio);
        goto out;
    }
    if (fmt == BACKING_FORMAT_RAW) {
        ret = open_raw(bpath, bio, &img->backing);
    } else {
        io_close(bio);
        ret = open_chain(bpath, opts, false, depth + 1, &img->backing);
    }
out:
    free(bpath);
    return ret;
}

static int open_data_file(struct image *img, const struct image_options *opts,
                          bool writable)
{
    char *dpath = NULL;
    int ret;

    if (!img->hdr.data_file) {
        log_error("%s: the external data file bit (incompatible bit 2) is set "
                  "but the image names no data file", img->path);
        return -EINVAL;
    }
    /* The data file is part of the image, not a backing file: under
     * backing=deny it is still allowed, but only as a regular file outside
     * /proc, /sys and /dev. */
    struct backing_options policy = opts->backing;
    if (policy.policy == BACKING_DENY)
        policy.policy = BACKING_DIR, policy.dir = "/";
    ret = backing_resolve(img->path, img->hdr.data_file, "external data file",
                          &policy, &dpath);
    if (ret < 0)
        return ret;
    ret = io_open_file(dpath, writable, &img->data_io);
    if (ret < 0)
        log_error("cannot open external data file %s of %s: %s", dpath,
                  img->path, strerror(-ret));
    free(dpath);
    return ret;
}

static uint64_t default_l2_cache(const struct image *img)
{
    uint64_t clusters = (img->size + img->meta.cluster_size - 1) >> img->meta.cluster_bits;
    uint64_t bytes = clusters * img->meta.l2_entry_bytes;

    return bytes < IMAGE_DEFAULT_L2_CACHE_MAX ? bytes : IMAGE_DEFAULT_L2_CACHE_MAX;
}

static int open_chain(const char *path, const struct image_options *opts,
                      bool writable, unsigned depth, struct image **out)
{
    struct image *img = calloc(1, sizeof(*img));
    uint8_t *buf = NULL;
    uint64_t file_size;
    size_t buf_len;
    char err[512];
    int ret;

    if (!img)
        return -ENOMEM;
    pthread_mutex_init(&img->lock, NULL);
    img->path = strdup(path);
    if (!img->path) {
        ret = -ENOMEM;
        goto fail;
    }
    ret = io_open_file(path, writable, &img->io);
    if (ret < 0) {
        log_error("cannot open %s%s: %s", path, writable ? " for writing" : "",
                  strerror(-ret));
        goto fail;
    }
    ret = io_get_size(img->io, &file_size);
    if (ret < 0)
        goto fail;

    /* The header and its extensions live in the first cluster, at most
     * 2 MiB: read that much (or the whole file if shorter). */
    buf_len = file_size < (1u << QCOW2_MAX_CLUSTER_BITS) ? (size_t)file_size
                                                         : (1u << QCOW2_MAX_CLUSTER_BITS);
    buf = malloc(buf_len ? buf_len : 1);
    if (!buf) {
        ret = -ENOMEM;
        goto fail;
    }
    ret = io_pread(img->io, buf, buf_len, 0);
    if (ret < 0)
        goto fail;
    ret = header_decode(buf, buf_len, file_size, &img->hdr, err, sizeof(err));
    if (ret < 0) {
        log_error("%s: %s", path, ret == -ENOMEM ? strerror(ENOMEM) : err);
        goto fail;
    }

    if (writable && (img->hdr.incompatible_features & QCOW2_INCOMPAT_CORRUPT)) {
        log_error("%s: the image is marked corrupt (incompatible bit 1); it can "
                  "only be mounted read-only (-o ro); run qemu-img check -r all "
                  "to repair it", path);
        ret = -EROFS;
        goto fail;
    }

    img->size = img->hdr.size;
    img->compression = img->hdr.compression_type == 1 ? COMPRESS_ZSTD : COMPRESS_ZLIB;
    img->meta.io = img->io;
    img->meta.cluster_bits = img->hdr.cluster_bits;
    img->meta.cluster_size = 1ull << img->hdr.cluster_bits;
    img->meta.extended_l2 = !!(img->hdr.incompatible_features & QCOW2_INCOMPAT_EXTL2);
    img->meta.l2_entry_bytes = img->meta.extended_l2 ? 16 : 8;
    img->meta.l2_entries = img->meta.cluster_size / img->meta.l2_entry_bytes;
    img->meta.has_data_file = !!(img->hdr.incompatible_features & QCOW2_INCOMPAT_DATA_FILE);
    img->meta.data_file_raw = img->meta.has_data_file &&
                              (img->hdr.autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW);
    img->meta.v3 = img->hdr.version >= 3;
    img->meta.read_only = !writable;
    img->meta.refcount_order = img->hdr.refcount_order;
    img->meta.virtual_size = img->hdr.size;
    img->meta.incompatible = img->hdr.incompatible_features;

    if (img->meta.has_data_file) {
        ret = open_data_file(img, opts, writable);
        if (ret < 0)
            goto fail;
        img->meta.data_io = img->data_io;
    } else {
        img->meta.data_io = img->io;
    }

    ret = cluster_open(&img->meta, img->hdr.l1_table_offset, img->hdr.l1_size,
                       opts->l2_cache_size ? opts->l2_cache_size : default_l2_cache(img),
                       &img->cl);
    if (ret < 0)
        goto fail;

    if (img->hdr.backing_file) {
        ret = open_backing(img, opts, depth);
        if (ret < 0)
            goto fail;
    }
    free(buf);
    *out = img;
    return 0;

fail:
    free(buf);
    image_free(img);
    return ret;
}

int image_open(const char *path, const struct image_options *opts,
               struct image **out)
{
    if (!opts->read_only) {
        log_error("%s: writable mounts are not available yet; use -o ro", path);
        return -EROFS;
    }
    return open_chain(path, opts, false, 0, out);
}

int image_close(struct image *img)
{
    image_free(img);
    return 0;
}

uint64_t image_size(const struct image *img)
{
    return img->size;
}

bool image_is_read_only(const struct image *img)
{
    return img->meta.read_only || img->is_raw;
}

uint32_t image_cluster_size(const struct image *img)
{
    return img->is_raw ? 65536 : (uint32_t)img->meta.cluster_size;
}

/* ---- read path ----------------------------------------------------------- */

static int read_compressed(struct image *img, const struct cluster_run *run,
                           uint64_t offset, void *buf)
{
    struct meta *m = &img->meta;
    uint64_t host, max_len, file_size;
    uint8_t *comp = NULL, *plain = NULL;
    int ret;

    ret = compress_descriptor_decode(run->l2_entry & ~(META_L2_COPIED | META_L2_COMPRESSED),
                                     m->cluster_bits, &host, &max_len);
    if (ret < 0)
        return -EIO;
    ret = io_get_size(img->io, &file_size);
    if (ret < 0)
        return ret;
    if (host >= file_size)
        return meta_corrupt(m, "compressed cluster at guest offset 0x%llx points "
                            "at host offset 0x%llx, past the end of the file",
                            (unsigned long long)(offset & ~(m->cluster_size - 1)),
                            (unsigned long long)host);
    if (max_len > file_size - host)     /* the last sector may be short */
        max_len = file_size - host;

    comp = malloc(max_len);
    plain = malloc(m->cluster_size);
    if (!comp || !plain) {
        ret = -ENOMEM;
        goto out;
    }
    ret = io_pread(img->io, comp, max_len, host);
    if (ret < 0)
        goto out;
    ret = compress_decode(img->compression, comp, max_len, plain, m->cluster_size);
    if (ret < 0) {
        ret = meta_corrupt(m, "compressed cluster at guest offset 0x%llx (host "
                           "offset 0x%llx, %llu bytes) does not decompress",
                           (unsigned long long)(offset & ~(m->cluster_size - 1)),
                           (unsigned long long)host, (unsigned long long)max_len);
        goto out;
    }
    memcpy(buf, plain + (offset & (m->cluster_size - 1)), run->bytes);
out:
    free(comp);
    free(plain);
    return ret;
}

int image_read(struct image *img, void *buf, size_t len, uint64_t offset)
{
    uint8_t *p = buf;
    int ret;

    if (offset >= img->size) {
        memset(buf, 0, len);
        return 0;
    }
    if (len > img->size - offset) {
        size_t tail = len - (size_t)(img->size - offset);
        memset(p + len - tail, 0, tail);
        len -= tail;
    }
    if (img->is_raw)
        return io_pread(img->io, buf, len, offset);

    while (len > 0) {
        struct cluster_run run;

        pthread_mutex_lock(&img->lock);
        ret = cluster_lookup(img->cl, offset, len, &run);
        pthread_mutex_unlock(&img->lock);
        if (ret < 0)
            return ret;

        switch (run.kind) {
        case CLUSTER_DATA:
            ret = io_pread(img->meta.data_io, p, run.bytes, run.host_offset);
            break;
        case CLUSTER_ZERO:
            memset(p, 0, run.bytes);
            ret = 0;
            break;
        case CLUSTER_UNALLOCATED:
            if (img->backing)
                ret = image_read(img->backing, p, run.bytes, offset);
            else
                memset(p, 0, run.bytes);
            break;
        case CLUSTER_COMPRESSED:
            ret = read_compressed(img, &run, offset, p);
            break;
        }
        if (ret < 0)
            return ret;
        p += run.bytes;
        offset += run.bytes;
        len -= run.bytes;
    }
    return 0;
}

/* ---- block status -------------------------------------------------------- */

/* Whether [@offset, ...) holds data, and for how many bytes (<= @max). */
static int block_status(struct image *img, uint64_t offset, uint64_t max,
                        bool *data, uint64_t *bytes)
{
    struct cluster_run run;
    int ret;

    if (offset >= img->size) {
        *data = false;
        *bytes = max;
        return 0;
    }
    if (max > img->size - offset)
        max = img->size - offset;
    if (img->is_raw) {
        *data = true;
        *bytes = max;
        return 0;
    }
    pthread_mutex_lock(&img->lock);
    ret = cluster_lookup(img->cl, offset, max, &run);
    pthread_mutex_unlock(&img->lock);
    if (ret < 0)
        return ret;
    switch (run.kind) {
    case CLUSTER_DATA:
    case CLUSTER_COMPRESSED:
        *data = true;
        *bytes = run.bytes;
        return 0;
    case CLUSTER_ZERO:
        *data = false;
        *bytes = run.bytes;
        return 0;
    case CLUSTER_UNALLOCATED:
        if (img->backing)
            return block_status(img->backing, offset, run.bytes, data, bytes);
        *data = false;
        *bytes = run.bytes;
        return 0;
    }
    return -EIO;
}

int image_seek(struct image *img, uint64_t offset, bool data, uint64_t *result)
{
    uint64_t pos = offset;

    if (offset >= img->size)
        return -ENXIO;
    while (pos < img->size) {
        bool is_data;
        uint64_t bytes;
        int ret = block_status(img, pos, img->size - pos, &is_data, &bytes);

        if (ret < 0)
            return ret;
        if (is_data == data) {
            *result = pos;
            return 0;
        }
        pos += bytes;
    }
    if (data)
        return -ENXIO;
    *result = img->size;
    return 0;
}
