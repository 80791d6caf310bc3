/* load_source.c - which weight files a warm_load reads, in which format.
 * "auto" follows SGLang's DefaultModelLoader (_prepare_weights): the first
 * of *.safetensors, *.bin, *.pt present at the top level wins, safetensors
 * filtered through model.safetensors.index.json, .bin/.pt through the
 * training-state blacklist. We sort the names (SGLang keeps glob order) and
 * also accept a directory holding *.gguf files. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loader/warm/warm.h"
#include "loader/formats/npy/npy.h"
#include "loader/formats/safetensors/safetensors.h"
#include "loader/tp_rules/tp_rules.h"
#include "util/fsutil.h"

#define LOAD_MAX_FILES 100000

static const char *const FORMAT_NAMES[] = {"auto",    "safetensors",   "pt",    "gguf",
                                           "npcache", "sharded_state", "dummy", NULL};

int load_format_from_name(const char *s) {
    for (int i = 0; s && FORMAT_NAMES[i]; i++)
        if (strcmp(s, FORMAT_NAMES[i]) == 0) return i;
    return -1;
}

const char *load_format_name(load_format f) {
    return (int)f >= 0 && f <= LOAD_FMT_DUMMY ? FORMAT_NAMES[f] : "?";
}

typedef struct namelist {
    char **v;
    size_t n;
} namelist;

static void names_free(namelist *l) {
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* SGLang's filter_files_not_needed_for_inference: a suffix match. */
static bool training_state(const char *name) {
    static const char *const bl[] = {"training_args.bin", "optimizer.bin", "optimizer.pt",
                                     "scheduler.pt", "scaler.pt"};
    size_t n = strlen(name);
    for (size_t i = 0; i < sizeof bl / sizeof *bl; i++) {
        size_t m = strlen(bl[i]);
        if (n >= m && strcmp(name + n - m, bl[i]) == 0) return true;
    }
    return false;
}

/* Regular files (links followed) at the top level of dir matching pattern. */
static int glob_top(const char *dir, const char *pattern, namelist *out, mp_error *err) {
    DIR *d = opendir(dir);
    if (!d) return mp_err(err, "not_found", "cannot open %s: %s", dir, strerror(errno));
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' || fnmatch(pattern, e->d_name, 0) != 0) continue;
        char path[PATH_MAX];
        struct stat st;
        if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) >= (int)sizeof path ||
            stat(path, &st) != 0 || !S_ISREG(st.st_mode))
            continue;
        if (out->n >= LOAD_MAX_FILES) {
            rc = mp_err(err, "too_large", "over %d weight files", LOAD_MAX_FILES);
            break;
        }
        char **nv = realloc(out->v, (out->n + 1) * sizeof *nv);
        if (!nv || !(nv[out->n] = strdup(e->d_name))) {
            if (nv) out->v = nv;
            rc = mp_err(err, "no_memory", "out of memory");
            break;
        }
        out->v = nv;
        out->n++;
    }
    closedir(d);
    if (rc == 0 && out->n) qsort(out->v, out->n, sizeof *out->v, cmp_str);
    return rc;
}

static void drop_if(namelist *l, bool (*pred)(const char *)) {
    size_t k = 0;
    for (size_t i = 0; i < l->n; i++) {
        if (pred(l->v[i]))
            free(l->v[i]);
        else
            l->v[k++] = l->v[i];
    }
    l->n = k;
}

/* Keeps only the shards model.safetensors.index.json names (when present). */
static int filter_by_index(const char *dir, namelist *l, mp_error *err) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (access(path, F_OK) != 0) return 0;
    st_index idx = {0};
    if (st_index_read(path, &idx, err) != 0) return -1;
    size_t k = 0;
    for (size_t i = 0; i < l->n; i++) {
        bool keep = bsearch(&l->v[i], idx.files, idx.nfiles, sizeof *idx.files, cmp_str) != NULL;
        if (keep)
            l->v[k++] = l->v[i];
        else
            free(l->v[i]);
    }
    l->n = k;
    st_index_free(&idx);
    return 0;
}

