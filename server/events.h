/*
 * events.h - the in-process event hub: every job state/progress/log change
 * and every resident change is published here once and fanned out to SSE
 * streams (per job and global). Events carry a monotonically increasing id
 * (the SSE id), and the last EVENTS_RING of them are kept so a client can
 * resume with Last-Event-ID.
 *
 * Waiting is callback-based, not thread-blocking: a stream that has nothing
 * to send registers a waker (which resumes its suspended HTTP connection) and
 * gives its thread back to the pool.
 */
#ifndef MP_SERVER_EVENTS_H
#define MP_SERVER_EVENTS_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define EVENTS_RING 8192

typedef struct event_hub event_hub;
typedef void (*event_waker)(void *arg);

typedef struct hub_event {
    uint64_t id;
    char job_id[40]; /* "" for non-job events */
    char kind[16];   /* state progress log resident */
    char *data;      /* JSON text, owned by the copy holder */
} hub_event;

event_hub *events_new(void);
/* Wakes every waiter, makes every later wait return "closed". */
void events_close(event_hub *h);
void events_free(event_hub *h);
uint64_t events_publish(event_hub *h, const char *job_id, const char *kind, const char *data);
uint64_t events_last_id(event_hub *h);

/* Copies the first event with id > after whose job matches job_filter (NULL:
 * any) into *out (caller frees out->data). Returns 1 when one was found, 0
 * when none (and, if waker is set, registers it to be called once on the
 * next publish or close), -1 when the hub is closed. *skipped is set when
 * events after `after` already fell out of the ring. */
int events_next(event_hub *h, uint64_t after, const char *job_filter, hub_event *out,
                event_waker waker, void *waker_arg, bool *skipped);
/* Removes a registered waker (stream going away). */
void events_forget(event_hub *h, void *waker_arg);
/* Calls every registered waker (used by the keep-alive ticker). */
void events_wake_all(event_hub *h);
#endif
