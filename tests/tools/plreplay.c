/*
 * plreplay — replay a qcow2fuse I/O trace into simulated power-loss states
 * and check each one.
 *
 *   plreplay ORIG_IMAGE TRACE LOG STATES SEED WORKDIR [OPTIONS]
 *
 * ORIG_IMAGE  the qcow2 image as it was before the daemon mounted it
 * TRACE       the daemon's io-trace file (records of struct io_trace_record,
 *             host byte order: u32 type, u32 what, u64 offset, u64 length,
 *             then `length` payload bytes for a WRITE)
 * LOG         plwriter's log of the guest workload (see plwriter.c): writes,
 *             zeroing operations, fsyncs, resizes (v2); with plwriter -e, the
 *             call that failed with EIO ("!") after which nothing succeeded
 * STATES      how many crash states to generate
 * SEED        seed for the choice of states
 * WORKDIR     scratch directory (state images are created there)
 *
 * Options:
 *   --keep-bad          keep the image of every bad state as
 *                       WORKDIR/bad-state-N.qcow2 (+ .txt: the records applied)
 *   --base RAWFILE      the guest content before the workload (default:
 *                       "qemu-img convert -O raw ORIG_IMAGE")
 *   --expect-final IMG  the image after the daemon exited: replaying the whole
 *                       trace onto ORIG_IMAGE must reproduce it byte for byte
 *   --jobs N            check states in N worker processes (default 2)
 *   --only N            check state N only (for reproducing a report)
 *   --verbose           one line per state, good or bad
 *
 * Crash model.  Let F be the last FLUSH record before the power cut and F'
 * the next one.  Every WRITE/PUNCH/TRUNCATE before F is on disk; of those
 * between F and F' any subset is, and every included WRITE (or PUNCH) may
 * be torn at 4 KiB boundaries of the host offset.  The states are spread
 * over the flush points: "exactly at F" (nothing after F), subsets of the
 * records between F and F' (a prefix, a random subset, all but one, only
 * one, all of them torn), and the final state (the whole trace).  About a
 * sixth of the subset states (at most 3 per segment) go to the segments of
 * the resizes: those with a write to the header's size or L1 fields (bytes
 * 24..47) and the segment before each (the new L1 table).
 *
 * For each state the image is built in WORKDIR, then
 *   qemu-img check -f qcow2 --output=json     exit 2, corruptions > 0 or
 *                                             check-errors > 0: CORRUPT;
 *                                             leaks only: LEAKY (allowed)
 *   qemu-img convert -f qcow2 -O raw          and every guest sector checked:
 * with K the highest guest fsync whose MARK lies before F', the virtual
 * size must be the size at fsync K (LOG: the start size, or that of the
 * last "R" line before "F K"; ftruncate returns once the size is durable)
 * or a larger one set by a resize logged before fsync K+1 (its ftruncate
 * may have been under way at the cut; one logged after fsync K+1 returned
 * started after mark K+1, so after F').  A smaller or unknown size is LOST
 * data.  Within that size a sector must hold the last write to it issued
 * before fsync K returned, or any later write to it (LOG order); a sector
 * not written before fsync K may also hold its original content (zeros in
 * a grown area, as past the end of the original content).  A zeroing
 * fallocate in LOG ("Z" line) counts as a write of zeros.  Anything else
 * (an older write, the original content where a write was required, a
 * torn, misplaced or unknown sector) is LOST data.
 *
 * Prints one line per bad state, then exactly
 *   powerloss: states=N corrupt=C lost=L leaky=K
 * Exit status: 0 when C and L are 0, 1 otherwise, 2 on a usage, I/O or
 * trace error (a trace that does not match LOG or --expect-final).
 *
 * Runs the system's qemu-img (fork/exec); links only libc.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define SECTOR 512u
#define TEAR 4096u                      /* tearing granularity (host offset) */

enum { T_WRITE = 1, T_FLUSH = 2, T_PUNCH = 3, T_TRUNCATE = 4, T_MARK = 5 };
#define MARK_FSYNC 1

#include "plsector.h"

/* ------------------------------------------------------------------ */
/* Helpers */

struct rng {
    uint64_t s;
};

static uint64_t rng_next(struct rng *r)
{
    r->s += 0x9e3779b97f4a7c15ULL;
    uint64_t z = r->s;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t rnd(struct rng *r, uint64_t n)
{
    return n ? rng_next(r) % n : 0;
}

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...)
{
    va_list ap;

    fflush(stdout);
    fputs("plreplay: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(2);
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        die("out of memory");
    return p;
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

static char *path_in(const char *dir, const char *name)
{
    char *p;
    if (asprintf(&p, "%s/%s", dir, name) < 0)
        die("out of memory");
    return p;
}

static void pwrite_all(int fd, const void *buf, size_t len, uint64_t off, const char *what)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = pwrite(fd, p, len, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("write to %s at %" PRIu64 ": %s", what, off, n < 0 ? strerror(errno) : "short");
        p += n;
        off += (uint64_t)n;
        len -= (size_t)n;
    }
}

static size_t pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    uint8_t *p = buf;
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, p + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("read: %s", strerror(errno));
        if (n == 0)
            break;
        done += (size_t)n;
    }
    return done;
}

/* Copy SRC to DST (sparse: only the data extents). */
static void copy_file(const char *src, const char *dst)
{
    int in = open(src, O_RDONLY | O_CLOEXEC);
    int out = open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    struct stat st;
    static uint8_t *buf;

    if (in < 0 || out < 0 || fstat(in, &st) < 0)
        die("copy %s to %s: %s", src, dst, strerror(errno));
    if (!buf)
        buf = xcalloc(1, 1 << 20);
    off_t pos = 0, size = st.st_size;
    while (pos < size) {
        off_t data = lseek(in, pos, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO)
                break;
            data = pos;             /* no SEEK_DATA: copy everything */
        }
        off_t hole = lseek(in, data, SEEK_HOLE);
        if (hole < 0)
            hole = size;
        while (data < hole) {
            size_t chunk = (size_t)(hole - data > (1 << 20) ? (1 << 20) : hole - data);
            loff_t io = data, oo = data;
            ssize_t n = copy_file_range(in, &io, out, &oo, chunk, 0);
            if (n <= 0) {
                size_t got = pread_full(in, buf, chunk, (uint64_t)data);
                if (got == 0)
                    break;
                pwrite_all(out, buf, got, (uint64_t)data, dst);
                n = (ssize_t)got;
            }
            data += n;
        }
        pos = hole;
    }
    if (ftruncate(out, size) < 0)
        die("truncate %s: %s", dst, strerror(errno));
    close(in);
    if (close(out) < 0)
        die("close %s: %s", dst, strerror(errno));
}

