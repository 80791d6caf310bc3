/*
 * hub_select.c - which files of a hub repo a download fetches.
 *
 * Weights are chosen the way SGLang's DefaultModelLoader._prepare_weights
 * chooses them: the first non-empty group of top-level files among the
 * format's patterns (auto: *.safetensors, *.bin, *.pt), then, for
 * safetensors, only the shards that model.safetensors.index.json names
 * (filter_duplicate_safetensors_files), and for pickles, no training
 * artefacts (filter_files_not_needed_for_inference). Everything at the top
 * level that is not a weight file (configs, tokenizer, generation config,
 * remote code) comes along. allow/ignore patterns then narrow the whole set
 * with huggingface_hub's filter_repo_objects semantics.
 */
#include "loader/hub/hub.h"

#include <string.h>

/* ---- fnmatch, Python flavour ---------------------------------------------- */

/* Tries the bracket expression at p (p[0] == '['). Returns the length of the
 * expression and sets *hit, or 0 when there is no closing ']' (then '[' is an
 * ordinary character, as in Python's fnmatch.translate). */
static size_t class_match(const char *p, char c, bool *hit) {
    size_t i = 1;
    bool neg = false;
    if (p[i] == '!') {
        neg = true;
        i++;
    }
    size_t first = i;
    if (p[i] == ']') i++;
    while (p[i] && p[i] != ']')
        i++;
    if (!p[i]) return 0;
    size_t last = i; /* contents are p[first, last) */
    bool in = false;
    for (size_t k = first; k < last;) {
        if (k + 2 < last && p[k + 1] == '-') {
            /* Python drops reversed ranges: they match nothing. */
            if ((unsigned char)p[k] <= (unsigned char)c &&
                (unsigned char)c <= (unsigned char)p[k + 2])
                in = true;
            k += 3;
        } else {
            if (p[k] == c) in = true;
            k++;
        }
    }
    *hit = neg ? !in : in;
    return last + 1;
}

bool hub_fnmatch(const char *pattern, const char *name) {
    const char *p = pattern, *s = name;
    const char *star_p = NULL, *star_s = NULL;
    while (*s) {
        if (*p == '*') {
            while (*p == '*')
                p++;
            star_p = p;
            star_s = s;
            continue;
        }
        bool ok = false;
        size_t adv = 1;
        if (*p == '?') {
            ok = true;
        } else if (*p == '[') {
            bool hit = false;
            size_t n = class_match(p, *s, &hit);
            if (n) {
                ok = hit;
                adv = n;
            } else {
                ok = (*s == '[');
            }
        } else if (*p) {
            ok = (*p == *s);
        }
        if (ok) {
            p += adv;
            s++;
            continue;
        }
        if (!star_p) return false;
        p = star_p;
        s = ++star_s;
    }
    while (*p == '*')
        p++;
    return *p == 0;
}

/* Applies huggingface_hub's normalisation (backslash -> '/', trailing '/' ->
 * '/ *') to a pattern and matches it. */
static bool pattern_hit(const char *pat, const char *path) {
    char buf[2 * HUB_MAX_PATH];
    size_t n = strlen(pat);
    if (n + 2 > sizeof buf) return false;
    for (size_t i = 0; i < n; i++)
        buf[i] = pat[i] == '\\' ? '/' : pat[i];
    if (n > 0 && buf[n - 1] == '/') buf[n++] = '*';
    buf[n] = 0;
    return hub_fnmatch(buf, path);
}

bool hub_pattern_filter(const char *path, const char *const *allow, size_t nallow,
                        const char *const *ignore, size_t nignore) {
    char norm[HUB_MAX_PATH + 1];
    size_t n = strlen(path);
    if (n > HUB_MAX_PATH) return false;
    for (size_t i = 0; i <= n; i++)
        norm[i] = path[i] == '\\' ? '/' : path[i];
    if (allow) {
        bool any = false;
        for (size_t i = 0; i < nallow && !any; i++)
            any = pattern_hit(allow[i], norm);
        if (!any) return false;
    }
    for (size_t i = 0; ignore && i < nignore; i++)
        if (pattern_hit(ignore[i], norm)) return false;
    return true;
}

/* ---- path safety ----------------------------------------------------------- */

bool hub_path_safe(const char *path, size_t len) {
    if (!path || len == 0 || len > HUB_MAX_PATH || strlen(path) != len) return false;
    if (path[0] == '/') return false;
    const char *c = path;
    for (;;) {
        const char *slash = strchr(c, '/');
        size_t clen = slash ? (size_t)(slash - c) : strlen(c);
        if (clen == 0 || clen > 255) return false;
        if (clen == 1 && c[0] == '.') return false;
        if (clen == 2 && c[0] == '.' && c[1] == '.') return false;
        for (size_t i = 0; i < clen; i++)
            if ((unsigned char)c[i] < 0x20 || c[i] == '\\') return false;
        if (!slash) break;
        c = slash + 1;
    }
    return true;
}

int hub_parse_load_format(const char *s, hub_load_format *out) {
    static const struct {
        const char *name;
        hub_load_format f;
    } t[] = {{"auto", HUB_FMT_AUTO},
             {"safetensors", HUB_FMT_SAFETENSORS},
             {"pt", HUB_FMT_PT},
             {"gguf", HUB_FMT_GGUF},
             {"all", HUB_FMT_ALL}};
    for (size_t i = 0; s && i < sizeof t / sizeof t[0]; i++)
        if (strcmp(s, t[i].name) == 0) {
            *out = t[i].f;
            return 0;
        }
    return -1;
}

