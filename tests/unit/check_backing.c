/*
 * check_backing — backing_open() acting for an image's owner: a daemon
 * running as root opens what an image names only if the image's owner (and
 * the top image's owner) could, in the calling thread only, and gives its
 * own identity back afterwards.  The owner cases need root; a daemon that
 * is not root is tested in a child that drops to nobody.
 */
#include "testutil.h"

#include "backing.h"

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <sys/wait.h>

#define NOBODY ((uid_t)65534)
#define NOGROUP ((gid_t)65534)
/* A uid with no passwd entry (checked in the test that uses it). */
#define NO_SUCH_USER ((uid_t)3999999)

static char dir[64];
static char image[128];         /* the naming image: only its directory counts */

static void make_file(const char *name, mode_t mode, uid_t uid, gid_t gid,
                      const char *text)
{
    char path[256];
    int fd;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    ck_assert_int_eq(fchown(fd, uid, gid), 0);
    ck_assert_int_eq(fchmod(fd, mode), 0);
    close(fd);
}

static void setup(void)
{
    snprintf(dir, sizeof(dir), "/tmp/check_backing.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    ck_assert_int_eq(chmod(dir, 0711), 0);      /* nobody may search it */
    snprintf(image, sizeof(image), "%s/top.qcow2", dir);
    tu_log_capture();
}

static void teardown(void)
{
    char cmd[128];

    tu_log_release();
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "check_backing: could not remove %s\n", dir);
}

static const struct backing_options default_opts = { BACKING_ALLOW, NULL, false, 0 };

/* backing_open for @owners; on success the file must read @want. */
static int try_open(const char *name, const struct backing_options *opts, uid_t top,
                    uid_t namer, bool writable, const char *want)
{
    struct backing_owners owners = { .top = top, .namer = namer };
    struct io *io = NULL;
    char *path = NULL;
    char buf[64] = { 0 };
    int ret;

    ret = backing_open(image, name, "backing file", opts, &owners, writable, &path, &io);
    if (ret == 0) {
        ck_assert_ptr_nonnull(io);
        ck_assert_ptr_nonnull(path);
        ck_assert_int_eq(io_pread(io, buf, strlen(want), 0), 0);
        ck_assert_str_eq(buf, want);
        io_close(io);
        free(path);
    }
    return ret;
}

/* The thread has its own identity back: fsuid, fsgid and groups. */
static void assert_identity_restored(gid_t fsgid, int ngroups, const gid_t *groups)
{
    gid_t now[64];

    ck_assert_int_eq((int)setfsuid((uid_t)-1), 0);
    ck_assert_int_eq((int)setfsgid((gid_t)-1), (int)fsgid);
    ck_assert_int_eq(getgroups(64, now), ngroups);
    ck_assert_int_eq(memcmp(now, groups, (size_t)ngroups * sizeof(gid_t)), 0);
}

START_TEST(root_file_0600_refused_for_nobody)
{
    gid_t groups[64];
    int ngroups = getgroups(64, groups);
    gid_t fsgid = (gid_t)setfsgid((gid_t)-1);

    make_file("secret", 0600, 0, 0, "secret");
    ck_assert_int_eq(try_open("secret", &default_opts, NOBODY, NOBODY, false, "secret"),
                     -EPERM);
    struct tu_log_state *log = tu_log_state();
    ck_assert_uint_eq(log->nb_errors, 1);
    ck_assert_ptr_nonnull(strstr(log->last, "user nobody (uid 65534)"));
    ck_assert_ptr_nonnull(strstr(log->last, "/secret"));
    ck_assert_ptr_nonnull(strstr(log->last, "-o backing=allow"));
    ck_assert_ptr_nonnull(strstr(log->last, "Permission denied"));
    assert_identity_restored(fsgid, ngroups, groups);

    /* As root for root's image, or with -o backing=allow: opened. */
    ck_assert_int_eq(try_open("secret", &default_opts, 0, 0, false, "secret"), 0);
    struct backing_options allow = default_opts;
    allow.skip_owner_check = true;
    ck_assert_int_eq(try_open("secret", &allow, NOBODY, NOBODY, false, "secret"), 0);
    assert_identity_restored(fsgid, ngroups, groups);
}
END_TEST

START_TEST(world_readable_file_opens_for_nobody)
{
    make_file("base", 0644, 0, 0, "base");
    ck_assert_int_eq(try_open("base", &default_opts, NOBODY, NOBODY, false, "base"), 0);
    ck_assert_uint_eq(tu_log_state()->nb_errors, 0);
    /* Readable is not writable: an external data file of a writable mount. */
    ck_assert_int_eq(try_open("base", &default_opts, NOBODY, NOBODY, true, "base"),
                     -EPERM);
}
END_TEST

START_TEST(group_of_the_owner_counts)
{
    /* nobody's primary group nogroup may read it, and only that group. */
    make_file("grp", 0640, 0, NOGROUP, "grp");
    ck_assert_int_eq(try_open("grp", &default_opts, NOBODY, NOBODY, false, "grp"), 0);
    make_file("rootgrp", 0640, 0, 0, "rootgrp");
    ck_assert_int_eq(try_open("rootgrp", &default_opts, NOBODY, NOBODY, false, "x"),
                     -EPERM);
}
END_TEST

