/*
 * main — command line, image open, FUSE session set-up and the daemon's
 * lifetime: parse options, open the image (all errors to stderr before
 * anything is mounted), mount, daemonize, serve, and on unmount or signal
 * write every piece of metadata back before exiting.
 */
#include "create.h"
#include "fuse_ops.h"
#include "header.h"
#include "image.h"
#include "io.h"
#include "log.h"
#include "snapshot.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57    /* Linux 5.6 */
#endif

struct cli {
    char *image;
    char *mountpoint;
    int foreground;
    int debug;
    int single_thread;
    int read_only;
    char *l2_cache_size;
    char *refcount_cache_size;
    char *cache_mode;
    char *backing;
    char *name;
    char *io_trace;
    char *discard;
    char *detect_zeroes;
    char *snapshot;
    int create;
    char *size;
    char *cluster_size;
    char *backing_file;
    char *backing_format;
    char *uid;
    char *gid;
    char *umask;
    int list_snapshots;
    int show_help;
    int show_version;
};

enum { KEY_HELP, KEY_VERSION, KEY_RO, KEY_RW, KEY_FOREGROUND, KEY_DEBUG, KEY_SINGLE,
       KEY_LIST, KEY_DROP };

#define CLI_OPT(t, p) { t, offsetof(struct cli, p), 1 }
static const struct fuse_opt cli_opts[] = {
    CLI_OPT("l2-cache-size=%s", l2_cache_size),
    CLI_OPT("refcount-cache-size=%s", refcount_cache_size),
    CLI_OPT("cache=%s", cache_mode),
    CLI_OPT("backing=%s", backing),
    CLI_OPT("name=%s", name),
    CLI_OPT("io-trace=%s", io_trace),
    CLI_OPT("discard=%s", discard),
    CLI_OPT("detect-zeroes=%s", detect_zeroes),
    CLI_OPT("snapshot=%s", snapshot),
    CLI_OPT("create", create),
    CLI_OPT("size=%s", size),
    CLI_OPT("cluster_size=%s", cluster_size),
    CLI_OPT("backing_file=%s", backing_file),
    CLI_OPT("backing_fmt=%s", backing_format),
    CLI_OPT("uid=%s", uid),
    CLI_OPT("gid=%s", gid),
    CLI_OPT("umask=%s", umask),
    FUSE_OPT_KEY("--list-snapshots", KEY_LIST),
    /* Words mount(8) and fstab pass that mean nothing here. */
    FUSE_OPT_KEY("defaults", KEY_DROP),
    FUSE_OPT_KEY("auto", KEY_DROP),
    FUSE_OPT_KEY("noauto", KEY_DROP),
    FUSE_OPT_KEY("user", KEY_DROP),
    FUSE_OPT_KEY("nouser", KEY_DROP),
    FUSE_OPT_KEY("users", KEY_DROP),
    FUSE_OPT_KEY("_netdev", KEY_DROP),
    FUSE_OPT_KEY("nofail", KEY_DROP),
    FUSE_OPT_KEY("ro", KEY_RO),
    FUSE_OPT_KEY("rw", KEY_RW),
    FUSE_OPT_KEY("-h", KEY_HELP),
    FUSE_OPT_KEY("--help", KEY_HELP),
    FUSE_OPT_KEY("-V", KEY_VERSION),
    FUSE_OPT_KEY("--version", KEY_VERSION),
    FUSE_OPT_KEY("-f", KEY_FOREGROUND),
    FUSE_OPT_KEY("-d", KEY_DEBUG),
    FUSE_OPT_KEY("-s", KEY_SINGLE),
    FUSE_OPT_END
};

