/* cache.c - see cache.h. Sizes follow the snapshot symlinks into blobs/;
 * a blob named by 64 hex digits is an LFS file whose name is its sha256. */
#include "loader/models/models.h"

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/fsutil.h"

#define CACHE_HASH_SMALL (16u << 20) /* non-LFS files this small are hashed on request */

static bool ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

json_t *cache_formats_of(json_t *names) {
    bool st = false, pt = false, gg = false, np = false;
    size_t i;
    json_t *it;
    json_array_foreach(names, i, it) {
        const char *n = json_string_value(it);
        if (!n) continue;
        st |= ends_with(n, ".safetensors");
        pt |= ends_with(n, ".bin") || ends_with(n, ".pt") || ends_with(n, ".pth");
        gg |= ends_with(n, ".gguf");
        np |= ends_with(n, ".npy");
    }
    json_t *out = json_array();
    if (st) json_array_append_new(out, json_string("safetensors"));
    if (pt) json_array_append_new(out, json_string("pt"));
    if (gg) json_array_append_new(out, json_string("gguf"));
    if (np) json_array_append_new(out, json_string("npy"));
    return out;
}

bool cache_blob_sha256(const char *path, char *out) {
    char target[PATH_MAX];
    ssize_t n = readlink(path, target, sizeof target - 1);
    if (n <= 0) return false;
    target[n] = 0;
    const char *base = strrchr(target, '/');
    base = base ? base + 1 : target;
    if (strlen(base) != 64 || strspn(base, "0123456789abcdef") != 64) return false;
    memcpy(out, base, 65);
    return true;
}

/* Walks a snapshot; collects names (and with detail, size + sha256). */
static int walk_snapshot(const char *root, const char *rel, int depth, json_t *names, json_t *files,
                         uint64_t *bytes) {
    if (depth > 16) return 0;
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s%s%s", root, rel[0] ? "/" : "", rel);
    DIR *d = opendir(dir);
    if (!d) return -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        char sub[PATH_MAX], abs[PATH_MAX];
        snprintf(sub, sizeof sub, "%s%s%s", rel, rel[0] ? "/" : "", e->d_name);
        snprintf(abs, sizeof abs, "%s/%s", root, sub);
        struct stat st;
        if (stat(abs, &st) != 0) continue;
        if (S_ISDIR(st.st_mode)) {
            if (e->d_type != DT_LNK) walk_snapshot(root, sub, depth + 1, names, files, bytes);
            continue;
        }
        if (!S_ISREG(st.st_mode)) continue;
        *bytes += (uint64_t)st.st_size;
        json_array_append_new(names, json_string(sub));
        if (files) {
            char sha[65];
            json_t *jsha = json_null();
            if (cache_blob_sha256(abs, sha))
                jsha = json_string(sha);
            else if ((uint64_t)st.st_size <= CACHE_HASH_SMALL &&
                     fs_sha256_file(abs, sha, NULL, NULL, NULL) == 0)
                jsha = json_string(sha);
            json_array_append_new(files, json_pack("{s:s,s:I,s:o}", "name", sub, "size",
                                                   (json_int_t)st.st_size, "sha256", jsha));
        }
    }
    closedir(d);
    return 0;
}

/* Adds one entry per ref of the repo dir to out. */
static void list_refs(const char *hub_cache, const char *repo, json_t *out) {
    char *repo_dir = mref_repo_cache_dir(hub_cache, repo);
    if (!repo_dir) return;
    char refs[PATH_MAX];
    snprintf(refs, sizeof refs, "%s/refs", repo_dir);
    DIR *d = opendir(refs);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.') continue;
            char commit[41];
            char *snap = mref_snapshot_dir(hub_cache, repo, e->d_name, commit);
            if (!snap) continue;
            json_t *names = json_array();
            uint64_t bytes = 0;
            walk_snapshot(snap, "", 0, names, NULL, &bytes);
            json_array_append_new(
                out, json_pack("{s:s,s:s,s:s,s:s,s:s,s:I,s:I,s:o}", "model", repo, "kind", "hub",
                               "revision", e->d_name, "commit", commit, "path", snap, "size_bytes",
                               (json_int_t)bytes, "files", (json_int_t)json_array_size(names),
                               "formats", cache_formats_of(names)));
            json_decref(names);
            free(snap);
        }
        closedir(d);
    }
    free(repo_dir);
}

json_t *cache_list(const char *hub_cache) {
    json_t *out = json_array();
    DIR *d = opendir(hub_cache);
    if (!d) return out;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, "models--", 8) != 0) continue;
        /* models--org--name → org/name (names cannot contain "--") */
        const char *rest = e->d_name + 8;
        const char *sep = strstr(rest, "--");
        if (!sep) continue;
        char repo[256];
        snprintf(repo, sizeof repo, "%.*s/%s", (int)(sep - rest), rest, sep + 2);
        if (!mref_is_repo_id(repo)) continue;
        list_refs(hub_cache, repo, out);
    }
    closedir(d);
    return out;
}

json_t *cache_model(const char *hub_cache, const char *repo, const char *revision) {
    json_t *revs = json_array();
    list_refs(hub_cache, repo, revs);
    if (json_array_size(revs) == 0) {
        json_decref(revs);
        return NULL;
    }
    json_t *pick = NULL;
    size_t i;
    json_t *it;
    const char *want = revision ? revision : "main";
    json_array_foreach(revs, i, it) {
        if (strcmp(json_string_value(json_object_get(it, "revision")), want) == 0) pick = it;
    }
    if (!pick && !revision) pick = json_array_get(revs, 0);
    if (!pick) {
        json_decref(revs);
        return NULL;
    }
    json_t *out = json_deep_copy(pick);
    json_t *names = json_array(), *files = json_array();
    uint64_t bytes = 0;
    walk_snapshot(json_string_value(json_object_get(pick, "path")), "", 0, names, files, &bytes);
    json_object_set_new(out, "files", files);
    json_object_set_new(out, "revisions", revs);
    json_decref(names);
    return out;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

int cache_evict(const char *hub_cache, const char *repo, mp_error *err) {
    char *dir = mref_repo_cache_dir(hub_cache, repo);
    if (!dir) return mp_err(err, "bad_model", "bad repo id");
    struct stat st;
    if (lstat(dir, &st) != 0) {
        free(dir);
        return mp_err(err, "not_found", "%s is not cached", repo);
    }
    unsigned char rnd[6];
    char hex[13], trash[PATH_MAX];
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) memset(rnd, 0, sizeof rnd);
    fs_hex(rnd, sizeof rnd, hex);
    snprintf(trash, sizeof trash, "%s/.trash-%s", hub_cache, hex);
    if (rename(dir, trash) != 0) {
        int e = errno;
        free(dir);
        return mp_err(err, "io_error", "evict %s: %s", repo, strerror(e));
    }
    free(dir);
    if (nftw(trash, rm_entry, 16, FTW_DEPTH | FTW_PHYS) != 0)
        return mp_err(err, "io_error", "removing %s: %s", trash, strerror(errno));
    return 0;
}
