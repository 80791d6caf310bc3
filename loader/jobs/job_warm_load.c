/*
 * job_warm_load.c - the warm_load job: open a model's weights, plan where
 * every tensor goes (tensor-parallel rank, device, dtype, arena offset),
 * stream them onto the devices (loader/load.h), and keep them resident
 * (loader/residents.h) or, with keep_resident false, measure and free.
 *
 * Metrics: the loader cannot reach the server's counters (server/metrics.c);
 * the result carries bytes and timings, and the lead wires the byte counters
 * from there.
 */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/jobs/jobs_internal.h"
#include "loader/models/models.h"
#include "loader/warm/warm.h"
#include "loader/residents/residents.h"
#include "util/jobtype.h"
#include "util/timeutil.h"

#define WL_MAX_IGNORE 64

typedef struct wl_params {
    load_format format;
    int tp_size;
    int devices[GPU_MAX_DEVICES];
    int ndevices; /* as given, 0 when absent */
    mp_dtype dtype;
    const char *key_file;
    float low, high;
    uint64_t seed;
    bool keep_resident, direct_io, host_direct;
    int device_convert; /* -1: as the devices' kind says (on for CUDA) */
    uint64_t staging_bytes;
    int readers;
    bool quantize; /* q holds the method's parameters */
    qz_params q;
    const char *ignore[WL_MAX_IGNORE]; /* borrowed from the params */
    size_t nignore;
} wl_params;

static mp_dtype dtype_param(const char *s) {
    if (!s || !strcmp(s, "auto") || !strcmp(s, "keep")) return MP_DT_INVALID;
    if (!strcmp(s, "bf16")) return MP_DT_BF16;
    if (!strcmp(s, "fp16")) return MP_DT_F16;
    return MP_DT_F32;
}

/* quantize and its options: a method name, options only where the method
 * has them, and nothing a quantizing load cannot do (a dtype cast, dummy
 * weights, GGUF blocks). */
static int parse_quantize(const json_t *p, wl_params *w, mp_error *err) {
    const char *m = json_string_value(json_object_get(p, "quantize"));
    json_t *bs = json_object_get(p, "quantize_block_size");
    json_t *dq = json_object_get(p, "quantize_double_quant");
    json_t *ig = json_object_get(p, "quantize_ignore");
    if (!m) {
        if (bs || dq || ig)
            return mp_err_field(err, "params.quantize", "param_conflict",
                                "quantize_block_size, quantize_double_quant and quantize_ignore "
                                "need quantize");
        return 0;
    }
    qz_method meth;
    if (qz_method_parse(m, &meth) != 0)
        return mp_err_field(err, "params.quantize", "bad_value", "unknown quantization method");
    w->quantize = true;
    qz_params_default(&w->q, meth);
    if (bs && meth != QZ_FP8_BLOCK)
        return mp_err_field(err, "params.quantize_block_size", "param_conflict",
                            "quantize_block_size is for quantize fp8-block only");
    if (bs) {
        if (json_array_size(bs) != 2)
            return mp_err_field(err, "params.quantize_block_size", "bad_value",
                                "quantize_block_size is [block_n, block_k]");
        w->q.block_n = (uint32_t)json_integer_value(json_array_get(bs, 0));
        w->q.block_k = (uint32_t)json_integer_value(json_array_get(bs, 1));
    }
    if (dq && meth != QZ_NF4)
        return mp_err_field(err, "params.quantize_double_quant", "param_conflict",
                            "quantize_double_quant is for quantize nf4 only");
    if (dq) w->q.double_quant = json_is_true(dq);
    if (json_array_size(ig) > WL_MAX_IGNORE)
        return mp_err_field(err, "params.quantize_ignore", "out_of_range",
                            "at most %d ignore patterns", WL_MAX_IGNORE);
    for (size_t i = 0; i < json_array_size(ig); i++)
        w->ignore[w->nignore++] = json_string_value(json_array_get(ig, i));
    if (w->dtype != MP_DT_INVALID)
        return mp_err_field(err, "params.dtype", "param_conflict",
                            "quantize loads the checkpoint's weights quantized: leave dtype out");
    if (w->format == LOAD_FMT_DUMMY || w->format == LOAD_FMT_GGUF)
        return mp_err_field(err, "params.load_format", "param_conflict",
                            "quantize needs real F32/F16/BF16 weights, not load_format %s",
                            load_format_name(w->format));
    if (qz_params_check(&w->q, err) != 0) {
        snprintf(err->field, sizeof err->field, "params.quantize_block_size");
        return -1;
    }
    return 0;
}

