/* s3_ranged.c - warm_load straight from s3:// without holding the files:
 * the safetensors headers by ranged GETs (8 bytes, then the header), and a
 * reader the warm loader calls for each tensor's bytes (remote.h). The
 * loader plans, batches neighbours and stages exactly as for local files;
 * this file only turns "bytes [off, off+len) of file i" into one ranged GET
 * of exactly that range. */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/formats/safetensors/safetensors.h"
#include "loader/remote/remote_internal.h"

#define S3R_MAX_CONFIG (16u << 20)

typedef struct s3r_file {
    const s3_object *obj;
    mp_weights *w; /* until taken */
} s3r_file;

struct remote_s3_ranged {
    s3_client *s3;
    remote_callbacks cb; /* a copy: the reader outlives the caller's frame */
    char url[MREF_MAX_LEN + 8];
    char bucket[MREF_BUCKET_MAX + 1];
    s3_listing ls;
    s3r_file *files;
    size_t nfiles;
    json_t *config;
    size_t plen; /* the prefix's length with its '/' */
    atomic_uint_least64_t bytes;
};

static bool has_suffix(const char *s, const char *suf) {
    size_t n = strlen(s), m = strlen(suf);
    return n >= m && strcmp(s + n - m, suf) == 0;
}

static bool cancelled_cb(void *arg) {
    const remote_callbacks *cb = arg;
    return cb && cb->cancelled && cb->cancelled(cb->arg);
}

/* A weights table for an object: its header by two ranged GETs. */
static int read_header(remote_s3_ranged *r, const s3_object *obj, mp_weights **out, mp_error *err) {
    *out = NULL;
    unsigned char lenbuf[8];
    if (obj->size < 8)
        return mp_err(err, "truncated", "%s: %llu bytes, shorter than the 8-byte header length",
                      obj->key, (unsigned long long)obj->size);
    if (s3_get_bytes(r->s3, obj->key, 0, 8, obj->etag, lenbuf, err) != 0) return -1;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | lenbuf[i];
    if (n == 0 || n > ST_MAX_HEADER || n > obj->size - 8)
        return mp_err(err, "bad_header",
                      "%s: header length %llu does not fit the %llu-byte object (or 10^8)",
                      obj->key, (unsigned long long)n, (unsigned long long)obj->size);
    char *hdr = malloc(n);
    mp_weights *w = calloc(1, sizeof *w);
    int rc = hdr && w ? 0 : mp_err(err, "no_memory", "out of memory");
    if (rc == 0) {
        w->format = MP_FMT_SAFETENSORS;
        w->files = calloc(1, sizeof *w->files);
        w->fds = malloc(sizeof *w->fds);
        w->maps = calloc(1, sizeof *w->maps);
        if (!w->files || !w->fds || !w->maps ||
            !(w->files[0] = malloc(strlen(r->bucket) + strlen(obj->key) + 8)))
            rc = mp_err(err, "no_memory", "out of memory");
    }
    if (rc == 0) {
        w->nfiles = 1;
        w->fds[0] = -1; /* no descriptor: the loader reads through read_at */
        sprintf(w->files[0], "s3://%s/%s", r->bucket, obj->key);
        rc = s3_get_bytes(r->s3, obj->key, 8, n, obj->etag, hdr, err);
    }
    if (rc == 0 && st_parse_header(hdr, n, obj->size, w, err) != 0)
        rc = mp_err_wrap(err, NULL, "%s", obj->key);
    free(hdr);
    if (rc != 0) {
        weights_close(w);
        return -1;
    }
    *out = w;
    return 0;
}

static int read_config(remote_s3_ranged *r, const s3_object *obj, mp_error *err) {
    if (obj->size > S3R_MAX_CONFIG)
        return mp_err(err, "bad_model", "%s: %llu bytes is too large for a config", obj->key,
                      (unsigned long long)obj->size);
    char *b = malloc(obj->size + 1);
    if (!b) return mp_err(err, "no_memory", "out of memory");
    int rc = s3_get_bytes(r->s3, obj->key, 0, obj->size, obj->etag, b, err);
    if (rc == 0) {
        json_t *j = json_loadb(b, obj->size, 0, NULL);
        if (json_is_object(j))
            r->config = j;
        else
            json_decref(j); /* as a local load: an unreadable config is no config */
    }
    free(b);
    return rc;
}

/* The chosen objects: safetensors files into r->files (in listing order,
 * which S3 keeps sorted by key), config.json read. 1: nothing to range. */
