/*
 * http_defer.c - see http_defer.h. One detached thread per deferral, and a
 * cap on how many run at once: deferred work is rare and slow (a digest reads
 * every byte of a resident back from its device), so a pool would sit idle,
 * and the cap keeps a burst of digests from taking the machine.
 */
#include "server/http_defer.h"

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

/* How long a stopping server waits for finished deferred responses to be
 * sent before it closes their connections. */
#define DEFER_SEND_GRACE_S 10

struct http_deferrals {
    pthread_mutex_t mu;
    pthread_cond_t idle;
    int inflight, max_inflight;
    int live; /* deferrals not yet freed: their responses are not yet sent */
    bool closing;
};

struct http_deferred {
    http_deferrals *owner;
    struct MHD_Connection *conn;
    void (*work)(void *job);
    void *job;
    atomic_bool ready;
};

http_deferrals *http_defer_create(int max_inflight) {
    http_deferrals *ds = calloc(1, sizeof *ds);
    if (!ds) return NULL;
    ds->max_inflight = max_inflight;
    if (pthread_mutex_init(&ds->mu, NULL) != 0) {
        free(ds);
        return NULL;
    }
    if (pthread_cond_init(&ds->idle, NULL) != 0) {
        pthread_mutex_destroy(&ds->mu);
        free(ds);
        return NULL;
    }
    return ds;
}

void http_defer_quiesce(http_deferrals *ds) {
    if (!ds) return;
    pthread_mutex_lock(&ds->mu);
    ds->closing = true;
    while (ds->inflight > 0)
        pthread_cond_wait(&ds->idle, &ds->mu);
    /* The work is done and the connections resumed; give libmicrohttpd a
     * moment to send the answers (a client waited for them). */
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += DEFER_SEND_GRACE_S;
    while (ds->live > 0)
        if (pthread_cond_timedwait(&ds->idle, &ds->mu, &until) != 0) break;
    pthread_mutex_unlock(&ds->mu);
}
void http_defer_destroy(http_deferrals *ds) {
    if (!ds) return;
    http_defer_quiesce(ds);
    pthread_cond_destroy(&ds->idle);
    pthread_mutex_destroy(&ds->mu);
    free(ds);
}

int http_defer_inflight(http_deferrals *ds) {
    if (!ds) return 0;
    pthread_mutex_lock(&ds->mu);
    int n = ds->inflight;
    pthread_mutex_unlock(&ds->mu);
    return n;
}

/* The connection is resumed under the owner's lock, so that http_defer_quiesce
 * cannot return (and the daemon be stopped) between the work ending and the
 * connection being resumed. After the resume, d belongs to http.c. */
static void *run(void *arg) {
    http_deferred *d = arg;
    http_deferrals *ds = d->owner;
    d->work(d->job);
    atomic_store(&d->ready, true);
    pthread_mutex_lock(&ds->mu);
    MHD_resume_connection(d->conn);
    ds->inflight--;
    pthread_cond_broadcast(&ds->idle);
    pthread_mutex_unlock(&ds->mu);
    return NULL;
}

static bool start_thread(http_deferred *d) {
    pthread_attr_t attr;
    pthread_t tid;
    if (pthread_attr_init(&attr) != 0) return false;
    bool ok = pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED) == 0 &&
              pthread_create(&tid, &attr, run, d) == 0;
    pthread_attr_destroy(&attr);
    return ok;
}

int http_defer_start(http_deferrals *ds, struct MHD_Connection *conn, void (*work)(void *job),
                     void *job, http_deferred **out, const char **why) {
    *out = NULL;
    http_deferred *d = ds ? calloc(1, sizeof *d) : NULL;
    if (!d) {
        *why = "out of memory deferring the response";
        return -1;
    }
    pthread_mutex_lock(&ds->mu);
    *why = ds->closing                        ? "the server is stopping"
           : ds->inflight >= ds->max_inflight ? "too many slow requests in progress; retry soon"
                                              : NULL;
    if (!*why) {
        ds->inflight++;
        ds->live++;
    }
    pthread_mutex_unlock(&ds->mu);
    if (*why) {
        free(d);
        return -1;
    }
    d->owner = ds;
    d->conn = conn;
    d->work = work;
    d->job = job;
    /* Suspend before the thread exists: its resume must find the connection
     * suspended. Without a thread the work runs here, as it used to. */
    MHD_suspend_connection(conn);
    if (!start_thread(d)) run(d);
    *out = d;
    return 0;
}

bool http_defer_ready(http_deferred *d) {
    return atomic_load(&d->ready);
}

void http_defer_free(http_deferred *d) {
    if (!d) return;
    http_deferrals *ds = d->owner;
    pthread_mutex_lock(&ds->mu);
    ds->live--;
    pthread_cond_broadcast(&ds->idle);
    pthread_mutex_unlock(&ds->mu);
    free(d);
}
