/*
 * cache — hashed, reference-counted, LRU writeback cache of metadata tables.
 * See cache.h for the contract and the ordering rules it enforces.
 */
#include "cache.h"

#include "io.h"
#include "log.h"

#include <assert.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define NO_ENTRY UINT32_MAX

struct cache_entry {
    uint64_t offset;            /* host offset; valid only if in_use */
    void *table;                /* inside c->memory */
    unsigned ref;
    bool in_use;
    bool dirty;
    _Atomic bool peeked;        /* found by cache_peek since last considered */
    uint32_t hash_next;         /* chain in the hash bucket */
    uint32_t lru_prev, lru_next;/* LRU list of unreferenced entries */
};

struct cache {
    struct io *io;
    const char *name;
    size_t table_size;
    unsigned nb_entries;
    struct cache_entry *entries;
    uint8_t *memory;            /* nb_entries tables; pages committed on use */
    size_t memory_len;
    uint32_t *buckets;
    unsigned nb_buckets;        /* power of two */
    uint32_t lru_head, lru_tail;/* head = most recently used */
    unsigned nb_dirty;
    struct cache *depends;
    bool depends_on_flush;
    struct io *data_io;         /* external data file, or NULL */
    bool writethrough;
    cache_write_check_fn *write_check;
    void *write_check_opaque;
    cache_flush_hook_fn *flush_hook;
    void *flush_hook_opaque;
    struct cache_stats stats;
    /* Counted apart, as peeks run concurrently; the padding keeps the
     * counter off the cache line of the fields every lookup reads. */
    char pad[64];
    _Atomic uint64_t peek_hits;
};

static unsigned bucket_of(const struct cache *c, uint64_t offset)
{
    uint64_t h = (offset / c->table_size) * 0x9e3779b97f4a7c15ull;
    return (unsigned)(h >> 32) & (c->nb_buckets - 1);
}

static void lru_unlink(struct cache *c, uint32_t i)
{
    struct cache_entry *e = &c->entries[i];

    if (e->lru_prev != NO_ENTRY)
        c->entries[e->lru_prev].lru_next = e->lru_next;
    else
        c->lru_head = e->lru_next;
    if (e->lru_next != NO_ENTRY)
        c->entries[e->lru_next].lru_prev = e->lru_prev;
    else
        c->lru_tail = e->lru_prev;
    e->lru_prev = e->lru_next = NO_ENTRY;
}

static void lru_push_head(struct cache *c, uint32_t i)
{
    struct cache_entry *e = &c->entries[i];

    e->lru_prev = NO_ENTRY;
    e->lru_next = c->lru_head;
    if (c->lru_head != NO_ENTRY)
        c->entries[c->lru_head].lru_prev = i;
    c->lru_head = i;
    if (c->lru_tail == NO_ENTRY)
        c->lru_tail = i;
}

/* Unused entries go to the tail so they are taken first. */
static void lru_push_tail(struct cache *c, uint32_t i)
{
    struct cache_entry *e = &c->entries[i];

    e->lru_next = NO_ENTRY;
    e->lru_prev = c->lru_tail;
    if (c->lru_tail != NO_ENTRY)
        c->entries[c->lru_tail].lru_next = i;
    c->lru_tail = i;
    if (c->lru_head == NO_ENTRY)
        c->lru_head = i;
}

static void hash_insert(struct cache *c, uint32_t i)
{
    unsigned b = bucket_of(c, c->entries[i].offset);
    c->entries[i].hash_next = c->buckets[b];
    c->buckets[b] = i;
}

static void hash_remove(struct cache *c, uint32_t i)
{
    unsigned b = bucket_of(c, c->entries[i].offset);
    uint32_t *p = &c->buckets[b];

    while (*p != i) {
        assert(*p != NO_ENTRY);
        p = &c->entries[*p].hash_next;
    }
    *p = c->entries[i].hash_next;
}

