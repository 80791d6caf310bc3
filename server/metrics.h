/*
 * metrics.h - counters and histograms the process keeps for GET /metrics
 * (Prometheus text exposition format 0.0.4). Writers take a short mutex;
 * rendering walks everything once. Gauges that other modules already know
 * (jobs in the store, device memory, residents, workers, store size) are
 * read from them at render time rather than mirrored here.
 *
 * Every metric is named modelprep_<what>_<base unit> (_total for counters),
 * and every label value is escaped (metrics_label_escape), because some of
 * them (model names of residents) come from clients.
 */
#ifndef MP_SERVER_METRICS_H
#define MP_SERVER_METRICS_H
#include <jansson.h>
#include <stdint.h>

#include "util/sbuf.h"

struct mp_server;
typedef struct mp_metrics mp_metrics;

mp_metrics *metrics_new(void);
void metrics_free(mp_metrics *m);
/* One finished HTTP request: route label (a static string from the route
 * table, or "unmatched"), status, seconds. */
void metrics_http(mp_metrics *m, const char *route, int status, double seconds);
/* One finished job: type, final state, seconds it ran, and its result (may
 * be NULL; borrowed), from which the byte counters and the load throughput
 * are taken (download: bytes_downloaded; verify/convert: bytes read;
 * shard: ranks[].bytes read; warm_load: bytes read and copied,
 * throughput_bytes_per_s). */
void metrics_job_done(mp_metrics *m, const char *type, const char *state, double seconds,
                      const json_t *result);
/* Byte counters: kind is "downloaded", "read", "copied". For code that
 * counts bytes as it goes rather than through a job result. */
void metrics_bytes(mp_metrics *m, const char *kind, uint64_t n);
/* Worker utilization (the busy count is read from the pool at render time;
 * kept for callers that track it themselves). */
void metrics_worker_busy(mp_metrics *m, int delta);
/* Throughput of the last load (bytes/s) for the gauge. */
void metrics_load_throughput(mp_metrics *m, double bytes_per_s);
/* Appends s escaped as a label value (backslash, double quote, newline),
 * without the quotes. */
void metrics_label_escape(sbuf *out, const char *s);
/* Prometheus text exposition of everything, including store/device/resident
 * gauges. Any of srv->store, gpus, residents, workers may be NULL. */
void metrics_render(struct mp_server *srv, sbuf *out);
#endif
