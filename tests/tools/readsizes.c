/*
 * readsizes FILE REF THREADS SEED
 *
 * Read FILE (a mounted disk) with O_DIRECT from THREADS threads at once, in
 * reads of many sizes at odd offsets, and compare every read with the same
 * bytes of REF (the disk as qemu-img convert sees it).  Each thread covers
 * every size from 1 to 12288 bytes (sizes s with s % THREADS == thread),
 * then sizes around every power of two up to 2 MiB + 1 (larger than one
 * FUSE request: the kernel splits them) and 64 random sizes up to
 * 1 MiB + 4097; even threads go from small to large, odd ones from large to
 * small, so that requests of very different sizes are in flight together
 * and a daemon that reuses reply buffers would show one request's bytes in
 * another's reply.  Some reads run past the end of the disk and must come
 * back short, with exactly the bytes before it.
 *
 * Prints one summary line; exit status 0 when every read matched, 1 on a
 * mismatch or error (the first is described), 2 on usage errors.
 *
 * Uses libc and pthreads only.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SMALL_MAX   12288
#define RANDOM_READS 64
#define RANDOM_MAX  ((1 << 20) + 4097)
#define BUF_MAX     ((2 << 20) + 1)

static const char *file_path;
static uint8_t *ref;
static size_t ref_size;
static unsigned nthreads;
static unsigned long seed;
static atomic_int failed;
static atomic_ullong total_reads, total_bytes;
static pthread_mutex_t report_lock = PTHREAD_MUTEX_INITIALIZER;

struct worker {
    unsigned id;
    int fd;
    uint64_t rng;
    size_t *sizes;
    size_t nsizes;
};

static uint64_t next_random(uint64_t *s)
{
    /* xorshift64*: deterministic per (seed, thread) */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

static void report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void report(const char *fmt, ...)
{
    va_list ap;

    pthread_mutex_lock(&report_lock);
    if (atomic_fetch_add(&failed, 1) == 0) {
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
    }
    pthread_mutex_unlock(&report_lock);
}

/* One read of @len bytes at @off; returns 0 when it matched REF. */
static int check_read(struct worker *w, uint8_t *buf, size_t len, size_t off)
{
    size_t want = off >= ref_size ? 0 : len < ref_size - off ? len : ref_size - off;
    size_t done = 0;

    memset(buf, 0xe5 ^ (int)w->id, len);
    while (done < len) {
        ssize_t n = pread(w->fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            report("readsizes: thread %u: pread of %zu bytes at %zu: %s\n",
                   w->id, len - done, off + done, strerror(errno));
            return -1;
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    if (done != want) {
        report("readsizes: thread %u: read of %zu bytes at %zu returned %zu bytes, "
               "expected %zu\n", w->id, len, off, done, want);
        return -1;
    }
    if (memcmp(buf, ref + off, want) != 0) {
        size_t i = 0;
        while (buf[i] == ref[off + i])
            i++;
        report("readsizes: thread %u: read of %zu bytes at %zu differs from the "
               "reference first at byte %zu (disk offset %zu): 0x%02x, expected 0x%02x\n",
               w->id, len, off, i, off + i, buf[i], ref[off + i]);
        return -1;
    }
    atomic_fetch_add(&total_reads, 1);
    atomic_fetch_add(&total_bytes, done);
    return 0;
}

static void *run_worker(void *arg)
{
    struct worker *w = arg;
    uint8_t *buf;

    buf = malloc(BUF_MAX);
    if (!buf) {
        report("readsizes: out of memory\n");
        return NULL;
    }
    for (size_t k = 0; k < w->nsizes && !atomic_load(&failed); k++) {
        size_t i = w->id % 2 ? w->nsizes - 1 - k : k;
        size_t len = w->sizes[i];
        size_t off;

        /* Odd offsets anywhere in the disk; one read in eight ends past
         * the end of the disk. */
        if (next_random(&w->rng) % 8 == 0 && len > 1 && len / 2 + 1 < ref_size)
            off = ref_size - len / 2 - 1;
        else
            off = (size_t)(next_random(&w->rng) % ref_size) | 1;
        if (off >= ref_size)
            off = ref_size - 1;
        if (check_read(w, buf, len, off) < 0)
            break;
    }
    free(buf);
    return NULL;
}

static int load_ref(const char *path)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    size_t done = 0;

    if (fd < 0 || fstat(fd, &st) < 0 || st.st_size <= 0) {
        fprintf(stderr, "readsizes: %s: %s\n", path, fd < 0 ? strerror(errno) : "empty");
        return -1;
    }
    ref_size = (size_t)st.st_size;
    ref = malloc(ref_size);
    if (!ref)
        return -1;
    while (done < ref_size) {
        ssize_t n = pread(fd, ref + done, ref_size - done, (off_t)done);
        if (n <= 0) {
            fprintf(stderr, "readsizes: %s: short read\n", path);
            return -1;
        }
        done += (size_t)n;
    }
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    pthread_t *tids;
    struct worker *ws;
    int rc = 0;

    if (argc != 5 || atoi(argv[3]) < 1 || atoi(argv[3]) > 64) {
        fprintf(stderr, "usage: %s FILE REF THREADS(1-64) SEED\n", argv[0]);
        return 2;
    }
    file_path = argv[1];
    nthreads = (unsigned)atoi(argv[3]);
    seed = strtoul(argv[4], NULL, 0);
    if (load_ref(argv[2]) < 0)
        return 1;
    tids = calloc(nthreads, sizeof(*tids));
    ws = calloc(nthreads, sizeof(*ws));
    if (!tids || !ws)
        return 1;
    for (unsigned t = 0; t < nthreads; t++) {
        struct worker *w = &ws[t];
        size_t n = 0;

        w->id = t;
        w->rng = (seed + 1) * 0x9e3779b97f4a7c15ull + t + 1;
        w->sizes = malloc((SMALL_MAX / nthreads + 1 + 3 * 22 + RANDOM_READS) * sizeof(size_t));
        if (!w->sizes)
            return 1;
        for (size_t s = 1; s <= SMALL_MAX; s++)
            if (s % nthreads == t)
                w->sizes[n++] = s;
        for (size_t p = 1u << 14; p <= 2u << 20; p <<= 1) {
            w->sizes[n++] = p - 1;
            w->sizes[n++] = p;
            w->sizes[n++] = p + 1;
        }
        for (int r = 0; r < RANDOM_READS; r++)
            w->sizes[n++] = 1 + (size_t)(next_random(&w->rng) % RANDOM_MAX);
        w->nsizes = n;
        w->fd = open(file_path, O_RDONLY | O_DIRECT);
        if (w->fd < 0) {
            fprintf(stderr, "readsizes: open %s O_DIRECT: %s\n", file_path, strerror(errno));
            return 1;
        }
    }
    for (unsigned t = 0; t < nthreads; t++)
        if (pthread_create(&tids[t], NULL, run_worker, &ws[t]) != 0) {
            fprintf(stderr, "readsizes: pthread_create failed\n");
            return 1;
        }
    for (unsigned t = 0; t < nthreads; t++) {
        pthread_join(tids[t], NULL);
        close(ws[t].fd);
        free(ws[t].sizes);
    }
    if (atomic_load(&failed))
        rc = 1;
    else
        printf("readsizes: %u threads, %llu reads, %llu bytes, sizes 1..%d and up to %d: "
               "all match\n", nthreads, (unsigned long long)total_reads,
               (unsigned long long)total_bytes, SMALL_MAX, BUF_MAX);
    free(ref);
    free(tids);
    free(ws);
    return rc;
}
