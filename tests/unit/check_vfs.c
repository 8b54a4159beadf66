/*
 * Unit tests for vfs: the node table (add, look up, list, remove, inode
 * numbers never reused, -ESTALE for removed nodes, release after the last
 * request), and the checks every request passes before a provider is
 * called (clamping at the file's end, read-only, directories, fallocate
 * modes, the stats xattr's size rule, SEEK_DATA/SEEK_HOLE bounds).
 *
 * The disk file is a real image (create_image in a temporary directory);
 * other files are a memory provider that counts its calls.
 */
#include "testutil.h"

#include "create.h"
#include "image.h"
#include "vfs.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>

#define VSIZE   (4u << 20)

static char tmpdir[64];
static struct image *img;
static struct vfs *vfs;

/* ---- a memory provider ---- */

struct memfile {
    uint8_t data[8192];
    uint64_t size;
    bool read_only;
    int reads, writes, flushes, zeros, released;
    uint64_t last_off, last_len;
};

static uint64_t mem_size(void *p) { return ((struct memfile *)p)->size; }
static bool mem_ro(void *p) { return ((struct memfile *)p)->read_only; }

static int mem_read(void *p, void *buf, size_t len, uint64_t off)
{
    struct memfile *m = p;

    ck_assert_uint_le(off + len, m->size);     /* vfs clamped */
    memcpy(buf, m->data + off, len);
    m->reads++;
    return 0;
}

static int mem_write(void *p, const void *buf, size_t len, uint64_t off)
{
    struct memfile *m = p;

    ck_assert_uint_le(off + len, m->size);
    memcpy(m->data + off, buf, len);
    m->writes++;
    return 0;
}

static int mem_flush(void *p) { ((struct memfile *)p)->flushes++; return 0; }

static int mem_zero(void *p, uint64_t off, uint64_t len, bool punch)
{
    struct memfile *m = p;

    (void)punch;
    ck_assert_uint_le(off + len, m->size);
    memset(m->data + off, 0, len);
    m->zeros++;
    return 0;
}

static void mem_release(void *p) { ((struct memfile *)p)->released++; }

static const struct vfs_file_ops mem_ops = {
    .size = mem_size, .read_only = mem_ro, .read = mem_read, .write = mem_write,
    .flush = mem_flush, .zero = mem_zero, .release = mem_release,
};

static const struct vfs_file_ops mem_ops_readonly = {
    .size = mem_size, .read = mem_read, .release = mem_release,
};

