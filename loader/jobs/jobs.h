/*
 * jobs.h - the job types, as the worker pool and the HTTP API see them.
 *
 * loader/jobs/ is the only place that knows both sides: the task contract
 * of util/task.h and util/jobtype.h (params, progress, cancel, checkpoints,
 * records) and the domain modules of loader/ (hub, convert, shard, warm...).
 * Each job_<name>.c adapts one domain call to one job type; the rest of the
 * server only ever sees mp_job_type values from this registry.
 */
#ifndef MP_LOADER_JOBS_H
#define MP_LOADER_JOBS_H

#include "util/jobtype.h"

/* Every job type, NULL-terminated, in the order the API documents them. */
const mp_job_type *const *job_types_all(void);
/* The type called name, or NULL. */
const mp_job_type *job_type_find(const char *name);
/* "download, verify, ..." into buf (at most n bytes), for error messages. */
void job_type_names(char *buf, size_t n);

#endif
