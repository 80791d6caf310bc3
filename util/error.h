/*
 * error.h - the one error type that crosses module boundaries. A code is a
 * stable machine-readable word ("unsafe_pickle", "checksum_mismatch") that
 * ends up in a failed job's error.code or a problem+json; the message is for
 * people. `field` names the request field at fault, when there is one.
 */
#ifndef MP_UTIL_ERROR_H
#define MP_UTIL_ERROR_H

#include <stdarg.h>

typedef struct mp_error {
    char code[48];
    char field[96];
    char message[512];
} mp_error;

/* Sets code and a printf-style message; always returns -1 so callers can
 * `return mp_err(err, "bad_header", "...")`. err may be NULL. */
int mp_err(mp_error *err, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Same, naming the request field at fault. */
int mp_err_field(mp_error *err, const char *field, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void mp_error_clear(mp_error *err);

#endif
