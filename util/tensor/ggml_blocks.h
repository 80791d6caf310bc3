/*
 * ggml_blocks.h - the ggml block-quantized types, decoded: one definition
 * for every CPU path (gguf_dequant.c, the host backend) and for the CUDA
 * kernels, so that all of them write the same bits.
 *
 * Each type is a pair of functions (see "the types" below) from which
 * ggml_blk_value gives one element, what a CUDA thread computes, and
 * ggml_blk_decode whole blocks for the CPU. The float operations are
 * ggml's dequantize_row_<type> (ggml-quants.c; layouts in reference
 * §3.5-3.6), in its order, one rounding each and never fused (SCALAR_FMUL &
 * co., see scalar.h), so results are bit-identical to ggml and to gguf-py's
 * numpy port. Type ids are ggml's (the GGUF_T_* of
 * loader/formats/gguf/gguf.h, which checks that they agree).
 */
#ifndef MP_UTIL_TENSOR_GGML_BLOCKS_H
#define MP_UTIL_TENSOR_GGML_BLOCKS_H

#include <stdint.h>

#include "util/tensor/scalar.h"

/* ggml_type ids of the block types decoded here. */
enum {
    GGML_BLK_Q4_0 = 2,
    GGML_BLK_Q4_1 = 3,
    GGML_BLK_Q5_0 = 6,
    GGML_BLK_Q5_1 = 7,
    GGML_BLK_Q8_0 = 8,
    GGML_BLK_Q2_K = 10,
    GGML_BLK_Q3_K = 11,
    GGML_BLK_Q4_K = 12,
    GGML_BLK_Q5_K = 13,
    GGML_BLK_Q6_K = 14,
    GGML_BLK_Q8_K = 15,
    GGML_BLK_IQ4_NL = 20,
    GGML_BLK_IQ4_XS = 23,
    GGML_BLK_TQ1_0 = 34,
    GGML_BLK_TQ2_0 = 35,
    GGML_BLK_MXFP4 = 39,
    GGML_BLK_NVFP4 = 40,
};

/* Elements per block of a type decoded here; 0 for any other id. */
SCALAR_HD unsigned ggml_blk_elems(int t) {
    switch (t) {
    case GGML_BLK_Q4_0:
    case GGML_BLK_Q4_1:
    case GGML_BLK_Q5_0:
    case GGML_BLK_Q5_1:
    case GGML_BLK_Q8_0:
    case GGML_BLK_IQ4_NL:
    case GGML_BLK_MXFP4:
        return 32;
    case GGML_BLK_NVFP4:
        return 64;
    case GGML_BLK_Q2_K:
    case GGML_BLK_Q3_K:
    case GGML_BLK_Q4_K:
    case GGML_BLK_Q5_K:
    case GGML_BLK_Q6_K:
    case GGML_BLK_Q8_K:
    case GGML_BLK_IQ4_XS:
    case GGML_BLK_TQ1_0:
    case GGML_BLK_TQ2_0:
        return 256;
    default:
        return 0;
    }
}

/* Bytes per block of a type decoded here; 0 for any other id. */
SCALAR_HD unsigned ggml_blk_bytes(int t) {
    switch (t) {
    case GGML_BLK_Q4_0:
        return 18;
    case GGML_BLK_Q4_1:
        return 20;
    case GGML_BLK_Q5_0:
        return 22;
    case GGML_BLK_Q5_1:
        return 24;
    case GGML_BLK_Q8_0:
        return 34;
    case GGML_BLK_Q2_K:
        return 84;
    case GGML_BLK_Q3_K:
        return 110;
    case GGML_BLK_Q4_K:
        return 144;
    case GGML_BLK_Q5_K:
        return 176;
    case GGML_BLK_Q6_K:
        return 210;
    case GGML_BLK_Q8_K:
        return 292;
    case GGML_BLK_IQ4_NL:
        return 18;
    case GGML_BLK_IQ4_XS:
        return 136;
    case GGML_BLK_TQ1_0:
        return 54;
    case GGML_BLK_TQ2_0:
        return 66;
    case GGML_BLK_MXFP4:
        return 17;
    case GGML_BLK_NVFP4:
        return 36;
    default:
        return 0;
    }
}

