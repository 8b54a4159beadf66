/*
 * vfs — the node table behind the mount's directory tree, and the checks
 * every request passes (bounds, read-only, node type) before a node's
 * provider is called.  Transport-independent: see vfs.h.
 */
#include "vfs.h"

#include "image.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define VFS_NAME_MAX    255
#define STATS_XATTR     "user.qcow2fuse.stats"

struct vfs_node {
    uint64_t ino;
    uint64_t parent;
    char *name;
    bool is_dir;
    mode_t mode;                        /* permission bits */
    const struct vfs_file_ops *ops;     /* files only */
    void *priv;
    vfs_write_watch_fn watch;
    void *watch_arg;
    atomic_uint refs;                   /* the table's one + requests' */
};

struct vfs {
    pthread_rwlock_t lock;
    struct vfs_node **nodes;    /* by inode number; NULL: removed or unused */
    uint64_t n_nodes;           /* next inode number */
    uint64_t cap;
    struct vfs_config cfg;
    char *disk_name;
    struct timespec mount_time;
};

/* ---- Image provider ---- */

static uint64_t image_file_size(void *priv)
{
    return image_size(priv);
}

static bool image_file_read_only(void *priv)
{
    return image_is_read_only(priv);
}

static int image_file_read(void *priv, void *buf, size_t len, uint64_t off)
{
    return image_read(priv, buf, len, off);
}

static int image_file_write(void *priv, const void *buf, size_t len, uint64_t off)
{
    return image_write(priv, buf, len, off);
}

static int image_file_flush(void *priv)
{
    return image_flush(priv);
}

static int image_file_zero(void *priv, uint64_t off, uint64_t len, bool punch)
{
    return image_zero(priv, off, len, punch);
}

static int image_file_preallocate(void *priv, uint64_t off, uint64_t len)
{
    return image_preallocate(priv, off, len);
}

static int image_file_seek(void *priv, uint64_t off, bool data, uint64_t *result)
{
    return image_seek(priv, off, data, result);
}

static int image_file_resize(void *priv, uint64_t new_size)
{
    return image_resize(priv, new_size);
}

static void image_file_stats(void *priv, char *buf, size_t len)
{
    image_stats(priv, buf, len);
}

const struct vfs_file_ops vfs_image_file_ops = {
    .size = image_file_size,
    .read_only = image_file_read_only,
    .read = image_file_read,
    .write = image_file_write,
    .flush = image_file_flush,
    .zero = image_file_zero,
    .preallocate = image_file_preallocate,
    .seek = image_file_seek,
    .resize = image_file_resize,
    .stats = image_file_stats,
};

/* ---- The node table ---- */

static void node_put(struct vfs_node *n)
{
    if (atomic_fetch_sub(&n->refs, 1) != 1)
        return;
    if (n->ops && n->ops->release)
        n->ops->release(n->priv);
    free(n->name);
    free(n);
}

/* Returns: node @ino with a reference taken, or NULL (-ESTALE). */
static struct vfs_node *node_get(struct vfs *vfs, uint64_t ino)
{
    struct vfs_node *n = NULL;

    pthread_rwlock_rdlock(&vfs->lock);
    if (ino < vfs->n_nodes && vfs->nodes[ino]) {
        n = vfs->nodes[ino];
        atomic_fetch_add(&n->refs, 1);
    }
    pthread_rwlock_unlock(&vfs->lock);
    return n;
}

static bool valid_name(const char *name)
{
    size_t len = strlen(name);

    return len > 0 && len <= VFS_NAME_MAX && !strchr(name, '/') &&
           strcmp(name, ".") != 0 && strcmp(name, "..") != 0;
}

/* On entry: the table lock is held (either way). */
static struct vfs_node *child_locked(struct vfs *vfs, uint64_t parent, const char *name)
{
    for (uint64_t i = 1; i < vfs->n_nodes; i++) {
        struct vfs_node *n = vfs->nodes[i];
        if (n && n->ino != VFS_ROOT_INO && n->parent == parent &&
            strcmp(n->name, name) == 0)
            return n;
    }
    return NULL;
}

