/*
 * cast.h - the one CPU dtype cast: float formats (f32, f16, bf16, f64 and
 * the 8-bit floats) to f32, f16 or bf16, used by convert, warm_load and the
 * host GPU backend alike, so that a tensor cast anywhere on the CPU has the
 * bits the CUDA kernels give it.
 *
 * Every cast goes through f32: the source is widened exactly (f64 rounds
 * to nearest even, as torch does before narrowing to half), then narrowed
 * with round to nearest even. Inf stays Inf; a NaN stays a NaN with its
 * sign and top payload bits (quieted when narrowed), and f32 -> f32 or any
 * other same-dtype cast is a byte copy.
 */
#ifndef MP_UTIL_TENSOR_CAST_H
#define MP_UTIL_TENSOR_CAST_H

#include <stdbool.h>
#include <stddef.h>

#include "util/tensor/tensor.h"

/* Casts n elements of dtype `from` at src to dtype `to` at dst (both
 * little-endian, any alignment). Sources: F32 F16 BF16 F64 F8_E4M3 F8_E5M2
 * F8_E4M3FNUZ F8_E5M2FNUZ F8_E8M0; targets: F32 F16 BF16; from == to: any
 * dtype of whole bytes. src and dst may be the very same buffer when both
 * element sizes are equal, and must not overlap otherwise. Returns false,
 * writing nothing, for a pair it does not do. */
bool tensor_cast(mp_dtype from, const void *src, mp_dtype to, void *dst, size_t n);
/* Whether tensor_cast does the pair: the one answer planners ask, so that a
 * plan never holds a cast the CPU path cannot do. */
bool tensor_cast_supported(mp_dtype from, mp_dtype to);

#endif
