/*
 * test_convert.c - the pure helpers of convert: huggingface_hub's shard
 * split (including its oversized-tensor ordering quirk), shard names, dtype
 * casts (round to nearest even, NaN/Inf, subnormals), dtype parsing, default
 * output names, output confinement, which files count as weights, and the
 * dtype written into config.json.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loader/convert/convert.h"

static void test_plan_shards(void **state) {
    (void)state;
    uint32_t of[8];
    /* fits: one shard */
    uint64_t a[] = {10, 20, 30};
    assert_int_equal(conv_plan_shards(a, 3, 100, of), 1);
    assert_int_equal(of[0] + of[1] + of[2], 0);
    /* a new shard starts when adding would pass the limit (== limit fits) */
    uint64_t b[] = {40, 60, 1, 99, 1};
    assert_int_equal(conv_plan_shards(b, 5, 100, of), 3);
    assert_int_equal(of[0], 0);
    assert_int_equal(of[1], 0);
    assert_int_equal(of[2], 1);
    assert_int_equal(of[3], 1);
    assert_int_equal(of[4], 2);
    /* an oversized tensor is appended as its own shard when met, before the
     * shard still being filled (huggingface_hub's order) */
    uint64_t c[] = {10, 500, 20, 90};
    assert_int_equal(conv_plan_shards(c, 4, 100, of), 3);
    assert_int_equal(of[1], 0); /* the big one first */
    assert_int_equal(of[0], 1);
    assert_int_equal(of[2], 1);
    assert_int_equal(of[3], 2);
    /* only oversized */
    uint64_t d[] = {500, 600};
    assert_int_equal(conv_plan_shards(d, 2, 100, of), 2);
    assert_int_equal(of[0], 0);
    assert_int_equal(of[1], 1);
    /* zero-byte tensors ride along */
    uint64_t e[] = {0, 0, 100, 0};
    assert_int_equal(conv_plan_shards(e, 4, 100, of), 1);
    assert_int_equal(conv_plan_shards(e, 0, 100, of), 0);
}

