/*
 * main.c - modelprepd: parse the config, open the store, recover jobs left
 * by a dead process, open the devices, start workers and HTTP, then wait for
 * SIGTERM/SIGINT and drain in the reverse order.
 */
#include <curl/curl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <time.h>

#include "gpu/gpu.h"
#include "handlers/handlers.h"
#include "loader/residents/residents.h"
#include "server/context.h"
#include "server/export.h"
#include "server/events.h"
#include "server/http.h"
#include "server/jobs.h"
#include "server/metrics.h"
#include "server/records.h"
#include "server/workers.h"
#include "store/store.h"
#include "util/fsutil.h"
#include "util/timeutil.h"

#define KEEPALIVE_TICK_S 5

/* Resident changes go to dashboards through the event hub. */
static void on_resident_change(void *arg, const char *event_json) {
    mp_server *srv = arg;
    if (srv->events) events_publish(srv->events, NULL, "resident", event_json);
}

static int wait_for_signal(mp_server *srv) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    for (;;) {
        struct timespec ts = {KEEPALIVE_TICK_S, 0};
        int sig = sigtimedwait(&set, NULL, &ts);
        if (sig == SIGTERM || sig == SIGINT) return sig;
        /* Idle SSE streams wake up to send a keep-alive comment. */
        events_wake_all(srv->events);
    }
}

/* Blocks the signals before any thread starts so only main receives them. */
static void block_signals(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* The hub cache, the store (with the jobs a dead process left recovered),
 * the devices, the shared hubs and the export socket. Logs what fails. */
static int server_open(mp_server *srv, export_server **exporter) {
    mp_error err = {0};
    char db_path[4200];
    snprintf(db_path, sizeof db_path, "%s/modelprep.db", srv->cfg.data_dir);
    if (fs_mkdirs(srv->cfg.hub_cache, &err) != 0) {
        mp_log(&srv->log, "error", NULL, "hub cache: %s", err.message);
        return -1;
    }
    if (store_open(db_path, srv->cfg.http_threads + srv->cfg.workers + 2, &srv->store, &err) != 0) {
        mp_log(&srv->log, "error", NULL, "store: %s", err.message);
        return -1;
    }
    if (jobs_recover(srv) != 0) {
        mp_log(&srv->log, "error", NULL, "cannot recover jobs from the store");
        return -1;
    }
    /* Residents live in device memory, which died with the last process. */
    if (store_resident_mark_all_gone(srv->store) != 0)
        mp_log(&srv->log, "warn", NULL, "cannot mark the previous process's residents gone");
    if (gpu_set_open(srv->cfg.devices, srv->cfg.host_device_bytes, &srv->gpus, &err) != 0) {
        mp_log(&srv->log, "error", NULL, "devices: %s", err.message);
        return -1;
    }
    gpu_set_arena_pool(srv->gpus, srv->cfg.arena_pool_bytes);
    gpu_set_staging_cap(srv->gpus, srv->cfg.staging_cap_bytes);
    if (gpu_set_cuda_error(srv->gpus)[0])
        mp_log(&srv->log, "warn", NULL, "devices: no CUDA device usable: %s",
               gpu_set_cuda_error(srv->gpus));
    srv->events = events_new();
    srv->metrics = metrics_new();
    srv->routes = h_routes;
    res_records rec = records_residents(srv);
    srv->residents = res_set_new(&rec, srv->gpus, on_resident_change, srv);
    if (!srv->events || !srv->metrics || !srv->residents) return -1;
    if (srv->cfg.export_socket[0] &&
        export_start(srv, srv->cfg.export_socket, exporter, &err) != 0) {
        mp_log(&srv->log, "error", NULL, "%s", err.message);
        return -1;
    }
    return 0;
}

/* The workers (with what their tasks see), then HTTP; says where it
 * listens. Logs what fails. */
static int server_start(mp_server *srv) {
    mp_error err = {0};
    srv->env = (mp_task_env){
        .data_dir = srv->cfg.data_dir,
        .hub_cache = srv->cfg.hub_cache,
        .hub_endpoint = srv->cfg.hub_endpoint,
        .hf_token = srv->cfg.hf_token,
        .model_roots = srv->cfg.roots,
        .s3_credentials_file =
            srv->cfg.s3_credentials_file[0] ? srv->cfg.s3_credentials_file : NULL,
        .s3_endpoint = srv->cfg.s3_endpoint[0] ? srv->cfg.s3_endpoint : NULL,
        .s3_addressing = srv->cfg.s3_addressing[0] ? srv->cfg.s3_addressing : NULL,
        .redis_password_file =
            srv->cfg.redis_password_file[0] ? srv->cfg.redis_password_file : NULL,
        .gpus = srv->gpus,
        .residents = srv->residents,
    };
    if (workers_start(srv, srv->cfg.workers, &srv->workers) != 0) {
        mp_log(&srv->log, "error", NULL, "cannot start %d workers", srv->cfg.workers);
        return -1;
    }
    if (http_start(srv, &err) != 0) {
        mp_log(&srv->log, "error", NULL, "%s", err.message);
        return -1;
    }
    const char *host = srv->cfg.listen_host;
    bool v6 = strchr(host, ':') != NULL;
    printf("listening on http://%s%s%s:%d\n", v6 ? "[" : "", host, v6 ? "]" : "",
           srv->cfg.listen_port);
    fflush(stdout);
    mp_log(&srv->log, "info", NULL,
           "modelprepd %s ready: data %s, hub cache %s, %d workers, %d devices", MP_VERSION,
           srv->cfg.data_dir, srv->cfg.hub_cache, srv->cfg.workers, gpu_set_count(srv->gpus));
    return 0;
}

/* Drain: refuse new jobs, let running ones checkpoint and return, end the
 * event streams, stop HTTP, close the store last. */
static void server_drain(mp_server *srv, export_server *exporter) {
    atomic_store(&srv->draining, true);
    workers_stop(srv->workers);
    if (srv->events) events_close(srv->events);
    http_stop(srv);
    export_stop(exporter);
    res_set_free(srv->residents);
    gpu_set_close(srv->gpus);
    events_free(srv->events);
    metrics_free(srv->metrics);
    store_close(srv->store);
    mp_log(&srv->log, "info", NULL, "stopped");
}

int main(int argc, char **argv) {
    mp_server srv;
    memset(&srv, 0, sizeof srv);
    mp_error err = {0};
    int rc = config_parse(&srv.cfg, argc, argv, &err);
    if (rc == 1) {
        config_free(&srv.cfg);
        return 0;
    }
    if (rc != 0) {
        fprintf(stderr, "modelprepd: %s\n", err.message);
        config_free(&srv.cfg);
        return 2;
    }
    srv.log.json = srv.cfg.log_json;
    srv.started_mono = time_mono();
    atomic_init(&srv.draining, false);
    block_signals();

    /* libcurl's global state must be set up once, before worker threads. */
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0) {
        fprintf(stderr, "modelprepd: cannot initialise libcurl\n");
        config_free(&srv.cfg);
        return 1;
    }
    int exit_code = 1;
    export_server *exporter = NULL;
    if (server_open(&srv, &exporter) == 0 && server_start(&srv) == 0) {
        int sig = wait_for_signal(&srv);
        mp_log(&srv.log, "info", NULL, "signal %d: draining", sig);
        exit_code = 0;
    }
    server_drain(&srv, exporter);
    config_free(&srv.cfg);
    curl_global_cleanup();
    return exit_code;
}
