/*
 * Unit tests for scratch: per-thread buffers that a request reuses instead
 * of allocating (reused, grown, kept apart by slot and by thread, kept
 * when a growth fails) and per-thread objects (made once, destroyed with
 * the thread).  Run under SANITIZE=1, LeakSanitizer also checks
 * that a thread's buffers go with it.
 */
#include "testutil.h"

#include "scratch.h"

/* Under ASan (SANITIZE=1) and TSan (SANITIZE=thread) a malloc that cannot
 * be met must return NULL, as it does without them, rather than end the
 * process: the failed-growth case asks for one. */
const char *__asan_default_options(void);
const char *__asan_default_options(void)
{
    return "allocator_may_return_null=1";
}

const char *__tsan_default_options(void);
const char *__tsan_default_options(void)
{
    return "allocator_may_return_null=1";
}

START_TEST(scratch_reused_while_big_enough)
{
    uint8_t *p = scratch_get(SCRATCH_COW, 1000);
    ck_assert_ptr_nonnull(p);
    memset(p, 0xa5, 1000);
    /* Up to the first capacity (64 KiB) and back down: the same buffer. */
    ck_assert_ptr_eq(scratch_get(SCRATCH_COW, 65536), p);
    ck_assert_ptr_eq(scratch_get(SCRATCH_COW, 1), p);
    ck_assert_ptr_eq(scratch_get(SCRATCH_COW, 0), p);
    scratch_release_thread();
}
END_TEST

START_TEST(scratch_grows_and_never_shrinks)
{
    size_t big = (3u << 20) + 7;
    uint8_t *p = scratch_get(SCRATCH_COMPRESSED, big), *q;

    ck_assert_ptr_nonnull(p);
    memset(p, 0x5a, big);               /* all of it is usable */
    ck_assert_uint_eq(p[big - 1], 0x5a);
    q = scratch_get(SCRATCH_COMPRESSED, 100);
    ck_assert_ptr_eq(q, p);
    scratch_release_thread();
}
END_TEST

START_TEST(scratch_slots_are_apart)
{
    /* Every slot that holds bytes (SCRATCH_ZSTD_DCTX holds an object). */
    static const enum scratch_slot slots[] = {
        SCRATCH_REPLY, SCRATCH_COMPRESSED, SCRATCH_DECOMPRESSED, SCRATCH_COW,
        SCRATCH_COW_OLD, SCRATCH_INFLATE,
    };
    enum { N = sizeof(slots) / sizeof(slots[0]) };
    uint8_t *bufs[N];

    for (unsigned i = 0; i < N; i++) {
        bufs[i] = scratch_get(slots[i], 4096);
        ck_assert_ptr_nonnull(bufs[i]);
        memset(bufs[i], (int)i + 1, 4096);
    }
    for (unsigned i = 0; i < N; i++) {
        for (unsigned k = 0; k < 4096; k++)
            ck_assert_uint_eq(bufs[i][k], i + 1);
        for (unsigned j = i + 1; j < N; j++)
            ck_assert_ptr_ne(bufs[i], bufs[j]);
    }
    scratch_release_thread();
}
END_TEST

struct thread_buf {
    uint8_t *seen;
    int again_same;
};

static void *other_thread(void *arg)
{
    struct thread_buf *t = arg;

    t->seen = scratch_get(SCRATCH_REPLY, 8192);
    if (t->seen)
        memset(t->seen, 0x11, 8192);
    t->again_same = scratch_get(SCRATCH_REPLY, 8192) == t->seen;
    return NULL;                        /* the key's destructor frees it */
}

START_TEST(scratch_threads_have_their_own)
{
    uint8_t *mine = scratch_get(SCRATCH_REPLY, 8192);
    struct thread_buf t = { 0 };
    pthread_t th;

    ck_assert_ptr_nonnull(mine);
    memset(mine, 0x77, 8192);
    ck_assert_int_eq(pthread_create(&th, NULL, other_thread, &t), 0);
    ck_assert_int_eq(pthread_join(th, NULL), 0);
    ck_assert_ptr_nonnull(t.seen);
    ck_assert_ptr_ne(t.seen, mine);
    ck_assert_int_eq(t.again_same, 1);
    for (unsigned k = 0; k < 8192; k++)
        ck_assert_uint_eq(mine[k], 0x77);  /* the other thread's memset */
    ck_assert_ptr_eq(scratch_get(SCRATCH_REPLY, 8192), mine);
    scratch_release_thread();
}
END_TEST

