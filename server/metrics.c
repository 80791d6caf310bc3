/*
 * metrics.c - the process's counters and histograms, rendered in the
 * Prometheus text exposition format. Labels are bounded sets (route names
 * from the route table, job types from the registry, states), so fixed
 * tables with a mutex are enough; nothing here allocates per request.
 */
#include "server/metrics.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/gpu.h"
#include "server/context.h"
#include "server/jobs.h"
#include "server/workers.h"
#include "store/store.h"

#define MAX_ROUTES 64
#define MAX_STATUS 12
#define MAX_TYPES 16
#define N_BUCKETS 12

static const double HTTP_BUCKETS[N_BUCKETS] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                               0.05,   0.1,   0.25,   0.5,   1.0,  5.0};
static const double JOB_BUCKETS[N_BUCKETS] = {0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800,
                                              7200};

typedef struct histo {
    uint64_t buckets[N_BUCKETS];
    uint64_t count;
    double sum;
} histo;

typedef struct route_stats {
    const char *name;
    int statuses[MAX_STATUS];
    uint64_t counts[MAX_STATUS];
    int nstatus;
    histo latency;
} route_stats;

typedef struct type_stats {
    const char *name;
    histo duration;
} type_stats;

struct mp_metrics {
    pthread_mutex_t mu;
    route_stats routes[MAX_ROUTES];
    int nroutes;
    type_stats types[MAX_TYPES];
    int ntypes;
    uint64_t bytes_downloaded, bytes_read, bytes_copied;
    double load_throughput;
    int workers_busy;
};

mp_metrics *metrics_new(void) {
    mp_metrics *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    pthread_mutex_init(&m->mu, NULL);
    return m;
}

