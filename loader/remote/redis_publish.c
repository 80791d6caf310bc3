/* redis_publish.c - a local model into Redis in exactly the layout SGLang's
 * RemoteModelLoader reads (--load-format remote --model-path
 * redis://host:port/model_name): per tensor-parallel rank, one key per
 * parameter holding safetensors.torch.save({"tensor_bytes": t}), plus the
 * model's text files under {model_name}/files/. The per-rank tensors and
 * their names come from the same split rules as the shard job
 * (loader/tp_rules), so what rank r reads is what ShardedStateLoader would
 * have in rank r's files.
 *
 * Readers never see a half-written model: everything goes under a staging
 * prefix first and is swapped in with one MULTI/EXEC at the end. */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loader/formats/weights.h"
#include "loader/remote/remote_internal.h"
#include "util/fsutil.h"

#define RP_MAX_FILE (64u << 20) /* a config/tokenizer file larger than this is not text */
#define RP_MAX_DEPTH 8

typedef struct strvec {
    char **v;
    size_t n, cap;
} strvec;

static int sv_push(strvec *s, const char *p, size_t n, mp_error *err) {
    if (s->n == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 64;
        char **nv = realloc(s->v, nc * sizeof *nv);
        if (!nv) return mp_err(err, "no_memory", "out of memory");
        s->v = nv;
        s->cap = nc;
    }
    if (!(s->v[s->n] = strndup(p, n))) return mp_err(err, "no_memory", "out of memory");
    s->n++;
    return 0;
}

static void sv_free(strvec *s) {
    for (size_t i = 0; i < s->n; i++)
        free(s->v[i]);
    free(s->v);
    memset(s, 0, sizeof *s);
}

typedef struct rp_ctx {
    const remote_redis_publish_opts *o;
    const remote_callbacks *cb;
    rkv_conn *kv;
    char final_prefix[MREF_MAX_LEN + 2];  /* "{model}/" */
    char stage_prefix[MREF_MAX_LEN + 96]; /* "{model}.tmp-{tag}/" */
    strvec staged;                        /* suffixes written under stage_prefix */
    uint64_t done, total;
} rp_ctx;

static bool stop(const rp_ctx *c) {
    return c->cb && c->cb->cancelled && c->cb->cancelled(c->cb->arg);
}

static int progress(rp_ctx *c, const char *msg) {
    if (c->cb && c->cb->progress && c->cb->progress(c->cb->arg, c->done, c->total, msg)) return -1;
    return 0;
}

size_t remote_st1_header(mp_dtype dtype, int ndim, const int64_t *shape, uint64_t nbytes,
                         char *hdr) {
    if (dtype <= MP_DT_INVALID || dtype >= MP_DT_GGML || ndim < 0 || ndim > MP_MAX_DIMS) return 0;
    /* safetensors' Rust writer: serde_json of {name: {dtype, shape,
     * data_offsets}} with no spaces, padded with ' ' to a multiple of 8. */
    char *j = hdr + 8;
    size_t cap = REMOTE_ST1_HDR_MAX - 8, n = 0;
    int k =
        snprintf(j, cap, "{\"tensor_bytes\":{\"dtype\":\"%s\",\"shape\":[", mp_dtype_name(dtype));
    if (k < 0 || (size_t)k >= cap) return 0;
    n = (size_t)k;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) return 0;
        k = snprintf(j + n, cap - n, "%s%lld", i ? "," : "", (long long)shape[i]);
        if (k < 0 || (size_t)k >= cap - n) return 0;
        n += (size_t)k;
    }
    k = snprintf(j + n, cap - n, "],\"data_offsets\":[0,%llu]}}", (unsigned long long)nbytes);
    if (k < 0 || (size_t)k >= cap - n) return 0;
    n += (size_t)k;
    while (n % 8) {
        if (n + 1 >= cap) return 0;
        j[n++] = ' ';
    }
    uint64_t len = n;
    for (int i = 0; i < 8; i++)
        hdr[i] = (char)((len >> (8 * i)) & 0xff);
    return 8 + n;
}

