/*
 * vfs — the tree a mount shows, whatever carries its requests: a root
 * directory holding the disk file, and the nodes other modules add beside
 * it (files that are windows on the disk, read-only views of the image,
 * subdirectories).  Every operation returns 0 or -errno; turning that into
 * a reply is the transport's job (the FUSE boundary), and only its.
 *
 * Inode 1 is the root directory, inode 2 the disk file.  Inode numbers are
 * never reused: a node that is removed (a partition that moved, say) leaves
 * a hole, and requests naming it get -ESTALE, also through file handles
 * opened before the removal.
 *
 * Locking rule: every function may be called from several threads at once.
 * One rwlock guards the node table: held shared to find a node and take a
 * reference, exclusively by vfs_add_* and vfs_remove.  File operations run
 * outside it on that reference, so a node's provider may be called
 * concurrently with itself and while nodes are added or removed; its
 * release hook runs once, after the node is removed and its last
 * in-flight request has returned.
 */
#ifndef QCOW2FUSE_VFS_H
#define QCOW2FUSE_VFS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/types.h>

struct image;
struct vfs;

#define VFS_ROOT_INO    1
#define VFS_DISK_INO    2

/*
 * What a file node does.  @priv is the pointer given to vfs_add_file.
 * Ranges passed in are inside the file: vfs clamps reads and writes at the
 * size and refuses what starts past it, before calling.
 */
struct vfs_file_ops {
    uint64_t (*size)(void *priv);
    bool (*read_only)(void *priv);
    /* Fill all @len bytes.  Returns 0 or -errno. */
    int (*read)(void *priv, void *buf, size_t len, uint64_t off);
    /* The rest may be NULL: writes, flush, zero and preallocate then fail
     * with -EROFS (flush succeeds), seek finds all data, resize -EPERM. */
    int (*write)(void *priv, const void *buf, size_t len, uint64_t off);
    int (*flush)(void *priv);
    int (*zero)(void *priv, uint64_t off, uint64_t len, bool punch);
    int (*preallocate)(void *priv, uint64_t off, uint64_t len);
    /* Next data (@data) or hole at or after @off, which is < size.
     * Returns 0, -ENXIO when no data follows. */
    int (*seek)(void *priv, uint64_t off, bool data, uint64_t *result);
    int (*resize)(void *priv, uint64_t new_size);
    /* One line of counters for the user.qcow2fuse.stats xattr. */
    void (*stats)(void *priv, char *buf, size_t len);
    /* The node is gone and no request uses it any more. */
    void (*release)(void *priv);
};

/* The disk file's provider, over an open image (@priv is the image). */
extern const struct vfs_file_ops vfs_image_file_ops;

struct vfs_config {
    const char *disk_name;      /* the disk file's name, e.g. "disk" */
    uid_t uid;                  /* owner of every node */
    gid_t gid;
    mode_t disk_mode;           /* permission bits of the disk file */
    bool direct_io;             /* open files with FOPEN_DIRECT_IO */
};

/*
 * A tree holding the root directory and the disk file over @img (not
 * owned).
 * Returns: 0 or -ENOMEM; *out is the tree.
 */
int vfs_new(struct image *img, const struct vfs_config *cfg, struct vfs **out);

/*
 * On entry: no request is in flight and none will come.
 * On exit: every node is released and @vfs freed.
 */
void vfs_free(struct vfs *vfs);

/*
 * Add a file or directory named @name under the directory @parent.
 * On exit: *ino is the new node's inode number.
 * Returns: 0, -EEXIST (the name is taken), -ENOTDIR, -ENOENT (no
 * @parent), -EINVAL (a name that is empty, too long or has a '/'),
 * -ENOMEM.  On failure @ops->release is not called.
 */
int vfs_add_file(struct vfs *vfs, uint64_t parent, const char *name, mode_t mode,
                 const struct vfs_file_ops *ops, void *priv, uint64_t *ino);
int vfs_add_dir(struct vfs *vfs, uint64_t parent, const char *name, uint64_t *ino);

/*
 * Remove node @ino and, for a directory, everything under it.
 * On exit: lookups no longer find it; requests that name it get -ESTALE;
 * its release hook runs when its last in-flight request returns.
 * Returns: 0, -ENOENT, -EPERM for the root and the disk file.
 */
int vfs_remove(struct vfs *vfs, uint64_t ino);

