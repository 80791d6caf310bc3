/*
 * test_gpu_async.c - the async test backend (gpu/gpu_async.c), whose worth
 * is that it fails where a GPU would: --devices parsing, a fence that stays
 * pending until its copy is really done (observed with gpu_async_hold),
 * in-order completion per stream, a staging buffer modified while its copy
 * is pending detected (sticky "staging_reused", destination poisoned),
 * freeing staging waiting for pending copies (ASan would see the late read
 * otherwise), casts and fills queued on the stream, and borrowed exports.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "gpu/dummy.h"
#include "gpu/gpu.h"
#include "util/tensor/half.h"

static gpu_set *open_set(const char *spec) {
    gpu_set *s = NULL;
    mp_error err = {0};
    int rc = gpu_set_open(spec, 0, &s, &err);
    if (rc != 0) fprintf(stderr, "gpu_set_open(%s): %s: %s\n", spec, err.code, err.message);
    assert_int_equal(rc, 0);
    return s;
}

static void sleep_ms(int ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void test_discovery(void **state) {
    (void)state;
    gpu_set *s = open_set("async");
    assert_int_equal(gpu_set_count(s), 1);
    assert_int_equal(gpu_set_kind(s), GPU_KIND_ASYNC);
    assert_string_equal(gpu_kind_name(GPU_KIND_ASYNC), "async");
    assert_string_equal(gpu_set_cuda_error(s), "");
    gpu_set_close(s);

    s = open_set("async:3@1M/0");
    assert_int_equal(gpu_set_count(s), 3);
    gpu_device_info info;
    mp_error err = {0};
    assert_int_equal(gpu_device_info_get(s, 2, &info, &err), 0);
    assert_int_equal(info.kind, GPU_KIND_ASYNC);
    assert_string_equal(info.name, "async");
    assert_int_equal(info.total_bytes, 1 << 20);
    /* Device memory is not CPU-addressable, as on a GPU. */
    gpu_arena *a = NULL;
    assert_int_equal(gpu_arena_alloc(s, 2, 4096, &a, &err), 0);
    assert_null(gpu_arena_host_ptr(a));
    assert_int_equal(gpu_device_resident(s, 2), 4096);
    gpu_arena *big = NULL;
    assert_int_equal(gpu_arena_alloc(s, 2, 1 << 20, &big, &err), GPU_NOMEM);
    gpu_arena_free(a);
    gpu_set_close(s);

    s = open_set("async:2/5000");
    assert_int_equal(gpu_set_count(s), 2);
    gpu_set_close(s);

    static const char *bad[] = {"async:0",    "async:65", "async:",   "async:1/",
                                "async:1/x",  "async@",   "asyncx",   "async:1/2000000",
                                "async:1@1Q", "async/1x", "host:1/5", "async:2@/5"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        gpu_set *t = NULL;
        mp_error e = {0};
        if (gpu_set_open(bad[i], 0, &t, &e) != -1) fail_msg("accepted %s", bad[i]);
        assert_null(t);
        assert_string_equal(e.field, "devices");
        assert_string_equal(e.code, "invalid_devices");
    }
    /* Holding is for async devices only. */
    s = open_set("host");
    assert_int_equal(gpu_async_hold(s, 0, true, &err), -1);
    gpu_set_close(s);
}

/* A fence reports pending, and a wait blocks, until the copy before it has
 * really happened; a read waits for it too. */
