/*
 * test_st_crypt.c - encrypted safetensors: key files, a writer -> reader
 * round trip over several chunks, the file staying a valid safetensors file
 * for header-only readers, and every kind of tampering failing with
 * decryption_failed (wrong key, a flipped data byte, an edited header).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loader/formats/safetensors/safetensors.h"

static char dir[64];
static unsigned char KEY[32];

static int setup(void **state) {
    (void)state;
    snprintf(dir, sizeof dir, "/tmp/test_stc.XXXXXX");
    for (int i = 0; i < 32; i++)
        KEY[i] = (unsigned char)(i * 7 + 3);
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static void put_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

static void test_key_files(void **state) {
    (void)state;
    char p[128];
    unsigned char k[32];
    mp_error err = {0};
    snprintf(p, sizeof p, "%s/raw.key", dir);
    put_file(p, KEY, 32);
    assert_int_equal(stc_key_load(p, k, &err), 0);
    assert_memory_equal(k, KEY, 32);
    char hex[80];
    for (int i = 0; i < 32; i++)
        sprintf(hex + 2 * i, "%02X", KEY[i]);
    strcat(hex, "\n");
    snprintf(p, sizeof p, "%s/hex.key", dir);
    put_file(p, hex, strlen(hex));
    memset(k, 0, 32);
    assert_int_equal(stc_key_load(p, k, &err), 0);
    assert_memory_equal(k, KEY, 32);
    snprintf(p, sizeof p, "%s/short.key", dir);
    put_file(p, "abcd", 4);
    assert_int_equal(stc_key_load(p, k, &err), -1);
    assert_string_equal(err.code, "bad_key");
    hex[10] = 'g';
    snprintf(p, sizeof p, "%s/badhex.key", dir);
    put_file(p, hex, strlen(hex));
    assert_int_equal(stc_key_load(p, k, &err), -1);
    assert_string_equal(err.code, "bad_key");
    snprintf(p, sizeof p, "%s/none.key", dir);
    assert_int_equal(stc_key_load(p, k, &err), -1);
    assert_string_equal(err.code, "not_found");
}

/* Two tensors, 10000 + 3000 bytes of a known pattern, in 4 KiB chunks. */
#define A_N 2500
#define B_N 1500
static void pattern(unsigned char *a, unsigned char *b) {
    for (int i = 0; i < A_N * 4; i++)
        a[i] = (unsigned char)(i * 31 + 1);
    for (int i = 0; i < B_N * 2; i++)
        b[i] = (unsigned char)(i * 17 + 5);
}

static void write_enc(const char *path) {
    st_wtensor ts[2] = {{"alpha", MP_DT_F32, 1, {A_N}}, {"beta", MP_DT_BF16, 2, {30, 50}}};
    unsigned char a[A_N * 4], b[B_N * 2];
    pattern(a, b);
    json_t *meta = json_pack("{s:s}", "format", "pt");
    stc_writer *w = NULL;
    mp_error err = {0};
    assert_int_equal(stc_writer_open(path, ts, 2, meta, KEY, 4096, &w, &err), 0);
    json_decref(meta);
    for (size_t k = 0; k < 2; k++) {
        size_t i = stc_writer_order(w, k);
        /* uneven write sizes: the writer re-chunks */
        const unsigned char *p = i == 0 ? a : b;
        size_t n = i == 0 ? sizeof a : sizeof b;
        assert_int_equal(stc_writer_write(w, p, 7, &err), 0);
        assert_int_equal(stc_writer_write(w, p + 7, n - 7, &err), 0);
    }
    assert_int_equal(stc_writer_finish(w, &err), 0);
}

static int read_tensor(const char *path, const unsigned char *key, const char *name, void *dst,
                       mp_error *err) {
    mp_weights w = {0};
    if (st_open(path, &w, err) != 0) return -1;
    stc_file f;
    int rc = stc_file_open(&w, &f, err);
    stc_cache c = {0};
    for (size_t i = 0; rc == 0 && i < w.ntensors; i++)
        if (strcmp(w.tensors[i].name, name) == 0)
            rc = stc_read(&f, w.fds[0], key, w.tensors[i].data_offset, dst, w.tensors[i].nbytes, &c,
                          err);
    stc_cache_free(&c);
    stc_file_free(&f);
    weights_free_fields(&w);
    return rc;
}

