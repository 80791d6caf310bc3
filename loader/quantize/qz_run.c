/*
 * qz_run.c - the offline quantize job's body (qz_run, see quantize.h):
 * plan every output tensor from the source's table alone (qz_plan_tensor
 * gives each quantized tensor's parts, the others are copied), split them
 * into shards as convert does (the parts of one source tensor stay in one
 * shard), then stream: map one source tensor, quantize it, write its parts
 * where the shard's header put them (st_writer_pwrite), unmap and free. So
 * the resident set is about one tensor and its parts, never the model.
 *
 * The output folder is built and published like convert's (temp folder next
 * to the target, fsync, rename; loader/convert's helpers), with config.json
 * gaining the method's quantization_config and the other files copied.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loader/convert/convert.h"
#include "loader/formats/safetensors/safetensors.h"
#include "loader/formats/weights.h"
#include "loader/inspect/inspect.h"
#include "loader/quantize/quantize.h"

/* One source tensor: quantized (plan) or copied. */
typedef struct qitem {
    const mp_tensor *t;
    qz_plan *plan; /* NULL: copied as it is */
    uint64_t out_bytes;
    uint32_t shard;
} qitem;

typedef struct qctx {
    const qz_opts *o;
    mp_weights *w;
    qitem *items;
    size_t nitems, nshards, nquant;
    json_t *ignored, *unmatched, *warnings, *files;
    char *tmp_dir;
    uint64_t done, total, bytes_out;
} qctx;

static void say(qctx *c, const char *level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void say(qctx *c, const char *level, const char *fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (strcmp(level, "warn") == 0) json_array_append_new(c->warnings, json_string(msg));
    if (c->o->log) c->o->log(c->o->cb, level, msg);
}

static bool cancelled(qctx *c) {
    return c->o->cancelled && c->o->cancelled(c->o->cb);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- the source ---- */

static json_t *load_config(const char *dir) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/config.json", dir);
    json_error_t je;
    json_t *cfg = json_load_file(path, 0, &je);
    if (cfg && !json_is_object(cfg)) {
        json_decref(cfg);
        return NULL;
    }
    return cfg;
}

/* ---- planning ---- */

/* Whether tensor t is quantized; records ignored modules and which user
 * patterns matched. */
static bool wanted(qctx *c, const mp_tensor *t, bool *user_hit) {
    int u;
    qz_selection sel = qz_select(t->name, t->dtype, t->ndim, c->o->ignore, c->o->nignore,
                                 !c->o->no_default_ignore, &u);
    if (u >= 0) user_hit[u] = true;
    if (sel == QZ_SEL_IGNORED)
        json_array_append_new(c->ignored,
                              json_sprintf("%.*s", (int)(strlen(t->name) - 7), t->name));
    return sel == QZ_SEL_QUANTIZE;
}

static int plan(qctx *c, mp_error *err) {
    size_t n = c->w->ntensors;
    c->items = calloc(n ? n : 1, sizeof *c->items);
    bool *hit = calloc(c->o->nignore + 1, sizeof *hit);
    uint64_t *bytes = calloc(n ? n : 1, sizeof *bytes);
    uint32_t *shard = calloc(n ? n : 1, sizeof *shard);
    int rc = 0;
    if (!c->items || !hit || !bytes || !shard) rc = mp_err(err, "out_of_memory", "out of memory");
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const mp_tensor *t = &c->w->tensors[i];
        qitem *it = &c->items[c->nitems++];
        it->t = t;
        it->out_bytes = t->nbytes;
        c->total += t->nbytes;
        if (!wanted(c, t, hit)) continue;
        if (!(it->plan = malloc(sizeof *it->plan))) {
            rc = mp_err(err, "out_of_memory", "out of memory");
            break;
        }
        uint64_t shape[2] = {(uint64_t)t->shape[0], (uint64_t)t->shape[1]};
        if (qz_plan_tensor(&c->o->params, t->name, t->dtype, shape, it->plan, err) != 0) {
            rc = -1;
            break;
        }
        it->out_bytes = 0;
        for (int p = 0; p < it->plan->n; p++)
            it->out_bytes += it->plan->parts[p].nbytes;
        c->nquant++;
    }
    for (size_t u = 0; rc == 0 && u < c->o->nignore; u++)
        if (!hit[u]) json_array_append_new(c->unmatched, json_string(c->o->ignore[u]));
    if (rc == 0 && c->nquant == 0)
        rc = mp_err(err, "nothing_to_quantize",
                    "no tensor to quantize: none is a 2-D floating <module>.weight outside the "
                    "ignore patterns (%zu ignored)",
                    json_array_size(c->ignored));
    for (size_t i = 0; rc == 0 && i < c->nitems; i++)
        bytes[i] = c->items[i].out_bytes;
    if (rc == 0) {
        uint64_t max = c->o->max_shard_bytes ? c->o->max_shard_bytes : CONV_DEFAULT_MAX_SHARD;
        c->nshards = conv_plan_shards(bytes, c->nitems, max, shard);
        for (size_t i = 0; i < c->nitems; i++)
            c->items[i].shard = shard[i];
        if (c->nshards > 99999)
            rc = mp_err(err, "too_large", "over 99999 shards: raise max_shard_bytes");
    }
    free(hit);
    free(bytes);
    free(shard);
    return rc;
}

