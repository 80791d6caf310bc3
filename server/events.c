/* events.c - see events.h. One mutex guards the ring and the waiter list;
 * wakers run outside it so a waker may take other locks (MHD's). */
#include "server/events.h"

#include <pthread.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "util/timeutil.h"

typedef struct waiter {
    event_waker fn;
    void *arg;
} waiter;

struct event_hub {
    pthread_mutex_t mu;
    hub_event ring[EVENTS_RING];
    uint64_t last_id;
    uint64_t first_id; /* the first id this process hands out */
    bool closed;
    waiter *waiters;
    size_t nwaiters, capwaiters;
};

event_hub *events_new(void) {
    event_hub *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    pthread_mutex_init(&h->mu, NULL);
    /* Ids start from the wall clock (microseconds, well within a JSON
     * number's exact range) rather than 1, so that a client's Last-Event-ID
     * from an earlier process is older than anything this one has, and is
     * answered as "skipped" instead of silently skipping new events. */
    h->last_id = time_wall_ms() * 1000;
    h->first_id = h->last_id + 1;
    return h;
}

static void take_waiters(event_hub *h, waiter **list, size_t *n) {
    *list = h->waiters;
    *n = h->nwaiters;
    h->waiters = NULL;
    h->nwaiters = h->capwaiters = 0;
}

static void run_waiters(waiter *list, size_t n) {
    for (size_t i = 0; i < n; i++)
        list[i].fn(list[i].arg);
    free(list);
}

void events_close(event_hub *h) {
    waiter *list;
    size_t n;
    pthread_mutex_lock(&h->mu);
    h->closed = true;
    take_waiters(h, &list, &n);
    pthread_mutex_unlock(&h->mu);
    run_waiters(list, n);
}

void events_free(event_hub *h) {
    if (!h) return;
    for (size_t i = 0; i < EVENTS_RING; i++)
        free(h->ring[i].data);
    free(h->waiters);
    pthread_mutex_destroy(&h->mu);
    free(h);
}

uint64_t events_publish(event_hub *h, const char *job_id, const char *kind, const char *data) {
    char *copy = strdup(data ? data : "{}");
    if (!copy) return 0;
    waiter *list;
    size_t n;
    pthread_mutex_lock(&h->mu);
    uint64_t id = ++h->last_id;
    hub_event *e = &h->ring[id % EVENTS_RING];
    free(e->data);
    e->id = id;
    snprintf(e->job_id, sizeof e->job_id, "%s", job_id ? job_id : "");
    snprintf(e->kind, sizeof e->kind, "%s", kind);
    e->data = copy;
    take_waiters(h, &list, &n);
    pthread_mutex_unlock(&h->mu);
    run_waiters(list, n);
    return id;
}

uint64_t events_last_id(event_hub *h) {
    pthread_mutex_lock(&h->mu);
    uint64_t id = h->last_id;
    pthread_mutex_unlock(&h->mu);
    return id;
}

int events_next(event_hub *h, uint64_t after, const char *job_filter, hub_event *out,
                event_waker waker, void *waker_arg, bool *skipped) {
    pthread_mutex_lock(&h->mu);
    if (h->closed) {
        pthread_mutex_unlock(&h->mu);
        return -1;
    }
    uint64_t oldest = h->last_id > EVENTS_RING ? h->last_id - EVENTS_RING + 1 : 1;
    if (oldest < h->first_id) oldest = h->first_id;
    if (skipped) *skipped = after + 1 < oldest;
    if (after + 1 < oldest) after = oldest - 1;
    for (uint64_t id = after + 1; id <= h->last_id; id++) {
        hub_event *e = &h->ring[id % EVENTS_RING];
        if (job_filter && strcmp(e->job_id, job_filter) != 0) continue;
        *out = *e;
        out->data = strdup(e->data);
        pthread_mutex_unlock(&h->mu);
        return out->data ? 1 : 0;
    }
    if (waker) {
        if (h->nwaiters == h->capwaiters) {
            size_t cap = h->capwaiters ? h->capwaiters * 2 : 16;
            waiter *w = realloc(h->waiters, cap * sizeof *w);
            if (!w) {
                pthread_mutex_unlock(&h->mu);
                return 0;
            }
            h->waiters = w;
            h->capwaiters = cap;
        }
        h->waiters[h->nwaiters++] = (waiter){waker, waker_arg};
    }
    /* An empty filter scan still advances nothing: the caller keeps `after`. */
    pthread_mutex_unlock(&h->mu);
    return 0;
}

void events_forget(event_hub *h, void *waker_arg) {
    pthread_mutex_lock(&h->mu);
    for (size_t i = 0; i < h->nwaiters;) {
        if (h->waiters[i].arg == waker_arg)
            h->waiters[i] = h->waiters[--h->nwaiters];
        else
            i++;
    }
    pthread_mutex_unlock(&h->mu);
}

void events_wake_all(event_hub *h) {
    waiter *list;
    size_t n;
    pthread_mutex_lock(&h->mu);
    take_waiters(h, &list, &n);
    pthread_mutex_unlock(&h->mu);
    run_waiters(list, n);
}
