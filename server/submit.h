/*
 * submit.h - what every new job goes through, whether a client submitted it
 * (jobs.c) or a parent job runs it as one of its steps (workers.c,
 * task_run_child): model resolution and confinement, the params against the
 * type's spec and its validate hook, the output folder it will write, and its
 * first document. Below both of them, so a child is checked exactly like a
 * submission.
 */
#ifndef MP_SERVER_SUBMIT_H
#define MP_SERVER_SUBMIT_H
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "server/context.h"
#include "util/error.h"
#include "util/jobtype.h"

/* One job about to be created. */
typedef struct submit_req {
    const mp_job_type *jt;
    const char *model; /* borrowed */
    size_t model_len;  /* JSON length: differs from strlen with a NUL inside */
    const char *revision;
    json_t *params;   /* owned */
    char *model_path; /* owned; NULL: a hub model not taken from the cache */
    bool is_hub;
} submit_req;

/* Where the model is: a hub repo's snapshot in the cache (required by some
 * job types, never used by hub-only ones), or a local folder under one of
 * the roots (--model-root, <data>/converted, <data>/sharded). */
int submit_resolve_model(mp_server *srv, submit_req *rq, mp_error *err);
/* The params against the type's schema, then the type's own check. */
int submit_check_params(mp_server *srv, const submit_req *rq, mp_error *err);
/* The folder the job will write (its type's output hook), or *out NULL for
 * types that write none (caller frees). */
int submit_output(mp_server *srv, const submit_req *rq, char **out, mp_error *err);
/* "j_" + 20 hex digits of randomness. */
int submit_new_id(char *out, size_t len);
/* A new job's document, state "queued", parent null. */
json_t *submit_new_doc(const char *id, const char *type, const char *model, const char *revision,
                       json_t *params, const char *now);
/* The task info a validate/output hook sees for rq. */
mp_task_info submit_info(mp_server *srv, const submit_req *rq);
void submit_req_free(submit_req *rq);
#endif
