/* error.c - filling an mp_error; truncation is fine, overflow and aliasing
 * are not (see error.h: arguments may point into *err itself). */
#include "util/error.h"
#include <stdio.h>
#include <string.h>

static void err_set(mp_error *err, const char *field, const char *code, const char *fmt,
                    va_list ap) {
    /* Format first, copy after: fmt's arguments may alias err's buffers. */
    char msg[sizeof err->message];
    char cd[sizeof err->code];
    char fd[sizeof err->field];
    vsnprintf(msg, sizeof msg, fmt, ap);
    snprintf(cd, sizeof cd, "%s", code ? code : "error");
    snprintf(fd, sizeof fd, "%s", field ? field : "");
    memcpy(err->message, msg, sizeof msg);
    memcpy(err->code, cd, sizeof cd);
    memcpy(err->field, fd, sizeof fd);
}

int mp_err(mp_error *err, const char *code, const char *fmt, ...) {
    if (!err) return -1;
    va_list ap;
    va_start(ap, fmt);
    err_set(err, NULL, code, fmt, ap);
    va_end(ap);
    return -1;
}

int mp_err_field(mp_error *err, const char *field, const char *code, const char *fmt, ...) {
    if (!err) return -1;
    va_list ap;
    va_start(ap, fmt);
    err_set(err, field, code, fmt, ap);
    va_end(ap);
    return -1;
}

int mp_err_wrap(mp_error *err, const char *code, const char *fmt, ...) {
    if (!err) return -1;
    char ctx[sizeof err->message];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx, sizeof ctx, fmt, ap);
    va_end(ap);
    char msg[sizeof err->message];
    if (err->message[0])
        snprintf(msg, sizeof msg, "%s: %s", ctx, err->message);
    else
        snprintf(msg, sizeof msg, "%s", ctx);
    memcpy(err->message, msg, sizeof msg);
    if (code) {
        char cd[sizeof err->code];
        snprintf(cd, sizeof cd, "%s", code);
        memcpy(err->code, cd, sizeof cd);
    } else if (!err->code[0]) {
        snprintf(err->code, sizeof err->code, "error");
    }
    return -1;
}

void mp_error_clear(mp_error *err) {
    if (err) memset(err, 0, sizeof *err);
}