/* One value: the safetensors header then the tensor's bytes, in one
 * buffer, SET under the staging prefix. fill() puts the data in place. */
typedef int (*fill_fn)(void *arg, unsigned char *dst, mp_error *err);

static int put_tensor(rp_ctx *c, int rank, const char *name, mp_dtype dt, int ndim,
                      const int64_t *shape, uint64_t nbytes, const void *direct, fill_fn fill,
                      void *arg, mp_error *err) {
    char hdr[REMOTE_ST1_HDR_MAX];
    size_t hl = remote_st1_header(dt, ndim, shape, nbytes, hdr);
    if (hl == 0)
        return mp_err(err, "unsupported_format", "%s: dtype %s cannot go into safetensors", name,
                      mp_dtype_name(dt));
    if (nbytes > SIZE_MAX - hl) return mp_err(err, "too_large", "%s: too large", name);
    /* direct: the bytes as they are in a mapped source file, sent from there */
    unsigned char *buf = direct ? NULL : malloc(nbytes ? nbytes : 1);
    if (!direct && !buf)
        return mp_err(err, "no_memory", "%s: out of memory for %llu bytes", name,
                      (unsigned long long)nbytes);
    int rc = direct ? 0 : fill(arg, buf, err);
    char suffix[TP_NAME_MAX + 64], key[sizeof suffix + sizeof c->stage_prefix];
    if (rc == 0 &&
        (snprintf(suffix, sizeof suffix, "keys/rank_%d/%s", rank, name) >= (int)sizeof suffix ||
         snprintf(key, sizeof key, "%s%s", c->stage_prefix, suffix) >= (int)sizeof key))
        rc = mp_err(err, "bad_param", "%s: key too long", name);
    if (rc == 0) rc = sv_push(&c->staged, suffix, strlen(suffix), err);
    /* header and data as two pieces: the data is sent from where it was read */
    if (rc == 0) rc = rkv_pipe_set(c->kv, key, hdr, hl, direct ? direct : buf, nbytes, err);
    free(buf);
    if (rc != 0) return mp_err_wrap(err, NULL, "rank %d, %s", rank, name);
    c->done += nbytes;
    return 0;
}

/* ---- where the bytes come from --------------------------------------------- */

typedef struct whole_src {
    const mp_weights *w;
    const mp_tensor *t;
} whole_src;

static int fill_whole(void *arg, unsigned char *dst, mp_error *err) {
    whole_src *s = arg;
    return weights_read(s->w, s->t, dst, err);
}

typedef struct target_src {
    const mp_weights *w;
    const tp_model_cfg *cfg;
    const tp_target *tg;
    int tp, rank;
    tp_naming naming;
} target_src;

/* A target's bytes on one rank: its pieces' slices, concatenated in
 * layout order (tp_rules.h). */
static int fill_target(void *arg, unsigned char *dst, mp_error *err) {
    target_src *s = arg;
    uint64_t off = 0;
    for (size_t i = 0; i < s->tg->npieces; i++) {
        const mp_tensor *t = &s->w->tensors[s->tg->pieces[i]];
        tp_slice sl;
        if (tp_slice_for(s->cfg, t, s->tp, s->rank, s->naming, &sl, err) != 0) return -1;
        if (sl.dropped) continue;
        if (off + sl.bytes > s->tg->bytes)
            return mp_err(err, "internal", "%s: pieces exceed the target", s->tg->name);
        if (!t->is_view && t->data_bytes == t->nbytes) {
            if (tp_slice_pread(s->w->fds[t->file_index], t, &sl, dst + off, err) != 0) return -1;
        } else {
            unsigned char *full = malloc(t->nbytes ? t->nbytes : 1);
            if (!full) return mp_err(err, "no_memory", "%s: out of memory", t->name);
            int rc = weights_read(s->w, t, full, err);
            if (rc == 0) rc = tp_slice_gather(t, &sl, full, dst + off, err);
            free(full);
            if (rc != 0) return -1;
        }
        off += sl.bytes;
    }
    if (off != s->tg->bytes)
        return mp_err(err, "internal", "%s: %llu of %llu bytes placed", s->tg->name,
                      (unsigned long long)off, (unsigned long long)s->tg->bytes);
    return 0;
}

