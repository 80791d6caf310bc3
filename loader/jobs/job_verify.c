/*
 * job_verify.c - the verify job: sha256 of every file of a model directory
 * (a local model under a model root, or a cached hub snapshot), compared
 * with hashes recorded earlier. The first run records them. For a hub
 * snapshot whose blobs are named by their sha256 (LFS), that name is the
 * expected hash, so even the first run checks the bytes.
 *
 * A mismatch fails the job (checksum_mismatch, naming the files) and keeps
 * the per-file table as the failed job's result. result.status is "verified"
 * when at least one file was compared with a known hash, "recorded" when the
 * run only recorded hashes (nothing to compare with yet).
 */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loader/models/models.h"
#include "util/fsutil.h"
#include "util/jobtype.h"

#define VERIFY_MAX_FILES 100000

typedef struct vfile {
    char *rel;
    char *abs;
    uint64_t size;
} vfile;

typedef struct vlist {
    vfile *v;
    size_t n, cap;
    uint64_t bytes;
} vlist;

static void vlist_free(vlist *l) {
    for (size_t i = 0; i < l->n; i++) {
        free(l->v[i].rel);
        free(l->v[i].abs);
    }
    free(l->v);
}

static int cmp_vfile(const void *a, const void *b) {
    return strcmp(((const vfile *)a)->rel, ((const vfile *)b)->rel);
}

/* Walks dir recursively; follows symlinks only to regular files (hub
 * snapshots are symlinks into blobs/), skips dot-files and our temp files. */
static int walk(const char *root, const char *rel, vlist *l, int depth, mp_error *err) {
    if (depth > 16) return mp_err(err, "too_deep", "directory nesting over 16 levels");
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s%s%s", root, rel[0] ? "/" : "", rel);
    DIR *d = opendir(path);
    if (!d) return mp_err(err, "io_error", "open %s: %s", path, strerror(errno));
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char sub[PATH_MAX], abs[PATH_MAX];
        if (snprintf(sub, sizeof sub, "%s%s%s", rel, rel[0] ? "/" : "", e->d_name) >=
                (int)sizeof sub ||
            snprintf(abs, sizeof abs, "%s/%s", root, sub) >= (int)sizeof abs) {
            rc = mp_err(err, "bad_path", "path too long under %s", root);
            break;
        }
        struct stat st;
        if (stat(abs, &st) != 0) continue; /* dangling link: not a file we can verify */
        if (S_ISDIR(st.st_mode)) {
            if (e->d_type == DT_LNK) continue; /* never follow directory links out */
            if ((rc = walk(root, sub, l, depth + 1, err)) != 0) break;
            continue;
        }
        if (!S_ISREG(st.st_mode)) continue;
        if (l->n >= VERIFY_MAX_FILES) {
            rc = mp_err(err, "too_many_files", "over %d files", VERIFY_MAX_FILES);
            break;
        }
        if (l->n == l->cap) {
            size_t cap = l->cap ? l->cap * 2 : 64;
            vfile *nv = realloc(l->v, cap * sizeof *nv);
            if (!nv) {
                rc = mp_err(err, "no_memory", "out of memory");
                break;
            }
            l->v = nv;
            l->cap = cap;
        }
        vfile *f = &l->v[l->n];
        f->rel = strdup(sub);
        f->abs = strdup(abs);
        f->size = (uint64_t)st.st_size;
        if (!f->rel || !f->abs) {
            free(f->rel);
            free(f->abs);
            rc = mp_err(err, "no_memory", "out of memory");
            break;
        }
        l->n++;
        l->bytes += f->size;
    }
    closedir(d);
    return rc;
}

typedef struct vprog {
    mp_task *t;
    uint64_t base, total;
} vprog;

static int on_hash_progress(void *arg, uint64_t bytes) {
    vprog *p = arg;
    task_progress(p->t, p->base + bytes, p->total, "bytes", NULL);
    return task_cancelled(p->t) ? 1 : 0;
}

