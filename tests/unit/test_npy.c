/*
 * test_npy.c - .npy header parsing against numpy's exact bytes and hostile
 * headers, the writer's numpy-identical header, fortran-order gathering,
 * and the npcache directory (write, open, sidecar dtypes, bad names).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loader/formats/npy/npy.h"
#include "loader/formats/safetensors/safetensors.h"
#include "loader/formats/weights.h"

static char tmpdir[256];

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static int setup(void **state) {
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test_npy.XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    return nftw(tmpdir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
}

static char *tpath(const char *name) {
    static char buf[4][512];
    static int k;
    char *p = buf[k++ % 4];
    snprintf(p, 512, "%s/%s", tmpdir, name);
    return p;
}

static void write_bytes(const char *path, const void *b, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

/* np.save(np.zeros((3,4), np.float32)) header, byte for byte (numpy 1.24) */
static const char NP_F4_3x4[] =
    "\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }"
    "                                                          \n";
/* np.save(np.zeros(5, np.int8)) */
static const char NP_I1_5[] =
    "\x93NUMPY\x01\x00v\x00{'descr': '|i1', 'fortran_order': False, 'shape': (5,), }"
    "                                                            \n";
/* np.save(np.float16(1.0)) */
static const char NP_F2_SCALAR[] =
    "\x93NUMPY\x01\x00v\x00{'descr': '<f2', 'fortran_order': False, 'shape': (), }"
    "                                                              \n";

static void test_header_matches_numpy(void **state) {
    (void)state;
    char buf[256];
    mp_error err = {0};
    int64_t s34[2] = {3, 4}, s5[1] = {5};
    assert_int_equal(sizeof NP_F4_3x4 - 1, 128);
    assert_int_equal(npy_header(MP_DT_F32, s34, 2, buf, sizeof buf, &err), 128);
    assert_memory_equal(buf, NP_F4_3x4, 128);
    assert_int_equal(npy_header(MP_DT_I8, s5, 1, buf, sizeof buf, &err), 128);
    assert_memory_equal(buf, NP_I1_5, 128);
    assert_int_equal(npy_header(MP_DT_F16, NULL, 0, buf, sizeof buf, &err), 128);
    assert_memory_equal(buf, NP_F2_SCALAR, 128);
    /* bit-pattern storage for what numpy cannot name; none for F4 */
    assert_string_equal(npy_descr(MP_DT_BF16), "<u2");
    assert_string_equal(npy_descr(MP_DT_F8_E4M3), "|u1");
    assert_null(npy_descr(MP_DT_F4));
    assert_null(npy_descr(MP_DT_GGML));
    assert_int_equal(npy_header(MP_DT_F4, s5, 1, buf, sizeof buf, &err), 0);
    assert_string_equal(err.code, "bad_request");
    assert_int_equal(npy_header(MP_DT_F32, s34, 2, buf, 100, &err), 0);
    /* every header we write is parsed back to the same tensor */
    int64_t big[8] = {1, 2, 3, 4, 5, 6, 7, 123456789012};
    size_t n = npy_header(MP_DT_I64, big, 8, buf, sizeof buf, &err);
    assert_int_equal(n % 64, 0);
    mp_tensor t = {0};
    assert_int_equal(npy_parse_header((unsigned char *)buf, n, &t, &err), 0);
    assert_int_equal(t.ndim, 8);
    assert_int_equal(t.shape[7], 123456789012);
    assert_int_equal(t.data_offset, n);
}

static const char *parse_code(const char *dict) {
    static mp_error err;
    unsigned char buf[512];
    size_t dl = strlen(dict);
    memcpy(buf, "\x93NUMPY\x01\x00", 8);
    buf[8] = (unsigned char)dl;
    buf[9] = 0;
    memcpy(buf + 10, dict, dl);
    mp_tensor t = {0};
    memset(&err, 0, sizeof err);
    return npy_parse_header(buf, 10 + dl, &t, &err) == 0 ? "" : err.code;
}

