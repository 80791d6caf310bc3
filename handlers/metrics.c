/*
 * metrics.c - GET /metrics in the Prometheus text exposition format: the
 * process's own counters (server/metrics.c) plus gauges read at render time
 * from where the values live (the store, the worker pool, the devices, the
 * resident set), so that /metrics never disagrees with the API.
 */
#include <stdlib.h>
#include <string.h>

#include "gpu/gpu.h"
#include "handlers/handlers.h"
#include "loader/jobs/jobs.h"
#include "loader/residents/residents.h"
#include "server/metrics.h"
#include "server/workers.h"
#include "store/store.h"
#include "util/sbuf.h"

#define MAX_TYPES 16
#define MAX_RESIDENT_MODELS 256

/* The states a job can be in, in the order they are rendered. */
static const char *const STATES[] = {"queued", "running", "succeeded", "failed", "cancelled"};
#define N_STATES 5

/* Jobs in the store: every registered type x state is rendered (0 where
 * the store has none) so that series do not appear and vanish; rows of
 * types no longer registered are rendered as they come. */
typedef struct job_counts {
    const mp_job_type *const *types;
    int64_t counts[MAX_TYPES][N_STATES];
    sbuf *extra;
} job_counts;

static void on_count(void *arg, const char *type, const char *state, int64_t n) {
    job_counts *c = arg;
    for (int i = 0; c->types[i] && i < MAX_TYPES; i++) {
        if (strcmp(c->types[i]->name, type) != 0) continue;
        for (int s = 0; s < N_STATES; s++) {
            if (strcmp(STATES[s], state) == 0) {
                c->counts[i][s] += n;
                return;
            }
        }
    }
    const char *kv[] = {"type", type, "state", state};
    metrics_sample_u(c->extra, "modelprep_jobs", kv, 2, n > 0 ? (uint64_t)n : 0);
}

static void render_jobs(mp_server *srv, sbuf *out) {
    metrics_family(out, "modelprep_jobs", "gauge", "Jobs in the store by type and state.");
    sbuf extra = {0};
    job_counts c = {.types = job_types_all(), .extra = &extra};
    /* A failed count leaves the gauges at zero; the store's own health is
     * what /readyz reports. */
    if (srv->store && store_job_counts(srv->store, on_count, &c) != 0)
        mp_log(&srv->log, "warn", NULL, "metrics: cannot count jobs in the store");
    for (int i = 0; c.types[i] && i < MAX_TYPES; i++) {
        for (int s = 0; s < N_STATES; s++) {
            const char *kv[] = {"type", c.types[i]->name, "state", STATES[s]};
            metrics_sample_u(out, "modelprep_jobs", kv, 2,
                             c.counts[i][s] > 0 ? (uint64_t)c.counts[i][s] : 0);
        }
    }
    if (extra.oom)
        out->oom = true;
    else if (extra.len)
        sb_append(out, extra.buf, extra.len);
    sb_free(&extra);
}

static void render_process(mp_server *srv, sbuf *out) {
    metrics_family(out, "modelprep_build_info", "gauge", "Version and git revision of this build.");
    const char *kv[] = {"version", MP_VERSION, "git", MP_GIT};
    metrics_sample_u(out, "modelprep_build_info", kv, 2, 1);
    metrics_family(out, "modelprep_process_start_time_seconds", "gauge",
                   "Start time of the process since the Unix epoch.");
    metrics_sample_f(out, "modelprep_process_start_time_seconds", NULL, 0,
                     metrics_start_time(srv->metrics));
}

static void render_workers(mp_server *srv, sbuf *out) {
    int n = srv->workers ? workers_count(srv->workers) : 0;
    int busy = srv->workers ? workers_busy(srv->workers) : 0;
    if (busy > n) busy = n;
    metrics_family(out, "modelprep_workers", "gauge", "Worker threads by state.");
    const char *kb[] = {"state", "busy"}, *ki[] = {"state", "idle"};
    metrics_sample_u(out, "modelprep_workers", kb, 1, (uint64_t)busy);
    metrics_sample_u(out, "modelprep_workers", ki, 1, (uint64_t)(n - busy));
    metrics_family(out, "modelprep_store_size_bytes", "gauge",
                   "Size of the SQLite store, WAL included.");
    int64_t sz = srv->store ? store_size_bytes(srv->store) : 0;
    metrics_sample_u(out, "modelprep_store_size_bytes", NULL, 0, sz > 0 ? (uint64_t)sz : 0);
}

