/*
 * qz_internal.h - what the quantize files share and nobody else needs: the
 * source element loader (F32/F16/BF16 to float, exactly as torch's .float())
 * and the per-method kernels behind qz_quantize.
 */
#ifndef MP_LOADER_QUANTIZE_INTERNAL_H
#define MP_LOADER_QUANTIZE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "loader/quantize/quantize.h"
#include "util/tensor/scalar.h"

/* Element i of a row-major F32/F16/BF16 buffer, widened to float (exact). */
static inline float qz_load(mp_dtype dt, const void *src, size_t i) {
    const uint8_t *b = (const uint8_t *)src;
    if (dt == MP_DT_BF16) return scalar_bf16_to_f32(scalar_load_u16(b + 2 * i));
    if (dt == MP_DT_F16) return scalar_f16_to_f32(scalar_load_u16(b + 2 * i));
    float f;
    memcpy(&f, b + 4 * i, 4);
    return f;
}

/* Work on units [u0, u1) of a kernel; 0, or -1 with err set. */
typedef int (*qz_unit_fn)(void *arg, size_t u0, size_t u1, mp_error *err);
#define QZ_MAX_THREADS 64
/* Runs fn over [0, n) split between up to `threads` threads (qz_par.c). */
int qz_parallel(int threads, size_t n, qz_unit_fn fn, void *arg, mp_error *err);

/* Row i0..i0+n of a source as floats into dst (exact widening). */
void qz_load_run(mp_dtype dt, const void *src, size_t i0, size_t n, float *dst);
/* max |x| over n source elements as float bits (an integer max: for finite
 * floats the order of |x|'s bits is the order of |x|); a result at or above
 * 0x7f800000 means a NaN or an Inf is among them. */
uint32_t qz_absmax_bits(mp_dtype dt, const void *src, size_t i0, size_t n);
/* The index of the first NaN/Inf among n source elements from i0. */
size_t qz_first_non_finite(mp_dtype dt, const void *src, size_t i0, size_t n);

/* Sets "non_finite_weight" for element i of tensor `name` ([rows, cols]). */
int qz_err_non_finite(mp_error *err, const char *name, size_t i, size_t cols, float v);

/* qz_fp8.c: out[0] the e4m3 codes, out[1] the F32 scales. */
int qz_fp8_run(const qz_params *p, const qz_plan *plan, mp_dtype dt, const void *src,
               void *const out[], mp_error *err);
/* qz_bnb.c: the NF4 parts in plan order, and LLM.int8's. */
int qz_nf4_run(const qz_params *p, const qz_plan *plan, mp_dtype dt, const void *src,
               void *const out[], mp_error *err);
int qz_int8_run(const qz_plan *plan, mp_dtype dt, const void *src, void *const out[],
                mp_error *err);
/* The quant_state JSON of an NF4 part list (qz_names.c), padded with spaces
 * to exactly `len` bytes; len 0 asks for the size to plan (the longest an
 * offset can print). Returns the length, or -1 when it does not fit. */
long qz_nf4_state_json(const qz_params *p, mp_dtype dt, const uint64_t shape[2], float offset,
                       char *buf, size_t len);

#endif