static int add_file(load_source *src, mp_weights *w, int rank, mp_error *err) {
    load_file *nf = realloc(src->files, (src->nfiles + 1) * sizeof *nf);
    if (!nf) {
        weights_close(w);
        return mp_err(err, "no_memory", "out of memory");
    }
    src->files = nf;
    load_file *f = &src->files[src->nfiles++];
    memset(f, 0, sizeof *f);
    f->w = w;
    f->rank = rank;
    if (w->format == MP_FMT_SAFETENSORS && stc_is_encrypted(w)) {
        if (stc_file_open(w, &f->crypt, err) != 0) return -1;
        src->encrypted = true;
    }
    return 0;
}

static int open_list(load_source *src, const char *dir, const namelist *l, int rank,
                     mp_error *err) {
    for (size_t i = 0; i < l->n; i++) {
        char path[PATH_MAX];
        if (snprintf(path, sizeof path, "%s/%s", dir, l->v[i]) >= (int)sizeof path)
            return mp_err(err, "bad_path", "path too long");
        mp_weights *w = NULL;
        if (weights_open(path, &w, err) != 0) return -1;
        if (add_file(src, w, rank, err) != 0) return -1;
    }
    return 0;
}

static int open_npcache(load_source *src, const char *dir, mp_error *err) {
    char np[PATH_MAX], marker[PATH_MAX];
    snprintf(np, sizeof np, "%s/np", dir);
    snprintf(marker, sizeof marker, "%s/weight_names.json", np);
    const char *use = access(marker, F_OK) == 0 ? np : dir;
    snprintf(marker, sizeof marker, "%s/weight_names.json", use);
    if (access(marker, F_OK) != 0)
        return mp_err(err, "not_found", "no npcache (np/weight_names.json) under the model");
    mp_weights *w = calloc(1, sizeof *w);
    if (!w) return mp_err(err, "no_memory", "out of memory");
    if (npcache_open(use, w, err) != 0) {
        weights_close(w);
        return -1;
    }
    return add_file(src, w, -1, err);
}

static int open_sharded(load_source *src, const char *dir, int tp, mp_error *err) {
    for (int r = 0; r < tp; r++) {
        char pat[64];
        snprintf(pat, sizeof pat, "model-rank-%d-part-*.safetensors", r);
        namelist l = {0};
        int rc = glob_top(dir, pat, &l, err);
        if (rc == 0 && l.n == 0)
            rc = mp_err(err, "not_found",
                        "no files %s: only pre-sharded checkpoints for this tp_size load "
                        "as sharded_state",
                        pat);
        if (rc == 0) rc = open_list(src, dir, &l, r, err);
        names_free(&l);
        if (rc != 0) return -1;
    }
    /* A rank's files hold only that rank's slices: more ranks on disk than
     * tp_size would be a different split. */
    char pat[64];
    snprintf(pat, sizeof pat, "model-rank-%d-part-*.safetensors", tp);
    namelist extra = {0};
    int rc = glob_top(dir, pat, &extra, err);
    bool more = extra.n > 0;
    names_free(&extra);
    if (rc != 0) return -1;
    if (more)
        return mp_err(err, "bad_request", "the checkpoint has more ranks than tp_size %d", tp);
    return 0;
}

/* The weight files auto would pick, in *l; *fmt_out gets the format. */
static int pick_auto(const char *dir, namelist *l, load_format *fmt_out, mp_error *err) {
    static const struct {
        const char *pat;
        load_format fmt;
    } order[] = {{"*.safetensors", LOAD_FMT_SAFETENSORS},
                 {"*.bin", LOAD_FMT_PT},
                 {"*.pt", LOAD_FMT_PT},
                 {"*.gguf", LOAD_FMT_GGUF}};
    for (size_t i = 0; i < sizeof order / sizeof *order; i++) {
        if (glob_top(dir, order[i].pat, l, err) != 0) return -1;
        if (order[i].fmt == LOAD_FMT_SAFETENSORS && filter_by_index(dir, l, err) != 0) return -1;
        if (order[i].fmt == LOAD_FMT_PT) drop_if(l, training_state);
        if (l->n) {
            *fmt_out = order[i].fmt;
            return 0;
        }
        names_free(l);
    }
    return mp_err(err, "not_found", "cannot find any model weights under %s", dir);
}

