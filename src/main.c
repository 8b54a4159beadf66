/*
 * main — command line, image open, FUSE session set-up and the daemon's
 * lifetime: parse options, open the image (all errors to stderr before
 * anything is mounted), mount, daemonize, serve, and on unmount or signal
 * write every piece of metadata back before exiting.
 */
#include "create.h"
#include "fuse_server.h"
#include "fuse_uring.h"
#include "vfs.h"
#include "header.h"
#include "image.h"
#include "io.h"
#include "log.h"
#include "partition.h"
#include "snapdir.h"
#include "snapshot.h"
#include "stream.h"

#define FUSE_USE_VERSION FUSE_MAKE_VERSION(3, 12)
#include <fuse_lowlevel.h>

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

/*
 * The -o NAME=VALUE options.  fuse_opt_parse stores each one's text in
 * cli.text[]; cli_convert then reads the value of each, by the kind its
 * entry in option_specs[] gives, into cli.value[].
 */
enum cli_option {
    OPT_L2_CACHE_SIZE,
    OPT_REFCOUNT_CACHE_SIZE,
    OPT_CACHE,
    OPT_BACKING,
    OPT_DISCARD,
    OPT_DETECT_ZEROES,
    OPT_SIZE,
    OPT_CLUSTER_SIZE,
    OPT_UID,
    OPT_GID,
    OPT_UMASK,
    OPT_IO_TRACE,
    OPT_NAME,
    OPT_SNAPSHOT,
    OPT_BACKING_FILE,
    OPT_BACKING_FMT,
    OPT_STREAM,
    OPT_TRANSPORT,
    OPT_COUNT
};

enum value_kind {
    VALUE_TEXT,                 /* used as given */
    VALUE_SIZE,                 /* bytes, with an optional K, M, G or T (and B) */
    VALUE_NUMBER,               /* in the entry's base, at most its max */
    VALUE_WORD,                 /* one of the entry's words */
    VALUE_WORD_OR_DIR,          /* one of the words, or an existing directory */
};

/*
 * A word an option accepts and the value it stands for.  Aliases are
 * accepted but not offered in messages.  A list ends with word NULL; for
 * VALUE_WORD_OR_DIR that entry's value stands for a directory.
 */
struct option_word {
    const char *word;
    int value;
    bool alias;
};

enum { CACHE_WRITEBACK, CACHE_WRITETHROUGH };

static const struct option_word cache_words[] = {
    { "writeback", CACHE_WRITEBACK, false },
    { "writethrough", CACHE_WRITETHROUGH, false },
    { NULL, 0, false },
};
static const struct option_word backing_words[] = {
    { "allow", BACKING_ALLOW, false },
    { "deny", BACKING_DENY, false },
    { NULL, BACKING_DIR, false },
};
static const struct option_word discard_words[] = {
    { "unmap", IMAGE_DISCARD_UNMAP, false },
    { "ignore", IMAGE_DISCARD_IGNORE, false },
    { "on", IMAGE_DISCARD_UNMAP, true },
    { "off", IMAGE_DISCARD_IGNORE, true },
    { NULL, 0, false },
};
static const struct option_word detect_zeroes_words[] = {
    { "off", IMAGE_DETECT_ZEROES_OFF, false },
    { "on", IMAGE_DETECT_ZEROES_ON, false },
    { "unmap", IMAGE_DETECT_ZEROES_UNMAP, false },
    { NULL, 0, false },
};

/* How requests travel between the kernel and us (fuse_server). */
enum { TRANSPORT_AUTO, TRANSPORT_CLASSIC, TRANSPORT_IO_URING };

static const struct option_word transport_words[] = {
    { "auto", TRANSPORT_AUTO, false },
    { "classic", TRANSPORT_CLASSIC, false },
    { "io_uring", TRANSPORT_IO_URING, false },
    { NULL, 0, false },
};

struct option_spec {
    const char *name;           /* NAME, as messages show it */
    const char *templ;          /* "NAME=%s" for fuse_opt_parse */
    enum value_kind kind;
    int base;                   /* VALUE_SIZE, VALUE_NUMBER */
    unsigned long long max;     /* VALUE_NUMBER */
    const struct option_word *words;    /* VALUE_WORD, VALUE_WORD_OR_DIR */
    bool create_only;           /* read only when -o create makes the image */
};

