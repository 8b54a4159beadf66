/*
 * io — the bottom layer: positioned reads and writes on a host file through a
 * small table of function pointers, so tests can swap in a memory backend, a
 * tracing backend (records every write and flush for the power-loss replay)
 * or a fault-injecting one.  Nothing above this layer calls pread/pwrite.
 *
 * Locking rule: backends are safe to call from several threads at once as
 * long as the byte ranges of concurrent writes do not overlap (as pread and
 * pwrite are).  The trace backend serialises its log itself.
 */
#ifndef QCOW2FUSE_IO_H
#define QCOW2FUSE_IO_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct io;

struct io_ops {
    /* Read exactly @len bytes; bytes past the end of the file read as zero. */
    int (*pread)(struct io *io, void *buf, size_t len, uint64_t offset);
    int (*pwrite)(struct io *io, const void *buf, size_t len, uint64_t offset);
    int (*flush)(struct io *io);
    int (*get_size)(struct io *io, uint64_t *size);
    int (*truncate)(struct io *io, uint64_t size);
    /* Release host space; the range reads as zeros afterwards. */
    int (*punch_hole)(struct io *io, uint64_t offset, uint64_t len);
    /* Optional: record a named point in time (trace backend only). */
    void (*mark)(struct io *io, uint32_t what, uint64_t arg);
    void (*close)(struct io *io);
};

struct io {
    const struct io_ops *ops;
    bool read_only;
    /* Bytes written or punched (plus one per truncate) through the calls
     * below: a flush whose caller saw no change since its last flush has
     * nothing to make durable. */
    _Atomic uint64_t changes;
    /*
     * 0, or the -errno of the first failed flush.  Sticky: after a failed
     * fdatasync Linux drops the dirty pages it could not write and the next
     * call returns 0, so nothing written since the last good flush can be
     * trusted to be on disk.  From then on every write, punch, truncate and
     * flush through the calls below fails with -EIO (reads go on), so that
     * no metadata pointing at the lost data reaches the disk.
     */
    _Atomic int flush_error;
    /* For the one log line of a failed flush (see io_set_name), or NULL. */
    const char *name;
};

/* Record a failed flush (io.c): sets flush_error, logs once if named. */
void io_flush_failed(struct io *io, int err);

static inline int io_pread(struct io *io, void *buf, size_t len, uint64_t off)
{
    return io->ops->pread(io, buf, len, off);
}
static inline int io_pwrite(struct io *io, const void *buf, size_t len, uint64_t off)
{
    int ret = io->read_only ? -EROFS : io->flush_error ? -EIO
                                     : io->ops->pwrite(io, buf, len, off);
    if (ret == 0)
        io->changes += len ? len : 1;
    return ret;
}
static inline int io_flush(struct io *io)
{
    int ret;

    if (io->read_only)
        return 0;
    if (io->flush_error)
        return -EIO;
    ret = io->ops->flush(io);
    if (ret < 0)
        io_flush_failed(io, ret);
    return ret;
}
static inline int io_get_size(struct io *io, uint64_t *size)
{
    return io->ops->get_size(io, size);
}
static inline int io_truncate(struct io *io, uint64_t size)
{
    int ret = io->read_only ? -EROFS : io->flush_error ? -EIO
                                     : io->ops->truncate(io, size);
    if (ret == 0)
        io->changes++;
    return ret;
}
static inline int io_punch_hole(struct io *io, uint64_t off, uint64_t len)
{
    int ret = io->read_only ? -EROFS : io->flush_error ? -EIO
                                     : io->ops->punch_hole(io, off, len);
    if (ret == 0)
        io->changes += len ? len : 1;
    return ret;
}
static inline void io_mark(struct io *io, uint32_t what, uint64_t arg)
{
    if (io->ops->mark)
        io->ops->mark(io, what, arg);
}
void io_close(struct io *io);

/*
 * Name @io for the log line of a failed flush ("PATH: host flush failed:
 * ...").  @name must outlive @io.  Unnamed backends (the inner ones of a
 * wrapper) fail just as sticky, silently: the named outer one logs.
 */
void io_set_name(struct io *io, const char *name);

/*
 * Make @io fail as if its own flush had failed with @err, without logging:
 * for a file whose metadata depends on another file's data (the image file
 * and its external data file).  Does nothing if @io already failed.
 */
void io_poison(struct io *io, int err);

/* 0, or the -errno of the first failed flush of @io (or io_poison). */
static inline int io_flush_error(const struct io *io)
{
    return io->flush_error;
}

/* A host file.  Returns 0 or -errno; *out owns the descriptor. */
int io_open_file(const char *path, bool writable, struct io **out);
/* The descriptor of a file backend (for locking), or -1. */
int io_file_fd(struct io *io);

/*
 * Take QEMU-compatible OFD byte-range locks on a file backend (others: no-op)
 * for a reader (@writable false) or a writer, after probing for conflicts.
 * Returns: 0, -EAGAIN when another process holds a conflicting lock
 * (logged, naming the permission and @path), -errno.
 */
int io_lock_image(struct io *io, const char *path, bool writable);

/*
 * Memory backend over a copy of @data (may be NULL with @len 0); grows on
 * write.  Used by unit tests and fuzz targets.
 */
int io_open_memory(const void *data, size_t len, struct io **out);
/* Fault injection: after @n more successful writes, every write fails EIO. */
void io_memory_fail_writes_after(struct io *io, long n);
/* The memory backend's current contents and length. */
const uint8_t *io_memory_data(struct io *io, size_t *len);

/*
 * Trace backend: forwards to @inner and appends a record of every write,
 * flush, punch, truncate and mark to @log_fd (format in io_trace_record).
 * Takes ownership of @inner and of @log_fd (closed by io_close).
 */
enum io_trace_type {
    IO_TRACE_WRITE = 1,
    IO_TRACE_FLUSH = 2,
    IO_TRACE_PUNCH = 3,
    IO_TRACE_TRUNCATE = 4,
    IO_TRACE_MARK = 5,
};
struct io_trace_record {
    uint32_t type;      /* enum io_trace_type */
    uint32_t what;      /* IO_TRACE_MARK: caller's code */
    uint64_t offset;    /* WRITE/PUNCH: host offset; TRUNCATE: size; MARK: arg */
    uint64_t length;    /* WRITE: payload bytes that follow the record */
};
int io_open_trace(struct io *inner, int log_fd, struct io **out);

#endif
