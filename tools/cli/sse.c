/*
 * sse.c - an incremental text/event-stream parser (the WHATWG rules the
 * client needs: "event:" and "data:" fields, comments, CR/LF/CRLF line ends,
 * a blank line dispatching the event). Bytes arrive in arbitrary pieces from
 * libcurl. A line longer than max_line is discarded together with the event
 * it belongs to, so one hostile line costs at most max_line bytes.
 */
#include <stdlib.h>
#include <string.h>

#include "tools/cli/cli.h"

void sse_init(sse_parser *p, size_t max_line, sse_event_fn fn, void *arg) {
    memset(p, 0, sizeof *p);
    p->max_line = max_line;
    p->fn = fn;
    p->arg = arg;
}

void sse_free(sse_parser *p) {
    free(p->line);
    free(p->data);
    p->line = p->data = NULL;
}

static void reset_event(sse_parser *p) {
    p->kind[0] = 0;
    p->dlen = 0;
    p->have_data = false;
    p->event_bad = false;
}

static bool grow(char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return true;
    size_t n = *cap ? *cap : 256;
    while (n < need)
        n *= 2;
    char *b = realloc(*buf, n);
    if (!b) return false;
    *buf = b;
    *cap = n;
    return true;
}

static void dispatch(sse_parser *p) {
    if (p->have_data && !p->event_bad && !p->oom) {
        p->data[p->dlen] = 0;
        p->fn(p->arg, p->kind[0] ? p->kind : "message", p->data);
    }
    reset_event(p);
}

static void field(sse_parser *p, const char *line, size_t len) {
    if (len == 0) {
        dispatch(p);
        return;
    }
    if (line[0] == ':') return; /* comment (keepalive) */
    const char *colon = memchr(line, ':', len);
    size_t nlen = colon ? (size_t)(colon - line) : len;
    const char *v = colon ? colon + 1 : line + len;
    size_t vlen = (size_t)(line + len - v);
    if (vlen && *v == ' ') v++, vlen--;
    if (nlen == 5 && memcmp(line, "event", 5) == 0) {
        if (vlen >= sizeof p->kind) {
            p->event_bad = true; /* no kind of ours is that long */
            return;
        }
        memcpy(p->kind, v, vlen);
        p->kind[vlen] = 0;
    } else if (nlen == 4 && memcmp(line, "data", 4) == 0) {
        size_t extra = (p->have_data ? 1 : 0) + vlen;
        if (p->dlen + extra + 1 > p->max_line) {
            p->event_bad = true;
            p->dropped++;
            return;
        }
        if (!grow(&p->data, &p->dcap, p->dlen + extra + 1)) {
            p->oom = true;
            return;
        }
        if (p->have_data) p->data[p->dlen++] = '\n';
        memcpy(p->data + p->dlen, v, vlen);
        p->dlen += vlen;
        p->have_data = true;
    }
    /* id:, retry: and unknown fields: nothing the client needs. */
}

void sse_feed(sse_parser *p, const char *buf, size_t n) {
    for (size_t i = 0; i < n; i++) {
        char ch = buf[i];
        bool after_cr = p->after_cr;
        p->after_cr = false;
        if (ch == '\n' && after_cr) continue; /* the LF of a CRLF */
        if (ch == '\n' || ch == '\r') {
            p->after_cr = ch == '\r';
            if (p->skipping) {
                p->skipping = false;
                p->event_bad = true;
            } else {
                field(p, p->line ? p->line : "", p->len);
            }
            p->len = 0;
            continue;
        }
        if (p->skipping) continue;
        if (p->len + 1 > p->max_line) {
            p->skipping = true;
            p->dropped++;
            p->len = 0;
            continue;
        }
        if (!grow(&p->line, &p->cap, p->len + 1)) {
            p->oom = true;
            p->skipping = true;
            continue;
        }
        p->line[p->len++] = ch;
    }
}