START_TEST(directory_must_be_searchable)
{
    char sub[128];

    snprintf(sub, sizeof(sub), "%s/private", dir);
    ck_assert_int_eq(mkdir(sub, 0700), 0);
    make_file("private/f", 0644, 0, 0, "f");
    ck_assert_int_eq(try_open("private/f", &default_opts, NOBODY, NOBODY, false, "f"),
                     -EPERM);
    ck_assert_ptr_nonnull(strstr(tu_log_state()->last, "cannot reach it"));
    /* A symlink nobody can follow to a file behind that directory. */
    char link[160];
    snprintf(link, sizeof(link), "%s/link", dir);
    ck_assert_int_eq(symlink("private/f", link), 0);
    ck_assert_int_eq(try_open("link", &default_opts, NOBODY, NOBODY, false, "f"), -EPERM);
    ck_assert_int_eq(chmod(sub, 0711), 0);
    ck_assert_int_eq(try_open("link", &default_opts, NOBODY, NOBODY, false, "f"), 0);
}
END_TEST

START_TEST(both_owners_must_be_able)
{
    make_file("mine", 0600, NOBODY, NOGROUP, "mine");
    /* nobody's image over nobody's file: fine. */
    ck_assert_int_eq(try_open("mine", &default_opts, NOBODY, NOBODY, false, "mine"), 0);
    /* Root's top image over nobody's image naming a root-only file: the
     * namer chose the name. */
    make_file("root", 0600, 0, 0, "root");
    ck_assert_int_eq(try_open("root", &default_opts, 0, NOBODY, false, "root"), -EPERM);
    ck_assert_ptr_nonnull(strstr(tu_log_state()->last, "who owns that image"));
    /* Another user's top image over nobody's image naming nobody's file:
     * the top owner is who the disk is shown for. */
    ck_assert_int_eq(try_open("mine", &default_opts, NO_SUCH_USER, NOBODY, false, "mine"),
                     -EPERM);
    ck_assert_ptr_nonnull(strstr(tu_log_state()->last, "who owns the top image"));
    ck_assert_ptr_nonnull(strstr(tu_log_state()->last, "no such user"));
}
END_TEST

START_TEST(user_without_passwd_entry)
{
    ck_assert_ptr_null(getpwuid(NO_SUCH_USER));
    make_file("world", 0644, 0, 0, "world");
    ck_assert_int_eq(try_open("world", &default_opts, NO_SUCH_USER, NO_SUCH_USER, false,
                              "world"), 0);
    /* No groups at all but the overflow one, never root's. */
    make_file("rootgrp", 0640, 0, 0, "rootgrp");
    ck_assert_int_eq(try_open("rootgrp", &default_opts, NO_SUCH_USER, NO_SUCH_USER, false,
                              "x"), -EPERM);
}
END_TEST

START_TEST(memory_image_has_no_owner)
{
    struct io *io;

    ck_assert_int_eq(io_open_memory(NULL, 0, &io), 0);
    ck_assert_uint_eq(backing_owner(io), BACKING_NO_OWNER);
    io_close(io);
    make_file("secret", 0600, 0, 0, "secret");
    ck_assert_int_eq(try_open("secret", &default_opts, BACKING_NO_OWNER, BACKING_NO_OWNER,
                              false, "secret"), 0);
}
END_TEST

START_TEST(file_owner_is_read_from_the_descriptor)
{
    char path[160];
    struct io *io;

    make_file("img", 0644, NOBODY, NOGROUP, "img");
    snprintf(path, sizeof(path), "%s/img", dir);
    ck_assert_int_eq(io_open_file(path, false, &io), 0);
    ck_assert_uint_eq(backing_owner(io), NOBODY);
    /* What the name points at later does not change whom we act for. */
    ck_assert_int_eq(unlink(path), 0);
    make_file("img", 0644, 0, 0, "img");
    ck_assert_uint_eq(backing_owner(io), NOBODY);
    io_close(io);
}
END_TEST

/* Not root: nothing to act for anyone; the kernel checks as the daemon. */
static int open_as_daemon_user(void)
{
    make_file("own", 0600, geteuid(), getegid(), "own");
    return try_open("own", &default_opts, NO_SUCH_USER, NO_SUCH_USER, false, "own");
}

START_TEST(non_root_daemon_unchanged)
{
    if (geteuid() != 0) {
        ck_assert_int_eq(open_as_daemon_user(), 0);
        return;
    }
    /* Root: a child becomes nobody for good. */
    ck_assert_int_eq(chown(dir, NOBODY, NOGROUP), 0);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        if (setgroups(0, NULL) < 0 || setresgid(NOGROUP, NOGROUP, NOGROUP) < 0 ||
            setresuid(NOBODY, NOBODY, NOBODY) < 0)
            _exit(2);
        _exit(open_as_daemon_user() == 0 ? 0 : 1);
    }
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);
}
END_TEST

static Suite *backing_suite(void)
{
    Suite *s = suite_create("backing");
    TCase *tc = tcase_create("owner");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    if (geteuid() == 0) {
        tcase_add_test(tc, root_file_0600_refused_for_nobody);
        tcase_add_test(tc, world_readable_file_opens_for_nobody);
        tcase_add_test(tc, group_of_the_owner_counts);
        tcase_add_test(tc, directory_must_be_searchable);
        tcase_add_test(tc, both_owners_must_be_able);
        tcase_add_test(tc, user_without_passwd_entry);
        tcase_add_test(tc, memory_image_has_no_owner);
        tcase_add_test(tc, file_owner_is_read_from_the_descriptor);
    } else {
        fprintf(stderr, "check_backing: not running as root: only the non-root "
                "daemon case runs; the owner checks need root\n");
    }
    tcase_add_test(tc, non_root_daemon_unchanged);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(backing_suite());
}
