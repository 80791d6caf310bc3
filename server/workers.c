/*
 * workers.c - the worker pool and the mp_task implementation that run
 * functions report through. Progress is kept in memory and flushed to the
 * store and the event hub at a bounded rate, so a run function may call
 * task_progress() per chunk without cost.
 */
#include "server/workers.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/models/models.h"
#include "loader/jobs/jobs.h"
#include "server/publish.h"
#include "server/metrics.h"
#include "server/submit.h"
#include "store/store.h"
#include "util/timeutil.h"

#define PROGRESS_PUBLISH_S 0.2
#define PROGRESS_PERSIST_S 1.0
#define MAX_PENDING_CANCELS 64

struct mp_task {
    mp_server *srv;
    const mp_job_type *type;
    mp_task_info info;
    json_t *doc;
    atomic_bool cancel;
    /* A child job (task_run_child) runs on its parent's thread: it sees the
     * parent's cancel, and the pool finds it through the parent's `child`
     * (guarded by the pool's mu) to cancel it on its own. */
    mp_task *parent;
    mp_task *child;
    /* progress */
    uint64_t done, total;
    char unit[16];
    char message[256];
    double t_start, last_publish, last_persist, rate_t, rate;
    uint64_t rate_done;
    int checkpoint_failures; /* surfaced in the result: see task_checkpoint */
    /* outcome */
    int outcome; /* 0 none, 1 succeeded, -1 failed */
    json_t *result;
    char err_code[48];
    char err_msg[1024];
};

struct worker_pool {
    mp_server *srv;
    pthread_t *threads;
    int n;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stopping;
    int busy;
    uint64_t notify_seq;
    mp_task **running; /* one slot per worker */
    char pending_cancel[MAX_PENDING_CANCELS][40];
    int npending;
};

/* ---- mp_task ---------------------------------------------------------------- */

const mp_task_info *task_info(mp_task *t) {
    return &t->info;
}

/* A cancel asked of this job or of any job it is a step of. */
static bool cancel_requested(mp_task *t) {
    for (; t; t = t->parent)
        if (atomic_load(&t->cancel)) return true;
    return false;
}

bool task_cancelled(mp_task *t) {
    return cancel_requested(t) || atomic_load(&t->srv->draining);
}

bool task_draining(mp_task *t) {
    return atomic_load(&t->srv->draining);
}

static json_t *progress_json(mp_task *t) {
    return json_pack("{s:I,s:I,s:s,s:f,s:s}", "done", (json_int_t)t->done, "total",
                     (json_int_t)t->total, "unit", t->unit, "rate", t->rate, "message", t->message);
}

/* A progress event is the job's progress object plus the job id, which the
 * all-jobs stream (/v1/events) needs to tell jobs apart. The job's own
 * "progress" never carries it. */
static json_t *progress_event(json_t *progress, const char *id) {
    json_t *ev = progress ? json_copy(progress) : NULL;
    if (ev) json_object_set_new(ev, "id", json_string(id));
    return ev;
}

void task_progress(mp_task *t, uint64_t done, uint64_t total, const char *unit,
                   const char *message) {
    double now = time_mono();
    t->done = done;
    t->total = total;
    if (unit) snprintf(t->unit, sizeof t->unit, "%s", unit);
    if (message) snprintf(t->message, sizeof t->message, "%s", message);
    /* Rate over windows of at least half a second, smoothed, so a dashboard
     * shows a steady number rather than per-chunk noise. */
    if (now - t->rate_t >= 0.5) {
        double inst = done >= t->rate_done ? (double)(done - t->rate_done) / (now - t->rate_t) : 0;
        t->rate = t->rate > 0 ? 0.5 * t->rate + 0.5 * inst : inst;
        t->rate_t = now;
        t->rate_done = done;
    }
    bool persist = now - t->last_persist >= PROGRESS_PERSIST_S;
    if (!persist && now - t->last_publish < PROGRESS_PUBLISH_S) return;
    t->last_publish = now;
    json_t *p = progress_json(t);
    json_t *ev = progress_event(p, t->info.id);
    if (!p || !ev) {
        json_decref(p);
        json_decref(ev);
        return;
    }
    json_object_set(t->doc, "progress", p);
    if (persist) {
        t->last_persist = now;
        mp_error err = {0};
        /* Progress is advisory: the live event still goes out, and the next
         * persist (or the final state) overwrites it. */
        if (store_job_update(t->srv->store, t->info.id, t->doc, "progress", ev, &err) != 0)
            mp_log(&t->srv->log, "warn", t->info.id, "cannot persist progress: %s", err.message);
    }
    publish_job_event(t->srv, t->info.id, "progress", ev, false);
    json_decref(ev);
    json_decref(p);
}

