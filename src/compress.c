/*
 * compress — zlib raw-deflate and zstd codecs for compressed clusters, and
 * the compressed-cluster descriptor layout.
 */
#include "compress.h"

#include "scratch.h"

#include <errno.h>
#include <stdlib.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

int compress_descriptor_decode(uint64_t l2_entry, unsigned cluster_bits,
                               uint64_t *host_offset, uint64_t *max_len)
{
    unsigned x = 62 - (cluster_bits - 8);
    uint64_t off = l2_entry & ((1ull << x) - 1);
    uint64_t sectors = (l2_entry >> x) & ((1ull << (62 - x)) - 1);

    if (off >> 56)
        return -EINVAL;
    *host_offset = off;
    /* From the offset to the end of its sector, plus the extra sectors. */
    *max_len = (sectors + 1) * 512 - (off & 511);
    return 0;
}

uint64_t compress_descriptor_encode(uint64_t host_offset, uint64_t len,
                                    unsigned cluster_bits)
{
    unsigned x = 62 - (cluster_bits - 8);
    uint64_t last = (host_offset + len - 1) / 512;
    uint64_t extra = last - host_offset / 512;

    return host_offset | extra << x;
}

/*
 * zlib's allocations for one inflate (its state, about 7 KiB, and the
 * 32 KiB window) come from the thread's SCRATCH_INFLATE buffer, taken
 * front to back and given back all at once when the next decode starts,
 * instead of two mallocs per compressed cluster.  Should another zlib
 * need more than the buffer holds, the rest comes from malloc.
 */
#define INFLATE_ARENA   (64u << 10)

struct inflate_arena {
    uint8_t *base;
    size_t used;
};

static voidpf arena_alloc(voidpf opaque, uInt items, uInt size)
{
    struct inflate_arena *a = opaque;
    size_t n = (size_t)items * size;            /* both 32-bit: no overflow */
    size_t aligned = (n + 15) & ~(size_t)15;

    if (a->base && aligned <= INFLATE_ARENA - a->used) {
        void *p = a->base + a->used;
        a->used += aligned;
        return p;
    }
    return malloc(n);
}

static void arena_free(voidpf opaque, voidpf p)
{
    struct inflate_arena *a = opaque;

    if (a->base && (uint8_t *)p >= a->base && (uint8_t *)p < a->base + INFLATE_ARENA)
        return;                                 /* back with the arena */
    free(p);
}

static int zlib_decode(const void *src, size_t src_len, void *dst, size_t dst_len)
{
    struct inflate_arena arena = { scratch_get(SCRATCH_INFLATE, INFLATE_ARENA), 0 };
    z_stream s = { .zalloc = arena_alloc, .zfree = arena_free, .opaque = &arena };
    int ret;

    if (inflateInit2(&s, -15) != Z_OK)      /* raw deflate, any window */
        return -EIO;
    s.next_in = (Bytef *)src;
    s.avail_in = (uInt)src_len;
    s.next_out = dst;
    s.avail_out = (uInt)dst_len;
    ret = inflate(&s, Z_FINISH);
    inflateEnd(&s);
    /* The input runs to a sector end, so the stream may end early or the
     * output may fill first: either is fine once the cluster is complete. */
    if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR || ret == Z_OK) && s.avail_out == 0)
        return 0;
    return -EIO;
}

static void *dctx_create(void)
{
    return ZSTD_createDCtx();
}

static void dctx_free(void *dctx)
{
    ZSTD_freeDCtx(dctx);
}

/* The decoding context is the thread's own (SCRATCH_ZSTD_DCTX), kept from
 * one cluster to the next and reset before each: no allocation per
 * compressed cluster once its buffers have grown to the image's frames. */
static int zstd_decode(const void *src, size_t src_len, void *dst, size_t dst_len)
{
    ZSTD_DCtx *dctx = scratch_object(SCRATCH_ZSTD_DCTX, dctx_create, dctx_free);
    ZSTD_inBuffer in = { src, src_len, 0 };
    ZSTD_outBuffer out = { dst, dst_len, 0 };
    int ret = 0;

    if (!dctx)
        return -ENOMEM;
    /* A failed cluster may have left a frame half decoded. */
    if (ZSTD_isError(ZSTD_DCtx_reset(dctx, ZSTD_reset_session_only)))
        return -EIO;
    /* One cluster may be stored as several frames; stop once it is full. */
    while (out.pos < out.size) {
        size_t last_in = in.pos, last_out = out.pos;
        size_t r = ZSTD_decompressStream(dctx, &out, &in);
        if (ZSTD_isError(r)) {
            ret = -EIO;
            break;
        }
        if (in.pos == last_in && out.pos == last_out) {
            ret = -EIO;         /* no progress: input exhausted */
            break;
        }
    }
    return ret;
}

int compress_decode(enum compress_type type, const void *src, size_t src_len,
                    void *dst, size_t dst_len)
{
    switch (type) {
    case COMPRESS_ZLIB:
        return zlib_decode(src, src_len, dst, dst_len);
    case COMPRESS_ZSTD:
        return zstd_decode(src, src_len, dst, dst_len);
    }
    return -EINVAL;
}

long compress_encode(enum compress_type type, const void *src, size_t src_len,
                     void *dst, size_t dst_cap)
{
    if (type == COMPRESS_ZLIB) {
        z_stream s = { 0 };
        long n;
        int ret;

        if (deflateInit2(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                         Z_DEFAULT_STRATEGY) != Z_OK)
            return -EIO;
        s.next_in = (Bytef *)src;
        s.avail_in = (uInt)src_len;
        s.next_out = dst;
        s.avail_out = (uInt)dst_cap;
        ret = deflate(&s, Z_FINISH);
        n = (long)(dst_cap - s.avail_out);
        deflateEnd(&s);
        if (ret != Z_STREAM_END)
            return -ENOSPC;
        return n;
    }
    if (type == COMPRESS_ZSTD) {
        size_t r = ZSTD_compress(dst, dst_cap, src, src_len, ZSTD_CLEVEL_DEFAULT);
        if (ZSTD_isError(r))
            return ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall ? -ENOSPC : -EIO;
        return (long)r;
    }
    return -EINVAL;
}
