/* redis_kv.c - a Redis connection for publishing models (rkv_ prefix), on
 * hiredis's blocking API with a reply timeout, so a server that stops
 * answering fails the job instead of hanging it. Commands are pipelined:
 * appended without waiting, and the replies are read back once a window of
 * bytes is in flight, each checked against the kind of reply the command
 * must get. A reply of the wrong type is the server's error message (or a
 * protocol error), never a crash. */
#include <errno.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/uio.h>

#include "loader/remote/remote_internal.h"

#define RKV_MAX_KEY 4096

struct rkv_conn {
    redisContext *ctx;
    char *expect; /* kind of each reply still to read, in order */
    size_t nexpect, cap;
    uint64_t inflight; /* bytes appended since the last drain */
    uint64_t window;
};

static int io_error(rkv_conn *c, mp_error *err, const char *what) {
    return mp_err(err, "remote_unavailable", "redis %s: %s", what,
                  c->ctx && c->ctx->errstr[0] ? c->ctx->errstr : "connection lost");
}

/* The server said no: its message (bounded) tells the operator what to fix
 * (NOAUTH, OOM, proto-max-bulk-len...). */
static int reply_error(const redisReply *r, mp_error *err, const char *what) {
    const char *msg = r->str ? r->str : "";
    int n = (int)(r->len < 300 ? r->len : 300);
    const char *code = (strncmp(msg, "NOAUTH", 6) == 0 || strncmp(msg, "WRONGPASS", 9) == 0 ||
                        strncmp(msg, "NOPERM", 6) == 0)
                           ? "unauthorized"
                           : "remote_error";
    return mp_err(err, code, "redis refused %s: %.*s", what, n, msg);
}

static int check_reply(const redisReply *r, char expect, mp_error *err) {
    if (!r) return mp_err(err, "remote_unavailable", "redis: no reply");
    if (r->type == REDIS_REPLY_ERROR) return reply_error(r, err, "a command");
    switch (expect) {
    case 'S':
        if (r->type == REDIS_REPLY_STATUS && r->str && strcmp(r->str, "OK") == 0) return 0;
        break;
    case 'Q':
        if (r->type == REDIS_REPLY_STATUS && r->str && strcmp(r->str, "QUEUED") == 0) return 0;
        break;
    case 'I':
        if (r->type == REDIS_REPLY_INTEGER) return 0;
        break;
    default:
        return 0;
    }
    return mp_err(err, "bad_response", "redis: unexpected reply type %d", r->type);
}

int rkv_connect(const char *host, int port, const char *user, const char *password,
                double timeout_s, rkv_conn **out, mp_error *err) {
    *out = NULL;
    if (timeout_s <= 0) timeout_s = 60;
    struct timeval tv = {(time_t)timeout_s, (suseconds_t)((timeout_s - (long)timeout_s) * 1e6)};
    struct timeval ctv = {timeout_s < 10 ? (time_t)timeout_s : 10, 0};
    rkv_conn *c = calloc(1, sizeof *c);
    if (!c) return mp_err(err, "no_memory", "out of memory");
    c->window = REMOTE_DEFAULT_PIPELINE_BYTES;
    c->ctx = redisConnectWithTimeout(host, port, ctv);
    if (!c->ctx || c->ctx->err) {
        mp_err(err, "remote_unavailable", "redis %s:%d: %s", host, port,
               c->ctx ? c->ctx->errstr : "cannot allocate a context");
        rkv_close(c);
        return -1;
    }
    if (redisSetTimeout(c->ctx, tv) != REDIS_OK) {
        io_error(c, err, "set timeout");
        rkv_close(c);
        return -1;
    }
    redisReply *r = NULL;
    if (password) {
        if (user && *user)
            r = redisCommand(c->ctx, "AUTH %s %s", user, password);
        else
            r = redisCommand(c->ctx, "AUTH %s", password);
        if (!r) {
            io_error(c, err, "AUTH");
            rkv_close(c);
            return -1;
        }
        if (r->type == REDIS_REPLY_ERROR) {
            /* The reply names no secret; keep it short all the same. */
            mp_err(err, "unauthorized", "redis %s:%d refused AUTH (%.80s)", host, port,
                   r->str ? r->str : "");
            freeReplyObject(r);
            rkv_close(c);
            return -1;
        }
        freeReplyObject(r);
    }
    r = redisCommand(c->ctx, "PING");
    if (!r) {
        io_error(c, err, "PING");
        rkv_close(c);
        return -1;
    }
    int rc = 0;
    if (r->type == REDIS_REPLY_ERROR)
        rc = reply_error(r, err, "PING");
    else if (!(r->type == REDIS_REPLY_STATUS && r->str && strcmp(r->str, "PONG") == 0))
        rc = mp_err(err, "bad_response", "%s:%d does not answer PING like Redis", host, port);
    freeReplyObject(r);
    if (rc != 0) {
        rkv_close(c);
        return -1;
    }
    *out = c;
    return 0;
}

