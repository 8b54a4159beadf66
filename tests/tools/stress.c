/*
 * stress — races writes, reads, hole punches, zero ranges and fsyncs from
 * several threads over a small region of a disk file, so that requests
 * overlap in the same clusters, and checks every read against a shadow
 * copy.  Each 4 KiB block is locked in the tool while an operation covers
 * it, so the expected content is always known, while operations on
 * neighbouring blocks of one cluster run concurrently in the daemon.
 *
 *   stress DISK REGION_BYTES THREADS SECONDS SEED SHADOW_OUT
 *
 * Writes the final expected content of the region to SHADOW_OUT (for
 * qemu-img compare after unmount).  Exit 0 when every read matched.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096u

static int fd;
static uint8_t *shadow;
static pthread_mutex_t *locks;
static uint64_t nblocks;
static time_t deadline;
static atomic_long mismatches, ops_done, punches, zeroes, writes, reads, syncs;

static uint64_t next_rand(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void lock_range(uint64_t first, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        pthread_mutex_lock(&locks[first + i]);
}

static void unlock_range(uint64_t first, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        pthread_mutex_unlock(&locks[first + i]);
}

static void *worker(void *arg)
{
    uint64_t seed = (uint64_t)(uintptr_t)arg * 0x9e3779b97f4a7c15ull + 1;
    uint8_t *buf = aligned_alloc(4096, 64 * BLOCK);

    while (time(NULL) < deadline) {
        uint64_t r = next_rand(&seed), op = r % 100, n, first;
        off_t off;
        size_t len;

        /* Spans of 1..16 blocks; sometimes a whole aligned 64 KiB. */
        if (r % 7 == 0) {
            n = 16;
            first = (next_rand(&seed) % (nblocks / 16)) * 16;
        } else {
            n = 1 + next_rand(&seed) % 16;
            first = next_rand(&seed) % (nblocks - n + 1);
        }
        off = (off_t)(first * BLOCK);
        len = n * BLOCK;
        lock_range(first, n);
        if (op < 45) {
            int zero = next_rand(&seed) % 5 == 0;
            for (size_t i = 0; i < len; i += 8) {
                uint64_t v = zero ? 0 : next_rand(&seed);
                memcpy(buf + i, &v, 8);
            }
            if (pwrite(fd, buf, len, off) != (ssize_t)len) {
                perror("pwrite");
                exit(2);
            }
            memcpy(shadow + off, buf, len);
            writes++;
        } else if (op < 80) {
            if (pread(fd, buf, len, off) != (ssize_t)len) {
                perror("pread");
                exit(2);
            }
            if (memcmp(buf, shadow + off, len) != 0) {
                size_t i = 0;
                while (buf[i] == shadow[off + i])
                    i++;
                fprintf(stderr, "MISMATCH at byte %lld (read of %zu at %lld): got "
                        "0x%02x, expected 0x%02x\n", (long long)(off + i), len,
                        (long long)off, buf[i], shadow[off + i]);
                mismatches++;
            }
            reads++;
        } else if (op < 90) {
            if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) < 0) {
                perror("fallocate(PUNCH_HOLE)");
                exit(2);
            }
            memset(shadow + off, 0, len);
            punches++;
        } else if (op < 96) {
            if (fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, len) < 0) {
                perror("fallocate(ZERO_RANGE)");
                exit(2);
            }
            memset(shadow + off, 0, len);
            zeroes++;
        } else {
            unlock_range(first, n);
            if (fsync(fd) < 0) {
                perror("fsync");
                exit(2);
            }
            syncs++;
            ops_done++;
            continue;
        }
        unlock_range(first, n);
        ops_done++;
    }
    free(buf);
    return NULL;
}

int main(int argc, char *argv[])
{
    uint64_t region;
    int threads, seconds;
    pthread_t tid[64];
    FILE *out;

    if (argc != 7) {
        fprintf(stderr, "usage: stress DISK REGION_BYTES THREADS SECONDS SEED SHADOW_OUT\n");
        return 2;
    }
    region = strtoull(argv[2], NULL, 0) / BLOCK * BLOCK;
    threads = atoi(argv[3]);
    seconds = atoi(argv[4]);
    if (region < 64 * BLOCK || threads < 1 || threads > 64) {
        fprintf(stderr, "stress: region must be >= 256 KiB, threads 1..64\n");
        return 2;
    }
    fd = open(argv[1], O_RDWR);
    if (fd < 0) {
        perror(argv[1]);
        return 2;
    }
    nblocks = region / BLOCK;
    shadow = malloc(region);
    locks = calloc(nblocks, sizeof(*locks));
    if (!shadow || !locks)
        return 2;
    for (uint64_t i = 0; i < nblocks; i++)
        pthread_mutex_init(&locks[i], NULL);
    /* The starting content is whatever the disk holds. */
    if (pread(fd, shadow, region, 0) != (ssize_t)region) {
        perror("initial read");
        return 2;
    }
    deadline = time(NULL) + seconds;
    for (int i = 0; i < threads; i++)
        pthread_create(&tid[i], NULL, worker, (void *)(uintptr_t)(strtoull(argv[5], NULL, 0) + (uint64_t)i));
    for (int i = 0; i < threads; i++)
        pthread_join(tid[i], NULL);

    /* Final full comparison. */
    {
        uint8_t *all = malloc(region);
        if (!all || pread(fd, all, region, 0) != (ssize_t)region) {
            perror("final read");
            return 2;
        }
        if (memcmp(all, shadow, region) != 0) {
            fprintf(stderr, "MISMATCH in the final comparison\n");
            mismatches++;
        }
        free(all);
    }
    out = fopen(argv[6], "w");
    if (!out || fwrite(shadow, 1, region, out) != region || fclose(out) != 0) {
        perror(argv[6]);
        return 2;
    }
    printf("stress: %d threads, %d s: %ld ops (%ld writes, %ld reads, %ld punches, "
           "%ld zero ranges, %ld fsyncs), %ld mismatches\n", threads, seconds,
           (long)ops_done, (long)writes, (long)reads, (long)punches, (long)zeroes,
           (long)syncs, (long)mismatches);
    close(fd);
    for (uint64_t i = 0; i < nblocks; i++)
        pthread_mutex_destroy(&locks[i]);
    free(locks);
    free(shadow);
    return mismatches ? 1 : 0;
}
