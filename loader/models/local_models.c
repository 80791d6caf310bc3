/* local_models.c - the models that live in folders rather than in the hub
 * cache: under a --model-root (kind "local"), in our own output folders
 * <data>/converted and <data>/sharded (kinds "converted", "sharded") and the
 * copies of s3:// downloads under <data>/remote/s3 (kind "s3"). A
 * folder is a model when it holds a weight file at its top level; the root
 * itself counts when it is one. Temp and aside folders of convert and shard
 * (".name.convert-<tag>", "name.tmp-<tag>", "name.old-<pid>") are not. */
#include "loader/models/models.h"

#include <dirent.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

/* A folder's entry, or NULL when it holds no weight file. */
static json_t *local_entry(const char *dir, const char *kind) {
    DIR *d = opendir(dir);
    if (!d) return NULL;
    json_t *names = json_array();
    uint64_t bytes = 0;
    struct dirent *e;
    while (names && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char p[PATH_MAX];
        struct stat st;
        if (snprintf(p, sizeof p, "%s/%s", dir, e->d_name) >= (int)sizeof p) continue;
        if (stat(p, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        bytes += (uint64_t)st.st_size;
        json_array_append_new(names, json_string(e->d_name));
    }
    closedir(d);
    json_t *formats = names ? cache_formats_of(names) : NULL;
    json_t *out = NULL;
    if (formats && json_array_size(formats) > 0)
        out = json_pack("{s:s,s:s,s:n,s:s,s:I,s:I,s:O}", "model", dir, "kind", kind, "revision",
                        "path", dir, "size_bytes", (json_int_t)bytes, "files",
                        (json_int_t)json_array_size(names), "formats", formats);
    json_decref(formats);
    json_decref(names);
    return out;
}

static bool is_work_folder(const char *name) {
    return name[0] == '.' || strstr(name, ".tmp-") || strstr(name, ".old-");
}

int mref_list_root(const char *root, const char *kind, json_t *out) {
    json_t *self = local_entry(root, kind);
    if (self) return json_array_append_new(out, self);
    DIR *d = opendir(root);
    if (!d) return 0; /* a root that vanished holds no model */
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d)) != NULL) {
        if (is_work_folder(e->d_name)) continue;
        char p[PATH_MAX];
        struct stat st;
        if (snprintf(p, sizeof p, "%s/%s", root, e->d_name) >= (int)sizeof p) continue;
        if (stat(p, &st) != 0 || !S_ISDIR(st.st_mode)) continue;
        json_t *m = local_entry(p, kind);
        if (m && json_array_append_new(out, m) != 0) rc = -1;
    }
    closedir(d);
    return rc;
}

#define S3_MAX_DEPTH 32 /* prefix components: deeper folders are not walked */

/* dir is <data>/remote/s3/<bucket>/<rel>: a copy when it holds the download's
 * record, else a folder to look into (skipping temp and hidden ones). */
static int walk_s3(const char *dir, const char *bucket, const char *rel, int depth, json_t *out) {
    char p[PATH_MAX];
    struct stat st;
    if (*rel && snprintf(p, sizeof p, "%s/%s", dir, MREF_S3_PROVENANCE) < (int)sizeof p &&
        stat(p, &st) == 0 && S_ISREG(st.st_mode)) {
        json_t *m = local_entry(dir, "s3");
        if (!m) return 0;
        char url[MREF_MAX_LEN + 80];
        snprintf(url, sizeof url, "s3://%s/%s", bucket, rel);
        json_object_set_new(m, "model", json_string(url));
        json_object_set_new(m, "source", json_string("s3"));
        return json_array_append_new(out, m);
    }
    if (depth >= S3_MAX_DEPTH) return 0;
    DIR *d = opendir(dir);
    if (!d) return 0;
    struct dirent *e;
    int rc = 0;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        if (is_work_folder(e->d_name)) continue;
        char sub[PATH_MAX], srel[MREF_MAX_LEN + 1];
        if (snprintf(sub, sizeof sub, "%s/%s", dir, e->d_name) >= (int)sizeof sub ||
            snprintf(srel, sizeof srel, "%s%s%s", rel, *rel ? "/" : "", e->d_name) >=
                (int)sizeof srel)
            continue;
        if (lstat(sub, &st) != 0 || !S_ISDIR(st.st_mode)) continue; /* no links followed */
        rc = walk_s3(sub, bucket, srel, depth + 1, out);
    }
    closedir(d);
    return rc;
}

int mref_list_s3(const char *data_dir, json_t *out) {
    char base[PATH_MAX];
    if (snprintf(base, sizeof base, "%s/remote/s3", data_dir) >= (int)sizeof base) return 0;
    DIR *d = opendir(base);
    if (!d) return 0; /* nothing downloaded from S3 yet */
    struct dirent *e;
    int rc = 0;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char dir[PATH_MAX];
        struct stat st;
        if (snprintf(dir, sizeof dir, "%s/%s", base, e->d_name) >= (int)sizeof dir ||
            lstat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
            continue;
        rc = walk_s3(dir, e->d_name, "", 0, out);
    }
    closedir(d);
    return rc;
}