/* ---- writing ---- */

/* The source bytes of t: a private read-only mapping of just this tensor
 * when the file can be mapped (no copy, dropped right after), else a
 * malloc'd copy. *map_len is 0 for a copy. */
static const void *source_open(qctx *c, const mp_tensor *t, void **base, size_t *map_len,
                               mp_error *err) {
    *base = NULL;
    *map_len = 0;
    int fd = c->w->fds[t->file_index];
    struct stat st;
    uint64_t off = t->data_offset, a = off - off % 4096u;
    if (!t->is_view && t->nbytes > 0 && fstat(fd, &st) == 0 &&
        off + t->nbytes <= (uint64_t)st.st_size) {
        size_t len = (size_t)(off + t->nbytes - a);
        void *m = mmap(NULL, len, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, (off_t)a);
        if (m != MAP_FAILED) {
            *base = m;
            *map_len = len;
            return (const char *)m + (off - a);
        }
    }
    void *buf = malloc(t->nbytes ? t->nbytes : 1);
    if (!buf) {
        mp_err(err, "out_of_memory", "%s: no memory for %llu bytes", t->name,
               (unsigned long long)t->nbytes);
        return NULL;
    }
    if (weights_read(c->w, t, buf, err) != 0) {
        free(buf);
        return NULL;
    }
    *base = buf;
    return buf;
}

static void source_close(void *base, size_t map_len) {
    if (map_len)
        munmap(base, map_len);
    else
        free(base);
}

/* Quantizes item it into its parts and writes them (entries wt0.. of the
 * shard's writer). */
static int put_quantized(qctx *c, const qitem *it, const void *src, st_writer *w, size_t wt0,
                         mp_error *err) {
    void *out[QZ_MAX_PARTS] = {0};
    int rc = 0;
    for (int p = 0; rc == 0 && p < it->plan->n; p++)
        if (!(out[p] = malloc(it->plan->parts[p].nbytes ? it->plan->parts[p].nbytes : 1)))
            rc = mp_err(err, "out_of_memory", "%s: no memory for its quantized parts", it->t->name);
    if (rc == 0) rc = qz_quantize(&c->o->params, it->plan, it->t->dtype, src, out, err);
    for (int p = 0; rc == 0 && p < it->plan->n; p++)
        rc =
            st_writer_pwrite(w, wt0 + (size_t)p, 0, out[p], (size_t)it->plan->parts[p].nbytes, err);
    for (int p = 0; p < QZ_MAX_PARTS; p++)
        free(out[p]);
    return rc;
}

/* One shard's tensor list: each item's parts (or the item itself), in item
 * order; *wt_of[i] is the first entry of item i (SIZE_MAX: other shard). */
static st_wtensor *shard_tensors(qctx *c, size_t s, size_t *n, size_t *wt_of) {
    size_t k = 0;
    for (size_t i = 0; i < c->nitems; i++)
        if (c->items[i].shard == s) k += c->items[i].plan ? (size_t)c->items[i].plan->n : 1;
    st_wtensor *ts = calloc(k ? k : 1, sizeof *ts);
    if (!ts) return NULL;
    k = 0;
    for (size_t i = 0; i < c->nitems; i++) {
        const qitem *it = &c->items[i];
        wt_of[i] = SIZE_MAX;
        if (it->shard != s) continue;
        wt_of[i] = k;
        if (!it->plan) {
            ts[k].name = it->t->name;
            ts[k].dtype = it->t->dtype;
            ts[k].ndim = it->t->ndim;
            memcpy(ts[k].shape, it->t->shape, sizeof ts[k].shape);
            k++;
            continue;
        }
        for (int p = 0; p < it->plan->n; p++, k++) {
            const qz_part *pt = &it->plan->parts[p];
            ts[k].name = pt->name;
            ts[k].dtype = pt->dtype;
            ts[k].ndim = pt->ndim;
            ts[k].shape[0] = (int64_t)pt->shape[0];
            ts[k].shape[1] = (int64_t)pt->shape[1];
        }
    }
    *n = k;
    return ts;
}

