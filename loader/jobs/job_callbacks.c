/* job_callbacks.c - what the job adapters hand the domain modules, written
 * once instead of once per adapter: the callbacks (progress, log, cancel,
 * drain), each taking the job's mp_task as its opaque argument, and a
 * download's file patterns. */
#include "loader/jobs/jobs_internal.h"

int job_cb_progress(void *task, uint64_t done, uint64_t total, const char *msg) {
    task_progress(task, done, total, "bytes", msg);
    return task_cancelled(task);
}

void job_cb_bytes(void *task, uint64_t done, uint64_t total, const char *msg) {
    task_progress(task, done, total, "bytes", msg);
}

void job_cb_log(void *task, const char *level, const char *msg) {
    task_log(task, level, "%s", msg);
}

bool job_cb_cancelled(void *task) {
    return task_cancelled(task);
}

bool job_cb_draining(void *task) {
    return task_draining(task);
}

static size_t patterns_of(const json_t *arr, const char **out) {
    size_t n = 0, i;
    json_t *v;
    json_array_foreach(arr, i, v) {
        if (n < JOB_MAX_PATTERNS && json_is_string(v)) out[n++] = json_string_value(v);
    }
    return n;
}

void job_patterns_get(const json_t *params, job_patterns *out) {
    json_t *a = json_object_get(params, "allow_patterns");
    json_t *ig = json_object_get(params, "ignore_patterns");
    out->allow = json_is_array(a) ? out->allow_v : NULL;
    out->nallow = out->allow ? patterns_of(a, out->allow_v) : 0;
    out->ignore = json_is_array(ig) ? out->ignore_v : NULL;
    out->nignore = out->ignore ? patterns_of(ig, out->ignore_v) : 0;
}
