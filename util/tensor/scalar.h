/*
 * gpu_scalar.h - scalar float conversions and ggml block decoders written
 * once for both the host backend (C) and the CUDA kernels (kernels.cu), so
 * that the two produce identical bytes. Internal to gpu/.
 *
 * Identical bytes need identical float operations: every product and sum
 * here goes through GPU_FMUL/GPU_FADD/GPU_FSUB, which are __fmul_rn & co. on
 * the device (nvcc would otherwise contract a*b-c into one FMA, rounding
 * once instead of twice) and plain operators in C (-std=c11 turns GCC's
 * contraction off). The conversions are the bit-exact algorithms of
 * loader/half.c (round to nearest even, NaN kept quiet with its sign and
 * top payload bits); test_gpu_host checks they agree with it.
 */
#ifndef MP_GPU_GPU_SCALAR_H
#define MP_GPU_GPU_SCALAR_H

#include <stdint.h>
#include <string.h>

/* No FMA contraction in the C compiles either: a*b+c fused rounds once, not
 * twice, and host bytes would stop matching the device's. clang honours the
 * standard pragma (and contracts by default otherwise); gcc ignores it with a
 * -Wunknown-pragmas warning (an error under -Werror), but in ISO C mode
 * (-std=c11, our build) its default is -ffp-contract=off already. CUDA
 * compiles use __fmul_rn & co. below instead. */
#if defined(__clang__) && !defined(__CUDACC__)
#pragma STDC FP_CONTRACT OFF
#endif

#ifdef __CUDACC__
#define GPU_HD static inline __host__ __device__
#else
#define GPU_HD static inline
#endif

#ifdef __CUDA_ARCH__
#define GPU_FMUL(a, b) __fmul_rn((a), (b))
#define GPU_FADD(a, b) __fadd_rn((a), (b))
#define GPU_FSUB(a, b) __fsub_rn((a), (b))
#else
#define GPU_FMUL(a, b) ((a) * (b))
#define GPU_FADD(a, b) ((a) + (b))
#define GPU_FSUB(a, b) ((a) - (b))
#endif

GPU_HD uint32_t gpu_sc_f32_bits(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
#endif
}

GPU_HD float gpu_sc_bits_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

GPU_HD uint16_t gpu_sc_load_u16(const uint8_t *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}

GPU_HD float gpu_sc_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    /* A NaN widens quiet (bit 22 set), keeping its sign and payload: a
     * signalling one would trap or be quieted by whatever touches it next. */
    if (exp == 0x1f)
        return gpu_sc_bits_f32(sign | 0x7f800000u | (man << 13) | (man ? 0x00400000u : 0u));
    if (exp == 0) {
        /* man * 2^-24 is exact in f32. */
        float v = GPU_FMUL((float)man, 5.9604644775390625e-8f);
        return sign ? -v : v;
    }
    return gpu_sc_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

