/*
 * backing — where a backing file or external data file named inside an image
 * may be found, and what format it is.  An image is untrusted input, so the
 * name it carries is resolved against the image's own directory and checked
 * against the user's policy before anything is opened.
 */
#ifndef QCOW2FUSE_BACKING_H
#define QCOW2FUSE_BACKING_H

#include <stdbool.h>

struct io;

enum backing_policy {
    BACKING_ALLOW,              /* any regular file (and devices) */
    BACKING_DENY,               /* no backing files at all */
    BACKING_DIR,                /* only regular files below a directory */
};

struct backing_options {
    enum backing_policy policy;
    const char *dir;            /* BACKING_DIR: the allowed directory */
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
 * The format of an opened backing file.  @declared is the image's backing
 * format extension (NULL when absent): only "raw" and "qcow2" are accepted.
 * Without one, the file is probed, but only between qcow2 and raw.
 * Returns: 0, or -ENOTSUP for another declared format (logged).
 */
int backing_format(struct io *io, const char *path, const char *declared,
                   enum backing_format *out);

#endif
