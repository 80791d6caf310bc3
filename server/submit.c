/*
 * submit.c - model resolution, params checking, output and document of a new
 * job, shared by client submissions and child jobs. See submit.h.
 */
#include "server/submit.h"

#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "loader/models/models.h"
#include "server/params.h"
#include "util/fsutil.h"

int submit_new_id(char *out, size_t len) {
    unsigned char rnd[10];
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) return -1;
    char hex[21];
    fs_hex(rnd, sizeof rnd, hex);
    snprintf(out, len, "j_%s", hex);
    return 0;
}

json_t *submit_new_doc(const char *id, const char *type, const char *model, const char *revision,
                       json_t *params, const char *now) {
    return json_pack("{s:s,s:s,s:s,s:s,s:O,s:s,s:{s:i,s:i,s:s,s:f,s:s},s:n,s:n,s:s,s:n,s:n,s:n}",
                     "id", id, "type", type, "model", model, "revision", revision, "params", params,
                     "state", "queued", "progress", "done", 0, "total", 0, "unit", "bytes", "rate",
                     0.0, "message", "queued", "result", "error", "created_at", now, "started_at",
                     "finished_at", "parent");
}

/* An s3:// or redis:// model: checked, and resolved to its downloaded copy
 * (s3) for the types that work on local files. */
static int resolve_remote(const mp_job_type *jt, const char *model, size_t len,
                          const char *data_dir, char **model_path, mp_error *err) {
    mref_remote r;
    if (mref_remote_resolve(model, len, data_dir, &r, model_path, err) != 0) return -1;
    if (jt->flags & MP_JOB_REMOTE_SOURCE) return 0;
    if (r.scheme == MREF_REDIS || (jt->flags & MP_JOB_HUB_ONLY))
        return mp_err_field(err, "model", "bad_model", "%s jobs do not take a %s model", jt->name,
                            r.scheme == MREF_REDIS ? "redis://" : "s3://");
    if ((jt->flags & MP_JOB_NEEDS_LOCAL) && !*model_path)
        return mp_err_field(err, "model", "not_cached",
                            "%s has no local copy; run a download job for it first", model);
    return 0;
}

int submit_resolve_model(mp_server *srv, submit_req *rq, mp_error *err) {
    const mp_job_type *jt = rq->jt;
    if (mref_is_remote(rq->model))
        return resolve_remote(jt, rq->model, rq->model_len, srv->cfg.data_dir, &rq->model_path,
                              err);
    rq->is_hub = mref_is_repo_id(rq->model) && rq->model_len == strlen(rq->model);
    if (rq->is_hub) {
        if (!(jt->flags & MP_JOB_HUB_ONLY))
            rq->model_path = mref_snapshot_dir(srv->cfg.hub_cache, rq->model, rq->revision, NULL);
        if ((jt->flags & MP_JOB_NEEDS_LOCAL) && !rq->model_path)
            return mp_err_field(err, "model", "not_cached",
                                "%s@%s is not in the local cache; run a download job first",
                                rq->model, rq->revision);
        return 0;
    }
    if (jt->flags & MP_JOB_HUB_ONLY)
        return mp_err_field(err, "model", "bad_model", "%s jobs take a hub repo id (org/name)",
                            jt->name);
    return mref_confine(rq->model, rq->model_len, srv->cfg.roots, &rq->model_path, err);
}

mp_task_info submit_info(mp_server *srv, const submit_req *rq) {
    return (mp_task_info){.type = rq->jt->name,
                          .model = rq->model,
                          .revision = rq->revision,
                          .model_path = rq->model_path,
                          .is_hub_model = rq->is_hub,
                          .params = rq->params,
                          .env = &srv->env};
}

int submit_check_params(mp_server *srv, const submit_req *rq, mp_error *err) {
    const mp_job_type *jt = rq->jt;
    if (params_check(jt->params, rq->params, err) != 0) return -1;
    /* Every file the job (and its validator) may open, not only the folder. */
    if (rq->model_path &&
        mref_confine_model_files(rq->model_path, rq->model, rq->is_hub, srv->cfg.hub_cache,
                                 (const char *const *)srv->cfg.roots, err) != 0) {
        if (!err->field[0]) snprintf(err->field, sizeof err->field, "model");
        return -1;
    }
    if (jt->validate) {
        mp_task_info info = submit_info(srv, rq);
        if (jt->validate(&info, err) != 0) return -1;
    }
    return 0;
}

int submit_output(mp_server *srv, const submit_req *rq, char **out, mp_error *err) {
    *out = NULL;
    if (!rq->jt->output) return 0;
    mp_task_info info = submit_info(srv, rq);
    return rq->jt->output(&info, out, err);
}

void submit_req_free(submit_req *rq) {
    free(rq->model_path);
    json_decref(rq->params);
    rq->model_path = NULL;
    rq->params = NULL;
}
