/*
 * test_cast.c - tensor_cast (util/tensor/cast.c), the CPU cast behind
 * convert, warm_load and the host GPU backend: every 8- and 16-bit source
 * pattern against the scalar conversions of half.c, NaN payloads and Inf
 * kept, f64 narrowed through float, in-place casts, runs longer than its
 * internal chunk, same-dtype copies and refused pairs.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "util/tensor/cast.h"
#include "util/tensor/half.h"

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* What a cast of one element must give: through f32, then narrowed. */
static void expect_one(mp_dtype to, float v, unsigned char *out) {
    uint16_t h;
    if (to == MP_DT_F32) {
        memcpy(out, &v, 4);
        return;
    }
    h = to == MP_DT_F16 ? half_f32_to_f16(v) : half_f32_to_bf16(v);
    out[0] = (unsigned char)(h & 0xff);
    out[1] = (unsigned char)(h >> 8);
}

static void test_every_8_bit_source(void **state) {
    (void)state;
    const mp_dtype srcs[] = {MP_DT_F8_E4M3, MP_DT_F8_E5M2, MP_DT_F8_E4M3FNUZ, MP_DT_F8_E5M2FNUZ,
                             MP_DT_F8_E8M0};
    float (*const wide[])(uint8_t) = {half_fp8_e4m3_to_f32, half_fp8_e5m2_to_f32,
                                      half_fp8_e4m3fnuz_to_f32, half_fp8_e5m2fnuz_to_f32,
                                      half_fp8_e8m0_to_f32};
    const mp_dtype tos[] = {MP_DT_F32, MP_DT_F16, MP_DT_BF16};
    uint8_t in[256];
    for (unsigned i = 0; i < 256; i++)
        in[i] = (uint8_t)i;
    unsigned char got[256 * 4], want[4];
    for (size_t s = 0; s < sizeof srcs / sizeof *srcs; s++)
        for (size_t t = 0; t < 3; t++) {
            size_t es = tos[t] == MP_DT_F32 ? 4 : 2;
            assert_true(tensor_cast(srcs[s], in, tos[t], got, 256));
            for (unsigned i = 0; i < 256; i++) {
                expect_one(tos[t], wide[s]((uint8_t)i), want);
                assert_memory_equal(got + i * es, want, es);
            }
        }
}

static void test_every_16_bit_source(void **state) {
    (void)state;
    const size_t n = 65536;
    uint16_t *in = malloc(n * 2);
    unsigned char *got = malloc(n * 4), want[4];
    assert_non_null(in);
    assert_non_null(got);
    for (size_t i = 0; i < n; i++)
        in[i] = (uint16_t)i;
    const mp_dtype tos[] = {MP_DT_F32, MP_DT_F16, MP_DT_BF16};
    for (int half = 0; half < 2; half++) {
        mp_dtype from = half ? MP_DT_BF16 : MP_DT_F16;
        for (size_t t = 0; t < 3; t++) {
            size_t es = tos[t] == MP_DT_F32 ? 4 : 2;
            assert_true(tensor_cast(from, in, tos[t], got, n));
            for (size_t i = 0; i < n; i++) {
                float v = half ? half_bf16_to_f32((uint16_t)i) : half_f16_to_f32((uint16_t)i);
                if (from == tos[t]) { /* a copy: bits as they were */
                    assert_memory_equal(got + i * es, &in[i], 2);
                    continue;
                }
                expect_one(tos[t], v, want);
                assert_memory_equal(got + i * es, want, es);
            }
        }
    }
    free(in);
    free(got);
}

static void test_f32_and_f64_sources(void **state) {
    (void)state;
    /* a signalling NaN with a payload, and Inf: copied and narrowed */
    uint32_t snan = 0x7fa00001u, inf = 0xff800000u;
    float src[3];
    memcpy(&src[0], &snan, 4);
    memcpy(&src[1], &inf, 4);
    src[2] = 1.0f + 0x1p-11f; /* a tie in f16: even, so 1.0 */
    float f32[3];
    uint16_t h[3], b[3];
    assert_true(tensor_cast(MP_DT_F32, src, MP_DT_F32, f32, 3));
    assert_int_equal(f32_bits(f32[0]), snan);
    assert_true(tensor_cast(MP_DT_F32, src, MP_DT_F16, h, 3));
    assert_int_equal(h[0], half_f32_to_f16(src[0]));
    assert_true((h[0] & 0x7e00) == 0x7e00); /* quiet NaN */
    assert_int_equal(h[1], 0xfc00);
    assert_int_equal(h[2], 0x3c00);
    assert_true(tensor_cast(MP_DT_F32, src, MP_DT_BF16, b, 3));
    assert_int_equal(b[0], 0x7fe0);
    assert_int_equal(b[1], 0xff80);
    /* f64 goes through float (double rounding, as torch does) */
    double d[] = {1.0 + 0x1p-11 + 0x1p-40, 1e300, -3.5};
    float df[3];
    assert_true(tensor_cast(MP_DT_F64, d, MP_DT_F32, df, 3));
    assert_true(df[0] == (float)d[0] && isinf(df[1]) && df[2] == -3.5f);
    assert_true(tensor_cast(MP_DT_F64, d, MP_DT_F16, h, 3));
    assert_int_equal(h[0], half_f32_to_f16((float)d[0]));
    assert_int_equal(h[1], 0x7c00);
}

static void test_in_place_and_long_runs(void **state) {
    (void)state;
    /* longer than the internal chunk, odd length, in place f16 <-> bf16 */
    const size_t n = 5000;
    uint16_t *a = malloc(n * 2), *want = malloc(n * 2);
    assert_non_null(a);
    assert_non_null(want);
    for (size_t i = 0; i < n; i++)
        a[i] = (uint16_t)(i * 40503u);
    assert_true(tensor_cast(MP_DT_F16, a, MP_DT_BF16, want, n));
    assert_true(tensor_cast(MP_DT_F16, a, MP_DT_BF16, a, n));
    assert_memory_equal(a, want, n * 2);
    free(a);
    free(want);
}

static void test_copies_and_refusals(void **state) {
    (void)state;
    int32_t i32[3] = {1, -2, 3}, o32[3] = {0};
    assert_true(tensor_cast(MP_DT_I32, i32, MP_DT_I32, o32, 3));
    assert_memory_equal(i32, o32, sizeof i32);
    uint16_t h[2] = {0x1234, 0x5678};
    assert_false(tensor_cast(MP_DT_I32, i32, MP_DT_F16, h, 2));
    assert_false(tensor_cast(MP_DT_F32, i32, MP_DT_F64, h, 1));
    assert_false(tensor_cast(MP_DT_F32, i32, MP_DT_F8_E4M3, h, 1));
    assert_false(tensor_cast(MP_DT_F4, h, MP_DT_F4, h, 1));
    assert_int_equal(h[0], 0x1234); /* nothing written */
    assert_true(tensor_cast(MP_DT_F16, h, MP_DT_F32, NULL, 0));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_8_bit_source),  cmocka_unit_test(test_every_16_bit_source),
        cmocka_unit_test(test_f32_and_f64_sources), cmocka_unit_test(test_in_place_and_long_runs),
        cmocka_unit_test(test_copies_and_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