void task_log(mp_task *t, const char *level, const char *fmt, ...) {
    char msg[1024], now[40];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    time_rfc3339_now(now, sizeof now);
    mp_log(&t->srv->log, level, t->info.id, "%s", msg);
    json_t *ev =
        json_pack("{s:s,s:s,s:s,s:s}", "id", t->info.id, "level", level, "message", msg, "at", now);
    if (ev) publish_job_event(t->srv, t->info.id, "log", ev, true);
    json_decref(ev);
}

int task_checkpoint(mp_task *t, json_t *state) {
    int rc = store_job_set_checkpoint(t->srv->store, t->info.id, state);
    json_decref(state);
    if (rc != 0) {
        /* Not fatal for the run, but a restart would redo the work since the
         * last good checkpoint: say so in the job's history and the log. */
        t->checkpoint_failures++;
        task_log(t, "warn",
                 "could not save a resume checkpoint (%d so far); a restart would "
                 "repeat work",
                 t->checkpoint_failures);
        return -1;
    }
    return 0;
}

json_t *task_hashes_get(mp_task *t) {
    json_t *h = store_hashes_get(t->srv->store, t->info.model, t->info.revision);
    if (!h) mp_log(&t->srv->log, "error", t->info.id, "cannot read the recorded hashes");
    return h;
}

int task_hash_put(mp_task *t, const char *name, int64_t size, const char *sha256) {
    if (store_hash_put(t->srv->store, t->info.model, t->info.revision, name, size, sha256) != 0) {
        mp_log(&t->srv->log, "error", t->info.id, "cannot record the hash of %s", name);
        return -1;
    }
    return 0;
}

int task_inspection_put(mp_task *t, json_t *result) {
    if (store_inspection_put(t->srv->store, t->info.model, t->info.revision, t->info.id, result) !=
        0) {
        mp_log(&t->srv->log, "error", t->info.id, "cannot keep the inspection");
        return -1;
    }
    return 0;
}

int task_succeed(mp_task *t, json_t *result) {
    json_decref(t->result);
    t->result = result ? result : json_object();
    t->outcome = 1;
    return 0;
}

void task_set_result(mp_task *t, json_t *result) {
    json_decref(t->result);
    t->result = result;
}

int task_fail(mp_task *t, const char *code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->err_msg, sizeof t->err_msg, fmt, ap);
    va_end(ap);
    snprintf(t->err_code, sizeof t->err_code, "%s", code ? code : "failed");
    t->outcome = -1;
    return -1;
}

void task_steps(mp_task *t, json_t *steps) {
    json_object_set(t->doc, "steps", steps);
    json_t *ev = json_pack("{s:s,s:O}", "id", t->info.id, "steps", steps);
    if (!ev) return;
    mp_error err = {0};
    /* Persisted with the document, so GET /v1/jobs/{id} and a replayed
     * stream agree with the live one. */
    if (store_job_update(t->srv->store, t->info.id, t->doc, "steps", ev, &err) != 0)
        mp_log(&t->srv->log, "warn", t->info.id, "cannot persist the steps: %s", err.message);
    publish_job_event(t->srv, t->info.id, "steps", ev, false);
    json_decref(ev);
}

static void finish(mp_task *t, const char *now);

