/*
 * http.c - libmicrohttpd plumbing: one daemon with an epoll thread pool
 * sized to the cores, a connection limit and timeouts; request bodies are
 * accumulated up to 1 MiB; then routing, auth, the handler, and the
 * response. Every error a client can cause is answered as problem+json.
 */
#include "server/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/http_defer.h"
#include "server/metrics.h"
#include "server/router.h"
#include "util/sbuf.h"
#include "util/timeutil.h"

typedef struct req_state {
    sbuf body;
    int too_big;
    int status;
    const char *route_name;
    double t0;
    char method[16];
    char path[256];          /* for the access log; truncated */
    http_deferred *deferred; /* set while a deferred response is pending */
    struct defer_job *djob;  /* what the deferred work fills */
} req_state;

/* A handler's deferred response: run on http_defer's thread. */
typedef struct defer_job {
    void (*fn)(void *arg, http_resp *rs);
    void *arg;
    void (*free_arg)(void *arg);
    http_resp rs;
} defer_job;

const char *http_query(const http_req *rq, const char *key) {
    return MHD_lookup_connection_value(rq->conn, MHD_GET_ARGUMENT_KIND, key);
}

const char *http_header(const http_req *rq, const char *key) {
    return MHD_lookup_connection_value(rq->conn, MHD_HEADER_KIND, key);
}

void resp_raw(http_resp *rs, int status, const char *content_type, char *body, size_t len) {
    free(rs->body);
    rs->status = status;
    rs->content_type = content_type;
    rs->body = body;
    rs->len = len;
}

void resp_static(http_resp *rs, int status, const char *content_type, const char *body,
                 size_t len) {
    char *copy = malloc(len + 1);
    if (!copy) {
        resp_raw(rs, 503, "text/plain", NULL, 0);
        return;
    }
    memcpy(copy, body, len);
    copy[len] = 0;
    resp_raw(rs, status, content_type, copy, len);
}

void resp_json(http_resp *rs, int status, json_t *doc) {
    char *text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    json_decref(doc);
    if (!text) {
        resp_problem(rs, 503, "out of memory building the response", NULL);
        return;
    }
    resp_raw(rs, status, "application/json", text, strlen(text));
}

static const char *status_title(int status) {
    switch (status) {
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 409:
        return "Conflict";
    case 413:
        return "Payload Too Large";
    case 415:
        return "Unsupported Media Type";
    case 422:
        return "Unprocessable Entity";
    case 500:
        return "Internal Server Error";
    case 503:
        return "Service Unavailable";
    case 507:
        return "Insufficient Storage";
    default:
        return "Error";
    }
}

void resp_problem(http_resp *rs, int status, const char *detail, json_t *errors) {
    char type[64];
    snprintf(type, sizeof type, "https://modelprep.dev/problems/%d", status);
    json_t *doc = json_pack("{s:s,s:s,s:i,s:s}", "type", type, "title", status_title(status),
                            "status", status, "detail", detail ? detail : "");
    if (doc && errors)
        json_object_set_new(doc, "errors", errors);
    else
        json_decref(errors);
    char *text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    json_decref(doc);
    /* A problem response must never fail to be one: fall back to a fixed text. */
    if (!text) text = strdup("{\"type\":\"about:blank\",\"title\":\"Error\",\"status\":503}");
    resp_raw(rs, status, "application/problem+json", text, text ? strlen(text) : 0);
}

void resp_error(http_resp *rs, int status, const mp_error *err) {
    json_t *errors = NULL;
    if (err->field[0])
        errors = json_pack("[{s:s,s:s,s:s}]", "field", err->field, "code", err->code, "message",
                           err->message);
    resp_problem(rs, status, err->message, errors);
}

void resp_defer(http_resp *rs, void (*fn)(void *arg, http_resp *rs), void *arg,
                void (*free_arg)(void *arg)) {
    free(rs->body);
    memset(rs, 0, sizeof *rs);
    rs->defer_fn = fn;
    rs->defer_arg = arg;
    rs->defer_free = free_arg;
}

int http_deferred_inflight(mp_server *srv) {
    return http_defer_inflight(srv->deferrals);
}

static void defer_job_run(void *p) {
    defer_job *j = p;
    j->fn(j->arg, &j->rs);
    if (j->free_arg) j->free_arg(j->arg);
    j->arg = NULL;
    if (!j->rs.status) resp_problem(&j->rs, 500, "deferred handler produced no response", NULL);
}

/* 0: the connection is suspended and st owns the job. -1: rs is a 503 to
 * queue now (the handler's arg freed). */