#define OPTION(id, option_name, ...) \
    [id] = { .name = option_name, .templ = option_name "=%s", __VA_ARGS__ }
static const struct option_spec option_specs[OPT_COUNT] = {
    OPTION(OPT_L2_CACHE_SIZE, "l2-cache-size", .kind = VALUE_SIZE, .base = 10),
    OPTION(OPT_REFCOUNT_CACHE_SIZE, "refcount-cache-size", .kind = VALUE_SIZE, .base = 10),
    OPTION(OPT_CACHE, "cache", .kind = VALUE_WORD, .words = cache_words),
    OPTION(OPT_BACKING, "backing", .kind = VALUE_WORD_OR_DIR, .words = backing_words),
    OPTION(OPT_DISCARD, "discard", .kind = VALUE_WORD, .words = discard_words),
    OPTION(OPT_DETECT_ZEROES, "detect-zeroes", .kind = VALUE_WORD, .words = detect_zeroes_words),
    /* An existing image is mounted as it is, whatever these say. */
    OPTION(OPT_SIZE, "size", .kind = VALUE_SIZE, .base = 10, .create_only = true),
    OPTION(OPT_CLUSTER_SIZE, "cluster_size", .kind = VALUE_SIZE, .base = 10,
           .create_only = true),
    /* (uid_t)-1 means "no change" to chown(2): not an owner. */
    OPTION(OPT_UID, "uid", .kind = VALUE_NUMBER, .base = 10, .max = UINT32_MAX - 1),
    OPTION(OPT_GID, "gid", .kind = VALUE_NUMBER, .base = 10, .max = UINT32_MAX - 1),
    OPTION(OPT_UMASK, "umask", .kind = VALUE_NUMBER, .base = 8, .max = 0777),
    OPTION(OPT_IO_TRACE, "io-trace", .kind = VALUE_TEXT),
    OPTION(OPT_NAME, "name", .kind = VALUE_TEXT),
    OPTION(OPT_SNAPSHOT, "snapshot", .kind = VALUE_TEXT),
    OPTION(OPT_BACKING_FILE, "backing_file", .kind = VALUE_TEXT),
    OPTION(OPT_BACKING_FMT, "backing_fmt", .kind = VALUE_TEXT),
    /* stream=RATE; a bare "stream" is in flag_opts */
    OPTION(OPT_STREAM, "stream", .kind = VALUE_SIZE, .base = 10),
    OPTION(OPT_TRANSPORT, "transport", .kind = VALUE_WORD, .words = transport_words),
};

/* The command line; everything in it is released by cli_free. */
struct cli {
    char *image;
    char *mountpoint;
    int foreground;
    int debug;
    int single_thread;
    int read_only;
    int create;
    int partitions;             /* -o partitions: disk-p1, ... beside the disk */
    bool creating;              /* -o create and the image does not exist */
    int list_snapshots;
    int stream;                 /* -o stream, with or without a rate */
    int copy_on_read;
    int snapshots_dir;          /* enum snapdir_show: -o [no]snapshots */
    int show_help;
    int show_version;
    char *text[OPT_COUNT];      /* -o NAME=VALUE as given; NULL: not given */
    uint64_t value[OPT_COUNT];  /* read from text[] by cli_convert */
    unsigned cluster_bits;      /* of cluster_size=; 0: not given */
    /* Made from the above by main(). */
    char *image_path;           /* absolute, symbolic links resolved */
    char *mount_path;           /* likewise */
    int trace_fd;               /* io-trace=; -1: none */
};

enum { KEY_HELP, KEY_VERSION, KEY_RO, KEY_RW, KEY_FOREGROUND, KEY_DEBUG, KEY_SINGLE,
       KEY_LIST, KEY_DROP };

