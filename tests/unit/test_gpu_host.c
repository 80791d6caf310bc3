/*
 * test_gpu_host.c - the gpu/ interface on its host backend: --devices
 * parsing, arena accounting and memory caps (out-of-memory without a GPU),
 * copy / fence / read-back, memfd export seen through a second mapping,
 * the dummy-weights generator against an independent transcription of its
 * definition, dtype casts (round to nearest even, NaN, Inf) against
 * util/tensor/half.c, and dequantization (element by element, as the CUDA
 * kernel does) against loader/formats/gguf/gguf_dequant.c (block by block),
 * the arena pool (reuse, resizing, release under a cap) and the staging
 * cache and cap.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "gpu/dummy.h"
#include "gpu/gpu.h"
#include "loader/formats/gguf/gguf.h"
#include "util/tensor/half.h"

/* A small deterministic generator for test data (not the one under test). */
static uint64_t xs_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static gpu_set *open_set(const char *spec, uint64_t cap) {
    gpu_set *s = NULL;
    mp_error err = {0};
    int rc = gpu_set_open(spec, cap, &s, &err);
    if (rc != 0) fprintf(stderr, "gpu_set_open(%s): %s: %s\n", spec, err.code, err.message);
    assert_int_equal(rc, 0);
    assert_non_null(s);
    return s;
}

/* ---- discovery --------------------------------------------------------------- */

static void test_discovery_host4(void **state) {
    (void)state;
    gpu_set *s = open_set("host:4", 0);
    assert_int_equal(gpu_set_count(s), 4);
    assert_int_equal(gpu_set_kind(s), GPU_KIND_HOST);
    for (int i = 0; i < 4; i++) {
        gpu_device_info info;
        mp_error err = {0};
        assert_int_equal(gpu_device_info_get(s, i, &info, &err), 0);
        assert_int_equal(info.index, i);
        assert_int_equal(info.kind, GPU_KIND_HOST);
        assert_string_equal(info.name, "host");
        assert_string_equal(info.compute_capability, "");
        assert_string_equal(info.pci_bus_id, "");
        assert_true(info.total_bytes > 0);
        assert_true(info.free_bytes <= info.total_bytes);
        assert_int_equal(info.resident_bytes, 0);
    }
    gpu_device_info info;
    mp_error err = {0};
    assert_int_equal(gpu_device_info_get(s, 4, &info, &err), -1);
    assert_string_equal(err.code, "device_unavailable");
    gpu_set_close(s);
}

static void test_discovery_specs(void **state) {
    (void)state;
    gpu_set *s = open_set("host", 0);
    assert_int_equal(gpu_set_count(s), 1);
    gpu_set_close(s);

    /* The default build has no CUDA and this machine no GPU: auto is host. */
    s = open_set("auto", 0);
    assert_true(gpu_set_count(s) >= 1);
    if (gpu_set_kind(s) == GPU_KIND_HOST) assert_int_equal(gpu_set_count(s), 1);
    gpu_set_close(s);
    s = open_set(NULL, 0);
    assert_true(gpu_set_count(s) >= 1);
    gpu_set_close(s);

    s = open_set("host:2@64K", 0);
    gpu_device_info info;
    mp_error err = {0};
    assert_int_equal(gpu_device_info_get(s, 1, &info, &err), 0);
    assert_int_equal(info.total_bytes, 64 * 1024);
    assert_int_equal(info.free_bytes, 64 * 1024);
    gpu_set_close(s);

    /* The spec's cap wins over the argument. */
    s = open_set("host:1@1M", 4096);
    assert_int_equal(gpu_device_info_get(s, 0, &info, &err), 0);
    assert_int_equal(info.total_bytes, 1 << 20);
    gpu_set_close(s);
    s = open_set("host:3", 8192);
    assert_int_equal(gpu_device_info_get(s, 2, &info, &err), 0);
    assert_int_equal(info.total_bytes, 8192);
    gpu_set_close(s);

    static const char *bad[] = {"host:0", "host:65",  "host:",      "host:2x", "hostile",
                                "host@",  "host:1@0", "host:1@12Q", "gpu",     "0,,1",
                                "1,1",    ",",        "-1"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        gpu_set *t = NULL;
        mp_error e = {0};
        assert_int_equal(gpu_set_open(bad[i], 0, &t, &e), -1);
        assert_null(t);
        assert_string_equal(e.field, "devices");
        assert_true(strcmp(e.code, "invalid_devices") == 0 ||
                    strcmp(e.code, "device_unavailable") == 0);
    }
    /* CUDA ordinals on a machine (or build) without them. */
    gpu_set *t = NULL;
    mp_error e = {0};
    assert_int_equal(gpu_set_open("63", 0, &t, &e), -1);
    assert_string_equal(e.code, "device_unavailable");
#if !MP_HAVE_CUDA
    assert_int_equal(gpu_set_open("0,1", 0, &t, &e), -1);
    assert_string_equal(e.code, "device_unavailable");
    int rt = 7, dr = 7;
    assert_false(gpu_cuda_versions(&rt, &dr));
    assert_int_equal(rt, 0);
    assert_int_equal(dr, 0);
#endif
}

/* ---- arenas and accounting ---------------------------------------------------- */

static void test_alloc_accounting(void **state) {
    (void)state;
    gpu_set *s = open_set("host:2@1M", 0);
    mp_error err = {0};
    gpu_arena *a = NULL, *b = NULL;
    assert_int_equal(gpu_arena_alloc(s, 0, 256 * 1024, &a, &err), 0);
    assert_int_equal(gpu_arena_size(a), 256 * 1024);
    assert_int_equal(gpu_arena_device(a), 0);
    assert_non_null(gpu_arena_host_ptr(a));
    assert_int_equal(gpu_device_resident(s, 0), 256 * 1024);
    assert_int_equal(gpu_device_resident(s, 1), 0);
    assert_int_equal(gpu_arena_alloc(s, 1, 4096, &b, &err), 0);
    gpu_device_info info;
    assert_int_equal(gpu_device_info_get(s, 0, &info, &err), 0);
    assert_int_equal(info.resident_bytes, 256 * 1024);
    assert_int_equal(info.free_bytes, 768 * 1024);
    assert_int_equal(gpu_device_info_get(s, 1, &info, &err), 0);
    assert_int_equal(info.resident_bytes, 4096);
    gpu_arena_free(a);
    assert_int_equal(gpu_device_resident(s, 0), 0);
    gpu_arena_free(b);
    assert_int_equal(gpu_device_resident(s, 1), 0);
    gpu_arena_free(NULL);

    assert_int_equal(gpu_arena_alloc(s, 0, 0, &a, &err), -1);
    assert_null(a);
    assert_int_equal(gpu_arena_alloc(s, 2, 16, &a, &err), -1);
    assert_string_equal(err.code, "device_unavailable");
    gpu_set_close(s);
}

