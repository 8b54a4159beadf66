/*
 * Unit tests for meta: the corrupt flag and the header's incompatible
 * feature bits when a read that holds no lock reports corruption while a
 * writer changes those bits (the lazy-refcounts dirty bit).  Neither update
 * may be lost, in memory or on disk.  Also run under ThreadSanitizer
 * (make unit SANITIZE=thread).
 *
 * The image is made with create_image() in a temporary directory, loaded
 * into the memory backend and opened with image_open_io() through a backend
 * with two one-shot gates: one holds a pread of a chosen host offset, the
 * other a pwrite of one, until the test lets them go.
 */
#include "testutil.h"

#include "compress.h"
#include "create.h"
#include "image.h"
#include "io.h"
#include "meta.h"

#include <errno.h>
#include <pthread.h>
#include <time.h>

#define CB          16u                 /* cluster bits */
#define CS          (1u << CB)
#define VSIZE       (16ull << 20)
#define SAFETY_S    5                   /* a gate held longer than this opens */

/* ---- a backend with a pread gate and a pwrite gate ----------------------- */

enum { GATE_READ, GATE_WRITE, NB_GATES };

struct gate {
    bool armed, blocked, released;
    uint64_t offset;
};

struct gated_io {
    struct tu_fwd_io fwd;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct gate gate[NB_GATES];
};

static void deadline_in(struct timespec *ts, long ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (ms % 1000) * 1000000;
    if (ts->tv_nsec >= 1000000000) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000;
    }
}

/* Hold the calling request if gate @k is armed for a range containing its
 * offset (one-shot); gives up after SAFETY_S so a broken test cannot hang. */
static void pass_gate(struct gated_io *g, unsigned k, size_t len, uint64_t off)
{
    struct gate *gt = &g->gate[k];
    struct timespec ts;

    pthread_mutex_lock(&g->lock);
    if (gt->armed && gt->offset >= off && gt->offset - off < len) {
        gt->armed = false;
        gt->blocked = true;
        pthread_cond_broadcast(&g->cond);
        deadline_in(&ts, SAFETY_S * 1000);
        while (!gt->released)
            if (pthread_cond_timedwait(&g->cond, &g->lock, &ts) == ETIMEDOUT)
                break;
    }
    pthread_mutex_unlock(&g->lock);
}

static int gated_pread(struct io *io, void *buf, size_t len, uint64_t off)
{
    pass_gate((struct gated_io *)io, GATE_READ, len, off);
    return tu_fwd_pread(io, buf, len, off);
}

static int gated_pwrite(struct io *io, const void *buf, size_t len, uint64_t off)
{
    pass_gate((struct gated_io *)io, GATE_WRITE, len, off);
    return tu_fwd_pwrite(io, buf, len, off);
}

static void gated_close(struct io *io)
{
    struct gated_io *g = (struct gated_io *)io;

    pthread_mutex_destroy(&g->lock);
    pthread_cond_destroy(&g->cond);
    free(g);                    /* the test keeps the inner backend */
}

static const struct io_ops gated_ops = {
    .pread = gated_pread,
    .pwrite = gated_pwrite,
    .flush = tu_fwd_flush,
    .get_size = tu_fwd_get_size,
    .truncate = tu_fwd_truncate,
    .punch_hole = tu_fwd_punch,
    .close = gated_close,
};

static struct gated_io *gated_new(struct io *inner)
{
    struct gated_io *g = tu_zalloc(sizeof(*g));

    g->fwd.io.ops = &gated_ops;
    g->fwd.inner = inner;
    pthread_mutex_init(&g->lock, NULL);
    pthread_cond_init(&g->cond, NULL);
    return g;
}

static void gate_arm(struct gated_io *g, unsigned k, uint64_t offset)
{
    pthread_mutex_lock(&g->lock);
    g->gate[k] = (struct gate){ .armed = true, .offset = offset };
    pthread_mutex_unlock(&g->lock);
}

static bool gate_wait_blocked(struct gated_io *g, unsigned k)
{
    struct timespec ts;
    bool ok;

    deadline_in(&ts, SAFETY_S * 1000);
    pthread_mutex_lock(&g->lock);
    while (!g->gate[k].blocked)
        if (pthread_cond_timedwait(&g->cond, &g->lock, &ts) == ETIMEDOUT)
            break;
    ok = g->gate[k].blocked;
    pthread_mutex_unlock(&g->lock);
    return ok;
}

static void gate_release(struct gated_io *g, unsigned k)
{
    pthread_mutex_lock(&g->lock);
    g->gate[k].released = true;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
}

/* ---- fixtures ------------------------------------------------------------ */

