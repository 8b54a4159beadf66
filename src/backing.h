/*
 * backing — where a backing file or external data file named inside an image
 * may be found, and what format it is.  An image is untrusted input, so the
 * name it carries is resolved against the image's own directory and checked
 * against the user's policy before anything is opened.
 */
#ifndef QCOW2FUSE_BACKING_H
#define QCOW2FUSE_BACKING_H

#include <stdbool.h>
#include <sys/types.h>

struct io;

enum backing_policy {
    BACKING_ALLOW,              /* any regular file (and devices) */
    BACKING_DENY,               /* no backing files at all */
    BACKING_DIR,                /* only regular files below a directory */
};

struct backing_options {
    enum backing_policy policy;
    const char *dir;            /* BACKING_DIR: the allowed directory */
    /* -o backing=allow given explicitly: a daemon running as root opens
     * what an image names even where the image's owner could not (see
     * backing_open).  The default (allow, not given) keeps that check. */
    bool skip_owner_check;
    /* Filled in by the image layer for the images below the top one: the
     * owner of the top image, whom the whole chain is opened for.  Callers
     * of image_open leave it 0: the top image's owner is then taken from
     * its file (0, root, needs no check either). */
    uid_t top_owner;
};

/* The owner of an image on a backend without a descriptor (memory). */
#define BACKING_NO_OWNER ((uid_t)-1)

/*
 * Who an opened image belongs to: the owner of its file.
 * Returns: the uid, or BACKING_NO_OWNER for a backend without a file.
 */
uid_t backing_owner(struct io *io);

/*
 * The users a file named inside an image is opened for.  A daemon running
 * as root (effective uid 0) opens a backing file or external data file only
 * if each of them could open it: the owner of the top image (the disk is
 * shown on their behalf) and the owner of the image that names the file
 * (whoever could write that image chose the name).  root and
 * BACKING_NO_OWNER stand for nobody to check.
 */
struct backing_owners {
    uid_t top;
    uid_t namer;
};

enum backing_format {
    BACKING_FORMAT_RAW,
    BACKING_FORMAT_QCOW2,
};

/*
 * Resolve @name, as found in the image at @image_path, to a path to open.
 * Relative names are taken relative to the image's directory.
 * @what is "backing file" or "external data file", for messages.
 * On exit: *out is a malloc'd path.
 * Returns: 0, -EPERM (policy refuses it: logged), -ENOENT, -ENOMEM.
 */
int backing_resolve(const char *image_path, const char *name, const char *what,
                    const struct backing_options *opts, char **out);

/*
 * Resolve @name as backing_resolve does and open the file it names
 * (read-write if @writable).  When the daemon runs as root and
 * !@opts->skip_owner_check, the name is resolved and the file opened with
 * the file-system identity (uid, primary and supplementary groups) of each
 * user in @owners in turn, so the kernel checks every directory on the way
 * and the file itself as that user would be checked; all opens must reach
 * the same file.  The identity is changed only in the calling thread and is
 * restored before returning.
 * On exit: *path_out is a malloc'd path and *io_out the open file.
 * Returns: 0, -EPERM (refused by policy or because an owner could not open
 * it: logged, naming the file, the user and -o backing=allow), -ENOENT,
 * -ENOMEM, -errno of the open (logged).
 */
int backing_open(const char *image_path, const char *name, const char *what,
                 const struct backing_options *opts,
                 const struct backing_owners *owners, bool writable,
                 char **path_out, struct io **io_out);

/*
 * The format of an opened backing file.  @declared is the image's backing
 * format extension (NULL when absent): only "raw" and "qcow2" are accepted.
 * Without one, the file is probed, but only between qcow2 and raw.
 * Returns: 0, or -ENOTSUP for another declared format (logged).
 */
int backing_format(struct io *io, const char *path, const char *declared,
                   enum backing_format *out);

#endif