static int pick_files(remote_s3_ranged *r, const remote_s3_ranged_opts *o, size_t plen,
                      mp_error *err) {
    size_t *sel = NULL, nsel = 0;
    s3_pick pick = {.src = o->src, .load_format = o->load_format};
    if (s3_choose(r->s3, &r->cb, &pick, &r->ls, plen, &sel, &nsel, err) != 0) return -1;
    r->files = calloc(nsel ? nsel : 1, sizeof *r->files);
    int rc = r->files ? 0 : mp_err(err, "no_memory", "out of memory");
    for (size_t i = 0; rc == 0 && i < nsel; i++) {
        const s3_object *obj = &r->ls.objs[sel[i]];
        const char *rel = obj->key + plen;
        if (has_suffix(rel, ".safetensors") && !strchr(rel, '/'))
            r->files[r->nfiles++].obj = obj;
        else if (strcmp(rel, "config.json") == 0)
            rc = read_config(r, obj, err);
    }
    free(sel);
    if (rc == 0 && r->nfiles == 0) return 1;
    return rc;
}

int remote_s3_ranged_open(const remote_s3_ranged_opts *o, const remote_callbacks *cb,
                          remote_s3_ranged **out, mp_error *err) {
    *out = NULL;
    if (!o->src || o->src->scheme != MREF_S3) return mp_err(err, "bad_param", "not an s3:// model");
    remote_s3_ranged *r = calloc(1, sizeof *r);
    if (!r) return mp_err(err, "no_memory", "out of memory");
    if (cb) r->cb = *cb;
    atomic_init(&r->bytes, 0);
    snprintf(r->url, sizeof r->url, "s3://%s/%s", o->src->bucket, o->src->prefix);
    snprintf(r->bucket, sizeof r->bucket, "%s", o->src->bucket);
    char prefix[MREF_MAX_LEN + 2];
    snprintf(prefix, sizeof prefix, "%s/", o->src->prefix);
    int rc = s3_client_new(&o->where, o->src->bucket, &r->s3, err);
    if (rc == 0) s3_client_set_cancel(r->s3, cancelled_cb, &r->cb);
    if (rc == 0) rc = s3_list(r->s3, prefix, &r->ls, err);
    r->plen = strlen(prefix);
    if (rc == 0) rc = pick_files(r, o, r->plen, err);
    for (size_t i = 0; rc == 0 && i < r->nfiles; i++) {
        rc = read_header(r, r->files[i].obj, &r->files[i].w, err);
        if (rc == 0 && stc_is_encrypted(r->files[i].w)) rc = 1; /* decrypted from whole files */
    }
    if (rc != 0) {
        remote_s3_ranged_free(r);
        return rc;
    }
    uint64_t total = 0;
    for (size_t i = 0; i < r->nfiles; i++)
        total += r->files[i].obj->size;
    remote_log(cb, "info", "%s: %zu safetensors file(s), %llu bytes, read by ranges", r->url,
               r->nfiles, (unsigned long long)total);
    *out = r;
    return 0;
}

size_t remote_s3_ranged_nfiles(const remote_s3_ranged *r) {
    return r->nfiles;
}

mp_weights *remote_s3_ranged_take(remote_s3_ranged *r, size_t i) {
    if (i >= r->nfiles) return NULL;
    mp_weights *w = r->files[i].w;
    r->files[i].w = NULL;
    return w;
}

json_t *remote_s3_ranged_config(const remote_s3_ranged *r) {
    return r->config;
}

int remote_s3_ranged_read(void *arg, uint32_t file, uint32_t part, uint64_t off, void *dst,
                          uint64_t len, mp_error *err) {
    remote_s3_ranged *r = arg;
    if (file >= r->nfiles || part != 0)
        return mp_err(err, "internal", "no remote file %u/%u", (unsigned)file, (unsigned)part);
    const s3_object *obj = r->files[file].obj;
    if (off > obj->size || len > obj->size - off)
        return mp_err(err, "bad_header", "%s: bytes %llu+%llu lie past the %llu-byte object",
                      obj->key, (unsigned long long)off, (unsigned long long)len,
                      (unsigned long long)obj->size);
    if (s3_get_bytes(r->s3, obj->key, off, len, obj->etag, dst, err) != 0) return -1;
    atomic_fetch_add(&r->bytes, len);
    return 0;
}

json_t *remote_s3_ranged_info(const remote_s3_ranged *r) {
    json_t *files = json_array();
    for (size_t i = 0; files && i < r->nfiles; i++)
        json_array_append_new(
            files, json_pack("{s:s,s:I,s:s}", "name", r->files[i].obj->key + r->plen, "size",
                             (json_int_t)r->files[i].obj->size, "etag", r->files[i].obj->etag));
    uint64_t req = 0, retries = 0;
    s3_client_counts(r->s3, &req, &retries);
    return json_pack("{s:s,s:s,s:o*,s:I,s:I,s:I}", "url", r->url, "mode", "ranged", "files", files,
                     "requests", (json_int_t)req, "retries", (json_int_t)retries, "bytes_fetched",
                     (json_int_t)atomic_load(&r->bytes));
}

void remote_s3_ranged_free(remote_s3_ranged *r) {
    if (!r) return;
    for (size_t i = 0; i < r->nfiles; i++)
        weights_close(r->files[i].w);
    free(r->files);
    json_decref(r->config);
    s3_listing_free(&r->ls);
    s3_client_free(r->s3);
    free(r);
}
