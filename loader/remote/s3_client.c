/* s3_client.c - signed requests to an S3-compatible store (s3_ prefix).
 *
 * Signing is libcurl's (CURLOPT_AWS_SIGV4, "aws:amz:<region>:s3"). So that
 * the signature is the one S3 recomputes whatever libcurl's version does
 * with queries and bodies: every query string is built here already in
 * SigV4 canonical form (keys sorted, AWS URI encoding, "k=" for bare keys),
 * paths are AWS-encoded once, every body is sent from memory as
 * POSTFIELDS (so libcurl hashes exactly the bytes it sends), and
 * x-amz-content-sha256 is set to that same hash.
 *
 * Retries: transport failures (refused, reset, cut mid-body, timeouts) and
 * 500/502/503/504/429 (S3's SlowDown is a 503) are retried with
 * exponential backoff and jitter up to max_retries; a GET streaming into a
 * sink restarts it from the range's start. Everything else is mapped to a
 * job error code with the store's <Code> and a short, sanitized message.
 *
 * Handles are pooled per client, so parallel transfers reuse connections. */
#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "loader/remote/remote_internal.h"
#include "util/fsutil.h"
#include "util/sbuf.h"

#define S3_MAX_BODY (64u << 20) /* XML answers we keep in memory */
#define S3_MAX_ERR_BODY (64u << 10)
#define S3_POOL 64

struct s3_client {
    char base[1200]; /* scheme://host[:port] (virtual: with the bucket) */
    char bucket[MREF_BUCKET_MAX + 1];
    bool vhost;
    bool anon;
    char sigv4[160];
    char userpwd[400];
    char token_hdr[4200];
    int max_retries;
    double backoff;
    long timeout_s;
    pthread_mutex_t mu;
    CURL *pool[S3_POOL];
    int npool;
    atomic_uint_least64_t requests, retries;
    bool (*cancelled)(void *);
    void *carg;
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static void curl_init_once(void) {
    curl_global_init(CURL_GLOBAL_DEFAULT);
}

int s3_uri_encode(char *buf, size_t n, const char *s, bool keep_slash) {
    static const char hex[] = "0123456789ABCDEF";
    size_t k = 0;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' ||
            (keep_slash && c == '/')) {
            if (k + 1 >= n) return -1;
            buf[k++] = (char)c;
        } else {
            if (k + 3 >= n) return -1;
            buf[k++] = '%';
            buf[k++] = hex[c >> 4];
            buf[k++] = hex[c & 15];
        }
    }
    if (k >= n) return -1;
    buf[k] = 0;
    return 0;
}

void s3_base64(const unsigned char *in, size_t n, char *out) {
    EVP_EncodeBlock((unsigned char *)out, in, (int)n);
}

int s3_client_new(const remote_s3_where *w, const char *bucket, s3_client **out, mp_error *err) {
    *out = NULL;
    pthread_once(&curl_once, curl_init_once);
    s3_client *c = calloc(1, sizeof *c);
    if (!c) return mp_err(err, "no_memory", "out of memory");
    pthread_mutex_init(&c->mu, NULL);
    snprintf(c->bucket, sizeof c->bucket, "%s", bucket);
    const remote_s3_creds *cr = w->creds;
    const char *region = cr && cr->region[0] ? cr->region : "us-east-1";
    c->vhost = w->virtual_hosted;
    if (w->endpoint && *w->endpoint) {
        if (!remote_endpoint_valid(w->endpoint)) {
            s3_client_free(c);
            return mp_err(err, "bad_param", "the S3 endpoint must be http(s)://host[:port]");
        }
        size_t n = strlen(w->endpoint);
        while (n > 0 && w->endpoint[n - 1] == '/')
            n--;
        if (c->vhost) {
            const char *h = strstr(w->endpoint, "://") + 3;
            snprintf(c->base, sizeof c->base, "%.*s%s.%.*s", (int)(h - w->endpoint), w->endpoint,
                     bucket, (int)(n - (size_t)(h - w->endpoint)), h);
        } else {
            snprintf(c->base, sizeof c->base, "%.*s", (int)n, w->endpoint);
        }
    } else if (c->vhost) {
        snprintf(c->base, sizeof c->base, "https://%s.s3.%s.amazonaws.com", bucket, region);
    } else {
        snprintf(c->base, sizeof c->base, "https://s3.%s.amazonaws.com", region);
    }
    c->anon = !cr || !cr->access_key[0];
    if (!c->anon) {
        snprintf(c->sigv4, sizeof c->sigv4, "aws:amz:%s:s3", region);
        snprintf(c->userpwd, sizeof c->userpwd, "%s:%s", cr->access_key, cr->secret_key);
        if (cr->session_token[0])
            snprintf(c->token_hdr, sizeof c->token_hdr, "x-amz-security-token: %s",
                     cr->session_token);
    }
    c->max_retries = w->max_retries < 0 ? REMOTE_DEFAULT_MAX_RETRIES : w->max_retries;
    c->backoff = w->backoff_base_s > 0 ? w->backoff_base_s : 0.2;
    c->timeout_s = w->timeout_s > 0 ? w->timeout_s : 60;
    *out = c;
    return 0;
}

