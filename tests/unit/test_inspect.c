/*
 * test_inspect.c - the pure parts of inspect: each method's declared config
 * read into the one quantization shape, recognition from tensor names and
 * dtypes alone (§5.5), refinement (bnb pre-quantized, KV scale tensors) and
 * the KV-cache scales file check of SGLang's QuantParamSchema.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/inspect/inspect.h"

static json_t *parse(const char *s) {
    json_error_t e;
    json_t *j = json_loads(s, 0, &e);
    if (!j) fprintf(stderr, "bad test json: %s\n", e.text);
    assert_non_null(j);
    return j;
}

static const char *sget(const json_t *q, const char *k) {
    return json_string_value(json_object_get(q, k));
}

static json_int_t iget(const json_t *q, const char *k) {
    json_t *v = json_object_get(q, k);
    assert_true(json_is_integer(v));
    return json_integer_value(v);
}

static json_t *from(const char *cfg, const char *file, json_t *warnings) {
    json_t *c = parse(cfg);
    json_t *q = insp_quant_from_config(c, file, warnings);
    json_decref(c);
    assert_non_null(q);
    return q;
}

static void test_declared(void **state) {
    (void)state;
    json_t *w = json_array();
    json_t *q = from("{\"quant_method\":\"fp8\",\"activation_scheme\":\"static\","
                     "\"weight_block_size\":[128,128],\"modules_to_not_convert\":[\"lm_head\"]}",
                     "config.json", w);
    assert_string_equal(sget(q, "method"), "fp8");
    assert_int_equal(iget(q, "bits"), 8);
    assert_string_equal(sget(q, "activation_scheme"), "static");
    assert_int_equal(json_integer_value(json_array_get(json_object_get(q, "weight_block_size"), 1)),
                     128);
    assert_string_equal(json_string_value(json_array_get(json_object_get(q, "ignored_layers"), 0)),
                        "lm_head");
    assert_string_equal(sget(q, "source"), "config.json");
    json_decref(q);

    q = from("{\"bits\":8,\"group_size\":-1,\"desc_act\":true,\"sym\":true}",
             "quantize_config.json", w);
    assert_string_equal(sget(q, "method"), "gptq");
    assert_int_equal(iget(q, "group_size"), -1);
    assert_true(json_is_true(json_object_get(q, "desc_act")));
    assert_string_equal(sget(q, "runtime_method"), "gptq_marlin");
    json_decref(q);

    q = from("{\"w_bit\":4,\"q_group_size\":64,\"zero_point\":true,\"version\":\"GEMM\"}",
             "quant_config.json", w);
    assert_string_equal(sget(q, "method"), "awq");
    assert_int_equal(iget(q, "bits"), 4);
    assert_int_equal(iget(q, "group_size"), 64);
    assert_string_equal(sget(q, "runtime_method"), "awq_marlin");
    json_decref(q);

    q = from("{\"quant_method\":\"awq\",\"bits\":4,\"group_size\":256}", "config.json", w);
    assert_false(json_is_true(json_object_get(q, "marlin_compatible")));
    assert_string_equal(sget(q, "runtime_method"), "awq");
    json_decref(q);

    q = from("{\"quant_method\":\"bitsandbytes\",\"_load_in_4bit\":true,"
             "\"bnb_4bit_quant_type\":\"fp4\"}",
             "config.json", w);
    assert_string_equal(sget(q, "method"), "bitsandbytes");
    assert_int_equal(iget(q, "bits"), 4);
    assert_string_equal(sget(q, "quant_type"), "fp4");
    json_decref(q);

    q = from("{\"quant_method\":\"bitsandbytes\",\"load_in_8bit\":true}", "config.json", w);
    assert_int_equal(iget(q, "bits"), 8);
    json_decref(q);

    q = from("{\"quant_method\":\"compressed-tensors\",\"format\":\"float-quantized\","
             "\"config_groups\":{\"g\":{\"weights\":{\"num_bits\":8,\"type\":\"float\","
             "\"strategy\":\"block\",\"block_structure\":[128,128]},"
             "\"input_activations\":{\"num_bits\":8,\"dynamic\":true}}},"
             "\"ignore\":[\"lm_head\"]}",
             "config.json", w);
    assert_string_equal(sget(q, "method"), "compressed-tensors");
    assert_int_equal(iget(q, "bits"), 8);
    assert_string_equal(sget(q, "activation_scheme"), "dynamic");
    assert_true(json_is_array(json_object_get(q, "weight_block_size")));
    json_decref(q);

    q = from(
        "{\"producer\":{\"name\":\"modelopt\"},\"quantization\":{\"quant_algo\":\"nvfp4\","
        "\"kv_cache_quant_algo\":\"FP8\",\"group_size\":16,\"exclude_modules\":[\"lm_head\"]}}",
        "hf_quant_config.json", w);
    assert_string_equal(sget(q, "method"), "modelopt_fp4");
    assert_string_equal(sget(q, "quant_algo"), "NVFP4");
    assert_int_equal(iget(q, "group_size"), 16);
    assert_string_equal(sget(json_object_get(q, "kv_cache"), "dtype"), "fp8");
    json_decref(q);

    q = from("{\"quant_method\":\"modelopt\",\"quant_algo\":\"FP8\",\"ignore\":[\"x\"]}",
             "config.json", w);
    assert_string_equal(sget(q, "method"), "modelopt");
    assert_int_equal(iget(q, "bits"), 8);
    json_decref(q);

    size_t before = json_array_size(w);
    q = from("{\"quant_method\":\"hqq\",\"bits\":2}", "config.json", w);
    assert_string_equal(sget(q, "method"), "hqq");
    assert_int_equal(iget(q, "bits"), 2);
    assert_true(json_array_size(w) == before + 1);
    json_decref(q);
    /* producer not modelopt: SGLang refuses, we warn */
    before = json_array_size(w);
    q = from("{\"producer\":{\"name\":\"other\"},\"quantization\":{\"quant_algo\":\"FP8\"}}",
             "hf_quant_config.json", w);
    assert_true(json_array_size(w) == before + 1);
    json_decref(q);
    json_decref(w);
}

