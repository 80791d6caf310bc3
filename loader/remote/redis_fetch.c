/* redis_fetch.c - a model in SGLang's Redis layout, made loadable by the
 * warm_load pipeline without a copy in the data dir: each rank's tensors
 * are read (SCAN {model}/keys/rank_{r}/..., then GETs) into one safetensors
 * file held in memory (a memfd), and a staging folder gets
 * model-rank-{r}-part-0.safetensors links to those memfds (/proc/self/fd)
 * plus the model's text files, so the folder loads as an ordinary
 * sharded_state checkpoint, rank r onto the device that serves rank r.
 *
 * Every value is checked before any of it is used: it must be a
 * safetensors file of exactly one tensor named "tensor_bytes" whose dtype,
 * shape and byte count agree, as SafeSerializer writes them; a key name
 * that is not a usable tensor name, a value of the wrong size, ranks beyond
 * tp_size or a rank with no keys fail the job with a message that says
 * what to publish instead. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loader/formats/safetensors/safetensors.h"
#include "loader/remote/remote_internal.h"
#include "util/fsutil.h"

#define RF_HEAD_PROBE 4096 /* bytes of a value read to parse its header */
#define RF_MAX_FILE (64u << 20)

typedef struct rf_tensor {
    char *key;
    const char *name; /* inside key, after the rank prefix */
    mp_dtype dtype;
    int ndim;
    int64_t shape[MP_MAX_DIMS];
    uint64_t hdr_len; /* 8 + N of the value */
    uint64_t nbytes;
    uint64_t offset; /* in the rank file's data section */
} rf_tensor;

typedef struct rf_rank {
    rf_tensor *t;
    size_t n, cap;
    int fd;
    uint64_t data_start;
    const remote_callbacks *cb;
    uint64_t *done, total;
} rf_rank;

static int collect(void *arg, const char *key, size_t len) {
    rf_rank *r = arg;
    if (r->n == r->cap) {
        size_t nc = r->cap ? r->cap * 2 : 256;
        rf_tensor *nt = realloc(r->t, nc * sizeof *nt);
        if (!nt) return 1;
        r->t = nt;
        r->cap = nc;
    }
    memset(&r->t[r->n], 0, sizeof r->t[r->n]);
    if (!(r->t[r->n].key = strndup(key, len))) return 1;
    r->n++;
    return 0;
}

static int cmp_key(const void *a, const void *b) {
    return strcmp(((const rf_tensor *)a)->key, ((const rf_tensor *)b)->key);
}

/* The header of SGLang's SafeSerializer output, from the first bytes. */
static int parse_head(void *arg, size_t i, const rkv_val *v, mp_error *err) {
    rf_rank *r = arg;
    rf_tensor *t = &r->t[i];
    if (v->kind != 's' || v->len < 8)
        return mp_err(err, "bad_model", "%s: not a safetensors value", t->key);
    const unsigned char *p = (const unsigned char *)v->s;
    uint64_t n = 0;
    for (int k = 7; k >= 0; k--)
        n = (n << 8) | p[k];
    if (n < 2 || n > RF_HEAD_PROBE - 8 || 8 + n > v->len)
        return mp_err(err, "bad_model", "%s: header length %llu is not a one-tensor header", t->key,
                      (unsigned long long)n);
    json_error_t je;
    json_t *h = json_loadb(v->s + 8, n, JSON_REJECT_DUPLICATES, &je);
    json_t *e = json_object_get(h, "tensor_bytes");
    size_t keys = json_object_size(h) - (json_object_get(h, "__metadata__") ? 1 : 0);
    const char *dt = json_string_value(json_object_get(e, "dtype"));
    json_t *shape = json_object_get(e, "shape"), *offs = json_object_get(e, "data_offsets");
    int rc = 0;
    if (!json_is_object(h) || keys != 1 || !json_is_object(e) || !dt || !json_is_array(shape) ||
        json_array_size(shape) > MP_MAX_DIMS || !json_is_array(offs) ||
        json_array_size(offs) != 2 || json_integer_value(json_array_get(offs, 0)) != 0 ||
        !json_is_integer(json_array_get(offs, 1))) {
        rc = mp_err(err, "bad_model",
                    "%s: the value is not safetensors of {\"tensor_bytes\": tensor} as SGLang's "
                    "RedisConnector writes it",
                    t->key);
    } else if ((t->dtype = mp_dtype_from_name(dt)) == MP_DT_INVALID) {
        rc = mp_err(err, "bad_model", "%s: unknown dtype", t->key);
    } else {
        t->ndim = (int)json_array_size(shape);
        for (int d = 0; d < t->ndim && rc == 0; d++) {
            json_t *x = json_array_get(shape, (size_t)d);
            if (!json_is_integer(x) || json_integer_value(x) < 0)
                rc = mp_err(err, "bad_model", "%s: bad shape", t->key);
            else
                t->shape[d] = json_integer_value(x);
        }
        uint64_t want = 0;
        if (rc == 0 && (!mp_tensor_bytes(t->dtype, t->shape, t->ndim, &want) ||
                        (uint64_t)json_integer_value(json_array_get(offs, 1)) != want))
            rc = mp_err(err, "bad_model", "%s: data_offsets do not match dtype and shape", t->key);
        t->nbytes = want;
        t->hdr_len = 8 + n;
    }
    json_decref(h);
    return rc;
}

