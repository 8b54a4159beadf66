/*
 * meta — geometry from the header, the overlap map (meta_mark and
 * meta_check_write), changes of the incompatible bits, and the corruption
 * path shared by all metadata modules.
 */
#include "meta.h"

#include "header.h"
#include "io.h"
#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Called with m->header_lock held. */
static int update_incompatible_locked(struct meta *m, uint64_t set, uint64_t clear)
{
    uint64_t old = m->incompatible, val = (old | set) & ~clear;
    int ret;

    if (val == old)
        return 0;
    m->incompatible = val;
    ret = header_write_incompatible(m->io, val);
    if (ret < 0)
        m->incompatible = old;
    return ret;
}

int meta_update_incompatible(struct meta *m, uint64_t set, uint64_t clear)
{
    int ret;

    pthread_mutex_lock(&m->header_lock);
    ret = update_incompatible_locked(m, set, clear);
    pthread_mutex_unlock(&m->header_lock);
    return ret;
}

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
        /* Best effort: the image is already damaged; failing to record it
         * must not hide the original report.  Flushed under the lock, so a
         * concurrent change of the bits cannot come between. */
        pthread_mutex_lock(&m->header_lock);
        if (update_incompatible_locked(m, QCOW2_INCOMPAT_CORRUPT, 0) == 0)
            (void)io_flush(m->io);
        pthread_mutex_unlock(&m->header_lock);
        log_error("corrupt image metadata: %s; the image is now marked "
                  "corrupt and further writes are refused (run qcow2check -r "
                  "all, or qemu-img check -r all, to repair)", msg);
    } else {
        log_error("corrupt image metadata: %s; writes are refused (run "
                  "qcow2check to inspect)", msg);
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
    pthread_mutex_init(&m->header_lock, NULL);
    {
        uint64_t size = 0;
        if (io_get_size(io, &size) < 0)
            size = UINT64_MAX;   /* unknown: offsets are checked on I/O */
        m->file_end = size == UINT64_MAX ? size
                                         : (size + m->cluster_size - 1) & ~(m->cluster_size - 1);
    }
}

/* ---- metadata cluster set ---------------------------------------------------- */

/* Open addressing on cluster indices; a deleted slot keeps its place in a
 * probe chain as a tombstone. */
#define SLOT_EMPTY      UINT64_MAX
#define SLOT_DELETED    (UINT64_MAX - 1)

struct meta_set {
    uint64_t *keys;
    uint8_t *kinds;
    size_t cap;                 /* power of two */
    size_t used;                /* live + tombstones */
};

static enum meta_kind set_get(const struct meta_set *s, uint64_t key);

static size_t slot_of(const struct meta_set *s, uint64_t key)
{
    return (size_t)((key * 0x9e3779b97f4a7c15ull) >> 17) & (s->cap - 1);
}

static int set_resize(struct meta_set *s, size_t cap)
{
    uint64_t *keys = malloc(cap * sizeof(*keys));
    uint8_t *kinds = malloc(cap);

    if (!keys || !kinds) {
        free(keys);
        free(kinds);
        return -ENOMEM;
    }
    memset(keys, 0xff, cap * sizeof(*keys));
    struct meta_set old = *s;
    s->keys = keys;
    s->kinds = kinds;
    s->cap = cap;
    s->used = 0;
    for (size_t i = 0; i < old.cap; i++) {
        if (old.keys[i] >= SLOT_DELETED)
            continue;
        size_t j = slot_of(s, old.keys[i]);
        while (s->keys[j] != SLOT_EMPTY)
            j = (j + 1) & (s->cap - 1);
        s->keys[j] = old.keys[i];
        s->kinds[j] = old.kinds[i];
        s->used++;
    }
    free(old.keys);
    free(old.kinds);
    return 0;
}

int meta_set_create(struct meta *m)
{
    m->set = calloc(1, sizeof(*m->set));
    if (!m->set)
        return -ENOMEM;
    return set_resize(m->set, 1024);
}

