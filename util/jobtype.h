/*
 * jobtype.h - what a job type provides to the registry (server/jobtypes.c):
 * its name, a declarative list of params (checked at submit time so a bad
 * param is a 400 naming the field), an optional extra validator that may look
 * at the model (e.g. tp_size against config.json), and the run function.
 *
 * Each job type lives in its own loader/job_<name>.c and exports one
 * `const mp_job_type mp_job_<name>`.
 */
#ifndef MP_UTIL_JOBTYPE_H
#define MP_UTIL_JOBTYPE_H

#include <jansson.h>
#include <stdint.h>

#include "util/error.h"
#include "util/task.h"

typedef enum mp_param_kind {
    MP_P_STRING, /* json string; enum_values restricts it when set */
    MP_P_INT,    /* json integer within [min, max] */
    MP_P_NUMBER, /* json real or integer */
    MP_P_BOOL,
    MP_P_STRING_ARRAY, /* array of strings */
    MP_P_INT_ARRAY,    /* array of integers within [min, max] */
    MP_P_OBJECT,       /* json object, checked by the type's validate() */
} mp_param_kind;

typedef struct mp_param_spec {
    const char *name;
    mp_param_kind kind;
    const char *const *enum_values; /* NULL-terminated, or NULL */
    int64_t min, max;               /* for INT / INT_ARRAY; min == max == 0: any */
} mp_param_spec;

enum {
    MP_JOB_RESUMABLE = 1u << 0,   /* re-queued (with its checkpoint) after a crash */
    MP_JOB_NEEDS_LOCAL = 1u << 1, /* model must exist locally (model root or hub cache) */
    MP_JOB_HUB_ONLY = 1u << 2,    /* model must be a hub repo id (download) */
    /* takes an s3:// or redis:// model itself (download from S3); other
     * types get an s3:// model's downloaded copy (DATA/remote/s3/...) */
    MP_JOB_REMOTE_SOURCE = 1u << 3,
};

typedef struct mp_job_type {
    const char *name;
    const mp_param_spec *params; /* terminated by {NULL} */
    /* Extra checks after the declarative ones; info->model_path is resolved
     * when the model exists locally. Return -1 with err->field set for a 400. */
    int (*validate)(const mp_task_info *info, mp_error *err);
    int (*run)(mp_task *t);
    unsigned flags;
    /* Types that write a model folder (convert, shard): the folder this
     * request would write, resolved but not created (*out, caller frees).
     * The service refuses a second active job on the same folder
     * ("output_busy"). NULL for the others. */
    int (*output)(const mp_task_info *info, char **out, mp_error *err);
} mp_job_type;

#endif