/* ---- shared pieces ---- */

SCALAR_HD float ggml_blk_f16at(const uint8_t *p) {
    return scalar_f16_to_f32(scalar_load_u16(p));
}

SCALAR_HD uint32_t ggml_blk_u32at(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* The 4-bit types pack a (sub-)block of 2n elements into n bytes: the low
 * nibbles are elements 0..n-1, the high ones n..2n-1. */
SCALAR_HD int ggml_blk_nib(uint8_t q, unsigned high) {
    return (q >> (4 * high)) & 15;
}

/* The lookup tables: function-scope static consts, which device code may
 * read too (nvcc places them in device memory). */

/* ggml's kvalues_iq4nl (int8 there: as floats, the same exact values,
 * and no conversion per element). */
SCALAR_HD float ggml_blk_iq4nl_value(int i) {
    static const float kv[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                 1,    13,   25,  38,  53,  69,  89,  113};
    return kv[i & 15];
}

/* ggml's kvalues_mxfp4: E2M1 values doubled (int8 there, as above). */
SCALAR_HD float ggml_blk_fp4_value(int i) {
    static const float kv[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
    return kv[i & 15];
}

/* Q4_K's and Q5_K's 6-bit (scale, min) pair k of scales[12]. */
SCALAR_HD void ggml_blk_k_scale_min(const uint8_t *s, unsigned k, unsigned *sc, unsigned *mn) {
    if (k < 4) {
        *sc = s[k] & 63;
        *mn = s[k + 4] & 63;
    } else {
        *sc = (s[k + 4] & 15) | ((s[k - 4] >> 6) << 4);
        *mn = (s[k + 4] >> 4) | ((s[k] >> 6) << 4);
    }
}

/* ggml's GGML_E8M0_TO_FP32_HALF: 2^(e-128), exact including e = 0, 1. */
SCALAR_HD float ggml_blk_e8m0_half(uint8_t e) {
    return scalar_bits_f32(e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23);
}

/* NVFP4's UE4M3 sub-block scale, halved because ggml_blk_fp4_value is
 * doubled: (1 + m/8) * 2^(e-8), or m * 2^-10 for e = 0 (both exact); 0
 * and 0x7f give 0. */
SCALAR_HD float ggml_blk_ue4m3_half(uint8_t x) {
    if (x == 0 || x == 0x7f) return 0.0f;
    uint32_t e = (x >> 3) & 0xf, m = x & 7;
    if (e == 0) return SCALAR_FMUL((float)m, 0.0009765625f);
    return scalar_bits_f32(((e + 119) << 23) | (m << 20));
}

/* ---- the types ----
 *
 * Each type is two functions over its groups, runs of GGML_BLK_<T>_GROUP
 * elements decoded alike (one scale and, for the 4-bit types, one nibble
 * half): <t>_scale(b, g), the factors of group g, and <t>_at(b, g, i, s),
 * element i of group g given those factors. A CUDA thread calls both for
 * its one element; the CPU loop of ggml_blk_decode computes each group's
 * factors once, as ggml does, and with g fixed the per-element work is
 * the same few loads and shifts for every i (which compilers vectorize). */

typedef struct ggml_blk_scale {
    float d; /* the scale */
    float m; /* the min, or 0 when the type has none */
} ggml_blk_scale;

SCALAR_HD ggml_blk_scale ggml_blk_scale_of(float d, float m) {
    ggml_blk_scale s;
    s.d = d;
    s.m = m;
    return s;
}

/* Q4_0, Q4_1, Q5_0, Q5_1: one scale (and min) per block; group g is the
 * low (0) or high (1) nibbles of the 16 bytes of qs. */
#define GGML_BLK_Q4_0_GROUP 16
SCALAR_HD ggml_blk_scale ggml_blk_q4_0_scale(const uint8_t *b, unsigned g) {
    (void)g;
    return ggml_blk_scale_of(ggml_blk_f16at(b), 0.0f);
}
SCALAR_HD float ggml_blk_q4_0_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    int x = (int)ggml_blk_nib(b[2 + i], g) - 8;
    return SCALAR_FMUL((float)x, s.d);
}

#define GGML_BLK_Q4_1_GROUP 16
SCALAR_HD ggml_blk_scale ggml_blk_q4_1_scale(const uint8_t *b, unsigned g) {
    (void)g;
    return ggml_blk_scale_of(ggml_blk_f16at(b), ggml_blk_f16at(b + 2));
}
SCALAR_HD float ggml_blk_q4_1_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    int x = ggml_blk_nib(b[4 + i], g);
    return SCALAR_FADD(SCALAR_FMUL((float)x, s.d), s.m);
}

