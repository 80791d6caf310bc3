/*
 * metrics.h - counters and histograms the process keeps for GET /metrics
 * (Prometheus text exposition format 0.0.4). Writers take a short mutex;
 * rendering walks everything once. Gauges that other modules already know
 * (jobs in the store, device memory, residents, workers, store size) are
 * read from them at render time by handlers/metrics.c rather than mirrored
 * here: this module sits below everything that reports to it.
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
/* Exposition of this module's counters and histograms. */
void metrics_render_counters(mp_metrics *m, sbuf *out);
/* Process start time (seconds since the epoch), for its gauge. */
double metrics_start_time(mp_metrics *m);

/* Exposition helpers for gauges rendered elsewhere. kv holds n key/value
 * label pairs; values are escaped. */
void metrics_family(sbuf *out, const char *name, const char *type, const char *help);
void metrics_sample_u(sbuf *out, const char *name, const char *const *kv, int n, uint64_t v);
void metrics_sample_f(sbuf *out, const char *name, const char *const *kv, int n, double v);
#endif
