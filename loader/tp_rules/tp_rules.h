/*
 * tp_rules.h - tensor-parallel split rules (tp_ prefix): which checkpoint
 * tensor is split how across tp ranks, as SGLang's model classes do it. ONE
 * module serves the shard job (per-rank files), inspect (per-rank bytes) and
 * warm_load (per-rank GPU placement).
 *
 * The rules are data (a table of name patterns per architecture family in
 * tp_rules.c), not code paths. Kinds:
 *   column     split dim 0 evenly (ColumnParallelLinear); bias follows.
 *   qkv        column split by heads: q heads / tp; k and v heads / tp, or,
 *              when tp > num_key_value_heads, one KV head per rank replicated
 *              tp / kv times (rank r takes KV head r / (tp / kv)).
 *   row        split dim 1 (RowParallelLinear); its bias is replicated.
 *   vocab      dim 0 padded to a multiple of 64 (VocabParallelEmbedding /
 *              ParallelLMHead), then split; padding rows are zero.
 *   expert     a per-expert MoE weight (FusedMoE): gate/up split dim 0,
 *              down split dim 1, stacked under SGLang's w13_/w2_ names.
 *   replicated everything else the table names (norms, routers).
 * FP8 block scales (<m>.weight_scale_inv, weight_block_size from
 * quantization_config) split with their weight in units of the block.
 *
 * Naming: TP_NAMING_HF keeps each tensor under its checkpoint name;
 * TP_NAMING_SGLANG gives the name and layout SGLang's model class holds after
 * loading (q/k/v fused into qkv_proj, gate/up into gate_up_proj, experts
 * stacked into experts.w13_weight / experts.w2_weight, tied embeddings kept
 * once under the key ShardedStateLoader keeps). Under both namings a rank's
 * piece of a source tensor is the same bytes; only where it goes differs.
 */
#ifndef MP_LOADER_TP_RULES_H
#define MP_LOADER_TP_RULES_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/tensor/tensor.h"
#include "util/error.h"

#define TP_VOCAB_PAD 64 /* SGLang's DEFAULT_VOCAB_PADDING_SIZE */
#define TP_MAX_SEGS 4
#define TP_NAME_MAX 512

typedef enum tp_family {
    TP_FAM_UNKNOWN = 0,
    TP_FAM_LLAMA,     /* LlamaForCausalLM, MistralForCausalLM */
    TP_FAM_QWEN2,     /* Qwen2ForCausalLM (qkv bias) */
    TP_FAM_QWEN3,     /* Qwen3ForCausalLM (q_norm/k_norm) */
    TP_FAM_GEMMA,     /* GemmaForCausalLM, Gemma2ForCausalLM (no lm_head) */
    TP_FAM_MIXTRAL,   /* MixtralForCausalLM */
    TP_FAM_QWEN2_MOE, /* Qwen2MoeForCausalLM (shared expert) */
    TP_FAM_QWEN3_MOE, /* Qwen3MoeForCausalLM */
} tp_family;

/* What config.json says (text_config of a multimodal config when present). */
typedef struct tp_model_cfg {
    char model_type[64];
    char architecture[128]; /* architectures[0] */
    tp_family family;       /* TP_FAM_UNKNOWN: no rules (tp_check fails) */
    int64_t num_layers;
    int64_t num_heads;    /* num_attention_heads */
    int64_t num_kv_heads; /* num_key_value_heads, default num_heads */
    int64_t head_dim;     /* head_dim, default hidden_size / num_heads */
    int64_t hidden_size;
    int64_t intermediate_size;
    int64_t moe_intermediate_size;           /* per expert (mixtral: intermediate_size) */
    int64_t shared_expert_intermediate_size; /* qwen2_moe, else 0 */
    int64_t vocab_size;
    int64_t num_experts; /* num_experts / num_local_experts, 0 = dense */
    bool tie_word_embeddings;
    /* quantization_config.weight_block_size for fp8 block quantization;
     * 0 when the checkpoint is not block-quantized. */
    int64_t block_n, block_k;
    char quant_method[32]; /* "" when unquantized */
} tp_model_cfg;

/* Reads <model_dir>/config.json. Errors: "not_found", "bad_config". An
 * unknown architecture is NOT an error here (family = TP_FAM_UNKNOWN) so
 * that inspect can still report the rest; tp_check then says why. */
int tp_config_load(const char *model_dir, tp_model_cfg *cfg, mp_error *err);
/* Same from an already-parsed config.json object (borrowed). */
int tp_config_from_json(const json_t *config, tp_model_cfg *cfg, mp_error *err);

/* Can the model be split tp ways? Checks tp >= 1, a known family, heads,
 * KV heads (kv % tp == 0 or tp % kv == 0), intermediate sizes, padded vocab
 * and fp8 block alignment. Errors: "bad_tp_size" (message says which number
 * does not divide), "unsupported_architecture". */
int tp_check(const tp_model_cfg *cfg, int tp, mp_error *err);

typedef enum tp_kind {
    TP_REPLICATED = 0,
    TP_COLUMN,
    TP_QKV,
    TP_ROW,
    TP_VOCAB,
    TP_EXPERT,
    TP_DROP, /* not kept (rotary inv_freq; gemma's lm_head under sglang naming) */
} tp_kind;

