/*
 * job_publish.c - the publish job: push a model this node has (a hub
 * snapshot, a local folder under a model root, a converted output, an s3
 * download) to a remote store, in the layouts SGLang's RemoteModelLoader
 * reads (loader/remote/remote.h does the work).
 *
 * Params:
 *   url             required: s3://bucket/prefix or
 *                   redis://[[user]:password@]host[:port]/model_name
 *   tp_size         redis: ranks to write, each under rank_{r} (default 1)
 *   naming          redis: "sglang" (default; SGLang's parameter names and
 *                   layout, what its model's state_dict holds) or "hf"
 *                   (checkpoint names; tp_size 1 needs no known architecture)
 *   pipeline_bytes  redis: bytes of SETs in flight before replies are read
 *   endpoint        s3: http(s)://host[:port] (default --s3-endpoint /
 *                   AWS_ENDPOINT_URL, else AWS)
 *   addressing      s3: "path" (default with an endpoint) or "virtual"
 *   part_bytes      s3: multipart threshold and part size (>= 5 MiB)
 *   connections     s3: parallel part uploads
 *   max_retries     s3: retries of a request on 5xx / SlowDown / a cut
 *   overwrite       replace what is already at the url (default false)
 * Secrets: S3 credentials come from the server (--s3-credentials-file or
 * the AWS_* environment); a Redis password from the url or from
 * --redis-password-file. Neither is ever logged; a url's password is kept in
 * the job's params as submitted, so prefer the file.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/jobs/jobs_internal.h"
#include "loader/models/models.h"
#include "loader/remote/remote.h"
#include "util/fsutil.h"
#include "util/jobtype.h"

/* An integer param, or dflt when absent (the spec has checked its type). */
static json_int_t int_param(const json_t *p, const char *name, json_int_t dflt) {
    json_t *v = json_object_get(p, name);
    return v ? json_integer_value(v) : dflt;
}

static const char *const naming_values[] = {"sglang", "hf", NULL};
static const char *const addressing_values[] = {"path", "virtual", NULL};

static int publish_validate(const mp_task_info *in, mp_error *err) {
    json_t *u = json_object_get(in->params, "url");
    if (!json_is_string(u))
        return mp_err_field(err, "params.url", "missing_param",
                            "params.url (s3://bucket/prefix or redis://host:port/model) is "
                            "required");
    mref_remote r;
    if (mref_remote_parse(json_string_value(u), json_string_length(u), true, "params.url", &r,
                          err) != 0)
        return -1;
    static const char *const redis_only[] = {"tp_size", "naming", "pipeline_bytes", NULL};
    static const char *const s3_only[] = {"endpoint",    "addressing",  "part_bytes",
                                          "connections", "max_retries", NULL};
    const char *const *wrong = r.scheme == MREF_S3 ? redis_only : s3_only;
    for (int i = 0; wrong[i]; i++)
        if (json_object_get(in->params, wrong[i]))
            return mp_err_field(err, "params", "param_conflict", "params.%s does not apply to %s",
                                wrong[i], r.scheme == MREF_S3 ? "s3://" : "redis://");
    const char *ep = json_string_value(json_object_get(in->params, "endpoint"));
    if (ep && !remote_endpoint_valid(ep))
        return mp_err_field(err, "params.endpoint", "bad_param",
                            "endpoint must be http(s)://host[:port]");
    json_t *tp = json_object_get(in->params, "tp_size");
    if (tp && in->model_path && json_integer_value(tp) > 1) {
        tp_model_cfg cfg;
        mp_error e2 = {0};
        if (tp_config_load(in->model_path, &cfg, &e2) == 0 && cfg.family != TP_FAM_UNKNOWN &&
            tp_check(&cfg, (int)json_integer_value(tp), &e2) != 0 &&
            strcmp(e2.code, "bad_tp_size") == 0)
            return mp_err_field(err, "params.tp_size", e2.code, "%s", e2.message);
    }
    return 0;
}

/* The Redis password from --redis-password-file (first line; *out owned,
 * wiped and freed by the caller). */
static int read_password(const char *file, char **out, mp_error *err) {
    *out = NULL;
    if (!file) return 0;
    size_t len = 0;
    if (fs_read_all(file, 4096, out, &len, err) != 0)
        return mp_err_wrap(err, "bad_credentials", "--redis-password-file");
    (*out)[strcspn(*out, "\r\n")] = 0;
    return 0;
}

static void wipe_free(char *s) {
    if (!s) return;
    volatile char *p = s;
    while (*p)
        *p++ = 0;
    free(s);
}