static void render_devices(mp_server *srv, sbuf *out) {
    static const char *const NAMES[3] = {"modelprep_device_memory_total_bytes",
                                         "modelprep_device_memory_free_bytes",
                                         "modelprep_device_memory_resident_bytes"};
    static const char *const HELP[3] = {"Memory of each device.", "Free memory of each device.",
                                        "Device memory held by resident weights."};
    int n = srv->gpus ? gpu_set_count(srv->gpus) : 0;
    gpu_device_info *infos = n > 0 ? calloc((size_t)n, sizeof *infos) : NULL;
    bool *ok = n > 0 ? calloc((size_t)n, sizeof *ok) : NULL;
    if (n > 0 && (!infos || !ok)) {
        out->oom = true;
        free(infos);
        free(ok);
        return;
    }
    for (int i = 0; i < n; i++) {
        mp_error err;
        ok[i] = gpu_device_info_get(srv->gpus, i, &infos[i], &err) == 0;
    }
    for (int k = 0; k < 3; k++) {
        metrics_family(out, NAMES[k], "gauge", HELP[k]);
        for (int i = 0; i < n; i++) {
            if (!ok[i]) continue;
            char idx[16];
            snprintf(idx, sizeof idx, "%d", i);
            const char *kv[] = {"device", idx,          "kind", gpu_kind_name(infos[i].kind),
                                "name",   infos[i].name};
            uint64_t v = k == 0   ? infos[i].total_bytes
                         : k == 1 ? infos[i].free_bytes
                                  : infos[i].resident_bytes;
            metrics_sample_u(out, NAMES[k], kv, 3, v);
        }
    }
    free(infos);
    free(ok);
}

/* Residents summed per model: two residents of one model are one series. */
typedef struct res_sum {
    char *models[MAX_RESIDENT_MODELS];
    uint64_t bytes[MAX_RESIDENT_MODELS];
    int n, count;
    bool oom;
} res_sum;

static void on_resident(void *arg, const char *model, uint64_t bytes) {
    res_sum *r = arg;
    r->count++;
    for (int i = 0; i < r->n; i++) {
        if (strcmp(r->models[i], model) == 0) {
            r->bytes[i] += bytes;
            return;
        }
    }
    if (r->n >= MAX_RESIDENT_MODELS) return;
    char *copy = strdup(model);
    if (!copy) {
        r->oom = true;
        return;
    }
    r->models[r->n] = copy;
    r->bytes[r->n++] = bytes;
}

static void render_residents(mp_server *srv, sbuf *out) {
    res_sum r = {0};
    if (srv->residents) res_each_bytes(srv->residents, on_resident, &r);
    metrics_family(out, "modelprep_residents", "gauge",
                   "Live residents (warm-loaded weight sets).");
    metrics_sample_u(out, "modelprep_residents", NULL, 0, (uint64_t)r.count);
    metrics_family(out, "modelprep_resident_bytes", "gauge",
                   "Bytes held by live residents, by model.");
    for (int i = 0; i < r.n; i++) {
        const char *kv[] = {"model", r.models[i]};
        metrics_sample_u(out, "modelprep_resident_bytes", kv, 1, r.bytes[i]);
        free(r.models[i]);
    }
    if (r.oom) out->oom = true;
}

void h_metrics_render(mp_server *srv, sbuf *out) {
    render_process(srv, out);
    render_jobs(srv, out);
    metrics_render_counters(srv->metrics, out);
    render_workers(srv, out);
    render_devices(srv, out);
    render_residents(srv, out);
    metrics_family(out, "modelprep_http_deferred", "gauge",
                   "Slow requests (resident digests) being answered off the HTTP threads.");
    metrics_sample_u(out, "modelprep_http_deferred", NULL, 0,
                     (uint64_t)http_deferred_inflight(srv));
}

void h_metrics(http_req *rq, http_resp *rs) {
    sbuf out = {0};
    h_metrics_render(rq->srv, &out);
    size_t len = 0;
    char *text = sb_take(&out, &len);
    if (!text) {
        resp_problem(rs, 503, "out of memory", NULL);
        return;
    }
    resp_raw(rs, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
}