static void test_fence_pending_until_done(void **state) {
    (void)state;
    gpu_set *s = open_set("async:1/0");
    mp_error err = {0};
    gpu_arena *a = NULL;
    assert_int_equal(gpu_arena_alloc(s, 0, 8192, &a, &err), 0);
    unsigned char *stg = NULL;
    assert_int_equal(gpu_staging_alloc(s, 4096, (void **)&stg, &err), 0);
    /* Fresh staging is poison, not zeros. */
    assert_int_equal(stg[0], 0xA5);
    assert_int_equal(stg[4095], 0xA5);
    gpu_fence *f = NULL;
    assert_int_equal(gpu_fence_create(s, 0, &f, &err), 0);
    assert_int_equal(gpu_fence_query(f, &err), 1); /* never recorded */
    for (int i = 0; i < 4096; i++)
        stg[i] = (unsigned char)(i * 7 + 1);

    assert_int_equal(gpu_async_hold(s, 0, true, &err), 0);
    assert_int_equal(gpu_copy_h2d(a, 4096, stg, 4096, &err), 0);
    assert_int_equal(gpu_fence_record(f, &err), 0);
    for (int k = 0; k < 5; k++) {
        assert_int_equal(gpu_fence_query(f, &err), 0);
        sleep_ms(5);
    }
    /* The arena's memfd shows the copy has not happened. */
    gpu_export ex;
    assert_int_equal(gpu_arena_export(a, &ex, &err), 0);
    unsigned char *view = mmap(NULL, 8192, PROT_READ, MAP_SHARED, ex.fd, 0);
    assert_true(view != MAP_FAILED);
    assert_int_equal(view[4096], 0);
    assert_int_equal(gpu_async_hold(s, 0, false, &err), 0);
    assert_int_equal(gpu_fence_wait(f, &err), 0);
    assert_int_equal(gpu_fence_query(f, &err), 1);
    assert_memory_equal(view + 4096, stg, 4096);
    unsigned char back[4096];
    assert_int_equal(gpu_read(a, 4096, back, 4096, &err), 0);
    assert_memory_equal(back, stg, 4096);

    /* A read alone waits for what is queued before it. */
    assert_int_equal(gpu_async_hold(s, 0, true, &err), 0);
    memset(stg, 0x3c, 4096);
    assert_int_equal(gpu_copy_h2d(a, 0, stg, 4096, &err), 0);
    assert_int_equal(gpu_async_hold(s, 0, false, &err), 0);
    assert_int_equal(gpu_read(a, 0, back, 4096, &err), 0);
    assert_memory_equal(back, stg, 4096);
    munmap(view, 8192);
    gpu_fence_free(f);
    gpu_staging_free(s, stg);
    gpu_arena_free(a);
    gpu_set_close(s);
}

/* Copies complete in call order: many copies to one place leave the last
 * one's bytes, and a later fence is never reached before an earlier one. */
static void test_in_order_completion(void **state) {
    (void)state;
    gpu_set *s = open_set("async:2/300");
    mp_error err = {0};
    enum { K = 24, N = 1024 };
    gpu_arena *a = NULL;
    assert_int_equal(gpu_arena_alloc(s, 1, N, &a, &err), 0);
    unsigned char *stg = NULL;
    assert_int_equal(gpu_staging_alloc(s, (size_t)K * N, (void **)&stg, &err), 0);
    gpu_fence *f[K];
    for (int k = 0; k < K; k++) {
        assert_int_equal(gpu_fence_create(s, 1, &f[k], &err), 0);
        memset(stg + (size_t)k * N, k + 1, N);
    }
    for (int round = 0; round < 5; round++) {
        for (int k = 0; k < K; k++) {
            assert_int_equal(gpu_copy_h2d(a, 0, stg + (size_t)k * N, N, &err), 0);
            assert_int_equal(gpu_fence_record(f[k], &err), 0);
        }
        /* Poll while the worker drains, newest fence first: once a fence is
         * seen reached, every older one must be reached when asked later. */
        for (bool all = false; !all;) {
            bool newer_reached = false;
            for (int k = K - 1; k >= 0; k--) {
                int q = gpu_fence_query(f[k], &err);
                assert_true(q == 0 || q == 1);
                if (newer_reached && q != 1) fail_msg("fence %d pending after a later one", k);
                newer_reached = newer_reached || q == 1;
                all = k == 0 && q == 1;
            }
        }
        unsigned char back[N];
        assert_int_equal(gpu_read(a, 0, back, N, &err), 0);
        for (int i = 0; i < N; i++)
            assert_int_equal(back[i], K);
    }
    for (int k = 0; k < K; k++)
        gpu_fence_free(f[k]);
    gpu_staging_free(s, stg);
    gpu_arena_free(a);
    gpu_set_close(s);
}

/* The bug the backend exists for: a staging buffer refilled before its
 * copy's fence signalled. The copy reports it, the destination is poison and
 * the device stays failed. */
