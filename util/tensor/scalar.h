/*
 * scalar.h - scalar float conversions written once for C and for the CUDA
 * kernels (gpu/kernels.cu), so that every CPU path (half.c, the casts, GGUF
 * dequantization, the host backend) and the device produce identical bytes:
 * IEEE binary16 and bfloat16 both ways (round to nearest even, NaN kept
 * quiet with its sign and top payload bits), e4m3fn and e5m2 to f32. The
 * ggml block decoders built on them are in ggml_blocks.h.
 *
 * Identical bytes need identical float operations: every product and sum
 * here and in ggml_blocks.h goes through SCALAR_FMUL/SCALAR_FADD/SCALAR_FSUB, which
 * are __fmul_rn & co. on the device (nvcc would otherwise contract a*b-c
 * into one FMA, rounding once instead of twice) and plain operators in C.
 * A C compiler must not contract them either: GCC does not under -std=c11,
 * clang does unless told so by the pragma below, which holds for the rest
 * of every file that includes this one. test_gpu_host checks that the
 * device code's host twin agrees with half.c and gguf_dequant.c.
 */
#ifndef MP_UTIL_TENSOR_SCALAR_H
#define MP_UTIL_TENSOR_SCALAR_H

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
#define SCALAR_HD static inline __host__ __device__
#else
#define SCALAR_HD static inline
#endif

#ifdef __CUDA_ARCH__
#define SCALAR_FMUL(a, b) __fmul_rn((a), (b))
#define SCALAR_FADD(a, b) __fadd_rn((a), (b))
#define SCALAR_FSUB(a, b) __fsub_rn((a), (b))
#else
#define SCALAR_FMUL(a, b) ((a) * (b))
#define SCALAR_FADD(a, b) ((a) + (b))
#define SCALAR_FSUB(a, b) ((a) - (b))
#endif

SCALAR_HD uint32_t scalar_f32_bits(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
#endif
}

SCALAR_HD float scalar_bits_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

SCALAR_HD uint16_t scalar_load_u16(const uint8_t *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}

SCALAR_HD float scalar_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    /* A NaN widens quiet (bit 22 set), keeping its sign and payload: a
     * signalling one would trap or be quieted by whatever touches it next. */
    if (exp == 0x1f)
        return scalar_bits_f32(sign | 0x7f800000u | (man << 13) | (man ? 0x00400000u : 0u));
    if (exp == 0) {
        /* man * 2^-24 is exact in f32. */
        float v = SCALAR_FMUL((float)man, 5.9604644775390625e-8f);
        return sign ? -v : v;
    }
    return scalar_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

SCALAR_HD uint16_t scalar_f32_to_f16(float f) {
    uint32_t x = scalar_f32_bits(f);
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

SCALAR_HD float scalar_bf16_to_f32(uint16_t h) {
    return scalar_bits_f32((uint32_t)h << 16);
}

SCALAR_HD uint16_t scalar_f32_to_bf16(float f) {
    uint32_t x = scalar_f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040); /* quiet NaN */
    x += 0x7fffu + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

/* e4m3fn: bias 7, no Inf, S.1111.111 is NaN. */
SCALAR_HD float scalar_e4m3_to_f32(uint8_t b) {
    uint32_t sign = (uint32_t)(b & 0x80) << 24;
    uint32_t e = (b >> 3) & 0xf, m = b & 7;
    if (e == 0xf && m == 7) return scalar_bits_f32(sign | 0x7fc00000u);
    if (e == 0) {
        float v = SCALAR_FMUL((float)m, 0.001953125f); /* m/8 * 2^-6, exact */
        return sign ? -v : v;
    }
    return scalar_bits_f32(sign | ((e + 120) << 23) | (m << 20));
}

/* e5m2: the top byte of an IEEE half. */
SCALAR_HD float scalar_e5m2_to_f32(uint8_t b) {
    return scalar_f16_to_f32((uint16_t)((uint16_t)b << 8));
}

#endif
