/*
 * passthrough — benchmark baseline for qcow2fuse.
 *
 * Exposes one raw host file as MOUNTPOINT/disk with no translation at all:
 * every read and write is one pread/pwrite on the host file at the same
 * offset.  The FUSE session is set up the way qcow2fuse set up its libfuse
 * session before it had its own request loop (src/fuse_server.c):
 * low-level API, FOPEN_DIRECT_IO on open, max_background 64, splice and
 * writeback cache off, multi-threaded loop with clone_fd=1 and at most 16
 * threads, a read buffer per worker thread kept across requests and
 * answered with fuse_reply_buf.  The difference between the two is the
 * cost of the qcow2 layer and the difference between libfuse's loop and
 * qcow2fuse's.
 *
 * usage: passthrough [-f] [FUSE options] RAWFILE MOUNTPOINT
 */
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE

#include <fuse_lowlevel.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define ROOT_INO FUSE_ROOT_ID
#define DISK_INO 2
#define DISK_NAME "disk"
#define PAGE_BYTES 4096u

struct pt {
    int fd;
    struct stat host;           /* owner, mode and times of the raw file */
};

/*
 * The read buffer of a worker thread, grown to the largest request and
 * kept, as qcow2fuse does (src/fuse_server.c): a ceiling must not pay an
 * allocation per request (with glibc's heuristics off, a 1 MiB malloc is
 * an mmap, page faults and a munmap) that the daemon under test no longer
 * pays.  fuse_reply_buf() has
 * written the reply to /dev/fuse before it returns, so the next request
 * may reuse the buffer.  Freed by the key's destructor when the worker
 * exits.  Page-aligned, as qcow2fuse's reply buffer is: the kernel copies
 * a reply into the reader's pages in chunks that end at a page boundary
 * of either side, so a buffer off a page boundary splits every chunk.
 */
struct read_buf {
    char *mem;
    size_t cap;
};

static pthread_key_t read_buf_key;

static void read_buf_free(void *p)
{
    struct read_buf *rb = p;

    free(rb->mem);
    free(rb);
}

/* Returns a buffer of at least @size bytes, or NULL when out of memory. */
static char *read_buf_get(size_t size)
{
    struct read_buf *rb = pthread_getspecific(read_buf_key);
    size_t cap = 64 << 10;
    char *mem;

    if (!rb) {
        rb = calloc(1, sizeof(*rb));
        if (!rb || pthread_setspecific(read_buf_key, rb) != 0) {
            free(rb);
            return NULL;
        }
    }
    if (rb->cap >= size)
        return rb->mem;
    while (cap < size && cap <= SIZE_MAX / 2)
        cap *= 2;
    if (cap < size)
        cap = size;
    mem = aligned_alloc(PAGE_BYTES, (cap + PAGE_BYTES - 1) & ~(size_t)(PAGE_BYTES - 1));
    if (!mem)
        return NULL;
    free(rb->mem);
    rb->mem = mem;
    rb->cap = cap;
    return mem;
}

static struct pt *pt_of(fuse_req_t req)
{
    return fuse_req_userdata(req);
}

static int disk_size(struct pt *pt, off_t *size)
{
    struct stat st;

    if (fstat(pt->fd, &st) < 0)
        return -errno;
    *size = st.st_size;
    return 0;
}

static int fill_attr(struct pt *pt, fuse_ino_t ino, struct stat *st)
{
    off_t size = 0;
    int ret;

    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_uid = pt->host.st_uid;
    st->st_gid = pt->host.st_gid;
    st->st_atim = st->st_mtim = st->st_ctim = pt->host.st_mtim;
    if (ino == ROOT_INO) {
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
        return 0;
    }
    ret = disk_size(pt, &size);
    if (ret < 0)
        return ret;
    st->st_mode = S_IFREG | (pt->host.st_mode & 0666);
    st->st_nlink = 1;
    st->st_size = size;
    st->st_blksize = 4096;
    st->st_blocks = (size + 511) / 512;
    return 0;
}