/*
 * Run ARGV with stdout and stderr redirected to files; returns the exit
 * status, or 128+signal.
 */
static int run_cmd(char *const argv[], const char *out_path, const char *err_path)
{
    pid_t pid = fork();
    int status;

    if (pid < 0)
        die("fork: %s", strerror(errno));
    if (pid == 0) {
        int o = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int e = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int n = open("/dev/null", O_RDONLY);
        if (o < 0 || e < 0 || n < 0)
            _exit(126);
        dup2(n, 0);
        dup2(o, 1);
        dup2(e, 2);
        execvp(argv[0], argv);
        _exit(127);
    }
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            die("waitpid: %s", strerror(errno));
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    return 128 + WTERMSIG(status);
}

/* The first line of a (small) text file that contains PREFER, else its
 * first line, or "" — for messages. */
static void first_line(const char *path, const char *prefer, char *buf, size_t size)
{
    FILE *f = fopen(path, "r");
    char line[512];
    buf[0] = 0;
    if (!f)
        return;
    while (fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\n")] = 0;
        if (!buf[0] || (prefer && strstr(line, prefer))) {
            size_t n = strlen(line) < size - 1 ? strlen(line) : size - 1;
            memcpy(buf, line, n);
            buf[n] = 0;
            if (!prefer || strstr(line, prefer))
                break;
        }
    }
    fclose(f);
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    size_t cap = 4096, len = 0;
    char *s = xcalloc(1, cap);

    if (!f)
        return s;
    for (;;) {
        size_t n = fread(s + len, 1, cap - len - 1, f);
        len += n;
        if (n == 0)
            break;
        if (cap - len < 2) {
            cap *= 2;
            s = realloc(s, cap);
            if (!s)
                die("out of memory");
        }
    }
    s[len] = 0;
    fclose(f);
    return s;
}

/* An integer field of qemu-img's JSON output (absent: 0). */
static long long json_int(const char *json, const char *key)
{
    char pat[64];
    const char *p;

    snprintf(pat, sizeof(pat), "\"%s\"", key);
    p = strstr(json, pat);
    if (!p)
        return 0;
    p += strlen(pat);
    while (*p == ' ' || *p == ':' || *p == '\t')
        p++;
    return strtoll(p, NULL, 10);
}

/* ------------------------------------------------------------------ */
/* Trace and log */

struct rec {
    uint32_t type, what;
    uint64_t off, len;
    const uint8_t *data;
};

static struct rec *recs;
static size_t nrec;
static size_t nflush;

/* segment j (0..nflush): records [seg_begin, seg_end) between flush j-1 and
 * flush j; seg_k: the highest guest fsync whose MARK lies before seg_end */
static size_t *seg_begin, *seg_end;
static uint64_t *seg_k;

static uint64_t disk_size, nsect, wseed;   /* the final (largest) size */
static uint64_t nwrites, nfsync;
static uint64_t *sizes;             /* sizes[0]: at the start; sizes[i]: after resize i */
static size_t nsizes;
static size_t *fsync_res;           /* resizes logged before fsync k returned */
static uint64_t nshrink;            /* refused shrinks (X lines) */
static uint64_t *w_off, *w_len;     /* by operation id (1-based) */
static uint8_t *w_zero;             /* by operation id: a zeroing fallocate */
static uint64_t *fsync_w;           /* fsync k returned after writes 1..fsync_w[k] */

/* For each guest sector, the ids of the operations covering it (ascending),
 * and the last zeroing operation covering it (0: none). */
static uint32_t *cov_start, *cov_ids;
static uint32_t *last_zero;

/* Original guest content. */
static const uint8_t *orig;
static uint64_t orig_len;
static uint8_t *orig_zero;          /* per sector: original content is zeros */

static bool applicable(const struct rec *r)
{
    return r->type == T_WRITE || r->type == T_PUNCH || r->type == T_TRUNCATE;
}

static void load_trace(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    const uint8_t *map;
    size_t cap = 1024, pos = 0;
    uint64_t last_mark = 0;

    if (fd < 0 || fstat(fd, &st) < 0)
        die("%s: %s", path, strerror(errno));
    if (st.st_size == 0)
        die("%s: empty trace", path);
    map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED)
        die("mmap %s: %s", path, strerror(errno));
    close(fd);
    recs = xcalloc(cap, sizeof(*recs));
    while (pos < (size_t)st.st_size) {
        struct {
            uint32_t type, what;
            uint64_t offset, length;
        } h;
        if ((size_t)st.st_size - pos < sizeof(h))
            die("%s: truncated record header at byte %zu", path, pos);
        memcpy(&h, map + pos, sizeof(h));
        pos += sizeof(h);
        if (h.type < T_WRITE || h.type > T_MARK)
            die("%s: record %zu at byte %zu has unknown type %u", path, nrec,
                pos - sizeof(h), h.type);
        if (nrec == cap) {
            cap *= 2;
            recs = realloc(recs, cap * sizeof(*recs));
            if (!recs)
                die("out of memory");
        }
        struct rec *r = &recs[nrec++];
        r->type = h.type;
        r->what = h.what;
        r->off = h.offset;
        r->len = h.length;
        r->data = NULL;
        if (h.type == T_WRITE) {
            if ((size_t)st.st_size - pos < h.length)
                die("%s: truncated payload of record %zu", path, nrec - 1);
            r->data = map + pos;
            pos += h.length;
        }
        if (h.type == T_MARK && h.what == MARK_FSYNC) {
            if (h.offset != last_mark + 1)
                die("%s: fsync mark %" PRIu64 " follows mark %" PRIu64, path,
                    (uint64_t)h.offset, last_mark);
            last_mark = h.offset;
        }
    }
    size_t *flush_idx = xcalloc(nrec, sizeof(*flush_idx));
    for (size_t i = 0; i < nrec; i++)
        if (recs[i].type == T_FLUSH)
            flush_idx[nflush++] = i;
    seg_begin = xcalloc(nflush + 1, sizeof(*seg_begin));
    seg_end = xcalloc(nflush + 1, sizeof(*seg_end));
    seg_k = xcalloc(nflush + 1, sizeof(*seg_k));
    uint64_t k = 0;
    size_t i = 0;
    for (size_t j = 0; j <= nflush; j++) {
        seg_begin[j] = j ? flush_idx[j - 1] + 1 : 0;
        seg_end[j] = j < nflush ? flush_idx[j] : nrec;
        for (; i < seg_end[j]; i++)
            if (recs[i].type == T_MARK && recs[i].what == MARK_FSYNC)
                k = recs[i].off;
        seg_k[j] = k;
    }
    free(flush_idx);
}

