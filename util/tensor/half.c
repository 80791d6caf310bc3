/*
 * half.c - float format conversions (see half.h). Bit manipulation instead of
 * _Float16 / __bf16 so that the results do not depend on the compiler or the
 * host FPU, and so that rounding is always to nearest, ties to even.
 */
#include "util/tensor/half.h"

#include "util/tensor/scalar.h"

#include <math.h>
#include <string.h>

/* The scalar conversions are written once, in util/tensor/scalar.h, so that the
 * CUDA kernels and every CPU path (convert, GGUF dequantization, the host
 * backend) produce the same bits. */
float half_f16_to_f32(uint16_t h) {
    return scalar_f16_to_f32(h);
}

uint16_t half_f32_to_f16(float f) {
    return scalar_f32_to_f16(f);
}

float half_bf16_to_f32(uint16_t h) {
    return scalar_bf16_to_f32(h);
}

uint16_t half_f32_to_bf16(float f) {
    return scalar_f32_to_bf16(f);
}

float half_fp8_e4m3_to_f32(uint8_t b) {
    return scalar_e4m3_to_f32(b);
}

float half_fp8_e5m2_to_f32(uint8_t b) {
    return scalar_e5m2_to_f32(b);
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
