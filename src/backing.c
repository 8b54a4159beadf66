/*
 * backing — name resolution, policy and format detection for files an image
 * refers to, and opening them with the file-system identity of the images'
 * owners when the daemon runs as root.
 */
#include "backing.h"

#include "header.h"
#include "io.h"
#include "log.h"

#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static bool path_below(const char *path, const char *dir)
{
    size_t n = strlen(dir);

    while (n > 1 && dir[n - 1] == '/')
        n--;
    return strncmp(path, dir, n) == 0 && (path[n] == '/' || path[n] == '\0' ||
                                          (n == 1 && dir[0] == '/'));
}

/* @name as found in the image at @image_path, made a path: relative names
 * are taken relative to the image's directory.  Returns 0 or -ENOMEM. */
static int join_name(const char *image_path, const char *name, char **out)
{
    char *joined = NULL;

    if (name[0] == '/') {
        joined = strdup(name);
    } else {
        const char *slash = strrchr(image_path, '/');
        int dlen = slash ? (int)(slash - image_path) : 1;
        const char *dir = slash ? image_path : ".";
        if (slash == image_path)
            dlen = 0;           /* image in "/" */
        if (asprintf(&joined, "%.*s/%s", dlen, dir, name) < 0)
            joined = NULL;
    }
    if (!joined)
        return -ENOMEM;
    *out = joined;
    return 0;
}

/* What finding and opening one name came to.  Filled in by locate(), which
 * may run under another user's file-system identity and therefore only
 * makes system calls; report() logs afterwards. */
enum locate_step {
    LOCATE_OK,
    LOCATE_RESOLVE,             /* realpath failed: errnum */
    LOCATE_STAT,                /* stat failed: errnum */
    LOCATE_NOT_REGULAR,         /* policy: not a regular file */
    LOCATE_PSEUDO_FS,           /* policy: below /proc, /sys or /dev */
    LOCATE_OUTSIDE_DIR,         /* policy: outside the allowed directory */
    LOCATE_OPEN,                /* open failed: errnum */
};

struct located {
    enum locate_step step;
    int errnum;
    char *real;                 /* malloc'd once resolved */
    struct io *io;              /* open when asked for and step is LOCATE_OK */
};

/* Resolve @joined, apply the policy to the file it names, then open it if
 * @open_it.  @dir_real: the allowed directory resolved (BACKING_DIR), or
 * NULL when it could not be resolved. */
static void locate(const char *joined, const struct backing_options *opts,
                   const char *dir_real, bool open_it, bool writable,
                   struct located *out)
{
    struct stat st;
    int ret;

    memset(out, 0, sizeof(*out));
    out->real = realpath(joined, NULL);
    if (!out->real) {
        out->step = LOCATE_RESOLVE;
        out->errnum = errno;
        return;
    }
    if (stat(out->real, &st) < 0) {
        out->step = LOCATE_STAT;
        out->errnum = errno;
        return;
    }
    if (opts->policy != BACKING_ALLOW) {
        if (!S_ISREG(st.st_mode)) {
            out->step = LOCATE_NOT_REGULAR;
            return;
        }
        if (path_below(out->real, "/proc") || path_below(out->real, "/sys") ||
            path_below(out->real, "/dev")) {
            out->step = LOCATE_PSEUDO_FS;
            return;
        }
    }
    if (opts->policy == BACKING_DIR && (!dir_real || !path_below(out->real, dir_real))) {
        out->step = LOCATE_OUTSIDE_DIR;
        return;
    }
    if (open_it) {
        ret = io_open_file(out->real, writable, &out->io);
        if (ret < 0) {
            out->step = LOCATE_OPEN;
            out->errnum = -ret;
            return;
        }
    }
    out->step = LOCATE_OK;
}

/* ---- acting for the image's owner ----------------------------------------- */

/* The group of a uid without a passwd entry, and the owner assumed when
 * fstat fails: the kernel's overflow id, which owns nothing of worth. */
#define OVERFLOW_ID 65534

/* A user's file-system identity, looked up while still root. */
struct identity {
    uid_t uid;
    gid_t gid;
    gid_t *groups;              /* supplementary groups, malloc'd */
    int ngroups;
    char label[96];             /* "user nobody (uid 65534)", for messages */
};

