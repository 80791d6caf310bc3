/*
 * job_warm_remote.c - warm_load of a redis://host:port/model_name model
 * (SGLang's KV layout): the ranks are staged in memory by
 * remote_redis_stage (loader/remote) and opened as a sharded_state
 * checkpoint, rank r for the device that serves rank r; the staging folder
 * and its descriptors go as soon as the loader has its own, so nothing of
 * the model stays on disk. An s3:// model without a downloaded copy is read
 * by ranges (params.s3_read "ranged", the default, for safetensors): the
 * headers are fetched and planned here, and the loader's readers GET each
 * tensor's bytes straight into the staging ring through
 * remote_s3_ranged_read, so host memory stays at the ring's size. Other
 * formats, encrypted files and s3_read "whole" fetch the chosen files whole
 * into memory (parallel ranged GETs, checked as a download checks them) and
 * load them from there. With a downloaded copy, the copy is loaded.
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
    if (r.scheme == MREF_REDIS && format && strcmp(format, "auto") != 0 &&
        strcmp(format, "sharded_state") != 0)
        return mp_err_field(err, "params.load_format", "param_conflict",
                            "a redis:// model holds per-rank tensors: load_format auto or "
                            "sharded_state");
    return 0;
}

#define WR_MAX_FILES 4096

/* Where the bucket is: the server's endpoint, addressing as params.addressing
 * says, else as the server's --s3-addressing, else path-style with an
 * endpoint and virtual-hosted on AWS. */
static remote_s3_where s3_where(const mp_task_info *in, const remote_s3_creds *creds) {
    const char *addr = json_string_value(json_object_get(in->params, "addressing"));
    return (remote_s3_where){
        .endpoint = in->env->s3_endpoint,
        .virtual_hosted = remote_s3_virtual(addr, in->env->s3_addressing, in->env->s3_endpoint),
        .creds = creds,
        .max_retries = -1};
}

/* Headers over the network, tensors later by ranges: 1 when the model is
 * not one to read by ranges (the caller fetches it whole). */
static int open_s3_ranged(mp_task *t, const mref_remote *r, hub_load_format hf,
                          const remote_s3_creds *creds, load_source *src, remote_s3_ranged **ranged,
                          mp_error *err) {
    const mp_task_info *in = task_info(t);
    remote_s3_ranged_opts o = {.src = r, .where = s3_where(in, creds), .load_format = hf};
    remote_callbacks cb = {NULL, job_cb_log, job_cb_cancelled, t, NULL};
    int rc = remote_s3_ranged_open(&o, &cb, ranged, err);
    if (rc != 0) return rc;
    memset(src, 0, sizeof *src);
    src->format = LOAD_FMT_SAFETENSORS;
    for (size_t i = 0; rc == 0 && i < remote_s3_ranged_nfiles(*ranged); i++)
        rc = load_source_add(src, remote_s3_ranged_take(*ranged, i), err);
    if (rc == 0) src->config = json_incref(remote_s3_ranged_config(*ranged));
    if (rc != 0) {
        load_source_free(src);
        remote_s3_ranged_free(*ranged);
        *ranged = NULL;
    }
    return rc;
}

