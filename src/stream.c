/*
 * stream — the background walk that copies a backing chain into the top
 * image, throttled and at lowest priority; see stream.h.  The copying
 * itself, and what makes it safe against guest writes, is image_fill's.
 */
#include "stream.h"

#include "image.h"
#include "log.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

/* Bytes of the disk walked per step: the stop flag, the guest's requests
 * and the rate are looked at between steps. */
#define STEP_MAX        (1u << 20)
#define STEP_MIN        (64u << 10)
/* While guest requests are in flight the stream waits in slices of
 * BACKOFF_NS; after BACKOFF_MAX_NS of continuous guest load it takes one
 * step anyway, so that it ends some day under a guest that never idles. */
#define BACKOFF_NS      (2 * 1000000ll)
#define BACKOFF_MAX_NS  (100 * 1000000ll)
/* The rate may catch up on at most this much time the stream spent
 * waiting for the guest: no burst at full speed after a long wait. */
#define RATE_CREDIT_NS  (1000 * 1000000ll)

struct stream {
    struct image *img;
    uint64_t rate;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    bool stop;                  /* under lock */
};

static int64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Sleep @ns unless stopped meanwhile.  Returns whether the stream is to
 * stop. */
static bool sleep_unless_stopped(struct stream *s, int64_t ns)
{
    struct timespec until;
    int64_t t = now_ns() + (ns > 0 ? ns : 0);
    bool stop;

    until.tv_sec = t / 1000000000;
    until.tv_nsec = t % 1000000000;
    pthread_mutex_lock(&s->lock);
    while (!s->stop && ns > 0 &&
           pthread_cond_timedwait(&s->wake, &s->lock, &until) != ETIMEDOUT)
        ;
    stop = s->stop;
    pthread_mutex_unlock(&s->lock);
    return stop;
}

/* Wait while the guest has requests in flight (at most BACKOFF_MAX_NS).
 * Returns whether the stream is to stop. */
static bool back_off(struct stream *s)
{
    int64_t waited = 0;

    while (image_guest_requests(s->img) > 0 && waited < BACKOFF_MAX_NS) {
        if (sleep_unless_stopped(s, BACKOFF_NS))
            return true;
        waited += BACKOFF_NS;
    }
    return sleep_unless_stopped(s, 0);
}

static uint64_t step_bytes(uint64_t rate)
{
    /* About eight steps a second under a rate, so it is kept smoothly. */
    uint64_t step = rate ? rate / 8 : STEP_MAX;

    return step < STEP_MIN ? STEP_MIN : step > STEP_MAX ? STEP_MAX : step;
}

/* Where the walk ends: past the chain's end the disk reads as zeros with
 * or without it, so there is nothing to fill (and a disk grown over a
 * small chain does not dilute the progress). */
static uint64_t walk_end(struct image *img, uint64_t chain_end)
{
    uint64_t size = image_size(img);

    return size < chain_end ? size : chain_end;
}