static void load_log(const char *path)
{
    FILE *f = fopen(path, "r");
    char line[256];
    size_t wcap = 1024, fcap = 256;
    bool ended = false, failed = false;
    unsigned version;
    size_t scap = 8;

    if (!f)
        die("%s: %s", path, strerror(errno));
    if (!fgets(line, sizeof(line), f) ||
        sscanf(line, "plwriter v%u seed=%" SCNu64 " size=%" SCNu64, &version, &wseed,
               &disk_size) != 3 || version < 1 || version > 2)
        die("%s: not a plwriter log (v1 or v2)", path);
    if (disk_size % SECTOR || !disk_size)
        die("%s: bad disk size %" PRIu64, path, disk_size);
    w_off = xcalloc(wcap, sizeof(*w_off));
    w_len = xcalloc(wcap, sizeof(*w_len));
    w_zero = xcalloc(wcap, sizeof(*w_zero));
    fsync_w = xcalloc(fcap, sizeof(*fsync_w));
    fsync_res = xcalloc(fcap, sizeof(*fsync_res));
    sizes = xcalloc(scap, sizeof(*sizes));
    sizes[nsizes++] = disk_size;
    while (fgets(line, sizeof(line), f)) {
        uint64_t a, b, c;
        if ((line[0] == 'W' || line[0] == 'Z') &&
            sscanf(line + 1, " %" SCNu64 " %" SCNu64 " %" SCNu64, &a, &b, &c) == 3) {
            if (a != nwrites + 1 || b % SECTOR || c % SECTOR || !c || b + c > disk_size)
                die("%s: bad write line (or past the size %" PRIu64 "): %s", path, disk_size,
                    line);
            if (a + 1 >= wcap) {
                wcap *= 2;
                w_off = realloc(w_off, wcap * sizeof(*w_off));
                w_len = realloc(w_len, wcap * sizeof(*w_len));
                w_zero = realloc(w_zero, wcap * sizeof(*w_zero));
                if (!w_off || !w_len || !w_zero)
                    die("out of memory");
            }
            nwrites = a;
            w_off[a] = b;
            w_len[a] = c;
            w_zero[a] = line[0] == 'Z';
        } else if (line[0] == 'F' && sscanf(line, "F %" SCNu64, &a) == 1) {
            if (a != nfsync + 1)
                die("%s: bad fsync line: %s", path, line);
            if (a + 1 >= fcap) {
                fcap *= 2;
                fsync_w = realloc(fsync_w, fcap * sizeof(*fsync_w));
                fsync_res = realloc(fsync_res, fcap * sizeof(*fsync_res));
                if (!fsync_w || !fsync_res)
                    die("out of memory");
            }
            nfsync = a;
            fsync_w[a] = nwrites;
            fsync_res[a] = nsizes - 1;
        } else if (line[0] == 'R' && sscanf(line, "R %" SCNu64, &a) == 1) {
            /* the disk grew (only grows succeed) */
            if (a <= disk_size || a % SECTOR)
                die("%s: bad resize line (the size is %" PRIu64 "): %s", path, disk_size, line);
            if (nsizes == scap) {
                scap *= 2;
                sizes = realloc(sizes, scap * sizeof(*sizes));
                if (!sizes)
                    die("out of memory");
            }
            sizes[nsizes++] = disk_size = a;
        } else if (line[0] == 'X' && sscanf(line, "X %" SCNu64, &a) == 1) {
            /* a refused shrink: nothing changed */
            if (a >= disk_size)
                die("%s: bad shrink line (the size is %" PRIu64 "): %s", path, disk_size, line);
            nshrink++;
        } else if (line[0] == '!' && !failed) {
            /* plwriter -e: a call failed with EIO and the workload ended;
             * the W/Z/R line before it may or may not have taken effect,
             * which the rules below allow (a later write is never required) */
            failed = true;
        } else if (line[0] == 'E') {
            ended = true;
        } else {
            die("%s: unexpected line: %s", path, line);
        }
    }
    fclose(f);
    if (!ended)
        die("%s: no end line (the workload did not complete)", path);
    if (nwrites >= UINT32_MAX)
        die("%s: too many writes", path);
    nsect = disk_size / SECTOR;

    /* sector -> covering writes */
    cov_start = xcalloc(nsect + 1, sizeof(*cov_start));
    for (uint64_t id = 1; id <= nwrites; id++)
        for (uint64_t s = w_off[id] / SECTOR; s < (w_off[id] + w_len[id]) / SECTOR; s++)
            cov_start[s + 1]++;
    for (uint64_t s = 0; s < nsect; s++)
        cov_start[s + 1] += cov_start[s];
    cov_ids = xcalloc(cov_start[nsect], sizeof(*cov_ids));
    last_zero = xcalloc(nsect, sizeof(*last_zero));
    uint32_t *fill = xcalloc(nsect, sizeof(*fill));
    for (uint64_t id = 1; id <= nwrites; id++)
        for (uint64_t s = w_off[id] / SECTOR; s < (w_off[id] + w_len[id]) / SECTOR; s++) {
            cov_ids[cov_start[s] + fill[s]++] = (uint32_t)id;
            if (w_zero[id])
                last_zero[s] = (uint32_t)id;
        }
    free(fill);
}

/* The number of resizes logged before fsync K returned (all of them for
 * the final flush). */
static size_t resizes_durable(uint64_t k)
{
    if (k == 0)
        return 0;
    return k <= nfsync ? fsync_res[k] : nsizes - 1;
}

/* Last write id before fsync K returned (all writes for the final flush). */
static uint64_t writes_durable(uint64_t k)
{
    if (k == 0)
        return 0;
    return k <= nfsync ? fsync_w[k] : nwrites;
}

