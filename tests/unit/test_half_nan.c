/*
 * test_half_nan.c - widening f16 and fp8 e5m2 to f32, exhaustively (all
 * 65536 and 256 inputs): every finite value and infinity exactly, and every
 * NaN quiet (quiet bit set, sign and payload kept), as the docs promise, on
 * the CPU conversions (util/tensor/half.c) and through gpu_cast on the host
 * backend (util/tensor/scalar.h, shared with the CUDA kernels). A
 * signalling NaN that stayed signalling would trap or be quieted later by
 * whatever touches it first, so host and device bytes could differ.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/gpu.h"
#include "util/tensor/half.h"

static uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* The f32 bits an f16 must widen to, from its definition. */
static uint32_t want_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    unsigned e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f && m) return sign | 0x7f800000u | 0x00400000u | ((uint32_t)m << 13);
    if (e == 0x1f) return sign | 0x7f800000u;
    float v = e ? ldexpf((float)(1024 + m), (int)e - 25) : ldexpf((float)m, -24);
    return sign | bits(v);
}

static void test_f16_all_values(void **state) {
    (void)state;
    int nans = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        uint32_t got = bits(half_f16_to_f32((uint16_t)h)), want = want_f16((uint16_t)h);
        if (got != want) fail_msg("f16 %04x -> %08x, want %08x", h, got, want);
        if (isnan(half_f16_to_f32((uint16_t)h))) nans++;
    }
    assert_int_equal(nans, 2 * 1023);
}

static void test_e5m2_all_values(void **state) {
    (void)state;
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t got = bits(half_fp8_e5m2_to_f32((uint8_t)b)), want = want_f16((uint16_t)(b << 8));
        if (got != want) fail_msg("e5m2 %02x -> %08x, want %08x", b, got, want);
        /* 0x7d (signalling) and 0x7e, 0x7f (quiet), and their negatives. */
        if ((b & 0x7f) > 0x7c) assert_true(got & 0x00400000u);
    }
}

/* The same through the device interface (host backend: the scalar code the
 * CUDA kernels compile too). */
static void test_gpu_cast_quiets(void **state) {
    (void)state;
    gpu_set *s = NULL;
    mp_error err = {0};
    assert_int_equal(gpu_set_open("host", 0, &s, &err), 0);
    gpu_arena *src = NULL, *dst = NULL;
    assert_int_equal(gpu_arena_alloc(s, 0, 65536 * 2, &src, &err), 0);
    assert_int_equal(gpu_arena_alloc(s, 0, 65536 * 4, &dst, &err), 0);
    uint16_t *all = malloc(65536 * 2);
    for (uint32_t h = 0; h < 65536; h++)
        all[h] = (uint16_t)h;
    assert_int_equal(gpu_copy_h2d(src, 0, all, 65536 * 2, &err), 0);
    assert_int_equal(gpu_cast(dst, 0, MP_DT_F32, src, 0, MP_DT_F16, 65536, &err), 0);
    uint32_t *f = malloc(65536 * 4);
    assert_int_equal(gpu_read(dst, 0, f, 65536 * 4, &err), 0);
    for (uint32_t h = 0; h < 65536; h++)
        if (f[h] != want_f16((uint16_t)h))
            fail_msg("gpu_cast f16 %04x -> %08x, want %08x", h, f[h], want_f16((uint16_t)h));
    unsigned char e5[256];
    for (int b = 0; b < 256; b++)
        e5[b] = (unsigned char)b;
    assert_int_equal(gpu_copy_h2d(src, 0, e5, 256, &err), 0);
    assert_int_equal(gpu_cast(dst, 0, MP_DT_F32, src, 0, MP_DT_F8_E5M2, 256, &err), 0);
    assert_int_equal(gpu_read(dst, 0, f, 256 * 4, &err), 0);
    for (uint32_t b = 0; b < 256; b++)
        if (f[b] != want_f16((uint16_t)(b << 8))) fail_msg("gpu_cast e5m2 %02x -> %08x", b, f[b]);
    free(f);
    free(all);
    gpu_arena_free(src);
    gpu_arena_free(dst);
    gpu_set_close(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_f16_all_values),
        cmocka_unit_test(test_e5m2_all_values),
        cmocka_unit_test(test_gpu_cast_quiets),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
