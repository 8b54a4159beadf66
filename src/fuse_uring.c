/*
 * fuse_uring — the FUSE-over-io_uring transport (see fuse_uring.h).
 *
 * The wire structures below are the kernel's uapi (include/uapi/linux/fuse.h,
 * protocol 7.42); Debian 12's linux/fuse.h stops at 7.38.  The kernel's
 * rules they come with (fs/fuse/dev_uring.c):
 * - a command is IORING_OP_URING_CMD on the /dev/fuse fd of the connection,
 *   in a ring set up with IORING_SETUP_SQE128 (the command sits in the SQE's
 *   80-byte cmd area), and only after FUSE_INIT was answered;
 * - REGISTER names the entry's queue and two iovecs: the header area
 *   (>= sizeof(struct fuse_uring_req_header)) and the payload buffer, at
 *   least max(8 KiB, max_write, max_pages pages) or REGISTER fails, and a
 *   failed REGISTER turns io_uring off for the connection;
 * - the connection switches to the ring once every queue (one per possible
 *   CPU) has an entry; until then requests wait;
 * - a request goes to the queue of the CPU its submitter runs on and waits
 *   there, in the kernel, until one of that queue's entries is free;
 * - at unmount every command still in the kernel completes with -ENOTCONN,
 *   and so does a commit that arrives after it.
 */
#include "fuse_uring.h"

#include "fuse_transport.h"
#include "log.h"

#include <assert.h>
#include <errno.h>
#include <linux/fuse.h>
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#define FUSE_URING_IN_OUT_HEADER_SZ 128
#define FUSE_URING_OP_IN_OUT_SZ 128

struct fuse_uring_ent_in_out {
    uint64_t flags;
    uint64_t commit_id;         /* to be named in the commit of this request */
    uint32_t payload_sz;        /* bytes of payload in the payload buffer */
    uint32_t padding;
    uint64_t reserved;
};

struct fuse_uring_req_header {
    char in_out[FUSE_URING_IN_OUT_HEADER_SZ];   /* fuse_in_header / fuse_out_header */
    char op_in[FUSE_URING_OP_IN_OUT_SZ];        /* the opcode's own header */
    struct fuse_uring_ent_in_out ring_ent_in_out;
};

enum fuse_uring_cmd {
    FUSE_IO_URING_CMD_INVALID = 0,
    FUSE_IO_URING_CMD_REGISTER = 1,
    FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2,
};

struct fuse_uring_cmd_req {
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};

_Static_assert(sizeof(struct fuse_uring_ent_in_out) == 32, "uapi size");
_Static_assert(sizeof(struct fuse_uring_req_header) == 288, "uapi size");
_Static_assert(sizeof(struct fuse_uring_cmd_req) == 24, "uapi size");
_Static_assert(sizeof(struct fuse_uring_cmd_req) <= 80, "fits the SQE128 cmd area");

/* The eventfd poll's user_data: entries are never at address 1. */
#define WAKE_TAG ((uint64_t)1)

struct uring_thread;

struct uring_entry {
    struct uring_thread *thread;
    struct fuse_uring_req_header *header;
    void *payload;
    struct iovec iov[2];        /* read by the kernel at REGISTER */
    uint64_t commit_id;
    uint32_t last_cmd;          /* resubmitted as is after -EINTR / -EAGAIN */
    uint16_t qid;
};

struct uring_thread {
    struct fuse_uring *owner;
    unsigned index;
    int cpu;                    /* pinned to this CPU, or -1 */
    struct io_uring ring;
    bool ring_ok;
    int wake_fd;
    pthread_t tid;
    bool started;
    struct uring_entry *entries;
    unsigned nr_entries;
    unsigned live;              /* entries whose command is in the kernel */
    int error;                  /* first unexpected -errno */
    _Atomic uint64_t requests;
};

struct fuse_uring {
    struct fuse_server *srv;
    int dev_fd;
    unsigned nr_queues;
    unsigned nr_threads;
    unsigned depth;
    bool spread;
    bool defer_taskrun;
    size_t payload_size;
    size_t header_size;
    atomic_bool stopping;
    struct uring_thread *threads;

    pthread_mutex_t lock;       /* start handshake */
    pthread_cond_t cond;
    unsigned reported;
    int start_error;
};

struct uring_sink {
    struct fuse_reply_sink base;
    struct uring_entry *entry;
    uint64_t unique;
    bool sent;
};

