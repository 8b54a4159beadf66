/*
 * fuse_server — FUSE requests decoded, served from the vfs and answered,
 * and the classic transport that carries them over cloned /dev/fuse
 * descriptors.  See fuse_server.h and fuse_transport.h.
 *
 * Every request is untrusted bytes until checked: the in-header's length
 * against what arrived, the op header's size against what the opcode and
 * the negotiated minor need, a name against its NUL inside the request.
 * Fields are copied out with memcpy (a request may sit at any address)
 * and only then read.  A request that fails a check gets EIO (a header
 * that lies about its length) or EINVAL (an op header that is short, a
 * name without its NUL, a size past what we negotiated), never a crash.
 */
#include "fuse_server.h"

#include "fuse_proto.h"
#include "log.h"
#include "scratch.h"
#include "vfs.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

_Static_assert(VFS_ROOT_INO == FUSE_ROOT_ID, "the root's node id");

#define ATTR_TIMEOUT_SEC    1   /* the kernel may cache names and attributes this long */
#define READDIR_MAX         (64u << 10)     /* bytes of one READDIR reply, as before */
#define XATTR_VALUE_MAX     (64u << 10)     /* XATTR_SIZE_MAX */
/* The file handle OPEN gives a FOPEN_DIRECT_IO open; WRITE brings it back. */
#define FH_DIRECT_IO        1u
/* Without FUSE_MAX_PAGES the kernel sends at most 32 pages per request. */
#define DEFAULT_MAX_PAGES   32u
#define PAGE_BYTES          4096u

/*
 * The INIT flags we ask for, when the kernel offers them: what libfuse
 * 3.14 asked for before, less HANDLE_KILLPRIV (the disk file has no set-id
 * bits to kill), IOCTL_DIR (no ioctls are served) and splice (measured
 * slower here), plus DIRECT_IO_ALLOW_MMAP.  Never WRITEBACK_CACHE: it made
 * a file mounted over a regular file report size 0.  ATOMIC_O_TRUNC keeps
 * open(O_TRUNC) from truncating the disk, as before.
 */
#define WANTED_FLAGS (FUSE_ASYNC_READ | FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES |  \
                      FUSE_AUTO_INVAL_DATA | FUSE_ASYNC_DIO |                     \
                      FUSE_PARALLEL_DIROPS | FUSE_MAX_PAGES |                      \
                      FUSE_DIRECT_IO_ALLOW_MMAP)

struct fuse_server {
    struct vfs *vfs;
    struct fuse_server_config cfg;
    /* Written once by the INIT request, before initialized is set
     * (release); read after it is seen set (acquire). */
    struct fuse_server_conn conn;
    atomic_bool initialized;
    pthread_mutex_t init_lock;  /* one INIT at a time */
    /* Why serve returns: a stop signal or fuse_server_stop, the last
     * worker ending, or an INIT we could not answer. */
    sem_t wake;
    atomic_int error;           /* -EPROTO after a refused INIT */
    atomic_uint live_workers;
};

/* ---- One request being served ---- */

struct req {
    struct fuse_server *srv;
    struct fuse_in_header in;
    uint32_t minor;
    const uint8_t *op_in;
    size_t op_in_len;
    const struct fuse_request *raw;
    /* After take_arg: the part past the fixed header (payload if any). */
    const uint8_t *tail;
    size_t tail_len;
    struct fuse_reply_sink *sink;
};

/*
 * The one place a result becomes a reply: @error 0 or -errno.  The kernel
 * refuses a reply whose error is positive or beyond -511 (the write fails
 * and the request would wait for ever): such a value, a bug below us,
 * goes out as EIO.
 */
static void reply(struct req *r, int error, const void *payload, size_t len)
{
    int ret;

    if (error > 0 || error <= -512) {
        log_error("request %llu (opcode %u): invalid result %d answered as EIO",
                  (unsigned long long)r->in.unique, r->in.opcode, error);
        error = -EIO;
    }
    if (error)
        len = 0;
    ret = r->sink->send(r->sink, error, error ? NULL : payload, len);
    /* ENOENT: the request was interrupted and the kernel no longer waits;
     * ENODEV: unmounted.  Neither is worth a message. */
    if (ret < 0 && ret != -ENOENT && ret != -ENODEV)
        log_warn("reply to request %llu (opcode %u) failed: %s",
                 (unsigned long long)r->in.unique, r->in.opcode, strerror(-ret));
}

static void reply_err(struct req *r, int error)
{
    reply(r, error, NULL, 0);
}

/*
 * Copy the opcode's fixed header, @size bytes (what the negotiated minor
 * sends), into @dst (of @dst_size bytes; the rest zeroed) and set the
 * variable part that follows it.
 * Returns: 0, -EINVAL when op_in is shorter than @size.
 */
static int take_arg(struct req *r, void *dst, size_t dst_size, size_t size)
{
    if (r->op_in_len < size)
        return -EINVAL;
    if (dst_size) {
        memset(dst, 0, dst_size);
        if (size)
            memcpy(dst, r->op_in, size < dst_size ? size : dst_size);
    }
    if (r->raw->payload) {
        r->tail = r->raw->payload;
        r->tail_len = r->raw->payload_len;
    } else {
        r->tail = r->op_in ? r->op_in + size : NULL;
        r->tail_len = r->op_in_len - size;
    }
    return 0;
}

/* The NUL-terminated name at the start of the variable part, or NULL. */
static const char *tail_name(const struct req *r)
{
    if (!r->tail || !memchr(r->tail, '\0', r->tail_len))
        return NULL;
    return (const char *)r->tail;
}

