/* handlers.h - every HTTP handler, one file per resource under handlers/.
 * Handlers turn HTTP into calls; the work happens in server/, store/, loader/. */
#ifndef MP_HANDLERS_H
#define MP_HANDLERS_H
#include "server/http.h"
#include "server/router.h"
#include "util/sbuf.h"

/* The route table (routes.c), terminated by a NULL method. */
extern const route h_routes[];

void h_healthz(http_req *rq, http_resp *rs);
void h_readyz(http_req *rq, http_resp *rs);
void h_version(http_req *rq, http_resp *rs);
void h_openapi(http_req *rq, http_resp *rs);
void h_jobs_submit(http_req *rq, http_resp *rs);
void h_jobs_list(http_req *rq, http_resp *rs);
void h_jobs_get(http_req *rq, http_resp *rs);
void h_jobs_cancel(http_req *rq, http_resp *rs);
void h_jobs_events(http_req *rq, http_resp *rs);
void h_events(http_req *rq, http_resp *rs);
void h_devices(http_req *rq, http_resp *rs);
void h_metrics(http_req *rq, http_resp *rs);
/* The text h_metrics serves. Any of srv->store, gpus, residents, workers
 * may be NULL (a server with nothing but metrics, in tests). */
void h_metrics_render(mp_server *srv, sbuf *out);
void h_models_list(http_req *rq, http_resp *rs);
void h_models_get(http_req *rq, http_resp *rs);
void h_models_delete(http_req *rq, http_resp *rs);
void h_residents_list(http_req *rq, http_resp *rs);
void h_residents_get(http_req *rq, http_resp *rs);
void h_residents_delete(http_req *rq, http_resp *rs);
void h_residents_digest(http_req *rq, http_resp *rs);
void h_dashboard(http_req *rq, http_resp *rs);
void h_ui_asset(http_req *rq, http_resp *rs);
#endif