static void usage(FILE *out)
{
    fprintf(out,
"usage: qcow2fuse [-f] [-o OPTIONS] IMAGE MOUNTPOINT\n"
"       qcow2fuse --list-snapshots IMAGE\n"
"\n"
"Mount the qcow2 image IMAGE so that MOUNTPOINT/disk is its raw disk.\n"
"Unmount with: fusermount3 -u MOUNTPOINT\n"
"\n"
"  -f                       stay in the foreground (log to stderr)\n"
"  -d                       foreground with FUSE debug output\n"
"  -s                       serve requests on a single thread\n"
"  -h, --help               this help\n"
"  -V, --version            print the version\n"
"\n"
"  -o ro                    read-only: writes fail with EROFS\n"
"  -o l2-cache-size=BYTES   L2 table cache (K/M/G suffixes; default: enough\n"
"                           for the whole disk, at most 32M)\n"
"  -o refcount-cache-size=BYTES  refcount block cache (default 1M)\n"
"  -o cache=writeback|writethrough  metadata cache mode (default writeback)\n"
"  -o backing=allow|deny|DIR  backing files: any regular file (default),\n"
"                           none, or only regular files below DIR; as root,\n"
"                           only files the image's owner could open, unless\n"
"                           backing=allow is given\n"
"  -o discard=unmap|ignore  punched ranges give their space back (default)\n"
"                           or stay allocated; they read as zeros either way\n"
"  -o detect-zeroes=off|on|unmap  all-zero writes become zero clusters\n"
"                           (unmap: and give their space back; default off)\n"
"  -o snapshot=NAME         show internal snapshot NAME (or ID), read-only\n"
"  -o create,size=SIZE[,cluster_size=N][,backing_file=FILE[,backing_fmt=F]]\n"
"                           create IMAGE (qcow2 v3) first if it does not exist\n"
"  -o uid=N,gid=N,umask=M   owner and permissions of the disk file\n"
"                           (default: those of the image file)\n"
"  -o name=FILE             name of the disk file (default: disk)\n"
"  -o allow_other           let other users access the mount (FUSE option)\n");
}

static int parse_size(const char *s, const char *what, uint64_t *out)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno || end == s)
        goto bad;
    switch (*end) {
    case 'k': case 'K': v <<= 10; end++; break;
    case 'm': case 'M': v <<= 20; end++; break;
    case 'g': case 'G': v <<= 30; end++; break;
    case 't': case 'T': v <<= 40; end++; break;
    }
    if (*end == 'B' || *end == 'b')
        end++;
    if (*end)
        goto bad;
    *out = v;
    return 0;
bad:
    fprintf(stderr, "qcow2fuse: invalid %s \"%s\": expected a size in bytes "
            "with an optional K, M, G or T suffix\n", what, s);
    return -EINVAL;
}

static int opt_proc(void *data, const char *arg, int key, struct fuse_args *outargs)
{
    struct cli *cli = data;

    switch (key) {
    case FUSE_OPT_KEY_NONOPT:
        if (!cli->image) {
            cli->image = strdup(arg);
            return 0;
        }
        if (!cli->mountpoint && !cli->list_snapshots) {
            cli->mountpoint = strdup(arg);
            return 0;
        }
        fprintf(stderr, "qcow2fuse: unexpected argument \"%s\"\n", arg);
        return -1;
    case KEY_HELP:
        cli->show_help = 1;
        return 0;
    case KEY_VERSION:
        cli->show_version = 1;
        return 0;
    case KEY_RO:
        cli->read_only = 1;
        return 1;               /* also a kernel mount option */
    case KEY_RW:
        cli->read_only = 0;
        return 0;
    case KEY_FOREGROUND:
        cli->foreground = 1;
        return 0;
    case KEY_DEBUG:
        cli->foreground = 1;
        cli->debug = 1;
        return 1;
    case KEY_SINGLE:
        cli->single_thread = 1;
        return 0;
    case KEY_LIST:
        cli->list_snapshots = 1;
        return 0;
    case KEY_DROP:
        return 0;
    }
    return 1;
}

/* fsname is shown in /proc/mounts: the image path, with option syntax
 * escaped. */
