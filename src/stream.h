/*
 * stream — the background copy of a whole backing chain into the top image
 * (-o stream[=RATE]): a thread walks the virtual disk with image_fill(),
 * lowest priority (it waits while guest requests are in flight, and RATE
 * caps the bytes it fills per second), reports its progress in the
 * statistics line and the log, and once the whole disk is local drops the
 * backing file (image_drop_backing).  The cluster map is its state: what is
 * still unallocated is still to do, so a stream interrupted by an unmount,
 * a kill or a power cut resumes at the next mount, skipping what is local
 * at lookup speed.
 */
#ifndef QCOW2FUSE_STREAM_H
#define QCOW2FUSE_STREAM_H

#include <stdint.h>

struct image;
struct stream;

struct stream_options {
    uint64_t rate;              /* bytes per second; 0: as fast as it goes */
};

/*
 * Start streaming the backing chain of @img into it.
 * On exit: *out is the running stream, or NULL when there is nothing to
 *          stream (no backing file: logged).
 * Returns: 0, or -errno (the thread could not start: logged).
 */
int stream_start(struct image *img, const struct stream_options *opts,
                 struct stream **out);

/*
 * Stop the stream (at its next step: within one span of I/O or one sleep)
 * and wait for its thread; free it.  What it filled stays; @s may be NULL.
 */
void stream_stop(struct stream *s);

#endif