static int write_shard(qctx *c, size_t s, const char *path, mp_error *err) {
    size_t n = 0, *wt_of = calloc(c->nitems ? c->nitems : 1, sizeof *wt_of);
    st_wtensor *ts = wt_of ? shard_tensors(c, s, &n, wt_of) : NULL;
    json_t *meta = json_pack("{s:s}", "format", "pt");
    st_writer *w = NULL;
    int rc = ts && meta ? 0 : mp_err(err, "out_of_memory", "out of memory");
    if (rc == 0) rc = st_writer_open(path, ts, n, meta, &w, err);
    /* Writeback is started after every tensor without waiting for it, so
     * the disk works while the next one is quantized and the final fsync
     * (st_writer_finish) has little left to do. The writer's file is
     * "<path>.tmp" (safetensors.h). */
    char tmp[PATH_MAX];
    int kick = rc == 0 && snprintf(tmp, sizeof tmp, "%s.tmp", path) < (int)sizeof tmp
                   ? open(tmp, O_RDONLY | O_CLOEXEC)
                   : -1;
    for (size_t i = 0; rc == 0 && i < c->nitems; i++) {
        const qitem *it = &c->items[i];
        if (it->shard != s) continue;
        if (cancelled(c)) {
            rc = mp_err(err, "cancelled", "cancelled");
            break;
        }
        void *base;
        size_t map_len;
        const void *src = source_open(c, it->t, &base, &map_len, err);
        if (!src) {
            rc = -1;
            break;
        }
        if (it->plan)
            rc = put_quantized(c, it, src, w, wt_of[i], err);
        else
            rc = st_writer_pwrite(w, wt_of[i], 0, src, (size_t)it->t->nbytes, err);
        source_close(base, map_len);
        if (kick >= 0) sync_file_range(kick, 0, 0, SYNC_FILE_RANGE_WRITE);
        c->done += it->t->nbytes;
        if (c->o->progress) c->o->progress(c->o->cb, c->done, c->total, it->t->name);
    }
    if (kick >= 0) close(kick);
    rc = st_writer_end(w, rc, err);
    json_decref(meta);
    free(ts);
    free(wt_of);
    return rc;
}

/* Re-opens a written shard: the tensors the plan put there, with their
 * dtypes and shapes, and nothing else. */
static int check_shard(qctx *c, size_t s, const char *path, mp_error *err) {
    mp_weights w = {0};
    size_t n = 0, *wt_of = calloc(c->nitems ? c->nitems : 1, sizeof *wt_of);
    st_wtensor *ts = wt_of ? shard_tensors(c, s, &n, wt_of) : NULL;
    int rc = ts ? st_open(path, &w, err) : mp_err(err, "out_of_memory", "out of memory");
    if (rc == 0 && w.ntensors != n)
        rc = mp_err(err, "verify_failed", "%s holds %zu tensors, planned %zu", path, w.ntensors, n);
    for (size_t k = 0; rc == 0 && k < n; k++) {
        const mp_tensor *o = NULL;
        for (size_t j = 0; j < w.ntensors && !o; j++)
            if (strcmp(w.tensors[j].name, ts[k].name) == 0) o = &w.tensors[j];
        bool same = o && o->dtype == ts[k].dtype && o->ndim == ts[k].ndim;
        for (int d = 0; same && d < o->ndim; d++)
            same = o->shape[d] == ts[k].shape[d];
        if (!same) rc = mp_err(err, "verify_failed", "%s: %s is not as planned", path, ts[k].name);
    }
    weights_free_fields(&w);
    free(ts);
    free(wt_of);
    return rc;
}