/* Returns 0 or -ENOMEM.  A user whose entry cannot be read gets no group
 * but OVERFLOW_ID: that can only refuse more, never allow more. */
static int identity_lookup(uid_t uid, struct identity *id)
{
    long bufsize = sysconf(_SC_GETPW_R_SIZE_MAX);
    struct passwd pw, *found = NULL;
    char *buf = NULL;
    int ret;

    memset(id, 0, sizeof(*id));
    id->uid = uid;
    id->gid = OVERFLOW_ID;
    if (bufsize < 1024)
        bufsize = 16384;
    for (;;) {
        char *bigger = realloc(buf, (size_t)bufsize);
        if (!bigger) {
            free(buf);
            return -ENOMEM;
        }
        buf = bigger;
        ret = getpwuid_r(uid, &pw, buf, (size_t)bufsize, &found);
        if (ret != ERANGE || bufsize >= (1L << 20))
            break;
        bufsize *= 2;
    }
    if (ret != 0 || !found) {
        snprintf(id->label, sizeof(id->label), "uid %u (no such user)", (unsigned)uid);
        free(buf);
        return 0;
    }
    snprintf(id->label, sizeof(id->label), "user %s (uid %u)", pw.pw_name, (unsigned)uid);
    id->gid = pw.pw_gid;
    int n = 16;
    for (;;) {
        gid_t *groups = realloc(id->groups, (size_t)n * sizeof(*groups));
        if (!groups) {
            free(id->groups);
            free(buf);
            id->groups = NULL;
            return -ENOMEM;
        }
        id->groups = groups;
        int want = n;
        if (getgrouplist(pw.pw_name, pw.pw_gid, id->groups, &want) >= 0) {
            id->ngroups = want;
            break;
        }
        if (want <= n)          /* no progress: keep the primary group only */
            want = n * 2;
        if (want > 65536) {
            id->groups[0] = pw.pw_gid;
            id->ngroups = 1;
            break;
        }
        n = want;
    }
    free(buf);
    return 0;
}

static void identity_free(struct identity *id)
{
    free(id->groups);
    id->groups = NULL;
}

struct saved_identity {
    uid_t fsuid;
    gid_t fsgid;
    gid_t *groups;
    int ngroups;
};

/*
 * Take @id's file-system identity in the calling thread only: the raw
 * setgroups system call (glibc's wrapper would change every thread) and
 * setfsuid/setfsgid, which also drop the file-system capabilities (such as
 * CAP_DAC_OVERRIDE) from the effective set while the fsuid is not 0.
 * On exit (0): *saved holds what identity_leave() restores.
 * Returns: 0 or -errno.
 */
static int identity_enter(const struct identity *id, struct saved_identity *saved)
{
    int n = getgroups(0, NULL);

    memset(saved, 0, sizeof(*saved));
    if (n < 0)
        return -errno;
    saved->groups = malloc((size_t)(n ? n : 1) * sizeof(gid_t));
    if (!saved->groups)
        return -ENOMEM;
    saved->ngroups = getgroups(n, saved->groups);
    if (saved->ngroups < 0 ||
        syscall(SYS_setgroups, (size_t)id->ngroups, id->groups) < 0) {
        int err = errno;
        free(saved->groups);
        saved->groups = NULL;
        return -err;
    }
    saved->fsgid = (gid_t)setfsgid(id->gid);
    saved->fsuid = (uid_t)setfsuid(id->uid);
    return 0;
}

/* Returns 0, or -EPERM when the old identity could not be taken back. */
static int identity_leave(struct saved_identity *saved)
{
    int ret = 0;

    setfsuid(saved->fsuid);
    setfsgid(saved->fsgid);
    if (syscall(SYS_setgroups, (size_t)saved->ngroups, saved->groups) < 0 ||
        (uid_t)setfsuid((uid_t)-1) != saved->fsuid ||
        (gid_t)setfsgid((gid_t)-1) != saved->fsgid) {
        log_error("cannot return to the daemon's own file-system identity "
                  "after opening a file as the image's owner");
        ret = -EPERM;
    }
    free(saved->groups);
    saved->groups = NULL;
    return ret;
}

/* locate() under @id's identity, or under our own when @id is NULL.  A
 * switch that fails or does not return is folded into the result. */
