/* store_jobs.c - jobs, idempotency keys and job event history. */
#include "store/store_db.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "util/timeutil.h"

#define TEXT(st, i) ((const char *)sqlite3_column_text((st), (i)))

static int step_done(store_conn *c, sqlite3_stmt *st, mp_error *err) {
    int rc = sqlite3_step(st);
    if (rc != SQLITE_DONE && rc != SQLITE_ROW)
        return mp_err(err, "store_error", "%s", sqlite3_errmsg(c->db));
    return 0;
}

static void tx(store_conn *c, stmt_id q) {
    sqlite3_stmt *st = store_stmt(c, q);
    if (st) sqlite3_step(st);
}

static char *doc_text(json_t *doc) {
    return json_dumps(doc, JSON_COMPACT | JSON_ENSURE_ASCII);
}

static void bind_opt(sqlite3_stmt *st, int i, const char *v) {
    if (v)
        sqlite3_bind_text(st, i, v, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, i);
}

/* One submission waiting for its group commit. */
typedef struct insert_req {
    const char *id, *type, *model, *revision, *created, *idem_key, *hash;
    const char *state, *parent, *output;
    char *text;
    char *existing;
    int rc;
    mp_error err;
    bool done;
    struct insert_req *next;
} insert_req;

/* Inserts one job (and its first event) inside the open transaction, under
 * a savepoint so that one bad request does not undo its batch-mates. */
static void insert_one(store_conn *c, insert_req *r) {
    sqlite3_stmt *st;
    tx(c, Q_SAVEPOINT);
    if (r->idem_key) {
        st = store_stmt(c, Q_IDEM_GET);
        sqlite3_bind_text(st, 1, r->idem_key, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW) {
            if (strcmp(TEXT(st, 1), r->hash) != 0) {
                r->rc = mp_err(&r->err, "idempotency_conflict",
                               "Idempotency-Key was used before with a different request");
            } else {
                r->existing = strdup(TEXT(st, 0));
                r->rc = r->existing ? 0 : mp_err(&r->err, "no_memory", "out of memory");
            }
            sqlite3_reset(st);
            tx(c, Q_RELEASE);
            return;
        }
        sqlite3_reset(st);
    }
    if (r->output) {
        /* After the idempotency check, so a retried request still gets its
         * first job back rather than being told its own job is busy. */
        st = store_stmt(c, Q_JOB_OUTPUT_BUSY);
        sqlite3_bind_text(st, 1, r->output, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW) {
            r->rc = mp_err(&r->err, "output_busy",
                           "job %s is already writing %s; wait for it to end or cancel it, or "
                           "choose another params.output",
                           TEXT(st, 0), r->output);
            sqlite3_reset(st);
            tx(c, Q_RELEASE);
            return;
        }
        sqlite3_reset(st);
    }
    st = store_stmt(c, Q_JOB_INSERT);
    sqlite3_bind_text(st, 1, r->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, r->type, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, r->model, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, r->revision, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, r->text, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 6, r->created, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 7, r->state, -1, SQLITE_STATIC);
    bind_opt(st, 8, r->parent);
    bind_opt(st, 9, r->output);
    int ok = step_done(c, st, &r->err) == 0;
    sqlite3_reset(st);
    if (ok && r->idem_key) {
        st = store_stmt(c, Q_IDEM_PUT);
        sqlite3_bind_text(st, 1, r->idem_key, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, r->id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, r->hash, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 4, r->created, -1, SQLITE_STATIC);
        ok = step_done(c, st, &r->err) == 0;
        sqlite3_reset(st);
    }
    if (ok) {
        st = store_stmt(c, Q_EVENT_APPEND);
        sqlite3_bind_text(st, 1, r->id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, "state", -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, r->text, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 4, r->created, -1, SQLITE_STATIC);
        ok = step_done(c, st, &r->err) == 0;
        sqlite3_reset(st);
    }
    if (!ok) {
        tx(c, Q_ROLLBACK_TO);
        r->rc = -1;
    }
    tx(c, Q_RELEASE);
}

/* Group commit: the first submitter to find no batch in flight becomes the
 * leader, takes every queued request and commits them in one transaction;
 * the others wait for it. Under load this turns N commits into one. */