static int defer_response(mp_server *srv, struct MHD_Connection *conn, req_state *st,
                          http_resp *rs) {
    defer_job *j = calloc(1, sizeof *j);
    const char *why = "out of memory deferring the response";
    if (j) {
        j->fn = rs->defer_fn;
        j->arg = rs->defer_arg;
        j->free_arg = rs->defer_free;
        st->djob = j;
        if (http_defer_start(srv->deferrals, conn, defer_job_run, j, &st->deferred, &why) == 0)
            return 0;
        st->djob = NULL;
        free(j);
    }
    if (rs->defer_free) rs->defer_free(rs->defer_arg);
    resp_problem(rs, 503, why, NULL);
    rs->defer_fn = NULL;
    return -1;
}

/* Constant-time token check: comparing digests hides the token's length
 * as well as its bytes. */
static int auth_ok(mp_server *srv, struct MHD_Connection *conn) {
    const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return 0;
    const char *given = h + 7;
    unsigned char a[SHA256_DIGEST_LENGTH], b[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)given, strlen(given), a);
    SHA256((const unsigned char *)srv->cfg.token, strlen(srv->cfg.token), b);
    return CRYPTO_memcmp(a, b, sizeof a) == 0;
}

static enum MHD_Result queue(struct MHD_Connection *conn, req_state *st, http_resp *rs) {
    struct MHD_Response *r = rs->stream;
    if (!r) {
        r = MHD_create_response_from_buffer(rs->len, rs->body ? rs->body : (void *)"",
                                            rs->body ? MHD_RESPMEM_MUST_FREE
                                                     : MHD_RESPMEM_PERSISTENT);
        if (!r) {
            free(rs->body);
            return MHD_NO;
        }
        rs->body = NULL;
        if (rs->content_type) MHD_add_response_header(r, "Content-Type", rs->content_type);
    }
    if (rs->location[0]) MHD_add_response_header(r, "Location", rs->location);
    if (rs->allow[0]) MHD_add_response_header(r, "Allow", rs->allow);
    if (rs->status == 401) MHD_add_response_header(r, "WWW-Authenticate", "Bearer");
    MHD_add_response_header(r, "Cache-Control", "no-store");
    st->status = rs->status;
    enum MHD_Result ret = MHD_queue_response(conn, (unsigned)rs->status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_size, void **con_cls) {
    mp_server *srv = cls;
    req_state *st = *con_cls;
    if (!st) {
        st = calloc(1, sizeof *st);
        if (!st) return MHD_NO;
        st->t0 = time_mono();
        st->route_name = "unmatched";
        snprintf(st->method, sizeof st->method, "%s", method);
        snprintf(st->path, sizeof st->path, "%s", url);
        *con_cls = st;
        /* The headers are in: from here on the connection gets the normal
         * idle timeout instead of the short one for stalled headers. */
        if (MHD_set_connection_option(conn, MHD_CONNECTION_OPTION_TIMEOUT,
                                      (unsigned)srv->cfg.connection_timeout_s) != MHD_YES)
            mp_log(&srv->log, "warn", NULL, "httpd: cannot raise a connection's timeout");
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > HTTP_MAX_BODY) st->too_big = 1;
        return MHD_YES;
    }
    if (st->deferred) {
        /* Called again after a resume: the deferred response is ready. */
        if (!http_defer_ready(st->deferred)) return MHD_YES;
        http_resp out = st->djob->rs;
        memset(&st->djob->rs, 0, sizeof st->djob->rs);
        return queue(conn, st, &out);
    }
    if (*upload_size) {
        if (!st->too_big) {
            if (st->body.len + *upload_size > HTTP_MAX_BODY) {
                st->too_big = 1;
                sb_free(&st->body);
            } else {
                sb_append(&st->body, upload_data, *upload_size);
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }

    http_resp rs = {0};
    http_req rq = {.srv = srv, .conn = conn, .method = method, .path = url};
    char pbuf[1024], allow[64];
    const route *r = NULL;
    route_match m = router_match(rq.srv->routes, method, url, &r, rq.params, &rq.nparams, pbuf,
                                 sizeof pbuf, allow, sizeof allow);
    if (m == ROUTE_NO_PATH) {
        resp_problem(&rs, 404, "no such route", NULL);
    } else if (m == ROUTE_NO_METHOD) {
        resp_problem(&rs, 405, "method not allowed on this route", NULL);
        snprintf(rs.allow, sizeof rs.allow, "%s", allow);
    } else {
        st->route_name = r->name;
        if (!r->open && srv->cfg.token && !auth_ok(srv, conn)) {
            resp_problem(&rs, 401, "missing or wrong bearer token", NULL);
        } else if (st->too_big) {
            resp_problem(&rs, 413, "request body over 1 MiB", NULL);
        } else if (st->body.oom) {
            resp_problem(&rs, 503, "out of memory reading the body", NULL);
        } else {
            rq.body = st->body.buf ? st->body.buf : "";
            rq.body_len = st->body.len;
            r->handler(&rq, &rs);
            if (!rs.status && !rs.defer_fn)
                resp_problem(&rs, 500, "handler produced no response", NULL);
        }
    }
    (void)version;
    if (rs.defer_fn && defer_response(srv, conn, st, &rs) == 0) return MHD_YES;
    return queue(conn, st, &rs);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    mp_server *srv = cls;
    req_state *st = *con_cls;
    if (!st) return;
    double dt = time_mono() - st->t0;
    if (srv->metrics && st->status) metrics_http(srv->metrics, st->route_name, st->status, dt);
    if (srv->cfg.access_log && st->status) {
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
        char addr[64] = "-";
        if (ci && ci->client_addr && ci->client_addr->sa_family == AF_INET)
            inet_ntop(AF_INET, &((struct sockaddr_in *)ci->client_addr)->sin_addr, addr,
                      sizeof addr);
        mp_log(&srv->log, "info", NULL, "http %s %s %s route=%s status=%d ms=%.2f%s", addr,
               st->method, st->path, st->route_name, st->status, dt * 1000.0,
               toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "" : " (aborted)");
    }
    sb_free(&st->body);
    http_defer_free(st->deferred);
    if (st->djob) free(st->djob->rs.body);
    free(st->djob);
    free(st);
    *con_cls = NULL;
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap) {
    mp_server *srv = cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && msg[n - 1] == '\n')
        msg[--n] = 0;
    /* libmicrohttpd names the port argument of MHD_start_daemon, which is 0
     * when the address comes as MHD_OPTION_SOCK_ADDR: say what was tried. */
    static const char bind_fail[] = "Failed to bind to port ";
    if (strncmp(msg, bind_fail, sizeof bind_fail - 1) == 0) {
        const char *why = strchr(msg, ':');
        mp_log(&srv->log, "error", NULL, "httpd: cannot bind to %s:%d%s", srv->cfg.listen_host,
               srv->cfg.listen_port, why ? why : "");
        return;
    }
    mp_log(&srv->log, "warn", NULL, "httpd: %s", msg);
}

int http_start(mp_server *srv, mp_error *err) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV | AI_PASSIVE};
    struct addrinfo *ai = NULL;
    char port[16];
    snprintf(port, sizeof port, "%d", srv->cfg.listen_port);
    int gai = getaddrinfo(srv->cfg.listen_host, port, &hints, &ai);
    if (gai != 0 || !ai)
        return mp_err(err, "bad_flag", "--listen %s: %s", srv->cfg.listen_host, gai_strerror(gai));
    srv->deferrals = http_defer_create(HTTP_MAX_DEFERRED);
    if (!srv->deferrals) {
        freeaddrinfo(ai);
        return mp_err(err, "no_memory", "out of memory starting the HTTP server");
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME |
                     MHD_USE_ERROR_LOG;
    if (ai->ai_family == AF_INET6) flags |= MHD_USE_IPv6;
    /* EXTERNAL_LOGGER must come first: libmicrohttpd logs (to stderr, with a
     * warning about the order) anything it has to say about earlier options.
     * The daemon-wide timeout is the short one for stalled request headers;
     * on_request raises it per connection once the headers are in. The
     * per-address cap keeps one client (or one flood) from taking every
     * connection. */
    srv->httpd = MHD_start_daemon(
        flags, 0, NULL, NULL, on_request, srv, MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, srv,
        MHD_OPTION_SOCK_ADDR, ai->ai_addr, MHD_OPTION_THREAD_POOL_SIZE,
        (unsigned)srv->cfg.http_threads, MHD_OPTION_CONNECTION_LIMIT,
        (unsigned)srv->cfg.max_connections, MHD_OPTION_PER_IP_CONNECTION_LIMIT,
        (unsigned)srv->cfg.max_connections_per_ip, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)srv->cfg.header_timeout_s, MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
        MHD_OPTION_LISTEN_BACKLOG_SIZE, 1024u, MHD_OPTION_END);
    int start_errno = errno;
    freeaddrinfo(ai);
    if (!srv->httpd) {
        http_defer_destroy(srv->deferrals);
        srv->deferrals = NULL;
    }
    if (!srv->httpd)
        return mp_err(err, "listen_failed", "cannot listen on %s:%d: %s%s", srv->cfg.listen_host,
                      srv->cfg.listen_port,
                      start_errno ? strerror(start_errno) : "see the httpd line above",
                      start_errno == EADDRINUSE
                          ? " (another process has this port: stop it or pick another --listen "
                            "port; port 0 picks a free one)"
                          : "");
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(srv->httpd, MHD_DAEMON_INFO_BIND_PORT);
    if (di) srv->cfg.listen_port = di->port;
    return 0;
}

void http_stop(mp_server *srv) {
    /* Deferred responses first: libmicrohttpd must not stop with a
     * connection still suspended. */
    http_defer_quiesce(srv->deferrals);
    if (srv->httpd) MHD_stop_daemon(srv->httpd);
    srv->httpd = NULL;
    http_defer_destroy(srv->deferrals);
    srv->deferrals = NULL;
}