static void pt_init(void *userdata, struct fuse_conn_info *conn)
{
    conn->max_background = 64;
    conn->want &= ~(unsigned)(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE |
                              FUSE_CAP_SPLICE_MOVE | FUSE_CAP_WRITEBACK_CACHE);
}

static void pt_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_entry_param e;
    int ret;

    if (parent != ROOT_INO || strcmp(name, DISK_NAME) != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    memset(&e, 0, sizeof(e));
    e.ino = DISK_INO;
    e.attr_timeout = 1.0;
    e.entry_timeout = 1.0;
    ret = fill_attr(pt_of(req), DISK_INO, &e.attr);
    if (ret < 0)
        fuse_reply_err(req, -ret);
    else
        fuse_reply_entry(req, &e);
}

static void pt_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;
    int ret;

    if (ino != ROOT_INO && ino != DISK_INO) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    ret = fill_attr(pt_of(req), ino, &st);
    if (ret < 0)
        fuse_reply_err(req, -ret);
    else
        fuse_reply_attr(req, &st, 1.0);
}

static void pt_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    static const char *const names[] = { ".", "..", DISK_NAME };
    static const fuse_ino_t inos[] = { ROOT_INO, ROOT_INO, DISK_INO };
    char buf[512];
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

static void pt_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (ino != DISK_INO) {
        fuse_reply_err(req, ino == ROOT_INO ? EISDIR : ENOENT);
        return;
    }
    fi->direct_io = 1;
    fi->keep_cache = 0;
    fuse_reply_open(req, fi);
}

static void pt_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    struct pt *pt = pt_of(req);
    size_t done = 0;
    char *buf;

    if (off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    buf = read_buf_get(size ? size : 1);
    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    while (done < size) {
        ssize_t n = pread(pt->fd, buf + done, size - done, off + (off_t)done);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fuse_reply_err(req, errno);
            return;
        }
        if (n == 0)
            break;              /* end of the disk: a short read */
        done += (size_t)n;
    }
    fuse_reply_buf(req, buf, done);
}

static void pt_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size,
                     off_t off, struct fuse_file_info *fi)
{
    struct pt *pt = pt_of(req);
    size_t done = 0;
    off_t end;
    int ret;

    if (off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    /* Like a disk (and qcow2fuse): writing never grows the file. */
    ret = disk_size(pt, &end);
    if (ret < 0) {
        fuse_reply_err(req, -ret);
        return;
    }
    if (off >= end) {
        fuse_reply_err(req, size ? ENOSPC : 0);
        return;
    }
    if ((off_t)size > end - off)
        size = (size_t)(end - off);
    while (done < size) {
        ssize_t n = pwrite(pt->fd, buf + done, size - done, off + (off_t)done);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fuse_reply_err(req, errno);
            return;
        }
        done += (size_t)n;
    }
    fuse_reply_write(req, done);
}

static void pt_fsync(fuse_req_t req, fuse_ino_t ino, int datasync,
                     struct fuse_file_info *fi)
{
    /* qcow2fuse answers fsync and fdatasync alike with one fdatasync of
     * the image after its metadata; the raw file has no metadata. */
    fuse_reply_err(req, fdatasync(pt_of(req)->fd) < 0 ? errno : 0);
}

static void pt_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fuse_reply_err(req, 0);
}

static void pt_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fuse_reply_err(req, 0);
}

static void pt_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off,
                         off_t len, struct fuse_file_info *fi)
{
    fuse_reply_err(req, fallocate(pt_of(req)->fd, mode, off, len) < 0 ? errno : 0);
}