static void test_cap_insufficient(void **state) {
    (void)state;
    gpu_set *s = open_set("host:1@1M", 0);
    mp_error err = {0};
    gpu_arena *a = NULL, *b = NULL;
    assert_int_equal(gpu_arena_alloc(s, 0, (1 << 20) + 1, &a, &err), GPU_NOMEM);
    assert_null(a);
    assert_string_equal(err.code, "insufficient_memory");
    assert_int_equal(gpu_device_resident(s, 0), 0);
    assert_int_equal(gpu_arena_alloc(s, 0, 1 << 20, &a, &err), 0);
    mp_error_clear(&err);
    assert_int_equal(gpu_arena_alloc(s, 0, 1, &b, &err), GPU_NOMEM);
    assert_string_equal(err.code, "insufficient_memory");
    gpu_arena_free(a);
    assert_int_equal(gpu_arena_alloc(s, 0, 1, &b, &err), 0);
    gpu_arena_free(b);
    gpu_set_close(s);

    /* Without a cap, more than the machine has is refused up front. */
    s = open_set("host", 0);
    assert_int_equal(gpu_arena_alloc(s, 0, UINT64_C(1) << 60, &a, &err), GPU_NOMEM);
    assert_string_equal(err.code, "insufficient_memory");
    gpu_set_close(s);
}

typedef struct race_arg {
    gpu_set *s;
    int ok, nomem;
} race_arg;

static void *race_alloc(void *p) {
    race_arg *r = p;
    for (int i = 0; i < 200; i++) {
        gpu_arena *a = NULL;
        mp_error err;
        int rc = gpu_arena_alloc(r->s, 0, 96 * 1024, &a, &err);
        if (rc == 0) {
            r->ok++;
            if (gpu_device_resident(r->s, 0) > 256 * 1024) r->ok = -1000000; /* cap broken */
            gpu_arena_free(a);
        } else if (rc == GPU_NOMEM) {
            r->nomem++;
        }
    }
    return NULL;
}

/* Concurrent allocations never take a device past its cap together. */
static void test_cap_threads(void **state) {
    (void)state;
    gpu_set *s = open_set("host:1@256K", 0);
    pthread_t th[4];
    race_arg args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (race_arg){.s = s};
        assert_int_equal(pthread_create(&th[i], NULL, race_alloc, &args[i]), 0);
    }
    int ok = 0, nomem = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        assert_true(args[i].ok >= 0);
        ok += args[i].ok;
        nomem += args[i].nomem;
    }
    assert_int_equal(ok + nomem, 800);
    assert_true(ok > 0);
    assert_int_equal(gpu_device_resident(s, 0), 0);
    gpu_set_close(s);
}

/* ---- copies, fences, export ---------------------------------------------------- */

static void test_copy_roundtrip(void **state) {
    (void)state;
    gpu_set *s = open_set("host:2", 0);
    mp_error err = {0};
    gpu_arena *a = NULL;
    const size_t n = 100000;
    assert_int_equal(gpu_arena_alloc(s, 1, 128 * 1024, &a, &err), 0);
    void *stage = NULL;
    assert_int_equal(gpu_staging_alloc(s, n, &stage, &err), 0);
    assert_int_equal((uintptr_t)stage % 4096, 0);
    uint64_t seed = 42;
    for (size_t i = 0; i < n; i++)
        ((unsigned char *)stage)[i] = (unsigned char)xs_next(&seed);
    gpu_fence *f = NULL;
    assert_int_equal(gpu_fence_create(s, 1, &f, &err), 0);
    assert_int_equal(gpu_fence_query(f, &err), 1);
    assert_int_equal(gpu_copy_h2d(a, 256, stage, n, &err), 0);
    assert_int_equal(gpu_fence_record(f, &err), 0);
    assert_int_equal(gpu_fence_wait(f, &err), 0);
    assert_int_equal(gpu_fence_query(f, &err), 1);
    assert_int_equal(gpu_device_sync(s, 1, &err), 0);
    unsigned char *back = malloc(n);
    assert_non_null(back);
    assert_int_equal(gpu_read(a, 256, back, n, &err), 0);
    assert_memory_equal(back, stage, n);

    /* Out of range, including offsets that would wrap. */
    assert_int_equal(gpu_copy_h2d(a, 128 * 1024 - 10, stage, 11, &err), -1);
    assert_string_equal(err.code, "out_of_range");
    assert_int_equal(gpu_read(a, UINT64_MAX - 4, back, 8, &err), -1);
    assert_string_equal(err.code, "out_of_range");
    assert_int_equal(gpu_copy_h2d(a, 128 * 1024, stage, 0, &err), 0);

    free(back);
    gpu_fence_free(f);
    gpu_staging_free(s, stage);
    gpu_arena_free(a);
    gpu_set_close(s);
}

