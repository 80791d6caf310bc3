/*
 * job_convert.c - the convert job: a PyTorch (.bin/.pt, single or sharded)
 * or GGUF checkpoint of a local model or cached snapshot -> a safetensors
 * folder (loader/convert.h does the work). The output lands under
 * <data_dir>/converted/ unless params.output names a folder inside a model
 * root or the data dir; never inside the hub cache. One job at a time per
 * output folder (output_busy), and an existing one is replaced only with
 * params.overwrite (else output_exists). The result's next_model is the
 * output folder: <data_dir>/converted is a model root, so it can be the
 * model of the next job.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "loader/convert/convert.h"
#include "loader/jobs/jobs_internal.h"
#include "loader/formats/safetensors/safetensors.h"
#include "util/fsutil.h"
#include "util/jobtype.h"

static const char *const dtype_values[] = {"keep", "bf16", "fp16", "fp32", NULL};

/* Resolves where the output goes; *out owned by the caller. make: create
 * <data_dir>/converted for the default folder (run time only). */
static int resolve_output(const mp_task_info *in, bool make, char **out, mp_error *err) {
    *out = NULL;
    const char *param = json_string_value(json_object_get(in->params, "output"));
    if (param) return job_output_param(in, param, out, err);
    return job_output_default(in, "converted", "", make, out, err);
}

static int convert_output(const mp_task_info *in, char **out, mp_error *err) {
    return resolve_output(in, false, out, err);
}

static int convert_validate(const mp_task_info *in, mp_error *err) {
    const char *file = json_string_value(json_object_get(in->params, "file"));
    if (file) {
        if (!st_plain_file_name(file))
            return mp_err_field(err, "params.file", "bad_value",
                                "params.file must be a file name inside the model folder");
        if (in->model_path) {
            char p[PATH_MAX];
            struct stat st;
            snprintf(p, sizeof p, "%s/%s", in->model_path, file);
            if (stat(p, &st) != 0 || !S_ISREG(st.st_mode))
                return mp_err_field(err, "params.file", "not_found", "%s is not in the model",
                                    file);
        }
    }
    json_t *ms = json_object_get(in->params, "max_shard_bytes");
    if (ms && json_integer_value(ms) < 1)
        return mp_err_field(err, "params.max_shard_bytes", "out_of_range",
                            "params.max_shard_bytes must be positive");
    return job_output_check(in, resolve_output, err);
}

/* ---- encryption_key_file (added by the warm_load issue; loader/formats/safetensors/safetensors.h)
 * Each output shard is re-written encrypted in place (aes-256-gcm-chunked-v1)
 * once the conversion has been verified; the sizes in the result are
 * refreshed. A failure here fails the job with the crypt error. */
static int encryption_key(const mp_task_info *in, unsigned char key[STC_KEY_BYTES], bool *have,
                          mp_error *err) {
    const char *kf = json_string_value(json_object_get(in->params, "encryption_key_file"));
    *have = false;
    if (!kf) return 0;
    char kp[PATH_MAX];
    if (stc_key_resolve(kf, in->model_path, in->env->data_dir, in->env->model_roots,
                        "params.encryption_key_file", kp, err) != 0 ||
        stc_key_load(kp, key, err) != 0)
        return -1;
    *have = true;
    return 0;
}

static int encrypt_output(json_t *result, const unsigned char key[STC_KEY_BYTES], mp_error *err) {
    const char *dir = json_string_value(json_object_get(result, "output_path"));
    size_t i;
    json_t *f;
    json_array_foreach(json_object_get(result, "files"), i, f) {
        const char *name = json_string_value(json_object_get(f, "name"));
        size_t nl = name ? strlen(name) : 0;
        if (!dir || nl < 12 || strcmp(name + nl - 12, ".safetensors") != 0) continue;
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s/%s", dir, name);
        if (stc_encrypt_file(p, p, key, 0, err) != 0) return -1;
        struct stat st;
        if (stat(p, &st) == 0) json_object_set_new(f, "size", json_integer((json_int_t)st.st_size));
    }
    json_object_set_new(result, "encryption", json_string(STC_SCHEME));
    return 0;
}
/* ---- end of encryption_key_file ---- */

static int convert_run(mp_task *t) {
    const mp_task_info *in = task_info(t);
    mp_error err = {0};
    if (!in->model_path) return task_fail(t, "not_cached", "the model is not available locally");
    mp_dtype dt;
    if (!conv_parse_dtype(json_string_value(json_object_get(in->params, "dtype")), &dt))
        return task_fail(t, "bad_request", "dtype must be keep, bf16, fp16 or fp32");
    unsigned char key[STC_KEY_BYTES];
    bool have_key = false; /* encryption_key_file */
    if (encryption_key(in, key, &have_key, &err) != 0)
        return task_fail(t, err.code, "%s", err.message);
    char *out = NULL;
    int lock = -1;
    if (job_output_claim(in, resolve_output, &out, &lock, &err) != 0) {
        memset(key, 0, sizeof key);
        return task_fail(t, err.code, "%s", err.message);
    }
    char src[PATH_MAX];
    const char *file = json_string_value(json_object_get(in->params, "file"));
    if (file)
        snprintf(src, sizeof src, "%s/%s", in->model_path, file);
    else
        snprintf(src, sizeof src, "%s", in->model_path);
    json_t *ms = json_object_get(in->params, "max_shard_bytes");
    conv_opts o = {
        .src = src,
        .out_dir = out,
        .dtype = dt,
        .max_shard_bytes = ms ? (uint64_t)json_integer_value(ms) : 0,
        .tag = in->id,
        .cb = t,
        .progress = job_cb_bytes,
        .cancelled = job_cb_cancelled,
        .log = job_cb_log,
    };
    json_t *result = NULL;
    int rc = conv_run(&o, &result, &err);
    job_output_unlock(lock);
    free(out);
    if (rc == 0 && have_key && encrypt_output(result, key, &err) != 0) { /* encryption_key_file */
        json_decref(result);
        rc = -1;
    }
    memset(key, 0, sizeof key);
    if (rc != 0) return task_fail(t, err.code, "%s", err.message);
    json_object_set(result, "next_model", json_object_get(result, "output_path"));
    return task_succeed(t, result);
}

static const mp_param_spec convert_params[] = {
    {"dtype", MP_P_STRING, dtype_values, 0, 0},
    {"max_shard_bytes", MP_P_INT, NULL, 1, INT64_MAX},
    {"output", MP_P_STRING, NULL, 0, 0},
    {"file", MP_P_STRING, NULL, 0, 0},
    {"encryption_key_file", MP_P_STRING, NULL, 0, 0}, /* see encrypt_output() */
    {"overwrite", MP_P_BOOL, NULL, 0, 0},
    {NULL, 0, NULL, 0, 0},
};

const mp_job_type mp_job_convert = {
    .name = "convert",
    .params = convert_params,
    .validate = convert_validate,
    .run = convert_run,
    .flags = MP_JOB_NEEDS_LOCAL | MP_JOB_RESUMABLE,
    .output = convert_output,
};
