/*
 * job_quantize.c - the quantize job: a safetensors checkpoint (local model or
 * cached snapshot) -> a quantized checkpoint the engines load (FP8 for vLLM
 * and SGLang, bitsandbytes NF4 / LLM.int8 for transformers and SGLang);
 * loader/quantize does the work. Params: method (fp8, fp8-channel,
 * fp8-block, nf4, int8), block_size ([n, k], fp8-block, default [128, 128]),
 * double_quant (nf4, default true), ignore (module patterns added to the
 * defaults), ignore_defaults (false: only the given patterns), output,
 * overwrite, max_shard_bytes. The output lands in
 * <data_dir>/converted/<name>-<method> unless params.output says otherwise,
 * with the same confinement, locking and overwrite rules as convert.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loader/jobs/jobs_internal.h"
#include "loader/quantize/quantize.h"
#include "util/jobtype.h"

static const char *const method_values[] = {"fp8", "fp8-channel", "fp8-block", "nf4", "int8", NULL};

/* The params as kernel parameters; errors name the field. */
static int params_of(const json_t *p, qz_params *out, mp_error *err) {
    qz_method m;
    if (qz_method_parse(json_string_value(json_object_get(p, "method")), &m) != 0)
        return mp_err_field(err, "params.method", "bad_value",
                            "params.method must be fp8, fp8-channel, fp8-block, nf4 or int8");
    qz_params_default(out, m);
    json_t *bs = json_object_get(p, "block_size");
    if (bs) {
        if (m != QZ_FP8_BLOCK)
            return mp_err_field(err, "params.block_size", "param_conflict",
                                "params.block_size applies to method fp8-block only");
        if (json_array_size(bs) != 2)
            return mp_err_field(err, "params.block_size", "bad_value",
                                "params.block_size must be [n, k], two integers");
        out->block_n = (uint32_t)json_integer_value(json_array_get(bs, 0));
        out->block_k = (uint32_t)json_integer_value(json_array_get(bs, 1));
    }
    json_t *dq = json_object_get(p, "double_quant");
    if (dq) {
        if (m != QZ_NF4)
            return mp_err_field(err, "params.double_quant", "param_conflict",
                                "params.double_quant applies to method nf4 only");
        out->double_quant = json_is_true(dq);
    }
    if (qz_params_check(out, err) != 0) {
        snprintf(err->field, sizeof err->field, "params.%s", err->field[0] ? err->field : "method");
        return -1;
    }
    return 0;
}

static int resolve_output(const mp_task_info *in, bool make, char **out, mp_error *err) {
    *out = NULL;
    const char *param = json_string_value(json_object_get(in->params, "output"));
    if (param) return job_output_param(in, param, out, err);
    char suffix[32];
    snprintf(suffix, sizeof suffix, "-%s",
             json_string_value(json_object_get(in->params, "method")));
    return job_output_default(in, "converted", suffix, make, out, err);
}

static int quantize_output(const mp_task_info *in, char **out, mp_error *err) {
    return resolve_output(in, false, out, err);
}

static int quantize_validate(const mp_task_info *in, mp_error *err) {
    qz_params p;
    if (params_of(in->params, &p, err) != 0) return -1;
    if (json_array_size(json_object_get(in->params, "ignore")) > QZ_MAX_IGNORE)
        return mp_err_field(err, "params.ignore", "bad_value", "at most %d ignore patterns",
                            QZ_MAX_IGNORE);
    return job_output_check(in, resolve_output, err);
}

static int quantize_run(mp_task *t) {
    const mp_task_info *in = task_info(t);
    mp_error err = {0};
    if (!in->model_path) return task_fail(t, "not_cached", "the model is not available locally");
    qz_opts o = {.src = in->model_path,
                 .tag = in->id,
                 .cb = t,
                 .progress = job_cb_bytes,
                 .cancelled = job_cb_cancelled,
                 .log = job_cb_log};
    if (params_of(in->params, &o.params, &err) != 0)
        return task_fail(t, "bad_request", "%s", err.message);
    /* One tensor at a time, on every core; the nested NF4 offset as torch
     * computes it by default on this machine (see qz_mean_f32_threads). */
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    o.params.threads = cpus > 0 ? (int)cpus : 1;
    o.params.torch_threads = qz_torch_default_threads();
    const char *pats[QZ_MAX_IGNORE];
    size_t i;
    json_t *v;
    json_array_foreach(json_object_get(in->params, "ignore"), i, v) {
        if (o.nignore < QZ_MAX_IGNORE && json_is_string(v))
            pats[o.nignore++] = json_string_value(v);
    }
    o.ignore = pats;
    o.no_default_ignore = json_is_false(json_object_get(in->params, "ignore_defaults"));
    json_t *ms = json_object_get(in->params, "max_shard_bytes");
    o.max_shard_bytes = ms ? (uint64_t)json_integer_value(ms) : 0;
    char *out = NULL;
    int lock = -1;
    if (job_output_claim(in, resolve_output, &out, &lock, &err) != 0)
        return task_fail(t, err.code, "%s", err.message);
    o.out_dir = out;
    json_t *result = NULL;
    int rc = qz_run(&o, &result, &err);
    job_output_unlock(lock);
    free(out);
    if (rc != 0) return task_fail(t, err.code, "%s", err.message);
    json_object_set(result, "next_model", json_object_get(result, "output_path"));
    return task_succeed(t, result);
}

static const mp_param_spec quantize_params[] = {
    {"method", MP_P_STRING, method_values, 0, 0},
    {"block_size", MP_P_INT_ARRAY, NULL, 1, 65536},
    {"double_quant", MP_P_BOOL, NULL, 0, 0},
    {"ignore", MP_P_STRING_ARRAY, NULL, 0, 0},
    {"ignore_defaults", MP_P_BOOL, NULL, 0, 0},
    {"max_shard_bytes", MP_P_INT, NULL, 1, INT64_MAX},
    {"output", MP_P_STRING, NULL, 0, 0},
    {"overwrite", MP_P_BOOL, NULL, 0, 0},
    {NULL, 0, NULL, 0, 0},
};

const mp_job_type mp_job_quantize = {
    .name = "quantize",
    .params = quantize_params,
    .validate = quantize_validate,
    .run = quantize_run,
    .flags = MP_JOB_NEEDS_LOCAL,
    .output = quantize_output,
};