/* Makes c the running child of t (or none), where workers_cancel looks. */
static void link_child(mp_task *t, mp_task *c) {
    worker_pool *p = t->srv->workers;
    pthread_mutex_lock(&p->mu);
    t->child = c;
    pthread_mutex_unlock(&p->mu);
}

/* Runs the child's type on this thread and finishes it like the pool does a
 * top-level job. Takes doc. Returns 0 with *result, or -1 with err set to
 * the child's error. */
static int run_child_task(mp_task *t, const submit_req *rq, json_t *doc, json_t **result,
                          mp_error *err) {
    mp_task *c = calloc(1, sizeof *c);
    if (!c) {
        json_decref(doc);
        return mp_err(err, "no_memory", "out of memory");
    }
    c->srv = t->srv;
    c->type = rq->jt;
    c->doc = doc;
    c->parent = t;
    c->info.id = json_string_value(json_object_get(doc, "id"));
    c->info.type = rq->jt->name;
    c->info.model = json_string_value(json_object_get(doc, "model"));
    c->info.revision = json_string_value(json_object_get(doc, "revision"));
    c->info.params = json_object_get(doc, "params");
    c->info.model_path = rq->model_path;
    c->info.is_hub_model = rq->is_hub;
    c->info.env = &t->srv->env;
    snprintf(c->unit, sizeof c->unit, "bytes");
    c->t_start = c->rate_t = c->last_persist = time_mono();
    link_child(t, c);
    mp_log(&t->srv->log, "info", c->info.id, "job %s started on %s (a step of %s)", rq->jt->name,
           c->info.model, t->info.id);
    task_progress(c, 0, 0, NULL, "started");
    rq->jt->run(c);
    char now[40];
    time_rfc3339_now(now, sizeof now);
    finish(c, now);
    link_child(t, NULL);
    int rc = 0;
    if (c->outcome == 1) {
        *result = json_incref(json_object_get(c->doc, "result"));
    } else {
        json_t *e = json_object_get(c->doc, "error");
        const char *code = json_string_value(json_object_get(e, "code"));
        const char *msg = json_string_value(json_object_get(e, "message"));
        rc = mp_err(err, code ? code : c->err_code, "%s", msg ? msg : c->err_msg);
    }
    json_decref(c->result);
    json_decref(c->doc);
    free(c);
    return rc;
}

int task_run_child(mp_task *t, const mp_child_req *cr, json_t **result, mp_error *err) {
    mp_server *srv = t->srv;
    *result = NULL;
    if (task_cancelled(t))
        return mp_err(err, task_draining(t) ? "interrupted" : "cancelled",
                      "the job was stopped before this step");
    submit_req rq = {.jt = job_type_find(cr->type),
                     .model = cr->model,
                     .model_len = strlen(cr->model),
                     .revision = cr->revision ? cr->revision : "main",
                     .params = cr->params ? json_incref(cr->params) : json_object()};
    if (!rq.jt) {
        submit_req_free(&rq);
        return mp_err(err, "internal", "unknown job type %s", cr->type);
    }
    char *output = NULL, *existing = NULL;
    char id[32], now[40];
    json_t *doc = NULL;
    int rc = -1;
    /* Exactly what a submission goes through, so a step is refused for
     * the same reasons, with the same codes, as the job submitted alone. */
    if (submit_resolve_model(srv, &rq, err) != 0 || submit_check_params(srv, &rq, err) != 0 ||
        submit_output(srv, &rq, &output, err) != 0)
        goto out;
    if (submit_new_id(id, sizeof id) != 0) {
        mp_err(err, "internal", "no randomness for a job id");
        goto out;
    }
    time_rfc3339_now(now, sizeof now);
    doc = submit_new_doc(id, rq.jt->name, rq.model, rq.revision, rq.params, now);
    if (!doc) {
        mp_err(err, "no_memory", "out of memory");
        goto out;
    }
    /* Inserted running: no worker may claim it, its parent runs it now. */
    json_object_set_new(doc, "state", json_string("running"));
    json_object_set_new(doc, "started_at", json_string(now));
    json_object_set_new(doc, "parent", json_string(t->info.id));
    json_object_set_new(json_object_get(doc, "progress"), "message", json_string("started"));
    if (store_job_insert(srv->store, id, rq.jt->name, rq.model, rq.revision, doc, output, NULL, "",
                         &existing, err) != 0)
        goto out;
    free(existing);
    publish_job_event(srv, id, "state", doc, false);
    if (cr->started) cr->started(cr->arg, id);
    rc = run_child_task(t, &rq, doc, result, err);
    doc = NULL; /* run_child_task took it */
out:
    free(output);
    json_decref(doc);
    submit_req_free(&rq);
    return rc;
}

