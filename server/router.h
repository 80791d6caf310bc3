/* router.h - matching a method and path against a route table. The table
 * is the handlers' (handlers/routes.c): main.c hands it to the server, so
 * that server/ never depends on handlers/. Patterns are literal segments
 * and {placeholders}. */
#ifndef MP_SERVER_ROUTER_H
#define MP_SERVER_ROUTER_H
#include <stddef.h>

/* A handler fills the response for a request (both server/http.h). The
 * router only stores and matches them, so it needs no more than this. */
/* Most {placeholders} a route may have. */
#define HTTP_MAX_PARAMS 4

struct http_req;
struct http_resp;
typedef void (*http_handler)(struct http_req *rq, struct http_resp *rs);

typedef struct route {
    const char *method;
    const char *pattern;
    http_handler handler;
    const char *name; /* label for metrics and logs */
    int open;         /* 1: no auth (healthz, readyz, dashboard assets) */
} route;

typedef enum { ROUTE_FOUND, ROUTE_NO_PATH, ROUTE_NO_METHOD } route_match;
/* Matches path (no query string). Placeholder values are copied into buf
 * (NUL-separated) and pointed to by params. allow receives the methods the
 * path supports when the method does not match. */
route_match router_match(const route *table, const char *method, const char *path,
                         const route **out, const char **params, int *nparams, char *buf,
                         size_t buflen, char *allow, size_t allowlen);
#endif
