/*
 * convert_plan.c - the pure parts of convert: which files of a model folder
 * are converted, how tensors are split into shards and named, dtype casts,
 * and where the output may go. No tensor data is touched here.
 */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "loader/convert/convert.h"
#include "util/tensor/cast.h"

static bool ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

/* Files transformers' Trainer leaves next to the weights: pickles of
 * arbitrary objects that no loader reads (SGLang's
 * filter_files_not_needed_for_inference drops the same names). */
static bool is_training_state(const char *name) {
    static const char *const names[] = {"training_args.bin",
                                        "optimizer.bin",
                                        "optimizer.pt",
                                        "scheduler.pt",
                                        "scaler.pt",
                                        "rng_state.pth",
                                        NULL};
    for (int i = 0; names[i]; i++)
        if (strcmp(name, names[i]) == 0) return true;
    return strncmp(name, "rng_state_", 10) == 0 && ends_with(name, ".pth");
}

bool conv_is_weight_file(const char *name) {
    static const char *const exts[] = {
        ".bin", ".pt",  ".pth",  ".safetensors", ".gguf",   ".ckpt", ".h5",         ".msgpack",
        ".npy", ".npz", ".onnx", ".pkl",         ".tflite", ".ot",   ".index.json", NULL};
    for (int i = 0; exts[i]; i++)
        if (ends_with(name, exts[i])) return true;
    return is_training_state(name);
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

void conv_free_paths(char **paths, size_t n) {
    for (size_t i = 0; paths && i < n; i++)
        free(paths[i]);
    free(paths);
}

static bool regular(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static int push(char ***v, size_t *n, const char *dir, const char *name, mp_error *err) {
    char *p = NULL;
    if (asprintf(&p, "%s/%s", dir, name) < 0) return mp_err(err, "no_memory", "out of memory");
    char **nv = realloc(*v, (*n + 1) * sizeof *nv);
    if (!nv) {
        free(p);
        return mp_err(err, "no_memory", "out of memory");
    }
    *v = nv;
    (*v)[(*n)++] = p;
    return 0;
}

int conv_find_sources(const char *dir, char ***paths, size_t *n, mp_error *err) {
    *paths = NULL;
    *n = 0;
    char idx[PATH_MAX];
    if (snprintf(idx, sizeof idx, "%s/pytorch_model.bin.index.json", dir) >= (int)sizeof idx)
        return mp_err(err, "bad_model", "model path too long");
    if (regular(idx)) return push(paths, n, dir, "pytorch_model.bin.index.json", err);
    DIR *d = opendir(dir);
    if (!d) return mp_err(err, "io_error", "open %s: %s", dir, strerror(errno));
    char **pt = NULL, **gg = NULL;
    size_t npt = 0, ngg = 0;
    bool has_st = false;
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        const char *nm = e->d_name;
        if (nm[0] == '.') continue;
        char full[PATH_MAX];
        if (snprintf(full, sizeof full, "%s/%s", dir, nm) >= (int)sizeof full || !regular(full))
            continue;
        if (ends_with(nm, ".safetensors")) has_st = true;
        if ((ends_with(nm, ".bin") || ends_with(nm, ".pt") || ends_with(nm, ".pth")) &&
            !is_training_state(nm)) {
            if (npt >= 100000) rc = mp_err(err, "too_large", "too many weight files");
            if (rc == 0) rc = push(&pt, &npt, dir, nm, err);
        } else if (ends_with(nm, ".gguf")) {
            if (ngg >= 100000) rc = mp_err(err, "too_large", "too many weight files");
            if (rc == 0) rc = push(&gg, &ngg, dir, nm, err);
        }
    }
    closedir(d);
    if (rc == 0 && npt > 0) {
        qsort(pt, npt, sizeof *pt, cmp_str);
        *paths = pt;
        *n = npt;
        pt = NULL;
        npt = 0;
    } else if (rc == 0 && ngg == 1) {
        *paths = gg;
        *n = 1;
        gg = NULL;
        ngg = 0;
    } else if (rc == 0 && ngg > 1) {
        rc = mp_err(err, "ambiguous", "%s holds %zu GGUF files; name one with params.file", dir,
                    ngg);
    } else if (rc == 0) {
        rc = mp_err(err, "not_found",
                    has_st ? "%s holds safetensors already: nothing to convert"
                           : "%s holds no .bin, .pt, .pth or .gguf weights",
                    dir);
    }
    conv_free_paths(pt, npt);
    conv_free_paths(gg, ngg);
    return rc;
}

size_t conv_plan_shards(const uint64_t *bytes, size_t n, uint64_t max, uint32_t *shard_of) {
    /* Exactly huggingface_hub's split_state_dict_into_shards_factory: an
     * oversized tensor is appended as a shard of its own when met, while the
     * shard being filled is appended only when it is closed, so shard
     * numbers follow append order, not first-tensor order. */
    const uint32_t PENDING = UINT32_MAX;
    size_t nsh = 0, pend_start = 0;
    uint64_t used = 0;
    bool open = false;
    for (size_t i = 0; i < n; i++) {
        if (bytes[i] > max) {
            shard_of[i] = (uint32_t)nsh++;
            continue;
        }
        if (open && (used + bytes[i] > max || used + bytes[i] < used)) {
            for (size_t j = pend_start; j < i; j++)
                if (shard_of[j] == PENDING) shard_of[j] = (uint32_t)nsh;
            nsh++;
            open = false;
        }
        if (!open) {
            open = true;
            used = 0;
            pend_start = i;
        }
        shard_of[i] = PENDING;
        used += bytes[i];
    }
    if (open) {
        for (size_t j = pend_start; j < n; j++)
            if (shard_of[j] == PENDING) shard_of[j] = (uint32_t)nsh;
        nsh++;
    }
    return nsh;
}

void conv_shard_name(size_t index, size_t nshards, char *out, size_t outsz) {
    if (nshards <= 1)
        snprintf(out, outsz, "model.safetensors");
    else
        snprintf(out, outsz, "model-%05zu-of-%05zu.safetensors", index + 1, nshards);
}

bool conv_castable(mp_dtype dt) {
    return dt == MP_DT_F16 || dt == MP_DT_BF16 || dt == MP_DT_F32 || dt == MP_DT_F64;
}

bool conv_cast(mp_dtype from, mp_dtype to, const void *src, void *dst, size_t n) {
    if (!conv_castable(from) || (to != MP_DT_F16 && to != MP_DT_BF16 && to != MP_DT_F32))
        return false;
    return tensor_cast(from, src, to, dst, n);
}

bool conv_parse_dtype(const char *s, mp_dtype *out) {
    if (!s || strcmp(s, "keep") == 0) {
        *out = MP_DT_INVALID;
        return true;
    }
    if (strcmp(s, "fp16") == 0 || strcmp(s, "float16") == 0)
        *out = MP_DT_F16;
    else if (strcmp(s, "bf16") == 0 || strcmp(s, "bfloat16") == 0)
        *out = MP_DT_BF16;
    else if (strcmp(s, "fp32") == 0 || strcmp(s, "float32") == 0)
        *out = MP_DT_F32;
    else
        return false;
    return true;
}

const char *conv_torch_dtype(mp_dtype dt) {
    switch (dt) {
    case MP_DT_F16:
        return "float16";
    case MP_DT_BF16:
        return "bfloat16";
    case MP_DT_F32:
        return "float32";
    case MP_DT_F64:
        return "float64";
    default:
        return NULL;
    }
}

const char *conv_dominant_torch_dtype(const mp_dtype *dts, const uint64_t *bytes, size_t n) {
    /* Summed per dtype; ties go to the narrower type, which is what a
     * checkpoint saved in that dtype with a few fp32 norms looks like. */
    static const mp_dtype order[] = {MP_DT_BF16, MP_DT_F16, MP_DT_F32, MP_DT_F64};
    uint64_t sum[4] = {0};
    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < 4; k++)
            if (dts[i] == order[k]) sum[k] += bytes[i];
    size_t best = 4;
    for (size_t k = 0; k < 4; k++)
        if (sum[k] > 0 && (best == 4 || sum[k] > sum[best])) best = k;
    return best < 4 ? conv_torch_dtype(order[best]) : NULL;
}

