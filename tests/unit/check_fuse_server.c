/*
 * Unit tests for fuse_server: the dispatcher fed hand-built requests
 * through a capture sink, over a small tree (vfs) whose disk is an image
 * in the memory backend; the INIT negotiation for current and old
 * protocol minors; malformed requests and a deterministic protocol fuzz
 * (errors, never a crash, and exactly one reply per request that has
 * one); and the classic transport over a SOCK_SEQPACKET pair standing in
 * for /dev/fuse (each message one request, as a /dev/fuse read is).
 */
#include "testutil.h"

#include "create.h"
#include "fuse_proto.h"
#include "fuse_server.h"
#include "image.h"
#include "vfs.h"

#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/stat.h>

#define DISK_SIZE       (4u << 20)
#define REPLY_CAP       (2u << 20)
#define ALL_OFFERED     0xffffffffu         /* a kernel that offers everything */

/* ---- capture sink ---- */

struct cap_sink {
    struct fuse_reply_sink sink;
    unsigned sends;
    int error;
    uint8_t *reply;             /* a copy of the last reply's payload */
    size_t reply_len;
    uint8_t *buf;               /* what payload_buf hands out */
    size_t buf_cap;
    bool no_buf;                /* payload_buf returns NULL: the fallback */
};

static void *cap_payload_buf(struct fuse_reply_sink *sink, size_t size)
{
    struct cap_sink *c = (struct cap_sink *)sink;

    if (c->no_buf || size > c->buf_cap)
        return NULL;
    return c->buf;
}

static int cap_send(struct fuse_reply_sink *sink, int error, const void *payload,
                    size_t len)
{
    struct cap_sink *c = (struct cap_sink *)sink;

    c->sends++;
    c->error = error;
    ck_assert_uint_le(len, REPLY_CAP);
    if (error)
        ck_assert_uint_eq(len, 0);
    if (len)
        memcpy(c->reply, payload, len);
    c->reply_len = len;
    return 0;
}

/* ---- fixture: an image, its tree, a server ---- */

struct fx {
    struct image *img;
    struct vfs *vfs;
    struct fuse_server *srv;
    struct cap_sink cap;
    uint8_t *req;               /* a request being built */
    unsigned after_init_calls;
    struct fuse_server_conn after_init_conn;
};

static struct fx F;

static void on_after_init(void *arg, struct fuse_server *srv,
                          const struct fuse_server_conn *conn)
{
    struct fx *f = arg;

    ck_assert_ptr_eq(srv, f->srv);
    f->after_init_calls++;
    f->after_init_conn = *conn;
}

static struct io *new_image_io(void)
{
    char dir[] = "/tmp/check_fuse_server.XXXXXX", path[64];
    struct create_options co = { .size = DISK_SIZE, .cluster_bits = 16 };
    struct io *mem;

    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/t.qcow2", dir);
    ck_assert_int_eq(create_image(path, &co), 0);
    mem = tu_file_to_memory(path);
    unlink(path);
    rmdir(dir);
    return mem;
}

static void fx_open(bool read_only, bool io_uring)
{
    struct image_options o = {
        .read_only = read_only,
        .discard = IMAGE_DISCARD_UNMAP,
        .detect_zeroes = IMAGE_DETECT_ZEROES_OFF,
        .trace_fd = -1,
        .backing = { BACKING_DENY, NULL },
    };
    struct vfs_config vc = {
        .disk_name = "disk", .uid = 1234, .gid = 4321, .disk_mode = 0640,
        .direct_io = true,
    };
    struct fuse_server_config sc = {
        .max_background = 64, .io_uring = io_uring,
        .after_init = on_after_init, .after_init_arg = &F,
    };

    memset(&F, 0, sizeof(F));
    ck_assert_int_eq(image_open_io(new_image_io(), "t.qcow2", &o, &F.img), 0);
    ck_assert_int_eq(vfs_new(F.img, &vc, &F.vfs), 0);
    ck_assert_int_eq(fuse_server_new(F.vfs, &sc, &F.srv), 0);
    F.cap.sink.payload_buf = cap_payload_buf;
    F.cap.sink.send = cap_send;
    F.cap.reply = tu_zalloc(REPLY_CAP);
    F.cap.buf_cap = FUSE_SERVER_MAX_PAGES * 4096;
    F.cap.buf = tu_zalloc(F.cap.buf_cap);
    F.req = tu_zalloc(REPLY_CAP);
}

static void fx_close(void)
{
    fuse_server_free(F.srv);
    vfs_free(F.vfs);
    ck_assert_int_eq(image_close(F.img), 0);
    free(F.cap.reply);
    free(F.cap.buf);
    free(F.req);
}

static void setup_rw(void) { fx_open(false, false); }
static void setup_ro(void) { fx_open(true, false); }
static void setup_uring(void) { fx_open(false, true); }
static void teardown(void) { fx_close(); }

/* ---- building requests ---- */

static uint64_t next_unique = 1;

/*
 * Dispatch one request laid out as the classic transport reads it (header,
 * @arg, @tail contiguous), or, with @split, as io_uring hands it (@arg in
 * op_in, @tail in payload).  @len_delta is added to the header's len.
 * Returns: the number of replies sent (0 or 1).
 */
static unsigned call_ex(uint32_t opcode, uint64_t nodeid, const void *arg, size_t arg_len,
                        const void *tail, size_t tail_len, bool split, long len_delta)
{
    struct fuse_in_header in = {
        .len = (uint32_t)((long)(sizeof(in) + arg_len + tail_len) + len_delta),
        .opcode = opcode,
        .unique = next_unique++,
        .nodeid = nodeid,
        .uid = 0, .gid = 0, .pid = 1,
    };
    struct fuse_request r = { 0 };
    unsigned before = F.cap.sends;

    memcpy(F.req, &in, sizeof(in));
    if (arg_len)
        memcpy(F.req + sizeof(in), arg, arg_len);
    r.in = (const struct fuse_in_header *)F.req;
    r.op_in = F.req + sizeof(in);
    if (split) {
        r.op_in_len = arg_len;
        r.payload = tail;
        r.payload_len = tail_len;
    } else {
        if (tail_len)
            memcpy(F.req + sizeof(in) + arg_len, tail, tail_len);
        r.op_in_len = arg_len + tail_len;
    }
    F.cap.error = 1;            /* no reply yet */
    fuse_server_dispatch(F.srv, &r, &F.cap.sink);
    ck_assert_uint_le(F.cap.sends - before, 1);
    return F.cap.sends - before;
}

static unsigned call(uint32_t opcode, uint64_t nodeid, const void *arg, size_t arg_len,
                     const void *tail, size_t tail_len)
{
    return call_ex(opcode, nodeid, arg, arg_len, tail, tail_len, false, 0);
}

/* The error of the one reply the request must get. */
static int call_err(uint32_t opcode, uint64_t nodeid, const void *arg, size_t arg_len,
                    const void *tail, size_t tail_len)
{
    ck_assert_uint_eq(call(opcode, nodeid, arg, arg_len, tail, tail_len), 1);
    return F.cap.error;
}

static struct fuse_init_in init_in(uint32_t minor, uint32_t flags, uint32_t flags2)
{
    struct fuse_init_in in = { .major = 7, .minor = minor, .max_readahead = 128 << 10,
                               .flags = flags, .flags2 = flags2 };
    return in;
}