static int add_node(struct vfs *vfs, uint64_t parent, const char *name, bool is_dir,
                    mode_t mode, const struct vfs_file_ops *ops, void *priv,
                    uint64_t *ino)
{
    struct vfs_node *n = NULL;
    int ret;

    if (!valid_name(name))
        return -EINVAL;
    pthread_rwlock_wrlock(&vfs->lock);
    if (parent >= vfs->n_nodes || !vfs->nodes[parent]) {
        ret = -ENOENT;
        goto fail;
    }
    if (!vfs->nodes[parent]->is_dir) {
        ret = -ENOTDIR;
        goto fail;
    }
    if (child_locked(vfs, parent, name)) {
        ret = -EEXIST;
        goto fail;
    }
    if (vfs->n_nodes == vfs->cap) {
        uint64_t cap = vfs->cap ? vfs->cap * 2 : 16;
        struct vfs_node **nodes = realloc(vfs->nodes, cap * sizeof(*nodes));
        if (!nodes) {
            ret = -ENOMEM;
            goto fail;
        }
        vfs->nodes = nodes;
        vfs->cap = cap;
    }
    n = calloc(1, sizeof(*n));
    if (!n || !(n->name = strdup(name))) {
        free(n);
        ret = -ENOMEM;
        goto fail;
    }
    n->ino = vfs->n_nodes;
    n->parent = parent;
    n->is_dir = is_dir;
    n->mode = mode & 07777;
    n->ops = ops;
    n->priv = priv;
    atomic_init(&n->refs, 1);
    vfs->nodes[vfs->n_nodes++] = n;
    if (ino)
        *ino = n->ino;
    ret = 0;
fail:
    pthread_rwlock_unlock(&vfs->lock);
    return ret;
}

int vfs_add_file(struct vfs *vfs, uint64_t parent, const char *name, mode_t mode,
                 const struct vfs_file_ops *ops, void *priv, uint64_t *ino)
{
    return add_node(vfs, parent, name, false, mode, ops, priv, ino);
}

int vfs_add_dir(struct vfs *vfs, uint64_t parent, const char *name, uint64_t *ino)
{
    return add_node(vfs, parent, name, true, 0755, NULL, NULL, ino);
}

/* On entry: the table lock is held exclusively.  Children first, so the
 * loop over the table sees each descendant while its parent still is. */
static void remove_locked(struct vfs *vfs, uint64_t ino, struct vfs_node ***gone,
                          size_t *n_gone)
{
    struct vfs_node *n = vfs->nodes[ino];

    if (n->is_dir)
        for (uint64_t i = 1; i < vfs->n_nodes; i++)
            if (vfs->nodes[i] && i != ino && vfs->nodes[i]->parent == ino)
                remove_locked(vfs, i, gone, n_gone);
    vfs->nodes[ino] = NULL;
    (*gone)[(*n_gone)++] = n;
}

int vfs_remove(struct vfs *vfs, uint64_t ino)
{
    struct vfs_node **gone;
    size_t n_gone = 0;

    if (ino == VFS_ROOT_INO || ino == VFS_DISK_INO)
        return -EPERM;
    pthread_rwlock_wrlock(&vfs->lock);
    if (ino >= vfs->n_nodes || !vfs->nodes[ino]) {
        pthread_rwlock_unlock(&vfs->lock);
        return -ENOENT;
    }
    gone = malloc(vfs->n_nodes * sizeof(*gone));
    if (!gone) {
        pthread_rwlock_unlock(&vfs->lock);
        return -ENOMEM;
    }
    remove_locked(vfs, ino, &gone, &n_gone);
    pthread_rwlock_unlock(&vfs->lock);
    /* Release hooks run outside the lock: they may take their own. */
    for (size_t i = 0; i < n_gone; i++)
        node_put(gone[i]);
    free(gone);
    return 0;
}