static void test_memfd_export(void **state) {
    (void)state;
    gpu_set *s = open_set("host", 0);
    mp_error err = {0};
    gpu_arena *a = NULL;
    const size_t size = 64 * 1024;
    assert_int_equal(gpu_arena_alloc(s, 0, size, &a, &err), 0);
    unsigned char buf[4096];
    uint64_t seed = 7;
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (unsigned char)xs_next(&seed);
    assert_int_equal(gpu_copy_h2d(a, 8192, buf, sizeof buf, &err), 0);

    gpu_export ex;
    assert_int_equal(gpu_arena_export(a, &ex, &err), 0);
    assert_int_equal(ex.kind, GPU_KIND_HOST);
    assert_int_equal(ex.size, size);
    assert_true(ex.fd >= 0);
    assert_string_equal(ex.ipc_handle, "");
    /* What another process would do with the fd: dup and map it. */
    int fd = dup(ex.fd);
    assert_true(fd >= 0);
    unsigned char *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    assert_true(m != MAP_FAILED);
    close(fd);
    assert_memory_equal(m + 8192, buf, sizeof buf);
    /* And it is the same memory, not a copy: writes show both ways. */
    m[0] = 0xA5;
    unsigned char one;
    assert_int_equal(gpu_read(a, 0, &one, 1, &err), 0);
    assert_int_equal(one, 0xA5);
    buf[0] ^= 0xFF;
    assert_int_equal(gpu_copy_h2d(a, 8192, buf, 1, &err), 0);
    assert_int_equal(m[8192], buf[0]);
    munmap(m, size);
    gpu_arena_free(a);
    gpu_set_close(s);
}

/* ---- dummy weights ---------------------------------------------------------- */

/* The definition in dummy.h, transcribed independently. */
static uint64_t ref_splitmix(uint64_t x) {
    x += UINT64_C(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)) * UINT64_C(0x94d049bb133111eb);
    return x ^ (x >> 31);
}

static float ref_dummy(uint64_t seed, const char *name, uint64_t i, float low, float high) {
    uint64_t h = UINT64_C(14695981039346656037);
    for (const char *p = name; *p; p++)
        h = (h ^ (unsigned char)*p) * UINT64_C(1099511628211);
    uint64_t tseed = ref_splitmix(seed ^ h);
    volatile float u = (float)(ref_splitmix(tseed + i) >> 40) / 16777216.0f;
    volatile float range = high - low;
    volatile float prod = range * u;
    return low + prod;
}

static void fill(gpu_arena *a, uint64_t off, mp_dtype dt, uint64_t n, const char *name,
                 uint64_t seed, float low, float high, uint64_t first) {
    gpu_dummy_params p = {.seed = seed, .low = low, .high = high, .first = first};
    mp_error err = {0};
    int rc = gpu_fill_dummy(a, off, dt, n, name, &p, &err);
    if (rc) fprintf(stderr, "fill: %s\n", err.message);
    assert_int_equal(rc, 0);
}

static void test_dummy_reference(void **state) {
    (void)state;
    gpu_set *s = open_set("host", 0);
    mp_error err = {0};
    gpu_arena *a = NULL;
    const uint64_t n = 5000;
    assert_int_equal(gpu_arena_alloc(s, 0, n * 4, &a, &err), 0);
    const char *name = "model.layers.0.self_attn.q_proj.weight";
    const float low = -1e-3f, high = 1e-3f;
    const mp_dtype dts[] = {MP_DT_F32, MP_DT_F16, MP_DT_BF16};
    for (size_t k = 0; k < 3; k++) {
        fill(a, 0, dts[k], n, name, 1234, low, high, 0);
        const unsigned char *p = gpu_arena_host_ptr(a);
        for (uint64_t i = 0; i < n; i++) {
            float v = ref_dummy(1234, name, i, low, high);
            assert_true(v >= low && v <= high);
            if (dts[k] == MP_DT_F32) {
                float got;
                memcpy(&got, p + 4 * i, 4);
                assert_memory_equal(&got, &v, 4);
            } else {
                uint16_t got, want = dts[k] == MP_DT_F16 ? half_f32_to_f16(v) : half_f32_to_bf16(v);
                memcpy(&got, p + 2 * i, 2);
                assert_int_equal(got, want);
            }
        }
    }
    /* Also the CPU fill the CUDA tests compare kernels with. */
    float *cpu = malloc(n * 4);
    assert_non_null(cpu);
    assert_int_equal(
        gpu_dummy_fill_cpu(cpu, MP_DT_F32, n, 0, gpu_dummy_tensor_seed(1234, name), low, high), 0);
    fill(a, 0, MP_DT_F32, n, name, 1234, low, high, 0);
    assert_memory_equal(cpu, gpu_arena_host_ptr(a), n * 4);
    assert_int_equal(gpu_dummy_fill_cpu(cpu, MP_DT_I32, 1, 0, 0, 0, 1), -1);
    free(cpu);
    gpu_arena_free(a);
    gpu_set_close(s);
}

static void test_dummy_determinism_range(void **state) {
    (void)state;
    gpu_set *s = open_set("host:2", 0);
    mp_error err = {0};
    gpu_arena *a = NULL, *b = NULL;
    const uint64_t n = 20000;
    assert_int_equal(gpu_arena_alloc(s, 0, n * 4 + 1024, &a, &err), 0);
    assert_int_equal(gpu_arena_alloc(s, 1, n * 4 + 1024, &b, &err), 0);
    fill(a, 0, MP_DT_F32, n, "w", 9, 2.0f, 3.0f, 0);
    fill(b, 512, MP_DT_F32, n, "w", 9, 2.0f, 3.0f, 0);
    const float *x = gpu_arena_host_ptr(a);
    const float *y = (const float *)((char *)gpu_arena_host_ptr(b) + 512);
    assert_memory_equal(x, y, n * 4); /* same seed and name: same bytes anywhere */
    double sum = 0;
    float mn = 10, mx = -10;
    for (uint64_t i = 0; i < n; i++) {
        assert_true(x[i] >= 2.0f && x[i] <= 3.0f);
        sum += x[i];
        mn = fminf(mn, x[i]);
        mx = fmaxf(mx, x[i]);
    }
    /* Uniform: mean near the middle, extremes near the ends. */
    assert_true(fabs(sum / n - 2.5) < 0.01);
    assert_true(mn < 2.001f && mx > 2.999f);

    /* `first` continues the same sequence. */
    fill(b, 0, MP_DT_F32, n - 100, "w", 9, 2.0f, 3.0f, 100);
    assert_memory_equal(gpu_arena_host_ptr(b), x + 100, (n - 100) * 4);
    /* Another name or seed: other values. */
    fill(b, 0, MP_DT_F32, n, "w2", 9, 2.0f, 3.0f, 0);
    assert_memory_not_equal(gpu_arena_host_ptr(b), x, n * 4);
    fill(b, 0, MP_DT_F32, n, "w", 10, 2.0f, 3.0f, 0);
    assert_memory_not_equal(gpu_arena_host_ptr(b), x, n * 4);
    /* low == high is a constant fill. */
    fill(b, 0, MP_DT_BF16, 64, "w", 9, 0.5f, 0.5f, 0);
    for (int i = 0; i < 64; i++)
        assert_int_equal(((uint16_t *)gpu_arena_host_ptr(b))[i], 0x3f00);

    gpu_dummy_params bad = {.low = 1.0f, .high = 0.0f};
    assert_int_equal(gpu_fill_dummy(b, 0, MP_DT_F32, 4, "w", &bad, &err), -1);
    bad = (gpu_dummy_params){.low = 0.0f, .high = INFINITY};
    assert_int_equal(gpu_fill_dummy(b, 0, MP_DT_F32, 4, "w", &bad, &err), -1);
    bad = (gpu_dummy_params){.low = 0.0f, .high = 1.0f};
    assert_int_equal(gpu_fill_dummy(b, 0, MP_DT_I8, 4, "w", &bad, &err), -1);
    assert_string_equal(err.code, "unsupported_dtype");
    assert_int_equal(gpu_fill_dummy(b, 2, MP_DT_F32, 4, "w", &bad, &err), -1); /* misaligned */
    assert_int_equal(gpu_fill_dummy(b, 0, MP_DT_F32, n + 1000, "w", &bad, &err), -1);
    assert_string_equal(err.code, "out_of_range");
    gpu_arena_free(a);
    gpu_arena_free(b);
    gpu_set_close(s);
}

