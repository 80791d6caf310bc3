/* config.h - the process's settings: defaults, then environment variables,
 * then command-line flags (flags win). Everything is resolved once at start. */
#ifndef MP_SERVER_CONFIG_H
#define MP_SERVER_CONFIG_H
#include <stdbool.h>
#include <stdint.h>
#include "util/error.h"

#define MP_MAX_MODEL_ROOTS 16

typedef struct mp_config {
    char listen_host[256];
    int listen_port;
    char data_dir[4096];  /* absolute after config_finish */
    char hub_cache[4096]; /* HF_HUB_CACHE, HF_HOME/hub, or data_dir/hub */
    char hub_endpoint[1024];
    char *token;                               /* owned; NULL when auth is off */
    char *hf_token;                            /* owned; HF_TOKEN */
    char *model_roots[MP_MAX_MODEL_ROOTS + 1]; /* owned, realpath'd, NULL-terminated */
    int n_model_roots;
    /* The folders our own jobs write models into (<data>/converted,
     * <data>/sharded and <data>/remote/s3, made at start, realpath'd, owned):
     * implicit model roots, so a job's output can be the next job's model
     * without a --model-root. */
    char *output_roots[4];
    /* Where a local model may live: model_roots then output_roots
     * (borrowed, NULL-terminated). What confinement and run functions use. */
    const char *roots[MP_MAX_MODEL_ROOTS + 4];
    int workers;
    int http_threads;
    int max_connections;
    int max_connections_per_ip; /* per client address; loopback is one address */
    int connection_timeout_s;   /* idle time once a request's headers are in */
    int header_timeout_s;       /* idle time before the headers are complete */
    char devices[256];
    uint64_t host_device_bytes; /* cap for host devices; 0 = system memory */
    uint64_t arena_pool_bytes;  /* freed host arenas kept for reuse (gpu_set_arena_pool) */
    uint64_t staging_cap_bytes; /* most staging (pinned) memory at once (gpu_set_staging_cap) */
    char export_socket[1024];
    char s3_credentials_file[4096]; /* --s3-credentials-file, read at each job */
    char s3_endpoint[1024];         /* --s3-endpoint / AWS_ENDPOINT_URL(_S3) */
    char s3_addressing[16];         /* --s3-addressing / AWS_S3_ADDRESSING_STYLE, "" auto */
    char redis_password_file[4096]; /* --redis-password-file, read at each job */
    bool insecure_listen;
    bool log_json;
    bool access_log;
} mp_config;

/* Parses argv over defaults and env. Returns 1 when --help/--version was
 * printed (exit 0), 0 to run, -1 on a bad flag (err set). */
int config_parse(mp_config *cfg, int argc, char **argv, mp_error *err);
void config_free(mp_config *cfg);
bool config_host_is_loopback(const char *host);
#endif