int store_job_insert(store *s, const char *id, const char *type, const char *model,
                     const char *revision, json_t *doc, const char *output, const char *idem_key,
                     const char *request_hash, char **existing_id, mp_error *err) {
    const char *created = json_string_value(json_object_get(doc, "created_at"));
    const char *state = json_string_value(json_object_get(doc, "state"));
    insert_req req = {.id = id,
                      .type = type,
                      .model = model,
                      .revision = revision,
                      .created = created ? created : "",
                      .idem_key = idem_key,
                      .hash = request_hash,
                      .state = state ? state : "queued",
                      .parent = json_string_value(json_object_get(doc, "parent")),
                      .output = output,
                      .text = doc_text(doc)};
    if (!req.text) return mp_err(err, "no_memory", "cannot serialize job");
    pthread_mutex_lock(&s->gmu);
    *s->gtail = &req;
    s->gtail = &req.next;
    while (!req.done) {
        if (s->gleader) {
            pthread_cond_wait(&s->gcv, &s->gmu);
            continue;
        }
        s->gleader = true;
        insert_req *batch = s->ghead;
        s->ghead = NULL;
        s->gtail = &s->ghead;
        pthread_mutex_unlock(&s->gmu);

        store_conn *c = store_acquire_write(s);
        tx(c, Q_BEGIN);
        for (insert_req *r = batch; r; r = r->next)
            insert_one(c, r);
        sqlite3_stmt *st = store_stmt(c, Q_COMMIT);
        bool committed = st && sqlite3_step(st) == SQLITE_DONE;
        if (!committed) tx(c, Q_ROLLBACK);
        const char *why = committed ? NULL : sqlite3_errmsg(c->db);
        for (insert_req *r = batch; r; r = r->next)
            if (!committed && r->rc == 0) r->rc = mp_err(&r->err, "store_error", "%s", why);
        store_release_write(s, c);

        pthread_mutex_lock(&s->gmu);
        for (insert_req *r = batch; r; r = r->next)
            r->done = true;
        s->gleader = false;
        pthread_cond_broadcast(&s->gcv);
    }
    pthread_mutex_unlock(&s->gmu);
    free(req.text);
    if (req.rc != 0) {
        if (err) *err = req.err;
        return -1;
    }
    *existing_id = req.existing;
    return 0;
}

json_t *store_job_get(store *s, const char *id) {
    store_conn *c = store_acquire(s);
    json_t *doc = NULL;
    sqlite3_stmt *st = store_stmt(c, Q_JOB_GET);
    if (st) {
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW) doc = json_loads(TEXT(st, 0), 0, NULL);
        sqlite3_reset(st);
    }
    store_release(s, c);
    return doc;
}

int store_job_update(store *s, const char *id, json_t *doc, const char *event_kind, json_t *event,
                     mp_error *err) {
    char *text = doc_text(doc);
    char *ev = event ? doc_text(event) : NULL;
    if (!text || (event && !ev)) {
        free(text);
        free(ev);
        return mp_err(err, "no_memory", "cannot serialize job");
    }
    const char *state = json_string_value(json_object_get(doc, "state"));
    char now[40];
    time_rfc3339_now(now, sizeof now);
    store_conn *c = store_acquire_write(s);
    int rc = 0;
    if (ev) tx(c, Q_BEGIN);
    sqlite3_stmt *st = store_stmt(c, Q_JOB_UPDATE);
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, state ? state : "failed", -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, text, -1, SQLITE_STATIC);
    rc = step_done(c, st, err);
    sqlite3_reset(st);
    if (ev && rc == 0) {
        st = store_stmt(c, Q_EVENT_APPEND);
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, event_kind, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, ev, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 4, now, -1, SQLITE_STATIC);
        rc = step_done(c, st, err);
        sqlite3_reset(st);
    }
    if (ev) tx(c, rc == 0 ? Q_COMMIT : Q_ROLLBACK);
    store_release_write(s, c);
    free(text);
    free(ev);
    return rc;
}

json_t *store_job_claim(store *s, const char *now, json_t **checkpoint) {
    store_conn *c = store_acquire_write(s);
    json_t *doc = NULL;
    *checkpoint = NULL;
    char *id = NULL;
    tx(c, Q_BEGIN);
    sqlite3_stmt *st = store_stmt(c, Q_JOB_CLAIM);
    if (st && sqlite3_step(st) == SQLITE_ROW) {
        id = strdup(TEXT(st, 0));
        doc = json_loads(TEXT(st, 1), 0, NULL);
        if (sqlite3_column_type(st, 2) == SQLITE_TEXT)
            *checkpoint = json_loads(TEXT(st, 2), 0, NULL);
        sqlite3_step(st); /* finish the RETURNING statement before writing again */
    }
    if (st) sqlite3_reset(st);
    if (doc && id) {
        json_object_set_new(doc, "state", json_string("running"));
        json_object_set_new(doc, "started_at", json_string(now));
        json_object_set_new(doc, "error", json_null());
        char *text = doc_text(doc);
        sqlite3_stmt *up = store_stmt(c, Q_JOB_UPDATE);
        if (text && up) {
            sqlite3_bind_text(up, 1, id, -1, SQLITE_STATIC);
            sqlite3_bind_text(up, 2, "running", -1, SQLITE_STATIC);
            sqlite3_bind_text(up, 3, text, -1, SQLITE_STATIC);
            sqlite3_step(up);
            sqlite3_reset(up);
            /* the "running" state event, in the same transaction */
            sqlite3_stmt *ev = store_stmt(c, Q_EVENT_APPEND);
            sqlite3_bind_text(ev, 1, id, -1, SQLITE_STATIC);
            sqlite3_bind_text(ev, 2, "state", -1, SQLITE_STATIC);
            sqlite3_bind_text(ev, 3, text, -1, SQLITE_STATIC);
            sqlite3_bind_text(ev, 4, now, -1, SQLITE_STATIC);
            sqlite3_step(ev);
            sqlite3_reset(ev);
        }
        free(text);
    }
    tx(c, Q_COMMIT);
    store_release_write(s, c);
    free(id);
    return doc;
}

