/*
 * jobs.c - submission, cancellation and recovery of jobs, and publishing
 * their changes (store history + event hub). See jobs.h.
 */
#include "server/jobs.h"

#include <openssl/sha.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "loader/models/models.h"
#include "loader/jobs/jobs.h"
#include "server/events.h"
#include "server/params.h"
#include "server/publish.h"
#include "server/workers.h"
#include "store/store.h"
#include "util/fsutil.h"
#include "util/timeutil.h"

static int new_job_id(char *out, size_t len) {
    unsigned char rnd[10];
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) return -1;
    char hex[21];
    fs_hex(rnd, sizeof rnd, hex);
    snprintf(out, len, "j_%s", hex);
    return 0;
}

static int bad(int *status, int code) {
    *status = code;
    return -1;
}

static json_t *new_job_doc(const char *id, const char *type, const char *model,
                           const char *revision, json_t *params, const char *now) {
    return json_pack("{s:s,s:s,s:s,s:s,s:O,s:s,s:{s:i,s:i,s:s,s:f,s:s},s:n,s:n,s:s,s:n,s:n}", "id",
                     id, "type", type, "model", model, "revision", revision, "params", params,
                     "state", "queued", "progress", "done", 0, "total", 0, "unit", "bytes", "rate",
                     0.0, "message", "queued", "result", "error", "created_at", now, "started_at",
                     "finished_at");
}

/* An s3:// or redis:// model: checked, and resolved to its downloaded copy
 * (s3) for the types that work on local files. */
