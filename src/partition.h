/*
 * partition — the partition table on the disk (MBR with its extended
 * chain of logical partitions, or GPT behind a protective MBR), and the
 * files disk-p1, disk-p2, ... that show each partition beside the disk
 * (-o partitions).
 *
 * The parser reads through a callback, so that it can run over memory in
 * the unit tests as well as over the image.  Everything in a table is
 * untrusted: each field is checked before use, each problem logged once
 * per reading, naming the field and its byte offset on the disk, and a bad
 * entry costs that entry only (a bad table: all of it), never the disk.
 *
 * Numbers are those Linux gives: MBR primaries 1-4 by slot, logical
 * partitions from 5 in chain order; GPT entry index + 1.  A number whose
 * entry is dropped stays unused, so the others keep Linux's numbers.
 * Sectors are 512 bytes (a GPT written for 4096-byte sectors is not read).
 *
 * Dropped: entries past the end of the disk; entries that overlap an
 * earlier kept one (the earlier one, in number order, stays); entries that
 * cover a sector the table was read from (MBR, EBRs, GPT headers and
 * arrays), so that no partition file can change the table; for GPT,
 * entries outside the header's usable range.  The extended partition
 * itself gets no file (Linux shows a 1 KiB stub for it).
 */
#ifndef QCOW2FUSE_PARTITION_H
#define QCOW2FUSE_PARTITION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct image;
struct vfs;

#define PARTITION_SECTOR        512u
#define PARTITION_MAX           256u    /* files; higher numbers are ignored */
#define PARTITION_MAX_EBRS      128u    /* EBRs followed, over all chains */
#define PARTITION_GPT_MAX_ENTRIES   4096u
#define PARTITION_GPT_MAX_ENTRY_SIZE 4096u
#define PARTITION_GPT_MAX_ARRAY (1u << 20)  /* bytes of one entry array */
/* MBR, every EBR, two GPT headers and two entry arrays. */
#define PARTITION_MAX_READS     (1u + PARTITION_MAX_EBRS + 4u)

enum partition_scheme {
    PARTITION_NONE,             /* no table, or none that could be used */
    PARTITION_MBR,
    PARTITION_GPT,
};

struct partition {
    unsigned number;            /* as Linux numbers it */
    uint64_t start;             /* bytes from the start of the disk */
    uint64_t length;            /* bytes, > 0 */
};

/* A byte range of the disk. */
struct partition_range {
    uint64_t off;
    uint64_t len;
};

struct partition_table {
    enum partition_scheme scheme;
    bool gpt_backup;            /* GPT: read from the backup header */
    uint64_t disk_size;         /* the size the table was read against */
    unsigned count;             /* partitions kept, in number order */
    struct partition part[PARTITION_MAX];
    unsigned n_read;            /* every range the parser read */
    struct partition_range read[PARTITION_MAX_READS];
    unsigned problems;          /* problems logged (a bad table, entry, chain) */
};

/* Fill all @len bytes at @off of the disk.  Returns 0 or -errno. */
typedef int (*partition_read_fn)(void *arg, void *buf, size_t len, uint64_t off);

/*
 * Read the partition table of a disk of @disk_size bytes through @read.
 * On exit: *t holds the partitions that are sound (none when there is no
 * table or it is unusable, which is no error) and every range read: the
 * table is a function of those bytes and @disk_size alone.
 * Returns: 0, -ENOMEM, or the -errno of a failed read (logged); *t is then
 * a table with no partitions.
 */
int partition_table_read(partition_read_fn read, void *arg, uint64_t disk_size,
                         struct partition_table *t);

/* ---- The partition files of a mount ---- */

struct partition_set;

/*
 * Read the table of the disk of @img, add a file named DISK-pN (@disk_name,
 * "-p", number) beside the disk for each partition, with permission bits
 * @mode (read-only when the image is), and watch the disk file so that a
 * write over the table, or a resize, reads it again: partitions whose start
 * and length are unchanged keep their file and inode; the others' files are
 * removed (handles open on them get ESTALE) and new ones added.
 * A table that cannot be read is logged and leaves the disk alone.
 * Returns: 0 or -ENOMEM; *out is freed with partition_set_free.
 */
int partition_set_new(struct vfs *vfs, struct image *img, const char *disk_name,
                      mode_t mode, struct partition_set **out);

/*
 * Stop watching the disk and free @ps.
 * On entry: no request is in flight and none will come; the vfs given to
 * partition_set_new still exists (its partition files stay in it: they do
 * not refer to the set).
 */
void partition_set_free(struct partition_set *ps);

#endif
