/*
 * test_quantize.c - the quantize kernels (loader/quantize) on crafted
 * values whose right answer is known without running the references: every
 * e4m3 code and the ties between them, FP8 scales of zero and partial
 * blocks, NF4 ties (a value on a midpoint takes the lower code), zero and
 * odd tail blocks, the dynamic-map table's ends, LLM.int8's half-to-even
 * rounding and zero rows, torch's mean on small vectors, the NaN/Inf
 * refusal, and the parts each method plans. tests/py/test_quantize.py
 * compares whole tensors with torch and bitsandbytes byte for byte.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "loader/quantize/quantize.h"
#include "util/tensor/half.h"

/* Plans and quantizes an F32 [rows, cols] tensor; out[i] are malloc'd. */
static int run(qz_params *p, const float *x, uint64_t rows, uint64_t cols, qz_plan *plan,
               void *out[QZ_MAX_PARTS], mp_error *err) {
    uint64_t shape[2] = {rows, cols};
    assert_int_equal(qz_plan_tensor(p, "m.weight", MP_DT_F32, shape, plan, err), 0);
    for (int i = 0; i < plan->n; i++) {
        out[i] = calloc(1, (size_t)plan->parts[i].nbytes);
        assert_non_null(out[i]);
    }
    return qz_quantize(p, plan, MP_DT_F32, x, out, err);
}

static void free_parts(const qz_plan *plan, void *out[QZ_MAX_PARTS]) {
    for (int i = 0; i < plan->n; i++)
        free(out[i]);
}

static float fbits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void test_e4m3_every_code_and_ties(void **state) {
    (void)state;
    for (int c = 0; c < 256; c++) {
        if ((c & 0x7f) == 0x7f) continue; /* NaN */
        float v = half_fp8_e4m3_to_f32((uint8_t)c);
        assert_int_equal(qz_f32_to_e4m3(v), c);
        /* Halfway to the next code up in magnitude: ties go to the even code. */
        if ((c & 0x7f) < 0x7e) {
            float next = half_fp8_e4m3_to_f32((uint8_t)(c + 1));
            float mid = (v + next) / 2.0f; /* exact: both have few bits */
            uint8_t even = (c & 1) ? (uint8_t)(c + 1) : (uint8_t)c;
            assert_int_equal(qz_f32_to_e4m3(mid), even);
            assert_int_equal(qz_f32_to_e4m3(nextafterf(mid, 0.0f)), c);
            assert_int_equal(qz_f32_to_e4m3(nextafterf(mid, v > 0 || c == 0 ? 1e9f : -1e9f)),
                             c + 1);
        }
    }
    assert_int_equal(qz_f32_to_e4m3(448.0f), 0x7e);
    assert_int_equal(qz_f32_to_e4m3(-448.0f), 0xfe);
    assert_int_equal(qz_f32_to_e4m3(-0.0f), 0x80);
    assert_int_equal(qz_f32_to_e4m3(ldexpf(1.0f, -10)), 0x00); /* half of the least: even */
    assert_int_equal(qz_f32_to_e4m3(ldexpf(3.0f, -10)), 0x02); /* 1.5 least: even */
    assert_int_equal(qz_f32_to_e4m3(ldexpf(1.0f, -12)), 0x00);
}

static void test_fp8_scales(void **state) {
    (void)state;
    qz_params p;
    qz_plan plan;
    void *out[QZ_MAX_PARTS];
    mp_error err;
    float zero[6] = {0};
    qz_params_default(&p, QZ_FP8);
    assert_int_equal(run(&p, zero, 2, 3, &plan, out, &err), 0);
    assert_int_equal(plan.n, 2);
    assert_string_equal(plan.parts[1].name, "m.weight_scale");
    assert_int_equal(plan.parts[1].ndim, 0);
    assert_true(((float *)out[1])[0] == 1.0f); /* amax 0: scale 1 */
    free_parts(&plan, out);

    float x[6] = {448.0f, -224.0f, 1.0f, 0.0f, 2.0f, -896.0f};
    assert_int_equal(run(&p, x, 2, 3, &plan, out, &err), 0);
    assert_true(((float *)out[1])[0] == 2.0f);
    uint8_t *q = out[0];
    assert_int_equal(q[0], qz_f32_to_e4m3(224.0f));
    assert_int_equal(q[5], 0xfe); /* -448 */
    free_parts(&plan, out);

    qz_params_default(&p, QZ_FP8_CHANNEL);
    assert_int_equal(run(&p, x, 2, 3, &plan, out, &err), 0);
    assert_int_equal(plan.parts[1].shape[0], 2);
    assert_int_equal(plan.parts[1].shape[1], 1);
    assert_true(((float *)out[1])[0] == 1.0f && ((float *)out[1])[1] == 2.0f);
    assert_int_equal(((uint8_t *)out[0])[0], 0x7e);
    free_parts(&plan, out);
}