static void test_reuse_before_fence_detected(void **state) {
    (void)state;
    gpu_set *s = open_set("async:1/0");
    mp_error err = {0};
    gpu_arena *a = NULL;
    assert_int_equal(gpu_arena_alloc(s, 0, 4096, &a, &err), 0);
    unsigned char *stg = NULL;
    assert_int_equal(gpu_staging_alloc(s, 4096, (void **)&stg, &err), 0);
    gpu_fence *f = NULL;
    assert_int_equal(gpu_fence_create(s, 0, &f, &err), 0);
    memset(stg, 1, 4096);
    assert_int_equal(gpu_async_hold(s, 0, true, &err), 0);
    assert_int_equal(gpu_copy_h2d(a, 0, stg, 4096, &err), 0);
    assert_int_equal(gpu_fence_record(f, &err), 0);
    stg[100] = 2; /* refilled early: no wait on f */
    assert_int_equal(gpu_async_hold(s, 0, false, &err), 0);
    memset(&err, 0, sizeof err);
    assert_int_equal(gpu_fence_wait(f, &err), -1);
    assert_string_equal(err.code, "staging_reused");
    assert_non_null(strstr(err.message, "fence"));
    /* Sticky: every later call on the device fails the same way. */
    memset(&err, 0, sizeof err);
    assert_int_equal(gpu_device_sync(s, 0, &err), -1);
    assert_string_equal(err.code, "staging_reused");
    assert_int_equal(gpu_fence_query(f, &err), -1);
    assert_int_equal(gpu_copy_h2d(a, 0, stg, 16, &err), -1);
    unsigned char back[16];
    assert_int_equal(gpu_read(a, 0, back, 16, &err), -1);
    /* The destination holds poison, not the refilled bytes. */
    gpu_export ex;
    assert_int_equal(gpu_arena_export(a, &ex, &err), 0);
    unsigned char *view = mmap(NULL, 4096, PROT_READ, MAP_SHARED, ex.fd, 0);
    assert_true(view != MAP_FAILED);
    for (int i = 0; i < 4096; i++)
        assert_int_equal(view[i], 0xA5);
    munmap(view, 4096);
    gpu_fence_free(f);
    gpu_staging_free(s, stg);
    gpu_arena_free(a);
    gpu_set_close(s);

    /* The same copy with the wait in place is fine. */
    s = open_set("async:1/0");
    assert_int_equal(gpu_arena_alloc(s, 0, 4096, &a, &err), 0);
    assert_int_equal(gpu_staging_alloc(s, 4096, (void **)&stg, &err), 0);
    assert_int_equal(gpu_fence_create(s, 0, &f, &err), 0);
    memset(stg, 1, 4096);
    assert_int_equal(gpu_async_hold(s, 0, true, &err), 0);
    assert_int_equal(gpu_copy_h2d(a, 0, stg, 4096, &err), 0);
    assert_int_equal(gpu_fence_record(f, &err), 0);
    assert_int_equal(gpu_async_hold(s, 0, false, &err), 0);
    assert_int_equal(gpu_fence_wait(f, &err), 0);
    stg[100] = 2;
    assert_int_equal(gpu_device_sync(s, 0, &err), 0);
    assert_int_equal(gpu_read(a, 100, back, 1, &err), 0);
    assert_int_equal(back[0], 1);
    gpu_fence_free(f);
    gpu_staging_free(s, stg);
    gpu_arena_free(a);
    gpu_set_close(s);
}

/* Freeing staging (and arenas) waits for the copies still reading them:
 * under ASan a late read of freed staging would abort the test. */
static void test_free_waits_for_pending(void **state) {
    (void)state;
    gpu_set *s = open_set("async:2/20000");
    mp_error err = {0};
    for (int round = 0; round < 3; round++) {
        gpu_arena *a = NULL, *b = NULL;
        assert_int_equal(gpu_arena_alloc(s, 0, 65536, &a, &err), 0);
        assert_int_equal(gpu_arena_alloc(s, 1, 65536, &b, &err), 0);
        unsigned char *stg = NULL;
        assert_int_equal(gpu_staging_alloc(s, 65536, (void **)&stg, &err), 0);
        memset(stg, round + 1, 65536);
        for (int k = 0; k < 4; k++) {
            assert_int_equal(gpu_copy_h2d(a, (uint64_t)k * 16384, stg + k * 16384, 16384, &err), 0);
            assert_int_equal(gpu_copy_h2d(b, (uint64_t)k * 16384, stg + k * 16384, 16384, &err), 0);
        }
        gpu_staging_free(s, stg);
        unsigned char back[16];
        assert_int_equal(gpu_read(b, 65536 - 16, back, 16, &err), 0);
        assert_int_equal(back[0], round + 1);
        gpu_arena_free(a);
        gpu_arena_free(b);
    }
    gpu_set_close(s);
}