/* ---- casts ------------------------------------------------------------------- */

typedef struct cast_env {
    gpu_set *s;
    gpu_arena *src, *dst;
} cast_env;

static cast_env cast_open(size_t bytes) {
    cast_env e = {.s = open_set("host", 0)};
    mp_error err = {0};
    assert_int_equal(gpu_arena_alloc(e.s, 0, bytes, &e.src, &err), 0);
    assert_int_equal(gpu_arena_alloc(e.s, 0, bytes, &e.dst, &err), 0);
    return e;
}

static void cast_close(cast_env *e) {
    gpu_arena_free(e->src);
    gpu_arena_free(e->dst);
    gpu_set_close(e->s);
}

static void do_cast(cast_env *e, mp_dtype to, const void *in, mp_dtype from, size_t n, void *out) {
    mp_error err = {0};
    size_t is = mp_dtype_bits(from) / 8, os = mp_dtype_bits(to) / 8;
    assert_int_equal(gpu_copy_h2d(e->src, 0, in, n * is, &err), 0);
    int rc = gpu_cast(e->dst, 0, to, e->src, 0, from, n, &err);
    if (rc) fprintf(stderr, "cast: %s\n", err.message);
    assert_int_equal(rc, 0);
    assert_int_equal(gpu_read(e->dst, 0, out, n * os, &err), 0);
}

static float bits_f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void test_cast_rne_special(void **state) {
    (void)state;
    cast_env e = cast_open(1 << 22);
    /* f32 -> f16: ties to even, overflow, subnormals, NaN, Inf, signs. */
    const struct {
        uint32_t in;
        uint16_t f16, bf16;
    } cases[] = {
        {0x3f800000, 0x3c00, 0x3f80}, /* 1.0 */
        {0x3f801000, 0x3c00, 0x3f80}, /* 1 + 2^-11: f16 tie, to even (down) */
        {0x3f803000, 0x3c02, 0x3f80}, /* 1 + 3*2^-11: f16 tie, to even (up) */
        {0x3f808000, 0x3c04, 0x3f80}, /* 1 + 2^-8: bf16 tie, down */
        {0x3f818000, 0x3c0c, 0x3f82}, /* 1 + 3*2^-8: bf16 tie, up */
        {0x477fe000, 0x7bff, 0x4780}, /* 65504: f16 max */
        {0x477ff000, 0x7c00, 0x4780}, /* 65520: rounds to f16 Inf */
        {0x33800000, 0x0001, 0x3380}, /* 2^-24: smallest f16 subnormal */
        {0x33000000, 0x0000, 0x3300}, /* 2^-25: tie between 0 and 2^-24 -> 0 */
        {0x33400000, 0x0001, 0x3340}, /* 1.5 * 2^-25 -> 2^-24 */
        {0x80000000, 0x8000, 0x8000}, /* -0 */
        {0x7f800000, 0x7c00, 0x7f80}, /* +Inf */
        {0xff800000, 0xfc00, 0xff80}, /* -Inf */
        {0x7fc00000, 0x7e00, 0x7fc0}, /* quiet NaN */
        {0x7f800001, 0x7e00, 0x7fc0}, /* signalling NaN stays NaN, quieted */
        {0xffc12345, 0xfe09, 0xffc1}, /* negative NaN keeps sign and payload top */
        {0x7f7fffff, 0x7c00, 0x7f80}, /* f32 max -> bf16 rounds to Inf */
    };
    const size_t nc = sizeof cases / sizeof *cases;
    float in[32];
    uint16_t out[32];
    for (size_t i = 0; i < nc; i++)
        in[i] = bits_f(cases[i].in);
    do_cast(&e, MP_DT_F16, in, MP_DT_F32, nc, out);
    for (size_t i = 0; i < nc; i++) {
        if (out[i] != cases[i].f16) fprintf(stderr, "f16 case %zu: %04x\n", i, out[i]);
        assert_int_equal(out[i], cases[i].f16);
    }
    do_cast(&e, MP_DT_BF16, in, MP_DT_F32, nc, out);
    for (size_t i = 0; i < nc; i++) {
        if (out[i] != cases[i].bf16) fprintf(stderr, "bf16 case %zu: %04x\n", i, out[i]);
        assert_int_equal(out[i], cases[i].bf16);
    }

    /* Widening is exact; Inf and NaN survive. */
    const uint16_t h[] = {0x7c00, 0xfc00, 0x7e00, 0x0001, 0x3555, 0x7bff};
    float f[6];
    do_cast(&e, MP_DT_F32, h, MP_DT_F16, 6, f);
    assert_true(isinf(f[0]) && f[0] > 0);
    assert_true(isinf(f[1]) && f[1] < 0);
    assert_true(isnan(f[2]));
    assert_true(f[3] == ldexpf(1, -24));
    assert_true(f[5] == 65504.0f);
    /* f16 -> bf16 goes through f32: 0x3555 = 0.33325195 -> bf16 RNE. */
    uint16_t bf[6];
    do_cast(&e, MP_DT_BF16, h, MP_DT_F16, 6, bf);
    assert_int_equal(bf[0], 0x7f80);
    assert_int_equal(bf[4], half_f32_to_bf16(half_f16_to_f32(0x3555)));

    /* fp8: e4m3fn has no Inf, 0x7f is NaN, 448 is max, 2^-9 smallest. */
    const uint8_t e4[] = {0x7f, 0x7e, 0x01, 0x38, 0xff, 0x80, 0xb8};
    float g[7];
    do_cast(&e, MP_DT_F32, e4, MP_DT_F8_E4M3, 7, g);
    assert_true(isnan(g[0]));
    assert_true(g[1] == 448.0f);
    assert_true(g[2] == ldexpf(1, -9));
    assert_true(g[3] == 1.0f);
    assert_true(isnan(g[4]));
    assert_true(g[5] == 0.0f && signbit(g[5]));
    assert_true(g[6] == -1.0f);
    uint16_t e4h[7];
    do_cast(&e, MP_DT_F16, e4, MP_DT_F8_E4M3, 7, e4h);
    assert_int_equal(e4h[1], 0x5f00); /* 448 */
    assert_int_equal(e4h[2], 0x1800); /* 2^-9 */
    assert_int_equal(e4h[0] & 0x7e00, 0x7e00);
    const uint8_t e5[] = {0x7c, 0xfc, 0x7e, 0x01, 0x3c};
    float g5[5];
    do_cast(&e, MP_DT_F32, e5, MP_DT_F8_E5M2, 5, g5);
    assert_true(isinf(g5[0]) && g5[0] > 0);
    assert_true(isinf(g5[1]) && g5[1] < 0);
    assert_true(isnan(g5[2]));
    assert_true(g5[3] == ldexpf(1, -16));
    assert_true(g5[4] == 1.0f);
    cast_close(&e);
}

