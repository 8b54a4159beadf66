/*
 * image_read — the read path and block status: each request is split into
 * runs by a table lookup (under the metadata lock held shared when the L2
 * slice is cached, else exclusively), and each run is served by one host
 * I/O outside the lock.  A read holds no range: when host clusters were
 * released under it (free_gen moved), it looks the run up again.
 */
#include "image_impl.h"

#include "cluster.h"
#include "compress.h"
#include "io.h"
#include "meta.h"
#include "scratch.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/*
 * Read and decompress the cluster of @run into @buf: straight into it when
 * the run is the whole cluster, else through the thread's
 * SCRATCH_DECOMPRESSED buffer; the compressed bytes go through
 * SCRATCH_COMPRESSED (no caller of it holds either).  @gen: the free_gen
 * seen at the lookup, for a reader that holds no range (else NULL): when it
 * moved, the data may have been released and reused under the read, so a
 * failure is -EAGAIN (read again) rather than corruption.
 */
int image_read_compressed(struct image *img, const struct cluster_run *run,
                          uint64_t offset, void *buf, const uint64_t *gen)
{
    struct meta *m = &img->meta;
    uint64_t host, max_len, file_size;
    uint64_t in = cluster_offset_in(offset, m->cluster_size);
    uint8_t *comp, *plain = buf;
    int ret;

    ret = cluster_compressed_extent(m, run->l2_entry, &host, &max_len, NULL, NULL);
    if (ret < 0)
        return -EIO;
    ret = io_get_size(img->io, &file_size);
    if (ret < 0)
        return ret;
    if (host >= file_size && gen && lock_owner(img)->free_gen != *gen)
        return -EAGAIN;
    if (host >= file_size)
        return meta_corrupt(m, "compressed cluster at guest offset 0x%llx points "
                            "at host offset 0x%llx, past the end of the file",
                            (unsigned long long)cluster_align_down(offset, m->cluster_size),
                            (unsigned long long)host);
    if (max_len > file_size - host)     /* the last sector may be short */
        max_len = file_size - host;

    comp = scratch_get(SCRATCH_COMPRESSED, max_len);
    if (in != 0 || run->bytes != m->cluster_size)
        plain = scratch_get(SCRATCH_DECOMPRESSED, m->cluster_size);
    if (!comp || !plain)
        return -ENOMEM;
    ret = io_pread(img->io, comp, max_len, host);
    if (ret < 0)
        return ret;
    ret = compress_decode(img->compression, comp, max_len, plain, m->cluster_size);
    if (ret < 0 && gen && lock_owner(img)->free_gen != *gen)
        return -EAGAIN;
    if (ret < 0)
        return meta_corrupt(m, "compressed cluster at guest offset 0x%llx (host "
                            "offset 0x%llx, %llu bytes) does not decompress",
                            (unsigned long long)cluster_align_down(offset, m->cluster_size),
                            (unsigned long long)host, (unsigned long long)max_len);
    if (plain != buf)
        memcpy(buf, plain + in, run->bytes);
    return 0;
}

/*
 * Look up [@offset, @offset + @max) for a request that holds no range:
 * with the lock shared when the slice is cached (the common case), else
 * exclusively.  *gen (if not NULL): the free generation seen at the lookup.
 */
static int lookup_for_read(struct image *img, uint64_t offset, uint64_t max,
                           struct cluster_run *run, uint64_t *gen)
{
    struct image *owner = lock_owner(img);     /* a view's tables are its */
    int ret;

    pthread_rwlock_rdlock(&owner->tables);
    ret = cluster_lookup_shared(img->cl, offset, max, run);
    if (gen)
        *gen = owner->free_gen;
    pthread_rwlock_unlock(&owner->tables);
    if (ret != -EAGAIN)
        return ret;

    lock_exclusive(img);
    ret = cluster_lookup(img->cl, offset, max, run);
    if (gen)
        *gen = owner->free_gen;
    unlock_exclusive(img);
    return ret;
}

/*
 * Read [@offset, +@len) of the backing chain into @p for a run that a lookup
 * made at chain generation @chain_gen found unallocated.  The chain may be
 * dropped meanwhile (image_drop_backing): it is only used while counted in
 * backing_users, and when it is gone and the generation moved, the run was
 * filled before the drop and is read again (-EAGAIN).
 * On exit: *from_chain says whether the chain gave the bytes.
 */