bool fuse_uring_kernel_enabled(void)
{
    char c = 0;
    FILE *f = fopen("/sys/module/fuse/parameters/enable_uring", "r");

    if (!f)
        return false;
    if (fread(&c, 1, 1, f) != 1)
        c = 0;
    fclose(f);
    return c == 'Y' || c == 'y' || c == '1';
}

/* The kernel sizes its queue table with num_possible_cpus(). */
unsigned fuse_uring_possible_cpus(void)
{
    char buf[256];
    FILE *f = fopen("/sys/devices/system/cpu/possible", "r");

    if (!f)
        return 0;
    if (!fgets(buf, sizeof(buf), f)) {
        fclose(f);
        return 0;
    }
    fclose(f);
    return fuse_uring_count_cpu_list(buf);
}

unsigned fuse_uring_count_cpu_list(const char *text)
{
    unsigned long count = 0;
    const char *p = text;

    while (*p && *p != '\n') {
        unsigned long lo, hi;
        char *end;

        /* strtoul alone would take blanks and a sign. */
        if (*p < '0' || *p > '9')
            return 0;
        lo = hi = strtoul(p, &end, 10);
        if (*end == '-') {
            p = end + 1;
            if (*p < '0' || *p > '9')
                return 0;
            hi = strtoul(p, &end, 10);
            if (hi < lo)
                return 0;
        }
        if (hi - lo >= FUSE_URING_MAX_CPUS - count)
            return 0;
        count += hi - lo + 1;
        if (*end == ',' && end[1] && end[1] != '\n')
            p = end + 1;
        else if (*end && *end != '\n')
            return 0;
        else
            p = end;
    }
    return (unsigned)count;
}

int fuse_uring_parse_layout(const char *text, struct fuse_uring_config *out)
{
    struct fuse_uring_config copy = *out, *cfg = &copy;
    const char *p = text;

    while (*p) {
        size_t len = strcspn(p, ",");
        unsigned long v = 0;
        char *end;

        if (len == 6 && !strncmp(p, "spread", 6)) {
            cfg->spread = true;
        } else if (len == 3 && !strncmp(p, "pin", 3)) {
            cfg->pin = true;
        } else if (len == 5 && !strncmp(p, "nopin", 5)) {
            cfg->pin = false;
        } else if (len == 5 && !strncmp(p, "defer", 5)) {
            cfg->defer_taskrun = true;
        } else if (len == 7 && !strncmp(p, "nodefer", 7)) {
            cfg->defer_taskrun = false;
        } else if (len > 8 && !strncmp(p, "threads=", 8)) {
            v = strtoul(p + 8, &end, 10);
            if (end != p + len || v == 0 || v > 256)
                return -EINVAL;
            cfg->threads = (unsigned)v;
        } else if (len > 6 && !strncmp(p, "depth=", 6)) {
            v = strtoul(p + 6, &end, 10);
            if (end != p + len || v == 0 || v > 1024)
                return -EINVAL;
            cfg->queue_depth = (unsigned)v;
        } else {
            return -EINVAL;
        }
        p += len;
        if (*p == ',')
            p++;
    }
    *out = copy;      /* all of it or nothing */
    return 0;
}

/* Room for one more SQE is guaranteed: the SQ holds every entry plus the wake poll. */
static void queue_command(struct uring_entry *e, uint32_t cmd_op)
{
    struct uring_thread *t = e->thread;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&t->ring);
    struct fuse_uring_cmd_req *cmd;

    if (!sqe) {
        /* The SQ holds every entry plus the wake poll, so this is only a flush. */
        io_uring_submit(&t->ring);
        sqe = io_uring_get_sqe(&t->ring);
    }
    assert(sqe);
    memset(sqe, 0, 2 * sizeof(*sqe));   /* SQE128: the cmd area is the second half */
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->flags = IOSQE_FIXED_FILE;
    sqe->fd = 0;
    sqe->cmd_op = cmd_op;
    if (cmd_op == FUSE_IO_URING_CMD_REGISTER) {
        sqe->addr = (uint64_t)(uintptr_t)e->iov;
        sqe->len = 2;
    }
    io_uring_sqe_set_data(sqe, e);
    cmd = (struct fuse_uring_cmd_req *)sqe->cmd;
    cmd->qid = e->qid;
    cmd->commit_id = cmd_op == FUSE_IO_URING_CMD_COMMIT_AND_FETCH ? e->commit_id : 0;
    e->last_cmd = cmd_op;
}

