/*
 * hub_http.c - the hub's API as huggingface_hub speaks it: the revision
 * listing (GET /api/models/{repo}/revision/{rev}?blobs=true), the headers of
 * resolve responses, the mapping of X-Error-Code and HTTP status to job
 * error codes, and the retry policy (exponential backoff with jitter,
 * Retry-After honoured).
 */
#include "loader/hub/hub_internal.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define LISTING_MAX_BYTES (64u << 20)
#define LISTING_MAX_FILES 200000

void hub_listing_free(hub_listing *l) {
    if (!l) return;
    for (size_t i = 0; i < l->nfiles; i++)
        free(l->files[i].name);
    free(l->files);
    l->files = NULL;
    l->nfiles = 0;
}

/* ---- pure helpers ------------------------------------------------------- */

double hub_parse_retry_after(const char *value, time_t now) {
    if (!value) return -1;
    while (*value == ' ' || *value == '\t')
        value++;
    if (!*value) return -1;
    if (isdigit((unsigned char)*value)) {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(value, &end, 10);
        while (*end == ' ' || *end == '\t' || *end == '\r' || *end == '\n')
            end++;
        if (*end || errno) return -1;
        return v > 600 ? 600 : (double)v;
    }
    time_t t = curl_getdate(value, NULL);
    if (t == (time_t)-1) return -1;
    double d = difftime(t, now);
    if (d < 0) d = 0;
    return d > 600 ? 600 : d;
}

const char *hub_error_code(long status, const char *x, bool api) {
    if (x && *x) {
        if (strcmp(x, "RepoNotFound") == 0) return "repo_not_found";
        if (strcmp(x, "RevisionNotFound") == 0) return "revision_not_found";
        if (strcmp(x, "EntryNotFound") == 0) return "file_not_found";
        if (strcmp(x, "GatedRepo") == 0) return "unauthorized";
    }
    if (status == 408 || status == 429 || status >= 500) return NULL;
    if (status == 401 || status == 403) return "unauthorized";
    if (status == 404) return api ? "repo_not_found" : "file_not_found";
    return "hub_error";
}

const char *hub_error_hint(const char *code, bool sent_token) {
    if (!code || strcmp(code, "unauthorized") != 0) return "";
    return sent_token ? "; the hub refused the token: check that HF_TOKEN in modelprepd's "
                        "environment is valid and can read this repo (a gated repo needs its "
                        "terms accepted on the hub)"
                      : "; the hub wants a token: set HF_TOKEN in modelprepd's environment to "
                        "a token that can read this repo (a gated repo needs its terms "
                        "accepted on the hub)";
}

bool hub_normalize_etag(const char *in, char *out, size_t n) {
    if (!in || n < 65) return false;
    while (*in == ' ')
        in++;
    if (strncmp(in, "W/", 2) == 0) in += 2;
    size_t len = strlen(in);
    while (len > 0 && (in[len - 1] == ' ' || in[len - 1] == '\r' || in[len - 1] == '\n'))
        len--;
    if (len >= 2 && in[0] == '"' && in[len - 1] == '"') {
        in++;
        len -= 2;
    }
    if (len != 40 && len != 64) return false;
    memcpy(out, in, len);
    out[len] = 0;
    return hub_etag_valid(out);
}

int hub_parse_content_range(const char *v, uint64_t *first, uint64_t *last, uint64_t *total) {
    unsigned long long a, b, t;
    int used = 0;
    if (!v || sscanf(v, " bytes %llu-%llu/%llu%n", &a, &b, &t, &used) != 3) return -1;
    for (const char *c = v + used; *c; c++)
        if (!isspace((unsigned char)*c)) return -1;
    if (a > b || b >= t) return -1;
    *first = a;
    *last = b;
    *total = t;
    return 0;
}

double hub_backoff_s(int attempt, double base_s, uint64_t *seed) {
    if (base_s <= 0) base_s = 0.3;
    double d = base_s * ldexp(1.0, attempt > 20 ? 20 : attempt);
    if (d > 10) d = 10;
    /* xorshift64: no global state, seeded per download */
    uint64_t x = *seed ? *seed : 0x9e3779b97f4a7c15ull;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *seed = x;
    double jitter = (double)(x >> 11) / (double)(1ull << 53) * (base_s < 0.5 ? base_s : 0.5);
    return d + jitter;
}