void s3_client_free(s3_client *c) {
    if (!c) return;
    for (int i = 0; i < c->npool; i++)
        curl_easy_cleanup(c->pool[i]);
    pthread_mutex_destroy(&c->mu);
    /* the credentials were copied here */
    volatile char *p = (volatile char *)c->userpwd;
    for (size_t i = 0; i < sizeof c->userpwd; i++)
        p[i] = 0;
    p = (volatile char *)c->token_hdr;
    for (size_t i = 0; i < sizeof c->token_hdr; i++)
        p[i] = 0;
    free(c);
}

void s3_client_counts(const s3_client *c, uint64_t *requests, uint64_t *retries) {
    *requests = atomic_load(&((s3_client *)c)->requests);
    *retries = atomic_load(&((s3_client *)c)->retries);
}

void s3_client_set_cancel(s3_client *c, bool (*cancelled)(void *), void *arg) {
    c->cancelled = cancelled;
    c->carg = arg;
}

static CURL *take_handle(s3_client *c) {
    CURL *h = NULL;
    pthread_mutex_lock(&c->mu);
    if (c->npool > 0) h = c->pool[--c->npool];
    pthread_mutex_unlock(&c->mu);
    if (h)
        curl_easy_reset(h);
    else
        h = curl_easy_init();
    return h;
}

static void give_handle(s3_client *c, CURL *h) {
    pthread_mutex_lock(&c->mu);
    if (c->npool < S3_POOL) {
        c->pool[c->npool++] = h;
        h = NULL;
    }
    pthread_mutex_unlock(&c->mu);
    if (h) curl_easy_cleanup(h);
}

/* ---- one request ------------------------------------------------------------ */

typedef struct s3_req {
    const char *method;
    const char *key;   /* NULL: the bucket itself */
    const char *query; /* canonical, or NULL */
    const void *body;
    size_t body_len;
    const char *hdr[4];  /* extra headers */
    const s3_sink *sink; /* 2xx body goes here, else into out */
    /* results */
    long status;
    sbuf out;
    char etag[80];
    char sha256[64];
    uint64_t length;
    bool has_length;
    char crange[96]; /* Content-Range, "" when absent */
    /* state */
    bool to_sink;
    int sink_rc;
    bool sink_started;
} s3_req;

static size_t on_header(char *b, size_t size, size_t n, void *arg) {
    s3_req *r = arg;
    size_t len = size * n;
    char line[256];
    size_t l = len < sizeof line - 1 ? len : sizeof line - 1;
    memcpy(line, b, l);
    line[l] = 0;
    line[strcspn(line, "\r\n")] = 0;
    if (strncmp(line, "HTTP/", 5) == 0) {
        /* a new response (after a redirect or 100-continue): forget the old */
        r->etag[0] = r->sha256[0] = r->crange[0] = 0;
        r->has_length = false;
        return len;
    }
    char *colon = strchr(line, ':');
    if (!colon) return len;
    *colon = 0;
    char *v = colon + 1;
    while (*v == ' ' || *v == '\t')
        v++;
    if (strcasecmp(line, "etag") == 0) {
        size_t vl = strlen(v);
        if (vl >= 2 && v[0] == '"' && v[vl - 1] == '"') {
            v++;
            vl -= 2;
        }
        if (vl < sizeof r->etag) {
            bool ok = true;
            for (size_t i = 0; i < vl; i++)
                if (!(isalnum((unsigned char)v[i]) || v[i] == '-')) ok = false;
            if (ok) {
                memcpy(r->etag, v, vl);
                r->etag[vl] = 0;
            }
        }
    } else if (strcasecmp(line, "x-amz-checksum-sha256") == 0) {
        if (strlen(v) == 44) snprintf(r->sha256, sizeof r->sha256, "%s", v);
    } else if (strcasecmp(line, "content-range") == 0) {
        snprintf(r->crange, sizeof r->crange, "%s", v);
    } else if (strcasecmp(line, "content-length") == 0) {
        char *end;
        unsigned long long x = strtoull(v, &end, 10);
        if (end != v && *end == 0) {
            r->length = x;
            r->has_length = true;
        }
    }
    return len;
}