/* A 3x5 tensor in 2x2 blocks: scales [2, 3], the last row and column of
 * blocks partial; each block's scale is its own amax / 448. */
static void test_fp8_block_tails(void **state) {
    (void)state;
    qz_params p;
    qz_plan plan;
    void *out[QZ_MAX_PARTS];
    mp_error err;
    float x[15];
    for (int i = 0; i < 15; i++)
        x[i] = (float)(i + 1) * (i % 2 ? -1.0f : 1.0f);
    qz_params_default(&p, QZ_FP8_BLOCK);
    p.block_n = 2;
    p.block_k = 2;
    assert_int_equal(run(&p, x, 3, 5, &plan, out, &err), 0);
    assert_string_equal(plan.parts[1].name, "m.weight_scale_inv");
    assert_int_equal(plan.parts[1].shape[0], 2);
    assert_int_equal(plan.parts[1].shape[1], 3);
    const float *s = out[1];
    /* Block (0,0) holds x[0,1,5,6]: amax 7; block (1,2) holds x[14] = 15. */
    assert_true(s[0] == 7.0f / 448.0f);
    assert_true(s[5] == 15.0f / 448.0f);
    assert_int_equal(((uint8_t *)out[0])[14], qz_f32_to_e4m3(15.0f / (15.0f / 448.0f)));
    free_parts(&plan, out);
}

static void test_non_finite_refused(void **state) {
    (void)state;
    qz_method methods[] = {QZ_FP8, QZ_FP8_CHANNEL, QZ_FP8_BLOCK, QZ_NF4, QZ_INT8};
    float x[8] = {1, 2, 3, 4, 5, NAN, 7, 8};
    for (size_t m = 0; m < sizeof methods / sizeof methods[0]; m++) {
        qz_params p;
        qz_plan plan;
        void *out[QZ_MAX_PARTS];
        mp_error err;
        qz_params_default(&p, methods[m]);
        x[5] = m % 2 ? NAN : -INFINITY;
        assert_int_equal(run(&p, x, 2, 4, &plan, out, &err), -1);
        assert_string_equal(err.code, "non_finite_weight");
        assert_non_null(strstr(err.message, "m.weight"));
        assert_non_null(strstr(err.message, "[1, 1]"));
        free_parts(&plan, out);
    }
    /* int8 casts to float16 first: a finite 1e6 becomes Inf there. */
    qz_params p;
    qz_plan plan;
    void *out[QZ_MAX_PARTS];
    mp_error err;
    float big[2] = {1.0f, 1e6f};
    qz_params_default(&p, QZ_INT8);
    assert_int_equal(run(&p, big, 1, 2, &plan, out, &err), -1);
    assert_string_equal(err.code, "non_finite_weight");
    assert_non_null(strstr(err.message, "float16"));
    free_parts(&plan, out);
}

/* NF4 without double quant: block 0 holds 1.0 and the 15 midpoints (each
 * takes the lower code), block 1 is zero (code 7 = 0.0, absmax 0), block 2
 * is an odd 3-element tail (absmax clamped to 1e-38 when zero, code 7 pad). */
static void test_nf4_ties_zero_and_tail(void **state) {
    (void)state;
    const float *code = qz_nf4_code();
    float x[64 * 2 + 3] = {0};
    x[0] = 1.0f;
    for (int j = 0; j < 15; j++)
        x[1 + j] = (code[j] + code[j + 1]) / 2.0f;
    qz_params p;
    qz_plan plan;
    void *out[QZ_MAX_PARTS];
    mp_error err;
    qz_params_default(&p, QZ_NF4);
    p.double_quant = false;
    assert_int_equal(run(&p, x, 1, 131, &plan, out, &err), 0);
    assert_int_equal(plan.n, 4);
    assert_int_equal(plan.parts[0].shape[0], 66);
    assert_int_equal(plan.parts[0].shape[1], 1);
    assert_string_equal(plan.parts[3].name, "m.weight.quant_state.bitsandbytes__nf4");
    const uint8_t *q = out[0];
    assert_int_equal(q[0], 0xf0); /* 1.0 -> 15, midpoint 0 -> 0 */
    for (int j = 1; j < 7; j++)
        assert_int_equal(q[j], (uint8_t)((2 * j - 1) << 4 | (2 * j)));
    assert_int_equal(q[32], 0x77); /* zero block */
    assert_int_equal(q[64], 0x77);
    assert_int_equal(q[65], 0x77); /* last element and its pad */
    const float *absmax = out[1];
    assert_true(absmax[0] == 1.0f);
    assert_true(absmax[1] == 0.0f);   /* a full zero block keeps 0 */
    assert_true(absmax[2] == 1e-38f); /* a zero tail is clamped */
    assert_memory_equal(out[2], code, 16 * sizeof(float));
    free_parts(&plan, out);
}