static int publish_redis(mp_task *t, const mref_remote *dst, json_t **result, mp_error *err) {
    const mp_task_info *in = task_info(t);
    json_t *p = in->params;
    const char *naming = json_string_value(json_object_get(p, "naming"));
    json_t *tp = json_object_get(p, "tp_size"), *pb = json_object_get(p, "pipeline_bytes");
    char *pw = NULL;
    if (!dst->has_password && read_password(in->env->redis_password_file, &pw, err) != 0) return -1;
    remote_redis_publish_opts o = {
        .model_dir = in->model_path,
        .dst = dst,
        .password = pw,
        .tp = tp ? (int)json_integer_value(tp) : 1,
        .naming = naming && strcmp(naming, "hf") == 0 ? TP_NAMING_HF : TP_NAMING_SGLANG,
        .overwrite = json_is_true(json_object_get(p, "overwrite")),
        .tmp_tag = in->id,
        .pipeline_bytes = pb ? (uint64_t)json_integer_value(pb) : 0,
    };
    remote_callbacks cb = {job_cb_progress, job_cb_log, job_cb_cancelled, t, NULL};
    int rc = remote_redis_publish(&o, &cb, result, err);
    wipe_free(pw);
    return rc;
}

static int publish_s3(mp_task *t, const mref_remote *dst, json_t **result, mp_error *err) {
    const mp_task_info *in = task_info(t);
    json_t *p = in->params;
    remote_s3_creds creds;
    if (remote_s3_creds_load(in->env->s3_credentials_file, &creds, err) != 0) return -1;
    const char *ep = json_string_value(json_object_get(p, "endpoint"));
    if (!ep) ep = in->env->s3_endpoint;
    const char *addr = json_string_value(json_object_get(p, "addressing"));
    remote_s3_publish_opts o = {
        .model_dir = in->model_path,
        .source_model = in->model,
        .dst = dst,
        .where = {.endpoint = ep,
                  .virtual_hosted = remote_s3_virtual(addr, in->env->s3_addressing, ep),
                  .creds = &creds,
                  .max_retries = int_param(p, "max_retries", -1)},
        .connections = int_param(p, "connections", 0),
        .part_bytes = (uint64_t)int_param(p, "part_bytes", 0),
        .overwrite = json_is_true(json_object_get(p, "overwrite")),
    };
    remote_callbacks cb = {job_cb_progress, job_cb_log, job_cb_cancelled, t, NULL};
    int rc = remote_s3_publish(&o, &cb, result, err);
    remote_s3_creds_clear(&creds);
    return rc;
}

static int publish_run(mp_task *t) {
    const mp_task_info *in = task_info(t);
    if (!in->model_path) return task_fail(t, "not_found", "%s is not available locally", in->model);
    json_t *u = json_object_get(in->params, "url");
    mp_error err = {0};
    mref_remote dst;
    if (mref_remote_parse(json_string_value(u), json_string_length(u), true, "params.url", &dst,
                          &err) != 0)
        return task_fail(t, err.code, "%s", err.message);
    json_t *result = NULL;
    int rc = dst.scheme == MREF_REDIS ? publish_redis(t, &dst, &result, &err)
                                      : publish_s3(t, &dst, &result, &err);
    /* the parsed url held the password */
    memset(&dst, 0, sizeof dst);
    if (rc != 0) {
        if (task_cancelled(t)) return task_fail(t, "cancelled", "publish stopped: %s", err.message);
        return task_fail(t, err.code[0] ? err.code : "internal", "%s", err.message);
    }
    json_object_set_new(result, "model", json_string(in->model));
    return task_succeed(t, result);
}

static const mp_param_spec publish_params[] = {
    {"url", MP_P_STRING, NULL, 0, 0},
    {"tp_size", MP_P_INT, NULL, 1, 1024},
    {"naming", MP_P_STRING, naming_values, 0, 0},
    {"pipeline_bytes", MP_P_INT, NULL, 1 << 20, (int64_t)1 << 34},
    {"endpoint", MP_P_STRING, NULL, 0, 0},
    {"addressing", MP_P_STRING, addressing_values, 0, 0},
    {"part_bytes", MP_P_INT, NULL, (int64_t)REMOTE_MIN_PART_BYTES, (int64_t)5 << 30},
    {"connections", MP_P_INT, NULL, 1, 64},
    {"max_retries", MP_P_INT, NULL, 0, 20},
    {"overwrite", MP_P_BOOL, NULL, 0, 0},
    {NULL, 0, NULL, 0, 0},
};

const mp_job_type mp_job_publish = {
    .name = "publish",
    .params = publish_params,
    .validate = publish_validate,
    .run = publish_run,
    .flags = MP_JOB_NEEDS_LOCAL,
};