/*
 * A reply payload buffer of @size bytes: the sink's, else the thread's
 * scratch reply buffer (kept from one request to the next: nothing is
 * allocated per request once it has grown).  The sink's send has copied
 * the reply out before dispatch returns, so reuse is safe.
 */
static void *payload_buf(struct req *r, size_t size)
{
    void *buf = r->sink->payload_buf ? r->sink->payload_buf(r->sink, size) : NULL;

    /* At least a byte: an empty scratch slot has no buffer at all. */
    return buf ? buf : scratch_get(SCRATCH_REPLY, size ? size : 1);
}

/* ---- Encoding ---- */

static void fill_fuse_attr(const struct stat *st, struct fuse_attr *a)
{
    memset(a, 0, sizeof(*a));
    a->ino = (uint64_t)st->st_ino;
    a->size = (uint64_t)st->st_size;
    a->blocks = (uint64_t)st->st_blocks;
    a->atime = (uint64_t)st->st_atim.tv_sec;
    a->mtime = (uint64_t)st->st_mtim.tv_sec;
    a->ctime = (uint64_t)st->st_ctim.tv_sec;
    a->atimensec = (uint32_t)st->st_atim.tv_nsec;
    a->mtimensec = (uint32_t)st->st_mtim.tv_nsec;
    a->ctimensec = (uint32_t)st->st_ctim.tv_nsec;
    a->mode = st->st_mode;
    a->nlink = (uint32_t)st->st_nlink;
    a->uid = st->st_uid;
    a->gid = st->st_gid;
    a->rdev = (uint32_t)st->st_rdev;
    a->blksize = (uint32_t)st->st_blksize;
}

/* Before 7.9 fuse_attr had no blksize and the replies were shorter. */
static void reply_attr(struct req *r, const struct stat *st)
{
    struct fuse_attr_out out;

    memset(&out, 0, sizeof(out));
    out.attr_valid = ATTR_TIMEOUT_SEC;
    fill_fuse_attr(st, &out.attr);
    reply(r, 0, &out, r->minor < 9 ? FUSE_COMPAT_ATTR_OUT_SIZE : sizeof(out));
}

static void reply_entry(struct req *r, const struct stat *st)
{
    struct fuse_entry_out out;

    memset(&out, 0, sizeof(out));
    out.nodeid = (uint64_t)st->st_ino;
    out.entry_valid = ATTR_TIMEOUT_SEC;
    out.attr_valid = ATTR_TIMEOUT_SEC;
    fill_fuse_attr(st, &out.attr);
    reply(r, 0, &out, r->minor < 9 ? FUSE_COMPAT_ENTRY_OUT_SIZE : sizeof(out));
}

/* ---- Operations ---- */

static void do_init(struct req *r)
{
    struct fuse_server *srv = r->srv;
    struct fuse_init_in in;
    struct fuse_init_out out;
    struct fuse_server_conn conn;
    uint64_t offered = 0, flags;
    size_t out_size = sizeof(out);

    /* major and minor are all a 7.0-7.5 kernel sends; 7.36 added flags2
     * and room for more: take what came, up to our structure. */
    if (r->op_in_len < 8 ||
        take_arg(r, &in, sizeof(in), r->op_in_len < sizeof(in) ? r->op_in_len
                                                               : sizeof(in)) < 0) {
        reply_err(r, -EINVAL);
        return;
    }
    memset(&out, 0, sizeof(out));
    out.major = FUSE_PROTO_MAJOR;
    out.minor = FUSE_PROTO_MINOR;
    if (in.major < FUSE_PROTO_MAJOR) {
        log_error("the kernel speaks FUSE %u.%u; at least 7.x is needed",
                  in.major, in.minor);
        reply_err(r, -EPROTO);
        atomic_store(&srv->error, -EPROTO);
        fuse_server_stop(srv);
        return;
    }
    if (in.major > FUSE_PROTO_MAJOR) {
        /* Our version only: the kernel sends a second INIT for 7.x. */
        reply(r, 0, &out, sizeof(out));
        return;
    }
    /* The fields after minor exist from 7.6 on, flags2 with INIT_EXT. */
    if (in.minor >= 6) {
        if (r->op_in_len < offsetof(struct fuse_init_in, flags2)) {
            reply_err(r, -EINVAL);
            return;
        }
        offered = in.flags;
        if ((in.flags & FUSE_INIT_EXT) &&
            r->op_in_len >= offsetof(struct fuse_init_in, flags2) + sizeof(in.flags2))
            offered |= (uint64_t)in.flags2 << 32;
    }

    memset(&conn, 0, sizeof(conn));
    conn.minor = in.minor < FUSE_PROTO_MINOR ? in.minor : FUSE_PROTO_MINOR;
    /* BIG_WRITES is implied by max_write; older kernels need it said. */
    flags = (offered & WANTED_FLAGS) | FUSE_BIG_WRITES;
    if (srv->cfg.io_uring)
        flags |= offered & FUSE_OVER_IO_URING;
    conn.max_read = (flags & FUSE_MAX_PAGES) ? FUSE_SERVER_MAX_PAGES * PAGE_BYTES
                                             : DEFAULT_MAX_PAGES * PAGE_BYTES;
    conn.max_write = conn.max_read < FUSE_SERVER_MAX_WRITE ? conn.max_read
                                                           : FUSE_SERVER_MAX_WRITE;
    conn.io_uring = flags & FUSE_OVER_IO_URING;

    out.minor = conn.minor;
    out.max_readahead = in.max_readahead;
    out.max_write = conn.max_write;
    if (flags & FUSE_MAX_PAGES)
        out.max_pages = FUSE_SERVER_MAX_PAGES;
    if (conn.minor >= 13 && srv->cfg.max_background) {
        unsigned bg = srv->cfg.max_background < UINT16_MAX ? srv->cfg.max_background
                                                            : UINT16_MAX;
        out.max_background = (uint16_t)bg;
        out.congestion_threshold = (uint16_t)(bg * 3 / 4);
    }
    if (conn.minor >= 23)
        out.time_gran = 1;
    if (offered & FUSE_INIT_EXT) {
        flags |= FUSE_INIT_EXT;
        out.flags2 = (uint32_t)(flags >> 32);
    }
    out.flags = (uint32_t)flags;
    conn.flags = flags;
    if (conn.minor < 5)
        out_size = FUSE_COMPAT_INIT_OUT_SIZE;
    else if (conn.minor < 23)
        out_size = FUSE_COMPAT_22_INIT_OUT_SIZE;

    pthread_mutex_lock(&srv->init_lock);
    if (atomic_load(&srv->initialized)) {
        pthread_mutex_unlock(&srv->init_lock);
        reply_err(r, -EIO);     /* a second INIT: libfuse said EIO too */
        return;
    }
    srv->conn = conn;
    atomic_store_explicit(&srv->initialized, true, memory_order_release);
    pthread_mutex_unlock(&srv->init_lock);
    log_debug("FUSE %u.%u (kernel %u.%u), flags 0x%llx of 0x%llx offered, max_write %u",
              FUSE_PROTO_MAJOR, conn.minor, in.major, in.minor,
              (unsigned long long)flags, (unsigned long long)offered, conn.max_write);
    if (srv->cfg.io_uring && !conn.io_uring)
        log_info("the kernel does not offer FUSE over io_uring (is "
                 "/sys/module/fuse/parameters/enable_uring Y?)");
    reply(r, 0, &out, out_size);
    if (srv->cfg.after_init)
        srv->cfg.after_init(srv->cfg.after_init_arg, srv, &conn);
}

