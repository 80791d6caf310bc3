/* sbuf.h - a growable byte string for building responses without jansson's
 * per-node cost on hot paths (job lists, metrics). Allocation failure is
 * sticky: sb->oom is set and later appends are no-ops, checked once at the end. */
#ifndef MP_UTIL_SBUF_H
#define MP_UTIL_SBUF_H
#include <stdbool.h>
#include <stddef.h>
typedef struct sbuf {
    char *buf;
    size_t len, cap;
    bool oom;
} sbuf;
void sb_append(sbuf *sb, const char *s, size_t n);
void sb_puts(sbuf *sb, const char *s);
void sb_printf(sbuf *sb, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends s as a JSON string literal, quotes included. */
void sb_json_str(sbuf *sb, const char *s);
/* Hands the buffer to the caller (NUL-terminated) or NULL on oom. */
char *sb_take(sbuf *sb, size_t *len);
void sb_free(sbuf *sb);
#endif
