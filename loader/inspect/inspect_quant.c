/*
 * inspect_quant.c - the quantization part of inspect: reading the declared
 * configs of each method (fp8, gptq, awq and their marlin variants,
 * bitsandbytes, compressed-tensors, modelopt, mxfp4) into one shape, and
 * recognizing a quantized checkpoint from its tensor names and dtypes when
 * nothing declares it (weight-formats.md §5.2, §5.5). Also the KV-cache
 * scales file check of SGLang's QuantParamSchema.
 */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/inspect/inspect.h"

/* ------------------------------------------------------------------------ */
/* helpers                                                                   */

static bool ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

static json_t *get(const json_t *o, const char *k) {
    return json_is_object(o) ? json_object_get(o, k) : NULL;
}

/* First of the keys present, as a new reference, else NULL. */
static json_t *first(const json_t *o, const char *a, const char *b) {
    json_t *v = get(o, a);
    if (!v && b) v = get(o, b);
    return v ? json_incref(v) : NULL;
}

static void warn(json_t *warnings, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void warn(json_t *warnings, const char *fmt, ...) {
    if (!warnings) return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    json_array_append_new(warnings, json_string(msg));
}

static json_t *empty_quant(const char *method, const char *source) {
    return json_pack("{s:s?,s:n,s:n,s:s?,s:[],s:n,s:n,s:n}", "method", method, "bits", "group_size",
                     "source", source, "ignored_layers", "weight_block_size", "activation_scheme",
                     "kv_cache");
}

static void set_int(json_t *q, const char *k, json_t *v) {
    if (json_is_integer(v))
        json_object_set(q, k, v);
    else if (json_is_real(v) && json_real_value(v) == (double)(int64_t)json_real_value(v))
        json_object_set_new(q, k, json_integer((json_int_t)json_real_value(v)));
}

static void set_list(json_t *q, const char *k, json_t *v) {
    if (json_is_array(v)) json_object_set(q, k, v);
}

static void lower(char *s) {
    for (; *s; s++)
        *s = (char)tolower((unsigned char)*s);
}

/* ------------------------------------------------------------------------ */
/* declared configs                                                          */

static void gptq_like(json_t *q, const json_t *qc) {
    json_t *bits = first(qc, "bits", "w_bit");
    set_int(q, "bits", bits);
    json_decref(bits);
    json_t *gs = first(qc, "group_size", "q_group_size");
    set_int(q, "group_size", gs);
    json_decref(gs);
}

/* SGLang/vLLM upgrade gptq -> gptq_marlin and awq -> awq_marlin when the
 * kernel fits (CUDA, 4/8 bits, sym for GPTQ, group -1/32/64/128). */
static void marlin_check(json_t *q, const json_t *qc, bool gptq) {
    json_int_t bits = json_integer_value(get(q, "bits"));
    json_int_t gs = json_integer_value(get(q, "group_size"));
    json_t *sym = get(qc, "sym");
    json_t *zp = get(qc, "zero_point");
    bool ok = (bits == 4 || bits == 8) && (gs == -1 || gs == 32 || gs == 64 || gs == 128);
    if (gptq) ok = ok && (!sym || json_is_true(sym));
    if (!gptq) ok = ok && bits == 4 && (!zp || json_is_true(zp));
    json_object_set_new(q, "marlin_compatible", json_boolean(ok));
    const char *m = json_string_value(get(q, "method"));
    if (m && (strcmp(m, "gptq") == 0 || strcmp(m, "awq") == 0))
        json_object_set_new(q, "runtime_method",
                            json_string(ok ? (gptq ? "gptq_marlin" : "awq_marlin") : m));
    else if (m)
        json_object_set_new(q, "runtime_method", json_string(m));
}

static void fill_fp8(json_t *q, const json_t *qc) {
    json_object_set_new(q, "bits", json_integer(8));
    json_t *wbs = get(qc, "weight_block_size");
    if (json_is_array(wbs)) json_object_set(q, "weight_block_size", wbs);
    json_t *as = get(qc, "activation_scheme");
    if (json_is_string(as)) json_object_set(q, "activation_scheme", as);
    json_t *ign = first(qc, "ignored_layers", "modules_to_not_convert");
    set_list(q, "ignored_layers", ign);
    json_decref(ign);
    json_t *fmt = get(qc, "fmt");
    if (json_is_string(fmt)) json_object_set(q, "fmt", fmt);
}

static void fill_bnb(json_t *q, const json_t *qc) {
    bool b4 = json_is_true(get(qc, "load_in_4bit")) || json_is_true(get(qc, "_load_in_4bit"));
    bool b8 = json_is_true(get(qc, "load_in_8bit")) || json_is_true(get(qc, "_load_in_8bit"));
    json_object_set_new(q, "bits", b4 ? json_integer(4) : b8 ? json_integer(8) : json_null());
    if (b4) {
        json_t *qt = get(qc, "bnb_4bit_quant_type");
        json_object_set_new(q, "quant_type",
                            json_string(json_is_string(qt) ? json_string_value(qt) : "fp4"));
        json_object_set_new(q, "double_quant",
                            json_boolean(json_is_true(get(qc, "bnb_4bit_use_double_quant"))));
        json_t *cd = get(qc, "bnb_4bit_compute_dtype");
        if (json_is_string(cd)) json_object_set(q, "compute_dtype", cd);
        json_object_set_new(q, "group_size", json_integer(64)); /* bnb blocksize */
    }
    set_list(q, "ignored_layers", get(qc, "llm_int8_skip_modules"));
}

static void fill_ct(json_t *q, const json_t *qc, json_t *warnings) {
    json_t *fmt = get(qc, "format");
    if (json_is_string(fmt)) json_object_set(q, "format", fmt);
    set_list(q, "ignored_layers", get(qc, "ignore"));
    json_t *groups = get(qc, "config_groups");
    const char *gk;
    json_t *g;
    size_t ngroups = 0;
    json_object_foreach(groups, gk, g) {
        if (ngroups++) continue; /* settings of the first group; others noted below */
        json_t *w = get(g, "weights");
        set_int(q, "bits", get(w, "num_bits"));
        set_int(q, "group_size", get(w, "group_size"));
        json_t *st = get(w, "strategy");
        if (json_is_string(st)) json_object_set(q, "strategy", st);
        json_t *ty = get(w, "type");
        if (json_is_string(ty)) json_object_set(q, "weight_type", ty);
        json_t *bs = get(w, "block_structure");
        if (json_is_array(bs)) json_object_set(q, "weight_block_size", bs);
        json_t *ia = get(g, "input_activations");
        if (json_is_object(ia)) {
            json_t *dyn = get(ia, "dynamic");
            json_object_set_new(q, "activation_scheme",
                                json_string(json_is_false(dyn) ? "static" : "dynamic"));
            set_int(q, "activation_bits", get(ia, "num_bits"));
        }
    }
    if (ngroups > 1)
        warn(warnings,
             "compressed-tensors: %zu config groups; bits/group_size are "
             "those of the first",
             ngroups);
    json_t *kv = get(qc, "kv_cache_scheme");
    if (json_is_object(kv)) {
        json_t *bits = get(kv, "num_bits");
        json_t *ty = get(kv, "type");
        char dt[32] = "int";
        if (json_is_string(ty)) snprintf(dt, sizeof dt, "%s", json_string_value(ty));
        char name[48];
        snprintf(name, sizeof name, "%s%lld", strcmp(dt, "float") == 0 ? "fp" : dt,
                 (long long)(json_is_integer(bits) ? json_integer_value(bits) : 8));
        json_object_set_new(
            q, "kv_cache",
            json_pack("{s:s,s:s,s:O}", "dtype", name, "source", "config", "scheme", kv));
    }
}

/* ModelOpt: hf_quant_config.json {"producer","quantization":{...}} or the
 * config.json form {"quant_method":"modelopt","quant_algo",...}. */
static void fill_modelopt(json_t *q, const json_t *qc, json_t *warnings) {
    const json_t *in = get(qc, "quantization") ? get(qc, "quantization") : qc;
    const char *prod = json_string_value(get(get(qc, "producer"), "name"));
    if (get(qc, "quantization") && (!prod || strcmp(prod, "modelopt") != 0))
        warn(warnings, "hf_quant_config.json: producer.name is not \"modelopt\"; SGLang "
                       "refuses it");
    char algo[64] = "";
    const char *a = json_string_value(get(in, "quant_algo"));
    if (a) {
        snprintf(algo, sizeof algo, "%s", a);
        for (char *p = algo; *p; p++)
            *p = (char)toupper((unsigned char)*p);
    }
    json_object_set_new(q, "quant_algo", algo[0] ? json_string(algo) : json_null());
    if (strstr(algo, "FP4")) {
        json_object_set_new(q, "method", json_string("modelopt_fp4"));
        json_object_set_new(q, "bits", json_integer(4));
        json_t *gs = get(in, "group_size");
        if (json_is_integer(gs))
            json_object_set(q, "group_size", gs);
        else
            json_object_set_new(q, "group_size", json_integer(16));
    } else if (strstr(algo, "FP8")) {
        json_object_set_new(q, "method", json_string("modelopt"));
        json_object_set_new(q, "bits", json_integer(8));
        json_object_set_new(q, "activation_scheme", json_string("static"));
    } else if (strstr(algo, "W4A8")) {
        json_object_set_new(q, "method", json_string("modelopt"));
        json_object_set_new(q, "bits", json_integer(4));
        set_int(q, "group_size", get(in, "group_size"));
    } else {
        json_object_set_new(q, "method", json_string("modelopt"));
        if (!algo[0]) warn(warnings, "modelopt config without quant_algo");
    }
    json_t *ex = first(in, "exclude_modules", "ignore");
    set_list(q, "ignored_layers", ex);
    json_decref(ex);
    const char *kv = json_string_value(get(in, "kv_cache_quant_algo"));
    if (kv) {
        char k[32];
        snprintf(k, sizeof k, "%s", kv);
        lower(k);
        json_object_set_new(q, "kv_cache", json_pack("{s:s,s:s}", "dtype", k, "source", "config"));
    }
}

json_t *insp_quant_from_config(const json_t *qc, const char *file, json_t *warnings) {
    const char *m = json_string_value(get(qc, "quant_method"));
    char method[64] = "";
    if (m) snprintf(method, sizeof method, "%s", m);
    lower(method);
    /* Method files name their method implicitly. */
    if (!method[0] && file) {
        if (strcmp(file, "hf_quant_config.json") == 0)
            snprintf(method, sizeof method, "modelopt");
        else if (strcmp(file, "quant_config.json") == 0)
            snprintf(method, sizeof method, "awq");
        else if (strcmp(file, "quantize_config.json") == 0)
            snprintf(method, sizeof method,
                     get(qc, "w_bit") || get(qc, "zero_point") ? "awq" : "gptq");
    }
    if (!method[0] && (get(qc, "load_in_4bit") || get(qc, "load_in_8bit")))
        snprintf(method, sizeof method, "bitsandbytes");
    if (!method[0] && get(qc, "config_groups"))
        snprintf(method, sizeof method, "compressed-tensors");
    if (strcmp(method, "compressed_tensors") == 0)
        snprintf(method, sizeof method, "compressed-tensors");
    json_t *q = empty_quant(method[0] ? method : "unknown", file);
    if (!q) return NULL;
    if (strcmp(method, "fp8") == 0 || strcmp(method, "fbgemm_fp8") == 0 ||
        strcmp(method, "w8a8_fp8") == 0) {
        fill_fp8(q, qc);
    } else if (strcmp(method, "gptq") == 0 || strcmp(method, "gptq_marlin") == 0 ||
               strcmp(method, "marlin") == 0 || strcmp(method, "gptq_marlin_24") == 0) {
        gptq_like(q, qc);
        json_t *fmt = get(qc, "checkpoint_format");
        if (json_is_string(fmt)) {
            json_object_set(q, "checkpoint_format", fmt);
            if (strcmp(json_string_value(fmt), "marlin") == 0 && strcmp(method, "gptq") == 0)
                json_object_set_new(q, "method", json_string("gptq_marlin"));
        }
        json_t *da = get(qc, "desc_act");
        json_object_set_new(q, "desc_act", json_boolean(json_is_true(da)));
        json_t *sym = get(qc, "sym");
        json_object_set_new(q, "sym", json_boolean(!sym || json_is_true(sym)));
        json_t *ign = get(qc, "modules_to_not_convert");
        set_list(q, "ignored_layers", ign);
        if (strcmp(method, "marlin") == 0 && !get(q, "bits"))
            json_object_set_new(q, "bits", json_integer(4));
        marlin_check(q, qc, true);
    } else if (strcmp(method, "awq") == 0 || strcmp(method, "awq_marlin") == 0) {
        gptq_like(q, qc);
        json_t *zp = get(qc, "zero_point");
        json_object_set_new(q, "zero_point", json_boolean(!zp || json_is_true(zp)));
        json_t *ver = get(qc, "version");
        if (json_is_string(ver)) json_object_set(q, "version", ver);
        set_list(q, "ignored_layers", get(qc, "modules_to_not_convert"));
        marlin_check(q, qc, false);
    } else if (strcmp(method, "bitsandbytes") == 0) {
        fill_bnb(q, qc);
    } else if (strcmp(method, "compressed-tensors") == 0) {
        fill_ct(q, qc, warnings);
    } else if (strcmp(method, "modelopt") == 0 || strcmp(method, "modelopt_fp4") == 0 ||
               strcmp(method, "modelopt_fp8") == 0) {
        fill_modelopt(q, qc, warnings);
    } else if (strcmp(method, "mxfp4") == 0) {
        json_object_set_new(q, "bits", json_integer(4));
        json_object_set_new(q, "group_size", json_integer(32));
        set_list(q, "ignored_layers", get(qc, "modules_to_not_convert"));
    } else {
        gptq_like(q, qc);
        json_t *ign = first(qc, "modules_to_not_convert", "ignore");
        set_list(q, "ignored_layers", ign);
        json_decref(ign);
        warn(warnings,
             "quantization method \"%s\" is reported as declared; its settings are not "
             "interpreted",
             method[0] ? method : "(none)");
    }
    json_object_set(q, "config", (json_t *)qc);
    return q;
}

/* ------------------------------------------------------------------------ */
/* from tensors                                                              */

typedef struct tindex {
    const mp_tensor **by; /* sorted by name */
    size_t n;
} tindex;

static int cmp_tp(const void *a, const void *b) {
    return strcmp((*(const mp_tensor *const *)a)->name, (*(const mp_tensor *const *)b)->name);
}

static bool tindex_make(tindex *ix, const mp_tensor *ts, size_t n) {
    ix->by = malloc((n ? n : 1) * sizeof *ix->by);
    ix->n = n;
    if (!ix->by) return false;
    for (size_t i = 0; i < n; i++)
        ix->by[i] = &ts[i];
    qsort(ix->by, n, sizeof *ix->by, cmp_tp);
    return true;
}

/* The tensor named prefix+suffix, or NULL. */
static const mp_tensor *find(const tindex *ix, const char *prefix, size_t plen,
                             const char *suffix) {
    char name[1024];
    if (snprintf(name, sizeof name, "%.*s%s", (int)plen, prefix, suffix) >= (int)sizeof name)
        return NULL;
    mp_tensor key = {.name = name};
    const mp_tensor *kp = &key;
    const mp_tensor **hit = bsearch(&kp, ix->by, ix->n, sizeof *ix->by, cmp_tp);
    return hit ? *hit : NULL;
}

typedef struct qstats {
    size_t fp8_block, fp8_scale, nvfp4, gptq, awq, ct_packed, ct_nvfp4, bnb4, bnb8, mxfp4, marlin,
        kv, input_scale;
    int64_t block_n, block_k; /* from the first fp8 block scale */
    int64_t bits, group;      /* gptq/awq from shapes */
    char bnb_type[8];
    bool bnb_double;
} qstats;

static void scan(const tindex *ix, qstats *s) {
    for (size_t i = 0; i < ix->n; i++) {
        const mp_tensor *t = ix->by[i];
        const char *nm = t->name;
        size_t len = strlen(nm);
        if (ends_with(nm, ".k_scale") || ends_with(nm, ".v_scale") || ends_with(nm, ".kv_scale") ||
            ends_with(nm, "_proj.output_scale"))
            s->kv++;
        if (ends_with(nm, ".input_scale")) s->input_scale++;
        if (ends_with(nm, ".weight") && (t->dtype == MP_DT_F8_E4M3 || t->dtype == MP_DT_F8_E5M2)) {
            size_t p = len - 7;
            const mp_tensor *inv = find(ix, nm, p, ".weight_scale_inv");
            if (inv) {
                if (!s->fp8_block++ && inv->ndim == 2 && t->ndim == 2 && inv->shape[0] > 0 &&
                    inv->shape[1] > 0) {
                    s->block_n = (t->shape[0] + inv->shape[0] - 1) / inv->shape[0];
                    s->block_k = (t->shape[1] + inv->shape[1] - 1) / inv->shape[1];
                }
            } else if (find(ix, nm, p, ".weight_scale")) {
                s->fp8_scale++;
            }
        }
        if (ends_with(nm, ".weight") && t->dtype == MP_DT_U8) {
            size_t p = len - 7;
            const mp_tensor *sc = find(ix, nm, p, ".weight_scale");
            if (sc && sc->dtype == MP_DT_F8_E4M3 && find(ix, nm, p, ".weight_scale_2")) s->nvfp4++;
        }
        if (ends_with(nm, ".qweight") && t->dtype == MP_DT_I32 && t->ndim == 2) {
            size_t p = len - 8;
            const mp_tensor *sc = find(ix, nm, p, ".scales");
            const mp_tensor *gi = find(ix, nm, p, ".g_idx");
            if (sc && sc->ndim == 2 && find(ix, nm, p, ".qzeros")) {
                int64_t G = sc->shape[0], N = sc->shape[1];
                if (gi && gi->ndim == 1) {
                    int64_t K = gi->shape[0];
                    s->gptq++;
                    if (K > 0 && !s->bits) s->bits = 32 * t->shape[0] / K;
                    if (G > 0 && !s->group) s->group = G == 1 ? -1 : K / G;
                } else if (t->shape[1] > 0 && t->shape[1] != N) {
                    int64_t K = t->shape[0];
                    s->awq++;
                    if (N > 0 && !s->bits) s->bits = 32 * t->shape[1] / N;
                    if (G > 0 && !s->group) s->group = K / G;
                } else {
                    s->gptq++;
                    if (t->shape[0] > 0 && !s->bits) {
                        /* qweight [K/pf, N]: K unknown without g_idx; scales [K/g, N] */
                        s->bits = 0;
                    }
                }
            }
        }
        if (ends_with(nm, ".weight_packed")) {
            size_t p = len - 14;
            if (find(ix, nm, p, ".weight_global_scale"))
                s->ct_nvfp4++;
            else
                s->ct_packed++;
        }
        if (ends_with(nm, ".weight.absmax") || strstr(nm, ".weight.quant_state.bitsandbytes__")) {
            if (strstr(nm, ".weight.quant_state.bitsandbytes__")) {
                s->bnb4++;
                const char *ty = strstr(nm, "bitsandbytes__") + 14;
                snprintf(s->bnb_type, sizeof s->bnb_type, "%s", ty);
            }
        }
        if (ends_with(nm, ".weight.nested_absmax")) s->bnb_double = true;
        if (ends_with(nm, ".SCB") && find(ix, nm, len - 4, ".weight")) s->bnb8++;
        if (ends_with(nm, "_blocks") && t->dtype == MP_DT_U8) {
            char sc[1024];
            snprintf(sc, sizeof sc, "%.*s_scales", (int)(len - 7), nm);
            if (find(ix, sc, strlen(sc), "")) s->mxfp4++;
        }
        if (ends_with(nm, ".B") && find(ix, nm, len - 2, ".s")) s->marlin++;
    }
}

json_t *insp_quant_from_tensors(const mp_tensor *ts, size_t n) {
    tindex ix;
    if (!tindex_make(&ix, ts, n)) return NULL;
    qstats s = {0};
    scan(&ix, &s);
    free(ix.by);
    json_t *q = NULL;
    if (s.fp8_block) {
        q = empty_quant("fp8", "tensors");
        json_object_set_new(q, "bits", json_integer(8));
        if (s.block_n > 0)
            json_object_set_new(q, "weight_block_size",
                                json_pack("[I,I]", (json_int_t)s.block_n, (json_int_t)s.block_k));
    } else if (s.nvfp4) {
        q = empty_quant("modelopt_fp4", "tensors");
        json_object_set_new(q, "bits", json_integer(4));
        json_object_set_new(q, "group_size", json_integer(16));
    } else if (s.ct_nvfp4) {
        q = empty_quant("compressed-tensors", "tensors");
        json_object_set_new(q, "format", json_string("nvfp4-pack-quantized"));
        json_object_set_new(q, "bits", json_integer(4));
        json_object_set_new(q, "group_size", json_integer(16));
    } else if (s.ct_packed) {
        q = empty_quant("compressed-tensors", "tensors");
        json_object_set_new(q, "format", json_string("pack-quantized"));
    } else if (s.fp8_scale) {
        q = empty_quant("fp8", "tensors");
        json_object_set_new(q, "bits", json_integer(8));
    } else if (s.gptq || s.awq) {
        q = empty_quant(s.gptq >= s.awq ? "gptq" : "awq", "tensors");
        if (s.bits > 0) json_object_set_new(q, "bits", json_integer(s.bits));
        if (s.group) json_object_set_new(q, "group_size", json_integer(s.group));
    } else if (s.bnb4) {
        q = empty_quant("bitsandbytes", "tensors");
        json_object_set_new(q, "bits", json_integer(4));
        json_object_set_new(q, "quant_type", json_string(s.bnb_type));
        json_object_set_new(q, "double_quant", json_boolean(s.bnb_double));
        json_object_set_new(q, "pre_quantized", json_true());
    } else if (s.bnb8) {
        q = empty_quant("bitsandbytes", "tensors");
        json_object_set_new(q, "bits", json_integer(8));
        json_object_set_new(q, "pre_quantized", json_true());
    } else if (s.mxfp4) {
        q = empty_quant("mxfp4", "tensors");
        json_object_set_new(q, "bits", json_integer(4));
        json_object_set_new(q, "group_size", json_integer(32));
    } else if (s.marlin) {
        q = empty_quant("marlin", "tensors");
        json_object_set_new(q, "bits", json_integer(4));
    }
    if (q && s.input_scale && json_is_null(json_object_get(q, "activation_scheme")))
        json_object_set_new(q, "activation_scheme", json_string("static"));
    return q;
}

void insp_quant_refine(json_t *q, const mp_tensor *ts, size_t n, json_t *warnings) {
    tindex ix;
    if (!tindex_make(&ix, ts, n)) return;
    qstats s = {0};
    scan(&ix, &s);
    free(ix.by);
    const char *m = json_string_value(json_object_get(q, "method"));
    if (m && strcmp(m, "bitsandbytes") == 0) {
        bool pre = s.bnb4 || s.bnb8;
        json_object_set_new(q, "pre_quantized", json_boolean(pre));
        if (s.bnb4 && s.bnb_type[0]) {
            const char *decl = json_string_value(json_object_get(q, "quant_type"));
            if (decl && strcmp(decl, s.bnb_type) != 0)
                warn(warnings, "bitsandbytes: config says %s, tensors are %s", decl, s.bnb_type);
            json_object_set_new(q, "quant_type", json_string(s.bnb_type));
        }
        if (s.bnb4 && s.bnb_double) json_object_set_new(q, "double_quant", json_true());
    }
    if (m && strcmp(m, "fp8") == 0 && s.fp8_block &&
        json_is_null(json_object_get(q, "weight_block_size")))
        warn(warnings, "fp8: weight_scale_inv tensors but no weight_block_size in the config");
    if (m && (strcmp(m, "gptq") == 0 || strcmp(m, "awq") == 0) && !s.gptq && !s.awq)
        warn(warnings, "%s declared but no qweight/qzeros/scales tensors found", m);
    if (s.kv) {
        json_t *kv = json_object_get(q, "kv_cache");
        if (!json_is_object(kv)) {
            kv = json_pack("{s:s,s:s}", "dtype", "fp8", "source", "tensors");
            json_object_set_new(q, "kv_cache", kv);
        }
        json_object_set_new(kv, "scales_in_checkpoint", json_integer((json_int_t)s.kv));
    }
}

/* ------------------------------------------------------------------------ */
/* KV-cache scales file                                                      */

/* pydantic lax int coercion of a JSON object key: optional sign, digits. */
static bool key_int(const char *k, int64_t *out) {
    const char *p = k;
    while (*p == ' ')
        p++;
    if (!*p) return false;
    char *end = NULL;
    long long v = strtoll(p, &end, 10);
    while (end && *end == ' ')
        end++;
    if (!end || *end || end == p) return false;
    *out = v;
    return true;
}

bool insp_kv_scales_check(const json_t *doc, const char *model_type, int64_t num_layers,
                          int64_t *tp_size, char *reason, size_t rsz) {
    *tp_size = 0;
    if (!json_is_object(doc)) return snprintf(reason, rsz, "not a JSON object"), false;
    json_t *mt = json_object_get(doc, "model_type");
    if (!mt) return snprintf(reason, rsz, "model_type is required"), false;
    if (!json_is_null(mt) && !json_is_string(mt))
        return snprintf(reason, rsz, "model_type must be a string or null"), false;
    json_t *kv = json_object_get(doc, "kv_cache");
    if (!json_is_object(kv)) return snprintf(reason, rsz, "kv_cache object is required"), false;
    const char *dt = json_string_value(json_object_get(kv, "dtype"));
    if (!dt) return snprintf(reason, rsz, "kv_cache.dtype is required"), false;
    if (strcmp(dt, "float8_e4m3fn") != 0)
        return snprintf(reason, rsz,
                        "Loaded scaling factors intended for KV cache dtype = %s rather than "
                        "float8_e4m3fn!",
                        dt),
               false;
    json_t *sf = json_object_get(kv, "scaling_factor");
    if (!json_is_object(sf) || json_object_size(sf) == 0)
        return snprintf(reason, rsz, "kv_cache.scaling_factor must be a non-empty object"), false;
    size_t nranks = json_object_size(sf);
    if (nranks > 4096) return snprintf(reason, rsz, "too many TP ranks"), false;
    char *seen = calloc(nranks, 1);
    if (!seen) return snprintf(reason, rsz, "out of memory"), false;
    const char *rk;
    json_t *rv;
    bool ok = true;
    json_object_foreach(sf, rk, rv) {
        int64_t r;
        if (!key_int(rk, &r)) {
            snprintf(reason, rsz, "TP rank key \"%.40s\" is not an integer", rk);
            ok = false;
            break;
        }
        if (r < 0 || (uint64_t)r >= nranks || seen[r]) {
            snprintf(reason, rsz, "TP ranks must be 0..%zu, each once (got %lld)", nranks - 1,
                     (long long)r);
            ok = false;
            break;
        }
        seen[r] = 1;
        if (!json_is_object(rv)) {
            snprintf(reason, rsz, "rank %lld: scales must be an object", (long long)r);
            ok = false;
            break;
        }
        size_t nl = json_object_size(rv);
        if (num_layers >= 0 && nl != (size_t)num_layers) {
            snprintf(reason, rsz, "rank %lld has %zu layer scales, the model has %lld layers",
                     (long long)r, nl, (long long)num_layers);
            ok = false;
            break;
        }
        char *lseen = calloc(nl ? nl : 1, 1);
        if (!lseen) {
            snprintf(reason, rsz, "out of memory");
            ok = false;
            break;
        }
        const char *lk;
        json_t *lv;
        json_object_foreach(rv, lk, lv) {
            int64_t l;
            if (!key_int(lk, &l) || l < 0 || (uint64_t)l >= nl || lseen[l]) {
                snprintf(reason, rsz, "rank %lld: layers must be 0..%zu, each once (got \"%.40s\")",
                         (long long)r, nl ? nl - 1 : 0, lk);
                ok = false;
                break;
            }
            lseen[l] = 1;
            if (!json_is_number(lv)) {
                snprintf(reason, rsz, "rank %lld layer %lld: scale is not a number", (long long)r,
                         (long long)l);
                ok = false;
                break;
            }
        }
        free(lseen);
        if (!ok) break;
    }
    free(seen);
    if (!ok) return false;
    if (json_is_string(mt) && model_type && strcmp(json_string_value(mt), model_type) != 0)
        return snprintf(reason, rsz, "model_type %s does not match the model's %s",
                        json_string_value(mt), model_type),
               false;
    *tp_size = (int64_t)nranks;
    reason[0] = 0;
    return true;
}
