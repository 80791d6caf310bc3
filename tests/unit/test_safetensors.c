/*
 * test_safetensors.c - the safetensors reader against hostile headers, the
 * writer's byte-exact output (reference examples), the sharded index, the
 * directory/index merge in weights_open, and weights_read's view gather.
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

#include "loader/formats/formats_internal.h" /* weights_add_file */
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
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test_st.XXXXXX");
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

static unsigned char *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)len + 1);
    assert_int_equal(fread(b, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    *n = (size_t)len;
    return b;
}

/* File = u64 len(header) + header + data. */
static void make_st(const char *path, const char *header, const void *data, size_t dlen) {
    size_t hl = strlen(header);
    unsigned char *b = malloc(8 + hl + dlen + 1);
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(b + 8, header, hl);
    if (dlen) memcpy(b + 8 + hl, data, dlen);
    write_bytes(path, b, 8 + hl + dlen);
    free(b);
}

/* Opens path with st_open and returns the error code ("" on success). */
static const char *open_code(const char *path) {
    static mp_error err;
    mp_weights w = {0};
    memset(&err, 0, sizeof err);
    int rc = st_open(path, &w, &err);
    if (rc == 0) {
        /* a file that opens must also read */
        char buf[4096];
        for (size_t i = 0; i < w.ntensors; i++)
            if (w.tensors[i].nbytes <= sizeof buf)
                assert_int_equal(weights_read(&w, &w.tensors[i], buf, &err), 0);
        weights_free_fields(&w);
        return "";
    }
    assert_non_null(err.code[0] ? err.code : NULL);
    assert_null(w.tensors);
    assert_int_equal(w.nfiles, 0);
    return err.code;
}

static const char *hdr_code(const char *header, size_t dlen) {
    unsigned char data[256] = {0};
    assert_true(dlen <= sizeof data);
    make_st(tpath("h.safetensors"), header, data, dlen);
    return open_code(tpath("h.safetensors"));
}

static void test_valid_file(void **state) {
    (void)state;
    float a[6] = {1, 2, 3, 4, 5, 6};
    uint16_t b[2] = {0x3c00, 0xc000};
    unsigned char data[16];
    memcpy(data, b, 4);
    memcpy(data + 4, a, 12); /* b at [0,4), a at [4,16): offsets order is not key order */
    make_st(tpath("v.safetensors"),
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[4,16]},"
            "\"__metadata__\":{\"format\":\"pt\",\"x\":\"y\"},"
            "\"b\":{\"dtype\":\"F16\",\"shape\":[1,2],\"data_offsets\":[0,4],\"extra\":1}}  ",
            data, 16);
    mp_weights *w;
    mp_error err = {0};
    assert_int_equal(weights_open(tpath("v.safetensors"), &w, &err), 0);
    assert_int_equal(w->format, MP_FMT_SAFETENSORS);
    assert_int_equal(w->ntensors, 2);
    assert_string_equal(w->tensors[0].name, "b"); /* file order */
    assert_int_equal(w->tensors[0].dtype, MP_DT_F16);
    assert_int_equal(w->tensors[0].ndim, 2);
    assert_int_equal(w->tensors[0].strides[0], 2);
    assert_int_equal(w->tensors[1].nbytes, 12);
    assert_string_equal(json_string_value(json_object_get(w->metadata, "x")), "y");
    float out[3];
    assert_int_equal(weights_read(w, &w->tensors[1], out, &err), 0);
    assert_memory_equal(out, a, 12);
    weights_close(w);

    /* the mapped path reads the same bytes */
    mp_weights m = {0};
    assert_int_equal(st_open_mmap(tpath("v.safetensors"), &m, &err), 0);
    const void *p = st_data(&m, &m.tensors[1]);
    assert_non_null(p);
    assert_memory_equal(p, a, 12);
    memset(out, 0, sizeof out);
    assert_int_equal(weights_read(&m, &m.tensors[1], out, &err), 0);
    assert_memory_equal(out, a, 12);
    weights_free_fields(&m);
}

