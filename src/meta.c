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

void meta_init(struct meta *m, const struct qcow2_header *h, struct io *io,
               bool read_only)
{
    m->io = io;
    m->data_io = io;
    m->cluster_bits = h->cluster_bits;
    m->cluster_size = 1ull << h->cluster_bits;
    m->extended_l2 = !!(h->incompatible_features & QCOW2_INCOMPAT_EXTL2);
    m->l2_entry_bytes = m->extended_l2 ? 16 : 8;
    m->l2_entries = m->cluster_size / m->l2_entry_bytes;
    m->has_data_file = !!(h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE);
    m->data_file_raw = m->has_data_file &&
                       (h->autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW);
    m->v3 = h->version >= 3;
    m->read_only = read_only;
    m->refcount_order = h->refcount_order;
    m->virtual_size = h->size;
    m->incompatible = h->incompatible_features;
}
