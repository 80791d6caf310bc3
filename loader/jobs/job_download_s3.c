/*
 * job_download_s3.c - the download job when its model is s3://bucket/prefix:
 * the same params as a hub download where they mean the same thing
 * (load_format, allow/ignore patterns, endpoint, connections, chunk_bytes,
 * max_retries) plus addressing and overwrite, handed to
 * remote_s3_download() (loader/remote). Resumable: a drain keeps the
 * chunks that arrived and the re-queued job fetches only the rest (a crash
 * starts over). The copy lands in
 * <data_dir>/remote/s3/<bucket>/<prefix>/, which every other job then
 * uses when given the same s3:// model.
 */
#include <string.h>

#include "loader/jobs/jobs_internal.h"
#include "loader/models/models.h"
#include "loader/remote/remote.h"

int job_s3_download_validate(const mp_task_info *info, mp_error *err) {
    mref_remote r;
    if (mref_remote_parse(info->model, strlen(info->model), false, "model", &r, err) != 0)
        return -1;
    if (r.scheme != MREF_S3)
        return mp_err_field(err, "model", "bad_model",
                            "download takes a hub repo id or s3://bucket/prefix; a redis:// model "
                            "is read by warm_load");
    if (info->revision && strcmp(info->revision, "main") != 0)
        return mp_err_field(err, "revision", "param_conflict", "s3:// models have no revisions");
    const char *ep = json_string_value(json_object_get(info->params, "endpoint"));
    if (ep && !remote_endpoint_valid(ep))
        return mp_err_field(err, "params.endpoint", "param_conflict",
                            "endpoint must be http(s)://host[:port]");
    return 0;
}

/* An integer param, or dflt when absent (the spec has checked its type). */
static json_int_t int_param(const json_t *p, const char *name, json_int_t dflt) {
    json_t *v = json_object_get(p, name);
    return v ? json_integer_value(v) : dflt;
}

int job_s3_download_run(mp_task *t) {
    const mp_task_info *info = task_info(t);
    json_t *p = info->params;
    mp_error err = {0};
    mref_remote src;
    if (mref_remote_parse(info->model, strlen(info->model), false, "model", &src, &err) != 0)
        return task_fail(t, err.code, "%s", err.message);
    remote_s3_creds creds;
    if (remote_s3_creds_load(info->env->s3_credentials_file, &creds, &err) != 0)
        return task_fail(t, err.code, "%s", err.message);
    const char *ep = json_string_value(json_object_get(p, "endpoint"));
    if (!ep) ep = info->env->s3_endpoint;
    const char *addr = json_string_value(json_object_get(p, "addressing"));
    remote_s3_download_opts o = {
        .src = &src,
        .where = {.endpoint = ep,
                  .virtual_hosted = remote_s3_virtual(addr, info->env->s3_addressing, ep),
                  .creds = &creds,
                  .max_retries = int_param(p, "max_retries", -1)},
        .data_dir = info->env->data_dir,
        .tmp_tag = info->id,
        .connections = int_param(p, "connections", 0),
        .chunk_bytes = (uint64_t)int_param(p, "chunk_bytes", 0),
        .overwrite = json_is_true(json_object_get(p, "overwrite")),
    };
    const char *fmt = json_string_value(json_object_get(p, "load_format"));
    if (fmt && hub_parse_load_format(fmt, &o.load_format) != 0) {
        remote_s3_creds_clear(&creds);
        return task_fail(t, "bad_param", "unknown load_format %s", fmt);
    }
    job_patterns pat;
    job_patterns_get(p, &pat);
    o.allow = pat.allow;
    o.nallow = pat.nallow;
    o.ignore = pat.ignore;
    o.nignore = pat.nignore;
    remote_callbacks cb = {job_cb_progress, job_cb_log, job_cb_cancelled, t, job_cb_draining};
    json_t *result = NULL;
    int rc = remote_s3_download(&o, &cb, &result, &err);
    remote_s3_creds_clear(&creds);
    if (rc != 0) {
        if (task_cancelled(t))
            return task_fail(t, "cancelled", "download stopped: %s", err.message);
        return task_fail(t, err.code[0] ? err.code : "internal", "%s", err.message);
    }
    return task_succeed(t, result);
}