/* Params beyond what the declarative spec checks. */
static int parse_params(const json_t *p, wl_params *w, mp_error *err) {
    memset(w, 0, sizeof *w);
    const char *fmt = json_string_value(json_object_get(p, "load_format"));
    int f = load_format_from_name(fmt ? fmt : "auto");
    if (f < 0) return mp_err_field(err, "params.load_format", "bad_value", "unknown load_format");
    w->format = (load_format)f;
    w->dtype = dtype_param(json_string_value(json_object_get(p, "dtype")));
    json_t *devs = json_object_get(p, "devices");
    w->ndevices = devs ? (int)json_array_size(devs) : 0;
    if (w->ndevices > GPU_MAX_DEVICES)
        return mp_err_field(err, "params.devices", "out_of_range", "at most %d devices",
                            GPU_MAX_DEVICES);
    for (int i = 0; i < w->ndevices; i++) {
        w->devices[i] = (int)json_integer_value(json_array_get(devs, (size_t)i));
        for (int j = 0; j < i; j++)
            if (w->devices[j] == w->devices[i])
                return mp_err_field(err, "params.devices", "bad_value", "device %d listed twice",
                                    w->devices[i]);
    }
    json_t *tp = json_object_get(p, "tp_size");
    w->tp_size = tp ? (int)json_integer_value(tp) : (w->ndevices ? w->ndevices : 1);
    if (w->tp_size < 1 || w->tp_size > GPU_MAX_DEVICES)
        return mp_err_field(err, "params.tp_size", "out_of_range", "tp_size must be 1..%d",
                            GPU_MAX_DEVICES);
    if (w->ndevices && w->ndevices != w->tp_size)
        return mp_err_field(err, "params.devices", "param_conflict",
                            "devices must list tp_size (%d) devices", w->tp_size);
    if (!w->ndevices)
        for (int i = 0; i < w->tp_size; i++)
            w->devices[i] = i;
    w->key_file = json_string_value(json_object_get(p, "decryption_key_file"));
    w->low = -1e-3f;
    w->high = 1e-3f;
    w->seed = 1234; /* SGLang's initialize_dummy_weights defaults */
    json_t *d = json_object_get(p, "dummy");
    if (d) {
        const char *k;
        json_t *v;
        json_object_foreach(d, k, v) {
            if (!strcmp(k, "low") || !strcmp(k, "high")) {
                if (!json_is_number(v) || !isfinite(json_number_value(v)))
                    return mp_err_field(err, "params.dummy", "bad_type",
                                        "dummy.%s must be a number", k);
                *(!strcmp(k, "low") ? &w->low : &w->high) = (float)json_number_value(v);
            } else if (!strcmp(k, "seed")) {
                if (!json_is_integer(v) || json_integer_value(v) < 0)
                    return mp_err_field(err, "params.dummy", "bad_type",
                                        "dummy.seed must be a non-negative integer");
                w->seed = (uint64_t)json_integer_value(v);
            } else {
                return mp_err_field(err, "params.dummy", "unknown_field", "unknown key dummy.%s",
                                    k);
            }
        }
        if (!(w->low <= w->high))
            return mp_err_field(err, "params.dummy", "param_conflict",
                                "dummy.low must be <= dummy.high");
    }
    json_t *kr = json_object_get(p, "keep_resident");
    w->keep_resident = kr ? json_is_true(kr) : true;
    w->direct_io = json_is_true(json_object_get(p, "direct_io"));
    json_t *hd = json_object_get(p, "host_direct");
    w->host_direct = hd ? json_is_true(hd) : true;
    json_t *dc = json_object_get(p, "device_convert");
    w->device_convert = dc ? json_is_true(dc) : -1;
    json_t *sb = json_object_get(p, "staging_bytes");
    w->staging_bytes = sb ? (uint64_t)json_integer_value(sb) : LOAD_DEFAULT_STAGING;
    json_t *rd = json_object_get(p, "readers");
    w->readers = rd ? (int)json_integer_value(rd) : 0;
    return parse_quantize(p, w, err);
}