static int jobs_remote_model(const mp_job_type *jt, const char *model, size_t len,
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

int jobs_submit(mp_server *srv, json_t *body, const char *idem_key, json_t **job, bool *created,
                int *http_status, mp_error *err) {
    *job = NULL;
    *created = false;
    if (atomic_load(&srv->draining)) {
        mp_err(err, "draining", "the server is shutting down and accepts no new jobs");
        return bad(http_status, 503);
    }
    if (!json_is_object(body)) {
        mp_err(err, "bad_request", "the request body must be a JSON object");
        return bad(http_status, 400);
    }
    const char *key;
    json_t *v;
    json_object_foreach(body, key, v) {
        if (strcmp(key, "type") && strcmp(key, "model") && strcmp(key, "revision") &&
            strcmp(key, "params")) {
            mp_err_field(err, key, "unknown_field", "unknown field %s", key);
            return bad(http_status, 400);
        }
    }
    json_t *jtype = json_object_get(body, "type"), *jmodel = json_object_get(body, "model");
    json_t *jrev = json_object_get(body, "revision"), *jparams = json_object_get(body, "params");
    if (!json_is_string(jtype) || json_string_length(jtype) != strlen(json_string_value(jtype))) {
        mp_err_field(err, "type", jtype ? "bad_type" : "required", "type must be a string");
        return bad(http_status, 400);
    }
    const mp_job_type *jt = job_type_find(json_string_value(jtype));
    if (!jt) {
        mp_err_field(err, "type", "unknown_type", "unknown job type %s", json_string_value(jtype));
        return bad(http_status, 400);
    }
    if (!json_is_string(jmodel)) {
        mp_err_field(err, "model", jmodel ? "bad_type" : "required", "model must be a string");
        return bad(http_status, 400);
    }
    if (jrev && !json_is_string(jrev)) {
        mp_err_field(err, "revision", "bad_type", "revision must be a string");
        return bad(http_status, 400);
    }
    if (jparams && !json_is_object(jparams)) {
        mp_err_field(err, "params", "bad_type", "params must be an object");
        return bad(http_status, 400);
    }
    const char *model = json_string_value(jmodel);
    const char *revision = jrev ? json_string_value(jrev) : "main";
    if (jrev && (json_string_length(jrev) != strlen(revision) || !mref_is_revision(revision))) {
        mp_err_field(err, "revision", "bad_value", "revision is not a valid branch, tag or commit");
        return bad(http_status, 400);
    }
    json_t *params = jparams ? json_incref(jparams) : json_object();
    int rc = -1;
    char *model_path = NULL;
    bool is_hub = mref_is_repo_id(model) && json_string_length(jmodel) == strlen(model);
    if (is_hub) {
        if (!(jt->flags & MP_JOB_HUB_ONLY))
            model_path = mref_snapshot_dir(srv->cfg.hub_cache, model, revision, NULL);
        if ((jt->flags & MP_JOB_NEEDS_LOCAL) && !model_path) {
            mp_err_field(err, "model", "not_cached",
                         "%s@%s is not in the local cache; run a download job first", model,
                         revision);
            *http_status = 400;
            goto out;
        }
    } else if (mref_is_remote(model)) {
        if (jobs_remote_model(jt, model, json_string_length(jmodel), srv->cfg.data_dir,
                              &model_path, err) != 0) {
            *http_status = 400;
            goto out;
        }
    } else {
        if (jt->flags & MP_JOB_HUB_ONLY) {
            mp_err_field(err, "model", "bad_model", "%s jobs take a hub repo id (org/name)",
                         jt->name);
            *http_status = 400;
            goto out;
        }
        if (mref_confine(model, json_string_length(jmodel),
                         (const char *const *)srv->cfg.model_roots, &model_path, err) != 0) {
            *http_status = 400;
            goto out;
        }
    }
    if (params_check(jt->params, params, err) != 0) {
        *http_status = 400;
        goto out;
    }
    if (jt->validate) {
        mp_task_info info = {.type = jt->name,
                             .model = model,
                             .revision = revision,
                             .model_path = model_path,
                             .is_hub_model = is_hub,
                             .params = params,
                             .env = &srv->env};
        if (jt->validate(&info, err) != 0) {
            *http_status = 400;
            goto out;
        }
    }

    char id[32], now[40], hash_hex[65] = "";
    if (new_job_id(id, sizeof id) != 0) {
        mp_err(err, "internal", "no randomness for a job id");
        *http_status = 503;
        goto out;
    }
    time_rfc3339_now(now, sizeof now);
    json_t *doc = new_job_doc(id, jt->name, model, revision, params, now);
    if (!doc) {
        mp_err(err, "no_memory", "out of memory");
        *http_status = 503;
        goto out;
    }
    if (idem_key) {
        /* The same key with a different request is a client bug worth a 422. */
        json_t *canon = json_pack("{s:s,s:s,s:s,s:O}", "type", jt->name, "model", model, "revision",
                                  revision, "params", params);
        char *text = canon ? json_dumps(canon, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
        json_decref(canon);
        if (!text) {
            json_decref(doc);
            mp_err(err, "no_memory", "out of memory");
            *http_status = 503;
            goto out;
        }
        unsigned char md[SHA256_DIGEST_LENGTH];
        SHA256((unsigned char *)text, strlen(text), md);
        fs_hex(md, sizeof md, hash_hex);
        free(text);
    }
    char *existing = NULL;
    if (store_job_insert(srv->store, id, jt->name, model, revision, doc, idem_key, hash_hex,
                         &existing, err) != 0) {
        json_decref(doc);
        *http_status = strcmp(err->code, "idempotency_conflict") == 0 ? 422 : 503;
        goto out;
    }
    if (existing) {
        json_decref(doc);
        *job = store_job_get(srv->store, existing);
        free(existing);
        if (!*job) {
            mp_err(err, "internal", "idempotent job vanished");
            *http_status = 503;
            goto out;
        }
        rc = 0;
        goto out;
    }
    *created = true;
    /* The store recorded the first state event with the job itself. */
    publish_job_event(srv, id, "state", doc, false);
    workers_notify(srv->workers);
    *job = doc;
    rc = 0;
out:
    free(model_path);
    json_decref(params);
    return rc;
}

int jobs_cancel(mp_server *srv, const char *id, json_t **job) {
    char now[40];
    time_rfc3339_now(now, sizeof now);
    json_t *doc = NULL;
    if (store_job_cancel_if_queued(srv->store, id, now, &doc) == 1) {
        publish_job_event(srv, id, "state", doc, true);
        *job = doc;
        return 0;
    }
    doc = store_job_get(srv->store, id);
    if (!doc) return -1;
    const char *state = json_string_value(json_object_get(doc, "state"));
    if (state && strcmp(state, "running") == 0) {
        workers_cancel(srv->workers, id);
        *job = doc;
        return 0;
    }
    /* Claimed between the two reads is impossible to miss: a claim moves
     * queued→running, which the branch above handles; so it has ended. */
    *job = doc;
    return 1;
}

static bool resume_decider(void *arg, const char *type) {
    (void)arg;
    const mp_job_type *jt = job_type_find(type);
    return jt && (jt->flags & MP_JOB_RESUMABLE);
}

int jobs_recover(mp_server *srv) {
    char now[40];
    time_rfc3339_now(now, sizeof now);
    int requeued = 0, failed = 0;
    if (store_job_recover(srv->store, now, resume_decider, NULL, &requeued, &failed) != 0)
        return -1;
    if (requeued || failed)
        mp_log(&srv->log, "warn", NULL,
               "recovered jobs left running by a previous process: %d re-queued, %d failed "
               "(interrupted)",
               requeued, failed);
    return 0;
}