static size_t on_body(char *b, size_t size, size_t n, void *arg) {
    void **pair = arg;
    s3_req *r = pair[0];
    CURL *h = pair[1];
    size_t len = size * n;
    if (!r->sink_started) {
        long st = 0;
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &st);
        r->to_sink = r->sink && st >= 200 && st < 300;
        r->sink_started = true;
    }
    if (r->to_sink) {
        if ((r->sink_rc = r->sink->write(r->sink->arg, b, len)) != 0) return 0;
        return len;
    }
    size_t cap = r->sink ? S3_MAX_ERR_BODY : S3_MAX_BODY;
    if (r->out.len + len > cap) return 0; /* a body this big is not an answer we want */
    sb_append(&r->out, b, len);
    return r->out.oom ? 0 : len;
}

/* The text of <tag>...</tag> after from, entities decoded, into out (n).
 * Returns the end of the element or NULL. */
static const char *xml_text(const char *from, const char *end, const char *tag, char *out,
                            size_t n) {
    char open[64], close[64];
    snprintf(open, sizeof open, "<%s>", tag);
    snprintf(close, sizeof close, "</%s>", tag);
    const char *a = memmem(from, (size_t)(end - from), open, strlen(open));
    if (!a) return NULL;
    a += strlen(open);
    const char *b = memmem(a, (size_t)(end - a), close, strlen(close));
    if (!b) return NULL;
    size_t k = 0;
    for (const char *p = a; p < b; p++) {
        char c = *p;
        if (c == '&') {
            static const struct {
                const char *e;
                char c;
            } ents[] = {{"&amp;", '&'},   {"&lt;", '<'},   {"&gt;", '>'},   {"&quot;", '"'},
                        {"&apos;", '\''}, {"&#34;", '"'},  {"&#39;", '\''}, {"&#x22;", '"'},
                        {"&#13;", '\r'},  {"&#10;", '\n'}, {"&#9;", '\t'}};
            bool hit = false;
            for (size_t i = 0; i < sizeof ents / sizeof ents[0]; i++) {
                size_t el = strlen(ents[i].e);
                if ((size_t)(b - p) >= el && memcmp(p, ents[i].e, el) == 0) {
                    c = ents[i].c;
                    p += el - 1;
                    hit = true;
                    break;
                }
            }
            if (!hit) return NULL; /* an entity we do not expect in S3's answers */
        }
        if (k + 1 >= n) return NULL;
        out[k++] = c;
    }
    out[k] = 0;
    return b + strlen(close);
}

/* Printable, bounded copy of store-provided text for an error message. */
static void sanitize(char *s) {
    for (char *p = s; *p; p++)
        if ((unsigned char)*p < ' ' || (unsigned char)*p >= 0x7f) *p = '?';
}