static void test_hostile_lengths(void **state) {
    (void)state;
    write_bytes(tpath("s"), "\x02\0\0\0", 4);
    assert_string_equal(open_code(tpath("s")), "truncated");
    write_bytes(tpath("s"), "", 0);
    assert_string_equal(open_code(tpath("s")), "truncated");
    /* N = 10^8 + 1 */
    unsigned char big[16] = {0x01, 0xe1, 0xf5, 0x05, 0, 0, 0, 0, '{', '}'};
    write_bytes(tpath("s"), big, 10);
    assert_string_equal(open_code(tpath("s")), "too_large");
    unsigned char huge[10] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, '{', '}'};
    write_bytes(tpath("s"), huge, 10);
    assert_string_equal(open_code(tpath("s")), "too_large");
    unsigned char beyond[10] = {64, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    write_bytes(tpath("s"), beyond, 10);
    assert_string_equal(open_code(tpath("s")), "truncated");
    /* the reference's 16-byte empty file */
    write_bytes(tpath("s"), "\x08\0\0\0\0\0\0\0{}      ", 16);
    assert_string_equal(open_code(tpath("s")), "");
    /* a directory is not a safetensors file */
    assert_string_equal(open_code(tmpdir), "unsupported_format");
    assert_string_equal(open_code(tpath("missing")), "not_found");
}

static void test_hostile_headers(void **state) {
    (void)state;
    const char *ok1 = "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    assert_string_equal(hdr_code(ok1, 8), "");
    assert_string_equal(
        hdr_code(" \n\t{\"t\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1]}} ", 1), "");
    assert_string_equal(hdr_code("{\"__metadata__\":null}", 0), "");
    assert_string_equal(hdr_code("{}", 0), "");
    /* structure */
    assert_string_equal(hdr_code("[]", 0), "bad_header");
    assert_string_equal(hdr_code("{", 0), "bad_header");
    assert_string_equal(hdr_code("{}x", 0), "bad_header");
    /* NUL padding is not JSON whitespace */
    write_bytes(tpath("nul"), "\x08\0\0\0\0\0\0\0{}\0\0\0\0\0\0", 16);
    assert_string_equal(open_code(tpath("nul")), "bad_header");
    assert_string_equal(hdr_code("{\"t\":5}", 0), "bad_header");
    assert_string_equal(hdr_code("{\"t\":{\"shape\":[],\"data_offsets\":[0,1]}}", 1), "bad_header");
    assert_string_equal(hdr_code("\xff{}", 0), "bad_header");
    /* duplicates (jansson would merge them silently) */
    assert_string_equal(hdr_code("{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                                 "\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
                                 2),
                        "bad_header");
    assert_string_equal(hdr_code("{\"__metadata__\":{\"a\":\"1\",\"a\":\"2\"}}", 0), "bad_header");
    /* metadata must be string -> string */
    assert_string_equal(hdr_code("{\"__metadata__\":{\"a\":1}}", 0), "bad_header");
    assert_string_equal(hdr_code("{\"__metadata__\":{\"a\":null}}", 0), "bad_header");
    assert_string_equal(hdr_code("{\"__metadata__\":[\"a\"]}", 0), "bad_header");
    assert_string_equal(hdr_code("{\"__metadata__\":\"x\"}", 0), "bad_header");
    /* dtype / shape / offsets */
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"F128\",\"shape\":[1],\"data_offsets\":[0,16]}}", 16),
        "bad_header");
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"GGML\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1),
        "bad_header");
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4),
        "bad_header");
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"U8\",\"shape\":[1.0],\"data_offsets\":[0,1]}}", 1),
        "bad_header");
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,1]}}", 1),
        "bad_header");
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"U8\",\"shape\":[\"1\"],\"data_offsets\":[0,1]}}", 1),
        "bad_header");
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,2]}}", 1),
        "bad_header");
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[-1,0]}}", 1),
        "bad_header");
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}", 2),
        "bad_header");
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,0]}}", 1),
        "bad_header");
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,1]}}", 1),
        "bad_header");
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}",
                 1),
        "unsupported_format");
    /* gaps and overlaps */
    assert_string_equal(hdr_code("{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},"
                                 "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[1,3]}}",
                                 3),
                        "bad_header");
    assert_string_equal(hdr_code("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                                 "\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[2,3]}}",
                                 3),
                        "bad_header");
    /* sizes: overflowing shapes, F4 halves, file length exactness */
    assert_string_equal(
        hdr_code(
            "{\"t\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,4],\"data_offsets\":[0,0]}}",
            0),
        "bad_header");
    assert_string_equal(
        hdr_code(
            "{\"t\":{\"dtype\":\"U64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,0]}}",
            0),
        "bad_header");
    assert_string_equal(
        hdr_code(
            "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,9223372036854775807]}}", 1),
        "bad_header");
    assert_string_equal(
        hdr_code(
            "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,99999999999999999999]}}",
            1),
        "bad_header");
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}}", 2),
        "bad_header");
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"F4\",\"shape\":[4],\"data_offsets\":[0,2]}}", 2), "");
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"F6_E2M3\",\"shape\":[4],\"data_offsets\":[0,3]}}", 3), "");
    assert_string_equal(
        hdr_code("{\"t\":{\"dtype\":\"F6_E3M2\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2),
        "bad_header");
    assert_string_equal(hdr_code(ok1, 7), "truncated");
    assert_string_equal(hdr_code(ok1, 9), "bad_header");
    assert_string_equal(hdr_code("{}", 1), "bad_header");
    /* zero-size and scalar tensors */
    assert_string_equal(
        hdr_code("{\"e\":{\"dtype\":\"F32\",\"shape\":[0,3],\"data_offsets\":[0,0]},"
                 "\"s\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[0,8]}}",
                 8),
        "");
}

