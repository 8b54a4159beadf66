/*
 * plwriter — the guest workload of the power-loss test.
 *
 *   plwriter [-e] [-a] DISK LOG SEED NOPS [GROW]
 *
 * Issues NOPS operations to DISK (a qcow2fuse mount's disk file), single
 * threaded, and fsync(DISK) after every 1..8 of them (random).  About 90%
 * are writes, 512-byte aligned and a multiple of 512 bytes long (1 sector
 * .. 1 MiB, mostly small); offsets are biased so that writes cross cluster
 * and L2-table boundaries and partly overwrite earlier writes (in-place
 * overwrites, partial-cluster copy-on-write).  The other ~10% zero a range
 * with fallocate (PUNCH_HOLE|KEEP_SIZE or ZERO_RANGE, 1 sector .. 1 MiB,
 * mostly over earlier writes), which frees clusters; if the disk does not
 * support fallocate (EOPNOTSUPP) only writes are issued.
 *
 * The disk also grows: ftruncate(DISK, size + N) once in the middle of the
 * run (operation NOPS/2; N is GROW bytes if given, e.g. enough to need a
 * larger L1 table, else random) and with a small probability elsewhere (at
 * most MAX_GROWS in all; N random, 1..64 MiB in 512-byte steps, so the size
 * is often not a multiple of the cluster size).  Later writes and zeroing
 * operations may land in the new area (some straddle the old end).  The
 * daemon flushes before ftruncate returns, so the new size is durable then.
 * At 3/4 of the run (and rarely elsewhere) it tries to shrink the disk over
 * written data: that must fail with EOPNOTSUPP and change nothing.
 *
 * Every 512-byte sector written is self-describing (see fill_sector):
 *   u64 magic  "PLWSECT1"
 *   u64 write id (1, 2, ...)
 *   u64 guest sector number
 *   u64 seed
 *   480 bytes of filler derived from (seed, id, sector)
 *   u64 hash over the 504 bytes before it
 * so a sector read back later can be attributed to exactly one write, and a
 * torn, stale or misplaced sector is detected.  plreplay.c decodes the
 * same layout (keep the two in sync).
 *
 * LOG (text) records the sequence, in the order the calls returned:
 *   plwriter v2 seed=SEED size=BYTES nops=NOPS  (size: at the start)
 *   W ID OFFSET LENGTH        a write returned (bytes)
 *   Z ID OFFSET LENGTH MODE   a zeroing fallocate returned (MODE: punch or
 *                             zero-range); the range reads as zeros
 *   F SEQ                     fsync number SEQ (1, 2, ...) returned
 *   R SIZE                    ftruncate grew the disk to SIZE bytes
 *   X SIZE                    a shrink to SIZE was refused (nothing changed)
 *   E                         end (the workload completed)
 * Operation ids (W and Z share them) are 1, 2, ... in LOG order.
 *
 * At the end the disk must have the last size logged, every written or
 * zeroed sector is read back through DISK and must hold its last write (or
 * zeros), and so must the first 2 MiB past each old end that were never
 * written (zeros).  LOG is line-buffered, so a hung run shows the last
 * operation that returned.  Exit 0 on success, 1 on an I/O error or a
 * mismatch, 2 on a usage error.  Uses libc only.
 *
 * -a: appends, the steady state of a log or a file being copied in: only
 * writes (no zeroing), of 1..16 sectors, each at or after the end of the
 * previous one (mostly at the next 64 KiB boundary, so that most writes
 * allocate a cluster), wrapping around at the end of the disk; an fsync
 * after every 1..3 of them.  The resizes and the refused shrink stay.
 *
 * -e: a host flush is going to fail (the test injects it under the daemon)
 * and the daemon must make that sticky.  The first call that fails with EIO
 * (write, fallocate, ftruncate or fsync) ends the workload; a failed write
 * or fallocate is still logged (W/Z: part of it may have been done), a
 * failed grow as R (the new size may have become durable), then
 *   ! CALL                    that call failed with EIO
 * Then every later write, fsync, fallocate and ftruncate must fail with
 * EIO, while reads go on: every sector reads back as above (the sectors of
 * the failed call: its data or what they held before), and LOG ends with E.
 * Without a failure the run fails.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SECTOR 512u
#define MAX_SECTORS 2048u               /* 1 MiB */
#include "plsector.h"

