/*
 * job_warm_remote.c - warm_load of a redis://host:port/model_name model
 * (SGLang's KV layout): the ranks are staged in memory by
 * remote_redis_stage (loader/remote) and opened as a sharded_state
 * checkpoint, rank r for the device that serves rank r; the staging folder
 * and its descriptors go as soon as the loader has its own, so nothing of
 * the model stays on disk. An s3:// model loads from its downloaded copy.
 */
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "loader/jobs/jobs_internal.h"
#include "loader/models/models.h"
#include "loader/remote/remote.h"
#include "util/fsutil.h"

int job_warm_remote_validate(const mp_task_info *in, const char *format, mp_error *err) {
    mref_remote r;
    if (mref_remote_parse(in->model, strlen(in->model), false, "model", &r, err) != 0) return -1;
    if (r.scheme == MREF_S3 && !in->model_path)
        return mp_err_field(err, "model", "not_cached",
                            "%s has no local copy; run a download job for it first", in->model);
    if (r.scheme == MREF_REDIS && format && strcmp(format, "auto") != 0 &&
        strcmp(format, "sharded_state") != 0)
        return mp_err_field(err, "params.load_format", "bad_value",
                            "a redis:// model holds per-rank tensors: load_format auto or "
                            "sharded_state");
    return 0;
}

static int cb_progress(void *arg, uint64_t done, uint64_t total, const char *msg) {
    task_progress(arg, done, total, "bytes", msg);
    return task_cancelled(arg);
}
static void cb_log(void *arg, const char *level, const char *msg) {
    task_log(arg, level, "%s", msg);
}
static bool cb_cancelled(void *arg) {
    return task_cancelled(arg);
}

int job_warm_remote_open(mp_task *t, int tp, load_format *fmt, load_source *src, json_t **info,
                         mp_error *err) {
    const mp_task_info *in = task_info(t);
    *info = NULL;
    mref_remote r;
    if (mref_remote_parse(in->model, strlen(in->model), false, "model", &r, err) != 0) return -1;
    if (r.scheme != MREF_REDIS)
        return mp_err(err, "not_cached", "%s has no local copy; run a download job first",
                      in->model);
    char *pw = NULL;
    size_t pwlen = 0;
    if (in->env->redis_password_file &&
        fs_read_all(in->env->redis_password_file, 4096, &pw, &pwlen, err) != 0)
        return mp_err_wrap(err, "bad_credentials", "--redis-password-file");
    if (pw) pw[strcspn(pw, "\r\n")] = 0;
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s/remote/.tmp/%s-redis", in->env->data_dir, in->id);
    int fds[GPU_MAX_DEVICES];
    remote_callbacks cb = {cb_progress, cb_log, cb_cancelled, t};
    int rc = remote_redis_stage(&r, pw, tp, dir, 0, &cb, fds, info, err);
    if (pw) {
        memset(pw, 0, pwlen);
        free(pw);
    }
    if (rc != 0) return -1;
    *fmt = LOAD_FMT_SHARDED_STATE;
    rc = load_source_open(dir, LOAD_FMT_SHARDED_STATE, tp, src, err);
    remote_redis_unstage(dir, fds, tp);
    if (rc != 0) {
        json_decref(*info);
        *info = NULL;
    }
    return rc;
}
