/* config.c - flag and environment parsing for modelprepd. */
#include "server/config.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loader/remote/remote.h"
#include "util/fsutil.h"

static const char USAGE[] =
    "usage: modelprepd [options]\n"
    "  --listen HOST:PORT      address to serve on (default 127.0.0.1:8420; port 0 = any)\n"
    "  --data-dir DIR          SQLite file, hub cache and outputs (default ./data)\n"
    "  --model-root DIR        a directory local models may live under (repeatable)\n"
    "  --token-file FILE       require 'Authorization: Bearer <token>' (or MODELPREP_TOKEN)\n"
    "  --workers N             job worker threads (default 2)\n"
    "  --http-threads N        HTTP thread pool size (default: number of cores)\n"
    "  --max-connections N     concurrent HTTP connections (default 1024)\n"
    "  --max-connections-per-ip N  of those, at most N from one client address\n"
    "                          (default: a quarter of --max-connections; every\n"
    "                          loopback client counts as the one address 127.0.0.1)\n"
    "  --header-timeout S      close a connection whose request headers stall for S\n"
    "                          seconds (default 5)\n"
    "  --hub-endpoint URL      Hugging Face-compatible hub (default $HF_ENDPOINT or\n"
    "                          https://huggingface.co)\n"
    "  --devices LIST          auto | host | host:N | async:N | 0,1,... (default auto);\n"
    "                          async:N are test devices with late copies and real fences\n"
    "  --host-device-memory B  memory cap of each host or async device in bytes (testing OOM)\n"
    "  --arena-pool B|N%       freed host arenas kept for the next warm_load (default 25%%\n"
    "                          of memory; 0 = none), released when memory is needed\n"
    "  --staging-cap B|N%      most pinned staging all warm_loads hold at once (default\n"
    "                          25%% of memory); a larger staging_bytes is refused\n"
    "  --export-socket PATH    unix socket that hands out resident arenas (memfds, CUDA IPC)\n"
    "  --insecure-listen       allow a non-loopback address without a token\n"
    "  --log-format text|json  log line format (default text)\n"
    "  --no-access-log         do not log each HTTP request\n"
    "  --s3-credentials-file F AWS credentials file for s3:// (default: AWS_* environment)\n"
    "  --s3-endpoint URL       S3-compatible endpoint (default $AWS_ENDPOINT_URL or AWS)\n"
    "  --s3-addressing STYLE   path, virtual or auto (default $AWS_S3_ADDRESSING_STYLE or auto)\n"
    "  --redis-password-file F password for AUTH to redis:// URLs that carry none\n"
    "  --version, --help\n";

static int parse_listen(mp_config *cfg, const char *v, mp_error *err) {
    const char *colon = strrchr(v, ':');
    if (!colon || colon == v) return mp_err(err, "bad_flag", "--listen wants HOST:PORT, got %s", v);
    size_t hl = (size_t)(colon - v);
    if (v[0] == '[' && hl >= 2 && v[hl - 1] == ']') { /* [::1]:8420 */
        v++;
        hl -= 2;
    }
    if (hl >= sizeof cfg->listen_host) return mp_err(err, "bad_flag", "--listen host too long");
    char *end;
    errno = 0;
    long port = strtol(colon + 1, &end, 10);
    if (errno || *end || port < 0 || port > 65535 || end == colon + 1)
        return mp_err(err, "bad_flag", "--listen port must be 0..65535");
    memcpy(cfg->listen_host, v, hl);
    cfg->listen_host[hl] = 0;
    cfg->listen_port = (int)port;
    return 0;
}

static int parse_int(const char *flag, const char *v, long lo, long hi, long *out, mp_error *err) {
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (errno || *end || end == v || n < lo || n > hi)
        return mp_err(err, "bad_flag", "%s wants an integer in %ld..%ld", flag, lo, hi);
    *out = n;
    return 0;
}

static char *read_token(const char *path, mp_error *err) {
    char *buf = NULL;
    size_t len = 0;
    if (fs_read_all(path, 4096, &buf, &len, err) != 0) return NULL;
    while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r' || buf[len - 1] == ' '))
        buf[--len] = 0;
    if (len == 0) {
        free(buf);
        mp_err(err, "bad_flag", "token file %s is empty", path);
        return NULL;
    }
    return buf;
}