/* ------------------------------------------------------------------ */

static uint64_t rng_state;

static uint64_t rng(void)
{
    rng_state += 0x9e3779b97f4a7c15ULL;
    uint64_t z = rng_state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t rnd(uint64_t n)
{
    return n ? rng() % n : 0;
}

static int parse_u64(const char *s, uint64_t *out)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno || end == s || *end || *s == '-')
        return -1;
    *out = v;
    return 0;
}

struct wr {
    uint64_t sector;
    uint32_t count;
    bool zero;                  /* a zeroing fallocate, not a write */
};

static uint32_t pick_length(void)
{
    uint64_t r = rnd(100);

    if (r < 55)
        return 1 + (uint32_t)rnd(8);
    if (r < 80)
        return 9 + (uint32_t)rnd(120);
    if (r < 95)
        return 129 + (uint32_t)rnd(384);
    return 513 + (uint32_t)rnd(MAX_SECTORS - 512);
}

/* Guest-side boundaries worth crossing: 4K/64K clusters, the 32K and 2M
 * that one L2 table maps with 512-byte and 4K clusters, 8M. */
static const uint64_t boundaries[] = {
    4096, 32768, 65536, 65536, 2 << 20, 2 << 20, 8 << 20,
};

#define MAX_GROWS 4                     /* resizes per run, the forced one included */
#define MAX_RANDOM_GROW (64ULL << 20)
#define SAMPLE_SECTORS 4096u            /* 2 MiB past each old end read back */

static uint64_t grown_at[MAX_GROWS];    /* the sizes before each grow */
static unsigned ngrows;

static bool expect_failure;             /* -e */
static bool appends;                    /* -a */
static const char *failed_call;         /* -e: the call that failed with EIO */

/*
 * -e, after the first EIO: every call that changes the disk or makes it
 * durable must fail with EIO too (a retried fsync must not succeed for data
 * the host may have dropped).  Returns true (after a message) if one did not.
 */
static bool sticky_failure_broken(int fd, uint64_t nsect, uint64_t size, bool zero_ok,
                                  uint64_t *buf, uint64_t seed, uint64_t id)
{
    for (unsigned round = 0; round < 3; round++) {
        uint64_t start = rnd(nsect - 8);
        const char *what[4] = { "fsync", "write", "fallocate", "ftruncate" };

        for (uint32_t i = 0; i < 8; i++)
            fill_sector(buf + i * (SECTOR / 8), seed, id, start + i);
        for (unsigned c = 0; c < 4; c++) {
            long ret;
            if (c == 2 && !zero_ok)
                continue;
            ret = c == 0 ? fsync(fd)        /* the retry that Linux lets through */
                : c == 1 ? (long)pwrite(fd, buf, 8 * SECTOR, (off_t)(start * SECTOR))
                : c == 2 ? fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                     (off_t)(start * SECTOR), 8 * SECTOR)
                : ftruncate(fd, (off_t)(size + (1u << 20)));
            if (ret >= 0 || errno != EIO) {
                fprintf(stderr, "plwriter: after %s failed with EIO, a %s %s\n", failed_call,
                        what[c], ret >= 0 ? "succeeded" : strerror(errno));
                return true;
            }
        }
    }
    return false;
}

/* Sector S lies in the first SAMPLE_SECTORS past an old end. */
static bool in_sample(uint64_t s)
{
    for (unsigned g = 0; g < ngrows; g++)
        if (s >= grown_at[g] / SECTOR && s - grown_at[g] / SECTOR < SAMPLE_SECTORS)
            return true;
    return false;
}

