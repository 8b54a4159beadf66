/*
 * Unit tests for io: the memory backend, the trace backend, and a failed
 * flush sticking at the io layer.
 */
#include "testutil.h"

#include "io.h"

#include <errno.h>

static void fill_pattern(uint8_t *p, size_t len, unsigned seed)
{
    for (size_t i = 0; i < len; i++)
        p[i] = (uint8_t)(i * 7 + seed * 13 + 1);
}

static bool all_zero(const uint8_t *p, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (p[i])
            return false;
    return true;
}

/* ---- memory backend ------------------------------------------------------ */

START_TEST(mem_open_copies_data)
{
    uint8_t src[1000], buf[1000];
    struct io *io;
    uint64_t size;
    size_t len;

    fill_pattern(src, sizeof(src), 1);
    ck_assert_int_eq(io_open_memory(src, sizeof(src), &io), 0);
    /* A copy: changing the source afterwards does not show through. */
    memset(src, 0xee, sizeof(src));
    ck_assert_int_eq(io_get_size(io, &size), 0);
    ck_assert_uint_eq(size, 1000);
    ck_assert_int_eq(io_pread(io, buf, sizeof(buf), 0), 0);
    fill_pattern(src, sizeof(src), 1);
    ck_assert_mem_eq(buf, src, sizeof(buf));
    ck_assert_ptr_nonnull(io_memory_data(io, &len));
    ck_assert_uint_eq(len, 1000);
    ck_assert_mem_eq(io_memory_data(io, &len), src, 1000);
    io_close(io);
}
END_TEST

START_TEST(mem_open_empty)
{
    struct io *io;
    uint64_t size = 99;
    uint8_t buf[64];

    ck_assert_int_eq(io_open_memory(NULL, 0, &io), 0);
    ck_assert_int_eq(io_get_size(io, &size), 0);
    ck_assert_uint_eq(size, 0);
    memset(buf, 0xaa, sizeof(buf));
    ck_assert_int_eq(io_pread(io, buf, sizeof(buf), 0), 0);
    ck_assert(all_zero(buf, sizeof(buf)));
    io_close(io);
}
END_TEST

START_TEST(mem_read_past_end_is_zero)
{
    uint8_t src[100], buf[300];
    struct io *io;
    uint64_t size;

    fill_pattern(src, sizeof(src), 2);
    ck_assert_int_eq(io_open_memory(src, sizeof(src), &io), 0);

    /* Straddling the end: the tail reads as zeros. */
    memset(buf, 0xaa, sizeof(buf));
    ck_assert_int_eq(io_pread(io, buf, 200, 50), 0);
    ck_assert_mem_eq(buf, src + 50, 50);
    ck_assert(all_zero(buf + 50, 150));

    /* Entirely past the end. */
    memset(buf, 0xaa, sizeof(buf));
    ck_assert_int_eq(io_pread(io, buf, sizeof(buf), 1ull << 30), 0);
    ck_assert(all_zero(buf, sizeof(buf)));

    /* Reading does not grow the file. */
    ck_assert_int_eq(io_get_size(io, &size), 0);
    ck_assert_uint_eq(size, 100);
    io_close(io);
}
END_TEST

START_TEST(mem_write_grows)
{
    uint8_t src[64], data[32], buf[256];
    struct io *io;
    uint64_t size;

    fill_pattern(src, sizeof(src), 3);
    fill_pattern(data, sizeof(data), 4);
    ck_assert_int_eq(io_open_memory(src, sizeof(src), &io), 0);

    /* Overwrite inside: size unchanged. */
    ck_assert_int_eq(io_pwrite(io, data, 8, 10), 0);
    ck_assert_int_eq(io_get_size(io, &size), 0);
    ck_assert_uint_eq(size, 64);

    /* Write beyond the end with a gap: the gap reads as zeros. */
    ck_assert_int_eq(io_pwrite(io, data, sizeof(data), 200), 0);
    ck_assert_int_eq(io_get_size(io, &size), 0);
    ck_assert_uint_eq(size, 232);

    ck_assert_int_eq(io_pread(io, buf, 232, 0), 0);
    ck_assert_mem_eq(buf, src, 10);
    ck_assert_mem_eq(buf + 10, data, 8);
    ck_assert_mem_eq(buf + 18, src + 18, 64 - 18);
    ck_assert(all_zero(buf + 64, 200 - 64));
    ck_assert_mem_eq(buf + 200, data, sizeof(data));
    io_close(io);
}
END_TEST

