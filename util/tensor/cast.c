/*
 * cast.c - tensor_cast (see cast.h): a chunk of the source widened to f32,
 * then narrowed to the target, with the scalar conversions that the CUDA
 * kernels share (scalar.h) for every format they also know.
 */
#include "util/tensor/cast.h"

#include <stdint.h>
#include <string.h>

#include "util/tensor/half.h"
#include "util/tensor/scalar.h"

/* f32 staging per chunk: small enough for the stack, large enough that the
 * per-chunk switches cost nothing. */
#define CAST_CHUNK 1024

static bool cast_source(mp_dtype d) {
    switch (d) {
    case MP_DT_F32:
    case MP_DT_F16:
    case MP_DT_BF16:
    case MP_DT_F64:
    case MP_DT_F8_E4M3:
    case MP_DT_F8_E5M2:
    case MP_DT_F8_E4M3FNUZ:
    case MP_DT_F8_E5M2FNUZ:
    case MP_DT_F8_E8M0:
        return true;
    default:
        return false;
    }
}

/* k elements of d at s to f32. Each case is its own loop so that the
 * conversion inlines into it. */
static void widen(mp_dtype d, const unsigned char *s, size_t k, float *f) {
    switch (d) {
    case MP_DT_F32:
        memcpy(f, s, k * 4); /* bits as they are: NaN payloads included */
        break;
    case MP_DT_F16:
        for (size_t i = 0; i < k; i++)
            f[i] = scalar_f16_to_f32(scalar_load_u16(s + 2 * i));
        break;
    case MP_DT_BF16:
        for (size_t i = 0; i < k; i++)
            f[i] = scalar_bf16_to_f32(scalar_load_u16(s + 2 * i));
        break;
    case MP_DT_F64:
        for (size_t i = 0; i < k; i++) {
            double v;
            memcpy(&v, s + 8 * i, 8);
            f[i] = (float)v;
        }
        break;
    case MP_DT_F8_E4M3:
        for (size_t i = 0; i < k; i++)
            f[i] = scalar_e4m3_to_f32(s[i]);
        break;
    case MP_DT_F8_E5M2:
        for (size_t i = 0; i < k; i++)
            f[i] = scalar_e5m2_to_f32(s[i]);
        break;
    case MP_DT_F8_E4M3FNUZ:
        for (size_t i = 0; i < k; i++)
            f[i] = half_fp8_e4m3fnuz_to_f32(s[i]);
        break;
    case MP_DT_F8_E5M2FNUZ:
        for (size_t i = 0; i < k; i++)
            f[i] = half_fp8_e5m2fnuz_to_f32(s[i]);
        break;
    default: /* MP_DT_F8_E8M0; cast_source has checked */
        for (size_t i = 0; i < k; i++)
            f[i] = half_fp8_e8m0_to_f32(s[i]);
        break;
    }
}

/* k f32 values to d (F32, F16 or BF16) at o, little-endian. */
static void narrow(mp_dtype d, const float *f, size_t k, unsigned char *o) {
    switch (d) {
    case MP_DT_F32:
        memcpy(o, f, k * 4);
        break;
    case MP_DT_F16:
        for (size_t i = 0; i < k; i++) {
            uint16_t h = scalar_f32_to_f16(f[i]);
            o[2 * i] = (unsigned char)(h & 0xff);
            o[2 * i + 1] = (unsigned char)(h >> 8);
        }
        break;
    default: /* MP_DT_BF16 */
        for (size_t i = 0; i < k; i++) {
            uint16_t h = scalar_f32_to_bf16(f[i]);
            o[2 * i] = (unsigned char)(h & 0xff);
            o[2 * i + 1] = (unsigned char)(h >> 8);
        }
        break;
    }
}

bool tensor_cast_supported(mp_dtype from, mp_dtype to) {
    if (from == to) {
        unsigned fb = mp_dtype_bits(from);
        return fb != 0 && fb % 8 == 0;
    }
    return cast_source(from) && (to == MP_DT_F32 || to == MP_DT_F16 || to == MP_DT_BF16);
}

bool tensor_cast(mp_dtype from, const void *src, mp_dtype to, void *dst, size_t n) {
    if (!tensor_cast_supported(from, to)) return false;
    unsigned fb = mp_dtype_bits(from), tb = mp_dtype_bits(to);
    if (from == to) {
        if (dst != src && n) memmove(dst, src, n * (fb / 8));
        return true;
    }
    const unsigned char *s = src;
    unsigned char *d = dst;
    size_t fs = fb / 8, ts = tb / 8;
    float tmp[CAST_CHUNK];
    /* A whole chunk is read before any of it is written: in place is safe
     * when fs == ts. */
    for (size_t i = 0; i < n; i += CAST_CHUNK) {
        size_t k = n - i < CAST_CHUNK ? n - i : CAST_CHUNK;
        widen(from, s + i * fs, k, tmp);
        narrow(to, tmp, k, d + i * ts);
    }
    return true;
}
