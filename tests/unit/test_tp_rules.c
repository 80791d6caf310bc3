/*
 * test_tp_rules.c - the tensor-parallel rule table and slice arithmetic:
 * rule lookup per architecture, KV-head replication rank mapping, vocab
 * padding, fp8 block-scale splits, divisibility errors, SGLang target names
 * and the whole-model layout (fused targets, tied embeddings, per-rank bytes).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/tp_rules/tp_rules.h"

static void cfg_from(const char *json, tp_model_cfg *cfg) {
    json_error_t je;
    json_t *j = json_loads(json, 0, &je);
    assert_non_null(j);
    mp_error err = {0};
    assert_int_equal(tp_config_from_json(j, cfg, &err), 0);
    json_decref(j);
}

/* llama-3-8b shaped: 32 heads, 8 KV heads, head_dim 128, vocab 128256. */
static const char *LLAMA =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\",\"hidden_size\":4096,"
    "\"num_attention_heads\":32,\"num_key_value_heads\":8,\"intermediate_size\":14336,"
    "\"vocab_size\":128256,\"num_hidden_layers\":32,\"tie_word_embeddings\":false}";

static mp_tensor mk(const char *name, mp_dtype dt, int ndim, int64_t d0, int64_t d1) {
    mp_tensor t;
    memset(&t, 0, sizeof t);
    t.name = (char *)name;
    t.dtype = dt;
    t.ndim = ndim;
    t.shape[0] = d0;
    t.shape[1] = d1;
    mp_tensor_bytes(dt, t.shape, ndim, &t.nbytes);
    t.data_bytes = t.nbytes;
    mp_tensor_set_contiguous(&t);
    return t;
}

static void test_config(void **state) {
    (void)state;
    tp_model_cfg c;
    cfg_from(LLAMA, &c);
    assert_int_equal(c.family, TP_FAM_LLAMA);
    assert_int_equal(c.head_dim, 128);
    assert_int_equal(c.num_kv_heads, 8);
    assert_false(c.tie_word_embeddings);
    /* a multimodal config: the text part decides */
    cfg_from("{\"architectures\":[\"Qwen2ForCausalLM\"],\"text_config\":{\"model_type\":\"qwen2\","
             "\"hidden_size\":64,\"num_attention_heads\":4,\"vocab_size\":10}}",
             &c);
    assert_int_equal(c.family, TP_FAM_QWEN2);
    assert_int_equal(c.num_kv_heads, 4); /* defaults to the heads */
    assert_int_equal(c.head_dim, 16);
    assert_true(c.tie_word_embeddings); /* transformers' default */
    cfg_from("{\"architectures\":[\"MixtralForCausalLM\"],\"hidden_size\":64,"
             "\"num_attention_heads\":4,\"num_local_experts\":8,\"intermediate_size\":96,"
             "\"quantization_config\":{\"quant_method\":\"fp8\",\"weight_block_size\":[128,64]}}",
             &c);
    assert_int_equal(c.family, TP_FAM_MIXTRAL);
    assert_int_equal(c.num_experts, 8);
    assert_int_equal(c.moe_intermediate_size, 96);
    assert_int_equal(c.block_n, 128);
    assert_int_equal(c.block_k, 64);
    cfg_from("{\"architectures\":[\"FalconForCausalLM\"],\"num_attention_heads\":4}", &c);
    assert_int_equal(c.family, TP_FAM_UNKNOWN);
    mp_error err = {0};
    assert_int_equal(tp_check(&c, 2, &err), -1);
    assert_string_equal(err.code, "unsupported_architecture");
    assert_non_null(strstr(err.message, "FalconForCausalLM"));
}

