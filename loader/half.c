/*
 * half.c - float format conversions (see half.h). Bit manipulation instead of
 * _Float16 / __bf16 so that the results do not depend on the compiler or the
 * host FPU, and so that rounding is always to nearest, ties to even.
 */
#include "loader/half.h"

#include <math.h>
#include <string.h>

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float half_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13)); /* Inf, NaN payload */
    if (exp == 0) {
        /* Subnormal (or zero): man * 2^-24 is exact in f32. */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t half_f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {
        if (ax == 0x7f800000u) return sign | 0x7c00;
        /* NaN: keep the top payload bits, force quiet so it never becomes Inf. */
        return (uint16_t)(sign | 0x7e00 | ((ax >> 13) & 0x3ff));
    }
    if (ax >= 0x477ff000u) return sign | 0x7c00; /* >= 65520 rounds to Inf */
    if (ax < 0x38800000u) {                      /* below 2^-14: subnormal result */
        if (ax < 0x33000000u) return sign;       /* below 2^-25: rounds to zero */
        uint32_t e = ax >> 23;
        uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        unsigned shift = 126 - e; /* 14..24 */
        uint32_t h = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = (ax - 0x38000000u) >> 13; /* rebias 127 -> 15 */
    uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++; /* carry may reach Inf: correct */
    return (uint16_t)(sign | h);
}

float half_bf16_to_f32(uint16_t h) {
    return bits_f32((uint32_t)h << 16);
}

uint16_t half_f32_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040); /* quiet NaN */
    x += 0x7fffu + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

float half_fp8_e4m3_to_f32(uint8_t b) {
    unsigned e = (b >> 3) & 0xf, m = b & 7;
    float v;
    if (e == 0xf && m == 7) return (b & 0x80) ? -NAN : NAN;
    if (e == 0)
        v = ldexpf((float)m, -9); /* m/8 * 2^-6 */
    else
        v = ldexpf((float)(8 + m), (int)e - 10); /* (1+m/8) * 2^(e-7) */
    return (b & 0x80) ? -v : v;
}

float half_fp8_e5m2_to_f32(uint8_t b) {
    return half_f16_to_f32((uint16_t)((uint16_t)b << 8));
}

float half_fp8_e4m3fnuz_to_f32(uint8_t b) {
    unsigned e = (b >> 3) & 0xf, m = b & 7;
    float v;
    if (b == 0x80) return NAN;
    if (e == 0)
        v = ldexpf((float)m, -10); /* m/8 * 2^-7 */
    else
        v = ldexpf((float)(8 + m), (int)e - 11);
    return (b & 0x80) ? -v : v;
}

float half_fp8_e5m2fnuz_to_f32(uint8_t b) {
    unsigned e = (b >> 2) & 0x1f, m = b & 3;
    float v;
    if (b == 0x80) return NAN;
    if (e == 0)
        v = ldexpf((float)m, -17); /* m/4 * 2^-15 */
    else
        v = ldexpf((float)(4 + m), (int)e - 18);
    return (b & 0x80) ? -v : v;
}

float half_fp8_e8m0_to_f32(uint8_t b) {
    if (b == 0xff) return NAN;
    return ldexpf(1.0f, (int)b - 127);
}

void half_f16_to_f32_n(const void *src, float *dst, size_t n) {
    const unsigned char *p = src;
    for (size_t i = 0; i < n; i++) {
        uint16_t h = (uint16_t)(p[2 * i] | (p[2 * i + 1] << 8));
        dst[i] = half_f16_to_f32(h);
    }
}

void half_bf16_to_f32_n(const void *src, float *dst, size_t n) {
    const unsigned char *p = src;
    for (size_t i = 0; i < n; i++) {
        uint16_t h = (uint16_t)(p[2 * i] | (p[2 * i + 1] << 8));
        dst[i] = half_bf16_to_f32(h);
    }
}

void half_f32_to_f16_n(const float *src, void *dst, size_t n) {
    unsigned char *p = dst;
    for (size_t i = 0; i < n; i++) {
        uint16_t h = half_f32_to_f16(src[i]);
        p[2 * i] = (unsigned char)(h & 0xff);
        p[2 * i + 1] = (unsigned char)(h >> 8);
    }
}

void half_f32_to_bf16_n(const float *src, void *dst, size_t n) {
    unsigned char *p = dst;
    for (size_t i = 0; i < n; i++) {
        uint16_t h = half_f32_to_bf16(src[i]);
        p[2 * i] = (unsigned char)(h & 0xff);
        p[2 * i + 1] = (unsigned char)(h >> 8);
    }
}
