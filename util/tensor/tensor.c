/*
 * tensor.c - the dtype table (names as safetensors spells them, bit widths)
 * and overflow-checked shape arithmetic shared by every reader and writer.
 */
#include "util/tensor/tensor.h"

#include <stdlib.h>
#include <string.h>

static const struct {
    const char *name;
    unsigned bits;
    bool is_float;
} dtype_table[MP_DT_COUNT] = {
    [MP_DT_INVALID] = {"INVALID", 0, false},
    [MP_DT_BOOL] = {"BOOL", 8, false},
    [MP_DT_F4] = {"F4", 4, true},
    [MP_DT_F6_E2M3] = {"F6_E2M3", 6, true},
    [MP_DT_F6_E3M2] = {"F6_E3M2", 6, true},
    [MP_DT_U8] = {"U8", 8, false},
    [MP_DT_I8] = {"I8", 8, false},
    [MP_DT_F8_E5M2] = {"F8_E5M2", 8, true},
    [MP_DT_F8_E4M3] = {"F8_E4M3", 8, true},
    [MP_DT_F8_E8M0] = {"F8_E8M0", 8, true},
    [MP_DT_F8_E4M3FNUZ] = {"F8_E4M3FNUZ", 8, true},
    [MP_DT_F8_E5M2FNUZ] = {"F8_E5M2FNUZ", 8, true},
    [MP_DT_I16] = {"I16", 16, false},
    [MP_DT_U16] = {"U16", 16, false},
    [MP_DT_F16] = {"F16", 16, true},
    [MP_DT_BF16] = {"BF16", 16, true},
    [MP_DT_I32] = {"I32", 32, false},
    [MP_DT_U32] = {"U32", 32, false},
    [MP_DT_F32] = {"F32", 32, true},
    [MP_DT_C64] = {"C64", 64, true},
    [MP_DT_F64] = {"F64", 64, true},
    [MP_DT_I64] = {"I64", 64, false},
    [MP_DT_U64] = {"U64", 64, false},
    [MP_DT_GGML] = {"GGML", 0, false},
};

const char *mp_dtype_name(mp_dtype dt) {
    if ((unsigned)dt >= MP_DT_COUNT) return "INVALID";
    return dtype_table[dt].name;
}

mp_dtype mp_dtype_from_name(const char *s) {
    if (!s) return MP_DT_INVALID;
    /* GGML is ours, not a safetensors dtype: never accept it from a file. */
    for (int i = MP_DT_BOOL; i < MP_DT_GGML; i++)
        if (strcmp(s, dtype_table[i].name) == 0) return (mp_dtype)i;
    return MP_DT_INVALID;
}

unsigned mp_dtype_bits(mp_dtype dt) {
    if ((unsigned)dt >= MP_DT_COUNT) return 0;
    return dtype_table[dt].bits;
}

bool mp_dtype_is_float(mp_dtype dt) {
    if ((unsigned)dt >= MP_DT_COUNT) return false;
    return dtype_table[dt].is_float;
}

bool mp_shape_numel(const int64_t *shape, int ndim, uint64_t *out) {
    if (ndim < 0 || ndim > MP_MAX_DIMS) return false;
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) return false;
        if (__builtin_mul_overflow(n, shape[i], &n)) return false;
    }
    *out = (uint64_t)n;
    return true;
}

bool mp_tensor_bytes(mp_dtype dt, const int64_t *shape, int ndim, uint64_t *out) {
    unsigned bits = mp_dtype_bits(dt);
    uint64_t n, nbits;
    if (bits == 0) return false;
    if (!mp_shape_numel(shape, ndim, &n)) return false;
    if (__builtin_mul_overflow(n, (uint64_t)bits, &nbits)) return false;
    if (nbits % 8) return false;
    *out = nbits / 8;
    return true;
}

void mp_tensor_free_fields(mp_tensor *t) {
    if (!t) return;
    free(t->name);
    t->name = NULL;
}

void mp_tensor_set_contiguous(mp_tensor *t) {
    int64_t s = 1;
    bool ok = true;
    for (int i = t->ndim - 1; i >= 0; i--) {
        t->strides[i] = ok ? s : 0;
        if (ok && __builtin_mul_overflow(s, t->shape[i], &s)) ok = false;
    }
    t->storage_offset = 0;
    t->is_view = false;
}
