/*
 * qz_bnb.c - bitsandbytes' NF4 and LLM.int8 quantization on CPU, bit for bit
 * (bitsandbytes 0.50, read in its backends/default/ops.py and csrc/cpu_ops.cpp):
 *
 * quantize_4bit (its "default" torch kernel, what the CPU backend runs):
 *   x in float32; a full 64-block's absmax is max|x| (stored as is), its
 *   values are clamp(x * (1 / max(absmax, 1e-38)), -1, 1); the tail block
 *   stores max(absmax, 1e-38) and divides (x / am) instead. The code is
 *   torch.bucketize over the midpoints (code[i] + code[i+1]) / 2, i.e. the
 *   count of midpoints strictly below the value: a tie goes to the lower
 *   code. Codes are packed two per byte, the first in the high nibble; an odd
 *   count is padded with the code of 0.0 (7).
 * quantize_blockwise (its C++ CPU kernel, used for the nested absmax): per
 *   block of 256, absmax = max|x|; a zero block is all code 0; otherwise
 *   v = clamp(x * (1 / absmax), -1, 1) goes through a 65536-entry table:
 *   index = (uint16)((v + 1) * 0.5 * 65535 + 0.5), table[i] = the first code
 *   whose upper midpoint is not below -1 + 2i / 65535.
 * int8_vectorwise_quant after Int8Params' cast to float16: row absmax r in
 *   fp16, q = round(x * (1 / r * 127)) half to even; a zero row is all 0.
 *
 * The code books are constants taken from bitsandbytes (get_4bit_type("nf4")
 * and create_dynamic_map()); tests/py/test_quantize.py checks them against
 * the installed package.
 */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "loader/quantize/qz_internal.h"

