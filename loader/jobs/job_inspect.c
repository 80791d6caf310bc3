/*
 * job_inspect.c - the inspect job: what a checkpoint is (loader/inspect.h),
 * from headers only. The result is also stored as the model's last
 * inspection, which GET /v1/models/... shows.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "loader/inspect/inspect.h"
#include "util/jobtype.h"

static bool under(const char *path, const char *root) {
    size_t rl = strlen(root);
    return strncmp(path, root, rl) == 0 && (path[rl] == '/' || path[rl] == 0);
}

/* The scales file, confined like a model: a path relative to the model
 * folder, or an absolute one whose realpath lies in the model folder or a
 * model root. *out owned by the caller. */
static int resolve_scales(const mp_task_info *in, const char *p, char **out, mp_error *err) {
    const char *F = "params.kv_cache_scales_file";
    *out = NULL;
    if (!p[0]) return mp_err_field(err, F, "bad_value", "%s is empty", F);
    for (const char *s = p; (s = strstr(s, "..")) != NULL; s += 2)
        if ((s == p || s[-1] == '/') && (s[2] == 0 || s[2] == '/'))
            return mp_err_field(err, F, "bad_value", "%s contains '..'", F);
    char buf[PATH_MAX];
    if (p[0] == '/')
        snprintf(buf, sizeof buf, "%s", p);
    else if (!in->model_path)
        return mp_err_field(err, F, "bad_value", "the model is not available locally");
    else if (snprintf(buf, sizeof buf, "%s/%s", in->model_path, p) >= (int)sizeof buf)
        return mp_err_field(err, F, "bad_value", "%s is too long", F);
    char *real = realpath(buf, NULL);
    if (!real)
        return mp_err_field(err, F, errno == ENOENT ? "not_found" : "bad_value", "%s: %s", p,
                            strerror(errno));
    bool ok = in->model_path && under(real, in->model_path);
    for (int i = 0; !ok && in->env->model_roots && in->env->model_roots[i]; i++)
        ok = under(real, in->env->model_roots[i]);
    struct stat st;
    if (ok && (stat(real, &st) != 0 || !S_ISREG(st.st_mode))) {
        free(real);
        return mp_err_field(err, F, "bad_value", "%s is not a regular file", p);
    }
    if (!ok) {
        free(real);
        return mp_err_field(err, F, "bad_value", "%s must lie in the model folder or a model root",
                            F);
    }
    *out = real;
    return 0;
}

static int inspect_validate(const mp_task_info *in, mp_error *err) {
    const char *p = json_string_value(json_object_get(in->params, "kv_cache_scales_file"));
    if (!p) return 0;
    char *real = NULL;
    if (resolve_scales(in, p, &real, err) != 0) return -1;
    free(real);
    return 0;
}

static int inspect_run(mp_task *t) {
    const mp_task_info *in = task_info(t);
    mp_error err = {0};
    if (!in->model_path) return task_fail(t, "not_cached", "the model is not available locally");
    insp_opts o = {.model_dir = in->model_path};
    json_t *tps = json_object_get(in->params, "tp_sizes");
    int64_t *tp = NULL;
    if (json_is_array(tps)) {
        o.ntp = json_array_size(tps);
        tp = calloc(o.ntp ? o.ntp : 1, sizeof *tp);
        if (!tp) return task_fail(t, "no_memory", "out of memory");
        for (size_t i = 0; i < o.ntp; i++)
            tp[i] = json_integer_value(json_array_get(tps, i));
        o.tp_sizes = tp;
    }
    char *scales = NULL;
    const char *sp = json_string_value(json_object_get(in->params, "kv_cache_scales_file"));
    if (sp && resolve_scales(in, sp, &scales, &err) != 0) {
        free(tp);
        return task_fail(t, err.code, "%s", err.message);
    }
    o.kv_scales_path = scales;
    task_progress(t, 0, 1, "files", "reading headers");
    json_t *res = NULL;
    int rc = insp_run(&o, &res, &err);
    free(tp);
    free(scales);
    if (rc != 0) return task_fail(t, err.code, "%s", err.message);
    task_progress(t, 1, 1, "files", "done");
    if (task_inspection_put(t, res) != 0)
        task_log(t, "warn", "the inspection could not be kept: GET /v1/models will not show it");
    return task_succeed(t, res);
}

static const mp_param_spec inspect_params[] = {
    {"tp_sizes", MP_P_INT_ARRAY, NULL, 1, 1024},
    {"kv_cache_scales_file", MP_P_STRING, NULL, 0, 0},
    {NULL, 0, NULL, 0, 0},
};

const mp_job_type mp_job_inspect = {
    .name = "inspect",
    .params = inspect_params,
    .validate = inspect_validate,
    .run = inspect_run,
    .flags = MP_JOB_NEEDS_LOCAL,
};
