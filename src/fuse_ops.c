/*
 * fuse_ops — low-level FUSE operations over one image.
 *
 * Inode 1 is the mount point's directory; inode 2 is the disk file.
 */
#include "fuse_ops.h"

#include "image.h"
#include "log.h"
#include "scratch.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <unistd.h>

#define ROOT_INO    FUSE_ROOT_ID
#define DISK_INO    2

struct fuse_ops_ctx {
    struct image *img;
    struct fuse_ops_config cfg;
    struct timespec mount_time;
};

struct fuse_ops_ctx *fuse_ops_ctx_new(struct image *img,
                                      const struct fuse_ops_config *cfg)
{
    struct fuse_ops_ctx *ctx;

    ctx = calloc(1, sizeof(*ctx));
    if (!ctx)
        return NULL;
    ctx->img = img;
    ctx->cfg = *cfg;
    clock_gettime(CLOCK_REALTIME, &ctx->mount_time);
    return ctx;
}

void fuse_ops_ctx_free(struct fuse_ops_ctx *ctx)
{
    if (!ctx)
        return;
    /* The worker threads' buffers went with them; the single-threaded
     * loop's thread returns here instead. */
    scratch_release_thread();
    free(ctx);
}

static struct fuse_ops_ctx *ctx_of(fuse_req_t req)
{
    return fuse_req_userdata(req);
}