bool conv_config_set_dtype(json_t *cfg, const char *torch_dtype) {
    if (!json_is_object(cfg) || !torch_dtype) return false;
    /* transformers < 4.56 reads "torch_dtype"; newer ones read "dtype" first
     * and fall back to "torch_dtype": both must agree, or one of them loads
     * the weights in the old dtype. Multimodal configs keep the language
     * model's dtype in text_config, which is what SGLang and vLLM use. */
    json_t *targets[2] = {cfg, json_object_get(cfg, "text_config")};
    bool changed = false;
    for (int k = 0; k < 2; k++) {
        json_t *o = targets[k];
        if (!json_is_object(o)) continue;
        static const char *const keys[] = {"torch_dtype", "dtype"};
        for (int j = 0; j < 2; j++) {
            const char *old = json_string_value(json_object_get(o, keys[j]));
            if (old && strcmp(old, torch_dtype) == 0) continue;
            json_object_set_new(o, keys[j], json_string(torch_dtype));
            changed = true;
        }
    }
    return changed;
}

bool conv_default_name(const char *model, const char *revision, bool is_hub, char *out,
                       size_t outsz) {
    int n;
    if (is_hub) {
        const char *slash = strchr(model, '/');
        if (!slash) return false;
        n = snprintf(out, outsz, "%.*s--%s-%s", (int)(slash - model), model, slash + 1,
                     revision && *revision ? revision : "main");
        if (n < 0 || (size_t)n >= outsz) return false;
        for (char *p = out; *p; p++)
            if (*p == '/') *p = '_';
    } else {
        size_t len = strlen(model);
        while (len > 1 && model[len - 1] == '/')
            len--;
        size_t b = len;
        while (b > 0 && model[b - 1] != '/')
            b--;
        n = snprintf(out, outsz, "%.*s", (int)(len - b), model + b);
        if (n <= 0 || (size_t)n >= outsz) return false;
    }
    return strcmp(out, ".") != 0 && strcmp(out, "..") != 0 && out[0] != '.';
}

