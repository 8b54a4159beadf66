/*
 * snapdir — the mount's snapshots/ directory: one read-only file per
 * internal snapshot of the image, beside the disk file, each reading as
 * that snapshot's disk (qemu-img convert -l snapshot.name=NAME -O raw),
 * whatever is written to the disk meanwhile.
 *
 * A file is named by its snapshot's name.  A name that cannot be a file
 * name (empty, ".", "..", containing '/' or a NUL byte, over 255 bytes) or
 * that an earlier snapshot in the table already took is shown as "id-ID"
 * (the snapshot's ID) or, when that is no file name or taken too,
 * "entry-N" (its position in the snapshot table, from 0; "~2", "~3"...
 * appended while taken); each such renaming is logged.  A snapshot whose
 * table entry cannot be viewed (see image_snapshot_view_size) gets no file,
 * also logged; the disk file is unaffected.
 *
 * Nothing of a snapshot is opened at mount: its view (image.h,
 * image_snapshot_view_open) is opened on the first read or seek of its
 * file, so the mount of an image with hundreds of snapshots costs one read
 * of the snapshot table.  Views stay open until unmount.
 *
 * Locking rule: the file operations may run concurrently (see vfs.h); a
 * view is opened once under a per-file mutex.
 */
#ifndef QCOW2FUSE_SNAPDIR_H
#define QCOW2FUSE_SNAPDIR_H

#include <stdint.h>
#include <sys/types.h>

struct image;
struct vfs;

#define SNAPDIR_NAME "snapshots"

enum snapdir_show {
    SNAPDIR_AUTO,       /* when the image has internal snapshots (default) */
    SNAPDIR_ALWAYS,     /* -o snapshots: also empty */
    SNAPDIR_NEVER,      /* -o nosnapshots */
};

/*
 * Add snapshots/ and its files to @vfs (whose root holds the disk of
 * @img), files with permission bits @mode.
 * On exit: the nodes hold views of @img until they are released
 * (vfs_free), which must come before image_close(@img).
 * Returns: 0 (also when nothing was added: a refused snapshot table, or the
 * name taken by the disk file, are logged), or -ENOMEM.
 */
int snapdir_add(struct vfs *vfs, struct image *img, enum snapdir_show show, mode_t mode);

#endif
