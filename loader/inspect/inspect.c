/*
 * inspect.c - insp_run: config.json, the tensor table of whichever weights
 * the folder holds (headers only), counts by dtype, quantization (declared
 * or recognized, see inspect_quant.c), the KV-cache scales file, and the
 * largest rank's bytes for each tensor-parallel size under the split rules
 * of loader/tp_rules.h (the same rules the shard job uses).
 */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "loader/models/models.h"
#include "loader/convert/convert.h"
#include "loader/formats/gguf/gguf.h"
#include "loader/inspect/inspect.h"
#include "loader/formats/pytorch/pytorch.h"
#include "loader/tp_rules/tp_rules.h"
#include "loader/formats/weights.h"
#include "util/fsutil.h"

#define CONFIG_MAX (16u << 20)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static bool ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

static bool is_file(const char *dir, const char *name) {
    char p[PATH_MAX];
    struct stat st;
    if (snprintf(p, sizeof p, "%s/%s", dir, name) >= (int)sizeof p) return false;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* NULL with err "not_found" when absent (err->code empty: absent is fine
 * for the caller to decide), "bad_config" when not a JSON object. */
static json_t *read_json(const char *dir, const char *name, mp_error *err) {
    char p[PATH_MAX];
    if (snprintf(p, sizeof p, "%s/%s", dir, name) >= (int)sizeof p) {
        mp_err(err, "bad_config", "path too long");
        return NULL;
    }
    char *text = NULL;
    size_t len = 0;
    if (fs_read_all(p, CONFIG_MAX, &text, &len, err) != 0) {
        if (strcmp(err->code, "too_large") != 0 && strcmp(err->code, "not_found") != 0) {
            struct stat st;
            if (stat(p, &st) != 0) mp_err(err, "not_found", "%s is missing", name);
        }
        return NULL;
    }
    json_error_t je;
    json_t *doc = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    free(text);
    if (!json_is_object(doc)) {
        json_decref(doc);
        mp_err(err, "bad_config", "%s: not a JSON object (%s, line %d)", name,
               doc ? "wrong type" : je.text, je.line);
        return NULL;
    }
    return doc;
}

/* ------------------------------------------------------------------------ */
/* weights                                                                   */

typedef struct wset {
    mp_weights **ws;
    size_t n;
    mp_format format;
    char *gguf_file; /* the one GGUF file inspected */
} wset;

static void wset_free(wset *s) {
    for (size_t i = 0; i < s->n; i++)
        weights_close(s->ws[i]);
    free(s->ws);
    free(s->gguf_file);
}

static int wset_add(wset *s, const char *path, mp_error *err) {
    mp_weights **nw = realloc(s->ws, (s->n + 1) * sizeof *nw);
    if (!nw) return mp_err(err, "no_memory", "out of memory");
    s->ws = nw;
    if (weights_open(path, &s->ws[s->n], err) != 0) return -1;
    s->n++;
    return 0;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Safetensors first (index or loose files, as loaders prefer), then
 * PyTorch, then GGUF (the first by name when there are several). */
static int open_weights(const char *dir, json_t *names, wset *s, json_t *warnings, mp_error *err) {
    bool st = false;
    size_t ngg = 0;
    size_t i;
    json_t *v;
    json_array_foreach(names, i, v) {
        const char *n = json_string_value(v);
        if (ends_with(n, ".safetensors") || strcmp(n, "model.safetensors.index.json") == 0)
            st = true;
        if (ends_with(n, ".gguf")) ngg++;
    }
    if (st) {
        if (wset_add(s, dir, err) != 0) return -1;
        s->format = s->ws[0]->format;
        return 0;
    }
    char **paths = NULL;
    size_t np = 0;
    mp_error e2 = {0};
    if (conv_find_sources(dir, &paths, &np, &e2) == 0) {
        int rc = 0;
        for (size_t k = 0; rc == 0 && k < np; k++)
            rc = wset_add(s, paths[k], err);
        conv_free_paths(paths, np);
        if (rc != 0) return -1;
        s->format = s->ws[0]->format;
        if (s->format == MP_FMT_GGUF) s->gguf_file = strdup(strrchr(s->ws[0]->files[0], '/') + 1);
        return 0;
    }
    if (strcmp(e2.code, "ambiguous") == 0 && ngg > 1) {
        char **gg = calloc(ngg, sizeof *gg);
        size_t k = 0;
        if (!gg) return mp_err(err, "no_memory", "out of memory");
        json_array_foreach(names, i, v) {
            const char *n = json_string_value(v);
            if (ends_with(n, ".gguf") && k < ngg) gg[k++] = (char *)n;
        }
        qsort(gg, k, sizeof *gg, cmp_str);
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s/%s", dir, gg[0]);
        char msg[512];
        snprintf(msg, sizeof msg, "%zu GGUF files; inspected %s", k, gg[0]);
        json_array_append_new(warnings, json_string(msg));
        s->gguf_file = strdup(gg[0]);
        free(gg);
        if (wset_add(s, p, err) != 0) return -1;
        s->format = MP_FMT_GGUF;
        return 0;
    }
    return mp_err(err, "not_found", "%s holds no weight files (safetensors, .bin/.pt, GGUF)", dir);
}

/* ------------------------------------------------------------------------ */
/* tensors                                                                   */

typedef struct vref {
    const mp_tensor *t;
    size_t wi, idx;
} vref;

static int cmp_vref(const void *a, const void *b) {
    const vref *x = a, *y = b;
    if (x->wi != y->wi) return x->wi < y->wi ? -1 : 1;
    if (x->t->file_index != y->t->file_index) return x->t->file_index < y->t->file_index ? -1 : 1;
    if (x->t->storage_id != y->t->storage_id) return x->t->storage_id < y->t->storage_id ? -1 : 1;
    if (x->t->storage_offset != y->t->storage_offset)
        return x->t->storage_offset < y->t->storage_offset ? -1 : 1;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

/* Every stored tensor once: shallow copies (names borrowed from the
 * weights); a tied PyTorch duplicate (the very same view) is left out. */
static int collect(const wset *s, mp_tensor **out, size_t *nout, size_t *ntied, mp_error *err) {
    size_t total = 0;
    for (size_t i = 0; i < s->n; i++)
        total += s->ws[i]->ntensors;
    mp_tensor *ts = malloc((total ? total : 1) * sizeof *ts);
    bool *drop = calloc(total ? total : 1, sizeof *drop);
    vref *v = malloc((total ? total : 1) * sizeof *v);
    if (!ts || !drop || !v) {
        free(ts);
        free(drop);
        free(v);
        return mp_err(err, "no_memory", "out of memory");
    }
    size_t nv = 0, flat = 0;
    for (size_t wi = 0; wi < s->n; wi++)
        for (size_t i = 0; i < s->ws[wi]->ntensors; i++, flat++)
            if (s->ws[wi]->tensors[i].storage_id >= 0)
                v[nv++] = (vref){&s->ws[wi]->tensors[i], wi, flat};
    if (nv > 1) qsort(v, nv, sizeof *v, cmp_vref);
    *ntied = 0;
    for (size_t a = 1; a < nv; a++)
        for (size_t b = a; b-- > 0;) {
            if (v[b].wi != v[a].wi || v[b].t->file_index != v[a].t->file_index ||
                v[b].t->storage_id != v[a].t->storage_id ||
                v[b].t->storage_offset != v[a].t->storage_offset)
                break;
            if (!drop[v[b].idx] && pt_same_view(v[a].t, v[b].t)) {
                drop[v[a].idx] = true;
                (*ntied)++;
                break;
            }
        }
    size_t n = 0;
    flat = 0;
    for (size_t wi = 0; wi < s->n; wi++)
        for (size_t i = 0; i < s->ws[wi]->ntensors; i++, flat++)
            if (!drop[flat]) ts[n++] = s->ws[wi]->tensors[i];
    free(drop);
    free(v);
    *out = ts;
    *nout = n;
    return 0;
}

static const char *dtype_label(const mp_tensor *t) {
    if (t->dtype != MP_DT_GGML) return mp_dtype_name(t->dtype);
    const char *s = gguf_type_name(t->ggml_type);
    return s ? s : "GGML";
}

static json_t *by_dtype(const mp_tensor *ts, size_t n, uint64_t *params, uint64_t *bytes) {
    json_t *o = json_object();
    *params = *bytes = 0;
    for (size_t i = 0; o && i < n; i++) {
        uint64_t numel = 0;
        mp_shape_numel(ts[i].shape, ts[i].ndim, &numel);
        *params += numel;
        *bytes += ts[i].nbytes;
        const char *k = dtype_label(&ts[i]);
        json_t *e = json_object_get(o, k);
        if (!e) {
            e = json_pack("{s:I,s:I,s:I}", "tensors", (json_int_t)0, "params", (json_int_t)0,
                          "bytes", (json_int_t)0);
            json_object_set_new(o, k, e);
        }
        json_object_set_new(e, "tensors",
                            json_integer(json_integer_value(json_object_get(e, "tensors")) + 1));
        json_object_set_new(
            e, "params",
            json_integer(json_integer_value(json_object_get(e, "params")) + (json_int_t)numel));
        json_object_set_new(e, "bytes",
                            json_integer(json_integer_value(json_object_get(e, "bytes")) +
                                         (json_int_t)ts[i].nbytes));
    }
    return o;
}

/* ------------------------------------------------------------------------ */
/* quantization                                                              */

static int type_bits(const char *name) {
    for (const char *p = name; *p; p++)
        if (*p >= '1' && *p <= '9') return *p - '0';
    return 0;
}

static json_t *gguf_quant(const mp_weights *w, const mp_tensor *ts, size_t n) {
    json_t *hist = json_object();
    const char *best = NULL;
    json_int_t best_n = 0;
    bool any = false;
    uint64_t numel_all = 0, bytes_all = 0;
    for (size_t i = 0; i < n; i++) {
        const char *k = dtype_label(&ts[i]);
        json_int_t c = json_integer_value(json_object_get(hist, k)) + 1;
        json_object_set_new(hist, k, json_integer(c));
        uint64_t numel = 0;
        mp_shape_numel(ts[i].shape, ts[i].ndim, &numel);
        numel_all += numel;
        bytes_all += ts[i].nbytes;
        if (ts[i].dtype == MP_DT_GGML) {
            any = true;
            if (c > best_n) {
                best_n = c;
                best = k;
            }
        }
    }
    json_t *q = json_pack("{s:s?,s:n,s:n,s:s,s:[],s:n,s:n,s:n,s:o}", "method", any ? "gguf" : NULL,
                          "bits", "group_size", "source", "gguf", "ignored_layers",
                          "weight_block_size", "activation_scheme", "kv_cache", "types", hist);
    if (!q) return NULL;
    if (best) {
        int b = type_bits(best);
        if (b) json_object_set_new(q, "bits", json_integer(b));
        int g = gguf_type_from_name(best);
        if (g >= 0) json_object_set_new(q, "group_size", json_integer(gguf_type_block_size(g)));
        json_object_set_new(q, "main_type", json_string(best));
    }
    if (numel_all)
        json_object_set_new(q, "bits_per_weight",
                            json_real((double)bytes_all * 8.0 / (double)numel_all));
    json_t *ft = json_object_get(w->metadata, "general.file_type");
    if (json_is_integer(ft)) json_object_set(q, "file_type", ft);
    return q;
}

static json_t *declared_quant(const json_t *cfg, const char *dir, json_t *warnings, mp_error *err) {
    json_t *qc = json_object_get(cfg, "quantization_config");
    if (!qc) qc = json_object_get(json_object_get(cfg, "text_config"), "quantization_config");
    if (!qc) qc = json_object_get(cfg, "compression_config");
    if (json_is_object(qc)) return insp_quant_from_config(qc, "config.json", warnings);
    static const char *const files[] = {"hf_quant_config.json", "quantize_config.json",
                                        "quant_config.json", NULL};
    for (int i = 0; files[i]; i++) {
        if (!is_file(dir, files[i])) continue;
        mp_error e = {0};
        json_t *doc = read_json(dir, files[i], &e);
        if (!doc) {
            char msg[600];
            snprintf(msg, sizeof msg, "%s: %s", files[i], e.message);
            json_array_append_new(warnings, json_string(msg));
            continue;
        }
        json_t *q = insp_quant_from_config(doc, files[i], warnings);
        json_decref(doc);
        return q;
    }
    (void)err;
    return NULL;
}

static json_t *null_quant(void) {
    return json_pack("{s:n,s:n,s:n,s:n,s:[],s:n,s:n,s:n}", "method", "bits", "group_size", "source",
                     "ignored_layers", "weight_block_size", "activation_scheme", "kv_cache");
}

static void kv_scales(json_t *q, const insp_opts *o, const json_t *cfg, int64_t nlayers) {
    json_t *kv = json_object_get(q, "kv_cache");
    if (!json_is_object(kv)) {
        kv = json_pack("{s:s,s:s}", "dtype", "fp8_e4m3", "source", "scales_file");
        json_object_set_new(q, "kv_cache", kv);
    }
    json_object_set_new(kv, "scales_file", json_string(o->kv_scales_path));
    char reason[512] = "";
    int64_t tp = 0;
    bool ok = false;
    char *text = NULL;
    size_t len = 0;
    mp_error e = {0};
    if (fs_read_all(o->kv_scales_path, CONFIG_MAX, &text, &len, &e) != 0) {
        snprintf(reason, sizeof reason, "%s", e.message);
    } else {
        json_error_t je;
        json_t *doc = json_loadb(text, len, 0, &je);
        if (!doc)
            snprintf(reason, sizeof reason, "not JSON: %s (line %d)", je.text, je.line);
        else
            ok = insp_kv_scales_check(doc, json_string_value(json_object_get(cfg, "model_type")),
                                      nlayers, &tp, reason, sizeof reason);
        json_decref(doc);
    }
    free(text);
    json_object_set_new(kv, "valid", json_boolean(ok));
    json_object_set_new(kv, "reason", ok ? json_null() : json_string(reason));
    if (ok) json_object_set_new(kv, "tp_size", json_integer(tp));
}

/* ------------------------------------------------------------------------ */
/* per-TP bytes                                                              */

static json_t *per_tp(const insp_opts *o, const json_t *cfg, const mp_tensor *ts, size_t n,
                      bool gguf_names, const char *gguf_arch, uint64_t bytes_total,
                      json_t *warnings) {
    static const int64_t defaults[] = {1, 2, 4, 8};
    const int64_t *tps = o->tp_sizes ? o->tp_sizes : defaults;
    size_t ntp = o->tp_sizes ? o->ntp : 4;
    json_t *arr = json_array();
    tp_model_cfg tc;
    mp_error cerr = {0};
    bool have_cfg = cfg && tp_config_from_json(cfg, &tc, &cerr) == 0;
    /* GGUF tensors are split under their Hugging Face names. */
    mp_tensor *hf = NULL;
    char(*names)[TP_NAME_MAX] = NULL;
    size_t nhf = n;
    if (gguf_names) {
        hf = malloc((n ? n : 1) * sizeof *hf);
        names = malloc((n ? n : 1) * sizeof *names);
        nhf = 0;
        for (size_t i = 0; hf && names && i < n; i++) {
            int r = gguf_name_to_hf(gguf_arch ? gguf_arch : "", ts[i].name, names[nhf],
                                    sizeof names[nhf]);
            if (r == 1) continue;
            hf[nhf] = ts[i];
            if (r == 0) hf[nhf].name = names[nhf];
            nhf++;
        }
    }
    const mp_tensor *use = gguf_names && hf ? hf : ts;
    for (size_t i = 0; i < ntp; i++) {
        int64_t tp = tps[i];
        json_t *e = json_pack("{s:I}", "tp", (json_int_t)tp);
        mp_error err = {0};
        uint64_t b = 0;
        int rc = -1;
        if (!have_cfg)
            mp_err(&err, cerr.code[0] ? cerr.code : "bad_config", "%s",
                   cerr.message[0] ? cerr.message : "no config to split by");
        else if (tp_check(&tc, (int)tp, &err) == 0)
            rc = tp_max_rank_bytes(&tc, use, nhf, (int)tp, &b, &err);
        if (rc == 0) {
            json_object_set_new(e, "bytes_per_rank", json_integer((json_int_t)b));
            json_object_set_new(e, "ok", json_true());
        } else if (tp == 1) {
            /* One rank holds the whole checkpoint whatever the rules say. */
            json_object_set_new(e, "bytes_per_rank", json_integer((json_int_t)bytes_total));
            json_object_set_new(e, "ok", json_true());
            json_object_set_new(e, "note", json_string(err.message));
        } else {
            json_object_set_new(e, "bytes_per_rank", json_null());
            json_object_set_new(e, "ok", json_false());
            json_object_set_new(e, "code", json_string(err.code));
            json_object_set_new(e, "reason", json_string(err.message));
        }
        json_array_append_new(arr, e);
    }
    (void)warnings;
    free(hf);
    free(names);
    return arr;
}

/* ------------------------------------------------------------------------ */

static json_t *dir_names(const char *dir, mp_error *err) {
    DIR *d = opendir(dir);
    if (!d) {
        mp_err(err, errno == ENOENT ? "not_found" : "io_error", "%s: %s", dir, strerror(errno));
        return NULL;
    }
    json_t *names = json_array();
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        if (!is_file(dir, e->d_name)) continue;
        json_array_append_new(names, json_string(e->d_name));
    }
    closedir(d);
    return names;
}

static int64_t cfg_int(const json_t *cfg, const char *k) {
    json_t *v = json_object_get(cfg, k);
    if (!v) v = json_object_get(json_object_get(cfg, "text_config"), k);
    return json_is_integer(v) ? (int64_t)json_integer_value(v) : -1;
}

/* insp_run's state, step to step. */
typedef struct insp_state {
    const insp_opts *o;
    json_t *names;    /* the folder's file names */
    json_t *warnings; /* so far */
    wset ws;
    bool gguf;
    json_t *cfg; /* config.json, one derived from the GGUF's metadata, or NULL */
    mp_tensor *ts;
    size_t n, ntied;
    json_t *q; /* the quantization found */
} insp_state;

/* A GGUF without config.json: a config derived from its metadata, if any. */
static void derive_gguf_config(insp_state *s) {
    mp_error ge = {0};
    s->cfg = gguf_hf_config_weights(s->ws.ws[0], &ge);
    if (s->cfg) {
        json_array_append_new(s->warnings, json_string("no config.json: config derived from the "
                                                       "GGUF metadata"));
    } else {
        char msg[600];
        snprintf(msg, sizeof msg, "no config.json, and none derivable from the GGUF: %s",
                 ge.message);
        json_array_append_new(s->warnings, json_string(msg));
    }
}

/* The config, the weights and their tensors. */
static int insp_open(insp_state *s, mp_error *err) {
    const insp_opts *o = s->o;
    mp_error cerr = {0};
    s->cfg = read_json(o->model_dir, "config.json", &cerr);
    if (!s->cfg && strcmp(cerr.code, "not_found") != 0)
        return mp_err(err, cerr.code, "%s", cerr.message);
    if (open_weights(o->model_dir, s->names, &s->ws, s->warnings, err) != 0) return -1;
    s->gguf = s->ws.format == MP_FMT_GGUF;
    if (!s->cfg && s->gguf) derive_gguf_config(s);
    if (!s->cfg && !s->gguf)
        return mp_err(err, "not_found", "config.json is missing in %s", o->model_dir);
    if (collect(&s->ws, &s->ts, &s->n, &s->ntied, err) != 0) return -1;
    return 0;
}

/* The quantization: as declared (config or a side file), else as the GGUF
 * or the tensors show it; then checked against the tensors, and the KV
 * scales file asked about. */
static void insp_quantization(insp_state *s) {
    mp_error qerr = {0};
    s->q = s->cfg ? declared_quant(s->cfg, s->o->model_dir, s->warnings, &qerr) : NULL;
    if (!s->q && s->gguf) s->q = gguf_quant(s->ws.ws[0], s->ts, s->n);
    if (!s->q) s->q = insp_quant_from_tensors(s->ts, s->n);
    if (!s->q) s->q = null_quant();
    if (!json_is_null(json_object_get(s->q, "method")) || !s->gguf)
        insp_quant_refine(s->q, s->ts, s->n, s->warnings);
    int64_t nlayers = s->cfg ? cfg_int(s->cfg, "num_hidden_layers") : -1;
    if (s->o->kv_scales_path) kv_scales(s->q, s->o, s->cfg, nlayers);
}

/* The weight files' base names. */
static json_t *weight_files(const wset *ws) {
    json_t *files = json_array();
    for (size_t wi = 0; wi < ws->n; wi++)
        for (uint32_t f = 0; f < ws->ws[wi]->nfiles; f++) {
            const char *p = ws->ws[wi]->files[f];
            const char *slash = strrchr(p, '/');
            json_array_append_new(files, json_string(slash ? slash + 1 : p));
        }
    return files;
}

static int insp_result(insp_state *s, double t0, json_t **result, mp_error *err) {
    const json_t *cfg = s->cfg;
    uint64_t params = 0, bytes = 0;
    json_t *bd = by_dtype(s->ts, s->n, &params, &bytes);
    const char *arch_gguf =
        s->gguf ? json_string_value(json_object_get(s->ws.ws[0]->metadata, "general.architecture"))
                : NULL;
    json_t *archs = json_object_get(cfg, "architectures");
    const char *arch = json_string_value(json_array_get(archs, 0));
    const char *mt = json_string_value(json_object_get(cfg, "model_type"));
    json_t *tc = json_object_get(cfg, "text_config");
    const char *text_mt = json_string_value(json_object_get(tc, "model_type"));
    if (!arch) arch = json_string_value(json_array_get(json_object_get(tc, "architectures"), 0));
    json_t *formats = cache_formats_of(s->names);
    json_t *files = weight_files(&s->ws);
    json_t *ptp = per_tp(s->o, cfg, s->ts, s->n, s->gguf, arch_gguf, bytes, s->warnings);
    if (s->ntied) {
        char msg[128];
        snprintf(msg, sizeof msg, "%zu tied tensor(s) share storage and are counted once",
                 s->ntied);
        json_array_append_new(s->warnings, json_string(msg));
    }
    json_t *res = json_pack("{s:s?,s:s?,s:s?,s:o,s:o,s:I,s:I,s:I,s:o,s:O,s:o,s:O}", "architecture",
                            arch, "model_type", mt, "text_model_type", text_mt, "formats",
                            formats ? formats : json_array(), "files", files, "params_total",
                            (json_int_t)params, "bytes_total", (json_int_t)bytes, "tensors",
                            (json_int_t)s->n, "tensors_by_dtype", bd, "quantization", s->q,
                            "per_tp", ptp, "warnings", s->warnings);
    if (!res) return mp_err(err, "no_memory", "out of memory");
    json_object_set_new(res, "format",
                        json_string(s->ws.format == MP_FMT_SAFETENSORS ? "safetensors"
                                    : s->gguf                          ? "gguf"
                                                                       : "pt"));
    if (s->ws.gguf_file) json_object_set_new(res, "gguf_file", json_string(s->ws.gguf_file));
    json_object_set_new(res, "seconds", json_real(now_s() - t0));
    *result = res;
    return 0;
}

int insp_run(const insp_opts *o, json_t **result, mp_error *err) {
    *result = NULL;
    double t0 = now_s();
    insp_state s = {.o = o, .warnings = json_array()};
    s.names = dir_names(o->model_dir, err);
    if (!s.names) {
        json_decref(s.warnings);
        return -1;
    }
    int rc = insp_open(&s, err);
    if (rc == 0) {
        insp_quantization(&s);
        rc = insp_result(&s, t0, result, err);
    }
    free(s.ts);
    wset_free(&s.ws);
    json_decref(s.cfg);
    json_decref(s.q);
    json_decref(s.names);
    json_decref(s.warnings);
    return rc;
}
