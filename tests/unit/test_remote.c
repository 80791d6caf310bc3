/*
 * test_remote.c - the pure parts of loader/remote and loader/models'
 * remote references: what an s3:// or redis:// string may say, SGLang's
 * one-tensor safetensors header, the AWS credentials file, AWS URI
 * encoding, and ListObjectsV2 pages (good, odd and hostile).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loader/models/models.h"
#include "loader/remote/remote.h"
#include "loader/remote/remote_internal.h"

static int parse(const char *s, bool secrets, mref_remote *r) {
    mp_error e = {0};
    return mref_remote_parse(s, strlen(s), secrets, "model", r, &e);
}

static void test_remote_refs(void **state) {
    (void)state;
    mref_remote r;
    assert_int_equal(parse("s3://my-bucket.v2/org/model/v1/", false, &r), 0);
    assert_int_equal(r.scheme, MREF_S3);
    assert_string_equal(r.bucket, "my-bucket.v2");
    assert_string_equal(r.prefix, "org/model/v1");
    assert_int_equal(parse("redis://10.0.0.5:7000/llama/8b", false, &r), 0);
    assert_int_equal(r.scheme, MREF_REDIS);
    assert_string_equal(r.host, "10.0.0.5");
    assert_int_equal(r.port, 7000);
    assert_string_equal(r.model_name, "llama/8b");
    assert_int_equal(parse("redis://cache/m", false, &r), 0);
    assert_int_equal(r.port, 6379);
    assert_int_equal(parse("redis://[::1]:6380/m", false, &r), 0);
    assert_string_equal(r.host, "::1");
    assert_int_equal(r.port, 6380);
    assert_int_equal(parse("redis://u%40x:p%3Aw@h:1/m", true, &r), 0);
    assert_string_equal(r.user, "u@x");
    assert_string_equal(r.password, "p:w");
    assert_true(r.has_password);
    assert_int_equal(parse("redis://:pw@h/m", true, &r), 0);
    assert_string_equal(r.user, "");
    assert_string_equal(r.password, "pw");
    static const char *const bad[] = {"redis://:pw@h/m", /* secrets not allowed in a model */
                                      "s3://Bucket/x",
                                      "s3://ab/x",
                                      "s3://bucket",
                                      "s3://bucket/",
                                      "s3://bucket/a//b",
                                      "s3://bucket/a/../b",
                                      "s3://bucket/./b",
                                      "s3://bucket/a b",
                                      "s3://bucket/a*",
                                      "s3://-bucket/x",
                                      "s3://bu..cket/x",
                                      "s3://bucket/x?y",
                                      "redis://h:0/m",
                                      "redis://h:65536/m",
                                      "redis://h:/m",
                                      "redis://h",
                                      "redis://h/",
                                      "redis://h/m*",
                                      "redis://h/m[1]",
                                      "redis://h/m?x",
                                      "redis://h_x/m",
                                      "redis://[::1/m",
                                      "http://x/y",
                                      "redis://u:%zz@h/m",
                                      NULL};
    for (int i = 0; bad[i]; i++) {
        bool secrets = i > 0;
        if (parse(bad[i], secrets, &r) == 0) fail_msg("accepted %s", bad[i]);
    }
    mp_error e = {0};
    assert_int_equal(mref_remote_parse("s3://b\0ucket/x", 14, false, "model", &r, &e), -1);
    assert_string_equal(e.field, "model");
    char dir[256];
    assert_int_equal(parse("s3://bucket/a/b", false, &r), 0);
    assert_int_equal(mref_remote_local_dir("/data", &r, dir, sizeof dir, &e), 0);
    assert_string_equal(dir, "/data/remote/s3/bucket/a/b");
    assert_true(mref_is_remote("s3://x") && mref_is_remote("redis://x") &&
                !mref_is_remote("org/name") && !mref_is_remote("/models/x"));
}

/* Bytes from safetensors.torch.save({"tensor_bytes": torch.zeros(2, 3,
 * dtype=torch.bfloat16)}) and of a 0-d float32: header and padding. */
static void test_st1_header(void **state) {
    (void)state;
    char h[REMOTE_ST1_HDR_MAX];
    int64_t shape[2] = {2, 3};
    size_t n = remote_st1_header(MP_DT_BF16, 2, shape, 12, h);
    const char want[] = "{\"tensor_bytes\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":"
                        "[0,12]}}   ";
    assert_int_equal(n, 8 + 72);
    assert_int_equal((unsigned char)h[0], 72);
    for (int i = 1; i < 8; i++)
        assert_int_equal(h[i], 0);
    assert_memory_equal(h + 8, want, 72);
    n = remote_st1_header(MP_DT_F32, 0, shape, 4, h);
    assert_int_equal(n, 8 + 64);
    assert_memory_equal(
        h + 8, "{\"tensor_bytes\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}", 64);
    assert_int_equal(remote_st1_header(MP_DT_GGML, 1, shape, 4, h), 0);
    int64_t neg[1] = {-1};
    assert_int_equal(remote_st1_header(MP_DT_F32, 1, neg, 4, h), 0);
}

