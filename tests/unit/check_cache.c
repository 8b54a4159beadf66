/*
 * Unit tests for cache: hits and misses, eviction and pinning, write-back,
 * ordering dependencies, error handling.
 */
#include "testutil.h"

#include "cache.h"
#include "io.h"

#include <errno.h>

#define TS          4096u           /* table size used by most tests */
#define NB_TABLES   64u             /* tables in the backing memory file */

/* ---- a counting backend around the memory backend ------------------------ */

struct cnt_io {
    struct tu_fwd_io fwd;
    unsigned reads, writes, flushes;
    bool fail_reads;
};

static int cnt_pread(struct io *io, void *buf, size_t len, uint64_t off)
{
    struct cnt_io *c = (struct cnt_io *)io;
    c->reads++;
    if (c->fail_reads)
        return -EIO;
    return io_pread(c->fwd.inner, buf, len, off);
}

static int cnt_pwrite(struct io *io, const void *buf, size_t len, uint64_t off)
{
    struct cnt_io *c = (struct cnt_io *)io;
    c->writes++;
    return io_pwrite(c->fwd.inner, buf, len, off);
}

static int cnt_flush(struct io *io)
{
    struct cnt_io *c = (struct cnt_io *)io;
    c->flushes++;
    return io_flush(c->fwd.inner);
}

static void cnt_close(struct io *io)
{
    struct cnt_io *c = (struct cnt_io *)io;
    io_close(c->fwd.inner);
    free(c);
}

static const struct io_ops cnt_ops = {
    .pread = cnt_pread,
    .pwrite = cnt_pwrite,
    .flush = cnt_flush,
    .get_size = tu_fwd_get_size,
    .truncate = tu_fwd_truncate,
    .punch_hole = tu_fwd_punch,
    .close = cnt_close,
};

/* ---- fixtures ------------------------------------------------------------ */

static uint8_t pattern_byte(uint64_t table, size_t i)
{
    return (uint8_t)(table * 31 + i * 7 + 1);
}

/* A memory file of NB_TABLES tables of @ts bytes, each with its pattern. */
static struct io *pattern_io(size_t ts)
{
    size_t len = (size_t)NB_TABLES * ts;
    uint8_t *data = tu_zalloc(len);
    struct io *io;

    for (size_t t = 0; t < NB_TABLES; t++)
        for (size_t i = 0; i < ts; i++)
            data[t * ts + i] = pattern_byte(t, i);
    ck_assert_int_eq(io_open_memory(data, len, &io), 0);
    free(data);
    return io;
}

static struct cnt_io *counting_io(size_t ts)
{
    struct cnt_io *c = tu_zalloc(sizeof(*c));
    c->fwd.io.ops = &cnt_ops;
    c->fwd.inner = pattern_io(ts);
    return c;
}

static bool has_pattern(const void *table, uint64_t t, size_t ts)
{
    const uint8_t *p = table;
    for (size_t i = 0; i < ts; i++)
        if (p[i] != pattern_byte(t, i))
            return false;
    return true;
}

static bool is_zero(const void *table, size_t len)
{
    const uint8_t *p = table;
    for (size_t i = 0; i < len; i++)
        if (p[i])
            return false;
    return true;
}

/* The bytes the memory backend holds at @off. */
static const uint8_t *mem_at(struct io *mem, uint64_t off)
{
    size_t len;
    const uint8_t *d = io_memory_data(mem, &len);
    ck_assert_uint_le(off + TS, len);
    return d + off;
}

static int index_of(const struct tu_trace *t, uint32_t type, uint64_t offset,
                    unsigned from)
{
    for (unsigned i = from; i < t->nb; i++)
        if (t->recs[i].r.type == type &&
            (type != IO_TRACE_WRITE || t->recs[i].r.offset == offset))
            return (int)i;
    return -1;
}

static unsigned count_writes(const struct tu_trace *t)
{
    unsigned n = 0;
    for (unsigned i = 0; i < t->nb; i++)
        n += t->recs[i].r.type == IO_TRACE_WRITE;
    return n;
}

/* Get @off, change its first 8 bytes to @val, mark it dirty and put it. */
static void dirty_table(struct cache *c, uint64_t off, uint8_t val)
{
    void *t;
    ck_assert_int_eq(cache_get(c, off, &t), 0);
    memset(t, val, 8);
    cache_mark_dirty(c, t);
    cache_put(c, &t);
}

/* ---- basic get/put ------------------------------------------------------- */

START_TEST(create_accessors)
{
    struct io *io = pattern_io(TS);
    struct cache *c = cache_create(io, "test", TS, 7);

    ck_assert_ptr_nonnull(c);
    ck_assert_uint_eq(cache_nb_entries(c), 7);
    ck_assert_uint_eq(cache_table_size(c), TS);
    ck_assert(!cache_has_dirty(c));
    cache_destroy(c);
    io_close(io);
}
END_TEST