static void test_header_grammar(void **state) {
    (void)state;
    assert_string_equal(parse_code("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }\n"),
                        "");
    assert_string_equal(parse_code("{\"shape\":(3L,4L),\"descr\":\"<i8\",\"fortran_order\":True}"),
                        "");
    assert_string_equal(parse_code("{'descr': '|b1', 'fortran_order': False, 'shape': (0,)}   \n"),
                        "");
    assert_string_equal(parse_code("{'descr': '<f4', 'fortran_order': False, 'shape': (5)}"),
                        "bad_header");
    assert_string_equal(parse_code("{'descr': '<f4', 'fortran_order': False, 'shape': (-5,)}"),
                        "bad_header");
    assert_string_equal(parse_code("{'descr': '<f4', 'fortran_order': False, 'shape': [5]}"),
                        "bad_header");
    assert_string_equal(parse_code("{'descr': '<f4', 'fortran_order': False, 'shape': (5,,)}"),
                        "bad_header");
    assert_string_equal(parse_code("{'descr': '<f4', 'fortran_order': 0, 'shape': (5,)}"),
                        "bad_header");
    assert_string_equal(parse_code("{'descr': '<f4', 'shape': (5,)}"), "bad_header");
    assert_string_equal(
        parse_code("{'descr': '<f4', 'fortran_order': False, 'shape': (5,), 'x': 1}"),
        "bad_header");
    assert_string_equal(
        parse_code("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (5,)}"),
        "bad_header");
    assert_string_equal(parse_code("{'descr': '<f4' 'fortran_order': False, 'shape': (5,)}"),
                        "bad_header");
    assert_string_equal(parse_code("{'descr': '<f4', 'fortran_order': False, 'shape': (5,)} x"),
                        "bad_header");
    assert_string_equal(parse_code("{'descr': '<f\\4', 'fortran_order': False, 'shape': (5,)}"),
                        "bad_header");
    assert_string_equal(parse_code("{'descr': '<f4, 'fortran_order': False, 'shape': (5,)}"),
                        "bad_header");
    assert_string_equal(
        parse_code("{'descr': '<f4', 'fortran_order': False, 'shape': (1,2,3,4,5,6,7,8,9)}"),
        "bad_header");
    assert_string_equal(
        parse_code("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,)}"),
        "bad_header");
    assert_string_equal(
        parse_code("{'descr': '<f8', 'fortran_order': False, 'shape': (4611686018427387904, 4)}"),
        "bad_header");
    assert_string_equal(parse_code("{'descr': '>f4', 'fortran_order': False, 'shape': (5,)}"),
                        "unsupported_format");
    assert_string_equal(parse_code("{'descr': '|O', 'fortran_order': False, 'shape': (5,)}"),
                        "unsupported_format");
    assert_string_equal(parse_code("{'descr': '<c16', 'fortran_order': False, 'shape': (5,)}"),
                        "unsupported_format");
    assert_string_equal(
        parse_code("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (5,)}"),
        "bad_header");
    assert_string_equal(parse_code(""), "bad_header");

    /* preamble */
    mp_error err = {0};
    mp_tensor t = {0};
    assert_int_equal(npy_parse_header((const unsigned char *)"\x93NUMPY\x01", 7, &t, &err), -1);
    assert_string_equal(err.code, "truncated");
    assert_int_equal(
        npy_parse_header((const unsigned char *)"\x93NUMPX\x01\x00\x00\x00", 10, &t, &err), -1);
    assert_string_equal(err.code, "bad_header");
    assert_int_equal(
        npy_parse_header((const unsigned char *)"\x93NUMPY\x04\x00\x00\x00", 10, &t, &err), -1);
    assert_string_equal(err.code, "unsupported_format");
    assert_int_equal(
        npy_parse_header((const unsigned char *)"\x93NUMPY\x01\x00\x76\x00{}", 12, &t, &err), -1);
    assert_string_equal(err.code, "truncated");
    assert_int_equal(
        npy_parse_header((const unsigned char *)"\x93NUMPY\x02\x00\xff\xff\xff\xff", 12, &t, &err),
        -1);
    assert_string_equal(err.code, "too_large");
}

