/*
 * libFuzzer target: open a whole image held in memory (through the io
 * layer's memory backend), read and seek across it read-only, then open it
 * writable and write, zero, flush and close.  Whatever the bytes, the daemon
 * code must not crash, hang or leak.
 */
#include "image.h"
#include "io.h"
#include "log.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void quiet(enum log_level level, const char *msg)
{
    (void)level;
    (void)msg;
}

static void exercise(const uint8_t *data, size_t size, bool writable)
{
    struct image_options o = {
        .read_only = !writable, .trace_fd = -1,
        .l2_cache_size = 64 * 1024, .refcount_cache_size = 64 * 1024,
        .backing = { BACKING_DENY, NULL },
    };
    struct image *img;
    struct io *io;
    uint8_t buf[8192];
    uint64_t vsize, pos;

    if (io_open_memory(data, size, &io) < 0)
        return;
    io->read_only = !writable;
    if (image_open_io(io, "fuzz.qcow2", &o, &img) < 0)
        return;
    vsize = image_size(img);
    /* A handful of offsets derived from the input. */
    for (unsigned i = 0; i < 8 && vsize; i++) {
        uint64_t off = (i < 2 ? i * (vsize / 2) : ((uint64_t)data[i % size] << 16 |
                       (uint64_t)data[(i * 7) % size] << 9)) % vsize;
        size_t len = sizeof(buf) < vsize - off ? sizeof(buf) : (size_t)(vsize - off);
        (void)image_read(img, buf, len, off);
        if (writable && i < 4) {
            memset(buf, (int)i, len);
            (void)image_write(img, buf, len, off);
            if (i == 2)
                (void)image_zero(img, off, len, true);
        }
        (void)image_seek(img, off, i & 1, &pos);
    }
    if (writable)
        (void)image_flush(img);
    image_close(img);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    log_set_hook(quiet);
    if (size < 72 || size > (4u << 20))
        return 0;
    exercise(data, size, false);
    exercise(data, size, true);
    return 0;
}