/* The element loops are written to vectorize (see qz_fp8.c). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O3")
#endif

static const float NF4_CODE[16] = {
    -0x1.0p+0f,      -0x1.647362p-1f, -0x1.0cd66p-1f,  -0x1.94654p-2f,
    -0x1.23449ap-2f, -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0.0p+0f,
    0x1.45f5fep-4f,  0x1.4995c6p-3f,  0x1.f809bap-3f,  0x1.5a0674p-2f,
    0x1.c3497p-2f,   0x1.200f56p-1f,  0x1.722766p-1f,  0x1.0p+0f,
};

static const float DYNAMIC_CODE[256] = {
    -0x1.fc6666p-1f,  -0x1.f53334p-1f,  -0x1.eep-1f,      -0x1.e6ccccp-1f,  -0x1.df999ap-1f,
    -0x1.d86666p-1f,  -0x1.d13334p-1f,  -0x1.cap-1f,      -0x1.c2ccccp-1f,  -0x1.bb999ap-1f,
    -0x1.b46666p-1f,  -0x1.ad3334p-1f,  -0x1.a6p-1f,      -0x1.9eccccp-1f,  -0x1.97999ap-1f,
    -0x1.906666p-1f,  -0x1.893334p-1f,  -0x1.82p-1f,      -0x1.7accccp-1f,  -0x1.73999ap-1f,
    -0x1.6c6668p-1f,  -0x1.653334p-1f,  -0x1.5ep-1f,      -0x1.56ccccp-1f,  -0x1.4f999ap-1f,
    -0x1.486668p-1f,  -0x1.413334p-1f,  -0x1.3ap-1f,      -0x1.32ccccp-1f,  -0x1.2b999ap-1f,
    -0x1.246668p-1f,  -0x1.1d3334p-1f,  -0x1.16p-1f,      -0x1.0eccccp-1f,  -0x1.079998p-1f,
    -0x1.006666p-1f,  -0x1.f26664p-2f,  -0x1.e4p-2f,      -0x1.d59998p-2f,  -0x1.c73334p-2f,
    -0x1.b8ccccp-2f,  -0x1.aa6666p-2f,  -0x1.9cp-2f,      -0x1.8d9998p-2f,  -0x1.7f3334p-2f,
    -0x1.70ccccp-2f,  -0x1.626666p-2f,  -0x1.54p-2f,      -0x1.459998p-2f,  -0x1.373334p-2f,
    -0x1.28ccccp-2f,  -0x1.1a6668p-2f,  -0x1.0cp-2f,      -0x1.fb3332p-3f,  -0x1.de6666p-3f,
    -0x1.c1999ap-3f,  -0x1.a4ccccp-3f,  -0x1.88p-3f,      -0x1.6b3334p-3f,  -0x1.4e6666p-3f,
    -0x1.31999ap-3f,  -0x1.14ccccp-3f,  -0x1.fp-4f,       -0x1.b66668p-4f,  -0x1.93d70ap-4f,
    -0x1.8851eep-4f,  -0x1.7ccccep-4f,  -0x1.7147aep-4f,  -0x1.65c29p-4f,   -0x1.5a3d7p-4f,
    -0x1.4eb854p-4f,  -0x1.433334p-4f,  -0x1.37ae14p-4f,  -0x1.2c28f6p-4f,  -0x1.20a3d6p-4f,
    -0x1.151ebap-4f,  -0x1.09999ap-4f,  -0x1.fc28f6p-5f,  -0x1.e51ebap-5f,  -0x1.ce147ap-5f,
    -0x1.b70a3ep-5f,  -0x1.ap-5f,       -0x1.88f5c2p-5f,  -0x1.71eb86p-5f,  -0x1.5ae146p-5f,
    -0x1.43d70ap-5f,  -0x1.2ccccep-5f,  -0x1.15c29p-5f,   -0x1.fd70a4p-6f,  -0x1.cf5c2ap-6f,
    -0x1.a147aep-6f,  -0x1.733334p-6f,  -0x1.451ebap-6f,  -0x1.170a3ep-6f,  -0x1.d1eb86p-7f,
    -0x1.75c29p-7f,   -0x1.3e76c8p-7f,  -0x1.2c083p-7f,   -0x1.19999ap-7f,  -0x1.072b02p-7f,
    -0x1.e978d4p-8f,  -0x1.c49ba6p-8f,  -0x1.9fbe76p-8f,  -0x1.7ae148p-8f,  -0x1.56041ap-8f,
    -0x1.3126e8p-8f,  -0x1.0c49bap-8f,  -0x1.ced914p-9f,  -0x1.851eb8p-9f,  -0x1.3b645ap-9f,
    -0x1.e353f8p-10f, -0x1.4fdf3ap-10f, -0x1.eecbfep-11f, -0x1.b3d07cp-11f, -0x1.78d5p-11f,
    -0x1.3dd982p-11f, -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f, -0x1.040bfep-17f,
    -0x1.b43528p-19f, -0x1.27476ep-21f, 0x0.0p+0f,        0x1.27476ep-21f,  0x1.b43528p-19f,
    0x1.040bfep-17f,  0x1.64840cp-16f,  0x1.6f0068p-15f,  0x1.15df66p-14f,  0x1.743e96p-14f,
    0x1.47ae16p-13f,  0x1.19ce0ap-12f,  0x1.8fc506p-12f,  0x1.02de02p-11f,  0x1.3dd982p-11f,
    0x1.78d5p-11f,    0x1.b3d07cp-11f,  0x1.eecbfep-11f,  0x1.4fdf3ap-10f,  0x1.e353f8p-10f,
    0x1.3b645ap-9f,   0x1.851eb8p-9f,   0x1.ced914p-9f,   0x1.0c49bap-8f,   0x1.3126e8p-8f,
    0x1.56041ap-8f,   0x1.7ae148p-8f,   0x1.9fbe76p-8f,   0x1.c49ba6p-8f,   0x1.e978d4p-8f,
    0x1.072b02p-7f,   0x1.19999ap-7f,   0x1.2c083p-7f,    0x1.3e76c8p-7f,   0x1.75c29p-7f,
    0x1.d1eb86p-7f,   0x1.170a3ep-6f,   0x1.451ebap-6f,   0x1.733334p-6f,   0x1.a147aep-6f,
    0x1.cf5c2ap-6f,   0x1.fd70a4p-6f,   0x1.15c29p-5f,    0x1.2ccccep-5f,   0x1.43d70ap-5f,
    0x1.5ae146p-5f,   0x1.71eb86p-5f,   0x1.88f5c2p-5f,   0x1.ap-5f,        0x1.b70a3ep-5f,
    0x1.ce147ap-5f,   0x1.e51ebap-5f,   0x1.fc28f6p-5f,   0x1.09999ap-4f,   0x1.151ebap-4f,
    0x1.20a3d6p-4f,   0x1.2c28f6p-4f,   0x1.37ae14p-4f,   0x1.433334p-4f,   0x1.4eb854p-4f,
    0x1.5a3d7p-4f,    0x1.65c29p-4f,    0x1.7147aep-4f,   0x1.7ccccep-4f,   0x1.8851eep-4f,
    0x1.93d70ap-4f,   0x1.b66668p-4f,   0x1.fp-4f,        0x1.14ccccp-3f,   0x1.31999ap-3f,
    0x1.4e6666p-3f,   0x1.6b3334p-3f,   0x1.88p-3f,       0x1.a4ccccp-3f,   0x1.c1999ap-3f,
    0x1.de6666p-3f,   0x1.fb3332p-3f,   0x1.0cp-2f,       0x1.1a6668p-2f,   0x1.28ccccp-2f,
    0x1.373334p-2f,   0x1.459998p-2f,   0x1.54p-2f,       0x1.626666p-2f,   0x1.70ccccp-2f,
    0x1.7f3334p-2f,   0x1.8d9998p-2f,   0x1.9cp-2f,       0x1.aa6666p-2f,   0x1.b8ccccp-2f,
    0x1.c73334p-2f,   0x1.d59998p-2f,   0x1.e4p-2f,       0x1.f26664p-2f,   0x1.006666p-1f,
    0x1.079998p-1f,   0x1.0eccccp-1f,   0x1.16p-1f,       0x1.1d3334p-1f,   0x1.246668p-1f,
    0x1.2b999ap-1f,   0x1.32ccccp-1f,   0x1.3ap-1f,       0x1.413334p-1f,   0x1.486668p-1f,
    0x1.4f999ap-1f,   0x1.56ccccp-1f,   0x1.5ep-1f,       0x1.653334p-1f,   0x1.6c6668p-1f,
    0x1.73999ap-1f,   0x1.7accccp-1f,   0x1.82p-1f,       0x1.893334p-1f,   0x1.906666p-1f,
    0x1.97999ap-1f,   0x1.9eccccp-1f,   0x1.a6p-1f,       0x1.ad3334p-1f,   0x1.b46666p-1f,
    0x1.bb999ap-1f,   0x1.c2ccccp-1f,   0x1.cap-1f,       0x1.d13334p-1f,   0x1.d86666p-1f,
    0x1.df999ap-1f,   0x1.e6ccccp-1f,   0x1.eep-1f,       0x1.f53334p-1f,   0x1.fc6666p-1f,
    0x1.0p+0f,
};

const float *qz_nf4_code(void) {
    return NF4_CODE;
}

const float *qz_dynamic_code(void) {
    return DYNAMIC_CODE;
}

int qz_err_non_finite(mp_error *err, const char *name, size_t i, size_t cols, float v) {
    return mp_err(err, "non_finite_weight",
                  "%s holds %s at [%zu, %zu]: quantizing it would saturate silently; fix "
                  "the checkpoint or add the module to `ignore`",
                  name, v != v ? "NaN" : (v > 0 ? "+Inf" : "-Inf"), i / cols, i % cols);
}

/* ---- NF4 ---- */