/* The options without a value; cli_parse puts option_specs[] in front. */
static const struct fuse_opt flag_opts[] = {
    { "create", offsetof(struct cli, create), 1 },
    { "stream", offsetof(struct cli, stream), 1 },
    { "copy-on-read", offsetof(struct cli, copy_on_read), 1 },
    { "partitions", offsetof(struct cli, partitions), 1 },
    { "snapshots", offsetof(struct cli, snapshots_dir), SNAPDIR_ALWAYS },
    { "nosnapshots", offsetof(struct cli, snapshots_dir), SNAPDIR_NEVER },
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
"  -o snapshots|nosnapshots  MOUNTPOINT/snapshots/NAME: each internal snapshot,\n"
"                           read-only (default: shown when there are any)\n"
"  -o create,size=SIZE[,cluster_size=N][,backing_file=FILE[,backing_fmt=F]]\n"
"                           create IMAGE (qcow2 v3) first if it does not exist\n"
"  -o uid=N,gid=N,umask=M   owner and permissions of the disk file\n"
"                           (default: those of the image file)\n"
"  -o name=FILE             name of the disk file (default: disk)\n"
"  -o copy-on-read          clusters a read fetches from the backing chain\n"
"                           are written into the image\n"
"  -o stream[=RATE]         copy the whole backing chain into the image in\n"
"                           the background (at most RATE bytes/s, K/M/G\n"
"                           suffixes; default unthrottled), then drop the\n"
"                           backing file; resumes at the next mount\n"
"  -o transport=auto|classic|io_uring  how FUSE requests travel: read and\n"
"                           write on /dev/fuse (classic), or io_uring ring\n"
"                           entries (needs enable_uring=Y in the fuse\n"
"                           module); auto is classic: io_uring was slower\n"
"                           for reads (bench/README)\n"
"  -o partitions            also one file per partition (MBR or GPT):\n"
"                           disk-p1, disk-p2, ... (read again when the\n"
"                           table is written through the disk file)\n"
"  -o allow_other           let other users access the mount (FUSE option)\n");
}

/*
 * A number in @o's base; for VALUE_SIZE with a K, M, G or T suffix (powers
 * of 1024), then an optional B.
 * Returns: 0, or -EINVAL after a message naming the option.
 */
static int parse_number(const struct option_spec *o, const char *text, uint64_t *out)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(text, &end, o->base);
    if (errno || end == text)
        goto bad;
    if (o->kind == VALUE_SIZE) {
        unsigned shift = 0;
        switch (*end) {
        case 'k': case 'K': shift = 10; end++; break;
        case 'm': case 'M': shift = 20; end++; break;
        case 'g': case 'G': shift = 30; end++; break;
        case 't': case 'T': shift = 40; end++; break;
        }
        /* A shift that loses bits would give a small, valid-looking size. */
        if (shift && v > (ULLONG_MAX >> shift))
            goto bad;
        v <<= shift;
        if (*end == 'B' || *end == 'b')
            end++;
    }
    if (*end || (o->kind == VALUE_NUMBER && v > o->max))
        goto bad;
    *out = v;
    return 0;
bad:
    if (o->kind == VALUE_SIZE)
        fprintf(stderr, "qcow2fuse: invalid %s \"%s\": expected a size in bytes "
                "with an optional K, M, G or T suffix\n", o->name, text);
    else
        fprintf(stderr, "qcow2fuse: invalid %s \"%s\"\n", o->name, text);
    return -EINVAL;
}

/*
 * One of @o's words (or, for VALUE_WORD_OR_DIR, an existing directory).
 * Returns: 0, or -EINVAL after a message naming the option and what it
 * accepts.
 */