/* The key file, confined like models (loader/formats/safetensors/safetensors.h). */
static int key_path(const mp_task_info *in, const char *given, char *out, mp_error *err) {
    return stc_key_resolve(given, in->model_path, in->env ? in->env->data_dir : NULL,
                           in->env ? in->env->model_roots : NULL, "params.decryption_key_file", out,
                           err);
}

static int wl_validate(const mp_task_info *in, mp_error *err) {
    wl_params w;
    if (parse_params(in->params, &w, err) != 0) return -1;
    static const char *const s3_only[] = {"s3_read", "addressing"};
    for (size_t i = 0; strncmp(in->model, "s3://", 5) != 0 && i < 2; i++)
        if (json_object_get(in->params, s3_only[i]))
            return mp_err_field(err, "params", "param_conflict", "%s applies to s3:// models only",
                                s3_only[i]);
    if (mref_is_remote(in->model) &&
        job_warm_remote_validate(in, json_string_value(json_object_get(in->params, "load_format")),
                                 err) != 0)
        return -1;
    if (w.key_file) {
        char p[PATH_MAX];
        if (key_path(in, w.key_file, p, err) != 0) return -1;
    }
    if (in->env && in->env->gpus) {
        /* Staging is pinned on a GPU: one request may not ask for more than
         * the server lets all loads pin together (--staging-cap). */
        uint64_t cap = gpu_set_staging_cap_get(in->env->gpus);
        if (cap && w.staging_bytes > cap)
            return mp_err_field(err, "params.staging_bytes", "staging_cap",
                                "staging_bytes %llu is over the server's staging cap of %llu bytes",
                                (unsigned long long)w.staging_bytes, (unsigned long long)cap);
        int n = gpu_set_count(in->env->gpus);
        if (w.tp_size > n && !w.ndevices)
            return mp_err_field(err, "params.tp_size", "no_such_device",
                                "tp_size %d needs %d devices, the server has %d", w.tp_size,
                                w.tp_size, n);
        for (int i = 0; i < w.ndevices; i++)
            if (w.devices[i] >= n)
                return mp_err_field(err, "params.devices", "no_such_device",
                                    "device %d does not exist (the server has %d)", w.devices[i],
                                    n);
    }
    return 0;
}

typedef struct wl_cb {
    mp_task *t;
} wl_cb;

static bool cb_cancelled(void *arg) {
    return task_cancelled(((wl_cb *)arg)->t);
}

static void cb_progress(void *arg, uint64_t done, uint64_t total) {
    task_progress(((wl_cb *)arg)->t, done, total, "bytes", NULL);
}