/* torch.bucketize(v, bounds, right=False): the number of bounds below v. */
static uint8_t nf4_code_of(const float *bounds, float v) {
    uint8_t c = 0;
    for (int j = 0; j < 15; j++)
        c += bounds[j] < v;
    return c;
}

/* torch.clamp(v, -1, 1) for a finite v, on the magnitude's bits (sign and
 * -0 kept) so that the loops using it have no float branches. */
static float clamp1(float v) {
    uint32_t u = scalar_f32_bits(v), a = u & 0x7fffffffu;
    return scalar_bits_f32((u & 0x80000000u) | (a < 0x3f800000u ? a : 0x3f800000u));
}

typedef struct nf4_job {
    const qz_plan *plan;
    mp_dtype dt;
    const void *src;
    uint8_t *packed;
    float *absmax;
    size_t n, full; /* elements; blocks before the tail */
    float bounds[15];
} nf4_job;

/* Codes of one block of len (<= 64) floats already scaled into [-1, 1]:
 * the bucketize written as 15 compares per value, which vectorizes. */
static void nf4_codes(const float *bounds, const float *v, size_t len, uint8_t *codes) {
    for (size_t i = 0; i < len; i++)
        codes[i] = 0;
    for (int j = 0; j < 15; j++) {
        float b = bounds[j];
        for (size_t i = 0; i < len; i++)
            codes[i] = (uint8_t)(codes[i] + (b < v[i]));
    }
}