static bool inside(const char *path, const char *root, bool strict) {
    size_t rl = strlen(root);
    while (rl > 1 && root[rl - 1] == '/')
        rl--;
    if (strncmp(path, root, rl) != 0) return false;
    if (path[rl] == 0) return !strict;
    return path[rl] == '/' || (rl == 1 && root[0] == '/');
}

int conv_confine_output(const char *path, const char *const *roots, const char *forbid,
                        const char *model_dir, char **out, mp_error *err) {
    const char *F = "params.output";
    *out = NULL;
    if (!path || path[0] != '/')
        return mp_err_field(err, F, "bad_output", "output must be an absolute path");
    size_t len = strlen(path);
    if (len >= PATH_MAX - 64) return mp_err_field(err, F, "bad_output", "output path too long");
    /* components: no "." or ".." */
    for (const char *p = path; *p;) {
        while (*p == '/')
            p++;
        const char *q = p;
        while (*q && *q != '/')
            q++;
        size_t cl = (size_t)(q - p);
        if ((cl == 1 && p[0] == '.') || (cl == 2 && p[0] == '.' && p[1] == '.'))
            return mp_err_field(err, F, "bad_output", "output path contains '.' or '..'");
        for (const char *c = p; c < q; c++)
            if ((unsigned char)*c < 0x20)
                return mp_err_field(err, F, "bad_output", "output path has control characters");
        p = q;
    }
    /* deepest existing ancestor */
    char buf[PATH_MAX];
    memcpy(buf, path, len + 1);
    while (len > 1 && buf[len - 1] == '/')
        buf[--len] = 0;
    size_t cut = len;
    char *real = NULL;
    for (;;) {
        char save = buf[cut];
        buf[cut] = 0;
        real = realpath(cut ? buf : "/", NULL);
        buf[cut] = save;
        if (real) break;
        if (errno != ENOENT && errno != ENOTDIR)
            return mp_err_field(err, F, "bad_output", "output %s: %s", path, strerror(errno));
        while (cut > 0 && buf[cut - 1] != '/')
            cut--;
        if (cut > 0) cut--; /* drop the slash */
        if (cut == 0) {
            real = realpath("/", NULL);
            break;
        }
    }
    if (!real) return mp_err_field(err, F, "bad_output", "output %s: no memory", path);
    char resolved[PATH_MAX];
    int n = snprintf(resolved, sizeof resolved, "%s%s", real, buf + cut);
    free(real);
    if (n < 0 || (size_t)n >= sizeof resolved)
        return mp_err_field(err, F, "bad_output", "output path too long");
    /* collapse a "//" that "/" + "/rest" produces */
    if (resolved[0] == '/' && resolved[1] == '/') memmove(resolved, resolved + 1, strlen(resolved));
    struct stat st;
    if (stat(resolved, &st) == 0 && !S_ISDIR(st.st_mode))
        return mp_err_field(err, F, "bad_output", "output %s exists and is not a directory", path);
    bool ok = false;
    for (int i = 0; roots && roots[i]; i++)
        if (inside(resolved, roots[i], true)) ok = true;
    if (!ok)
        return mp_err_field(err, F, "bad_output",
                            "output must be a folder inside a model root or the data dir");
    if (forbid && inside(resolved, forbid, false))
        return mp_err_field(err, F, "bad_output", "output must not be inside the hub cache");
    if (model_dir && inside(model_dir, resolved, false))
        return mp_err_field(err, F, "bad_output",
                            "output must not be the model directory or one of its parents");
    *out = strdup(resolved);
    if (!*out) return mp_err(err, "no_memory", "out of memory");
    return 0;
}