int store_job_cancel_if_queued(store *s, const char *id, const char *now, json_t **doc_out) {
    store_conn *c = store_acquire_write(s);
    int cancelled = 0;
    tx(c, Q_BEGIN);
    sqlite3_stmt *st = store_stmt(c, Q_JOB_CANCEL_QUEUED);
    json_t *doc = NULL;
    if (st) {
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW) {
            doc = json_loads(TEXT(st, 0), 0, NULL);
            sqlite3_step(st);
        }
        sqlite3_reset(st);
    }
    if (doc) {
        json_object_set_new(doc, "state", json_string("cancelled"));
        json_object_set_new(doc, "finished_at", json_string(now));
        json_object_set_new(
            doc, "error",
            json_pack("{s:s,s:s}", "code", "cancelled", "message", "cancelled before it started"));
        char *text = doc_text(doc);
        sqlite3_stmt *up = store_stmt(c, Q_JOB_UPDATE);
        if (text && up) {
            sqlite3_bind_text(up, 1, id, -1, SQLITE_STATIC);
            sqlite3_bind_text(up, 2, "cancelled", -1, SQLITE_STATIC);
            sqlite3_bind_text(up, 3, text, -1, SQLITE_STATIC);
            sqlite3_step(up);
            sqlite3_reset(up);
        }
        free(text);
        cancelled = 1;
    }
    tx(c, Q_COMMIT);
    store_release_write(s, c);
    if (doc_out)
        *doc_out = doc;
    else
        json_decref(doc);
    return cancelled;
}

int store_job_set_checkpoint(store *s, const char *id, json_t *checkpoint) {
    char *text = checkpoint ? doc_text(checkpoint) : NULL;
    store_conn *c = store_acquire_write(s);
    sqlite3_stmt *st = store_stmt(c, Q_JOB_SET_CHECKPOINT);
    int rc = -1;
    if (st) {
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (text)
            sqlite3_bind_text(st, 2, text, -1, SQLITE_STATIC);
        else
            sqlite3_bind_null(st, 2);
        rc = sqlite3_step(st) == SQLITE_DONE ? 0 : -1;
        sqlite3_reset(st);
    }
    store_release_write(s, c);
    free(text);
    return rc;
}

int store_job_list(store *s, const char *state, const char *type, const char *model,
                   const char *parent, int limit, const char *cursor, sbuf *out, mp_error *err) {
    int64_t before = INT64_MAX;
    if (cursor && *cursor) {
        char *end = NULL;
        long long v = strtoll(cursor, &end, 10);
        if (!end || *end || v <= 0) return mp_err_field(err, "cursor", "bad_request", "bad cursor");
        before = v;
    }
    store_conn *c = store_acquire(s);
    sqlite3_stmt *st = store_stmt(c, Q_JOB_LIST);
    if (!st) {
        store_release(s, c);
        return mp_err(err, "store_error", "prepare failed");
    }
    sqlite3_bind_int64(st, 1, before);
    bind_opt(st, 2, state);
    bind_opt(st, 3, type);
    bind_opt(st, 4, model);
    sqlite3_bind_int(st, 5, limit + 1);
    bind_opt(st, 6, parent);
    sb_puts(out, "{\"jobs\":[");
    int n = 0;
    int64_t last = 0;
    bool more = false;
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (n == limit) {
            more = true;
            break;
        }
        if (n) sb_append(out, ",", 1);
        sb_append(out, TEXT(st, 1), (size_t)sqlite3_column_bytes(st, 1));
        last = sqlite3_column_int64(st, 0);
        n++;
    }
    sqlite3_reset(st);
    store_release(s, c);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) return mp_err(err, "store_error", "list failed");
    if (more)
        sb_printf(out, "],\"next_cursor\":\"%lld\"}", (long long)last);
    else
        sb_puts(out, "],\"next_cursor\":null}");
    return 0;
}