/* Blocks [b0, b1): absmax as bitsandbytes stores it, packed codes. */
static int nf4_units(void *arg, size_t b0, size_t b1, mp_error *err) {
    const nf4_job *j = arg;
    float v[QZ_NF4_BLOCKSIZE];
    uint8_t codes[QZ_NF4_BLOCKSIZE + 1];
    for (size_t b = b0; b < b1; b++) {
        size_t i0 = b * QZ_NF4_BLOCKSIZE;
        size_t len = j->n - i0 < QZ_NF4_BLOCKSIZE ? j->n - i0 : QZ_NF4_BLOCKSIZE;
        uint32_t mb = qz_absmax_bits(j->dt, j->src, i0, len);
        if (mb >= 0x7f800000u) {
            size_t i = qz_first_non_finite(j->dt, j->src, i0, len);
            return qz_err_non_finite(err, j->plan->parts[0].name, i, (size_t)j->plan->cols,
                                     qz_load(j->dt, j->src, i));
        }
        float m = scalar_bits_f32(mb);
        float am = m > 1e-38f ? m : 1e-38f;
        qz_load_run(j->dt, j->src, i0, len, v);
        if (b >= j->full) { /* the tail block divides and stores the clamped absmax */
            j->absmax[b] = am;
            for (size_t i = 0; i < len; i++)
                v[i] = clamp1(v[i] / am);
        } else {
            j->absmax[b] = m;
            float inv = 1.0f / am;
            for (size_t i = 0; i < len; i++)
                v[i] = clamp1(v[i] * inv);
        }
        nf4_codes(j->bounds, v, len, codes);
        codes[len] = nf4_code_of(j->bounds, 0.0f); /* the pad of an odd count */
        for (size_t i = 0; i < len; i += 2)
            j->packed[(i0 + i) / 2] = (uint8_t)(codes[i] << 4 | codes[i + 1]);
    }
    return 0;
}

/* quantize_4bit: packed nibbles and the float absmax of every block. */
static int nf4_quantize(const qz_params *p, const qz_plan *plan, mp_dtype dt, const void *src,
                        uint8_t *packed, float *absmax, mp_error *err) {
    nf4_job j = {.plan = plan, .dt = dt, .src = src, .packed = packed, .absmax = absmax};
    for (int k = 0; k < 15; k++)
        j.bounds[k] = (NF4_CODE[k] + NF4_CODE[k + 1]) / 2.0f;
    j.n = (size_t)(plan->rows * plan->cols);
    j.full = j.n / QZ_NF4_BLOCKSIZE;
    size_t nblocks = (j.n + QZ_NF4_BLOCKSIZE - 1) / QZ_NF4_BLOCKSIZE;
    return qz_parallel(p->threads, nblocks, nf4_units, &j, err);
}

