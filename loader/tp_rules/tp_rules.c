/*
 * tp_rules.c - tensor-parallel split rules as data (one table per
 * architecture family), the config.json reader they need, and the slice
 * arithmetic shared by shard, inspect and warm_load. See tp_rules.h.
 *
 * Split semantics follow SGLang's layers: QKVParallelLinear (q heads / tp, KV
 * heads / tp or replicated when tp > kv heads), MergedColumnParallelLinear
 * (gate and up split separately, then [gate_r; up_r]), RowParallelLinear
 * (input dim; bias whole on every rank), VocabParallelEmbedding (rows padded
 * to 64, split, padding zero), FusedMoE (w13 = [w1_r; w3_r] per expert, w2
 * split on its input dim), Fp8 block scales split in block units.
 */
#include "loader/tp_rules/tp_rules.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/formats/weights.h"
#include "util/fsutil.h"

/* ------------------------------------------------------------------------ */
/* rule tables                                                               */

#define ATTN_RULES                                                                                 \
    {"model.embed_tokens", TP_VOCAB, TP_PART_NONE, NULL, -1},                                      \
        {"lm_head", TP_VOCAB, TP_PART_NONE, NULL, -1},                                             \
        {"model.norm", TP_REPLICATED, TP_PART_NONE, NULL, -1},                                     \
        {"model.layers.#.input_layernorm", TP_REPLICATED, TP_PART_NONE, NULL, -1},                 \
        {"model.layers.#.post_attention_layernorm", TP_REPLICATED, TP_PART_NONE, NULL, -1},        \
        {"model.layers.#.pre_feedforward_layernorm", TP_REPLICATED, TP_PART_NONE, NULL, -1},       \
        {"model.layers.#.post_feedforward_layernorm", TP_REPLICATED, TP_PART_NONE, NULL, -1},      \
        {"model.layers.#.self_attn.q_norm", TP_REPLICATED, TP_PART_NONE, NULL, -1},                \
        {"model.layers.#.self_attn.k_norm", TP_REPLICATED, TP_PART_NONE, NULL, -1},                \
        {"model.layers.#.self_attn.rotary_emb", TP_DROP, TP_PART_NONE, NULL, -1},                  \
        {"model.layers.#.self_attn.q_proj", TP_QKV, TP_PART_Q,                                     \
         "model.layers.#.self_attn.qkv_proj", -1},                                                 \
        {"model.layers.#.self_attn.k_proj", TP_QKV, TP_PART_K,                                     \
         "model.layers.#.self_attn.qkv_proj", -1},                                                 \
        {"model.layers.#.self_attn.v_proj", TP_QKV, TP_PART_V,                                     \
         "model.layers.#.self_attn.qkv_proj", -1},                                                 \
    {                                                                                              \
        "model.layers.#.self_attn.o_proj", TP_ROW, TP_PART_NONE, NULL, -1                          \
    }

#define DENSE_MLP_RULES                                                                            \
    {"model.layers.#.mlp.gate_proj", TP_COLUMN, TP_PART_GATE, "model.layers.#.mlp.gate_up_proj",   \
     -1},                                                                                          \
        {"model.layers.#.mlp.up_proj", TP_COLUMN, TP_PART_UP, "model.layers.#.mlp.gate_up_proj",   \
         -1},                                                                                      \
    {                                                                                              \
        "model.layers.#.mlp.down_proj", TP_ROW, TP_PART_NONE, NULL, -1                             \
    }

#define RULES_END                                                                                  \
    { NULL, 0, 0, NULL, -1 }

static const tp_rule RULES_DENSE[] = {ATTN_RULES, DENSE_MLP_RULES, RULES_END};

static const tp_rule RULES_MIXTRAL[] = {
    ATTN_RULES,
    {"model.layers.#.block_sparse_moe.gate", TP_REPLICATED, TP_PART_NONE, NULL, -1},
    {"model.layers.#.block_sparse_moe.experts.#.w1", TP_EXPERT, TP_PART_GATE,
     "model.layers.#.block_sparse_moe.experts.w13_", 1},
    {"model.layers.#.block_sparse_moe.experts.#.w3", TP_EXPERT, TP_PART_UP,
     "model.layers.#.block_sparse_moe.experts.w13_", 1},
    {"model.layers.#.block_sparse_moe.experts.#.w2", TP_EXPERT, TP_PART_DOWN,
     "model.layers.#.block_sparse_moe.experts.w2_", 1},
    RULES_END,
};

/* Qwen2-MoE and Qwen3-MoE: routed experts, optional shared expert (qwen2),
 * and dense MLP layers where mlp_only_layers / decoder_sparse_step say so. */
static const tp_rule RULES_QWEN_MOE[] = {
    ATTN_RULES,
    DENSE_MLP_RULES,
    {"model.layers.#.mlp.gate", TP_REPLICATED, TP_PART_NONE, NULL, -1},
    {"model.layers.#.mlp.shared_expert_gate", TP_REPLICATED, TP_PART_NONE, NULL, -1},
    {"model.layers.#.mlp.experts.#.gate_proj", TP_EXPERT, TP_PART_GATE,
     "model.layers.#.mlp.experts.w13_", 1},
    {"model.layers.#.mlp.experts.#.up_proj", TP_EXPERT, TP_PART_UP,
     "model.layers.#.mlp.experts.w13_", 1},
    {"model.layers.#.mlp.experts.#.down_proj", TP_EXPERT, TP_PART_DOWN,
     "model.layers.#.mlp.experts.w2_", 1},
    {"model.layers.#.mlp.shared_expert.gate_proj", TP_COLUMN, TP_PART_GATE,
     "model.layers.#.mlp.shared_expert.gate_up_proj", -1},
    {"model.layers.#.mlp.shared_expert.up_proj", TP_COLUMN, TP_PART_UP,
     "model.layers.#.mlp.shared_expert.gate_up_proj", -1},
    {"model.layers.#.mlp.shared_expert.down_proj", TP_ROW, TP_PART_NONE, NULL, -1},
    RULES_END,
};