START_TEST(mem_punch_hole_zeroes)
{
    uint8_t src[4096], buf[4096];
    struct io *io;
    uint64_t size;

    fill_pattern(src, sizeof(src), 5);
    ck_assert_int_eq(io_open_memory(src, sizeof(src), &io), 0);
    ck_assert_int_eq(io_punch_hole(io, 1000, 1024), 0);
    ck_assert_int_eq(io_pread(io, buf, sizeof(buf), 0), 0);
    ck_assert_mem_eq(buf, src, 1000);
    ck_assert(all_zero(buf + 1000, 1024));
    ck_assert_mem_eq(buf + 2024, src + 2024, sizeof(src) - 2024);
    /* Punching keeps the size, also when the range runs past the end. */
    ck_assert_int_eq(io_punch_hole(io, 4000, 1000), 0);
    ck_assert_int_eq(io_get_size(io, &size), 0);
    ck_assert_uint_eq(size, 4096);
    ck_assert_int_eq(io_pread(io, buf, sizeof(buf), 0), 0);
    ck_assert(all_zero(buf + 4000, 96));
    ck_assert_mem_eq(buf + 3000, src + 3000, 1000);
    io_close(io);
}
END_TEST

START_TEST(mem_truncate)
{
    uint8_t src[256], buf[256];
    struct io *io;
    uint64_t size;

    fill_pattern(src, sizeof(src), 6);
    ck_assert_int_eq(io_open_memory(src, sizeof(src), &io), 0);
    ck_assert_int_eq(io_truncate(io, 100), 0);
    ck_assert_int_eq(io_get_size(io, &size), 0);
    ck_assert_uint_eq(size, 100);
    /* Growing again: the cut part comes back as zeros. */
    ck_assert_int_eq(io_truncate(io, 256), 0);
    ck_assert_int_eq(io_get_size(io, &size), 0);
    ck_assert_uint_eq(size, 256);
    ck_assert_int_eq(io_pread(io, buf, sizeof(buf), 0), 0);
    ck_assert_mem_eq(buf, src, 100);
    ck_assert(all_zero(buf + 100, 156));
    io_close(io);
}
END_TEST

START_TEST(mem_fail_writes_after)
{
    uint8_t a = 0x11, b = 0x22, buf[8];
    struct io *io;

    ck_assert_int_eq(io_open_memory(NULL, 0, &io), 0);
    io_memory_fail_writes_after(io, 3);
    ck_assert_int_eq(io_pwrite(io, &a, 1, 0), 0);
    ck_assert_int_eq(io_pwrite(io, &a, 1, 1), 0);
    ck_assert_int_eq(io_pwrite(io, &a, 1, 2), 0);
    ck_assert_int_eq(io_pwrite(io, &b, 1, 3), -EIO);
    ck_assert_int_eq(io_pwrite(io, &b, 1, 0), -EIO);
    ck_assert_int_eq(io_pwrite(io, &b, 1, 4), -EIO);
    /* The failed writes changed nothing. */
    ck_assert_int_eq(io_pread(io, buf, sizeof(buf), 0), 0);
    ck_assert_uint_eq(buf[0], 0x11);
    ck_assert_uint_eq(buf[1], 0x11);
    ck_assert_uint_eq(buf[2], 0x11);
    ck_assert_uint_eq(buf[3], 0);
    ck_assert_uint_eq(buf[4], 0);

    /* -1 disables the fault injection. */
    io_memory_fail_writes_after(io, -1);
    for (int i = 0; i < 10; i++)
        ck_assert_int_eq(io_pwrite(io, &b, 1, (uint64_t)i), 0);
    ck_assert_int_eq(io_pread(io, buf, sizeof(buf), 0), 0);
    ck_assert_uint_eq(buf[0], 0x22);
    ck_assert_uint_eq(buf[7], 0x22);

    /* 0: the very next write fails. */
    io_memory_fail_writes_after(io, 0);
    ck_assert_int_eq(io_pwrite(io, &a, 1, 0), -EIO);
    io_close(io);
}
END_TEST