/* ---- quantize_blockwise (dynamic map, C++ CPU kernel) ---- */

#define QZ_LUT_SIZE 65536

static void lut_build(const float *code, uint8_t *lut) {
    float mid[255];
    for (int i = 0; i < 255; i++)
        mid[i] = 0.5f * (code[i] + code[i + 1]);
    int c = 0;
    for (int i = 0; i < QZ_LUT_SIZE; i++) {
        float val = -1.0f + (2.0f * (float)i) / (float)(QZ_LUT_SIZE - 1);
        while (c < 255 && mid[c] < val)
            c++;
        lut[i] = (uint8_t)c;
    }
}

static uint16_t lut_index(float v) {
    v = clamp1(v);
    return (uint16_t)((v + 1.0f) * 0.5f * (float)(QZ_LUT_SIZE - 1) + 0.5f);
}

int qz_quantize_blockwise(const float *a, size_t n, size_t blocksize, uint8_t *out, float *absmax,
                          mp_error *err) {
    uint8_t *lut = malloc(QZ_LUT_SIZE);
    if (!lut) return mp_err(err, "out_of_memory", "quantize_blockwise: no memory for its table");
    lut_build(DYNAMIC_CODE, lut);
    for (size_t b = 0, i0 = 0; i0 < n; b++, i0 += blocksize) {
        size_t i1 = i0 + blocksize < n ? i0 + blocksize : n;
        float m = 0.0f;
        for (size_t i = i0; i < i1; i++)
            m = fabsf(a[i]) > m ? fabsf(a[i]) : m;
        absmax[b] = m;
        if (m == 0.0f) {
            memset(out + i0, 0, i1 - i0);
            continue;
        }
        float inv = 1.0f / m;
        for (size_t i = i0; i < i1; i++)
            out[i] = lut[lut_index(a[i] * inv)];
    }
    free(lut);
    return 0;
}

/* ---- torch's mean of a float32 vector ---- */

/* c10's CeilLog2 as SumKernel's multi_row_sum uses it. */
static int64_t ceil_log2(uint64_t x) {
    if (x <= 2) return 1;
    return 64 - __builtin_clzll(x - 1);
}

#define QZ_MAX_LANES 16

/* SumKernel.cpp's row_sum over `size` vectors of `lanes` floats (vector v at
 * a + v * lanes): 4 interleaved rows summed in up to 4 cascade levels of
 * 2^level_power vectors each, then the remaining vectors, then the rows. */
static void torch_row_sum(const float *a, size_t size, int lanes, float *out) {
    float acc[4][4][QZ_MAX_LANES] = {{{0}}};
    size_t size_ilp = size / 4;
    int64_t lp = ceil_log2(size_ilp) / 4;
    lp = lp > 4 ? lp : 4;
    size_t step = (size_t)1 << lp, mask = step - 1, i = 0;
    while (i + step <= size_ilp) {
        for (size_t j = 0; j < step; j++, i++)
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < lanes; l++)
                    acc[0][k][l] += a[(i * 4 + (size_t)k) * (size_t)lanes + (size_t)l];
        for (int j = 1; j < 4; j++) {
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < lanes; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if ((i & (mask << (j * lp))) != 0) break;
        }
    }
    for (; i < size_ilp; i++)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < lanes; l++)
                acc[0][k][l] += a[(i * 4 + (size_t)k) * (size_t)lanes + (size_t)l];
    for (int j = 1; j < 4; j++)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < lanes; l++)
                acc[0][k][l] += acc[j][k][l];
    for (size_t v = size_ilp * 4; v < size; v++)
        for (int l = 0; l < lanes; l++)
            acc[0][0][l] += a[v * (size_t)lanes + (size_t)l];
    for (int k = 1; k < 4; k++)
        for (int l = 0; l < lanes; l++)
            acc[0][0][l] += acc[0][k][l];
    memcpy(out, acc[0][0], (size_t)lanes * sizeof(float));
}