static int check_len(void *arg, size_t i, const rkv_val *v, mp_error *err) {
    rf_rank *r = arg;
    rf_tensor *t = &r->t[i];
    if (v->kind != 'i' || v->n < 0 || (uint64_t)v->n != t->hdr_len + t->nbytes)
        return mp_err(err, "bad_model",
                      "%s: %lld bytes, expected %llu (a truncated or changed "
                      "value)",
                      t->key, v->kind == 'i' ? v->n : -1LL,
                      (unsigned long long)(t->hdr_len + t->nbytes));
    return 0;
}

static int put_data(void *arg, size_t i, const rkv_val *v, mp_error *err) {
    rf_rank *r = arg;
    rf_tensor *t = &r->t[i];
    /* the value may have been replaced since its header was read */
    if (v->kind != 's' || v->len != t->hdr_len + t->nbytes)
        return mp_err(err, "changed_during_download", "%s changed while it was read", t->key);
    const char *p = v->s + t->hdr_len;
    uint64_t left = t->nbytes, off = r->data_start + t->offset;
    while (left > 0) {
        ssize_t w = pwrite(r->fd, p, left, (off_t)off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0)
            return mp_err(err, "io_error", "staging %s in memory: %s", t->key, strerror(errno));
        p += w;
        off += (uint64_t)w;
        left -= (uint64_t)w;
    }
    *r->done += t->nbytes;
    if (r->cb && r->cb->progress &&
        r->cb->progress(r->cb->arg, *r->done, r->total, "reading from redis"))
        return mp_err(err, "cancelled", "cancelled");
    return 0;
}

/* Writes the rank file's header (tensors in key order, data packed). */
static int write_header(rf_rank *r, mp_error *err) {
    json_t *h = json_object();
    uint64_t off = 0;
    for (size_t i = 0; h && i < r->n; i++) {
        rf_tensor *t = &r->t[i];
        json_t *shape = json_array();
        for (int d = 0; d < t->ndim; d++)
            json_array_append_new(shape, json_integer(t->shape[d]));
        t->offset = off;
        json_object_set_new(h, t->name,
                            json_pack("{s:s,s:o,s:[I,I]}", "dtype", mp_dtype_name(t->dtype),
                                      "shape", shape, "data_offsets", (json_int_t)off,
                                      (json_int_t)(off + t->nbytes)));
        off += t->nbytes;
    }
    char *text = h ? json_dumps(h, JSON_COMPACT) : NULL;
    json_decref(h);
    if (!text) return mp_err(err, "no_memory", "out of memory");
    size_t n = strlen(text), padded = (n + 7) / 8 * 8;
    unsigned char len8[8];
    for (int k = 0; k < 8; k++)
        len8[k] = (unsigned char)((padded >> (8 * k)) & 0xff);
    char pad[8] = "        ";
    int rc = 0;
    if (pwrite(r->fd, len8, 8, 0) != 8 || pwrite(r->fd, text, n, 8) != (ssize_t)n ||
        (padded > n && pwrite(r->fd, pad, padded - n, (off_t)(8 + n)) != (ssize_t)(padded - n)) ||
        ftruncate(r->fd, (off_t)(8 + padded + off)) != 0)
        rc = mp_err(err, "io_error", "staging a rank in memory: %s", strerror(errno));
    free(text);
    r->data_start = 8 + padded;
    return rc;
}