static void do_lookup(struct req *r)
{
    struct stat st;
    const char *name;
    int ret;

    take_arg(r, NULL, 0, 0);
    name = tail_name(r);
    if (!name) {
        reply_err(r, -EINVAL);
        return;
    }
    ret = vfs_lookup(r->srv->vfs, r->in.nodeid, name, &st);
    if (ret < 0)
        reply_err(r, ret);
    else
        reply_entry(r, &st);
}

static void do_getattr(struct req *r)
{
    struct fuse_getattr_in in;
    struct stat st;
    int ret;

    /* Since 7.9 GETATTR carries flags and a file handle, which a disk
     * file's attributes do not depend on. */
    if (take_arg(r, &in, sizeof(in), r->minor < 9 ? 0 : sizeof(in)) < 0) {
        reply_err(r, -EINVAL);
        return;
    }
    ret = vfs_getattr(r->srv->vfs, r->in.nodeid, &st);
    if (ret < 0)
        reply_err(r, ret);
    else
        reply_attr(r, &st);
}

static void do_setattr(struct req *r)
{
    struct fuse_setattr_in in;
    unsigned what = 0;
    struct stat st;
    int ret;

    if (take_arg(r, &in, sizeof(in), sizeof(in)) < 0) {
        reply_err(r, -EINVAL);
        return;
    }
    if (in.valid & (FATTR_MODE | FATTR_UID | FATTR_GID))
        what |= VFS_SET_OWNER;
    if (in.valid & FATTR_SIZE)
        what |= VFS_SET_SIZE;
    if (in.valid & (FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW |
                    FATTR_CTIME))
        what |= VFS_SET_TIMES;
    /* vfs refuses a size past INT64_MAX (EINVAL), as a negative off_t was. */
    ret = vfs_setattr(r->srv->vfs, r->in.nodeid, what, in.size, &st);
    if (ret < 0)
        reply_err(r, ret);
    else
        reply_attr(r, &st);
}

static void do_open(struct req *r)
{
    struct fuse_open_in in;
    struct fuse_open_out out;
    struct vfs_open_info info;
    int ret;

    if (take_arg(r, &in, sizeof(in), sizeof(in)) < 0) {
        reply_err(r, -EINVAL);
        return;
    }
    ret = vfs_open(r->srv->vfs, r->in.nodeid, (int)in.flags, &info);
    if (ret < 0) {
        reply_err(r, ret);
        return;
    }
    memset(&out, 0, sizeof(out));
    if (info.direct_io) {
        out.open_flags |= FOPEN_DIRECT_IO;
        out.fh = FH_DIRECT_IO;
    }
    if (info.keep_cache)
        out.open_flags |= FOPEN_KEEP_CACHE;
    reply(r, 0, &out, sizeof(out));
}

/* OPENDIR, as libfuse answered without an opendir operation: a handle of
 * 0 and no flags; READDIR finds out what the node is. */
static void do_opendir(struct req *r)
{
    struct fuse_open_in in;
    struct fuse_open_out out;

    if (take_arg(r, &in, sizeof(in), sizeof(in)) < 0) {
        reply_err(r, -EINVAL);
        return;
    }
    memset(&out, 0, sizeof(out));
    reply(r, 0, &out, sizeof(out));
}