/* Every f16 and bf16 value, and a million random f32s, agree with util/tensor/half.c. */
static void test_cast_matches_half(void **state) {
    (void)state;
    const size_t n = 1 << 20;
    cast_env e = cast_open(n * 4);
    uint16_t *h = malloc(n * 2), *o = malloc(n * 2);
    float *f = malloc(n * 4);
    assert_true(h && o && f);
    for (size_t i = 0; i < 65536; i++)
        h[i] = (uint16_t)i;
    do_cast(&e, MP_DT_F32, h, MP_DT_F16, 65536, f);
    for (size_t i = 0; i < 65536; i++) {
        float want = half_f16_to_f32((uint16_t)i);
        assert_memory_equal(&f[i], &want, 4);
    }
    do_cast(&e, MP_DT_F32, h, MP_DT_BF16, 65536, f);
    for (size_t i = 0; i < 65536; i++) {
        float want = half_bf16_to_f32((uint16_t)i);
        assert_memory_equal(&f[i], &want, 4);
    }
    uint64_t seed = 99;
    for (size_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)xs_next(&seed);
        /* Bias half of them into f16's range so its rounding paths are hit. */
        if (i & 1) u = (u & 0x80ffffffu) | ((uint32_t)(0x30 + (u >> 24) % 0x18) << 24);
        memcpy(&f[i], &u, 4);
    }
    do_cast(&e, MP_DT_F16, f, MP_DT_F32, n, o);
    for (size_t i = 0; i < n; i++)
        if (o[i] != half_f32_to_f16(f[i])) assert_int_equal(o[i], half_f32_to_f16(f[i]));
    do_cast(&e, MP_DT_BF16, f, MP_DT_F32, n, o);
    for (size_t i = 0; i < n; i++)
        if (o[i] != half_f32_to_bf16(f[i])) assert_int_equal(o[i], half_f32_to_bf16(f[i]));
    uint8_t b[256];
    for (int i = 0; i < 256; i++)
        b[i] = (uint8_t)i;
    do_cast(&e, MP_DT_F32, b, MP_DT_F8_E4M3, 256, f);
    for (int i = 0; i < 256; i++) {
        float want = half_fp8_e4m3_to_f32((uint8_t)i);
        if (isnan(want))
            assert_true(isnan(f[i]) && !!signbit(f[i]) == !!signbit(want));
        else
            assert_memory_equal(&f[i], &want, 4);
    }
    do_cast(&e, MP_DT_F32, b, MP_DT_F8_E5M2, 256, f);
    for (int i = 0; i < 256; i++) {
        float want = half_fp8_e5m2_to_f32((uint8_t)i);
        assert_memory_equal(&f[i], &want, 4);
    }
    free(h);
    free(o);
    free(f);
    cast_close(&e);
}

