/* job_inspect.c - the inspect job (being written). */
#include "util/jobtype.h"

static int inspect_run(mp_task *t) {
    return task_fail(t, "internal", "inspect is not finished yet");
}

static const mp_param_spec inspect_params[] = {
    {"tp_sizes", MP_P_INT_ARRAY, NULL, 1, 1024},
    {"kv_cache_scales_file", MP_P_STRING, NULL, 0, 0},
    {NULL, 0, NULL, 0, 0},
};

const mp_job_type mp_job_inspect = {
    .name = "inspect",
    .params = inspect_params,
    .validate = NULL,
    .run = inspect_run,
    .flags = MP_JOB_NEEDS_LOCAL,
};
