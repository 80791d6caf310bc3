/*
 * remote_internal.h - the plumbing of loader/remote/, private to it: the
 * Redis connection (rkv_, redis_kv.c) and the S3 client (s3_, s3_client.c).
 * Everything a store sends back is treated as hostile here: replies are
 * type-checked, sizes bounded, XML parsed without trusting its shape.
 */
#ifndef MP_LOADER_REMOTE_INTERNAL_H
#define MP_LOADER_REMOTE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "loader/remote/remote.h"

/* ---- Redis (redis_kv.c) ---------------------------------------------------- */

typedef struct rkv_conn rkv_conn;

/* Connects (TCP, timeout_s per reply), AUTHs when password is given
 * ("AUTH user password" when user is non-empty) and PINGs. Errors:
 * "remote_unavailable", "unauthorized", "remote_error". */
int rkv_connect(const char *host, int port, const char *user, const char *password,
                double timeout_s, rkv_conn **out, mp_error *err);
void rkv_close(rkv_conn *c);

/* Pipelining: rkv_pipe_* append a command without waiting; once more than
 * window bytes are in flight, the replies are read (every one must be the
 * expected kind, else the first bad one is the error). rkv_pipe_flush reads
 * all outstanding replies. */
void rkv_set_window(rkv_conn *c, uint64_t bytes);
/* SET key value, the value given as up to 2 pieces (header, data) so no
 * copy of the data is made before hiredis takes it. Expects +OK. */
int rkv_pipe_set(rkv_conn *c, const char *key, const void *v1, size_t n1, const void *v2, size_t n2,
                 mp_error *err);
/* Any command (argv strings); expect: 'S' status OK, 'Q' +QUEUED, 'I' an
 * integer, '*' anything that is not an error. */
int rkv_pipe_cmd(rkv_conn *c, char expect, int argc, const char **argv, mp_error *err);
int rkv_pipe_flush(rkv_conn *c, mp_error *err);

/* EXEC after a pipelined MULTI: every queued command's reply must not be an
 * error. */
int rkv_exec(rkv_conn *c, mp_error *err);

/* Every key matching pattern (SCAN MATCH, COUNT 1000), each handed to fn
 * (return non-zero to stop early: then *stopped is set). Keys are bounded
 * to 4096 bytes. */
int rkv_scan(rkv_conn *c, const char *pattern, int (*fn)(void *arg, const char *key, size_t len),
             void *arg, mp_error *err);

/* One reply of rkv_each: a string ('s', s/len), an integer ('i', n) or
 * nil ('n'). */
typedef struct rkv_val {
    char kind;
    const char *s;
    size_t len;
    long long n;
} rkv_val;

/* For each key: `cmd key args...`, pipelined in batches; fn sees every
 * reply in key order (an error reply fails the call; fn's non-zero return
 * stops it with fn's error). */
int rkv_each(rkv_conn *c, const char *cmd, char *const *keys, size_t n, int nargs,
             const char *const *args,
             int (*fn)(void *arg, size_t i, const rkv_val *v, mp_error *err), void *arg,
             mp_error *err);

/* ---- S3 (s3_client.c) ------------------------------------------------------ */

typedef struct s3_client s3_client;

/* One object of a listing. */
typedef struct s3_object {
    char *key; /* full key */
    uint64_t size;
    char etag[80]; /* without quotes */
} s3_object;

typedef struct s3_listing {
    s3_object *objs;
    size_t n;
    size_t pages;
} s3_listing;

void s3_listing_free(s3_listing *l);

/* A client for one bucket (thread-safe for concurrent requests: each call
 * uses its own curl handle). Errors: "bad_param" (endpoint). */
int s3_client_new(const remote_s3_where *w, const char *bucket, s3_client **out, mp_error *err);
void s3_client_free(s3_client *c);
/* Counters since creation: requests sent, retries made. */
void s3_client_counts(const s3_client *c, uint64_t *requests, uint64_t *retries);
void s3_client_set_cancel(s3_client *c, bool (*cancelled)(void *), void *arg);