static struct image_options writable_opts(void)
{
    struct image_options o = {
        .read_only = false,
        .discard = IMAGE_DISCARD_UNMAP,
        .detect_zeroes = IMAGE_DETECT_ZEROES_OFF,
        .trace_fd = -1,
        .backing = { BACKING_DENY, NULL },
    };
    return o;
}

static struct image *open_on(struct io *io)
{
    struct image_options o = writable_opts();
    struct image *img = NULL;

    ck_assert_int_eq(image_open_io(io, "test.qcow2", &o, &img), 0);
    return img;
}

static uint64_t mem_u64(struct io *mem, uint64_t off)
{
    size_t len;
    const uint8_t *d = io_memory_data(mem, &len);

    ck_assert_uint_le(off + 8, len);
    return be64_get(d + off);
}

static void mem_put_u64(struct io *mem, uint64_t off, uint64_t v)
{
    uint8_t buf[8];

    be64_put(buf, v);
    ck_assert_int_eq(io_pwrite(mem, buf, sizeof(buf), off), 0);
}

/*
 * A lazy-refcounts image, closed cleanly, whose guest cluster 1 holds data
 * (0xff bytes at host *data_host) and whose guest cluster 0 is a compressed
 * cluster over those same bytes: they do not decompress, so reading guest
 * cluster 0 reports corruption, from a read that holds no lock.
 */
static struct io *corrupt_compressed_image(uint64_t *data_host)
{
    char dir[] = "/tmp/check_meta.XXXXXX", path[64];
    struct create_options co = { .size = VSIZE, .cluster_bits = CB, .lazy_refcounts = true };
    struct io *mem, *fwd;
    struct image *img;
    uint64_t l1, l2;
    uint8_t *bytes;

    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/t.qcow2", dir);
    ck_assert_int_eq(create_image(path, &co), 0);
    mem = tu_file_to_memory(path);
    unlink(path);
    rmdir(dir);

    /* Guest cluster 1 gets a data cluster (through a forwarder, so that
     * closing the image leaves the memory backend open). */
    fwd = &gated_new(mem)->fwd.io;
    img = open_on(fwd);
    bytes = tu_zalloc(CS);
    memset(bytes, 0xff, CS);
    ck_assert_int_eq(image_write(img, bytes, CS, CS), 0);
    free(bytes);
    ck_assert_int_eq(image_close(img), 0);
    ck_assert_uint_eq(mem_u64(mem, 72), 0);     /* clean: no dirty bit */

    l1 = mem_u64(mem, 40);
    l2 = mem_u64(mem, l1) & META_OFFSET_MASK;
    ck_assert_uint_ne(l2, 0);
    *data_host = mem_u64(mem, l2 + 8) & META_OFFSET_MASK;
    ck_assert_uint_ne(*data_host, 0);
    mem_put_u64(mem, l2, META_L2_COMPRESSED |
                compress_descriptor_encode(*data_host, 512, CB));
    return mem;
}

struct req {
    struct image *img;
    uint64_t offset;
    int ret;
    _Atomic bool done;
};

static void *reader_main(void *arg)
{
    struct req *r = arg;
    uint8_t buf[4096];

    r->ret = image_read(r->img, buf, sizeof(buf), r->offset);
    r->done = true;
    return NULL;
}

static void *writer_main(void *arg)
{
    struct req *r = arg;
    uint8_t buf[4096];

    memset(buf, 0x42, sizeof(buf));
    r->ret = image_write(r->img, buf, sizeof(buf), r->offset);
    r->done = true;
    return NULL;
}

/* Wait (at most @ms) for @r to finish; whether it did is no assertion:
 * with a correct lock it cannot finish yet. */
static void wait_done_at_most(struct req *r, long ms)
{
    for (long waited = 0; !r->done && waited < ms; waited += 10) {
        struct timespec ts = { 0, 10 * 1000000 };
        nanosleep(&ts, NULL);
    }
}

/* ---- tests --------------------------------------------------------------- */