typedef enum tp_part {
    TP_PART_NONE = 0,
    TP_PART_Q,
    TP_PART_K,
    TP_PART_V,
    TP_PART_GATE, /* gate_proj / w1: first half of gate_up / w13 */
    TP_PART_UP,   /* up_proj / w3: second half */
    TP_PART_DOWN, /* down_proj / w2 of an expert */
} tp_part;

/* One row of the rule table. Patterns match the module path (the tensor
 * name without its last component: weight, bias, weight_scale_inv); '#'
 * matches a decimal number, everything else literally. `target` is the
 * SGLang module path with the same '#'s filled in order (an expert rule's
 * expert number is the capture at expert_capture and is not substituted); a
 * target ending in '_' is joined to the parameter without a dot
 * ("experts.w13_" + "weight"). NULL target: same as the source. */
typedef struct tp_rule {
    const char *pattern;
    tp_kind kind;
    tp_part part;
    const char *target;
    int expert_capture; /* -1: none */
} tp_rule;

/* The rule for a tensor name, or NULL when the family's table has none (the
 * caller treats that as unsplittable, naming the tensor). */
const tp_rule *tp_rule_for(const tp_model_cfg *cfg, const char *tensor_name);
const char *tp_kind_name(tp_kind k);

typedef enum tp_naming { TP_NAMING_SGLANG = 0, TP_NAMING_HF } tp_naming;

/* A rank's piece of one source tensor. Along `dim` the piece is the
 * concatenation of segments [start, start + len) of the source (start < 0:
 * len zero rows, i.e. vocab padding); dim < 0 (nseg 0): the whole tensor. The
 * segment layout is the same as load_slice in loader/load.h. */
typedef struct tp_slice {
    const tp_rule *rule; /* borrowed from the table, NULL for TP_REPLICATED fallbacks */
    tp_kind kind;
    int dim;
    int nseg;
    struct {
        int64_t start, len;
    } seg[TP_MAX_SEGS];
    int ndim;
    int64_t shape[MP_MAX_DIMS]; /* the piece's shape */
    uint64_t bytes;             /* the piece's bytes (contiguous) */
    /* Where the piece goes under the naming asked for: target tensor name,
     * its full per-rank shape, and the piece's place in it: expert index in
     * a stacked tensor's dim 0 (-1 none), then offset along the fused dim
     * (dim 0 of the per-expert / plain tensor). Pieces of one target are
     * byte-concatenated in (expert, offset) order. */
    char target[TP_NAME_MAX];
    int tndim;
    int64_t tshape[MP_MAX_DIMS];
    int64_t t_expert;
    int64_t t_offset;
    bool dropped; /* kind TP_DROP: nothing to place */
} tp_slice;

/* Rank `rank`'s piece of tensor t. Errors: "unsplittable" (no rule, a dim
 * that does not divide, an fp8 block not aligned), "unsupported_quantization"
 * (a scale layout we cannot split), "bad_tp_size". */
int tp_slice_for(const tp_model_cfg *cfg, const mp_tensor *t, int tp, int rank, tp_naming naming,
                 tp_slice *out, mp_error *err);

/* Bytes rank `rank` holds for the whole model under SGLang naming (vocab
 * padding and KV replication included; a tied embedding counted once).
 * Errors as tp_check and tp_slice_for. */
int tp_rank_bytes(const tp_model_cfg *cfg, const mp_tensor *tensors, size_t n, int tp, int rank,
                  uint64_t *bytes, mp_error *err);
/* The largest rank's bytes (what inspect reports as bytes_per_rank). */
int tp_max_rank_bytes(const tp_model_cfg *cfg, const mp_tensor *tensors, size_t n, int tp,
                      uint64_t *bytes, mp_error *err);

/* Copy a rank's piece out of the full, contiguous tensor bytes `full`
 * (t->nbytes) into dst (s->bytes); padding rows are zero-filled. */
int tp_slice_gather(const mp_tensor *t, const tp_slice *s, const void *full, void *dst,
                    mp_error *err);
/* The same, reading only the needed ranges of t from fd by pread (t must be
 * contiguous: !is_view and data_bytes == nbytes). */
int tp_slice_pread(int fd, const mp_tensor *t, const tp_slice *s, void *dst, mp_error *err);

/* --- a whole model's per-rank layout (the shard job; inspect may use it) ---
 * Targets are the same for every rank (SGLang parameters have one shape on
 * every rank); each has its pieces, source tensor indexes, in layout order.
 * A rank's target bytes = its slices of the pieces, concatenated. */
typedef struct tp_target {
    char *name;
    mp_dtype dtype;
    int ndim;
    int64_t shape[MP_MAX_DIMS];
    uint64_t bytes;
    size_t *pieces; /* indexes into the tensors array, in byte order */
    size_t npieces;
} tp_target;

typedef struct tp_layout {
    tp_target *targets; /* sorted by name */
    size_t ntargets;
    int tp;
    tp_naming naming;
    uint64_t rank_bytes; /* every rank's total */
    size_t ndropped;     /* sources not kept (see TP_DROP) */
} tp_layout;

/* Errors as tp_check / tp_slice_for, plus "incomplete" (a fused target
 * missing a piece, e.g. q_proj without v_proj, or an expert missing). */
int tp_layout_build(const tp_model_cfg *cfg, const mp_tensor *tensors, size_t n, int tp,
                    tp_naming naming, tp_layout *out, mp_error *err);
void tp_layout_free(tp_layout *l);

#endif
