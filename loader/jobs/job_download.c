/*
 * job_download.c - the download job: a thin adapter from util/task.h to
 * hub_download() (loader/hub_download.c). Resumable: the checkpoint pins the
 * commit the first run resolved, and the blobs' .incomplete files with their
 * ranges records carry the bytes already fetched.
 */
#include <stdio.h>
#include <string.h>

#include "loader/hub/hub.h"
#include "loader/jobs/jobs_internal.h"
#include "loader/models/models.h"
#include "util/jobtype.h"

static const char *const load_formats[] = {"auto", "safetensors", "pt", "gguf", "all", NULL};
static const char *const addressing_values[] = {"path", "virtual", NULL};

static const mp_param_spec download_params[] = {
    {"allow_patterns", MP_P_STRING_ARRAY, NULL, 0, 0},
    {"ignore_patterns", MP_P_STRING_ARRAY, NULL, 0, 0},
    {"load_format", MP_P_STRING, load_formats, 0, 0},
    {"endpoint", MP_P_STRING, NULL, 0, 0},
    {"connections", MP_P_INT, NULL, 1, 64},
    {"chunk_bytes", MP_P_INT, NULL, (int64_t)HUB_MIN_CHUNK_BYTES, (int64_t)1 << 32},
    {"max_retries", MP_P_INT, NULL, 0, 20},
    /* s3:// models only (job_download_s3.c) */
    {"addressing", MP_P_STRING, addressing_values, 0, 0},
    {"overwrite", MP_P_BOOL, NULL, 0, 0},
    {NULL, 0, NULL, 0, 0},
};

static int check_patterns(json_t *arr, const char *field, mp_error *err) {
    if (!arr) return 0;
    if (json_array_size(arr) > JOB_MAX_PATTERNS)
        return mp_err_field(err, field, "bad_param", "at most %d patterns", JOB_MAX_PATTERNS);
    size_t i;
    json_t *v;
    json_array_foreach(arr, i, v) {
        if (!json_is_string(v) || json_string_length(v) == 0 ||
            json_string_length(v) > HUB_MAX_PATH ||
            strlen(json_string_value(v)) != json_string_length(v))
            return mp_err_field(err, field, "bad_param",
                                "patterns are non-empty strings of at most %d bytes", HUB_MAX_PATH);
    }
    return 0;
}

static int download_validate(const mp_task_info *info, mp_error *err) {
    json_t *p = info->params;
    if (check_patterns(json_object_get(p, "allow_patterns"), "params.allow_patterns", err) ||
        check_patterns(json_object_get(p, "ignore_patterns"), "params.ignore_patterns", err))
        return -1;
    if (mref_is_remote(info->model)) return job_s3_download_validate(info, err);
    if (json_object_get(p, "addressing") || json_object_get(p, "overwrite"))
        return mp_err_field(err, "params", "param_conflict",
                            "addressing and overwrite apply to s3:// downloads only");
    if (!hub_repo_id_valid(info->model))
        return mp_err_field(err, "model", "bad_param", "download needs a hub repo id (org/name)");
    const char *rev = info->revision ? info->revision : "main";
    if (!hub_path_safe(rev, strlen(rev)) || strlen(rev) > 255)
        return mp_err_field(err, "revision", "bad_param", "invalid revision");
    if (check_patterns(json_object_get(p, "allow_patterns"), "params.allow_patterns", err) ||
        check_patterns(json_object_get(p, "ignore_patterns"), "params.ignore_patterns", err))
        return -1;
    json_t *ep = json_object_get(p, "endpoint");
    if (ep) {
        const char *s = json_string_value(ep);
        if (!s || (strncmp(s, "http://", 7) != 0 && strncmp(s, "https://", 8) != 0) ||
            strlen(s) > 1024 || strpbrk(s, " \r\n\t"))
            return mp_err_field(err, "params.endpoint", "bad_param",
                                "endpoint must be an http(s) URL");
    }
    return 0;
}

