/*
 * test_gguf.c - GGUF reader against hostile files built here byte by byte
 * (one test per way a file can be wrong, after ggml's test-gguf.cpp), the
 * dequantizers on hand-built blocks with hand-computed values, the float
 * conversions of half.c, the HF name map, the Q/K permutation and the
 * config mapping.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loader/formats/gguf/gguf.h"
#include "util/tensor/half.h"

/* ---- a little GGUF writer ---- */

typedef struct gb {
    unsigned char *p;
    size_t n, cap;
} gb;

static void put(gb *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static void u8(gb *b, uint8_t v) {
    put(b, &v, 1);
}
static void u32(gb *b, uint32_t v) {
    unsigned char x[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 24)};
    put(b, x, 4);
}
static void u64(gb *b, uint64_t v) {
    for (int i = 0; i < 8; i++)
        u8(b, (uint8_t)(v >> (8 * i)));
}
static void str(gb *b, const char *s) {
    u64(b, strlen(s));
    put(b, s, strlen(s));
}
static void header(gb *b, uint32_t version, uint64_t nt, uint64_t nkv) {
    put(b, "GGUF", 4);
    u32(b, version);
    u64(b, nt);
    u64(b, nkv);
}
static void kv_u32(gb *b, const char *k, uint32_t v) {
    str(b, k);
    u32(b, GGUF_V_UINT32);
    u32(b, v);
}
static void kv_str(gb *b, const char *k, const char *v) {
    str(b, k);
    u32(b, GGUF_V_STRING);
    str(b, v);
}
/* tensor info: ne given innermost-first as in the file */
static void tinfo(gb *b, const char *name, uint32_t nd, const uint64_t *ne, uint32_t type,
                  uint64_t off) {
    str(b, name);
    u32(b, nd);
    for (uint32_t i = 0; i < nd; i++)
        u64(b, ne[i]);
    u32(b, type);
    u64(b, off);
}
static void pad(gb *b, size_t align) {
    while (b->n % align)
        u8(b, 0);
}