/* Q5: the fifth bit of element j = 16g + i is bit j of the 32-bit qh. */
#define GGML_BLK_Q5_0_GROUP 16
SCALAR_HD ggml_blk_scale ggml_blk_q5_0_scale(const uint8_t *b, unsigned g) {
    (void)g;
    return ggml_blk_scale_of(ggml_blk_f16at(b), 0.0f);
}
SCALAR_HD float ggml_blk_q5_0_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    uint32_t qh = ggml_blk_u32at(b + 2);
    int x = (ggml_blk_nib(b[6 + i], g) | (int)(((qh >> (16 * g + i)) & 1u) << 4)) - 16;
    return SCALAR_FMUL((float)x, s.d);
}

#define GGML_BLK_Q5_1_GROUP 16
SCALAR_HD ggml_blk_scale ggml_blk_q5_1_scale(const uint8_t *b, unsigned g) {
    (void)g;
    return ggml_blk_scale_of(ggml_blk_f16at(b), ggml_blk_f16at(b + 2));
}
SCALAR_HD float ggml_blk_q5_1_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    uint32_t qh = ggml_blk_u32at(b + 4);
    int x = ggml_blk_nib(b[8 + i], g) | (int)(((qh >> (16 * g + i)) & 1u) << 4);
    return SCALAR_FADD(SCALAR_FMUL((float)x, s.d), s.m);
}

#define GGML_BLK_Q8_0_GROUP 32
SCALAR_HD ggml_blk_scale ggml_blk_q8_0_scale(const uint8_t *b, unsigned g) {
    (void)g;
    return ggml_blk_scale_of(ggml_blk_f16at(b), 0.0f);
}
SCALAR_HD float ggml_blk_q8_0_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    (void)g;
    return SCALAR_FMUL((float)(int8_t)b[2 + i], s.d);
}

/* Q2_K and Q3_K: two halves of 128; in each, 4 shifts x two groups of 16,
 * each group with its own scale. Group g = 8h + 2 * shift + second reads
 * bits 2 * shift of q[32h + 16 * second + i]. */
#define GGML_BLK_Q2_K_GROUP 16
SCALAR_HD ggml_blk_scale ggml_blk_q2_k_scale(const uint8_t *b, unsigned g) {
    uint8_t sc = b[g];
    return ggml_blk_scale_of(SCALAR_FMUL(ggml_blk_f16at(b + 80), (float)(sc & 15u)),
                             SCALAR_FMUL(ggml_blk_f16at(b + 82), (float)(sc >> 4)));
}
SCALAR_HD float ggml_blk_q2_k_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    unsigned shift = 2 * ((g % 8) / 2), lq = 16 * (g % 2) + i;
    unsigned q = (b[16 + 32 * (g / 8) + lq] >> shift) & 3u;
    return SCALAR_FSUB(SCALAR_FMUL(s.d, (float)q), s.m);
}

/* Q3_K's 6-bit scales: low 4 bits in sb[0..7] (two per byte), high 2 in
 * sb[8..11]. hmask is indexed like q without the half's offset; its bit
 * 4h + shift/2 set means "no -4". */