static json_t *build_result(const load_source *src, const load_plan *plan, const wl_params *w,
                            const load_stats *st, double plan_s, double open_s, double total_s,
                            gpu_set *gpus) {
    json_t *devs = json_array();
    for (int d = 0; d < gpu_set_count(gpus); d++) {
        if (!plan->arena_bytes[d]) continue;
        json_array_append_new(devs, json_pack("{s:i,s:I,s:I,s:I,s:b}", "index", d, "bytes",
                                              (json_int_t)plan->arena_bytes[d], "free_before",
                                              (json_int_t)st->free_before[d], "free_after",
                                              (json_int_t)st->free_after[d], "arena_reused",
                                              st->reused[d]));
    }
    double secs = st->pipeline_s > 0 ? st->pipeline_s : 1e-9;
    json_t *r = json_pack(
        "{s:s,s:I,s:I,s:I,s:i,s:s,s:b,s:b,s:{s:f,s:f,s:f,s:f,s:f,s:f,s:f},"
        "s:f,s:o,s:I,s:{s:i,s:i,s:I,s:b}}",
        "load_format", load_format_name(src->format), "bytes", (json_int_t)plan->total_bytes,
        "tensors", (json_int_t)plan->nitems, "bytes_read", (json_int_t)st->bytes_read, "tp_size",
        w->tp_size, "dtype", w->dtype == MP_DT_INVALID ? "keep" : mp_dtype_name(w->dtype),
        "encrypted", src->encrypted, "keep_resident", w->keep_resident, "timings", "plan_s", plan_s,
        "open_s", open_s, "alloc_s", st->alloc_s, "read_s", st->read_s, "copy_s", st->copy_s,
        "pipeline_s", st->pipeline_s, "total_s", total_s, "throughput_bytes_per_s",
        (double)plan->total_bytes / secs, "devices", devs, "peak_host_bytes",
        (json_int_t)st->peak_host_bytes, "staging", "readers", st->readers, "slots", st->slots,
        "slot_bytes", (json_int_t)st->slot_bytes, "direct_io", w->direct_io);
    if (r)
        json_object_set_new(r, "device_converted_bytes",
                            json_integer((json_int_t)st->device_converted));
    if (r && st->reads) /* a read_at source: its calls (ranged GETs) */
        json_object_set_new(r, "source_reads", json_integer((json_int_t)st->reads));
    if (r)
        json_object_set_new(
            r, "quantization",
            w->quantize ? json_pack("{s:s,s:s,s:I,s:I,s:I}", "method", qz_method_name(w->q.method),
                                    "where", "host", "tensors", (json_int_t)plan->nquants,
                                    "bytes_before", (json_int_t)plan->quant_bytes_in, "bytes_after",
                                    (json_int_t)plan->quant_bytes_out)
                        : json_null());
    return r;
}

static int make_resident(const mp_task_info *in, const load_plan *plan, gpu_arena **arenas,
                         json_t *result, char *id, mp_error *err) {
    res_spec sp;
    memset(&sp, 0, sizeof sp);
    sp.model = strdup(in->model);
    sp.revision = strdup(in->revision ? in->revision : "main");
    sp.tensors = calloc(plan->nitems ? plan->nitems : 1, sizeof *sp.tensors);
    sp.load = json_deep_copy(result);
    for (int d = 0; d < GPU_MAX_DEVICES; d++) {
        sp.arenas[d] = arenas[d];
        arenas[d] = NULL;
    }
    bool ok = sp.model && sp.revision && sp.tensors && sp.load;
    for (size_t i = 0; ok && i < plan->nitems; i++) {
        const load_item *it = &plan->items[i];
        res_tensor *rt = &sp.tensors[i];
        if (!(rt->name = strdup(it->name))) {
            ok = false;
            break;
        }
        sp.ntensors = i + 1;
        rt->dtype = it->out_dtype;
        rt->ggml_type = it->out_dtype == MP_DT_GGML ? it->ggml_type : -1;
        rt->ndim = it->ndim;
        memcpy(rt->shape, it->shape, sizeof rt->shape);
        rt->device = it->device;
        rt->rank = it->rank;
        rt->offset = it->offset;
        rt->bytes = it->bytes;
    }
    if (!ok) {
        /* res_add frees a spec it is handed even on failure; free it here. */
        for (size_t i = 0; i < sp.ntensors; i++)
            free(sp.tensors[i].name);
        free(sp.tensors);
        free(sp.model);
        free(sp.revision);
        json_decref(sp.load);
        for (int d = 0; d < GPU_MAX_DEVICES; d++)
            gpu_arena_free(sp.arenas[d]);
        return mp_err(err, "no_memory", "out of memory");
    }
    return res_add(in->env->residents, &sp, id, err);
}