static char *fsname_arg(const char *path)
{
    size_t n = strlen(path);
    char *s = malloc(2 * n + 32), *p;

    if (!s)
        return NULL;
    p = s + sprintf(s, "-osubtype=qcow2fuse,fsname=");
    for (size_t i = 0; i < n; i++) {
        if (path[i] == ',' || path[i] == '\\')
            *p++ = '\\';
        *p++ = path[i];
    }
    *p = '\0';
    return s;
}

static int list_snapshots(const char *path)
{
    struct snapshot_table t;
    struct qcow2_header h;
    struct io *io;
    char err[512];
    unsigned bad_entries = 0;
    int ret;

    ret = io_open_file(path, false, &io);
    if (ret < 0) {
        fprintf(stderr, "qcow2fuse: cannot open %s: %s\n", path, strerror(-ret));
        return 1;
    }
    ret = header_read(io, &h, err, sizeof(err));
    if (ret < 0 && err[0])
        fprintf(stderr, "qcow2fuse: %s: %s\n", path, err);
    if (ret == 0) {
        ret = snapshot_table_read(io, &h, &t, err, sizeof(err));
        if (ret == -EINVAL)
            fprintf(stderr, "qcow2fuse: %s: %s\n", path, err);
        if (ret == 0) {
            printf("%-10s %-20s %20s %-19s %s\n", "ID", "NAME", "DISK SIZE",
                   "DATE", "VM CLOCK");
            for (uint32_t i = 0; i < t.nb; i++) {
                char date[32];
                time_t tt = (time_t)t.s[i].date_sec;
                struct tm tm;
                uint64_t ms = t.s[i].vm_clock_nsec / 1000000;
                /* The others are still listed; the status says one
                 * was not. */
                if (snapshot_check_view(&h, &t.s[i], err, sizeof(err)) < 0) {
                    fprintf(stderr, "qcow2fuse: %s: %s\n", path, err);
                    bad_entries++;
                    continue;
                }
                strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S",
                         localtime_r(&tt, &tm));
                printf("%-10s %-20s %20llu %-19s %02llu:%02llu:%02llu.%03llu\n",
                       t.s[i].id, t.s[i].name,
                       (unsigned long long)(t.s[i].disk_size ? t.s[i].disk_size : h.size),
                       date, (unsigned long long)(ms / 3600000),
                       (unsigned long long)(ms / 60000 % 60),
                       (unsigned long long)(ms / 1000 % 60),
                       (unsigned long long)(ms % 1000));
            }
            snapshot_table_free(&t);
        }
        header_free(&h);
    }
    if (ret < 0 && ret != -EINVAL)
        fprintf(stderr, "qcow2fuse: %s: %s\n", path, strerror(-ret));
    io_close(io);
    return ret < 0 || bad_entries ? 1 : 0;
}

/*
 * The disk file may back a loop device (or swap) whose dirty pages memory
 * reclaim writes through us: an allocation of ours that waits for that
 * reclaim would wait for itself.  PR_SET_IO_FLUSHER makes the kernel keep
 * our allocations from doing I/O and throttles our writes only against the
 * device we write to.  The flag belongs to the task and new threads inherit
 * it, so this runs in the daemon process (after the fork to the
 * background) before any other thread exists.  Refused without
 * CAP_SYS_RESOURCE or before Linux 5.6: we go on without it.
 */
static void set_io_flusher(void)
{
    if (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0) {
        log_debug("PR_SET_IO_FLUSHER set: reclaim does not write through this daemon");
        return;
    }
    /* Expected for an unprivileged user; worth a warning for root, which
     * usually has the capability. */
    log_msg(geteuid() == 0 ? LOG_LEVEL_WARN : LOG_LEVEL_INFO,
            "PR_SET_IO_FLUSHER refused (%s; it needs CAP_SYS_RESOURCE and Linux "
            "5.6 or later): a loop device or swap file on the disk may deadlock "
            "under memory pressure", strerror(errno));
}

/* SIGUSR1 logs the statistics; a thread waits for it so that no request
 * thread is interrupted. */
