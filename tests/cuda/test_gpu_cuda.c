/*
 * test_gpu_cuda.c - the gpu/ interface on real CUDA devices (built by
 * `make cuda`, run by scripts/gpu-check.sh on a GPU machine): discovery,
 * dummy weights byte-identical to the host backend, copy + read-back
 * digests (and the H2D / D2H rates, printed as "figure:" lines), casts and
 * dequantization byte-identical to the CPU code, out-of-memory, and an IPC
 * export read by a second process (ipc_consumer).
 *
 * It fails, rather than skips, when no CUDA device is found: it only runs
 * where one is expected.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gpu/dummy.h"
#include "gpu/gpu.h"
#include "gpu/gpu_internal.h"
#include "loader/formats/gguf/gguf.h"
#include "util/tensor/half.h"

static uint64_t xs_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void fill_random(void *p, size_t n, uint64_t seed) {
    uint64_t *q = p;
    for (size_t i = 0; i < n / 8; i++)
        q[i] = xs_next(&seed);
    for (size_t i = n / 8 * 8; i < n; i++)
        ((unsigned char *)p)[i] = (unsigned char)xs_next(&seed);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sha256_hex(const void *p, size_t n, char out[65]) {
    unsigned char d[32];
    unsigned int dl = 0;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    assert_non_null(md);
    assert_int_equal(EVP_DigestInit_ex(md, EVP_sha256(), NULL), 1);
    assert_int_equal(EVP_DigestUpdate(md, p, n), 1);
    assert_int_equal(EVP_DigestFinal_ex(md, d, &dl), 1);
    EVP_MD_CTX_free(md);
    for (unsigned i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
}

#define CHECK(call)                                                                                \
    do {                                                                                           \
        mp_error e_ = {0};                                                                         \
        int rc_ = (call);                                                                          \
        if (rc_ != 0) fprintf(stderr, "%s: %s: %s\n", #call, e_.code, e_.message);                 \
        assert_int_equal(rc_, 0);                                                                  \
    } while (0)
#define E (&e_)

static int setup(void **state) {
    gpu_set *s = NULL;
    mp_error err = {0};
    if (gpu_set_open("auto", 0, &s, &err) != 0) {
        fprintf(stderr, "gpu_set_open: %s\n", err.message);
        return -1;
    }
    if (gpu_set_kind(s) != GPU_KIND_CUDA) {
        fprintf(stderr, "no CUDA device found (driver missing?): these tests need a GPU\n");
        gpu_set_close(s);
        return -1;
    }
    *state = s;
    return 0;
}

static int teardown(void **state) {
    gpu_set_close(*state);
    return 0;
}

static void test_info(void **state) {
    gpu_set *s = *state;
    int rt = 0, dr = 0;
    assert_true(gpu_cuda_versions(&rt, &dr));
    assert_true(rt >= 12000);
    assert_true(dr > 0);
    printf("figure: cuda runtime %d driver %d devices %d\n", rt, dr, gpu_set_count(s));
    assert_string_equal(gpu_set_cuda_error(s), ""); /* discovery did not fail */
    for (int i = 0; i < gpu_set_count(s); i++) {
        gpu_device_info info;
        CHECK(gpu_device_info_get(s, i, &info, E));
        assert_int_equal(info.kind, GPU_KIND_CUDA);
        assert_true(info.name[0] != '\0');
        assert_true(info.compute_capability[0] >= '1' && strchr(info.compute_capability, '.'));
        assert_true(strlen(info.pci_bus_id) >= 7);
        assert_true(info.total_bytes > 0 && info.free_bytes <= info.total_bytes);
        printf("figure: device %d %s cc %s pci %s total %" PRIu64 " free %" PRIu64 "\n", i,
               info.name, info.compute_capability, info.pci_bus_id, info.total_bytes,
               info.free_bytes);
    }
    gpu_set *t = NULL;
    mp_error err = {0};
    assert_int_equal(gpu_set_open("63", 0, &t, &err), -1);
    assert_string_equal(err.code, "device_unavailable");
    CHECK(gpu_set_open("0", 0, &t, E));
    assert_int_equal(gpu_set_count(t), 1);
    gpu_set_close(t);
}