static void *sink_payload_buf(struct fuse_reply_sink *base, size_t size)
{
    struct uring_sink *sink = (struct uring_sink *)base;

    return size <= sink->entry->thread->owner->payload_size ? sink->entry->payload : NULL;
}

/*
 * The reply goes into the entry (out header over the in header, payload
 * into the payload buffer) and the commit is queued; the thread's loop
 * submits it, with any others, before it waits again.
 */
static int sink_send(struct fuse_reply_sink *base, int error, const void *payload,
                     size_t len)
{
    struct uring_sink *sink = (struct uring_sink *)base;
    struct uring_entry *e = sink->entry;
    struct fuse_out_header out;

    if (sink->sent)
        return -EALREADY;
    sink->sent = true;
    if (len > e->thread->owner->payload_size) {
        log_error("io_uring: a %zu-byte reply does not fit the %zu-byte payload buffer",
                  len, e->thread->owner->payload_size);
        error = -EIO;
    }
    if (error)
        len = 0;
    if (len && payload != e->payload)
        memcpy(e->payload, payload, len);
    out.len = (uint32_t)(sizeof(out) + len);
    out.error = error;
    out.unique = sink->unique;
    memcpy(e->header->in_out, &out, sizeof(out));
    e->header->ring_ent_in_out.payload_sz = (uint32_t)len;
    queue_command(e, FUSE_IO_URING_CMD_COMMIT_AND_FETCH);
    return 0;
}

/* The kernel put a request in @e: serve it and queue the commit. */
static void serve_entry(struct uring_entry *e)
{
    struct fuse_uring *u = e->thread->owner;
    const struct fuse_uring_req_header *h = e->header;
    struct fuse_in_header in;
    uint32_t payload_len = h->ring_ent_in_out.payload_sz;
    struct uring_sink sink = {
        .base = { .payload_buf = sink_payload_buf, .send = sink_send },
        .entry = e,
    };
    struct fuse_request req;

    /* A copy: the reply's out header is written over it. */
    memcpy(&in, h->in_out, sizeof(in));
    e->commit_id = h->ring_ent_in_out.commit_id;
    sink.unique = in.unique;
    if (payload_len > u->payload_size || in.len < sizeof(in) + (uint64_t)payload_len ||
        in.len - sizeof(in) - payload_len > FUSE_URING_OP_IN_OUT_SZ) {
        log_error("io_uring: queue %u: request %llu (opcode %u) has length %u with a "
                  "%u-byte payload: inconsistent", e->qid, (unsigned long long)in.unique,
                  in.opcode, in.len, payload_len);
        sink_send(&sink.base, -EIO, NULL, 0);
        return;
    }
    req.in = &in;
    req.op_in = h->op_in;
    req.op_in_len = in.len - sizeof(in) - payload_len;
    req.payload = e->payload;
    req.payload_len = payload_len;
    fuse_server_dispatch(u->srv, &req, &sink.base);
    atomic_fetch_add_explicit(&e->thread->requests, 1, memory_order_relaxed);
    if (!sink.sent) {
        /* Every ring request expects a reply, and the entry comes back only with one. */
        sink_send(&sink.base, -ENOSYS, NULL, 0);
    }
}

static bool connection_gone(int res)
{
    return res == -ENOTCONN || res == -ENODEV || res == -ECONNABORTED || res == -ECANCELED;
}

static void handle_cqe(struct uring_thread *t, const struct io_uring_cqe *cqe)
{
    struct uring_entry *e;

    if (cqe->user_data == WAKE_TAG)
        return;                 /* fuse_uring_stop: the loop looks at stopping */
    e = io_uring_cqe_get_data(cqe);
    if (cqe->res == 0) {
        serve_entry(e);
        return;
    }
    if (cqe->res == -EINTR || cqe->res == -EAGAIN) {
        queue_command(e, e->last_cmd);
        return;
    }
    t->live--;
    if (!connection_gone(cqe->res) && !t->error) {
        t->error = cqe->res;
        log_error("io_uring: queue %u: %s failed: %s", e->qid,
                  e->last_cmd == FUSE_IO_URING_CMD_REGISTER ? "REGISTER" : "COMMIT_AND_FETCH",
                  strerror(-cqe->res));
    }
}