static int read_backing(struct image *img, uint8_t *p, uint64_t len, uint64_t offset,
                        uint64_t chain_gen, bool *from_chain)
{
    struct image *chain;
    int ret = 0;

    img->backing_users++;
    chain = img->backing;
    *from_chain = chain != NULL;
    if (chain)
        ret = image_read(chain, p, len, offset);
    else if (img->chain_gen != chain_gen)
        ret = -EAGAIN;
    else
        memset(p, 0, len);
    img->backing_users--;
    return ret;
}

static int read_range(struct image *img, uint8_t *p, size_t len, uint64_t offset,
                      bool *from_chain);

int image_read(struct image *img, void *buf, size_t len, uint64_t offset)
{
    bool from_chain = false;
    int ret;

    guest_begin(img);
    img->bytes_read += len;
    ret = read_range(img, buf, len, offset, &from_chain);
    if (ret == 0 && from_chain && img->copy_on_read)
        image_copy_on_read(img, offset, len);
    guest_end(img);
    return ret;
}

int image_read_range(struct image *img, uint8_t *p, size_t len, uint64_t offset)
{
    bool from_chain = false;

    return read_range(img, p, len, offset, &from_chain);
}

/* The read; *from_chain (false on entry) is set when some of it came from
 * the backing chain. */
static int read_range(struct image *img, uint8_t *p, size_t len, uint64_t offset,
                      bool *from_chain)
{
    void *buf = p;
    int ret;

    uint64_t size = img->size;  /* once: a resize may run concurrently */

    if (offset >= size) {
        memset(buf, 0, len);
        return 0;
    }
    if (len > size - offset) {
        size_t tail = len - (size_t)(size - offset);
        memset(p + len - tail, 0, tail);
        len -= tail;
    }
    if (img->is_raw)
        return io_pread(img->io, buf, len, offset);

    while (len > 0) {
        struct cluster_run run;
        uint64_t gen, chain_gen = img->chain_gen;
        bool chain_read;

        ret = lookup_for_read(img, offset, len, &run, &gen);
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
            ret = read_backing(img, p, run.bytes, offset, chain_gen, &chain_read);
            if (ret == -EAGAIN)
                continue;
            *from_chain |= chain_read;
            break;
        case CLUSTER_COMPRESSED:
            ret = image_read_compressed(img, &run, offset, p, &gen);
            break;
        }
        /* Host clusters released (and maybe reused) under the read: the
         * data or the error may belong to something else.  Look up again. */
        if ((run.kind == CLUSTER_DATA || run.kind == CLUSTER_COMPRESSED) &&
            lock_owner(img)->free_gen != gen)
            continue;
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
    uint64_t size = img->size, chain_gen = img->chain_gen;
    struct image *chain;
    int ret;

    if (offset >= size) {
        *data = false;
        *bytes = max;
        return 0;
    }
    if (max > size - offset)
        max = size - offset;
    if (img->is_raw) {
        *data = true;
        *bytes = max;
        return 0;
    }
    ret = lookup_for_read(img, offset, max, &run, NULL);
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
        break;
    }
    /* As read_backing: the chain only while counted; dropped after the
     * lookup, the run is local now: look again. */
    img->backing_users++;
    chain = img->backing;
    if (chain) {
        ret = block_status(chain, offset, run.bytes, data, bytes);
    } else if (img->chain_gen != chain_gen) {
        ret = -EAGAIN;
    } else {
        *data = false;
        *bytes = run.bytes;
    }
    img->backing_users--;
    if (ret == -EAGAIN)
        return block_status(img, offset, max, data, bytes);
    return ret;
}

int image_seek(struct image *img, uint64_t offset, bool data, uint64_t *result)
{
    uint64_t pos = offset, size = img->size;

    if (offset >= size)
        return -ENXIO;
    while (pos < size) {
        bool is_data;
        uint64_t bytes;
        int ret = block_status(img, pos, size - pos, &is_data, &bytes);

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
    *result = size;
    return 0;
}