static void load_orig(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;

    if (fd < 0 || fstat(fd, &st) < 0)
        die("%s: %s", path, strerror(errno));
    orig_len = (uint64_t)st.st_size;
    orig_zero = xcalloc(nsect, 1);
    memset(orig_zero, 1, nsect);
    if (orig_len) {
        orig = mmap(NULL, (size_t)orig_len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (orig == MAP_FAILED)
            die("mmap %s: %s", path, strerror(errno));
    }
    /* only the data extents can hold something other than zeros */
    static const uint8_t zero[SECTOR];
    off_t pos = 0;
    while ((uint64_t)pos < orig_len) {
        off_t data = lseek(fd, pos, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO)
                break;
            data = pos;
        }
        off_t hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0)
            hole = (off_t)orig_len;
        for (uint64_t s = (uint64_t)data / SECTOR; s < nsect && s * SECTOR < (uint64_t)hole; s++)
            if (s * SECTOR + SECTOR <= orig_len)
                orig_zero[s] = memcmp(orig + s * SECTOR, zero, SECTOR) == 0;
            else if (s * SECTOR < orig_len)
                for (uint64_t b = s * SECTOR; b < orig_len; b++)
                    if (orig[b])
                        orig_zero[s] = 0;
        pos = hole;
    }
    close(fd);
}

/* ------------------------------------------------------------------ */
/* States */

enum mode { M_AT, M_PREFIX, M_RANDOM, M_ALL_BUT_ONE, M_ONLY_ONE, M_ALL_TORN, M_FINAL };
static const char *const mode_name[] = {
    "at-flush", "prefix", "random", "all-but-one", "only-one", "all-torn", "final",
};

struct state {
    uint32_t num;               /* 1-based, in trace order */
    uint32_t seg;
    enum mode mode;
    bool resize;                /* chosen as a segment of a resize */
    uint64_t gen;               /* generation order (tie-break) */
};

struct result {
    int done, corrupt, lost, leaky;
    char msg[1600];
};

static struct state *states;
static size_t nstates;
static struct result *results;  /* shared with the workers */
static uint64_t seed;
static bool keep_bad, verbose;
static const char *workdir;

static size_t n_resize_segs, n_resize_states;

/* A WRITE to the header's size (24..31) or L1 fields (36..47): a resize. */
static bool header_resize_write(const struct rec *r)
{
    return r->type == T_WRITE && r->off < 48 && r->off + r->len > 24;
}

static enum mode pick_subset_mode(struct rng *r)
{
    uint64_t m = rnd(r, 100);
    return m < 20 ? M_PREFIX : m < 60 ? M_RANDOM : m < 80 ? M_ALL_BUT_ONE
         : m < 90 ? M_ONLY_ONE : M_ALL_TORN;
}

static int cmp_state(const void *a, const void *b)
{
    const struct state *x = a, *y = b;
    if (seg_begin[x->seg] != seg_begin[y->seg])
        return seg_begin[x->seg] < seg_begin[y->seg] ? -1 : 1;
    if (x->mode != y->mode)
        return x->mode < y->mode ? -1 : 1;
    return x->gen < y->gen ? -1 : x->gen > y->gen;
}

static void plan_states(uint64_t want)
{
    struct rng r = { mix64(seed ^ 0x706c7265706c6179ULL) };
    size_t *cand = xcalloc(nflush + 1, sizeof(*cand));
    size_t ncand = 0, n = 0;

    for (size_t j = 0; j <= nflush; j++)
        for (size_t i = seg_begin[j]; i < seg_end[j]; i++)
            if (applicable(&recs[i])) {
                cand[ncand++] = j;
                break;
            }
    states = xcalloc(want ? want : 1, sizeof(*states));
    if (want == 0)
        return;
    /* the final state */
    states[n++] = (struct state){ .seg = (uint32_t)nflush, .mode = M_FINAL };
    uint64_t n_at = nflush ? (want - 1) / 8 : 0;
    if (ncand == 0)
        n_at = nflush ? want - 1 : 0;
    if (n_at == 0 && nflush && want > 1)
        n_at = 1;
    if (n_at > want - 1)
        n_at = want - 1;
    uint64_t n_sub = ncand ? want - 1 - n_at : 0;
    /* the segments of the resizes: a header write to the size or the L1
     * fields, and the segment before it (the new L1 table, its refcounts) */
    size_t *rseg = xcalloc(nflush + 1, sizeof(*rseg)), nrseg = 0;
    for (size_t j = 0; j <= nflush; j++) {
        bool hdr = false;
        for (size_t i = seg_begin[j]; i < seg_end[j] && !hdr; i++)
            hdr = header_resize_write(&recs[i]);
        for (size_t jj = j ? j - 1 : 0; hdr && jj <= j; jj++) {
            bool any = false;
            for (size_t i = seg_begin[jj]; i < seg_end[jj] && !any; i++)
                any = applicable(&recs[i]);
            if (any && (nrseg == 0 || rseg[nrseg - 1] < jj))
                rseg[nrseg++] = jj;
        }
    }
    uint64_t n_res = 3 * (uint64_t)nrseg < n_sub / 6 ? 3 * (uint64_t)nrseg : n_sub / 6;
    n_sub -= n_res;
    n_resize_segs = nrseg;
    n_resize_states = (size_t)n_res;
    /* stratified over the flushes: "exactly at flush j" is segment j */
    for (uint64_t i = 0; i < n_at; i++) {
        uint64_t lo = i * nflush / n_at, hi = (i + 1) * nflush / n_at;
        uint64_t j = 1 + lo + rnd(&r, hi > lo ? hi - lo : 1);
        if (j > nflush)
            j = nflush;
        states[n++] = (struct state){ .seg = (uint32_t)j, .mode = M_AT };
    }
    /* stratified over the segments that have records to lose */
    for (uint64_t i = 0; i < n_sub; i++) {
        uint64_t lo = i * ncand / n_sub, hi = (i + 1) * ncand / n_sub;
        size_t j = cand[lo + rnd(&r, hi > lo ? hi - lo : 1)];
        enum mode mode = pick_subset_mode(&r);
        states[n++] = (struct state){ .seg = (uint32_t)j, .mode = mode };
    }
    /* round robin over the resize segments */
    for (uint64_t i = 0; i < n_res; i++) {
        enum mode mode = pick_subset_mode(&r);
        states[n++] = (struct state){ .seg = (uint32_t)rseg[i % nrseg], .mode = mode,
                                      .resize = true };
    }
    free(rseg);
    for (size_t i = 0; i < n; i++)
        states[i].gen = i;
    nstates = n;
    qsort(states, nstates, sizeof(*states), cmp_state);
    for (size_t i = 0; i < nstates; i++)
        states[i].num = (uint32_t)(i + 1);
    free(cand);
}