/* torch's vector width for float on this CPU: 16 lanes where its AVX512
 * kernels run, else 8 (AVX2; other CPUs are not what we reproduce). */
static int torch_float_lanes(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return 16;
#endif
    return 8;
}

/* One serial pass of torch's sum over a[0..n): the contiguous inner
 * reduction, vectorized when n holds a vector, else scalar. */
static float torch_sum_pass(const float *a, size_t n, int lanes) {
    float part[QZ_MAX_LANES], sum = 0.0f;
    if (n < (size_t)lanes) {
        torch_row_sum(a, n, 1, part); /* scalar_inner_sum */
        return part[0];
    }
    size_t nvec = n / (size_t)lanes;
    torch_row_sum(a, nvec, lanes, part); /* vectorized_inner_sum */
    for (size_t k = nvec * (size_t)lanes; k < n; k++)
        sum += a[k];
    for (int l = 0; l < lanes; l++)
        sum += part[l];
    return sum;
}

#define QZ_TORCH_GRAIN 32768 /* at::internal::GRAIN_SIZE */

float qz_mean_f32_threads(const float *a, size_t n, int threads) {
    if (n == 0) return 0.0f;
    int lanes = torch_float_lanes();
    if (threads > QZ_MAX_THREADS) threads = QZ_MAX_THREADS;
    /* The output, filled with 0, accumulates (+=) what the loop sums. */
    if (threads <= 1 || n < QZ_TORCH_GRAIN) return (0.0f + torch_sum_pass(a, n, lanes)) / (float)n;
    /* two_pass_reduction: a buffer of `threads` zeros; parallel_for splits
     * [0, n) into ceil(n / chunk) ranges of chunk = ceil(n / T), T = min(
     * threads, ceil(n / GRAIN)); range t adds into buffer[t]; then the
     * buffer is summed into the output by the same loop. */
    size_t t_used = (n + QZ_TORCH_GRAIN - 1) / QZ_TORCH_GRAIN;
    if (t_used > (size_t)threads) t_used = (size_t)threads;
    size_t chunk = (n + t_used - 1) / t_used;
    float buf[QZ_MAX_THREADS] = {0};
    for (size_t t = 0; t < t_used && t * chunk < n; t++) {
        size_t len = n - t * chunk < chunk ? n - t * chunk : chunk;
        buf[t] = 0.0f + torch_sum_pass(a + t * chunk, len, lanes);
    }
    return (0.0f + torch_sum_pass(buf, (size_t)threads, lanes)) / (float)n;
}

float qz_mean_f32(const float *a, size_t n) {
    return qz_mean_f32_threads(a, n, 1);
}

int qz_torch_default_threads(void) {
    const char *names[] = {"OMP_NUM_THREADS", "MKL_NUM_THREADS"};
    for (int i = 0; i < 2; i++) {
        const char *v = getenv(names[i]);
        long k = v ? strtol(v, NULL, 10) : 0;
        if (k > 0) return k > QZ_MAX_THREADS ? QZ_MAX_THREADS : (int)k;
    }
    /* Physical cores: distinct (package, core) pairs of the online CPUs. */
    long ids[1024];
    int n = 0;
    for (int cpu = 0; cpu < 1024; cpu++) {
        char path[128];
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/core_id", cpu);
        FILE *f = fopen(path, "r");
        if (!f) {
            if (cpu > 0) break;
            continue;
        }
        long core = -1, pkg = 0;
        if (fscanf(f, "%ld", &core) != 1) core = cpu;
        fclose(f);
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/physical_package_id",
                 cpu);
        if ((f = fopen(path, "r"))) {
            if (fscanf(f, "%ld", &pkg) != 1) pkg = 0;
            fclose(f);
        }
        long id = pkg * 65536 + core;
        bool seen = false;
        for (int k = 0; k < n && !seen; k++)
            seen = ids[k] == id;
        if (!seen) ids[n++] = id;
    }
    if (n < 1) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    return n > QZ_MAX_THREADS ? QZ_MAX_THREADS : n;
}