static int write_index(qctx *c, mp_error *err) {
    st_index idx = {0};
    size_t nn = 0, *wt_of = calloc(c->nitems ? c->nitems : 1, sizeof *wt_of);
    idx.files = calloc(c->nshards, sizeof *idx.files);
    idx.nfiles = c->nshards;
    int rc = wt_of && idx.files ? 0 : mp_err(err, "out_of_memory", "out of memory");
    for (size_t s = 0; rc == 0 && s < c->nshards; s++) {
        char nm[64];
        conv_shard_name(s, c->nshards, nm, sizeof nm);
        size_t n = 0;
        st_wtensor *ts = shard_tensors(c, s, &n, wt_of);
        char **names = ts ? realloc(idx.names, (nn + n + 1) * sizeof *names) : NULL;
        uint32_t *file_of = names ? realloc(idx.file_of, (nn + n + 1) * sizeof *file_of) : NULL;
        if (names) idx.names = names;
        if (file_of) idx.file_of = file_of;
        if (!(idx.files[s] = strdup(nm)) || !file_of)
            rc = mp_err(err, "out_of_memory", "out of memory");
        for (size_t k = 0; rc == 0 && k < n; k++, nn++) {
            idx.file_of[nn] = (uint32_t)s;
            if (!(idx.names[nn] = strdup(ts[k].name)))
                rc = mp_err(err, "out_of_memory", "out of memory");
        }
        idx.nnames = nn;
        free(ts);
    }
    free(wt_of);
    idx.total_size = c->bytes_out;
    idx.has_total_size = true;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", c->tmp_dir);
    if (rc == 0) rc = st_index_write(path, &idx, err);
    st_index_free(&idx);
    return rc;
}

/* ---- the rest of the folder ---- */

/* The dtype the unquantized tensors keep, for bnb_4bit_compute_dtype: the
 * config's, else the float dtype holding most source bytes. */
static const char *model_dtype(qctx *c, const json_t *cfg) {
    const char *d = json_string_value(json_object_get(cfg, "torch_dtype"));
    if (!d) d = json_string_value(json_object_get(cfg, "dtype"));
    if (d) return d;
    mp_dtype *dts = malloc((c->nitems ? c->nitems : 1) * sizeof *dts);
    uint64_t *bytes = malloc((c->nitems ? c->nitems : 1) * sizeof *bytes);
    const char *name = NULL;
    if (dts && bytes) {
        for (size_t i = 0; i < c->nitems; i++) {
            dts[i] = c->items[i].t->dtype;
            bytes[i] = c->items[i].t->nbytes;
        }
        name = conv_dominant_torch_dtype(dts, bytes, c->nitems);
    }
    free(dts);
    free(bytes);
    return name;
}

/* config.json with quantization_config added (torch_dtype kept). Without a
 * source config there is nothing a loader could use: say so. */
static int write_config(qctx *c, json_t *cfg, mp_error *err) {
    if (!cfg) {
        say(c, "warn",
            "the model has no config.json: the output has none either, and loaders "
            "that need quantization_config cannot tell how it is quantized");
        return 0;
    }
    json_t *q = qz_quant_config(&c->o->params, c->ignored, model_dtype(c, cfg));
    if (!q) return mp_err(err, "out_of_memory", "out of memory");
    json_object_set_new(cfg, "quantization_config", q);
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/config.json", c->tmp_dir);
    return conv_write_json(path, cfg, err);
}

static int add_file(qctx *c, const char *name, mp_error *err) {
    char path[PATH_MAX];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", c->tmp_dir, name);
    if (stat(path, &st) != 0) return mp_err(err, "io_error", "stat %s: %s", path, strerror(errno));
    json_array_append_new(c->files,
                          json_pack("{s:s,s:I}", "name", name, "size", (json_int_t)st.st_size));
    return 0;
}

static int write_all(qctx *c, json_t *cfg, mp_error *err) {
    char path[PATH_MAX], nm[64];
    for (size_t s = 0; s < c->nshards; s++) {
        conv_shard_name(s, c->nshards, nm, sizeof nm);
        snprintf(path, sizeof path, "%s/%s", c->tmp_dir, nm);
        if (write_shard(c, s, path, err) != 0 || check_shard(c, s, path, err) != 0 ||
            add_file(c, nm, err) != 0)
            return mp_err_wrap(err, NULL, "%s", nm);
        struct stat st;
        if (stat(path, &st) == 0) c->bytes_out += (uint64_t)st.st_size;
    }
    if (c->nshards > 1 &&
        (write_index(c, err) != 0 || add_file(c, "model.safetensors.index.json", err) != 0))
        return -1;
    char *buf = malloc(1u << 20);
    int rc = buf ? conv_copy_aux(c->o->src, c->tmp_dir, true, buf, 1u << 20, err)
                 : mp_err(err, "out_of_memory", "out of memory");
    free(buf);
    if (rc != 0 || write_config(c, cfg, err) != 0) return -1;
    json_t *marker = json_pack("{s:s,s:s,s:s}", "created_by", "modelprep quantize", "source",
                               c->o->src, "method", qz_method_name(c->o->params.method));
    snprintf(path, sizeof path, "%s/%s", c->tmp_dir, CONV_MARKER);
    rc =
        marker ? conv_write_json(path, marker, err) : mp_err(err, "out_of_memory", "out of memory");
    json_decref(marker);
    if (rc != 0 || conv_sync_path(c->tmp_dir, err) != 0) return -1;
    if (cancelled(c)) return mp_err(err, "cancelled", "cancelled");
    bool old_left = false;
    rc = conv_publish(c->tmp_dir, c->o->out_dir, &old_left, err);
    if (old_left) say(c, "warn", "could not remove the replaced output next to %s", c->o->out_dir);
    return rc;
}