static int thread_setup(struct uring_thread *t)
{
    struct fuse_uring *u = t->owner;
    struct io_uring_params params;
    unsigned i;
    int ret;

    if (t->cpu >= 0) {
        cpu_set_t set;

        CPU_ZERO(&set);
        CPU_SET(t->cpu, &set);
        if (sched_setaffinity(0, sizeof(set), &set) < 0)
            log_warn("io_uring: cannot pin the thread of queue %d to its CPU: %s",
                     t->cpu, strerror(errno));
    }
    t->wake_fd = eventfd(0, EFD_CLOEXEC);
    if (t->wake_fd < 0)
        return -errno;
    memset(&params, 0, sizeof(params));
    params.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE;
    if (u->defer_taskrun)
        params.flags |= IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    params.cq_entries = 2 * (t->nr_entries + 1);
    ret = io_uring_queue_init_params(t->nr_entries + 1, &t->ring, &params);
    if (ret < 0)
        return ret;
    t->ring_ok = true;
    ret = io_uring_register_files(&t->ring, &u->dev_fd, 1);
    if (ret < 0)
        return ret;

    for (i = 0; i < t->nr_entries; i++) {
        struct uring_entry *e = &t->entries[i];
        void *mem = mmap(NULL, u->header_size + u->payload_size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

        if (mem == MAP_FAILED)
            return -errno;
        e->header = mem;
        e->payload = (char *)mem + u->header_size;
        e->iov[0] = (struct iovec){ e->header, u->header_size };
        e->iov[1] = (struct iovec){ e->payload, u->payload_size };
        queue_command(e, FUSE_IO_URING_CMD_REGISTER);
    }
    {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&t->ring);

        io_uring_prep_poll_add(sqe, t->wake_fd, POLLIN);
        sqe->user_data = WAKE_TAG;
    }
    ret = io_uring_submit(&t->ring);
    if (ret < 0)
        return ret;
    t->live = t->nr_entries;

    /* A REGISTER the kernel refuses completes at once; one it keeps does not. */
    {
        struct io_uring_cqe *cqe;
        unsigned head;

        io_uring_for_each_cqe(&t->ring, head, cqe) {
            if (cqe->user_data != WAKE_TAG && cqe->res < 0 &&
                cqe->res != -EINTR && cqe->res != -EAGAIN)
                return cqe->res;
        }
    }
    return 0;
}

/*
 * Once FUSE_OVER_IO_URING is negotiated the kernel holds every request
 * until each queue has an entry; only a REGISTER it refuses makes it turn
 * io_uring off for the connection and serve the /dev/fuse reads instead.
 * This sends one (queue index past the last).  Returns 0 when the kernel
 * refused it, else -errno (the kernel may still be waiting).
 */
static int turn_kernel_ring_off(int dev_fd)
{
    struct io_uring ring;
    struct io_uring_sqe *sqe;
    struct io_uring_cqe *cqe;
    struct fuse_uring_cmd_req *cmd;
    int ret;

    ret = io_uring_queue_init(1, &ring, IORING_SETUP_SQE128);
    if (ret < 0)
        return ret;
    /* An SQE128 SQE is two slots; the cmd area is the second one, zeroed. */
    sqe = io_uring_get_sqe(&ring);
    io_uring_prep_rw(IORING_OP_URING_CMD, sqe, dev_fd, NULL, 0, 0);
    sqe->cmd_op = FUSE_IO_URING_CMD_REGISTER;
    cmd = (struct fuse_uring_cmd_req *)sqe->cmd;
    memset(cmd, 0, sizeof(*cmd));
    cmd->qid = UINT16_MAX;
    ret = io_uring_submit_and_wait(&ring, 1);
    if (ret >= 0)
        ret = io_uring_peek_cqe(&ring, &cqe);
    if (ret >= 0)
        ret = cqe->res < 0 ? 0 : -EPROTO;
    io_uring_queue_exit(&ring);
    return ret;
}

static void report_started(struct fuse_uring *u, int error)
{
    pthread_mutex_lock(&u->lock);
    if (error && !u->start_error)
        u->start_error = error;
    u->reported++;
    pthread_cond_broadcast(&u->cond);
    pthread_mutex_unlock(&u->lock);
}

