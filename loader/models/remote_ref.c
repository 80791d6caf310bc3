/* remote_ref.c - what an s3:// or redis:// model reference may say (see
 * models.h). These strings come straight from HTTP requests and end up as
 * local directory names, object keys and Redis SCAN patterns, so the
 * accepted alphabet is deliberately narrow: anything else is a 400 at
 * submit, not a surprise in a path join or a glob. */
#include "loader/models/models.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

bool mref_is_remote(const char *s) {
    return s && (strncmp(s, "s3://", 5) == 0 || strncmp(s, "redis://", 8) == 0);
}

/* S3's bucket naming rules (the strict, virtual-host-safe subset). */
static bool bucket_ok(const char *s, size_t n) {
    if (n < 3 || n > MREF_BUCKET_MAX) return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!(islower(c) || isdigit(c) || c == '.' || c == '-')) return false;
        if (i + 1 < n && c == '.' && s[i + 1] == '.') return false;
    }
    return isalnum((unsigned char)s[0]) && isalnum((unsigned char)s[n - 1]);
}

/* One key/name component: no glob characters (Redis SCAN MATCH), no
 * separators, not "." or "..", printable ASCII from a safe set. */
static bool component_ok(const char *s, size_t n) {
    if (n == 0 || n > 255) return false;
    if ((n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.')) return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!(isalnum(c) || strchr("._-+=,@~", c))) return false;
    }
    return true;
}

/* A '/'-separated path of good components (trailing '/'s dropped). */
static bool path_ok(const char *s, size_t n, char *out, size_t outn) {
    while (n > 0 && s[n - 1] == '/')
        n--;
    if (n == 0 || n >= outn) return false;
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i == n || s[i] == '/') {
            if (!component_ok(s + start, i - start)) return false;
            start = i + 1;
        }
    }
    memcpy(out, s, n);
    out[n] = 0;
    return true;
}

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    c = tolower(c);
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* Percent-decodes userinfo as urlparse + redis-py's unquote do. */
static bool unquote(const char *s, size_t n, char *out, size_t outn) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)s[i];
        if (c == '%') {
            if (i + 2 >= n) return false;
            int h = hexval((unsigned char)s[i + 1]), l = hexval((unsigned char)s[i + 2]);
            if (h < 0 || l < 0) return false;
            c = h * 16 + l;
            i += 2;
        }
        if (c == 0 || k + 1 >= outn) return false;
        out[k++] = (char)c;
    }
    out[k] = 0;
    return true;
}

static bool host_ok(const char *s, size_t n) {
    if (n == 0 || n > MREF_HOST_MAX) return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!(isalnum(c) || c == '.' || c == '-' || c == ':')) return false;
    }
    return true;
}

static int parse_s3(const char *s, const char *field, mref_remote *out, mp_error *err) {
    const char *b = s + 5, *slash = strchr(b, '/');
    if (!slash || !bucket_ok(b, (size_t)(slash - b)))
        return mp_err_field(err, field, "bad_model",
                            "%s: expected s3://bucket/prefix with an S3 bucket name (3-63 "
                            "characters of a-z 0-9 . -)",
                            field);
    memcpy(out->bucket, b, (size_t)(slash - b));
    out->bucket[slash - b] = 0;
    if (!path_ok(slash + 1, strlen(slash + 1), out->prefix, sizeof out->prefix))
        return mp_err_field(err, field, "bad_model",
                            "%s: the s3 prefix must be non-empty, '/'-separated names of "
                            "A-Z a-z 0-9 . _ - + = , @ ~ (no '.' or '..' parts, no '//')",
                            field);
    out->scheme = MREF_S3;
    return 0;
}