static void setup(void)
{
    struct create_options co = { .size = VSIZE, .cluster_bits = 16 };
    struct image_options o = { .trace_fd = -1 };
    struct vfs_config vc = { .disk_name = "disk", .uid = 1234, .gid = 5678,
                             .disk_mode = 0640, .direct_io = true };
    char path[128];

    strcpy(tmpdir, "/tmp/check_vfs.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
    snprintf(path, sizeof(path), "%s/t.qcow2", tmpdir);
    ck_assert_int_eq(create_image(path, &co), 0);
    ck_assert_int_eq(image_open(path, &o, &img), 0);
    ck_assert_int_eq(vfs_new(img, &vc, &vfs), 0);
}

static void teardown(void)
{
    char path[128];

    vfs_free(vfs);
    ck_assert_int_eq(image_close(img), 0);
    snprintf(path, sizeof(path), "%s/t.qcow2", tmpdir);
    unlink(path);
    rmdir(tmpdir);
}

struct listing {
    char names[16][64];
    uint64_t inos[16];
    uint64_t next[16];
    int n, stop_after;
};

static int collect(void *arg, const char *name, const struct stat *st, uint64_t next_pos)
{
    struct listing *l = arg;

    if (l->stop_after && l->n == l->stop_after)
        return 1;
    ck_assert_int_lt(l->n, 16);
    snprintf(l->names[l->n], sizeof(l->names[0]), "%s", name);
    l->inos[l->n] = st->st_ino;
    l->next[l->n] = next_pos;
    l->n++;
    return 0;
}

START_TEST(root_and_disk)
{
    struct stat st;
    struct listing l = { 0 };

    ck_assert_int_eq(vfs_getattr(vfs, VFS_ROOT_INO, &st), 0);
    ck_assert(S_ISDIR(st.st_mode));
    ck_assert_uint_eq(st.st_uid, 1234);
    ck_assert_int_eq(vfs_lookup(vfs, VFS_ROOT_INO, "disk", &st), 0);
    ck_assert_uint_eq(st.st_ino, VFS_DISK_INO);
    ck_assert_uint_eq(st.st_mode, S_IFREG | 0640);
    ck_assert_uint_eq(st.st_size, VSIZE);
    ck_assert_uint_eq(st.st_gid, 5678);
    ck_assert_int_eq(vfs_lookup(vfs, VFS_ROOT_INO, "nope", &st), -ENOENT);
    ck_assert_int_eq(vfs_lookup(vfs, VFS_DISK_INO, "x", &st), -ENOTDIR);
    ck_assert_int_eq(vfs_lookup(vfs, 99, "x", &st), -ESTALE);
    ck_assert_int_eq(vfs_readdir(vfs, VFS_ROOT_INO, 0, collect, &l), 0);
    ck_assert_int_eq(l.n, 3);
    ck_assert_str_eq(l.names[0], ".");
    ck_assert_str_eq(l.names[1], "..");
    ck_assert_str_eq(l.names[2], "disk");
    ck_assert_uint_eq(l.inos[2], VFS_DISK_INO);
    ck_assert_int_eq(vfs_readdir(vfs, VFS_DISK_INO, 0, collect, &l), -ENOTDIR);
    ck_assert_int_eq(vfs_remove(vfs, VFS_DISK_INO), -EPERM);
    ck_assert_int_eq(vfs_remove(vfs, VFS_ROOT_INO), -EPERM);
}
END_TEST

START_TEST(disk_io_clamped_at_end)
{
    uint8_t buf[8192], back[8192];
    size_t len;

    memset(buf, 0xab, sizeof(buf));
    ck_assert_int_eq(vfs_write(vfs, VFS_DISK_INO, buf, sizeof(buf), VSIZE - 4096, &len), 0);
    ck_assert_uint_eq(len, 4096);
    ck_assert_int_eq(vfs_write(vfs, VFS_DISK_INO, buf, 1, VSIZE, &len), -ENOSPC);
    ck_assert_int_eq(vfs_write(vfs, VFS_DISK_INO, buf, 0, VSIZE, &len), 0);
    ck_assert_uint_eq(len, 0);
    memset(back, 0, sizeof(back));
    ck_assert_int_eq(vfs_read(vfs, VFS_DISK_INO, back, sizeof(back), VSIZE - 4096, &len), 0);
    ck_assert_uint_eq(len, 4096);
    ck_assert_mem_eq(back, buf, 4096);
    ck_assert_int_eq(vfs_read(vfs, VFS_DISK_INO, back, 10, VSIZE + 1, &len), 0);
    ck_assert_uint_eq(len, 0);
    ck_assert_int_eq(vfs_read(vfs, VFS_DISK_INO, back, 10, (uint64_t)INT64_MAX + 1, &len),
                     -EINVAL);
    ck_assert_int_eq(vfs_read(vfs, VFS_ROOT_INO, back, 10, 0, &len), -EISDIR);
    ck_assert_int_eq(vfs_fsync(vfs, VFS_DISK_INO), 0);
}
END_TEST

START_TEST(fallocate_rules)
{
    uint8_t buf[4096];
    size_t len;

    memset(buf, 0x11, sizeof(buf));
    ck_assert_int_eq(vfs_write(vfs, VFS_DISK_INO, buf, sizeof(buf), 0, &len), 0);
    ck_assert_int_eq(vfs_fallocate(vfs, VFS_DISK_INO, 0, VSIZE - 10, 20), -EOPNOTSUPP);
    ck_assert_int_eq(vfs_fallocate(vfs, VFS_DISK_INO, FALLOC_FL_PUNCH_HOLE, 0, 4096),
                     -EOPNOTSUPP);          /* punch needs KEEP_SIZE */
    ck_assert_int_eq(vfs_fallocate(vfs, VFS_DISK_INO, FALLOC_FL_COLLAPSE_RANGE, 0, 65536),
                     -EOPNOTSUPP);
    ck_assert_int_eq(vfs_fallocate(vfs, VFS_DISK_INO, 0, 0, 0), -EINVAL);
    ck_assert_int_eq(vfs_fallocate(vfs, VFS_DISK_INO,
                                   FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 200), 0);
    ck_assert_int_eq(vfs_read(vfs, VFS_DISK_INO, buf, sizeof(buf), 0, &len), 0);
    ck_assert_uint_eq(buf[99], 0x11);
    ck_assert_uint_eq(buf[100], 0);
    ck_assert_uint_eq(buf[299], 0);
    ck_assert_uint_eq(buf[300], 0x11);
    /* Past the end with KEEP_SIZE: nothing to do, no error. */
    ck_assert_int_eq(vfs_fallocate(vfs, VFS_DISK_INO,
                                   FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, VSIZE, 512), 0);
}
END_TEST

START_TEST(stats_xattr_size_rule)
{
    char buf[1024], tiny[4];
    size_t len, need;

    ck_assert_int_eq(vfs_getxattr(vfs, VFS_DISK_INO, "user.qcow2fuse.stats", NULL, 0, &need), 0);
    ck_assert_uint_gt(need, 4);
    ck_assert_int_eq(vfs_getxattr(vfs, VFS_DISK_INO, "user.qcow2fuse.stats", tiny,
                                  sizeof(tiny), &len), -ERANGE);
    ck_assert_int_eq(vfs_getxattr(vfs, VFS_DISK_INO, "user.qcow2fuse.stats", buf,
                                  sizeof(buf), &len), 0);
    ck_assert_uint_eq(len, need);
    ck_assert_int_eq(vfs_getxattr(vfs, VFS_DISK_INO, "user.other", buf, sizeof(buf), &len),
                     -ENODATA);
    ck_assert_int_eq(vfs_getxattr(vfs, VFS_ROOT_INO, "user.qcow2fuse.stats", buf,
                                  sizeof(buf), &len), -ENODATA);
    ck_assert_int_eq(vfs_listxattr(vfs, VFS_DISK_INO, buf, sizeof(buf), &len), 0);
    ck_assert_uint_eq(len, sizeof("user.qcow2fuse.stats"));
    ck_assert_str_eq(buf, "user.qcow2fuse.stats");
    ck_assert_int_eq(vfs_listxattr(vfs, VFS_ROOT_INO, buf, sizeof(buf), &len), 0);
    ck_assert_uint_eq(len, 0);
}
END_TEST

START_TEST(seek_bounds)
{
    uint8_t buf[512] = { 1 };
    uint64_t r;
    size_t len;

    ck_assert_int_eq(vfs_lseek(vfs, VFS_DISK_INO, 0, SEEK_DATA, &r), -ENXIO);
    ck_assert_int_eq(vfs_write(vfs, VFS_DISK_INO, buf, sizeof(buf), 1 << 20, &len), 0);
    ck_assert_int_eq(vfs_lseek(vfs, VFS_DISK_INO, 0, SEEK_DATA, &r), 0);
    ck_assert_uint_eq(r, 1 << 20);
    ck_assert_int_eq(vfs_lseek(vfs, VFS_DISK_INO, 1 << 20, SEEK_HOLE, &r), 0);
    ck_assert_uint_eq(r, (1 << 20) + 65536);
    ck_assert_int_eq(vfs_lseek(vfs, VFS_DISK_INO, VSIZE, SEEK_HOLE, &r), -ENXIO);
    ck_assert_int_eq(vfs_lseek(vfs, VFS_DISK_INO, 0, SEEK_SET, &r), -EINVAL);
}
END_TEST

START_TEST(setattr_rules)
{
    struct stat st;

    ck_assert_int_eq(vfs_setattr(vfs, VFS_DISK_INO, VFS_SET_OWNER, 0, &st), -EPERM);
    ck_assert_int_eq(vfs_setattr(vfs, VFS_ROOT_INO, VFS_SET_SIZE, 0, &st), -EISDIR);
    ck_assert_int_eq(vfs_setattr(vfs, VFS_DISK_INO, VFS_SET_TIMES, 0, &st), 0);
    ck_assert_uint_eq(st.st_size, VSIZE);
    ck_assert_int_eq(vfs_setattr(vfs, VFS_DISK_INO, VFS_SET_SIZE, 2 * VSIZE, &st), 0);
    ck_assert_uint_eq(st.st_size, 2 * VSIZE);
}
END_TEST

START_TEST(added_files_and_dirs)
{
    struct memfile m = { .size = 1000 }, r = { .size = 100 };
    uint64_t dir, f, g, h;
    struct vfs_open_info oi;
    struct listing l = { 0 };
    uint8_t buf[2000];
    struct stat st;
    size_t len;

    ck_assert_int_eq(vfs_add_dir(vfs, VFS_ROOT_INO, "snaps", &dir), 0);
    ck_assert_int_eq(vfs_add_file(vfs, VFS_ROOT_INO, "disk-p1", 0644, &mem_ops, &m, &f), 0);
    ck_assert_int_eq(vfs_add_file(vfs, dir, "ro", 0644, &mem_ops_readonly, &r, &g), 0);
    ck_assert_int_eq(vfs_add_file(vfs, VFS_ROOT_INO, "disk", 0644, &mem_ops, &m, &h), -EEXIST);
    ck_assert_int_eq(vfs_add_file(vfs, VFS_ROOT_INO, "a/b", 0644, &mem_ops, &m, &h), -EINVAL);
    ck_assert_int_eq(vfs_add_file(vfs, VFS_ROOT_INO, "..", 0644, &mem_ops, &m, &h), -EINVAL);
    ck_assert_int_eq(vfs_add_file(vfs, VFS_ROOT_INO, "", 0644, &mem_ops, &m, &h), -EINVAL);
    ck_assert_int_eq(vfs_add_file(vfs, f, "x", 0644, &mem_ops, &m, &h), -ENOTDIR);
    ck_assert_int_eq(vfs_add_file(vfs, 999, "x", 0644, &mem_ops, &m, &h), -ENOENT);

    ck_assert_int_eq(vfs_getattr(vfs, VFS_ROOT_INO, &st), 0);
    ck_assert_uint_eq(st.st_nlink, 3);          /* ".", "..", snaps/.. */
    ck_assert_int_eq(vfs_readdir(vfs, VFS_ROOT_INO, 0, collect, &l), 0);
    ck_assert_int_eq(l.n, 5);
    ck_assert_str_eq(l.names[3], "snaps");
    ck_assert_str_eq(l.names[4], "disk-p1");
    /* Resume after the fourth entry, at the position it gave. */
    uint64_t resume = l.next[3];
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(vfs_readdir(vfs, VFS_ROOT_INO, resume, collect, &l), 0);
    ck_assert_int_eq(l.n, 1);
    ck_assert_str_eq(l.names[0], "disk-p1");
    /* A walk the reply's size stops goes on from where it stopped. */
    memset(&l, 0, sizeof(l));
    l.stop_after = 2;
    ck_assert_int_eq(vfs_readdir(vfs, VFS_ROOT_INO, 0, collect, &l), 0);
    ck_assert_int_eq(l.n, 2);
    resume = l.next[1];
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(vfs_readdir(vfs, VFS_ROOT_INO, resume, collect, &l), 0);
    ck_assert_int_eq(l.n, 3);
    ck_assert_str_eq(l.names[0], "disk");

    ck_assert_int_eq(vfs_lookup(vfs, dir, "ro", &st), 0);
    ck_assert_uint_eq(st.st_ino, g);
    ck_assert_uint_eq(st.st_mode, S_IFREG | 0444);  /* no write op: read-only */
    ck_assert_int_eq(vfs_open(vfs, g, O_RDWR, &oi), -EROFS);
    ck_assert_int_eq(vfs_open(vfs, g, O_RDONLY, &oi), 0);
    ck_assert(oi.direct_io);
    ck_assert_int_eq(vfs_open(vfs, dir, O_RDONLY, &oi), -EISDIR);
    ck_assert_int_eq(vfs_write(vfs, g, buf, 10, 0, &len), -EROFS);
    ck_assert_int_eq(vfs_fallocate(vfs, g, FALLOC_FL_ZERO_RANGE, 0, 10), -EROFS);
    ck_assert_int_eq(vfs_fsync(vfs, g), 0);
    ck_assert_int_eq(vfs_setattr(vfs, g, VFS_SET_SIZE, 50, &st), -EROFS);
    ck_assert_int_eq(vfs_setattr(vfs, f, VFS_SET_SIZE, 50, &st), -EPERM);
    ck_assert_int_eq(vfs_setattr(vfs, f, VFS_SET_SIZE, 1000, &st), 0);

    memset(buf, 7, sizeof(buf));
    ck_assert_int_eq(vfs_write(vfs, f, buf, sizeof(buf), 500, &len), 0);
    ck_assert_uint_eq(len, 500);
    ck_assert_int_eq(vfs_read(vfs, f, buf, sizeof(buf), 0, &len), 0);
    ck_assert_uint_eq(len, 1000);
    ck_assert_int_eq(vfs_fsync(vfs, f), 0);
    ck_assert_int_eq(m.flushes, 1);
    /* A file without a seek op is all data. */
    uint64_t r64;
    ck_assert_int_eq(vfs_lseek(vfs, f, 10, SEEK_DATA, &r64), 0);
    ck_assert_uint_eq(r64, 10);
    ck_assert_int_eq(vfs_lseek(vfs, f, 10, SEEK_HOLE, &r64), 0);
    ck_assert_uint_eq(r64, 1000);

    /* Removing the directory removes what is under it; numbers stay used. */
    ck_assert_int_eq(vfs_remove(vfs, dir), 0);
    ck_assert_int_eq(r.released, 1);
    ck_assert_int_eq(vfs_getattr(vfs, g, &st), -ESTALE);
    ck_assert_int_eq(vfs_read(vfs, g, buf, 10, 0, &len), -ESTALE);
    ck_assert_int_eq(vfs_lookup(vfs, VFS_ROOT_INO, "snaps", &st), -ENOENT);
    ck_assert_int_eq(vfs_remove(vfs, dir), -ENOENT);
    ck_assert_int_eq(vfs_add_dir(vfs, VFS_ROOT_INO, "snaps", &h), 0);
    ck_assert_uint_gt(h, g);
    ck_assert_int_eq(m.released, 0);
}
END_TEST

struct watch_log {
    int calls;
    uint64_t off, len;
};

static void record_write(void *arg, uint64_t off, uint64_t len)
{
    struct watch_log *w = arg;

    w->calls++;
    w->off = off;
    w->len = len;
}

START_TEST(write_watch)
{
    struct watch_log w = { 0 };
    uint8_t buf[4096] = { 0 };
    size_t len;

    ck_assert_int_eq(vfs_watch_writes(vfs, VFS_ROOT_INO, record_write, &w), -EISDIR);
    ck_assert_int_eq(vfs_watch_writes(vfs, VFS_DISK_INO, record_write, &w), 0);
    ck_assert_int_eq(vfs_write(vfs, VFS_DISK_INO, buf, sizeof(buf), VSIZE - 1024, &len), 0);
    ck_assert_int_eq(w.calls, 1);
    ck_assert_uint_eq(w.off, VSIZE - 1024);
    ck_assert_uint_eq(w.len, 1024);            /* what was written, clamped */
    ck_assert_int_eq(vfs_fallocate(vfs, VFS_DISK_INO, FALLOC_FL_ZERO_RANGE, 512, 512), 0);
    ck_assert_int_eq(w.calls, 2);
    ck_assert_uint_eq(w.off, 512);
    /* Preallocation changes nothing a reader sees: no call. */
    ck_assert_int_eq(vfs_fallocate(vfs, VFS_DISK_INO, 0, 0, 65536), 0);
    ck_assert_int_eq(w.calls, 2);
    /* A failed write is not reported. */
    ck_assert_int_eq(vfs_write(vfs, VFS_DISK_INO, buf, 1, VSIZE, &len), -ENOSPC);
    ck_assert_int_eq(w.calls, 2);
    ck_assert_int_eq(vfs_watch_writes(vfs, VFS_DISK_INO, NULL, NULL), 0);
    ck_assert_int_eq(vfs_write(vfs, VFS_DISK_INO, buf, 1, 0, &len), 0);
    ck_assert_int_eq(w.calls, 2);
}
END_TEST

/* A request that holds a node across its removal: release waits for it. */
static struct vfs *held_vfs;
static uint64_t held_ino;
static int held_read(void *p, void *buf, size_t len, uint64_t off)
{
    struct memfile *m = p;

    /* Removed while in flight: the provider is still alive. */
    ck_assert_int_eq(vfs_remove(held_vfs, held_ino), 0);
    ck_assert_int_eq(m->released, 0);
    memset(buf, 0, len);
    (void)off;
    return 0;
}

static const struct vfs_file_ops held_ops = {
    .size = mem_size, .read = held_read, .release = mem_release,
};

START_TEST(release_after_last_request)
{
    struct memfile m = { .size = 100 };
    uint8_t buf[100];
    size_t len;

    held_vfs = vfs;
    ck_assert_int_eq(vfs_add_file(vfs, VFS_ROOT_INO, "held", 0444, &held_ops, &m,
                                  &held_ino), 0);
    ck_assert_int_eq(vfs_read(vfs, held_ino, buf, sizeof(buf), 0, &len), 0);
    ck_assert_int_eq(m.released, 1);
}
END_TEST

static Suite *vfs_suite(void)
{
    Suite *s = suite_create("vfs");
    TCase *tc = tcase_create("tree");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, root_and_disk);
    tcase_add_test(tc, disk_io_clamped_at_end);
    tcase_add_test(tc, fallocate_rules);
    tcase_add_test(tc, stats_xattr_size_rule);
    tcase_add_test(tc, seek_bounds);
    tcase_add_test(tc, setattr_rules);
    tcase_add_test(tc, added_files_and_dirs);
    tcase_add_test(tc, write_watch);
    tcase_add_test(tc, release_after_last_request);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(vfs_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
