/* store_models.c - per-model facts: recorded file hashes (verify), the last
 * inspection, and residents (warm-loaded weights) across restarts. */
#include "store/store_db.h"

#include <stdlib.h>

#define TEXT(st, i) ((const char *)sqlite3_column_text((st), (i)))

json_t *store_hashes_get(store *s, const char *model, const char *revision) {
    json_t *out = json_object();
    store_conn *c = store_acquire(s);
    sqlite3_stmt *st = store_stmt(c, Q_HASH_GET);
    int rc = SQLITE_ERROR;
    if (st && out) {
        sqlite3_bind_text(st, 1, model, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, revision, -1, SQLITE_STATIC);
        while ((rc = sqlite3_step(st)) == SQLITE_ROW)
            json_object_set_new(out, TEXT(st, 0),
                                json_pack("{s:I,s:s}", "size",
                                          (json_int_t)sqlite3_column_int64(st, 1), "sha256",
                                          TEXT(st, 2)));
        sqlite3_reset(st);
    }
    store_release(s, c);
    /* A partial answer would make verify record files as new: none at all. */
    if (rc != SQLITE_DONE) {
        json_decref(out);
        return NULL;
    }
    return out;
}

int store_hash_put(store *s, const char *model, const char *revision, const char *name,
                   int64_t size, const char *sha256) {
    store_conn *c = store_acquire_write(s);
    sqlite3_stmt *st = store_stmt(c, Q_HASH_PUT);
    int rc = -1;
    if (st) {
        sqlite3_bind_text(st, 1, model, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, revision, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, name, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 4, size);
        sqlite3_bind_text(st, 5, sha256, -1, SQLITE_STATIC);
        rc = sqlite3_step(st) == SQLITE_DONE ? 0 : -1;
        sqlite3_reset(st);
    }
    store_release_write(s, c);
    return rc;
}

int store_inspection_put(store *s, const char *model, const char *revision, const char *job_id,
                         json_t *result) {
    char *text = json_dumps(result, JSON_COMPACT);
    if (!text) return -1;
    store_conn *c = store_acquire_write(s);
    sqlite3_stmt *st = store_stmt(c, Q_INSP_PUT);
    int rc = -1;
    if (st) {
        sqlite3_bind_text(st, 1, model, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, revision, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, job_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 4, text, -1, SQLITE_STATIC);
        rc = sqlite3_step(st) == SQLITE_DONE ? 0 : -1;
        sqlite3_reset(st);
    }
    store_release_write(s, c);
    free(text);
    return rc;
}

json_t *store_inspection_get(store *s, const char *model, const char *revision) {
    store_conn *c = store_acquire(s);
    sqlite3_stmt *st = store_stmt(c, Q_INSP_GET);
    json_t *out = NULL;
    if (st) {
        sqlite3_bind_text(st, 1, model, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, revision, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW) {
            json_t *result = json_loads(TEXT(st, 0), 0, NULL);
            if (result)
                out = json_pack("{s:o,s:s?,s:s}", "result", result, "job_id", TEXT(st, 1), "at",
                                TEXT(st, 2));
        }
        sqlite3_reset(st);
    }
    store_release(s, c);
    return out;
}

int store_resident_put(store *s, const char *id, const char *model, const char *revision,
                       const char *state, json_t *doc) {
    char *text = json_dumps(doc, JSON_COMPACT);
    if (!text) return -1;
    store_conn *c = store_acquire_write(s);
    sqlite3_stmt *st = store_stmt(c, Q_RES_PUT);
    int rc = -1;
    if (st) {
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, model, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, revision, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 4, state, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 5, text, -1, SQLITE_STATIC);
        rc = sqlite3_step(st) == SQLITE_DONE ? 0 : -1;
        sqlite3_reset(st);
    }
    store_release_write(s, c);
    free(text);
    return rc;
}

static int exec_simple(store *s, stmt_id q, const char *a, const char *b) {
    store_conn *c = store_acquire_write(s);
    sqlite3_stmt *st = store_stmt(c, q);
    int rc = -1;
    if (st) {
        if (a) sqlite3_bind_text(st, 1, a, -1, SQLITE_STATIC);
        if (b) sqlite3_bind_text(st, 2, b, -1, SQLITE_STATIC);
        rc = sqlite3_step(st) == SQLITE_DONE ? 0 : -1;
        sqlite3_reset(st);
    }
    store_release_write(s, c);
    return rc;
}

int store_resident_set_state(store *s, const char *id, const char *state) {
    return exec_simple(s, Q_RES_STATE, id, state);
}

int store_resident_mark_all_gone(store *s) {
    return exec_simple(s, Q_RES_ALL_GONE, NULL, NULL);
}

static json_t *resident_row(sqlite3_stmt *st) {
    json_t *doc = json_loads(TEXT(st, 0), 0, NULL);
    if (doc) json_object_set_new(doc, "state", json_string(TEXT(st, 1)));
    return doc;
}

json_t *store_resident_list(store *s) {
    json_t *out = json_array();
    store_conn *c = store_acquire(s);
    sqlite3_stmt *st = store_stmt(c, Q_RES_LIST);
    while (st && sqlite3_step(st) == SQLITE_ROW) {
        json_t *doc = resident_row(st);
        if (doc) json_array_append_new(out, doc);
    }
    if (st) sqlite3_reset(st);
    store_release(s, c);
    return out;
}

json_t *store_resident_get(store *s, const char *id) {
    store_conn *c = store_acquire(s);
    sqlite3_stmt *st = store_stmt(c, Q_RES_GET);
    json_t *doc = NULL;
    if (st) {
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW) doc = resident_row(st);
        sqlite3_reset(st);
    }
    store_release(s, c);
    return doc;
}
