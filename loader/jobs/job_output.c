/* job_output.c - the "output" param of the jobs that write a model (convert,
 * shard): where the task environment allows outputs, applied through the
 * convert module's confinement rule; the default output folders; and the
 * rules that keep two jobs off one folder and an existing one unreplaced
 * unless asked. */
#include "loader/jobs/jobs_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/fsutil.h"

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

int job_output_default(const mp_task_info *in, const char *sub, const char *suffix, bool make,
                       char **out, mp_error *err) {
    *out = NULL;
    char name[NAME_MAX + 1], base[PATH_MAX];
    if (!conv_default_name(in->model, in->revision, in->is_hub_model, name, sizeof name - 16))
        return mp_err_field(err, "model", "bad_model", "no usable output name for %s", in->model);
    if (snprintf(base, sizeof base, "%s/%s", in->env->data_dir, sub) >= (int)sizeof base)
        return mp_err(err, "bad_output", "data dir path too long");
    if (make && fs_mkdirs(base, err) != 0) return -1;
    /* data_dir is realpath'd and the server made <data_dir>/<sub>, so the
     * joined name is what the folder resolves to, made yet or not. */
    if (asprintf(out, "%s/%s%s", base, name, suffix ? suffix : "") < 0) {
        *out = NULL;
        return mp_err(err, "no_memory", "out of memory");
    }
    return 0;
}

int job_output_lock(const char *out, int *fd, mp_error *err) {
    *fd = -1;
    /* ".<name>.lock" beside the folder: hidden, so listings of a model root
     * (ours and ls) do not show it, and on the same file system. */
    const char *slash = strrchr(out, '/');
    const char *base = slash ? slash + 1 : out;
    int dirlen = slash ? (int)(slash - out) : 1;
    char path[PATH_MAX];
    if (!base[0] || snprintf(path, sizeof path, "%.*s/.%s.lock", dirlen, slash ? out : ".", base) >=
                        (int)sizeof path)
        return mp_err(err, "bad_output", "output path too long");
    int f = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (f < 0) {
        if (errno == ENOENT) return 0;
        return mp_err(err, "io_error", "%s: %s", path, strerror(errno));
    }
    if (flock(f, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        close(f);
        if (e == EWOULDBLOCK)
            return mp_err(err, "output_busy",
                          "another job is writing %s right now; wait for it to end or cancel "
                          "it, or choose another params.output",
                          out);
        return mp_err(err, "io_error", "lock %s: %s", path, strerror(e));
    }
    *fd = f;
    return 0;
}

void job_output_unlock(int fd) {
    if (fd >= 0) close(fd); /* closing drops the flock */
}

int job_output_fresh(const char *out, bool overwrite, mp_error *err) {
    struct stat st;
    if (overwrite || lstat(out, &st) != 0) return 0;
    return mp_err(err, "output_exists",
                  "%s already exists; pass \"overwrite\": true in params to replace it, or "
                  "choose another params.output",
                  out);
}

int job_output_claim(const mp_task_info *in, job_output_resolver resolve, char **out, int *lock,
                     mp_error *err) {
    *out = NULL;
    *lock = -1;
    bool overwrite = json_is_true(json_object_get(in->params, "overwrite"));
    if (resolve(in, true, out, err) == 0 && job_output_lock(*out, lock, err) == 0 &&
        job_output_fresh(*out, overwrite, err) == 0)
        return 0;
    job_output_unlock(*lock);
    *lock = -1;
    free(*out);
    *out = NULL;
    return -1;
}

int job_output_check(const mp_task_info *in, job_output_resolver resolve, mp_error *err) {
    if (!json_object_get(in->params, "output")) return 0;
    char *out = NULL;
    /* Only an explicit output is checked at submit time: the default one is
     * made (and its parent created) when the job runs. */
    if (resolve(in, false, &out, err) != 0) {
        if (!err->field[0]) snprintf(err->field, sizeof err->field, "params.output");
        return -1;
    }
    free(out);
    return 0;
}
