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

/* A submission, as read from the request body. */
typedef struct submit_req {
    const mp_job_type *jt;
    const char *model; /* borrowed from the body */
    size_t model_len;  /* JSON length: differs from strlen with a NUL inside */
    const char *revision;
    json_t *params;   /* owned */
    char *model_path; /* owned; NULL: a hub model not taken from the cache */
    bool is_hub;
} submit_req;

/* The body's fields, checked: type, model, revision and params. */
static int read_body(json_t *body, submit_req *rq, int *http_status, mp_error *err) {
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
    rq->jt = job_type_find(json_string_value(jtype));
    if (!rq->jt) {
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
    rq->model = json_string_value(jmodel);
    rq->model_len = json_string_length(jmodel);
    rq->revision = jrev ? json_string_value(jrev) : "main";
    if (jrev &&
        (json_string_length(jrev) != strlen(rq->revision) || !mref_is_revision(rq->revision))) {
        mp_err_field(err, "revision", "bad_value", "revision is not a valid branch, tag or commit");
        return bad(http_status, 400);
    }
    rq->params = jparams ? json_incref(jparams) : json_object();
    return 0;
}

/* Where the model is: a hub repo's snapshot in the cache (required by
 * some job types, never used by hub-only ones), or a local folder under
 * one of the model roots. */
static int resolve_model(mp_server *srv, submit_req *rq, mp_error *err) {
    const mp_job_type *jt = rq->jt;
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
    if (mref_confine(rq->model, rq->model_len, (const char *const *)srv->cfg.model_roots,
                     &rq->model_path, err) != 0)
        return -1;
    return 0;
}

/* The params against the type's schema, then the type's own check. */
static int check_params(mp_server *srv, const submit_req *rq, mp_error *err) {
    const mp_job_type *jt = rq->jt;
    if (params_check(jt->params, rq->params, err) != 0) return -1;
    if (jt->validate) {
        mp_task_info info = {.type = jt->name,
                             .model = rq->model,
                             .revision = rq->revision,
                             .model_path = rq->model_path,
                             .is_hub_model = rq->is_hub,
                             .params = rq->params,
                             .env = &srv->env};
        if (jt->validate(&info, err) != 0) return -1;
    }
    return 0;
}

/* The request's fingerprint for its idempotency key: the same key with a
 * different request is a client bug worth a 422. */
static int request_hash(const submit_req *rq, char hash_hex[65], mp_error *err) {
    json_t *canon = json_pack("{s:s,s:s,s:s,s:O}", "type", rq->jt->name, "model", rq->model,
                              "revision", rq->revision, "params", rq->params);
    char *text = canon ? json_dumps(canon, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(canon);
    if (!text) return mp_err(err, "no_memory", "out of memory");
    unsigned char md[SHA256_DIGEST_LENGTH];
    SHA256((unsigned char *)text, strlen(text), md);
    fs_hex(md, sizeof md, hash_hex);
    free(text);
    return 0;
}

/* Inserts the queued job, or finds the one an earlier request with the
 * same idempotency key made; a new job is announced to the event hub and
 * the workers. */
static int create_job(mp_server *srv, const submit_req *rq, const char *idem_key, json_t **job,
                      bool *created, int *http_status, mp_error *err) {
    const mp_job_type *jt = rq->jt;
    char id[32], now[40], hash_hex[65] = "";
    if (new_job_id(id, sizeof id) != 0) {
        mp_err(err, "internal", "no randomness for a job id");
        return bad(http_status, 503);
    }
    time_rfc3339_now(now, sizeof now);
    json_t *doc = new_job_doc(id, jt->name, rq->model, rq->revision, rq->params, now);
    if (!doc) {
        mp_err(err, "no_memory", "out of memory");
        return bad(http_status, 503);
    }
    if (idem_key && request_hash(rq, hash_hex, err) != 0) {
        json_decref(doc);
        return bad(http_status, 503);
    }
    char *existing = NULL;
    if (store_job_insert(srv->store, id, jt->name, rq->model, rq->revision, doc, idem_key, hash_hex,
                         &existing, err) != 0) {
        json_decref(doc);
        return bad(http_status, strcmp(err->code, "idempotency_conflict") == 0 ? 422 : 503);
    }
    if (existing) {
        json_decref(doc);
        *job = store_job_get(srv->store, existing);
        free(existing);
        if (!*job) {
            mp_err(err, "internal", "idempotent job vanished");
            return bad(http_status, 503);
        }
        return 0;
    }
    *created = true;
    /* The store recorded the first state event with the job itself. */
    publish_job_event(srv, id, "state", doc, false);
    workers_notify(srv->workers);
    *job = doc;
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
    submit_req rq = {0};
    if (read_body(body, &rq, http_status, err) != 0) return -1;
    int rc = -1;
    if (resolve_model(srv, &rq, err) != 0 || check_params(srv, &rq, err) != 0)
        *http_status = 400;
    else
        rc = create_job(srv, &rq, idem_key, job, created, http_status, err);
    free(rq.model_path);
    json_decref(rq.params);
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