/* Each bit of a valid file flipped, and each prefix: never a crash, and a
 * file that opens can be read. */
static void test_flips_and_prefixes(void **state) {
    (void)state;
    const char *h = "{\"__metadata__\":{\"format\":\"pt\"},"
                    "\"a\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[0,8]},"
                    "\"b\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[8,12]}}";
    unsigned char data[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    make_st(tpath("f.safetensors"), h, data, 12);
    size_t n;
    unsigned char *orig = read_all(tpath("f.safetensors"), &n);
    int opened = 0;
    for (size_t bit = 0; bit < n * 8; bit++) {
        orig[bit / 8] ^= (unsigned char)(1u << (bit % 8));
        write_bytes(tpath("g.safetensors"), orig, n);
        if (open_code(tpath("g.safetensors"))[0] == 0) opened++;
        orig[bit / 8] ^= (unsigned char)(1u << (bit % 8));
    }
    assert_true(opened > 0); /* data-byte flips are still valid files */
    for (size_t len = 0; len < n; len++) {
        write_bytes(tpath("g.safetensors"), orig, len);
        assert_string_not_equal(open_code(tpath("g.safetensors")), "");
    }
    free(orig);
}

/* writes tensors (data = byte pattern i) and returns the file's bytes */
static unsigned char *write_with(const st_wtensor *ts, size_t n, json_t *meta, size_t *len,
                                 const char *expect_code) {
    st_writer *w = NULL;
    mp_error err = {0};
    int rc = st_writer_open(tpath("w.safetensors"), ts, n, meta, &w, &err);
    if (expect_code) {
        assert_int_equal(rc, -1);
        assert_string_equal(err.code, expect_code);
        assert_null(w);
        return NULL;
    }
    assert_int_equal(rc, 0);
    for (size_t k = 0; k < n; k++) {
        size_t i = st_writer_order(w, k);
        uint64_t nb;
        assert_true(mp_tensor_bytes(ts[i].dtype, ts[i].shape, ts[i].ndim, &nb));
        for (uint64_t j = 0; j < nb; j++) {
            unsigned char c = (unsigned char)(i * 16 + j);
            assert_int_equal(st_writer_write(w, &c, 1, &err), 0);
        }
    }
    assert_int_equal(st_writer_finish(w, &err), 0);
    assert_int_not_equal(access(tpath("w.safetensors.tmp"), F_OK), 0);
    return read_all(tpath("w.safetensors"), len);
}

static void test_writer_reference_bytes(void **state) {
    (void)state;
    size_t n;
    /* empty: 8 + "{}" + 6 spaces */
    unsigned char *b = write_with(NULL, 0, NULL, &n, NULL);
    assert_int_equal(n, 16);
    assert_memory_equal(b, "\x08\0\0\0\0\0\0\0{}      ", 16);
    free(b);
    /* the 64-byte header example: no padding */
    st_wtensor t1 = {"attn.0", MP_DT_F32, 3, {1, 2, 3}};
    b = write_with(&t1, 1, NULL, &n, NULL);
    assert_int_equal(n, 96);
    assert_int_equal(b[0], 0x40);
    assert_memory_equal(
        b + 8, "{\"attn.0\":{\"dtype\":\"F32\",\"shape\":[1,2,3],\"data_offsets\":[0,24]}}", 64);
    free(b);
    /* metadata alone: 35 bytes padded to 40 */
    json_t *meta = json_pack("{s:s}", "framework", "pt");
    b = write_with(NULL, 0, meta, &n, NULL);
    assert_int_equal(n, 48);
    assert_int_equal(b[0], 40);
    assert_memory_equal(b + 8, "{\"__metadata__\":{\"framework\":\"pt\"}}     ", 40);
    free(b);
    json_decref(meta);
    /* sort: dtype descending (U64 first, BOOL last), then name */
    st_wtensor ts[5] = {{"z", MP_DT_BOOL, 1, {1}},
                        {"b", MP_DT_F16, 0, {0}},
                        {"a", MP_DT_F16, 1, {2}},
                        {"q\"\n\x01", MP_DT_U64, 0, {0}},
                        {"m", MP_DT_F4, 1, {2}}};
    b = write_with(ts, 5, NULL, &n, NULL);
    const char *want =
        "{\"q\\\"\\n\\u0001\":{\"dtype\":\"U64\",\"shape\":[],\"data_offsets\":[0,8]},"
        "\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[8,12]},"
        "\"b\":{\"dtype\":\"F16\",\"shape\":[],\"data_offsets\":[12,14]},"
        "\"m\":{\"dtype\":\"F4\",\"shape\":[2],\"data_offsets\":[14,15]},"
        "\"z\":{\"dtype\":\"BOOL\",\"shape\":[1],\"data_offsets\":[15,16]}}";
    size_t wl = strlen(want), hl = b[0] | (size_t)b[1] << 8;
    assert_int_equal(hl % 8, 0);
    assert_int_equal(hl, (wl + 7) / 8 * 8);
    assert_memory_equal(b + 8, want, wl);
    assert_int_equal(n, 8 + hl + 16);
    assert_int_equal(b[8 + hl], 3 * 16); /* the U64 tensor (input 3) is first */
    free(b);
    /* and our reader takes it back with the same names */
    mp_weights *w;
    mp_error err = {0};
    assert_int_equal(weights_open(tpath("w.safetensors"), &w, &err), 0);
    assert_int_equal(w->ntensors, 5);
    assert_string_equal(w->tensors[0].name, "q\"\n\x01");
    weights_close(w);
}

static void test_writer_errors(void **state) {
    (void)state;
    size_t n;
    st_wtensor dup[2] = {{"a", MP_DT_F16, 1, {2}}, {"a", MP_DT_U8, 1, {2}}};
    write_with(dup, 2, NULL, &n, "bad_request");
    st_wtensor res = {"__metadata__", MP_DT_U8, 1, {1}};
    write_with(&res, 1, NULL, &n, "bad_request");
    st_wtensor f4 = {"x", MP_DT_F4, 1, {3}};
    write_with(&f4, 1, NULL, &n, "bad_request");
    st_wtensor gg = {"x", MP_DT_GGML, 1, {3}};
    write_with(&gg, 1, NULL, &n, "bad_request");
    st_wtensor neg = {"x", MP_DT_U8, 1, {-3}};
    write_with(&neg, 1, NULL, &n, "bad_request");
    st_wtensor bad_utf8 = {"\xc3\x28", MP_DT_U8, 1, {1}};
    write_with(&bad_utf8, 1, NULL, &n, "bad_request");
    json_t *meta = json_pack("{s:i}", "n", 1);
    write_with(NULL, 0, meta, &n, "bad_request");
    json_decref(meta);
    /* each 2^60 bytes is fine, nine of them overflow the data section */
    st_wtensor big[9];
    const char *bn[9] = {"a", "b", "c", "d", "e", "f", "g", "h", "i"};
    for (int i = 0; i < 9; i++)
        big[i] = (st_wtensor){bn[i], MP_DT_U8, 1, {(int64_t)1 << 60}};
    write_with(big, 9, NULL, &n, "too_large");

    /* too much, too little, abort: no file, no temp left */
    st_wtensor one = {"a", MP_DT_U8, 1, {4}};
    st_writer *w;
    mp_error err = {0};
    unlink(tpath("w.safetensors"));
    assert_int_equal(st_writer_open(tpath("w.safetensors"), &one, 1, NULL, &w, &err), 0);
    assert_int_equal(st_writer_data_bytes(w), 4);
    assert_int_equal(st_writer_write(w, "abcde", 5, &err), -1);
    assert_int_equal(st_writer_write(w, "abc", 3, &err), 0);
    assert_int_equal(st_writer_finish(w, &err), -1);
    assert_int_not_equal(access(tpath("w.safetensors"), F_OK), 0);
    assert_int_not_equal(access(tpath("w.safetensors.tmp"), F_OK), 0);
    assert_int_equal(st_writer_open(tpath("w.safetensors"), &one, 1, NULL, &w, &err), 0);
    assert_int_equal(access(tpath("w.safetensors.tmp"), F_OK), 0);
    st_writer_abort(w);
    assert_int_not_equal(access(tpath("w.safetensors.tmp"), F_OK), 0);
    assert_int_equal(st_writer_open("/nonexistent-dir/x.safetensors", &one, 1, NULL, &w, &err), -1);
    assert_string_equal(err.code, "io_error");
}

static void write_shard(const char *name, const char *tname, uint8_t v) {
    st_wtensor t = {tname, MP_DT_U8, 1, {2}};
    st_writer *w;
    mp_error err = {0};
    assert_int_equal(st_writer_open(tpath(name), &t, 1, NULL, &w, &err), 0);
    uint8_t d[2] = {v, v};
    assert_int_equal(st_writer_write(w, d, 2, &err), 0);
    assert_int_equal(st_writer_finish(w, &err), 0);
}

static void test_index(void **state) {
    (void)state;
    mp_error err = {0};
    st_index idx;
    const char *bad[] = {
        "[]",
        "{}",
        "{\"weight_map\":{\"a\":\"../x.safetensors\"}}",
        "{\"weight_map\":{\"a\":\"/etc/passwd\"}}",
        "{\"weight_map\":{\"a\":\"sub/x.safetensors\"}}",
        "{\"weight_map\":{\"a\":\"..\"}}",
        "{\"weight_map\":{\"a\":\"\"}}",
        "{\"weight_map\":{\"a\":5}}",
        "{\"weight_map\":{\"a\":\"x\",\"a\":\"y\"}}",
        "{\"metadata\":{\"total_size\":-5},\"weight_map\":{}}",
        "{\"metadata\":{\"total_size\":\"5\"},\"weight_map\":{}}",
        "{\"metadata\":[],\"weight_map\":{}}",
        "not json",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        write_bytes(tpath("i.json"), bad[i], strlen(bad[i]));
        assert_int_equal(st_index_read(tpath("i.json"), &idx, &err), -1);
        assert_string_equal(err.code, "bad_header");
        assert_null(idx.names);
    }
    assert_int_equal(st_index_read(tpath("nope.json"), &idx, &err), -1);
    assert_string_equal(err.code, "not_found");

    mkdir(tpath("m"), 0755);
    write_shard("m/model-00001-of-00002.safetensors", "x.weight", 1);
    write_shard("m/model-00002-of-00002.safetensors", "y.weight", 2);
    const char *good = "{\"metadata\":{\"total_size\":4.0,\"total_parameters\":4},\"weight_map\":{"
                       "\"y.weight\":\"model-00002-of-00002.safetensors\","
                       "\"x.weight\":\"model-00001-of-00002.safetensors\"}}";
    write_bytes(tpath("m/model.safetensors.index.json"), good, strlen(good));
    assert_int_equal(st_index_read(tpath("m/model.safetensors.index.json"), &idx, &err), 0);
    assert_int_equal(idx.nfiles, 2);
    assert_int_equal(idx.nnames, 2);
    assert_string_equal(idx.names[0], "x.weight");
    assert_string_equal(idx.files[idx.file_of[1]], "model-00002-of-00002.safetensors");
    assert_true(idx.has_total_size);
    assert_int_equal(idx.total_size, 4);
    /* write, read back, same content; text as huggingface_hub writes it */
    assert_int_equal(st_index_write(tpath("out.json"), &idx, &err), 0);
    st_index_free(&idx);
    size_t n;
    unsigned char *txt = read_all(tpath("out.json"), &n);
    const char *want =
        "{\n  \"metadata\": {\n    \"total_parameters\": 4,\n    \"total_size\": 4\n  },\n"
        "  \"weight_map\": {\n    \"x.weight\": \"model-00001-of-00002.safetensors\",\n"
        "    \"y.weight\": \"model-00002-of-00002.safetensors\"\n  }\n}\n";
    assert_int_equal(n, strlen(want));
    assert_memory_equal(txt, want, n);
    free(txt);

    /* weights_open: the directory, the index file; both merge the shards */
    const char *paths[2] = {tpath("m"), tpath("m/model.safetensors.index.json")};
    for (int k = 0; k < 2; k++) {
        mp_weights *w;
        assert_int_equal(weights_detect(paths[k], &err), MP_FMT_SAFETENSORS);
        assert_int_equal(weights_open(paths[k], &w, &err), 0);
        assert_int_equal(w->nfiles, 2);
        assert_int_equal(w->ntensors, 2);
        uint8_t d[2];
        for (size_t i = 0; i < 2; i++) {
            assert_int_equal(weights_read(w, &w->tensors[i], d, &err), 0);
            assert_int_equal(d[0], strcmp(w->tensors[i].name, "x.weight") == 0 ? 1 : 2);
            assert_string_equal(w->files[w->tensors[i].file_index] + strlen(tpath("m/")) - 0,
                                i == 0 ? "model-00001-of-00002.safetensors"
                                       : "model-00002-of-00002.safetensors");
        }
        weights_close(w);
    }
    /* an index that lies about where a tensor is */
    const char *liar = "{\"weight_map\":{\"x.weight\":\"model-00002-of-00002.safetensors\","
                       "\"y.weight\":\"model-00002-of-00002.safetensors\"}}";
    write_bytes(tpath("m/model.safetensors.index.json"), liar, strlen(liar));
    mp_weights *w;
    assert_int_equal(weights_open(tpath("m"), &w, &err), -1);
    assert_string_equal(err.code, "bad_header");
    const char *missing = "{\"weight_map\":{\"x.weight\":\"model-00003-of-00002.safetensors\"}}";
    write_bytes(tpath("m/model.safetensors.index.json"), missing, strlen(missing));
    assert_int_equal(weights_open(tpath("m"), &w, &err), -1);
    assert_string_equal(err.code, "not_found");
    /* no index: all *.safetensors; the same name in two shards is refused */
    unlink(tpath("m/model.safetensors.index.json"));
    assert_int_equal(weights_open(tpath("m"), &w, &err), 0);
    assert_int_equal(w->ntensors, 2);
    weights_close(w);
    write_shard("m/model-extra.safetensors", "x.weight", 3);
    assert_int_equal(weights_open(tpath("m"), &w, &err), -1);
    assert_string_equal(err.code, "bad_header");
    mkdir(tpath("empty"), 0755);
    assert_int_equal(weights_open(tpath("empty"), &w, &err), -1);
    assert_string_equal(err.code, "not_found");
}

static void test_detect(void **state) {
    (void)state;
    mp_error err = {0};
    write_bytes(tpath("d1"), "PK\x03\x04rest", 8);
    assert_int_equal(weights_detect(tpath("d1"), &err), MP_FMT_PT_ZIP);
    write_bytes(tpath("d2"), "GGUF\x03\0\0\0", 8);
    assert_int_equal(weights_detect(tpath("d2"), &err), MP_FMT_GGUF);
    write_bytes(tpath("d3"), "\x93NUMPY\x01\0", 8);
    assert_int_equal(weights_detect(tpath("d3"), &err), MP_FMT_NPY);
    write_bytes(tpath("d4"), "\x80\x02\x8a\x0a", 4);
    assert_int_equal(weights_detect(tpath("d4"), &err), MP_FMT_PT_LEGACY);
    write_bytes(tpath("d5"), "\x08\0\0\0\0\0\0\0{}      ", 16);
    assert_int_equal(weights_detect(tpath("d5"), &err), MP_FMT_SAFETENSORS);
    /* header length 640 = bytes 80 02 ..., which also opens a pickle */
    char h640[8 + 640];
    memset(h640, ' ', sizeof h640);
    memcpy(h640, "\x80\x02\0\0\0\0\0\0{}", 10);
    write_bytes(tpath("d7"), h640, sizeof h640);
    assert_int_equal(weights_detect(tpath("d7"), &err), MP_FMT_SAFETENSORS);
    mp_weights *w7;
    assert_int_equal(weights_open(tpath("d7"), &w7, &err), 0);
    weights_close(w7);
    write_bytes(tpath("d6"), "hello world, not weights", 24);
    assert_int_equal(weights_detect(tpath("d6"), &err), MP_FMT_UNKNOWN);
    assert_string_equal(err.code, "unsupported_format");
    mp_weights *w;
    assert_int_equal(weights_open(tpath("d6"), &w, &err), -1);
    assert_string_equal(err.code, "unsupported_format");
    /* a FIFO must not hang any opener */
    assert_int_equal(mkfifo(tpath("fifo"), 0600), 0);
    assert_int_equal(weights_detect(tpath("fifo"), &err), MP_FMT_UNKNOWN);
    assert_string_equal(err.code, "unsupported_format");
    assert_int_equal(weights_open(tpath("fifo"), &w, &err), -1);
    mp_weights z = {0};
    assert_int_equal(st_open(tpath("fifo"), &z, &err), -1);
    assert_string_equal(err.code, "unsupported_format");
    assert_int_equal(npy_open(tpath("fifo"), &z, &err), -1);
    assert_int_equal(weights_detect(tpath("nothing"), &err), MP_FMT_UNKNOWN);
    assert_string_equal(err.code, "not_found");
}

/* A PyTorch-style view: strides and a storage offset into a storage range. */
static void test_view_gather(void **state) {
    (void)state;
    /* storage: 4 bytes junk, then int32 storage of 12 elements 0..11, then junk */
    unsigned char file[4 + 48 + 4];
    memset(file, 0xee, sizeof file);
    for (int32_t i = 0; i < 12; i++)
        memcpy(file + 4 + 4 * i, &i, 4);
    write_bytes(tpath("storage.bin"), file, sizeof file);
    mp_weights w = {0};
    mp_error err = {0};
    int fd = open(tpath("storage.bin"), O_RDONLY | O_CLOEXEC);
    assert_true(fd >= 0);
    assert_int_equal(weights_add_file(&w, tpath("storage.bin"), fd, &err), 0);
    mp_tensor *t = weights_add_tensor(&w, &err);
    assert_int_equal(t->storage_id, -1);
    assert_int_equal(t->ggml_type, -1);
    t->name = strdup("v");
    t->dtype = MP_DT_I32;
    t->data_offset = 4;
    t->data_bytes = 48;
    /* the transpose of a 3x4 matrix: shape [4,3], strides [1,4] */
    t->ndim = 2;
    t->shape[0] = 4;
    t->shape[1] = 3;
    t->strides[0] = 1;
    t->strides[1] = 4;
    t->is_view = true;
    t->nbytes = 48;
    int32_t out[12];
    assert_int_equal(weights_read(&w, t, out, &err), 0);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 3; j++)
            assert_int_equal(out[i * 3 + j], j * 4 + i);
    /* a row slice with offset: rows 1..2 of the 3x4 matrix, columns 1..2 */
    t->shape[0] = 2;
    t->shape[1] = 2;
    t->strides[0] = 4;
    t->strides[1] = 1;
    t->storage_offset = 5;
    t->nbytes = 16;
    assert_int_equal(weights_read(&w, t, out, &err), 0);
    assert_int_equal(out[0], 5);
    assert_int_equal(out[1], 6);
    assert_int_equal(out[2], 9);
    assert_int_equal(out[3], 10);
    /* contiguous but offset: element 7.. as a 1-D view */
    t->ndim = 1;
    t->shape[0] = 5;
    t->strides[0] = 1;
    t->storage_offset = 7;
    t->nbytes = 20;
    assert_int_equal(weights_read(&w, t, out, &err), 0);
    assert_int_equal(out[0], 7);
    assert_int_equal(out[4], 11);
    /* one past the storage: refused, not read from the trailing junk */
    t->storage_offset = 8;
    assert_int_equal(weights_read(&w, t, out, &err), -1);
    assert_string_equal(err.code, "bad_header");
    /* an expanded (stride 0) view and a scalar view */
    t->shape[0] = 3;
    t->strides[0] = 0;
    t->storage_offset = 11;
    t->nbytes = 12;
    assert_int_equal(weights_read(&w, t, out, &err), 0);
    assert_int_equal(out[0], 11);
    assert_int_equal(out[2], 11);
    t->ndim = 0;
    t->storage_offset = 3;
    t->nbytes = 4;
    assert_int_equal(weights_read(&w, t, out, &err), 0);
    assert_int_equal(out[0], 3);
    /* strides that reach beyond the storage, negative offset, overflow */
    t->ndim = 2;
    t->shape[0] = 3;
    t->shape[1] = 4;
    t->strides[0] = 5;
    t->strides[1] = 1;
    t->storage_offset = 0;
    t->nbytes = 48;
    assert_int_equal(weights_read(&w, t, out, &err), -1);
    t->strides[0] = 4;
    t->storage_offset = -1;
    assert_int_equal(weights_read(&w, t, out, &err), -1);
    t->storage_offset = 0;
    t->strides[0] = INT64_MAX / 2;
    assert_int_equal(weights_read(&w, t, out, &err), -1);
    t->strides[0] = -4;
    assert_int_equal(weights_read(&w, t, out, &err), -1);
    t->strides[0] = 4;
    t->nbytes = 40; /* disagrees with shape */
    assert_int_equal(weights_read(&w, t, out, &err), -1);
    t->nbytes = 48;
    assert_int_equal(weights_read(&w, t, out, &err), 0);
    assert_int_equal(out[11], 11);
    /* a storage range past the end of file: "truncated" from pread */
    t->is_view = false;
    mp_tensor_set_contiguous(t);
    t->data_bytes = 1000;
    assert_int_equal(weights_read(&w, t, out, &err), 0); /* 48 bytes from 4 fit */
    t->data_offset = 40;
    assert_int_equal(weights_read(&w, t, out, &err), -1);
    assert_string_equal(err.code, "truncated");
    weights_free_fields(&w);
}

