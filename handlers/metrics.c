/* metrics.c - GET /metrics in the Prometheus text exposition format. */
#include "handlers/handlers.h"
#include "server/metrics.h"
#include "util/sbuf.h"

void h_metrics(http_req *rq, http_resp *rs) {
    sbuf out = {0};
    metrics_render(rq->srv, &out);
    size_t len = 0;
    char *text = sb_take(&out, &len);
    if (!text) {
        resp_problem(rs, 503, "out of memory", NULL);
        return;
    }
    resp_raw(rs, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
}