static void test_cast_args(void **state) {
    (void)state;
    cast_env e = cast_open(4096);
    mp_error err = {0};
    assert_false(gpu_cast_supported(MP_DT_F32, MP_DT_F8_E4M3));
    assert_false(gpu_cast_supported(MP_DT_I32, MP_DT_F32));
    assert_true(gpu_cast_supported(MP_DT_F8_E5M2, MP_DT_BF16));
    assert_true(gpu_cast_supported(MP_DT_BF16, MP_DT_BF16));
    assert_int_equal(gpu_cast(e.dst, 0, MP_DT_F8_E4M3, e.src, 0, MP_DT_F32, 4, &err), -1);
    assert_string_equal(err.code, "unsupported_dtype");
    assert_int_equal(gpu_cast(e.dst, 1, MP_DT_F16, e.src, 0, MP_DT_F32, 4, &err), -1);
    assert_int_equal(gpu_cast(e.dst, 0, MP_DT_F32, e.src, 0, MP_DT_F16, 1025, &err), -1);
    assert_string_equal(err.code, "out_of_range");
    assert_int_equal(gpu_cast(e.dst, 0, MP_DT_F32, e.src, 0, MP_DT_F16, UINT64_MAX / 2, &err), -1);
    /* Overlap: widening into itself is refused, same-size in place is fine. */
    assert_int_equal(gpu_cast(e.src, 0, MP_DT_F32, e.src, 0, MP_DT_F16, 16, &err), -1);
    assert_int_equal(gpu_cast(e.src, 2, MP_DT_F16, e.src, 0, MP_DT_BF16, 16, &err), -1);
    uint16_t v[4] = {0x3f80, 0x4000, 0x7f80, 0xffc0}, o[4];
    assert_int_equal(gpu_copy_h2d(e.src, 0, v, 8, &err), 0);
    assert_int_equal(gpu_cast(e.src, 0, MP_DT_F16, e.src, 0, MP_DT_BF16, 4, &err), 0);
    assert_int_equal(gpu_read(e.src, 0, o, 8, &err), 0);
    assert_int_equal(o[0], 0x3c00);
    assert_int_equal(o[1], 0x4000);
    assert_int_equal(o[2], 0x7c00);
    assert_int_equal(o[3], 0xfe00);
    /* Identity is a copy. */
    assert_int_equal(gpu_cast(e.dst, 256, MP_DT_F16, e.src, 0, MP_DT_F16, 4, &err), 0);
    assert_int_equal(gpu_read(e.dst, 256, v, 8, &err), 0);
    assert_memory_equal(v, o, 8);
    /* Different devices. */
    gpu_set *s2 = open_set("host:2", 0);
    gpu_arena *a0 = NULL, *a1 = NULL;
    assert_int_equal(gpu_arena_alloc(s2, 0, 64, &a0, &err), 0);
    assert_int_equal(gpu_arena_alloc(s2, 1, 64, &a1, &err), 0);
    assert_int_equal(gpu_cast(a0, 0, MP_DT_F32, a1, 0, MP_DT_F32, 4, &err), -1);
    gpu_arena_free(a0);
    gpu_arena_free(a1);
    gpu_set_close(s2);
    cast_close(&e);
}

/* ---- dequantization ---------------------------------------------------------- */

/* Random blocks with finite scales (random bytes elsewhere). */
static void random_blocks(int t, unsigned nblocks, unsigned bb, uint8_t *p, uint64_t *seed) {
    for (size_t i = 0; i < (size_t)nblocks * bb; i++)
        p[i] = (uint8_t)xs_next(seed);
    for (unsigned b = 0; b < nblocks; b++) {
        uint8_t *blk = p + (size_t)b * bb;
        unsigned offs[2] = {0, 2}, nf = 1;
        if (t == GGUF_T_Q4_1 || t == GGUF_T_Q5_1 || t == GGUF_T_Q4_K || t == GGUF_T_Q5_K) nf = 2;
        if (t == GGUF_T_Q6_K) offs[0] = 208;
        if (t == GGUF_T_Q3_K) offs[0] = 108;
        if (t == GGUF_T_Q2_K) offs[0] = 80, offs[1] = 82, nf = 2;
        if (t == GGUF_T_TQ1_0) offs[0] = 52;
        if (t == GGUF_T_TQ2_0) offs[0] = 64;
        /* MXFP4's and NVFP4's 8-bit scales are finite whatever the bits */
        if (t == GGUF_T_MXFP4 || t == GGUF_T_NVFP4) nf = 0;
        for (unsigned k = 0; k < nf; k++) {
            float v = ((float)(xs_next(seed) % 2001) - 1000.0f) * 1e-5f;
            if (t == GGUF_T_Q8_K) { /* an f32 scale */
                memcpy(blk + offs[k], &v, 4);
                continue;
            }
            uint16_t h = half_f32_to_f16(v);
            memcpy(blk + offs[k], &h, 2);
        }
    }
}

static void test_dequant_matches_gguf(void **state) {
    (void)state;
    const int types[] = {GGUF_T_Q4_0,  GGUF_T_Q4_1,   GGUF_T_Q5_0,   GGUF_T_Q5_1,  GGUF_T_Q8_0,
                         GGUF_T_Q2_K,  GGUF_T_Q3_K,   GGUF_T_Q4_K,   GGUF_T_Q5_K,  GGUF_T_Q6_K,
                         GGUF_T_Q8_K,  GGUF_T_IQ4_NL, GGUF_T_IQ4_XS, GGUF_T_TQ1_0, GGUF_T_TQ2_0,
                         GGUF_T_MXFP4, GGUF_T_NVFP4};
    const mp_dtype outs[] = {MP_DT_F32, MP_DT_F16, MP_DT_BF16};
    gpu_set *s = open_set("host", 0);
    mp_error err = {0};
    gpu_arena *src = NULL, *dst = NULL;
    assert_int_equal(gpu_arena_alloc(s, 0, 1 << 20, &src, &err), 0);
    assert_int_equal(gpu_arena_alloc(s, 0, 1 << 20, &dst, &err), 0);
    uint64_t seed = 2024;
    for (size_t ti = 0; ti < sizeof types / sizeof *types; ti++) {
        int t = types[ti];
        assert_true(gpu_dequant_supported(t));
        unsigned be = gguf_type_block_size(t), bb = gguf_type_block_bytes(t);
        const unsigned nblocks = 64;
        uint64_t n = (uint64_t)nblocks * be;
        uint8_t *blocks = malloc((size_t)nblocks * bb);
        uint8_t *want = malloc(n * 4), *got = malloc(n * 4);
        assert_true(blocks && want && got);
        random_blocks(t, nblocks, bb, blocks, &seed);
        assert_int_equal(gpu_copy_h2d(src, 0, blocks, (size_t)nblocks * bb, &err), 0);
        for (size_t oi = 0; oi < 3; oi++) {
            size_t os = mp_dtype_bits(outs[oi]) / 8;
            assert_int_equal(
                gguf_dequant(t, blocks, (size_t)nblocks * bb, (int64_t)n, outs[oi], want, &err), 0);
            int rc = gpu_dequant(dst, 512, outs[oi], src, 0, t, n, &err);
            if (rc) fprintf(stderr, "dequant %d: %s\n", t, err.message);
            assert_int_equal(rc, 0);
            assert_int_equal(gpu_read(dst, 512, got, n * os, &err), 0);
            if (memcmp(got, want, n * os) != 0) fprintf(stderr, "type %d out %zu\n", t, oi);
            assert_memory_equal(got, want, n * os);
        }
        free(blocks);
        free(want);
        free(got);
    }
    /* Q4_0 by hand: d = 0.5, nibbles lo=1 hi=15 -> (1-8)*0.5, (15-8)*0.5. */
    uint8_t q40[18] = {0x00, 0x38};
    memset(q40 + 2, 0xF1, 16);
    float y[32];
    assert_int_equal(gpu_copy_h2d(src, 0, q40, 18, &err), 0);
    assert_int_equal(gpu_dequant(dst, 0, MP_DT_F32, src, 0, GGUF_T_Q4_0, 32, &err), 0);
    assert_int_equal(gpu_read(dst, 0, y, sizeof y, &err), 0);
    assert_true(y[0] == -3.5f && y[15] == -3.5f && y[16] == 3.5f && y[31] == 3.5f);

    /* ggml types neither decoder has: IQ2_XXS (16), and F16 is no block */
    assert_false(gpu_dequant_supported(16));
    assert_false(gpu_dequant_supported(GGUF_T_F16));
    assert_int_equal(gpu_dequant(dst, 0, MP_DT_F16, src, 0, 16, 256, &err), -1);
    assert_string_equal(err.code, "unsupported_dtype");
    assert_int_equal(gpu_dequant(dst, 0, MP_DT_F16, src, 0, GGUF_T_Q8_0, 33, &err), -1);
    assert_int_equal(gpu_dequant(dst, 0, MP_DT_I8, src, 0, GGUF_T_Q8_0, 32, &err), -1);
    assert_int_equal(gpu_dequant(src, 0, MP_DT_F16, src, 0, GGUF_T_Q8_0, 32, &err), -1);
    assert_int_equal(gpu_dequant(dst, 0, MP_DT_F32, src, (1 << 20) - 100, GGUF_T_Q6_K, 256, &err),
                     -1);
    assert_string_equal(err.code, "out_of_range");
    gpu_arena_free(src);
    gpu_arena_free(dst);
    gpu_set_close(s);
}

