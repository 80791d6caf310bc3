/* version.c - GET /v1/version: build version, git revision, CUDA versions. */
#include "gpu/gpu.h"
#include "handlers/handlers.h"

void h_version(http_req *rq, http_resp *rs) {
    (void)rq;
    int runtime = 0, driver = 0;
    json_t *cuda = json_null();
    if (gpu_cuda_versions(&runtime, &driver))
        cuda = json_pack("{s:i,s:i}", "runtime", runtime, "driver", driver);
    resp_json(rs, 200,
              json_pack("{s:s,s:s,s:o}", "version", MP_VERSION, "git", MP_GIT, "cuda", cuda));
}
