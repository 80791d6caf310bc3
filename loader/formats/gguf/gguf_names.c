/*
 * gguf_names.c - GGUF -> Hugging Face for llama-family models: tensor names
 * (reference §3.8), the inverse of convert_hf_to_gguf.py's Q/K row
 * permutation, and a config.json built from the GGUF metadata the way
 * transformers' ggml integration maps it (reference §3.7).
 */
#include "loader/formats/gguf/gguf.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct arch_desc {
    const char *arch;
    const char *hf_class;
    const char *model_type;
    const char *moe_class; /* when <arch>.expert_count > 0; NULL: same class */
    const char *moe_model_type;
    const char *router; /* HF name of ffn_gate_inp under model.layers.N. */
    bool permuted_qk;
} arch_desc;

static const arch_desc ARCHS[] = {
    {"llama", "LlamaForCausalLM", "llama", "MixtralForCausalLM", "mixtral", "block_sparse_moe.gate",
     true},
    {"mistral", "MistralForCausalLM", "mistral", "MixtralForCausalLM", "mixtral",
     "block_sparse_moe.gate", true},
    {"qwen2", "Qwen2ForCausalLM", "qwen2", NULL, NULL, "mlp.gate", false},
    {"qwen3", "Qwen3ForCausalLM", "qwen3", NULL, NULL, "mlp.gate", false},
    {"qwen2moe", "Qwen2MoeForCausalLM", "qwen2_moe", NULL, NULL, "mlp.gate", false},
    {"qwen3moe", "Qwen3MoeForCausalLM", "qwen3_moe", NULL, NULL, "mlp.gate", false},
};

static const arch_desc *find_arch(const char *arch) {
    if (!arch) return NULL;
    for (size_t i = 0; i < sizeof ARCHS / sizeof ARCHS[0]; i++)
        if (strcmp(ARCHS[i].arch, arch) == 0) return &ARCHS[i];
    return NULL;
}

bool gguf_arch_permutes_qk(const char *arch) {
    const arch_desc *a = find_arch(arch);
    return a && a->permuted_qk;
}

typedef struct name_pair {
    const char *gguf, *hf;
} name_pair;

static const name_pair TOP_NAMES[] = {
    {"token_embd", "model.embed_tokens"},
    {"output_norm", "model.norm"},
    {"output", "lm_head"},
};

static const name_pair BLOCK_NAMES[] = {
    {"attn_norm", "input_layernorm"},
    {"attn_q", "self_attn.q_proj"},
    {"attn_k", "self_attn.k_proj"},
    {"attn_v", "self_attn.v_proj"},
    {"attn_output", "self_attn.o_proj"},
    {"attn_q_norm", "self_attn.q_norm"},
    {"attn_k_norm", "self_attn.k_norm"},
    {"ffn_norm", "post_attention_layernorm"},
    {"ffn_gate", "mlp.gate_proj"},
    {"ffn_up", "mlp.up_proj"},
    {"ffn_down", "mlp.down_proj"},
    {"ffn_gate_shexp", "mlp.shared_expert.gate_proj"},
    {"ffn_up_shexp", "mlp.shared_expert.up_proj"},
    {"ffn_down_shexp", "mlp.shared_expert.down_proj"},
    {"ffn_gate_inp_shexp", "mlp.shared_expert_gate"},
};

/* Splits "base.weight" / "base.bias" into base length and suffix ("" when
 * the name carries neither). Exact matching on the base is what keeps
 * "output" from hitting "attn_output" (transformers' caveat). */
static size_t split_suffix(const char *s, const char **suffix) {
    size_t n = strlen(s);
    const char *dot = strrchr(s, '.');
    if (dot && (strcmp(dot, ".weight") == 0 || strcmp(dot, ".bias") == 0)) {
        *suffix = dot;
        return (size_t)(dot - s);
    }
    *suffix = "";
    return n;
}

static bool base_is(const char *s, size_t n, const char *want) {
    return strlen(want) == n && memcmp(s, want, n) == 0;
}

static int emit(char *out, size_t outsz, const char *a, const char *b, const char *c) {
    int k = snprintf(out, outsz, "%s%s%s", a, b, c);
    return (k < 0 || (size_t)k >= outsz) ? -1 : 0;
}

int gguf_name_to_hf(const char *arch, const char *name, char *out, size_t outsz) {
    const arch_desc *a = find_arch(arch);
    if (!a || !name || !out || outsz == 0) return -1;
    const char *suffix;
    size_t n = split_suffix(name, &suffix);
    if (base_is(name, n, "rope_freqs")) return 1;
    for (size_t i = 0; i < sizeof TOP_NAMES / sizeof TOP_NAMES[0]; i++)
        if (base_is(name, n, TOP_NAMES[i].gguf))
            return emit(out, outsz, TOP_NAMES[i].hf, suffix, "");
    if (strncmp(name, "blk.", 4) != 0) return -1;
    const char *p = name + 4, *q = p;
    while (*q >= '0' && *q <= '9')
        q++;
    if (q == p || q - p > 9 || *q != '.' || (q - p > 1 && *p == '0')) return -1;
    char layer[16];
    snprintf(layer, sizeof layer, "%.*s", (int)(q - p), p);
    const char *rest = q + 1;
    size_t rn = (size_t)(name + n - rest);
    if (name + n < rest) return -1;
    const char *hf = NULL;
    if (base_is(rest, rn, "ffn_gate_inp")) hf = a->router;
    for (size_t i = 0; !hf && i < sizeof BLOCK_NAMES / sizeof BLOCK_NAMES[0]; i++)
        if (base_is(rest, rn, BLOCK_NAMES[i].gguf)) hf = BLOCK_NAMES[i].hf;
    if (!hf) return -1;
    char head[48];
    snprintf(head, sizeof head, "model.layers.%s.", layer);
    int k = snprintf(out, outsz, "%s%s%s", head, hf, suffix);
    return (k < 0 || (size_t)k >= outsz) ? -1 : 0;
}