/* INIT as Linux 6.18 sends it: 7.45, INIT_EXT, everything offered. */
static void do_init_current(void)
{
    struct fuse_init_in in = init_in(FUSE_PROTO_MINOR, ALL_OFFERED, ALL_OFFERED);

    ck_assert_int_eq(call_err(FUSE_INIT, 0, &in, sizeof(in), NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, sizeof(struct fuse_init_out));
}

static void init_minor(uint32_t minor)
{
    struct fuse_init_in in = init_in(minor, ALL_OFFERED & ~FUSE_INIT_EXT, 0);

    /* Before 7.36 the kernel sends the 16-byte structure. */
    ck_assert_int_eq(call_err(FUSE_INIT, 0, &in, minor < 6 ? 8 : 16, NULL, 0), 0);
}

static const struct fuse_open_in open_rw = { .flags = O_RDWR };

static struct fuse_read_in read_in(uint64_t off, uint32_t size)
{
    struct fuse_read_in in = { .offset = off, .size = size };
    return in;
}

/* Write @len bytes of @data at @off through WRITE; returns the error. */
static int write_disk(const void *data, uint32_t len, uint64_t off)
{
    struct fuse_write_in in = { .offset = off, .size = len };
    int err = call_err(FUSE_WRITE, VFS_DISK_INO, &in, sizeof(in), data, len);

    if (err == 0) {
        struct fuse_write_out out;
        ck_assert_uint_eq(F.cap.reply_len, sizeof(out));
        memcpy(&out, F.cap.reply, sizeof(out));
        ck_assert_uint_eq(out.size, len);
    }
    return err;
}

static struct fuse_attr reply_attr_of(size_t expected_len)
{
    struct fuse_attr_out out;

    ck_assert_int_eq(F.cap.error, 0);
    ck_assert_uint_eq(F.cap.reply_len, expected_len);
    memset(&out, 0, sizeof(out));
    memcpy(&out, F.cap.reply, expected_len);
    ck_assert_uint_eq(out.attr_valid, 1);
    return out.attr;
}

/* Error messages from several threads at once (tu_log_hook is for one
 * thread). */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned log_errors;

static void count_errors(enum log_level level, const char *msg)
{
    (void)msg;
    pthread_mutex_lock(&log_lock);
    log_errors += level == LOG_LEVEL_ERROR;
    pthread_mutex_unlock(&log_lock);
}

/* ---- INIT ---- */

START_TEST(init_current_kernel)
{
    struct fuse_init_out out;
    uint64_t flags;

    do_init_current();
    memcpy(&out, F.cap.reply, sizeof(out));
    ck_assert_uint_eq(out.major, 7);
    ck_assert_uint_eq(out.minor, FUSE_PROTO_MINOR);
    ck_assert_uint_eq(out.max_write, 1u << 20);
    ck_assert_uint_eq(out.max_pages, 256);
    ck_assert_uint_eq(out.max_background, 64);
    ck_assert_uint_eq(out.congestion_threshold, 48);
    ck_assert_uint_eq(out.max_readahead, 128 << 10);
    ck_assert_uint_eq(out.time_gran, 1);
    flags = out.flags | (uint64_t)out.flags2 << 32;
    for (uint64_t want = 1; want; want <<= 1) {
        bool on = flags & want;
        bool expected = want & (FUSE_ASYNC_READ | FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES |
                                FUSE_AUTO_INVAL_DATA | FUSE_ASYNC_DIO |
                                FUSE_PARALLEL_DIROPS | FUSE_MAX_PAGES | FUSE_INIT_EXT |
                                FUSE_DIRECT_IO_ALLOW_MMAP);
        ck_assert_msg(on == expected, "INIT flag 0x%llx %s", (unsigned long long)want,
                      on ? "set" : "not set");
    }
    /* Never: writeback cache, splice, KILLPRIV, io_uring unless asked. */
    ck_assert(!(flags & (FUSE_WRITEBACK_CACHE | FUSE_SPLICE_READ | FUSE_SPLICE_WRITE |
                         FUSE_SPLICE_MOVE | FUSE_HANDLE_KILLPRIV | FUSE_OVER_IO_URING)));
    ck_assert_uint_eq(F.after_init_calls, 1);
    ck_assert_uint_eq(F.after_init_conn.minor, FUSE_PROTO_MINOR);
    ck_assert_uint_eq(F.after_init_conn.max_write, 1u << 20);
    ck_assert_uint_eq(F.after_init_conn.max_read, 1u << 20);
    ck_assert(!F.after_init_conn.io_uring);
    ck_assert_uint_eq(F.after_init_conn.flags, flags);
}
END_TEST

START_TEST(init_only_what_is_offered)
{
    /* A kernel that offers only ASYNC_READ, no INIT_EXT: no flags2. */
    struct fuse_init_in in = init_in(FUSE_PROTO_MINOR, FUSE_ASYNC_READ, ALL_OFFERED);
    struct fuse_init_out out;
    struct fuse_server_conn conn;

    ck_assert(!fuse_server_get_conn(F.srv, &conn));
    ck_assert_int_eq(call_err(FUSE_INIT, 0, &in, sizeof(in), NULL, 0), 0);
    memcpy(&out, F.cap.reply, sizeof(out));
    ck_assert_uint_eq(out.flags, FUSE_ASYNC_READ | FUSE_BIG_WRITES);
    ck_assert_uint_eq(out.flags2, 0);
    /* No MAX_PAGES: the kernel's 32 pages. */
    ck_assert_uint_eq(out.max_pages, 0);
    ck_assert_uint_eq(out.max_write, 128u << 10);
    ck_assert(fuse_server_get_conn(F.srv, &conn));
    ck_assert_uint_eq(conn.max_read, 128u << 10);
}
END_TEST

START_TEST(init_io_uring_when_asked)
{
    struct fuse_init_out out;

    do_init_current();
    memcpy(&out, F.cap.reply, sizeof(out));
    ck_assert((out.flags | (uint64_t)out.flags2 << 32) & FUSE_OVER_IO_URING);
    ck_assert_uint_eq(F.after_init_calls, 1);
    ck_assert(F.after_init_conn.io_uring);
}
END_TEST

START_TEST(init_io_uring_not_offered)
{
    struct fuse_init_in in = init_in(FUSE_PROTO_MINOR, ALL_OFFERED,
                                     (uint32_t)(FUSE_DIRECT_IO_ALLOW_MMAP >> 32));
    struct fuse_init_out out;

    ck_assert_int_eq(call_err(FUSE_INIT, 0, &in, sizeof(in), NULL, 0), 0);
    memcpy(&out, F.cap.reply, sizeof(out));
    ck_assert(!((uint64_t)out.flags2 << 32 & FUSE_OVER_IO_URING));
    ck_assert(!F.after_init_conn.io_uring);
}
END_TEST

START_TEST(init_older_minors)
{
    struct fuse_init_in in;
    struct fuse_init_out out;

    /* 7.22: the 24-byte reply, and our minor drops to the kernel's. */
    in = init_in(22, ALL_OFFERED & ~FUSE_INIT_EXT, 0);
    ck_assert_int_eq(call_err(FUSE_INIT, 0, &in, 16, NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, FUSE_COMPAT_22_INIT_OUT_SIZE);
    memset(&out, 0, sizeof(out));
    memcpy(&out, F.cap.reply, F.cap.reply_len);
    ck_assert_uint_eq(out.minor, 22);
    ck_assert_uint_eq(out.max_background, 64);
    ck_assert_uint_eq(F.after_init_conn.minor, 22);
}
END_TEST

START_TEST(init_minor_4)
{
    init_minor(4);
    ck_assert_uint_eq(F.cap.reply_len, FUSE_COMPAT_INIT_OUT_SIZE);
    /* No flags before 7.6: the kernel's defaults. */
    ck_assert_uint_eq(F.after_init_conn.flags, FUSE_BIG_WRITES);
}
END_TEST

START_TEST(init_12_no_background)
{
    struct fuse_init_out out;

    init_minor(12);
    memset(&out, 0, sizeof(out));
    memcpy(&out, F.cap.reply, F.cap.reply_len);
    ck_assert_uint_eq(F.cap.reply_len, FUSE_COMPAT_22_INIT_OUT_SIZE);
    ck_assert_uint_eq(out.max_background, 0);
}
END_TEST

/* Before 7.9: entry_out and attr_out without blksize, GETATTR without its
 * header, the 24-byte write_in and read_in; before 7.4 the short statfs. */
START_TEST(old_minor_compat_sizes)
{
    struct fuse_write_in w = { .offset = 4096, .size = 3 };
    struct fuse_read_in rd = read_in(4096, 3);
    struct fuse_attr a;

    init_minor(3);
    ck_assert_int_eq(call_err(FUSE_LOOKUP, 1, NULL, 0, "disk", 5), 0);
    ck_assert_uint_eq(F.cap.reply_len, FUSE_COMPAT_ENTRY_OUT_SIZE);
    ck_assert_int_eq(call_err(FUSE_GETATTR, VFS_DISK_INO, NULL, 0, NULL, 0), 0);
    a = reply_attr_of(FUSE_COMPAT_ATTR_OUT_SIZE);
    ck_assert_uint_eq(a.size, DISK_SIZE);
    ck_assert_int_eq(call_err(FUSE_STATFS, 1, NULL, 0, NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, FUSE_COMPAT_STATFS_SIZE);
    ck_assert_int_eq(call_err(FUSE_WRITE, VFS_DISK_INO, &w, FUSE_COMPAT_WRITE_IN_SIZE,
                              "abc", 3), 0);
    ck_assert_int_eq(call_err(FUSE_READ, VFS_DISK_INO, &rd, 24, NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, 3);
    ck_assert_int_eq(memcmp(F.cap.reply, "abc", 3), 0);
    /* RELEASE of 7.7: 16 bytes. */
    ck_assert_int_eq(call_err(FUSE_RELEASE, VFS_DISK_INO, &w, 16, NULL, 0), 0);
}
END_TEST

START_TEST(init_major_8_then_7)
{
    struct fuse_init_in in = init_in(0, 0, 0);
    struct fuse_init_out out;

    in.major = 8;
    ck_assert_int_eq(call_err(FUSE_INIT, 0, &in, sizeof(in), NULL, 0), 0);
    memcpy(&out, F.cap.reply, sizeof(out));
    ck_assert_uint_eq(out.major, 7);
    ck_assert_uint_eq(F.after_init_calls, 0);
    /* Still not initialized: the kernel sends a 7.x INIT next. */
    ck_assert_int_eq(call_err(FUSE_GETATTR, 1, &(struct fuse_getattr_in){ 0 },
                              sizeof(struct fuse_getattr_in), NULL, 0), -EIO);
    do_init_current();
    ck_assert_uint_eq(F.after_init_calls, 1);
}
END_TEST

START_TEST(init_major_6_refused)
{
    struct fuse_init_in in = init_in(30, 0, 0);

    in.major = 6;
    log_errors = 0;
    log_set_hook(count_errors);
    ck_assert_int_eq(call_err(FUSE_INIT, 0, &in, sizeof(in), NULL, 0), -EPROTO);
    ck_assert_uint_eq(log_errors, 1);
    ck_assert_uint_eq(F.after_init_calls, 0);
    /* serve returns the error at once (its worker, on fd -1, fails too). */
    ck_assert_int_eq(fuse_server_serve(F.srv, -1, 1), -EPROTO);
    log_set_hook(NULL);
}
END_TEST

START_TEST(requests_before_init_and_second_init)
{
    struct fuse_init_in in = init_in(FUSE_PROTO_MINOR, ALL_OFFERED, 0);

    ck_assert_int_eq(call_err(FUSE_LOOKUP, 1, NULL, 0, "disk", 5), -EIO);
    do_init_current();
    ck_assert_int_eq(call_err(FUSE_INIT, 0, &in, sizeof(in), NULL, 0), -EIO);
    ck_assert_uint_eq(F.after_init_calls, 1);
}
END_TEST

START_TEST(init_short)
{
    struct fuse_init_in in = init_in(FUSE_PROTO_MINOR, ALL_OFFERED, 0);

    ck_assert_int_eq(call_err(FUSE_INIT, 0, &in, 7, NULL, 0), -EINVAL);
    /* 7.6+ without its flags. */
    ck_assert_int_eq(call_err(FUSE_INIT, 0, &in, 12, NULL, 0), -EINVAL);
    ck_assert(!fuse_server_get_conn(F.srv, &(struct fuse_server_conn){ 0 }));
}
END_TEST

/* ---- Every opcode's happy path ---- */

START_TEST(lookup_getattr_statfs)
{
    struct fuse_entry_out e;
    struct fuse_statfs_out sf;
    struct fuse_getattr_in ga = { 0 };
    struct fuse_attr a;

    do_init_current();
    ck_assert_int_eq(call_err(FUSE_LOOKUP, 1, NULL, 0, "disk", 5), 0);
    ck_assert_uint_eq(F.cap.reply_len, sizeof(e));
    memcpy(&e, F.cap.reply, sizeof(e));
    ck_assert_uint_eq(e.nodeid, VFS_DISK_INO);
    ck_assert_uint_eq(e.generation, 0);
    ck_assert_uint_eq(e.entry_valid, 1);
    ck_assert_uint_eq(e.attr_valid, 1);
    ck_assert_uint_eq(e.attr.ino, VFS_DISK_INO);
    ck_assert_uint_eq(e.attr.size, DISK_SIZE);
    ck_assert_uint_eq(e.attr.mode, S_IFREG | 0640);
    ck_assert_uint_eq(e.attr.uid, 1234);
    ck_assert_uint_eq(e.attr.gid, 4321);
    ck_assert_uint_eq(e.attr.nlink, 1);
    ck_assert_uint_eq(e.attr.blksize, 4096);
    ck_assert_int_eq(call_err(FUSE_LOOKUP, 1, NULL, 0, "nope", 5), -ENOENT);
    ck_assert_int_eq(call_err(FUSE_LOOKUP, VFS_DISK_INO, NULL, 0, "x", 2), -ENOTDIR);
    ck_assert_int_eq(call_err(FUSE_LOOKUP, 99, NULL, 0, "x", 2), -ESTALE);

    ck_assert_int_eq(call_err(FUSE_GETATTR, 1, &ga, sizeof(ga), NULL, 0), 0);
    a = reply_attr_of(sizeof(struct fuse_attr_out));
    ck_assert_uint_eq(a.mode, S_IFDIR | 0755);
    ck_assert_uint_eq(a.ino, 1);
    ck_assert_uint_eq(a.nlink, 2);
    ck_assert_int_eq(call_err(FUSE_GETATTR, 77, &ga, sizeof(ga), NULL, 0), -ESTALE);

    ck_assert_int_eq(call_err(FUSE_STATFS, 1, NULL, 0, NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, sizeof(sf));
    memcpy(&sf, F.cap.reply, sizeof(sf));
    ck_assert_uint_eq(sf.st.blocks, DISK_SIZE / 4096);
    ck_assert_uint_eq(sf.st.bsize, 4096);
    ck_assert_uint_eq(sf.st.frsize, 4096);
    ck_assert_uint_eq(sf.st.namelen, 255);
    ck_assert_uint_eq(sf.st.files, 2);
}
END_TEST

START_TEST(open_read_write_flush_fsync_release)
{
    struct fuse_open_out oo;
    struct fuse_read_in rd;
    struct fuse_flush_in fl = { 0 };
    struct fuse_fsync_in fs = { 0 };
    struct fuse_release_in rel = { 0 };
    uint8_t *data = tu_zalloc(1u << 20);

    do_init_current();
    ck_assert_int_eq(call_err(FUSE_OPEN, VFS_DISK_INO, &open_rw, sizeof(open_rw), NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, sizeof(oo));
    memcpy(&oo, F.cap.reply, sizeof(oo));
    ck_assert_uint_eq(oo.open_flags, FOPEN_DIRECT_IO);
    ck_assert_int_eq(call_err(FUSE_OPEN, 1, &open_rw, sizeof(open_rw), NULL, 0), -EISDIR);

    for (size_t i = 0; i < (1u << 20); i++)
        data[i] = (uint8_t)(i * 7 + (i >> 12));
    /* The largest WRITE, then the largest READ: one reply of 1 MiB. */
    ck_assert_int_eq(write_disk(data, 1u << 20, 65536), 0);
    rd = read_in(65536, 1u << 20);
    ck_assert_int_eq(call_err(FUSE_READ, VFS_DISK_INO, &rd, sizeof(rd), NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, 1u << 20);
    ck_assert_int_eq(memcmp(F.cap.reply, data, 1u << 20), 0);
    /* Unwritten: zeros.  At the end: short.  Past it: empty. */
    rd = read_in(DISK_SIZE - 4096, 8192);
    ck_assert_int_eq(call_err(FUSE_READ, VFS_DISK_INO, &rd, sizeof(rd), NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, 4096);
    for (unsigned i = 0; i < 4096; i++)
        ck_assert_uint_eq(F.cap.reply[i], 0);
    rd = read_in(DISK_SIZE, 4096);
    ck_assert_int_eq(call_err(FUSE_READ, VFS_DISK_INO, &rd, sizeof(rd), NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, 0);
    /* A write past the end: ENOSPC, as before. */
    ck_assert_int_eq(write_disk(data, 512, DISK_SIZE), -ENOSPC);
    ck_assert_int_eq(call_err(FUSE_READ, 1, &rd, sizeof(rd), NULL, 0), -EISDIR);

    ck_assert_int_eq(call_err(FUSE_FLUSH, VFS_DISK_INO, &fl, sizeof(fl), NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, 0);
    ck_assert_int_eq(call_err(FUSE_FSYNC, VFS_DISK_INO, &fs, sizeof(fs), NULL, 0), 0);
    ck_assert_int_eq(call_err(FUSE_FSYNCDIR, 1, &fs, sizeof(fs), NULL, 0), 0);
    ck_assert_int_eq(call_err(FUSE_RELEASE, VFS_DISK_INO, &rel, sizeof(rel), NULL, 0), 0);
    free(data);
}
END_TEST

/* The image's host flushes so far, from its statistics line. */
static unsigned long long host_flushes(void)
{
    char stats[512];
    const char *p;
    unsigned long long n = 0;

    image_stats(F.img, stats, sizeof(stats));
    p = strstr(stats, " flushes");
    ck_assert_ptr_nonnull(p);
    while (p > stats && p[-1] >= '0' && p[-1] <= '9')
        p--;
    ck_assert_int_eq(sscanf(p, "%llu", &n), 1);
    return n;
}

/* WRITE on a direct-I/O handle with O_DSYNC (the kernel's flags field
 * also carries RWF_DSYNC) or O_SYNC is flushed before its reply; a plain
 * one is not, and neither is one on a handle of 0 (a page-cache open,
 * after whose synchronous writes the kernel sends an FSYNC itself). */
START_TEST(sync_writes_flush_before_reply)
{
    static const struct { uint32_t flags; bool direct_handle; bool flushes; } cases[] = {
        { O_RDWR, true, false },
        { O_RDWR | O_DSYNC, true, true },
        { O_RDWR | O_SYNC, true, true },
        { O_WRONLY | O_DSYNC, true, true },
        { O_RDWR | O_DSYNC, false, false },
        { O_RDWR, false, false },
    };
    struct fuse_fsync_in fs = { 0 };
    struct fuse_open_out oo;
    uint8_t data[4096];

    do_init_current();
    ck_assert_int_eq(call_err(FUSE_OPEN, VFS_DISK_INO, &open_rw, sizeof(open_rw), NULL, 0), 0);
    memcpy(&oo, F.cap.reply, sizeof(oo));
    ck_assert_uint_ne(oo.fh, 0);        /* a direct-I/O handle is told apart */
    memset(data, 0x3c, sizeof(data));
    /* Allocated and durable first: the writes below only overwrite. */
    ck_assert_int_eq(write_disk(data, sizeof(data), 8192), 0);
    ck_assert_int_eq(call_err(FUSE_FSYNC, VFS_DISK_INO, &fs, sizeof(fs), NULL, 0), 0);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct fuse_write_in in = {
            .fh = cases[i].direct_handle ? oo.fh : 0,
            .offset = 8192, .size = sizeof(data), .flags = cases[i].flags,
        };
        unsigned long long before = host_flushes();

        data[0] = (uint8_t)i;
        ck_assert_int_eq(call_err(FUSE_WRITE, VFS_DISK_INO, &in, sizeof(in), data,
                                  sizeof(data)), 0);
        if (cases[i].flushes)
            ck_assert_msg(host_flushes() > before, "case %zu: no flush before the reply", i);
        else
            ck_assert_msg(host_flushes() == before, "case %zu: %llu flushes", i,
                          host_flushes() - before);
    }
}
END_TEST

START_TEST(read_through_fallback_buffer)
{
    struct fuse_read_in rd = read_in(0, 1u << 20);

    do_init_current();
    ck_assert_int_eq(write_disk("fallback", 8, 0), 0);
    F.cap.no_buf = true;
    /* Empty first: the thread's scratch slot has no buffer yet. */
    rd.size = 0;
    ck_assert_int_eq(call_err(FUSE_READ, VFS_DISK_INO, &rd, sizeof(rd), NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, 0);
    rd.size = 1u << 20;
    ck_assert_int_eq(call_err(FUSE_READ, VFS_DISK_INO, &rd, sizeof(rd), NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, 1u << 20);
    ck_assert_int_eq(memcmp(F.cap.reply, "fallback", 8), 0);
}
END_TEST

/* io_uring's layout: the op header in op_in, a name or data in payload. */
START_TEST(split_payload_layout)
{
    struct fuse_write_in w = { .offset = 8192, .size = 5 };
    struct fuse_read_in rd = read_in(8192, 5);
    struct fuse_getxattr_in gx = { .size = 0 };
    struct fuse_entry_out e;

    do_init_current();
    ck_assert_uint_eq(call_ex(FUSE_LOOKUP, 1, NULL, 0, "disk", 5, true, 0), 1);
    ck_assert_int_eq(F.cap.error, 0);
    memcpy(&e, F.cap.reply, sizeof(e));
    ck_assert_uint_eq(e.nodeid, VFS_DISK_INO);
    ck_assert_uint_eq(call_ex(FUSE_WRITE, VFS_DISK_INO, &w, sizeof(w), "split", 5, true, 0), 1);
    ck_assert_int_eq(F.cap.error, 0);
    ck_assert_uint_eq(call_ex(FUSE_READ, VFS_DISK_INO, &rd, sizeof(rd), NULL, 0, true, 0), 1);
    ck_assert_uint_eq(F.cap.reply_len, 5);
    ck_assert_int_eq(memcmp(F.cap.reply, "split", 5), 0);
    ck_assert_uint_eq(call_ex(FUSE_GETXATTR, VFS_DISK_INO, &gx, sizeof(gx),
                              "user.qcow2fuse.stats", 21, true, 0), 1);
    ck_assert_int_eq(F.cap.error, 0);
    /* Data short of the size: refused. */
    w.size = 6;
    ck_assert_uint_eq(call_ex(FUSE_WRITE, VFS_DISK_INO, &w, sizeof(w), "split", 5, true, 0), 1);
    ck_assert_int_eq(F.cap.error, -EINVAL);
}
END_TEST

START_TEST(setattr_size_owner_times)
{
    struct fuse_setattr_in sa = { .valid = FATTR_SIZE, .size = 2 * DISK_SIZE };
    struct fuse_attr a;

    do_init_current();
    ck_assert_int_eq(call_err(FUSE_SETATTR, VFS_DISK_INO, &sa, sizeof(sa), NULL, 0), 0);
    a = reply_attr_of(sizeof(struct fuse_attr_out));
    ck_assert_uint_eq(a.size, 2 * DISK_SIZE);
    sa.valid = FATTR_MODE;
    sa.mode = 0777;
    ck_assert_int_eq(call_err(FUSE_SETATTR, VFS_DISK_INO, &sa, sizeof(sa), NULL, 0), -EPERM);
    sa.valid = FATTR_UID;
    ck_assert_int_eq(call_err(FUSE_SETATTR, VFS_DISK_INO, &sa, sizeof(sa), NULL, 0), -EPERM);
    sa.valid = FATTR_ATIME | FATTR_MTIME_NOW;
    ck_assert_int_eq(call_err(FUSE_SETATTR, VFS_DISK_INO, &sa, sizeof(sa), NULL, 0), 0);
    a = reply_attr_of(sizeof(struct fuse_attr_out));
    ck_assert_uint_eq(a.size, 2 * DISK_SIZE);
    /* A size a signed off_t cannot hold. */
    sa.valid = FATTR_SIZE;
    sa.size = 1ull << 63;
    ck_assert_int_eq(call_err(FUSE_SETATTR, VFS_DISK_INO, &sa, sizeof(sa), NULL, 0), -EINVAL);
    sa.size = 0;
    ck_assert_int_eq(call_err(FUSE_SETATTR, 1, &sa, sizeof(sa), NULL, 0), -EISDIR);
}
END_TEST

START_TEST(setattr_read_only)
{
    struct fuse_setattr_in sa = { .valid = FATTR_SIZE, .size = 2 * DISK_SIZE };
    struct fuse_fallocate_in fa = { .offset = 0, .length = 4096,
                                    .mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE };
    struct fuse_attr a;

    do_init_current();
    ck_assert_int_eq(call_err(FUSE_SETATTR, VFS_DISK_INO, &sa, sizeof(sa), NULL, 0), -EROFS);
    ck_assert_int_eq(write_disk("x", 1, 0), -EROFS);
    ck_assert_int_eq(call_err(FUSE_OPEN, VFS_DISK_INO, &open_rw, sizeof(open_rw), NULL, 0),
                     -EROFS);
    ck_assert_int_eq(call_err(FUSE_FALLOCATE, VFS_DISK_INO, &fa, sizeof(fa), NULL, 0), -EROFS);
    ck_assert_int_eq(call_err(FUSE_GETATTR, VFS_DISK_INO, &(struct fuse_getattr_in){ 0 },
                              sizeof(struct fuse_getattr_in), NULL, 0), 0);
    a = reply_attr_of(sizeof(struct fuse_attr_out));
    ck_assert_uint_eq(a.mode, S_IFREG | 0440);
}
END_TEST

/* Walk the dirents of a READDIR reply; returns how many, names in @names. */
static unsigned parse_dirents(char names[][16], uint64_t *last_off)
{
    size_t pos = 0;
    unsigned n = 0;

    while (pos < F.cap.reply_len) {
        struct fuse_dirent d;
        ck_assert_uint_ge(F.cap.reply_len - pos, FUSE_NAME_OFFSET);
        memcpy(&d, F.cap.reply + pos, FUSE_NAME_OFFSET);
        ck_assert_uint_le(pos + FUSE_DIRENT_SIZE(&d), F.cap.reply_len);
        ck_assert_uint_lt(d.namelen, 16);
        memcpy(names[n], F.cap.reply + pos + FUSE_NAME_OFFSET, d.namelen);
        names[n][d.namelen] = 0;
        /* Padding is zeros (no bytes of an earlier reply leak). */
        for (size_t i = FUSE_NAME_OFFSET + d.namelen; i < FUSE_DIRENT_SIZE(&d); i++)
            ck_assert_uint_eq(F.cap.reply[pos + i], 0);
        *last_off = d.off;
        pos += FUSE_DIRENT_SIZE(&d);
        n++;
    }
    return n;
}

START_TEST(opendir_readdir_releasedir)
{
    struct fuse_open_in od = { .flags = O_RDONLY | O_DIRECTORY };
    struct fuse_read_in rd = read_in(0, 4096);
    struct fuse_release_in rel = { 0 };
    char names[8][16];
    uint64_t off = 0;
    uint64_t ino;

    do_init_current();
    ck_assert_int_eq(vfs_add_file(F.vfs, 1, "second", 0444, &vfs_image_file_ops,
                                  F.img, &ino), 0);
    memset(F.cap.buf, 0xa5, F.cap.buf_cap);
    ck_assert_int_eq(call_err(FUSE_OPENDIR, 1, &od, sizeof(od), NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, sizeof(struct fuse_open_out));
    ck_assert_int_eq(call_err(FUSE_READDIR, 1, &rd, sizeof(rd), NULL, 0), 0);
    ck_assert_uint_eq(parse_dirents(names, &off), 4);
    ck_assert_str_eq(names[0], ".");
    ck_assert_str_eq(names[1], "..");
    ck_assert_str_eq(names[2], "disk");
    ck_assert_str_eq(names[3], "second");
    /* A small buffer: one entry per reply, resumed at the offset. */
    rd = read_in(0, 32);
    ck_assert_int_eq(call_err(FUSE_READDIR, 1, &rd, sizeof(rd), NULL, 0), 0);
    ck_assert_uint_eq(parse_dirents(names, &off), 1);
    ck_assert_str_eq(names[0], ".");
    rd = read_in(off, 4096);
    ck_assert_int_eq(call_err(FUSE_READDIR, 1, &rd, sizeof(rd), NULL, 0), 0);
    ck_assert_uint_eq(parse_dirents(names, &off), 3);
    ck_assert_str_eq(names[0], "..");
    rd = read_in(off, 4096);
    ck_assert_int_eq(call_err(FUSE_READDIR, 1, &rd, sizeof(rd), NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, 0);
    /* A buffer too small for one entry: an empty reply. */
    rd = read_in(0, 8);
    ck_assert_int_eq(call_err(FUSE_READDIR, 1, &rd, sizeof(rd), NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, 0);
    rd = read_in(0, 4096);
    ck_assert_int_eq(call_err(FUSE_READDIR, VFS_DISK_INO, &rd, sizeof(rd), NULL, 0), -ENOTDIR);
    ck_assert_int_eq(call_err(FUSE_RELEASEDIR, 1, &rel, sizeof(rel), NULL, 0), 0);
}
END_TEST

START_TEST(xattrs)
{
    struct fuse_getxattr_in gx = { .size = 0 };
    struct fuse_getxattr_out go;
    static const char stats[] = "user.qcow2fuse.stats";
    uint32_t len;

    do_init_current();
    ck_assert_int_eq(call_err(FUSE_GETXATTR, VFS_DISK_INO, &gx, sizeof(gx), stats,
                              sizeof(stats)), 0);
    ck_assert_uint_eq(F.cap.reply_len, sizeof(go));
    memcpy(&go, F.cap.reply, sizeof(go));
    len = go.size;
    ck_assert_uint_gt(len, 10);
    gx.size = len;
    ck_assert_int_eq(call_err(FUSE_GETXATTR, VFS_DISK_INO, &gx, sizeof(gx), stats,
                              sizeof(stats)), 0);
    ck_assert_uint_eq(F.cap.reply_len, len);
    F.cap.reply[len] = 0;
    ck_assert_ptr_nonnull(strstr((char *)F.cap.reply, "clusters allocated"));
    gx.size = len - 1;
    ck_assert_int_eq(call_err(FUSE_GETXATTR, VFS_DISK_INO, &gx, sizeof(gx), stats,
                              sizeof(stats)), -ERANGE);
    ck_assert_int_eq(call_err(FUSE_GETXATTR, VFS_DISK_INO, &gx, sizeof(gx), "user.x", 7),
                     -ENODATA);
    ck_assert_int_eq(call_err(FUSE_GETXATTR, 1, &gx, sizeof(gx), stats, sizeof(stats)),
                     -ENODATA);

    gx.size = 0;
    ck_assert_int_eq(call_err(FUSE_LISTXATTR, VFS_DISK_INO, &gx, sizeof(gx), NULL, 0), 0);
    memcpy(&go, F.cap.reply, sizeof(go));
    ck_assert_uint_eq(go.size, sizeof(stats));
    gx.size = 4096;
    ck_assert_int_eq(call_err(FUSE_LISTXATTR, VFS_DISK_INO, &gx, sizeof(gx), NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, sizeof(stats));
    ck_assert_int_eq(memcmp(F.cap.reply, stats, sizeof(stats)), 0);
    gx.size = 3;
    ck_assert_int_eq(call_err(FUSE_LISTXATTR, VFS_DISK_INO, &gx, sizeof(gx), NULL, 0),
                     -ERANGE);
    /* Not served (as under libfuse): the kernel then answers EOPNOTSUPP. */
    ck_assert_int_eq(call_err(FUSE_SETXATTR, VFS_DISK_INO, &gx, sizeof(gx), stats,
                              sizeof(stats)), -ENOSYS);
    ck_assert_int_eq(call_err(FUSE_REMOVEXATTR, VFS_DISK_INO, NULL, 0, stats,
                              sizeof(stats)), -ENOSYS);
}
END_TEST

START_TEST(fallocate_and_lseek)
{
    struct fuse_fallocate_in fa = { .offset = 65536 + 4096, .length = 4096,
                                    .mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE };
    struct fuse_lseek_in ls = { .offset = 0, .whence = SEEK_DATA };
    struct fuse_lseek_out lo;
    struct fuse_read_in rd = read_in(65536, 3 * 4096);
    uint8_t *ones = tu_zalloc(3 * 4096);

    do_init_current();
    memset(ones, 1, 3 * 4096);
    ck_assert_int_eq(write_disk(ones, 3 * 4096, 65536), 0);
    ck_assert_int_eq(call_err(FUSE_FALLOCATE, VFS_DISK_INO, &fa, sizeof(fa), NULL, 0), 0);
    ck_assert_int_eq(call_err(FUSE_READ, VFS_DISK_INO, &rd, sizeof(rd), NULL, 0), 0);
    for (unsigned i = 0; i < 3 * 4096; i++)
        ck_assert_uint_eq(F.cap.reply[i], i >= 4096 && i < 8192 ? 0 : 1);
    /* Other modes and growing: EOPNOTSUPP; a zero length: EINVAL. */
    fa.mode = FALLOC_FL_COLLAPSE_RANGE;
    ck_assert_int_eq(call_err(FUSE_FALLOCATE, VFS_DISK_INO, &fa, sizeof(fa), NULL, 0),
                     -EOPNOTSUPP);
    fa.mode = 0;
    fa.offset = DISK_SIZE;
    ck_assert_int_eq(call_err(FUSE_FALLOCATE, VFS_DISK_INO, &fa, sizeof(fa), NULL, 0),
                     -EOPNOTSUPP);
    fa.length = 0;
    ck_assert_int_eq(call_err(FUSE_FALLOCATE, VFS_DISK_INO, &fa, sizeof(fa), NULL, 0),
                     -EINVAL);
    fa.offset = 1ull << 63;
    fa.length = 4096;
    ck_assert_int_eq(call_err(FUSE_FALLOCATE, VFS_DISK_INO, &fa, sizeof(fa), NULL, 0),
                     -EINVAL);
    fa.offset = 0;
    fa.length = UINT64_MAX;
    ck_assert_int_eq(call_err(FUSE_FALLOCATE, VFS_DISK_INO, &fa, sizeof(fa), NULL, 0),
                     -EINVAL);

    ck_assert_int_eq(call_err(FUSE_LSEEK, VFS_DISK_INO, &ls, sizeof(ls), NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, sizeof(lo));
    memcpy(&lo, F.cap.reply, sizeof(lo));
    ck_assert_uint_eq(lo.offset, 65536);
    ls.whence = SEEK_HOLE;
    ls.offset = 65536;
    ck_assert_int_eq(call_err(FUSE_LSEEK, VFS_DISK_INO, &ls, sizeof(ls), NULL, 0), 0);
    memcpy(&lo, F.cap.reply, sizeof(lo));
    ck_assert_uint_eq(lo.offset, 131072);
    ls.offset = DISK_SIZE;
    ck_assert_int_eq(call_err(FUSE_LSEEK, VFS_DISK_INO, &ls, sizeof(ls), NULL, 0), -ENXIO);
    ls.offset = 1ull << 63;
    ls.whence = 77;
    ck_assert_int_eq(call_err(FUSE_LSEEK, VFS_DISK_INO, &ls, sizeof(ls), NULL, 0), -ENXIO);
    ls.offset = 0;
    ck_assert_int_eq(call_err(FUSE_LSEEK, VFS_DISK_INO, &ls, sizeof(ls), NULL, 0), -EINVAL);
    free(ones);
}
END_TEST

START_TEST(no_reply_and_unserved)
{
    struct fuse_forget_in fg = { .nlookup = 1 };
    struct {
        struct fuse_batch_forget_in h;
        struct fuse_forget_one one[2];
    } bf = { .h = { .count = 2 } };
    struct fuse_interrupt_in intr = { .unique = 3 };
    struct fuse_access_in ac = { .mask = 4 };
    uint8_t junk[64] = { 0 };

    do_init_current();
    ck_assert_uint_eq(call(FUSE_FORGET, VFS_DISK_INO, &fg, sizeof(fg), NULL, 0), 0);
    ck_assert_uint_eq(call(FUSE_BATCH_FORGET, 0, &bf, sizeof(bf), NULL, 0), 0);
    ck_assert_uint_eq(call(FUSE_INTERRUPT, 0, &intr, sizeof(intr), NULL, 0), 0);
    ck_assert_uint_eq(call(FUSE_NOTIFY_REPLY, 0, junk, sizeof(junk), NULL, 0), 0);
    /* Malformed ones still get none. */
    ck_assert_uint_eq(call(FUSE_FORGET, VFS_DISK_INO, NULL, 0, NULL, 0), 0);
    bf.h.count = 1000;
    ck_assert_uint_eq(call(FUSE_BATCH_FORGET, 0, &bf, sizeof(bf), NULL, 0), 0);
    ck_assert_uint_eq(call_ex(FUSE_BATCH_FORGET, 0, &bf, sizeof(bf), NULL, 0, false, 9), 0);
    ck_assert_uint_eq(call(FUSE_INTERRUPT, 0, NULL, 0, NULL, 0), 0);

    ck_assert_int_eq(call_err(FUSE_ACCESS, 1, &ac, sizeof(ac), NULL, 0), -ENOSYS);
    ck_assert_int_eq(call_err(FUSE_MKNOD, 1, junk, sizeof(junk), NULL, 0), -ENOSYS);
    ck_assert_int_eq(call_err(FUSE_CREATE, 1, junk, sizeof(junk), NULL, 0), -ENOSYS);
    ck_assert_int_eq(call_err(FUSE_READDIRPLUS, 1, junk, sizeof(junk), NULL, 0), -ENOSYS);
    ck_assert_int_eq(call_err(52, 1, junk, sizeof(junk), NULL, 0), -ENOSYS);   /* STATX */
    ck_assert_int_eq(call_err(0, 1, NULL, 0, NULL, 0), -ENOSYS);
    ck_assert_int_eq(call_err(4096, 1, NULL, 0, NULL, 0), -ENOSYS);       /* CUSE_INIT */
    ck_assert_int_eq(call_err(UINT32_MAX, 1, NULL, 0, NULL, 0), -ENOSYS);
    ck_assert_int_eq(call_err(FUSE_DESTROY, 0, NULL, 0, NULL, 0), 0);
}
END_TEST

/* ---- Malformed requests ---- */

START_TEST(header_length_must_match)
{
    struct fuse_getattr_in ga = { 0 };

    do_init_current();
    ck_assert_uint_eq(call_ex(FUSE_GETATTR, 1, &ga, sizeof(ga), NULL, 0, false, 1), 1);
    ck_assert_int_eq(F.cap.error, -EIO);
    ck_assert_uint_eq(call_ex(FUSE_GETATTR, 1, &ga, sizeof(ga), NULL, 0, false, -1), 1);
    ck_assert_int_eq(F.cap.error, -EIO);
    ck_assert_uint_eq(call_ex(FUSE_GETATTR, 1, &ga, sizeof(ga), NULL, 0, false, -1000), 1);
    ck_assert_int_eq(F.cap.error, -EIO);
    ck_assert_uint_eq(call_ex(FUSE_WRITE, VFS_DISK_INO, &ga, sizeof(ga), NULL, 0, true,
                              (long)UINT32_MAX - 56), 1);
    ck_assert_int_eq(F.cap.error, -EIO);
    ck_assert_uint_eq(call_ex(FUSE_INIT, 0, &ga, sizeof(ga), NULL, 0, false, 64), 1);
    ck_assert_int_eq(F.cap.error, -EIO);
}
END_TEST

/* Every opcode with an op header, given one byte less than it needs. */
START_TEST(op_header_too_short)
{
    static const struct { uint32_t opcode; size_t size; } ops[] = {
        { FUSE_GETATTR, sizeof(struct fuse_getattr_in) },
        { FUSE_SETATTR, sizeof(struct fuse_setattr_in) },
        { FUSE_OPEN, sizeof(struct fuse_open_in) },
        { FUSE_OPENDIR, sizeof(struct fuse_open_in) },
        { FUSE_READ, sizeof(struct fuse_read_in) },
        { FUSE_READDIR, sizeof(struct fuse_read_in) },
        { FUSE_WRITE, sizeof(struct fuse_write_in) },
        { FUSE_RELEASE, sizeof(struct fuse_release_in) },
        { FUSE_RELEASEDIR, sizeof(struct fuse_release_in) },
        { FUSE_FLUSH, sizeof(struct fuse_flush_in) },
        { FUSE_FSYNC, sizeof(struct fuse_fsync_in) },
        { FUSE_FSYNCDIR, sizeof(struct fuse_fsync_in) },
        { FUSE_GETXATTR, sizeof(struct fuse_getxattr_in) },
        { FUSE_LISTXATTR, sizeof(struct fuse_getxattr_in) },
        { FUSE_FALLOCATE, sizeof(struct fuse_fallocate_in) },
        { FUSE_LSEEK, sizeof(struct fuse_lseek_in) },
    };
    uint8_t zeros[128] = { 0 };

    do_init_current();
    for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
        for (size_t len = 0; len < ops[i].size; len++) {
            int err = call_err(ops[i].opcode, VFS_DISK_INO, zeros, len, NULL, 0);
            ck_assert_msg(err == -EINVAL, "opcode %u with %zu of %zu bytes: %d",
                          ops[i].opcode, len, ops[i].size, err);
        }
    }
}
END_TEST

START_TEST(names_need_their_nul)
{
    struct fuse_getxattr_in gx = { .size = 64 };
    char name[300];

    do_init_current();
    ck_assert_int_eq(call_err(FUSE_LOOKUP, 1, NULL, 0, "disk", 4), -EINVAL);
    ck_assert_int_eq(call_err(FUSE_LOOKUP, 1, NULL, 0, NULL, 0), -EINVAL);
    ck_assert_uint_eq(call_ex(FUSE_LOOKUP, 1, NULL, 0, NULL, 0, true, 0), 1);
    ck_assert_int_eq(F.cap.error, -EINVAL);
    ck_assert_int_eq(call_err(FUSE_GETXATTR, VFS_DISK_INO, &gx, sizeof(gx), "user.x", 6),
                     -EINVAL);
    /* A NUL inside: the name ends there. */
    ck_assert_int_eq(call_err(FUSE_LOOKUP, 1, NULL, 0, "disk\0junk", 9), 0);
    /* Long names are vfs's business: not found. */
    memset(name, 'a', sizeof(name));
    name[sizeof(name) - 1] = 0;
    ck_assert_int_eq(call_err(FUSE_LOOKUP, 1, NULL, 0, name, sizeof(name)), -ENOENT);
}
END_TEST

START_TEST(huge_sizes_and_offsets)
{
    struct fuse_read_in rd = read_in(0, (1u << 20) + 1);
    struct fuse_write_in w = { .offset = 0, .size = 4096 };

    do_init_current();
    ck_assert_int_eq(call_err(FUSE_READ, VFS_DISK_INO, &rd, sizeof(rd), NULL, 0), -EINVAL);
    rd.size = UINT32_MAX;
    ck_assert_int_eq(call_err(FUSE_READ, VFS_DISK_INO, &rd, sizeof(rd), NULL, 0), -EINVAL);
    rd = read_in(1ull << 63, 4096);
    ck_assert_int_eq(call_err(FUSE_READ, VFS_DISK_INO, &rd, sizeof(rd), NULL, 0), -EINVAL);
    rd = read_in(UINT64_MAX, 4096);
    ck_assert_int_eq(call_err(FUSE_READDIR, 1, &rd, sizeof(rd), NULL, 0), -EINVAL);
    rd = read_in(INT64_MAX, 4096);
    ck_assert_int_eq(call_err(FUSE_READ, VFS_DISK_INO, &rd, sizeof(rd), NULL, 0), 0);
    ck_assert_uint_eq(F.cap.reply_len, 0);
    rd = read_in(1000, UINT32_MAX);
    ck_assert_int_eq(call_err(FUSE_READDIR, 1, &rd, sizeof(rd), NULL, 0), 0);
    /* WRITE: a size beyond the data that came, and an offset past 2^63. */
    ck_assert_int_eq(call_err(FUSE_WRITE, VFS_DISK_INO, &w, sizeof(w), "abc", 3), -EINVAL);
    w.size = UINT32_MAX;
    ck_assert_int_eq(call_err(FUSE_WRITE, VFS_DISK_INO, &w, sizeof(w), "abc", 3), -EINVAL);
    w.size = 3;
    w.offset = 1ull << 63;
    ck_assert_int_eq(call_err(FUSE_WRITE, VFS_DISK_INO, &w, sizeof(w), "abc", 3), -EINVAL);
    w.offset = INT64_MAX;
    ck_assert_int_eq(call_err(FUSE_WRITE, VFS_DISK_INO, &w, sizeof(w), "abc", 3), -ENOSPC);
    /* Unknown node ids. */
    w.offset = 0;
    ck_assert_int_eq(call_err(FUSE_WRITE, UINT64_MAX, &w, sizeof(w), "abc", 3), -ESTALE);
    ck_assert_int_eq(call_err(FUSE_GETATTR, 0, &(struct fuse_getattr_in){ 0 },
                              sizeof(struct fuse_getattr_in), NULL, 0), -ESTALE);
}
END_TEST

/* ---- Protocol fuzz ---- */

static uint64_t rng_state;

static uint64_t rnd(void)
{
    /* xorshift64*: deterministic, so a failure can be replayed. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

static bool has_no_reply(uint32_t opcode)
{
    return opcode == FUSE_FORGET || opcode == FUSE_BATCH_FORGET ||
           opcode == FUSE_INTERRUPT || opcode == FUSE_NOTIFY_REPLY;
}

/*
 * Random requests on a read-only mount (so that a random SETATTR size or
 * FALLOCATE length cannot make the memory image huge): opcodes mostly
 * from the ones we serve, op headers of random length filled with random
 * bytes or with small, interesting values, names with and without their
 * NUL, header lengths that are right, too large or too small.  Each
 * request gets exactly one reply with an error in [-511, 0] (none for the
 * four that have none) and the server still answers normally afterwards.
 */
START_TEST(protocol_fuzz)
{
    static const uint32_t opcodes[] = {
        FUSE_LOOKUP, FUSE_FORGET, FUSE_GETATTR, FUSE_SETATTR, FUSE_OPEN, FUSE_READ,
        FUSE_WRITE, FUSE_STATFS, FUSE_RELEASE, FUSE_FSYNC, FUSE_SETXATTR,
        FUSE_GETXATTR, FUSE_LISTXATTR, FUSE_REMOVEXATTR, FUSE_FLUSH, FUSE_INIT,
        FUSE_OPENDIR, FUSE_READDIR, FUSE_RELEASEDIR, FUSE_FSYNCDIR, FUSE_ACCESS,
        FUSE_INTERRUPT, FUSE_DESTROY, FUSE_BATCH_FORGET, FUSE_FALLOCATE, FUSE_LSEEK,
        FUSE_NOTIFY_REPLY,
    };
    static const uint64_t interesting[] = {
        0, 1, 2, 3, 4095, 4096, 65536, 1u << 20, (1u << 20) + 1, DISK_SIZE - 1,
        DISK_SIZE, INT32_MAX, UINT32_MAX, INT64_MAX, 1ull << 63, UINT64_MAX,
    };
    uint8_t *arg = tu_zalloc(8192), *payload = tu_zalloc(8192);
    unsigned replies = 0;

    do_init_current();
    rng_state = 0x9e3779b97f4a7c15ull;
    for (unsigned i = 0; i < 5000; i++) {
        uint64_t pick = rnd();
        uint32_t opcode = pick % 8 == 0 ? (uint32_t)rnd() % 64
                        : opcodes[pick % (sizeof(opcodes) / sizeof(opcodes[0]))];
        uint64_t node = rnd() % 4 == 0 ? rnd() : rnd() % 4;
        size_t arg_len = rnd() % 5 == 0 ? rnd() % 8192 : rnd() % 129;
        size_t tail_len = rnd() % 3 == 0 ? rnd() % 8192 : rnd() % 64;
        bool split = rnd() % 4 == 0;
        long delta = rnd() % 6 == 0 ? (long)(rnd() % 200) - 100 : 0;
        unsigned sent;

        for (size_t j = 0; j < arg_len; j += 8) {
            uint64_t v = rnd() % 2 ? rnd() : interesting[rnd() % 16];
            memcpy(arg + j, &v, arg_len - j < 8 ? arg_len - j : 8);
        }
        for (size_t j = 0; j < tail_len; j++)
            payload[j] = rnd() % 3 ? (uint8_t)('a' + rnd() % 26) : (uint8_t)rnd();
        sent = call_ex(opcode, node, arg, arg_len, payload, tail_len, split, delta);
        if (has_no_reply(opcode)) {
            ck_assert_msg(sent == 0, "case %u: opcode %u replied", i, opcode);
            continue;
        }
        ck_assert_msg(sent == 1, "case %u: opcode %u got no reply", i, opcode);
        ck_assert_msg(F.cap.error <= 0 && F.cap.error > -512,
                      "case %u: error %d", i, F.cap.error);
        if (delta)
            ck_assert_int_eq(F.cap.error, -EIO);
        replies++;
    }
    ck_assert_uint_gt(replies, 3000);
    /* Still serving. */
    ck_assert_int_eq(call_err(FUSE_LOOKUP, 1, NULL, 0, "disk", 5), 0);
    free(arg);
    free(payload);
}
END_TEST

/* ---- The classic transport, over a socket pair ---- */

struct serve_thread {
    pthread_t thread;
    int fd;
    unsigned threads;
    int ret;
};

static void *serve_main(void *arg)
{
    struct serve_thread *s = arg;

    s->ret = fuse_server_serve(F.srv, s->fd, s->threads);
    return NULL;
}

static void send_msg(int fd, uint32_t opcode, uint64_t unique, const void *arg, size_t len)
{
    uint8_t buf[256];
    struct fuse_in_header in = { .len = (uint32_t)(sizeof(in) + len), .opcode = opcode,
                                 .unique = unique, .nodeid = 1 };

    ck_assert_uint_le(sizeof(in) + len, sizeof(buf));
    memcpy(buf, &in, sizeof(in));
    memcpy(buf + sizeof(in), arg, len);
    ck_assert_int_eq((int)write(fd, buf, sizeof(in) + len), (int)(sizeof(in) + len));
}

/* One reply message: its header, and the payload's length. */
static struct fuse_out_header recv_reply(int fd, size_t *payload_len)
{
    static uint8_t buf[1u << 16];
    struct fuse_out_header out;
    ssize_t n = read(fd, buf, sizeof(buf));

    ck_assert_int_ge(n, (ssize_t)sizeof(out));
    memcpy(&out, buf, sizeof(out));
    ck_assert_uint_eq(out.len, (size_t)n);
    *payload_len = (size_t)n - sizeof(out);
    return out;
}

static void start_serving(struct serve_thread *s, int sv[2], unsigned threads)
{
    ck_assert_int_eq(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
    s->fd = sv[1];
    s->threads = threads;
    ck_assert_int_eq(pthread_create(&s->thread, NULL, serve_main, s), 0);
}

/* INIT, a truncated message (no reply: nothing to answer to) and requests
 * on 4 workers; closing the other end ends every worker and serve. */
START_TEST(classic_transport_end_of_connection)
{
    struct fuse_init_in in = init_in(FUSE_PROTO_MINOR, ALL_OFFERED, ALL_OFFERED);
    struct fuse_getattr_in ga = { 0 };
    struct serve_thread s;
    struct fuse_out_header out;
    bool seen[20] = { false };
    size_t len;
    int sv[2];

    log_errors = 0;
    log_set_hook(count_errors);         /* before the workers log */
    start_serving(&s, sv, 4);
    send_msg(sv[0], FUSE_INIT, 1, &in, sizeof(in));
    out = recv_reply(sv[0], &len);
    ck_assert_uint_eq(out.unique, 1);
    ck_assert_int_eq(out.error, 0);
    ck_assert_uint_eq(len, sizeof(struct fuse_init_out));
    ck_assert_int_eq((int)write(sv[0], "short", 5), 5);
    for (uint64_t u = 2; u < 20; u++)
        send_msg(sv[0], FUSE_GETATTR, u, &ga, sizeof(ga));
    for (unsigned i = 2; i < 20; i++) {
        out = recv_reply(sv[0], &len);
        ck_assert_int_eq(out.error, 0);
        ck_assert_uint_eq(len, sizeof(struct fuse_attr_out));
        ck_assert_uint_lt(out.unique, 20);
        ck_assert(!seen[out.unique]);
        seen[out.unique] = true;
    }
    close(sv[0]);
    ck_assert_int_eq(pthread_join(s.thread, NULL), 0);
    ck_assert_int_eq(s.ret, 0);
    /* The worker that read the 5 bytes said so. */
    ck_assert_uint_eq(log_errors, 1);
    log_set_hook(NULL);
    close(sv[1]);
}
END_TEST

/* fuse_server_stop while the workers wait in read(): serve returns, and
 * the connection stays open for the caller to unmount. */
START_TEST(classic_transport_stop)
{
    struct serve_thread s;
    int sv[2];

    start_serving(&s, sv, 3);
    fuse_server_stop(F.srv);
    ck_assert_int_eq(pthread_join(s.thread, NULL), 0);
    ck_assert_int_eq(s.ret, 0);
    ck_assert_int_ge(fcntl(sv[1], F_GETFD), 0);
    close(sv[0]);
    close(sv[1]);
}
END_TEST

/* A request of any size: the header, @arg, then @tail_len bytes of @tail. */
static void send_parts(int fd, uint32_t opcode, uint64_t unique, uint64_t nodeid,
                       const void *arg, size_t arg_len, const void *tail, size_t tail_len)
{
    struct fuse_in_header in = { .len = (uint32_t)(sizeof(in) + arg_len + tail_len),
                                 .opcode = opcode, .unique = unique, .nodeid = nodeid };
    uint8_t *buf = tu_zalloc(in.len);

    memcpy(buf, &in, sizeof(in));
    memcpy(buf + sizeof(in), arg, arg_len);
    if (tail_len)
        memcpy(buf + sizeof(in) + arg_len, tail, tail_len);
    ck_assert_int_eq((int)write(fd, buf, in.len), (int)in.len);
    free(buf);
}

/* The payload of the reply to @unique, which must succeed. */
static const uint8_t *recv_ok(int fd, uint64_t unique, size_t *len)
{
    static uint8_t buf[(1u << 20) + 4096];
    struct fuse_out_header out;
    ssize_t n = read(fd, buf, sizeof(buf));

    ck_assert_int_ge(n, (ssize_t)sizeof(out));
    memcpy(&out, buf, sizeof(out));
    ck_assert_uint_eq(out.len, (size_t)n);
    ck_assert_uint_eq(out.unique, unique);
    ck_assert_int_eq(out.error, 0);
    *len = (size_t)n - sizeof(out);
    return buf + sizeof(out);
}

/* WRITE @len bytes of @data at @off as request @unique; all must be taken. */
static void write_through(int fd, uint64_t unique, uint64_t off, const void *data,
                          uint32_t len)
{
    struct fuse_write_in wr = { .offset = off, .size = len };
    struct fuse_write_out wo;
    const uint8_t *p;
    size_t n;

    send_parts(fd, FUSE_WRITE, unique, VFS_DISK_INO, &wr, sizeof(wr), data, len);
    p = recv_ok(fd, unique, &n);
    ck_assert_uint_eq(n, sizeof(wo));
    memcpy(&wo, p, sizeof(wo));
    ck_assert_uint_eq(wo.size, len);
}

/* READ @len bytes at @off as request @unique, the READ followed by
 * @junk_len bytes of @junk; they must be @expect. */
static void read_through(int fd, uint64_t unique, uint64_t off, uint32_t len,
                         const void *junk, size_t junk_len, const uint8_t *expect)
{
    struct fuse_read_in rd = read_in(off, len);
    const uint8_t *p;
    size_t n;

    send_parts(fd, FUSE_READ, unique, VFS_DISK_INO, &rd, sizeof(rd), junk, junk_len);
    p = recv_ok(fd, unique, &n);
    ck_assert_uint_eq(n, len);
    ck_assert_int_eq(memcmp(p, expect, len), 0);
}

/*
 * A worker's one buffer holds each request and builds each reply
 * (src/fuse_server.c): data written through the transport reads back
 * through it, right after a WRITE filled the buffer; a READ that carries
 * more than a page of trailing bytes (so its reply cannot be built past
 * it) is answered from the fallback buffer, still right; a GETXATTR's
 * reply is built while its name sits in the same buffer; and a 256 KiB
 * WRITE and READ, then the small ones again.  One worker, so every
 * request goes through the same buffer.
 */
START_TEST(classic_transport_one_buffer)
{
    enum { LEN = 48u << 10, OFF = 65536 - 777, BIG = 256u << 10, BIG_OFF = 1u << 20 };
    struct fuse_init_in in = init_in(FUSE_PROTO_MINOR, ALL_OFFERED, ALL_OFFERED);
    struct fuse_getxattr_in gx = { .size = 4096 };
    static const char name[] = "user.qcow2fuse.stats";
    uint8_t *data = tu_zalloc(LEN), *junk = tu_zalloc(6000), *big = tu_zalloc(BIG);
    int sndbuf = 1 << 20;
    struct serve_thread s;
    const uint8_t *p;
    size_t len;
    int sv[2];

    for (size_t i = 0; i < LEN; i++)
        data[i] = (uint8_t)(i * 13 + (i >> 9));
    memset(junk, 0xee, 6000);
    for (size_t i = 0; i < BIG; i++)
        big[i] = (uint8_t)(i * 3 + (i >> 11));
    start_serving(&s, sv, 1);
    /* Room for a 256 KiB message each way (the kernel caps it at twice
     * net.core.wmem_max, 416 KiB by default). */
    ck_assert_int_eq(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf)), 0);
    ck_assert_int_eq(setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf)), 0);
    send_msg(sv[0], FUSE_INIT, 1, &in, sizeof(in));
    recv_ok(sv[0], 1, &len);
    send_parts(sv[0], FUSE_OPEN, 2, VFS_DISK_INO, &open_rw, sizeof(open_rw), NULL, 0);
    recv_ok(sv[0], 2, &len);

    write_through(sv[0], 3, OFF, data, LEN);
    read_through(sv[0], 4, OFF, LEN, NULL, 0, data);
    /* More than a page past the READ's header. */
    read_through(sv[0], 5, OFF, LEN, junk, 6000, data);
    /* A short READ after them: only its own bytes come back. */
    read_through(sv[0], 6, OFF + 100, 1000, NULL, 0, data + 100);
    send_parts(sv[0], FUSE_GETXATTR, 7, VFS_DISK_INO, &gx, sizeof(gx), name, sizeof(name));
    p = recv_ok(sv[0], 7, &len);
    ck_assert_uint_gt(len, 0);
    ck_assert_ptr_nonnull(memmem(p, len, "flushes", 7));

    write_through(sv[0], 8, BIG_OFF, big, BIG);
    read_through(sv[0], 9, BIG_OFF, BIG, NULL, 0, big);
    read_through(sv[0], 10, OFF, LEN, junk, 6000, data);
    read_through(sv[0], 11, OFF, LEN, NULL, 0, data);

    close(sv[0]);
    ck_assert_int_eq(pthread_join(s.thread, NULL), 0);
    ck_assert_int_eq(s.ret, 0);
    close(sv[1]);
    free(data);
    free(junk);
    free(big);
}
END_TEST

/* Check's runner leaves its own handlers in the test process; a daemon
 * starts with the defaults. */
static void default_stop_signals(void)
{
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
}

/* SIGTERM through the handlers, as the daemon gets it. */
START_TEST(classic_transport_sigterm)
{
    struct fuse_init_in in = init_in(FUSE_PROTO_MINOR, ALL_OFFERED, ALL_OFFERED);
    struct serve_thread s;
    size_t len;
    int sv[2];

    default_stop_signals();
    fuse_server_handle_signals(F.srv);
    start_serving(&s, sv, 2);
    send_msg(sv[0], FUSE_INIT, 1, &in, sizeof(in));
    ck_assert_int_eq(recv_reply(sv[0], &len).error, 0);
    ck_assert_int_eq(kill(getpid(), SIGTERM), 0);
    ck_assert_int_eq(pthread_join(s.thread, NULL), 0);
    ck_assert_int_eq(s.ret, 0);
    close(sv[0]);
    close(sv[1]);
}
END_TEST

/* An ignored SIGINT stays ignored (a background job's). */
START_TEST(ignored_signal_stays_ignored)
{
    struct sigaction sa = { .sa_handler = SIG_IGN }, now;

    default_stop_signals();
    sigemptyset(&sa.sa_mask);
    ck_assert_int_eq(sigaction(SIGINT, &sa, NULL), 0);
    fuse_server_handle_signals(F.srv);
    ck_assert_int_eq(sigaction(SIGINT, NULL, &now), 0);
    ck_assert_ptr_eq((void *)now.sa_handler, (void *)SIG_IGN);
    ck_assert_int_eq(sigaction(SIGTERM, NULL, &now), 0);
    ck_assert_ptr_ne((void *)now.sa_handler, (void *)SIG_DFL);
    fuse_server_free(F.srv);
    F.srv = NULL;
    ck_assert_int_eq(sigaction(SIGTERM, NULL, &now), 0);
    ck_assert_ptr_eq((void *)now.sa_handler, (void *)SIG_DFL);
}
END_TEST

static Suite *fuse_server_suite(void)
{
    Suite *s = suite_create("fuse_server");
    TCase *tc;

    tc = tcase_create("init");
    tcase_add_checked_fixture(tc, setup_rw, teardown);
    tcase_add_test(tc, init_current_kernel);
    tcase_add_test(tc, init_only_what_is_offered);
    tcase_add_test(tc, init_older_minors);
    tcase_add_test(tc, init_minor_4);
    tcase_add_test(tc, init_12_no_background);
    tcase_add_test(tc, old_minor_compat_sizes);
    tcase_add_test(tc, init_major_8_then_7);
    tcase_add_test(tc, init_major_6_refused);
    tcase_add_test(tc, requests_before_init_and_second_init);
    tcase_add_test(tc, init_short);
    suite_add_tcase(s, tc);

    tc = tcase_create("init_uring");
    tcase_add_checked_fixture(tc, setup_uring, teardown);
    tcase_add_test(tc, init_io_uring_when_asked);
    tcase_add_test(tc, init_io_uring_not_offered);
    suite_add_tcase(s, tc);

    tc = tcase_create("ops");
    tcase_set_timeout(tc, 60);
    tcase_add_checked_fixture(tc, setup_rw, teardown);
    tcase_add_test(tc, lookup_getattr_statfs);
    tcase_add_test(tc, open_read_write_flush_fsync_release);
    tcase_add_test(tc, sync_writes_flush_before_reply);
    tcase_add_test(tc, read_through_fallback_buffer);
    tcase_add_test(tc, split_payload_layout);
    tcase_add_test(tc, setattr_size_owner_times);
    tcase_add_test(tc, opendir_readdir_releasedir);
    tcase_add_test(tc, xattrs);
    tcase_add_test(tc, fallocate_and_lseek);
    tcase_add_test(tc, no_reply_and_unserved);
    suite_add_tcase(s, tc);

    tc = tcase_create("ops_ro");
    tcase_add_checked_fixture(tc, setup_ro, teardown);
    tcase_add_test(tc, setattr_read_only);
    suite_add_tcase(s, tc);

    tc = tcase_create("malformed");
    tcase_set_timeout(tc, 120);
    tcase_add_checked_fixture(tc, setup_rw, teardown);
    tcase_add_test(tc, header_length_must_match);
    tcase_add_test(tc, op_header_too_short);
    tcase_add_test(tc, names_need_their_nul);
    tcase_add_test(tc, huge_sizes_and_offsets);
    suite_add_tcase(s, tc);

    tc = tcase_create("fuzz");
    tcase_set_timeout(tc, 300);
    tcase_add_checked_fixture(tc, setup_ro, teardown);
    tcase_add_test(tc, protocol_fuzz);
    suite_add_tcase(s, tc);

    tc = tcase_create("classic");
    tcase_set_timeout(tc, 60);
    tcase_add_checked_fixture(tc, setup_rw, teardown);
    tcase_add_test(tc, classic_transport_end_of_connection);
    tcase_add_test(tc, classic_transport_stop);
    tcase_add_test(tc, classic_transport_one_buffer);
    tcase_add_test(tc, classic_transport_sigterm);
    tcase_add_test(tc, ignored_signal_stays_ignored);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(fuse_server_suite());
}
