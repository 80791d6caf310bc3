/* local_models.c - the models that live in folders rather than in the hub
 * cache: under a --model-root (kind "local") and in our own output folders
 * <data>/converted and <data>/sharded (kinds "converted", "sharded"). A
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