static void load_config(load_source *src, const char *dir) {
    if (src->config) return;
    char cpath[PATH_MAX];
    snprintf(cpath, sizeof cpath, "%s/config.json", dir);
    src->config = json_load_file(cpath, 0, NULL);
    if (src->config && !json_is_object(src->config)) {
        json_decref(src->config);
        src->config = NULL;
    }
}

static int synth_add(mp_weights *w, mp_dtype dt, int64_t d0, int64_t d1, mp_error *err,
                     const char *fmt, ...) __attribute__((format(printf, 6, 7)));
static int synth_add(mp_weights *w, mp_dtype dt, int64_t d0, int64_t d1, mp_error *err,
                     const char *fmt, ...) {
    mp_tensor *t = weights_add_tensor(w, err);
    if (!t) return -1;
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    t->name = strdup(name);
    t->dtype = dt;
    t->ndim = d1 > 0 ? 2 : 1;
    t->shape[0] = d0;
    t->shape[1] = d1 > 0 ? d1 : 0;
    mp_tensor_set_contiguous(t);
    if (!t->name || !mp_tensor_bytes(dt, t->shape, t->ndim, &t->nbytes))
        return mp_err(err, "bad_config", "config.json gives unusable sizes");
    t->data_bytes = t->nbytes;
    return 0;
}

/* A dummy load of a model without weight files: the HF tensor list of a
 * dense llama-family model (llama, mistral, qwen2, qwen3), sized from
 * config.json, in torch_dtype (bf16 when absent). Nothing is ever read. */
static int synth_from_config(load_source *src, mp_error *err) {
    tp_model_cfg c;
    if (!src->config || tp_config_from_json(src->config, &c, err) != 0)
        return mp_err(err, "not_found",
                      "dummy needs the checkpoint's headers or config.json for shapes");
    if ((c.family != TP_FAM_LLAMA && c.family != TP_FAM_QWEN2 && c.family != TP_FAM_QWEN3) ||
        c.num_layers < 1 || c.num_layers > 100000 || c.hidden_size < 1 || c.num_heads < 1 ||
        c.num_kv_heads < 1 || c.head_dim < 1 || c.intermediate_size < 1 || c.vocab_size < 1)
        return mp_err(err, "not_found",
                      "no weight files, and config.json is not a dense llama-family model to "
                      "derive shapes from");
    const char *td = json_string_value(json_object_get(src->config, "torch_dtype"));
    mp_dtype dt = td && !strcmp(td, "float32")   ? MP_DT_F32
                  : td && !strcmp(td, "float16") ? MP_DT_F16
                                                 : MP_DT_BF16;
    mp_weights *w = calloc(1, sizeof *w);
    if (!w) return mp_err(err, "no_memory", "out of memory");
    int64_t h = c.hidden_size, q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
    int64_t in = c.intermediate_size;
    int rc = synth_add(w, dt, c.vocab_size, h, err, "model.embed_tokens.weight");
    for (int64_t l = 0; rc == 0 && l < c.num_layers; l++) {
        const char *a = "model.layers.%lld.self_attn.", *m = "model.layers.%lld.mlp.";
        char f[128];
        long long L = (long long)l;
#define ADD(fmt_tail, base, d0, d1)                                                                \
    do {                                                                                           \
        snprintf(f, sizeof f, "%s%s", base, fmt_tail);                                             \
        if (rc == 0) rc = synth_add(w, dt, d0, d1, err, f, L);                                     \
    } while (0)
        ADD("q_proj.weight", a, q, h);
        ADD("k_proj.weight", a, kv, h);
        ADD("v_proj.weight", a, kv, h);
        ADD("o_proj.weight", a, h, q);
        if (c.family == TP_FAM_QWEN2) {
            ADD("q_proj.bias", a, q, 0);
            ADD("k_proj.bias", a, kv, 0);
            ADD("v_proj.bias", a, kv, 0);
        }
        if (c.family == TP_FAM_QWEN3) {
            ADD("q_norm.weight", a, c.head_dim, 0);
            ADD("k_norm.weight", a, c.head_dim, 0);
        }
        ADD("gate_proj.weight", m, in, h);
        ADD("up_proj.weight", m, in, h);
        ADD("down_proj.weight", m, h, in);
        ADD("input_layernorm.weight", "model.layers.%lld.", h, 0);
        ADD("post_attention_layernorm.weight", "model.layers.%lld.", h, 0);
#undef ADD
    }
    if (rc == 0) rc = synth_add(w, dt, h, 0, err, "model.norm.weight");
    if (rc == 0 && !c.tie_word_embeddings)
        rc = synth_add(w, dt, c.vocab_size, h, err, "lm_head.weight");
    if (rc != 0) {
        weights_close(w);
        return -1;
    }
    return add_file(src, w, -1, err);
}