static int verify_run(mp_task *t) {
    const mp_task_info *in = task_info(t);
    vlist l = {0};
    mp_error err = {0};
    if (walk(in->model_path, "", &l, 0, &err) != 0) {
        vlist_free(&l);
        return task_fail(t, err.code, "%s", err.message);
    }
    if (l.n == 0) {
        vlist_free(&l);
        return task_fail(t, "empty_model", "no files under %s", in->model_path);
    }
    qsort(l.v, l.n, sizeof *l.v, cmp_vfile);
    json_t *recorded = task_hashes_get(t);
    if (!recorded) {
        vlist_free(&l);
        return task_fail(t, "store_unavailable",
                         "the recorded hashes could not be read; try again, and see the server "
                         "log if it persists");
    }
    json_t *files = json_array();
    bool all_ok = true;
    int recorded_now = 0, bad = 0;
    char bad_names[512] = ""; /* the first mismatching files, for the message */
    uint64_t done = 0;
    for (size_t i = 0; i < l.n; i++) {
        char actual[65], expected[65] = "";
        vprog p = {t, done, l.bytes};
        task_progress(t, done, l.bytes, "bytes", l.v[i].rel);
        if (fs_sha256_file(l.v[i].abs, actual, on_hash_progress, &p, &err) != 0) {
            json_decref(files);
            json_decref(recorded);
            vlist_free(&l);
            if (strcmp(err.code, "cancelled") == 0) return task_fail(t, "cancelled", "cancelled");
            return task_fail(t, err.code, "%s", err.message);
        }
        done += l.v[i].size;
        json_t *rec = json_object_get(recorded, l.v[i].rel);
        const char *rec_sha = json_string_value(json_object_get(rec, "sha256"));
        if (rec_sha)
            snprintf(expected, sizeof expected, "%s", rec_sha);
        else if (!cache_blob_sha256(l.v[i].abs, expected))
            expected[0] = 0;
        bool ok, first_sight = false;
        if (expected[0]) {
            ok = strcmp(expected, actual) == 0;
        } else {
            /* First sight of this file: record it; it verifies against itself. */
            ok = task_hash_put(t, l.v[i].rel, (int64_t)l.v[i].size, actual) == 0;
            snprintf(expected, sizeof expected, "%s", actual);
            recorded_now++;
            first_sight = true;
        }
        if (!ok) {
            all_ok = false;
            task_log(t, "warn", "%s: expected %s, got %s", l.v[i].rel, expected, actual);
            size_t used = strlen(bad_names);
            if (bad++ < 8)
                snprintf(bad_names + used, sizeof bad_names - used, "%s%s", used ? ", " : "",
                         l.v[i].rel);
        }
        json_array_append_new(files, json_pack("{s:s,s:I,s:s,s:s,s:b,s:s}", "name", l.v[i].rel,
                                               "size", (json_int_t)l.v[i].size, "expected",
                                               expected, "actual", actual, "ok", ok, "status",
                                               first_sight ? "recorded" : "verified"));
    }
    task_progress(t, done, l.bytes, "bytes", "done");
    json_decref(recorded);
    size_t nfiles = l.n;
    vlist_free(&l);
    /* "recorded": nothing had a known hash, so this run only wrote them down. */
    const char *status = (size_t)recorded_now == nfiles ? "recorded" : "verified";
    json_t *result = json_pack("{s:s,s:b,s:o,s:i,s:I}", "status", status, "ok", all_ok, "files",
                               files, "recorded", recorded_now, "bytes", (json_int_t)done);
    if (!result) return task_fail(t, "no_memory", "out of memory");
    if (all_ok) return task_succeed(t, result);
    task_set_result(t, result);
    return task_fail(t, "checksum_mismatch",
                     "%d of %zu files do not match their expected sha256: %s%s; restore "
                     "them, or for a hub model evict it (DELETE /v1/models/%s) and download "
                     "it again",
                     bad, nfiles, bad_names, bad > 8 ? ", ..." : "", in->model);
}

static const mp_param_spec verify_params[] = {{NULL, 0, NULL, 0, 0}};

const mp_job_type mp_job_verify = {
    .name = "verify",
    .params = verify_params,
    .validate = NULL,
    .run = verify_run,
    .flags = MP_JOB_NEEDS_LOCAL,
};
