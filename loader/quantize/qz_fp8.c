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

/* The loops below are written to be vectorized (no calls, no branches in
 * the element loops); GCC does that at -O3 only. Vector and scalar IEEE
 * operations round alike, so the bytes do not change. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O3")
#endif

uint8_t qz_f32_to_e4m3(float x) {
    uint32_t u = scalar_f32_bits(x);
    uint32_t sign = (u >> 24) & 0x80u;
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return (uint8_t)(sign | 0x7f);
    if (u >= (1087u << 20)) return (uint8_t)(sign | 0x7e); /* callers clamp first; 448 if not */
    /* c10's conversion: below 2^-6, adding 2^14 makes the float addition
     * round to a multiple of 2^-9 (nearest, ties to even), the subnormal
     * step; above, keep 3 mantissa bits rounding to nearest even and
     * re-bias the exponent (a mantissa carry bumps it, as it should). */
    uint32_t sub = scalar_f32_bits(scalar_bits_f32(u) + 16384.0f) - (141u << 23);
    uint32_t nor = (u + 0x7ffffu + ((u >> 20) & 1u) - (120u << 23)) >> 20;
    return (uint8_t)((u < (121u << 23) ? sub : nor) | sign);
}

void qz_load_run(mp_dtype dt, const void *src, size_t i0, size_t n, float *dst) {
    const uint8_t *b = src;
    if (dt == MP_DT_BF16) {
        const uint16_t *h = (const uint16_t *)(const void *)(b + 2 * i0);
        for (size_t i = 0; i < n; i++)
            dst[i] = scalar_bits_f32((uint32_t)h[i] << 16);
    } else if (dt == MP_DT_F16) {
        for (size_t i = 0; i < n; i++)
            dst[i] = qz_load(dt, src, i0 + i);
    } else {
        memcpy(dst, b + 4 * i0, n * 4);
    }
}

uint32_t qz_absmax_bits(mp_dtype dt, const void *src, size_t i0, size_t n) {
    const uint8_t *b = src;
    if (dt == MP_DT_F32) {
        const uint32_t *u = (const uint32_t *)(const void *)(b + 4 * i0);
        uint32_t m = 0;
        for (size_t i = 0; i < n; i++) {
            uint32_t a = u[i] & 0x7fffffffu;
            m = a > m ? a : m;
        }
        return m;
    }
    const uint16_t *h = (const uint16_t *)(const void *)(b + 2 * i0);
    uint16_t m = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t a = (uint16_t)(h[i] & 0x7fffu);
        m = a > m ? a : m;
    }
    if (dt == MP_DT_BF16) return (uint32_t)m << 16;
    /* f16: 0x7c00 and above are Inf/NaN, else widen the largest exactly. */
    return m >= 0x7c00u ? 0x7f800000u : scalar_f32_bits(scalar_f16_to_f32(m));
}

size_t qz_first_non_finite(mp_dtype dt, const void *src, size_t i0, size_t n) {
    for (size_t i = i0; i < i0 + n; i++) {
        float v = qz_load(dt, src, i);
        if (!(fabsf(v) <= 3.4028235e38f)) return i;
    }
    return i0 + n;
}

static float fp8_scale_of(float amax) {
    return amax == 0.0f ? 1.0f : amax / QZ_FP8_MAX;
}

/* One row run of floats to codes: x / scale (a true division, as torch's),
 * clamped to [-448, 448], rounded as qz_f32_to_e4m3 (inlined here without
 * its NaN/over branches: the clamp has removed both). The clamp is done on
 * the magnitude's bits (for finite floats the same as comparing values, and
 * the sign, -0 included, is kept), so the loop has no float branches and
 * vectorizes. */
static void fp8_codes(const float *x, size_t n, float scale, uint8_t *q) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u = scalar_f32_bits(x[i] / scale);
        uint32_t sign = (u >> 24) & 0x80u;
        u &= 0x7fffffffu;
        uint32_t big = 0u - (uint32_t)(u > 0x43e00000u); /* 448.0f */
        u = (u & ~big) | (0x43e00000u & big);
        uint32_t sub = scalar_f32_bits(scalar_bits_f32(u) + 16384.0f) - (141u << 23);
        uint32_t nor = (u + 0x7ffffu + ((u >> 20) & 1u) - (120u << 23)) >> 20;
        uint32_t small = 0u - (uint32_t)(u < (121u << 23));
        q[i] = (uint8_t)((sub & small) | (nor & ~small) | sign);
    }
}

typedef struct fp8_job {
    const qz_params *p;
    const qz_plan *plan;
    mp_dtype dt;
    const void *src;
    uint8_t *q;
    float *scales;
    uint32_t *part_max; /* per-tensor: each unit's amax bits */
} fp8_job;

