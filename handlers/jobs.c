/* jobs.c - /v1/jobs: submit, list, get, cancel, and a job's event stream. */
#include <stdlib.h>
#include <string.h>

#include "handlers/handlers.h"
#include "loader/jobs/jobs.h"
#include "server/jobs.h"
#include "server/sse.h"
#include "store/store.h"
#include "util/sbuf.h"

void h_jobs_submit(http_req *rq, http_resp *rs) {
    json_error_t jerr;
    /* Reject duplicate keys: a body that says two things is not one request. */
    json_t *body =
        json_loadb(rq->body, rq->body_len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    if (!body) {
        char detail[256];
        snprintf(detail, sizeof detail, "malformed JSON at line %d column %d: %s", jerr.line,
                 jerr.column, jerr.text);
        resp_problem(rs, 400, detail, NULL);
        return;
    }
    const char *idem = http_header(rq, "Idempotency-Key");
    if (idem && (strlen(idem) == 0 || strlen(idem) > 255)) {
        json_decref(body);
        resp_problem(rs, 400, "Idempotency-Key must be 1..255 characters", NULL);
        return;
    }
    json_t *job = NULL;
    bool created = false;
    int status = 400;
    mp_error err = {0};
    int rc = jobs_submit(rq->srv, body, idem, &job, &created, &status, &err);
    json_decref(body);
    if (rc != 0) {
        resp_error(rs, status, &err);
        return;
    }
    snprintf(rs->location, sizeof rs->location, "/v1/jobs/%s",
             json_string_value(json_object_get(job, "id")));
    resp_json(rs, created ? 202 : 200, job);
}

static int parse_limit(const char *s, int *out) {
    if (!s) {
        *out = 50;
        return 0;
    }
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < 1 || v > 500) return -1;
    *out = (int)v;
    return 0;
}

static bool valid_state(const char *s) {
    static const char *const states[] = {"queued", "running",   "succeeded",
                                         "failed", "cancelled", NULL};
    for (int i = 0; states[i]; i++)
        if (strcmp(states[i], s) == 0) return true;
    return false;
}

void h_jobs_list(http_req *rq, http_resp *rs) {
    int limit;
    if (parse_limit(http_query(rq, "limit"), &limit) != 0) {
        resp_problem(rs, 400, "limit must be an integer in 1..500",
                     json_pack("[{s:s,s:s}]", "field", "limit", "code", "out_of_range"));
        return;
    }
    const char *state = http_query(rq, "state"), *type = http_query(rq, "type");
    if (state && !valid_state(state)) {
        resp_problem(rs, 400, "state must be queued, running, succeeded, failed or cancelled",
                     json_pack("[{s:s,s:s}]", "field", "state", "code", "bad_value"));
        return;
    }
    if (type && !job_type_find(type)) {
        resp_problem(rs, 400, "unknown job type",
                     json_pack("[{s:s,s:s}]", "field", "type", "code", "bad_value"));
        return;
    }
    sbuf out = {0};
    mp_error err = {0};
    if (store_job_list(rq->srv->store, state, type, http_query(rq, "model"),
                       http_query(rq, "parent"), limit, http_query(rq, "cursor"), &out,
                       &err) != 0) {
        sb_free(&out);
        resp_error(rs, err.field[0] ? 400 : 503, &err);
        return;
    }
    size_t len = 0;
    char *text = sb_take(&out, &len);
    if (!text) {
        resp_problem(rs, 503, "out of memory", NULL);
        return;
    }
    resp_raw(rs, 200, "application/json", text, len);
}

void h_jobs_get(http_req *rq, http_resp *rs) {
    json_t *job = store_job_get(rq->srv->store, rq->params[0]);
    if (!job) {
        resp_problem(rs, 404, "no such job", NULL);
        return;
    }
    resp_json(rs, 200, job);
}

void h_jobs_cancel(http_req *rq, http_resp *rs) {
    json_t *job = NULL;
    int rc = jobs_cancel(rq->srv, rq->params[0], &job);
    if (rc < 0) {
        resp_problem(rs, 404, "no such job", NULL);
    } else if (rc > 0) {
        json_decref(job);
        resp_problem(rs, 409, "the job has already ended", NULL);
    } else {
        resp_json(rs, 202, job);
    }
}

void h_jobs_events(http_req *rq, http_resp *rs) {
    json_t *job = store_job_get(rq->srv->store, rq->params[0]);
    if (!job) {
        resp_problem(rs, 404, "no such job", NULL);
        return;
    }
    json_decref(job);
    rs->stream = sse_job_stream(rq->srv, rq->conn, rq->params[0]);
    if (!rs->stream) {
        resp_problem(rs, 503, "cannot open the event stream", NULL);
        return;
    }
    rs->status = 200;
}
