/*
 * log — one function with levels, writing to stderr or syslog (or to the
 * hook a test installs).
 */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <syslog.h>

static enum log_level max_level = LOG_LEVEL_INFO;
static bool to_syslog;
static log_hook_fn *hook;
static const char *program = "qcow2fuse";

void log_set_ident(const char *ident)
{
    program = ident;
}

void log_set_level(enum log_level level)
{
    max_level = level;
}

void log_use_syslog(const char *ident)
{
    openlog(ident, LOG_PID, LOG_DAEMON);
    to_syslog = true;
}

void log_set_hook(log_hook_fn *fn)
{
    hook = fn;
}

void log_msg(enum log_level level, const char *fmt, ...)
{
    static const char *const names[] = { "error", "warning", "info", "debug" };
    static const int prio[] = { LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG };
    char msg[1024];
    va_list ap;

    if (level > max_level)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);

    if (hook)
        hook(level, msg);
    else if (to_syslog)
        syslog(prio[level], "%s", msg);
    else
        fprintf(stderr, "%s: %s: %s\n", program, names[level], msg);
}
