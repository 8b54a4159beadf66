/*
 * fuse_uring — the FUSE-over-io_uring transport (kernel 6.14+, off unless
 * /sys/module/fuse/parameters/enable_uring is Y).
 *
 * The kernel keeps one ring queue per possible CPU and queues each request
 * on the queue of the CPU its submitter runs on; a request never moves to
 * another queue.  Each queue here owns N entries (a header area and a
 * payload buffer each) registered with FUSE_IO_URING_CMD_REGISTER; the
 * kernel completes an entry's command when it has put a request in it, and
 * the reply goes back with FUSE_IO_URING_CMD_COMMIT_AND_FETCH, which also
 * hands the entry back for the next request.  Every request is served by
 * fuse_server_dispatch() in the thread that received it.
 *
 * FORGET and INTERRUPT still arrive on the /dev/fuse fd: the caller keeps
 * one classic reader on it while the ring runs.
 */
#ifndef QCOW2FUSE_FUSE_URING_H
#define QCOW2FUSE_FUSE_URING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* FUSE_INIT flag (protocol 7.42): bit 41 of flags | flags2 << 32. */
#ifndef FUSE_OVER_IO_URING
#define FUSE_OVER_IO_URING (1ULL << 41)
#endif

struct fuse_server;
struct fuse_uring;

struct fuse_uring_config {
    int dev_fd;                 /* the /dev/fuse fd FUSE_INIT was answered on */
    size_t max_write;           /* as FUSE_INIT negotiated */
    unsigned max_pages;         /* as FUSE_INIT negotiated */
    unsigned queue_depth;       /* entries per queue; 0: FUSE_URING_DEFAULT_DEPTH */
    /*
     * Threads that serve the queues, each with its own io_uring: 0 = one
     * per queue.  Without @spread and with at most one thread per queue,
     * queue q belongs to thread q % threads alone; with more, thread i
     * serves queue i % queues, so a queue has several threads and the
     * kernel gives a request to whichever of their entries it finds free
     * (the one that was handed back last).  With @spread, every thread
     * holds @queue_depth entries of every queue, so a request waits for a
     * thread only when all threads are busy, whatever CPU it came from.
     */
    unsigned threads;
    bool spread;
    bool pin;                   /* a queue's first thread runs on the queue's CPU */
    /* Rings with IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN: completions are
     * run only when the thread waits, not by interrupting its work. */
    bool defer_taskrun;
};

#define FUSE_URING_DEFAULT_DEPTH 8

/*
 * A layout for measurements: "threads=N,depth=N,spread,pin,nopin,defer,nodefer" (any of them,
 * comma-separated) over what @cfg holds.  Returns 0, or -EINVAL with @cfg
 * as it was (a word it does not know changes nothing).
 */
int fuse_uring_parse_layout(const char *text, struct fuse_uring_config *cfg);

/*
 * Which queues each ring thread serves and where it runs, as
 * fuse_uring_start lays them out (pure functions, for tests).
 * fuse_uring_layout_serves: whether @thread holds entries of @queue.  Every
 * queue has at least one thread and every thread at least one queue.
 * fuse_uring_layout_cpu: the CPU @thread is pinned to, or -1.  With @pin,
 * a queue's first thread runs on the queue's CPU (the kernel queues a
 * request on its submitter's CPU, so that thread serves it there); a
 * queue's further threads are never pinned.
 */
struct fuse_uring_layout {
    unsigned queues;            /* > 0 */
    unsigned threads;           /* > 0 */
    bool spread;
    bool pin;
};
bool fuse_uring_layout_serves(const struct fuse_uring_layout *l, unsigned thread,
                              unsigned queue);
int fuse_uring_layout_cpu(const struct fuse_uring_layout *l, unsigned thread);

/*
 * Whether the kernel lets a connection use io_uring at all: the module
 * parameter is Y.  (The kernel offers FUSE_OVER_IO_URING in init_in only
 * then; this tells a user why it did not.)
 */
bool fuse_uring_kernel_enabled(void);

/* The kernel's queue count: the number of possible CPUs.  0 if unknown. */
unsigned fuse_uring_possible_cpus(void);

/* How many CPUs a sysfs CPU list ("0-1,4,6-7\n": 5) names; 0 if it is not
 * one, or names more than FUSE_URING_MAX_CPUS. */
#define FUSE_URING_MAX_CPUS 65536u
unsigned fuse_uring_count_cpu_list(const char *text);

/*
 * On entry: FUSE_INIT was answered on @cfg->dev_fd with FUSE_OVER_IO_URING
 * set in the reply's flags.
 * On exit: one io_uring per thread, every entry of every queue registered
 * (the kernel switches the connection to the ring once every queue has one)
 * and the threads serving them; *@out owns all of it.
 * Returns: 0; or -errno: nothing started, and the kernel was made to turn
 * io_uring off for the connection (a REGISTER it refuses does that), so
 * the classic fd serves every request; or -ENOTRECOVERABLE: even that
 * failed, and the kernel holds every request for a ring that will not
 * come: the caller must end the mount.
 */
int fuse_uring_start(struct fuse_server *srv, const struct fuse_uring_config *cfg,
                     struct fuse_uring **out);

/*
 * Wait until every queue has ended: the connection went away (unmount:
 * the kernel completes each registered command with -ENOTCONN) or
 * fuse_uring_stop was called.  Returns 0, or the first unexpected -errno a
 * queue ended with.
 */
int fuse_uring_wait(struct fuse_uring *uring);

/*
 * Make every thread leave its loop (the pending commands are cancelled
 * when the rings close), join them and free @uring.  NULL is a no-op.
 */
void fuse_uring_stop(struct fuse_uring *uring);

/* Requests served through the ring so far (all queues). */
uint64_t fuse_uring_requests(const struct fuse_uring *uring);

#endif