/* Apply record R to FD; with TEAR_RNG each 4 KiB piece lands with p=1/2.
 * DESC (optional) gets a line about what was applied. */
static void apply_rec(int fd, const char *what, size_t idx, struct rng *tear, FILE *desc)
{
    const struct rec *r = &recs[idx];
    static const uint8_t zeros[TEAR];

    if (r->type == T_TRUNCATE) {
        if (ftruncate(fd, (off_t)r->off) < 0)
            die("truncate %s: %s", what, strerror(errno));
        if (desc)
            fprintf(desc, "%zu TRUNCATE %" PRIu64 "\n", idx, r->off);
        return;
    }
    if (r->type != T_WRITE && r->type != T_PUNCH)
        return;
    if (desc)
        fprintf(desc, "%zu %s %" PRIu64 "+%" PRIu64 "%s", idx,
                r->type == T_WRITE ? "WRITE" : "PUNCH", r->off, r->len, tear ? " torn:" : "\n");
    uint64_t pos = r->off, end = r->off + r->len;
    while (pos < end) {
        uint64_t next = (pos / TEAR + 1) * TEAR;
        if (next > end)
            next = end;
        bool in = !tear || rnd(tear, 2);
        if (desc && tear)
            fputc(in ? '1' : '0', desc);
        if (in) {
            if (r->type == T_WRITE) {
                pwrite_all(fd, r->data + (pos - r->off), next - pos, pos, what);
            } else if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                 (off_t)pos, (off_t)(next - pos)) < 0) {
                struct stat st;
                if (fstat(fd, &st) == 0 && (uint64_t)st.st_size > pos) {
                    uint64_t e = next < (uint64_t)st.st_size ? next : (uint64_t)st.st_size;
                    pwrite_all(fd, zeros, e - pos, pos, what);
                }
            }
        }
        pos = next;
    }
    if (desc && tear)
        fputc('\n', desc);
}

static bool tearable(const struct rec *r)
{
    return (r->type == T_WRITE || r->type == T_PUNCH) &&
           r->off / TEAR != (r->off + r->len - 1) / TEAR;
}

/* Apply the subset of segment st->seg that ST's mode chooses. */
static void apply_subset(int fd, const char *what, const struct state *st, FILE *desc)
{
    struct rng r = { mix64(seed ^ mix64(0x5eed0000ULL + st->num)) };
    size_t b = seg_begin[st->seg], e = seg_end[st->seg];
    size_t n = 0, *a = xcalloc(e - b, sizeof(*a));

    for (size_t i = b; i < e; i++)
        if (applicable(&recs[i]))
            a[n++] = i;
    size_t pick = n ? (size_t)rnd(&r, n) : 0;
    size_t prefix = (size_t)rnd(&r, n + 1);
    uint64_t p = 25 * (1 + rnd(&r, 3));        /* percent, for M_RANDOM */
    for (size_t k = 0; k < n; k++) {
        const struct rec *rec = &recs[a[k]];
        bool in = false, torn = false;
        switch (st->mode) {
        case M_PREFIX:
            in = k <= prefix && k < n;
            torn = k == prefix && rnd(&r, 2);
            if (k == prefix && !torn)
                in = false;
            break;
        case M_RANDOM:
            in = rnd(&r, 100) < p;
            torn = rnd(&r, 3) == 0;
            break;
        case M_ALL_BUT_ONE:
            in = k != pick;
            torn = rnd(&r, 8) == 0;
            break;
        case M_ONLY_ONE:
            in = k == pick;
            torn = rnd(&r, 2);
            break;
        case M_ALL_TORN:
            in = true;
            torn = true;
            break;
        default:
            break;
        }
        if (in)
            apply_rec(fd, what, a[k], torn && tearable(rec) ? &r : NULL, desc);
    }
    free(a);
}

/* ------------------------------------------------------------------ */
/* Verification of the guest content */