static void test_files(void **state) {
    (void)state;
    mp_error err = {0};
    mp_weights *w;
    /* a numpy file with data */
    unsigned char f[128 + 48];
    memcpy(f, NP_F4_3x4, 128);
    for (int i = 0; i < 12; i++) {
        float v = (float)i;
        memcpy(f + 128 + 4 * i, &v, 4);
    }
    write_bytes(tpath("w.npy"), f, sizeof f);
    assert_int_equal(weights_detect(tpath("w.npy"), &err), MP_FMT_NPY);
    assert_int_equal(weights_open(tpath("w.npy"), &w, &err), 0);
    assert_int_equal(w->ntensors, 1);
    assert_string_equal(w->tensors[0].name, "w");
    assert_int_equal(w->tensors[0].data_offset, 128);
    float out[12];
    assert_int_equal(weights_read(w, &w->tensors[0], out, &err), 0);
    assert_true(out[11] == 11.0f);
    weights_close(w);
    /* truncated data, trailing data, every prefix */
    write_bytes(tpath("t.npy"), f, sizeof f - 1);
    assert_int_equal(weights_open(tpath("t.npy"), &w, &err), -1);
    assert_string_equal(err.code, "truncated");
    unsigned char g[sizeof f + 1];
    memcpy(g, f, sizeof f);
    g[sizeof f] = 0;
    write_bytes(tpath("t.npy"), g, sizeof g);
    assert_int_equal(weights_open(tpath("t.npy"), &w, &err), -1);
    assert_string_equal(err.code, "bad_header");
    for (size_t len = 0; len < sizeof f; len++) {
        mp_weights one = {0};
        write_bytes(tpath("t.npy"), f, len);
        assert_int_equal(npy_open(tpath("t.npy"), &one, &err), -1);
        assert_null(one.tensors);
    }
    /* bit flips: no crash, and what opens reads */
    for (size_t bit = 0; bit < 128 * 8; bit++) {
        f[bit / 8] ^= (unsigned char)(1u << (bit % 8));
        write_bytes(tpath("t.npy"), f, sizeof f);
        mp_weights one = {0};
        if (npy_open(tpath("t.npy"), &one, &err) == 0) {
            if (one.tensors[0].nbytes <= sizeof out)
                assert_int_equal(weights_read(&one, &one.tensors[0], out, &err), 0);
            weights_free_fields(&one);
        }
        f[bit / 8] ^= (unsigned char)(1u << (bit % 8));
    }
    /* fortran order is gathered into C order */
    const char *hdr = "{'descr': '<i4', 'fortran_order': True, 'shape': (2, 3), }";
    unsigned char ff[10 + 64 + 24];
    memset(ff, ' ', sizeof ff);
    memcpy(ff, "\x93NUMPY\x01\x00\x40\x00", 10);
    memcpy(ff + 10, hdr, strlen(hdr));
    ff[10 + 63] = '\n';
    int32_t fdata[6] = {0, 3, 1, 4, 2, 5}; /* column-major [[0,1,2],[3,4,5]] */
    memcpy(ff + 74, fdata, 24);
    write_bytes(tpath("f.npy"), ff, sizeof ff);
    assert_int_equal(weights_open(tpath("f.npy"), &w, &err), 0);
    assert_true(w->tensors[0].is_view);
    int32_t c[6];
    assert_int_equal(weights_read(w, &w->tensors[0], c, &err), 0);
    for (int i = 0; i < 6; i++)
        assert_int_equal(c[i], i);
    weights_close(w);
    /* our writer: same bytes as numpy; and refuses a size mismatch */
    int64_t s34[2] = {3, 4};
    float vals[12];
    memcpy(vals, f + 128, 48);
    assert_int_equal(npy_write(tpath("o.npy"), MP_DT_F32, s34, 2, vals, 48, &err), 0);
    FILE *fp = fopen(tpath("o.npy"), "rb");
    unsigned char back[200];
    assert_int_equal(fread(back, 1, sizeof back, fp), 176);
    fclose(fp);
    assert_memory_equal(back, f, 176);
    assert_int_equal(npy_write(tpath("o.npy"), MP_DT_F32, s34, 2, vals, 44, &err), -1);
    assert_int_not_equal(access(tpath("o.npy.tmp"), F_OK), 0);
}

/* Builds a safetensors file with a BF16, an F32 and an F8 tensor. */
static void make_source(const char *path) {
    st_wtensor ts[3] = {{"model.embed.weight", MP_DT_BF16, 2, {2, 2}},
                        {"model.norm.weight", MP_DT_F32, 1, {3}},
                        {"scale", MP_DT_F8_E4M3, 0, {0}}};
    st_writer *sw;
    mp_error err = {0};
    assert_int_equal(st_writer_open(path, ts, 3, NULL, &sw, &err), 0);
    for (size_t k = 0; k < 3; k++) {
        size_t i = st_writer_order(sw, k);
        uint64_t nb;
        mp_tensor_bytes(ts[i].dtype, ts[i].shape, ts[i].ndim, &nb);
        for (uint64_t j = 0; j < nb; j++) {
            unsigned char b = (unsigned char)(i * 16 + j);
            assert_int_equal(st_writer_write(sw, &b, 1, &err), 0);
        }
    }
    assert_int_equal(st_writer_finish(sw, &err), 0);
}

