/*
 * hub_fetch.c - drives hub_download() without the server, for tests and the
 * download benchmark.
 *
 *   hub_fetch --endpoint URL --cache DIR [--revision R] [--format F]
 *             [--allow P]... [--ignore P]... [--connections N]
 *             [--chunk-bytes N] [--max-retries N] [--token T]
 *             [--cancel-after-bytes N] [--no-fsync] [-v] REPO
 *
 * Prints the result object (or {"error": {"code", "message"}}) as JSON on
 * stdout; exit status 0 on success, 1 on a failed download, 2 on bad usage.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/hub/hub.h"

typedef struct run_state {
    unsigned long long cancel_after;
    unsigned long long done;
    bool verbose;
} run_state;

static int on_progress(void *arg, uint64_t done, uint64_t total, const char *msg) {
    run_state *s = arg;
    (void)total;
    (void)msg;
    s->done = done;
    return 0;
}

static bool on_cancelled(void *arg) {
    run_state *s = arg;
    return s->cancel_after && s->done >= s->cancel_after;
}

static void on_log(void *arg, const char *level, const char *msg) {
    run_state *s = arg;
    if (s->verbose) fprintf(stderr, "[%s] %s\n", level, msg);
}

int main(int argc, char **argv) {
    hub_download_opts o = {.max_retries = -1};
    const char *allow[64], *ignore[64];
    size_t na = 0, ni = 0;
    run_state st = {0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(name) (strcmp(a, name) == 0 && v && (i++, 1))
        if (OPT("--endpoint"))
            o.endpoint = v;
        else if (OPT("--cache"))
            o.cache_dir = v;
        else if (OPT("--revision"))
            o.revision = v;
        else if (OPT("--token"))
            o.token = v;
        else if (OPT("--format")) {
            if (hub_parse_load_format(v, &o.load_format) != 0) {
                fprintf(stderr, "bad --format %s\n", v);
                return 2;
            }
        } else if (OPT("--allow")) {
            if (na < 64) allow[na++] = v;
            o.allow = allow;
        } else if (OPT("--ignore")) {
            if (ni < 64) ignore[ni++] = v;
            o.ignore = ignore;
        } else if (OPT("--connections"))
            o.connections = atoi(v);
        else if (OPT("--chunk-bytes"))
            o.chunk_bytes = strtoull(v, NULL, 10);
        else if (OPT("--max-retries"))
            o.max_retries = atoi(v);
        else if (OPT("--cancel-after-bytes"))
            st.cancel_after = strtoull(v, NULL, 10);
        else if (strcmp(a, "-v") == 0)
            st.verbose = true;
        else if (strcmp(a, "--no-fsync") == 0)
            o.no_fsync = true;
        else if (a[0] != '-' && !o.repo)
            o.repo = a;
        else {
            fprintf(stderr, "usage: hub_fetch --endpoint URL --cache DIR [options] REPO\n");
            return 2;
        }
#undef OPT
    }
    o.nallow = na;
    o.nignore = ni;
    if (!o.repo || !o.cache_dir) {
        fprintf(stderr, "usage: hub_fetch --endpoint URL --cache DIR [options] REPO\n");
        return 2;
    }
    hub_callbacks cb = {on_progress, NULL, on_log, on_cancelled, &st};
    json_t *result = NULL;
    mp_error err;
    mp_error_clear(&err);
    int rc = hub_download(&o, &cb, &result, &err);
    if (rc != 0)
        result = json_pack("{s:{s:s,s:s}}", "error", "code", err.code, "message", err.message);
    char *s = json_dumps(result, JSON_COMPACT);
    puts(s ? s : "null");
    free(s);
    json_decref(result);
    return rc == 0 ? 0 : 1;
}