/* One ListObjectsV2 page (n bytes, not NUL-terminated): its objects are
 * appended to out; *truncated and token (the continuation) say whether
 * another page follows. Errors: "bad_response", "no_memory". */
int s3_parse_list_page(const char *b, size_t n, s3_listing *out, char *token, size_t tokn,
                       bool *truncated, mp_error *err);
/* ListObjectsV2 of everything under prefix (every page). */
int s3_list(s3_client *c, const char *prefix, s3_listing *out, mp_error *err);

/* Ranged GET of [off, off+len) of key into the callback (called with
 * consecutive pieces; non-zero return aborts with "cancelled").
 * if_match: the ETag the object must still have. On a retry the callback
 * gets a restart (restart called, then the range from its start again). */
typedef struct s3_sink {
    int (*write)(void *arg, const void *p, size_t n);
    void (*restart)(void *arg);
    void *arg;
} s3_sink;
int s3_get_range(s3_client *c, const char *key, uint64_t off, uint64_t len, const char *if_match,
                 const s3_sink *sink, mp_error *err);
/* Exactly [off, off+len) of key into dst (len bytes): a 206 whose
 * Content-Range names that range and whose body is that long ("bad_response"
 * otherwise: shorter, longer, another range); a 200 only for a whole object
 * of len bytes at off 0. */
int s3_get_bytes(s3_client *c, const char *key, uint64_t off, uint64_t len, const char *if_match,
                 void *dst, mp_error *err);
/* HEAD: size, etag, and x-amz-checksum-sha256 (base64, "" when absent;
 * asked for with x-amz-checksum-mode: ENABLED). */
int s3_head(s3_client *c, const char *key, uint64_t *size, char *etag, size_t etagn,
            char *sha256_b64, size_t shan, mp_error *err);
/* PUT of a whole small object from memory; *etag_out (may be NULL) gets the
 * ETag. sha256_b64: sent as x-amz-checksum-sha256 when non-NULL. */
int s3_put(s3_client *c, const char *key, const void *data, size_t len, const char *sha256_b64,
           char *etag_out, size_t etagn, mp_error *err);
/* Multipart: create (-> upload id), upload part n (1-based) from memory
 * (-> its ETag), complete with the parts' ETags in order, abort. */
int s3_mpu_create(s3_client *c, const char *key, char *upload_id, size_t n, mp_error *err);
int s3_mpu_part(s3_client *c, const char *key, const char *upload_id, int part, const void *data,
                size_t len, const char *sha256_b64, char *etag_out, size_t etagn, mp_error *err);
int s3_mpu_complete(s3_client *c, const char *key, const char *upload_id, int nparts,
                    char (*etags)[80], char (*sha256s)[48], char *etag_out, size_t etagn,
                    mp_error *err);
void s3_mpu_abort(s3_client *c, const char *key, const char *upload_id);
/* DELETE one key (204 / 404 are both fine). */
int s3_delete(s3_client *c, const char *key, mp_error *err);

/* What to fetch of a prefix, and the choice a hub download would make
 * (load_format, patterns, the safetensors index fetched when it decides):
 * sel[] gets the chosen indexes into ls (caller frees). plen: the prefix's
 * length with its '/'. Errors: "not_found", "file_not_found",
 * "bad_response". */
typedef struct s3_pick {
    const mref_remote *src;
    hub_load_format load_format;
    const char *const *allow;
    size_t nallow;
    const char *const *ignore;
    size_t nignore;
} s3_pick;
int s3_choose(s3_client *s3, const remote_callbacks *cb, const s3_pick *p, const s3_listing *ls,
              size_t plen, size_t **sel, size_t *nsel, mp_error *err);

/* A printf-style line to cb->log, when there is one (cb may be NULL). */
void remote_log(const remote_callbacks *cb, const char *level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* AWS URI encoding: everything but A-Za-z0-9-._~ (and '/' when keep_slash). */
int s3_uri_encode(char *buf, size_t n, const char *s, bool keep_slash);
/* Helpers for tests and the other files. */
void s3_base64(const unsigned char *in, size_t n, char *out);

#endif
