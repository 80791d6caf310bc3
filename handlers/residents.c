/* residents.c - /v1/residents: warm-loaded weights held by the server: list,
 * one with its tensor table, unload (refused with 409 while an exported CUDA
 * IPC handle may be in use, unless ?force=true), and a read-back digest of
 * every tensor. */
#include <string.h>

#include "handlers/handlers.h"
#include "loader/residents/residents.h"

void h_residents_list(http_req *rq, http_resp *rs) {
    resp_json(rs, 200, json_pack("{s:o}", "residents", res_list(rq->srv->residents)));
}

void h_residents_get(http_req *rq, http_resp *rs) {
    json_t *doc = res_get(rq->srv->residents, rq->params[0]);
    if (!doc) {
        resp_problem(rs, 404, "no such resident", NULL);
        return;
    }
    resp_json(rs, 200, doc);
}

void h_residents_delete(http_req *rq, http_resp *rs) {
    const char *f = http_query(rq, "force");
    bool force = f && (strcmp(f, "true") == 0 || strcmp(f, "1") == 0);
    if (f && !force && strcmp(f, "false") != 0 && strcmp(f, "0") != 0) {
        resp_problem(rs, 400, "force must be true or false", NULL);
        return;
    }
    int rc = res_remove(rq->srv->residents, rq->params[0], force);
    if (rc == RES_EXPORTED) {
        resp_problem(rs, 409,
                     "this resident's device memory was exported (a CUDA IPC handle was handed "
                     "out): another process may still use it; unload with ?force=true once it "
                     "let go",
                     NULL);
        return;
    }
    if (rc != 0) {
        json_t *doc = res_get(rq->srv->residents, rq->params[0]);
        if (doc) {
            json_decref(doc);
            resp_problem(rs, 409, "this resident is not loaded (gone or already unloaded)", NULL);
        } else {
            resp_problem(rs, 404, "no such resident", NULL);
        }
        return;
    }
    resp_json(rs, 200, json_pack("{s:s,s:s}", "id", rq->params[0], "state", "unloaded"));
}

/* The digest reads every byte of the resident back from its device: it is
 * deferred (resp_defer) so that it never holds an HTTP thread. */
typedef struct digest_req {
    resident_set *set;
    char *id;
} digest_req;

static void digest_req_free(void *arg) {
    digest_req *d = arg;
    free(d->id);
    free(d);
}

static void digest_run(void *arg, http_resp *rs) {
    digest_req *d = arg;
    json_t *out = NULL;
    mp_error err = {0};
    if (res_digest(d->set, d->id, &out, &err) != 0) {
        resp_error(rs, err.code[0] && !strcmp(err.code, "not_found") ? 404 : 503, &err);
        return;
    }
    resp_json(rs, 200, out);
}

void h_residents_digest(http_req *rq, http_resp *rs) {
    digest_req *d = calloc(1, sizeof *d);
    if (d) d->id = strdup(rq->params[0]);
    if (!d || !d->id) {
        if (d) digest_req_free(d);
        resp_problem(rs, 503, "out of memory", NULL);
        return;
    }
    d->set = rq->srv->residents;
    resp_defer(rs, digest_run, d, digest_req_free);
}