/* A READ's header: before 7.9 it ended after size (24 bytes). */
static int take_read_in(struct req *r, struct fuse_read_in *in)
{
    return take_arg(r, in, sizeof(*in), r->minor < 9 ? 24 : sizeof(*in));
}

static void do_read(struct req *r)
{
    struct fuse_read_in in;
    size_t len;
    void *buf;
    int ret;

    if (take_read_in(r, &in) < 0 || in.size > r->srv->conn.max_read) {
        reply_err(r, -EINVAL);
        return;
    }
    if (in.offset > INT64_MAX) {
        reply_err(r, -EINVAL);
        return;
    }
    buf = payload_buf(r, in.size);
    if (!buf) {
        reply_err(r, -ENOMEM);
        return;
    }
    ret = vfs_read(r->srv->vfs, r->in.nodeid, buf, in.size, in.offset, &len);
    if (ret < 0)
        reply_err(r, ret);
    else
        reply(r, 0, buf, len);
}

/*
 * Whether a WRITE must be durable before its reply: the file was opened
 * O_SYNC or O_DSYNC, or the write came with RWF_SYNC/RWF_DSYNC (the kernel
 * folds both into the flags field, 7.9 on; O_SYNC includes the O_DSYNC
 * bit).  Through the page cache the kernel follows such a write with an
 * FSYNC of its own; through a FOPEN_DIRECT_IO handle it does not, and
 * the daemon is the only one who can keep the promise.
 */
static bool write_must_be_durable(const struct req *r, const struct fuse_write_in *in)
{
    return r->minor >= 9 && in->fh == FH_DIRECT_IO && (in->flags & O_DSYNC);
}

static void do_write(struct req *r)
{
    struct fuse_write_in in;
    struct fuse_write_out out;
    size_t len;
    int ret;

    if (take_arg(r, &in, sizeof(in), r->minor < 9 ? FUSE_COMPAT_WRITE_IN_SIZE
                                                   : sizeof(in)) < 0 ||
        in.size > r->tail_len) {
        reply_err(r, -EINVAL);
        return;
    }
    ret = vfs_write(r->srv->vfs, r->in.nodeid, r->tail, in.size, in.offset, &len);
    if (ret == 0 && write_must_be_durable(r, &in))
        ret = vfs_fsync(r->srv->vfs, r->in.nodeid);
    if (ret < 0) {
        reply_err(r, ret);
        return;
    }
    memset(&out, 0, sizeof(out));
    out.size = (uint32_t)len;
    reply(r, 0, &out, sizeof(out));
}

/* RELEASE, RELEASEDIR, FLUSH: nothing of ours is tied to an open file. */
static void do_release(struct req *r)
{
    struct fuse_release_in in;

    /* lock_owner came with 7.8. */
    if (take_arg(r, &in, sizeof(in), r->minor < 8 ? 16 : sizeof(in)) < 0) {
        reply_err(r, -EINVAL);
        return;
    }
    reply_err(r, 0);
}

static void do_flush(struct req *r)
{
    struct fuse_flush_in in;

    if (take_arg(r, &in, sizeof(in), sizeof(in)) < 0) {
        reply_err(r, -EINVAL);
        return;
    }
    reply_err(r, 0);
}

/* FSYNC and FSYNCDIR: a directory's has nothing to make durable. */
static void do_fsync(struct req *r)
{
    struct fuse_fsync_in in;

    if (take_arg(r, &in, sizeof(in), sizeof(in)) < 0) {
        reply_err(r, -EINVAL);
        return;
    }
    reply_err(r, vfs_fsync(r->srv->vfs, r->in.nodeid));
}

struct dir_fill {
    uint8_t *buf;
    size_t size;
    size_t used;
};

static int add_dirent(void *arg, const char *name, const struct stat *st,
                      uint64_t next_pos)
{
    struct dir_fill *d = arg;
    size_t namelen = strlen(name);
    size_t entlen = FUSE_NAME_OFFSET + namelen;
    size_t padded = FUSE_DIRENT_ALIGN(entlen);
    struct fuse_dirent de;

    if (padded > d->size - d->used)
        return 1;
    de.ino = (uint64_t)st->st_ino;
    de.off = next_pos;
    de.namelen = (uint32_t)namelen;
    de.type = (st->st_mode & S_IFMT) >> 12;
    memcpy(d->buf + d->used, &de, FUSE_NAME_OFFSET);
    memcpy(d->buf + d->used + FUSE_NAME_OFFSET, name, namelen);
    memset(d->buf + d->used + entlen, 0, padded - entlen);
    d->used += padded;
    return 0;
}

static void do_readdir(struct req *r)
{
    struct fuse_read_in in;
    struct dir_fill d = { 0 };
    int ret;

    if (take_read_in(r, &in) < 0) {
        reply_err(r, -EINVAL);
        return;
    }
    if (in.offset > INT64_MAX) {
        reply_err(r, -EINVAL);
        return;
    }
    d.size = in.size < READDIR_MAX ? in.size : READDIR_MAX;
    d.buf = payload_buf(r, d.size);
    if (!d.buf) {
        reply_err(r, -ENOMEM);
        return;
    }
    ret = vfs_readdir(r->srv->vfs, r->in.nodeid, in.offset, add_dirent, &d);
    if (ret < 0)
        reply_err(r, ret);
    else
        reply(r, 0, d.buf, d.used);
}