typedef struct fam_entry {
    const char *arch, *model_type;
    tp_family family;
} fam_entry;

static const fam_entry FAMILIES[] = {
    {"LlamaForCausalLM", "llama", TP_FAM_LLAMA},
    {"MistralForCausalLM", "mistral", TP_FAM_LLAMA},
    {"Qwen2ForCausalLM", "qwen2", TP_FAM_QWEN2},
    {"Qwen3ForCausalLM", "qwen3", TP_FAM_QWEN3},
    {"GemmaForCausalLM", "gemma", TP_FAM_GEMMA},
    {"Gemma2ForCausalLM", "gemma2", TP_FAM_GEMMA},
    {"MixtralForCausalLM", "mixtral", TP_FAM_MIXTRAL},
    {"Qwen2MoeForCausalLM", "qwen2_moe", TP_FAM_QWEN2_MOE},
    {"Qwen3MoeForCausalLM", "qwen3_moe", TP_FAM_QWEN3_MOE},
};

static const tp_rule *family_rules(tp_family f) {
    switch (f) {
    case TP_FAM_LLAMA:
    case TP_FAM_QWEN2:
    case TP_FAM_QWEN3:
    case TP_FAM_GEMMA:
        return RULES_DENSE;
    case TP_FAM_MIXTRAL:
        return RULES_MIXTRAL;
    case TP_FAM_QWEN2_MOE:
    case TP_FAM_QWEN3_MOE:
        return RULES_QWEN_MOE;
    default:
        return NULL;
    }
}

/* Families whose SGLang class makes lm_head the embedding module itself when
 * tie_word_embeddings is set (so the state dict holds the pair once after
 * ShardedStateLoader's dedup). Gemma has no lm_head at all; the MoE classes
 * always build their own ParallelLMHead. */
static bool family_aliases_lm_head(tp_family f) {
    return f == TP_FAM_LLAMA || f == TP_FAM_QWEN2 || f == TP_FAM_QWEN3;
}

static bool family_is_moe(tp_family f) {
    return f == TP_FAM_MIXTRAL || f == TP_FAM_QWEN2_MOE || f == TP_FAM_QWEN3_MOE;
}

const char *tp_kind_name(tp_kind k) {
    switch (k) {
    case TP_REPLICATED:
        return "replicated";
    case TP_COLUMN:
        return "column";
    case TP_QKV:
        return "qkv";
    case TP_ROW:
        return "row";
    case TP_VOCAB:
        return "vocab";
    case TP_EXPERT:
        return "expert";
    case TP_DROP:
        return "drop";
    }
    return "?";
}

/* ------------------------------------------------------------------------ */
/* config                                                                    */

static int64_t jint(const json_t *o, const char *k, int64_t dflt) {
    const json_t *v = json_object_get(o, k);
    if (json_is_integer(v)) return json_integer_value(v);
    return dflt;
}

int tp_config_from_json(const json_t *config, tp_model_cfg *cfg, mp_error *err) {
    memset(cfg, 0, sizeof *cfg);
    if (!json_is_object(config)) return mp_err(err, "bad_config", "config.json is not an object");
    const json_t *text = json_object_get(config, "text_config");
    const json_t *c = json_is_object(text) ? text : config;
    const char *mt = json_string_value(json_object_get(c, "model_type"));
    if (!mt) mt = json_string_value(json_object_get(config, "model_type"));
    snprintf(cfg->model_type, sizeof cfg->model_type, "%s", mt ? mt : "");
    const json_t *archs = json_object_get(config, "architectures");
    const char *arch = json_string_value(json_array_get(archs, 0));
    if (!arch && c != config)
        arch = json_string_value(json_array_get(json_object_get(c, "architectures"), 0));
    snprintf(cfg->architecture, sizeof cfg->architecture, "%s", arch ? arch : "");
    cfg->family = TP_FAM_UNKNOWN;
    for (size_t i = 0; i < sizeof FAMILIES / sizeof *FAMILIES; i++)
        if (arch && strcmp(arch, FAMILIES[i].arch) == 0) cfg->family = FAMILIES[i].family;
    if (cfg->family == TP_FAM_UNKNOWN && !arch)
        for (size_t i = 0; i < sizeof FAMILIES / sizeof *FAMILIES; i++)
            if (strcmp(cfg->model_type, FAMILIES[i].model_type) == 0)
                cfg->family = FAMILIES[i].family;

    cfg->num_layers = jint(c, "num_hidden_layers", 0);
    cfg->num_heads = jint(c, "num_attention_heads", 0);
    cfg->num_kv_heads = jint(c, "num_key_value_heads", cfg->num_heads);
    cfg->hidden_size = jint(c, "hidden_size", 0);
    cfg->head_dim = jint(c, "head_dim", 0);
    if (cfg->head_dim <= 0 && cfg->num_heads > 0) cfg->head_dim = cfg->hidden_size / cfg->num_heads;
    cfg->intermediate_size = jint(c, "intermediate_size", 0);
    cfg->vocab_size = jint(c, "vocab_size", 0);
    cfg->num_experts = jint(c, "num_local_experts", jint(c, "num_experts", 0));
    cfg->moe_intermediate_size = jint(c, "moe_intermediate_size", 0);
    if (cfg->family == TP_FAM_MIXTRAL) cfg->moe_intermediate_size = cfg->intermediate_size;
    cfg->shared_expert_intermediate_size = jint(c, "shared_expert_intermediate_size", 0);
    const json_t *tie = json_object_get(c, "tie_word_embeddings");
    if (!tie) tie = json_object_get(config, "tie_word_embeddings");
    /* transformers' PretrainedConfig default is True; gemma always ties. */
    cfg->tie_word_embeddings = tie ? json_is_true(tie) : true;
    if (cfg->family == TP_FAM_GEMMA) cfg->tie_word_embeddings = true;

    const json_t *q = json_object_get(config, "quantization_config");
    if (!q) q = json_object_get(c, "quantization_config");
    if (json_is_object(q)) {
        const char *qm = json_string_value(json_object_get(q, "quant_method"));
        snprintf(cfg->quant_method, sizeof cfg->quant_method, "%s", qm ? qm : "unknown");
        const json_t *bs = json_object_get(q, "weight_block_size");
        if (json_is_array(bs) && json_array_size(bs) == 2 &&
            json_is_integer(json_array_get(bs, 0)) && json_is_integer(json_array_get(bs, 1))) {
            cfg->block_n = json_integer_value(json_array_get(bs, 0));
            cfg->block_k = json_integer_value(json_array_get(bs, 1));
            if (cfg->block_n <= 0 || cfg->block_k <= 0 || cfg->block_n > (1 << 20) ||
                cfg->block_k > (1 << 20))
                return mp_err(err, "bad_config", "weight_block_size must be two positive ints");
        }
    }
    int64_t lim = (int64_t)1 << 40;
    if (cfg->num_heads < 0 || cfg->num_kv_heads < 0 || cfg->head_dim < 0 || cfg->hidden_size < 0 ||
        cfg->intermediate_size < 0 || cfg->vocab_size < 0 || cfg->num_experts < 0 ||
        cfg->moe_intermediate_size < 0 || cfg->shared_expert_intermediate_size < 0 ||
        cfg->num_heads > lim || cfg->num_kv_heads > lim || cfg->head_dim > lim ||
        cfg->hidden_size > lim || cfg->intermediate_size > lim || cfg->vocab_size > lim ||
        cfg->num_experts > lim || cfg->moe_intermediate_size > lim ||
        cfg->shared_expert_intermediate_size > lim)
        return mp_err(err, "bad_config", "config.json has a negative or absurd size");
    return 0;
}

