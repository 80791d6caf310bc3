/* health.c - GET /healthz (the process answers) and GET /readyz (the store
 * answers, workers run, not draining). Both stay open without a token. */
#include <stdatomic.h>

#include "handlers/handlers.h"
#include "server/workers.h"
#include "store/store.h"

void h_healthz(http_req *rq, http_resp *rs) {
    (void)rq;
    resp_static(rs, 200, "application/json", "{\"status\":\"ok\"}", 15);
}

void h_readyz(http_req *rq, http_resp *rs) {
    mp_server *srv = rq->srv;
    bool store_ok = srv->store && store_ping(srv->store);
    bool workers_ok = srv->workers && workers_count(srv->workers) > 0;
    bool draining = atomic_load(&srv->draining);
    bool ready = store_ok && workers_ok && !draining;
    resp_json(rs, ready ? 200 : 503,
              json_pack("{s:s,s:b,s:b,s:b}", "status", ready ? "ready" : "not_ready", "store",
                        store_ok, "workers", workers_ok, "draining", draining));
}
