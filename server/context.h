/*
 * context.h - the server context: the one place that holds the process's
 * mutable state. Everything a handler or worker needs hangs off it; there
 * are no other globals.
 */
#ifndef MP_SERVER_CONTEXT_H
#define MP_SERVER_CONTEXT_H
#include <stdatomic.h>
#include <stdbool.h>

#include "server/config.h"
#include "server/log.h"
#include "util/task.h"

struct MHD_Daemon;
struct worker_pool;
struct event_hub;
struct store;
struct gpu_set;
struct resident_set;
struct mp_metrics;
struct route;

typedef struct mp_server {
    mp_config cfg;
    mp_logger log;
    struct store *store;
    struct event_hub *events;
    struct worker_pool *workers;
    struct gpu_set *gpus;
    struct resident_set *residents;
    struct mp_metrics *metrics;
    const struct route *routes; /* the handlers' table, set by main.c */
    struct MHD_Daemon *httpd;
    struct http_deferrals *deferrals; /* slow responses off the HTTP threads (http.c) */
    mp_task_env env;                  /* what run functions see; points into cfg and the above */
    atomic_bool draining;
    double started_mono;
} mp_server;
#endif