int store_job_recover(store *s, const char *now, store_resume_fn decide, void *arg, int *requeued,
                      int *failed) {
    *requeued = *failed = 0;
    store_conn *c = store_acquire_write(s);
    tx(c, Q_BEGIN);
    sqlite3_stmt *st = store_stmt(c, Q_JOB_RUNNING);
    json_t *todo = json_array();
    while (st && sqlite3_step(st) == SQLITE_ROW) {
        json_t *doc = json_loads(TEXT(st, 2), 0, NULL);
        if (!doc) continue;
        json_array_append_new(
            todo, json_pack("{s:s,s:s,s:o}", "id", TEXT(st, 0), "type", TEXT(st, 1), "doc", doc));
    }
    if (st) sqlite3_reset(st);
    size_t i;
    json_t *it;
    json_array_foreach(todo, i, it) {
        const char *id = json_string_value(json_object_get(it, "id"));
        const char *type = json_string_value(json_object_get(it, "type"));
        json_t *doc = json_object_get(it, "doc");
        bool resume = decide(arg, type, doc);
        if (resume) {
            json_object_set_new(doc, "state", json_string("queued"));
            json_object_set_new(doc, "started_at", json_null());
            (*requeued)++;
        } else {
            json_object_set_new(doc, "state", json_string("failed"));
            json_object_set_new(doc, "finished_at", json_string(now));
            json_object_set_new(doc, "error",
                                json_pack("{s:s,s:s}", "code", "interrupted", "message",
                                          "the server stopped while this job was running"));
            (*failed)++;
        }
        char *text = doc_text(doc);
        sqlite3_stmt *up = store_stmt(c, Q_JOB_UPDATE);
        if (text && up) {
            sqlite3_bind_text(up, 1, id, -1, SQLITE_STATIC);
            sqlite3_bind_text(up, 2, resume ? "queued" : "failed", -1, SQLITE_STATIC);
            sqlite3_bind_text(up, 3, text, -1, SQLITE_STATIC);
            sqlite3_step(up);
            sqlite3_reset(up);
        }
        free(text);
    }
    json_decref(todo);
    st = store_stmt(c, Q_COMMIT);
    int rc = st && sqlite3_step(st) == SQLITE_DONE ? 0 : -1;
    if (rc != 0) tx(c, Q_ROLLBACK);
    store_release_write(s, c);
    return rc;
}

int store_job_counts(store *s, store_count_fn fn, void *arg) {
    store_conn *c = store_acquire(s);
    sqlite3_stmt *st = store_stmt(c, Q_JOB_COUNTS);
    while (st && sqlite3_step(st) == SQLITE_ROW)
        fn(arg, TEXT(st, 0), TEXT(st, 1), sqlite3_column_int64(st, 2));
    if (st) sqlite3_reset(st);
    store_release(s, c);
    return st ? 0 : -1;
}

bool store_job_active_for_model(store *s, const char *model) {
    store_conn *c = store_acquire(s);
    sqlite3_stmt *st = store_stmt(c, Q_JOB_ACTIVE_MODEL);
    bool active = false;
    if (st) {
        sqlite3_bind_text(st, 1, model, -1, SQLITE_STATIC);
        active = sqlite3_step(st) == SQLITE_ROW;
        sqlite3_reset(st);
    }
    store_release(s, c);
    return active;
}

int store_event_append(store *s, const char *job_id, const char *kind, const char *data_json,
                       const char *at) {
    store_conn *c = store_acquire_write(s);
    sqlite3_stmt *st = store_stmt(c, Q_EVENT_APPEND);
    int rc = -1;
    if (st) {
        sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, kind, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, data_json, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 4, at, -1, SQLITE_STATIC);
        rc = sqlite3_step(st) == SQLITE_DONE ? 0 : -1;
        sqlite3_reset(st);
    }
    store_release_write(s, c);
    return rc;
}

int store_event_each(store *s, const char *job_id, store_event_fn fn, void *arg) {
    store_conn *c = store_acquire(s);
    sqlite3_stmt *st = store_stmt(c, Q_EVENT_EACH);
    int rc = st ? 0 : -1;
    if (st) {
        sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
        while (sqlite3_step(st) == SQLITE_ROW)
            if (fn(arg, sqlite3_column_int64(st, 0), TEXT(st, 1), TEXT(st, 2)) != 0) break;
        sqlite3_reset(st);
    }
    store_release(s, c);
    return rc;
}