/* ---- pool ---------------------------------------------------------------- */

static bool take_pending_cancel(worker_pool *p, const char *id) {
    for (int i = 0; i < p->npending; i++) {
        if (strcmp(p->pending_cancel[i], id) == 0) {
            memcpy(p->pending_cancel[i], p->pending_cancel[--p->npending], 40);
            return true;
        }
    }
    return false;
}

static void finish(mp_task *t, const char *now) {
    mp_server *srv = t->srv;
    json_t *doc = t->doc;
    const char *state;
    bool requeue = false;
    if (t->outcome == 1) {
        state = "succeeded";
        /* What to pass as "model" to the next job: a job that writes a model
         * says where (convert, shard); for the others it is their own model. */
        if (json_is_object(t->result) && !json_object_get(t->result, "next_model"))
            json_object_set_new(t->result, "next_model", json_string(t->info.model));
        if (t->checkpoint_failures && json_is_object(t->result))
            json_object_set_new(t->result, "checkpoint_failures",
                                json_integer(t->checkpoint_failures));
        json_object_set_new(doc, "result", t->result);
        json_object_set_new(doc, "error", json_null());
        t->result = NULL;
    } else {
        /* What a failing run found (task_set_result), e.g. which files did
         * not verify; null otherwise. */
        json_object_set_new(doc, "result", t->result ? t->result : json_null());
        t->result = NULL;
        if (t->outcome == 0) {
            snprintf(t->err_code, sizeof t->err_code, "internal");
            snprintf(t->err_msg, sizeof t->err_msg, "the job ended without a result");
        }
        if (atomic_load(&srv->draining) && !cancel_requested(t)) {
            /* Stopped by a drain, not by a client: resumable jobs go back to
             * the queue with their checkpoint; others are interrupted. A
             * child never goes back on its own: its parent re-plans. */
            if (t->parent) {
                state = "failed";
                snprintf(t->err_code, sizeof t->err_code, "interrupted");
                snprintf(t->err_msg, sizeof t->err_msg,
                         "the server shut down during this step; job %s resumes it at the next "
                         "start",
                         t->parent->info.id);
            } else if (t->type->flags & MP_JOB_RESUMABLE) {
                requeue = true;
                state = "queued";
            } else {
                state = "failed";
                snprintf(t->err_code, sizeof t->err_code, "interrupted");
                snprintf(t->err_msg, sizeof t->err_msg, "the server shut down during the job");
            }
        } else if (cancel_requested(t)) {
            state = "cancelled";
            snprintf(t->err_code, sizeof t->err_code, "cancelled");
            snprintf(t->err_msg, sizeof t->err_msg, "cancelled by request");
        } else {
            state = "failed";
        }
        if (!requeue)
            json_object_set_new(doc, "error",
                                json_pack("{s:s,s:s}", "code", t->err_code, "message", t->err_msg));
    }
    json_object_set_new(doc, "state", json_string(state));
    if (requeue) {
        json_object_set_new(doc, "started_at", json_null());
    } else {
        json_object_set_new(doc, "finished_at", json_string(now));
        /* The final progress says how the job ended, not the last step it
         * reported ("verifying"), and its rate is the average over the run
         * rather than the last window (0 once the work has stopped). */
        double took = time_mono() - t->t_start;
        t->rate = took > 0 ? (double)t->done / took : 0;
        snprintf(t->message, sizeof t->message, "%s",
                 t->outcome == 1                   ? "done"
                 : strcmp(state, "cancelled") == 0 ? "cancelled"
                                                   : "failed");
        json_t *p = progress_json(t);
        json_t *ev = progress_event(p, t->info.id);
        if (p) json_object_set(doc, "progress", p);
        /* The history keeps the final progress, so a stream opened after
         * the end still shows where the job got to. */
        if (ev) publish_job_event(srv, t->info.id, "progress", ev, true);
        json_decref(ev);
        json_decref(p);
    }
    publish_job_state(srv, doc);
    if (srv->metrics && !requeue)
        metrics_job_done(srv->metrics, t->type->name, state, time_mono() - t->t_start,
                         json_object_get(doc, "result"));
    mp_log(&srv->log, t->outcome == 1 ? "info" : "warn", t->info.id, "job %s %s%s%s", t->type->name,
           state, t->outcome == 1 ? "" : ": ", t->outcome == 1 ? "" : t->err_msg);
}

