/* remote_log.c - formatted lines to a remote operation's log callback, for
 * the S3 and Redis code that reports what it skipped or resumed. */
#include "loader/remote/remote_internal.h"

#include <stdarg.h>
#include <stdio.h>

void remote_log(const remote_callbacks *cb, const char *level, const char *fmt, ...) {
    if (!cb || !cb->log) return;
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    cb->log(cb->arg, level, msg);
}