static int locate_as(const struct identity *id, const char *joined,
                     const struct backing_options *opts, const char *dir_real,
                     bool open_it, bool writable, struct located *out)
{
    struct saved_identity saved;
    int ret;

    if (!id) {
        locate(joined, opts, dir_real, open_it, writable, out);
        return 0;
    }
    ret = identity_enter(id, &saved);
    if (ret < 0) {
        log_error("cannot take the file-system identity of %s: %s", id->label,
                  strerror(-ret));
        memset(out, 0, sizeof(*out));
        return ret;
    }
    /* The fsuid checks are only as good as this: verified, not assumed. */
    if ((uid_t)setfsuid((uid_t)-1) != id->uid || (gid_t)setfsgid((gid_t)-1) != id->gid) {
        identity_leave(&saved);
        log_error("cannot take the file-system identity of %s", id->label);
        memset(out, 0, sizeof(*out));
        return -EPERM;
    }
    locate(joined, opts, dir_real, open_it, writable, out);
    ret = identity_leave(&saved);
    if (ret < 0 && out->io) {
        io_close(out->io);
        out->io = NULL;
    }
    return ret;
}

static void located_free(struct located *l)
{
    free(l->real);
    if (l->io)
        io_close(l->io);
    memset(l, 0, sizeof(*l));
}

/* Log why @l did not come to LOCATE_OK and give its -errno.  @id: the user
 * it was tried for (NULL: ourselves), @role what that user is to the image. */
static int report(const struct located *l, const char *image_path, const char *name,
                  const char *what, const char *joined, const struct backing_options *opts,
                  const struct identity *id, const char *role)
{
    const char *real = l->real ? l->real : joined;

    if (id && (l->step == LOCATE_RESOLVE || l->step == LOCATE_STAT ||
               l->step == LOCATE_OPEN) &&
        (l->errnum == EACCES || l->errnum == EPERM)) {
        log_error("%s \"%s\" named by %s resolves to %s: refused, because %s, %s, "
                  "cannot %s it (%s); a daemon running as root opens a file an "
                  "image names only if the image's owner could (use -o "
                  "backing=allow to open it anyway)", what, name, image_path, real,
                  id->label, role, l->step == LOCATE_OPEN ? "open" : "reach",
                  strerror(l->errnum));
        return -EPERM;
    }
    switch (l->step) {
    case LOCATE_OK:
        return 0;
    case LOCATE_RESOLVE:
        log_error("cannot find %s \"%s\" (looked for %s): %s", what, name, joined,
                  strerror(l->errnum));
        return -l->errnum;
    case LOCATE_STAT:
        log_error("cannot stat %s %s of %s: %s", what, real, image_path,
                  strerror(l->errnum));
        return -l->errnum;
    case LOCATE_NOT_REGULAR:
        log_error("%s \"%s\" resolves to %s, which is not a regular file; "
                  "refused (use -o backing=allow to permit it)", what, name, real);
        return -EPERM;
    case LOCATE_PSEUDO_FS:
        log_error("%s \"%s\" resolves to %s; refused (use -o backing=allow "
                  "to permit it)", what, name, real);
        return -EPERM;
    case LOCATE_OUTSIDE_DIR:
        log_error("%s \"%s\" resolves to %s, outside the allowed directory "
                  "%s; refused", what, name, real, opts->dir);
        return -EPERM;
    case LOCATE_OPEN:
        log_error("cannot open %s %s of %s: %s", what, real, image_path,
                  strerror(l->errnum));
        return -l->errnum;
    }
    return -EINVAL;
}

uid_t backing_owner(struct io *io)
{
    int fd = io_file_fd(io);
    struct stat st;

    if (fd < 0)
        return BACKING_NO_OWNER;
    /* fstat of an open descriptor does not fail; if it did, root (nobody to
     * check for) would be the wrong answer, the overflow uid the safe one. */
    if (fstat(fd, &st) < 0)
        return OVERFLOW_ID;
    return st.st_uid;
}

/* The users to act for, at most two, in the order top, namer. */
static int owners_to_check(const struct backing_options *opts,
                           const struct backing_owners *owners, uid_t users[2])
{
    int n = 0;

    if (opts->skip_owner_check || geteuid() != 0)
        return 0;       /* allowed explicitly, or the kernel checks as us */
    if (owners->top != 0 && owners->top != BACKING_NO_OWNER)
        users[n++] = owners->top;
    if (owners->namer != 0 && owners->namer != BACKING_NO_OWNER &&
        (n == 0 || users[0] != owners->namer))
        users[n++] = owners->namer;
    return n;
}