static mp_tensor T(const char *name, mp_dtype dt, int ndim, int64_t a, int64_t b) {
    mp_tensor t;
    memset(&t, 0, sizeof t);
    t.name = (char *)name;
    t.dtype = dt;
    t.ndim = ndim;
    t.shape[0] = a;
    t.shape[1] = b;
    t.storage_id = -1;
    return t;
}

static void test_from_tensors(void **state) {
    (void)state;
    mp_tensor none[] = {T("a.weight", MP_DT_BF16, 2, 4, 4), T("b.weight", MP_DT_F32, 1, 4, 0)};
    assert_null(insp_quant_from_tensors(none, 2));

    mp_tensor fp8[] = {T("l.weight", MP_DT_F8_E4M3, 2, 300, 1000),
                       T("l.weight_scale_inv", MP_DT_F32, 2, 3, 8)};
    json_t *q = insp_quant_from_tensors(fp8, 2);
    assert_string_equal(sget(q, "method"), "fp8");
    assert_string_equal(sget(q, "source"), "tensors");
    assert_int_equal(json_integer_value(json_array_get(json_object_get(q, "weight_block_size"), 0)),
                     100);
    assert_int_equal(json_integer_value(json_array_get(json_object_get(q, "weight_block_size"), 1)),
                     125);
    json_decref(q);

    mp_tensor pt[] = {T("l.weight", MP_DT_F8_E4M3, 2, 8, 8),
                      T("l.weight_scale", MP_DT_F32, 0, 0, 0),
                      T("l.input_scale", MP_DT_F32, 0, 0, 0)};
    q = insp_quant_from_tensors(pt, 3);
    assert_string_equal(sget(q, "method"), "fp8");
    assert_string_equal(sget(q, "activation_scheme"), "static");
    json_decref(q);

    /* gptq 4-bit g128: qweight [K/8, N], g_idx [K] */
    mp_tensor g[] = {T("m.qweight", MP_DT_I32, 2, 512, 1024), T("m.qzeros", MP_DT_I32, 2, 32, 128),
                     T("m.scales", MP_DT_F16, 2, 32, 1024), T("m.g_idx", MP_DT_I32, 1, 4096, 0)};
    q = insp_quant_from_tensors(g, 4);
    assert_string_equal(sget(q, "method"), "gptq");
    assert_int_equal(iget(q, "bits"), 4);
    assert_int_equal(iget(q, "group_size"), 128);
    json_decref(q);

    /* awq: qweight [K, N/8], no g_idx */
    mp_tensor aw[] = {T("m.qweight", MP_DT_I32, 2, 4096, 128), T("m.qzeros", MP_DT_I32, 2, 32, 128),
                      T("m.scales", MP_DT_F16, 2, 32, 1024)};
    q = insp_quant_from_tensors(aw, 3);
    assert_string_equal(sget(q, "method"), "awq");
    assert_int_equal(iget(q, "bits"), 4);
    assert_int_equal(iget(q, "group_size"), 128);
    json_decref(q);

    mp_tensor nv[] = {T("m.weight", MP_DT_U8, 2, 8, 8), T("m.weight_scale", MP_DT_F8_E4M3, 2, 8, 1),
                      T("m.weight_scale_2", MP_DT_F32, 0, 0, 0)};
    q = insp_quant_from_tensors(nv, 3);
    assert_string_equal(sget(q, "method"), "modelopt_fp4");
    json_decref(q);

    mp_tensor ct[] = {T("m.weight_packed", MP_DT_U8, 2, 8, 8),
                      T("m.weight_global_scale", MP_DT_F32, 0, 0, 0)};
    q = insp_quant_from_tensors(ct, 2);
    assert_string_equal(sget(q, "method"), "compressed-tensors");
    assert_string_equal(sget(q, "format"), "nvfp4-pack-quantized");
    json_decref(q);

    mp_tensor bnb[] = {T("m.weight", MP_DT_U8, 2, 32, 1), T("m.weight.absmax", MP_DT_U8, 1, 1, 0),
                       T("m.weight.nested_absmax", MP_DT_F32, 1, 1, 0),
                       T("m.weight.quant_state.bitsandbytes__nf4", MP_DT_U8, 1, 100, 0)};
    q = insp_quant_from_tensors(bnb, 4);
    assert_string_equal(sget(q, "method"), "bitsandbytes");
    assert_string_equal(sget(q, "quant_type"), "nf4");
    assert_true(json_is_true(json_object_get(q, "double_quant")));
    json_decref(q);

    mp_tensor mx[] = {T("e.gate_up_proj_blocks", MP_DT_U8, 2, 8, 16),
                      T("e.gate_up_proj_scales", MP_DT_U8, 2, 8, 1)};
    q = insp_quant_from_tensors(mx, 2);
    assert_string_equal(sget(q, "method"), "mxfp4");
    json_decref(q);

    /* refine: bnb declared, no quant_state tensors: not pre-quantized;
     * KV scales present are counted */
    json_t *w = json_array();
    q = from("{\"quant_method\":\"bitsandbytes\",\"load_in_4bit\":true}", "config.json", w);
    mp_tensor plain[] = {T("a.weight", MP_DT_BF16, 2, 4, 4), T("a.k_scale", MP_DT_F32, 0, 0, 0),
                         T("a.v_scale", MP_DT_F32, 0, 0, 0)};
    insp_quant_refine(q, plain, 3, w);
    assert_false(json_is_true(json_object_get(q, "pre_quantized")));
    assert_int_equal(iget(json_object_get(q, "kv_cache"), "scales_in_checkpoint"), 2);
    json_decref(q);
    json_decref(w);
}

