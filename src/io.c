/*
 * io — backends for the host-file layer (POSIX file, memory, trace) and the
 * sticky error of a failed flush (see io.h).
 */
#include "io.h"

#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

void io_close(struct io *io)
{
    if (io)
        io->ops->close(io);
}

void io_set_name(struct io *io, const char *name)
{
    io->name = name;
}

/* Returns whether this call set the error (the first failure). */
static bool set_flush_error(struct io *io, int err)
{
    int none = 0;

    return atomic_compare_exchange_strong(&io->flush_error, &none, err < 0 ? err : -EIO);
}

void io_flush_failed(struct io *io, int err)
{
    if (set_flush_error(io, err) && io->name)
        log_error("%s: host flush failed: %s; what was written since the last "
                  "successful flush may be lost, so from now on every write and "
                  "flush fails with EIO (reads go on); unmount, then check the "
                  "image", io->name, strerror(err < 0 ? -err : EIO));
}

void io_poison(struct io *io, int err)
{
    (void)set_flush_error(io, err);
}

/* ---- POSIX file ---------------------------------------------------------- */

struct io_file {
    struct io io;
    int fd;
    /* Flushes one at a time: of two concurrent fdatasync calls after a
     * failed writeback only one reports the error, the other returns 0 for
     * pages that were dropped.  flush_failed (under the lock) makes the
     * error stick before the next flush can start. */
    pthread_mutex_t flush_lock;
    int flush_failed;
};

static int file_pread(struct io *io, void *buf, size_t len, uint64_t off)
{
    struct io_file *f = (struct io_file *)io;
    uint8_t *p = buf;

    while (len > 0) {
        ssize_t n = pread(f->fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0) {               /* past EOF: zeros */
            memset(p, 0, len);
            return 0;
        }
        p += n;
        off += (uint64_t)n;
        len -= (size_t)n;
    }
    return 0;
}

static int file_pwrite(struct io *io, const void *buf, size_t len, uint64_t off)
{
    struct io_file *f = (struct io_file *)io;
    const uint8_t *p = buf;

    while (len > 0) {
        ssize_t n = pwrite(f->fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += n;
        off += (uint64_t)n;
        len -= (size_t)n;
    }
    return 0;
}

static int file_flush(struct io *io)
{
    struct io_file *f = (struct io_file *)io;
    int ret;

    pthread_mutex_lock(&f->flush_lock);
    ret = f->flush_failed;
    if (ret == 0 && fdatasync(f->fd) < 0)
        ret = f->flush_failed = -errno;
    pthread_mutex_unlock(&f->flush_lock);
    return ret;
}

static int file_get_size(struct io *io, uint64_t *size)
{
    struct io_file *f = (struct io_file *)io;
    struct stat st;

    if (fstat(f->fd, &st) < 0)
        return -errno;
    if (S_ISBLK(st.st_mode)) {
        off_t end = lseek(f->fd, 0, SEEK_END);
        if (end < 0)
            return -errno;
        *size = (uint64_t)end;
    } else {
        *size = (uint64_t)st.st_size;
    }
    return 0;
}

static int file_truncate(struct io *io, uint64_t size)
{
    struct io_file *f = (struct io_file *)io;
    return ftruncate(f->fd, (off_t)size) < 0 ? -errno : 0;
}

static int file_punch_hole(struct io *io, uint64_t off, uint64_t len)
{
    struct io_file *f = (struct io_file *)io;
    if (fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)off, (off_t)len) < 0)
        return -errno;
    return 0;
}

static void file_close(struct io *io)
{
    struct io_file *f = (struct io_file *)io;
    close(f->fd);
    pthread_mutex_destroy(&f->flush_lock);
    free(f);
}

static const struct io_ops file_ops = {
    .pread = file_pread,
    .pwrite = file_pwrite,
    .flush = file_flush,
    .get_size = file_get_size,
    .truncate = file_truncate,
    .punch_hole = file_punch_hole,
    .close = file_close,
};