static void do_statfs(struct req *r)
{
    struct fuse_statfs_out out;
    struct statvfs sv;
    int ret = vfs_statfs(r->srv->vfs, &sv);

    if (ret < 0) {
        reply_err(r, ret);
        return;
    }
    memset(&out, 0, sizeof(out));
    out.st.blocks = sv.f_blocks;
    out.st.bfree = sv.f_bfree;
    out.st.bavail = sv.f_bavail;
    out.st.files = sv.f_files;
    out.st.ffree = sv.f_ffree;
    out.st.bsize = (uint32_t)sv.f_bsize;
    out.st.namelen = (uint32_t)sv.f_namemax;
    out.st.frsize = (uint32_t)sv.f_frsize;
    reply(r, 0, &out, r->minor < 4 ? FUSE_COMPAT_STATFS_SIZE : sizeof(out));
}

/* getxattr(2)'s size rule: size 0 asks for the length. */
static void reply_xattr(struct req *r, int ret, uint32_t size, const void *buf, size_t len)
{
    struct fuse_getxattr_out out;

    if (ret < 0) {
        reply_err(r, ret);
    } else if (size == 0) {
        memset(&out, 0, sizeof(out));
        out.size = (uint32_t)len;
        reply(r, 0, &out, sizeof(out));
    } else {
        reply(r, 0, buf, len);
    }
}

static void do_getxattr(struct req *r)
{
    struct fuse_getxattr_in in;
    const char *name;
    size_t cap, len = 0;
    void *buf = NULL;
    int ret;

    if (take_arg(r, &in, sizeof(in), sizeof(in)) < 0 || !(name = tail_name(r))) {
        reply_err(r, -EINVAL);
        return;
    }
    cap = in.size < XATTR_VALUE_MAX ? in.size : XATTR_VALUE_MAX;
    if (cap && !(buf = payload_buf(r, cap))) {
        reply_err(r, -ENOMEM);
        return;
    }
    ret = vfs_getxattr(r->srv->vfs, r->in.nodeid, name, buf, cap, &len);
    reply_xattr(r, ret, in.size, buf, len);
}

static void do_listxattr(struct req *r)
{
    struct fuse_getxattr_in in;
    size_t cap, len = 0;
    void *buf = NULL;
    int ret;

    if (take_arg(r, &in, sizeof(in), sizeof(in)) < 0) {
        reply_err(r, -EINVAL);
        return;
    }
    cap = in.size < XATTR_VALUE_MAX ? in.size : XATTR_VALUE_MAX;
    if (cap && !(buf = payload_buf(r, cap))) {
        reply_err(r, -ENOMEM);
        return;
    }
    ret = vfs_listxattr(r->srv->vfs, r->in.nodeid, buf, cap, &len);
    reply_xattr(r, ret, in.size, buf, len);
}

static void do_fallocate(struct req *r)
{
    struct fuse_fallocate_in in;

    if (take_arg(r, &in, sizeof(in), sizeof(in)) < 0) {
        reply_err(r, -EINVAL);
        return;
    }
    /* vfs refuses offsets and lengths past INT64_MAX and a zero length. */
    reply_err(r, vfs_fallocate(r->srv->vfs, r->in.nodeid, (int)in.mode, in.offset,
                               in.length));
}

static void do_lseek(struct req *r)
{
    struct fuse_lseek_in in;
    struct fuse_lseek_out out;
    uint64_t result;
    int ret;

    if (take_arg(r, &in, sizeof(in), sizeof(in)) < 0) {
        reply_err(r, -EINVAL);
        return;
    }
    /* A negative offset finds nothing, before the whence is looked at. */
    if (in.offset > INT64_MAX) {
        reply_err(r, -ENXIO);
        return;
    }
    ret = vfs_lseek(r->srv->vfs, r->in.nodeid, in.offset, (int)in.whence, &result);
    if (ret < 0) {
        reply_err(r, ret);
        return;
    }
    out.offset = result;
    reply(r, 0, &out, sizeof(out));
}

/* BATCH_FORGET: no reply, and nothing to forget (vfs keeps no lookup
 * counts); the count is still checked against the request. */
static void do_batch_forget(struct req *r)
{
    struct fuse_batch_forget_in in;

    if (take_arg(r, &in, sizeof(in), sizeof(in)) < 0 ||
        in.count > r->tail_len / sizeof(struct fuse_forget_one))
        log_debug("BATCH_FORGET %llu: malformed, ignored",
                  (unsigned long long)r->in.unique);
}

static const char *opcode_name(uint32_t op)
{
    static const char *const names[] = {
        [FUSE_LOOKUP] = "LOOKUP", [FUSE_FORGET] = "FORGET",
        [FUSE_GETATTR] = "GETATTR", [FUSE_SETATTR] = "SETATTR",
        [FUSE_OPEN] = "OPEN", [FUSE_READ] = "READ", [FUSE_WRITE] = "WRITE",
        [FUSE_STATFS] = "STATFS", [FUSE_RELEASE] = "RELEASE",
        [FUSE_FSYNC] = "FSYNC", [FUSE_SETXATTR] = "SETXATTR",
        [FUSE_GETXATTR] = "GETXATTR", [FUSE_LISTXATTR] = "LISTXATTR",
        [FUSE_REMOVEXATTR] = "REMOVEXATTR", [FUSE_FLUSH] = "FLUSH",
        [FUSE_INIT] = "INIT", [FUSE_OPENDIR] = "OPENDIR",
        [FUSE_READDIR] = "READDIR", [FUSE_RELEASEDIR] = "RELEASEDIR",
        [FUSE_FSYNCDIR] = "FSYNCDIR", [FUSE_ACCESS] = "ACCESS",
        [FUSE_INTERRUPT] = "INTERRUPT", [FUSE_DESTROY] = "DESTROY",
        [FUSE_BATCH_FORGET] = "BATCH_FORGET", [FUSE_FALLOCATE] = "FALLOCATE",
        [FUSE_LSEEK] = "LSEEK",
    };

    return op < sizeof(names) / sizeof(names[0]) && names[op] ? names[op] : "?";
}