/* ---- files ------------------------------------------------------------------ */

static bool is_weight_file(const char *n) {
    static const char *const ext[] = {".safetensors", ".bin",  ".pt",         ".pth",
                                      ".gguf",        ".npy",  ".h5",         ".msgpack",
                                      ".ckpt",        ".onnx", ".incomplete", NULL};
    size_t l = strlen(n);
    for (int i = 0; ext[i]; i++) {
        size_t e = strlen(ext[i]);
        if (l >= e && strcmp(n + l - e, ext[i]) == 0) return true;
    }
    return false;
}

static bool utf8_valid(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t k;
        uint32_t cp;
        if (c < 0x80) {
            if (c == 0) return false;
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            k = 1;
            cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            k = 2;
            cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            k = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + k >= n) return false;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80) return false;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
            cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += k + 1;
    }
    return true;
}

/* SGLang's save_model walks the model folder and stores each file's text
 * under its basename; its reader decodes UTF-8, so a binary file (a
 * sentencepiece tokenizer.model) is skipped with a note rather than stored
 * where SGLang would fail on it. */
static int put_files(rp_ctx *c, const char *dir, int depth, strvec *names, json_t *files,
                     json_t *skipped, mp_error *err) {
    DIR *d = opendir(dir);
    if (!d) return mp_err(err, "io_error", "%s: %s", dir, strerror(errno));
    struct dirent *e;
    int rc = 0;
    /* Two passes: this folder's files, then its sub-folders, so a file
     * nearer the top keeps its name when a deeper one shares it. */
    for (int pass = 0; pass < 2 && rc == 0; pass++) {
        rewinddir(d);
        while (rc == 0 && (e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            char path[PATH_MAX];
            if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) >= (int)sizeof path) continue;
            struct stat st;
            if (stat(path, &st) != 0) continue; /* a dangling hub link: nothing to send */
            if (S_ISDIR(st.st_mode)) {
                if (pass == 1 && depth < RP_MAX_DEPTH)
                    rc = put_files(c, path, depth + 1, names, files, skipped, err);
                continue;
            }
            if (pass == 1) continue;
            if (!S_ISREG(st.st_mode) || is_weight_file(e->d_name)) continue;
            if ((uint64_t)st.st_size > RP_MAX_FILE) {
                json_array_append_new(skipped, json_pack("{s:s,s:s}", "name", e->d_name, "reason",
                                                         "larger than 64 MiB"));
                continue;
            }
            bool dup = false;
            for (size_t i = 0; i < names->n && !dup; i++)
                dup = strcmp(names->v[i], e->d_name) == 0;
            if (dup) {
                /* SGLang keys files by base name only */
                json_array_append_new(skipped, json_pack("{s:s,s:s}", "name", e->d_name, "reason",
                                                         "a file nearer the top has this name"));
                continue;
            }
            char *data = NULL;
            size_t len = 0;
            if (fs_read_all(path, RP_MAX_FILE, &data, &len, err) != 0) {
                rc = -1;
                break;
            }
            if (!utf8_valid((const unsigned char *)data, len)) {
                remote_log(c->cb, "warn",
                           "%s is not UTF-8 text: not stored (SGLang reads files as text)",
                           e->d_name);
                json_array_append_new(
                    skipped, json_pack("{s:s,s:s}", "name", e->d_name, "reason", "not UTF-8 text"));
                free(data);
                continue;
            }
            char suffix[NAME_MAX + 16], key[sizeof suffix + sizeof c->stage_prefix];
            snprintf(suffix, sizeof suffix, "files/%s", e->d_name);
            snprintf(key, sizeof key, "%s%s", c->stage_prefix, suffix);
            rc = sv_push(&c->staged, suffix, strlen(suffix), err);
            if (rc == 0) rc = sv_push(names, e->d_name, strlen(e->d_name), err);
            if (rc == 0) rc = rkv_pipe_set(c->kv, key, data, len, NULL, 0, err);
            free(data);
            if (rc == 0)
                json_array_append_new(
                    files, json_pack("{s:s,s:I}", "name", e->d_name, "bytes", (json_int_t)len));
        }
    }
    closedir(d);
    return rc;
}

