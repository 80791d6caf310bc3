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
    "  --hub-endpoint URL      Hugging Face-compatible hub (default $HF_ENDPOINT or\n"
    "                          https://huggingface.co)\n"
    "  --devices LIST          auto | host | host:N | 0,1,... (default auto)\n"
    "  --host-device-memory B  memory cap of each host device in bytes (testing OOM)\n"
    "  --export-socket PATH    unix socket that hands out resident arenas (host devices)\n"
    "  --insecure-listen       allow a non-loopback address without a token\n"
    "  --log-format text|json  log line format (default text)\n"
    "  --no-access-log         do not log each HTTP request\n"
    "  --s3-credentials-file F AWS credentials file for s3:// (default: AWS_* environment)\n"
    "  --s3-endpoint URL       S3-compatible endpoint (default $AWS_ENDPOINT_URL or AWS)\n"
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

int config_parse(mp_config *cfg, int argc, char **argv, mp_error *err) {
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
    cfg->connection_timeout_s = 60;
    snprintf(cfg->devices, sizeof cfg->devices, "auto");
    cfg->access_log = true;
    /* AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL, as in the AWS SDKs. */
    const char *s3ep = getenv("AWS_ENDPOINT_URL_S3");
    if (!s3ep || !*s3ep) s3ep = getenv("AWS_ENDPOINT_URL");
    if (s3ep && *s3ep) {
        if (!remote_endpoint_valid(s3ep))
            return mp_err(err, "bad_flag", "AWS_ENDPOINT_URL must be http(s)://host[:port]");
        snprintf(cfg->s3_endpoint, sizeof cfg->s3_endpoint, "%s", s3ep);
    }
    const char *tok = getenv("MODELPREP_TOKEN");
    if (tok && *tok && !(cfg->token = strdup(tok))) return mp_err(err, "no_memory", "oom");
    const char *hf = getenv("HF_TOKEN");
    if (hf && *hf && !(cfg->hf_token = strdup(hf))) return mp_err(err, "no_memory", "oom");

    enum {
        O_LISTEN = 256,
        O_DATA,
        O_ROOT,
        O_TOKEN,
        O_WORKERS,
        O_HTTP,
        O_MAXCONN,
        O_HUB,
        O_DEVICES,
        O_HOSTMEM,
        O_EXPORT,
        O_INSECURE,
        O_LOGFMT,
        O_NOACCESS,
        O_S3CREDS,
        O_S3EP,
        O_REDISPW,
        O_VERSION,
        O_HELP
    };
    static const struct option opts[] = {
        {"listen", required_argument, NULL, O_LISTEN},
        {"data-dir", required_argument, NULL, O_DATA},
        {"model-root", required_argument, NULL, O_ROOT},
        {"token-file", required_argument, NULL, O_TOKEN},
        {"workers", required_argument, NULL, O_WORKERS},
        {"http-threads", required_argument, NULL, O_HTTP},
        {"max-connections", required_argument, NULL, O_MAXCONN},
        {"hub-endpoint", required_argument, NULL, O_HUB},
        {"devices", required_argument, NULL, O_DEVICES},
        {"host-device-memory", required_argument, NULL, O_HOSTMEM},
        {"export-socket", required_argument, NULL, O_EXPORT},
        {"insecure-listen", no_argument, NULL, O_INSECURE},
        {"log-format", required_argument, NULL, O_LOGFMT},
        {"no-access-log", no_argument, NULL, O_NOACCESS},
        {"s3-credentials-file", required_argument, NULL, O_S3CREDS},
        {"s3-endpoint", required_argument, NULL, O_S3EP},
        {"redis-password-file", required_argument, NULL, O_REDISPW},
        {"version", no_argument, NULL, O_VERSION},
        {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    optind = 1;
    opterr = 0;
    int c;
    long n;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case O_LISTEN:
            if (parse_listen(cfg, optarg, err) != 0) return -1;
            break;
        case O_DATA:
            if (strlen(optarg) >= sizeof cfg->data_dir - 64)
                return mp_err(err, "bad_flag", "--data-dir too long");
            snprintf(cfg->data_dir, sizeof cfg->data_dir, "%s", optarg);
            break;
        case O_ROOT: {
            if (cfg->n_model_roots >= MP_MAX_MODEL_ROOTS)
                return mp_err(err, "bad_flag", "at most %d --model-root", MP_MAX_MODEL_ROOTS);
            char *real = realpath(optarg, NULL);
            if (!real)
                return mp_err(err, "bad_flag", "--model-root %s: %s", optarg, strerror(errno));
            cfg->model_roots[cfg->n_model_roots++] = real;
            break;
        }
        case O_TOKEN:
            free(cfg->token);
            if (!(cfg->token = read_token(optarg, err))) return -1;
            break;
        case O_WORKERS:
            if (parse_int("--workers", optarg, 1, 256, &n, err) != 0) return -1;
            cfg->workers = (int)n;
            break;
        case O_HTTP:
            if (parse_int("--http-threads", optarg, 1, 256, &n, err) != 0) return -1;
            cfg->http_threads = (int)n;
            break;
        case O_MAXCONN:
            if (parse_int("--max-connections", optarg, 4, 65536, &n, err) != 0) return -1;
            cfg->max_connections = (int)n;
            break;
        case O_HUB:
            if (strncmp(optarg, "http://", 7) != 0 && strncmp(optarg, "https://", 8) != 0)
                return mp_err(err, "bad_flag", "--hub-endpoint must be an http(s) URL");
            snprintf(cfg->hub_endpoint, sizeof cfg->hub_endpoint, "%s", optarg);
            break;
        case O_DEVICES:
            snprintf(cfg->devices, sizeof cfg->devices, "%s", optarg);
            break;
        case O_HOSTMEM: {
            char *end;
            errno = 0;
            unsigned long long b = strtoull(optarg, &end, 10);
            if (errno || *end || b == 0)
                return mp_err(err, "bad_flag", "--host-device-memory wants bytes > 0");
            cfg->host_device_bytes = b;
            break;
        }
        case O_EXPORT:
            snprintf(cfg->export_socket, sizeof cfg->export_socket, "%s", optarg);
            break;
        case O_INSECURE:
            cfg->insecure_listen = true;
            break;
        case O_LOGFMT:
            if (strcmp(optarg, "json") == 0)
                cfg->log_json = true;
            else if (strcmp(optarg, "text") == 0)
                cfg->log_json = false;
            else
                return mp_err(err, "bad_flag", "--log-format is text or json");
            break;
        case O_NOACCESS:
            cfg->access_log = false;
            break;
        case O_S3CREDS:
        case O_REDISPW: {
            /* Read at each job (so a rotated secret is picked up); checked
             * here so a typo fails at start, not at the first job. */
            char *real = realpath(optarg, NULL);
            if (!real || access(real, R_OK) != 0) {
                free(real);
                return mp_err(err, "bad_flag", "--%s %s: not a readable file",
                              c == O_S3CREDS ? "s3-credentials-file" : "redis-password-file",
                              optarg);
            }
            char *dst = c == O_S3CREDS ? cfg->s3_credentials_file : cfg->redis_password_file;
            size_t cap = c == O_S3CREDS ? sizeof cfg->s3_credentials_file
                                        : sizeof cfg->redis_password_file;
            snprintf(dst, cap, "%s", real);
            free(real);
            break;
        }
        case O_S3EP:
            if (!remote_endpoint_valid(optarg))
                return mp_err(err, "bad_flag", "--s3-endpoint must be http(s)://host[:port]");
            snprintf(cfg->s3_endpoint, sizeof cfg->s3_endpoint, "%s", optarg);
            break;
        case O_VERSION:
            printf("modelprepd %s (%s)\n", MP_VERSION, MP_GIT);
            return 1;
        case O_HELP:
            fputs(USAGE, stdout);
            return 1;
        default:
            return mp_err(err, "bad_flag", "unknown or incomplete option %s\n%s", argv[optind - 1],
                          USAGE);
        }
    }
    if (optind < argc) return mp_err(err, "bad_flag", "unexpected argument %s", argv[optind]);

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

    if (!cfg->token && !cfg->insecure_listen && !config_host_is_loopback(cfg->listen_host))
        return mp_err(err, "insecure_listen",
                      "refusing to listen on %s without a token (--token-file or "
                      "MODELPREP_TOKEN), or pass --insecure-listen",
                      cfg->listen_host);
    return 0;
}

void config_free(mp_config *cfg) {
    free(cfg->token);
    free(cfg->hf_token);
    for (int i = 0; i < cfg->n_model_roots; i++)
        free(cfg->model_roots[i]);
    memset(cfg, 0, sizeof *cfg);
}
