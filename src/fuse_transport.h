/*
 * fuse_transport — the contract between the FUSE request dispatcher
 * (fuse_server: decodes a request, serves it from the vfs, encodes the
 * reply; the only place a -errno becomes a reply) and the transports that
 * carry requests and replies over /dev/fuse: classic read/write on cloned
 * fds, and FUSE over io_uring.
 *
 * A transport hands each request to fuse_server_dispatch() in the thread
 * that received it, with a sink that knows how to send that request's
 * reply; dispatch calls the sink's send exactly once before it returns,
 * except for the requests that have no reply: FORGET, BATCH_FORGET,
 * INTERRUPT and NOTIFY_REPLY (the kernel sends those through the
 * /dev/fuse read also when io_uring serves the rest).
 */
#ifndef QCOW2FUSE_FUSE_TRANSPORT_H
#define QCOW2FUSE_FUSE_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>

struct fuse_in_header;
struct fuse_server;

/*
 * One request as a transport received it.  Classic: @op_in points just
 * past the in-header at everything else the read returned (for WRITE the
 * fuse_write_in followed by the data), @payload is NULL.  io_uring: @op_in
 * is the ring entry's op_in area, @payload its payload buffer (the data of
 * a WRITE, the name of a LOOKUP).  The dispatcher takes an opcode's fixed
 * header from @op_in and its variable part (a name, a WRITE's data) from
 * @payload when there is one, else from @op_in past the fixed header; it
 * requires in->len == sizeof(*in) + @op_in_len + @payload_len.  None of
 * the pointers need be aligned.  The dispatcher checks every length before
 * it reads a field.
 */
struct fuse_request {
    const struct fuse_in_header *in;
    const void *op_in;
    size_t op_in_len;
    const void *payload;
    size_t payload_len;
};

struct fuse_reply_sink {
    /*
     * A buffer of at least @size bytes that the reply's payload may be
     * built in (a READ reads straight into it), valid until send; NULL when
     * the transport has none that large (the dispatcher then uses its own
     * per-thread buffer and send copies).
     */
    void *(*payload_buf)(struct fuse_reply_sink *sink, size_t size);
    /*
     * Send the reply to the request this sink came with: @error is 0 or a
     * negative errno (then @len is 0), @payload the reply's body.
     * Returns: 0 or -errno (the request was interrupted and is gone:
     * -ENOENT, the connection ended: -ENODEV, ...).
     */
    int (*send)(struct fuse_reply_sink *sink, int error, const void *payload,
                size_t len);
};

/* Serve one request and reply through @sink.  Thread-safe. */
void fuse_server_dispatch(struct fuse_server *srv, const struct fuse_request *req,
                          struct fuse_reply_sink *sink);

#endif