int hub_url_quote(char *buf, size_t n, const char *s, bool keep_slash) {
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        bool plain = isalnum(*c) || *c == '-' || *c == '_' || *c == '.' || *c == '~' ||
                     (keep_slash && *c == '/');
        if (o + 4 > n) return -1;
        if (plain) {
            buf[o++] = (char)*c;
        } else {
            buf[o++] = '%';
            buf[o++] = hex[*c >> 4];
            buf[o++] = hex[*c & 15];
        }
    }
    if (o >= n) return -1;
    buf[o] = 0;
    return 0;
}

/* ---- listing JSON --------------------------------------------------------- */

static int parse_sibling(json_t *s, hub_file *f, mp_error *err) {
    json_t *name = json_object_get(s, "rfilename");
    if (!json_is_string(name)) return mp_err(err, "bad_response", "sibling without rfilename");
    const char *nm = json_string_value(name);
    size_t nlen = json_string_length(name);
    if (!hub_path_safe(nm, nlen))
        return mp_err(err, "unsafe_path",
                      "the hub listed a file path that would escape the cache: \"%.200s\"", nm);
    json_t *size = json_object_get(s, "size");
    json_t *lfs = json_object_get(s, "lfs");
    if (json_is_object(lfs)) {
        json_t *sha = json_object_get(lfs, "sha256");
        if (!json_is_string(sha)) sha = json_object_get(lfs, "oid");
        json_t *lsize = json_object_get(lfs, "size");
        if (!json_is_string(sha) || strlen(json_string_value(sha)) != 64 ||
            !hub_etag_valid(json_string_value(sha)))
            return mp_err(err, "bad_response", "bad lfs sha256 for %.200s", nm);
        if (json_is_integer(lsize)) size = lsize;
        memcpy(f->etag, json_string_value(sha), 65);
        memcpy(f->sha256, f->etag, 65);
        f->lfs = true;
    } else {
        json_t *blob = json_object_get(s, "blobId");
        if (!json_is_string(blob) || strlen(json_string_value(blob)) != 40 ||
            !hub_etag_valid(json_string_value(blob)))
            return mp_err(err, "bad_response", "no blobId for %.200s (is ?blobs=true supported?)",
                          nm);
        memcpy(f->etag, json_string_value(blob), 41);
    }
    if (!json_is_integer(size) || json_integer_value(size) < 0)
        return mp_err(err, "bad_response", "no size for %.200s", nm);
    f->size = (uint64_t)json_integer_value(size);
    f->name = strdup(nm);
    if (!f->name) return mp_err(err, "internal", "out of memory");
    return 0;
}

static int cmp_file(const void *a, const void *b) {
    return strcmp(((const hub_file *)a)->name, ((const hub_file *)b)->name);
}

int hub_parse_listing(const char *text, size_t len, hub_listing *out, mp_error *err) {
    memset(out, 0, sizeof *out);
    json_error_t jerr;
    json_t *doc = json_loadb(text, len, JSON_ALLOW_NUL, &jerr);
    if (!json_is_object(doc)) {
        json_decref(doc);
        return mp_err(err, "bad_response", "hub listing is not a JSON object");
    }
    int rc = -1;
    json_t *sha = json_object_get(doc, "sha");
    json_t *sib = json_object_get(doc, "siblings");
    if (!json_is_string(sha) || !hub_is_commit(json_string_value(sha))) {
        mp_err(err, "bad_response", "hub listing has no 40-hex commit sha");
        goto out;
    }
    if (!json_is_array(sib) || json_array_size(sib) > LISTING_MAX_FILES) {
        mp_err(err, "bad_response", "hub listing has no usable siblings array");
        goto out;
    }
    memcpy(out->commit, json_string_value(sha), 41);
    size_t n = json_array_size(sib);
    out->files = calloc(n ? n : 1, sizeof *out->files);
    if (!out->files) {
        mp_err(err, "internal", "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        if (!json_is_object(json_array_get(sib, i))) {
            mp_err(err, "bad_response", "sibling %zu is not an object", i);
            goto out;
        }
        if (parse_sibling(json_array_get(sib, i), &out->files[i], err) != 0) goto out;
        out->nfiles = i + 1;
    }
    qsort(out->files, out->nfiles, sizeof *out->files, cmp_file);
    for (size_t i = 1; i < out->nfiles; i++)
        if (strcmp(out->files[i - 1].name, out->files[i].name) == 0) {
            mp_err(err, "bad_response", "file %.200s listed twice", out->files[i].name);
            goto out;
        }
    rc = 0;
out:
    json_decref(doc);
    if (rc != 0) hub_listing_free(out);
    return rc;
}

/* ---- curl plumbing ---------------------------------------------------------- */