/*
 * Call @fn after every successful write or zeroing of file @ino with the
 * range it changed, and after a resize with the range between the old and
 * the new size (one watcher per node; NULL removes it).  It runs in
 * the request's thread before the reply, outside the node table lock, so
 * it may add and remove nodes.
 * Returns: 0, -ENOENT, -EISDIR.
 */
typedef void (*vfs_write_watch_fn)(void *arg, uint64_t off, uint64_t len);
int vfs_watch_writes(struct vfs *vfs, uint64_t ino, vfs_write_watch_fn fn, void *arg);

/* ---- Requests, one function per operation the transports serve ---- */

/* Attributes of @ino: st_ino, st_mode, st_nlink, st_size, st_blocks,
 * st_blksize, owner and times.  Returns 0, -ESTALE. */
int vfs_getattr(struct vfs *vfs, uint64_t ino, struct stat *st);

/* Returns 0 with *st the child's attributes, -ENOENT, -ENOTDIR, -ESTALE. */
int vfs_lookup(struct vfs *vfs, uint64_t parent, const char *name, struct stat *st);

/*
 * Directory entries of @ino from position @pos (0 for the start): "."
 * and ".." first, then the children in the order they were added.  @fill
 * is called once per entry with the position that follows it, and stops
 * the walk by returning non-zero (the reply is full).
 * Returns: 0, -ENOTDIR, -ESTALE.
 */
typedef int (*vfs_fill_fn)(void *arg, const char *name, const struct stat *st,
                           uint64_t next_pos);
int vfs_readdir(struct vfs *vfs, uint64_t ino, uint64_t pos, vfs_fill_fn fill, void *arg);

struct vfs_open_info {
    bool direct_io;
    bool keep_cache;
};
/* @flags: the open(2) flags.  Returns 0, -EISDIR, -EROFS, -ESTALE. */
int vfs_open(struct vfs *vfs, uint64_t ino, int flags, struct vfs_open_info *info);

/*
 * Read up to @size bytes at @off into @buf; *len is how many (short only
 * at the end of the file, 0 at or past it).
 * Returns: 0, -EINVAL, -EISDIR, -ESTALE, -EIO, -errno.
 */
int vfs_read(struct vfs *vfs, uint64_t ino, void *buf, size_t size, uint64_t off,
             size_t *len);

/*
 * Write @size bytes; the part past the end of the file is not written (a
 * disk does not grow by writing, only by truncate) and *len says how much
 * was.  Returns: 0, -ENOSPC (starting at or past the end), -EROFS, ...
 */
int vfs_write(struct vfs *vfs, uint64_t ino, const void *buf, size_t size,
              uint64_t off, size_t *len);

/* fsync and fdatasync alike: the L2 update is what makes data reachable. */
int vfs_fsync(struct vfs *vfs, uint64_t ino);

/* fallocate(2): mode 0, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE[|KEEP_SIZE].
 * Returns 0, -EINVAL, -EOPNOTSUPP (other modes, growing the file), ... */
int vfs_fallocate(struct vfs *vfs, uint64_t ino, int mode, uint64_t off, uint64_t len);

#define VFS_SET_SIZE    (1u << 0)
#define VFS_SET_OWNER   (1u << 1)       /* mode, uid or gid: refused */
#define VFS_SET_TIMES   (1u << 2)       /* accepted, not stored */
/* Returns 0 with *st the attributes after the change, -EPERM, -EISDIR, ... */
int vfs_setattr(struct vfs *vfs, uint64_t ino, unsigned to_set, uint64_t size,
                struct stat *st);

/*
 * Extended attributes, with getxattr(2)'s size rule: @size 0 asks for the
 * length (*len), a @buf too small gives -ERANGE.
 * Returns: 0, -ENODATA, -ERANGE, -ESTALE.
 */
int vfs_getxattr(struct vfs *vfs, uint64_t ino, const char *name, void *buf,
                 size_t size, size_t *len);
int vfs_listxattr(struct vfs *vfs, uint64_t ino, void *buf, size_t size, size_t *len);

/* SEEK_DATA / SEEK_HOLE.  Returns 0, -EINVAL (other whence), -ENXIO. */
int vfs_lseek(struct vfs *vfs, uint64_t ino, uint64_t off, int whence, uint64_t *result);

int vfs_statfs(struct vfs *vfs, struct statvfs *sv);

#endif
