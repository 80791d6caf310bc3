/* routes.c - the route table: every resource the API serves and the handler
 * behind it. openapi/openapi.yaml must list exactly these paths and methods
 * (test_core's test_openapi_matches_routes checks it). */
#include "handlers/handlers.h"
#include "server/router.h"

const route h_routes[] = {
    {"GET", "/healthz", h_healthz, "healthz", 1},
    {"GET", "/readyz", h_readyz, "readyz", 1},
    {"GET", "/openapi.json", h_openapi, "openapi", 1},
    {"GET", "/v1/version", h_version, "version", 0},
    {"POST", "/v1/jobs", h_jobs_submit, "jobs_submit", 0},
    {"GET", "/v1/jobs", h_jobs_list, "jobs_list", 0},
    {"GET", "/v1/jobs/{id}", h_jobs_get, "jobs_get", 0},
    {"DELETE", "/v1/jobs/{id}", h_jobs_cancel, "jobs_cancel", 0},
    {"GET", "/v1/jobs/{id}/events", h_jobs_events, "jobs_events", 0},
    {"GET", "/v1/events", h_events, "events", 0},
    {"GET", "/v1/devices", h_devices, "devices", 0},
    {"GET", "/metrics", h_metrics, "metrics", 0},
    {"GET", "/", h_dashboard, "dashboard", 1},
    {"GET", "/ui/{file}", h_ui_asset, "ui_asset", 1},
    {"GET", "/v1/models", h_models_list, "models_list", 0},
    {"GET", "/v1/models/{org}/{name}", h_models_get, "models_get", 0},
    {"DELETE", "/v1/models/{org}/{name}", h_models_delete, "models_delete", 0},
    {"GET", "/v1/residents", h_residents_list, "residents_list", 0},
    {"GET", "/v1/residents/{id}", h_residents_get, "residents_get", 0},
    {"DELETE", "/v1/residents/{id}", h_residents_delete, "residents_delete", 0},
    {"GET", "/v1/residents/{id}/digest", h_residents_digest, "residents_digest", 0},
    {NULL, NULL, NULL, NULL, 0},
};