START_TEST(get_miss_reads)
{
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    struct cache_stats st;
    void *t = NULL;

    ck_assert_int_eq(cache_get(c, 5 * TS, &t), 0);
    ck_assert_ptr_nonnull(t);
    ck_assert(has_pattern(t, 5, TS));
    ck_assert_uint_eq(cache_offset_of(c, t), 5 * TS);
    ck_assert_uint_eq(cio->reads, 1);
    cache_get_stats(c, &st);
    ck_assert_uint_eq(st.misses, 1);
    ck_assert_uint_eq(st.hits, 0);
    cache_put(c, &t);
    ck_assert_ptr_null(t);
    ck_assert_uint_eq(cio->writes, 0);
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

START_TEST(get_hit_same_pointer)
{
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    struct cache_stats st;
    void *t1, *t2, *t3;
    uint8_t junk[TS];
    uintptr_t first;

    ck_assert_int_eq(cache_get(c, 2 * TS, &t1), 0);
    first = (uintptr_t)t1;
    /* A second reference while the first is held. */
    ck_assert_int_eq(cache_get(c, 2 * TS, &t2), 0);
    ck_assert_ptr_eq(t1, t2);
    cache_put(c, &t2);
    cache_put(c, &t1);
    /* After the backend changes, a hit still returns the cached table:
     * no second read. */
    memset(junk, 0xee, sizeof(junk));
    ck_assert_int_eq(io_pwrite(cio->fwd.inner, junk, TS, 2 * TS), 0);
    ck_assert_int_eq(cache_get(c, 2 * TS, &t3), 0);
    ck_assert_uint_eq((uintptr_t)t3, first);
    ck_assert(has_pattern(t3, 2, TS));
    ck_assert_uint_eq(cio->reads, 1);
    cache_get_stats(c, &st);
    ck_assert_uint_eq(st.misses, 1);
    ck_assert_uint_eq(st.hits, 2);
    cache_put(c, &t3);
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

START_TEST(get_hit_same_pointer_after_put)
{
    struct io *io = pattern_io(TS);
    struct cache *c = cache_create(io, "test", TS, 4);
    void *t1, *t2;
    uintptr_t first;

    ck_assert_int_eq(cache_get(c, 9 * TS, &t1), 0);
    first = (uintptr_t)t1;
    cache_put(c, &t1);
    ck_assert_int_eq(cache_get(c, 9 * TS, &t2), 0);
    ck_assert_uint_eq((uintptr_t)t2, first);
    cache_put(c, &t2);
    cache_destroy(c);
    io_close(io);
}
END_TEST

START_TEST(get_read_error)
{
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    void *t = NULL;

    tu_log_capture();
    cio->fail_reads = true;
    ck_assert_int_eq(cache_get(c, 3 * TS, &t), -EIO);
    cio->fail_reads = false;
    /* The failed read left nothing behind: the next get reads again. */
    ck_assert_int_eq(cache_get(c, 3 * TS, &t), 0);
    ck_assert(has_pattern(t, 3, TS));
    ck_assert_uint_eq(cio->reads, 2);
    cache_put(c, &t);
    tu_log_release();
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

START_TEST(get_empty_no_read)
{
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    void *t;

    ck_assert_int_eq(cache_get_empty(c, 7 * TS, &t), 0);
    ck_assert(is_zero(t, TS));
    ck_assert_uint_eq(cio->reads, 0);
    ck_assert_uint_eq(cache_offset_of(c, t), 7 * TS);
    cache_put(c, &t);

    /* A clean cached copy of the same offset does not survive get_empty. */
    ck_assert_int_eq(cache_get(c, 8 * TS, &t), 0);
    ck_assert(has_pattern(t, 8, TS));
    cache_put(c, &t);
    ck_assert_int_eq(cache_get_empty(c, 8 * TS, &t), 0);
    ck_assert(is_zero(t, TS));
    ck_assert_uint_eq(cio->reads, 1);
    /* Once written, get returns what was written. */
    memset(t, 0x42, 100);
    cache_mark_dirty(c, t);
    cache_put(c, &t);
    ck_assert_int_eq(cache_flush(c), 0);
    ck_assert_uint_eq(mem_at(cio->fwd.inner, 8 * TS)[0], 0x42);
    ck_assert_uint_eq(mem_at(cio->fwd.inner, 8 * TS)[99], 0x42);
    ck_assert(is_zero(mem_at(cio->fwd.inner, 8 * TS) + 100, TS - 100));
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

START_TEST(get_empty_over_dirty_copy)
{
    /* get_empty is for a freshly allocated cluster, so whatever the cache
     * still holds for that offset is stale, dirty or not.  (Regression:
     * cache.c used to drop only a clean copy and hand back the old dirty
     * contents as the "empty" table.) */
    struct io *io = pattern_io(TS);
    struct cache *c = cache_create(io, "test", TS, 4);
    void *t;

    dirty_table(c, 9 * TS, 0x44);
    ck_assert_int_eq(cache_get_empty(c, 9 * TS, &t), 0);
    ck_assert_msg(is_zero(t, TS), "get_empty returned the stale dirty table (byte 0 = 0x%02x)",
                  ((uint8_t *)t)[0]);
    cache_put(c, &t);
    cache_destroy(c);
    io_close(io);
}
END_TEST

START_TEST(get_empty_while_referenced)
{
    /* A table still in use cannot be a freshly allocated one: get_empty
     * must fail rather than zero it under its holder. */
    struct io *io = pattern_io(TS);
    struct cache *c = cache_create(io, "test", TS, 4);
    void *held, *t = NULL;

    tu_log_capture();
    ck_assert_int_eq(cache_get(c, 9 * TS, &held), 0);
    ck_assert_int_lt(cache_get_empty(c, 9 * TS, &t), 0);
    ck_assert(has_pattern(held, 9, TS));
    cache_put(c, &held);
    tu_log_release();
    cache_destroy(c);
    io_close(io);
}
END_TEST

START_TEST(mark_dirty_flush_writes)
{
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    struct cache_stats st;
    uint8_t expect[TS];
    void *t;

    ck_assert_int_eq(cache_get(c, 4 * TS, &t), 0);
    memcpy(expect, t, TS);
    memset((uint8_t *)t + 10, 0xab, 20);
    memset(expect + 10, 0xab, 20);
    cache_mark_dirty(c, t);
    cache_mark_dirty(c, t);         /* twice is the same as once */
    ck_assert(cache_has_dirty(c));
    cache_put(c, &t);
    /* Write-back: nothing reaches the file before the flush. */
    ck_assert_uint_eq(cio->writes, 0);
    ck_assert(has_pattern(mem_at(cio->fwd.inner, 4 * TS), 4, TS));

    ck_assert_int_eq(cache_flush(c), 0);
    ck_assert_uint_eq(cio->writes, 1);
    ck_assert_uint_ge(cio->flushes, 1);
    ck_assert_mem_eq(mem_at(cio->fwd.inner, 4 * TS), expect, TS);
    ck_assert(!cache_has_dirty(c));
    cache_get_stats(c, &st);
    ck_assert_uint_eq(st.writes, 1);

    /* A second flush has nothing to write. */
    ck_assert_int_eq(cache_flush(c), 0);
    ck_assert_uint_eq(cio->writes, 1);
    /* The neighbouring tables are untouched. */
    ck_assert(has_pattern(mem_at(cio->fwd.inner, 3 * TS), 3, TS));
    ck_assert(has_pattern(mem_at(cio->fwd.inner, 5 * TS), 5, TS));
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

START_TEST(write_dirty_without_flush)
{
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    void *t;

    ck_assert_int_eq(cache_get(c, 1 * TS, &t), 0);
    memset(t, 0x77, TS);
    cache_mark_dirty(c, t);
    cache_put(c, &t);
    ck_assert_int_eq(cache_write_dirty(c), 0);
    ck_assert_uint_eq(cio->writes, 1);
    ck_assert_uint_eq(cio->flushes, 0);
    ck_assert(!cache_has_dirty(c));
    ck_assert_uint_eq(mem_at(cio->fwd.inner, TS)[TS - 1], 0x77);
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

/* ---- eviction ------------------------------------------------------------ */

START_TEST(pinned_never_evicted)
{
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    void *pin[3], *t;
    uintptr_t addr[3];
    struct cache_stats st;

    for (unsigned k = 0; k < 3; k++) {
        ck_assert_int_eq(cache_get(c, (uint64_t)(10 + k) * TS, &pin[k]), 0);
        addr[k] = (uintptr_t)pin[k];
        /* Private marks (not dirty): they live only in the cached copy. */
        memset(pin[k], 0xc0 + (int)k, 64);
    }
    for (unsigned round = 0; round < 3; round++) {
        for (uint64_t n = 0; n < NB_TABLES; n++) {
            if (n >= 10 && n < 13)
                continue;
            ck_assert_int_eq(cache_get(c, n * TS, &t), 0);
            ck_assert_msg(has_pattern(t, n, TS), "table %llu has wrong contents",
                          (unsigned long long)n);
            for (unsigned k = 0; k < 3; k++)
                ck_assert_ptr_ne(t, pin[k]);
            cache_put(c, &t);
        }
    }
    cache_get_stats(c, &st);
    ck_assert_uint_ge(st.evictions, 3 * (NB_TABLES - 3) - 1);
    for (unsigned k = 0; k < 3; k++) {
        const uint8_t *p = pin[k];
        ck_assert_uint_eq(cache_offset_of(c, pin[k]), (uint64_t)(10 + k) * TS);
        for (unsigned i = 0; i < TS; i++)
            if (p[i] != (i < 64 ? 0xc0 + k : pattern_byte(10 + k, i)))
                ck_abort_msg("pinned table %u byte %u changed", k, i);
        /* Still cached: a get is a hit on the same table. */
        ck_assert_int_eq(cache_get(c, (uint64_t)(10 + k) * TS, &t), 0);
        ck_assert_uint_eq((uintptr_t)t, addr[k]);
        cache_put(c, &t);
        cache_put(c, &pin[k]);
    }
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

START_TEST(all_pinned_fails)
{
    struct io *io = pattern_io(TS);
    struct cache *c = cache_create(io, "test", TS, 4);
    void *pin[4], *t = NULL;

    tu_log_capture();
    for (unsigned k = 0; k < 4; k++)
        ck_assert_int_eq(cache_get(c, (uint64_t)k * TS, &pin[k]), 0);
    ck_assert_int_eq(cache_get(c, 20 * TS, &t), -ENOMEM);
    ck_assert_int_eq(cache_get_empty(c, 21 * TS, &t), -ENOMEM);
    /* The pinned ones are still all there and intact. */
    for (unsigned k = 0; k < 4; k++) {
        ck_assert(has_pattern(pin[k], k, TS));
        ck_assert_uint_eq(cache_offset_of(c, pin[k]), (uint64_t)k * TS);
    }
    /* A hit on a pinned table still works. */
    ck_assert_int_eq(cache_get(c, 2 * TS, &t), 0);
    ck_assert_ptr_eq(t, pin[2]);
    cache_put(c, &t);
    /* Releasing one makes room again. */
    cache_put(c, &pin[1]);
    ck_assert_int_eq(cache_get(c, 20 * TS, &t), 0);
    ck_assert(has_pattern(t, 20, TS));
    cache_put(c, &t);
    cache_put(c, &pin[0]);
    cache_put(c, &pin[2]);
    cache_put(c, &pin[3]);
    tu_log_release();
    cache_destroy(c);
    io_close(io);
}
END_TEST

START_TEST(dirty_evicted_written_back)
{
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    struct cache_stats st;
    void *t;

    ck_assert_int_eq(cache_get(c, 30 * TS, &t), 0);
    memset(t, 0x5a, TS / 2);
    cache_mark_dirty(c, t);
    cache_put(c, &t);
    for (uint64_t n = 0; n < 4; n++) {
        ck_assert_int_eq(cache_get(c, n * TS, &t), 0);
        cache_put(c, &t);
    }
    /* Five tables through four entries: table 30 was evicted, and its
     * change written back. */
    cache_get_stats(c, &st);
    ck_assert_uint_eq(st.evictions, 1);
    ck_assert_uint_eq(st.writes, 1);
    ck_assert_uint_eq(cio->writes, 1);
    ck_assert(!cache_has_dirty(c));
    for (unsigned i = 0; i < TS; i++)
        if (mem_at(cio->fwd.inner, 30 * TS)[i] != (i < TS / 2 ? 0x5a : pattern_byte(30, i)))
            ck_abort_msg("byte %u of the written-back table is wrong", i);
    /* Reading it back gives the written data. */
    ck_assert_int_eq(cache_get(c, 30 * TS, &t), 0);
    ck_assert_uint_eq(((uint8_t *)t)[0], 0x5a);
    cache_put(c, &t);
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

START_TEST(dirty_eviction_write_fails)
{
    /* When the dirty victim cannot be written, the get fails and the
     * change is kept for a later flush. */
    struct io *mem = pattern_io(TS);
    struct cache *c = cache_create(mem, "test", TS, 1);
    void *t;

    tu_log_capture();
    ck_assert_int_eq(cache_get(c, 6 * TS, &t), 0);
    memset(t, 0x99, 16);
    cache_mark_dirty(c, t);
    cache_put(c, &t);
    io_memory_fail_writes_after(mem, 0);
    ck_assert_int_lt(cache_get(c, 7 * TS, &t), 0);
    ck_assert(cache_has_dirty(c));
    io_memory_fail_writes_after(mem, -1);
    ck_assert_int_eq(cache_flush(c), 0);
    ck_assert_uint_eq(mem_at(mem, 6 * TS)[15], 0x99);
    ck_assert_int_eq(cache_get(c, 7 * TS, &t), 0);
    ck_assert(has_pattern(t, 7, TS));
    cache_put(c, &t);
    tu_log_release();
    cache_destroy(c);
    io_close(mem);
}
END_TEST

START_TEST(lru_order)
{
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    struct cache_stats st, st2;
    void *t, *h[4];
    static const uint64_t order[] = { 1, 2, 3, 4, 1 };

    /* Put 1, 2, 3, 4, then 1 again: 2 is now the least recently put. */
    for (unsigned k = 0; k < 5; k++) {
        ck_assert_int_eq(cache_get(c, order[k] * TS, &t), 0);
        cache_put(c, &t);
    }
    cache_get_stats(c, &st);
    ck_assert_uint_eq(st.misses, 4);
    ck_assert_uint_eq(st.hits, 1);
    ck_assert_uint_eq(st.evictions, 0);

    ck_assert_int_eq(cache_get(c, 5 * TS, &t), 0);     /* evicts 2 */
    cache_put(c, &t);
    cache_get_stats(c, &st);
    ck_assert_uint_eq(st.evictions, 1);

    /* 1, 3, 4, 5 are all hits (held, so nothing is evicted meanwhile). */
    ck_assert_int_eq(cache_get(c, 1 * TS, &h[0]), 0);
    ck_assert_int_eq(cache_get(c, 3 * TS, &h[1]), 0);
    ck_assert_int_eq(cache_get(c, 4 * TS, &h[2]), 0);
    ck_assert_int_eq(cache_get(c, 5 * TS, &h[3]), 0);
    cache_get_stats(c, &st2);
    ck_assert_uint_eq(st2.hits, st.hits + 4);
    ck_assert_uint_eq(st2.misses, st.misses);
    /* Release in the order 4, 1, 5, 3: 4 becomes the eviction victim. */
    cache_put(c, &h[2]);
    cache_put(c, &h[0]);
    cache_put(c, &h[3]);
    cache_put(c, &h[1]);
    ck_assert_int_eq(cache_get(c, 2 * TS, &t), 0);     /* miss, evicts 4 */
    ck_assert(has_pattern(t, 2, TS));
    cache_put(c, &t);
    cache_get_stats(c, &st);
    ck_assert_uint_eq(st.misses, st2.misses + 1);
    ck_assert_int_eq(cache_get(c, 1 * TS, &t), 0);
    cache_put(c, &t);
    ck_assert_int_eq(cache_get(c, 5 * TS, &t), 0);
    cache_put(c, &t);
    ck_assert_int_eq(cache_get(c, 3 * TS, &t), 0);
    cache_put(c, &t);
    cache_get_stats(c, &st2);
    ck_assert_uint_eq(st2.misses, st.misses);           /* 1, 5, 3 still cached */
    ck_assert_int_eq(cache_get(c, 4 * TS, &t), 0);
    cache_put(c, &t);
    cache_get_stats(c, &st);
    ck_assert_uint_eq(st.misses, st2.misses + 1);       /* 4 was evicted */
    ck_assert_uint_eq(cio->reads, st.misses);
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

/* ---- peek (lookups under the shared lock) ------------------------------ */

START_TEST(peek_hit_and_miss)
{
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    struct cache_stats st;
    const void *p = NULL;
    void *t;

    /* A miss reads nothing and leaves no entry behind. */
    ck_assert_int_eq(cache_peek(c, 2 * TS, &p), -ENOENT);
    ck_assert_uint_eq(cio->reads, 0);
    cache_get_stats(c, &st);
    ck_assert_uint_eq(st.hits + st.misses, 0);

    ck_assert_int_eq(cache_get(c, 2 * TS, &t), 0);
    memset(t, 0x77, 8);
    cache_mark_dirty(c, t);
    cache_put(c, &t);
    /* A hit shows the cached table, unwritten change included. */
    ck_assert_int_eq(cache_peek(c, 2 * TS, &p), 0);
    ck_assert_ptr_nonnull(p);
    ck_assert_uint_eq(((const uint8_t *)p)[7], 0x77);
    ck_assert_uint_eq(((const uint8_t *)p)[8], pattern_byte(2, 8));
    ck_assert_uint_eq(cio->reads, 1);
    cache_get_stats(c, &st);
    ck_assert_uint_eq(st.hits, 1);
    ck_assert_uint_eq(st.misses, 1);
    ck_assert_int_eq(cache_peek(c, 3 * TS, &p), -ENOENT);

    /* No reference was taken: the table can be discarded (which asserts
     * it is unreferenced) and is gone for the next peek. */
    cache_discard(c, 2 * TS);
    ck_assert_int_eq(cache_peek(c, 2 * TS, &p), -ENOENT);
    ck_assert(!cache_has_dirty(c));

    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

START_TEST(peek_then_discard)
{
    /* An entry freed by discard is reused before any cached table is
     * evicted, even if it was peeked at before it was freed. */
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    struct cache_stats st;
    const void *p;
    void *t;

    for (uint64_t k = 1; k <= 4; k++) {
        ck_assert_int_eq(cache_get(c, k * TS, &t), 0);
        cache_put(c, &t);
    }
    ck_assert_int_eq(cache_peek(c, 3 * TS, &p), 0);
    cache_discard(c, 3 * TS);
    ck_assert_int_eq(cache_get(c, 5 * TS, &t), 0);
    cache_put(c, &t);
    cache_get_stats(c, &st);
    ck_assert_uint_eq(st.evictions, 0);
    for (uint64_t k = 1; k <= 5; k++)
        ck_assert_int_eq(cache_peek(c, k * TS, &p), k == 3 ? -ENOENT : 0);
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

/* Whether @off is cached, without changing anything that matters here (a
 * peek's second-chance mark is only set on a hit, and every caller below
 * looks at entries it expects to be gone or is about to evict). */
static bool cached(struct cache *c, uint64_t off)
{
    const void *p;
    return cache_peek(c, off, &p) == 0;
}

START_TEST(peek_gives_second_chance)
{
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    void *t;
    const void *p;

    /* LRU order after these puts, most recent first: 4 3 2 1. */
    for (uint64_t k = 1; k <= 4; k++) {
        ck_assert_int_eq(cache_get(c, k * TS, &t), 0);
        cache_put(c, &t);
    }
    /* 1 is read by a lookup that could not move it in the list. */
    ck_assert_int_eq(cache_peek(c, 1 * TS, &p), 0);
    /* The next miss passes over 1 (and clears its mark) and takes 2. */
    ck_assert_int_eq(cache_get(c, 5 * TS, &t), 0);
    cache_put(c, &t);
    ck_assert_int_eq(cio->reads, 5);
    ck_assert(!cached(c, 2 * TS));
    /* Order now 5 1 4 3 (the failed peek of 2 marked nothing).  Without
     * further peeks, 3 then 4 go, and 1 after them. */
    ck_assert_int_eq(cache_get(c, 6 * TS, &t), 0);
    cache_put(c, &t);
    ck_assert_int_eq(cache_get(c, 7 * TS, &t), 0);
    cache_put(c, &t);
    ck_assert_int_eq(cache_get(c, 1 * TS, &t), 0);      /* still cached: a hit */
    cache_put(c, &t);
    ck_assert_int_eq(cio->reads, 7);
    ck_assert(!cached(c, 3 * TS));
    ck_assert(!cached(c, 4 * TS));
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

START_TEST(peek_all_marked_still_evicts)
{
    /* Every unreferenced entry peeked: the scan is bounded, clears every
     * mark and evicts the least recently used one after all. */
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    void *t;
    const void *p;
    struct cache_stats st;

    for (uint64_t k = 1; k <= 4; k++) {
        ck_assert_int_eq(cache_get(c, k * TS, &t), 0);
        cache_put(c, &t);
    }
    for (uint64_t k = 1; k <= 4; k++)
        ck_assert_int_eq(cache_peek(c, k * TS, &p), 0);
    ck_assert_int_eq(cache_get(c, 5 * TS, &t), 0);
    ck_assert(has_pattern(t, 5, TS));
    cache_put(c, &t);
    cache_get_stats(c, &st);
    ck_assert_uint_eq(st.evictions, 1);
    ck_assert(!cached(c, 1 * TS));
    ck_assert(cached(c, 2 * TS) && cached(c, 3 * TS) && cached(c, 4 * TS));
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

START_TEST(peek_pinned_entries)
{
    /* With all but one entry referenced, peeks on the referenced ones do
     * not keep the one free entry from being reused. */
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 3);
    void *h[2], *t;
    const void *p;

    ck_assert_int_eq(cache_get(c, 1 * TS, &h[0]), 0);
    ck_assert_int_eq(cache_get(c, 2 * TS, &h[1]), 0);
    ck_assert_int_eq(cache_peek(c, 1 * TS, &p), 0);
    ck_assert_ptr_eq(p, h[0]);
    for (uint64_t k = 3; k <= 6; k++) {
        ck_assert_int_eq(cache_get(c, k * TS, &t), 0);
        ck_assert(has_pattern(t, k, TS));
        cache_put(c, &t);
        ck_assert_int_eq(cache_peek(c, k * TS, &p), 0);     /* marked, alone */
    }
    ck_assert(has_pattern(h[0], 1, TS));
    ck_assert(has_pattern(h[1], 2, TS));
    cache_put(c, &h[0]);
    cache_put(c, &h[1]);
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

START_TEST(random_model)
{
    /* Random gets, changes, puts, flushes and discards against a shadow
     * copy: every get returns the newest contents, and after a final flush
     * the file holds exactly the shadow. */
    enum { NT = 32, NE = 8, SZ = 512 };
    static uint8_t shadow[NT][SZ];
    struct io *mem;
    struct cache *c;
    void *held[NE];
    uint64_t held_off[NE];
    unsigned nb_held = 0;
    uint64_t r = 12345;

    for (unsigned t = 0; t < NT; t++)
        for (unsigned i = 0; i < SZ; i++)
            shadow[t][i] = pattern_byte(t, i);
    ck_assert_int_eq(io_open_memory(shadow, sizeof(shadow), &mem), 0);
    c = cache_create(mem, "model", SZ, NE);
    ck_assert_ptr_nonnull(c);

    for (unsigned step = 0; step < 20000; step++) {
        unsigned op, t;
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        op = (unsigned)(r >> 33) % 100;
        t = (unsigned)(r >> 45) % NT;

        if (op < 40 && nb_held < NE - 1) {
            void *p;
            const void *q;
            /* What a shared-lock lookup would see, when it hits. */
            if (cache_peek(c, (uint64_t)t * SZ, &q) == 0)
                ck_assert_msg(memcmp(q, shadow[t], SZ) == 0, "step %u: peek of %u stale",
                              step, t);
            ck_assert_int_eq(cache_get(c, (uint64_t)t * SZ, &p), 0);
            ck_assert_msg(memcmp(p, shadow[t], SZ) == 0, "step %u: table %u stale", step, t);
            held[nb_held] = p;
            held_off[nb_held++] = (uint64_t)t * SZ;
        } else if (op < 60 && nb_held) {
            unsigned k = t % nb_held;
            uint8_t *p = held[k];
            unsigned at = (unsigned)(r >> 20) % SZ;
            p[at] = (uint8_t)(r >> 8);
            shadow[held_off[k] / SZ][at] = p[at];
            cache_mark_dirty(c, p);
        } else if (op < 90 && nb_held) {
            unsigned k = t % nb_held;
            cache_put(c, &held[k]);
            held[k] = held[nb_held - 1];
            held_off[k] = held_off[nb_held - 1];
            nb_held--;
        } else if (op < 95) {
            ck_assert_int_eq(cache_flush(c), 0);
        } else {
            bool busy = false;
            for (unsigned k = 0; k < nb_held; k++)
                busy |= held_off[k] == (uint64_t)t * SZ;
            if (!busy) {
                size_t len;
                cache_discard(c, (uint64_t)t * SZ);
                /* The unwritten change is gone: the file's copy counts. */
                memcpy(shadow[t], io_memory_data(mem, &len) + (size_t)t * SZ, SZ);
            }
        }
    }
    while (nb_held)
        cache_put(c, &held[--nb_held]);
    ck_assert_int_eq(cache_flush(c), 0);
    ck_assert(!cache_has_dirty(c));
    {
        size_t len;
        const uint8_t *d = io_memory_data(mem, &len);
        ck_assert_uint_eq(len, sizeof(shadow));
        for (unsigned t = 0; t < NT; t++)
            ck_assert_msg(memcmp(d + (size_t)t * SZ, shadow[t], SZ) == 0,
                          "table %u differs after the final flush", t);
    }
    cache_destroy(c);
    io_close(mem);
}
END_TEST

/* ---- ordering ------------------------------------------------------------ */

struct traced {
    int fd;                 /* our descriptor of the trace log */
    struct io *mem;         /* inner memory backend (owned by io) */
    struct io *io;          /* the trace backend */
};

static void traced_open(struct traced *tr)
{
    tr->fd = tu_trace_fd();
    tr->mem = pattern_io(TS);
    ck_assert_int_eq(io_open_trace(tr->mem, dup(tr->fd), &tr->io), 0);
}

static void traced_close(struct traced *tr)
{
    io_close(tr->io);
    close(tr->fd);
}


START_TEST(dependency_flush_order)
{
    struct traced tr;
    struct cache *l2, *rc;
    struct tu_trace t;
    int iw_r1, iw_r2, iflush, iw_l;

    traced_open(&tr);
    l2 = cache_create(tr.io, "L2", TS, 4);
    rc = cache_create(tr.io, "refcount", TS, 4);
    dirty_table(rc, 20 * TS, 0x11);
    dirty_table(rc, 21 * TS, 0x12);
    dirty_table(l2, 40 * TS, 0x22);
    cache_set_dependency(l2, rc);
    ck_assert_int_eq(cache_flush(l2), 0);

    tu_trace_read(tr.fd, &t);
    iw_r1 = index_of(&t, IO_TRACE_WRITE, 20 * TS, 0);
    iw_r2 = index_of(&t, IO_TRACE_WRITE, 21 * TS, 0);
    iw_l = index_of(&t, IO_TRACE_WRITE, 40 * TS, 0);
    ck_assert_int_ge(iw_r1, 0);
    ck_assert_int_ge(iw_r2, 0);
    ck_assert_int_ge(iw_l, 0);
    /* refcount tables, then a flush, then the L2 table. */
    iflush = index_of(&t, IO_TRACE_FLUSH, 0, (unsigned)(iw_r1 > iw_r2 ? iw_r1 : iw_r2));
    ck_assert_int_ge(iflush, 0);
    ck_assert_int_lt(iflush, iw_l);
    /* The L2 write is followed by the final flush. */
    ck_assert_int_ge(index_of(&t, IO_TRACE_FLUSH, 0, (unsigned)iw_l), 0);
    ck_assert_uint_eq(t.recs[iw_r1].payload[0], 0x11);
    ck_assert_uint_eq(t.recs[iw_l].payload[0], 0x22);
    ck_assert_uint_eq(t.recs[iw_l].r.length, TS);
    ck_assert_uint_eq(count_writes(&t), 3);
    ck_assert(!cache_has_dirty(rc));
    ck_assert(!cache_has_dirty(l2));
    tu_trace_free(&t);

    cache_destroy(l2);
    cache_destroy(rc);
    traced_close(&tr);
}
END_TEST

/* A flush hook that writes one marker table, as the refcount module writes
 * refcount-table entries. */
struct hook_state {
    struct io *io;
    unsigned calls;
    int result;
};

static int marker_hook(void *opaque)
{
    struct hook_state *h = opaque;
    uint8_t buf[TS];

    h->calls++;
    if (h->result < 0)
        return h->result;
    memset(buf, 0x77, sizeof(buf));
    return io_pwrite(h->io, buf, TS, 60 * TS);
}

START_TEST(flush_hook_order)
{
    /* The hook runs after the cache's own tables are written and before the
     * final flush, also when a dependent cache triggers the flush. */
    struct traced tr;
    struct cache *l2, *rc;
    struct tu_trace t;
    struct hook_state h = { 0 };
    int iw_r, iw_h, iflush, iw_l;

    traced_open(&tr);
    h.io = tr.io;
    l2 = cache_create(tr.io, "L2", TS, 4);
    rc = cache_create(tr.io, "refcount", TS, 4);
    cache_set_flush_hook(rc, marker_hook, &h);
    dirty_table(rc, 20 * TS, 0x11);
    dirty_table(l2, 40 * TS, 0x22);
    cache_set_dependency(l2, rc);
    ck_assert_int_eq(cache_flush(l2), 0);
    ck_assert_uint_eq(h.calls, 1);

    tu_trace_read(tr.fd, &t);
    iw_r = index_of(&t, IO_TRACE_WRITE, 20 * TS, 0);
    iw_h = index_of(&t, IO_TRACE_WRITE, 60 * TS, 0);
    iw_l = index_of(&t, IO_TRACE_WRITE, 40 * TS, 0);
    ck_assert_int_ge(iw_r, 0);
    ck_assert_int_gt(iw_h, iw_r);
    iflush = index_of(&t, IO_TRACE_FLUSH, 0, (unsigned)iw_h);
    ck_assert_int_ge(iflush, 0);
    ck_assert_int_lt(iflush, iw_l);
    tu_trace_free(&t);

    /* A failing hook fails the flush; the next flush calls it again. */
    h.result = -EIO;
    ck_assert_int_eq(cache_flush(rc), -EIO);
    ck_assert_uint_eq(h.calls, 2);
    h.result = 0;
    ck_assert_int_eq(cache_flush(rc), 0);
    ck_assert_uint_eq(h.calls, 3);

    cache_destroy(l2);
    cache_destroy(rc);
    traced_close(&tr);
}
END_TEST

START_TEST(dependency_on_eviction)
{
    /* The ordering also holds when the dirty L2 table leaves the cache by
     * eviction rather than by a flush. */
    struct traced tr;
    struct cache *l2, *rc;
    struct tu_trace t;
    int iw_r, iflush, iw_l;
    void *p;

    traced_open(&tr);
    l2 = cache_create(tr.io, "L2", TS, 2);
    rc = cache_create(tr.io, "refcount", TS, 4);
    dirty_table(rc, 20 * TS, 0x11);
    dirty_table(l2, 40 * TS, 0x22);
    cache_set_dependency(l2, rc);
    for (uint64_t n = 0; n < 4; n++) {
        ck_assert_int_eq(cache_get(l2, n * TS, &p), 0);
        cache_put(l2, &p);
    }
    tu_trace_read(tr.fd, &t);
    iw_r = index_of(&t, IO_TRACE_WRITE, 20 * TS, 0);
    iw_l = index_of(&t, IO_TRACE_WRITE, 40 * TS, 0);
    ck_assert_int_ge(iw_r, 0);
    ck_assert_int_ge(iw_l, 0);
    iflush = index_of(&t, IO_TRACE_FLUSH, 0, (unsigned)iw_r);
    ck_assert_int_ge(iflush, 0);
    ck_assert_int_lt(iflush, iw_l);
    tu_trace_free(&t);
    cache_destroy(l2);
    cache_destroy(rc);
    traced_close(&tr);
}
END_TEST

START_TEST(dependency_not_needed_without_dirty)
{
    /* A dependency whose tables are clean costs no writes. */
    struct traced tr;
    struct cache *l2, *rc;
    struct tu_trace t;
    void *p;

    traced_open(&tr);
    l2 = cache_create(tr.io, "L2", TS, 4);
    rc = cache_create(tr.io, "refcount", TS, 4);
    ck_assert_int_eq(cache_get(rc, 20 * TS, &p), 0);
    cache_put(rc, &p);
    dirty_table(l2, 40 * TS, 0x22);
    cache_set_dependency(l2, rc);
    ck_assert_int_eq(cache_flush(l2), 0);
    tu_trace_read(tr.fd, &t);
    ck_assert_uint_eq(count_writes(&t), 1);
    ck_assert_int_ge(index_of(&t, IO_TRACE_WRITE, 40 * TS, 0), 0);
    tu_trace_free(&t);
    cache_destroy(l2);
    cache_destroy(rc);
    traced_close(&tr);
}
END_TEST

START_TEST(depends_on_flush_order)
{
    struct traced tr;
    struct cache *l2;
    struct tu_trace t;

    traced_open(&tr);
    l2 = cache_create(tr.io, "L2", TS, 4);

    /* Without the dependency, the table write comes first. */
    dirty_table(l2, 40 * TS, 0x22);
    ck_assert_int_eq(cache_write_dirty(l2), 0);
    tu_trace_read(tr.fd, &t);
    ck_assert_uint_eq(t.nb, 1);
    ck_assert_uint_eq(t.recs[0].r.type, IO_TRACE_WRITE);
    tu_trace_free(&t);

    /* With it, a FLUSH precedes the write. */
    ck_assert_int_eq(ftruncate(tr.fd, 0), 0);
    ck_assert_int_eq((int)lseek(tr.fd, 0, SEEK_SET), 0);
    dirty_table(l2, 41 * TS, 0x23);
    cache_depends_on_flush(l2);
    ck_assert_int_eq(cache_write_dirty(l2), 0);
    tu_trace_read(tr.fd, &t);
    ck_assert_uint_eq(t.nb, 2);
    ck_assert_uint_eq(t.recs[0].r.type, IO_TRACE_FLUSH);
    ck_assert_uint_eq(t.recs[1].r.type, IO_TRACE_WRITE);
    ck_assert_uint_eq(t.recs[1].r.offset, 41 * TS);
    ck_assert_uint_eq(t.recs[1].payload[0], 0x23);
    tu_trace_free(&t);

    cache_destroy(l2);
    traced_close(&tr);
}
END_TEST

START_TEST(depends_on_flush_eviction)
{
    struct traced tr;
    struct cache *l2;
    struct tu_trace t;
    int iw, ifl;
    void *p;

    traced_open(&tr);
    l2 = cache_create(tr.io, "L2", TS, 1);
    dirty_table(l2, 40 * TS, 0x22);
    cache_depends_on_flush(l2);
    ck_assert_int_eq(cache_get(l2, 0, &p), 0);          /* evicts 40 */
    cache_put(l2, &p);
    tu_trace_read(tr.fd, &t);
    iw = index_of(&t, IO_TRACE_WRITE, 40 * TS, 0);
    ifl = index_of(&t, IO_TRACE_FLUSH, 0, 0);
    ck_assert_int_ge(iw, 0);
    ck_assert_int_ge(ifl, 0);
    ck_assert_int_lt(ifl, iw);
    tu_trace_free(&t);
    cache_destroy(l2);
    traced_close(&tr);
}
END_TEST

/*
 * An external data file for the data_io tests: counts its flushes and, at
 * each one, notes whether the table at @watch had already been written to
 * the traced image file.
 */
struct data_probe {
    struct tu_fwd_io fwd;
    int trace_fd;
    uint64_t watch;
    unsigned flushes;
    bool watched_written_at_flush;
};

static int probe_flush(struct io *io)
{
    struct data_probe *d = (struct data_probe *)io;
    struct tu_trace t;

    d->flushes++;
    tu_trace_read(d->trace_fd, &t);
    if (index_of(&t, IO_TRACE_WRITE, d->watch, 0) >= 0)
        d->watched_written_at_flush = true;
    tu_trace_free(&t);
    return tu_fwd_flush(io);
}

static void probe_close(struct io *io)
{
    io_close(tu_fwd_inner(io));
    free(io);
}

static const struct io_ops probe_ops = {
    .pread = tu_fwd_pread,
    .pwrite = tu_fwd_pwrite,
    .flush = probe_flush,
    .get_size = tu_fwd_get_size,
    .truncate = tu_fwd_truncate,
    .punch_hole = tu_fwd_punch,
    .close = probe_close,
};

static struct data_probe *data_probe_new(const struct traced *tr, uint64_t watch)
{
    struct data_probe *d = tu_zalloc(sizeof(*d));

    d->fwd.io.ops = &probe_ops;
    d->fwd.inner = pattern_io(TS);
    d->trace_fd = tr->fd;
    d->watch = watch;
    return d;
}

START_TEST(data_io_flushed_before_evicted_table)
{
    /* With the guest data in another file, the flush that depends_on_flush
     * asks for is one of that file, before the evicted table is written;
     * the refcount dependency is still written and flushed before it. */
    for (int with_rc = 0; with_rc <= 1; with_rc++) {
        struct traced tr;
        struct cache *l2, *rc = NULL;
        struct data_probe *data;
        struct tu_trace t;
        int iw_l, iw_r, iflush;
        void *p;

        traced_open(&tr);
        data = data_probe_new(&tr, 40 * TS);
        l2 = cache_create(tr.io, "L2", TS, 1);
        cache_set_data_io(l2, &data->fwd.io);
        if (with_rc) {
            rc = cache_create(tr.io, "refcount", TS, 4);
            dirty_table(rc, 20 * TS, 0x11);
            cache_set_dependency(l2, rc);
        }
        dirty_table(l2, 40 * TS, 0x22);
        cache_depends_on_flush(l2);
        ck_assert_int_eq(cache_get(l2, 0, &p), 0);      /* evicts 40 */
        cache_put(l2, &p);

        ck_assert_uint_eq(data->flushes, 1);
        ck_assert(!data->watched_written_at_flush);
        tu_trace_read(tr.fd, &t);
        iw_l = index_of(&t, IO_TRACE_WRITE, 40 * TS, 0);
        ck_assert_int_ge(iw_l, 0);
        ck_assert_uint_eq(t.recs[iw_l].payload[0], 0x22);
        if (with_rc) {
            iw_r = index_of(&t, IO_TRACE_WRITE, 20 * TS, 0);
            ck_assert_int_ge(iw_r, 0);
            iflush = index_of(&t, IO_TRACE_FLUSH, 0, (unsigned)iw_r);
            ck_assert_int_ge(iflush, 0);
            ck_assert_int_lt(iflush, iw_l);
        }
        tu_trace_free(&t);

        /* Met: the next table write needs no flush of either file. */
        dirty_table(l2, 0, 0x33);
        ck_assert_int_eq(cache_write_dirty(l2), 0);
        ck_assert_uint_eq(data->flushes, 1);

        cache_destroy(l2);
        cache_destroy(rc);
        io_close(&data->fwd.io);
        traced_close(&tr);
    }
}
END_TEST

START_TEST(data_io_not_flushed_without_new_data)
{
    /* A table change that makes no new guest data visible (no
     * depends_on_flush) costs no flush of the data file. */
    struct traced tr;
    struct cache *l2;
    struct data_probe *data;
    void *p;

    traced_open(&tr);
    data = data_probe_new(&tr, 40 * TS);
    l2 = cache_create(tr.io, "L2", TS, 1);
    cache_set_data_io(l2, &data->fwd.io);
    dirty_table(l2, 40 * TS, 0x22);
    ck_assert_int_eq(cache_get(l2, 0, &p), 0);
    cache_put(l2, &p);
    ck_assert_uint_eq(data->flushes, 0);
    ck_assert_uint_eq(mem_at(tr.mem, 40 * TS)[0], 0x22);
    cache_destroy(l2);
    io_close(&data->fwd.io);
    traced_close(&tr);
}
END_TEST

START_TEST(dependency_met_clears)
{
    /* After cache_dependency_met, the next table write neither writes the
     * dependency's tables nor flushes first. */
    struct traced tr;
    struct cache *l2, *rc;
    struct tu_trace t;

    traced_open(&tr);
    l2 = cache_create(tr.io, "L2", TS, 4);
    rc = cache_create(tr.io, "refcount", TS, 4);
    dirty_table(rc, 20 * TS, 0x11);
    dirty_table(l2, 40 * TS, 0x22);
    cache_set_dependency(l2, rc);
    cache_depends_on_flush(l2);
    cache_dependency_met(l2);
    ck_assert_int_eq(cache_write_dirty(l2), 0);
    tu_trace_read(tr.fd, &t);
    ck_assert_uint_eq(t.nb, 1);
    ck_assert_uint_eq(t.recs[0].r.type, IO_TRACE_WRITE);
    ck_assert_uint_eq(t.recs[0].r.offset, 40 * TS);
    ck_assert(cache_has_dirty(rc));
    tu_trace_free(&t);
    cache_destroy(l2);
    cache_destroy(rc);
    traced_close(&tr);
}
END_TEST

/* ---- errors, discard, write check, writethrough --------------------------- */

START_TEST(failed_write_stays_dirty)
{
    struct io *mem = pattern_io(TS);
    struct cache *c = cache_create(mem, "test", TS, 4);
    struct cache_stats st;

    tu_log_capture();
    dirty_table(c, 12 * TS, 0x3c);
    io_memory_fail_writes_after(mem, 0);
    ck_assert_int_eq(cache_flush(c), -EIO);
    ck_assert(cache_has_dirty(c));
    ck_assert(has_pattern(mem_at(mem, 12 * TS), 12, TS));
    cache_get_stats(c, &st);
    ck_assert_uint_eq(st.writes, 0);
    /* Still failing: still dirty. */
    ck_assert_int_eq(cache_flush(c), -EIO);
    ck_assert(cache_has_dirty(c));

    io_memory_fail_writes_after(mem, -1);
    ck_assert_int_eq(cache_flush(c), 0);
    ck_assert(!cache_has_dirty(c));
    ck_assert_uint_eq(mem_at(mem, 12 * TS)[0], 0x3c);
    ck_assert_uint_eq(mem_at(mem, 12 * TS)[7], 0x3c);
    ck_assert_uint_eq(mem_at(mem, 12 * TS)[8], pattern_byte(12, 8));
    tu_log_release();
    cache_destroy(c);
    io_close(mem);
}
END_TEST

START_TEST(failed_write_partial)
{
    /* Two dirty tables, one write allowed: flush fails, one table is
     * written, the other stays dirty and is written by the next flush. */
    struct io *mem = pattern_io(TS);
    struct cache *c = cache_create(mem, "test", TS, 4);
    unsigned written;

    tu_log_capture();
    dirty_table(c, 12 * TS, 0x3c);
    dirty_table(c, 13 * TS, 0x3d);
    io_memory_fail_writes_after(mem, 1);
    ck_assert_int_eq(cache_flush(c), -EIO);
    ck_assert(cache_has_dirty(c));
    written = (mem_at(mem, 12 * TS)[0] == 0x3c) + (mem_at(mem, 13 * TS)[0] == 0x3d);
    ck_assert_uint_eq(written, 1);
    io_memory_fail_writes_after(mem, -1);
    ck_assert_int_eq(cache_flush(c), 0);
    ck_assert(!cache_has_dirty(c));
    ck_assert_uint_eq(mem_at(mem, 12 * TS)[0], 0x3c);
    ck_assert_uint_eq(mem_at(mem, 13 * TS)[0], 0x3d);
    tu_log_release();
    cache_destroy(c);
    io_close(mem);
}
END_TEST

START_TEST(discard_drops_dirty)
{
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    void *t;

    dirty_table(c, 14 * TS, 0x66);
    ck_assert(cache_has_dirty(c));
    cache_discard(c, 14 * TS);
    ck_assert(!cache_has_dirty(c));
    ck_assert_int_eq(cache_flush(c), 0);
    ck_assert_uint_eq(cio->writes, 0);
    ck_assert(has_pattern(mem_at(cio->fwd.inner, 14 * TS), 14, TS));
    /* The next get reads the file again. */
    ck_assert_int_eq(cache_get(c, 14 * TS, &t), 0);
    ck_assert(has_pattern(t, 14, TS));
    ck_assert_uint_eq(cio->reads, 2);
    cache_put(c, &t);
    /* Discarding something not cached is harmless. */
    cache_discard(c, 50 * TS);
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

START_TEST(discard_keeps_others)
{
    struct io *mem = pattern_io(TS);
    struct cache *c = cache_create(mem, "test", TS, 4);

    dirty_table(c, 14 * TS, 0x66);
    dirty_table(c, 15 * TS, 0x67);
    cache_discard(c, 14 * TS);
    ck_assert(cache_has_dirty(c));
    ck_assert_int_eq(cache_flush(c), 0);
    ck_assert(has_pattern(mem_at(mem, 14 * TS), 14, TS));
    ck_assert_uint_eq(mem_at(mem, 15 * TS)[0], 0x67);
    cache_destroy(c);
    io_close(mem);
}
END_TEST

struct check_state {
    int ret;
    unsigned calls;
    uint64_t offset;
    size_t len;
};

static int write_check(void *opaque, uint64_t offset, size_t len)
{
    struct check_state *s = opaque;
    s->calls++;
    s->offset = offset;
    s->len = len;
    return s->ret;
}

START_TEST(write_check_cancels)
{
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    struct check_state s = { .ret = -EIO };

    tu_log_capture();
    cache_set_write_check(c, write_check, &s);
    dirty_table(c, 16 * TS, 0x71);
    ck_assert_int_eq(cache_flush(c), -EIO);
    ck_assert_uint_eq(s.calls, 1);
    ck_assert_uint_eq(s.offset, 16 * TS);
    ck_assert_uint_eq(s.len, TS);
    ck_assert_uint_eq(cio->writes, 0);
    ck_assert(cache_has_dirty(c));
    ck_assert(has_pattern(mem_at(cio->fwd.inner, 16 * TS), 16, TS));

    s.ret = 0;
    ck_assert_int_eq(cache_flush(c), 0);
    ck_assert_uint_eq(s.calls, 2);
    ck_assert_uint_eq(cio->writes, 1);
    ck_assert(!cache_has_dirty(c));
    ck_assert_uint_eq(mem_at(cio->fwd.inner, 16 * TS)[0], 0x71);

    /* Clean tables are not checked: there is no write. */
    ck_assert_int_eq(cache_flush(c), 0);
    ck_assert_uint_eq(s.calls, 2);

    /* NULL removes the check. */
    s.ret = -EIO;
    cache_set_write_check(c, NULL, NULL);
    dirty_table(c, 17 * TS, 0x72);
    ck_assert_int_eq(cache_flush(c), 0);
    ck_assert_uint_eq(s.calls, 2);
    tu_log_release();
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

START_TEST(writethrough_writes_on_last_put)
{
    struct cnt_io *cio = counting_io(TS);
    struct cache *c = cache_create(&cio->fwd.io, "test", TS, 4);
    void *t1, *t2;

    cache_set_writethrough(c, true);
    ck_assert_int_eq(cache_get(c, 18 * TS, &t1), 0);
    ck_assert_int_eq(cache_get(c, 18 * TS, &t2), 0);
    memset(t1, 0x81, 4);
    cache_mark_dirty(c, t1);
    cache_put(c, &t1);
    /* One reference left: not yet written. */
    ck_assert_uint_eq(cio->writes, 0);
    ck_assert(cache_has_dirty(c));
    cache_put(c, &t2);
    ck_assert_uint_eq(cio->writes, 1);
    ck_assert(!cache_has_dirty(c));
    ck_assert_uint_eq(mem_at(cio->fwd.inner, 18 * TS)[3], 0x81);

    /* A clean put writes nothing. */
    ck_assert_int_eq(cache_get(c, 18 * TS, &t1), 0);
    cache_put(c, &t1);
    ck_assert_uint_eq(cio->writes, 1);

    /* Back to write-back. */
    cache_set_writethrough(c, false);
    dirty_table(c, 19 * TS, 0x82);
    ck_assert_uint_eq(cio->writes, 1);
    ck_assert(cache_has_dirty(c));
    ck_assert_int_eq(cache_flush(c), 0);
    ck_assert_uint_eq(cio->writes, 2);
    cache_destroy(c);
    io_close(&cio->fwd.io);
}
END_TEST

START_TEST(writethrough_respects_dependency)
{
    struct traced tr;
    struct cache *l2, *rc;
    struct tu_trace t;
    int iw_r, iflush, iw_l;

    traced_open(&tr);
    l2 = cache_create(tr.io, "L2", TS, 4);
    rc = cache_create(tr.io, "refcount", TS, 4);
    cache_set_writethrough(l2, true);
    dirty_table(rc, 20 * TS, 0x11);
    cache_set_dependency(l2, rc);
    dirty_table(l2, 40 * TS, 0x22);
    tu_trace_read(tr.fd, &t);
    iw_r = index_of(&t, IO_TRACE_WRITE, 20 * TS, 0);
    iw_l = index_of(&t, IO_TRACE_WRITE, 40 * TS, 0);
    ck_assert_int_ge(iw_r, 0);
    ck_assert_int_ge(iw_l, 0);
    iflush = index_of(&t, IO_TRACE_FLUSH, 0, (unsigned)iw_r);
    ck_assert_int_ge(iflush, 0);
    ck_assert_int_lt(iflush, iw_l);
    tu_trace_free(&t);
    cache_destroy(l2);
    cache_destroy(rc);
    traced_close(&tr);
}
END_TEST

/* A host whose flushes fail once told to (and then for good, as io.c
 * poisons an io after a failed flush). */
struct failflush_io {
    struct tu_fwd_io fwd;
    bool fail;
};

static int failflush_flush(struct io *io)
{
    if (((struct failflush_io *)io)->fail)
        return -EIO;
    return tu_fwd_flush(io);
}

static void failflush_close(struct io *io)
{
    io_close(tu_fwd_inner(io));
    free(io);
}

static const struct io_ops failflush_ops = {
    .pread = tu_fwd_pread,
    .pwrite = tu_fwd_pwrite,
    .flush = failflush_flush,
    .get_size = tu_fwd_get_size,
    .truncate = tu_fwd_truncate,
    .punch_hole = tu_fwd_punch,
    .close = failflush_close,
};

/*
 * Settling an earlier dependency can fail (its host flush does): the error
 * is returned, and the dependency is kept, so the dependent table is not
 * written before the tables it depends on are durable.  Here the refcount
 * cache lives on a host whose flush fails, the L2 cache on another one:
 * moving the L2 cache's dependency to a third cache must fail, and the L2
 * table must then stay unwritten.
 */
START_TEST(set_dependency_returns_settle_error)
{
    struct failflush_io *bad = tu_zalloc(sizeof(*bad));
    struct io *good = pattern_io(TS);
    struct cache *l2, *rc, *other, *chained;

    bad->fwd.io.ops = &failflush_ops;
    bad->fwd.inner = pattern_io(TS);
    l2 = cache_create(good, "L2", TS, 4);
    other = cache_create(good, "other", TS, 4);
    chained = cache_create(good, "chained", TS, 4);
    rc = cache_create(&bad->fwd.io, "refcount", TS, 4);
    dirty_table(rc, 20 * TS, 0x11);
    dirty_table(l2, 40 * TS, 0x22);
    ck_assert_int_eq(cache_set_dependency(l2, rc), 0);

    bad->fail = true;
    ck_assert_int_eq(cache_set_dependency(l2, other), -EIO);
    /* Still waiting for the refcount cache, which cannot be made durable. */
    ck_assert_int_eq(cache_write_dirty(l2), -EIO);
    ck_assert(cache_has_dirty(l2));
    ck_assert(has_pattern(mem_at(good, 40 * TS), 40, TS));

    /* The same for a chain: a cache whose dependency depends on the
     * failing one. */
    ck_assert_int_eq(cache_set_dependency(chained, l2), -EIO);
    dirty_table(chained, 50 * TS, 0x33);
    ck_assert_int_eq(cache_write_dirty(chained), 0);   /* no dependency */
    ck_assert(has_pattern(mem_at(good, 40 * TS), 40, TS));

    cache_destroy(l2);
    cache_destroy(other);
    cache_destroy(chained);
    cache_destroy(rc);
    io_close(good);
    io_close(&bad->fwd.io);
}
END_TEST

static Suite *cache_suite(void)
{
    Suite *s = suite_create("cache");
    TCase *tc = tcase_create("get");
    tcase_set_timeout(tc, 60);

    tcase_add_test(tc, create_accessors);
    tcase_add_test(tc, get_miss_reads);
    tcase_add_test(tc, get_hit_same_pointer);
    tcase_add_test(tc, get_hit_same_pointer_after_put);
    tcase_add_test(tc, get_read_error);
    tcase_add_test(tc, get_empty_no_read);
    tcase_add_test(tc, get_empty_over_dirty_copy);
    tcase_add_test(tc, get_empty_while_referenced);
    tcase_add_test(tc, mark_dirty_flush_writes);
    tcase_add_test(tc, write_dirty_without_flush);
    suite_add_tcase(s, tc);

    tc = tcase_create("eviction");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, pinned_never_evicted);
    tcase_add_test(tc, all_pinned_fails);
    tcase_add_test(tc, dirty_evicted_written_back);
    tcase_add_test(tc, dirty_eviction_write_fails);
    tcase_add_test(tc, lru_order);
    tcase_add_test(tc, peek_hit_and_miss);
    tcase_add_test(tc, peek_gives_second_chance);
    tcase_add_test(tc, peek_all_marked_still_evicts);
    tcase_add_test(tc, peek_pinned_entries);
    tcase_add_test(tc, peek_then_discard);
    tcase_add_test(tc, random_model);
    suite_add_tcase(s, tc);

    tc = tcase_create("ordering");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, dependency_flush_order);
    tcase_add_test(tc, dependency_on_eviction);
    tcase_add_test(tc, dependency_not_needed_without_dirty);
    tcase_add_test(tc, depends_on_flush_order);
    tcase_add_test(tc, depends_on_flush_eviction);
    tcase_add_test(tc, dependency_met_clears);
    tcase_add_test(tc, data_io_flushed_before_evicted_table);
    tcase_add_test(tc, data_io_not_flushed_without_new_data);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, failed_write_stays_dirty);
    tcase_add_test(tc, failed_write_partial);
    tcase_add_test(tc, discard_drops_dirty);
    tcase_add_test(tc, discard_keeps_others);
    tcase_add_test(tc, write_check_cancels);
    tcase_add_test(tc, writethrough_writes_on_last_put);
    tcase_add_test(tc, writethrough_respects_dependency);
    tcase_add_test(tc, flush_hook_order);
    tcase_add_test(tc, set_dependency_returns_settle_error);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(cache_suite());
}