static void rank_free(rf_rank *r) {
    for (size_t i = 0; i < r->n; i++)
        free(r->t[i].key);
    free(r->t);
    memset(r, 0, sizeof *r);
}

static int exists_cb(void *arg, const char *key, size_t len) {
    (void)key;
    (void)len;
    *(bool *)arg = true;
    return 1;
}

static int stage_rank(rkv_conn *kv, const char *model, int rank, const char *dir,
                      const remote_callbacks *cb, uint64_t *done, int *fd_out, json_t *ranks,
                      mp_error *err) {
    rf_rank r = {.fd = -1, .cb = cb, .done = done};
    char prefix[MREF_MAX_LEN + 32], pattern[sizeof prefix + 2];
    snprintf(prefix, sizeof prefix, "%s/keys/rank_%d/", model, rank);
    snprintf(pattern, sizeof pattern, "%s*", prefix);
    int rc = rkv_scan(kv, pattern, collect, &r, err);
    if (rc > 0) rc = mp_err(err, "no_memory", "out of memory listing %s", pattern);
    if (rc == 0 && r.n == 0)
        rc = mp_err(err, "not_found",
                    "redis has no keys %s: publish the model with tp_size >= %d first", pattern,
                    rank + 1);
    if (rc == 0) qsort(r.t, r.n, sizeof *r.t, cmp_key);
    for (size_t i = 0; rc == 0 && i < r.n; i++) {
        r.t[i].name = r.t[i].key + strlen(prefix);
        size_t nl = strlen(r.t[i].name);
        if (nl == 0 || nl >= TP_NAME_MAX || strcmp(r.t[i].name, "__metadata__") == 0)
            rc = mp_err(err, "bad_model", "%s is not a usable parameter name", r.t[i].key);
        for (size_t k = 0; rc == 0 && k < nl; k++)
            if ((unsigned char)r.t[i].name[k] < 0x20)
                rc = mp_err(err, "bad_model", "%s is not a usable parameter name", r.t[i].key);
    }
    char **keys = rc == 0 ? calloc(r.n, sizeof *keys) : NULL;
    if (rc == 0 && !keys) rc = mp_err(err, "no_memory", "out of memory");
    for (size_t i = 0; rc == 0 && i < r.n; i++)
        keys[i] = r.t[i].key;
    const char *range[2] = {"0", "4095"};
    if (rc == 0) rc = rkv_each(kv, "GETRANGE", keys, r.n, 2, range, parse_head, &r, err);
    if (rc == 0) rc = rkv_each(kv, "STRLEN", keys, r.n, 0, NULL, check_len, &r, err);
    char name[64];
    snprintf(name, sizeof name, "modelprep-rank-%d", rank);
    if (rc == 0 && (r.fd = memfd_create(name, MFD_CLOEXEC)) < 0)
        rc = mp_err(err, "io_error", "memfd_create: %s", strerror(errno));
    if (rc == 0) rc = write_header(&r, err);
    uint64_t bytes = 0;
    for (size_t i = 0; i < r.n; i++)
        bytes += r.t[i].nbytes;
    if (rc == 0) rc = rkv_each(kv, "GET", keys, r.n, 0, NULL, put_data, &r, err);
    char link[PATH_MAX], target[64];
    snprintf(link, sizeof link, "%s/model-rank-%d-part-0.safetensors", dir, rank);
    snprintf(target, sizeof target, "/proc/self/fd/%d", r.fd);
    if (rc == 0 && symlink(target, link) != 0)
        rc = mp_err(err, "io_error", "%s: %s", link, strerror(errno));
    if (rc == 0)
        json_array_append_new(ranks, json_pack("{s:i,s:I,s:I}", "rank", rank, "tensors",
                                               (json_int_t)r.n, "bytes", (json_int_t)bytes));
    free(keys);
    *fd_out = r.fd;
    if (rc != 0 && r.fd >= 0) {
        close(r.fd);
        *fd_out = -1;
    }
    rank_free(&r);
    return rc;
}

