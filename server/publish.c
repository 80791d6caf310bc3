/* publish.c - a job's changes, made durable and visible (see publish.h). */
#include "server/publish.h"

#include <stdlib.h>

#include "server/events.h"
#include "store/store.h"
#include "util/timeutil.h"

void publish_job_event(mp_server *srv, const char *job_id, const char *kind, json_t *data,
                       bool persist) {
    char *text = json_dumps(data, JSON_COMPACT);
    if (!text) return;
    if (persist) {
        char now[40];
        time_rfc3339_now(now, sizeof now);
        /* The live subscribers still get it; only a later replay misses it. */
        if (store_event_append(srv->store, job_id, kind, text, now) != 0)
            mp_log(&srv->log, "error", job_id, "cannot persist a %s event", kind);
    }
    events_publish(srv->events, job_id, kind, text);
    free(text);
}

void publish_job_state(mp_server *srv, json_t *doc) {
    const char *id = json_string_value(json_object_get(doc, "id"));
    mp_error err;
    if (store_job_update(srv->store, id, doc, "state", doc, &err) != 0)
        mp_log(&srv->log, "error", id, "cannot persist job: %s", err.message);
    publish_job_event(srv, id, "state", doc, false);
}
