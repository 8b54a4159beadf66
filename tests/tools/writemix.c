/*
 * writemix — deterministic random write/read/fsync mix against a disk and a
 * reference copy.
 *
 *   writemix DISK RAW SEED NOPS [MAXLEN]
 *
 * DISK (e.g. a qcow2fuse mount's disk file) and RAW (a plain file holding
 * the same starting content) are opened O_RDWR and must have the same size.
 * NOPS operations are chosen by a PRNG seeded with SEED (same seed, same
 * sequence):
 *   ~70%  write 1..MAXLEN bytes (default 3 MiB; K/M/G suffixes accepted) at
 *         a random offset; sizes and offsets are biased towards interesting
 *         values (1, 511, 512, 4095, 4096, 65535, 65536, ...; offsets at or
 *         just around multiples of 512, 4K, 32K, 64K, 2M, 32M, 256M, 512M so
 *         that writes cross sector, cluster and L2-table boundaries); data
 *         is random, all-zero, a constant byte or a counting pattern.  The
 *         same bytes are written to DISK and RAW with pwrite.
 *   ~25%  read the same range from both (often a recently written range)
 *         and compare; a mismatch prints where and exits 1.
 *   ~5%   fsync(DISK).
 * Every range is clipped to the disk size.  At the end DISK is fsync'ed and
 * (unless WRITEMIX_VERIFY=0 is set in the environment) compared with RAW in
 * full.  Prints a one-line summary and exits 0 on success; 1 on a mismatch
 * or an I/O error; 2 on a usage error.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define KIB 1024ULL
#define MIB (1024ULL * 1024ULL)

static uint64_t rng_state;

/* splitmix64 to spread the seed, then xorshift64*. */
static void rng_seed(uint64_t seed)
{
    uint64_t z = seed + 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    rng_state = z ? z : 0x2545f4914f6cdd1dULL;
}

static uint64_t rng(void)
{
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545f4914f6cdd1dULL;
}

/* uniform in [0, n) (n > 0); the modulo bias is irrelevant here */
static uint64_t rnd(uint64_t n)
{
    return n ? rng() % n : 0;
}

static int parse_u64(const char *s, uint64_t *out, int allow_suffix)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno || end == s || *s == '-')
        return -1;
    if (allow_suffix) {
        switch (*end) {
        case 'k': case 'K': v <<= 10; end++; break;
        case 'm': case 'M': v <<= 20; end++; break;
        case 'g': case 'G': v <<= 30; end++; break;
        }
    }
    if (*end)
        return -1;
    *out = v;
    return 0;
}

static uint64_t file_size(int fd, const char *name)
{
    struct stat st;

    if (fstat(fd, &st) < 0) {
        fprintf(stderr, "writemix: fstat %s: %s\n", name, strerror(errno));
        exit(1);
    }
    if (S_ISREG(st.st_mode))
        return (uint64_t)st.st_size;
    off_t end = lseek(fd, 0, SEEK_END);
    if (end < 0) {
        fprintf(stderr, "writemix: lseek %s: %s\n", name, strerror(errno));
        exit(1);
    }
    return (uint64_t)end;
}

static void full_pwrite(int fd, const char *name, const unsigned char *buf,
                        uint64_t len, uint64_t off, uint64_t opno)
{
    uint64_t done = 0;

    while (done < len) {
        ssize_t n = pwrite(fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            fprintf(stderr, "writemix: op %" PRIu64 ": pwrite %s offset %" PRIu64
                    " length %" PRIu64 " (done %" PRIu64 "): %s\n", opno, name,
                    off, len, done, n < 0 ? strerror(errno) : "wrote 0 bytes");
            exit(1);
        }
        done += (uint64_t)n;
    }
}

static void full_pread(int fd, const char *name, unsigned char *buf,
                       uint64_t len, uint64_t off, uint64_t opno)
{
    uint64_t done = 0;

    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            fprintf(stderr, "writemix: op %" PRIu64 ": pread %s offset %" PRIu64
                    " length %" PRIu64 " (done %" PRIu64 "): %s\n", opno, name,
                    off, len, done, strerror(errno));
            exit(1);
        }
        if (n == 0) {
            fprintf(stderr, "writemix: op %" PRIu64 ": pread %s offset %" PRIu64
                    " length %" PRIu64 ": unexpected end of file after %" PRIu64
                    " bytes\n", opno, name, off, len, done);
            exit(1);
        }
        done += (uint64_t)n;
    }
}

/* Interesting lengths (clipped to MAXLEN by the caller). */
static const uint64_t sizes[] = {
    1, 2, 511, 512, 513, 1024, 4095, 4096, 4097, 8192, 32767, 32768,
    65535, 65536, 65537, 131072, 196608, 1048576, 2 * MIB + 512,
};