int io_open_file(const char *path, bool writable, struct io **out)
{
    struct io_file *f;
    int fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);

    if (fd < 0)
        return -errno;
    f = calloc(1, sizeof(*f));
    if (!f) {
        close(fd);
        return -ENOMEM;
    }
    f->io.ops = &file_ops;
    f->io.read_only = !writable;
    f->fd = fd;
    pthread_mutex_init(&f->flush_lock, NULL);
    *out = &f->io;
    return 0;
}

static const struct io_ops trace_ops;
struct io_trace;
static struct io *trace_inner(struct io *io);

int io_file_fd(struct io *io)
{
    if (io->ops == &trace_ops)
        return io_file_fd(trace_inner(io));
    return io->ops == &file_ops ? ((struct io_file *)io)->fd : -1;
}

/* ---- memory -------------------------------------------------------------- */

struct io_memory {
    struct io io;
    pthread_mutex_t lock;
    uint8_t *data;
    size_t len, cap;            /* bytes in use, allocated */
    long writes_left;           /* < 0: no fault injection */
};

static int mem_pread(struct io *io, void *buf, size_t len, uint64_t off)
{
    struct io_memory *m = (struct io_memory *)io;
    size_t avail = 0;

    pthread_mutex_lock(&m->lock);
    if (off < m->len)
        avail = m->len - off < len ? m->len - off : len;
    if (avail)
        memcpy(buf, m->data + off, avail);
    memset((uint8_t *)buf + avail, 0, len - avail);
    pthread_mutex_unlock(&m->lock);
    return 0;
}

static int mem_resize(struct io_memory *m, uint64_t size)
{
    uint8_t *p;

    if (size > ((uint64_t)1 << 30))     /* the memory backend is for tests */
        return -EFBIG;
    /* Capacity doubles: an image grows a cluster at a time, and copying
     * it at every step is quadratic (a sanitizer's realloc always copies). */
    if (size > m->cap) {
        size_t cap = m->cap * 2 > size ? m->cap * 2 : size;
        if (cap > ((size_t)1 << 30))
            cap = (size_t)1 << 30;      /* >= size, checked above */
        p = realloc(m->data, cap ? cap : 1);
        if (!p)
            return -ENOMEM;
        m->data = p;
        m->cap = cap;
    }
    if (size > m->len)
        memset(m->data + m->len, 0, size - m->len);
    m->len = size;
    return 0;
}

static int mem_pwrite(struct io *io, const void *buf, size_t len, uint64_t off)
{
    struct io_memory *m = (struct io_memory *)io;
    int ret = 0;

    pthread_mutex_lock(&m->lock);
    if (m->writes_left == 0) {
        ret = -EIO;
        goto out;
    }
    if (m->writes_left > 0)
        m->writes_left--;
    if (off + len > m->len) {
        ret = mem_resize(m, off + len);
        if (ret < 0)
            goto out;
    }
    memcpy(m->data + off, buf, len);
out:
    pthread_mutex_unlock(&m->lock);
    return ret;
}

/* Failed writes are reported by the writes: a flush of the memory backend
 * never fails (a failed flush poisons the io for good, see io.h; tests
 * of it use a backend of their own). */
static int mem_flush(struct io *io)
{
    (void)io;
    return 0;
}

static int mem_get_size(struct io *io, uint64_t *size)
{
    struct io_memory *m = (struct io_memory *)io;
    pthread_mutex_lock(&m->lock);
    *size = m->len;
    pthread_mutex_unlock(&m->lock);
    return 0;
}

static int mem_truncate(struct io *io, uint64_t size)
{
    struct io_memory *m = (struct io_memory *)io;
    int ret;
    pthread_mutex_lock(&m->lock);
    ret = mem_resize(m, size);
    pthread_mutex_unlock(&m->lock);
    return ret;
}

static int mem_punch_hole(struct io *io, uint64_t off, uint64_t len)
{
    struct io_memory *m = (struct io_memory *)io;
    pthread_mutex_lock(&m->lock);
    if (off < m->len)
        memset(m->data + off, 0, m->len - off < len ? m->len - off : len);
    pthread_mutex_unlock(&m->lock);
    return 0;
}

