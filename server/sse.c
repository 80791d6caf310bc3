/*
 * sse.c - see sse.h. The content-reader callback sends what is pending; when
 * nothing is, it registers a waker with the hub and suspends its connection
 * (MHD_suspend_connection), so an idle stream costs no thread. The waker
 * resumes it. A stream is reference counted because a waker may still be
 * in flight when MHD frees the response.
 */
#include "server/sse.h"

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "server/events.h"
#include "store/store.h"
#include "util/sbuf.h"
#include "util/timeutil.h"

#define SSE_KEEPALIVE_S 15.0

typedef struct sse_stream {
    mp_server *srv;
    struct MHD_Connection *conn;
    char job_id[40]; /* "" = every event */
    uint64_t after;
    sbuf pending;
    size_t sent;
    bool ending;
    bool resynced; /* a resync event was sent and nothing was delivered since */
    pthread_mutex_t mu;
    bool suspended, wake_pending, closed;
    atomic_int refs;
    double last_write;
} sse_stream;

static void stream_unref(sse_stream *s) {
    if (atomic_fetch_sub(&s->refs, 1) != 1) return;
    sb_free(&s->pending);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

static void stream_wake(void *arg) {
    sse_stream *s = arg;
    pthread_mutex_lock(&s->mu);
    bool resume = s->suspended && !s->closed;
    if (resume)
        s->suspended = false;
    else
        s->wake_pending = true;
    pthread_mutex_unlock(&s->mu);
    if (resume) MHD_resume_connection(s->conn);
    stream_unref(s);
}

static bool is_terminal_state(const char *data) {
    json_t *doc = json_loads(data, 0, NULL);
    const char *st = json_string_value(json_object_get(doc, "state"));
    bool end = st && (strcmp(st, "succeeded") == 0 || strcmp(st, "failed") == 0 ||
                      strcmp(st, "cancelled") == 0);
    json_decref(doc);
    return end;
}

static void append_event(sse_stream *s, uint64_t id, const char *kind, const char *data) {
    if (id) sb_printf(&s->pending, "id: %llu\n", (unsigned long long)id);
    sb_printf(&s->pending, "event: %s\ndata: ", kind);
    sb_puts(&s->pending, data); /* compact JSON has no newlines */
    sb_puts(&s->pending, "\n\n");
    if (s->job_id[0] && strcmp(kind, "state") == 0 && is_terminal_state(data)) s->ending = true;
}

/* Tells the client that events it asked for are gone (fell out of the ring,
 * or its Last-Event-ID is from an earlier process): it should reload its
 * state with the JSON API. The stream goes on with what there is. */
static void append_resync(sse_stream *s, const char *reason) {
    sb_puts(&s->pending, "event: resync\ndata: ");
    sb_json_str(&s->pending, reason);
    sb_puts(&s->pending, "\n\n");
    s->resynced = true;
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    sse_stream *s = cls;
    (void)pos;
    for (;;) {
        if (s->sent < s->pending.len) {
            size_t n = s->pending.len - s->sent;
            if (n > max) n = max;
            memcpy(buf, s->pending.buf + s->sent, n);
            s->sent += n;
            if (s->sent == s->pending.len) {
                s->pending.len = 0;
                s->sent = 0;
            }
            s->last_write = time_mono();
            return (ssize_t)n;
        }
        if (s->ending) return MHD_CONTENT_READER_END_OF_STREAM;
        if (s->pending.oom) return MHD_CONTENT_READER_END_WITH_ERROR;
        hub_event ev;
        bool skipped = false;
        atomic_fetch_add(&s->refs, 1); /* the hub's reference, if it keeps the waker */
        int r = events_next(s->srv->events, s->after, s->job_id[0] ? s->job_id : NULL, &ev,
                            stream_wake, s, &skipped);
        if (r != 0) atomic_fetch_sub(&s->refs, 1);
        if (r < 0) return MHD_CONTENT_READER_END_OF_STREAM; /* server stopping */
        if (skipped && !s->resynced)
            append_resync(s, "events after the requested id are no longer kept");
        if (r == 1) {
            if (!skipped) s->resynced = false;
            s->after = ev.id;
            append_event(s, ev.id, ev.kind, ev.data);
            free(ev.data);
            continue;
        }
        if (time_mono() - s->last_write >= SSE_KEEPALIVE_S) {
            sb_puts(&s->pending, ": keepalive\n\n");
            continue;
        }
        pthread_mutex_lock(&s->mu);
        if (s->wake_pending) {
            s->wake_pending = false;
            pthread_mutex_unlock(&s->mu);
            continue;
        }
        s->suspended = true;
        MHD_suspend_connection(s->conn);
        pthread_mutex_unlock(&s->mu);
        return 0;
    }
}

static void stream_free(void *cls) {
    sse_stream *s = cls;
    pthread_mutex_lock(&s->mu);
    s->closed = true;
    pthread_mutex_unlock(&s->mu);
    stream_unref(s);
}

static sse_stream *stream_new(mp_server *srv, struct MHD_Connection *conn) {
    sse_stream *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->srv = srv;
    s->conn = conn;
    pthread_mutex_init(&s->mu, NULL);
    atomic_init(&s->refs, 1);
    s->last_write = time_mono();
    return s;
}

static struct MHD_Response *stream_response(sse_stream *s) {
    struct MHD_Response *r =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_read, s, stream_free);
    if (!r) {
        stream_unref(s);
        return NULL;
    }
    MHD_add_response_header(r, "Content-Type", "text/event-stream");
    MHD_add_response_header(r, "X-Accel-Buffering", "no");
    return r;
}

static int replay_row(void *arg, int64_t id, const char *kind, const char *data) {
    (void)id;
    /* History rows carry no hub id: a client resuming a job stream gets the
     * history again, which is idempotent for progress and state. */
    append_event(arg, 0, kind, data);
    return 0;
}

struct MHD_Response *sse_job_stream(mp_server *srv, struct MHD_Connection *conn,
                                    const char *job_id) {
    sse_stream *s = stream_new(srv, conn);
    if (!s) return NULL;
    snprintf(s->job_id, sizeof s->job_id, "%s", job_id);
    /* Take the hub position before reading history: an event published in
     * between is sent twice rather than lost. */
    s->after = events_last_id(srv->events);
    if (store_event_each(srv->store, job_id, replay_row, s) != 0) {
        /* Say so in the stream rather than let a client believe the
         * history it got is complete. */
        mp_log(&srv->log, "error", job_id, "sse: cannot replay the job's history");
        append_event(s, 0, "error",
                     "{\"code\":\"store_unavailable\",\"message\":\"the job's history could "
                     "not be read; live events follow\"}");
    }
    return stream_response(s);
}

struct MHD_Response *sse_all_stream(mp_server *srv, struct MHD_Connection *conn,
                                    uint64_t last_event_id) {
    sse_stream *s = stream_new(srv, conn);
    if (!s) return NULL;
    uint64_t last = events_last_id(srv->events);
    /* retry: how soon a browser's EventSource reconnects after a drop. */
    sb_puts(&s->pending, ": connected\nretry: 2000\n\n");
    if (last_event_id > last) {
        /* Ids restart with the process: this id is from an earlier one, so
         * every event this process has kept is news to the client. */
        append_resync(s, "the event id is from an earlier server process");
        s->after = 0;
    } else {
        s->after = last_event_id ? last_event_id : last;
    }
    return stream_response(s);
}