static void test_lookup(void **state) {
    (void)state;
    tp_model_cfg c;
    cfg_from(LLAMA, &c);
    const tp_rule *r = tp_rule_for(&c, "model.layers.17.self_attn.k_proj.weight");
    assert_non_null(r);
    assert_int_equal(r->kind, TP_QKV);
    assert_int_equal(r->part, TP_PART_K);
    assert_int_equal(tp_rule_for(&c, "model.layers.0.mlp.down_proj.weight")->kind, TP_ROW);
    assert_int_equal(tp_rule_for(&c, "model.layers.0.mlp.up_proj.weight")->part, TP_PART_UP);
    assert_int_equal(tp_rule_for(&c, "model.embed_tokens.weight")->kind, TP_VOCAB);
    assert_int_equal(tp_rule_for(&c, "lm_head.weight")->kind, TP_VOCAB);
    assert_int_equal(tp_rule_for(&c, "model.norm.weight")->kind, TP_REPLICATED);
    assert_int_equal(tp_rule_for(&c, "model.layers.3.self_attn.rotary_emb.inv_freq")->kind,
                     TP_DROP);
    assert_null(tp_rule_for(&c, "model.layers.x.self_attn.q_proj.weight")); /* '#' = digits */
    assert_null(tp_rule_for(&c, "model.layers.1.self_attn.q_proj"));        /* no param */
    assert_null(tp_rule_for(&c, "model.layers.1.mlp.experts.0.w1.weight"));
    assert_null(tp_rule_for(&c, "weight"));

    cfg_from("{\"architectures\":[\"MixtralForCausalLM\"],\"hidden_size\":64,"
             "\"num_attention_heads\":4,\"num_local_experts\":8,\"intermediate_size\":96}",
             &c);
    r = tp_rule_for(&c, "model.layers.2.block_sparse_moe.experts.7.w3.weight");
    assert_non_null(r);
    assert_int_equal(r->kind, TP_EXPERT);
    assert_int_equal(r->part, TP_PART_UP);
    assert_int_equal(tp_rule_for(&c, "model.layers.2.block_sparse_moe.gate.weight")->kind,
                     TP_REPLICATED);
    cfg_from("{\"architectures\":[\"Qwen2MoeForCausalLM\"],\"hidden_size\":64,"
             "\"num_attention_heads\":4,\"num_experts\":8,\"moe_intermediate_size\":32,"
             "\"shared_expert_intermediate_size\":64}",
             &c);
    assert_int_equal(tp_rule_for(&c, "model.layers.0.mlp.gate.weight")->kind, TP_REPLICATED);
    assert_int_equal(tp_rule_for(&c, "model.layers.0.mlp.shared_expert.gate_proj.weight")->kind,
                     TP_COLUMN);
    assert_int_equal(tp_rule_for(&c, "model.layers.0.mlp.experts.3.down_proj.weight")->part,
                     TP_PART_DOWN);
    assert_int_equal(tp_rule_for(&c, "model.layers.0.mlp.shared_expert_gate.weight")->kind,
                     TP_REPLICATED);
}

static void test_kv_replication(void **state) {
    (void)state;
    tp_model_cfg c;
    cfg_from(LLAMA, &c);
    mp_tensor k = mk("model.layers.0.self_attn.k_proj.weight", MP_DT_BF16, 2, 8 * 128, 4096);
    mp_tensor q = mk("model.layers.0.self_attn.q_proj.weight", MP_DT_BF16, 2, 32 * 128, 4096);
    mp_error err = {0};
    tp_slice s;
    /* tp 4 <= 8 KV heads: two heads per rank */
    assert_int_equal(tp_slice_for(&c, &k, 4, 3, TP_NAMING_SGLANG, &s, &err), 0);
    assert_int_equal(s.dim, 0);
    assert_int_equal(s.seg[0].start, 6 * 128);
    assert_int_equal(s.seg[0].len, 2 * 128);
    assert_string_equal(s.target, "model.layers.0.self_attn.qkv_proj.weight");
    assert_int_equal(s.tshape[0], (8 + 2 + 2) * 128);
    assert_int_equal(s.t_offset, 8 * 128);
    /* tp 32 > 8: each rank one head, head r / 4 */
    for (int r = 0; r < 32; r++) {
        assert_int_equal(tp_slice_for(&c, &k, 32, r, TP_NAMING_SGLANG, &s, &err), 0);
        assert_int_equal(s.seg[0].start, (r / 4) * 128);
        assert_int_equal(s.seg[0].len, 128);
        assert_int_equal(s.tshape[0], 3 * 128);
        assert_int_equal(s.t_offset, 128);
    }
    mp_tensor v = mk("model.layers.0.self_attn.v_proj.weight", MP_DT_BF16, 2, 8 * 128, 4096);
    assert_int_equal(tp_slice_for(&c, &v, 16, 5, TP_NAMING_SGLANG, &s, &err), 0);
    assert_int_equal(s.seg[0].start, 2 * 128);
    assert_int_equal(s.t_offset, 2 * 128 + 128);
    assert_int_equal(tp_slice_for(&c, &q, 16, 5, TP_NAMING_HF, &s, &err), 0);
    assert_int_equal(s.seg[0].start, 5 * 2 * 128);
    assert_string_equal(s.target, "model.layers.0.self_attn.q_proj.weight");
    assert_int_equal(s.bytes, 2 * 128 * 4096 * 2);
}