static int wl_run(mp_task *t) {
    const mp_task_info *in = task_info(t);
    double t_start = time_mono();
    mp_error err = {0};
    wl_params w;
    if (parse_params(in->params, &w, &err) != 0) return task_fail(t, err.code, "%s", err.message);
    gpu_set *gpus = in->env ? in->env->gpus : NULL;
    bool remote = mref_is_remote(in->model) && !in->model_path;
    if (!gpus || (!in->model_path && !remote))
        return task_fail(t, "internal", "no devices or no model path");
    int ndev = gpu_set_count(gpus);
    for (int i = 0; i < w.tp_size; i++)
        if (w.devices[i] < 0 || w.devices[i] >= ndev)
            return task_fail(t, "device_unavailable", "device %d does not exist (%d devices)",
                             w.devices[i], ndev);
    if (w.keep_resident && !in->env->residents) return task_fail(t, "internal", "no resident set");

    unsigned char key[STC_KEY_BYTES];
    bool have_key = false;
    if (w.key_file) {
        char kp[PATH_MAX];
        if (key_path(in, w.key_file, kp, &err) != 0 || stc_key_load(kp, key, &err) != 0)
            return task_fail(t, err.code, "%s", err.message);
        have_key = true;
    }

    load_source src;
    double o0 = time_mono();
    json_t *remote_info = NULL;
    remote_s3_ranged *ranged = NULL; /* s3:// read by ranges: the loader's byte source */
    if ((remote ? job_warm_remote_open(t, w.tp_size, &w.format, &src, &remote_info, &ranged, &err)
                : load_source_open(in->model_path, w.format, w.tp_size, &src, &err)) != 0) {
        memset(key, 0, sizeof key);
        return task_fail(t, err.code, "%s", err.message);
    }
    if (w.format == LOAD_FMT_DUMMY) {
        src.format = LOAD_FMT_DUMMY;
        src.encrypted = false; /* shapes only: the header is readable without the key */
    }
    if (w.direct_io && !ranged) load_source_open_direct(&src);
    double open_s = time_mono() - o0;
    task_log(t, "info", "%s: %zu file(s), format %s%s", in->model, src.nfiles,
             load_format_name(src.format), src.encrypted ? " (encrypted)" : "");

    double p0 = time_mono();
    load_plan plan;
    load_plan_opts po = {.tp_size = w.tp_size,
                         .devices = w.devices,
                         .dtype = w.dtype,
                         .dummy = w.format == LOAD_FMT_DUMMY,
                         .quant = w.quantize ? &w.q : NULL,
                         .quant_ignore = w.ignore,
                         .quant_nignore = w.nignore};
    if (load_plan_build(&src, &po, &plan, &err) != 0) {
        json_decref(remote_info);
        remote_s3_ranged_free(ranged);
        load_source_free(&src);
        memset(key, 0, sizeof key);
        return task_fail(t, err.code, "%s", err.message);
    }
    double plan_s = time_mono() - p0;

    wl_cb cb = {t};
    load_run_opts ro = {.staging_bytes = w.staging_bytes,
                        /* over a network a reader mostly waits: one per connection */
                        .readers = w.readers || !ranged ? w.readers : REMOTE_DEFAULT_CONNECTIONS,
                        .read_at = ranged ? remote_s3_ranged_read : NULL,
                        .read_arg = ranged,
                        .direct_io = w.direct_io,
                        .host_direct = w.host_direct,
                        .device_convert = w.device_convert >= 0
                                              ? w.device_convert == 1
                                              : gpu_set_kind(gpus) == GPU_KIND_CUDA,
                        .key = have_key ? key : NULL,
                        .dummy_low = w.low,
                        .dummy_high = w.high,
                        .dummy_seed = w.seed,
                        .cb = &cb,
                        .cancelled = cb_cancelled,
                        .progress = cb_progress};
    gpu_arena *arenas[GPU_MAX_DEVICES];
    load_stats st;
    int rc = load_run(gpus, &src, &plan, &ro, arenas, &st, &err);
    memset(key, 0, sizeof key);
    if (ranged) {
        /* the counters now include the tensors' GETs */
        json_decref(remote_info);
        remote_info = remote_s3_ranged_info(ranged);
        remote_s3_ranged_free(ranged);
    }
    if (rc != 0) {
        json_decref(remote_info);
        load_plan_free(&plan);
        load_source_free(&src);
        return task_fail(t, err.code, "%s", err.message);
    }
    double total_s = time_mono() - t_start;
    /* A remote model fetched whole sat in host memory (memfds) for the whole
     * load: that counts as host memory the load held, beside the ring. */
    st.peak_host_bytes += (uint64_t)json_integer_value(json_object_get(remote_info, "host_bytes"));
    json_t *result = build_result(&src, &plan, &w, &st, plan_s, open_s, total_s, gpus);
    if (result && remote_info)
        json_object_set_new(result, "remote", remote_info);
    else
        json_decref(remote_info);
    rc = 0;
    if (!result) {
        rc = mp_err(&err, "no_memory", "out of memory");
        for (int d = 0; d < GPU_MAX_DEVICES; d++)
            gpu_arena_free(arenas[d]);
    } else if (w.keep_resident) {
        char id[32];
        rc = make_resident(in, &plan, arenas, result, id, &err);
        if (rc == 0) json_object_set_new(result, "resident_id", json_string(id));
    } else {
        for (int d = 0; d < GPU_MAX_DEVICES; d++)
            gpu_arena_free(arenas[d]);
        json_object_set_new(result, "resident_id", json_null());
    }
    task_log(t, "info", "%llu bytes in %zu tensors, %.3f s", (unsigned long long)plan.total_bytes,
             plan.nitems, total_s);
    load_plan_free(&plan);
    load_source_free(&src);
    if (rc != 0) {
        json_decref(result);
        return task_fail(t, err.code, "%s", err.message);
    }
    return task_succeed(t, result);
}