bool config_host_is_loopback(const char *host) {
    return strcmp(host, "127.0.0.1") == 0 || strcmp(host, "localhost") == 0 ||
           strcmp(host, "::1") == 0 || strncmp(host, "127.", 4) == 0;
}

/* Bytes, or a share of physical memory: "1073741824", "25%". */
static int parse_mem(const char *flag, const char *v, bool zero_ok, uint64_t *out, mp_error *err) {
    char *end;
    errno = 0;
    unsigned long long b = strtoull(v, &end, 10);
    if (errno || end == v || (*end && strcmp(end, "%") != 0) || (!zero_ok && b == 0) ||
        (*end == '%' && b > 100))
        return mp_err(err, "bad_flag", "%s wants bytes or a share of memory like 25%%", flag);
    if (*end == '%') {
        long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
        uint64_t phys = pages > 0 && psz > 0 ? (uint64_t)pages * (uint64_t)psz : 0;
        b = phys / 100 * b;
        if (!zero_ok && b == 0) return mp_err(err, "bad_flag", "%s comes to 0 bytes", flag);
    }
    *out = b;
    return 0;
}

/* Defaults, then the environment's tokens. */
/* "path", "virtual" or "auto" (stored as "": the job decides by endpoint). */
static int set_addressing(mp_config *cfg, const char *v, mp_error *err) {
    if (strcmp(v, "path") && strcmp(v, "virtual") && strcmp(v, "auto"))
        return mp_err(err, "bad_flag", "S3 addressing must be path, virtual or auto");
    snprintf(cfg->s3_addressing, sizeof cfg->s3_addressing, "%s", strcmp(v, "auto") ? v : "");
    return 0;
}

static int config_defaults(mp_config *cfg, mp_error *err) {
    memset(cfg, 0, sizeof *cfg);
    snprintf(cfg->listen_host, sizeof cfg->listen_host, "127.0.0.1");
    cfg->listen_port = 8420;
    snprintf(cfg->data_dir, sizeof cfg->data_dir, "./data");
    const char *ep = getenv("HF_ENDPOINT");
    snprintf(cfg->hub_endpoint, sizeof cfg->hub_endpoint, "%s",
             ep && *ep ? ep : "https://huggingface.co");
    cfg->workers = 2;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    cfg->http_threads = ncpu > 0 ? (int)ncpu : 2;
    cfg->max_connections = 1024;
    cfg->max_connections_per_ip = 0; /* 0: a quarter of --max-connections, below */
    cfg->connection_timeout_s = 60;
    cfg->header_timeout_s = 5;
    snprintf(cfg->devices, sizeof cfg->devices, "auto");
    (void)parse_mem("--arena-pool", "25%", true, &cfg->arena_pool_bytes, NULL);
    (void)parse_mem("--staging-cap", "25%", true, &cfg->staging_cap_bytes, NULL);
    cfg->access_log = true;
    /* AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL, as in the AWS SDKs. */
    const char *s3ep = getenv("AWS_ENDPOINT_URL_S3");
    if (!s3ep || !*s3ep) s3ep = getenv("AWS_ENDPOINT_URL");
    if (s3ep && *s3ep) {
        if (!remote_endpoint_valid(s3ep))
            return mp_err(err, "bad_flag", "AWS_ENDPOINT_URL must be http(s)://host[:port]");
        snprintf(cfg->s3_endpoint, sizeof cfg->s3_endpoint, "%s", s3ep);
    }
    /* botocore's addressing_style, which its config file and the SDKs'
     * AWS_S3_ADDRESSING_STYLE name alike */
    const char *style = getenv("AWS_S3_ADDRESSING_STYLE");
    if (style && *style && set_addressing(cfg, style, err) != 0)
        return mp_err_wrap(err, NULL, "AWS_S3_ADDRESSING_STYLE");
    const char *tok = getenv("MODELPREP_TOKEN");
    if (tok && *tok && !(cfg->token = strdup(tok))) return mp_err(err, "no_memory", "oom");
    const char *hf = getenv("HF_TOKEN");
    if (hf && *hf && !(cfg->hf_token = strdup(hf))) return mp_err(err, "no_memory", "oom");
    return 0;
}

/* ---- one handler per flag: 0 done, -1 error, 1 exit now (--version,
 * --help). v is the flag's argument (NULL for a flag without one). */