static int open_common(const char *image_path, const char *name, const char *what,
                       const struct backing_options *opts,
                       const struct backing_owners *owners, bool open_it,
                       bool writable, char **path_out, struct io **io_out)
{
    struct identity ids[2] = { 0 };
    const char *roles[2] = { NULL, NULL };
    struct located first = { 0 }, again = { 0 };
    char *joined = NULL, *dir_real = NULL;
    uid_t users[2];
    int nusers, i, ret;

    if (opts->policy == BACKING_DENY) {
        log_error("the image names %s \"%s\" but backing files are denied "
                  "(-o backing=deny)", what, name);
        return -EPERM;
    }
    nusers = owners ? owners_to_check(opts, owners, users) : 0;
    for (i = 0; i < nusers; i++) {
        ret = identity_lookup(users[i], &ids[i]);
        if (ret < 0)
            goto out;
        roles[i] = users[i] == owners->namer ? "who owns that image"
                                             : "who owns the top image";
    }
    ret = join_name(image_path, name, &joined);
    if (ret < 0)
        goto out;
    if (opts->policy == BACKING_DIR)
        dir_real = realpath(opts->dir, NULL);   /* as ourselves: the admin's */

    ret = locate_as(nusers ? &ids[0] : NULL, joined, opts, dir_real, open_it,
                    writable, &first);
    if (ret == 0)
        ret = report(&first, image_path, name, what, joined, opts,
                     nusers ? &ids[0] : NULL, roles[0]);
    if (ret < 0)
        goto out;

    /* The second user must reach the very file the first one opened. */
    if (nusers == 2) {
        ret = locate_as(&ids[1], first.real, opts, dir_real, open_it, writable, &again);
        if (ret == 0)
            ret = report(&again, image_path, name, what, first.real, opts, &ids[1],
                         roles[1]);
        if (ret < 0)
            goto out;
        if (open_it) {
            struct stat a, b;
            if (fstat(io_file_fd(first.io), &a) < 0 ||
                fstat(io_file_fd(again.io), &b) < 0 ||
                a.st_dev != b.st_dev || a.st_ino != b.st_ino) {
                log_error("%s %s of %s changed while it was being opened; refused",
                          what, first.real, image_path);
                ret = -EPERM;
                goto out;
            }
        }
    }
    *path_out = first.real;
    first.real = NULL;
    if (io_out) {
        *io_out = first.io;
        first.io = NULL;
    }
    ret = 0;
out:
    located_free(&first);
    located_free(&again);
    for (i = 0; i < nusers; i++)
        identity_free(&ids[i]);
    free(joined);
    free(dir_real);
    return ret;
}

int backing_resolve(const char *image_path, const char *name, const char *what,
                    const struct backing_options *opts, char **out)
{
    return open_common(image_path, name, what, opts, NULL, false, false, out, NULL);
}

int backing_open(const char *image_path, const char *name, const char *what,
                 const struct backing_options *opts,
                 const struct backing_owners *owners, bool writable,
                 char **path_out, struct io **io_out)
{
    return open_common(image_path, name, what, opts, owners, true, writable,
                       path_out, io_out);
}

int backing_format(struct io *io, const char *path, const char *declared,
                   enum backing_format *out)
{
    uint8_t magic[4];
    int ret;

    if (declared) {
        if (strcmp(declared, "raw") == 0) {
            *out = BACKING_FORMAT_RAW;
            return 0;
        }
        if (strcmp(declared, "qcow2") == 0) {
            *out = BACKING_FORMAT_QCOW2;
            return 0;
        }
        log_error("backing file %s has format \"%s\"; only raw and qcow2 "
                  "backing files are supported", path, declared);
        return -ENOTSUP;
    }
    ret = io_pread(io, magic, sizeof(magic), QCOW2_HDR_MAGIC);
    if (ret < 0)
        return ret;
    *out = be32_get(magic) == QCOW2_MAGIC ? BACKING_FORMAT_QCOW2 : BACKING_FORMAT_RAW;
    return 0;
}
