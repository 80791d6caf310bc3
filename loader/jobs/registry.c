/* registry.c - every job type the service knows, by name. A new type is its
 * loader/jobs/job_<name>.c, one `extern` and one table entry here. */
#include "loader/jobs/jobs.h"

#include <stdio.h>
#include <string.h>

extern const mp_job_type mp_job_verify;
extern const mp_job_type mp_job_download;
extern const mp_job_type mp_job_convert;
extern const mp_job_type mp_job_inspect;
extern const mp_job_type mp_job_warm_load;
extern const mp_job_type mp_job_shard;
extern const mp_job_type mp_job_prepare;
extern const mp_job_type mp_job_publish;
extern const mp_job_type mp_job_quantize;

static const mp_job_type *const TYPES[] = {
    &mp_job_download, &mp_job_verify,  &mp_job_convert, &mp_job_inspect,  &mp_job_warm_load,
    &mp_job_shard,    &mp_job_prepare, &mp_job_publish, &mp_job_quantize, NULL,
};

const mp_job_type *const *job_types_all(void) {
    return TYPES;
}

const mp_job_type *job_type_find(const char *name) {
    for (int i = 0; TYPES[i]; i++)
        if (strcmp(TYPES[i]->name, name) == 0) return TYPES[i];
    return NULL;
}

void job_type_names(char *buf, size_t n) {
    if (n == 0) return;
    buf[0] = 0;
    for (int i = 0; TYPES[i]; i++) {
        size_t l = strlen(buf);
        snprintf(buf + l, n - l, "%s%s", i ? ", " : "", TYPES[i]->name);
    }
}