static void run_one(worker_pool *p, int slot, json_t *doc, json_t *checkpoint) {
    mp_server *srv = p->srv;
    mp_task *t = calloc(1, sizeof *t);
    char now[40];
    if (!t) {
        json_decref(doc);
        json_decref(checkpoint);
        return;
    }
    t->srv = srv;
    t->doc = doc;
    const char *type = json_string_value(json_object_get(doc, "type"));
    t->type = type ? job_type_find(type) : NULL;
    t->info.id = json_string_value(json_object_get(doc, "id"));
    t->info.type = type;
    t->info.model = json_string_value(json_object_get(doc, "model"));
    t->info.revision = json_string_value(json_object_get(doc, "revision"));
    t->info.params = json_object_get(doc, "params");
    t->info.checkpoint = checkpoint;
    t->info.env = &srv->env;
    snprintf(t->unit, sizeof t->unit, "bytes");
    /* The claim already persisted the running state: the first progress
     * update only needs to be broadcast. */
    t->t_start = t->rate_t = t->last_persist = time_mono();

    pthread_mutex_lock(&p->mu);
    p->running[slot] = t;
    if (take_pending_cancel(p, t->info.id)) atomic_store(&t->cancel, true);
    p->busy++;
    pthread_mutex_unlock(&p->mu);
    if (srv->metrics) metrics_worker_busy(srv->metrics, 1);

    char *model_path = NULL;
    bool remote_ok = false; /* a remote model the type reads itself */
    mp_error err = {0};
    if (!t->type || !t->info.id || !t->info.model || !t->info.revision) {
        task_fail(t, "internal", "corrupt job record");
    } else {
        /* Resolve the model again at run time: the cache or the tree may have
         * changed since submission (a download finished, a file was removed). */
        if (mref_is_repo_id(t->info.model)) {
            t->info.is_hub_model = true;
            if (!(t->type->flags & MP_JOB_HUB_ONLY))
                model_path =
                    mref_snapshot_dir(srv->cfg.hub_cache, t->info.model, t->info.revision, NULL);
        } else if (mref_is_remote(t->info.model)) {
            mref_remote r;
            if (mref_remote_resolve(t->info.model, strlen(t->info.model), srv->cfg.data_dir, &r,
                                    &model_path, &err) == 0) {
                remote_ok = (t->type->flags & MP_JOB_REMOTE_SOURCE) != 0;
                if (!model_path && !remote_ok)
                    mp_err(&err, "not_cached", "%s has no local copy; run a download job first",
                           t->info.model);
            }
        } else {
            mref_confine(t->info.model, strlen(t->info.model), srv->cfg.roots, &model_path, &err);
        }
        t->info.model_path = model_path;
        if ((t->type->flags & MP_JOB_NEEDS_LOCAL) && !model_path && !remote_ok) {
            task_fail(t, err.code[0] ? err.code : "not_found", "%s",
                      err.message[0] ? err.message : "the model is not available locally");
        } else if (model_path &&
                   mref_confine_model_files(model_path, t->info.model, t->info.is_hub_model,
                                            srv->cfg.hub_cache, (const char *const *)srv->cfg.roots,
                                            &err) != 0) {
            /* Checked again here, not only at submit: links may have changed
             * while the job was queued. */
            task_fail(t, err.code, "%s", err.message);
        } else {
            mp_log(&srv->log, "info", t->info.id, "job %s started on %s", type, t->info.model);
            task_progress(t, 0, 0, NULL, "started");
            t->type->run(t);
        }
    }
    time_rfc3339_now(now, sizeof now);
    finish(t, now);

    pthread_mutex_lock(&p->mu);
    p->running[slot] = NULL;
    p->busy--;
    pthread_mutex_unlock(&p->mu);
    if (srv->metrics) metrics_worker_busy(srv->metrics, -1);
    free(model_path);
    json_decref(t->result);
    json_decref(t->doc);
    json_decref(checkpoint);
    free(t);
}