int vfs_watch_writes(struct vfs *vfs, uint64_t ino, vfs_write_watch_fn fn, void *arg)
{
    int ret = 0;

    pthread_rwlock_wrlock(&vfs->lock);
    if (ino >= vfs->n_nodes || !vfs->nodes[ino])
        ret = -ENOENT;
    else if (vfs->nodes[ino]->is_dir)
        ret = -EISDIR;
    else {
        vfs->nodes[ino]->watch = fn;
        vfs->nodes[ino]->watch_arg = arg;
    }
    pthread_rwlock_unlock(&vfs->lock);
    return ret;
}

int vfs_new(struct image *img, const struct vfs_config *cfg, struct vfs **out)
{
    struct vfs *vfs = calloc(1, sizeof(*vfs));
    int ret = -ENOMEM;

    if (!vfs)
        return -ENOMEM;
    if (pthread_rwlock_init(&vfs->lock, NULL) != 0) {
        free(vfs);
        return -ENOMEM;
    }
    vfs->cfg = *cfg;
    vfs->disk_name = strdup(cfg->disk_name);
    if (!vfs->disk_name)
        goto fail;
    vfs->cfg.disk_name = vfs->disk_name;
    clock_gettime(CLOCK_REALTIME, &vfs->mount_time);
    /* Slot 0 stays empty: inode 0 is not a valid FUSE node id. */
    vfs->n_nodes = 1;
    vfs->cap = 16;
    vfs->nodes = calloc(vfs->cap, sizeof(*vfs->nodes));
    if (!vfs->nodes)
        goto fail;
    vfs->nodes[VFS_ROOT_INO] = calloc(1, sizeof(struct vfs_node));
    if (!vfs->nodes[VFS_ROOT_INO] || !(vfs->nodes[VFS_ROOT_INO]->name = strdup("")))
        goto fail;
    vfs->nodes[VFS_ROOT_INO]->ino = VFS_ROOT_INO;
    vfs->nodes[VFS_ROOT_INO]->parent = VFS_ROOT_INO;
    vfs->nodes[VFS_ROOT_INO]->is_dir = true;
    vfs->nodes[VFS_ROOT_INO]->mode = 0755;
    atomic_init(&vfs->nodes[VFS_ROOT_INO]->refs, 1);
    vfs->n_nodes = 2;
    ret = vfs_add_file(vfs, VFS_ROOT_INO, cfg->disk_name, cfg->disk_mode,
                       &vfs_image_file_ops, img, NULL);
    if (ret < 0)
        goto fail;
    *out = vfs;
    return 0;
fail:
    vfs_free(vfs);
    return ret;
}

void vfs_free(struct vfs *vfs)
{
    if (!vfs)
        return;
    for (uint64_t i = 0; vfs->nodes && i < vfs->n_nodes; i++)
        if (vfs->nodes[i])
            node_put(vfs->nodes[i]);
    free(vfs->nodes);
    free(vfs->disk_name);
    pthread_rwlock_destroy(&vfs->lock);
    free(vfs);
}

/* ---- Requests ---- */

static bool node_read_only(const struct vfs_node *n)
{
    return !n->ops->write || (n->ops->read_only && n->ops->read_only(n->priv));
}

static void fill_attr(struct vfs *vfs, const struct vfs_node *n, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = n->ino;
    st->st_uid = vfs->cfg.uid;
    st->st_gid = vfs->cfg.gid;
    st->st_atim = st->st_mtim = st->st_ctim = vfs->mount_time;
    st->st_blksize = 4096;
    if (n->is_dir) {
        st->st_mode = S_IFDIR | n->mode;
        st->st_nlink = 2;
        pthread_rwlock_rdlock(&vfs->lock);
        for (uint64_t i = 2; i < vfs->n_nodes; i++)
            if (vfs->nodes[i] && vfs->nodes[i]->is_dir && vfs->nodes[i]->parent == n->ino)
                st->st_nlink++;
        pthread_rwlock_unlock(&vfs->lock);
    } else {
        uint64_t size = n->ops->size(n->priv);
        st->st_mode = S_IFREG | n->mode;
        if (node_read_only(n))
            st->st_mode &= ~(mode_t)0222;
        st->st_nlink = 1;
        st->st_size = (off_t)size;
        st->st_blocks = (blkcnt_t)((size + 511) / 512);
    }
}