static void test_dummy_equal(void **state) {
    gpu_set *s = *state;
    const uint64_t n = 10 * 1000 * 1000 + 3;
    gpu_arena *a = NULL;
    CHECK(gpu_arena_alloc(s, 0, n * 4 + 4096, &a, E));
    assert_int_equal(gpu_device_resident(s, 0), n * 4 + 4096);
    unsigned char *dev = malloc(n * 4), *cpu = malloc(n * 4);
    assert_true(dev && cpu);
    const mp_dtype dts[] = {MP_DT_F32, MP_DT_F16, MP_DT_BF16};
    const char *name = "model.layers.3.mlp.down_proj.weight";
    for (int k = 0; k < 3; k++) {
        size_t es = mp_dtype_bits(dts[k]) / 8;
        for (uint64_t first = 0; first <= 12345; first += 12345) {
            gpu_dummy_params p = {.seed = 77, .low = -0.02f, .high = 0.03f, .first = first};
            double t0 = now_s();
            CHECK(gpu_fill_dummy(a, 256, dts[k], n, name, &p, E));
            CHECK(gpu_device_sync(s, 0, E));
            double t1 = now_s();
            CHECK(gpu_read(a, 256, dev, n * es, E));
            gpu_dummy_fill_cpu(cpu, dts[k], n, first, gpu_dummy_tensor_seed(77, name), -0.02f,
                               0.03f);
            if (memcmp(dev, cpu, n * es) != 0) {
                for (uint64_t i = 0; i < n * es; i++)
                    if (dev[i] != cpu[i]) {
                        fprintf(stderr, "dtype %s first byte difference at %" PRIu64 "\n",
                                mp_dtype_name(dts[k]), i);
                        break;
                    }
            }
            assert_memory_equal(dev, cpu, n * es);
            if (first == 0)
                printf("figure: dummy fill %s %.1f GB/s\n", mp_dtype_name(dts[k]),
                       n * es / (t1 - t0) / 1e9);
        }
    }
    free(dev);
    free(cpu);
    gpu_arena_free(a);
    assert_int_equal(gpu_device_resident(s, 0), 0);
}

