/* sbuf.c - see sbuf.h. */
#include "util/sbuf.h"
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool sb_reserve(sbuf *sb, size_t extra) {
    if (sb->oom) return false;
    if (sb->len + extra + 1 <= sb->cap) return true;
    size_t cap = sb->cap ? sb->cap : 256;
    while (cap < sb->len + extra + 1) {
        if (cap > ((size_t)-1) / 2) {
            sb->oom = true;
            return false;
        }
        cap *= 2;
    }
    char *p = realloc(sb->buf, cap);
    if (!p) {
        sb->oom = true;
        return false;
    }
    sb->buf = p;
    sb->cap = cap;
    return true;
}

void sb_append(sbuf *sb, const char *s, size_t n) {
    if (!sb_reserve(sb, n)) return;
    memcpy(sb->buf + sb->len, s, n);
    sb->len += n;
    sb->buf[sb->len] = 0;
}

void sb_puts(sbuf *sb, const char *s) {
    sb_append(sb, s, strlen(s));
}

void sb_printf(sbuf *sb, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char tmp[512];
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof tmp) {
        sb_append(sb, tmp, (size_t)n);
        return;
    }
    if (!sb_reserve(sb, (size_t)n)) return;
    va_start(ap, fmt);
    vsnprintf(sb->buf + sb->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    sb->len += (size_t)n;
}

void sb_json_str(sbuf *sb, const char *s) {
    static const char hex[] = "0123456789abcdef";
    sb_append(sb, "\"", 1);
    const char *run = s;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p >= 0x20 && *p != '"' && *p != '\\') continue;
        sb_append(sb, run, (size_t)((const char *)p - run));
        char esc[6] = {'\\', 'u', '0', '0', hex[*p >> 4], hex[*p & 15]};
        if (*p == '"' || *p == '\\') {
            esc[1] = (char)*p;
            sb_append(sb, esc, 2);
        } else {
            sb_append(sb, esc, 6);
        }
        run = (const char *)p + 1;
    }
    sb_puts(sb, run);
    sb_append(sb, "\"", 1);
}

char *sb_take(sbuf *sb, size_t *len) {
    if (sb->oom) {
        sb_free(sb);
        return NULL;
    }
    if (!sb->buf && !sb_reserve(sb, 0)) return NULL;
    char *p = sb->buf;
    if (len) *len = sb->len;
    sb->buf = NULL;
    sb->len = sb->cap = 0;
    return p;
}

void sb_free(sbuf *sb) {
    free(sb->buf);
    sb->buf = NULL;
    sb->len = sb->cap = 0;
    sb->oom = false;
}
