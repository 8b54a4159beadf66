/*
 * fallocmix — a seeded random mix of writes, hole punches and zero ranges
 * at any offset and length (aligned and not, inside one cluster and across
 * many), applied identically to a disk file and to a raw copy with the
 * same pwrite/fallocate calls, with reads compared in between.
 *
 *   fallocmix DISK RAW SEED NOPS [MAXLEN]
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static uint64_t seed;
static uint8_t *bufs[2];

static void free_bufs(void)
{
    free(bufs[0]);
    free(bufs[1]);
    bufs[0] = bufs[1] = NULL;
}

static uint64_t rnd(void)
{
    seed ^= seed << 13;
    seed ^= seed >> 7;
    seed ^= seed << 17;
    return seed;
}

static uint64_t pick_len(uint64_t max)
{
    static const uint64_t sizes[] = { 1, 511, 512, 513, 4095, 4096, 65535, 65536,
                                      65537, 131072, 1048576, 2097152 + 17 };
    uint64_t l = rnd() % 3 ? sizes[rnd() % (sizeof(sizes) / sizeof(sizes[0]))]
                           : 1 + rnd() % max;
    return l > max ? max : l;
}

static uint64_t pick_off(uint64_t size, uint64_t len)
{
    static const uint64_t aligns[] = { 1, 512, 4096, 65536, 2097152 };
    uint64_t a = aligns[rnd() % 5], off = rnd() % (size - len + 1);

    off -= off % a;
    if (rnd() % 4 == 0)             /* straddle an alignment boundary */
        off = off + a - (len / 2 < off + a ? len / 2 : 0);
    return off + len > size ? size - len : off;
}

int main(int argc, char *argv[])
{
    uint64_t size, max, nops;
    uint8_t *a, *b;
    struct stat st;
    int fd, rfd;
    long w = 0, p = 0, z = 0, r = 0;

    if (argc < 5) {
        fprintf(stderr, "usage: fallocmix DISK RAW SEED NOPS [MAXLEN]\n");
        return 2;
    }
    fd = open(argv[1], O_RDWR);
    rfd = open(argv[2], O_RDWR);
    if (fd < 0 || rfd < 0 || fstat(fd, &st) < 0) {
        perror("open");
        return 2;
    }
    size = (uint64_t)st.st_size;
    seed = strtoull(argv[3], NULL, 0) * 2654435761u + 1;
    nops = strtoull(argv[4], NULL, 0);
    max = argc > 5 ? strtoull(argv[5], NULL, 0) : 4u << 20;
    if (max > size)
        max = size;
    a = malloc(max);
    b = malloc(max);
    if (!a || !b)
        return 2;
    bufs[0] = a;
    bufs[1] = b;
    atexit(free_bufs);

    for (uint64_t i = 0; i < nops; i++) {
        uint64_t op = rnd() % 100, len = pick_len(max), off = pick_off(size, len);
        if (op < 35) {
            for (uint64_t j = 0; j < len; j++)
                a[j] = (uint8_t)(rnd() >> 24);
            if (pwrite(fd, a, len, (off_t)off) != (ssize_t)len ||
                pwrite(rfd, a, len, (off_t)off) != (ssize_t)len) {
                perror("pwrite");
                return 2;
            }
            w++;
        } else if (op < 60 || op < 80) {
            int mode = op < 60 ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                               : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
            if (fallocate(fd, mode, (off_t)off, (off_t)len) < 0 ||
                fallocate(rfd, mode, (off_t)off, (off_t)len) < 0) {
                fprintf(stderr, "fallocate(%s, %llu, %llu): ", op < 60 ? "PUNCH_HOLE" :
                        "ZERO_RANGE", (unsigned long long)off, (unsigned long long)len);
                perror("");
                return 1;
            }
            if (op < 60)
                p++;
            else
                z++;
        } else {
            if (pread(fd, a, len, (off_t)off) != (ssize_t)len ||
                pread(rfd, b, len, (off_t)off) != (ssize_t)len) {
                perror("pread");
                return 2;
            }
            if (memcmp(a, b, len)) {
                uint64_t j = 0;
                while (a[j] == b[j])
                    j++;
                fprintf(stderr, "MISMATCH at %llu (op %llu): disk 0x%02x raw 0x%02x\n",
                        (unsigned long long)(off + j), (unsigned long long)i, a[j], b[j]);
                return 1;
            }
            r++;
        }
        if (rnd() % 50 == 0 && fsync(fd) < 0) {
            perror("fsync");
            return 2;
        }
    }
    printf("fallocmix: %llu ops: %ld writes, %ld punches, %ld zero ranges, %ld reads "
           "compared\n", (unsigned long long)nops, w, p, z, r);
    close(fd);
    close(rfd);
    return 0;
}
