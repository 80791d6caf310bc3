/*
 * qz_fp8.c - FP8 e4m3fn quantization, per tensor, per output channel and in
 * [bn, bk] blocks, equal bit for bit to this torch recipe in float32:
 *
 *     scale = amax / 448          (amax over the group; 1.0 when amax is 0)
 *     q = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
 *
 * Every step is one IEEE float operation as torch does it (a true division,
 * not a multiplication by the reciprocal, which rounds differently), and the
 * e4m3 rounding is c10's: nearest, ties to even, subnormals below 2^-6.
 * NaN and Inf are refused before anything is written: a silent saturation
 * would turn a broken checkpoint into a plausible one.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "loader/quantize/qz_internal.h"

uint8_t qz_f32_to_e4m3(float x) {
    uint32_t bits = scalar_f32_bits(x);
    uint8_t sign = (uint8_t)((bits >> 24) & 0x80);
    float a = fabsf(x);
    if (a != a) return (uint8_t)(sign | 0x7f);
    if (a < 0.015625f) {
        /* Subnormal range (and 0): multiples of 2^-9. The product is exact
         * (a power of two); nearbyintf rounds half to even. 8 * 2^-9 is the
         * smallest normal, whose code is 0x08 too. */
        return (uint8_t)(sign | (uint8_t)nearbyintf(a * 512.0f));
    }
    uint32_t u = scalar_f32_bits(a);
    /* Keep 3 of the 23 mantissa bits, rounding to nearest even; a carry out
     * of the mantissa bumps the exponent, as it should. */
    u += 0x7ffffu + ((u >> 20) & 1u);
    uint32_t e = ((u >> 23) & 0xffu) - 127u + 7u;
    uint32_t m = (u >> 20) & 7u;
    if (e > 15 || (e == 15 && m == 7))
        return (uint8_t)(sign | 0x7e); /* callers clamp first; 448 if not */
    return (uint8_t)(sign | (e << 3) | m);
}

static float fp8_scale_of(float amax) {
    return amax == 0.0f ? 1.0f : amax / QZ_FP8_MAX;
}

static uint8_t fp8_q(float x, float scale) {
    float v = x / scale;
    v = v < -QZ_FP8_MAX ? -QZ_FP8_MAX : (v > QZ_FP8_MAX ? QZ_FP8_MAX : v);
    return qz_f32_to_e4m3(v);
}

/* amax of rows [r0, r1) x cols [c0, c1); -1 (with err set) on NaN/Inf. */
static int fp8_amax(const qz_plan *plan, mp_dtype dt, const void *src, size_t r0, size_t r1,
                    size_t c0, size_t c1, float *amax, mp_error *err) {
    size_t cols = (size_t)plan->cols;
    float m = 0.0f;
    for (size_t r = r0; r < r1; r++) {
        for (size_t c = c0; c < c1; c++) {
            float v = fabsf(qz_load(dt, src, r * cols + c));
            if (!(v <= 3.4028235e38f))
                return qz_err_non_finite(err, plan->parts[0].name, r * cols + c, cols,
                                         qz_load(dt, src, r * cols + c));
            m = v > m ? v : m;
        }
    }
    *amax = m;
    return 0;
}

static void fp8_fill(const qz_plan *plan, mp_dtype dt, const void *src, size_t r0, size_t r1,
                     size_t c0, size_t c1, float scale, uint8_t *q) {
    size_t cols = (size_t)plan->cols;
    for (size_t r = r0; r < r1; r++)
        for (size_t c = c0; c < c1; c++)
            q[r * cols + c] = fp8_q(qz_load(dt, src, r * cols + c), scale);
}

int qz_fp8_run(const qz_params *p, const qz_plan *plan, mp_dtype dt, const void *src,
               void *const out[], mp_error *err) {
    size_t rows = (size_t)plan->rows, cols = (size_t)plan->cols;
    uint8_t *q = out[0];
    float *scales = out[1];
    float amax;
    if (p->method == QZ_FP8) {
        if (fp8_amax(plan, dt, src, 0, rows, 0, cols, &amax, err) != 0) return -1;
        scales[0] = fp8_scale_of(amax);
        fp8_fill(plan, dt, src, 0, rows, 0, cols, scales[0], q);
        return 0;
    }
    if (p->method == QZ_FP8_CHANNEL) {
        for (size_t r = 0; r < rows; r++) {
            if (fp8_amax(plan, dt, src, r, r + 1, 0, cols, &amax, err) != 0) return -1;
            scales[r] = fp8_scale_of(amax);
            fp8_fill(plan, dt, src, r, r + 1, 0, cols, scales[r], q);
        }
        return 0;
    }
    /* Blocks: the last block of a row or column band may be partial; its
     * amax is over the elements it has (what the reference gets by padding
     * with zeros, which cannot raise an absolute maximum). */
    size_t nbc = plan->parts[1].shape[1];
    for (size_t br = 0; br < plan->parts[1].shape[0]; br++) {
        size_t r0 = br * p->block_n, r1 = r0 + p->block_n < rows ? r0 + p->block_n : rows;
        for (size_t bc = 0; bc < nbc; bc++) {
            size_t c0 = bc * p->block_k, c1 = c0 + p->block_k < cols ? c0 + p->block_k : cols;
            if (fp8_amax(plan, dt, src, r0, r1, c0, c1, &amax, err) != 0) return -1;
            scales[br * nbc + bc] = fp8_scale_of(amax);
            fp8_fill(plan, dt, src, r0, r1, c0, c1, scales[br * nbc + bc], q);
        }
    }
    return 0;
}