#define GGML_BLK_Q3_K_GROUP 16
SCALAR_HD ggml_blk_scale ggml_blk_q3_k_scale(const uint8_t *b, unsigned g) {
    const uint8_t *sb = b + 96;
    int low = g < 8 ? (sb[g] & 15) : (sb[g - 8] >> 4);
    int high = (sb[8 + g % 4] >> (2 * (g / 4))) & 3;
    return ggml_blk_scale_of(SCALAR_FMUL(ggml_blk_f16at(b + 108), (float)((low | high << 4) - 32)),
                             0.0f);
}
SCALAR_HD float ggml_blk_q3_k_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    unsigned h = g / 8, jj = (g % 8) / 2, lq = 16 * (g % 2) + i;
    int q =
        (int)((b[32 + 32 * h + lq] >> (2 * jj)) & 3u) - ((b[lq] & (1u << (4 * h + jj))) ? 0 : 4);
    return SCALAR_FMUL(s.d, (float)q);
}

/* Q4_K and Q5_K: four chunks of 64, each two groups of 32 (low nibbles,
 * then high) with their own 6-bit scale and min. */
#define GGML_BLK_Q4_K_GROUP 32
SCALAR_HD ggml_blk_scale ggml_blk_q4_k_scale(const uint8_t *b, unsigned g) {
    unsigned sc, mn;
    ggml_blk_k_scale_min(b + 4, g, &sc, &mn);
    return ggml_blk_scale_of(SCALAR_FMUL(ggml_blk_f16at(b), (float)sc),
                             SCALAR_FMUL(ggml_blk_f16at(b + 2), (float)mn));
}
SCALAR_HD float ggml_blk_q4_k_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    int x = ggml_blk_nib(b[16 + 32 * (g / 2) + i], g % 2);
    return SCALAR_FSUB(SCALAR_FMUL(s.d, (float)x), s.m);
}

/* Q5_K: Q4_K plus a fifth bit from qh[i], bit g. */
#define GGML_BLK_Q5_K_GROUP 32
SCALAR_HD ggml_blk_scale ggml_blk_q5_k_scale(const uint8_t *b, unsigned g) {
    return ggml_blk_q4_k_scale(b, g);
}
SCALAR_HD float ggml_blk_q5_k_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    int x = ggml_blk_nib(b[48 + 32 * (g / 2) + i], g % 2) + ((b[16 + i] >> g) & 1) * 16;
    return SCALAR_FSUB(SCALAR_FMUL(s.d, (float)x), s.m);
}

/* Q6_K: two halves of 128, each four quarters of 32 taking low/high
 * nibbles of ql and 2 bits of qh; an int8 scale per group of 16. */
#define GGML_BLK_Q6_K_GROUP 16
SCALAR_HD ggml_blk_scale ggml_blk_q6_k_scale(const uint8_t *b, unsigned g) {
    return ggml_blk_scale_of(SCALAR_FMUL(ggml_blk_f16at(b + 208), (float)(int8_t)b[192 + g]), 0.0f);
}
SCALAR_HD float ggml_blk_q6_k_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    unsigned h = g / 8, quarter = (g % 8) / 2, l = 16 * (g % 2) + i;
    const uint8_t *ql = b + 64 * h + 32 * (quarter & 1);
    const uint8_t *qh = b + 128 + 32 * h;
    int x = (ggml_blk_nib(ql[l], quarter >= 2) | (((qh[l] >> (2 * quarter)) & 3) << 4)) - 32;
    return SCALAR_FMUL(s.d, (float)x);
}

/* Q8_K's scale is an f32. */
#define GGML_BLK_Q8_K_GROUP 256
SCALAR_HD ggml_blk_scale ggml_blk_q8_k_scale(const uint8_t *b, unsigned g) {
    (void)g;
    return ggml_blk_scale_of(scalar_bits_f32(ggml_blk_u32at(b)), 0.0f);
}
SCALAR_HD float ggml_blk_q8_k_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    (void)g;
    return SCALAR_FMUL(s.d, (float)(int8_t)b[4 + i]);
}

/* IQ4_NL: Q4_0's layout, the nibbles looked up in kvalues_iq4nl. */
#define GGML_BLK_IQ4_NL_GROUP 16
SCALAR_HD ggml_blk_scale ggml_blk_iq4_nl_scale(const uint8_t *b, unsigned g) {
    (void)g;
    return ggml_blk_scale_of(ggml_blk_f16at(b), 0.0f);
}
SCALAR_HD float ggml_blk_iq4_nl_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    return SCALAR_FMUL(s.d, ggml_blk_iq4nl_value(ggml_blk_nib(b[2 + i], g)));
}