START_TEST(mem_read_only_refuses_writes)
{
    uint8_t src[16] = { 1, 2, 3 }, buf[16];
    struct io *io;

    ck_assert_int_eq(io_open_memory(src, sizeof(src), &io), 0);
    io->read_only = true;
    ck_assert_int_eq(io_pwrite(io, buf, 4, 0), -EROFS);
    ck_assert_int_eq(io_truncate(io, 0), -EROFS);
    ck_assert_int_eq(io_punch_hole(io, 0, 16), -EROFS);
    ck_assert_int_eq(io_pread(io, buf, sizeof(buf), 0), 0);
    ck_assert_mem_eq(buf, src, sizeof(src));
    io->read_only = false;
    io_close(io);
}
END_TEST

/* ---- trace backend ------------------------------------------------------- */

START_TEST(trace_records_in_order)
{
    uint8_t w1[100], w2[7], buf[300];
    struct io *mem, *io;
    struct tu_trace t;
    int fd = tu_trace_fd();
    size_t len;
    uint64_t size;

    fill_pattern(w1, sizeof(w1), 7);
    fill_pattern(w2, sizeof(w2), 8);
    ck_assert_int_eq(io_open_memory(NULL, 0, &mem), 0);
    ck_assert_int_eq(io_open_trace(mem, dup(fd), &io), 0);

    ck_assert_int_eq(io_pwrite(io, w1, sizeof(w1), 4096), 0);
    ck_assert_int_eq(io_flush(io), 0);
    io_mark(io, 42, 0x123456789abcull);
    ck_assert_int_eq(io_punch_hole(io, 4100, 50), 0);
    ck_assert_int_eq(io_truncate(io, 8192), 0);
    ck_assert_int_eq(io_pwrite(io, w2, sizeof(w2), 3), 0);
    ck_assert_int_eq(io_flush(io), 0);

    /* Reads go through to the inner backend and are not recorded. */
    ck_assert_int_eq(io_pread(io, buf, 100, 4096), 0);
    ck_assert_mem_eq(buf, w1, 4);
    ck_assert(all_zero(buf + 4, 50));
    ck_assert_mem_eq(buf + 54, w1 + 54, 46);
    ck_assert_int_eq(io_get_size(io, &size), 0);
    ck_assert_uint_eq(size, 8192);
    /* The inner backend really holds the writes. */
    ck_assert_mem_eq(io_memory_data(mem, &len) + 3, w2, sizeof(w2));

    tu_trace_read(fd, &t);
    ck_assert_uint_eq(t.nb, 7);

    ck_assert_uint_eq(t.recs[0].r.type, IO_TRACE_WRITE);
    ck_assert_uint_eq(t.recs[0].r.offset, 4096);
    ck_assert_uint_eq(t.recs[0].r.length, sizeof(w1));
    ck_assert_mem_eq(t.recs[0].payload, w1, sizeof(w1));

    ck_assert_uint_eq(t.recs[1].r.type, IO_TRACE_FLUSH);

    ck_assert_uint_eq(t.recs[2].r.type, IO_TRACE_MARK);
    ck_assert_uint_eq(t.recs[2].r.what, 42);
    ck_assert_uint_eq(t.recs[2].r.offset, 0x123456789abcull);

    ck_assert_uint_eq(t.recs[3].r.type, IO_TRACE_PUNCH);
    ck_assert_uint_eq(t.recs[3].r.offset, 4100);
    ck_assert_uint_eq(t.recs[3].r.length, 50);

    ck_assert_uint_eq(t.recs[4].r.type, IO_TRACE_TRUNCATE);
    ck_assert_uint_eq(t.recs[4].r.offset, 8192);

    ck_assert_uint_eq(t.recs[5].r.type, IO_TRACE_WRITE);
    ck_assert_uint_eq(t.recs[5].r.offset, 3);
    ck_assert_uint_eq(t.recs[5].r.length, sizeof(w2));
    ck_assert_mem_eq(t.recs[5].payload, w2, sizeof(w2));

    ck_assert_uint_eq(t.recs[6].r.type, IO_TRACE_FLUSH);

    tu_trace_free(&t);
    io_close(io);               /* closes mem as well */
    close(fd);
}
END_TEST

