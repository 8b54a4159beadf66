/*
 * meta — the corruption path shared by all metadata modules.
 */
#include "meta.h"

#include "header.h"
#include "io.h"
#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int meta_corrupt(struct meta *m, const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    atomic_store(&m->corrupt, true);
    if (atomic_flag_test_and_set(&m->corrupt_reported))
        return -EIO;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);

    if (!m->read_only && m->v3) {
        uint8_t buf[8];
        m->incompatible |= QCOW2_INCOMPAT_CORRUPT;
        be64_put(buf, m->incompatible);
        /* Best effort: the image is already damaged; failing to record it
         * must not hide the original report. */
        if (io_pwrite(m->io, buf, sizeof(buf), 72) == 0)
            (void)io_flush(m->io);
        log_error("corrupt image metadata: %s; the image is now marked "
                  "corrupt and further writes are refused (run qemu-img check "
                  "-r to repair)", msg);
    } else {
        log_error("corrupt image metadata: %s; writes are refused (run "
                  "qemu-img check to inspect)", msg);
    }
    return -EIO;
}