/* ---- the swap and the clean-up ---------------------------------------------- */

static int first_key(void *arg, const char *key, size_t len) {
    (void)key;
    (void)len;
    *(bool *)arg = true;
    return 1;
}

static int collect_key(void *arg, const char *key, size_t len) {
    mp_error e = {0};
    return sv_push(arg, key, len, &e);
}

static int drop_pattern(rp_ctx *c, const char *pattern, mp_error *err) {
    strvec keys = {0};
    int rc = rkv_scan(c->kv, pattern, collect_key, &keys, err);
    if (rc > 0) rc = mp_err(err, "no_memory", "out of memory listing %s", pattern);
    for (size_t i = 0; rc == 0 && i < keys.n; i++) {
        const char *argv[2] = {"UNLINK", keys.v[i]};
        rc = rkv_pipe_cmd(c->kv, 'I', 2, argv, err);
    }
    if (rc == 0) rc = rkv_pipe_flush(c->kv, err);
    sv_free(&keys);
    return rc;
}

/* Deletes what this run staged, over a fresh connection: after a failure
 * the old one may be closed (Redis drops a client that sends a value over
 * proto-max-bulk-len) or out of step. Every key under the staging prefix
 * goes, including one whose SET was still in flight. Best effort: keys left
 * behind sit under a prefix SGLang never reads. */
static void drop_staged(rp_ctx *c, const char *password) {
    const mref_remote *d = c->o->dst;
    rkv_close(c->kv);
    c->kv = NULL;
    mp_error e = {0};
    char pattern[sizeof c->stage_prefix + 2];
    snprintf(pattern, sizeof pattern, "%s*", c->stage_prefix);
    if (rkv_connect(d->host, d->port, d->user, password, c->o->timeout_s, &c->kv, &e) != 0 ||
        drop_pattern(c, pattern, &e) != 0)
        remote_log(c->cb, "warn", "staged keys %s may be left behind: %s", pattern, e.message);
}

/* One transaction: the old model's keys go, the staged ones take their
 * names. Redis runs it as a unit, so a reader's SCAN sees the old model or
 * the new one. */
static int swap_in(rp_ctx *c, mp_error *err) {
    strvec old = {0};
    char pattern[sizeof c->final_prefix + 2];
    snprintf(pattern, sizeof pattern, "%s*", c->final_prefix);
    int rc = rkv_scan(c->kv, pattern, collect_key, &old, err);
    if (rc > 0) rc = mp_err(err, "no_memory", "out of memory listing the old keys");
    const char *multi[1] = {"MULTI"};
    if (rc == 0) rc = rkv_pipe_cmd(c->kv, 'S', 1, multi, err);
    for (size_t i = 0; rc == 0 && i < old.n; i++) {
        const char *argv[2] = {"UNLINK", old.v[i]};
        rc = rkv_pipe_cmd(c->kv, 'Q', 2, argv, err);
    }
    for (size_t i = 0; rc == 0 && i < c->staged.n; i++) {
        char from[sizeof c->stage_prefix + TP_NAME_MAX + 64];
        char to[sizeof c->final_prefix + TP_NAME_MAX + 64];
        snprintf(from, sizeof from, "%s%s", c->stage_prefix, c->staged.v[i]);
        snprintf(to, sizeof to, "%s%s", c->final_prefix, c->staged.v[i]);
        const char *argv[3] = {"RENAME", from, to};
        rc = rkv_pipe_cmd(c->kv, 'Q', 3, argv, err);
    }
    if (rc == 0) rc = rkv_exec(c->kv, err);
    sv_free(&old);
    return rc;
}