static void *stream_main(void *arg)
{
    struct stream *s = arg;
    struct image *img = s->img;
    uint64_t pos = 0, filled = 0, step = step_bytes(s->rate);
    int64_t start = now_ns(), rate_start = start;
    uint64_t cs = image_cluster_size(img);
    uint64_t chain_end = (image_chain_size(img) + cs - 1) / cs * cs;
    unsigned next_tenth = 1;
    char rate[48] = "unthrottled";
    bool stopped = false;
    int ret = 0;

    /* Lowest CPU priority too (this thread only: Linux nice is per
     * thread); refused, it only matters less. */
    (void)setpriority(PRIO_PROCESS, (id_t)gettid(), 19);
    if (s->rate)
        snprintf(rate, sizeof(rate), "at most %llu bytes/s", (unsigned long long)s->rate);

    log_info("stream: copying what the image lacks from its backing chain (%llu "
             "bytes to walk, %s)", (unsigned long long)walk_end(img, chain_end), rate);
    image_report_stream(img, IMAGE_STREAM_RUNNING, 0, walk_end(img, chain_end));
    while (pos < walk_end(img, chain_end)) {
        uint64_t size = walk_end(img, chain_end);
        uint64_t n = size - pos < step ? size - pos : step, got;

        if ((stopped = back_off(s)))
            break;
        ret = image_fill(img, pos, n, &got);
        if (ret < 0)
            break;
        pos += n;
        filled += got;
        image_report_stream(img, IMAGE_STREAM_RUNNING, pos, size);
        while (next_tenth < 10 && pos >= size / 10 * next_tenth) {
            /* Progress made durable now and then: a crash loses little. */
            if (filled)
                ret = image_flush_quiet(img);
            log_info("stream: %u%% walked, %llu bytes filled", next_tenth * 10,
                     (unsigned long long)filled);
            next_tenth++;
        }
        if (ret < 0)
            break;
        if (s->rate) {
            int64_t due = rate_start + (int64_t)((double)filled * 1e9 / (double)s->rate);
            int64_t now = now_ns();
            if (now - due > RATE_CREDIT_NS)
                rate_start += now - due - RATE_CREDIT_NS;
            else if (due > now && (stopped = sleep_unless_stopped(s, due - now)))
                break;
        }
    }
    if (ret < 0) {
        image_report_stream(img, IMAGE_STREAM_FAILED, pos, walk_end(img, chain_end));
        log_error("stream: stopped by an error at byte %llu: %s; the backing file "
                  "stays (the next mount with -o stream tries again)",
                  (unsigned long long)pos, strerror(-ret));
        return NULL;
    }
    if (stopped) {
        image_report_stream(img, IMAGE_STREAM_STOPPED, pos, walk_end(img, chain_end));
        log_info("stream: stopped at byte %llu of %llu by the unmount, %llu bytes "
                 "filled; the next mount with -o stream goes on", (unsigned long long)pos,
                 (unsigned long long)walk_end(img, chain_end), (unsigned long long)filled);
        return NULL;
    }
    ret = image_drop_backing(img);
    if (ret == -EBUSY) {
        image_report_stream(img, IMAGE_STREAM_DONE, pos, walk_end(img, chain_end));
        log_info("stream: done in %.1f s, %llu bytes filled; the backing file stays "
                 "(internal snapshots)", (double)(now_ns() - start) / 1e9,
                 (unsigned long long)filled);
        return NULL;
    }
    if (ret < 0) {
        image_report_stream(img, IMAGE_STREAM_FAILED, pos, walk_end(img, chain_end));
        return NULL;    /* logged */
    }
    image_report_stream(img, IMAGE_STREAM_DONE, pos, walk_end(img, chain_end));
    log_info("stream: done in %.1f s, %llu bytes filled; the backing file is dropped "
             "from the header and the chain closed",
             (double)(now_ns() - start) / 1e9, (unsigned long long)filled);
    return NULL;
}

int stream_start(struct image *img, const struct stream_options *opts,
                 struct stream **out)
{
    struct stream *s;
    pthread_condattr_t attr;
    int ret;

    *out = NULL;
    if (!image_has_backing(img)) {
        log_info("stream: nothing to stream: the image has no backing file");
        return 0;
    }
    s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->img = img;
    s->rate = opts->rate;
    pthread_mutex_init(&s->lock, NULL);
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&s->wake, &attr);
    pthread_condattr_destroy(&attr);
    ret = -pthread_create(&s->thread, NULL, stream_main, s);
    if (ret < 0) {
        log_error("stream: cannot start its thread: %s", strerror(-ret));
        pthread_cond_destroy(&s->wake);
        pthread_mutex_destroy(&s->lock);
        free(s);
        return ret;
    }
    *out = s;
    return 0;
}

void stream_stop(struct stream *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->lock);
    s->stop = true;
    pthread_cond_broadcast(&s->wake);
    pthread_mutex_unlock(&s->lock);
    pthread_join(s->thread, NULL);
    pthread_cond_destroy(&s->wake);
    pthread_mutex_destroy(&s->lock);
    free(s);
}