static int parse_word(const struct option_spec *o, const char *text, uint64_t *out)
{
    enum { MAX_OFFERED = 8 };
    const char *offered[MAX_OFFERED + 1];   /* + the directory */
    const struct option_word *w;
    unsigned n = 0;
    struct stat st;
    char list[256];
    size_t len = 0;

    for (w = o->words; w->word; w++) {
        if (strcmp(text, w->word) == 0) {
            *out = (uint64_t)w->value;
            return 0;
        }
        if (!w->alias && n < MAX_OFFERED)
            offered[n++] = w->word;
    }
    if (o->kind == VALUE_WORD_OR_DIR) {
        if (stat(text, &st) == 0 && S_ISDIR(st.st_mode)) {
            *out = (uint64_t)w->value;
            return 0;
        }
        offered[n++] = "an existing directory";
    }
    /* "a or b", "a, b or c" */
    list[0] = '\0';
    for (unsigned i = 0; i < n && len < sizeof(list); i++)
        len += (size_t)snprintf(list + len, sizeof(list) - len, "%s%s",
                                i == 0 ? "" : i + 1 == n ? " or " : ", ", offered[i]);
    fprintf(stderr, "qcow2fuse: %s=%s: expected %s\n", o->name, text, list);
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

/*
 * fuse_opt_parse with one "NAME=%s" entry per option_specs[] entry (the
 * text goes to cli->text[]), then flag_opts.
 * Returns: 0, or -1 after a message.
 */
static int cli_parse(struct fuse_args *args, struct cli *cli)
{
    struct fuse_opt opts[OPT_COUNT + sizeof(flag_opts) / sizeof(flag_opts[0])];

    for (unsigned i = 0; i < OPT_COUNT; i++)
        opts[i] = (struct fuse_opt){ option_specs[i].templ,
                                     offsetof(struct cli, text) + i * sizeof(char *), 1 };
    memcpy(opts + OPT_COUNT, flag_opts, sizeof(flag_opts));
    return fuse_opt_parse(args, cli, opts, opt_proc);
}

/*
 * Read the value of every option given (in option_specs[] order) and check
 * the rules that involve more than one, before anything is created,
 * opened or mounted.
 * Returns: 0, or -EINVAL after a message naming the option.
 */
static int cli_convert(struct cli *cli)
{
    const char *name = cli->text[OPT_NAME];
    int ret = 0;

    cli->creating = cli->create && access(cli->image, F_OK) != 0;
    for (unsigned i = 0; i < OPT_COUNT && ret == 0; i++) {
        const struct option_spec *o = &option_specs[i];
        if (!cli->text[i] || o->kind == VALUE_TEXT || (o->create_only && !cli->creating))
            continue;
        if (o->kind == VALUE_WORD || o->kind == VALUE_WORD_OR_DIR)
            ret = parse_word(o, cli->text[i], &cli->value[i]);
        else
            ret = parse_number(o, cli->text[i], &cli->value[i]);
    }
    if (ret < 0)
        return ret;
    if (name && (!name[0] || strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, ".."))) {
        fprintf(stderr, "qcow2fuse: name=%s: not a valid file name\n", name);
        return -EINVAL;
    }
    if (!cli->create && (cli->text[OPT_SIZE] || cli->text[OPT_CLUSTER_SIZE] ||
                         cli->text[OPT_BACKING_FILE])) {
        fprintf(stderr, "qcow2fuse: size=, cluster_size= and backing_file= only "
                "apply with -o create\n");
        return -EINVAL;
    }
    if (cli->text[OPT_STREAM])
        cli->stream = 1;
    if ((cli->stream || cli->copy_on_read) && (cli->read_only || cli->text[OPT_SNAPSHOT])) {
        fprintf(stderr, "qcow2fuse: -o %s writes into the image: it cannot be "
                "combined with %s\n", cli->stream ? "stream" : "copy-on-read",
                cli->read_only ? "-o ro" : "-o snapshot= (a snapshot is shown read-only)");
        return -EINVAL;
    }
    /* Refused before mounting: the kernel offers io_uring only with its switch on. */
    if (cli->text[OPT_TRANSPORT] && cli->value[OPT_TRANSPORT] == TRANSPORT_IO_URING &&
        !fuse_uring_kernel_enabled()) {
        fprintf(stderr, "qcow2fuse: transport=io_uring: the kernel's FUSE over io_uring "
                "is off (/sys/module/fuse/parameters/enable_uring is not Y; as root: "
                "echo Y > /sys/module/fuse/parameters/enable_uring); use "
                "transport=classic or auto\n");
        return -EINVAL;
    }
    if (cli->creating && cli->text[OPT_CLUSTER_SIZE] &&
        create_cluster_bits(cli->value[OPT_CLUSTER_SIZE], &cli->cluster_bits) < 0) {
        fprintf(stderr, "qcow2fuse: cluster_size=%s: must be a power of two from 512 "
                "to 2M\n", cli->text[OPT_CLUSTER_SIZE]);
        return -EINVAL;
    }
    return 0;
}