static void fill_attr(struct fuse_ops_ctx *ctx, fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_uid = ctx->cfg.uid;
    st->st_gid = ctx->cfg.gid;
    st->st_atim = st->st_mtim = st->st_ctim = ctx->mount_time;
    if (ino == ROOT_INO) {
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
    } else {
        uint64_t size = image_size(ctx->img);
        st->st_mode = S_IFREG | ctx->cfg.mode;
        if (image_is_read_only(ctx->img))
            st->st_mode &= ~(mode_t)0222;
        st->st_nlink = 1;
        st->st_size = (off_t)size;
        st->st_blksize = 4096;
        st->st_blocks = (blkcnt_t)((size + 511) / 512);
    }
}

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    struct fuse_ops_ctx *ctx = userdata;

    if (ctx->cfg.max_background)
        conn->max_background = ctx->cfg.max_background;
    /* Splice measured slower here; writeback_cache breaks the file size. */
    conn->want &= ~(unsigned)(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE |
                              FUSE_CAP_SPLICE_MOVE | FUSE_CAP_WRITEBACK_CACHE);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_ops_ctx *ctx = ctx_of(req);
    struct fuse_entry_param e;

    if (parent != ROOT_INO || strcmp(name, ctx->cfg.disk_name) != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    memset(&e, 0, sizeof(e));
    e.ino = DISK_INO;
    e.attr_timeout = 1.0;
    e.entry_timeout = 1.0;
    fill_attr(ctx, DISK_INO, &e.attr);
    fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;

    if (ino != ROOT_INO && ino != DISK_INO) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fill_attr(ctx_of(req), ino, &st);
    fuse_reply_attr(req, &st, 1.0);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    struct fuse_ops_ctx *ctx = ctx_of(req);
    const char *names[] = { ".", "..", ctx->cfg.disk_name };
    const fuse_ino_t inos[] = { ROOT_INO, ROOT_INO, DISK_INO };
    char buf[1024];
    size_t used = 0;

    if (ino != ROOT_INO) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    for (off_t i = off; i < 3; i++) {
        struct stat st = { .st_ino = inos[i],
                           .st_mode = i < 2 ? S_IFDIR : S_IFREG };
        size_t n = fuse_add_direntry(req, buf + used, sizeof(buf) - used,
                                     names[i], &st, i + 1);
        if (used + n > sizeof(buf) || used + n > size)
            break;
        used += n;
    }
    fuse_reply_buf(req, buf, used);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fuse_ops_ctx *ctx = ctx_of(req);

    if (ino != DISK_INO) {
        fuse_reply_err(req, ino == ROOT_INO ? EISDIR : ENOENT);
        return;
    }
    if ((fi->flags & O_ACCMODE) != O_RDONLY && image_is_read_only(ctx->img)) {
        fuse_reply_err(req, EROFS);
        return;
    }
    fi->direct_io = ctx->cfg.direct_io;
    fi->keep_cache = !ctx->cfg.direct_io;
    fuse_reply_open(req, fi);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    struct fuse_ops_ctx *ctx = ctx_of(req);
    uint64_t disk_size = image_size(ctx->img);
    void *buf;
    int ret;

    if (off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if ((uint64_t)off >= disk_size || size == 0) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    if (size > disk_size - (uint64_t)off)
        size = (size_t)(disk_size - (uint64_t)off);
    /*
     * The reply buffer is the worker thread's own, kept from one request
     * to the next (scratch.h).  Reuse is safe because fuse_reply_buf()
     * has copied the reply into the kernel (one writev on /dev/fuse;
     * splice is off, see op_init) before it returns.
     */
    buf = scratch_get(SCRATCH_REPLY, size);
    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    /* image_read fills all @size bytes (holes and zero clusters with
     * zeros) and reads each contiguous host run with one pread straight
     * into @buf, so nothing of an earlier request survives in the reply. */
    ret = image_read(ctx->img, buf, size, (uint64_t)off);
    if (ret < 0)
        fuse_reply_err(req, -ret);
    else
        fuse_reply_buf(req, buf, size);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size,
                     off_t off, struct fuse_file_info *fi)
{
    struct fuse_ops_ctx *ctx = ctx_of(req);
    uint64_t disk_size = image_size(ctx->img);
    int ret;

    if (off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    /* A disk does not grow by writing past its end (truncate resizes). */
    if ((uint64_t)off >= disk_size) {
        fuse_reply_err(req, size ? ENOSPC : 0);
        return;
    }
    if (size > disk_size - (uint64_t)off)
        size = (size_t)(disk_size - (uint64_t)off);
    ret = image_write(ctx->img, buf, size, (uint64_t)off);
    if (ret < 0)
        fuse_reply_err(req, -ret);
    else
        fuse_reply_write(req, size);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync,
                     struct fuse_file_info *fi)
{
    /* fdatasync needs the metadata too: without the L2 update the data
     * is not reachable. */
    int ret = image_flush(ctx_of(req)->img);
    fuse_reply_err(req, -ret);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fuse_reply_err(req, 0);
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off,
                         off_t len, struct fuse_file_info *fi)
{
    struct fuse_ops_ctx *ctx = ctx_of(req);
    uint64_t size = image_size(ctx->img), end;
    bool keep = mode & FALLOC_FL_KEEP_SIZE;
    int op = mode & ~FALLOC_FL_KEEP_SIZE;
    int ret;

    if (off < 0 || len <= 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    end = (uint64_t)off + (uint64_t)len;
    /* A disk does not grow through fallocate: only truncate resizes it. */
    if (end > size && !keep) {
        fuse_reply_err(req, EOPNOTSUPP);
        return;
    }
    if ((uint64_t)off >= size) {
        fuse_reply_err(req, 0);
        return;
    }
    if (end > size)
        end = size;
    if (op == 0)
        ret = image_preallocate(ctx->img, (uint64_t)off, end - (uint64_t)off);
    else if (op == FALLOC_FL_PUNCH_HOLE && keep)
        ret = image_zero(ctx->img, (uint64_t)off, end - (uint64_t)off, true);
    else if (op == FALLOC_FL_ZERO_RANGE)
        ret = image_zero(ctx->img, (uint64_t)off, end - (uint64_t)off, false);
    else
        ret = -EOPNOTSUPP;
    fuse_reply_err(req, -ret);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr,
                       int to_set, struct fuse_file_info *fi)
{
    struct fuse_ops_ctx *ctx = ctx_of(req);
    struct stat st;
    int ret;

    if (ino != DISK_INO && ino != ROOT_INO) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    if (to_set & FUSE_SET_ATTR_SIZE) {
        if (ino != DISK_INO) {
            fuse_reply_err(req, EISDIR);
            return;
        }
        if (attr->st_size < 0) {
            fuse_reply_err(req, EINVAL);
            return;
        }
        ret = image_resize(ctx->img, (uint64_t)attr->st_size);
        if (ret < 0) {
            fuse_reply_err(req, -ret);
            return;
        }
    }
    /* Times are accepted and not stored: the disk has no timestamps. */
    fill_attr(ctx, ino, &st);
    fuse_reply_attr(req, &st, 1.0);
}

#define STATS_XATTR "user.qcow2fuse.stats"

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    char buf[1024];
    size_t n;

    if (ino != DISK_INO || strcmp(name, STATS_XATTR) != 0) {
        fuse_reply_err(req, ENODATA);
        return;
    }
    image_stats(ctx_of(req)->img, buf, sizeof(buf));
    n = strlen(buf);
    if (size == 0)
        fuse_reply_xattr(req, n);
    else if (size < n)
        fuse_reply_err(req, ERANGE);
    else
        fuse_reply_buf(req, buf, n);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    static const char names[] = STATS_XATTR;   /* with its NUL */

    if (ino != DISK_INO) {
        fuse_reply_xattr(req, 0);
        return;
    }
    if (size == 0)
        fuse_reply_xattr(req, sizeof(names));
    else if (size < sizeof(names))
        fuse_reply_err(req, ERANGE);
    else
        fuse_reply_buf(req, names, sizeof(names));
}

static void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                     struct fuse_file_info *fi)
{
    struct fuse_ops_ctx *ctx = ctx_of(req);
    uint64_t result;
    int ret;

    if (whence != SEEK_DATA && whence != SEEK_HOLE) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (off < 0) {
        fuse_reply_err(req, ENXIO);
        return;
    }
    ret = image_seek(ctx->img, (uint64_t)off, whence == SEEK_DATA, &result);
    if (ret < 0)
        fuse_reply_err(req, -ret);
    else
        fuse_reply_lseek(req, (off_t)result);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    struct fuse_ops_ctx *ctx = ctx_of(req);
    struct statvfs sv;

    memset(&sv, 0, sizeof(sv));
    sv.f_bsize = 4096;
    sv.f_frsize = 4096;
    sv.f_blocks = (image_size(ctx->img) + 4095) / 4096;
    sv.f_files = 2;
    sv.f_namemax = 255;
    fuse_reply_statfs(req, &sv);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fuse_reply_err(req, 0);
}

static const struct fuse_lowlevel_ops ops = {
    .init = op_init,
    .lookup = op_lookup,
    .getattr = op_getattr,
    .readdir = op_readdir,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .fallocate = op_fallocate,
    .setattr = op_setattr,
    .fsync = op_fsync,
    .flush = op_flush,
    .lseek = op_lseek,
    .getxattr = op_getxattr,
    .listxattr = op_listxattr,
    .statfs = op_statfs,
    .release = op_release,
};

const struct fuse_lowlevel_ops *fuse_ops_table(void)
{
    return &ops;
}