static void kv(const char *doc, const char *mt, int64_t layers, bool want, const char *why) {
    json_t *d = parse(doc);
    char reason[256];
    int64_t tp = -1;
    bool got = insp_kv_scales_check(d, mt, layers, &tp, reason, sizeof reason);
    json_decref(d);
    if (got != want) fprintf(stderr, "kv: %s -> %s\n", doc, reason);
    assert_true(got == want);
    if (why) assert_non_null(strstr(reason, why));
}

static void test_kv_scales(void **state) {
    (void)state;
    const char *ok2 = "{\"model_type\":\"llama\",\"kv_cache\":{\"dtype\":\"float8_e4m3fn\","
                      "\"scaling_factor\":{\"0\":{\"0\":1.0,\"1\":0.5},\"1\":{\"1\":2,\"0\":1}}}}";
    kv(ok2, "llama", 2, true, NULL);
    kv(ok2, "llama", -1, true, NULL);
    kv(ok2, "qwen2", 2, false, "does not match");
    kv(ok2, "llama", 3, false, "3 layers");
    kv("{\"model_type\":null,\"kv_cache\":{\"dtype\":\"float8_e4m3fn\","
       "\"scaling_factor\":{\"0\":{\"0\":1}}}}",
       "mistral", 1, true, NULL);
    kv("{\"kv_cache\":{\"dtype\":\"float8_e4m3fn\",\"scaling_factor\":{\"0\":{\"0\":1}}}}", "llama",
       1, false, "model_type is required");
    kv("{\"model_type\":\"llama\",\"kv_cache\":{\"dtype\":\"fp8\","
       "\"scaling_factor\":{\"0\":{\"0\":1}}}}",
       "llama", 1, false, "rather than float8_e4m3fn");
    kv("{\"model_type\":\"llama\",\"kv_cache\":{\"dtype\":\"float8_e4m3fn\","
       "\"scaling_factor\":{\"1\":{\"0\":1}}}}",
       "llama", 1, false, "TP ranks");
    kv("{\"model_type\":\"llama\",\"kv_cache\":{\"dtype\":\"float8_e4m3fn\","
       "\"scaling_factor\":{\"x\":{\"0\":1}}}}",
       "llama", 1, false, "not an integer");
    kv("{\"model_type\":\"llama\",\"kv_cache\":{\"dtype\":\"float8_e4m3fn\","
       "\"scaling_factor\":{\"0\":{\"0\":\"big\"}}}}",
       "llama", 1, false, "not a number");
    kv("{\"model_type\":\"llama\",\"kv_cache\":{\"dtype\":\"float8_e4m3fn\","
       "\"scaling_factor\":{\"0\":{\"0\":1,\"2\":1}}}}",
       "llama", 2, false, "layers must be");
    kv("[]", "llama", 1, false, "object");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_declared),
        cmocka_unit_test(test_from_tensors),
        cmocka_unit_test(test_kv_scales),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