static void test_vocab_padding(void **state) {
    (void)state;
    tp_model_cfg c;
    cfg_from(LLAMA, &c);
    /* 128256 is a multiple of 64 already: no padding at tp 8 */
    mp_tensor e = mk("model.embed_tokens.weight", MP_DT_BF16, 2, 128256, 4096);
    tp_slice s;
    mp_error err = {0};
    assert_int_equal(tp_slice_for(&c, &e, 8, 7, TP_NAMING_SGLANG, &s, &err), 0);
    assert_int_equal(s.nseg, 1);
    assert_int_equal(s.seg[0].start, 7 * 16032);
    c.vocab_size = 1000; /* 1000 -> 1024 padded; at tp 8 128 rows per rank */
    mp_tensor e2 = mk("lm_head.weight", MP_DT_F32, 2, 1000, 16);
    assert_int_equal(tp_slice_for(&c, &e2, 8, 7, TP_NAMING_SGLANG, &s, &err), 0);
    assert_int_equal(s.nseg, 2);
    assert_int_equal(s.seg[0].start, 896);
    assert_int_equal(s.seg[0].len, 104);
    assert_true(s.seg[1].start < 0);
    assert_int_equal(s.seg[1].len, 24);
    assert_int_equal(s.shape[0], 128);
    assert_int_equal(s.bytes, 128 * 16 * 4);
    /* tp 1 pads too: SGLang's parameter is 1024 rows */
    assert_int_equal(tp_slice_for(&c, &e2, 1, 0, TP_NAMING_SGLANG, &s, &err), 0);
    assert_int_equal(s.shape[0], 1024);
    /* gather: rows copied, padding zero */
    float *full = malloc(1000 * 16 * sizeof *full), *dst = malloc(128 * 16 * sizeof *dst);
    for (int i = 0; i < 1000 * 16; i++)
        full[i] = (float)i + 1;
    assert_int_equal(tp_slice_for(&c, &e2, 8, 7, TP_NAMING_SGLANG, &s, &err), 0);
    assert_int_equal(tp_slice_gather(&e2, &s, full, dst, &err), 0);
    assert_true(dst[0] == (float)(896 * 16 + 1));
    assert_true(dst[104 * 16 - 1] == (float)(1000 * 16));
    for (int i = 104 * 16; i < 128 * 16; i++)
        assert_true(dst[i] == 0.0f);
    free(full);
    free(dst);
}