static int map_status(s3_client *c, s3_req *r, mp_error *err) {
    char code[64] = "", msg[200] = "";
    const char *b = r->out.buf, *e = b ? b + r->out.len : NULL;
    if (b) {
        xml_text(b, e, "Code", code, sizeof code);
        xml_text(b, e, "Message", msg, sizeof msg);
    }
    sanitize(code);
    sanitize(msg);
    const char *what = r->key ? r->key : c->bucket;
    long st = r->status;
    if (st == 401 ||
        (st == 403 &&
         (strcmp(code, "SignatureDoesNotMatch") == 0 || strcmp(code, "InvalidAccessKeyId") == 0 ||
          strcmp(code, "InvalidToken") == 0 || strcmp(code, "ExpiredToken") == 0)))
        return mp_err(err, "unauthorized",
                      "S3 refused the credentials (%s): check AWS_ACCESS_KEY_ID / "
                      "AWS_SECRET_ACCESS_KEY or --s3-credentials-file",
                      code[0] ? code : "HTTP 401");
    if (st == 403)
        return mp_err(err, "forbidden", "S3 denied %s %s (%s%s%s)", r->method, what,
                      code[0] ? code : "HTTP 403", msg[0] ? ": " : "", msg);
    if (st == 404) {
        if (strcmp(code, "NoSuchBucket") == 0)
            return mp_err(err, "not_found", "bucket %s does not exist", c->bucket);
        return mp_err(err, "not_found", "%s does not exist in bucket %s (%s)", what, c->bucket,
                      code[0] ? code : "HTTP 404");
    }
    if (st == 412)
        return mp_err(err, "changed_during_download",
                      "%s changed while it was being read (ETag no longer matches); run the job "
                      "again",
                      what);
    return mp_err(err, "remote_error", "S3 %s %s: HTTP %ld %s%s%s", r->method, what, st,
                  code[0] ? code : "", msg[0] ? ": " : "", msg);
}

static bool retryable_status(long st) {
    return st == 500 || st == 502 || st == 503 || st == 504 || st == 429 || st == 408;
}

static double backoff_s(const s3_client *c, int attempt) {
    double d = c->backoff;
    for (int i = 0; i < attempt && d < 5.0; i++)
        d *= 2;
    if (d > 5.0) d = 5.0;
    uint32_t j = 0;
    if (getrandom(&j, sizeof j, GRND_NONBLOCK) != (ssize_t)sizeof j)
        j = (uint32_t)attempt * 2654435761u;
    return d * (0.5 + (j % 1000) / 1000.0);
}

static bool sleep_cancellable(s3_client *c, double s) {
    while (s > 0) {
        if (c->cancelled && c->cancelled(c->carg)) return false;
        double step = s < 0.1 ? s : 0.1;
        struct timespec ts = {0, (long)(step * 1e9)};
        nanosleep(&ts, NULL);
        s -= step;
    }
    return true;
}

/* libcurl's progress hook: a cancel (or a drain) stops a transfer in
 * flight, not only between requests. */
static int on_xfer(void *arg, curl_off_t dlt, curl_off_t dln, curl_off_t ult, curl_off_t uln) {
    (void)dlt;
    (void)dln;
    (void)ult;
    (void)uln;
    s3_client *c = arg;
    return c->cancelled && c->cancelled(c->carg) ? 1 : 0;
}

static int build_url(const s3_client *c, const s3_req *r, char *url, size_t n, mp_error *err) {
    char path[3 * 1100] = "";
    if (r->key && s3_uri_encode(path, sizeof path, r->key, true) != 0)
        return mp_err(err, "bad_param", "object key too long");
    int k;
    if (c->vhost)
        k = snprintf(url, n, "%s/%s%s%s", c->base, path, r->query ? "?" : "",
                     r->query ? r->query : "");
    else
        k = snprintf(url, n, "%s/%s%s%s%s%s", c->base, c->bucket, r->key ? "/" : "", path,
                     r->query ? "?" : "", r->query ? r->query : "");
    if (k < 0 || (size_t)k >= n) return mp_err(err, "bad_param", "request URL too long");
    return 0;
}