/* IQ4_XS: eight sub-blocks of 32 (groups 2k, 2k + 1: low and high nibbles
 * of 16 bytes), each with a 6-bit scale: low 4 bits in scales_l (two per
 * byte), high 2 in the 16-bit scales_h. */
#define GGML_BLK_IQ4_XS_GROUP 16
SCALAR_HD ggml_blk_scale ggml_blk_iq4_xs_scale(const uint8_t *b, unsigned g) {
    unsigned ib = g / 2, scales_h = scalar_load_u16(b + 2);
    int ls = ((b[4 + ib / 2] >> 4 * (ib % 2)) & 0xf) | (((scales_h >> 2 * ib) & 3) << 4);
    return ggml_blk_scale_of(SCALAR_FMUL(ggml_blk_f16at(b), (float)(ls - 32)), 0.0f);
}
SCALAR_HD float ggml_blk_iq4_xs_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    int q = ggml_blk_nib(b[8 + 16 * (g / 2) + i], g % 2);
    return SCALAR_FMUL(s.d, ggml_blk_iq4nl_value(q));
}

/* TQ1_0: ternary digits packed five to a byte (base 3, scaled to 0..255):
 * digit n of byte q is the top of q * 3^n * 3 / 256. Elements 0..159 are
 * digits 0..4 of qs[0..31], 160..239 digits 0..4 of qs[32..47], 240..255
 * digits 0..3 of qh[0..3]; within each digit the byte index varies
 * fastest. Groups of 16: 0..9 take digit g/2 of qs[16 * (g % 2) + i],
 * 10..14 digit g - 10 of qs[32 + i], 15 digit i/4 of qh[i % 4]. */
#define GGML_BLK_TQ1_0_GROUP 16
SCALAR_HD ggml_blk_scale ggml_blk_tq1_0_scale(const uint8_t *b, unsigned g) {
    (void)g;
    return ggml_blk_scale_of(ggml_blk_f16at(b + 52), 0.0f);
}
SCALAR_HD float ggml_blk_tq1_0_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    unsigned n = g < 10 ? g / 2 : g < 15 ? g - 10 : i / 4;
    unsigned byte = g < 10 ? 16 * (g % 2) + i : g < 15 ? 32 + i : 48 + i % 4;
    uint8_t t = (uint8_t)(b[byte] * pow3[n]);
    int xi = ((uint16_t)t * 3) >> 8;
    return SCALAR_FMUL((float)(xi - 1), s.d);
}

/* TQ2_0: 2-bit ternaries: two runs of 128, each four shifts of 32 bytes;
 * group g = 4 * run + shift. */
#define GGML_BLK_TQ2_0_GROUP 32
SCALAR_HD ggml_blk_scale ggml_blk_tq2_0_scale(const uint8_t *b, unsigned g) {
    (void)g;
    return ggml_blk_scale_of(ggml_blk_f16at(b + 64), 0.0f);
}
SCALAR_HD float ggml_blk_tq2_0_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    int q = (b[32 * (g / 4) + i] >> (2 * (g % 4))) & 3;
    return SCALAR_FMUL((float)(q - 1), s.d);
}

#define GGML_BLK_MXFP4_GROUP 16
SCALAR_HD ggml_blk_scale ggml_blk_mxfp4_scale(const uint8_t *b, unsigned g) {
    (void)g;
    return ggml_blk_scale_of(ggml_blk_e8m0_half(b[0]), 0.0f);
}
SCALAR_HD float ggml_blk_mxfp4_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    return SCALAR_FMUL(s.d, ggml_blk_fp4_value(ggml_blk_nib(b[1 + i], g)));
}

/* NVFP4: four sub-blocks of 16 (groups 2k, 2k + 1: low and high nibbles of
 * 8 bytes), each with its UE4M3 scale in b[0..3]. */