static void cli_free(struct cli *cli)
{
    free(cli->image);
    free(cli->mountpoint);
    for (unsigned i = 0; i < OPT_COUNT; i++)
        free(cli->text[i]);
    free(cli->image_path);
    free(cli->mount_path);
    if (cli->trace_fd >= 0)
        close(cli->trace_fd);
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
                       (unsigned long long)snapshot_disk_size(&t.s[i], h.size),
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

static void start_stats_thread(struct image *img)
{
    sigset_t set;
    pthread_t tid;

    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    if (pthread_create(&tid, NULL, stats_thread, img) == 0)
        pthread_detach(tid);
}

/* -h, -V and --list-snapshots: they mount nothing.  Returns the exit status. */
static int info_command(const struct cli *cli)
{
    if (cli->show_help) {
        usage(stdout);
        return 0;
    }
    if (cli->show_version) {
        printf("qcow2fuse %s (libfuse %s)\n", QCOW2FUSE_VERSION, fuse_pkgversion());
        return 0;
    }
    if (!cli->image) {
        usage(stderr);
        return 1;
    }
    return list_snapshots(cli->image);
}

static int resolve_mount_point(struct cli *cli)
{
    struct stat st = { 0 };

    errno = 0;
    if (stat(cli->mountpoint, &st) < 0 || !S_ISDIR(st.st_mode)) {
        fprintf(stderr, "qcow2fuse: mount point %s: %s\n", cli->mountpoint,
                errno && !S_ISDIR(st.st_mode) ? strerror(errno) : "not a directory");
        return -1;
    }
    /* Absolute from here on: the daemon changes to / when it goes to the
     * background, and the unmount at exit (signals included) must still
     * find the mount point. */
    cli->mount_path = realpath(cli->mountpoint, NULL);
    if (!cli->mount_path) {
        fprintf(stderr, "qcow2fuse: mount point %s: %s\n", cli->mountpoint, strerror(errno));
        return -1;
    }
    return 0;
}

/* -o create of an image that does not exist.  Returns 0 or -errno. */
static int create_missing_image(const struct cli *cli)
{
    struct create_options co = {
        .size = cli->value[OPT_SIZE],
        .cluster_bits = cli->cluster_bits,
        .backing_file = cli->text[OPT_BACKING_FILE],
        .backing_format = cli->text[OPT_BACKING_FMT],
    };
    int ret;

    if (!cli->text[OPT_SIZE] && !cli->text[OPT_BACKING_FILE]) {
        fprintf(stderr, "qcow2fuse: -o create needs size=SIZE (or "
                "backing_file=FILE)\n");
        return -EINVAL;
    }
    ret = create_image(cli->image, &co);
    if (ret == 0)
        log_info("created %s", cli->image);
    return ret;
}

/*
 * Open the image with the options given.
 * On exit: *st is the image file's status (the disk file's default owner
 * and mode).
 * Returns: 0 or -errno, with a message.
 */
static int open_image(struct cli *cli, struct stat *st, struct image **img)
{
    const char *backing = cli->text[OPT_BACKING];
    enum backing_policy policy = backing ? (enum backing_policy)cli->value[OPT_BACKING]
                                         : BACKING_ALLOW;
    struct image_options o = {
        .read_only = cli->read_only,
        .discard = cli->text[OPT_DISCARD] ? (enum image_discard_mode)cli->value[OPT_DISCARD]
                                          : IMAGE_DISCARD_UNMAP,
        .detect_zeroes = cli->text[OPT_DETECT_ZEROES]
                             ? (enum image_detect_zeroes)cli->value[OPT_DETECT_ZEROES]
                             : IMAGE_DETECT_ZEROES_OFF,
        .l2_cache_size = cli->value[OPT_L2_CACHE_SIZE],
        .refcount_cache_size = cli->value[OPT_REFCOUNT_CACHE_SIZE],
        .writethrough = cli->text[OPT_CACHE] && cli->value[OPT_CACHE] == CACHE_WRITETHROUGH,
        .backing = {
            .policy = policy,
            .dir = policy == BACKING_DIR ? backing : NULL,
            .skip_owner_check = backing && policy == BACKING_ALLOW, /* only when asked for */
        },
        .snapshot = cli->text[OPT_SNAPSHOT],
        .copy_on_read = cli->copy_on_read,
    };
    const char *trace = cli->text[OPT_IO_TRACE];

    if (trace) {
        cli->trace_fd = open(trace, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (cli->trace_fd < 0) {
            int ret = -errno;
            fprintf(stderr, "qcow2fuse: io-trace=%s: %s\n", trace, strerror(-ret));
            return ret;
        }
    }
    o.trace_fd = cli->trace_fd;
    cli->image_path = realpath(cli->image, NULL);
    if (!cli->image_path || stat(cli->image_path, st) < 0) {
        int ret = -errno;
        fprintf(stderr, "qcow2fuse: image %s: %s\n", cli->image, strerror(-ret));
        return ret;
    }
    return image_open(cli->image_path, &o, img);
}

/*
 * The io_uring transport, started from the server's INIT (the kernel takes
 * ring registrations only once INIT is answered) and stopped after the
 * classic loop returns, before the unmount: its rings hold the /dev/fuse
 * file, so the connection would not end while they are open.
 */
struct ring_ctl {
    int dev_fd;
    bool single_thread;
    struct fuse_uring *uring;   /* written by the INIT worker, read after serve */
};

static void start_ring(void *arg, struct fuse_server *srv, const struct fuse_server_conn *conn)
{
    struct ring_ctl *rc = arg;
    struct fuse_uring_config cfg = {
        .dev_fd = rc->dev_fd,
        .max_write = conn->max_write,
        .max_pages = FUSE_SERVER_MAX_PAGES,
        .threads = rc->single_thread ? 1 : 0,
        /* Pinned, with deferred task work: the best of the layouts
         * measured (bench/README), though still behind classic on reads. */
        .pin = true,
        .defer_taskrun = true,
    };
    const char *layout = getenv("QCOW2FUSE_URING_LAYOUT");
    int ret;

    if (!conn->io_uring)
        return;                 /* fuse_server said why */
    if (layout && fuse_uring_parse_layout(layout, &cfg) < 0)
        log_warn("QCOW2FUSE_URING_LAYOUT=%s: not understood, ignored", layout);
    ret = fuse_uring_start(srv, &cfg, &rc->uring);
    if (ret == -ENOTRECOVERABLE)
        fuse_server_stop(srv);  /* unmount rather than leave every request hanging */
    else if (ret < 0)
        log_warn("FUSE over io_uring could not start (%s): requests stay on the "
                 "classic transport", strerror(-ret));
}

/*
 * The mount's tree over @img (with -o partitions the partition files
 * beside the disk, with the same owner and mode), the server that answers
 * its requests, and the libfuse session that only parses the FUSE options
 * and mounts (not yet mounted).  The disk file has the image file's owner
 * and mode (@st) unless uid=, gid= or umask= say otherwise.
 * Returns: 0 or -errno; *vfs, *parts, *srv and *se are to be freed either
 * way.
 */
static int session_new(const struct cli *cli, struct image *img, const struct stat *st,
                       struct fuse_args *args, struct ring_ctl *ring, struct vfs **vfs,
                       struct partition_set **parts, struct fuse_server **srv,
                       struct fuse_session **se)
{
    struct vfs_config vc = {
        .disk_name = cli->text[OPT_NAME] ? cli->text[OPT_NAME] : "disk",
        .uid = cli->text[OPT_UID] ? (uid_t)cli->value[OPT_UID] : st->st_uid,
        .gid = cli->text[OPT_GID] ? (gid_t)cli->value[OPT_GID] : st->st_gid,
        .disk_mode = cli->text[OPT_UMASK] ? 0666 & ~(mode_t)cli->value[OPT_UMASK]
                                          : st->st_mode & 0666,
        .direct_io = true,
    };
    struct fuse_server_config sc = {
        .max_background = 64,
        .debug = cli->debug,
        .io_uring = cli->text[OPT_TRANSPORT] && cli->value[OPT_TRANSPORT] == TRANSPORT_IO_URING,
        .after_init = start_ring,
        .after_init_arg = ring,
    };
    /* libfuse never sees a request: its operations stay empty. */
    static const struct fuse_lowlevel_ops no_ops;
    char *fsname = fsname_arg(cli->image_path);
    int ret = 0;

    if (vfs_new(img, &vc, vfs) < 0 ||
        (cli->partitions && partition_set_new(*vfs, img, vc.disk_name, vc.disk_mode,
                                              parts) < 0) ||
        snapdir_add(*vfs, img, (enum snapdir_show)cli->snapshots_dir, vc.disk_mode & 0444) < 0 ||
        fuse_server_new(*vfs, &sc, srv) < 0 || !fsname ||
        fuse_opt_add_arg(args, fsname) < 0) {
        fprintf(stderr, "qcow2fuse: out of memory\n");
        ret = -ENOMEM;
        goto out;
    }
    *se = fuse_session_new(args, &no_ops, sizeof(no_ops), NULL);
    if (!*se)
        ret = -EINVAL;          /* libfuse printed why */
    else
        fuse_server_handle_signals(*srv);
out:
    free(fsname);
    return ret;
}

int main(int argc, char *argv[])
{
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    struct cli cli = { .trace_fd = -1 };
    struct fuse_server *srv = NULL;
    struct ring_ctl ring = { .dev_fd = -1 };
    struct fuse_session *se = NULL;
    struct vfs *vfs = NULL;
    struct partition_set *parts = NULL;
    struct image *img = NULL;
    struct stream *stream = NULL;
    struct stat st;
    int ret = 1, err;

    if (cli_parse(&args, &cli) < 0)
        goto out;
    if (cli.show_help || cli.show_version || cli.list_snapshots) {
        ret = info_command(&cli);
        goto out;
    }
    if (!cli.image || !cli.mountpoint) {
        usage(stderr);
        goto out;
    }
    if (cli_convert(&cli) < 0 || resolve_mount_point(&cli) < 0)
        goto out;
    if (cli.creating && create_missing_image(&cli) < 0)
        goto out;
    if (open_image(&cli, &st, &img) < 0)
        goto out;

    if (session_new(&cli, img, &st, &args, &ring, &vfs, &parts, &srv, &se) < 0)
        goto out_close;
    if (fuse_session_mount(se, cli.mount_path) < 0) {
        fprintf(stderr, "qcow2fuse: cannot mount on %s\n", cli.mount_path);
        goto out_close;
    }
    if (fuse_daemonize(cli.foreground) < 0)
        goto out_unmount;
    if (!cli.foreground)
        log_use_syslog("qcow2fuse");
    if (cli.debug)
        log_set_level(LOG_LEVEL_DEBUG);
    set_io_flusher();
    start_stats_thread(img);
    if (cli.stream) {
        /* After the fork to the background: threads do not survive it. */
        struct stream_options so = { .rate = cli.value[OPT_STREAM] };
        if (stream_start(img, &so, &stream) < 0)
            goto out_unmount;
    }
    /* Until unmount or SIGTERM, SIGINT, SIGHUP: then every request read
     * has been answered, and unmounting ends those still queued. */
    ring.dev_fd = fuse_session_fd(se);
    ring.single_thread = cli.single_thread;
    err = fuse_server_serve(srv, fuse_session_fd(se), cli.single_thread ? 1 : 0);
    if (err < 0) {
        log_error("serving the FUSE connection failed: %s", strerror(-err));
        ret = 1;
    } else {
        ret = 0;
    }
    fuse_uring_stop(ring.uring);
    stream_stop(stream);

out_unmount:
    fuse_session_unmount(se);
out_close:
    if (se)
        fuse_session_destroy(se);
    /* Before the image closes: a node's release hook may still use it. */
    partition_set_free(parts);
    vfs_free(vfs);
    if (img && (err = image_close(img)) < 0) {
        /* Status 1: what the guest wrote may not all be on disk (with -f
         * the caller sees it; a daemon's message goes to syslog). */
        log_error("closing %s failed: %s; exiting with status 1: check the image "
                  "(qemu-img check) before trusting what was written",
                  cli.image_path, strerror(-err));
        ret = 1;
    }
    /* Last: until here a stop signal only ends serving (the write-back
     * above is not cut short by a second SIGTERM). */
    fuse_server_free(srv);
out:
    fuse_opt_free_args(&args);
    cli_free(&cli);
    return ret;
}