START_TEST(trace_replay_reproduces_image)
{
    /* Replaying every WRITE/PUNCH/TRUNCATE record onto the starting
     * contents gives the final contents: the log is complete. */
    uint8_t start[2048];
    uint8_t *replay;
    struct io *mem, *io;
    struct tu_trace t;
    int fd = tu_trace_fd();
    size_t len, rlen;
    const uint8_t *final;

    fill_pattern(start, sizeof(start), 9);
    ck_assert_int_eq(io_open_memory(start, sizeof(start), &mem), 0);
    ck_assert_int_eq(io_open_trace(mem, dup(fd), &io), 0);
    for (unsigned i = 0; i < 50; i++) {
        uint8_t w[37];
        fill_pattern(w, sizeof(w), i + 100);
        ck_assert_int_eq(io_pwrite(io, w, (i % 37) + 1, (i * 97) % 3000), 0);
        if (i % 10 == 3)
            ck_assert_int_eq(io_punch_hole(io, i * 31, 64), 0);
        if (i % 17 == 5)
            ck_assert_int_eq(io_flush(io), 0);
    }
    ck_assert_int_eq(io_truncate(io, 2900), 0);

    tu_trace_read(fd, &t);
    rlen = sizeof(start);
    replay = tu_zalloc(4096);
    memcpy(replay, start, sizeof(start));
    for (unsigned i = 0; i < t.nb; i++) {
        const struct io_trace_record *r = &t.recs[i].r;
        switch (r->type) {
        case IO_TRACE_WRITE:
            memcpy(replay + r->offset, t.recs[i].payload, r->length);
            if (r->offset + r->length > rlen)
                rlen = r->offset + r->length;
            break;
        case IO_TRACE_PUNCH:
            memset(replay + r->offset, 0, r->length);
            break;
        case IO_TRACE_TRUNCATE:
            if (r->offset < rlen)
                memset(replay + r->offset, 0, rlen - r->offset);
            rlen = r->offset;
            break;
        case IO_TRACE_FLUSH:
            break;
        default:
            ck_abort_msg("unexpected record type %u", r->type);
        }
    }
    final = io_memory_data(mem, &len);
    ck_assert_uint_eq(len, 2900);
    ck_assert_uint_eq(rlen, 2900);
    ck_assert_mem_eq(final, replay, len);

    free(replay);
    tu_trace_free(&t);
    io_close(io);
    close(fd);
}
END_TEST

START_TEST(trace_failed_write_propagates)
{
    uint8_t w[16] = { 0 };
    struct io *mem, *io;
    struct tu_trace t;
    int fd = tu_trace_fd();

    ck_assert_int_eq(io_open_memory(NULL, 0, &mem), 0);
    ck_assert_int_eq(io_open_trace(mem, dup(fd), &io), 0);
    io_memory_fail_writes_after(mem, 1);
    ck_assert_int_eq(io_pwrite(io, w, sizeof(w), 0), 0);
    ck_assert_int_eq(io_pwrite(io, w, sizeof(w), 512), -EIO);
    tu_trace_read(fd, &t);
    /* The failed write did not reach the file, so the log, which is an
     * order the host could have seen, must not claim it did. */
    ck_assert_uint_ge(t.nb, 1);
    ck_assert_uint_eq(t.recs[0].r.type, IO_TRACE_WRITE);
    ck_assert_uint_eq(t.recs[0].r.offset, 0);
    for (unsigned i = 1; i < t.nb; i++)
        ck_assert(!(t.recs[i].r.type == IO_TRACE_WRITE && t.recs[i].r.offset == 512));
    tu_trace_free(&t);
    io_close(io);
    close(fd);
}
END_TEST

START_TEST(trace_read_only_inherited)
{
    struct io *mem, *io;
    uint8_t w[4] = { 1, 2, 3, 4 };
    int fd = tu_trace_fd();
    struct tu_trace t;

    ck_assert_int_eq(io_open_memory(NULL, 0, &mem), 0);
    mem->read_only = true;
    ck_assert_int_eq(io_open_trace(mem, dup(fd), &io), 0);
    ck_assert(io->read_only);
    ck_assert_int_eq(io_pwrite(io, w, sizeof(w), 0), -EROFS);
    tu_trace_read(fd, &t);
    ck_assert_uint_eq(t.nb, 0);
    tu_trace_free(&t);
    mem->read_only = false;
    io_close(io);
    close(fd);
}
END_TEST

/* ---- a failed flush -------------------------------------------------------- */

/*
 * After a failed flush the host's next flush would succeed (tu_lossy_io,
 * like Linux): the failure must stick at the io layer, for writes too, and
 * be logged once with the backend's name.  Reads go on.
 */