/* Private (non-exportable) host arenas: cap checked first, 2 MiB aligned for
 * huge pages, copy/read-back, export refused cleanly, accounting, and the
 * exportable memfd kind comes back when switched on again. */
static void test_private_arenas(void **state) {
    (void)state;
    mp_error err = {0};
    gpu_set *g = NULL;
    assert_int_equal(gpu_set_open("host@64M", 0, &g, &err), 0);
    gpu_set_host_exportable(g, false);
    gpu_arena *a = NULL, *b = NULL;
    assert_int_equal(gpu_arena_alloc(g, 0, 100u << 20, &a, &err), GPU_NOMEM);
    assert_string_equal(err.code, "insufficient_memory");
    uint64_t size = (5u << 20) + 123;
    assert_int_equal(gpu_arena_alloc(g, 0, size, &a, &err), 0);
    unsigned char *p = gpu_arena_host_ptr(a);
    assert_non_null(p);
    assert_int_equal((uintptr_t)p & ((2u << 20) - 1), 0);
    unsigned char src[4096], back[4096];
    for (int i = 0; i < 4096; i++)
        src[i] = (unsigned char)(i * 7);
    assert_int_equal(gpu_copy_h2d(a, size - 4096, src, 4096, &err), 0);
    assert_int_equal(gpu_read(a, size - 4096, back, 4096, &err), 0);
    assert_memory_equal(src, back, 4096);
    gpu_export ex;
    assert_int_not_equal(gpu_arena_export(a, &ex, &err), 0);
    assert_string_equal(err.code, "not_exportable");
    assert_int_equal(gpu_device_resident(g, 0), size);
    gpu_set_host_exportable(g, true);
    assert_int_equal(gpu_arena_alloc(g, 0, 1u << 20, &b, &err), 0);
    assert_int_equal(gpu_arena_export(b, &ex, &err), 0);
    assert_true(ex.fd >= 0);
    gpu_arena_free(a);
    gpu_arena_free(b);
    assert_int_equal(gpu_device_resident(g, 0), 0);
    gpu_set_close(g);
}

/* ---- the arena pool and the staging cache ----------------------------------- */

/* A freed arena goes to the pool and the next allocation on the device gets
 * it back, mapped, with its bytes, resized in place (only the grown tail is
 * new, and zero); an exported arena is never pooled (an importer may still
 * map it); gpu_set_arena_pool(0) empties the pool. */