static int s3_do(s3_client *c, s3_req *r, mp_error *err) {
    char url[8192];
    if (build_url(c, r, url, sizeof url, err) != 0) return -1;
    /* x-amz-content-sha256: the hash of exactly the bytes sent */
    unsigned char md[SHA256_DIGEST_LENGTH];
    SHA256(r->body ? r->body : (const void *)"", r->body_len, md);
    char hash_hdr[100], hex[65];
    fs_hex(md, sizeof md, hex);
    snprintf(hash_hdr, sizeof hash_hdr, "x-amz-content-sha256: %s", hex);
    for (int attempt = 0;; attempt++) {
        if (c->cancelled && c->cancelled(c->carg)) return mp_err(err, "cancelled", "cancelled");
        CURL *h = take_handle(c);
        if (!h) return mp_err(err, "no_memory", "cannot create a curl handle");
        struct curl_slist *hl = NULL, *tmp;
        /* No "Expect:" override here: libcurl would sign the removed header
         * as an empty one. */
        const char *hs[10] = {hash_hdr, c->token_hdr[0] ? c->token_hdr : NULL};
        int nh = 2;
        for (int i = 0; i < 4 && r->hdr[i]; i++)
            hs[nh++] = r->hdr[i];
        bool oom = false;
        for (int i = 0; i < nh; i++) {
            if (!hs[i]) continue;
            if (!(tmp = curl_slist_append(hl, hs[i])))
                oom = true;
            else
                hl = tmp;
        }
        if (r->body && strcmp(r->method, "PUT") == 0 &&
            (tmp = curl_slist_append(hl, "Content-Type: application/octet-stream")))
            hl = tmp;
        void *pair[2] = {r, h};
        sb_free(&r->out);
        memset(&r->out, 0, sizeof r->out);
        r->sink_started = r->to_sink = false;
        r->sink_rc = 0;
        r->status = 0;
        curl_easy_setopt(h, CURLOPT_URL, url);
        curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(h, CURLOPT_HTTPHEADER, hl);
        curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
        curl_easy_setopt(h, CURLOPT_HEADERDATA, r);
        curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
        curl_easy_setopt(h, CURLOPT_WRITEDATA, pair);
        curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 10L);
        /* a stalled transfer (under 1 KiB/s for timeout_s) is a failed one */
        curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1024L);
        curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, c->timeout_s);
        curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_xfer);
        curl_easy_setopt(h, CURLOPT_XFERINFODATA, c);
        curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
        curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
        if (!c->anon) {
            curl_easy_setopt(h, CURLOPT_AWS_SIGV4, c->sigv4);
            curl_easy_setopt(h, CURLOPT_USERPWD, c->userpwd);
        }
        if (strcmp(r->method, "HEAD") == 0) {
            curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
        } else if (strcmp(r->method, "GET") != 0) {
            /* PUT/POST/DELETE bodies from memory, so the signer hashes them */
            curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, r->method);
            if (r->body || strcmp(r->method, "POST") == 0) {
                curl_easy_setopt(h, CURLOPT_POSTFIELDS, r->body ? r->body : "");
                curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->body_len);
            }
        }
        atomic_fetch_add(&c->requests, 1);
        CURLcode cc = oom ? CURLE_OUT_OF_MEMORY : curl_easy_perform(h);
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r->status);
        char cerr[160];
        snprintf(cerr, sizeof cerr, "%s", curl_easy_strerror(cc));
        curl_slist_free_all(hl);
        give_handle(c, h);
        if (r->sink_rc != 0 || cc == CURLE_ABORTED_BY_CALLBACK)
            return mp_err(err, "cancelled", "stopped while sending or receiving %s",
                          r->key ? r->key : c->bucket);
        bool transport = cc != CURLE_OK;
        if (!transport && r->status >= 200 && r->status < 300) return 0;
        if (transport && cc == CURLE_OUT_OF_MEMORY)
            return mp_err(err, "no_memory", "out of memory");
        if (!transport && !retryable_status(r->status)) return map_status(c, r, err);
        if (attempt >= c->max_retries) {
            if (transport)
                return mp_err(err, "remote_unavailable", "S3 %s %s: %s (after %d retries)",
                              r->method, r->key ? r->key : c->bucket, cerr, attempt);
            mp_error e2 = {0};
            map_status(c, r, &e2);
            return mp_err(err, "remote_unavailable", "S3 kept failing after %d retries: %s",
                          attempt, e2.message);
        }
        atomic_fetch_add(&c->retries, 1);
        if (r->sink && r->sink_started && r->to_sink && r->sink->restart)
            r->sink->restart(r->sink->arg);
        if (!sleep_cancellable(c, backoff_s(c, attempt)))
            return mp_err(err, "cancelled", "cancelled");
    }
}

static void req_free(s3_req *r) {
    sb_free(&r->out);
}

/* ---- the operations ------------------------------------------------------------ */

void s3_listing_free(s3_listing *l) {
    for (size_t i = 0; i < l->n; i++)
        free(l->objs[i].key);
    free(l->objs);
    memset(l, 0, sizeof *l);
}

