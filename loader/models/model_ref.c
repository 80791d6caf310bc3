/* model_ref.c - see models.h. Every check here runs before the path is
 * used, because model names come straight from HTTP requests. */
#include "loader/models/models.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "util/fsutil.h"

static bool repo_part_ok(const char *s, size_t n) {
    if (n == 0 || n > 96 || s[0] == '.' || s[0] == '-') return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!(isalnum(c) || c == '.' || c == '_' || c == '-')) return false;
        if (i + 1 < n && ((c == '.' && s[i + 1] == '.') || (c == '-' && s[i + 1] == '-')))
            return false;
    }
    return true;
}

bool mref_is_repo_id(const char *s) {
    const char *slash = strchr(s, '/');
    if (!slash || strchr(slash + 1, '/')) return false;
    return repo_part_ok(s, (size_t)(slash - s)) && repo_part_ok(slash + 1, strlen(slash + 1));
}

bool mref_is_revision(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 255 || s[0] == '/' || s[0] == '-' || strstr(s, "..")) return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!(isalnum(c) || c == '.' || c == '_' || c == '-' || c == '/')) return false;
    }
    return true;
}

int mref_confine(const char *path, size_t len, const char *const *roots, char **out,
                 mp_error *err) {
    *out = NULL;
    if (len != strlen(path))
        return mp_err_field(err, "model", "bad_model", "model contains a NUL byte");
    /* Characters, not bytes, as the OpenAPI document's maxLength counts. */
    size_t chars = 0;
    for (size_t i = 0; i < len; i++)
        chars += ((unsigned char)path[i] & 0xC0) != 0x80;
    if (len == 0 || chars > MREF_MAX_LEN)
        return mp_err_field(err, "model", "bad_model", "model path is empty or over %d characters",
                            MREF_MAX_LEN);
    if (path[0] != '/')
        return mp_err_field(err, "model", "bad_model",
                            "model must be a hub repo id (org/name) or an absolute path under a "
                            "model root");
    for (const char *p = path; (p = strstr(p, "..")) != NULL; p += 2) {
        bool starts = p == path || p[-1] == '/';
        bool ends = p[2] == 0 || p[2] == '/';
        if (starts && ends)
            return mp_err_field(err, "model", "bad_model", "model path contains '..'");
    }
    /* The codes below depend on what the server holds, not on the request's
     * form (no_model_roots, not_found, outside_roots): the OpenAPI document
     * cannot rule them out, and clients can tell them from a malformed name. */
    if (!roots || !roots[0])
        return mp_err_field(err, "model", "no_model_roots",
                            "local paths are disabled: the server has no --model-root");
    char *real = realpath(path, NULL);
    if (!real) {
        int e = errno;
        bool missing = e == ENOENT || e == ENOTDIR || e == ENAMETOOLONG;
        return mp_err_field(err, "model", missing ? "not_found" : "bad_model", "model path %s: %s",
                            path, strerror(e));
    }
    for (int i = 0; roots[i]; i++) {
        size_t rl = strlen(roots[i]);
        /* realpath resolved every symlink, so a link pointing out of the
         * root shows up here as a path outside it. */
        if (strncmp(real, roots[i], rl) == 0 && (real[rl] == '/' || real[rl] == 0)) {
            struct stat st;
            if (stat(real, &st) != 0 || !S_ISDIR(st.st_mode)) {
                free(real);
                return mp_err_field(err, "model", "not_found", "model path %s is not a directory",
                                    path);
            }
            *out = real;
            return 0;
        }
    }
    free(real);
    /* Name the roots: the fix is either a path under one of them or
     * another --model-root, and the user needs to know which. */
    char list[400] = "";
    size_t used = 0;
    for (int i = 0; roots[i] && used < sizeof list; i++) {
        int w = snprintf(list + used, sizeof list - used, "%s%s", i ? ", " : "", roots[i]);
        if (w < 0) break;
        used += (size_t)w;
    }
    return mp_err_field(err, "model", "outside_roots",
                        "model path %.200s is outside the model roots (%s); use a path under one "
                        "of them, or start the server with --model-root for its folder",
                        path, list);
}

#define CONFINE_MAX_DEPTH 16
#define CONFINE_MAX_ENTRIES 1000000

static bool under(const char *real, const char *root) {
    size_t rl = strlen(root);
    while (rl > 1 && root[rl - 1] == '/')
        rl--;
    return strncmp(real, root, rl) == 0 && (real[rl] == '/' || real[rl] == 0);
}

typedef struct confine_walk {
    const char *top;
    const char *const *allowed;
    const char *why;
    size_t entries;
} confine_walk;

/* rel: the path under the model dir ("" for the top). Only symlinks need a
 * realpath: anything else lies where its (already checked) parent does. */