/* The last write to sector S with id <= W (0: none). */
static uint32_t last_before(uint64_t s, uint64_t w)
{
    uint32_t lo = cov_start[s], hi = cov_start[s + 1];
    while (lo < hi) {                   /* first index with id > w */
        uint32_t mid = lo + (hi - lo) / 2;
        if (cov_ids[mid] <= w)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo > cov_start[s] ? cov_ids[lo - 1] : 0;
}

static bool covers(uint64_t s, uint64_t id)
{
    uint32_t lo = cov_start[s], hi = cov_start[s + 1];
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (cov_ids[mid] == id)
            return true;
        if (cov_ids[mid] < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return false;
}

struct verify {
    uint64_t w;                 /* writes 1..w are durable */
    uint64_t bad;
    char first[400];
};

/*
 * Classify sector S whose content is DATA (NULL: a hole, i.e. zeros).
 * Returns true if the content is allowed.
 */
static bool check_sector(struct verify *v, uint64_t s, const uint8_t *data)
{
    static const uint8_t zero[SECTOR];
    uint32_t need = last_before(s, v->w);
    char what[160];
    uint64_t id = 0;

    if (!data || memcmp(data, zero, SECTOR) == 0) {
        /* zeros: the original content, or a zeroing operation */
        if (need == 0 && orig_zero[s])
            return true;
        if (last_zero[s] && last_zero[s] >= need)
            return true;
        snprintf(what, sizeof(what), "zeros");
    } else if (!orig_zero[s] && s * SECTOR + SECTOR <= orig_len &&
               memcmp(data, orig + s * SECTOR, SECTOR) == 0) {
        if (need == 0)
            return true;
        snprintf(what, sizeof(what), "the original content");
    } else {
        uint64_t w[64];
        memcpy(w, data, SECTOR);
        id = w[1];
        if (w[0] != PL_MAGIC || w[3] != wseed) {
            snprintf(what, sizeof(what), "unknown data (no write pattern)");
        } else if (w[63] != sector_hash(w)) {
            snprintf(what, sizeof(what), "a damaged sector of write %" PRIu64 " (bad hash)", id);
        } else if (w[2] != s) {
            snprintf(what, sizeof(what), "write %" PRIu64 "'s sector %" PRIu64 " (misplaced)",
                     id, (uint64_t)w[2]);
        } else if (id == 0 || id > nwrites || w_zero[id] || !covers(s, id)) {
            snprintf(what, sizeof(what), "write %" PRIu64 ", which never wrote this sector", id);
        } else {
            uint64_t full[64];
            fill_sector(full, wseed, id, s);
            if (memcmp(full, w, SECTOR))
                snprintf(what, sizeof(what), "a corrupted copy of write %" PRIu64, id);
            else if (id >= need)
                return true;
            else
                snprintf(what, sizeof(what), "write %" PRIu64 " (stale)", id);
        }
    }
    if (v->bad++ == 0) {
        if (need)
            snprintf(v->first, sizeof(v->first),
                     "sector %" PRIu64 " (guest offset %" PRIu64 ") holds %s; expected %s %u"
                     " (%" PRIu64 "+%" PRIu64 ") or a later one", s, s * SECTOR, what,
                     w_zero[need] ? "the zeros of operation" : "write", need,
                     w_off[need], w_len[need]);
        else
            snprintf(v->first, sizeof(v->first),
                     "sector %" PRIu64 " (guest offset %" PRIu64 ") holds %s; expected the "
                     "original content or a write after the last durable fsync", s, s * SECTOR,
                     what);
    }
    return false;
}

/* Check the raw guest image RAW of a state with K durable guest fsyncs;
 * returns the number of bad sectors (1 for a wrong size). */
static uint64_t verify_raw(const char *raw, uint64_t k, char *msg, size_t msgsize)
{
    uint64_t w = writes_durable(k);
    uint64_t min_size = sizes[resizes_durable(k)], max_size = sizes[resizes_durable(k + 1)];
    int fd = open(raw, O_RDONLY | O_CLOEXEC);
    struct verify v = { .w = w };
    struct stat st;
    static uint8_t *buf;
    const size_t chunk = 1 << 20;

    if (!buf)
        buf = xcalloc(1, chunk);
    if (fd < 0 || fstat(fd, &st) < 0)
        die("%s: %s", raw, strerror(errno));
    /* the size: one the log knows, at least that of fsync K, none set by a
     * resize that started after fsync K+1 */
    uint64_t vsize = (uint64_t)st.st_size;
    bool known = false;
    for (size_t i = 0; i < nsizes; i++)
        known |= sizes[i] == vsize;
    if (!known || vsize < min_size || vsize > max_size) {
        if (min_size == max_size)
            snprintf(msg, msgsize, "virtual size %" PRIu64 ", expected %" PRIu64, vsize,
                     min_size);
        else
            snprintf(msg, msgsize, "virtual size %" PRIu64 ", expected %" PRIu64 " or a size "
                     "from a later resize up to %" PRIu64, vsize, min_size, max_size);
        close(fd);
        return 1;
    }
    uint64_t ns = vsize / SECTOR;
    uint64_t s = 0;
    while (s < ns) {
        off_t data = lseek(fd, (off_t)(s * SECTOR), SEEK_DATA);
        if (data < 0) {
            if (errno != ENXIO)
                die("SEEK_DATA on %s: %s", raw, strerror(errno));
            data = (off_t)vsize;
        }
        /* hole: zeros */
        for (; s < ns && s * SECTOR + SECTOR <= (uint64_t)data; s++) {
            if (cov_start[s] == cov_start[s + 1] && orig_zero[s])
                continue;
            check_sector(&v, s, NULL);
        }
        if (s >= ns)
            break;
        off_t hole = lseek(fd, (off_t)(s * SECTOR), SEEK_HOLE);
        if (hole < 0)
            hole = (off_t)vsize;
        uint64_t end = ((uint64_t)hole + SECTOR - 1) / SECTOR;
        if (end > ns)
            end = ns;
        if (end <= s)
            end = s + 1;
        while (s < end) {
            uint64_t n = end - s > chunk / SECTOR ? chunk / SECTOR : end - s;
            size_t got = pread_full(fd, buf, n * SECTOR, s * SECTOR);
            if (got < n * SECTOR)
                memset(buf + got, 0, n * SECTOR - got);
            for (uint64_t i = 0; i < n; i++)
                check_sector(&v, s + i, buf + i * SECTOR);
            s += n;
        }
    }
    close(fd);
    if (v.bad)
        snprintf(msg, msgsize, "%" PRIu64 " bad sector(s); first: %s", v.bad, v.first);
    return v.bad;
}

/* ------------------------------------------------------------------ */
/* Checking one state */

static void describe(const struct state *st, char *buf, size_t size)
{
    uint64_t k = seg_k[st->seg];
    uint64_t lo = sizes[resizes_durable(k)], hi = sizes[resizes_durable(k + 1)];
    char sz[64];
    if (lo == hi)
        snprintf(sz, sizeof(sz), "size %" PRIu64, lo);
    else
        snprintf(sz, sizeof(sz), "size %" PRIu64 "..%" PRIu64, lo, hi);
    if (st->mode == M_FINAL)
        snprintf(buf, size, "final state (all %zu records), fsyncs<=%" PRIu64 ", %s", nrec, k,
                 sz);
    else
        snprintf(buf, size, "%s after flush #%u (records %zu..%zu)%s, fsyncs<=%" PRIu64
                 " (writes<=%" PRIu64 "), %s", mode_name[st->mode], st->seg,
                 seg_begin[st->seg], seg_end[st->seg], st->resize ? " [resize]" : "", k,
                 writes_durable(k), sz);
}

static void check_state(const struct state *st, const char *dir, const char *base_path,
                        struct result *res)
{
    char *img = path_in(dir, "state.qcow2");
    char *raw = path_in(dir, "state.raw");
    char *out = path_in(dir, "cmd.out");
    char *err = path_in(dir, "cmd.err");
    char *descp = path_in(dir, "state.txt");
    char what[256], line[300], lost_msg[600] = "", corrupt_msg[400] = "";
    FILE *desc = keep_bad ? fopen(descp, "w") : NULL;
    int fd, rc;

    describe(st, what, sizeof(what));
    if (desc)
        fprintf(desc, "state %u: %s\nall records before %zu applied, then:\n", st->num, what,
                seg_begin[st->seg]);
    copy_file(base_path, img);
    fd = open(img, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("%s: %s", img, strerror(errno));
    if (st->mode == M_FINAL) {
        for (size_t i = seg_begin[st->seg]; i < seg_end[st->seg]; i++)
            apply_rec(fd, img, i, NULL, desc);
    } else if (st->mode != M_AT) {
        apply_subset(fd, img, st, desc);
    }
    if (close(fd) < 0)
        die("close %s: %s", img, strerror(errno));
    if (desc)
        fclose(desc);

    char *check_argv[] = { "qemu-img", "check", "-f", "qcow2", "--output=json", img, NULL };
    rc = run_cmd(check_argv, out, err);
    char *json = slurp(out);
    long long corr = json_int(json, "corruptions"), leaks = json_int(json, "leaks");
    long long cerr = json_int(json, "check-errors");
    bool parsed = strstr(json, "\"check-errors\"") != NULL;
    free(json);
    first_line(err, "ERROR", line, sizeof(line));
    if (rc == 2 || corr > 0 || cerr > 0 || (rc != 0 && rc != 3) || !parsed) {
        res->corrupt = 1;
        snprintf(corrupt_msg, sizeof(corrupt_msg),
                 "CORRUPT: qemu-img check exit %d, corruptions=%lld leaks=%lld check-errors=%lld%s%s",
                 rc, corr, leaks, cerr, line[0] ? ": " : "", line);
    } else if (leaks > 0 || rc == 3) {
        res->leaky = 1;
    }

    unlink(raw);
    char *conv_argv[] = { "qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, raw, NULL };
    rc = run_cmd(conv_argv, out, err);
    if (rc != 0) {
        first_line(err, NULL, line, sizeof(line));
        res->corrupt = 1;
        if (!corrupt_msg[0])
            snprintf(corrupt_msg, sizeof(corrupt_msg), "CORRUPT: qemu-img convert exit %d: %s",
                     rc, line);
    } else {
        char m[500] = "";
        if (verify_raw(raw, seg_k[st->seg], m, sizeof(m))) {
            res->lost = 1;
            snprintf(lost_msg, sizeof(lost_msg), "LOST: %s", m);
        }
    }
    unlink(raw);

    if (res->corrupt || res->lost) {
        snprintf(res->msg, sizeof(res->msg), "state %u: %s: %s%s%s", st->num, what, corrupt_msg,
                 corrupt_msg[0] && lost_msg[0] ? "; " : "", lost_msg);
        if (keep_bad) {
            char name[64];
            snprintf(name, sizeof(name), "bad-state-%u.qcow2", st->num);
            char *keep = path_in(workdir, name);
            if (rename(img, keep) < 0)
                die("rename %s: %s", img, strerror(errno));
            snprintf(name, sizeof(name), "bad-state-%u.txt", st->num);
            char *keepd = path_in(workdir, name);
            rename(descp, keepd);
            free(keep);
            free(keepd);
        }
    } else {
        snprintf(res->msg, sizeof(res->msg), "state %u: %s: ok%s", st->num, what,
                 res->leaky ? " (leaks)" : "");
    }
    unlink(img);
    unlink(descp);
    unlink(out);
    unlink(err);
    free(img);
    free(raw);
    free(out);
    free(err);
    free(descp);
    res->done = 1;
}

/* Worker W of NW: the states with index % NW == W, in trace order. */
static void worker(const char *orig_image, unsigned w, unsigned nw, long only)
{
    char name[32];
    snprintf(name, sizeof(name), "w%u", w);
    char *dir = path_in(workdir, name);
    if (mkdir(dir, 0755) < 0 && errno != EEXIST)
        die("mkdir %s: %s", dir, strerror(errno));
    char *base = path_in(dir, "base.qcow2");
    copy_file(orig_image, base);
    int fd = open(base, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("%s: %s", base, strerror(errno));
    size_t applied = 0;

    for (size_t i = 0; i < nstates; i++) {
        const struct state *st = &states[i];
        if (only > 0 ? st->num != (unsigned long)only : i % nw != w)
            continue;
        /* the base: every record before the segment */
        for (; applied < seg_begin[st->seg]; applied++)
            apply_rec(fd, base, applied, NULL, NULL);
        check_state(st, dir, base, &results[i]);
        if (verbose) {
            printf("%s\n", results[i].msg);
            fflush(stdout);
        }
    }
    close(fd);
    unlink(base);
    rmdir(dir);
    free(base);
    free(dir);
}

/* Replaying the whole trace onto ORIG must give the daemon's final image. */
static void check_final(const char *orig_image, const char *expect)
{
    char *img = path_in(workdir, "final.qcow2");
    copy_file(orig_image, img);
    int fd = open(img, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("%s: %s", img, strerror(errno));
    for (size_t i = 0; i < nrec; i++)
        apply_rec(fd, img, i, NULL, NULL);
    int fe = open(expect, O_RDONLY | O_CLOEXEC);
    struct stat a, b;
    if (fe < 0 || fstat(fd, &a) < 0 || fstat(fe, &b) < 0)
        die("%s: %s", expect, strerror(errno));
    if (a.st_size != b.st_size)
        die("the replayed trace gives an image of %lld bytes, %s has %lld",
            (long long)a.st_size, expect, (long long)b.st_size);
    uint8_t *x = xcalloc(1, 1 << 20), *y = xcalloc(1, 1 << 20);
    for (uint64_t off = 0; off < (uint64_t)a.st_size; off += 1 << 20) {
        size_t n1 = pread_full(fd, x, 1 << 20, off), n2 = pread_full(fe, y, 1 << 20, off);
        if (n1 != n2 || memcmp(x, y, n1)) {
            uint64_t d = 0;
            while (d < n1 && x[d] == y[d])
                d++;
            die("the replayed trace does not reproduce %s: first difference at byte %" PRIu64,
                expect, off + d);
        }
    }
    free(x);
    free(y);
    close(fe);
    close(fd);
    unlink(img);
    free(img);
}

int main(int argc, char **argv)
{
    const char *pos[6], *base_raw = NULL, *expect = NULL;
    uint64_t nwant, jobs = 2;
    long only = 0;
    int npos = 0;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--keep-bad"))
            keep_bad = true;
        else if (!strcmp(argv[i], "--verbose"))
            verbose = true;
        else if (!strcmp(argv[i], "--base") && i + 1 < argc)
            base_raw = argv[++i];
        else if (!strcmp(argv[i], "--expect-final") && i + 1 < argc)
            expect = argv[++i];
        else if (!strcmp(argv[i], "--jobs") && i + 1 < argc) {
            if (parse_u64(argv[++i], &jobs) || jobs == 0 || jobs > 64)
                die("bad --jobs");
        } else if (!strcmp(argv[i], "--only") && i + 1 < argc) {
            uint64_t v;
            if (parse_u64(argv[++i], &v) || v == 0)
                die("bad --only");
            only = (long)v;
        } else if (argv[i][0] == '-' && argv[i][1] == '-') {
            die("unknown option %s", argv[i]);
        } else if (npos < 6) {
            pos[npos++] = argv[i];
        } else {
            npos = 7;
            break;
        }
    }
    if (npos != 6 || parse_u64(pos[3], &nwant) || parse_u64(pos[4], &seed)) {
        fprintf(stderr, "usage: plreplay ORIG_IMAGE TRACE LOG STATES SEED WORKDIR [--keep-bad]\n"
                "       [--base RAWFILE] [--expect-final IMAGE] [--jobs N] [--only N] [--verbose]\n");
        return 2;
    }
    const char *orig_image = pos[0];
    workdir = pos[5];
    if (mkdir(workdir, 0755) < 0 && errno != EEXIST)
        die("mkdir %s: %s", workdir, strerror(errno));

    load_log(pos[2]);
    load_trace(pos[1]);
    uint64_t marks = recs && nrec ? seg_k[nflush] : 0;
    /* Mark k must be plwriter's fsync k (the daemon's final flush adds one). */
    if (marks < nfsync || marks > nfsync + 1)
        die("the trace has %" PRIu64 " fsync marks, but the workload did %" PRIu64
            " fsyncs (expected as many marks, or one more for the flush at unmount)",
            marks, nfsync);
    if (expect)
        check_final(orig_image, expect);

    char *orig_raw = NULL;
    if (!base_raw) {
        orig_raw = path_in(workdir, "orig.raw");
        char *out = path_in(workdir, "orig.out"), *err = path_in(workdir, "orig.err");
        char *conv_argv[] = { "qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                              (char *)orig_image, orig_raw, NULL };
        char line[300];
        unlink(orig_raw);
        if (run_cmd(conv_argv, out, err) != 0) {
            first_line(err, NULL, line, sizeof(line));
            die("qemu-img convert %s: %s", orig_image, line);
        }
        unlink(out);
        unlink(err);
        free(out);
        free(err);
        base_raw = orig_raw;
    }
    load_orig(base_raw);

    size_t counts[6] = { 0 };
    uint64_t nzero = 0;
    for (uint64_t id = 1; id <= nwrites; id++)
        nzero += w_zero[id];
    uint64_t host_end = 0;
    for (size_t i = 0; i < nrec; i++) {
        counts[recs[i].type]++;
        if (recs[i].type == T_WRITE && recs[i].off + recs[i].len > host_end)
            host_end = recs[i].off + recs[i].len;
    }
    printf("plreplay: trace: %zu records (%zu writes, %zu flushes, %zu punches, %zu truncates, "
           "%zu marks), host writes up to %" PRIu64 "; log: %" PRIu64 " writes, %" PRIu64
           " zero-ops, %" PRIu64 " fsyncs, %zu resizes (%" PRIu64 " -> %" PRIu64 " bytes), %"
           PRIu64 " refused shrinks\n", nrec, counts[T_WRITE], counts[T_FLUSH],
           counts[T_PUNCH], counts[T_TRUNCATE], counts[T_MARK], host_end, nwrites - nzero,
           nzero, nfsync, nsizes - 1, sizes[0], disk_size, nshrink);

    /* The host flushes of each guest fsync: those since the previous
     * fsync's mark (writes between them may flush too, by evictions). */
    {
        size_t nmark = 0, by[4] = { 0 }, since = 0;
        for (size_t i = 0; i < nrec; i++) {
            if (recs[i].type == T_FLUSH)
                since++;
            if (recs[i].type == T_MARK && recs[i].what == MARK_FSYNC) {
                by[since < 3 ? since : 3]++;
                nmark++;
                since = 0;
            }
        }
        printf("plreplay: host flushes per fsync: %zu fsyncs; 0: %zu, 1: %zu, 2: %zu, "
               "3 or more: %zu\n", nmark, by[0], by[1], by[2], by[3]);
    }

    plan_states(nwant);
    printf("plreplay: %zu states, %zu of them on the %zu trace segments of the resizes\n",
           nstates, n_resize_states, n_resize_segs);
    if (only > 0 && (uint64_t)only > nstates)
        die("--only %ld: there are %zu states", only, nstates);
    size_t rsize = (nstates ? nstates : 1) * sizeof(*results);
    results = mmap(NULL, rsize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (results == MAP_FAILED)
        die("mmap: %s", strerror(errno));
    if (only)
        jobs = 1;
    if (jobs > nstates && nstates)
        jobs = nstates;

    fflush(stdout);
    pid_t *pids = xcalloc(jobs, sizeof(*pids));
    for (unsigned w = 0; w < jobs; w++) {
        pids[w] = fork();
        if (pids[w] < 0)
            die("fork: %s", strerror(errno));
        if (pids[w] == 0) {
            worker(orig_image, w, (unsigned)jobs, only);
            fflush(stdout);
            _exit(0);
        }
    }
    int failed = 0;
    for (unsigned w = 0; w < jobs; w++) {
        int status;
        while (waitpid(pids[w], &status, 0) < 0)
            if (errno != EINTR)
                die("waitpid: %s", strerror(errno));
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            failed = 1;
    }
    if (orig_raw)
        unlink(orig_raw);

    size_t n = 0, corrupt = 0, lost = 0, leaky = 0;
    for (size_t i = 0; i < nstates; i++) {
        const struct result *r = &results[i];
        if (!r->done)
            continue;
        n++;
        corrupt += (size_t)r->corrupt;
        lost += (size_t)r->lost;
        leaky += (size_t)(r->leaky && !r->corrupt);
        if ((r->corrupt || r->lost) && !verbose)
            printf("%s\n", r->msg);
    }
    if (failed)
        die("a worker failed");
    printf("powerloss: states=%zu corrupt=%zu lost=%zu leaky=%zu\n", n, corrupt, lost, leaky);

    free(pids);
    free(orig_raw);
    free(recs);
    free(seg_begin);
    free(seg_end);
    free(seg_k);
    free(w_off);
    free(w_len);
    free(w_zero);
    free(last_zero);
    free(fsync_w);
    free(fsync_res);
    free(sizes);
    free(cov_start);
    free(cov_ids);
    free(orig_zero);
    free(states);
    return corrupt || lost ? 1 : 0;
}