static const char *const FORMATS[] = {"auto",    "safetensors",   "pt",    "gguf",
                                      "npcache", "sharded_state", "dummy", NULL};
static const char *const DTYPES[] = {"auto", "keep", "bf16", "fp16", "fp32", NULL};
static const char *const S3_READS[] = {"ranged", "whole", NULL};
static const char *const ADDRESSING[] = {"path", "virtual", NULL};
static const char *const QMETHODS[] = {"fp8", "fp8-channel", "fp8-block", "nf4", "int8", NULL};

static const mp_param_spec wl_params_spec[] = {
    {"load_format", MP_P_STRING, FORMATS, 0, 0},
    {"devices", MP_P_INT_ARRAY, NULL, 0, GPU_MAX_DEVICES - 1},
    {"tp_size", MP_P_INT, NULL, 1, GPU_MAX_DEVICES},
    {"dtype", MP_P_STRING, DTYPES, 0, 0},
    {"decryption_key_file", MP_P_STRING, NULL, 0, 0},
    {"dummy", MP_P_OBJECT, NULL, 0, 0},
    {"keep_resident", MP_P_BOOL, NULL, 0, 0},
    {"staging_bytes", MP_P_INT, NULL, (int64_t)LOAD_MIN_STAGING, (int64_t)1 << 40},
    {"direct_io", MP_P_BOOL, NULL, 0, 0},
    {"host_direct", MP_P_BOOL, NULL, 0, 0},
    {"device_convert", MP_P_BOOL, NULL, 0, 0},
    {"readers", MP_P_INT, NULL, 1, 64},
    {"s3_read", MP_P_STRING, S3_READS, 0, 0},
    {"addressing", MP_P_STRING, ADDRESSING, 0, 0},
    {"quantize", MP_P_STRING, QMETHODS, 0, 0},
    {"quantize_block_size", MP_P_INT_ARRAY, NULL, 1, 65536},
    {"quantize_double_quant", MP_P_BOOL, NULL, 0, 0},
    {"quantize_ignore", MP_P_STRING_ARRAY, NULL, 0, 0},
    {NULL, 0, NULL, 0, 0},
};

const mp_job_type mp_job_warm_load = {
    .name = "warm_load",
    .params = wl_params_spec,
    .validate = wl_validate,
    .run = wl_run,
    .flags = MP_JOB_NEEDS_LOCAL | MP_JOB_REMOTE_SOURCE,
};
