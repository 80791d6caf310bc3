/*
 * metrics.c - the process's counters and histograms, rendered in the
 * Prometheus text exposition format. Labels are bounded sets (route names
 * from the route table, job types from the registry, final states), so
 * fixed tables under one mutex are enough; nothing here allocates per
 * request. Gauges of values that live elsewhere (jobs in the store, device
 * memory, residents, busy workers) are asked for at render time by
 * handlers/metrics.c, with the exposition helpers exported here, so that
 * this file depends on nothing above it and /metrics never disagrees with
 * the API.
 */
#include "server/metrics.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "loader/jobs/jobs.h"
#include "util/timeutil.h"

#define MAX_ROUTES 64
#define MAX_STATUS 12
#define MAX_TYPES 16
#define N_BUCKETS 12
#define MAX_RESIDENT_MODELS 256

static const double HTTP_BUCKETS[N_BUCKETS] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                               0.05,   0.1,   0.25,   0.5,   1.0,  5.0};
static const double JOB_BUCKETS[N_BUCKETS] = {0.01, 0.05, 0.1, 0.5, 1,    5,
                                              10,   30,   60,  300, 1800, 7200};

/* The states a job can be in; the last three are final. */
static const char *const STATES[] = {"queued", "running", "succeeded", "failed", "cancelled"};
#define N_STATES 5
#define FIRST_FINAL 2

typedef struct histo {
    uint64_t buckets[N_BUCKETS]; /* non-cumulative; summed when rendered */
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
    const char *name; /* the registry's static string */
    histo duration;
    uint64_t finished[N_STATES];
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
    double start_time; /* seconds since the epoch */
};

mp_metrics *metrics_new(void) {
    mp_metrics *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    pthread_mutex_init(&m->mu, NULL);
    m->start_time = (double)time_wall_ms() / 1000.0;
    return m;
}