typedef struct dl_ctx {
    mp_task *t;
} dl_ctx;

static int cb_progress(void *arg, uint64_t done, uint64_t total, const char *msg) {
    dl_ctx *c = arg;
    task_progress(c->t, done, total, "bytes", msg);
    return task_cancelled(c->t);
}

static void cb_checkpoint(void *arg, const char *commit, uint64_t done) {
    dl_ctx *c = arg;
    json_t *st = json_pack("{s:s,s:I}", "commit", commit, "bytes_done", (json_int_t)done);
    if (!st) {
        task_log(c->t, "warn", "out of memory building a resume checkpoint");
        return;
    }
    int saved = task_checkpoint(c->t, st);
    /* Unsaved: task_checkpoint has logged and surfaced it. Resuming does not
     * depend on it alone: the partial blobs on disk are found again by name. */
    (void)saved;
}

static void cb_log(void *arg, const char *level, const char *msg) {
    dl_ctx *c = arg;
    task_log(c->t, level, "%s", msg);
}

static bool cb_cancelled(void *arg) {
    dl_ctx *c = arg;
    return task_cancelled(c->t);
}

static int download_run(mp_task *t) {
    const mp_task_info *info = task_info(t);
    if (mref_is_remote(info->model)) return job_s3_download_run(t);
    json_t *p = info->params;
    const mp_task_env *env = info->env;
    hub_download_opts o = {0};
    o.cache_dir = env->hub_cache;
    o.repo = info->model;
    o.revision = info->revision;
    o.max_retries = -1;
    const char *server_ep =
        env->hub_endpoint && *env->hub_endpoint ? env->hub_endpoint : HUB_DEFAULT_ENDPOINT;
    const char *job_ep = json_string_value(json_object_get(p, "endpoint"));
    o.endpoint = job_ep ? job_ep : server_ep;
    /* the server's HF token is for the server's hub only, never for a
     * per-job endpoint elsewhere */
    o.token = (!job_ep || hub_same_origin(job_ep, server_ep)) ? env->hf_token : NULL;
    const char *fmt = json_string_value(json_object_get(p, "load_format"));
    if (fmt && hub_parse_load_format(fmt, &o.load_format) != 0)
        return task_fail(t, "bad_param", "unknown load_format %s", fmt);
    job_patterns pat;
    job_patterns_get(p, &pat);
    o.allow = pat.allow;
    o.nallow = pat.nallow;
    o.ignore = pat.ignore;
    o.nignore = pat.nignore;
    json_t *v;
    if ((v = json_object_get(p, "connections"))) o.connections = (int)json_integer_value(v);
    if ((v = json_object_get(p, "chunk_bytes"))) o.chunk_bytes = (uint64_t)json_integer_value(v);
    if ((v = json_object_get(p, "max_retries"))) o.max_retries = (int)json_integer_value(v);
    const char *pin = json_string_value(json_object_get(info->checkpoint, "commit"));
    if (pin && hub_is_commit(pin)) {
        o.pin_commit = pin;
        task_log(t, "info", "resuming the download of commit %s", pin);
    }

    dl_ctx ctx = {t};
    hub_callbacks cb = {cb_progress, cb_checkpoint, cb_log, cb_cancelled, &ctx};
    json_t *result = NULL;
    mp_error err;
    mp_error_clear(&err);
    if (hub_download(&o, &cb, &result, &err) != 0) {
        if (task_cancelled(t))
            return task_fail(t, "cancelled", "download stopped: %s", err.message);
        return task_fail(t, err.code[0] ? err.code : "internal", "%s", err.message);
    }
    return task_succeed(t, result);
}

const mp_job_type mp_job_download = {
    .name = "download",
    .params = download_params,
    .validate = download_validate,
    .run = download_run,
    .flags = MP_JOB_RESUMABLE | MP_JOB_HUB_ONLY | MP_JOB_REMOTE_SOURCE,
};