static char *write_tmp(const gb *b) {
    char *path = strdup("/tmp/test_gguf_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, b->p, b->n), (ssize_t)b->n);
    close(fd);
    return path;
}

/* Opens the bytes; returns rc and leaves the error code in code. */
static int open_bytes(const gb *b, mp_weights *w, char *code) {
    char *path = write_tmp(b);
    mp_error err = {0};
    memset(w, 0, sizeof *w);
    int rc = gguf_open(path, w, &err);
    if (code) snprintf(code, 48, "%s", err.code);
    if (rc != 0) assert_true(err.message[0] != 0);
    unlink(path);
    free(path);
    return rc;
}

static void expect_fail(const gb *b, const char *want) {
    mp_weights w;
    char code[48];
    int rc = open_bytes(b, &w, code);
    weights_free_fields(&w);
    if (rc == 0 || strcmp(code, want) != 0)
        fail_msg("rc %d code '%s', expected '%s'", rc, code, want);
}

/* A valid file: every value type, alignment 64, F32 [2,3] + Q8_0 [2,32]. */
static void build_valid(gb *b, uint32_t version) {
    header(b, version, 2, 17);
    str(b, "k.u8");
    u32(b, GGUF_V_UINT8);
    u8(b, 200);
    str(b, "k.i8");
    u32(b, GGUF_V_INT8);
    u8(b, 0x80);
    str(b, "k.u16");
    u32(b, GGUF_V_UINT16);
    u8(b, 0xff);
    u8(b, 0xff);
    str(b, "k.i16");
    u32(b, GGUF_V_INT16);
    u8(b, 0x00);
    u8(b, 0x80);
    kv_u32(b, "k.u32", 4000000000u);
    str(b, "k.i32");
    u32(b, GGUF_V_INT32);
    u32(b, (uint32_t)-7);
    str(b, "k.f32");
    u32(b, GGUF_V_FLOAT32);
    u32(b, 0x3727c5acu); /* 1e-05f */
    str(b, "k.bool");
    u32(b, GGUF_V_BOOL);
    u8(b, 1);
    kv_str(b, "general.architecture", "llama");
    str(b, "k.u64");
    u32(b, GGUF_V_UINT64);
    u64(b, 1ull << 40);
    str(b, "k.i64");
    u32(b, GGUF_V_INT64);
    u64(b, (uint64_t)-5);
    str(b, "k.f64");
    u32(b, GGUF_V_FLOAT64);
    u64(b, 0x3ff8000000000000ull); /* 1.5 */
    str(b, "k.arr");
    u32(b, GGUF_V_ARRAY);
    u32(b, GGUF_V_INT32);
    u64(b, 3);
    u32(b, 1);
    u32(b, 2);
    u32(b, (uint32_t)-3);
    str(b, "k.strs");
    u32(b, GGUF_V_ARRAY);
    u32(b, GGUF_V_STRING);
    u64(b, 2);
    str(b, "a");
    str(b, "bc");
    str(b, "k.nest");
    u32(b, GGUF_V_ARRAY);
    u32(b, GGUF_V_ARRAY);
    u64(b, 2);
    u32(b, GGUF_V_UINT8);
    u64(b, 1);
    u8(b, 9);
    u32(b, GGUF_V_BOOL);
    u64(b, 2);
    u8(b, 0);
    u8(b, 1);
    str(b, "k.bad_utf8");
    u32(b, GGUF_V_STRING);
    u64(b, 3);
    put(b,
        "a\xff"
        "b",
        3);
    kv_u32(b, "general.alignment", 64);
    uint64_t ne_a[2] = {3, 2}, ne_b[2] = {32, 2};
    tinfo(b, "a.weight", 2, ne_a, GGUF_T_F32, 0);
    tinfo(b, "b.weight", 2, ne_b, GGUF_T_Q8_0, 64); /* 24 bytes padded to 64 */
    pad(b, 64);
    float fa[6] = {1, 2, 3, 4, 5, -6};
    put(b, fa, sizeof fa);
    pad(b, 64);
    for (int blk = 0; blk < 2; blk++) {
        u8(b, 0x00);
        u8(b, 0x38); /* d = 0.5 */
        for (int j = 0; j < 32; j++)
            u8(b, (uint8_t)(int8_t)(j - 16 + blk));
    }
}

static void test_valid_file(void **state) {
    (void)state;
    for (uint32_t version = 2; version <= 3; version++) {
        gb b = {0};
        build_valid(&b, version);
        mp_weights w;
        char code[48];
        char *path = write_tmp(&b);
        mp_error err = {0};
        memset(&w, 0, sizeof w);
        int rc = gguf_open(path, &w, &err);
        if (rc) fail_msg("%s: %s", err.code, err.message);
        (void)code;
        const gguf_info *gi = gguf_info_of(&w);
        assert_non_null(gi);
        assert_int_equal(gi->version, version);
        assert_int_equal(gi->alignment, 64);
        assert_int_equal(gi->data_start % 64, 0);
        json_t *m = w.metadata;
        assert_int_equal(json_integer_value(json_object_get(m, "k.u8")), 200);
        assert_int_equal(json_integer_value(json_object_get(m, "k.i8")), -128);
        assert_int_equal(json_integer_value(json_object_get(m, "k.u16")), 65535);
        assert_int_equal(json_integer_value(json_object_get(m, "k.i16")), -32768);
        assert_int_equal(json_integer_value(json_object_get(m, "k.u32")), 4000000000ll);
        assert_int_equal(json_integer_value(json_object_get(m, "k.i32")), -7);
        assert_true(json_real_value(json_object_get(m, "k.f32")) == 1e-05);
        assert_true(json_is_true(json_object_get(m, "k.bool")));
        assert_string_equal(json_string_value(json_object_get(m, "general.architecture")), "llama");
        assert_int_equal(json_integer_value(json_object_get(m, "k.u64")), 1ll << 40);
        assert_int_equal(json_integer_value(json_object_get(m, "k.i64")), -5);
        assert_true(json_real_value(json_object_get(m, "k.f64")) == 1.5);
        json_t *arr = json_object_get(m, "k.arr");
        assert_int_equal(json_array_size(arr), 3);
        assert_int_equal(json_integer_value(json_array_get(arr, 2)), -3);
        assert_string_equal(json_string_value(json_array_get(json_object_get(m, "k.strs"), 1)),
                            "bc");
        json_t *nest = json_object_get(m, "k.nest");
        assert_int_equal(json_integer_value(json_array_get(json_array_get(nest, 0), 0)), 9);
        assert_true(json_is_true(json_array_get(json_array_get(nest, 1), 1)));
        assert_string_equal(json_string_value(json_object_get(m, "k.bad_utf8")), "a\xef\xbf\xbd"
                                                                                 "b");
        assert_string_equal(gguf_meta_type(&w, "k.strs"), "[STRING]");
        assert_string_equal(gguf_meta_type(&w, "k.f32"), "FLOAT32");
        assert_string_equal(gguf_meta_type(&w, "k.nest"), "[ARRAY]");
        assert_null(gguf_meta_type(&w, "nope"));

        assert_int_equal(w.ntensors, 2);
        mp_tensor *a = &w.tensors[0], *q = &w.tensors[1];
        assert_string_equal(a->name, "a.weight");
        assert_int_equal(a->dtype, MP_DT_F32);
        assert_int_equal(a->ggml_type, -1);
        assert_int_equal(a->ndim, 2);
        assert_int_equal(a->shape[0], 2);
        assert_int_equal(a->shape[1], 3);
        assert_int_equal(a->strides[0], 3);
        assert_int_equal(a->nbytes, 24);
        assert_int_equal(a->data_offset, gi->data_start);
        assert_int_equal(q->dtype, MP_DT_GGML);
        assert_int_equal(q->ggml_type, GGUF_T_Q8_0);
        assert_int_equal(q->shape[0], 2);
        assert_int_equal(q->shape[1], 32);
        assert_int_equal(q->nbytes, 68);
        assert_int_equal(q->data_offset, gi->data_start + 64);

        float out[64];
        assert_int_equal(gguf_tensor_dequant(&w, q, MP_DT_F32, out, &err), 0);
        for (int blk = 0; blk < 2; blk++)
            for (int j = 0; j < 32; j++)
                assert_true(out[32 * blk + j] == 0.5f * (float)(j - 16 + blk));
        float fa[6];
        assert_int_equal(weights_read(&w, a, fa, &err), 0);
        assert_true(fa[5] == -6.0f);
        uint16_t h[6];
        assert_int_equal(gguf_tensor_dequant(&w, a, MP_DT_BF16, h, &err), 0);
        assert_int_equal(h[5], 0xc0c0); /* -6.0 */

        weights_free_fields(&w);
        unlink(path);
        free(path);

        /* Every proper prefix of a valid file fails cleanly. */
        for (size_t cut = 0; cut < b.n; cut += (cut < 700 ? 1 : 7)) {
            gb t = {b.p, cut, b.n};
            mp_weights w2;
            char c2[48];
            int r2 = open_bytes(&t, &w2, c2);
            weights_free_fields(&w2);
            if (r2 == 0) fail_msg("prefix of %zu bytes opened", cut);
        }
        free(b.p);
    }
}

static void test_bad_magic(void **state) {
    (void)state;
    gb b = {0};
    put(&b, "GGUG", 4);
    u32(&b, 3);
    u64(&b, 0);
    u64(&b, 0);
    expect_fail(&b, "unsupported_format");
    free(b.p);
}

static void test_versions(void **state) {
    (void)state;
    uint32_t bad[] = {1, 4, 0x03000000u};
    for (size_t i = 0; i < 3; i++) {
        gb b = {0};
        header(&b, bad[i], 0, 0);
        expect_fail(&b, "unsupported_format");
        free(b.p);
    }
    gb b = {0};
    header(&b, 0, 0, 0);
    expect_fail(&b, "bad_header");
    free(b.p);
    /* an empty v2 file is fine */
    gb ok = {0};
    header(&ok, 2, 0, 0);
    mp_weights w;
    assert_int_equal(open_bytes(&ok, &w, NULL), 0);
    assert_int_equal(w.ntensors, 0);
    weights_free_fields(&w);
    free(ok.p);
}

static void test_absurd_counts(void **state) {
    (void)state;
    gb b = {0};
    header(&b, 3, 1ull << 62, 0);
    expect_fail(&b, "too_large");
    free(b.p);
    b = (gb){0};
    header(&b, 3, 0, UINT64_MAX);
    expect_fail(&b, "too_large");
    free(b.p);
    b = (gb){0};
    header(&b, 3, 1000, 1000); /* under the caps, but the file cannot hold them */
    expect_fail(&b, "truncated");
    free(b.p);
}

static void test_huge_strings(void **state) {
    (void)state;
    gb b = {0};
    header(&b, 3, 0, 1);
    u64(&b, 1ull << 40); /* key length */
    put(&b, "abcdefghijklmnopqrstuvwxyz", 26);
    expect_fail(&b, "bad_header");
    free(b.p);
    b = (gb){0};
    header(&b, 3, 0, 1);
    str(&b, "k");
    u32(&b, GGUF_V_STRING);
    u64(&b, 1ull << 31); /* over ggml's 1 GiB */
    expect_fail(&b, "too_large");
    free(b.p);
    b = (gb){0};
    header(&b, 3, 0, 1);
    str(&b, "k");
    u32(&b, GGUF_V_STRING);
    u64(&b, 1000); /* under the cap, past EOF */
    put(&b, "xy", 2);
    expect_fail(&b, "truncated");
    free(b.p);
    b = (gb){0};
    header(&b, 3, 0, 1);
    str(&b, "k");
    u32(&b, GGUF_V_ARRAY);
    u32(&b, GGUF_V_STRING);
    u64(&b, 1ull << 29); /* at least 4 GiB of lengths: cannot fit */
    u64(&b, 0);
    expect_fail(&b, "truncated");
    free(b.p);
    b = (gb){0};
    header(&b, 3, 0, 1);
    str(&b, "k");
    u32(&b, GGUF_V_ARRAY);
    u32(&b, GGUF_V_UINT8);
    u64(&b, 1ull << 31);
    expect_fail(&b, "too_large");
    free(b.p);
}

static void test_bad_keys_and_values(void **state) {
    (void)state;
    gb b = {0};
    header(&b, 3, 0, 2);
    kv_u32(&b, "dup", 1);
    kv_u32(&b, "dup", 2);
    expect_fail(&b, "bad_header");
    free(b.p);
    b = (gb){0};
    header(&b, 3, 0, 1);
    kv_u32(&b, "", 1);
    expect_fail(&b, "bad_header");
    free(b.p);
    b = (gb){0};
    header(&b, 3, 0, 1);
    str(&b, "k");
    u32(&b, 13); /* no such value type */
    u32(&b, 0);
    expect_fail(&b, "bad_header");
    free(b.p);
    b = (gb){0};
    header(&b, 3, 0, 1);
    str(&b, "k");
    u32(&b, GGUF_V_ARRAY);
    u32(&b, 77);
    u64(&b, 1);
    u32(&b, 0);
    expect_fail(&b, "bad_header");
    free(b.p);
    /* arrays nested past the depth limit */
    b = (gb){0};
    header(&b, 3, 0, 1);
    str(&b, "k");
    u32(&b, GGUF_V_ARRAY);
    for (int i = 0; i < GGUF_MAX_ARRAY_DEPTH + 1; i++) {
        u32(&b, GGUF_V_ARRAY);
        u64(&b, 1);
    }
    u32(&b, GGUF_V_UINT8);
    u64(&b, 1);
    u8(&b, 1);
    for (int i = 0; i < 64; i++)
        u8(&b, 0);
    expect_fail(&b, "bad_header");
    free(b.p);
}

static void test_alignment(void **state) {
    (void)state;
    uint32_t bad[] = {0, 48, 3};
    for (size_t i = 0; i < 3; i++) {
        gb b = {0};
        header(&b, 3, 0, 1);
        kv_u32(&b, "general.alignment", bad[i]);
        expect_fail(&b, "bad_header");
        free(b.p);
    }
    gb b = {0};
    header(&b, 3, 0, 1);
    str(&b, "general.alignment");
    u32(&b, GGUF_V_UINT64);
    u64(&b, 64);
    expect_fail(&b, "bad_header");
    free(b.p);
}

/* One F32 tensor with the given info fields, then `data` bytes of data. */
static void one_tensor(gb *b, const char *name, uint32_t nd, const uint64_t *ne, uint32_t type,
                       uint64_t off, size_t data) {
    header(b, 3, 1, 0);
    tinfo(b, name, nd, ne, type, off);
    pad(b, 32);
    for (size_t i = 0; i < data; i++)
        u8(b, 0);
}

static void test_tensor_infos(void **state) {
    (void)state;
    uint64_t ne[5] = {4, 2, 1, 1, 1};
    gb b = {0};
    one_tensor(&b, "t", 2, ne, GGUF_T_F32, 0, 32);
    mp_weights w;
    assert_int_equal(open_bytes(&b, &w, NULL), 0);
    weights_free_fields(&w);
    free(b.p);

    struct {
        const char *name;
        uint32_t nd;
        uint64_t ne[5];
        uint32_t type;
        uint64_t off;
        size_t data;
        const char *code;
    } cases[] = {
        {"dims", 5, {4, 2, 1, 1, 1}, GGUF_T_F32, 0, 32, "bad_header"},
        {"overflow", 2, {1ull << 40, 1ull << 40}, GGUF_T_F32, 0, 32, "bad_header"},
        {"bytes_overflow", 2, {1ull << 32, 1ull << 30}, GGUF_T_F32, 0, 32, "bad_header"},
        {"negative", 2, {1ull << 63, 1}, GGUF_T_F32, 0, 32, "bad_header"},
        {"removed_type", 1, {32}, 4, 0, 32, "bad_header"},
        {"big_type", 1, {32}, 1000, 0, 32, "bad_header"},
        {"row_not_blocks", 1, {33}, GGUF_T_Q4_0, 0, 64, "bad_header"},
        {"gap", 2, {4, 2}, GGUF_T_F32, 32, 64, "bad_header"},
        {"past_eof", 2, {4, 2}, GGUF_T_F32, 0, 31, "truncated"},
        {"huge_past_eof", 2, {1ull << 30, 1ull << 20}, GGUF_T_F32, 0, 32, "truncated"},
        {"a_name_that_is_far_too_long_for_ggml_because_it_has_64_bytes_xxx",
         1,
         {1},
         0,
         0,
         4,
         "bad_header"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        b = (gb){0};
        one_tensor(&b, cases[i].name, cases[i].nd, cases[i].ne, cases[i].type, cases[i].off,
                   cases[i].data);
        mp_weights w2;
        char code[48];
        int rc = open_bytes(&b, &w2, code);
        weights_free_fields(&w2);
        if (rc == 0 || strcmp(code, cases[i].code) != 0)
            fail_msg("%s: rc %d code %s, expected %s", cases[i].name, rc, code, cases[i].code);
        free(b.p);
    }

    /* duplicate names; overlapping (second offset inside the first) */
    b = (gb){0};
    header(&b, 3, 2, 0);
    tinfo(&b, "x", 1, ne, GGUF_T_F32, 0);
    tinfo(&b, "x", 1, ne, GGUF_T_F32, 32);
    pad(&b, 32);
    for (int i = 0; i < 64; i++)
        u8(&b, 0);
    expect_fail(&b, "bad_header");
    free(b.p);
    b = (gb){0};
    header(&b, 3, 2, 0);
    uint64_t ne16[1] = {16};
    tinfo(&b, "x", 1, ne16, GGUF_T_F32, 0);
    tinfo(&b, "y", 1, ne16, GGUF_T_F32, 32);
    pad(&b, 32);
    for (int i = 0; i < 128; i++)
        u8(&b, 0);
    expect_fail(&b, "bad_header");
    free(b.p);
}

static void test_not_found(void **state) {
    (void)state;
    mp_weights w = {0};
    mp_error err = {0};
    assert_int_equal(gguf_open("/nonexistent/x.gguf", &w, &err), -1);
    assert_string_equal(err.code, "not_found");
    weights_free_fields(&w);
}

/* ---- dequantization on hand-built blocks ---- */

static void dq(int type, const uint8_t *blk, size_t nbytes, int64_t n, float *out) {
    mp_error err = {0};
    if (gguf_dequant(type, blk, nbytes, n, MP_DT_F32, out, &err) != 0)
        fail_msg("%s: %s", err.code, err.message);
}

static void test_dequant_simple(void **state) {
    (void)state;
    uint8_t b[34];
    float y[256];
    /* Q4_0: d = 2.0 (0x4000); qs[j] = lo j, hi 15-j: low nibbles are the first half. */
    b[0] = 0x00, b[1] = 0x40;
    for (int j = 0; j < 16; j++)
        b[2 + j] = (uint8_t)(j | (15 - j) << 4);
    dq(GGUF_T_Q4_0, b, 18, 32, y);
    for (int j = 0; j < 16; j++) {
        assert_true(y[j] == 2.0f * (float)(j - 8));
        assert_true(y[j + 16] == 2.0f * (float)(7 - j));
    }
    /* Q4_1: d = 0.5, m = -1 */
    b[0] = 0x00, b[1] = 0x38, b[2] = 0x00, b[3] = 0xbc;
    for (int j = 0; j < 16; j++)
        b[4 + j] = (uint8_t)(j | (15 - j) << 4);
    dq(GGUF_T_Q4_1, b, 20, 32, y);
    assert_true(y[0] == -1.0f && y[15] == 6.5f && y[16] == 6.5f && y[31] == -1.0f);
    /* Q5_0: d = 1, qh bit j set for odd j: x = (nib | 16*bit) - 16 */
    b[0] = 0x00, b[1] = 0x3c;
    uint32_t qh = 0xaaaaaaaau;
    memcpy(b + 2, &qh, 4);
    for (int j = 0; j < 16; j++)
        b[6 + j] = (uint8_t)(j | (15 - j) << 4);
    dq(GGUF_T_Q5_0, b, 22, 32, y);
    assert_true(y[0] == -16.0f && y[1] == 1.0f && y[16] == -1.0f && y[17] == 14.0f);
    /* Q5_1: same bits, d = 1, m = 0.5: no -16 */
    b[0] = 0x00, b[1] = 0x3c, b[2] = 0x00, b[3] = 0x38;
    memcpy(b + 4, &qh, 4);
    for (int j = 0; j < 16; j++)
        b[8 + j] = (uint8_t)(j | (15 - j) << 4);
    dq(GGUF_T_Q5_1, b, 24, 32, y);
    assert_true(y[0] == 0.5f && y[1] == 17.5f && y[16] == 15.5f && y[17] == 30.5f);
    /* Q8_0: d = -0.25 */
    b[0] = 0x00, b[1] = 0xb4;
    for (int j = 0; j < 32; j++)
        b[2 + j] = (uint8_t)(int8_t)(j * 8 - 128);
    dq(GGUF_T_Q8_0, b, 34, 32, y);
    assert_true(y[0] == 32.0f && y[31] == -(float)(31 * 8 - 128) * 0.25f);
    /* wrong size */
    mp_error err = {0};
    assert_int_equal(gguf_dequant(GGUF_T_Q8_0, b, 33, 32, MP_DT_F32, y, &err), -1);
    assert_int_equal(gguf_dequant(GGUF_T_Q8_0, b, 34, 31, MP_DT_F32, y, &err), -1);
    assert_int_equal(gguf_dequant(16 /* IQ2_XXS */, b, 66, 256, MP_DT_F32, y, &err), -1);
    assert_string_equal(err.code, "unsupported_format");
}

static void test_dequant_k(void **state) {
    (void)state;
    uint8_t b[292];
    float y[256];
    /* Q4_K: d = 1, dmin = 0.5; sub-block k has scale k+1 and min k. */
    memset(b, 0, sizeof b);
    b[0] = 0x00, b[1] = 0x3c, b[2] = 0x00, b[3] = 0x38;
    uint8_t *sc = b + 4;
    for (int k = 0; k < 4; k++) {
        sc[k] = (uint8_t)(k + 1);
        sc[k + 4] = (uint8_t)k;
    }
    for (int k = 4; k < 8; k++)
        sc[k + 4] = (uint8_t)(((k + 1) & 15) | (k & 15) << 4);
    for (int l = 0; l < 128; l++)
        b[16 + l] = (uint8_t)((l & 15) | (15 - (l & 15)) << 4);
    dq(GGUF_T_Q4_K, b, 144, 256, y);
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            int k1 = 2 * c, k2 = 2 * c + 1;
            assert_true(y[64 * c + l] == (float)(k1 + 1) * (float)(l & 15) - 0.5f * (float)k1);
            assert_true(y[64 * c + 32 + l] ==
                        (float)(k2 + 1) * (float)(15 - (l & 15)) - 0.5f * (float)k2);
        }
    /* Q5_K: same scales, qh bit c*2 set for every l: +16 on each first half */
    uint8_t b5[176];
    memset(b5, 0, sizeof b5);
    memcpy(b5, b, 16);
    for (int l = 0; l < 32; l++)
        b5[16 + l] = 0x55;
    for (int l = 0; l < 128; l++)
        b5[48 + l] = b[16 + l];
    dq(GGUF_T_Q5_K, b5, 176, 256, y);
    assert_true(y[0] == 1.0f * 16.0f - 0.0f);
    assert_true(y[32] == 2.0f * 15.0f - 0.5f);
    assert_true(y[64 + 1] == 3.0f * 17.0f - 1.0f);
    /* Q6_K: d = 0.5 at byte 208, scales 1..16, q = 6-bit value - 32 */
    uint8_t b6[210];
    memset(b6, 0, sizeof b6);
    for (int i = 0; i < 16; i++)
        b6[192 + i] = (uint8_t)(int8_t)(i % 2 ? -(i + 1) : i + 1);
    b6[208] = 0x00, b6[209] = 0x38;
    for (int l = 0; l < 128; l++)
        b6[l] = (uint8_t)(l % 16 | (15 - l % 16) << 4);
    for (int l = 0; l < 64; l++)
        b6[128 + l] = 0xe4; /* bits 0,1,2,3 for the four quarters */
    dq(GGUF_T_Q6_K, b6, 210, 256, y);
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            int is = l / 16;
            const int8_t *s = (const int8_t *)(b6 + 192 + 8 * h);
            const uint8_t *ql = b6 + 64 * h;
            int q1 = ((ql[l] & 15) | 0 << 4) - 32, q2 = ((ql[l + 32] & 15) | 1 << 4) - 32;
            int q3 = ((ql[l] >> 4) | 2 << 4) - 32, q4 = ((ql[l + 32] >> 4) | 3 << 4) - 32;
            assert_true(y[128 * h + l] == 0.5f * (float)s[is] * (float)q1);
            assert_true(y[128 * h + l + 32] == 0.5f * (float)s[is + 2] * (float)q2);
            assert_true(y[128 * h + l + 64] == 0.5f * (float)s[is + 4] * (float)q3);
            assert_true(y[128 * h + l + 96] == 0.5f * (float)s[is + 6] * (float)q4);
        }
    /* Q2_K: scale byte 0x21 (scale 1, min 2), d = 1, dmin = 0.25; q = l & 3 on shift 0 */
    uint8_t b2[84];
    memset(b2, 0, sizeof b2);
    for (int i = 0; i < 16; i++)
        b2[i] = 0x21;
    for (int l = 0; l < 64; l++)
        b2[16 + l] = (uint8_t)(l & 3);
    b2[80] = 0x00, b2[81] = 0x3c, b2[82] = 0x00, b2[83] = 0x34;
    dq(GGUF_T_Q2_K, b2, 84, 256, y);
    assert_true(y[0] == -0.5f && y[3] == 2.5f && y[16] == -0.5f && y[32] == -0.5f);
    /* Q3_K: all scales 32+1 (-> 1), d = 1, hmask all set -> q = 2-bit value */
    uint8_t b3[110];
    memset(b3, 0, sizeof b3);
    memset(b3, 0xff, 32);
    for (int l = 0; l < 64; l++)
        b3[32 + l] = (uint8_t)(l & 3);
    for (int i = 0; i < 8; i++)
        b3[96 + i] = 0x11;
    for (int i = 8; i < 12; i++)
        b3[96 + i] = 0xaa; /* high bits 2 -> 32 */
    b3[108] = 0x00, b3[109] = 0x3c;
    dq(GGUF_T_Q3_K, b3, 110, 256, y);
    assert_true(y[0] == 0.0f && y[1] == 1.0f && y[3] == 3.0f);
    b3[0] = 0xfe; /* hmask bit 0 of byte 0 cleared: y[0] loses 4 */
    dq(GGUF_T_Q3_K, b3, 110, 256, y);
    assert_true(y[0] == -4.0f);
    /* Q8_K: f32 d */
    memset(b, 0, sizeof b);
    float d = 0.125f;
    memcpy(b, &d, 4);
    b[4] = 0xff, b[5] = 100;
    dq(GGUF_T_Q8_K, b, 292, 256, y);
    assert_true(y[0] == -0.125f && y[1] == 12.5f);
}

