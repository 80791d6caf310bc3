/* job_callbacks.c - the domain modules' callbacks (progress, log, cancel,
 * drain), each taking the job's mp_task as its opaque argument, written once
 * for the job adapters instead of once per adapter. */
#include "loader/jobs/jobs_internal.h"

int job_cb_progress(void *task, uint64_t done, uint64_t total, const char *msg) {
    task_progress(task, done, total, "bytes", msg);
    return task_cancelled(task);
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
