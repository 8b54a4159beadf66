/*
 * fsyncfile — fsync(2) a file (the coreutils sync(1) on Debian 12 can, but
 * this keeps the tests independent of its version).
 */
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char *argv[])
{
    for (int i = 1; i < argc; i++) {
        int fd = open(argv[i], O_RDONLY);
        if (fd < 0 || fsync(fd) < 0) {
            perror(argv[i]);
            return 1;
        }
        close(fd);
    }
    return 0;
}
