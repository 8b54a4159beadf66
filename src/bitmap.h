/*
 * bitmap — the persistent dirty bitmaps of a qcow2 image (the bitmaps
 * extension, autoclear bit 0; qcow2.txt "Bitmaps"), kept as QEMU keeps
 * them instead of dropped:
 *
 *   open     the extension, the bitmap directory and every bitmap table
 *            are decoded and validated; bad data takes meta_corrupt(),
 *            naming the field and its offset.  What is valid but unknown
 *            to us (a type other than dirty tracking, flag bits other than
 *            in_use and auto, extra data, granularities QEMU does not
 *            take) refuses the writable open, as QEMU refuses it.  Each
 *            enabled bitmap (auto flag) not marked in_use is loaded.
 *   prepare  before the first change of the disk, the loaded bitmaps are
 *            marked in_use in the directory, durably, and autoclear bit 0
 *            stays set.
 *   mark     every range the disk changes (written, zeroed, discarded,
 *            allocated by preallocation) sets its bits, at each bitmap's
 *            granularity.
 *   store    on a clean close each changed bitmap gets new data clusters
 *            and a new table, the directory is rewritten in place with
 *            in_use clear, and the old clusters are freed after that is
 *            durable (deferred frees, invariant 4 of image_flush.c).
 *
 * Left as they are: disabled bitmaps (no auto flag), and bitmaps already
 * in_use at open: QEMU takes those as inconsistent, never updates or
 * stores them and leaves the flag set, and so do we (with a warning).  A
 * crash leaves the loaded bitmaps in_use, which QEMU then reads as
 * inconsistent.  Read-only images never look at the bitmaps.
 *
 * Locking: bitmap_mark may be called from any thread (it has its own
 * lock); everything else with the image's metadata lock held.
 */
#ifndef QCOW2FUSE_BITMAP_H
#define QCOW2FUSE_BITMAP_H

#include <stdbool.h>
#include <stdint.h>

struct meta;
struct qcow2_header;
struct refcount;
struct bitmaps;

/* Limits (QEMU's; the spec allows more of some). */
#define BITMAP_MAX_BITMAPS          65535u
#define BITMAP_MAX_DIR_BYTES        (1024u * BITMAP_MAX_BITMAPS)
#define BITMAP_MAX_TABLE_ENTRIES    0x8000000u
#define BITMAP_MAX_DATA_BYTES       0x20000000u    /* one bitmap's data */
#define BITMAP_MAX_NAME             1023u
#define BITMAP_MIN_GRANULARITY_BITS 9u
#define BITMAP_MAX_GRANULARITY_BITS 31u
/* All loaded bitmaps together, in memory. */
#define BITMAP_MAX_MEMORY           (512ull << 20)

/* Directory entry flags. */
#define BITMAP_FLAG_IN_USE          (1u << 0)
#define BITMAP_FLAG_AUTO            (1u << 1)
#define BITMAP_FLAG_EXTRA_DATA_COMPATIBLE (1u << 2)
#define BITMAP_TYPE_DIRTY_TRACKING  1u

/*
 * Decode and validate the bitmaps of the image @h describes, on @m->io,
 * for a writable open (@path names the image in messages and must outlive
 * the bitmaps).  The clusters of the directory and of every
 * bitmap's table and data are recorded in @m's overlap set
 * (META_KIND_BITMAPS) when it has one.
 * On exit:  *out is NULL when the image has no bitmaps to keep (no
 *           extension, or autoclear bit 0 clear: then they are stale and
 *           the bit is dropped as before); else the bitmaps, enabled ones
 *           loaded.
 * Returns:  0; -EIO for invalid data (reported through meta_corrupt());
 *           -ENOTSUP for bitmaps we may not update (logged, naming the
 *           bitmap, the field and what to do); -ENOMEM; -errno of a read.
 */
int bitmap_open(struct meta *m, const struct qcow2_header *h, const char *path,
                struct bitmaps **out);

/* Free @b (NULL allowed); writes nothing. */
void bitmap_close(struct bitmaps *b);

/* How many bitmaps the directory holds (0 for NULL). */
unsigned bitmap_count(const struct bitmaps *b);

/*
 * Before the first change of the disk: mark the loaded bitmaps in_use in
 * the directory and flush, so that no change can reach the disk while the
 * directory says the bitmaps are complete.  Idempotent.
 * Returns: 0 or -errno (nothing changes on the disk then).
 */
int bitmap_prepare_write(struct bitmaps *b);

/* Record that guest bytes [@offset, +@len) changed: set their bits in
 * every loaded bitmap.  @b may be NULL. */
void bitmap_mark(struct bitmaps *b, uint64_t offset, uint64_t len);

/*
 * On a clean close, after everything else is durable: write each changed
 * bitmap into new clusters from @rc, then the directory with in_use clear
 * (in place: its size does not change), flush; the old data and table
 * clusters are queued as deferred frees for the caller's next flush.
 * Changed bitmaps are stored even when no in-use mark was written (their
 * only changes left the disk as it was): a crash in between loses nothing.
 * On exit: on failure the bitmaps stay in_use on disk (QEMU then takes
 *          them as inconsistent) and what this call allocated is given
 *          back.  On an image marked corrupt nothing is written (logged).
 * Returns: 0 or -errno.
 */
int bitmap_store(struct bitmaps *b, struct refcount *rc);

/* Bits of bitmap @i (in directory order) as loaded and marked, for tests:
 * NULL when bitmap @i is not loaded; *bytes is the length of the data. */
const uint8_t *bitmap_bits(const struct bitmaps *b, unsigned i, uint64_t *bytes);

#endif