int main(int argc, char **argv)
{
    uint64_t seed, nops, grow = 0, size, nsect, max_nsect, id = 0, fsyncs = 0;
    struct wr *hist;
    uint32_t *last;
    uint64_t *buf;
    FILE *log;
    struct stat st;
    int fd, countdown;
    unsigned nshrinks = 0;
    bool zero_ok = true, forced_grow = false;
    uint64_t partial = 0;               /* -e: the id of the failed W/Z, or 0 */

    while (argc > 1 && (!strcmp(argv[1], "-e") || !strcmp(argv[1], "-a"))) {
        if (argv[1][1] == 'e')
            expect_failure = true;
        else
            appends = true;
        argv++;
        argc--;
    }
    if ((argc != 5 && argc != 6) || parse_u64(argv[3], &seed) || parse_u64(argv[4], &nops) ||
        (argc == 6 && (parse_u64(argv[5], &grow) || grow == 0 || grow % SECTOR ||
                       grow > (1ULL << 40)))) {
        fprintf(stderr, "usage: plwriter [-e] [-a] DISK LOG SEED NOPS [GROW]\n"
                "       (GROW: bytes, a multiple of 512, the growth of the mid-run resize;\n"
                "       -e: a host flush fails; -a: appends; see plwriter.c)\n");
        return 2;
    }
    fd = open(argv[1], O_RDWR);
    if (fd < 0) {
        fprintf(stderr, "plwriter: open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    if (fstat(fd, &st) < 0) {
        fprintf(stderr, "plwriter: stat %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    size = (uint64_t)st.st_size;
    nsect = size / SECTOR;
    if (nsect < 2 * MAX_SECTORS || size % SECTOR) {
        fprintf(stderr, "plwriter: %s is too small or not a multiple of 512 (%" PRIu64
                " bytes)\n", argv[1], size);
        return 1;
    }
    /* room for every sector the disk can grow to */
    max_nsect = nsect + (grow + MAX_GROWS * MAX_RANDOM_GROW) / SECTOR;
    log = fopen(argv[2], "w");
    if (!log) {
        fprintf(stderr, "plwriter: %s: %s\n", argv[2], strerror(errno));
        return 1;
    }
    hist = calloc(nops ? nops : 1, sizeof(*hist));
    last = calloc(max_nsect, sizeof(*last));
    buf = aligned_alloc(4096, (size_t)MAX_SECTORS * SECTOR);
    if (!hist || !last || !buf) {
        fprintf(stderr, "plwriter: out of memory\n");
        return 1;
    }
    setvbuf(log, NULL, _IOLBF, 0);      /* a hung run shows how far it got */
    rng_state = mix64(seed);
    fprintf(log, "plwriter v2 seed=%" PRIu64 " size=%" PRIu64 " nops=%" PRIu64 "\n",
            seed, size, nops);

    countdown = 1 + (int)rnd(appends ? 3 : 8);
    for (uint64_t op = 0; op < nops; op++) {
        uint32_t count;
        uint64_t r, start;

        /* Grow the disk: once in the middle, rarely elsewhere. */
        if (op == nops / 2 ||
            (op > 0 && ngrows + !forced_grow < MAX_GROWS && rnd(1000) < 7)) {
            bool forced = op == nops / 2;
            uint64_t n = forced && grow ? grow
                       : ((1ULL << 20) + rnd(MAX_RANDOM_GROW - (1ULL << 20) + 1)) &
                         ~(uint64_t)(SECTOR - 1);

            if (forced)
                forced_grow = true;
            if (ftruncate(fd, (off_t)(size + n)) < 0) {
                if (expect_failure && errno == EIO) {
                    fprintf(log, "R %" PRIu64 "\n", size + n);
                    failed_call = "ftruncate";
                    goto after_failure;
                }
                fprintf(stderr, "plwriter: ftruncate to %" PRIu64 " (grow by %" PRIu64
                        "): %s\n", size + n, n, strerror(errno));
                return 1;
            }
            if (fstat(fd, &st) < 0 || (uint64_t)st.st_size != size + n) {
                fprintf(stderr, "plwriter: after ftruncate to %" PRIu64 " the size is %lld\n",
                        size + n, (long long)st.st_size);
                return 1;
            }
            grown_at[ngrows++] = size;
            size += n;
            nsect = size / SECTOR;
            fprintf(log, "R %" PRIu64 "\n", size);
            goto maybe_fsync;
        }

        /* Try to shrink the disk over written data: must be refused. */
        if (id > 0 && (op == 3 * nops / 4 || (nshrinks < 3 && rnd(1000) < 3))) {
            uint64_t s = nsect, target;
            while (s > 0 && !(last[s - 1] && !hist[last[s - 1] - 1].zero))
                s--;
            /* sector s - 1 holds a write: cut 2..4 MiB below it, so that
             * its whole cluster (up to 1 MiB) lies past the end (a cut
             * inside a cluster zeroes its tail, allowed with data) */
            if (s > 5 * MAX_SECTORS) {
                target = (s - 1 - 2 * MAX_SECTORS - rnd(2 * MAX_SECTORS)) * SECTOR;
                if (ftruncate(fd, (off_t)target) == 0) {
                    fprintf(stderr, "plwriter: shrinking to %" PRIu64 " succeeded, but "
                            "sector %" PRIu64 " holds write %u\n", target, s - 1, last[s - 1]);
                    return 1;
                }
                if (errno != EOPNOTSUPP) {
                    fprintf(stderr, "plwriter: shrinking to %" PRIu64 ": %s (expected %s)\n",
                            target, strerror(errno), strerror(EOPNOTSUPP));
                    return 1;
                }
                if (fstat(fd, &st) < 0 || (uint64_t)st.st_size != size) {
                    fprintf(stderr, "plwriter: after a refused shrink the size is %lld, "
                            "not %" PRIu64 "\n", (long long)st.st_size, size);
                    return 1;
                }
                nshrinks++;
                fprintf(log, "X %" PRIu64 "\n", target);
                goto maybe_fsync;
            }
        }

        if (appends) {
            uint64_t cursor = id ? hist[id - 1].sector + hist[id - 1].count : 0;
            const uint64_t step = 65536 / SECTOR;

            count = 1 + (uint32_t)rnd(16);
            start = rnd(4) == 0 ? cursor : (cursor + step - 1) / step * step + rnd(8);
            if (start + count > nsect)
                start = rnd(64);                /* wrap around */
            goto write;
        }

        if (zero_ok && id > 0 && rnd(100) < 10) {
            /* zero a range (mostly over earlier writes): PUNCH_HOLE frees
             * clusters, ZERO_RANGE may too */
            uint64_t k = rnd(10);
            int mode = rnd(2) ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                              : FALLOC_FL_ZERO_RANGE | (rnd(2) ? FALLOC_FL_KEEP_SIZE : 0);

            count = k < 3 ? 1 + (uint32_t)rnd(16)                   /* sectors */
                  : k < 7 ? 8 * (1 + (uint32_t)rnd(32))             /* 4K .. 128K */
                  : 128 * (1 + (uint32_t)rnd(16));                  /* 64K .. 1M */
            if (rnd(10) < 7) {
                const struct wr *p = &hist[rnd(id)];
                int64_t st0 = (int64_t)p->sector + (int64_t)rnd(p->count) - (int64_t)count / 2;
                start = st0 < 0 ? 0 : (uint64_t)st0;
            } else {
                start = rnd(nsect);
            }
            if (k >= 3)
                start &= ~(uint64_t)(k < 7 ? 7 : 127);
            if (start >= nsect)
                start = nsect - 1;
            if (start + count > nsect)
                count = (uint32_t)(nsect - start);
            if (fallocate(fd, mode, (off_t)(start * SECTOR), (off_t)count * SECTOR) == 0) {
                id++;
                hist[id - 1] = (struct wr){ .sector = start, .count = count, .zero = true };
                for (uint32_t i = 0; i < count; i++)
                    last[start + i] = (uint32_t)id;
                fprintf(log, "Z %" PRIu64 " %" PRIu64 " %" PRIu64 " %s\n", id, start * SECTOR,
                        (uint64_t)count * SECTOR,
                        mode & FALLOC_FL_PUNCH_HOLE ? "punch" : "zero-range");
                goto maybe_fsync;
            }
            if (expect_failure && errno == EIO) {
                id++;
                hist[id - 1] = (struct wr){ .sector = start, .count = count, .zero = true };
                partial = id;
                fprintf(log, "Z %" PRIu64 " %" PRIu64 " %" PRIu64 " %s\n", id, start * SECTOR,
                        (uint64_t)count * SECTOR,
                        mode & FALLOC_FL_PUNCH_HOLE ? "punch" : "zero-range");
                failed_call = "fallocate";
                goto after_failure;
            }
            if (errno != EOPNOTSUPP) {
                fprintf(stderr, "plwriter: fallocate %s (%u sectors at sector %" PRIu64
                        "): %s\n", mode & FALLOC_FL_PUNCH_HOLE ? "punch" : "zero-range",
                        count, start, strerror(errno));
                return 1;
            }
            fprintf(stderr, "plwriter: fallocate is not supported; writes only\n");
            zero_ok = false;
        }

        count = pick_length();
        r = rnd(100);
        if (ngrows && rnd(100) < 15) {
            /* into a grown area, or straddling its start (the old end) */
            uint64_t old = grown_at[rnd(ngrows)] / SECTOR;
            if (rnd(3) == 0) {
                if (count < 2)
                    count = 2 + (uint32_t)rnd(16);
                start = old - 1 - rnd(count - 1);
            } else {
                start = old + rnd(nsect - old);
            }
        } else if (r < 40 || id == 0) {
            /* anywhere; sometimes 4K-aligned */
            start = rnd(nsect);
            if (rnd(3) == 0)
                start &= ~(uint64_t)7;
        } else if (r < 55) {
            /* straddle a boundary */
            uint64_t b = boundaries[rnd(sizeof(boundaries) / sizeof(boundaries[0]))] / SECTOR;
            if (nsect / b < 2)
                b = 4096 / SECTOR;
            uint64_t k = 1 + rnd(nsect / b - 1);
            if (count < 2)
                count = 2 + (uint32_t)rnd(16);
            start = k * b - 1 - rnd(count - 1);
        } else if (r < 90) {
            /* overlap an earlier write, partly or wholly */
            const struct wr *p = &hist[rnd(4) == 0 ? id - 1 : rnd(id)];
            int64_t shift = (int64_t)rnd(p->count + count) - (int64_t)count / 2;
            int64_t s = (int64_t)p->sector + shift;
            start = s < 0 ? 0 : (uint64_t)s;
            if (rnd(3) == 0) {
                start = p->sector;          /* exact in-place rewrite */
                count = p->count;
            }
        } else {
            /* right after the previous write */
            start = hist[id - 1].sector + hist[id - 1].count;
        }
write:
        if (start >= nsect)
            start = nsect - 1;
        if (start + count > nsect)
            count = (uint32_t)(nsect - start);

        id++;
        for (uint32_t i = 0; i < count; i++)
            fill_sector(buf + i * (SECTOR / 8), seed, id, start + i);
        ssize_t n = pwrite(fd, buf, (size_t)count * SECTOR, (off_t)(start * SECTOR));
        if (n < 0 && expect_failure && errno == EIO) {
            hist[id - 1] = (struct wr){ .sector = start, .count = count };
            partial = id;
            fprintf(log, "W %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", id, start * SECTOR,
                    (uint64_t)count * SECTOR);
            failed_call = "write";
            goto after_failure;
        }
        if (n != (ssize_t)count * SECTOR) {
            fprintf(stderr, "plwriter: write %" PRIu64 " (%u sectors at sector %" PRIu64
                    "): %s\n", id, count, start, n < 0 ? strerror(errno) : "short write");
            return 1;
        }
        hist[id - 1] = (struct wr){ .sector = start, .count = count };
        for (uint32_t i = 0; i < count; i++)
            last[start + i] = (uint32_t)id;
        fprintf(log, "W %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", id, start * SECTOR,
                (uint64_t)count * SECTOR);

maybe_fsync:
        if (--countdown == 0) {
            if (fsync(fd) < 0) {
                if (expect_failure && errno == EIO) {
                    failed_call = "fsync";
                    goto after_failure;
                }
                fprintf(stderr, "plwriter: fsync %" PRIu64 ": %s\n", fsyncs + 1, strerror(errno));
                return 1;
            }
            fsyncs++;
            fprintf(log, "F %" PRIu64 "\n", fsyncs);
            countdown = 1 + (int)rnd(appends ? 3 : 8);
        }
    }
    if (expect_failure) {
        fprintf(stderr, "plwriter: -e: no call failed with EIO in %" PRIu64 " operations\n",
                nops);
        return 1;
    }

after_failure:
    if (failed_call) {
        fprintf(log, "! %s\n", failed_call);
        if (sticky_failure_broken(fd, nsect, size, zero_ok, buf, seed, id + 1))
            return 1;
    }
    fprintf(log, "E\n");
    if (fflush(log) || ferror(log) || fclose(log)) {
        fprintf(stderr, "plwriter: writing %s failed\n", argv[2]);
        return 1;
    }

    /* The disk has its last size; read back every written sector and the
     * start of each grown area through the mount. */
    /* (a grow that failed may or may not have changed the size) */
    if (fstat(fd, &st) < 0 || ((uint64_t)st.st_size != size &&
                               !(failed_call && !strcmp(failed_call, "ftruncate") &&
                                 (uint64_t)st.st_size > size))) {
        fprintf(stderr, "plwriter: at the end the disk has %lld bytes, expected %" PRIu64 "\n",
                (long long)st.st_size, size);
        return 1;
    }
    uint64_t bad = 0, checked = 0;
    for (uint64_t s = 0; s < nsect;) {
        uint64_t e = s;
        while (e < nsect && e - s < MAX_SECTORS &&
               (last[e] || in_sample(e) ||
                (partial && e - hist[partial - 1].sector < hist[partial - 1].count)))
            e++;
        if (e == s) {
            s++;
            continue;
        }
        ssize_t n = pread(fd, buf, (size_t)(e - s) * SECTOR, (off_t)(s * SECTOR));
        if (n != (ssize_t)((e - s) * SECTOR)) {
            fprintf(stderr, "plwriter: read back at sector %" PRIu64 ": %s\n", s,
                    n < 0 ? strerror(errno) : "short read");
            return 1;
        }
        for (uint64_t i = s; i < e; i++) {
            uint64_t want[64], other[64];
            if (!last[i] || hist[last[i] - 1].zero)
                memset(want, 0, sizeof(want));
            else
                fill_sector(want, seed, last[i], i);
            /* the failed call's sectors: its data, or what they held */
            if (partial && i - hist[partial - 1].sector < hist[partial - 1].count) {
                if (hist[partial - 1].zero)
                    memset(other, 0, sizeof(other));
                else
                    fill_sector(other, seed, partial, i);
                if (!memcmp(other, buf + (i - s) * (SECTOR / 8), SECTOR))
                    memcpy(want, other, sizeof(want));
            }
            if (memcmp(want, buf + (i - s) * (SECTOR / 8), SECTOR)) {
                if (bad++ < 5) {
                    if (last[i])
                        fprintf(stderr, "plwriter: sector %" PRIu64 " does not hold %s %u\n",
                                i, hist[last[i] - 1].zero ? "the zeros of fallocate" : "write",
                                last[i]);
                    else
                        fprintf(stderr, "plwriter: sector %" PRIu64 " (grown, never written) "
                                "does not read as zeros\n", i);
                }
            }
            checked++;
        }
        s = e;
    }
    close(fd);
    uint64_t nzero = 0;
    for (uint64_t i = 0; i < id; i++)
        nzero += hist[i].zero;
    printf("plwriter: seed=%" PRIu64 " writes=%" PRIu64 " zero-ops=%" PRIu64 " fsyncs=%" PRIu64
           " grows=%u shrinks-refused=%u size=%" PRIu64 " sectors-verified=%" PRIu64
           " bad=%" PRIu64 "%s%s\n", seed, id - nzero, nzero, fsyncs, ngrows, nshrinks, size,
           checked, bad, failed_call ? " failed=" : "", failed_call ? failed_call : "");
    free(hist);
    free(last);
    free(buf);
    return bad ? 1 : 0;
}
