/* job_output.c - the "output" param of the jobs that write a model (convert,
 * shard): where the task environment allows outputs, applied through the
 * convert module's confinement rule. */
#include "loader/jobs/jobs_internal.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "loader/convert/convert.h"

/* Model roots plus the data dir, each realpath'd (NULL-terminated, owned). */
static char **output_roots(const mp_task_env *env) {
    size_t n = 0;
    while (env->model_roots && env->model_roots[n])
        n++;
    char **r = calloc(n + 2, sizeof *r);
    if (!r) return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if ((r[k] = strdup(env->model_roots[i]))) k++;
    if (env->data_dir && (r[k] = realpath(env->data_dir, NULL))) k++;
    return r;
}

int job_output_param(const mp_task_info *in, const char *param, char **out, mp_error *err) {
    *out = NULL;
    char **roots = output_roots(in->env);
    if (!roots) return mp_err(err, "no_memory", "out of memory");
    /* The hub cache may not exist yet: then its configured path is what an
     * output must stay out of. */
    char *hub = in->env->hub_cache ? realpath(in->env->hub_cache, NULL) : NULL;
    if (!hub && in->env->hub_cache) hub = strdup(in->env->hub_cache);
    int rc = conv_confine_output(param, (const char *const *)roots, hub, in->model_path, out, err);
    free(hub);
    for (size_t i = 0; roots[i]; i++)
        free(roots[i]);
    free(roots);
    if (rc != 0 && err && !err->field[0]) snprintf(err->field, sizeof err->field, "params.output");
    return rc;
}