static int flag_data_dir(mp_config *cfg, const char *v, mp_error *err) {
    if (strlen(v) >= sizeof cfg->data_dir - 64)
        return mp_err(err, "bad_flag", "--data-dir too long");
    snprintf(cfg->data_dir, sizeof cfg->data_dir, "%s", v);
    return 0;
}

static int flag_model_root(mp_config *cfg, const char *v, mp_error *err) {
    if (cfg->n_model_roots >= MP_MAX_MODEL_ROOTS)
        return mp_err(err, "bad_flag", "at most %d --model-root", MP_MAX_MODEL_ROOTS);
    char *real = realpath(v, NULL);
    if (!real) return mp_err(err, "bad_flag", "--model-root %s: %s", v, strerror(errno));
    cfg->model_roots[cfg->n_model_roots++] = real;
    return 0;
}

static int flag_token_file(mp_config *cfg, const char *v, mp_error *err) {
    free(cfg->token);
    if (!(cfg->token = read_token(v, err))) return -1;
    return 0;
}

static int flag_workers(mp_config *cfg, const char *v, mp_error *err) {
    long n;
    if (parse_int("--workers", v, 1, 256, &n, err) != 0) return -1;
    cfg->workers = (int)n;
    return 0;
}

static int flag_http_threads(mp_config *cfg, const char *v, mp_error *err) {
    long n;
    if (parse_int("--http-threads", v, 1, 256, &n, err) != 0) return -1;
    cfg->http_threads = (int)n;
    return 0;
}

static int flag_max_connections(mp_config *cfg, const char *v, mp_error *err) {
    long n;
    if (parse_int("--max-connections", v, 4, 65536, &n, err) != 0) return -1;
    cfg->max_connections = (int)n;
    return 0;
}

static int flag_max_connections_per_ip(mp_config *cfg, const char *v, mp_error *err) {
    long n;
    if (parse_int("--max-connections-per-ip", v, 1, 65536, &n, err) != 0) return -1;
    cfg->max_connections_per_ip = (int)n;
    return 0;
}

static int flag_header_timeout(mp_config *cfg, const char *v, mp_error *err) {
    long n;
    if (parse_int("--header-timeout", v, 1, 3600, &n, err) != 0) return -1;
    cfg->header_timeout_s = (int)n;
    return 0;
}

/* --s3-credentials-file, --redis-password-file: read at each job (so a
 * rotated secret is picked up); checked here so a typo fails at start, not
 * at the first job. */
static int secret_file(const char *flag, const char *v, char *dst, size_t cap, mp_error *err) {
    char *real = realpath(v, NULL);
    if (!real || access(real, R_OK) != 0) {
        free(real);
        return mp_err(err, "bad_flag", "--%s %s: not a readable file", flag, v);
    }
    snprintf(dst, cap, "%s", real);
    free(real);
    return 0;
}

static int flag_s3_credentials_file(mp_config *cfg, const char *v, mp_error *err) {
    return secret_file("s3-credentials-file", v, cfg->s3_credentials_file,
                       sizeof cfg->s3_credentials_file, err);
}

static int flag_redis_password_file(mp_config *cfg, const char *v, mp_error *err) {
    return secret_file("redis-password-file", v, cfg->redis_password_file,
                       sizeof cfg->redis_password_file, err);
}

static int flag_s3_endpoint(mp_config *cfg, const char *v, mp_error *err) {
    if (!remote_endpoint_valid(v))
        return mp_err(err, "bad_flag", "--s3-endpoint must be http(s)://host[:port]");
    snprintf(cfg->s3_endpoint, sizeof cfg->s3_endpoint, "%s", v);
    return 0;
}

static int flag_s3_addressing(mp_config *cfg, const char *v, mp_error *err) {
    return set_addressing(cfg, v, err);
}

static int flag_hub_endpoint(mp_config *cfg, const char *v, mp_error *err) {
    if (strncmp(v, "http://", 7) != 0 && strncmp(v, "https://", 8) != 0)
        return mp_err(err, "bad_flag", "--hub-endpoint must be an http(s) URL");
    snprintf(cfg->hub_endpoint, sizeof cfg->hub_endpoint, "%s", v);
    return 0;
}

