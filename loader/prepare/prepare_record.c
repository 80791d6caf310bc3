/* prepare_record.c - what a prepare remembers about the outputs it made,
 * and the cheap check that they are still what it made (see prepare.h). */
#include <dirent.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "loader/convert/convert.h"
#include "loader/prepare/prepare.h"
#include "util/fsutil.h"

json_t *prep_dir_files(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return NULL;
    json_t *files = json_object();
    struct dirent *e;
    while (files && (e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        char p[PATH_MAX];
        struct stat st;
        if (snprintf(p, sizeof p, "%s/%s", dir, e->d_name) >= (int)sizeof p) continue;
        if (stat(p, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        json_object_set_new(files, e->d_name, json_integer((json_int_t)st.st_size));
    }
    closedir(d);
    return files;
}

char *prep_record_path(const char *data_dir, const char *model, const char *revision, bool is_hub) {
    char name[NAME_MAX + 1];
    if (!conv_default_name(model, revision, is_hub, name, sizeof name - 8)) return NULL;
    char *p = NULL;
    if (asprintf(&p, "%s/prepared/%s.json", data_dir, name) < 0) return NULL;
    return p;
}

json_t *prep_record_load(const char *path) {
    json_t *r = json_load_file(path, 0, NULL);
    if (!json_is_object(r)) {
        json_decref(r);
        return json_object();
    }
    return r;
}

int prep_record_save(const char *path, json_t *record, mp_error *err) {
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *slash = 0;
        if (fs_mkdirs(dir, err) != 0) return -1;
    }
    char *text = json_dumps(record, JSON_INDENT(2) | JSON_SORT_KEYS);
    if (!text) return mp_err(err, "no_memory", "out of memory");
    int rc = fs_write_atomic(path, text, strlen(text), err);
    free(text);
    return rc;
}

json_t *prep_record_entry(const char *source, json_t *options, const char *output,
                          const char *job) {
    json_t *files = prep_dir_files(output);
    if (!files) return NULL;
    return json_pack("{s:s,s:O,s:s,s:o,s:s}", "source", source, "options",
                     options ? options : json_null(), "output", output, "files", files, "job",
                     job ? job : "");
}

bool prep_record_verifies(json_t *entry, const char *source, json_t *options, char *why,
                          size_t whylen) {
    if (!json_is_object(entry)) {
        snprintf(why, whylen, "not recorded");
        return false;
    }
    const char *src = json_string_value(json_object_get(entry, "source"));
    if (!src || strcmp(src, source) != 0) {
        snprintf(why, whylen, "made from %s, not %s", src ? src : "?", source);
        return false;
    }
    json_t *opts = json_object_get(entry, "options");
    if (!json_equal(opts ? opts : json_null(), options ? options : json_null())) {
        snprintf(why, whylen, "made with other options");
        return false;
    }
    const char *out = json_string_value(json_object_get(entry, "output"));
    json_t *files = json_object_get(entry, "files");
    if (!out || !json_is_object(files) || json_object_size(files) == 0) {
        snprintf(why, whylen, "the record lists no files");
        return false;
    }
    const char *name;
    json_t *size;
    json_object_foreach(files, name, size) {
        char p[PATH_MAX];
        struct stat st;
        snprintf(p, sizeof p, "%s/%s", out, name);
        if (stat(p, &st) != 0) {
            snprintf(why, whylen, "%s is missing", name);
            return false;
        }
        if ((json_int_t)st.st_size != json_integer_value(size)) {
            snprintf(why, whylen, "%s has %lld bytes, %lld recorded", name, (long long)st.st_size,
                     (long long)json_integer_value(size));
            return false;
        }
    }
    return true;
}