static void test_dequant_out_types(void **state) {
    (void)state;
    uint8_t b[34];
    b[0] = 0x00, b[1] = 0x3c; /* d = 1 */
    for (int j = 0; j < 32; j++)
        b[2 + j] = (uint8_t)(int8_t)(j - 16);
    uint16_t h[32];
    mp_error err = {0};
    assert_int_equal(gguf_dequant(GGUF_T_Q8_0, b, 34, 32, MP_DT_F16, h, &err), 0);
    assert_int_equal(h[16], 0x0000);
    assert_int_equal(h[17], 0x3c00);
    assert_int_equal(h[0], 0xcc00); /* -16 */
    assert_int_equal(gguf_dequant(GGUF_T_Q8_0, b, 34, 32, MP_DT_BF16, h, &err), 0);
    assert_int_equal(h[17], 0x3f80);
    assert_int_equal(gguf_dequant(GGUF_T_Q8_0, b, 34, 32, MP_DT_I32, h, &err), -1);
    /* f16 -> f16 is a bit copy (NaN payload kept) */
    uint16_t src[2] = {0x7d01, 0x3c00}, dst[2];
    assert_int_equal(gguf_dequant(GGUF_T_F16, src, 4, 2, MP_DT_F16, dst, &err), 0);
    assert_int_equal(dst[0], 0x7d01);
}

