/*
 * seekmap FILE
 *
 * Walk FILE with lseek(SEEK_DATA) / lseek(SEEK_HOLE) and print every data
 * extent as "START LENGTH" (decimal bytes), one per line.  Exit status is 0
 * when the walk reached the end of the file (SEEK_DATA failing with ENXIO),
 * 1 on any other error (including a non-advancing or inconsistent answer
 * from the file system), 2 on usage errors.
 *
 * Uses libc only.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s FILE\n", argv[0]);
        return 2;
    }

    const char *path = argv[1];
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        fprintf(stderr, "seekmap: open %s: %s\n", path, strerror(errno));
        return 1;
    }

    struct stat st;
    if (fstat(fd, &st) < 0) {
        fprintf(stderr, "seekmap: fstat %s: %s\n", path, strerror(errno));
        close(fd);
        return 1;
    }

    off_t pos = 0;
    int rc = 0;
    for (;;) {
        off_t data = lseek(fd, pos, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO)
                break;          /* no more data: normal end of the walk */
            fprintf(stderr, "seekmap: lseek(%jd, SEEK_DATA): %s\n",
                    (intmax_t)pos, strerror(errno));
            rc = 1;
            break;
        }
        if (data < pos) {
            fprintf(stderr, "seekmap: SEEK_DATA from %jd went backwards to %jd\n",
                    (intmax_t)pos, (intmax_t)data);
            rc = 1;
            break;
        }
        if (data >= st.st_size) {
            fprintf(stderr, "seekmap: SEEK_DATA from %jd returned %jd, at or past "
                    "EOF %jd (expected ENXIO)\n",
                    (intmax_t)pos, (intmax_t)data, (intmax_t)st.st_size);
            rc = 1;
            break;
        }

        off_t hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0) {
            fprintf(stderr, "seekmap: lseek(%jd, SEEK_HOLE): %s\n",
                    (intmax_t)data, strerror(errno));
            rc = 1;
            break;
        }
        if (hole <= data) {
            fprintf(stderr, "seekmap: SEEK_HOLE from data offset %jd returned %jd "
                    "(must be greater)\n", (intmax_t)data, (intmax_t)hole);
            rc = 1;
            break;
        }
        if (hole > st.st_size) {
            fprintf(stderr, "seekmap: SEEK_HOLE from %jd returned %jd, past EOF %jd\n",
                    (intmax_t)data, (intmax_t)hole, (intmax_t)st.st_size);
            rc = 1;
            break;
        }

        printf("%jd %jd\n", (intmax_t)data, (intmax_t)(hole - data));
        if (hole >= st.st_size)
            break;
        pos = hole;
    }

    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "seekmap: write error on stdout\n");
        rc = 1;
    }
    close(fd);
    return rc;
}