/* 1 GiB through two pinned 64 MiB buffers with fences, as warm_load does. */
static void test_copy_readback(void **state) {
    gpu_set *s = *state;
    const size_t total = 1u << 30, chunk = 64u << 20;
    unsigned char *src = malloc(total);
    assert_non_null(src);
    fill_random(src, total, 12345);
    gpu_arena *a = NULL;
    CHECK(gpu_arena_alloc(s, 0, total, &a, E));
    void *stage[2] = {NULL, NULL};
    gpu_fence *f[2] = {NULL, NULL};
    for (int i = 0; i < 2; i++) {
        CHECK(gpu_staging_alloc(s, chunk, &stage[i], E));
        CHECK(gpu_fence_create(s, 0, &f[i], E));
    }
    double copy_s = 0;
    for (size_t off = 0, k = 0; off < total; off += chunk, k++) {
        int b = (int)(k & 1);
        CHECK(gpu_fence_wait(f[b], E)); /* the copy out of this buffer is done */
        memcpy(stage[b], src + off, chunk);
        double t0 = now_s();
        CHECK(gpu_copy_h2d(a, off, stage[b], chunk, E));
        CHECK(gpu_fence_record(f[b], E));
        copy_s += now_s() - t0;
    }
    double t0 = now_s();
    CHECK(gpu_device_sync(s, 0, E));
    copy_s += now_s() - t0;
    assert_int_equal(gpu_fence_query(f[0], NULL), 1);

    /* Pure H2D rate from one pinned buffer (no memcpy in between). */
    t0 = now_s();
    for (size_t off = 0; off < total; off += chunk)
        CHECK(gpu_copy_h2d(a, off, stage[0], chunk, E));
    CHECK(gpu_device_sync(s, 0, E));
    double h2d = now_s() - t0;
    /* Restore the content, then read everything back. */
    for (size_t off = 0, k = 0; off < total; off += chunk, k++) {
        memcpy(stage[0], src + off, chunk);
        CHECK(gpu_copy_h2d(a, off, stage[0], chunk, E));
        CHECK(gpu_device_sync(s, 0, E));
    }
    unsigned char *back = malloc(total);
    assert_non_null(back);
    t0 = now_s();
    CHECK(gpu_read(a, 0, back, total, E));
    double d2h = now_s() - t0;
    char want[65], got[65];
    sha256_hex(src, total, want);
    sha256_hex(back, total, got);
    assert_string_equal(got, want);
    printf("figure: sha256 of 1 GiB after H2D + read-back %s (matches source)\n", got);
    printf("figure: H2D pinned %.1f GB/s; double-buffered incl. queueing %.1f GB/s; "
           "read-back (pageable) %.1f GB/s\n",
           total / h2d / 1e9, total / copy_s / 1e9, total / d2h / 1e9);
    for (int i = 0; i < 2; i++) {
        gpu_fence_free(f[i]);
        gpu_staging_free(s, stage[i]);
    }
    free(back);
    free(src);
    gpu_arena_free(a);
}

static void random_blocks(int t, size_t nblocks, unsigned bb, uint8_t *p, uint64_t seed) {
    fill_random(p, nblocks * bb, seed);
    for (size_t b = 0; b < nblocks; b++) {
        uint8_t *blk = p + b * bb;
        unsigned offs[2] = {0, 2}, nf = 1;
        if (t == GGUF_T_Q4_1 || t == GGUF_T_Q5_1 || t == GGUF_T_Q4_K || t == GGUF_T_Q5_K) nf = 2;
        if (t == GGUF_T_Q6_K) offs[0] = 208;
        if (t == GGUF_T_Q3_K) offs[0] = 108;
        if (t == GGUF_T_Q2_K) offs[0] = 80, offs[1] = 82, nf = 2;
        for (unsigned k = 0; k < nf; k++) {
            float v = ((float)(xs_next(&seed) % 2001) - 1000.0f) * 1e-5f;
            uint16_t h = half_f32_to_f16(v);
            memcpy(blk + offs[k], &h, 2);
        }
    }
}

static void test_dequant_equal(void **state) {
    gpu_set *s = *state;
    const int types[] = {GGUF_T_Q4_0, GGUF_T_Q4_1, GGUF_T_Q5_0, GGUF_T_Q5_1, GGUF_T_Q8_0,
                         GGUF_T_Q2_K, GGUF_T_Q3_K, GGUF_T_Q4_K, GGUF_T_Q5_K, GGUF_T_Q6_K};
    const mp_dtype outs[] = {MP_DT_F16, MP_DT_F32, MP_DT_BF16};
    const size_t nblocks = 8192;
    gpu_arena *src = NULL, *dst = NULL;
    CHECK(gpu_arena_alloc(s, 0, 4u << 20, &src, E));
    CHECK(gpu_arena_alloc(s, 0, 16u << 20, &dst, E));
    for (size_t ti = 0; ti < sizeof types / sizeof *types; ti++) {
        int t = types[ti];
        unsigned be = gguf_type_block_size(t), bb = gguf_type_block_bytes(t);
        uint64_t n = nblocks * be;
        uint8_t *blocks = malloc(nblocks * bb), *want = malloc(n * 4), *host = malloc(n * 4),
                *got = malloc(n * 4);
        assert_true(blocks && want && host && got);
        random_blocks(t, nblocks, bb, blocks, 1000 + ti);
        CHECK(gpu_copy_h2d(src, 0, blocks, nblocks * bb, E));
        for (size_t oi = 0; oi < 3; oi++) {
            size_t os = mp_dtype_bits(outs[oi]) / 8;
            CHECK(gguf_dequant(t, blocks, nblocks * bb, (int64_t)n, outs[oi], want, E));
            assert_int_equal(gpu_host_dequant(host, outs[oi], blocks, t, n), 0);
            CHECK(gpu_dequant(dst, 0, outs[oi], src, 0, t, n, E));
            CHECK(gpu_read(dst, 0, got, n * os, E));
            assert_memory_equal(host, want, n * os);
            if (memcmp(got, want, n * os) != 0)
                fprintf(stderr, "dequant %s -> %s differs\n", gguf_type_name(t),
                        mp_dtype_name(outs[oi]));
            assert_memory_equal(got, want, n * os);
        }
        printf("figure: dequant %s -> F16/F32/BF16 on device: bit-identical to CPU (%" PRIu64
               " elements)\n",
               gguf_type_name(t), n);
        free(blocks);
        free(want);
        free(host);
        free(got);
    }
    gpu_arena_free(src);
    gpu_arena_free(dst);
}

