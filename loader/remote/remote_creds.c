/* remote_creds.c - where S3 credentials come from: an AWS shared
 * credentials file named by --s3-credentials-file, else the AWS_*
 * environment variables the AWS CLI and boto3 read. Secrets are copied into
 * fixed buffers, never into messages, and wiped when the job is done. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/remote/remote.h"
#include "util/fsutil.h"

#define CREDS_MAX_FILE (256u << 10)

static void trim(char **s, char **e) {
    while (*s < *e && isspace((unsigned char)**s))
        (*s)++;
    while (*e > *s && isspace((unsigned char)(*e)[-1]))
        (*e)--;
}

/* Copies a value that must be printable ASCII without spaces (a header
 * value must not smuggle a CR/LF into a request). */
static int put_value(char *dst, size_t cap, const char *s, size_t n, const char *what,
                     mp_error *err) {
    if (n == 0 || n >= cap) return mp_err(err, "bad_credentials", "%s is empty or too long", what);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] <= ' ' || (unsigned char)s[i] >= 0x7f)
            return mp_err(err, "bad_credentials", "%s has characters a credential cannot have",
                          what);
    memcpy(dst, s, n);
    dst[n] = 0;
    return 0;
}

static int from_file(const char *file, remote_s3_creds *out, mp_error *err) {
    char *text = NULL;
    size_t len = 0;
    if (fs_read_all(file, CREDS_MAX_FILE, &text, &len, err) != 0)
        return mp_err_wrap(err, "bad_credentials", "s3 credentials file");
    const char *profile = getenv("AWS_PROFILE");
    if (!profile || !*profile) profile = "default";
    bool in = false, seen = false;
    int rc = 0;
    char *line = text;
    while (rc == 0 && line && *line) {
        char *nl = strchr(line, '\n');
        char *s = line, *e = nl ? nl : line + strlen(line);
        line = nl ? nl + 1 : NULL;
        trim(&s, &e);
        if (s == e || *s == '#' || *s == ';') continue;
        if (*s == '[') {
            char *ps = s + 1, *pe = e[-1] == ']' ? e - 1 : e;
            trim(&ps, &pe);
            /* ~/.aws/config spells it "[profile name]" */
            if ((size_t)(pe - ps) > 8 && strncmp(ps, "profile ", 8) == 0) ps += 8;
            trim(&ps, &pe);
            in = strlen(profile) == (size_t)(pe - ps) &&
                 strncmp(ps, profile, (size_t)(pe - ps)) == 0;
            seen |= in;
            continue;
        }
        if (!in) continue;
        char *eq = memchr(s, '=', (size_t)(e - s));
        if (!eq) continue;
        char *ks = s, *ke = eq, *vs = eq + 1, *ve = e;
        trim(&ks, &ke);
        trim(&vs, &ve);
        size_t kl = (size_t)(ke - ks), vl = (size_t)(ve - vs);
#define KEY(k) (kl == strlen(k) && strncmp(ks, k, kl) == 0)
        if (KEY("aws_access_key_id"))
            rc = put_value(out->access_key, sizeof out->access_key, vs, vl, "aws_access_key_id",
                           err);
        else if (KEY("aws_secret_access_key"))
            rc = put_value(out->secret_key, sizeof out->secret_key, vs, vl, "aws_secret_access_key",
                           err);
        else if (KEY("aws_session_token"))
            rc = put_value(out->session_token, sizeof out->session_token, vs, vl,
                           "aws_session_token", err);
        else if (KEY("region"))
            rc = put_value(out->region, sizeof out->region, vs, vl, "region", err);
#undef KEY
    }
    /* the text held the secret too */
    memset(text, 0, len);
    free(text);
    if (rc != 0) return -1;
    if (!seen)
        return mp_err(err, "bad_credentials", "no [%s] profile in the credentials file", profile);
    if (!out->access_key[0] || !out->secret_key[0])
        return mp_err(err, "bad_credentials",
                      "the [%s] profile needs aws_access_key_id and aws_secret_access_key",
                      profile);
    return 0;
}

static int from_env(const char *name, char *dst, size_t cap, mp_error *err) {
    const char *v = getenv(name);
    if (!v || !*v) return 0;
    return put_value(dst, cap, v, strlen(v), name, err);
}

int remote_s3_creds_load(const char *file, remote_s3_creds *out, mp_error *err) {
    memset(out, 0, sizeof *out);
    int rc = 0;
    if (file)
        rc = from_file(file, out, err);
    else if (from_env("AWS_ACCESS_KEY_ID", out->access_key, sizeof out->access_key, err) != 0 ||
             from_env("AWS_SECRET_ACCESS_KEY", out->secret_key, sizeof out->secret_key, err) != 0 ||
             from_env("AWS_SESSION_TOKEN", out->session_token, sizeof out->session_token, err) != 0)
        rc = -1;
    if (rc == 0 && !out->region[0] &&
        (from_env("AWS_REGION", out->region, sizeof out->region, err) != 0 ||
         (!out->region[0] &&
          from_env("AWS_DEFAULT_REGION", out->region, sizeof out->region, err) != 0)))
        rc = -1;
    if (rc == 0 && !out->region[0]) snprintf(out->region, sizeof out->region, "us-east-1");
    if (rc == 0 && (!out->access_key[0]) != (!out->secret_key[0]))
        rc = mp_err(err, "bad_credentials",
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together");
    if (rc == 0)
        for (const char *p = out->region; *p; p++)
            if (!(isalnum((unsigned char)*p) || *p == '-'))
                rc = mp_err(err, "bad_credentials", "the region is not a region name");
    if (rc != 0) remote_s3_creds_clear(out);
    return rc;
}

void remote_s3_creds_clear(remote_s3_creds *c) {
    /* volatile so the wipe is not optimized away */
    volatile unsigned char *p = (volatile unsigned char *)c;
    for (size_t i = 0; i < sizeof *c; i++)
        p[i] = 0;
}

bool remote_s3_virtual(const char *param, const char *server_style, const char *endpoint) {
    const char *style = param && *param ? param : server_style;
    if (style && !strcmp(style, "virtual")) return true;
    if (style && !strcmp(style, "path")) return false;
    return !endpoint || !*endpoint;
}

bool remote_endpoint_valid(const char *s) {
    if (!s) return false;
    const char *h;
    if (strncmp(s, "http://", 7) == 0)
        h = s + 7;
    else if (strncmp(s, "https://", 8) == 0)
        h = s + 8;
    else
        return false;
    size_t n = strlen(h);
    while (n > 0 && h[n - 1] == '/')
        n--;
    if (n == 0 || n > 512) return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)h[i];
        if (!(isalnum(c) || c == '.' || c == '-' || c == ':' || c == '[' || c == ']')) return false;
    }
    return true;
}