void fuse_server_dispatch(struct fuse_server *srv, const struct fuse_request *raw,
                          struct fuse_reply_sink *sink)
{
    struct req r = {
        .srv = srv,
        .op_in = raw->op_in,
        .op_in_len = raw->op_in ? raw->op_in_len : 0,
        .raw = raw,
        .sink = sink,
    };
    size_t payload_len = raw->payload ? raw->payload_len : 0;

    memcpy(&r.in, raw->in, sizeof(r.in));
    if (srv->cfg.debug)
        log_debug("request %llu: %s (%u) node %llu, %zu+%zu bytes",
                  (unsigned long long)r.in.unique, opcode_name(r.in.opcode),
                  r.in.opcode, (unsigned long long)r.in.nodeid, r.op_in_len,
                  payload_len);
    /* No reply to these, whatever they hold. */
    switch (r.in.opcode) {
    case FUSE_FORGET:
    case FUSE_INTERRUPT:        /* image I/O is not aborted: the request ends normally */
    case FUSE_NOTIFY_REPLY:     /* we never ask the kernel to retrieve */
        return;
    }
    if (r.op_in_len > SIZE_MAX - sizeof(r.in) - payload_len ||
        r.in.len != sizeof(r.in) + r.op_in_len + payload_len) {
        log_debug("request %llu: length %u, but %zu bytes arrived",
                  (unsigned long long)r.in.unique, r.in.len,
                  sizeof(r.in) + r.op_in_len + payload_len);
        if (r.in.opcode != FUSE_BATCH_FORGET)
            reply_err(&r, -EIO);
        return;
    }
    if (r.in.opcode == FUSE_BATCH_FORGET) {
        r.minor = FUSE_PROTO_MINOR;
        do_batch_forget(&r);
        return;
    }
    /* Nothing but INIT before INIT, and INIT only once (as libfuse). */
    if (atomic_load_explicit(&srv->initialized, memory_order_acquire) !=
        (r.in.opcode != FUSE_INIT)) {
        reply_err(&r, -EIO);
        return;
    }
    if (r.in.opcode == FUSE_INIT) {
        do_init(&r);
        return;
    }
    r.minor = srv->conn.minor;
    switch (r.in.opcode) {
    case FUSE_LOOKUP:       do_lookup(&r); break;
    case FUSE_GETATTR:      do_getattr(&r); break;
    case FUSE_SETATTR:      do_setattr(&r); break;
    case FUSE_OPEN:         do_open(&r); break;
    case FUSE_READ:         do_read(&r); break;
    case FUSE_WRITE:        do_write(&r); break;
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR:   do_release(&r); break;
    case FUSE_FLUSH:        do_flush(&r); break;
    case FUSE_FSYNC:
    case FUSE_FSYNCDIR:     do_fsync(&r); break;
    case FUSE_OPENDIR:      do_opendir(&r); break;
    case FUSE_READDIR:      do_readdir(&r); break;
    case FUSE_STATFS:       do_statfs(&r); break;
    case FUSE_GETXATTR:     do_getxattr(&r); break;
    case FUSE_LISTXATTR:    do_listxattr(&r); break;
    case FUSE_FALLOCATE:    do_fallocate(&r); break;
    case FUSE_LSEEK:        do_lseek(&r); break;
    case FUSE_DESTROY:      reply_err(&r, 0); break;
    /*
     * Not served, as under libfuse: ENOSYS, which the kernel remembers
     * (it then answers access(2) itself, setxattr and removexattr with
     * EOPNOTSUPP), and every opcode we do not know.
     */
    default:                reply_err(&r, -ENOSYS); break;
    }
}

/* ---- The server ---- */

int fuse_server_new(struct vfs *vfs, const struct fuse_server_config *cfg,
                    struct fuse_server **out)
{
    struct fuse_server *srv;

    srv = calloc(1, sizeof(*srv));
    if (!srv)
        return -ENOMEM;
    if (sem_init(&srv->wake, 0, 0) < 0) {
        free(srv);
        return -ENOMEM;
    }
    pthread_mutex_init(&srv->init_lock, NULL);
    srv->vfs = vfs;
    srv->cfg = *cfg;
    atomic_init(&srv->initialized, false);
    atomic_init(&srv->error, 0);
    atomic_init(&srv->live_workers, 0);
    *out = srv;
    return 0;
}

bool fuse_server_get_conn(struct fuse_server *srv, struct fuse_server_conn *conn)
{
    if (!atomic_load_explicit(&srv->initialized, memory_order_acquire))
        return false;
    *conn = srv->conn;
    return true;
}

void fuse_server_stop(struct fuse_server *srv)
{
    sem_post(&srv->wake);
}

/* ---- Stop signals ---- */

/*
 * SIGTERM, SIGINT and SIGHUP end serve, as libfuse's handlers ended its
 * loop: the handler only posts the server's semaphore (async-signal-safe)
 * and serve does the rest.  SA_RESTART, so that a worker the signal lands
 * on goes on with whatever system call it was in.
 */
