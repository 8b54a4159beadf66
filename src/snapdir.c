/*
 * snapdir — snapshots/: naming the files, and opening each snapshot's view
 * on first use.
 */
#include "snapdir.h"

#include "image.h"
#include "log.h"
#include "snapshot.h"
#include "vfs.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAME_MAX_BYTES  255

/* One snapshot's file. */
struct snap_file {
    struct image *img;          /* the mounted image; not owned */
    uint32_t index;             /* the snapshot's position in the table */
    uint64_t size;              /* its view's size, known without opening it */
    pthread_mutex_t open_lock;  /* one opener of the view */
    _Atomic(struct image *) view;
    int refused;                /* -errno of a view that will not open */
};

/* ---- the file operations --------------------------------------------------- */

/* The file's view, opened on first use.  A snapshot that cannot be viewed
 * (its entry or tables refused, logged then) stays refused, so a reader
 * retrying does not repeat the message; other errors are tried again. */
static int get_view(struct snap_file *f, struct image **out)
{
    struct image *view = atomic_load(&f->view);
    int ret = 0;

    if (view) {
        *out = view;
        return 0;
    }
    pthread_mutex_lock(&f->open_lock);
    view = atomic_load(&f->view);
    if (!view && f->refused) {
        ret = f->refused;
    } else if (!view) {
        ret = image_snapshot_view_open(f->img, f->index, &view);
        if (ret == -EINVAL || ret == -ENOENT || ret == -EOPNOTSUPP)
            f->refused = ret = -EIO;
        else if (ret == 0)
            atomic_store(&f->view, view);
    }
    pthread_mutex_unlock(&f->open_lock);
    *out = view;
    return ret;
}

static uint64_t snap_size(void *priv)
{
    struct snap_file *f = priv;
    struct image *view = atomic_load(&f->view);

    return view ? image_size(view) : f->size;
}

static bool snap_read_only(void *priv)
{
    (void)priv;
    return true;
}

static int snap_read(void *priv, void *buf, size_t len, uint64_t off)
{
    struct image *view;
    int ret = get_view(priv, &view);

    return ret < 0 ? ret : image_read(view, buf, len, off);
}

static int snap_seek(void *priv, uint64_t off, bool data, uint64_t *result)
{
    struct image *view;
    int ret = get_view(priv, &view);

    return ret < 0 ? ret : image_seek(view, off, data, result);
}

static void snap_stats(void *priv, char *buf, size_t len)
{
    struct snap_file *f = priv;
    struct image *view = atomic_load(&f->view);

    if (view)
        image_stats(view, buf, len);
    else
        snprintf(buf, len, "not read yet (the snapshot's view opens on first read)");
}

static void snap_release(void *priv)
{
    struct snap_file *f = priv;
    struct image *view = atomic_load(&f->view);

    if (view)
        image_snapshot_view_close(view);
    pthread_mutex_destroy(&f->open_lock);
    free(f);
}

static const struct vfs_file_ops snap_file_ops = {
    .size = snap_size,
    .read_only = snap_read_only,
    .read = snap_read,
    .seek = snap_seek,
    .stats = snap_stats,
    .release = snap_release,
};

/* ---- names ------------------------------------------------------------------ */

/* Why @len bytes at @s cannot be a file name, or NULL when they can. */
static const char *name_problem(const char *s, size_t len)
{
    if (len == 0)
        return "it is empty";
    if (len > NAME_MAX_BYTES)
        return "it is longer than 255 bytes";
    if (strlen(s) != len)
        return "it contains a NUL byte";
    if (strchr(s, '/'))
        return "it contains '/'";
    if (strcmp(s, ".") == 0 || strcmp(s, "..") == 0)
        return "it is \".\" or \"..\"";
    return NULL;
}

/*
 * Add the file of snapshot @s under @dir as @name.
 * Returns: 0, -EEXIST (the name is taken), -ENOMEM.
 */
static int add_file(struct vfs *vfs, uint64_t dir, struct image *img,
                    const struct snapshot *s, uint64_t size, mode_t mode,
                    const char *name)
{
    struct snap_file *f = calloc(1, sizeof(*f));
    int ret;

    if (!f)
        return -ENOMEM;
    f->img = img;
    f->index = s->index;
    f->size = size;
    pthread_mutex_init(&f->open_lock, NULL);
    ret = vfs_add_file(vfs, dir, name, mode, &snap_file_ops, f, NULL);
    if (ret < 0) {
        pthread_mutex_destroy(&f->open_lock);
        free(f);
    }
    return ret;
}