static void test_npcache(void **state) {
    (void)state;
    mp_error err = {0};
    make_source(tpath("src.safetensors"));
    mp_weights *src, *nc;
    assert_int_equal(weights_open(tpath("src.safetensors"), &src, &err), 0);
    assert_int_equal(npcache_write_dir(src, tpath("np"), &err), 0);
    assert_int_equal(access(tpath("np/weight_names.json"), F_OK), 0);
    assert_int_equal(access(tpath("np/weight_dtypes.json"), F_OK), 0);
    assert_int_equal(access(tpath("np/model.embed.weight"), F_OK), 0);
    assert_int_equal(weights_detect(tpath("np"), &err), MP_FMT_NPY);
    assert_int_equal(weights_open(tpath("np"), &nc, &err), 0);
    assert_int_equal(nc->format, MP_FMT_NPY);
    assert_int_equal(nc->ntensors, src->ntensors);
    for (size_t i = 0; i < src->ntensors; i++) {
        const mp_tensor *a = &src->tensors[i], *b = &nc->tensors[i];
        assert_string_equal(a->name, b->name); /* weight_names.json keeps the order */
        assert_int_equal(a->dtype, b->dtype);  /* BF16/F8 restored from the sidecar */
        assert_int_equal(a->ndim, b->ndim);
        assert_int_equal(a->nbytes, b->nbytes);
        unsigned char x[64], y[64];
        assert_int_equal(weights_read(src, a, x, &err), 0);
        assert_int_equal(weights_read(nc, b, y, &err), 0);
        assert_memory_equal(x, y, a->nbytes);
    }
    weights_close(nc);

    /* the ".npy" fallback name */
    assert_int_equal(rename(tpath("np/scale"), tpath("np/scale.npy")), 0);
    assert_int_equal(weights_open(tpath("np"), &nc, &err), 0);
    weights_close(nc);
    /* a sidecar dtype that does not fit the stored one */
    const char *bad_dt = "{\"model.norm.weight\": \"BF16\"}";
    write_bytes(tpath("np/weight_dtypes.json"), bad_dt, strlen(bad_dt));
    assert_int_equal(weights_open(tpath("np"), &nc, &err), -1);
    assert_string_equal(err.code, "bad_header");
    /* names list: duplicates, paths, non-strings, missing files */
    const char *bad[] = {
        "[\"scale\", \"scale\"]", "[\"../src.safetensors\"]", "[\"a/b\"]", "[1]", "{}",
        "[\"weight_names.json\"]"};
    unlink(tpath("np/weight_dtypes.json"));
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        write_bytes(tpath("np/weight_names.json"), bad[i], strlen(bad[i]));
        assert_int_equal(weights_open(tpath("np"), &nc, &err), -1);
        assert_string_equal(err.code, "bad_header");
    }
    write_bytes(tpath("np/weight_names.json"), "[\"gone\"]", 8);
    assert_int_equal(weights_open(tpath("np"), &nc, &err), -1);
    assert_string_equal(err.code, "not_found");

    /* names that cannot be file names are refused before anything is written */
    free(src->tensors[0].name);
    src->tensors[0].name = strdup("../evil");
    assert_int_equal(npcache_write_dir(src, tpath("np2"), &err), -1);
    assert_string_equal(err.code, "bad_request");
    assert_int_not_equal(access(tpath("np2"), F_OK), 0);
    free(src->tensors[0].name);
    src->tensors[0].name = strdup("scale");
    assert_int_equal(npcache_write_dir(src, tpath("np2"), &err), -1);
    assert_string_equal(err.code, "bad_request");
    src->tensors[0].dtype = MP_DT_F4;
    free(src->tensors[0].name);
    src->tensors[0].name = strdup("x");
    assert_int_equal(npcache_write_dir(src, tpath("np2"), &err), -1);
    assert_string_equal(err.code, "bad_request");
    weights_close(src);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_header_matches_numpy),
        cmocka_unit_test(test_header_grammar),
        cmocka_unit_test(test_files),
        cmocka_unit_test(test_npcache),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