typedef struct worker_arg {
    worker_pool *p;
    int slot;
} worker_arg;

static void *worker_main(void *arg) {
    worker_arg *wa = arg;
    worker_pool *p = wa->p;
    int slot = wa->slot;
    free(wa);
    for (;;) {
        pthread_mutex_lock(&p->mu);
        bool stop = p->stopping;
        uint64_t seen = p->notify_seq;
        pthread_mutex_unlock(&p->mu);
        if (stop || atomic_load(&p->srv->draining)) break;
        char now[40];
        time_rfc3339_now(now, sizeof now);
        json_t *checkpoint = NULL;
        json_t *doc = store_job_claim(p->srv->store, now, &checkpoint);
        if (doc) {
            publish_job_event(p->srv, json_string_value(json_object_get(doc, "id")), "state", doc,
                              false);
            run_one(p, slot, doc, checkpoint);
            continue;
        }
        /* Nothing queued: sleep until a submit notifies us (or a periodic
         * re-check, which also covers jobs queued by another process). */
        pthread_mutex_lock(&p->mu);
        if (!p->stopping && p->notify_seq == seen) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += 1;
            pthread_cond_timedwait(&p->cv, &p->mu, &ts);
        }
        pthread_mutex_unlock(&p->mu);
    }
    return NULL;
}

int workers_start(mp_server *srv, int n, worker_pool **out) {
    worker_pool *p = calloc(1, sizeof *p);
    if (!p) return -1;
    p->srv = srv;
    p->n = 0;
    p->threads = calloc((size_t)n, sizeof *p->threads);
    p->running = calloc((size_t)n, sizeof *p->running);
    if (!p->threads || !p->running) {
        free(p->threads);
        free(p->running);
        free(p);
        return -1;
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    for (int i = 0; i < n; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (!wa) break;
        *wa = (worker_arg){p, i};
        if (pthread_create(&p->threads[i], NULL, worker_main, wa) != 0) {
            free(wa);
            break;
        }
        p->n++;
    }
    *out = p;
    if (p->n != n) {
        workers_stop(p);
        *out = NULL;
        return -1;
    }
    return 0;
}

void workers_notify(worker_pool *p) {
    pthread_mutex_lock(&p->mu);
    p->notify_seq++;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

void workers_cancel(worker_pool *p, const char *job_id) {
    pthread_mutex_lock(&p->mu);
    bool found = false;
    for (int i = 0; i < p->n; i++) {
        for (mp_task *t = p->running[i]; t; t = t->child) {
            if (strcmp(t->info.id, job_id) == 0) {
                atomic_store(&t->cancel, true);
                found = true;
            }
        }
    }
    /* Claimed but not yet registered by its worker: remember the request. */
    if (!found && p->npending < MAX_PENDING_CANCELS)
        snprintf(p->pending_cancel[p->npending++], 40, "%s", job_id);
    pthread_mutex_unlock(&p->mu);
}

void workers_stop(worker_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stopping = true;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n; i++)
        pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->threads);
    free(p->running);
    free(p);
}

int workers_busy(worker_pool *p) {
    pthread_mutex_lock(&p->mu);
    int b = p->busy;
    pthread_mutex_unlock(&p->mu);
    return b;
}

int workers_count(worker_pool *p) {
    return p->n;
}
