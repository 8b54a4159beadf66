/*
 * scratch — per-thread reusable buffers for the data path, so that a
 * request allocates nothing in steady state.  Each thread owns one buffer
 * per slot, grown to the largest size asked for and never shrunk, freed
 * when the thread exits or is cancelled (a pthread key's destructor:
 * libfuse ends surplus idle workers, and cancels the rest at unmount) or
 * when it calls scratch_release_thread().  A leaf: it knows no other
 * module.  The cost: up to one buffer per slot per thread stays allocated
 * (a cluster, or a 1 MiB reply) while the thread lives.
 *
 * A slot is one buffer per thread, so two users whose buffers are live at
 * the same time in one thread (one calls the other, or a function calls
 * itself) need two slots: the enum lists each use and the rule of its
 * nesting is on the user's side.
 */
#ifndef QCOW2FUSE_SCRATCH_H
#define QCOW2FUSE_SCRATCH_H

#include <stddef.h>

enum scratch_slot {
    SCRATCH_REPLY,          /* fuse_server: a reply's payload, when the
                             * transport has no buffer for it */
    SCRATCH_COMPRESSED,     /* image_read: a compressed cluster's bytes */
    SCRATCH_DECOMPRESSED,   /* image_read: its decompressed cluster, when
                             * the caller wants part of it only */
    SCRATCH_COW,            /* image_write: the cluster a partial write
                             * builds ... */
    SCRATCH_COW_OLD,        /* ... and the old cluster decompressed */
    SCRATCH_INFLATE,        /* compress: zlib's inflate state and window */
    SCRATCH_ZSTD_DCTX,      /* compress: a zstd decoding context (object) */
    SCRATCH_SLOTS
};

/*
 * On exit: the calling thread's buffer of @slot holds at least @size bytes;
 * what it held before is gone (no copy is made when it grows).
 * Returns: the buffer, valid until the next scratch_get of @slot or
 * scratch_release_thread() in this thread; NULL when out of memory.
 */
void *scratch_get(enum scratch_slot slot, size_t size);

/*
 * The same for an object rather than bytes (a codec's context): the
 * calling thread's object of @slot, made by @create on its first use in the
 * thread and handed to @destroy when the thread's buffers go.  A slot holds
 * either buffers or objects, one kind per slot (see the enum).
 * Returns: the object, or NULL when @create failed.
 */
void *scratch_object(enum scratch_slot slot, void *(*create)(void),
                     void (*destroy)(void *));

/* Free the calling thread's buffers now (the thread that runs a
 * single-threaded loop and returns, rather than exiting). */
void scratch_release_thread(void);

#endif
