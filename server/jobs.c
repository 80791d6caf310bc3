/*
 * jobs.c - submission, cancellation and recovery of jobs, and publishing
 * their changes (store history + event hub). See jobs.h.
 */
#include "server/jobs.h"

#include <openssl/sha.h>
#include <stdlib.h>
#include <string.h>

#include "loader/models/models.h"
#include "loader/jobs/jobs.h"
#include "server/events.h"
#include "server/submit.h"
#include "server/publish.h"
#include "server/workers.h"
#include "store/store.h"
#include "util/fsutil.h"
#include "util/timeutil.h"

static int bad(int *status, int code) {
    *status = code;
    return -1;
}

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
        char names[256];
        job_type_names(names, sizeof names);
        mp_err_field(err, "type", "unknown_type", "unknown job type %s: the types are %s",
                     json_string_value(jtype), names);
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
    if (submit_new_id(id, sizeof id) != 0) {
        mp_err(err, "internal", "no randomness for a job id");
        return bad(http_status, 503);
    }
    time_rfc3339_now(now, sizeof now);
    json_t *doc = submit_new_doc(id, jt->name, rq->model, rq->revision, rq->params, now);
    if (!doc) {
        mp_err(err, "no_memory", "out of memory");
        return bad(http_status, 503);
    }
    if (idem_key && request_hash(rq, hash_hex, err) != 0) {
        json_decref(doc);
        return bad(http_status, 503);
    }
    char *existing = NULL, *output = NULL;
    if (submit_output(srv, rq, &output, err) != 0) {
        json_decref(doc);
        return bad(http_status, 400);
    }
    int rc = store_job_insert(srv->store, id, jt->name, rq->model, rq->revision, doc, output,
                              idem_key, hash_hex, &existing, err);
    free(output);
    if (rc != 0) {
        json_decref(doc);
        int code = 503;
        if (strcmp(err->code, "idempotency_conflict") == 0) {
            code = 422;
            /* Name the header, so the problem's errors[] says what to change. */
            if (!err->field[0]) snprintf(err->field, sizeof err->field, "Idempotency-Key");
        }
        if (strcmp(err->code, "output_busy") == 0) {
            /* The output (given or default) is what is at fault: naming it
             * puts the code in the problem's errors[] for clients. */
            if (!err->field[0]) snprintf(err->field, sizeof err->field, "params.output");
            code = 409;
        }
        return bad(http_status, code);
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
    if (submit_resolve_model(srv, &rq, err) != 0 || submit_check_params(srv, &rq, err) != 0)
        *http_status = 400;
    else
        rc = create_job(srv, &rq, idem_key, job, created, http_status, err);
    submit_req_free(&rq);
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

/* A child job is never re-queued on its own: its parent (re-queued when
 * resumable) re-plans and runs what is still missing. */
static bool resume_decider(void *arg, const char *type, json_t *doc) {
    (void)arg;
    if (json_is_string(json_object_get(doc, "parent"))) return false;
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
