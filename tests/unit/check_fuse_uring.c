/*
 * Unit tests for fuse_uring's pure parts: the layout of ring threads over
 * the kernel's queues (every queue served, every thread used, pinning only
 * where a queue's requests come from), the measurement layout strings, and
 * the sysfs CPU list that gives the queue count.  The ring itself needs a
 * kernel connection: test_io_uring drives it with each layout.
 */
#include "testutil.h"

#include "fuse_uring.h"

START_TEST(layout_serves_every_queue_with_every_thread)
{
    unsigned queues, threads, t, q;
    int spread, pin;

    for (queues = 1; queues <= 8; queues++)
        for (threads = 1; threads <= 3 * queues + 2; threads++)
            for (spread = 0; spread <= 1; spread++)
                for (pin = 0; pin <= 1; pin++) {
                    struct fuse_uring_layout l = { queues, threads, spread, pin };
                    unsigned per_queue_min = ~0u, per_queue_max = 0;

                    for (t = 0; t < threads; t++) {
                        unsigned served = 0;

                        for (q = 0; q < queues; q++)
                            served += fuse_uring_layout_serves(&l, t, q);
                        ck_assert_msg(served >= 1, "%u queues, %u threads: thread %u idle",
                                      queues, threads, t);
                        /* With more threads than queues, one queue each. */
                        if (!spread && threads >= queues)
                            ck_assert_uint_eq(served, 1);
                        if (spread)
                            ck_assert_uint_eq(served, queues);
                    }
                    for (q = 0; q < queues; q++) {
                        unsigned servers = 0, pinned_here = 0;

                        for (t = 0; t < threads; t++) {
                            int cpu = fuse_uring_layout_cpu(&l, t);

                            servers += fuse_uring_layout_serves(&l, t, q);
                            if (cpu == (int)q && fuse_uring_layout_serves(&l, t, q))
                                pinned_here++;
                        }
                        ck_assert_msg(servers >= 1, "%u queues, %u threads: queue %u unserved",
                                      queues, threads, q);
                        if (servers < per_queue_min)
                            per_queue_min = servers;
                        if (servers > per_queue_max)
                            per_queue_max = servers;
                        /* Pinned: exactly one thread of each queue runs on
                         * its CPU when there are threads enough. */
                        if (pin && !spread && threads >= queues)
                            ck_assert_uint_eq(pinned_here, 1);
                        if (!pin)
                            ck_assert_uint_eq(pinned_here, 0);
                    }
                    /* The threads are shared out evenly. */
                    if (!spread)
                        ck_assert_uint_le(per_queue_max - per_queue_min, 1);
                }
}
END_TEST

START_TEST(layout_pins_a_thread_only_where_it_serves)
{
    unsigned queues, threads, t;

    for (queues = 1; queues <= 8; queues++)
        for (threads = 1; threads <= 3 * queues; threads++)
            for (t = 0; t < threads; t++) {
                struct fuse_uring_layout l = { queues, threads, false, true };
                int cpu = fuse_uring_layout_cpu(&l, t);

                ck_assert_int_lt(cpu, (int)queues);
                if (cpu >= 0)
                    ck_assert(fuse_uring_layout_serves(&l, t, (unsigned)cpu));
                /* A queue's extra threads float. */
                if (t >= queues)
                    ck_assert_int_eq(cpu, -1);
                else
                    ck_assert_int_eq(cpu, (int)t);
            }
}
END_TEST

START_TEST(layout_two_queues_four_threads)
{
    struct fuse_uring_layout l = { .queues = 2, .threads = 4, .pin = true };

    /* Threads 0 and 2 serve queue 0, 1 and 3 queue 1; 0 and 1 are pinned. */
    ck_assert(fuse_uring_layout_serves(&l, 0, 0) && !fuse_uring_layout_serves(&l, 0, 1));
    ck_assert(fuse_uring_layout_serves(&l, 2, 0) && !fuse_uring_layout_serves(&l, 2, 1));
    ck_assert(fuse_uring_layout_serves(&l, 1, 1) && !fuse_uring_layout_serves(&l, 1, 0));
    ck_assert(fuse_uring_layout_serves(&l, 3, 1) && !fuse_uring_layout_serves(&l, 3, 0));
    ck_assert_int_eq(fuse_uring_layout_cpu(&l, 0), 0);
    ck_assert_int_eq(fuse_uring_layout_cpu(&l, 1), 1);
    ck_assert_int_eq(fuse_uring_layout_cpu(&l, 2), -1);
    ck_assert_int_eq(fuse_uring_layout_cpu(&l, 3), -1);
    /* One thread for two queues. */
    l.threads = 1;
    ck_assert(fuse_uring_layout_serves(&l, 0, 0) && fuse_uring_layout_serves(&l, 0, 1));
}
END_TEST

