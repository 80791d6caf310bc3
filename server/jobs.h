/*
 * jobs.h - the job service: the registry of job types, submission (request
 * validation, model resolution, idempotency), cancellation, and the job
 * object's life cycle in the store and on the event hub. Handlers call it;
 * the worker pool runs what it queues.
 */
#ifndef MP_SERVER_JOBS_H
#define MP_SERVER_JOBS_H
#include <jansson.h>
#include <stdbool.h>

#include "server/context.h"
#include "util/error.h"
#include "util/jobtype.h"

const mp_job_type *jobs_type_find(const char *name);
/* NULL-terminated list of registered types. */
const mp_job_type *const *jobs_types(void);
/* "download, verify, ..." into buf (at most n bytes), for error messages. */
void jobs_type_names(char *buf, size_t n);

/* Submits a request body. On success *job is the job object and *created is
 * false when an Idempotency-Key matched an earlier job. On failure returns
 * -1 with *http_status (400, 409, 422, 503) and err filled. */
int jobs_submit(mp_server *srv, json_t *body, const char *idem_key, json_t **job, bool *created,
                int *http_status, mp_error *err);
/* Cancel: 0 accepted (202), 1 already ended (409), -1 unknown (404). */
int jobs_cancel(mp_server *srv, const char *id, json_t **job);

/* Life-cycle helpers shared with the worker pool: persist the doc, append
 * an event to the job's history and publish it. */
void jobs_publish_state(mp_server *srv, json_t *doc);
void jobs_publish(mp_server *srv, const char *job_id, const char *kind, json_t *data, bool persist);

/* Start-up: jobs left running by a dead process are re-queued (resumable
 * types) or failed with "interrupted". */
int jobs_recover(mp_server *srv);
#endif