typedef struct rf_files {
    char **keys;
    size_t n, cap;
    const char *dir;
    size_t plen;
} rf_files;

static int collect_file(void *arg, const char *key, size_t len) {
    rf_files *f = arg;
    if (f->n == f->cap) {
        size_t nc = f->cap ? f->cap * 2 : 16;
        char **nk = realloc(f->keys, nc * sizeof *nk);
        if (!nk) return 1;
        f->keys = nk;
        f->cap = nc;
    }
    if (!(f->keys[f->n] = strndup(key, len))) return 1;
    f->n++;
    return 0;
}

static int put_file(void *arg, size_t i, const rkv_val *v, mp_error *err) {
    rf_files *f = arg;
    const char *base = f->keys[i] + f->plen;
    /* a name SGLang would write as a path is not taken as one here */
    if (!st_plain_file_name(base) || base[0] == '.' || v->kind != 's' || v->len > RF_MAX_FILE)
        return 0;
    char p[PATH_MAX];
    if (snprintf(p, sizeof p, "%s/%s", f->dir, base) >= (int)sizeof p) return 0;
    return fs_write_atomic(p, v->s, v->len, err);
}

int remote_redis_stage(const mref_remote *src, const char *password, int tp, const char *dir,
                       double timeout_s, const remote_callbacks *cb, int *fds, json_t **info,
                       mp_error *err) {
    *info = NULL;
    for (int r = 0; r < tp; r++)
        fds[r] = -1;
    if (!src || src->scheme != MREF_REDIS) return mp_err(err, "bad_param", "not a redis:// model");
    rkv_conn *kv = NULL;
    const char *pw = src->has_password ? src->password : password;
    if (rkv_connect(src->host, src->port, src->user, pw, timeout_s, &kv, err) != 0) return -1;
    json_t *ranks = json_array();
    rf_files files = {.dir = dir};
    int rc = fs_mkdirs(dir, err);
    /* a model published for more ranks is a different split */
    char pattern[MREF_MAX_LEN + 40];
    bool more = false;
    snprintf(pattern, sizeof pattern, "%s/keys/rank_%d/*", src->model_name, tp);
    if (rc == 0 && rkv_scan(kv, pattern, exists_cb, &more, err) < 0) rc = -1;
    if (rc == 0 && more)
        rc = mp_err(err, "bad_request",
                    "%s was published for more than tp_size %d ranks; load it with its own "
                    "tp_size",
                    src->model_name, tp);
    uint64_t done = 0;
    for (int r = 0; rc == 0 && r < tp; r++)
        rc = stage_rank(kv, src->model_name, r, dir, cb, &done, &fds[r], ranks, err);
    snprintf(pattern, sizeof pattern, "%s/files/*", src->model_name);
    files.plen = strlen(pattern) - 1;
    if (rc == 0) {
        int s = rkv_scan(kv, pattern, collect_file, &files, err);
        if (s > 0) rc = mp_err(err, "no_memory", "out of memory");
        if (s < 0) rc = -1;
    }
    if (rc == 0) rc = rkv_each(kv, "GET", files.keys, files.n, 0, NULL, put_file, &files, err);
    for (size_t i = 0; i < files.n; i++)
        free(files.keys[i]);
    free(files.keys);
    rkv_close(kv);
    if (rc != 0) {
        remote_redis_unstage(dir, fds, tp);
        json_decref(ranks);
        return -1;
    }
    *info = ranks;
    return 0;
}

void remote_redis_unstage(const char *dir, int *fds, int n) {
    for (int r = 0; r < n; r++) {
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s/model-rank-%d-part-0.safetensors", dir, r);
        unlink(p);
        if (fds[r] >= 0) close(fds[r]);
        fds[r] = -1;
    }
    /* the text files: nothing else is in the folder, and no sub-folders */
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
            char p[PATH_MAX];
            if (snprintf(p, sizeof p, "%s/%s", dir, e->d_name) < (int)sizeof p) unlink(p);
        }
        closedir(d);
    }
    rmdir(dir);
}