int vfs_getattr(struct vfs *vfs, uint64_t ino, struct stat *st)
{
    struct vfs_node *n = node_get(vfs, ino);

    if (!n)
        return -ESTALE;
    fill_attr(vfs, n, st);
    node_put(n);
    return 0;
}

int vfs_lookup(struct vfs *vfs, uint64_t parent, const char *name, struct stat *st)
{
    struct vfs_node *dir, *n = NULL;
    int ret = 0;

    pthread_rwlock_rdlock(&vfs->lock);
    dir = parent < vfs->n_nodes ? vfs->nodes[parent] : NULL;
    if (!dir)
        ret = -ESTALE;
    else if (!dir->is_dir)
        ret = -ENOTDIR;
    else if (strcmp(name, ".") == 0)
        n = dir;
    else if (strcmp(name, "..") == 0)
        n = vfs->nodes[dir->parent];
    else
        n = child_locked(vfs, parent, name);
    if (!ret && !n)
        ret = -ENOENT;
    if (n)
        atomic_fetch_add(&n->refs, 1);
    pthread_rwlock_unlock(&vfs->lock);
    if (n) {
        fill_attr(vfs, n, st);
        node_put(n);
    }
    return ret;
}

int vfs_readdir(struct vfs *vfs, uint64_t ino, uint64_t pos, vfs_fill_fn fill, void *arg)
{
    struct vfs_node *dir = node_get(vfs, ino);
    int ret = 0;

    if (!dir)
        return -ESTALE;
    if (!dir->is_dir) {
        ret = -ENOTDIR;
        goto out;
    }
    /* Positions: 0 ".", 1 "..", then inode i at i + 2 (children have
     * i >= 2), so a position stays valid across removals. */
    if (pos <= 1) {
        struct stat st = { .st_ino = pos == 0 ? dir->ino : dir->parent,
                           .st_mode = S_IFDIR };
        if (pos == 0 && fill(arg, ".", &st, 1))
            goto out;
        st.st_ino = dir->parent;
        if (fill(arg, "..", &st, 2))
            goto out;
        pos = 2;
    }
    for (uint64_t i = pos >= 4 ? pos - 2 : 2;; i++) {
        struct vfs_node *n = NULL;
        struct stat st;
        int full;

        pthread_rwlock_rdlock(&vfs->lock);
        for (; i < vfs->n_nodes; i++) {
            n = vfs->nodes[i];
            if (n && n->parent == ino) {
                atomic_fetch_add(&n->refs, 1);
                break;
            }
            n = NULL;
        }
        pthread_rwlock_unlock(&vfs->lock);
        if (!n)
            break;
        memset(&st, 0, sizeof(st));
        st.st_ino = n->ino;
        st.st_mode = n->is_dir ? S_IFDIR : S_IFREG;
        full = fill(arg, n->name, &st, i + 3);
        node_put(n);
        if (full)
            break;
    }
out:
    node_put(dir);
    return ret;
}

int vfs_open(struct vfs *vfs, uint64_t ino, int flags, struct vfs_open_info *info)
{
    struct vfs_node *n = node_get(vfs, ino);
    int ret = 0;

    if (!n)
        return -ESTALE;
    if (n->is_dir)
        ret = -EISDIR;
    else if ((flags & O_ACCMODE) != O_RDONLY && node_read_only(n))
        ret = -EROFS;
    else {
        info->direct_io = vfs->cfg.direct_io;
        info->keep_cache = !vfs->cfg.direct_io;
    }
    node_put(n);
    return ret;
}

/* A file node for a data request, or NULL with *err set. */
static struct vfs_node *file_get(struct vfs *vfs, uint64_t ino, int *err)
{
    struct vfs_node *n = node_get(vfs, ino);

    if (!n) {
        *err = -ESTALE;
        return NULL;
    }
    if (n->is_dir) {
        node_put(n);
        *err = -EISDIR;
        return NULL;
    }
    return n;
}