void rkv_close(rkv_conn *c) {
    if (!c) return;
    if (c->ctx) redisFree(c->ctx);
    free(c->expect);
    free(c);
}

void rkv_set_window(rkv_conn *c, uint64_t bytes) {
    c->window = bytes ? bytes : REMOTE_DEFAULT_PIPELINE_BYTES;
}

static int push_expect(rkv_conn *c, char e, mp_error *err) {
    if (c->nexpect == c->cap) {
        size_t ncap = c->cap ? c->cap * 2 : 256;
        char *n = realloc(c->expect, ncap);
        if (!n) return mp_err(err, "no_memory", "out of memory");
        c->expect = n;
        c->cap = ncap;
    }
    c->expect[c->nexpect++] = e;
    return 0;
}

int rkv_pipe_flush(rkv_conn *c, mp_error *err) {
    int rc = 0;
    /* Every outstanding reply is read even after a bad one, so the
     * connection stays in step for the clean-up commands that follow. */
    for (size_t i = 0; i < c->nexpect; i++) {
        void *rp = NULL;
        if (redisGetReply(c->ctx, &rp) != REDIS_OK) {
            if (rc == 0) io_error(c, err, "reply");
            c->nexpect = 0;
            c->inflight = 0;
            return -1;
        }
        if (rc == 0 && check_reply(rp, c->expect[i], err) != 0) rc = -1;
        freeReplyObject(rp);
    }
    c->nexpect = 0;
    c->inflight = 0;
    return rc;
}

static int after_append(rkv_conn *c, uint64_t bytes, char expect, mp_error *err) {
    if (push_expect(c, expect, err) != 0) return -1;
    c->inflight += bytes;
    if (c->inflight >= c->window || c->nexpect >= 65536) return rkv_pipe_flush(c, err);
    return 0;
}

/* Sends whatever hiredis still holds in its output buffer. */
static int flush_obuf(rkv_conn *c, mp_error *err) {
    int done = 0;
    while (!done)
        if (redisBufferWrite(c->ctx, &done) != REDIS_OK) return io_error(c, err, "write");
    return 0;
}

int rkv_pipe_set(rkv_conn *c, const char *key, const void *v1, size_t n1, const void *v2, size_t n2,
                 mp_error *err) {
    size_t kl = strlen(key);
    if (kl == 0 || kl > RKV_MAX_KEY) return mp_err(err, "bad_param", "redis key length %zu", kl);
    /* The RESP frame is written straight to the socket with writev: going
     * through hiredis's output buffer would copy every value twice and,
     * with hiredis 0.14, move the unsent rest of the buffer after each
     * partial write (quadratic in the bytes in flight). */
    if (flush_obuf(c, err) != 0) return -1;
    char head[RKV_MAX_KEY + 96];
    int hl =
        snprintf(head, sizeof head, "*3\r\n$3\r\nSET\r\n$%zu\r\n%s\r\n$%zu\r\n", kl, key, n1 + n2);
    struct iovec iov[4] = {{head, (size_t)hl},
                           {(void *)(v1 ? v1 : ""), n1},
                           {(void *)(v2 ? v2 : ""), n2},
                           {"\r\n", 2}};
    int i = 0;
    while (i < 4) {
        ssize_t w = writev(c->ctx->fd, iov + i, 4 - i);
        if (w < 0) {
            if (errno == EINTR) continue;
            return mp_err(err, "remote_unavailable", "redis write: %s",
                          errno == EAGAIN ? "timed out" : strerror(errno));
        }
        size_t left = (size_t)w;
        while (i < 4 && left >= iov[i].iov_len) {
            left -= iov[i].iov_len;
            i++;
        }
        if (i < 4) {
            iov[i].iov_base = (char *)iov[i].iov_base + left;
            iov[i].iov_len -= left;
        }
    }
    return after_append(c, kl + n1 + n2 + 32, 'S', err);
}

int rkv_pipe_cmd(rkv_conn *c, char expect, int argc, const char **argv, mp_error *err) {
    size_t lens[8];
    if (argc < 1 || argc > 8) return mp_err(err, "internal", "rkv_pipe_cmd argc %d", argc);
    uint64_t bytes = 16;
    for (int i = 0; i < argc; i++) {
        lens[i] = strlen(argv[i]);
        bytes += lens[i] + 16;
    }
    if (redisAppendCommandArgv(c->ctx, argc, argv, lens) != REDIS_OK)
        return io_error(c, err, argv[0]);
    return after_append(c, bytes, expect, err);
}