static void test_row_and_gather(void **state) {
    (void)state;
    tp_model_cfg c;
    cfg_from("{\"architectures\":[\"Qwen2ForCausalLM\"],\"hidden_size\":8,"
             "\"num_attention_heads\":2,\"num_key_value_heads\":1,\"intermediate_size\":6,"
             "\"vocab_size\":64}",
             &c);
    mp_tensor o = mk("model.layers.0.mlp.down_proj.weight", MP_DT_U8, 2, 8, 6);
    unsigned char full[48], dst[24];
    for (int i = 0; i < 48; i++)
        full[i] = (unsigned char)i;
    tp_slice s;
    mp_error err = {0};
    assert_int_equal(tp_slice_for(&c, &o, 2, 1, TP_NAMING_SGLANG, &s, &err), 0);
    assert_int_equal(s.dim, 1);
    assert_int_equal(s.shape[0], 8);
    assert_int_equal(s.shape[1], 3);
    assert_int_equal(tp_slice_gather(&o, &s, full, dst, &err), 0);
    for (int r = 0; r < 8; r++)
        for (int k = 0; k < 3; k++)
            assert_int_equal(dst[r * 3 + k], r * 6 + 3 + k);
    /* a row-parallel bias is whole on every rank */
    mp_tensor ob = mk("model.layers.0.self_attn.o_proj.bias", MP_DT_BF16, 1, 8, 0);
    assert_int_equal(tp_slice_for(&c, &ob, 2, 1, TP_NAMING_SGLANG, &s, &err), 0);
    assert_int_equal(s.dim, -1);
    assert_int_equal(s.kind, TP_REPLICATED);
    assert_string_equal(s.target, "model.layers.0.self_attn.o_proj.bias");
    /* a qkv bias follows its weight into the fused target */
    mp_tensor kb = mk("model.layers.0.self_attn.k_proj.bias", MP_DT_BF16, 1, 4, 0);
    assert_int_equal(tp_slice_for(&c, &kb, 2, 1, TP_NAMING_SGLANG, &s, &err), 0);
    assert_string_equal(s.target, "model.layers.0.self_attn.qkv_proj.bias");
    assert_int_equal(s.seg[0].start, 0); /* one KV head, replicated on both ranks */
    assert_int_equal(s.tshape[0], 4 + 4 + 4);
    /* gate_up: up lands after this rank's gate rows */
    mp_tensor up = mk("model.layers.0.mlp.up_proj.weight", MP_DT_BF16, 2, 6, 8);
    assert_int_equal(tp_slice_for(&c, &up, 2, 1, TP_NAMING_SGLANG, &s, &err), 0);
    assert_string_equal(s.target, "model.layers.0.mlp.gate_up_proj.weight");
    assert_int_equal(s.seg[0].start, 3);
    assert_int_equal(s.t_offset, 3);
    assert_int_equal(s.tshape[0], 6);
}