static void test_round_trip(void **state) {
    (void)state;
    char p[128];
    snprintf(p, sizeof p, "%s/m.safetensors", dir);
    write_enc(p);
    /* A valid safetensors file whose header needs no key. */
    mp_weights w = {0};
    mp_error err = {0};
    assert_int_equal(st_open(p, &w, &err), 0);
    assert_int_equal(w.ntensors, 2);
    assert_true(stc_is_encrypted(&w));
    assert_string_equal(json_string_value(json_object_get(w.metadata, "format")), "pt");
    assert_string_equal(json_string_value(json_object_get(w.metadata, "encryption")), STC_SCHEME);
    stc_file f;
    assert_int_equal(stc_file_open(&w, &f, &err), 0);
    assert_true(f.encrypted);
    assert_int_equal(f.chunk_bytes, 4096);
    assert_int_equal(f.data_len, A_N * 4 + B_N * 2);
    assert_int_equal(f.nchunks, (A_N * 4 + B_N * 2 + 4095) / 4096);
    /* The data on disk is not the plaintext. */
    unsigned char a[A_N * 4], b[B_N * 2], got[A_N * 4];
    pattern(a, b);
    unsigned char raw[64];
    const mp_tensor *ta = strcmp(w.tensors[0].name, "alpha") == 0 ? &w.tensors[0] : &w.tensors[1];
    assert_int_equal(weights_pread(w.fds[0], raw, 64, ta->data_offset, &err), 0);
    assert_memory_not_equal(raw, a, 64);
    stc_file_free(&f);
    weights_free_fields(&w);
    assert_int_equal(read_tensor(p, KEY, "alpha", got, &err), 0);
    assert_memory_equal(got, a, sizeof a);
    assert_int_equal(read_tensor(p, KEY, "beta", got, &err), 0);
    assert_memory_equal(got, b, sizeof b);
}

static void test_wrong_key(void **state) {
    (void)state;
    char p[128];
    snprintf(p, sizeof p, "%s/k.safetensors", dir);
    write_enc(p);
    unsigned char bad[32], got[A_N * 4];
    memcpy(bad, KEY, 32);
    bad[31] ^= 1;
    mp_error err = {0};
    memset(got, 0x55, sizeof got);
    assert_int_equal(read_tensor(p, bad, "alpha", got, &err), -1);
    assert_string_equal(err.code, "decryption_failed");
}

static void flip(const char *path, uint64_t off) {
    int fd = open(path, O_RDWR);
    assert_true(fd >= 0);
    unsigned char c;
    assert_int_equal(pread(fd, &c, 1, (off_t)off), 1);
    c ^= 0x01;
    assert_int_equal(pwrite(fd, &c, 1, (off_t)off), 1);
    close(fd);
}

static void test_tampered_data(void **state) {
    (void)state;
    char p[128];
    snprintf(p, sizeof p, "%s/t.safetensors", dir);
    write_enc(p);
    mp_weights w = {0};
    mp_error err = {0};
    assert_int_equal(st_open(p, &w, &err), 0);
    stc_file f;
    assert_int_equal(stc_file_open(&w, &f, &err), 0);
    uint64_t last = f.data_start + f.data_len - 1;
    stc_file_free(&f);
    weights_free_fields(&w);
    flip(p, last); /* the last chunk's last byte: beta's tail */
    unsigned char got[A_N * 4];
    assert_int_equal(read_tensor(p, KEY, "beta", got, &err), -1);
    assert_string_equal(err.code, "decryption_failed");
    /* Chunks before it are intact: each chunk is authenticated alone. */
    assert_int_equal(read_tensor(p, KEY, "alpha", got, &err), 0);
}

static void test_tampered_header(void **state) {
    (void)state;
    char p[128];
    snprintf(p, sizeof p, "%s/h.safetensors", dir);
    write_enc(p);
    /* Rename "alpha" to "alphb" in the header: same length, still valid. */
    int fd = open(p, O_RDWR);
    char hdr[4096];
    ssize_t n = pread(fd, hdr, sizeof hdr - 1, 8);
    assert_true(n > 0);
    hdr[n] = 0;
    char *at = strstr(hdr, "\"alpha\"");
    assert_non_null(at);
    assert_int_equal(pwrite(fd, "b", 1, 8 + (at - hdr) + 5), 1);
    close(fd);
    unsigned char got[A_N * 4];
    mp_error err = {0};
    assert_int_equal(read_tensor(p, KEY, "alphb", got, &err), -1);
    assert_string_equal(err.code, "decryption_failed");
}

static void test_writer_checks(void **state) {
    (void)state;
    char p[128];
    snprintf(p, sizeof p, "%s/w.safetensors", dir);
    st_wtensor ts[1] = {{"x", MP_DT_F32, 1, {4}}};
    stc_writer *w = NULL;
    mp_error err = {0};
    assert_int_equal(stc_writer_open(p, ts, 1, NULL, KEY, 1000, &w, &err), -1); /* not 2^k */
    json_t *meta = json_pack("{s:s}", "enc_nonce", "00");
    assert_int_equal(stc_writer_open(p, ts, 1, meta, KEY, 0, &w, &err), -1); /* reserved key */
    json_decref(meta);
    assert_int_equal(stc_writer_open(p, ts, 1, NULL, KEY, 0, &w, &err), 0);
    assert_int_equal(stc_writer_write(w, "abcd", 4, &err), 0);
    assert_int_equal(stc_writer_finish(w, &err), -1); /* 4 of 16 bytes */
    assert_int_equal(access(p, F_OK), -1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key_files),       cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_wrong_key),       cmocka_unit_test(test_tampered_data),
        cmocka_unit_test(test_tampered_header), cmocka_unit_test(test_writer_checks),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
