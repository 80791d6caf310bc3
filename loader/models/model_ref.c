/* model_ref.c - see model_ref.h. Every check here runs before the path is
 * used, because model names come straight from HTTP requests. */
#include "loader/models/models.h"

#include <ctype.h>
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
    if (len == 0 || len > MREF_MAX_LEN)
        return mp_err_field(err, "model", "bad_model", "model path is empty or over %d bytes",
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
    if (!roots || !roots[0])
        return mp_err_field(err, "model", "bad_model",
                            "local paths are disabled: the server has no --model-root");
    char *real = realpath(path, NULL);
    if (!real)
        return mp_err_field(err, "model", errno == ENOENT ? "not_found" : "bad_model",
                            "model path %s: %s", path, strerror(errno));
    for (int i = 0; roots[i]; i++) {
        size_t rl = strlen(roots[i]);
        /* realpath resolved every symlink, so a link pointing out of the
         * root shows up here as a path outside it. */
        if (strncmp(real, roots[i], rl) == 0 && (real[rl] == '/' || real[rl] == 0)) {
            struct stat st;
            if (stat(real, &st) != 0 || !S_ISDIR(st.st_mode)) {
                free(real);
                return mp_err_field(err, "model", "bad_model", "model path is not a directory");
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
    return mp_err_field(err, "model", "bad_model",
                        "model path %.200s is outside the model roots (%s); use a path under one "
                        "of them, or start the server with --model-root for its folder",
                        path, list);
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
