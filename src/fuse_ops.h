/*
 * fuse_ops — the FUSE boundary: libfuse's low-level requests served from the
 * mount's tree (vfs: the directory, the disk file and what is beside it).
 * This is the only module that talks to libfuse's low-level API and the
 * only place a -errno becomes a fuse_reply_err().
 */
#ifndef QCOW2FUSE_FUSE_OPS_H
#define QCOW2FUSE_FUSE_OPS_H

#define FUSE_USE_VERSION FUSE_MAKE_VERSION(3, 12)
#include <fuse_lowlevel.h>

#include <stdbool.h>
#include <sys/types.h>

struct vfs;
struct fuse_ops_ctx;

struct fuse_ops_config {
    unsigned max_background;    /* 0: libfuse default */
};

/* Returns NULL on allocation failure.  Does not take ownership of @vfs. */
struct fuse_ops_ctx *fuse_ops_ctx_new(struct vfs *vfs,
                                      const struct fuse_ops_config *cfg);
/*
 * On entry: the session loop has returned (its worker threads, each of
 * which freed its own read buffer on exit, are gone).
 * On exit: @ctx and the calling thread's read buffer are freed.
 */
void fuse_ops_ctx_free(struct fuse_ops_ctx *ctx);

/* The operations table; pass the ctx as userdata to fuse_session_new(). */
const struct fuse_lowlevel_ops *fuse_ops_table(void);

#endif
