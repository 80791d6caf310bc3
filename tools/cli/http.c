/*
 * http.c - the client's requests to the REST API: one libcurl easy handle
 * per request (the client makes few), JSON in and out, bodies capped so a
 * broken server cannot make us buffer without bound, and a transport error
 * kept apart from an HTTP error: the first is exit status 3, the second is
 * the server's answer.
 */
#include <curl/curl.h>
#include <stdlib.h>
#include <string.h>

#include "tools/cli/cli.h"
#include "util/sbuf.h"

#define MAX_BODY (64u << 20)

int cli_client_init(cli_client *c, const char *url, const char *token) {
    memset(c, 0, sizeof *c);
    size_t n = strlen(url);
    while (n > 0 && url[n - 1] == '/')
        n--;
    c->base = strndup(url, n);
    if (!c->base) return -1;
    if (token && *token) {
        c->token = strdup(token);
        if (!c->token) return -1;
        snprintf(c->auth, sizeof c->auth, "Authorization: Bearer %s", c->token);
    }
    return 0;
}

void cli_client_free(cli_client *c) {
    free(c->base);
    free(c->token);
    c->base = c->token = NULL;
}

typedef struct body_buf {
    sbuf sb;
    bool too_big;
} body_buf;

static size_t on_body(char *p, size_t size, size_t n, void *arg) {
    body_buf *b = arg;
    size_t len = size * n;
    if (b->sb.len + len > MAX_BODY) {
        b->too_big = true;
        return 0; /* aborts the transfer */
    }
    sb_append(&b->sb, p, len);
    return b->sb.oom ? 0 : len;
}

int cli_request(cli_client *c, const char *method, const char *path, json_t *body, cli_resp *r) {
    memset(r, 0, sizeof *r);
    char *url = NULL, *text = NULL;
    if (asprintf(&url, "%s%s", c->base, path) < 0) {
        snprintf(r->error, sizeof r->error, "out of memory");
        return CLI_HTTP_BAD_BODY;
    }
    CURL *h = curl_easy_init();
    struct curl_slist *hdrs = NULL, *tmp;
    body_buf b = {0};
    int rc = CLI_HTTP_UNREACHABLE;
    if (!h) {
        snprintf(r->error, sizeof r->error, "cannot start libcurl");
        goto out;
    }
    if (c->token && (tmp = curl_slist_append(hdrs, c->auth))) hdrs = tmp;
    if ((tmp = curl_slist_append(hdrs, "Accept: application/json"))) hdrs = tmp;
    if (body) {
        text = json_dumps(body, JSON_COMPACT);
        if (!text) {
            snprintf(r->error, sizeof r->error, "out of memory");
            rc = CLI_HTTP_BAD_BODY;
            goto out;
        }
        if ((tmp = curl_slist_append(hdrs, "Content-Type: application/json"))) hdrs = tmp;
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, text);
    }
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 10L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT, 120L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    CURLcode cc = curl_easy_perform(h);
    if (b.too_big || b.sb.oom) {
        snprintf(r->error, sizeof r->error, "the server's answer to %s %s is too large", method,
                 path);
        rc = CLI_HTTP_BAD_BODY;
        goto out;
    }
    if (cc != CURLE_OK) {
        snprintf(r->error, sizeof r->error, "cannot reach %s: %s", c->base, curl_easy_strerror(cc));
        goto out;
    }
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r->status);
    rc = CLI_HTTP_OK;
    if (b.sb.len > 0) {
        json_error_t je;
        r->doc = json_loadb(b.sb.buf, b.sb.len, 0, &je);
        if (!r->doc) {
            snprintf(r->error, sizeof r->error,
                     "the server's answer to %s %s is not JSON (HTTP %ld): %s", method, path,
                     r->status, je.text);
            rc = CLI_HTTP_BAD_BODY;
        }
    }
out:
    sb_free(&b.sb);
    curl_slist_free_all(hdrs);
    if (h) curl_easy_cleanup(h);
    free(text);
    free(url);
    return rc;
}

void cli_resp_free(cli_resp *r) {
    json_decref(r->doc);
    r->doc = NULL;
}

void cli_problem_text(const cli_resp *r, char *out, size_t len) {
    const char *detail = json_string_value(json_object_get(r->doc, "detail"));
    if (!detail) detail = json_string_value(json_object_get(r->doc, "title"));
    int n = snprintf(out, len, "HTTP %ld%s%s", r->status, detail ? ": " : "", detail ? detail : "");
    json_t *errs = json_object_get(r->doc, "errors");
    size_t i;
    json_t *e;
    json_array_foreach(errs, i, e) {
        if (n < 0 || (size_t)n >= len) return;
        const char *f = json_string_value(json_object_get(e, "field"));
        const char *m = json_string_value(json_object_get(e, "message"));
        if (!m) m = json_string_value(json_object_get(e, "code"));
        n += snprintf(out + n, len - (size_t)n, "%s%s%s%s", i ? "; " : " (", f ? f : "",
                      f ? ": " : "", m ? m : "?");
        if (i + 1 == json_array_size(errs) && (size_t)n < len)
            n += snprintf(out + n, len - (size_t)n, ")");
    }
}

char *cli_escape(const char *s) {
    static const char hex[] = "0123456789ABCDEF";
    size_t n = strlen(s);
    char *out = malloc(3 * n + 1), *o = out;
    if (!out) return NULL;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
            strchr("-._~", *p)) {
            *o++ = (char)*p;
        } else {
            *o++ = '%';
            *o++ = hex[*p >> 4];
            *o++ = hex[*p & 15];
        }
    }
    *o = 0;
    return out;
}
