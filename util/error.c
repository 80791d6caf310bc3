/* error.c - filling an mp_error; truncation is fine, overflow is not. */
#include "util/error.h"
#include <stdio.h>
#include <string.h>

static void err_set(mp_error *err, const char *field, const char *code, const char *fmt,
                    va_list ap) {
    snprintf(err->code, sizeof err->code, "%s", code ? code : "error");
    snprintf(err->field, sizeof err->field, "%s", field ? field : "");
    vsnprintf(err->message, sizeof err->message, fmt, ap);
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

void mp_error_clear(mp_error *err) {
    if (err) memset(err, 0, sizeof *err);
}
