/*
 * backing — name resolution, policy and format detection for files an image
 * refers to.
 */
#include "backing.h"

#include "header.h"
#include "io.h"
#include "log.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static bool path_below(const char *path, const char *dir)
{
    size_t n = strlen(dir);

    while (n > 1 && dir[n - 1] == '/')
        n--;
    return strncmp(path, dir, n) == 0 && (path[n] == '/' || path[n] == '\0' ||
                                          (n == 1 && dir[0] == '/'));
}

int backing_resolve(const char *image_path, const char *name, const char *what,
                    const struct backing_options *opts, char **out)
{
    char *joined = NULL, *real = NULL, *dir_real = NULL;
    struct stat st;
    int ret;

    if (opts->policy == BACKING_DENY) {
        log_error("the image names %s \"%s\" but backing files are denied "
                  "(-o backing=deny)", what, name);
        return -EPERM;
    }

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

    real = realpath(joined, NULL);
    if (!real) {
        ret = -errno;
        log_error("cannot find %s \"%s\" (looked for %s): %s", what, name,
                  joined, strerror(errno));
        goto out;
    }
    if (stat(real, &st) < 0) {
        ret = -errno;
        goto out;
    }

    if (opts->policy != BACKING_ALLOW) {
        if (!S_ISREG(st.st_mode)) {
            log_error("%s \"%s\" resolves to %s, which is not a regular file; "
                      "refused (use -o backing=allow to permit it)", what, name, real);
            ret = -EPERM;
            goto out;
        }
        if (path_below(real, "/proc") || path_below(real, "/sys") ||
            path_below(real, "/dev")) {
            log_error("%s \"%s\" resolves to %s; refused (use -o backing=allow "
                      "to permit it)", what, name, real);
            ret = -EPERM;
            goto out;
        }
    }
    if (opts->policy == BACKING_DIR) {
        dir_real = realpath(opts->dir, NULL);
        if (!dir_real || !path_below(real, dir_real)) {
            log_error("%s \"%s\" resolves to %s, outside the allowed directory "
                      "%s; refused", what, name, real, opts->dir);
            ret = -EPERM;
            goto out;
        }
    }
    *out = real;
    real = NULL;
    ret = 0;
out:
    free(joined);
    free(real);
    free(dir_real);
    return ret;
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
    ret = io_pread(io, magic, sizeof(magic), 0);
    if (ret < 0)
        return ret;
    *out = be32_get(magic) == QCOW2_MAGIC ? BACKING_FORMAT_QCOW2 : BACKING_FORMAT_RAW;
    return 0;
}