static void mem_close(struct io *io)
{
    struct io_memory *m = (struct io_memory *)io;
    pthread_mutex_destroy(&m->lock);
    free(m->data);
    free(m);
}

static const struct io_ops memory_ops = {
    .pread = mem_pread,
    .pwrite = mem_pwrite,
    .flush = mem_flush,
    .get_size = mem_get_size,
    .truncate = mem_truncate,
    .punch_hole = mem_punch_hole,
    .close = mem_close,
};

int io_open_memory(const void *data, size_t len, struct io **out)
{
    struct io_memory *m = calloc(1, sizeof(*m));

    if (!m)
        return -ENOMEM;
    m->data = malloc(len ? len : 1);
    if (!m->data) {
        free(m);
        return -ENOMEM;
    }
    if (len)
        memcpy(m->data, data, len);
    m->len = m->cap = len;
    m->writes_left = -1;
    pthread_mutex_init(&m->lock, NULL);
    m->io.ops = &memory_ops;
    *out = &m->io;
    return 0;
}

void io_memory_fail_writes_after(struct io *io, long n)
{
    struct io_memory *m = (struct io_memory *)io;
    pthread_mutex_lock(&m->lock);
    m->writes_left = n;
    pthread_mutex_unlock(&m->lock);
}

const uint8_t *io_memory_data(struct io *io, size_t *len)
{
    struct io_memory *m = (struct io_memory *)io;
    *len = m->len;
    return m->data;
}

/* ---- trace --------------------------------------------------------------- */

struct io_trace {
    struct io io;
    struct io *inner;
    int log_fd;
    pthread_mutex_t lock;
};

static void trace_append(struct io_trace *t, uint32_t type, uint32_t what,
                         uint64_t offset, uint64_t length, const void *payload)
{
    struct io_trace_record rec = {
        .type = type, .what = what, .offset = offset, .length = length,
    };
    /* The log is test instrumentation: a failed append is reported by the
     * replay tool as a short log, so it is not propagated here. */
    if (write(t->log_fd, &rec, sizeof(rec)) != (ssize_t)sizeof(rec))
        return;
    if (payload && length)
        if (write(t->log_fd, payload, length) != (ssize_t)length)
            return;
}

static struct io *trace_inner(struct io *io)
{
    return ((struct io_trace *)io)->inner;
}

static int trace_pread(struct io *io, void *buf, size_t len, uint64_t off)
{
    struct io_trace *t = (struct io_trace *)io;
    return io_pread(t->inner, buf, len, off);
}

/*
 * The record is appended under the lock together with the write itself, so
 * the log order is an order the host could have seen.
 */
static int trace_pwrite(struct io *io, const void *buf, size_t len, uint64_t off)
{
    struct io_trace *t = (struct io_trace *)io;
    int ret;

    pthread_mutex_lock(&t->lock);
    ret = io_pwrite(t->inner, buf, len, off);
    if (ret == 0)
        trace_append(t, IO_TRACE_WRITE, 0, off, len, buf);
    pthread_mutex_unlock(&t->lock);
    return ret;
}

static int trace_flush(struct io *io)
{
    struct io_trace *t = (struct io_trace *)io;
    int ret;

    pthread_mutex_lock(&t->lock);
    ret = io_flush(t->inner);
    if (ret == 0)
        trace_append(t, IO_TRACE_FLUSH, 0, 0, 0, NULL);
    pthread_mutex_unlock(&t->lock);
    return ret;
}

static int trace_get_size(struct io *io, uint64_t *size)
{
    struct io_trace *t = (struct io_trace *)io;
    return io_get_size(t->inner, size);
}

static int trace_truncate(struct io *io, uint64_t size)
{
    struct io_trace *t = (struct io_trace *)io;
    int ret;

    pthread_mutex_lock(&t->lock);
    ret = io_truncate(t->inner, size);
    if (ret == 0)
        trace_append(t, IO_TRACE_TRUNCATE, 0, size, 0, NULL);
    pthread_mutex_unlock(&t->lock);
    return ret;
}