static void test_creds_file(void **state) {
    (void)state;
    char path[] = "/tmp/test_remote_credsXXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char text[] = "# comment\n[other]\naws_access_key_id = NO\n\n[default]\n"
                        "aws_access_key_id = AKID\naws_secret_access_key=  se/cr+et \n"
                        "region = eu-west-3\n";
    assert_int_equal(write(fd, text, sizeof text - 1), (ssize_t)(sizeof text - 1));
    close(fd);
    unsetenv("AWS_PROFILE");
    remote_s3_creds c;
    mp_error e = {0};
    assert_int_equal(remote_s3_creds_load(path, &c, &e), 0);
    assert_string_equal(c.access_key, "AKID");
    assert_string_equal(c.secret_key, "se/cr+et");
    assert_string_equal(c.region, "eu-west-3");
    assert_string_equal(c.session_token, "");
    remote_s3_creds_clear(&c);
    assert_string_equal(c.secret_key, "");
    setenv("AWS_PROFILE", "other", 1);
    assert_int_equal(remote_s3_creds_load(path, &c, &e), -1);
    assert_string_equal(e.code, "bad_credentials");
    assert_null(strstr(e.message, "NO"));
    setenv("AWS_PROFILE", "missing", 1);
    assert_int_equal(remote_s3_creds_load(path, &c, &e), -1);
    unsetenv("AWS_PROFILE");
    unlink(path);
    setenv("AWS_ACCESS_KEY_ID", "A", 1);
    unsetenv("AWS_SECRET_ACCESS_KEY");
    assert_int_equal(remote_s3_creds_load(NULL, &c, &e), -1);
    setenv("AWS_SECRET_ACCESS_KEY", "bad\nsecret", 1);
    assert_int_equal(remote_s3_creds_load(NULL, &c, &e), -1);
    assert_null(strstr(e.message, "secret\n"));
    setenv("AWS_SECRET_ACCESS_KEY", "S", 1);
    setenv("AWS_REGION", "ap-south-1", 1);
    assert_int_equal(remote_s3_creds_load(NULL, &c, &e), 0);
    assert_string_equal(c.region, "ap-south-1");
    unsetenv("AWS_ACCESS_KEY_ID");
    unsetenv("AWS_SECRET_ACCESS_KEY");
    unsetenv("AWS_REGION");
    assert_int_equal(remote_s3_creds_load(NULL, &c, &e), 0);
    assert_string_equal(c.access_key, "");
    assert_string_equal(c.region, "us-east-1");
}

static void test_uri_and_endpoint(void **state) {
    (void)state;
    char b[64];
    assert_int_equal(s3_uri_encode(b, sizeof b, "a b/c~d+e=f", true), 0);
    assert_string_equal(b, "a%20b/c~d%2Be%3Df");
    assert_int_equal(s3_uri_encode(b, sizeof b, "a/b", false), 0);
    assert_string_equal(b, "a%2Fb");
    assert_int_equal(s3_uri_encode(b, 4, "abcd", false), -1);
    assert_true(remote_endpoint_valid("http://127.0.0.1:9000"));
    assert_true(remote_endpoint_valid("https://s3.example.com/"));
    assert_false(remote_endpoint_valid("http://u:p@host"));
    assert_false(remote_endpoint_valid("http://host/path"));
    assert_false(remote_endpoint_valid("ftp://host"));
    assert_false(remote_endpoint_valid("http://"));
    assert_false(remote_endpoint_valid("http://ho st"));
}

static int page(const char *xml, s3_listing *l, char *tok, bool *trunc) {
    mp_error e = {0};
    return s3_parse_list_page(xml, strlen(xml), l, tok, 256, trunc, &e);
}

static void test_list_pages(void **state) {
    (void)state;
    s3_listing l = {0};
    char tok[256];
    bool trunc;
    assert_int_equal(
        page("<?xml version=\"1.0\"?><ListBucketResult><Name>b</Name>"
             "<Contents><Key>m/a&amp;b.json</Key><ETag>&quot;abc&quot;</ETag><Size>12</Size>"
             "</Contents><Contents><Key>m/x</Key><Size>0</Size></Contents>"
             "<IsTruncated>true</IsTruncated><NextContinuationToken>t/1+=</NextContinuationToken>"
             "</ListBucketResult>",
             &l, tok, &trunc),
        0);
    assert_int_equal(l.n, 2);
    assert_string_equal(l.objs[0].key, "m/a&b.json");
    assert_string_equal(l.objs[0].etag, "abc");
    assert_int_equal(l.objs[0].size, 12);
    assert_string_equal(l.objs[1].etag, "");
    assert_true(trunc);
    assert_string_equal(tok, "t/1+=");
    s3_listing_free(&l);
    static const char *const bad[] = {
        "<Error><Code>x</Code></Error>",
        "<ListBucketResult><Contents><Key>k</Key><Size>-1</Size></Contents></ListBucketResult>",
        "<ListBucketResult><Contents><Key>k</Key><Size>1x</Size></Contents></ListBucketResult>",
        "<ListBucketResult><Contents><Key>k</Key><Size>99999999999999999999999</Size></Contents>"
        "</ListBucketResult>",
        "<ListBucketResult><Contents><Key>k</Key></Contents></ListBucketResult>",
        "<ListBucketResult><Contents><Key>k&bogus;</Key><Size>1</Size></Contents>"
        "</ListBucketResult>",
        "<ListBucketResult><Contents><Key>k</Key><Size>1</Size>",
        "<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>",
        NULL};
    for (int i = 0; bad[i]; i++) {
        memset(&l, 0, sizeof l);
        if (page(bad[i], &l, tok, &trunc) == 0) fail_msg("accepted %s", bad[i]);
        s3_listing_free(&l);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_remote_refs), cmocka_unit_test(test_st1_header),
        cmocka_unit_test(test_creds_file),  cmocka_unit_test(test_uri_and_endpoint),
        cmocka_unit_test(test_list_pages),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