static bool ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && memcmp(s + n - m, suffix, m) == 0;
}

bool hub_is_training_artifact(const char *path) {
    static const char *const t[] = {"training_args.bin", "optimizer.bin", "optimizer.pt",
                                    "scheduler.pt", "scaler.pt"};
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        if (ends_with(path, t[i])) return true;
    return false;
}

/* Files a loader reads as weights. Anything else at the top level is
 * configuration, tokenizer or code and is always fetched. */
static bool is_weight_file(const char *name) {
    static const char *const ext[] = {".safetensors", ".bin", ".pt",      ".pth",  ".gguf",
                                      ".ckpt",        ".h5",  ".msgpack", ".onnx", ".ot",
                                      ".tflite",      ".npz", ".mlmodel"};
    for (size_t i = 0; i < sizeof ext / sizeof ext[0]; i++)
        if (ends_with(name, ext[i])) return true;
    return false;
}

static bool top_level(const char *name) {
    return strchr(name, '/') == NULL;
}

/* Keeps only the shards named by the index's weight_map. An index without a
 * usable weight_map leaves the choice unchanged. */
static void filter_by_index(hub_listing *l, const char *index_json) {
    json_error_t jerr;
    json_t *doc = json_loads(index_json, 0, &jerr);
    json_t *map = doc ? json_object_get(doc, "weight_map") : NULL;
    if (!json_is_object(map)) {
        json_decref(doc);
        return;
    }
    for (size_t i = 0; i < l->nfiles; i++) {
        hub_file *f = &l->files[i];
        if (!f->selected || !ends_with(f->name, ".safetensors")) continue;
        bool named = false;
        const char *k;
        json_t *v;
        json_object_foreach(map, k, v) {
            if (json_is_string(v) && strcmp(json_string_value(v), f->name) == 0) {
                named = true;
                break;
            }
        }
        f->selected = named;
    }
    json_decref(doc);
}

static const char *fmt_name(hub_load_format f) {
    switch (f) {
    case HUB_FMT_AUTO:
        return "auto";
    case HUB_FMT_SAFETENSORS:
        return "safetensors";
    case HUB_FMT_PT:
        return "pt";
    case HUB_FMT_GGUF:
        return "gguf";
    case HUB_FMT_ALL:
        return "all";
    }
    return "?";
}

int hub_select_files(hub_listing *l, hub_load_format fmt, const char *const *allow, size_t nallow,
                     const char *const *ignore, size_t nignore, const char *index_json,
                     bool *needs_index, mp_error *err) {
    *needs_index = false;
    for (size_t i = 0; i < l->nfiles; i++)
        l->files[i].selected = (fmt == HUB_FMT_ALL);

    if (fmt != HUB_FMT_ALL) {
        static const char *const auto_g[] = {".safetensors", ".bin", ".pt", NULL};
        static const char *const st_g[] = {".safetensors", NULL};
        static const char *const pt_g[] = {".bin", ".pt", NULL};
        static const char *const gguf_g[] = {".gguf", NULL};
        const char *const *groups = fmt == HUB_FMT_AUTO          ? auto_g
                                    : fmt == HUB_FMT_SAFETENSORS ? st_g
                                    : fmt == HUB_FMT_PT          ? pt_g
                                                                 : gguf_g;
        const char *chosen = NULL;
        for (size_t g = 0; groups[g] && !chosen; g++)
            for (size_t i = 0; i < l->nfiles; i++)
                if (top_level(l->files[i].name) && ends_with(l->files[i].name, groups[g])) {
                    chosen = groups[g];
                    break;
                }
        if (!chosen)
            return mp_err(err, "file_not_found", "no weight files for load_format %s in the repo",
                          fmt_name(fmt));
        bool has_index = false;
        size_t nweights = 0;
        for (size_t i = 0; i < l->nfiles; i++) {
            hub_file *f = &l->files[i];
            if (!top_level(f->name)) continue;
            if (strcmp(f->name, HUB_SAFE_INDEX) == 0) has_index = true;
            if (!is_weight_file(f->name)) {
                f->selected = true;
            } else if (ends_with(f->name, chosen)) {
                f->selected =
                    strcmp(chosen, ".safetensors") == 0 || !hub_is_training_artifact(f->name);
                nweights += f->selected;
            }
        }
        if (strcmp(chosen, ".safetensors") == 0) {
            if (has_index) {
                if (!index_json) {
                    *needs_index = true;
                    return 0;
                }
                filter_by_index(l, index_json);
            } else if (nweights == 2) {
                /* SGLang: a consolidated.safetensors next to model.safetensors
                 * is the same weights in Mistral's layout; keep one. */
                hub_file *a = NULL, *b = NULL;
                for (size_t i = 0; i < l->nfiles; i++) {
                    hub_file *f = &l->files[i];
                    if (!f->selected || !ends_with(f->name, ".safetensors")) continue;
                    if (strcmp(f->name, "consolidated.safetensors") == 0) a = f;
                    if (strcmp(f->name, "model.safetensors") == 0) b = f;
                }
                if (a && b) a->selected = false;
            }
        }
    }

    size_t n = 0;
    for (size_t i = 0; i < l->nfiles; i++) {
        hub_file *f = &l->files[i];
        if (f->selected) f->selected = hub_pattern_filter(f->name, allow, nallow, ignore, nignore);
        n += f->selected;
    }
    if (n == 0)
        return mp_err(err, "file_not_found",
                      "no file of the repo matches load_format %s and the "
                      "allow/ignore patterns",
                      fmt_name(fmt));
    return 0;
}