static void *thread_main(void *arg)
{
    struct uring_thread *t = arg;
    struct fuse_uring *u = t->owner;
    char name[16];
    int ret;

    snprintf(name, sizeof(name), "qcow2fuse-ring%u", t->index);
    pthread_setname_np(pthread_self(), name);
    ret = thread_setup(t);
    report_started(u, ret);
    if (ret < 0)
        return NULL;

    while (!atomic_load_explicit(&u->stopping, memory_order_relaxed) && t->live > 0) {
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;

        ret = io_uring_submit_and_wait(&t->ring, 1);
        if (ret < 0 && ret != -EINTR) {
            if (!t->error)
                t->error = ret;
            log_error("io_uring: thread %u: waiting for requests failed: %s", t->index,
                      strerror(-ret));
            break;
        }
        io_uring_for_each_cqe(&t->ring, head, cqe) {
            handle_cqe(t, cqe);
            seen++;
        }
        io_uring_cq_advance(&t->ring, seen);
    }
    /* Replies queued by the last round still go out: their callers wait for them. */
    if (t->live > 0)
        io_uring_submit(&t->ring);
    return NULL;
}

static void free_uring(struct fuse_uring *u)
{
    unsigned i, j;

    for (i = 0; i < u->nr_threads; i++) {
        struct uring_thread *t = &u->threads[i];

        /* Closing the ring cancels the commands still in the kernel. */
        if (t->ring_ok)
            io_uring_queue_exit(&t->ring);
        if (t->wake_fd >= 0)
            close(t->wake_fd);
        for (j = 0; t->entries && j < t->nr_entries; j++)
            if (t->entries[j].header)
                munmap(t->entries[j].header, u->header_size + u->payload_size);
        free(t->entries);
    }
    free(u->threads);
    pthread_mutex_destroy(&u->lock);
    pthread_cond_destroy(&u->cond);
    free(u);
}

static void wake_and_join(struct fuse_uring *u)
{
    unsigned i;

    atomic_store(&u->stopping, true);
    for (i = 0; i < u->nr_threads; i++) {
        struct uring_thread *t = &u->threads[i];
        uint64_t one = 1;

        if (!t->started)
            continue;
        if (t->wake_fd >= 0 && write(t->wake_fd, &one, sizeof(one)) < 0)
            log_warn("io_uring: cannot wake thread %u: %s", i, strerror(errno));
        pthread_join(t->tid, NULL);
        t->started = false;
    }
}

bool fuse_uring_layout_serves(const struct fuse_uring_layout *l, unsigned thread,
                              unsigned queue)
{
    if (l->spread)
        return true;
    if (l->threads <= l->queues)
        return queue % l->threads == thread;
    return thread % l->queues == queue;
}

int fuse_uring_layout_cpu(const struct fuse_uring_layout *l, unsigned thread)
{
    /* A queue's extra threads float: they are there to run beside the
     * pinned one, on whichever CPU is free. */
    if (!l->pin || (!l->spread && thread >= l->queues))
        return -1;
    return (int)(thread % l->queues);
}

int fuse_uring_start(struct fuse_server *srv, const struct fuse_uring_config *cfg,
                     struct fuse_uring **out)
{
    long page = sysconf(_SC_PAGESIZE);
    struct fuse_uring_layout layout;
    struct fuse_uring *u;
    sigset_t all, old;
    size_t payload;
    unsigned i, q;
    int ret;

    *out = NULL;
    u = calloc(1, sizeof(*u));
    if (!u)
        return -ENOMEM;
    pthread_mutex_init(&u->lock, NULL);
    pthread_cond_init(&u->cond, NULL);
    u->srv = srv;
    u->dev_fd = cfg->dev_fd;
    u->depth = cfg->queue_depth ? cfg->queue_depth : FUSE_URING_DEFAULT_DEPTH;
    u->nr_queues = fuse_uring_possible_cpus();
    if (u->nr_queues == 0) {
        log_error("io_uring: cannot tell the number of possible CPUs from "
                  "/sys/devices/system/cpu/possible");
        ret = -EINVAL;
        goto fail;
    }
    u->spread = cfg->spread;
    u->defer_taskrun = cfg->defer_taskrun;
    u->nr_threads = cfg->threads ? cfg->threads : u->nr_queues;
    if (u->nr_threads > 256)
        u->nr_threads = 256;
    /* The kernel refuses a payload buffer smaller than its largest request. */
    payload = 8192;
    if (cfg->max_write > payload)
        payload = cfg->max_write;
    if ((size_t)cfg->max_pages * (size_t)page > payload)
        payload = (size_t)cfg->max_pages * (size_t)page;
    u->payload_size = (payload + (size_t)page - 1) & ~((size_t)page - 1);
    u->header_size = (sizeof(struct fuse_uring_req_header) + (size_t)page - 1) &
                     ~((size_t)page - 1);

