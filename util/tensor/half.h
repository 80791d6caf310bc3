/*
 * half.h - scalar float format conversions, out of line: IEEE binary16 and
 * bfloat16 both ways (round to nearest even, NaN and Inf kept), and the
 * 8-bit float formats of the reference's appendix (e4m3fn, e5m2, their fnuz
 * variants, e8m0) to f32. Whole buffers are cast by tensor_cast (cast.h).
 */
#ifndef MP_UTIL_TENSOR_HALF_H
#define MP_UTIL_TENSOR_HALF_H

#include <stddef.h>
#include <stdint.h>

float half_f16_to_f32(uint16_t h);
uint16_t half_f32_to_f16(float f);
float half_bf16_to_f32(uint16_t h);
uint16_t half_f32_to_bf16(float f);

float half_fp8_e4m3_to_f32(uint8_t b);     /* e4m3fn: no Inf, 0x7F/0xFF NaN */
float half_fp8_e5m2_to_f32(uint8_t b);     /* IEEE-like, top byte of an f16 */
float half_fp8_e4m3fnuz_to_f32(uint8_t b); /* bias 8, 0x80 is the only NaN */
float half_fp8_e5m2fnuz_to_f32(uint8_t b); /* bias 16, 0x80 is the only NaN */
float half_fp8_e8m0_to_f32(uint8_t b);     /* 2^(b-127), 0xFF NaN */

#endif