void hub_hdrs_reset(hub_hdrs *h) {
    memset(h, 0, sizeof *h);
    h->linked_size = -1;
}

static void copy_value(char *dst, size_t n, const char *v, size_t len) {
    while (len > 0 && (v[len - 1] == '\r' || v[len - 1] == '\n' || v[len - 1] == ' '))
        len--;
    if (len >= n) len = n - 1;
    memcpy(dst, v, len);
    dst[len] = 0;
}

size_t hub_header_cb(char *buf, size_t size, size_t n, void *arg) {
    hub_hdrs *h = arg;
    size_t len = size * n;
    if (len >= 5 && memcmp(buf, "HTTP/", 5) == 0) {
        hub_hdrs_reset(h);
        return len;
    }
    const char *colon = memchr(buf, ':', len);
    if (!colon) return len;
    size_t klen = (size_t)(colon - buf);
    const char *v = colon + 1;
    while (v < buf + len && (*v == ' ' || *v == '\t'))
        v++;
    size_t vlen = (size_t)(buf + len - v);
#define IS(name) (klen == sizeof(name) - 1 && strncasecmp(buf, name, klen) == 0)
    if (IS("X-Error-Code"))
        copy_value(h->x_error_code, sizeof h->x_error_code, v, vlen);
    else if (IS("Retry-After"))
        copy_value(h->retry_after, sizeof h->retry_after, v, vlen);
    else if (IS("X-Linked-Etag"))
        copy_value(h->linked_etag, sizeof h->linked_etag, v, vlen);
    else if (IS("ETag"))
        copy_value(h->etag, sizeof h->etag, v, vlen);
    else if (IS("X-Repo-Commit"))
        copy_value(h->repo_commit, sizeof h->repo_commit, v, vlen);
    else if (IS("Content-Range"))
        copy_value(h->content_range, sizeof h->content_range, v, vlen);
    else if (IS("X-Linked-Size")) {
        char tmp[32];
        copy_value(tmp, sizeof tmp, v, vlen);
        char *end;
        long long s = strtoll(tmp, &end, 10);
        if (*tmp && !*end && s >= 0) h->linked_size = s;
    }
#undef IS
    return len;
}

int hub_curl_setup(CURL *e, const hub_conn_opts *c, bool with_auth, struct curl_slist **list,
                   mp_error *err) {
    *list = NULL;
    struct curl_slist *l = curl_slist_append(NULL, "Accept-Encoding: identity");
    if (l && with_auth && c->token && *c->token) {
        for (const char *p = c->token; *p; p++)
            if ((unsigned char)*p < 0x20 || *p == 0x7f) {
                curl_slist_free_all(l);
                return mp_err(err, "bad_request", "HF token contains control characters");
            }
        char hdr[4200];
        int w = snprintf(hdr, sizeof hdr, "Authorization: Bearer %s", c->token);
        if (w < 0 || (size_t)w >= sizeof hdr) {
            curl_slist_free_all(l);
            return mp_err(err, "bad_request", "HF token too long");
        }
        struct curl_slist *l2 = curl_slist_append(l, hdr);
        if (!l2) {
            curl_slist_free_all(l);
            l = NULL;
        } else {
            l = l2;
        }
    }
    if (!l) return mp_err(err, "internal", "out of memory");
    *list = l;
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, l);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "modelprep/" MP_VERSION "; hf_hub-compatible");
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, 10000L);
    /* a stalled transfer (under 1 KiB/s for 30 s) is a connection error */
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, 1024L);
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, 30L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_MAXREDIRS, 10L);
    return 0;
}

bool hub_sleep_cancellable(double s, const hub_conn_opts *c) {
    while (s > 0) {
        if (c->cancel && c->cancel(c->cancel_arg)) return false;
        double step = s > 0.05 ? 0.05 : s;
        struct timespec ts = {(time_t)step, (long)((step - (double)(time_t)step) * 1e9)};
        nanosleep(&ts, NULL);
        s -= step;
    }
    return !(c->cancel && c->cancel(c->cancel_arg));
}

bool hub_same_origin(const char *a, const char *b) {
    CURLU *ua = curl_url(), *ub = curl_url();
    bool same = false;
    if (ua && ub && curl_url_set(ua, CURLUPART_URL, a, 0) == CURLUE_OK &&
        curl_url_set(ub, CURLUPART_URL, b, 0) == CURLUE_OK) {
        same = true;
        CURLUPart parts[] = {CURLUPART_SCHEME, CURLUPART_HOST, CURLUPART_PORT};
        for (size_t i = 0; i < 3 && same; i++) {
            char *x = NULL, *y = NULL;
            curl_url_get(ua, parts[i], &x, CURLU_DEFAULT_PORT);
            curl_url_get(ub, parts[i], &y, CURLU_DEFAULT_PORT);
            same = x && y && strcasecmp(x, y) == 0;
            curl_free(x);
            curl_free(y);
        }
    }
    curl_url_cleanup(ua);
    curl_url_cleanup(ub);
    return same;
}