/* ---- Q/K permutation ----
 * HF -> GGUF (convert_hf_to_gguf.py LlamaModel.permute):
 *   W.reshape(H, 2, D/2, cols).swapaxes(1, 2).reshape(W.shape)
 * i.e. GGUF row h*D + 2j + t = HF row h*D + t*D/2 + j (t in {0,1}, j < D/2). */

static int qk_apply(void *rows, int64_t nrows, size_t row_bytes, int64_t n_head, bool inverse,
                    mp_error *err) {
    if (n_head <= 0 || nrows < 0 || nrows % n_head != 0 || (nrows / n_head) % 2 != 0)
        return mp_err(err, "bad_header",
                      "cannot (un)permute %" PRId64 " rows with %" PRId64
                      " heads: rows must be a multiple of 2 * heads",
                      nrows, n_head);
    if (nrows == 0 || row_bytes == 0) return 0;
    int64_t D = nrows / n_head, half = D / 2;
    size_t head_bytes;
    if (__builtin_mul_overflow((size_t)D, row_bytes, &head_bytes))
        return mp_err(err, "too_large", "head too large to permute");
    unsigned char *tmp = malloc(head_bytes);
    if (!tmp) return mp_err(err, "too_large", "cannot allocate %zu bytes", head_bytes);
    unsigned char *base = rows;
    for (int64_t h = 0; h < n_head; h++) {
        unsigned char *hp = base + (size_t)h * head_bytes;
        memcpy(tmp, hp, head_bytes);
        for (int64_t j = 0; j < half; j++)
            for (int64_t t = 0; t < 2; t++) {
                int64_t gg = 2 * j + t, hf = t * half + j;
                int64_t dst = inverse ? hf : gg, src = inverse ? gg : hf;
                memcpy(hp + (size_t)dst * row_bytes, tmp + (size_t)src * row_bytes, row_bytes);
            }
    }
    free(tmp);
    return 0;
}

int gguf_qk_unpermute(void *rows, int64_t nrows, size_t row_bytes, int64_t n_head, mp_error *err) {
    return qk_apply(rows, nrows, row_bytes, n_head, true, err);
}

int gguf_qk_permute(void *rows, int64_t nrows, size_t row_bytes, int64_t n_head, mp_error *err) {
    return qk_apply(rows, nrows, row_bytes, n_head, false, err);
}

/* ---- config.json ---- */

static json_t *arch_key(const json_t *meta, const char *arch, const char *suffix) {
    char key[160];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    return json_object_get(meta, key);
}

static bool get_int(const json_t *v, json_int_t *out) {
    if (!json_is_integer(v)) return false;
    *out = json_integer_value(v);
    return true;
}

/* Copies an integer key; required ones fail with bad_header when absent. */
static int put_int(json_t *cfg, const char *name, const json_t *v, bool required, const char *what,
                   mp_error *err) {
    json_int_t x;
    if (!v && !required) return 0;
    if (!get_int(v, &x) || x < 0)
        return mp_err(err, "bad_header",
                      "GGUF metadata %s is missing or not a non-negative integer", what);
    return json_object_set_new(cfg, name, json_integer(x)) < 0
               ? mp_err(err, "io_error", "out of memory")
               : 0;
}

static int put_real(json_t *cfg, const char *name, const json_t *v) {
    if (!json_is_number(v)) return 0;
    return json_object_set_new(cfg, name, json_real(json_number_value(v)));
}