GPU_HD uint16_t gpu_sc_f32_to_f16(float f) {
    uint32_t x = gpu_sc_f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {
        if (ax == 0x7f800000u) return (uint16_t)(sign | 0x7c00);
        return (uint16_t)(sign | 0x7e00 | ((ax >> 13) & 0x3ff));
    }
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* >= 65520 rounds to Inf */
    if (ax < 0x38800000u) {                                  /* subnormal result */
        if (ax < 0x33000000u) return sign;                   /* below 2^-25: zero */
        uint32_t e = ax >> 23;
        uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        unsigned shift = 126 - e; /* 14..24 */
        uint32_t h = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = (ax - 0x38000000u) >> 13;
    uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++; /* a carry into Inf is right */
    return (uint16_t)(sign | h);
}

GPU_HD float gpu_sc_bf16_to_f32(uint16_t h) {
    return gpu_sc_bits_f32((uint32_t)h << 16);
}

GPU_HD uint16_t gpu_sc_f32_to_bf16(float f) {
    uint32_t x = gpu_sc_f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040); /* quiet NaN */
    x += 0x7fffu + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

/* e4m3fn: bias 7, no Inf, S.1111.111 is NaN. */
GPU_HD float gpu_sc_e4m3_to_f32(uint8_t b) {
    uint32_t sign = (uint32_t)(b & 0x80) << 24;
    uint32_t e = (b >> 3) & 0xf, m = b & 7;
    if (e == 0xf && m == 7) return gpu_sc_bits_f32(sign | 0x7fc00000u);
    if (e == 0) {
        float v = GPU_FMUL((float)m, 0.001953125f); /* m/8 * 2^-6, exact */
        return sign ? -v : v;
    }
    return gpu_sc_bits_f32(sign | ((e + 120) << 23) | (m << 20));
}

/* e5m2: the top byte of an IEEE half. */
GPU_HD float gpu_sc_e5m2_to_f32(uint8_t b) {
    return gpu_sc_f16_to_f32((uint16_t)((uint16_t)b << 8));
}

/* ---- ggml blocks: element j of one block starting at blk ---- */

enum {
    GPU_GGML_Q4_0 = 2,
    GPU_GGML_Q4_1 = 3,
    GPU_GGML_Q5_0 = 6,
    GPU_GGML_Q5_1 = 7,
    GPU_GGML_Q8_0 = 8,
    GPU_GGML_Q2_K = 10,
    GPU_GGML_Q3_K = 11,
    GPU_GGML_Q4_K = 12,
    GPU_GGML_Q5_K = 13,
    GPU_GGML_Q6_K = 14,
};

/* Elements and bytes per block of the types gpu_sc_dequant knows; 0 else. */
GPU_HD unsigned gpu_sc_block_elems(int t) {
    switch (t) {
    case GPU_GGML_Q4_0:
    case GPU_GGML_Q4_1:
    case GPU_GGML_Q5_0:
    case GPU_GGML_Q5_1:
    case GPU_GGML_Q8_0:
        return 32;
    case GPU_GGML_Q2_K:
    case GPU_GGML_Q3_K:
    case GPU_GGML_Q4_K:
    case GPU_GGML_Q5_K:
    case GPU_GGML_Q6_K:
        return 256;
    default:
        return 0;
    }
}

GPU_HD unsigned gpu_sc_block_bytes(int t) {
    switch (t) {
    case GPU_GGML_Q4_0:
        return 18;
    case GPU_GGML_Q4_1:
        return 20;
    case GPU_GGML_Q5_0:
        return 22;
    case GPU_GGML_Q5_1:
        return 24;
    case GPU_GGML_Q8_0:
        return 34;
    case GPU_GGML_Q2_K:
        return 84;
    case GPU_GGML_Q3_K:
        return 110;
    case GPU_GGML_Q4_K:
        return 144;
    case GPU_GGML_Q5_K:
        return 176;
    case GPU_GGML_Q6_K:
        return 210;
    default:
        return 0;
    }
}

/* Q4_K's 6-bit (scale, min) pair k of scales[12]. */
GPU_HD void gpu_sc_q4k_scale_min(const uint8_t *s, unsigned k, unsigned *sc, unsigned *mn) {
    if (k < 4) {
        *sc = s[k] & 63;
        *mn = s[k + 4] & 63;
    } else {
        *sc = (s[k + 4] & 15) | ((s[k - 4] >> 6) << 4);
        *mn = (s[k + 4] >> 4) | ((s[k] >> 6) << 4);
    }
}

/* The float ggml's dequantize_row_<t> writes for element j of block blk, in
 * the same operation order. t must be one gpu_sc_block_elems knows. */
GPU_HD float gpu_sc_dequant(int t, const uint8_t *blk, unsigned j) {
    switch (t) {
    case GPU_GGML_Q4_0: {
        float d = gpu_sc_f16_to_f32(gpu_sc_load_u16(blk));
        uint8_t q = blk[2 + (j & 15)];
        int x = (j < 16 ? (q & 15) : (q >> 4)) - 8;
        return GPU_FMUL((float)x, d);
    }
    case GPU_GGML_Q4_1: {
        float d = gpu_sc_f16_to_f32(gpu_sc_load_u16(blk));
        float m = gpu_sc_f16_to_f32(gpu_sc_load_u16(blk + 2));
        uint8_t q = blk[4 + (j & 15)];
        int x = j < 16 ? (q & 15) : (q >> 4);
        return GPU_FADD(GPU_FMUL((float)x, d), m);
    }
    case GPU_GGML_Q5_0:
    case GPU_GGML_Q5_1: {
        int q51 = t == GPU_GGML_Q5_1;
        float d = gpu_sc_f16_to_f32(gpu_sc_load_u16(blk));
        const uint8_t *p = blk + (q51 ? 4 : 2);
        uint32_t qh = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
                      ((uint32_t)p[3] << 24);
        uint8_t q = p[4 + (j & 15)];
        int x = (j < 16 ? (q & 15) : (q >> 4)) | (int)(((qh >> j) & 1) << 4);
        if (!q51) return GPU_FMUL((float)(x - 16), d);
        float m = gpu_sc_f16_to_f32(gpu_sc_load_u16(blk + 2));
        return GPU_FADD(GPU_FMUL((float)x, d), m);
    }
    case GPU_GGML_Q8_0: {
        float d = gpu_sc_f16_to_f32(gpu_sc_load_u16(blk));
        return GPU_FMUL((float)(int8_t)blk[2 + j], d);
    }
    case GPU_GGML_Q2_K:
    case GPU_GGML_Q3_K: {
        /* Two halves of 128; in each, 4 shifts x two 16-element groups, each
         * group with its own scale; hmask (Q3_K) is indexed like q without
         * the half's offset. */
        unsigned h = j / 128, r = j % 128, jj = r / 32, w = r % 32, second = w >= 16;
        unsigned is = 8 * h + 2 * jj + second, lq = (w % 16) + 16 * second;
        if (t == GPU_GGML_Q2_K) {
            float d = gpu_sc_f16_to_f32(gpu_sc_load_u16(blk + 80));
            float dmin = gpu_sc_f16_to_f32(gpu_sc_load_u16(blk + 82));
            uint8_t sc = blk[is];
            float dl = GPU_FMUL(d, (float)(sc & 15u));
            float ml = GPU_FMUL(dmin, (float)(sc >> 4));
            unsigned q = (blk[16 + 32 * h + lq] >> (2 * jj)) & 3u;
            return GPU_FSUB(GPU_FMUL(dl, (float)q), ml);
        }
        const uint8_t *sb = blk + 96;
        float d = gpu_sc_f16_to_f32(gpu_sc_load_u16(blk + 108));
        int low = is < 8 ? (sb[is] & 15) : (sb[is - 8] >> 4);
        int high = (sb[8 + is % 4] >> (2 * (is / 4))) & 3;
        float dl = GPU_FMUL(d, (float)((low | high << 4) - 32));
        int q = (int)((blk[32 + 32 * h + lq] >> (2 * jj)) & 3u) -
                ((blk[lq] & (1u << (4 * h + jj))) ? 0 : 4);
        return GPU_FMUL(dl, (float)q);
    }
    case GPU_GGML_Q4_K: {
        float d = gpu_sc_f16_to_f32(gpu_sc_load_u16(blk));
        float dmin = gpu_sc_f16_to_f32(gpu_sc_load_u16(blk + 2));
        unsigned c = j / 64, w = j % 64, l = w % 32;
        unsigned k = 2 * c + (w >= 32), sc, mn;
        gpu_sc_q4k_scale_min(blk + 4, k, &sc, &mn);
        uint8_t q = blk[16 + 32 * c + l];
        unsigned x = w < 32 ? (q & 15u) : (q >> 4);
        float d1 = GPU_FMUL(d, (float)sc);
        float m1 = GPU_FMUL(dmin, (float)mn);
        return GPU_FSUB(GPU_FMUL(d1, (float)x), m1);
    }
    case GPU_GGML_Q5_K: {
        float d = gpu_sc_f16_to_f32(gpu_sc_load_u16(blk));
        float dmin = gpu_sc_f16_to_f32(gpu_sc_load_u16(blk + 2));
        unsigned c = j / 64, w = j % 64, l = w % 32;
        unsigned k = 2 * c + (w >= 32), sc, mn;
        gpu_sc_q4k_scale_min(blk + 4, k, &sc, &mn);
        uint8_t q = blk[48 + 32 * c + l], qh = blk[16 + l];
        unsigned x = w < 32 ? (q & 15u) + ((qh & (1u << (2 * c))) ? 16u : 0u)
                            : (unsigned)(q >> 4) + ((qh & (2u << (2 * c))) ? 16u : 0u);
        float d1 = GPU_FMUL(d, (float)sc);
        float m1 = GPU_FMUL(dmin, (float)mn);
        return GPU_FSUB(GPU_FMUL(d1, (float)x), m1);
    }
    case GPU_GGML_Q6_K: {
        float d = gpu_sc_f16_to_f32(gpu_sc_load_u16(blk + 208));
        unsigned h = j / 128, r = j % 128, quarter = r / 32, l = r % 32, is = l / 16;
        const uint8_t *ql = blk + 64 * h;
        const uint8_t *qh = blk + 128 + 32 * h;
        const int8_t *sc = (const int8_t *)(blk + 192 + 8 * h);
        unsigned lo = (quarter & 1) ? ql[l + 32] : ql[l];
        lo = quarter < 2 ? (lo & 15u) : (lo >> 4);
        int x = (int)(lo | (((qh[l] >> (2 * quarter)) & 3u) << 4)) - 32;
        return GPU_FMUL(GPU_FMUL(d, (float)sc[is + 2 * quarter]), (float)x);
    }
    default:
        return 0.0f;
    }
}

#endif