static int flag_devices(mp_config *cfg, const char *v, mp_error *err) {
    (void)err;
    snprintf(cfg->devices, sizeof cfg->devices, "%s", v);
    return 0;
}

static int flag_host_device_memory(mp_config *cfg, const char *v, mp_error *err) {
    char *end;
    errno = 0;
    unsigned long long b = strtoull(v, &end, 10);
    if (errno || *end || b == 0)
        return mp_err(err, "bad_flag", "--host-device-memory wants bytes > 0");
    cfg->host_device_bytes = b;
    return 0;
}

static int flag_arena_pool(mp_config *cfg, const char *v, mp_error *err) {
    return parse_mem("--arena-pool", v, true, &cfg->arena_pool_bytes, err);
}

static int flag_staging_cap(mp_config *cfg, const char *v, mp_error *err) {
    return parse_mem("--staging-cap", v, false, &cfg->staging_cap_bytes, err);
}

static int flag_export_socket(mp_config *cfg, const char *v, mp_error *err) {
    (void)err;
    snprintf(cfg->export_socket, sizeof cfg->export_socket, "%s", v);
    return 0;
}

static int flag_insecure_listen(mp_config *cfg, const char *v, mp_error *err) {
    (void)v;
    (void)err;
    cfg->insecure_listen = true;
    return 0;
}

static int flag_log_format(mp_config *cfg, const char *v, mp_error *err) {
    if (strcmp(v, "json") == 0)
        cfg->log_json = true;
    else if (strcmp(v, "text") == 0)
        cfg->log_json = false;
    else
        return mp_err(err, "bad_flag", "--log-format is text or json");
    return 0;
}

static int flag_no_access_log(mp_config *cfg, const char *v, mp_error *err) {
    (void)v;
    (void)err;
    cfg->access_log = false;
    return 0;
}

static int flag_version(mp_config *cfg, const char *v, mp_error *err) {
    (void)cfg;
    (void)v;
    (void)err;
    printf("modelprepd %s (%s)\n", MP_VERSION, MP_GIT);
    return 1;
}

static int flag_help(mp_config *cfg, const char *v, mp_error *err) {
    (void)cfg;
    (void)v;
    (void)err;
    fputs(USAGE, stdout);
    return 1;
}

typedef struct flag_def {
    const char *name;
    int has_arg; /* required_argument or no_argument */
    int (*fn)(mp_config *cfg, const char *v, mp_error *err);
} flag_def;

static const flag_def FLAGS[] = {
    {"listen", required_argument, parse_listen},
    {"data-dir", required_argument, flag_data_dir},
    {"model-root", required_argument, flag_model_root},
    {"token-file", required_argument, flag_token_file},
    {"workers", required_argument, flag_workers},
    {"http-threads", required_argument, flag_http_threads},
    {"max-connections", required_argument, flag_max_connections},
    {"max-connections-per-ip", required_argument, flag_max_connections_per_ip},
    {"header-timeout", required_argument, flag_header_timeout},
    {"hub-endpoint", required_argument, flag_hub_endpoint},
    {"devices", required_argument, flag_devices},
    {"host-device-memory", required_argument, flag_host_device_memory},
    {"arena-pool", required_argument, flag_arena_pool},
    {"staging-cap", required_argument, flag_staging_cap},
    {"export-socket", required_argument, flag_export_socket},
    {"insecure-listen", no_argument, flag_insecure_listen},
    {"log-format", required_argument, flag_log_format},
    {"no-access-log", no_argument, flag_no_access_log},
    {"s3-credentials-file", required_argument, flag_s3_credentials_file},
    {"s3-endpoint", required_argument, flag_s3_endpoint},
    {"s3-addressing", required_argument, flag_s3_addressing},
    {"redis-password-file", required_argument, flag_redis_password_file},
    {"version", no_argument, flag_version},
    {"help", no_argument, flag_help},
};
#define NFLAGS (sizeof FLAGS / sizeof *FLAGS)
#define FLAG_VAL0 256 /* getopt_long's value for FLAGS[i]: FLAG_VAL0 + i */

