/*
 * qcow2check — check a qcow2 image's reference counts and metadata, and
 * repair what can be repaired.  Exit codes follow qemu-img check:
 * 0 clean, 1 the check could not complete, 2 corruptions, 3 leaks only.
 */
#include "check.h"
#include "header.h"
#include "io.h"
#include "log.h"
#include "meta.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum repair { REPAIR_NONE, REPAIR_LEAKS, REPAIR_ALL };

static void usage(FILE *out)
{
    fprintf(out,
"usage: qcow2check [-r leaks|all] [--output=human|json] IMAGE\n"
"\n"
"Check the reference counts and metadata of the qcow2 image IMAGE.\n"
"  -r leaks      free leaked clusters\n"
"  -r all        also rebuild the refcounts of clusters that are referenced\n"
"                more often than their refcount says, and fix OFLAG_COPIED\n"
"  --output=FMT  human (default) or json\n"
"Exit status: 0 clean, 1 check failed, 2 corruptions, 3 leaks only.\n");
}

static int open_and_check(struct io *io, struct qcow2_header *h, struct meta *m,
                          struct check_report *rep, struct check_refs **refs)
{
    int ret;

    memset(rep->count, 0, sizeof(rep->count));
    rep->corruptions = rep->leaks = rep->allocated_clusters = rep->image_end = 0;
    ret = check_count_refs(m, h, rep, refs);
    if (ret < 0)
        return ret;
    return check_compare(m, h, *refs, rep);
}

static int load_header(struct io *io, const char *path, struct qcow2_header *h)
{
    char err[512];
    int ret = header_read(io, h, err, sizeof(err));

    if (ret < 0 && err[0])
        fprintf(stderr, "qcow2check: %s: %s\n", path, err);
    return ret;
}

