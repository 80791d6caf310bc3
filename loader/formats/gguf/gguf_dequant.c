/*
 * gguf_dequant.c - ggml block types to f32 / f16 / bf16.
 *
 * Each dequantize_* follows ggml's dequantize_row_* (ggml-quants.c, layouts
 * in reference §3.5-3.6) operation for operation, so that results are
 * bit-identical to ggml and to gguf-py's numpy port: products are formed in
 * the same order in f32, one rounding per operation, never fused.
 */
#include "loader/formats/gguf/gguf.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "util/tensor/half.h"

#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

#define QK_K 256

static inline float f16at(const uint8_t *p) {
    return half_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
}

static inline float f32at(const uint8_t *p) {
    uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float mul(float a, float b) {
    return a * b;
}

static void dq_q4_0(const uint8_t *b, float *y) {
    float d = f16at(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = mul((float)((qs[j] & 0x0f) - 8), d);
        y[j + 16] = mul((float)((qs[j] >> 4) - 8), d);
    }
}

static void dq_q4_1(const uint8_t *b, float *y) {
    float d = f16at(b), m = f16at(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) {
        y[j] = mul((float)(qs[j] & 0x0f), d) + m;
        y[j + 16] = mul((float)(qs[j] >> 4), d) + m;
    }
}

static uint32_t u32at(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void dq_q5_0(const uint8_t *b, float *y) {
    float d = f16at(b);
    uint32_t qh = u32at(b + 2);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        int x0 = (int)((qs[j] & 0x0f) | ((qh >> j) & 1) << 4) - 16;
        int x1 = (int)((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4) - 16;
        y[j] = mul((float)x0, d);
        y[j + 16] = mul((float)x1, d);
    }
}

static void dq_q5_1(const uint8_t *b, float *y) {
    float d = f16at(b), m = f16at(b + 2);
    uint32_t qh = u32at(b + 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < 16; j++) {
        int x0 = (int)((qs[j] & 0x0f) | ((qh >> j) & 1) << 4);
        int x1 = (int)((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4);
        y[j] = mul((float)x0, d) + m;
        y[j + 16] = mul((float)x1, d) + m;
    }
}

static void dq_q8_0(const uint8_t *b, float *y) {
    float d = f16at(b);
    for (int j = 0; j < 32; j++)
        y[j] = mul((float)(int8_t)b[2 + j], d);
}

static void dq_q2_k(const uint8_t *b, float *y) {
    const uint8_t *scales = b, *q = b + 16;
    float d = f16at(b + 80), dmin = f16at(b + 82);
    int is = 0;
    for (int h = 0; h < 2; h++, q += 32) {
        for (int j = 0; j < 4; j++) {
            int shift = 2 * j;
            for (int half = 0; half < 2; half++) {
                uint8_t sc = scales[is++];
                float dl = mul(d, (float)(sc & 0xf)), ml = mul(dmin, (float)(sc >> 4));
                for (int l = 0; l < 16; l++)
                    *y++ = mul(dl, (float)((q[l + 16 * half] >> shift) & 3)) - ml;
            }
        }
    }
}

static void dq_q3_k(const uint8_t *b, float *y) {
    const uint8_t *hm = b, *q = b + 32, *sb = b + 96;
    float d_all = f16at(b + 108);
    int8_t s[16];
    for (int i = 0; i < 16; i++) {
        int low = i < 8 ? (sb[i] & 15) : (sb[i - 8] >> 4);
        int high = (sb[8 + i % 4] >> (2 * (i / 4))) & 3;
        s[i] = (int8_t)((low | high << 4) - 32);
    }
    int is = 0;
    uint8_t m = 1;
    for (int h = 0; h < 2; h++, q += 32) {
        for (int j = 0; j < 4; j++, m <<= 1) {
            int shift = 2 * j;
            for (int half = 0; half < 2; half++) {
                float dl = mul(d_all, (float)s[is++]);
                for (int l = 16 * half; l < 16 * half + 16; l++) {
                    int v = ((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4);
                    *y++ = mul(dl, (float)v);
                }
            }
        }
    }
}

static void k_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4));
        *mn = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

static void dq_q4_k(const uint8_t *b, float *y) {
    float d = f16at(b), dmin = f16at(b + 2);
    const uint8_t *scales = b + 4, *q = b + 16;
    for (int c = 0; c < 4; c++, q += 32) {
        uint8_t sc, mn;
        k_scale_min(2 * c, scales, &sc, &mn);
        float d1 = mul(d, (float)sc), m1 = mul(dmin, (float)mn);
        k_scale_min(2 * c + 1, scales, &sc, &mn);
        float d2 = mul(d, (float)sc), m2 = mul(dmin, (float)mn);
        for (int l = 0; l < 32; l++)
            *y++ = mul(d1, (float)(q[l] & 0xf)) - m1;
        for (int l = 0; l < 32; l++)
            *y++ = mul(d2, (float)(q[l] >> 4)) - m2;
    }
}

static void dq_q5_k(const uint8_t *b, float *y) {
    float d = f16at(b), dmin = f16at(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *ql = b + 48;
    uint8_t u1 = 1, u2 = 2;
    for (int c = 0; c < 4; c++, ql += 32, u1 <<= 2, u2 <<= 2) {
        uint8_t sc, mn;
        k_scale_min(2 * c, scales, &sc, &mn);
        float d1 = mul(d, (float)sc), m1 = mul(dmin, (float)mn);
        k_scale_min(2 * c + 1, scales, &sc, &mn);
        float d2 = mul(d, (float)sc), m2 = mul(dmin, (float)mn);
        for (int l = 0; l < 32; l++)
            *y++ = mul(d1, (float)((ql[l] & 0xf) + ((qh[l] & u1) ? 16 : 0))) - m1;
        for (int l = 0; l < 32; l++)
            *y++ = mul(d2, (float)((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0))) - m2;
    }
}

static void dq_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = f16at(b + 208);
    for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8, y += 128) {
        for (int l = 0; l < 32; l++) {
            int is = l / 16;
            int q1 = (int)((ql[l] & 0xf) | ((qh[l] >> 0) & 3) << 4) - 32;
            int q2 = (int)((ql[l + 32] & 0xf) | ((qh[l] >> 2) & 3) << 4) - 32;
            int q3 = (int)((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
            int q4 = (int)((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
            y[l] = mul(mul(d, (float)sc[is + 0]), (float)q1);
            y[l + 32] = mul(mul(d, (float)sc[is + 2]), (float)q2);
            y[l + 64] = mul(mul(d, (float)sc[is + 4]), (float)q3);
            y[l + 96] = mul(mul(d, (float)sc[is + 6]), (float)q4);
        }
    }
}

static void dq_q8_k(const uint8_t *b, float *y) {
    float d = f32at(b);
    for (int j = 0; j < QK_K; j++)
        y[j] = mul(d, (float)(int8_t)b[4 + j]);
}

static const int8_t KV_IQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                    1,    13,   25,  38,  53,  69,  89,  113};
static const int8_t KV_FP4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static void dq_iq4_nl(const uint8_t *b, float *y) {
    float d = f16at(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = mul(d, (float)KV_IQ4NL[qs[j] & 0xf]);
        y[j + 16] = mul(d, (float)KV_IQ4NL[qs[j] >> 4]);
    }
}

static void dq_iq4_xs(const uint8_t *b, float *y) {
    float d = f16at(b);
    unsigned scales_h = (unsigned)(b[2] | b[3] << 8);
    const uint8_t *scales_l = b + 4, *qs = b + 8;
    for (int ib = 0; ib < 8; ib++, qs += 16, y += 32) {
        int ls = ((scales_l[ib / 2] >> 4 * (ib % 2)) & 0xf) | (((scales_h >> 2 * ib) & 3) << 4);
        float dl = mul(d, (float)(ls - 32));
        for (int j = 0; j < 16; j++) {
            y[j] = mul(dl, (float)KV_IQ4NL[qs[j] & 0xf]);
            y[j + 16] = mul(dl, (float)KV_IQ4NL[qs[j] >> 4]);
        }
    }
}

static void dq_tq1_0(const uint8_t *b, float *y) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    const uint8_t *qs = b, *qh = b + 48;
    float d = f16at(b + 52);
    for (int n = 0; n < 5; n++)
        for (int m = 0; m < 32; m++) {
            uint8_t q = (uint8_t)(qs[m] * pow3[n]);
            int xi = ((uint16_t)q * 3) >> 8;
            *y++ = mul((float)(xi - 1), d);
        }
    for (int n = 0; n < 5; n++)
        for (int m = 0; m < 16; m++) {
            uint8_t q = (uint8_t)(qs[32 + m] * pow3[n]);
            int xi = ((uint16_t)q * 3) >> 8;
            *y++ = mul((float)(xi - 1), d);
        }
    for (int n = 0; n < 4; n++)
        for (int j = 0; j < 4; j++) {
            uint8_t q = (uint8_t)(qh[j] * pow3[n]);
            int xi = ((uint16_t)q * 3) >> 8;
            *y++ = mul((float)(xi - 1), d);
        }
}

static void dq_tq2_0(const uint8_t *b, float *y) {
    float d = f16at(b + 64);
    for (int j = 0; j < 64; j += 32)
        for (int l = 0; l < 4; l++)
            for (int m = 0; m < 32; m++)
                *y++ = mul((float)(((b[j + m] >> (2 * l)) & 3) - 1), d);
}

/* ggml's GGML_E8M0_TO_FP32_HALF: 2^(e-128), exact including e = 0, 1. */
static float e8m0_half(uint8_t e) {
    uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void dq_mxfp4(const uint8_t *b, float *y) {
    float d = e8m0_half(b[0]);
    const uint8_t *qs = b + 1;
    for (int j = 0; j < 16; j++) {
        y[j] = mul(d, (float)KV_FP4[qs[j] & 0xf]);
        y[j + 16] = mul(d, (float)KV_FP4[qs[j] >> 4]);
    }
}

/* UE4M3 block scale, halved because KV_FP4 holds doubled E2M1 values. */
static float ue4m3_half(uint8_t x) {
    if (x == 0 || x == 0x7f) return 0.0f;
    int e = (x >> 3) & 0xf, m = x & 7;
    float raw = e == 0 ? (float)m * 0x1p-9f : (1.0f + (float)m / 8.0f) * ldexpf(1.0f, e - 7);
    return raw * 0.5f;
}

static void dq_nvfp4(const uint8_t *b, float *y) {
    const uint8_t *qs = b + 4;
    for (int s = 0; s < 4; s++, y += 16) {
        float d = ue4m3_half(b[s]);
        for (int j = 0; j < 8; j++) {
            y[j] = mul(d, (float)KV_FP4[qs[8 * s + j] & 0xf]);
            y[j + 8] = mul(d, (float)KV_FP4[qs[8 * s + j] >> 4]);
        }
    }
}

typedef void (*dq_block_fn)(const uint8_t *b, float *y);

static dq_block_fn block_fn(int t) {
    switch (t) {
    case GGUF_T_Q4_0:
        return dq_q4_0;
    case GGUF_T_Q4_1:
        return dq_q4_1;
    case GGUF_T_Q5_0:
        return dq_q5_0;
    case GGUF_T_Q5_1:
        return dq_q5_1;
    case GGUF_T_Q8_0:
        return dq_q8_0;
    case GGUF_T_Q2_K:
        return dq_q2_k;
    case GGUF_T_Q3_K:
        return dq_q3_k;
    case GGUF_T_Q4_K:
        return dq_q4_k;
    case GGUF_T_Q5_K:
        return dq_q5_k;
    case GGUF_T_Q6_K:
        return dq_q6_k;
    case GGUF_T_Q8_K:
        return dq_q8_k;
    case GGUF_T_IQ4_NL:
        return dq_iq4_nl;
    case GGUF_T_IQ4_XS:
        return dq_iq4_xs;
    case GGUF_T_TQ1_0:
        return dq_tq1_0;
    case GGUF_T_TQ2_0:
        return dq_tq2_0;
    case GGUF_T_MXFP4:
        return dq_mxfp4;
    case GGUF_T_NVFP4:
        return dq_nvfp4;
    default:
        return NULL;
    }
}

bool gguf_can_dequant(int t) {
    return t == GGUF_T_F32 || t == GGUF_T_F16 || t == GGUF_T_BF16 || t == GGUF_T_F64 ||
           block_fn(t) != NULL;
}

/* n elements of plain or block type t to f32. */
static void to_f32(int t, const uint8_t *src, int64_t n, float *dst) {
    switch (t) {
    case GGUF_T_F32:
        memcpy(dst, src, (size_t)n * 4);
        return;
    case GGUF_T_F16:
        half_f16_to_f32_n(src, dst, (size_t)n);
        return;
    case GGUF_T_BF16:
        half_bf16_to_f32_n(src, dst, (size_t)n);
        return;
    case GGUF_T_F64:
        for (int64_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, src + 8 * i, 8);
            dst[i] = (float)d;
        }
        return;
    default: {
        dq_block_fn fn = block_fn(t);
        unsigned blck = gguf_type_block_size(t), bytes = gguf_type_block_bytes(t);
        for (int64_t i = 0; i < n / blck; i++)
            fn(src + (size_t)i * bytes, dst + (size_t)i * blck);
    }
    }
}

static size_t out_elem_size(mp_dtype out) {
    return out == MP_DT_F32 ? 4 : (out == MP_DT_F16 || out == MP_DT_BF16) ? 2 : 0;
}

#define DQ_CHUNK 4096 /* elements per f32 staging chunk (a multiple of every block size) */

int gguf_dequant(int t, const void *src, size_t src_bytes, int64_t n, mp_dtype out, void *dst,
                 mp_error *err) {
    if (!gguf_can_dequant(t))
        return mp_err(err, "unsupported_format", "dequantizing %s is not supported",
                      gguf_type_name(t) ? gguf_type_name(t) : "an unknown ggml type");
    if (!out_elem_size(out))
        return mp_err(err, "unsupported_format", "cannot dequantize to %s", mp_dtype_name(out));
    uint64_t need;
    if (n < 0 || !gguf_row_bytes(t, n, &need) || need != src_bytes)
        return mp_err(err, "bad_header", "%s: %" PRId64 " elements do not match %zu source bytes",
                      gguf_type_name(t), n, src_bytes);
    const uint8_t *s = src;
    /* Same-width copies need no float round trip (keeps NaN payloads). */
    if ((t == GGUF_T_F32 && out == MP_DT_F32) || (t == GGUF_T_F16 && out == MP_DT_F16) ||
        (t == GGUF_T_BF16 && out == MP_DT_BF16)) {
        memcpy(dst, src, src_bytes);
        return 0;
    }
    if (out == MP_DT_F32) {
        to_f32(t, s, n, dst);
        return 0;
    }
    float tmp[DQ_CHUNK];
    unsigned blck = gguf_type_block_size(t), bytes = gguf_type_block_bytes(t);
    uint8_t *o = dst;
    for (int64_t done = 0; done < n;) {
        int64_t k = n - done < DQ_CHUNK ? n - done : DQ_CHUNK;
        to_f32(t, s + (size_t)(done / blck) * bytes, k, tmp);
        if (out == MP_DT_F16)
            half_f32_to_f16_n(tmp, o + (size_t)done * 2, (size_t)k);
        else
            half_f32_to_bf16_n(tmp, o + (size_t)done * 2, (size_t)k);
        done += k;
    }
    return 0;
}

#define DQ_READ_BYTES (4u << 20)

int gguf_tensor_dequant(const mp_weights *w, const mp_tensor *t, mp_dtype out, void *dst,
                        mp_error *err) {
    int ty = gguf_tensor_type(t);
    if (ty < 0) return mp_err(err, "unsupported_format", "tensor '%s' has no ggml type", t->name);
    if (!gguf_can_dequant(ty))
        return mp_err(err, "unsupported_format", "tensor '%s': dequantizing %s is not supported",
                      t->name, gguf_type_name(ty));
    size_t osz = out_elem_size(out);
    if (!osz)
        return mp_err(err, "unsupported_format", "cannot dequantize to %s", mp_dtype_name(out));
    if (t->file_index >= w->nfiles)
        return mp_err(err, "bad_header", "tensor '%s': bad file", t->name);
    uint64_t numel, row_bytes;
    int64_t ne0 = t->ndim ? t->shape[t->ndim - 1] : 1;
    if (!mp_shape_numel(t->shape, t->ndim, &numel) || !gguf_row_bytes(ty, ne0, &row_bytes))
        return mp_err(err, "bad_header", "tensor '%s': bad shape", t->name);
    if (numel == 0) return 0;
    uint64_t rows = numel / (uint64_t)ne0;
    if (rows * row_bytes != t->data_bytes)
        return mp_err(err, "bad_header", "tensor '%s': %" PRIu64 " bytes do not match its shape",
                      t->name, t->data_bytes);
    /* Rows are whole blocks, so the tensor is one flat run of blocks: stream
     * it in chunks of whole blocks, never the whole tensor at once. */
    uint64_t blck = gguf_type_block_size(ty), bbytes = gguf_type_block_bytes(ty);
    uint64_t nblocks = t->data_bytes / bbytes;
    uint64_t per = DQ_READ_BYTES / bbytes;
    if (per > nblocks) per = nblocks;
    uint8_t *buf = malloc((size_t)(per * bbytes));
    if (!buf) return mp_err(err, "io_error", "out of memory");
    int fd = w->fds[t->file_index];
    int rc = 0;
    for (uint64_t b = 0; b < nblocks && rc == 0; b += per) {
        uint64_t k = nblocks - b < per ? nblocks - b : per;
        size_t nb = (size_t)(k * bbytes);
        rc = weights_pread(fd, buf, nb, t->data_offset + b * bbytes, err);
        if (rc == 0)
            rc = gguf_dequant(ty, buf, nb, (int64_t)(k * blck), out,
                              (uint8_t *)dst + (size_t)(b * blck) * osz, err);
    }
    free(buf);
    return rc;
}
