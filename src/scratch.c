/*
 * scratch — per-thread reusable buffers (see scratch.h).
 *
 * Why owned buffers rather than malloc and free per request: a malloc of a
 * cluster-sized or 1 MiB buffer is cheap only while the allocator's
 * heuristics hold.  glibc keeps a freed large chunk in the thread's arena
 * once its dynamic mmap threshold has risen, but a fixed M_MMAP_THRESHOLD,
 * a trimmed arena or another allocator turns every request into an mmap,
 * a page fault per page and a munmap.  Owning the buffers makes it one
 * allocation per thread and slot whatever the allocator does.
 */
#include "scratch.h"

#include <assert.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

struct scratch_buf {
    void *mem;
    size_t cap;
    void (*destroy)(void *);    /* an object's slot: how to free it */
};

/* The smallest buffer: requests of a few KiB do not regrow it. */
#define SCRATCH_MIN     (64u << 10)

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_err;

/* The key's destructor: @p is the exiting thread's array of slots. */
static void scratch_free_bufs(void *p)
{
    struct scratch_buf *bufs = p;

    for (unsigned i = 0; i < SCRATCH_SLOTS; i++) {
        if (bufs[i].destroy)
            bufs[i].destroy(bufs[i].mem);
        else
            free(bufs[i].mem);
    }
    free(bufs);
}

static void scratch_key_create(void)
{
    scratch_key_err = pthread_key_create(&scratch_key, scratch_free_bufs);
}

/* The calling thread's slot @slot, made on first use; NULL if it cannot be. */
static struct scratch_buf *thread_slot(enum scratch_slot slot)
{
    struct scratch_buf *bufs;

    pthread_once(&scratch_once, scratch_key_create);
    if (scratch_key_err || (unsigned)slot >= SCRATCH_SLOTS)
        return NULL;
    bufs = pthread_getspecific(scratch_key);
    if (!bufs) {
        bufs = calloc(SCRATCH_SLOTS, sizeof(*bufs));
        if (!bufs)
            return NULL;
        if (pthread_setspecific(scratch_key, bufs) != 0) {
            free(bufs);
            return NULL;
        }
    }
    return &bufs[slot];
}

void *scratch_get(enum scratch_slot slot, size_t size)
{
    struct scratch_buf *b = thread_slot(slot);
    size_t cap;
    void *mem;

    if (!b)
        return NULL;
    assert(!b->destroy);                /* an object's slot */
    if (b->cap >= size)
        return b->mem;
    /* Powers of two: a run of growing requests reallocates a few times
     * only.  No realloc: the old contents need not be kept. */
    cap = SCRATCH_MIN;
    while (cap < size && cap <= SIZE_MAX / 2)
        cap *= 2;
    if (cap < size)
        cap = size;
    mem = malloc(cap);
    if (!mem)
        return NULL;
    free(b->mem);
    b->mem = mem;
    b->cap = cap;
    return mem;
}

void *scratch_object(enum scratch_slot slot, void *(*create)(void),
                     void (*destroy)(void *))
{
    struct scratch_buf *b = thread_slot(slot);

    if (!b)
        return NULL;
    assert(!b->mem || b->destroy == destroy);   /* one kind per slot */
    if (!b->mem) {
        b->mem = create();
        b->destroy = b->mem ? destroy : NULL;
    }
    return b->mem;
}

void scratch_release_thread(void)
{
    struct scratch_buf *bufs;

    pthread_once(&scratch_once, scratch_key_create);
    if (scratch_key_err)
        return;
    bufs = pthread_getspecific(scratch_key);
    if (bufs) {
        pthread_setspecific(scratch_key, NULL);
        scratch_free_bufs(bufs);
    }
}