/* Parts: weight, absmax, quant_map, [nested_absmax, nested_quant_map,] state. */
int qz_nf4_run(const qz_params *p, const qz_plan *plan, mp_dtype dt, const void *src,
               void *const out[], mp_error *err) {
    size_t nblocks = (size_t)plan->parts[1].shape[0];
    float *absmax = p->double_quant ? malloc(nblocks * sizeof(float)) : out[1];
    if (!absmax)
        return mp_err(err, "out_of_memory", "%s: no memory for %zu block scales",
                      plan->parts[0].name, nblocks);
    int rc = nf4_quantize(p, plan, dt, src, out[0], absmax, err);
    memcpy(out[2], NF4_CODE, sizeof NF4_CODE);
    float offset = 0.0f;
    if (rc == 0 && p->double_quant) {
        offset = qz_mean_f32_threads(absmax, nblocks, p->torch_threads);
        for (size_t b = 0; b < nblocks; b++)
            absmax[b] -= offset;
        rc = qz_quantize_blockwise(absmax, nblocks, QZ_NESTED_BLOCKSIZE, out[1], out[3], err);
        memcpy(out[4], DYNAMIC_CODE, sizeof DYNAMIC_CODE);
    }
    if (p->double_quant) free(absmax);
    if (rc != 0) return -1;
    const qz_part *st = &plan->parts[plan->n - 1];
    uint64_t shape[2] = {plan->rows, plan->cols};
    if (qz_nf4_state_json(p, dt, shape, offset, out[plan->n - 1], (size_t)st->nbytes) < 0)
        return mp_err(err, "internal", "%s: quant_state does not fit its planned size",
                      plan->parts[0].name);
    return 0;
}

/* ---- LLM.int8 ---- */

/* x as Int8Params sees it: cast to float16 (round to nearest even), widened. */
static float int8_h(mp_dtype dt, const void *src, size_t i) {
    if (dt == MP_DT_F16) return qz_load(dt, src, i);
    return scalar_f16_to_f32(scalar_f32_to_f16(qz_load(dt, src, i)));
}

/* Parts: weight I8 [N, K], SCB F32 [N], weight_format U8 []. */
int qz_int8_run(const qz_plan *plan, mp_dtype dt, const void *src, void *const out[],
                mp_error *err) {
    int8_t *q = out[0];
    float *scb = out[1];
    size_t rows = (size_t)plan->rows, cols = (size_t)plan->cols;
    for (size_t r = 0; r < rows; r++) {
        float m = 0.0f;
        for (size_t c = 0; c < cols; c++) {
            float v = fabsf(int8_h(dt, src, r * cols + c));
            if (!(v <= 65504.0f)) {
                float x = qz_load(dt, src, r * cols + c);
                if (x == x && fabsf(x) <= 3.4028235e38f)
                    return mp_err(err, "non_finite_weight",
                                  "%s holds %g at [%zu, %zu], beyond float16's range: int8 "
                                  "quantization casts to float16 first (as bitsandbytes "
                                  "does), where it becomes Inf",
                                  plan->parts[0].name, (double)x, r, c);
                return qz_err_non_finite(err, plan->parts[0].name, r * cols + c, cols, x);
            }
            m = v > m ? v : m;
        }
        scb[r] = m;
        if (m == 0.0f) {
            memset(q + r * cols, 0, cols);
            continue;
        }
        float mul = (1.0f / m) * 127.0f;
        for (size_t c = 0; c < cols; c++)
            q[r * cols + c] = (int8_t)nearbyintf(int8_h(dt, src, r * cols + c) * mul);
    }
    *(uint8_t *)out[2] = 0; /* "row", the only layout bitsandbytes still loads */
    return 0;
}