static void pt_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr,
                       int to_set, struct fuse_file_info *fi)
{
    struct pt *pt = pt_of(req);
    struct stat st;
    int ret;

    if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    if ((to_set & FUSE_SET_ATTR_SIZE) && ino == DISK_INO &&
        ftruncate(pt->fd, attr->st_size) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    ret = fill_attr(pt, ino, &st);
    if (ret < 0)
        fuse_reply_err(req, -ret);
    else
        fuse_reply_attr(req, &st, 1.0);
}

static void pt_statfs(fuse_req_t req, fuse_ino_t ino)
{
    struct statvfs sv;
    off_t size = 0;

    memset(&sv, 0, sizeof(sv));
    disk_size(pt_of(req), &size);
    sv.f_bsize = 4096;
    sv.f_frsize = 4096;
    sv.f_blocks = ((uint64_t)size + 4095) / 4096;
    sv.f_files = 2;
    sv.f_namemax = 255;
    fuse_reply_statfs(req, &sv);
}

static const struct fuse_lowlevel_ops pt_ops = {
    .init = pt_init,
    .lookup = pt_lookup,
    .getattr = pt_getattr,
    .readdir = pt_readdir,
    .open = pt_open,
    .read = pt_read,
    .write = pt_write,
    .fsync = pt_fsync,
    .flush = pt_flush,
    .release = pt_release,
    .fallocate = pt_fallocate,
    .setattr = pt_setattr,
    .statfs = pt_statfs,
};

struct cli {
    char *file;
    char *mountpoint;
    int foreground;
};

static int opt_proc(void *data, const char *arg, int key, struct fuse_args *outargs)
{
    struct cli *cli = data;

    if (key == FUSE_OPT_KEY_NONOPT) {
        if (!cli->file) {
            cli->file = strdup(arg);
            return 0;
        }
        if (!cli->mountpoint) {
            cli->mountpoint = strdup(arg);
            return 0;
        }
        fprintf(stderr, "passthrough: unexpected argument \"%s\"\n", arg);
        return -1;
    }
    if (strcmp(arg, "-f") == 0) {
        cli->foreground = 1;
        return 0;
    }
    return 1;                   /* everything else goes to libfuse */
}

int main(int argc, char *argv[])
{
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    struct cli cli = { 0 };
    struct pt pt = { .fd = -1 };
    struct fuse_session *se = NULL;
    struct fuse_loop_config *lc;
    int ret = 1;

    if (pthread_key_create(&read_buf_key, read_buf_free) != 0)
        goto out;
    if (fuse_opt_parse(&args, &cli, NULL, opt_proc) < 0)
        goto out;
    if (!cli.file || !cli.mountpoint) {
        fprintf(stderr, "usage: passthrough [-f] [-o OPTIONS] RAWFILE MOUNTPOINT\n");
        goto out;
    }
    pt.fd = open(cli.file, O_RDWR | O_CLOEXEC);
    if (pt.fd < 0 || fstat(pt.fd, &pt.host) < 0) {
        fprintf(stderr, "passthrough: %s: %s\n", cli.file, strerror(errno));
        goto out;
    }
    if (!S_ISREG(pt.host.st_mode)) {
        fprintf(stderr, "passthrough: %s: not a regular file\n", cli.file);
        goto out;
    }
    if (fuse_opt_add_arg(&args, "-osubtype=passthrough,fsname=bench-passthrough") < 0)
        goto out;
    se = fuse_session_new(&args, &pt_ops, sizeof(pt_ops), &pt);
    if (!se)
        goto out;
    if (fuse_set_signal_handlers(se) < 0)
        goto out_destroy;
    if (fuse_session_mount(se, cli.mountpoint) < 0)
        goto out_destroy;
    if (fuse_daemonize(cli.foreground) < 0)
        goto out_unmount;
    lc = fuse_loop_cfg_create();
    if (lc) {
        fuse_loop_cfg_set_clone_fd(lc, 1);
        fuse_loop_cfg_set_max_threads(lc, 16);
        fuse_loop_cfg_set_idle_threads(lc, 16);
        ret = fuse_session_loop_mt(se, lc) < 0 ? 1 : 0;
        fuse_loop_cfg_destroy(lc);
    }
out_unmount:
    fuse_session_unmount(se);
out_destroy:
    fuse_remove_signal_handlers(se);
    fuse_session_destroy(se);
out:
    if (pt.fd >= 0)
        close(pt.fd);
    fuse_opt_free_args(&args);
    free(cli.file);
    free(cli.mountpoint);
    return ret;
}