int s3_parse_list_page(const char *b, size_t n, s3_listing *out, char *token, size_t tokn,
                       bool *truncated, mp_error *err) {
    const char *e = b + n, *p = b;
    if (!memmem(b, n, "<ListBucketResult", 17))
        return mp_err(err, "bad_response", "S3 listing is not a ListBucketResult");
    char trunc[16] = "";
    /* IsTruncated and the token sit after the Contents in S3's answers but
     * the order is not guaranteed: look through the whole page. */
    xml_text(b, e, "IsTruncated", trunc, sizeof trunc);
    *truncated = strcmp(trunc, "true") == 0;
    token[0] = 0;
    if (*truncated && !xml_text(b, e, "NextContinuationToken", token, tokn))
        return mp_err(err, "bad_response", "S3 listing is truncated without a usable token");
    for (;;) {
        const char *cs = memmem(p, (size_t)(e - p), "<Contents>", 10);
        if (!cs) break;
        const char *ce = memmem(cs, (size_t)(e - cs), "</Contents>", 11);
        if (!ce) return mp_err(err, "bad_response", "S3 listing: unterminated <Contents>");
        char key[1100], size[32], etag[100] = "";
        if (!xml_text(cs, ce, "Key", key, sizeof key) ||
            !xml_text(cs, ce, "Size", size, sizeof size))
            return mp_err(err, "bad_response", "S3 listing: an entry without a usable Key/Size");
        xml_text(cs, ce, "ETag", etag, sizeof etag);
        char *end;
        errno = 0;
        unsigned long long sz = strtoull(size, &end, 10);
        if (!isdigit((unsigned char)size[0]) || *end || errno)
            return mp_err(err, "bad_response", "S3 listing: bad Size for %s", key);
        if (out->n % 256 == 0) {
            s3_object *no = realloc(out->objs, (out->n + 256) * sizeof *no);
            if (!no) return mp_err(err, "no_memory", "out of memory");
            out->objs = no;
        }
        s3_object *o = &out->objs[out->n];
        memset(o, 0, sizeof *o);
        if (!(o->key = strdup(key))) return mp_err(err, "no_memory", "out of memory");
        o->size = sz;
        char *q = etag;
        size_t el = strlen(q);
        if (el >= 2 && q[0] == '"' && q[el - 1] == '"') {
            q[el - 1] = 0;
            q++;
        }
        snprintf(o->etag, sizeof o->etag, "%s", q);
        out->n++;
        p = ce + 11;
    }
    return 0;
}

int s3_list(s3_client *c, const char *prefix, s3_listing *out, mp_error *err) {
    memset(out, 0, sizeof *out);
    char token[2048] = "", etok[3 * 2048 + 1], epre[3 * 1100];
    if (s3_uri_encode(epre, sizeof epre, prefix, false) != 0)
        return mp_err(err, "bad_param", "prefix too long");
    for (;;) {
        char query[sizeof etok + sizeof epre + 64];
        if (token[0]) {
            if (s3_uri_encode(etok, sizeof etok, token, false) != 0) {
                s3_listing_free(out);
                return mp_err(err, "bad_response", "S3 continuation token too long");
            }
            snprintf(query, sizeof query, "continuation-token=%s&list-type=2&prefix=%s", etok,
                     epre);
        } else {
            snprintf(query, sizeof query, "list-type=2&prefix=%s", epre);
        }
        s3_req r = {.method = "GET", .query = query};
        bool truncated = false;
        int rc = s3_do(c, &r, err);
        if (rc == 0)
            rc = s3_parse_list_page(r.out.buf ? r.out.buf : "", r.out.len, out, token, sizeof token,
                                    &truncated, err);
        req_free(&r);
        if (rc != 0) {
            s3_listing_free(out);
            return -1;
        }
        out->pages++;
        if (!truncated) return 0;
        if (out->pages > 100000) {
            s3_listing_free(out);
            return mp_err(err, "bad_response", "S3 listing does not end");
        }
    }
}

/* "bytes FIRST-LAST/TOTAL" (TOTAL may be '*') naming exactly [off, off+len). */
static bool crange_ok(const char *v, uint64_t off, uint64_t len) {
    unsigned long long a, b;
    int used = 0;
    if (strncasecmp(v, "bytes ", 6) != 0 || sscanf(v + 6, "%llu-%llu/%n", &a, &b, &used) != 2 ||
        used == 0)
        return false;
    return a == off && b == off + len - 1;
}

