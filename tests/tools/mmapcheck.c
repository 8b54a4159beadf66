/*
 * mmapcheck — what mmap of a disk file does: a private read mapping must
 * show the file's bytes; a shared read mapping and a shared writable
 * mapping must either work (and agree with pread / reach the file after
 * msync) or be refused with an errno at mmap time.  Never a hang, a
 * SIGBUS or different bytes.
 *
 *   mmapcheck FILE LENGTH [rw]
 *
 * With "rw" the shared writable mapping is tried too: it writes a pattern
 * into the first page, msyncs, checks it with pread and puts the old bytes
 * back.  Prints one line per mapping kind ("private: ok", "shared: refused
 * (No such device)", ...).  Exit 0 when every kind behaved, 1 otherwise.
 */
#include <errno.h>
#include <stdbool.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int fd;
static size_t len;
static uint8_t *expect;

static int check_read_mapping(const char *name, int flags)
{
    uint8_t *p = mmap(NULL, len, PROT_READ, flags, fd, 0);

    if (p == MAP_FAILED) {
        if (flags & MAP_PRIVATE) {
            printf("%s: mmap failed: %s\n", name, strerror(errno));
            return 1;
        }
        printf("%s: refused (%s)\n", name, strerror(errno));
        return 0;
    }
    if (memcmp(p, expect, len) != 0) {
        printf("%s: the mapping differs from pread\n", name);
        munmap(p, len);
        return 1;
    }
    munmap(p, len);
    printf("%s: ok\n", name);
    return 0;
}

static int check_write_mapping(void)
{
    long page = sysconf(_SC_PAGESIZE);
    uint8_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    uint8_t *back;
    int bad = 0;

    if (p == MAP_FAILED) {
        printf("shared-rw: refused (%s)\n", strerror(errno));
        return 0;
    }
    back = malloc((size_t)page);
    if (!back || len < (size_t)page) {
        printf("shared-rw: the file is shorter than a page\n");
        munmap(p, len);
        free(back);
        return 1;
    }
    for (long i = 0; i < page; i++)
        p[i] = (uint8_t)(0xa5 ^ i);
    if (msync(p, (size_t)page, MS_SYNC) != 0) {
        printf("shared-rw: msync: %s\n", strerror(errno));
        bad = 1;
    } else if (pread(fd, back, (size_t)page, 0) != page) {
        printf("shared-rw: pread: %s\n", strerror(errno));
        bad = 1;
    } else {
        for (long i = 0; i < page; i++)
            if (back[i] != (uint8_t)(0xa5 ^ i)) {
                printf("shared-rw: byte %ld written through the mapping did "
                       "not reach the file\n", i);
                bad = 1;
                break;
            }
    }
    memcpy(p, expect, (size_t)page);
    if (msync(p, (size_t)page, MS_SYNC) != 0)
        bad = 1;
    munmap(p, len);
    free(back);
    if (!bad)
        printf("shared-rw: ok\n");
    return bad;
}

int main(int argc, char **argv)
{
    bool rw = argc == 4 && strcmp(argv[3], "rw") == 0;
    int bad = 0;

    if (argc < 3 || argc > 4 || (argc == 4 && !rw)) {
        fprintf(stderr, "usage: mmapcheck FILE LENGTH [rw]\n");
        return 2;
    }
    len = strtoull(argv[2], NULL, 0);
    fd = open(argv[1], rw ? O_RDWR : O_RDONLY);
    expect = malloc(len);
    if (fd < 0 || !expect || len == 0) {
        fprintf(stderr, "mmapcheck: %s: %s\n", argv[1], strerror(errno));
        return 2;
    }
    if (pread(fd, expect, len, 0) != (ssize_t)len) {
        fprintf(stderr, "mmapcheck: pread %s: %s\n", argv[1], strerror(errno));
        return 2;
    }
    bad |= check_read_mapping("private", MAP_PRIVATE);
    bad |= check_read_mapping("shared", MAP_SHARED);
    if (rw)
        bad |= check_write_mapping();
    close(fd);
    free(expect);
    return bad;
}