int tp_config_load(const char *model_dir, tp_model_cfg *cfg, mp_error *err) {
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/config.json", model_dir) >= (int)sizeof path)
        return mp_err(err, "bad_path", "model path too long");
    char *buf = NULL;
    size_t len = 0;
    if (fs_read_all(path, 16u << 20, &buf, &len, err) != 0) {
        if (err && strcmp(err->code, "too_large") != 0)
            mp_err(err, "not_found", "no readable config.json in %s", model_dir);
        return -1;
    }
    json_error_t je;
    json_t *root = json_loadb(buf, len, 0, &je);
    free(buf);
    if (!root) return mp_err(err, "bad_config", "config.json: %s (line %d)", je.text, je.line);
    int rc = tp_config_from_json(root, cfg, err);
    json_decref(root);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* checks                                                                    */

static int64_t round_up(int64_t v, int64_t m) {
    return (v + m - 1) / m * m;
}

static int64_t kv_per_rank(const tp_model_cfg *c, int tp) {
    return c->num_kv_heads >= tp ? c->num_kv_heads / tp : 1;
}

int tp_check(const tp_model_cfg *c, int tp, mp_error *err) {
    if (tp < 1) return mp_err(err, "bad_tp_size", "tp_size must be >= 1 (got %d)", tp);
    if (c->family == TP_FAM_UNKNOWN)
        return mp_err(err, "unsupported_architecture",
                      "architecture '%s' (model_type '%s') has no tensor-parallel rules",
                      c->architecture[0] ? c->architecture : "?",
                      c->model_type[0] ? c->model_type : "?");
    if (c->num_heads <= 0 || c->num_kv_heads <= 0 || c->head_dim <= 0)
        return mp_err(err, "bad_config", "config.json lacks num_attention_heads / head sizes");
    if (c->num_heads % tp != 0)
        return mp_err(err, "bad_tp_size", "tp_size %d does not divide num_attention_heads %lld", tp,
                      (long long)c->num_heads);
    if (c->num_kv_heads % tp != 0 && tp % c->num_kv_heads != 0)
        return mp_err(err, "bad_tp_size",
                      "tp_size %d and num_key_value_heads %lld: neither divides the other", tp,
                      (long long)c->num_kv_heads);
    bool moe = family_is_moe(c->family);
    /* SGLang's MoE blocks refuse a tp larger than the expert count. */
    if (moe && c->num_experts > 0 && tp > c->num_experts)
        return mp_err(err, "bad_tp_size", "tp_size %d is greater than the number of experts %lld",
                      tp, (long long)c->num_experts);
    if (!moe && c->intermediate_size % tp != 0)
        return mp_err(err, "bad_tp_size", "tp_size %d does not divide intermediate_size %lld", tp,
                      (long long)c->intermediate_size);
    if (moe && c->moe_intermediate_size % tp != 0)
        return mp_err(err, "bad_tp_size",
                      "tp_size %d does not divide the expert intermediate "
                      "size %lld",
                      tp, (long long)c->moe_intermediate_size);
    if (c->shared_expert_intermediate_size % tp != 0)
        return mp_err(err, "bad_tp_size",
                      "tp_size %d does not divide shared_expert_intermediate_size %lld", tp,
                      (long long)c->shared_expert_intermediate_size);
    if (c->vocab_size > 0 && round_up(c->vocab_size, TP_VOCAB_PAD) % tp != 0)
        return mp_err(err, "bad_tp_size",
                      "tp_size %d does not divide the padded vocabulary %lld (vocab_size %lld "
                      "rounded up to %d)",
                      tp, (long long)round_up(c->vocab_size, TP_VOCAB_PAD),
                      (long long)c->vocab_size, TP_VOCAB_PAD);
    if (c->block_n > 0) {
        /* Fp8 block quantization: every per-rank output slice of a fused or
         * split layer is a whole number of blocks (SGLang's
         * validate_block_quant_shapes), likewise every split input dim. */
        int64_t outs[4] = {c->num_heads / tp * c->head_dim, kv_per_rank(c, tp) * c->head_dim,
                           moe ? c->moe_intermediate_size / tp : c->intermediate_size / tp,
                           c->shared_expert_intermediate_size / tp};
        for (int i = 0; i < 4; i++)
            if (outs[i] % c->block_n != 0)
                return mp_err(err, "bad_tp_size",
                              "tp_size %d: a per-rank output size %lld is not a multiple of the "
                              "fp8 block %lld",
                              tp, (long long)outs[i], (long long)c->block_n);
        if (tp > 1)
            for (int i = 0; i < 4; i++)
                if (i != 1 && outs[i] % c->block_k != 0)
                    return mp_err(err, "bad_tp_size",
                                  "tp_size %d: a per-rank input size %lld is not a multiple of "
                                  "the fp8 block %lld",
                                  tp, (long long)outs[i], (long long)c->block_k);
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* lookup                                                                    */

#define TP_MAX_CAPS 4

/* '#' matches one or more digits; captures their positions. */
static bool pat_match(const char *p, const char *s, size_t slen, size_t cap_off[], size_t cap_len[],
                      int *ncap) {
    size_t i = 0;
    *ncap = 0;
    for (; *p; p++) {
        if (*p == '#') {
            size_t st = i;
            while (i < slen && isdigit((unsigned char)s[i]))
                i++;
            if (i == st || *ncap >= TP_MAX_CAPS) return false;
            cap_off[*ncap] = st;
            cap_len[*ncap] = i - st;
            (*ncap)++;
        } else {
            if (i >= slen || s[i] != *p) return false;
            i++;
        }
    }
    return i == slen;
}

/* Splits "a.b.c.weight" into module "a.b.c" and param "weight". */
static size_t module_len(const char *name) {
    const char *dot = strrchr(name, '.');
    return dot ? (size_t)(dot - name) : 0;
}

static const tp_rule *lookup(const tp_model_cfg *cfg, const char *name, size_t cap_off[],
                             size_t cap_len[], int *ncap) {
    const tp_rule *rules = family_rules(cfg->family);
    if (!rules) return NULL;
    size_t ml = module_len(name);
    if (ml == 0) return NULL;
    for (const tp_rule *r = rules; r->pattern; r++)
        if (pat_match(r->pattern, name, ml, cap_off, cap_len, ncap)) return r;
    return NULL;
}

const tp_rule *tp_rule_for(const tp_model_cfg *cfg, const char *tensor_name) {
    size_t off[TP_MAX_CAPS], len[TP_MAX_CAPS];
    int n;
    return lookup(cfg, tensor_name, off, len, &n);
}

/* ------------------------------------------------------------------------ */
/* slices                                                                    */

static int set_piece_shape(const mp_tensor *t, tp_slice *s, mp_error *err) {
    s->ndim = t->ndim;
    memcpy(s->shape, t->shape, sizeof s->shape);
    if (s->dim >= 0) {
        int64_t ext = 0;
        for (int i = 0; i < s->nseg; i++)
            ext += s->seg[i].len;
        s->shape[s->dim] = ext;
    }
    if (!mp_tensor_bytes(t->dtype, s->shape, s->ndim, &s->bytes))
        return mp_err(err, "unsplittable", "%s: bad shape for %s", t->name,
                      mp_dtype_name(t->dtype));
    return 0;
}

static int split_even(const mp_tensor *t, int dim, int tp, int rank, tp_slice *s, mp_error *err) {
    if (dim >= t->ndim)
        return mp_err(err, "unsplittable", "%s: has %d dims, cannot split dim %d", t->name, t->ndim,
                      dim);
    int64_t n = t->shape[dim];
    if (n % tp != 0)
        return mp_err(err, "unsplittable", "%s: dim %d (%lld) does not divide by tp_size %d",
                      t->name, dim, (long long)n, tp);
    s->dim = dim;
    s->nseg = 1;
    s->seg[0].len = n / tp;
    s->seg[0].start = (int64_t)rank * (n / tp);
    return 0;
}

static bool is_param(const char *name, const char *param) {
    size_t ml = module_len(name);
    return ml && strcmp(name + ml + 1, param) == 0;
}

/* Builds the target name: rule target with captures filled (skipping the
 * expert capture), joined to the parameter. */
static int make_target(const tp_rule *r, const char *name, const size_t *cap_off,
                       const size_t *cap_len, int ncap, tp_slice *s, mp_error *err) {
    const char *param = name + module_len(name) + 1;
    if (!r || !r->target) {
        if (strlen(name) >= sizeof s->target)
            return mp_err(err, "unsplittable", "tensor name too long");
        snprintf(s->target, sizeof s->target, "%s", name);
        return 0;
    }
    char buf[TP_NAME_MAX];
    size_t o = 0;
    int ci = 0;
    for (const char *p = r->target; *p; p++) {
        if (*p == '#') {
            while (ci == r->expert_capture)
                ci++;
            if (ci >= ncap) return mp_err(err, "internal", "rule target has too many '#'");
            if (o + cap_len[ci] >= sizeof buf) return mp_err(err, "unsplittable", "name too long");
            memcpy(buf + o, name + cap_off[ci], cap_len[ci]);
            o += cap_len[ci];
            ci++;
        } else {
            if (o + 1 >= sizeof buf) return mp_err(err, "unsplittable", "name too long");
            buf[o++] = *p;
        }
    }
    buf[o] = 0;
    bool underscore = o > 0 && buf[o - 1] == '_';
    if (snprintf(s->target, sizeof s->target, "%s%s%s", buf, underscore ? "" : ".", param) >=
        (int)sizeof s->target)
        return mp_err(err, "unsplittable", "name too long");
    return 0;
}

/* What tp_slice_for works from: the request, the tensor's rule with its
 * captures, and which parameter of its module the tensor is. */
typedef struct slice_req {
    const tp_model_cfg *cfg;
    const mp_tensor *t;
    int tp, rank;
    tp_naming naming;
    const tp_rule *r;
    size_t cap_off[TP_MAX_CAPS], cap_len[TP_MAX_CAPS];
    int ncap;
    bool is_w, is_b, is_sc; /* weight, bias, fp8 weight_scale_inv */
} slice_req;

/* Only weights, biases and fp8 block scales can be split. */
static int check_param(const slice_req *rq, const tp_slice *s, mp_error *err) {
    const mp_tensor *t = rq->t;
    if (s->kind != TP_REPLICATED && s->kind != TP_DROP && !rq->is_w && !rq->is_b && !rq->is_sc)
        return mp_err(err, "unsupported_quantization",
                      "tensor '%s': only weight, bias and fp8 weight_scale_inv can be split",
                      t->name);
    if (rq->is_sc && rq->cfg->block_n <= 0)
        return mp_err(err, "unsupported_quantization",
                      "tensor '%s': weight_scale_inv without quantization_config."
                      "weight_block_size",
                      t->name);
    if (rq->is_sc && s->kind == TP_VOCAB)
        return mp_err(err, "unsupported_quantization", "tensor '%s': quantized embedding", t->name);
    return 0;
}

static int split_expert(const slice_req *rq, tp_slice *s, mp_error *err) {
    const mp_tensor *t = rq->t;
    if (rq->r->part != TP_PART_DOWN) return split_even(t, 0, rq->tp, rq->rank, s, err);
    if (rq->is_w) {
        if (t->ndim != 2)
            return mp_err(err, "unsplittable", "%s: expert weight wants 2 dims", t->name);
        return split_even(t, 1, rq->tp, rq->rank, s, err);
    }
    if (rq->is_sc) return split_even(t, 1, rq->tp, rq->rank, s, err);
    return 0; /* a down bias is whole on every rank */
}

/* Whole heads per rank; with fewer KV heads than ranks, each rank holds a
 * copy of the KV head it shares. */
static int split_qkv(const slice_req *rq, tp_slice *s, mp_error *err) {
    const tp_model_cfg *cfg = rq->cfg;
    const mp_tensor *t = rq->t;
    int tp = rq->tp, rank = rq->rank;
    if (t->ndim < 1) return mp_err(err, "unsplittable", "%s: a scalar", t->name);
    int64_t heads = rq->r->part == TP_PART_Q ? cfg->num_heads : cfg->num_kv_heads;
    if (t->shape[0] % heads != 0)
        return mp_err(err, "unsplittable", "%s: dim 0 (%lld) is not %lld heads", t->name,
                      (long long)t->shape[0], (long long)heads);
    int64_t per_head = t->shape[0] / heads;
    s->dim = 0;
    s->nseg = 1;
    if (rq->r->part == TP_PART_Q || cfg->num_kv_heads >= tp) {
        int64_t hpr = heads / tp;
        s->seg[0].start = (int64_t)rank * hpr * per_head;
        s->seg[0].len = hpr * per_head;
    } else {
        int64_t h = rank / (tp / cfg->num_kv_heads); /* replicated KV head */
        s->seg[0].start = h * per_head;
        s->seg[0].len = per_head;
    }
    return 0;
}

/* Rows of the vocab padded to TP_VOCAB_PAD; the rows past the tensor's end
 * are a zero segment (start -1). */
static int split_vocab(const slice_req *rq, tp_slice *s, mp_error *err) {
    const mp_tensor *t = rq->t;
    int tp = rq->tp;
    if (t->ndim < 1) return mp_err(err, "unsplittable", "%s: a scalar", t->name);
    int64_t v = t->shape[0];
    int64_t vp = round_up(v > rq->cfg->vocab_size ? v : rq->cfg->vocab_size, TP_VOCAB_PAD);
    if (vp % tp != 0)
        return mp_err(err, "unsplittable", "%s: padded vocab %lld does not divide by %d", t->name,
                      (long long)vp, tp);
    int64_t per = vp / tp, st = (int64_t)rq->rank * per;
    int64_t have = v > st ? (v - st < per ? v - st : per) : 0;
    s->dim = 0;
    s->nseg = 0;
    if (have > 0) {
        s->seg[s->nseg].start = st;
        s->seg[s->nseg].len = have;
        s->nseg++;
    }
    if (per - have > 0) {
        s->seg[s->nseg].start = -1;
        s->seg[s->nseg].len = per - have;
        s->nseg++;
    }
    return 0;
}

/* The segments of the source that are this rank's, by the slice's kind. */
static int split_piece(const slice_req *rq, tp_slice *s, mp_error *err) {
    const mp_tensor *t = rq->t;
    switch (s->kind) {
    case TP_REPLICATED:
        return 0;
    case TP_COLUMN:
        if (t->ndim < 1) return mp_err(err, "unsplittable", "%s: a scalar", t->name);
        return split_even(t, 0, rq->tp, rq->rank, s, err);
    case TP_ROW:
        if (t->ndim != 2) return mp_err(err, "unsplittable", "%s: row split wants 2 dims", t->name);
        return split_even(t, 1, rq->tp, rq->rank, s, err);
    case TP_EXPERT:
        return split_expert(rq, s, err);
    case TP_QKV:
        return split_qkv(rq, s, err);
    case TP_VOCAB:
        return split_vocab(rq, s, err);
    default:
        return mp_err(err, "internal", "bad rule kind");
    }
}

/* q, k and v fuse into qkv_proj: q rows, then k, then v, each as many rows
 * per rank as the config says (in fp8 scale rows for weight_scale_inv). */
static int place_qkv(const slice_req *rq, tp_slice *s, mp_error *err) {
    const tp_model_cfg *cfg = rq->cfg;
    const tp_rule *r = rq->r;
    int unit_div = rq->is_sc ? (int)cfg->block_n : 1; /* rows per scale row along dim 0 */
    int64_t q_rows = cfg->num_heads / rq->tp * cfg->head_dim,
            kv_rows = kv_per_rank(cfg, rq->tp) * cfg->head_dim;
    if (q_rows % unit_div != 0 || kv_rows % unit_div != 0)
        return mp_err(err, "unsplittable", "%s: q/k/v rows per rank not whole fp8 blocks",
                      rq->t->name);
    int64_t q = q_rows / unit_div, kv = kv_rows / unit_div;
    if (s->shape[0] != (r->part == TP_PART_Q ? q : kv))
        return mp_err(err, "unsplittable",
                      "%s: %lld rows per rank, config says %lld (head_dim %lld)", rq->t->name,
                      (long long)s->shape[0], (long long)(r->part == TP_PART_Q ? q : kv),
                      (long long)cfg->head_dim);
    s->tshape[0] = q + 2 * kv;
    s->t_offset = r->part == TP_PART_Q ? 0 : r->part == TP_PART_K ? q : q + kv;
    return 0;
}

/* Experts stack along a new dim 0 (the expert number, from the name);
 * gate and up fuse within an expert. */
static int place_expert(const slice_req *rq, tp_slice *s, mp_error *err) {
    const tp_model_cfg *cfg = rq->cfg;
    const mp_tensor *t = rq->t;
    const tp_rule *r = rq->r;
    if (s->ndim + 1 > MP_MAX_DIMS) return mp_err(err, "unsplittable", "too many dims");
    char num[32];
    size_t cl = rq->cap_len[r->expert_capture];
    if (cl >= sizeof num) return mp_err(err, "unsplittable", "%s: expert number", t->name);
    memcpy(num, t->name + rq->cap_off[r->expert_capture], cl);
    num[cl] = 0;
    errno = 0;
    long long e = strtoll(num, NULL, 10);
    if (errno || e < 0 || e >= cfg->num_experts)
        return mp_err(err, "unsplittable", "%s: expert %s outside num_experts %lld", t->name, num,
                      (long long)cfg->num_experts);
    s->tndim = s->ndim + 1;
    s->tshape[0] = cfg->num_experts;
    for (int d = 0; d < s->ndim; d++)
        s->tshape[d + 1] = s->shape[d];
    s->t_expert = e;
    if (r->part != TP_PART_DOWN && s->ndim >= 1) {
        s->tshape[1] = 2 * s->shape[0];
        s->t_offset = r->part == TP_PART_UP ? s->shape[0] : 0;
    }
    return 0;
}

/* Placement: the target the piece goes to under the naming asked for, the
 * target's per-rank shape and the piece's place in it. */
static int place_piece(const slice_req *rq, tp_slice *s, mp_error *err) {
    const tp_model_cfg *cfg = rq->cfg;
    const mp_tensor *t = rq->t;
    const tp_rule *r = rq->r;
    s->tndim = s->ndim;
    memcpy(s->tshape, s->shape, sizeof s->tshape);
    if (rq->naming == TP_NAMING_HF) return make_target(NULL, t->name, NULL, NULL, 0, s, err);
    if (s->kind == TP_VOCAB && cfg->tie_word_embeddings && family_aliases_lm_head(cfg->family) &&
        strcmp(t->name, "model.embed_tokens.weight") == 0) {
        /* ShardedStateLoader keeps the tied pair once, under the smaller key. */
        snprintf(s->target, sizeof s->target, "lm_head.weight");
        return 0;
    }
    const tp_rule *tr = r;
    if (s->kind == TP_REPLICATED && r->kind == TP_ROW) tr = NULL;
    if (make_target(tr, t->name, rq->cap_off, rq->cap_len, rq->ncap, s, err) != 0) return -1;
    if (r->kind == TP_QKV) return place_qkv(rq, s, err);
    if (r->kind == TP_COLUMN && r->part != TP_PART_NONE) {
        s->tshape[0] = 2 * s->shape[0];
        s->t_offset = r->part == TP_PART_UP ? s->shape[0] : 0;
    } else if (r->kind == TP_EXPERT) {
        return place_expert(rq, s, err);
    }
    return 0;
}

int tp_slice_for(const tp_model_cfg *cfg, const mp_tensor *t, int tp, int rank, tp_naming naming,
                 tp_slice *s, mp_error *err) {
    memset(s, 0, sizeof *s);
    s->dim = -1;
    s->t_expert = -1;
    if (tp_check(cfg, tp, err) != 0) return -1;
    if (rank < 0 || rank >= tp)
        return mp_err(err, "bad_tp_size", "rank %d outside tp_size %d", rank, tp);
    if (t->dtype == MP_DT_GGML)
        return mp_err(err, "unsplittable", "%s: ggml block types cannot be split", t->name);
    slice_req rq = {.cfg = cfg, .t = t, .tp = tp, .rank = rank, .naming = naming};
    rq.r = lookup(cfg, t->name, rq.cap_off, rq.cap_len, &rq.ncap);
    if (!rq.r)
        return mp_err(err, "unsplittable", "tensor '%s' matches no %s rule", t->name,
                      cfg->architecture[0] ? cfg->architecture : cfg->model_type);
    s->rule = rq.r;
    s->kind = rq.r->kind;
    rq.is_w = is_param(t->name, "weight");
    rq.is_b = is_param(t->name, "bias");
    rq.is_sc = is_param(t->name, "weight_scale_inv");
    if (check_param(&rq, s, err) != 0) return -1;
    /* Gemma's SGLang class has no lm_head (the embedding is the output
     * layer), so a checkpoint's copy has nowhere to go. */
    if (naming == TP_NAMING_SGLANG && cfg->family == TP_FAM_GEMMA &&
        strcmp(t->name, "lm_head.weight") == 0)
        s->kind = TP_DROP;
    if (s->kind == TP_DROP) {
        s->dropped = true;
        snprintf(s->target, sizeof s->target, "%s", t->name);
        return set_piece_shape(t, s, err);
    }
    if (s->kind == TP_ROW && !rq.is_w && !rq.is_sc) s->kind = TP_REPLICATED; /* row bias: whole */
    if (split_piece(&rq, s, err) != 0) return -1;
    if (set_piece_shape(t, s, err) != 0) return -1;
    return place_piece(&rq, s, err);
}

/* ------------------------------------------------------------------------ */
/* gather                                                                    */

/* Geometry of a slice: outer count (dims before dim), bytes of one index
 * along dim (the inner block). */
static int slice_geom(const mp_tensor *t, const tp_slice *s, uint64_t *outer, uint64_t *inner,
                      mp_error *err) {
    *outer = 1;
    for (int d = 0; d < s->dim; d++)
        *outer *= (uint64_t)t->shape[d];
    if (!mp_tensor_bytes(t->dtype, t->shape + s->dim + 1, t->ndim - s->dim - 1, inner))
        return mp_err(err, "unsplittable", "%s: slice rows are not whole bytes", t->name);
    return 0;
}

int tp_slice_gather(const mp_tensor *t, const tp_slice *s, const void *full, void *dst,
                    mp_error *err) {
    if (s->dropped) return 0;
    if (s->dim < 0) {
        memcpy(dst, full, s->bytes);
        return 0;
    }
    uint64_t outer, inner;
    if (slice_geom(t, s, &outer, &inner, err) != 0) return -1;
    const unsigned char *src = full;
    unsigned char *o = dst;
    uint64_t row = inner * (uint64_t)t->shape[s->dim];
    for (uint64_t i = 0; i < outer; i++)
        for (int k = 0; k < s->nseg; k++) {
            uint64_t n = inner * (uint64_t)s->seg[k].len;
            if (s->seg[k].start < 0)
                memset(o, 0, n);
            else
                memcpy(o, src + i * row + inner * (uint64_t)s->seg[k].start, n);
            o += n;
        }
    return 0;
}

int tp_slice_pread(int fd, const mp_tensor *t, const tp_slice *s, void *dst, mp_error *err) {
    if (s->dropped) return 0;
    if (t->is_view || t->data_bytes != t->nbytes)
        return mp_err(err, "unsplittable", "%s: not a contiguous tensor", t->name);
    if (s->dim < 0) return weights_pread(fd, dst, s->bytes, t->data_offset, err);
    uint64_t outer, inner;
    if (slice_geom(t, s, &outer, &inner, err) != 0) return -1;
    unsigned char *o = dst;
    uint64_t row = inner * (uint64_t)t->shape[s->dim];
    for (uint64_t i = 0; i < outer; i++)
        for (int k = 0; k < s->nseg; k++) {
            uint64_t n = inner * (uint64_t)s->seg[k].len;
            if (s->seg[k].start < 0)
                memset(o, 0, n);
            else if (weights_pread(fd, o, n,
                                   t->data_offset + i * row + inner * (uint64_t)s->seg[k].start,
                                   err) != 0)
                return -1;
            o += n;
        }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* layout                                                                    */

typedef struct lpiece {
    size_t src;
    char *target;
    int64_t expert, offset;
} lpiece;

static int cmp_lpiece(const void *a, const void *b) {
    const lpiece *x = a, *y = b;
    int c = strcmp(x->target, y->target);
    if (c) return c;
    if (x->expert != y->expert) return x->expert < y->expert ? -1 : 1;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x->src < y->src ? -1 : x->src > y->src;
}

void tp_layout_free(tp_layout *l) {
    if (!l) return;
    for (size_t i = 0; i < l->ntargets; i++) {
        free(l->targets[i].name);
        free(l->targets[i].pieces);
    }
    free(l->targets);
    memset(l, 0, sizeof *l);
}

/* Piece extent along the target's fused dim for rank 0 (every rank's is the
 * same), used to check that a fused target is exactly covered. */
static int64_t piece_extent(const tp_slice *s) {
    return s->t_expert >= 0 ? (s->ndim >= 1 ? s->shape[0] : 1) : (s->ndim >= 1 ? s->shape[0] : 1);
}

/* tp_layout_build's state: the pieces found (one per kept source tensor,
 * owning its target name until the target takes it) and a slice to work in. */
typedef struct layout_ctx {
    const tp_model_cfg *cfg;
    const mp_tensor *tensors;
    size_t n;
    int tp;
    tp_naming naming;
    tp_layout *out;
    lpiece *ps;
    size_t np;
    tp_slice *sl;
    bool have_lm_head;
} layout_ctx;

/* One piece per source tensor that is kept, with its target and place. */
static int layout_collect(layout_ctx *lc, mp_error *err) {
    for (size_t i = 0; i < lc->n; i++) {
        const mp_tensor *t = &lc->tensors[i];
        tp_slice *sl = lc->sl;
        if (tp_slice_for(lc->cfg, t, lc->tp, 0, lc->naming, sl, err) != 0) return -1;
        if (sl->dropped) {
            lc->out->ndropped++;
            continue;
        }
        /* Tied checkpoints that also store lm_head: one copy is enough. */
        if (lc->naming == TP_NAMING_SGLANG && lc->have_lm_head &&
            strcmp(t->name, "model.embed_tokens.weight") == 0 &&
            strcmp(sl->target, "lm_head.weight") == 0) {
            lc->out->ndropped++;
            continue;
        }
        if (t->nbytes == 0) { /* ShardedStateLoader drops zero-element tensors */
            lc->out->ndropped++;
            continue;
        }
        lpiece *p = &lc->ps[lc->np];
        p->src = i;
        p->expert = sl->t_expert;
        p->offset = sl->t_offset;
        p->target = strdup(sl->target);
        if (!p->target) return mp_err(err, "no_memory", "out of memory");
        lc->np++;
    }
    return 0;
}

/* The pieces ps[i..j) must tile target tg exactly, in order: same dtype,
 * no gap, and their bytes adding up to the target's. */
static int layout_check_tiling(layout_ctx *lc, tp_target *tg, size_t i, size_t j, mp_error *err) {
    tp_slice *sl = lc->sl;
    const mp_tensor *t0 = &lc->tensors[lc->ps[i].src];
    uint64_t sum = 0;
    int64_t expect_e = sl->t_expert >= 0 ? 0 : -1, expect_off = 0;
    for (size_t k = i; k < j; k++) {
        const mp_tensor *t = &lc->tensors[lc->ps[k].src];
        tg->pieces[k - i] = lc->ps[k].src;
        if (t->dtype != tg->dtype)
            return mp_err(err, "unsplittable", "%s and %s fuse into %s but differ in dtype",
                          t0->name, t->name, tg->name);
        if (tp_slice_for(lc->cfg, t, lc->tp, 0, lc->naming, sl, err) != 0) return -1;
        if (sl->t_expert != expect_e || sl->t_offset != expect_off)
            return mp_err(err, "incomplete",
                          "%s: a piece is missing before %s (expert %lld, "
                          "offset %lld)",
                          tg->name, t->name, (long long)expect_e, (long long)expect_off);
        expect_off += piece_extent(sl);
        int64_t full = sl->t_expert >= 0 ? (sl->tndim >= 2 ? sl->tshape[1] : 1)
                                         : (sl->tndim >= 1 ? sl->tshape[0] : 1);
        if (expect_off == full && expect_e >= 0) {
            expect_e++;
            expect_off = 0;
        }
        sum += sl->bytes;
    }
    if (sum != tg->bytes)
        return mp_err(err, "incomplete",
                      "%s: its pieces (%zu of them) do not fill it — is q, k, "
                      "v, gate, up or an expert missing?",
                      tg->name, j - i);
    return 0;
}

/* The target of the (sorted) pieces ps[i..j), which share its name: its
 * shape from the first piece, checked to be tiled by them all. */
static int layout_add_target(layout_ctx *lc, size_t i, size_t j, mp_error *err) {
    tp_layout *out = lc->out;
    tp_target *tg = &out->targets[out->ntargets++];
    tg->name = lc->ps[i].target;
    lc->ps[i].target = NULL;
    tg->pieces = malloc((j - i) * sizeof *tg->pieces);
    if (!tg->pieces) return mp_err(err, "no_memory", "out of memory");
    tg->npieces = j - i;
    const mp_tensor *t0 = &lc->tensors[lc->ps[i].src];
    tg->dtype = t0->dtype;
    if (tp_slice_for(lc->cfg, t0, lc->tp, 0, lc->naming, lc->sl, err) != 0) return -1;
    tg->ndim = lc->sl->tndim;
    memcpy(tg->shape, lc->sl->tshape, sizeof tg->shape);
    if (!mp_tensor_bytes(tg->dtype, tg->shape, tg->ndim, &tg->bytes))
        return mp_err(err, "unsplittable", "%s: bad target shape", tg->name);
    if (layout_check_tiling(lc, tg, i, j, err) != 0) return -1;
    uint64_t nb;
    if (__builtin_add_overflow(out->rank_bytes, tg->bytes, &nb))
        return mp_err(err, "too_large", "model size overflows");
    out->rank_bytes = nb;
    return 0;
}

/* The pieces by target, then one target per run of equal names. */
static int layout_group(layout_ctx *lc, mp_error *err) {
    qsort(lc->ps, lc->np, sizeof *lc->ps, cmp_lpiece);
    lc->out->targets = calloc(lc->np ? lc->np : 1, sizeof *lc->out->targets);
    if (!lc->out->targets) return mp_err(err, "no_memory", "out of memory");
    for (size_t i = 0; i < lc->np;) {
        size_t j = i;
        while (j < lc->np && strcmp(lc->ps[j].target, lc->ps[i].target) == 0)
            j++;
        if (layout_add_target(lc, i, j, err) != 0) return -1;
        i = j;
    }
    return 0;
}

int tp_layout_build(const tp_model_cfg *cfg, const mp_tensor *tensors, size_t n, int tp,
                    tp_naming naming, tp_layout *out, mp_error *err) {
    memset(out, 0, sizeof *out);
    out->tp = tp;
    out->naming = naming;
    if (tp_check(cfg, tp, err) != 0) return -1;
    layout_ctx lc = {
        .cfg = cfg, .tensors = tensors, .n = n, .tp = tp, .naming = naming, .out = out};
    lc.ps = calloc(n ? n : 1, sizeof *lc.ps);
    lc.sl = malloc(sizeof *lc.sl);
    if (!lc.ps || !lc.sl) {
        free(lc.ps);
        free(lc.sl);
        return mp_err(err, "no_memory", "out of memory");
    }
    int rc = -1;
    for (size_t i = 0; i < n; i++)
        if (strcmp(tensors[i].name, "lm_head.weight") == 0) lc.have_lm_head = true;
    if (layout_collect(&lc, err) != 0) goto out;
    if (naming == TP_NAMING_SGLANG && family_is_moe(cfg->family) && !lc.have_lm_head) {
        mp_err(err, "incomplete",
               "lm_head.weight is missing: SGLang's %s holds its own lm_head "
               "even when tie_word_embeddings is set",
               cfg->architecture);
        goto out;
    }
    if (layout_group(&lc, err) != 0) goto out;
    rc = 0;
out:
    for (size_t i = 0; i < lc.np; i++)
        free(lc.ps[i].target);
    free(lc.ps);
    free(lc.sl);
    if (rc != 0) tp_layout_free(out);
    return rc;
}

int tp_rank_bytes(const tp_model_cfg *cfg, const mp_tensor *tensors, size_t n, int tp, int rank,
                  uint64_t *bytes, mp_error *err) {
    *bytes = 0;
    if (tp_check(cfg, tp, err) != 0) return -1;
    if (rank < 0 || rank >= tp)
        return mp_err(err, "bad_tp_size", "rank %d outside tp_size %d", rank, tp);
    /* Every rank holds the same shapes; the layout gives the exact figure
     * (padding, replication and tied-weight dedup included). */
    tp_layout l;
    if (tp_layout_build(cfg, tensors, n, tp, TP_NAMING_SGLANG, &l, err) != 0) return -1;
    *bytes = l.rank_bytes;
    tp_layout_free(&l);
    return 0;
}

int tp_max_rank_bytes(const tp_model_cfg *cfg, const mp_tensor *tensors, size_t n, int tp,
                      uint64_t *bytes, mp_error *err) {
    return tp_rank_bytes(cfg, tensors, n, tp, 0, bytes, err);
}
