/* sse.h - text/event-stream responses fed by the event hub: one job's
 * events until it ends, or every event (dashboards), resumable with
 * Last-Event-ID. Streams give their HTTP thread back while idle. */
#ifndef MP_SERVER_SSE_H
#define MP_SERVER_SSE_H
#include <jansson.h>
#include <stdint.h>
#include "server/context.h"

struct MHD_Connection;
struct MHD_Response;

/* job: the job's current object (borrowed). History from the store is sent
 * first; the stream ends after the job's terminal state event. */
struct MHD_Response *sse_job_stream(mp_server *srv, struct MHD_Connection *conn,
                                    const char *job_id);
/* Every event with id > last_event_id (0: only new ones). */
struct MHD_Response *sse_all_stream(mp_server *srv, struct MHD_Connection *conn,
                                    uint64_t last_event_id);
#endif