static void ctx_free(qctx *c) {
    for (size_t i = 0; i < c->nitems; i++)
        free(c->items[i].plan);
    free(c->items);
    weights_close(c->w);
    json_decref(c->ignored);
    json_decref(c->unmatched);
    json_decref(c->warnings);
    json_decref(c->files);
    free(c->tmp_dir);
}

static json_t *result_of(qctx *c, double t0) {
    json_t *r = json_pack(
        "{s:s,s:s,s:O,s:I,s:I,s:O,s:O,s:O,s:I,s:I,s:f}", "output_path", c->o->out_dir, "method",
        qz_method_name(c->o->params.method), "files", c->files, "quantized", (json_int_t)c->nquant,
        "copied", (json_int_t)(c->nitems - c->nquant), "ignored", c->ignored, "unmatched_ignore",
        c->unmatched, "warnings", c->warnings, "bytes_in", (json_int_t)c->total, "bytes_out",
        (json_int_t)c->bytes_out, "seconds", now_s() - t0);
    if (r && c->o->params.method == QZ_FP8_BLOCK)
        json_object_set_new(
            r, "block_size",
            json_pack("[I,I]", (json_int_t)c->o->params.block_n, (json_int_t)c->o->params.block_k));
    if (r && c->o->params.method == QZ_NF4)
        json_object_set_new(r, "double_quant", json_boolean(c->o->params.double_quant));
    if (r && c->o->params.method == QZ_NF4 && c->o->params.double_quant)
        json_object_set_new(r, "torch_threads", json_integer(c->o->params.torch_threads));
    return r;
}

/* Whether a folder holds weights that convert could turn into safetensors. */
static bool convertible(const char *dir) {
    char **paths = NULL;
    size_t n = 0;
    mp_error e;
    if (conv_find_sources(dir, &paths, &n, &e) != 0) return false;
    conv_free_paths(paths, n);
    return n > 0;
}

int qz_run(const qz_opts *o, json_t **result, mp_error *err) {
    *result = NULL;
    double t0 = now_s();
    qctx c = {.o = o};
    c.ignored = json_array();
    c.unmatched = json_array();
    c.warnings = json_array();
    c.files = json_array();
    json_t *cfg = NULL;
    int rc = c.ignored && c.unmatched && c.warnings && c.files
                 ? qz_params_check(&o->params, err)
                 : mp_err(err, "out_of_memory", "out of memory");
    if (rc == 0) rc = weights_open(o->src, &c.w, err);
    if (rc != 0 && strcmp(err->code, "not_found") == 0 && convertible(o->src))
        rc = mp_err(err, "unsupported_format",
                    "the model has no safetensors weights but PyTorch or GGUF ones: convert it "
                    "first (a convert job), then quantize the converted folder");
    if (rc == 0 && c.w->format != MP_FMT_SAFETENSORS)
        rc = mp_err(err, "unsupported_format",
                    "quantize reads safetensors checkpoints and this one is not: convert it "
                    "first (a convert job), then quantize the converted folder");
    if (rc == 0) {
        cfg = load_config(o->src);
        rc = qz_check_source(cfg, c.w->tensors, c.w->ntensors,
                             "quantize its unquantized original instead", err);
    }
    if (rc == 0) rc = plan(&c, err);
    if (rc == 0) {
        say(&c, "info", "%zu tensors quantized to %s, %zu copied, into %zu shard(s)", c.nquant,
            qz_method_name(o->params.method), c.nitems - c.nquant, c.nshards);
        if (json_array_size(c.unmatched) > 0) {
            char *u = json_dumps(c.unmatched, JSON_COMPACT);
            say(&c, "warn", "ignore patterns that matched no module: %s", u ? u : "?");
            free(u);
        }
        rc = conv_make_tmp_dir(o->out_dir, o->tag, "quantize", &c.tmp_dir, err);
    }
    if (rc == 0) rc = write_all(&c, cfg, err);
    if (rc != 0 && c.tmp_dir) conv_rm_flat_dir(c.tmp_dir);
    if (rc == 0 && !(*result = result_of(&c, t0)))
        rc = mp_err(err, "out_of_memory", "out of memory");
    json_decref(cfg);
    ctx_free(&c);
    return rc;
}