static void *stats_thread(void *arg)
{
    struct image *img = arg;
    sigset_t set;
    int sig;

    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    for (;;) {
        char buf[1024];
        if (sigwait(&set, &sig) != 0)
            continue;
        image_stats(img, buf, sizeof(buf));
        log_info("statistics: %s", buf);
    }
    return NULL;
}

static int parse_id(const char *s, const char *what, unsigned long max, unsigned long *out)
{
    char *end;
    errno = 0;
    *out = strtoul(s, &end, what[0] == 'u' && what[1] == 'm' ? 8 : 10);
    if (errno || end == s || *end || *out > max) {
        fprintf(stderr, "qcow2fuse: invalid %s \"%s\"\n", what, s);
        return -EINVAL;
    }
    return 0;
}

int main(int argc, char *argv[])
{
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    struct cli cli = { 0 };
    struct image_options iopts = { .trace_fd = -1 };
    struct fuse_ops_config fcfg = { 0 };
    struct fuse_ops_ctx *ctx = NULL;
    struct fuse_session *se = NULL;
    struct image *img = NULL;
    char *image_real = NULL, *mount_real = NULL, *fsname = NULL;
    struct stat st;
    int ret = 1, err;

    if (fuse_opt_parse(&args, &cli, cli_opts, opt_proc) < 0)
        goto out;
    if (cli.show_help) {
        usage(stdout);
        ret = 0;
        goto out;
    }
    if (cli.show_version) {
        printf("qcow2fuse %s (libfuse %s)\n", QCOW2FUSE_VERSION, fuse_pkgversion());
        ret = 0;
        goto out;
    }
    if (cli.list_snapshots) {
        if (!cli.image) {
            usage(stderr);
            goto out;
        }
        ret = list_snapshots(cli.image);
        goto out;
    }
    if (!cli.image || !cli.mountpoint) {
        usage(stderr);
        goto out;
    }

    iopts.read_only = cli.read_only;
    iopts.snapshot = cli.snapshot;
    if (cli.l2_cache_size &&
        parse_size(cli.l2_cache_size, "l2-cache-size", &iopts.l2_cache_size) < 0)
        goto out;
    if (cli.refcount_cache_size &&
        parse_size(cli.refcount_cache_size, "refcount-cache-size",
                   &iopts.refcount_cache_size) < 0)
        goto out;
    if (cli.cache_mode) {
        if (strcmp(cli.cache_mode, "writethrough") == 0)
            iopts.writethrough = true;
        else if (strcmp(cli.cache_mode, "writeback") != 0) {
            fprintf(stderr, "qcow2fuse: cache=%s: expected writeback or "
                    "writethrough\n", cli.cache_mode);
            goto out;
        }
    }
    iopts.backing.policy = BACKING_ALLOW;
    if (cli.backing) {
        if (strcmp(cli.backing, "allow") == 0) {
            iopts.backing.policy = BACKING_ALLOW;
            iopts.backing.skip_owner_check = true;  /* only when asked for */
        } else if (strcmp(cli.backing, "deny") == 0)
            iopts.backing.policy = BACKING_DENY;
        else if (stat(cli.backing, &st) == 0 && S_ISDIR(st.st_mode)) {
            iopts.backing.policy = BACKING_DIR;
            iopts.backing.dir = cli.backing;
        } else {
            fprintf(stderr, "qcow2fuse: backing=%s: expected allow, deny or an "
                    "existing directory\n", cli.backing);
            goto out;
        }
    }
    if (cli.discard) {
        if (strcmp(cli.discard, "unmap") == 0 || strcmp(cli.discard, "on") == 0)
            iopts.discard = IMAGE_DISCARD_UNMAP;
        else if (strcmp(cli.discard, "ignore") == 0 || strcmp(cli.discard, "off") == 0)
            iopts.discard = IMAGE_DISCARD_IGNORE;
        else {
            fprintf(stderr, "qcow2fuse: discard=%s: expected unmap or ignore\n",
                    cli.discard);
            goto out;
        }
    }
    if (cli.detect_zeroes) {
        if (strcmp(cli.detect_zeroes, "off") == 0)
            iopts.detect_zeroes = IMAGE_DETECT_ZEROES_OFF;
        else if (strcmp(cli.detect_zeroes, "on") == 0)
            iopts.detect_zeroes = IMAGE_DETECT_ZEROES_ON;
        else if (strcmp(cli.detect_zeroes, "unmap") == 0)
            iopts.detect_zeroes = IMAGE_DETECT_ZEROES_UNMAP;
        else {
            fprintf(stderr, "qcow2fuse: detect-zeroes=%s: expected off, on or "
                    "unmap\n", cli.detect_zeroes);
            goto out;
        }
    }
    if (cli.io_trace) {
        iopts.trace_fd = open(cli.io_trace, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (iopts.trace_fd < 0) {
            fprintf(stderr, "qcow2fuse: io-trace=%s: %s\n", cli.io_trace, strerror(errno));
            goto out;
        }
    }
    if (cli.name && (!cli.name[0] || strchr(cli.name, '/') ||
                     !strcmp(cli.name, ".") || !strcmp(cli.name, ".."))) {
        fprintf(stderr, "qcow2fuse: name=%s: not a valid file name\n", cli.name);
        goto out;
    }

    if (stat(cli.mountpoint, &st) < 0 || !S_ISDIR(st.st_mode)) {
        fprintf(stderr, "qcow2fuse: mount point %s: %s\n", cli.mountpoint,
                errno && !S_ISDIR(st.st_mode) ? strerror(errno) : "not a directory");
        goto out;
    }
    /* Absolute from here on: the daemon changes to / when it goes to the
     * background, and the unmount at exit (signals included) must still
     * find the mount point. */
    mount_real = realpath(cli.mountpoint, NULL);
    if (!mount_real) {
        fprintf(stderr, "qcow2fuse: mount point %s: %s\n", cli.mountpoint, strerror(errno));
        goto out;
    }
    if (cli.create && access(cli.image, F_OK) != 0) {
        struct create_options co = { .backing_file = cli.backing_file,
                                     .backing_format = cli.backing_format };
        uint64_t v = 0;
        if (cli.size && parse_size(cli.size, "size", &co.size) < 0)
            goto out;
        if (!cli.size && !cli.backing_file) {
            fprintf(stderr, "qcow2fuse: -o create needs size=SIZE (or "
                    "backing_file=FILE)\n");
            goto out;
        }
        if (cli.cluster_size) {
            if (parse_size(cli.cluster_size, "cluster_size", &v) < 0)
                goto out;
            if (v < 512 || v > (2u << 20) || (v & (v - 1))) {
                fprintf(stderr, "qcow2fuse: cluster_size=%s: must be a power of "
                        "two from 512 to 2M\n", cli.cluster_size);
                goto out;
            }
            co.cluster_bits = (unsigned)__builtin_ctzll(v);
        }
        if (create_image(cli.image, &co) < 0)
            goto out;
        log_info("created %s", cli.image);
    } else if (!cli.create && (cli.size || cli.cluster_size || cli.backing_file)) {
        fprintf(stderr, "qcow2fuse: size=, cluster_size= and backing_file= only "
                "apply with -o create\n");
        goto out;
    }
    image_real = realpath(cli.image, NULL);
    if (!image_real) {
        fprintf(stderr, "qcow2fuse: image %s: %s\n", cli.image, strerror(errno));
        goto out;
    }
    if (stat(image_real, &st) < 0) {
        fprintf(stderr, "qcow2fuse: image %s: %s\n", cli.image, strerror(errno));
        goto out;
    }

    err = image_open(image_real, &iopts, &img);
    if (err < 0)
        goto out;

    fcfg.disk_name = cli.name ? cli.name : "disk";
    fcfg.uid = st.st_uid;
    fcfg.gid = st.st_gid;
    fcfg.mode = st.st_mode & 0666;
    {
        unsigned long v;
        if (cli.uid) {
            if (parse_id(cli.uid, "uid", UINT32_MAX - 1, &v) < 0)
                goto out_close;
            fcfg.uid = (uid_t)v;
        }
        if (cli.gid) {
            if (parse_id(cli.gid, "gid", UINT32_MAX - 1, &v) < 0)
                goto out_close;
            fcfg.gid = (gid_t)v;
        }
        if (cli.umask) {
            if (parse_id(cli.umask, "umask", 0777, &v) < 0)
                goto out_close;
            fcfg.mode = 0666 & ~(mode_t)v;
        }
    }
    fcfg.direct_io = true;
    fcfg.max_background = 64;
    ctx = fuse_ops_ctx_new(img, &fcfg);
    fsname = fsname_arg(image_real);
    if (!ctx || !fsname || fuse_opt_add_arg(&args, fsname) < 0) {
        fprintf(stderr, "qcow2fuse: out of memory\n");
        goto out_close;
    }

    se = fuse_session_new(&args, fuse_ops_table(), sizeof(struct fuse_lowlevel_ops), ctx);
    if (!se)
        goto out_close;         /* libfuse printed why */
    if (fuse_set_signal_handlers(se) < 0)
        goto out_close;
    if (fuse_session_mount(se, mount_real) < 0) {
        fprintf(stderr, "qcow2fuse: cannot mount on %s\n", mount_real);
        goto out_close;
    }
    if (fuse_daemonize(cli.foreground) < 0)
        goto out_unmount;
    if (!cli.foreground)
        log_use_syslog("qcow2fuse");
    set_io_flusher();

    {
        sigset_t set;
        pthread_t tid;
        sigemptyset(&set);
        sigaddset(&set, SIGUSR1);
        pthread_sigmask(SIG_BLOCK, &set, NULL);
        if (pthread_create(&tid, NULL, stats_thread, img) == 0)
            pthread_detach(tid);
    }
    if (cli.single_thread) {
        err = fuse_session_loop(se);
    } else {
        struct fuse_loop_config *lc = fuse_loop_cfg_create();
        if (!lc) {
            log_error("out of memory");
            goto out_unmount;
        }
        fuse_loop_cfg_set_clone_fd(lc, 1);
        fuse_loop_cfg_set_max_threads(lc, 16);
        fuse_loop_cfg_set_idle_threads(lc, 8);
        err = fuse_session_loop_mt(se, lc);
        fuse_loop_cfg_destroy(lc);
    }
    ret = err < 0 ? 1 : 0;

out_unmount:
    fuse_session_unmount(se);
out_close:
    if (se) {
        fuse_remove_signal_handlers(se);
        fuse_session_destroy(se);
    }
    if (img && (err = image_close(img)) < 0) {
        /* Status 1: what the guest wrote may not all be on disk (with -f
         * the caller sees it; a daemon's message goes to syslog). */
        log_error("closing %s failed: %s; exiting with status 1: check the image "
                  "(qemu-img check) before trusting what was written",
                  image_real, strerror(-err));
        ret = 1;
    }
    fuse_ops_ctx_free(ctx);
out:
    fuse_opt_free_args(&args);
    free(image_real);
    free(mount_real);
    free(fsname);
    free(cli.image);
    free(cli.mountpoint);
    free(cli.l2_cache_size);
    free(cli.refcount_cache_size);
    free(cli.cache_mode);
    free(cli.backing);
    free(cli.name);
    free(cli.io_trace);
    free(cli.discard);
    free(cli.detect_zeroes);
    free(cli.snapshot);
    free(cli.size);
    free(cli.cluster_size);
    free(cli.backing_file);
    free(cli.backing_format);
    free(cli.uid);
    free(cli.gid);
    free(cli.umask);
    return ret;
}
