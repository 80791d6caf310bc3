/* router.c - see router.h. Linear scan: the table is a few dozen routes and
 * a segment compare is cheaper than anything clever. */
#include "server/router.h"

#include <stdio.h>
#include <string.h>

/* Matches one pattern; on success fills params from buf. */
static int match_one(const char *pattern, const char *path, const char **params, int *nparams,
                     char *buf, size_t buflen) {
    size_t used = 0;
    int np = 0;
    const char *p = pattern, *s = path;
    while (*p && *s) {
        if (*p != '/' || *s != '/') return 0;
        p++;
        s++;
        const char *pe = strchr(p, '/'), *se = strchr(s, '/');
        size_t pl = pe ? (size_t)(pe - p) : strlen(p);
        size_t sl = se ? (size_t)(se - s) : strlen(s);
        if (pl > 1 && p[0] == '{' && p[pl - 1] == '}') {
            if (sl == 0 || np >= HTTP_MAX_PARAMS || used + sl + 1 > buflen) return 0;
            memcpy(buf + used, s, sl);
            buf[used + sl] = 0;
            params[np++] = buf + used;
            used += sl + 1;
        } else if (pl != sl || memcmp(p, s, pl) != 0) {
            return 0;
        }
        p += pl;
        s += sl;
    }
    if (*p || *s) return 0;
    *nparams = np;
    return 1;
}

route_match router_match(const route *table, const char *method, const char *path,
                         const route **out, const char **params, int *nparams, char *buf,
                         size_t buflen, char *allow, size_t allowlen) {
    int path_seen = 0;
    allow[0] = 0;
    for (const route *r = table; r->method; r++) {
        if (!match_one(r->pattern, path, params, nparams, buf, buflen)) continue;
        if (strcmp(r->method, method) == 0) {
            *out = r;
            return ROUTE_FOUND;
        }
        path_seen = 1;
        size_t al = strlen(allow);
        if (!strstr(allow, r->method) && al + strlen(r->method) + 3 < allowlen)
            snprintf(allow + al, allowlen - al, "%s%s", al ? ", " : "", r->method);
    }
    return path_seen ? ROUTE_NO_METHOD : ROUTE_NO_PATH;
}