static int parse_redis(const char *s, bool allow_secrets, const char *field, mref_remote *out,
                       mp_error *err) {
    const char *auth = s + 8, *path = strchr(auth, '/');
    if (!path)
        return mp_err_field(err, field, "bad_model", "%s: expected redis://host[:port]/model_name",
                            field);
    const char *at = memchr(auth, '@', (size_t)(path - auth));
    const char *host = auth;
    if (at) {
        if (!allow_secrets)
            return mp_err_field(err, field, "bad_model",
                                "%s: no credentials in a model string (it is logged and "
                                "listed); use --redis-password-file",
                                field);
        const char *colon = memchr(auth, ':', (size_t)(at - auth));
        const char *uend = colon ? colon : at;
        if (!unquote(auth, (size_t)(uend - auth), out->user, sizeof out->user) ||
            (colon &&
             !unquote(colon + 1, (size_t)(at - colon - 1), out->password, sizeof out->password)))
            return mp_err_field(err, field, "bad_model", "%s: bad user or password", field);
        out->has_password = colon != NULL;
        host = at + 1;
    }
    const char *hend = path, *port = NULL;
    if (*host == '[') {
        const char *rb = memchr(host, ']', (size_t)(path - host));
        if (!rb) return mp_err_field(err, field, "bad_model", "%s: bad IPv6 host", field);
        if (rb + 1 < path) {
            if (rb[1] != ':') return mp_err_field(err, field, "bad_model", "%s: bad host", field);
            port = rb + 2;
        }
        host++;
        hend = rb;
    } else {
        const char *colon = memchr(host, ':', (size_t)(path - host));
        if (colon) {
            hend = colon;
            port = colon + 1;
        }
    }
    if (!host_ok(host, (size_t)(hend - host)))
        return mp_err_field(err, field, "bad_model", "%s: bad host name", field);
    memcpy(out->host, host, (size_t)(hend - host));
    out->host[hend - host] = 0;
    out->port = 6379;
    if (port) {
        long v = 0;
        if (port == path) return mp_err_field(err, field, "bad_model", "%s: empty port", field);
        for (const char *p = port; p < path; p++) {
            if (!isdigit((unsigned char)*p) || v > 65535)
                return mp_err_field(err, field, "bad_model", "%s: bad port", field);
            v = v * 10 + (*p - '0');
        }
        if (v < 1 || v > 65535) return mp_err_field(err, field, "bad_model", "%s: bad port", field);
        out->port = (int)v;
    }
    if (!path_ok(path + 1, strlen(path + 1), out->model_name, sizeof out->model_name))
        return mp_err_field(err, field, "bad_model",
                            "%s: the model name after host:port/ must be '/'-separated names of "
                            "A-Z a-z 0-9 . _ - + = , @ ~",
                            field);
    out->scheme = MREF_REDIS;
    return 0;
}

int mref_remote_parse(const char *s, size_t len, bool allow_secrets, const char *field,
                      mref_remote *out, mp_error *err) {
    memset(out, 0, sizeof *out);
    if (!s || len != strlen(s))
        return mp_err_field(err, field, "bad_model", "%s contains a NUL byte", field);
    if (len > MREF_MAX_LEN)
        return mp_err_field(err, field, "bad_model", "%s is over %d bytes", field, MREF_MAX_LEN);
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] <= ' ' || (unsigned char)s[i] >= 0x7f)
            return mp_err_field(err, field, "bad_model",
                                "%s: spaces, control and non-ASCII characters are not allowed",
                                field);
    if (strchr(s, '?') || strchr(s, '#'))
        return mp_err_field(err, field, "bad_model", "%s: no query or fragment", field);
    if (strncmp(s, "s3://", 5) == 0) return parse_s3(s, field, out, err);
    if (strncmp(s, "redis://", 8) == 0) return parse_redis(s, allow_secrets, field, out, err);
    return mp_err_field(err, field, "bad_model", "%s: expected s3:// or redis://", field);
}

int mref_remote_local_dir(const char *data_dir, const mref_remote *r, char *buf, size_t n,
                          mp_error *err) {
    if (r->scheme != MREF_S3)
        return mp_err(err, "bad_model", "only s3:// models have a local copy");
    int k = snprintf(buf, n, "%s/remote/s3/%s/%s", data_dir, r->bucket, r->prefix);
    if (k < 0 || (size_t)k >= n) return mp_err(err, "bad_model", "local path too long");
    return 0;
}

int mref_remote_resolve(const char *model, size_t len, const char *data_dir, mref_remote *out,
                        char **local, mp_error *err) {
    *local = NULL;
    if (mref_remote_parse(model, len, false, "model", out, err) != 0) return -1;
    if (out->scheme != MREF_S3 || !data_dir) return 0;
    char dir[PATH_MAX];
    if (mref_remote_local_dir(data_dir, out, dir, sizeof dir, err) != 0) {
        snprintf(err->field, sizeof err->field, "model");
        return -1;
    }
    struct stat st;
    if (stat(dir, &st) == 0 && S_ISDIR(st.st_mode)) *local = realpath(dir, NULL);
    return 0;
}
