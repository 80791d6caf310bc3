/*
 * error.h - the one error type that crosses module boundaries. A code is a
 * stable machine-readable word ("unsafe_pickle", "checksum_mismatch") that
 * ends up in a failed job's error.code or a problem+json; the message is for
 * people. `field` names the request field at fault, when there is one.
 *
 * Every setter here formats into a scratch buffer before touching *err, so
 * passing err->message (or err->code) as an argument is safe: the usual way
 * to add context on the way up is mp_err_wrap, never a hand-rolled snprintf
 * into the buffer being read.
 */
#ifndef MP_UTIL_ERROR_H
#define MP_UTIL_ERROR_H

#include <stdarg.h>

/* On functions whose result says whether something durable happened (store
 * writes, file publication): ignoring it is how a lost write goes unnoticed.
 * GCC will not let a (void) cast silence it, on purpose. */
#define MP_MUST_USE __attribute__((warn_unused_result))

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
/* Adds context to an error already set by a callee: the message becomes
 * "<context>: <message as it was>". code NULL keeps the callee's code (the
 * usual case: the innermost code says what went wrong); a non-NULL code
 * reclassifies it (e.g. a generic allocation failure that, at this level, is
 * "insufficient_device_memory"). The field is kept. An empty message gets
 * the context alone. Returns -1; err may be NULL. */
int mp_err_wrap(mp_error *err, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void mp_error_clear(mp_error *err);

#endif