/* Boundaries (sector, sub-cluster, cluster sizes, L2 table coverage). */
static const uint64_t bounds[] = {
    512, 4 * KIB, 32 * KIB, 64 * KIB, 2 * MIB, 32 * MIB, 256 * MIB, 512 * MIB,
};

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

static uint64_t pick_len(uint64_t maxlen)
{
    uint64_t r = rnd(100), len;

    if (r < 35)
        len = sizes[rnd(NELEM(sizes))];
    else if (r < 65)
        len = 1 + rnd(maxlen < 8192 ? maxlen : 8192);
    else
        len = 1 + rnd(maxlen);
    if (len > maxlen)
        len = maxlen;
    return len ? len : 1;
}

/* Offset for a range of about LEN bytes in a disk of SIZE bytes. */
static uint64_t pick_off(uint64_t size, uint64_t len)
{
    uint64_t r = rnd(100), off;

    if (r < 45) {
        /* at or around a boundary, so that the range straddles it */
        uint64_t nb = 0, b;
        while (nb < NELEM(bounds) && bounds[nb] < size)
            nb++;
        b = nb ? bounds[rnd(nb)] : 512;
        uint64_t k = rnd(size / b + 1), base = k * b;
        switch (rnd(6)) {
        case 0: off = base; break;
        case 1: off = base >= 1 ? base - 1 : 0; break;
        case 2: off = base >= len / 2 ? base - len / 2 : 0; break;
        case 3: off = base >= len ? base - len : 0; break;    /* ends on it */
        case 4: off = base - rnd(len < base ? len : base + 1); break;
        default: off = base + rnd(4096); break;
        }
    } else if (r < 65) {
        off = rnd(size) & ~(uint64_t)4095;
    } else if (r < 80) {
        off = rnd(size) & ~(uint64_t)511;
    } else if (r < 85) {
        /* the very end of the disk */
        off = size > len ? size - len : 0;
    } else {
        off = rnd(size);
    }
    if (off >= size)
        off = size - 1;
    return off;
}

static void fill(unsigned char *buf, uint64_t len, uint64_t opno, const char **kind)
{
    uint64_t r = rnd(100), i;

    if (r < 50) {
        *kind = "random";
        for (i = 0; i + 8 <= len; i += 8) {
            uint64_t v = rng();
            memcpy(buf + i, &v, 8);
        }
        for (; i < len; i++)
            buf[i] = (unsigned char)rng();
    } else if (r < 70) {
        *kind = "zero";
        memset(buf, 0, len);
    } else if (r < 85) {
        *kind = "const";
        memset(buf, (int)(1 + rnd(255)), len);
    } else {
        /* counting pattern that also encodes the op number */
        *kind = "pattern";
        for (i = 0; i < len; i++)
            buf[i] = (unsigned char)(i + opno * 7 + (i >> 8));
    }
}

static int compare_range(int dfd, int rfd, const char *disk, const char *raw,
                         unsigned char *a, unsigned char *b, uint64_t off,
                         uint64_t len, uint64_t opno)
{
    full_pread(dfd, disk, a, len, off, opno);
    full_pread(rfd, raw, b, len, off, opno);
    if (memcmp(a, b, len) == 0)
        return 0;
    uint64_t i = 0, ndiff = 0, last = 0;
    while (a[i] == b[i])
        i++;
    for (uint64_t j = i; j < len; j++) {
        if (a[j] != b[j]) {
            ndiff++;
            last = j;
        }
    }
    fprintf(stderr, "writemix: op %" PRIu64 ": MISMATCH reading offset %" PRIu64
            " length %" PRIu64 ": first difference at offset %" PRIu64
            " (0x%" PRIx64 "): disk has 0x%02x, expected 0x%02x; %" PRIu64
            " differing bytes, last at offset %" PRIu64 "\n", opno, off, len,
            off + i, off + i, a[i], b[i], ndiff, off + last);
    return 1;
}

