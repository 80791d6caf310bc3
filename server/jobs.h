/*
 * jobs.h - the job service: submission (request validation, model
 * resolution, idempotency), cancellation and start-up recovery. Handlers
 * call it; it queues work for the worker pool (workers.h), which runs it and
 * publishes each change through publish.h. The job types themselves are
 * loader/jobs/jobs.h's registry.
 */
#ifndef MP_SERVER_JOBS_H
#define MP_SERVER_JOBS_H
#include <jansson.h>
#include <stdbool.h>

#include "server/context.h"
#include "util/error.h"

/* Submits a request body. On success *job is the job object and *created is
 * false when an Idempotency-Key matched an earlier job. On failure returns
 * -1 with *http_status (400, 409, 422, 503) and err filled. */
int jobs_submit(mp_server *srv, json_t *body, const char *idem_key, json_t **job, bool *created,
                int *http_status, mp_error *err);
/* Cancel: 0 accepted (202), 1 already ended (409), -1 unknown (404). */
int jobs_cancel(mp_server *srv, const char *id, json_t **job);

/* Start-up: jobs left running by a dead process are re-queued (resumable
 * types) or failed with "interrupted". */
int jobs_recover(mp_server *srv);
#endif