static struct fuse_server *signal_server;
static const int stop_signals[] = { SIGTERM, SIGINT, SIGHUP, SIGPIPE };
static bool signal_installed[sizeof(stop_signals) / sizeof(stop_signals[0])];

static void on_stop_signal(int sig)
{
    struct fuse_server *srv = signal_server;

    (void)sig;
    if (srv)
        sem_post(&srv->wake);
}

/* Only where the disposition is the default: what the caller chose to
 * ignore (a background job's SIGINT) stays ignored.  SIGPIPE: ignored. */
void fuse_server_handle_signals(struct fuse_server *srv)
{
    signal_server = srv;
    for (size_t i = 0; i < sizeof(stop_signals) / sizeof(stop_signals[0]); i++) {
        struct sigaction sa, old;

        if (signal_installed[i] || sigaction(stop_signals[i], NULL, &old) < 0 ||
            old.sa_handler != SIG_DFL)
            continue;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = stop_signals[i] == SIGPIPE ? SIG_IGN : on_stop_signal;
        sa.sa_flags = SA_RESTART;
        sigemptyset(&sa.sa_mask);
        signal_installed[i] = sigaction(stop_signals[i], &sa, NULL) == 0;
    }
}

static void remove_signal_handlers(struct fuse_server *srv)
{
    if (signal_server != srv)
        return;
    for (size_t i = 0; i < sizeof(stop_signals) / sizeof(stop_signals[0]); i++) {
        struct sigaction sa;

        if (!signal_installed[i])
            continue;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = SIG_DFL;
        sigemptyset(&sa.sa_mask);
        sigaction(stop_signals[i], &sa, NULL);
        signal_installed[i] = false;
    }
    signal_server = NULL;
}

void fuse_server_free(struct fuse_server *srv)
{
    if (!srv)
        return;
    remove_signal_handlers(srv);
    scratch_release_thread();
    pthread_mutex_destroy(&srv->init_lock);
    sem_destroy(&srv->wake);
    free(srv);
}

/* ---- The classic transport ---- */

/*
 * One worker: its own clone of the session's descriptor (the kernel hands
 * each request to one reader) and one page-aligned buffer, allocated
 * once, that serves as both request and reply buffer:
 *
 *   bytes 0 .. 4095          4096 .. 8191       8192 .. 1 MiB + 8191
 *   [ .. in-hdr, write_in ][ a WRITE's data, up to 1 MiB ............ ]
 *   [ .. any other request ............... ][ a reply's payload ..... ]
 *
 * A request is read to start WRITE_PREFIX bytes before byte 4096, so a
 * WRITE's data lands page-aligned; a reply is built from byte 8192 on,
 * also page-aligned, when the request ended before it: a READ (80 bytes)
 * always does, and a WRITE (the only request that carries data) has no
 * payload to reply with.  A longer request's reply goes to the scratch
 * buffer.  So a reply never overlaps the request it answers (a
 * GETXATTR's name is still read while its reply is built).
 *
 * Why aligned: the kernel copies between our buffer and the reader's (or
 * writer's) pages one page at a time, in chunks that end at a page
 * boundary of either side.  A buffer a few bytes off a page splits every
 * chunk in two and spans one page more: 1 MiB reads at QD16 went 1.20x
 * as fast aligned, with 0.84x the CPU per request (bench/README).  Why
 * one buffer: a worker's peak is 1 MiB less than with a request buffer
 * and a reply buffer.  A READ's reply goes out as one writev of the
 * out-header and the buffer vfs_read filled.
 */
#define WRITE_PREFIX    (sizeof(struct fuse_in_header) + sizeof(struct fuse_write_in))
#define WORKER_BUF_SIZE (PAGE_BYTES + FUSE_SERVER_MAX_WRITE + PAGE_BYTES)
#define REQ_OFFSET      (PAGE_BYTES - WRITE_PREFIX)
#define REPLY_OFFSET    (2 * PAGE_BYTES)

_Static_assert(WORKER_BUF_SIZE - REQ_OFFSET >= WRITE_PREFIX + FUSE_SERVER_MAX_WRITE &&
               WORKER_BUF_SIZE - REQ_OFFSET >= FUSE_MIN_READ_BUFFER,
               "the kernel's check of a read buffer: the largest WRITE and 8 KiB");
_Static_assert(WORKER_BUF_SIZE - REPLY_OFFSET >= FUSE_SERVER_MAX_PAGES * PAGE_BYTES,
               "the largest READ's reply fits past the request");

struct worker {
    struct fuse_reply_sink sink;        /* first: the sink is the worker */
    struct fuse_server *srv;
    pthread_t thread;
    bool started;
    int fd;
    bool own_fd;                        /* a clone, closed with the worker */
    uint8_t *buf;                       /* WORKER_BUF_SIZE bytes, page-aligned */
    size_t req_len;                     /* bytes of the request being served */
    uint64_t unique;                    /* of the request being served */
};

static void *classic_payload_buf(struct fuse_reply_sink *sink, size_t size)
{
    struct worker *w = (struct worker *)sink;

    if (REQ_OFFSET + w->req_len > REPLY_OFFSET || size > WORKER_BUF_SIZE - REPLY_OFFSET)
        return NULL;
    return w->buf + REPLY_OFFSET;
}

