/*
 * fuse_proto — the FUSE wire protocol as this daemon speaks it: the
 * kernel's <linux/fuse.h> plus what is newer than the copy the build
 * machine has.  Debian 12's linux-libc-dev stops at protocol 7.38; the
 * names below come from include/uapi/linux/fuse.h of Linux 6.18 (7.45)
 * and are defined only where the installed header lacks them, so a newer
 * header wins.  Only definitions live here, no code.
 */
#ifndef QCOW2FUSE_FUSE_PROTO_H
#define QCOW2FUSE_FUSE_PROTO_H

#include <linux/fuse.h>
#include <stdint.h>

/*
 * The protocol minor this daemon implements (major is always 7): every
 * request it decodes and every reply it builds has the 7.45 layout, and
 * what an older kernel needs (smaller structures) is chosen by the
 * negotiated minor, min(kernel's, this).
 */
#define FUSE_PROTO_MAJOR        7
#define FUSE_PROTO_MINOR        45

/* INIT flags past bit 31 travel in flags2 when FUSE_INIT_EXT is set
 * (7.36, in the installed header). */

/* 7.39: a shared writable mmap of a FOPEN_DIRECT_IO file is allowed (the
 * kernel then caches its pages) instead of failing with ENODEV. */
#ifndef FUSE_DIRECT_IO_ALLOW_MMAP
#define FUSE_DIRECT_IO_ALLOW_MMAP (1ull << 36)
#endif

/* 7.42: the server serves requests through io_uring ring entries
 * (FUSE_IO_URING_CMD_REGISTER on each queue) once every queue is
 * registered; INIT, FORGET and INTERRUPT still come through the /dev/fuse
 * read.  The ring's own structures belong to the io_uring transport. */
#ifndef FUSE_OVER_IO_URING
#define FUSE_OVER_IO_URING      (1ull << 41)
#endif

/* Opcodes newer than the installed header's (STATX 52, ...) are enum
 * members upstream: not redefined here; the dispatcher answers every
 * opcode it does not serve with ENOSYS. */

#endif