#define GGML_BLK_NVFP4_GROUP 8
SCALAR_HD ggml_blk_scale ggml_blk_nvfp4_scale(const uint8_t *b, unsigned g) {
    return ggml_blk_scale_of(ggml_blk_ue4m3_half(b[g / 2]), 0.0f);
}
SCALAR_HD float ggml_blk_nvfp4_at(const uint8_t *b, unsigned g, unsigned i, ggml_blk_scale s) {
    int q = ggml_blk_nib(b[4 + 8 * (g / 2) + i], g % 2);
    return SCALAR_FMUL(s.d, ggml_blk_fp4_value(q));
}

/* ---- dispatch ---- */

/* Every type once: X(ID suffix, function prefix). */
#define GGML_BLK_TYPES(X)                                                                          \
    X(Q4_0, q4_0)                                                                                  \
    X(Q4_1, q4_1)                                                                                  \
    X(Q5_0, q5_0)                                                                                  \
    X(Q5_1, q5_1)                                                                                  \
    X(Q8_0, q8_0)                                                                                  \
    X(Q2_K, q2_k)                                                                                  \
    X(Q3_K, q3_k)                                                                                  \
    X(Q4_K, q4_k)                                                                                  \
    X(Q5_K, q5_k)                                                                                  \
    X(Q6_K, q6_k)                                                                                  \
    X(Q8_K, q8_k)                                                                                  \
    X(IQ4_NL, iq4_nl)                                                                              \
    X(IQ4_XS, iq4_xs)                                                                              \
    X(TQ1_0, tq1_0)                                                                                \
    X(TQ2_0, tq2_0)                                                                                \
    X(MXFP4, mxfp4)                                                                                \
    X(NVFP4, nvfp4)

/* The float ggml's dequantize_row_<t> writes for element j of the block at
 * blk. t must be one ggml_blk_elems knows (else 0). */
SCALAR_HD float ggml_blk_value(int t, const uint8_t *blk, unsigned j) {
    switch (t) {
#define GGML_BLK_VALUE_CASE(ID, fn)                                                                \
    case GGML_BLK_##ID:                                                                            \
        return ggml_blk_##fn##_at(blk, j / GGML_BLK_##ID##_GROUP, j % GGML_BLK_##ID##_GROUP,       \
                                  ggml_blk_##fn##_scale(blk, j / GGML_BLK_##ID##_GROUP));
        GGML_BLK_TYPES(GGML_BLK_VALUE_CASE)
#undef GGML_BLK_VALUE_CASE
    default:
        return 0.0f;
    }
}

/* nblocks consecutive blocks of type t at src into y (nblocks times
 * ggml_blk_elems(t) floats), which must not overlap src. Returns 0, or -1
 * for an unknown t. The switch is outside the loops so that each type's
 * loop is its two functions inlined, its factors computed once per group;
 * __restrict__ (GCC, clang and nvcc all take it) lets the compiler
 * vectorize the per-element loop, with the same IEEE operations. Inlined
 * into a caller whose own pointers are not restrict-qualified, GCC loses
 * that: call it from a function whose are (gguf_dequant.c does). */
SCALAR_HD int ggml_blk_decode(int t, const uint8_t *__restrict__ src, uint64_t nblocks,
                              float *__restrict__ y) {
    switch (t) {
#define GGML_BLK_DECODE_CASE(ID, fn)                                                               \
    case GGML_BLK_##ID:                                                                            \
        for (uint64_t k = 0; k < nblocks; k++) {                                                   \
            const uint8_t *blk = src + k * ggml_blk_bytes(t);                                      \
            for (unsigned g = 0; g < ggml_blk_elems(t) / GGML_BLK_##ID##_GROUP; g++) {             \
                ggml_blk_scale s = ggml_blk_##fn##_scale(blk, g);                                  \
                for (unsigned i = 0; i < GGML_BLK_##ID##_GROUP; i++)                               \
                    *y++ = ggml_blk_##fn##_at(blk, g, i, s);                                       \
            }                                                                                      \
        }                                                                                          \
        return 0;
        GGML_BLK_TYPES(GGML_BLK_DECODE_CASE)
#undef GGML_BLK_DECODE_CASE
    default:
        return -1;
    }
}

#endif