/* ---- half.c ---- */

static float fbits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void test_half(void **state) {
    (void)state;
    assert_int_equal(half_f32_to_f16(1.0f), 0x3c00);
    assert_int_equal(half_f32_to_f16(-2.0f), 0xc000);
    assert_int_equal(half_f32_to_f16(65504.0f), 0x7bff);
    assert_int_equal(half_f32_to_f16(65519.996f), 0x7bff);
    assert_int_equal(half_f32_to_f16(65520.0f), 0x7c00);
    assert_int_equal(half_f32_to_f16(1e10f), 0x7c00);
    assert_int_equal(half_f32_to_f16(-INFINITY), 0xfc00);
    assert_int_equal(half_f32_to_f16(0x1p-24f), 0x0001);
    assert_int_equal(half_f32_to_f16(0x1p-25f), 0x0000);        /* tie to even: 0 */
    assert_int_equal(half_f32_to_f16(0x1.8p-24f), 0x0002);      /* tie to even: 2 */
    assert_int_equal(half_f32_to_f16(0x1.000002p-25f), 0x0001); /* just above half */
    assert_int_equal(half_f32_to_f16(0x1p-14f), 0x0400);
    assert_int_equal(half_f32_to_f16(0x1.ff8p-15f), 0x03ff); /* largest subnormal */
    assert_int_equal(half_f32_to_f16(0x1.ffap-15f), 0x03ff);
    assert_int_equal(half_f32_to_f16(0x1.ffcp-15f), 0x0400);    /* tie rounds up into normals */
    assert_int_equal(half_f32_to_f16(1.0f + 0x1p-11f), 0x3c00); /* tie, even */
    assert_int_equal(half_f32_to_f16(1.0f + 0x3p-11f), 0x3c02); /* tie, odd -> up */
    assert_int_equal(half_f32_to_f16(1.0f + 0x1.2p-11f), 0x3c01);
    assert_int_equal(half_f32_to_f16(-0.0f), 0x8000);
    uint16_t n = half_f32_to_f16(NAN);
    assert_true((n & 0x7c00) == 0x7c00 && (n & 0x3ff) != 0);
    n = half_f32_to_f16(fbits(0x7f800001u)); /* payload only in low bits: still NaN */
    assert_true((n & 0x7c00) == 0x7c00 && (n & 0x3ff) != 0);
    assert_true(half_f16_to_f32(0x0001) == 0x1p-24f);
    assert_true(half_f16_to_f32(0x7bff) == 65504.0f);
    assert_true(isinf(half_f16_to_f32(0xfc00)) && half_f16_to_f32(0xfc00) < 0);
    assert_true(isnan(half_f16_to_f32(0x7e00)));
    assert_true(half_f16_to_f32(0x8000) == 0.0f && signbit(half_f16_to_f32(0x8000)));
    /* every f16 survives the round trip */
    for (uint32_t h = 0; h < 0x10000; h++) {
        float f = half_f16_to_f32((uint16_t)h);
        if (isnan(f)) continue;
        assert_int_equal(half_f32_to_f16(f), h);
    }
    assert_int_equal(half_f32_to_bf16(1.0f), 0x3f80);
    assert_int_equal(half_f32_to_bf16(fbits(0x3f808000u)), 0x3f80); /* tie, even */
    assert_int_equal(half_f32_to_bf16(fbits(0x3f818000u)), 0x3f82); /* tie, odd */
    assert_int_equal(half_f32_to_bf16(fbits(0x3f808001u)), 0x3f81);
    assert_int_equal(half_f32_to_bf16(fbits(0x7f7fffffu)), 0x7f80); /* overflow to Inf */
    assert_int_equal(half_f32_to_bf16(fbits(0x7f800001u)), 0x7fc0); /* NaN stays NaN */
    assert_int_equal(half_f32_to_bf16(fbits(0xff800000u)), 0xff80);
    assert_true(half_bf16_to_f32(0x3f80) == 1.0f);
    /* fp8 */
    assert_true(half_fp8_e4m3_to_f32(0x7e) == 448.0f);
    assert_true(half_fp8_e4m3_to_f32(0xfe) == -448.0f);
    assert_true(isnan(half_fp8_e4m3_to_f32(0x7f)) && isnan(half_fp8_e4m3_to_f32(0xff)));
    assert_true(half_fp8_e4m3_to_f32(0x01) == 0x1p-9f);
    assert_true(half_fp8_e4m3_to_f32(0x38) == 1.0f);
    assert_true(half_fp8_e4m3_to_f32(0x78) == 256.0f); /* e=15 m=0 is finite in fn */
    assert_true(half_fp8_e5m2_to_f32(0x7b) == 57344.0f);
    assert_true(isinf(half_fp8_e5m2_to_f32(0x7c)));
    assert_true(isnan(half_fp8_e5m2_to_f32(0x7d)));
    assert_true(half_fp8_e5m2_to_f32(0x01) == 0x1p-16f);
    assert_true(half_fp8_e5m2_to_f32(0x3c) == 1.0f);
    assert_true(isnan(half_fp8_e4m3fnuz_to_f32(0x80)));
    assert_true(half_fp8_e4m3fnuz_to_f32(0x7f) == 240.0f);
    assert_true(half_fp8_e4m3fnuz_to_f32(0x40) == 1.0f);
    assert_true(half_fp8_e5m2fnuz_to_f32(0x7f) == 57344.0f);
    assert_true(half_fp8_e5m2fnuz_to_f32(0x40) == 1.0f);
    assert_true(isnan(half_fp8_e5m2fnuz_to_f32(0x80)));
    assert_true(half_fp8_e8m0_to_f32(127) == 1.0f);
    assert_true(half_fp8_e8m0_to_f32(0) == 0x1p-127f);
    assert_true(isnan(half_fp8_e8m0_to_f32(0xff)));
}