static void test_cast_equal(void **state) {
    gpu_set *s = *state;
    const size_t n = 4u << 20;
    gpu_arena *src = NULL, *dst = NULL;
    CHECK(gpu_arena_alloc(s, 0, n * 4, &src, E));
    CHECK(gpu_arena_alloc(s, 0, n * 4, &dst, E));
    unsigned char *in = malloc(n * 4), *host = malloc(n * 4), *got = malloc(n * 4);
    assert_true(in && host && got);
    const mp_dtype all[] = {MP_DT_F32, MP_DT_F16, MP_DT_BF16, MP_DT_F8_E4M3, MP_DT_F8_E5M2};
    const mp_dtype wide[] = {MP_DT_F32, MP_DT_F16, MP_DT_BF16};
    fill_random(in, n * 4, 4242); /* random bits: NaNs, Infs, subnormals included */
    /* Make the first 64 Ki 16-bit values exhaustive and the first 256 bytes too. */
    for (uint32_t i = 0; i < 65536; i++)
        memcpy(in + 2 * i, &(uint16_t){(uint16_t)i}, 2);
    for (uint32_t i = 0; i < 256; i++)
        in[i] = (unsigned char)i;
    CHECK(gpu_copy_h2d(src, 0, in, n * 4, E));
    for (size_t a = 0; a < 5; a++)
        for (size_t b = 0; b < 3; b++) {
            size_t is = mp_dtype_bits(all[a]) / 8, os = mp_dtype_bits(wide[b]) / 8;
            size_t m = n * 4 / (is > os ? is : os);
            CHECK(gpu_cast(dst, 0, wide[b], src, 0, all[a], m, E));
            CHECK(gpu_read(dst, 0, got, m * os, E));
            assert_int_equal(gpu_host_cast(host, wide[b], in, all[a], m), 0);
            if (memcmp(got, host, m * os) != 0)
                fprintf(stderr, "cast %s -> %s differs\n", mp_dtype_name(all[a]),
                        mp_dtype_name(wide[b]));
            assert_memory_equal(got, host, m * os);
        }
    printf("figure: casts F32/F16/BF16/E4M3/E5M2 -> F32/F16/BF16 on device: bit-identical to "
           "host\n");
    free(in);
    free(host);
    free(got);
    gpu_arena_free(src);
    gpu_arena_free(dst);
}

static void test_nomem(void **state) {
    gpu_set *s = *state;
    gpu_device_info info;
    CHECK(gpu_device_info_get(s, 0, &info, E));
    gpu_arena *a = NULL;
    mp_error err = {0};
    assert_int_equal(gpu_arena_alloc(s, 0, info.free_bytes + (1ull << 30), &a, &err), GPU_NOMEM);
    assert_null(a);
    assert_string_equal(err.code, "insufficient_memory");
    assert_int_equal(gpu_device_resident(s, 0), 0);
    /* The device still works afterwards. */
    CHECK(gpu_arena_alloc(s, 0, 1 << 20, &a, E));
    gpu_arena_free(a);
}