int vfs_read(struct vfs *vfs, uint64_t ino, void *buf, size_t size, uint64_t off,
             size_t *len)
{
    struct vfs_node *n;
    uint64_t file_size;
    int ret = 0;

    *len = 0;
    if (off > INT64_MAX)
        return -EINVAL;
    if (!(n = file_get(vfs, ino, &ret)))
        return ret;
    file_size = n->ops->size(n->priv);
    if (off < file_size && size > 0) {
        if (size > file_size - off)
            size = (size_t)(file_size - off);
        /* The provider fills all @size bytes (holes with zeros), so
         * nothing of an earlier request survives in a reused buffer. */
        ret = n->ops->read(n->priv, buf, size, off);
        if (ret == 0)
            *len = size;
    }
    node_put(n);
    return ret;
}

static void notify_write(struct vfs_node *n, uint64_t off, uint64_t len)
{
    if (n->watch)
        n->watch(n->watch_arg, off, len);
}

int vfs_write(struct vfs *vfs, uint64_t ino, const void *buf, size_t size,
              uint64_t off, size_t *len)
{
    struct vfs_node *n;
    uint64_t file_size;
    int ret = 0;

    *len = 0;
    if (off > INT64_MAX)
        return -EINVAL;
    if (!(n = file_get(vfs, ino, &ret)))
        return ret;
    if (node_read_only(n)) {
        ret = -EROFS;
        goto out;
    }
    file_size = n->ops->size(n->priv);
    /* A disk does not grow by writing past its end (truncate resizes). */
    if (off >= file_size) {
        ret = size ? -ENOSPC : 0;
        goto out;
    }
    if (size > file_size - off)
        size = (size_t)(file_size - off);
    ret = n->ops->write(n->priv, buf, size, off);
    if (ret == 0) {
        *len = size;
        notify_write(n, off, size);
    }
out:
    node_put(n);
    return ret;
}

int vfs_fsync(struct vfs *vfs, uint64_t ino)
{
    struct vfs_node *n = node_get(vfs, ino);
    int ret = 0;

    if (!n)
        return -ESTALE;
    /* A directory's fsync has nothing of ours to make durable. */
    if (!n->is_dir && n->ops->flush)
        ret = n->ops->flush(n->priv);
    node_put(n);
    return ret;
}

int vfs_fallocate(struct vfs *vfs, uint64_t ino, int mode, uint64_t off, uint64_t len)
{
    struct vfs_node *n;
    bool keep = mode & FALLOC_FL_KEEP_SIZE;
    int op = mode & ~FALLOC_FL_KEEP_SIZE;
    uint64_t size, end;
    int ret = 0;

    if (off > INT64_MAX || len == 0 || len > INT64_MAX - off)
        return -EINVAL;
    if (!(n = file_get(vfs, ino, &ret)))
        return ret;
    size = n->ops->size(n->priv);
    end = off + len;
    /* A disk does not grow through fallocate: only truncate resizes it. */
    if (end > size && !keep) {
        ret = -EOPNOTSUPP;
        goto out;
    }
    if (op != 0 && !(op == FALLOC_FL_PUNCH_HOLE && keep) && op != FALLOC_FL_ZERO_RANGE) {
        ret = -EOPNOTSUPP;
        goto out;
    }
    if (node_read_only(n)) {
        ret = -EROFS;
        goto out;
    }
    if (off >= size)
        goto out;
    if (end > size)
        end = size;
    if (op == 0)
        ret = n->ops->preallocate ? n->ops->preallocate(n->priv, off, end - off) : 0;
    else if (!n->ops->zero)
        ret = -EOPNOTSUPP;
    else
        ret = n->ops->zero(n->priv, off, end - off, op == FALLOC_FL_PUNCH_HOLE);
    if (ret == 0 && op != 0)
        notify_write(n, off, end - off);
out:
    node_put(n);
    return ret;
}

int vfs_setattr(struct vfs *vfs, uint64_t ino, unsigned to_set, uint64_t size,
                struct stat *st)
{
    struct vfs_node *n = node_get(vfs, ino);
    int ret = 0;

