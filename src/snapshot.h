/*
 * snapshot — the internal snapshot table: decoding and validating its
 * entries, and finding a snapshot by name or ID.  Pure decoding over bytes
 * read through io; every length and offset is bounded before use.
 */
#ifndef QCOW2FUSE_SNAPSHOT_H
#define QCOW2FUSE_SNAPSHOT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct io;
struct qcow2_header;

#define SNAPSHOT_MAX_TABLE  (64u << 20)

struct snapshot {
    uint64_t l1_offset;
    uint32_t l1_size;
    char *id;
    char *name;
    uint16_t id_len, name_len;  /* bytes in the entry (they may hold NULs) */
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t vm_state_size;
    uint64_t disk_size;         /* 0 when the entry does not record it */
    bool has_disk_size;         /* the entry has the field (extra >= 16) */
    uint32_t index;             /* position in the table */
    uint64_t entry_offset;      /* where the entry starts in the file */
};

struct snapshot_table {
    struct snapshot *s;
    uint32_t nb;
    uint64_t offset;            /* where the table lives */
    uint64_t bytes;             /* its length */
};

/*
 * Read and validate the snapshot table of the image whose header is @h.
 * On exit: *t owns its entries (snapshot_table_free); on failure @err names
 * the entry and field.
 * Returns: 0, -EINVAL (invalid table), -ENOMEM, -errno.
 */
int snapshot_table_read(struct io *io, const struct qcow2_header *h,
                        struct snapshot_table *t, char *err, size_t err_len);
void snapshot_table_free(struct snapshot_table *t);

/*
 * Before a snapshot's view is shown (mounted, or listed): its recorded disk
 * size must be one a disk can have under header @h: not negative as a
 * signed value, a multiple of 512, not above the cap header_decode puts on
 * the virtual size.  The table reader leaves this to the viewers, as a
 * writable mount of the active state does not depend on it (nor does
 * QEMU's).
 * Returns: 0, or -EINVAL with @err naming the snapshot, field and offset.
 */
int snapshot_check_view(const struct qcow2_header *h, const struct snapshot *s,
                        char *err, size_t err_len);

/* The size of snapshot @s's disk: its recorded disk_size, or for an entry
 * that records none (or 0) @current, the size of the active disk, as QEMU
 * restores it. */
static inline uint64_t snapshot_disk_size(const struct snapshot *s, uint64_t current)
{
    return s->disk_size ? s->disk_size : current;
}

/* @len bytes of @s (a name or ID) for a message: at most 64, each byte
 * that is not printable ASCII (a NUL too) as '?'. */
void snapshot_printable(char *out, size_t out_len, const char *s, size_t len);

/* The snapshot whose name, or failing that ID, is @key; NULL if none. */
const struct snapshot *snapshot_find(const struct snapshot_table *t, const char *key);

#endif