START_TEST(failed_flush_sticks)
{
    uint8_t data[4096], buf[4096];
    struct tu_lossy_io *l;
    struct io *io;

    fill_pattern(data, sizeof(data), 3);
    l = tu_lossy_new(NULL, 0, 2);
    io = &l->fwd.io;
    io_set_name(io, "disk.img");
    tu_log_capture();
    ck_assert_int_eq(io_pwrite(io, data, sizeof(data), 0), 0);
    ck_assert_int_eq(io_flush(io), 0);
    ck_assert_int_eq(io_flush_error(io), 0);
    ck_assert_int_eq(io_pwrite(io, data, 512, 8192), 0);
    ck_assert_int_eq(io_flush(io), -EIO);               /* the host's 2nd */
    ck_assert_int_eq(io_flush_error(io), -EIO);
    ck_assert_uint_eq(tu_log_state()->nb_errors, 1);
    ck_assert_ptr_nonnull(strstr(tu_log_state()->first_error,
                                 "disk.img: host flush failed: Input/output error"));
    /* The host would take these and flush them: nothing gets there. */
    ck_assert_int_eq(io_flush(io), -EIO);
    ck_assert_int_eq(io_pwrite(io, data, 512, 0), -EIO);
    ck_assert_int_eq(io_punch_hole(io, 0, 512), -EIO);
    ck_assert_int_eq(io_truncate(io, 0), -EIO);
    ck_assert_uint_eq(l->flushes, 2);
    ck_assert_uint_eq(l->changes_after_failure, 0);
    ck_assert_uint_eq(tu_log_state()->nb_errors, 1);    /* logged once */
    tu_log_release();
    /* Reads go on and see the page cache. */
    ck_assert_int_eq(io_pread(io, buf, sizeof(buf), 0), 0);
    ck_assert_mem_eq(buf, data, sizeof(buf));
    io_close(io);
    tu_lossy_free(l);
}
END_TEST

/* A wrapper (trace) over a failing backend: both refuse from then on, the
 * named outer one logs, once; io_poison fails another file silently. */
START_TEST(failed_flush_sticks_through_trace)
{
    int fd = tu_trace_fd();
    struct tu_lossy_io *l = tu_lossy_new(NULL, 0, 1);
    struct io *traced, *other;
    uint8_t b[512] = { 1 };

    ck_assert_int_eq(io_open_trace(&l->fwd.io, dup(fd), &traced), 0);
    io_set_name(traced, "img.qcow2");
    ck_assert_int_eq(io_open_memory(NULL, 0, &other), 0);
    io_set_name(other, "data.raw");
    tu_log_capture();
    ck_assert_int_eq(io_pwrite(traced, b, sizeof(b), 0), 0);
    ck_assert_int_eq(io_flush(traced), -EIO);
    ck_assert_int_eq(io_flush_error(&l->fwd.io), -EIO);
    ck_assert_int_eq(io_pwrite(traced, b, sizeof(b), 0), -EIO);
    ck_assert_int_eq(io_pwrite(&l->fwd.io, b, sizeof(b), 0), -EIO);
    io_poison(other, io_flush_error(traced));
    ck_assert_int_eq(io_pwrite(other, b, sizeof(b), 0), -EIO);
    ck_assert_int_eq(io_flush(other), -EIO);
    ck_assert_uint_eq(tu_log_state()->nb_errors, 1);
    ck_assert_ptr_nonnull(strstr(tu_log_state()->first_error, "img.qcow2: host flush failed"));
    tu_log_release();
    io_close(traced);
    io_close(other);
    tu_lossy_free(l);
    close(fd);
}
END_TEST

static Suite *io_suite(void)
{
    Suite *s = suite_create("io");
    TCase *tc = tcase_create("memory");
    tcase_set_timeout(tc, 60);

    tcase_add_test(tc, mem_open_copies_data);
    tcase_add_test(tc, mem_open_empty);
    tcase_add_test(tc, mem_read_past_end_is_zero);
    tcase_add_test(tc, mem_write_grows);
    tcase_add_test(tc, mem_punch_hole_zeroes);
    tcase_add_test(tc, mem_truncate);
    tcase_add_test(tc, mem_fail_writes_after);
    tcase_add_test(tc, mem_read_only_refuses_writes);
    suite_add_tcase(s, tc);

    tc = tcase_create("trace");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, trace_records_in_order);
    tcase_add_test(tc, trace_replay_reproduces_image);
    tcase_add_test(tc, trace_failed_write_propagates);
    tcase_add_test(tc, trace_read_only_inherited);
    suite_add_tcase(s, tc);

    tc = tcase_create("flush_error");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, failed_flush_sticks);
    tcase_add_test(tc, failed_flush_sticks_through_trace);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(io_suite());
}