static uint32_t hash_find(const struct cache *c, uint64_t offset)
{
    uint32_t i = c->buckets[bucket_of(c, offset)];

    while (i != NO_ENTRY && c->entries[i].offset != offset)
        i = c->entries[i].hash_next;
    return i;
}

struct cache *cache_create(struct io *io, const char *name, size_t table_size,
                           unsigned nb_entries)
{
    struct cache *c = calloc(1, sizeof(*c));

    if (!c)
        return NULL;
    c->io = io;
    c->name = name;
    c->table_size = table_size;
    c->nb_entries = nb_entries;
    c->nb_buckets = 1;
    while (c->nb_buckets < nb_entries)
        c->nb_buckets <<= 1;
    c->entries = calloc(nb_entries, sizeof(*c->entries));
    c->buckets = malloc(c->nb_buckets * sizeof(*c->buckets));
    if (!c->entries || !c->buckets) {
        cache_destroy(c);
        return NULL;
    }
    memset(c->buckets, 0xff, c->nb_buckets * sizeof(*c->buckets));
    /* Anonymous memory is committed page by page as tables are first used,
     * so a generous cache size costs nothing on a small image. */
    c->memory_len = (size_t)nb_entries * table_size;
    c->memory = mmap(NULL, c->memory_len, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (c->memory == MAP_FAILED) {
        c->memory = NULL;
        cache_destroy(c);
        return NULL;
    }
    c->lru_head = c->lru_tail = NO_ENTRY;
    for (uint32_t i = 0; i < nb_entries; i++) {
        c->entries[i].lru_prev = c->entries[i].lru_next = NO_ENTRY;
        c->entries[i].hash_next = NO_ENTRY;
        c->entries[i].table = c->memory + (size_t)i * table_size;
        lru_push_tail(c, i);
    }
    return c;
}

void cache_destroy(struct cache *c)
{
    if (!c)
        return;
    if (c->memory)
        munmap(c->memory, c->memory_len);
    free(c->entries);
    free(c->buckets);
    free(c);
}

static int flush_dependency(struct cache *c)
{
    int ret;

    /* Guest data in an external data file: the flushes below cover only
     * the cache's own file. */
    if (c->depends_on_flush && c->data_io) {
        ret = io_flush(c->data_io);
        if (ret < 0)
            return ret;
        c->depends_on_flush = false;
    }
    if (c->depends) {
        /* Its final host flush also covers guest data in our file. */
        ret = cache_flush(c->depends);
        if (ret < 0)
            return ret;
        c->depends = NULL;
        c->depends_on_flush = false;
    } else if (c->depends_on_flush) {
        ret = io_flush(c->io);
        if (ret < 0)
            return ret;
        c->depends_on_flush = false;
    }
    return 0;
}

static int entry_write(struct cache *c, uint32_t i)
{
    struct cache_entry *e = &c->entries[i];
    int ret;

    if (!e->dirty)
        return 0;
    ret = flush_dependency(c);
    if (ret < 0)
        return ret;
    if (c->write_check) {
        ret = c->write_check(c->write_check_opaque, e->offset, c->table_size);
        if (ret < 0)
            return ret;
    }
    ret = io_pwrite(c->io, e->table, c->table_size, e->offset);
    if (ret < 0) {
        log_error("writing %s table at host offset 0x%llx failed: %s",
                  c->name, (unsigned long long)e->offset, strerror(-ret));
        return ret;             /* stays dirty: the next flush retries */
    }
    e->dirty = false;
    c->nb_dirty--;
    c->stats.writes++;
    return 0;
}

int cache_write_dirty(struct cache *c)
{
    int result = 0;

    if (c->nb_dirty == 0)
        return 0;
    for (uint32_t i = 0; i < c->nb_entries; i++) {
        if (c->entries[i].in_use && c->entries[i].dirty) {
            int ret = entry_write(c, i);
            if (ret < 0 && result == 0)
                result = ret;
        }
    }
    return result;
}

int cache_flush(struct cache *c)
{
    int ret = cache_write_dirty(c);
    int ret2;

    if (ret == 0 && c->flush_hook)
        ret = c->flush_hook(c->flush_hook_opaque);
    ret2 = io_flush(c->io);
    return ret < 0 ? ret : ret2;
}

void cache_set_flush_hook(struct cache *c, cache_flush_hook_fn *fn, void *opaque)
{
    c->flush_hook = fn;
    c->flush_hook_opaque = opaque;
}

int cache_set_dependency(struct cache *c, struct cache *dependency)
{
    int ret;

    /* Chains are not allowed: settle the dependency's own first.  On
     * failure nothing changes: an unsettled dependency is kept, not lost,
     * and the next table write settles it (image_flush.c, invariant 7). */
    if (dependency->depends) {
        ret = flush_dependency(dependency);
        if (ret < 0)
            return ret;
    }
    if (c->depends && c->depends != dependency) {
        ret = flush_dependency(c);
        if (ret < 0)
            return ret;
    }
    c->depends = dependency;
    return 0;
}

void cache_depends_on_flush(struct cache *c)
{
    c->depends_on_flush = true;
}

void cache_set_data_io(struct cache *c, struct io *data_io)
{
    c->data_io = data_io;
}

void cache_dependency_met(struct cache *c)
{
    c->depends = NULL;
    c->depends_on_flush = false;
}

bool cache_has_dependency(const struct cache *c)
{
    return c->depends != NULL || c->depends_on_flush;
}

/*
 * Find a victim: the least recently used unreferenced entry, except that an
 * entry peeked at since it was last considered goes back to the head once.
 * Each pass clears a flag, so at most nb_entries entries are skipped.
 */
static int take_entry(struct cache *c, uint32_t *out)
{
    uint32_t i = c->lru_tail;
    struct cache_entry *e;
    int ret;

    for (unsigned n = 0; i != NO_ENTRY && n < c->nb_entries; n++) {
        e = &c->entries[i];
        if (!e->in_use || !atomic_load_explicit(&e->peeked, memory_order_relaxed))
            break;
        atomic_store_explicit(&e->peeked, false, memory_order_relaxed);
        lru_unlink(c, i);
        lru_push_head(c, i);
        i = c->lru_tail;
    }
    if (i == NO_ENTRY) {
        log_error("%s cache: all %u entries are in use", c->name, c->nb_entries);
        return -ENOMEM;
    }
    e = &c->entries[i];
    if (e->in_use && e->dirty && io_flush_error(c->io)) {
        /* A host flush failed: dirty tables can never be written again,
         * and they hold the only copy of what reads must see.  Keep them
         * and evict a clean table, so reads go on while one is left. */
        while (i != NO_ENTRY && c->entries[i].in_use && c->entries[i].dirty)
            i = c->entries[i].lru_prev;
        if (i == NO_ENTRY)
            return -EIO;
        e = &c->entries[i];
    }
    if (e->in_use) {
        ret = entry_write(c, i);
        if (ret < 0)
            return ret;
        hash_remove(c, i);
        e->in_use = false;
        c->stats.evictions++;
    }
    *out = i;
    return 0;
}

static int do_get(struct cache *c, uint64_t offset, void **table, bool read)
{
    uint32_t i;
    int ret;

    assert(offset % c->table_size == 0);
    i = hash_find(c, offset);
    if (i != NO_ENTRY) {
        c->stats.hits++;
        goto found;
    }
    c->stats.misses++;
    ret = take_entry(c, &i);
    if (ret < 0)
        return ret;
    if (read) {
        ret = io_pread(c->io, c->entries[i].table, c->table_size, offset);
        if (ret < 0) {
            log_error("reading %s table at host offset 0x%llx failed: %s",
                      c->name, (unsigned long long)offset, strerror(-ret));
            return ret;
        }
    } else {
        memset(c->entries[i].table, 0, c->table_size);
    }
    c->entries[i].offset = offset;
    c->entries[i].in_use = true;
    c->entries[i].dirty = false;
    atomic_store_explicit(&c->entries[i].peeked, false, memory_order_relaxed);
    hash_insert(c, i);

found:
    if (c->entries[i].ref++ == 0)
        lru_unlink(c, i);
    *table = c->entries[i].table;
    return 0;
}

int cache_get(struct cache *c, uint64_t offset, void **table)
{
    return do_get(c, offset, table, true);
}

int cache_peek(struct cache *c, uint64_t offset, const void **table)
{
    uint32_t i;
    struct cache_entry *e;

    assert(offset % c->table_size == 0);
    i = hash_find(c, offset);
    if (i == NO_ENTRY)
        return -ENOENT;
    e = &c->entries[i];
    /* Test first: readers on several CPUs should not keep writing the
     * same cache line when the flag is already set. */
    if (!atomic_load_explicit(&e->peeked, memory_order_relaxed))
        atomic_store_explicit(&e->peeked, true, memory_order_relaxed);
    atomic_fetch_add_explicit(&c->peek_hits, 1, memory_order_relaxed);
    *table = e->table;
    return 0;
}

int cache_get_empty(struct cache *c, uint64_t offset, void **table)
{
    uint32_t i = hash_find(c, offset);

    /* Whatever is cached for a freshly allocated cluster is stale, dirty or
     * not: it belonged to a table that was freed. */
    if (i != NO_ENTRY) {
        if (c->entries[i].ref > 0) {
            log_error("%s cache: table at 0x%llx requested as new while in use",
                      c->name, (unsigned long long)offset);
            return -EBUSY;
        }
        cache_discard(c, offset);
    }
    return do_get(c, offset, table, false);
}

static uint32_t entry_of(const struct cache *c, const void *table)
{
    size_t off = (size_t)((const uint8_t *)table - c->memory);

    assert(off < c->memory_len && off % c->table_size == 0);
    return (uint32_t)(off / c->table_size);
}

uint64_t cache_offset_of(struct cache *c, const void *table)
{
    return c->entries[entry_of(c, table)].offset;
}

void cache_put(struct cache *c, void **table)
{
    uint32_t i = entry_of(c, *table);
    struct cache_entry *e = &c->entries[i];

    assert(e->ref > 0);
    if (--e->ref == 0) {
        if (c->writethrough && e->dirty)
            (void)entry_write(c, i);   /* stays dirty on failure */
        lru_push_head(c, i);
    }
    *table = NULL;
}

void cache_mark_dirty(struct cache *c, void *table)
{
    struct cache_entry *e = &c->entries[entry_of(c, table)];

    if (!e->dirty) {
        e->dirty = true;
        c->nb_dirty++;
    }
}

void cache_discard(struct cache *c, uint64_t offset)
{
    uint32_t i = hash_find(c, offset);

    if (i == NO_ENTRY)
        return;
    assert(c->entries[i].ref == 0);
    if (c->entries[i].dirty) {
        c->entries[i].dirty = false;
        c->nb_dirty--;
    }
    hash_remove(c, i);
    c->entries[i].in_use = false;
    lru_unlink(c, i);
    lru_push_tail(c, i);
}

bool cache_has_dirty(const struct cache *c)
{
    return c->nb_dirty > 0;
}

void cache_set_writethrough(struct cache *c, bool on)
{
    c->writethrough = on;
}

void cache_set_write_check(struct cache *c, cache_write_check_fn *fn, void *opaque)
{
    c->write_check = fn;
    c->write_check_opaque = opaque;
}

void cache_get_stats(const struct cache *c, struct cache_stats *out)
{
    *out = c->stats;
    out->hits += atomic_load_explicit(&c->peek_hits, memory_order_relaxed);
}

unsigned cache_nb_entries(const struct cache *c)
{
    return c->nb_entries;
}

size_t cache_table_size(const struct cache *c)
{
    return c->table_size;
}
