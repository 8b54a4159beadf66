/*
 * fuse_ops — libfuse's low-level operations over the mount's tree (vfs):
 * each request is decoded, served by one vfs call, and its -errno or
 * result turned into the reply.  FUSE node ids are vfs inode numbers.
 */
#include "fuse_ops.h"

#include "vfs.h"
#include "log.h"
#include "scratch.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <unistd.h>

_Static_assert(VFS_ROOT_INO == FUSE_ROOT_ID, "the root's node id");

#define ATTR_TIMEOUT    1.0     /* seconds the kernel may cache attributes */

struct fuse_ops_ctx {
    struct vfs *vfs;
    struct fuse_ops_config cfg;
};

struct fuse_ops_ctx *fuse_ops_ctx_new(struct vfs *vfs,
                                      const struct fuse_ops_config *cfg)
{
    struct fuse_ops_ctx *ctx;

    ctx = calloc(1, sizeof(*ctx));
    if (!ctx)
        return NULL;
    ctx->vfs = vfs;
    ctx->cfg = *cfg;
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

static struct vfs *vfs_of(fuse_req_t req)
{
    return ((struct fuse_ops_ctx *)fuse_req_userdata(req))->vfs;
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
    struct fuse_entry_param e;
    int ret;

    memset(&e, 0, sizeof(e));
    ret = vfs_lookup(vfs_of(req), parent, name, &e.attr);
    if (ret < 0) {
        fuse_reply_err(req, -ret);
        return;
    }
    e.ino = e.attr.st_ino;
    e.attr_timeout = ATTR_TIMEOUT;
    e.entry_timeout = ATTR_TIMEOUT;
    fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;
    int ret = vfs_getattr(vfs_of(req), ino, &st);

    if (ret < 0)
        fuse_reply_err(req, -ret);
    else
        fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

struct dir_reply {
    fuse_req_t req;
    char *buf;
    size_t size;
    size_t used;
};

static int add_dirent(void *arg, const char *name, const struct stat *st,
                      uint64_t next_pos)
{
    struct dir_reply *d = arg;
    size_t n = fuse_add_direntry(d->req, d->buf + d->used, d->size - d->used, name,
                                 st, (off_t)next_pos);

    if (n > d->size - d->used)
        return 1;
    d->used += n;
    return 0;
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    struct dir_reply d = { .req = req, .size = size < 65536 ? size : 65536 };
    int ret;

    if (off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    d.buf = scratch_get(SCRATCH_REPLY, d.size);
    if (!d.buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    ret = vfs_readdir(vfs_of(req), ino, (uint64_t)off, add_dirent, &d);
    if (ret < 0)
        fuse_reply_err(req, -ret);
    else
        fuse_reply_buf(req, d.buf, d.used);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct vfs_open_info info;
    int ret = vfs_open(vfs_of(req), ino, fi->flags, &info);

    if (ret < 0) {
        fuse_reply_err(req, -ret);
        return;
    }
    fi->direct_io = info.direct_io;
    fi->keep_cache = info.keep_cache;
    fuse_reply_open(req, fi);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    size_t len;
    void *buf;
    int ret;

    if (off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    /* The thread's reply buffer, kept from one request to the next
     * (scratch.h).  Reuse is safe because fuse_reply_buf() has copied the
     * reply into the kernel (one writev; splice is off) before it returns. */
    buf = scratch_get(SCRATCH_REPLY, size);
    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    ret = vfs_read(vfs_of(req), ino, buf, size, (uint64_t)off, &len);
    if (ret < 0)
        fuse_reply_err(req, -ret);
    else
        fuse_reply_buf(req, buf, len);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size,
                     off_t off, struct fuse_file_info *fi)
{
    size_t len;
    int ret;

    if (off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    ret = vfs_write(vfs_of(req), ino, buf, size, (uint64_t)off, &len);
    if (ret < 0)
        fuse_reply_err(req, -ret);
    else
        fuse_reply_write(req, len);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync,
                     struct fuse_file_info *fi)
{
    fuse_reply_err(req, -vfs_fsync(vfs_of(req), ino));
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fuse_reply_err(req, 0);
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off,
                         off_t len, struct fuse_file_info *fi)
{
    if (off < 0 || len <= 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    fuse_reply_err(req, -vfs_fallocate(vfs_of(req), ino, mode, (uint64_t)off,
                                       (uint64_t)len));
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr,
                       int to_set, struct fuse_file_info *fi)
{
    unsigned what = 0;
    struct stat st;
    int ret;

    if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID))
        what |= VFS_SET_OWNER;
    if (to_set & FUSE_SET_ATTR_SIZE) {
        if (attr->st_size < 0) {
            fuse_reply_err(req, EINVAL);
            return;
        }
        what |= VFS_SET_SIZE;
    }
    ret = vfs_setattr(vfs_of(req), ino, what, (uint64_t)attr->st_size, &st);
    if (ret < 0)
        fuse_reply_err(req, -ret);
    else
        fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

/* Reply to getxattr/listxattr: the length when asked for it, else the bytes. */
static void reply_xattr(fuse_req_t req, int ret, const char *buf, size_t size, size_t len)
{
    if (ret < 0)
        fuse_reply_err(req, -ret);
    else if (size == 0)
        fuse_reply_xattr(req, len);
    else
        fuse_reply_buf(req, buf, len);
}

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    char buf[1024];
    size_t len;
    int ret = vfs_getxattr(vfs_of(req), ino, name, buf,
                           size < sizeof(buf) ? size : sizeof(buf), &len);

    reply_xattr(req, ret, buf, size, len);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    char buf[256];
    size_t len;
    int ret = vfs_listxattr(vfs_of(req), ino, buf,
                            size < sizeof(buf) ? size : sizeof(buf), &len);

    reply_xattr(req, ret, buf, size, len);
}

static void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                     struct fuse_file_info *fi)
{
    uint64_t result;
    int ret;

    if (off < 0) {
        fuse_reply_err(req, ENXIO);
        return;
    }
    ret = vfs_lseek(vfs_of(req), ino, (uint64_t)off, whence, &result);
    if (ret < 0)
        fuse_reply_err(req, -ret);
    else
        fuse_reply_lseek(req, (off_t)result);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    struct statvfs sv;

    vfs_statfs(vfs_of(req), &sv);
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