START_TEST(scratch_failed_growth_keeps_the_buffer)
{
    uint8_t *p = scratch_get(SCRATCH_DECOMPRESSED, 4096);

    ck_assert_ptr_nonnull(p);
    ck_assert_ptr_null(scratch_get(SCRATCH_DECOMPRESSED, SIZE_MAX));
    ck_assert_ptr_null(scratch_get(SCRATCH_DECOMPRESSED, SIZE_MAX / 2 + 2));
    ck_assert_ptr_eq(scratch_get(SCRATCH_DECOMPRESSED, 4096), p);
    ck_assert_ptr_null(scratch_get(SCRATCH_SLOTS, 16));     /* no such slot */
    scratch_release_thread();
}
END_TEST

START_TEST(scratch_usable_after_release)
{
    uint8_t *p;

    scratch_release_thread();           /* nothing to release: fine */
    p = scratch_get(SCRATCH_INFLATE, 100);
    ck_assert_ptr_nonnull(p);
    scratch_release_thread();
    p = scratch_get(SCRATCH_INFLATE, 200000);
    ck_assert_ptr_nonnull(p);
    memset(p, 0, 200000);
    scratch_release_thread();
}
END_TEST

static int objects_made, objects_destroyed;
static int object_storage[4];

static void *make_object(void)
{
    return &object_storage[objects_made++ % 4];
}

static void destroy_object(void *p)
{
    ck_assert_ptr_nonnull(p);
    objects_destroyed++;
}

static void *object_thread(void *arg)
{
    *(void **)arg = scratch_object(SCRATCH_ZSTD_DCTX, make_object, destroy_object);
    return NULL;                        /* destroyed as the thread ends */
}

START_TEST(scratch_objects_made_once_per_thread)
{
    void *a, *b, *theirs = NULL;
    pthread_t th;

    objects_made = objects_destroyed = 0;
    a = scratch_object(SCRATCH_ZSTD_DCTX, make_object, destroy_object);
    b = scratch_object(SCRATCH_ZSTD_DCTX, make_object, destroy_object);
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_eq(a, b);
    ck_assert_int_eq(objects_made, 1);
    ck_assert_int_eq(pthread_create(&th, NULL, object_thread, &theirs), 0);
    ck_assert_int_eq(pthread_join(th, NULL), 0);
    ck_assert_ptr_nonnull(theirs);
    ck_assert_ptr_ne(theirs, a);
    ck_assert_int_eq(objects_made, 2);
    ck_assert_int_eq(objects_destroyed, 1);     /* the thread's, at its exit */
    scratch_release_thread();
    ck_assert_int_eq(objects_destroyed, 2);
    /* Made again after a release. */
    ck_assert_ptr_nonnull(scratch_object(SCRATCH_ZSTD_DCTX, make_object, destroy_object));
    ck_assert_int_eq(objects_made, 3);
    scratch_release_thread();
    ck_assert_int_eq(objects_destroyed, 3);
}
END_TEST

static Suite *scratch_suite(void)
{
    Suite *s = suite_create("scratch");
    TCase *tc = tcase_create("buffers");

    tcase_add_test(tc, scratch_reused_while_big_enough);
    tcase_add_test(tc, scratch_grows_and_never_shrinks);
    tcase_add_test(tc, scratch_slots_are_apart);
    tcase_add_test(tc, scratch_threads_have_their_own);
    tcase_add_test(tc, scratch_failed_growth_keeps_the_buffer);
    tcase_add_test(tc, scratch_usable_after_release);
    tcase_add_test(tc, scratch_objects_made_once_per_thread);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(scratch_suite());
}