static void test_divisibility(void **state) {
    (void)state;
    tp_model_cfg c;
    cfg_from(LLAMA, &c);
    mp_error err = {0};
    assert_int_equal(tp_check(&c, 1, &err), 0);
    assert_int_equal(tp_check(&c, 8, &err), 0);
    assert_int_equal(tp_check(&c, 16, &err), 0); /* KV replicated twice */
    assert_int_equal(tp_check(&c, 32, &err), 0);
    assert_int_equal(tp_check(&c, 0, &err), -1);
    assert_string_equal(err.code, "bad_tp_size");
    assert_int_equal(tp_check(&c, 3, &err), -1);
    assert_non_null(strstr(err.message, "num_attention_heads"));
    assert_int_equal(tp_check(&c, 64, &err), -1);
    /* 12 heads, 8 KV heads, tp 12 would divide heads but not the KV heads */
    c.num_heads = 24;
    assert_int_equal(tp_check(&c, 12, &err), -1);
    assert_non_null(strstr(err.message, "num_key_value_heads"));
    cfg_from(LLAMA, &c);
    c.intermediate_size = 14337;
    assert_int_equal(tp_check(&c, 2, &err), -1);
    assert_non_null(strstr(err.message, "intermediate_size"));
    /* vocab 150 pads to 192, which tp 128 does not divide (the rest does) */
    cfg_from(LLAMA, &c);
    c.num_heads = 256;
    c.num_kv_heads = 256;
    c.intermediate_size = 256 * 4;
    c.vocab_size = 150;
    assert_int_equal(tp_check(&c, 64, &err), 0);
    assert_int_equal(tp_check(&c, 128, &err), -1);
    assert_non_null(strstr(err.message, "padded vocabulary"));
    /* MoE: no more ranks than experts */
    cfg_from("{\"architectures\":[\"Qwen3MoeForCausalLM\"],\"hidden_size\":64,"
             "\"num_attention_heads\":16,\"num_key_value_heads\":4,\"num_experts\":8,"
             "\"moe_intermediate_size\":64,\"vocab_size\":64}",
             &c);
    assert_int_equal(tp_check(&c, 8, &err), 0);
    assert_int_equal(tp_check(&c, 16, &err), -1);
    assert_non_null(strstr(err.message, "experts"));
    /* fp8 blocks: a per-rank slice must be whole blocks */
    cfg_from("{\"architectures\":[\"Qwen3ForCausalLM\"],\"hidden_size\":256,"
             "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"head_dim\":128,"
             "\"intermediate_size\":512,\"vocab_size\":300,\"quantization_config\":{"
             "\"quant_method\":\"fp8\",\"weight_block_size\":[128,128]}}",
             &c);
    assert_int_equal(tp_check(&c, 4, &err), 0);
    tp_model_cfg c2 = c;
    c2.head_dim = 64; /* a rank's one KV head is 64 rows: half a block */
    assert_int_equal(tp_check(&c2, 2, &err), -1);
    assert_non_null(strstr(err.message, "fp8 block"));
    /* an unsplittable tensor names itself */
    mp_tensor odd = mk("model.layers.0.self_attn.mystery.weight", MP_DT_BF16, 2, 4, 4);
    tp_slice s;
    assert_int_equal(tp_slice_for(&c, &odd, 2, 0, TP_NAMING_SGLANG, &s, &err), -1);
    assert_string_equal(err.code, "unsplittable");
    assert_non_null(strstr(err.message, "model.layers.0.self_attn.mystery.weight"));
    /* fp8 scales split in block units */
    mp_tensor sc = mk("model.layers.0.mlp.down_proj.weight_scale_inv", MP_DT_F32, 2, 2, 4);
    assert_int_equal(tp_slice_for(&c, &sc, 4, 3, TP_NAMING_SGLANG, &s, &err), 0);
    assert_int_equal(s.dim, 1);
    assert_int_equal(s.seg[0].start, 3);
    assert_int_equal(s.seg[0].len, 1);
    mp_tensor ks = mk("model.layers.0.self_attn.k_proj.weight_scale_inv", MP_DT_F32, 2, 2, 2);
    assert_int_equal(tp_slice_for(&c, &ks, 4, 3, TP_NAMING_SGLANG, &s, &err), 0);
    assert_int_equal(s.seg[0].start, 1); /* KV head 3 / 2 */
    assert_int_equal(s.tshape[0], 1 + 1 + 1);
    assert_string_equal(s.target, "model.layers.0.self_attn.qkv_proj.weight_scale_inv");
    /* other quantized parameters cannot be split */
    mp_tensor gq = mk("model.layers.0.mlp.down_proj.qweight", MP_DT_I32, 2, 4, 4);
    assert_int_equal(tp_slice_for(&c, &gq, 2, 0, TP_NAMING_SGLANG, &s, &err), -1);
    assert_string_equal(err.code, "unsupported_quantization");
}