/* ---- the whole publish ---------------------------------------------------------- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A plain tensor's bytes in its file's mapping, or NULL (not mapped, a
 * strided view, a cast). */
static const void *mapped_bytes(const mp_weights *w, const mp_tensor *t) {
    if (t->is_view || t->data_bytes != t->nbytes || !w->maps || t->file_index >= w->nfiles)
        return NULL;
    const mp_file_map *m = &w->maps[t->file_index];
    if (!m->base || t->data_offset > m->len || t->nbytes > m->len - t->data_offset) return NULL;
    return (const unsigned char *)m->base + t->data_offset;
}

static int put_all_tensors(rp_ctx *c, mp_weights *w, json_t *ranks, mp_error *err) {
    const remote_redis_publish_opts *o = c->o;
    bool plain = o->tp == 1 && o->naming == TP_NAMING_HF;
    tp_model_cfg cfg;
    tp_layout lay = {0};
    if (!plain) {
        if (tp_config_load(o->model_dir, &cfg, err) != 0 || tp_check(&cfg, o->tp, err) != 0 ||
            tp_layout_build(&cfg, w->tensors, w->ntensors, o->tp, o->naming, &lay, err) != 0) {
            if (o->tp == 1 && strcmp(err->code, "unsupported_architecture") == 0)
                mp_err_wrap(err, NULL, "naming \"hf\" publishes checkpoint names as they are");
            return -1;
        }
        c->total = lay.rank_bytes * (uint64_t)o->tp;
    } else {
        for (size_t i = 0; i < w->ntensors; i++)
            c->total += w->tensors[i].nbytes;
        /* best effort: an unmapped file is read with pread */
        for (uint32_t f = 0; f < w->nfiles; f++)
            if (weights_map_file(w, f, err) != 0) mp_error_clear(err);
    }
    int rc = 0;
    for (int r = 0; r < o->tp && rc == 0; r++) {
        uint64_t before = c->done;
        size_t count = plain ? w->ntensors : lay.ntargets;
        for (size_t i = 0; i < count && rc == 0; i++) {
            if (stop(c)) {
                rc = mp_err(err, "cancelled", "cancelled");
                break;
            }
            if (plain) {
                const mp_tensor *t = &w->tensors[i];
                whole_src s = {w, t};
                rc = put_tensor(c, r, t->name, t->dtype, t->ndim, t->shape, t->nbytes,
                                mapped_bytes(w, t), fill_whole, &s, err);
            } else {
                const tp_target *tg = &lay.targets[i];
                target_src s = {w, &cfg, tg, o->tp, r, o->naming};
                rc = put_tensor(c, r, tg->name, tg->dtype, tg->ndim, tg->shape, tg->bytes, NULL,
                                fill_target, &s, err);
            }
            if (rc == 0 && progress(c, "publishing tensors") != 0)
                rc = mp_err(err, "cancelled", "cancelled");
        }
        if (rc == 0)
            json_array_append_new(ranks, json_pack("{s:i,s:I,s:I}", "rank", r, "tensors",
                                                   (json_int_t)count, "bytes",
                                                   (json_int_t)(c->done - before)));
    }
    if (!plain) tp_layout_free(&lay);
    return rc;
}