static void test_shard_names(void **state) {
    (void)state;
    char nm[64];
    conv_shard_name(0, 1, nm, sizeof nm);
    assert_string_equal(nm, "model.safetensors");
    conv_shard_name(0, 3, nm, sizeof nm);
    assert_string_equal(nm, "model-00001-of-00003.safetensors");
    conv_shard_name(11, 12, nm, sizeof nm);
    assert_string_equal(nm, "model-00012-of-00012.safetensors");
}

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void test_cast(void **state) {
    (void)state;
    float src[] = {1.0f,
                   -2.0f,
                   INFINITY,
                   -INFINITY,
                   NAN,
                   65504.0f,
                   65520.0f,
                   1e-8f,
                   0.0f,
                   -0.0f,
                   bits_f32(0x3f808000u), /* 1 + 2^-8: tie in bf16, even -> 1.0 */
                   bits_f32(0x3f818000u), /* 1 + 3*2^-8: tie, rounds up to even */
                   bits_f32(0x3f808001u)};
    size_t n = sizeof src / sizeof *src;
    uint16_t bf[16], h[16];
    assert_true(conv_cast(MP_DT_F32, MP_DT_BF16, src, bf, n));
    assert_true(conv_cast(MP_DT_F32, MP_DT_F16, src, h, n));
    assert_int_equal(bf[0], 0x3f80);
    assert_int_equal(bf[1], 0xc000);
    assert_int_equal(bf[2], 0x7f80);
    assert_int_equal(bf[3], 0xff80);
    assert_true((bf[4] & 0x7f80) == 0x7f80 && (bf[4] & 0x7f) != 0); /* still NaN */
    assert_int_equal(bf[10], 0x3f80);
    assert_int_equal(bf[11], 0x3f82);
    assert_int_equal(bf[12], 0x3f81);
    assert_int_equal(h[0], 0x3c00);
    assert_int_equal(h[2], 0x7c00);
    assert_int_equal(h[3], 0xfc00);
    assert_true((h[4] & 0x7c00) == 0x7c00 && (h[4] & 0x3ff) != 0);
    assert_int_equal(h[5], 0x7bff);     /* max finite */
    assert_int_equal(h[6], 0x7c00);     /* 65520 rounds to inf */
    assert_int_equal(h[7], 0x0000 + 0); /* 1e-8 < half the smallest subnormal: +0 */
    assert_int_equal(h[9], 0x8000);
    /* back to f32 is exact */
    float back[16];
    assert_true(conv_cast(MP_DT_BF16, MP_DT_F32, bf, back, n));
    assert_int_equal(f32_bits(back[0]), 0x3f800000u);
    assert_true(isnan(back[4]));
    assert_true(conv_cast(MP_DT_F16, MP_DT_F32, h, back, n));
    assert_true(back[5] == 65504.0f && isinf(back[6]));
    /* f16 -> bf16 through f32 */
    uint16_t hb[16];
    assert_true(conv_cast(MP_DT_F16, MP_DT_BF16, h, hb, n));
    assert_int_equal(hb[0], 0x3f80);
    /* f64 goes through float, as torch's Half/BFloat16 constructors do */
    double d[] = {1.0, 1e300, -3.5};
    uint16_t db[3];
    assert_true(conv_cast(MP_DT_F64, MP_DT_BF16, d, db, 3));
    assert_int_equal(db[0], 0x3f80);
    assert_int_equal(db[1], 0x7f80);
    assert_int_equal(db[2], 0xc060);
    /* a long run crosses the internal block size */
    size_t big = 10000;
    float *x = malloc(big * sizeof *x);
    uint16_t *y = malloc(big * sizeof *y);
    float *z = malloc(big * sizeof *z);
    for (size_t i = 0; i < big; i++)
        x[i] = (float)i * 0.25f;
    assert_true(conv_cast(MP_DT_F32, MP_DT_F16, x, y, big));
    assert_true(conv_cast(MP_DT_F16, MP_DT_F32, y, z, big));
    assert_true(z[9999] == 2500.0f); /* 2499.75: f16 spacing is 2 there */
    assert_true(z[100] == 25.0f);
    free(x);
    free(y);
    free(z);
    /* refused pairs */
    assert_false(conv_cast(MP_DT_I32, MP_DT_F16, src, h, 1));
    assert_false(conv_cast(MP_DT_F32, MP_DT_F64, src, h, 1));
    assert_true(conv_castable(MP_DT_F64));
    assert_false(conv_castable(MP_DT_F8_E4M3));
}

static void test_parse_dtype_and_names(void **state) {
    (void)state;
    mp_dtype dt;
    assert_true(conv_parse_dtype(NULL, &dt) && dt == MP_DT_INVALID);
    assert_true(conv_parse_dtype("keep", &dt) && dt == MP_DT_INVALID);
    assert_true(conv_parse_dtype("bf16", &dt) && dt == MP_DT_BF16);
    assert_true(conv_parse_dtype("fp16", &dt) && dt == MP_DT_F16);
    assert_true(conv_parse_dtype("fp32", &dt) && dt == MP_DT_F32);
    assert_false(conv_parse_dtype("int4", &dt));
    char nm[256];
    assert_true(conv_default_name("org/name", "main", true, nm, sizeof nm));
    assert_string_equal(nm, "org--name-main");
    assert_true(conv_default_name("org/name", "refs/pr/1", true, nm, sizeof nm));
    assert_string_equal(nm, "org--name-refs_pr_1");
    assert_true(conv_default_name("/models/llama-7b/", NULL, false, nm, sizeof nm));
    assert_string_equal(nm, "llama-7b");
    assert_false(conv_default_name("/", NULL, false, nm, sizeof nm));
    assert_false(conv_default_name("/m/.hidden", NULL, false, nm, sizeof nm));
    assert_true(conv_is_weight_file("pytorch_model.bin"));
    assert_true(conv_is_weight_file("model.safetensors.index.json"));
    assert_true(conv_is_weight_file("training_args.bin"));
    assert_true(conv_is_weight_file("x.gguf"));
    assert_false(conv_is_weight_file("config.json"));
    assert_false(conv_is_weight_file("tokenizer.model"));
    assert_false(conv_is_weight_file("generation_config.json"));
}