START_TEST(corrupt_bit_survives_concurrent_dirty_bit_write)
{
    /*
     * A lock-free read finds a compressed cluster that does not decompress
     * and reports it (meta_corrupt) while the first write sets the dirty
     * bit in the same header field, its write of offset 72 already on its
     * way.  The corrupt bit must end up on disk and stay there: a report
     * is durable once made, whatever the order of the two header writes.
     */
    uint64_t data_host;
    struct io *mem = corrupt_compressed_image(&data_host);
    struct gated_io *g = gated_new(mem);
    struct image *img;
    struct req rd = { 0 }, wr = { 0 };
    pthread_t rt, wt;

    tu_log_capture();
    img = open_on(&g->fwd.io);
    rd.img = wr.img = img;
    rd.offset = 0;              /* the undecodable compressed cluster */
    wr.offset = 4 * CS;         /* a fresh cluster: the first write */

    /* The read has looked up its cluster (lock released) and reads it. */
    gate_arm(g, GATE_READ, data_host);
    ck_assert_int_eq(pthread_create(&rt, NULL, reader_main, &rd), 0);
    ck_assert(gate_wait_blocked(g, GATE_READ));

    /* The write sets the dirty bit; its header write is held. */
    gate_arm(g, GATE_WRITE, 72);
    ck_assert_int_eq(pthread_create(&wt, NULL, writer_main, &wr), 0);
    ck_assert(gate_wait_blocked(g, GATE_WRITE));

    /* The read reports the corruption, as far as it can meanwhile. */
    gate_release(g, GATE_READ);
    wait_done_at_most(&rd, 1000);

    /* Then the held dirty-bit write lands. */
    gate_release(g, GATE_WRITE);
    pthread_join(rt, NULL);
    pthread_join(wt, NULL);

    ck_assert_int_eq(rd.ret, -EIO);
    ck_assert(wr.ret == 0 || wr.ret == -EROFS || wr.ret == -EIO);
    ck_assert_uint_eq(tu_log_state()->nb_errors, 1);
    ck_assert_msg(mem_u64(mem, 72) & QCOW2_INCOMPAT_CORRUPT,
                  "incompatible_features on disk = 0x%llx after the report: the "
                  "dirty-bit write overwrote the corrupt bit",
                  (unsigned long long)mem_u64(mem, 72));
    ck_assert(mem_u64(mem, 72) & QCOW2_INCOMPAT_DIRTY);

    /* Closing clears the dirty bit only. */
    image_close(img);
    ck_assert_uint_eq(mem_u64(mem, 72), QCOW2_INCOMPAT_CORRUPT);
    tu_log_release();
    io_close(mem);
}
END_TEST

struct race {
    struct image *img;
    pthread_barrier_t *start;
    bool write;
    int ret;
};

static void *race_main(void *arg)
{
    struct race *r = arg;
    uint8_t buf[4096];

    memset(buf, 0x42, sizeof(buf));
    pthread_barrier_wait(r->start);
    r->ret = r->write ? image_write(r->img, buf, sizeof(buf), 4 * CS)
                      : image_read(r->img, buf, sizeof(buf), 0);
    return NULL;
}

START_TEST(corrupt_report_races_first_write)
{
    /*
     * No gates: the report and the first write (which sets the dirty bit)
     * start together, many times over.  Whatever the interleaving, the
     * corrupt bit is on disk afterwards, and closing keeps it.  Under
     * ThreadSanitizer this also shows that the bits are never changed by
     * two threads without an order between them.
     */
    uint64_t data_host;
    struct io *pristine = corrupt_compressed_image(&data_host);
    size_t len;
    const uint8_t *bytes = io_memory_data(pristine, &len);

    tu_log_capture();
    for (unsigned round = 0; round < 300; round++) {
        struct io *mem;
        struct image *img;
        struct race rd = { 0 }, wr = { 0 };
        pthread_barrier_t start;
        pthread_t rt, wt;

        ck_assert_int_eq(io_open_memory(bytes, len, &mem), 0);
        img = open_on(&gated_new(mem)->fwd.io);
        pthread_barrier_init(&start, NULL, 2);
        rd = (struct race){ img, &start, false, 0 };
        wr = (struct race){ img, &start, true, 0 };
        ck_assert_int_eq(pthread_create(&rt, NULL, race_main, &rd), 0);
        ck_assert_int_eq(pthread_create(&wt, NULL, race_main, &wr), 0);
        pthread_join(rt, NULL);
        pthread_join(wt, NULL);
        pthread_barrier_destroy(&start);

        ck_assert_int_eq(rd.ret, -EIO);
        ck_assert(wr.ret == 0 || wr.ret == -EIO);
        ck_assert_msg(mem_u64(mem, 72) & QCOW2_INCOMPAT_CORRUPT,
                      "round %u: incompatible_features on disk = 0x%llx", round,
                      (unsigned long long)mem_u64(mem, 72));
        image_close(img);
        ck_assert_msg(mem_u64(mem, 72) == QCOW2_INCOMPAT_CORRUPT,
                      "round %u: incompatible_features on disk = 0x%llx after close",
                      round, (unsigned long long)mem_u64(mem, 72));
        io_close(mem);
    }
    tu_log_release();
    io_close(pristine);
}
END_TEST

static Suite *meta_suite(void)
{
    Suite *s = suite_create("meta");
    TCase *tc = tcase_create("corrupt");

    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, corrupt_bit_survives_concurrent_dirty_bit_write);
    tcase_add_test(tc, corrupt_report_races_first_write);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(meta_suite());
}