static int open_s3(mp_task *t, const mref_remote *r, int tp, load_format *fmt, load_source *src,
                   json_t **info, remote_s3_ranged **ranged, mp_error *err) {
    const mp_task_info *in = task_info(t);
    remote_s3_creds creds;
    if (remote_s3_creds_load(in->env->s3_credentials_file, &creds, err) != 0) return -1;
    /* the files the requested format needs, as a download would pick them */
    hub_load_format hf = *fmt == LOAD_FMT_AUTO          ? HUB_FMT_AUTO
                         : *fmt == LOAD_FMT_SAFETENSORS ? HUB_FMT_SAFETENSORS
                         : *fmt == LOAD_FMT_PT          ? HUB_FMT_PT
                         : *fmt == LOAD_FMT_GGUF        ? HUB_FMT_GGUF
                                                        : HUB_FMT_ALL;
    const char *how = json_string_value(json_object_get(in->params, "s3_read"));
    if ((*fmt == LOAD_FMT_AUTO || *fmt == LOAD_FMT_SAFETENSORS) &&
        !(how && !strcmp(how, "whole"))) {
        int rc = open_s3_ranged(t, r, hf, &creds, src, ranged, err);
        if (rc <= 0) {
            remote_s3_creds_clear(&creds);
            if (rc == 0) {
                *fmt = LOAD_FMT_SAFETENSORS;
                *info = remote_s3_ranged_info(*ranged); /* completed after the load */
            }
            return rc;
        }
        task_log(t, "info", "%s: not plain safetensors, fetched whole", in->model);
    }
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s/remote/.tmp/%s-s3", in->env->data_dir, in->id);
    int *fds = calloc(WR_MAX_FILES, sizeof *fds);
    size_t nfds = 0;
    if (!fds) {
        remote_s3_creds_clear(&creds);
        return mp_err(err, "no_memory", "out of memory");
    }
    remote_s3_download_opts o = {
        .src = r,
        .where = s3_where(in, &creds),
        .data_dir = in->env->data_dir,
        .tmp_tag = in->id,
        .load_format = hf,
        .stage_dir = dir,
        .stage_fds = fds,
        .stage_max = WR_MAX_FILES,
        .nstage_fds = &nfds,
    };
    remote_callbacks cb = {job_cb_progress, job_cb_log, job_cb_cancelled, t, NULL};
    int rc = remote_s3_download(&o, &cb, info, err);
    remote_s3_creds_clear(&creds);
    if (rc == 0) {
        json_object_del(*info, "path"); /* the staging folder, gone below */
        /* the files sit in memfds until the load ends */
        json_int_t held = json_integer_value(json_object_get(*info, "bytes_downloaded"));
        json_object_set_new(*info, "host_bytes", json_integer(held));
        rc = load_source_open(dir, *fmt, tp, src, err);
        if (rc != 0) {
            json_decref(*info);
            *info = NULL;
        }
    }
    remote_unstage_dir(dir, fds, nfds);
    free(fds);
    return rc;
}

int job_warm_remote_open(mp_task *t, int tp, load_format *fmt, load_source *src, json_t **info,
                         remote_s3_ranged **ranged, mp_error *err) {
    const mp_task_info *in = task_info(t);
    *info = NULL;
    *ranged = NULL;
    mref_remote r;
    if (mref_remote_parse(in->model, strlen(in->model), false, "model", &r, err) != 0) return -1;
    if (r.scheme == MREF_S3) return open_s3(t, &r, tp, fmt, src, info, ranged, err);
    char *pw = NULL;
    size_t pwlen = 0;
    if (in->env->redis_password_file &&
        fs_read_all(in->env->redis_password_file, 4096, &pw, &pwlen, err) != 0)
        return mp_err_wrap(err, "bad_credentials", "--redis-password-file");
    if (pw) pw[strcspn(pw, "\r\n")] = 0;
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s/remote/.tmp/%s-redis", in->env->data_dir, in->id);
    int fds[GPU_MAX_DEVICES];
    remote_callbacks cb = {job_cb_progress, job_cb_log, job_cb_cancelled, t, NULL};
    int rc = remote_redis_stage(&r, pw, tp, dir, 0, &cb, fds, info, err);
    if (pw) {
        memset(pw, 0, pwlen);
        free(pw);
    }
    if (rc != 0) return -1;
    *fmt = LOAD_FMT_SHARDED_STATE;
    json_t *ranks = *info;
    json_int_t held = 0;
    size_t i;
    json_t *rk;
    json_array_foreach(ranks, i, rk) held += json_integer_value(json_object_get(rk, "bytes"));
    *info = json_pack("{s:s,s:o,s:I}", "url", in->model, "ranks", ranks, "host_bytes", held);
    if (!*info) {
        remote_redis_unstage(dir, fds, tp);
        return mp_err(err, "no_memory", "out of memory");
    }
    rc = load_source_open(dir, LOAD_FMT_SHARDED_STATE, tp, src, err);
    remote_redis_unstage(dir, fds, tp);
    if (rc != 0) {
        json_decref(*info);
        *info = NULL;
    }
    return rc;
}