/* The file of a snapshot whose name cannot be used (@why): "id-ID", else
 * "entry-N", with a "~K" suffix while taken. */
static int add_renamed(struct vfs *vfs, uint64_t dir, struct image *img,
                       const struct snapshot *s, uint64_t size, mode_t mode,
                       const char *why)
{
    char name[NAME_MAX_BYTES + 1], shown[72];
    int ret = -EEXIST;

    if (!name_problem(s->id, s->id_len) && s->id_len <= NAME_MAX_BYTES - 3) {
        snprintf(name, sizeof(name), "id-%s", s->id);
        ret = add_file(vfs, dir, img, s, size, mode, name);
    }
    for (unsigned k = 1; ret == -EEXIST && k < 1000; k++) {
        if (k == 1)
            snprintf(name, sizeof(name), "entry-%u", s->index);
        else
            snprintf(name, sizeof(name), "entry-%u~%u", s->index, k);
        ret = add_file(vfs, dir, img, s, size, mode, name);
    }
    if (ret < 0)
        return ret;
    snapshot_printable(shown, sizeof(shown), s->name, s->name_len);
    log_warn("snapshot %u (name \"%s\"): shown as %s/%s, as its name cannot be "
             "used: %s", s->index, shown, SNAPDIR_NAME, name, why);
    return 0;
}

int snapdir_add(struct vfs *vfs, struct image *img, enum snapdir_show show, mode_t mode)
{
    struct snapshot_table t;
    uint64_t dir, *sizes = NULL;
    bool *renamed = NULL;
    char err[256];
    int ret;

    if (show == SNAPDIR_NEVER)
        return 0;
    ret = image_snapshot_table(img, &t);
    if (ret == -ENOMEM)
        return ret;
    if (ret < 0) {
        log_warn("no %s/ directory: the snapshot table was refused", SNAPDIR_NAME);
        return 0;
    }
    if (t.nb == 0 && show == SNAPDIR_AUTO)
        goto out;
    ret = vfs_add_dir(vfs, VFS_ROOT_INO, SNAPDIR_NAME, &dir);
    if (ret == -EEXIST) {
        log_warn("no %s/ directory: the disk file has that name (-o name=)",
                 SNAPDIR_NAME);
        ret = 0;
        goto out;
    }
    if (ret < 0)
        goto out;
    sizes = calloc(t.nb ? t.nb : 1, sizeof(*sizes));
    renamed = calloc(t.nb ? t.nb : 1, sizeof(*renamed));
    if (!sizes || !renamed) {
        ret = -ENOMEM;
        goto out;
    }

    /* Names usable as they are first, in table order, so that no renamed
     * snapshot takes the name of one that keeps its own. */
    for (uint32_t i = 0; i < t.nb; i++) {
        const struct snapshot *s = &t.s[i];
        ret = image_snapshot_view_size(img, s, &sizes[i], err, sizeof(err));
        if (ret == -EOPNOTSUPP) {
            log_warn("%s/ is empty: %s", SNAPDIR_NAME, err);
            ret = 0;
            goto out;
        }
        if (ret < 0) {
            log_warn("%s/: no file for %s", SNAPDIR_NAME, err);
            continue;
        }
        if (name_problem(s->name, s->name_len)) {
            renamed[i] = true;
            continue;
        }
        ret = add_file(vfs, dir, img, s, sizes[i], mode, s->name);
        if (ret == -EEXIST)
            renamed[i] = true;
        else if (ret == -ENOMEM)
            goto out;
    }
    for (uint32_t i = 0; i < t.nb; i++) {
        const struct snapshot *s = &t.s[i];
        const char *why = name_problem(s->name, s->name_len);
        if (!renamed[i])
            continue;
        ret = add_renamed(vfs, dir, img, s, sizes[i], mode,
                          why ? why : "an earlier snapshot has the same name");
        if (ret == -ENOMEM)
            goto out;
        if (ret < 0)
            log_warn("%s/: no file for snapshot %u: %s", SNAPDIR_NAME, s->index,
                     strerror(-ret));
    }
    ret = 0;
out:
    free(sizes);
    free(renamed);
    snapshot_table_free(&t);
    return ret;
}