/* The command line, flag by flag through FLAGS. */
static int config_flags(mp_config *cfg, int argc, char **argv, mp_error *err) {
    struct option opts[NFLAGS + 1];
    for (size_t i = 0; i < NFLAGS; i++)
        opts[i] = (struct option){FLAGS[i].name, FLAGS[i].has_arg, NULL, FLAG_VAL0 + (int)i};
    opts[NFLAGS] = (struct option){NULL, 0, NULL, 0};
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c < FLAG_VAL0 || c >= FLAG_VAL0 + (int)NFLAGS)
            return mp_err(err, "bad_flag", "unknown or incomplete option %s\n%s", argv[optind - 1],
                          USAGE);
        int r = FLAGS[c - FLAG_VAL0].fn(cfg, optarg, err);
        if (r != 0) return r;
    }
    if (optind < argc) return mp_err(err, "bad_flag", "unexpected argument %s", argv[optind]);
    /* A quarter of the slots by default: one address (an idle-socket flood,
     * a runaway client) can never take all of them. */
    if (cfg->max_connections_per_ip == 0)
        cfg->max_connections_per_ip = cfg->max_connections / 4 > 0 ? cfg->max_connections / 4 : 1;
    if (cfg->max_connections_per_ip > cfg->max_connections)
        return mp_err(err, "bad_flag",
                      "--max-connections-per-ip %d is over --max-connections %d: lower it so "
                      "one address cannot take every connection",
                      cfg->max_connections_per_ip, cfg->max_connections);
    return 0;
}

/* The output folders of convert, shard and s3 downloads, made now so that
 * they can be realpath'd, and the list of every root a local model may live
 * under. */
static int config_roots(mp_config *cfg, mp_error *err) {
    static const char *const OUTS[] = {"converted", "sharded", "remote/s3"};
    for (int i = 0; i < 3; i++) {
        char dir[4200];
        snprintf(dir, sizeof dir, "%s/%s", cfg->data_dir, OUTS[i]);
        if (fs_mkdirs(dir, err) != 0) return -1;
        cfg->output_roots[i] = realpath(dir, NULL);
        if (!cfg->output_roots[i]) return mp_err(err, "bad_flag", "%s: %s", dir, strerror(errno));
    }
    int n = 0;
    for (int i = 0; i < cfg->n_model_roots; i++)
        cfg->roots[n++] = cfg->model_roots[i];
    for (int i = 0; cfg->output_roots[i]; i++)
        cfg->roots[n++] = cfg->output_roots[i];
    cfg->roots[n] = NULL;
    return 0;
}

/* What follows from the flags: the data directory made and made absolute,
 * the hub cache, and the refusal to listen openly without a token. */
static int config_finish(mp_config *cfg, mp_error *err) {
    if (fs_mkdirs(cfg->data_dir, err) != 0) return -1;
    char *real = realpath(cfg->data_dir, NULL);
    if (!real) return mp_err(err, "bad_flag", "--data-dir: %s", strerror(errno));
    snprintf(cfg->data_dir, sizeof cfg->data_dir, "%s", real);
    free(real);
    const char *hc = getenv("HF_HUB_CACHE"), *hh = getenv("HF_HOME");
    if (hc && *hc)
        snprintf(cfg->hub_cache, sizeof cfg->hub_cache, "%s", hc);
    else if (hh && *hh)
        snprintf(cfg->hub_cache, sizeof cfg->hub_cache, "%s/hub", hh);
    else
        snprintf(cfg->hub_cache, sizeof cfg->hub_cache, "%s/hub", cfg->data_dir);
    if (config_roots(cfg, err) != 0) return -1;

    if (!cfg->token && !cfg->insecure_listen && !config_host_is_loopback(cfg->listen_host))
        return mp_err(err, "insecure_listen",
                      "refusing to listen on %s without a token (--token-file or "
                      "MODELPREP_TOKEN), or pass --insecure-listen",
                      cfg->listen_host);
    return 0;
}

int config_parse(mp_config *cfg, int argc, char **argv, mp_error *err) {
    if (config_defaults(cfg, err) != 0) return -1;
    int r = config_flags(cfg, argc, argv, err);
    if (r != 0) return r;
    return config_finish(cfg, err);
}

void config_free(mp_config *cfg) {
    free(cfg->token);
    free(cfg->hf_token);
    for (int i = 0; i < cfg->n_model_roots; i++)
        free(cfg->model_roots[i]);
    for (int i = 0; cfg->output_roots[i]; i++)
        free(cfg->output_roots[i]);
    memset(cfg, 0, sizeof *cfg);
}
