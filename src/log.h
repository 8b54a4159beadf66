/*
 * log — the one place messages leave the daemon.  Before daemonizing they go
 * to stderr; afterwards to syslog.  Every module logs through log_msg().
 */
#ifndef QCOW2FUSE_LOG_H
#define QCOW2FUSE_LOG_H

#include <stdbool.h>

enum log_level {
    LOG_LEVEL_ERROR = 0,
    LOG_LEVEL_WARN,
    LOG_LEVEL_INFO,
    LOG_LEVEL_DEBUG,
};

/* Messages above @max_level are dropped.  Default: LOG_LEVEL_INFO. */
void log_set_level(enum log_level max_level);

/* The program name that prefixes messages on stderr (default qcow2fuse). */
void log_set_ident(const char *ident);

/* Switch the sink from stderr to syslog (after daemonizing). */
void log_use_syslog(const char *ident);

/* Tests may capture messages instead of printing them; NULL restores. */
typedef void log_hook_fn(enum log_level level, const char *msg);
void log_set_hook(log_hook_fn *hook);

void log_msg(enum log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define log_error(...) log_msg(LOG_LEVEL_ERROR, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_LEVEL_WARN, __VA_ARGS__)
#define log_info(...)  log_msg(LOG_LEVEL_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_LEVEL_DEBUG, __VA_ARGS__)

#endif
