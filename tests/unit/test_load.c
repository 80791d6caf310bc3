/*
 * test_load.c - the warm_load planner and pipeline on host devices: format
 * picking, arena offsets, a staging ring far smaller than the model (the
 * ring wraps many times), casts, tensor-parallel slices by the shard rules,
 * out-of-memory and cancel leaving nothing allocated, encrypted files
 * refusing to load without a key, a read_at source (bytes from a callback,
 * as from S3) with small neighbours batched into one read, quantizing on
 * the way.
 */
#include <setjmp.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/tensor/cast.h"
#include "util/tensor/half.h"
#include "loader/warm/warm.h"
#include "loader/formats/safetensors/safetensors.h"

static char dir[64];

static int setup(void **state) {
    (void)state;
    snprintf(dir, sizeof dir, "/tmp/test_load.XXXXXX");
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* Byte k of tensor i: a pattern every check can recompute. */
static unsigned char pat(size_t i, uint64_t k) {
    return (unsigned char)((k * 131 + i * 17 + (k >> 9)) & 0xff);
}

typedef void (*fill_fn)(size_t i, unsigned char *buf, uint64_t bytes);

static void fill_pat(size_t i, unsigned char *buf, uint64_t bytes) {
    for (uint64_t j = 0; j < bytes; j++)
        buf[j] = pat(i, j);
}

/* Writes <dir>/<sub>/model.safetensors with these tensors (tensor i's
 * bytes from fill) and, when config is given, config.json. */
static void write_model_with(const char *sub, const st_wtensor *ts, size_t n, const char *config,
                             fill_fn fill) {
    char d[256], p[300];
    snprintf(d, sizeof d, "%s/%s", dir, sub);
    mkdir(d, 0755);
    snprintf(p, sizeof p, "%s/model.safetensors", d);
    st_writer *w = NULL;
    mp_error err = {0};
    assert_int_equal(st_writer_open(p, ts, n, NULL, &w, &err), 0);
    for (size_t k = 0; k < n; k++) {
        size_t i = st_writer_order(w, k);
        uint64_t b = 0;
        assert_true(mp_tensor_bytes(ts[i].dtype, ts[i].shape, ts[i].ndim, &b));
        unsigned char *buf = malloc(b ? b : 1);
        fill(i, buf, b);
        assert_int_equal(st_writer_write(w, buf, b, &err), 0);
        free(buf);
    }
    assert_int_equal(st_writer_finish(w, &err), 0);
    if (config) {
        snprintf(p, sizeof p, "%s/config.json", d);
        FILE *f = fopen(p, "w");
        fputs(config, f);
        fclose(f);
    }
}

/* The same with pattern bytes. */
static void write_model(const char *sub, const st_wtensor *ts, size_t n, const char *config) {
    write_model_with(sub, ts, n, config, fill_pat);
}

static const char *model_dir(const char *sub) {
    static char d[256];
    snprintf(d, sizeof d, "%s/%s", dir, sub);
    return d;
}

static const load_item *find(const load_plan *p, const char *name, int rank) {
    for (size_t i = 0; i < p->nitems; i++)
        if (!strcmp(p->items[i].src->name, name) && p->items[i].rank == rank) return &p->items[i];
    return NULL;
}

static void test_formats_and_offsets(void **state) {
    (void)state;
    assert_int_equal(load_format_from_name("auto"), LOAD_FMT_AUTO);
    assert_int_equal(load_format_from_name("sharded_state"), LOAD_FMT_SHARDED_STATE);
    assert_int_equal(load_format_from_name("dummy"), LOAD_FMT_DUMMY);
    assert_int_equal(load_format_from_name("jax"), -1);
    st_wtensor ts[3] = {
        {"a", MP_DT_F32, 2, {3, 5}}, {"b", MP_DT_BF16, 1, {7}}, {"c", MP_DT_F16, 1, {100}}};
    write_model("off", ts, 3, NULL);
    load_source src;
    mp_error err = {0};
    assert_int_equal(load_source_open(model_dir("off"), LOAD_FMT_AUTO, 1, &src, &err), 0);
    assert_int_equal(src.format, LOAD_FMT_SAFETENSORS);
    assert_int_equal(src.nfiles, 1);
    int devs[1] = {1};
    load_plan_opts po = {.tp_size = 1, .devices = devs, .dtype = MP_DT_INVALID};
    load_plan plan;
    assert_int_equal(load_plan_build(&src, &po, &plan, &err), 0);
    assert_int_equal(plan.nitems, 3);
    assert_int_equal(plan.total_bytes, 60 + 14 + 200);
    assert_int_equal(plan.arena_bytes[0], 0);
    uint64_t end = 0;
    for (size_t i = 0; i < plan.nitems; i++) {
        const load_item *it = &plan.items[i];
        assert_int_equal(it->device, 1);
        assert_int_equal(it->offset % 256, 0);
        assert_true(it->offset >= end);
        end = it->offset + it->bytes;
    }
    assert_int_equal(plan.arena_bytes[1], end);
    load_plan_free(&plan);
    /* fp32 on request: only float tensors change */
    po.dtype = MP_DT_F32;
    assert_int_equal(load_plan_build(&src, &po, &plan, &err), 0);
    assert_int_equal(find(&plan, "b", 0)->bytes, 28);
    assert_int_equal(find(&plan, "c", 0)->out_dtype, MP_DT_F32);
    load_plan_free(&plan);
    /* tp 2 without config.json: no split rules */
    int d2[2] = {0, 1};
    load_plan_opts p2 = {.tp_size = 2, .devices = d2, .dtype = MP_DT_INVALID};
    assert_int_equal(load_plan_build(&src, &p2, &plan, &err), -1);
    assert_string_equal(err.field, "params.tp_size");
    load_source_free(&src);
    /* missing formats */
    assert_int_equal(load_source_open(model_dir("off"), LOAD_FMT_PT, 1, &src, &err), -1);
    assert_string_equal(err.code, "not_found");
    assert_int_equal(load_source_open(model_dir("off"), LOAD_FMT_SHARDED_STATE, 1, &src, &err), -1);
    assert_string_equal(err.code, "not_found");
}

/* Loads sub with these options onto set spec; returns 0/-1 like load_run. */
typedef struct ctx {
    int calls;
    int cancel_after;
} ctx;

static bool cancel_cb(void *arg) {
    ctx *c = arg;
    return c->cancel_after >= 0 && ++c->calls > c->cancel_after;
}

static int run_dc(gpu_set *g, const char *sub, int tp, mp_dtype dt, uint64_t staging,
                  bool host_direct, bool device_convert, ctx *cx, load_source *src, load_plan *plan,
                  gpu_arena **arenas, load_stats *st, mp_error *err);

static int run(gpu_set *g, const char *sub, int tp, mp_dtype dt, uint64_t staging, bool host_direct,
               ctx *cx, load_source *src, load_plan *plan, gpu_arena **arenas, mp_error *err) {
    load_stats st;
    return run_dc(g, sub, tp, dt, staging, host_direct, false, cx, src, plan, arenas, &st, err);
}

static int run_dc(gpu_set *g, const char *sub, int tp, mp_dtype dt, uint64_t staging,
                  bool host_direct, bool device_convert, ctx *cx, load_source *src, load_plan *plan,
                  gpu_arena **arenas, load_stats *stp, mp_error *err) {
    if (load_source_open(model_dir(sub), LOAD_FMT_AUTO, tp, src, err) != 0) return -1;
    int devs[4] = {0, 1, 2, 3};
    load_plan_opts po = {.tp_size = tp, .devices = devs, .dtype = dt};
    if (load_plan_build(src, &po, plan, err) != 0) {
        load_source_free(src);
        return -1;
    }
    load_run_opts ro = {.staging_bytes = staging,
                        .readers = 3,
                        .host_direct = host_direct,
                        .device_convert = device_convert,
                        .cb = cx,
                        .cancelled = cx ? cancel_cb : NULL};
    int rc = load_run(g, src, plan, &ro, arenas, stp, err);
    if (rc == 0) {
        assert_true(stp->peak_host_bytes > 0);
        assert_true(stp->slots >= 2);
    }
    return rc;
}

static void done(load_source *src, load_plan *plan, gpu_arena **arenas) {
    for (int d = 0; d < GPU_MAX_DEVICES; d++)
        gpu_arena_free(arenas[d]);
    load_plan_free(plan);
    load_source_free(src);
}

/* Every item of the "big"/"small" ring model reads back from the arena as
 * the pattern write_model put in the file. */
static void expect_ring_bytes(const load_plan *plan, gpu_arena *arena) {
    mp_error err = {0};
    for (size_t i = 0; i < plan->nitems; i++) {
        const load_item *it = &plan->items[i];
        size_t ti = strcmp(it->src->name, "big") == 0 ? 0 : 1;
        unsigned char *buf = malloc(it->bytes);
        assert_non_null(buf);
        assert_int_equal(gpu_read(arena, it->offset, buf, it->bytes, &err), 0);
        for (uint64_t k = 0; k < it->bytes; k++)
            if (buf[k] != pat(ti, k))
                fail_msg("%s byte %llu", it->src->name, (unsigned long long)k);
        free(buf);
    }
}

static void test_ring_wraps_and_bytes_match(void **state) {
    (void)state;
    /* 600 KB through 64 KiB of staging, and the direct-to-arena path. */
    st_wtensor ts[2] = {{"big", MP_DT_F32, 2, {300, 500}}, {"small", MP_DT_I64, 1, {3}}};
    write_model("ring", ts, 2, NULL);
    gpu_set *g = NULL;
    mp_error err = {0};
    assert_int_equal(gpu_set_open("host:2", 0, &g, &err), 0);
    for (int direct = 0; direct < 2; direct++) {
        load_source src;
        load_plan plan;
        gpu_arena *arenas[GPU_MAX_DEVICES];
        assert_int_equal(
            run(g, "ring", 1, MP_DT_INVALID, 65536, direct, NULL, &src, &plan, arenas, &err), 0);
        assert_non_null(arenas[0]);
        assert_null(arenas[1]);
        expect_ring_bytes(&plan, arenas[0]);
        done(&src, &plan, arenas);
    }
    assert_int_equal(gpu_device_resident(g, 0), 0);
    gpu_set_close(g);
}

/* The same ring on async devices: arenas that are not CPU-addressable, so
 * every byte goes through staging, copies done late by a worker, and a slot
 * refilled before its fence signalled failing the load (staging_reused). */
static void test_ring_on_async_devices(void **state) {
    (void)state;
    st_wtensor ts[2] = {{"big", MP_DT_F32, 2, {300, 500}}, {"small", MP_DT_I64, 1, {3}}};
    write_model("ring_async", ts, 2, NULL);
    gpu_set *g = NULL;
    mp_error err = {0};
    assert_int_equal(gpu_set_open("async:2/100", 0, &g, &err), 0);
    for (int round = 0; round < 2; round++) {
        load_source src;
        load_plan plan;
        gpu_arena *arenas[GPU_MAX_DEVICES];
        int rc = run(g, "ring_async", 1, MP_DT_INVALID, 65536, round == 1, NULL, &src, &plan,
                     arenas, &err);
        if (rc != 0) fail_msg("%s: %s", err.code, err.message);
        expect_ring_bytes(&plan, arenas[0]);
        done(&src, &plan, arenas);
    }
    gpu_set_close(g);
}

static void test_cast_bf16_to_f32(void **state) {
    (void)state;
    st_wtensor ts[1] = {{"w", MP_DT_BF16, 2, {64, 300}}};
    write_model("cast", ts, 1, NULL);
    gpu_set *g = NULL;
    mp_error err = {0};
    assert_int_equal(gpu_set_open("host", 0, &g, &err), 0);
    load_source src;
    load_plan plan;
    gpu_arena *arenas[GPU_MAX_DEVICES];
    assert_int_equal(run(g, "cast", 1, MP_DT_F32, 65536, true, NULL, &src, &plan, arenas, &err), 0);
    float *got = malloc(64 * 300 * 4);
    assert_int_equal(gpu_read(arenas[0], 0, got, 64 * 300 * 4, &err), 0);
    for (uint64_t e = 0; e < 64 * 300; e++) {
        uint16_t h = (uint16_t)(pat(0, 2 * e) | pat(0, 2 * e + 1) << 8);
        float want = half_bf16_to_f32(h);
        if (memcmp(&want, &got[e], 4) != 0) fail_msg("element %llu", (unsigned long long)e);
    }
    free(got);
    done(&src, &plan, arenas);
    gpu_set_close(g);
}

#define CFG                                                                                        \
    "{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\",\"hidden_size\":4,"        \
    "\"num_attention_heads\":2,\"num_key_value_heads\":2,\"head_dim\":2,"                          \
    "\"intermediate_size\":8,\"num_hidden_layers\":1,\"vocab_size\":64}"

static void test_tp_slices(void **state) {
    (void)state;
    st_wtensor ts[3] = {{"model.layers.0.self_attn.q_proj.weight", MP_DT_F32, 2, {4, 4}},
                        {"model.layers.0.self_attn.o_proj.weight", MP_DT_F32, 2, {4, 4}},
                        {"model.norm.weight", MP_DT_F32, 1, {4}}};
    write_model("tp", ts, 3, CFG);
    gpu_set *g = NULL;
    mp_error err = {0};
    assert_int_equal(gpu_set_open("host:2", 0, &g, &err), 0);
    load_source src;
    load_plan plan;
    gpu_arena *arenas[GPU_MAX_DEVICES];
    assert_int_equal(run(g, "tp", 2, MP_DT_INVALID, 0, false, NULL, &src, &plan, arenas, &err), 0);
    assert_int_equal(plan.nitems, 6);
    for (int r = 0; r < 2; r++) {
        float q[8], o[8], n[4];
        const load_item *iq = find(&plan, ts[0].name, r), *io = find(&plan, ts[1].name, r),
                        *in = find(&plan, ts[2].name, r);
        assert_int_equal(iq->device, r);
        assert_int_equal(iq->shape[0], 2);
        assert_int_equal(io->shape[1], 2);
        assert_int_equal(gpu_read(arenas[r], iq->offset, q, 32, &err), 0);
        assert_int_equal(gpu_read(arenas[r], io->offset, o, 32, &err), 0);
        assert_int_equal(gpu_read(arenas[r], in->offset, n, 16, &err), 0);
        const unsigned char *qb = (void *)q, *ob = (void *)o, *nb = (void *)n;
        /* which of ts[] each is: the writer kept input order indexes */
        for (int k = 0; k < 32; k++)
            assert_int_equal(qb[k], pat(0, (uint64_t)(r * 32 + k)));
        for (int row = 0; row < 4; row++)
            for (int k = 0; k < 8; k++)
                assert_int_equal(ob[row * 8 + k], pat(1, (uint64_t)(row * 16 + r * 8 + k)));
        for (int k = 0; k < 16; k++)
            assert_int_equal(nb[k], pat(2, (uint64_t)k));
    }
    done(&src, &plan, arenas);
    gpu_set_close(g);
}

static void test_oom_and_cancel_leave_nothing(void **state) {
    (void)state;
    st_wtensor ts[1] = {{"big", MP_DT_F32, 2, {300, 500}}};
    write_model("oom", ts, 1, NULL);
    gpu_set *g = NULL;
    mp_error err = {0};
    assert_int_equal(gpu_set_open("host:1@256K", 0, &g, &err), 0);
    load_source src;
    load_plan plan;
    gpu_arena *arenas[GPU_MAX_DEVICES];
    assert_int_equal(run(g, "oom", 1, MP_DT_INVALID, 0, true, NULL, &src, &plan, arenas, &err), -1);
    assert_string_equal(err.code, "insufficient_device_memory");
    for (int d = 0; d < GPU_MAX_DEVICES; d++)
        assert_null(arenas[d]);
    assert_int_equal(gpu_device_resident(g, 0), 0);
    load_plan_free(&plan);
    load_source_free(&src);
    gpu_set_close(g);

    assert_int_equal(gpu_set_open("host", 0, &g, &err), 0);
    ctx cx = {0, 0};
    assert_int_equal(run(g, "oom", 1, MP_DT_BF16, 65536, false, &cx, &src, &plan, arenas, &err),
                     -1);
    assert_string_equal(err.code, "cancelled");
    for (int d = 0; d < GPU_MAX_DEVICES; d++)
        assert_null(arenas[d]);
    assert_int_equal(gpu_device_resident(g, 0), 0);
    load_plan_free(&plan);
    load_source_free(&src);
    gpu_set_close(g);
}

static void test_encrypted_needs_key(void **state) {
    (void)state;
    st_wtensor ts[1] = {{"w", MP_DT_F32, 1, {1000}}};
    write_model("enc", ts, 1, NULL);
    char p[300];
    snprintf(p, sizeof p, "%s/model.safetensors", model_dir("enc"));
    unsigned char key[32] = {1, 2, 3};
    mp_error err = {0};
    assert_int_equal(stc_encrypt_file(p, p, key, 4096, &err), 0);
    gpu_set *g = NULL;
    assert_int_equal(gpu_set_open("host", 0, &g, &err), 0);
    load_source src;
    load_plan plan;
    gpu_arena *arenas[GPU_MAX_DEVICES];
    assert_int_equal(run(g, "enc", 1, MP_DT_INVALID, 0, true, NULL, &src, &plan, arenas, &err), -1);
    assert_string_equal(err.code, "decryption_key_required");
    assert_true(src.encrypted);
    load_run_opts ro = {.key = key, .readers = 2};
    load_stats st;
    assert_int_equal(load_run(g, &src, &plan, &ro, arenas, &st, &err), 0);
    unsigned char got[4000];
    assert_int_equal(gpu_read(arenas[0], 0, got, 4000, &err), 0);
    for (int k = 0; k < 4000; k++)
        assert_int_equal(got[k], pat(0, (uint64_t)k));
    done(&src, &plan, arenas);
    gpu_set_close(g);
}

/* A second load reuses the first one's arena from the pool (no allocation,
 * no zero-fill) and its bytes are still right: every tensor is the file's,
 * and the alignment gaps and the tail, which held the first model's bytes,
 * read as zeros (an importer of the arena must not see an earlier model).
 * On host devices with and without the splice path, and on async ones. */
static void test_pool_second_load_reuses(void **state) {
    (void)state;
    st_wtensor big[1] = {{"big", MP_DT_F32, 2, {300, 500}}};
    write_model("pool_big", big, 1, NULL);
    /* 60 + 14 + 200 bytes at 256-aligned offsets: gaps after a and b */
    st_wtensor ts[3] = {
        {"a", MP_DT_F32, 2, {3, 5}}, {"b", MP_DT_BF16, 1, {7}}, {"c", MP_DT_F16, 1, {100}}};
    write_model("pool_small", ts, 3, NULL);
    const char *specs[] = {"host", "host", "async/50"};
    for (int v = 0; v < 3; v++) {
        gpu_set *g = NULL;
        mp_error err = {0};
        assert_int_equal(gpu_set_open(specs[v], 0, &g, &err), 0);
        gpu_set_arena_pool(g, 64u << 20);
        load_source src;
        load_plan plan;
        gpu_arena *arenas[GPU_MAX_DEVICES];
        assert_int_equal(
            run(g, "pool_big", 1, MP_DT_INVALID, 65536, v == 1, NULL, &src, &plan, arenas, &err),
            0);
        assert_false(gpu_arena_reused(arenas[0]));
        done(&src, &plan, arenas);
        assert_int_equal(gpu_set_pooled_bytes(g), 600000);
        int rc =
            run(g, "pool_small", 1, MP_DT_INVALID, 65536, v == 1, NULL, &src, &plan, arenas, &err);
        if (rc != 0) fail_msg("%s: %s", err.code, err.message);
        assert_true(gpu_arena_reused(arenas[0]));
        assert_int_equal(gpu_set_pooled_bytes(g), 0);
        uint64_t size = gpu_arena_size(arenas[0]);
        assert_int_equal(size, plan.arena_bytes[0]);
        unsigned char *all = malloc(size);
        assert_non_null(all);
        assert_int_equal(gpu_read(arenas[0], 0, all, size, &err), 0);
        uint64_t end = 0;
        for (size_t i = 0; i < plan.nitems; i++) {
            const load_item *it = &plan.items[i];
            size_t ti = (size_t)(it->src->name[0] - 'a');
            for (uint64_t k = end; k < it->offset; k++)
                if (all[k])
                    fail_msg("%s: gap byte %llu is %d", specs[v], (unsigned long long)k, all[k]);
            for (uint64_t k = 0; k < it->bytes; k++)
                if (all[it->offset + k] != pat(ti, k))
                    fail_msg("%s: %s byte %llu", specs[v], it->src->name, (unsigned long long)k);
            end = it->offset + it->bytes;
        }
        free(all);
        done(&src, &plan, arenas);
        gpu_set_close(g);
    }
}

/* Casts on the device (device_convert): the raw bf16 / f32 bytes go through
 * staging into the device's scratch and gpu_cast writes the arena. An
 * up-cast (bf16 -> f32) and a down-cast (f32 -> bf16, whose raw piece is
 * bigger than its output) through 64 KiB of staging, so slots and their
 * scratch parts are reused many times: on async devices (late copies and
 * kernels, a slot refilled early fails the load) and on host ones. The
 * bytes are the CPU cast's (util/tensor/cast.c). */
static void test_cast_on_device(void **state) {
    (void)state;
    st_wtensor up[1] = {{"w", MP_DT_BF16, 2, {64, 300}}};
    write_model("dcast_up", up, 1, NULL);
    st_wtensor dn[1] = {{"w", MP_DT_F32, 2, {64, 300}}};
    write_model("dcast_down", dn, 1, NULL);
    const char *specs[] = {"async/100", "host"};
    for (int v = 0; v < 2; v++)
        for (int down = 0; down < 2; down++) {
            mp_dtype sd = down ? MP_DT_F32 : MP_DT_BF16, od = down ? MP_DT_BF16 : MP_DT_F32;
            uint64_t n = 64 * 300, si = down ? 4 : 2, oi = down ? 2 : 4;
            gpu_set *g = NULL;
            mp_error err = {0};
            assert_int_equal(gpu_set_open(specs[v], 0, &g, &err), 0);
            load_source src;
            load_plan plan;
            load_stats st;
            gpu_arena *arenas[GPU_MAX_DEVICES];
            int rc = run_dc(g, down ? "dcast_down" : "dcast_up", 1, od, 65536, true, true, NULL,
                            &src, &plan, arenas, &st, &err);
            if (rc != 0) fail_msg("%s: %s: %s", specs[v], err.code, err.message);
            assert_int_equal(st.device_converted, n * oi);
            unsigned char *raw = malloc(n * si), *want = malloc(n * oi), *got = malloc(n * oi);
            for (uint64_t k = 0; k < n * si; k++)
                raw[k] = pat(0, k);
            assert_true(tensor_cast(sd, raw, od, want, (size_t)n));
            assert_int_equal(gpu_read(arenas[0], 0, got, n * oi, &err), 0);
            if (memcmp(want, got, n * oi) != 0)
                fail_msg("%s down %d: bytes differ", specs[v], down);
            free(raw);
            free(want);
            free(got);
            done(&src, &plan, arenas);
            gpu_set_close(g);
        }
}

/* A read_at source over the real file: counts the calls, fails from call
 * fail_at on (0: never), as a store that stops answering would. */
typedef struct fake_store {
    const load_source *src;
    atomic_int calls;
    int fail_at;
} fake_store;

static int fake_read(void *arg, uint32_t file, uint32_t part, uint64_t off, void *dst, uint64_t len,
                     mp_error *err) {
    fake_store *f = arg;
    int n = atomic_fetch_add(&f->calls, 1) + 1;
    if (f->fail_at && n >= f->fail_at) return mp_err(err, "bad_response", "injected");
    return weights_pread(f->src->files[file].w->fds[part], dst, len, off, err);
}

static void test_read_at_batches_neighbours(void **state) {
    (void)state;
    enum { NSMALL = 20 };
    st_wtensor ts[1 + NSMALL] = {{"big", MP_DT_F32, 2, {300, 500}}};
    char names[NSMALL][8];
    for (int i = 0; i < NSMALL; i++) {
        snprintf(names[i], sizeof names[i], "s%02d", i);
        ts[1 + i] = (st_wtensor){names[i], MP_DT_F32, 1, {64}};
    }
    write_model("remote", ts, 1 + NSMALL, NULL);
    const char *kinds[] = {"host:1", "async:1/100"};
    for (int round = 0; round < 3; round++) {
        gpu_set *g = NULL;
        mp_error err = {0};
        assert_int_equal(gpu_set_open(kinds[round == 1], 0, &g, &err), 0);
        load_source src;
        load_plan plan;
        assert_int_equal(load_source_open(model_dir("remote"), LOAD_FMT_AUTO, 1, &src, &err), 0);
        int devs[1] = {0};
        load_plan_opts po = {.tp_size = 1, .devices = devs};
        assert_int_equal(load_plan_build(&src, &po, &plan, &err), 0);
        fake_store fs = {.src = &src, .fail_at = round == 2 ? 3 : 0};
        atomic_init(&fs.calls, 0);
        load_run_opts ro = {.staging_bytes = 256 << 10,
                            .readers = 3,
                            .host_direct = round == 0,
                            .read_at = fake_read,
                            .read_arg = &fs};
        gpu_arena *arenas[GPU_MAX_DEVICES];
        load_stats st;
        int rc = load_run(g, &src, &plan, &ro, arenas, &st, &err);
        if (round == 2) {
            /* the store's error, and nothing left allocated */
            assert_int_equal(rc, -1);
            assert_string_equal(err.code, "bad_response");
            assert_null(arenas[0]);
        } else {
            if (rc != 0) fail_msg("%s: %s", err.code, err.message);
            /* the big tensor in slot-sized reads, the 20 small ones in one */
            uint64_t pieces = (600000 + st.slot_bytes - 1) / st.slot_bytes;
            assert_int_equal(st.reads, pieces + 1);
            assert_int_equal(atomic_load(&fs.calls), (int)st.reads);
            for (size_t i = 0; i < plan.nitems; i++) {
                const load_item *it = &plan.items[i];
                size_t ti =
                    strcmp(it->src->name, "big") == 0 ? 0 : 1 + (size_t)atoi(it->src->name + 1);
                unsigned char *buf = malloc(it->bytes);
                assert_non_null(buf);
                assert_int_equal(gpu_read(arenas[0], it->offset, buf, it->bytes, &err), 0);
                for (uint64_t k = 0; k < it->bytes; k++)
                    if (buf[k] != pat(ti, k))
                        fail_msg("%s byte %llu", it->src->name, (unsigned long long)k);
                free(buf);
            }
        }
        done(&src, &plan, arenas);
        gpu_set_close(g);
    }
}

/* Finite bf16 values (tensor i's), and the same with one NaN. */
static void fill_bf16(size_t i, unsigned char *buf, uint64_t bytes) {
    for (uint64_t j = 0; j + 1 < bytes; j += 2) {
        float v = (float)((int)((j / 2 * 37 + i * 11) % 401) - 200) / 32.0f;
        uint16_t h = half_f32_to_bf16(v);
        memcpy(buf + j, &h, 2);
    }
}

static void fill_bf16_nan(size_t i, unsigned char *buf, uint64_t bytes) {
    fill_bf16(i, buf, bytes);
    uint16_t nan = 0x7fc0;
    if (i == 0 && bytes > 2 * 1234) memcpy(buf + 2 * 1234, &nan, 2);
}

/* Quantizing on the way (fp8-block, ragged 16 x 24 blocks) through 64 KiB
 * of staging on host and async devices: the weight's parts are items of
 * their own at aligned offsets, and their bytes are qz_quantize's of the
 * source; lm_head stays as it is (default ignore). A NaN fails the load
 * with non_finite_weight and leaves nothing allocated. */
static void test_quantize_on_the_way(void **state) {
    (void)state;
    st_wtensor ts[2] = {{"model.layers.0.mlp.up_proj.weight", MP_DT_BF16, 2, {300, 70}},
                        {"lm_head.weight", MP_DT_BF16, 2, {10, 70}}};
    write_model_with("quant", ts, 2, NULL, fill_bf16);
    write_model_with("quant_nan", ts, 2, NULL, fill_bf16_nan);
    qz_params qp;
    qz_params_default(&qp, QZ_FP8_BLOCK);
    qp.block_n = 16;
    qp.block_k = 24;
    uint64_t shape[2] = {300, 70};
    qz_plan want;
    mp_error err = {0};
    assert_int_equal(qz_plan_tensor(&qp, ts[0].name, MP_DT_BF16, shape, &want, &err), 0);
    unsigned char *src = malloc(300 * 70 * 2), *parts[2];
    fill_bf16(0, src, 300 * 70 * 2);
    for (int k = 0; k < 2; k++)
        parts[k] = malloc(want.parts[k].nbytes);
    assert_int_equal(qz_quantize(&qp, &want, MP_DT_BF16, src, (void *const *)parts, &err), 0);
    const char *specs[] = {"async/100", "host"};
    for (int v = 0; v < 2; v++) {
        gpu_set *g = NULL;
        assert_int_equal(gpu_set_open(specs[v], 0, &g, &err), 0);
        load_source src_;
        load_plan plan;
        load_stats st;
        gpu_arena *arenas[GPU_MAX_DEVICES];
        int devs[1] = {0};
        load_plan_opts po = {.tp_size = 1, .devices = devs, .dtype = MP_DT_INVALID, .quant = &qp};
        load_run_opts ro = {.staging_bytes = 65536, .readers = 3, .host_direct = true};
        assert_int_equal(load_source_open(model_dir("quant"), LOAD_FMT_AUTO, 1, &src_, &err), 0);
        assert_int_equal(load_plan_build(&src_, &po, &plan, &err), 0);
        assert_int_equal(plan.nitems, 3);
        assert_int_equal(plan.nquants, 1);
        assert_int_equal(plan.quant_bytes_in, 300 * 70 * 2);
        int rc = load_run(g, &src_, &plan, &ro, arenas, &st, &err);
        if (rc != 0) fail_msg("%s: %s: %s", specs[v], err.code, err.message);
        size_t k = 0;
        for (size_t i = 0; i < plan.nitems; i++) {
            const load_item *it = &plan.items[i];
            assert_int_equal(it->offset % 256, 0);
            if (it->kind != LOAD_K_QUANT) {
                assert_string_equal(it->name, "lm_head.weight");
                continue;
            }
            assert_string_equal(it->name, want.parts[k].name);
            assert_int_equal(it->out_dtype, want.parts[k].dtype);
            assert_int_equal(it->bytes, want.parts[k].nbytes);
            unsigned char *got = malloc(it->bytes);
            assert_int_equal(gpu_read(arenas[0], it->offset, got, it->bytes, &err), 0);
            if (memcmp(got, parts[k], it->bytes) != 0)
                fail_msg("%s: %s differs", specs[v], it->name);
            free(got);
            k++;
        }
        assert_int_equal(k, 2);
        done(&src_, &plan, arenas);
        /* the NaN */
        assert_int_equal(load_source_open(model_dir("quant_nan"), LOAD_FMT_AUTO, 1, &src_, &err),
                         0);
        assert_int_equal(load_plan_build(&src_, &po, &plan, &err), 0);
        assert_int_equal(load_run(g, &src_, &plan, &ro, arenas, &st, &err), -1);
        assert_string_equal(err.code, "non_finite_weight");
        for (int d = 0; d < GPU_MAX_DEVICES; d++)
            assert_null(arenas[d]);
        assert_int_equal(gpu_device_resident(g, 0), 0);
        done(&src_, &plan, arenas);
        gpu_set_close(g);
    }
    for (int k = 0; k < 2; k++)
        free(parts[k]);
    free(src);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_formats_and_offsets),
        cmocka_unit_test(test_ring_wraps_and_bytes_match),
        cmocka_unit_test(test_ring_on_async_devices),
        cmocka_unit_test(test_cast_bf16_to_f32),
        cmocka_unit_test(test_tp_slices),
        cmocka_unit_test(test_oom_and_cancel_leave_nothing),
        cmocka_unit_test(test_encrypted_needs_key),
        cmocka_unit_test(test_pool_second_load_reuses),
        cmocka_unit_test(test_cast_on_device),
        cmocka_unit_test(test_read_at_batches_neighbours),
        cmocka_unit_test(test_quantize_on_the_way),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
