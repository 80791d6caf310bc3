/*
 * job_shard.c - the shard job: a tensor-parallel sharded state of a local
 * model (or cached hub snapshot), one set of safetensors files per rank, in
 * SGLang's sharded_state layout (loader/shard.h does the work; the split
 * rules are loader/tp_rules.h).
 *
 * Params:
 *   tp_size         required, 1..1024; must divide the attention heads (and
 *                   the rest tp_check asks) - a 400 at submit when the
 *                   model's config.json is there to tell.
 *   max_part_bytes  tensor bytes per part file (default 5 GiB, SGLang's).
 *   naming          "sglang" (default: fused qkv_proj / gate_up_proj,
 *                   stacked experts, padded vocab - what --load-format
 *                   sharded_state loads) or "hf" (checkpoint names, each
 *                   rank its slice; the vocab padded all the same).
 *   output          folder; default <data_dir>/sharded/<name>-tp<N>. Given,
 *                   it must resolve inside a model root or the data dir.
 *   overwrite       replace an existing output folder (default false; else
 *                   the job fails output_exists). One job at a time per
 *                   output folder (output_busy at submit, and a flock on
 *                   ".<name>.lock" beside it while it runs).
 * The result's next_model is the output folder (<data_dir>/sharded is a
 * model root).
 * Resumable: the temp folder is named after the job id, and after every
 * part (written and re-checked for all ranks) the job saves a checkpoint;
 * a run resumed after a drain or crash re-checks those files and writes
 * only the rest. The output folder appears only when complete.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/convert/convert.h"
#include "loader/jobs/jobs_internal.h"
#include "loader/shard/shard.h"
#include "loader/tp_rules/tp_rules.h"
#include "util/fsutil.h"
#include "util/jobtype.h"

static const char *const naming_values[] = {"sglang", "hf", NULL};

static int tp_param(const mp_task_info *in) {
    json_t *v = json_object_get(in->params, "tp_size");
    return json_is_integer(v) ? (int)json_integer_value(v) : 0;
}

/* Where the output goes (*out owned by the caller). make: create
 * <data_dir>/sharded for the default name (only at run time). */
static int resolve_output(const mp_task_info *in, bool make, char **out, mp_error *err) {
    *out = NULL;
    const char *param = json_string_value(json_object_get(in->params, "output"));
    if (param) return job_output_param(in, param, out, err);
    char suffix[24];
    snprintf(suffix, sizeof suffix, "-tp%d", tp_param(in));
    return job_output_default(in, "sharded", suffix, make, out, err);
}

static int shard_output(const mp_task_info *in, char **out, mp_error *err) {
    return resolve_output(in, false, out, err);
}

static int shard_validate(const mp_task_info *in, mp_error *err) {
    json_t *tp = json_object_get(in->params, "tp_size");
    if (!json_is_integer(tp))
        return mp_err_field(err, "params.tp_size", "missing_param", "params.tp_size is required");
    int n = (int)json_integer_value(tp);
    if (n < 1 || n > 1024)
        return mp_err_field(err, "params.tp_size", "out_of_range", "tp_size must be 1..1024");
    json_t *mp = json_object_get(in->params, "max_part_bytes");
    if (mp && (!json_is_integer(mp) || json_integer_value(mp) < 1))
        return mp_err_field(err, "params.max_part_bytes", "out_of_range",
                            "params.max_part_bytes must be a positive integer");
    if (in->model_path) {
        /* config.json tells whether tp divides the model; without one (or
         * for an unknown architecture) the run reports it. */
        tp_model_cfg cfg;
        mp_error e2 = {0};
        if (tp_config_load(in->model_path, &cfg, &e2) == 0 && cfg.family != TP_FAM_UNKNOWN &&
            tp_check(&cfg, n, &e2) != 0 && strcmp(e2.code, "bad_tp_size") == 0)
            return mp_err_field(err, "params.tp_size", e2.code, "%s", e2.message);
    }
    if (json_object_get(in->params, "output")) {
        char *out = NULL;
        if (resolve_output(in, false, &out, err) != 0) return -1;
        free(out);
    }
    return 0;
}

static void cb_checkpoint(void *cb, json_t *state) {
    int saved = task_checkpoint(cb, state);
    /* Unsaved: task_checkpoint has logged it, warned in the job's history and
     * counts it in the result. The shard goes on; a restart would redo the
     * parts written since the last saved checkpoint, which is safe. */
    (void)saved;
}

static int shard_job_run(mp_task *t) {
    const mp_task_info *in = task_info(t);
    mp_error err = {0};
    if (!in->model_path) return task_fail(t, "not_found", "%s is not available locally", in->model);
    char *out = NULL;
    int lock = -1;
    if (job_output_claim(in, resolve_output, &out, &lock, &err) != 0)
        return task_fail(t, err.code, "%s", err.message);
    const char *naming = json_string_value(json_object_get(in->params, "naming"));
    json_t *mp = json_object_get(in->params, "max_part_bytes");
    shard_opts o = {
        .model_dir = in->model_path,
        .output_dir = out,
        .tp = tp_param(in),
        .max_part_bytes = mp ? (uint64_t)json_integer_value(mp) : 0,
        .naming = naming && strcmp(naming, "hf") == 0 ? TP_NAMING_HF : TP_NAMING_SGLANG,
        .overwrite = json_is_true(json_object_get(in->params, "overwrite")),
        .source_model = in->model,
        .source_revision = in->is_hub_model ? in->revision : NULL,
        .tmp_tag = in->id,
        .resume = in->checkpoint,
        .checkpoint = cb_checkpoint,
        .cb = t,
        .progress = job_cb_bytes,
        .cancelled = job_cb_cancelled,
        .draining = job_cb_draining,
        .log = job_cb_log,
    };
    json_t *result = NULL;
    int rc = shard_run(&o, &result, &err);
    job_output_unlock(lock);
    free(out);
    if (rc != 0) {
        if (strcmp(err.code, "cancelled") == 0) return task_fail(t, "cancelled", "cancelled");
        return task_fail(t, err.code, "%s", err.message);
    }
    json_object_set(result, "next_model", json_object_get(result, "output_path"));
    return task_succeed(t, result);
}

static const mp_param_spec shard_params[] = {
    {"tp_size", MP_P_INT, NULL, 1, 1024},         {"max_part_bytes", MP_P_INT, NULL, 1, INT64_MAX},
    {"naming", MP_P_STRING, naming_values, 0, 0}, {"output", MP_P_STRING, NULL, 0, 0},
    {"overwrite", MP_P_BOOL, NULL, 0, 0},         {NULL, 0, NULL, 0, 0},
};

const mp_job_type mp_job_shard = {
    .name = "shard",
    .params = shard_params,
    .validate = shard_validate,
    .run = shard_job_run,
    .flags = MP_JOB_NEEDS_LOCAL | MP_JOB_RESUMABLE,
    .output = shard_output,
};