int load_source_open(const char *dir, load_format fmt, int tp_size, load_source *src,
                     mp_error *err) {
    memset(src, 0, sizeof *src);
    namelist l = {0};
    int rc = 0;
    load_format got = fmt;
    switch (fmt) {
    case LOAD_FMT_AUTO:
    case LOAD_FMT_DUMMY:
        rc = pick_auto(dir, &l, &got, err);
        if (rc != 0 && fmt == LOAD_FMT_DUMMY) {
            /* shapes may also come from an npcache, or from config.json */
            mp_error_clear(err);
            rc = open_npcache(src, dir, err);
            if (rc != 0) {
                mp_error_clear(err);
                load_config(src, dir);
                rc = synth_from_config(src, err);
            }
        }
        break;
    case LOAD_FMT_SAFETENSORS:
        rc = glob_top(dir, "*.safetensors", &l, err);
        if (rc == 0) rc = filter_by_index(dir, &l, err);
        if (rc == 0 && l.n == 0) rc = mp_err(err, "not_found", "no *.safetensors under the model");
        break;
    case LOAD_FMT_PT:
        rc = glob_top(dir, "*.bin", &l, err);
        if (rc == 0 && l.n == 0) rc = glob_top(dir, "*.pt", &l, err);
        if (rc == 0) drop_if(&l, training_state);
        if (rc == 0 && l.n == 0) rc = mp_err(err, "not_found", "no *.bin or *.pt under the model");
        break;
    case LOAD_FMT_GGUF:
        rc = glob_top(dir, "*.gguf", &l, err);
        if (rc == 0 && l.n == 0) rc = mp_err(err, "not_found", "no *.gguf under the model");
        break;
    case LOAD_FMT_NPCACHE:
        rc = open_npcache(src, dir, err);
        break;
    case LOAD_FMT_SHARDED_STATE:
        rc = open_sharded(src, dir, tp_size, err);
        break;
    }
    if (rc == 0 && l.n) rc = open_list(src, dir, &l, -1, err);
    names_free(&l);
    src->format = fmt == LOAD_FMT_AUTO ? got : fmt;
    if (rc == 0) load_config(src, dir);
    if (rc != 0) load_source_free(src);
    return rc;
}

int load_source_add(load_source *src, mp_weights *w, mp_error *err) {
    return add_file(src, w, -1, err);
}

void load_source_open_direct(load_source *src) {
    for (size_t i = 0; i < src->nfiles; i++) {
        load_file *f = &src->files[i];
        if (f->dio_fds || !f->w->nfiles) continue;
        f->dio_fds = malloc(f->w->nfiles * sizeof *f->dio_fds);
        if (!f->dio_fds) continue;
        for (uint32_t k = 0; k < f->w->nfiles; k++)
            f->dio_fds[k] = open(f->w->files[k], O_RDONLY | O_CLOEXEC | O_DIRECT);
    }
}

void load_source_free(load_source *src) {
    for (size_t i = 0; i < src->nfiles; i++) {
        load_file *f = &src->files[i];
        if (f->dio_fds)
            for (uint32_t k = 0; k < f->w->nfiles; k++)
                if (f->dio_fds[k] >= 0) close(f->dio_fds[k]);
        free(f->dio_fds);
        stc_file_free(&f->crypt);
        weights_close(f->w);
    }
    free(src->files);
    json_decref(src->config);
    memset(src, 0, sizeof *src);
}
