/* devices.c - GET /v1/devices: what the process can place weights on, and
 * why CUDA discovery found nothing when it failed ("cuda_error"). */
#include "gpu/gpu.h"
#include "handlers/handlers.h"

static json_t *str_or_null(const char *s) {
    return s && *s ? json_string(s) : json_null();
}

void h_devices(http_req *rq, http_resp *rs) {
    mp_server *srv = rq->srv;
    json_t *list = json_array();
    int n = srv->gpus ? gpu_set_count(srv->gpus) : 0;
    for (int i = 0; i < n; i++) {
        gpu_device_info d;
        mp_error err;
        if (gpu_device_info_get(srv->gpus, i, &d, &err) != 0) continue;
        json_array_append_new(
            list,
            json_pack("{s:i,s:s,s:s,s:I,s:I,s:I,s:o,s:o}", "index", d.index, "kind",
                      gpu_kind_name(d.kind), "name", d.name, "total_bytes",
                      (json_int_t)d.total_bytes, "free_bytes", (json_int_t)d.free_bytes,
                      "resident_bytes", (json_int_t)d.resident_bytes, "compute_capability",
                      str_or_null(d.compute_capability), "pci_bus_id", str_or_null(d.pci_bus_id)));
    }
    /* Zero CUDA devices because discovery failed (a driver older than the
     * runtime, say) is not the same as a machine without a GPU: say why. */
    const char *why = srv->gpus ? gpu_set_cuda_error(srv->gpus) : "";
    resp_json(rs, 200, json_pack("{s:o,s:o}", "devices", list, "cuda_error", str_or_null(why)));
}