json_t *gguf_hf_config(const json_t *meta, mp_error *err) {
    const char *arch = json_string_value(json_object_get(meta, "general.architecture"));
    if (!arch) {
        mp_err(err, "bad_header", "GGUF metadata has no general.architecture");
        return NULL;
    }
    const arch_desc *a = find_arch(arch);
    if (!a) {
        mp_err(err, "unsupported_format",
               "GGUF architecture '%.64s' has no config mapping (llama family only)", arch);
        return NULL;
    }
    json_int_t experts = 0;
    get_int(arch_key(meta, arch, "expert_count"), &experts);
    bool moe_class = experts > 0 && a->moe_class;
    json_t *cfg = json_pack("{s:[s], s:s}", "architectures", moe_class ? a->moe_class : a->hf_class,
                            "model_type", moe_class ? a->moe_model_type : a->model_type);
    if (!cfg) {
        mp_err(err, "io_error", "out of memory");
        return NULL;
    }
    const json_t *kv_heads = arch_key(meta, arch, "attention.head_count_kv");
    if (put_int(cfg, "hidden_size", arch_key(meta, arch, "embedding_length"), true,
                "<arch>.embedding_length", err) < 0 ||
        put_int(cfg, "num_hidden_layers", arch_key(meta, arch, "block_count"), true,
                "<arch>.block_count", err) < 0 ||
        put_int(cfg, "num_attention_heads", arch_key(meta, arch, "attention.head_count"), true,
                "<arch>.attention.head_count", err) < 0 ||
        put_int(cfg, "num_key_value_heads",
                kv_heads ? kv_heads : arch_key(meta, arch, "attention.head_count"), true,
                "<arch>.attention.head_count_kv", err) < 0)
        goto fail;
    if (put_int(cfg, "intermediate_size", arch_key(meta, arch, "feed_forward_length"), false,
                "<arch>.feed_forward_length", err) < 0 ||
        put_int(cfg, "max_position_embeddings", arch_key(meta, arch, "context_length"), false,
                "<arch>.context_length", err) < 0 ||
        put_int(cfg, "head_dim", arch_key(meta, arch, "attention.key_length"), false,
                "<arch>.attention.key_length", err) < 0)
        goto fail;
    put_real(cfg, "rms_norm_eps", arch_key(meta, arch, "attention.layer_norm_rms_epsilon"));
    put_real(cfg, "rope_theta", arch_key(meta, arch, "rope.freq_base"));

    const json_t *vocab = arch_key(meta, arch, "vocab_size");
    if (vocab) {
        if (put_int(cfg, "vocab_size", vocab, true, "<arch>.vocab_size", err) < 0) goto fail;
    } else {
        const json_t *toks = json_object_get(meta, "tokenizer.ggml.tokens");
        json_int_t nt = -1;
        if (json_is_array(toks))
            nt = (json_int_t)json_array_size(toks);
        else if (json_is_object(toks))
            get_int(json_object_get(toks, "count"), &nt);
        if (nt >= 0) json_object_set_new(cfg, "vocab_size", json_integer(nt));
    }
    if (put_int(cfg, "bos_token_id", json_object_get(meta, "tokenizer.ggml.bos_token_id"), false,
                "tokenizer.ggml.bos_token_id", err) < 0 ||
        put_int(cfg, "eos_token_id", json_object_get(meta, "tokenizer.ggml.eos_token_id"), false,
                "tokenizer.ggml.eos_token_id", err) < 0)
        goto fail;
    json_object_set_new(cfg, "hidden_act", json_string("silu"));

    if (experts > 0) {
        bool qwen = strncmp(arch, "qwen", 4) == 0;
        if (put_int(cfg, qwen ? "num_experts" : "num_local_experts",
                    arch_key(meta, arch, "expert_count"), true, "<arch>.expert_count", err) < 0 ||
            put_int(cfg, "num_experts_per_tok", arch_key(meta, arch, "expert_used_count"), false,
                    "<arch>.expert_used_count", err) < 0 ||
            put_int(cfg, "moe_intermediate_size",
                    arch_key(meta, arch, "expert_feed_forward_length"), false,
                    "<arch>.expert_feed_forward_length", err) < 0 ||
            put_int(cfg, "shared_expert_intermediate_size",
                    arch_key(meta, arch, "expert_shared_feed_forward_length"), false,
                    "<arch>.expert_shared_feed_forward_length", err) < 0)
            goto fail;
    }

    const char *stype = json_string_value(arch_key(meta, arch, "rope.scaling.type"));
    const json_t *sfac = arch_key(meta, arch, "rope.scaling.factor");
    if (stype && strcmp(stype, "none") != 0 && json_is_number(sfac)) {
        json_t *rs = json_pack("{s:s, s:s, s:f}", "type", stype, "rope_type", stype, "factor",
                               json_number_value(sfac));
        json_int_t orig;
        if (rs && get_int(arch_key(meta, arch, "rope.scaling.original_context_length"), &orig))
            json_object_set_new(rs, "original_max_position_embeddings", json_integer(orig));
        if (rs) json_object_set_new(cfg, "rope_scaling", rs);
    }
    return cfg;
fail:
    json_decref(cfg);
    return NULL;
}

json_t *gguf_hf_config_weights(const mp_weights *w, mp_error *err) {
    json_t *cfg = gguf_hf_config(w->metadata, err);
    if (!cfg) return NULL;
    bool has_output = false;
    const mp_tensor *embd = NULL;
    for (size_t i = 0; i < w->ntensors; i++) {
        if (strcmp(w->tensors[i].name, "output.weight") == 0) has_output = true;
        if (strcmp(w->tensors[i].name, "token_embd.weight") == 0) embd = &w->tensors[i];
    }
    json_object_set_new(cfg, "tie_word_embeddings", json_boolean(!has_output));
    if (!json_object_get(cfg, "vocab_size") && embd && embd->ndim == 2)
        json_object_set_new(cfg, "vocab_size", json_integer(embd->shape[0]));
    return cfg;
}