void meta_set_destroy(struct meta *m)
{
    if (m->set) {
        free(m->set->keys);
        free(m->set->kinds);
        free(m->set);
        m->set = NULL;
    }
}

static enum meta_kind set_get(const struct meta_set *s, uint64_t key)
{
    size_t j = slot_of(s, key);

    while (s->keys[j] != SLOT_EMPTY) {
        if (s->keys[j] == key)
            return (enum meta_kind)s->kinds[j];
        j = (j + 1) & (s->cap - 1);
    }
    return META_KIND_NONE;
}

static int set_put(struct meta_set *s, uint64_t key, enum meta_kind kind)
{
    size_t j;
    int ret;

    if ((s->used + 1) * 2 > s->cap) {
        ret = set_resize(s, s->cap * 2);
        if (ret < 0)
            return ret;
    }
    j = slot_of(s, key);
    while (s->keys[j] != SLOT_EMPTY) {
        if (s->keys[j] == key) {
            if (kind == META_KIND_NONE)
                s->keys[j] = SLOT_DELETED;
            else
                s->kinds[j] = (uint8_t)kind;
            return 0;
        }
        j = (j + 1) & (s->cap - 1);
    }
    if (kind == META_KIND_NONE)
        return 0;
    s->keys[j] = key;
    s->kinds[j] = (uint8_t)kind;
    s->used++;
    return 0;
}

int meta_mark(struct meta *m, uint64_t offset, uint64_t len, enum meta_kind kind)
{
    if (!m->set || len == 0)
        return 0;
    for (uint64_t ci = offset >> m->cluster_bits;
         ci <= (offset + len - 1) >> m->cluster_bits; ci++) {
        enum meta_kind old = set_get(m->set, ci), store = kind;
        int ret;
        /* An L2 table both active and a snapshot's is a shared one. */
        if ((kind == META_KIND_L2 && old == META_KIND_SNAPSHOT_L2) ||
            (kind == META_KIND_SNAPSHOT_L2 && old == META_KIND_L2))
            old = store = META_KIND_SNAPSHOT_L2;
        /* Two structures in one cluster: the image is damaged. */
        if (kind != META_KIND_NONE && old != META_KIND_NONE && old != store)
            return meta_corrupt(m, "the %s at host offset 0x%llx overlaps the %s "
                                "there", meta_kind_name(kind),
                                (unsigned long long)(ci << m->cluster_bits),
                                meta_kind_name(old));
        ret = set_put(m->set, ci, store);
        if (ret < 0)
            return ret;
    }
    return 0;
}

enum meta_kind meta_kind_at(const struct meta *m, uint64_t offset)
{
    return m->set ? set_get(m->set, offset >> m->cluster_bits) : META_KIND_NONE;
}

const char *meta_kind_name(enum meta_kind kind)
{
    static const char *const names[] = {
        "guest data", "image header", "active L1 table", "L2 table",
        "refcount table", "refcount block", "snapshot table or snapshot L1 table",
        "L2 table of a snapshot", "persistent dirty bitmap",
    };
    return kind <= META_KIND_BITMAPS ? names[kind] : "unknown";
}

int meta_check_write(struct meta *m, uint64_t offset, uint64_t len, enum meta_kind kind)
{
    if (!m->set || len == 0)
        return 0;
    for (uint64_t ci = offset >> m->cluster_bits;
         ci <= (offset + len - 1) >> m->cluster_bits; ci++) {
        enum meta_kind k = set_get(m->set, ci);
        if (k != META_KIND_NONE && k != kind)
            return meta_corrupt(m, "a write of %s at host offset 0x%llx (%llu "
                                "bytes) would overwrite the %s at 0x%llx",
                                meta_kind_name(kind), (unsigned long long)offset,
                                (unsigned long long)len, meta_kind_name(k),
                                (unsigned long long)(ci << m->cluster_bits));
    }
    return 0;
}