static void test_nf4_double_quant_state(void **state) {
    (void)state;
    float x[64 * 4];
    for (int i = 0; i < 256; i++)
        x[i] = (float)((i % 64) + 1) * (float)(i / 64 + 1);
    qz_params p;
    qz_plan plan;
    void *out[QZ_MAX_PARTS];
    mp_error err;
    qz_params_default(&p, QZ_NF4);
    assert_int_equal(run(&p, x, 4, 64, &plan, out, &err), 0);
    assert_int_equal(plan.n, 6);
    assert_int_equal(plan.parts[1].dtype, MP_DT_U8);
    /* absmax 64, 128, 192, 256: mean 160, centred -96, -32, 32, 96. */
    assert_true(((float *)out[3])[0] == 96.0f);
    const uint8_t *qa = out[1];
    assert_int_equal(qa[3], 255); /* 1.0 is the top of the dynamic map */
    assert_true(qz_dynamic_code()[qa[0]] < -0.99f);
    json_error_t je;
    const qz_part *st = &plan.parts[5];
    json_t *j = json_loadb(out[5], (size_t)st->nbytes, 0, &je);
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "quant_type")), "nf4");
    assert_int_equal(json_integer_value(json_object_get(j, "blocksize")), 64);
    assert_string_equal(json_string_value(json_object_get(j, "dtype")), "float32");
    assert_int_equal(json_integer_value(json_array_get(json_object_get(j, "shape"), 1)), 64);
    assert_true(json_real_value(json_object_get(j, "nested_offset")) == 160.0);
    json_decref(j);
    free_parts(&plan, out);
}

static void test_blockwise_table_ends(void **state) {
    (void)state;
    float a[256 + 4] = {0};
    a[256] = 1.0f;
    a[257] = -1.0f;
    a[258] = 0.0f;
    a[259] = 0.5f;
    uint8_t q[260];
    float absmax[2];
    mp_error err;
    assert_int_equal(qz_quantize_blockwise(a, 260, 256, q, absmax, &err), 0);
    assert_true(absmax[0] == 0.0f && absmax[1] == 1.0f);
    for (int i = 0; i < 256; i++)
        assert_int_equal(q[i], 0);
    assert_int_equal(q[256], 255);
    assert_int_equal(q[257], 0);
    /* The 65536-entry table's bin of 0.0 is centred just above it: bitsandbytes
     * gives it the nearest code to 1.5e-5, a tiny positive one. */
    assert_true(fabsf(qz_dynamic_code()[q[258]]) < 1e-4f);
    assert_true(fabsf(qz_dynamic_code()[q[259]] - 0.5f) < 0.01f);
    assert_true(qz_dynamic_code()[255] == 1.0f);
}

static void test_int8_rounding_and_zero_rows(void **state) {
    (void)state;
    /* Row 0: absmax 127, so q = x exactly after *1; 0.5 and 1.5 tie to even.
     * Row 1: all zero. */
    float x[8] = {127.0f, 0.5f, 1.5f, -2.5f, 0, 0, 0, 0};
    qz_params p;
    qz_plan plan;
    void *out[QZ_MAX_PARTS];
    mp_error err;
    qz_params_default(&p, QZ_INT8);
    assert_int_equal(run(&p, x, 2, 4, &plan, out, &err), 0);
    assert_string_equal(plan.parts[1].name, "m.SCB");
    assert_string_equal(plan.parts[2].name, "m.weight_format");
    const int8_t *q = out[0];
    assert_int_equal(q[0], 127);
    assert_int_equal(q[1], 0);
    assert_int_equal(q[2], 2);
    assert_int_equal(q[3], -2);
    for (int i = 4; i < 8; i++)
        assert_int_equal(q[i], 0);
    assert_true(((float *)out[1])[0] == 127.0f && ((float *)out[1])[1] == 0.0f);
    assert_int_equal(((uint8_t *)out[2])[0], 0);
    free_parts(&plan, out);
}