static int confine_dir(confine_walk *w, const char *rel, int depth, mp_error *err) {
    /* No job descends further (verify refuses deeper trees itself), so
     * nothing below this depth is ever opened. */
    if (depth > CONFINE_MAX_DEPTH) return 0;
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s%s%s", w->top, rel[0] ? "/" : "", rel) >= (int)sizeof path)
        return mp_err(err, "bad_path", "path too long under %s", w->top);
    DIR *d = opendir(path);
    if (!d) return mp_err(err, "io_error", "open %s: %s", path, strerror(errno));
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        if (++w->entries > CONFINE_MAX_ENTRIES) {
            rc = mp_err(err, "too_many_files", "%s holds over %d files", w->top,
                        CONFINE_MAX_ENTRIES);
            break;
        }
        char sub[PATH_MAX], abs[PATH_MAX];
        if (snprintf(sub, sizeof sub, "%s%s%s", rel, rel[0] ? "/" : "", e->d_name) >=
                (int)sizeof sub ||
            snprintf(abs, sizeof abs, "%s/%s", w->top, sub) >= (int)sizeof abs) {
            rc = mp_err(err, "bad_path", "path too long under %s", w->top);
            break;
        }
        struct stat st;
        if (lstat(abs, &st) != 0) continue; /* gone meanwhile */
        if (S_ISLNK(st.st_mode)) {
            char *real = realpath(abs, NULL);
            if (!real) continue; /* dangling: no job can open it */
            bool ok = false;
            for (int i = 0; w->allowed && w->allowed[i] && !ok; i++)
                ok = under(real, w->allowed[i]);
            if (!ok) {
                rc = mp_err(err, "unsafe_path",
                            "model file %s is a link to %s, outside %s; jobs open only files "
                            "that stay there: copy the file into the model folder or add its "
                            "location as a --model-root",
                            sub, real, w->why);
                free(real);
                break;
            }
            bool dir = stat(real, &st) == 0 && S_ISDIR(st.st_mode);
            free(real);
            if (!dir) continue;
        } else if (!S_ISDIR(st.st_mode)) {
            continue;
        }
        rc = confine_dir(w, sub, depth + 1, err);
    }
    closedir(d);
    return rc;
}

int mref_confine_tree(const char *model_dir, const char *const *allowed, const char *why,
                      mp_error *err) {
    char *top = realpath(model_dir, NULL);
    if (!top) return mp_err(err, "not_found", "%s: %s", model_dir, strerror(errno));
    bool ok = false;
    for (int i = 0; allowed && allowed[i] && !ok; i++)
        ok = under(top, allowed[i]);
    free(top);
    if (!ok) return mp_err(err, "unsafe_path", "model folder %s lies outside %s", model_dir, why);
    confine_walk w = {.top = model_dir, .allowed = allowed, .why = why};
    return confine_dir(&w, "", 0, err);
}

int mref_confine_model_files(const char *model_dir, const char *model, bool is_hub,
                             const char *hub_cache, const char *const *roots, mp_error *err) {
    if (!is_hub) return mref_confine_tree(model_dir, roots, "the model roots (--model-root)", err);
    char *repo = hub_cache ? mref_repo_cache_dir(hub_cache, model) : NULL;
    char *real = repo ? realpath(repo, NULL) : NULL;
    int rc;
    if (!real) {
        rc = mp_err(err, "not_cached", "%s is not in the local cache", model);
    } else {
        char why[PATH_MAX + 64];
        snprintf(why, sizeof why, "the repo's cache folder %s", real);
        const char *const allowed[] = {real, NULL};
        rc = mref_confine_tree(model_dir, allowed, why, err);
    }
    free(real);
    free(repo);
    return rc;
}

char *mref_repo_cache_dir(const char *hub_cache, const char *repo) {
    char buf[PATH_MAX];
    const char *slash = strchr(repo, '/');
    if (!slash) return NULL;
    int n = snprintf(buf, sizeof buf, "%s/models--%.*s--%s", hub_cache, (int)(slash - repo), repo,
                     slash + 1);
    if (n < 0 || (size_t)n >= sizeof buf) return NULL;
    return strdup(buf);
}

static bool is_commit(const char *s) {
    if (strlen(s) != 40) return false;
    for (int i = 0; i < 40; i++)
        if (!isxdigit((unsigned char)s[i]) || isupper((unsigned char)s[i])) return false;
    return true;
}

char *mref_snapshot_dir(const char *hub_cache, const char *repo, const char *revision,
                        char *commit) {
    char *repo_dir = mref_repo_cache_dir(hub_cache, repo);
    if (!repo_dir) return NULL;
    char path[PATH_MAX], sha[64] = {0};
    if (is_commit(revision)) {
        snprintf(sha, sizeof sha, "%s", revision);
    } else {
        char *text = NULL;
        snprintf(path, sizeof path, "%s/refs/%s", repo_dir, revision);
        if (fs_read_all(path, 256, &text, NULL, NULL) != 0) {
            free(repo_dir);
            return NULL;
        }
        size_t n = strcspn(text, "\r\n ");
        text[n] = 0;
        if (is_commit(text)) snprintf(sha, sizeof sha, "%s", text);
        free(text);
        if (!sha[0]) {
            free(repo_dir);
            return NULL;
        }
    }
    int n = snprintf(path, sizeof path, "%s/snapshots/%s", repo_dir, sha);
    free(repo_dir);
    struct stat st;
    if (n < 0 || (size_t)n >= sizeof path || stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
        return NULL;
    if (commit) {
        memcpy(commit, sha, 40);
        commit[40] = 0;
    }
    return strdup(path);
}
