/*
 * http_defer.h - responses that come later (see resp_defer in http.h), for
 * http.c only. A deferral suspends its connection, runs a piece of work on a
 * thread of its own and resumes the connection when the work is done;
 * libmicrohttpd then calls the access handler again and http.c queues what
 * the work produced. This file knows threads and connections, not requests.
 */
#ifndef MP_SERVER_HTTP_DEFER_H
#define MP_SERVER_HTTP_DEFER_H
#include <stdbool.h>

struct MHD_Connection;
typedef struct http_deferrals http_deferrals;
typedef struct http_deferred http_deferred;

http_deferrals *http_defer_create(int max_inflight);
/* Refuses new deferrals and waits for those in flight to resume their
 * connections (libmicrohttpd must not be stopped with one suspended), then
 * up to a few seconds for their answers to be sent. */
void http_defer_quiesce(http_deferrals *ds);
void http_defer_destroy(http_deferrals *ds);

/* Suspends conn and runs work(job) on a thread of its own (on this one when
 * no thread can be had), then resumes conn. 0 and *out on success; -1 with
 * *why (a static text) when refused (too many in flight, stopping, no
 * memory): then work never runs and conn is not suspended. */
int http_defer_start(http_deferrals *ds, struct MHD_Connection *conn, void (*work)(void *job),
                     void *job, http_deferred **out, const char **why);
/* Whether the work is done (false on a spurious call before the resume). */
bool http_defer_ready(http_deferred *d);
/* Frees a deferral after its resume; NULL is fine. The job is the caller's. */
void http_defer_free(http_deferred *d);
int http_defer_inflight(http_deferrals *ds);
#endif