static void consumer_path(char *out, size_t outsz) {
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    assert_true(n > 0);
    self[n] = '\0';
    snprintf(out, outsz, "%s/ipc_consumer", dirname(self));
}

static void test_ipc_export(void **state) {
    gpu_set *s = *state;
    const uint64_t size = 64u << 20;
    gpu_arena *a = NULL;
    CHECK(gpu_arena_alloc(s, 0, size, &a, E));
    gpu_dummy_params p = {.seed = 5, .low = -1, .high = 1};
    CHECK(gpu_fill_dummy(a, 0, MP_DT_BF16, size / 2, "ipc", &p, E));
    gpu_export ex;
    CHECK(gpu_arena_export(a, &ex, E));
    assert_int_equal(ex.kind, GPU_KIND_CUDA);
    assert_int_equal(ex.size, size);
    assert_int_equal(ex.fd, -1);
    assert_int_equal(strlen(ex.ipc_handle), 128);
    assert_true(ex.borrowed); /* our cudaFree would pull it from under the importer */
    const uint64_t off = 4096 * 3, len = size / 2 + 777;
    unsigned char *back = malloc(len);
    assert_non_null(back);
    CHECK(gpu_read(a, off, back, len, E));
    char want[65];
    sha256_hex(back, len, want);
    gpu_device_info info;
    CHECK(gpu_device_info_get(s, 0, &info, E));
    char exe[PATH_MAX], cmd[PATH_MAX + 256], got[80] = "";
    consumer_path(exe, sizeof exe);
    snprintf(cmd, sizeof cmd, "'%s' %s %" PRIu64 " %" PRIu64 " %d", exe, ex.ipc_handle, off, len,
             info.ordinal);
    FILE *pf = popen(cmd, "r");
    assert_non_null(pf);
    if (!fgets(got, sizeof got, pf)) got[0] = '\0';
    int st = pclose(pf);
    got[strcspn(got, "\n")] = '\0';
    assert_int_equal(st, 0);
    assert_string_equal(got, want);
    printf("figure: IPC export read by a second process: sha256 %s (matches)\n", got);
    free(back);
    gpu_arena_free(a);
}

/* Every device of the set, when there are several: placement per rank. */
static void test_all_devices(void **state) {
    gpu_set *s = *state;
    const uint64_t n = 1 << 20;
    unsigned char *cpu = malloc(n * 2), *dev = malloc(n * 2);
    assert_true(cpu && dev);
    for (int i = 0; i < gpu_set_count(s); i++) {
        gpu_arena *a = NULL;
        CHECK(gpu_arena_alloc(s, i, n * 2, &a, E));
        gpu_dummy_params p = {.seed = (uint64_t)i, .low = 0, .high = 1};
        CHECK(gpu_fill_dummy(a, 0, MP_DT_F16, n, "rank", &p, E));
        CHECK(gpu_read(a, 0, dev, n * 2, E));
        gpu_dummy_fill_cpu(cpu, MP_DT_F16, n, 0, gpu_dummy_tensor_seed((uint64_t)i, "rank"), 0, 1);
        assert_memory_equal(dev, cpu, n * 2);
        gpu_arena_free(a);
    }
    free(cpu);
    free(dev);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_info),          cmocka_unit_test(test_dummy_equal),
        cmocka_unit_test(test_copy_readback), cmocka_unit_test(test_dequant_equal),
        cmocka_unit_test(test_cast_equal),    cmocka_unit_test(test_nomem),
        cmocka_unit_test(test_ipc_export),    cmocka_unit_test(test_all_devices),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
