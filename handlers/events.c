/* events.c - GET /v1/events: every job and resident change as one SSE
 * stream for dashboards; Last-Event-ID (header or ?last_event_id) resumes. */
#include <errno.h>
#include <stdlib.h>

#include "handlers/handlers.h"
#include "server/sse.h"

void h_events(http_req *rq, http_resp *rs) {
    const char *last = http_header(rq, "Last-Event-ID");
    if (!last) last = http_query(rq, "last_event_id");
    uint64_t after = 0;
    if (last) {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(last, &end, 10);
        /* strtoull alone would take " 1", "+1" and "-1" (as 2^64-1). */
        if (*last < '0' || *last > '9' || *end || errno == ERANGE) {
            resp_problem(rs, 400, "Last-Event-ID must be an event id", NULL);
            return;
        }
        after = v;
    }
    rs->stream = sse_all_stream(rq->srv, rq->conn, after);
    if (!rs->stream) {
        resp_problem(rs, 503, "cannot open the event stream", NULL);
        return;
    }
    rs->status = 200;
}