int s3_get_range(s3_client *c, const char *key, uint64_t off, uint64_t len, const char *if_match,
                 const s3_sink *sink, mp_error *err) {
    char range[80], im[120];
    snprintf(range, sizeof range, "Range: bytes=%llu-%llu", (unsigned long long)off,
             (unsigned long long)(off + len - 1));
    s3_req r = {.method = "GET", .key = key, .sink = sink};
    int k = 0;
    if (len > 0) r.hdr[k++] = range;
    if (if_match && *if_match) {
        snprintf(im, sizeof im, "If-Match: \"%s\"", if_match);
        r.hdr[k++] = im;
    }
    int rc = s3_do(c, &r, err);
    if (rc == 0 && len > 0 && r.status != 206 && !(r.status == 200 && off == 0))
        rc = mp_err(err, "bad_response", "S3 GET %s: asked for a range, got HTTP %ld", key,
                    r.status);
    if (rc == 0 && r.status == 206 && !crange_ok(r.crange, off, len))
        rc = mp_err(err, "bad_response",
                    "S3 GET %s: asked for bytes %llu-%llu, the answer says Content-Range '%.60s'",
                    key, (unsigned long long)off, (unsigned long long)(off + len - 1), r.crange);
    req_free(&r);
    return rc;
}

typedef struct exact_sink {
    unsigned char *dst;
    uint64_t n, cap;
    bool over;
} exact_sink;

static int es_write(void *arg, const void *p, size_t n) {
    exact_sink *s = arg;
    if (n > s->cap - s->n) {
        s->over = true; /* more than the range: not a store we trust */
        return -1;
    }
    memcpy(s->dst + s->n, p, n);
    s->n += n;
    return 0;
}

static void es_restart(void *arg) {
    exact_sink *s = arg;
    s->n = 0;
    s->over = false;
}

int s3_get_bytes(s3_client *c, const char *key, uint64_t off, uint64_t len, const char *if_match,
                 void *dst, mp_error *err) {
    if (len == 0) return 0;
    exact_sink es = {dst, 0, len, false};
    s3_sink sink = {es_write, es_restart, &es};
    int rc = s3_get_range(c, key, off, len, if_match, &sink, err);
    if (rc != 0 && es.over)
        return mp_err(err, "bad_response",
                      "S3 GET %s: the answer to a %llu-byte range is longer than the range", key,
                      (unsigned long long)len);
    if (rc == 0 && es.n != len)
        rc = mp_err(err, "bad_response",
                    "S3 GET %s: %llu bytes arrived for a %llu-byte range at %llu", key,
                    (unsigned long long)es.n, (unsigned long long)len, (unsigned long long)off);
    return rc;
}

int s3_head(s3_client *c, const char *key, uint64_t *size, char *etag, size_t etagn,
            char *sha256_b64, size_t shan, mp_error *err) {
    s3_req r = {.method = "HEAD", .key = key};
    r.hdr[0] = "x-amz-checksum-mode: ENABLED";
    int rc = s3_do(c, &r, err);
    if (rc == 0) {
        if (!r.has_length) rc = mp_err(err, "bad_response", "S3 HEAD %s: no Content-Length", key);
        *size = r.length;
        if (etag) snprintf(etag, etagn, "%s", r.etag);
        if (sha256_b64) snprintf(sha256_b64, shan, "%s", r.sha256);
    }
    req_free(&r);
    return rc;
}

int s3_put(s3_client *c, const char *key, const void *data, size_t len, const char *sha256_b64,
           char *etag_out, size_t etagn, mp_error *err) {
    char ck[100];
    s3_req r = {.method = "PUT", .key = key, .body = data ? data : "", .body_len = len};
    if (sha256_b64) {
        snprintf(ck, sizeof ck, "x-amz-checksum-sha256: %s", sha256_b64);
        r.hdr[0] = ck;
    }
    int rc = s3_do(c, &r, err);
    if (rc == 0 && etag_out) snprintf(etag_out, etagn, "%s", r.etag);
    req_free(&r);
    return rc;
}

int s3_mpu_create(s3_client *c, const char *key, char *upload_id, size_t n, mp_error *err) {
    s3_req r = {.method = "POST", .key = key, .query = "uploads="};
    r.hdr[0] = "x-amz-checksum-algorithm: SHA256";
    int rc = s3_do(c, &r, err);
    if (rc == 0 &&
        (!r.out.buf || !xml_text(r.out.buf, r.out.buf + r.out.len, "UploadId", upload_id, n) ||
         !upload_id[0]))
        rc = mp_err(err, "bad_response", "S3 CreateMultipartUpload %s: no UploadId", key);
    if (rc == 0)
        for (const char *p = upload_id; *p; p++)
            if ((unsigned char)*p <= ' ' || (unsigned char)*p >= 0x7f)
                rc = mp_err(err, "bad_response", "S3 CreateMultipartUpload: odd UploadId");
    req_free(&r);
    return rc;
}

