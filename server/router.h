/* router.h - the route table (server/routes.c) and matching of a method and
 * path against it. Patterns are literal segments and {placeholders}. */
#ifndef MP_SERVER_ROUTER_H
#define MP_SERVER_ROUTER_H
#include "server/http.h"

typedef struct route {
    const char *method;
    const char *pattern;
    http_handler handler;
    const char *name; /* label for metrics and logs */
    int open;         /* 1: no auth (healthz, readyz, dashboard assets) */
} route;

extern const route mp_routes[]; /* terminated by a NULL method */

typedef enum { ROUTE_FOUND, ROUTE_NO_PATH, ROUTE_NO_METHOD } route_match;
/* Matches path (no query string). Placeholder values are copied into buf
 * (NUL-separated) and pointed to by params. allow receives the methods the
 * path supports when the method does not match. */
route_match router_match(const char *method, const char *path, const route **out,
                         const char **params, int *nparams, char *buf, size_t buflen, char *allow,
                         size_t allowlen);
#endif