int remote_redis_publish(const remote_redis_publish_opts *o, const remote_callbacks *cb,
                         json_t **result, mp_error *err) {
    *result = NULL;
    double t0 = now_s();
    const mref_remote *d = o->dst;
    if (!d || d->scheme != MREF_REDIS) return mp_err(err, "bad_param", "not a redis:// target");
    if (o->tp < 1) return mp_err(err, "bad_tp_size", "tp_size must be at least 1");
    rp_ctx c = {.o = o, .cb = cb};
    snprintf(c.final_prefix, sizeof c.final_prefix, "%s/", d->model_name);
    snprintf(c.stage_prefix, sizeof c.stage_prefix, "%s.tmp-%s/", d->model_name,
             o->tmp_tag && *o->tmp_tag ? o->tmp_tag : "publish");

    mp_weights *w = NULL;
    if (weights_open(o->model_dir, &w, err) != 0)
        return mp_err_wrap(err, NULL, "%s: no weights to publish", o->model_dir);
    for (size_t i = 0; i < w->ntensors; i++)
        if (w->tensors[i].dtype == MP_DT_GGML) {
            mp_err(err, "unsupported_format",
                   "%s is a GGUF block-quantized tensor; convert the model to safetensors first",
                   w->tensors[i].name);
            weights_close(w);
            return -1;
        }
    const char *pw = d->has_password ? d->password : o->password;
    if (rkv_connect(d->host, d->port, d->user, pw, o->timeout_s, &c.kv, err) != 0) {
        weights_close(w);
        return -1;
    }
    rkv_set_window(c.kv, o->pipeline_bytes);
    json_t *files = json_array(), *skipped = json_array(), *ranks = json_array();
    strvec names = {0};
    char pattern[sizeof c.stage_prefix + 2];
    bool exists = false, staged = false;
    int rc = 0;

    snprintf(pattern, sizeof pattern, "%s*", c.final_prefix);
    rc = rkv_scan(c.kv, pattern, first_key, &exists, err) < 0 ? -1 : 0;
    if (rc == 0 && exists && !o->overwrite)
        rc = mp_err(err, "output_exists",
                    "redis://%s:%d/%s already holds a model; pass overwrite to replace it", d->host,
                    d->port, d->model_name);
    /* Leftovers of an earlier run with the same tag (a crash mid-write). */
    snprintf(pattern, sizeof pattern, "%s*", c.stage_prefix);
    if (rc == 0) rc = drop_pattern(&c, pattern, err);
    if (rc == 0) {
        staged = true;
        rc = put_files(&c, o->model_dir, 0, &names, files, skipped, err);
    }
    if (rc == 0) rc = put_all_tensors(&c, w, ranks, err);
    if (rc == 0) rc = rkv_pipe_flush(c.kv, err);
    if (rc == 0 && stop(&c)) rc = mp_err(err, "cancelled", "cancelled");
    if (rc == 0) rc = swap_in(&c, err);
    if (rc != 0 && staged) {
        mp_error keep = *err;
        drop_staged(&c, pw);
        *err = keep;
    }
    if (rc == 0) {
        double secs = now_s() - t0;
        *result = json_pack("{s:s,s:s,s:i,s:s,s:o,s:o,s:o,s:I,s:I,s:f,s:f}", "url", "",
                            "model_name", d->model_name, "tp_size", o->tp, "naming",
                            o->naming == TP_NAMING_HF ? "hf" : "sglang", "ranks", ranks, "files",
                            files, "skipped_files", skipped, "keys", (json_int_t)c.staged.n,
                            "bytes", (json_int_t)c.done, "seconds", secs, "throughput_bytes_per_s",
                            secs > 0 ? (double)c.done / secs : 0.0);
        if (*result) {
            char url[MREF_HOST_MAX + MREF_MAX_LEN + 32];
            bool v6 = strchr(d->host, ':') != NULL;
            snprintf(url, sizeof url, "redis://%s%s%s:%d/%s", v6 ? "[" : "", d->host, v6 ? "]" : "",
                     d->port, d->model_name);
            json_object_set_new(*result, "url", json_string(url));
        } else {
            rc = mp_err(err, "no_memory", "out of memory");
        }
        files = skipped = ranks = NULL;
    }
    json_decref(files);
    json_decref(skipped);
    json_decref(ranks);
    sv_free(&names);
    sv_free(&c.staged);
    rkv_close(c.kv);
    weights_close(w);
    return rc;
}
