/*
 * copy_ceiling — how fast can this machine move file data the way a FUSE
 * read of the disk file must, with no FUSE at all?
 *
 *   copy_ceiling FILE [THREADS [SECONDS [BLOCK [LENGTH]]]]
 *
 * A FUSE read of cached data copies every byte twice: the daemon's pread
 * copies it from the host page cache into a buffer of the daemon, and the
 * kernel copies that buffer into the reader's pages when the reply goes
 * back (classic writev to /dev/fuse or an io_uring commit alike).  Each of
 * THREADS (default: the number of online CPUs) threads does exactly those
 * two copies, pread(BLOCK) then memcpy(BLOCK) into a second buffer, over
 * the first LENGTH bytes of FILE (default: all of it) and round again, for
 * SECONDS (default 5).  BLOCK defaults to 1 MiB, the size of bench/run.sh's
 * seq read job; the second copies go round 16 buffers shared out among the
 * threads, as fio's 16 requests in flight land in 16 buffers of its own.
 * FILE should be in the page cache (read it once first): the figure is
 * then the most a daemon that reads into its own buffers could serve such
 * reads at, with zero protocol cost (one that splices the page cache's
 * pages to /dev/fuse skips the first copy and is not bound by it).  It is
 * printed in MB/s (10^6), as fio prints bw_bytes / 1e6.
 *
 * Not a test; bench/README says how the figure is used.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

struct worker {
    pthread_t tid;
    int fd;
    off_t file_size;
    size_t block;
    unsigned index, nr;
    uint64_t bytes;
    int error;
};

static atomic_bool stop;

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    unsigned nr_dst = (16 + w->nr - 1) / w->nr, next = 0;
    char *src = aligned_alloc(4096, w->block), *dst = aligned_alloc(4096, w->block * nr_dst);
    off_t blocks = w->file_size / (off_t)w->block;
    off_t b = (off_t)w->index * (blocks / w->nr);

    if (!src || !dst) {
        w->error = ENOMEM;
        goto out;
    }
    memset(dst, 0, w->block * nr_dst);
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        ssize_t n = pread(w->fd, src, w->block, b * (off_t)w->block);

        if (n < 0) {
            w->error = errno;
            break;
        }
        memcpy(dst + (size_t)next * w->block, src, (size_t)n);
        /* The copy's result is never read: keep the compiler from dropping it. */
        __asm__ volatile("" : : "r"(dst) : "memory");
        next = (next + 1) % nr_dst;
        w->bytes += (uint64_t)n;
        if (++b >= blocks)
            b = 0;
    }
out:
    free(src);
    free(dst);
    return NULL;
}

int main(int argc, char **argv)
{
    unsigned nr = argc > 2 ? (unsigned)atoi(argv[2]) : (unsigned)sysconf(_SC_NPROCESSORS_ONLN);
    double seconds = argc > 3 ? atof(argv[3]) : 5.0;
    size_t block = argc > 4 ? (size_t)strtoull(argv[4], NULL, 0) : 1u << 20;
    off_t length = argc > 5 ? (off_t)strtoull(argv[5], NULL, 0) : 0;
    struct timespec t0, t1;
    struct worker *w;
    struct stat st;
    uint64_t total = 0;
    double elapsed;
    int fd;

    if (argc < 2 || nr == 0 || seconds <= 0 || block == 0 || block % 4096) {
        fprintf(stderr, "usage: %s FILE [THREADS [SECONDS [BLOCK (multiple of 4096) "
                "[LENGTH]]]]\n", argv[0]);
        return 2;
    }
    fd = open(argv[1], O_RDONLY);
    if (fd < 0 || fstat(fd, &st) < 0) {
        fprintf(stderr, "copy_ceiling: %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    if (length > 0 && length < st.st_size)
        st.st_size = length;
    if (st.st_size < (off_t)(block * nr)) {
        fprintf(stderr, "copy_ceiling: %s is smaller than %u blocks of %zu bytes\n", argv[1],
                nr, block);
        return 1;
    }
    w = calloc(nr, sizeof(*w));
    if (!w)
        return 1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned i = 0; i < nr; i++) {
        w[i] = (struct worker){ .fd = fd, .file_size = st.st_size, .block = block,
                                .index = i, .nr = nr };
        if (pthread_create(&w[i].tid, NULL, worker_main, &w[i]) != 0) {
            fprintf(stderr, "copy_ceiling: cannot start thread %u\n", i);
            return 1;
        }
    }
    usleep((useconds_t)(seconds * 1e6));
    atomic_store(&stop, true);
    for (unsigned i = 0; i < nr; i++) {
        pthread_join(w[i].tid, NULL);
        if (w[i].error) {
            fprintf(stderr, "copy_ceiling: thread %u: %s\n", i, strerror(w[i].error));
            return 1;
        }
        total += w[i].bytes;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    elapsed = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%u threads, %zu-byte blocks, pread + memcpy: %.0f MB/s\n", nr, block,
           (double)total / elapsed / 1e6);
    free(w);
    close(fd);
    return 0;
}