START_TEST(parse_layout_accepts_the_documented_words)
{
    struct fuse_uring_config cfg = { .pin = true, .defer_taskrun = true };

    ck_assert_int_eq(fuse_uring_parse_layout("threads=4,depth=16,spread,nopin,nodefer", &cfg), 0);
    ck_assert_uint_eq(cfg.threads, 4);
    ck_assert_uint_eq(cfg.queue_depth, 16);
    ck_assert(cfg.spread);
    ck_assert(!cfg.pin);
    ck_assert(!cfg.defer_taskrun);
    ck_assert_int_eq(fuse_uring_parse_layout("pin,defer", &cfg), 0);
    ck_assert(cfg.pin && cfg.defer_taskrun);
    ck_assert_uint_eq(cfg.threads, 4);          /* words not given stay */
    ck_assert_int_eq(fuse_uring_parse_layout("", &cfg), 0);
}
END_TEST

START_TEST(parse_layout_refuses_the_rest)
{
    static const char *const bad[] = {
        "threads=0", "threads=257", "threads=", "threads=4x", "threads=-1",
        "depth=0", "depth=1025", "depth=8k", "spreads", "pin=1", "bogus",
        "threads=2,bogus", "spread,depth=0", "nopin,threads=4,x",
    };
    size_t i;

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct fuse_uring_config cfg = { .threads = 3, .queue_depth = 5, .pin = true };

        ck_assert_msg(fuse_uring_parse_layout(bad[i], &cfg) == -EINVAL, "\"%s\" accepted",
                      bad[i]);
        /* Nothing of a refused layout is taken, not even its good words. */
        ck_assert_uint_eq(cfg.threads, 3);
        ck_assert_uint_eq(cfg.queue_depth, 5);
        ck_assert(cfg.pin && !cfg.spread && !cfg.defer_taskrun);
    }
}
END_TEST

START_TEST(cpu_list_counts)
{
    ck_assert_uint_eq(fuse_uring_count_cpu_list("0\n"), 1);
    ck_assert_uint_eq(fuse_uring_count_cpu_list("0-1\n"), 2);
    ck_assert_uint_eq(fuse_uring_count_cpu_list("0-1,4,6-7\n"), 5);
    ck_assert_uint_eq(fuse_uring_count_cpu_list("0-63"), 64);
    ck_assert_uint_eq(fuse_uring_count_cpu_list("0-65535"), 65536);
    /* Not a CPU list, or too many: 0, which fuse_uring_start refuses. */
    ck_assert_uint_eq(fuse_uring_count_cpu_list(""), 0);
    ck_assert_uint_eq(fuse_uring_count_cpu_list("\n"), 0);
    ck_assert_uint_eq(fuse_uring_count_cpu_list("3-1"), 0);
    ck_assert_uint_eq(fuse_uring_count_cpu_list("-1"), 0);
    ck_assert_uint_eq(fuse_uring_count_cpu_list(" 0"), 0);
    ck_assert_uint_eq(fuse_uring_count_cpu_list("0-"), 0);
    ck_assert_uint_eq(fuse_uring_count_cpu_list("0,"), 0);
    ck_assert_uint_eq(fuse_uring_count_cpu_list("0;1"), 0);
    ck_assert_uint_eq(fuse_uring_count_cpu_list("0-65536"), 0);
    ck_assert_uint_eq(fuse_uring_count_cpu_list("0-18446744073709551615"), 0);
    ck_assert_uint_eq(fuse_uring_count_cpu_list("0-40000,50000-80000"), 0);
}
END_TEST

START_TEST(possible_cpus_matches_sysfs)
{
    long conf = sysconf(_SC_NPROCESSORS_CONF);
    unsigned n = fuse_uring_possible_cpus();

    /* Possible CPUs include every configured one. */
    ck_assert_uint_ge(n, 1);
    if (conf > 0)
        ck_assert_uint_ge(n, (unsigned long)conf);
}
END_TEST

static Suite *fuse_uring_suite(void)
{
    Suite *s = suite_create("fuse_uring");
    TCase *tc = tcase_create("layout");

    tcase_add_test(tc, layout_serves_every_queue_with_every_thread);
    tcase_add_test(tc, layout_pins_a_thread_only_where_it_serves);
    tcase_add_test(tc, layout_two_queues_four_threads);
    tcase_add_test(tc, parse_layout_accepts_the_documented_words);
    tcase_add_test(tc, parse_layout_refuses_the_rest);
    tcase_add_test(tc, cpu_list_counts);
    tcase_add_test(tc, possible_cpus_matches_sysfs);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(fuse_uring_suite());
}