static int classic_send(struct fuse_reply_sink *sink, int error, const void *payload,
                        size_t len)
{
    struct worker *w = (struct worker *)sink;
    struct fuse_out_header out = {
        .len = (uint32_t)(sizeof(out) + len),
        .error = error,
        .unique = w->unique,
    };
    struct iovec iov[2] = {
        { .iov_base = &out, .iov_len = sizeof(out) },
        { .iov_base = (void *)payload, .iov_len = len },
    };
    ssize_t n;

    do
        n = writev(w->fd, iov, len ? 2 : 1);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    return 0;
}

/*
 * Read and serve requests until the connection ends (ENODEV: unmounted)
 * or serve cancels the thread.  Cancellation is enabled only around the
 * read, where no request is held: a request once read is always
 * answered.
 *
 * Not instrumented by AddressSanitizer: a thread cancelled in read()
 * unwinds through this frame without ASan clearing the redzones of its
 * locals, and the thread's own exit then trips over them (a false
 * stack-buffer-overflow).  This is the only frame of ours on the stack
 * at the cancellation point.
 */
__attribute__((no_sanitize_address))
static void *worker_main(void *arg)
{
    struct worker *w = arg;
    uint8_t *start = w->buf + REQ_OFFSET;      /* where each request is read to */
    int old;

    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &old);
    for (;;) {
        struct fuse_request req;
        ssize_t n;
        int err;

        pthread_setcancelstate(PTHREAD_CANCEL_ENABLE, &old);
        n = read(w->fd, start, WORKER_BUF_SIZE - REQ_OFFSET);
        err = errno;
        pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &old);
        if (n < 0) {
            /* ENOENT: the request was interrupted before we read it. */
            if (err == EINTR || err == EAGAIN || err == ENOENT)
                continue;
            if (err != ENODEV)
                log_error("reading /dev/fuse: %s; this worker stops", strerror(err));
            break;
        }
        if (n == 0)
            break;              /* not /dev/fuse's way, but an end all the same */
        if ((size_t)n < sizeof(struct fuse_in_header)) {
            /* No unique to answer to: the kernel never sends this. */
            log_error("a %zd-byte request from /dev/fuse, shorter than its header; ignored", n);
            continue;
        }
        w->req_len = (size_t)n;
        req.in = (const struct fuse_in_header *)start;
        req.op_in = start + sizeof(struct fuse_in_header);
        req.op_in_len = (size_t)n - sizeof(struct fuse_in_header);
        req.payload = NULL;
        req.payload_len = 0;
        memcpy(&w->unique, start + offsetof(struct fuse_in_header, unique),
               sizeof(w->unique));
        fuse_server_dispatch(w->srv, &req, &w->sink);
    }
    if (atomic_fetch_sub(&w->srv->live_workers, 1) == 1)
        sem_post(&w->srv->wake);
    return NULL;
}

/* A descriptor of the same connection as @session_fd, or @session_fd
 * itself (shared by the workers) where cloning is refused. */
static int clone_fd(int session_fd, bool *own)
{
    uint32_t master = (uint32_t)session_fd;
    int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);

    if (fd >= 0 && ioctl(fd, FUSE_DEV_IOC_CLONE, &master) == 0) {
        *own = true;
        return fd;
    }
    log_debug("cloning the /dev/fuse descriptor failed (%s); workers share it",
              strerror(errno));
    if (fd >= 0)
        close(fd);
    *own = false;
    return session_fd;
}

static void worker_release(struct worker *w)
{
    if (w->own_fd)
        close(w->fd);
    free(w->buf);
}

static int worker_start(struct fuse_server *srv, struct worker *w, int session_fd)
{
    int ret;

    w->srv = srv;
    w->sink.payload_buf = classic_payload_buf;
    w->sink.send = classic_send;
    w->buf = aligned_alloc(PAGE_BYTES, WORKER_BUF_SIZE);
    if (!w->buf) {
        ret = -ENOMEM;
        goto fail;
    }
    w->fd = clone_fd(session_fd, &w->own_fd);
    atomic_fetch_add(&srv->live_workers, 1);
    ret = -pthread_create(&w->thread, NULL, worker_main, w);
    if (ret < 0) {
        atomic_fetch_sub(&srv->live_workers, 1);
        goto fail;
    }
    w->started = true;
    return 0;
fail:
    worker_release(w);
    return ret;
}

int fuse_server_serve(struct fuse_server *srv, int session_fd, unsigned threads)
{
    struct worker *workers;
    unsigned started = 0;
    int ret = 0;

    if (threads == 0)
        threads = FUSE_SERVER_DEFAULT_THREADS;
    workers = calloc(threads, sizeof(*workers));
    if (!workers)
        return -ENOMEM;
    for (unsigned i = 0; i < threads; i++) {
        ret = worker_start(srv, &workers[i], session_fd);
        if (ret < 0) {
            log_warn("starting FUSE worker %u failed: %s", i + 1, strerror(-ret));
            break;
        }
        started++;
    }
    if (started == 0) {
        free(workers);
        return ret;
    }
    /* Until a stop signal, fuse_server_stop or the last worker's end. */
    while (sem_wait(&srv->wake) < 0 && errno == EINTR)
        ;
    if (atomic_load(&srv->live_workers) > 0)
        log_debug("stopping: finishing the requests in progress");
    for (unsigned i = 0; i < started; i++)
        pthread_cancel(workers[i].thread);
    for (unsigned i = 0; i < started; i++) {
        pthread_join(workers[i].thread, NULL);
        worker_release(&workers[i]);
    }
    free(workers);
    return atomic_load(&srv->error);
}
