/*
 * jobs_internal.h - helpers shared by the job adapters of loader/jobs/ and
 * private to them.
 */
#ifndef MP_LOADER_JOBS_INTERNAL_H
#define MP_LOADER_JOBS_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>

#include "util/error.h"
#include "util/task.h"

/* The job's "output" param (a path) confined as conv_confine_output does,
 * with the model roots and the data dir as roots and the hub cache
 * forbidden (convert and shard share this rule). *out is the resolved path
 * (caller frees). Errors name field "params.output". */
int job_output_param(const mp_task_info *in, const char *param, char **out, mp_error *err);

/* Run-time exclusion of one output folder: an exclusive, non-blocking flock
 * on ".<name>.lock" next to it, held until job_output_unlock. A second job on
 * the same folder gets "output_busy" (the submit-time check catches the
 * usual case; this one also covers other processes and races). *fd is -1
 * when no lock could be taken because the parent folder does not exist
 * (the job then fails on its own terms). */
int job_output_lock(const char *out, int *fd, mp_error *err);
void job_output_unlock(int fd);
/* "output_exists" unless overwrite, when the folder is already there. */
int job_output_fresh(const char *out, bool overwrite, mp_error *err);
/* The folder a job writes when params.output is not given:
 * <data_dir>/<sub>/<default name of the model><suffix>. make: create
 * <data_dir>/<sub> first (run time only). */
int job_output_default(const mp_task_info *in, const char *sub, const char *suffix, bool make,
                       char **out, mp_error *err);

/* A job's output resolver: params.output confined, or its default folder
 * (make: create the default's parent; run time only). */
typedef int (*job_output_resolver)(const mp_task_info *in, bool make, char **out, mp_error *err);
/* Run time: resolve (make), lock, and refuse an existing folder unless
 * params.overwrite. On failure nothing is held (*out NULL, *lock -1). */
int job_output_claim(const mp_task_info *in, job_output_resolver resolve, char **out, int *lock,
                     mp_error *err);
/* Submit time: params.output, when given, must resolve; errors name it. */
int job_output_check(const mp_task_info *in, job_output_resolver resolve, mp_error *err);

/* The download job for an s3://bucket/prefix model (job_download_s3.c). */
int job_s3_download_validate(const mp_task_info *info, mp_error *err);
int job_s3_download_run(mp_task *t);

/* warm_load of a remote model (job_warm_remote.c): the submit-time check,
 * and opening a redis:// model's ranks as a sharded_state source (*fmt is
 * set to it; *info describes what was read), or an s3:// model. *ranged
 * non-NULL: the source's bytes are to be read through it
 * (load_run_opts.read_at = remote_s3_ranged_read; the caller frees it with
 * remote_s3_ranged_free after the load). */
#include "loader/remote/remote.h"
#include "loader/warm/warm.h"
int job_warm_remote_validate(const mp_task_info *in, const char *format, mp_error *err);
int job_warm_remote_open(mp_task *t, int tp, load_format *fmt, load_source *src, json_t **info,
                         remote_s3_ranged **ranged, mp_error *err);

/* A download's allow/ignore patterns, borrowed from its params (hub and s3
 * downloads choose files alike). download_validate has refused more than
 * JOB_MAX_PATTERNS of either; a NULL list means the param was not given. */
#define JOB_MAX_PATTERNS 256
typedef struct job_patterns {
    const char *allow_v[JOB_MAX_PATTERNS], *ignore_v[JOB_MAX_PATTERNS];
    const char **allow, **ignore; /* NULL when absent, else the _v arrays */
    size_t nallow, nignore;
} job_patterns;
void job_patterns_get(const json_t *params, job_patterns *out);

/* Callbacks for the domain modules, the job's mp_task as their argument
 * (job_callbacks.c). Progress is in bytes; it returns non-zero once the job
 * is cancelled, for modules that stop on it. */
int job_cb_progress(void *task, uint64_t done, uint64_t total, const char *msg);
/* The same, for modules that check for a cancel on their own. */
void job_cb_bytes(void *task, uint64_t done, uint64_t total, const char *msg);
void job_cb_log(void *task, const char *level, const char *msg);
bool job_cb_cancelled(void *task);
bool job_cb_draining(void *task);

#endif