/* amax of rows [r0, r1) x cols [c0, c1) as bits; -1 on NaN/Inf. */
static int region_amax(const fp8_job *j, size_t r0, size_t r1, size_t c0, size_t c1, uint32_t *bits,
                       mp_error *err) {
    size_t cols = (size_t)j->plan->cols;
    uint32_t m = 0;
    for (size_t r = r0; r < r1; r++) {
        uint32_t b = qz_absmax_bits(j->dt, j->src, r * cols + c0, c1 - c0);
        m = b > m ? b : m;
    }
    if (m >= 0x7f800000u) {
        for (size_t r = r0; r < r1; r++) {
            size_t i = qz_first_non_finite(j->dt, j->src, r * cols + c0, c1 - c0);
            if (i < r * cols + c1)
                return qz_err_non_finite(err, j->plan->parts[0].name, i, cols,
                                         qz_load(j->dt, j->src, i));
        }
    }
    *bits = m;
    return 0;
}

static int region_fill(const fp8_job *j, size_t r0, size_t r1, size_t c0, size_t c1, float scale,
                       mp_error *err) {
    size_t cols = (size_t)j->plan->cols;
    float buf[1024];
    for (size_t r = r0; r < r1; r++)
        for (size_t c = c0; c < c1; c += 1024) {
            size_t n = c1 - c < 1024 ? c1 - c : 1024;
            qz_load_run(j->dt, j->src, r * cols + c, n, buf);
            fp8_codes(buf, n, scale, j->q + r * cols + c);
        }
    (void)err;
    return 0;
}

/* Units: rows (channel), bands of block_n rows (block), or rows in two
 * passes (per tensor: amax of each unit, then codes with the one scale). */
static int channel_units(void *arg, size_t u0, size_t u1, mp_error *err) {
    const fp8_job *j = arg;
    for (size_t r = u0; r < u1; r++) {
        uint32_t m;
        if (region_amax(j, r, r + 1, 0, (size_t)j->plan->cols, &m, err) != 0) return -1;
        j->scales[r] = fp8_scale_of(scalar_bits_f32(m));
        region_fill(j, r, r + 1, 0, (size_t)j->plan->cols, j->scales[r], err);
    }
    return 0;
}

/* Blocks: the last block of a row or column band may be partial; its amax
 * is over the elements it has (what the reference gets by padding with
 * zeros, which cannot raise an absolute maximum). */
static int band_units(void *arg, size_t u0, size_t u1, mp_error *err) {
    const fp8_job *j = arg;
    size_t rows = (size_t)j->plan->rows, cols = (size_t)j->plan->cols;
    size_t nbc = (size_t)j->plan->parts[1].shape[1];
    for (size_t br = u0; br < u1; br++) {
        size_t r0 = br * j->p->block_n, r1 = r0 + j->p->block_n < rows ? r0 + j->p->block_n : rows;
        for (size_t bc = 0; bc < nbc; bc++) {
            size_t c0 = bc * j->p->block_k,
                   c1 = c0 + j->p->block_k < cols ? c0 + j->p->block_k : cols;
            uint32_t m;
            if (region_amax(j, r0, r1, c0, c1, &m, err) != 0) return -1;
            j->scales[br * nbc + bc] = fp8_scale_of(scalar_bits_f32(m));
            region_fill(j, r0, r1, c0, c1, j->scales[br * nbc + bc], err);
        }
    }
    return 0;
}

static int tensor_amax_units(void *arg, size_t u0, size_t u1, mp_error *err) {
    const fp8_job *j = arg;
    uint32_t m = 0;
    if (region_amax(j, u0, u1, 0, (size_t)j->plan->cols, &m, err) != 0) return -1;
    j->part_max[u0] = m;
    return 0;
}

static int tensor_fill_units(void *arg, size_t u0, size_t u1, mp_error *err) {
    const fp8_job *j = arg;
    return region_fill(j, u0, u1, 0, (size_t)j->plan->cols, j->scales[0], err);
}

int qz_fp8_run(const qz_params *p, const qz_plan *plan, mp_dtype dt, const void *src,
               void *const out[], mp_error *err) {
    size_t rows = (size_t)plan->rows;
    fp8_job j = {.p = p, .plan = plan, .dt = dt, .src = src, .q = out[0], .scales = out[1]};
    if (p->method == QZ_FP8_CHANNEL) return qz_parallel(p->threads, rows, channel_units, &j, err);
    if (p->method == QZ_FP8_BLOCK)
        return qz_parallel(p->threads, (size_t)plan->parts[1].shape[0], band_units, &j, err);
    /* Per tensor: max is exact in any order, so the units' maxima combine. */
    j.part_max = calloc(rows, sizeof *j.part_max);
    if (!j.part_max) return mp_err(err, "out_of_memory", "%s: no memory", plan->parts[0].name);
    int rc = qz_parallel(p->threads, rows, tensor_amax_units, &j, err);
    uint32_t m = 0;
    for (size_t r = 0; rc == 0 && r < rows; r++)
        m = j.part_max[r] > m ? j.part_max[r] : m;
    free(j.part_max);
    if (rc != 0) return -1;
    j.scales[0] = fp8_scale_of(scalar_bits_f32(m));
    return qz_parallel(p->threads, rows, tensor_fill_units, &j, err);
}