static void test_dtype_table(void **state) {
    (void)state;
    for (int i = MP_DT_BOOL; i < MP_DT_GGML; i++)
        assert_int_equal(mp_dtype_from_name(mp_dtype_name((mp_dtype)i)), i);
    assert_int_equal(mp_dtype_from_name("GGML"), MP_DT_INVALID);
    assert_int_equal(mp_dtype_from_name(NULL), MP_DT_INVALID);
    assert_int_equal(mp_dtype_bits(MP_DT_F6_E2M3), 6);
    assert_int_equal(mp_dtype_bits(MP_DT_C64), 64);
    assert_true(mp_dtype_is_float(MP_DT_F8_E8M0));
    assert_false(mp_dtype_is_float(MP_DT_BOOL));
    int64_t s[3] = {INT64_MAX, 2, 0};
    uint64_t n;
    assert_false(mp_shape_numel(s, 2, &n));
    assert_true(mp_shape_numel(s + 1, 2, &n));
    assert_int_equal(n, 0);
    assert_false(mp_tensor_bytes(MP_DT_F4, s + 1, 0, &n)); /* one F4 = half a byte */
    int64_t s2[1] = {INT64_MAX};
    assert_false(
        mp_tensor_bytes(MP_DT_U8, s2, 1, &n)); /* bit count overflows, as in the reference */
    s2[0] = (int64_t)1 << 60;
    assert_true(mp_tensor_bytes(MP_DT_U8, s2, 1, &n));
    assert_false(mp_tensor_bytes(MP_DT_F32, s2, 1, &n));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dtype_table),
        cmocka_unit_test(test_valid_file),
        cmocka_unit_test(test_hostile_lengths),
        cmocka_unit_test(test_hostile_headers),
        cmocka_unit_test(test_flips_and_prefixes),
        cmocka_unit_test(test_writer_reference_bytes),
        cmocka_unit_test(test_writer_errors),
        cmocka_unit_test(test_index),
        cmocka_unit_test(test_detect),
        cmocka_unit_test(test_view_gather),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