int rkv_exec(rkv_conn *c, mp_error *err) {
    if (rkv_pipe_flush(c, err) != 0) {
        /* Leave no transaction open on a connection we may reuse. */
        redisReply *d = redisCommand(c->ctx, "DISCARD");
        if (d) freeReplyObject(d);
        return -1;
    }
    redisReply *r = redisCommand(c->ctx, "EXEC");
    if (!r) return io_error(c, err, "EXEC");
    int rc = 0;
    if (r->type == REDIS_REPLY_ERROR)
        rc = reply_error(r, err, "EXEC");
    else if (r->type != REDIS_REPLY_ARRAY)
        rc = mp_err(err, "remote_error", "redis EXEC did not run (reply type %d)", r->type);
    else
        for (size_t i = 0; i < r->elements && rc == 0; i++)
            if (r->element[i] && r->element[i]->type == REDIS_REPLY_ERROR)
                rc = reply_error(r->element[i], err, "a command of the swap");
    freeReplyObject(r);
    return rc;
}

int rkv_scan(rkv_conn *c, const char *pattern, int (*fn)(void *arg, const char *key, size_t len),
             void *arg, mp_error *err) {
    char cursor[32] = "0";
    do {
        const char *argv[6] = {"SCAN", cursor, "MATCH", pattern, "COUNT", "1000"};
        size_t lens[6];
        for (int i = 0; i < 6; i++)
            lens[i] = strlen(argv[i]);
        redisReply *r = redisCommandArgv(c->ctx, 6, argv, lens);
        if (!r) return io_error(c, err, "SCAN");
        int rc = 0;
        if (r->type == REDIS_REPLY_ERROR) {
            rc = reply_error(r, err, "SCAN");
        } else if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
                   r->element[0]->type != REDIS_REPLY_STRING || r->element[0]->len == 0 ||
                   r->element[0]->len >= sizeof cursor ||
                   r->element[1]->type != REDIS_REPLY_ARRAY) {
            rc = mp_err(err, "bad_response", "redis: malformed SCAN reply");
        } else {
            memcpy(cursor, r->element[0]->str, r->element[0]->len);
            cursor[r->element[0]->len] = 0;
            for (size_t i = 0; i < r->element[1]->elements && rc == 0; i++) {
                redisReply *k = r->element[1]->element[i];
                if (k->type != REDIS_REPLY_STRING || k->len == 0 || k->len > RKV_MAX_KEY ||
                    memchr(k->str, 0, k->len)) {
                    rc = mp_err(err, "bad_response", "redis: a SCAN key is not a usable string");
                    break;
                }
                if (fn(arg, k->str, k->len) != 0) {
                    freeReplyObject(r);
                    return 1;
                }
            }
        }
        freeReplyObject(r);
        if (rc != 0) return -1;
    } while (strcmp(cursor, "0") != 0);
    return 0;
}

int rkv_each(rkv_conn *c, const char *cmd, char *const *keys, size_t n, int nargs,
             const char *const *args,
             int (*fn)(void *arg, size_t i, const rkv_val *v, mp_error *err), void *arg,
             mp_error *err) {
    enum { BATCH = 64 };
    if (nargs < 0 || nargs > 4) return mp_err(err, "internal", "rkv_each nargs %d", nargs);
    if (c->nexpect && rkv_pipe_flush(c, err) != 0) return -1;
    for (size_t b = 0; b < n; b += BATCH) {
        size_t end = b + BATCH < n ? b + BATCH : n;
        for (size_t i = b; i < end; i++) {
            const char *argv[6] = {cmd, keys[i]};
            size_t lens[6] = {strlen(cmd), strlen(keys[i])};
            for (int k = 0; k < nargs; k++) {
                argv[2 + k] = args[k];
                lens[2 + k] = strlen(args[k]);
            }
            if (redisAppendCommandArgv(c->ctx, 2 + nargs, argv, lens) != REDIS_OK)
                return io_error(c, err, cmd);
        }
        /* every reply of the batch is read, even after a bad one, so the
         * connection stays in step */
        int rc = 0;
        for (size_t i = b; i < end; i++) {
            void *rp = NULL;
            if (redisGetReply(c->ctx, &rp) != REDIS_OK) return io_error(c, err, cmd);
            redisReply *r = rp;
            rkv_val v = {0};
            if (rc == 0) {
                if (r->type == REDIS_REPLY_ERROR) {
                    rc = reply_error(r, err, cmd);
                } else if (r->type == REDIS_REPLY_STRING) {
                    v = (rkv_val){'s', r->str, r->len, 0};
                    rc = fn(arg, i, &v, err);
                } else if (r->type == REDIS_REPLY_INTEGER) {
                    v = (rkv_val){'i', NULL, 0, r->integer};
                    rc = fn(arg, i, &v, err);
                } else if (r->type == REDIS_REPLY_NIL) {
                    v = (rkv_val){'n', NULL, 0, 0};
                    rc = fn(arg, i, &v, err);
                } else {
                    rc = mp_err(err, "bad_response", "redis: unexpected %s reply type %d", cmd,
                                r->type);
                }
            }
            freeReplyObject(r);
        }
        if (rc != 0) return -1;
    }
    return 0;
}