    layout = (struct fuse_uring_layout){ .queues = u->nr_queues, .threads = u->nr_threads,
                                         .spread = u->spread, .pin = cfg->pin };
    u->threads = calloc(u->nr_threads, sizeof(*u->threads));
    if (!u->threads) {
        ret = -ENOMEM;
        goto fail;
    }
    for (i = 0; i < u->nr_threads; i++) {
        struct uring_thread *t = &u->threads[i];
        unsigned n = 0;

        t->owner = u;
        t->index = i;
        t->wake_fd = -1;
        t->cpu = fuse_uring_layout_cpu(&layout, i);
        for (q = 0; q < u->nr_queues; q++)
            if (fuse_uring_layout_serves(&layout, i, q))
                n += u->depth;
        t->nr_entries = n;
        t->entries = calloc(n, sizeof(*t->entries));
        if (!t->entries) {
            ret = -ENOMEM;
            goto fail;
        }
        n = 0;
        for (q = 0; q < u->nr_queues; q++) {
            unsigned d;

            if (!fuse_uring_layout_serves(&layout, i, q))
                continue;
            for (d = 0; d < u->depth; d++, n++) {
                t->entries[n].thread = t;
                t->entries[n].qid = (uint16_t)q;
            }
        }
    }

    /* Signals stay with the main thread, which unmounts on SIGTERM. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    ret = 0;
    for (i = 0; i < u->nr_threads; i++) {
        struct uring_thread *t = &u->threads[i];

        ret = -pthread_create(&t->tid, NULL, thread_main, t);
        if (ret < 0)
            break;
        t->started = true;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    pthread_mutex_lock(&u->lock);
    while (u->reported < i)
        pthread_cond_wait(&u->cond, &u->lock);
    if (ret == 0)
        ret = u->start_error;
    pthread_mutex_unlock(&u->lock);
    if (ret < 0) {
        log_error("io_uring: cannot start the ring (%u queues of %u entries, %zu KiB "
                  "payload each): %s", u->nr_queues, u->depth, u->payload_size >> 10,
                  strerror(-ret));
        wake_and_join(u);
        goto fail;
    }
    for (i = 0, q = 0; i < u->nr_threads; i++)
        q += fuse_uring_layout_serves(&layout, i, 0) ? u->depth : 0;
    log_info("io_uring: %u queues, %u threads (%s, %s%s), %u entries of %zu KiB in queue 0",
             u->nr_queues, u->nr_threads, u->spread ? "each serving every queue" :
             u->nr_threads > u->nr_queues ? "several per queue" : "each serving its own queues",
             u->threads[0].cpu < 0 ? "unpinned" :
             u->nr_threads > u->nr_queues && !u->spread ? "the first of each queue pinned" : "pinned",
             u->defer_taskrun ? ", deferred task work" : "", q, u->payload_size >> 10);
    *out = u;
    return 0;

fail:
    /* No thread runs here: they were never started or have been joined. */
    free_uring(u);
    if (turn_kernel_ring_off(cfg->dev_fd) < 0) {
        log_error("io_uring: the kernel may keep waiting for the ring: requests "
                  "cannot be served");
        return -ENOTRECOVERABLE;
    }
    return ret;
}

int fuse_uring_wait(struct fuse_uring *u)
{
    unsigned i;
    int ret = 0;

    for (i = 0; i < u->nr_threads; i++) {
        struct uring_thread *t = &u->threads[i];

        if (t->started) {
            pthread_join(t->tid, NULL);
            t->started = false;
        }
        if (t->error && !ret)
            ret = t->error;
    }
    return ret;
}

uint64_t fuse_uring_requests(const struct fuse_uring *u)
{
    uint64_t sum = 0;
    unsigned i;

    for (i = 0; i < u->nr_threads; i++)
        sum += atomic_load_explicit(&u->threads[i].requests, memory_order_relaxed);
    return sum;
}

void fuse_uring_stop(struct fuse_uring *u)
{
    char per_thread[256];
    size_t used = 0;
    unsigned i;

    if (!u)
        return;
    wake_and_join(u);
    per_thread[0] = 0;
    for (i = 0; i < u->nr_threads && used < sizeof(per_thread) - 24; i++)
        used += (size_t)snprintf(per_thread + used, sizeof(per_thread) - used, " %llu",
                                 (unsigned long long)atomic_load(&u->threads[i].requests));
    log_info("io_uring: %llu requests served through the ring (by thread:%s%s)",
             (unsigned long long)fuse_uring_requests(u), per_thread,
             i < u->nr_threads ? " ..." : "");
    free_uring(u);
}