void metrics_free(mp_metrics *m) {
    if (!m) return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

static void histo_add(histo *h, const double *bounds, double v) {
    for (int i = 0; i < N_BUCKETS; i++)
        if (v <= bounds[i]) h->buckets[i]++;
    h->count++;
    h->sum += v;
}

void metrics_http(mp_metrics *m, const char *route, int status, double seconds) {
    pthread_mutex_lock(&m->mu);
    route_stats *r = NULL;
    for (int i = 0; i < m->nroutes; i++)
        if (m->routes[i].name == route || strcmp(m->routes[i].name, route) == 0) r = &m->routes[i];
    if (!r && m->nroutes < MAX_ROUTES) {
        r = &m->routes[m->nroutes++];
        r->name = route; /* route names are static strings from the route table */
    }
    if (r) {
        int k = -1;
        for (int i = 0; i < r->nstatus; i++)
            if (r->statuses[i] == status) k = i;
        if (k < 0 && r->nstatus < MAX_STATUS) {
            k = r->nstatus++;
            r->statuses[k] = status;
        }
        if (k >= 0) r->counts[k]++;
        histo_add(&r->latency, HTTP_BUCKETS, seconds);
    }
    pthread_mutex_unlock(&m->mu);
}

void metrics_job_done(mp_metrics *m, const char *type, const char *state, double seconds) {
    (void)state;
    const mp_job_type *jt = jobs_type_find(type);
    if (!jt) return;
    pthread_mutex_lock(&m->mu);
    type_stats *t = NULL;
    for (int i = 0; i < m->ntypes; i++)
        if (m->types[i].name == jt->name) t = &m->types[i];
    if (!t && m->ntypes < MAX_TYPES) {
        t = &m->types[m->ntypes++];
        t->name = jt->name;
    }
    if (t) histo_add(&t->duration, JOB_BUCKETS, seconds);
    pthread_mutex_unlock(&m->mu);
}

void metrics_bytes(mp_metrics *m, const char *kind, uint64_t n) {
    pthread_mutex_lock(&m->mu);
    if (strcmp(kind, "downloaded") == 0) m->bytes_downloaded += n;
    else if (strcmp(kind, "read") == 0) m->bytes_read += n;
    else if (strcmp(kind, "copied") == 0) m->bytes_copied += n;
    pthread_mutex_unlock(&m->mu);
}

void metrics_worker_busy(mp_metrics *m, int delta) {
    pthread_mutex_lock(&m->mu);
    m->workers_busy += delta;
    pthread_mutex_unlock(&m->mu);
}

void metrics_load_throughput(mp_metrics *m, double bytes_per_s) {
    pthread_mutex_lock(&m->mu);
    m->load_throughput = bytes_per_s;
    pthread_mutex_unlock(&m->mu);
}

static void render_histo(sbuf *out, const char *name, const char *label, const char *value,
                         const histo *h, const double *bounds) {
    for (int i = 0; i < N_BUCKETS; i++)
        sb_printf(out, "%s_bucket{%s=\"%s\",le=\"%g\"} %llu\n", name, label, value, bounds[i],
                  (unsigned long long)h->buckets[i]);
    sb_printf(out, "%s_bucket{%s=\"%s\",le=\"+Inf\"} %llu\n", name, label, value,
              (unsigned long long)h->count);
    sb_printf(out, "%s_sum{%s=\"%s\"} %.6f\n", name, label, value, h->sum);
    sb_printf(out, "%s_count{%s=\"%s\"} %llu\n", name, label, value, (unsigned long long)h->count);
}

typedef struct count_ctx {
    sbuf *out;
} count_ctx;

static void on_count(void *arg, const char *type, const char *state, int64_t n) {
    count_ctx *c = arg;
    sb_printf(c->out, "modelprep_jobs{type=\"%s\",state=\"%s\"} %lld\n", type, state,
              (long long)n);
}

void metrics_render(mp_server *srv, sbuf *out) {
    mp_metrics *m = srv->metrics;
    sb_puts(out, "# HELP modelprep_jobs Jobs in the store by type and state.\n"
                 "# TYPE modelprep_jobs gauge\n");
    count_ctx cc = {out};
    store_job_counts(srv->store, on_count, &cc);

    pthread_mutex_lock(&m->mu);
    sb_puts(out, "# HELP modelprep_job_duration_seconds Run time of finished jobs.\n"
                 "# TYPE modelprep_job_duration_seconds histogram\n");
    for (int i = 0; i < m->ntypes; i++)
        render_histo(out, "modelprep_job_duration_seconds", "type", m->types[i].name,
                     &m->types[i].duration, JOB_BUCKETS);
    sb_puts(out, "# HELP modelprep_http_requests_total HTTP requests by route and status.\n"
                 "# TYPE modelprep_http_requests_total counter\n");
    for (int i = 0; i < m->nroutes; i++)
        for (int k = 0; k < m->routes[i].nstatus; k++)
            sb_printf(out, "modelprep_http_requests_total{route=\"%s\",status=\"%d\"} %llu\n",
                      m->routes[i].name, m->routes[i].statuses[k],
                      (unsigned long long)m->routes[i].counts[k]);
    sb_puts(out, "# HELP modelprep_http_request_duration_seconds HTTP latency by route.\n"
                 "# TYPE modelprep_http_request_duration_seconds histogram\n");
    for (int i = 0; i < m->nroutes; i++)
        render_histo(out, "modelprep_http_request_duration_seconds", "route", m->routes[i].name,
                     &m->routes[i].latency, HTTP_BUCKETS);
    sb_printf(out,
              "# HELP modelprep_bytes_downloaded_total Bytes fetched from the hub.\n"
              "# TYPE modelprep_bytes_downloaded_total counter\n"
              "modelprep_bytes_downloaded_total %llu\n"
              "# HELP modelprep_bytes_read_total Weight bytes read from disk.\n"
              "# TYPE modelprep_bytes_read_total counter\n"
              "modelprep_bytes_read_total %llu\n"
              "# HELP modelprep_bytes_copied_total Weight bytes copied to devices.\n"
              "# TYPE modelprep_bytes_copied_total counter\n"
              "modelprep_bytes_copied_total %llu\n"
              "# HELP modelprep_load_throughput_bytes_per_second Throughput of the last load.\n"
              "# TYPE modelprep_load_throughput_bytes_per_second gauge\n"
              "modelprep_load_throughput_bytes_per_second %.1f\n",
              (unsigned long long)m->bytes_downloaded, (unsigned long long)m->bytes_read,
              (unsigned long long)m->bytes_copied, m->load_throughput);
    int busy = m->workers_busy;
    pthread_mutex_unlock(&m->mu);

    int nworkers = srv->workers ? workers_count(srv->workers) : 0;
    sb_printf(out,
              "# HELP modelprep_workers Worker threads by status.\n"
              "# TYPE modelprep_workers gauge\n"
              "modelprep_workers{status=\"busy\"} %d\n"
              "modelprep_workers{status=\"idle\"} %d\n"
              "# HELP modelprep_store_size_bytes Size of the SQLite store (with WAL).\n"
              "# TYPE modelprep_store_size_bytes gauge\n"
              "modelprep_store_size_bytes %lld\n",
              busy, nworkers > busy ? nworkers - busy : 0,
              (long long)store_size_bytes(srv->store));
    int n = srv->gpus ? gpu_set_count(srv->gpus) : 0;
    sb_puts(out, "# HELP modelprep_device_memory_bytes Device memory by kind.\n"
                 "# TYPE modelprep_device_memory_bytes gauge\n");
    for (int i = 0; i < n; i++) {
        gpu_device_info d;
        mp_error err;
        if (gpu_device_info_get(srv->gpus, i, &d, &err) != 0) continue;
        sb_printf(out,
                  "modelprep_device_memory_bytes{device=\"%d\",kind=\"total\"} %llu\n"
                  "modelprep_device_memory_bytes{device=\"%d\",kind=\"free\"} %llu\n"
                  "modelprep_device_memory_bytes{device=\"%d\",kind=\"resident\"} %llu\n",
                  i, (unsigned long long)d.total_bytes, i, (unsigned long long)d.free_bytes, i,
                  (unsigned long long)d.resident_bytes);
    }
}