int s3_mpu_part(s3_client *c, const char *key, const char *upload_id, int part, const void *data,
                size_t len, const char *sha256_b64, char *etag_out, size_t etagn, mp_error *err) {
    char q[1200], eid[3 * 300];
    if (s3_uri_encode(eid, sizeof eid, upload_id, false) != 0)
        return mp_err(err, "bad_response", "UploadId too long");
    snprintf(q, sizeof q, "partNumber=%d&uploadId=%s", part, eid);
    char ck[100];
    s3_req r = {.method = "PUT", .key = key, .query = q, .body = data, .body_len = len};
    if (sha256_b64) {
        snprintf(ck, sizeof ck, "x-amz-checksum-sha256: %s", sha256_b64);
        r.hdr[0] = ck;
    }
    int rc = s3_do(c, &r, err);
    if (rc == 0 && !r.etag[0]) rc = mp_err(err, "bad_response", "S3 UploadPart: no ETag");
    if (rc == 0) snprintf(etag_out, etagn, "%s", r.etag);
    req_free(&r);
    return rc;
}

int s3_mpu_complete(s3_client *c, const char *key, const char *upload_id, int nparts,
                    char (*etags)[80], char (*sha256s)[48], char *etag_out, size_t etagn,
                    mp_error *err) {
    char q[1200], eid[3 * 300];
    if (s3_uri_encode(eid, sizeof eid, upload_id, false) != 0)
        return mp_err(err, "bad_response", "UploadId too long");
    snprintf(q, sizeof q, "uploadId=%s", eid);
    sbuf body = {0};
    sb_puts(&body, "<CompleteMultipartUpload xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">");
    for (int i = 0; i < nparts; i++) {
        sb_printf(&body, "<Part><PartNumber>%d</PartNumber><ETag>\"%s\"</ETag>", i + 1, etags[i]);
        if (sha256s && sha256s[i][0])
            sb_printf(&body, "<ChecksumSHA256>%s</ChecksumSHA256>", sha256s[i]);
        sb_puts(&body, "</Part>");
    }
    sb_puts(&body, "</CompleteMultipartUpload>");
    if (body.oom) {
        sb_free(&body);
        return mp_err(err, "no_memory", "out of memory");
    }
    s3_req r = {.method = "POST", .key = key, .query = q, .body = body.buf, .body_len = body.len};
    r.hdr[0] = "Content-Type: application/xml";
    int rc = s3_do(c, &r, err);
    /* S3 may answer 200 with an <Error> body when completion fails late */
    if (rc == 0 && r.out.buf && memmem(r.out.buf, r.out.len, "<Error>", 7)) {
        r.status = 500;
        rc = map_status(c, &r, err);
    }
    if (rc == 0 && etag_out) {
        char et[100] = "";
        if (r.out.buf) xml_text(r.out.buf, r.out.buf + r.out.len, "ETag", et, sizeof et);
        char *p = et;
        size_t l = strlen(p);
        if (l >= 2 && p[0] == '"' && p[l - 1] == '"') {
            p[l - 1] = 0;
            p++;
        }
        snprintf(etag_out, etagn, "%s", p);
    }
    req_free(&r);
    sb_free(&body);
    return rc;
}

void s3_mpu_abort(s3_client *c, const char *key, const char *upload_id) {
    char q[1200], eid[3 * 300];
    if (s3_uri_encode(eid, sizeof eid, upload_id, false) != 0) return;
    snprintf(q, sizeof q, "uploadId=%s", eid);
    s3_req r = {.method = "DELETE", .key = key, .query = q};
    mp_error e = {0};
    (void)s3_do(c, &r, &e); /* best effort: lifecycle rules reap what is left */
    req_free(&r);
}

int s3_delete(s3_client *c, const char *key, mp_error *err) {
    s3_req r = {.method = "DELETE", .key = key};
    int rc = s3_do(c, &r, err);
    if (rc != 0 && strcmp(err->code, "not_found") == 0) rc = 0;
    req_free(&r);
    return rc;
}