/* A whole tiny llama: fused targets, tied embedding, every rank's bytes. */
static void test_layout(void **state) {
    (void)state;
    tp_model_cfg c;
    cfg_from("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":16,"
             "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"intermediate_size\":32,"
             "\"vocab_size\":100,\"num_hidden_layers\":1,\"tie_word_embeddings\":true}",
             &c);
    mp_tensor ts[] = {
        mk("model.embed_tokens.weight", MP_DT_BF16, 2, 100, 16),
        mk("model.norm.weight", MP_DT_F32, 1, 16, 0),
        mk("model.layers.0.input_layernorm.weight", MP_DT_F32, 1, 16, 0),
        mk("model.layers.0.post_attention_layernorm.weight", MP_DT_F32, 1, 16, 0),
        mk("model.layers.0.self_attn.q_proj.weight", MP_DT_BF16, 2, 16, 16),
        mk("model.layers.0.self_attn.k_proj.weight", MP_DT_BF16, 2, 8, 16),
        mk("model.layers.0.self_attn.v_proj.weight", MP_DT_BF16, 2, 8, 16),
        mk("model.layers.0.self_attn.o_proj.weight", MP_DT_BF16, 2, 16, 16),
        mk("model.layers.0.mlp.gate_proj.weight", MP_DT_BF16, 2, 32, 16),
        mk("model.layers.0.mlp.up_proj.weight", MP_DT_BF16, 2, 32, 16),
        mk("model.layers.0.mlp.down_proj.weight", MP_DT_BF16, 2, 16, 32),
        mk("model.layers.0.self_attn.rotary_emb.inv_freq", MP_DT_F32, 1, 2, 0),
    };
    size_t n = sizeof ts / sizeof *ts;
    tp_layout l;
    mp_error err = {0};
    assert_int_equal(tp_layout_build(&c, ts, n, 4, TP_NAMING_SGLANG, &l, &err), 0);
    const char *want[] = {"lm_head.weight",
                          "model.layers.0.input_layernorm.weight",
                          "model.layers.0.mlp.down_proj.weight",
                          "model.layers.0.mlp.gate_up_proj.weight",
                          "model.layers.0.post_attention_layernorm.weight",
                          "model.layers.0.self_attn.o_proj.weight",
                          "model.layers.0.self_attn.qkv_proj.weight",
                          "model.norm.weight"};
    assert_int_equal(l.ntargets, 8);
    for (size_t i = 0; i < 8; i++)
        assert_string_equal(l.targets[i].name, want[i]);
    assert_int_equal(l.ndropped, 1);
    /* lm_head: 128 padded rows / 4 = 32 */
    assert_int_equal(l.targets[0].shape[0], 32);
    /* qkv at tp 4 with 2 KV heads: 1 q head + 1 k + 1 v (head_dim 4) */
    assert_int_equal(l.targets[6].shape[0], 12);
    assert_int_equal(l.targets[6].npieces, 3);
    assert_string_equal(ts[l.targets[6].pieces[0]].name, "model.layers.0.self_attn.q_proj.weight");
    assert_string_equal(ts[l.targets[6].pieces[2]].name, "model.layers.0.self_attn.v_proj.weight");
    assert_int_equal(l.targets[3].shape[0], 16);
    uint64_t want_bytes =
        32 * 16 * 2 + 3 * 16 * 4 + 16 * 8 * 2 + 16 * 16 * 2 + 16 * 4 * 2 + 12 * 16 * 2;
    assert_int_equal(l.rank_bytes, want_bytes);
    tp_layout_free(&l);
    uint64_t b = 0;
    assert_int_equal(tp_max_rank_bytes(&c, ts, n, 4, &b, &err), 0);
    assert_int_equal(b, want_bytes);
    /* hf naming keeps the checkpoint names */
    assert_int_equal(tp_layout_build(&c, ts, n, 2, TP_NAMING_HF, &l, &err), 0);
    assert_int_equal(l.ntargets, n - 1);
    tp_layout_free(&l);
    /* a missing v_proj leaves qkv_proj short */
    ts[6].name = (char *)"model.layers.0.self_attn.v_proj.weightx";
    assert_int_equal(tp_layout_build(&c, ts, n - 1, 2, TP_NAMING_SGLANG, &l, &err), -1);
    ts[6] = ts[n - 1];
    assert_int_equal(tp_layout_build(&c, ts, n - 1, 2, TP_NAMING_SGLANG, &l, &err), -1);
    assert_string_equal(err.code, "incomplete");
    assert_non_null(strstr(err.message, "qkv_proj"));
    assert_int_equal(tp_max_rank_bytes(&c, ts, n, 3, &b, &err), -1);
    assert_string_equal(err.code, "bad_tp_size");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config),         cmocka_unit_test(test_lookup),
        cmocka_unit_test(test_kv_replication), cmocka_unit_test(test_vocab_padding),
        cmocka_unit_test(test_row_and_gather), cmocka_unit_test(test_divisibility),
        cmocka_unit_test(test_layout),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
