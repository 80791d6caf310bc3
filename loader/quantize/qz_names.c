/*
 * qz_names.c - what the loaders read besides the tensors: the config.json
 * `quantization_config` of each method and the JSON quant state bitsandbytes
 * packs next to an NF4 weight (QuantState.as_dict(packed=True)).
 *
 * Configs, as vLLM, SGLang and transformers read them:
 *   fp8, fp8-block: quant_method "fp8", fmt "e4m3", activation_scheme
 *     "dynamic", weight_block_size [bn, bk] for blocks, ignored_layers.
 *   fp8-channel: compressed-tensors "float-quantized" (quant_method fp8 has
 *     no per-channel weights): 8-bit float weights, strategy "channel",
 *     static (stored) scales; activations per token, dynamic; `ignore`.
 *   nf4, int8: quant_method "bitsandbytes" as BitsAndBytesConfig.to_dict()
 *     writes it, llm_int8_skip_modules listing what stayed unquantized.
 */
#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/quantize/qz_internal.h"

/* Module names, matched anywhere in the name where they start with `*`:
 * what vLLM, SGLang and llm-compressor leave unquantized by default. */
static const char *const DEFAULT_IGNORE[] = {
    "*embed*",
    "*wte",
    "*wpe",
    "*word_embeddings*",
    "lm_head",
    "*.lm_head",
    "*norm*",
    "*ln_*",
    "*.ln_f",
    "*mlp.gate",
    "*router*",
    "*block_sparse_moe.gate",
    "*shared_expert_gate",
    NULL,
};

const char *const *qz_default_ignore(void) {
    return DEFAULT_IGNORE;
}

bool qz_candidate(const char *name, mp_dtype dt, int ndim) {
    size_t n = strlen(name);
    return ndim == 2 && (dt == MP_DT_F32 || dt == MP_DT_F16 || dt == MP_DT_BF16) && n > 7 &&
           strcmp(name + n - 7, ".weight") == 0;
}

int qz_ignore_match(const char *module, const char *const *pats, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (pats[i] && fnmatch(pats[i], module, 0) == 0) return (int)i;
    return -1;
}

static json_t *fp8_config(const qz_params *p, json_t *ignored) {
    json_t *c = json_pack("{s:s, s:s, s:s}", "quant_method", "fp8", "fmt", "e4m3",
                          "activation_scheme", "dynamic");
    if (c && p->method == QZ_FP8_BLOCK)
        json_object_set_new(c, "weight_block_size",
                            json_pack("[I, I]", (json_int_t)p->block_n, (json_int_t)p->block_k));
    if (c) json_object_set(c, "ignored_layers", ignored);
    return c;
}

static json_t *channel_config(json_t *ignored) {
    json_t *weights = json_pack("{s:i, s:s, s:b, s:s, s:b, s:s, s:n, s:n}", "num_bits", 8, "type",
                                "float", "symmetric", 1, "strategy", "channel", "dynamic", 0,
                                "observer", "minmax", "group_size", "block_structure");
    json_t *acts = json_pack("{s:i, s:s, s:b, s:s, s:b, s:n, s:n, s:n}", "num_bits", 8, "type",
                             "float", "symmetric", 1, "strategy", "token", "dynamic", 1, "observer",
                             "group_size", "block_structure");
    json_t *group = json_pack("{s:[s], s:o, s:o, s:n}", "targets", "Linear", "weights", weights,
                              "input_activations", acts, "output_activations");
    return json_pack("{s:s, s:s, s:s, s:{s:o}, s:O, s:n}", "quant_method", "compressed-tensors",
                     "format", "float-quantized", "quantization_status", "compressed",
                     "config_groups", "group_0", group, "ignore", ignored, "kv_cache_scheme");
}

static json_t *bnb_config(const qz_params *p, json_t *ignored, const char *compute_dtype) {
    bool four = p->method == QZ_NF4;
    json_t *c =
        json_pack("{s:s, s:b, s:b, s:b, s:b, s:s, s:b, s:s, s:f, s:b, s:b, s:O}", "quant_method",
                  "bitsandbytes", "load_in_4bit", four, "load_in_8bit", !four, "_load_in_4bit",
                  four, "_load_in_8bit", !four, "bnb_4bit_quant_type", "nf4",
                  "bnb_4bit_use_double_quant", four && p->double_quant, "bnb_4bit_quant_storage",
                  "uint8", "llm_int8_threshold", 6.0, "llm_int8_has_fp16_weight", 0,
                  "llm_int8_enable_fp32_cpu_offload", 0, "llm_int8_skip_modules", ignored);
    if (c && compute_dtype)
        json_object_set_new(c, "bnb_4bit_compute_dtype", json_string(compute_dtype));
    return c;
}

json_t *qz_quant_config(const qz_params *p, json_t *ignored, const char *compute_dtype) {
    json_t *empty = ignored ? NULL : json_array();
    json_t *ign = ignored ? ignored : empty;
    json_t *c = NULL;
    if (ign) {
        if (p->method == QZ_FP8 || p->method == QZ_FP8_BLOCK)
            c = fp8_config(p, ign);
        else if (p->method == QZ_FP8_CHANNEL)
            c = channel_config(ign);
        else if (p->method == QZ_NF4 || p->method == QZ_INT8)
            c = bnb_config(p, ign, compute_dtype);
    }
    json_decref(empty);
    return c;
}

static const char *torch_dtype_name(mp_dtype dt) {
    return dt == MP_DT_BF16 ? "bfloat16" : (dt == MP_DT_F16 ? "float16" : "float32");
}

/* Python's repr of the double holding `f`: the shortest digits that read
 * back to the same double, with ".0" on integral values. */
static void py_float_repr(float f, char *out, size_t cap) {
    double d = (double)f;
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(out, cap, "%.*g", prec, d);
        if (strtod(out, NULL) == d) break;
    }
    if (!strpbrk(out, ".eni")) strncat(out, ".0", cap - strlen(out) - 1);
}

/* The longest an offset can print: "-1.2345678901234567e-308". */
#define QZ_OFFSET_MAX_CHARS 24

long qz_nf4_state_json(const qz_params *p, mp_dtype dt, const uint64_t shape[2], float offset,
                       char *buf, size_t len) {
    char num[40], text[512];
    if (buf)
        py_float_repr(offset, num, sizeof num);
    else
        memset(num, '0', QZ_OFFSET_MAX_CHARS), num[QZ_OFFSET_MAX_CHARS] = '\0';
    int w = snprintf(text, sizeof text,
                     "{\"quant_type\": \"nf4\", \"blocksize\": %d, \"dtype\": \"%s\", "
                     "\"shape\": [%llu, %llu]",
                     QZ_NF4_BLOCKSIZE, torch_dtype_name(dt), (unsigned long long)shape[0],
                     (unsigned long long)shape[1]);
    if (p->double_quant && w > 0 && (size_t)w < sizeof text)
        w += snprintf(text + w, sizeof text - (size_t)w,
                      ", \"nested_blocksize\": %d, \"nested_dtype\": \"float32\", "
                      "\"nested_offset\": %s",
                      QZ_NESTED_BLOCKSIZE, num);
    if (w < 0 || (size_t)w + 1 >= sizeof text) return -1;
    text[w++] = '}';
    if (!buf) return w;
    if ((size_t)w > len) return -1;
    /* JSON allows trailing blanks: they keep the planned size exact. */
    memcpy(buf, text, (size_t)w);
    memset(buf + w, ' ', len - (size_t)w);
    return (long)len;
}