/* Casts and dummy fills run on the stream, in order after the copies that
 * feed them, with the host backend's bytes. */
static void test_cast_and_fill_queued(void **state) {
    (void)state;
    gpu_set *s = open_set("async:1/200");
    mp_error err = {0};
    enum { N = 4096 };
    gpu_arena *src = NULL, *dst = NULL;
    assert_int_equal(gpu_arena_alloc(s, 0, N * 2, &src, &err), 0);
    assert_int_equal(gpu_arena_alloc(s, 0, N * 4, &dst, &err), 0);
    uint16_t *h = NULL;
    assert_int_equal(gpu_staging_alloc(s, N * 2, (void **)&h, &err), 0);
    for (int i = 0; i < N; i++)
        h[i] = (uint16_t)(i * 13 + 0x3000);
    assert_int_equal(gpu_copy_h2d(src, 0, h, N * 2, &err), 0);
    assert_int_equal(gpu_cast(dst, 0, MP_DT_F32, src, 0, MP_DT_F16, N, &err), 0);
    float *got = malloc(N * 4);
    assert_int_equal(gpu_read(dst, 0, got, N * 4, &err), 0);
    for (int i = 0; i < N; i++) {
        float want = half_f16_to_f32(h[i]);
        assert_memory_equal(&got[i], &want, 4);
    }
    gpu_dummy_params p = {.seed = 5, .low = -1.0f, .high = 1.0f, .first = 3};
    assert_int_equal(gpu_fill_dummy(dst, 0, MP_DT_F32, N, "t", &p, &err), 0);
    float *cpu = malloc(N * 4);
    assert_int_equal(
        gpu_dummy_fill_cpu(cpu, MP_DT_F32, N, 3, gpu_dummy_tensor_seed(5, "t"), -1.0f, 1.0f), 0);
    assert_int_equal(gpu_read(dst, 0, got, N * 4, &err), 0);
    assert_memory_equal(got, cpu, N * 4);
    free(cpu);
    free(got);
    gpu_staging_free(s, h);
    gpu_arena_free(src);
    gpu_arena_free(dst);
    gpu_set_close(s);
}

/* Async exports map as memfds but are borrowed, as CUDA IPC handles are;
 * host exports are not. */
static void test_export_borrowed(void **state) {
    (void)state;
    mp_error err = {0};
    static const char *specs[] = {"async", "host"};
    for (int i = 0; i < 2; i++) {
        gpu_set *s = open_set(specs[i]);
        gpu_arena *a = NULL;
        assert_int_equal(gpu_arena_alloc(s, 0, 4096, &a, &err), 0);
        gpu_export ex;
        assert_int_equal(gpu_arena_export(a, &ex, &err), 0);
        assert_int_equal(ex.kind, GPU_KIND_HOST);
        assert_true(ex.fd >= 0);
        assert_int_equal(ex.borrowed, i == 0);
        gpu_arena_free(a);
        gpu_set_host_exportable(s, false);
        assert_int_equal(gpu_arena_alloc(s, 0, 4096, &a, &err), 0);
        assert_int_equal(gpu_arena_export(a, &ex, &err), -1);
        assert_string_equal(err.code, "not_exportable");
        gpu_arena_free(a);
        gpu_set_close(s);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_discovery),
        cmocka_unit_test(test_fence_pending_until_done),
        cmocka_unit_test(test_in_order_completion),
        cmocka_unit_test(test_reuse_before_fence_detected),
        cmocka_unit_test(test_free_waits_for_pending),
        cmocka_unit_test(test_cast_and_fill_queued),
        cmocka_unit_test(test_export_borrowed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