void metrics_free(mp_metrics *m) {
    if (!m) return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

static void histo_add(histo *h, const double *bounds, double v) {
    if (!(v >= 0)) v = 0; /* NaN or a clock step: count it, in the first bucket */
    for (int i = 0; i < N_BUCKETS; i++) {
        if (v <= bounds[i]) {
            h->buckets[i]++;
            break;
        }
    }
    h->count++;
    h->sum += v;
}

void metrics_http(mp_metrics *m, const char *route, int status, double seconds) {
    if (!m || !route) return;
    pthread_mutex_lock(&m->mu);
    route_stats *r = NULL;
    for (int i = 0; i < m->nroutes && !r; i++)
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

/* The stats of a registered type; NULL for unknown names. Called locked. */
static type_stats *type_slot(mp_metrics *m, const char *type) {
    const mp_job_type *jt = type ? job_type_find(type) : NULL;
    if (!jt) return NULL;
    for (int i = 0; i < m->ntypes; i++)
        if (m->types[i].name == jt->name) return &m->types[i];
    if (m->ntypes >= MAX_TYPES) return NULL;
    type_stats *t = &m->types[m->ntypes++];
    t->name = jt->name;
    return t;
}

static uint64_t json_u64(const json_t *v) {
    if (json_is_integer(v)) {
        json_int_t i = json_integer_value(v);
        return i > 0 ? (uint64_t)i : 0;
    }
    if (json_is_real(v)) {
        double d = json_real_value(v);
        return d > 0 && d < 1.8e19 ? (uint64_t)d : 0;
    }
    return 0;
}

/* Which bytes a job moved, from the result fields api.md promises. An
 * explicit bytes_read / bytes_copied in a result wins over the defaults. */
static void result_bytes(const char *type, const json_t *r, uint64_t *down, uint64_t *rd,
                         uint64_t *cp, double *tput) {
    *down = *rd = *cp = 0;
    *tput = -1;
    if (!json_is_object(r)) return;
    const json_t *br = json_object_get(r, "bytes_read"), *bc = json_object_get(r, "bytes_copied");
    if (strcmp(type, "download") == 0) {
        *down = json_u64(json_object_get(r, "bytes_downloaded"));
    } else if (strcmp(type, "verify") == 0 || strcmp(type, "convert") == 0) {
        *rd = json_u64(json_object_get(r, "bytes"));
    } else if (strcmp(type, "shard") == 0) {
        size_t i;
        const json_t *rank;
        json_array_foreach(json_object_get(r, "ranks"), i, rank) *rd +=
            json_u64(json_object_get(rank, "bytes"));
    } else if (strcmp(type, "warm_load") == 0) {
        *rd = *cp = json_u64(json_object_get(r, "bytes"));
        const json_t *t = json_object_get(r, "throughput_bytes_per_s");
        if (json_is_number(t)) *tput = json_number_value(t);
    }
    if (br) *rd = json_u64(br);
    if (bc) *cp = json_u64(bc);
}

void metrics_job_done(mp_metrics *m, const char *type, const char *state, double seconds,
                      const json_t *result) {
    if (!m || !type) return;
    int s = -1;
    for (int i = FIRST_FINAL; i < N_STATES; i++)
        if (state && strcmp(STATES[i], state) == 0) s = i;
    uint64_t down = 0, rd = 0, cp = 0;
    double tput = -1;
    if (s == FIRST_FINAL) result_bytes(type, result, &down, &rd, &cp, &tput);
    pthread_mutex_lock(&m->mu);
    type_stats *t = type_slot(m, type);
    if (t) {
        histo_add(&t->duration, JOB_BUCKETS, seconds);
        if (s >= 0) t->finished[s]++;
    }
    m->bytes_downloaded += down;
    m->bytes_read += rd;
    m->bytes_copied += cp;
    if (tput >= 0) m->load_throughput = tput;
    pthread_mutex_unlock(&m->mu);
}

void metrics_bytes(mp_metrics *m, const char *kind, uint64_t n) {
    if (!m || !kind) return;
    pthread_mutex_lock(&m->mu);
    if (strcmp(kind, "downloaded") == 0)
        m->bytes_downloaded += n;
    else if (strcmp(kind, "read") == 0)
        m->bytes_read += n;
    else if (strcmp(kind, "copied") == 0)
        m->bytes_copied += n;
    pthread_mutex_unlock(&m->mu);
}

void metrics_worker_busy(mp_metrics *m, int delta) {
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    m->workers_busy += delta;
    pthread_mutex_unlock(&m->mu);
}

void metrics_load_throughput(mp_metrics *m, double bytes_per_s) {
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    m->load_throughput = bytes_per_s;
    pthread_mutex_unlock(&m->mu);
}

/* ---- rendering ------------------------------------------------------------ */

void metrics_label_escape(sbuf *out, const char *s) {
    const char *run = s;
    for (; *s; s++) {
        const char *rep = *s == '\\' ? "\\\\" : *s == '"' ? "\\\"" : *s == '\n' ? "\\n" : NULL;
        if (!rep) continue;
        sb_append(out, run, (size_t)(s - run));
        sb_puts(out, rep);
        run = s + 1;
    }
    sb_append(out, run, (size_t)(s - run));
}

void metrics_family(sbuf *out, const char *name, const char *type, const char *help) {
    sb_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* name{k1="v1",...,extra} where kv holds n key/value pairs (values escaped)
 * and extra is an already well-formed label (the histogram's le) or NULL. */
static void series(sbuf *out, const char *name, const char *const *kv, int n, const char *extra) {
    sb_puts(out, name);
    if (n == 0 && !extra) return;
    sb_puts(out, "{");
    for (int i = 0; i < n; i++) {
        sb_printf(out, "%s%s=\"", i ? "," : "", kv[2 * i]);
        metrics_label_escape(out, kv[2 * i + 1] ? kv[2 * i + 1] : "");
        sb_puts(out, "\"");
    }
    if (extra) sb_printf(out, "%s%s", n ? "," : "", extra);
    sb_puts(out, "}");
}

void metrics_sample_u(sbuf *out, const char *name, const char *const *kv, int n, uint64_t v) {
    series(out, name, kv, n, NULL);
    sb_printf(out, " %llu\n", (unsigned long long)v);
}

void metrics_sample_f(sbuf *out, const char *name, const char *const *kv, int n, double v) {
    series(out, name, kv, n, NULL);
    sb_printf(out, " %.17g\n", v);
}

static void render_histo(sbuf *out, const char *name, const char *const *kv, int n, const histo *h,
                         const double *bounds) {
    char key[160], le[48];
    snprintf(key, sizeof key, "%s_bucket", name);
    uint64_t cum = 0;
    for (int i = 0; i < N_BUCKETS; i++) {
        cum += h->buckets[i];
        snprintf(le, sizeof le, "le=\"%g\"", bounds[i]);
        series(out, key, kv, n, le);
        sb_printf(out, " %llu\n", (unsigned long long)cum);
    }
    series(out, key, kv, n, "le=\"+Inf\"");
    sb_printf(out, " %llu\n", (unsigned long long)h->count);
    snprintf(key, sizeof key, "%s_sum", name);
    metrics_sample_f(out, key, kv, n, h->sum);
    snprintf(key, sizeof key, "%s_count", name);
    metrics_sample_u(out, key, kv, n, h->count);
}

void metrics_render_counters(mp_metrics *m, sbuf *out) {
    const mp_job_type *const *types = job_types_all();
    pthread_mutex_lock(&m->mu);
    /* Registered types that have not finished a job yet still get their
     * (zero) series. */
    for (int i = 0; types[i]; i++)
        type_slot(m, types[i]->name);

    metrics_family(out, "modelprep_jobs_finished_total", "counter",
                   "Jobs that reached a final state since the process started.");
    for (int i = 0; i < m->ntypes; i++)
        for (int s = FIRST_FINAL; s < N_STATES; s++) {
            const char *kv[] = {"type", m->types[i].name, "state", STATES[s]};
            metrics_sample_u(out, "modelprep_jobs_finished_total", kv, 2, m->types[i].finished[s]);
        }
    metrics_family(out, "modelprep_job_duration_seconds", "histogram",
                   "Run time of finished jobs by type.");
    for (int i = 0; i < m->ntypes; i++) {
        const char *kv[] = {"type", m->types[i].name};
        render_histo(out, "modelprep_job_duration_seconds", kv, 1, &m->types[i].duration,
                     JOB_BUCKETS);
    }
    metrics_family(out, "modelprep_http_requests_total", "counter",
                   "HTTP requests by route and status code.");
    for (int i = 0; i < m->nroutes; i++)
        for (int k = 0; k < m->routes[i].nstatus; k++) {
            char code[16];
            snprintf(code, sizeof code, "%d", m->routes[i].statuses[k]);
            const char *kv[] = {"route", m->routes[i].name, "status", code};
            metrics_sample_u(out, "modelprep_http_requests_total", kv, 2, m->routes[i].counts[k]);
        }
    metrics_family(out, "modelprep_http_request_duration_seconds", "histogram",
                   "HTTP request latency by route (event streams: their whole life).");
    for (int i = 0; i < m->nroutes; i++) {
        const char *kv[] = {"route", m->routes[i].name};
        render_histo(out, "modelprep_http_request_duration_seconds", kv, 1, &m->routes[i].latency,
                     HTTP_BUCKETS);
    }
    metrics_family(out, "modelprep_downloaded_bytes_total", "counter",
                   "Bytes fetched from the hub.");
    metrics_sample_u(out, "modelprep_downloaded_bytes_total", NULL, 0, m->bytes_downloaded);
    metrics_family(out, "modelprep_read_bytes_total", "counter",
                   "Weight bytes read from disk by jobs.");
    metrics_sample_u(out, "modelprep_read_bytes_total", NULL, 0, m->bytes_read);
    metrics_family(out, "modelprep_copied_bytes_total", "counter",
                   "Weight bytes copied onto devices by warm loads.");
    metrics_sample_u(out, "modelprep_copied_bytes_total", NULL, 0, m->bytes_copied);
    metrics_family(out, "modelprep_load_throughput_bytes_per_second", "gauge",
                   "Throughput of the last finished warm load.");
    metrics_sample_f(out, "modelprep_load_throughput_bytes_per_second", NULL, 0,
                     m->load_throughput);
    pthread_mutex_unlock(&m->mu);
}

double metrics_start_time(mp_metrics *m) {
    return m->start_time;
}