    if (!n)
        return -ESTALE;
    if (to_set & VFS_SET_OWNER) {
        ret = -EPERM;
        goto out;
    }
    if (to_set & VFS_SET_SIZE) {
        if (n->is_dir)
            ret = -EISDIR;
        else if (size > INT64_MAX)
            ret = -EINVAL;
        else if (node_read_only(n))
            ret = -EROFS;
        else if (!n->ops->resize)
            ret = size == n->ops->size(n->priv) ? 0 : -EPERM;
        else {
            uint64_t old_size = n->ops->size(n->priv);
            ret = n->ops->resize(n->priv, size);
            /* The range between the two sizes changed: it reads as zeros
             * or is gone. */
            if (ret == 0 && size != old_size)
                notify_write(n, size < old_size ? size : old_size,
                             size < old_size ? old_size - size : size - old_size);
        }
        if (ret < 0)
            goto out;
    }
    /* Times are accepted and not stored: the disk has no timestamps. */
    fill_attr(vfs, n, st);
out:
    node_put(n);
    return ret;
}

/* Copy @n bytes of @src under getxattr(2)'s size rule. */
static int xattr_reply(const void *src, size_t n, void *buf, size_t size, size_t *len)
{
    *len = n;
    if (size == 0)
        return 0;
    if (size < n)
        return -ERANGE;
    memcpy(buf, src, n);
    return 0;
}

int vfs_getxattr(struct vfs *vfs, uint64_t ino, const char *name, void *buf,
                 size_t size, size_t *len)
{
    struct vfs_node *n = node_get(vfs, ino);
    char stats[1024];
    int ret;

    *len = 0;
    if (!n)
        return -ESTALE;
    if (n->is_dir || !n->ops->stats || strcmp(name, STATS_XATTR) != 0) {
        ret = -ENODATA;
    } else {
        n->ops->stats(n->priv, stats, sizeof(stats));
        ret = xattr_reply(stats, strlen(stats), buf, size, len);
    }
    node_put(n);
    return ret;
}

int vfs_listxattr(struct vfs *vfs, uint64_t ino, void *buf, size_t size, size_t *len)
{
    static const char names[] = STATS_XATTR;   /* with its NUL */
    struct vfs_node *n = node_get(vfs, ino);
    int ret = 0;

    *len = 0;
    if (!n)
        return -ESTALE;
    if (!n->is_dir && n->ops->stats)
        ret = xattr_reply(names, sizeof(names), buf, size, len);
    node_put(n);
    return ret;
}

int vfs_lseek(struct vfs *vfs, uint64_t ino, uint64_t off, int whence, uint64_t *result)
{
    struct vfs_node *n;
    uint64_t size;
    int ret = 0;

    if (whence != SEEK_DATA && whence != SEEK_HOLE)
        return -EINVAL;
    if (!(n = file_get(vfs, ino, &ret)))
        return ret;
    size = n->ops->size(n->priv);
    if (off > INT64_MAX || off >= size)
        ret = -ENXIO;
    else if (n->ops->seek)
        ret = n->ops->seek(n->priv, off, whence == SEEK_DATA, result);
    else
        *result = whence == SEEK_DATA ? off : size;
    node_put(n);
    return ret;
}

int vfs_statfs(struct vfs *vfs, struct statvfs *sv)
{
    struct vfs_node *disk = node_get(vfs, VFS_DISK_INO);
    uint64_t files = 0;

    memset(sv, 0, sizeof(*sv));
    pthread_rwlock_rdlock(&vfs->lock);
    for (uint64_t i = 1; i < vfs->n_nodes; i++)
        files += vfs->nodes[i] != NULL;
    pthread_rwlock_unlock(&vfs->lock);
    sv->f_bsize = 4096;
    sv->f_frsize = 4096;
    sv->f_blocks = disk ? (disk->ops->size(disk->priv) + 4095) / 4096 : 0;
    sv->f_files = files;
    sv->f_namemax = VFS_NAME_MAX;
    if (disk)
        node_put(disk);
    return 0;
}