static void test_confine_output(void **state) {
    (void)state;
    char tmpl[] = "/tmp/convtestXXXXXX";
    char *base = mkdtemp(tmpl);
    assert_non_null(base);
    char root[PATH_MAX], hub[PATH_MAX], model[PATH_MAX], file[PATH_MAX], p[PATH_MAX];
    snprintf(root, sizeof root, "%s/root", base);
    snprintf(hub, sizeof hub, "%s/root/hub", base);
    snprintf(model, sizeof model, "%s/root/m", base);
    snprintf(file, sizeof file, "%s/root/afile", base);
    mkdir(root, 0755);
    mkdir(hub, 0755);
    mkdir(model, 0755);
    FILE *f = fopen(file, "w");
    fclose(f);
    const char *roots[] = {root, NULL};
    char *out = NULL;
    mp_error err = {0};
    snprintf(p, sizeof p, "%s/root/new/deeper", base);
    assert_int_equal(conv_confine_output(p, roots, hub, model, &out, &err), 0);
    assert_string_equal(out, p);
    free(out);
    snprintf(p, sizeof p, "%s/root/m/sub", base); /* inside the model: allowed */
    assert_int_equal(conv_confine_output(p, roots, hub, model, &out, &err), 0);
    free(out);
    const char *bad[] = {"relative", "/", NULL};
    for (int i = 0; bad[i]; i++) {
        assert_int_equal(conv_confine_output(bad[i], roots, hub, model, &out, &err), -1);
        assert_string_equal(err.field, "params.output");
    }
    snprintf(p, sizeof p, "%s/root", base); /* the root itself */
    assert_int_equal(conv_confine_output(p, roots, hub, model, &out, &err), -1);
    snprintf(p, sizeof p, "%s/root/../x", base);
    assert_int_equal(conv_confine_output(p, roots, hub, model, &out, &err), -1);
    snprintf(p, sizeof p, "%s/root/hub/x", base);
    assert_int_equal(conv_confine_output(p, roots, hub, model, &out, &err), -1);
    assert_non_null(strstr(err.message, "hub cache"));
    snprintf(p, sizeof p, "%s/root/m", base);
    assert_int_equal(conv_confine_output(p, roots, hub, model, &out, &err), -1);
    snprintf(p, sizeof p, "%s/root/afile", base);
    assert_int_equal(conv_confine_output(p, roots, hub, model, &out, &err), -1);
    snprintf(p, sizeof p, "%s/elsewhere", base);
    assert_int_equal(conv_confine_output(p, roots, hub, model, &out, &err), -1);
    /* a symlink out of the root is seen through */
    char link[PATH_MAX];
    snprintf(link, sizeof link, "%s/root/esc", base);
    assert_int_equal(symlink(base, link), 0);
    snprintf(p, sizeof p, "%s/root/esc/x", base);
    assert_int_equal(conv_confine_output(p, roots, hub, model, &out, &err), -1);
    unlink(link);
    unlink(file);
    rmdir(model);
    rmdir(hub);
    rmdir(root);
    rmdir(base);
}

