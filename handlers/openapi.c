/* openapi.c - GET /openapi.json: the OpenAPI document built into the binary
 * (openapi/openapi.yaml is written in the JSON subset of YAML, so it is
 * served as it is). */
#include "handlers/handlers.h"
#include "util/assets.h"

void h_openapi(http_req *rq, http_resp *rs) {
    (void)rq;
    const mp_asset *a = mp_asset_find("openapi.yaml");
    if (!a) {
        resp_problem(rs, 404, "no OpenAPI document in this build", NULL);
        return;
    }
    resp_static(rs, 200, "application/json", (const char *)a->data, a->size);
}