/* ---- the listing request ----------------------------------------------------- */

typedef struct body_buf {
    char *p;
    size_t len, cap;
    bool too_big;
} body_buf;

static size_t body_cb(char *data, size_t size, size_t n, void *arg) {
    body_buf *b = arg;
    size_t len = size * n;
    if (b->len + len > LISTING_MAX_BYTES) {
        b->too_big = true;
        return 0;
    }
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 65536;
        while (cap < b->len + len + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return 0;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, len);
    b->len += len;
    b->p[b->len] = 0;
    return len;
}

int hub_fetch_listing(const hub_conn_opts *c, const char *repo, const char *revision,
                      hub_listing *out, mp_error *err) {
    char qrev[1024], url[4096];
    if (!hub_repo_id_valid(repo)) return mp_err(err, "bad_request", "invalid repo id");
    if (hub_url_quote(qrev, sizeof qrev, revision, false) != 0)
        return mp_err(err, "bad_request", "revision too long");
    int w = snprintf(url, sizeof url, "%s/api/models/%s/revision/%s?blobs=true", c->endpoint, repo,
                     qrev);
    if (w < 0 || (size_t)w >= sizeof url) return mp_err(err, "bad_request", "endpoint too long");
    uint64_t seed = (uint64_t)time(NULL) ^ ((uint64_t)(uintptr_t)out << 16);
    for (int attempt = 0;; attempt++) {
        CURL *e = curl_easy_init();
        if (!e) return mp_err(err, "internal", "curl_easy_init failed");
        struct curl_slist *hl = NULL;
        if (hub_curl_setup(e, c, true, &hl, err) != 0) {
            curl_easy_cleanup(e);
            return -1;
        }
        body_buf body = {0};
        hub_hdrs h;
        hub_hdrs_reset(&h);
        curl_easy_setopt(e, CURLOPT_URL, url);
        curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 1L);
        curl_easy_setopt(e, CURLOPT_TIMEOUT, 120L);
        curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, body_cb);
        curl_easy_setopt(e, CURLOPT_WRITEDATA, &body);
        curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, hub_header_cb);
        curl_easy_setopt(e, CURLOPT_HEADERDATA, &h);
        CURLcode cc = curl_easy_perform(e);
        long status = 0;
        curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
        curl_easy_cleanup(e);
        curl_slist_free_all(hl);
        double wait = -1;
        const char *fail_code = "network_error";
        char why[256];
        if (cc == CURLE_OK && status == 200) {
            int rc = hub_parse_listing(body.p ? body.p : "", body.len, out, err);
            free(body.p);
            return rc;
        }
        free(body.p);
        if (body.too_big)
            return mp_err(err, "bad_response", "hub listing over %u bytes", LISTING_MAX_BYTES);
        if (cc == CURLE_OK) {
            const char *code = hub_error_code(status, h.x_error_code, true);
            if (code)
                return mp_err(err, code, "%s@%s: hub answered HTTP %ld%s%s%s", repo, revision,
                              status, h.x_error_code[0] ? " " : "", h.x_error_code,
                              hub_error_hint(code, c->token && *c->token));
            fail_code = "hub_unavailable";
            snprintf(why, sizeof why, "HTTP %ld", status);
            wait = hub_parse_retry_after(h.retry_after[0] ? h.retry_after : NULL, time(NULL));
        } else if (cc == CURLE_URL_MALFORMAT || cc == CURLE_UNSUPPORTED_PROTOCOL) {
            return mp_err(err, "bad_request", "hub endpoint %s: %s", c->endpoint,
                          curl_easy_strerror(cc));
        } else {
            snprintf(why, sizeof why, "%s", curl_easy_strerror(cc));
        }
        if (attempt >= c->max_retries)
            return mp_err(err, fail_code, "listing %s@%s failed after %d attempts: %s", repo,
                          revision, attempt + 1, why);
        if (wait < 0) wait = hub_backoff_s(attempt, c->backoff_base_s, &seed);
        if (!hub_sleep_cancellable(wait, c)) return mp_err(err, "cancelled", "cancelled");
    }
}
