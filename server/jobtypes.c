/* jobtypes.c - the registry: every job type the server knows, by name. A
 * new type is one `extern` and one table entry here. */
#include <string.h>

#include "server/jobs.h"

extern const mp_job_type mp_job_verify;

static const mp_job_type *const TYPES[] = {
    &mp_job_verify,
    NULL,
};

const mp_job_type *const *jobs_types(void) {
    return TYPES;
}

const mp_job_type *jobs_type_find(const char *name) {
    for (int i = 0; TYPES[i]; i++)
        if (strcmp(TYPES[i]->name, name) == 0) return TYPES[i];
    return NULL;
}