static int trace_punch_hole(struct io *io, uint64_t off, uint64_t len)
{
    struct io_trace *t = (struct io_trace *)io;
    int ret;

    pthread_mutex_lock(&t->lock);
    ret = io_punch_hole(t->inner, off, len);
    if (ret == 0)
        trace_append(t, IO_TRACE_PUNCH, 0, off, len, NULL);
    pthread_mutex_unlock(&t->lock);
    return ret;
}

static void trace_mark(struct io *io, uint32_t what, uint64_t arg)
{
    struct io_trace *t = (struct io_trace *)io;

    pthread_mutex_lock(&t->lock);
    trace_append(t, IO_TRACE_MARK, what, arg, 0, NULL);
    pthread_mutex_unlock(&t->lock);
}

static void trace_close(struct io *io)
{
    struct io_trace *t = (struct io_trace *)io;
    io_close(t->inner);
    close(t->log_fd);
    pthread_mutex_destroy(&t->lock);
    free(t);
}

static const struct io_ops trace_ops = {
    .pread = trace_pread,
    .pwrite = trace_pwrite,
    .flush = trace_flush,
    .get_size = trace_get_size,
    .truncate = trace_truncate,
    .punch_hole = trace_punch_hole,
    .mark = trace_mark,
    .close = trace_close,
};

int io_open_trace(struct io *inner, int log_fd, struct io **out)
{
    struct io_trace *t = calloc(1, sizeof(*t));

    if (!t)
        return -ENOMEM;
    t->io.ops = &trace_ops;
    t->io.read_only = inner->read_only;
    t->inner = inner;
    t->log_fd = log_fd;
    pthread_mutex_init(&t->lock, NULL);
    *out = &t->io;
    return 0;
}

/* ---- image locking ---------------------------------------------------------- */

/*
 * QEMU-compatible image locking: OFD locks on byte 100+i for each permission
 * held and 200+i for each permission not shared with others (0 consistent
 * read, 1 write, 3 resize).  A conflicting lock held by anyone else means
 * the image is in use in an incompatible way.
 */
int io_lock_image(struct io *io, const char *path, bool writable)
{
    static const char *const perm_names[] = { "consistent read", "write",
                                              "write unchanged", "resize" };
    const unsigned held_rw[] = { 0, 1, 3 }, held_ro[] = { 0 };
    const unsigned unshared[] = { 1, 3 };
    const unsigned *held = writable ? held_rw : held_ro;
    unsigned nb_held = writable ? 3 : 1;
    int fd = io_file_fd(io);
    struct flock fl;

    if (fd < 0)
        return 0;
    /* Probe: others refusing to share what we hold, or holding what we
     * refuse to share. */
    for (unsigned pass = 0; pass < 2; pass++) {
        unsigned n = pass == 0 ? nb_held : 2;
        for (unsigned i = 0; i < n; i++) {
            unsigned perm = pass == 0 ? held[i] : unshared[i];
            memset(&fl, 0, sizeof(fl));
            fl.l_type = F_WRLCK;
            fl.l_whence = SEEK_SET;
            fl.l_start = (pass == 0 ? 200 : 100) + perm;
            fl.l_len = 1;
            if (fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK) {
                log_error("%s: failed to get the image lock: another process "
                          "(QEMU?) %s \"%s\" access to the image; stop it%s", path,
                          pass == 0 ? "refuses to share" : "holds",
                          perm_names[perm], " first");
                return -EAGAIN;
            }
        }
    }
    for (unsigned pass = 0; pass < 2; pass++) {
        unsigned n = pass == 0 ? nb_held : 2;
        for (unsigned i = 0; i < n; i++) {
            memset(&fl, 0, sizeof(fl));
            fl.l_type = F_RDLCK;
            fl.l_whence = SEEK_SET;
            fl.l_start = pass == 0 ? 100 + held[i] : 200 + unshared[i];
            fl.l_len = 1;
            if (fcntl(fd, F_OFD_SETLK, &fl) < 0) {
                int err = errno;
                log_error("%s: failed to get the image lock (byte %lld): %s",
                          path, (long long)fl.l_start, strerror(err));
                return -err;
            }
        }
    }
    return 0;
}

