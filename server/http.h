/*
 * http.h - the request/response types handlers work with, and the
 * libmicrohttpd daemon that drives them. A handler reads an http_req and
 * fills an http_resp; it never touches MHD directly except to hand over a
 * streaming response (SSE). Slow work (a resident's digest, read back from a
 * device) is deferred: it runs on a thread of its own while the connection
 * is suspended, so it never holds one of the few HTTP threads.
 */
#ifndef MP_SERVER_HTTP_H
#define MP_SERVER_HTTP_H
#include <jansson.h>
#include <stddef.h>

#include "server/context.h"
#include "server/router.h"
#include "util/error.h"

#define HTTP_MAX_BODY (1u << 20) /* 1 MiB, api.md */

struct MHD_Connection;
struct MHD_Response;

typedef struct http_req {
    mp_server *srv;
    struct MHD_Connection *conn;
    const char *method;
    const char *path;
    const char *params[HTTP_MAX_PARAMS]; /* {placeholders} of the route, in order */
    int nparams;
    const char *body;
    size_t body_len;
} http_req;

typedef struct http_resp {
    int status;
    char *body; /* owned */
    size_t len;
    const char *content_type;
    char location[256];
    char allow[64];
    struct MHD_Response *stream; /* set by handlers that stream (SSE) */
    /* Set by resp_defer: the response comes later from defer_fn. */
    void (*defer_fn)(void *arg, struct http_resp *rs);
    void *defer_arg;
    void (*defer_free)(void *arg);
} http_resp;

/* At most this many deferred responses are in progress; past that a
 * deferring request is answered 503 (try again) at once. */
#define HTTP_MAX_DEFERRED 4

/* http_handler is declared in router.h, which the route table needs alone. */

const char *http_query(const http_req *rq, const char *key);
const char *http_header(const http_req *rq, const char *key);

/* Response builders. resp_json steals doc. */
void resp_json(http_resp *rs, int status, json_t *doc);
void resp_raw(http_resp *rs, int status, const char *content_type, char *body, size_t len);
void resp_static(http_resp *rs, int status, const char *content_type, const char *body, size_t len);
/* application/problem+json {type,title,status,detail[,errors]}; steals errors. */
void resp_problem(http_resp *rs, int status, const char *detail, json_t *errors);
/* 400/404/409/... from an mp_error: the field, if any, goes into "errors". */
void resp_error(http_resp *rs, int status, const mp_error *err);
/* Defers the response: fn(arg, rs) fills it later on a thread of its own;
 * then free_arg(arg) (may be NULL). Takes arg in every case: when the
 * deferral cannot start (HTTP_MAX_DEFERRED reached, the server stopping,
 * no thread), free_arg runs and the answer is a 503. */
void resp_defer(http_resp *rs, void (*fn)(void *arg, http_resp *rs), void *arg,
                void (*free_arg)(void *arg));
/* Deferred responses in progress (the modelprep_http_deferred gauge). */
int http_deferred_inflight(mp_server *srv);

int http_start(mp_server *srv, mp_error *err);
/* Stops accepting, ends streams, waits for in-flight requests. */
void http_stop(mp_server *srv);
#endif