int main(int argc, char *argv[])
{
    static const struct option longopts[] = {
        { "repair", required_argument, NULL, 'r' },
        { "output", required_argument, NULL, 'o' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    enum repair repair = REPAIR_NONE;
    bool json = false;
    struct qcow2_header h;
    struct meta m;
    struct check_report rep = { 0 }, before = { 0 };
    struct check_refs *refs = NULL;
    struct io *io = NULL;
    const char *path;
    long fixed_leaks = 0, fixed_other = 0;
    int c, ret, status;

    log_set_ident("qcow2check");
    while ((c = getopt_long(argc, argv, "r:o:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'r':
            if (strcmp(optarg, "leaks") == 0)
                repair = REPAIR_LEAKS;
            else if (strcmp(optarg, "all") == 0)
                repair = REPAIR_ALL;
            else {
                fprintf(stderr, "qcow2check: -r %s: expected leaks or all\n", optarg);
                return 1;
            }
            break;
        case 'o':
            if (strcmp(optarg, "json") == 0)
                json = true;
            else if (strcmp(optarg, "human") != 0) {
                fprintf(stderr, "qcow2check: --output=%s: expected human or json\n",
                        optarg);
                return 1;
            }
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 1;
        }
    }
    if (optind != argc - 1) {
        usage(stderr);
        return 1;
    }
    path = argv[optind];

    ret = io_open_file(path, repair != REPAIR_NONE, &io);
    if (ret < 0) {
        fprintf(stderr, "qcow2check: cannot open %s: %s\n", path, strerror(-ret));
        return 1;
    }
    ret = io_lock_image(io, path, repair != REPAIR_NONE);
    if (ret < 0)
        goto fail_io;
    ret = load_header(io, path, &h);
    if (ret < 0)
        goto fail_io;
    if (h.incompatible_features & QCOW2_INCOMPAT_CORRUPT && repair == REPAIR_NONE)
        fprintf(stderr, "qcow2check: %s is marked corrupt (incompatible bit 1)\n", path);
    meta_init(&m, &h, io, repair == REPAIR_NONE);

    rep.log = json ? NULL : stdout;
    ret = open_and_check(io, &h, &m, &rep, &refs);
    if (ret < 0)
        goto fail;
    before = rep;

    if (repair != REPAIR_NONE && (rep.leaks || rep.corruptions)) {
        if (repair == REPAIR_ALL && rep.count[CHECK_REFCOUNT_TOO_LOW]) {
            ret = check_rebuild_refcounts(&m, &h, refs);
            if (ret < 0)
                goto fail;
            fixed_other += (long)rep.count[CHECK_REFCOUNT_TOO_LOW];
            /* The rebuilt structures make every refcount exact. */
            fixed_leaks = (long)rep.leaks;
        } else {
            long n = check_fix_leaks(&m, &h, refs);
            if (n < 0) {
                ret = (int)n;
                goto fail;
            }
            fixed_leaks = n;
        }
        /* After a refcount rebuild the right COPIED flags may differ from
         * what the first pass saw: fix them against the new counts. */
        if (repair == REPAIR_ALL) {
            long n = check_fix_copied(&m, &h, refs);
            if (n < 0) {
                ret = (int)n;
                goto fail;
            }
            fixed_other += n;
        }
        if (repair == REPAIR_ALL && (h.incompatible_features &
                                     (QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DIRTY))) {
            ret = meta_update_incompatible(&m, 0, QCOW2_INCOMPAT_CORRUPT |
                                                  QCOW2_INCOMPAT_DIRTY);
            h.incompatible_features = m.incompatible;
            if (ret == 0)
                ret = io_flush(io);
            if (ret < 0)
                goto fail;
        }
        if (!json)
            printf("The following inconsistencies were found and repaired:\n\n"
                   "    %ld leaked clusters\n    %ld corruptions\n\n"
                   "Double checking the fixed image now...\n",
                   fixed_leaks, fixed_other);
        check_refs_free(refs);
        refs = NULL;
        rep = (struct check_report){ .log = json ? NULL : stdout };
        ret = open_and_check(io, &h, &m, &rep, &refs);
        if (ret < 0)
            goto fail;
    }

    status = rep.corruptions ? 2 : rep.leaks ? 3 : 0;
    if (json) {
        printf("{\n    \"image-end-offset\": %llu,\n    \"total-clusters\": %llu,\n"
               "    \"check-errors\": 0,\n    \"leaks\": %llu,\n"
               "    \"corruptions\": %llu,\n    \"leaks-fixed\": %ld,\n"
               "    \"corruptions-fixed\": %ld,\n    \"allocated-clusters\": %llu,\n"
               "    \"filename\": \"%s\",\n    \"format\": \"qcow2\"\n}\n",
               (unsigned long long)rep.image_end,
               (unsigned long long)(m.virtual_size >> m.cluster_bits),
               (unsigned long long)rep.leaks, (unsigned long long)rep.corruptions,
               fixed_leaks, fixed_other, (unsigned long long)rep.allocated_clusters,
               path);
    } else {
        if (rep.corruptions)
            printf("\n%llu errors were found on the image.\nData may be corrupted, "
                   "or further writes to the image may corrupt it.\n",
                   (unsigned long long)rep.corruptions);
        if (rep.leaks)
            printf("\n%llu leaked clusters were found on the image.\nThis means "
                   "waste of disk space, but no harm to data.\n",
                   (unsigned long long)rep.leaks);
        if (!rep.corruptions && !rep.leaks)
            printf("No errors were found on the image.\n");
        printf("%llu/%llu = %.2f%% allocated clusters\nImage end offset: %llu\n",
               (unsigned long long)rep.allocated_clusters,
               (unsigned long long)((m.virtual_size + m.cluster_size - 1) >> m.cluster_bits),
               m.virtual_size ? 100.0 * (double)rep.allocated_clusters /
                   (double)((m.virtual_size + m.cluster_size - 1) >> m.cluster_bits) : 0.0,
               (unsigned long long)rep.image_end);
    }
    (void)before;
    check_refs_free(refs);
    header_free(&h);
    io_close(io);
    return status;

fail:
    fprintf(stderr, "qcow2check: checking %s failed: %s\n", path, strerror(-ret));
    check_refs_free(refs);
    header_free(&h);
    io_close(io);
    return 1;
fail_io:
    io_close(io);
    return 1;
}
