/*
 * compress — zlib raw-deflate and zstd codecs for compressed clusters, and
 * the compressed-cluster descriptor layout.
 */
#include "compress.h"

#include <errno.h>
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

static int zlib_decode(const void *src, size_t src_len, void *dst, size_t dst_len)
{
    z_stream s = { 0 };
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

static int zstd_decode(const void *src, size_t src_len, void *dst, size_t dst_len)
{
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
    ZSTD_inBuffer in = { src, src_len, 0 };
    ZSTD_outBuffer out = { dst, dst_len, 0 };
    int ret = 0;

    if (!dctx)
        return -ENOMEM;
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
    ZSTD_freeDCtx(dctx);
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
