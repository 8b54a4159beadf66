/*
 * fuse_server — the FUSE boundary: our own request loop over /dev/fuse.
 * libfuse only parses options and mounts (fuse_session_mount; the
 * caller unmounts with fuse_session_unmount); this module answers
 * FUSE_INIT itself, decodes every request, serves it from the mount's
 * tree (vfs) and encodes the reply.  It is the only place a -errno
 * becomes a reply (fuse_server_dispatch, declared in fuse_transport.h).
 *
 * Two parts: the dispatcher, which any transport calls (fuse_transport.h),
 * and the classic transport, fuse_server_serve: one worker thread per
 * cloned /dev/fuse descriptor, each with its request and reply buffers
 * allocated once.
 */
#ifndef QCOW2FUSE_FUSE_SERVER_H
#define QCOW2FUSE_FUSE_SERVER_H

#include "fuse_transport.h"

#include <stdbool.h>
#include <stdint.h>

struct vfs;
struct fuse_server;

/* The largest WRITE (bytes of data) and READ we negotiate: 256 pages. */
#define FUSE_SERVER_MAX_WRITE   (1u << 20)
#define FUSE_SERVER_MAX_PAGES   256u
/*
 * Classic workers when the caller does not say.  Measured on 2 vCPUs
 * (bench/run.sh, 3 s x 3, 16 against 8 workers): 4k random reads at QD16
 * 62.7k against 80.9k IOPS (8 won all three runs, with less CPU per
 * request: the kernel wakes the idle readers in turn, and fewer of them
 * stay warm), 1 MiB reads and 4k overwrites at QD16 within noise.  Eight
 * still leave threads free while others wait for a host flush.
 */
#define FUSE_SERVER_DEFAULT_THREADS 8u

/* What INIT settled, for a transport that sizes its buffers by it. */
struct fuse_server_conn {
    uint32_t minor;             /* negotiated protocol minor; major is 7 */
    uint32_t max_write;         /* data bytes of one WRITE, at most */
    uint32_t max_read;          /* bytes one READ asks for, at most */
    uint64_t flags;             /* the INIT reply's flags | flags2 << 32 */
    bool io_uring;              /* FUSE_OVER_IO_URING was negotiated */
};

/*
 * Called once, in the thread that answered INIT, after the reply has gone
 * out (the io_uring transport registers its queues here: the kernel
 * accepts that only once INIT is done).  Requests may already arrive on
 * the classic workers meanwhile; they serve them until the rings are up.
 */
typedef void (*fuse_server_init_fn)(void *arg, struct fuse_server *srv,
                                    const struct fuse_server_conn *conn);

struct fuse_server_config {
    unsigned max_background;    /* the kernel's queue of background requests; 0: its default */
    bool io_uring;              /* ask for FUSE_OVER_IO_URING if the kernel offers it */
    bool debug;                 /* log every request (-d) */
    fuse_server_init_fn after_init;     /* may be NULL */
    void *after_init_arg;
};

/*
 * A server for @vfs (not owned).
 * Returns: 0 or -ENOMEM; *out is the server.
 */
int fuse_server_new(struct vfs *vfs, const struct fuse_server_config *cfg,
                    struct fuse_server **out);

/*
 * On entry: no request is in flight and none will come (serve has
 * returned, other transports are stopped).
 * On exit: @srv is freed, the stop-signal handlers are removed, and the
 * calling thread's scratch buffers (scratch.h) are freed.
 */
void fuse_server_free(struct fuse_server *srv);

/* Returns: true with *conn filled once INIT has been answered. */
bool fuse_server_get_conn(struct fuse_server *srv, struct fuse_server_conn *conn);

/*
 * The classic transport: serve the FUSE connection of @session_fd (from
 * fuse_session_fd) with @threads workers (0: the default), each reading
 * its own clone of the descriptor, until the file system is unmounted,
 * a stop signal arrives (fuse_server_handle_signals) or fuse_server_stop
 * is called (also before serve: it then returns at once).
 * On exit: every worker has finished its request and ended; @session_fd
 * is still open (the caller unmounts with fuse_session_unmount, which
 * ends requests still queued in the kernel).
 * Returns: 0; -EPROTO when the kernel's INIT could not be answered;
 * -errno when no worker could start.
 */
int fuse_server_serve(struct fuse_server *srv, int session_fd, unsigned threads);

/* Make fuse_server_serve return, as a stop signal does.  Async-signal-safe. */
void fuse_server_stop(struct fuse_server *srv);

/*
 * SIGTERM, SIGINT and SIGHUP call fuse_server_stop(@srv) from here until
 * fuse_server_free: handlers are installed for those whose disposition is
 * the default (an ignored one stays ignored, as with libfuse); SIGPIPE,
 * if default, is ignored.
 */
void fuse_server_handle_signals(struct fuse_server *srv);

#endif