static void test_find_sources(void **state) {
    (void)state;
    char tmpl[] = "/tmp/convsrcXXXXXX";
    char *d = mkdtemp(tmpl);
    char p[PATH_MAX];
    char **paths = NULL;
    size_t n = 0;
    mp_error err = {0};
    assert_int_equal(conv_find_sources(d, &paths, &n, &err), -1);
    assert_string_equal(err.code, "not_found");
    const char *files[] = {"b.bin", "a.bin", "training_args.bin", "optimizer.pt", "x.gguf", NULL};
    for (int i = 0; files[i]; i++) {
        snprintf(p, sizeof p, "%s/%s", d, files[i]);
        fclose(fopen(p, "w"));
    }
    assert_int_equal(conv_find_sources(d, &paths, &n, &err), 0);
    assert_int_equal(n, 2);
    assert_non_null(strstr(paths[0], "/a.bin"));
    assert_non_null(strstr(paths[1], "/b.bin"));
    conv_free_paths(paths, n);
    snprintf(p, sizeof p, "%s/pytorch_model.bin.index.json", d);
    fclose(fopen(p, "w"));
    assert_int_equal(conv_find_sources(d, &paths, &n, &err), 0);
    assert_int_equal(n, 1);
    assert_non_null(strstr(paths[0], "pytorch_model.bin.index.json"));
    conv_free_paths(paths, n);
    for (int i = 0; files[i]; i++) {
        snprintf(p, sizeof p, "%s/%s", d, files[i]);
        if (!strstr(files[i], "gguf")) unlink(p);
    }
    snprintf(p, sizeof p, "%s/pytorch_model.bin.index.json", d);
    unlink(p);
    assert_int_equal(conv_find_sources(d, &paths, &n, &err), 0);
    assert_int_equal(n, 1);
    conv_free_paths(paths, n);
    snprintf(p, sizeof p, "%s/y.gguf", d);
    fclose(fopen(p, "w"));
    assert_int_equal(conv_find_sources(d, &paths, &n, &err), -1);
    assert_string_equal(err.code, "ambiguous");
    unlink(p);
    snprintf(p, sizeof p, "%s/x.gguf", d);
    unlink(p);
    rmdir(d);
}

/* config.json's dtype keys: both names transformers reads, text_config too,
 * and the dominant float dtype of a "keep" conversion. */
static void test_config_dtype(void **state) {
    (void)state;
    assert_string_equal(conv_torch_dtype(MP_DT_BF16), "bfloat16");
    assert_string_equal(conv_torch_dtype(MP_DT_F16), "float16");
    assert_string_equal(conv_torch_dtype(MP_DT_F32), "float32");
    assert_null(conv_torch_dtype(MP_DT_I64));
    mp_dtype d1[] = {MP_DT_F32, MP_DT_BF16, MP_DT_I64, MP_DT_BF16};
    uint64_t b1[] = {100, 80, 1000, 80};
    assert_string_equal(conv_dominant_torch_dtype(d1, b1, 4), "bfloat16");
    mp_dtype d2[] = {MP_DT_I64, MP_DT_U8};
    uint64_t b2[] = {8, 1};
    assert_null(conv_dominant_torch_dtype(d2, b2, 2));
    mp_dtype d3[] = {MP_DT_F16, MP_DT_F32};
    uint64_t b3[] = {64, 64};
    assert_string_equal(conv_dominant_torch_dtype(d3, b3, 2), "float16"); /* tie: narrower */

    json_t *cfg = json_pack("{s:s,s:{s:s,s:i},s:s}", "torch_dtype", "float32", "text_config",
                            "torch_dtype", "float32", "hidden_size", 8, "model_type", "llava");
    assert_non_null(cfg);
    assert_true(conv_config_set_dtype(cfg, "bfloat16"));
    assert_string_equal(json_string_value(json_object_get(cfg, "torch_dtype")), "bfloat16");
    assert_string_equal(json_string_value(json_object_get(cfg, "dtype")), "bfloat16");
    json_t *tc = json_object_get(cfg, "text_config");
    assert_string_equal(json_string_value(json_object_get(tc, "torch_dtype")), "bfloat16");
    assert_string_equal(json_string_value(json_object_get(tc, "dtype")), "bfloat16");
    assert_int_equal(json_integer_value(json_object_get(tc, "hidden_size")), 8);
    assert_false(conv_config_set_dtype(cfg, "bfloat16")); /* already right: no rewrite */
    json_decref(cfg);
    json_t *arr = json_array();
    assert_false(conv_config_set_dtype(arr, "float16"));
    json_decref(arr);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plan_shards),    cmocka_unit_test(test_shard_names),
        cmocka_unit_test(test_cast),           cmocka_unit_test(test_parse_dtype_and_names),
        cmocka_unit_test(test_confine_output), cmocka_unit_test(test_find_sources),
        cmocka_unit_test(test_config_dtype),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
