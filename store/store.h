/*
 * store.h - the durable state of modelprepd in one SQLite file: jobs and
 * their event history, idempotency keys, recorded file hashes, the last
 * inspection of each model, residents. This is the only module that speaks
 * SQL; everyone else gets JSON documents or plain values back.
 *
 * Thread-safety: a store holds a small pool of connections (WAL mode lets
 * readers run beside the single writer); every function may be called from
 * any thread.
 *
 * A job's full API object is kept as a JSON text column ("doc") next to the
 * columns used for filtering, so that listing jobs is string concatenation,
 * not a parse/serialize per row.
 */
#ifndef MP_STORE_STORE_H
#define MP_STORE_STORE_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "util/error.h"
#include "util/sbuf.h"

typedef struct store store;

MP_MUST_USE int store_open(const char *path, int pool_size, store **out, mp_error *err);
void store_close(store *s);
/* True when the database answers a trivial query (readiness). */
MP_MUST_USE bool store_ping(store *s);
MP_MUST_USE int64_t store_size_bytes(store *s);

/* ---- jobs ---------------------------------------------------------------- */
/* Inserts a job and its first "state" event. Its state column is doc's
 * "state" ("queued", or "running" for a child job that its parent runs
 * inline) and its parent column doc's "parent" (a string or absent). When
 * idem_key is non-NULL and already known, nothing is inserted and
 * *existing_id receives the first job's id (caller frees); when the key is
 * known but request_hash differs, returns -1 with code
 * "idempotency_conflict". output (or NULL) is the folder the job will write:
 * when a queued or running job already targets it, nothing is inserted and
 * the call fails with code "output_busy" (checked in the same transaction
 * as the insert, so two racing submissions cannot both pass). */
MP_MUST_USE int store_job_insert(store *s, const char *id, const char *type, const char *model,
                                 const char *revision, json_t *doc, const char *output,
                                 const char *idem_key, const char *request_hash, char **existing_id,
                                 mp_error *err);
/* The job's API object, or NULL when unknown. */
MP_MUST_USE json_t *store_job_get(store *s, const char *id);
/* Writes doc (and the filter columns derived from it) and, when event is
 * non-NULL, appends it to the job's history in the same transaction. */
MP_MUST_USE int store_job_update(store *s, const char *id, json_t *doc, const char *event_kind,
                                 json_t *event, mp_error *err);
/* Atomically moves the oldest queued job to running, stamping started_at
 * and recording the "running" state event.
 * Returns its doc (with state running), or NULL when none is queued. The
 * checkpoint, if any, is returned in *checkpoint (caller owns). */
MP_MUST_USE json_t *store_job_claim(store *s, const char *now, json_t **checkpoint);
/* Cancels a job only if it is still queued: 1 cancelled, 0 not queued. */
MP_MUST_USE int store_job_cancel_if_queued(store *s, const char *id, const char *now,
                                           json_t **doc_out);
MP_MUST_USE int store_job_set_checkpoint(store *s, const char *id, json_t *checkpoint);
/* Appends the list response {"jobs":[...],"next_cursor":...} to out. Filters
 * may be NULL. cursor is the opaque value of a previous next_cursor. */
MP_MUST_USE int store_job_list(store *s, const char *state, const char *type, const char *model,
                               const char *parent, int limit, const char *cursor, sbuf *out,
                               mp_error *err);
/* Start-up recovery: each job left "running" is handed to decide() with its
 * type and document, which returns true to re-queue it (resumable) or false
 * to fail it. */
typedef bool (*store_resume_fn)(void *arg, const char *type, json_t *doc);
MP_MUST_USE int store_job_recover(store *s, const char *now, store_resume_fn decide, void *arg,
                                  int *requeued, int *failed);
/* Counts by (type, state) for metrics: calls fn for each group. */
typedef void (*store_count_fn)(void *arg, const char *type, const char *state, int64_t n);
MP_MUST_USE int store_job_counts(store *s, store_count_fn fn, void *arg);
/* True when a queued or running job names this model. */
MP_MUST_USE bool store_job_active_for_model(store *s, const char *model);

/* ---- job events (history for SSE replay) ---------------------------------- */
MP_MUST_USE int store_event_append(store *s, const char *job_id, const char *kind,
                                   const char *data_json, const char *at);
typedef int (*store_event_fn)(void *arg, int64_t id, const char *kind, const char *data);
MP_MUST_USE int store_event_each(store *s, const char *job_id, store_event_fn fn, void *arg);

/* ---- recorded file hashes (verify) ---------------------------------------- */
/* Returns a json object name -> {"size", "sha256"} (empty when none), or
 * NULL when the store could not be read. */
MP_MUST_USE json_t *store_hashes_get(store *s, const char *model, const char *revision);
MP_MUST_USE int store_hash_put(store *s, const char *model, const char *revision, const char *name,
                               int64_t size, const char *sha256);

/* ---- inspections ------------------------------------------------------------ */
MP_MUST_USE int store_inspection_put(store *s, const char *model, const char *revision,
                                     const char *job_id, json_t *result);
MP_MUST_USE json_t *store_inspection_get(store *s, const char *model, const char *revision);

/* ---- residents --------------------------------------------------------------- */
/* Residents are kept so that after a restart the ones of the dead process
 * are listed as gone. */
MP_MUST_USE int store_resident_put(store *s, const char *id, const char *model,
                                   const char *revision, const char *state, json_t *doc);
MP_MUST_USE int store_resident_set_state(store *s, const char *id, const char *state);
/* Marks every resident not in state "gone" as gone (start-up). */
MP_MUST_USE int store_resident_mark_all_gone(store *s);
MP_MUST_USE json_t *store_resident_list(store *s); /* array of docs, with "state" set */
MP_MUST_USE json_t *store_resident_get(store *s, const char *id);

#endif
