/*
 * task.h - the contract between the worker pool (server/) and a job's run
 * function (loader/). A run function sees only this: what it was asked to do,
 * where things live, and how to report progress, check for cancellation, save
 * a resume checkpoint, keep the few records a job leaves beyond its result,
 * and end. It never sees HTTP, SQL or the store.
 *
 * A run function returns 0 after task_succeed() or -1 after task_fail().
 * Returning without calling either is a bug the pool turns into a failed job
 * with code "internal".
 */
#ifndef MP_UTIL_TASK_H
#define MP_UTIL_TASK_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "util/error.h"

typedef struct mp_task mp_task;
struct gpu_set;
struct resident_set;

/* Everything a run function may need to know about where it runs. Owned by
 * the pool; valid for the duration of the run call. */
typedef struct mp_task_env {
    const char *data_dir;     /* --data-dir, absolute */
    const char *hub_cache;    /* HF_HUB_CACHE / HF_HOME/hub / data_dir/hub */
    const char *hub_endpoint; /* --hub-endpoint / HF_ENDPOINT / default */
    const char *hf_token;     /* HF_TOKEN or NULL */
    /* Where a local model may live, NULL-terminated, each realpath'd: the
     * --model-root folders, then <data_dir>/converted and <data_dir>/sharded
     * (our own outputs are models too). */
    const char *const *model_roots;
    /* Remote stores (loader/remote): --s3-credentials-file (NULL: the AWS_*
     * environment), --s3-endpoint / AWS_ENDPOINT_URL (NULL: AWS), and
     * --redis-password-file (NULL: no AUTH unless a URL carries one). */
    const char *s3_credentials_file;
    const char *s3_endpoint;
    const char *s3_addressing; /* --s3-addressing: "path", "virtual", NULL (auto) */
    const char *redis_password_file;
    struct gpu_set *gpus;
    struct resident_set *residents;
} mp_task_env;

typedef struct mp_task_info {
    const char *id;       /* "j_..." */
    const char *type;     /* "verify", "download", ... */
    const char *model;    /* as submitted: repo id or local path */
    const char *revision; /* default "main" */
    /* Resolved local directory of the model, or NULL when the model is a hub
     * repo not (yet) in the cache. For a local model it is realpath'd and lies
     * under a model root. For a hub model it is the cached snapshot dir. */
    const char *model_path;
    bool is_hub_model;
    json_t *params;     /* validated request params (borrowed) */
    json_t *checkpoint; /* state saved by an earlier, interrupted run, or NULL */
    const mp_task_env *env;
} mp_task_info;

const mp_task_info *task_info(mp_task *t);

/* Progress: done/total in `unit` ("bytes", "files", "tensors"). The rate is
 * computed by the pool. Cheap to call often: persisted and broadcast at most
 * a few times a second. message may be NULL. */
void task_progress(mp_task *t, uint64_t done, uint64_t total, const char *unit,
                   const char *message);

/* A log line attached to the job (SSE "log" event and the job's history).
 * level: "debug" "info" "warn" "error". */
void task_log(mp_task *t, const char *level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* True once a cancel was requested or the server is draining. Check it
 * between units of work and stop promptly (then task_fail(t, "cancelled")). */
bool task_cancelled(mp_task *t);
/* True only while draining for shutdown: a resumable job should save its
 * checkpoint and return; it will be re-queued at the next start. */
bool task_draining(mp_task *t);

/* Persist resume state (steals the reference). A later run after a crash or
 * a drain gets it back in task_info()->checkpoint. Returns 0, or -1 when it
 * could not be saved: the pool has then logged it, put a warning in the
 * job's history and counts it in the result ("checkpoint_failures"); the
 * caller decides whether the run can go on (a drain cannot rely on it). */
__attribute__((warn_unused_result)) int task_checkpoint(mp_task *t, json_t *state);

/* Records: the durable facts a job keeps beyond its own result, always
 * about the job's model@revision. This is all of the store a run function
 * gets (see ARCHITECTURE.md).
 * task_hashes_get: the file hashes recorded by earlier verify runs, as
 * {name: {"size", "sha256"}} (an empty object when none); NULL when the
 * store could not be read (the pool has logged it). */
json_t *task_hashes_get(mp_task *t);
__attribute__((warn_unused_result)) int task_hash_put(mp_task *t, const char *name, int64_t size,
                                                      const char *sha256);
/* Keeps an inspect result (borrowed) for GET /v1/models/{org}/{name}. */
__attribute__((warn_unused_result)) int task_inspection_put(mp_task *t, json_t *result);

/* Steps: a job made of other jobs (prepare) runs each step as a child job,
 * inline on its own thread (so parents holding every worker cannot
 * deadlock). The child is checked exactly like a submission of the same
 * type, model, revision and params (400-class problems come back as err
 * with the field named), appears in the API with "parent": <this job's id>,
 * reports its own progress, logs and state, sees this job's cancel, and is
 * never re-queued on its own after a crash (this job re-plans instead).
 * started(arg, child_id), when set, is called once the child exists, before
 * it runs. Returns 0 with *result (the child's result, caller owns), or -1
 * with err = the child's error code and message. */
typedef struct mp_child_req {
    const char *type, *model, *revision; /* revision NULL: "main" */
    json_t *params;                      /* borrowed; NULL: {} */
    void (*started)(void *arg, const char *child_id);
    void *arg;
} mp_child_req;
int task_run_child(mp_task *t, const mp_child_req *rq, json_t **result, mp_error *err);
/* Sets the job's "steps" (borrowed; an array of {type, job, state, ...}),
 * persists it and sends a "steps" event. */
void task_steps(mp_task *t, json_t *steps);

/* End the job. task_succeed steals `result`. task_fail always returns -1 so
 * a run function can `return task_fail(t, "code", "...")`. */
int task_succeed(mp_task *t, json_t *result);
/* Attach what a failing run found (steals `result`); call before task_fail.
 * The failed job shows it as its "result" (e.g. verify: every file with its
 * expected and actual hash), next to "error". */
void task_set_result(mp_task *t, json_t *result);
int task_fail(mp_task *t, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