static void test_mean_and_config(void **state) {
    (void)state;
    float a[3] = {1.0f, 2.0f, 3.0f};
    assert_true(qz_mean_f32(a, 3) == 2.0f);
    float b[40];
    for (int i = 0; i < 40; i++)
        b[i] = fbits(0x3f800000u + (uint32_t)i);
    float m = qz_mean_f32(b, 40);
    assert_true(m > 1.0f && m < 1.0001f);

    qz_params p;
    qz_params_default(&p, QZ_FP8_BLOCK);
    json_t *ign = json_pack("[s]", "lm_head");
    json_t *c = qz_quant_config(&p, ign, "bfloat16");
    assert_string_equal(json_string_value(json_object_get(c, "quant_method")), "fp8");
    assert_int_equal(json_integer_value(json_array_get(json_object_get(c, "weight_block_size"), 0)),
                     128);
    assert_true(json_equal(json_object_get(c, "ignored_layers"), ign));
    json_decref(c);
    qz_params_default(&p, QZ_NF4);
    c = qz_quant_config(&p, ign, "bfloat16");
    assert_true(json_is_true(json_object_get(c, "load_in_4bit")));
    assert_true(json_is_true(json_object_get(c, "bnb_4bit_use_double_quant")));
    assert_string_equal(json_string_value(json_object_get(c, "bnb_4bit_compute_dtype")),
                        "bfloat16");
    json_decref(c);
    qz_params_default(&p, QZ_FP8_CHANNEL);
    c = qz_quant_config(&p, NULL, NULL);
    assert_string_equal(json_string_value(json_object_get(c, "format")), "float-quantized");
    json_decref(c);
    json_decref(ign);
}

static void test_names_and_refusals(void **state) {
    (void)state;
    qz_method m;
    assert_int_equal(qz_method_parse("fp8-block", &m), 0);
    assert_int_equal(m, QZ_FP8_BLOCK);
    assert_int_equal(qz_method_parse("int4", &m), -1);
    assert_string_equal(qz_method_name(QZ_NF4), "nf4");
    qz_params p;
    qz_plan plan;
    mp_error err;
    uint64_t shape[2] = {4, 4}, empty[2] = {0, 4};
    qz_params_default(&p, QZ_FP8);
    assert_int_equal(qz_plan_tensor(&p, "a.weight", MP_DT_I32, shape, &plan, &err), -1);
    assert_string_equal(err.code, "bad_params");
    assert_int_equal(qz_plan_tensor(&p, "a.weight", MP_DT_F16, empty, &plan, &err), -1);
    qz_params_default(&p, QZ_FP8_BLOCK);
    p.block_k = 0;
    assert_int_equal(qz_plan_tensor(&p, "a.weight", MP_DT_F16, shape, &plan, &err), -1);
    assert_string_equal(err.field, "block_size");
}

/* Any thread count gives the same bytes, and the same (first) error. */
static void test_threads_same_bytes(void **state) {
    (void)state;
    enum { R = 300, C = 200 };
    float *x = malloc(R * C * sizeof *x);
    assert_non_null(x);
    uint32_t seed = 12345;
    for (int i = 0; i < R * C; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = ((float)(seed >> 8) / 16777216.0f - 0.5f) * (float)(1 + i % 7);
    }
    qz_method methods[] = {QZ_FP8, QZ_FP8_CHANNEL, QZ_FP8_BLOCK, QZ_NF4, QZ_INT8};
    for (size_t m = 0; m < sizeof methods / sizeof methods[0]; m++) {
        qz_params p;
        qz_plan plan;
        void *one[QZ_MAX_PARTS], *many[QZ_MAX_PARTS];
        mp_error err;
        qz_params_default(&p, methods[m]);
        assert_int_equal(run(&p, x, R, C, &plan, one, &err), 0);
        p.threads = 3;
        assert_int_equal(run(&p, x, R, C, &plan, many, &err), 0);
        for (int i = 0; i < plan.n; i++)
            assert_memory_equal(one[i], many[i], (size_t)plan.parts[i].nbytes);
        free_parts(&plan, one);
        free_parts(&plan, many);
        x[250 * C + 3] = NAN; /* in the last thread's range, and a later one */
        x[290 * C + 1] = INFINITY;
        assert_int_equal(run(&p, x, R, C, &plan, many, &err), -1);
        assert_non_null(strstr(err.message, "[250, 3]"));
        free_parts(&plan, many);
        x[250 * C + 3] = 0.5f;
        x[290 * C + 1] = 0.5f;
    }
    free(x);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_e4m3_every_code_and_ties),
        cmocka_unit_test(test_fp8_scales),
        cmocka_unit_test(test_fp8_block_tails),
        cmocka_unit_test(test_non_finite_refused),
        cmocka_unit_test(test_nf4_ties_zero_and_tail),
        cmocka_unit_test(test_nf4_double_quant_state),
        cmocka_unit_test(test_blockwise_table_ends),
        cmocka_unit_test(test_int8_rounding_and_zero_rows),
        cmocka_unit_test(test_mean_and_config),
        cmocka_unit_test(test_names_and_refusals),
        cmocka_unit_test(test_threads_same_bytes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