int main(int argc, char **argv)
{
    uint64_t seed, nops, maxlen = 3 * MIB;

    if (argc < 5 || argc > 6 || parse_u64(argv[3], &seed, 0) ||
        parse_u64(argv[4], &nops, 0) ||
        (argc == 6 && (parse_u64(argv[5], &maxlen, 1) || maxlen == 0))) {
        fprintf(stderr, "usage: writemix DISK RAW SEED NOPS [MAXLEN]\n"
                "  MAXLEN: largest write in bytes (K/M/G suffix), default 3M\n"
                "  WRITEMIX_VERIFY=0 skips the final full comparison\n");
        return 2;
    }
    const char *disk = argv[1], *raw = argv[2];
    int dfd = open(disk, O_RDWR);
    if (dfd < 0) {
        fprintf(stderr, "writemix: open %s: %s\n", disk, strerror(errno));
        return 1;
    }
    int rfd = open(raw, O_RDWR);
    if (rfd < 0) {
        fprintf(stderr, "writemix: open %s: %s\n", raw, strerror(errno));
        return 1;
    }
    uint64_t size = file_size(dfd, disk), rsize = file_size(rfd, raw);
    if (size != rsize) {
        fprintf(stderr, "writemix: %s has %" PRIu64 " bytes but %s has %" PRIu64 "\n",
                disk, size, raw, rsize);
        return 1;
    }
    if (size == 0) {
        fprintf(stderr, "writemix: %s is empty\n", disk);
        return 1;
    }

    uint64_t rmax = maxlen < 4 * MIB ? 4 * MIB : maxlen;   /* largest read */
    unsigned char *wbuf = malloc(maxlen), *a = malloc(rmax), *b = malloc(rmax);
    if (!wbuf || !a || !b) {
        fprintf(stderr, "writemix: out of memory\n");
        return 1;
    }
    rng_seed(seed);

    /* recently written ranges, re-read with priority */
    enum { NRECENT = 16 };
    uint64_t roff[NRECENT] = { 0 }, rlen[NRECENT] = { 0 };
    unsigned nrecent = 0, rpos = 0;

    uint64_t nwrites = 0, wbytes = 0, nreads = 0, rbytes = 0, nsyncs = 0;
    uint64_t nzero = 0;
    const int trace = getenv("WRITEMIX_TRACE") != NULL;

    for (uint64_t op = 1; op <= nops; op++) {
        uint64_t r = rnd(100);
        if (r < 70) {
            uint64_t len = pick_len(maxlen), off = pick_off(size, len);
            if (len > size - off)
                len = size - off;
            const char *kind;
            fill(wbuf, len, op, &kind);
            if (trace)
                fprintf(stderr, "op %" PRIu64 ": write %" PRIu64 " +%" PRIu64 " %s\n",
                        op, off, len, kind);
            full_pwrite(dfd, disk, wbuf, len, off, op);
            full_pwrite(rfd, raw, wbuf, len, off, op);
            nwrites++;
            wbytes += len;
            nzero += kind[0] == 'z';
            roff[rpos] = off;
            rlen[rpos] = len;
            rpos = (rpos + 1) % NRECENT;
            if (nrecent < NRECENT)
                nrecent++;
        } else if (r < 95) {
            uint64_t off, len;
            if (nrecent && rnd(2)) {
                /* a recent write, widened a little on both sides */
                unsigned i = (unsigned)rnd(nrecent);
                uint64_t pre = rnd(5000), post = rnd(5000);
                off = roff[i] > pre ? roff[i] - pre : 0;
                len = rlen[i] + (roff[i] - off) + post;
            } else {
                len = pick_len(rmax);
                off = pick_off(size, len);
            }
            if (len > rmax)
                len = rmax;
            if (len > size - off)
                len = size - off;
            if (trace)
                fprintf(stderr, "op %" PRIu64 ": read %" PRIu64 " +%" PRIu64 "\n",
                        op, off, len);
            if (compare_range(dfd, rfd, disk, raw, a, b, off, len, op))
                return 1;
            nreads++;
            rbytes += len;
        } else {
            if (trace)
                fprintf(stderr, "op %" PRIu64 ": fsync\n", op);
            if (fsync(dfd) < 0) {
                fprintf(stderr, "writemix: op %" PRIu64 ": fsync %s: %s\n", op,
                        disk, strerror(errno));
                return 1;
            }
            nsyncs++;
        }
    }
    if (fsync(dfd) < 0) {
        fprintf(stderr, "writemix: final fsync %s: %s\n", disk, strerror(errno));
        return 1;
    }

    const char *v = getenv("WRITEMIX_VERIFY");
    int verified = 0;
    if (!v || strcmp(v, "0") != 0) {
        for (uint64_t off = 0; off < size; off += rmax) {
            uint64_t len = size - off < rmax ? size - off : rmax;
            if (compare_range(dfd, rfd, disk, raw, a, b, off, len, nops + 1))
                return 1;
        }
        verified = 1;
    }
    if (close(dfd) < 0) {
        fprintf(stderr, "writemix: close %s: %s\n", disk, strerror(errno));
        return 1;
    }
    if (close(rfd) < 0) {
        fprintf(stderr, "writemix: close %s: %s\n", raw, strerror(errno));
        return 1;
    }
    printf("writemix: seed %" PRIu64 ", %" PRIu64 " ops: %" PRIu64 " writes (%" PRIu64
           " bytes, %" PRIu64 " all-zero), %" PRIu64 " reads checked (%" PRIu64
           " bytes), %" PRIu64 " fsyncs; final full compare of %" PRIu64 " bytes: %s\n",
           seed, nops, nwrites, wbytes, nzero, nreads, rbytes, nsyncs, size,
           verified ? "ok" : "skipped");
    free(wbuf);
    free(a);
    free(b);
    return 0;
}
