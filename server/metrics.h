/*
 * metrics.h - counters and histograms the process keeps for GET /metrics
 * (Prometheus text format). Writers are lock-free or take a short mutex;
 * rendering walks everything once.
 */
#ifndef MP_SERVER_METRICS_H
#define MP_SERVER_METRICS_H
#include <stdint.h>
#include "util/sbuf.h"

struct mp_server;
typedef struct mp_metrics mp_metrics;

mp_metrics *metrics_new(void);
void metrics_free(mp_metrics *m);
/* One finished HTTP request: route label, status, seconds. */
void metrics_http(mp_metrics *m, const char *route, int status, double seconds);
/* One finished job: type, final state, seconds it ran. */
void metrics_job_done(mp_metrics *m, const char *type, const char *state, double seconds);
/* Byte counters: kind is "downloaded", "read", "copied". */
void metrics_bytes(mp_metrics *m, const char *kind, uint64_t n);
/* Worker utilization. */
void metrics_worker_busy(mp_metrics *m, int delta);
/* Last load throughput (bytes/s) for the gauge and the dashboard chart. */
void metrics_load_throughput(mp_metrics *m, double bytes_per_s);
/* Prometheus text exposition of everything, including store/device gauges. */
void metrics_render(struct mp_server *srv, sbuf *out);
#endif