static void test_pool_reuse(void **state) {
    (void)state;
    mp_error err = {0};
    gpu_set *g = open_set("host:2@64M", 0);
    gpu_set_arena_pool(g, 64u << 20);
    gpu_arena *a = NULL;
    uint64_t n = 8u << 20;
    assert_int_equal(gpu_arena_alloc(g, 0, n, &a, &err), 0);
    assert_false(gpu_arena_reused(a));
    unsigned char *p = gpu_arena_host_ptr(a);
    for (uint64_t i = 0; i < n; i += 4096)
        p[i] = (unsigned char)(i >> 12);
    gpu_arena_free(a);
    assert_int_equal(gpu_set_pooled_bytes(g), n);
    assert_int_equal(gpu_device_resident(g, 0), 0);
    /* pooled memory counts as free */
    gpu_device_info info;
    assert_int_equal(gpu_device_info_get(g, 0, &info, &err), 0);
    assert_int_equal(info.free_bytes, 64u << 20);
    /* another device does not take it */
    assert_int_equal(gpu_arena_alloc(g, 1, n, &a, &err), 0);
    assert_false(gpu_arena_reused(a));
    gpu_arena_free(a);
    assert_int_equal(gpu_set_pooled_bytes(g), 2 * n);
    /* grown to 12 MiB: the old bytes stay, the tail is new zeros */
    uint64_t m = 12u << 20;
    assert_int_equal(gpu_arena_alloc(g, 0, m, &a, &err), 0);
    assert_true(gpu_arena_reused(a));
    assert_int_equal(gpu_arena_size(a), m);
    assert_int_equal(gpu_device_resident(g, 0), m);
    assert_int_equal(gpu_set_pooled_bytes(g), n);
    p = gpu_arena_host_ptr(a);
    for (uint64_t i = 0; i < n; i += 4096)
        assert_int_equal(p[i], (unsigned char)(i >> 12));
    for (uint64_t i = n; i < m; i += 4096)
        assert_int_equal(p[i], 0);
    p[m - 1] = 7; /* the whole new size is mapped and committed */
    /* through the memfd too, as an importer sees it */
    assert_int_equal(lseek(gpu_arena_host_fd(a), 0, SEEK_END), (off_t)m);
    /* shrunk to 1 MiB: the first MiB stays */
    gpu_arena_free(a);
    assert_int_equal(gpu_arena_alloc(g, 0, 1u << 20, &a, &err), 0);
    assert_true(gpu_arena_reused(a));
    p = gpu_arena_host_ptr(a);
    for (uint64_t i = 0; i < (1u << 20); i += 4096)
        assert_int_equal(p[i], (unsigned char)(i >> 12));
    assert_int_equal(lseek(gpu_arena_host_fd(a), 0, SEEK_END), (off_t)(1u << 20));
    /* exported: released at free, not pooled */
    gpu_export ex;
    assert_int_equal(gpu_arena_export(a, &ex, &err), 0);
    uint64_t before = gpu_set_pooled_bytes(g);
    gpu_arena_free(a);
    assert_int_equal(gpu_set_pooled_bytes(g), before);
    gpu_set_arena_pool(g, 0);
    assert_int_equal(gpu_set_pooled_bytes(g), 0);
    assert_int_equal(gpu_arena_alloc(g, 1, n, &a, &err), 0);
    assert_false(gpu_arena_reused(a));
    gpu_arena_free(a);
    assert_int_equal(gpu_set_pooled_bytes(g), 0);
    gpu_set_close(g);
}

/* Pooled memory is released when a cap needs it: two arenas pooled on a
 * 64 MiB device, then one of 50 MiB reuses the closest and the other must
 * go, or the device would hold more than its cap. The pool's own cap keeps
 * an arena that does not fit out. */
static void test_pool_released_under_cap(void **state) {
    (void)state;
    mp_error err = {0};
    gpu_set *g = open_set("host@64M", 0);
    gpu_set_arena_pool(g, 64u << 20);
    gpu_arena *a = NULL, *b = NULL, *c = NULL;
    assert_int_equal(gpu_arena_alloc(g, 0, 40u << 20, &a, &err), 0);
    assert_int_equal(gpu_arena_alloc(g, 0, 20u << 20, &b, &err), 0);
    gpu_arena_free(a);
    gpu_arena_free(b);
    assert_int_equal(gpu_set_pooled_bytes(g), 60u << 20);
    assert_int_equal(gpu_arena_alloc(g, 0, 50u << 20, &c, &err), 0);
    assert_true(gpu_arena_reused(c));
    assert_int_equal(gpu_set_pooled_bytes(g), 0);
    assert_int_equal(gpu_device_resident(g, 0), 50u << 20);
    /* a live arena's room is not the pool's: 14 MiB free, 20 asked */
    assert_int_equal(gpu_arena_alloc(g, 0, 20u << 20, &a, &err), GPU_NOMEM);
    gpu_arena_free(c);
    assert_int_equal(gpu_set_pooled_bytes(g), 50u << 20);
    /* the pool's cap: a 50 MiB arena does not fit in a 16 MiB pool */
    gpu_set_arena_pool(g, 16u << 20);
    assert_int_equal(gpu_set_pooled_bytes(g), 0);
    assert_int_equal(gpu_arena_alloc(g, 0, 50u << 20, &c, &err), 0);
    assert_false(gpu_arena_reused(c));
    gpu_arena_free(c);
    assert_int_equal(gpu_set_pooled_bytes(g), 0);
    gpu_set_close(g);
}

/* Staging: a freed buffer is handed out again (pinning once per set, not
 * per load); the cap refuses one request over it ("staging_cap") and one
 * that would take the set over it while others hold staging. */
static void test_staging_cache_and_cap(void **state) {
    (void)state;
    mp_error err = {0};
    gpu_set *g = open_set("host", 0);
    void *a = NULL, *b = NULL;
    assert_int_equal(gpu_staging_alloc(g, 65536, &a, &err), 0);
    memset(a, 1, 65536);
    gpu_staging_free(g, a);
    assert_int_equal(gpu_staging_alloc(g, 65536, &b, &err), 0);
    assert_ptr_equal(a, b);
    gpu_staging_free(g, b);
    gpu_set_staging_cap(g, 1u << 20);
    assert_int_equal(gpu_staging_alloc(g, 2u << 20, &a, &err), GPU_NOMEM);
    assert_string_equal(err.code, "staging_cap");
    assert_null(a);
    assert_int_equal(gpu_staging_alloc(g, 512u << 10, &a, &err), 0);
    assert_int_equal(gpu_staging_alloc(g, 768u << 10, &b, &err), GPU_NOMEM);
    assert_string_equal(err.code, "staging_cap");
    gpu_staging_free(g, a);
    assert_int_equal(gpu_staging_alloc(g, 768u << 10, &b, &err), 0);
    gpu_staging_free(g, b);
    gpu_set_close(g);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_discovery_host4),
        cmocka_unit_test(test_discovery_specs),
        cmocka_unit_test(test_alloc_accounting),
        cmocka_unit_test(test_cap_insufficient),
        cmocka_unit_test(test_cap_threads),
        cmocka_unit_test(test_copy_roundtrip),
        cmocka_unit_test(test_memfd_export),
        cmocka_unit_test(test_dummy_reference),
        cmocka_unit_test(test_dummy_determinism_range),
        cmocka_unit_test(test_cast_rne_special),
        cmocka_unit_test(test_cast_matches_half),
        cmocka_unit_test(test_cast_args),
        cmocka_unit_test(test_dequant_matches_gguf),
        cmocka_unit_test(test_private_arenas),
        cmocka_unit_test(test_pool_reuse),
        cmocka_unit_test(test_pool_released_under_cap),
        cmocka_unit_test(test_staging_cache_and_cap),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
