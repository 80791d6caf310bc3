/*
 * publish.h - how a job's changes leave the process: the job document and its
 * history go to the store, and every event goes to the live subscribers on
 * the event hub (SSE). Shared by the job service (submit, cancel, recover)
 * and the worker pool (progress, logs, the end of a run), which is why it is
 * below both.
 */
#ifndef MP_SERVER_PUBLISH_H
#define MP_SERVER_PUBLISH_H

#include <jansson.h>
#include <stdbool.h>

#include "server/context.h"

/* Publishes an event of a job; persist also appends it to the job's
 * history (so an SSE replay sees it). A failed append is logged. */
void publish_job_event(mp_server *srv, const char *job_id, const char *kind, json_t *data,
                       bool persist);
/* Persists the job document (its state changed) with a "state" event in its
 * history, in one transaction, and publishes it. */
void publish_job_state(mp_server *srv, json_t *doc);

#endif
