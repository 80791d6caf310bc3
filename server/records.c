/* records.c - res_records on the server's store (see records.h). */
#include "server/records.h"

#include "store/store.h"

static void rec_put(void *ctx, const char *id, const char *model, const char *revision,
                    const char *state, json_t *doc) {
    mp_server *srv = ctx;
    if (store_resident_put(srv->store, id, model, revision, state, doc) != 0)
        mp_log(&srv->log, "warn", NULL,
               "resident %s (%s) could not be recorded: it will be missing from the list after a "
               "restart",
               id, model);
}

static void rec_set_state(void *ctx, const char *id, const char *state) {
    mp_server *srv = ctx;
    if (store_resident_set_state(srv->store, id, state) != 0)
        mp_log(&srv->log, "warn", NULL, "resident %s: could not record its state as %s", id, state);
}

static json_t *rec_list(void *ctx) {
    mp_server *srv = ctx;
    json_t *all = store_resident_list(srv->store);
    if (!all) mp_log(&srv->log, "warn", NULL, "cannot list the recorded residents");
    return all;
}

static json_t *rec_get(void *ctx, const char *id) {
    mp_server *srv = ctx;
    return store_resident_get(srv->store, id);
}

res_records records_residents(mp_server *srv) {
    return (res_records){
        .ctx = srv, .put = rec_put, .set_state = rec_set_state, .list = rec_list, .get = rec_get};
}