/* ---- names, permutation, config ---- */

static void test_names(void **state) {
    (void)state;
    char out[128];
    struct {
        const char *arch, *g, *h;
        int rc;
    } cases[] = {
        {"llama", "token_embd.weight", "model.embed_tokens.weight", 0},
        {"llama", "output.weight", "lm_head.weight", 0},
        {"llama", "output_norm.weight", "model.norm.weight", 0},
        {"llama", "blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 0},
        {"llama", "blk.31.attn_output.weight", "model.layers.31.self_attn.o_proj.weight", 0},
        {"qwen2", "blk.3.attn_k.bias", "model.layers.3.self_attn.k_proj.bias", 0},
        {"llama", "blk.12.ffn_gate.weight", "model.layers.12.mlp.gate_proj.weight", 0},
        {"llama", "blk.12.ffn_up.weight", "model.layers.12.mlp.up_proj.weight", 0},
        {"llama", "blk.12.ffn_down.weight", "model.layers.12.mlp.down_proj.weight", 0},
        {"llama", "blk.2.attn_norm.weight", "model.layers.2.input_layernorm.weight", 0},
        {"llama", "blk.2.ffn_norm.weight", "model.layers.2.post_attention_layernorm.weight", 0},
        {"qwen3", "blk.2.attn_q_norm.weight", "model.layers.2.self_attn.q_norm.weight", 0},
        {"llama", "blk.1.ffn_gate_inp.weight", "model.layers.1.block_sparse_moe.gate.weight", 0},
        {"qwen3moe", "blk.1.ffn_gate_inp.weight", "model.layers.1.mlp.gate.weight", 0},
        {"llama", "rope_freqs.weight", "", 1},
        {"llama", "blk.01.attn_q.weight", "", -1},
        {"llama", "blk.x.attn_q.weight", "", -1},
        {"llama", "blk.1.attn_qq.weight", "", -1},
        {"llama", "output_extra.weight", "", -1},
        {"gemma3", "token_embd.weight", "", -1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int rc = gguf_name_to_hf(cases[i].arch, cases[i].g, out, sizeof out);
        if (rc != cases[i].rc) fail_msg("%s: rc %d", cases[i].g, rc);
        if (rc == 0) assert_string_equal(out, cases[i].h);
    }
    assert_int_equal(gguf_name_to_hf("llama", "blk.0.attn_q.weight", out, 10), -1); /* too small */
    assert_true(gguf_arch_permutes_qk("llama"));
    assert_false(gguf_arch_permutes_qk("qwen2"));
}

static void test_qk_permute(void **state) {
    (void)state;
    /* 2 heads of head_dim 4, one int per row. HF rows 0..7. */
    int32_t rows[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    mp_error err = {0};
    assert_int_equal(gguf_qk_permute(rows, 8, 4, 2, &err), 0);
    /* GGUF row h*D + 2j + t = HF row h*D + t*D/2 + j */
    int32_t want[8] = {0, 2, 1, 3, 4, 6, 5, 7};
    assert_memory_equal(rows, want, sizeof want);
    assert_int_equal(gguf_qk_unpermute(rows, 8, 4, 2, &err), 0);
    for (int i = 0; i < 8; i++)
        assert_int_equal(rows[i], i);
    /* head_dim 8, 3 heads, rows of 3 floats */
    float m[24][3], orig[24][3];
    for (int r = 0; r < 24; r++)
        for (int c = 0; c < 3; c++)
            orig[r][c] = m[r][c] = (float)(r * 10 + c);
    assert_int_equal(gguf_qk_permute(m, 24, sizeof m[0], 3, &err), 0);
    assert_true(m[8 + 2 * 1 + 1][2] == orig[8 + 4 + 1][2]);
    assert_int_equal(gguf_qk_unpermute(m, 24, sizeof m[0], 3, &err), 0);
    assert_memory_equal(m, orig, sizeof m);
    assert_int_equal(gguf_qk_unpermute(m, 24, sizeof m[0], 5, &err), -1);
    assert_int_equal(gguf_qk_unpermute(m, 6, sizeof m[0], 2, &err), -1); /* odd head_dim */
}

static void test_hf_config(void **state) {
    (void)state;
    json_t *meta = json_pack("{s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:f, s:f, s:[s,s,s], s:i}",
                             "general.architecture", "llama", "llama.embedding_length", 4096,
                             "llama.block_count", 32, "llama.feed_forward_length", 14336,
                             "llama.attention.head_count", 32, "llama.attention.head_count_kv", 8,
                             "llama.context_length", 8192, "llama.attention.layer_norm_rms_epsilon",
                             1e-5, "llama.rope.freq_base", 500000.0, "tokenizer.ggml.tokens", "a",
                             "b", "c", "tokenizer.ggml.bos_token_id", 1);
    mp_error err = {0};
    json_t *cfg = gguf_hf_config(meta, &err);
    assert_non_null(cfg);
    assert_string_equal(json_string_value(json_array_get(json_object_get(cfg, "architectures"), 0)),
                        "LlamaForCausalLM");
    assert_string_equal(json_string_value(json_object_get(cfg, "model_type")), "llama");
    assert_int_equal(json_integer_value(json_object_get(cfg, "hidden_size")), 4096);
    assert_int_equal(json_integer_value(json_object_get(cfg, "intermediate_size")), 14336);
    assert_int_equal(json_integer_value(json_object_get(cfg, "num_attention_heads")), 32);
    assert_int_equal(json_integer_value(json_object_get(cfg, "num_key_value_heads")), 8);
    assert_int_equal(json_integer_value(json_object_get(cfg, "num_hidden_layers")), 32);
    assert_int_equal(json_integer_value(json_object_get(cfg, "max_position_embeddings")), 8192);
    assert_int_equal(json_integer_value(json_object_get(cfg, "vocab_size")), 3);
    assert_int_equal(json_integer_value(json_object_get(cfg, "bos_token_id")), 1);
    assert_true(json_real_value(json_object_get(cfg, "rms_norm_eps")) == 1e-5);
    assert_true(json_real_value(json_object_get(cfg, "rope_theta")) == 500000.0);
    json_decref(cfg);
    json_object_set_new(meta, "general.architecture", json_string("gemma3"));
    assert_null(gguf_hf_config(meta, &err));
    assert_string_equal(err.code, "unsupported_format");
    json_object_set_new(meta, "general.architecture", json_string("llama"));
    json_object_del(meta, "llama.block_count");
    assert_null(gguf_hf_config(meta, &err));
    assert_string_equal(err.code, "bad_header");
    json_decref(meta);
}

static void test_type_table(void **state) {
    (void)state;
    assert_string_equal(gguf_type_name(GGUF_T_Q4_K), "Q4_K");
    assert_string_equal(gguf_type_name(GGUF_T_BF16), "BF16");
    assert_null(gguf_type_name(4));
    assert_null(gguf_type_name(31));
    assert_null(gguf_type_name(-1));
    assert_null(gguf_type_name(43));
    assert_int_equal(gguf_type_from_name("Q6_K"), GGUF_T_Q6_K);
    assert_int_equal(gguf_type_block_size(GGUF_T_Q4_K), 256);
    assert_int_equal(gguf_type_block_bytes(GGUF_T_Q4_K), 144);
    assert_int_equal(gguf_type_block_bytes(GGUF_T_Q6_K), 210);
    assert_int_equal(gguf_type_block_bytes(GGUF_T_Q5_1), 24);
    assert_int_equal(gguf_type_block_bytes(GGUF_T_MXFP4), 17);
    uint64_t rb;
    assert_true(gguf_row_bytes(GGUF_T_Q4_0, 4096, &rb) && rb == 128 * 18);
    assert_false(gguf_row_bytes(GGUF_T_Q4_0, 4097, &rb));
    assert_int_equal(gguf_type_dtype(GGUF_T_I16), MP_DT_I16);
    assert_int_equal(gguf_type_dtype(GGUF_T_Q8_0), MP_DT_GGML);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_file),   cmocka_unit_test(test_bad_magic),
        cmocka_unit_test(test_versions),     cmocka_unit_test(test_absurd_counts),
        cmocka_unit_test(test_huge_strings), cmocka_unit_test(test_bad_keys_and_values),
        cmocka_unit_test(test_alignment),    cmocka_unit_test(test_tensor_infos),
        cmocka_unit_test(test_not_found),    cmocka_unit_test(test_dequant_simple),
        cmocka_unit_test(test_dequant_k),    cmocka_unit_test(test_dequant_out_types),
        cmocka_unit_test(test_half),         cmocka_unit_test(test_names),
        cmocka_unit_test(test_qk_permute),   cmocka_unit_test(test_hf_config),
        cmocka_unit_test(test_type_table),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
